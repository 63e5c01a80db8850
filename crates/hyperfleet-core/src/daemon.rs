//! `hyperfleet serve`: opens the data directory, recovers every machine and
//! serves the API until SIGTERM/SIGINT. VMM processes are left running on
//! exit; the next start re-adopts them.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyperfleet_api::VmmKind;

use crate::auth::{bootstrap_admin_key, BootstrapError};
use crate::config::Config;
use crate::http::server::{connection_cap, ApiServer};
use crate::http::{router, AppState};
use crate::lifecycle::run::RunCtx;
use crate::lifecycle::{sweep, Supervisor};
use crate::proxy::server::ProxyServer;
use crate::proxy::Proxy;
use crate::store::{Store, StoreError};
use crate::vmm::firecracker::{FirecrackerConfig, FirecrackerVmm};
use crate::vmm::qemu::{QemuConfig, QemuVmm};
use crate::vmm::stub::StubVmm;
use crate::vmm::Vmm;

/// How long in-flight requests get after SIGTERM before the daemon exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot prepare the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another hyperfleet daemon is already using {0} (its lock is held)")]
    AlreadyRunning(PathBuf),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot create the first admin key: {0}")]
    Bootstrap(#[from] BootstrapError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the default VMM '{0}' is not available: {1}")]
    NoDefaultBackend(VmmKind, String),
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("cannot open the image store: {0}")]
    Images(#[from] crate::images::service::ImageServiceError),
    #[error("machine networking is on but {0} (run as root, or pass --network off)")]
    Network(#[source] crate::net::NetError),
}

/// Holds the data directory's lock for the daemon's lifetime.
struct DirLock {
    // Never read: holding the open file is what keeps the flock.
    _file: std::fs::File,
}

fn lock_data_dir(dir: &Path) -> Result<DirLock, DaemonError> {
    let path = dir.join("hyperfleet.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| DaemonError::DataDir {
            path: path.clone(),
            source,
        })?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(DaemonError::AlreadyRunning(dir.to_path_buf()));
    }
    Ok(DirLock { _file: f })
}

fn prepare_dirs(config: &Config) -> Result<(), DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    for dir in [
        config.data_dir.clone(),
        config.machines_dir(),
        config.snapshots_dir(),
        config.memory_dir(),
    ] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| DaemonError::DataDir { path: dir, source })?;
    }
    tighten_modes(&config.data_dir)
}

/// The files under the data directory that hold secrets (the database
/// stores key hashes, machine env and access tokens; `admin.key` is a
/// key), each readable by the daemon's user only.
pub const PRIVATE_FILES: [&str; 6] = [
    "hyperfleet.db",
    "hyperfleet.db-wal",
    "hyperfleet.db-shm",
    "admin.key",
    "admin.tmp",
    "hyperfleet.lock",
];

/// Modes the data directory and its private files must not exceed.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Paths under `data_dir` (the directory itself included) whose mode
/// grants more than the daemon's user, with their mode and the mode they
/// should have. Missing files and symlinks are skipped. For `doctor`.
pub fn loose_modes(data_dir: &Path) -> Vec<(PathBuf, u32, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let wanted = std::iter::once((data_dir.to_path_buf(), DIR_MODE))
        .chain(PRIVATE_FILES.iter().map(|f| (data_dir.join(f), FILE_MODE)));
    wanted
        .filter_map(|(path, want)| {
            let md = std::fs::symlink_metadata(&path).ok()?;
            let mode = md.permissions().mode() & 0o7777;
            (!md.file_type().is_symlink() && mode & !want != 0).then_some((path, mode, want))
        })
        .collect()
}

/// Takes group and other access away from the data directory and its
/// private files, also when they already existed with looser modes (an
/// older version, a restore from backup, a careless `chmod -R`).
fn tighten_modes(data_dir: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::PermissionsExt;
    for (path, mode, want) in loose_modes(data_dir) {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & want)).map_err(
            |source| DaemonError::DataDir {
                path: path.clone(),
                source,
            },
        )?;
        tracing::warn!(
            path = %path.display(),
            was = format!("{mode:o}"),
            now = format!("{:o}", mode & want),
            "tightened the mode of a private file: it was readable by other users"
        );
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: each machine run
/// holds sockets, a pidfd and logs, and the API's connection cap is sized
/// from this limit. Returns the soft limit in force.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass; no other memory.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass; no other memory.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            soft = lim.rlim_cur,
            hard = lim.rlim_max,
            "cannot raise the open-file limit to its hard limit"
        );
    }
    lim.rlim_cur
}

/// The backends this daemon can run, and the default among them.
pub fn backends(config: &Config) -> (HashMap<VmmKind, Arc<dyn Vmm>>, Result<VmmKind, String>) {
    let mut map: HashMap<VmmKind, Arc<dyn Vmm>> = HashMap::new();
    map.insert(
        VmmKind::Qemu,
        Arc::new(QemuVmm::new(QemuConfig {
            binary: config.qemu_binary.clone(),
            accel: config.qemu_accel,
            assets_root: config.assets_root(),
            assets: config.assets_path(),
            run_as: config.qemu_uids,
            memory_dir: config.memory_dir(),
        })),
    );
    // Always registered, so machines can ask for it; it is the default only
    // where its availability() holds (hardware KVM), never on kvm_pvm.
    map.insert(
        VmmKind::Firecracker,
        Arc::new(FirecrackerVmm::new(FirecrackerConfig {
            binary: config.firecracker_binary.clone(),
            assets_root: config.assets_root(),
            assets: config.assets_path(),
            kernel: config.firecracker_kernel.clone(),
            jailer: config.firecracker_jailer.clone(),
        })),
    );
    if let Some(bin) = config.stub_binary_path() {
        let stub = StubVmm::new(bin);
        if stub.availability().is_ok() || config.default_vmm == Some(VmmKind::Stub) {
            map.insert(VmmKind::Stub, Arc::new(stub));
        }
    }
    let default = match config.default_vmm {
        Some(kind) => match map.get(&kind) {
            Some(b) => b.availability().map(|_| kind),
            None => Err(format!(
                "the {kind} backend is not part of this build yet (available: {})",
                names(&map)
            )),
        },
        None => {
            // Best real backend first; the stub only when nothing else exists.
            [VmmKind::Firecracker, VmmKind::Qemu, VmmKind::Stub]
                .into_iter()
                .find(|k| map.get(k).is_some_and(|b| b.availability().is_ok()))
                .ok_or_else(|| "no VMM backend is available on this host".to_string())
        }
    };
    (map, default)
}

fn names(map: &HashMap<VmmKind, Arc<dyn Vmm>>) -> String {
    let mut v: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
    v.sort();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

pub async fn serve(config: Config) -> Result<(), DaemonError> {
    let fd_limit = raise_fd_limit();
    prepare_dirs(&config)?;
    let _lock = lock_data_dir(&config.data_dir)?;
    let armed = crate::failpoint::arm_from_env();
    if !armed.is_empty() {
        tracing::warn!(
            ?armed,
            "crash points armed: this daemon will SIGKILL itself"
        );
    }
    let store = Store::open_with(&config.db_path(), config.store)?;
    if let Some(path) = bootstrap_admin_key(&store, &config.data_dir).await? {
        tracing::warn!(
            path = %path.display(),
            "created the first admin API key; read it from this file (mode 0600) and keep it safe"
        );
    }
    // Again: opening the store may have created the WAL and SHM files.
    tighten_modes(&config.data_dir)?;
    if config.disable_auth {
        tracing::warn!(
            "AUTHENTICATION IS DISABLED (--disable-auth): anyone who can reach {} controls every machine. Development only.",
            config.listen
        );
    }
    let (backends, default) = backends(&config);
    let default_vmm = default.map_err(|reason| {
        DaemonError::NoDefaultBackend(config.default_vmm.unwrap_or(VmmKind::Qemu), reason)
    })?;
    if default_vmm == VmmKind::Stub {
        tracing::warn!(
            "the default VMM is 'stub' (a stand-in process with no guest): machines created without \"vmm\" boot no real guest"
        );
    }
    let net = config
        .network
        .clone()
        .map(|c| Arc::new(crate::net::Network::new(c)));
    if let Some(net) = &net {
        // Before any run starts: the host routes, stray TAPs are gone and
        // the table matches the leases (a crash may have left it behind).
        net.prepare_host().await.map_err(DaemonError::Network)?;
        let removed = net.sweep(&store).await.map_err(DaemonError::Network)?;
        net.sync_rules(&store).await.map_err(DaemonError::Network)?;
        tracing::info!(
            subnet = %net.config.subnet,
            table = %net.config.table,
            stray_taps_removed = removed.len(),
            "machine networking ready"
        );
    }
    let report = sweep::sweep(&store, &config.machines_dir(), backends.values()).await;
    sweep_ram_files(&store, &config.memory_dir());
    match crate::lifecycle::snapshots::sweep(&store, &config.snapshots_dir()).await {
        Ok(n) if n > 0 => tracing::info!(removed = n, "snapshot sweep removed unused files"),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "the snapshot sweep failed; it runs again at the next start")
        }
    }
    tracing::info!(
        ?report,
        machines = store.machine_count(),
        "startup sweep done"
    );
    // OCI images: removes what a crash left of pulls and imports.
    let images = crate::images::service::ImageService::open(
        &config.data_dir,
        store.clone(),
        crate::images::ImageLimits::default(),
    )
    .await?;

    // Who used which machine when: the proxy and guest calls write it, the
    // idle timer reads it.
    let activity = crate::proxy::activity::Activity::default();
    // Measured once here (a directory walk), then by the evictor.
    let storage = {
        let (dir, budget) = (config.data_dir.clone(), config.storage_budget);
        tokio::task::spawn_blocking(move || crate::lifecycle::storage::Storage::open(&dir, budget))
            .await
            .map(Arc::new)
            .map_err(|e| DaemonError::Serve(std::io::Error::other(e)))?
    };
    let sup = Supervisor::with_admission(
        RunCtx {
            store: store.clone(),
            backends,
            machines_dir: config.machines_dir(),
            snapshots_dir: config.snapshots_dir(),
            boot_timeout: config.boot_timeout,
            stop_timeout: config.stop_timeout,
            net: net.clone(),
            idle: config.idle,
            activity: activity.clone(),
            storage,
        },
        config.admission,
    );
    let runs = sup.start_all()?;
    {
        let sup = sup.clone();
        tokio::spawn(async move {
            if let Err(e) = sup.sweep_templates().await {
                tracing::warn!(error = %e, "could not sweep template builders");
            }
        });
    }
    tracing::info!(
        runs,
        "machine runs started for the machines with work to do"
    );
    let machines_dir = config.machines_dir();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let dir = machines_dir.clone();
            let _ = tokio::task::spawn_blocking(move || crate::logs::rotate_all(&dir)).await;
        }
    });

    // The proxy listens before the API does: whoever finds the API up
    // (api.addr) finds the proxy ready too.
    let waker = Arc::new(crate::lifecycle::idle::SupervisorWaker(sup.clone()));
    let proxy = start_proxy(&config, &store, activity, waker, fd_limit).await?;
    let urls = match (&config.proxy, &proxy) {
        (Some(pc), Some(server)) => Some(Arc::new(pc.url_template(server.local_addr().port()))),
        _ => None,
    };

    let listener = bind(config.listen).await?;
    let addr = listener.local_addr().map_err(DaemonError::Serve)?;
    // Lets scripts and tests find a server started on port 0.
    let _ = std::fs::write(config.data_dir.join("api.addr"), format!("{addr}\n"));
    tracing::info!(%addr, data_dir = %config.data_dir.display(), default_vmm = %default_vmm, "hyperfleet listening");

    let app = router(AppState {
        sup: sup.clone(),
        store: store.clone(),
        auth_disabled: config.disable_auth,
        default_vmm,
        urls,
        guest: Arc::new(crate::http::guest::GuestSlots::new(config.guest)),
        images,
    });
    let mut limits = config.api;
    limits.max_connections = connection_cap(config.api.max_connections, fd_limit);
    if limits.max_connections < config.api.max_connections {
        tracing::warn!(
            asked = config.api.max_connections,
            used = limits.max_connections,
            fd_limit,
            "--api-max-connections lowered to a quarter of the open-file limit, to keep descriptors for the machines"
        );
    }
    let server = ApiServer::spawn(listener, app, limits).map_err(DaemonError::Serve)?;
    shutdown_signal().await;
    tracing::info!("shutting down: no new requests; VMMs keep running");
    let proxy_stopped = async move {
        if let Some(p) = proxy {
            p.shutdown().await;
        }
    };
    // Long-polls may hold connections for minutes; give in-flight requests
    // a few seconds, then go.
    let both = async move { tokio::join!(server.shutdown(), proxy_stopped) };
    if tokio::time::timeout(SHUTDOWN_GRACE, both).await.is_err() {
        tracing::warn!(
            "in-flight requests did not finish within {} s; exiting anyway",
            SHUTDOWN_GRACE.as_secs()
        );
    }
    match store.machines_with_vmm() {
        Ok(live) => tracing::info!(vmms_left_running = live.len(), "hyperfleet stopped"),
        Err(e) => {
            tracing::info!(error = %e, "hyperfleet stopped (cannot count the VMMs left running)")
        }
    }
    Ok(())
}

async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, DaemonError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen { addr, source })
}

/// Binds and starts the reverse proxy when it is on, and records its
/// address in `<data_dir>/proxy.addr` ("ip:port\n", like `api.addr`).
async fn start_proxy(
    config: &Config,
    store: &Store,
    activity: crate::proxy::activity::Activity,
    waker: Arc<dyn crate::proxy::Waker>,
    fd_limit: u64,
) -> Result<Option<ProxyServer>, DaemonError> {
    let addr_file = config.data_dir.join("proxy.addr");
    let Some(pc) = &config.proxy else {
        // A stale file would point scripts at a proxy that is not there.
        let _ = std::fs::remove_file(&addr_file);
        return Ok(None);
    };
    let listener = bind(pc.listen).await?;
    let proxy = Proxy::with_lifecycle(
        store.clone(),
        pc,
        config.disable_auth,
        activity,
        Some(waker),
    );
    let max_connections = crate::proxy::server::connection_cap(fd_limit);
    let server =
        ProxyServer::spawn(listener, proxy, max_connections).map_err(DaemonError::Serve)?;
    let addr = server.local_addr();
    let _ = std::fs::write(&addr_file, format!("{addr}\n"));
    tracing::info!(%addr, domain = %pc.domain, max_connections, "proxy listening");
    Ok(Some(server))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Guest RAM files of machines with no VMM recorded (deleted, or whose VMM
/// died while the daemon was down and was never cleaned up after) are
/// garbage: a live VMM's RAM file is the only one that matters, and the
/// run re-adopts those.
fn sweep_ram_files(store: &Store, dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".ram") else {
            continue;
        };
        let live = matches!(store.machine_vmm(id), Ok(Some(Some(_))));
        if !live {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::info!(file = %e.path().display(), "removed the RAM file of a machine with no VMM")
                }
                Err(err) => {
                    tracing::warn!(file = %e.path().display(), error = %err, "cannot remove a stale RAM file")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_is_registered_but_auto_picks_it_only_with_hardware_kvm() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(dir.path().to_path_buf());
        // Point the asset set at the test assets when present, so QEMU can be
        // the default; otherwise nothing real is available, which is fine too.
        if let Some(a) = std::env::var_os("HF_TEST_ASSETS") {
            config.assets_dir = Some(PathBuf::from(a));
        }
        let (map, default) = backends(&config);
        assert!(map.contains_key(&VmmKind::Firecracker));
        let hardware = crate::vmm::host::detect_accel().0 == crate::vmm::host::Accel::HardwareKvm;
        if !hardware {
            assert_ne!(default, Ok(VmmKind::Firecracker));
            let why = map[&VmmKind::Firecracker].availability().unwrap_err();
            assert!(!why.is_empty());
            if map[&VmmKind::Qemu].availability().is_ok() {
                assert_eq!(default, Ok(VmmKind::Qemu));
            }
        }
    }
}

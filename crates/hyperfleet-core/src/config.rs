//! Server configuration. The binary fills it from flags and `HYPERFLEET_*`
//! environment variables (docs/configuration.md has the table).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hyperfleet_api::VmmKind;

#[derive(Debug, Clone)]
pub struct Config {
    /// Everything the host keeps lives here.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Development only: every request acts as an admin of tenant `default`.
    pub disable_auth: bool,
    /// The backend for machines created without `vmm`; `None` picks the best
    /// available one.
    pub default_vmm: Option<VmmKind>,
    /// The stand-in VMM for the `stub` backend; defaults to
    /// `hyperfleet-testvmm` next to the running binary.
    pub stub_binary: Option<PathBuf>,
    /// How long a guest may take to answer before the machine fails.
    pub boot_timeout: Duration,
    /// How long a graceful stop may take before the VMM is killed.
    pub stop_timeout: Duration,
    /// `qemu-system-x86_64` (resolved through PATH).
    pub qemu_binary: PathBuf,
    pub qemu_accel: crate::vmm::host::AccelChoice,
    /// Each machine's QEMU runs as a uid (= gid) of its machine's own from
    /// this range (`--qemu-run-as`, sharing the jailer's
    /// `--jailer-uid-base/--jailer-uid-count`); None: as the daemon's user.
    pub qemu_uids: Option<crate::vmm::uid::UidRange>,
    /// Where QEMU machines' guest RAM files live (`--memory-dir`); None:
    /// [`Config::memory_dir`]'s default.
    pub memory_dir: Option<PathBuf>,
    /// `firecracker` (resolved through PATH, then /usr/local/bin).
    pub firecracker_binary: PathBuf,
    /// A kernel Firecracker boots instead of the asset set's.
    pub firecracker_kernel: Option<PathBuf>,
    /// Run Firecracker under the jailer; None = off (`--firecracker-jailer`).
    pub firecracker_jailer: Option<crate::vmm::firecracker::jailer::JailerConfig>,
    /// The guest asset set new machines get; default `<data_dir>/assets/current`.
    pub assets_dir: Option<PathBuf>,
    /// Host networking (leases, TAPs, nftables); None = off (`--network off`).
    pub network: Option<crate::net::NetConfig>,
    /// The reverse proxy; None = off.
    pub proxy: Option<ProxyConfig>,
    /// Machine records kept in memory (`--machine-cache`); every other
    /// machine is read from the database when asked for.
    pub store: crate::store::StoreOptions,
    /// The API listener's timeouts and connection cap (`--api-*`).
    pub api: crate::http::server::ApiLimits,
    /// Bounds on guest requests (exec, files, logs): `--guest-json-max-bytes`,
    /// `--guest-requests-per-tenant`, `--guest-requests-total`.
    pub guest: GuestLimits,
    /// Default tenant quotas and the host's memory budget
    /// (`--default-quota-*`, `--memory-overcommit`, `--memory-reserve-mib`).
    pub admission: crate::lifecycle::capacity::AdmissionConfig,
    /// `--default-idle-timeout`, `--wake-timeout`.
    pub idle: crate::lifecycle::idle::IdleConfig,
    /// `--storage-budget` in bytes; None: what the data directory holds at
    /// start plus 80 % of its filesystem's free space then.
    pub storage_budget: Option<u64>,
}

/// Defined with the code that enforces it (http/guest), so that http does
/// not depend back on the configuration.
pub use crate::http::guest::GuestLimits;

/// The reverse proxy's settings (`--proxy-listen`, `--proxy-domain`, …).
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// Machines are served at `<port>-<machine>.<domain>`; `localhost`
    /// works without DNS set-up (`*.localhost` resolves to loopback).
    pub domain: String,
    /// The scheme and port clients use, for the URLs in the machine JSON
    /// (they differ from the listener's when a TLS terminator or a load
    /// balancer sits in front).
    pub public_scheme: String,
    pub public_port: Option<u16>,
    /// How long connecting to a guest port may take before a 502.
    pub connect_timeout: Duration,
}

impl ProxyConfig {
    pub fn new(listen: SocketAddr) -> Self {
        ProxyConfig {
            listen,
            domain: "localhost".into(),
            public_scheme: "http".into(),
            public_port: None,
            connect_timeout: Duration::from_secs(5),
        }
    }

    pub(crate) fn url_template(&self, bound_port: u16) -> crate::urls::UrlTemplate {
        crate::urls::UrlTemplate {
            scheme: self.public_scheme.clone(),
            suffix: self.domain.clone(),
            port: self.public_port.unwrap_or(bound_port),
        }
    }
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Self {
        Config {
            data_dir,
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            disable_auth: false,
            default_vmm: None,
            stub_binary: None,
            boot_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(10),
            store: crate::store::StoreOptions::default(),
            api: crate::http::server::ApiLimits::default(),
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            qemu_accel: crate::vmm::host::AccelChoice::Auto,
            qemu_uids: None,
            memory_dir: None,
            firecracker_binary: PathBuf::from("firecracker"),
            firecracker_kernel: None,
            firecracker_jailer: None,
            assets_dir: None,
            network: None,
            proxy: None,
            guest: GuestLimits::default(),
            admission: Default::default(),
            idle: Default::default(),
            storage_budget: None,
        }
    }

    pub(crate) fn db_path(&self) -> PathBuf {
        self.data_dir.join("hyperfleet.db")
    }

    pub(crate) fn assets_root(&self) -> PathBuf {
        crate::assets::assets_root(&self.data_dir)
    }

    pub(crate) fn assets_path(&self) -> PathBuf {
        self.assets_dir
            .clone()
            .unwrap_or_else(|| self.assets_root().join("current"))
    }

    pub(crate) fn machines_dir(&self) -> PathBuf {
        self.data_dir.join("machines")
    }

    /// Where snapshots' files live, one directory per snapshot.
    pub(crate) fn snapshots_dir(&self) -> PathBuf {
        self.data_dir.join("snapshots")
    }

    /// Where running QEMU machines' guest RAM files live: the configured
    /// directory, else one of this data directory's own on `/dev/shm`
    /// (tmpfs: guest RAM must not be written back to a disk), else
    /// `<data dir>/memory` on a host without `/dev/shm`.
    pub fn memory_dir(&self) -> PathBuf {
        match &self.memory_dir {
            Some(d) => d.clone(),
            None => default_memory_dir(&self.data_dir),
        }
    }

    pub(crate) fn stub_binary_path(&self) -> Option<PathBuf> {
        if let Some(p) = &self.stub_binary {
            return Some(p.clone());
        }
        let exe = std::env::current_exe().ok()?;
        Some(exe.parent()?.join("hyperfleet-testvmm"))
    }
}

/// The default `--memory-dir` of data directory `data_dir`: a directory of
/// its own on `/dev/shm` (tmpfs: guest RAM must not be written back to a
/// disk), else `<data dir>/memory` on a host without `/dev/shm`.
pub fn default_memory_dir(data_dir: &std::path::Path) -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        return data_dir.join("memory");
    }
    // FNV-1a of the data directory: two daemons never share one.
    let mut h: u32 = 0x811c_9dc5;
    for b in data_dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    shm.join(format!("hyperfleet-{h:08x}"))
}

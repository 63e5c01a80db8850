//! The Firecracker backend: one `firecracker` process per machine, driven
//! through its REST API on a unix socket (see [`api`]).
//!
//! Per machine, under its directory: `disk.ext4` (a sparse copy of the asset
//! set's rootfs — Firecracker takes raw block images only, no qcow2),
//! `fc.sock` (the API socket), `vsock.sock` (the host side of the guest's
//! vsock device: hybrid vsock, `CONNECT <port>\n`), `console.log` (the
//! process's stdout, which carries the guest's serial console), `fc.log` and
//! `fc.metrics` (Firecracker's own logger and metrics), and
//! `snapshot/vm.state` + `snapshot/mem` while suspended.
//!
//! `spawn` only starts the process (`firecracker --api-sock <dir>/fc.sock
//! --id <machine id>`; the directory in the command line is what the orphan
//! sweep looks for). `wait_ready` configures a process that has not started
//! yet — machine-config, boot-source, drives, vsock, logger, metrics, then
//! `InstanceStart`, or `/snapshot/load` when restoring — and then waits for
//! the guest agent to answer over hybrid vsock. Doing the configuration
//! there keeps `spawn` down to "the process exists" (its identity is
//! recorded before anything can fail) and makes it idempotent: a process
//! whose VM already runs is left alone.
//!
//! Firecracker needs hardware KVM. On a host whose /dev/kvm is the
//! software-nested `kvm_pvm`, the process starts and accepts the whole
//! configuration, but the guest never answers; such machines fail at the
//! boot timeout, and [`FirecrackerVmm::availability`] says why.

pub mod api;
pub mod jailer;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_trait::async_trait;
use hyperfleet_agent_proto::{hybrid_vsock_connect, AgentClient, ConnectOptions};
use hyperfleet_api::VmmKind;
use serde_json::{json, Value};

use super::agent_cache::AgentCache;
use super::process::{self, Liveness};
use super::{LaunchSpec, MachinePaths, StopPath, Vmm, VmmError, VmmRunState};
use crate::assets::AssetSet;
use crate::doctor::{detect_accel, Accel};
use crate::store::VmmIdentity;

/// The vsock port the guest agent listens on (`hf.vsock_port=`).
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The guest's vsock context id (any value ≥ 3 works; each VM has its own
/// device, so every machine can use the same).
const GUEST_CID: u32 = 3;

pub struct FirecrackerConfig {
    /// `firecracker`, resolved through PATH (then /usr/local/bin) when relative.
    pub binary: PathBuf,
    /// `<data_dir>/assets`: where asset sets live by id.
    pub assets_root: PathBuf,
    /// The set new machines get (default `<assets_root>/current`).
    pub assets: PathBuf,
}

pub struct FirecrackerVmm {
    binary: Option<PathBuf>,
    /// `Firecracker v1.12.1`, from `--version`.
    version: Option<String>,
    accel: (Accel, String),
    assets_root: PathBuf,
    assets: PathBuf,
    agents: AgentCache,
}

/// Finds the binary: a path as given, else PATH, else /usr/local/bin (where
/// the release tarball's binaries are usually put, and which a daemon
/// started by an init system may not have in its PATH).
fn which(bin: &Path) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return bin.is_file().then(|| bin.to_path_buf());
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push(PathBuf::from("/usr/local/bin"));
    dirs.into_iter().map(|d| d.join(bin)).find(|p| p.is_file())
}

fn version_of(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("Firecracker"))
        .map(str::to_string)
}

fn unavailable(reason: impl Into<String>) -> VmmError {
    VmmError::Unavailable {
        backend: VmmKind::Firecracker,
        reason: reason.into(),
    }
}

fn asset_err(e: crate::assets::AssetError) -> VmmError {
    unavailable(e.to_string())
}

/// The last `n` non-empty lines of a file that `keep` accepts, joined.
fn tail(path: &Path, n: usize, keep: impl Fn(&str) -> bool) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && keep(l))
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn remove_if_present(path: &Path) -> Result<(), VmmError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VmmError::host(format!("removing {}", path.display()), e)),
    }
}

impl FirecrackerVmm {
    pub fn new(cfg: FirecrackerConfig) -> FirecrackerVmm {
        let binary = which(&cfg.binary);
        let version = binary.as_deref().and_then(version_of);
        FirecrackerVmm {
            binary,
            version,
            accel: detect_accel(),
            assets_root: cfg.assets_root,
            assets: cfg.assets,
            agents: AgentCache::default(),
        }
    }

    /// The API socket.
    pub fn api_socket(paths: &MachinePaths) -> PathBuf {
        paths.dir.join("fc.sock")
    }
    /// The host side of the guest's vsock device.
    pub fn vsock_socket(paths: &MachinePaths) -> PathBuf {
        paths.dir.join("vsock.sock")
    }
    pub fn disk(paths: &MachinePaths) -> PathBuf {
        paths.dir.join("disk.ext4")
    }
    fn log_file(paths: &MachinePaths) -> PathBuf {
        paths.dir.join("fc.log")
    }
    fn metrics_file(paths: &MachinePaths) -> PathBuf {
        paths.dir.join("fc.metrics")
    }
    pub fn state_file(paths: &MachinePaths) -> PathBuf {
        paths.snapshot_dir().join("vm.state")
    }
    pub fn mem_file(paths: &MachinePaths) -> PathBuf {
        paths.snapshot_dir().join("mem")
    }

    fn set_for(&self, image: Option<&str>) -> Result<AssetSet, VmmError> {
        super::asset_set_for(VmmKind::Firecracker, &self.assets, &self.assets_root, image)
    }

    /// The kernel command line. `pci=off`: Firecracker has no PCI bus; its
    /// virtio-mmio devices are appended to this line by Firecracker itself.
    pub fn boot_args(launch: &LaunchSpec, set: &AssetSet) -> String {
        format!(
            "console=ttyS0 reboot=k panic=1 pci=off hf.root=/dev/vda hf.modules={} \
             hf.hostname={} hf.vsock_port={AGENT_VSOCK_PORT}",
            set.module_list(),
            launch.name
        )
    }

    /// Why a guest did not come up, from the console and Firecracker's log.
    fn boot_detail(&self, paths: &MachinePaths) -> String {
        // Firecracker's own messages before its logger is configured go to
        // stdout too (`[<id>:<thread>] ...`); only the guest's lines count.
        let id = paths
            .dir
            .file_name()
            .map(|n| format!("[{}:", n.to_string_lossy()))
            .unwrap_or_default();
        let console = tail(&paths.console_log(), 3, |l| {
            id.is_empty() || !l.contains(&id)
        });
        let problem = tail(&Self::log_file(paths), 1, |l| {
            l.contains(":WARN]") || l.contains(":ERROR]")
        });
        let mut d = if console.is_empty() {
            "the console is empty".to_string()
        } else {
            format!("last console lines: {console}")
        };
        if !problem.is_empty() {
            d.push_str(&format!("; Firecracker's last problem: {problem}"));
        }
        if self.accel.0 != Accel::HardwareKvm {
            d.push_str(&format!(
                "; this host cannot boot Firecracker guests: {}",
                self.accel.1
            ));
        }
        d
    }

    /// Waits until the API socket answers `GET /` and returns the VM's
    /// state (`Not started`, `Running`, `Paused`).
    async fn api_state(
        &self,
        launch: &LaunchSpec,
        vmm: &VmmIdentity,
        deadline: tokio::time::Instant,
    ) -> Result<String, VmmError> {
        let sock = Self::api_socket(&launch.paths);
        loop {
            if process::probe(vmm) == Liveness::Gone {
                return Err(VmmError::Exited {
                    doing: format!("starting its API; {}", self.boot_detail(&launch.paths)),
                });
            }
            match api::call(&sock, "GET", "/", None).await {
                Ok(r) if r.status == 200 => {
                    return Ok(r.body["state"].as_str().unwrap_or_default().to_string())
                }
                Ok(_) | Err(_) if tokio::time::Instant::now() < deadline => {}
                Ok(r) => {
                    return Err(VmmError::Control {
                        doing: "waiting for the Firecracker API".into(),
                        detail: format!("GET / answered HTTP {}", r.status),
                    })
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Configures a fresh process in the documented order and starts the VM.
    async fn configure_and_start(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        let p = &launch.paths;
        let sock = Self::api_socket(p);
        let set = self.set_for(launch.spec.image.as_deref())?;
        let s = |x: &Path| x.display().to_string();
        let put = |path: &'static str, body: Value| {
            let sock = sock.clone();
            async move {
                api::expect_ok(&sock, "PUT", path, Some(&body))
                    .await
                    .map(drop)
            }
        };
        put(
            "/machine-config",
            json!({
                "vcpu_count": launch.spec.vcpu_count,
                "mem_size_mib": launch.spec.mem_size_mib,
            }),
        )
        .await?;
        put(
            "/boot-source",
            json!({
                "kernel_image_path": s(&set.kernel().map_err(asset_err)?),
                "initrd_path": s(&set.initramfs().map_err(asset_err)?),
                "boot_args": Self::boot_args(launch, &set),
            }),
        )
        .await?;
        put(
            "/drives/root",
            json!({
                "drive_id": "root",
                "path_on_host": s(&Self::disk(p)),
                // The initramfs (the agent as PID 1) switches to /dev/vda.
                "is_root_device": false,
                "is_read_only": false,
            }),
        )
        .await?;
        // No network-interfaces: machines have no network yet.
        put(
            "/vsock",
            json!({
                "guest_cid": GUEST_CID,
                "uds_path": s(&Self::vsock_socket(p)),
            }),
        )
        .await?;
        self.configure_logging(launch).await?;
        put("/actions", json!({"action_type": "InstanceStart"})).await
    }

    /// Logger and metrics to per-machine files (which must exist).
    async fn configure_logging(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        let p = &launch.paths;
        let sock = Self::api_socket(p);
        for f in [Self::log_file(p), Self::metrics_file(p)] {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&f)
                .map_err(|e| VmmError::host(format!("creating {}", f.display()), e))?;
        }
        let logger = json!({
            "log_path": Self::log_file(p).display().to_string(),
            "level": "Info",
            "show_level": true,
        });
        api::expect_ok(&sock, "PUT", "/logger", Some(&logger)).await?;
        let metrics = json!({"metrics_path": Self::metrics_file(p).display().to_string()});
        api::expect_ok(&sock, "PUT", "/metrics", Some(&metrics)).await?;
        Ok(())
    }

    /// Loads the suspend image into a fresh process and resumes it.
    async fn load_snapshot(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        let p = &launch.paths;
        self.configure_logging(launch).await?;
        let body = json!({
            "snapshot_path": Self::state_file(p).display().to_string(),
            "mem_backend": {
                "backend_type": "File",
                "backend_path": Self::mem_file(p).display().to_string(),
            },
            "resume_vm": true,
        });
        api::expect_ok(&Self::api_socket(p), "PUT", "/snapshot/load", Some(&body))
            .await
            .map(drop)
    }

    /// Brings a process that has not started its VM to a running VM
    /// (configure + start, or load the snapshot). Idempotent.
    pub async fn ensure_started(
        &self,
        launch: &LaunchSpec,
        vmm: &VmmIdentity,
        deadline: tokio::time::Instant,
    ) -> Result<(), VmmError> {
        let state = self.api_state(launch, vmm, deadline).await?;
        if state != "Not started" {
            return Ok(());
        }
        if launch.restore {
            self.load_snapshot(launch).await
        } else {
            self.configure_and_start(launch).await
        }
    }

    async fn connect_agent(
        &self,
        paths: &MachinePaths,
        timeout: Duration,
    ) -> Result<AgentClient, VmmError> {
        let sock = Self::vsock_socket(paths);
        let stream = tokio::time::timeout(timeout, hybrid_vsock_connect(&sock, AGENT_VSOCK_PORT))
            .await
            .map_err(|_| VmmError::Control {
                doing: "connecting to the guest agent over vsock".into(),
                detail: format!("no answer within {timeout:?}"),
            })?
            .map_err(|e| VmmError::Control {
                doing: "connecting to the guest agent over vsock".into(),
                detail: e.to_string(),
            })?;
        let opts = ConnectOptions {
            handshake_timeout: timeout,
            ..ConnectOptions::default()
        };
        AgentClient::connect_with(stream, opts)
            .await
            .map_err(|e| VmmError::Control {
                doing: "greeting the guest agent".into(),
                detail: e.to_string(),
            })
    }

    /// Removes the sockets of a process that is gone.
    fn remove_sockets(paths: &MachinePaths) -> Result<(), VmmError> {
        remove_if_present(&Self::api_socket(paths))?;
        remove_if_present(&Self::vsock_socket(paths))
    }

    async fn vm_state(&self, launch: &LaunchSpec) -> Result<String, VmmError> {
        let v = api::expect_ok(&Self::api_socket(&launch.paths), "GET", "/", None).await?;
        Ok(v["state"].as_str().unwrap_or_default().to_string())
    }

    async fn patch_vm(&self, launch: &LaunchSpec, state: &str) -> Result<(), VmmError> {
        let body = json!({ "state": state });
        api::expect_ok(
            &Self::api_socket(&launch.paths),
            "PATCH",
            "/vm",
            Some(&body),
        )
        .await
        .map(drop)
    }
}

#[async_trait]
impl Vmm for FirecrackerVmm {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    fn availability(&self) -> Result<String, String> {
        let bin = self.binary.as_ref().ok_or(
            "firecracker not found in PATH or /usr/local/bin (install the release binaries)",
        )?;
        let version = self
            .version
            .clone()
            .unwrap_or_else(|| "unknown version".into());
        let set = AssetSet::load(&self.assets).map_err(|e| e.to_string())?;
        if self.accel.0 != Accel::HardwareKvm {
            return Err(format!(
                "{} ({version}) is installed, but guests cannot boot here: {}",
                bin.display(),
                self.accel.1
            ));
        }
        Ok(format!(
            "{} ({version}) with KVM; guest image {} (kernel {})",
            bin.display(),
            set.id,
            set.manifest.kernel_release
        ))
    }

    fn current_image(&self) -> Result<Option<String>, String> {
        AssetSet::load(&self.assets)
            .map(|s| Some(s.id))
            .map_err(|e| e.to_string())
    }

    async fn prepare(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        let set = self.set_for(launch.spec.image.as_deref())?;
        let rootfs = set.rootfs().map_err(asset_err)?;
        // Firecracker takes raw block images only: a sparse private copy.
        let mut cmd = tokio::process::Command::new("cp");
        cmd.arg("--sparse=always").arg(&rootfs);
        super::make_disk_once(&Self::disk(&launch.paths), cmd, "copying the guest disk").await
    }

    async fn spawn(&self, launch: &LaunchSpec) -> Result<VmmIdentity, VmmError> {
        let binary = self
            .binary
            .clone()
            .ok_or_else(|| unavailable("firecracker not found in PATH or /usr/local/bin"))?;
        let p = &launch.paths;
        if launch.restore && !(Self::state_file(p).exists() && Self::mem_file(p).exists()) {
            return Err(VmmError::host(
                "restoring memory",
                std::io::Error::new(std::io::ErrorKind::NotFound, "the suspend image is missing"),
            ));
        }
        // A stale API socket makes Firecracker refuse to start; a stale vsock
        // socket makes the vsock device (or a snapshot load) fail.
        Self::remove_sockets(p)?;
        self.agents.forget(&launch.machine_id);
        let mut cmd = Command::new(&binary);
        cmd.arg("--api-sock")
            .arg(Self::api_socket(p))
            .arg("--id")
            .arg(&launch.machine_id);
        super::spawn_vmm(cmd, &p.console_log())
    }

    async fn wait_ready(
        &self,
        launch: &LaunchSpec,
        vmm: &VmmIdentity,
        timeout: Duration,
    ) -> Result<(), VmmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.ensure_started(launch, vmm, deadline).await?;
        let slot = self.agents.slot(&launch.machine_id);
        let mut guard = slot.lock().await;
        let sock = Self::vsock_socket(&launch.paths);
        loop {
            if process::probe(vmm) == Liveness::Gone {
                return Err(VmmError::Exited {
                    doing: format!(
                        "waiting for the guest to become ready; {}",
                        self.boot_detail(&launch.paths)
                    ),
                });
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(VmmError::BootTimeout {
                    timeout,
                    detail: self.boot_detail(&launch.paths),
                });
            }
            if sock.exists() {
                // Firecracker closes the connection at once while nothing
                // listens on the port, so each attempt is short.
                let left = (deadline - now).min(Duration::from_secs(2));
                match self.connect_agent(&launch.paths, left).await {
                    Ok(c) => {
                        *guard = Some(c);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::debug!(machine = %launch.machine_id, error = %e, "agent not ready yet")
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn agent(&self, launch: &LaunchSpec) -> Result<AgentClient, VmmError> {
        self.agents
            .get(&launch.machine_id, || {
                self.connect_agent(&launch.paths, Duration::from_secs(5))
            })
            .await
    }

    async fn run_state(&self, launch: &LaunchSpec) -> Result<VmmRunState, VmmError> {
        match self.vm_state(launch).await?.as_str() {
            "Paused" => Ok(VmmRunState::Paused),
            // "Not started": nobody paused it; wait_ready configures and
            // starts it.
            _ => Ok(VmmRunState::Running),
        }
    }

    async fn pause(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        self.patch_vm(launch, "Paused").await
    }

    async fn resume(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        self.patch_vm(launch, "Resumed").await
    }

    async fn shutdown(
        &self,
        launch: &LaunchSpec,
        vmm: &VmmIdentity,
        timeout: Duration,
    ) -> Result<StopPath, VmmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let gone_by = |deadline: tokio::time::Instant| async move {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            process::wait_gone(vmm, left)
                .await
                .map_err(|e| VmmError::host("waiting for Firecracker to exit", e))
        };
        let done = |path: StopPath| -> Result<StopPath, VmmError> {
            self.agents.forget(&launch.machine_id);
            Self::remove_sockets(&launch.paths)?;
            Ok(path)
        };
        // 1. Ask the agent: it syncs and unmounts before powering off.
        let agent = tokio::time::timeout(Duration::from_secs(2), self.agent(launch)).await;
        if let Ok(Ok(c)) = agent {
            if c.poweroff().await.is_ok() && gone_by(deadline).await? {
                return done(StopPath::Graceful {
                    via: "agent poweroff",
                });
            }
        }
        // 2. Ctrl-Alt-Del: with reboot=k the guest's reboot ends Firecracker.
        let cad = json!({"action_type": "SendCtrlAltDel"});
        if tokio::time::Instant::now() < deadline
            && api::expect_ok(
                &Self::api_socket(&launch.paths),
                "PUT",
                "/actions",
                Some(&cad),
            )
            .await
            .is_ok()
            && gone_by(deadline).await?
        {
            return done(StopPath::Graceful {
                via: "Ctrl-Alt-Del",
            });
        }
        // 3. Out of time.
        process::kill(vmm)
            .await
            .map_err(|e| VmmError::host("killing Firecracker", e))?;
        done(StopPath::KilledAfterTimeout)
    }

    async fn save_state(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        let p = &launch.paths;
        let dir = p.snapshot_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| VmmError::host(format!("creating {}", dir.display()), e))?;
        if self.vm_state(launch).await? != "Paused" {
            self.patch_vm(launch, "Paused").await?;
        }
        for f in [Self::state_file(p), Self::mem_file(p)] {
            remove_if_present(&f)?;
        }
        let body = json!({
            "snapshot_type": "Full",
            "snapshot_path": Self::state_file(p).display().to_string(),
            "mem_file_path": Self::mem_file(p).display().to_string(),
        });
        api::expect_ok(&Self::api_socket(p), "PUT", "/snapshot/create", Some(&body)).await?;
        // Both files must be on disk before the VMM is killed.
        for f in [Self::state_file(p), Self::mem_file(p)] {
            let file = tokio::fs::File::open(&f)
                .await
                .map_err(|e| VmmError::host(format!("opening {}", f.display()), e))?;
            file.sync_all()
                .await
                .map_err(|e| VmmError::host(format!("syncing {}", f.display()), e))?;
        }
        self.agents.forget(&launch.machine_id);
        Ok(())
    }

    async fn release(&self, paths: &MachinePaths) -> Result<(), VmmError> {
        if let Some(id) = paths.dir.file_name().and_then(|n| n.to_str()) {
            self.agents.forget(id);
        }
        super::remove_dir_idempotent(&paths.dir).await
    }
}

#[cfg(test)]
mod tests;

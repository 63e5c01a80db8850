//! The Firecracker backend: one `firecracker` process per machine, driven
//! through its REST API on a unix socket (see [`api`]), run under the
//! jailer when that is on (see [`jailer`], which also builds the jailed
//! command). This module holds the backend's state and its `Vmm` methods;
//! `paths` says where a machine's files are, `configure` brings a fresh
//! process to a running VM, `snapshot` saves, loads and merges suspend
//! images, `layer` does the page-level work of diff snapshots and `kernel`
//! judges whether a guest kernel finds Firecracker's devices.
//!
//! Per machine, under its directory: `disk.ext4` (a sparse copy of the asset
//! set's rootfs — Firecracker takes raw block images only, no qcow2),
//! `fc.sock` (the API socket), `vsock.sock` (the host side of the guest's
//! vsock device: hybrid vsock, `CONNECT <port>\n`), `console.log` (the
//! process's stdout, which carries the guest's serial console), `fc.log` and
//! `fc.metrics` (Firecracker's own logger and metrics), and
//! `snapshot/vm.state` + `snapshot/mem` (+ `snapshot/mem.diff`, see below)
//! while suspended. Jailed, the sockets are symlinks into the chroot under
//! `jail/`, whose mirror of these paths keeps every path Firecracker sees
//! the same as unjailed.
//!
//! **Diff snapshots.** Dirty-page tracking is on for every VM
//! (`track_dirty_pages` in machine-config at boot, `enable_diff_snapshots`
//! on load). A VM restored from
//! `snapshot/mem` keeps mapping that file (MAP_PRIVATE) for its whole life,
//! so `spawn` keeps a hard link to it as `mem.base` (removed with the
//! process's other leftovers). Suspending such a VM again writes a `"Diff"`
//! snapshot: the base goes back to `snapshot/mem` and Firecracker writes
//! only the pages dirtied since the load, as the sparse layer
//! `snapshot/mem.diff`. Firecracker's documentation says a loaded memory
//! file "must be considered immutable" while its VM lives (writing it
//! corrupts the guest's view through the page cache), so the layer is not
//! merged then: the next restore merges it onto the base in place
//! ([`layer::merge`]) once no VMM of the machine runs, then removes it. A
//! merge cut short is finished by the next attempt (merging is idempotent
//! and the layer goes only after the merged base is fsynced), so a
//! half-merged base is never loaded. A first suspend, a VM loaded without
//! tracking, a base the VMM does not map, a filesystem without holes, or a
//! failed diff all fall back to a full snapshot.
//!
//! `spawn` only starts the process (`firecracker --api-sock <dir>/fc.sock
//! --id <machine id>`, or the jailer that execs it; the directory in the
//! command line is what the orphan sweep looks for). `wait_ready`
//! configures a process that has not started yet — machine-config,
//! boot-source, drives, network-interfaces, vsock, logger, metrics, then
//! `InstanceStart`, or `/snapshot/load` (with the machine's TAP as a network
//! override) when restoring — and then waits for the guest agent to answer
//! over hybrid vsock. Doing the configuration there keeps `spawn` down to
//! "the process exists" (its identity is recorded before anything can fail)
//! and makes it idempotent: a process whose VM already runs is left alone.
//!
//! Firecracker needs hardware KVM. On a host whose /dev/kvm is the
//! software-nested `kvm_pvm`, the process starts and accepts the whole
//! configuration, but the guest never answers; such machines fail at the
//! boot timeout, and [`FirecrackerVmm::availability`] says why.

pub(crate) mod api;
mod configure;
pub mod jailer;
pub mod kernel;
pub(crate) mod layer;
mod paths;
mod snapshot;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_trait::async_trait;
use hyperfleet_agent_proto::{hybrid_vsock_connect, AgentClient};
use hyperfleet_api::VmmKind;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::agent_cache::{AgentCache, AgentChannel, ReadyPoll};
use super::host::{self, Accel};
use super::stop::{graceful_stop, StopRequest};
use super::{GuestImages, LaunchSpec, MachinePaths, Saved, StopPath, Vmm, VmmError, VmmRunState};
use crate::assets::AssetSet;
use crate::store::VmmIdentity;
use jailer::{Cgroups, JailerConfig};

/// The vsock port the guest agent listens on (`hf.vsock_port=`).
pub(crate) const AGENT_VSOCK_PORT: u32 = 1024;
/// The guest's vsock context id (any value ≥ 3 works; each VM has its own
/// device, so every machine can use the same).
const GUEST_CID: u32 = 3;
/// The guest's one network interface.
const NET_IFACE: &str = "eth0";

pub(crate) struct FirecrackerConfig {
    /// `firecracker`, resolved through PATH (then /usr/local/bin) when relative.
    pub binary: PathBuf,
    /// `<data_dir>/assets`: where asset sets live by id.
    pub assets_root: PathBuf,
    /// The set new machines get (default `<assets_root>/current`).
    pub assets: PathBuf,
    /// A kernel to boot instead of the asset set's (`--firecracker-kernel`):
    /// one with virtio-mmio command-line devices, which Debian's is not.
    pub kernel: Option<PathBuf>,
    /// Run each VMM under the jailer; None = off.
    pub jailer: Option<JailerConfig>,
}

/// The jailer as this daemon found it.
struct Jail {
    cfg: JailerConfig,
    /// The binary, resolved like Firecracker's; None when missing.
    binary: Option<PathBuf>,
    /// `Jailer v1.12.1`, from `--version`.
    version: Option<String>,
}

pub(crate) struct FirecrackerVmm {
    binary: Option<PathBuf>,
    /// `Firecracker v1.12.1`, from `--version`.
    version: Option<String>,
    accel: (Accel, String),
    images: GuestImages,
    agents: AgentCache,
    kernel: Option<PathBuf>,
    jail: Option<Jail>,
    /// Where jailed VMMs' cgroups are (detected once; also used to clean up
    /// after a VMM that ran jailed before the jailer was turned off).
    cgroups: Cgroups,
    /// Whether the guest kernel finds Firecracker's devices, for the asset
    /// set (by id) it was judged with; kernels do not change under an id.
    kernel_check: std::sync::Mutex<Option<(String, Result<String, String>)>>,
}

/// Finds the binary: a path as given, else PATH, else /usr/local/bin.
fn which(bin: &Path) -> Option<PathBuf> {
    host::which(bin, &[host::RELEASE_BIN_DIR])
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
    VmmError::unavailable(VmmKind::Firecracker, reason)
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

impl FirecrackerVmm {
    pub(crate) fn new(cfg: FirecrackerConfig) -> FirecrackerVmm {
        // Absolute: the jailer copies `--exec-file` into the chroot.
        let binary = which(&cfg.binary).map(|b| std::path::absolute(&b).unwrap_or(b));
        let version = binary.as_deref().and_then(version_of);
        let jail = cfg.jailer.map(|j| {
            let binary = which(&j.binary);
            let version = binary.as_deref().and_then(jailer::version_of);
            Jail {
                cfg: j,
                binary,
                version,
            }
        });
        FirecrackerVmm {
            binary,
            version,
            accel: host::detect_accel(),
            images: GuestImages::new(VmmKind::Firecracker, cfg.assets_root, cfg.assets),
            agents: AgentCache::default(),
            kernel: cfg.kernel,
            jail,
            cgroups: Cgroups::detect(),
            kernel_check: std::sync::Mutex::new(None),
        }
    }

    /// [`kernel::check`] of the kernel guests boot with, once per asset set.
    fn kernel_check(&self, set: &AssetSet) -> Result<String, String> {
        let mut cached = crate::store::lock(&self.kernel_check);
        if let Some((id, verdict)) = cached.as_ref() {
            if *id == set.id {
                return verdict.clone();
            }
        }
        let verdict = kernel::check(self.kernel.as_deref(), set);
        *cached = Some((set.id.clone(), verdict.clone()));
        verdict
    }

    /// Whether VMMs run under the jailer.
    pub(crate) fn jailed(&self) -> bool {
        self.jail.is_some()
    }

    /// How VMMs run, for availability; an error when the jailer is on but
    /// cannot work.
    fn jail_summary(&self) -> Result<String, String> {
        let Some(jail) = &self.jail else {
            return Ok("not jailed (--firecracker-jailer off)".into());
        };
        let bin = jail.binary.as_ref().ok_or_else(|| {
            format!(
                "the jailer is on but {} was not found in PATH or /usr/local/bin \
                 (install it from the Firecracker release, or pass --firecracker-jailer off \
                 for development)",
                jail.cfg.binary.display()
            )
        })?;
        let name = self
            .binary
            .as_ref()
            .and_then(|b| b.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.contains("firecracker") {
            return Err(format!(
                "the jailer only runs a binary whose file name contains \"firecracker\", not {name}"
            ));
        }
        Ok(format!(
            "jailed by {} ({}), each machine as a uid (= gid) of its own from {}, {}, \
             networked machines each in a network namespace of their own",
            bin.display(),
            jail.version.as_deref().unwrap_or("unknown version"),
            jail.cfg.uids,
            self.cgroups.describe()
        ))
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
        let jailer_error = |l: &str| l.contains("Jailer error");
        let console = tail(&paths.console_log(), 3, |l| {
            (id.is_empty() || !l.contains(&id)) && !jailer_error(l)
        });
        let problem = tail(&Self::log_file(paths), 1, |l| {
            l.contains(":WARN]") || l.contains(":ERROR]")
        });
        let mut d = if console.is_empty() {
            "the console is empty".to_string()
        } else {
            format!("last console lines: {console}")
        };
        let jailer = tail(&paths.console_log(), 1, jailer_error);
        if !jailer.is_empty() {
            d = format!("the jailer failed: {jailer}; {d}");
        }
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
}

#[async_trait]
impl AgentChannel for FirecrackerVmm {
    fn agents(&self) -> &AgentCache {
        &self.agents
    }

    async fn open_channel(
        &self,
        paths: &MachinePaths,
        timeout: Duration,
    ) -> Result<tokio::net::UnixStream, VmmError> {
        let sock = Self::vsock_socket(paths);
        let failed = |detail: String| VmmError::Control {
            doing: "connecting to the guest agent over vsock".into(),
            detail,
        };
        tokio::time::timeout(timeout, hybrid_vsock_connect(&sock, AGENT_VSOCK_PORT))
            .await
            .map_err(|_| failed(format!("no answer within {timeout:?}")))?
            .map_err(|e| failed(e.to_string()))
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
        let set = self.images.current()?;
        let jail = self.jail_summary()?;
        if self.accel.0 != Accel::HardwareKvm {
            return Err(format!(
                "{} ({version}, {jail}) is installed, but guests cannot boot here: {}",
                bin.display(),
                self.accel.1
            ));
        }
        let kernel = self.kernel_check(&set).map_err(|why| {
            format!(
                "{} ({version}) is installed, but its guests cannot boot: {why} \
                 (docs/guests.md lists kernels that work; --firecracker-kernel picks another)",
                bin.display()
            )
        })?;
        Ok(format!(
            "{} ({version}) with KVM, {jail}; guest image {}; {kernel}",
            bin.display(),
            set.id,
        ))
    }

    fn jail_uids(&self) -> Option<crate::vmm::uid::UidRange> {
        self.jail.as_ref().map(|j| j.cfg.uids)
    }

    fn machine_netns(&self) -> bool {
        self.jailed()
    }

    fn current_image(&self) -> Result<Option<String>, String> {
        self.images.current_id()
    }

    fn disk_bytes(&self, image: Option<&str>) -> Option<u64> {
        self.images.disk_bytes(image)
    }

    async fn prepare(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        let rootfs = self.images.rootfs(launch)?;
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
        // socket makes the vsock device (or a snapshot load) fail; a stale
        // jail makes the jailer fail.
        self.remove_leftovers(p, &launch.machine_id)?;
        self.agents.forget(&launch.machine_id);
        if launch.restore {
            Self::merge_layer(p)?;
            // The base of this VMM's next diff snapshot.
            let (mem, base) = (Self::mem_file(p), Self::base_file(p));
            std::fs::hard_link(&mem, &base).map_err(|e| {
                VmmError::host(
                    format!("linking {} as {}", mem.display(), base.display()),
                    e,
                )
            })?;
        }
        // The logger and metrics files must exist before Firecracker is
        // pointed at them (and before the jail, which links them in).
        for f in [Self::log_file(p), Self::metrics_file(p)] {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&f)
                .map_err(|e| VmmError::host(format!("creating {}", f.display()), e))?;
        }
        let cmd = match &self.jail {
            Some(jail) => self.jailed_command(jail, &binary, launch)?,
            None => {
                let mut cmd = Command::new(&binary);
                cmd.arg("--api-sock")
                    .arg(Self::api_socket(p))
                    .arg("--id")
                    .arg(&launch.machine_id);
                cmd
            }
        };
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
        let sock = Self::vsock_socket(&launch.paths);
        // Firecracker closes the connection at once while nothing listens
        // on the port, so each attempt is short.
        let poll = ReadyPoll {
            machine_id: &launch.machine_id,
            vmm,
            socket: &sock,
            timeout,
            deadline,
            attempt_max: Some(Duration::from_secs(2)),
            pause: Duration::from_millis(20),
        };
        self.agents
            .wait_ready(
                poll,
                || self.boot_detail(&launch.paths),
                |attempt| self.connect_agent(&launch.paths, attempt),
            )
            .await
    }

    async fn agent(&self, launch: &LaunchSpec) -> Result<AgentClient, VmmError> {
        self.cached_agent(launch).await
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
        // Ctrl-Alt-Del: with reboot=k the guest's reboot ends Firecracker.
        let cad = json!({"action_type": "SendCtrlAltDel"});
        let requests = vec![
            StopRequest::agent_poweroff(self, launch),
            StopRequest::new("Ctrl-Alt-Del", async {
                Self::send(&launch.paths, "PUT", "/actions", &cad)
                    .await
                    .is_ok()
            }),
        ];
        let path = graceful_stop(vmm, timeout, "Firecracker", requests).await?;
        self.agents.forget(&launch.machine_id);
        self.remove_leftovers(&launch.paths, &launch.machine_id)?;
        Ok(path)
    }

    /// A Firecracker snapshot is one API call: it cannot be cancelled
    /// half-way (the run resumes the VMM after it instead).
    async fn save_state(
        &self,
        launch: &LaunchSpec,
        _cancel: &CancellationToken,
    ) -> Result<Saved, VmmError> {
        self.save_snapshot(launch).await.map(|()| Saved::Complete)
    }

    async fn after_exit(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        self.agents.forget(&launch.machine_id);
        self.remove_leftovers(&launch.paths, &launch.machine_id)
    }

    fn remove_orphan(&self, id: &str) -> Result<(), VmmError> {
        // The jailer names a VMM's cgroups by its machine id.
        self.cgroups.remove(id)
    }

    async fn release(&self, paths: &MachinePaths) -> Result<(), VmmError> {
        if let Some(id) = paths.dir.file_name().and_then(|n| n.to_str()) {
            self.agents.forget(id);
            self.cgroups.remove(id)?;
        }
        // The jail lives in the machine directory and goes with it.
        super::remove_dir_idempotent(&paths.dir).await
    }
}

#[cfg(test)]
mod tests;

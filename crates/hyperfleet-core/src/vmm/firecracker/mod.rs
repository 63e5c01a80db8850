//! The Firecracker backend: one `firecracker` process per machine, driven
//! through its REST API on a unix socket (see [`api`]), run under the
//! jailer when that is on (see [`jailer`]).
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

pub mod api;
pub mod jailer;
pub mod kernel;
pub mod layer;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_trait::async_trait;
use hyperfleet_agent_proto::{hybrid_vsock_connect, AgentClient};
use hyperfleet_api::VmmKind;
use serde_json::{json, Value};

use super::agent_cache::{AgentCache, AgentChannel, ReadyPoll};
use super::host::{self, Accel};
use super::process::{self, Liveness};
use super::stop::{graceful_stop, StopRequest};
use super::{
    asset_err, remove_file_if_present, LaunchSpec, MachinePaths, StopPath, Vmm, VmmError,
    VmmRunState,
};
use crate::assets::AssetSet;
use crate::net::netns;
use crate::store::VmmIdentity;
use jailer::{Cgroups, JailerConfig, Share};

/// The vsock port the guest agent listens on (`hf.vsock_port=`).
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The guest's vsock context id (any value ≥ 3 works; each VM has its own
/// device, so every machine can use the same).
const GUEST_CID: u32 = 3;
/// The guest's one network interface.
const NET_IFACE: &str = "eth0";

pub struct FirecrackerConfig {
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

pub struct FirecrackerVmm {
    binary: Option<PathBuf>,
    /// `Firecracker v1.12.1`, from `--version`.
    version: Option<String>,
    accel: (Accel, String),
    assets_root: PathBuf,
    assets: PathBuf,
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

/// Makes the names in directory `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), VmmError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| VmmError::host(format!("syncing {}", dir.display()), e))
}

impl FirecrackerVmm {
    pub fn new(cfg: FirecrackerConfig) -> FirecrackerVmm {
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
            assets_root: cfg.assets_root,
            assets: cfg.assets,
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
    pub fn jailed(&self) -> bool {
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
    /// A diff snapshot's memory layer, not yet merged onto `mem_file`.
    pub fn layer_file(paths: &MachinePaths) -> PathBuf {
        paths.snapshot_dir().join("mem.diff")
    }
    /// A hard link to the memory file the running VMM was restored from (and
    /// maps): the base of its next diff snapshot.
    pub fn base_file(paths: &MachinePaths) -> PathBuf {
        paths.dir.join("mem.base")
    }

    fn set_for(&self, image: Option<&str>) -> Result<AssetSet, VmmError> {
        super::asset_set_for(VmmKind::Firecracker, &self.assets, &self.assets_root, image)
    }

    /// The kernel command line. `pci=off`: Firecracker has no PCI bus; its
    /// virtio-mmio devices are appended to this line by Firecracker itself.
    /// The network keys (`hf.ip=` …) come last, when the machine has one.
    pub fn boot_args(launch: &LaunchSpec, set: &AssetSet) -> String {
        let net = launch
            .network
            .as_ref()
            .map(|n| n.kernel_args())
            .unwrap_or_default();
        format!(
            "console=ttyS0 reboot=k panic=1 pci=off hf.root=/dev/vda hf.modules={} \
             hf.hostname={} hf.vsock_port={AGENT_VSOCK_PORT}{net}",
            set.module_list(),
            launch.name
        )
    }

    /// The kernel and initramfs a fresh boot uses.
    fn boot_files(&self, set: &AssetSet) -> Result<(PathBuf, PathBuf), VmmError> {
        let kernel = match &self.kernel {
            Some(k) if k.is_file() => k.clone(),
            Some(k) => {
                return Err(unavailable(format!(
                    "the kernel given with --firecracker-kernel ({}) does not exist",
                    k.display()
                )))
            }
            None => set.kernel().map_err(asset_err(VmmKind::Firecracker))?,
        };
        Ok((
            kernel,
            set.initramfs().map_err(asset_err(VmmKind::Firecracker))?,
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

    /// The launch as Firecracker sees it: jailed, its TAP is the one inside
    /// the machine's network namespace (`net::netns`), not the host's.
    fn as_vmm_sees_it(&self, launch: &LaunchSpec) -> LaunchSpec {
        let mut seen = launch.clone();
        if let (true, Some(net)) = (self.machine_netns(), seen.network.as_mut()) {
            net.tap = netns::INNER_TAP.to_string();
        }
        seen
    }

    /// Configures a fresh process in the documented order and starts the VM.
    async fn configure_and_start(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        let set = self.set_for(launch.spec.image.as_deref())?;
        let (kernel, initrd) = self.boot_files(&set)?;
        let boot_args = Self::boot_args(launch, &set);
        let seen = self.as_vmm_sees_it(launch);
        let requests = Self::start_requests(&seen, &kernel, &initrd, &boot_args)
            .into_iter()
            .chain(Self::logging_requests(&launch.paths))
            .chain([("/actions", json!({"action_type": "InstanceStart"}))]);
        for (path, body) in requests {
            Self::send(&launch.paths, "PUT", path, &body).await?;
        }
        Ok(())
    }

    /// What configures a fresh process, in the documented order, up to (not
    /// including) logging and `InstanceStart`.
    pub fn start_requests(
        launch: &LaunchSpec,
        kernel: &Path,
        initrd: &Path,
        boot_args: &str,
    ) -> Vec<(&'static str, Value)> {
        let p = &launch.paths;
        let s = |x: &Path| x.display().to_string();
        let mut v = vec![
            (
                "/machine-config",
                json!({
                    "vcpu_count": launch.spec.vcpu_count,
                    "mem_size_mib": launch.spec.mem_size_mib,
                    // For diff snapshots; its cost is one write fault per
                    // page until the next snapshot.
                    "track_dirty_pages": true,
                }),
            ),
            (
                "/boot-source",
                json!({
                    "kernel_image_path": s(kernel),
                    "initrd_path": s(initrd),
                    "boot_args": boot_args,
                }),
            ),
            (
                "/drives/root",
                json!({
                    "drive_id": "root",
                    "path_on_host": s(&Self::disk(p)),
                    // The initramfs (the agent as PID 1) switches to /dev/vda.
                    "is_root_device": false,
                    "is_read_only": false,
                }),
            ),
        ];
        if let Some(net) = &launch.network {
            v.push((
                "/network-interfaces/eth0",
                json!({
                    "iface_id": NET_IFACE,
                    "host_dev_name": net.tap,
                    "guest_mac": net.mac,
                }),
            ));
        }
        v.push((
            "/vsock",
            json!({
                "guest_cid": GUEST_CID,
                "uds_path": s(&Self::vsock_socket(p)),
            }),
        ));
        v
    }

    /// Logger and metrics to the per-machine files (which `spawn` creates).
    pub fn logging_requests(paths: &MachinePaths) -> [(&'static str, Value); 2] {
        [
            (
                "/logger",
                json!({
                    "log_path": Self::log_file(paths).display().to_string(),
                    "level": "Info",
                    "show_level": true,
                }),
            ),
            (
                "/metrics",
                json!({"metrics_path": Self::metrics_file(paths).display().to_string()}),
            ),
        ]
    }

    /// `PUT /snapshot/load`: the suspend image, resumed at once, with dirty
    /// pages tracked (not saved in snapshots; needed for the next diff) and
    /// the machine's current TAP in place of the one it was saved with (a
    /// TAP is the machine's, but its name comes from the lease of the moment).
    /// There is no vsock override: Firecracker v1.12 has none (it rejects
    /// `vsock_override`), and none is needed — the socket's path is the
    /// machine directory's, the same jailed or not.
    pub fn snapshot_load_body(launch: &LaunchSpec) -> Value {
        let p = &launch.paths;
        let mut body = json!({
            "snapshot_path": Self::state_file(p).display().to_string(),
            "mem_backend": {
                "backend_type": "File",
                "backend_path": Self::mem_file(p).display().to_string(),
            },
            // v1.12's name for `track_dirty_pages` here (it rejects that).
            "enable_diff_snapshots": true,
            "resume_vm": true,
        });
        if let Some(net) = &launch.network {
            body["network_overrides"] = json!([{
                "iface_id": NET_IFACE,
                "host_dev_name": net.tap,
            }]);
        }
        body
    }

    /// `PUT /snapshot/create` into the snapshot directory: a full snapshot
    /// into `mem`, or a diff into the layer `mem.diff`.
    pub fn snapshot_create_body(paths: &MachinePaths, diff: bool) -> Value {
        let (kind, mem) = if diff {
            ("Diff", Self::layer_file(paths))
        } else {
            ("Full", Self::mem_file(paths))
        };
        json!({
            "snapshot_type": kind,
            "snapshot_path": Self::state_file(paths).display().to_string(),
            "mem_file_path": mem.display().to_string(),
        })
    }

    /// Whether the next snapshot can be a diff: the VMM was restored from
    /// `mem.base` and maps it, and the snapshot directory keeps holes.
    fn diff_possible(paths: &MachinePaths) -> bool {
        let base = Self::base_file(paths);
        if !base.exists() {
            return false;
        }
        let vmms = process::find_by_marker(&paths.dir.display().to_string());
        let mapped = match vmms.as_slice() {
            [one] => layer::mapped_by(one.pid, &base),
            _ => Ok(false),
        };
        let holes = layer::holes_supported(&paths.snapshot_dir());
        match (mapped, holes) {
            (Ok(true), Ok(true)) => true,
            (mapped, holes) => {
                tracing::info!(
                    dir = %paths.dir.display(),
                    ?mapped,
                    ?holes,
                    "taking a full snapshot: no base for a diff"
                );
                false
            }
        }
    }

    /// Merges a pending diff layer onto the base memory file (in place: no
    /// VMM of the machine runs, so nothing maps the base), then removes the
    /// layer. Idempotent, and safe to repeat after a crash at any point.
    fn merge_layer(paths: &MachinePaths) -> Result<(), VmmError> {
        let (base, diff) = (Self::mem_file(paths), Self::layer_file(paths));
        if !diff.exists() {
            return Ok(());
        }
        if let Some(v) = process::find_by_marker(&paths.dir.display().to_string()).first() {
            return Err(VmmError::host(
                format!("merging {} onto {}", diff.display(), base.display()),
                std::io::Error::other(format!(
                    "a VMM of the machine (pid {}) still runs and may map the base",
                    v.pid
                )),
            ));
        }
        let t0 = std::time::Instant::now();
        let merged = layer::merge(&base, &diff).map_err(|e| {
            VmmError::host(
                format!("merging the diff snapshot onto {}", base.display()),
                e,
            )
        })?;
        remove_file_if_present(&diff)?;
        sync_dir(&paths.snapshot_dir())?;
        tracing::info!(
            dir = %paths.dir.display(),
            regions = merged.regions,
            bytes = merged.bytes,
            elapsed = ?t0.elapsed(),
            "merged a diff snapshot onto its base"
        );
        Ok(())
    }

    async fn configure_logging(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        for (path, body) in Self::logging_requests(&launch.paths) {
            Self::send(&launch.paths, "PUT", path, &body).await?;
        }
        Ok(())
    }

    /// Loads the suspend image into a fresh process and resumes it.
    async fn load_snapshot(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        self.configure_logging(launch).await?;
        let body = Self::snapshot_load_body(&self.as_vmm_sees_it(launch));
        Self::send(&launch.paths, "PUT", "/snapshot/load", &body).await
    }

    /// One request with a body that must succeed; its answer is not needed.
    async fn send(
        paths: &MachinePaths,
        method: &str,
        path: &str,
        body: &Value,
    ) -> Result<(), VmmError> {
        api::expect_ok(&Self::api_socket(paths), method, path, Some(body))
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

    /// Removes the sockets of a process that is gone.
    fn remove_sockets(paths: &MachinePaths) -> Result<(), VmmError> {
        remove_file_if_present(&Self::api_socket(paths))?;
        remove_file_if_present(&Self::vsock_socket(paths))
    }

    /// Removes what a VMM that is gone leaves on the host: its sockets, its
    /// link to the memory file it was restored from, and its jail and
    /// cgroups if it ran jailed (whether or not the jailer is on now).
    fn remove_leftovers(&self, paths: &MachinePaths, id: &str) -> Result<(), VmmError> {
        Self::remove_sockets(paths)?;
        remove_file_if_present(&Self::base_file(paths))?;
        jailer::remove_jail(paths)?;
        self.cgroups.remove(id)
    }

    /// Builds the chroot for the next jailed VMM of `launch` and points the
    /// daemon's socket paths into it; returns the jailer command.
    fn jailed_command(
        &self,
        jail: &Jail,
        firecracker: &Path,
        launch: &LaunchSpec,
    ) -> Result<Command, VmmError> {
        let p = &launch.paths;
        let id = &launch.machine_id;
        let jailer_bin = jail.binary.clone().ok_or_else(|| {
            unavailable(format!(
                "the jailer is on but {} was not found in PATH or /usr/local/bin",
                jail.cfg.binary.display()
            ))
        })?;
        // The run leases the uid before spawning (`LaunchSpec::uid`).
        let uid = launch.uid.ok_or_else(|| {
            unavailable(format!(
                "machine {id} has no uid of its own to run its jailed VMM as"
            ))
        })?;
        let root = jailer::chroot(p, firecracker, id);
        let mut files = vec![
            (Self::disk(p), Share::Own),
            (Self::log_file(p), Share::Own),
            (Self::metrics_file(p), Share::Own),
        ];
        if launch.restore {
            files.push((Self::state_file(p), Share::Own));
            files.push((Self::mem_file(p), Share::Own));
        } else {
            let set = self.set_for(launch.spec.image.as_deref())?;
            let (kernel, initrd) = self.boot_files(&set)?;
            files.push((kernel, Share::ReadOnly));
            files.push((initrd, Share::ReadOnly));
        }
        jailer::build(uid, p, &root, &[&p.dir, &p.snapshot_dir()], &files)?;
        for sock in [Self::api_socket(p), Self::vsock_socket(p)] {
            let target = jailer::inside(&root, &sock);
            // Relative, so the link stays right if the data directory moves.
            let target = target.strip_prefix(&p.dir).unwrap_or(&target);
            std::os::unix::fs::symlink(target, &sock).map_err(|e| {
                VmmError::host(format!("linking {} into the jail", sock.display()), e)
            })?;
        }
        // With a network, the machine's own namespace (made by the run with
        // the TAP inside); without, the configured one, if any.
        let netns = match &launch.network {
            Some(net) => Some(netns::path_for(&net.tap)),
            None => jail.cfg.netns.clone(),
        };
        let mut cmd = Command::new(jailer_bin);
        cmd.args(jailer::argv(
            uid,
            netns.as_deref(),
            &self.cgroups,
            firecracker,
            p,
            id,
            &launch.spec,
            &Self::api_socket(p),
        ));
        Ok(cmd)
    }

    async fn vm_state(&self, launch: &LaunchSpec) -> Result<String, VmmError> {
        let v = api::expect_ok(&Self::api_socket(&launch.paths), "GET", "/", None).await?;
        Ok(v["state"].as_str().unwrap_or_default().to_string())
    }

    async fn patch_vm(&self, launch: &LaunchSpec, state: &str) -> Result<(), VmmError> {
        Self::send(&launch.paths, "PATCH", "/vm", &json!({ "state": state })).await
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
        let set = AssetSet::load(&self.assets).map_err(|e| e.to_string())?;
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
        AssetSet::load(&self.assets)
            .map(|s| Some(s.id))
            .map_err(|e| e.to_string())
    }

    async fn prepare(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        let set = self.set_for(launch.spec.image.as_deref())?;
        let rootfs = set.rootfs().map_err(asset_err(VmmKind::Firecracker))?;
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

    async fn save_state(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        let p = &launch.paths;
        let dir = p.snapshot_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| VmmError::host(format!("creating {}", dir.display()), e))?;
        if self.vm_state(launch).await? != "Paused" {
            self.patch_vm(launch, "Paused").await?;
        }
        // Jailed, Firecracker writes into the chroot's mirror of the
        // snapshot directory; the files are linked out afterwards.
        let chroot = jailer::existing_chroot(p, &launch.machine_id);
        let unlink = |f: &Path| -> Result<(), VmmError> {
            remove_file_if_present(f)?;
            match &chroot {
                Some(root) => remove_file_if_present(&jailer::inside(root, f)),
                None => Ok(()),
            }
        };
        // Unlinked, not truncated: the running VMM may map the old memory
        // file. Whatever an earlier attempt left goes first, so the files
        // below are all this attempt's.
        let (state, mem, diff) = (Self::state_file(p), Self::mem_file(p), Self::layer_file(p));
        for f in [&state, &mem, &diff] {
            unlink(f)?;
        }
        // The base moves into the image before the diff is asked for: should
        // this attempt die half-way, the next one finds no base and takes a
        // full snapshot (a diff then would miss the pages this one wrote).
        let mut layered = false;
        if Self::diff_possible(p) {
            let base = Self::base_file(p);
            std::fs::rename(&base, &mem).map_err(|e| {
                VmmError::host(format!("moving {} into the image", base.display()), e)
            })?;
            sync_dir(&dir)?;
            let body = Self::snapshot_create_body(p, true);
            match Self::send(p, "PUT", "/snapshot/create", &body).await {
                Ok(()) => layered = true,
                Err(e) => {
                    tracing::warn!(dir = %p.dir.display(), error = %e, "the diff snapshot failed; taking a full one");
                    for f in [&state, &mem, &diff] {
                        unlink(f)?;
                    }
                }
            }
        }
        if !layered {
            let body = Self::snapshot_create_body(p, false);
            Self::send(p, "PUT", "/snapshot/create", &body).await?;
        }
        let written = [state, if layered { diff } else { mem }];
        if let Some(root) = &chroot {
            for f in &written {
                jailer::export(root, f)?;
            }
        }
        // The files, and their names, must be on disk before the VMM is
        // killed.
        sync_dir(&dir)?;
        for f in written {
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

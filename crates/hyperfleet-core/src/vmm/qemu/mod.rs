//! The QEMU backend: `qemu-system-x86_64 -machine microvm`, KVM where the
//! host has usable hardware virtualisation and TCG (software) otherwise.
//!
//! Per machine, under its directory: `disk.qcow2` (a copy-on-write overlay
//! over the read-only rootfs of the machine's asset set), `vmm.sock` (QMP),
//! `agent.sock` (virtio-serial channel to the guest agent), `console.log`
//! (the serial console, appended; rotated by the daemon), `vmm.log` (QEMU's
//! own messages) and `snapshot/` (a memory image, `vmm::image`) while
//! suspended. Guest RAM is a file too: the machine's own, under the memory
//! directory (`--memory-dir`, tmpfs), mapped shared, so that saving the
//! machine (suspend, snapshot, fork) writes only the device state and
//! copies the file's data extents; a machine made from a snapshot maps the
//! snapshot's RAM copy-on-write instead. The process runs
//! detached and outlives the daemon; a restarted daemon reconnects to QMP and
//! to the agent channel (the agent protocol resynchronises).
//!
//! QEMU runs sandboxed (seccomp) and, when the daemon is root, as an
//! unprivileged uid of its machine's own; it opens none of those files by
//! name but is handed them as descriptors (`handoff`).
//!
//! The boot recipe (microvm + qboot + PVH vmlinux + initramfs that switches
//! to the disk, the trimmed kernel command line, `tsc_early_khz`/`lpj` to
//! skip calibration) is the one measured in shared/guest-notes.md.

mod handoff;
pub mod qmp;

pub use handoff::SANDBOX;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hyperfleet_agent_proto::AgentClient;
use hyperfleet_api::VmmKind;
use serde_json::json;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use super::agent_cache::{AgentCache, AgentChannel, ReadyPoll};
use super::host::{self, Accel, AccelChoice};
use super::image::{self, ImageDir, MemoryImage};
use super::process::{self, Liveness};
use super::stop::{graceful_stop, StopRequest};
use super::uid::UidRange;
use super::{
    asset_err, remove_file_if_present, GuestImages, LaunchSpec, MachinePaths, Saved, SnapshotTaken,
    StopPath, Vmm, VmmError, VmmRunState,
};
use crate::assets::AssetSet;
use crate::store::VmmIdentity;

pub(crate) struct QemuConfig {
    /// `qemu-system-x86_64`, resolved through PATH when relative.
    pub binary: PathBuf,
    pub accel: AccelChoice,
    /// `<data_dir>/assets`: where asset sets live by id.
    pub assets_root: PathBuf,
    /// The set new machines get (default `<assets_root>/current`).
    pub assets: PathBuf,
    /// Each machine's QEMU runs as a uid (= gid) of its machine's own from
    /// this range (`--qemu-run-as`); None: as the daemon's user.
    pub run_as: Option<UidRange>,
    /// Where machines' own guest RAM files live (`--memory-dir`).
    pub memory_dir: PathBuf,
}

pub struct QemuVmm {
    binary: Option<PathBuf>,
    firmware: Option<PathBuf>,
    /// `kvm` or `tcg`, and why.
    accel: (&'static str, String),
    images: GuestImages,
    tsc_khz: Option<u64>,
    agents: AgentCache,
    run_as: Option<UidRange>,
    memory_dir: PathBuf,
}

const QBOOT: &[&str] = &["/usr/share/qemu/qboot.rom", "/usr/share/seabios/qboot.rom"];
const NO_QBOOT: &str = "qboot.rom not found (install Debian's qemu-system-data)";

impl QemuVmm {
    pub(crate) fn new(cfg: QemuConfig) -> QemuVmm {
        let (host, why) = host::detect_accel();
        let accel = match (cfg.accel, host) {
            (AccelChoice::Kvm, _) => ("kvm", "forced by --qemu-accel kvm".to_string()),
            (AccelChoice::Tcg, _) => ("tcg", "forced by --qemu-accel tcg".to_string()),
            (AccelChoice::Auto, Accel::HardwareKvm) => ("kvm", why),
            (AccelChoice::Auto, _) => ("tcg", why),
        };
        QemuVmm {
            binary: host::which(&cfg.binary, &[]),
            firmware: QBOOT.iter().map(PathBuf::from).find(|p| p.exists()),
            accel,
            images: GuestImages::new(VmmKind::Qemu, cfg.assets_root, cfg.assets),
            tsc_khz: host::tsc_khz(),
            agents: AgentCache::default(),
            run_as: cfg.run_as,
            memory_dir: cfg.memory_dir,
        }
    }

    /// Machine `id`'s own guest RAM file.
    fn ram_file(&self, id: &str) -> PathBuf {
        self.memory_dir.join(format!("{id}.ram"))
    }

    pub fn accel(&self) -> &'static str {
        self.accel.0
    }

    fn agent_socket(paths: &MachinePaths) -> PathBuf {
        paths.dir.join("agent.sock")
    }
    fn disk(paths: &MachinePaths) -> PathBuf {
        paths.dir.join("disk.qcow2")
    }

    /// The kernel command line: the measured fast-boot set, then Hyperfleet's.
    fn cmdline(&self, launch: &LaunchSpec, set: &AssetSet) -> String {
        let mut c = String::from(
            "console=ttyS0 quiet reboot=t panic=-1 8250.nr_uarts=1 i8042.noaux i8042.nomux \
             i8042.nopnp i8042.dumbkbd tsc=reliable no_timer_check init_on_alloc=0 \
             cryptomgr.notests random.trust_cpu=on mitigations=off",
        );
        if let Some(khz) = self.tsc_khz {
            c.push_str(&format!(" tsc_early_khz={khz} lpj={}", khz * 4));
        }
        c.push_str(&format!(
            " hf.root=/dev/vda hf.modules={} hf.hostname={}",
            set.module_list(),
            launch.name
        ));
        if let Some(n) = &launch.network {
            c.push_str(&n.kernel_args());
        }
        c
    }

    fn argv(
        &self,
        launch: &LaunchSpec,
        set: &AssetSet,
        given: &handoff::Given,
    ) -> Result<Vec<String>, VmmError> {
        let p = &launch.paths;
        let firmware = self
            .firmware
            .as_ref()
            .ok_or_else(|| VmmError::unavailable(VmmKind::Qemu, NO_QBOOT))?;
        let g = given.args(
            &Self::disk(p),
            &p.console_log(),
            self.accel.0,
            launch.spec.mem_size_mib,
        );
        let mut a: Vec<String> = Vec::new();
        for fd in g.add_fds {
            a.extend(["-add-fd".into(), fd]);
        }
        a.extend([
            "-name".into(),
            format!("hf-{},debug-threads=on", launch.machine_id),
            "-sandbox".into(),
            SANDBOX.into(),
            "-machine".into(),
            match g.memory {
                Some(_) => "microvm,acpi=on,memory-backend=mem".into(),
                None => "microvm,acpi=on".into(),
            },
            "-bios".into(),
            firmware.display().to_string(),
            "-accel".into(),
            g.accel,
        ]);
        if self.accel.0 == "kvm" {
            a.extend(["-cpu".into(), "host".into()]);
        }
        a.extend([
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-m".into(),
            format!("{}M", launch.spec.mem_size_mib),
            "-smp".into(),
            launch.spec.vcpu_count.to_string(),
            "-kernel".into(),
            g.kernel,
            "-initrd".into(),
            g.initrd,
            "-append".into(),
            self.cmdline(launch, set),
            "-chardev".into(),
            g.console,
            "-serial".into(),
            "chardev:con".into(),
            "-chardev".into(),
            g.agent,
            "-device".into(),
            "virtio-serial-device".into(),
            "-device".into(),
            "virtserialport,chardev=agent,name=hf.agent".into(),
            "-chardev".into(),
            g.qmp,
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
            "-drive".into(),
            g.drive,
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
        ]);
        if let (Some(n), Some(netdev)) = (&launch.network, g.netdev) {
            // The TAP exists (the machine run made it); QEMU gets it attached.
            a.extend([
                "-netdev".into(),
                netdev,
                "-device".into(),
                format!("virtio-net-device,netdev=net0,mac={}", n.mac),
            ]);
        }
        if let Some(memory) = g.memory {
            a.extend(["-object".into(), memory]);
        }
        if let Some(incoming) = g.incoming {
            a.extend(["-incoming".into(), incoming]);
        }
        Ok(a)
    }

    /// The last lines of the console, to say why a guest did not come up.
    fn console_tail(paths: &MachinePaths) -> String {
        let text = std::fs::read(paths.console_log()).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        // A kernel panic's own line says more than the end of its trace.
        let panic = lines
            .iter()
            .rev()
            .find(|l| l.contains("Kernel panic") || l.contains("not syncing"));
        match (panic, tail.is_empty()) {
            (_, true) => "the console is empty".into(),
            (Some(p), false) => {
                format!("the guest kernel panicked: {p} (last console lines: {tail})")
            }
            (None, false) => format!("last console lines: {tail}"),
        }
    }

    /// Writes the paused VM's state into fd set `set` and waits until it
    /// is all there.
    async fn migrate(
        q: &mut qmp::Qmp,
        set: u64,
        cancel: Option<&CancellationToken>,
    ) -> Result<Saved, VmmError> {
        q.execute(
            "migrate",
            Some(json!({"uri": format!("file:/dev/fdset/{set}")})),
        )
        .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let mut cancelling = false;
        loop {
            if !cancelling && cancel.is_some_and(CancellationToken::is_cancelled) {
                // Answered at once; the migration thread stops soon after
                // and the status below says `cancelled` (or `completed`,
                // when it finished first).
                q.execute("migrate_cancel", None).await?;
                cancelling = true;
            }
            let st = q.execute("query-migrate", None).await?;
            match st["status"].as_str().unwrap_or("") {
                "completed" => return Ok(Saved::Complete),
                "cancelled" if cancelling => return Ok(Saved::Cancelled),
                "failed" | "cancelled" => {
                    return Err(VmmError::Control {
                        doing: "saving memory".into(),
                        detail: st["error-desc"]
                            .as_str()
                            .unwrap_or("migration failed")
                            .into(),
                    })
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VmmError::Control {
                    doing: "saving memory".into(),
                    detail: "the save did not finish within 120 s".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Starts loading the memory image a VMM spawned with `-incoming defer`
    /// was given, with the capabilities it was saved with. Idempotent: a
    /// load already under way or done (a daemon that restarted mid-restore)
    /// is left alone.
    async fn start_incoming(
        sock: &std::path::Path,
        vmm: &VmmIdentity,
        flat: bool,
    ) -> Result<(), VmmError> {
        let mut q = loop {
            match qmp::Qmp::connect(sock).await {
                Ok(q) => break q,
                Err(e) if process::probe(vmm) == Liveness::Gone => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        };
        let st = q.execute("query-migrate", None).await?;
        if st.get("status").is_some_and(|s| s != "none") {
            return Ok(());
        }
        let status = q.execute("query-status", None).await?;
        if status["status"] != "inmigrate" {
            return Ok(());
        }
        set_capabilities(&mut q, flat).await?;
        q.execute(
            "migrate-incoming",
            Some(json!({"uri": handoff::incoming_uri()})),
        )
        .await?;
        Ok(())
    }

    /// What kind of image saving this VMM makes: flat when its RAM is a
    /// file of its own, a stream when its RAM is private, legacy for a VMM
    /// an earlier release spawned (default RAM block).
    async fn memory_kind(q: &mut qmp::Qmp) -> MemoryImage {
        let share = q
            .execute(
                "qom-get",
                Some(json!({"path": "/objects/mem", "property": "share"})),
            )
            .await;
        match share {
            Ok(serde_json::Value::Bool(true)) => MemoryImage::Flat,
            Ok(_) => MemoryImage::Stream,
            Err(_) => MemoryImage::Legacy,
        }
    }

    /// Saves the stopped VM into image directory `img` as an image of
    /// `kind` ([`Self::memory_kind`]): the device state, and for a flat
    /// image a copy of the RAM file's data (otherwise RAM is in the state
    /// stream).
    async fn save_image(
        &self,
        q: &mut qmp::Qmp,
        launch: &LaunchSpec,
        img: &ImageDir,
        kind: MemoryImage,
        cancel: Option<&CancellationToken>,
    ) -> Result<Saved, VmmError> {
        tokio::fs::create_dir_all(&img.0)
            .await
            .map_err(|e| VmmError::host(format!("creating {}", img.0.display()), e))?;
        // QEMU cannot open the path (it runs as the machine's uid, outside
        // the data directory): it writes through a descriptor we pass it.
        let file = handoff::create_state_file(&img.state_for(kind))?;
        let set = q.add_fd(&file, "memory image").await?;
        let saved = Self::migrate(q, set, cancel).await;
        // A failed save leaves the VM running on; the next one must not
        // find this descriptor in a set.
        let removed = q.execute("remove-fd", Some(json!({"fdset-id": set}))).await;
        if saved? == Saved::Cancelled {
            return Ok(Saved::Cancelled);
        }
        removed?;
        if kind == MemoryImage::Flat {
            let ram = self.ram_file(&launch.machine_id);
            let dst = img.ram();
            // The copy is most of a save's time: a wake stops it between
            // chunks.
            let stop = Arc::new(AtomicBool::new(false));
            let copy = tokio::task::spawn_blocking({
                let stop = Arc::clone(&stop);
                move || image::copy_sparse_until(&ram, &dst, 0o444, &stop)
            });
            let watcher = cancel.cloned().map(|c| {
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    c.cancelled().await;
                    stop.store(true, Ordering::Relaxed);
                })
            });
            let copied = copy.await;
            if let Some(w) = watcher {
                w.abort();
            }
            let copied = copied
                .map_err(|e| VmmError::host("copying guest RAM", std::io::Error::other(e)))??;
            if copied.is_none() {
                return Ok(Saved::Cancelled);
            }
        }
        Ok(Saved::Complete)
    }

    /// Waits for an incoming migration (restore) to finish, then continues
    /// the vCPUs. Idempotent: a running VM is left alone.
    async fn finish_restore(
        &self,
        launch: &LaunchSpec,
        vmm: &VmmIdentity,
        deadline: tokio::time::Instant,
    ) -> Result<(), VmmError> {
        let sock = launch.paths.control_socket();
        if let Some(kind @ (MemoryImage::Flat | MemoryImage::Stream)) =
            launch.restore_image().map(|(_, kind, _)| kind)
        {
            Self::start_incoming(&sock, vmm, kind == MemoryImage::Flat).await?;
        }
        loop {
            if process::probe(vmm) == Liveness::Gone {
                return Err(VmmError::Exited {
                    doing: format!("restoring memory; {}", Self::console_tail(&launch.paths)),
                });
            }
            let status = match qmp::command(&sock, "query-status", None).await {
                Ok(v) => v["status"].as_str().unwrap_or("").to_string(),
                Err(_) => String::new(),
            };
            match status.as_str() {
                "running" => return Ok(()),
                "paused" | "postmigrate" | "prelaunch" => {
                    qmp::command(&sock, "cont", None).await?;
                    return Ok(());
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VmmError::BootTimeout {
                    timeout: Duration::ZERO,
                    detail: format!(
                        "the memory image never finished loading (QMP status '{status}')"
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The migration settings every save and restore uses: RAM that is a file
/// of its own is not streamed (`x-ignore-shared`; a restore must set it
/// too, as the stream says which blocks it skipped), and no bandwidth cap
/// (the default one makes a save take ~7x longer). `ignore_shared` only
/// for flat images: a stream image (RAM private, or a VMM of an earlier
/// release) carries all RAM and no block addresses, so that it can be
/// loaded into a file the restored VMM maps shared, or as it was saved.
async fn set_capabilities(q: &mut qmp::Qmp, ignore_shared: bool) -> Result<(), VmmError> {
    q.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": ignore_shared}]})),
    )
    .await?;
    q.execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": 64u64 << 30})),
    )
    .await?;
    Ok(())
}

#[async_trait]
impl AgentChannel for QemuVmm {
    fn agents(&self) -> &AgentCache {
        &self.agents
    }

    async fn open_channel(
        &self,
        paths: &MachinePaths,
        _timeout: Duration,
    ) -> Result<UnixStream, VmmError> {
        let sock = Self::agent_socket(paths);
        UnixStream::connect(&sock)
            .await
            .map_err(|e| VmmError::Control {
                doing: "connecting to the guest agent channel".into(),
                detail: format!("{}: {e}", sock.display()),
            })
    }
}

#[async_trait]
impl Vmm for QemuVmm {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn availability(&self) -> Result<String, String> {
        let bin = self
            .binary
            .as_ref()
            .ok_or("qemu-system-x86_64 not found in PATH (install qemu-system-x86 10.x)")?;
        if self.firmware.is_none() {
            return Err(NO_QBOOT.into());
        }
        let set = self.images.current()?;
        let user = match self.run_as {
            Some(r) => format!("each as a uid of its machine's own from {r}"),
            None => "as the daemon's user".into(),
        };
        Ok(format!(
            "{} with {} ({}), seccomp-sandboxed, {user}; guest image {} (kernel {})",
            bin.display(),
            self.accel.0.to_uppercase(),
            self.accel.1,
            set.id,
            set.manifest.kernel_release
        ))
    }

    fn current_image(&self) -> Result<Option<String>, String> {
        self.images.current_id()
    }

    /// Each machine's QEMU runs as a uid of its own when so configured.
    fn jail_uids(&self) -> Option<UidRange> {
        self.run_as
    }

    fn disk_bytes(&self, image: Option<&str>) -> Option<u64> {
        self.images.disk_bytes(image)
    }

    async fn prepare(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        let rootfs = self.images.rootfs(launch)?;
        // A copy-on-write overlay: the set's rootfs (or the snapshot's
        // frozen disk) stays read-only.
        let (format, backing) = match launch.base.as_ref().and_then(|b| b.layers.first()) {
            Some(top) => ("qcow2", top.clone()),
            None => ("raw", rootfs),
        };
        let mut cmd = tokio::process::Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
            .arg(&backing);
        super::make_disk_once(
            &Self::disk(&launch.paths),
            cmd,
            "creating the disk overlay with qemu-img (from qemu-utils)",
        )
        .await
    }

    async fn spawn(&self, launch: &LaunchSpec) -> Result<VmmIdentity, VmmError> {
        let binary = self.binary.clone().ok_or_else(|| {
            VmmError::unavailable(VmmKind::Qemu, "qemu-system-x86_64 not found in PATH")
        })?;
        let set = self.images.for_image(launch.spec.image.as_deref())?;
        let asset = asset_err(VmmKind::Qemu);
        if launch.restore && launch.restore_image().is_none() {
            return Err(VmmError::host(
                "restoring memory",
                std::io::Error::new(std::io::ErrorKind::NotFound, "the memory image is missing"),
            ));
        }
        let (kernel, initrd, rootfs) = (
            set.kernel().map_err(&asset)?,
            set.initramfs().map_err(&asset)?,
            self.images.rootfs(launch)?,
        );
        self.agents.forget(&launch.machine_id);
        let given = self.open_handoff(launch, &kernel, &initrd, &rootfs)?;
        let argv = self.argv(launch, &set, &given.given)?;
        let mut cmd = Command::new(&binary);
        cmd.args(&argv);
        handoff::confine(&mut cmd, given.raw(), launch.uid);
        // `given` stays open until QEMU has inherited it.
        let spawned = super::spawn_vmm(cmd, &launch.paths.dir.join("vmm.log"));
        drop(given);
        spawned
    }

    async fn wait_ready(
        &self,
        launch: &LaunchSpec,
        vmm: &VmmIdentity,
        timeout: Duration,
    ) -> Result<(), VmmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let sock = Self::agent_socket(&launch.paths);
        if launch.restore {
            self.finish_restore(launch, vmm, deadline).await?;
        }
        // QEMU holds our hello until the agent opens its port, so one
        // handshake with the remaining time covers the whole boot; it is
        // retried when QEMU died or the channel broke meanwhile.
        let poll = ReadyPoll {
            machine_id: &launch.machine_id,
            vmm,
            socket: &sock,
            timeout,
            deadline,
            attempt_max: None,
            pause: Duration::from_millis(5),
        };
        self.agents
            .wait_ready(
                poll,
                || Self::console_tail(&launch.paths),
                |attempt| self.connect_agent(&launch.paths, attempt),
            )
            .await
    }

    async fn agent(&self, launch: &LaunchSpec) -> Result<AgentClient, VmmError> {
        self.cached_agent(launch).await
    }

    async fn run_state(&self, launch: &LaunchSpec) -> Result<VmmRunState, VmmError> {
        let v = qmp::command(&launch.paths.control_socket(), "query-status", None).await?;
        Ok(if v["running"].as_bool().unwrap_or(false) {
            VmmRunState::Running
        } else {
            VmmRunState::Paused
        })
    }

    async fn pause(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        qmp::command(&launch.paths.control_socket(), "stop", None)
            .await
            .map(drop)
    }

    async fn resume(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        qmp::command(&launch.paths.control_socket(), "cont", None)
            .await
            .map(drop)
    }

    async fn shutdown(
        &self,
        launch: &LaunchSpec,
        vmm: &VmmIdentity,
        timeout: Duration,
    ) -> Result<StopPath, VmmError> {
        let sock = launch.paths.control_socket();
        let requests = vec![
            StopRequest::agent_poweroff(self, launch),
            // The agent also acts on the ACPI power button.
            StopRequest::new("ACPI power button", async move {
                qmp::command(&sock, "system_powerdown", None).await.is_ok()
            }),
        ];
        let path = graceful_stop(vmm, timeout, "QEMU", requests).await?;
        self.agents.forget(&launch.machine_id);
        Ok(path)
    }

    async fn save_state(
        &self,
        launch: &LaunchSpec,
        cancel: &CancellationToken,
    ) -> Result<Saved, VmmError> {
        let img = launch.paths.suspend_image();
        // A save that died half-way left a partial image: it is not one.
        let partial = || -> Result<(), VmmError> {
            for f in [img.state(), img.ram(), img.legacy_state()] {
                remove_file_if_present(&f)?;
            }
            Ok(())
        };
        partial()?;
        let mut q = qmp::Qmp::connect(&launch.paths.control_socket()).await?;
        let kind = Self::memory_kind(&mut q).await;
        set_capabilities(&mut q, kind == MemoryImage::Flat).await?;
        q.execute("stop", None).await?;
        if self
            .save_image(&mut q, launch, &img, kind, Some(cancel))
            .await?
            == Saved::Cancelled
        {
            // The same VM goes on: nothing of the save is kept.
            partial()?;
            q.execute("cont", None).await?;
            return Ok(Saved::Cancelled);
        }
        // The image must be on disk before the VMM is killed.
        let dir = img.0.clone();
        tokio::task::spawn_blocking(move || image::sync_dir(&dir, None))
            .await
            .map_err(|e| VmmError::host("syncing the memory image", std::io::Error::other(e)))??;
        self.agents.forget(&launch.machine_id);
        Ok(Saved::Complete)
    }

    fn supports_snapshots(&self) -> bool {
        true
    }

    async fn snapshot(
        &self,
        launch: &LaunchSpec,
        dest: &std::path::Path,
        live: bool,
        durable_memory: bool,
    ) -> Result<SnapshotTaken, VmmError> {
        let img = ImageDir(dest.to_path_buf());
        let disk = Self::disk(&launch.paths);
        let copy_disk = {
            let (disk, dst) = (disk.clone(), img.disk());
            move || image::copy_sparse(&disk, &dst, 0o444).map(drop)
        };
        let blocking = |e: tokio::task::JoinError| {
            VmmError::host("copying a snapshot's files", std::io::Error::other(e))
        };
        let taken = if live {
            let mut q = qmp::Qmp::connect(&launch.paths.control_socket()).await?;
            let kind = Self::memory_kind(&mut q).await;
            set_capabilities(&mut q, kind == MemoryImage::Flat).await?;
            let running = q.execute("query-status", None).await?["running"] == json!(true);
            let t0 = std::time::Instant::now();
            q.execute("stop", None).await?;
            // Stopping flushed the disk: the overlay is consistent with the
            // memory saved beside it.
            let saved = self.save_image(&mut q, launch, &img, kind, None).await;
            let copied = match saved {
                Ok(_) => tokio::task::spawn_blocking(copy_disk)
                    .await
                    .map_err(blocking)
                    .and_then(|r| r),
                Err(e) => Err(e),
            };
            if running {
                q.execute("cont", None).await?;
            }
            copied?;
            SnapshotTaken {
                memory: true,
                pause: running.then(|| t0.elapsed()),
                flattened: false,
            }
        } else {
            let own = launch.paths.suspend_image();
            let memory = match own.memory() {
                Some(MemoryImage::Legacy) => {
                    image::link_or_copy(&own.legacy_state(), &img.legacy_state())?;
                    true
                }
                Some(MemoryImage::Flat) => {
                    image::link_or_copy(&own.state(), &img.state())?;
                    image::link_or_copy(&own.ram(), &img.ram())?;
                    true
                }
                Some(MemoryImage::Stream) => {
                    image::link_or_copy(&own.state(), &img.state())?;
                    true
                }
                None => false,
            };
            tokio::task::spawn_blocking(copy_disk)
                .await
                .map_err(blocking)??;
            SnapshotTaken {
                memory,
                pause: None,
                flattened: false,
            }
        };
        let depth = 1 + launch.base.as_ref().map_or(0, |b| b.layers.len());
        let taken = if depth >= crate::lifecycle::snapshots::MAX_LAYERS {
            // Deep chains are read slowly: this snapshot's disk takes in
            // every layer under it and rests on the rootfs alone.
            let rootfs = self.images.rootfs(launch)?;
            let out = tokio::process::Command::new("qemu-img")
                .args(["rebase", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&rootfs)
                .arg(img.disk())
                .output()
                .await
                .map_err(|e| VmmError::host("running qemu-img rebase", e))?;
            if !out.status.success() {
                return Err(VmmError::host(
                    "flattening the snapshot's disk with qemu-img rebase",
                    std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
                ));
            }
            SnapshotTaken {
                flattened: true,
                ..taken
            }
        } else {
            taken
        };
        let dir = img.0.clone();
        let only = (!durable_memory).then(|| vec![img.disk()]);
        tokio::task::spawn_blocking(move || image::sync_dir(&dir, only.as_deref()))
            .await
            .map_err(blocking)??;
        Ok(taken)
    }

    async fn after_exit(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        // The RAM of a VMM that is gone is garbage (a suspend copied it).
        remove_file_if_present(&self.ram_file(&launch.machine_id))
    }

    fn remove_orphan(&self, id: &str) -> Result<(), VmmError> {
        remove_file_if_present(&self.ram_file(id))
    }

    async fn release(&self, paths: &MachinePaths) -> Result<(), VmmError> {
        if let Some(id) = paths.dir.file_name().and_then(|n| n.to_str()) {
            self.agents.forget(id);
            remove_file_if_present(&self.ram_file(id))?;
        }
        super::remove_dir_idempotent(&paths.dir).await
    }
}

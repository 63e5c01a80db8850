//! The VMM boundary: one trait every backend implements, and the process
//! identity code they share.
//!
//! A VMM is a real process that outlives the daemon. The machine run knows
//! it only by [`VmmIdentity`] (pid + start time + boot id), persisted before
//! anything relies on it, so that a restarted daemon re-adopts the process
//! instead of booting a second one, and never signals an unrelated process
//! that reused the pid.

pub(crate) mod agent_cache;
pub mod firecracker;
pub mod host;
pub mod image;
pub(crate) mod process;
pub mod qemu;
mod stop;
pub(crate) mod stub;
pub mod uid;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use hyperfleet_agent_proto::AgentClient;
use hyperfleet_api::VmmKind;
use tokio_util::sync::CancellationToken;

use crate::store::{MachineSpec, VmmIdentity};

/// Errors of the VMM boundary.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("the {backend} backend is not available on this host: {reason}")]
    Unavailable { backend: VmmKind, reason: String },
    #[error("could not spawn the VMM process ({program}): {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest never became ready within the boot timeout of {timeout:?}: {detail}")]
    BootTimeout { timeout: Duration, detail: String },
    #[error("the VMM process exited while {doing}")]
    Exited { doing: String },
    #[error("the VMM control channel failed while {doing}: {detail}")]
    Control { doing: String, detail: String },
    #[error("{what} failed on the host: {source}")]
    Host {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the {backend} backend does not support {operation}")]
    Unsupported {
        backend: VmmKind,
        operation: &'static str,
    },
}

impl VmmError {
    pub fn host(what: impl Into<String>, source: std::io::Error) -> Self {
        VmmError::Host {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn unavailable(backend: VmmKind, reason: impl Into<String>) -> Self {
        VmmError::Unavailable {
            backend,
            reason: reason.into(),
        }
    }
}

/// An unusable asset set (a file missing or corrupt) makes `backend`
/// unavailable for the machine.
pub(crate) fn asset_err(backend: VmmKind) -> impl Fn(crate::assets::AssetError) -> VmmError {
    move |e| VmmError::unavailable(backend, e.to_string())
}

/// Removes a file, treating "already gone" as done.
pub(crate) fn remove_file_if_present(path: &Path) -> Result<(), VmmError> {
    crate::util::absent_ok(std::fs::remove_file(path))
        .map_err(|e| VmmError::host(format!("removing {}", path.display()), e))
}

/// Where a machine's files live; chosen from its id, so they are known before
/// any side effect.
#[derive(Debug, Clone)]
pub struct MachinePaths {
    pub dir: PathBuf,
}

impl MachinePaths {
    pub(crate) fn new(machines_dir: &Path, id: &str) -> Self {
        MachinePaths {
            dir: machines_dir.join(id),
        }
    }
    /// The VMM's control socket (QMP, Firecracker API, stub protocol).
    pub(crate) fn control_socket(&self) -> PathBuf {
        self.dir.join("vmm.sock")
    }
    pub(crate) fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// Where a suspended machine's memory image is kept.
    pub(crate) fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("snapshot")
    }
    /// The suspend image's files.
    pub(crate) fn suspend_image(&self) -> image::ImageDir {
        image::ImageDir(self.snapshot_dir())
    }
}

/// The snapshot a machine was made from: the image its first start
/// restores (when it has memory) and the frozen disk layers under the
/// machine's own overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    /// The snapshot's id.
    pub id: String,
    /// It is a template (a freshly booted guest kept for fast creates).
    pub template: bool,
    /// The snapshot's directory (`image::ImageDir` layout).
    pub dir: PathBuf,
    /// The disk layers under the machine's overlay, the snapshot's own
    /// first, down to (not including) the asset set's rootfs.
    pub layers: Vec<PathBuf>,
    /// The snapshot holds memory.
    pub memory: bool,
}

/// What [`Vmm::snapshot`] made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnapshotTaken {
    /// The image holds the guest's memory.
    pub memory: bool,
    /// How long the vCPUs were stopped (a live VMM).
    pub pause: Option<Duration>,
    /// The snapshot's disk was rebased onto the guest image's rootfs (its
    /// chain had grown too deep): it rests on no other snapshot.
    pub flattened: bool,
}

/// Everything a backend needs to launch one machine.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub machine_id: String,
    pub paths: MachinePaths,
    pub spec: MachineSpec,
    /// The machine's name (the guest's hostname).
    pub name: String,
    /// Restore memory from the suspend image instead of booting.
    pub restore: bool,
    /// The machine's network (its TAP exists when `spawn` is called); None
    /// when networking is off.
    pub network: Option<crate::net::GuestNet>,
    /// The machine's own unprivileged uid (and gid) its VMM runs as, when
    /// the backend runs VMMs as one ([`Vmm::jail_uids`]); leased before
    /// `spawn` and kept for the machine's life (`uid`). None when the VMM
    /// runs as the daemon's user.
    pub uid: Option<u32>,
    /// The snapshot the machine was made from, if any.
    pub base: Option<BaseImage>,
}

impl LaunchSpec {
    /// The memory image a restoring spawn reads: the machine's own suspend
    /// image when it has one, else its base snapshot's memory (a machine
    /// made from a snapshot, first start).
    pub fn restore_image(&self) -> Option<(image::ImageDir, image::MemoryImage, bool)> {
        if !self.restore {
            return None;
        }
        let own = self.paths.suspend_image();
        if let Some(kind) = own.memory() {
            return Some((own, kind, true));
        }
        let base = self.base.as_ref().filter(|b| b.memory)?;
        let img = image::ImageDir(base.dir.clone());
        img.memory().map(|kind| (img, kind, false))
    }
}

/// How a save of the guest's memory ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// The image is complete; the VMM is paused.
    Complete,
    /// Cancelled half-way: no image, the VMM runs on as before the save.
    Cancelled,
}

/// How a graceful stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopPath {
    /// The guest powered off when asked; `via` says how it was asked
    /// (e.g. "agent poweroff", "ACPI power button").
    Graceful { via: &'static str },
    /// The guest did not stop in time and the VMM was killed.
    KilledAfterTimeout,
}

/// What the run sees of a live VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmRunState {
    Running,
    Paused,
}

#[async_trait]
pub trait Vmm: Send + Sync + 'static {
    fn kind(&self) -> VmmKind;

    /// Whether this backend can run machines on this host, and why not.
    fn availability(&self) -> Result<String, String>;

    /// The guest image new machines get (an asset set id), recorded in the
    /// machine's spec at create time. `None` for backends with no guest.
    fn current_image(&self) -> Result<Option<String>, String> {
        Ok(None)
    }

    /// The size of the disk a machine made from guest image `image` gets
    /// (what its guest can fill), recorded at create time for disk quotas.
    /// `None` when it cannot tell.
    fn disk_bytes(&self, image: Option<&str>) -> Option<u64> {
        let _ = image;
        None
    }

    /// A connection to the guest agent of a running machine (cached and
    /// re-established when it broke, e.g. after a daemon restart).
    async fn agent(&self, launch: &LaunchSpec) -> Result<AgentClient, VmmError> {
        let _ = launch;
        Err(VmmError::Unsupported {
            backend: self.kind(),
            operation: "a guest agent",
        })
    }

    /// The range each machine's VMM runs as a uid of its own from (the
    /// jailer's unprivileged users): the run leases the machine one before
    /// spawning and passes it as [`LaunchSpec::uid`], which also owns the
    /// machine's TAP device. None when VMMs run as the daemon's own user.
    fn jail_uids(&self) -> Option<uid::UidRange> {
        None
    }

    /// Whether the VMM runs in a network namespace of its machine's own (the
    /// run then makes the TAP inside it, linked to the host by a veth named
    /// like the TAP: `net::netns`).
    fn machine_netns(&self) -> bool {
        false
    }

    /// Where the guest's serial console is logged.
    fn console_log(&self, paths: &MachinePaths) -> PathBuf {
        paths.console_log()
    }

    /// Create-time work: the machine directory and disk. Idempotent.
    async fn prepare(&self, launch: &LaunchSpec) -> Result<(), VmmError>;

    /// Spawns a detached VMM process for the machine and returns its identity
    /// as soon as the process exists (before the guest is ready).
    async fn spawn(&self, launch: &LaunchSpec) -> Result<VmmIdentity, VmmError>;

    /// Waits until the guest agent answers, or the deadline passes.
    async fn wait_ready(
        &self,
        launch: &LaunchSpec,
        vmm: &VmmIdentity,
        timeout: Duration,
    ) -> Result<(), VmmError>;

    /// Asks a live VMM whether its vCPUs run (used after re-adoption).
    async fn run_state(&self, launch: &LaunchSpec) -> Result<VmmRunState, VmmError>;

    async fn pause(&self, launch: &LaunchSpec) -> Result<(), VmmError>;
    async fn resume(&self, launch: &LaunchSpec) -> Result<(), VmmError>;

    /// Asks the guest to power off; kills the VMM if it is still alive at the
    /// deadline. Returns once the process is gone.
    async fn shutdown(
        &self,
        launch: &LaunchSpec,
        vmm: &VmmIdentity,
        timeout: Duration,
    ) -> Result<StopPath, VmmError>;

    /// Saves the guest's memory and device state under the snapshot dir so a
    /// later `spawn` with `restore` continues where it left off. The VMM is
    /// left paused; the run kills it afterwards.
    ///
    /// `cancel` fires when a wake arrives mid-save. A backend that can stop
    /// its save half-way (QEMU: `migrate_cancel`) removes what it wrote,
    /// continues the vCPUs and answers [`Saved::Cancelled`]; one that
    /// cannot finishes the save and answers [`Saved::Complete`], and the run
    /// then continues the same VMM itself.
    async fn save_state(
        &self,
        launch: &LaunchSpec,
        cancel: &CancellationToken,
    ) -> Result<Saved, VmmError>;

    /// The machine's VMM is gone (stopped, suspended, killed, crashed or
    /// killed from outside): remove what it left on the host besides the
    /// machine's files (sockets, a jail, cgroups), so nothing waits for the
    /// next start or the delete to be cleaned up. Idempotent.
    async fn after_exit(&self, _launch: &LaunchSpec) -> Result<(), VmmError> {
        Ok(())
    }

    /// Whether [`Vmm::snapshot`] is implemented (asked before a snapshot
    /// or fork is accepted).
    fn supports_snapshots(&self) -> bool {
        false
    }

    /// Takes a snapshot of the machine into `dest` (an empty directory the
    /// caller made): its disk as it is, and its memory when `live` (the VMM
    /// runs or is paused, and is left as it was: a running guest is stopped
    /// only while its state is copied) or when it is suspended (the suspend
    /// image is reused). `durable_memory`: the memory image must survive a
    /// host crash (a fork's need not: its copies boot from their disks after
    /// one), so it is synced too; the disk always is.
    async fn snapshot(
        &self,
        launch: &LaunchSpec,
        dest: &Path,
        live: bool,
        durable_memory: bool,
    ) -> Result<SnapshotTaken, VmmError> {
        let _ = (launch, dest, live, durable_memory);
        Err(VmmError::Unsupported {
            backend: self.kind(),
            operation: "snapshots",
        })
    }

    /// Removes everything `prepare` and the VMM created. Idempotent.
    async fn release(&self, paths: &MachinePaths) -> Result<(), VmmError>;

    /// The startup sweep found machine `id`'s directory with no record left
    /// (its VMM, if any, is already killed, and the sweep removes the
    /// directory): remove what this backend keeps for a machine outside its
    /// directory (a jailed VMM's cgroups). Called on every backend, since the
    /// record that named the backend is gone. Idempotent.
    fn remove_orphan(&self, id: &str) -> Result<(), VmmError> {
        let _ = id;
        Ok(())
    }
}

/// What a guest's kernel writes to the console as its last words when it
/// powers off (`kernel_power_off`: `pr_emerg("reboot: Power down")`).
pub(crate) const POWER_DOWN_LINE: &str = "reboot: Power down";

/// Whether the guest whose console is logged at `console` powered itself
/// off: the console's last non-empty line is the kernel's "Power down",
/// written after `since_ms` (when the guest last became running; an older
/// line is a previous boot's). The console is the witness that outlives a
/// daemon restart: the VMM is not the daemon's child then, and its exit
/// status is lost. A VMM that is killed or crashes leaves no such line.
pub(crate) fn guest_powered_off(console: &Path, since_ms: Option<i64>) -> bool {
    const MTIME_SLACK_MS: i64 = 250;
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(console) else {
        return false;
    };
    let Ok(meta) = f.metadata() else {
        return false;
    };
    if let Some(since) = since_ms {
        let written_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        // An mtime comes from the kernel's coarse clock, which lags the
        // wall clock by up to a tick: a guest that powers off within
        // milliseconds of becoming running must still count. A previous
        // boot's line cannot hide in the slack, as every boot writes to the
        // console before it runs.
        if written_ms < since - MTIME_SLACK_MS {
            return false;
        }
    }
    const TAIL: u64 = 4096;
    let start = meta.len().saturating_sub(TAIL);
    let mut tail = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut tail).is_err() {
        return false;
    }
    String::from_utf8_lossy(&tail)
        .lines()
        .map(|l| l.trim_matches(|c: char| c.is_whitespace() || c == '\0'))
        .rfind(|l| !l.is_empty())
        .is_some_and(|l| l.ends_with(POWER_DOWN_LINE))
}

/// How a guest's main process ended, as its agent wrote on the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MainExit {
    pub code: i32,
    /// `main process exited with code <n>[: <why>]`: the machine's
    /// `exit_reason`.
    pub reason: String,
}

/// The main process's exit as the console logged at `console` tells it:
/// the last line about the main process (started or exited) in the
/// console's tail is an exit (a previous boot's exit is followed by this
/// boot's start line). Read only for a guest that powered itself off
/// ([`guest_powered_off`]), whose agent writes the exit line just before
/// powering off: the console outlives a daemon restart, so this does too.
pub(crate) fn main_process_exit(console: &Path) -> Option<MainExit> {
    use hyperfleet_agent_proto::{MAIN_EXITED_LINE, MAIN_STARTED_LINE};
    use std::io::{Read, Seek, SeekFrom};
    // What follows the exit line is the shutdown's few lines, and output
    // of the main process's orphans until they are killed.
    const TAIL: u64 = 64 * 1024;
    let mut f = std::fs::File::open(console).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL))).ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let (at, line) = text
        .lines()
        .filter_map(|l| {
            let started = l.rfind(MAIN_STARTED_LINE);
            let exited = l.rfind(MAIN_EXITED_LINE);
            match (started, exited) {
                (Some(s), Some(e)) if s > e => Some((false, &l[s..])),
                (_, Some(e)) => Some((true, &l[e..])),
                (Some(s), None) => Some((false, &l[s..])),
                (None, None) => None,
            }
        })
        .next_back()?;
    if !at {
        return None;
    }
    let reason = line
        .trim_end_matches(|c: char| c.is_whitespace() || c == '\0')
        .trim_start_matches("hyperfleet: ")
        .to_string();
    let digits: String = line[MAIN_EXITED_LINE.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let code = digits.parse().ok()?;
    Some(MainExit { code, reason })
}

/// Spawns a VMM process detached (see [`process::spawn_detached`]), its
/// output appended to `log`.
pub(crate) fn spawn_vmm(cmd: std::process::Command, log: &Path) -> Result<VmmIdentity, VmmError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    process::spawn_detached(cmd, log).map_err(|source| VmmError::Spawn { program, source })
}

/// Where a backend with a guest finds its asset sets: by id under `root`,
/// and the set new machines get at `current`.
pub(crate) struct GuestImages {
    backend: VmmKind,
    root: PathBuf,
    current: PathBuf,
}

impl GuestImages {
    pub(crate) fn new(backend: VmmKind, root: PathBuf, current: PathBuf) -> Self {
        GuestImages {
            backend,
            root,
            current,
        }
    }

    /// The set new machines get, or why there is none.
    pub(crate) fn current(&self) -> Result<crate::assets::AssetSet, String> {
        crate::assets::AssetSet::load(&self.current).map_err(|e| e.to_string())
    }

    /// [`Vmm::current_image`]: the current set's id.
    pub(crate) fn current_id(&self) -> Result<Option<String>, String> {
        self.current().map(|s| Some(s.id))
    }

    /// The set a machine boots: the one its spec recorded (by id), or the
    /// current set when it recorded none.
    pub(crate) fn for_image(
        &self,
        image: Option<&str>,
    ) -> Result<crate::assets::AssetSet, VmmError> {
        use crate::assets::AssetSet;
        let set = AssetSet::load(&self.current).map_err(asset_err(self.backend));
        let Some(id) = image else {
            return set;
        };
        if set.as_ref().is_ok_and(|c| c.id == id) {
            return set;
        }
        AssetSet::load(&self.root.join(id)).map_err(|e| {
            VmmError::unavailable(
                self.backend,
                format!("the machine's guest image {id} is gone ({e}); it cannot boot"),
            )
        })
    }

    /// [`Vmm::disk_bytes`]: a disk is the size of the root filesystem it is
    /// made from (a copy, or an overlay of that virtual size).
    pub(crate) fn disk_bytes(&self, image: Option<&str>) -> Option<u64> {
        let rootfs = self.for_image(image).ok()?.rootfs().ok()?;
        std::fs::metadata(rootfs).ok().map(|m| m.len())
    }

    /// The base of a machine's disk: the filesystem of its OCI image, or
    /// the root filesystem of the asset set it boots. (The kernel and
    /// initramfs — with the agent — are the asset set's either way.)
    pub(crate) fn rootfs(&self, launch: &LaunchSpec) -> Result<PathBuf, VmmError> {
        if let Some(oci) = &launch.spec.oci {
            // Images live beside the asset sets: `<data_dir>/images`.
            let images = self.root.parent().unwrap_or(&self.root).join("images");
            return crate::images::machine_rootfs(&images, &oci.digest)
                .map_err(|e| VmmError::unavailable(self.backend, e.to_string()));
        }
        self.for_image(launch.spec.image.as_deref())?
            .rootfs()
            .map_err(asset_err(self.backend))
    }
}

/// Makes a machine's disk once: creates its directory, and unless `disk`
/// already exists runs `cmd` with a temporary output path appended as its
/// last argument, then renames the result into place, so a crash never
/// leaves a half-made disk under the real name. `doing` names the work in
/// errors.
pub(crate) async fn make_disk_once(
    disk: &Path,
    mut cmd: tokio::process::Command,
    doing: &str,
) -> Result<(), VmmError> {
    if let Some(dir) = disk.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| VmmError::host(format!("creating {}", dir.display()), e))?;
    }
    if tokio::fs::try_exists(disk).await.unwrap_or(false) {
        return Ok(());
    }
    let tmp = PathBuf::from(format!("{}.tmp", disk.display()));
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    let out = cmd
        .arg(&tmp)
        .output()
        .await
        .map_err(|e| VmmError::host(format!("running {program} ({doing})"), e))?;
    if !out.status.success() {
        return Err(VmmError::host(
            doing,
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    tokio::fs::rename(&tmp, disk)
        .await
        .map_err(|e| VmmError::host(format!("renaming {}", tmp.display()), e))
}

/// Removes a machine directory, treating "already gone" as done.
pub(crate) async fn remove_dir_idempotent(dir: &Path) -> Result<(), VmmError> {
    crate::util::absent_ok(tokio::fs::remove_dir_all(dir).await).map_err(|e| {
        VmmError::host(
            format!("removing the machine directory {}", dir.display()),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_fresh_last_power_down_line_says_the_guest_powered_off() {
        let dir = tempfile::tempdir().unwrap();
        let con = dir.path().join("console.log");
        assert!(!guest_powered_off(&con, None), "no console");
        std::fs::write(&con, "boot\r\n[   1.0] reboot: Power down\r\n").unwrap();
        assert!(guest_powered_off(&con, None));
        assert!(guest_powered_off(&con, Some(0)));
        // Written before the guest last became running: a previous boot's.
        let later = crate::util::now_ms() + 60_000;
        assert!(!guest_powered_off(&con, Some(later)));
        // Written "just before" by the coarse clock: still this boot's.
        let just_now = crate::util::now_ms() + 5;
        assert!(guest_powered_off(&con, Some(just_now)));
        // Followed by more output: not the guest's last words.
        std::fs::write(&con, "reboot: Power down\nLinux booting again\n").unwrap();
        assert!(!guest_powered_off(&con, None));
        std::fs::write(&con, "Kernel panic - not syncing\n").unwrap();
        assert!(!guest_powered_off(&con, None));
    }

    #[test]
    fn the_main_process_exit_is_the_last_main_process_line() {
        let dir = tempfile::tempdir().unwrap();
        let con = dir.path().join("console.log");
        assert_eq!(main_process_exit(&con), None, "no console");
        std::fs::write(
            &con,
            "hyperfleet: main process started (pid 50): /bin/sh -c exit 3\r\n\
             output without a newline hyperfleet: main process exited with code 3\r\n\
             hyperfleet-agent: info: Poweroff: stopping processes\r\n\
             [    2.0] reboot: Power down\r\n",
        )
        .unwrap();
        assert_eq!(
            main_process_exit(&con),
            Some(MainExit {
                code: 3,
                reason: "main process exited with code 3".into()
            })
        );
        std::fs::write(
            &con,
            "hyperfleet: main process exited with code 137: killed by signal 9\n",
        )
        .unwrap();
        assert_eq!(main_process_exit(&con).unwrap().code, 137);
        assert_eq!(
            main_process_exit(&con).unwrap().reason,
            "main process exited with code 137: killed by signal 9"
        );
        // A previous boot's exit, followed by this boot's start: this boot's
        // main process did not exit (the guest was powered off otherwise).
        std::fs::write(
            &con,
            "hyperfleet: main process exited with code 1\n\
             hyperfleet: main process started (pid 51): /app\nreboot: Power down\n",
        )
        .unwrap();
        assert_eq!(main_process_exit(&con), None);
        std::fs::write(&con, "reboot: Power down\n").unwrap();
        assert_eq!(main_process_exit(&con), None);
    }
}

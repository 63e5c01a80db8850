//! What a QEMU process is given, and as whom it runs.
//!
//! QEMU opens no path of the host by name. The daemon opens everything a
//! machine's VMM uses — the disk overlay and its backing rootfs, the
//! console log, the kernel and initramfs, the listening QMP and agent
//! sockets, the TAP device, `/dev/kvm`, the suspend image — and hands the
//! file descriptors over at exec: files QEMU opens through its own
//! `qemu_open` as fd sets (`-add-fd`, `/dev/fdset/N`), the sockets and the
//! TAP as `fd=N`, and the kernel and initramfs, which QEMU reads with plain
//! `fopen`, as `/proc/self/fd/N` (re-opening that checks only the file's
//! own mode: they must be readable by others, as asset sets are made). So
//! the VMM needs no access to the data directory (0700) or `/dev/net/tun`
//! and `/dev/kvm` (0600 on many hosts), and the machine's files stay the
//! daemon's: a QEMU that escapes its guest can write its own disk and
//! console, but cannot swap a file in the machine directory for a symlink
//! the daemon would then follow.
//!
//! Before exec, in the forked child: every inherited descriptor but those
//! is marked close-on-exec (`close_range`), then, when the machine has a uid
//! of its own ([`LaunchSpec::uid`]), the supplementary groups are dropped
//! and gid then uid are set to it — which, from root, also empties every
//! capability set. QEMU then installs its seccomp filter ([`SANDBOX`]),
//! which forbids it to regain privileges, spawn processes or change
//! scheduling. The process keeps its pid and start time across the exec, so
//! the identity the run records is QEMU's.
//!
//! The machine directory stays in QEMU's command line (as the disk's fd set
//! `opaque` label), which is how the run and the orphan sweep find a VMM
//! they never recorded.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::QemuVmm;
use crate::vmm::image::{self, MemoryImage};
use crate::vmm::{remove_file_if_present, LaunchSpec, VmmError};

/// QEMU's seccomp sandbox: its default deny list plus obsolete system
/// calls, set*uid/set*gid, fork/exec and scheduling/affinity changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The fd sets of the command line.
const SET_DISK: u32 = 1;
const SET_ROOTFS: u32 = 2;
const SET_CONSOLE: u32 = 3;
const SET_INCOMING: u32 = 4;
const SET_KVM: u32 = 5;
/// The disk layers between the overlay and the rootfs get sets from here.
const SET_LAYERS: u32 = 10;

/// Guest RAM, as QEMU is given it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GivenMemory {
    /// A file of the machine's own (on the memory dir's tmpfs), mapped
    /// shared: saving the machine copies it instead of streaming RAM. A
    /// stream image is loaded into it too, so a machine is back on the fast
    /// path after one suspend.
    Shared(RawFd),
    /// A frozen image's RAM, read-only, mapped copy-on-write: pages stay
    /// shared with every other machine restored from it until written.
    Based(RawFd),
    /// QEMU's default RAM (restoring a suspend image of an earlier release,
    /// whose stream names that RAM block).
    Legacy,
}

/// The descriptor numbers QEMU is given, as the argv names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Given {
    /// The overlay, opened read-write and read-only (QEMU picks the access
    /// mode it asks for from the set).
    pub disk: (RawFd, RawFd),
    /// The frozen layers under the overlay (a snapshot's disks), top first.
    pub layers: Vec<RawFd>,
    /// The bottom of the chain: the asset set's rootfs, read-only.
    pub rootfs: RawFd,
    pub memory: GivenMemory,
    pub kernel: RawFd,
    pub initrd: RawFd,
    /// The console log, append-only.
    pub console: RawFd,
    /// Listening sockets at the machine's QMP and agent socket paths.
    pub qmp: RawFd,
    pub agent: RawFd,
    /// Attached to the machine's TAP device.
    pub tap: Option<RawFd>,
    /// `/dev/kvm`, when QEMU uses KVM.
    pub kvm: Option<RawFd>,
    /// The suspend image, when restoring.
    pub incoming: Option<RawFd>,
}

/// The opened descriptors; they must stay open until QEMU is spawned.
pub(super) struct Handoff {
    pub given: Given,
    fds: Vec<OwnedFd>,
}

impl Handoff {
    /// Every descriptor QEMU is to inherit.
    pub(super) fn raw(&self) -> Vec<RawFd> {
        self.fds.iter().map(AsRawFd::as_raw_fd).collect()
    }
}

fn open(path: &Path, opts: &OpenOptions, what: &str) -> Result<OwnedFd, VmmError> {
    opts.open(path)
        .map(OwnedFd::from)
        .map_err(|e| VmmError::host(format!("opening {what} {}", path.display()), e))
}

fn read_only() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true);
    o
}

/// Opens a shared asset QEMU reads through `/proc/self/fd`, which only
/// works when others may read it.
fn open_asset(path: &Path, what: &str, by_other_uid: bool) -> Result<OwnedFd, VmmError> {
    let fd = open(path, &read_only(), what)?;
    if by_other_uid {
        let mode = File::from(
            fd.try_clone()
                .map_err(|e| VmmError::host("duplicating", e))?,
        )
        .metadata()
        .map_err(|e| VmmError::host(format!("reading {}", path.display()), e))?
        .mode();
        if mode & 0o004 == 0 {
            return Err(VmmError::host(
                format!("handing {what} {} to QEMU", path.display()),
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "the file's mode is {:o}: QEMU runs as the machine's uid and must be able \
                         to read it (chmod a+r it)",
                        mode & 0o777
                    ),
                ),
            ));
        }
    }
    Ok(fd)
}

/// Binds a listening unix socket at `path` (replacing a stale one).
fn listen(path: &Path) -> Result<OwnedFd, VmmError> {
    remove_file_if_present(path)?;
    UnixListener::bind(path)
        .map(OwnedFd::from)
        .map_err(|e| VmmError::host(format!("listening on {}", path.display()), e))
}

impl QemuVmm {
    /// Opens everything `launch`'s QEMU uses, booting `kernel` and `initrd`
    /// over `rootfs`.
    pub(super) fn open_handoff(
        &self,
        launch: &LaunchSpec,
        kernel: &Path,
        initrd: &Path,
        rootfs: &Path,
    ) -> Result<Handoff, VmmError> {
        let p = &launch.paths;
        let other = launch.uid.is_some();
        let mut fds = Vec::new();
        let mut keep = |fd: OwnedFd| {
            let n = fd.as_raw_fd();
            fds.push(fd);
            n
        };
        let disk = Self::disk(p);
        let mut rw = OpenOptions::new();
        rw.read(true).write(true);
        let disk = (
            keep(open(&disk, &rw, "the disk overlay")?),
            keep(open(&disk, &read_only(), "the disk overlay")?),
        );
        let mut layers = Vec::new();
        for layer in launch.base.iter().flat_map(|b| &b.layers) {
            layers.push(keep(open(layer, &read_only(), "a snapshot's disk")?));
        }
        let rootfs = keep(open(rootfs, &read_only(), "the guest's root filesystem")?);
        let kernel = keep(open_asset(kernel, "the guest kernel", other)?);
        let initrd = keep(open_asset(initrd, "the guest initramfs", other)?);
        let mut append = OpenOptions::new();
        append.append(true).create(true).mode(0o600);
        let console = keep(open(&p.console_log(), &append, "the console log")?);
        let qmp = keep(listen(&p.control_socket())?);
        let agent = keep(listen(&Self::agent_socket(p))?);
        let tap = match &launch.network {
            Some(n) => {
                let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
                let fd = crate::net::tap::attach(&n.tap, flags as libc::c_short).map_err(|e| {
                    VmmError::host(
                        format!("attaching to the TAP device {}", n.tap),
                        io::Error::other(e.to_string()),
                    )
                })?;
                Some(keep(fd))
            }
            None => None,
        };
        let kvm = match self.accel.0 {
            "kvm" => Some(keep(open(Path::new("/dev/kvm"), &rw, "the KVM device")?)),
            _ => None,
        };
        let restore = launch.restore_image();
        let incoming = match &restore {
            Some((img, kind, _)) => Some(keep(open(
                &img.state_for(*kind),
                &read_only(),
                "the memory image",
            )?)),
            None => None,
        };
        let memory = match &restore {
            Some((_, MemoryImage::Legacy, _)) => GivenMemory::Legacy,
            // RAM inside the stream: loaded into a file of the machine's
            // own, which makes its next save fast.
            // A boot too starts from an empty one.
            Some((_, MemoryImage::Stream, _)) | None => {
                let ram = self.ram_file(&launch.machine_id);
                remove_file_if_present(&ram)?;
                GivenMemory::Shared(keep(self.open_ram(&ram, launch)?))
            }
            // A machine's own image: its RAM goes back into a file of its
            // own, so that it stays fast to save.
            Some((img, MemoryImage::Flat, true)) => {
                let ram = self.ram_file(&launch.machine_id);
                image::copy_sparse(&img.ram(), &ram, 0o600)?;
                GivenMemory::Shared(keep(self.open_ram(&ram, launch)?))
            }
            // Another's image (a snapshot): mapped, never copied.
            Some((img, MemoryImage::Flat, false)) => {
                GivenMemory::Based(keep(open_asset(&img.ram(), "a snapshot's memory", other)?))
            }
        };
        let given = Given {
            disk,
            layers,
            rootfs,
            memory,
            kernel,
            initrd,
            console,
            qmp,
            agent,
            tap,
            kvm,
            incoming,
        };
        Ok(Handoff { given, fds })
    }
}

/// The parts of QEMU's argv that name what it was given: the fd sets, then
/// per device the arguments using them. `disk` is the overlay's path (its
/// set's label, which keeps the machine directory in the command line).
impl QemuVmm {
    /// Opens (creating) machine `launch`'s own RAM file, sized to its
    /// memory and owned by the uid its QEMU runs as, which re-opens it
    /// through `/proc/self/fd`.
    fn open_ram(&self, ram: &Path, launch: &LaunchSpec) -> Result<OwnedFd, VmmError> {
        let doing = || format!("making the guest RAM file {}", ram.display());
        if let Some(dir) = ram.parent() {
            std::fs::create_dir_all(dir).map_err(|e| VmmError::host(doing(), e))?;
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(ram)
            .map_err(|e| VmmError::host(doing(), e))?;
        f.set_len(u64::from(launch.spec.mem_size_mib) << 20)
            .map_err(|e| VmmError::host(doing(), e))?;
        if let Some(uid) = launch.uid {
            std::os::unix::fs::fchown(&f, Some(uid), Some(uid))
                .map_err(|e| VmmError::host(doing(), e))?;
        }
        Ok(OwnedFd::from(f))
    }
}

pub(super) struct GivenArgs {
    pub add_fds: Vec<String>,
    pub accel: String,
    pub kernel: String,
    pub initrd: String,
    pub console: String,
    pub qmp: String,
    pub agent: String,
    pub drive: String,
    pub netdev: Option<String>,
    pub incoming: Option<String>,
    /// `-object` for guest RAM (None: QEMU's default RAM).
    pub memory: Option<String>,
}

impl Given {
    pub(super) fn args(&self, disk: &Path, console: &Path, accel: &str, mem_mib: u32) -> GivenArgs {
        let set = |fd: RawFd, set: u32, label: &dyn std::fmt::Display| {
            format!("fd={fd},set={set},opaque={label}")
        };
        let mut add_fds = vec![
            set(self.disk.0, SET_DISK, &disk.display()),
            set(self.disk.1, SET_DISK, &disk.display()),
            set(self.rootfs, SET_ROOTFS, &"rootfs"),
            set(self.console, SET_CONSOLE, &console.display()),
        ];
        let mut accel = accel.to_string();
        if let Some(kvm) = self.kvm {
            add_fds.push(set(kvm, SET_KVM, &"kvm"));
            accel = format!("kvm,device=/dev/fdset/{SET_KVM}");
        }
        let incoming = self.incoming.map(|fd| {
            add_fds.push(set(fd, SET_INCOMING, &"memory image"));
            // An image of this release is loaded once the migration
            // capabilities are set (`QemuVmm::finish_restore`); a legacy
            // one the way it was saved.
            match self.memory {
                GivenMemory::Legacy => incoming_uri(),
                _ => "defer".to_string(),
            }
        });
        let mut backing = String::new();
        for (i, fd) in self.layers.iter().enumerate() {
            let n = SET_LAYERS + i as u32;
            add_fds.push(set(*fd, n, &"layer"));
            backing.push_str(&format!(
                ",{0}driver=qcow2,{0}file.filename=/dev/fdset/{n}",
                "backing.".repeat(i + 1)
            ));
        }
        backing.push_str(&format!(
            ",{0}driver=raw,{0}file.filename=/dev/fdset/{SET_ROOTFS}",
            "backing.".repeat(self.layers.len() + 1)
        ));
        let memory = match self.memory {
            GivenMemory::Shared(fd) => Some(format!(
                "memory-backend-file,id=mem,size={mem_mib}M,mem-path=/proc/self/fd/{fd},share=on"
            )),
            GivenMemory::Based(fd) => Some(format!(
                "memory-backend-file,id=mem,size={mem_mib}M,mem-path=/proc/self/fd/{fd},\
                 share=off,readonly=on,rom=off"
            )),
            GivenMemory::Legacy => None,
        };
        GivenArgs {
            add_fds,
            accel,
            kernel: format!("/proc/self/fd/{}", self.kernel),
            initrd: format!("/proc/self/fd/{}", self.initrd),
            console: format!("file,id=con,path=/dev/fdset/{SET_CONSOLE},append=on"),
            qmp: format!("socket,id=qmp,fd={},server=on,wait=off", self.qmp),
            agent: format!("socket,id=agent,fd={},server=on,wait=off", self.agent),
            // The overlay records its backing file by path; QEMU gets it
            // as a descriptor instead.
            // No image locking: QEMU's OFD locks protect files against
            // other processes opening them by name, which no one does here
            // (every file is handed over as a descriptor, the daemon's own
            // copies read frozen or stopped images); and a VM continued
            // after a save re-activates its disk through the *other*
            // descriptor of the set, whose lock would conflict with the
            // first one's.
            drive: format!(
                "id=root,file=/dev/fdset/{SET_DISK},file.locking=off,format=qcow2,if=none,\
                 discard=unmap{backing}"
            ),
            netdev: self.tap.map(|fd| format!("tap,id=net0,fd={fd}")),
            incoming,
            memory,
        }
    }
}

/// Makes `cmd`'s child inherit only `keep` (besides stdin, stdout and
/// stderr) and, with `uid`, run as that uid and the gid of the same number
/// with no supplementary groups (and so, from root, no capabilities).
pub(super) fn confine(cmd: &mut Command, keep: Vec<RawFd>, uid: Option<u32>) {
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe system calls (close_range, getrlimit, fcntl,
    // setgroups, setgid, setuid); it reads `keep`, allocated before the
    // fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            close_inherited_on_exec()?;
            for fd in &keep {
                if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(id) = uid {
                if libc::setgroups(0, std::ptr::null()) < 0
                    || libc::setgid(id) < 0
                    || libc::setuid(id) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Marks every descriptor from 3 on close-on-exec: whatever the daemon (or
/// a library in it) opened without `O_CLOEXEC` stays behind.
///
/// # Safety
/// Only for a forked child before exec (it changes every descriptor).
unsafe fn close_inherited_on_exec() -> io::Result<()> {
    // SAFETY: close_range with a flag, no memory passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // Kernels before 5.11: every descriptor up to the limit, one by one.
    // SAFETY: rlimit is plain old data; getrlimit fills it.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes one rlimit, which `lim` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let max = lim.rlim_cur.min(1 << 20) as RawFd;
    for fd in 3..max {
        // SAFETY: fcntl on a descriptor that may not be open: EBADF, ignored.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

/// The suspend image a running QEMU writes through a descriptor passed
/// over QMP; created (or emptied) by the daemon, owned by it.
/// Where an incoming migration is read from (the image's fd set).
pub(super) fn incoming_uri() -> String {
    format!("file:/dev/fdset/{SET_INCOMING}")
}

pub(super) fn create_state_file(path: &PathBuf) -> Result<File, VmmError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| VmmError::host(format!("creating the memory image {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given() -> Given {
        Given {
            disk: (10, 11),
            layers: vec![],
            rootfs: 12,
            memory: GivenMemory::Legacy,
            kernel: 13,
            initrd: 14,
            console: 15,
            qmp: 16,
            agent: 17,
            tap: None,
            kvm: None,
            incoming: None,
        }
    }

    #[test]
    fn qemu_gets_descriptors_and_the_disk_set_keeps_the_machine_dir_in_its_argv() {
        let disk = Path::new("/data/machines/mABC/disk.qcow2");
        let con = Path::new("/data/machines/mABC/console.log");
        let a = given().args(disk, con, "tcg", 256);
        assert_eq!(
            a.add_fds[..2],
            [
                "fd=10,set=1,opaque=/data/machines/mABC/disk.qcow2",
                "fd=11,set=1,opaque=/data/machines/mABC/disk.qcow2"
            ]
        );
        assert_eq!(a.accel, "tcg");
        assert_eq!(
            (a.kernel.as_str(), a.initrd.as_str()),
            ("/proc/self/fd/13", "/proc/self/fd/14")
        );
        assert!(a.drive.contains("file=/dev/fdset/1,"), "{}", a.drive);
        assert!(
            a.drive.ends_with("backing.file.filename=/dev/fdset/2"),
            "{}",
            a.drive
        );
        assert_eq!(a.qmp, "socket,id=qmp,fd=16,server=on,wait=off");
        assert_eq!((a.netdev, a.incoming), (None, None));

        let g = Given {
            tap: Some(20),
            kvm: Some(21),
            incoming: Some(22),
            memory: GivenMemory::Legacy,
            ..given()
        };
        let a = g.args(disk, con, "kvm", 256);
        assert_eq!(a.accel, "kvm,device=/dev/fdset/5");
        assert_eq!(a.netdev.as_deref(), Some("tap,id=net0,fd=20"));
        assert_eq!(a.incoming.as_deref(), Some("file:/dev/fdset/4"));
        assert_eq!(a.memory, None);
        assert!(a.add_fds.contains(&"fd=21,set=5,opaque=kvm".to_string()));
        assert!(a
            .add_fds
            .contains(&"fd=22,set=4,opaque=memory image".to_string()));
    }

    /// A machine made from a snapshot: its RAM maps the snapshot's, and its
    /// disk chain runs through the snapshot's frozen layers to the rootfs.
    #[test]
    fn a_based_machine_maps_its_snapshot_and_chains_its_layers() {
        let disk = Path::new("/data/machines/mABC/disk.qcow2");
        let con = Path::new("/data/machines/mABC/console.log");
        let g = Given {
            layers: vec![30, 31],
            incoming: Some(22),
            memory: GivenMemory::Based(32),
            ..given()
        };
        let a = g.args(disk, con, "tcg", 512);
        assert_eq!(a.incoming.as_deref(), Some("defer"));
        assert_eq!(
            a.memory.as_deref(),
            Some(
                "memory-backend-file,id=mem,size=512M,mem-path=/proc/self/fd/32,share=off,\
                 readonly=on,rom=off"
            )
        );
        assert!(
            a.drive.contains(
                ",backing.driver=qcow2,backing.file.filename=/dev/fdset/10,\
             backing.backing.driver=qcow2,backing.backing.file.filename=/dev/fdset/11,\
             backing.backing.backing.driver=raw,backing.backing.backing.file.filename=/dev/fdset/2"
            ),
            "{}",
            a.drive
        );
        assert!(a.add_fds.contains(&"fd=31,set=11,opaque=layer".to_string()));
    }

    /// The child inherits exactly what it is given: a descriptor the parent
    /// opened without close-on-exec does not reach it.
    #[test]
    fn a_confined_child_inherits_only_the_descriptors_it_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let given = File::create(dir.path().join("given")).unwrap();
        let path = std::ffi::CString::new(dir.path().join("leaky").to_str().unwrap()).unwrap();
        // SAFETY: a valid path; the descriptor is closed below.
        let leaky = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY,
                0o600 as libc::c_uint,
            )
        };
        assert!(leaky >= 0);
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "test -e /proc/self/fd/{} && ! test -e /proc/self/fd/{leaky}",
            given.as_raw_fd()
        ));
        confine(&mut cmd, vec![given.as_raw_fd()], None);
        let ok = cmd.status().unwrap().success();
        // SAFETY: `leaky` was opened above and is closed once.
        unsafe { libc::close(leaky) };
        assert!(
            ok,
            "the child saw the leaky descriptor or missed the given one"
        );
    }
}

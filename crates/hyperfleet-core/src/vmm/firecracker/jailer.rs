//! The Firecracker jailer: what a jailed VMM looks like on the host, and the
//! argv, chroot and cgroups that make it so.
//!
//! With the jailer on, `spawn` runs `jailer --id <machine id> --exec-file
//! <firecracker> --uid/--gid <the machine's uid> --chroot-base-dir
//! <machine dir>/jail [cgroup limits] -- --api-sock <machine dir>/fc.sock`.
//! Every machine has an unprivileged uid of its own (gid = uid), leased by
//! the run from [`JailerConfig::uids`] before anything is made for it
//! (`vmm::uid`): one VMM that escapes Firecracker's sandbox still cannot
//! signal another, read its memory or open its files.
//! The jailer creates `<machine dir>/jail/<exec file name>/<id>/root`, copies
//! Firecracker into it, creates `/dev/kvm`, `/dev/net/tun` and friends there,
//! puts itself into the machine's cgroup, `pivot_root`s into the chroot in a
//! mount namespace of its own, drops to the uid/gid and execs Firecracker —
//! in the same process, so the pid and start time the run records are
//! Firecracker's.
//!
//! **The mirror.** Inside the chroot, every file Firecracker is given lives
//! at the same path as on the host: the chroot holds the machine
//! directory's path (`<root><machine dir>/…`, with `disk.ext4`, `fc.log`,
//! `fc.metrics` and `snapshot/` hard-linked in) and the asset set's path
//! (`<root><asset dir>/vmlinux`, `…/initramfs.cpio`). So the API requests,
//! Firecracker's `GET /vm/config` and, above all, its snapshots are the same
//! jailed or not: a snapshot records the drive's and the vsock socket's paths
//! and Firecracker v1.12 cannot override the vsock path on load, so a machine
//! suspended with the jailer off resumes with it on (and back) unchanged. It
//! also keeps the machine directory in Firecracker's command line
//! (`--api-sock <machine dir>/fc.sock`), which is how the run and the orphan
//! sweep find a VMM they never recorded. The daemon reaches the sockets
//! through symlinks `<machine dir>/fc.sock` and `vsock.sock` into the chroot
//! (a symlink is resolved by `connect`, so the doubled path never meets the
//! 108-byte limit of a socket address).
//!
//! The chroot lives under the machine directory (not in a shared jail
//! directory) so that hard links to the disk never cross a filesystem and
//! removing the machine directory — release, or the orphan sweep — removes
//! the jail too. It is rebuilt for every spawn (the jailer refuses an
//! existing one) and removed when the VMM stops.
//!
//! **Cgroups.** The jailer puts Firecracker into `hyperfleet/<id>` with the
//! machine's limits: `vcpu_count` CPUs of quota and `mem_size_mib` plus
//! [`MEMORY_OVERHEAD_MIB`] of memory. Cgroup v2 (`cpu.max`, `memory.max`)
//! where the unified hierarchy has the cpu and memory controllers; v1
//! (`cpu.cfs_quota_us`, `memory.limit_in_bytes`) on hybrid hosts whose
//! controllers are bound to v1 hierarchies. The jailer never removes a
//! cgroup; we do once the process is gone.
//!
//! **Not used:** `--daemonize` (it sends Firecracker's stdout — the guest's
//! serial console — to /dev/null; the process is detached by the daemon
//! anyway) and `--new-pid-ns` (the jailer then forks, exits, and leaves
//! Firecracker as a child of init whose pid it writes to a file: the process
//! the run spawned and recorded would not be the VMM). `--netns` names the
//! machine's own network namespace when it has networking (its TAP is in
//! there, `net::netns`), else [`JailerConfig::netns`] if configured.

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::store::MachineSpec;
use crate::vmm::uid::UidRange;
use crate::vmm::{MachinePaths, VmmError};

/// The cgroup every jailed VMM's own cgroup is created under.
pub(crate) const PARENT_CGROUP: &str = "hyperfleet";

/// Memory a jailed VMM may use beyond its guest's: Firecracker's own
/// footprint (under 5 MiB by its specification), KVM's per-VM and per-vCPU
/// kernel memory, which the memory controller charges to the cgroup, and
/// page cache of the snapshot files it writes. Generous on purpose: the
/// limit is there to stop a runaway VMM, not to squeeze a guest.
pub(crate) const MEMORY_OVERHEAD_MIB: u64 = 64;

/// The CPU controller's period; the quota is `vcpu_count` periods.
pub(crate) const CPU_PERIOD_US: u64 = 100_000;

/// The jailer's settings (`--firecracker-jailer`, `--jailer-*`).
#[derive(Debug, Clone)]
pub struct JailerConfig {
    /// `jailer`, resolved like the firecracker binary.
    pub binary: PathBuf,
    /// The uids (= gids) machines' VMMs run as, one per machine
    /// (`--jailer-uid-base`, `--jailer-uid-count`).
    pub uids: UidRange,
    /// A network namespace every jailed VMM of a machine *without*
    /// networking joins (`--jailer-netns`). A machine with networking always
    /// gets a namespace of its own instead (`net::netns`), with its TAP
    /// inside, linked to the host by a veth pair.
    pub netns: Option<PathBuf>,
}

impl JailerConfig {
    pub fn new(binary: PathBuf) -> Self {
        JailerConfig {
            binary,
            uids: UidRange::default(),
            netns: None,
        }
    }
}

/// Which cgroup hierarchy carries the cpu and memory controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cgroups {
    /// The unified hierarchy, mounted here, has both controllers.
    V2 { mount: PathBuf },
    /// v1 hierarchies (a hybrid host): where `cpu` and `memory` are mounted.
    V1 { cpu: PathBuf, memory: PathBuf },
    /// Neither: VMMs run without cgroup limits.
    None,
}

impl Cgroups {
    /// Looks at this host's mounts.
    pub(crate) fn detect() -> Cgroups {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        Self::from_mounts(&mounts, |mount| {
            std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default()
        })
    }

    /// The choice for a `/proc/mounts` text; `controllers` reads a cgroup2
    /// mount's `cgroup.controllers`.
    pub(crate) fn from_mounts(mounts: &str, controllers: impl Fn(&Path) -> String) -> Cgroups {
        let (mut cpu, mut memory) = (None, None);
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [_, mount, fstype, options, ..] = f.as_slice() else {
                continue;
            };
            let mount = PathBuf::from(mount);
            match *fstype {
                "cgroup2" => {
                    let have = controllers(&mount);
                    let has = |c: &str| have.split_whitespace().any(|x| x == c);
                    if has("cpu") && has("memory") {
                        return Cgroups::V2 { mount };
                    }
                }
                "cgroup" => {
                    let has = |c: &str| options.split(',').any(|o| o == c);
                    if has("cpu") && cpu.is_none() {
                        cpu = Some(mount.clone());
                    }
                    if has("memory") && memory.is_none() {
                        memory = Some(mount);
                    }
                }
                _ => {}
            }
        }
        match (cpu, memory) {
            (Some(cpu), Some(memory)) => Cgroups::V1 { cpu, memory },
            _ => Cgroups::None,
        }
    }

    /// The jailer arguments that put a VMM with `spec` into its cgroup with
    /// the spec's limits.
    pub(crate) fn args(&self, spec: &MachineSpec) -> Vec<String> {
        let quota = u64::from(spec.vcpu_count) * CPU_PERIOD_US;
        let bytes = (u64::from(spec.mem_size_mib) + MEMORY_OVERHEAD_MIB) << 20;
        let (version, limits) = match self {
            Cgroups::None => return Vec::new(),
            Cgroups::V2 { .. } => (
                "2",
                vec![
                    format!("cpu.max={quota} {CPU_PERIOD_US}"),
                    format!("memory.max={bytes}"),
                ],
            ),
            Cgroups::V1 { .. } => (
                "1",
                vec![
                    format!("cpu.cfs_period_us={CPU_PERIOD_US}"),
                    format!("cpu.cfs_quota_us={quota}"),
                    format!("memory.limit_in_bytes={bytes}"),
                ],
            ),
        };
        let mut out = vec![
            "--cgroup-version".to_string(),
            version.to_string(),
            "--parent-cgroup".to_string(),
            PARENT_CGROUP.to_string(),
        ];
        for l in limits {
            out.push("--cgroup".into());
            out.push(l);
        }
        out
    }

    /// The directories the jailer creates for machine `id` (one per v1
    /// hierarchy).
    pub(crate) fn dirs(&self, id: &str) -> Vec<PathBuf> {
        let mut v = match self {
            Cgroups::None => vec![],
            Cgroups::V2 { mount } => vec![mount.clone()],
            Cgroups::V1 { cpu, memory } => vec![cpu.clone(), memory.clone()],
        };
        v.dedup();
        v.into_iter()
            .map(|m| m.join(PARENT_CGROUP).join(id))
            .collect()
    }

    /// Removes machine `id`'s cgroups. Its processes must be gone; a cgroup
    /// whose last task exited a moment ago may still count as busy, so
    /// EBUSY is retried for a second. Idempotent.
    pub(crate) fn remove(&self, id: &str) -> Result<(), VmmError> {
        for dir in self.dirs(id) {
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => {
                        return Err(VmmError::host(
                            format!("removing the VMM's cgroup {}", dir.display()),
                            e,
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// One line for availability and doctor output.
    pub(crate) fn describe(&self) -> String {
        match self {
            Cgroups::V2 { mount } => format!(
                "cgroup v2 limits under {}",
                mount.join(PARENT_CGROUP).display()
            ),
            Cgroups::V1 { cpu, memory } => format!(
                "cgroup v1 limits under {} and {}",
                cpu.join(PARENT_CGROUP).display(),
                memory.join(PARENT_CGROUP).display()
            ),
            Cgroups::None => {
                "no cgroup limits (neither cgroup v2 nor v1 has the cpu and memory controllers here)"
                    .into()
            }
        }
    }
}

/// The jail's directory under a machine's directory (`--chroot-base-dir`).
pub(crate) fn jail_dir(paths: &MachinePaths) -> PathBuf {
    paths.dir.join("jail")
}

/// The chroot the jailer makes for machine `id` from `firecracker`.
pub(crate) fn chroot(paths: &MachinePaths, firecracker: &Path, id: &str) -> PathBuf {
    let exec = firecracker.file_name().unwrap_or_default();
    jail_dir(paths).join(exec).join(id).join("root")
}

/// The chroot of the machine's current (or last) jailed VMM, whatever
/// binary it was made from; None when the machine has no jail.
pub(crate) fn existing_chroot(paths: &MachinePaths, id: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(jail_dir(paths)).ok()?;
    entries
        .flatten()
        .map(|e| e.path().join(id).join("root"))
        .find(|p| p.is_dir())
}

/// Where host path `host` is inside the chroot `root` (the mirror).
pub(crate) fn inside(root: &Path, host: &Path) -> PathBuf {
    root.join(host.strip_prefix("/").unwrap_or(host))
}

/// The jailer's argv (without the program) for one machine, whose VMM runs
/// as `uid` (and the gid of the same number), joining the network namespace
/// `netns` when given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn argv(
    uid: u32,
    netns: Option<&Path>,
    cgroups: &Cgroups,
    firecracker: &Path,
    paths: &MachinePaths,
    id: &str,
    spec: &MachineSpec,
    api_socket: &Path,
) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![
        "--id".into(),
        id.into(),
        "--exec-file".into(),
        firecracker.into(),
        "--uid".into(),
        uid.to_string().into(),
        "--gid".into(),
        uid.to_string().into(),
        "--chroot-base-dir".into(),
        jail_dir(paths).into(),
    ];
    v.extend(cgroups.args(spec).into_iter().map(OsString::from));
    if let Some(ns) = netns {
        v.push("--netns".into());
        v.push(ns.into());
    }
    v.push("--".into());
    v.push("--api-sock".into());
    v.push(api_socket.into());
    v
}

/// How a file is put into the chroot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Share {
    /// One of the machine's own files (disk, logs, snapshot): hard-linked and
    /// handed to the machine's uid/gid, so the VMM writes the host's file.
    Own,
    /// A read-only file shared by machines (kernel, initramfs): hard-linked
    /// when it is on the same filesystem and world-readable, copied
    /// otherwise; never chowned (that would change the shared file).
    ReadOnly,
}

/// Builds the chroot `root` for a VMM running as `uid` (and the gid of the
/// same number) before the jailer runs: removes whatever an earlier VMM
/// left, creates the mirror of `dirs` (owned by the uid: the VMM creates
/// its sockets and snapshot files there) and puts `files` in.
pub(crate) fn build(
    uid: u32,
    paths: &MachinePaths,
    root: &Path,
    dirs: &[&Path],
    files: &[(PathBuf, Share)],
) -> Result<(), VmmError> {
    remove_jail(paths)?;
    for d in dirs {
        let inner = inside(root, d);
        mkdirs(&inner)?;
        chown(&inner, uid)?;
    }
    for (host, share) in files {
        let inner = inside(root, host);
        if let Some(parent) = inner.parent() {
            mkdirs(parent)?;
        }
        place(uid, host, &inner, *share)?;
    }
    Ok(())
}

/// Removes the machine's jail (the chroot and everything in it). Its VMM
/// must be gone. Idempotent.
pub(crate) fn remove_jail(paths: &MachinePaths) -> Result<(), VmmError> {
    let dir = jail_dir(paths);
    crate::util::absent_ok(std::fs::remove_dir_all(&dir))
        .map_err(|e| VmmError::host(format!("removing the jail {}", dir.display()), e))
}

fn mkdirs(dir: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::DirBuilderExt;
    // 0755 along the mirror: the unprivileged VMM must traverse it.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| VmmError::host(format!("creating {} in the jail", dir.display()), e))
}

/// Hands `path` to the machine's uid and the gid of the same number.
fn chown(path: &Path, uid: u32) -> Result<(), VmmError> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).map_err(|e| {
        VmmError::host(
            format!("handing {} to the machine's uid {uid}", path.display()),
            e,
        )
    })
}

fn place(uid: u32, host: &Path, inner: &Path, share: Share) -> Result<(), VmmError> {
    let meta = std::fs::metadata(host)
        .map_err(|e| VmmError::host(format!("reading {}", host.display()), e))?;
    let root_dev = inner
        .parent()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.dev());
    let link = match share {
        Share::Own => true,
        Share::ReadOnly => Some(meta.dev()) == root_dev && meta.mode() & 0o004 != 0,
    };
    if link {
        std::fs::hard_link(host, inner).map_err(|e| {
            VmmError::host(
                format!(
                    "hard-linking {} into the jail as {}",
                    host.display(),
                    inner.display()
                ),
                e,
            )
        })?;
    } else {
        std::fs::copy(host, inner)
            .map_err(|e| VmmError::host(format!("copying {} into the jail", host.display()), e))?;
        std::fs::set_permissions(inner, std::fs::Permissions::from_mode(0o444))
            .map_err(|e| VmmError::host(format!("making {} readable", inner.display()), e))?;
    }
    if share == Share::Own {
        chown(inner, uid)?;
    }
    Ok(())
}

/// Hard-links a file the jailed VMM made (`inside(root, host)`) out to
/// `host`, replacing what was there.
pub(crate) fn export(root: &Path, host: &Path) -> Result<(), VmmError> {
    let inner = inside(root, host);
    crate::vmm::remove_file_if_present(host)?;
    std::fs::hard_link(&inner, host).map_err(|e| {
        VmmError::host(
            format!("hard-linking {} out of the jail", inner.display()),
            e,
        )
    })
}

/// The jailer's version line (`Jailer v1.12.1`).
pub(crate) fn version_of(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("Jailer"))
        .map(str::to_string)
}

/// The jailed command: builds the chroot for the next jailed VMM of
/// `launch` and points the daemon's socket paths into it.
impl super::FirecrackerVmm {
    /// Builds the chroot for the next jailed VMM of `launch` and points the
    /// daemon's socket paths into it; returns the jailer command.
    pub(super) fn jailed_command(
        &self,
        jail: &super::Jail,
        firecracker: &Path,
        launch: &crate::vmm::LaunchSpec,
    ) -> Result<Command, VmmError> {
        let p = &launch.paths;
        let id = &launch.machine_id;
        let jailer_bin = jail.binary.clone().ok_or_else(|| {
            super::unavailable(format!(
                "the jailer is on but {} was not found in PATH or /usr/local/bin",
                jail.cfg.binary.display()
            ))
        })?;
        // The run leases the uid before spawning (`LaunchSpec::uid`).
        let uid = launch.uid.ok_or_else(|| {
            super::unavailable(format!(
                "machine {id} has no uid of its own to run its jailed VMM as"
            ))
        })?;
        let root = chroot(p, firecracker, id);
        let mut files = vec![
            (Self::disk(p), Share::Own),
            (Self::log_file(p), Share::Own),
            (Self::metrics_file(p), Share::Own),
        ];
        if launch.restore {
            files.push((Self::state_file(p), Share::Own));
            files.push((Self::mem_file(p), Share::Own));
        } else {
            let set = self.images.for_image(launch.spec.image.as_deref())?;
            let (kernel, initrd) = self.boot_files(&set)?;
            files.push((kernel, Share::ReadOnly));
            files.push((initrd, Share::ReadOnly));
        }
        build(uid, p, &root, &[&p.dir, &p.snapshot_dir()], &files)?;
        for sock in [Self::api_socket(p), Self::vsock_socket(p)] {
            let target = inside(&root, &sock);
            // Relative, so the link stays right if the data directory moves.
            let target = target.strip_prefix(&p.dir).unwrap_or(&target);
            std::os::unix::fs::symlink(target, &sock).map_err(|e| {
                VmmError::host(format!("linking {} into the jail", sock.display()), e)
            })?;
        }
        // With a network, the machine's own namespace (made by the run with
        // the TAP inside); without, the configured one, if any.
        let netns = match &launch.network {
            Some(net) => Some(crate::net::netns::path_for(&net.tap)),
            None => jail.cfg.netns.clone(),
        };
        let mut cmd = Command::new(jailer_bin);
        cmd.args(argv(
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
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::*;

    const HYBRID: &str = "\
sysfs /sys sysfs rw,nosuid 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn a_hybrid_host_whose_unified_tree_lacks_the_controllers_uses_v1() {
        let c = Cgroups::from_mounts(HYBRID, |_| "hugetlb\n".into());
        assert_eq!(
            c,
            Cgroups::V1 {
                cpu: "/sys/fs/cgroup/cpu".into(),
                memory: "/sys/fs/cgroup/memory".into()
            }
        );
        // Co-mounted controllers (`cpu,cpuacct`) are found by option, not name.
        let co = "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n\
                  cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        let c = Cgroups::from_mounts(co, |_| String::new());
        assert!(
            matches!(&c, Cgroups::V1 { cpu, .. } if cpu == Path::new("/sys/fs/cgroup/cpu,cpuacct")),
            "{c:?}"
        );
        assert_eq!(
            c.dirs("mABC"),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/hyperfleet/mABC"),
                PathBuf::from("/sys/fs/cgroup/memory/hyperfleet/mABC")
            ]
        );
    }

    #[test]
    fn a_unified_host_with_the_controllers_uses_v2_and_one_directory() {
        let mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        let c = Cgroups::from_mounts(mounts, |m| {
            assert_eq!(m, Path::new("/sys/fs/cgroup"));
            "cpuset cpu io memory pids\n".into()
        });
        assert_eq!(
            c,
            Cgroups::V2 {
                mount: "/sys/fs/cgroup".into()
            }
        );
        assert_eq!(
            c.dirs("mABC"),
            vec![PathBuf::from("/sys/fs/cgroup/hyperfleet/mABC")]
        );
        assert_eq!(Cgroups::from_mounts("", |_| String::new()), Cgroups::None);
        assert!(Cgroups::None.dirs("m").is_empty());
    }

    #[test]
    fn limits_follow_the_spec_in_each_version() {
        let s = spec(2, 512);
        let v2 = Cgroups::V2 {
            mount: "/sys/fs/cgroup".into(),
        };
        assert_eq!(
            v2.args(&s),
            [
                "--cgroup-version",
                "2",
                "--parent-cgroup",
                "hyperfleet",
                "--cgroup",
                "cpu.max=200000 100000",
                "--cgroup",
                "memory.max=603979776",
            ]
        );
        let v1 = Cgroups::V1 {
            cpu: "/c".into(),
            memory: "/m".into(),
        };
        assert_eq!(
            v1.args(&spec(1, 128)),
            [
                "--cgroup-version",
                "1",
                "--parent-cgroup",
                "hyperfleet",
                "--cgroup",
                "cpu.cfs_period_us=100000",
                "--cgroup",
                "cpu.cfs_quota_us=100000",
                "--cgroup",
                "memory.limit_in_bytes=201326592",
            ]
        );
        assert!(Cgroups::None.args(&s).is_empty());
    }

    #[test]
    fn the_argv_names_the_machine_ids_chroot_netns_and_api_socket() {
        let paths = MachinePaths::new(Path::new("/var/lib/hf/machines"), "mABC");
        let ns = Some(Path::new("/run/netns/vmms"));
        let v1 = Cgroups::V1 {
            cpu: "/c".into(),
            memory: "/m".into(),
        };
        let fc = Path::new("/usr/local/bin/firecracker");
        let api = paths.dir.join("fc.sock");
        let argv: Vec<String> = argv(900_007, ns, &v1, fc, &paths, "mABC", &spec(1, 128), &api)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let text = argv.join(" ");
        assert!(
            text.starts_with(
                "--id mABC --exec-file /usr/local/bin/firecracker --uid 900007 --gid 900007 \
                 --chroot-base-dir /var/lib/hf/machines/mABC/jail --cgroup-version 1 "
            ),
            "{text}"
        );
        assert!(
            text.ends_with(
                "--netns /run/netns/vmms -- --api-sock /var/lib/hf/machines/mABC/fc.sock"
            ),
            "{text}"
        );
        // The limits are single arguments even when their value has a space.
        let v2 = Cgroups::V2 {
            mount: "/cg".into(),
        };
        let a = argv_strings(&v2, &paths);
        assert!(a.contains(&"cpu.max=100000 100000".to_string()), "{a:?}");
        assert!(!a.contains(&"--netns".to_string()));
        assert_eq!(
            chroot(&paths, fc, "mABC"),
            Path::new("/var/lib/hf/machines/mABC/jail/firecracker/mABC/root")
        );
        assert_eq!(
            inside(Path::new("/j/root"), &api),
            Path::new("/j/root/var/lib/hf/machines/mABC/fc.sock")
        );
    }

    fn argv_strings(c: &Cgroups, paths: &MachinePaths) -> Vec<String> {
        argv(
            900_000,
            None,
            c,
            Path::new("/fc/firecracker"),
            paths,
            "mABC",
            &spec(1, 128),
            Path::new("/a.sock"),
        )
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect()
    }

    #[test]
    fn building_a_jail_links_own_files_hands_them_over_and_copies_unreadable_shared_ones() {
        // As root, ownership goes to a machine's uid; as another user, to
        // its own uid, which works where its gid is the same number.
        // SAFETY: getuid/getgid have no preconditions.
        let (me, my_gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let uid = if me == 0 { 900_123 } else { me };
        if me != 0 && me != my_gid {
            eprintln!("SKIPPED: uid {me} != gid {my_gid}, and only root hands files to others");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let paths = MachinePaths::new(&tmp.path().join("machines"), "mABC");
        std::fs::create_dir_all(&paths.dir).unwrap();
        let disk = paths.dir.join("disk.ext4");
        std::fs::write(&disk, b"disk").unwrap();
        let assets = tmp.path().join("assets");
        std::fs::create_dir_all(&assets).unwrap();
        let kernel = assets.join("vmlinux");
        std::fs::write(&kernel, b"kernel").unwrap();
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
        let secret = assets.join("initrd");
        std::fs::write(&secret, b"initrd").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();

        let root = chroot(&paths, Path::new("/x/firecracker"), "mABC");
        // A leftover from an earlier VMM is cleared first.
        std::fs::create_dir_all(root.join("dev/net")).unwrap();
        std::fs::write(root.join("dev/net/tun"), b"stale").unwrap();
        let files = [
            (disk.clone(), Share::Own),
            (kernel.clone(), Share::ReadOnly),
            (secret.clone(), Share::ReadOnly),
        ];
        build(uid, &paths, &root, &[&paths.dir], &files).unwrap();
        assert!(!root.join("dev").exists());
        let owner = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.uid(), m.gid())
        };
        assert_eq!(
            owner(&inside(&root, &disk)),
            (uid, uid),
            "the disk is the machine's"
        );
        assert_eq!(
            owner(&inside(&root, &paths.dir)),
            (uid, uid),
            "so is the mirror"
        );
        assert_eq!(
            owner(&kernel),
            (me, my_gid),
            "a shared file is never chowned"
        );
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&inside(&root, &disk)), ino(&disk), "the disk is linked");
        assert_eq!(
            ino(&inside(&root, &kernel)),
            ino(&kernel),
            "readable: linked"
        );
        let copy = inside(&root, &secret);
        assert_ne!(ino(&copy), ino(&secret), "unreadable to others: copied");
        assert_eq!(std::fs::read(&copy).unwrap(), b"initrd");
        assert_eq!(std::fs::metadata(&copy).unwrap().mode() & 0o777, 0o444);
        assert!(inside(&root, &paths.dir).is_dir());
        assert_eq!(existing_chroot(&paths, "mABC"), Some(root.clone()));

        // A file the VMM made inside is linked out over the host's.
        let made = paths.dir.join("snapshot.bin");
        std::fs::write(&made, b"old").unwrap();
        std::fs::write(inside(&root, &made), b"new").unwrap();
        export(&root, &made).unwrap();
        assert_eq!(std::fs::read(&made).unwrap(), b"new");

        remove_jail(&paths).unwrap();
        remove_jail(&paths).unwrap();
        assert!(!jail_dir(&paths).exists());
        assert_eq!(existing_chroot(&paths, "mABC"), None);
        assert_eq!(
            std::fs::read(&disk).unwrap(),
            b"disk",
            "the host's files stay"
        );
    }
}

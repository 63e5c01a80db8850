//! PID 1 duties: early mounts, console, kernel modules, hostname, switch_root, shutdown.
//!
//! Everything here runs only when the agent is the guest's init (`getpid() == 1`), before the
//! async runtime starts (boot) or after the agent decided to stop the machine (shutdown). Each
//! step logs and carries on when it fails: a half-configured guest whose agent answers is far
//! easier to debug than a kernel panic ("attempted to kill init").

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyperfleet_agent_proto::PowerAction;

use crate::config::Config;
use crate::{debug, error, info, warn};

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "string contains NUL"))
}

/// `mount(2)`; `EBUSY` (already mounted) counts as success.
fn mount(
    src: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = cstr(src)?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    // SAFETY: all pointers are valid NUL-terminated strings (or null where the API allows it)
    // that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

fn is_mountpoint(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(path)))
        .unwrap_or(false)
}

/// Mounts the pseudo filesystems a guest needs.
pub(crate) fn early_mounts() {
    const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let table: [(&str, &str, &str, libc::c_ulong, Option<&str>); 7] = [
        ("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, None),
        ("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            libc::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("gid=5,mode=0620,ptmxmode=0666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ),
    ];
    for (src, target, fstype, flags, data) in table {
        if is_mountpoint(target) {
            continue;
        }
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(src, target, Some(fstype), flags, data) {
            warn!("mount {fstype} on {target}: {e}");
        }
    }
}

/// Makes sure fds 0, 1 and 2 exist (the kernel leaves them closed when the initramfs has no
/// `/dev/console`), so logs reach the serial console and children inherit sane stdio.
pub(crate) fn ensure_console() {
    // SAFETY: F_GETFD only inspects the descriptor table.
    let missing = (0..3).any(|fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0);
    if !missing {
        return;
    }
    let path = c"/dev/console";
    // SAFETY: valid C string; result checked.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return;
    }
    for target in 0..3 {
        if target != fd {
            // SAFETY: dup2 onto the standard descriptors, which we want to replace.
            unsafe { libc::dup2(fd, target) };
        }
    }
    if fd > 2 {
        // SAFETY: fd is ours and no longer needed after dup2.
        unsafe { libc::close(fd) };
    }
}

/// Process-wide defaults a kernel-started init lacks.
pub(crate) fn process_defaults() {
    if std::env::var_os("PATH").is_none() {
        std::env::set_var(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    if std::env::var_os("HOME").is_none() {
        std::env::set_var("HOME", "/root");
    }
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o022) };
}

/// Finds module files under `/lib/modules/<release>`: from `modules.dep` when present (with
/// dependencies), otherwise by walking the tree (without dependencies: list them in order).
pub(crate) struct ModuleIndex {
    base: PathBuf,
    paths: HashMap<String, PathBuf>,
    deps: HashMap<String, Vec<String>>,
}

/// `virtio-blk.ko.xz` → `virtio_blk`.
pub(crate) fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

impl ModuleIndex {
    pub(crate) fn load(base: &Path) -> ModuleIndex {
        let mut idx = ModuleIndex {
            base: base.to_path_buf(),
            paths: HashMap::new(),
            deps: HashMap::new(),
        };
        if let Ok(dep) = std::fs::read_to_string(base.join("modules.dep")) {
            idx.parse_dep(&dep);
        } else {
            idx.walk(base);
        }
        idx
    }

    pub(crate) fn parse_dep(&mut self, text: &str) {
        for line in text.lines() {
            let Some((m, deps)) = line.split_once(':') else {
                continue;
            };
            let name = module_name(m);
            self.paths.insert(name.clone(), self.base.join(m.trim()));
            self.deps
                .insert(name, deps.split_whitespace().map(module_name).collect());
        }
    }

    fn walk(&mut self, dir: &Path) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for ent in rd.flatten() {
            let p = ent.path();
            if p.is_dir() {
                self.walk(&p);
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                if n.contains(".ko") {
                    self.paths.insert(module_name(n), p.clone());
                }
            }
        }
    }

    /// The load order for `wanted`: each module after its dependencies, no duplicates.
    pub(crate) fn plan(&self, wanted: &[String]) -> Vec<String> {
        fn visit(idx: &ModuleIndex, n: &str, seen: &mut HashSet<String>, out: &mut Vec<String>) {
            if !seen.insert(n.to_string()) {
                return;
            }
            // modules.dep lists dependencies so that the last one must be loaded first.
            if let Some(d) = idx.deps.get(n) {
                for dep in d.iter().rev() {
                    visit(idx, dep, seen, out);
                }
            }
            out.push(n.to_string());
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for w in wanted {
            visit(self, &w.replace('-', "_"), &mut seen, &mut out);
        }
        out
    }
}

/// Loads the configured modules with `finit_module`. Already-loaded and built-in modules are
/// fine; a missing one is logged.
pub(crate) fn load_modules(names: &[String]) {
    if names.is_empty() {
        return;
    }
    let release = crate::sysinfo::uname().release;
    let base = Path::new("/lib/modules").join(&release);
    let idx = ModuleIndex::load(&base);
    let builtin = std::fs::read_to_string(base.join("modules.builtin")).unwrap_or_default();
    let builtin: HashSet<String> = builtin.lines().map(module_name).collect();
    for name in idx.plan(names) {
        if builtin.contains(&name)
            || Path::new("/sys/module")
                .join(&name)
                .join("initstate")
                .exists()
        {
            continue;
        }
        let Some(path) = idx.paths.get(&name) else {
            warn!("module {name}: not found under {}", base.display());
            continue;
        };
        match finit_module(path) {
            Ok(()) => debug!("loaded module {name}"),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => warn!("module {name} ({}): {e}", path.display()),
        }
    }
}

fn finit_module(path: &Path) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    let name = path.to_string_lossy();
    // Compressed modules need the kernel to decompress them (CONFIG_MODULE_DECOMPRESS).
    const MODULE_INIT_COMPRESSED_FILE: libc::c_int = 4;
    let flags = if name.ends_with(".xz") || name.ends_with(".zst") || name.ends_with(".gz") {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    let params: &CStr = c"";
    // SAFETY: finit_module takes a valid fd (kept open by `f` for the call), a NUL-terminated
    // parameter string and integer flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            f.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn set_hostname(name: &str) {
    if let Err(e) = sethostname(name) {
        warn!("sethostname({name}): {e}");
    }
}

/// `sethostname(2)` (also used by a `refresh`).
pub(crate) fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: sethostname reads exactly name.len() bytes from a valid slice.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts `cfg.root` and makes it the root filesystem (like busybox `switch_root`, but the
/// agent keeps running: it is a static binary already in memory). The pseudo filesystems move
/// along. The initramfs contents are not freed (they are small).
pub(crate) fn switch_root(cfg: &Config) -> io::Result<()> {
    let Some(dev) = cfg.root.as_deref() else {
        return Ok(());
    };
    let t0 = Instant::now();
    while !Path::new(dev).exists() {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("root device {dev} did not appear (is virtio_blk loaded?)"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let newroot = "/newroot";
    std::fs::create_dir_all(newroot)?;
    let flags = if cfg.root_ro { libc::MS_RDONLY } else { 0 };
    mount(
        dev,
        newroot,
        Some(&cfg.rootfstype),
        flags,
        cfg.rootflags.as_deref(),
    )?;
    for m in ["/dev", "/proc", "/sys", "/run"] {
        let target = format!("{newroot}{m}");
        let _ = std::fs::create_dir_all(&target);
        if let Err(e) = mount(m, &target, None, libc::MS_MOVE, None) {
            warn!("moving {m} into the new root: {e}");
        }
    }
    // The initramfs /tmp is left behind; the new root gets a fresh one below.
    let tmp = c"/tmp";
    // SAFETY: valid C string; a failure only means it was not mounted.
    unsafe { libc::umount2(tmp.as_ptr(), libc::MNT_DETACH) };
    std::env::set_current_dir(newroot)?;
    mount(".", "/", None, libc::MS_MOVE, None)?;
    let dot = c".";
    // SAFETY: valid C string.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")?;
    if Path::new("/tmp").is_dir() && !is_mountpoint("/tmp") {
        if let Err(e) = mount(
            "tmpfs",
            "/tmp",
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ) {
            warn!("mount tmpfs on /tmp: {e}");
        }
    }
    // devpts and /dev/shm moved with /dev.
    info!("switched root to {dev}");
    Ok(())
}

/// Stops every process, syncs, unmounts and powers off or reboots. Only for PID 1.
// Ending the process is the point: everything else has been stopped and
// synced first, and as an ordinary process only the agent exits.
#[allow(clippy::exit)]
pub(crate) fn shutdown(action: PowerAction) -> ! {
    // SAFETY: getpid cannot fail.
    if unsafe { libc::getpid() } != 1 {
        // Never signal -1 from an ordinary process: that would hit every process of the user.
        info!("{action:?} requested; not PID 1, so only the agent exits");
        std::process::exit(0);
    }
    info!("{action:?}: stopping processes");
    // SAFETY: kill(-1) from init signals every other process; that is the point.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    reap_until_empty(Duration::from_secs(3));
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    reap_until_empty(Duration::from_millis(500));
    // SAFETY: sync cannot fail.
    unsafe { libc::sync() };
    if !is_system_init() {
        // PID 1 of a container or pid namespace: remounting / read-only would change the
        // superblock shared with the host, and reboot() would only end the namespace anyway.
        info!("not the system's init (pid namespace); exiting instead of {action:?}");
        std::process::exit(0);
    }
    unmount_all();
    // SAFETY: as above.
    unsafe { libc::sync() };
    let cmd = match action {
        PowerAction::Poweroff => libc::RB_POWER_OFF,
        PowerAction::Reboot => libc::RB_AUTOBOOT,
    };
    // SAFETY: reboot as PID 1 with a valid command; it only returns on failure.
    unsafe { libc::reboot(cmd) };
    error!("reboot({cmd:#x}) failed: {}", io::Error::last_os_error());
    loop {
        // SAFETY: pause just sleeps until a signal.
        unsafe { libc::pause() };
    }
}

/// Whether this process is init of the whole machine, not of a pid namespace: `/proc` (which
/// the agent mounted itself) must show us as pid 1 and the kernel's `kthreadd` as pid 2, which
/// only exists in the initial pid namespace.
fn is_system_init() -> bool {
    let self_is_1 = std::fs::read_link("/proc/self").is_ok_and(|p| p.as_os_str() == "1");
    let kthreadd = std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd");
    self_is_1 && kthreadd
}

fn reap_until_empty(max: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < max {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid < 0 {
            return; // ECHILD: nothing left.
        }
        if pid == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn unmount_all() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let targets: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
        .collect();
    for t in targets.iter().rev() {
        if t == "/" || t == "/proc" || t == "/sys" || t == "/dev" {
            continue;
        }
        let Ok(c) = cstr(t) else { continue };
        // SAFETY: valid C string; failure is logged and we fall back to a lazy unmount.
        if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
            // SAFETY: as above.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    if let Err(e) = mount("none", "/", None, libc::MS_REMOUNT | libc::MS_RDONLY, None) {
        debug!("remounting / read-only: {e}");
    }
}

/// Watches `/dev/input/event*` for the power button (QEMU `system_powerdown` through ACPI,
/// with the `button` and `evdev` modules loaded) and reports presses.
pub(crate) fn watch_power_button(tx: tokio::sync::mpsc::UnboundedSender<PowerAction>) {
    let Ok(rd) = std::fs::read_dir("/dev/input") else {
        return;
    };
    for ent in rd.flatten() {
        let name = ent.file_name();
        if !name.to_string_lossy().starts_with("event") {
            continue;
        }
        let path = ent.path();
        let tx = tx.clone();
        // A blocking reader per device: these are rare, and evdev reads are fixed-size records.
        std::thread::spawn(move || {
            use std::io::Read;
            const EV_KEY: u16 = 1;
            const KEY_POWER: u16 = 116;
            let Ok(mut f) = std::fs::File::open(&path) else {
                return;
            };
            let mut ev = [0u8; 24]; // struct input_event on 64-bit: timeval, type, code, value
            while f.read_exact(&mut ev).is_ok() {
                let ty = u16::from_ne_bytes([ev[16], ev[17]]);
                let code = u16::from_ne_bytes([ev[18], ev[19]]);
                let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
                if ty == EV_KEY && code == KEY_POWER && value == 1 {
                    info!("power button pressed ({})", path.display());
                    let _ = tx.send(PowerAction::Poweroff);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_and_plan() {
        assert_eq!(
            module_name("kernel/drivers/block/virtio_blk.ko"),
            "virtio_blk"
        );
        assert_eq!(module_name("virtio-net.ko.xz"), "virtio_net");
        let mut idx = ModuleIndex {
            base: PathBuf::from("/lib/modules/x"),
            paths: HashMap::new(),
            deps: HashMap::new(),
        };
        idx.parse_dep(
            "kernel/drivers/virtio/virtio_ring.ko:\n\
             kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n",
        );
        let plan = idx.plan(&["virtio_mmio".into(), "virtio-blk".into(), "virtio".into()]);
        assert_eq!(
            plan,
            vec!["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"]
        );
        assert_eq!(
            idx.paths["virtio_blk"],
            PathBuf::from("/lib/modules/x/kernel/drivers/block/virtio_blk.ko")
        );
    }
}

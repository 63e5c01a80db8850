//! Network namespaces for tests that change host networking.
//!
//! A test that turns machine networking on enters a namespace of its own on
//! its thread (`setns` is per thread) before starting the daemon: the
//! daemon, its VMMs, the HTTP client's connections and any tool the test
//! runs are then all inside it, its TAPs and nftables table never touch the
//! host's, and deleting the namespace takes everything with it even when
//! the test fails. Names start with `hft` and a random suffix, so they can
//! collide neither with the host's nor with each other. The per-machine
//! namespaces a daemon inside makes for jailed VMMs
//! (`/run/netns/hfns-<this namespace's inode>-<TAP>`) are deleted with it.

use std::os::fd::AsRawFd;
use std::process::Command;

/// Runs `cmd` (argv) and panics with its output when it fails.
pub(crate) fn sh(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub(crate) struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates `hft<tag><random>` with its loopback up.
    pub(crate) fn new(tag: &str) -> NetNs {
        assert!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() } == 0,
            "network tests need root (TAP devices, nftables, namespaces); CI runs them as root"
        );
        let mut rnd = [0u8; 3];
        let f = std::fs::File::open("/dev/urandom").expect("open /dev/urandom");
        std::io::Read::read_exact(&mut &f, &mut rnd).expect("read /dev/urandom");
        let name = format!("hft{tag}{:02x}{:02x}{:02x}", rnd[0], rnd[1], rnd[2]);
        sh(&["ip", "netns", "add", &name]);
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs argv inside the namespace.
    pub(crate) fn exec(&self, argv: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(argv);
        sh(&full)
    }

    /// Like `exec`, but returns success instead of panicking.
    pub(crate) fn try_exec(&self, argv: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Hyperfleet's TAP devices in the namespace (`hf` + 8 hex digits), sorted.
    pub(crate) fn hyperfleet_taps(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .exec(&["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| {
                n.len() == 10
                    && n.starts_with("hf")
                    && n[2..].bytes().all(|b| b.is_ascii_hexdigit())
            })
            .collect();
        v.sort();
        v
    }

    /// The names of the machine namespaces a daemon inside this namespace
    /// has made (`hfns-<this namespace's inode in hex>-<TAP>`).
    pub(crate) fn machine_namespaces(&self) -> Vec<String> {
        let Ok(meta) = std::fs::metadata(format!("/run/netns/{}", self.name)) else {
            return Vec::new();
        };
        let prefix = format!("hfns-{:x}-", std::os::unix::fs::MetadataExt::ino(&meta));
        let mut v: Vec<String> = std::fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Moves the calling thread into the namespace. Everything the thread
    /// starts from now on (processes, threads, sockets) lives there.
    pub(crate) fn enter(&self) {
        enter(&self.name)
    }
}

/// Moves the calling thread into the named network namespace.
pub(crate) fn enter(name: &str) {
    let f = std::fs::File::open(format!("/run/netns/{name}"))
        .unwrap_or_else(|e| panic!("opening netns {name}: {e}"));
    // SAFETY: `f` is an open namespace file for the duration of the call.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns into {name}: {}",
        std::io::Error::last_os_error()
    );
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for machine in self.machine_namespaces() {
            let _ = Command::new("ip").args(["netns", "del", &machine]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

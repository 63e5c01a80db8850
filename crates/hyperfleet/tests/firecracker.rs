//! The Firecracker backend through the daemon's API, against the real
//! `firecracker` and `jailer` binaries (v1.12.1): a machine created with
//! `"vmm": "firecracker"` is configured exactly as its spec says (asked of
//! Firecracker's own API socket), jailed or not; jailed, it runs as an
//! unprivileged uid of its machine's own (two machines never share one; a
//! deleted machine's uid is free again) in its chroot and cgroup, and with
//! networking in a
//! network namespace of its machine's own (TAP inside, veth and route on
//! the daemon's side, all gone after stop, a VMM crash and delete, kept
//! across a daemon crash, swept when stray); a guest that never answers —
//! every guest on a host whose /dev/kvm is the software-nested kvm_pvm —
//! ends `failed` with the boot timeout named; the crash scenario's spawn,
//! stop and release boundaries converge; and nothing is left behind. What
//! needs a guest that boots (exec, files, the full crash scenario) runs on
//! hosts with hardware virtualisation and says loudly that it was skipped
//! elsewhere. Needs the binaries in PATH or /usr/local/bin and the guest
//! assets (HF_TEST_ASSETS or target/hf-test-data/assets/current); the jailed
//! tests need root. In CI nothing but the hardware-gated tests is skipped.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::crash::{self, Step, Want};
use common::{eventually, pids_matching, Daemon, Sandbox};
use hyperfleet_core::vmm::host::{detect_accel, Accel};
use serde_json::{json, Value};

fn prerequisites() -> Option<PathBuf> {
    let assets = common::assets_dir();
    let binary = std::process::Command::new("firecracker")
        .arg("--version")
        .output()
        .or_else(|_| {
            std::process::Command::new("/usr/local/bin/firecracker")
                .arg("--version")
                .output()
        })
        .is_ok_and(|o| o.status.success());
    let what = format!(
        "the firecracker binary (PATH or /usr/local/bin) and guest assets in {}",
        assets.display()
    );
    common::present_or_skip(binary && assets.join("manifest.json").exists(), &what)
        .then_some(assets)
}

/// Whether the test runs as root (the jailer needs it); a loud note
/// otherwise, and a failure in CI, which runs as root.
fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("MISSING: root, which the jailer needs; CI runs the tests as root");
    }
    eprintln!("SKIPPED: the jailed variant needs root");
    false
}

/// Says on the test process's stderr itself that a test was skipped: the
/// test harness captures `eprintln!` of passing tests, but not writes to
/// the stderr handle, so the line shows in every run's output.
fn skipped(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Whether this host can boot Firecracker guests; otherwise a loud line on
/// stderr saying the test was skipped and why.
fn hardware_kvm(test: &str) -> bool {
    let (accel, why) = detect_accel();
    if accel == Accel::HardwareKvm {
        return true;
    }
    skipped(&format!(
        "SKIPPED (needs hardware virtualisation): {test}: {why}"
    ));
    false
}

/// A kernel Firecracker can boot the agent with: `HF_TEST_FIRECRACKER_KERNEL`,
/// or none when the asset set's finds Firecracker's devices (Debian's does,
/// through ACPI; docs/guests.md). `Err` when neither.
fn firecracker_kernel(assets: &Path) -> Result<Option<String>, String> {
    if let Some(k) = std::env::var_os("HF_TEST_FIRECRACKER_KERNEL") {
        return Ok(Some(k.to_string_lossy().into_owned()));
    }
    let set = hyperfleet_core::assets::AssetSet::load(assets).map_err(|e| e.to_string())?;
    hyperfleet_core::vmm::firecracker::kernel::check(None, &set).map(|_| None)
}

/// The daemon flags for a test that boots a Firecracker guest: the assets,
/// a boot timeout and the kernel, when one is needed. None (after a loud
/// note) without hardware virtualisation, or when something is missing
/// (a failure in CI).
fn hardware_flags(test: &str) -> Option<Vec<String>> {
    if !hardware_kvm(test) {
        return None;
    }
    let assets = prerequisites()?;
    let mut flags = vec![
        "--assets-dir".to_string(),
        assets.display().to_string(),
        "--boot-timeout".into(),
        "60".into(),
    ];
    match firecracker_kernel(&assets) {
        Ok(None) => Some(flags),
        Ok(Some(k)) => {
            flags.extend(["--firecracker-kernel".into(), k]);
            Some(flags)
        }
        Err(why) if std::env::var_os("CI").is_some() => panic!("MISSING: {test}: {why}"),
        Err(why) => {
            skipped(&format!(
                "SKIPPED (needs a Firecracker guest kernel): {test}: {why}"
            ));
            None
        }
    }
}

/// Kills the sandbox's Firecracker processes on drop (declared after the
/// sandbox, so it runs first), even when an assertion failed, and removes
/// the cgroups of its machines.
struct FirecrackerReaper(PathBuf);

impl Drop for FirecrackerReaper {
    fn drop(&mut self) {
        for pid in pids_matching(&format!("{}/", self.0.display()), "firecracker") {
            // SAFETY: kill(2) with a pid whose command line names our sandbox.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            for d in cgroup_dirs(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

/// Where a jailed machine's cgroups would be: `hyperfleet/<id>` in the
/// cgroup2 hierarchy and in the v1 cpu and memory hierarchies, from this
/// host's mounts.
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let mut out = Vec::new();
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let v1 = f[2] == "cgroup" && f[3].split(',').any(|o| o == "cpu" || o == "memory");
        if f[2] == "cgroup2" || v1 {
            out.push(Path::new(f[1]).join("hyperfleet").join(id));
        }
    }
    out
}

/// The mount point of the hierarchy a /proc/<pid>/cgroup line names.
fn hierarchy_mount(controllers: &str) -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| {
            if controllers.is_empty() {
                f[2] == "cgroup2"
            } else {
                f[2] == "cgroup"
                    && f[3]
                        .split(',')
                        .any(|o| controllers.split(',').any(|c| c == o))
            }
        })
        .map(|f| PathBuf::from(f[1]))
        .unwrap()
}

/// The uid and gid (real, effective, saved and filesystem ones, which must
/// all agree) process `pid` runs as, from /proc/<pid>/status.
fn ids_of(pid: i32) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let one = |key: &str| {
        let ids: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap()
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(
            ids.len() == 4 && ids.iter().all(|i| *i == ids[0]),
            "{key} {ids:?}"
        );
        ids[0]
    };
    (one("Uid:"), one("Gid:"))
}

/// A jailed VMM of machine `id` with `vcpus` and `mib`: running as the
/// machine's own unprivileged `uid` (and the gid of the same number), in
/// its chroot, whose files for the machine are the uid's, in
/// `hyperfleet/<id>` with the spec's limits.
fn assert_jailed(pid: i32, dir: &Path, id: &str, uid: u32, vcpus: u64, mib: u64) {
    assert_eq!(
        ids_of(pid),
        (uid, uid),
        "the jailed Firecracker's uid and gid"
    );
    let chroot = dir.join(format!("jail/firecracker/{id}/root"));
    let mirror = chroot.join(dir.strip_prefix("/").unwrap());
    for f in ["", "disk.ext4", "fc.log", "fc.metrics", "snapshot"] {
        let m = std::fs::metadata(mirror.join(f)).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, uid), "{f} in the chroot");
    }
    // The sockets Firecracker made are its own too.
    let sock = std::fs::symlink_metadata(mirror.join("fc.sock")).unwrap();
    assert_eq!(sock.uid(), uid, "the API socket");
    // readlink(/proc/<pid>/root) says "/" (the jailer pivot_roots in a mount
    // namespace of its own); stat reaches the directory itself.
    let root = std::fs::metadata(format!("/proc/{pid}/root")).unwrap();
    let chroot = std::fs::metadata(&chroot).unwrap();
    assert_eq!(
        (root.dev(), root.ino()),
        (chroot.dev(), chroot.ino()),
        "its root is the chroot"
    );
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, Path::new("/firecracker"), "the copy inside the chroot");

    let want = format!("/hyperfleet/{id}");
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mut limits = Vec::new();
    for line in cg.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
        let base = || hierarchy_mount(controllers).join(path.trim_start_matches('/'));
        let read = |file: &str| {
            std::fs::read_to_string(base().join(file))
                .unwrap()
                .trim()
                .to_string()
        };
        let has = |c: &str| controllers.split(',').any(|x| x == c);
        if controllers.is_empty() && Path::new(&base()).join("cpu.max").exists() {
            assert_eq!(path, want, "{cg}");
            limits.push(("cpu", read("cpu.max")));
            limits.push(("memory", read("memory.max")));
        }
        if has("cpu") {
            assert_eq!(path, want, "{cg}");
            limits.push((
                "cpu",
                format!("{} {}", read("cpu.cfs_quota_us"), read("cpu.cfs_period_us")),
            ));
        }
        if has("memory") {
            assert_eq!(path, want, "{cg}");
            limits.push(("memory", read("memory.limit_in_bytes")));
        }
    }
    limits.sort();
    assert_eq!(
        limits,
        [
            ("cpu", format!("{} 100000", vcpus * 100_000)),
            ("memory", ((mib + 64) << 20).to_string())
        ],
        "{cg}"
    );
}

/// A sandbox for a jailed test, with the guest assets; its reaper goes
/// first (fields drop in order). None, after a note, without the
/// prerequisites or root.
struct JailedSandbox {
    _reaper: FirecrackerReaper,
    sb: Sandbox,
    assets: PathBuf,
}

impl JailedSandbox {
    fn new() -> Option<JailedSandbox> {
        let assets = prerequisites()?;
        if !root() {
            return None;
        }
        let sb = Sandbox::new();
        Some(JailedSandbox {
            _reaper: FirecrackerReaper(sb.machines_dir()),
            sb,
            assets,
        })
    }
}

/// Firecracker (or jailer) processes of one machine.
fn machine_vmm_pids(sb: &Sandbox, id: &str) -> Vec<i32> {
    pids_matching(
        &sb.machines_dir().join(id).display().to_string(),
        "firecracker",
    )
}

/// The cgroups of machine `id` that still exist.
fn cgroups_left(id: &str) -> Vec<String> {
    cgroup_dirs(id)
        .into_iter()
        .filter(|d| d.exists())
        .map(|d| d.display().to_string())
        .collect()
}

/// No process, socket, jail, directory or cgroup of machine `id` is left.
fn assert_nothing_left(sb: &Sandbox, id: &str) {
    let dir = sb.machines_dir().join(id);
    eventually(
        "the machine directory to go",
        Duration::from_secs(10),
        || (!dir.exists()).then_some(()),
    );
    assert!(firecracker_pids(sb).is_empty(), "no Firecracker left");
    for d in cgroup_dirs(id) {
        assert!(!d.exists(), "the cgroup {} is left", d.display());
    }
}

/// Firecracker (or jailer) processes of the sandbox's machines. The
/// marker is the machines directory, not the sandbox: the daemon's own
/// command line names the sandbox and `--firecracker-jailer`.
fn firecracker_pids(sb: &Sandbox) -> Vec<i32> {
    pids_matching(&format!("{}/", sb.machines_dir().display()), "firecracker")
}

/// One raw HTTP/1.1 request to Firecracker's API socket.
fn fc_get(sock: &Path, path: &str) -> Option<Value> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
                return serde_json::from_str(&body[..len]).ok();
            }
        }
    }
    None
}

fn start_daemon(sb: &Sandbox, assets: &Path, boot_timeout: &str, jailer: &str) -> Daemon {
    start_daemon_with(sb, assets, boot_timeout, jailer, &[])
}

fn start_daemon_with(
    sb: &Sandbox,
    assets: &Path,
    boot_timeout: &str,
    jailer: &str,
    extra: &[&str],
) -> Daemon {
    let assets = assets.display().to_string();
    let mut args = vec![
        "--default-vmm",
        "stub",
        "--assets-dir",
        &assets,
        "--boot-timeout",
        boot_timeout,
        "--firecracker-jailer",
        jailer,
    ];
    args.extend_from_slice(extra);
    Daemon::start_with(sb, &[], &args)
}

/// Unjailed without networking, then (as root) jailed with networking on,
/// in a network namespace of the test's own: jailed, the VMM also runs as
/// the unprivileged uid in its chroot and cgroup, attached to the
/// machine's TAP device (owned by that uid).
#[test]
fn a_firecracker_machine_is_configured_as_its_spec_says_jailed_or_not_and_leaves_nothing() {
    configured_as_its_spec_says("off", None);
    if root() {
        let ns = common::netns::NetNs::new("f");
        ns.enter();
        configured_as_its_spec_says("on", Some(&ns));
    }
}

fn configured_as_its_spec_says(jailer: &str, net: Option<&common::netns::NetNs>) {
    let Some(assets) = prerequisites() else {
        return;
    };
    let jailed = jailer == "on";
    let sb = Sandbox::new();
    let _reaper = FirecrackerReaper(sb.machines_dir());
    let net_args: &[&str] = if net.is_some() {
        &["--network", "on"]
    } else {
        &[]
    };
    let d = start_daemon_with(&sb, &assets, "60", jailer, net_args);
    let m = d.create(json!({
        "name": "fc", "vmm": "firecracker", "vcpu_count": 2, "mem_size_mib": 320
    }));
    assert_eq!(m["vmm"], "firecracker", "{m}");
    let id = m["id"].as_str().unwrap().to_string();
    let dir = sb.machines_dir().join(&id);
    let sock = dir.join("fc.sock");

    let r = d.call("POST", "/machines/fc/start?wait=false", None);
    assert!(r.status < 300, "{}", r.body);
    // The daemon configures and starts the VM; then Firecracker says so.
    eventually("Firecracker to run the VM", Duration::from_secs(30), || {
        fc_get(&sock, "/").filter(|v| v["state"] == "Running")
    });
    let mc = fc_get(&sock, "/machine-config").unwrap();
    assert_eq!(
        (mc["vcpu_count"].as_u64(), mc["mem_size_mib"].as_u64()),
        (Some(2), Some(320)),
        "{mc}"
    );
    // Jailed too, Firecracker sees the host's paths (the chroot mirrors
    // them), and the sockets are reached through the machine directory.
    let cfg = fc_get(&sock, "/vm/config").unwrap();
    let drives = cfg["drives"].as_array().unwrap();
    assert_eq!(drives.len(), 1, "{cfg}");
    assert_eq!(
        drives[0]["path_on_host"],
        dir.join("disk.ext4").display().to_string()
    );
    assert_eq!(cfg["vsock"]["guest_cid"], 3, "{cfg}");
    assert_eq!(
        cfg["vsock"]["uds_path"],
        dir.join("vsock.sock").display().to_string()
    );
    match net {
        // The machine's lease: its TAP and MAC, and the guest's address
        // on the kernel command line.
        Some(ns) => {
            let m = d.call("GET", "/machines/fc", None).body;
            let tap = m["network"]["tap"].as_str().unwrap().to_string();
            // Jailed, Firecracker is given the TAP inside its namespace.
            let vmm_tap = if jailed { "tap0" } else { tap.as_str() };
            assert_eq!(
                cfg["network-interfaces"],
                json!([{
                    "iface_id": "eth0",
                    "host_dev_name": vmm_tap,
                    "guest_mac": m["network"]["mac"],
                    "rx_rate_limiter": null,
                    "tx_rate_limiter": null,
                }]),
                "{cfg}"
            );
            assert!(cfg["boot-source"]["boot_args"]
                .as_str()
                .unwrap()
                .contains(&format!(
                    "hf.ip={}/30",
                    m["network"]["ip"].as_str().unwrap()
                )));
            // On the host: the TAP, or jailed the veth named like it.
            assert_eq!(ns.hyperfleet_taps(), vec![tap.clone()]);
        }
        None => assert_eq!(cfg["network-interfaces"], json!([]), "{cfg}"),
    }
    let machine_ns = match (jailed, net) {
        (true, Some(ns)) => {
            let m = d.call("GET", "/machines/fc", None).body;
            Some(assert_machine_netns(ns, &m, firecracker_pids(&sb)[0]))
        }
        _ => None,
    };
    assert!(cfg["boot-source"]["boot_args"]
        .as_str()
        .unwrap()
        .contains("hf.hostname=fc"));
    let pids = firecracker_pids(&sb);
    assert_eq!(pids.len(), 1);
    if jailed {
        // The first machine of a fresh daemon: the first uid of the range.
        assert_jailed(pids[0], &dir, &id, 900_000, 2, 320);
    }
    assert_eq!(
        d.call("GET", "/machines/fc", None).body["status"],
        "starting"
    );

    // A SIGKILLed daemon's successor re-adopts the same process (pid +
    // start time + the API socket answering) instead of booting another.
    let mut d = d;
    d.kill9();
    let d = start_daemon_with(&sb, &assets, "60", jailer, net_args);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        firecracker_pids(&sb),
        pids,
        "the same Firecracker, re-adopted"
    );
    assert_eq!(fc_get(&sock, "/").unwrap()["state"], "Running");
    assert_eq!(
        d.call("GET", "/machines/fc", None).body["status"],
        "starting"
    );

    // Stop (the guest cannot answer here: killed at --stop-timeout), then
    // delete: no process, socket, jail, directory or cgroup.
    let r = d.call("POST", "/machines/fc/stop", None);
    assert!(r.status < 300, "{}", r.body);
    eventually("the machine to stop", Duration::from_secs(30), || {
        (d.call("GET", "/machines/fc", None).body["status"] == "stopped").then_some(())
    });
    assert!(
        firecracker_pids(&sb).is_empty(),
        "no Firecracker after stop"
    );
    if let (Some(ns), Some(machine_ns)) = (net, &machine_ns) {
        assert!(
            !machine_ns.exists(),
            "{} is left after stop",
            machine_ns.display()
        );
        assert_eq!(
            ns.hyperfleet_taps(),
            Vec::<String>::new(),
            "veth left after stop"
        );
    }
    for p in [&sock, &dir.join("vsock.sock"), &dir.join("jail")] {
        assert!(
            p.symlink_metadata().is_err(),
            "{} is left after stop",
            p.display()
        );
    }
    for c in cgroup_dirs(&id) {
        assert!(!c.exists(), "{} is left after stop", c.display());
    }
    assert_eq!(d.call("DELETE", "/machines/fc", None).status, 204);
    assert_nothing_left(&sb, &id);
    if let Some(ns) = net {
        assert_eq!(ns.hyperfleet_taps(), Vec::<String>::new(), "TAP left");
        assert_eq!(
            ns.machine_namespaces(),
            Vec::<String>::new(),
            "namespace left"
        );
    }
}

/// Jailed (as root), each machine's VMM runs as a uid of its own from the
/// configured range: two machines at once get different uids and own
/// their chroot files; a machine keeps its uid across stop and start; with
/// the range used up a third machine fails with a reason; after a delete,
/// the deleted machine's uid is free again and the third machine gets it.
#[test]
fn jailed_machines_each_run_as_a_uid_of_their_own_which_delete_frees() {
    let Some(jail) = JailedSandbox::new() else {
        return;
    };
    let (sb, assets) = (&jail.sb, &jail.assets);
    let range = ["--jailer-uid-base", "910000", "--jailer-uid-count", "2"];
    let mut extra = vec!["--stop-timeout", "1"];
    extra.extend_from_slice(&range);
    let d = start_daemon_with(sb, assets, "60", "on", &extra);
    let spec = |name: &str| json!({"name": name, "vmm": "firecracker", "vcpu_count": 1, "mem_size_mib": 128});
    let mut ids = std::collections::HashMap::new();
    for name in ["a", "b", "c"] {
        let m = d.create(spec(name));
        ids.insert(name, m["id"].as_str().unwrap().to_string());
    }
    // The machine's VMM, once Firecracker runs its VM: (pid, uid).
    let running = |name: &str| -> (i32, u32) {
        let id = &ids[name];
        let r = d.call("POST", &format!("/machines/{name}/start?wait=false"), None);
        assert!(r.status < 300, "{name}: {}", r.body);
        let sock = sb.machines_dir().join(id).join("fc.sock");
        eventually(
            &format!("Firecracker to run {name}'s VM"),
            Duration::from_secs(30),
            || fc_get(&sock, "/").filter(|v| v["state"] == "Running"),
        );
        let pids = machine_vmm_pids(sb, id);
        assert_eq!(pids.len(), 1, "{name}: {pids:?}");
        let uid = ids_of(pids[0]).0;
        assert_jailed(pids[0], &sb.machines_dir().join(id), id, uid, 1, 128);
        (pids[0], uid)
    };
    let (_, ua) = running("a");
    let (pb, ub) = running("b");
    assert_ne!(ua, ub, "two live machines never share a uid");
    let mut both = [ua, ub];
    both.sort();
    assert_eq!(both, [910_000, 910_001], "both from the configured range");

    // The range is used up: c fails, saying why, and nothing of it runs.
    let r = d.call("POST", "/machines/c/start?wait=false", None);
    assert!(r.status < 300, "{}", r.body);
    let m = eventually("c to fail", Duration::from_secs(30), || {
        let m = d.call("GET", "/machines/c", None).body;
        (m["status"] == "failed").then_some(m)
    });
    let msg = m["error_message"].as_str().unwrap();
    assert!(
        msg.contains("no uid of the jail's range 910000–910001 is free"),
        "{msg}"
    );
    assert!(machine_vmm_pids(sb, &ids["c"]).is_empty());

    // b keeps its uid across a stop and a start (its files stay its own).
    let r = d.call("POST", "/machines/b/stop", None);
    assert_eq!(r.body["status"], "stopped", "{}", r.body);
    let (pb2, ub2) = running("b");
    assert_ne!(pb2, pb, "a new VMM");
    assert_eq!(ub2, ub, "the same uid");

    // Deleting a (running: its VMM is killed first) frees its uid: c now
    // gets it.
    assert_eq!(d.call("DELETE", "/machines/a?force=true", None).status, 204);
    let dir_a = sb.machines_dir().join(&ids["a"]);
    eventually("a's directory to go", Duration::from_secs(10), || {
        (!dir_a.exists()).then_some(())
    });
    assert!(machine_vmm_pids(sb, &ids["a"]).is_empty());
    let (_, uc) = running("c");
    assert_eq!(uc, ua, "the deleted machine's uid");

    for name in ["b", "c"] {
        let r = d.call("DELETE", &format!("/machines/{name}?force=true"), None);
        assert_eq!(r.status, 204, "{}", r.body);
    }
    for name in ["a", "b", "c"] {
        assert_nothing_left(sb, &ids[name]);
    }
}

/// Jailed with networking: a daemon SIGKILLed after making the machine's
/// namespace (the `network.after_tap` crash point) is succeeded by one
/// whose startup sweep removes a stray namespace of its own but keeps the
/// machine's, and whose run spawns the VMM into it; a VMM killed from
/// outside takes the namespace and veth with it; delete leaves nothing.
#[test]
fn a_jailed_machines_network_namespace_survives_a_daemon_crash_and_goes_with_its_vmm() {
    let Some(assets) = crash_prerequisites() else {
        return;
    };
    let ns = common::netns::NetNs::new("n");
    ns.enter();
    let sb = Sandbox::new();
    let _reaper = FirecrackerReaper(sb.machines_dir());
    let a = assets.display().to_string();
    let args = [
        "--default-vmm",
        "stub",
        "--assets-dir",
        &a,
        "--boot-timeout",
        "60",
        "--firecracker-jailer",
        "on",
        "--network",
        "on",
    ];
    let mut d = Daemon::start_with(&sb, &[("HYPERFLEET_CRASH_AT", "network.after_tap")], &args);
    d.create(json!({"name": "fc", "vmm": "firecracker"}));
    let _ = d.call("POST", "/machines/fc/start?wait=false", None);
    assert!(
        d.wait_exit(Duration::from_secs(20)).is_some(),
        "the crash point was not reached"
    );
    let made = ns.machine_namespaces();
    assert_eq!(made.len(), 1, "the machine's namespace exists: {made:?}");
    assert!(firecracker_pids(&sb).is_empty());

    // A stray namespace of this daemon's naming, whose TAP no machine has.
    let stray = made[0].rsplit_once('-').unwrap().0.to_string() + "-hf0badf00d";
    common::netns::sh(&["ip", "netns", "add", &stray]);
    let d = Daemon::start_with(&sb, &[], &args);
    let m = eventually("the VMM to run", Duration::from_secs(30), || {
        let m = d.call("GET", "/machines/fc", None).body;
        (firecracker_pids(&sb).len() == 1 && m["status"] == "starting").then_some(m)
    });
    // Until its API answers, the process may still be the jailer, not yet
    // in the machine's namespace nor running as the machine's uid.
    let sock = sb
        .machines_dir()
        .join(m["id"].as_str().unwrap())
        .join("fc.sock");
    eventually("Firecracker to run the VM", Duration::from_secs(30), || {
        fc_get(&sock, "/").filter(|v| v["state"] == "Running")
    });
    assert_eq!(
        ns.machine_namespaces(),
        made,
        "the stray one is swept, the machine's kept"
    );
    let machine_ns = assert_machine_netns(&ns, &m, firecracker_pids(&sb)[0]);

    // The VMM killed from outside: the run releases its network.
    // SAFETY: kill(2) with the pid of this test's Firecracker.
    unsafe {
        libc::kill(firecracker_pids(&sb)[0], libc::SIGKILL);
    }
    eventually("the machine to fail", Duration::from_secs(30), || {
        (d.call("GET", "/machines/fc", None).body["status"] == "failed").then_some(())
    });
    assert!(!machine_ns.exists(), "{} is left", machine_ns.display());
    assert_eq!(ns.hyperfleet_taps(), Vec::<String>::new(), "veth left");
    let id = m["id"].as_str().unwrap();
    // Nor does the dead VMM's jail, cgroup or sockets wait for a delete.
    let dir = sb.machines_dir().join(id);
    for left in ["jail", "fc.sock", "vsock.sock", "mem.base"] {
        assert!(
            !dir.join(left).exists(),
            "{left} is left after the VMM died"
        );
    }
    for c in cgroup_dirs(id) {
        assert!(
            !c.exists(),
            "the cgroup {} is left after the VMM died",
            c.display()
        );
    }
    assert_eq!(d.call("DELETE", "/machines/fc", None).status, 204);
    assert_nothing_left(&sb, id);
    assert_eq!(ns.machine_namespaces(), Vec::<String>::new());
}

/// A jailed, networked VMM `pid` runs in a network namespace of its
/// machine's own (not the daemon's, in test namespace `ns`), with the TAP
/// inside; on the daemon's side a veth named like the machine's TAP carries
/// the route to the guest. Returns the namespace's path.
fn assert_machine_netns(ns: &common::netns::NetNs, m: &Value, pid: i32) -> PathBuf {
    let tap = m["network"]["tap"].as_str().unwrap();
    let ip = m["network"]["ip"].as_str().unwrap();
    let daemon_ns = std::fs::metadata(format!("/run/netns/{}", ns.name)).unwrap();
    let path = PathBuf::from(format!("/run/netns/hfns-{:x}-{tap}", daemon_ns.ino()));
    let vmm_ns = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(
        vmm_ns.ino(),
        daemon_ns.ino(),
        "the VMM has left the daemon's namespace"
    );
    let machine_ns = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        vmm_ns.ino(),
        machine_ns.ino(),
        "the VMM is in its machine's namespace"
    );
    let name = path.file_name().unwrap().to_str().unwrap();
    let inner = common::netns::sh(&[
        "ip", "netns", "exec", name, "ip", "-o", "-d", "link", "show", "tap0",
    ]);
    assert!(
        inner.contains(" tun ") || inner.contains("tun type tap"),
        "{inner}"
    );
    // The TAP is the machine's uid's, the one its VMM runs as.
    let owner = common::netns::sh(&[
        "ip",
        "netns",
        "exec",
        name,
        "cat",
        "/sys/class/net/tap0/owner",
    ]);
    assert_eq!(owner.trim(), ids_of(pid).0.to_string(), "the TAP's owner");
    let host = ns.exec(&["ip", "-o", "-d", "link", "show", tap]);
    assert!(host.contains("veth"), "{host}");
    let route = ns.exec(&["ip", "route", "get", ip]);
    assert!(route.contains(&format!("dev {tap}")), "{route}");
    // No guest answers here (kvm_pvm), so the guest's address stands on the
    // namespace's loopback for a moment: the daemon's side reaches it over
    // the veth and the route, and the answer comes back through the
    // namespace's default route and the host's table.
    let on_lo = |op: &str| {
        let cidr = format!("{ip}/32");
        common::netns::sh(&[
            "ip", "netns", "exec", name, "ip", "addr", op, &cidr, "dev", "lo",
        ]);
    };
    on_lo("add");
    let ping = ns.try_exec(&["busybox", "ping", "-c", "1", "-W", "3", ip]);
    on_lo("del");
    assert!(
        ping,
        "the daemon's side cannot reach {ip} in the machine's namespace"
    );
    path
}

/// Unjailed, then jailed (as root).
#[test]
fn a_guest_that_never_answers_fails_with_the_boot_timeout_jailed_or_not_and_leaves_nothing() {
    boot_timeout_fails("off");
    if root() {
        boot_timeout_fails("on");
    }
}

fn boot_timeout_fails(jailer: &str) {
    let Some(assets) = prerequisites() else {
        return;
    };
    let sb = Sandbox::new();
    let _reaper = FirecrackerReaper(sb.machines_dir());
    let d = start_daemon(&sb, &assets, "3", jailer);
    let m = d.create(json!({"name": "mute", "vmm": "firecracker"}));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/mute/start", None);
    assert_eq!((r.status, r.code()), (500, "RUNTIME_ERROR"), "{}", r.body);
    let m = d.call("GET", "/machines/mute", None).body;
    assert_eq!(m["status"], "failed", "{m}");
    let msg = m["error_message"].as_str().unwrap();
    eprintln!("error_message: {msg}");
    assert!(
        msg.contains("never became ready") && msg.contains("3s"),
        "{msg}"
    );
    assert!(
        firecracker_pids(&sb).is_empty(),
        "the VMM of a failed boot is gone"
    );
    assert_eq!(d.call("DELETE", "/machines/mute", None).status, 204);
    assert_nothing_left(&sb, &id);
}

#[test]
fn health_lists_firecracker_and_the_binary_flag_is_honoured() {
    let sb = Sandbox::new();
    let d = Daemon::start_with(
        &sb,
        &[],
        &["--firecracker-binary", "/nonexistent/firecracker"],
    );
    let r = d.call_as("", "GET", "/health", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let fc = r.body["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["vmm"] == "firecracker")
        .cloned()
        .unwrap();
    assert_eq!(fc["available"], false, "{fc}");
    assert!(
        fc["detail"]
            .as_str()
            .unwrap()
            .contains("firecracker not found"),
        "{fc}"
    );
    drop(d);

    // With the real binary: on a host without hardware KVM the backend is
    // listed as unavailable and says why; `auto` never picks it there.
    let Some(assets) = prerequisites() else {
        return;
    };
    let assets = assets.display().to_string();
    let health = |args: &[&str]| {
        let mut all = vec!["--default-vmm", "stub", "--assets-dir", &assets];
        all.extend_from_slice(args);
        let d = Daemon::start_with(&sb, &[], &all);
        let r = d.call_as("", "GET", "/health", None);
        r.body["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["vmm"] == "firecracker")
            .cloned()
            .unwrap()
    };
    let fc = health(&["--firecracker-jailer", "off"]);
    let detail = fc["detail"].as_str().unwrap();
    assert!(
        detail.contains("Firecracker v") && detail.contains("not jailed"),
        "{fc}"
    );
    if fc["available"] == false {
        assert!(detail.contains("cannot boot here"), "{fc}");
    }
    if !root() {
        return;
    }
    // As root the jailer is on by default, and says how it confines VMMs.
    let fc = health(&[]);
    let detail = fc["detail"].as_str().unwrap();
    assert!(
        detail.contains("jailed by")
            && detail.contains("Jailer v1.12")
            && detail.contains("each machine as a uid (= gid) of its own from 900000–965535"),
        "{fc}"
    );
    // A missing jailer makes the backend unavailable rather than unjailed.
    let fc = health(&["--jailer-binary", "/nonexistent/jailer"]);
    assert_eq!(fc["available"], false, "{fc}");
    assert!(
        fc["detail"]
            .as_str()
            .unwrap()
            .contains("the jailer is on but /nonexistent/jailer was not found"),
        "{fc}"
    );
}

#[test]
fn jailer_flags_that_cannot_work_stop_the_daemon_with_a_reason() {
    let sb = Sandbox::new();
    let refuse = |args: &[&str], want: &str| {
        let out = std::process::Command::new(common::bin())
            .args(["serve", "--port", "0", "--proxy-port", "0", "--data-dir"])
            .arg(sb.path())
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    };
    // The one shared uid is gone; its flags say what replaced them.
    refuse(
        &["--firecracker-jailer", "off", "--jailer-uid", "64321"],
        "were replaced by --jailer-uid-base and --jailer-uid-count",
    );
    refuse(
        &[
            "--firecracker-jailer",
            "off",
            "--jailer-netns",
            "/run/netns/x",
        ],
        "--jailer-netns needs the jailer",
    );
    if root() {
        let jailed = |extra: &[&str], want: &str| {
            let mut args = vec!["--firecracker-jailer", "on"];
            args.extend_from_slice(extra);
            refuse(&args, want);
        };
        jailed(&["--jailer-uid-base", "0"], "not 0 (root)");
        jailed(&["--jailer-uid-count", "0"], "at least 1");
        jailed(
            &[
                "--jailer-uid-base",
                "4294967000",
                "--jailer-uid-count",
                "65536",
            ],
            "runs past the largest uid",
        );
        // Debian's nobody is 65534.
        jailed(
            &["--jailer-uid-base", "60000", "--jailer-uid-count", "10000"],
            "contains 65534, the uid of the account nobody",
        );
        refuse(
            &[
                "--firecracker-jailer",
                "on",
                "--network",
                "on",
                "--jailer-netns",
                "/run/netns/x",
            ],
            "cannot be combined with machine networking",
        );
    }
}

#[test]
fn an_orphan_jailed_vmm_is_swept_with_its_jail_and_cgroup() {
    let Some(jail) = JailedSandbox::new() else {
        return;
    };
    let (sb, assets) = (&jail.sb, &jail.assets);
    let mut d = start_daemon(sb, assets, "60", "on");
    let m = d.create(json!({"name": "lost", "vmm": "firecracker"}));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/lost/start?wait=false", None);
    assert!(r.status < 300, "{}", r.body);
    let sock = sb.machines_dir().join(&id).join("fc.sock");
    eventually("Firecracker to run the VM", Duration::from_secs(30), || {
        fc_get(&sock, "/").filter(|v| v["state"] == "Running")
    });
    assert!(cgroup_dirs(&id).iter().any(|c| c.exists()));
    // The daemon dies and its database is lost (a restore from an old
    // backup): the machine's VMM, jail and cgroup now belong to nothing.
    d.kill9();
    for f in ["hyperfleet.db", "hyperfleet.db-wal", "hyperfleet.db-shm"] {
        let _ = std::fs::remove_file(sb.path().join(f));
    }
    let d = start_daemon(sb, assets, "60", "on");
    assert_eq!(d.call("GET", "/machines/lost", None).status, 404);
    assert_nothing_left(sb, &id);
    assert!(
        d.log().contains("killing an orphan VMM process"),
        "{}",
        d.log()
    );
}

/// The crash scenario where no guest becomes ready: start (wait for the
/// VMM), stop, a start that fails at the boot timeout, delete — past every
/// crash point on the spawn, stop and release paths.
const NO_GUEST_POINTS: &[&str] = &[
    "prepare.before_effect",
    "prepare.after_effect",
    "spawn.after_intent",
    "jail.after_uid",
    "spawn.after_effect",
    "spawn.after_commit",
    "stop.after_intent",
    "stop.after_effect",
    "release.after_intent",
    "release.after_effect",
];

const NO_GUEST_SCENARIO: &[Step] = &[
    Step {
        req: "start?wait=false",
        want: Want::Accepted,
    },
    Step {
        req: "wait:starting",
        want: Want::Status("starting"),
    },
    Step {
        req: "stop",
        want: Want::Status("stopped"),
    },
    Step {
        req: "start",
        want: Want::Failed,
    },
    Step {
        req: "delete",
        want: Want::Gone,
    },
];

/// The assets, when a jailed crash test can run: the `failpoints` build
/// (required), the binaries and assets, and root.
fn crash_prerequisites() -> Option<PathBuf> {
    if !cfg!(feature = "failpoints") {
        panic!("MISSING: this test needs `--features failpoints` (the README's test command passes it)");
    }
    let assets = prerequisites()?;
    root().then_some(assets)
}

#[test]
fn sigkill_at_the_spawn_stop_and_release_boundaries_converges_with_jailed_firecracker() {
    let Some(assets) = crash_prerequisites() else {
        return;
    };
    let assets = assets.display().to_string();
    let args = [
        "--assets-dir",
        &assets,
        "--boot-timeout",
        "4",
        "--firecracker-jailer",
        "on",
    ];
    crash_firecracker(
        "firecracker, jailed, no guest",
        NO_GUEST_POINTS,
        NO_GUEST_SCENARIO,
        &args,
    );
}

/// The crash scenario with one Firecracker machine.
fn crash_firecracker(name: &str, points: &[&str], scenario: &[Step], args: &[&str]) {
    crash::run(&crash::Case {
        name,
        points,
        scenario,
        daemon_args: args,
        network: false,
        create: json!({"name": "crashy", "vmm": "firecracker"}),
        vmm_pids: &machine_vmm_pids,
        leftovers: &cgroups_left,
    });
}

#[test]
fn sigkill_at_every_step_boundary_converges_with_firecracker_guests() {
    let test = "the full crash scenario on Firecracker";
    let Some(args) = hardware_flags(test) else {
        return;
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Snapshots are QEMU's (and the stub's) for now.
    let points: Vec<&str> = crash::POINTS
        .iter()
        .copied()
        .filter(|p| !crash::is_snapshot_point(p))
        .collect();
    let scenario: Vec<Step> = crash::FULL_SCENARIO
        .iter()
        .copied()
        .filter(|s| s.want != crash::Want::Snapshot)
        .collect();
    crash_firecracker("firecracker", &points, &scenario, &args);
}

#[test]
fn a_firecracker_guest_runs_commands_and_moves_files() {
    let test = "exec and files on a Firecracker guest";
    let Some(args) = hardware_flags(test) else {
        return;
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sb = Sandbox::new();
    let _reaper = FirecrackerReaper(sb.machines_dir());
    let d = Daemon::start_with(&sb, &[], &args);
    let m = d.create(json!({"name": "real", "vmm": "firecracker", "mem_size_mib": 256}));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/real/start?timeout=120", None);
    assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());

    let r = d.call(
        "POST",
        "/machines/real/exec",
        Some(json!({"command": ["uname", "-a"]})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body["stdout"]
            .as_str()
            .unwrap()
            .starts_with("Linux real "),
        "{}",
        r.body
    );
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    d.put_file("real", "/root/blob.bin", data.clone());
    assert!(
        d.get_file("real", "/root/blob.bin") == data,
        "the file comes back unchanged"
    );

    let r = d.call("POST", "/machines/real/stop", None);
    assert_eq!(r.body["status"], "stopped", "{}", r.body);
    assert_eq!(d.call("DELETE", "/machines/real", None).status, 204);
    assert_nothing_left(&sb, &id);
}

/// The built asset set's kernel (Debian's cloud kernel) is judged able to
/// find Firecracker's devices through ACPI, the installed binary carries
/// the DSDT device id that judgement rests on, and `doctor` says so.
#[test]
fn the_asset_kernel_finds_firecrackers_devices_through_acpi() {
    let Some(assets) = prerequisites() else {
        return;
    };
    assert_eq!(firecracker_kernel(&assets), Ok(None));
    let bin = ["/usr/local/bin/firecracker"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("firecracker in /usr/local/bin");
    let image = std::fs::read(&bin).unwrap();
    assert!(
        image.windows(8).any(|w| w == b"LNRO0005"),
        "{} does not describe virtio-mmio devices in ACPI",
        bin.display()
    );
    // doctor reads the data directory's current asset set.
    let sb = Sandbox::new();
    std::fs::create_dir_all(sb.path().join("assets")).unwrap();
    std::os::unix::fs::symlink(
        std::path::absolute(&assets).unwrap(),
        sb.path().join("assets/current"),
    )
    .unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["doctor", "--data-dir"])
        .arg(sb.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("firecracker_kernel"))
        .unwrap_or_else(|| panic!("no firecracker_kernel check in:\n{text}"));
    assert!(line.contains("ok") && line.contains("ACPI"), "{line}");
}

/// `doctor` checks the uid range jailed VMMs would lease from, as the
/// daemon does at start, reading the same environment as `serve`.
#[test]
fn doctor_checks_the_jail_uid_range_serve_would_use() {
    let sb = Sandbox::new();
    let doctor = |env: &[(&str, &str)]| {
        let out = std::process::Command::new(common::bin())
            .args(["doctor", "--data-dir"])
            .arg(sb.path())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find(|l| l.starts_with("jailer_uids"))
            .unwrap_or_else(|| panic!("no jailer_uids check in:\n{text}"))
            .to_string()
    };
    let default = doctor(&[]);
    assert!(
        default.contains("ok") && default.contains("900000"),
        "{default}"
    );
    let nobody = doctor(&[
        ("HYPERFLEET_JAILER_UID_BASE", "65534"),
        ("HYPERFLEET_JAILER_UID_COUNT", "2"),
    ]);
    assert!(
        nobody.contains("WARN") && nobody.contains("nobody"),
        "{nobody}"
    );
}

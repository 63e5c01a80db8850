//! The backend against the real Firecracker and jailer binaries (v1.12.1 in
//! /usr/local/bin on the test hosts) and the guest asset set: what the API
//! socket reports after configuration (network interface included, on a
//! real TAP in a network namespace of the test's own), pause/resume, a full
//! snapshot loaded into a new process with another TAP, a diff snapshot of
//! that restored VM merged onto its base and loaded into a third, the boot
//! timeout,
//! the jailed VMM's uid, chroot and cgroup, and that stop and release leave
//! no process, socket, jail, cgroup or directory behind. The request bodies
//! themselves are checked without any binary.

use std::path::PathBuf;
use std::time::Duration;

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};

use super::*;
use crate::net::{netns, GuestNet};
use crate::store::MachineSpec;
use crate::vmm::process::{self, Liveness};
use crate::vmm::remove_dir_idempotent;
use serde_json::Value;

/// The asset set and binary, or `None` with a loud note (a panic in CI).
fn prerequisites() -> Option<PathBuf> {
    let assets = std::env::var_os("HF_TEST_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/hf-test-data/assets/current")
        });
    let ok = assets.join("manifest.json").exists() && which(Path::new("firecracker")).is_some();
    if ok {
        return Some(assets);
    }
    let msg = format!(
        "MISSING: the firecracker binary (PATH or /usr/local/bin) and guest assets in {}",
        assets.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}; CI must not skip");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

/// The assets, when the jailed tests can run: root and the jailer binary.
fn jailed_prerequisites() -> Option<PathBuf> {
    let assets = prerequisites()?;
    if !root("the jailer") {
        return None;
    }
    assert!(
        which(Path::new("jailer")).is_some(),
        "MISSING: the jailer binary (scripts/install-deps.sh installs it)"
    );
    Some(assets)
}

/// Whether the test may change the host as root (TAPs, namespaces, the
/// jailer); a loud note otherwise, and a failure in CI, which runs as root.
fn root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let msg = format!("MISSING: root, which {what} needs");
    if std::env::var_os("CI").is_some() {
        panic!("{msg}; CI runs the tests as root");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

/// Kills every process it was given when dropped, then removes their
/// cgroups, so a failing assertion never leaves a Firecracker behind.
#[derive(Default)]
struct Reaper(Vec<VmmIdentity>, Vec<PathBuf>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for id in &self.0 {
            let _ = process::signal(id, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
        for dir in &self.1 {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `ip <args>`, which must succeed.
fn ip(args: &[&str]) {
    let ok = std::process::Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ip {args:?} failed");
}

/// A network namespace of the test's own (`hft<tag><random>`), which the
/// calling thread enters: the TAPs the test makes and the VMMs it spawns
/// live there and vanish with it; with the machines' own namespaces (for
/// jailed VMMs, named after the TAPs), which go first. Deleted on drop.
struct TestNetNs(String, std::sync::Mutex<Vec<String>>);

impl TestNetNs {
    fn new(tag: &str) -> TestNetNs {
        let mut rnd = [0u8; 3];
        getrandom::fill(&mut rnd).unwrap();
        let name = format!("hft{tag}{:02x}{:02x}{:02x}", rnd[0], rnd[1], rnd[2]);
        ip(&["netns", "add", &name]);
        TestNetNs(name, Default::default())
    }

    fn enter(tag: &str) -> TestNetNs {
        let ns = Self::new(tag);
        let f = std::fs::File::open(ns.path()).unwrap();
        // SAFETY: setns on an open namespace file; it moves only this thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }

    /// A TAP device `<namespace name><suffix>` that `owner` may open, and
    /// the guest network a lease would give; for a backend whose VMMs run in
    /// a namespace of the machine's, the namespace, its veth link (the host
    /// end named like the TAP) and the TAP inside, as the run makes them.
    async fn tap(&self, fc: &FirecrackerVmm, suffix: &str, owner: u32, last_octet: u8) -> GuestNet {
        let tap = format!("{}{suffix}", self.0);
        let net = GuestNet {
            tap: tap.clone(),
            mac: format!("02:68:ac:1e:00:{last_octet:02x}"),
            ip: std::net::Ipv4Addr::new(172, 30, 0, last_octet),
            gateway: std::net::Ipv4Addr::new(172, 30, 0, last_octet - 1),
            prefix_len: 30,
            dns: vec![std::net::Ipv4Addr::new(1, 1, 1, 1)],
        };
        if fc.machine_netns() {
            self.1.lock().unwrap().push(netns::name_for(&tap));
            netns::ensure_link(&tap, net.ip).await.unwrap();
            netns::ensure_tap(&tap, net.gateway, 30, Some(owner))
                .await
                .unwrap();
            return net;
        }
        ip(&[
            "tuntap",
            "add",
            "dev",
            &tap,
            "mode",
            "tap",
            "user",
            &owner.to_string(),
        ]);
        net
    }
}

impl Drop for TestNetNs {
    fn drop(&mut self) {
        for ns in self.1.lock().unwrap().iter() {
            let _ = netns::remove(ns);
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn backend(assets: &Path, jailer: Option<JailerConfig>) -> FirecrackerVmm {
    FirecrackerVmm::new(FirecrackerConfig {
        binary: PathBuf::from("firecracker"),
        assets_root: assets.parent().unwrap().to_path_buf(),
        assets: assets.to_path_buf(),
        kernel: None,
        jailer,
    })
}

/// uid and gid (real, effective, saved, fs) of a live process.
fn ids_of(pid: i32) -> (String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    (field("Uid:"), field("Gid:"))
}

/// (device, inode) of a path, following symlinks (`/proc/<pid>/root`
/// included: readlink shows "/" for a process that pivot_root'ed in a mount
/// namespace of its own, but stat reaches the directory itself).
fn dev_ino(p: &Path) -> (u64, u64) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.dev(), m.ino())
}

/// A Firecracker machine's spec with these vCPUs and memory, everything
/// else as the record's defaults have it.
pub(super) fn spec(vcpus: u32, mib: u32) -> MachineSpec {
    serde_json::from_value(json!({
        "vmm": "firecracker",
        "vcpu_count": vcpus,
        "mem_size_mib": mib,
        "exposed_ports": [],
    }))
    .unwrap()
}

/// A machine under `dir`, whose id is `dir`'s own: tests running at once
/// must not share cgroup names.
fn launch(dir: &Path, restore: bool) -> LaunchSpec {
    let name = dir.file_name().unwrap().to_string_lossy();
    let id = format!(
        "mfc{}",
        name.replace(|c: char| !c.is_ascii_alphanumeric(), "")
    );
    LaunchSpec {
        paths: MachinePaths::new(dir, &id),
        machine_id: id,
        spec: spec(2, 192),
        name: "fc-one".into(),
        restore,
        network: None,
        uid: Some(JAIL_UID),
        base: None,
    }
}

/// The uid the tests' machines run as when jailed (the run would lease
/// one; the backend uses what the launch says, and only when jailed).
const JAIL_UID: u32 = 900_321;

/// Spawns the machine's VMM (for the reaper to kill if the test fails) and
/// brings its VM to running (configured, or loaded from the snapshot).
async fn started(fc: &FirecrackerVmm, l: &LaunchSpec, reaper: &mut Reaper) -> VmmIdentity {
    let vmm = fc.spawn(l).await.unwrap();
    reaper.0.push(vmm.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    fc.ensure_started(l, &vmm, deadline).await.unwrap();
    vmm
}

async fn get(l: &LaunchSpec, path: &str) -> Value {
    api::expect_ok(&FirecrackerVmm::api_socket(&l.paths), "GET", path, None)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_real_binary_is_configured_paused_snapshotted_restored_and_cleaned_up() {
    let Some(assets) = prerequisites() else {
        return;
    };
    // Networking needs root (a TAP); without it the flow runs without one.
    // SAFETY: geteuid has no preconditions.
    let netns = (unsafe { libc::geteuid() } == 0).then(|| TestNetNs::enter("fc"));
    let fc = backend(&assets, None);
    flow(&fc, &assets, netns.as_ref()).await;
}

#[tokio::test]
async fn the_jailed_binary_runs_unprivileged_in_its_chroot_and_cgroup_and_leaves_nothing() {
    let Some(assets) = jailed_prerequisites() else {
        return;
    };
    let netns = TestNetNs::enter("fj");
    let fc = backend(&assets, Some(JailerConfig::new("jailer".into())));
    assert!(fc.jailed());
    assert_eq!(fc.jail_uids(), Some(crate::vmm::uid::UidRange::default()));
    flow(&fc, &assets, Some(&netns)).await;
}

/// Everything the backend does to one machine, jailed or not; with a
/// namespace, the machine has a network on a real TAP.
async fn flow(fc: &FirecrackerVmm, assets: &Path, netns: Option<&TestNetNs>) {
    let machines = tempfile::tempdir().unwrap();
    let mut reaper = Reaper::default();
    let mut l = launch(machines.path(), false);
    // Jailed, the machine's uid opens its TAP; unjailed, the daemon's.
    let owner = if fc.jailed() { JAIL_UID } else { 0 };
    l.network = match netns {
        Some(ns) => Some(ns.tap(fc, "a", owner, 2).await),
        None => None,
    };
    let id = l.machine_id.clone();
    reaper.1 = fc.cgroups.dirs(&id);

    // prepare: a sparse raw copy of the rootfs, idempotent.
    fc.prepare(&l).await.unwrap();
    fc.prepare(&l).await.unwrap();
    let disk = std::fs::metadata(FirecrackerVmm::disk(&l.paths)).unwrap();
    let rootfs = std::fs::metadata(assets.join("rootfs.ext4")).unwrap();
    assert_eq!(disk.len(), rootfs.len());
    assert!(disk.blocks() * 512 < disk.len(), "the disk copy is sparse");

    // A stale API socket from a dead process does not stop a new one.
    std::fs::write(FirecrackerVmm::api_socket(&l.paths), b"stale").unwrap();
    let vmm = started(fc, &l, &mut reaper).await;
    // Idempotent: a started VM is left alone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    fc.ensure_started(&l, &vmm, deadline).await.unwrap();

    let mc = get(&l, "/machine-config").await;
    assert_eq!(
        (mc["vcpu_count"].as_u64(), mc["mem_size_mib"].as_u64()),
        (Some(2), Some(192))
    );
    // Jailed or not, Firecracker reports the host's paths (the jail mirrors
    // them).
    let cfg = get(&l, "/vm/config").await;
    let drives = cfg["drives"].as_array().unwrap();
    assert_eq!(drives.len(), 1, "{cfg}");
    assert_eq!(
        drives[0]["path_on_host"],
        FirecrackerVmm::disk(&l.paths).display().to_string()
    );
    assert_eq!(drives[0]["is_read_only"], false);
    assert_eq!(cfg["vsock"]["guest_cid"], 3);
    assert_eq!(
        cfg["vsock"]["uds_path"],
        FirecrackerVmm::vsock_socket(&l.paths).display().to_string()
    );
    let args = cfg["boot-source"]["boot_args"].as_str().unwrap();
    for want in [
        "hf.root=/dev/vda",
        "hf.hostname=fc-one",
        "hf.vsock_port=1024",
        "pci=off",
    ] {
        assert!(args.contains(want), "{args}");
    }
    assert!(cfg["boot-source"]["kernel_image_path"]
        .as_str()
        .unwrap()
        .ends_with("vmlinux"));
    let ifaces = cfg["network-interfaces"].as_array().unwrap();
    match &l.network {
        Some(net) => {
            assert_eq!(ifaces.len(), 1, "{cfg}");
            assert_eq!(ifaces[0]["iface_id"], "eth0");
            assert_eq!(ifaces[0]["host_dev_name"], vmm_tap(fc, net));
            assert_eq!(ifaces[0]["guest_mac"], net.mac.as_str());
            assert!(args.ends_with(&net.kernel_args()), "{args}");
        }
        None => assert!(ifaces.is_empty(), "{cfg}"),
    }
    assert!(FirecrackerVmm::log_file(&l.paths).exists());
    // The run finds the process by the machine directory in its command
    // line, jailed too.
    assert_eq!(
        process::find_by_marker(&l.paths.dir.display().to_string()),
        vec![vmm.clone()]
    );
    if fc.jailed() {
        assert_jailed(fc, &l, &vmm);
    }

    // Pause and resume change what Firecracker reports.
    assert_eq!(fc.run_state(&l).await.unwrap(), VmmRunState::Running);
    fc.pause(&l).await.unwrap();
    assert_eq!(get(&l, "/").await["state"], "Paused");
    assert_eq!(fc.run_state(&l).await.unwrap(), VmmRunState::Paused);
    fc.resume(&l).await.unwrap();
    assert_eq!(get(&l, "/").await["state"], "Running");

    // Where the guest cannot boot (no hardware KVM, or a kernel without
    // virtio-mmio command-line devices), readiness times out and says so.
    if fc.accel.0 != Accel::HardwareKvm {
        let e = fc
            .wait_ready(&l, &vmm, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, VmmError::BootTimeout { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("never became ready") && msg.contains("1s"),
            "{msg}"
        );
        assert!(msg.contains("cannot boot Firecracker guests"), "{msg}");
    }

    // A full snapshot leaves the VM paused with both files on disk (jailed:
    // linked out of the chroot).
    fc.save_state(&l, &Default::default()).await.unwrap();
    assert_eq!(get(&l, "/").await["state"], "Paused");
    assert!(FirecrackerVmm::state_file(&l.paths).exists());
    let mem = std::fs::metadata(FirecrackerVmm::mem_file(&l.paths)).unwrap();
    assert_eq!(mem.len(), 192 << 20);

    // Stop: the guest cannot answer here, so the process is killed at the
    // deadline; no process, socket, jail or cgroup remains.
    let path = fc.shutdown(&l, &vmm, Duration::from_secs(1)).await.unwrap();
    if fc.accel.0 != Accel::HardwareKvm {
        assert_eq!(path, StopPath::KilledAfterTimeout);
    }
    assert_eq!(process::probe(&vmm), Liveness::Gone);
    assert_nothing_left_running(fc, &l);

    // Restore into a new process, with another TAP (a restored machine
    // gets the TAP of its current lease): loaded and running with the same
    // configuration.
    let mut r = launch(machines.path(), true);
    r.network = match netns {
        Some(ns) => Some(ns.tap(fc, "b", owner, 6).await),
        None => None,
    };
    let vmm2 = started(fc, &r, &mut reaper).await;
    assert_ne!(vmm2.pid, vmm.pid);
    assert_eq!(get(&r, "/").await["state"], "Running");
    let mc = get(&r, "/machine-config").await;
    assert_eq!(
        (mc["vcpu_count"].as_u64(), mc["mem_size_mib"].as_u64()),
        (Some(2), Some(192))
    );
    assert!(FirecrackerVmm::vsock_socket(&r.paths).exists());
    if let Some(net) = &r.network {
        let cfg = get(&r, "/vm/config").await;
        let ifaces = cfg["network-interfaces"].as_array().unwrap();
        assert_eq!(ifaces.len(), 1, "{cfg}");
        assert_eq!(ifaces[0]["host_dev_name"], vmm_tap(fc, net), "{cfg}");
    }
    if fc.jailed() {
        assert_jailed(fc, &r, &vmm2);
    }
    // Restored with dirty pages tracked, from a base it keeps linked (the
    // run removes the consumed image once the guest is up).
    assert_eq!(get(&r, "/machine-config").await["track_dirty_pages"], true);
    remove_dir_idempotent(&r.paths.snapshot_dir())
        .await
        .unwrap();
    let base = FirecrackerVmm::base_file(&r.paths);
    assert!(
        layer::mapped_by(vmm2.pid, &base).unwrap(),
        "the VMM maps its base"
    );

    // Suspending it again writes a diff: the base back in the image, a
    // sparse layer beside it, merged by the next restore.
    let vmm3 = diff_then_merge(fc, &r, &vmm2, &mut reaper).await;
    assert_eq!(get(&r, "/").await["state"], "Running");
    let mc = get(&r, "/machine-config").await;
    assert_eq!(
        (mc["vcpu_count"].as_u64(), mc["mem_size_mib"].as_u64()),
        (Some(2), Some(192))
    );
    if fc.jailed() {
        assert_jailed(fc, &r, &vmm3);
    }

    fc.shutdown(&r, &vmm3, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(process::probe(&vmm3), Liveness::Gone);
    assert_nothing_left_running(fc, &r);
    fc.release(&r.paths).await.unwrap();
    assert!(!r.paths.dir.exists());
    fc.release(&r.paths).await.unwrap();
}

/// Suspends `vmm` (restored, so it has a base) with a diff snapshot, stops
/// it, and restores into a new process, which merges the layer first;
/// checks the layer and the merged result on the way.
async fn diff_then_merge(
    fc: &FirecrackerVmm,
    l: &LaunchSpec,
    vmm: &VmmIdentity,
    reaper: &mut Reaper,
) -> VmmIdentity {
    let p = &l.paths;
    let (mem, diff) = (FirecrackerVmm::mem_file(p), FirecrackerVmm::layer_file(p));
    fc.save_state(l, &Default::default()).await.unwrap();
    assert_eq!(get(l, "/").await["state"], "Paused");
    assert!(FirecrackerVmm::state_file(p).exists());
    assert!(
        !FirecrackerVmm::base_file(p).exists(),
        "the base moved into the image"
    );
    let base = std::fs::read(&mem).unwrap();
    let len = u64::from(l.spec.mem_size_mib) << 20;
    assert_eq!(base.len() as u64, len);
    let d = std::fs::metadata(&diff).unwrap();
    assert_eq!(d.len(), len);
    assert!(d.blocks() * 512 < len, "the layer is sparse");
    let regions = layer::data_regions(&std::fs::File::open(&diff).unwrap()).unwrap();
    let dirty: Vec<(u64, Vec<u8>)> = regions
        .iter()
        .map(|&(off, n)| {
            let mut b = vec![0; n as usize];
            std::fs::File::open(&diff)
                .unwrap()
                .read_exact_at(&mut b, off)
                .unwrap();
            (off, b)
        })
        .collect();
    fc.shutdown(l, vmm, Duration::from_millis(500))
        .await
        .unwrap();
    assert_nothing_left_running(fc, l);

    let mut r = l.clone();
    r.restore = true;
    let next = started(fc, &r, reaper).await;
    assert!(!diff.exists(), "the layer is merged and gone");
    // The merged base is the old base with exactly the layer's data over it.
    let mut want = base;
    for (off, b) in &dirty {
        want[*off as usize..*off as usize + b.len()].copy_from_slice(b);
    }
    assert!(std::fs::read(&mem).unwrap() == want, "merged image differs");
    eprintln!(
        "diff snapshot of {} MiB: {} regions, {} KiB of layer",
        l.spec.mem_size_mib,
        dirty.len(),
        dirty.iter().map(|d| d.1.len()).sum::<usize>() / 1024
    );
    next
}

/// The TAP name Firecracker is given: jailed, the one inside the machine's
/// namespace.
fn vmm_tap<'a>(fc: &FirecrackerVmm, net: &'a GuestNet) -> &'a str {
    if fc.machine_netns() {
        netns::INNER_TAP
    } else {
        &net.tap
    }
}

/// A jailed VMM runs as its machine's uid/gid, inside its chroot, in its
/// cgroup with the spec's limits; with a network, in the machine's own
/// network namespace.
fn assert_jailed(fc: &FirecrackerVmm, l: &LaunchSpec, vmm: &VmmIdentity) {
    let vmm_ns = dev_ino(Path::new(&format!("/proc/{}/ns/net", vmm.pid)));
    assert_ne!(vmm_ns, dev_ino(Path::new("/proc/thread-self/ns/net")));
    if let Some(net) = &l.network {
        assert_eq!(
            vmm_ns,
            dev_ino(&netns::path_for(&net.tap)),
            "its own namespace"
        );
    }
    let id = l.uid.unwrap().to_string();
    let all = format!("{id} {id} {id} {id}");
    assert_eq!(ids_of(vmm.pid), (all.clone(), all), "unprivileged");
    let root = jailer::chroot(&l.paths, fc.binary.as_ref().unwrap(), &l.machine_id);
    assert_eq!(
        dev_ino(Path::new(&format!("/proc/{}/root", vmm.pid))),
        dev_ino(&root),
        "the process's root is the chroot"
    );
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", vmm.pid)).unwrap();
    let want = format!("/{}/{}", jailer::PARENT_CGROUP, l.machine_id);
    let read = |dir: &Path, f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    match &fc.cgroups {
        Cgroups::V2 { .. } => {
            assert!(cg.lines().any(|x| x == format!("0::{want}")), "{cg}");
            let dir = &fc.cgroups.dirs(&l.machine_id)[0];
            assert_eq!(read(dir, "cpu.max").trim(), "200000 100000");
            assert_eq!(
                read(dir, "memory.max").trim(),
                ((192 + 64) << 20).to_string()
            );
        }
        Cgroups::V1 { .. } => {
            for c in ["cpu", "memory"] {
                assert!(
                    cg.lines().any(|x| x.ends_with(&want)
                        && x.split(':').nth(1).unwrap().split(',').any(|y| y == c)),
                    "{c}: {cg}"
                );
            }
            let dirs = fc.cgroups.dirs(&l.machine_id);
            assert_eq!(read(&dirs[0], "cpu.cfs_quota_us").trim(), "200000");
            assert_eq!(
                read(&dirs[1], "memory.limit_in_bytes").trim(),
                ((192 + 64) << 20).to_string()
            );
        }
        Cgroups::None => eprintln!("NOTE: this host has no cpu/memory cgroup controllers"),
    }
}

/// After the VMM is gone: no socket, and no jail or cgroup.
fn assert_nothing_left_running(fc: &FirecrackerVmm, l: &LaunchSpec) {
    for p in [
        FirecrackerVmm::api_socket(&l.paths),
        FirecrackerVmm::vsock_socket(&l.paths),
        jailer::jail_dir(&l.paths),
    ] {
        assert!(p.symlink_metadata().is_err(), "{} is left", p.display());
    }
    for d in fc.cgroups.dirs(&l.machine_id) {
        assert!(!d.exists(), "{} is left", d.display());
    }
}

#[tokio::test]
async fn a_jailed_vmm_joins_the_configured_network_namespace() {
    let Some(assets) = jailed_prerequisites() else {
        return;
    };
    // The namespace VMMs join; the test thread itself stays outside it.
    let vmms = TestNetNs::new("nj");
    let mut cfg = JailerConfig::new("jailer".into());
    cfg.netns = Some(vmms.path());
    let fc = backend(&assets, Some(cfg));
    let machines = tempfile::tempdir().unwrap();
    let l = launch(machines.path(), false);
    let mut reaper = Reaper(vec![], fc.cgroups.dirs(&l.machine_id));
    fc.prepare(&l).await.unwrap();
    let vmm = started(&fc, &l, &mut reaper).await;
    assert_eq!(
        dev_ino(Path::new(&format!("/proc/{}/ns/net", vmm.pid))),
        dev_ino(&vmms.path()),
        "the VMM is in the configured namespace"
    );
    assert_ne!(
        dev_ino(Path::new(&format!("/proc/{}/ns/net", vmm.pid))),
        dev_ino(Path::new("/proc/thread-self/ns/net")),
    );
    process::kill(&vmm).await.unwrap();
    fc.release(&l.paths).await.unwrap();
    for d in fc.cgroups.dirs(&l.machine_id) {
        assert!(!d.exists(), "{} is left", d.display());
    }
}

#[tokio::test]
async fn a_jailer_that_refuses_to_start_is_named_in_the_error() {
    let Some(assets) = jailed_prerequisites() else {
        return;
    };
    // The jailer runs only binaries whose name contains "firecracker".
    let machines = tempfile::tempdir().unwrap();
    let renamed = machines.path().join("vmm-binary");
    std::fs::copy(which(Path::new("firecracker")).unwrap(), &renamed).unwrap();
    let fc = FirecrackerVmm::new(FirecrackerConfig {
        binary: renamed,
        kernel: None,
        jailer: Some(JailerConfig::new("jailer".into())),
        assets_root: assets.parent().unwrap().to_path_buf(),
        assets,
    });
    let availability = fc.availability().unwrap_err();
    assert!(
        availability.contains("contains \"firecracker\""),
        "{availability}"
    );
    let l = launch(machines.path(), false);
    fc.prepare(&l).await.unwrap();
    let vmm = fc.spawn(&l).await.unwrap();
    let _reaper = Reaper(vec![vmm.clone()], fc.cgroups.dirs(&l.machine_id));
    let e = fc
        .wait_ready(&l, &vmm, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(e, VmmError::Exited { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("the jailer failed: ") && msg.contains("must contain \"firecracker\""),
        "{msg}"
    );
    fc.release(&l.paths).await.unwrap();
}

#[test]
fn the_requests_carry_the_spec_the_network_and_the_snapshot_paths() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = launch(dir.path(), false);
    let d = l.paths.dir.display().to_string();
    let reqs = FirecrackerVmm::start_requests(
        &l,
        Path::new("/a/vmlinux"),
        Path::new("/a/initramfs.cpio"),
        "console=ttyS0",
    );
    let paths: Vec<&str> = reqs.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        paths,
        ["/machine-config", "/boot-source", "/drives/root", "/vsock"]
    );
    assert_eq!(
        reqs[0].1,
        json!({"vcpu_count": 2, "mem_size_mib": 192, "track_dirty_pages": true})
    );
    assert_eq!(
        reqs[1].1,
        json!({"kernel_image_path": "/a/vmlinux", "initrd_path": "/a/initramfs.cpio", "boot_args": "console=ttyS0"})
    );
    assert_eq!(reqs[2].1["path_on_host"], format!("{d}/disk.ext4"));
    assert_eq!(
        reqs[3].1,
        json!({"guest_cid": 3, "uds_path": format!("{d}/vsock.sock")})
    );
    assert!(FirecrackerVmm::snapshot_load_body(&l)
        .get("network_overrides")
        .is_none());

    // With a network: the interface between the drives and vsock, in the
    // documented order, and the TAP as an override on load.
    l.network = Some(GuestNet {
        tap: "hfac1e0002".into(),
        mac: "02:68:ac:1e:00:02".into(),
        ip: std::net::Ipv4Addr::new(172, 30, 0, 2),
        gateway: std::net::Ipv4Addr::new(172, 30, 0, 1),
        prefix_len: 30,
        dns: vec![],
    });
    let reqs = FirecrackerVmm::start_requests(&l, Path::new("/k"), Path::new("/i"), "x");
    let paths: Vec<&str> = reqs.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        paths,
        [
            "/machine-config",
            "/boot-source",
            "/drives/root",
            "/network-interfaces/eth0",
            "/vsock"
        ]
    );
    assert_eq!(
        reqs[3].1,
        json!({"iface_id": "eth0", "host_dev_name": "hfac1e0002", "guest_mac": "02:68:ac:1e:00:02"})
    );
    let mut r = l.clone();
    r.restore = true;
    assert_eq!(
        FirecrackerVmm::snapshot_load_body(&r),
        json!({
            "snapshot_path": format!("{d}/snapshot/vm.state"),
            "mem_backend": {"backend_type": "File", "backend_path": format!("{d}/snapshot/mem")},
            "enable_diff_snapshots": true,
            "resume_vm": true,
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": "hfac1e0002"}],
        })
    );
    for (diff, kind, mem) in [(false, "Full", "mem"), (true, "Diff", "mem.diff")] {
        assert_eq!(
            FirecrackerVmm::snapshot_create_body(&l.paths, diff),
            json!({
                "snapshot_type": kind,
                "snapshot_path": format!("{d}/snapshot/vm.state"),
                "mem_file_path": format!("{d}/snapshot/{mem}"),
            })
        );
    }
    let [logger, metrics] = FirecrackerVmm::logging_requests(&l.paths);
    assert_eq!(
        (logger.0, logger.1["log_path"].as_str()),
        ("/logger", Some(format!("{d}/fc.log").as_str()))
    );
    assert_eq!(
        metrics.1,
        json!({"metrics_path": format!("{d}/fc.metrics")})
    );
}

#[tokio::test]
async fn a_rejected_configuration_and_a_dead_process_are_reported() {
    let Some(assets) = prerequisites() else {
        return;
    };
    let machines = tempfile::tempdir().unwrap();
    let fc = backend(&assets, None);
    let mut reaper = Reaper::default();
    let mut l = launch(machines.path(), false);
    // Firecracker itself refuses zero vCPUs; its fault message comes back.
    l.spec.vcpu_count = 0;
    fc.prepare(&l).await.unwrap();
    let vmm = fc.spawn(&l).await.unwrap();
    reaper.0.push(vmm.clone());
    let e = fc
        .wait_ready(&l, &vmm, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(e, VmmError::Control { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("PUT /machine-config") && msg.contains("HTTP 400"),
        "{msg}"
    );

    // A process that dies while the guest boots ends the wait at once.
    process::kill(&vmm).await.unwrap();
    let t0 = std::time::Instant::now();
    let e = fc
        .wait_ready(&l, &vmm, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(e, VmmError::Exited { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    fc.release(&l.paths).await.unwrap();
}

#[tokio::test]
async fn restoring_without_an_image_fails_before_spawning() {
    let machines = tempfile::tempdir().unwrap();
    let fc = backend(&machines.path().join("assets/current"), None);
    let l = launch(machines.path(), true);
    std::fs::create_dir_all(&l.paths.dir).unwrap();
    let e = fc.spawn(&l).await.unwrap_err().to_string();
    assert!(
        e.contains("suspend image is missing") || e.contains("not found"),
        "{e}"
    );
}

#[test]
fn availability_names_the_binary_and_refuses_hosts_without_hardware_kvm() {
    let dir = tempfile::tempdir().unwrap();
    let fc = FirecrackerVmm::new(FirecrackerConfig {
        binary: dir.path().join("no-such-firecracker"),
        assets_root: dir.path().to_path_buf(),
        assets: dir.path().join("current"),
        kernel: None,
        jailer: None,
    });
    let e = fc.availability().unwrap_err();
    assert!(e.contains("firecracker not found"), "{e}");

    let Some(assets) = prerequisites() else {
        return;
    };
    let fc = backend(&assets, None);
    match (fc.accel.0, fc.availability()) {
        (Accel::HardwareKvm, r) => assert!(r.unwrap().contains("Firecracker v"), "version named"),
        (_, r) => {
            let e = r.unwrap_err();
            assert!(
                e.contains("Firecracker v") && e.contains("cannot boot here"),
                "{e}"
            );
        }
    }
}

#[test]
fn boot_args_carry_the_agent_settings() {
    let Some(assets) = prerequisites() else {
        return;
    };
    let set = AssetSet::load(&assets).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let args = FirecrackerVmm::boot_args(&launch(dir.path(), false), &set);
    assert!(
        args.starts_with("console=ttyS0 reboot=k panic=1 pci=off "),
        "{args}"
    );
    assert!(
        args.contains(&format!("hf.modules={}", set.module_list())),
        "{args}"
    );
    assert!(args.ends_with("hf.vsock_port=1024"), "{args}");
}

/// Size on disk and time of a full snapshot (fresh boot) and of a diff one
/// (restored VM suspended again), plus the merge, at 256 MiB and 1 GiB.
/// Measurement only: `cargo test -p hyperfleet-core --lib
/// firecracker::tests::measure -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn measure_full_and_diff_snapshots() {
    let Some(assets) = prerequisites() else {
        return;
    };
    let fc = backend(&assets, None);
    let on_disk = |p: &Path| std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0);
    for mib in [256u32, 1024] {
        let machines = tempfile::tempdir().unwrap();
        let mut reaper = Reaper::default();
        let mut l = launch(machines.path(), false);
        l.spec.mem_size_mib = mib;
        fc.prepare(&l).await.unwrap();
        // Starts (or restores) the VM, lets the guest kernel run and touch
        // memory for a while, suspends it and stops it; the suspend's time
        // and the size on disk of the memory file it wrote.
        let mut suspend = async |l: &LaunchSpec, written: PathBuf| {
            let vmm = started(&fc, l, &mut reaper).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let t = std::time::Instant::now();
            fc.save_state(l, &Default::default()).await.unwrap();
            let took = t.elapsed();
            fc.shutdown(l, &vmm, Duration::from_millis(200))
                .await
                .unwrap();
            (took, on_disk(&written))
        };
        let (full_t, full_disk) = suspend(&l, FirecrackerVmm::mem_file(&l.paths)).await;
        let mut r = l.clone();
        r.restore = true;
        let (diff_t, diff_disk) = suspend(&r, FirecrackerVmm::layer_file(&r.paths)).await;
        let t = std::time::Instant::now();
        FirecrackerVmm::merge_layer(&r.paths).unwrap();
        let merge_t = t.elapsed();
        eprintln!(
            "MEASURE {mib} MiB: full snapshot {:.0} ms, {} MiB on disk; \
             diff snapshot {:.0} ms, {} KiB on disk; merge {:.1} ms",
            full_t.as_secs_f64() * 1000.0,
            full_disk >> 20,
            diff_t.as_secs_f64() * 1000.0,
            diff_disk >> 10,
            merge_t.as_secs_f64() * 1000.0
        );
        fc.release(&r.paths).await.unwrap();
    }
}

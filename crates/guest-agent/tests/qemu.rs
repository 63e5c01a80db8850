//! The static agent as PID 1 of a real QEMU microvm guest, over virtio-serial.
//!
//! Needs `qemu-system-x86_64` (with `qboot.rom`) and a test guest built by
//! `hyperfleet assets build` (kernel + initramfs in `target/hf-test-data/assets/current`, or the directory named
//! by `HF_TEST_GUEST_DIR`). Skips loudly when either is absent. Runs under TCG: slow but works
//! on hosts without usable hardware virtualisation.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hyperfleet_agent_proto::{
    AgentClient, ConnectOptions, ExecRequest, NetworkIdentity, RefreshRequest, WriteOptions,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

struct Vm {
    qemu: Child,
    dir: tempfile::TempDir,
}

impl Vm {
    fn sock(&self) -> PathBuf {
        self.dir.path().join("ctl.sock")
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    async fn connect(&self, timeout: Duration) -> AgentClient {
        // The socket file appears at bind(), a moment before QEMU listens.
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(self.sock()).await {
                Ok(s) => break s,
                Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("connect to the chardev socket: {e}"),
            }
        };
        let opts = ConnectOptions {
            handshake_timeout: timeout,
            retry_interval: Duration::from_millis(500),
            ..ConnectOptions::default()
        };
        match AgentClient::connect_with(s, opts).await {
            Ok(c) => c,
            Err(e) => panic!("handshake failed: {e}\nconsole:\n{}", self.console()),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

/// The guest assets built by `hyperfleet assets build` (scripts/test.sh
/// builds them into `target/hf-test-data/assets/current`), or the directory
/// named by `HF_TEST_GUEST_DIR`. In CI they must exist.
fn guest_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("HF_TEST_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/hf-test-data/assets/current")
        });
    let found = dir.join("vmlinux").exists() && dir.join(INITRD).exists();
    if !found && std::env::var_os("CI").is_some() {
        panic!(
            "MISSING: guest assets in {} (scripts/test.sh builds them); CI must not skip",
            dir.display()
        );
    }
    found.then_some(dir)
}

const INITRD: &str = "initramfs.cpio";

fn qboot() -> Option<&'static str> {
    ["/usr/share/qemu/qboot.rom", "/usr/share/seabios/qboot.rom"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

fn boot(guest: &Path, extra_cmdline: &str, extra_args: &[String]) -> Vm {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let khz = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(2_000_000);
    let cmdline = format!(
        "console=ttyS0 quiet reboot=t panic=-1 8250.nr_uarts=1 i8042.noaux i8042.nomux \
         i8042.nopnp i8042.dumbkbd tsc=reliable no_timer_check init_on_alloc=0 \
         cryptomgr.notests random.trust_cpu=on mitigations=off tsc_early_khz={khz} lpj={} \
         hf.modules=virtio_mmio,virtio_console,virtio_blk,virtio_net,button,evdev hf.log=info {extra_cmdline}",
        khz * 4
    );
    let qemu = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "microvm",
            "-accel",
            "tcg",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-no-reboot", "-m", "256", "-smp", "1"])
        .args(["-bios", qboot().unwrap()])
        .arg("-kernel")
        .arg(guest.join("vmlinux"))
        .arg("-initrd")
        .arg(guest.join(INITRD))
        .args(["-append", &cmdline])
        .arg("-serial")
        .arg(format!("file:{}", dir.path().join("console.log").display()))
        .arg("-chardev")
        .arg(format!(
            "socket,id=ctl,path={},server=on,wait=off",
            sock.display()
        ))
        .args(["-device", "virtio-serial-device"])
        .args(["-device", "virtserialport,chardev=ctl,name=hf.agent"])
        // A user-mode network that only exists inside QEMU: the guest's address is checked,
        // no traffic is sent.
        .args(["-netdev", "user,id=n0,restrict=on"])
        .args(["-device", "virtio-net-device,netdev=n0"])
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn qemu");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "qemu did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Vm { qemu, dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_in_a_qemu_guest() {
    let (Some(guest), Some(_)) = (guest_dir(), qboot()) else {
        eprintln!(
            "SKIPPED agent_in_a_qemu_guest: needs qemu-system-x86_64 with qboot.rom and a guest \
             from `hyperfleet assets build` (scripts/test.sh builds it; or HF_TEST_GUEST_DIR)"
        );
        return;
    };
    let t0 = Instant::now();
    let mut vm = boot(
        &guest,
        "hf.hostname=vm1 hf.ip=10.0.2.15/24 hf.gw=10.0.2.2 hf.dns=10.0.2.3",
        &[],
    );
    // Connected before the guest is up: QEMU buffers the hello until the agent opens the port.
    let c = vm.connect(Duration::from_secs(60)).await;
    eprintln!("guest agent answered {:?} after start", t0.elapsed());
    let info = c.agent_info().clone();
    assert!(info.pid1);
    assert_eq!(info.hostname, "vm1");
    assert!(info.kernel_release.contains("cloud-amd64"), "{info:?}");

    let out = c
        .exec_collect(ExecRequest::new(["uname", "-a"]), 1 << 16)
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Linux vm1 "));

    // Network configured from the command line.
    let out = c
        .exec_collect(
            ExecRequest::new(["sh", "-c", "ip addr; ip route; cat /etc/resolv.conf"]),
            1 << 16,
        )
        .await
        .unwrap();
    let net = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        net.contains("eth0") && net.contains("10.0.2.15/24"),
        "{net}"
    );
    assert!(net.contains("default via 10.0.2.2"), "{net}");
    assert!(net.contains("nameserver 10.0.2.3"), "{net}");
    assert!(net.contains("127.0.0.1/8"), "{net}");

    // Files through virtio-serial, hashed on both sides.
    let mut gen = Gen::new(4 << 20, 11);
    c.write_file("/tmp/blob", WriteOptions::default(), &mut gen)
        .await
        .unwrap();
    let want = gen.digest();
    let out = c
        .exec_collect(ExecRequest::new(["sha256sum", "/tmp/blob"]), 1024)
        .await
        .unwrap();
    let guest_hash = String::from_utf8_lossy(&out.stdout).into_owned();
    let hex: String = want.iter().map(|b| format!("{b:02x}")).collect();
    assert!(guest_hash.starts_with(&hex), "{guest_hash} vs {hex}");
    {
        let mut r = c.read_file("/tmp/blob", None).await.unwrap();
        let mut v = Vec::new();
        r.read_to_end(&mut v).await.unwrap();
        assert_eq!(<[u8; 32]>::from(Sha256::digest(&v)), want);
    }

    // The daemon dies mid-transfer; a new one connects to the same port.
    let mut r = c.read_file("/tmp/blob", None).await.unwrap();
    let mut part = vec![0u8; 200_000];
    r.read_exact(&mut part).await.unwrap();
    // Every handle holds the connection; dropping the last one closes the socket.
    drop(r);
    drop(c);
    let c = vm.connect(Duration::from_secs(20)).await;
    assert_eq!(c.agent_info().boot_id, info.boot_id, "same boot, no reboot");
    let out = c
        .exec_collect(ExecRequest::new(["echo", "still here"]), 1024)
        .await
        .unwrap();
    assert_eq!(out.stdout, b"still here\n");
    c.ping().await.unwrap();

    // Clean power-off: QEMU exits by itself.
    c.poweroff().await.unwrap();
    wait_for_poweroff(&mut vm).await;
}

async fn wait_for_poweroff(vm: &mut Vm) {
    let t1 = Instant::now();
    loop {
        if let Some(st) = vm.qemu.try_wait().unwrap() {
            assert!(st.success(), "qemu exit {st:?}");
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(20),
            "guest did not power off\nconsole:\n{}",
            vm.console()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let console = vm.console();
    assert!(!console.contains("Kernel panic"), "{console}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_root_to_a_disk_in_a_qemu_guest() {
    let (Some(guest), Some(_)) = (guest_dir(), qboot()) else {
        eprintln!("SKIPPED switch_root_to_a_disk_in_a_qemu_guest: no qemu or test guest");
        return;
    };
    assert!(
        guest.join("rootfs.ext4").exists(),
        "the guest assets in {} have no rootfs.ext4",
        guest.display()
    );
    let scratch = tempfile::tempdir().unwrap();
    let disk = scratch.path().join("root.ext4");
    // A sparse copy: the base image is 512 MiB apparent, a few MiB used.
    let cp = Command::new("cp")
        .arg("--sparse=always")
        .arg(guest.join("rootfs.ext4"))
        .arg(&disk)
        .status()
        .unwrap();
    assert!(cp.success());
    let mut vm = boot(
        &guest,
        "hf.root=/dev/vda",
        &[
            "-drive".into(),
            format!("id=d0,file={},format=raw,if=none", disk.display()),
            "-device".into(),
            "virtio-blk-device,drive=d0".into(),
        ],
    );
    let c = vm.connect(Duration::from_secs(60)).await;
    let out = c
        .exec_collect(
            ExecRequest::new([
                "sh",
                "-c",
                "test -e /.hf-initramfs || echo root disk; grep -E ' / | /proc | /dev | /tmp ' /proc/mounts",
            ]),
            1 << 16,
        )
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with("root disk\n"),
        "{text}\nconsole:\n{}",
        vm.console()
    );
    assert!(text.contains("/dev/vda / ext4 rw"), "{text}");
    for m in [
        "proc /proc proc",
        "devtmpfs /dev devtmpfs",
        "tmpfs /tmp tmpfs",
    ] {
        assert!(text.contains(m), "missing {m:?} in {text}");
    }
    // The initramfs is gone from view: its marker file is not on the disk.
    assert!(c.stat("/.hf-initramfs").await.unwrap_err().is_not_found());
    // A refresh on a disk root: files on the disk, the boot id mount, then a clean power-off.
    let boot_id = hyperfleet_agent_proto::random_boot_id().unwrap();
    let machine_id = hyperfleet_agent_proto::random_machine_id().unwrap();
    let r = c
        .refresh(
            RefreshRequest::new_machine()
                .unwrap()
                .hostname("disk1")
                .machine_id(machine_id.clone())
                .boot_id(boot_id.clone()),
        )
        .await
        .unwrap();
    assert!(r.is_ok(), "{r:#?}");
    assert_eq!(r.boot_id.as_deref(), Some(boot_id.as_str()));
    assert_eq!(
        guest_sh(&c, "cat /etc/machine-id /etc/hostname").await,
        format!("{machine_id}\ndisk1\n")
    );
    c.write_file(
        "/root/written",
        WriteOptions {
            sync: true,
            ..WriteOptions::default()
        },
        &b"persist"[..],
    )
    .await
    .unwrap();
    c.poweroff().await.unwrap();
    wait_for_poweroff(&mut vm).await;
    // Unmounted cleanly: the filesystem needs no recovery.
    let fsck = Command::new("e2fsck").arg("-n").arg(&disk).output();
    if let Ok(o) = fsck {
        assert!(
            o.status.success(),
            "e2fsck: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    // The refreshed identity was written to the disk.
    let cat = Command::new("debugfs")
        .args(["-R", "cat /etc/machine-id"])
        .arg(&disk)
        .output();
    if let Ok(o) = cat {
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            format!("{machine_id}\n")
        );
    }
}

async fn guest_sh(c: &AgentClient, script: &str) -> String {
    let out = c
        .exec_collect(ExecRequest::new(["sh", "-c", script]), 1 << 16)
        .await
        .unwrap();
    assert_eq!(
        out.exit_code,
        Some(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn host_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The guest's wall clock minus the host's, in milliseconds: the modification time of a file
/// the guest writes now, against the middle of the host's round trip.
async fn clock_offset_ms(c: &AgentClient) -> i64 {
    let t0 = host_ms();
    c.write_file("/tmp/clock-probe", WriteOptions::default(), &b"x"[..])
        .await
        .unwrap();
    let t1 = host_ms();
    let st = c.stat("/tmp/clock-probe").await.unwrap();
    st.mtime_ms - (t0 + t1) / 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_in_a_qemu_guest() {
    let (Some(guest), Some(_)) = (guest_dir(), qboot()) else {
        eprintln!("SKIPPED refresh_in_a_qemu_guest: no qemu or test guest");
        return;
    };
    let mut vm = boot(
        &guest,
        "hf.hostname=vm1 hf.ip=10.0.2.15/24 hf.gw=10.0.2.2 hf.dns=10.0.2.3",
        &[],
    );
    let c = vm.connect(Duration::from_secs(60)).await;
    assert!(
        c.protocol_version() >= hyperfleet_agent_proto::REFRESH_PROTOCOL_VERSION,
        "the agent in {} speaks protocol {}: rebuild the guest assets with the current agent \
         (scripts/build-agent.sh, then `hyperfleet assets build --agent …`)",
        guest.display(),
        c.protocol_version()
    );
    let old_mac = guest_sh(&c, "cat /sys/class/net/eth0/address").await;
    let old_boot_id = guest_sh(&c, "cat /proc/sys/kernel/random/boot_id").await;
    assert_eq!(
        old_boot_id.trim(),
        c.agent_info().boot_id.as_deref().unwrap()
    );
    let ping = "ping -c 1 -W 3 10.0.2.2 >/dev/null 2>&1 && echo reachable || echo unreachable";
    let reach_before = guest_sh(&c, ping).await;
    let urandom = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let old_random = guest_sh(&c, urandom).await;
    assert_eq!(old_random.len(), 64, "{old_random:?}");

    // A clock far behind, as after a long time saved in a memory image.
    guest_sh(&c, "date -u -s '2001-09-09 01:46:40' >/dev/null").await;
    let behind = clock_offset_ms(&c).await;
    assert!(behind < -1_000_000_000, "guest clock offset {behind} ms");
    // A session running "before the snapshot".
    let h = c.exec(ExecRequest::new(["sleep", "1000"])).await.unwrap();

    let mac = "52:54:00:12:34:99";
    let boot_id = hyperfleet_agent_proto::random_boot_id().unwrap();
    let machine_id = hyperfleet_agent_proto::random_machine_id().unwrap();
    let req = RefreshRequest::new_machine()
        .unwrap()
        .network(NetworkIdentity {
            gateway: Some("10.0.2.2".parse().unwrap()),
            mac: Some(mac.parse().unwrap()),
            dns: vec!["10.0.2.4".parse().unwrap()],
            ..NetworkIdentity::new("10.0.2.16".parse().unwrap(), 24)
        })
        .hostname("vm2")
        .machine_id(machine_id.clone())
        .boot_id(boot_id.clone());
    let t0 = Instant::now();
    let report = c.refresh(req.clone()).await.unwrap();
    let took = t0.elapsed();
    eprintln!(
        "refresh took {took:?} (agent: {} ms): {report:#?}",
        report.duration_ms
    );
    assert!(report.is_ok(), "{report:#?}");
    assert_eq!(report.steps.len(), 10, "{report:#?}");
    assert_eq!(report.sessions_dropped, 1);
    assert!(report.clock_step_ns.unwrap() > 1_000_000_000_000_000_000 / 2);
    assert!(matches!(
        h.wait().await,
        Err(hyperfleet_agent_proto::Error::Cancelled)
    ));

    let offset = clock_offset_ms(&c).await;
    eprintln!("guest clock offset after refresh: {offset} ms");
    assert!(offset.abs() < 1000, "guest clock off by {offset} ms");
    let new_mac = guest_sh(&c, "cat /sys/class/net/eth0/address").await;
    assert_eq!(new_mac.trim(), mac);
    assert_ne!(new_mac, old_mac);
    let net = guest_sh(&c, "ip addr show eth0; ip route; cat /etc/resolv.conf").await;
    assert!(net.contains("inet 10.0.2.16/24"), "{net}");
    assert!(!net.contains("10.0.2.15"), "{net}");
    assert!(net.contains("default via 10.0.2.2"), "{net}");
    assert!(net.contains("nameserver 10.0.2.4"), "{net}");
    assert!(net.contains(&format!("link/ether {mac}")), "{net}");
    assert_eq!(guest_sh(&c, "uname -n").await, "vm2\n");
    assert_eq!(guest_sh(&c, "cat /etc/hostname").await, "vm2\n");
    assert_eq!(
        guest_sh(&c, "cat /etc/machine-id").await,
        format!("{machine_id}\n")
    );
    let new_boot_id = guest_sh(&c, "cat /proc/sys/kernel/random/boot_id").await;
    assert_eq!(new_boot_id, format!("{boot_id}\n"));
    assert_ne!(new_boot_id, old_boot_id);
    // Traffic flows with the new MAC and address (QEMU's user network answers its gateway).
    let reach_after = guest_sh(&c, ping).await;
    eprintln!("gateway before: {reach_before}, after: {reach_after}");
    if reach_before == "reachable\n" {
        assert_eq!(reach_after, "reachable\n");
    }
    let new_random = guest_sh(&c, urandom).await;
    assert_eq!(new_random.len(), 64, "{new_random:?}");
    assert_ne!(new_random, old_random);
    // The kernel's own boot id file is covered, not written: writes fail.
    let out = c
        .exec_collect(
            ExecRequest::new(["sh", "-c", "echo x > /proc/sys/kernel/random/boot_id"]),
            1024,
        )
        .await
        .unwrap();
    assert_ne!(out.exit_code, Some(0));

    // Twice is safe.
    let again = c.refresh(req.stamp_clock()).await.unwrap();
    eprintln!("second refresh: {} ms in the agent", again.duration_ms);
    assert!(again.is_ok(), "{again:#?}");
    assert_eq!(again.sessions_dropped, 0);
    assert_eq!(again.boot_id.as_deref(), Some(boot_id.as_str()));
    // The clock-only form, as after every resume.
    let resume = c.refresh(RefreshRequest::resume().unwrap()).await.unwrap();
    assert!(resume.is_ok(), "{resume:#?}");
    assert_eq!(resume.steps.len(), 2);
    assert!(resume.clock_step_ns.unwrap().abs() < 1_000_000_000);
    // A new connection's hello shows the new identity.
    drop(c);
    let c = vm.connect(Duration::from_secs(20)).await;
    assert_eq!(c.agent_info().hostname, "vm2");
    assert_eq!(c.agent_info().boot_id.as_deref(), Some(boot_id.as_str()));
    c.poweroff().await.unwrap();
    wait_for_poweroff(&mut vm).await;
}

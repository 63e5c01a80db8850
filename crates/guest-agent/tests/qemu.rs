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
use hyperfleet_agent_proto::{AgentClient, ConnectOptions, ExecRequest, WriteOptions};
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
}

//! The backend against the real Firecracker binary (v1.12.1 in
//! /usr/local/bin on the test hosts) and the guest asset set: what the API
//! socket reports after configuration, pause/resume, a full snapshot loaded
//! into a new process, the boot timeout, and that stop and release leave no
//! process, socket or directory behind.

use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::store::MachineSpec;

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

/// Kills every process it was given when dropped, so a failing assertion
/// never leaves a Firecracker behind.
#[derive(Default)]
struct Reaper(Vec<VmmIdentity>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for id in &self.0 {
            let _ = process::signal(id, libc::SIGKILL);
        }
    }
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

fn launch(dir: &Path, restore: bool) -> LaunchSpec {
    let id = "mfcbackendtest01".to_string();
    LaunchSpec {
        paths: MachinePaths::new(dir, &id),
        machine_id: id,
        spec: spec(2, 192),
        name: "fc-one".into(),
        restore,
        network: None,
    }
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
    let machines = tempfile::tempdir().unwrap();
    let fc = FirecrackerVmm::new(FirecrackerConfig {
        binary: PathBuf::from("firecracker"),
        assets_root: assets.parent().unwrap().to_path_buf(),
        assets: assets.clone(),
    });
    let mut reaper = Reaper::default();
    let l = launch(machines.path(), false);

    // prepare: a sparse raw copy of the rootfs, idempotent.
    fc.prepare(&l).await.unwrap();
    fc.prepare(&l).await.unwrap();
    let disk = std::fs::metadata(FirecrackerVmm::disk(&l.paths)).unwrap();
    let rootfs = std::fs::metadata(assets.join("rootfs.ext4")).unwrap();
    assert_eq!(disk.len(), rootfs.len());
    use std::os::unix::fs::MetadataExt;
    assert!(disk.blocks() * 512 < disk.len(), "the disk copy is sparse");

    // A stale API socket from a dead process does not stop a new one.
    std::fs::write(FirecrackerVmm::api_socket(&l.paths), b"stale").unwrap();
    let vmm = fc.spawn(&l).await.unwrap();
    reaper.0.push(vmm.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    fc.ensure_started(&l, &vmm, deadline).await.unwrap();
    // Idempotent: a started VM is left alone.
    fc.ensure_started(&l, &vmm, deadline).await.unwrap();

    let mc = get(&l, "/machine-config").await;
    assert_eq!(
        (mc["vcpu_count"].as_u64(), mc["mem_size_mib"].as_u64()),
        (Some(2), Some(192))
    );
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
    assert!(FirecrackerVmm::log_file(&l.paths).exists());

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

    // A full snapshot leaves the VM paused with both files on disk.
    fc.save_state(&l).await.unwrap();
    assert_eq!(get(&l, "/").await["state"], "Paused");
    assert!(FirecrackerVmm::state_file(&l.paths).exists());
    let mem = std::fs::metadata(FirecrackerVmm::mem_file(&l.paths)).unwrap();
    assert_eq!(mem.len(), 192 << 20);

    // Stop: the guest cannot answer here, so the process is killed at the
    // deadline; no process and no sockets remain.
    let path = fc.shutdown(&l, &vmm, Duration::from_secs(1)).await.unwrap();
    if fc.accel.0 != Accel::HardwareKvm {
        assert_eq!(path, StopPath::KilledAfterTimeout);
    }
    assert_eq!(process::probe(&vmm), Liveness::Gone);
    assert!(!FirecrackerVmm::api_socket(&l.paths).exists());
    assert!(!FirecrackerVmm::vsock_socket(&l.paths).exists());

    // Restore into a new process: loaded and running with the same config.
    let r = launch(machines.path(), true);
    let vmm2 = fc.spawn(&r).await.unwrap();
    reaper.0.push(vmm2.clone());
    assert_ne!(vmm2.pid, vmm.pid);
    fc.ensure_started(
        &r,
        &vmm2,
        tokio::time::Instant::now() + Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert_eq!(get(&r, "/").await["state"], "Running");
    let mc = get(&r, "/machine-config").await;
    assert_eq!(
        (mc["vcpu_count"].as_u64(), mc["mem_size_mib"].as_u64()),
        (Some(2), Some(192))
    );
    assert!(FirecrackerVmm::vsock_socket(&r.paths).exists());

    fc.shutdown(&r, &vmm2, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(process::probe(&vmm2), Liveness::Gone);
    fc.release(&r.paths).await.unwrap();
    assert!(!r.paths.dir.exists());
    fc.release(&r.paths).await.unwrap();
}

#[tokio::test]
async fn a_rejected_configuration_and_a_dead_process_are_reported() {
    let Some(assets) = prerequisites() else {
        return;
    };
    let machines = tempfile::tempdir().unwrap();
    let fc = FirecrackerVmm::new(FirecrackerConfig {
        binary: PathBuf::from("firecracker"),
        assets_root: assets.parent().unwrap().to_path_buf(),
        assets,
    });
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
    let fc = FirecrackerVmm::new(FirecrackerConfig {
        binary: PathBuf::from("firecracker"),
        assets_root: machines.path().join("assets"),
        assets: machines.path().join("assets/current"),
    });
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
    });
    let e = fc.availability().unwrap_err();
    assert!(e.contains("firecracker not found"), "{e}");

    let Some(assets) = prerequisites() else {
        return;
    };
    let fc = FirecrackerVmm::new(FirecrackerConfig {
        binary: PathBuf::from("firecracker"),
        assets_root: assets.parent().unwrap().to_path_buf(),
        assets,
    });
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

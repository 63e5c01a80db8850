//! Bringing a fresh Firecracker process to a running VM through its API:
//! the configuration requests in the documented order (machine-config,
//! boot-source, drives, network-interfaces, vsock, logger, metrics) and
//! `InstanceStart`, or a snapshot load (`snapshot`); and the small API calls the
//! backend makes on a live VM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::{api, unavailable, FirecrackerVmm, AGENT_VSOCK_PORT, GUEST_CID, NET_IFACE};
use crate::assets::AssetSet;
use crate::net::netns;
use crate::store::VmmIdentity;
use crate::vmm::process::{self, Liveness};
use crate::vmm::{asset_err, LaunchSpec, MachinePaths, Vmm, VmmError};
use hyperfleet_api::VmmKind;

impl FirecrackerVmm {
    /// The kernel command line. `pci=off`: Firecracker has no PCI bus; its
    /// virtio-mmio devices are appended to this line by Firecracker itself.
    /// The network keys (`hf.ip=` …) come last, when the machine has one.
    pub(crate) fn boot_args(launch: &LaunchSpec, set: &AssetSet) -> String {
        let net = launch
            .network
            .as_ref()
            .map(|n| n.kernel_args())
            .unwrap_or_default();
        format!(
            "console=ttyS0 reboot=k panic=1 pci=off hf.root=/dev/vda hf.modules={} \
             hf.hostname={} hf.vsock_port={AGENT_VSOCK_PORT}{net}",
            set.module_list(),
            launch.name
        )
    }

    /// The kernel and initramfs a fresh boot uses.
    pub(super) fn boot_files(&self, set: &AssetSet) -> Result<(PathBuf, PathBuf), VmmError> {
        let kernel = match &self.kernel {
            Some(k) if k.is_file() => k.clone(),
            Some(k) => {
                return Err(unavailable(format!(
                    "the kernel given with --firecracker-kernel ({}) does not exist",
                    k.display()
                )))
            }
            None => set.kernel().map_err(asset_err(VmmKind::Firecracker))?,
        };
        Ok((
            kernel,
            set.initramfs().map_err(asset_err(VmmKind::Firecracker))?,
        ))
    }

    /// Waits until the API socket answers `GET /` and returns the VM's
    /// state (`Not started`, `Running`, `Paused`).
    pub(super) async fn api_state(
        &self,
        launch: &LaunchSpec,
        vmm: &VmmIdentity,
        deadline: tokio::time::Instant,
    ) -> Result<String, VmmError> {
        let sock = Self::api_socket(&launch.paths);
        loop {
            if process::probe(vmm) == Liveness::Gone {
                return Err(VmmError::Exited {
                    doing: format!("starting its API; {}", self.boot_detail(&launch.paths)),
                });
            }
            match api::call(&sock, "GET", "/", None).await {
                Ok(r) if r.status == 200 => {
                    return Ok(r.body["state"].as_str().unwrap_or_default().to_string())
                }
                Ok(_) | Err(_) if tokio::time::Instant::now() < deadline => {}
                Ok(r) => {
                    return Err(VmmError::Control {
                        doing: "waiting for the Firecracker API".into(),
                        detail: format!("GET / answered HTTP {}", r.status),
                    })
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The launch as Firecracker sees it: jailed, its TAP is the one inside
    /// the machine's network namespace (`net::netns`), not the host's.
    pub(super) fn as_vmm_sees_it(&self, launch: &LaunchSpec) -> LaunchSpec {
        let mut seen = launch.clone();
        if let (true, Some(net)) = (self.machine_netns(), seen.network.as_mut()) {
            net.tap = netns::INNER_TAP.to_string();
        }
        seen
    }

    /// Configures a fresh process in the documented order and starts the VM.
    pub(super) async fn configure_and_start(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        let set = self.images.for_image(launch.spec.image.as_deref())?;
        let (kernel, initrd) = self.boot_files(&set)?;
        let boot_args = Self::boot_args(launch, &set);
        let seen = self.as_vmm_sees_it(launch);
        let requests = Self::start_requests(&seen, &kernel, &initrd, &boot_args)
            .into_iter()
            .chain(Self::logging_requests(&launch.paths))
            .chain([("/actions", json!({"action_type": "InstanceStart"}))]);
        for (path, body) in requests {
            Self::send(&launch.paths, "PUT", path, &body).await?;
        }
        Ok(())
    }

    /// What configures a fresh process, in the documented order, up to (not
    /// including) logging and `InstanceStart`.
    pub(crate) fn start_requests(
        launch: &LaunchSpec,
        kernel: &Path,
        initrd: &Path,
        boot_args: &str,
    ) -> Vec<(&'static str, Value)> {
        let p = &launch.paths;
        let s = |x: &Path| x.display().to_string();
        let mut v = vec![
            (
                "/machine-config",
                json!({
                    "vcpu_count": launch.spec.vcpu_count,
                    "mem_size_mib": launch.spec.mem_size_mib,
                    // For diff snapshots; its cost is one write fault per
                    // page until the next snapshot.
                    "track_dirty_pages": true,
                }),
            ),
            (
                "/boot-source",
                json!({
                    "kernel_image_path": s(kernel),
                    "initrd_path": s(initrd),
                    "boot_args": boot_args,
                }),
            ),
            (
                "/drives/root",
                json!({
                    "drive_id": "root",
                    "path_on_host": s(&Self::disk(p)),
                    // The initramfs (the agent as PID 1) switches to /dev/vda.
                    "is_root_device": false,
                    "is_read_only": false,
                }),
            ),
        ];
        if let Some(net) = &launch.network {
            v.push((
                "/network-interfaces/eth0",
                json!({
                    "iface_id": NET_IFACE,
                    "host_dev_name": net.tap,
                    "guest_mac": net.mac,
                }),
            ));
        }
        v.push((
            "/vsock",
            json!({
                "guest_cid": GUEST_CID,
                "uds_path": s(&Self::vsock_socket(p)),
            }),
        ));
        v
    }

    /// Logger and metrics to the per-machine files (which `spawn` creates).
    pub(crate) fn logging_requests(paths: &MachinePaths) -> [(&'static str, Value); 2] {
        [
            (
                "/logger",
                json!({
                    "log_path": Self::log_file(paths).display().to_string(),
                    "level": "Info",
                    "show_level": true,
                }),
            ),
            (
                "/metrics",
                json!({"metrics_path": Self::metrics_file(paths).display().to_string()}),
            ),
        ]
    }

    pub(super) async fn configure_logging(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        for (path, body) in Self::logging_requests(&launch.paths) {
            Self::send(&launch.paths, "PUT", path, &body).await?;
        }
        Ok(())
    }

    /// One request with a body that must succeed; its answer is not needed.
    pub(super) async fn send(
        paths: &MachinePaths,
        method: &str,
        path: &str,
        body: &Value,
    ) -> Result<(), VmmError> {
        api::expect_ok(&Self::api_socket(paths), method, path, Some(body))
            .await
            .map(drop)
    }

    /// Brings a process that has not started its VM to a running VM
    /// (configure + start, or load the snapshot). Idempotent.
    pub(crate) async fn ensure_started(
        &self,
        launch: &LaunchSpec,
        vmm: &VmmIdentity,
        deadline: tokio::time::Instant,
    ) -> Result<(), VmmError> {
        let state = self.api_state(launch, vmm, deadline).await?;
        if state != "Not started" {
            return Ok(());
        }
        if launch.restore {
            self.load_snapshot(launch).await
        } else {
            self.configure_and_start(launch).await
        }
    }

    pub(super) async fn vm_state(&self, launch: &LaunchSpec) -> Result<String, VmmError> {
        let v = api::expect_ok(&Self::api_socket(&launch.paths), "GET", "/", None).await?;
        Ok(v["state"].as_str().unwrap_or_default().to_string())
    }

    pub(super) async fn patch_vm(&self, launch: &LaunchSpec, state: &str) -> Result<(), VmmError> {
        Self::send(&launch.paths, "PATCH", "/vm", &json!({ "state": state })).await
    }
}

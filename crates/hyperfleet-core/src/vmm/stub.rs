//! The `stub` backend: drives `hyperfleet-testvmm`, a real process with no
//! guest, so the control plane's tests exercise real processes (detached
//! spawn, identity, re-adoption, SIGKILL recovery) without booting a kernel.
//!
//! It is selected with `--default-vmm stub` or `"vmm": "stub"` and is not
//! meant for production. Tests steer the stand-in guest through machine
//! metadata: `stub_boot_ms` (boot delay), `stub_never_ready=true` (the guest
//! never answers), `stub_ignore_poweroff=true` (graceful stop times out),
//! `stub_disk_used_bytes=N` (the prepared disk holds N bytes of data) and
//! `stub_memory_bytes=N` (a suspend image holds N bytes more), so the
//! storage tests have something to count.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_trait::async_trait;
use hyperfleet_api::VmmKind;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use super::process::{self, Liveness};
use super::stop::{graceful_stop, StopRequest};
use super::{LaunchSpec, MachinePaths, Saved, SnapshotTaken, StopPath, Vmm, VmmError, VmmRunState};
use crate::store::VmmIdentity;

pub(crate) struct StubVmm {
    binary: PathBuf,
}

impl StubVmm {
    pub(crate) fn new(binary: PathBuf) -> Self {
        StubVmm { binary }
    }

    fn disk(paths: &MachinePaths) -> PathBuf {
        paths.dir.join("disk.img")
    }

    fn state_file(paths: &MachinePaths) -> PathBuf {
        paths.snapshot_dir().join("state")
    }
}

/// One request/answer exchange on the stand-in's control socket.
async fn command(socket: &Path, line: &str) -> Result<String, VmmError> {
    let control = |detail: String| VmmError::Control {
        doing: format!("sending {}", line.split(' ').next().unwrap_or(line)),
        detail,
    };
    let exchange = async {
        let mut s = UnixStream::connect(socket)
            .await
            .map_err(|e| control(format!("cannot connect to {}: {e}", socket.display())))?;
        s.write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(|e| control(e.to_string()))?;
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .await
            .map_err(|e| control(e.to_string()))?;
        let answer = answer.trim().to_string();
        if let Some(err) = answer.strip_prefix("ERR ") {
            return Err(control(err.to_string()));
        }
        if answer.is_empty() {
            return Err(control("the VMM closed the connection".into()));
        }
        Ok(answer)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| control("no answer within 5 s".into()))?
}

/// A byte count from the machine's metadata (0 when absent or not a number).
fn meta_bytes(launch: &LaunchSpec, key: &str) -> u64 {
    launch
        .spec
        .metadata
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The size of a stub machine's (sparse) disk.
const STUB_DISK_BYTES: u64 = 64 << 20;

#[async_trait]
impl Vmm for StubVmm {
    fn kind(&self) -> VmmKind {
        VmmKind::Stub
    }

    fn availability(&self) -> Result<String, String> {
        if self.binary.is_file() {
            Ok(format!("stand-in VMM at {}", self.binary.display()))
        } else {
            Err(format!(
                "the stand-in VMM binary {} does not exist (build it with `cargo build -p hyperfleet-testvmm`)",
                self.binary.display()
            ))
        }
    }

    fn disk_bytes(&self, _image: Option<&str>) -> Option<u64> {
        Some(STUB_DISK_BYTES)
    }

    async fn prepare(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        let dir = launch.paths.dir.clone();
        let disk = Self::disk(&launch.paths);
        let used = meta_bytes(launch, "stub_disk_used_bytes");
        // One blocking call for the whole preparation: cheaper than a
        // thread hand-off per filesystem operation.
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| VmmError::host(format!("creating {}", dir.display()), e))?;
            // Stands in for the copy-on-write disk a real backend prepares:
            // a sparse file, created once, kept across stop/start.
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&disk)
                .map_err(|e| VmmError::host(format!("creating {}", disk.display()), e))?;
            f.set_len(STUB_DISK_BYTES)
                .map_err(|e| VmmError::host(format!("sizing {}", disk.display()), e))?;
            if used > 0 {
                use std::os::unix::fs::FileExt;
                let data = vec![0xa5u8; used.min(STUB_DISK_BYTES) as usize];
                f.write_all_at(&data, 0)
                    .map_err(|e| VmmError::host(format!("filling {}", disk.display()), e))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| VmmError::host("preparing the disk", std::io::Error::other(e)))?
    }

    async fn spawn(&self, launch: &LaunchSpec) -> Result<VmmIdentity, VmmError> {
        self.availability()
            .map_err(|reason| VmmError::unavailable(VmmKind::Stub, reason))?;
        let socket = launch.paths.control_socket();
        // A stale socket from a previous VMM would make the new one refuse to
        // bind; nothing else can be using it (the old process is gone).
        super::remove_file_if_present(&socket)?;
        let meta = &launch.spec.metadata;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--machine-dir")
            .arg(&launch.paths.dir)
            .arg("--socket")
            .arg(&socket)
            .arg("--boot-ms")
            .arg(meta.get("stub_boot_ms").map(String::as_str).unwrap_or("50"));
        if meta.get("stub_never_ready").map(String::as_str) == Some("true") {
            cmd.arg("--never-ready");
        }
        if meta.get("stub_ignore_poweroff").map(String::as_str) == Some("true") {
            cmd.arg("--ignore-poweroff");
        }
        if let Some((img, kind, _)) = launch.restore_image() {
            cmd.arg("--restore").arg(img.state_for(kind));
        } else if launch.restore {
            return Err(VmmError::host(
                "restoring memory",
                std::io::Error::new(std::io::ErrorKind::NotFound, "the memory image is missing"),
            ));
        }
        super::spawn_vmm(cmd, &launch.paths.console_log())
    }

    async fn wait_ready(
        &self,
        launch: &LaunchSpec,
        vmm: &VmmIdentity,
        timeout: Duration,
    ) -> Result<(), VmmError> {
        let socket = launch.paths.control_socket();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last: String;
        loop {
            if process::probe(vmm) == Liveness::Gone {
                return Err(VmmError::Exited {
                    doing: "waiting for the guest to become ready".into(),
                });
            }
            match command(&socket, "PING").await {
                Ok(a) if a == "PONG" => return Ok(()),
                Ok(a) => last = format!("the guest answered {a}"),
                Err(e) => last = e.to_string(),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VmmError::BootTimeout {
                    timeout,
                    detail: last,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn run_state(&self, launch: &LaunchSpec) -> Result<VmmRunState, VmmError> {
        match command(&launch.paths.control_socket(), "STATE")
            .await?
            .as_str()
        {
            "paused" => Ok(VmmRunState::Paused),
            _ => Ok(VmmRunState::Running),
        }
    }

    async fn pause(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        command(&launch.paths.control_socket(), "PAUSE")
            .await
            .map(drop)
    }

    async fn resume(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        command(&launch.paths.control_socket(), "RESUME")
            .await
            .map(drop)
    }

    async fn shutdown(
        &self,
        launch: &LaunchSpec,
        vmm: &VmmIdentity,
        timeout: Duration,
    ) -> Result<StopPath, VmmError> {
        let socket = launch.paths.control_socket();
        let requests = vec![StopRequest::new("poweroff request", async move {
            command(&socket, "POWEROFF").await.is_ok()
        })];
        graceful_stop(vmm, timeout, "the VMM", requests).await
    }

    async fn save_state(
        &self,
        launch: &LaunchSpec,
        _cancel: &CancellationToken,
    ) -> Result<Saved, VmmError> {
        let dir = launch.paths.snapshot_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| VmmError::host(format!("creating {}", dir.display()), e))?;
        let socket = launch.paths.control_socket();
        command(&socket, "PAUSE").await?;
        let state = Self::state_file(&launch.paths);
        command(&socket, &format!("SAVE {}", state.display())).await?;
        let extra = meta_bytes(launch, "stub_memory_bytes");
        if extra > 0 {
            let ballast = dir.join("ballast");
            tokio::fs::write(&ballast, vec![0x5au8; extra.min(1 << 30) as usize])
                .await
                .map_err(|e| VmmError::host(format!("writing {}", ballast.display()), e))?;
        }
        Ok(Saved::Complete)
    }

    fn supports_snapshots(&self) -> bool {
        true
    }

    async fn snapshot(
        &self,
        launch: &LaunchSpec,
        dest: &Path,
        live: bool,
        _durable_memory: bool,
    ) -> Result<SnapshotTaken, VmmError> {
        let img = super::image::ImageDir(dest.to_path_buf());
        let (memory, pause) = if live {
            let socket = launch.paths.control_socket();
            let running = command(&socket, "STATE").await? != "paused";
            let t0 = std::time::Instant::now();
            command(&socket, "PAUSE").await?;
            let saved = command(&socket, &format!("SAVE {}", img.state().display())).await;
            if running {
                command(&socket, "RESUME").await?;
            }
            saved?;
            (true, running.then(|| t0.elapsed()))
        } else {
            let own = launch.paths.suspend_image();
            let memory = own.state().is_file();
            if memory {
                super::image::link_or_copy(&own.state(), &img.state())?;
            }
            (memory, None)
        };
        let (disk, dst) = (Self::disk(&launch.paths), img.disk());
        tokio::task::spawn_blocking(move || super::image::copy_sparse(&disk, &dst, 0o444))
            .await
            .map_err(|e| VmmError::host("copying the disk", std::io::Error::other(e)))??;
        Ok(SnapshotTaken {
            memory,
            pause,
            flattened: false,
        })
    }

    async fn release(&self, paths: &MachinePaths) -> Result<(), VmmError> {
        super::remove_dir_idempotent(&paths.dir).await
    }
}

//! Suspend images: full and diff snapshots (`/snapshot/create`), loading
//! one into a fresh process (`/snapshot/load`), and merging a diff layer
//! onto its base before a restore. The module docs of `vmm::firecracker`
//! ("Diff snapshots") explain the scheme.

use std::path::Path;

use serde_json::{json, Value};

use super::{jailer, layer, FirecrackerVmm, NET_IFACE};
use crate::vmm::process;
use crate::vmm::{remove_file_if_present, LaunchSpec, MachinePaths, VmmError};

/// Makes the names in directory `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), VmmError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| VmmError::host(format!("syncing {}", dir.display()), e))
}

impl FirecrackerVmm {
    /// `PUT /snapshot/load`: the suspend image, resumed at once, with dirty
    /// pages tracked (not saved in snapshots; needed for the next diff) and
    /// the machine's current TAP in place of the one it was saved with (a
    /// TAP is the machine's, but its name comes from the lease of the moment).
    /// There is no vsock override: Firecracker v1.12 has none (it rejects
    /// `vsock_override`), and none is needed — the socket's path is the
    /// machine directory's, the same jailed or not.
    pub(crate) fn snapshot_load_body(launch: &LaunchSpec) -> Value {
        let p = &launch.paths;
        let mut body = json!({
            "snapshot_path": Self::state_file(p).display().to_string(),
            "mem_backend": {
                "backend_type": "File",
                "backend_path": Self::mem_file(p).display().to_string(),
            },
            // v1.12's name for `track_dirty_pages` here (it rejects that).
            "enable_diff_snapshots": true,
            "resume_vm": true,
        });
        if let Some(net) = &launch.network {
            body["network_overrides"] = json!([{
                "iface_id": NET_IFACE,
                "host_dev_name": net.tap,
            }]);
        }
        body
    }

    /// `PUT /snapshot/create` into the snapshot directory: a full snapshot
    /// into `mem`, or a diff into the layer `mem.diff`.
    pub(crate) fn snapshot_create_body(paths: &MachinePaths, diff: bool) -> Value {
        let (kind, mem) = if diff {
            ("Diff", Self::layer_file(paths))
        } else {
            ("Full", Self::mem_file(paths))
        };
        json!({
            "snapshot_type": kind,
            "snapshot_path": Self::state_file(paths).display().to_string(),
            "mem_file_path": mem.display().to_string(),
        })
    }

    /// Whether the next snapshot can be a diff: the VMM was restored from
    /// `mem.base` and maps it, and the snapshot directory keeps holes.
    pub(super) fn diff_possible(paths: &MachinePaths) -> bool {
        let base = Self::base_file(paths);
        if !base.exists() {
            return false;
        }
        let vmms = process::find_by_marker(&paths.dir.display().to_string());
        let mapped = match vmms.as_slice() {
            [one] => layer::mapped_by(one.pid, &base),
            _ => Ok(false),
        };
        let holes = layer::holes_supported(&paths.snapshot_dir());
        match (mapped, holes) {
            (Ok(true), Ok(true)) => true,
            (mapped, holes) => {
                tracing::info!(
                    dir = %paths.dir.display(),
                    ?mapped,
                    ?holes,
                    "taking a full snapshot: no base for a diff"
                );
                false
            }
        }
    }

    /// Merges a pending diff layer onto the base memory file (in place: no
    /// VMM of the machine runs, so nothing maps the base), then removes the
    /// layer. Idempotent, and safe to repeat after a crash at any point.
    pub(super) fn merge_layer(paths: &MachinePaths) -> Result<(), VmmError> {
        let (base, diff) = (Self::mem_file(paths), Self::layer_file(paths));
        if !diff.exists() {
            return Ok(());
        }
        if let Some(v) = process::find_by_marker(&paths.dir.display().to_string()).first() {
            return Err(VmmError::host(
                format!("merging {} onto {}", diff.display(), base.display()),
                std::io::Error::other(format!(
                    "a VMM of the machine (pid {}) still runs and may map the base",
                    v.pid
                )),
            ));
        }
        let t0 = std::time::Instant::now();
        let merged = layer::merge(&base, &diff).map_err(|e| {
            VmmError::host(
                format!("merging the diff snapshot onto {}", base.display()),
                e,
            )
        })?;
        remove_file_if_present(&diff)?;
        sync_dir(&paths.snapshot_dir())?;
        tracing::info!(
            dir = %paths.dir.display(),
            regions = merged.regions,
            bytes = merged.bytes,
            elapsed = ?t0.elapsed(),
            "merged a diff snapshot onto its base"
        );
        Ok(())
    }

    /// Loads the suspend image into a fresh process and resumes it.
    pub(super) async fn load_snapshot(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        self.configure_logging(launch).await?;
        let body = Self::snapshot_load_body(&self.as_vmm_sees_it(launch));
        Self::send(&launch.paths, "PUT", "/snapshot/load", &body).await
    }

    /// Saves the guest (`Vmm::save_state`): pauses it, then a diff snapshot
    /// onto the base it was restored from when possible, else a full one;
    /// jailed, the files are linked out of the chroot. The files and their
    /// names are synced before this returns.
    pub(super) async fn save_snapshot(&self, launch: &LaunchSpec) -> Result<(), VmmError> {
        let p = &launch.paths;
        let dir = p.snapshot_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| VmmError::host(format!("creating {}", dir.display()), e))?;
        if self.vm_state(launch).await? != "Paused" {
            self.patch_vm(launch, "Paused").await?;
        }
        // Jailed, Firecracker writes into the chroot's mirror of the
        // snapshot directory; the files are linked out afterwards.
        let chroot = jailer::existing_chroot(p, &launch.machine_id);
        let unlink = |f: &Path| -> Result<(), VmmError> {
            remove_file_if_present(f)?;
            match &chroot {
                Some(root) => remove_file_if_present(&jailer::inside(root, f)),
                None => Ok(()),
            }
        };
        // Unlinked, not truncated: the running VMM may map the old memory
        // file. Whatever an earlier attempt left goes first, so the files
        // below are all this attempt's.
        let (state, mem, diff) = (Self::state_file(p), Self::mem_file(p), Self::layer_file(p));
        for f in [&state, &mem, &diff] {
            unlink(f)?;
        }
        // The base moves into the image before the diff is asked for: should
        // this attempt die half-way, the next one finds no base and takes a
        // full snapshot (a diff then would miss the pages this one wrote).
        let mut layered = false;
        if Self::diff_possible(p) {
            let base = Self::base_file(p);
            std::fs::rename(&base, &mem).map_err(|e| {
                VmmError::host(format!("moving {} into the image", base.display()), e)
            })?;
            sync_dir(&dir)?;
            let body = Self::snapshot_create_body(p, true);
            match Self::send(p, "PUT", "/snapshot/create", &body).await {
                Ok(()) => layered = true,
                Err(e) => {
                    tracing::warn!(dir = %p.dir.display(), error = %e, "the diff snapshot failed; taking a full one");
                    for f in [&state, &mem, &diff] {
                        unlink(f)?;
                    }
                }
            }
        }
        if !layered {
            let body = Self::snapshot_create_body(p, false);
            Self::send(p, "PUT", "/snapshot/create", &body).await?;
        }
        let written = [state, if layered { diff } else { mem }];
        if let Some(root) = &chroot {
            for f in &written {
                jailer::export(root, f)?;
            }
        }
        // The files, and their names, must be on disk before the VMM is
        // killed.
        sync_dir(&dir)?;
        for f in written {
            let file = tokio::fs::File::open(&f)
                .await
                .map_err(|e| VmmError::host(format!("opening {}", f.display()), e))?;
            file.sync_all()
                .await
                .map_err(|e| VmmError::host(format!("syncing {}", f.display()), e))?;
        }
        self.agents.forget(&launch.machine_id);
        Ok(())
    }
}

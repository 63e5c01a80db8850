//! The orphan sweep: at startup, before any run starts, reclaim host objects
//! that belong to no machine — VMM processes, machine directories (with the
//! Firecracker jails inside them) and whatever the backends keep elsewhere
//! ([`Vmm::remove_orphan`]: jailed VMMs' cgroups) left by machines whose
//! records are gone (a crash between releasing and deleting, or a database
//! restored from backup). Objects of known machines are left to their runs,
//! which know what they own.

use std::path::Path;
use std::sync::Arc;

use crate::store::Store;
use crate::vmm::{process, Vmm};

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SweepReport {
    pub killed_processes: usize,
    pub removed_dirs: usize,
}

pub(crate) async fn sweep<'a>(
    store: &Store,
    machines_dir: &Path,
    backends: impl IntoIterator<Item = &'a Arc<dyn Vmm>>,
) -> SweepReport {
    let backends: Vec<&Arc<dyn Vmm>> = backends.into_iter().collect();
    let mut report = SweepReport::default();
    // Each process and directory is looked up by its machine id (a point
    // read), so the sweep holds no list of every machine. A machine that
    // cannot be read can be called no orphan: the sweep stops.
    let known = |id: &str| {
        store.machine_vmm(id).inspect_err(|e| {
            tracing::error!(machine = %id, error = %e, "cannot read the machine; stopping the orphan sweep");
        })
    };

    // Processes whose command line names a machine directory of ours.
    let prefix = format!("{}/", machines_dir.display());
    for v in process::find_by_marker(&prefix) {
        let Some(id) = machine_id_in_cmdline(v.pid, &prefix) else {
            continue;
        };
        let Ok(recorded) = known(&id) else {
            return report;
        };
        let orphan = match recorded {
            None => true,
            // A second process for a known machine that recorded another
            // one (and is not mid-spawn): never two VMMs per machine.
            Some(Some(recorded)) => recorded != v,
            // Known machine with no recorded VMM: its run adopts or kills it
            // (a crash between spawn and recording the pid).
            Some(None) => false,
        };
        if orphan {
            tracing::warn!(pid = v.pid, machine = %id, "killing an orphan VMM process");
            match process::kill(&v).await {
                Ok(()) => report.killed_processes += 1,
                Err(e) => tracing::error!(pid = v.pid, error = %e, "could not kill an orphan VMM"),
            }
        }
    }

    // Directories of machines that no longer exist, and what the backends
    // keep for them elsewhere (their processes were killed above).
    if let Ok(entries) = std::fs::read_dir(machines_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            match known(&name) {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(_) => return report,
            }
            tracing::warn!(dir = %e.path().display(), "removing an orphan machine directory");
            for b in &backends {
                if let Err(err) = b.remove_orphan(&name) {
                    tracing::error!(machine = %name, backend = %b.kind(), error = %err, "could not remove an orphan VMM's leftovers");
                }
            }
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => report.removed_dirs += 1,
                Err(err) => {
                    tracing::error!(dir = %e.path().display(), error = %err, "could not remove an orphan directory")
                }
            }
        }
    }
    if report != SweepReport::default() {
        tracing::info!(?report, "orphan sweep reclaimed host objects");
    }
    report
}

fn machine_id_in_cmdline(pid: i32, prefix: &str) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let start = text.find(prefix)? + prefix.len();
    let id: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    (!id.is_empty()).then_some(id)
}

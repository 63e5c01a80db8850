//! The machine run: one task per machine, the only writer of its status.
//!
//! In a loop it reads the committed record, observes the host (is the
//! recorded VMM process alive and ours?), asks [`plan::next`] for the next
//! safe step, carries it out and persists the outcome, until status matches
//! the desired state; then it waits for a new request or for the VMM to
//! change. Recovery after a restart is this same loop.
//!
//! - this file: the loop, its errors and its back-off;
//! - [`journal`]: the step protocol (intent, crash point, effect, crash
//!   point, outcome) and persisting the run's fields with their events;
//! - [`actions`]: each step's effect, declared on that protocol;
//! - [`host`]: host-side effects shared by steps (network, uid, killing a
//!   VMM, cleaning up after one).

mod actions;
mod host;
mod journal;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hyperfleet_api::{StepTiming, VmmKind};
use tokio::sync::watch;

use super::plan::{self, Next};
use crate::net::NetError;
use crate::store::{CachedMachine, MachineRecord, Store, StoreError};
use crate::vmm::process::{self, Liveness};
use crate::vmm::uid::UidError;
use crate::vmm::{LaunchSpec, MachinePaths, Vmm, VmmError};

/// What every run shares.
pub struct RunCtx {
    pub store: Store,
    pub backends: HashMap<VmmKind, Arc<dyn Vmm>>,
    pub machines_dir: std::path::PathBuf,
    /// Snapshots' files, a directory per snapshot (`snapshots::dir`).
    pub snapshots_dir: std::path::PathBuf,
    pub boot_timeout: Duration,
    pub stop_timeout: Duration,
    /// Host networking; None when the daemon runs with networking off.
    pub net: Option<Arc<crate::net::Network>>,
    /// Idle timeout and wake settings (`lifecycle::idle`).
    pub idle: crate::lifecycle::idle::IdleConfig,
    /// When each machine was last used, shared with the proxy.
    pub activity: crate::proxy::activity::Activity,
    /// The storage budget and what the data directory holds; steps that
    /// change a machine's files mark it (`lifecycle::storage`).
    pub storage: Arc<crate::lifecycle::storage::Storage>,
}

impl RunCtx {
    pub fn paths(&self, id: &str) -> MachinePaths {
        MachinePaths::new(&self.machines_dir, id)
    }

    /// What a backend needs to act on machine `rec`. Its uid is there
    /// only when its backend runs VMMs as one (the jailer, or QEMU run as
    /// machine uids).
    pub fn launch(&self, rec: &MachineRecord) -> LaunchSpec {
        let jailed = self
            .backends
            .get(&rec.spec.vmm)
            .is_some_and(|b| b.jail_uids().is_some());
        LaunchSpec {
            machine_id: rec.id.clone(),
            paths: self.paths(&rec.id),
            spec: rec.spec.clone(),
            name: rec.name.clone(),
            restore: rec.has_snapshot,
            network: self
                .net
                .as_ref()
                .zip(rec.network.as_ref())
                .map(|(n, lease)| n.config.guest(lease)),
            uid: rec.jail_uid.filter(|_| jailed),
            base: rec
                .spec
                .base_snapshot
                .as_deref()
                .and_then(|id| super::snapshots::base_image(self, id)),
        }
    }
}

type Rx = watch::Receiver<Option<Arc<CachedMachine>>>;

/// Errors inside a run. Step failures become the machine's `failed` status;
/// store failures are retried.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("setting up the machine's network failed: {0}")]
    Net(NetError),
    #[error("giving the machine a uid of its own failed: {0}")]
    Uid(UidError),
    #[error("recording progress failed: {0}")]
    Store(#[from] StoreError),
    /// The host could not be looked at (e.g. out of file descriptors):
    /// nothing is known, so nothing is decided; the run backs off.
    #[error("cannot look at the host's processes: {0}")]
    Host(std::io::Error),
}

impl From<UidError> for RunError {
    fn from(e: UidError) -> Self {
        match e {
            UidError::Store(e) => RunError::Store(e),
            e => RunError::Uid(e),
        }
    }
}

impl From<NetError> for RunError {
    fn from(e: NetError) -> Self {
        match e {
            // A store failure is retried like any other; the rest fail the step.
            NetError::Store(e) => RunError::Store(e),
            e => RunError::Net(e),
        }
    }
}

struct Run {
    ctx: Arc<RunCtx>,
    id: String,
    /// The status of a live VMM has been checked against reality since this
    /// run started (true for VMMs this run spawned itself).
    verified: bool,
    /// Steps finished since the last status change, for the next event.
    timings: Vec<StepTiming>,
    /// How long the next back-off waits (see [`grown`]).
    retry_delay: Duration,
}

/// Why a run returned.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RunExit {
    /// The record is gone.
    Deleted,
    /// Nothing runs and nothing is asked for: the run may end until the next
    /// request (the supervisor re-checks under its lock before letting it go).
    Quiescent,
}

/// The first back-off after progress, and the longest.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The one back-off policy: each failure in a row waits twice as long,
/// up to [`MAX_RETRY`].
fn grown(delay: Duration) -> Duration {
    (delay * 2).min(MAX_RETRY)
}

/// How long an idle run waits before it looks at the host again even
/// though nothing told it to.
const IDLE_RECHECK: Duration = Duration::from_secs(30);

/// Runs machine `id` until its record is deleted or it has nothing to do.
pub(crate) async fn run(ctx: Arc<RunCtx>, id: String) -> RunExit {
    let mut rx = loop {
        match ctx.store.subscribe(&id) {
            Ok(Some(rx)) => break rx,
            Ok(None) => return RunExit::Deleted,
            Err(e) => {
                tracing::error!(machine = %id, error = %e, "cannot read the machine; its run retries in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut run = Run {
        ctx,
        id,
        verified: false,
        timings: Vec::new(),
        retry_delay: FIRST_RETRY,
    };
    loop {
        let Some(entry) = rx.borrow_and_update().clone() else {
            tracing::debug!(machine = %run.id, "record deleted; run ends");
            return RunExit::Deleted;
        };
        let rec = entry.rec.clone();
        let probed = rec.vmm.as_ref().map(process::probe_checked).transpose();
        let liveness = probed.as_ref().map_or(Some(Liveness::Unknown), |l| *l);
        let step = match plan::next(&rec, liveness, run.verified) {
            Next::Step(step) => step,
            Next::BackOff => {
                let why = probed.err().map(|e| e.to_string()).unwrap_or_default();
                run.back_off(&format!("cannot tell whether the VMM process lives: {why}"))
                    .await;
                continue;
            }
        };
        if step == plan::Step::Idle {
            // Steps that changed no status (create-time preparation) still
            // belong in the history.
            if !run.timings.is_empty() {
                if let Err(e) = run.flush_timings(&rec).await {
                    run.back_off(&e).await;
                    continue;
                }
            }
            if plan::quiescent(&rec) {
                return RunExit::Quiescent;
            }
            run.idle(&rec, &mut rx).await;
            continue;
        }
        tracing::debug!(machine = %run.id, ?step, status = %rec.status, desired = rec.desired.as_str(), "step");
        match run.execute(step, &rec, &mut rx).await {
            Ok(()) => run.retry_delay = FIRST_RETRY,
            Err(e @ (RunError::Vmm(_) | RunError::Net(_) | RunError::Uid(_))) => {
                if let Err(e) = run.fail(&rec, step, e.to_string()).await {
                    run.back_off(&e).await;
                }
            }
            Err(e @ (RunError::Store(_) | RunError::Host(_))) => run.back_off(&e).await,
        }
    }
}

impl Run {
    fn backend(&self, kind: VmmKind) -> Result<Arc<dyn Vmm>, VmmError> {
        self.ctx
            .backends
            .get(&kind)
            .cloned()
            .ok_or_else(|| VmmError::Unavailable {
                backend: kind,
                reason: "this daemon was started without it".into(),
            })
    }

    fn launch(&self, rec: &MachineRecord) -> LaunchSpec {
        self.ctx.launch(rec)
    }

    /// Waits before the loop tries again after `e`, longer each time in a
    /// row. Every error the loop meets comes through here (or through
    /// [`Run::idle`], which waits the same way while still listening for
    /// requests), so no error can make the run spin.
    async fn back_off(&mut self, e: &(dyn std::fmt::Display + Sync)) {
        tracing::error!(machine = %self.id, error = %e, delay = ?self.retry_delay, "machine run cannot go on; retrying");
        tokio::time::sleep(self.retry_delay).await;
        self.retry_delay = grown(self.retry_delay);
    }

    /// Waits for a change of the record, the VMM's exit, or a periodic
    /// re-check of the host. Never returns at once on its own: should the
    /// host refuse to watch the VMM (no pidfd: out of file descriptors) it
    /// polls after the back-off delay instead, and the delay grows.
    async fn idle(&mut self, rec: &MachineRecord, rx: &mut Rx) {
        let vmm = rec.vmm.clone();
        let delay = self.retry_delay;
        let id = self.id.clone();
        let vmm_exit = async move {
            let Some(v) = vmm else {
                return std::future::pending::<bool>().await;
            };
            match process::wait_gone(&v, IDLE_RECHECK).await {
                Ok(_) => false,
                Err(e) => {
                    tracing::error!(machine = %id, error = %e, delay = ?delay, "cannot watch the VMM process; looking again after the delay");
                    tokio::time::sleep(delay).await;
                    true
                }
            }
        };
        let failed = tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    // The store dropped the watcher: the machine is gone.
                    std::future::pending::<()>().await;
                }
                false
            }
            failed = vmm_exit => failed,
            _ = tokio::time::sleep(IDLE_RECHECK) => false,
        };
        if failed {
            self.retry_delay = grown(delay);
        }
    }
}

/// Resolves when the record satisfies `pred` (or is deleted).
/// Whether the machine's record now asks for it to run.
fn wants_running(rx: &Rx) -> bool {
    rx.borrow()
        .as_ref()
        .is_some_and(|m| m.rec.desired == super::table::Desired::Running)
}

async fn until(rx: &mut Rx, pred: impl Fn(&MachineRecord) -> bool) {
    loop {
        {
            let v = rx.borrow_and_update();
            match v.as_ref() {
                None => return,
                Some(m) if pred(&m.rec) => return,
                Some(_) => {}
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_up_to_its_ceiling() {
        assert_eq!(grown(FIRST_RETRY), Duration::from_millis(500));
        assert_eq!(grown(Duration::from_secs(20)), MAX_RETRY);
        assert_eq!(grown(MAX_RETRY), MAX_RETRY);
    }
}

//! The machine run: one task per machine, the only writer of its status.
//!
//! In a loop it reads the committed record, observes the host (is the
//! recorded VMM process alive and ours?), asks [`plan::next_step`] for the
//! next safe step, carries it out and persists the outcome, until status
//! matches the desired state; then it waits for a new request or for the
//! VMM to change. Each step journals its intent before its side effect and
//! its completion after, so a daemon killed anywhere leaves a record the next
//! run can finish or undo. Recovery after a restart is this same loop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyperfleet_api::{MachineStatus, StepTiming, VmmKind};
use tokio::sync::watch;

use super::plan::{self, Step, VmmSeen};
use super::steps;
use super::table::{on_observation, Desired, Observation};
use crate::failpoint;
use crate::net::NetError;
use crate::store::{CachedMachine, EventRecord, MachineRecord, Store, StoreError};
use crate::util::now_ms;
use crate::vmm::process::{self, Liveness};
use crate::vmm::uid::UidError;
use crate::vmm::{remove_dir_idempotent, LaunchSpec, MachinePaths, StopPath, Vmm, VmmError};

/// What every run shares.
pub struct RunCtx {
    pub store: Store,
    pub backends: HashMap<VmmKind, Arc<dyn Vmm>>,
    pub machines_dir: std::path::PathBuf,
    pub boot_timeout: Duration,
    pub stop_timeout: Duration,
    /// Host networking; None when the daemon runs with networking off.
    pub net: Option<Arc<crate::net::Network>>,
}

impl RunCtx {
    pub fn paths(&self, id: &str) -> MachinePaths {
        MachinePaths::new(&self.machines_dir, id)
    }

    /// What a backend needs to act on machine `rec`. Its uid is there
    /// only when its backend runs VMMs as one (the jailer is on).
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
    retry_delay: Duration,
}

/// Why a run returned.
#[derive(Debug, PartialEq, Eq)]
pub enum RunExit {
    /// The record is gone.
    Deleted,
    /// Nothing runs and nothing is asked for: the run may end until the next
    /// request (the supervisor re-checks under its lock before letting it go).
    Quiescent,
}

/// Whether a machine needs no run right now: converged, no VMM, nothing
/// under way. Such a run ends so that idle machines cost no task.
/// A machine whose only work is create-time preparation and which nobody
/// waits for (never started, nothing wanted): its run can wait for a
/// background slot.
pub fn background_only(rec: &MachineRecord) -> bool {
    rec.vmm.is_none()
        && rec.current_step.is_none()
        && rec.desired == Desired::Stopped
        && plan::next_step(rec, VmmSeen::None, true) == Step::Prepare
}

/// How often, and how far apart, adoption looks again for a VMM spawned
/// before a crash when the first look finds none (about half a second).
const ORPHAN_RESCANS: usize = 10;
const ORPHAN_RESCAN_PAUSE: Duration = Duration::from_millis(50);

pub fn quiescent(rec: &MachineRecord) -> bool {
    rec.vmm.is_none()
        && rec.current_step.is_none()
        && plan::next_step(rec, VmmSeen::None, true) == Step::Idle
}

/// Runs machine `id` until its record is deleted or it has nothing to do.
pub async fn run(ctx: Arc<RunCtx>, id: String) -> RunExit {
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
        retry_delay: Duration::from_millis(250),
    };
    loop {
        let Some(entry) = rx.borrow_and_update().clone() else {
            tracing::debug!(machine = %run.id, "record deleted; run ends");
            return RunExit::Deleted;
        };
        let rec = entry.rec.clone();
        let seen = match &rec.vmm {
            None => VmmSeen::None,
            Some(v) => match process::probe(v) {
                Liveness::Alive => VmmSeen::Alive,
                Liveness::Gone => VmmSeen::Gone,
            },
        };
        let step = plan::next_step(&rec, seen, run.verified);
        if step == Step::Idle {
            // Steps that changed no status (create-time preparation) still
            // belong in the history.
            if !run.timings.is_empty() {
                if let Err(e) = run.flush_timings(&rec).await {
                    run.back_off(&e).await;
                    continue;
                }
            }
            if quiescent(&rec) {
                return RunExit::Quiescent;
            }
            run.idle(&rec, &mut rx).await;
            continue;
        }
        tracing::debug!(machine = %run.id, ?step, status = %rec.status, desired = rec.desired.as_str(), "step");
        match run.execute(step, &rec, &mut rx).await {
            Ok(()) => run.retry_delay = Duration::from_millis(250),
            Err(e @ (RunError::Vmm(_) | RunError::Net(_) | RunError::Uid(_))) => {
                if let Err(e) = run.fail(&rec, step, e.to_string()).await {
                    run.back_off(&e).await;
                }
            }
            Err(RunError::Store(e)) => run.back_off(&e).await,
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

    async fn back_off(&mut self, e: &(dyn std::fmt::Display + Sync)) {
        tracing::error!(machine = %self.id, error = %e, delay = ?self.retry_delay, "run step could not be recorded; retrying");
        tokio::time::sleep(self.retry_delay).await;
        self.retry_delay = (self.retry_delay * 2).min(Duration::from_secs(30));
    }

    /// Waits for a change of the record, the VMM's exit, or a periodic
    /// re-check of the host.
    async fn idle(&mut self, rec: &MachineRecord, rx: &mut Rx) {
        let vmm = rec.vmm.clone();
        let vmm_exit = async move {
            match vmm {
                Some(v) => {
                    let _ = process::wait_gone(&v, Duration::from_secs(3600)).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    // The store dropped the watcher: the machine is gone.
                    std::future::pending::<()>().await;
                }
            }
            _ = vmm_exit => {}
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }

    /// Persists `f`'s changes to the latest record (requests may have
    /// changed the desired state meanwhile: the run owns only its own
    /// fields), journals `step`, and appends a transition event when the
    /// status changed.
    async fn persist<F>(&mut self, journal: Option<Journal>, f: F) -> Result<(), StoreError>
    where
        F: FnOnce(&mut MachineRecord) + Send + 'static,
    {
        let id = self.id.clone();
        let mut timings = std::mem::take(&mut self.timings);
        if let Some(j) = &journal {
            if let Some(t) = j.timing() {
                timings.push(t);
            }
        }
        let pending = timings.clone();
        let result = self
            .ctx
            .store
            .write(move |ctx| {
                let mut rec = ctx
                    .machine(&id)?
                    .ok_or_else(|| StoreError::NoSuchMachine(id.clone()))?;
                let before = rec.status;
                f(&mut rec);
                rec.updated_at = now_ms();
                if let Some(j) = &journal {
                    ctx.journal(
                        &id,
                        rec.operation_id.as_deref(),
                        j.step,
                        j.phase,
                        j.duration_ms,
                        j.detail.as_deref(),
                    )?;
                }
                let changed = rec.status != before;
                let own_event = journal.as_ref().is_some_and(|j| j.own_event);
                if changed || own_event {
                    let mut ev =
                        EventRecord::new(&id, if changed { "transition" } else { "steps" });
                    ev.from_status = Some(before);
                    ev.to_status = Some(rec.status);
                    ev.operation_id = rec.operation_id.clone();
                    ev.message = if rec.status == MachineStatus::Failed {
                        rec.error_message.clone()
                    } else {
                        None
                    };
                    ev.steps = timings;
                    ctx.append_event(ev)?;
                }
                ctx.put_machine(rec)?;
                Ok(changed || own_event)
            })
            .await;
        match result {
            Ok(true) => Ok(()),
            Ok(false) => {
                // No event took the timings: keep them for the next one.
                self.timings = pending;
                Ok(())
            }
            Err(e) => {
                self.timings = pending;
                Err(e)
            }
        }
    }

    async fn flush_timings(&mut self, rec: &MachineRecord) -> Result<(), StoreError> {
        let mut ev = EventRecord::new(&rec.id, "steps");
        ev.to_status = Some(rec.status);
        ev.operation_id = rec.operation_id.clone();
        ev.message = Some(format!("steps completed while {}", rec.status));
        ev.steps = std::mem::take(&mut self.timings);
        let keep = ev.steps.clone();
        let result = self
            .ctx
            .store
            .write(move |ctx| ctx.append_event(ev).map(drop))
            .await;
        if result.is_err() {
            self.timings = keep;
        }
        result
    }

    async fn execute(
        &mut self,
        step: Step,
        rec: &MachineRecord,
        rx: &mut Rx,
    ) -> Result<(), RunError> {
        match step {
            Step::Idle => Ok(()),
            Step::Converged => {
                let planned = rec.generation;
                self.persist(None, move |r| {
                    r.observed_generation = r.observed_generation.max(planned);
                })
                .await?;
                Ok(())
            }
            Step::AdoptOrphan => self.adopt_orphan(rec).await,
            Step::Prepare => self.prepare(rec).await,
            Step::Spawn { restore } => self.spawn(rec, restore).await,
            Step::WaitReady => self.wait_ready(rec, rx).await,
            Step::Verify => self.verify(rec).await,
            Step::Pause => self.pause_or_resume(rec, true).await,
            Step::Resume => self.pause_or_resume(rec, false).await,
            Step::Stop { kill } => self.stop(rec, kill, rx).await,
            Step::Suspend => self.suspend(rec).await,
            Step::ForgetVmm(obs) => self.forget_vmm(rec, obs).await,
            Step::SettleStopped => self.settle_stopped(rec).await,
            Step::BeginDelete => {
                self.persist(Some(Journal::done(steps::RELEASE, "begin")), |r| {
                    observe(r, Observation::DeleteBegun)
                })
                .await?;
                Ok(())
            }
            Step::Release => self.release(rec).await,
            Step::CleanupFailed => {
                if let Some(v) = &rec.vmm {
                    process::kill(v)
                        .await
                        .map_err(|e| VmmError::host("killing the VMM of a failed machine", e))?;
                }
                self.vmm_gone(rec).await;
                self.persist(Some(Journal::done(steps::KILL, "cleanup")), |r| {
                    r.vmm = None;
                    observe(r, Observation::VmmExited);
                })
                .await?;
                Ok(())
            }
        }
    }

    async fn adopt_orphan(&mut self, rec: &MachineRecord) -> Result<(), RunError> {
        let marker = self.ctx.paths(&rec.id).dir.display().to_string();
        let t0 = Instant::now();
        // "None found" decides that no VMM was spawned, and the start is
        // then simply done again: it must not be a process caught where its
        // command line cannot be read (mid-exec, as a jailer turning into
        // Firecracker right after the daemon died). Look again a few times
        // before believing it; this path runs only after a crash.
        let mut found = process::find_by_marker(&marker);
        for _ in 0..ORPHAN_RESCANS {
            if !found.is_empty() {
                break;
            }
            tokio::time::sleep(ORPHAN_RESCAN_PAUSE).await;
            found = process::find_by_marker(&marker);
        }
        match found.as_slice() {
            [one] => {
                tracing::warn!(machine = %rec.id, pid = one.pid, "adopting a VMM spawned before the daemon stopped");
                let one = one.clone();
                self.verified = false;
                self.persist(
                    Some(Journal::finished(
                        steps::ADOPT,
                        t0,
                        Some(format!("pid {}", one.pid)),
                    )),
                    move |r| {
                        r.vmm = Some(one);
                        r.current_step = None;
                    },
                )
                .await?;
            }
            many => {
                // Never two VMMs for one machine: if somehow more than one
                // exists, none can be trusted; kill them all and start over.
                for v in many {
                    tracing::warn!(machine = %rec.id, pid = v.pid, "killing an unrecorded duplicate VMM");
                    process::kill(v)
                        .await
                        .map_err(|e| VmmError::host("killing an unrecorded VMM", e))?;
                }
                let detail = if many.is_empty() {
                    "the daemon stopped before the VMM was spawned".to_string()
                } else {
                    format!("killed {} unrecorded VMM processes", many.len())
                };
                self.persist(Some(Journal::failed(steps::SPAWN, t0, detail)), |r| {
                    r.current_step = None
                })
                .await?;
            }
        }
        Ok(())
    }

    async fn prepare(&mut self, rec: &MachineRecord) -> Result<(), RunError> {
        let backend = self.backend(rec.spec.vmm)?;
        let launch = self.launch(rec);
        let t0 = Instant::now();
        // No intent record: preparation is idempotent and everything it
        // makes lives under the machine's directory (known from its id), so
        // recovery simply prepares again while `prepared` is false, and the
        // sweep or release removes the directory of a machine that is gone.
        failpoint::hit("prepare.before_effect");
        backend.prepare(&launch).await?;
        failpoint::hit("prepare.after_effect");
        let mut journal = Journal::finished(steps::PREPARE, t0, None);
        // No status changes here, so the step gets an event of its own in
        // the same commit (instead of a separate flush later).
        journal.own_event = true;
        self.persist(Some(journal), |r| {
            r.prepared = true;
            r.current_step = None;
        })
        .await?;
        Ok(())
    }

    async fn spawn(&mut self, rec: &MachineRecord, restore: bool) -> Result<(), RunError> {
        let backend = self.backend(rec.spec.vmm)?;
        let mut launch = self.launch(rec);
        launch.restore = restore;
        let t0 = Instant::now();
        self.persist(Some(Journal::started(steps::SPAWN)), |r| {
            r.current_step = Some(steps::SPAWN.into());
            r.boot_restart_seq = r.restart_seq;
            r.stop_kill = false;
            if r.status == MachineStatus::Failed {
                r.error_message = None;
            }
            observe(r, Observation::VmmSpawned);
        })
        .await?;
        failpoint::hit("spawn.after_intent");
        launch.uid = self.ensure_uid(rec, backend.as_ref()).await?;
        launch.network = self.ensure_network(rec, launch.uid).await?;
        let identity = backend.spawn(&launch).await?;
        failpoint::hit("spawn.after_effect");
        self.verified = true;
        let detail = Some(format!(
            "pid {}{}",
            identity.pid,
            if restore { ", restoring memory" } else { "" }
        ));
        self.persist(
            Some(Journal::finished(steps::SPAWN, t0, detail)),
            move |r| {
                r.vmm = Some(identity);
                r.current_step = None;
            },
        )
        .await?;
        failpoint::hit("spawn.after_commit");
        Ok(())
    }

    async fn wait_ready(&mut self, rec: &MachineRecord, rx: &mut Rx) -> Result<(), RunError> {
        let backend = self.backend(rec.spec.vmm)?;
        let launch = self.launch(rec);
        let Some(vmm) = rec.vmm.clone() else {
            return Ok(());
        };
        let t0 = Instant::now();
        let timeout = self.ctx.boot_timeout;
        // A stop, kill, delete or restart asked for meanwhile ends the wait.
        let restart_seq = rec.restart_seq;
        let outcome = tokio::select! {
            r = backend.wait_ready(&launch, &vmm, timeout) => Some(r),
            _ = until(rx, move |r| {
                !matches!(r.desired, Desired::Running | Desired::Paused | Desired::Suspended)
                    || r.restart_seq != restart_seq
            }) => None,
        };
        let Some(result) = outcome else {
            return Ok(());
        };
        result?;
        failpoint::hit("ready.after_effect");
        self.verified = true;
        let restored = rec.has_snapshot;
        self.persist(
            Some(Journal::finished(steps::WAIT_READY, t0, None)),
            move |r| {
                observe(r, Observation::AgentReady);
                r.started_at = Some(now_ms());
                if restored {
                    // The image is consumed: the guest has moved on from it.
                    r.has_snapshot = false;
                }
            },
        )
        .await?;
        if restored {
            let dir = self.ctx.paths(&rec.id).snapshot_dir();
            if let Err(e) = remove_dir_idempotent(&dir).await {
                tracing::warn!(machine = %rec.id, error = %e, "could not remove a consumed suspend image");
            }
        }
        Ok(())
    }

    async fn verify(&mut self, rec: &MachineRecord) -> Result<(), RunError> {
        let backend = self.backend(rec.spec.vmm)?;
        let launch = self.launch(rec);
        let t0 = Instant::now();
        let state = backend.run_state(&launch).await?;
        let obs = match state {
            crate::vmm::VmmRunState::Running => Observation::AdoptedRunning,
            crate::vmm::VmmRunState::Paused => Observation::AdoptedPaused,
        };
        self.verified = true;
        let detail = Some(format!("{state:?}").to_lowercase());
        self.persist(
            Some(Journal::finished(steps::VERIFY, t0, detail)),
            move |r| {
                observe(r, obs);
                r.current_step = None;
            },
        )
        .await?;
        Ok(())
    }

    async fn pause_or_resume(&mut self, rec: &MachineRecord, pause: bool) -> Result<(), RunError> {
        let backend = self.backend(rec.spec.vmm)?;
        let launch = self.launch(rec);
        let (step, intent_point, effect_point, obs) = if pause {
            (
                steps::PAUSE,
                "pause.after_intent",
                "pause.after_effect",
                Observation::PauseDone,
            )
        } else {
            (
                steps::RESUME,
                "resume.after_intent",
                "resume.after_effect",
                Observation::ResumeDone,
            )
        };
        let t0 = Instant::now();
        self.persist(Some(Journal::started(step)), move |r| {
            r.current_step = Some(step.into())
        })
        .await?;
        failpoint::hit(intent_point);
        if pause {
            backend.pause(&launch).await?;
        } else {
            backend.resume(&launch).await?;
        }
        failpoint::hit(effect_point);
        self.persist(Some(Journal::finished(step, t0, None)), move |r| {
            observe(r, obs);
            r.current_step = None;
        })
        .await?;
        Ok(())
    }

    async fn stop(&mut self, rec: &MachineRecord, kill: bool, rx: &mut Rx) -> Result<(), RunError> {
        let Some(vmm) = rec.vmm.clone() else {
            return Ok(());
        };
        let backend = self.backend(rec.spec.vmm)?;
        let launch = self.launch(rec);
        let step = if kill {
            steps::KILL
        } else {
            steps::GRACEFUL_STOP
        };
        let t0 = Instant::now();
        self.persist(Some(Journal::started(step)), move |r| {
            r.current_step = Some(step.into());
            observe(r, Observation::StopBegun);
        })
        .await?;
        failpoint::hit("stop.after_intent");
        let path = if kill {
            "killed on request".to_string()
        } else {
            let timeout = self.ctx.stop_timeout;
            let graceful = tokio::select! {
                r = backend.shutdown(&launch, &vmm, timeout) => Some(r?),
                _ = until(rx, |r| r.stop_kill) => None,
            };
            match graceful {
                Some(StopPath::Graceful { via }) => format!("guest powered off ({via})"),
                Some(StopPath::KilledAfterTimeout) => {
                    format!("guest did not power off within {timeout:?}; VMM killed")
                }
                None => "escalated to kill on request".to_string(),
            }
        };
        // Whatever happened above, the process must be gone before we say so.
        process::kill(&vmm)
            .await
            .map_err(|e| VmmError::host("killing the VMM", e))?;
        self.vmm_gone(rec).await;
        failpoint::hit("stop.after_effect");
        self.persist(Some(Journal::finished(step, t0, Some(path))), |r| {
            r.vmm = None;
            r.current_step = None;
            r.stop_kill = false;
            observe(r, Observation::VmmExited);
        })
        .await?;
        Ok(())
    }

    async fn suspend(&mut self, rec: &MachineRecord) -> Result<(), RunError> {
        let Some(vmm) = rec.vmm.clone() else {
            return Ok(());
        };
        let backend = self.backend(rec.spec.vmm)?;
        let launch = self.launch(rec);
        let t0 = Instant::now();
        self.persist(Some(Journal::started(steps::SAVE_STATE)), |r| {
            r.current_step = Some(steps::SAVE_STATE.into());
            observe(r, Observation::SuspendBegun);
        })
        .await?;
        failpoint::hit("suspend.after_intent");
        backend.save_state(&launch).await?;
        failpoint::hit("suspend.after_save");
        // The image is complete: record it before the VMM goes, so a crash
        // from here on still ends in `suspended`, not `failed`.
        self.persist(None, |r| r.has_snapshot = true).await?;
        process::kill(&vmm)
            .await
            .map_err(|e| VmmError::host("stopping the VMM after saving its memory", e))?;
        self.vmm_gone(rec).await;
        failpoint::hit("suspend.after_effect");
        self.persist(Some(Journal::finished(steps::SAVE_STATE, t0, None)), |r| {
            r.vmm = None;
            r.current_step = None;
            observe(r, Observation::SuspendDone);
        })
        .await?;
        Ok(())
    }

    async fn forget_vmm(&mut self, rec: &MachineRecord, obs: Observation) -> Result<(), RunError> {
        let was = rec.status;
        tracing::warn!(machine = %rec.id, status = %was, "the VMM process is gone");
        self.vmm_gone(rec).await;
        self.persist(
            Some(Journal::done(
                steps::FORGET,
                &format!("VMM gone while {was}"),
            )),
            move |r| {
                r.vmm = None;
                r.current_step = None;
                observe(r, obs);
                if r.status == MachineStatus::Failed && was != MachineStatus::Failed {
                    r.error_message = Some(format!(
                        "the VMM process exited without being asked to while the machine was {was} \
                         (guest poweroff, crash, or killed from outside); see the console log"
                    ));
                    r.failed_generation = Some(r.generation);
                }
            },
        )
        .await?;
        Ok(())
    }

    async fn settle_stopped(&mut self, rec: &MachineRecord) -> Result<(), RunError> {
        let t0 = Instant::now();
        if rec.has_snapshot {
            remove_dir_idempotent(&self.ctx.paths(&rec.id).snapshot_dir()).await?;
        }
        let journal = rec
            .has_snapshot
            .then(|| Journal::finished(steps::DISCARD_SNAPSHOT, t0, None));
        self.persist(journal, |r| {
            r.has_snapshot = false;
            r.current_step = None;
            r.error_message = None;
            observe(r, Observation::SettledStopped);
        })
        .await?;
        Ok(())
    }

    async fn release(&mut self, rec: &MachineRecord) -> Result<(), RunError> {
        let paths = self.ctx.paths(&rec.id);
        let t0 = Instant::now();
        self.persist(Some(Journal::started(steps::RELEASE)), |r| {
            r.current_step = Some(steps::RELEASE.into())
        })
        .await?;
        failpoint::hit("release.after_intent");
        // Belt and braces: no process of this machine may outlive it.
        for v in process::find_by_marker(&paths.dir.display().to_string()) {
            tracing::warn!(machine = %rec.id, pid = v.pid, "killing a leftover VMM before release");
            process::kill(&v)
                .await
                .map_err(|e| VmmError::host("killing a leftover VMM", e))?;
        }
        match self.backend(rec.spec.vmm) {
            Ok(b) => b.release(&paths).await?,
            Err(_) => remove_dir_idempotent(&paths.dir).await?,
        }
        if let (Some(net), Some(lease)) = (&self.ctx.net, &rec.network) {
            // Unlike other TAP removals this one must succeed: the lease
            // goes with the record, and nothing would own the device after.
            net.remove_tap(&lease.tap).await?;
            // The rules go before the record, so a client told "deleted"
            // finds nothing of the machine left on the host.
            net.sync_rules_excluding(&self.ctx.store, Some(&rec.id))
                .await?;
        }
        failpoint::hit("release.after_effect");
        let id = rec.id.clone();
        let mut ev = EventRecord::new(&id, "deleted");
        ev.from_status = Some(rec.status);
        ev.operation_id = rec.operation_id.clone();
        let mut timings = std::mem::take(&mut self.timings);
        timings.push(StepTiming {
            step: steps::RELEASE.into(),
            duration_ms: t0.elapsed().as_secs_f64() * 1000.0,
            outcome: "ok".into(),
            detail: None,
        });
        ev.steps = timings;
        self.ctx
            .store
            .write(move |ctx| {
                ctx.append_event(ev)?;
                ctx.delete_machine(&id)
            })
            .await?;
        if let Some(net) = &self.ctx.net {
            // Again after the commit: a rebuild for another machine that
            // ran in between still saw this lease. Should this fail, the
            // next start of the daemon rebuilds the table.
            if let Err(e) = net.sync_rules(&self.ctx.store).await {
                tracing::error!(machine = %rec.id, error = %e, "could not remove the machine's firewall rules");
            }
        }
        Ok(())
    }

    /// The uid the machine's next VMM runs as, when its backend runs each
    /// machine's VMM as one: the machine's own, leased once (committed in
    /// one transaction before anything is made for it, so a crash on either
    /// side of the commit leaks nothing and shares nothing) and kept until
    /// the machine is deleted. None when the VMM runs as the daemon's user.
    async fn ensure_uid(
        &mut self,
        rec: &MachineRecord,
        backend: &dyn Vmm,
    ) -> Result<Option<u32>, RunError> {
        let Some(range) = backend.jail_uids() else {
            return Ok(None);
        };
        let t0 = Instant::now();
        let uid = crate::vmm::uid::lease(&self.ctx.store, &rec.id, range).await?;
        self.step_done(steps::UID, t0, format!("uid and gid {uid}"));
        failpoint::hit("jail.after_uid");
        Ok(Some(uid))
    }

    /// The machine's network for its next VMM: the lease (taken once and
    /// committed before any device is made), the firewall rules that
    /// include it, then the TAP device, owned by `owner` (the uid the VMM
    /// runs as, when not the daemon's). Every part is idempotent, so a
    /// crash anywhere here is recovered by doing it all again.
    async fn ensure_network(
        &mut self,
        rec: &MachineRecord,
        owner: Option<u32>,
    ) -> Result<Option<crate::net::GuestNet>, RunError> {
        let backend = self.backend(rec.spec.vmm)?;
        let Some(net) = self.ctx.net.clone() else {
            return Ok(None);
        };
        let t0 = Instant::now();
        let lease = net.lease(&self.ctx.store, &rec.id).await?;
        self.step_done(
            steps::LEASE,
            t0,
            format!(
                "{}/{} via {}, {}",
                lease.ip, lease.prefix_len, lease.gateway, lease.mac
            ),
        );
        failpoint::hit("network.after_lease");
        let t0 = Instant::now();
        net.sync_rules(&self.ctx.store).await?;
        self.step_done(steps::RULES, t0, format!("table {}", net.config.table));
        let t0 = Instant::now();
        let detail = if backend.machine_netns() {
            // Namespace, veth link and the TAP inside: one idempotent step.
            net.ensure_tap_in_netns(&lease, owner).await?;
            format!(
                "{} in network namespace {}",
                crate::net::netns::INNER_TAP,
                crate::net::netns::name_for(&lease.tap)
            )
        } else {
            net.ensure_tap(&lease, owner).await?;
            lease.tap.clone()
        };
        self.step_done(steps::TAP, t0, detail);
        failpoint::hit("network.after_tap");
        Ok(Some(net.config.guest(&lease)))
    }

    /// Records a finished step for the next event.
    fn step_done(&mut self, step: &str, t0: Instant, detail: String) {
        self.timings.push(StepTiming {
            step: step.to_string(),
            duration_ms: t0.elapsed().as_secs_f64() * 1000.0,
            outcome: "ok".into(),
            detail: Some(detail),
        });
    }

    /// Removes the machine's TAP device once its VMM is gone. Best effort:
    /// a device that could not be removed now is removed by the next
    /// stop, the release, or the startup sweep, and a start reuses it.
    /// The machine's VMM is gone: its TAP goes, and the backend removes
    /// what the process left (`Vmm::after_exit`). Failures are logged, not
    /// fatal: the next start and the delete clean up again.
    async fn vmm_gone(&self, rec: &MachineRecord) {
        if let (Some(net), Some(lease)) = (&self.ctx.net, &rec.network) {
            if let Err(e) = net.remove_tap(&lease.tap).await {
                tracing::warn!(machine = %rec.id, tap = %lease.tap, error = %e, "could not remove the TAP device");
            }
        }
        if let Ok(backend) = self.backend(rec.spec.vmm) {
            if let Err(e) = backend.after_exit(&self.launch(rec)).await {
                tracing::warn!(machine = %rec.id, error = %e, "could not remove what the VMM left");
            }
        }
    }

    /// A step failed: make sure nothing runs, then record `failed` with the
    /// reason. A failure while deleting is retried instead.
    async fn fail(
        &mut self,
        rec: &MachineRecord,
        step: Step,
        message: String,
    ) -> Result<(), StoreError> {
        tracing::error!(machine = %rec.id, ?step, error = %message, "machine step failed");
        let latest = self
            .ctx
            .store
            .get_by_id(&rec.id)
            .ok()
            .flatten()
            .map(|m| m.rec.clone())
            .unwrap_or_else(|| rec.clone());
        let marker = self.ctx.paths(&rec.id).dir.display().to_string();
        let mut victims = process::find_by_marker(&marker);
        if let Some(v) = latest.vmm.clone() {
            if !victims.contains(&v) {
                victims.push(v);
            }
        }
        for v in &victims {
            if let Err(ke) = process::kill(v).await {
                tracing::error!(machine = %rec.id, pid = v.pid, error = %ke, "could not kill the VMM of a failed step");
            }
        }
        self.vmm_gone(&latest).await;
        let deleting = latest.desired == Desired::Deleted;
        let timing = StepTiming {
            step: format!("{step:?}"),
            duration_ms: 0.0,
            outcome: "failed".into(),
            detail: Some(message.clone()),
        };
        self.timings.push(timing);
        self.persist(
            Some(Journal {
                step: "step_failed",
                phase: "failed",
                duration_ms: None,
                detail: Some(message.clone()),
                record_timing: false,
                own_event: false,
            }),
            move |r| {
                r.vmm = None;
                r.current_step = None;
                r.stop_kill = false;
                observe(r, Observation::StepFailed);
                if !deleting {
                    r.error_message = Some(message);
                    r.failed_generation = Some(r.generation);
                }
            },
        )
        .await?;
        if deleting {
            // Deleting is retried until it succeeds.
            tokio::time::sleep(self.retry_delay).await;
            self.retry_delay = (self.retry_delay * 2).min(Duration::from_secs(30));
        }
        Ok(())
    }
}

/// Applies an observation through the transition table. An impossible
/// transition is a bug in the run: logged loudly, status left as it was.
fn observe(r: &mut MachineRecord, obs: Observation) {
    match on_observation(r.status, obs) {
        Some(s) => r.status = s,
        None => tracing::error!(
            machine = %r.id,
            status = %r.status,
            ?obs,
            "BUG: the transition table forbids this observation; status unchanged"
        ),
    }
}

/// Resolves when the record satisfies `pred` (or is deleted).
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

/// A journal row for a step.
struct Journal {
    step: &'static str,
    phase: &'static str,
    duration_ms: Option<f64>,
    detail: Option<String>,
    record_timing: bool,
    /// Append a `steps` event even though the status does not change.
    own_event: bool,
}

impl Journal {
    fn started(step: &'static str) -> Self {
        Journal {
            step,
            phase: "started",
            duration_ms: None,
            detail: None,
            record_timing: false,
            own_event: false,
        }
    }

    fn finished(step: &'static str, t0: Instant, detail: Option<String>) -> Self {
        Journal {
            step,
            phase: "done",
            duration_ms: Some(t0.elapsed().as_secs_f64() * 1000.0),
            detail,
            record_timing: true,
            own_event: false,
        }
    }

    fn done(step: &'static str, detail: &str) -> Self {
        Journal {
            step,
            phase: "done",
            duration_ms: Some(0.0),
            detail: Some(detail.to_string()),
            record_timing: true,
            own_event: false,
        }
    }

    fn failed(step: &'static str, t0: Instant, detail: String) -> Self {
        Journal {
            step,
            phase: "failed",
            duration_ms: Some(t0.elapsed().as_secs_f64() * 1000.0),
            detail: Some(detail),
            record_timing: true,
            own_event: false,
        }
    }

    fn timing(&self) -> Option<StepTiming> {
        if !self.record_timing {
            return None;
        }
        Some(StepTiming {
            step: self.step.to_string(),
            duration_ms: self.duration_ms.unwrap_or(0.0),
            outcome: if self.phase == "failed" {
                "failed"
            } else {
                "ok"
            }
            .to_string(),
            detail: self.detail.clone(),
        })
    }
}

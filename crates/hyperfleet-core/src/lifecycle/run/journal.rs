//! The step protocol and the run's durable writes.
//!
//! A journaled step is declared once as a [`StepDef`]: its journal name,
//! its crash points, and what beginning it means for the status. Carrying
//! it out is always the same sequence, written here once: [`Run::begin`]
//! journals the intent (and marks `current_step`) and passes the
//! after-intent crash point; the step's effect runs; [`Run::finish`] passes
//! the after-effect crash point and persists the outcome with the step's
//! timing, clearing `current_step`. A daemon killed anywhere in between
//! leaves a record the next run can finish or undo. Adding a step is
//! declaring its `StepDef` and writing its effect between the two.

use std::ops::{Deref, DerefMut};
use std::time::Instant;

use hyperfleet_api::{MachineStatus, StepTiming};

use super::Run;
use crate::failpoint;
use crate::lifecycle::table::{on_observation, Observation};
use crate::store::{steps, EventRecord, MachineRecord, StoreError, WriteCtx};
use crate::util::now_ms;

/// A journaled step, declared once.
pub(super) struct StepDef {
    /// The name journaled and shown in events (`store::steps`).
    pub name: &'static str,
    /// Crash point once the intent is durable.
    pub after_intent: &'static str,
    /// Crash point once the effect is done, before it is recorded.
    pub after_effect: &'static str,
    /// The status change beginning the step means, if any.
    pub begins: Option<Observation>,
}

/// A step whose intent is durable and whose outcome is not yet recorded.
#[must_use = "a begun step must be finished (or fail)"]
pub(super) struct InFlight {
    def: &'static StepDef,
    t0: Instant,
}

impl InFlight {
    /// The effect is done: passes the after-effect crash point. Returns the
    /// step's timing, for a caller that records the outcome itself
    /// ([`Run::finish`] does it for everyone else).
    pub(super) fn effect_done(self, detail: Option<String>) -> StepTiming {
        failpoint::hit(self.def.after_effect);
        Journal::finished(self.def.name, self.t0, detail).timing()
    }
}

/// Where a journaled step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Started,
    Done,
    Failed,
}

impl Phase {
    /// As stored in the journal.
    fn as_str(self) -> &'static str {
        match self {
            Phase::Started => "started",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }

    /// As shown in an event's step timings.
    fn outcome(self) -> &'static str {
        match self {
            Phase::Failed => "failed",
            Phase::Started | Phase::Done => "ok",
        }
    }
}

/// A journal row to write with a record change.
pub(super) struct Journal {
    step: &'static str,
    phase: Phase,
    duration_ms: Option<f64>,
    detail: Option<String>,
    /// The next event carries the step's timing too.
    timed: bool,
    /// Append a `steps` event even though the status does not change.
    own_event: bool,
}

impl Journal {
    fn new(
        step: &'static str,
        phase: Phase,
        duration_ms: Option<f64>,
        detail: Option<String>,
    ) -> Self {
        Journal {
            step,
            phase,
            duration_ms,
            detail,
            timed: phase != Phase::Started,
            own_event: false,
        }
    }

    /// A step's intent.
    pub(super) fn started(step: &'static str) -> Self {
        Journal::new(step, Phase::Started, None, None)
    }

    /// A step that began at `t0` and succeeded.
    pub(super) fn finished(step: &'static str, t0: Instant, detail: Option<String>) -> Self {
        Journal::new(step, Phase::Done, Some(elapsed_ms(t0)), detail)
    }

    /// A decision recorded at once: nothing was timed.
    pub(super) fn done(step: &'static str, detail: &str) -> Self {
        Journal::new(step, Phase::Done, Some(0.0), Some(detail.to_string()))
    }

    /// A step that began at `t0` and did not succeed.
    pub(super) fn failed(step: &'static str, t0: Instant, detail: String) -> Self {
        Journal::new(step, Phase::Failed, Some(elapsed_ms(t0)), Some(detail))
    }

    /// A step failed and the machine with it (its timing is already in
    /// the run's list: the step may not be a journaled one).
    pub(super) fn step_failed(detail: String) -> Self {
        let mut j = Journal::new(steps::FAILED, Phase::Failed, None, Some(detail));
        j.timed = false;
        j
    }

    /// Gives the step an event of its own even though no status changes.
    pub(super) fn with_own_event(mut self) -> Self {
        self.own_event = true;
        self
    }

    /// The step's timing for an event; also observed in the step metrics
    /// (each journal row's timing is made once).
    fn timing(&self) -> StepTiming {
        crate::metrics::step_done(
            self.step,
            self.phase.outcome(),
            self.duration_ms.unwrap_or(0.0),
        );
        timing(
            self.step,
            self.duration_ms.unwrap_or(0.0),
            self.phase,
            self.detail.clone(),
        )
    }
}

/// The timing of a step that failed the machine (`step` names what the
/// run was doing, journaled or not), for the next event.
pub(super) fn failure_timing(step: &str, message: String) -> StepTiming {
    timing(step, 0.0, Phase::Failed, Some(message))
}

/// The one place a step timing is made.
fn timing(step: &str, duration_ms: f64, phase: Phase, detail: Option<String>) -> StepTiming {
    StepTiming {
        step: step.to_string(),
        duration_ms,
        outcome: phase.outcome().to_string(),
        detail,
    }
}

fn elapsed_ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1000.0
}

/// A record being changed by the run: the record, plus the observations the
/// transition table refused while changing it.
pub(super) struct Edit {
    rec: MachineRecord,
    refused: Option<(MachineStatus, Observation)>,
    also: Vec<AlsoWrite>,
}

/// A write of another row that must commit with the machine's (a
/// snapshot's status, set by the step that took it).
type AlsoWrite = Box<dyn FnOnce(&mut WriteCtx<'_>) -> Result<(), StoreError> + Send>;

impl Edit {
    /// Writes `f` in the same transaction as this edit.
    pub(super) fn also(
        &mut self,
        f: impl FnOnce(&mut WriteCtx<'_>) -> Result<(), StoreError> + Send + 'static,
    ) {
        self.also.push(Box::new(f));
    }

    /// Applies an observation through the transition table. A refused one
    /// leaves the status as it was and is reported once the write is done
    /// (see [`refused_observation`]).
    pub(super) fn observe(&mut self, obs: Observation) {
        match on_observation(self.rec.status, obs) {
            Some(s) => self.rec.status = s,
            None => self.refused = Some((self.rec.status, obs)),
        }
    }
}

impl Deref for Edit {
    type Target = MachineRecord;
    fn deref(&self) -> &MachineRecord {
        &self.rec
    }
}

impl DerefMut for Edit {
    fn deref_mut(&mut self) -> &mut MachineRecord {
        &mut self.rec
    }
}

/// The run asked for a transition the table forbids: a bug in the run.
/// Tests (and the integration suite, built with crash points) stop at it;
/// production logs it loudly and leaves the status as it was. Called after
/// the write, never inside the store's writer.
fn refused_observation(id: &str, status: MachineStatus, obs: Observation) {
    if cfg!(any(test, feature = "failpoints")) {
        panic!("BUG: machine {id}: the transition table forbids {obs:?} in {status}");
    }
    tracing::error!(
        machine = %id,
        %status,
        ?obs,
        "BUG: the transition table forbids this observation; status unchanged"
    );
}

impl Run {
    /// Journals `def`'s intent — `current_step`, its beginning observation
    /// and whatever `mark` adds, in one commit — then passes its
    /// after-intent crash point.
    pub(super) async fn begin<F>(
        &mut self,
        def: &'static StepDef,
        mark: F,
    ) -> Result<InFlight, StoreError>
    where
        F: FnOnce(&mut Edit) + Send + 'static,
    {
        let t0 = Instant::now();
        self.persist(Some(Journal::started(def.name)), move |r| {
            r.current_step = Some(def.name.into());
            mark(r);
            if let Some(obs) = def.begins {
                r.observe(obs);
            }
        })
        .await?;
        failpoint::hit(def.after_intent);
        Ok(InFlight { def, t0 })
    }

    /// Passes `step`'s after-effect crash point, then records its outcome:
    /// `current_step` cleared, what `outcome` sets, the timing.
    pub(super) async fn finish<F>(
        &mut self,
        step: InFlight,
        detail: Option<String>,
        outcome: F,
    ) -> Result<(), StoreError>
    where
        F: FnOnce(&mut Edit) + Send + 'static,
    {
        failpoint::hit(step.def.after_effect);
        self.persist(
            Some(Journal::finished(step.def.name, step.t0, detail)),
            move |r| {
                r.current_step = None;
                outcome(r);
            },
        )
        .await
    }

    /// Records a finished step that is not journaled on its own (part of
    /// another), for the next event.
    pub(super) fn step_done(&mut self, step: &'static str, t0: Instant, detail: String) {
        self.timings
            .push(Journal::finished(step, t0, Some(detail)).timing());
    }

    /// Persists `f`'s changes to the latest record (requests may have
    /// changed the desired state meanwhile: the run owns only its own
    /// fields), journals the step, and appends a transition event when the
    /// status changed.
    pub(super) async fn persist<F>(
        &mut self,
        journal: Option<Journal>,
        f: F,
    ) -> Result<(), StoreError>
    where
        F: FnOnce(&mut Edit) + Send + 'static,
    {
        let id = self.id.clone();
        let mut timings = std::mem::take(&mut self.timings);
        if let Some(j) = journal.as_ref().filter(|j| j.timed) {
            timings.push(j.timing());
        }
        let pending = timings.clone();
        let result = self
            .ctx
            .store
            .write(move |ctx| {
                let rec = ctx
                    .machine(&id)?
                    .ok_or_else(|| StoreError::NoSuchMachine(id.clone()))?;
                let before = rec.status;
                let mut edit = Edit {
                    rec,
                    refused: None,
                    also: Vec::new(),
                };
                f(&mut edit);
                let Edit {
                    mut rec,
                    refused,
                    also,
                } = edit;
                rec.updated_at = now_ms();
                if let Some(j) = &journal {
                    ctx.journal(
                        &id,
                        rec.operation_id.as_deref(),
                        j.step,
                        j.phase.as_str(),
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
                for write in also {
                    write(ctx)?;
                }
                Ok((changed || own_event, refused))
            })
            .await;
        match result {
            Ok((took_timings, refused)) => {
                if !took_timings {
                    // No event took the timings: keep them for the next one.
                    self.timings = pending;
                }
                if let Some((status, obs)) = refused {
                    refused_observation(&self.id, status, obs);
                }
                Ok(())
            }
            Err(e) => {
                self.timings = pending;
                Err(e)
            }
        }
    }

    /// Appends the steps finished since the last event as an event of
    /// their own (they changed no status).
    pub(super) async fn flush_timings(&mut self, rec: &MachineRecord) -> Result<(), StoreError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::table::Desired;

    #[test]
    fn phases_are_journaled_and_timed_as_before() {
        assert_eq!(Phase::Started.as_str(), "started");
        assert_eq!(Phase::Done.as_str(), "done");
        assert_eq!(Phase::Failed.as_str(), "failed");
        let t0 = Instant::now();
        let ok = Journal::finished(steps::SPAWN, t0, Some("pid 1".into()));
        assert!(ok.timed);
        assert_eq!(ok.timing().outcome, "ok");
        let failed = Journal::failed(steps::SPAWN, t0, "no".into());
        assert_eq!(failed.timing().outcome, "failed");
        // An intent is not a finished step; a step failure's timing is the
        // caller's.
        assert!(!Journal::started(steps::SPAWN).timed);
        assert!(!Journal::step_failed("x".into()).timed);
        assert_eq!(Journal::done(steps::FORGET, "d").timing().duration_ms, 0.0);
    }

    #[test]
    #[should_panic(expected = "BUG")]
    fn a_refused_observation_fails_loudly_in_tests() {
        let rec = crate::lifecycle::test_machine(MachineStatus::Pending, Desired::Stopped);
        let mut edit = Edit {
            rec,
            refused: None,
            also: Vec::new(),
        };
        // A pending machine has no VMM to have paused.
        edit.observe(Observation::PauseDone);
        assert_eq!(edit.status, MachineStatus::Pending);
        let (status, obs) = edit.refused.expect("the table refuses it");
        refused_observation(&edit.id, status, obs);
    }
}

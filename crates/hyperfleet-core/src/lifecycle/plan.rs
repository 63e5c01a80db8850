//! The machine run's decision logic, as a pure function: given the durable
//! record and what was observed on the host, which single step moves the
//! machine closer to its desired state? Kept free of I/O so every case is
//! unit-tested; `run/` carries the steps out.

use hyperfleet_api::MachineStatus;

use super::table::{Desired, Observation};
use crate::store::MachineRecord;
use crate::vmm::process::Liveness;

/// What the run does after the machine's main process exited (its guest
/// then powered itself off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterExit {
    /// Boot the machine again: the restart policy says so.
    Restart,
    /// Stay `stopped` with the exit code.
    Stay,
}

/// The restart policy's decision, on the latest record: only a machine
/// still wanted running restarts (a stop or delete asked for meanwhile
/// always wins); `always` restarts whatever the code, `on-failure` when
/// the code is not 0 and fewer than `max_retries` restarts were made since
/// the last start request; `no` never.
pub(crate) fn after_main_exit(rec: &MachineRecord, code: i32) -> AfterExit {
    use hyperfleet_api::RestartPolicyKind as K;
    if rec.desired != Desired::Running {
        return AfterExit::Stay;
    }
    let policy = rec.spec.restart.unwrap_or_default();
    let restart = match policy.policy {
        K::No => false,
        K::Always => true,
        K::OnFailure => {
            code != 0
                && rec.restart_count
                    < policy
                        .max_retries
                        .unwrap_or(hyperfleet_api::DEFAULT_MAX_RETRIES)
        }
    };
    if restart {
        AfterExit::Restart
    } else {
        AfterExit::Stay
    }
}

/// What the run observed about the recorded VMM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VmmSeen {
    /// The record names no VMM process.
    None,
    /// The recorded process is alive and is ours.
    Alive,
    /// The record names a process that no longer exists.
    Gone,
}

/// The next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing to do: wait for a request or for the VMM to change.
    Idle,
    /// Status matches the desired state; record that this generation converged.
    Converged,
    /// A spawn was journaled but no identity recorded: the daemon died in
    /// between. Look for the process before spawning another.
    AdoptOrphan,
    /// Create-time work: machine directory and disk.
    Prepare,
    Spawn {
        restore: bool,
    },
    WaitReady,
    /// Ask an adopted VMM whether it runs or is paused.
    Verify,
    Pause,
    Resume,
    Stop {
        kill: bool,
    },
    Suspend,
    /// Take the snapshot `snapshot_job` names; `live`: from the running or
    /// paused VMM (else from the suspend image and the disk, or the disk).
    Snapshot {
        live: bool,
    },
    /// The snapshot asked for can no longer be taken (the machine failed or
    /// is being deleted): mark it failed.
    AbandonSnapshot,
    /// The recorded VMM is gone; record what that means.
    ForgetVmm(Observation),
    /// Nothing runs and `stopped` was asked for.
    SettleStopped,
    /// Release is next: mark the machine `deleting`.
    BeginDelete,
    /// Release everything the machine owns and remove its record.
    Release,
    /// A failed machine still has a process (crash between kill and record).
    CleanupFailed,
}

/// What the run does next, given what probing the recorded VMM found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    Step(Step),
    /// The host could not say whether the VMM lives (e.g. no file
    /// descriptor left to look with): neither gone nor alive. Back off and
    /// look again; acting on a guess could forget or duplicate a VMM.
    BackOff,
}

/// `liveness`: what probing the recorded VMM found (None when the record
/// names none). See [`next_step`] for `verified`.
pub(crate) fn next(rec: &MachineRecord, liveness: Option<Liveness>, verified: bool) -> Next {
    let seen = match liveness {
        None => VmmSeen::None,
        Some(Liveness::Alive) => VmmSeen::Alive,
        Some(Liveness::Gone) => VmmSeen::Gone,
        Some(Liveness::Unknown) => return Next::BackOff,
    };
    Next::Step(next_step(rec, seen, verified))
}

/// A failure sticks until a new request raises the generation: while it is
/// current the run retries nothing, and a request that changes nothing
/// else is a request to retry.
pub(crate) fn failure_current(rec: &MachineRecord) -> bool {
    rec.status == MachineStatus::Failed && rec.failed_generation == Some(rec.generation)
}

/// Whether a machine needs no run right now: converged, no VMM, nothing
/// under way. Such a run ends so that idle machines cost no task.
pub(crate) fn quiescent(rec: &MachineRecord) -> bool {
    rec.vmm.is_none()
        && rec.current_step.is_none()
        && next_step(rec, VmmSeen::None, true) == Step::Idle
}

/// A machine whose only work is create-time preparation and which nobody
/// waits for (never started, nothing wanted): its run can wait for a
/// background slot.
pub(crate) fn background_only(rec: &MachineRecord) -> bool {
    rec.vmm.is_none()
        && rec.current_step.is_none()
        && rec.desired == Desired::Stopped
        && next_step(rec, VmmSeen::None, true) == Step::Prepare
}

/// `verified`: the run has confirmed, since it started, that the recorded
/// status of a live VMM matches reality (always true for a VMM it spawned).
pub(crate) fn next_step(rec: &MachineRecord, vmm: VmmSeen, verified: bool) -> Step {
    use MachineStatus as S;

    if vmm == VmmSeen::None && rec.current_step.as_deref() == Some(super::steps::SPAWN) {
        return Step::AdoptOrphan;
    }
    if vmm == VmmSeen::Gone {
        return Step::ForgetVmm(lost_observation(rec));
    }
    let alive = vmm == VmmSeen::Alive;

    if rec.snapshot_job.is_some() {
        if let Some(step) = snapshot_step(rec, alive, verified) {
            return step;
        }
    }

    if failure_current(rec) && rec.desired != Desired::Deleted {
        return if alive {
            Step::CleanupFailed
        } else {
            converged_or_idle(rec)
        };
    }

    // Create-time work happens right after create, while `pending`, so that
    // a later start only boots.
    if !rec.prepared && !alive && rec.desired != Desired::Deleted {
        return Step::Prepare;
    }

    match rec.desired {
        Desired::Deleted => {
            if alive {
                Step::Stop {
                    kill: rec.stop_kill,
                }
            } else if rec.status != S::Deleting {
                Step::BeginDelete
            } else {
                Step::Release
            }
        }
        Desired::Stopped => {
            if alive {
                Step::Stop {
                    kill: rec.stop_kill,
                }
            } else if !matches!(rec.status, S::Stopped | S::Pending) {
                Step::SettleStopped
            } else {
                converged_or_idle(rec)
            }
        }
        Desired::Running | Desired::Paused | Desired::Suspended => {
            if !alive {
                return match (rec.desired, rec.status) {
                    // Suspend finished (image saved, VMM gone).
                    (Desired::Suspended, S::Suspended) => converged_or_idle(rec),
                    // Paused/suspended need a live VMM first: boot it.
                    _ => Step::Spawn {
                        restore: rec.has_snapshot,
                    },
                };
            }
            if rec.desired == Desired::Running && rec.restart_seq > rec.boot_restart_seq {
                return Step::Stop { kill: false };
            }
            if rec.status == S::Starting {
                return Step::WaitReady;
            }
            if !verified || !matches!(rec.status, S::Running | S::Paused) {
                return Step::Verify;
            }
            match (rec.desired, rec.status) {
                (Desired::Running, S::Paused) => Step::Resume,
                (Desired::Paused, S::Running) => Step::Pause,
                (Desired::Suspended, _) => Step::Suspend,
                _ => converged_or_idle(rec),
            }
        }
    }
}

/// A snapshot is taken when the machine is at rest in a state that has
/// one: running or paused (checked against the VMM), suspended, or
/// stopped; until then the machine goes on toward its desired state.
fn snapshot_step(rec: &MachineRecord, alive: bool, verified: bool) -> Option<Step> {
    use MachineStatus as S;
    if failure_current(rec) || rec.desired == Desired::Deleted {
        return Some(Step::AbandonSnapshot);
    }
    if rec.current_step.is_some()
        && rec.current_step.as_deref() != Some(super::steps::TAKE_SNAPSHOT)
    {
        return None;
    }
    match (alive, rec.status) {
        (true, S::Running | S::Paused) if verified => Some(Step::Snapshot { live: true }),
        (false, S::Suspended | S::Stopped) => Some(Step::Snapshot { live: false }),
        _ => None,
    }
}

fn converged_or_idle(rec: &MachineRecord) -> Step {
    if rec.observed_generation < rec.generation {
        Step::Converged
    } else {
        Step::Idle
    }
}

/// What a vanished VMM means, given what the run was doing.
fn lost_observation(rec: &MachineRecord) -> Observation {
    if rec.status == MachineStatus::Suspending && rec.has_snapshot {
        // The image was complete before the VMM was killed.
        Observation::SuspendDone
    } else if rec.status == MachineStatus::Stopping {
        Observation::VmmExited
    } else {
        Observation::VmmLost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::VmmIdentity;

    fn rec(status: MachineStatus, desired: Desired) -> MachineRecord {
        let mut r = crate::lifecycle::test_machine(status, desired);
        r.observed_generation = 0;
        r.prepared = true;
        r
    }

    fn with_vmm(mut r: MachineRecord) -> MachineRecord {
        r.vmm = Some(VmmIdentity {
            pid: 1,
            start_time: 1,
            boot_id: "b".into(),
        });
        r
    }

    use MachineStatus as S;

    #[test]
    fn start_prepares_then_spawns_then_waits() {
        let mut r = rec(S::Pending, Desired::Running);
        r.prepared = false;
        assert_eq!(next_step(&r, VmmSeen::None, true), Step::Prepare);
        r.prepared = true;
        assert_eq!(
            next_step(&r, VmmSeen::None, true),
            Step::Spawn { restore: false }
        );
        let r = with_vmm(rec(S::Starting, Desired::Running));
        assert_eq!(next_step(&r, VmmSeen::Alive, true), Step::WaitReady);
        let mut r = with_vmm(rec(S::Running, Desired::Running));
        assert_eq!(next_step(&r, VmmSeen::Alive, true), Step::Converged);
        r.observed_generation = 1;
        assert_eq!(next_step(&r, VmmSeen::Alive, true), Step::Idle);
    }

    #[test]
    fn a_crash_between_spawn_intent_and_identity_adopts_first() {
        let mut r = rec(S::Starting, Desired::Running);
        r.current_step = Some(crate::lifecycle::steps::SPAWN.into());
        assert_eq!(next_step(&r, VmmSeen::None, false), Step::AdoptOrphan);
    }

    #[test]
    fn adopted_vmm_is_verified_before_anything_else() {
        let r = with_vmm(rec(S::Running, Desired::Running));
        assert_eq!(next_step(&r, VmmSeen::Alive, false), Step::Verify);
        let r = with_vmm(rec(S::Stopping, Desired::Running));
        assert_eq!(next_step(&r, VmmSeen::Alive, true), Step::Verify);
    }

    #[test]
    fn stop_kill_and_restart() {
        let r = with_vmm(rec(S::Running, Desired::Stopped));
        assert_eq!(
            next_step(&r, VmmSeen::Alive, true),
            Step::Stop { kill: false }
        );
        let mut r = with_vmm(rec(S::Stopping, Desired::Stopped));
        r.stop_kill = true;
        assert_eq!(
            next_step(&r, VmmSeen::Alive, true),
            Step::Stop { kill: true }
        );
        let mut r = with_vmm(rec(S::Running, Desired::Running));
        r.restart_seq = 1;
        assert_eq!(
            next_step(&r, VmmSeen::Alive, true),
            Step::Stop { kill: false }
        );
        let mut r = rec(S::Stopped, Desired::Running);
        r.restart_seq = 1;
        assert_eq!(
            next_step(&r, VmmSeen::None, true),
            Step::Spawn { restore: false }
        );
    }

    #[test]
    fn pause_resume_suspend() {
        let r = with_vmm(rec(S::Running, Desired::Paused));
        assert_eq!(next_step(&r, VmmSeen::Alive, true), Step::Pause);
        let r = with_vmm(rec(S::Paused, Desired::Running));
        assert_eq!(next_step(&r, VmmSeen::Alive, true), Step::Resume);
        let r = with_vmm(rec(S::Paused, Desired::Suspended));
        assert_eq!(next_step(&r, VmmSeen::Alive, true), Step::Suspend);
        let r = rec(S::Suspended, Desired::Suspended);
        assert_eq!(next_step(&r, VmmSeen::None, true), Step::Converged);
        let mut r = rec(S::Suspended, Desired::Running);
        r.has_snapshot = true;
        assert_eq!(
            next_step(&r, VmmSeen::None, true),
            Step::Spawn { restore: true }
        );
    }

    #[test]
    fn vanished_vmm_is_interpreted_by_what_the_run_was_doing() {
        let r = with_vmm(rec(S::Running, Desired::Running));
        assert_eq!(
            next_step(&r, VmmSeen::Gone, true),
            Step::ForgetVmm(Observation::VmmLost)
        );
        let r = with_vmm(rec(S::Stopping, Desired::Stopped));
        assert_eq!(
            next_step(&r, VmmSeen::Gone, true),
            Step::ForgetVmm(Observation::VmmExited)
        );
        let mut r = with_vmm(rec(S::Suspending, Desired::Suspended));
        r.has_snapshot = true;
        assert_eq!(
            next_step(&r, VmmSeen::Gone, true),
            Step::ForgetVmm(Observation::SuspendDone)
        );
    }

    #[test]
    fn a_current_failure_is_not_retried_until_a_new_request() {
        let mut r = rec(S::Failed, Desired::Running);
        r.failed_generation = Some(1);
        assert_eq!(next_step(&r, VmmSeen::None, true), Step::Converged);
        let r2 = with_vmm(r.clone());
        assert_eq!(next_step(&r2, VmmSeen::Alive, true), Step::CleanupFailed);
        r.generation = 2;
        assert_eq!(
            next_step(&r, VmmSeen::None, true),
            Step::Spawn { restore: false }
        );
    }

    #[test]
    fn delete_stops_then_marks_then_releases() {
        let r = with_vmm(rec(S::Running, Desired::Deleted));
        assert_eq!(
            next_step(&r, VmmSeen::Alive, true),
            Step::Stop { kill: false }
        );
        let r = rec(S::Stopped, Desired::Deleted);
        assert_eq!(next_step(&r, VmmSeen::None, true), Step::BeginDelete);
        let r = rec(S::Deleting, Desired::Deleted);
        assert_eq!(next_step(&r, VmmSeen::None, true), Step::Release);
        let mut r = rec(S::Failed, Desired::Deleted);
        r.failed_generation = Some(1);
        assert_eq!(next_step(&r, VmmSeen::None, true), Step::BeginDelete);
    }

    #[test]
    fn a_new_machine_is_prepared_and_stays_pending() {
        let mut r = rec(S::Pending, Desired::Stopped);
        r.prepared = false;
        r.observed_generation = 1;
        assert_eq!(next_step(&r, VmmSeen::None, true), Step::Prepare);
        r.prepared = true;
        assert_eq!(next_step(&r, VmmSeen::None, true), Step::Idle);
        let mut r = rec(S::Pending, Desired::Deleted);
        r.prepared = false;
        assert_eq!(next_step(&r, VmmSeen::None, true), Step::BeginDelete);
    }

    /// Without a VMM and with no step under way, whatever the run chooses
    /// for any wanted state must be a transition the table accepts, or the
    /// run would retry a refused step forever. (`running`, `paused`,
    /// `stopping` and `suspending` always have a VMM recorded: a VMM that
    /// goes is observed through `ForgetVmm`, which clears it and moves the
    /// status in one commit. `deleting` only ever wants deletion.)
    #[test]
    fn with_nothing_running_every_chosen_step_is_one_the_table_accepts() {
        use crate::lifecycle::table::{on_observation, Observation as O};
        let without_vmm = [
            S::Pending,
            S::Starting,
            S::Stopped,
            S::Suspended,
            S::Failed,
            S::Deleting,
        ];
        let wanted = [
            Desired::Running,
            Desired::Paused,
            Desired::Suspended,
            Desired::Stopped,
            Desired::Deleted,
        ];
        for status in without_vmm {
            for desired in wanted {
                if status == S::Deleting && desired != Desired::Deleted {
                    continue;
                }
                for snapshot in [false, true] {
                    let mut r = rec(status, desired);
                    r.has_snapshot = snapshot;
                    let step = next_step(&r, VmmSeen::None, true);
                    let observed = match step {
                        Step::Spawn { .. } => Some(O::VmmSpawned),
                        Step::SettleStopped => Some(O::SettledStopped),
                        Step::BeginDelete => Some(O::DeleteBegun),
                        Step::Release | Step::Converged | Step::Idle | Step::Prepare => None,
                        other => panic!("{status} wanting {desired:?}: unexpected {other:?}"),
                    };
                    if let Some(o) = observed {
                        assert!(
                            on_observation(status, o).is_some(),
                            "{status} wanting {desired:?} (snapshot {snapshot}): the run would \
                             choose {step:?} and the table refuses {o:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn stop_of_a_machine_with_nothing_running_settles() {
        let mut r = rec(S::Failed, Desired::Stopped);
        r.failed_generation = Some(0);
        assert_eq!(next_step(&r, VmmSeen::None, true), Step::SettleStopped);
        let r = rec(S::Suspended, Desired::Stopped);
        assert_eq!(next_step(&r, VmmSeen::None, true), Step::SettleStopped);
    }

    #[test]
    fn a_probe_that_cannot_decide_backs_off_instead_of_stepping() {
        // Alive or gone, the run steps; unknown (EMFILE opening /proc or a
        // pidfd), it neither forgets the VMM nor trusts it: it backs off.
        let r = with_vmm(rec(S::Running, Desired::Stopped));
        assert_eq!(next(&r, Some(Liveness::Unknown), true), Next::BackOff);
        assert_eq!(
            next(&r, Some(Liveness::Alive), true),
            Next::Step(Step::Stop { kill: false })
        );
        assert_eq!(
            next(&r, Some(Liveness::Gone), true),
            Next::Step(Step::ForgetVmm(Observation::VmmLost))
        );
        let r = rec(S::Stopped, Desired::Running);
        assert_eq!(
            next(&r, None, true),
            Next::Step(Step::Spawn { restore: false })
        );
    }

    #[test]
    fn a_failure_is_current_only_at_its_generation_and_while_failed() {
        let mut r = rec(S::Failed, Desired::Running);
        assert!(!failure_current(&r));
        r.failed_generation = Some(r.generation);
        assert!(failure_current(&r));
        r.generation += 1;
        assert!(!failure_current(&r));
        let mut r = rec(S::Stopped, Desired::Stopped);
        r.failed_generation = Some(r.generation);
        assert!(!failure_current(&r));
    }

    #[test]
    fn the_restart_policy_decides_after_the_main_process_exits() {
        use hyperfleet_api::{RestartPolicy, RestartPolicyKind as K};
        let with = |policy: K, max_retries: Option<u32>, count: u32| {
            let mut r = rec(S::Stopped, Desired::Running);
            r.spec.restart = Some(RestartPolicy {
                policy,
                max_retries,
            });
            r.restart_count = count;
            r
        };
        // No policy, or `no`: never.
        let mut r = rec(S::Stopped, Desired::Running);
        assert_eq!(after_main_exit(&r, 1), AfterExit::Stay);
        r = with(K::No, None, 0);
        assert_eq!(after_main_exit(&r, 1), AfterExit::Stay);
        // `always`: whatever the code, however often.
        r = with(K::Always, None, 1000);
        assert_eq!(after_main_exit(&r, 0), AfterExit::Restart);
        assert_eq!(after_main_exit(&r, 3), AfterExit::Restart);
        // `on-failure`: a non-zero code, while retries are left.
        r = with(K::OnFailure, Some(2), 0);
        assert_eq!(after_main_exit(&r, 0), AfterExit::Stay);
        assert_eq!(after_main_exit(&r, 3), AfterExit::Restart);
        assert_eq!(after_main_exit(&r, 137), AfterExit::Restart);
        r.restart_count = 1;
        assert_eq!(after_main_exit(&r, 3), AfterExit::Restart);
        r.restart_count = 2;
        assert_eq!(after_main_exit(&r, 3), AfterExit::Stay);
        r = with(K::OnFailure, Some(0), 0);
        assert_eq!(after_main_exit(&r, 3), AfterExit::Stay);
        r = with(K::OnFailure, None, 2);
        assert_eq!(after_main_exit(&r, 3), AfterExit::Restart);
        r.restart_count = hyperfleet_api::DEFAULT_MAX_RETRIES;
        assert_eq!(after_main_exit(&r, 3), AfterExit::Stay);
        // A stop or delete asked for wins over any policy.
        for desired in [Desired::Stopped, Desired::Deleted, Desired::Suspended] {
            let mut r = with(K::Always, None, 0);
            r.desired = desired;
            assert_eq!(after_main_exit(&r, 3), AfterExit::Stay, "{desired:?}");
        }
        // A restart decided is a boot: the plan spawns the stopped machine
        // still wanted running.
        let r = with(K::Always, None, 1);
        assert_eq!(
            next_step(&r, VmmSeen::None, true),
            Step::Spawn { restore: false }
        );
    }

    #[test]
    fn quiescent_and_background_only_machines() {
        // Converged and nothing running: no run needed.
        let mut r = rec(S::Stopped, Desired::Stopped);
        r.observed_generation = r.generation;
        assert!(quiescent(&r) && !background_only(&r));
        // Not yet converged, a VMM recorded, or a step under way: it needs one.
        r.observed_generation = 0;
        assert!(!quiescent(&r));
        let mut r = with_vmm(rec(S::Running, Desired::Running));
        r.observed_generation = r.generation;
        assert!(!quiescent(&r));
        let mut r = rec(S::Stopped, Desired::Stopped);
        r.observed_generation = r.generation;
        r.current_step = Some(crate::lifecycle::steps::RELEASE.into());
        assert!(!quiescent(&r));
        // Unprepared and never asked for anything: background work.
        let mut r = rec(S::Pending, Desired::Stopped);
        r.observed_generation = r.generation;
        r.prepared = false;
        assert!(background_only(&r) && !quiescent(&r));
        // A start wants it now.
        r.desired = Desired::Running;
        assert!(!background_only(&r));
        // A failure nobody asked to retry needs no run.
        let mut r = rec(S::Failed, Desired::Running);
        r.failed_generation = Some(r.generation);
        r.observed_generation = r.generation;
        assert!(quiescent(&r));
    }
}

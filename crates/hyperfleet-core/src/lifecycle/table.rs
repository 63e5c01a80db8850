//! The transition table: the single source of truth for what a machine
//! accepts in each state, and which status changes the machine run may make.
//!
//! Two kinds of events exist. *Requests* come from the API; the table says
//! whether the current status allows them and which desired state they
//! record (the run does the work later). *Observations* come from the machine
//! run; the table says which status the machine moves to. The run asks the
//! table before every status change, so an impossible transition is a bug
//! that is caught and logged instead of silently written.

use std::fmt;

use hyperfleet_api::MachineStatus;
use MachineStatus::*;

use super::plan::failure_current;
pub use crate::store::Desired;
use crate::store::MachineRecord;

/// What an API request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Request {
    Start,
    Stop,
    Restart,
    Pause,
    Resume,
    /// Immediate hard stop: no graceful shutdown.
    Kill,
    Suspend,
    /// Delete a machine that runs nothing.
    Delete,
    /// Delete whatever the state: stop first, then release everything.
    ForceDelete,
}

impl Request {
    pub const ALL: [Request; 9] = [
        Request::Start,
        Request::Stop,
        Request::Restart,
        Request::Pause,
        Request::Resume,
        Request::Kill,
        Request::Suspend,
        Request::Delete,
        Request::ForceDelete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Request::Start => "start",
            Request::Stop => "stop",
            Request::Restart => "restart",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Kill => "kill",
            Request::Suspend => "suspend",
            Request::Delete => "delete",
            Request::ForceDelete => "delete?force=true",
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the machine run observed or completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Observation {
    /// A VMM process was spawned (boot or restore) or adopted mid-boot.
    VmmSpawned,
    /// The guest agent answered.
    AgentReady,
    /// A live VMM was re-adopted and found running / paused.
    AdoptedRunning,
    AdoptedPaused,
    PauseDone,
    ResumeDone,
    /// A stop (graceful or kill) began.
    StopBegun,
    /// The VMM is gone after a stop we asked for.
    VmmExited,
    /// The VMM vanished without being asked to (crash, OOM kill, killed
    /// from outside).
    VmmLost,
    /// The VMM exited without being asked to because its guest powered
    /// itself off (the console's last line is the kernel's "Power down").
    GuestPoweredOff,
    SuspendBegun,
    SuspendDone,
    /// A wake arrived mid-save: the save was abandoned and the same VMM
    /// continues.
    SuspendCancelled,
    /// A step failed; the machine holds no process afterwards.
    StepFailed,
    /// Nothing runs and `stopped` was asked for (from pending/failed/suspended).
    SettledStopped,
    DeleteBegun,
}

impl Observation {
    /// Every observation, for the tests that walk the table.
    #[cfg(test)]
    pub(crate) const ALL: [Observation; 16] = [
        Observation::VmmSpawned,
        Observation::AgentReady,
        Observation::AdoptedRunning,
        Observation::AdoptedPaused,
        Observation::PauseDone,
        Observation::ResumeDone,
        Observation::StopBegun,
        Observation::VmmExited,
        Observation::VmmLost,
        Observation::GuestPoweredOff,
        Observation::SuspendBegun,
        Observation::SuspendDone,
        Observation::SuspendCancelled,
        Observation::StepFailed,
        Observation::SettledStopped,
        Observation::DeleteBegun,
    ];
}

/// The change a request records when the table accepts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Intent {
    /// Reach this desired state (by the usual path: graceful stop, …).
    Want(Desired),
    /// Reboot the guest even though it is already running.
    Restart,
    /// Stop without a graceful shutdown.
    Kill,
}

impl Intent {
    /// The desired state the intent records.
    pub(crate) fn desired(self) -> Desired {
        match self {
            Intent::Want(d) => d,
            Intent::Restart => Desired::Running,
            Intent::Kill => Desired::Stopped,
        }
    }
}

/// What admitting a request does to a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Record the intent: a new generation the run works toward.
    Apply(Intent),
    /// The machine already wants exactly this; nothing is recorded.
    Unchanged,
    /// The current status does not allow the request (409 INVALID_STATE).
    Deny(Denied),
}

/// Why a request was refused: its status allows it not, or the machine is
/// to be deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Denied {
    pub request: Request,
    pub status: MachineStatus,
    /// A delete was accepted: only deletes are admitted from then on.
    pub deleting: bool,
}

const fn want(desired: Desired) -> Option<Intent> {
    Some(Intent::Want(desired))
}

const RESTART: Option<Intent> = Some(Intent::Restart);

const KILL: Option<Intent> = Some(Intent::Kill);

/// Admits `req` for the machine as recorded: the whole decision, so the
/// supervisor only saves what it says.
pub(crate) fn decide(rec: &MachineRecord, req: Request) -> Admission {
    let Some(intent) = on_request(rec.status, req) else {
        return Admission::Deny(Denied {
            request: req,
            status: rec.status,
            deleting: false,
        });
    };
    // An accepted delete is final, whatever the status still says: a start
    // admitted before the run began the delete would resurrect a machine
    // whose client was told it is being deleted (found by the chaos test).
    if rec.desired == Desired::Deleted && intent.desired() != Desired::Deleted {
        return Admission::Deny(Denied {
            request: req,
            status: rec.status,
            deleting: true,
        });
    }
    let escalate = intent == Intent::Kill && !rec.stop_kill;
    let unchanged = rec.desired == intent.desired() && intent != Intent::Restart && !escalate;
    // A failure sticks until a request; an unchanged desired state on a
    // failed machine is still a request to retry.
    if unchanged && !failure_current(rec) {
        Admission::Unchanged
    } else {
        Admission::Apply(intent)
    }
}

/// Records an admitted intent on the machine: a new generation, the desired
/// state, and what the run needs to carry it out (a restart to do, a stop
/// without grace). Operation id and event are the supervisor's.
pub(crate) fn apply(rec: &mut MachineRecord, intent: Intent) {
    let desired = intent.desired();
    rec.desired = desired;
    rec.generation += 1;
    if intent == Intent::Restart {
        rec.restart_seq += 1;
    }
    // The restart policy counts its boots since the last boot asked for.
    if intent == Intent::Restart
        || (desired == Desired::Running && matches!(rec.status, Pending | Stopped | Failed))
    {
        rec.restart_count = 0;
    }
    // An earlier kill stays asked for while the machine still goes down.
    rec.stop_kill = intent == Intent::Kill
        || (rec.stop_kill && matches!(desired, Desired::Stopped | Desired::Deleted));
}

/// The request half of the table. `None` means 409 INVALID_STATE.
pub(crate) fn on_request(status: MachineStatus, req: Request) -> Option<Intent> {
    use Desired as D;
    use Request as R;
    match (status, req) {
        (Pending, R::Start) => want(D::Running),
        (Pending, R::Delete | R::ForceDelete) => want(D::Deleted),
        (Pending, R::Stop | R::Restart | R::Pause | R::Resume | R::Kill | R::Suspend) => None,

        (Starting, R::Start) => want(D::Running),
        (Starting, R::Stop) => want(D::Stopped),
        (Starting, R::Restart) => RESTART,
        (Starting, R::Kill) => KILL,
        (Starting, R::ForceDelete) => want(D::Deleted),
        (Starting, R::Pause | R::Resume | R::Suspend | R::Delete) => None,

        (Running, R::Start | R::Resume) => want(D::Running),
        (Running, R::Stop) => want(D::Stopped),
        (Running, R::Restart) => RESTART,
        (Running, R::Pause) => want(D::Paused),
        (Running, R::Kill) => KILL,
        (Running, R::Suspend) => want(D::Suspended),
        (Running, R::ForceDelete) => want(D::Deleted),
        (Running, R::Delete) => None,

        (Paused, R::Resume) => want(D::Running),
        (Paused, R::Pause) => want(D::Paused),
        (Paused, R::Stop) => want(D::Stopped),
        (Paused, R::Restart) => RESTART,
        (Paused, R::Kill) => KILL,
        (Paused, R::Suspend) => want(D::Suspended),
        (Paused, R::ForceDelete) => want(D::Deleted),
        (Paused, R::Start | R::Delete) => None,

        (Stopping, R::Start) => want(D::Running),
        (Stopping, R::Stop) => want(D::Stopped),
        (Stopping, R::Kill) => KILL,
        (Stopping, R::ForceDelete) => want(D::Deleted),
        (Stopping, R::Restart | R::Pause | R::Resume | R::Suspend | R::Delete) => None,

        (Stopped, R::Start | R::Restart) => want(D::Running),
        (Stopped, R::Stop | R::Kill) => want(D::Stopped),
        (Stopped, R::Delete | R::ForceDelete) => want(D::Deleted),
        (Stopped, R::Pause | R::Resume | R::Suspend) => None,

        (Suspending, R::Suspend) => want(D::Suspended),
        (Suspending, R::Resume) => want(D::Running),
        (Suspending, R::Stop) => want(D::Stopped),
        (Suspending, R::Kill) => KILL,
        (Suspending, R::ForceDelete) => want(D::Deleted),
        (Suspending, R::Start | R::Restart | R::Pause | R::Delete) => None,

        (Suspended, R::Start | R::Resume) => want(D::Running),
        (Suspended, R::Suspend) => want(D::Suspended),
        (Suspended, R::Stop) => want(D::Stopped),
        (Suspended, R::Kill) => KILL,
        (Suspended, R::Delete | R::ForceDelete) => want(D::Deleted),
        (Suspended, R::Restart | R::Pause) => None,

        (Failed, R::Start | R::Restart) => want(D::Running),
        (Failed, R::Stop) => want(D::Stopped),
        (Failed, R::Kill) => KILL,
        (Failed, R::Delete | R::ForceDelete) => want(D::Deleted),
        (Failed, R::Pause | R::Resume | R::Suspend) => None,

        (Deleting, R::Delete | R::ForceDelete) => want(D::Deleted),
        (
            Deleting,
            R::Start | R::Stop | R::Restart | R::Pause | R::Resume | R::Kill | R::Suspend,
        ) => None,
    }
}

/// The requests the table accepts in `status`, for error messages.
pub(crate) fn allowed_requests(status: MachineStatus) -> Vec<Request> {
    Request::ALL
        .into_iter()
        .filter(|r| on_request(status, *r).is_some())
        .collect()
}

/// The observation half of the table: the status the machine moves to, or
/// `None` when the observation cannot happen in that status.
pub(crate) fn on_observation(status: MachineStatus, obs: Observation) -> Option<MachineStatus> {
    use Observation as O;
    match (status, obs) {
        (Pending | Stopped | Failed | Suspended | Starting, O::VmmSpawned) => Some(Starting),
        (Running | Paused | Stopping | Suspending | Deleting, O::VmmSpawned) => None,

        (Starting, O::AgentReady) => Some(Running),
        (_, O::AgentReady) => None,

        // Re-adoption after a daemon restart: the VMM is alive and the run
        // found it answering; whatever status was recorded, this is the truth.
        (Starting | Running | Paused | Stopping | Suspending | Failed, O::AdoptedRunning) => {
            Some(Running)
        }
        (Starting | Running | Paused | Stopping | Suspending | Failed, O::AdoptedPaused) => {
            Some(Paused)
        }
        (Pending | Stopped | Suspended | Deleting, O::AdoptedRunning | O::AdoptedPaused) => None,

        (Running, O::PauseDone) => Some(Paused),
        (_, O::PauseDone) => None,
        (Paused, O::ResumeDone) => Some(Running),
        (_, O::ResumeDone) => None,

        (Starting | Running | Paused | Suspending | Failed | Stopping, O::StopBegun) => {
            Some(Stopping)
        }
        (Deleting, O::StopBegun) => Some(Deleting),
        (Pending | Stopped | Suspended, O::StopBegun) => None,

        (Stopping, O::VmmExited) => Some(Stopped),
        (Deleting, O::VmmExited) => Some(Deleting),
        (Failed, O::VmmExited) => Some(Failed),
        (
            Pending | Starting | Running | Paused | Stopped | Suspending | Suspended,
            O::VmmExited,
        ) => None,

        (Starting | Running | Paused | Suspending, O::VmmLost) => Some(Failed),
        (Stopping, O::VmmLost) => Some(Stopped),
        (Deleting, O::VmmLost) => Some(Deleting),
        (Failed, O::VmmLost) => Some(Failed),
        (Pending | Stopped | Suspended, O::VmmLost) => None,

        // Only a guest whose vCPUs run can power itself off.
        (Running | Stopping, O::GuestPoweredOff) => Some(Stopped),
        (Deleting, O::GuestPoweredOff) => Some(Deleting),
        (
            Pending | Starting | Paused | Stopped | Suspending | Suspended | Failed,
            O::GuestPoweredOff,
        ) => None,

        (Running | Paused, O::SuspendBegun) => Some(Suspending),
        (_, O::SuspendBegun) => None,
        (Suspending, O::SuspendDone) => Some(Suspended),
        (_, O::SuspendDone) => None,
        (Suspending, O::SuspendCancelled) => Some(Running),
        (_, O::SuspendCancelled) => None,

        (Deleting, O::StepFailed) => Some(Deleting),
        (_, O::StepFailed) => Some(Failed),

        // The run settles or begins a delete only when no VMM exists. A
        // machine can be `starting` without one — the daemon was killed
        // after the spawn intent and before a VMM existed, and a stop or a
        // delete arrived before the start was retried — and then stopped
        // (or deleting) is the truth.
        (Pending | Starting | Failed | Suspended | Stopped, O::SettledStopped) => Some(Stopped),
        (Running | Paused | Stopping | Suspending | Deleting, O::SettledStopped) => None,

        (Pending | Starting | Stopped | Failed | Suspended | Deleting, O::DeleteBegun) => {
            Some(Deleting)
        }
        (Running | Paused | Stopping | Suspending, O::DeleteBegun) => None,
    }
}

/// Could a machine now in `status`, moving toward `desired`, reach `target`
/// without a further request? Used by `GET /machines/{id}/wait` to fail
/// fast instead of waiting for a deadline that cannot be met.
pub(crate) fn reachable(status: MachineStatus, desired: Desired, target: MachineStatus) -> bool {
    if status == target {
        return true;
    }
    if target == Failed {
        // Anything that still has work to do can fail on the way.
        return status != Deleting && status != Stopped && status != Pending;
    }
    let path: &[MachineStatus] = match desired {
        Desired::Running => &[Starting, Running],
        Desired::Paused => &[Starting, Running, Paused],
        Desired::Stopped => &[Stopping, Stopped],
        Desired::Suspended => &[Suspending, Suspended],
        Desired::Deleted => &[Stopping, Deleting],
    };
    if path.contains(&target) {
        return true;
    }
    // Without a request, a live guest can still stop on its own (poweroff,
    // its main process exiting), a booting one once it runs.
    matches!(status, Starting | Running | Paused) && target == Stopped
}

/// docs/api.md's state table checked against this one.
#[cfg(test)]
mod docs;

#[cfg(test)]
mod tests {
    use super::*;

    /// The request table written out as a matrix, independently of the match
    /// above: rows are states, columns are requests in `Request::ALL` order
    /// (start stop restart pause resume kill suspend delete force-delete).
    /// `R` running, `r` restart, `P` paused, `S` stopped, `k` kill,
    /// `U` suspended, `D` deleted, `.` rejected.
    const EXPECTED: [(MachineStatus, &str); 10] = [
        (Pending, "R......DD"),
        (Starting, "RSr..k..D"),
        (Running, "RSrPRkU.D"),
        (Paused, ".SrPRkU.D"),
        (Stopping, "RS...k..D"),
        (Stopped, "RSR..S.DD"),
        (Suspending, ".S..RkU.D"),
        (Suspended, "RS..RkUDD"),
        (Failed, "RSR..k.DD"),
        (Deleting, ".......DD"),
    ];

    fn code(intent: Option<Intent>) -> char {
        match intent {
            None => '.',
            Some(Intent::Restart) => 'r',
            Some(Intent::Kill) => 'k',
            Some(Intent::Want(desired)) => match desired {
                Desired::Running => 'R',
                Desired::Paused => 'P',
                Desired::Stopped => 'S',
                Desired::Suspended => 'U',
                Desired::Deleted => 'D',
            },
        }
    }

    #[test]
    fn every_state_and_request_matches_the_matrix() {
        assert_eq!(EXPECTED.len(), MachineStatus::ALL.len());
        for (status, row) in EXPECTED {
            let got: String = Request::ALL
                .into_iter()
                .map(|r| code(on_request(status, r)))
                .collect();
            assert_eq!(got, row, "requests accepted in {status}");
        }
    }

    /// Observation matrix, columns in `Observation::ALL` order. Each cell is
    /// the first letter code of the resulting status or `.` when impossible:
    /// p pending, s starting, R running, P paused, x stopping, S stopped,
    /// u suspending, U suspended, F failed, D deleting.
    const OBSERVED: [(MachineStatus, &str); 10] = [
        (Pending, "s............FSD"),
        (Starting, "sRRP..x.F....FSD"),
        (Running, "..RPP.x.FSu..F.."),
        (Paused, "..RP.Rx.F.u..F.."),
        (Stopping, "..RP..xSSS...F.."),
        (Stopped, "s............FSD"),
        (Suspending, "..RP..x.F..URF.."),
        (Suspended, "s............FSD"),
        (Failed, "s.RP..xFF....FSD"),
        (Deleting, "......DDDD...D.D"),
    ];

    fn letter(s: Option<MachineStatus>) -> char {
        match s {
            None => '.',
            Some(Pending) => 'p',
            Some(Starting) => 's',
            Some(Running) => 'R',
            Some(Paused) => 'P',
            Some(Stopping) => 'x',
            Some(Stopped) => 'S',
            Some(Suspending) => 'u',
            Some(Suspended) => 'U',
            Some(Failed) => 'F',
            Some(Deleting) => 'D',
        }
    }

    #[test]
    fn every_state_and_observation_matches_the_matrix() {
        for (status, row) in OBSERVED {
            let got: String = Observation::ALL
                .into_iter()
                .map(|o| letter(on_observation(status, o)))
                .collect();
            assert_eq!(got, row, "observations in {status}");
        }
    }

    /// Every status some sequence of observations reaches from `from`
    /// (`from` included).
    pub(super) fn reached_by_observations(from: MachineStatus) -> Vec<MachineStatus> {
        let mut seen = vec![from];
        let mut frontier = vec![from];
        while let Some(s) = frontier.pop() {
            for o in Observation::ALL {
                if let Some(n) = on_observation(s, o) {
                    if !seen.contains(&n) {
                        seen.push(n);
                        frontier.push(n);
                    }
                }
            }
        }
        seen
    }

    #[test]
    fn every_accepted_request_leads_somewhere_the_run_can_reach() {
        // For each accepted request, the desired state must be reachable by
        // observations alone, starting from the current status.
        for status in MachineStatus::ALL {
            for req in Request::ALL {
                let Some(intent) = on_request(status, req) else {
                    continue;
                };
                let goal = intent.desired().as_status();
                assert!(
                    reached_by_observations(status).contains(&goal),
                    "{req} from {status} wants {goal}, unreachable"
                );
            }
        }
    }

    #[test]
    fn allowed_lists_match_the_table() {
        assert_eq!(
            allowed_requests(Deleting),
            vec![Request::Delete, Request::ForceDelete]
        );
        assert!(allowed_requests(Running).contains(&Request::Pause));
        assert!(!allowed_requests(Running).contains(&Request::Delete));
    }

    use crate::lifecycle::test_machine as machine;

    const WANTED: [Desired; 5] = [
        Desired::Running,
        Desired::Paused,
        Desired::Stopped,
        Desired::Suspended,
        Desired::Deleted,
    ];

    /// Every status, desired state, request and kill flag, with and without
    /// a current failure: admission denies exactly what the table refuses,
    /// is `Unchanged` exactly when nothing new would be asked for, and an
    /// applied intent always opens a new generation toward its desired state.
    #[test]
    fn admission_is_decided_for_every_record_and_request() {
        for status in MachineStatus::ALL {
            for desired in WANTED {
                for stop_kill in [false, true] {
                    for failed in [false, true] {
                        for req in Request::ALL {
                            let mut r = machine(status, desired);
                            r.stop_kill = stop_kill;
                            r.failed_generation = failed.then_some(r.generation);
                            let got = decide(&r, req);
                            let Some(intent) = on_request(status, req) else {
                                assert_eq!(
                                    got,
                                    Admission::Deny(Denied {
                                        request: req,
                                        status,
                                        deleting: false,
                                    })
                                );
                                continue;
                            };
                            if desired == Desired::Deleted && intent.desired() != Desired::Deleted {
                                assert_eq!(
                                    got,
                                    Admission::Deny(Denied {
                                        request: req,
                                        status,
                                        deleting: true,
                                    }),
                                    "{req} on {status} after a delete was accepted"
                                );
                                continue;
                            }
                            let retry = failed && status == Failed;
                            // Nothing new: the same state by the usual path,
                            // or a kill already asked for.
                            let same = match intent {
                                Intent::Want(d) => d == desired,
                                Intent::Restart => false,
                                Intent::Kill => desired == Desired::Stopped && stop_kill,
                            };
                            let want = if same && !retry {
                                Admission::Unchanged
                            } else {
                                Admission::Apply(intent)
                            };
                            assert_eq!(
                                got, want,
                                "{req} on {status} wanting {desired:?} (kill {stop_kill}, failed {failed})"
                            );
                            if let Admission::Apply(i) = got {
                                let before = r.clone();
                                apply(&mut r, i);
                                assert_eq!(r.generation, before.generation + 1);
                                assert_eq!(r.desired, i.desired());
                                assert_eq!(
                                    r.restart_seq,
                                    before.restart_seq + u64::from(i == Intent::Restart)
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn admission_cases_that_matter() {
        // Asking again for what is wanted records nothing...
        let r = machine(Running, Desired::Running);
        assert_eq!(decide(&r, Request::Start), Admission::Unchanged);
        // ...unless the machine failed at this generation: that is a retry.
        let mut r = machine(Failed, Desired::Running);
        r.failed_generation = Some(r.generation);
        assert_eq!(
            decide(&r, Request::Start),
            Admission::Apply(Intent::Want(Desired::Running))
        );
        // A restart always reboots.
        let r = machine(Running, Desired::Running);
        assert_eq!(
            decide(&r, Request::Restart),
            Admission::Apply(Intent::Restart)
        );
        // A kill escalates a graceful stop under way, once.
        let mut r = machine(Stopping, Desired::Stopped);
        assert_eq!(decide(&r, Request::Kill), Admission::Apply(Intent::Kill));
        apply(&mut r, Intent::Kill);
        assert!(r.stop_kill);
        assert_eq!(decide(&r, Request::Kill), Admission::Unchanged);
        // A delete keeps the kill asked for; a start drops it.
        let mut d = r.clone();
        apply(&mut d, Intent::Want(Desired::Deleted));
        assert!(d.stop_kill);
        apply(&mut r, Intent::Want(Desired::Running));
        assert!(!r.stop_kill);
        // A start of a stopped machine, or a restart, begins the restart
        // policy's count anew; a resume does not.
        let mut r = machine(Stopped, Desired::Stopped);
        r.restart_count = 2;
        apply(&mut r, Intent::Want(Desired::Running));
        assert_eq!(r.restart_count, 0);
        let mut r = machine(Paused, Desired::Paused);
        r.restart_count = 2;
        apply(&mut r, Intent::Want(Desired::Running));
        assert_eq!(r.restart_count, 2);
        apply(&mut r, Intent::Restart);
        assert_eq!(r.restart_count, 0);
        // Refused requests name the status.
        let r = machine(Deleting, Desired::Deleted);
        assert_eq!(
            decide(&r, Request::Start),
            Admission::Deny(Denied {
                request: Request::Start,
                status: Deleting,
                deleting: false,
            })
        );
        // Before the run begins the delete, the status still says running:
        // the accepted delete is what refuses.
        let r = machine(Running, Desired::Deleted);
        assert_eq!(
            decide(&r, Request::Start),
            Admission::Deny(Denied {
                request: Request::Start,
                status: Running,
                deleting: true,
            })
        );
    }

    #[test]
    fn reachability_fails_fast_where_it_should() {
        assert!(!reachable(Stopped, Desired::Stopped, Running));
        assert!(reachable(Stopped, Desired::Running, Running));
        assert!(reachable(Running, Desired::Running, Stopped));
        // A booting guest (a restart policy's boot too) may stop by itself.
        assert!(reachable(Starting, Desired::Running, Stopped));
        assert!(!reachable(Stopped, Desired::Stopped, Failed));
        assert!(reachable(Starting, Desired::Running, Failed));
        assert!(!reachable(Deleting, Desired::Deleted, Running));
    }
}

/// Random histories of requests and observations, applied the way the
/// supervisor (`decide` + `apply`) and the run (`on_observation`, refusing
/// what the table forbids; a failure recorded at the current generation)
/// apply them. Checked after every event:
/// - requests never change the status; the status changes only along a cell
///   of the observation table, so it stays among the statuses the table
///   reaches from `pending`, `pending` is never re-entered and `deleting` is
///   never left;
/// - a request is admitted only where its row allows it, and then with the
///   row's intent; a refused or unchanged request leaves the record as it was;
/// - generation only grows, by one per admitted request and never otherwise;
///   restart_seq grows by one per admitted restart;
/// - an accepted delete is final, and a kill is only asked for on the way
///   down (stopped or deleted).
#[cfg(test)]
mod prop {
    use super::tests::reached_by_observations;
    use super::*;
    use crate::lifecycle::test_machine as machine;
    use proptest::prelude::*;
    use proptest::sample::select;

    #[derive(Debug, Clone, Copy)]
    enum Event {
        Request(Request),
        Observation(Observation),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            select(Request::ALL.to_vec()).prop_map(Event::Request),
            select(Observation::ALL.to_vec()).prop_map(Event::Observation),
        ]
    }

    /// The fields requests and observations may change.
    fn state(r: &MachineRecord) -> (MachineStatus, Desired, u64, u64, bool, Option<u64>) {
        (
            r.status,
            r.desired,
            r.generation,
            r.restart_seq,
            r.stop_kill,
            r.failed_generation,
        )
    }

    proptest! {
        #[test]
        fn histories_stay_inside_the_table(
            start_desired in select(vec![Desired::Stopped, Desired::Running]),
            events in proptest::collection::vec(event(), 0..60),
        ) {
            let reachable = reached_by_observations(Pending);
            let mut r = machine(Pending, start_desired);
            let mut left_pending = false;
            for ev in events {
                let before = r.clone();
                match ev {
                    Event::Request(req) => {
                        let row = on_request(before.status, req);
                        match decide(&r, req) {
                            Admission::Apply(intent) => {
                                prop_assert_eq!(Some(intent), row, "{} in {}", req, before.status);
                                apply(&mut r, intent);
                                prop_assert_eq!(r.generation, before.generation + 1);
                                prop_assert_eq!(
                                    r.restart_seq,
                                    before.restart_seq + u64::from(intent == Intent::Restart)
                                );
                                prop_assert_eq!(r.desired, intent.desired());
                                prop_assert_eq!(r.status, before.status);
                            }
                            Admission::Unchanged => {
                                prop_assert!(row.is_some(), "{} unchanged in {}", req, before.status);
                                prop_assert_eq!(state(&r), state(&before));
                            }
                            Admission::Deny(d) => {
                                prop_assert_eq!(d.request, req);
                                prop_assert_eq!(d.status, before.status);
                                prop_assert_eq!(d.deleting, row.is_some());
                                prop_assert!(!d.deleting || before.desired == Desired::Deleted);
                                prop_assert_eq!(state(&r), state(&before));
                            }
                        }
                        if before.status == Deleting {
                            prop_assert!(
                                matches!(req, Request::Delete | Request::ForceDelete)
                                    || state(&r) == state(&before),
                                "{} changed a deleting machine",
                                req
                            );
                        }
                    }
                    Event::Observation(obs) => {
                        // What the run's journal does: a forbidden
                        // transition is refused and the status kept.
                        if let Some(next) = on_observation(r.status, obs) {
                            r.status = next;
                            if next == Failed && before.status != Failed && r.desired != Desired::Deleted {
                                r.failed_generation = Some(r.generation);
                            }
                        }
                        prop_assert_eq!(r.generation, before.generation);
                        prop_assert_eq!(r.desired, before.desired);
                    }
                }
                left_pending |= r.status != Pending;
                prop_assert!(reachable.contains(&r.status));
                prop_assert!(!(left_pending && r.status == Pending), "pending re-entered");
                prop_assert!(before.status != Deleting || r.status == Deleting, "left deleting");
                prop_assert!(
                    before.desired != Desired::Deleted || r.desired == Desired::Deleted,
                    "an accepted delete was undone by {:?}",
                    ev
                );
                prop_assert!(
                    !r.stop_kill || matches!(r.desired, Desired::Stopped | Desired::Deleted),
                    "kill asked for while wanting {:?}",
                    r.desired
                );
                prop_assert!(r.generation >= before.generation);
            }
        }
    }
}

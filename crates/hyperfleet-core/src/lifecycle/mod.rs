//! Machine lifecycle: the transition table, the run's decision logic, the
//! run that carries steps out, and the supervisor that owns one run per
//! machine and hands API requests over to it.

pub mod capacity;
pub(crate) mod evictor;
pub mod guest_access;
pub mod idle;
pub(crate) mod plan;
pub mod run;
pub mod snapshots;
pub mod storage;
pub mod supervisor;
pub mod sweep;
pub mod table;

pub use supervisor::{LifecycleError, Supervisor, WaitOutcome};

/// Step names as journaled and shown in events (stored data: they live
/// with the store's records).
pub use crate::store::steps;

/// A stub machine in `status` wanting `desired`, as created otherwise: the
/// record the decision tests start from.
#[cfg(test)]
pub(crate) fn test_machine(
    status: hyperfleet_api::MachineStatus,
    desired: table::Desired,
) -> crate::store::MachineRecord {
    let (_, spec) =
        crate::validate::validate_create(Default::default(), hyperfleet_api::VmmKind::Stub)
            .expect("an empty create request is valid");
    let mut r =
        crate::store::MachineRecord::new("m000000000000000".into(), "default", "t".into(), spec, 0);
    r.status = status;
    r.desired = desired;
    r
}

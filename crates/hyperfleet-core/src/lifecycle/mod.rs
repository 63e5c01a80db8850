//! Machine lifecycle: the transition table, the run's decision logic, the
//! run that carries steps out, and the supervisor that owns one run per
//! machine and hands API requests over to it.

pub(crate) mod plan;
pub mod run;
pub mod supervisor;
pub mod sweep;
pub mod table;

pub use supervisor::{LifecycleError, Supervisor, WaitOutcome};

/// Step names as journaled and shown in events (stored data: they live
/// with the store's records).
pub use crate::store::steps;

//! Machine lifecycle: the transition table, the run's decision logic, the
//! run that carries steps out, and the supervisor that owns one run per
//! machine and hands API requests over to it.

pub mod guest_access;
pub mod plan;
pub mod run;
pub mod supervisor;
pub mod sweep;
pub mod table;

pub use supervisor::{LifecycleError, Supervisor, WaitOutcome};

/// Step names as journaled and shown in events.
pub mod steps {
    pub const PREPARE: &str = "prepare_disk";
    pub const SPAWN: &str = "spawn_vmm";
    pub const LEASE: &str = "lease_network";
    pub const UID: &str = "lease_uid";
    pub const TAP: &str = "create_tap";
    pub const RULES: &str = "apply_firewall";
    pub const ADOPT: &str = "adopt_vmm";
    pub const WAIT_READY: &str = "wait_agent";
    pub const VERIFY: &str = "verify_vmm";
    pub const PAUSE: &str = "pause_vcpus";
    pub const RESUME: &str = "resume_vcpus";
    pub const GRACEFUL_STOP: &str = "graceful_shutdown";
    pub const KILL: &str = "kill_vmm";
    pub const SAVE_STATE: &str = "save_memory";
    pub const DISCARD_SNAPSHOT: &str = "discard_snapshot";
    pub const RELEASE: &str = "release_resources";
    pub const FORGET: &str = "vmm_gone";
}

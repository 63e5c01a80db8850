//! Wire types of the Hyperfleet REST API.
//!
//! This crate owns the JSON shapes that cross the HTTP boundary — requests,
//! responses, the error envelope and its codes — and their OpenAPI schemas. It
//! holds no logic beyond parsing names of enums, so that the daemon, the
//! client and the CLI agree on one definition and the OpenAPI document is
//! generated from the same types the server serialises.

mod error;
mod events;
mod guest;
mod health;
mod image;
mod keys;
mod machine;
mod quota;
pub mod schema;
mod snapshot;
mod storage;
mod whole;

pub use error::{ErrorBody, ErrorCode, ErrorDetail};
pub use events::{EventList, MachineEvent, StepTiming};
pub use guest::{
    DirEntry, DirListing, ExecRequest, ExecResult, ExecStreamEvent, FileContent, FileStat,
    FileWrite, FileWritten,
};
pub use health::{BackendHealth, Health, StoreHealth};
pub use image::{
    Image, ImageEvent, ImageEventList, ImageLayer, ImageList, ImageRunConfig, ImageStatus,
    PullImageRequest, RegistryAuth,
};
pub use keys::{ApiKey, CreateKeyRequest, CreatedKey, KeyList, Scope};
pub use machine::{
    CreateMachineRequest, Machine, MachineList, MachineNetwork, MachineOciImage, MachineProcess,
    MachineStatus, NetworkRequest, Persistence, PersistenceType, RestartPolicy, RestartPolicyKind,
    UpdateMachineRequest, VmmKind, DEFAULT_MAX_RETRIES, LIMITS, MAX_RETRIES_MAX,
};
pub use quota::{Quota, QuotaLimits, QuotaUsage};
pub use snapshot::{
    CreateSnapshotRequest, CreateTemplateRequest, ForkRequest, ForkResult, Snapshot, SnapshotList,
    SnapshotStatus, FORK_MAX,
};
pub use storage::{Storage, StorageEviction};

/// The prefix every API key starts with, so that leaked keys are easy to
/// recognise by secret scanners and operators.
pub const API_KEY_PREFIX: &str = "hf_";

//! Snapshots (a machine's disk, and its memory when it had a live or saved
//! guest, kept as an image new machines start from) and forks.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::machine::{Machine, VmmKind};

/// Where a snapshot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotStatus {
    /// The machine's run is taking it.
    Creating,
    /// Complete; machines can be created from it.
    Ready,
    /// Taking it failed (`error_message` says why); nothing of it is kept.
    Failed,
    /// Deleted while machines still use it as their base: its files go when
    /// the last of them goes. Not listed, and no new machine can use it.
    Deleting,
}

impl SnapshotStatus {
    pub const ALL: [SnapshotStatus; 4] = [
        SnapshotStatus::Creating,
        SnapshotStatus::Ready,
        SnapshotStatus::Failed,
        SnapshotStatus::Deleting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotStatus::Creating => "creating",
            SnapshotStatus::Ready => "ready",
            SnapshotStatus::Failed => "failed",
            SnapshotStatus::Deleting => "deleting",
        }
    }

    pub fn parse(s: &str) -> Option<SnapshotStatus> {
        SnapshotStatus::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl std::fmt::Display for SnapshotStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub id: String,
    /// Unique per tenant when set.
    pub name: Option<String>,
    /// The machine it was taken of (which may since have been deleted).
    pub machine_id: String,
    pub status: SnapshotStatus,
    /// Whether it holds the guest's memory (taken of a running, paused or
    /// suspended machine): machines created from it then continue the
    /// guest's processes instead of booting. A stopped machine's snapshot
    /// holds its disk only.
    pub memory: bool,
    /// Bytes its files take on the host's disk.
    pub size_bytes: u64,
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    /// The guest image (asset set id) under its disk.
    pub image: Option<String>,
    pub vmm: VmmKind,
    /// How long the machine's vCPUs were stopped to take it (memory
    /// snapshots of a running machine); null otherwise.
    pub pause_ms: Option<f64>,
    /// Machines created from it that still exist.
    pub used_by: u64,
    /// Why it is `failed`.
    pub error_message: Option<String>,
    pub created_at: String,
}

/// `POST /machines/{id}/snapshots`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// A DNS label unique among the tenant's snapshots (same rules as
    /// machine names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        max_length = 63,
        pattern = "^(?!s[0-9a-hjkmnp-tv-z]{15}$)[a-z]([a-z0-9-]*[a-z0-9])?$"
    )]
    pub name: Option<String>,
}

/// `GET /snapshots`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
}

/// `POST /machines/{id}/fork`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// How many copies, 1–16; default 1 (or the number of `names`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[schema(minimum = 1, maximum = 16)]
    pub count: Option<u32>,
    /// Names of the copies (machine name rules), as many as `count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::fork_names)]
    pub names: Option<Vec<String>>,
}

/// The most copies one fork makes.
pub const FORK_MAX: u32 = 16;

/// `POST /machines/{id}/fork`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ForkResult {
    /// The new machines, in the order of `names`.
    pub machines: Vec<Machine>,
    /// The snapshot the copies were made from (deleted at once; its files
    /// go with the last copy).
    pub snapshot_id: String,
    /// How long the source's vCPUs were stopped.
    pub pause_ms: Option<f64>,
}

/// `POST /templates`: warm the template of a machine size (a snapshot of a
/// freshly booted, idle guest that creates of that size restore instead of
/// booting).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplateRequest {
    /// 1–32; default 1.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[schema(minimum = 1, maximum = 32)]
    pub vcpu_count: Option<u32>,
    /// 128–65536 MiB; default 256.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[schema(minimum = 128, maximum = 65536)]
    pub mem_size_mib: Option<u32>,
    /// The backend; defaults to the server's `--default-vmm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<VmmKind>,
}

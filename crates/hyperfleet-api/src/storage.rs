//! `GET /storage`: the storage budget and what the data directory holds.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The storage budget and its use (docs/api.md "Persistence").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Storage {
    /// Bytes the machines' disks, memory images and snapshots may hold
    /// together (`--storage-budget`, or the default measured at start).
    pub budget_bytes: u64,
    /// `flag` (`--storage-budget`) or `default` (what the data directory
    /// held at start plus 80 % of its filesystem's free space then).
    pub budget_source: String,
    /// What counts against the budget: `machines_bytes +
    /// memory_images_bytes + snapshots_bytes`.
    pub used_bytes: u64,
    /// Machines' disks and their other files (allocated bytes).
    pub machines_bytes: u64,
    /// Suspended machines' memory images.
    pub memory_images_bytes: u64,
    /// Snapshots (`/snapshots`, templates, forks in flight).
    pub snapshots_bytes: u64,
    /// OCI images (`/images`): shown, not counted against the budget (the
    /// evictor never removes them; delete unused images instead).
    pub images_bytes: u64,
    /// What the evictor could free now: sticky machines that are not
    /// running, their memory images included.
    pub reclaimable_bytes: u64,
    /// Machines measured.
    pub machines: u64,
    /// Memory images evicted since the daemon started.
    pub evicted_memory_images: u64,
    /// Machines evicted (deleted) since the daemon started.
    pub evicted_machines: u64,
    /// When the figures were last measured (RFC 3339); null before the
    /// first measurement.
    pub measured_at: Option<String>,
    /// The latest evictions (at most 100), oldest first.
    pub recent_evictions: Vec<StorageEviction>,
}

/// One eviction the evictor carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StorageEviction {
    pub machine_id: String,
    pub machine_name: String,
    /// `memory_image` (the machine went from suspended to stopped) or
    /// `machine` (it was deleted).
    pub what: String,
    /// What it held when evicted.
    pub bytes: u64,
    pub at: String,
}

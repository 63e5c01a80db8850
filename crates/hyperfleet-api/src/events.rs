//! A machine's history: one event per transition or accepted request, with
//! the steps the machine run took and how long each took.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::MachineStatus;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MachineEvent {
    /// Monotonic sequence number of the event across the host.
    pub id: i64,
    pub machine_id: String,
    /// RFC 3339 time the event was recorded.
    pub at: String,
    /// `created`, `requested` (an API request changed the desired state),
    /// `transition` (the observed status changed), `steps` (work that
    /// changed no status, e.g. create-time preparation) or `deleted`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_status: Option<MachineStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_status: Option<MachineStatus>,
    /// The request that caused this event (`op_…`), when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The steps taken to reach `to_status`, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepTiming>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StepTiming {
    /// e.g. `prepare_disk`, `spawn_vmm`, `wait_agent`, `graceful_shutdown`.
    pub step: String,
    pub duration_ms: f64,
    /// `ok` or `failed`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventList {
    pub events: Vec<MachineEvent>,
}

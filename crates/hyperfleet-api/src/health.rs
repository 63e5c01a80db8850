//! `GET /health`: liveness plus the readiness of the store and backends.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::VmmKind;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` when the store answers and the default backend is usable,
    /// `degraded` otherwise.
    pub status: String,
    pub version: String,
    pub store: StoreHealth,
    pub backends: Vec<BackendHealth>,
    pub default_vmm: VmmKind,
    pub machines: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StoreHealth {
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackendHealth {
    pub vmm: VmmKind,
    pub available: bool,
    pub detail: String,
}

//! `GET /storage`: the storage budget, what the data directory holds and
//! the latest evictions (`lifecycle::storage`, `lifecycle::evictor`).
//! Host-wide numbers, so, like `/metrics`, only the operator's keys
//! (tenant `default`) with the `read` scope may read them.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::Json;
use hyperfleet_api::{ErrorCode, Scope, Storage, StorageEviction};

use super::error::ApiError;
use super::extract::Caller;
use super::keys::is_operator;
use super::AppState;
use crate::util::rfc3339;

#[utoipa::path(get, path = "/storage", tag = "storage",
    description = "The storage budget (`--storage-budget`), what counts against it (machines' \
                   disks, memory images, snapshots; allocated bytes, as last measured), OCI \
                   images beside it, what the evictor could free, and its latest evictions \
                   (docs/api.md \"Persistence\"). Host-wide: needs the `read` scope on a key of \
                   the operator's tenant (`default`).",
    responses((status = 200, description = "The budget and its use", body = Storage),
              (status = 403, description = "The key lacks the `read` scope, or belongs to another tenant than the operator's (FORBIDDEN)",
                body = hyperfleet_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn storage(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Storage>, ApiError> {
    let p = caller.require(Scope::Read)?;
    if !is_operator(p) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "storage covers every tenant: only keys of the operator's tenant ('default') may read it",
        ));
    }
    let st = &state.sup.ctx().storage;
    let t = st.totals();
    let reclaimable = state.sup.reclaimable_bytes()?;
    Ok(Json(Storage {
        budget_bytes: st.budget(),
        budget_source: st.source().as_str().to_string(),
        used_bytes: t.used(),
        machines_bytes: t.machines,
        memory_images_bytes: t.memory_images,
        snapshots_bytes: t.snapshots,
        images_bytes: t.images,
        reclaimable_bytes: reclaimable,
        machines: t.machine_count,
        evicted_memory_images: st.evicted_images.load(Ordering::Relaxed),
        evicted_machines: st.evicted_machines.load(Ordering::Relaxed),
        measured_at: st.measured_at().map(rfc3339),
        recent_evictions: st
            .recent_evictions()
            .into_iter()
            .map(|e| StorageEviction {
                machine_id: e.machine_id,
                machine_name: e.machine_name,
                what: e.what.to_string(),
                bytes: e.bytes,
                at: rfc3339(e.at),
            })
            .collect(),
    }))
}

//! `GET /health` (no auth): liveness plus store and backend readiness.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hyperfleet_api::{BackendHealth, Health, StoreHealth};

use super::AppState;

#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, description = "Healthy", body = Health),
              (status = 503, description = "Store or default backend unusable", body = Health)))]
pub async fn health(State(state): State<AppState>) -> Response {
    let store =
        match tokio::time::timeout(std::time::Duration::from_secs(2), state.store.ping()).await {
            Ok(Ok(())) if state.store.disk_full() => StoreHealth {
                ok: false,
                detail: "the disk holding the database is full: changes fail with 507 \
                         INSUFFICIENT_STORAGE until space is freed and a write succeeds"
                    .into(),
            },
            Ok(Ok(())) => StoreHealth {
                ok: true,
                detail: format!(
                    "{} (schema {})",
                    state.store.path().display(),
                    crate::store::schema_version()
                ),
            },
            Ok(Err(e)) => StoreHealth {
                ok: false,
                detail: e.to_string(),
            },
            Err(_) => StoreHealth {
                ok: false,
                detail: "the store did not answer within 2 s".into(),
            },
        };
    let backends: Vec<BackendHealth> = state
        .sup
        .backend_health()
        .into_iter()
        .map(|b| BackendHealth {
            vmm: b.vmm,
            available: b.available,
            detail: b.detail,
        })
        .collect();
    let default_ok = backends
        .iter()
        .any(|b| b.vmm == state.default_vmm && b.available);
    let ok = store.ok && default_ok;
    let body = Health {
        status: if ok { "ok" } else { "degraded" }.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        store,
        backends,
        default_vmm: state.default_vmm,
        machines: state.store.machine_count() as u64,
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

//! The REST API: routing, auth, the error envelope. Handlers validate and
//! hand over to the lifecycle supervisor; no lifecycle work happens here.

pub mod error;
pub mod events;
pub mod extract;
pub mod guest;
pub mod health;
pub mod images;
pub mod keys;
pub mod machines;
pub mod metrics;
pub mod openapi;
pub mod quota;
pub mod server;
pub mod snapshots;
mod sse;
pub mod storage;
pub mod ui;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyperfleet_api::{ErrorCode, VmmKind};

use crate::lifecycle::Supervisor;
use crate::store::Store;
use error::ApiError;

/// Largest request body accepted (JSON routes).
pub const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Clone)]
pub struct AppState {
    pub sup: Arc<Supervisor>,
    pub store: Store,
    pub auth_disabled: bool,
    pub default_vmm: VmmKind,
    /// Proxy URLs for the machine JSON; None when the proxy is off.
    pub urls: Option<Arc<crate::urls::UrlTemplate>>,
    /// Bounds on guest requests (exec, files, logs).
    pub guest: Arc<guest::GuestSlots>,
    /// OCI images (records, pulls, imports).
    pub images: Arc<crate::images::service::ImageService>,
}

fn api_routes() -> Router<AppState> {
    Router::new()
        .route("/health", get(health::health))
        .route("/openapi.json", get(openapi_json))
        .route("/metrics", get(metrics::metrics))
        .route("/storage", get(storage::storage))
        .route("/machines", get(machines::list).post(machines::create))
        .route(
            "/machines/{id}",
            get(machines::get)
                .patch(machines::update)
                .delete(machines::delete),
        )
        .route("/machines/{id}/start", post(machines::start))
        .route("/machines/{id}/stop", post(machines::stop))
        .route("/machines/{id}/restart", post(machines::restart))
        .route("/machines/{id}/pause", post(machines::pause))
        .route("/machines/{id}/resume", post(machines::resume))
        .route("/machines/{id}/kill", post(machines::kill))
        .route("/machines/{id}/suspend", post(machines::suspend))
        .route("/machines/{id}/wait", get(machines::wait))
        .route("/machines/{id}/events", get(machines::events))
        .route("/events", get(events::tenant_events))
        .route("/machines/{id}/exec", post(guest::exec))
        .route("/machines/{id}/exec/ws", get(guest::exec_ws))
        .route(
            "/machines/{id}/files",
            get(guest::read)
                .post(guest::write_json)
                .put(guest::write_raw)
                .delete(guest::delete),
        )
        .route("/machines/{id}/files/stat", get(guest::stat))
        .route("/machines/{id}/files/list", get(guest::list))
        .route("/machines/{id}/files/mkdir", post(guest::mkdir))
        .route("/machines/{id}/logs", get(guest::logs))
        .route("/machines/{id}/snapshots", post(snapshots::create))
        .route("/machines/{id}/fork", post(snapshots::fork))
        .route("/snapshots", get(snapshots::list))
        .route(
            "/templates",
            get(snapshots::list_templates).post(snapshots::warm_template),
        )
        .route(
            "/templates/{id}",
            axum::routing::delete(snapshots::delete_template),
        )
        .route(
            "/snapshots/{id}",
            get(snapshots::get).delete(snapshots::delete),
        )
        .route("/keys", get(keys::list).post(keys::create))
        .route("/keys/{id}", axum::routing::delete(keys::revoke))
        .route("/images", get(images::list).post(images::pull))
        .route(
            "/images/import",
            // The archive streams through; no whole-body limit.
            post(images::import).layer(DefaultBodyLimit::disable()),
        )
        .route("/images/{id}", get(images::get).delete(images::delete))
        .route("/images/{id}/events", get(images::events))
        .route(
            "/tenants/{tenant}/quota",
            get(quota::get).put(quota::put).delete(quota::delete),
        )
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .nest("/api/v1", api_routes())
        .merge(api_routes())
        .merge(ui::routes())
        .fallback(not_found)
        .layer(axum::middleware::map_response(envelope_bare_errors))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(crate::metrics::TrackApi)
        .with_state(state)
}

async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi::document(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

/// Responses produced by the framework itself (405 for a wrong method, 413
/// from the body limit, 404s) carry plain text; give them the envelope.
async fn envelope_bare_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return resp;
    }
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            ErrorCode::MethodNotAllowed,
            "this method is not allowed on this path".to_string(),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            ErrorCode::PayloadTooLarge,
            format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        ),
        StatusCode::NOT_FOUND => (ErrorCode::NotFound, "no such route".to_string()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            ErrorCode::BadRequest,
            "unsupported content type; send application/json".to_string(),
        ),
        s if s.is_client_error() => (ErrorCode::BadRequest, format!("bad request ({s})")),
        s => (ErrorCode::InternalError, format!("internal error ({s})")),
    };
    let mut out = ApiError::new(code, message).into_response();
    *out.status_mut() = status;
    if let Some(allow) = resp.headers().get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

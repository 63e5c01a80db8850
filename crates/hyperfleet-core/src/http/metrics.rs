//! `GET /metrics`: the Prometheus scrape (the registry is `crate::metrics`).
//! Host-wide numbers, so only the operator's keys (tenant `default`) with
//! the `read` scope may read them.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use hyperfleet_api::{ErrorCode, Scope};

use super::error::ApiError;
use super::extract::Caller;
use super::keys::is_operator;
use super::AppState;

#[utoipa::path(get, path = "/metrics", tag = "metrics",
    description = "Prometheus metrics in the text exposition format (0.0.4): machines by status, \
                   transitions, step durations, API and proxy requests, store commits, VMM \
                   processes (docs/api.md \"Metrics\"). Host-wide: needs the `read` scope on a \
                   key of the operator's tenant (`default`).",
    responses((status = 200, description = "The metrics", body = String,
                content_type = "text/plain; version=0.0.4; charset=utf-8"),
              (status = 403, description = "The key lacks the `read` scope, or belongs to another tenant than the operator's (FORBIDDEN)",
                body = hyperfleet_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn metrics(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Read)?;
    if !is_operator(p) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "metrics cover every tenant: only keys of the operator's tenant ('default') may read them",
        ));
    }
    let text = crate::metrics::render(&state.store, &state.sup.ctx().storage)?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

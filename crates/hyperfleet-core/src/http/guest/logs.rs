//! The guest's serial console log: a tail, optionally followed.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{stream, StreamExt};
use hyperfleet_api::Scope;
use serde::Deserialize;
use utoipa::IntoParams;

use super::super::error::ApiError;
use super::super::extract::{Caller, Query};
use super::super::AppState;
use super::holding;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Only the last N lines (default 200, at most 100000).
    #[param(minimum = 0, maximum = 100000)]
    tail: Option<usize>,
    /// Keep the response open and stream new console output.
    follow: Option<bool>,
}

#[utoipa::path(get, path = "/machines/{id}/logs", tag = "guest",
    description = "The guest's serial console (text/plain). `follow=true` streams new output \
                   until the machine is deleted or the client goes away.",
    params(("id" = String, Path, description = "Machine id or name"), LogsQuery),
    responses((status = 200, description = "Console text", content_type = "text/plain")),
    security(("bearer" = [])))]
pub async fn logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Read)?;
    let m = state
        .store
        .get(Some(&p.tenant), &id)?
        .ok_or_else(|| ApiError::not_found(format!("machine '{id}'")))?;
    let tail = q.tail.unwrap_or(200);
    if tail > 100_000 {
        return Err(ApiError::validation("tail: at most 100000 lines"));
    }
    // Reading the tail buffers up to a few MiB: it takes a slot until the
    // tail is handed on. Following after it does not (the daemon holds one
    // poll's worth of new output at a time).
    let slot = state.guest.acquire(&p.tenant)?;
    let file = state.sup.console_log(&m.rec);
    let (text, offset) = crate::logs::tail(&file, tail)
        .await
        .map_err(|e| ApiError::internal("reading the console log", e))?;
    if !q.follow.unwrap_or(false) {
        let resp = ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response();
        return Ok(holding(resp, slot));
    }
    // Following is activity, for as long as it lasts; a suspended machine
    // is woken for it.
    let m = state
        .sup
        .wake(m, "logs follow")
        .await
        .map_err(super::wake_error)?;
    let store = state.store.clone();
    let sup = state.sup.clone();
    let mid = m.rec.id.clone();
    let follow = crate::logs::follow(file, offset, move || {
        sup.touch(&mid);
        // A read error is not a deletion: keep following.
        store.get_by_id(&mid).map_or(true, |m| m.is_some())
    })
    .map(Ok::<_, Infallible>);
    let body = stream::once(async move {
        drop(slot);
        Ok::<_, Infallible>(Bytes::from(text))
    })
    .chain(follow);
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(body),
    )
        .into_response())
}

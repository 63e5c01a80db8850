//! `GET /events`: the events of all the caller's tenant's machines, as one
//! list or one live SSE stream (the web console's machine list watches it).
//! The same events and SSE framing as a machine's own `/events`; only the
//! filter differs: by tenant instead of by machine.

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use hyperfleet_api::{EventList, Scope};
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::ApiError;
use super::extract::{Caller, Query};
use super::machines::{sse_event, MAX_QUERY_INT};
use super::sse::{self, Next};
use super::AppState;
use crate::store::EventRecord;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TenantEventsQuery {
    /// Only events with an id greater than this. For the SSE stream: where
    /// to start (without it, or `Last-Event-ID`, the stream is live only).
    #[param(minimum = 0, maximum = 9007199254740991_u64)]
    after: Option<i64>,
    /// At most this many (1–10000, default 1000; the list form only).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/events", tag = "machines",
    description = "The events of every machine of the caller's tenant, in order (a deleted \
                   machine's history goes with it). With `Accept: text/event-stream`, a live \
                   SSE stream of them: live only, unless `after` or `Last-Event-ID` asks for \
                   the history after an event first; it carries every `deleted` event of \
                   the tenant's machines and ends with a `lagged` event when the client \
                   falls too far behind (reconnect, then re-read the machine list).",
    params(TenantEventsQuery),
    responses((status = 200, body = EventList)),
    security(("bearer" = [])))]
pub async fn tenant_events(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Query(q): Query<TenantEventsQuery>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Read)?;
    let tenant = p.tenant.clone();
    let limit = q.limit.unwrap_or(1000);
    if !(1..=10000).contains(&limit) {
        return Err(ApiError::validation(format!(
            "limit: must be between 1 and 10000, got {limit}"
        )));
    }
    let after = match q.after {
        Some(a) if !(0..=MAX_QUERY_INT as i64).contains(&a) => {
            return Err(ApiError::validation(format!(
                "after: must be between 0 and {MAX_QUERY_INT}, got {a}"
            )))
        }
        a => a,
    };
    if !sse::wanted(&headers) {
        let events = state
            .store
            .tenant_events(&tenant, after.unwrap_or(0), limit)
            .await?;
        let body = EventList {
            events: events.iter().map(|e| e.to_api()).collect(),
        };
        return Ok(axum::Json(body).into_response());
    }
    let resume = match (after, sse::last_event_id(&headers)) {
        (Some(a), Some(l)) => Some(a.max(l)),
        (a, l) => a.or(l),
    };
    // Subscribe before reading the tenant's machines and history, so
    // nothing falls in between (duplicates are skipped by id).
    let live = state.store.subscribe_events();
    let mut known: HashSet<String> = state
        .store
        .machine_ids(&tenant)
        .await?
        .into_iter()
        .collect();
    let history = match resume {
        Some(after) => state.store.tenant_events(&tenant, after, 10000).await?,
        None => Vec::new(),
    };
    let mut last = history.last().map(|e| e.id).or(resume).unwrap_or(0);
    let store = state.store.clone();
    Ok(sse::respond(
        history.iter().map(sse_event).collect(),
        false,
        live,
        "reconnect with Last-Event-ID",
        move |e: Arc<EventRecord>| {
            if e.id <= last {
                return Next::Skip;
            }
            // A machine of the tenant's: one it held when the stream
            // opened, or one created since.
            let ours = known.contains(&e.machine_id)
                || (e.kind == "created"
                    && matches!(store.get(Some(&tenant), &e.machine_id), Ok(Some(_))));
            if !ours {
                return Next::Skip;
            }
            last = e.id;
            if e.kind == "deleted" {
                known.remove(&e.machine_id);
            } else {
                known.insert(e.machine_id.clone());
            }
            Next::Send(sse_event(&e))
        },
    ))
}

//! Machine routes. Handlers validate, hand the change to the supervisor and
//! optionally wait for the outcome; they never do lifecycle work.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use hyperfleet_api::{
    CreateMachineRequest, ErrorCode, EventList, Machine, MachineList, MachineStatus, Scope,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::ApiError;
use super::extract::{Caller, Json, Query};
use super::sse::{self, Next};
use super::AppState;
use crate::auth::Principal;
use crate::lifecycle::table::Request;
use crate::lifecycle::WaitOutcome;
use crate::store::CachedMachine;
use crate::validate::validate_create;

const DEFAULT_WAIT: Duration = Duration::from_secs(60);
const MAX_WAIT_SECONDS: u64 = 600;

pub(super) fn json_bytes(status: StatusCode, body: Bytes) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The machine's JSON as `p` may see it. The access token opens the
/// machine's ports through the proxy and env values may be passwords, so
/// only keys that may exec in the machine anyway (`exec`, `admin`) see them;
/// everyone else gets them redacted (docs/api.md "Secrets in machines").
pub(super) fn machine_body(
    state: &AppState,
    p: &Principal,
    m: &CachedMachine,
) -> Result<Bytes, ApiError> {
    let stored = state
        .sup
        .ctx()
        .storage
        .machine(&m.rec.id)
        .map(|b| b.total());
    machine_json(state, p, m, stored).map(MachineJson::into_bytes)
}

/// A machine's JSON in two parts, so a list can write it straight into its
/// body: the rendered object and, for a cached rendering, the measured
/// `stored_bytes` to put before its closing brace (the cache holds the
/// record's JSON; the measurement changes without a new record).
pub(super) struct MachineJson {
    body: Bytes,
    stored: Option<u64>,
}

impl MachineJson {
    fn write_into(&self, out: &mut BytesMut) {
        match (self.stored, self.body.strip_suffix(b"}")) {
            (Some(n), Some(head)) => {
                out.put_slice(head);
                // Writing into memory cannot fail.
                let _ = std::fmt::Write::write_fmt(out, format_args!(",\"stored_bytes\":{n}}}"));
            }
            // Nothing to add (or not an object, which a machine never is).
            _ => out.put_slice(&self.body),
        }
    }

    fn len(&self) -> usize {
        self.body.len() + if self.stored.is_some() { 40 } else { 0 }
    }

    fn into_bytes(self) -> Bytes {
        if self.stored.is_none() {
            return self.body;
        }
        let mut out = BytesMut::with_capacity(self.len());
        self.write_into(&mut out);
        out.freeze()
    }
}

/// [`machine_body`] with the machine's measured bytes given.
fn machine_json(
    state: &AppState,
    p: &Principal,
    m: &CachedMachine,
    stored: Option<u64>,
) -> Result<MachineJson, ApiError> {
    // Activity changes without a new record: a machine where it matters is
    // rendered fresh, any other from its cached JSON.
    let live = matches!(
        m.rec.status,
        MachineStatus::Running
            | MachineStatus::Paused
            | MachineStatus::Suspending
            | MachineStatus::Suspended
    );
    if p.has(Scope::Exec) && !live {
        return Ok(MachineJson {
            body: m.json(state.urls.as_deref()).clone(),
            stored,
        });
    }
    let mut api = m.rec.to_api_with(state.urls.as_deref());
    api.stored_bytes = stored;
    if live {
        let (last, deadline) = state.sup.idle_view(&m.rec);
        api.last_active_at = Some(crate::util::rfc3339(last));
        api.idle_deadline = deadline.map(crate::util::rfc3339);
    }
    if !p.has(Scope::Exec) {
        api.redact_secrets();
    }
    serde_json::to_vec(&api)
        .map(|body| MachineJson {
            body: Bytes::from(body),
            stored: None,
        })
        .map_err(|e| ApiError::internal("rendering the machine", e))
}

pub(super) fn machine_response(
    state: &AppState,
    p: &Principal,
    status: StatusCode,
    m: &CachedMachine,
) -> Result<Response, ApiError> {
    Ok(json_bytes(status, machine_body(state, p, m)?))
}

/// Ids and names are short ASCII; anything else cannot name a machine.
pub(super) fn check_ref(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 63 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(ApiError::not_found(format!(
            "machine '{}'",
            id.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

fn find(state: &AppState, caller: &Caller, id: &str) -> Result<Arc<CachedMachine>, ApiError> {
    check_ref(id)?;
    state
        .store
        .get(Some(caller.tenant()), id)?
        .ok_or_else(|| ApiError::not_found(format!("machine '{id}'")))
}

#[utoipa::path(post, path = "/machines", tag = "machines",
    request_body = CreateMachineRequest,
    responses(
        (status = 201, description = "Created (status `pending`); durable when answered", body = Machine),
        (status = 400, description = "Malformed or invalid request", body = hyperfleet_api::ErrorBody),
        (status = 403, description = "The key lacks the write scope (FORBIDDEN), or the tenant's quota does not allow the machine (QUOTA_EXCEEDED)", body = hyperfleet_api::ErrorBody),
        (status = 404, description = "`snapshot_id` names no snapshot", body = hyperfleet_api::ErrorBody),
        (status = 409, description = "Name already in use, fields that conflict (`image` with `snapshot_id`; `entrypoint`, `cmd`, `workdir`, `user` or `restart` without `image`; `max_retries` with a policy other than `on-failure`) (CONFLICT), or the snapshot is not ready (INVALID_STATE)", body = hyperfleet_api::ErrorBody),
        (status = 507, description = "The disk holding the database is full, or the storage budget is used up and nothing can be evicted (INSUFFICIENT_STORAGE); nothing was stored", body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateMachineRequest>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Write)?;
    let explicit = crate::lifecycle::snapshots::Explicit {
        vcpu_count: req.vcpu_count,
        mem_size_mib: req.mem_size_mib,
        vmm: req.vmm,
    };
    let mut req = req;
    let image = req.image.take();
    if image.is_some() && req.snapshot_id.is_some() {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "image and snapshot_id conflict: a machine is made from an image or from a snapshot \
             (which has its image), not both",
        ));
    }
    let overrides = crate::validate::take_process_overrides(&mut req)?;
    if let Some(why) = overrides.conflict(image.is_some()) {
        return Err(ApiError::new(ErrorCode::Conflict, why));
    }
    let (name, mut spec) = validate_create(req, state.default_vmm)?;
    state.sup.storage_room("create a machine")?;
    if let Some(image) = image {
        use crate::images::service::ImageServiceError as E;
        let found = crate::images::service::machine_image(&state.images, &p.tenant, &image)
            .await
            .map_err(|e| match e {
                // No image by that name can be had (not a reference, the
                // registry does not have it or cannot be reached): the
                // machine's image is not found; the message says why.
                e @ (E::Failed { .. }
                | E::Image(crate::images::ImageError::BadReference { .. })) => {
                    ApiError::not_found(format!("image '{image}' ({e})"))
                }
                e => e.into(),
            })?;
        let (found, run) = found;
        spec.process = crate::images::main_process(&run, &overrides);
        spec.restart = overrides.restart;
        spec.oci = Some(found);
    }
    // 160 random bits: the proxy's per-machine credential.
    spec.access_token = Some(crate::util::random_id("hft_", 32));
    let m = match spec.base_snapshot.take() {
        Some(snap) => {
            state
                .sup
                .create_from_snapshot(&p.tenant, name, spec, &snap, explicit)
                .await?
        }
        None => state.sup.create(&p.tenant, name, spec).await?,
    };
    // Rendered without caching: a burst of creates should not keep a JSON
    // copy of every new machine in memory; the first GET caches it.
    let mut api = m.rec.to_api_with(state.urls.as_deref());
    if !p.has(Scope::Exec) {
        api.redact_secrets();
    }
    let body =
        serde_json::to_vec(&api).map_err(|e| ApiError::internal("rendering the machine", e))?;
    Ok(json_bytes(StatusCode::CREATED, Bytes::from(body)))
}

/// The largest integer a query takes where the server has no smaller bound:
/// 2^53 − 1, the largest every JSON client holds exactly.
pub const MAX_QUERY_INT: u64 = (1 << 53) - 1;

/// `value` when at most [`MAX_QUERY_INT`], else a validation error naming `field`.
fn at_most_max_int<T: Into<i128> + Copy>(field: &str, value: T) -> Result<T, ApiError> {
    let v: i128 = value.into();
    if (0..=i128::from(MAX_QUERY_INT)).contains(&v) {
        Ok(value)
    } else {
        Err(ApiError::validation(format!(
            "{field}: must be between 0 and {MAX_QUERY_INT}, got {v}"
        )))
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only machines in this status.
    #[param(value_type = Option<MachineStatus>)]
    status: Option<String>,
    /// 1–1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// Skip this many machines (creation order).
    #[param(minimum = 0, maximum = 9007199254740991_u64)]
    offset: Option<u64>,
}

#[utoipa::path(get, path = "/machines", tag = "machines", params(ListQuery),
    responses((status = 200, body = MachineList)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Read)?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(
            s.parse::<MachineStatus>()
                .map_err(|e| ApiError::validation(format!("status: {e}")))?,
        ),
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::validation(format!(
            "limit: must be between 1 and 1000, got {limit}"
        )));
    }
    let offset = at_most_max_int("offset", q.offset.unwrap_or(0))? as usize;
    let (machines, total) = state.store.list(&p.tenant, status, limit, offset)?;
    // Splice the pre-rendered machine JSON instead of re-serialising (keys
    // that may not see secrets get each machine rendered redacted).
    let stored = state
        .sup
        .ctx()
        .storage
        .machine_totals(machines.iter().map(|m| m.rec.id.as_str()));
    let parts = machines
        .iter()
        .zip(stored)
        .map(|(m, stored)| machine_json(&state, p, m, stored))
        .collect::<Result<Vec<_>, _>>()?;
    let size: usize = parts.iter().map(|b| b.len() + 1).sum::<usize>() + 40;
    let mut body = BytesMut::with_capacity(size);
    body.put_slice(b"{\"machines\":[");
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            body.put_u8(b',');
        }
        part.write_into(&mut body);
    }
    body.put_slice(format!("],\"total\":{total}}}").as_bytes());
    Ok(json_bytes(StatusCode::OK, body.freeze()))
}

#[utoipa::path(get, path = "/machines/{id}", tag = "machines",
    params(("id" = String, Path, description = "Machine id or name")),
    responses((status = 200, body = Machine), (status = 404, body = hyperfleet_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Read)?;
    let m = find(&state, &caller, &id)?;
    machine_response(&state, p, StatusCode::OK, &m)
}

#[utoipa::path(patch, path = "/machines/{id}", tag = "machines",
    description = "Change a machine's idle timeout, persistence policy or metadata (fields left \
                   out stay as they are). The idle deadline starts over from the update; an \
                   `updated` event records what changed.",
    params(("id" = String, Path, description = "Machine id or name")),
    request_body = hyperfleet_api::UpdateMachineRequest,
    responses(
        (status = 200, description = "The machine as updated", body = Machine),
        (status = 409, description = "A delete was accepted, or the machine cannot become ephemeral as it rests (suspended or stopped) (INVALID_STATE)", body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(req): Json<hyperfleet_api::UpdateMachineRequest>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Write)?;
    check_ref(&id)?;
    crate::validate::validate_update(&req)?;
    let m = state.sup.update(&p.tenant, &id, req).await?;
    machine_response(&state, p, StatusCode::OK, &m)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ActionQuery {
    /// Wait for the outcome (default true). `false` answers 202 at once.
    pub(super) wait: Option<bool>,
    /// How long to wait, in seconds (default 60, at most 600).
    #[param(minimum = 0, maximum = 600)]
    pub(super) timeout: Option<u64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Stop a running machine first instead of answering 409.
    force: Option<bool>,
    /// Wait until the machine is gone (default true).
    wait: Option<bool>,
    /// How long to wait, in seconds (default 60, at most 600).
    #[param(minimum = 0, maximum = 600)]
    timeout: Option<u64>,
}

pub(super) fn wait_timeout(t: Option<u64>) -> Result<Duration, ApiError> {
    match t {
        None => Ok(DEFAULT_WAIT),
        Some(s) if s <= MAX_WAIT_SECONDS => Ok(Duration::from_secs(s)),
        Some(s) => Err(ApiError::validation(format!(
            "timeout: must be at most {MAX_WAIT_SECONDS} seconds, got {s}"
        ))),
    }
}

async fn act(
    state: AppState,
    caller: Caller,
    id: String,
    req: Request,
    wait: bool,
    timeout: Duration,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Write)?;
    check_ref(&id)?;
    let (m, generation) = state.sup.request(&p.tenant, &id, req).await?;
    if !wait {
        return machine_response(&state, p, StatusCode::ACCEPTED, &m);
    }
    let outcome = state
        .sup
        .wait_generation(&m.rec.id, generation, timeout)
        .await;
    // A stop of an ephemeral machine deletes it: answered as a delete.
    let req = if generation.desired == crate::lifecycle::table::Desired::Deleted {
        Request::ForceDelete
    } else {
        req
    };
    outcome_response(&state, p, outcome, req, timeout)
}

pub(super) fn outcome_response(
    state: &AppState,
    p: &Principal,
    outcome: WaitOutcome,
    req: Request,
    timeout: Duration,
) -> Result<Response, ApiError> {
    match outcome {
        WaitOutcome::Reached(m) => machine_response(state, p, StatusCode::OK, &m),
        WaitOutcome::Error(e) => Err(e.into()),
        WaitOutcome::Deleted if matches!(req, Request::Delete | Request::ForceDelete) => {
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        WaitOutcome::Deleted => Err(ApiError::new(
            ErrorCode::InvalidState,
            "the machine was deleted while the operation was under way",
        )),
        WaitOutcome::Failed(m) => Err(ApiError::new(
            ErrorCode::RuntimeError,
            format!(
                "the machine failed: {}",
                m.rec
                    .error_message
                    .as_deref()
                    .unwrap_or("no reason recorded")
            ),
        )),
        WaitOutcome::Unreachable(m, why) => Err(ApiError::new(
            ErrorCode::InvalidState,
            format!("the machine is {}: {why}", m.rec.status),
        )),
        WaitOutcome::TimedOut(m) => Err(ApiError::new(
            ErrorCode::Timeout,
            format!(
                "the machine is still {} after {}s; the operation goes on in the background \
                 (watch GET /machines/{{id}}/wait or /events)",
                m.map(|m| m.rec.status.to_string())
                    .unwrap_or_else(|| "unknown".into()),
                timeout.as_secs()
            ),
        )),
    }
}

macro_rules! action_route {
    ($name:ident, $path:literal, $req:expr, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, tag = "machines", description = $doc,
            params(("id" = String, Path, description = "Machine id or name"), ActionQuery),
            responses(
                (status = 200, description = "Reached the target state", body = Machine),
                (status = 202, description = "Accepted (`wait=false`)", body = Machine),
                (status = 204, description = "A stop or kill of an ephemeral machine deleted it"),
                (status = 409, description = "Not allowed in the current state (INVALID_STATE; a suspend of an ephemeral machine too), or the host's memory cannot hold the machine (INSUFFICIENT_CAPACITY)", body = hyperfleet_api::ErrorBody),
                (status = 500, description = "The machine failed (RUNTIME_ERROR)", body = hyperfleet_api::ErrorBody),
                (status = 504, description = "Deadline passed; the operation continues", body = hyperfleet_api::ErrorBody),
                (status = 507, description = "The disk holding the database is full; for a suspend also: the storage budget is used up and nothing can be evicted (INSUFFICIENT_STORAGE); nothing was changed", body = hyperfleet_api::ErrorBody),
            ),
            security(("bearer" = [])))]
        pub async fn $name(
            State(state): State<AppState>,
            caller: Caller,
            Path(id): Path<String>,
            Query(q): Query<ActionQuery>,
        ) -> Result<Response, ApiError> {
            let timeout = wait_timeout(q.timeout)?;
            act(state, caller, id, $req, q.wait.unwrap_or(true), timeout).await
        }
    };
}

action_route!(
    start,
    "/machines/{id}/start",
    Request::Start,
    "Boot a pending, stopped or failed machine; restore a suspended one."
);
action_route!(
    stop,
    "/machines/{id}/stop",
    Request::Stop,
    "Graceful shutdown (guest poweroff, then kill after the stop timeout)."
);
action_route!(
    restart,
    "/machines/{id}/restart",
    Request::Restart,
    "Graceful stop followed by a fresh boot from the same disk."
);
action_route!(
    pause,
    "/machines/{id}/pause",
    Request::Pause,
    "Stop the vCPUs; memory stays in the VMM."
);
action_route!(
    resume,
    "/machines/{id}/resume",
    Request::Resume,
    "Continue a paused machine, or restore a suspended one."
);
action_route!(
    kill,
    "/machines/{id}/kill",
    Request::Kill,
    "Immediate hard stop: the VMM is killed without a graceful shutdown."
);
action_route!(
    suspend,
    "/machines/{id}/suspend",
    Request::Suspend,
    "Save memory to disk and stop the VMM; resume continues where it left off."
);

#[utoipa::path(delete, path = "/machines/{id}", tag = "machines",
    params(("id" = String, Path, description = "Machine id or name"), DeleteQuery),
    responses(
        (status = 204, description = "Deleted; everything it owned is released"),
        (status = 202, description = "Accepted (`wait=false`)", body = Machine),
        (status = 409, description = "Running without `force=true`", body = hyperfleet_api::ErrorBody),
        (status = 504, description = "Deadline passed; the deletion continues", body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<Response, ApiError> {
    let timeout = wait_timeout(q.timeout)?;
    let req = if q.force.unwrap_or(false) {
        Request::ForceDelete
    } else {
        Request::Delete
    };
    let res = act(state, caller, id, req, q.wait.unwrap_or(true), timeout).await;
    match res {
        Err(e) if e.code == ErrorCode::InvalidState && req == Request::Delete => {
            Err(ApiError::new(
                ErrorCode::InvalidState,
                format!("{}; stop it first or pass ?force=true", e.message),
            ))
        }
        other => other,
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    /// The status to wait for.
    #[param(value_type = MachineStatus)]
    status: String,
    /// Seconds to wait (default 60, at most 600).
    #[param(minimum = 0, maximum = 600)]
    timeout: Option<u64>,
}

#[utoipa::path(get, path = "/machines/{id}/wait", tag = "machines",
    params(("id" = String, Path, description = "Machine id or name"), WaitQuery),
    responses(
        (status = 200, description = "The machine is in the status", body = Machine),
        (status = 409, description = "Failed, or the status is unreachable without another request", body = hyperfleet_api::ErrorBody),
        (status = 504, description = "Deadline passed", body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn wait(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Read)?;
    let target: MachineStatus = q
        .status
        .parse()
        .map_err(|e| ApiError::validation(format!("status: {e}")))?;
    let timeout = wait_timeout(q.timeout)?;
    let m = find(&state, &caller, &id)?;
    match state.sup.wait_status(&m.rec.id, target, timeout).await {
        WaitOutcome::Failed(m) => Err(ApiError::new(
            ErrorCode::InvalidState,
            format!(
                "the machine failed: {}",
                m.rec
                    .error_message
                    .as_deref()
                    .unwrap_or("no reason recorded")
            ),
        )),
        WaitOutcome::Deleted => Err(ApiError::not_found(format!("machine '{id}' (deleted)"))),
        other => outcome_response(&state, p, other, Request::Start, timeout),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Only events with an id greater than this.
    #[param(minimum = 0, maximum = 9007199254740991_u64)]
    after: Option<i64>,
    /// At most this many (1–10000, default 1000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/machines/{id}/events", tag = "machines",
    description = "The machine's history with step timings. With `Accept: text/event-stream`, \
                   a live SSE stream (history first; `Last-Event-ID` resumes).",
    params(("id" = String, Path, description = "Machine id or name"), EventsQuery),
    responses((status = 200, body = EventList)),
    security(("bearer" = [])))]
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let m = find(&state, &caller, &id)?;
    let limit = q.limit.unwrap_or(1000);
    if !(1..=10000).contains(&limit) {
        return Err(ApiError::validation(format!(
            "limit: must be between 1 and 10000, got {limit}"
        )));
    }
    let mut after = at_most_max_int("after", q.after.unwrap_or(0))?;
    if !sse::wanted(&headers) {
        let events = state.store.events(&m.rec.id, after, limit).await?;
        let body = EventList {
            events: events.iter().map(|e| e.to_api()).collect(),
        };
        return Ok(axum::Json(body).into_response());
    }
    if let Some(last) = sse::last_event_id(&headers) {
        after = after.max(last);
    }
    // Subscribe before reading history so nothing falls in between.
    let live = state.store.subscribe_events();
    let history = state.store.events(&m.rec.id, after, 10000).await?;
    let mut last = history.last().map(|e| e.id).unwrap_or(after);
    let ended = history.iter().any(|e| e.kind == "deleted");
    let machine_id = m.rec.id.clone();
    Ok(sse::respond(
        history.iter().map(sse_event).collect(),
        ended,
        live,
        "reconnect with Last-Event-ID",
        move |e: std::sync::Arc<crate::store::EventRecord>| {
            if e.machine_id != machine_id || e.id <= last {
                return Next::Skip;
            }
            last = e.id;
            if e.kind == "deleted" {
                Next::End(sse_event(&e))
            } else {
                Next::Send(sse_event(&e))
            }
        },
    ))
}

pub(super) fn sse_event(e: &crate::store::EventRecord) -> Event {
    // Plain data; serialising cannot fail.
    let data = serde_json::to_string(&e.to_api()).expect("event JSON serialises");
    Event::default()
        .id(e.id.to_string())
        .event(e.kind.clone())
        .data(data)
}

//! Snapshot routes and fork. Handlers validate, hand the work to the
//! supervisor (`lifecycle::snapshots`) and optionally wait for the
//! machine's run to finish it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hyperfleet_api::{
    CreateSnapshotRequest, CreateTemplateRequest, ErrorCode, ForkRequest, ForkResult, Scope,
    Snapshot, SnapshotList, SnapshotStatus, FORK_MAX,
};

use super::error::ApiError;
use super::extract::{parse_object, Caller, Query};
use super::machines::{check_ref, outcome_response, wait_timeout, ActionQuery};
use super::AppState;
use crate::lifecycle::snapshots::SnapshotWait;
use crate::lifecycle::table::Request;
use crate::lifecycle::WaitOutcome;
use crate::store::{SnapshotKind, SnapshotRecord};
use crate::validate::{validate_name, validate_snapshot_name};

fn snapshot_json(state: &AppState, s: &SnapshotRecord) -> Result<Snapshot, ApiError> {
    let used = state
        .store
        .snapshot(&s.tenant, &s.id)?
        .map(|(_, n)| n)
        .unwrap_or(0);
    Ok(s.to_api(used))
}

/// A JSON object body that may be left out (every field optional).
fn optional_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_object(body)
}

/// Snapshot ids and names are short ASCII, like machines'.
fn check_snapshot_ref(id: &str) -> Result<(), ApiError> {
    check_ref(id).map_err(|_| {
        ApiError::not_found(format!(
            "snapshot '{}'",
            id.chars().take(64).collect::<String>()
        ))
    })
}

#[utoipa::path(post, path = "/machines/{id}/snapshots", tag = "snapshots",
    description = "Take a snapshot of a running, paused, suspended or stopped machine. A running \
                   machine keeps running (its vCPUs stop only while its state is copied; the \
                   pause is in `pause_ms` and the machine's events). Taken by the machine's run \
                   as a step of its own.",
    params(("id" = String, Path, description = "Machine id or name"), ActionQuery),
    request_body = CreateSnapshotRequest,
    responses(
        (status = 201, description = "Taken", body = Snapshot),
        (status = 202, description = "Accepted (`wait=false`), or still being taken at the deadline", body = Snapshot),
        (status = 409, description = "The machine is not at rest in a state snapshots are taken in, is taking another, or the name is used", body = hyperfleet_api::ErrorBody),
        (status = 500, description = "Taking it failed (RUNTIME_ERROR); the machine goes on as it was", body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<ActionQuery>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Write)?;
    check_ref(&id)?;
    let req: CreateSnapshotRequest = optional_body(&body)?;
    if let Some(n) = &req.name {
        validate_snapshot_name(n)?;
    }
    let timeout = wait_timeout(q.timeout)?;
    state.sup.storage_room("take a snapshot")?;
    let s = state
        .sup
        .take_snapshot(&p.tenant, &id, req.name, SnapshotKind::User)
        .await?;
    if !q.wait.unwrap_or(true) {
        return Ok((StatusCode::ACCEPTED, axum::Json(snapshot_json(&state, &s)?)).into_response());
    }
    match state
        .sup
        .wait_snapshot(&s.machine_id, &s.id, timeout)
        .await?
    {
        SnapshotWait::Done(s) if s.status == SnapshotStatus::Failed => Err(ApiError::new(
            ErrorCode::RuntimeError,
            format!(
                "taking snapshot {} failed: {}",
                s.id,
                s.data
                    .error_message
                    .as_deref()
                    .unwrap_or("no reason recorded")
            ),
        )),
        SnapshotWait::Done(s) => {
            Ok((StatusCode::CREATED, axum::Json(snapshot_json(&state, &s)?)).into_response())
        }
        SnapshotWait::TimedOut(s) => {
            Ok((StatusCode::ACCEPTED, axum::Json(snapshot_json(&state, &s)?)).into_response())
        }
    }
}

#[utoipa::path(get, path = "/snapshots", tag = "snapshots",
    responses((status = 200, body = SnapshotList)),
    security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Read)?;
    let snapshots = state
        .store
        .list_snapshots(&p.tenant)?
        .into_iter()
        .map(|(s, used)| s.to_api(used))
        .collect();
    Ok(axum::Json(SnapshotList { snapshots }).into_response())
}

#[utoipa::path(get, path = "/snapshots/{id}", tag = "snapshots",
    params(("id" = String, Path, description = "Snapshot id or name")),
    responses(
        (status = 200, body = Snapshot),
        (status = 404, body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Read)?;
    check_snapshot_ref(&id)?;
    let (s, used) = state
        .store
        .snapshot(&p.tenant, &id)?
        .filter(|(s, _)| s.kind == SnapshotKind::User)
        .ok_or_else(|| ApiError::not_found(format!("snapshot '{id}'")))?;
    Ok(axum::Json(s.to_api(used)).into_response())
}

#[utoipa::path(delete, path = "/snapshots/{id}", tag = "snapshots",
    description = "Delete a snapshot. Machines made from it go on: its files stay until the \
                   last of them is deleted (it shows `deleting` until then).",
    params(("id" = String, Path, description = "Snapshot id or name")),
    responses(
        (status = 204, description = "Deleted (its files go with its last user)"),
        (status = 404, body = hyperfleet_api::ErrorBody),
        (status = 409, description = "Still being taken", body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Write)?;
    check_snapshot_ref(&id)?;
    let visible = state
        .store
        .snapshot(&p.tenant, &id)?
        .is_some_and(|(s, _)| s.kind == SnapshotKind::User);
    if !visible {
        return Err(ApiError::not_found(format!("snapshot '{id}'")));
    }
    state.sup.delete_snapshot(&p.tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/machines/{id}/fork", tag = "snapshots",
    description = "Make running copies of a running machine: its memory and disk as they are \
                   now (the source keeps running; its vCPUs stop only while its state is \
                   copied). Each copy gets its own network identity, hostname, machine id, \
                   boot id and RNG seed before it counts as running.",
    params(("id" = String, Path, description = "Machine id or name"), ActionQuery),
    request_body = ForkRequest,
    responses(
        (status = 201, description = "The copies, running", body = ForkResult),
        (status = 202, description = "Copies made and starting (`wait=false`)", body = ForkResult),
        (status = 409, description = "The source is not running, or a name is used", body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn fork(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<ActionQuery>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Write)?;
    check_ref(&id)?;
    let req: ForkRequest = optional_body(&body)?;
    let names = fork_names(&req)?;
    let timeout = wait_timeout(q.timeout)?;
    state.sup.storage_room("fork the machine")?;
    let (machines, snap) = state.sup.fork(&p.tenant, &id, names, timeout).await?;
    let wait = q.wait.unwrap_or(true);
    let mut out = Vec::with_capacity(machines.len());
    for m in machines {
        let m = if wait {
            match state
                .sup
                .wait_status(&m.rec.id, hyperfleet_api::MachineStatus::Running, timeout)
                .await
            {
                WaitOutcome::Reached(m) => m,
                other => return outcome_response(&state, p, other, Request::Start, timeout),
            }
        } else {
            m
        };
        let mut api = m.rec.to_api_with(state.urls.as_deref());
        if !p.has(Scope::Exec) {
            api.redact_secrets();
        }
        out.push(api);
    }
    let status = if wait {
        StatusCode::CREATED
    } else {
        StatusCode::ACCEPTED
    };
    let body = ForkResult {
        machines: out,
        snapshot_id: snap.id,
        pause_ms: snap.data.pause_ms,
    };
    Ok((status, axum::Json(body)).into_response())
}

/// The copies' names: as given (validated, as many as `count`), or `count`
/// generated ones.
fn fork_names(req: &ForkRequest) -> Result<Vec<Option<String>>, ApiError> {
    let count = match (req.count, &req.names) {
        (Some(c), Some(n)) if c as usize != n.len() => {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "count and names conflict: {} names for count {c}; give as many names as \
                     copies (or leave count out)",
                    n.len()
                ),
            ))
        }
        (Some(c), _) => c,
        (None, Some(n)) => n.len() as u32,
        (None, None) => 1,
    };
    if !(1..=FORK_MAX).contains(&count) {
        return Err(ApiError::validation(format!(
            "count: must be 1 to {FORK_MAX}, got {count}"
        )));
    }
    match &req.names {
        Some(names) => {
            let mut seen = std::collections::HashSet::new();
            for n in names {
                validate_name(n)?;
                if !seen.insert(n) {
                    return Err(ApiError::validation(format!(
                        "names: '{n}' is listed twice"
                    )));
                }
            }
            Ok(names.iter().cloned().map(Some).collect())
        }
        None => Ok(vec![None; count as usize]),
    }
}

#[utoipa::path(post, path = "/templates", tag = "snapshots",
    description = "Warm the template of a machine size: a builder machine boots, is \
                   snapshotted idle, and goes. Machines created afterwards with the same \
                   backend, guest image, vCPUs and memory are made from it: their first start \
                   restores that guest (with an identity of their own) instead of booting. \
                   Answers the existing template when one is ready. Admin scope.",
    params(TemplateQuery),
    request_body = CreateTemplateRequest,
    responses(
        (status = 201, description = "Ready", body = Snapshot),
        (status = 403, description = "Not an admin key", body = hyperfleet_api::ErrorBody),
        (status = 409, description = "The template's guest did not come up or its snapshot failed", body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn warm_template(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<TemplateQuery>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    if q.wait == Some(false) {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "wait=false conflicts with how templates are made: POST /templates always waits (the \
             template exists once its guest booted and was snapshotted); leave wait out",
        ));
    }
    let req: CreateTemplateRequest = optional_body(&body)?;
    let sizes = hyperfleet_api::CreateMachineRequest {
        vcpu_count: req.vcpu_count,
        mem_size_mib: req.mem_size_mib,
        vmm: req.vmm,
        ..Default::default()
    };
    let (_, spec) = crate::validate::validate_create(sizes, state.default_vmm)?;
    // A warm takes a boot: at least the boot timeout is given to it.
    let timeout = wait_timeout(q.timeout.or(Some(300)))?;
    let t = state.sup.warm_template(spec, timeout).await?;
    let mut api = t.to_api(0);
    api.name = t.data.template_key.clone();
    Ok((StatusCode::CREATED, axum::Json(api)).into_response())
}

/// `POST /templates` always waits: the template exists only once its
/// builder booted and was snapshotted.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TemplateQuery {
    /// Must be true or left out: a template exists only once built, so the
    /// request always waits (`false` is refused).
    wait: Option<bool>,
    /// How long to wait, in seconds (default 300, at most 600).
    #[param(minimum = 0, maximum = 600)]
    timeout: Option<u64>,
}

#[utoipa::path(get, path = "/templates", tag = "snapshots",
    description = "The warmed templates (a template is shown as a snapshot named by its key: \
                   backend/image/vCPUs/memory).",
    responses((status = 200, body = SnapshotList)),
    security(("bearer" = [])))]
pub async fn list_templates(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let mut snapshots = Vec::new();
    for t in state.store.all_snapshots()? {
        if t.kind == SnapshotKind::Template && t.status != SnapshotStatus::Deleting {
            let used = state
                .store
                .snapshot(&t.tenant, &t.id)?
                .map(|(_, n)| n)
                .unwrap_or(0);
            let mut api = t.to_api(used);
            api.name = t.data.template_key.clone();
            snapshots.push(api);
        }
    }
    Ok(axum::Json(SnapshotList { snapshots }).into_response())
}

#[utoipa::path(delete, path = "/templates/{id}", tag = "snapshots",
    description = "Delete a template; machines made from it go on (its files stay until the \
                   last of them goes). Admin scope.",
    params(("id" = String, Path, description = "Template (snapshot) id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn delete_template(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    check_snapshot_ref(&id)?;
    state.sup.delete_template(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

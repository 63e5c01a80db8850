//! Routes that act inside a running machine through its guest agent:
//! commands ([`exec`]: buffered, NDJSON-streamed, WebSocket), files ([`files`]:
//! the seeds' JSON/base64 form and a raw streaming form with `Range`), and
//! the console log ([`logs`]).
//!
//! Memory is bounded per request and in total. Streamed forms never hold a
//! whole file or output: uploads stream from the request body into the agent
//! and downloads from the agent into the response, with the agent protocol's
//! flow control in between. JSON forms buffer at most
//! [`GuestLimits::json_max_bytes`](limits::GuestLimits) and refuse or
//! truncate beyond it, pointing at the streamed form. Every request holds a
//! slot ([`limits`]) for as long as the daemon works on it, so the number of
//! such buffers is bounded too.

pub mod exec;
pub mod files;
pub mod limits;
pub mod logs;

pub use exec::{__path_exec, __path_exec_ws, exec, exec_ws};
pub use files::{
    __path_delete, __path_list, __path_mkdir, __path_read, __path_stat, __path_write_json,
    __path_write_raw, delete, list, mkdir, read, stat, write_json, write_raw,
};
pub use limits::{GuestLimits, GuestSlots, Slot};
pub use logs::{__path_logs, logs};

use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use futures_util::StreamExt;
use hyperfleet_agent_proto::{self as proto, AgentClient};
use hyperfleet_api::{ErrorCode, MachineStatus, Scope};

use super::error::ApiError;
use super::extract::Caller;
use super::AppState;
use crate::lifecycle::guest_access::GuestAccessError;
use crate::store::CachedMachine;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Maps an agent failure: the guest's own "no such file" is a 404, other
/// refusals by the guest are 400, and a lost or broken channel is 502.
pub fn agent_error(e: proto::Error) -> ApiError {
    if let proto::Error::Remote(r) = &e {
        let code = match r.code {
            proto::ErrorCode::NotFound => ErrorCode::NotFound,
            proto::ErrorCode::PermissionDenied
            | proto::ErrorCode::AlreadyExists
            | proto::ErrorCode::NotADirectory
            | proto::ErrorCode::IsADirectory
            | proto::ErrorCode::DirectoryNotEmpty
            | proto::ErrorCode::InvalidArgument
            | proto::ErrorCode::Unsupported => ErrorCode::BadRequest,
            _ => ErrorCode::AgentError,
        };
        return ApiError::new(code, format!("in the guest: {}", r.message));
    }
    ApiError::new(
        ErrorCode::AgentError,
        format!("the guest agent failed: {}", crate::util::error_chain(&e)),
    )
}

/// A running machine of the caller's, its agent, and the request's slot.
pub(super) struct Guest {
    pub machine: Arc<CachedMachine>,
    pub agent: AgentClient,
    pub slot: Slot,
}

/// The machine, checked to be running, its agent, and a slot for the request
/// (taken before the agent is contacted, so a refused request costs nothing).
async fn guest_of(
    state: &AppState,
    caller: &Caller,
    id: &str,
    scope: Scope,
) -> Result<Guest, ApiError> {
    let p = caller.require(scope)?;
    let m = state
        .store
        .get(Some(&p.tenant), id)?
        .ok_or_else(|| ApiError::not_found(format!("machine '{id}'")))?;
    // A call into the guest is activity; a suspended machine is woken for it.
    let m = state
        .sup
        .wake(m, "a guest call (exec or files)")
        .await
        .map_err(wake_error)?;
    if m.rec.status != MachineStatus::Running {
        return Err(ApiError::new(
            ErrorCode::InvalidState,
            format!(
                "the machine is {}; commands and files need it running",
                m.rec.status
            ),
        ));
    }
    let mut slot = state.guest.acquire(&p.tenant)?;
    slot.keep_active(state.sup.keep_active(&m.rec.id));
    let agent = state.sup.agent(&m.rec).await.map_err(|e| match e {
        GuestAccessError::BackendDisabled(_) => {
            ApiError::new(ErrorCode::Unavailable, e.to_string())
        }
        GuestAccessError::NoAgent(_) => ApiError::new(ErrorCode::InvalidState, e.to_string()),
        GuestAccessError::Unreachable(_) => {
            ApiError::new(ErrorCode::AgentError, crate::util::error_chain(&e))
        }
    })?;
    Ok(Guest {
        machine: m,
        agent,
        slot,
    })
}

/// A wake that failed: 503 with the reason (the machine may come up later).
pub(super) fn wake_error(e: crate::lifecycle::idle::WakeError) -> ApiError {
    match e {
        crate::lifecycle::idle::WakeError::Lifecycle(e) => e.into(),
        e => ApiError::new(ErrorCode::Unavailable, e.to_string()),
    }
}

/// `resp` with `slot` held until its body has been sent (or dropped): a
/// buffered answer still occupies memory while a slow client reads it.
fn holding(resp: Response, slot: Slot) -> Response {
    resp.map(|body| {
        Body::from_stream(body.into_data_stream().map(move |chunk| {
            let _held = &slot;
            chunk
        }))
    })
}

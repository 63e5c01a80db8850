//! The error envelope: every non-2xx answer is `{"error":{"code","message"}}`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Machine-readable error codes. Clients branch on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// Missing, malformed, unknown, expired or revoked API key (401).
    Unauthorized,
    /// The key is valid but lacks the scope the route needs (403).
    Forbidden,
    /// No such machine, key or route for this tenant (404).
    NotFound,
    /// The tenant's quota does not allow the new machine; the message names
    /// the limit, what the tenant holds and what was asked (403).
    QuotaExceeded,
    /// The HTTP method is not served on this path (405).
    MethodNotAllowed,
    /// A field has a value outside what the API accepts (400).
    ValidationError,
    /// The request could not be parsed: malformed JSON, wrong content type (400).
    BadRequest,
    /// The body is larger than the server accepts (413).
    PayloadTooLarge,
    /// The machine's current state does not allow the operation (409).
    InvalidState,
    /// The resource already exists, e.g. a machine name in use, or the
    /// change would leave no active admin key (409).
    Conflict,
    /// The host's memory cannot hold the machine besides those it already
    /// runs; the message says how much is committed, how much the host
    /// allows and which setting changes it. Stop other machines, or retry
    /// later (409).
    InsufficientCapacity,
    /// The operation did not finish before its deadline (504).
    Timeout,
    /// The machine failed while carrying out the operation (500).
    RuntimeError,
    /// The guest agent could not be reached or answered with an error (502).
    AgentError,
    /// The proxy could not reach a guest port: refused, unreachable, or the
    /// guest closed the connection or answered with a broken response (502).
    BadGateway,
    /// Too many requests of this kind in progress, for the tenant or the
    /// server; retry later (429).
    TooManyRequests,
    /// The server cannot serve the request right now, e.g. shutting down (503).
    Unavailable,
    /// The host's disk is full: the change could not be stored; or the
    /// storage budget is used up and nothing left can be evicted (only
    /// persistent machines, running ones, snapshots): a create, suspend or
    /// snapshot that needs more space is refused. Nothing was changed;
    /// retry once space is freed (507).
    InsufficientStorage,
    /// A bug or an unexpected host failure; details are in the server log (500).
    InternalError,
}

impl ErrorCode {
    /// The HTTP status code that goes with this error code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden | ErrorCode::QuotaExceeded => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::ValidationError | ErrorCode::BadRequest => 400,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::InvalidState | ErrorCode::Conflict | ErrorCode::InsufficientCapacity => 409,
            ErrorCode::Timeout => 504,
            ErrorCode::RuntimeError | ErrorCode::InternalError => 500,
            ErrorCode::AgentError | ErrorCode::BadGateway => 502,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::InsufficientStorage => 507,
        }
    }
}

/// `{"error": {...}}`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// A sentence for people; do not parse it.
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }
}

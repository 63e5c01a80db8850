//! The API's error type: every failure becomes `{"error":{"code","message"}}`
//! with the status that goes with the code.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hyperfleet_api::{ErrorBody, ErrorCode};

use crate::lifecycle::LifecycleError;
use crate::store::StoreError;
use crate::validate::ValidationError;

#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
    pub fn not_found(what: impl std::fmt::Display) -> Self {
        ApiError::new(ErrorCode::NotFound, format!("{what} not found"))
    }
    pub fn validation(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::ValidationError, message)
    }
    pub fn internal(context: &str, e: impl std::fmt::Display) -> Self {
        // The full chain goes to the log; the client gets the sentence.
        tracing::error!(error = %e, "{context}");
        ApiError::new(
            ErrorCode::InternalError,
            format!("{context}; see the server log for details"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody::new(self.code, self.message);
        (status, axum::Json(body)).into_response()
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::validation(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NameTaken(n) => ApiError::new(
                ErrorCode::Conflict,
                format!("a machine named '{n}' already exists"),
            ),
            StoreError::NoSuchMachine(id) => ApiError::not_found(format!("machine '{id}'")),
            StoreError::NoSuchKey(id) => ApiError::not_found(format!("API key '{id}'")),
            StoreError::SnapshotNameTaken(n) => ApiError::new(
                ErrorCode::Conflict,
                format!("a snapshot named '{n}' already exists"),
            ),
            e @ StoreError::Full { .. } => ApiError::new(
                ErrorCode::InsufficientStorage,
                format!(
                    "{e}; free space on the filesystem of the data directory and retry (nothing \
                     was changed)"
                ),
            ),
            StoreError::Closed => ApiError::new(
                ErrorCode::Unavailable,
                "the server is shutting down; retry against the restarted server",
            ),
            e => ApiError::internal("the database failed", e),
        }
    }
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        match e {
            LifecycleError::NotFound(id) => ApiError::not_found(format!("machine '{id}'")),
            e @ (LifecycleError::InvalidState { .. } | LifecycleError::BeingDeleted(_)) => {
                ApiError::new(ErrorCode::InvalidState, e.to_string())
            }
            LifecycleError::NameTaken(n) => ApiError::new(
                ErrorCode::Conflict,
                format!("a machine named '{n}' already exists"),
            ),
            e @ LifecycleError::BackendDisabled(_) => ApiError::validation(format!("vmm: {e}")),
            e @ LifecycleError::BackendUnavailable(..) => {
                ApiError::new(ErrorCode::Unavailable, e.to_string())
            }
            e @ LifecycleError::QuotaExceeded(_) => {
                ApiError::new(ErrorCode::QuotaExceeded, e.to_string())
            }
            e @ LifecycleError::InsufficientCapacity { .. } => {
                ApiError::new(ErrorCode::InsufficientCapacity, e.to_string())
            }
            LifecycleError::SnapshotNotFound(id) => ApiError::not_found(format!("snapshot '{id}'")),
            e @ LifecycleError::SnapshotNameTaken(_) => {
                ApiError::new(ErrorCode::Conflict, e.to_string())
            }
            e @ LifecycleError::SnapshotConflict(_) => {
                ApiError::new(ErrorCode::InvalidState, e.to_string())
            }
            // Sizes the snapshot's memory cannot have: they conflict with it.
            LifecycleError::SnapshotMismatch(m) => ApiError::new(ErrorCode::Conflict, m),
            LifecycleError::Ephemeral(m) => ApiError::new(ErrorCode::InvalidState, m),
            LifecycleError::InsufficientStorage(m) => {
                ApiError::new(ErrorCode::InsufficientStorage, m)
            }
            LifecycleError::Store(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_507_and_other_database_failures_are_500() {
        let e: ApiError = StoreError::Full {
            context: "committing a write transaction".into(),
        }
        .into();
        assert_eq!(e.code, ErrorCode::InsufficientStorage);
        assert_eq!(e.code.http_status(), 507);
        assert!(
            e.message.contains("disk") && e.message.contains("full"),
            "{}",
            e.message
        );
        let e: ApiError = LifecycleError::Store(StoreError::Full {
            context: "x".into(),
        })
        .into();
        assert_eq!(e.code, ErrorCode::InsufficientStorage);
        let e: ApiError = StoreError::Sql {
            context: "x".into(),
            message: "disk I/O error".into(),
        }
        .into();
        assert_eq!(e.code, ErrorCode::InternalError);
    }
}

//! The proxy's own answers when it does not forward a request: the API's
//! error envelope (`{"error":{"code","message"}}`, hyperfleet_api), built
//! here so the proxy does not depend on the REST API's handlers.

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, Response, StatusCode};
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyperfleet_api::{ErrorBody, ErrorCode};

use super::ProxyBody;
use crate::store::StoreError;

/// Why the proxy answered itself: an error code of the API's vocabulary and
/// a sentence for the client.
#[derive(Debug)]
pub(crate) struct ProxyError {
    pub code: ErrorCode,
    pub message: String,
    /// `Retry-After` seconds (a failed wake).
    pub retry_after: Option<u64>,
    /// The request can go on once this machine, suspended, is woken.
    pub wake: Option<std::sync::Arc<crate::store::CachedMachine>>,
}

impl ProxyError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProxyError {
            code,
            message: message.into(),
            retry_after: None,
            wake: None,
        }
    }

    pub(crate) fn no_machine(machine: &str) -> Self {
        ProxyError::new(
            ErrorCode::NotFound,
            format!("machine '{machine}' not found"),
        )
    }

    /// A failure of the daemon itself: the detail goes to the log, the
    /// client gets the sentence.
    pub(crate) fn internal(context: &str, e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "proxy: {context}");
        ProxyError::new(
            ErrorCode::InternalError,
            format!("{context}; see the server log for details"),
        )
    }

    /// The response, with the status that goes with the code.
    pub(crate) fn into_response(self) -> Response<ProxyBody> {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&ErrorBody::new(self.code, self.message))
            // A struct of an enum and a string always serialises.
            .unwrap_or_default();
        let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// The proxy only reads machines: the store fails it by shutting down or
/// by breaking.
impl From<StoreError> for ProxyError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Closed => ProxyError::new(
                ErrorCode::Unavailable,
                "the server is shutting down; retry against the restarted server",
            ),
            e => ProxyError::internal("the database failed", crate::util::error_chain(&e)),
        }
    }
}

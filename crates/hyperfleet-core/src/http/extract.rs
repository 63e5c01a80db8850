//! Extractors that turn every malformed request into the error envelope
//! (never a bare-text 4xx, never a 500): JSON bodies, query strings, and the
//! bearer-key check with its scope.

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use hyperfleet_api::{ErrorCode, Scope};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;
use crate::auth::{self, Principal};

/// A JSON object body. Malformed JSON and a wrong content type are
/// `BAD_REQUEST`; a body that is not an object, wrong types, missing or
/// unknown fields are `VALIDATION_ERROR`; an oversized body is
/// `PAYLOAD_TOO_LARGE`.
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| {
                let m = m.trim();
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            });
        if !is_json {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "expected a JSON body with 'Content-Type: application/json'",
            ));
        }
        let body = match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "the request body is larger than {} bytes",
                        super::MAX_BODY_BYTES
                    ),
                ))
            }
            Err(r) => {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    format!("cannot read the request body: {}", r.body_text()),
                ))
            }
        };
        parse_object(&body).map(Json)
    }
}

/// Parses a JSON object, classifying failures for the error envelope.
pub fn parse_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "the request body is empty; expected a JSON object",
            ))
        }
        Some(b'{') => {}
        Some(_) if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() => {
            return Err(ApiError::new(
                ErrorCode::ValidationError,
                "the request body must be a JSON object",
            ))
        }
        Some(_) => {}
    }
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::new(ErrorCode::BadRequest, format!("malformed JSON: {e}"))
            }
            Category::Data => ApiError::new(
                ErrorCode::ValidationError,
                format!("invalid request body: {e}"),
            ),
        }
    })
}

/// A query string; a bad one is `VALIDATION_ERROR` naming the parameter.
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                Err(ApiError::validation(format!(
                    "invalid query string: {}",
                    e.body_text()
                        .trim_start_matches("Failed to deserialize query string: ")
                )))
            }
            Err(other) => Err(ApiError::validation(format!(
                "invalid query string: {}",
                other.body_text()
            ))),
        }
    }
}

/// The caller, authenticated. Handlers then check the scope they need with
/// [`Caller::require`].
pub struct Caller(pub Principal);

impl Caller {
    pub fn require(&self, scope: Scope) -> Result<&Principal, ApiError> {
        if self.0.has(scope) {
            Ok(&self.0)
        } else {
            Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "this API key lacks the '{}' scope needed here (it has: {})",
                    scope.as_str(),
                    self.0
                        .scopes
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))
        }
    }
    pub fn tenant(&self) -> &str {
        &self.0.tenant
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if state.auth_disabled {
            return Ok(Caller(Principal::anonymous_admin()));
        }
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        // A browser's WebSocket cannot send Authorization: it may offer the
        // key as a subprotocol instead, on upgrade requests only.
        let from_protocol = match header {
            None if is_websocket_upgrade(&parts.headers) => auth::ws_protocol_key(
                parts
                    .headers
                    .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            )
            .map(|key| format!("Bearer {key}")),
            _ => None,
        };
        let header = header.or(from_protocol.as_deref());
        match auth::authenticate(&state.store, header) {
            Ok(p) => Ok(Caller(p)),
            Err(refusal) => {
                tracing::debug!(?refusal, "request refused");
                Err(ApiError::new(ErrorCode::Unauthorized, refusal.message()))
            }
        }
    }
}

/// Whether the request asks to become a WebSocket (`Upgrade: websocket`).
fn is_websocket_upgrade(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

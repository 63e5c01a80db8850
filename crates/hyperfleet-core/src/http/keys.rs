//! API key routes (admin scope). Admins of the `default` tenant (the host
//! operator, including the bootstrap key) manage keys of every tenant;
//! admins of any other tenant manage only their own tenant's keys.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hyperfleet_api::{CreateKeyRequest, CreatedKey, KeyList, Scope};

use super::error::ApiError;
use super::extract::{Caller, Json};
use super::AppState;
use crate::auth::{new_key, Principal, DEFAULT_TENANT};
use crate::util::now_ms;

fn is_operator(p: &Principal) -> bool {
    p.tenant == DEFAULT_TENANT
}

fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 63
        && t.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[utoipa::path(post, path = "/keys", tag = "keys", request_body = CreateKeyRequest,
    responses((status = 201, description = "The secret is shown only in this answer", body = CreatedKey)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateKeyRequest>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Admin)?;
    if req.name.is_empty() || req.name.chars().count() > 64 {
        return Err(ApiError::validation("name: must be 1 to 64 characters"));
    }
    if req.scopes.is_empty() {
        return Err(ApiError::validation(
            "scopes: at least one of read, write, exec, admin",
        ));
    }
    let tenant = req.tenant.clone().unwrap_or_else(|| p.tenant.clone());
    if !valid_tenant(&tenant) {
        return Err(ApiError::validation(
            "tenant: lowercase letters, digits, '-' and '_', 1 to 63 characters",
        ));
    }
    if tenant != p.tenant && !is_operator(p) {
        return Err(ApiError::new(
            hyperfleet_api::ErrorCode::Forbidden,
            "only operator keys (tenant 'default') may create keys for other tenants",
        ));
    }
    let expires_at = match req.expires_in_seconds {
        None => None,
        Some(s) if (60..=10 * 365 * 24 * 3600).contains(&s) => Some(now_ms() + (s as i64) * 1000),
        Some(s) => {
            return Err(ApiError::validation(format!(
                "expires_in_seconds: must be between 60 and 315360000 (10 years), got {s}"
            )))
        }
    };
    let mut scopes = req.scopes.clone();
    scopes.sort();
    scopes.dedup();
    let (secret, rec) = new_key(&req.name, &tenant, scopes, expires_at);
    let info = rec.to_api();
    state.store.write(move |ctx| ctx.insert_key(rec)).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedKey { key: secret, info }),
    )
        .into_response())
}

#[utoipa::path(get, path = "/keys", tag = "keys",
    responses((status = 200, body = KeyList)), security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Admin)?;
    let keys = state
        .store
        .keys()
        .into_iter()
        .filter(|k| is_operator(p) || k.tenant == p.tenant)
        .map(|k| k.to_api())
        .collect();
    Ok(axum::Json(KeyList { keys }).into_response())
}

#[utoipa::path(delete, path = "/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "Key id (`key_…`)")),
    responses((status = 204, description = "Revoked (idempotent)"), (status = 404, body = hyperfleet_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Admin)?.clone();
    let visible = state
        .store
        .keys()
        .into_iter()
        .any(|k| k.id == id && (is_operator(&p) || k.tenant == p.tenant));
    if !visible {
        return Err(ApiError::not_found(format!("API key '{id}'")));
    }
    state
        .store
        .write(move |ctx| ctx.revoke_key(&id, now_ms()))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

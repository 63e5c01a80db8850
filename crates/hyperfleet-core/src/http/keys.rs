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
use crate::store::KeyRecord;
use crate::util::now_ms;

pub(super) fn is_operator(p: &Principal) -> bool {
    p.tenant == DEFAULT_TENANT
}

pub(super) fn valid_tenant(t: &str) -> bool {
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
    responses((status = 204, description = "Revoked (idempotent)"), (status = 404, body = hyperfleet_api::ErrorBody),
        (status = 409, description = "The last active admin key (CONFLICT)", body = hyperfleet_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Admin)?.clone();
    // One revocation at a time: two concurrent revocations of the last two
    // admin keys must not both pass the check below.
    let _one_at_a_time = REVOKING
        .get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await;
    let keys = state.store.keys();
    let visible = keys
        .iter()
        .any(|k| k.id == id && (is_operator(&p) || k.tenant == p.tenant));
    if !visible {
        return Err(ApiError::not_found(format!("API key '{id}'")));
    }
    if let Some(why) = lockout(&keys, &id, now_ms()) {
        return Err(ApiError::new(
            hyperfleet_api::ErrorCode::Conflict,
            format!(
                "refusing to revoke API key '{id}': {why}, and every request would then be \
                 refused; create another admin key first (a lost one is replaced on the host \
                 with `hyperfleet keys create --admin --data-dir <dir>`)"
            ),
        ));
    }
    state
        .store
        .write(move |ctx| ctx.revoke_key(&id, now_ms()))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

static REVOKING: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();

fn active_admin(k: &KeyRecord, now: i64) -> bool {
    k.revoked_at.is_none()
        && k.expires_at.is_none_or(|t| t > now)
        && k.scopes.contains(&Scope::Admin)
}

/// Why revoking key `id` would lock the operators out, if it would: it is
/// the last active admin key of the operator tenant (who manages every
/// key), or the last active admin key of all.
fn lockout(keys: &[KeyRecord], id: &str, now: i64) -> Option<&'static str> {
    let target = keys.iter().find(|k| k.id == id)?;
    if !active_admin(target, now) {
        return None;
    }
    let mut others = keys.iter().filter(|k| k.id != id && active_admin(k, now));
    if target.tenant == DEFAULT_TENANT {
        (!others.any(|k| k.tenant == DEFAULT_TENANT))
            .then_some("it is the last active admin key of the operator tenant 'default'")
    } else {
        others
            .next()
            .is_none()
            .then_some("it is the last active admin key")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::new_key;

    fn key(tenant: &str, scopes: &[Scope]) -> KeyRecord {
        new_key("k", tenant, scopes.to_vec(), None).1
    }

    #[test]
    fn the_last_active_operator_admin_key_cannot_be_revoked() {
        let now = now_ms();
        let admin = key(DEFAULT_TENANT, &[Scope::Admin]);
        let reader = key(DEFAULT_TENANT, &[Scope::Read]);
        let tenant_admin = key("alice", &[Scope::Admin]);
        let mut keys = vec![admin.clone(), reader.clone(), tenant_admin.clone()];
        assert!(lockout(&keys, &admin.id, now).is_some());
        // Non-admin keys and other tenants' admins (with an operator admin
        // left) go freely; unknown ids are for the 404 path.
        assert_eq!(lockout(&keys, &reader.id, now), None);
        assert_eq!(lockout(&keys, &tenant_admin.id, now), None);
        assert_eq!(lockout(&keys, "key_nope", now), None);
        // A second operator admin makes either revocable...
        let second = key(DEFAULT_TENANT, &[Scope::Read, Scope::Admin]);
        keys.push(second.clone());
        assert_eq!(lockout(&keys, &admin.id, now), None);
        // ...unless it is revoked or expired.
        keys.last_mut().unwrap().revoked_at = Some(now - 1);
        assert!(lockout(&keys, &admin.id, now).is_some());
        keys.last_mut().unwrap().revoked_at = None;
        keys.last_mut().unwrap().expires_at = Some(now - 1);
        assert!(lockout(&keys, &admin.id, now).is_some());
        // Revoking an already revoked key is the idempotent no-op.
        keys[0].revoked_at = Some(now - 1);
        assert_eq!(lockout(&keys, &admin.id, now), None);
        // With no operator admin at all, the last tenant admin stays.
        let keys = vec![tenant_admin.clone(), reader];
        assert!(lockout(&keys, &tenant_admin.id, now).is_some());
    }
}

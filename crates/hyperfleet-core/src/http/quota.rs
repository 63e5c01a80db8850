//! Tenant quota routes. A key reads its own tenant's quota (`read`
//! scope); operator admins (tenant `default`) read every tenant's and are
//! the only ones who change them: a tenant's own admin could otherwise lift
//! the limits the operator set on it. Enforcement is the supervisor's (at
//! create, in the transaction that inserts the machine).

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use hyperfleet_api::{ErrorCode, Quota, QuotaLimits, Scope};

use super::error::ApiError;
use super::extract::{Caller, Json};
use super::keys::{is_operator, valid_tenant};
use super::AppState;
use crate::auth::Principal;

fn check_tenant(tenant: &str) -> Result<(), ApiError> {
    if valid_tenant(tenant) {
        return Ok(());
    }
    Err(ApiError::validation(
        "tenant: lowercase letters, digits, '-' and '_', 1 to 63 characters",
    ))
}

/// Only operator admins change quotas.
fn require_operator<'a>(caller: &'a Caller, tenant: &str) -> Result<&'a Principal, ApiError> {
    let p = caller.require(Scope::Admin)?;
    check_tenant(tenant)?;
    if !is_operator(p) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "only operator admin keys (tenant 'default') may change quotas",
        ));
    }
    Ok(p)
}

fn quota(state: &AppState, tenant: &str) -> Result<Quota, ApiError> {
    let (own, usage) = state.store.quota_and_usage(tenant)?;
    Ok(Quota {
        tenant: tenant.to_string(),
        limits: own.unwrap_or_else(|| state.sup.default_quota()),
        default: own.is_none(),
        usage,
    })
}

#[utoipa::path(get, path = "/tenants/{tenant}/quota", tag = "quotas",
    params(("tenant" = String, Path, description = "Tenant name", pattern = "^[a-z0-9_-]{1,63}$")),
    responses(
        (status = 200, description = "The limits in force and what the tenant's machines hold", body = Quota),
        (status = 400, description = "Malformed tenant name", body = hyperfleet_api::ErrorBody),
        (status = 401, description = "No valid API key", body = hyperfleet_api::ErrorBody),
        (status = 403, description = "Another tenant's quota, asked by a key that is not an operator admin", body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(tenant): Path<String>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Read)?;
    check_tenant(&tenant)?;
    if tenant != p.tenant && !(is_operator(p) && p.has(Scope::Admin)) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "only operator admin keys (tenant 'default') may read other tenants' quotas",
        ));
    }
    Ok(axum::Json(quota(&state, &tenant)?).into_response())
}

#[utoipa::path(put, path = "/tenants/{tenant}/quota", tag = "quotas",
    params(("tenant" = String, Path, description = "Tenant name", pattern = "^[a-z0-9_-]{1,63}$")),
    request_body(content = QuotaLimits, description = "All four limits; an absent or null one is unlimited"),
    responses(
        (status = 200, description = "The tenant's quota is now these limits", body = Quota),
        (status = 400, description = "Malformed tenant name or body", body = hyperfleet_api::ErrorBody),
        (status = 401, description = "No valid API key", body = hyperfleet_api::ErrorBody),
        (status = 403, description = "Not an operator admin key", body = hyperfleet_api::ErrorBody),
        (status = 507, description = "The disk holding the database is full (INSUFFICIENT_STORAGE); nothing was changed", body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    Path(tenant): Path<String>,
    Json(limits): Json<QuotaLimits>,
) -> Result<Response, ApiError> {
    // SQLite integers are signed 64-bit: a larger limit could not be kept
    // as given.
    let fields = [
        ("max_machines", limits.max_machines),
        ("max_vcpus", limits.max_vcpus),
        ("max_memory_mib", limits.max_memory_mib),
        ("max_disk_bytes", limits.max_disk_bytes),
    ];
    for (name, v) in fields {
        if v.is_some_and(|n| n > MAX_LIMIT) {
            return Err(ApiError::validation(format!(
                "{name}: must be at most {MAX_LIMIT} or null (unlimited)"
            )));
        }
    }
    change(state, caller, tenant, Some(limits)).await
}

const MAX_LIMIT: u64 = i64::MAX as u64;

#[utoipa::path(delete, path = "/tenants/{tenant}/quota", tag = "quotas",
    params(("tenant" = String, Path, description = "Tenant name", pattern = "^[a-z0-9_-]{1,63}$")),
    responses(
        (status = 200, description = "The tenant has no quota of its own: the server's defaults apply", body = Quota),
        (status = 400, description = "Malformed tenant name", body = hyperfleet_api::ErrorBody),
        (status = 401, description = "No valid API key", body = hyperfleet_api::ErrorBody),
        (status = 403, description = "Not an operator admin key", body = hyperfleet_api::ErrorBody),
        (status = 507, description = "The disk holding the database is full (INSUFFICIENT_STORAGE); nothing was changed", body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(tenant): Path<String>,
) -> Result<Response, ApiError> {
    change(state, caller, tenant, None).await
}

/// Sets (`Some`) or removes (`None`) a tenant's own quota and answers with
/// the quota in force afterwards.
async fn change(
    state: AppState,
    caller: Caller,
    tenant: String,
    limits: Option<QuotaLimits>,
) -> Result<Response, ApiError> {
    require_operator(&caller, &tenant)?;
    let t = tenant.clone();
    state
        .store
        .write(move |ctx| ctx.set_quota(&t, limits.as_ref()))
        .await?;
    match limits {
        Some(limits) => tracing::info!(%tenant, ?limits, "tenant quota set"),
        None => tracing::info!(%tenant, "tenant quota removed; the server's defaults apply"),
    }
    Ok(axum::Json(quota(&state, &tenant)?).into_response())
}

//! The OpenAPI document, generated from the handlers' annotations and the
//! API types. `docs/openapi.json` is a checked-in copy; a test fails when
//! they drift (regenerate with `hyperfleet openapi > docs/openapi.json`).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{guest, health, keys, machines, quota};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("hf_…")
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Hyperfleet API",
        description = "Durable microVM lifecycle. Every route is served under /api/v1 and at the unprefixed path. \
                       Errors are {\"error\":{\"code\",\"message\"}}.",
    ),
    paths(
        health::health,
        machines::create, machines::list, machines::get, machines::delete,
        machines::start, machines::stop, machines::restart, machines::pause,
        machines::resume, machines::kill, machines::suspend,
        machines::wait, machines::events,
        guest::exec, guest::exec_ws, guest::write_json, guest::write_raw, guest::read, guest::delete,
        guest::stat, guest::list, guest::mkdir, guest::logs,
        keys::create, keys::list, keys::revoke,
        quota::get, quota::put, quota::delete,
    ),
    components(schemas(
        hyperfleet_api::Machine, hyperfleet_api::MachineList, hyperfleet_api::MachineStatus,
        hyperfleet_api::CreateMachineRequest, hyperfleet_api::VmmKind, hyperfleet_api::Persistence,
        hyperfleet_api::PersistenceType, hyperfleet_api::ErrorBody, hyperfleet_api::ErrorDetail,
        hyperfleet_api::ErrorCode, hyperfleet_api::MachineEvent, hyperfleet_api::StepTiming,
        hyperfleet_api::EventList, hyperfleet_api::Health, hyperfleet_api::StoreHealth,
        hyperfleet_api::BackendHealth, hyperfleet_api::Scope, hyperfleet_api::CreateKeyRequest,
        hyperfleet_api::CreatedKey, hyperfleet_api::ApiKey, hyperfleet_api::KeyList,
        hyperfleet_api::ExecRequest, hyperfleet_api::ExecResult, hyperfleet_api::ExecStreamEvent,
        hyperfleet_api::FileWrite, hyperfleet_api::FileContent, hyperfleet_api::FileStat,
        hyperfleet_api::DirEntry, hyperfleet_api::DirListing, hyperfleet_api::FileWritten,
        hyperfleet_api::Quota, hyperfleet_api::QuotaLimits, hyperfleet_api::QuotaUsage,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "machines", description = "Create, control and delete machines"),
        (name = "guest", description = "Commands, files and console inside running machines"),
        (name = "keys", description = "API keys (admin scope)"),
        (name = "quotas", description = "Tenant quotas: what a tenant's machines may hold"),
        (name = "health", description = "Liveness and readiness"),
    )
)]
pub struct ApiDoc;

/// The document as pretty JSON with a trailing newline (the checked-in form).
pub fn document() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"cannot render OpenAPI: {e}\"}}"));
    s.push('\n');
    s
}

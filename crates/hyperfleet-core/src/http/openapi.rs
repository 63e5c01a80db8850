//! The OpenAPI document, generated from the handlers' annotations and the
//! API types. `docs/openapi.json` is a checked-in copy; a test fails when
//! they drift (regenerate with `hyperfleet openapi > docs/openapi.json`).
//!
//! Handlers document their own successes and the errors particular to
//! them; [`CommonErrors`] adds the errors that follow from what a route is
//! (authenticated, takes input, names a machine, writes the database, works
//! in the guest), so every status the server can answer is documented
//! without repeating it on every route. `scripts/fuzz-api.sh` checks the
//! document against the live server.

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::{Schema, SchemaType, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{events, guest, health, images, keys, machines, metrics, quota, snapshots, storage};

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

/// What [`CommonErrors`] looks at in an operation.
struct Route<'a> {
    path: &'a str,
    method: &'static str,
    op: &'a Operation,
}

impl Route<'_> {
    fn authenticated(&self) -> bool {
        self.op.security.as_ref().is_some_and(|s| !s.is_empty())
    }
    fn tagged(&self, tag: &str) -> bool {
        self.op
            .tags
            .as_ref()
            .is_some_and(|t| t.iter().any(|x| x == tag))
    }
    fn takes_input(&self) -> bool {
        self.op.parameters.as_ref().is_some_and(|p| !p.is_empty()) || self.op.request_body.is_some()
    }
    fn json_body(&self) -> bool {
        self.op
            .request_body
            .as_ref()
            .is_some_and(|b| b.content.contains_key("application/json"))
    }
    /// Guest routes that talk to the agent (the console log does not).
    fn needs_agent(&self) -> bool {
        self.tagged("guest") && !self.path.ends_with("/logs")
    }
}

/// The shared error answers: their names under `components/responses` and
/// their statuses.
const SHARED: &[(&str, &str)] = &[
    ("BadRequest", "400"),
    ("Unauthorized", "401"),
    ("Forbidden", "403"),
    ("NotFound", "404"),
    ("NotRunning", "409"),
    ("PayloadTooLarge", "413"),
    ("TooManyRequests", "429"),
    ("InternalError", "500"),
    ("AgentError", "502"),
    ("Unavailable", "503"),
    ("InsufficientStorage", "507"),
];

/// What a shared error answer says.
fn description(status: &str) -> &'static str {
    match status {
        "400" => {
            "The request is malformed (BAD_REQUEST) or a value is outside what the API accepts \
             (VALIDATION_ERROR); the message names the field"
        }
        "401" => "Missing, malformed, unknown, expired or revoked API key (UNAUTHORIZED)",
        "403" => "The API key lacks the scope this route needs (FORBIDDEN)",
        "404" => "No such machine or key for this tenant (NOT_FOUND)",
        "409" => "The machine is not running, or its backend has no guest agent (INVALID_STATE)",
        "413" => "The request body is larger than 1 MiB (PAYLOAD_TOO_LARGE)",
        "429" => {
            "The tenant or the server already has as many guest requests in progress as allowed; \
             retry when one has finished (TOO_MANY_REQUESTS)"
        }
        "500" => {
            "A bug or an unexpected host failure; details are in the server log (INTERNAL_ERROR)"
        }
        "502" => "The guest agent cannot be reached or failed (AGENT_ERROR)",
        "503" => {
            "The server is shutting down, or the machine's VMM backend is unavailable (UNAVAILABLE)"
        }
        "507" => {
            "The disk holding the database is full: nothing was changed; retry once space is \
             freed. A create, suspend or snapshot is also refused when the storage budget is \
             used up and nothing can be evicted (INSUFFICIENT_STORAGE)"
        }
        _ => "",
    }
}

/// Whether the route can answer the shared error `status`: authenticated
/// routes can refuse the key or its scope, fail inside, or find the server
/// shutting down; routes with input can refuse it; routes naming a machine
/// or key can find none; JSON bodies can be too large; guest routes share
/// the request slots and (except the console log) need the agent; changes
/// outside the guest write the database.
fn applies(status: &str, r: &Route) -> bool {
    match status {
        "400" => r.takes_input(),
        "401" | "403" | "500" | "503" => r.authenticated(),
        "404" => r.path.contains('{'),
        "409" | "502" => r.needs_agent(),
        "413" => r.json_body(),
        "429" => r.tagged("guest"),
        "507" => r.authenticated() && r.method != "get" && !r.tagged("guest"),
        _ => false,
    }
}

/// Adds the shared error answers (see [`SHARED`]) to every operation they
/// apply to ([`applies`]), unless the handler documents that status itself, and states
/// query parameters without `null` (a query string cannot carry one).
struct CommonErrors;

impl Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, status) in SHARED {
            let body = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build();
            components.responses.insert(
                name.to_string(),
                RefOr::T(
                    ResponseBuilder::new()
                        .description(description(status))
                        .content("application/json", body)
                        .build(),
                ),
            );
        }
        for (path, item) in openapi.paths.paths.iter_mut() {
            let ops = [
                ("get", &mut item.get),
                ("put", &mut item.put),
                ("post", &mut item.post),
                ("delete", &mut item.delete),
                ("patch", &mut item.patch),
            ];
            for (method, op) in ops {
                let Some(op) = op.as_mut() else { continue };
                let route = Route { path, method, op };
                let add: Vec<&(&str, &str)> =
                    SHARED.iter().filter(|(_, s)| applies(s, &route)).collect();
                for (name, status) in add {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| RefOr::Ref(Ref::from_response_name(*name)));
                }
                for p in op.parameters.iter_mut().flatten() {
                    if p.parameter_in == ParameterIn::Query {
                        if let Some(schema) = p.schema.as_mut() {
                            drop_null(schema);
                        }
                    }
                }
            }
        }
    }
}

/// `T | null` as `T`.
fn drop_null(schema: &mut RefOr<Schema>) {
    match schema {
        RefOr::T(Schema::Object(o)) => {
            if let SchemaType::Array(types) = &o.schema_type {
                let rest: Vec<Type> = types
                    .iter()
                    .filter(|t| **t != Type::Null)
                    .cloned()
                    .collect();
                o.schema_type = match rest.as_slice() {
                    [one] => SchemaType::Type(one.clone()),
                    _ => SchemaType::Array(rest),
                };
            }
        }
        RefOr::T(Schema::OneOf(one_of)) => {
            let is_null = |s: &RefOr<Schema>| matches!(s, RefOr::T(Schema::Object(o)) if o.schema_type == SchemaType::Type(Type::Null));
            let rest: Vec<RefOr<Schema>> = one_of
                .items
                .iter()
                .filter(|s| !is_null(s))
                .cloned()
                .collect();
            if let [one] = rest.as_slice() {
                *schema = one.clone();
            }
        }
        _ => {}
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
        health::health, metrics::metrics, storage::storage, machines::update,
        machines::create, machines::list, machines::get, machines::delete,
        machines::start, machines::stop, machines::restart, machines::pause,
        machines::resume, machines::kill, machines::suspend,
        machines::wait, machines::events, events::tenant_events,
        guest::exec, guest::exec_ws, guest::write_json, guest::write_raw, guest::read, guest::delete,
        guest::stat, guest::list, guest::mkdir, guest::logs,
        snapshots::create, snapshots::list, snapshots::get, snapshots::delete, snapshots::fork,
        snapshots::warm_template, snapshots::list_templates, snapshots::delete_template,
        keys::create, keys::list, keys::revoke,
        quota::get, quota::put, quota::delete,
        images::pull, images::import, images::list, images::get, images::delete, images::events,
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
        hyperfleet_api::Snapshot, hyperfleet_api::SnapshotList, hyperfleet_api::SnapshotStatus,
        hyperfleet_api::CreateSnapshotRequest, hyperfleet_api::ForkRequest,
        hyperfleet_api::ForkResult, hyperfleet_api::CreateTemplateRequest,
        hyperfleet_api::Image, hyperfleet_api::ImageList, hyperfleet_api::ImageStatus,
        hyperfleet_api::ImageLayer, hyperfleet_api::ImageRunConfig, hyperfleet_api::ImageEvent,
        hyperfleet_api::ImageEventList, hyperfleet_api::PullImageRequest, hyperfleet_api::RegistryAuth,
        hyperfleet_api::UpdateMachineRequest, hyperfleet_api::Storage, hyperfleet_api::StorageEviction,
    )),
    modifiers(&BearerAuth, &CommonErrors),
    tags(
        (name = "machines", description = "Create, control and delete machines"),
        (name = "guest", description = "Commands, files and console inside running machines"),
        (name = "snapshots", description = "Snapshots of machines, machines made from them, and forks"),
        (name = "keys", description = "API keys (admin scope)"),
        (name = "quotas", description = "Tenant quotas: what a tenant's machines may hold"),
        (name = "images", description = "OCI images: pull, import, and machines made from them"),
        (name = "health", description = "Liveness and readiness"),
        (name = "metrics", description = "Prometheus metrics of the whole host (operator keys)"),
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

//! Hand-built OpenAPI schemas for fields whose rules the derive cannot say
//! (maps with constrained names, arrays with unique items or a constrained
//! first item, strings with a shape). Each states exactly what the server
//! accepts: a request the schema allows is not refused for its shape, and
//! one it forbids is refused (the schema fuzzer in `scripts/fuzz-api.sh`
//! checks both directions).

use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, ObjectBuilder, SchemaType, Type,
};
use utoipa::openapi::Schema;

use crate::LIMITS;

/// A string with no NUL byte (it would end the string in the guest).
pub const NO_NUL: &str = r"^[^\x00]*$";

/// Canonical standard base64 with padding, as the server decodes it (the
/// unused bits of the last character must be zero).
pub const BASE64: &str =
    r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$";

/// An absolute guest path.
pub const GUEST_PATH: &str = r"^/[^\x00]*$";

/// An absolute guest path that names something other than the root: at
/// least one component that is neither empty nor `.`, and no `..` component
/// (written without lookarounds, which generators handle poorly).
pub const REMOVABLE_GUEST_PATH: &str = concat!(
    r"^(?:/(?:[^/.\x00][^/\x00]*|\.[^/.\x00][^/\x00]*|\.\.[^/\x00]+|\.)?)*",
    r"/(?:[^/.\x00][^/\x00]*|\.[^/.\x00][^/\x00]*|\.\.[^/\x00]+)",
    r"(?:/(?:[^/.\x00][^/\x00]*|\.[^/.\x00][^/\x00]*|\.\.[^/\x00]+|\.)?)*$"
);

/// Longest guest path accepted, in characters.
pub const GUEST_PATH_MAX_CHARS: usize = 4096;

/// Largest permission bits accepted (`0o7777`).
pub const MODE_MAX: u32 = 0o7777;

fn string(pattern: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(pattern))
}

fn string_map(
    names: ObjectBuilder,
    values: ObjectBuilder,
    max: Option<usize>,
    doc: &str,
) -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(doc))
        .property_names(Some(names.schema_type(Type::String)))
        .additional_properties(Some(AdditionalProperties::RefOr(
            Schema::Object(values.build()).into(),
        )))
        .max_properties(max)
        .into()
}

/// `env` of a machine: shell-style names, bounded values.
pub fn machine_env() -> Schema {
    string_map(
        string("^[A-Za-z_][A-Za-z0-9_]*$").max_length(Some(LIMITS.env_key_max_len)),
        string(NO_NUL).max_length(Some(LIMITS.env_value_max_len)),
        Some(LIMITS.env_max),
        "Environment for commands run in the guest, and laid over the image's for its main process.",
    )
}

/// Most elements of a main process's `entrypoint` or `cmd`.
pub const PROCESS_ARGV_MAX: usize = 256;
/// Longest element of `entrypoint` or `cmd`, in characters.
pub const PROCESS_ARG_MAX_CHARS: usize = 4096;

/// `entrypoint` and `cmd` of a machine: strings without NUL, bounded.
pub fn process_argv() -> Schema {
    ArrayBuilder::new()
        .items(string(NO_NUL).max_length(Some(PROCESS_ARG_MAX_CHARS)))
        .max_items(Some(PROCESS_ARGV_MAX))
        .description(Some(
            "Strings without NUL, each at most 4096 characters, at most 256. Needs `image`.",
        ))
        .into()
}

/// `metadata` of a machine: free-form labels, bounded.
pub fn machine_metadata() -> Schema {
    string_map(
        ObjectBuilder::new()
            .min_length(Some(1))
            .max_length(Some(LIMITS.metadata_key_max_len)),
        ObjectBuilder::new()
            .schema_type(Type::String)
            .max_length(Some(LIMITS.metadata_value_max_len)),
        Some(LIMITS.metadata_max),
        "Free-form labels for the caller's own bookkeeping.",
    )
}

/// `exposed_ports` of a machine.
pub fn exposed_ports() -> Schema {
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1))
                .maximum(Some(65535)),
        )
        .max_items(Some(LIMITS.exposed_ports_max))
        .unique_items(true)
        .description(Some(
            "Guest ports reachable through the proxy, 1–65535, no duplicates.",
        ))
        .into()
}

/// `names` of a fork: 1–16 machine names (the rules of `POST /machines`).
pub fn fork_names() -> Schema {
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(63))
                .pattern(Some(
                    "^(?!m[0-9a-hjkmnp-tv-z]{15}$)[a-z]([a-z0-9-]*[a-z0-9])?$",
                )),
        )
        .min_items(Some(1))
        .max_items(Some(16))
        .unique_items(true)
        .description(Some(
            "Names of the copies (machine name rules), as many as `count`.",
        ))
        .into()
}

/// `env` of one command: any name a process environment can hold.
pub fn exec_env() -> Schema {
    string_map(
        string(r"^[^=\x00]+$"),
        string(NO_NUL),
        None,
        "Added to the machine's `env` for this command. Names are non-empty, without `=` or NUL.",
    )
}

/// `command` of an exec request: argv, the program name first.
pub fn command() -> Schema {
    ArrayBuilder::new()
        // `items` covers only what follows `prefixItems`: the program name
        // states the NUL rule too.
        .prefix_items([string(NO_NUL).min_length(Some(1))])
        .items(string(NO_NUL))
        .min_items(Some(1))
        .max_items(Some(4096))
        .description(Some(
            "argv (at most 4096 arguments, no NUL); the first element, non-empty, is looked up in \
             the guest's PATH. `cmd` is accepted as an alias.",
        ))
        .into()
}

/// Base64 content.
pub fn base64() -> Schema {
    string(BASE64).into()
}

/// Base64 content, or null for none.
pub fn base64_or_null() -> Schema {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .pattern(Some(BASE64))
        .into()
}

/// An absolute guest path.
pub fn guest_path() -> Schema {
    string(GUEST_PATH)
        .max_length(Some(GUEST_PATH_MAX_CHARS))
        .description(Some(
            "Absolute path in the guest (at most 4096 characters, no NUL).",
        ))
        .into()
}

/// A guest path to remove: never the root, however spelled.
pub fn removable_guest_path() -> Schema {
    string(REMOVABLE_GUEST_PATH)
        .max_length(Some(GUEST_PATH_MAX_CHARS))
        .description(Some(
            "Absolute path in the guest (at most 4096 characters, no NUL); never the root \
             however spelled (`/`, `//`, `/./`), and no `..` components.",
        ))
        .into()
}

//! Validation of a create request into a machine spec. Every bound is in
//! `hyperfleet_api::LIMITS`, documented in docs/api.md and stated in the
//! OpenAPI schema. Lengths are counted in characters, as JSON Schema's
//! `maxLength` counts them, so a request the schema allows is never refused
//! for its length.

use std::collections::BTreeSet;

use std::collections::BTreeMap;

use hyperfleet_api::schema::{GUEST_PATH_MAX_CHARS, PROCESS_ARGV_MAX, PROCESS_ARG_MAX_CHARS};
use hyperfleet_api::{
    CreateMachineRequest, Persistence, RestartPolicy, RestartPolicyKind, UpdateMachineRequest,
    VmmKind, DEFAULT_MAX_RETRIES, LIMITS, MAX_RETRIES_MAX,
};

use crate::store::MachineSpec;
use crate::util::looks_like_machine_id;

/// A rejected field, with a sentence saying what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        message: message.into(),
    }
}

fn validate_metadata(metadata: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    if metadata.len() > LIMITS.metadata_max {
        return Err(bad(
            "metadata",
            format!("at most {} entries", LIMITS.metadata_max),
        ));
    }
    for (k, v) in metadata {
        if k.is_empty() || k.chars().count() > LIMITS.metadata_key_max_len {
            return Err(bad(
                "metadata",
                format!(
                    "keys must be 1 to {} characters",
                    LIMITS.metadata_key_max_len
                ),
            ));
        }
        if v.chars().count() > LIMITS.metadata_value_max_len {
            return Err(bad(
                "metadata",
                format!(
                    "the value of '{k}' is longer than {} characters",
                    LIMITS.metadata_value_max_len
                ),
            ));
        }
    }
    Ok(())
}

fn validate_idle_timeout(t: Option<u64>) -> Result<(), ValidationError> {
    if t.is_some_and(|t| t > LIMITS.idle_timeout_max_seconds) {
        return Err(bad(
            "idle_timeout_seconds",
            format!(
                "must be at most {} (7 days) or null",
                LIMITS.idle_timeout_max_seconds
            ),
        ));
    }
    Ok(())
}

fn validate_persistence(p: Option<&Persistence>) -> Result<(), ValidationError> {
    if p.and_then(|p| p.priority)
        .is_some_and(|v| v > Persistence::MAX_PRIORITY)
    {
        return Err(bad(
            "persistence.priority",
            format!("must be 0 to {}", Persistence::MAX_PRIORITY),
        ));
    }
    Ok(())
}

/// `PATCH /machines/{id}`: every field present is checked as create checks it.
pub fn validate_update(req: &UpdateMachineRequest) -> Result<(), ValidationError> {
    if let Some(m) = &req.metadata {
        validate_metadata(m)?;
    }
    if let Some(t) = req.idle_timeout_seconds {
        validate_idle_timeout(t)?;
    }
    validate_persistence(req.persistence.as_ref())
}

/// Names are DNS labels so they can appear in proxy host names.
pub fn validate_name(name: &str) -> Result<(), ValidationError> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty() || name.len() > LIMITS.name_max_len {
        return Err(bad(
            "name",
            format!("must be 1 to {} characters long", LIMITS.name_max_len),
        ));
    }
    if !ok_chars || !name.as_bytes()[0].is_ascii_lowercase() || name.ends_with('-') {
        return Err(bad(
            "name",
            "must be lowercase letters, digits and '-', start with a letter and not end with '-'",
        ));
    }
    if looks_like_machine_id(name) {
        return Err(bad(
            "name",
            "must not have the shape of a machine id ('m' followed by 15 id characters)",
        ));
    }
    Ok(())
}

/// Snapshot names follow machine names' rules, and must not look like a
/// snapshot id.
pub fn validate_snapshot_name(name: &str) -> Result<(), ValidationError> {
    validate_name(name)?;
    if crate::util::looks_like_id(name, 's') {
        return Err(bad(
            "name",
            "must not have the shape of a snapshot id ('s' followed by 15 id characters)",
        ));
    }
    Ok(())
}

fn env_key_ok(k: &str) -> bool {
    let mut bytes = k.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

pub fn validate_create(
    req: CreateMachineRequest,
    default_vmm: VmmKind,
) -> Result<(Option<String>, MachineSpec), ValidationError> {
    if let Some(name) = &req.name {
        validate_name(name)?;
    }
    let vcpu_count = req.vcpu_count.unwrap_or(1);
    if !(LIMITS.vcpu_min..=LIMITS.vcpu_max).contains(&vcpu_count) {
        return Err(bad(
            "vcpu_count",
            format!(
                "must be between {} and {}, got {vcpu_count}",
                LIMITS.vcpu_min, LIMITS.vcpu_max
            ),
        ));
    }
    let mem_size_mib = req.mem_size_mib.unwrap_or(256);
    if !(LIMITS.mem_min_mib..=LIMITS.mem_max_mib).contains(&mem_size_mib) {
        return Err(bad(
            "mem_size_mib",
            format!(
                "must be between {} and {} MiB (a guest kernel needs at least {} MiB to boot), got {mem_size_mib}",
                LIMITS.mem_min_mib, LIMITS.mem_max_mib, LIMITS.mem_min_mib
            ),
        ));
    }
    if req.exposed_ports.len() > LIMITS.exposed_ports_max {
        return Err(bad(
            "exposed_ports",
            format!("at most {} ports", LIMITS.exposed_ports_max),
        ));
    }
    let mut seen = BTreeSet::new();
    for p in &req.exposed_ports {
        if !(1..=65535).contains(p) {
            return Err(bad(
                "exposed_ports",
                format!("ports must be between 1 and 65535, got {p}"),
            ));
        }
        if !seen.insert(*p) {
            return Err(bad("exposed_ports", format!("port {p} is listed twice")));
        }
    }
    if req.env.len() > LIMITS.env_max {
        return Err(bad("env", format!("at most {} variables", LIMITS.env_max)));
    }
    for (k, v) in &req.env {
        if k.len() > LIMITS.env_key_max_len || !env_key_ok(k) {
            return Err(bad(
                "env",
                format!(
                    "variable names must match [A-Za-z_][A-Za-z0-9_]* and be at most {} characters; '{}' does not",
                    LIMITS.env_key_max_len,
                    k.chars().take(64).collect::<String>()
                ),
            ));
        }
        if v.chars().count() > LIMITS.env_value_max_len || v.contains('\0') {
            return Err(bad(
                "env",
                format!(
                    "the value of {k} must be at most {} characters and contain no NUL",
                    LIMITS.env_value_max_len
                ),
            ));
        }
    }
    validate_metadata(&req.metadata)?;
    validate_idle_timeout(req.idle_timeout_seconds)?;
    validate_persistence(req.persistence.as_ref())?;
    let spec = MachineSpec {
        vmm: req.vmm.unwrap_or(default_vmm),
        vcpu_count,
        mem_size_mib,
        exposed_ports: req.exposed_ports,
        env: req.env,
        metadata: req.metadata,
        idle_timeout_seconds: req.idle_timeout_seconds,
        // The policy with its defaults filled in: what the machine shows.
        persistence: Some(Persistence::effective(req.persistence.as_ref())),
        image: None,
        disk_bytes: None,
        egress: req.network.and_then(|n| n.egress).unwrap_or(true),
        public: req.public.unwrap_or(false),
        access_token: None,
        // The id or name as asked; the supervisor resolves it to an id.
        base_snapshot: req.snapshot_id,
        oci: None,
        process: None,
        restart: None,
    };
    Ok((req.name, spec))
}

/// A create's main-process fields, validated (see
/// [`take_process_overrides`]); all None when the request gave none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessOverrides {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    /// Normalised: an `on-failure` policy has its `max_retries`.
    pub restart: Option<RestartPolicy>,
}

impl ProcessOverrides {
    /// Why the fields conflict with each other or with the rest of the
    /// request (409 CONFLICT: each is valid on its own): they need `image`,
    /// and `max_retries` goes only with `on-failure`.
    pub fn conflict(&self, has_image: bool) -> Option<String> {
        let given = self.given();
        if !has_image && !given.is_empty() {
            return Some(format!(
                "{} need image: only a machine made from an OCI image has a main process",
                given.join(", ")
            ));
        }
        match self.restart {
            Some(p) if p.policy != RestartPolicyKind::OnFailure && p.max_retries.is_some() => {
                Some(format!(
                    "restart: max_retries goes only with the on-failure policy, not '{}'",
                    p.policy.as_str()
                ))
            }
            _ => None,
        }
    }

    /// The fields given, by name (for the error that says they need `image`).
    pub fn given(&self) -> Vec<&'static str> {
        [
            ("entrypoint", self.entrypoint.is_some()),
            ("cmd", self.cmd.is_some()),
            ("workdir", self.workdir.is_some()),
            ("user", self.user.is_some()),
            ("restart", self.restart.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, given)| given.then_some(n))
        .collect()
    }
}

fn check_argv(field: &str, argv: &[String]) -> Result<(), ValidationError> {
    if argv.len() > PROCESS_ARGV_MAX {
        return Err(bad(field, format!("at most {PROCESS_ARGV_MAX} strings")));
    }
    for a in argv {
        if a.chars().count() > PROCESS_ARG_MAX_CHARS || a.contains('\0') {
            return Err(bad(
                field,
                format!(
                    "each string must be at most {PROCESS_ARG_MAX_CHARS} characters and contain no NUL"
                ),
            ));
        }
    }
    Ok(())
}

fn user_part_ok(p: &str) -> bool {
    let mut b = p.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphanumeric() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Takes the main-process fields (`entrypoint`, `cmd`, `workdir`, `user`,
/// `restart`) out of a create request and checks their bounds. Whether
/// they go together with the rest is [`ProcessOverrides::conflict`]'s to say.
pub fn take_process_overrides(
    req: &mut CreateMachineRequest,
) -> Result<ProcessOverrides, ValidationError> {
    let ov = ProcessOverrides {
        entrypoint: req.entrypoint.take(),
        cmd: req.cmd.take(),
        workdir: req.workdir.take(),
        user: req.user.take(),
        restart: req.restart.take(),
    };
    if let Some(e) = &ov.entrypoint {
        check_argv("entrypoint", e)?;
    }
    if let Some(c) = &ov.cmd {
        check_argv("cmd", c)?;
    }
    if let Some(w) = &ov.workdir {
        if !w.starts_with('/') || w.contains('\0') || w.chars().count() > GUEST_PATH_MAX_CHARS {
            return Err(bad(
                "workdir",
                format!(
                    "must be an absolute path of at most {GUEST_PATH_MAX_CHARS} characters without NUL"
                ),
            ));
        }
    }
    if let Some(u) = &ov.user {
        let ok = u.len() <= 256
            && match u.split_once(':') {
                Some((a, b)) => user_part_ok(a) && user_part_ok(b),
                None => user_part_ok(u),
            };
        if !ok {
            return Err(bad(
                "user",
                "must be a user name or uid, optionally followed by ':' and a group name or gid \
                 (letters, digits, '_', '.', '-'; not starting with '.' or '-'), at most 256 characters",
            ));
        }
    }
    let restart = match ov.restart {
        None => None,
        Some(p) => Some(match (p.policy, p.max_retries) {
            (RestartPolicyKind::OnFailure, None) => RestartPolicy {
                max_retries: Some(DEFAULT_MAX_RETRIES),
                ..p
            },
            (RestartPolicyKind::OnFailure, Some(n)) if n > MAX_RETRIES_MAX => {
                return Err(bad(
                    "restart",
                    format!("max_retries must be between 0 and {MAX_RETRIES_MAX}, got {n}"),
                ))
            }
            // A count with another policy is a conflict (`conflict`).
            _ => p,
        }),
    };
    Ok(ProcessOverrides { restart, ..ov })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(req: CreateMachineRequest) -> MachineSpec {
        validate_create(req, VmmKind::Stub).unwrap().1
    }

    fn err(req: CreateMachineRequest) -> String {
        validate_create(req, VmmKind::Stub).unwrap_err().field
    }

    #[test]
    fn defaults_fill_in() {
        let s = ok(CreateMachineRequest::default());
        assert_eq!(
            (s.vcpu_count, s.mem_size_mib, s.vmm),
            (1, 256, VmmKind::Stub)
        );
    }

    #[test]
    fn names_are_dns_labels_and_not_ids() {
        for good in ["a", "web-1", "x0"] {
            validate_name(good).unwrap();
        }
        for badname in [
            "",
            "-a",
            "a-",
            "A",
            "1abc",
            "a_b",
            "a.b",
            "mabcdefghjkmnpqr",
            &"a".repeat(64),
        ] {
            assert!(validate_name(badname).is_err(), "{badname}");
        }
    }

    #[test]
    fn bounds_are_enforced() {
        let base = CreateMachineRequest::default;
        assert_eq!(
            err(CreateMachineRequest {
                vcpu_count: Some(0),
                ..base()
            }),
            "vcpu_count"
        );
        assert_eq!(
            err(CreateMachineRequest {
                vcpu_count: Some(33),
                ..base()
            }),
            "vcpu_count"
        );
        assert_eq!(
            err(CreateMachineRequest {
                mem_size_mib: Some(64),
                ..base()
            }),
            "mem_size_mib"
        );
        assert_eq!(
            err(CreateMachineRequest {
                mem_size_mib: Some(u32::MAX),
                ..base()
            }),
            "mem_size_mib"
        );
        assert_eq!(
            err(CreateMachineRequest {
                exposed_ports: vec![0],
                ..base()
            }),
            "exposed_ports"
        );
        assert_eq!(
            err(CreateMachineRequest {
                exposed_ports: vec![70000],
                ..base()
            }),
            "exposed_ports"
        );
        assert_eq!(
            err(CreateMachineRequest {
                exposed_ports: vec![80, 80],
                ..base()
            }),
            "exposed_ports"
        );
        // Lengths count characters, as the schema's maxLength does.
        let wide = "\u{e9}".repeat(LIMITS.metadata_value_max_len);
        let metadata = std::collections::BTreeMap::from([("k".to_string(), wide.clone())]);
        ok(CreateMachineRequest { metadata, ..base() });
        let metadata = std::collections::BTreeMap::from([("k".to_string(), format!("{wide}x"))]);
        assert_eq!(err(CreateMachineRequest { metadata, ..base() }), "metadata");
        let mut env = std::collections::BTreeMap::new();
        env.insert("1BAD".to_string(), "x".to_string());
        assert_eq!(err(CreateMachineRequest { env, ..base() }), "env");
        assert_eq!(
            err(CreateMachineRequest {
                idle_timeout_seconds: Some(u64::MAX),
                ..base()
            }),
            "idle_timeout_seconds"
        );
    }

    #[test]
    fn process_overrides_are_bounded_and_the_policy_normalised() {
        use hyperfleet_api::{RestartPolicy as P, RestartPolicyKind as K};
        let take = |r: CreateMachineRequest| take_process_overrides(&mut r.clone());
        let none = take(CreateMachineRequest::default()).unwrap();
        assert!(none.given().is_empty());
        let ov = take(CreateMachineRequest {
            entrypoint: Some(vec!["sh".into(), "-c".into()]),
            cmd: Some(vec![]),
            workdir: Some("/srv".into()),
            user: Some("app:1000".into()),
            restart: Some(P {
                policy: K::OnFailure,
                max_retries: None,
            }),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            ov.given(),
            ["entrypoint", "cmd", "workdir", "user", "restart"]
        );
        assert_eq!(ov.restart.unwrap().max_retries, Some(DEFAULT_MAX_RETRIES));
        let field = |r: CreateMachineRequest| take(r).unwrap_err().field;
        let base = CreateMachineRequest::default;
        assert_eq!(
            field(CreateMachineRequest {
                cmd: Some(vec!["a\0b".into()]),
                ..base()
            }),
            "cmd"
        );
        assert_eq!(
            field(CreateMachineRequest {
                entrypoint: Some(vec!["x".into(); PROCESS_ARGV_MAX + 1]),
                ..base()
            }),
            "entrypoint"
        );
        for w in ["srv", "", "/a\0"] {
            assert_eq!(
                field(CreateMachineRequest {
                    workdir: Some(w.into()),
                    ..base()
                }),
                "workdir"
            );
        }
        for u in ["", ":", "a:", "-x", "a b", "a:b:c"] {
            assert_eq!(
                field(CreateMachineRequest {
                    user: Some(u.into()),
                    ..base()
                }),
                "user",
                "{u:?}"
            );
        }
        assert_eq!(
            field(CreateMachineRequest {
                restart: Some(P {
                    policy: K::OnFailure,
                    max_retries: Some(MAX_RETRIES_MAX + 1),
                }),
                ..base()
            }),
            "restart"
        );
        // Valid each on its own, conflicting together.
        let ov = take(CreateMachineRequest {
            restart: Some(P {
                policy: K::Always,
                max_retries: Some(1),
            }),
            ..base()
        })
        .unwrap();
        assert!(ov.conflict(true).unwrap().contains("max_retries"));
        assert!(ov.conflict(false).unwrap().contains("need image"));
        assert_eq!(none.conflict(false), None);
    }
}

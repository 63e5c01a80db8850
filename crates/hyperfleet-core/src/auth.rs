//! API keys: generation, hashing, scopes and the bootstrap admin key.
//!
//! Keys are 256 random bits, shown once, stored only as a SHA-256 hash.
//! A fast hash is right here (unlike passwords): the secret has full
//! entropy, so there is nothing to brute-force.

use std::path::{Path, PathBuf};

use hyperfleet_api::{Scope, API_KEY_PREFIX};
use sha2::{Digest, Sha256};

use crate::store::{KeyRecord, Store, StoreError};
use crate::util::{now_ms, random_bytes, random_id};

/// The tenant of keys made at bootstrap and of requests when auth is off.
pub const DEFAULT_TENANT: &str = "default";

pub fn hash_key(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new secret and its stored record.
pub fn new_key(
    name: &str,
    tenant: &str,
    scopes: Vec<Scope>,
    expires_at: Option<i64>,
) -> (String, KeyRecord) {
    let secret = format!("{API_KEY_PREFIX}{}", hex::encode(random_bytes::<32>()));
    let rec = KeyRecord {
        id: random_id("key_", 12),
        name: name.to_string(),
        tenant: tenant.to_string(),
        hash: hash_key(&secret),
        prefix: secret[..API_KEY_PREFIX.len() + 8].to_string(),
        scopes,
        created_at: now_ms(),
        expires_at,
        revoked_at: None,
    };
    (secret, rec)
}

/// Who is calling, once a key checked out.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: String,
    pub tenant: String,
    pub scopes: Vec<Scope>,
}

impl Principal {
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }

    /// Used when the server runs with `--disable-auth`.
    pub fn anonymous_admin() -> Self {
        Principal {
            key_id: "auth-disabled".into(),
            tenant: DEFAULT_TENANT.into(),
            scopes: vec![Scope::Admin],
        }
    }
}

/// Why a bearer token was refused. The API answers all of them with 401;
/// the distinction goes to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Malformed,
    Unknown,
    Revoked,
    Expired,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Missing => "missing API key: send 'Authorization: Bearer hf_…'",
            Refusal::Malformed => "malformed Authorization header: expected 'Bearer hf_…'",
            Refusal::Unknown => "unknown API key",
            Refusal::Revoked => "this API key has been revoked",
            Refusal::Expired => "this API key has expired",
        }
    }
}

/// The WebSocket subprotocol the exec WebSocket answers with when a browser
/// authenticated through [`WS_BEARER_PREFIX`] (browsers cannot set headers
/// on a WebSocket; docs/security.md "The exec WebSocket from a browser").
pub const WS_PROTOCOL: &str = "hyperfleet.exec.v1";
/// A `Sec-WebSocket-Protocol` entry `hyperfleet.bearer.<key>` carries the
/// API key on a WebSocket upgrade that has no `Authorization` header. The
/// server never echoes it (it answers [`WS_PROTOCOL`]).
pub const WS_BEARER_PREFIX: &str = "hyperfleet.bearer.";

/// The API key offered as a `hyperfleet.bearer.<key>` subprotocol in the
/// `Sec-WebSocket-Protocol` header values, if any (the first one).
pub fn ws_protocol_key<'a>(values: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    values
        .flat_map(|v| v.split(','))
        .map(|p| p.trim_matches([' ', '\t']))
        .find_map(|p| p.strip_prefix(WS_BEARER_PREFIX))
        .filter(|k| !k.is_empty())
}

/// The token of a `Bearer` credential: the scheme in any letter case,
/// then one or more spaces or tabs (RFC 9110 §11.4 allows either), then the
/// token. The API and the proxy read keys with this one function, so a
/// spelling the proxy does not strip is never one the API would accept.
pub fn bearer_token(value: &str) -> Option<&str> {
    let v = value.trim_matches([' ', '\t']);
    if !v.get(..6)?.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let rest = &v[6..];
    let token = rest.trim_start_matches([' ', '\t']);
    (token.len() < rest.len() && !token.is_empty()).then_some(token)
}

/// Checks an `Authorization` header value against the store.
pub fn authenticate(store: &Store, header: Option<&str>) -> Result<Principal, Refusal> {
    let header = header.ok_or(Refusal::Missing)?;
    let token = bearer_token(header).ok_or(Refusal::Malformed)?;
    if !token.starts_with(API_KEY_PREFIX) || token.len() > 256 {
        return Err(Refusal::Malformed);
    }
    let key = store
        .key_by_hash(&hash_key(token))
        .ok_or(Refusal::Unknown)?;
    if key.revoked_at.is_some() {
        return Err(Refusal::Revoked);
    }
    if key.expires_at.is_some_and(|t| t <= now_ms()) {
        return Err(Refusal::Expired);
    }
    Ok(Principal {
        key_id: key.id,
        tenant: key.tenant,
        scopes: key.scopes,
    })
}

/// Errors while bootstrapping the first admin key.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the admin key file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// On a database with no keys at all, creates an admin key and writes it to
/// `<data_dir>/admin.key` (mode 0600), so a new user is never locked out.
/// Returns the file's path when a key was made.
pub async fn bootstrap_admin_key(
    store: &Store,
    data_dir: &Path,
) -> Result<Option<PathBuf>, BootstrapError> {
    if store.key_count() > 0 {
        return Ok(None);
    }
    let (secret, rec) = new_key("bootstrap-admin", DEFAULT_TENANT, vec![Scope::Admin], None);
    let path = data_dir.join("admin.key");
    write_secret_file(&path, &format!("{secret}\n")).map_err(|source| BootstrapError::Write {
        path: path.clone(),
        source,
    })?;
    // File first, then the record: a crash in between leaves an unused file
    // that the next start overwrites, never a key nobody can read.
    store.write(move |ctx| ctx.insert_key(rec)).await?;
    Ok(Some(path))
}

fn write_secret_file(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_read_from_the_bearer_subprotocol_only() {
        let key = |v: &[&'static str]| ws_protocol_key(v.iter().copied());
        assert_eq!(
            key(&["hyperfleet.exec.v1, hyperfleet.bearer.hf_abc"]),
            Some("hf_abc")
        );
        assert_eq!(
            key(&["hyperfleet.exec.v1", "hyperfleet.bearer.hf_x ,other"]),
            Some("hf_x")
        );
        assert_eq!(key(&["hyperfleet.exec.v1"]), None);
        assert_eq!(key(&["hyperfleet.bearer."]), None);
        assert_eq!(key(&["chat, xhyperfleet.bearer.hf_abc"]), None);
        assert_eq!(key(&[]), None);
    }

    #[test]
    fn keys_are_long_prefixed_and_hashed() {
        let (secret, rec) = new_key("t", "default", vec![Scope::Read], None);
        assert!(secret.starts_with("hf_"));
        assert_eq!(secret.len(), 3 + 64);
        assert_eq!(rec.hash, hash_key(&secret));
        assert_ne!(rec.hash, secret);
        assert!(secret.starts_with(&rec.prefix));
    }

    #[test]
    fn bearer_tokens_are_read_in_every_spelling_the_rfc_allows() {
        for v in [
            "Bearer hf_x",
            "bearer hf_x",
            "BEARER hf_x",
            "Bearer\thf_x",
            "Bearer \t  hf_x ",
            " Bearer hf_x",
        ] {
            assert_eq!(bearer_token(v), Some("hf_x"), "{v:?}");
        }
        for v in [
            "Bearerhf_x",
            "Bearer",
            "Bearer  ",
            "Basic hf_x",
            "hf_x",
            "Beaé hf_x",
            "",
        ] {
            assert_eq!(bearer_token(v), None, "{v:?}");
        }
    }

    #[test]
    fn admin_implies_every_scope() {
        let p = Principal::anonymous_admin();
        for s in Scope::ALL {
            assert!(p.has(s));
        }
        let r = Principal {
            key_id: "k".into(),
            tenant: "t".into(),
            scopes: vec![Scope::Read],
        };
        assert!(r.has(Scope::Read) && !r.has(Scope::Write));
    }
}

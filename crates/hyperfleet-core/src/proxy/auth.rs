//! Who may pass the proxy to a machine, and which machine a name means.
//!
//! Any one of these lets a request through (docs/networking.md):
//! - the machine was created with `"public": true` (or the daemon runs
//!   with `--disable-auth`);
//! - `Authorization: Bearer hf_…`: an API key of the machine's tenant with
//!   the `exec` scope (admin implies it);
//! - the machine's access token, as `?hf_token=` or, in the host form only,
//!   the `hf_token` cookie.
//!
//! The path form (`/proxy/<machine>/…`) serves every machine from the
//! proxy's one origin, so a page of one machine could make the browser send
//! a cookie meant for another: there the cookie is never read (see
//! `Credentials::new`), and only what a caller adds to each request counts.
//!
//! A caller learns that a machine exists only when it may reach it: a key of
//! another tenant gets the 404 of an absent machine, and a caller without
//! credentials gets the same 401 for a private machine as for none at all.

use std::sync::Arc;

use axum::http::header::{AUTHORIZATION, COOKIE};
use axum::http::HeaderMap;
use hyperfleet_api::{ErrorCode, Scope, API_KEY_PREFIX};

use super::ProxyError;
use crate::auth::{authenticate, bearer_token, Principal, Refusal};
use crate::store::{CachedMachine, Store, StoreError};
use crate::util::looks_like_machine_id;

/// The cookie that carries a machine's access token.
pub(crate) const TOKEN_COOKIE: &str = "hf_token";

/// What a request presented.
pub(crate) struct Credentials<'a> {
    /// The `Authorization` value when it carries a Hyperfleet API key.
    /// Other `Authorization` headers belong to the guest's application.
    pub key: Option<&'a str>,
    /// `?hf_token=`.
    pub query_token: Option<&'a str>,
    /// The `hf_token` cookie counts (the host form) or not (the path form).
    cookies: bool,
    headers: &'a HeaderMap,
}

impl<'a> Credentials<'a> {
    /// `cookies`: whether the `hf_token` cookie may grant access — only on
    /// a machine's own host name, the one origin a browser keeps apart
    /// from every other machine's.
    pub(crate) fn new(headers: &'a HeaderMap, query_token: Option<&'a str>, cookies: bool) -> Self {
        // In any of several `Authorization` headers, or in a comma-joined
        // one: the first Hyperfleet key is the one checked.
        let key = headers
            .get_all(AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find(|v| is_hyperfleet_key(v));
        Credentials {
            key,
            query_token,
            cookies,
            headers,
        }
    }

    /// Every `hf_token` cookie value (a browser may hold several); none
    /// where cookies do not count.
    fn cookie_tokens(&self) -> impl Iterator<Item = &'a str> {
        let counts = self.cookies;
        cookie_values(self.headers, TOKEN_COOKIE).filter(move |_| counts)
    }

    fn any(&self) -> bool {
        self.key.is_some() || self.query_token.is_some() || self.cookie_tokens().next().is_some()
    }
}

/// `Bearer hf_…` (any case, spaces or tabs): a Hyperfleet key, which the
/// proxy checks and strips.
pub(crate) fn is_hyperfleet_key(authorization: &str) -> bool {
    bearer_token(authorization).is_some_and(|t| t.starts_with(API_KEY_PREFIX))
}

/// The values of cookie `name` in every `Cookie` header. Whitespace around
/// names and values (`hf_token = x`) and quotes around a value are
/// tolerated, as browsers and frameworks do.
pub(crate) fn cookie_values<'a>(
    headers: &'a HeaderMap,
    name: &'a str,
) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (k, v) = pair.split_once('=')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"'))
        })
}

/// How the request got through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    /// A public machine, or auth is off.
    Public,
    ApiKey,
    /// The token came as `?hf_token=`: the answer sets the cookie, so a
    /// browser keeps access without the parameter.
    QueryToken,
    Cookie,
}

/// Resolves `machine` (id or name, as addressed) and decides whether the
/// request may reach it.
pub(crate) fn authorize(
    store: &Store,
    machine: &str,
    creds: &Credentials<'_>,
    auth_disabled: bool,
) -> Result<(Arc<CachedMachine>, Grant), ProxyError> {
    // A refused key does not end the request: a token may still grant it,
    // and a public machine needs nothing.
    let (principal, refusal) = match creds.key {
        Some(k) => match authenticate(store, Some(k)) {
            Ok(p) => (Some(p), None),
            Err(r) => (None, Some(r)),
        },
        None => (None, None),
    };
    let m = match lookup(store, machine, principal.as_ref(), creds)? {
        Found::One(m) => m,
        Found::Ambiguous => {
            return Err(ProxyError::new(
                ErrorCode::NotFound,
                format!(
                    "more than one tenant has a machine named '{machine}': address it by its id"
                ),
            ))
        }
        Found::None if principal.is_some() => return Err(ProxyError::no_machine(machine)),
        Found::None => return Err(unauthorized(machine, creds, refusal)),
    };
    if m.rec.spec.public || auth_disabled {
        return Ok((m, Grant::Public));
    }
    let own_key = principal.as_ref().filter(|p| p.tenant == m.rec.tenant);
    if own_key.is_some_and(|p| p.has(Scope::Exec)) {
        return Ok((m, Grant::ApiKey));
    }
    if creds.query_token.is_some_and(|t| token_matches(&m, t)) {
        return Ok((m, Grant::QueryToken));
    }
    if creds.cookie_tokens().any(|t| token_matches(&m, t)) {
        return Ok((m, Grant::Cookie));
    }
    if let Some(p) = own_key {
        return Err(missing_scope(p));
    }
    if principal.is_some() {
        // Another tenant's machine: the same answer as for no machine.
        return Err(ProxyError::no_machine(machine));
    }
    Err(unauthorized(machine, creds, refusal))
}

enum Found {
    One(Arc<CachedMachine>),
    None,
    Ambiguous,
}

/// Ids are global. Names are unique per tenant: the key's tenant first,
/// then a name only one tenant uses (or whose access token was sent).
fn lookup(
    store: &Store,
    machine: &str,
    principal: Option<&Principal>,
    creds: &Credentials<'_>,
) -> Result<Found, StoreError> {
    if let Some(p) = principal {
        if let Some(m) = store.get(Some(&p.tenant), machine)? {
            return Ok(Found::One(m));
        }
    }
    if let Some(m) = store.get_by_id(machine)? {
        return Ok(Found::One(m));
    }
    if looks_like_machine_id(machine) {
        // Names never have an id's shape.
        return Ok(Found::None);
    }
    let mut named = store.find_by_name_in_all_tenants(machine)?;
    if named.len() <= 1 {
        return Ok(named.pop().map_or(Found::None, Found::One));
    }
    let mut tokened = named.into_iter().filter(|m| {
        creds.query_token.is_some_and(|t| token_matches(m, t))
            || creds.cookie_tokens().any(|t| token_matches(m, t))
    });
    Ok(match (tokened.next(), tokened.next()) {
        (Some(m), None) => Found::One(m),
        _ => Found::Ambiguous,
    })
}

fn token_matches(m: &CachedMachine, given: &str) -> bool {
    m.rec
        .spec
        .access_token
        .as_deref()
        .is_some_and(|t| constant_time_eq(t.as_bytes(), given.as_bytes()))
}

/// Compares without an early exit, so the time taken does not tell how
/// much of a guessed token was right. Lengths are not secret (every token
/// has the same length).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box: keeps the optimiser from turning the fold into a compare
    // that stops at the first difference.
    std::hint::black_box(diff) == 0
}

fn missing_scope(p: &Principal) -> ProxyError {
    let has: Vec<&str> = p.scopes.iter().map(|s| s.as_str()).collect();
    ProxyError::new(
        ErrorCode::Forbidden,
        format!(
            "this API key lacks the 'exec' scope needed to reach machines through the proxy (it has: {})",
            has.join(", ")
        ),
    )
}

fn unauthorized(machine: &str, creds: &Credentials<'_>, refusal: Option<Refusal>) -> ProxyError {
    let why = match refusal {
        Some(r) => format!("{}; ", r.message()),
        None if creds.any() => {
            format!("the access token does not grant access to machine '{machine}'; ")
        }
        None => String::new(),
    };
    ProxyError::new(
        ErrorCode::Unauthorized,
        format!(
            "{why}machine '{machine}' is not public (or does not exist): send an API key with the \
             'exec' scope ('Authorization: Bearer hf_…') or the machine's access token \
             ('?hf_token=…', or the 'hf_token' cookie on the machine's host name \
             http://<port>-<machine>.<proxy domain>/, never on /proxy/…)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn only_bearer_hf_keys_are_hyperfleet_keys() {
        assert!(is_hyperfleet_key("Bearer hf_abc"));
        assert!(is_hyperfleet_key("bearer  hf_abc"));
        assert!(is_hyperfleet_key("Bearer\thf_abc"));
        assert!(is_hyperfleet_key("BEARER hf_abc"));
        assert!(!is_hyperfleet_key("Bearer eyJhbGciOi"));
        assert!(!is_hyperfleet_key("Basic aGZfOng="));
        assert!(!is_hyperfleet_key("hf_abc"));
        assert!(!is_hyperfleet_key("Bearé"));
    }

    #[test]
    fn cookie_values_are_found_in_every_cookie_header() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1; hf_token=x ;b=2"));
        h.append(COOKIE, HeaderValue::from_static("hf_token=y"));
        h.append(COOKIE, HeaderValue::from_static("xhf_token=z; hf_token"));
        h.append(COOKIE, HeaderValue::from_static("c=3;\thf_token = \"w\" "));
        let v: Vec<&str> = cookie_values(&h, TOKEN_COOKIE).collect();
        assert_eq!(v, ["x", "y", "w"]);
    }

    #[test]
    fn the_token_cookie_counts_only_where_cookies_do() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("hf_token=hft_x"));
        let host_form = Credentials::new(&h, None, true);
        assert_eq!(host_form.cookie_tokens().collect::<Vec<_>>(), ["hft_x"]);
        assert!(host_form.any());
        let path_form = Credentials::new(&h, None, false);
        assert_eq!(path_form.cookie_tokens().next(), None);
        assert!(!path_form.any(), "an ignored cookie is no credential");
    }

    #[test]
    fn the_key_is_found_in_any_authorization_header() {
        let mut h = HeaderMap::new();
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer app-token"));
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer\thf_abc"));
        assert_eq!(Credentials::new(&h, None, true).key, Some("Bearer\thf_abc"));
        let mut h = HeaderMap::new();
        h.append(
            AUTHORIZATION,
            HeaderValue::from_static("Basic eA==, bearer hf_abc"),
        );
        assert!(Credentials::new(&h, None, true).key.is_some());
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"hft_abc", b"hft_abc"));
        assert!(!constant_time_eq(b"hft_abc", b"hft_abd"));
        assert!(!constant_time_eq(b"hft_abc", b"hft_ab"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}

//! Header rewriting between client and guest: hop-by-hop headers stay on
//! their hop, the guest learns who asked (`X-Forwarded-*`), and Hyperfleet
//! credentials never reach it.

use std::net::IpAddr;

use axum::http::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, COOKIE, HOST, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use axum::http::HeaderMap;

use super::auth::{is_hyperfleet_key, TOKEN_COOKIE};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// RFC 9110 §7.6.1: meaningful for one connection only. `Upgrade` is
/// handled apart (it passes when both sides switch protocols).
const HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
];

/// `Connection: upgrade` with an `Upgrade` header: a protocol switch
/// (WebSocket and friends) the proxy carries through.
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Drops the hop-by-hop headers, including those `Connection` names. With
/// `upgrade`, keeps `Upgrade` and says `Connection: upgrade` again.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Named headers first, while `Connection` is still there to read; only
    // unusual ones (not keep-alive, close or upgrade) cost an allocation.
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter(|t| {
            !["keep-alive", "close", "upgrade"]
                .iter()
                .any(|k| t.eq_ignore_ascii_case(k))
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

/// What the guest learns about the original request.
pub(crate) struct Forwarded<'a> {
    pub client_ip: IpAddr,
    /// `X-Forwarded-Proto`: the scheme clients use (the proxy URLs').
    pub proto: &'a HeaderValue,
    /// `X-Forwarded-Prefix` in the path form (`/proxy/<machine>`).
    pub prefix: Option<&'a str>,
}

/// Rewrites a request's headers for the guest: hop-by-hop headers out,
/// Hyperfleet credentials out, `X-Forwarded-*` in. `Host` stays as sent.
pub(crate) fn prepare_request(headers: &mut HeaderMap, upgrade: bool, fwd: &Forwarded<'_>) {
    strip_hop_by_hop(headers, upgrade);
    strip_hyperfleet_keys(headers);
    strip_token_cookie(headers);

    // Append to a chain from proxies before this one (RFC 7239 style).
    let ip = fwd.client_ip.to_string();
    let mut chain: Option<String> = None;
    for v in headers.get_all(&X_FORWARDED_FOR).iter() {
        if let Ok(v) = v.to_str() {
            let c = chain.get_or_insert_with(String::new);
            c.push_str(v);
            c.push_str(", ");
        }
    }
    let xff = match chain {
        Some(mut c) => {
            c.push_str(&ip);
            c
        }
        None => ip,
    };
    if let Ok(v) = HeaderValue::try_from(xff) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, fwd.proto.clone());
    match headers.get(HOST).cloned() {
        Some(host) => headers.insert(X_FORWARDED_HOST, host),
        None => headers.remove(X_FORWARDED_HOST),
    };
    match fwd.prefix.and_then(|p| HeaderValue::from_str(p).ok()) {
        Some(p) => headers.insert(X_FORWARDED_PREFIX, p),
        None => headers.remove(X_FORWARDED_PREFIX),
    };
}

/// Whether an `Authorization` value carries a Hyperfleet key anywhere:
/// alone or in a comma-joined list, in any spelling `bearer_token` reads,
/// also next to bytes that are not UTF-8.
fn carries_key(v: &HeaderValue) -> bool {
    String::from_utf8_lossy(v.as_bytes())
        .split(',')
        .any(is_hyperfleet_key)
}

/// Removes every `Authorization` value that carries a Hyperfleet key — a
/// client may send several — and keeps the application's own.
fn strip_hyperfleet_keys(headers: &mut HeaderMap) {
    if !headers.get_all(AUTHORIZATION).iter().any(carries_key) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(AUTHORIZATION)
        .iter()
        .filter(|v| !carries_key(v))
        .cloned()
        .collect();
    headers.remove(AUTHORIZATION);
    for v in kept {
        headers.append(AUTHORIZATION, v);
    }
}

/// Whether one `name=value` pair of a `Cookie` header is the token cookie,
/// whatever whitespace surrounds the name. Works on bytes: a header that is
/// not UTF-8 must not hide the token from this check.
fn is_token_pair(pair: &[u8]) -> bool {
    let name = pair.split(|b| *b == b'=').next().unwrap_or_default();
    name.trim_ascii() == TOKEN_COOKIE.as_bytes()
}

/// Removes `hf_token` from every `Cookie` header, keeping every other
/// cookie; drops a `Cookie` header left empty.
fn strip_token_cookie(headers: &mut HeaderMap) {
    let pairs = |v: &HeaderValue| -> Vec<Vec<u8>> {
        v.as_bytes()
            .split(|b| *b == b';')
            .map(|p| p.trim_ascii().to_vec())
            .collect()
    };
    let has_token = headers
        .get_all(COOKIE)
        .iter()
        .any(|v| pairs(v).iter().any(|p| is_token_pair(p)));
    if !has_token {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| {
            let rest: Vec<Vec<u8>> = pairs(v)
                .into_iter()
                .filter(|p| !p.is_empty() && !is_token_pair(p))
                .collect();
            if rest.is_empty() {
                return None;
            }
            HeaderValue::from_bytes(&rest.join(&b"; "[..])).ok()
        })
        .collect();
    headers.remove(COOKIE);
    for v in kept {
        headers.append(COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn upgrades_keep_upgrade_and_say_connection_upgrade() {
        let mut h = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert!(!is_upgrade(&map(&[("upgrade", "websocket")])));
        assert!(!is_upgrade(&map(&[("connection", "upgrade")])));
    }

    #[test]
    fn requests_lose_hyperfleet_credentials_and_gain_forwarded_headers() {
        let proto = HeaderValue::from_static("https");
        let fwd = Forwarded {
            client_ip: "10.1.2.3".parse().unwrap(),
            proto: &proto,
            prefix: Some("/proxy/web"),
        };
        let mut h = map(&[
            ("host", "8080-web.localhost:4000"),
            ("authorization", "Bearer hf_secret"),
            ("cookie", "a=1; hf_token=hft_x"),
            ("cookie", "hf_token=hft_y"),
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-host", "spoofed"),
        ]);
        prepare_request(&mut h, false, &fwd);
        assert!(h.get("authorization").is_none());
        let cookies: Vec<&str> = h
            .get_all("cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(cookies, ["a=1"]);
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "8080-web.localhost:4000");
        assert_eq!(h["x-forwarded-prefix"], "/proxy/web");
        assert_eq!(h["host"], "8080-web.localhost:4000");

        // Repeated, tab-separated, upper-case, comma-joined and non-UTF-8
        // spellings of the key, and a token cookie with odd spacing: every
        // copy goes, the application's own credentials stay.
        let mut h = map(&[
            ("authorization", "Bearer app-token"),
            ("authorization", "Bearer\thf_secret"),
            ("authorization", "BEARER   hf_secret"),
            ("authorization", "Basic eA==, Bearer hf_secret"),
            ("cookie", "a=1;\thf_token = hft_x ; b=2"),
            ("cookie", " hf_token=\"hft_y\""),
        ]);
        h.append(
            "authorization",
            HeaderValue::from_bytes(b"Bearer hf_secret \xff").unwrap(),
        );
        h.append(
            "cookie",
            HeaderValue::from_bytes(b"c=\xff; hf_token=hft_z").unwrap(),
        );
        prepare_request(&mut h, false, &fwd);
        let auth: Vec<&[u8]> = h
            .get_all("authorization")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        assert_eq!(auth, [&b"Bearer app-token"[..]]);
        let cookies: Vec<&[u8]> = h.get_all("cookie").iter().map(|v| v.as_bytes()).collect();
        assert_eq!(cookies, [&b"a=1; b=2"[..], &b"c=\xff"[..]]);

        // The application's own credentials pass untouched.
        let mut h = map(&[
            ("authorization", "Bearer app-token"),
            ("cookie", "session=abc"),
        ]);
        let fwd = Forwarded {
            prefix: None,
            ..fwd
        };
        prepare_request(&mut h, false, &fwd);
        assert_eq!(h["authorization"], "Bearer app-token");
        assert_eq!(h["cookie"], "session=abc");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert!(h.get("x-forwarded-prefix").is_none());
    }
}

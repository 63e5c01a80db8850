//! Header rewriting between client and guest: hop-by-hop headers stay on
//! their hop, the guest learns who asked (`X-Forwarded-*`), Hyperfleet
//! credentials never reach it, and cookies stay within one machine's origin.
//!
//! Cookies: a browser keeps a machine's host name (`<port>-<machine>.<domain>`)
//! apart from every other machine's, but not the path form's one origin,
//! nor cookies whose `Domain` names a parent of the host (`localhost`, the
//! proxy domain), which reach every machine. So the path form carries no
//! cookies either way and its answers are sandboxed, and on the host form a
//! guest may set only host-only cookies that are not the proxy's own.

use std::net::IpAddr;

use axum::http::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_SECURITY_POLICY, COOKIE, HOST,
    PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL, SET_COOKIE, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use axum::http::HeaderMap;

use super::auth::{is_hyperfleet_key, TOKEN_COOKIE};
use super::route::Form;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const SEC_FETCH_MODE: HeaderName = HeaderName::from_static("sec-fetch-mode");
const SEC_FETCH_DEST: HeaderName = HeaderName::from_static("sec-fetch-dest");

/// `Sec-Fetch-Dest` values whose answer a browser runs as a page or a
/// worker of the URL's own origin (Fetch: navigation and non-subresource
/// requests). Scripts, images and the like run in the including page's
/// origin instead, and `fetch()` is `empty`.
const PAGE_DESTINATIONS: [&str; 8] = [
    "document",
    "iframe",
    "frame",
    "embed",
    "object",
    "worker",
    "sharedworker",
    "serviceworker",
];

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

/// Whether a browser asks for a page (or a frame, or a worker) to run in
/// the URL's origin, by the `Sec-Fetch-*` headers every current browser
/// sends. API clients send neither.
pub(crate) fn is_browser_page_request(headers: &HeaderMap) -> bool {
    let values = |name| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
    };
    values(SEC_FETCH_MODE).any(|m| m.eq_ignore_ascii_case("navigate"))
        || values(SEC_FETCH_DEST).any(|d| {
            PAGE_DESTINATIONS
                .iter()
                .any(|page| d.eq_ignore_ascii_case(page))
        })
}

/// What the guest learns about the original request.
pub(crate) struct Forwarded<'a> {
    pub client_ip: IpAddr,
    /// `X-Forwarded-Proto`: the scheme clients use (the proxy URLs').
    pub proto: &'a HeaderValue,
    /// `X-Forwarded-Prefix` in the path form (`/proxy/<machine>`); None in
    /// the host form.
    pub prefix: Option<&'a str>,
}

/// Rewrites a request's headers for the guest: hop-by-hop headers out,
/// Hyperfleet credentials out, `X-Forwarded-*` in. `Host` stays as sent.
/// The path form passes no cookies at all: its guests set none (see
/// `prepare_response`), so any cookie there belongs to someone else on the
/// same host name (cookies ignore ports).
pub(crate) fn prepare_request(headers: &mut HeaderMap, upgrade: bool, fwd: &Forwarded<'_>) {
    strip_hop_by_hop(headers, upgrade);
    strip_hyperfleet_keys(headers);
    if fwd.prefix.is_some() {
        headers.remove(COOKIE);
    } else {
        strip_token_cookie(headers);
    }

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

/// Rewrites a guest's response headers for the client: hop-by-hop headers
/// out (`switched`: keeps the upgrade), and cookies kept to the machine's
/// own origin. The path form drops every `Set-Cookie` and adds
/// `Content-Security-Policy: sandbox`, so a browser that renders an answer
/// anyway runs it in an origin of its own, with no script; the host form
/// drops the cookies `is_host_only_guest_cookie` refuses. Returns how many
/// cookies were dropped.
pub(crate) fn prepare_response(headers: &mut HeaderMap, switched: bool, form: Form<'_>) -> usize {
    strip_hop_by_hop(headers, switched);
    let before = headers.get_all(SET_COOKIE).iter().count();
    match form {
        Form::Path { .. } => {
            headers.remove(SET_COOKIE);
            headers.append(CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox"));
        }
        Form::Host => retain_values(headers, SET_COOKIE, is_host_only_guest_cookie),
    }
    before - headers.get_all(SET_COOKIE).iter().count()
}

/// Whether a guest's `Set-Cookie` may reach the browser on the machine's
/// host name. Not with a `Domain` attribute, whatever its value: it makes
/// the cookie reach every host under that domain (with `localhost` or the
/// proxy domain, every machine), and even the machine's own host name as
/// `Domain` reaches its subdomains. Not named like the proxy's own token
/// cookie (any letter case), which a guest must not overwrite or fix.
/// On bytes: a value that is not UTF-8 must not slip a `Domain` through.
fn is_host_only_guest_cookie(v: &HeaderValue) -> bool {
    let name = |part: &[u8]| -> Vec<u8> {
        let name = part.split(|b| *b == b'=').next().unwrap_or_default();
        name.trim_ascii().to_ascii_lowercase()
    };
    let mut parts = v.as_bytes().split(|b| *b == b';');
    let cookie = parts.next().unwrap_or_default();
    name(cookie) != TOKEN_COOKIE.as_bytes() && !parts.any(|attr| name(attr) == b"domain")
}

/// Keeps only the values of header `name` that `keep` accepts, in order.
fn retain_values(headers: &mut HeaderMap, name: HeaderName, keep: fn(&HeaderValue) -> bool) {
    if headers.get_all(&name).iter().all(keep) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(&name)
        .iter()
        .filter(|v| keep(v))
        .cloned()
        .collect();
    headers.remove(&name);
    for v in kept {
        headers.append(&name, v);
    }
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
    retain_values(headers, AUTHORIZATION, |v| !carries_key(v));
    strip_key_subprotocols(headers);
}

/// Removes the `hyperfleet.bearer.<key>` entries (the API's browser form of
/// a key on a WebSocket, docs/security.md) from every
/// `Sec-WebSocket-Protocol` value, keeping the application's own
/// subprotocols in order; drops a value left empty. The proxy does not take
/// a key in that form, but a client that sends one anyway must not hand it
/// to the guest.
fn strip_key_subprotocols(headers: &mut HeaderMap) {
    let is_key = |p: &str| {
        p.trim_matches([' ', '\t'])
            .get(..crate::auth::WS_BEARER_PREFIX.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(crate::auth::WS_BEARER_PREFIX))
    };
    let values: Vec<HeaderValue> = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .cloned()
        .collect();
    if !values
        .iter()
        .any(|v| String::from_utf8_lossy(v.as_bytes()).split(',').any(is_key))
    {
        return;
    }
    headers.remove(SEC_WEBSOCKET_PROTOCOL);
    for v in values {
        let text = String::from_utf8_lossy(v.as_bytes()).into_owned();
        let kept: Vec<&str> = text
            .split(',')
            .filter(|p| !is_key(p))
            .map(|p| p.trim_matches([' ', '\t']))
            .filter(|p| !p.is_empty())
            .collect();
        if kept.is_empty() {
            continue;
        }
        if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
            headers.append(SEC_WEBSOCKET_PROTOCOL, v);
        }
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
            prefix: None,
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

        // The API's browser form of a key on a WebSocket never reaches the
        // guest; the application's own subprotocols stay, in order.
        let mut h = map(&[
            (
                "sec-websocket-protocol",
                "chat, hyperfleet.bearer.hf_secret, v2",
            ),
            ("sec-websocket-protocol", "HyperFleet.Bearer.hf_secret"),
        ]);
        prepare_request(&mut h, true, &fwd);
        let protos: Vec<&str> = h
            .get_all("sec-websocket-protocol")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(protos, ["chat, v2"]);

        // The application's own credentials pass untouched.
        let mut h = map(&[
            ("authorization", "Bearer app-token"),
            ("cookie", "session=abc"),
        ]);
        prepare_request(&mut h, false, &fwd);
        assert_eq!(h["authorization"], "Bearer app-token");
        assert_eq!(h["cookie"], "session=abc");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert!(h.get("x-forwarded-prefix").is_none());
    }

    #[test]
    fn browser_pages_are_told_apart_from_api_calls_by_sec_fetch() {
        for page in [
            &[
                ("sec-fetch-mode", "navigate"),
                ("sec-fetch-dest", "document"),
            ][..],
            &[("sec-fetch-mode", "navigate"), ("sec-fetch-dest", "iframe")],
            &[("sec-fetch-mode", "Navigate")],
            &[("sec-fetch-dest", "object")],
            &[("sec-fetch-dest", "embed")],
            &[
                ("sec-fetch-mode", "same-origin"),
                ("sec-fetch-dest", "worker"),
            ],
            &[("sec-fetch-dest", "serviceworker")],
        ] {
            assert!(is_browser_page_request(&map(page)), "{page:?}");
        }
        for call in [
            &[][..],
            &[("sec-fetch-mode", "cors"), ("sec-fetch-dest", "empty")],
            &[("sec-fetch-mode", "no-cors"), ("sec-fetch-dest", "image")],
            &[
                ("sec-fetch-mode", "websocket"),
                ("sec-fetch-dest", "websocket"),
            ],
            &[("sec-fetch-dest", "script")],
            &[("accept", "text/html")],
        ] {
            assert!(!is_browser_page_request(&map(call)), "{call:?}");
        }
    }

    fn set_cookies(h: &HeaderMap) -> Vec<&[u8]> {
        h.get_all("set-cookie")
            .iter()
            .map(|v| v.as_bytes())
            .collect()
    }

    /// A guest's answer setting cookies of every kind.
    fn guest_answer() -> HeaderMap {
        let mut h = map(&[
            ("set-cookie", "sid=1; Path=/; HttpOnly"),
            ("set-cookie", "x=1; Domain=localhost"),
            ("set-cookie", "y=2; Path=/; domain=.machines.example.com"),
            ("set-cookie", "z=3;DOMAIN =8080-web.localhost; Secure"),
            ("set-cookie", "hf_token=hft_fixed; Path=/"),
            ("set-cookie", " HF_Token = hft_fixed"),
            ("set-cookie", "theme=dark; Max-Age=60; SameSite=Lax"),
            ("set-cookie", "note=domain; Path=/domain"),
            ("content-type", "text/html"),
        ]);
        h.append(
            "set-cookie",
            HeaderValue::from_bytes(b"bin=\xff; Domain=localhost").unwrap(),
        );
        h
    }

    #[test]
    fn the_host_form_passes_only_host_only_cookies_not_named_like_the_token() {
        let mut h = guest_answer();
        assert_eq!(prepare_response(&mut h, false, Form::Host), 6);
        assert_eq!(
            set_cookies(&h),
            [
                &b"sid=1; Path=/; HttpOnly"[..],
                b"theme=dark; Max-Age=60; SameSite=Lax",
                b"note=domain; Path=/domain",
            ]
        );
        assert!(h.get("content-security-policy").is_none());
        assert_eq!(h["content-type"], "text/html");
        // Nothing to drop: nothing changes.
        let mut h = map(&[("set-cookie", "a=1"), ("set-cookie", "b=2; Path=/")]);
        assert_eq!(prepare_response(&mut h, false, Form::Host), 0);
        assert_eq!(set_cookies(&h), [&b"a=1"[..], b"b=2; Path=/"]);
    }

    #[test]
    fn the_path_form_passes_no_cookies_and_sandboxes_its_answers() {
        let path = Form::Path {
            prefix: "/proxy/web",
        };
        let mut h = guest_answer();
        h.append(
            "content-security-policy",
            HeaderValue::from_static("default-src 'self'"),
        );
        assert_eq!(prepare_response(&mut h, false, path), 9);
        assert!(set_cookies(&h).is_empty());
        let csp: Vec<&str> = h
            .get_all("content-security-policy")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        // Both apply: the guest's own policy cannot loosen the sandbox.
        assert_eq!(csp, ["default-src 'self'", "sandbox"]);

        // And its requests carry no cookies to the guest.
        let proto = HeaderValue::from_static("http");
        let fwd = Forwarded {
            client_ip: "10.1.2.3".parse().unwrap(),
            proto: &proto,
            prefix: Some("/proxy/web"),
        };
        let mut h = map(&[
            ("cookie", "sid=1"),
            ("cookie", "hf_token=hft_x; b=2"),
            ("x-forwarded-prefix", "/spoofed"),
        ]);
        prepare_request(&mut h, false, &fwd);
        assert!(h.get("cookie").is_none());
        assert_eq!(h["x-forwarded-prefix"], "/proxy/web");
    }
}

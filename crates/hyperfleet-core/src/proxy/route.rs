//! Where a proxied request goes, read from its address alone: the machine
//! (id or name, as written), the guest port, and the path and query the
//! guest gets. Pure parsing, no store and no I/O.
//!
//! Two forms, tried in this order:
//! - host: `<port>-<machine>.<domain>` (any port on the Host header; the
//!   configured domain, and always `localhost`, whose subdomains resolve to
//!   loopback without DNS set-up);
//! - path: `/proxy/<machine>/<rest>?port=N` on any host; the guest sees
//!   `/<rest>` and the query without `port`.
//!
//! Both drop the `hf_token` query parameter (a Hyperfleet credential, see
//! `auth`), so guests never see it.

use std::borrow::Cow;

/// The query parameter that carries a machine's access token.
pub(crate) const TOKEN_PARAM: &str = "hf_token";
/// The query parameter that picks the guest port in the path form.
const PORT_PARAM: &str = "port";
/// The path form's prefix.
const PATH_PREFIX: &str = "/proxy/";

/// Which form addressed the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form<'a> {
    Host,
    /// `prefix` is `/proxy/<machine>` as written (the guest's
    /// `X-Forwarded-Prefix`, and the path of the token cookie).
    Path {
        prefix: &'a str,
    },
}

/// A parsed proxy address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route<'a> {
    /// The machine's id or name, lowercased.
    pub machine: Cow<'a, str>,
    /// The guest port; None in the path form without `?port=`.
    pub port: Option<u16>,
    pub form: Form<'a>,
    /// The path and query the guest gets.
    pub path_and_query: Cow<'a, str>,
    /// The `hf_token` query parameter, if present.
    pub token: Option<&'a str>,
}

/// Why an address is not a proxy address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RouteError {
    /// Neither form matches.
    NoRoute,
    /// A port that is not a number in 1–65535.
    BadPort(String),
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteError::NoRoute => write!(
                f,
                "this is the Hyperfleet proxy: address a machine as \
                 http://<port>-<machine id or name>.<proxy domain>/… or \
                 /proxy/<machine id or name>/…?port=<port>"
            ),
            RouteError::BadPort(p) => {
                write!(f, "'{p}' is not a port: expected a number from 1 to 65535")
            }
        }
    }
}

/// Parses a request's Host (as sent, with or without `:port`) and its path
/// and query. `domain` is the configured proxy domain (lowercase, no dots
/// at either end).
pub(crate) fn parse<'a>(
    host: Option<&'a str>,
    path_and_query: &'a str,
    domain: &str,
) -> Result<Route<'a>, RouteError> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    if let Some((port, machine)) = host.and_then(|h| host_label(h, domain)) {
        let port = parse_port(port)?;
        let (query, token, _) = filter_query(query, false);
        let path_and_query = match query {
            // Nothing dropped: the guest gets the original bytes.
            Cow::Borrowed(_) => Cow::Borrowed(path_and_query),
            Cow::Owned(q) => Cow::Owned(join(path, &q)),
        };
        return Ok(Route {
            machine: lowercase(machine),
            port: Some(port),
            form: Form::Host,
            path_and_query,
            token,
        });
    }
    let Some(after) = path.strip_prefix(PATH_PREFIX) else {
        return Err(RouteError::NoRoute);
    };
    let (machine, rest) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, "/"),
    };
    let prefix = &path[..PATH_PREFIX.len() + machine.len()];
    if machine.is_empty() {
        return Err(RouteError::NoRoute);
    }
    let (query, token, port) = filter_query(query, true);
    let port = port.map(parse_port).transpose()?;
    Ok(Route {
        machine: lowercase(machine),
        port,
        form: Form::Path { prefix },
        path_and_query: Cow::Owned(join(rest, &query)),
        token,
    })
}

/// `<port>-<machine>` when `host` is `<port>-<machine>.<domain>` or
/// `<port>-<machine>.localhost`, ignoring case and any `:port`.
fn host_label<'a>(host: &'a str, domain: &str) -> Option<(&'a str, &'a str)> {
    let host = strip_port(host);
    let host = host.strip_suffix('.').unwrap_or(host);
    let label = [domain, "localhost"].into_iter().find_map(|d| {
        let cut = host.len().checked_sub(d.len() + 1)?;
        let (label, suffix) = host.split_at_checked(cut)?;
        (suffix.as_bytes()[0] == b'.' && suffix[1..].eq_ignore_ascii_case(d)).then_some(label)
    })?;
    if label.contains('.') {
        return None;
    }
    let (port, machine) = label.split_once('-')?;
    let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    (digits && !machine.is_empty()).then_some((port, machine))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // An IPv6 literal: never a machine host name.
        return host;
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn parse_port(s: &str) -> Result<u16, RouteError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(RouteError::BadPort(s.chars().take(32).collect())),
    }
}

/// Machine ids and names are lowercase; Host headers are case-insensitive.
fn lowercase(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// The query without `hf_token` (and without `port` when `take_port`),
/// plus the values of those two. Borrowed when nothing was dropped.
fn filter_query(
    query: Option<&str>,
    take_port: bool,
) -> (Cow<'_, str>, Option<&str>, Option<&str>) {
    let Some(query) = query else {
        return (Cow::Borrowed(""), None, None);
    };
    let (mut token, mut port) = (None, None);
    let mut dropped = false;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == TOKEN_PARAM {
            token = token.or(Some(value));
            dropped = true;
        } else if take_port && key == PORT_PARAM {
            port = port.or(Some(value));
            dropped = true;
        }
    }
    if !dropped {
        return (Cow::Borrowed(query), None, None);
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
            !(key == TOKEN_PARAM || (take_port && key == PORT_PARAM))
        })
        .collect();
    (Cow::Owned(kept.join("&")), token, port)
}

fn join(path: &str, query: &str) -> String {
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host<'a>(h: &'a str, pq: &'a str) -> Result<Route<'a>, RouteError> {
        parse(Some(h), pq, "machines.example.com")
    }

    #[test]
    fn host_form_takes_port_and_machine_and_keeps_the_path() {
        let r = host("8080-mabc.machines.example.com:4000", "/a/b?x=1&port=2").unwrap();
        assert_eq!(r.machine, "mabc");
        assert_eq!(r.port, Some(8080));
        assert_eq!(r.form, Form::Host);
        // `port` belongs to the application in the host form.
        assert_eq!(r.path_and_query, "/a/b?x=1&port=2");
        assert!(matches!(r.path_and_query, Cow::Borrowed(_)));
        assert_eq!(r.token, None);
    }

    #[test]
    fn host_form_ignores_case_a_trailing_dot_and_accepts_localhost() {
        let r = host("3000-Web-1.MACHINES.example.com.", "/").unwrap();
        assert_eq!((r.machine.as_ref(), r.port), ("web-1", Some(3000)));
        let r = host("3000-web-1.localhost:4000", "/").unwrap();
        assert_eq!((r.machine.as_ref(), r.port), ("web-1", Some(3000)));
    }

    #[test]
    fn host_form_drops_the_token_parameter() {
        let r = host("80-m1.localhost", "/p?a=1&hf_token=hft_x&b=2").unwrap();
        assert_eq!(r.path_and_query, "/p?a=1&b=2");
        assert_eq!(r.token, Some("hft_x"));
        let r = host("80-m1.localhost", "/p?hf_token=t").unwrap();
        assert_eq!(r.path_and_query, "/p");
    }

    #[test]
    fn hosts_that_are_not_machine_names_fall_through_to_the_path_form() {
        for h in [
            "localhost:4000",
            "127.0.0.1:4000",
            "[::1]:4000",
            "web.localhost",
            "x-web.localhost",
            "-web.localhost",
            "8080-.localhost",
            "8080-a.b.localhost",
            "8080-web.example.org",
            "8080-web.notlocalhost",
        ] {
            assert_eq!(host(h, "/x"), Err(RouteError::NoRoute), "{h}");
            let r = host(h, "/proxy/web/x").unwrap();
            assert_eq!(
                r.form,
                Form::Path {
                    prefix: "/proxy/web"
                },
                "{h}"
            );
        }
    }

    #[test]
    fn bad_ports_are_reported() {
        for (h, pq, bad) in [
            ("99999-web.localhost", "/", "99999"),
            ("0-web.localhost", "/", "0"),
            ("h", "/proxy/web/?port=http", "http"),
            ("h", "/proxy/web/?port=", ""),
        ] {
            assert_eq!(host(h, pq), Err(RouteError::BadPort(bad.into())), "{h}{pq}");
        }
    }

    #[test]
    fn path_form_strips_the_prefix_port_and_token() {
        let r = host("h:4000", "/proxy/mabc/api/v1?port=8080&q=a%20b&hf_token=t").unwrap();
        assert_eq!(r.machine, "mabc");
        assert_eq!(r.port, Some(8080));
        assert_eq!(
            r.form,
            Form::Path {
                prefix: "/proxy/mabc"
            }
        );
        assert_eq!(r.path_and_query, "/api/v1?q=a%20b");
        assert_eq!(r.token, Some("t"));
        let r = host("h", "/proxy/web").unwrap();
        assert_eq!((r.port, r.path_and_query.as_ref()), (None, "/"));
        let r = host("h", "/proxy/web/?port=3000").unwrap();
        assert_eq!((r.port, r.path_and_query.as_ref()), (Some(3000), "/"));
        let r = host("h", "/proxy/web/x?y").unwrap();
        assert_eq!((r.port, r.path_and_query.as_ref()), (None, "/x?y"));
    }

    #[test]
    fn anything_else_is_no_route() {
        for pq in [
            "/",
            "/proxy",
            "/proxy/",
            "/proxy//x",
            "/api/v1/machines",
            "/proxyx/a",
        ] {
            assert_eq!(host("h", pq), Err(RouteError::NoRoute), "{pq}");
        }
        assert_eq!(parse(None, "/x", "localhost"), Err(RouteError::NoRoute));
        let msg = RouteError::NoRoute.to_string();
        assert!(msg.contains("<port>-<machine") && msg.contains("/proxy/<machine"));
    }
}

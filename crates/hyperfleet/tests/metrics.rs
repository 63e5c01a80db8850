//! `GET /metrics` against the real daemon (stub backend): the text format
//! parses line by line, who may read it, and that the numbers move with
//! what the daemon does — machines by status, transitions, step durations,
//! API requests by route template, store commits, VMM processes and the
//! proxy.

mod common;

use std::collections::BTreeMap;

use common::{Daemon, Sandbox};
use serde_json::json;

/// One scrape: every sample as `name{labels}` → value, labels in the order
/// the server wrote them.
struct Scrape {
    samples: BTreeMap<String, f64>,
    text: String,
}

impl Scrape {
    /// The value of the sample `name{labels}` (`labels` as written, without
    /// braces; empty for none), 0 when absent (a family shows only once
    /// used).
    fn get(&self, name: &str, labels: &str) -> f64 {
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            format!("{name}{{{labels}}}")
        };
        self.samples.get(&key).copied().unwrap_or(0.0)
    }

    /// The sum of every sample of `name` whose labels contain `part`.
    fn sum(&self, name: &str, part: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| k.split('{').next() == Some(name) && k.contains(part))
            .map(|(_, v)| v)
            .sum()
    }
}

fn scrape_as(d: &Daemon, key: &str) -> reqwest::blocking::Response {
    let mut r = d.raw().get(format!("{}/metrics", d.url));
    if !key.is_empty() {
        r = r.bearer_auth(key);
    }
    r.send().expect("GET /metrics")
}

fn scrape(d: &Daemon) -> Scrape {
    let r = scrape_as(d, &d.key);
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    let text = r.text().unwrap();
    Scrape {
        samples: parse(&text),
        text,
    }
}

/// Checks the Prometheus text format line by line — each line a `# HELP`
/// or `# TYPE` comment or `name{label="value",…} value`, every sample of
/// a declared family — and returns the samples.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    assert!(text.ends_with('\n'), "the text ends with a line break");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, what) = (parts.next(), parts.next(), parts.next());
            let name = name.unwrap_or_else(|| panic!("comment without a name: {line}"));
            assert!(valid_name(name), "bad metric name in {line:?}");
            match kind {
                Some("HELP") => assert!(what.is_some_and(|h| !h.is_empty()), "{line}"),
                Some("TYPE") => {
                    let t = what.unwrap_or("");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                        "{line}"
                    );
                    types.insert(name.to_string(), t.to_string());
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("a sample is `name{{labels}} value`: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                let l = l
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                (n, Some(l))
            }
            None => (series, None),
        };
        assert!(valid_name(name), "bad metric name in {line:?}");
        if let Some(labels) = labels {
            check_labels(labels, line);
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "{name} has no # TYPE line before it"
        );
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "duplicate series {series}"
        );
    }
    samples
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `k="v",k2="v2"` with `\\`, `\"` and `\n` escapes in values.
fn check_labels(labels: &str, line: &str) {
    let mut rest = labels;
    while !rest.is_empty() {
        let (k, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad label in {line:?}"));
        assert!(
            valid_name(k) && !k.contains(':'),
            "bad label name in {line:?}"
        );
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => {
                    let e = chars.next().map(|c| c.1);
                    assert!(
                        matches!(e, Some('\\' | '"' | 'n')),
                        "bad escape in {line:?}"
                    );
                }
                Some((i, '"')) => break i,
                Some(_) => {}
                None => panic!("unterminated label value in {line:?}"),
            }
        };
        rest = &after[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else {
            assert!(rest.is_empty(), "labels go on after a value in {line:?}");
        }
    }
}

fn make_key(d: &Daemon, name: &str, scopes: &[&str], tenant: Option<&str>) -> String {
    let mut body = json!({"name": name, "scopes": scopes});
    if let Some(t) = tenant {
        body["tenant"] = json!(t);
    }
    let r = d.call("POST", "/api/v1/keys", Some(body));
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["key"].as_str().unwrap().to_string()
}

#[test]
fn metrics_parse_and_move_with_what_the_daemon_does() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let before = scrape(&d);
    // Metrics without labels are there from the start.
    assert!(before.text.contains("# TYPE hyperfleet_machines gauge"));
    assert_eq!(before.get("hyperfleet_machines", "status=\"running\""), 0.0);

    let m = d.create(json!({"name": "metered"}));
    let id = m["id"].as_str().unwrap().to_string();
    for action in ["start", "suspend", "resume"] {
        let r = d.call("POST", &format!("/machines/{id}/{action}"), None);
        assert_eq!(r.status, 200, "{action}: {}", r.body);
    }
    let gets = 5;
    for _ in 0..gets {
        assert_eq!(
            d.call("GET", &format!("/api/v1/machines/{id}"), None)
                .status,
            200
        );
    }
    assert_eq!(d.call("GET", "/machines/no-such-machine", None).status, 404);
    assert_eq!(d.call("GET", "/no/such/route", None).status, 404);

    let running = scrape(&d);
    assert_eq!(
        running.get("hyperfleet_machines", "status=\"running\""),
        1.0
    );
    assert_eq!(running.get("hyperfleet_vmm_processes", "vmm=\"stub\""), 1.0);
    // The storage accounting's figures: a budget, the machine's directory
    // measured after its disk was prepared, no eviction.
    assert!(running.get("hyperfleet_storage_budget_bytes", "") > 0.0);
    assert!(
        running.get("hyperfleet_storage_stored_bytes", "kind=\"machines\"") > 0.0,
        "{}",
        running.text
    );
    assert_eq!(
        running.get("hyperfleet_storage_evictions_total", "kind=\"machine\""),
        0.0
    );

    let r = d.call("POST", &format!("/machines/{id}/stop"), None);
    assert_eq!(r.status, 200, "stop: {}", r.body);
    let after = scrape(&d);

    // Machines by status follow the store.
    assert_eq!(after.get("hyperfleet_machines", "status=\"running\""), 0.0);
    assert_eq!(after.get("hyperfleet_machines", "status=\"stopped\""), 1.0);
    assert_eq!(after.get("hyperfleet_vmm_processes", "vmm=\"stub\""), 0.0);

    // Transitions, by old and new status.
    let moved = |from: &str, to: &str| {
        let l = format!("from=\"{from}\",to=\"{to}\"");
        after.get("hyperfleet_machine_transitions_total", &l)
            - before.get("hyperfleet_machine_transitions_total", &l)
    };
    assert_eq!(moved("pending", "starting"), 1.0, "{}", after.text);
    assert_eq!(moved("starting", "running"), 2.0, "start and resume");
    assert_eq!(moved("running", "suspending"), 1.0);
    assert_eq!(moved("suspending", "suspended"), 1.0);
    assert_eq!(moved("suspended", "starting"), 1.0);
    assert_eq!(moved("running", "stopping"), 1.0);
    assert_eq!(moved("stopping", "stopped"), 1.0);

    // Step durations, one histogram per step.
    let steps = |s: &Scrape, step: &str| {
        s.get(
            "hyperfleet_step_duration_seconds_count",
            &format!("step=\"{step}\",outcome=\"ok\""),
        )
    };
    for (step, n) in [
        ("prepare_disk", 1.0),
        ("spawn_vmm", 2.0),
        ("wait_agent", 2.0),
        ("save_memory", 1.0),
    ] {
        assert_eq!(
            steps(&after, step) - steps(&before, step),
            n,
            "{step}: {}",
            after.text
        );
    }
    let stop_steps = after.sum(
        "hyperfleet_step_duration_seconds_count",
        "step=\"graceful_shutdown\"",
    ) + after.sum(
        "hyperfleet_step_duration_seconds_count",
        "step=\"kill_vmm\"",
    );
    assert!(stop_steps >= 1.0, "the stop was timed: {}", after.text);
    let inf = after.get(
        "hyperfleet_step_duration_seconds_bucket",
        "step=\"spawn_vmm\",outcome=\"ok\",le=\"+Inf\"",
    );
    assert_eq!(inf, steps(&after, "spawn_vmm"), "+Inf bucket = count");

    // API requests by route template, never by id or name.
    let req = |s: &Scrape, l: &str| s.get("hyperfleet_http_requests_total", l);
    let get_ok = "method=\"GET\",route=\"/machines/{id}\",status=\"200\"";
    assert_eq!(req(&after, get_ok) - req(&before, get_ok), f64::from(gets));
    let not_found = "method=\"GET\",route=\"/machines/{id}\",status=\"404\"";
    assert_eq!(req(&after, not_found) - req(&before, not_found), 1.0);
    let unmatched = "method=\"GET\",route=\"unmatched\",status=\"404\"";
    assert_eq!(req(&after, unmatched) - req(&before, unmatched), 1.0);
    for action in ["start", "suspend", "resume", "stop"] {
        let l = format!("method=\"POST\",route=\"/machines/{{id}}/{action}\",status=\"200\"");
        assert_eq!(req(&after, &l), 1.0, "{action}: {}", after.text);
    }
    assert_eq!(
        req(&after, "method=\"POST\",route=\"/machines\",status=\"201\""),
        1.0
    );
    // The scrapes themselves, counted once answered.
    assert!(req(&after, "method=\"GET\",route=\"/metrics\",status=\"200\"") >= 2.0);
    assert!(!after.text.contains(&id) && !after.text.contains("metered"));
    assert!(!after.text.contains("no-such-machine"));
    let lat = after.get(
        "hyperfleet_http_request_duration_seconds_count",
        "method=\"GET\",route=\"/machines/{id}\"",
    );
    assert_eq!(lat, f64::from(gets) + 1.0, "every GET timed");

    // Store commits: every write above was committed in some batch.
    let commits = |s: &Scrape| s.get("hyperfleet_store_commit_duration_seconds_count", "");
    let writes = commits(&after) - commits(&before);
    assert!(
        writes >= 8.0,
        "create + 4 actions commit several times: {writes}"
    );
    let jobs = |s: &Scrape| s.get("hyperfleet_store_commit_batch_size_sum", "");
    assert!(jobs(&after) - jobs(&before) >= writes);
    assert_eq!(
        after.get("hyperfleet_store_commit_batch_size_count", ""),
        commits(&after)
    );
}

#[test]
fn the_proxy_counts_requests_and_bytes() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let proxy = std::fs::read_to_string(sb.path().join("proxy.addr")).unwrap();
    let before = scrape(&d);
    for _ in 0..3 {
        let r = d
            .raw()
            .get(format!("http://{}/", proxy.trim()))
            .send()
            .unwrap();
        assert_eq!(r.status(), 404);
        r.bytes().unwrap();
    }
    let after = scrape(&d);
    let l = "status=\"404\"";
    assert_eq!(
        after.get("hyperfleet_proxy_requests_total", l)
            - before.get("hyperfleet_proxy_requests_total", l),
        3.0
    );
    for c in [
        "hyperfleet_proxy_received_bytes_total",
        "hyperfleet_proxy_sent_bytes_total",
    ] {
        assert!(after.get(c, "") - before.get(c, "") > 3.0 * 50.0, "{c}");
    }
}

#[test]
fn metrics_take_an_operator_key_with_the_read_scope() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    assert_eq!(scrape_as(&d, "").status(), 401);
    let reader = make_key(&d, "scraper", &["read"], None);
    assert_eq!(scrape_as(&d, &reader).status(), 200);
    assert_eq!(
        d.call_as(&reader, "GET", "/api/v1/metrics", None).status,
        200
    );
    let writer = make_key(&d, "writer", &["write"], None);
    assert_eq!(scrape_as(&d, &writer).status(), 403);
    // Host-wide numbers are not for other tenants, not even their admins.
    let other = make_key(&d, "other", &["admin"], Some("acme"));
    let r = d.call_as(&other, "GET", "/metrics", None);
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"), "{}", r.body);
}

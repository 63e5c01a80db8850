//! The crash scenario, shared by the backends: the daemon SIGKILLs itself
//! (a real SIGKILL, via the `failpoints` build) at one step boundary of the
//! machine run per round; a restarted daemon must converge the machine to
//! what the client asked for, with nothing left behind and nothing done
//! twice (never two VMM processes for one machine).

use std::time::Duration;

use serde_json::{json, Value};

use super::netns::NetNs;

use super::{eventually, killed_by_sigkill, Daemon, Resp, Sandbox};

/// Every crash point, in the order a machine's life reaches them.
pub(crate) const POINTS: &[&str] = hyperfleet_core::failpoint::CRASH_POINTS;

/// The scenario passes every point when the guest comes up.
pub(crate) const FULL_SCENARIO: &[Step] = &[
    Step {
        req: "start",
        want: Want::Status("running"),
    },
    Step {
        req: "snapshots",
        want: Want::Snapshot,
    },
    Step {
        req: "pause",
        want: Want::Status("paused"),
    },
    Step {
        req: "resume",
        want: Want::Status("running"),
    },
    Step {
        req: "suspend",
        want: Want::Status("suspended"),
    },
    Step {
        req: "resume",
        want: Want::Status("running"),
    },
    Step {
        req: "stop",
        want: Want::Status("stopped"),
    },
    Step {
        req: "delete",
        want: Want::Gone,
    },
];

/// What one request of the scenario must lead to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// Accepted (`wait=false`): whatever the status.
    Accepted,
    /// Answered 2xx with this status.
    Status(&'static str),
    /// Answered 500 RUNTIME_ERROR: the machine failed.
    Failed,
    /// Deleted (a retried delete may find nothing: 404).
    Gone,
    /// A snapshot taken (`201`, ready); or, for a request retried after
    /// the crash while the recovered run still finishes the first one,
    /// `409` saying so.
    Snapshot,
}

/// Whether crash point `p` is passed by taking a snapshot (backends
/// without snapshots leave those out).
pub(crate) fn is_snapshot_point(p: &str) -> bool {
    p.starts_with("snapshot.")
}

/// One client request: a machine action (`start`, `stop?wait=false`, …),
/// `delete`, or `wait:<status>` (GET /machines/{id}/wait).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    pub req: &'static str,
    pub want: Want,
}

/// A backend's crash scenario.
pub(crate) struct Case<'a> {
    pub name: &'a str,
    /// The crash points the scenario passes (each is armed in one round).
    pub points: &'a [&'a str],
    pub scenario: &'a [Step],
    /// Flags for every daemon of the case (first and restarted).
    pub daemon_args: &'a [&'a str],
    /// Run each round with machine networking on, in a network namespace
    /// of its own, next to a running bystander machine whose lease must
    /// survive every crash and never be handed out twice.
    pub network: bool,
    /// The create request's body.
    pub create: Value,
    /// Live VMM processes of a machine id in a sandbox.
    pub vmm_pids: &'a dyn Fn(&Sandbox, &str) -> Vec<i32>,
    /// Host directories of the machine other than its machine directory
    /// that still exist (cgroups, …); must be empty at the end, and are
    /// removed (rmdir) when a round fails.
    pub leftovers: &'a dyn Fn(&str) -> Vec<String>,
}

/// When a round fails, kills the machine's VMMs and removes its leftovers,
/// so a failed assertion leaves nothing running. Declared before the
/// daemons, so it runs after they are killed and none can start another VMM.
struct Cleanup<'a> {
    case: &'a Case<'a>,
    sb: &'a Sandbox,
    id: String,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() || self.id.is_empty() {
            return;
        }
        for pid in (self.case.vmm_pids)(self.sb, &self.id) {
            // SAFETY: kill(2) with the pid of a VMM of this round's machine.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        for dir in (self.case.leftovers)(&self.id) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Sends one scenario request.
pub(crate) fn act(d: &Daemon, id: &str, req: &str) -> Result<Resp, reqwest::Error> {
    if req == "delete" {
        return d.try_call_as(
            &d.key,
            "DELETE",
            &format!("/machines/{id}?timeout=60"),
            None,
        );
    }
    if let Some(status) = req.strip_prefix("wait:") {
        return d.try_call_as(
            &d.key,
            "GET",
            &format!("/machines/{id}/wait?status={status}&timeout=60"),
            None,
        );
    }
    let sep = if req.contains('?') { '&' } else { '?' };
    d.try_call_as(
        &d.key,
        "POST",
        &format!("/machines/{id}/{req}{sep}timeout=60"),
        None,
    )
}

/// Whether `r` is what `want` asks for; panics with the details if it is
/// not.
fn check(d: &Daemon, id: &str, ctx: &str, step: &Step, r: &Resp) {
    match step.want {
        Want::Snapshot => {
            let retried = r.status == 409 && r.body.to_string().contains("already taking");
            assert!(
                (r.status == 201 && r.body["status"] == "ready") || retried,
                "{ctx}: {} answered {} {}\n{}",
                step.req,
                r.status,
                r.body,
                d.log()
            );
        }
        Want::Accepted | Want::Gone | Want::Status(_) => {
            assert!(
                r.status < 300,
                "{ctx}: {} answered {} {}\n{}",
                step.req,
                r.status,
                r.body,
                d.log()
            );
            if let Want::Status(s) = step.want {
                assert_eq!(r.body["status"], s, "{ctx}: {}", step.req);
            }
        }
        Want::Failed => {
            assert_eq!(
                (r.status, r.code()),
                (500, "RUNTIME_ERROR"),
                "{ctx}: {} answered {}",
                step.req,
                r.body
            );
            let m = d.call("GET", &format!("/machines/{id}"), None).body;
            assert_eq!(m["status"], "failed", "{ctx}: {m}");
        }
    }
}

/// How many VMMs a machine may have after a step reached its outcome.
fn vmms_after(want: Want) -> Option<usize> {
    match want {
        Want::Status("running" | "paused") | Want::Snapshot => Some(1),
        Want::Status("stopped" | "suspended") | Want::Failed | Want::Gone => Some(0),
        // Mid-start (`starting` is recorded just before the spawn): the
        // process may or may not exist yet.
        Want::Status(_) | Want::Accepted => None,
    }
}

fn assert_single_vmm(case: &Case, sb: &Sandbox, id: &str, ctx: &str) {
    let pids = (case.vmm_pids)(sb, id);
    assert!(
        pids.len() <= 1,
        "{ctx}: two VMM processes for one machine: {pids:?}"
    );
}

/// Runs the scenario once per crash point.
pub(crate) fn run(case: &Case) {
    for point in case.points {
        let ctx = format!("{}: {point}", case.name);
        let sb = Sandbox::new();
        let mut cleanup = Cleanup {
            case,
            sb: &sb,
            id: String::new(),
        };
        let mut args: Vec<&str> = case.daemon_args.to_vec();
        let ns = case.network.then(|| {
            let ns = NetNs::new("c");
            ns.enter();
            args.extend(["--network", "on"]);
            ns
        });
        let bystander = ns.as_ref().map(|_| {
            let d = Daemon::start_with(&sb, &[], &args);
            d.create(json!({"name": "bystander"}));
            let by = d.call("POST", "/machines/bystander/start", None).body;
            assert_eq!(by["status"], "running", "{ctx}: {by}");
            by["network"].clone()
        });
        let mut d = Daemon::start_with(&sb, &[("HYPERFLEET_CRASH_AT", point)], &args);
        let m = d.create(case.create.clone());
        let id = m["id"].as_str().unwrap().to_string();
        cleanup.id = id.clone();
        // Run the scenario until the daemon dies at the armed point.
        let mut done = 0;
        for step in case.scenario {
            match act(&d, &id, step.req) {
                Ok(r) => {
                    check(&d, &id, &ctx, step, &r);
                    done += 1;
                }
                Err(_) => break,
            }
            assert_single_vmm(case, &sb, &id, &ctx);
        }
        let status = d.wait_exit(Duration::from_secs(20)).unwrap_or_else(|| {
            panic!(
                "{ctx}: the crash point was never reached (scenario finished {done} steps)\n{}",
                d.log()
            )
        });
        assert!(
            killed_by_sigkill(&status),
            "{ctx}: daemon ended with {status:?}, not SIGKILL"
        );
        assert_single_vmm(case, &sb, &id, &ctx);

        // Restart: the interrupted request is retried (as a client would),
        // then the rest of the scenario runs to the end.
        let d = Daemon::start_with(&sb, &[], &args);
        if let Some(by) = &bystander {
            let now = d.call("GET", &format!("/machines/{id}"), None);
            if let Some(ip) = now.body["network"]["ip"].as_str() {
                assert_ne!(
                    Some(ip),
                    by["ip"].as_str(),
                    "{ctx}: one address leased twice"
                );
            }
        }
        for step in &case.scenario[done..] {
            assert_single_vmm(case, &sb, &id, &ctx);
            let r = act(&d, &id, step.req).unwrap();
            // A delete the restarted run already finished: the retry finds nothing.
            if step.want == Want::Gone && r.status == 404 {
                continue;
            }
            check(&d, &id, &format!("{ctx}, after restart"), step, &r);
            if let Some(n) = vmms_after(step.want) {
                let pids = (case.vmm_pids)(&sb, &id);
                assert_eq!(
                    pids.len(),
                    n,
                    "{ctx}: after {} ({:?}) the processes are {pids:?}\n{}",
                    step.req,
                    step.want,
                    d.log()
                );
            }
        }
        // Nothing left behind.
        assert_eq!(
            d.call("GET", &format!("/machines/{id}"), None).status,
            404,
            "{ctx}"
        );
        if let (Some(ns), Some(by)) = (&ns, &bystander) {
            let now = d.call("GET", "/machines/bystander", None).body;
            assert_eq!(
                (&now["status"], &now["network"]),
                (&json!("running"), by),
                "{ctx}: the bystander lost its state or its lease"
            );
            assert_eq!(
                ns.hyperfleet_taps(),
                vec![by["tap"].as_str().unwrap().to_string()],
                "{ctx}: TAP devices"
            );
            let r = d.call("DELETE", "/machines/bystander?force=true", None);
            assert_eq!(r.status, 204, "{ctx}: {}", r.body);
            assert_eq!(
                ns.hyperfleet_taps(),
                Vec::<String>::new(),
                "{ctx}: TAPs left"
            );
            assert!(
                !ns.try_exec(&["nft", "list", "table", "inet", "hyperfleet"]),
                "{ctx}: the nftables table outlived the machines"
            );
        }
        eventually(
            &format!("{ctx}: no VMM left"),
            Duration::from_secs(5),
            || (case.vmm_pids)(&sb, &id).is_empty().then_some(()),
        );
        let dirs: Vec<_> = std::fs::read_dir(sb.machines_dir()).unwrap().collect();
        assert!(dirs.is_empty(), "{ctx}: machine directories left: {dirs:?}");
        // Every snapshot asked for was taken (none stuck or failed), and
        // deleting them leaves no file.
        let snaps = d.call("GET", "/snapshots", None).body;
        for s in snaps["snapshots"].as_array().into_iter().flatten() {
            assert_eq!(s["status"], "ready", "{ctx}: {s}");
            let r = d.call(
                "DELETE",
                &format!("/snapshots/{}", s["id"].as_str().unwrap()),
                None,
            );
            assert_eq!(r.status, 204, "{ctx}: {}", r.body);
        }
        let snapshot_files = sb.path().join("snapshots");
        if snapshot_files.exists() {
            let left: Vec<_> = std::fs::read_dir(&snapshot_files).unwrap().collect();
            assert!(left.is_empty(), "{ctx}: snapshot files left: {left:?}");
        }
        let left = (case.leftovers)(&id);
        assert!(left.is_empty(), "{ctx}: left behind: {left:?}");
        let log = d.log();
        assert!(
            !log.contains("BUG:"),
            "{ctx}: the run hit an impossible transition:\n{log}"
        );
    }
}

//! An OCI image's main process: the agent runs the image config's
//! entrypoint and command (with the create's `entrypoint`, `cmd`, `env`,
//! `workdir` and `user` overrides) as the machine's main process, its
//! output in the console log; its exit stops the machine with `exit_code`
//! (kept across a daemon restart), and the restart policy boots it again.
//! The API's side runs on the stub backend; the rest on real QEMU guests
//! (one serving HTTP through the proxy from a network namespace of its own,
//! so it needs root). Images are built in the test from busybox-static.
//! Needs scripts/install-oci-deps.sh and the guest assets.

mod common;

use std::path::Path;
use std::time::Duration;

use common::netns::NetNs;
use common::oci::{self, Config, Entry};
use common::{eventually, guest_assets, Daemon, Sandbox};
use serde_json::{json, Value};

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n";
const GROUP: &str = "root:x:0:\napp:x:1000:\nstaff:x:50:app\n";

/// An image of busybox-static (`/bin/sh`), a passwd and group naming
/// `app`, and a web root, with `cfg` as its config.
fn image(dir: &Path, cfg: &Config) -> std::path::PathBuf {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static at /bin/busybox");
    let p = dir.join("image.tar");
    oci::oci_archive(
        &p,
        &[oci::layer(&[
            Entry::Dir("bin/"),
            Entry::File("bin/busybox", busybox, 0o755),
            Entry::Symlink("bin/sh", "busybox"),
            Entry::Dir("etc/"),
            oci::file("etc/passwd", PASSWD),
            oci::file("etc/group", GROUP),
            Entry::Dir("www/"),
            oci::file("www/index.html", "served by the main process\n"),
        ])],
        cfg,
    );
    p
}

fn import(d: &Daemon, archive: &Path) -> Value {
    let resp = d
        .raw()
        .post(format!("{}/images/import", d.url))
        .bearer_auth(&d.key)
        .body(std::fs::read(archive).unwrap())
        .send()
        .unwrap();
    assert_eq!(resp.status(), 201);
    resp.json().unwrap()
}

/// A daemon in a sandbox of its own and the image of `cfg` imported into
/// it: with `qemu` (its extra flags) one whose machines are real QEMU
/// guests, else the stub backend's. None (skipped loudly) without the
/// tools, or the guest assets for QEMU.
fn daemon_with_image(cfg: &Config, qemu: Option<&[&str]>) -> Option<(Sandbox, Daemon, Value)> {
    if !oci::tools_present() {
        return None;
    }
    let sb = Sandbox::new();
    let d = match qemu {
        Some(extra) => Daemon::start_qemu(&sb, &guest_assets()?, extra),
        None => Daemon::start(&sb),
    };
    let dir = tempfile::tempdir().unwrap();
    let img = import(&d, &image(dir.path(), cfg));
    Some((sb, d, img))
}

fn console(d: &Daemon, id: &str) -> String {
    let r = d.call("GET", &format!("/machines/{id}/logs?tail=400"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body.as_str().unwrap_or_default().replace('\r', "")
}

/// Polls the machine until `pred` holds.
fn machine_until(d: &Daemon, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    eventually(what, Duration::from_secs(400), || {
        let r = d.call("GET", &format!("/machines/{id}"), None);
        assert_eq!(r.status, 200, "{}", r.body);
        pred(&r.body).then_some(r.body)
    })
}

#[test]
fn the_api_takes_the_main_process_fields_with_an_image_only() {
    let Some((_sb, d, img)) = daemon_with_image(
        &Config {
            entrypoint: vec!["/bin/sh", "-c"],
            cmd: vec!["echo hi"],
            env: vec!["PATH=/bin"],
            workdir: Some("/www"),
            user: Some("app"),
        },
        None,
    ) else {
        return;
    };
    // The image's own process, and the default policy.
    let m = d.create(json!({"image": img["id"]}));
    assert_eq!(
        m["process"],
        json!({"argv": ["/bin/sh", "-c", "echo hi"], "workdir": "/www", "user": "app"})
    );
    assert_eq!(m["restart_policy"], json!({"policy": "no"}));
    assert_eq!(m["restart_count"], 0);
    assert!(m["exit_code"].is_null());
    // Overrides; an entrypoint alone drops the image's cmd; on-failure
    // gets its default count.
    let m = d.create(json!({
        "image": img["id"], "entrypoint": ["/bin/busybox", "sleep"], "workdir": "/",
        "user": "1000:50", "restart": {"policy": "on-failure"}
    }));
    assert_eq!(
        m["process"],
        json!({"argv": ["/bin/busybox", "sleep"], "workdir": "/", "user": "1000:50"})
    );
    assert_eq!(
        m["restart_policy"],
        json!({"policy": "on-failure", "max_retries": 3})
    );
    let m = d.create(json!({"image": img["id"], "entrypoint": [], "cmd": []}));
    assert!(m["process"].is_null(), "{m}");
    // The built-in image has no main process.
    let m = d.create(json!({}));
    assert!(m["process"].is_null(), "{m}");
    assert_eq!(m["restart_policy"], json!({"policy": "no"}));
    // Without an image they conflict; bad values are refused.
    let r = d.call(
        "POST",
        "/machines",
        Some(json!({"image": img["id"], "restart": {"policy": "always", "max_retries": 2}})),
    );
    assert_eq!((r.status, r.code()), (409, "CONFLICT"), "{}", r.body);
    for body in [
        json!({"cmd": ["x"]}),
        json!({"restart": {"policy": "always"}}),
        json!({"user": "app"}),
    ] {
        let r = d.call("POST", "/machines", Some(body.clone()));
        assert_eq!(
            (r.status, r.code()),
            (409, "CONFLICT"),
            "{body}: {}",
            r.body
        );
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("need image"),
            "{}",
            r.body
        );
    }
    for body in [
        json!({"image": img["id"], "user": "a b"}),
        json!({"image": img["id"], "workdir": "relative"}),
        json!({"image": img["id"], "cmd": "not an array"}),
        json!({"image": img["id"], "restart": {"policy": "on-failure", "max_retries": 101}}),
        json!({"image": img["id"], "restart": {"policy": "sometimes"}}),
    ] {
        let r = d.call("POST", "/machines", Some(body.clone()));
        assert_eq!(r.status, 400, "{body}: {}", r.body);
    }
}

/// `hyperfleet machines create` with the main-process flags.
#[test]
fn the_cli_takes_the_main_process_flags() {
    let Some((_sb, d, img)) = daemon_with_image(&Config::default(), None) else {
        return;
    };
    let cli = |args: &[&str]| {
        std::process::Command::new(common::bin())
            .args(["--url", &d.url, "--api-key", &d.key])
            .args(args)
            .output()
            .unwrap()
    };
    let id = img["id"].as_str().unwrap();
    let out = cli(&[
        "--json",
        "machines",
        "create",
        "--image",
        id,
        "--entrypoint",
        r#"["/bin/sh","-c"]"#,
        "--cmd",
        "echo $FOO",
        "--workdir",
        "/srv",
        "--user",
        "app:staff",
        "--restart",
        "on-failure:5",
        "--env",
        "FOO=bar",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        m["process"],
        json!({"argv": ["/bin/sh", "-c", "echo $FOO"], "workdir": "/srv", "user": "app:staff"})
    );
    assert_eq!(
        m["restart_policy"],
        json!({"policy": "on-failure", "max_retries": 5})
    );
    let out = cli(&["machines", "get", m["id"].as_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/bin/sh -c echo $FOO"), "{text}");
    assert!(text.contains("on-failure (at most 5), 0 so far"), "{text}");
    // Bad flags are refused before any request; fields need --image.
    let out = cli(&[
        "machines",
        "create",
        "--image",
        id,
        "--restart",
        "sometimes",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("on-failure:N"));
    let out = cli(&["machines", "create", "--cmd", "true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("need image"));
}

/// The restart policy's decision on the stand-in VMM, whose "guest" ends
/// its main process on command: a restart is a new boot; an exit while
/// the daemon is down (SIGKILLed) is found from the console when it comes
/// back, and decided then; the retries run out.
#[test]
fn the_restart_policy_decides_once_even_across_a_daemon_crash() {
    let Some((sb, mut d, img)) = daemon_with_image(
        &Config {
            entrypoint: vec!["/bin/true"],
            ..Config::default()
        },
        None,
    ) else {
        return;
    };
    let m = d.create(json!({
        "name": "job", "image": img["id"],
        "restart": {"policy": "on-failure", "max_retries": 1}
    }));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/job/start", None);
    assert_eq!(r.body["status"], "running", "{}", r.body);
    let first = sb.vmm_pids_of(&id);
    assert_eq!(sb.testvmm_command(&id, "MAIN_EXIT 3"), "OK");
    // Booted again by the policy: a new VMM, the count at 1.
    let m = machine_until(&d, &id, "the policy's restart", |m| {
        m["status"] == "running" && m["restart_count"] == 1
    });
    assert_eq!(m["desired_status"], "running", "{m}");
    assert!(m["exit_code"].is_null(), "the boot clears it: {m}");
    let second = sb.vmm_pids_of(&id);
    assert!(
        !second.is_empty() && second != first,
        "{first:?} {second:?}"
    );
    // The main process exits again while no daemon runs.
    d.kill9();
    assert_eq!(sb.testvmm_command(&id, "MAIN_EXIT 4"), "OK");
    eventually("the VMM to exit", Duration::from_secs(10), || {
        sb.vmm_pids_of(&id).is_empty().then_some(())
    });
    let d = Daemon::start(&sb);
    let m = machine_until(&d, &id, "the exit to be found", |m| {
        m["status"] == "stopped" && m["desired_status"] == "stopped"
    });
    assert_eq!(
        (m["exit_code"].as_i64(), m["restart_count"].as_i64()),
        (Some(4), Some(1)),
        "{m}"
    );
    assert_eq!(m["exit_reason"], "main process exited with code 4", "{m}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(sb.vmm_pids_of(&id).is_empty(), "nothing boots it again");
}

#[test]
fn an_exiting_main_process_stops_the_machine_with_its_code_and_overrides_apply() {
    let Some((sb, mut d, img)) = daemon_with_image(
        &Config {
            entrypoint: vec!["/bin/sh", "-c"],
            cmd: vec!["echo image-main FOO=$FOO BAR=$BAR; exit 3"],
            env: vec!["PATH=/bin", "FOO=from-image", "BAR=image-bar"],
            ..Config::default()
        },
        Some(&[]),
    ) else {
        return;
    };
    // The image's own entrypoint and cmd: exits 3.
    let m = d.create(json!({"name": "exits", "image": img["id"]}));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/exits/start?wait=false", None);
    assert_eq!(r.status, 202, "{}", r.body);
    // Overrides: cmd, env (over the image's), workdir (created when
    // missing), user by name (its groups from /etc/group).
    let o = d.create(json!({
        "name": "overrides", "image": img["id"],
        "cmd": ["echo FOO=$FOO BAR=$BAR HOME=$HOME; pwd; /bin/busybox id -u; echo groups: $(/bin/busybox id -G)"],
        "env": {"FOO": "from-machine"}, "workdir": "/srv/app", "user": "app"
    }));
    let oid = o["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/overrides/start?wait=false", None);
    assert_eq!(r.status, 202, "{}", r.body);

    let m = machine_until(&d, &id, "the main process to exit", |m| {
        m["status"] == "stopped"
    });
    assert_eq!(m["exit_code"], 3, "{m}");
    assert_eq!(m["desired_status"], "stopped", "{m}");
    assert_eq!(m["exit_reason"], "main process exited with code 3", "{m}");
    let log = console(&d, &id);
    assert!(
        log.contains("image-main FOO=from-image BAR=image-bar"),
        "{log}"
    );
    assert!(
        log.contains("hyperfleet: main process exited with code 3"),
        "{log}"
    );

    let o = machine_until(&d, &oid, "the overridden process to exit", |m| {
        m["status"] == "stopped"
    });
    assert_eq!(o["exit_code"], 0, "{o}");
    let log = console(&d, &oid);
    assert!(
        log.contains("FOO=from-machine BAR=image-bar HOME=/home/app\n/srv/app\n1000\ngroups: 1000"),
        "{log}"
    );
    let groups = log.lines().find(|l| l.starts_with("groups: ")).unwrap();
    assert!(groups.split(' ').any(|g| g == "50"), "{log}");

    // The exit code is durable: a daemon restart keeps it.
    d.terminate();
    let d = Daemon::start_qemu(&sb, &common::assets_dir(), &[]);
    let r = d.call("GET", "/machines/exits", None);
    assert_eq!(
        (r.body["status"].as_str(), r.body["exit_code"].as_i64()),
        (Some("stopped"), Some(3)),
        "{}",
        r.body
    );
    // The step that started it is in the events.
    let r = d.call("GET", &format!("/machines/{id}/events"), None);
    assert!(
        r.body.to_string().contains("start_main_process"),
        "{}",
        r.body
    );
}

#[test]
fn on_failure_restarts_the_machine_up_to_max_retries() {
    let Some((_sb, d, img)) = daemon_with_image(
        &Config {
            entrypoint: vec!["/bin/sh", "-c", "echo attempt; exit 1"],
            ..Config::default()
        },
        Some(&[]),
    ) else {
        return;
    };
    let m = d.create(json!({
        "name": "flaky", "image": img["id"],
        "restart": {"policy": "on-failure", "max_retries": 2}
    }));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/flaky/start?wait=false", None);
    assert_eq!(r.status, 202, "{}", r.body);
    let m = machine_until(&d, &id, "the retries to run out", |m| {
        m["status"] == "stopped" && m["desired_status"] == "stopped"
    });
    assert_eq!(m["restart_count"], 2, "{m}");
    assert_eq!(m["exit_code"], 1, "{m}");
    assert_eq!(m["exit_reason"], "main process exited with code 1", "{m}");
    // Three boots, three runs of the process.
    let log = console(&d, &id);
    assert_eq!(
        log.matches("hyperfleet: main process started").count(),
        3,
        "{log}"
    );
    assert_eq!(log.matches("\nattempt\n").count(), 3, "{log}");
    let r = d.call("GET", &format!("/machines/{id}/events"), None);
    assert_eq!(
        r.body
            .to_string()
            .matches("the on-failure restart policy boots it again")
            .count(),
        2,
        "{}",
        r.body
    );
    // Each restart boots after its back-off (0.5 s, then 1 s).
    let ev = r.body.to_string();
    assert!(
        ev.contains("(restart 1 of the restart policy, after 0.5 s)")
            && ev.contains("(restart 2 of the restart policy, after 1.0 s)"),
        "{ev}"
    );
    // A start asked for begins the count anew (and is not refused).
    let r = d.call("POST", "/machines/flaky/start?wait=false", None);
    assert_eq!(r.status, 202, "{}", r.body);
    let m = d.call("GET", &format!("/machines/{id}"), None).body;
    assert_eq!(m["restart_count"], 0, "{m}");
    // The boot clears the exit code.
    machine_until(&d, &id, "the next boot", |m| m["exit_code"].is_null());
    let r = d.call("DELETE", "/machines/flaky?force=true", None);
    assert_eq!(r.status, 204, "{}", r.body);
}

#[test]
fn an_image_entrypoint_serves_http_through_the_proxy() {
    if !oci::tools_present() || guest_assets().is_none() {
        return;
    }
    let host = NetNs::new("p");
    host.enter();
    let Some((sb, d, img)) = daemon_with_image(
        &Config {
            entrypoint: vec!["/bin/busybox", "httpd", "-f", "-p", "8080"],
            cmd: vec!["-h", "/www"],
            env: vec!["PATH=/bin", "GREETING=from-image"],
            ..Config::default()
        },
        Some(&["--network", "on"]),
    ) else {
        return;
    };
    let m = d.create(json!({
        "name": "web", "image": img["id"], "exposed_ports": [8080],
        "network": {"egress": false}, "restart": {"policy": "always"}
    }));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/web/start?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());
    let proxy = std::fs::read_to_string(sb.path().join("proxy.addr")).unwrap();
    let proxy = proxy.trim();
    let body = eventually(
        "the image's httpd through the proxy",
        Duration::from_secs(30),
        || {
            let r = d
                .raw()
                .get(format!("http://{proxy}/"))
                .header("Host", format!("8080-{id}.localhost"))
                .bearer_auth(&d.key)
                .send()
                .ok()?;
            (r.status() == 200).then(|| r.text().unwrap())
        },
    );
    assert_eq!(body, "served by the main process\n");
    // A command run in the machine gets the image's Env too, under the
    // machine's and the request's.
    let r = d.call(
        "POST",
        "/machines/web/exec",
        Some(
            json!({"command": ["/bin/sh", "-c", "echo $GREETING $PATH $EXTRA"],
                    "env": {"EXTRA": "from-request"}}),
        ),
    );
    assert_eq!(
        r.body["stdout"], "from-image /bin from-request\n",
        "{}",
        r.body
    );
    // A stop asked for wins over `always`.
    let r = d.call("POST", "/machines/web/stop?timeout=120", None);
    assert_eq!(r.body["status"], "stopped", "{}", r.body);
    assert_eq!(r.body["restart_count"], 0, "{}", r.body);
    assert!(r.body["exit_code"].is_null(), "{}", r.body);
    std::thread::sleep(Duration::from_secs(2));
    let m = d.call("GET", "/machines/web", None).body;
    assert_eq!(
        (m["status"].as_str(), m["desired_status"].as_str()),
        (Some("stopped"), Some("stopped")),
        "{m}"
    );
    let r = d.call("DELETE", "/machines/web", None);
    assert_eq!(r.status, 204, "{}", r.body);
}

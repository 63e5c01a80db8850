//! The daemon under hostile or unlucky conditions (issue 13): a flood of
//! idle connections, loose file modes on the data directory, a full disk,
//! and an operator who revoked the last admin key.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{eventually, Daemon, Sandbox};
use serde_json::json;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Whether the server closed `s` (EOF or reset) within `wait`.
fn closed_by_server(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn idle_connection_floods_are_capped_closed_and_do_not_block_sigterm() {
    let sb = Sandbox::new();
    let mut d = Daemon::start_with(
        &sb,
        &[],
        &[
            "--api-max-connections",
            "64",
            "--api-header-timeout",
            "4",
            "--api-idle-timeout",
            "3",
            "--no-proxy",
        ],
    );
    let addr = d.url.trim_start_matches("http://").to_string();
    let pid = d.child.id();
    let before = open_fds(pid);
    let mut idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // The cap holds: the daemon took at most 64 of them.
    let during = open_fds(pid);
    assert!(
        during <= before + 64 + 8,
        "the daemon holds {during} fds with 300 idle clients (had {before}); the cap is 64"
    );
    // /health still answers while they sit there, at once: at the cap a new
    // client makes room by closing the connection idle longest, so it does
    // not queue behind the flood until header timeouts free slots.
    let health = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let t = Instant::now();
    let r = health
        .get(format!("{}/health", d.url))
        .send()
        .expect("/health answers during the flood");
    assert_eq!(r.status(), 200);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "/health took {:?} during the flood (header timeout 4 s)",
        t.elapsed()
    );
    // Every idle connection gets closed by the server.
    let deadline = Instant::now() + Duration::from_secs(40);
    for s in idle.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            closed_by_server(s, left.max(Duration::from_millis(1))),
            "an idle connection is still open after the header timeout"
        );
    }
    drop(idle);
    eventually(
        "the daemon's descriptors to go back down",
        Duration::from_secs(10),
        || (open_fds(pid) <= before + 4).then_some(()),
    );

    // SIGTERM is honoured promptly with a flood open.
    let _flood: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon exits on SIGTERM while 300 connections are open");
    assert!(status.success(), "exit status {status:?}\n{}", d.log());
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn the_idle_timeout_spares_long_polls_and_quiet_streams() {
    let sb = Sandbox::new();
    let d = Daemon::start_with(
        &sb,
        &[],
        &["--api-idle-timeout", "1", "--api-header-timeout", "1"],
    );
    d.create(json!({"name": "quiet", "metadata": {"stub_boot_ms": "3000"}}));
    // A long-poll sends nothing until it answers.
    let t = Instant::now();
    let r = d.call("POST", "/machines/quiet/start", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    // An event stream with nothing to say (keep-alives come every 15 s)
    // outlives the idle timeout and still delivers.
    let text = std::thread::scope(|scope| {
        let stream = scope.spawn(|| {
            d.raw()
                .get(format!("{}/machines/quiet/events", d.url))
                .bearer_auth(&d.key)
                .header("accept", "text/event-stream")
                .send()
                .and_then(|r| r.text())
        });
        std::thread::sleep(Duration::from_secs(3));
        // The stream ends by itself after the `deleted` event.
        d.call("DELETE", "/machines/quiet?force=true", None);
        stream.join().unwrap()
    })
    .expect("the quiet event stream stays open past the idle timeout");
    assert!(text.contains("event: deleted"), "{text}");
}

#[test]
fn the_data_dir_and_its_secrets_are_made_private_at_every_start() {
    let sb = Sandbox::new();
    let dir = sb.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // An empty file is a valid new SQLite database.
    std::fs::write(dir.join("hyperfleet.db"), b"").unwrap();
    std::fs::set_permissions(
        dir.join("hyperfleet.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mode = |name: &str| {
        std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    let d = Daemon::start(&sb);
    assert_eq!(mode(""), 0o700);
    for f in [
        "hyperfleet.db",
        "hyperfleet.db-wal",
        "hyperfleet.db-shm",
        "admin.key",
        "hyperfleet.lock",
    ] {
        assert_eq!(mode(f), 0o600, "{f}");
    }
    drop(d);
    // Loosened while stopped (a restore, a careless chmod): tightened again.
    for (f, m) in [("", 0o755), ("hyperfleet.db", 0o644), ("admin.key", 0o644)] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(m)).unwrap();
    }
    let out = std::process::Command::new(common::bin())
        .args(["--json", "--data-dir"])
        .arg(dir)
        .arg("doctor")
        .output()
        .unwrap();
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "data_dir_modes")
        .unwrap_or_else(|| panic!("doctor has a mode check: {checks}"));
    assert_ne!(check["level"], "ok", "{check}");
    assert!(check["detail"].as_str().unwrap().contains("admin.key"));
    let _d = Daemon::start(&sb);
    assert_eq!(mode(""), 0o700);
    assert_eq!(mode("hyperfleet.db"), 0o600);
    assert_eq!(mode("admin.key"), 0o600);
}

#[test]
fn a_lost_admin_key_is_recovered_on_the_host_while_the_daemon_runs() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    // Operator mistake: the only admin key is gone (deleted file, lost
    // secret); every request is refused.
    std::fs::remove_file(sb.path().join("admin.key")).unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["keys", "create", "--admin", "--data-dir"])
        .arg(sb.path())
        .env_remove("HYPERFLEET_API_KEY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("hf_"), "{key}");
    // The running daemon accepts it at once, with the admin scope.
    let r = d.call_as(&key, "GET", "/keys", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["keys"].as_array().unwrap().len(), 2);
    let r = d.call_as(
        &key,
        "POST",
        "/keys",
        Some(json!({"name": "n", "scopes": ["read"]})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    // A data dir with no database is an error, not a new empty one.
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["keys", "create", "--admin", "--data-dir"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!empty.path().join("hyperfleet.db").exists());
}

/// A tmpfs mounted on a directory, unmounted on drop (also when the test
/// fails), after whatever holds it open was dropped first.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Option<Tmpfs> {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem of `dir` with one file; returns its path.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

#[test]
fn a_full_disk_answers_507_and_health_says_degraded_until_a_write_succeeds() {
    let sb = Sandbox::new();
    let Some(_mount) = Tmpfs::mount(sb.path(), "16m") else {
        assert!(
            !common::present_or_skip(false, "permission to mount a tmpfs (run as root)"),
            "unreachable"
        );
        return;
    };
    let d = Daemon::start_with(&sb, &[], &["--no-proxy"]);
    assert_eq!(d.call("GET", "/health", None).status, 200);
    let filler = fill(sb.path());
    let big = "x".repeat(32 * 1024);
    let body = |i: usize| json!({"name": format!("full-{i}"), "env": {"A": big, "B": big, "C": big, "D": big}});
    // Free pages inside the WAL may take a few writes; then the disk is full.
    let mut full = None;
    for i in 0..200 {
        let r = d.call("POST", "/machines", Some(body(i)));
        match r.status {
            201 => continue,
            507 => {
                full = Some(r);
                break;
            }
            s => panic!("create on a full disk answered {s}: {}", r.body),
        }
    }
    let r = full.unwrap_or_else(|| panic!("no write failed on a full disk\n{}", d.log()));
    assert_eq!(r.code(), "INSUFFICIENT_STORAGE");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("full"),
        "{}",
        r.body
    );
    let h = d.call("GET", "/health", None);
    assert_eq!(h.status, 503, "{}", h.body);
    assert_eq!(h.body["status"], "degraded");
    assert_eq!(h.body["store"]["ok"], false);
    // Space is back: the next write succeeds and health recovers with it.
    std::fs::remove_file(filler).unwrap();
    let r = eventually("a write to succeed", Duration::from_secs(10), || {
        let r = d.call("POST", "/machines", Some(json!({"name": "after"})));
        (r.status != 507).then_some(r)
    });
    assert_eq!(r.status, 201, "{}", r.body);
    let h = d.call("GET", "/health", None);
    assert_eq!(h.status, 200, "{}", h.body);
    drop(d);
}

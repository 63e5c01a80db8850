//! The daemon under hostile or unlucky conditions (issue 13): a flood of
//! idle connections and loose file modes on the data directory.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{eventually, Daemon, Sandbox};

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
            "2",
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
    // /health still answers while they sit there: the header timeout frees
    // the slots they hold.
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
    eprintln!("/health answered after {:?} during the flood", t.elapsed());
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

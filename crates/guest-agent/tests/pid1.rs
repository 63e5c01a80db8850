//! The agent as PID 1, in fresh pid/mount/uts/net namespaces (`unshare`): early mounts,
//! loopback, orphan reaping. Needs root and util-linux `unshare`; skips loudly otherwise.
//!
//! The namespace's init is killed with SIGKILL at the end, never asked to power off.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hyperfleet_agent_proto::{AgentClient, ExecRequest};
use tokio::net::UnixStream;

struct Ns {
    unshare: std::process::Child,
}

impl Ns {
    /// Host pid of the namespace's init (the agent): unshare's only child.
    fn init_pid(&self) -> Option<u32> {
        let p = format!("/proc/{0}/task/{0}/children", self.unshare.id());
        std::fs::read_to_string(p)
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        if let Some(pid) = self.init_pid() {
            // SIGKILL to a pid namespace's init ends the whole namespace.
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
        let _ = self.unshare.wait();
    }
}

fn can_run() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let unshare = Command::new("unshare")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    root && unshare
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_as_pid1_in_a_pid_namespace() {
    if !can_run() {
        eprintln!("SKIPPED agent_as_pid1_in_a_pid_namespace: needs root and unshare(1)");
        return;
    }
    // Not under a path the agent mounts over inside its mount namespace
    // (/tmp, /run, /dev, /proc, /sys): the socket would vanish behind the
    // new mount. The target dir may itself be under /tmp (a CI clone there).
    let target_tmp = env!("CARGO_TARGET_TMPDIR");
    let shadowed = ["/tmp", "/run", "/dev", "/proc", "/sys"]
        .iter()
        .any(|m| target_tmp == *m || target_tmp.starts_with(&format!("{m}/")));
    let base = if shadowed { "/var/tmp" } else { target_tmp };
    let dir = tempfile::tempdir_in(base).unwrap();
    let sock = dir.path().join("agent.sock");
    let unshare = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--uts",
            "--net",
            "--mount-proc",
            "--propagation",
            "private",
        ])
        .arg(&*AGENT)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--log-level")
        .arg(log_level())
        .stdin(Stdio::null())
        // Keep terminal signals (Ctrl-C) away from the namespace's init.
        .process_group(0)
        .spawn()
        .expect("spawn unshare");
    let ns = Ns { unshare };
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "agent socket never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = AgentClient::connect_with(UnixStream::connect(&sock).await.unwrap(), fast_opts())
        .await
        .unwrap();
    assert!(c.agent_info().pid1, "agent should see itself as pid 1");

    // The agent mounted /tmp, /run and friends inside its namespace.
    let out = c
        .exec_collect(
            ExecRequest::new([
                "sh",
                "-c",
                "echo $$; grep -E ' /(tmp|run) ' /proc/self/mounts | cut -d' ' -f2,3",
            ]),
            1 << 16,
        )
        .await
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("/tmp tmpfs"), "{text}");
    assert!(text.contains("/run tmpfs"), "{text}");
    // Loopback is up in the fresh network namespace (sysfs would show the host's, so ask
    // the kernel through netlink with ip(8) when it is installed).
    let out = c
        .exec_collect(ExecRequest::new(["sh", "-c", "command -v ip >/dev/null || { echo no-ip; exit 0; }; ip -o link show; ip -o -4 addr show lo"]), 1 << 16)
        .await
        .unwrap();
    let links = String::from_utf8(out.stdout).unwrap();
    if links.trim() == "no-ip" {
        eprintln!("SKIPPED loopback check: ip(8) not installed");
    } else {
        assert_eq!(
            links.lines().filter(|l| l.contains(": lo:")).count(),
            1,
            "{links}"
        );
        assert!(links.contains("UP"), "{links}");
        assert!(links.contains("127.0.0.1/8"), "{links}");
    }

    // Orphans are re-parented to the agent and reaped: no zombies pile up.
    let out = c
        .exec_collect(
            ExecRequest::new([
                "sh",
                "-c",
                "for i in 1 2 3 4 5; do sleep 0.1 & done; echo started",
            ]),
            1024,
        )
        .await
        .unwrap();
    assert_eq!(out.stdout, b"started\n");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = c
        .exec_collect(
            ExecRequest::new([
                "sh",
                "-c",
                "cat /proc/[0-9]*/stat 2>/dev/null | awk '{print $3}' | grep -c Z || true",
            ]),
            1024,
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "0",
        "zombies left"
    );
    assert!(ns.init_pid().is_some());
}

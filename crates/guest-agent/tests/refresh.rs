//! `refresh` against the real agent binary running as an ordinary process, inside new user,
//! mount, network and UTS namespaces (`unshare`), so it can change "its" hostname, network
//! interface, `/etc` and boot id without touching the host's.
//!
//! Inside the namespaces the agent has no capability over the host's clock and kernel RNG, so
//! those two parts must fail (with `permission_denied`) while every other part succeeds: that
//! is also the check that a failed part does not stop the rest. The real clock and RNG are
//! covered by the QEMU guest test (`tests/qemu.rs`).
//!
//! Needs `unshare` (util-linux), `ip` (iproute2), unprivileged user namespaces and veth.
//! Skips loudly without them; with `CI` set it fails instead.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hyperfleet_agent_proto::{
    AgentClient, Error, ErrorCode, ExecRequest, NetworkIdentity, RefreshReport, RefreshRequest,
    RefreshStepKind as K,
};
use tokio::net::UnixStream;

const SETUP: &str = r#"set -e
ip link add eth0 type veth peer name peer0
ip link set peer0 up
ip addr add 10.9.0.2/24 dev eth0
ip link set eth0 address 52:54:00:00:00:01 up
ip route add default via 10.9.0.1
hostname old-host
mount --bind "$HF_ETC" /etc
if [ -n "$HF_ETC_RO" ]; then mount -o remount,bind,ro /etc; fi
mount -t tmpfs hf-run /run
exec "$HF_AGENT" --listen "unix:$HF_SOCK" --log-level "$HF_LOG_LEVEL"
"#;

/// Whether this host can run the namespaced agent; says why not.
fn namespaces_usable() -> Result<(), String> {
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "--net", "--uts"])
        .args(["sh", "-c", "ip link add t0 type veth peer name t1"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run unshare: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "unshare/ip in new namespaces failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

struct NsAgent {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl NsAgent {
    /// With `etc_read_only`, `/etc` is a read-only mount, like a guest with `hf.rootro=1`.
    fn start(etc_read_only: bool) -> NsAgent {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        std::fs::write(
            etc.join("hosts"),
            "127.0.0.1\tlocalhost\n127.0.1.1\told-host\n",
        )
        .unwrap();
        std::fs::write(etc.join("hostname"), "old-host\n").unwrap();
        std::fs::write(etc.join("machine-id"), "11111111111111111111111111111111\n").unwrap();
        let sock = dir.path().join("agent.sock");
        let child = Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "--net", "--uts"])
            .args(["sh", "-c", SETUP])
            .env("HF_ETC", &etc)
            .env("HF_SOCK", &sock)
            .env("HF_AGENT", &*AGENT)
            .env("HF_LOG_LEVEL", log_level())
            .env("HF_ETC_RO", if etc_read_only { "1" } else { "" })
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn unshare");
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the namespaced agent's socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        NsAgent { child, dir }
    }

    async fn client(&self) -> AgentClient {
        let s = UnixStream::connect(self.dir.path().join("agent.sock"))
            .await
            .unwrap();
        AgentClient::connect_with(s, fast_opts()).await.unwrap()
    }

    fn etc(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("etc").join(name)).unwrap()
    }
}

impl Drop for NsAgent {
    fn drop(&mut self) {
        // `unshare` and `sh` exec'd into the agent: this pid is the agent.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn sh(c: &AgentClient, script: &str) -> String {
    let out = c
        .exec_collect(ExecRequest::new(["sh", "-c", script]), 1 << 16)
        .await
        .unwrap();
    assert_eq!(
        out.exit_code,
        Some(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn kinds(r: &RefreshReport) -> Vec<K> {
    r.steps.iter().map(|s| s.step).collect()
}

fn code(r: &RefreshReport, k: K) -> Option<ErrorCode> {
    r.step(k)
        .unwrap_or_else(|| panic!("no {k} step in {r:?}"))
        .error
        .as_ref()
        .map(|e| e.code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_in_namespaces() {
    if let Err(why) = namespaces_usable() {
        assert!(
            std::env::var_os("CI").is_none(),
            "MISSING: {why}; CI must not skip"
        );
        eprintln!("SKIPPED refresh_in_namespaces: {why}");
        return;
    }
    let agent = NsAgent::start(false);
    let c = agent.client().await;
    let before = c.agent_info().clone();
    assert_eq!(before.hostname, "old-host");
    let link = sh(&c, "ip -o link show eth0").await;
    assert!(link.contains("52:54:00:00:00:01"), "{link}");

    // A running session that the refresh must end.
    let h = c.exec(ExecRequest::new(["sleep", "1000"])).await.unwrap();
    let pid = h.pid();
    assert!(alive(pid));

    let boot_id = hyperfleet_agent_proto::random_boot_id().unwrap();
    let machine_id = hyperfleet_agent_proto::random_machine_id().unwrap();
    let req = RefreshRequest::new_machine()
        .unwrap()
        .network(NetworkIdentity {
            gateway: Some("10.9.0.1".parse().unwrap()),
            mac: Some("52:54:00:aa:bb:cc".parse().unwrap()),
            dns: vec!["10.9.0.53".parse().unwrap()],
            ..NetworkIdentity::new("10.9.0.7".parse().unwrap(), 24)
        })
        .hostname("clone-1")
        .machine_id(machine_id.clone())
        .boot_id(boot_id.clone());
    let t0 = Instant::now();
    let report = c.refresh(req.clone()).await.unwrap();
    eprintln!("refresh took {:?}: {report:#?}", t0.elapsed());
    assert_eq!(
        kinds(&report),
        [
            K::Clock,
            K::Entropy,
            K::Sessions,
            K::Mac,
            K::Address,
            K::Route,
            K::Dns,
            K::Hostname,
            K::MachineId,
            K::BootId
        ]
    );
    // No capability over the host's clock and RNG from a user namespace; everything else
    // went on regardless.
    assert_eq!(code(&report, K::Clock), Some(ErrorCode::PermissionDenied));
    assert_eq!(code(&report, K::Entropy), Some(ErrorCode::PermissionDenied));
    assert_eq!(report.failures().count(), 2, "{report:#?}");
    assert_eq!(report.sessions_dropped, 1);
    assert_eq!(report.boot_id.as_deref(), Some(boot_id.as_str()));

    // The dropped session answered "cancelled" and its process is reaped.
    let e = h.wait().await.unwrap_err();
    assert!(matches!(e, Error::Cancelled), "{e:?}");
    wait_until(
        "the dropped process is gone",
        Duration::from_secs(5),
        || gone(pid),
    )
    .await;

    let link = sh(
        &c,
        "ip -o link show eth0; ip -o -4 addr show eth0; ip route",
    )
    .await;
    assert!(link.contains("link/ether 52:54:00:aa:bb:cc"), "{link}");
    assert!(link.contains("inet 10.9.0.7/24"), "{link}");
    assert!(!link.contains("10.9.0.2/"), "{link}");
    assert!(link.contains("default via 10.9.0.1 dev eth0"), "{link}");
    assert!(link.contains("state UP") || link.contains(",UP"), "{link}");
    assert_eq!(sh(&c, "uname -n").await, "clone-1\n");
    assert_eq!(
        sh(&c, "cat /proc/sys/kernel/random/boot_id").await,
        format!("{boot_id}\n")
    );
    assert_eq!(agent.etc("machine-id"), format!("{machine_id}\n"));
    assert_eq!(agent.etc("hostname"), "clone-1\n");
    assert_eq!(
        agent.etc("hosts"),
        "127.0.0.1\tlocalhost\n127.0.1.1\tclone-1\n"
    );
    assert_eq!(agent.etc("resolv.conf"), "nameserver 10.9.0.53\n");
    // A new connection's hello reports the new identity.
    let c2 = agent.client().await;
    assert_eq!(c2.agent_info().hostname, "clone-1");
    assert_eq!(c2.agent_info().boot_id.as_deref(), Some(boot_id.as_str()));
    assert_ne!(before.boot_id, c2.agent_info().boot_id);
    drop(c2);

    // Twice is safe: the same request again changes nothing and fails nothing new.
    let again = c.refresh(req.stamp_clock()).await.unwrap();
    assert_eq!(kinds(&again), kinds(&report));
    assert_eq!(again.failures().count(), 2, "{again:#?}");
    assert_eq!(again.sessions_dropped, 0);
    assert_eq!(again.boot_id.as_deref(), Some(boot_id.as_str()));
    let link2 = sh(
        &c,
        "ip -o link show eth0; ip -o -4 addr show eth0; ip route",
    )
    .await;
    assert!(link2.contains("inet 10.9.0.7/24") && link2.contains("default via 10.9.0.1"));
    assert_eq!(
        agent.etc("hosts"),
        "127.0.0.1\tlocalhost\n127.0.1.1\tclone-1\n"
    );
    // The bind mount was made once; the second refresh rewrote its file in place.
    let mounts = sh(
        &c,
        "grep -c ' /proc/sys/kernel/random/boot_id ' /proc/self/mountinfo",
    )
    .await;
    assert_eq!(mounts.trim(), "1");

    // A new boot id, again: the same mount shows it.
    let boot_id2 = hyperfleet_agent_proto::random_boot_id().unwrap();
    let r = c
        .refresh(RefreshRequest::default().boot_id(boot_id2.clone()))
        .await
        .unwrap();
    assert!(r.is_ok(), "{r:#?}");
    assert_eq!(r.boot_id.as_deref(), Some(boot_id2.as_str()));

    // The clock-only form after a resume: clock and entropy, nothing else.
    let r = c.refresh(RefreshRequest::resume().unwrap()).await.unwrap();
    assert_eq!(kinds(&r), [K::Clock, K::Entropy]);

    // A missing interface is that part's error, not the request's.
    let r = c
        .refresh(RefreshRequest::default().network(NetworkIdentity {
            iface: "eth9".into(),
            ..NetworkIdentity::new("10.9.0.8".parse().unwrap(), 24)
        }))
        .await
        .unwrap();
    assert_eq!(kinds(&r), [K::Address, K::Route]);
    assert_eq!(code(&r, K::Address), Some(ErrorCode::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_with_a_read_only_etc() {
    if let Err(why) = namespaces_usable() {
        assert!(
            std::env::var_os("CI").is_none(),
            "MISSING: {why}; CI must not skip"
        );
        eprintln!("SKIPPED refresh_with_a_read_only_etc: {why}");
        return;
    }
    let agent = NsAgent::start(true);
    let c = agent.client().await;
    assert!(sh(&c, "touch /etc/x 2>&1 || true")
        .await
        .contains("Read-only"));
    let id = hyperfleet_agent_proto::random_machine_id().unwrap();
    let req = RefreshRequest::default()
        .hostname("ro-1")
        .machine_id(id.clone());
    let r = c.refresh(req).await.unwrap();
    assert!(r.is_ok(), "{r:#?}");
    let detail = &r.step(K::Hostname).unwrap().detail;
    assert!(detail.contains("read-only"), "{detail}");
    assert_eq!(sh(&c, "uname -n").await, "ro-1\n");
    // The id shows through a bind mount; the read-only file underneath is unchanged.
    assert_eq!(sh(&c, "cat /etc/machine-id").await, format!("{id}\n"));
    assert_eq!(
        agent.etc("machine-id"),
        "11111111111111111111111111111111\n"
    );
    // A second id goes through the same mount.
    let id2 = hyperfleet_agent_proto::random_machine_id().unwrap();
    let r = c
        .refresh(RefreshRequest::default().machine_id(id2.clone()))
        .await
        .unwrap();
    assert!(r.is_ok(), "{r:#?}");
    assert_eq!(sh(&c, "cat /etc/machine-id").await, format!("{id2}\n"));
    let mounts = sh(&c, "grep -c ' /etc/machine-id ' /proc/self/mountinfo").await;
    assert_eq!(mounts.trim(), "1");
}

//! Test harness: runs the real `hyperfleet-agent` binary as a child process.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyperfleet_agent_proto::{AgentClient, ConnectOptions};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::UnixStream;

/// The agent under test: the debug build, or `HF_AGENT_BIN` (e.g. the static release binary).
pub(crate) static AGENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::env::var("HF_AGENT_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_hyperfleet-agent").to_string())
});

/// Log level for agents under test; `HF_TEST_LOG=debug` to see everything.
pub(crate) fn log_level() -> String {
    std::env::var("HF_TEST_LOG").unwrap_or_else(|_| "error".into())
}

/// An agent listening on a unix socket in a temporary directory.
pub(crate) struct Agent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
}

impl Agent {
    pub(crate) fn start() -> Agent {
        Agent::start_with_stderr(Stdio::inherit())
    }

    /// An agent whose stderr (its "console") goes to `stderr`.
    pub(crate) fn start_with_stderr(stderr: Stdio) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("agent.sock");
        let child = Command::new(&*AGENT)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--log-level")
            .arg(log_level())
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn agent");
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "agent socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Agent { child, dir, sock }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    pub(crate) async fn client(&self) -> AgentClient {
        let s = UnixStream::connect(&self.sock).await.expect("connect");
        AgentClient::connect_with(s, fast_opts())
            .await
            .expect("handshake")
    }

    /// Peak resident set size of the agent process, in KiB.
    pub(crate) fn vm_hwm_kib(&self) -> u64 {
        status_field(self.pid(), "VmHWM:").expect("VmHWM")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn fast_opts() -> ConnectOptions {
    ConnectOptions {
        handshake_timeout: Duration::from_secs(10),
        retry_interval: Duration::from_millis(200),
        ..ConnectOptions::default()
    }
}

pub(crate) fn status_field(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Whether a process exists and is not a zombie.
pub(crate) fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // The state follows the parenthesised command name.
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

/// Whether /proc/<pid> is entirely gone (reaped).
pub(crate) fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

pub(crate) async fn wait_until(what: &str, max: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < max, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deterministic pseudo-random bytes, hashed as they are produced.
pub(crate) struct Gen {
    remaining: u64,
    state: u64,
    pub hasher: Sha256,
}

impl Gen {
    pub(crate) fn new(len: u64, seed: u64) -> Gen {
        Gen {
            remaining: len,
            state: seed | 1,
            hasher: Sha256::new(),
        }
    }

    pub(crate) fn digest(self) -> [u8; 32] {
        self.hasher.finalize().into()
    }
}

impl AsyncRead for Gen {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let n = (buf.remaining() as u64).min(this.remaining).min(256 * 1024) as usize;
        let mut out = vec![0u8; n];
        for chunk in out.chunks_mut(8) {
            // xorshift64
            this.state ^= this.state << 13;
            this.state ^= this.state >> 7;
            this.state ^= this.state << 17;
            let b = this.state.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        this.hasher.update(&out);
        this.remaining -= n as u64;
        buf.put_slice(&out);
        Poll::Ready(Ok(()))
    }
}

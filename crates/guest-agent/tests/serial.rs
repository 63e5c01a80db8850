//! The agent on one long-lived byte stream (`--stdio`), like a virtio-serial port that outlives
//! host connections: garbage, half frames and host reconnects must not need a reboot.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use hyperfleet_agent_proto::{
    AgentClient, AgentInfo, ExecEvent, ExecRequest, Frame, FrameDecoder, Kind, HEADER_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// A serial line to an agent: the agent's stdin/stdout, to which hosts attach and detach.
struct Line {
    child: Child,
    stdin: Arc<Mutex<ChildStdin>>,
    stdout: Arc<Mutex<ChildStdout>>,
}

/// One host attachment: two relay tasks between a duplex pipe and the line.
struct Attachment {
    tasks: [JoinHandle<()>; 2],
}

impl Attachment {
    /// Drops the host abruptly: whatever was in flight is cut, possibly mid-frame.
    fn cut(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

impl Line {
    fn start() -> Line {
        let mut child = Command::new(&*AGENT)
            .arg("--stdio")
            .arg("--log-level")
            .arg(log_level())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn agent");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        Line {
            child,
            stdin: Arc::new(Mutex::new(stdin)),
            stdout: Arc::new(Mutex::new(stdout)),
        }
    }

    fn attach(&self) -> (DuplexStream, Attachment) {
        let (host, line_end) = tokio::io::duplex(64 * 1024);
        let (mut from_host, mut to_host) = tokio::io::split(line_end);
        let stdin = self.stdin.clone();
        let stdout = self.stdout.clone();
        let up = tokio::spawn(async move {
            let mut w = stdin.lock().await;
            let mut buf = vec![0u8; 4096];
            // Small pieces, so a cut is likely to leave a half frame behind.
            while let Ok(n) = from_host.read(&mut buf).await {
                if n == 0 || w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                let _ = w.flush().await;
            }
        });
        let down = tokio::spawn(async move {
            let mut r = stdout.lock().await;
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 || to_host.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        (host, Attachment { tasks: [up, down] })
    }

    async fn write_raw(&self, bytes: &[u8]) {
        let mut w = self.stdin.lock().await;
        w.write_all(bytes).await.unwrap();
        w.flush().await.unwrap();
    }

    async fn connect(&self) -> (AgentClient, Attachment) {
        let (host, att) = self.attach();
        let c = AgentClient::connect_with(host, fast_opts())
            .await
            .expect("handshake over the serial line");
        (c, att)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_sent_on_start() {
    let line = Line::start();
    let mut r = line.stdout.lock().await;
    let mut dec = FrameDecoder::resyncing();
    let mut buf = BytesMut::new();
    let frame = loop {
        if let Some(f) = dec.decode(&mut buf).unwrap() {
            break f;
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), r.read(&mut chunk))
            .await
            .expect("ready within 10 s")
            .unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
    };
    assert_eq!(frame.kind, Kind::Ready);
    assert_eq!(frame.stream, 0);
    let info: AgentInfo = serde_json::from_slice(&frame.payload).unwrap();
    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
    // Nothing before the sync marker: a fresh stream.
    assert_eq!(dec.discarded(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_then_hello_works() {
    let line = Line::start();
    line.write_raw(b"\x00\x01 this is not a frame HF\x07\x00 \xff\xfe trailing junk")
        .await;
    let (c, _att) = line.connect().await;
    c.ping().await.unwrap();
    let out = c
        .exec_collect(ExecRequest::new(["echo", "hi"]), 1024)
        .await
        .unwrap();
    assert_eq!(out.stdout, b"hi\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_frame_then_new_hello_works() {
    let line = Line::start();
    // A first host leaves the agent at a frame boundary ...
    let (c, att) = line.connect().await;
    c.ping().await.unwrap();
    drop(c);
    att.cut();
    // ... then a frame header promising 50 000 bytes, of which only 300 ever arrive.
    let f = Frame::new(Kind::Data, 1, vec![0xAAu8; 50_000]);
    let bytes = f.to_bytes().unwrap();
    line.write_raw(&bytes[..HEADER_LEN + 300]).await;
    // The next host's first hello disappears into that frame; the flushed retry gets through.
    let (c, _att) = line.connect().await;
    c.ping().await.unwrap();
    let out = c
        .exec_collect(ExecRequest::new(["sh", "-c", "echo recovered"]), 1024)
        .await
        .unwrap();
    assert_eq!(out.stdout, b"recovered\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_reconnect_mid_stream_on_the_same_line() {
    let line = Line::start();
    let (c, att) = line.connect().await;
    let mut h = c
        .exec(ExecRequest::new([
            "sh",
            "-c",
            "while true; do head -c 3000 /dev/zero; sleep 0.01; done",
        ]))
        .await
        .unwrap();
    let pid = h.pid();
    // Let output flow, then cut the host in the middle of it.
    for _ in 0..3 {
        assert!(matches!(
            h.next_event().await.unwrap(),
            Some(ExecEvent::Stdout(_))
        ));
    }
    att.cut();
    drop(h);
    drop(c);
    // The agent still has the old session: the line stays open (no EOF on a serial port).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(alive(pid));

    // A new host: the new hello resets the session, which kills the old command.
    let (c, _att) = line.connect().await;
    wait_until(
        "the old session's command is killed",
        Duration::from_secs(3),
        || gone(pid),
    )
    .await;
    for i in 0..3 {
        let out = c
            .exec_collect(
                ExecRequest::new(["sh", "-c", "echo $0"]).env("X", "1"),
                1024,
            )
            .await
            .unwrap();
        assert_eq!(out.exit_code, Some(0), "round {i}");
    }
    c.ping().await.unwrap();
    assert!(line.child.id().is_some());
}

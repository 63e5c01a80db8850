//! Tests of the client against a scripted agent on an in-memory stream.

use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::frame::{FrameDecoder, CHUNK_SIZE};
use crate::refresh::*;

fn info() -> AgentInfo {
    AgentInfo {
        agent_version: "test".into(),
        min_protocol_version: 1,
        max_protocol_version: 1,
        kernel_release: "6.1".into(),
        kernel_version: String::new(),
        machine: "x86_64".into(),
        hostname: String::new(),
        uptime_ms: 1,
        pid1: false,
        boot_id: None,
    }
}

async fn next_frame(s: &mut DuplexStream, dec: &mut FrameDecoder, buf: &mut BytesMut) -> Frame {
    loop {
        if let Ok(Some(f)) = dec.decode(buf) {
            return f;
        }
        let n = s.read_buf(buf).await.unwrap();
        assert!(n > 0, "host closed");
    }
}

async fn write(s: &mut DuplexStream, f: Frame) {
    s.write_all(&f.to_bytes().unwrap()).await.unwrap();
}

fn json(kind: Kind, stream: u32, v: &impl serde::Serialize) -> Frame {
    Frame::new(kind, stream, serde_json::to_vec(v).unwrap())
}

/// A scripted agent: answers the hello with `version`, after writing some stale bytes.
type Scripted = JoinHandle<(DuplexStream, FrameDecoder, BytesMut)>;

async fn fake_agent(version: Option<u32>) -> (DuplexStream, Scripted) {
    let (host, mut agent) = tokio::io::duplex(1 << 20);
    // Stale output of an earlier session: must be ignored by the handshake.
    write(&mut agent, Frame::new(Kind::Stdout, 1, &b"old"[..])).await;
    agent.write_all(b"\x01\x02garbage").await.unwrap();
    write(
        &mut agent,
        json(
            Kind::HelloReply,
            0,
            &HelloReply {
                nonce: 12345,
                protocol_version: Some(1),
                error: None,
                agent: info(),
            },
        ),
    )
    .await;
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    let task = tokio::spawn(async move {
        let f = next_frame(&mut agent, &mut dec, &mut buf).await;
        assert_eq!(f.kind, Kind::Hello);
        let h: Hello = serde_json::from_slice(&f.payload).unwrap();
        let reply = HelloReply {
            nonce: h.nonce,
            protocol_version: version,
            error: version.is_none().then(|| "no overlap".to_string()),
            agent: info(),
        };
        write(&mut agent, json(Kind::HelloReply, 0, &reply)).await;
        (agent, dec, buf)
    });
    (host, task)
}

#[tokio::test]
async fn handshake_ignores_stale_bytes_and_checks_version() {
    let (host, task) = fake_agent(Some(1)).await;
    let c = AgentClient::connect(host).await.unwrap();
    let (mut agent, mut dec, mut buf) = task.await.unwrap();
    assert_eq!(c.protocol_version(), 1);
    assert_eq!(c.agent_info().agent_version, "test");
    // A ping round trip through the scripted agent.
    let ping = tokio::spawn({
        let c = c.clone();
        async move { c.ping().await }
    });
    let f = next_frame(&mut agent, &mut dec, &mut buf).await;
    assert_eq!(f.kind, Kind::Request);
    let req: Request = serde_json::from_slice(&f.payload).unwrap();
    assert_eq!(req, Request::Ping);
    write(
        &mut agent,
        json(
            Kind::Response,
            f.stream,
            &Response::Ok(Reply::Pong { uptime_ms: 5 }),
        ),
    )
    .await;
    ping.await.unwrap().unwrap();

    let (host, _task) = fake_agent(None).await;
    let e = AgentClient::connect(host).await.err().unwrap();
    assert!(matches!(e, Error::VersionMismatch { .. }), "{e:?}");
}

#[tokio::test]
async fn handshake_times_out_and_retries_with_flush() {
    let (host, mut agent) = tokio::io::duplex(4 << 20);
    let opts = ConnectOptions {
        handshake_timeout: Duration::from_millis(300),
        retry_interval: Duration::from_millis(100),
        ..ConnectOptions::default()
    };
    let e = AgentClient::connect_with(host, opts).await.err().unwrap();
    assert!(matches!(e, Error::HandshakeTimeout(_)), "{e:?}");
    // What the silent agent received: hellos, and one flush of zeros before the retries.
    let mut got = Vec::new();
    agent.read_to_end(&mut got).await.unwrap();
    let zeros = got.iter().filter(|b| **b == 0).count();
    assert!(zeros >= FLUSH_LEN, "{zeros}");
    let mut dec = FrameDecoder::new();
    let mut b = BytesMut::from(&got[..]);
    let mut hellos = 0;
    loop {
        match dec.decode(&mut b) {
            Ok(Some(f)) => {
                assert_eq!(f.kind, Kind::Hello);
                hellos += 1;
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    assert!(hellos >= 2, "{hellos}");
}

#[tokio::test]
async fn data_beyond_credit_closes_the_connection() {
    let (host, task) = fake_agent(Some(1)).await;
    let c = AgentClient::connect(host).await.unwrap();
    let (mut agent, mut dec, mut buf) = task.await.unwrap();
    let reader = tokio::spawn({
        let c = c.clone();
        async move { c.read_file("/f", None).await.map(|_| ()) }
    });
    let f = next_frame(&mut agent, &mut dec, &mut buf).await;
    write(
        &mut agent,
        json(
            Kind::Event,
            f.stream,
            &Event::Opened {
                size: 1 << 30,
                offset: 0,
                length: 1 << 30,
            },
        ),
    )
    .await;
    reader.await.unwrap().unwrap();
    // The reader was dropped (cancel sent), but a misbehaving agent keeps sending on a
    // fresh stream beyond the window; the client must refuse rather than buffer.
    let reader2 = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut r = c.read_file("/g", None).await?;
            tokio::time::sleep(Duration::from_secs(5)).await;
            r.next_chunk().await
        })
    };
    let id = loop {
        let f = next_frame(&mut agent, &mut dec, &mut buf).await;
        if f.kind == Kind::Request {
            break f.stream;
        }
    };
    write(
        &mut agent,
        json(
            Kind::Event,
            id,
            &Event::Opened {
                size: 1 << 30,
                offset: 0,
                length: 1 << 30,
            },
        ),
    )
    .await;
    for _ in 0..(INITIAL_WINDOW as usize / CHUNK_SIZE + 1) {
        write(
            &mut agent,
            Frame::new(Kind::Data, id, vec![0u8; CHUNK_SIZE]),
        )
        .await;
    }
    let t0 = Instant::now();
    while !c.is_closed() {
        assert!(t0.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reader2.abort();
    assert!(matches!(c.ping().await, Err(Error::Closed)));
}

#[tokio::test]
async fn refresh_round_trip_and_old_agents() {
    let (host, task) = fake_agent(Some(2)).await;
    let c = AgentClient::connect(host).await.unwrap();
    let (mut agent, mut dec, mut buf) = task.await.unwrap();
    assert_eq!(c.protocol_version(), 2);
    let req = RefreshRequest::new_machine()
        .unwrap()
        .network(NetworkIdentity {
            gateway: Some(std::net::Ipv4Addr::new(10, 0, 2, 2)),
            mac: Some("52:54:00:00:00:09".parse().unwrap()),
            ..NetworkIdentity::new(std::net::Ipv4Addr::new(10, 0, 2, 9), 24)
        })
        .hostname("vm9")
        .machine_id(crate::refresh::random_machine_id().unwrap())
        .boot_id(crate::refresh::random_boot_id().unwrap());
    let call = tokio::spawn({
        let c = c.clone();
        let req = req.clone();
        async move { c.refresh(req).await }
    });
    let f = next_frame(&mut agent, &mut dec, &mut buf).await;
    assert_eq!(f.kind, Kind::Request);
    assert_eq!(
        serde_json::from_slice::<Request>(&f.payload).unwrap(),
        Request::Refresh(req)
    );
    let report = RefreshReport {
        steps: vec![RefreshStep {
            step: RefreshStepKind::Clock,
            error: None,
            detail: "clock moved by +0.001 s".into(),
        }],
        boot_id: Some("x".into()),
        clock_step_ns: Some(1_000_000),
        sessions_dropped: 2,
        duration_ms: 3,
    };
    write(
        &mut agent,
        json(
            Kind::Response,
            f.stream,
            &Response::Ok(Reply::Refreshed(report.clone())),
        ),
    )
    .await;
    assert_eq!(call.await.unwrap().unwrap(), report);

    // Invalid requests never leave the host.
    let e = c
        .refresh(RefreshRequest::default().hostname("no spaces"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");

    // An agent of protocol version 1 is not asked.
    let (host, task) = fake_agent(Some(1)).await;
    let c = AgentClient::connect(host).await.unwrap();
    let _agent = task.await.unwrap();
    let e = c
        .refresh(RefreshRequest::resume().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::AgentTooOld {
                needed: 2,
                negotiated: 1,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.remote_code(), Some(ErrorCode::Unsupported));
}

#[tokio::test]
async fn start_main_round_trip_and_old_agents() {
    let (host, task) = fake_agent(Some(3)).await;
    let c = AgentClient::connect(host).await.unwrap();
    let (mut agent, mut dec, mut buf) = task.await.unwrap();
    let req = MainProcessRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), "exit 3".into()],
        env: [("PATH".to_string(), "/bin".to_string())].into(),
        cwd: Some("/srv".into()),
        user: Some("app".into()),
    };
    let call = tokio::spawn({
        let c = c.clone();
        let req = req.clone();
        async move { c.start_main(req).await }
    });
    let f = next_frame(&mut agent, &mut dec, &mut buf).await;
    assert_eq!(f.kind, Kind::Request);
    let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
    assert_eq!(v["op"], "start_main");
    assert_eq!(
        serde_json::from_value::<Request>(v).unwrap(),
        Request::StartMain(req)
    );
    let started = MainStarted {
        pid: Some(42),
        already: false,
    };
    write(
        &mut agent,
        json(
            Kind::Response,
            f.stream,
            &Response::Ok(Reply::MainStarted(started.clone())),
        ),
    )
    .await;
    assert_eq!(call.await.unwrap().unwrap(), started);
    // An empty command never leaves the host.
    let e = c
        .start_main(MainProcessRequest::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");

    // An agent of protocol version 2 is not asked.
    let (host, task) = fake_agent(Some(2)).await;
    let c = AgentClient::connect(host).await.unwrap();
    let _agent = task.await.unwrap();
    let e = c
        .start_main(MainProcessRequest {
            argv: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::AgentTooOld {
                needed: 3,
                negotiated: 2,
                ..
            }
        ),
        "{e:?}"
    );
}

//! End-to-end tests: the real agent binary on a unix socket, driven by the real host client.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hyperfleet_agent_proto::{
    ByteRange, Error, ErrorCode, ExecEvent, ExecRequest, FileKind, WriteOptions, PROTOCOL_VERSION,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_ping_and_uname() {
    let agent = Agent::start();
    let c = agent.client().await;
    assert_eq!(c.protocol_version(), PROTOCOL_VERSION);
    let info = c.agent_info();
    assert!(!info.kernel_release.is_empty());
    assert!(!info.pid1);
    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
    let rtt = c.ping().await.unwrap();
    assert!(rtt < Duration::from_secs(1));

    let out = c
        .exec_collect(ExecRequest::new(["uname", "-a"]), MIB)
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(out.signal, None);
    assert!(!out.timed_out && !out.truncated);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("Linux "), "{text:?}");
    assert!(text.contains(&info.kernel_release));
    assert!(out.stderr.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_code_and_stderr() {
    let agent = Agent::start();
    let c = agent.client().await;
    let out = c
        .exec_collect(
            ExecRequest::new(["sh", "-c", "echo out; echo err >&2; exit 3"]),
            MIB,
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    // Killed by a signal.
    let out = c
        .exec_collect(ExecRequest::new(["sh", "-c", "kill -TERM $$"]), MIB)
        .await
        .unwrap();
    assert_eq!(out.exit_code, None);
    assert_eq!(out.signal, Some(libc_sigterm()));
}

fn libc_sigterm() -> i32 {
    15
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_program_and_bad_cwd() {
    let agent = Agent::start();
    let c = agent.client().await;
    let e = c
        .exec(ExecRequest::new(["/no/such/program"]))
        .await
        .err()
        .expect("must fail");
    assert!(e.is_not_found(), "{e:?}");
    let e = c
        .exec(ExecRequest::new(["no-such-program-on-path"]))
        .await
        .err()
        .expect("must fail");
    assert!(e.is_not_found(), "{e:?}");
    let e = c
        .exec(ExecRequest::new(["true"]).cwd("/no/such/dir"))
        .await
        .err()
        .expect("must fail");
    assert!(e.is_not_found(), "{e:?}");
    assert!(matches!(
        c.exec(ExecRequest::new(Vec::<String>::new())).await,
        Err(Error::InvalidRequest(_))
    ));
    // The connection is still fine.
    c.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_process_group() {
    let agent = Agent::start();
    let c = agent.client().await;

    // Plain sleep.
    let t0 = Instant::now();
    let h = c
        .exec(ExecRequest::new(["sleep", "10"]).timeout_ms(300))
        .await
        .unwrap();
    let pid = h.pid();
    let st = h.wait().await.unwrap();
    assert!(st.timed_out);
    assert_eq!(st.signal, Some(9));
    assert_eq!(st.exit_code, None);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // Reaped before the answer was sent.
    assert!(gone(pid), "pid {pid} still exists");

    // A shell with a background child: the whole group dies.
    let out = c
        .exec_collect(
            ExecRequest::new(["sh", "-c", "sleep 10 & echo $!; wait"]).timeout_ms(300),
            MIB,
        )
        .await
        .unwrap();
    assert!(out.timed_out);
    let bg: u32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until("background sleep is gone", Duration::from_secs(3), || {
        gone(bg)
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_cwd_and_stdin() {
    let agent = Agent::start();
    let c = agent.client().await;
    let dir = agent.dir.path().to_string_lossy().into_owned();
    let out = c
        .exec_collect_with_stdin(
            ExecRequest::new(["sh", "-c", "echo $FOO; pwd; cat; echo done"])
                .env("FOO", "bar baz")
                .cwd(&dir),
            Some(&b"line one\nline two\n"[..]),
            MIB,
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("bar baz\n{dir}\nline one\nline two\ndone\n")
    );

    // clear_env leaves only what the request sets.
    let mut req = ExecRequest::new(["/usr/bin/env"]).env("ONLY", "1");
    req.clear_env = true;
    let out = c.exec_collect(req, MIB).await.unwrap();
    assert_eq!(out.stdout, b"ONLY=1\n");

    // Interactive stdin through the handle: write, read the echo, close.
    let mut h = c.exec(ExecRequest::new(["cat"]).stdin(true)).await.unwrap();
    let mut stdin = h.take_stdin().unwrap();
    stdin.write(&b"ping\n"[..]).await.unwrap();
    match h.next_event().await.unwrap() {
        Some(ExecEvent::Stdout(b)) => assert_eq!(&b[..], b"ping\n"),
        other => panic!("unexpected {other:?}"),
    }
    stdin.close();
    let st = h.wait().await.unwrap();
    assert_eq!(st.exit_code, Some(0));

    // Large stdin through cat comes back intact (flow control both ways at once).
    let mut gen = Gen::new(8 * MIB as u64, 7);
    let out = c
        .exec_collect_with_stdin(ExecRequest::new(["cat"]), Some(&mut gen), 16 * MIB)
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(out.stdout.len(), 8 * MIB);
    assert_eq!(<[u8; 32]>::from(Sha256::digest(&out.stdout)), gen.digest());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_streams_while_running() {
    let agent = Agent::start();
    let c = agent.client().await;
    let t0 = Instant::now();
    let mut h = c
        .exec(ExecRequest::new([
            "sh",
            "-c",
            "echo first; sleep 2; echo second",
        ]))
        .await
        .unwrap();
    let first = h.next_event().await.unwrap().unwrap();
    assert_eq!(first, ExecEvent::Stdout("first\n".into()));
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    assert!(alive(h.pid()), "process should still be running");
    let second = h.next_event().await.unwrap().unwrap();
    assert_eq!(second, ExecEvent::Stdout("second\n".into()));
    assert!(
        matches!(h.next_event().await.unwrap(), Some(ExecEvent::Exit(st)) if st.exit_code == Some(0))
    );
    assert_eq!(h.next_event().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_cap_reports_truncation() {
    let agent = Agent::start();
    let c = agent.client().await;
    let out = c
        .exec_collect(
            ExecRequest::new(["sh", "-c", "head -c 1000000 /dev/zero; echo tail >&2"]),
            1000,
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(out.stdout.len(), 1000);
    assert_eq!(out.stderr, b"tail\n");
    assert!(out.truncated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_execs() {
    let agent = Agent::start();
    let c = agent.client().await;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let out = c
                .exec_collect(
                    ExecRequest::new(["sh", "-c", "sleep 0.5; echo $N; echo e$N >&2"])
                        .env("N", i.to_string()),
                    MIB,
                )
                .await
                .unwrap();
            assert_eq!(out.exit_code, Some(0));
            assert_eq!(out.stdout, format!("{i}\n").into_bytes());
            assert_eq!(out.stderr, format!("e{i}\n").into_bytes());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Serially this would take 6 s.
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_process() {
    let agent = Agent::start();
    let c = agent.client().await;
    let mut h = c.exec(ExecRequest::new(["sleep", "30"])).await.unwrap();
    let pid = h.pid();
    assert!(alive(pid));
    // A concurrent exec is unaffected by the cancel.
    let other = c
        .exec(ExecRequest::new(["sh", "-c", "sleep 0.5; echo ok"]))
        .await
        .unwrap();
    h.cancel().unwrap();
    assert!(matches!(h.next_event().await, Err(Error::Cancelled)));
    assert!(gone(pid), "pid {pid} still exists after cancel");
    let st = other.wait().await.unwrap();
    assert_eq!(st.exit_code, Some(0));

    // Dropping the handle cancels too.
    let h = c.exec(ExecRequest::new(["sleep", "30"])).await.unwrap();
    let pid = h.pid();
    drop(h);
    wait_until("dropped exec is killed", Duration::from_secs(3), || {
        gone(pid)
    })
    .await;

    // A cancelled exec_collect (its future dropped) also kills the process.
    let r = tokio::time::timeout(
        Duration::from_millis(300),
        c.exec_collect(
            ExecRequest::new(["sh", "-c", "echo $$ > /dev/stderr; sleep 30"]),
            MIB,
        ),
    )
    .await;
    r.expect_err("a 30 s command cannot finish within the 300 ms timeout");
    c.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_file_round_trip_in_bounded_memory() {
    let agent = Agent::start();
    let c = agent.client().await;
    let size = 64 * MIB as u64;
    let path = agent.path("sub/dir/big.bin");
    let hwm_before = agent.vm_hwm_kib();

    let mut gen = Gen::new(size, 42);
    let t0 = Instant::now();
    let written = c
        .write_file(
            &path,
            WriteOptions {
                create_dirs: true,
                mode: Some(0o600),
                ..WriteOptions::default()
            },
            &mut gen,
        )
        .await
        .unwrap();
    let write_time = t0.elapsed();
    assert_eq!(written, size);
    let want = gen.digest();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), size);

    let t0 = Instant::now();
    let mut r = c.read_file(&path, None).await.unwrap();
    assert_eq!(r.file_size(), size);
    assert_eq!(r.len(), size);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    let read_time = t0.elapsed();
    assert_eq!(total, size);
    assert_eq!(<[u8; 32]>::from(hasher.finalize()), want);

    let hwm = agent.vm_hwm_kib();
    eprintln!(
        "64 MiB: write {write_time:?}, read {read_time:?}; agent VmHWM {hwm_before} KiB before, {hwm} KiB after"
    );
    // Well under the file size: the agent never holds more than a few windows of data.
    assert!(hwm < 24 * 1024, "agent VmHWM {hwm} KiB");

    let st = c.stat(&path).await.unwrap();
    assert_eq!(st.size, size);
    assert_eq!(st.mode, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_append_and_chunks() {
    let agent = Agent::start();
    let c = agent.client().await;
    let path = agent.path("r.txt");
    c.write_file(&path, WriteOptions::default(), &b"0123456789"[..])
        .await
        .unwrap();
    c.write_file(
        &path,
        WriteOptions {
            append: true,
            ..WriteOptions::default()
        },
        &b"abcdef"[..],
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"0123456789abcdef");

    let read = |range| {
        let c = c.clone();
        let path = path.clone();
        async move {
            let mut r = c.read_file(&path, range).await.unwrap();
            let mut v = Vec::new();
            r.read_to_end(&mut v).await.unwrap();
            (r.offset(), r.len(), v)
        }
    };
    assert_eq!(
        read(Some(ByteRange {
            offset: 5,
            length: Some(4)
        }))
        .await,
        (5, 4, b"5678".to_vec())
    );
    assert_eq!(
        read(Some(ByteRange {
            offset: 12,
            length: None
        }))
        .await,
        (12, 4, b"cdef".to_vec())
    );
    assert_eq!(
        read(Some(ByteRange {
            offset: 100,
            length: Some(3)
        }))
        .await,
        (16, 0, Vec::new())
    );
    // Truncating write replaces the contents.
    c.write_file(&path, WriteOptions::default(), &b"new"[..])
        .await
        .unwrap();
    let mut r = c.read_file(&path, None).await.unwrap();
    assert_eq!(r.next_chunk().await.unwrap().unwrap(), "new");
    assert_eq!(r.next_chunk().await.unwrap(), None);
    // Empty file.
    c.write_file(&path, WriteOptions::default(), &b""[..])
        .await
        .unwrap();
    assert_eq!(read(None).await, (0, 0, Vec::new()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_list_remove_mkdir() {
    let agent = Agent::start();
    let c = agent.client().await;
    let base = agent.path("tree");
    c.mkdir(&format!("{base}/a/b"), true, Some(0o750))
        .await
        .unwrap();
    // -p on an existing directory is fine; without -p it is not.
    c.mkdir(&format!("{base}/a/b"), true, None).await.unwrap();
    let e = c
        .mkdir(&format!("{base}/a/b"), false, None)
        .await
        .unwrap_err();
    assert_eq!(e.remote_code(), Some(ErrorCode::AlreadyExists), "{e}");
    let e = c
        .mkdir(&format!("{base}/x/y"), false, None)
        .await
        .unwrap_err();
    assert!(e.is_not_found());

    let st = c.stat(&format!("{base}/a/b")).await.unwrap();
    assert_eq!(st.kind, FileKind::Dir);
    assert_eq!(st.mode, 0o750);

    for name in ["one.txt", "two.txt"] {
        c.write_file(
            &format!("{base}/a/b/{name}"),
            WriteOptions::default(),
            &b"hello"[..],
        )
        .await
        .unwrap();
    }
    std::os::unix::fs::symlink("one.txt", format!("{base}/a/b/link")).unwrap();
    let mut entries = c.list(&format!("{base}/a/b")).await.unwrap();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let names: Vec<_> = entries
        .iter()
        .map(|e| (e.name.as_str(), e.kind, e.size))
        .collect();
    assert_eq!(
        names,
        vec![
            ("link", FileKind::Symlink, 7),
            ("one.txt", FileKind::File, 5),
            ("two.txt", FileKind::File, 5)
        ]
    );
    let st = c
        .stat_with(&format!("{base}/a/b/link"), true)
        .await
        .unwrap();
    assert_eq!(st.kind, FileKind::Symlink);
    assert_eq!(st.symlink_target.as_deref(), Some("one.txt"));
    let st = c.stat(&format!("{base}/a/b/link")).await.unwrap();
    assert_eq!((st.kind, st.size), (FileKind::File, 5));

    // Big directories arrive in several batches.
    let many = format!("{base}/many");
    std::fs::create_dir(&many).unwrap();
    for i in 0..1000 {
        std::fs::write(format!("{many}/f{i}"), b"").unwrap();
    }
    assert_eq!(c.list(&many).await.unwrap().len(), 1000);

    let e = c.remove(&format!("{base}/a"), false).await.unwrap_err();
    assert_eq!(e.remote_code(), Some(ErrorCode::DirectoryNotEmpty), "{e}");
    c.remove(&format!("{base}/a/b/one.txt"), false)
        .await
        .unwrap();
    c.remove(&format!("{base}/a"), true).await.unwrap();
    let e = c.stat(&format!("{base}/a")).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(c
        .remove(&format!("{base}/a"), true)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(c
        .list(&format!("{base}/nope"))
        .await
        .unwrap_err()
        .is_not_found());
    assert!(c
        .read_file(&format!("{base}/nope"), None)
        .await
        .err()
        .unwrap()
        .is_not_found());
    let e = c.read_file(&base, None).await.err().unwrap();
    assert_eq!(e.remote_code(), Some(ErrorCode::IsADirectory));
    let e = c
        .write_file(
            &format!("{base}/no/parent/f"),
            WriteOptions::default(),
            &b"x"[..],
        )
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_transfers_and_slow_readers() {
    let agent = Agent::start();
    let c = agent.client().await;
    let path = agent.path("f.bin");
    c.write_file(&path, WriteOptions::default(), Gen::new(8 * MIB as u64, 1))
        .await
        .unwrap();
    // Open a download and never read it: the agent stops at the window instead of buffering.
    let r = c.read_file(&path, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Everything else keeps working meanwhile.
    c.ping().await.unwrap();
    drop(r); // cancels
    let mut r = c.read_file(&path, None).await.unwrap();
    let mut first = vec![0u8; 1000];
    r.read_exact(&mut first).await.unwrap();
    drop(r);
    // An upload whose source fails is aborted.
    struct Failing(u32);
    impl tokio::io::AsyncRead for Failing {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.0 += 1;
            if self.0 > 3 {
                return std::task::Poll::Ready(Err(std::io::Error::other("disk on fire")));
            }
            buf.put_slice(&[1u8; 1000]);
            std::task::Poll::Ready(Ok(()))
        }
    }
    let e = c
        .write_file(&agent.path("g.bin"), WriteOptions::default(), Failing(0))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Source(_)), "{e:?}");
    c.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_mid_stream_keeps_working() {
    let agent = Agent::start();
    let path = agent.path("big.bin");
    {
        let c = agent.client().await;
        c.write_file(&path, WriteOptions::default(), Gen::new(16 * MIB as u64, 3))
            .await
            .unwrap();
    }
    let c1 = agent.client().await;
    let mut h = c1
        .exec(ExecRequest::new([
            "sh",
            "-c",
            "while true; do echo tick; sleep 0.05; done",
        ]))
        .await
        .unwrap();
    let pid = h.pid();
    assert!(matches!(
        h.next_event().await.unwrap(),
        Some(ExecEvent::Stdout(_))
    ));
    let mut r = c1.read_file(&path, None).await.unwrap();
    let mut buf = vec![0u8; 100_000];
    r.read_exact(&mut buf).await.unwrap();
    // An upload in flight, too.
    let c1b = c1.clone();
    let up_path = agent.path("partial.bin");
    let upload = tokio::spawn(async move {
        let _ = c1b
            .write_file(&up_path, WriteOptions::default(), Gen::new(1 << 40, 9))
            .await;
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Abruptly drop the host side: tasks, handles, socket.
    upload.abort();
    drop(h);
    drop(r);
    drop(c1);
    wait_until(
        "the orphaned command is killed",
        Duration::from_secs(3),
        || gone(pid),
    )
    .await;

    let c2 = agent.client().await;
    c2.ping().await.unwrap();
    let out = c2
        .exec_collect(ExecRequest::new(["echo", "again"]), MIB)
        .await
        .unwrap();
    assert_eq!(out.stdout, b"again\n");
    let mut r = c2.read_file(&path, None).await.unwrap();
    let mut v = Vec::new();
    r.read_to_end(&mut v).await.unwrap();
    assert_eq!(v.len(), 16 * MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poweroff_as_ordinary_process_exits_agent() {
    let mut agent = Agent::start();
    let c = agent.client().await;
    c.poweroff().await.unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(st) = agent.child.try_wait().unwrap() {
            assert!(st.success());
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "agent did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_child_holding_the_pipe_does_not_hang_exec() {
    let agent = Agent::start();
    let c = agent.client().await;
    let t0 = Instant::now();
    let out = c
        .exec_collect(ExecRequest::new(["sh", "-c", "echo hi; sleep 3 &"]), MIB)
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(out.stdout, b"hi\n");
    // The answer comes about a second after the shell exits, not when the sleep ends.
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    assert!(out.truncated, "output after exit was cut and must say so");
}

/// Waits (at most 10 s) until the agent process has exited.
async fn ended(agent: &mut Agent) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the agent did not end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The main process: started once, its output on the agent's stderr (the
/// console), its exit written there before the agent "powers off" (an agent
/// that is not PID 1 just exits); one that cannot start is reported the same
/// way with the shell's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_main_process_runs_once_and_its_exit_ends_the_agent() {
    use hyperfleet_agent_proto::MainProcessRequest;
    let console = tempfile::NamedTempFile::new().unwrap();
    let mut agent = Agent::start_with_stderr(console.reopen().unwrap().into());
    let c = agent.client().await;
    let req = MainProcessRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "echo out $FOO $HOME; pwd; echo err >&2; sleep 0.5; exit 3".into(),
        ],
        env: [("FOO".to_string(), "bar".to_string())].into(),
        cwd: Some(agent.path("work")),
        user: None,
    };
    let first = c.start_main(req.clone()).await.unwrap();
    let pid = first.pid.expect("started");
    assert!(!first.already);
    // Once per boot: a second request starts nothing.
    let again = c.start_main(req).await.unwrap();
    assert_eq!((again.pid, again.already), (Some(pid), true));
    let status = ended(&mut agent).await;
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(console.path()).unwrap();
    assert!(
        log.contains(&format!(
            "hyperfleet: main process started (pid {pid}): sh -c"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("out bar /root\n{}\nerr\n", agent.path("work"))),
        "{log}"
    );
    assert!(
        log.contains("hyperfleet: main process exited with code 3\n"),
        "{log}"
    );

    let console = tempfile::NamedTempFile::new().unwrap();
    let mut agent = Agent::start_with_stderr(console.reopen().unwrap().into());
    let c = agent.client().await;
    let r = c
        .start_main(MainProcessRequest {
            argv: vec!["/nonexistent/app".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((r.pid, r.already), (None, false));
    ended(&mut agent).await;
    let log = std::fs::read_to_string(console.path()).unwrap();
    assert!(
        log.contains(
            "hyperfleet: main process exited with code 127: cannot start /nonexistent/app"
        ),
        "{log}"
    );
}

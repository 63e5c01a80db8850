//! `hyperfleet-bench guest`: measures a running daemon's real-guest paths
//! next to their floor, in one run on one machine.
//!
//! - start: `POST /machines/{id}/start` until `running` (agent answered),
//!   next to the *same QEMU command line* launched by hand until the agent
//!   answers its hello (the floor: what any launcher must pay);
//! - exec: `POST /machines/{id}/exec` of `true` through the API, next to the
//!   same exec sent straight over the agent channel, and the channel's ping;
//! - files: a 256 MiB upload and download through the API, with the
//!   daemon's peak RSS before and after (it must not grow with file size).
//!
//! Usage: hyperfleet-bench guest URL KEY DAEMON_PID [RUNS]

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyperfleet_agent_proto::{AgentClient, ConnectOptions, ExecRequest};
use serde_json::{json, Value};

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (v[0], pick(0.5), pick(0.95))
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

struct Api {
    http: reqwest::Client,
    url: String,
    key: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut r = self
            .http
            .request(method.clone(), format!("{}{path}", self.url))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{method} {path}: {status} {text}");
        }
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }
}

fn qemu_argv(dir: &str) -> Result<(String, Vec<String>)> {
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.contains("qemu-system"))
            && args.iter().any(|a| a.contains(dir))
        {
            return Ok((args[0].clone(), args[1..].to_vec()));
        }
    }
    bail!("no QEMU process for {dir}")
}

async fn hand_boot(
    program: &str,
    argv: &[String],
    agent_sock: &str,
) -> Result<(std::process::Child, Duration, AgentClient)> {
    let _ = std::fs::remove_file(agent_sock);
    let t0 = Instant::now();
    let child = std::process::Command::new(program)
        .args(argv)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stream = loop {
        match tokio::net::UnixStream::connect(agent_sock).await {
            Ok(s) => break s,
            Err(_) if t0.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(2)).await
            }
            Err(e) => bail!("agent socket never came up: {e}"),
        }
    };
    let opts = ConnectOptions {
        handshake_timeout: Duration::from_secs(120),
        ..ConnectOptions::default()
    };
    let c = AgentClient::connect_with(stream, opts).await?;
    Ok((child, t0.elapsed(), c))
}

async fn guest(url: String, key: String, daemon: u32, runs: usize) -> Result<()> {
    let api = Api {
        http: reqwest::Client::new(),
        url,
        key,
    };
    let name = format!("bench-{}", std::process::id());
    let m = api
        .call(
            reqwest::Method::POST,
            "/machines",
            Some(json!({"name": name, "vmm": "qemu"})),
        )
        .await?;
    let id = m["id"].as_str().context("machine id")?.to_string();
    let result = run(&api, &id, daemon, runs).await;
    let _ = api
        .call(
            reqwest::Method::DELETE,
            &format!("/machines/{id}?force=true"),
            None,
        )
        .await;
    result
}

async fn run(api: &Api, id: &str, daemon: u32, runs: usize) -> Result<()> {
    use reqwest::Method;
    // Start through the API, `runs` times (stop in between).
    let mut api_start = Vec::new();
    for i in 0..runs {
        if i > 0 {
            api.call(Method::POST, &format!("/machines/{id}/stop"), None)
                .await?;
        }
        let t0 = Instant::now();
        let m = api
            .call(
                Method::POST,
                &format!("/machines/{id}/start?timeout=300"),
                None,
            )
            .await?;
        api_start.push(t0.elapsed().as_secs_f64() * 1000.0);
        if m["status"] != "running" {
            bail!("start ended {}", m["status"]);
        }
    }
    // Exec `true` through the API.
    let mut api_exec = Vec::new();
    for _ in 0..200 {
        let t0 = Instant::now();
        api.call(
            Method::POST,
            &format!("/machines/{id}/exec"),
            Some(json!({"command": ["true"]})),
        )
        .await?;
        api_exec.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    // 256 MiB up and down; the daemon's peak RSS around it.
    let hwm_before = vm_hwm_kib(daemon);
    let size: usize = 256 << 20;
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[2])
        .collect();
    let t0 = Instant::now();
    let r = api
        .http
        .put(format!(
            "{}/machines/{id}/files?path=/root/bench.bin",
            api.url
        ))
        .bearer_auth(&api.key)
        .body(data)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("upload: {}", r.text().await?);
    }
    let up = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut resp = api
        .http
        .get(format!(
            "{}/machines/{id}/files?path=/root/bench.bin&raw=true",
            api.url
        ))
        .bearer_auth(&api.key)
        .send()
        .await?;
    let mut got = 0usize;
    while let Some(chunk) = resp.chunk().await? {
        got += chunk.len();
    }
    let down = t0.elapsed().as_secs_f64();
    if got != size {
        bail!("download returned {got} bytes");
    }
    let hwm_after = vm_hwm_kib(daemon);

    // The floor: the same QEMU command line, launched by hand.
    let machine_dir = format!("/machines/{id}");
    let (program, argv) = qemu_argv(&machine_dir)?;
    let agent_sock = argv
        .iter()
        .find_map(|a| a.strip_prefix("socket,id=agent,path="))
        .and_then(|a| a.split(',').next())
        .context("agent socket in the QEMU command line")?
        .to_string();
    api.call(Method::POST, &format!("/machines/{id}/stop"), None)
        .await?;
    let mut floor = Vec::new();
    let mut last = None;
    for i in 0..runs {
        let (mut child, took, client) = hand_boot(&program, &argv, &agent_sock).await?;
        floor.push(took.as_secs_f64() * 1000.0);
        if i + 1 == runs {
            last = Some((child, client));
        } else {
            drop(client);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let (mut child, client) = last.context("a floor boot")?;
    let mut ping = Vec::new();
    let mut agent_exec = Vec::new();
    for _ in 0..200 {
        ping.push(client.ping().await?.as_secs_f64() * 1000.0);
        let t0 = Instant::now();
        client
            .exec_collect(ExecRequest::new(["true"]), 1 << 16)
            .await?;
        agent_exec.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    drop(client);
    let _ = child.kill();
    let _ = child.wait();

    let (smin, smed, _) = stats(api_start);
    let (fmin, fmed, _) = stats(floor);
    let (emin, emed, ep95) = stats(api_exec);
    let (amin, amed, ap95) = stats(agent_exec);
    let (pmin, pmed, pp95) = stats(ping);
    println!("real guest under QEMU ({runs} boots each), min / median:");
    println!("  start → running via the API    {smin:8.0} / {smed:8.0} ms");
    println!(
        "  floor: same QEMU argv by hand  {fmin:8.0} / {fmed:8.0} ms   ratio (median) {:.3}",
        smed / fmed
    );
    println!("exec of `true` (200 each), min / p50 / p95:");
    println!("  via the API                    {emin:6.2} / {emed:6.2} / {ep95:6.2} ms");
    println!("  floor: straight over the agent {amin:6.2} / {amed:6.2} / {ap95:6.2} ms   added at p50 {:.2} ms", emed - amed);
    println!("  agent channel ping             {pmin:6.2} / {pmed:6.2} / {pp95:6.2} ms");
    println!(
        "256 MiB through the API: upload {:.1} MB/s, download {:.1} MB/s",
        size as f64 / up / 1e6,
        size as f64 / down / 1e6
    );
    println!(
        "daemon peak RSS: {} MiB before, {} MiB after the transfers",
        hwm_before / 1024,
        hwm_after / 1024
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 || args[1] != "guest" {
        bail!("usage: hyperfleet-bench guest URL KEY DAEMON_PID [RUNS]");
    }
    let runs = args.get(5).map(|r| r.parse()).transpose()?.unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(guest(
        args[2].clone(),
        args[3].clone(),
        args[4].parse()?,
        runs,
    ))
}

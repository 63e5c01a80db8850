//! `hyperfleet machines …`: one subcommand per API operation.

use std::collections::BTreeMap;

use anyhow::Context;
use futures_util::StreamExt;
use hyperfleet_api::{
    CreateMachineRequest, ExecRequest, ExecStreamEvent, Machine, MachineEvent, MachineStatus,
    NetworkRequest, RestartPolicy, RestartPolicyKind,
};
use hyperfleet_client::{ActionResult, Client};

use crate::cli::{ActionArgs, ClientArgs, MachinesCmd};
use crate::output;
use crate::progress::Progress;

pub(crate) fn client(args: &ClientArgs) -> anyhow::Result<Client> {
    Client::new(&args.url, crate::serve::api_key(args)).context("bad server URL")
}

fn pairs(list: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in list {
        let (k, v) = item
            .split_once('=')
            .with_context(|| format!("{what} '{item}' is not KEY=VALUE"))?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// `--entrypoint` / `--cmd`: a JSON array of strings, or one word.
fn argv_flag(value: &str, what: &str) -> anyhow::Result<Vec<String>> {
    if value.trim_start().starts_with('[') {
        serde_json::from_str(value)
            .with_context(|| format!("{what} '{value}' is not a JSON array of strings"))
    } else {
        Ok(vec![value.to_string()])
    }
}

/// `--restart no|always|on-failure[:N]`.
fn restart_flag(value: &str) -> anyhow::Result<RestartPolicy> {
    let (policy, max) = match value.split_once(':') {
        Some((p, n)) => (
            p,
            Some(
                n.parse::<u32>()
                    .with_context(|| format!("--restart '{value}': '{n}' is not a count"))?,
            ),
        ),
        None => (value, None),
    };
    let policy = match policy {
        "no" => RestartPolicyKind::No,
        "always" => RestartPolicyKind::Always,
        "on-failure" => RestartPolicyKind::OnFailure,
        other => {
            anyhow::bail!("--restart '{other}': expected no, always, on-failure or on-failure:N")
        }
    };
    Ok(RestartPolicy {
        policy,
        max_retries: max,
    })
}

fn print_machine(args: &ClientArgs, m: &Machine) -> anyhow::Result<()> {
    if args.json {
        return output::json(m);
    }
    let ports = m
        .exposed_ports
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut rows = vec![
        vec!["id".into(), m.id.clone()],
        vec!["name".into(), m.name.clone()],
        vec!["status".into(), m.status.to_string()],
        vec!["desired".into(), m.desired_status.to_string()],
        vec!["vmm".into(), m.vmm.to_string()],
        vec!["vcpus".into(), m.vcpu_count.to_string()],
        vec!["memory".into(), format!("{} MiB", m.mem_size_mib)],
        vec![
            "ports".into(),
            if ports.is_empty() { "-".into() } else { ports },
        ],
        vec!["created".into(), m.created_at.clone()],
    ];
    if let Some(s) = &m.started_at {
        rows.push(vec!["started".into(), s.clone()]);
    }
    if let Some(s) = &m.snapshot_id {
        rows.push(vec!["snapshot".into(), s.clone()]);
    }
    if let Some(e) = &m.error_message {
        rows.push(vec!["error".into(), e.clone()]);
    }
    if let Some(p) = &m.persistence {
        rows.push(vec!["persistence".into(), p.to_string()]);
    }
    rows.push(vec![
        "idle timeout".into(),
        match m.idle_timeout_seconds {
            None => "server default".into(),
            Some(0) => "never".into(),
            Some(t) => format!("{t} s"),
        },
    ]);
    if let Some(d) = &m.idle_deadline {
        rows.push(vec!["idle deadline".into(), d.clone()]);
    }
    if let Some(b) = m.stored_bytes {
        rows.push(vec!["stored".into(), format!("{} MiB", b >> 20)]);
    }
    if let Some(p) = &m.process {
        rows.push(vec!["process".into(), p.argv.join(" ")]);
        let mut restart = m.restart_policy.policy.as_str().to_string();
        if let Some(n) = m.restart_policy.max_retries {
            restart.push_str(&format!(" (at most {n})"));
        }
        rows.push(vec![
            "restart".into(),
            format!("{restart}, {} so far", m.restart_count),
        ]);
    }
    if let Some(e) = &m.exit_reason {
        rows.push(vec!["exit reason".into(), e.clone()]);
    }
    if let Some(c) = m.exit_code {
        rows.push(vec!["exit code".into(), c.to_string()]);
    }
    rows.extend(network_rows(m));
    output::table(&["FIELD", "VALUE"], &rows);
    Ok(())
}

/// Machines as a table, one a row.
pub(crate) fn print_machine_table(machines: &[Machine]) {
    let rows: Vec<Vec<String>> = machines
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                m.name.clone(),
                m.status.to_string(),
                m.vmm.to_string(),
                m.vcpu_count.to_string(),
                m.mem_size_mib.to_string(),
                m.created_at.clone(),
            ]
        })
        .collect();
    output::table(
        &["ID", "NAME", "STATUS", "VMM", "VCPUS", "MEM_MIB", "CREATED"],
        &rows,
    );
}

/// The guest's address, and how to reach its exposed ports: one URL each,
/// and who may open them.
fn network_rows(m: &Machine) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut net = m.network.ip.clone().unwrap_or_else(|| "-".into());
    if !m.network.egress {
        net.push_str(" (no egress)");
    }
    rows.push(vec!["address".into(), net]);
    if m.exposed_ports.is_empty() {
        return rows;
    }
    if m.urls.is_empty() {
        rows.push(vec!["urls".into(), "- (the server's proxy is off)".into()]);
        return rows;
    }
    for (port, url) in &m.urls {
        rows.push(vec![format!("url {port}"), url.clone()]);
    }
    if m.public {
        rows.push(vec![
            "access".into(),
            "public: no credentials needed".into(),
        ]);
    } else if let Some(token) = &m.access_token {
        rows.push(vec![
            "access".into(),
            "an API key with the 'exec' scope, or the access token: add \
             ?hf_token=<token> to a URL once (a cookie keeps it)"
                .into(),
        ]);
        rows.push(vec!["token".into(), token.clone()]);
    }
    rows
}

fn print_event(e: &MachineEvent) {
    let change = match (e.from_status, e.to_status) {
        (Some(a), Some(b)) => format!("{a} → {b}"),
        (None, Some(b)) => format!("→ {b}"),
        (Some(a), None) => format!("{a} →"),
        (None, None) => String::new(),
    };
    println!(
        "{:>6}  {}  {:<10} {:<22} {}",
        e.id,
        e.at,
        output::clean(&e.kind),
        change,
        output::clean(e.message.as_deref().unwrap_or_default())
    );
    for s in &e.steps {
        println!(
            "{:>8}{:<22} {:>10.1} ms  {}{}",
            "",
            output::clean(&s.step),
            s.duration_ms,
            output::clean(&s.outcome),
            s.detail
                .as_ref()
                .map(|d| format!("  ({})", output::clean(d)))
                .unwrap_or_default()
        );
    }
}

/// What the spinner says while `action` of machine `id` is under way.
fn doing(action: &str, id: &str) -> String {
    let verb = match action {
        "start" => "starting",
        "stop" => "stopping",
        "restart" => "restarting",
        "pause" => "pausing",
        "resume" => "resuming",
        "kill" => "killing",
        "suspend" => "suspending",
        "delete" => "deleting",
        other => other,
    };
    format!("{verb} {}", output::clean(id))
}

async fn action(args: &ClientArgs, c: &Client, name: &str, a: ActionArgs) -> anyhow::Result<()> {
    let progress = (!a.no_wait).then(|| Progress::spinner(args.json, doing(name, &a.id)));
    let result = c.action(&a.id, name, !a.no_wait, a.timeout).await;
    drop(progress);
    match result? {
        ActionResult::Done(m) => print_machine(args, &m),
        ActionResult::Accepted(m) => {
            if !args.json {
                eprintln!("{name} accepted; the machine is {} and moving on", m.status);
            }
            print_machine(args, &m)
        }
        // A stop or kill of an ephemeral machine deletes it.
        ActionResult::Deleted => {
            if !args.json {
                eprintln!(
                    "{} deleted (ephemeral: deleted when it stops)",
                    output::clean(&a.id)
                );
            }
            Ok(())
        }
    }
}

pub(crate) async fn run(args: &ClientArgs, cmd: MachinesCmd) -> anyhow::Result<()> {
    let c = client(args)?;
    match cmd {
        MachinesCmd::Create(a) => {
            let a = *a;
            let vmm = match a.vmm.as_deref() {
                None => None,
                Some(v) => Some(v.parse().map_err(anyhow::Error::msg)?),
            };
            let mut req = CreateMachineRequest {
                name: a.name,
                vcpu_count: a.vcpus,
                mem_size_mib: a.mem,
                exposed_ports: a.expose,
                vmm,
                env: pairs(&a.env, "--env")?,
                metadata: pairs(&a.metadata, "--metadata")?,
                public: a.public.then_some(true),
                network: a.no_egress.then_some(NetworkRequest {
                    egress: Some(false),
                }),
                snapshot_id: a.snapshot,
                image: a.image,
                entrypoint: a
                    .entrypoint
                    .as_deref()
                    .map(|v| argv_flag(v, "--entrypoint"))
                    .transpose()?,
                cmd: a
                    .cmd
                    .as_deref()
                    .map(|v| argv_flag(v, "--cmd"))
                    .transpose()?,
                workdir: a.workdir,
                user: a.user,
                restart: a.restart.as_deref().map(restart_flag).transpose()?,
                ..Default::default()
            };
            req.idle_timeout_seconds = a.idle_timeout;
            req.persistence = a.persistence;
            let mut m = c.create_machine(&req).await?;
            if a.start {
                let progress = Progress::spinner(args.json, doing("start", &m.name));
                let started = c.action(&m.id, "start", true, None).await;
                drop(progress);
                if let ActionResult::Done(started) = started? {
                    m = started;
                }
            }
            print_machine(args, &m)
        }
        MachinesCmd::List {
            status,
            limit,
            offset,
        } => {
            let status = match status {
                None => None,
                Some(s) => Some(s.parse::<MachineStatus>().map_err(anyhow::Error::msg)?),
            };
            let list = c.list_machines(status, limit, offset).await?;
            if args.json {
                return output::json(&list);
            }
            print_machine_table(&list.machines);
            if list.total as usize > list.machines.len() {
                eprintln!("({} of {} shown)", list.machines.len(), list.total);
            }
            Ok(())
        }
        MachinesCmd::Get { id } => print_machine(args, &c.get_machine(&id).await?),
        MachinesCmd::Start(a) => action(args, &c, "start", a).await,
        MachinesCmd::Stop(a) => action(args, &c, "stop", a).await,
        MachinesCmd::Restart(a) => action(args, &c, "restart", a).await,
        MachinesCmd::Pause(a) => action(args, &c, "pause", a).await,
        MachinesCmd::Resume(a) => action(args, &c, "resume", a).await,
        MachinesCmd::Kill(a) => action(args, &c, "kill", a).await,
        MachinesCmd::Suspend(a) => action(args, &c, "suspend", a).await,
        MachinesCmd::Update(a) => {
            let metadata = if a.clear_metadata {
                Some(Default::default())
            } else if a.metadata.is_empty() {
                None
            } else {
                Some(pairs(&a.metadata, "--metadata")?)
            };
            let req = hyperfleet_api::UpdateMachineRequest {
                idle_timeout_seconds: a.idle_timeout.map(|t| t.0),
                persistence: a.persistence,
                metadata,
            };
            print_machine(args, &c.update_machine(&a.id, &req).await?)
        }
        MachinesCmd::Delete {
            id,
            force,
            no_wait,
            timeout,
        } => match {
            let _progress = (!no_wait).then(|| Progress::spinner(args.json, doing("delete", &id)));
            c.delete_machine(&id, force, !no_wait, timeout).await
        }? {
            ActionResult::Deleted => {
                if !args.json {
                    println!("deleted {id}");
                }
                Ok(())
            }
            ActionResult::Accepted(m) | ActionResult::Done(m) => {
                if !args.json {
                    eprintln!("delete accepted; the machine is {}", m.status);
                }
                print_machine(args, &m)
            }
        },
        MachinesCmd::Wait {
            id,
            status,
            timeout,
        } => {
            let status: MachineStatus = status.parse().map_err(anyhow::Error::msg)?;
            let progress = Progress::spinner(
                args.json,
                format!("waiting for {} to be {status}", output::clean(&id)),
            );
            let m = c.wait(&id, status, timeout).await;
            drop(progress);
            print_machine(args, &m?)
        }
        MachinesCmd::Exec {
            id,
            timeout,
            env,
            cwd,
            stdin,
            stream,
            command,
        } => exec(args, &c, id, timeout, env, cwd, stdin, stream, command).await,
        MachinesCmd::Fork {
            id,
            count,
            names,
            no_wait,
            timeout,
        } => crate::snapshots::fork(args, &c, &id, count, names, !no_wait, timeout).await,
        MachinesCmd::Cp { src, dst } => cp(args, &c, &src, &dst).await,
        MachinesCmd::Logs { id, follow, tail } => {
            use std::io::IsTerminal;
            use std::io::Write;
            let mut s = Box::pin(c.logs(&id, tail, follow).await?);
            let mut out = std::io::stdout();
            // The guest writes what it likes to its console; a terminal
            // must not obey it. Redirected, the bytes stay exact.
            let mut text = out.is_terminal().then(output::TerminalText::default);
            while let Some(chunk) = s.next().await {
                let chunk = chunk?;
                match &mut text {
                    Some(t) => out.write_all(t.push(&chunk).as_bytes())?,
                    None => out.write_all(&chunk)?,
                }
                out.flush()?;
            }
            Ok(())
        }
        MachinesCmd::Events { id, follow } => {
            if !follow {
                let list = c.events(&id).await?;
                if args.json {
                    return output::json(&list);
                }
                for e in &list.events {
                    print_event(e);
                }
                return Ok(());
            }
            let mut stream = Box::pin(c.follow_events(&id).await?);
            while let Some(e) = stream.next().await {
                let e = e?;
                if args.json {
                    println!("{}", serde_json::to_string(&e)?);
                } else {
                    print_event(&e);
                }
            }
            Ok(())
        }
    }
}

/// Exit status for a finished command, shell-style.
fn exit_status(code: Option<i32>, signal: Option<i32>, timed_out: bool) -> i32 {
    if timed_out {
        124
    } else if let Some(c) = code {
        c
    } else {
        128 + signal.unwrap_or(0)
    }
}

// The CLI ends with the remote command's own exit status (as `ssh` does); the
// only state to tear down is stdout/stderr, which `exit` flushes.
#[allow(clippy::exit)]
#[allow(clippy::too_many_arguments)]
async fn exec(
    args: &ClientArgs,
    c: &Client,
    id: String,
    timeout: Option<f64>,
    env: Vec<String>,
    cwd: Option<String>,
    stdin: bool,
    stream: bool,
    command: Vec<String>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let req = ExecRequest {
        command,
        timeout,
        env: pairs(&env, "--env")?,
        cwd,
        stdin: None,
        max_output_bytes: None,
    };
    if stdin {
        return interactive(c, &id, &req).await;
    }
    if !stream {
        let r = c.exec(&id, &req).await?;
        if args.json {
            output::json(&r)?;
        } else {
            std::io::stdout().write_all(r.stdout.as_bytes())?;
            std::io::stderr().write_all(r.stderr.as_bytes())?;
            if r.truncated {
                eprintln!("hyperfleet: output was truncated (over the output cap)");
            }
            if r.timed_out {
                eprintln!("hyperfleet: the command timed out and was killed");
            }
        }
        std::process::exit(exit_status(r.exit_code, r.signal, r.timed_out));
    }
    let mut s = Box::pin(c.exec_stream(&id, &req).await?);
    while let Some(ev) = s.next().await {
        if let Some(status) = show_event(ev?)? {
            std::process::exit(status);
        }
    }
    anyhow::bail!("the stream ended without the command's exit status")
}

/// Writes a streamed event's output; the exit status once the command ended.
fn show_event(ev: ExecStreamEvent) -> anyhow::Result<Option<i32>> {
    use base64::Engine;
    use std::io::Write;
    let b64 = base64::engine::general_purpose::STANDARD;
    match ev {
        ExecStreamEvent::Stdout { data } => {
            let mut o = std::io::stdout();
            o.write_all(&b64.decode(data)?)?;
            o.flush()?;
        }
        ExecStreamEvent::Stderr { data } => std::io::stderr().write_all(&b64.decode(data)?)?,
        ExecStreamEvent::Exit {
            exit_code,
            signal,
            timed_out,
            ..
        } => return Ok(Some(exit_status(exit_code, signal, timed_out))),
        ExecStreamEvent::Error { code, message } => anyhow::bail!("{message} ({code})"),
    }
    Ok(None)
}

/// `exec -i`: stdin streams to the command as it is typed or piped, output
/// streams back (WebSocket form).
#[allow(clippy::exit)] // Ends with the remote command's status, as `exec` does.
async fn interactive(c: &Client, id: &str, req: &ExecRequest) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let (mut input, events) = c.exec_interactive(id, req).await?;
    let feeder = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if input.send(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = input.eof().await;
    });
    let mut events = Box::pin(events);
    while let Some(ev) = events.next().await {
        if let Some(status) = show_event(ev?)? {
            feeder.abort();
            std::process::exit(status);
        }
    }
    anyhow::bail!("the session ended without the command's exit status")
}

/// `ID:/path` → (ID, /path).
fn remote(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    (path.starts_with('/') && !id.is_empty() && !id.contains('/')).then_some((id, path))
}

async fn cp(args: &ClientArgs, c: &Client, src: &str, dst: &str) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let t0 = std::time::Instant::now();
    let bytes = match (remote(src), remote(dst)) {
        (None, Some((id, path))) => {
            let f = tokio::fs::File::open(src)
                .await
                .with_context(|| format!("opening {src}"))?;
            let len = f.metadata().await?.len();
            let progress = Progress::bytes(args.json, Some(len), format!("{src} → {id}"));
            let sent = progress.counter();
            let body = tokio_util::io::ReaderStream::new(f).inspect(move |chunk| {
                if let Ok(c) = chunk {
                    sent(c.len() as u64);
                }
            });
            let body = reqwest::Body::wrap_stream(body);
            c.upload(id, path, len, body, true).await?.size
        }
        (Some((id, path)), None) => {
            let (len, mut s) = c.download(id, path).await?;
            let progress = Progress::bytes(args.json, len, format!("{id}:{path} → {dst}"));
            let tmp = format!("{dst}.hf-partial");
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .with_context(|| format!("creating {tmp}"))?;
            let mut n = 0u64;
            while let Some(chunk) = s.next().await {
                let chunk = chunk?;
                n += chunk.len() as u64;
                progress.inc(chunk.len() as u64);
                f.write_all(&chunk).await?;
            }
            f.sync_all().await?;
            tokio::fs::rename(&tmp, dst).await?;
            n
        }
        _ => anyhow::bail!("exactly one of SRC and DST must be ID:/absolute/path"),
    };
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "copied {bytes} bytes in {secs:.2} s ({:.1} MB/s)",
        bytes as f64 / secs.max(1e-6) / 1e6
    );
    Ok(())
}

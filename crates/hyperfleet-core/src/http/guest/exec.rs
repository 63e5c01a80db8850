//! Commands in the guest: buffered (JSON), streamed (NDJSON) and interactive
//! (WebSocket). The buffered form keeps at most the JSON cap of output,
//! measured as it will be encoded; the streamed forms keep nothing.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use futures_util::{stream, SinkExt};
use hyperfleet_agent_proto::{self as proto, AgentClient, ExecEvent, OutputSink};
use hyperfleet_api::{ExecRequest, ExecResult, ExecStreamEvent, Scope};
use serde::Deserialize;
use utoipa::IntoParams;

use super::super::error::ApiError;
use super::super::extract::{parse_object, Caller, Json, Query};
use super::super::AppState;
use super::{agent_error, guest_of, holding, Guest, Slot, B64};
use crate::store::CachedMachine;

const DEFAULT_OUTPUT_CAP: usize = 1 << 20;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ExecQuery {
    /// Stream output as NDJSON lines while the command runs.
    stream: Option<bool>,
}

/// Checks an exec request and turns it into the agent's form, with the
/// decoded stdin and the output cap. [`with_machine_env`] adds the
/// machine's env once the machine is known.
fn prepare_exec(
    req: ExecRequest,
) -> Result<(proto::ExecRequest, Option<Vec<u8>>, usize), ApiError> {
    if req.command.is_empty() || req.command[0].is_empty() {
        return Err(ApiError::validation("command: at least the program name"));
    }
    if req.command.len() > 4096 || req.command.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::validation(
            "command: at most 4096 arguments, no NUL bytes",
        ));
    }
    let timeout = req.timeout.unwrap_or(60.0);
    if !(timeout > 0.0 && timeout <= 3600.0) {
        return Err(ApiError::validation(format!(
            "timeout: seconds, more than 0 and at most 3600, got {timeout}"
        )));
    }
    check_env(&req.env)?;
    if req.cwd.as_deref().is_some_and(|c| c.contains('\0')) {
        return Err(ApiError::validation("cwd: no NUL bytes"));
    }
    let cap = req.max_output_bytes.unwrap_or(DEFAULT_OUTPUT_CAP);
    let stdin = match &req.stdin {
        None => None,
        Some(s) => Some(
            B64.decode(s)
                .map_err(|e| ApiError::validation(format!("stdin: not valid base64: {e}")))?,
        ),
    };
    let mut preq = proto::ExecRequest::new(req.command);
    preq.env = req.env;
    preq.cwd = req.cwd;
    preq.timeout_ms = Some((timeout * 1000.0).ceil() as u64);
    Ok((preq, stdin, cap))
}

/// Names the guest can set: not empty, no `=` (it would split the
/// `NAME=value` pair elsewhere) and no NUL (it would end it).
fn check_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for (name, value) in env {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(ApiError::validation(format!(
                "env: {name:?} is not a valid variable name (it must be non-empty, without '=' \
                 or NUL)"
            )));
        }
        if value.contains('\0') {
            return Err(ApiError::validation(format!(
                "env: the value of {name} contains a NUL byte"
            )));
        }
    }
    Ok(())
}

/// The machine's `env` first (over its image's `Env`, as its main process
/// has them: an image's `PATH` finds its programs), the request's on top.
fn with_machine_env(preq: &mut proto::ExecRequest, m: &CachedMachine) {
    let spec = &m.rec.spec;
    let mut env = match &spec.process {
        Some(p) => p.env(&spec.env),
        None => spec.env.clone(),
    };
    env.append(&mut preq.env);
    preq.env = env;
}

#[utoipa::path(post, path = "/machines/{id}/exec", tag = "guest",
    description = "Run a command in the guest. Buffered by default; with `?stream=true` the answer \
                   is `application/x-ndjson`, one `ExecStreamEvent` per line as output arrives, \
                   ending with an `exit` (or `error`) line. Closing the connection kills the command.",
    params(("id" = String, Path, description = "Machine id or name"), ExecQuery),
    request_body = ExecRequest,
    responses(
        (status = 200, description = "The outcome (buffered), or NDJSON stream events (`?stream=true`)",
            content((ExecResult = "application/json"), (ExecStreamEvent = "application/x-ndjson"))),
        (status = 400, description = "Invalid request, e.g. max_output_bytes over the JSON cap or a bad env name", body = hyperfleet_api::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn exec(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<ExecQuery>,
    Json(req): Json<ExecRequest>,
) -> Result<Response, ApiError> {
    let (mut preq, stdin, cap) = prepare_exec(req)?;
    let buffered = !q.stream.unwrap_or(false);
    let json_max = state.guest.limits().json_max_bytes;
    if buffered && cap > json_max {
        return Err(ApiError::validation(format!(
            "max_output_bytes: at most {json_max} in the buffered form; use ?stream=true \
             (NDJSON) or the WebSocket form for more output"
        )));
    }
    let Guest {
        machine: m,
        agent,
        slot,
    } = guest_of(&state, &caller, &id, Scope::Exec).await?;
    with_machine_env(&mut preq, &m);

    if buffered {
        let mut out = JsonOutput::new(cap, json_max);
        let st = agent
            .exec_collect_into(preq, stdin.as_deref(), &mut out)
            .await
            .map_err(agent_error)?;
        let resp = axum::Json(ExecResult {
            exit_code: st.exit_code,
            signal: st.signal,
            stdout: into_text(out.stdout),
            stderr: into_text(out.stderr),
            timed_out: st.timed_out,
            truncated: out.truncated || st.output_cut,
            duration_ms: st.duration_ms,
        })
        .into_response();
        return Ok(holding(resp, slot));
    }

    preq.stdin = stdin.is_some();
    let mut handle = agent.exec(preq).await.map_err(agent_error)?;
    if let (Some(mut w), Some(data)) = (handle.take_stdin(), stdin) {
        tokio::spawn(async move {
            let _ = w.write(Bytes::from(data)).await;
            w.close();
        });
    }
    let line = |ev: &ExecStreamEvent| {
        // Plain data; serialising cannot fail.
        let mut v = serde_json::to_vec(ev).expect("exec event serialises");
        v.push(b'\n');
        Ok::<_, Infallible>(Bytes::from(v))
    };
    let events = stream::unfold(Some(handle), move |h| async move {
        let mut h = h?;
        let ev = match h.next_event().await {
            Ok(Some(ExecEvent::Stdout(b))) => ExecStreamEvent::Stdout {
                data: B64.encode(&b),
            },
            Ok(Some(ExecEvent::Stderr(b))) => ExecStreamEvent::Stderr {
                data: B64.encode(&b),
            },
            Ok(Some(ExecEvent::Exit(st))) => ExecStreamEvent::Exit {
                exit_code: st.exit_code,
                signal: st.signal,
                timed_out: st.timed_out,
                duration_ms: st.duration_ms,
            },
            Ok(None) => return None,
            Err(e) => {
                let api = agent_error(e);
                let ev = ExecStreamEvent::Error {
                    code: format!("{:?}", api.code),
                    message: api.message,
                };
                return Some((line(&ev), None));
            }
        };
        Some((line(&ev), Some(h)))
    });
    let resp = (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(events),
    )
        .into_response();
    Ok(holding(resp, slot))
}

/// The headers of a WebSocket upgrade (RFC 6455), as the server checks
/// them; clients' WebSocket libraries send them.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Only documents the headers; WebSocketUpgrade checks them.
pub struct UpgradeHeaders {
    #[param(rename = "Connection", pattern = "^[Uu]pgrade$")]
    connection: String,
    #[param(rename = "Upgrade", pattern = "^websocket$")]
    upgrade: String,
    #[param(rename = "Sec-WebSocket-Version", pattern = "^13$")]
    sec_websocket_version: String,
    /// 16 random bytes, base64.
    #[param(rename = "Sec-WebSocket-Key", pattern = "^[A-Za-z0-9+/]{21}[AQgw]==$")]
    sec_websocket_key: String,
}

#[utoipa::path(get, path = "/machines/{id}/exec/ws", tag = "guest",
    description = "Interactive exec over a WebSocket. The client's first message is an \
                   `ExecRequest` as JSON text; then binary messages are the command's stdin, \
                   and the text messages `{\"type\":\"eof\"}` (close stdin) and \
                   `{\"type\":\"cancel\"}` (kill) control it. The server sends one \
                   `ExecStreamEvent` per text message as output arrives, ending with `exit` or \
                   `error`, then closes. Closing the socket kills the command. Browsers, which \
                   cannot set the `Authorization` header on a WebSocket, may instead offer the \
                   subprotocols `hyperfleet.exec.v1, hyperfleet.bearer.<key>` in \
                   `Sec-WebSocket-Protocol`; the server then answers with `hyperfleet.exec.v1` \
                   (docs/security.md \"The exec WebSocket from a browser\").",
    params(("id" = String, Path, description = "Machine id or name"), UpgradeHeaders),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
              (status = 400, description = "Not a WebSocket upgrade request", body = hyperfleet_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn exec_ws(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let g = guest_of(&state, &caller, &id, Scope::Exec).await?;
    // A browser that authenticated with the subprotocol pair needs one of
    // its offered protocols echoed back; other clients offer none.
    Ok(ws
        .protocols([crate::auth::WS_PROTOCOL])
        .on_upgrade(move |socket| exec_session(socket, g.agent, g.machine, g.slot)))
}

fn ws_event(ev: &ExecStreamEvent) -> Message {
    // Plain data; serialising cannot fail.
    Message::Text(
        serde_json::to_string(ev)
            .expect("exec event serialises")
            .into(),
    )
}

fn ws_error(e: ApiError) -> Message {
    ws_event(&ExecStreamEvent::Error {
        code: format!("{:?}", e.code),
        message: e.message,
    })
}

/// One interactive command: stdin from the socket, output to it. The
/// request's slot is held until the session ends.
async fn exec_session(
    mut socket: WebSocket,
    agent: AgentClient,
    m: Arc<CachedMachine>,
    _slot: Slot,
) {
    let first = match socket.recv().await {
        Some(Ok(Message::Text(t))) => parse_object::<ExecRequest>(t.as_bytes()),
        _ => Err(ApiError::validation(
            "the first message must be the exec request as JSON text",
        )),
    };
    let prepared = first.and_then(prepare_exec);
    let (mut preq, stdin0, _) = match prepared {
        Ok(p) => p,
        Err(e) => {
            let _ = socket.send(ws_error(e)).await;
            let _ = socket.close().await;
            return;
        }
    };
    with_machine_env(&mut preq, &m);
    preq.stdin = true;
    let mut handle = match agent.exec(preq).await {
        Ok(h) => h,
        Err(e) => {
            let _ = socket.send(ws_error(agent_error(e))).await;
            let _ = socket.close().await;
            return;
        }
    };
    let mut stdin = handle.take_stdin();
    if let (Some(w), Some(data)) = (stdin.as_mut(), stdin0) {
        let _ = w.write(Bytes::from(data)).await;
    }
    enum Next {
        Output(Result<Option<ExecEvent>, proto::Error>),
        Client(Option<Result<Message, axum::Error>>),
    }
    loop {
        let next = tokio::select! {
            ev = handle.next_event() => Next::Output(ev),
            msg = socket.recv() => Next::Client(msg),
        };
        match next {
            Next::Output(Ok(Some(ev))) => {
                let (msg, last) = match ev {
                    ExecEvent::Stdout(b) => (
                        ExecStreamEvent::Stdout {
                            data: B64.encode(&b),
                        },
                        false,
                    ),
                    ExecEvent::Stderr(b) => (
                        ExecStreamEvent::Stderr {
                            data: B64.encode(&b),
                        },
                        false,
                    ),
                    ExecEvent::Exit(st) => (
                        ExecStreamEvent::Exit {
                            exit_code: st.exit_code,
                            signal: st.signal,
                            timed_out: st.timed_out,
                            duration_ms: st.duration_ms,
                        },
                        true,
                    ),
                };
                if socket.send(ws_event(&msg)).await.is_err() {
                    let _ = handle.cancel();
                    return;
                }
                if last {
                    break;
                }
            }
            Next::Output(Ok(None)) => break,
            Next::Output(Err(e)) => {
                let _ = socket.send(ws_error(agent_error(e))).await;
                break;
            }
            Next::Client(Some(Ok(Message::Binary(data)))) => {
                if let Some(w) = stdin.as_mut() {
                    // The command may exit without reading all of its input.
                    let _ = w.write(data).await;
                }
            }
            Next::Client(Some(Ok(Message::Text(t)))) => {
                match serde_json::from_str::<serde_json::Value>(&t)
                    .ok()
                    .and_then(|v| v["type"].as_str().map(str::to_string))
                    .as_deref()
                {
                    Some("eof") => {
                        if let Some(w) = stdin.take() {
                            w.close();
                        }
                    }
                    Some("cancel") => {
                        let _ = handle.cancel();
                    }
                    _ => {
                        let e = ApiError::validation(
                            "control messages are {\"type\":\"eof\"} or {\"type\":\"cancel\"}",
                        );
                        let _ = socket.send(ws_error(e)).await;
                    }
                }
            }
            Next::Client(Some(Ok(_))) => {}
            // The client went away: the command must not outlive it.
            Next::Client(None) | Next::Client(Some(Err(_))) => {
                let _ = handle.cancel();
                return;
            }
        }
    }
    let _ = socket.close().await;
}

/// The output of a buffered command, bounded twice: at most `per_stream` raw
/// bytes of each of stdout and stderr (the request's `max_output_bytes`), and
/// at most `budget` bytes for both once encoded as JSON strings. The second
/// bound is what keeps the answer (and the daemon's memory) small whatever
/// the output: a NUL byte becomes six (`\u0000`), an invalid UTF-8 byte three
/// (U+FFFD). Output past either bound is dropped and `truncated` set; the
/// command still runs to its end.
struct JsonOutput {
    per_stream: usize,
    budget: usize,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    truncated: bool,
}

impl JsonOutput {
    fn new(per_stream: usize, budget: usize) -> JsonOutput {
        JsonOutput {
            per_stream,
            budget,
            stdout: Vec::new(),
            stderr: Vec::new(),
            truncated: false,
        }
    }

    fn keep(&mut self, stderr: bool, chunk: &[u8]) {
        let dst = if stderr {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        let room = self.per_stream.saturating_sub(dst.len());
        let mut take = &chunk[..chunk.len().min(room)];
        let mut cost = json_cost(take);
        if cost > self.budget {
            // Byte by byte with each byte's worst case: never more than the budget.
            let mut n = 0;
            cost = 0;
            while n < take.len() && cost + byte_cost(take[n]) <= self.budget {
                cost += byte_cost(take[n]);
                n += 1;
            }
            take = &take[..n];
        }
        if take.len() < chunk.len() {
            self.truncated = true;
        }
        dst.extend_from_slice(take);
        self.budget -= cost;
    }
}

impl OutputSink for JsonOutput {
    fn stdout(&mut self, chunk: &[u8]) {
        self.keep(false, chunk);
    }
    fn stderr(&mut self, chunk: &[u8]) {
        self.keep(true, chunk);
    }
}

/// Output as text, invalid UTF-8 replaced; valid output is moved, not copied
/// (the buffer can be as large as the JSON cap).
fn into_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The length of `bytes` as the inside of a JSON string, after invalid UTF-8
/// is replaced. Taken chunk by chunk this can only over-count (a character
/// split between chunks counts as replacement characters).
fn json_cost(bytes: &[u8]) -> usize {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum()
}

/// The most one byte can add to the JSON string, whatever surrounds it.
fn byte_cost(b: u8) -> usize {
    match b {
        b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
        0..=0x1f => 6,
        0x80.. => 3,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response_len(out: &JsonOutput) -> usize {
        let r = ExecResult {
            exit_code: Some(0),
            signal: None,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            timed_out: false,
            truncated: out.truncated,
            duration_ms: 1,
        };
        serde_json::to_vec(&r).unwrap().len()
    }

    #[test]
    fn nul_output_cannot_blow_up_the_json_answer() {
        // 16 MiB of NULs, as a guest produced in the report: the answer stays
        // within the budget (plus the fixed fields), not six times the output.
        let budget = 1 << 20;
        let mut out = JsonOutput::new(16 << 20, budget);
        let chunk = vec![0u8; 64 << 10];
        for _ in 0..256 {
            out.stdout(&chunk);
            out.stderr(&chunk);
        }
        assert!(out.truncated);
        assert!(out.stdout.len() + out.stderr.len() <= budget / 6);
        let len = response_len(&out);
        assert!(len <= budget + 200, "{len}");
    }

    #[test]
    fn the_budget_holds_for_any_bytes_and_keeps_plain_text_whole() {
        let budget = 10_000;
        let mut out = JsonOutput::new(1 << 20, budget);
        // Every byte value, invalid UTF-8 included, in odd-sized chunks.
        let all: Vec<u8> = (0..=255u8).cycle().take(50_000).collect();
        for c in all.chunks(997) {
            out.stdout(c);
        }
        assert!(out.truncated);
        assert!(response_len(&out) <= budget + 200, "{}", response_len(&out));

        let mut out = JsonOutput::new(1 << 20, budget);
        out.stdout(b"hello \xc3\xa9t\xc3\xa9\n");
        out.stderr(b"warn\n");
        assert!(!out.truncated);
        assert_eq!(out.stdout, "hello \u{e9}t\u{e9}\n".as_bytes());
        assert_eq!(out.stderr, b"warn\n");
    }

    #[test]
    fn the_per_stream_cap_still_applies() {
        let mut out = JsonOutput::new(4, 1 << 20);
        out.stdout(b"abcdef");
        out.stderr(b"xy");
        assert_eq!(
            (&out.stdout[..], &out.stderr[..], out.truncated),
            (&b"abcd"[..], &b"xy"[..], true)
        );
    }

    #[test]
    fn json_cost_matches_serde_for_text() {
        for s in [
            "plain",
            "quote\" back\\slash",
            "tab\tnl\n\u{1}",
            "\u{e9}\u{1F600}",
        ] {
            let encoded = serde_json::to_string(s).unwrap();
            assert_eq!(json_cost(s.as_bytes()), encoded.len() - 2, "{s:?}");
        }
    }

    #[test]
    fn env_names_must_be_settable() {
        for bad in ["", "A=B", "A\0"] {
            let env = BTreeMap::from([(bad.to_string(), "v".to_string())]);
            let e = check_env(&env).err().unwrap();
            assert!(
                e.message.contains("not a valid variable name"),
                "{}",
                e.message
            );
        }
        let env = BTreeMap::from([("A".to_string(), "x\0y".to_string())]);
        assert!(check_env(&env).is_err());
        let env = BTreeMap::from([("PATH".to_string(), "/bin=/x".to_string())]);
        check_env(&env).unwrap();
    }
}

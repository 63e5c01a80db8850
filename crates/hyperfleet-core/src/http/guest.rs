//! Routes that act inside a running machine through its guest agent:
//! commands (buffered and NDJSON-streamed), files (the seeds' JSON/base64
//! form and a raw streaming form with `Range`), and the console log.
//!
//! Nothing here buffers a whole file: uploads stream from the request body
//! into the agent and downloads stream from the agent into the response, with
//! the agent protocol's flow control bounding memory.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use futures_util::{stream, SinkExt, StreamExt, TryStreamExt};
use hyperfleet_agent_proto::{self as proto, AgentClient, ByteRange, ExecEvent, WriteOptions};
use hyperfleet_api::{
    DirEntry, DirListing, ErrorCode, ExecRequest, ExecResult, ExecStreamEvent, FileContent,
    FileStat, FileWrite, FileWritten, MachineStatus, Scope,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::ApiError;
use super::extract::{parse_object, Caller, Json, Query};
use super::AppState;
use crate::store::CachedMachine;
use crate::util::rfc3339;
use crate::vmm::VmmError;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// Largest file the JSON/base64 form returns; larger ones use the raw form.
const JSON_FILE_MAX: u64 = 16 << 20;
const DEFAULT_OUTPUT_CAP: usize = 1 << 20;
const MAX_OUTPUT_CAP: usize = 16 << 20;

/// Maps an agent failure: the guest's own "no such file" is a 404, other
/// refusals by the guest are 400, and a lost or broken channel is 502.
pub fn agent_error(e: proto::Error) -> ApiError {
    if let proto::Error::Remote(r) = &e {
        let code = match r.code {
            proto::ErrorCode::NotFound => ErrorCode::NotFound,
            proto::ErrorCode::PermissionDenied
            | proto::ErrorCode::AlreadyExists
            | proto::ErrorCode::NotADirectory
            | proto::ErrorCode::IsADirectory
            | proto::ErrorCode::DirectoryNotEmpty
            | proto::ErrorCode::InvalidArgument
            | proto::ErrorCode::Unsupported => ErrorCode::BadRequest,
            _ => ErrorCode::AgentError,
        };
        return ApiError::new(code, format!("in the guest: {}", r.message));
    }
    ApiError::new(
        ErrorCode::AgentError,
        format!("the guest agent failed: {}", chain(&e)),
    )
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The machine, checked to be running, and its agent.
async fn agent_of(
    state: &AppState,
    caller: &Caller,
    id: &str,
    scope: Scope,
) -> Result<(Arc<CachedMachine>, AgentClient), ApiError> {
    let p = caller.require(scope)?;
    let m = state
        .store
        .get(Some(&p.tenant), id)?
        .ok_or_else(|| ApiError::not_found(format!("machine '{id}'")))?;
    if m.rec.status != MachineStatus::Running {
        return Err(ApiError::new(
            ErrorCode::InvalidState,
            format!(
                "the machine is {}; commands and files need it running",
                m.rec.status
            ),
        ));
    }
    let ctx = state.sup.ctx();
    let backend = ctx.backends.get(&m.rec.spec.vmm).ok_or_else(|| {
        ApiError::new(
            ErrorCode::Unavailable,
            format!("the {} backend is not enabled", m.rec.spec.vmm),
        )
    })?;
    match backend.agent(&ctx.launch(&m.rec)).await {
        Ok(a) => Ok((m, a)),
        Err(VmmError::Unsupported { backend, .. }) => Err(ApiError::new(
            ErrorCode::InvalidState,
            format!("machines on the {backend} backend have no guest agent"),
        )),
        Err(e) => Err(ApiError::new(
            ErrorCode::AgentError,
            format!("the guest agent cannot be reached: {}", chain(&e)),
        )),
    }
}

fn check_path(path: &str) -> Result<(), ApiError> {
    if !path.starts_with('/') || path.len() > 4096 || path.contains('\0') {
        return Err(ApiError::validation(
            "path: must be an absolute guest path of at most 4096 bytes",
        ));
    }
    Ok(())
}

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
    let cap = req.max_output_bytes.unwrap_or(DEFAULT_OUTPUT_CAP);
    if cap > MAX_OUTPUT_CAP {
        return Err(ApiError::validation(format!(
            "max_output_bytes: at most {MAX_OUTPUT_CAP}"
        )));
    }
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

/// The machine's `env` first, the request's on top.
fn with_machine_env(preq: &mut proto::ExecRequest, m: &CachedMachine) {
    let mut env = m.rec.spec.env.clone();
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
        (status = 200, body = ExecResult),
        (status = 409, description = "Not running", body = hyperfleet_api::ErrorBody),
        (status = 502, description = "Agent unreachable (AGENT_ERROR)", body = hyperfleet_api::ErrorBody),
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
    let (m, agent) = agent_of(&state, &caller, &id, Scope::Exec).await?;
    with_machine_env(&mut preq, &m);

    if !q.stream.unwrap_or(false) {
        let out = agent
            .exec_collect_with_stdin(preq, stdin.as_deref(), cap)
            .await
            .map_err(agent_error)?;
        return Ok(axum::Json(ExecResult {
            exit_code: out.exit_code,
            signal: out.signal,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            timed_out: out.timed_out,
            truncated: out.truncated,
            duration_ms: out.duration_ms,
        })
        .into_response());
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
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(events),
    )
        .into_response())
}

#[utoipa::path(get, path = "/machines/{id}/exec/ws", tag = "guest",
    description = "Interactive exec over a WebSocket. The client's first message is an \
                   `ExecRequest` as JSON text; then binary messages are the command's stdin, \
                   and the text messages `{\"type\":\"eof\"}` (close stdin) and \
                   `{\"type\":\"cancel\"}` (kill) control it. The server sends one \
                   `ExecStreamEvent` per text message as output arrives, ending with `exit` or \
                   `error`, then closes. Closing the socket kills the command.",
    params(("id" = String, Path, description = "Machine id or name")),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
              (status = 409, description = "Not running", body = hyperfleet_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn exec_ws(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (m, agent) = agent_of(&state, &caller, &id, Scope::Exec).await?;
    Ok(ws.on_upgrade(move |socket| exec_session(socket, agent, m)))
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

/// One interactive command: stdin from the socket, output to it.
async fn exec_session(mut socket: WebSocket, agent: AgentClient, m: Arc<CachedMachine>) {
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

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FileQuery {
    /// Absolute path in the guest.
    path: Option<String>,
    /// GET: answer with the raw bytes (also chosen by `Accept: application/octet-stream`).
    raw: Option<bool>,
    /// DELETE: remove directories with their content.
    recursive: Option<bool>,
    /// PUT/mkdir: permission bits (decimal, e.g. 420 for 0644).
    mode: Option<u32>,
    /// PUT: create missing parent directories.
    create_dirs: Option<bool>,
}

fn required_path(q: &FileQuery) -> Result<String, ApiError> {
    let p = q
        .path
        .clone()
        .ok_or_else(|| ApiError::validation("path: the query parameter is required"))?;
    check_path(&p)?;
    Ok(p)
}

/// The `?path=` of a file request (validated first) and the machine's agent.
async fn file_target(
    state: &AppState,
    caller: &Caller,
    id: &str,
    q: &FileQuery,
) -> Result<(String, AgentClient), ApiError> {
    let path = required_path(q)?;
    let (_, agent) = agent_of(state, caller, id, Scope::Exec).await?;
    Ok((path, agent))
}

fn kind_name(k: proto::FileKind) -> &'static str {
    match k {
        proto::FileKind::File => "file",
        proto::FileKind::Dir => "dir",
        proto::FileKind::Symlink => "symlink",
        proto::FileKind::Other => "other",
    }
}

#[utoipa::path(post, path = "/machines/{id}/files", tag = "guest",
    description = "Write a file from base64 content (the seeds' JSON form). For large files use \
                   the raw form: `PUT /machines/{id}/files?path=` with the bytes as the body.",
    params(("id" = String, Path, description = "Machine id or name"), FileQuery),
    request_body = FileWrite,
    responses((status = 201, body = FileWritten)), security(("bearer" = [])))]
pub async fn write_json(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
    Json(body): Json<FileWrite>,
) -> Result<Response, ApiError> {
    let path = body
        .path
        .clone()
        .or(q.path.clone())
        .ok_or_else(|| ApiError::validation("path: give it in the body or as ?path="))?;
    check_path(&path)?;
    let data = B64
        .decode(&body.content)
        .map_err(|e| ApiError::validation(format!("content: not valid base64: {e}")))?;
    let (_, agent) = agent_of(&state, &caller, &id, Scope::Exec).await?;
    let opts = WriteOptions {
        create_dirs: body.create_dirs,
        mode: body.mode,
        append: false,
        sync: true,
    };
    let size = agent
        .write_file(&path, opts, &data[..])
        .await
        .map_err(agent_error)?;
    Ok((StatusCode::CREATED, axum::Json(FileWritten { path, size })).into_response())
}

#[utoipa::path(put, path = "/machines/{id}/files", tag = "guest",
    description = "Upload the request body as the file at `path`, streamed (any size, bounded memory).",
    params(("id" = String, Path, description = "Machine id or name"), FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = FileWritten)), security(("bearer" = [])))]
pub async fn write_raw(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    let (path, agent) = file_target(&state, &caller, &id, &q).await?;
    let opts = WriteOptions {
        create_dirs: q.create_dirs.unwrap_or(false),
        mode: q.mode,
        append: false,
        sync: true,
    };
    let body = req
        .into_body()
        .into_data_stream()
        .map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(body);
    let size = agent
        .write_file(&path, opts, reader)
        .await
        .map_err(agent_error)?;
    Ok((StatusCode::CREATED, axum::Json(FileWritten { path, size })).into_response())
}

/// A parsed `Range: bytes=…` header (a single range).
fn parse_range(h: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = h.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = v.strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Several ranges: serve the whole file (allowed by RFC 9110).
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        (s, "") => (s.parse().map_err(|_| ())?, size.saturating_sub(1)),
        (s, e) => {
            let s: u64 = s.parse().map_err(|_| ())?;
            let e: u64 = e.parse().map_err(|_| ())?;
            (s, e.min(size.saturating_sub(1)))
        }
    };
    if start >= size || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

#[utoipa::path(get, path = "/machines/{id}/files", tag = "guest",
    description = "Read a file. JSON with base64 content by default (files up to 16 MiB); with \
                   `?raw=true` or `Accept: application/octet-stream`, the bytes streamed, with \
                   `Range` support (206 / 416).",
    params(("id" = String, Path, description = "Machine id or name"), FileQuery),
    responses((status = 200, body = FileContent), (status = 206, description = "Partial content (raw)"),
              (status = 404, body = hyperfleet_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn read(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let path = required_path(&q)?;
    let raw = q.raw.unwrap_or(false)
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/octet-stream"));
    let (_, agent) = agent_of(&state, &caller, &id, Scope::Exec).await?;
    let st = agent.stat(&path).await.map_err(agent_error)?;
    if st.kind != proto::FileKind::File {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("{path} is a {}, not a file", kind_name(st.kind)),
        ));
    }
    if !raw {
        if st.size > JSON_FILE_MAX {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "{path} is {} bytes; the JSON form returns at most {JSON_FILE_MAX}: use ?raw=true",
                    st.size
                ),
            ));
        }
        let mut r = agent.read_file(&path, None).await.map_err(agent_error)?;
        let mut data = Vec::with_capacity(st.size as usize);
        while let Some(chunk) = r.next_chunk().await.map_err(agent_error)? {
            data.extend_from_slice(&chunk);
        }
        let size = data.len() as u64;
        return Ok(axum::Json(FileContent {
            path,
            content: B64.encode(&data),
            size,
        })
        .into_response());
    }
    let size = st.size;
    let range = match parse_range(&headers, size) {
        Ok(r) => r,
        Err(()) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                ApiError::new(
                    ErrorCode::BadRequest,
                    "the requested range is not satisfiable",
                )
                .into_response(),
            )
                .into_response())
        }
    };
    let (status, br, len) = match range {
        Some((s, e)) => (
            StatusCode::PARTIAL_CONTENT,
            Some(ByteRange {
                offset: s,
                length: Some(e - s + 1),
            }),
            e - s + 1,
        ),
        None => (StatusCode::OK, None, size),
    };
    let reader = agent.read_file(&path, br).await.map_err(agent_error)?;
    let body = stream::unfold(Some(reader), |r| async move {
        let mut r = r?;
        match r.next_chunk().await {
            Ok(Some(b)) => Some((Ok::<_, std::io::Error>(b), Some(r))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(chain(&e))), None)),
        }
    });
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, len.into());
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    if let Some((s, e)) = range {
        if let Ok(v) = header::HeaderValue::from_str(&format!("bytes {s}-{e}/{size}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}

#[utoipa::path(delete, path = "/machines/{id}/files", tag = "guest",
    params(("id" = String, Path, description = "Machine id or name"), FileQuery),
    responses((status = 204, description = "Removed"), (status = 404, body = hyperfleet_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let path = required_path(&q)?;
    if path == "/" {
        return Err(ApiError::validation(
            "path: refusing to remove the guest's root",
        ));
    }
    let (_, agent) = agent_of(&state, &caller, &id, Scope::Exec).await?;
    agent
        .remove(&path, q.recursive.unwrap_or(false))
        .await
        .map_err(agent_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/machines/{id}/files/stat", tag = "guest",
    params(("id" = String, Path, description = "Machine id or name"), FileQuery),
    responses((status = 200, body = FileStat), (status = 404, body = hyperfleet_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn stat(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let (path, agent) = file_target(&state, &caller, &id, &q).await?;
    let st = agent.stat(&path).await.map_err(agent_error)?;
    Ok(axum::Json(FileStat {
        path,
        kind: kind_name(st.kind).into(),
        size: st.size,
        mode: st.mode,
        uid: st.uid,
        gid: st.gid,
        modified_at: rfc3339(st.mtime_ms),
        symlink_target: st.symlink_target,
    })
    .into_response())
}

#[utoipa::path(get, path = "/machines/{id}/files/list", tag = "guest",
    params(("id" = String, Path, description = "Machine id or name"), FileQuery),
    responses((status = 200, body = DirListing)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let (path, agent) = file_target(&state, &caller, &id, &q).await?;
    let entries = agent.list(&path).await.map_err(agent_error)?;
    Ok(axum::Json(DirListing {
        path,
        entries: entries
            .into_iter()
            .map(|e| DirEntry {
                name: e.name,
                kind: kind_name(e.kind).into(),
                size: e.size,
                mode: e.mode,
                modified_at: rfc3339(e.mtime_ms),
            })
            .collect(),
    })
    .into_response())
}

#[utoipa::path(post, path = "/machines/{id}/files/mkdir", tag = "guest",
    description = "Create a directory and its missing parents.",
    params(("id" = String, Path, description = "Machine id or name"), FileQuery),
    responses((status = 204, description = "Created (or already there)")), security(("bearer" = [])))]
pub async fn mkdir(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let (path, agent) = file_target(&state, &caller, &id, &q).await?;
    agent
        .mkdir(&path, true, q.mode)
        .await
        .map_err(agent_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Only the last N lines (default 200, at most 100000).
    tail: Option<usize>,
    /// Keep the response open and stream new console output.
    follow: Option<bool>,
}

#[utoipa::path(get, path = "/machines/{id}/logs", tag = "guest",
    description = "The guest's serial console (text/plain). `follow=true` streams new output \
                   until the machine is deleted or the client goes away.",
    params(("id" = String, Path, description = "Machine id or name"), LogsQuery),
    responses((status = 200, description = "Console text", content_type = "text/plain")),
    security(("bearer" = [])))]
pub async fn logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let p = caller.require(Scope::Read)?;
    let m = state
        .store
        .get(Some(&p.tenant), &id)?
        .ok_or_else(|| ApiError::not_found(format!("machine '{id}'")))?;
    let tail = q.tail.unwrap_or(200);
    if tail > 100_000 {
        return Err(ApiError::validation("tail: at most 100000 lines"));
    }
    let ctx = state.sup.ctx();
    let paths = ctx.paths(&m.rec.id);
    let file = match ctx.backends.get(&m.rec.spec.vmm) {
        Some(b) => b.console_log(&paths),
        None => paths.console_log(),
    };
    let (text, offset) = crate::logs::tail(&file, tail)
        .await
        .map_err(|e| ApiError::internal("reading the console log", e))?;
    if !q.follow.unwrap_or(false) {
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response());
    }
    let store = state.store.clone();
    let mid = m.rec.id.clone();
    let follow = crate::logs::follow(file, offset, move || {
        // A read error is not a deletion: keep following.
        store.get_by_id(&mid).map_or(true, |m| m.is_some())
    })
    .map(Ok::<_, Infallible>);
    let body = stream::once(async move { Ok::<_, Infallible>(Bytes::from(text)) }).chain(follow);
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(body),
    )
        .into_response())
}

//! Files in the guest: the seeds' JSON/base64 form (bounded by the JSON cap,
//! refused beyond it), the raw streamed form with `Range`, and stat, list,
//! mkdir and delete.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures_util::{stream, TryStreamExt};
use hyperfleet_agent_proto::{self as proto, AgentClient, ByteRange, WriteOptions};
use hyperfleet_api::{
    DirEntry, DirListing, ErrorCode, FileContent, FileStat, FileWrite, FileWritten, Scope,
};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use utoipa::IntoParams;

use super::super::error::ApiError;
use super::super::extract::{Caller, Json, Query};
use super::super::AppState;
use super::{agent_error, guest_of, holding, Guest, Slot, B64};
use crate::util::error_chain as chain;
use crate::util::rfc3339;
use hyperfleet_api::schema::{GUEST_PATH_MAX_CHARS, MODE_MAX};

/// An absolute guest path of at most [`GUEST_PATH_MAX_CHARS`] characters
/// without NUL: what the schema's `guest_path` states.
fn check_path(path: &str) -> Result<(), ApiError> {
    if !path.starts_with('/') || path.chars().count() > GUEST_PATH_MAX_CHARS || path.contains('\0')
    {
        return Err(ApiError::validation(format!(
            "path: must be an absolute guest path of at most {GUEST_PATH_MAX_CHARS} characters, \
             without NUL"
        )));
    }
    Ok(())
}

/// Permission bits: at most `0o7777`.
fn check_mode(mode: Option<u32>) -> Result<(), ApiError> {
    match mode {
        Some(m) if m > MODE_MAX => Err(ApiError::validation(format!(
            "mode: permission bits, at most {MODE_MAX} (0o7777), got {m}"
        ))),
        _ => Ok(()),
    }
}

/// `GET /machines/{id}/files`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    /// Absolute path in the guest (at most 4096 characters, no NUL).
    #[param(max_length = 4096, pattern = r"^/[^\x00]*$")]
    path: String,
    /// Answer with the raw bytes (also chosen by `Accept: application/octet-stream`).
    raw: Option<bool>,
}

/// `DELETE /machines/{id}/files`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    /// Absolute path in the guest; never the root however spelled (`/`, `//`,
    /// `/./`), and no `..` components.
    // The pattern is hyperfleet_api::schema::REMOVABLE_GUEST_PATH (a test checks).
    #[param(
        max_length = 4096,
        pattern = r"^(?:/(?:[^/.\x00][^/\x00]*|\.[^/.\x00][^/\x00]*|\.\.[^/\x00]+|\.)?)*/(?:[^/.\x00][^/\x00]*|\.[^/.\x00][^/\x00]*|\.\.[^/\x00]+)(?:/(?:[^/.\x00][^/\x00]*|\.[^/.\x00][^/\x00]*|\.\.[^/\x00]+|\.)?)*$"
    )]
    path: String,
    /// Remove directories with their content.
    recursive: Option<bool>,
}

/// `GET /machines/{id}/files/stat` and `…/files/list`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    /// Absolute path in the guest (at most 4096 characters, no NUL).
    #[param(max_length = 4096, pattern = r"^/[^\x00]*$")]
    path: String,
}

/// `PUT /machines/{id}/files` and `POST …/files/mkdir` (which always
/// creates the missing parents and ignores `create_dirs`).
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WriteQuery {
    /// Absolute path in the guest (at most 4096 characters, no NUL).
    #[param(max_length = 4096, pattern = r"^/[^\x00]*$")]
    path: String,
    /// Permission bits (decimal, e.g. 420 for 0644), at most 4095 (0o7777).
    #[param(minimum = 0, maximum = 4095)]
    mode: Option<u32>,
    /// PUT: create missing parent directories.
    create_dirs: Option<bool>,
}

/// The `POST` (JSON) form takes everything from its body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoQuery {}

/// The checked `path`, the machine's agent and the request's slot.
async fn file_target(
    state: &AppState,
    caller: &Caller,
    id: &str,
    path: &str,
) -> Result<(String, AgentClient, Slot), ApiError> {
    check_path(path)?;
    let g = guest_of(state, caller, id, Scope::Exec).await?;
    Ok((path.to_string(), g.agent, g.slot))
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
    params(("id" = String, Path, description = "Machine id or name")),
    request_body = FileWrite,
    responses((status = 201, body = FileWritten)), security(("bearer" = [])))]
pub async fn write_json(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(NoQuery {}): Query<NoQuery>,
    Json(body): Json<FileWrite>,
) -> Result<Response, ApiError> {
    let path = body.path.clone();
    check_path(&path)?;
    check_mode(body.mode)?;
    let data = B64
        .decode(&body.content)
        .map_err(|e| ApiError::validation(format!("content: not valid base64: {e}")))?;
    let Guest { agent, slot, .. } = guest_of(&state, &caller, &id, Scope::Exec).await?;
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
    drop(slot);
    Ok((StatusCode::CREATED, axum::Json(FileWritten { path, size })).into_response())
}

#[utoipa::path(put, path = "/machines/{id}/files", tag = "guest",
    description = "Upload the request body as the file at `path`, streamed (any size, bounded memory).",
    params(("id" = String, Path, description = "Machine id or name"), WriteQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = FileWritten)), security(("bearer" = [])))]
pub async fn write_raw(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<WriteQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    check_mode(q.mode)?;
    let (path, agent, _slot) = file_target(&state, &caller, &id, &q.path).await?;
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
    description = "Read a file. JSON with base64 content by default, for files up to the JSON cap \
                   (16 MiB unless `--guest-json-max-bytes` says otherwise; larger ones, or one \
                   that grows past the cap while read, get 413); with `?raw=true` or `Accept: \
                   application/octet-stream`, the bytes streamed, any size, with `Range` support \
                   (206 / 416).",
    params(("id" = String, Path, description = "Machine id or name"), ReadQuery),
    responses((status = 200, description = "The file: JSON with base64 content, or the raw bytes",
                  content((FileContent = "application/json"), (Vec<u8> = "application/octet-stream"))),
              (status = 206, description = "Partial content (raw, with `Range`)", body = Vec<u8>, content_type = "application/octet-stream"),
              (status = 413, description = "Larger than the JSON form returns; use ?raw=true", body = hyperfleet_api::ErrorBody),
              (status = 416, description = "The `Range` is not satisfiable (raw)", body = hyperfleet_api::ErrorBody)),
    security(("bearer" = [])))]
pub async fn read(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<ReadQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_path(&q.path)?;
    let path = q.path;
    let raw = q.raw.unwrap_or(false)
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/octet-stream"));
    let Guest { agent, slot, .. } = guest_of(&state, &caller, &id, Scope::Exec).await?;
    let st = agent.stat(&path).await.map_err(agent_error)?;
    if st.kind != proto::FileKind::File {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("{path} is a {}, not a file", kind_name(st.kind)),
        ));
    }
    if !raw {
        let max = state.guest.limits().json_max_bytes;
        if st.size > max as u64 {
            return Err(too_large_for_json(&path, max));
        }
        // The file may have grown (or been swapped) since the stat: ask the
        // agent for one byte more than the cap, and stop there whatever it sends.
        let range = ByteRange {
            offset: 0,
            length: Some(max as u64 + 1),
        };
        let r = agent
            .read_file(&path, Some(range))
            .await
            .map_err(agent_error)?;
        let data = read_at_most(r, max)
            .await
            .map_err(read_error)?
            .ok_or_else(|| too_large_for_json(&path, max))?;
        let size = data.len() as u64;
        let resp = axum::Json(FileContent {
            path,
            content: B64.encode(&data),
            size,
        })
        .into_response();
        return Ok(holding(resp, slot));
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
    Ok(holding(resp, slot))
}

fn too_large_for_json(path: &str, max: usize) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!(
            "{path} is larger than the {max} bytes the JSON form returns; read it streamed \
             with ?raw=true (or Accept: application/octet-stream)"
        ),
    )
}

/// All of `r` when it is at most `max` bytes, `None` as soon as it turns out
/// longer: never more than `max + 1` bytes are read or held.
async fn read_at_most<R: AsyncRead + Unpin>(r: R, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut data = Vec::new();
    r.take(max as u64 + 1).read_to_end(&mut data).await?;
    Ok((data.len() <= max).then_some(data))
}

/// A download's error back as the agent's own, when it is one.
fn read_error(e: std::io::Error) -> ApiError {
    match e.into_inner().map(|b| b.downcast::<proto::Error>()) {
        Some(Ok(pe)) => agent_error(*pe),
        Some(Err(other)) => agent_error(proto::Error::Io(std::io::Error::other(other))),
        None => agent_error(proto::Error::Closed),
    }
}

#[utoipa::path(delete, path = "/machines/{id}/files", tag = "guest",
    params(("id" = String, Path, description = "Machine id or name"), RemoveQuery),
    responses((status = 204, description = "Removed")),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Result<Response, ApiError> {
    check_path(&q.path)?;
    let path = removable_path(&q.path)?;
    let Guest { agent, .. } = guest_of(&state, &caller, &id, Scope::Exec).await?;
    agent
        .remove(&path, q.recursive.unwrap_or(false))
        .await
        .map_err(agent_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The path to remove, with repeated slashes and `.` components dropped, so
/// that no spelling of the guest's root (`//`, `/./`) gets past the guard.
/// `..` is refused outright: through a symlink it can name the root (or any
/// directory) whatever it looks like.
fn removable_path(path: &str) -> Result<String, ApiError> {
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(ApiError::validation(
                    "path: '..' components are not allowed when removing; give the path itself",
                ))
            }
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(ApiError::validation(
            "path: refusing to remove the guest's root",
        ));
    }
    Ok(format!("/{}", parts.join("/")))
}

#[utoipa::path(get, path = "/machines/{id}/files/stat", tag = "guest",
    params(("id" = String, Path, description = "Machine id or name"), PathQuery),
    responses((status = 200, body = FileStat)),
    security(("bearer" = [])))]
pub async fn stat(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let (path, agent, _slot) = file_target(&state, &caller, &id, &q.path).await?;
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
    params(("id" = String, Path, description = "Machine id or name"), PathQuery),
    responses((status = 200, body = DirListing)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, ApiError> {
    let (path, agent, _slot) = file_target(&state, &caller, &id, &q.path).await?;
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
    params(("id" = String, Path, description = "Machine id or name"), WriteQuery),
    responses((status = 204, description = "Created (or already there)")), security(("bearer" = [])))]
pub async fn mkdir(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<WriteQuery>,
) -> Result<Response, ApiError> {
    check_mode(q.mode)?;
    let (path, agent, _slot) = file_target(&state, &caller, &id, &q.path).await?;
    agent
        .mkdir(&path, true, q.mode)
        .await
        .map_err(agent_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reading_stops_one_byte_past_the_cap() {
        // An endless source (a file that keeps growing): refused after max + 1 bytes.
        let mut endless = tokio::io::repeat(0);
        let got = read_at_most(&mut endless, 1000).await.unwrap();
        assert!(got.is_none());
        let got = read_at_most(&b"exactly ten"[..10], 10).await.unwrap();
        assert_eq!(got.as_deref(), Some(&b"exactly te"[..]));
        let got = read_at_most(&b"eleven byte"[..], 10).await.unwrap();
        assert!(got.is_none());
    }

    #[test]
    fn the_documented_path_patterns_are_the_shared_ones() {
        use hyperfleet_api::schema::{GUEST_PATH, REMOVABLE_GUEST_PATH};
        let pattern = |params: Vec<utoipa::openapi::path::Parameter>| {
            let p = params.into_iter().find(|p| p.name == "path").unwrap();
            assert!(p.required == utoipa::openapi::Required::True);
            let v = serde_json::to_value(p.schema.unwrap()).unwrap();
            assert_eq!(v["maxLength"], 4096);
            v["pattern"].as_str().unwrap().to_string()
        };
        assert_eq!(pattern(ReadQuery::into_params(|| None)), GUEST_PATH);
        assert_eq!(pattern(PathQuery::into_params(|| None)), GUEST_PATH);
        assert_eq!(pattern(WriteQuery::into_params(|| None)), GUEST_PATH);
        assert_eq!(
            pattern(RemoveQuery::into_params(|| None)),
            REMOVABLE_GUEST_PATH
        );
    }

    #[test]
    fn no_spelling_of_the_root_can_be_removed() {
        for root in ["/", "//", "///", "/.", "/./", "/./.", "//.//"] {
            let e = removable_path(root).err().unwrap();
            assert!(e.message.contains("root"), "{root}: {}", e.message);
        }
        for dotdot in ["/..", "/tmp/..", "/tmp/link/..", "/../tmp"] {
            let e = removable_path(dotdot).err().unwrap();
            assert!(e.message.contains("'..'"), "{dotdot}: {}", e.message);
        }
        assert_eq!(removable_path("//tmp/./a//b/").unwrap(), "/tmp/a/b");
        assert_eq!(removable_path("/tmp/..x").unwrap(), "/tmp/..x");
    }
}

//! A minimal HTTP/1.1 client for Firecracker's API socket.
//!
//! Firecracker serves a small REST API on a unix socket; every request we
//! make has a small JSON body (or none) and every answer carries a
//! `Content-Length`. Rather than pulling hyper's client machinery onto a unix
//! socket connector, this module writes one request per connection by hand
//! and reads the answer's status line, headers and exactly `Content-Length`
//! bytes of body. That is all the API needs, it has no connection pool to go
//! stale when a Firecracker process is replaced, and every call is bounded by
//! a timeout.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::vmm::VmmError;

/// How long one API call may take (Firecracker answers in microseconds to
/// milliseconds; a snapshot of a large guest takes longer).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Largest response body accepted (Firecracker's are a few KiB).
const MAX_BODY: usize = 1 << 20;

/// A parsed answer.
#[derive(Debug, Clone)]
pub(crate) struct Response {
    pub status: u16,
    /// The body as JSON, or `Value::Null` when empty.
    pub body: Value,
}

fn control(doing: &str, detail: impl Into<String>) -> VmmError {
    VmmError::Control {
        doing: doing.to_string(),
        detail: detail.into(),
    }
}

/// Sends one request and returns the answer, whatever its status.
pub(crate) async fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Response, VmmError> {
    let doing = format!("{method} {path} on the Firecracker API");
    tokio::time::timeout(CALL_TIMEOUT, call_inner(sock, method, path, body, &doing))
        .await
        .map_err(|_| control(&doing, format!("no answer within {CALL_TIMEOUT:?}")))?
}

async fn call_inner(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    doing: &str,
) -> Result<Response, VmmError> {
    let mut stream = UnixStream::connect(sock)
        .await
        .map_err(|e| control(doing, format!("{}: {e}", sock.display())))?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if body.is_some() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", payload.len()));
    req.push_str(&payload);
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| control(doing, format!("sending the request: {e}")))?;

    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)
        .await
        .map_err(|e| control(doing, format!("reading the status line: {e}")))?;
    let status = parse_status(&line)
        .ok_or_else(|| control(doing, format!("malformed status line {:?}", line.trim())))?;
    let mut len = 0usize;
    loop {
        line.clear();
        let n = r
            .read_line(&mut line)
            .await
            .map_err(|e| control(doing, format!("reading the headers: {e}")))?;
        if n == 0 {
            return Err(control(doing, "the connection closed inside the headers"));
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                len = value
                    .trim()
                    .parse()
                    .map_err(|_| control(doing, format!("bad Content-Length {:?}", value)))?;
            }
        }
    }
    if len > MAX_BODY {
        return Err(control(doing, format!("a {len}-byte answer is too large")));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)
        .await
        .map_err(|e| control(doing, format!("reading the body: {e}")))?;
    let body = if buf.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&buf)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&buf).into_owned()))
    };
    Ok(Response { status, body })
}

fn parse_status(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    let proto = parts.next()?;
    if !proto.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Sends one request and insists on a 2xx answer; Firecracker's
/// `fault_message` becomes the error's detail.
pub(crate) async fn expect_ok(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, VmmError> {
    let r = call(sock, method, path, body).await?;
    if (200..300).contains(&r.status) {
        return Ok(r.body);
    }
    let detail = r
        .body
        .get("fault_message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| r.body.to_string());
    Err(control(
        &format!("{method} {path} on the Firecracker API"),
        format!("HTTP {}: {detail}", r.status),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A one-shot server that records the request and sends `answer`.
    async fn serve_once(
        answer: &'static str,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        tokio::task::JoinHandle<String>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let h = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut r = BufReader::new(s);
            let mut req = String::new();
            let mut len = 0;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).await.unwrap();
                if let Some(v) = line.strip_prefix("Content-Length: ") {
                    len = v.trim().parse().unwrap();
                }
                req.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).await.unwrap();
            req.push_str(&String::from_utf8(body).unwrap());
            r.into_inner().write_all(answer.as_bytes()).await.unwrap();
            req
        });
        (dir, sock, h)
    }

    #[tokio::test]
    async fn a_put_sends_json_with_its_length_and_reads_a_204() {
        let (_d, sock, h) = serve_once("HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n").await;
        let body = serde_json::json!({"state": "Paused"});
        let v = expect_ok(&sock, "PATCH", "/vm", Some(&body)).await.unwrap();
        assert_eq!(v, Value::Null);
        let req = h.await.unwrap();
        assert!(req.starts_with("PATCH /vm HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("Content-Length: 18\r\n"), "{req}");
        assert!(req.ends_with("{\"state\":\"Paused\"}"), "{req}");
    }

    #[tokio::test]
    async fn a_get_reads_exactly_the_content_length() {
        // Bytes past the declared length are not read as body.
        let (_d, sock, _h) = serve_once(
            "HTTP/1.1 200 OK\r\ncontent-length: 19\r\n\r\n{\"state\":\"Running\"}trailing",
        )
        .await;
        let r = call(&sock, "GET", "/", None).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body["state"], "Running");
    }

    #[tokio::test]
    async fn an_error_answer_names_the_fault_message() {
        let body = "{\"fault_message\":\"bad things\"}";
        let answer: &'static str = Box::leak(
            format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let (_d, sock, _h) = serve_once(answer).await;
        let e = expect_ok(&sock, "PUT", "/actions", None)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("HTTP 400: bad things"), "{e}");
        assert!(e.contains("PUT /actions"), "{e}");
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_control_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = call(&dir.path().join("nope.sock"), "GET", "/", None)
            .await
            .unwrap_err();
        assert!(matches!(e, VmmError::Control { .. }), "{e}");
    }
}

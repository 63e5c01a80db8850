//! A typed client for the Hyperfleet REST API, used by the CLI and usable
//! as the Rust SDK. Every method maps one route; API errors come back as
//! [`ClientError::Api`] with the server's code and message.

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use hyperfleet_api::{
    CreateKeyRequest, CreateMachineRequest, CreateSnapshotRequest, CreateTemplateRequest,
    CreatedKey, ErrorBody, ErrorCode, EventList, ExecRequest, ExecResult, ExecStreamEvent,
    FileWritten, ForkRequest, ForkResult, Health, KeyList, Machine, MachineEvent, MachineList,
    MachineStatus, Quota, QuotaLimits, Snapshot, SnapshotList,
};
use hyperfleet_api::{Image, ImageEventList, ImageList, PullImageRequest};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the server at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{message} ({code:?}, HTTP {status})")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    #[error("the server answered HTTP {status} with an unexpected body: {body}")]
    Unexpected { status: u16, body: String },
    #[error("invalid server URL '{0}'")]
    BadUrl(String),
    #[error("the WebSocket session failed: {0}")]
    WebSocket(String),
}

type WsSink = std::pin::Pin<
    Box<
        dyn futures_util::Sink<
                tokio_tungstenite::tungstenite::Message,
                Error = tokio_tungstenite::tungstenite::Error,
            > + Send,
    >,
>;

/// The input half of an interactive command.
pub struct ExecInput {
    sink: WsSink,
}

impl ExecInput {
    /// Sends bytes to the command's stdin.
    pub async fn send(&mut self, data: Vec<u8>) -> Result<(), ClientError> {
        use futures_util::SinkExt;
        self.sink
            .send(tokio_tungstenite::tungstenite::Message::Binary(data.into()))
            .await
            .map_err(|e| ClientError::WebSocket(e.to_string()))
    }

    async fn control(&mut self, kind: &str) -> Result<(), ClientError> {
        use futures_util::SinkExt;
        let msg = format!("{{\"type\":\"{kind}\"}}");
        self.sink
            .send(tokio_tungstenite::tungstenite::Message::Text(msg.into()))
            .await
            .map_err(|e| ClientError::WebSocket(e.to_string()))
    }

    /// Closes the command's stdin.
    pub async fn eof(&mut self) -> Result<(), ClientError> {
        self.control("eof").await
    }

    /// Kills the command.
    pub async fn cancel(&mut self) -> Result<(), ClientError> {
        self.control("cancel").await
    }
}

impl ClientError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

/// What an action's answer means: the machine reached its target, or (with
/// `wait=false`) the request was accepted and goes on.
pub enum ActionResult {
    Done(Machine),
    Accepted(Machine),
    Deleted,
}

impl Client {
    /// `base` like `http://127.0.0.1:3000`; routes go under `/api/v1`.
    pub fn new(base: &str, key: Option<String>) -> Result<Client, ClientError> {
        let base = base.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::BadUrl(base.to_string()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ClientError::Connect {
                url: base.to_string(),
                source: e,
            })?;
        Ok(Client {
            http,
            base: format!("{base}/api/v1"),
            key,
        })
    }

    fn req(&self, method: Method, path: &str) -> RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        r
    }

    async fn send(&self, r: RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = r.send().await.map_err(|e| ClientError::Connect {
            url: self.base.clone(),
            source: e,
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&body) {
            Ok(e) => Err(ClientError::Api {
                status,
                code: e.error.code,
                message: e.error.message,
            }),
            Err(_) => Err(ClientError::Unexpected { status, body }),
        }
    }

    async fn json<T: DeserializeOwned>(&self, r: RequestBuilder) -> Result<T, ClientError> {
        let resp = self.send(r).await?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| ClientError::Connect {
            url: self.base.clone(),
            source: e,
        })?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Unexpected {
            status,
            body: format!("{e}: {}", String::from_utf8_lossy(&body)),
        })
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        // 503 still carries a Health body.
        let resp =
            self.req(Method::GET, "/health")
                .send()
                .await
                .map_err(|e| ClientError::Connect {
                    url: self.base.clone(),
                    source: e,
                })?;
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        serde_json::from_str(&body).map_err(|_| ClientError::Unexpected { status, body })
    }

    pub async fn create_machine(&self, req: &CreateMachineRequest) -> Result<Machine, ClientError> {
        self.json(self.req(Method::POST, "/machines").json(req))
            .await
    }

    pub async fn list_machines(
        &self,
        status: Option<MachineStatus>,
        limit: Option<usize>,
        offset: Option<usize>,
    ) -> Result<MachineList, ClientError> {
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(s) = status {
            q.push(("status", s.to_string()));
        }
        if let Some(l) = limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(o) = offset {
            q.push(("offset", o.to_string()));
        }
        self.json(self.req(Method::GET, "/machines").query(&q))
            .await
    }

    pub async fn get_machine(&self, id: &str) -> Result<Machine, ClientError> {
        self.json(self.req(Method::GET, &format!("/machines/{}", enc(id))))
            .await
    }

    /// `PATCH /machines/{id}`: changes the idle timeout, persistence or
    /// metadata (fields left `None` stay as they are).
    pub async fn update_machine(
        &self,
        id: &str,
        req: &hyperfleet_api::UpdateMachineRequest,
    ) -> Result<Machine, ClientError> {
        self.json(
            self.req(Method::PATCH, &format!("/machines/{}", enc(id)))
                .json(req),
        )
        .await
    }

    /// `GET /storage` (operator keys): the storage budget and its use.
    pub async fn storage(&self) -> Result<hyperfleet_api::Storage, ClientError> {
        self.json(self.req(Method::GET, "/storage")).await
    }

    /// `action` is one of start, stop, restart, pause, resume, kill, suspend.
    pub async fn action(
        &self,
        id: &str,
        action: &str,
        wait: bool,
        timeout_secs: Option<u64>,
    ) -> Result<ActionResult, ClientError> {
        let mut q = vec![("wait", wait.to_string())];
        if let Some(t) = timeout_secs {
            q.push(("timeout", t.to_string()));
        }
        let r = self
            .req(Method::POST, &format!("/machines/{}/{action}", enc(id)))
            .query(&q)
            .timeout(Duration::from_secs(timeout_secs.unwrap_or(60) + 30));
        let resp = self.send(r).await?;
        // A stop of an ephemeral machine deletes it.
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(ActionResult::Deleted);
        }
        let accepted = resp.status() == StatusCode::ACCEPTED;
        let m: Machine = resp.json().await.map_err(|e| ClientError::Connect {
            url: self.base.clone(),
            source: e,
        })?;
        Ok(if accepted {
            ActionResult::Accepted(m)
        } else {
            ActionResult::Done(m)
        })
    }

    pub async fn delete_machine(
        &self,
        id: &str,
        force: bool,
        wait: bool,
        timeout_secs: Option<u64>,
    ) -> Result<ActionResult, ClientError> {
        let mut q = vec![("force", force.to_string()), ("wait", wait.to_string())];
        if let Some(t) = timeout_secs {
            q.push(("timeout", t.to_string()));
        }
        let r = self
            .req(Method::DELETE, &format!("/machines/{}", enc(id)))
            .query(&q)
            .timeout(Duration::from_secs(timeout_secs.unwrap_or(60) + 30));
        let resp = self.send(r).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(ActionResult::Deleted);
        }
        let m: Machine = resp.json().await.map_err(|e| ClientError::Connect {
            url: self.base.clone(),
            source: e,
        })?;
        Ok(ActionResult::Accepted(m))
    }

    pub async fn wait(
        &self,
        id: &str,
        status: MachineStatus,
        timeout_secs: u64,
    ) -> Result<Machine, ClientError> {
        let r = self
            .req(Method::GET, &format!("/machines/{}/wait", enc(id)))
            .query(&[
                ("status", status.to_string()),
                ("timeout", timeout_secs.to_string()),
            ])
            .timeout(Duration::from_secs(timeout_secs + 30));
        self.json(r).await
    }

    pub async fn events(&self, id: &str) -> Result<EventList, ClientError> {
        self.json(self.req(Method::GET, &format!("/machines/{}/events", enc(id))))
            .await
    }

    /// The machine's history, then live events until it is deleted.
    pub async fn follow_events(
        &self,
        id: &str,
    ) -> Result<impl Stream<Item = Result<MachineEvent, ClientError>>, ClientError> {
        let r = self
            .req(Method::GET, &format!("/machines/{}/events", enc(id)))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        let resp = self.send(r).await?;
        let base = self.base.clone();
        let bytes = resp.bytes_stream();
        let events = futures_util::stream::unfold(
            (bytes, String::new(), base),
            |(mut bytes, mut buf, base)| async move {
                loop {
                    if let Some(end) = buf.find("\n\n") {
                        let block: String = buf.drain(..end + 2).collect();
                        let data: String = block
                            .lines()
                            .filter_map(|l| l.strip_prefix("data:"))
                            .map(str::trim_start)
                            .collect::<Vec<_>>()
                            .join("\n");
                        if data.is_empty() {
                            continue;
                        }
                        let item = serde_json::from_str::<MachineEvent>(&data).map_err(|e| {
                            ClientError::Unexpected {
                                status: 200,
                                body: format!("{e}: {data}"),
                            }
                        });
                        return Some((item, (bytes, buf, base)));
                    }
                    match bytes.next().await {
                        Some(Ok(chunk)) => buf.push_str(&String::from_utf8_lossy(&chunk)),
                        Some(Err(e)) => {
                            return Some((
                                Err(ClientError::Connect {
                                    url: base.clone(),
                                    source: e,
                                }),
                                (bytes, String::new(), base),
                            ))
                        }
                        None => return None,
                    }
                }
            },
        );
        Ok(events)
    }

    /// Runs a command and waits for it (`POST /machines/{id}/exec`).
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult, ClientError> {
        let secs = req.timeout.unwrap_or(60.0).ceil() as u64;
        let r = self
            .req(Method::POST, &format!("/machines/{}/exec", enc(id)))
            .json(req)
            .timeout(Duration::from_secs(secs + 30));
        self.json(r).await
    }

    /// Runs a command and streams its output as it arrives.
    pub async fn exec_stream(
        &self,
        id: &str,
        req: &ExecRequest,
    ) -> Result<impl Stream<Item = Result<ExecStreamEvent, ClientError>>, ClientError> {
        let r = self
            .req(Method::POST, &format!("/machines/{}/exec", enc(id)))
            .query(&[("stream", "true")])
            .json(req);
        let resp = self.send(r).await?;
        let base = self.base.clone();
        Ok(lines(resp.bytes_stream(), base).map(|line| {
            let line = line?;
            serde_json::from_str::<ExecStreamEvent>(&line).map_err(|e| ClientError::Unexpected {
                status: 200,
                body: format!("{e}: {line}"),
            })
        }))
    }

    /// Starts an interactive command over a WebSocket: the returned input
    /// half sends stdin (and EOF or cancel), the stream yields output and,
    /// last, the exit status.
    pub async fn exec_interactive(
        &self,
        id: &str,
        req: &ExecRequest,
    ) -> Result<
        (
            ExecInput,
            impl Stream<Item = Result<ExecStreamEvent, ClientError>>,
        ),
        ClientError,
    > {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::Message;
        let ws_url = format!("ws{}/machines/{}/exec/ws", &self.base[4..], enc(id));
        let mut request = ws_url
            .as_str()
            .into_client_request()
            .map_err(|_| ClientError::BadUrl(ws_url.clone()))?;
        if let Some(k) = &self.key {
            let v = format!("Bearer {k}")
                .parse()
                .map_err(|_| ClientError::BadUrl("the API key is not a valid header".into()))?;
            request.headers_mut().insert("authorization", v);
        }
        let ws_err =
            |e: tokio_tungstenite::tungstenite::Error| ClientError::WebSocket(e.to_string());
        let (mut ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(resp) => {
                    let status = resp.status().as_u16();
                    let body = resp
                        .body()
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    match serde_json::from_str::<ErrorBody>(&body) {
                        Ok(e) => ClientError::Api {
                            status,
                            code: e.error.code,
                            message: e.error.message,
                        },
                        Err(_) => ClientError::Unexpected { status, body },
                    }
                }
                e => ws_err(e),
            })?;
        // Serialising a plain struct cannot fail.
        let first = serde_json::to_string(req).expect("exec request serialises");
        ws.send(Message::Text(first.into())).await.map_err(ws_err)?;
        let (sink, stream) = ws.split();
        let events = stream.filter_map(move |m| async move {
            match m {
                Ok(Message::Text(t)) => {
                    Some(serde_json::from_str::<ExecStreamEvent>(&t).map_err(|e| {
                        ClientError::Unexpected {
                            status: 101,
                            body: format!("{e}: {t}"),
                        }
                    }))
                }
                Ok(_) => None,
                Err(e) => Some(Err(ClientError::WebSocket(e.to_string()))),
            }
        });
        Ok((
            ExecInput {
                sink: Box::pin(sink),
            },
            events,
        ))
    }

    /// Streams `body` (of `len` bytes) into `path` in the guest.
    pub async fn upload(
        &self,
        id: &str,
        path: &str,
        len: u64,
        body: reqwest::Body,
        create_dirs: bool,
    ) -> Result<FileWritten, ClientError> {
        let r = self
            .req(Method::PUT, &format!("/machines/{}/files", enc(id)))
            .query(&[
                ("path", path),
                ("create_dirs", if create_dirs { "true" } else { "false" }),
            ])
            .header(reqwest::header::CONTENT_LENGTH, len)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.json(r).await
    }

    /// Streams the guest file at `path`.
    pub async fn download(
        &self,
        id: &str,
        path: &str,
    ) -> Result<
        (
            Option<u64>,
            impl Stream<Item = Result<bytes::Bytes, ClientError>>,
        ),
        ClientError,
    > {
        let r = self
            .req(Method::GET, &format!("/machines/{}/files", enc(id)))
            .query(&[("path", path), ("raw", "true")]);
        let resp = self.send(r).await?;
        let len = resp.content_length();
        let base = self.base.clone();
        Ok((
            len,
            resp.bytes_stream().map(move |c| {
                c.map_err(|e| ClientError::Connect {
                    url: base.clone(),
                    source: e,
                })
            }),
        ))
    }

    /// The console log; with `follow`, new output keeps coming.
    pub async fn logs(
        &self,
        id: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<bytes::Bytes, ClientError>>, ClientError> {
        let mut q = vec![("follow", follow.to_string())];
        if let Some(t) = tail {
            q.push(("tail", t.to_string()));
        }
        let r = self
            .req(Method::GET, &format!("/machines/{}/logs", enc(id)))
            .query(&q);
        let resp = self.send(r).await?;
        let base = self.base.clone();
        Ok(resp.bytes_stream().map(move |c| {
            c.map_err(|e| ClientError::Connect {
                url: base.clone(),
                source: e,
            })
        }))
    }

    pub async fn create_key(&self, req: &CreateKeyRequest) -> Result<CreatedKey, ClientError> {
        self.json(self.req(Method::POST, "/keys").json(req)).await
    }

    pub async fn list_keys(&self) -> Result<KeyList, ClientError> {
        self.json(self.req(Method::GET, "/keys")).await
    }

    pub async fn revoke_key(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.req(Method::DELETE, &format!("/keys/{}", enc(id))))
            .await
            .map(drop)
    }

    /// Takes a snapshot of a machine (`POST /machines/{id}/snapshots`). With
    /// `wait` false, or when the deadline passes first, the snapshot comes
    /// back still `creating`.
    pub async fn create_snapshot(
        &self,
        machine: &str,
        req: &CreateSnapshotRequest,
        wait: bool,
        timeout_secs: Option<u64>,
    ) -> Result<Snapshot, ClientError> {
        let r = self
            .req(
                Method::POST,
                &format!("/machines/{}/snapshots", enc(machine)),
            )
            .query(&wait_query(wait, timeout_secs))
            .json(req)
            .timeout(Duration::from_secs(timeout_secs.unwrap_or(60) + 30));
        self.json(r).await
    }

    pub async fn list_snapshots(&self) -> Result<SnapshotList, ClientError> {
        self.json(self.req(Method::GET, "/snapshots")).await
    }

    /// One snapshot, by id or name.
    pub async fn get_snapshot(&self, id: &str) -> Result<Snapshot, ClientError> {
        self.json(self.req(Method::GET, &format!("/snapshots/{}", enc(id))))
            .await
    }

    /// Deletes a snapshot; while machines made from it exist its files stay
    /// (it shows `deleting`).
    pub async fn delete_snapshot(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.req(Method::DELETE, &format!("/snapshots/{}", enc(id))))
            .await
            .map(drop)
    }

    /// Makes running copies of a running machine (`POST /machines/{id}/fork`).
    pub async fn fork_machine(
        &self,
        machine: &str,
        req: &ForkRequest,
        wait: bool,
        timeout_secs: Option<u64>,
    ) -> Result<ForkResult, ClientError> {
        let r = self
            .req(Method::POST, &format!("/machines/{}/fork", enc(machine)))
            .query(&wait_query(wait, timeout_secs))
            .json(req)
            .timeout(Duration::from_secs(timeout_secs.unwrap_or(60) + 30));
        self.json(r).await
    }

    /// Makes (or finds) the template for a machine shape ahead of need
    /// (`POST /templates`, admin scope); fields left out take the server's
    /// defaults. A template is shown as a snapshot named by its key; the
    /// existing one is answered when it is ready.
    pub async fn warm_template(
        &self,
        req: &CreateTemplateRequest,
        timeout_secs: Option<u64>,
    ) -> Result<Snapshot, ClientError> {
        // Always waits: the template exists once its guest booted.
        let q: Vec<(&str, String)> = timeout_secs
            .map(|t| vec![("timeout", t.to_string())])
            .unwrap_or_default();
        let r = self
            .req(Method::POST, "/templates")
            .query(&q)
            .json(req)
            .timeout(Duration::from_secs(timeout_secs.unwrap_or(300) + 30));
        self.json(r).await
    }

    pub async fn list_templates(&self) -> Result<SnapshotList, ClientError> {
        self.json(self.req(Method::GET, "/templates")).await
    }

    pub async fn delete_template(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.req(Method::DELETE, &format!("/templates/{}", enc(id))))
            .await
            .map(drop)
    }

    /// A tenant's quota in force and what its machines hold.
    pub async fn quota(&self, tenant: &str) -> Result<Quota, ClientError> {
        self.json(self.req(Method::GET, &quota_path(tenant))).await
    }

    /// Replaces a tenant's quota (operator admin keys).
    pub async fn set_quota(
        &self,
        tenant: &str,
        limits: &QuotaLimits,
    ) -> Result<Quota, ClientError> {
        self.json(self.req(Method::PUT, &quota_path(tenant)).json(limits))
            .await
    }

    /// Removes a tenant's own quota: the server's defaults apply again.
    pub async fn reset_quota(&self, tenant: &str) -> Result<Quota, ClientError> {
        self.json(self.req(Method::DELETE, &quota_path(tenant)))
            .await
    }

    /// Starts pulling an image (202: `pulling`).
    pub async fn pull_image(&self, req: &PullImageRequest) -> Result<Image, ClientError> {
        self.json(self.req(Method::POST, "/images").json(req)).await
    }

    /// Imports an image archive (OCI layout tar or `docker save`), streamed.
    pub async fn import_image(&self, body: reqwest::Body) -> Result<Image, ClientError> {
        let r = self
            .req(Method::POST, "/images/import")
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .body(body);
        self.json(r).await
    }

    pub async fn list_images(&self) -> Result<ImageList, ClientError> {
        self.json(self.req(Method::GET, "/images")).await
    }

    pub async fn get_image(&self, id: &str) -> Result<Image, ClientError> {
        self.json(self.req(Method::GET, &format!("/images/{}", enc(id))))
            .await
    }

    pub async fn delete_image(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.req(Method::DELETE, &format!("/images/{}", enc(id))))
            .await
            .map(drop)
    }

    /// An image's stored events.
    pub async fn image_events(&self, id: &str) -> Result<ImageEventList, ClientError> {
        self.json(self.req(Method::GET, &format!("/images/{}/events", enc(id))))
            .await
    }
}

/// Splits a byte stream into text lines.
fn lines(
    bytes: impl Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
    base: String,
) -> impl Stream<Item = Result<String, ClientError>> {
    futures_util::stream::unfold(
        (bytes, Vec::<u8>::new(), base, false),
        |(mut bytes, mut buf, base, done)| async move {
            loop {
                if let Some(i) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                    if text.trim().is_empty() {
                        continue;
                    }
                    return Some((Ok(text), (bytes, buf, base, done)));
                }
                if done {
                    return None;
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        let err = ClientError::Connect {
                            url: base.clone(),
                            source: e,
                        };
                        return Some((Err(err), (bytes, Vec::new(), base, true)));
                    }
                    None => {
                        if buf.is_empty() {
                            return None;
                        }
                        buf.push(b'\n');
                        return Some((
                            Ok(String::from_utf8_lossy(&buf[..buf.len() - 1]).into_owned()),
                            (bytes, Vec::new(), base, true),
                        ));
                    }
                }
            }
        },
    )
}

/// `?wait=…&timeout=…` of the routes that may wait for an outcome.
fn wait_query(wait: bool, timeout_secs: Option<u64>) -> Vec<(&'static str, String)> {
    let mut q = vec![("wait", wait.to_string())];
    if let Some(t) = timeout_secs {
        q.push(("timeout", t.to_string()));
    }
    q
}

/// Percent-encodes a path segment (ids and names are plain, but a user may
/// type anything).
fn quota_path(tenant: &str) -> String {
    format!("/tenants/{}/quota", enc(tenant))
}

fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

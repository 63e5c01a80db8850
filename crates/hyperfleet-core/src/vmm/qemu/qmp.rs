//! A minimal QMP (QEMU Machine Protocol) client over the VMM's unix socket.
//!
//! Each operation opens its own connection: the socket then never carries
//! state across a daemon restart, and QEMU serves one QMP client at a time
//! anyway. Asynchronous events that arrive before a command's answer are
//! collected and returned alongside it.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::vmm::VmmError;

pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    /// Events seen while waiting for answers (e.g. `SHUTDOWN`).
    pub events: Vec<Value>,
}

fn err(doing: &str, detail: impl std::fmt::Display) -> VmmError {
    VmmError::Control {
        doing: format!("QMP {doing}"),
        detail: detail.to_string(),
    }
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub(crate) async fn connect(socket: &Path) -> Result<Qmp, VmmError> {
        let stream = tokio::time::timeout(TIMEOUT, UnixStream::connect(socket))
            .await
            .map_err(|_| err("connect", "timed out"))?
            .map_err(|e| err("connect", format!("{}: {e}", socket.display())))?;
        let (r, w) = stream.into_split();
        let mut q = Qmp {
            reader: BufReader::new(r),
            writer: w,
            events: Vec::new(),
        };
        let greeting = q.read_value("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(err("greeting", format!("unexpected greeting {greeting}")));
        }
        q.execute("qmp_capabilities", None).await?;
        Ok(q)
    }

    async fn read_value(&mut self, doing: &str) -> Result<Value, VmmError> {
        let mut line = String::new();
        let n = tokio::time::timeout(TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| err(doing, "no answer within 10 s"))?
            .map_err(|e| err(doing, e))?;
        if n == 0 {
            return Err(VmmError::Exited {
                doing: format!("answering QMP {doing}"),
            });
        }
        serde_json::from_str(&line).map_err(|e| err(doing, format!("{e}: {line}")))
    }

    /// Runs one command and returns its `return` value.
    pub(crate) async fn execute(
        &mut self,
        command: &str,
        args: Option<Value>,
    ) -> Result<Value, VmmError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| err(command, e))?;
        loop {
            let v = self.read_value(command).await?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(err(
                    command,
                    e.get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error"),
                ));
            }
        }
    }

    /// Waits for an asynchronous event named `name` (or any already seen).
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, VmmError> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(i));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout_at(deadline, self.reader.read_line(&mut line))
                .await
                .map_err(|_| err(&format!("waiting for {name}"), "timed out"))?
                .map_err(|e| err(&format!("waiting for {name}"), e))?;
            if n == 0 {
                return Err(VmmError::Exited {
                    doing: format!("waiting for the {name} event"),
                });
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| err(&format!("waiting for {name}"), format!("{e}: {line}")))?;
            if v["event"] == name {
                return Ok(v);
            }
            self.events.push(v);
        }
    }
}

/// One command on a fresh connection.
pub(crate) async fn command(
    socket: &Path,
    command: &str,
    args: Option<Value>,
) -> Result<Value, VmmError> {
    let mut q = Qmp::connect(socket).await?;
    q.execute(command, args).await
}

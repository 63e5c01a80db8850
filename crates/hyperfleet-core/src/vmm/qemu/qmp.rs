//! A minimal QMP (QEMU Machine Protocol) client over the VMM's unix socket.
//!
//! Each operation opens its own connection: the socket then never carries
//! state across a daemon restart, and QEMU serves one QMP client at a time
//! anyway. Asynchronous events that arrive before a command's answer are
//! collected and returned alongside it.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
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
        let line = Self::line(command, args);
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| err(command, e))?;
        self.answer(command).await
    }

    fn line(command: &str, args: Option<Value>) -> String {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        line
    }

    /// Passes `file` to QEMU (`add-fd`, the descriptor travelling with the
    /// command as `SCM_RIGHTS`) and returns the fd set it is in, which
    /// QEMU opens as `/dev/fdset/<set>`. `label` is the set's `opaque`.
    pub(crate) async fn add_fd(&mut self, file: &impl AsFd, label: &str) -> Result<u64, VmmError> {
        let command = "add-fd";
        let line = Self::line(command, Some(json!({ "opaque": label })));
        let stream: &UnixStream = self.writer.as_ref();
        let fd = file.as_fd().as_raw_fd();
        let sent = loop {
            stream.writable().await.map_err(|e| err(command, e))?;
            match stream.try_io(Interest::WRITABLE, || {
                send_with_fd(stream.as_raw_fd(), line.as_bytes(), fd)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(err(command, e)),
            }
        };
        // The descriptor went with the first byte; the rest is plain.
        self.writer
            .write_all(&line.as_bytes()[sent..])
            .await
            .map_err(|e| err(command, e))?;
        let r = self.answer(command).await?;
        r["fdset-id"]
            .as_u64()
            .ok_or_else(|| err(command, format!("no fdset-id in {r}")))
    }

    /// Reads until the answer to `command` (collecting events).
    async fn answer(&mut self, command: &str) -> Result<Value, VmmError> {
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

/// Sends `data` on unix socket `sock` with descriptor `fd` attached;
/// returns how many bytes went (at least one, or an error).
fn send_with_fd(sock: RawFd, data: &[u8], fd: RawFd) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // u64s: the control buffer must be aligned like a cmsghdr.
    let mut control = [0u64; 4];
    let fd_len = std::mem::size_of::<RawFd>() as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_len) } as usize;
    assert!(
        space <= std::mem::size_of_val(&control),
        "cmsg buffer too small"
    );
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `control`, which has room for one header and
    // one descriptor (checked above), so CMSG_FIRSTHDR is non-null and the
    // writes through it and CMSG_DATA stay inside `control`; sendmsg reads
    // `msg`, `iov` and `data`, which all live until it returns.
    let n = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_len) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
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

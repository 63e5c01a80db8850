//! Message schemas: the JSON payloads of control frames (`Hello`, `HelloReply`, `Ready`,
//! `Request`, `Event`, `Response`).
//!
//! This module owns the shape of every control message and the protocol version numbers.
//! Field names are the wire names; adding an optional field (with `#[serde(default)]`) is a
//! compatible change, anything else needs a new protocol version.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::refresh::{RefreshReport, RefreshRequest};

/// Highest protocol version this crate speaks (2 added `refresh`, 3 `start_main`).
pub const PROTOCOL_VERSION: u32 = 3;
/// Lowest protocol version this crate speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Host → agent on stream 0: start (or restart) a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Highest version the host speaks.
    pub protocol_version: u32,
    /// Lowest version the host speaks.
    pub min_protocol_version: u32,
    /// Echoed in the reply so the host can tell its answer from stale replies.
    pub nonce: u64,
    /// Free-form client identification for the agent's log.
    #[serde(default)]
    pub client: String,
}

/// Facts about the agent and its guest, sent in `HelloReply` and `Ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub agent_version: String,
    pub min_protocol_version: u32,
    pub max_protocol_version: u32,
    /// `uname -r`.
    pub kernel_release: String,
    /// `uname -v`.
    #[serde(default)]
    pub kernel_version: String,
    /// `uname -m`.
    #[serde(default)]
    pub machine: String,
    #[serde(default)]
    pub hostname: String,
    /// Guest uptime (from `/proc/uptime`, or `CLOCK_BOOTTIME`).
    pub uptime_ms: u64,
    /// Whether the agent runs as the guest's init.
    #[serde(default)]
    pub pid1: bool,
    /// `/proc/sys/kernel/random/boot_id`: changes on every guest boot.
    #[serde(default)]
    pub boot_id: Option<String>,
}

/// Agent → host on stream 0: answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub nonce: u64,
    /// The version both sides will use; `None` when the ranges do not overlap (then `error`
    /// says why and the agent ignores requests until a compatible hello).
    pub protocol_version: Option<u32>,
    #[serde(default)]
    pub error: Option<String>,
    pub agent: AgentInfo,
}

/// Host → agent: what a stream should do. Internally tagged by `op`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Ping,
    Exec(ExecRequest),
    WriteFile(WriteFileRequest),
    ReadFile(ReadFileRequest),
    Stat(StatRequest),
    ListDir(ListDirRequest),
    Remove(RemoveRequest),
    Mkdir(MkdirRequest),
    Power(PowerRequest),
    /// Since protocol version 2.
    Refresh(RefreshRequest),
    /// Since protocol version 3.
    StartMain(MainProcessRequest),
}

/// Run a process. `argv[0]` is looked up in `PATH` (the request's `PATH` if it sets one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Added to (or, with `clear_env`, replacing) the agent's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub clear_env: bool,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Kill the process group after this many milliseconds and report `timed_out`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// When true the host streams stdin as `Data` frames closed by `Eof`; otherwise stdin is
    /// `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
}

impl ExecRequest {
    /// A request for `argv` with everything else defaulted.
    pub fn new<I, S>(argv: I) -> ExecRequest
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..ExecRequest::default()
        }
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    pub fn timeout_ms(mut self, ms: u64) -> Self {
        self.timeout_ms = Some(ms);
        self
    }

    pub fn stdin(mut self, streamed: bool) -> Self {
        self.stdin = streamed;
        self
    }
}

/// The protocol version that introduced `start_main`.
pub const MAIN_PROTOCOL_VERSION: u32 = 3;

/// What the agent writes to the console when the main process has started: the line starts
/// with this, followed by the pid and the command.
pub const MAIN_STARTED_LINE: &str = "hyperfleet: main process started";
/// What the agent writes to the console when the main process has ended, just before it powers
/// the guest off: `hyperfleet: main process exited with code <n>[: <why>]`. A process killed by
/// signal `s` exits with code `128 + s` (`: killed by signal <s>`); one that could not be
/// started with 127 (not found) or 126 (any other reason), `: cannot start …` saying why.
pub const MAIN_EXITED_LINE: &str = "hyperfleet: main process exited with code ";

/// Start the machine's main process (an OCI image's entrypoint and command), once per boot:
/// the agent starts it at most once, and a second request answers what the first started
/// (`already: true`), so the host may send it again after reconnecting. Its stdin is
/// `/dev/null`, its stdout and stderr are the console. When it ends, the agent writes
/// [`MAIN_EXITED_LINE`] to the console and powers the guest off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MainProcessRequest {
    /// The command; `argv[0]` is looked up in the `PATH` of `env` when it has no `/`.
    pub argv: Vec<String>,
    /// The whole environment (nothing of the agent's is inherited). `HOME` is added from the
    /// user's passwd entry (or `/`) when absent, `PATH` a default when absent.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; `/` when absent. Created (owned by the user) when missing, as
    /// container runtimes do.
    #[serde(default)]
    pub cwd: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`: names are looked up in the guest's
    /// `/etc/passwd` and `/etc/group`, numbers need neither. Root when absent.
    #[serde(default)]
    pub user: Option<String>,
}

/// Answer to `start_main`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MainStarted {
    /// The main process; absent when it could not be started (then it is reported as exited
    /// on the console, and the guest powers off).
    pub pid: Option<u32>,
    /// A main process had already been started in this boot; nothing new was started.
    #[serde(default)]
    pub already: bool,
}

/// How a finished process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStatus {
    /// Exit code when the process exited normally.
    pub exit_code: Option<i32>,
    /// Signal number when the process was killed by a signal.
    pub signal: Option<i32>,
    /// The agent killed the process group because `timeout_ms` elapsed.
    #[serde(default)]
    pub timed_out: bool,
    /// Output after the process exited was cut off because descendants kept the pipes open.
    #[serde(default)]
    pub output_cut: bool,
    pub duration_ms: u64,
}

/// Upload a file: the host streams its contents as `Data` frames closed by `Eof`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    pub path: String,
    #[serde(flatten)]
    pub options: WriteOptions,
}

/// Options of a file upload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOptions {
    /// Create missing parent directories (like `mkdir -p`).
    #[serde(default)]
    pub create_dirs: bool,
    /// Permission bits to set on the file (applied even if it already existed).
    #[serde(default)]
    pub mode: Option<u32>,
    /// Append to an existing file instead of truncating it.
    #[serde(default)]
    pub append: bool,
    /// `fsync` the file before answering.
    #[serde(default)]
    pub sync: bool,
}

/// Download a file, optionally a byte range of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFileRequest {
    pub path: String,
    #[serde(default)]
    pub offset: u64,
    /// At most this many bytes; all the rest of the file when absent.
    #[serde(default)]
    pub length: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatRequest {
    pub path: String,
    /// Describe the symlink itself instead of its target.
    #[serde(default)]
    pub no_follow: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListDirRequest {
    pub path: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveRequest {
    pub path: String,
    /// Remove directories and everything in them.
    #[serde(default)]
    pub recursive: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MkdirRequest {
    pub path: String,
    /// Create missing parents; an existing directory is not an error.
    #[serde(default)]
    pub parents: bool,
    #[serde(default)]
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    Poweroff,
    Reboot,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerRequest {
    pub action: PowerAction,
}

/// Agent → host: intermediate progress on a stream. Internally tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The exec'd process is running with this pid (also its process group id).
    Started { pid: u32 },
    /// The file of a `read_file` is open; `length` bytes of `Data` follow.
    Opened { size: u64, offset: u64, length: u64 },
    /// A batch of directory entries of a `list_dir`.
    Entries { entries: Vec<DirEntry> },
}

/// Agent → host: the final answer of a stream (externally tagged `ok` / `error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(Reply),
    Error(RemoteError),
}

/// Successful results, internally tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Pong { uptime_ms: u64 },
    Exec(ExecStatus),
    Written { bytes: u64 },
    Read { bytes: u64 },
    Stat(FileStat),
    Listed { count: u64 },
    Removed,
    Created,
    Power,
    Refreshed(RefreshReport),
    MainStarted(MainStarted),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// Metadata of one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, milliseconds since the Unix epoch.
    pub mtime_ms: i64,
    #[serde(default)]
    pub symlink_target: Option<String>,
}

/// One entry of a directory listing (metadata of the entry itself, symlinks not followed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// File name; non-UTF-8 names are converted lossily.
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub mtime_ms: i64,
}

/// Machine-readable class of a failure reported by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    PermissionDenied,
    AlreadyExists,
    NotADirectory,
    IsADirectory,
    DirectoryNotEmpty,
    InvalidArgument,
    Cancelled,
    Protocol,
    Unsupported,
    Io,
    /// A code from a newer agent that this version does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::NotADirectory => "not_a_directory",
            ErrorCode::IsADirectory => "is_a_directory",
            ErrorCode::DirectoryNotEmpty => "directory_not_empty",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Protocol => "protocol",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Io => "io",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// Classifies an OS error.
    pub fn from_io(e: &std::io::Error) -> ErrorCode {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::NotFound => ErrorCode::NotFound,
            K::PermissionDenied => ErrorCode::PermissionDenied,
            K::AlreadyExists => ErrorCode::AlreadyExists,
            K::InvalidInput => ErrorCode::InvalidArgument,
            K::NotADirectory => ErrorCode::NotADirectory,
            K::IsADirectory => ErrorCode::IsADirectory,
            K::DirectoryNotEmpty => ErrorCode::DirectoryNotEmpty,
            _ => ErrorCode::Io,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure reported by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    pub code: ErrorCode,
    pub message: String,
}

impl RemoteError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RemoteError {
        RemoteError {
            code,
            message: message.into(),
        }
    }

    /// An error about `what` (a path, a command) caused by an OS error.
    pub fn io(what: &str, e: &std::io::Error) -> RemoteError {
        RemoteError::new(ErrorCode::from_io(e), format!("{what}: {e}"))
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_wire_shapes() {
        let r = Request::Exec(
            ExecRequest::new(["sh", "-c", "echo hi"])
                .env("A", "1")
                .timeout_ms(5),
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            json!({"op":"exec","argv":["sh","-c","echo hi"],"env":{"A":"1"},"clear_env":false,
                   "cwd":null,"timeout_ms":5,"stdin":false})
        );
        assert_eq!(serde_json::from_value::<Request>(v).unwrap(), r);
        let minimal: Request =
            serde_json::from_value(json!({"op":"exec","argv":["true"]})).unwrap();
        assert_eq!(minimal, Request::Exec(ExecRequest::new(["true"])));
        let w: Request = serde_json::from_value(
            json!({"op":"write_file","path":"/a","create_dirs":true,"mode":420}),
        )
        .unwrap();
        assert_eq!(
            w,
            Request::WriteFile(WriteFileRequest {
                path: "/a".into(),
                options: WriteOptions {
                    create_dirs: true,
                    mode: Some(0o644),
                    ..WriteOptions::default()
                }
            })
        );
        assert_eq!(
            serde_json::to_value(Request::Ping).unwrap(),
            json!({"op":"ping"})
        );
    }

    #[test]
    fn response_wire_shapes() {
        let ok = Response::Ok(Reply::Written { bytes: 3 });
        assert_eq!(
            serde_json::to_value(&ok).unwrap(),
            json!({"ok":{"type":"written","bytes":3}})
        );
        let err = Response::Error(RemoteError::new(ErrorCode::NotFound, "/x: gone"));
        let v = serde_json::to_value(&err).unwrap();
        assert_eq!(
            v,
            json!({"error":{"code":"not_found","message":"/x: gone"}})
        );
        // Unknown codes from newer agents still parse.
        let e: Response =
            serde_json::from_value(json!({"error":{"code":"quota","message":"m"}})).unwrap();
        assert_eq!(
            e,
            Response::Error(RemoteError::new(ErrorCode::Unknown, "m"))
        );
        let st = Response::Ok(Reply::Exec(ExecStatus {
            exit_code: Some(3),
            signal: None,
            timed_out: false,
            output_cut: false,
            duration_ms: 1,
        }));
        let s = serde_json::to_string(&st).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), st);
        let ev = Event::Started { pid: 7 };
        assert_eq!(
            serde_json::to_value(&ev).unwrap(),
            json!({"type":"started","pid":7})
        );
    }
}

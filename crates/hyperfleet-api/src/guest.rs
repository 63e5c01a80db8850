//! Commands and files inside a running machine (through its guest agent).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /machines/{id}/exec`. Unknown fields are rejected.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// argv; the first element is looked up in the guest's PATH. `cmd` is
    /// accepted as an alias.
    #[serde(alias = "cmd")]
    #[schema(schema_with = crate::schema::command)]
    pub command: Vec<String>,
    /// Seconds before the process group is killed and `timed_out` reported
    /// (0.001–3600; default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0, maximum = 3600)]
    pub timeout: Option<f64>,
    /// Added to the machine's `env` for this command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = crate::schema::exec_env)]
    pub env: BTreeMap<String, String>,
    /// Working directory in the guest (no NUL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[^\\x00]*$")]
    pub cwd: Option<String>,
    /// Standard input, base64; empty when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::base64_or_null)]
    pub stdin: Option<String>,
    /// Keep at most this many bytes of each of stdout and stderr (default
    /// 1 MiB, at most the server's JSON cap, 16 MiB unless configured);
    /// `truncated` says when more was produced. The buffered answer also
    /// holds at most the JSON cap for both together once encoded; larger
    /// output needs the streaming form. The maximum shown is the default
    /// JSON cap; a server configured otherwise enforces its own.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[schema(minimum = 0, maximum = 16777216)]
    pub max_output_bytes: Option<usize>,
}

/// The outcome of a command.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    /// Null when the process was killed by a signal.
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// UTF-8 (invalid sequences replaced); use the streaming form for binary output.
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    /// Output beyond `max_output_bytes` was dropped (never silently).
    pub truncated: bool,
    pub duration_ms: u64,
}

/// One line of the streaming form (`?stream=true`, `application/x-ndjson`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecStreamEvent {
    /// A chunk of output as it arrived, base64.
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    /// Last line on success.
    Exit {
        exit_code: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        timed_out: bool,
        duration_ms: u64,
    },
    /// Last line when the command could not finish (agent lost, …).
    Error {
        code: String,
        message: String,
    },
}

/// `POST /machines/{id}/files` (the JSON/base64 form).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileWrite {
    /// Absolute path in the guest (at most 4096 characters, no NUL).
    #[schema(schema_with = crate::schema::guest_path)]
    pub path: String,
    /// File content, base64.
    #[schema(schema_with = crate::schema::base64)]
    pub content: String,
    /// Permission bits, e.g. 420 (0644); at most 4095 (0o7777).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[schema(maximum = 4095)]
    pub mode: Option<u32>,
    /// Create missing parent directories.
    #[serde(default)]
    pub create_dirs: bool,
}

/// `GET /machines/{id}/files?path=` (JSON/base64 form).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileContent {
    pub path: String,
    /// base64
    pub content: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileStat {
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// RFC 3339.
    pub modified_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DirEntry {
    pub name: String,
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub modified_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DirListing {
    pub path: String,
    pub entries: Vec<DirEntry>,
}

/// The answer to a raw upload.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileWritten {
    pub path: String,
    pub size: u64,
}

//! The error type of the host-side boundary (client and vsock helper).
//!
//! Messages are sentences about what failed; underlying causes are kept as `#[source]` and
//! never repeated in `Display`, so a logger that prints the chain prints each cause once.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::frame::FrameError;
use crate::messages::{ErrorCode, RemoteError};

/// Everything that can go wrong talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O on the agent connection failed")]
    Io(#[source] io::Error),
    #[error("the agent connection is closed")]
    Closed,
    #[error("the agent did not answer the hello within {0:?}")]
    HandshakeTimeout(Duration),
    #[error(
        "the agent speaks protocol versions {agent_min} to {agent_max}, which do not overlap \
         with this client's {client_min} to {client_max}"
    )]
    VersionMismatch {
        agent_min: u32,
        agent_max: u32,
        client_min: u32,
        client_max: u32,
    },
    #[error("the agent sent an invalid frame")]
    Frame(#[source] FrameError),
    #[error("the agent sent a malformed {what} message")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the agent violated the protocol: {0}")]
    Protocol(String),
    #[error("the agent failed the request: {0}")]
    Remote(RemoteError),
    #[error("the operation was cancelled")]
    Cancelled,
    #[error("the stream no longer accepts data because the operation has finished")]
    StreamFinished,
    #[error("reading the upload source failed")]
    Source(#[source] io::Error),
    #[error("the request is invalid: {0}")]
    InvalidRequest(String),
    #[error("the agent speaks protocol version {negotiated}; {what} needs version {needed}")]
    AgentTooOld {
        what: &'static str,
        needed: u32,
        negotiated: u32,
    },
    #[error("connecting to the hybrid vsock socket {path} failed")]
    VsockConnect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the hybrid vsock handshake for port {port} failed (reply {reply:?})")]
    VsockHandshake { port: u32, reply: String },
}

impl Error {
    /// The agent's error code, when the agent reported the failure.
    pub fn remote_code(&self) -> Option<ErrorCode> {
        match self {
            Error::Remote(e) => Some(e.code),
            Error::Cancelled => Some(ErrorCode::Cancelled),
            Error::AgentTooOld { .. } => Some(ErrorCode::Unsupported),
            _ => None,
        }
    }

    /// Whether the agent said the path or command does not exist.
    pub fn is_not_found(&self) -> bool {
        self.remote_code() == Some(ErrorCode::NotFound)
    }

    pub(crate) fn from_remote(e: RemoteError) -> Error {
        if e.code == ErrorCode::Cancelled {
            Error::Cancelled
        } else {
            Error::Remote(e)
        }
    }
}

//! Hyperfleet agent protocol: how the host daemon talks to the agent inside a microVM guest.
//!
//! One framed, versioned protocol that runs over any reliable byte stream — QEMU virtio-serial,
//! Firecracker hybrid vsock, a unix socket, a pipe. The crate owns:
//!
//! - [`frame`]: the byte layout of frames, the resync marker and the incremental decoder;
//! - [`messages`]: the JSON schemas of control messages and the protocol version;
//! - [`refresh`]: the messages of `refresh` (a new guest identity after a restore) and their
//!   validation;
//! - [`client`]: the async host-side client ([`AgentClient`]) that multiplexes many
//!   operations over one connection with per-stream flow control;
//! - [`writer`]: writing queued frames to a stream (both ends use it);
//! - [`vsock`]: the Firecracker hybrid-vsock `CONNECT` handshake;
//! - [`error`]: the one error type of the host boundary.
//!
//! `docs/agent-protocol.md` in the repository is the normative description of the wire format;
//! this crate is its reference implementation (the agent reuses [`frame`],
//! [`messages`] and [`writer`]).

pub mod client;
pub mod error;
pub mod frame;
pub mod messages;
pub mod refresh;
pub mod vsock;
pub mod writer;

pub use client::{
    AgentClient, ByteRange, ConnectOptions, ExecEvent, ExecHandle, ExecOutput, ExecStdin,
    FileReader, OutputSink,
};
pub use error::Error;
pub use frame::{
    Frame, FrameDecoder, FrameError, Kind, CHUNK_SIZE, FLUSH_LEN, HEADER_LEN, INITIAL_WINDOW,
    MAX_PAYLOAD, SYNC,
};
pub use messages::*;
pub use refresh::*;
pub use vsock::hybrid_vsock_connect;

//! The Hyperfleet daemon as a library.
//!
//! - [`daemon`]: `serve` — startup, recovery, shutdown.
//! - [`config`]: the server configuration the binary fills from flags and environment.
//! - [`store`]: SQLite behind a group-commit writer, plus the in-memory index.
//! - [`lifecycle`]: the transition table, the machine run and its supervisor.
//! - [`vmm`]: the `Vmm` trait, process identity, host detection, and each backend.
//! - [`net`]: machine networking on the host: leases, TAP devices, namespaces, nftables.
//! - [`proxy`]: the reverse proxy to exposed guest ports; [`urls`]: the public URLs it serves.
//! - [`http`]: the REST API (handlers validate and hand over).
//! - [`auth`]: API keys and scopes.
//! - [`validate`]: a create request checked into a machine spec.
//! - [`images`]: OCI images: registry pulls, imports, layer unpacking, one filesystem per image.
//! - [`assets`]: guest asset sets (kernel, initramfs, root filesystem), versioned and checksummed.
//! - [`logs`]: console logs: tail, follow, rotation.
//! - [`metrics`]: the Prometheus registry and what records into it (`GET /metrics`).
//! - [`doctor`]: host checks.
//! - [`failpoint`]: crash points at every step boundary (the `failpoints` feature).
//! - [`util`]: small shared helpers (time, identifiers, error chains, idempotent removal).

pub mod assets;
pub mod auth;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod failpoint;
pub mod http;
pub mod images;
pub mod lifecycle;
pub mod logs;
pub mod metrics;
pub mod net;
pub mod proxy;
pub mod store;
pub mod urls;
pub mod util;
pub mod validate;
pub mod vmm;

pub use config::Config;
pub use daemon::{serve, DaemonError};

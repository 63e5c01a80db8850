//! The Hyperfleet daemon as a library.
//!
//! - [`store`]: SQLite behind a group-commit writer, plus the in-memory index.
//! - [`lifecycle`]: the transition table, the machine run and its supervisor.
//! - [`vmm`]: the `Vmm` trait, process identity, and each backend.
//! - [`http`]: the REST API (handlers validate and hand over).
//! - [`auth`]: API keys and scopes.
//! - [`daemon`]: `serve` — startup, recovery, shutdown.
//! - [`doctor`]: host checks.

pub mod assets;
pub mod auth;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod failpoint;
pub mod http;
pub mod lifecycle;
pub mod logs;
pub mod net;
pub mod proxy;
pub mod store;
pub mod urls;
pub mod util;
pub mod validate;
pub mod vmm;

pub use config::Config;
pub use daemon::{serve, DaemonError};

//! The reverse proxy on `PROXY_PORT`: routes `<port>-<machine>.<domain>`
//! host names and `/proxy/<machine>/…?port=N` paths to exposed guest ports.
//!
//! Where a request goes (`route`), who may pass (`auth`), the header
//! rewriting (`headers`) and the per-machine last activity (`activity`).

pub mod activity;
pub mod auth;
pub mod headers;
pub mod route;
pub mod urls;

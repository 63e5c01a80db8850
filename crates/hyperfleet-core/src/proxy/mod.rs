//! The reverse proxy on `PROXY_PORT`: routes `<port>-<machine>.<suffix>`
//! host names and `/proxy/<machine>/…?port=N` paths to exposed guest ports.

pub mod urls;

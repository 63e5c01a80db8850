//! Firecracker hybrid vsock: the host side of the `CONNECT <port>` handshake.
//!
//! Firecracker exposes the guest's vsock device as a unix socket on the host. A host process
//! connects to it, writes `CONNECT <port>\n`, and reads `OK <host-port>\n`; from then on the
//! socket is a plain byte stream to whatever listens on that vsock port in the guest (the
//! agent). Firecracker closes the socket instead of answering when nothing listens yet.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::error::Error;

/// Longest reply line accepted; Firecracker's is `OK <u32>\n`.
const MAX_REPLY: usize = 64;

/// Connects to a Firecracker vsock unix socket and performs the `CONNECT` handshake.
///
/// The returned stream is positioned right after the `OK` line (the reply is read byte by byte
/// so no protocol bytes are consumed), ready for [`crate::AgentClient::connect`].
pub async fn hybrid_vsock_connect(
    uds_path: impl AsRef<Path>,
    port: u32,
) -> Result<UnixStream, Error> {
    let path = uds_path.as_ref();
    let mut s = UnixStream::connect(path)
        .await
        .map_err(|source| Error::VsockConnect {
            path: path.to_path_buf(),
            source,
        })?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(Error::Io)?;
    let mut line = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        let n = s.read(&mut b).await.map_err(Error::Io)?;
        if n == 0 {
            return Err(Error::VsockHandshake {
                port,
                reply: String::from_utf8_lossy(&line).into_owned(),
            });
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > MAX_REPLY {
            break;
        }
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    let ok = text
        .strip_prefix("OK ")
        .is_some_and(|rest| rest.trim().parse::<u32>().is_ok());
    if !ok {
        return Err(Error::VsockHandshake { port, reply: text });
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    async fn fake_firecracker(reply: &'static str) -> (tempdir::Dir, std::path::PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut r = tokio::io::BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            assert_eq!(line, "CONNECT 52\n");
            let mut s = r.into_inner();
            s.write_all(reply.as_bytes()).await.unwrap();
            s.write_all(b"payload").await.unwrap();
        });
        (dir, path)
    }

    mod tempdir {
        pub(super) struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub(super) fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "hf-vsock-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[tokio::test]
    async fn handshake_ok_leaves_stream_positioned() {
        let (_d, path) = fake_firecracker("OK 1073741824\n").await;
        let mut s = hybrid_vsock_connect(&path, 52).await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"payload");
    }

    #[tokio::test]
    async fn handshake_refused() {
        let (_d, path) = fake_firecracker("NOPE\n").await;
        let e = hybrid_vsock_connect(&path, 52).await.unwrap_err();
        assert!(matches!(e, Error::VsockHandshake { port: 52, ref reply } if reply == "NOPE"));
        let e = hybrid_vsock_connect("/nonexistent/v.sock", 52)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::VsockConnect { .. }));
    }
}

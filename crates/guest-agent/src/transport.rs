//! Byte streams the agent serves the protocol on, and the loops that accept them.
//!
//! - virtio-serial port (QEMU): a character device found by port name under
//!   `/sys/class/virtio-ports/*/name`; one stream that outlives host connections.
//! - AF_VSOCK listener (Firecracker hybrid vsock, or vhost-vsock): one stream per connection.
//! - unix socket listener and stdin/stdout: for running the agent as an ordinary process
//!   (tests, development).
//!
//! Raw file descriptors (serial port, vsock, stdio) are wrapped in [`FdStream`], a small
//! `AsyncRead`/`AsyncWrite` over tokio's `AsyncFd` readiness.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::session::{serve, End, Services};
use crate::{debug, error, info, warn};

/// An `AsyncRead + AsyncWrite` over one (or a read and a write) non-blocking descriptor.
pub(crate) struct FdStream {
    rd: AsyncFd<OwnedFd>,
    wr: Option<AsyncFd<OwnedFd>>,
}

/// Registers an owned descriptor with the reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: OwnedFd owns a valid open descriptor, closes it only on drop, and always returns
    // the same raw fd, so it stays valid and unchanged for the AsyncFd's whole lifetime.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl FdStream {
    /// One descriptor used for both directions (socket, serial port).
    pub(crate) fn new(fd: OwnedFd) -> io::Result<FdStream> {
        set_nonblocking(fd.as_raw_fd())?;
        Ok(FdStream {
            rd: register(fd)?,
            wr: None,
        })
    }

    /// Separate read and write descriptors (stdin/stdout).
    pub(crate) fn pair(rd: OwnedFd, wr: OwnedFd) -> io::Result<FdStream> {
        set_nonblocking(rd.as_raw_fd())?;
        set_nonblocking(wr.as_raw_fd())?;
        Ok(FdStream {
            rd: register(rd)?,
            wr: Some(register(wr)?),
        })
    }

    fn wr(&self) -> &AsyncFd<OwnedFd> {
        self.wr.as_ref().unwrap_or(&self.rd)
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.rd.poll_read_ready(cx))?;
            // SAFETY: read() only writes initialised bytes into the unfilled region, whose
            // length we pass; we then mark exactly the bytes it reported as filled.
            let res = guard.try_io(|fd| unsafe {
                let dst = buf.unfilled_mut();
                let n = libc::read(fd.as_raw_fd(), dst.as_mut_ptr().cast(), dst.len());
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(n)) => {
                    // SAFETY: the kernel initialised n bytes of the unfilled region.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.wr().poll_write_ready(cx))?;
            // SAFETY: write() reads at most data.len() bytes from a valid slice.
            let res = guard.try_io(|fd| unsafe {
                let n = libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len());
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Serves every connection of a unix socket listener, each as its own session.
pub(crate) async fn serve_unix(path: &Path, svc: Arc<Services>) -> io::Result<()> {
    // A stale socket file from an earlier run would make bind fail.
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path)?;
    info!("listening on unix:{}", path.display());
    loop {
        let (s, _) = l.accept().await?;
        let svc = svc.clone();
        tokio::spawn(async move {
            let served = serve(s, svc).await;
            debug!("unix connection ended: {:?}", served.end);
        });
    }
}

/// Serves stdin/stdout as one session; returns when the host closes it.
pub(crate) async fn serve_stdio(svc: Arc<Services>) -> io::Result<()> {
    // SAFETY: dup of the process's standard descriptors; the results are new descriptors we
    // own exclusively (checked for -1 below).
    let (rd, wr) = unsafe { (libc::dup(0), libc::dup(1)) };
    if rd < 0 || wr < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: rd and wr are valid descriptors returned by dup and owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(rd), OwnedFd::from_raw_fd(wr)) };
    let s = FdStream::pair(rd, wr)?;
    match serve(s, svc).await.end {
        End::Eof => Ok(()),
        End::Io(e) => Err(e),
    }
}

/// Finds the character device of the virtio-serial port called `name`.
pub(crate) fn find_virtio_port(name: &str) -> Option<PathBuf> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for ent in dir.flatten() {
        let n = std::fs::read_to_string(ent.path().join("name")).unwrap_or_default();
        if n.trim() == name {
            return Some(Path::new("/dev").join(ent.file_name()));
        }
    }
    None
}

fn open_rw(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: c is a valid NUL-terminated string; open returns a new descriptor or -1.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Serves a virtio-serial port forever. The port is one byte stream across host connections.
///
/// The port stays open for the agent's whole life: the guest driver discards whatever the host
/// sends while the port is closed, so closing it between sessions would lose a new host's
/// hello. While no host is connected, reads return EOF at once; each EOF ends the session
/// (cancelling its operations) and a new one starts on the same descriptor after a short pause.
pub(crate) async fn serve_serial(port_name: &str, explicit: Option<PathBuf>, svc: Arc<Services>) {
    let mut waited = 0u64;
    loop {
        let path = match explicit.clone().or_else(|| find_virtio_port(port_name)) {
            Some(p) if p.exists() => p,
            _ => {
                if waited % 100 == 0 {
                    info!("waiting for virtio-serial port {port_name:?}");
                }
                waited += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let port = match open_rw(&path) {
            Ok(p) => p,
            Err(e) => {
                error!("cannot open {}: {e}", path.display());
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        info!("agent channel is {}", path.display());
        loop {
            // Each session gets its own descriptor (and reactor registration) for the same
            // open port, so ending a session never closes the port itself.
            let stream = match port.try_clone().and_then(FdStream::new) {
                Ok(s) => s,
                Err(e) => {
                    warn!("{}: {e}; reopening", path.display());
                    break;
                }
            };
            let served = serve(stream, svc.clone()).await;
            match served.end {
                End::Eof if served.greeted => info!("host disconnected from {}", path.display()),
                // Reads return EOF at once while no host is connected: nothing to report.
                End::Eof => {}
                End::Io(e) => warn!("{}: {e}", path.display()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Serves an AF_VSOCK listener on `port` (any CID); one session per connection.
pub(crate) async fn serve_vsock(port: u32, svc: Arc<Services>) -> io::Result<()> {
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    // SAFETY: addr is a valid sockaddr_vm and we pass its exact size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(sock.as_raw_fd(), 16) } < 0 {
        return Err(io::Error::last_os_error());
    }
    info!("listening on vsock port {port}");
    let listener = register(sock)?;
    loop {
        let mut guard = listener.readable().await?;
        let res = guard.try_io(|l| {
            // SAFETY: accept4 with null address pointers is allowed; the result is checked.
            let c = unsafe {
                libc::accept4(
                    l.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                )
            };
            if c < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(c)
            }
        });
        let conn = match res {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn!("vsock accept: {e}");
                continue;
            }
            Err(_would_block) => continue,
        };
        // SAFETY: conn is a new descriptor from accept4, owned by nobody else.
        let conn = unsafe { OwnedFd::from_raw_fd(conn) };
        let svc = svc.clone();
        tokio::spawn(async move {
            match FdStream::new(conn) {
                Ok(s) => {
                    let served = serve(s, svc).await;
                    debug!("vsock connection ended: {:?}", served.end);
                }
                Err(e) => warn!("vsock connection: {e}"),
            }
        });
    }
}

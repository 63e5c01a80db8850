//! The graceful-stop sequence every backend shares: ask the guest to power
//! off in each of the backend's ways in turn (the guest agent first: it
//! syncs and unmounts), waiting after each request that was delivered until
//! the VMM process is gone or the stop deadline passes; out of time, kill
//! the process. Backends differ only in the ways they ask.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::process;
use super::{LaunchSpec, StopPath, Vmm, VmmError};
use crate::store::VmmIdentity;

/// How long reaching the guest agent may take before the next way is tried.
const AGENT_REACH: Duration = Duration::from_secs(2);

/// One way of asking the guest to power off. `ask` resolves to whether the
/// request was delivered; it runs only when its turn comes.
pub(crate) struct StopRequest<'a> {
    /// How the guest was asked, for [`StopPath::Graceful`].
    pub via: &'static str,
    pub ask: Pin<Box<dyn Future<Output = bool> + Send + 'a>>,
}

impl<'a> StopRequest<'a> {
    pub(crate) fn new(via: &'static str, ask: impl Future<Output = bool> + Send + 'a) -> Self {
        StopRequest {
            via,
            ask: Box::pin(ask),
        }
    }

    /// The guest agent's `poweroff`, over the backend's cached connection.
    pub(crate) fn agent_poweroff<V: Vmm + ?Sized>(backend: &'a V, launch: &'a LaunchSpec) -> Self {
        StopRequest::new("agent poweroff", async move {
            match tokio::time::timeout(AGENT_REACH, backend.agent(launch)).await {
                Ok(Ok(c)) => c.poweroff().await.is_ok(),
                _ => false,
            }
        })
    }
}

/// Runs the sequence for `vmm` within `timeout`. The first request is
/// always made; later ones only while time is left. `name` names the VMM in
/// errors ("QEMU", "Firecracker", "the VMM").
pub(crate) async fn graceful_stop(
    vmm: &VmmIdentity,
    timeout: Duration,
    name: &str,
    requests: Vec<StopRequest<'_>>,
) -> Result<StopPath, VmmError> {
    let deadline = tokio::time::Instant::now() + timeout;
    for (i, request) in requests.into_iter().enumerate() {
        if i > 0 && tokio::time::Instant::now() >= deadline {
            break;
        }
        if !request.ask.await {
            continue;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let gone = process::wait_gone(vmm, left)
            .await
            .map_err(|e| VmmError::host(format!("waiting for {name} to exit"), e))?;
        if gone {
            return Ok(StopPath::Graceful { via: request.via });
        }
    }
    process::kill(vmm)
        .await
        .map_err(|e| VmmError::host(format!("killing {name}"), e))?;
    Ok(StopPath::KilledAfterTimeout)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn sleeper(dir: &std::path::Path) -> VmmIdentity {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        process::spawn_detached(cmd, &dir.join("log")).unwrap()
    }

    #[tokio::test]
    async fn the_first_request_that_ends_the_process_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = sleeper(dir.path());
        let tried = std::sync::Mutex::new(Vec::new());
        let requests = vec![
            StopRequest::new("undelivered", async {
                tried.lock().unwrap().push("undelivered");
                false
            }),
            StopRequest::new("signal", async {
                tried.lock().unwrap().push("signal");
                process::signal(&vmm, libc::SIGTERM).is_ok()
            }),
            StopRequest::new("never reached", async {
                tried.lock().unwrap().push("never reached");
                true
            }),
        ];
        let path = graceful_stop(&vmm, Duration::from_secs(5), "sleep", requests).await;
        assert_eq!(path.unwrap(), StopPath::Graceful { via: "signal" });
        assert_eq!(*tried.lock().unwrap(), ["undelivered", "signal"]);
    }

    #[tokio::test]
    async fn a_guest_that_ignores_every_request_is_killed_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = sleeper(dir.path());
        let t0 = std::time::Instant::now();
        let requests = vec![
            StopRequest::new("ignored", async { true }),
            StopRequest::new("too late", async { panic!("asked after the deadline") }),
        ];
        let path = graceful_stop(&vmm, Duration::from_millis(300), "sleep", requests).await;
        assert_eq!(path.unwrap(), StopPath::KilledAfterTimeout);
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert_eq!(process::probe(&vmm), process::Liveness::Gone);
    }
}

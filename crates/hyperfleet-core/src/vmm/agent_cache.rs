//! The per-machine cache of guest agent connections, shared by the backends
//! that have a guest. One connection per machine is kept and reused; a
//! closed one (the guest or the channel went away, or the daemon restarted)
//! is replaced on next use. A per-machine async lock makes sure only one
//! connection attempt runs at a time (a virtio-serial port or hybrid vsock
//! listener serves one host connection at a time).
//!
//! A backend only opens its channel ([`AgentChannel::open_channel`]); the
//! greeting and the cached connection are written once here.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use hyperfleet_agent_proto::{AgentClient, ConnectOptions};
use tokio::net::UnixStream;

use super::process::{self, Liveness};
use super::{LaunchSpec, MachinePaths, VmmError};
use crate::store::VmmIdentity;

/// How long reaching a running guest's agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A backend whose guest agent is reached over a unix socket on the host
/// (QEMU's virtio-serial channel, Firecracker's hybrid vsock).
#[async_trait]
pub(crate) trait AgentChannel: Send + Sync {
    fn agents(&self) -> &AgentCache;

    /// Opens a byte stream to the agent, not yet greeted, within `timeout`.
    async fn open_channel(
        &self,
        paths: &MachinePaths,
        timeout: Duration,
    ) -> Result<UnixStream, VmmError>;

    /// A greeted connection, made within `timeout`.
    async fn connect_agent(
        &self,
        paths: &MachinePaths,
        timeout: Duration,
    ) -> Result<AgentClient, VmmError> {
        let stream = self.open_channel(paths, timeout).await?;
        let opts = ConnectOptions {
            handshake_timeout: timeout,
            ..ConnectOptions::default()
        };
        AgentClient::connect_with(stream, opts)
            .await
            .map_err(|e| VmmError::Control {
                doing: "greeting the guest agent".into(),
                detail: e.to_string(),
            })
    }

    /// The machine's cached connection, or a new one ([`super::Vmm::agent`]).
    async fn cached_agent(&self, launch: &LaunchSpec) -> Result<AgentClient, VmmError> {
        self.agents()
            .get(&launch.machine_id, || {
                self.connect_agent(&launch.paths, CONNECT_TIMEOUT)
            })
            .await
    }
}

/// How a backend polls for its guest agent while the guest boots.
pub(crate) struct ReadyPoll<'a> {
    pub machine_id: &'a str,
    pub vmm: &'a VmmIdentity,
    /// The agent channel's socket; no attempt is made before it exists.
    pub socket: &'a Path,
    pub timeout: Duration,
    pub deadline: tokio::time::Instant,
    /// The longest one attempt may take (None: all the time left).
    pub attempt_max: Option<Duration>,
    /// The pause between attempts.
    pub pause: Duration,
}

type Slot = Arc<tokio::sync::Mutex<Option<AgentClient>>>;

#[derive(Default)]
pub(crate) struct AgentCache {
    slots: Mutex<HashMap<String, Slot>>,
}

impl AgentCache {
    /// The machine's slot; hold its lock while connecting.
    pub(crate) fn slot(&self, id: &str) -> Slot {
        crate::store::lock(&self.slots)
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// Drops the machine's connection (its VMM is stopping or gone).
    pub(crate) fn forget(&self, id: &str) {
        crate::store::lock(&self.slots).remove(id);
    }

    /// Waits until `connect` (given the time one attempt may take) reaches
    /// the guest agent, and caches that connection. Fails when the VMM
    /// exits or the deadline passes; `detail` says what the guest showed
    /// (its console) for the error.
    pub(crate) async fn wait_ready<F, Fut>(
        &self,
        poll: ReadyPoll<'_>,
        detail: impl Fn() -> String,
        connect: F,
    ) -> Result<(), VmmError>
    where
        F: Fn(Duration) -> Fut,
        Fut: Future<Output = Result<AgentClient, VmmError>>,
    {
        let slot = self.slot(poll.machine_id);
        let mut guard = slot.lock().await;
        loop {
            if process::probe(poll.vmm) == Liveness::Gone {
                return Err(VmmError::Exited {
                    doing: format!("waiting for the guest to become ready; {}", detail()),
                });
            }
            let now = tokio::time::Instant::now();
            if now >= poll.deadline {
                return Err(VmmError::BootTimeout {
                    timeout: poll.timeout,
                    detail: detail(),
                });
            }
            if poll.socket.exists() {
                let left = poll.deadline - now;
                let attempt = poll.attempt_max.map_or(left, |max| left.min(max));
                match connect(attempt).await {
                    Ok(c) => {
                        *guard = Some(c);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::debug!(machine = %poll.machine_id, error = %e, "agent not ready yet")
                    }
                }
            }
            tokio::time::sleep(poll.pause).await;
        }
    }

    /// The live cached connection, or a new one made by `connect`.
    pub(crate) async fn get<F, Fut>(&self, id: &str, connect: F) -> Result<AgentClient, VmmError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<AgentClient, VmmError>>,
    {
        let slot = self.slot(id);
        let mut guard = slot.lock().await;
        if let Some(c) = guard.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let c = connect().await?;
        *guard = Some(c.clone());
        Ok(c)
    }
}

//! The per-machine cache of guest agent connections, shared by the backends
//! that have a guest. One connection per machine is kept and reused; a
//! closed one (the guest or the channel went away, or the daemon restarted)
//! is replaced on next use. A per-machine async lock makes sure only one
//! connection attempt runs at a time (a virtio-serial port or hybrid vsock
//! listener serves one host connection at a time).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use hyperfleet_agent_proto::AgentClient;

use super::VmmError;

type Slot = Arc<tokio::sync::Mutex<Option<AgentClient>>>;

#[derive(Default)]
pub struct AgentCache {
    slots: Mutex<HashMap<String, Slot>>,
}

impl AgentCache {
    /// The machine's slot; hold its lock while connecting.
    pub fn slot(&self, id: &str) -> Slot {
        crate::store::lock(&self.slots)
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// Drops the machine's connection (its VMM is stopping or gone).
    pub fn forget(&self, id: &str) {
        crate::store::lock(&self.slots).remove(id);
    }

    /// The live cached connection, or a new one made by `connect`.
    pub async fn get<F, Fut>(&self, id: &str, connect: F) -> Result<AgentClient, VmmError>
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

//! The narrow view of a machine's guest that API handlers get from the supervisor: its agent
//! connection, where its console is logged, and whether each backend is usable. Handlers go
//! through these instead of reaching into the run context, so the run's internals (backends,
//! launch specs, paths) stay the lifecycle's business.

use std::path::PathBuf;

use hyperfleet_agent_proto::AgentClient;
use hyperfleet_api::VmmKind;

use super::Supervisor;
use crate::store::MachineRecord;
use crate::vmm::VmmError;

/// Why a machine's guest agent cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum GuestAccessError {
    #[error("the {0} backend is not enabled")]
    BackendDisabled(VmmKind),
    #[error("machines on the {0} backend have no guest agent")]
    NoAgent(VmmKind),
    #[error("the guest agent cannot be reached")]
    Unreachable(#[source] VmmError),
}

/// One backend's readiness, as `GET /health` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    pub vmm: VmmKind,
    pub available: bool,
    /// Why it is (or is not) usable.
    pub detail: String,
}

impl Supervisor {
    /// A connection to the guest agent of machine `rec` (cached by its backend). The caller
    /// checks that the machine is running first.
    pub async fn agent(&self, rec: &MachineRecord) -> Result<AgentClient, GuestAccessError> {
        let ctx = self.ctx();
        let backend = ctx
            .backends
            .get(&rec.spec.vmm)
            .ok_or(GuestAccessError::BackendDisabled(rec.spec.vmm))?;
        match backend.agent(&ctx.launch(rec)).await {
            Ok(a) => Ok(a),
            Err(VmmError::Unsupported { backend, .. }) => Err(GuestAccessError::NoAgent(backend)),
            Err(e) => Err(GuestAccessError::Unreachable(e)),
        }
    }

    /// The file machine `rec`'s serial console is logged to (where its backend puts it; the
    /// default place when the backend is not enabled, so old logs stay readable).
    pub fn console_log(&self, rec: &MachineRecord) -> PathBuf {
        let ctx = self.ctx();
        let paths = ctx.paths(&rec.id);
        match ctx.backends.get(&rec.spec.vmm) {
            Some(b) => b.console_log(&paths),
            None => paths.console_log(),
        }
    }

    /// Every enabled backend and whether it can run machines on this host, by name.
    pub fn backend_health(&self) -> Vec<BackendStatus> {
        let mut out: Vec<BackendStatus> = self
            .ctx()
            .backends
            .values()
            .map(|b| {
                let (available, detail) = match b.availability() {
                    Ok(d) => (true, d),
                    Err(d) => (false, d),
                };
                BackendStatus {
                    vmm: b.kind(),
                    available,
                    detail,
                }
            })
            .collect();
        out.sort_by_key(|b| b.vmm.as_str());
        out
    }
}

//! Idle timeout and wake on request (docs/api.md "Idle machines"): owns
//! when a running machine counts as idle, the loop that suspends machines
//! past their deadline, and the wake that resumes a suspended machine for
//! a request that needs it running.
//!
//! Activity is kept in memory (`proxy::activity::Activity`, shared
//! with the proxy):
//! proxied requests and open upgraded connections, guest calls through the
//! API (exec, files, logs follow), the guest's own network traffic (its
//! TAP's byte counters, read each tick) and any change of its desired state
//! (a new generation). What is persisted is the machine's
//! `last_active_at` as requests (and the idle suspend itself, with the
//! activity it saw) record it: it orders the storage evictor across
//! restarts. A running machine's deadline starts over from a daemon
//! restart ("the restart itself counts as activity"), so deadlines survive
//! a restart and never come sooner than a full timeout after it.
//!
//! The suspend — or, for an `ephemeral` machine, the delete — goes through
//! the normal request path ([`Supervisor::request_as`]) with the reason
//! `idle`, guarded by the generation the timer saw: a request that arrived
//! meanwhile wins.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyperfleet_api::MachineStatus;
use tokio::sync::watch;

use super::supervisor::{Guard, LifecycleError, Supervisor, WaitOutcome, Why};
use super::table::{Desired, Request};
use crate::store::{lock, CachedMachine, MachineRecord};
use crate::util::now_ms;

/// `--default-idle-timeout`, `--wake-timeout`.
#[derive(Debug, Clone, Copy)]
pub struct IdleConfig {
    /// For machines created without `idle_timeout_seconds`; None: never.
    pub default_timeout: Option<Duration>,
    /// How long a request waits for a suspended machine to wake.
    pub wake_timeout: Duration,
}

/// The server's default idle timeout when `--default-idle-timeout` is not
/// given (the seeds' five minutes).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_WAKE_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for IdleConfig {
    fn default() -> Self {
        IdleConfig {
            default_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            wake_timeout: DEFAULT_WAKE_TIMEOUT,
        }
    }
}

/// How often the idle loop looks: the deadline is kept to within this.
const TICK: Duration = Duration::from_millis(500);
/// Every this many ticks, entries of deleted machines are forgotten.
const PRUNE_EVERY: u32 = 120;

/// What the idle loop last saw of one machine.
struct Seen {
    generation: u64,
    /// When the loop first saw the machine at this generation (a restart,
    /// or a new request, counts as activity).
    since: i64,
    /// The TAP's rx + tx bytes at the last tick.
    tap: Option<u64>,
}

/// A wake in flight; later requests for the same machine wait on it.
type WakeRx = watch::Receiver<Option<Result<(), String>>>;

/// The supervisor's idle state.
#[derive(Default)]
pub(crate) struct IdleState {
    seen: Mutex<HashMap<String, Seen>>,
    wakes: Mutex<HashMap<String, WakeRx>>,
}

/// Why a wake did not leave the machine running.
#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error("machine '{machine}' did not wake: {why}")]
    Failed { machine: String, why: String },
}

/// Every network device's rx + tx bytes so far, by name, in the daemon's
/// own network namespace (where the TAPs are). `/proc/self/net/dev`, not
/// `/sys/class/net`: sysfs shows the namespace it was mounted in, which
/// need not be the daemon's.
fn device_bytes() -> HashMap<String, u64> {
    match std::fs::read_to_string("/proc/self/net/dev") {
        Ok(text) => parse_net_dev(&text),
        Err(_) => HashMap::new(),
    }
}

/// `/proc/net/dev`'s table: device name → rx + tx bytes.
fn parse_net_dev(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes …
            Some((name.trim().to_string(), f.first()? + f.get(8)?))
        })
        .collect()
}

/// Touches a machine every second until dropped: a request in progress
/// is activity for as long as it lasts.
pub struct KeepActive(tokio::task::JoinHandle<()>);

impl Drop for KeepActive {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often a request in progress counts as activity.
const KEEP_ACTIVE_EVERY: Duration = Duration::from_secs(1);

impl Supervisor {
    /// Machine `id` counts as active until the returned guard is dropped.
    pub fn keep_active(self: &Arc<Self>, id: &str) -> KeepActive {
        let me = Arc::clone(self);
        let id = id.to_string();
        KeepActive(tokio::spawn(async move {
            loop {
                me.touch(&id);
                tokio::time::sleep(KEEP_ACTIVE_EVERY).await;
            }
        }))
    }

    /// Records activity of machine `id` now (a guest call, a proxied
    /// request): it postpones the machine's idle deadline.
    pub fn touch(&self, id: &str) {
        self.ctx().activity.touch(id);
    }

    /// The idle timeout that applies to `rec`: its own, else the server's.
    /// `Some(0)` from the request means never, as null does.
    pub(crate) fn idle_timeout(&self, rec: &MachineRecord) -> Option<Duration> {
        // Template builders are the server's own, snapshotted as they come up.
        if rec.tenant == super::snapshots::TEMPLATE_TENANT {
            return None;
        }
        match rec.spec.idle_timeout_seconds {
            Some(0) => None,
            Some(s) => Some(Duration::from_secs(s)),
            None => self.ctx().idle.default_timeout,
        }
    }

    /// When machine `rec` was last active (ms since the epoch): for a
    /// machine with a VMM no earlier than the daemon's start (its idle
    /// clock starts over from a restart); for any other, as recorded.
    pub fn last_active(&self, rec: &MachineRecord) -> i64 {
        let memory = self.ctx().activity.last(&rec.id);
        if rec.vmm.is_none() && rec.status != MachineStatus::Running {
            return [rec.last_active_at, memory, rec.started_at]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(rec.created_at);
        }
        let seen = lock(&self.idle.seen)
            .get(&rec.id)
            .filter(|s| s.generation == rec.generation)
            .map(|s| s.since);
        [
            Some(self.started_ms),
            seen,
            rec.started_at,
            memory,
            rec.last_active_at,
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(self.started_ms)
    }

    /// When machine `rec` was last active and, while it runs with an idle
    /// timeout, when it will be suspended (deleted, when ephemeral).
    pub fn idle_view(&self, rec: &MachineRecord) -> (i64, Option<i64>) {
        let last = self.last_active(rec);
        let deadline = self
            .idle_timeout(rec)
            .filter(|_| rec.status == MachineStatus::Running && rec.desired == Desired::Running)
            .map(|t| last + t.as_millis() as i64);
        (last, deadline)
    }

    /// Suspends running machines past their idle deadline, forever.
    pub(crate) async fn idle_loop(self: Arc<Self>) {
        let mut ticks = 0u32;
        loop {
            tokio::time::sleep(TICK).await;
            ticks = ticks.wrapping_add(1);
            // Every machine with a VMM has a run: the runs are the candidates.
            let ids = self.run_ids();
            let devices = if self.ctx().net.is_some() && !ids.is_empty() {
                device_bytes()
            } else {
                HashMap::new()
            };
            for id in &ids {
                self.idle_check(id, &devices);
            }
            if ticks % PRUNE_EVERY == 0 {
                let store = &self.ctx().store;
                let exists = |id: &str| store.get_by_id(id).map_or(true, |m| m.is_some());
                lock(&self.idle.seen).retain(|id, _| exists(id));
                self.ctx().activity.retain(exists);
            }
        }
    }

    fn idle_check(self: &Arc<Self>, id: &str, devices: &HashMap<String, u64>) {
        let Ok(Some(m)) = self.ctx().store.get_by_id(id) else {
            return;
        };
        let rec = &m.rec;
        let now = now_ms();
        let tap = rec
            .network
            .as_ref()
            .filter(|_| rec.status == MachineStatus::Running)
            .and_then(|lease| devices.get(&lease.tap).copied());
        {
            let mut seen = lock(&self.idle.seen);
            let e = seen.entry(id.to_string()).or_insert(Seen {
                generation: rec.generation,
                since: now,
                tap,
            });
            if e.generation != rec.generation {
                e.generation = rec.generation;
                e.since = now;
            }
            if tap.is_some() && tap != e.tap {
                e.tap = tap;
                self.touch(id);
            }
        }
        let Some(timeout) = self.idle_timeout(rec) else {
            return;
        };
        let at_rest = rec.status == MachineStatus::Running
            && rec.desired == Desired::Running
            && rec.current_step.is_none()
            && rec.snapshot_job.is_none();
        let (last, _) = self.idle_view(rec);
        if !at_rest || now - last < timeout.as_millis() as i64 {
            return;
        }
        let me = Arc::clone(self);
        let guard = Why {
            guard: Some(Guard {
                generation: rec.generation,
                status: MachineStatus::Running,
            }),
            reason: format!(
                "idle: no activity for {} s (idle timeout {} s)",
                (now - last) / 1000,
                timeout.as_secs()
            ),
            event: "requested",
            last_active: Some(last),
        };
        // An ephemeral machine is deleted instead of suspended.
        let (req, doing) = if rec.spec.ephemeral() {
            (Request::ForceDelete, "deleting an idle ephemeral machine")
        } else {
            (Request::Suspend, "suspending")
        };
        let (tenant, id) = (rec.tenant.clone(), id.to_string());
        // Marked seen at a new generation now, so the next tick does not
        // ask again while this request is being recorded.
        if let Some(e) = lock(&self.idle.seen).get_mut(&id) {
            e.since = now;
        }
        tokio::spawn(async move {
            tracing::info!(machine = %id, "idle timeout reached; {doing}");
            if let Err(e) = me.request_as(&tenant, &id, req, Some(guard)).await {
                tracing::warn!(machine = %id, error = %e, "idle timeout: {doing} failed");
            }
        });
    }

    /// Makes machine `m` running for a request that needs it (`trigger`
    /// says which, for the events): a running machine is touched and
    /// returned as it is; a suspended or suspending one is resumed, all
    /// concurrent callers sharing one wake, bounded by `--wake-timeout`.
    /// Any other status is returned as it is (the caller refuses it).
    pub async fn wake(
        self: &Arc<Self>,
        m: Arc<CachedMachine>,
        trigger: &str,
    ) -> Result<Arc<CachedMachine>, WakeError> {
        let id = m.rec.id.clone();
        self.touch(&id);
        let wakeable = matches!(
            m.rec.status,
            MachineStatus::Suspended | MachineStatus::Suspending
        ) || (m.rec.status == MachineStatus::Starting
            && m.rec.desired == Desired::Running)
            || evicted(&m.rec);
        if !wakeable {
            return Ok(m);
        }
        let mut rx = {
            let mut wakes = lock(&self.idle.wakes);
            match wakes.get(&id) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    wakes.insert(id.clone(), rx.clone());
                    let me = Arc::clone(self);
                    let (tenant, mid, trigger) =
                        (m.rec.tenant.clone(), id.clone(), trigger.to_string());
                    tokio::spawn(async move {
                        let outcome = me.wake_now(&tenant, &mid, &trigger).await;
                        lock(&me.idle.wakes).remove(&mid);
                        let _ = tx.send(Some(outcome));
                    });
                    rx
                }
            }
        };
        let outcome = match rx.wait_for(Option::is_some).await {
            Ok(v) => v
                .clone()
                .unwrap_or_else(|| Err("the wake was abandoned".into())),
            Err(_) => Err("the wake was abandoned".into()),
        };
        self.touch(&id);
        match outcome {
            Ok(()) => Ok(self
                .ctx()
                .store
                .get_by_id(&id)
                .map_err(LifecycleError::from)?
                .ok_or_else(|| LifecycleError::NotFound(id.clone()))?),
            Err(why) => Err(WakeError::Failed { machine: id, why }),
        }
    }

    /// One wake: the resume request (unless one is already wanted), then
    /// the wait for `running`.
    async fn wake_now(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        trigger: &str,
    ) -> Result<(), String> {
        let timeout = self.ctx().idle.wake_timeout;
        let current = self
            .ctx()
            .store
            .get_by_id(id)
            .map_err(|e| e.to_string())?
            .ok_or("it was deleted")?;
        let outcome = if current.rec.desired == Desired::Running {
            // Already on its way up (a wake or a start under way).
            self.wait_status(id, MachineStatus::Running, timeout).await
        } else {
            let why = Why::active(format!("wake: {trigger}"));
            // A machine whose memory image was evicted boots afresh.
            let req = if evicted(&current.rec) {
                Request::Start
            } else {
                Request::Resume
            };
            let (_, generation) = self
                .request_as(tenant, id, req, Some(why))
                .await
                .map_err(|e| e.to_string())?;
            self.wait_generation(id, generation, timeout).await
        };
        match outcome {
            WaitOutcome::Reached(_) => Ok(()),
            WaitOutcome::TimedOut(_) => Err(format!(
                "it was not running within the wake timeout ({} s)",
                timeout.as_secs()
            )),
            WaitOutcome::Failed(m) => Err(format!(
                "it failed: {}",
                m.rec.error_message.as_deref().unwrap_or("see its events")
            )),
            WaitOutcome::Unreachable(_, why) => Err(why),
            WaitOutcome::Deleted => Err("it was deleted".into()),
            WaitOutcome::Error(e) => Err(e.to_string()),
        }
    }
}

/// Stopped by the evictor and left so: asleep rather than stopped by its
/// owner, so a request that needs it running wakes it.
fn evicted(rec: &MachineRecord) -> bool {
    rec.status == MachineStatus::Stopped
        && rec.desired == Desired::Stopped
        && rec.error_message.as_deref() == Some(super::evictor::EVICTED_REASON)
}

/// The proxy's way to wake machines: [`Supervisor::wake`].
pub struct SupervisorWaker(pub Arc<Supervisor>);

impl crate::proxy::Waker for SupervisorWaker {
    fn wake(
        &self,
        machine: Arc<CachedMachine>,
    ) -> futures_util::future::BoxFuture<'static, Result<Arc<CachedMachine>, String>> {
        let sup = Arc::clone(&self.0);
        Box::pin(async move {
            let m = sup
                .wake(machine, "proxy request")
                .await
                .map_err(|e| e.to_string())?;
            if m.rec.status == MachineStatus::Running {
                Ok(m)
            } else {
                Err(format!(
                    "machine '{}' is {} after its wake",
                    m.rec.id, m.rec.status
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_counts_rx_and_tx_bytes_per_device() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0
hf-tap1: 42 1 0 0 0 0 0 0 58 2 0 0 0 0 0 0
";
        let d = parse_net_dev(text);
        assert_eq!(d.get("lo"), Some(&2000));
        assert_eq!(d.get("hf-tap1"), Some(&100));
        assert_eq!(d.len(), 2, "{d:?}");
    }
}

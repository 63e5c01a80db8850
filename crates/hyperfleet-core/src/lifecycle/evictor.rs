//! The storage evictor (docs/api.md "Persistence"): owns the decision of
//! what to reclaim when the data directory holds more than the storage
//! budget, and the loop that carries it out.
//!
//! Only sticky machines that are not running are candidates, and only at
//! rest (no VMM, no step or snapshot under way, converged). They are taken
//! lowest `priority` first, then least recently active: first their
//! memory images (a suspended machine becomes stopped), then, when that is
//! not enough, the machines themselves (deleted). Persistent and ephemeral
//! machines, template builders and everything else are never touched.
//!
//! Nothing here touches a file: each eviction is a request through the
//! machine's run (`Supervisor::request_as`) — `stop` of a suspended machine
//! (the run discards its memory image), `delete` of a machine — guarded by
//! the generation and status the evictor saw, so a machine whose desired
//! state changed meanwhile, or whose run is busy, is skipped. The request's
//! event is of kind `evicted`.
//!
//! When only what cannot be evicted is left and the budget is used up,
//! creates, suspends and snapshots are refused (507) instead
//! ([`Supervisor::storage_room`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use hyperfleet_api::{MachineStatus, PersistenceType};

use super::plan::failure_current;
use super::storage::{Eviction, FULL_SCAN_EVERY, SCAN_EVERY};
use super::supervisor::{Guard, LifecycleError, Supervisor, WaitOutcome, Why};
use super::table::{Desired, Request};
use crate::store::MachineRecord;
use crate::util::now_ms;

/// The `exit_reason` of a machine whose memory image the evictor
/// discarded: it is stopped, but nobody asked for that, so a request that
/// needs it running wakes it with a fresh boot ([`Supervisor::wake`]).
pub(crate) const EVICTED_REASON: &str =
    "evicted: its memory image was discarded to keep within the storage budget";

/// A machine the evictor may reclaim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub priority: u8,
    /// Last activity, ms since the epoch.
    pub last_active: i64,
    pub status: MachineStatus,
    pub generation: u64,
    /// Its files, memory image excluded.
    pub disk: u64,
    /// Its memory image (suspended machines).
    pub memory: u64,
}

/// What the evictor does to one machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reclaim {
    /// Discard its memory image: suspended → stopped.
    MemoryImage,
    /// Delete the machine.
    Machine,
}

/// Whether machine `rec` may be evicted now: sticky, not running, at rest.
pub(crate) fn evictable(rec: &MachineRecord) -> bool {
    use MachineStatus as S;
    if rec.tenant == super::snapshots::TEMPLATE_TENANT
        || rec.spec.persistence().kind != PersistenceType::Sticky
        || rec.vmm.is_some()
        || rec.current_step.is_some()
        || rec.snapshot_job.is_some()
    {
        return false;
    }
    match (rec.status, rec.desired) {
        (S::Suspended, Desired::Suspended) | (S::Stopped | S::Pending, Desired::Stopped) => {
            rec.observed_generation >= rec.generation
        }
        (S::Failed, _) => failure_current(rec) && rec.desired != Desired::Deleted,
        _ => false,
    }
}

/// The evictions that bring `used` within `budget`, in order: memory
/// images first, then machines; within each, lowest priority first, then
/// least recently active (then id, so the order is total). Stops as soon
/// as what it frees is enough; when all of it is not, it is all there is.
pub(crate) fn plan(cands: &[Candidate], used: u64, budget: u64) -> Vec<(String, Reclaim)> {
    let mut order: Vec<&Candidate> = cands.iter().collect();
    order.sort_by(|a, b| {
        (a.priority, a.last_active, &a.id).cmp(&(b.priority, b.last_active, &b.id))
    });
    let mut over = used.saturating_sub(budget);
    let mut out = Vec::new();
    if over == 0 {
        return out;
    }
    for c in order.iter().filter(|c| c.memory > 0) {
        out.push((c.id.clone(), Reclaim::MemoryImage));
        over = over.saturating_sub(c.memory);
        if over == 0 {
            return out;
        }
    }
    for c in &order {
        out.push((c.id.clone(), Reclaim::Machine));
        // Its memory image went in the first pass.
        over = over.saturating_sub(c.disk);
        if over == 0 {
            return out;
        }
    }
    out
}

/// What a measurement covers.
#[derive(Debug, Clone, Copy)]
enum Scan {
    /// What runs marked.
    Marked,
    /// What runs marked, machines with a VMM, snapshots and images.
    Running,
    /// Everything.
    All,
}

/// How long the evictor waits for one eviction to be carried out.
const EVICTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Marked machines are measured this long after the first mark, so a
/// burst of steps is measured once.
const SETTLE: Duration = Duration::from_millis(100);

impl Supervisor {
    /// The machines the evictor may reclaim now, with what they hold.
    pub(crate) fn eviction_candidates(&self) -> Result<Vec<Candidate>, LifecycleError> {
        let storage = &self.ctx().storage;
        let mut out = Vec::new();
        self.ctx().store.for_each_machine(|rec| {
            if !evictable(&rec) {
                return;
            }
            let bytes = storage.machine(&rec.id).unwrap_or_default();
            out.push(Candidate {
                priority: rec
                    .spec
                    .persistence()
                    .priority
                    .unwrap_or(hyperfleet_api::Persistence::DEFAULT_PRIORITY),
                last_active: self.last_active(&rec),
                status: rec.status,
                generation: rec.generation,
                disk: bytes.disk,
                memory: if rec.status == MachineStatus::Suspended {
                    bytes.memory
                } else {
                    0
                },
                id: rec.id,
                tenant: rec.tenant,
                name: rec.name,
            });
        })?;
        Ok(out)
    }

    /// What the evictor could free now.
    pub(crate) fn reclaimable_bytes(&self) -> Result<u64, LifecycleError> {
        Ok(self
            .eviction_candidates()?
            .iter()
            .map(|c| c.disk + c.memory)
            .sum())
    }

    /// Refuses (507) what would store more when the budget is used up and
    /// the evictor can free nothing; `doing` names it for the message.
    /// When the evictor can make room, it is woken and the request goes on.
    pub(crate) fn storage_room(&self, doing: &str) -> Result<(), LifecycleError> {
        let storage = &self.ctx().storage;
        let used = storage.totals().used();
        let budget = storage.budget();
        if used < budget {
            return Ok(());
        }
        let reclaimable = self.reclaimable_bytes()?;
        if used.saturating_sub(reclaimable) < budget {
            storage.changed.notify_one();
            return Ok(());
        }
        Err(LifecycleError::InsufficientStorage(format!(
            "cannot {doing}: the storage budget is used up ({} MiB stored, budget {} MiB) and \
             nothing can be evicted (what is stored belongs to persistent or running machines, \
             snapshots, or machines busy right now); nothing was changed. Delete machines or \
             snapshots, or raise --storage-budget",
            used >> 20,
            budget >> 20
        )))
    }

    /// Measures and evicts, forever: after every change a run marked, and
    /// every [`SCAN_EVERY`] (everything every [`FULL_SCAN_EVERY`]).
    pub(crate) async fn evictor_loop(self: Arc<Self>) {
        // Measured at start (`Storage::open`): a daemon restarted over a
        // smaller budget evicts at once.
        if let Err(e) = self.evict().await {
            tracing::warn!(error = %e, "the evictor could not look at the machines; it tries again later");
        }
        let mut last_scan = tokio::time::Instant::now();
        let mut last_full = last_scan;
        loop {
            let storage = &self.ctx().storage;
            tokio::select! {
                _ = storage.changed.notified() => {
                    tokio::time::sleep(SETTLE).await;
                }
                _ = tokio::time::sleep_until(last_scan + SCAN_EVERY) => {}
            }
            let scan = if last_full.elapsed() >= FULL_SCAN_EVERY {
                last_full = tokio::time::Instant::now();
                last_scan = last_full;
                Scan::All
            } else if last_scan.elapsed() >= SCAN_EVERY {
                last_scan = tokio::time::Instant::now();
                Scan::Running
            } else {
                Scan::Marked
            };
            self.measure(scan).await;
            if let Err(e) = self.evict().await {
                tracing::warn!(error = %e, "the evictor could not look at the machines; it tries again later");
            }
        }
    }

    async fn measure(self: &Arc<Self>, scan: Scan) {
        let me = Arc::clone(self);
        let _ = tokio::task::spawn_blocking(move || {
            let storage = &me.ctx().storage;
            match scan {
                Scan::All => storage.measure_all(),
                Scan::Running => {
                    storage.measure_marked();
                    match me.ctx().store.machines_with_vmm() {
                        Ok(live) => {
                            let ids: Vec<String> = live.into_iter().map(|r| r.id).collect();
                            storage.measure_some(&ids);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot list the running machines to measure them")
                        }
                    }
                }
                Scan::Marked => storage.measure_marked(),
            }
        })
        .await;
    }

    /// Evicts until the data directory is within budget or nothing more
    /// may be evicted.
    async fn evict(self: &Arc<Self>) -> Result<(), LifecycleError> {
        let mut skipped: HashSet<String> = HashSet::new();
        loop {
            let storage = &self.ctx().storage;
            let (used, budget) = (storage.totals().used(), storage.budget());
            if used <= budget {
                return Ok(());
            }
            let cands: Vec<Candidate> = self
                .eviction_candidates()?
                .into_iter()
                .filter(|c| !skipped.contains(&c.id))
                .collect();
            let Some((id, what)) = plan(&cands, used, budget).into_iter().next() else {
                tracing::warn!(
                    used_bytes = used,
                    budget_bytes = budget,
                    "over the storage budget and nothing left to evict (persistent or running \
                     machines, snapshots); creates, suspends and snapshots answer 507"
                );
                return Ok(());
            };
            let Some(c) = cands.iter().find(|c| c.id == id) else {
                return Ok(());
            };
            if !self.evict_one(c, what, used, budget).await {
                skipped.insert(id);
            }
        }
    }

    /// One eviction through the machine's run; false when it did not
    /// happen (the machine changed meanwhile, or its run could not).
    async fn evict_one(
        self: &Arc<Self>,
        c: &Candidate,
        what: Reclaim,
        used: u64,
        budget: u64,
    ) -> bool {
        let (req, bytes, noun) = match what {
            Reclaim::MemoryImage => (Request::Stop, c.memory, "memory_image"),
            Reclaim::Machine => (Request::Delete, c.disk + c.memory, "machine"),
        };
        let why = Why {
            reason: format!(
                "evicted: the data directory holds {} MiB, over the storage budget of {} MiB; \
                 this {} ({} MiB, sticky priority {}) was the first to go",
                used >> 20,
                budget >> 20,
                match what {
                    Reclaim::MemoryImage => "memory image",
                    Reclaim::Machine => "machine",
                },
                bytes >> 20,
                c.priority
            ),
            guard: Some(Guard {
                generation: c.generation,
                status: c.status,
            }),
            event: "evicted",
            last_active: None,
        };
        tracing::info!(machine = %c.id, what = noun, bytes, "evicting to stay within the storage budget");
        let (m, generation) = match self.request_as(&c.tenant, &c.id, req, Some(why)).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(machine = %c.id, error = %e, "could not evict");
                return false;
            }
        };
        if generation.number == c.generation {
            // The guard dropped it: the machine changed since it was seen.
            return false;
        }
        let outcome = self
            .wait_generation(&m.rec.id, generation, EVICTION_TIMEOUT)
            .await;
        let done = matches!(
            (&outcome, what),
            (WaitOutcome::Reached(_), Reclaim::MemoryImage)
                | (WaitOutcome::Deleted, Reclaim::Machine)
        );
        if !done {
            tracing::warn!(machine = %c.id, ?outcome, "an eviction did not finish");
            return false;
        }
        let storage = Arc::clone(&self.ctx().storage);
        let id = c.id.clone();
        let _ = tokio::task::spawn_blocking(move || storage.measure_one(&id)).await;
        self.ctx().storage.record_eviction(Eviction {
            machine_id: c.id.clone(),
            machine_name: c.name.clone(),
            what: noun,
            bytes,
            at: now_ms(),
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn cand(id: &str, priority: u8, last_active: i64, disk: u64, memory: u64) -> Candidate {
        Candidate {
            id: id.into(),
            tenant: "default".into(),
            name: id.into(),
            priority,
            last_active,
            status: if memory > 0 {
                MachineStatus::Suspended
            } else {
                MachineStatus::Stopped
            },
            generation: 1,
            disk,
            memory,
        }
    }

    fn ids(p: &[(String, Reclaim)]) -> Vec<(&str, Reclaim)> {
        p.iter().map(|(id, r)| (id.as_str(), *r)).collect()
    }

    #[test]
    fn nothing_is_evicted_within_budget() {
        let c = [cand("a", 5, 1, MIB, MIB)];
        assert!(plan(&c, 2 * MIB, 2 * MIB).is_empty());
        assert!(plan(&c, MIB, 2 * MIB).is_empty());
    }

    #[test]
    fn lowest_priority_goes_first_then_least_recently_active() {
        let c = [
            cand("high-old", 9, 1, MIB, MIB),
            cand("low-new", 1, 50, MIB, MIB),
            cand("low-old", 1, 10, MIB, MIB),
        ];
        assert_eq!(
            ids(&plan(&c, 10 * MIB, 9 * MIB)),
            [("low-old", Reclaim::MemoryImage)]
        );
        assert_eq!(
            ids(&plan(&c, 10 * MIB, 8 * MIB)),
            [
                ("low-old", Reclaim::MemoryImage),
                ("low-new", Reclaim::MemoryImage)
            ]
        );
    }

    #[test]
    fn memory_images_go_before_any_machine() {
        let c = [
            cand("stopped-low", 0, 1, MIB, 0),
            cand("suspended-high", 9, 1, MIB, MIB),
            cand("suspended-mid", 5, 1, MIB, MIB),
        ];
        // 3.5 MiB over: both images (2), then machines in order.
        let p = plan(&c, 10 * MIB, 6 * MIB + MIB / 2);
        assert_eq!(
            ids(&p),
            [
                ("suspended-mid", Reclaim::MemoryImage),
                ("suspended-high", Reclaim::MemoryImage),
                ("stopped-low", Reclaim::Machine),
                ("suspended-mid", Reclaim::Machine),
            ]
        );
    }

    #[test]
    fn when_all_is_not_enough_all_is_planned() {
        let c = [cand("a", 5, 1, MIB, MIB), cand("b", 5, 2, MIB, 0)];
        assert_eq!(
            ids(&plan(&c, 100 * MIB, MIB)),
            [
                ("a", Reclaim::MemoryImage),
                ("a", Reclaim::Machine),
                ("b", Reclaim::Machine)
            ]
        );
        assert!(plan(&[], 100 * MIB, MIB).is_empty());
    }

    #[test]
    fn only_sticky_machines_at_rest_and_not_running_are_evictable() {
        use crate::lifecycle::test_machine;
        use hyperfleet_api::Persistence;
        let at_rest = |status, desired| {
            let mut r = test_machine(status, desired);
            r.observed_generation = r.generation;
            r
        };
        assert!(evictable(&at_rest(
            MachineStatus::Suspended,
            Desired::Suspended
        )));
        assert!(evictable(&at_rest(
            MachineStatus::Stopped,
            Desired::Stopped
        )));
        assert!(evictable(&at_rest(
            MachineStatus::Pending,
            Desired::Stopped
        )));
        assert!(!evictable(&at_rest(
            MachineStatus::Running,
            Desired::Running
        )));
        // A request arrived meanwhile: its run has work.
        assert!(!evictable(&at_rest(
            MachineStatus::Suspended,
            Desired::Running
        )));
        let mut busy = at_rest(MachineStatus::Stopped, Desired::Stopped);
        busy.current_step = Some("prepare_disk".into());
        assert!(!evictable(&busy));
        for kind in [PersistenceType::Persistent, PersistenceType::Ephemeral] {
            let mut r = at_rest(MachineStatus::Suspended, Desired::Suspended);
            r.spec.persistence = Some(Persistence {
                kind,
                priority: None,
            });
            assert!(!evictable(&r), "{kind}");
        }
        let mut builder = at_rest(MachineStatus::Stopped, Desired::Stopped);
        builder.tenant = crate::lifecycle::snapshots::TEMPLATE_TENANT.into();
        assert!(!evictable(&builder));
    }
}

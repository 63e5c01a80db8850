//! The supervisor owns one run per machine and is the only door from the API
//! into the lifecycle: it records desired changes (after asking the
//! transition table), makes sure the machine's run exists, and lets callers
//! wait for the outcome on in-memory notifications.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyperfleet_api::{MachineStatus, VmmKind};
use tokio::task::JoinHandle;

use super::capacity::{self, AdmissionConfig, Ask, CapacityDenied, MemoryBudget, QuotaDenied};
use super::plan::{background_only, failure_current, quiescent};
use super::run::{self, RunCtx, RunExit};
use super::table::{self, allowed_requests, reachable, Admission, Denied, Desired, Request};
use crate::store::{lock, CachedMachine, EventRecord, MachineRecord, MachineSpec, StoreError};
use crate::util::{new_machine_id, new_operation_id, now_ms};

/// Errors of the lifecycle boundary, as seen by the API.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("machine '{0}' not found")]
    NotFound(String),
    #[error("cannot {request} a machine that is {status}; allowed now: {allowed}")]
    InvalidState {
        request: Request,
        status: MachineStatus,
        allowed: String,
    },
    #[error("cannot {0} a machine that is being deleted: a delete was accepted, and only deletes are allowed now")]
    BeingDeleted(Request),
    #[error("a machine named '{0}' already exists")]
    NameTaken(String),
    #[error("the {0} backend is not enabled on this server")]
    BackendDisabled(VmmKind),
    #[error("the {0} backend cannot create machines right now: {1}")]
    BackendUnavailable(VmmKind, String),
    #[error(transparent)]
    QuotaExceeded(QuotaDenied),
    #[error("cannot {request} machine '{machine}': {why}")]
    InsufficientCapacity {
        request: Request,
        machine: String,
        why: CapacityDenied,
    },
    #[error("snapshot '{0}' not found")]
    SnapshotNotFound(String),
    #[error("a snapshot named '{0}' already exists")]
    SnapshotNameTaken(String),
    /// A snapshot cannot be taken, or used, as things are (the message
    /// says why and what would work).
    #[error("{0}")]
    SnapshotConflict(String),
    #[error("{0}")]
    SnapshotMismatch(String),
    /// What an ephemeral machine cannot do (be suspended), or become.
    #[error("{0}")]
    Ephemeral(String),
    /// The storage budget is used up and nothing can be evicted (507).
    #[error("{0}")]
    InsufficientStorage(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for LifecycleError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NameTaken(n) => LifecycleError::NameTaken(n),
            StoreError::SnapshotNameTaken(n) => LifecycleError::SnapshotNameTaken(n),
            StoreError::NoSuchMachine(id) => LifecycleError::NotFound(id),
            e => LifecycleError::Store(e),
        }
    }
}

/// How a wait ended.
#[derive(Debug)]
pub enum WaitOutcome {
    /// The condition holds; the machine as it is now.
    Reached(Arc<CachedMachine>),
    /// The machine was deleted (the goal, for a delete).
    Deleted,
    /// The machine failed while we waited.
    Failed(Arc<CachedMachine>),
    /// The goal can no longer be reached without another request.
    Unreachable(Arc<CachedMachine>, String),
    TimedOut(Option<Arc<CachedMachine>>),
    /// The store could not be read.
    Error(StoreError),
}

pub struct Supervisor {
    ctx: Arc<RunCtx>,
    runs: Mutex<HashMap<String, JoinHandle<()>>>,
    /// Machines whose run holds a background slot (see [`admit`]).
    ///
    /// [`admit`]: Supervisor::admit
    background: Mutex<HashSet<String>>,
    /// Wakes the admission loop: a create, a freed slot.
    background_wake: tokio::sync::Notify,
    /// The quota of tenants without one of their own.
    default_quota: hyperfleet_api::QuotaLimits,
    /// What the host's memory allows; `None` when it is unknown (no
    /// capacity check).
    memory: Option<MemoryBudget>,
    /// Idle timers and wakes in flight (`super::idle`).
    pub(crate) idle: super::idle::IdleState,
    /// When this supervisor (the daemon) started: the earliest activity.
    pub(crate) started_ms: i64,
}

/// Why a request is made by the server itself rather than a client: shown
/// in its event (of kind `event`). With a `guard`, the request is dropped
/// unless the machine is still as the server saw it (a request that came
/// meanwhile wins).
#[derive(Debug, Clone)]
pub(crate) struct Why {
    pub reason: String,
    pub guard: Option<Guard>,
    /// The event's kind: `requested`, or `evicted` for the evictor's.
    pub event: &'static str,
    /// The machine's last activity to record (`last_active_at`); None
    /// keeps what is recorded. Client requests record their own time.
    pub last_active: Option<i64>,
}

impl Why {
    /// A request made for `reason`, unguarded, as activity now (a wake).
    pub(crate) fn active(reason: String) -> Why {
        Why {
            reason,
            guard: None,
            event: "requested",
            last_active: Some(now_ms()),
        }
    }
}

/// The machine as a server-made request saw it: still at this generation
/// (so its desired state did not change), in this status, with no step or
/// snapshot under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Guard {
    pub generation: u64,
    pub status: MachineStatus,
}

/// Background runs at once: enough to keep the disk busy, few enough that
/// they never crowd out requests.
const BACKGROUND_RUNS: usize = 8;

impl Supervisor {
    pub fn new(ctx: RunCtx) -> Arc<Self> {
        Supervisor::with_admission(ctx, AdmissionConfig::default())
    }

    /// A supervisor that admits creates under tenant quotas and VMMs under
    /// the host's memory (see [`capacity`]).
    pub fn with_admission(ctx: RunCtx, admission: AdmissionConfig) -> Arc<Self> {
        let memory = match capacity::host_memory_mib() {
            Some(host_total_mib) => Some(MemoryBudget {
                host_total_mib,
                overcommit: admission.memory_overcommit,
                reserve_mib: admission.memory_reserve_mib,
            }),
            None => {
                tracing::warn!(
                    "cannot read MemTotal from /proc/meminfo: starts are not checked against \
                     the host's memory"
                );
                None
            }
        };
        if let Some(m) = &memory {
            tracing::info!(
                host_mib = m.host_total_mib,
                overcommit = m.overcommit,
                reserve_mib = m.reserve_mib,
                allowed_mib = m.allowed_mib(),
                "guest memory admitted up to the host's budget"
            );
        }
        Arc::new(Supervisor {
            ctx: Arc::new(ctx),
            runs: Mutex::new(HashMap::new()),
            background: Mutex::new(HashSet::new()),
            background_wake: tokio::sync::Notify::new(),
            default_quota: admission.default_quota,
            memory,
            idle: Default::default(),
            started_ms: now_ms(),
        })
    }

    /// The quota of tenants without one of their own (`--default-quota-*`).
    pub fn default_quota(&self) -> hyperfleet_api::QuotaLimits {
        self.default_quota
    }

    pub fn ctx(&self) -> &RunCtx {
        &self.ctx
    }

    /// Starts the run of every machine in the store that has something to
    /// do. Recovery after a crash is nothing more than this: each run
    /// observes the host and finishes or undoes what its journal says was
    /// under way. A quiescent machine (no VMM, no step under way, nothing
    /// wanted) would only start a run that ends at once, so it gets none;
    /// its next request starts one. Machines whose only work is
    /// preparation are left to the admission loop, which this starts.
    pub fn start_all(self: &Arc<Self>) -> Result<usize, StoreError> {
        // Streamed: only the ids of machines with work are kept.
        let mut busy = Vec::new();
        self.ctx.store.for_each_machine(|m| {
            if !quiescent(&m) && !background_only(&m) {
                busy.push(m.id);
            }
        })?;
        for id in &busy {
            self.ensure_run(id);
        }
        let me = Arc::clone(self);
        tokio::spawn(async move { me.admission_loop().await });
        tokio::spawn(Arc::clone(self).idle_loop());
        tokio::spawn(Arc::clone(self).evictor_loop());
        Ok(busy.len())
    }

    /// Makes sure machine `id` has exactly one live run, now (a request is
    /// waiting for it).
    pub fn ensure_run(self: &Arc<Self>, id: &str) {
        // A run admitted as background work now serves a request: it no
        // longer holds a background slot.
        if lock(&self.background).remove(id) {
            self.background_wake.notify_one();
        }
        self.spawn_run(id);
    }

    /// Runs whose only work is create-time preparation nobody waits for
    /// (`run::background_only`) are background work. Starting one per
    /// machine at once — a burst of creates, a restart with many
    /// unprepared machines — held a task with its record and change
    /// channel per machine, all competing for the disk (measured: +35 MiB
    /// during a 10 s create burst). Instead the store is the queue (the
    /// partial index of unprepared machines, oldest first) and this loop
    /// admits [`BACKGROUND_RUNS`] at a time, so memory holds only the
    /// admitted ids; a request for a waiting machine starts its run at once.
    async fn admission_loop(self: Arc<Self>) {
        loop {
            if let Err(e) = self.admit() {
                tracing::error!(error = %e, "cannot look for machines to prepare; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            self.background_wake.notified().await;
        }
    }

    /// Fills the free background slots with the oldest unprepared machines.
    fn admit(self: &Arc<Self>) -> Result<(), StoreError> {
        let admitted: HashSet<String> = lock(&self.background).clone();
        let free = BACKGROUND_RUNS.saturating_sub(admitted.len());
        if free == 0 {
            return Ok(());
        }
        // Admitted machines are still unprepared: ask for enough to skip them.
        let next = self.ctx.store.unprepared_ids(free + admitted.len())?;
        for id in next
            .into_iter()
            .filter(|id| !admitted.contains(id))
            .take(free)
        {
            lock(&self.background).insert(id.clone());
            if !self.spawn_run(&id) {
                // Its run already exists (a request started it): no slot.
                lock(&self.background).remove(&id);
            }
        }
        Ok(())
    }

    /// Spawns machine `id`'s run unless one is live; true when it spawned.
    fn spawn_run(self: &Arc<Self>, id: &str) -> bool {
        let mut runs = lock(&self.runs);
        if let Some(h) = runs.get(id) {
            if !h.is_finished() {
                return false;
            }
        }
        let me = Arc::clone(self);
        let mid = id.to_string();
        let handle = tokio::spawn(async move {
            me.drive(&mid).await;
            if lock(&me.background).remove(&mid) {
                me.background_wake.notify_one();
            }
        });
        runs.insert(id.to_string(), handle);
        true
    }

    /// Runs machine `id`'s run until the machine is deleted or idle,
    /// restarting it after a panic.
    async fn drive(self: &Arc<Self>, mid: &str) {
        let me = self;
        loop {
            let task = tokio::spawn(run::run(me.ctx.clone(), mid.to_string()));
            match task.await {
                Ok(RunExit::Deleted) => {
                    lock(&me.runs).remove(mid);
                    return;
                }
                Ok(RunExit::Quiescent) => {
                    // Requests write the store *before* calling
                    // ensure_run, which takes this same lock: either we
                    // see their change here and go on, or they find no
                    // run after we leave and start a new one.
                    let mut runs = lock(&me.runs);
                    // A read error is not idleness: run again.
                    let still_idle = me
                        .ctx
                        .store
                        .get_by_id(mid)
                        .is_ok_and(|m| m.is_some_and(|m| quiescent(&m.rec)));
                    if still_idle {
                        runs.remove(mid);
                        // The run's receiver is gone: an idle machine
                        // keeps no change channel unless someone waits.
                        me.ctx.store.forget_idle_watcher(mid);
                        return;
                    }
                }
                Err(e) if e.is_panic() => {
                    tracing::error!(machine = %mid, "BUG: machine run panicked; restarting it in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(_) => {
                    lock(&me.runs).remove(mid);
                    return;
                }
            }
        }
    }

    pub fn run_count(&self) -> usize {
        lock(&self.runs).len()
    }

    /// The machines that have a run now.
    pub(crate) fn run_ids(&self) -> Vec<String> {
        lock(&self.runs).keys().cloned().collect()
    }

    /// Records a new machine (`pending`) durably and starts its run.
    pub async fn create(
        self: &Arc<Self>,
        tenant: &str,
        name: Option<String>,
        mut spec: MachineSpec,
    ) -> Result<Arc<CachedMachine>, LifecycleError> {
        // A warmed template of the machine's size: its first start restores
        // that freshly booted guest instead of booting (docs/api.md
        // "Templates").
        // (Templates are of the built-in guest image, not of OCI images.)
        if let Some(backend) = self
            .ctx
            .backends
            .get(&spec.vmm)
            .filter(|_| spec.oci.is_none())
        {
            spec.image = backend.current_image().ok().flatten();
            if let Some(t) = self.template_for(&spec) {
                return self.create_machine(tenant, name, spec, Some(&t)).await;
            }
        }
        self.create_machine(tenant, name, spec, None).await
    }

    /// [`Self::create`], or with `from`, a machine resting on that
    /// snapshot: its image, sizes and disk are the snapshot's, and when the
    /// snapshot has memory its first start restores it.
    pub(crate) async fn create_machine(
        self: &Arc<Self>,
        tenant: &str,
        name: Option<String>,
        mut spec: MachineSpec,
        from: Option<&crate::store::SnapshotRecord>,
    ) -> Result<Arc<CachedMachine>, LifecycleError> {
        let backend = self
            .ctx
            .backends
            .get(&spec.vmm)
            .ok_or(LifecycleError::BackendDisabled(spec.vmm))?;
        match from {
            Some(s) => {
                spec.image = s.data.image.clone();
                spec.disk_bytes = s.data.disk_bytes;
                spec.base_snapshot = Some(s.id.clone());
                spec.oci = s.data.oci.clone();
                spec.process = s.data.process.clone();
                spec.restart = s.data.restart;
            }
            None => {
                // The machine records the exact guest image it will be made from.
                spec.image = backend
                    .current_image()
                    .map_err(|why| LifecycleError::BackendUnavailable(spec.vmm, why))?;
                spec.disk_bytes = match &spec.oci {
                    Some(oci) => Some(oci.disk_bytes),
                    None => backend.disk_bytes(spec.image.as_deref()),
                };
                spec.base_snapshot = None;
            }
        }
        let ask = Ask {
            vcpus: u64::from(spec.vcpu_count),
            memory_mib: u64::from(spec.mem_size_mib),
            disk_bytes: spec.disk_bytes.unwrap_or(0),
        };
        let id = new_machine_id();
        let now = now_ms();
        // Derived from the whole id so generated names never collide.
        let name = name.unwrap_or_else(|| format!("vm-{}", &id[1..]));
        let mut rec = MachineRecord::new(id.clone(), tenant, name, spec, now);
        rec.operation_id = Some(new_operation_id());
        // Its first start continues the snapshot's guest.
        rec.has_snapshot = from.is_some_and(|s| s.data.memory);
        let base = from.map(|s| s.id.clone());
        let mut ev = EventRecord::new(&id, "created");
        ev.to_status = Some(MachineStatus::Pending);
        ev.operation_id = rec.operation_id.clone();
        let default_quota = self.default_quota;
        // Checked in the transaction that inserts the machine: creates are
        // serialised on the writer, so concurrent ones cannot overshoot.
        self.ctx
            .store
            .write(move |ctx| {
                // Checked here, where a delete of the snapshot is decided
                // too: a machine never rests on a snapshot being removed.
                if let Some(sid) = &base {
                    let usable = ctx
                        .snapshot(sid)?
                        .is_some_and(|s| s.status == hyperfleet_api::SnapshotStatus::Ready);
                    if !usable {
                        return Ok(Err(LifecycleError::SnapshotConflict(format!(
                            "snapshot {sid} is no longer ready (it was deleted meanwhile)"
                        ))));
                    }
                }
                let limits = ctx.quota(&rec.tenant)?.unwrap_or(default_quota);
                // Template builders are the server's, not a tenant's.
                let builder = rec.tenant == super::snapshots::TEMPLATE_TENANT;
                if !limits.is_unlimited() && !builder {
                    let usage = ctx.tenant_usage(&rec.tenant)?;
                    if let Err(denied) = capacity::check_quota(&rec.tenant, &limits, &usage, ask) {
                        return Ok(Err(LifecycleError::QuotaExceeded(denied)));
                    }
                }
                ctx.put_machine(rec)?;
                ctx.append_event(ev)?;
                Ok(Ok(()))
            })
            .await??;
        let entry = self
            .ctx
            .store
            .get_by_id(&id)?
            .ok_or_else(|| LifecycleError::NotFound(id.clone()))?;
        // A new machine's run prepares its directory and disk in the
        // background; a machine with nothing to do gets no run until its
        // first request.
        if background_only(&entry.rec) {
            self.background_wake.notify_one();
        } else if !quiescent(&entry.rec) {
            self.ensure_run(&id);
        }
        Ok(entry)
    }

    /// The id of tenant `tenant`'s machine `id_or_name`.
    fn machine_id(&self, tenant: &str, id_or_name: &str) -> Result<String, LifecycleError> {
        Ok(self
            .ctx
            .store
            .get(Some(tenant), id_or_name)?
            .ok_or_else(|| LifecycleError::NotFound(id_or_name.to_string()))?
            .rec
            .id
            .clone())
    }

    /// Applies a request through the transition table and records the new
    /// desired state. Returns the machine after the change and the
    /// generation a waiter should wait for (the current one when nothing
    /// changed).
    pub async fn request(
        self: &Arc<Self>,
        tenant: &str,
        id_or_name: &str,
        req: Request,
    ) -> Result<(Arc<CachedMachine>, Generation), LifecycleError> {
        self.request_as(tenant, id_or_name, req, None).await
    }

    /// [`Self::request`], made by the server itself for the reason `why`.
    pub(crate) async fn request_as(
        self: &Arc<Self>,
        tenant: &str,
        id_or_name: &str,
        req: Request,
        why: Option<Why>,
    ) -> Result<(Arc<CachedMachine>, Generation), LifecycleError> {
        let id = self.machine_id(tenant, id_or_name)?;
        // A suspend (or snapshot) stores more: refused when the budget is
        // used up and nothing can be evicted. The idle timer's is not
        // refused (nobody would be told): it suspends as it can.
        if req == Request::Suspend && why.is_none() {
            self.storage_room("suspend the machine")?;
        }
        let wid = id.clone();
        let memory = self.memory;
        let outcome = self
            .ctx
            .store
            .write(move |ctx| {
                let mut rec = ctx
                    .machine(&wid)?
                    .ok_or_else(|| StoreError::NoSuchMachine(wid.clone()))?;
                let unchanged = Generation {
                    number: rec.generation,
                    desired: rec.desired,
                };
                if let Some(g) = why.as_ref().and_then(|w| w.guard) {
                    let as_seen = rec.generation == g.generation
                        && rec.status == g.status
                        && rec.current_step.is_none()
                        && rec.snapshot_job.is_none();
                    if !as_seen {
                        return Ok(Ok(unchanged));
                    }
                }
                let ephemeral = rec.spec.ephemeral();
                if ephemeral && req == Request::Suspend {
                    return Ok(Err(Refused::Ephemeral(rec.name.clone())));
                }
                // An ephemeral machine's stop is a delete; a kill still
                // escalates it, as it escalates any graceful stop.
                let escalate = ephemeral
                    && req == Request::Kill
                    && rec.desired == Desired::Deleted
                    && !rec.stop_kill
                    && table::on_request(rec.status, req).is_some();
                let intent = match table::decide(&rec, req) {
                    _ if escalate => table::Intent::Kill,
                    Admission::Deny(denied) => return Ok(Err(Refused::State(denied))),
                    Admission::Unchanged => return Ok(Ok(unchanged)),
                    Admission::Apply(intent) => intent,
                };
                let held = capacity::holds_memory(&rec);
                table::apply(&mut rec, intent);
                // An ephemeral machine is deleted when it stops: the stop
                // (or kill) goes on to the delete.
                let ephemeral_stop = ephemeral && rec.desired == Desired::Stopped;
                if ephemeral_stop {
                    rec.desired = Desired::Deleted;
                }
                // Stopped by the evictor, not by its owner: the reason it
                // shows once stopped, and what lets a request wake it.
                if req == Request::Stop && why.as_ref().is_some_and(|w| w.event == "evicted") {
                    rec.error_message = Some(super::evictor::EVICTED_REASON.to_string());
                }
                match why.as_ref() {
                    None => rec.last_active_at = Some(now_ms()),
                    Some(w) => {
                        if let Some(t) = w.last_active {
                            rec.last_active_at = Some(rec.last_active_at.map_or(t, |l| l.max(t)));
                        }
                    }
                }
                // A machine about to get a VMM must fit besides those that
                // hold one; checked here, in the same transaction that
                // records the start, so two starts cannot share headroom.
                if let Some(budget) = memory.filter(|_| !held && capacity::holds_memory(&rec)) {
                    let committed = ctx.committed_memory_mib()?;
                    let asked = u64::from(rec.spec.mem_size_mib);
                    if let Err(why) = capacity::check_memory(&budget, committed, asked) {
                        return Ok(Err(Refused::Capacity(rec.name.clone(), why)));
                    }
                }
                let op = new_operation_id();
                rec.operation_id = Some(op.clone());
                rec.updated_at = now_ms();
                let generation = Generation {
                    number: rec.generation,
                    desired: rec.desired,
                };
                let kind = why.as_ref().map_or("requested", |w| w.event);
                let mut ev = EventRecord::new(&wid, kind);
                ev.from_status = Some(rec.status);
                ev.operation_id = Some(op);
                let mut by = why.map(|w| format!(" ({})", w.reason)).unwrap_or_default();
                if ephemeral_stop {
                    by.push_str(" (ephemeral: deleted when it stops)");
                }
                ev.message = Some(format!(
                    "{req} requested{by}; desired state is now {}",
                    rec.desired.as_str()
                ));
                ctx.put_machine(rec)?;
                ctx.append_event(ev)?;
                Ok(Ok(generation))
            })
            .await?;
        match outcome {
            Err(Refused::Ephemeral(name)) => Err(LifecycleError::Ephemeral(format!(
                "machine '{name}' is ephemeral and is never suspended (it is deleted when it \
                 stops or idles); stop or delete it, or make it sticky or persistent first \
                 (PATCH /machines/{{id}})"
            ))),
            Err(Refused::Capacity(machine, why)) => Err(LifecycleError::InsufficientCapacity {
                request: req,
                machine,
                why,
            }),
            Err(Refused::State(Denied {
                request,
                deleting: true,
                ..
            })) => Err(LifecycleError::BeingDeleted(request)),
            Err(Refused::State(Denied {
                request, status, ..
            })) => Err(LifecycleError::InvalidState {
                request,
                status,
                allowed: describe_allowed(status),
            }),
            Ok(generation) => {
                self.ensure_run(&id);
                let entry = self
                    .ctx
                    .store
                    .get_by_id(&id)?
                    .ok_or_else(|| LifecycleError::NotFound(id.clone()))?;
                Ok((entry, generation))
            }
        }
    }

    /// `PATCH /machines/{id}`: changes the settings `upd` names (validated)
    /// in one commit, with an `updated` event. The idle deadline starts
    /// over from now. A machine cannot become ephemeral while it rests
    /// suspended or stopped (an ephemeral machine never does), nor be
    /// changed once a delete was accepted.
    pub async fn update(
        self: &Arc<Self>,
        tenant: &str,
        id_or_name: &str,
        upd: hyperfleet_api::UpdateMachineRequest,
    ) -> Result<Arc<CachedMachine>, LifecycleError> {
        use hyperfleet_api::{Persistence, PersistenceType};
        let id = self.machine_id(tenant, id_or_name)?;
        let wid = id.clone();
        self.ctx
            .store
            .write(move |ctx| {
                let mut rec = ctx
                    .machine(&wid)?
                    .ok_or_else(|| StoreError::NoSuchMachine(wid.clone()))?;
                if rec.desired == Desired::Deleted {
                    return Ok(Err(LifecycleError::BeingDeleted(Request::Delete)));
                }
                let mut changes = Vec::new();
                if let Some(p) = &upd.persistence {
                    let p = Persistence::effective(Some(p));
                    let rests = matches!(
                        rec.status,
                        MachineStatus::Suspended
                            | MachineStatus::Suspending
                            | MachineStatus::Stopped
                    ) || matches!(rec.desired, Desired::Suspended);
                    if p.kind == PersistenceType::Ephemeral && !rec.spec.ephemeral() && rests {
                        return Ok(Err(LifecycleError::Ephemeral(format!(
                            "machine '{}' is {} and an ephemeral machine is never suspended or \
                             stopped (it is deleted instead): start it first, or delete it",
                            rec.name, rec.status
                        ))));
                    }
                    changes.push(format!("persistence {p}"));
                    rec.spec.persistence = Some(p);
                }
                if let Some(t) = upd.idle_timeout_seconds {
                    changes.push(match t {
                        None => "idle timeout: the server's default".to_string(),
                        Some(0) => "idle timeout: never".to_string(),
                        Some(t) => format!("idle timeout {t} s"),
                    });
                    rec.spec.idle_timeout_seconds = t;
                }
                if let Some(m) = upd.metadata {
                    changes.push(format!("metadata ({} entries)", m.len()));
                    rec.spec.metadata = m;
                }
                let now = now_ms();
                rec.updated_at = now;
                rec.last_active_at = Some(now);
                let mut ev = EventRecord::new(&wid, "updated");
                ev.from_status = Some(rec.status);
                ev.message = Some(if changes.is_empty() {
                    "updated: nothing changed".to_string()
                } else {
                    format!("updated: {}", changes.join(", "))
                });
                ctx.put_machine_with_spec(rec)?;
                ctx.append_event(ev)?;
                Ok(Ok(()))
            })
            .await??;
        // The deadline starts over with the new timeout.
        self.touch(&id);
        self.ctx
            .store
            .get_by_id(&id)?
            .ok_or(LifecycleError::NotFound(id))
    }

    /// Waits until the run has converged on `generation` (or a later one
    /// that still wants the same), the machine failed at or after it, a
    /// later request wanted something else, or the deadline passes.
    pub async fn wait_generation(
        &self,
        id: &str,
        generation: Generation,
        timeout: Duration,
    ) -> WaitOutcome {
        self.wait_until(id, timeout, |m| match settled(&m.rec, generation)? {
            Settled::Reached => Some(WaitOutcome::Reached(m.clone())),
            Settled::Failed => Some(WaitOutcome::Failed(m.clone())),
            Settled::Superseded => Some(WaitOutcome::Unreachable(
                m.clone(),
                format!(
                    "a later request changed the machine's desired state to {}",
                    m.rec.desired.as_str()
                ),
            )),
        })
        .await
    }

    /// `GET /wait`: until the machine's status is `target`.
    pub async fn wait_status(
        &self,
        id: &str,
        target: MachineStatus,
        timeout: Duration,
    ) -> WaitOutcome {
        self.wait_until(id, timeout, |m| {
            let r = &m.rec;
            if r.status == target {
                return Some(WaitOutcome::Reached(m.clone()));
            }
            if failure_current(r) {
                return Some(WaitOutcome::Failed(m.clone()));
            }
            if !reachable(r.status, r.desired, target) {
                return Some(WaitOutcome::Unreachable(
                    m.clone(),
                    format!(
                        "the machine is {} and moving toward {}; it cannot become {target} without another request",
                        r.status,
                        r.desired.as_str()
                    ),
                ));
            }
            None
        })
        .await
    }

    async fn wait_until(
        &self,
        id: &str,
        timeout: Duration,
        check: impl Fn(&Arc<CachedMachine>) -> Option<WaitOutcome>,
    ) -> WaitOutcome {
        let mut rx = match self.ctx.store.subscribe(id) {
            Ok(Some(rx)) => rx,
            Ok(None) => return WaitOutcome::Deleted,
            Err(e) => return WaitOutcome::Error(e),
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let current = rx.borrow_and_update().clone();
            let Some(m) = current else {
                return WaitOutcome::Deleted;
            };
            if let Some(done) = check(&m) {
                return done;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return WaitOutcome::Deleted,
                Err(_) => return WaitOutcome::TimedOut(Some(m)),
            }
        }
    }
}

/// Why a request was not recorded.
enum Refused {
    /// The transition table does not allow it.
    State(Denied),
    /// The machine (named) would get a VMM the host's memory cannot hold.
    Capacity(String, CapacityDenied),
    /// The machine (named) is ephemeral and the request was a suspend.
    Ephemeral(String),
}

/// What an accepted request opened: the generation to wait for and the
/// state it asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    pub number: u64,
    pub desired: Desired,
}

/// How a wait for a request's generation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// The run converged on it (or on a later request wanting the same).
    Reached,
    /// The machine failed at or after it.
    Failed,
    /// A later request wants something else: this one will never be
    /// reached as asked (answered 409, never 200 with the other's state).
    Superseded,
}

/// Whether machine `r` has settled what the request that opened `g` asked.
fn settled(r: &MachineRecord, g: Generation) -> Option<Settled> {
    if r.status == MachineStatus::Failed && r.failed_generation.is_some_and(|f| f >= g.number) {
        return Some(Settled::Failed);
    }
    let later = r.generation > g.number;
    if later && r.desired != g.desired {
        return Some(Settled::Superseded);
    }
    if r.observed_generation >= g.number {
        if later && r.status != r.desired.as_status() {
            return Some(Settled::Superseded);
        }
        return Some(Settled::Reached);
    }
    None
}

/// "start, delete (or: nothing)" for error messages.
pub fn describe_allowed(status: MachineStatus) -> String {
    let allowed = allowed_requests(status);
    if allowed.is_empty() {
        return "nothing".into();
    }
    allowed
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use MachineStatus as S;

    fn rec(status: MachineStatus, desired: Desired, generation: u64) -> MachineRecord {
        let mut r = crate::lifecycle::test_machine(status, desired);
        r.generation = generation;
        r.observed_generation = generation - 1;
        r
    }

    const START: Generation = Generation {
        number: 2,
        desired: Desired::Running,
    };

    #[test]
    fn a_wait_ends_when_its_request_converged() {
        let mut r = rec(S::Starting, Desired::Running, 2);
        assert_eq!(settled(&r, START), None);
        r.status = S::Running;
        r.observed_generation = 2;
        assert_eq!(settled(&r, START), Some(Settled::Reached));
    }

    #[test]
    fn a_later_request_for_something_else_supersedes_the_wait() {
        // A start waiting while a stop arrives: never "200 stopped".
        let mut r = rec(S::Starting, Desired::Stopped, 3);
        assert_eq!(settled(&r, START), Some(Settled::Superseded));
        r.status = S::Stopped;
        r.observed_generation = 3;
        assert_eq!(settled(&r, START), Some(Settled::Superseded));
        // A stop waiting while a start arrives: never "200 running".
        let stop = Generation {
            number: 2,
            desired: Desired::Stopped,
        };
        let r = rec(S::Running, Desired::Running, 3);
        assert_eq!(settled(&r, stop), Some(Settled::Superseded));
    }

    #[test]
    fn a_later_request_for_the_same_state_still_ends_the_wait() {
        // A restart after a start, a kill after a stop: same goal.
        let mut r = rec(S::Starting, Desired::Running, 3);
        r.observed_generation = 1;
        assert_eq!(settled(&r, START), None);
        r.status = S::Running;
        r.observed_generation = 3;
        assert_eq!(settled(&r, START), Some(Settled::Reached));
    }

    #[test]
    fn a_failure_at_or_after_the_request_ends_the_wait() {
        let mut r = rec(S::Failed, Desired::Running, 2);
        r.failed_generation = Some(1);
        assert_eq!(settled(&r, START), None);
        r.failed_generation = Some(2);
        assert_eq!(settled(&r, START), Some(Settled::Failed));
    }
}

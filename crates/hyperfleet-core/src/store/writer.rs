//! The writer thread: batches queued write closures into one transaction
//! (each in its own SAVEPOINT), commits once, then publishes the changes to
//! the record cache and counts, the per-machine watchers and the event
//! stream, and finally answers each caller.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use hyperfleet_api::MachineStatus;
use rusqlite::{params, Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::cache::CachedMachine;
use super::{
    lock, read_lock, rows, write_lock, EventRecord, KeyRecord, MachineRecord, NetLease, Shared,
    StoreError,
};

/// What one closure (or the whole batch) changed, applied after commit.
#[derive(Default)]
struct Changes {
    machines: HashMap<String, Option<MachineRecord>>,
    /// Moves of the per-tenant, per-status machine counts.
    counts: Vec<(String, MachineStatus, i64)>,
    events: Vec<EventRecord>,
    keys: Vec<KeyRecord>,
}

impl Changes {
    fn absorb(&mut self, other: Changes) {
        self.machines.extend(other.machines);
        self.counts.extend(other.counts);
        self.events.extend(other.events);
        self.keys.extend(other.keys);
    }
}

type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// Where a machine's record keeps one kind of lease.
type Kept<T> = fn(&mut MachineRecord) -> &mut Option<T>;
/// A write closure with its answer. Called with `None` when it cannot run
/// (its transaction or savepoint could not be opened): it then answers its
/// caller with the error the reply is given, instead of leaving the caller
/// to read a dropped channel as "the store is shut down".
pub(super) type Job = Box<dyn FnOnce(Option<&mut WriteCtx<'_>>) -> (bool, Reply) + Send>;

pub(super) fn job<T, F>(f: F, tx: oneshot::Sender<Result<T, StoreError>>) -> Job
where
    T: Send + 'static,
    F: FnOnce(&mut WriteCtx<'_>) -> Result<T, StoreError> + Send + 'static,
{
    Box::new(move |ctx| match ctx.map(f) {
        None => (
            false,
            Box::new(move |why: Result<(), StoreError>| {
                let _ = tx.send(Err(why.err().unwrap_or(StoreError::Closed)));
            }),
        ),
        Some(Ok(v)) => (
            true,
            Box::new(move |commit: Result<(), StoreError>| {
                let _ = tx.send(commit.map(|()| v));
            }),
        ),
        Some(Err(e)) => (
            false,
            Box::new(move |_| {
                let _ = tx.send(Err(e));
            }),
        ),
    })
}

/// The view a write closure gets: the open transaction, plus reads that see
/// the writes of earlier closures in the same batch.
pub struct WriteCtx<'a> {
    conn: &'a Connection,
    batch: &'a Changes,
    mine: Changes,
    shared: &'a Shared,
}

impl WriteCtx<'_> {
    /// The open transaction, for the queries of sibling modules (`quota`).
    pub(super) fn conn(&self) -> &Connection {
        self.conn
    }

    /// The current record of machine `id`, including uncommitted changes of
    /// this batch.
    pub fn machine(&self, id: &str) -> Result<Option<MachineRecord>, StoreError> {
        for layer in [&self.mine, self.batch] {
            if let Some(m) = layer.machines.get(id) {
                return Ok(m.clone());
            }
        }
        // Not changed in this batch: the cache, when it holds the machine,
        // has its last committed version; otherwise the row.
        if let Some(m) = lock(&self.shared.hot).cache.peek(id) {
            return Ok(Some(m.rec.clone()));
        }
        rows::load_machine(self.conn, id)
    }

    /// Inserts a new machine record or updates a known one's state (its
    /// id, tenant, name, spec and creation time never change).
    pub fn put_machine(&mut self, rec: MachineRecord) -> Result<(), StoreError> {
        let existing = self.machine(&rec.id)?;
        match &existing {
            Some(old) => {
                if old.tenant != rec.tenant
                    || old.name != rec.name
                    || old.created_at != rec.created_at
                    || old.spec != rec.spec
                {
                    return Err(StoreError::Rejected(format!(
                        "machine {} cannot change its tenant, name, spec or creation time",
                        rec.id
                    )));
                }
                rows::update_machine(self.conn, &rec)?;
            }
            None => {
                // The unique index catches a taken name too; checking first
                // gives the clear error. The lookup runs on the writer's
                // connection, so it sees earlier closures of this batch and
                // not the ones rolled back.
                if rows::name_owner(self.conn, &rec.tenant, &rec.name)?.is_some() {
                    return Err(StoreError::NameTaken(rec.name.clone()));
                }
                rows::insert_machine(self.conn, &rec)?;
            }
        }
        self.count_move(existing.as_ref(), Some(&rec));
        self.mine.machines.insert(rec.id.clone(), Some(rec));
        Ok(())
    }

    /// Updates machine `rec`'s state and also its spec (`PATCH`: idle
    /// timeout, persistence, metadata). Its sizes must stay as they are:
    /// the tenant's usage is summed from them.
    pub fn put_machine_with_spec(&mut self, rec: MachineRecord) -> Result<(), StoreError> {
        let Some(old) = self.machine(&rec.id)? else {
            return Err(StoreError::NoSuchMachine(rec.id.clone()));
        };
        let sizes = |s: &crate::store::MachineSpec| (s.vcpu_count, s.mem_size_mib, s.disk_bytes);
        if sizes(&old.spec) != sizes(&rec.spec) {
            return Err(StoreError::Rejected(format!(
                "machine {} cannot change its sizes",
                rec.id
            )));
        }
        // The state columns (and counts) as any update, then the spec.
        let mut state = rec.clone();
        state.spec = old.spec;
        self.put_machine(state)?;
        rows::update_machine_spec(self.conn, &rec.id, &rec.spec)?;
        self.mine.machines.insert(rec.id.clone(), Some(rec));
        Ok(())
    }

    fn count_move(&mut self, old: Option<&MachineRecord>, new: Option<&MachineRecord>) {
        let key = |m: &MachineRecord| (m.tenant.clone(), m.status);
        if old.map(key) == new.map(key) {
            return;
        }
        if let Some(o) = old {
            self.mine.counts.push((o.tenant.clone(), o.status, -1));
        }
        if let Some(n) = new {
            self.mine.counts.push((n.tenant.clone(), n.status, 1));
        }
    }

    /// Removes a machine and its history, journal and leases.
    pub fn delete_machine(&mut self, id: &str) -> Result<(), StoreError> {
        let existing = self.machine(id)?;
        for sql in [
            "DELETE FROM machines WHERE id = ?1",
            "DELETE FROM events WHERE machine_id = ?1",
            "DELETE FROM steps WHERE machine_id = ?1",
            "DELETE FROM leases WHERE machine_id = ?1",
        ] {
            self.conn
                .execute(sql, params![id])
                .map_err(|e| StoreError::sql(&format!("deleting machine {id}"), e))?;
        }
        self.count_move(existing.as_ref(), None);
        self.mine.machines.insert(id.to_string(), None);
        Ok(())
    }

    /// The network lease of machine `id`: the one it holds, or a new one
    /// from `pick(taken blocks, cursor)` recorded in this transaction (a
    /// `leases` row per identifier, whose primary key makes a second holder
    /// impossible, plus the machine's `network` column). `Ok(None)` when
    /// `pick` finds no free block.
    pub fn take_lease(
        &mut self,
        id: &str,
        pick: impl FnOnce(&HashSet<u32>, u32) -> Option<NetLease>,
    ) -> Result<Option<NetLease>, StoreError> {
        let kept: Kept<NetLease> = |r| &mut r.network;
        self.take(id, "block", "lease_cursor", kept, pick, |ctx, lease| {
            ctx.record_leases(
                id,
                &[
                    ("block", lease.block.to_string()),
                    ("ipv4", lease.ip.to_string()),
                    ("mac", lease.mac.clone()),
                    ("tap", lease.tap.clone()),
                ],
            )?;
            rows::set_machine_network(ctx.conn, id, Some(lease))?;
            Ok(lease.block + 1)
        })
    }

    /// The unprivileged uid of machine `id` (its jailed VMM's): the one it
    /// holds, or a new one from `pick(taken uids, cursor)` recorded in this
    /// transaction (a `leases` row of kind `uid`, whose primary key makes a
    /// second holder impossible, plus the machine's `jail_uid` column; the
    /// row goes with the machine's record). `Ok(None)` when `pick` finds no
    /// free uid.
    pub fn take_uid(
        &mut self,
        id: &str,
        pick: impl FnOnce(&HashSet<u32>, u32) -> Option<u32>,
    ) -> Result<Option<u32>, StoreError> {
        let kept: Kept<u32> = |r| &mut r.jail_uid;
        self.take(id, "uid", "uid_cursor", kept, pick, |ctx, uid| {
            ctx.record_leases(id, &[("uid", uid.to_string())])?;
            rows::set_machine_uid(ctx.conn, id, *uid)?;
            Ok(uid.saturating_add(1))
        })
    }

    /// What machine `id` keeps in `kept` once leased: the value it holds,
    /// or `pick(numbers of the kind leases held now, the cursor in meta key
    /// cursor_key)`, written by `record` (which returns the next cursor) in
    /// this transaction and onto the record. `Ok(None)` when `pick` finds
    /// nothing free.
    fn take<T: Clone>(
        &mut self,
        id: &str,
        kind: &str,
        cursor_key: &str,
        kept: Kept<T>,
        pick: impl FnOnce(&HashSet<u32>, u32) -> Option<T>,
        record: impl FnOnce(&Self, &T) -> Result<u32, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let mut rec = self.leasing(id)?;
        if let Some(v) = kept(&mut rec) {
            return Ok(Some(v.clone()));
        }
        let Some(v) = pick(&self.leased(kind)?, self.cursor(cursor_key)) else {
            return Ok(None);
        };
        let next = record(self, &v)?;
        self.set_cursor(cursor_key, next)?;
        *kept(&mut rec) = Some(v.clone());
        self.mine.machines.insert(id.to_string(), Some(rec));
        Ok(Some(v))
    }

    /// The record of machine `id`, which is to get a lease.
    fn leasing(&self, id: &str) -> Result<MachineRecord, StoreError> {
        self.machine(id)?
            .ok_or_else(|| StoreError::NoSuchMachine(id.to_string()))
    }

    /// The numeric values of the `kind` leases held now.
    fn leased(&self, kind: &str) -> Result<HashSet<u32>, StoreError> {
        let what = format!("reading the leased {kind} values");
        let mut stmt = self
            .conn
            .prepare_cached("SELECT value FROM leases WHERE kind = ?1")
            .map_err(|e| StoreError::sql(&what, e))?;
        let rows = stmt
            .query_map(params![kind], |r| r.get::<_, String>(0))
            .map_err(|e| StoreError::sql(&what, e))?;
        let mut set = HashSet::new();
        for v in rows {
            let v = v.map_err(|e| StoreError::sql(&what, e))?;
            if let Ok(n) = v.parse::<u32>() {
                set.insert(n);
            }
        }
        Ok(set)
    }

    /// An allocator's cursor (the meta key `key`); 0 before the first lease.
    fn cursor(&self, key: &str) -> u32 {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get::<_, String>(0)
            })
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn set_cursor(&self, key: &str, value: u32) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) \
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value.to_string()],
            )
            .map_err(|e| StoreError::sql(&format!("advancing the allocator cursor {key}"), e))?;
        Ok(())
    }

    /// Records `(kind, value)` lease rows of machine `id`; a value another
    /// machine holds fails on the primary key.
    fn record_leases(&self, id: &str, leases: &[(&str, String)]) -> Result<(), StoreError> {
        let now = crate::util::now_ms();
        for (kind, value) in leases {
            self.conn
                .execute(
                    "INSERT INTO leases (kind, value, machine_id, created_at) VALUES (?1, ?2, ?3, ?4)",
                    params![kind, value, id, now],
                )
                .map_err(|e| {
                    StoreError::sql(&format!("recording the {kind} lease {value} of {id}"), e)
                })?;
        }
        Ok(())
    }

    /// Appends an event; its id is assigned now, it is broadcast after commit.
    pub fn append_event(&mut self, mut ev: EventRecord) -> Result<i64, StoreError> {
        ev.id = rows::insert_event(self.conn, &ev)?;
        let id = ev.id;
        self.mine.events.push(ev);
        Ok(id)
    }

    /// Records a step of the machine run in the journal.
    pub fn journal(
        &mut self,
        machine_id: &str,
        operation_id: Option<&str>,
        step: &str,
        phase: &str,
        duration_ms: Option<f64>,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "INSERT INTO steps (machine_id, operation_id, step, phase, at, duration_ms, detail) \
                 VALUES (?1,?2,?3,?4,?5,?6,?7)",
            )
            .map_err(|e| StoreError::sql("preparing the journal insert", e))?;
        stmt.execute(params![
            machine_id,
            operation_id,
            step,
            phase,
            crate::util::now_ms(),
            duration_ms,
            detail
        ])
        .map_err(|e| StoreError::sql("journaling a step", e))?;
        Ok(())
    }

    pub fn insert_key(&mut self, key: KeyRecord) -> Result<(), StoreError> {
        rows::insert_key(self.conn, &key)?;
        self.mine.keys.push(key);
        Ok(())
    }

    /// Marks a key revoked (idempotent) and returns it.
    pub fn revoke_key(&mut self, id: &str, at: i64) -> Result<KeyRecord, StoreError> {
        let existing = read_lock(&self.shared.keys)
            .values()
            .chain(self.batch.keys.iter())
            .chain(self.mine.keys.iter())
            .filter(|k| k.id == id)
            .last()
            .cloned();
        let mut key = existing.ok_or_else(|| StoreError::NoSuchKey(id.to_string()))?;
        if key.revoked_at.is_none() {
            key.revoked_at = Some(at);
            self.conn
                .execute(
                    "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1",
                    params![id, at],
                )
                .map_err(|e| StoreError::sql("revoking an API key", e))?;
            self.mine.keys.push(key.clone());
        }
        Ok(key)
    }

    pub fn ping(&self) -> Result<(), StoreError> {
        self.conn
            .query_row("SELECT 1", [], |_| Ok(()))
            .map_err(|e| StoreError::sql("answering a health check", e))
    }
}

pub(super) fn spawn(
    conn: Connection,
    rx: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name("hf-store-writer".into())
        .spawn(move || run(conn, rx, shared))
        .map(|_| ())
        .map_err(|e| StoreError::Schema(format!("cannot start the writer thread: {e}")))
}

const MAX_BATCH: usize = 1024;

fn run(mut conn: Connection, mut rx: mpsc::Receiver<Job>, shared: Arc<Shared>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        run_batch(&mut conn, batch, &shared);
    }
    tracing::debug!("store writer stopped");
}

fn run_batch(conn: &mut Connection, batch: Vec<Job>, shared: &Shared) {
    let (t0, jobs) = (std::time::Instant::now(), batch.len());
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let err = StoreError::sql("starting a write transaction", e);
            tracing::error!(error = %err, "store write failed");
            crate::metrics::store_commit(jobs, t0.elapsed(), false);
            for job in batch {
                fail_unrun(job, &err);
            }
            return;
        }
    };
    let mut changes = Changes::default();
    let mut replies: Vec<(bool, Reply)> = Vec::with_capacity(batch.len());
    for job in batch {
        if let Err(e) = tx
            .prepare_cached("SAVEPOINT job")
            .and_then(|mut s| s.execute([]))
        {
            // The job cannot run: it answers with why (a full disk is 507,
            // not "shut down").
            let err = StoreError::sql("opening a savepoint", e);
            let (_, reply) = job(None);
            reply(Err(err));
            continue;
        }
        let mut ctx = WriteCtx {
            conn: &tx,
            batch: &changes,
            mine: Changes::default(),
            shared,
        };
        let (ok, reply) = job(Some(&mut ctx));
        let mine = ctx.mine;
        let end: &[&str] = if ok {
            changes.absorb(mine);
            &["RELEASE job"]
        } else {
            &["ROLLBACK TO job", "RELEASE job"]
        };
        for sql in end {
            if let Err(e) = tx.prepare_cached(sql).and_then(|mut s| s.execute([])) {
                tracing::error!(error = %e, "closing a savepoint failed");
            }
        }
        replies.push((ok, reply));
    }
    let commit = tx
        .commit()
        .map_err(|e| StoreError::sql("committing a write transaction", e));
    crate::metrics::store_commit(jobs, t0.elapsed(), commit.is_ok());
    if let Err(e) = &commit {
        tracing::error!(error = %e, "store commit failed; the batch is lost");
    } else {
        publish(changes, shared);
    }
    for (_, reply) in replies {
        reply(commit.clone());
    }
}

/// A job that never ran still owes its caller an answer: the error.
fn fail_unrun(job: Job, err: &StoreError) {
    let (_, reply) = job(None);
    reply(Err(err.clone()));
}

fn publish(changes: Changes, shared: &Shared) {
    let mut updated: Vec<(String, Option<Arc<CachedMachine>>)> = Vec::new();
    {
        let mut hot = lock(&shared.hot);
        for (id, rec) in changes.machines {
            match rec {
                Some(rec) => {
                    let entry = hot.cache.put(rec);
                    updated.push((id, Some(entry)));
                }
                None => {
                    hot.cache.remove(&id);
                    updated.push((id, None));
                }
            }
        }
        for (tenant, status, delta) in changes.counts {
            hot.counts.add(&tenant, status, delta);
        }
        hot.cache.published();
    }
    {
        let mut watchers = lock(&shared.watchers);
        for (id, entry) in updated {
            let gone = entry.is_none();
            let mut unwatched = gone;
            if let Some(tx) = watchers.get(&id) {
                tx.send_replace(entry);
                // Nobody listens any more (the run ended, no waiter): drop
                // the channel so idle machines cost no memory for it.
                unwatched |= tx.receiver_count() == 0;
            }
            if unwatched {
                watchers.remove(&id);
            }
        }
    }
    if !changes.keys.is_empty() {
        let mut keys = write_lock(&shared.keys);
        for k in changes.keys {
            keys.insert(k.hash.clone(), k);
        }
    }
    for ev in changes.events {
        crate::metrics::event_committed(&ev);
        // No subscribers is fine: nobody is streaming events right now.
        let _ = shared.events.send(Arc::new(ev));
    }
}

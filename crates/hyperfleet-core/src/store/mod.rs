//! The durable store: SQLite (WAL, `synchronous=FULL`) behind one writer
//! thread with group commit, plus a bounded in-memory cache of the machines
//! in use.
//!
//! Why this shape:
//! - *Durability without a per-request fsync bill.* Every write is a closure
//!   sent to the writer thread. The thread takes everything queued, runs each
//!   closure inside its own SAVEPOINT of one transaction, commits once (one
//!   fsync), and only then answers each caller. A `201 Created` is therefore
//!   never sent before its row is on disk, and a burst of creates shares
//!   fsyncs instead of queueing behind them.
//! - *Linearised read-modify-write.* Because closures run one at a time on
//!   the writer, a handler's "check the transition table against the current
//!   record, then record the new desired state" cannot interleave with the
//!   machine run's own status writes.
//! - *Memory bounded by what is in use, not by how many machines exist.*
//!   SQLite holds every machine; memory holds the most recently used records
//!   (with their JSON pre-rendered) and exact per-tenant counts (see
//!   [`cache`]). The writer publishes each committed change to the cache in
//!   commit order and notifies per-machine `watch` channels that the machine
//!   runs and long-pollers wait on; a read that misses the cache is a
//!   primary-key lookup on a pooled read-only connection.

mod cache;
mod images;
mod quota;
mod records;
mod rows;
mod schema;
mod snapshots;
mod writer;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use hyperfleet_api::{MachineStatus, VmmKind};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use cache::{CachedMachine, DEFAULT_CAPACITY as DEFAULT_CACHED_MACHINES};
pub use images::{ImageEventRow, ImageRow};
pub use records::{
    steps, Desired, EventRecord, KeyRecord, MachineRecord, MachineSpec, MainProcess, NetLease,
    VmmIdentity,
};
pub use schema::schema_version;
pub use snapshots::{SnapshotData, SnapshotKind, SnapshotRecord};
pub use writer::WriteCtx;

use cache::{Counts, RecordCache};
use writer::Job;

/// Errors of the store boundary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the database failed while {context}: {message}")]
    Sql { context: String, message: String },
    /// SQLITE_FULL (the VFS reports ENOSPC as this): nothing was stored.
    #[error("the disk holding the database is full; nothing was stored while {context}")]
    Full { context: String },
    #[error("the database schema is unusable: {0}")]
    Schema(String),
    #[error("cannot open the database at {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("a machine named '{0}' already exists")]
    NameTaken(String),
    #[error("a snapshot named '{0}' already exists")]
    SnapshotNameTaken(String),
    #[error("no machine with id {0}")]
    NoSuchMachine(String),
    #[error("no API key with id {0}")]
    NoSuchKey(String),
    /// A rejected write: the closure decided not to change anything.
    #[error("{0}")]
    Rejected(String),
    #[error("the store is shut down")]
    Closed,
}

impl StoreError {
    pub(crate) fn sql(context: &str, e: rusqlite::Error) -> Self {
        if is_disk_full(&e) {
            return StoreError::Full {
                context: context.to_string(),
            };
        }
        StoreError::Sql {
            context: context.to_string(),
            message: e.to_string(),
        }
    }
}

/// SQLite's unix VFS turns ENOSPC from write(2) and fallocate(2) into
/// SQLITE_FULL; an ENOSPC that surfaces as an I/O error (fsync on some
/// filesystems) carries the OS error number in the extended code's message
/// only, so it is recognised by the errno SQLite recorded.
fn is_disk_full(e: &rusqlite::Error) -> bool {
    match e {
        rusqlite::Error::SqliteFailure(f, msg) => {
            f.code == rusqlite::ErrorCode::DiskFull
                || msg
                    .as_deref()
                    .is_some_and(|m| m.contains("No space left on device"))
        }
        _ => false,
    }
}

/// What memory holds of the machines: recently used records and counts.
/// One lock, so a publish moves both at once.
struct Hot {
    cache: RecordCache,
    counts: Counts,
}

struct Shared {
    hot: Mutex<Hot>,
    watchers: Mutex<HashMap<String, watch::Sender<Option<Arc<CachedMachine>>>>>,
    events: broadcast::Sender<Arc<EventRecord>>,
    keys: RwLock<HashMap<String, KeyRecord>>,
    readers: Mutex<Vec<Connection>>,
    path: PathBuf,
    /// When the keys were last looked for in the database (see
    /// [`Store::key_by_hash`]).
    keys_loaded: Mutex<Option<std::time::Instant>>,
    /// Set by a write that failed for a full disk, cleared by one that
    /// succeeded.
    disk_full: AtomicBool,
}

/// How often a key unknown to memory may send the store back to the
/// database.
pub const KEY_RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

/// Idle read-only connections kept for cache misses, lists and history;
/// more are opened under load and closed when the pool is full.
const IDLE_READERS: usize = 4;

/// Store settings the daemon chooses.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// Machine records kept in memory (`--machine-cache`).
    pub cached_machines: NonZeroUsize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cached_machines: cache::DEFAULT_CAPACITY,
        }
    }
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| StoreError::sql("setting the busy timeout", e))?;
    conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;")
        .map_err(|e| StoreError::sql("configuring the connection", e))
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let r = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Open {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    configure(&r)?;
    // Readers do indexed lookups of pages the OS already caches; a small
    // private cache each keeps the daemon's memory flat as the pool grows.
    r.execute_batch("PRAGMA cache_size = -512;")
        .map_err(|e| StoreError::sql("sizing a reader's page cache", e))?;
    Ok(r)
}

impl Store {
    /// Opens (creating if needed) the database at `path`, applies migrations,
    /// loads machines and keys into memory and starts the writer thread.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with(path, StoreOptions::default())
    }

    pub fn open_with(path: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        let open_err = |e: rusqlite::Error| StoreError::Open {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        configure(&conn)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| StoreError::sql("switching to WAL", e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Schema(format!(
                "the database refused WAL mode (it is in '{mode}' mode)"
            )));
        }
        // FULL: a commit is on disk (WAL fsynced) before the writer answers.
        // Checkpoints do not run inside the writer's commits (they copy the
        // WAL into the database and fsync it, stalling every waiting
        // request); a background thread runs them instead.
        conn.execute_batch(
            "PRAGMA synchronous = FULL; PRAGMA wal_autocheckpoint = 0; \
             PRAGMA journal_size_limit = 67108864;",
        )
        .map_err(|e| StoreError::sql("configuring durability", e))?;
        schema::migrate(&mut conn)?;

        let mut counts = Counts::default();
        for (tenant, status, n) in rows::status_counts(&conn)? {
            counts.add(&tenant, status, n);
        }
        let keys = rows::load_keys(&conn)?;
        let mut readers = Vec::with_capacity(IDLE_READERS);
        for _ in 0..IDLE_READERS {
            readers.push(open_reader(path)?);
        }
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            hot: Mutex::new(Hot {
                cache: RecordCache::new(opts.cached_machines),
                counts,
            }),
            watchers: Mutex::new(HashMap::new()),
            events,
            keys: RwLock::new(keys.into_iter().map(|k| (k.hash.clone(), k)).collect()),
            readers: Mutex::new(readers),
            path: path.to_path_buf(),
            keys_loaded: Mutex::new(None),
            disk_full: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel(8192);
        writer::spawn(conn, rx, shared.clone())?;
        spawn_checkpointer(path, Arc::downgrade(&shared))?;
        Ok(Store { jobs: tx, shared })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Runs `f` on the writer thread inside a transaction and returns once
    /// its changes are durable. An `Err` from `f` rolls back only `f`'s own
    /// changes.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut WriteCtx<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let out = self.run_write(f).await;
        match &out {
            Err(StoreError::Full { .. }) => {
                if !self.shared.disk_full.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        "the disk holding the database is full: writes fail until space is freed"
                    );
                }
            }
            Ok(_) => {
                if self.shared.disk_full.swap(false, Ordering::Relaxed) {
                    tracing::info!("the database accepts writes again");
                }
            }
            Err(_) => {}
        }
        out
    }

    async fn run_write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut WriteCtx<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job = writer::job(f, tx);
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Whether the last write failed for a full disk (no write succeeded
    /// since): `/health` reports the store degraded meanwhile.
    pub fn disk_full(&self) -> bool {
        self.shared.disk_full.load(Ordering::Relaxed)
    }

    /// Runs `f` on a pooled read-only connection. Called directly from
    /// async code for cache misses: an indexed read of page-cached SQLite
    /// takes microseconds, less than handing it to a blocking thread.
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = lock(&self.shared.readers).pop();
        let conn = match pooled {
            Some(c) => c,
            None => open_reader(&self.shared.path)?,
        };
        let out = f(&conn);
        let mut pool = lock(&self.shared.readers);
        if pool.len() < IDLE_READERS {
            pool.push(conn);
        }
        out
    }

    /// Caches records a reader loaded (see the freshness rule in [`cache`]).
    fn fill(&self, seen_seq: u64, recs: Vec<MachineRecord>) -> Vec<Arc<CachedMachine>> {
        let mut hot = lock(&self.shared.hot);
        recs.into_iter()
            .map(|r| hot.cache.fill(seen_seq, r))
            .collect()
    }

    /// A machine by id or name, seen as `tenant` (None: any tenant, by id).
    pub fn get(
        &self,
        tenant: Option<&str>,
        id_or_name: &str,
    ) -> Result<Option<Arc<CachedMachine>>, StoreError> {
        let seen = {
            let mut hot = lock(&self.shared.hot);
            if let Some(m) = hot.cache.find(tenant, id_or_name) {
                return Ok(Some(m));
            }
            hot.cache.seq()
        };
        let rec = self.read(|c| {
            if let Some(m) = rows::load_machine(c, id_or_name)? {
                if tenant.is_none_or(|t| t == m.tenant) {
                    return Ok(Some(m));
                }
            }
            match tenant {
                Some(t) => rows::load_machine_named(c, t, id_or_name),
                None => Ok(None),
            }
        })?;
        Ok(self.fill(seen, rec.into_iter().collect()).pop())
    }

    /// The machines named `name` in any tenant (names are unique only per
    /// tenant). For the proxy, which may see a name without a tenant.
    pub fn find_by_name_in_all_tenants(
        &self,
        name: &str,
    ) -> Result<Vec<Arc<CachedMachine>>, StoreError> {
        let seen = lock(&self.shared.hot).cache.seq();
        let recs = self.read(|c| rows::load_machines_named_in_all_tenants(c, name))?;
        Ok(self.fill(seen, recs))
    }

    pub fn get_by_id(&self, id: &str) -> Result<Option<Arc<CachedMachine>>, StoreError> {
        self.get(None, id)
    }

    /// Machines of `tenant` in creation order, filtered, with the total count.
    pub fn list(
        &self,
        tenant: &str,
        status: Option<MachineStatus>,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<Arc<CachedMachine>>, usize), StoreError> {
        let total = lock(&self.shared.hot).counts.tenant(tenant, status);
        let ids = self.read(|c| rows::list_ids(c, tenant, status, limit, offset))?;
        let (mut page, seen) = {
            let mut hot = lock(&self.shared.hot);
            let page: Vec<_> = ids.iter().map(|id| hot.cache.get(id)).collect();
            (page, hot.cache.seq())
        };
        let missing: Vec<usize> = (0..page.len()).filter(|&i| page[i].is_none()).collect();
        if !missing.is_empty() {
            let recs = self.read(|c| {
                missing
                    .iter()
                    .map(|&i| rows::load_machine(c, &ids[i]))
                    .collect::<Result<Vec<_>, _>>()
            })?;
            let mut hot = lock(&self.shared.hot);
            for (&i, rec) in missing.iter().zip(recs) {
                // None: deleted since the page was read; left out.
                page[i] = rec.map(|r| hot.cache.fill(seen, r));
            }
        }
        Ok((page.into_iter().flatten().collect(), total))
    }

    /// Hands every machine of every tenant to `f`, one at a time, straight
    /// from SQLite (startup recovery): memory holds one record, not all.
    pub fn for_each_machine(&self, f: impl FnMut(MachineRecord)) -> Result<(), StoreError> {
        self.read(|c| rows::for_each_machine(c, rows::MachineFilter::All, f))
    }

    /// Whether machine `id` exists (`None`: no such machine) and the VMM it
    /// records; a point read that leaves the cache alone (the orphan sweep).
    pub fn machine_vmm(&self, id: &str) -> Result<Option<Option<VmmIdentity>>, StoreError> {
        self.read(|c| rows::machine_vmm(c, id))
    }

    /// The machines holding a network lease (firewall rules, TAP sweep).
    pub fn leased_machines(&self) -> Result<Vec<MachineRecord>, StoreError> {
        self.read(|c| rows::load_machines(c, rows::MachineFilter::Leased))
    }

    /// The machines with a VMM recorded (shutdown report).
    pub fn machines_with_vmm(&self) -> Result<Vec<MachineRecord>, StoreError> {
        self.read(|c| rows::load_machines(c, rows::MachineFilter::WithVmm))
    }

    /// Up to `limit` of the oldest machines waiting only for create-time
    /// preparation (see `lifecycle::run::background_only`).
    pub fn unprepared_ids(&self, limit: usize) -> Result<Vec<String>, StoreError> {
        self.read(|c| rows::unprepared_ids(c, limit))
    }

    /// Machines per observed status, over every tenant (from the counts
    /// memory keeps; no query).
    pub fn status_counts(&self) -> Vec<(MachineStatus, usize)> {
        lock(&self.shared.hot).counts.by_status()
    }

    /// Machines with a VMM recorded, per backend (one indexed query).
    pub fn vmm_counts(&self) -> Result<Vec<(VmmKind, usize)>, StoreError> {
        self.read(rows::vmm_counts)
    }

    pub fn machine_count(&self) -> usize {
        lock(&self.shared.hot).counts.all()
    }

    /// How many machine records memory holds now.
    pub fn cached_machines(&self) -> usize {
        lock(&self.shared.hot).cache.len()
    }

    /// A channel that sees every committed change of machine `id`
    /// (`None` once deleted). `None` when the machine does not exist.
    pub fn subscribe(
        &self,
        id: &str,
    ) -> Result<Option<watch::Receiver<Option<Arc<CachedMachine>>>>, StoreError> {
        // Lock order matters: the writer commits and updates the cache
        // *before* taking the watchers lock, so reading the machine while
        // holding that lock means a concurrent commit either is already
        // visible here or will find this channel and send to it.
        let mut watchers = lock(&self.shared.watchers);
        let current = self.get_by_id(id)?;
        let Some(current) = current else {
            return Ok(None);
        };
        let tx = watchers
            .entry(id.to_string())
            .or_insert_with(|| watch::channel(Some(current)).0);
        Ok(Some(tx.subscribe()))
    }

    /// Drops machine `id`'s change channel if nobody holds a receiver (its
    /// run ended and no request waits), so idle machines cost no channel;
    /// the next `subscribe` makes a new one from the current record.
    pub fn forget_idle_watcher(&self, id: &str) {
        let mut watchers = lock(&self.shared.watchers);
        if watchers.get(id).is_some_and(|tx| tx.receiver_count() == 0) {
            watchers.remove(id);
        }
    }

    /// Every event committed from now on.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<EventRecord>> {
        self.shared.events.subscribe()
    }

    /// A machine's history in order, after event id `after`.
    pub async fn events(
        &self,
        machine_id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let id = machine_id.to_string();
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.read(|c| rows::load_events(c, &id, after, limit)))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// The history of every machine `tenant` holds, in order, after event
    /// id `after` (the tenant-wide `GET /events`).
    pub async fn tenant_events(
        &self,
        tenant: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let tenant = tenant.to_string();
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            store.read(|c| rows::load_tenant_events(c, &tenant, after, limit))
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// The ids of every machine `tenant` holds (to tell its live events
    /// from other tenants').
    pub async fn machine_ids(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        let tenant = tenant.to_string();
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            store.read(|c| rows::list_ids(c, &tenant, None, usize::MAX, 0))
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// The steps journaled for a machine, oldest first (for tests and `doctor`).
    pub async fn journal(&self, machine_id: &str) -> Result<Vec<(String, String)>, StoreError> {
        let id = machine_id.to_string();
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.read(|c| rows::load_journal(c, &id)))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// The key with this hash. Keys written into the database by another
    /// process (`hyperfleet keys create --admin --data-dir`, the local
    /// recovery) are found too: a miss looks at the database again, at most
    /// once per [`KEY_RELOAD_EVERY`] so a stream of unknown keys costs no
    /// more than that.
    pub fn key_by_hash(&self, hash: &str) -> Option<KeyRecord> {
        if let Some(k) = read_lock(&self.shared.keys).get(hash) {
            return Some(k.clone());
        }
        self.load_new_keys();
        read_lock(&self.shared.keys).get(hash).cloned()
    }

    /// Adds the keys the database has and memory does not. Known keys are
    /// left alone: memory is never older than the database for them (the
    /// writer publishes each commit), and a read racing a revocation's
    /// publish must not bring the unrevoked row back.
    fn load_new_keys(&self) {
        {
            let mut last = lock(&self.shared.keys_loaded);
            if last.is_some_and(|t| t.elapsed() < KEY_RELOAD_EVERY) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        match self.read(rows::load_keys) {
            Ok(keys) => {
                let mut known = write_lock(&self.shared.keys);
                for k in keys {
                    if !known.contains_key(&k.hash) {
                        tracing::info!(id = %k.id, name = %k.name, "found an API key added to the database by another process");
                        known.insert(k.hash.clone(), k);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look for new API keys in the database"),
        }
    }

    pub fn keys(&self) -> Vec<KeyRecord> {
        let mut v: Vec<KeyRecord> = read_lock(&self.shared.keys).values().cloned().collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v
    }

    pub fn key_count(&self) -> usize {
        read_lock(&self.shared.keys).len()
    }

    /// A cheap query that proves the database answers (for `/health`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        // Not `write`: a read-only query succeeding says nothing about
        // whether the disk has room again.
        self.run_write(|ctx| ctx.ping()).await
    }
}

/// Runs WAL checkpoints on its own connection every 250 ms. RESTART (not
/// PASSIVE): once the WAL is fully copied back, the next commit writes from
/// the start of the WAL file again instead of extending it, so each commit's
/// fdatasync has no size change to push through the filesystem journal
/// (measured: durable creates 2.7k/s → 3.3k/s on this disk). It waits for
/// readers briefly and never runs inside a request's commit. Ends when the
/// store is dropped.
fn spawn_checkpointer(path: &Path, shared: std::sync::Weak<Shared>) -> Result<(), StoreError> {
    let conn = Connection::open(path).map_err(|e| StoreError::Open {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    configure(&conn)?;
    std::thread::Builder::new()
        .name("hf-store-checkpoint".into())
        .spawn(move || {
            while shared.upgrade().is_some() {
                std::thread::sleep(std::time::Duration::from_millis(250));
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
                }
            }
        })
        .map(drop)
        .map_err(|e| StoreError::Schema(format!("cannot start the checkpoint thread: {e}")))
}

/// Poisoning means a thread panicked while holding the lock; the data it
/// guards (an index rebuilt from committed rows) is still the best we have.
pub(crate) fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn lock<T>(l: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod error_tests {
    use super::*;

    fn failure(code: i32, msg: Option<&str>) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), msg.map(str::to_string))
    }

    #[test]
    fn a_full_disk_is_told_apart_from_other_database_failures() {
        let full = StoreError::sql("committing", failure(rusqlite::ffi::SQLITE_FULL, None));
        assert!(matches!(full, StoreError::Full { ref context } if context == "committing"));
        let enospc = StoreError::sql(
            "committing",
            failure(
                rusqlite::ffi::SQLITE_IOERR_FSYNC,
                Some("disk I/O error: No space left on device"),
            ),
        );
        assert!(matches!(enospc, StoreError::Full { .. }));
        for other in [
            failure(rusqlite::ffi::SQLITE_IOERR, None),
            failure(rusqlite::ffi::SQLITE_CORRUPT, None),
            failure(
                rusqlite::ffi::SQLITE_CONSTRAINT,
                Some("UNIQUE constraint failed"),
            ),
        ] {
            assert!(matches!(
                StoreError::sql("x", other),
                StoreError::Sql { .. }
            ));
        }
        assert!(matches!(
            StoreError::sql("x", rusqlite::Error::QueryReturnedNoRows),
            StoreError::Sql { .. }
        ));
    }
}

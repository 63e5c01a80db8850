//! The bounded in-memory side of the store: the most recently used machine
//! records (each with its API JSON rendered once), a name map for exactly
//! those records, and per-tenant counts by status.
//!
//! SQLite is the only complete copy of the machines. Memory holds what is
//! hot — machines being read, machines whose runs are working, machines
//! just written — so a daemon with a million stopped machines costs no more
//! memory than one with a thousand. Misses are read from SQLite (a primary
//! key lookup in page-cached pages) and cached.
//!
//! Freshness rule: the writer publishes every committed change here (in
//! commit order), and a reader caches what it read from SQLite only if no
//! publish happened since it looked (`seq`). A commit always precedes its
//! publish, so a read that started after a publish sees at least that
//! version, and a read that raced a publish is returned but not cached: the
//! cache never holds a version older than the last one published.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use hashlink::LruCache;
use hyperfleet_api::MachineStatus;

use super::MachineRecord;
use crate::urls::UrlTemplate;

/// A committed machine record. Its API JSON is rendered on the first read
/// and then shared, so reads are a clone of `Bytes` and the writer thread
/// never spends time rendering states nobody looks at.
#[derive(Debug)]
pub struct CachedMachine {
    pub rec: MachineRecord,
    json: OnceLock<Bytes>,
}

impl CachedMachine {
    pub fn new(rec: MachineRecord) -> Arc<Self> {
        Arc::new(CachedMachine {
            rec,
            json: OnceLock::new(),
        })
    }

    /// The machine's API JSON, with proxy URLs made from `urls` (None: the
    /// proxy is off). The template is fixed for the daemon's lifetime, so
    /// the rendering is cached.
    pub fn json(&self, urls: Option<&UrlTemplate>) -> &Bytes {
        self.json.get_or_init(|| {
            // Serialising a struct of strings, numbers and maps cannot fail.
            Bytes::from(
                serde_json::to_vec(&self.rec.to_api_with(urls)).expect("machine JSON serialises"),
            )
        })
    }
}

/// How many machine records stay in memory by default (about 1.3 KB each
/// with their JSON rendered: ~5 MB).
pub const DEFAULT_CAPACITY: NonZeroUsize = NonZeroUsize::new(4096).expect("4096 is not zero");

pub(super) struct RecordCache {
    entries: LruCache<String, Arc<CachedMachine>>,
    /// (tenant, name) → id, for the cached entries only.
    names: HashMap<(String, String), String>,
    /// Bumped by every publish; see the module docs.
    seq: u64,
}

impl RecordCache {
    pub(super) fn new(capacity: NonZeroUsize) -> Self {
        RecordCache {
            entries: LruCache::new(capacity.get()),
            names: HashMap::new(),
            seq: 0,
        }
    }

    pub(super) fn seq(&self) -> u64 {
        self.seq
    }

    /// A cached machine by id, marked as recently used.
    pub(super) fn get(&mut self, id: &str) -> Option<Arc<CachedMachine>> {
        self.entries.get(id).cloned()
    }

    /// A cached machine by id without touching its recency (the writer's
    /// reads, which should not keep a machine hot).
    pub(super) fn peek(&self, id: &str) -> Option<&Arc<CachedMachine>> {
        self.entries.peek(id)
    }

    /// A cached machine of `tenant` by id or name.
    pub(super) fn find(
        &mut self,
        tenant: Option<&str>,
        id_or_name: &str,
    ) -> Option<Arc<CachedMachine>> {
        if let Some(m) = self.get(id_or_name) {
            if tenant.is_none_or(|t| t == m.rec.tenant) {
                return Some(m);
            }
        }
        let id = self
            .names
            .get(&(tenant?.to_string(), id_or_name.to_string()))?
            .clone();
        self.get(&id)
    }

    /// Caches what a reader loaded from SQLite when no publish happened
    /// since it took `seq` (see the module docs). Returns the entry to use.
    pub(super) fn fill(&mut self, seen_seq: u64, rec: MachineRecord) -> Arc<CachedMachine> {
        if seen_seq != self.seq {
            return CachedMachine::new(rec);
        }
        if let Some(m) = self.get(&rec.id) {
            // Another reader cached it meanwhile; same version or newer.
            return m;
        }
        self.insert(CachedMachine::new(rec))
    }

    /// Publishes a committed version of a machine.
    pub(super) fn put(&mut self, rec: MachineRecord) -> Arc<CachedMachine> {
        self.remove(&rec.id);
        self.insert(CachedMachine::new(rec))
    }

    /// Publishes a machine's deletion.
    pub(super) fn remove(&mut self, id: &str) {
        if let Some(old) = self.entries.remove(id) {
            self.forget_name(&old);
        }
    }

    /// Marks the end of a publish: readers that started before it must not
    /// cache what they read.
    pub(super) fn published(&mut self) {
        self.seq += 1;
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    fn insert(&mut self, entry: Arc<CachedMachine>) -> Arc<CachedMachine> {
        let rec = &entry.rec;
        self.names
            .insert((rec.tenant.clone(), rec.name.clone()), rec.id.clone());
        if self.entries.len() >= self.entries.capacity() {
            if let Some((_, evicted)) = self.entries.remove_lru() {
                self.forget_name(&evicted);
            }
        }
        self.entries.insert(rec.id.clone(), entry.clone());
        entry
    }

    fn forget_name(&mut self, old: &CachedMachine) {
        let key = (old.rec.tenant.clone(), old.rec.name.clone());
        if self.names.get(&key) == Some(&old.rec.id) {
            self.names.remove(&key);
        }
    }
}

/// Machines per tenant and status, kept exact by the writer (loaded once at
/// open, then moved by the deltas each commit publishes), so a list's
/// `total` costs no count query.
#[derive(Default)]
pub(super) struct Counts {
    by_tenant: HashMap<String, HashMap<MachineStatus, usize>>,
}

impl Counts {
    pub(super) fn add(&mut self, tenant: &str, status: MachineStatus, delta: i64) {
        let per = self.by_tenant.entry(tenant.to_string()).or_default();
        let n = per.entry(status).or_default();
        *n = (*n as i64 + delta).max(0) as usize;
        if *n == 0 {
            per.remove(&status);
            if per.is_empty() {
                self.by_tenant.remove(tenant);
            }
        }
    }

    pub(super) fn tenant(&self, tenant: &str, status: Option<MachineStatus>) -> usize {
        let Some(per) = self.by_tenant.get(tenant) else {
            return 0;
        };
        match status {
            Some(s) => per.get(&s).copied().unwrap_or(0),
            None => per.values().sum(),
        }
    }

    pub(super) fn by_status(&self) -> Vec<(MachineStatus, usize)> {
        let mut out: Vec<(MachineStatus, usize)> = Vec::new();
        for (status, n) in self.by_tenant.values().flat_map(|p| p.iter()) {
            match out.iter_mut().find(|(s, _)| s == status) {
                Some((_, total)) => *total += n,
                None => out.push((*status, *n)),
            }
        }
        out
    }

    pub(super) fn all(&self) -> usize {
        self.by_tenant.values().flat_map(|p| p.values()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperfleet_api::VmmKind;

    fn rec(id: &str, tenant: &str, name: &str) -> MachineRecord {
        let (_, spec) = crate::validate::validate_create(Default::default(), VmmKind::Stub)
            .expect("an empty create request is valid");
        MachineRecord::new(id.into(), tenant, name.into(), spec, 1)
    }

    fn cache(n: usize) -> RecordCache {
        RecordCache::new(NonZeroUsize::new(n).unwrap())
    }

    #[test]
    fn the_least_recently_used_record_and_its_name_are_evicted() {
        let mut c = cache(2);
        c.put(rec("m1", "t", "a"));
        c.put(rec("m2", "t", "b"));
        assert!(c.get("m1").is_some()); // m2 is now the coldest
        c.put(rec("m3", "t", "c"));
        assert!(c.get("m2").is_none());
        assert!(c.find(Some("t"), "b").is_none());
        assert_eq!(c.find(Some("t"), "a").unwrap().rec.id, "m1");
        assert_eq!(c.find(Some("t"), "c").unwrap().rec.id, "m3");
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn names_and_ids_are_seen_only_by_their_tenant() {
        let mut c = cache(8);
        c.put(rec("m1", "t1", "web"));
        assert!(c.find(Some("t2"), "web").is_none());
        assert!(c.find(Some("t2"), "m1").is_none());
        assert!(c.find(None, "m1").is_some());
        assert!(c.find(Some("t1"), "web").is_some());
    }

    #[test]
    fn a_read_that_raced_a_publish_is_returned_but_not_cached() {
        let mut c = cache(8);
        let seen = c.seq();
        let mut newer = rec("m1", "t", "a");
        newer.generation = 2;
        c.put(newer);
        c.published();
        // The reader loaded generation 1 before the publish.
        let got = c.fill(seen, rec("m1", "t", "a"));
        assert_eq!(got.rec.generation, 1);
        assert_eq!(c.get("m1").unwrap().rec.generation, 2);
        c.remove("m1");
        c.published();
        let stale = c.fill(seen, rec("m1", "t", "a"));
        assert_eq!(stale.rec.id, "m1");
        assert!(c.get("m1").is_none(), "a deleted machine came back");
        // A read that saw no publish is cached.
        let now = c.seq();
        c.fill(now, rec("m2", "t", "b"));
        assert!(c.get("m2").is_some());
    }

    #[test]
    fn a_rename_keeps_only_the_new_name() {
        let mut c = cache(8);
        c.put(rec("m1", "t", "old"));
        c.put(rec("m1", "t", "new"));
        assert!(c.find(Some("t"), "old").is_none());
        assert_eq!(c.find(Some("t"), "new").unwrap().rec.id, "m1");
    }

    #[test]
    fn counts_follow_deltas_per_tenant_and_status() {
        let mut n = Counts::default();
        n.add("t", MachineStatus::Pending, 2);
        n.add("t", MachineStatus::Pending, -1);
        n.add("t", MachineStatus::Running, 1);
        n.add("u", MachineStatus::Stopped, 1);
        assert_eq!(n.tenant("t", None), 2);
        assert_eq!(n.tenant("t", Some(MachineStatus::Running)), 1);
        assert_eq!(n.tenant("x", None), 0);
        assert_eq!(n.all(), 3);
        n.add("u", MachineStatus::Stopped, -1);
        assert_eq!(n.tenant("u", None), 0);
    }
}

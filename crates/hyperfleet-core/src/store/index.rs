//! The in-memory index of machines, updated by the writer in commit order.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use hyperfleet_api::MachineStatus;

use super::MachineRecord;
use crate::proxy::urls::UrlTemplate;

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

#[derive(Default)]
pub struct MachineIndex {
    by_id: HashMap<String, Arc<CachedMachine>>,
    by_name: HashMap<(String, String), String>,
    by_tenant: HashMap<String, BTreeMap<(i64, String), Arc<CachedMachine>>>,
}

impl MachineIndex {
    pub fn put(&mut self, rec: MachineRecord) -> Arc<CachedMachine> {
        // The common case, a status change: identity and ordering keys are
        // unchanged, so swap the entry in place without re-making the keys.
        if let Some(old) = self.by_id.get(&rec.id) {
            let same_keys = old.rec.tenant == rec.tenant
                && old.rec.name == rec.name
                && old.rec.created_at == rec.created_at;
            if same_keys {
                let entry = CachedMachine::new(rec);
                let rec = &entry.rec;
                if let Some(slot) = self
                    .by_tenant
                    .get_mut(&rec.tenant)
                    .and_then(|t| t.get_mut(&(rec.created_at, rec.id.clone())))
                {
                    *slot = entry.clone();
                }
                if let Some(slot) = self.by_id.get_mut(&rec.id) {
                    *slot = entry.clone();
                }
                return entry;
            }
        }
        self.remove(&rec.id);
        let entry = CachedMachine::new(rec);
        let rec = &entry.rec;
        self.by_name
            .insert((rec.tenant.clone(), rec.name.clone()), rec.id.clone());
        self.by_tenant
            .entry(rec.tenant.clone())
            .or_default()
            .insert((rec.created_at, rec.id.clone()), entry.clone());
        self.by_id.insert(rec.id.clone(), entry.clone());
        entry
    }

    pub fn remove(&mut self, id: &str) {
        if let Some(old) = self.by_id.remove(id) {
            let rec = &old.rec;
            self.by_name.remove(&(rec.tenant.clone(), rec.name.clone()));
            if let Some(t) = self.by_tenant.get_mut(&rec.tenant) {
                t.remove(&(rec.created_at, rec.id.clone()));
                if t.is_empty() {
                    self.by_tenant.remove(&rec.tenant);
                }
            }
        }
    }

    pub fn by_id(&self, id: &str) -> Option<Arc<CachedMachine>> {
        self.by_id.get(id).cloned()
    }

    pub fn find(&self, tenant: Option<&str>, id_or_name: &str) -> Option<Arc<CachedMachine>> {
        if let Some(m) = self.by_id.get(id_or_name) {
            if tenant.is_none_or(|t| t == m.rec.tenant) {
                return Some(m.clone());
            }
        }
        let tenant = tenant?;
        let id = self
            .by_name
            .get(&(tenant.to_string(), id_or_name.to_string()))?;
        self.by_id.get(id).cloned()
    }

    /// Every tenant's machine named `name`. One lookup per tenant (tenants
    /// are few), so the index needs no second map for this rare question.
    pub fn find_name_in_all_tenants(&self, name: &str) -> Vec<Arc<CachedMachine>> {
        self.by_tenant
            .keys()
            .filter_map(|t| self.find(Some(t), name))
            .filter(|m| m.rec.name == name)
            .collect()
    }

    pub fn name_taken(&self, tenant: &str, name: &str) -> Option<String> {
        self.by_name
            .get(&(tenant.to_string(), name.to_string()))
            .cloned()
    }

    pub fn list(
        &self,
        tenant: &str,
        status: Option<MachineStatus>,
        limit: usize,
        offset: usize,
    ) -> (Vec<Arc<CachedMachine>>, usize) {
        let Some(all) = self.by_tenant.get(tenant) else {
            return (Vec::new(), 0);
        };
        match status {
            None => (
                all.values().skip(offset).take(limit).cloned().collect(),
                all.len(),
            ),
            Some(s) => {
                let mut total = 0;
                let mut out = Vec::new();
                for m in all.values().filter(|m| m.rec.status == s) {
                    if total >= offset && out.len() < limit {
                        out.push(m.clone());
                    }
                    total += 1;
                }
                (out, total)
            }
        }
    }

    pub fn all(&self) -> Vec<Arc<CachedMachine>> {
        self.by_id.values().cloned().collect()
    }

    pub fn ids(&self) -> Vec<String> {
        self.by_id.keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }
}

//! When each machine last served traffic through the proxy, in memory.
//! Idle auto-suspend reads it; after a daemon restart every machine starts
//! with no activity recorded, which reads as "idle since the restart".

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use crate::store::{read_lock, write_lock};
use crate::util::now_ms;

/// Last proxied activity per machine id (milliseconds since the epoch).
/// Cheap to clone; every clone sees the same table.
#[derive(Clone, Default)]
pub struct Activity {
    // A read lock and an atomic store per request: requests to machines
    // already in the table never wait on each other.
    last: Arc<RwLock<HashMap<String, AtomicI64>>>,
}

impl Activity {
    /// Records activity of machine `id` now.
    pub(crate) fn touch(&self, id: &str) {
        let now = now_ms();
        if let Some(t) = read_lock(&self.last).get(id) {
            t.fetch_max(now, Ordering::Relaxed);
            return;
        }
        write_lock(&self.last)
            .entry(id.to_string())
            .or_insert_with(|| AtomicI64::new(0))
            .fetch_max(now, Ordering::Relaxed);
    }

    /// When machine `id` last served a proxied request or upgraded
    /// connection; None when it has not since the daemon started.
    pub fn last(&self, id: &str) -> Option<i64> {
        read_lock(&self.last)
            .get(id)
            .map(|t| t.load(Ordering::Relaxed))
    }

    /// Forgets machines for which `exists` is false (deleted ones).
    pub(crate) fn retain(&self, exists: impl Fn(&str) -> bool) {
        write_lock(&self.last).retain(|id, _| exists(id));
    }

    pub fn len(&self) -> usize {
        read_lock(&self.last).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touch_records_now_and_retain_forgets() {
        let a = Activity::default();
        assert_eq!(a.last("m1"), None);
        let before = now_ms();
        a.touch("m1");
        a.touch("m2");
        let t1 = a.last("m1").unwrap();
        assert!(t1 >= before && t1 <= now_ms());
        std::thread::sleep(std::time::Duration::from_millis(3));
        a.clone().touch("m1");
        assert!(a.last("m1").unwrap() > t1, "a clone updates the same table");
        a.retain(|id| id == "m2");
        assert_eq!((a.last("m1"), a.len()), (None, 1));
        assert!(a.last("m2").is_some());
    }
}

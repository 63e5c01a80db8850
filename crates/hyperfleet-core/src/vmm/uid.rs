//! Per-machine unprivileged uids: the range a backend runs each machine's
//! VMM as one uid of (gid = uid) — the Firecracker jailer's, and QEMU's
//! with `--qemu-run-as machine-uid`, which share it, so a machine holds one
//! uid whichever backend runs it — its validation against the host's
//! accounts, and the allocator's choice.
//!
//! A machine's uid is leased like its network: picked inside the store
//! transaction that records it (a `leases` row of kind `uid`, whose primary
//! key makes a second holder impossible, plus the machine's `jail_uid`
//! column), before anything on the host is made for it, and kept for the
//! machine's life — across stop, start, suspend and restore, so the files it
//! owns in its jail and snapshot stay its own — until the machine's record
//! is deleted. Released uids are reused last: the allocator continues after
//! the last one it handed out, like the network lease's cursor.

use std::collections::HashSet;
use std::fmt;

/// The default first uid: above every range Debian hands out (system ids
/// end at 999, regular users at 59999, systemd's dynamic users at 65519,
/// `nobody` is 65534, and `useradd` gives subordinate ids from 100000 in
/// blocks of 65536, so 900000 is reached only by the 13th user with
/// subordinate ids; [`UidRange::check`] refuses such an overlap at start).
pub const DEFAULT_BASE: u32 = 900_000;
/// The default number of uids: one per machine that can hold one.
pub const DEFAULT_COUNT: u32 = 65_536;

/// A range of unprivileged uids (and the gids of the same numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub base: u32,
    pub count: u32,
}

impl Default for UidRange {
    fn default() -> Self {
        UidRange {
            base: DEFAULT_BASE,
            count: DEFAULT_COUNT,
        }
    }
}

impl fmt::Display for UidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}–{}", self.base, self.last())
    }
}

/// Errors of taking a machine's uid.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UidError {
    #[error(
        "no uid of the jail's range {0} is free for another machine's VMM (each machine holds one \
         until it is deleted); delete machines or configure a larger --jailer-uid-count"
    )]
    Exhausted(UidRange),
    #[error("recording the machine's uid failed: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl UidRange {
    /// A range of `count` uids from `base`: not empty, without uid 0 and
    /// without `(uid_t)-1` (which means "unchanged" to chown and setuid).
    pub fn new(base: u32, count: u32) -> Result<UidRange, String> {
        if base == 0 {
            return Err(
                "--jailer-uid-base must be an unprivileged uid, not 0 (root); the default is 900000"
                    .into(),
            );
        }
        if count == 0 {
            return Err("--jailer-uid-count must be at least 1".into());
        }
        if u64::from(base) + u64::from(count) > u64::from(u32::MAX) {
            return Err(format!(
                "--jailer-uid-base {base} with --jailer-uid-count {count} runs past the largest \
                 uid, {} (4294967295 means \"no uid\" to the kernel)",
                u32::MAX - 1
            ));
        }
        Ok(UidRange { base, count })
    }

    /// The last uid of the range.
    pub fn last(&self) -> u32 {
        self.base + (self.count - 1)
    }

    pub(crate) fn contains(&self, uid: u32) -> bool {
        uid >= self.base && uid - self.base < self.count
    }

    /// Refuses a range that overlaps an id the host already uses for
    /// something else: an account in `passwd`, a group in `group` (the
    /// texts of /etc/passwd and /etc/group), or a subordinate range in
    /// `subuid`/`subgid` (/etc/subuid, /etc/subgid: ids user namespaces map
    /// to). A jailed VMM running as such an id could touch that account's
    /// files or processes.
    pub(crate) fn check(
        &self,
        passwd: &str,
        group: &str,
        subuid: &str,
        subgid: &str,
    ) -> Result<(), String> {
        let owned = |text: &str, what: &str| -> Result<(), String> {
            for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
                let f: Vec<&str> = line.split(':').collect();
                if let Some(id) = f.get(2).and_then(|v| v.trim().parse::<u32>().ok()) {
                    if self.contains(id) {
                        return Err(format!(
                            "the jail's uid range {self} contains {id}, the {what} {}; pick a \
                             range no account uses with --jailer-uid-base/--jailer-uid-count",
                            f[0]
                        ));
                    }
                }
            }
            Ok(())
        };
        let subordinate = |text: &str, file: &str| -> Result<(), String> {
            for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
                let f: Vec<&str> = line.split(':').collect();
                let (Some(start), Some(n)) = (
                    f.get(1).and_then(|v| v.trim().parse::<u64>().ok()),
                    f.get(2).and_then(|v| v.trim().parse::<u64>().ok()),
                ) else {
                    continue;
                };
                let (base, end) = (
                    u64::from(self.base),
                    u64::from(self.base) + u64::from(self.count),
                );
                if n > 0 && start < end && base < start + n {
                    return Err(format!(
                        "the jail's uid range {self} overlaps the subordinate ids {start}–{} of {} \
                         in {file}; pick a range outside them with \
                         --jailer-uid-base/--jailer-uid-count",
                        start + n - 1,
                        f[0]
                    ));
                }
            }
            Ok(())
        };
        owned(passwd, "uid of the account")?;
        owned(group, "gid of the group")?;
        subordinate(subuid, "/etc/subuid")?;
        subordinate(subgid, "/etc/subgid")
    }

    /// [`check`](Self::check) against this host's files (a missing file
    /// names nothing).
    pub fn check_host(&self) -> Result<(), String> {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        self.check(
            &read("/etc/passwd"),
            &read("/etc/group"),
            &read("/etc/subuid"),
            &read("/etc/subgid"),
        )
    }

    /// The uid a machine gets: the first free one at or after `cursor`
    /// (the uid after the last one handed out), wrapping around, so that a
    /// released uid is reused only after every other one was handed out.
    /// `taken` holds the uids machines hold (some may lie outside the range
    /// when it was changed; they are kept by their machines). `None` when
    /// every uid of the range is taken.
    pub(crate) fn pick(&self, taken: &HashSet<u32>, cursor: u32) -> Option<u32> {
        let offsets: HashSet<u32> = taken
            .iter()
            .filter(|u| self.contains(**u))
            .map(|u| u - self.base)
            .collect();
        let start = if self.contains(cursor) {
            cursor - self.base
        } else {
            0
        };
        crate::net::lease::pick_block(&offsets, start, self.count).map(|o| self.base + o)
    }
}

/// Takes (or returns the one it holds) machine `id`'s uid from `range`,
/// committed before anything on the host is made for it.
pub(crate) async fn lease(
    store: &crate::store::Store,
    id: &str,
    range: UidRange,
) -> Result<u32, UidError> {
    let id = id.to_string();
    let uid = store
        .write(move |ctx| ctx.take_uid(&id, |taken, cursor| range.pick(taken, cursor)))
        .await?;
    uid.ok_or(UidError::Exhausted(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_refuse_root_emptiness_and_the_top_uid() {
        let r = UidRange::new(900_000, 65_536).unwrap();
        assert_eq!(r, UidRange::default());
        assert_eq!(r.last(), 965_535);
        assert_eq!(r.to_string(), "900000–965535");
        assert!(r.contains(900_000) && r.contains(965_535));
        assert!(!r.contains(899_999) && !r.contains(965_536));
        assert!(UidRange::new(0, 10).unwrap_err().contains("not 0"));
        assert!(UidRange::new(5, 0).unwrap_err().contains("at least 1"));
        let top = UidRange::new(u32::MAX - 10, 11).unwrap_err();
        assert!(top.contains("runs past the largest uid"), "{top}");
        // The last usable uid is u32::MAX - 1.
        assert_eq!(
            UidRange::new(u32::MAX - 10, 10).unwrap().last(),
            u32::MAX - 1
        );
    }

    #[test]
    fn ranges_overlapping_accounts_groups_or_subordinate_ids_are_refused() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
        let group = "root:x:0:\nweird:x:900100:\n";
        let subuid = "alice:100000:65536\n";
        let ok = UidRange::new(900_000, 100).unwrap();
        assert_eq!(ok.check(passwd, "", subuid, subuid), Ok(()));
        let e = UidRange::new(60_000, 10_000)
            .unwrap()
            .check(passwd, "", "", "")
            .unwrap_err();
        assert!(
            e.contains("contains 65534, the uid of the account nobody"),
            "{e}"
        );
        let e = UidRange::default()
            .check(passwd, group, "", "")
            .unwrap_err();
        assert!(e.contains("900100, the gid of the group weird"), "{e}");
        // Subordinate ranges overlap at either end, or contain the range.
        for (base, count) in [(90_000, 10_001), (165_535, 5), (120_000, 10)] {
            let e = UidRange::new(base, count)
                .unwrap()
                .check("", "", "", subuid)
                .unwrap_err();
            assert!(
                e.contains("subordinate ids 100000–165535 of alice in /etc/subgid"),
                "{base}: {e}"
            );
        }
        // Touching but not overlapping.
        assert_eq!(
            UidRange::new(90_000, 10_000)
                .unwrap()
                .check("", "", subuid, subuid),
            Ok(())
        );
        assert_eq!(
            UidRange::new(165_536, 10)
                .unwrap()
                .check("", "", subuid, subuid),
            Ok(())
        );
    }

    #[test]
    fn picking_continues_after_the_cursor_skips_holders_and_reuses_released_uids_last() {
        let r = UidRange::new(1000, 4).unwrap();
        let mut taken = HashSet::new();
        // Nothing handed out yet: the cursor (0) is outside the range.
        let mut cursor = 0;
        let mut take = |taken: &mut HashSet<u32>| {
            let u = r.pick(taken, cursor)?;
            assert!(taken.insert(u), "{u} handed out twice");
            cursor = u + 1;
            Some(u)
        };
        assert_eq!(take(&mut taken), Some(1000));
        assert_eq!(take(&mut taken), Some(1001));
        assert_eq!(take(&mut taken), Some(1002));
        // 1001 is released: the never-used 1003 comes first, then the
        // cursor wraps (past the last uid) to the released one.
        taken.remove(&1001);
        assert_eq!(take(&mut taken), Some(1003));
        assert_eq!(take(&mut taken), Some(1001));
        assert_eq!(take(&mut taken), None, "every uid is held");
        // Uids held outside the range (an older configuration) do not count.
        let outside: HashSet<u32> = [5, 999, 1004].into_iter().collect();
        assert_eq!(r.pick(&outside, 7), Some(1000));
        assert_eq!(r.pick(&outside, 1002), Some(1002));
    }

    /// The store's side: one transaction per lease, kept by the machine,
    /// released with its record, reused last, never two holders.
    #[tokio::test]
    async fn leases_are_durable_kept_released_with_the_record_and_never_shared() {
        use crate::store::{MachineRecord, MachineSpec, Store};
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("hyperfleet.db");
        let store = Store::open(&db).unwrap();
        let spec: MachineSpec = serde_json::from_value(serde_json::json!({
            "vmm": "firecracker", "vcpu_count": 1, "mem_size_mib": 128,
            "exposed_ports": [], "idle_timeout_seconds": null, "persistence": null
        }))
        .unwrap();
        for id in ["ma", "mb", "mc"] {
            let rec = MachineRecord::new(id.into(), "t", id.into(), spec.clone(), 0);
            store.write(move |ctx| ctx.put_machine(rec)).await.unwrap();
        }
        let range = UidRange::new(700_000, 2).unwrap();
        let a = lease(&store, "ma", range).await.unwrap();
        let b = lease(&store, "mb", range).await.unwrap();
        assert_eq!((a, b), (700_000, 700_001));
        assert_eq!(lease(&store, "ma", range).await.unwrap(), a, "kept");
        let e = lease(&store, "mc", range).await.unwrap_err();
        assert!(matches!(e, UidError::Exhausted(r) if r == range), "{e}");
        // A second holder of a uid is impossible, whatever the caller picks.
        let e = store
            .write(|ctx| ctx.take_uid("mc", |_, _| Some(700_000)))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("uid lease 700000"), "{e}");
        assert_eq!(store.get_by_id("mc").unwrap().unwrap().rec.jail_uid, None);

        // Deleting ma releases its uid; mc gets it.
        store.write(|ctx| ctx.delete_machine("ma")).await.unwrap();
        assert_eq!(lease(&store, "mc", range).await.unwrap(), a);
        drop(store);
        // Durable: a reopened store has the uids on the records and the
        // rows that keep them unique.
        let store = Store::open(&db).unwrap();
        let uid = |id: &str| store.get_by_id(id).unwrap().unwrap().rec.jail_uid;
        assert_eq!((uid("mb"), uid("mc")), (Some(b), Some(a)));

        // A wider range: the cursor goes on after the last uid handed out.
        let wider = UidRange::new(700_000, 4).unwrap();
        let rec = MachineRecord::new("md".into(), "t", "md".into(), spec.clone(), 0);
        store.write(move |ctx| ctx.put_machine(rec)).await.unwrap();
        assert_eq!(lease(&store, "md", wider).await.unwrap(), 700_002);
    }

    #[test]
    fn exhaustion_says_which_range_and_what_to_do() {
        let msg = UidError::Exhausted(UidRange::new(900_000, 2).unwrap()).to_string();
        assert_eq!(
            msg,
            "no uid of the jail's range 900000–900001 is free for another machine's VMM (each \
             machine holds one until it is deleted); delete machines or configure a larger \
             --jailer-uid-count"
        );
    }
}

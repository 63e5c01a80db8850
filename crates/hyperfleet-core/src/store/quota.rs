//! Tenant quotas and what holds resources: the `quotas` rows, the
//! `tenant_usage` sums the schema's triggers keep, and the memory committed
//! by machines that hold (or are about to hold) a VMM. The checks
//! themselves are pure and live in `lifecycle::capacity`; this module only
//! reads and writes the figures, inside the writer's transaction when they
//! decide an admission.

use hyperfleet_api::{QuotaLimits, QuotaUsage};
use rusqlite::{params, Connection, OptionalExtension};

use super::{Store, StoreError, WriteCtx};

/// The machines that hold host memory: a VMM is recorded, or one is wanted
/// (desired `running`/`paused`) and no current failure stopped it. The
/// same expression as the partial index `machines_holding_memory` (schema
/// migration 6), so the sum below reads only those rows, and as
/// `lifecycle::capacity::holds_memory`, which a test keeps in step.
pub(crate) const HOLDS_MEMORY: &str = "vmm_pid IS NOT NULL \
    OR (desired IN ('running', 'paused') \
        AND NOT (status = 'failed' AND failed_generation IS generation))";

fn limit(v: Option<i64>) -> Option<u64> {
    v.map(|n| n.max(0) as u64)
}

fn sql_limit(v: Option<u64>) -> Option<i64> {
    v.map(|n| i64::try_from(n).unwrap_or(i64::MAX))
}

fn read_quota(conn: &Connection, tenant: &str) -> Result<Option<QuotaLimits>, StoreError> {
    conn.prepare_cached(
        "SELECT max_machines, max_vcpus, max_memory_mib, max_disk_bytes FROM quotas \
         WHERE tenant = ?1",
    )
    .and_then(|mut s| {
        s.query_row(params![tenant], |r| {
            Ok(QuotaLimits {
                max_machines: limit(r.get(0)?),
                max_vcpus: limit(r.get(1)?),
                max_memory_mib: limit(r.get(2)?),
                max_disk_bytes: limit(r.get(3)?),
            })
        })
        .optional()
    })
    .map_err(|e| StoreError::sql(&format!("reading the quota of tenant {tenant}"), e))
}

fn read_usage(conn: &Connection, tenant: &str) -> Result<QuotaUsage, StoreError> {
    let n = |v: i64| v.max(0) as u64;
    conn.prepare_cached(
        "SELECT machines, vcpus, memory_mib, disk_bytes FROM tenant_usage WHERE tenant = ?1",
    )
    .and_then(|mut s| {
        s.query_row(params![tenant], |r| {
            Ok(QuotaUsage {
                machines: n(r.get(0)?),
                vcpus: n(r.get(1)?),
                memory_mib: n(r.get(2)?),
                disk_bytes: n(r.get(3)?),
            })
        })
        .optional()
    })
    .map(Option::unwrap_or_default)
    .map_err(|e| StoreError::sql(&format!("reading what tenant {tenant} holds"), e))
}

impl WriteCtx<'_> {
    /// Tenant `tenant`'s own quota, or `None` when it has none (the
    /// server's defaults apply).
    pub fn quota(&self, tenant: &str) -> Result<Option<QuotaLimits>, StoreError> {
        read_quota(self.conn(), tenant)
    }

    /// What tenant `tenant`'s machines hold, including this batch's
    /// uncommitted creates and deletes.
    pub fn tenant_usage(&self, tenant: &str) -> Result<QuotaUsage, StoreError> {
        read_usage(self.conn(), tenant)
    }

    /// Sets (`Some`) or removes (`None`: back to the server's defaults)
    /// tenant `tenant`'s own quota.
    pub fn set_quota(
        &mut self,
        tenant: &str,
        limits: Option<&QuotaLimits>,
    ) -> Result<(), StoreError> {
        let what = format!("recording the quota of tenant {tenant}");
        let done = match limits {
            Some(l) => self.conn().execute(
                "INSERT INTO quotas (tenant, max_machines, max_vcpus, max_memory_mib, \
                 max_disk_bytes, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (tenant) DO UPDATE SET max_machines = excluded.max_machines, \
                 max_vcpus = excluded.max_vcpus, max_memory_mib = excluded.max_memory_mib, \
                 max_disk_bytes = excluded.max_disk_bytes, updated_at = excluded.updated_at",
                params![
                    tenant,
                    sql_limit(l.max_machines),
                    sql_limit(l.max_vcpus),
                    sql_limit(l.max_memory_mib),
                    sql_limit(l.max_disk_bytes),
                    crate::util::now_ms()
                ],
            ),
            None => self
                .conn()
                .execute("DELETE FROM quotas WHERE tenant = ?1", params![tenant]),
        };
        done.map(drop).map_err(|e| StoreError::sql(&what, e))
    }

    /// The memory (MiB) the machines that hold host memory ask for, as of
    /// this point of the batch.
    pub fn committed_memory_mib(&self) -> Result<u64, StoreError> {
        self.conn()
            .prepare_cached(&format!(
                "SELECT coalesce(sum(json_extract(spec, '$.mem_size_mib')), 0) FROM machines \
                 WHERE {HOLDS_MEMORY}"
            ))
            .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
            .map(|n| n.max(0) as u64)
            .map_err(|e| StoreError::sql("summing the memory of the machines that run", e))
    }
}

impl Store {
    /// Tenant `tenant`'s own quota (`None`: it has none) and what its
    /// machines hold, as last committed.
    pub fn quota_and_usage(
        &self,
        tenant: &str,
    ) -> Result<(Option<QuotaLimits>, QuotaUsage), StoreError> {
        self.read(|c| Ok((read_quota(c, tenant)?, read_usage(c, tenant)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::capacity::holds_memory;
    use crate::store::{Desired, MachineRecord, VmmIdentity};
    use hyperfleet_api::{MachineStatus as S, VmmKind};

    fn machine(id: &str, tenant: &str, vcpus: u32, mib: u32, disk: Option<u64>) -> MachineRecord {
        let (_, mut spec) = crate::validate::validate_create(Default::default(), VmmKind::Stub)
            .expect("an empty create request is valid");
        spec.vcpu_count = vcpus;
        spec.mem_size_mib = mib;
        spec.disk_bytes = disk;
        MachineRecord::new(id.into(), tenant, id.into(), spec, 1)
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hyperfleet.db")).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn usage_follows_creates_and_deletes_per_tenant() {
        let (_dir, store) = open();
        store
            .write(|ctx| {
                ctx.put_machine(machine("m1", "a", 2, 512, Some(100)))?;
                ctx.put_machine(machine("m2", "a", 1, 256, None))?;
                ctx.put_machine(machine("m3", "b", 4, 1024, Some(7)))?;
                // Seen within the same transaction.
                assert_eq!(ctx.tenant_usage("a")?.machines, 2);
                Ok(())
            })
            .await
            .unwrap();
        let (own, a) = store.quota_and_usage("a").unwrap();
        assert_eq!(own, None);
        assert_eq!(
            a,
            QuotaUsage {
                machines: 2,
                vcpus: 3,
                memory_mib: 768,
                disk_bytes: 100
            }
        );
        assert_eq!(store.quota_and_usage("b").unwrap().1.vcpus, 4);
        assert_eq!(store.quota_and_usage("c").unwrap().1, QuotaUsage::default());
        store.write(|ctx| ctx.delete_machine("m1")).await.unwrap();
        let a = store.quota_and_usage("a").unwrap().1;
        assert_eq!(
            (a.machines, a.vcpus, a.memory_mib, a.disk_bytes),
            (1, 1, 256, 0)
        );
        // A status change leaves the sums alone.
        store
            .write(|ctx| {
                let mut m = ctx.machine("m2")?.unwrap();
                m.status = S::Stopped;
                ctx.put_machine(m)
            })
            .await
            .unwrap();
        assert_eq!(store.quota_and_usage("a").unwrap().1, a);
        // A rolled-back create leaves them alone too.
        let rolled_back = store
            .write(|ctx| {
                ctx.put_machine(machine("m4", "a", 8, 128, None))?;
                Err::<(), _>(StoreError::Rejected("no".into()))
            })
            .await;
        assert!(rolled_back.is_err());
        assert_eq!(store.quota_and_usage("a").unwrap().1, a);
    }

    #[tokio::test]
    async fn a_quota_is_set_replaced_and_removed() {
        let (_dir, store) = open();
        let l = QuotaLimits {
            max_machines: Some(3),
            max_memory_mib: Some(u64::MAX),
            ..Default::default()
        };
        store
            .write(move |ctx| ctx.set_quota("a", Some(&l)))
            .await
            .unwrap();
        let got = store.quota_and_usage("a").unwrap().0.unwrap();
        // Stored as SQLite integers: the largest limit saturates.
        assert_eq!(got.max_machines, Some(3));
        assert_eq!(got.max_memory_mib, Some(i64::MAX as u64));
        assert_eq!((got.max_vcpus, got.max_disk_bytes), (None, None));
        assert_eq!(store.quota_and_usage("b").unwrap().0, None);
        let l2 = QuotaLimits {
            max_vcpus: Some(1),
            ..Default::default()
        };
        store
            .write(move |ctx| ctx.set_quota("a", Some(&l2)))
            .await
            .unwrap();
        assert_eq!(store.quota_and_usage("a").unwrap().0, Some(l2));
        store.write(|ctx| ctx.set_quota("a", None)).await.unwrap();
        assert_eq!(store.quota_and_usage("a").unwrap().0, None);
    }

    /// The SQL that sums committed memory and the predicate the supervisor
    /// applies to the machine being started must agree.
    #[tokio::test]
    async fn committed_memory_counts_exactly_the_machines_that_hold_memory() {
        let (_dir, store) = open();
        let vmm = VmmIdentity {
            pid: 1,
            start_time: 1,
            boot_id: "b".into(),
        };
        let mut recs = Vec::new();
        let mut n = 0;
        for status in [
            S::Pending,
            S::Running,
            S::Stopped,
            S::Failed,
            S::Suspended,
            S::Stopping,
        ] {
            for desired in [
                Desired::Running,
                Desired::Paused,
                Desired::Stopped,
                Desired::Suspended,
            ] {
                for (with_vmm, failed_now) in [(false, false), (true, false), (false, true)] {
                    n += 1;
                    // Distinct sizes, so a wrong machine counted shows.
                    let mut m = machine(&format!("m{n}"), "t", 1, 1, None);
                    m.spec.mem_size_mib = n;
                    m.status = status;
                    m.desired = desired;
                    m.vmm = with_vmm.then(|| vmm.clone());
                    m.failed_generation = failed_now.then_some(m.generation);
                    recs.push(m);
                }
            }
        }
        let expected: u64 = recs
            .iter()
            .filter(|m| holds_memory(m))
            .map(|m| u64::from(m.spec.mem_size_mib))
            .sum();
        assert!(expected > 0);
        let got = store
            .write(move |ctx| {
                for m in recs {
                    ctx.put_machine(m)?;
                }
                ctx.committed_memory_mib()
            })
            .await
            .unwrap();
        assert_eq!(got, expected);
    }
}

//! Versioned migrations, applied in order at open. `PRAGMA user_version`
//! records how many have been applied; each runs in its own transaction.

use rusqlite::Connection;

use super::StoreError;

/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: machines, their history, the step journal, leases and API keys.
    r#"
    CREATE TABLE machines (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        status TEXT NOT NULL,
        desired TEXT NOT NULL,
        generation INTEGER NOT NULL,
        observed_generation INTEGER NOT NULL DEFAULT 0,
        restart_seq INTEGER NOT NULL DEFAULT 0,
        boot_restart_seq INTEGER NOT NULL DEFAULT 0,
        stop_kill INTEGER NOT NULL DEFAULT 0,
        failed_generation INTEGER,
        error_message TEXT,
        vmm_pid INTEGER,
        vmm_start_time INTEGER,
        vmm_boot_id TEXT,
        current_step TEXT,
        prepared INTEGER NOT NULL DEFAULT 0,
        has_snapshot INTEGER NOT NULL DEFAULT 0,
        operation_id TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        started_at INTEGER
    ) STRICT;
    CREATE UNIQUE INDEX machines_tenant_name ON machines(tenant, name);

    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        machine_id TEXT NOT NULL,
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        from_status TEXT,
        to_status TEXT,
        operation_id TEXT,
        message TEXT,
        steps TEXT
    ) STRICT;
    CREATE INDEX events_machine ON events(machine_id, id);

    CREATE TABLE steps (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        machine_id TEXT NOT NULL,
        operation_id TEXT,
        step TEXT NOT NULL,
        phase TEXT NOT NULL CHECK (phase IN ('started', 'done', 'failed')),
        at INTEGER NOT NULL,
        duration_ms REAL,
        detail TEXT
    ) STRICT;
    CREATE INDEX steps_machine ON steps(machine_id, id);

    CREATE TABLE leases (
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        machine_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (kind, value)
    ) STRICT;
    CREATE INDEX leases_machine ON leases(machine_id);

    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        tenant TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        scopes TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        revoked_at INTEGER
    ) STRICT;
    "#,
    // 2: network leases on the machine record (the `leases` rows hold the
    // uniqueness), and small daemon-wide settings such as the allocator's
    // cursor.
    r#"
    ALTER TABLE machines ADD COLUMN network TEXT;
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT;
    "#,
    // 3: the store keeps only recently used machines in memory; lists,
    // name lookups and the proxy's name routing read these indexes.
    // `(tenant, created_at, id)` covers a page of ids in creation order,
    // the status variant the `?status=` filter, `name` the proxy's host
    // names (which carry no tenant).
    r#"
    CREATE INDEX machines_tenant_order ON machines(tenant, created_at, id);
    CREATE INDEX machines_tenant_status ON machines(tenant, status, created_at, id);
    CREATE INDEX machines_name ON machines(name);
    "#,
    // 4: the unprivileged uid a jailed machine's VMM runs as, leased like
    // the network (a `leases` row of kind `uid` holds the uniqueness; the
    // allocator's cursor is the `uid_cursor` meta key).
    r#"
    ALTER TABLE machines ADD COLUMN jail_uid INTEGER;
    "#,
    // 5: machines still to prepare, oldest first: the queue the supervisor
    // admits background preparation from (a partial index, so it holds
    // only the unprepared rows).
    r#"
    CREATE INDEX machines_unprepared ON machines(created_at, id) WHERE prepared = 0;
    "#,
    // 6: tenant quotas (a row per tenant with limits of its own; NULL is
    // unlimited), what each tenant's machines hold (kept by triggers in the
    // transaction that inserts or deletes a machine, so a quota check reads
    // one row; the spec, and with it the sizes, never changes after
    // insert), and the machines that hold host memory (see
    // `store::quota::HOLDS_MEMORY`, which must stay the same expression).
    r#"
    CREATE TABLE quotas (
        tenant TEXT PRIMARY KEY,
        max_machines INTEGER,
        max_vcpus INTEGER,
        max_memory_mib INTEGER,
        max_disk_bytes INTEGER,
        updated_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE tenant_usage (
        tenant TEXT PRIMARY KEY,
        machines INTEGER NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_bytes INTEGER NOT NULL
    ) STRICT;
    INSERT INTO tenant_usage (tenant, machines, vcpus, memory_mib, disk_bytes)
        SELECT tenant, count(*), sum(json_extract(spec, '$.vcpu_count')),
               sum(json_extract(spec, '$.mem_size_mib')),
               coalesce(sum(json_extract(spec, '$.disk_bytes')), 0)
        FROM machines GROUP BY tenant;
    CREATE TRIGGER machines_usage_insert AFTER INSERT ON machines BEGIN
        INSERT INTO tenant_usage (tenant, machines, vcpus, memory_mib, disk_bytes)
        VALUES (NEW.tenant, 1, json_extract(NEW.spec, '$.vcpu_count'),
                json_extract(NEW.spec, '$.mem_size_mib'),
                coalesce(json_extract(NEW.spec, '$.disk_bytes'), 0))
        ON CONFLICT (tenant) DO UPDATE SET
            machines = machines + 1,
            vcpus = vcpus + excluded.vcpus,
            memory_mib = memory_mib + excluded.memory_mib,
            disk_bytes = disk_bytes + excluded.disk_bytes;
    END;
    CREATE TRIGGER machines_usage_delete AFTER DELETE ON machines BEGIN
        UPDATE tenant_usage SET
            machines = machines - 1,
            vcpus = vcpus - json_extract(OLD.spec, '$.vcpu_count'),
            memory_mib = memory_mib - json_extract(OLD.spec, '$.mem_size_mib'),
            disk_bytes = disk_bytes - coalesce(json_extract(OLD.spec, '$.disk_bytes'), 0)
        WHERE tenant = OLD.tenant;
    END;
    CREATE INDEX machines_holding_memory ON machines(id)
        WHERE vmm_pid IS NOT NULL
           OR (desired IN ('running', 'paused')
               AND NOT (status = 'failed' AND failed_generation IS generation));
    "#,
    // 7: snapshots (a machine's disk, and memory when it had any, kept as
    // the base new machines are made from). `base_snapshot_id` is the
    // snapshot under this one's disk; a snapshot's files stay while a
    // machine (its spec's `base_snapshot`) or another snapshot rests on it.
    // `snapshot_job` on a machine: the snapshot its run is to take.
    r#"
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        name TEXT,
        machine_id TEXT NOT NULL,
        status TEXT NOT NULL,
        kind TEXT NOT NULL,
        base_snapshot_id TEXT,
        data TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) STRICT;
    CREATE UNIQUE INDEX snapshots_tenant_name ON snapshots(tenant, name) WHERE name IS NOT NULL;
    CREATE INDEX snapshots_tenant_order ON snapshots(tenant, created_at, id);
    CREATE INDEX snapshots_base ON snapshots(base_snapshot_id) WHERE base_snapshot_id IS NOT NULL;
    ALTER TABLE machines ADD COLUMN snapshot_job TEXT;
    CREATE INDEX machines_base_snapshot ON machines(json_extract(spec, '$.base_snapshot'))
        WHERE json_extract(spec, '$.base_snapshot') IS NOT NULL;
    "#,
    // 8: OCI image records and their events (`store::images`).
    super::images::MIGRATION,
    // 9: when a machine was last used, as recorded by requests and when it
    // stops being used (`lifecycle::idle`): orders the storage evictor and
    // outlives a restart.
    "ALTER TABLE machines ADD COLUMN last_active_at INTEGER;",
    // 10: a machine's main process: the exit code that stopped it, and how
    // many times its restart policy booted it again.
    r#"
    ALTER TABLE machines ADD COLUMN exit_code INTEGER;
    ALTER TABLE machines ADD COLUMN restart_count INTEGER NOT NULL DEFAULT 0;
    "#,
];

pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| StoreError::sql("reading the schema version", e))?;
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(StoreError::Schema(format!(
            "the database has schema version {current} but this hyperfleet knows only up to {known}; \
             it was written by a newer release"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i64 + 1;
        let tx = conn
            .transaction()
            .map_err(|e| StoreError::sql("starting a migration", e))?;
        tx.execute_batch(sql)
            .map_err(|e| StoreError::sql(&format!("applying migration {version}"), e))?;
        tx.pragma_update(None, "user_version", version)
            .map_err(|e| StoreError::sql("recording the schema version", e))?;
        tx.commit()
            .map_err(|e| StoreError::sql(&format!("committing migration {version}"), e))?;
        tracing::info!(version, "applied store migration");
    }
    Ok(())
}

pub fn schema_version() -> i64 {
    MIGRATIONS.len() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use hyperfleet_api::{MachineStatus, VmmKind};

    /// A database as the release with schema version 2 left it (machines
    /// with network leases, before the cache indexes, jail uids and the
    /// preparation queue), holding one prepared, stopped machine.
    fn version_2_database(path: &std::path::Path) {
        let conn = Connection::open(path).unwrap();
        for sql in &MIGRATIONS[..2] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 2).unwrap();
        let (_, mut spec) = crate::validate::validate_create(Default::default(), VmmKind::Stub)
            .expect("an empty create request is valid");
        spec.exposed_ports = vec![8080];
        conn.execute(
            "INSERT INTO machines (id, tenant, name, spec, status, desired, generation, \
             prepared, created_at, updated_at) VALUES ('mold', 'default', 'old', ?1, 'stopped', \
             'stopped', 3, 1, 1000, 2000)",
            [serde_json::to_string(&spec).unwrap()],
        )
        .unwrap();
    }

    #[test]
    fn a_version_2_database_is_migrated_and_its_machines_read_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hyperfleet.db");
        version_2_database(&path);
        let store = Store::open(&path).unwrap();
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, schema_version());
        let m = store.get(Some("default"), "old").unwrap().unwrap();
        assert_eq!(m.rec.id, "mold");
        assert_eq!(m.rec.status, MachineStatus::Stopped);
        assert_eq!(m.rec.generation, 3);
        assert_eq!(m.rec.spec.exposed_ports, vec![8080]);
        assert_eq!(m.rec.jail_uid, None);
        let (page, total) = store.list("default", None, 10, 0).unwrap();
        assert_eq!((page.len(), total), (1, 1));
        assert_eq!(
            store
                .list("default", Some(MachineStatus::Stopped), 10, 0)
                .unwrap()
                .1,
            1
        );
        // Prepared: not in the preparation queue.
        assert!(store.unprepared_ids(10).unwrap().is_empty());
        // What the tenant holds is summed from the machines already there
        // (no disk size recorded before quotas: it counts none).
        let (quota, usage) = store.quota_and_usage("default").unwrap();
        assert_eq!(quota, None);
        assert_eq!(
            (
                usage.machines,
                usage.vcpus,
                usage.memory_mib,
                usage.disk_bytes
            ),
            (
                1,
                u64::from(m.rec.spec.vcpu_count),
                u64::from(m.rec.spec.mem_size_mib),
                0
            )
        );
    }

    #[test]
    fn a_database_of_a_newer_release_is_refused_and_its_schema_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hyperfleet.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", schema_version() + 1)
            .unwrap();
        drop(conn);
        let err = Store::open(&path).err().expect("a newer schema is refused");
        assert!(err.to_string().contains("newer release"), "{err}");
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, schema_version() + 1);
    }
}

//! Mapping between SQLite rows and records. All SQL of the store is here or
//! in the writer context, next to the schema it must match.

use hyperfleet_api::{MachineStatus, Scope, StepTiming, VmmKind};
use rusqlite::{params, Connection, OptionalExtension, Row, Statement, ToSql};

use super::{
    Desired, EventRecord, KeyRecord, MachineRecord, MachineSpec, NetLease, StoreError, VmmIdentity,
};

pub(super) const MACHINE_COLUMNS: &str = "id, tenant, name, spec, status, desired, generation, \
    restart_seq, boot_restart_seq, stop_kill, failed_generation, error_message, vmm_pid, \
    vmm_start_time, vmm_boot_id, current_step, prepared, has_snapshot, operation_id, \
    created_at, updated_at, started_at, observed_generation, network, jail_uid, snapshot_job, \
    last_active_at, exit_code, restart_count";

fn bad(col: usize, msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        rusqlite::types::Type::Text,
        Box::<dyn std::error::Error + Send + Sync>::from(msg),
    )
}

/// A new machine: every column. Named parameters, bound by
/// [`bind_state`] (shared with [`UPDATE_MACHINE`]) and [`insert_machine`].
const INSERT_MACHINE: &str = "INSERT INTO machines (id, tenant, name, spec, created_at, status, \
    desired, generation, restart_seq, boot_restart_seq, stop_kill, failed_generation, \
    error_message, vmm_pid, vmm_start_time, vmm_boot_id, current_step, prepared, has_snapshot, \
    operation_id, updated_at, started_at, observed_generation, snapshot_job, last_active_at, \
    exit_code, restart_count) \
    VALUES (:id, :tenant, :name, :spec, :created_at, :status, :desired, :generation, \
    :restart_seq, :boot_restart_seq, :stop_kill, :failed_generation, :error_message, :vmm_pid, \
    :vmm_start_time, :vmm_boot_id, :current_step, :prepared, :has_snapshot, :operation_id, \
    :updated_at, :started_at, :observed_generation, :snapshot_job, :last_active_at, :exit_code, \
    :restart_count)";

/// The VMM identity from its three nullable columns (`vmm_pid`,
/// `vmm_start_time`, `vmm_boot_id`), starting at column `first`.
fn vmm_from_row(r: &Row<'_>, first: usize) -> rusqlite::Result<Option<VmmIdentity>> {
    let pid: Option<i64> = r.get(first)?;
    let start: Option<i64> = r.get(first + 1)?;
    let boot: Option<String> = r.get(first + 2)?;
    Ok(match (pid, start, boot) {
        (Some(pid), Some(start_time), Some(boot_id)) => Some(VmmIdentity {
            pid: pid as i32,
            start_time: start_time as u64,
            boot_id,
        }),
        _ => None,
    })
}

pub(super) fn machine_from_row(r: &Row<'_>) -> rusqlite::Result<MachineRecord> {
    let spec: String = r.get(3)?;
    let spec: MachineSpec =
        serde_json::from_str(&spec).map_err(|e| bad(3, format!("machine spec: {e}")))?;
    let status: String = r.get(4)?;
    let status: MachineStatus = status.parse().map_err(|e: String| bad(4, e))?;
    let desired: String = r.get(5)?;
    let desired =
        Desired::parse(&desired).ok_or_else(|| bad(5, format!("unknown desired '{desired}'")))?;
    let vmm = vmm_from_row(r, 12)?;
    Ok(MachineRecord {
        id: r.get(0)?,
        tenant: r.get(1)?,
        name: r.get(2)?,
        spec,
        status,
        desired,
        generation: r.get::<_, i64>(6)? as u64,
        restart_seq: r.get::<_, i64>(7)? as u64,
        boot_restart_seq: r.get::<_, i64>(8)? as u64,
        stop_kill: r.get::<_, i64>(9)? != 0,
        failed_generation: r.get::<_, Option<i64>>(10)?.map(|g| g as u64),
        error_message: r.get(11)?,
        vmm,
        current_step: r.get(15)?,
        prepared: r.get::<_, i64>(16)? != 0,
        has_snapshot: r.get::<_, i64>(17)? != 0,
        operation_id: r.get(18)?,
        created_at: r.get(19)?,
        updated_at: r.get(20)?,
        started_at: r.get(21)?,
        observed_generation: r.get::<_, i64>(22)? as u64,
        network: match r.get::<_, Option<String>>(23)? {
            Some(j) => {
                Some(serde_json::from_str(&j).map_err(|e| bad(23, format!("network lease: {e}")))?)
            }
            None => None,
        },
        jail_uid: r
            .get::<_, Option<i64>>(24)?
            .map(|u| u32::try_from(u).map_err(|_| bad(24, format!("uid {u} out of range"))))
            .transpose()?,
        snapshot_job: r.get(25)?,
        last_active_at: r.get(26)?,
        exit_code: r.get(27)?,
        restart_count: r
            .get::<_, i64>(28)?
            .try_into()
            .map_err(|_| bad(28, "restart count out of range".into()))?,
    })
}

/// Records machine `id`'s network lease (written once, when it is taken;
/// the hot status updates leave the column alone).
pub(super) fn set_machine_network(
    conn: &Connection,
    id: &str,
    lease: Option<&NetLease>,
) -> Result<(), StoreError> {
    // Serialising a struct of strings and numbers cannot fail.
    let json = lease.map(|l| serde_json::to_string(l).expect("lease serialises"));
    conn.execute(
        "UPDATE machines SET network = ?2 WHERE id = ?1",
        params![id, json],
    )
    .map_err(|e| StoreError::sql(&format!("recording the network lease of {id}"), e))?;
    Ok(())
}

/// Records machine `id`'s uid (written once, when it is leased, like the
/// network column).
pub(super) fn set_machine_uid(conn: &Connection, id: &str, uid: u32) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE machines SET jail_uid = ?2 WHERE id = ?1",
        params![id, i64::from(uid)],
    )
    .map_err(|e| StoreError::sql(&format!("recording the uid of {id}"), e))?;
    Ok(())
}

/// The VMM identity as its three nullable columns.
fn vmm_columns(m: &MachineRecord) -> (Option<i64>, Option<i64>, Option<&str>) {
    match &m.vmm {
        Some(v) => (
            Some(i64::from(v.pid)),
            Some(v.start_time as i64),
            Some(v.boot_id.as_str()),
        ),
        None => (None, None, None),
    }
}

/// Every mutable column of an existing machine (the immutable id, tenant,
/// name, spec and created_at are not rewritten).
const UPDATE_MACHINE: &str = "UPDATE machines SET status=:status, desired=:desired, \
    generation=:generation, restart_seq=:restart_seq, boot_restart_seq=:boot_restart_seq, \
    stop_kill=:stop_kill, failed_generation=:failed_generation, error_message=:error_message, \
    vmm_pid=:vmm_pid, vmm_start_time=:vmm_start_time, vmm_boot_id=:vmm_boot_id, \
    current_step=:current_step, prepared=:prepared, has_snapshot=:has_snapshot, \
    operation_id=:operation_id, updated_at=:updated_at, started_at=:started_at, \
    observed_generation=:observed_generation, snapshot_job=:snapshot_job, \
    last_active_at=:last_active_at, exit_code=:exit_code, restart_count=:restart_count \
    WHERE id=:id";

/// Binds `(name, value)` pairs to a statement's named parameters.
fn bind(stmt: &mut Statement<'_>, values: &[(&str, &dyn ToSql)]) -> rusqlite::Result<()> {
    for (name, value) in values {
        let i = stmt
            .parameter_index(name)?
            .ok_or_else(|| rusqlite::Error::InvalidParameterName(name.to_string()))?;
        stmt.raw_bind_parameter(i, value)?;
    }
    Ok(())
}

/// Binds the id and every mutable column: the whole of an update, the
/// state part of an insert.
fn bind_state(stmt: &mut Statement<'_>, m: &MachineRecord) -> rusqlite::Result<()> {
    let (pid, start, boot) = vmm_columns(m);
    bind(
        stmt,
        &[
            (":id", &m.id),
            (":status", &m.status.as_str()),
            (":desired", &m.desired.as_str()),
            (":generation", &(m.generation as i64)),
            (":restart_seq", &(m.restart_seq as i64)),
            (":boot_restart_seq", &(m.boot_restart_seq as i64)),
            (":stop_kill", &m.stop_kill),
            (":failed_generation", &m.failed_generation.map(|g| g as i64)),
            (":error_message", &m.error_message),
            (":vmm_pid", &pid),
            (":vmm_start_time", &start),
            (":vmm_boot_id", &boot),
            (":current_step", &m.current_step),
            (":prepared", &m.prepared),
            (":has_snapshot", &m.has_snapshot),
            (":operation_id", &m.operation_id),
            (":updated_at", &m.updated_at),
            (":started_at", &m.started_at),
            (":observed_generation", &(m.observed_generation as i64)),
            (":snapshot_job", &m.snapshot_job),
            (":last_active_at", &m.last_active_at),
            (":exit_code", &m.exit_code),
            (":restart_count", &i64::from(m.restart_count)),
        ],
    )
}

/// Updates an existing machine's mutable columns.
pub(super) fn update_machine(conn: &Connection, m: &MachineRecord) -> Result<(), StoreError> {
    let n = conn
        .prepare_cached(UPDATE_MACHINE)
        .and_then(|mut stmt| {
            bind_state(&mut stmt, m)?;
            stmt.raw_execute()
        })
        .map_err(|e| StoreError::sql(&format!("updating machine {}", m.id), e))?;
    if n == 0 {
        return Err(StoreError::NoSuchMachine(m.id.clone()));
    }
    Ok(())
}

/// Rewrites machine `id`'s spec (`PATCH /machines/{id}`: the settings it
/// may change; its sizes, which the quota triggers sum, never change).
pub(super) fn update_machine_spec(
    conn: &Connection,
    id: &str,
    spec: &MachineSpec,
) -> Result<(), StoreError> {
    // Serialising a struct of strings, numbers and maps cannot fail.
    let json = serde_json::to_string(spec).expect("machine spec serialises");
    conn.execute(
        "UPDATE machines SET spec = ?2 WHERE id = ?1",
        params![id, json],
    )
    .map_err(|e| StoreError::sql(&format!("updating the spec of machine {id}"), e))?;
    Ok(())
}

/// Inserts a new machine; a taken (tenant, name) is `NameTaken`.
pub(super) fn insert_machine(conn: &Connection, m: &MachineRecord) -> Result<(), StoreError> {
    // Serialising a struct of strings, numbers and maps cannot fail.
    let spec = serde_json::to_string(&m.spec).expect("machine spec serialises");
    conn.prepare_cached(INSERT_MACHINE)
        .and_then(|mut stmt| {
            bind_state(&mut stmt, m)?;
            bind(
                &mut stmt,
                &[
                    (":tenant", &m.tenant),
                    (":name", &m.name),
                    (":spec", &spec),
                    (":created_at", &m.created_at),
                ],
            )?;
            stmt.raw_execute()
        })
        .map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                StoreError::NameTaken(m.name.clone())
            }
            e => StoreError::sql(&format!("writing machine {}", m.id), e),
        })?;
    Ok(())
}

/// Which machines a scan reads.
#[derive(Debug, Clone, Copy)]
pub(super) enum MachineFilter {
    All,
    /// Holding a network lease.
    Leased,
    /// With a VMM recorded.
    WithVmm,
}

/// Hands each machine `filter` selects to `f`, one row at a time: a scan
/// of every machine never holds them all in memory.
pub(super) fn for_each_machine(
    conn: &Connection,
    filter: MachineFilter,
    mut f: impl FnMut(MachineRecord),
) -> Result<(), StoreError> {
    let clause = match filter {
        MachineFilter::All => "",
        MachineFilter::Leased => " WHERE network IS NOT NULL",
        MachineFilter::WithVmm => " WHERE vmm_pid IS NOT NULL",
    };
    let mut stmt = conn
        .prepare_cached(&format!("SELECT {MACHINE_COLUMNS} FROM machines{clause}"))
        .map_err(|e| StoreError::sql("loading machines", e))?;
    let rows = stmt
        .query_map([], machine_from_row)
        .map_err(|e| StoreError::sql("loading machines", e))?;
    for row in rows {
        f(row.map_err(|e| StoreError::sql("reading a machine row", e))?);
    }
    Ok(())
}

pub(super) fn load_machines(
    conn: &Connection,
    filter: MachineFilter,
) -> Result<Vec<MachineRecord>, StoreError> {
    let mut out = Vec::new();
    for_each_machine(conn, filter, |m| out.push(m))?;
    Ok(out)
}

/// Whether machine `id` exists (`None`: no such machine) and the VMM it
/// records, without reading the rest of its record.
pub(super) fn machine_vmm(
    conn: &Connection,
    id: &str,
) -> Result<Option<Option<VmmIdentity>>, StoreError> {
    query_one(
        conn,
        "SELECT vmm_pid, vmm_start_time, vmm_boot_id FROM machines WHERE id = ?1",
        params![id],
        |r| vmm_from_row(r, 0),
        &format!("reading the VMM of machine {id}"),
    )
}

/// How many machines record a VMM, per backend (`GET /metrics`). The
/// condition implies `machines_holding_memory`'s, so SQLite reads that
/// partial index (machines that run or are about to), not every machine.
pub(super) fn vmm_counts(conn: &Connection) -> Result<Vec<(VmmKind, usize)>, StoreError> {
    let what = "counting the machines with a VMM";
    let mut stmt = conn
        .prepare_cached(
            "SELECT json_extract(spec, '$.vmm'), count(*) FROM machines \
             WHERE vmm_pid IS NOT NULL GROUP BY 1",
        )
        .map_err(|e| StoreError::sql(what, e))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .map_err(|e| StoreError::sql(what, e))?;
    let mut out = Vec::new();
    for row in rows {
        let (kind, n) = row.map_err(|e| StoreError::sql(what, e))?;
        if let Ok(kind) = kind.parse::<VmmKind>() {
            out.push((kind, usize::try_from(n).unwrap_or(0)));
        }
    }
    Ok(out)
}

/// At most one row of `sql` (prepared once per connection), mapped.
fn query_one<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    what: &str,
) -> Result<Option<T>, StoreError> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.query_row(params, map).optional())
        .map_err(|e| StoreError::sql(what, e))
}

/// Machine `id`, if it exists.
pub(super) fn load_machine(
    conn: &Connection,
    id: &str,
) -> Result<Option<MachineRecord>, StoreError> {
    query_one(
        conn,
        &format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE id = ?1"),
        params![id],
        machine_from_row,
        &format!("reading machine {id}"),
    )
}

/// The machine `tenant` named `name`, if any.
pub(super) fn load_machine_named(
    conn: &Connection,
    tenant: &str,
    name: &str,
) -> Result<Option<MachineRecord>, StoreError> {
    query_one(
        conn,
        &format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE tenant = ?1 AND name = ?2"),
        params![tenant, name],
        machine_from_row,
        &format!("reading machine '{name}'"),
    )
}

/// The id of `tenant`'s machine named `name` (as this connection sees it:
/// on the writer, including the open transaction's changes).
pub(super) fn name_owner(
    conn: &Connection,
    tenant: &str,
    name: &str,
) -> Result<Option<String>, StoreError> {
    query_one(
        conn,
        "SELECT id FROM machines WHERE tenant = ?1 AND name = ?2",
        params![tenant, name],
        |r| r.get(0),
        &format!("looking up the name '{name}'"),
    )
}

/// Every tenant's machine named `name`.
pub(super) fn load_machines_named_in_all_tenants(
    conn: &Connection,
    name: &str,
) -> Result<Vec<MachineRecord>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {MACHINE_COLUMNS} FROM machines WHERE name = ?1"
        ))
        .map_err(|e| StoreError::sql("preparing a machine read by name", e))?;
    let rows = stmt
        .query_map(params![name], machine_from_row)
        .map_err(|e| StoreError::sql(&format!("reading machines named '{name}'"), e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::sql("reading a machine row", e))
}

/// Ids of one page of `tenant`'s machines in creation order (served by the
/// covering indexes of migration 3).
pub(super) fn list_ids(
    conn: &Connection,
    tenant: &str,
    status: Option<MachineStatus>,
    limit: usize,
    offset: usize,
) -> Result<Vec<String>, StoreError> {
    let (sql, status) = match status {
        None => (
            "SELECT id FROM machines WHERE tenant = ?1 \
             ORDER BY created_at, id LIMIT ?2 OFFSET ?3",
            None,
        ),
        Some(s) => (
            "SELECT id FROM machines WHERE tenant = ?1 AND status = ?4 \
             ORDER BY created_at, id LIMIT ?2 OFFSET ?3",
            Some(s.as_str()),
        ),
    };
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(|e| StoreError::sql("preparing a machine list", e))?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let offset = i64::try_from(offset).unwrap_or(i64::MAX);
    let id = |r: &Row<'_>| r.get::<_, String>(0);
    let rows = match status {
        None => stmt.query_map(params![tenant, limit, offset], id),
        Some(s) => stmt.query_map(params![tenant, limit, offset, s], id),
    }
    .map_err(|e| StoreError::sql("listing machines", e))?;
    rows.collect::<Result<Vec<String>, _>>()
        .map_err(|e| StoreError::sql("reading a machine id", e))
}

/// The oldest machines whose only work is preparation nobody waits for
/// (never started, nothing wanted, no VMM, no step under way), from the
/// partial index of migration 5.
pub(super) fn unprepared_ids(conn: &Connection, limit: usize) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id FROM machines WHERE prepared = 0 AND status = 'pending' \
             AND desired = 'stopped' AND vmm_pid IS NULL AND current_step IS NULL \
             ORDER BY created_at, id LIMIT ?1",
        )
        .map_err(|e| StoreError::sql("preparing the unprepared-machine query", e))?;
    let rows = stmt
        .query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            r.get::<_, String>(0)
        })
        .map_err(|e| StoreError::sql("finding machines to prepare", e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::sql("reading a machine id", e))
}

/// How many machines each tenant has in each status.
pub(super) fn status_counts(
    conn: &Connection,
) -> Result<Vec<(String, MachineStatus, i64)>, StoreError> {
    let mut stmt = conn
        .prepare("SELECT tenant, status, count(*) FROM machines GROUP BY tenant, status")
        .map_err(|e| StoreError::sql("counting machines", e))?;
    let rows = stmt
        .query_map([], |r| {
            let status: String = r.get(1)?;
            let status: MachineStatus = status.parse().map_err(|e: String| bad(1, e))?;
            Ok((r.get(0)?, status, r.get(2)?))
        })
        .map_err(|e| StoreError::sql("counting machines", e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::sql("reading a machine count", e))
}

fn scopes_to_text(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

pub(super) fn insert_key(conn: &Connection, k: &KeyRecord) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO api_keys (id, name, tenant, hash, prefix, scopes, created_at, expires_at, revoked_at) \
         VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
        params![
            k.id,
            k.name,
            k.tenant,
            k.hash,
            k.prefix,
            scopes_to_text(&k.scopes),
            k.created_at,
            k.expires_at,
            k.revoked_at
        ],
    )
    .map_err(|e| StoreError::sql("inserting an API key", e))?;
    Ok(())
}

pub(super) fn load_keys(conn: &Connection) -> Result<Vec<KeyRecord>, StoreError> {
    let mut stmt = conn
        .prepare(
            "SELECT id, name, tenant, hash, prefix, scopes, created_at, expires_at, revoked_at \
             FROM api_keys",
        )
        .map_err(|e| StoreError::sql("loading API keys", e))?;
    let rows = stmt
        .query_map([], |r| {
            let scopes: String = r.get(5)?;
            let scopes = scopes
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| Scope::parse(s).ok_or_else(|| bad(5, format!("unknown scope '{s}'"))))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(KeyRecord {
                id: r.get(0)?,
                name: r.get(1)?,
                tenant: r.get(2)?,
                hash: r.get(3)?,
                prefix: r.get(4)?,
                scopes,
                created_at: r.get(6)?,
                expires_at: r.get(7)?,
                revoked_at: r.get(8)?,
            })
        })
        .map_err(|e| StoreError::sql("loading API keys", e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::sql("reading an API key row", e))
}

pub(super) fn insert_event(conn: &Connection, ev: &EventRecord) -> Result<i64, StoreError> {
    let steps = if ev.steps.is_empty() {
        None
    } else {
        // Step timings are plain data; serialising cannot fail.
        Some(serde_json::to_string(&ev.steps).expect("steps serialise"))
    };
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO events (machine_id, at, kind, from_status, to_status, operation_id, message, steps) \
             VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
        )
        .map_err(|e| StoreError::sql("preparing the event insert", e))?;
    stmt.execute(params![
        ev.machine_id,
        ev.at,
        ev.kind,
        ev.from_status.map(|s| s.as_str()),
        ev.to_status.map(|s| s.as_str()),
        ev.operation_id,
        ev.message,
        steps
    ])
    .map_err(|e| StoreError::sql("appending an event", e))?;
    Ok(conn.last_insert_rowid())
}

pub(super) fn load_events(
    conn: &Connection,
    machine_id: &str,
    after: i64,
    limit: usize,
) -> Result<Vec<EventRecord>, StoreError> {
    query_events(
        conn,
        "SELECT id, machine_id, at, kind, from_status, to_status, operation_id, message, steps \
         FROM events WHERE machine_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        machine_id,
        after,
        limit,
    )
}

/// The events of every machine `tenant` holds now, in order, after `after`
/// (a deleted machine's events go with it).
pub(super) fn load_tenant_events(
    conn: &Connection,
    tenant: &str,
    after: i64,
    limit: usize,
) -> Result<Vec<EventRecord>, StoreError> {
    query_events(
        conn,
        "SELECT id, machine_id, at, kind, from_status, to_status, operation_id, message, steps \
         FROM events WHERE machine_id IN (SELECT id FROM machines WHERE tenant = ?1) \
         AND id > ?2 ORDER BY id LIMIT ?3",
        tenant,
        after,
        limit,
    )
}

fn query_events(
    conn: &Connection,
    sql: &str,
    key: &str,
    after: i64,
    limit: usize,
) -> Result<Vec<EventRecord>, StoreError> {
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(|e| StoreError::sql("loading events", e))?;
    let rows = stmt
        .query_map(params![key, after, limit as i64], |r| {
            let parse_status = |i: usize| -> rusqlite::Result<Option<MachineStatus>> {
                let s: Option<String> = r.get(i)?;
                s.map(|s| s.parse().map_err(|e: String| bad(i, e)))
                    .transpose()
            };
            let steps: Option<String> = r.get(8)?;
            let steps: Vec<StepTiming> = match steps {
                Some(s) => serde_json::from_str(&s).map_err(|e| bad(8, format!("steps: {e}")))?,
                None => Vec::new(),
            };
            Ok(EventRecord {
                id: r.get(0)?,
                machine_id: r.get(1)?,
                at: r.get(2)?,
                kind: r.get(3)?,
                from_status: parse_status(4)?,
                to_status: parse_status(5)?,
                operation_id: r.get(6)?,
                message: r.get(7)?,
                steps,
            })
        })
        .map_err(|e| StoreError::sql("loading events", e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::sql("reading an event row", e))
}

pub(super) fn load_journal(
    conn: &Connection,
    machine_id: &str,
) -> Result<Vec<(String, String)>, StoreError> {
    let mut stmt = conn
        .prepare("SELECT step, phase FROM steps WHERE machine_id = ?1 ORDER BY id")
        .map_err(|e| StoreError::sql("loading the step journal", e))?;
    let rows = stmt
        .query_map(params![machine_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(|e| StoreError::sql("loading the step journal", e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::sql("reading a journal row", e))
}

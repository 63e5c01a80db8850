//! Snapshot rows: what a snapshot is, where its life stands, and who rests
//! on it. The files live under `<data dir>/snapshots/<id>/` (the machine
//! run makes them, `lifecycle::snapshots` removes them); this module only
//! keeps the rows, inside the writer's transaction when they decide
//! anything.

use hyperfleet_api::{Snapshot, SnapshotStatus, VmmKind};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, WriteCtx};
use crate::util::rfc3339;

/// Why a snapshot exists: asked for by a user, made for a fork (deleted
/// as soon as the copies exist), or a template of a freshly booted guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    User,
    Fork,
    Template,
}

impl SnapshotKind {
    fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::User => "user",
            SnapshotKind::Fork => "fork",
            SnapshotKind::Template => "template",
        }
    }

    fn parse(s: &str) -> Option<SnapshotKind> {
        [
            SnapshotKind::User,
            SnapshotKind::Fork,
            SnapshotKind::Template,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// What a snapshot holds besides its identity (the row's `data` column).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotData {
    pub memory: bool,
    pub size_bytes: u64,
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    pub image: Option<String>,
    pub vmm: VmmKind,
    /// The size of the disk machines made from it get (disk quotas).
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    #[serde(default)]
    pub pause_ms: Option<f64>,
    #[serde(default)]
    pub error_message: Option<String>,
    /// Templates: the key they serve (`lifecycle::templates`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_key: Option<String>,
    /// The OCI image at the bottom of its disk chain, when the machine was
    /// made from one (machines made from the snapshot rest on it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<crate::images::MachineImage>,
    /// The main process and restart policy of the machine it was taken
    /// of; machines made from it keep them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<super::MainProcess>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<hyperfleet_api::RestartPolicy>,
}

/// One snapshot's row.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRecord {
    pub id: String,
    pub tenant: String,
    pub name: Option<String>,
    pub machine_id: String,
    pub status: SnapshotStatus,
    pub kind: SnapshotKind,
    /// The snapshot under this one's disk (its chain), if any.
    pub base: Option<String>,
    pub data: SnapshotData,
    pub created_at: i64,
    pub updated_at: i64,
}

impl SnapshotRecord {
    /// The API view; `used_by` counts the machines made from it.
    pub fn to_api(&self, used_by: u64) -> Snapshot {
        Snapshot {
            id: self.id.clone(),
            name: self.name.clone(),
            machine_id: self.machine_id.clone(),
            status: self.status,
            memory: self.data.memory,
            size_bytes: self.data.size_bytes,
            vcpu_count: self.data.vcpu_count,
            mem_size_mib: self.data.mem_size_mib,
            image: self.data.image.clone(),
            vmm: self.data.vmm,
            pause_ms: self.data.pause_ms,
            used_by,
            error_message: self.data.error_message.clone(),
            created_at: rfc3339(self.created_at),
        }
    }
}

const COLUMNS: &str =
    "id, tenant, name, machine_id, status, kind, base_snapshot_id, data, created_at, updated_at";

fn bad(col: usize, msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        rusqlite::types::Type::Text,
        Box::<dyn std::error::Error + Send + Sync>::from(msg),
    )
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<SnapshotRecord> {
    let status: String = r.get(4)?;
    let kind: String = r.get(5)?;
    let data: String = r.get(7)?;
    Ok(SnapshotRecord {
        id: r.get(0)?,
        tenant: r.get(1)?,
        name: r.get(2)?,
        machine_id: r.get(3)?,
        status: SnapshotStatus::parse(&status)
            .ok_or_else(|| bad(4, format!("unknown snapshot status '{status}'")))?,
        kind: SnapshotKind::parse(&kind)
            .ok_or_else(|| bad(5, format!("unknown snapshot kind '{kind}'")))?,
        base: r.get(6)?,
        data: serde_json::from_str(&data).map_err(|e| bad(7, format!("snapshot data: {e}")))?,
        created_at: r.get(8)?,
        updated_at: r.get(9)?,
    })
}

fn load(conn: &Connection, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM snapshots WHERE id = ?1"))
        .and_then(|mut s| s.query_row(params![id], from_row).optional())
        .map_err(|e| StoreError::sql(&format!("reading snapshot {id}"), e))
}

fn load_named(
    conn: &Connection,
    tenant: &str,
    id_or_name: &str,
) -> Result<Option<SnapshotRecord>, StoreError> {
    if let Some(s) = load(conn, id_or_name)?.filter(|s| s.tenant == tenant) {
        return Ok(Some(s));
    }
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM snapshots WHERE tenant = ?1 AND name = ?2"
    ))
    .and_then(|mut s| {
        s.query_row(params![tenant, id_or_name], from_row)
            .optional()
    })
    .map_err(|e| StoreError::sql(&format!("reading snapshot {id_or_name}"), e))
}

fn query(
    conn: &Connection,
    sql: &str,
    args: &[&dyn rusqlite::ToSql],
    what: &str,
) -> Result<Vec<SnapshotRecord>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM snapshots {sql}"))
        .map_err(|e| StoreError::sql(what, e))?;
    let rows = stmt
        .query_map(args, from_row)
        .map_err(|e| StoreError::sql(what, e))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::sql(what, e))
}

/// Machines that rest on snapshot `id`, and snapshots whose disk does.
fn users(conn: &Connection, id: &str) -> Result<(u64, u64), StoreError> {
    let what = format!("counting the users of snapshot {id}");
    let machines: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM machines WHERE json_extract(spec, '$.base_snapshot') = ?1",
        )
        .and_then(|mut s| s.query_row(params![id], |r| r.get(0)))
        .map_err(|e| StoreError::sql(&what, e))?;
    let snapshots: i64 = conn
        .prepare_cached("SELECT count(*) FROM snapshots WHERE base_snapshot_id = ?1")
        .and_then(|mut s| s.query_row(params![id], |r| r.get(0)))
        .map_err(|e| StoreError::sql(&what, e))?;
    Ok((machines.max(0) as u64, snapshots.max(0) as u64))
}

fn write(conn: &Connection, s: &SnapshotRecord) -> Result<(), StoreError> {
    // A struct of strings and numbers always serialises.
    let data = serde_json::to_string(&s.data).expect("snapshot data serialises");
    conn.prepare_cached(&format!(
        "INSERT INTO snapshots ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
         ON CONFLICT (id) DO UPDATE SET name = excluded.name, status = excluded.status, \
         base_snapshot_id = excluded.base_snapshot_id, data = excluded.data, \
         updated_at = excluded.updated_at"
    ))
    .and_then(|mut st| {
        st.execute(params![
            s.id,
            s.tenant,
            s.name,
            s.machine_id,
            s.status.as_str(),
            s.kind.as_str(),
            s.base,
            data,
            s.created_at,
            s.updated_at
        ])
    })
    .map_err(|e| match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
        {
            StoreError::SnapshotNameTaken(s.name.clone().unwrap_or_default())
        }
        _ => StoreError::sql(&format!("recording snapshot {}", s.id), e),
    })?;
    Ok(())
}

impl WriteCtx<'_> {
    /// Inserts or updates snapshot `s` (its id, tenant, machine, kind and
    /// creation time never change). A name another snapshot of the tenant
    /// has is [`StoreError::Conflict`].
    pub fn put_snapshot(&mut self, s: &SnapshotRecord) -> Result<(), StoreError> {
        write(self.conn(), s)
    }

    pub fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        load(self.conn(), id)
    }

    /// Snapshot `id_or_name` of `tenant`.
    pub fn snapshot_named(
        &self,
        tenant: &str,
        id_or_name: &str,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        load_named(self.conn(), tenant, id_or_name)
    }

    /// How many machines and snapshots rest on snapshot `id`.
    pub fn snapshot_users(&self, id: &str) -> Result<(u64, u64), StoreError> {
        users(self.conn(), id)
    }

    pub fn delete_snapshot_row(&mut self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM snapshots WHERE id = ?1", params![id])
            .map_err(|e| StoreError::sql(&format!("deleting snapshot {id}"), e))?;
        Ok(())
    }
}

impl Store {
    /// Snapshot `id_or_name` of `tenant`, with how many machines use it.
    pub fn snapshot(
        &self,
        tenant: &str,
        id_or_name: &str,
    ) -> Result<Option<(SnapshotRecord, u64)>, StoreError> {
        self.read(|c| {
            let Some(s) = load_named(c, tenant, id_or_name)? else {
                return Ok(None);
            };
            let (machines, _) = users(c, &s.id)?;
            Ok(Some((s, machines)))
        })
    }

    /// Snapshot `id` of any tenant.
    pub fn snapshot_by_id(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        self.read(|c| load(c, id))
    }

    /// `tenant`'s user-visible snapshots (not `deleting`, not the hidden
    /// fork and template ones) in creation order, with their users.
    pub fn list_snapshots(&self, tenant: &str) -> Result<Vec<(SnapshotRecord, u64)>, StoreError> {
        self.read(|c| {
            let list = query(
                c,
                "WHERE tenant = ?1 AND kind = 'user' AND status != 'deleting' \
                 ORDER BY created_at, id",
                &[&tenant],
                "listing snapshots",
            )?;
            list.into_iter()
                .map(|s| {
                    let (m, _) = users(c, &s.id)?;
                    Ok((s, m))
                })
                .collect()
        })
    }

    /// Every snapshot row (the startup sweep; there are few).
    pub fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.read(|c| query(c, "ORDER BY created_at, id", &[], "listing all snapshots"))
    }

    /// The ready template for `key`, if any.
    pub fn template(&self, key: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        self.read(|c| {
            Ok(query(
                c,
                "WHERE kind = 'template' AND status = 'ready' \
                 AND json_extract(data, '$.template_key') = ?1 ORDER BY created_at DESC LIMIT 1",
                &[&key],
                "looking for a template",
            )?
            .pop())
        })
    }
}

//! Image records (`images`, migration 8) and their stored events
//! (`image_events`): tenant-scoped rows over the shared, content-addressed
//! image store of `crate::images`. Live download progress is not stored
//! (the image service keeps it in memory); the layers' totals and the
//! milestones are.

use hyperfleet_api::{Image, ImageEvent, ImageLayer, ImageRunConfig, ImageStatus};
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{Store, StoreError, WriteCtx};
use crate::util::rfc3339;

/// Migration 8's SQL (listed in `schema::MIGRATIONS`).
pub(super) const MIGRATION: &str = r#"
    CREATE TABLE images (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        ref TEXT,
        source TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pulling', 'ready', 'failed')),
        digest TEXT,
        manifest_digest TEXT,
        size_bytes INTEGER,
        config TEXT,
        layers TEXT NOT NULL DEFAULT '[]',
        error TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX images_tenant ON images(tenant, created_at, id);
    CREATE INDEX images_tenant_ref ON images(tenant, ref);
    CREATE INDEX images_digest ON images(digest);
    CREATE TABLE image_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        image_id TEXT NOT NULL,
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        message TEXT,
        detail TEXT
    ) STRICT;
    CREATE INDEX image_events_image ON image_events(image_id, id);
"#;

/// One image record.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRow {
    pub id: String,
    pub tenant: String,
    pub reference: Option<String>,
    pub source: String,
    pub status: ImageStatus,
    pub digest: Option<String>,
    pub manifest_digest: Option<String>,
    pub size_bytes: Option<u64>,
    pub config: Option<ImageRunConfig>,
    pub layers: Vec<ImageLayer>,
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl ImageRow {
    pub fn new(id: String, tenant: &str, reference: Option<String>, source: &str) -> Self {
        let now = crate::util::now_ms();
        ImageRow {
            id,
            tenant: tenant.to_string(),
            reference,
            source: source.to_string(),
            status: ImageStatus::Pulling,
            digest: None,
            manifest_digest: None,
            size_bytes: None,
            config: None,
            layers: Vec::new(),
            error: None,
            created_at: now,
            updated_at: now,
        }
    }

    pub fn to_api(&self) -> Image {
        Image {
            id: self.id.clone(),
            reference: self.reference.clone(),
            source: self.source.clone(),
            status: self.status,
            digest: self.digest.clone(),
            manifest_digest: self.manifest_digest.clone(),
            size_bytes: self.size_bytes,
            layers: self.layers.clone(),
            config: self.config.clone(),
            error: self.error.clone(),
            created_at: rfc3339(self.created_at),
            updated_at: rfc3339(self.updated_at),
        }
    }
}

/// A stored image event.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEventRow {
    pub id: i64,
    pub image_id: String,
    pub at: i64,
    pub kind: String,
    pub message: Option<String>,
    pub detail: Option<serde_json::Value>,
}

impl ImageEventRow {
    pub fn to_api(&self) -> ImageEvent {
        ImageEvent {
            id: self.id,
            image_id: self.image_id.clone(),
            at: rfc3339(self.at),
            kind: self.kind.clone(),
            message: self.message.clone(),
            detail: self.detail.clone(),
        }
    }
}

const COLUMNS: &str = "id, tenant, ref, source, status, digest, manifest_digest, size_bytes, \
                       config, layers, error, created_at, updated_at";

fn from_row(r: &Row<'_>) -> rusqlite::Result<ImageRow> {
    let status: String = r.get(4)?;
    let config: Option<String> = r.get(8)?;
    let layers: String = r.get(9)?;
    Ok(ImageRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        reference: r.get(2)?,
        source: r.get(3)?,
        status: ImageStatus::parse(&status).unwrap_or(ImageStatus::Failed),
        digest: r.get(5)?,
        manifest_digest: r.get(6)?,
        size_bytes: r.get::<_, Option<i64>>(7)?.map(|n| n.max(0) as u64),
        config: config.and_then(|c| serde_json::from_str(&c).ok()),
        layers: serde_json::from_str(&layers).unwrap_or_default(),
        error: r.get(10)?,
        created_at: r.get(11)?,
        updated_at: r.get(12)?,
    })
}

fn sql(what: &str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError::sql(what, e)
}

fn query(
    conn: &Connection,
    where_: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<ImageRow>, StoreError> {
    let q = format!("SELECT {COLUMNS} FROM images WHERE {where_}");
    let mut s = conn.prepare_cached(&q).map_err(sql("reading images"))?;
    let rows = s
        .query_map(p, from_row)
        .map_err(sql("reading images"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql("reading images"))?;
    Ok(rows)
}

impl WriteCtx<'_> {
    /// Inserts or replaces image record `row`.
    pub fn put_image(&mut self, row: &ImageRow) -> Result<(), StoreError> {
        let config = row
            .config
            .as_ref()
            .map(|c| serde_json::to_string(c).unwrap_or_default());
        let layers = serde_json::to_string(&row.layers).unwrap_or_else(|_| "[]".into());
        self.conn()
            .execute(
                &format!(
                    "INSERT OR REPLACE INTO images ({COLUMNS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
                ),
                params![
                    row.id,
                    row.tenant,
                    row.reference,
                    row.source,
                    row.status.as_str(),
                    row.digest,
                    row.manifest_digest,
                    row.size_bytes.map(|n| n.min(i64::MAX as u64) as i64),
                    config,
                    layers,
                    row.error,
                    row.created_at,
                    row.updated_at
                ],
            )
            .map(drop)
            .map_err(sql("recording an image"))
    }

    /// The current record of image `id`, this batch's changes included.
    pub fn image(&self, id: &str) -> Result<Option<ImageRow>, StoreError> {
        Ok(query(self.conn(), "id = ?1", params![id])?.pop())
    }

    /// Removes image `id`'s record and events.
    pub fn delete_image(&mut self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM images WHERE id = ?1", params![id])
            .and_then(|_| {
                self.conn()
                    .execute("DELETE FROM image_events WHERE image_id = ?1", params![id])
            })
            .map(drop)
            .map_err(sql("removing an image"))
    }

    /// Records an event of image `image_id`; returns its id.
    pub fn append_image_event(
        &mut self,
        image_id: &str,
        kind: &str,
        message: Option<&str>,
        detail: Option<&serde_json::Value>,
    ) -> Result<ImageEventRow, StoreError> {
        let at = crate::util::now_ms();
        let detail_s = detail.map(|d| d.to_string());
        self.conn()
            .execute(
                "INSERT INTO image_events (image_id, at, kind, message, detail) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![image_id, at, kind, message, detail_s],
            )
            .map_err(sql("recording an image event"))?;
        Ok(ImageEventRow {
            id: self.conn().last_insert_rowid(),
            image_id: image_id.to_string(),
            at,
            kind: kind.to_string(),
            message: message.map(str::to_string),
            detail: detail.cloned(),
        })
    }

    /// Machines (of any tenant) whose spec names image record `id` or
    /// built image `digest`.
    pub fn machines_using_image(
        &self,
        id: Option<&str>,
        digest: Option<&str>,
    ) -> Result<u64, StoreError> {
        self.conn()
            .query_row(
                "SELECT count(*) FROM machines WHERE json_extract(spec, '$.oci.image_id') = ?1 \
                 OR json_extract(spec, '$.oci.digest') = ?2",
                params![id, digest],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(sql("counting the machines using an image"))
    }

    /// Records (of any tenant) of built image `digest`.
    pub fn image_records_of(&self, digest: &str) -> Result<u64, StoreError> {
        self.conn()
            .query_row(
                "SELECT count(*) FROM images WHERE digest = ?1",
                params![digest],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(sql("counting an image's records"))
    }
}

impl Store {
    /// Image `id` of `tenant`.
    pub fn image(&self, tenant: &str, id: &str) -> Result<Option<ImageRow>, StoreError> {
        self.read(|c| Ok(query(c, "id = ?1 AND tenant = ?2", params![id, tenant])?.pop()))
    }

    /// `tenant`'s images, oldest first.
    pub fn images(&self, tenant: &str) -> Result<Vec<ImageRow>, StoreError> {
        self.read(|c| query(c, "tenant = ?1 ORDER BY created_at, id", params![tenant]))
    }

    /// `tenant`'s newest ready record of reference `reference`.
    pub fn ready_image_by_ref(
        &self,
        tenant: &str,
        reference: &str,
    ) -> Result<Option<ImageRow>, StoreError> {
        self.read(|c| {
            Ok(query(
                c,
                "tenant = ?1 AND ref = ?2 AND status = 'ready' ORDER BY created_at DESC LIMIT 1",
                params![tenant, reference],
            )?
            .pop())
        })
    }

    /// Every record still `pulling` (at startup: pulls a crash cut short).
    pub fn pulling_images(&self) -> Result<Vec<ImageRow>, StoreError> {
        self.read(|c| query(c, "status = 'pulling'", params![]))
    }

    /// Image `id`'s stored events after event `after`.
    pub fn image_events(
        &self,
        id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<ImageEventRow>, StoreError> {
        self.read(|c| {
            let mut s = c
                .prepare_cached(
                    "SELECT id, image_id, at, kind, message, detail FROM image_events \
                     WHERE image_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                )
                .map_err(sql("reading image events"))?;
            let rows = s
                .query_map(params![id, after, limit as i64], |r| {
                    let detail: Option<String> = r.get(5)?;
                    Ok(ImageEventRow {
                        id: r.get(0)?,
                        image_id: r.get(1)?,
                        at: r.get(2)?,
                        kind: r.get(3)?,
                        message: r.get(4)?,
                        detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
                    })
                })
                .map_err(sql("reading image events"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql("reading image events"))?;
            Ok(rows)
        })
    }

    /// Whether a record of image `digest` exists (any tenant).
    pub fn image_digest_known(&self, digest: &str) -> Result<bool, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT 1 FROM images WHERE digest = ?1 LIMIT 1",
                params![digest],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
            .map_err(sql("looking up an image digest"))
        })
    }
}

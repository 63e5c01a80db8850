//! The image service the API and machine creation use: tenant records
//! (`store::images`) over the shared image store, pulls run in the
//! background with their events stored and broadcast (download progress is
//! broadcast and kept in memory only), imports, deletes, and resolving the
//! `image` of a machine create to a built image.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

use hyperfleet_api::{
    ImageEvent, ImageLayer, ImageRunConfig, ImageStatus, PullImageRequest, RegistryAuth,
};
use serde_json::json;
use tokio::sync::{broadcast, mpsc};

use super::registry::{self, Auth, PullRequest};
use super::{archive, BuiltImage, ImageError, ImageLimits, ImageStore, Progress, PullEvent};
use crate::store::{ImageRow, Store, StoreError};

/// Errors of the image service boundary.
#[derive(Debug, thiserror::Error)]
pub enum ImageServiceError {
    #[error("no image with id {0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("image {id} is used by {machines} machine(s); delete them first")]
    InUse { id: String, machines: u64 },
    #[error("image {0} is still being pulled; delete it once it is ready or failed")]
    Pulling(String),
    #[error("image {id} failed: {reason}")]
    Failed { id: String, reason: String },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The image service; one per daemon.
pub struct ImageService {
    pub store: Arc<ImageStore>,
    db: Store,
    events: broadcast::Sender<Arc<ImageEvent>>,
    /// Layer progress of pulls in progress, by image id.
    live: Mutex<HashMap<String, Vec<ImageLayer>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registries on loopback are spoken to over plain HTTP, as Docker does.
fn loopback_registry(reference: &str) -> bool {
    let host = reference.split('/').next().unwrap_or("");
    reference.contains('/')
        && (host.starts_with("localhost") || host.starts_with("127.") || host.starts_with("[::1]"))
}

impl ImageService {
    /// Opens the image store under `data_dir` and cleans up after a crash:
    /// work directories and blobs of unfinished pulls are removed, and
    /// records still `pulling` become `failed` (pull again; nothing of the
    /// interrupted pull is kept).
    pub async fn open(
        data_dir: &Path,
        db: Store,
        limits: ImageLimits,
    ) -> Result<Arc<ImageService>, ImageServiceError> {
        let store = Arc::new(ImageStore::open(data_dir, limits)?);
        let swept = store.sweep()?;
        let blobs = store.root().join("blobs/sha256");
        // Finished builds remove their blobs, so any left belong to pulls
        // that did not finish.
        if let Ok(list) = std::fs::read_dir(&blobs) {
            for e in list.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let (events, _) = broadcast::channel(4096);
        let svc = Arc::new(ImageService {
            store,
            db,
            events,
            live: Mutex::new(HashMap::new()),
        });
        for mut row in svc.db.pulling_images()? {
            row.status = ImageStatus::Failed;
            row.error = Some("the daemon stopped during the pull; pull the image again".into());
            row.updated_at = crate::util::now_ms();
            let reason = row.error.clone();
            svc.db
                .write(move |ctx| {
                    ctx.put_image(&row)?;
                    ctx.append_image_event(&row.id, "failed", reason.as_deref(), None)
                        .map(drop)
                })
                .await?;
        }
        if swept > 0 {
            tracing::info!(swept, "removed unfinished image work");
        }
        Ok(svc)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ImageEvent>> {
        self.events.subscribe()
    }

    /// A record with the live progress of its pull, if one runs.
    pub fn with_progress(&self, mut row: ImageRow) -> ImageRow {
        if let Some(l) = lock(&self.live).get(&row.id) {
            row.layers = l.clone();
        }
        row
    }

    /// `POST /images`: records the image (`pulling`) and pulls it in the
    /// background.
    pub async fn start_pull(
        self: &Arc<Self>,
        tenant: &str,
        req: PullImageRequest,
    ) -> Result<ImageRow, ImageServiceError> {
        registry::parse_reference(&req.reference)?;
        let row = ImageRow::new(
            crate::util::random_id("img_", 16),
            tenant,
            Some(req.reference.clone()),
            "registry",
        );
        let r = row.clone();
        let detail = json!({"ref": req.reference});
        self.db
            .write(move |ctx| {
                ctx.put_image(&r)?;
                ctx.append_image_event(&r.id, "pulling", None, Some(&detail))
                    .map(drop)
            })
            .await?;
        let pull = PullRequest {
            insecure: req.insecure || loopback_registry(&req.reference),
            reference: req.reference,
            auth: match req.auth {
                None => Auth::Anonymous,
                Some(RegistryAuth::Basic { username, password }) => {
                    Auth::Basic { username, password }
                }
                Some(RegistryAuth::Token { token }) => Auth::Token(token),
            },
        };
        let svc = self.clone();
        let id = row.id.clone();
        tokio::spawn(async move {
            let (progress, sink) = svc.progress_sink(&id);
            let res = registry::pull(svc.store.clone(), &pull, progress).await;
            let _ = sink.await;
            svc.finish(&id, res).await;
        });
        Ok(row)
    }

    /// `POST /images/import`: the archive is read from `body` as it arrives;
    /// returns the finished record (`ready` or `failed`).
    pub async fn import(
        self: &Arc<Self>,
        tenant: &str,
        body: impl Read + Send + 'static,
    ) -> Result<ImageRow, ImageServiceError> {
        let row = ImageRow::new(crate::util::random_id("img_", 16), tenant, None, "import");
        let r = row.clone();
        self.db
            .write(move |ctx| {
                ctx.put_image(&r)?;
                ctx.append_image_event(&r.id, "pulling", Some("importing an archive"), None)
                    .map(drop)
            })
            .await?;
        let (progress, sink) = self.progress_sink(&row.id);
        let store = self.store.clone();
        let res = tokio::task::spawn_blocking(move || archive::import(store, body, &progress))
            .await
            .unwrap_or_else(|e| Err(ImageError::Build(format!("the import task failed: {e}"))));
        let _ = sink.await;
        self.finish(&row.id, res).await;
        self.db
            .image(tenant, &row.id)?
            .ok_or_else(|| ImageServiceError::NotFound(row.id.clone()))
    }

    /// A progress callback for image `id` and the task that stores and
    /// broadcasts what it reports, in order; the task ends when the
    /// callback is dropped.
    fn progress_sink(self: &Arc<Self>, id: &str) -> (Progress, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<PullEvent>();
        let svc = self.clone();
        let id = id.to_string();
        let task = tokio::spawn(async move {
            let mut last_id = 0;
            while let Some(ev) = rx.recv().await {
                last_id = svc.record(&id, ev, last_id).await;
            }
        });
        (
            Arc::new(move |ev| {
                let _ = tx.send(ev);
            }),
            task,
        )
    }

    /// Applies one pull event to image `id`; returns the id of the last
    /// stored event.
    async fn record(&self, id: &str, ev: PullEvent, last_id: i64) -> i64 {
        let detail = serde_json::to_value(&ev).unwrap_or_default();
        let kind = detail["kind"].as_str().unwrap_or("progress").to_string();
        {
            let mut live = lock(&self.live);
            let layers = live.entry(id.to_string()).or_default();
            match &ev {
                PullEvent::Resolved { layers: l, .. } => {
                    *layers = l
                        .iter()
                        .map(|l| ImageLayer {
                            digest: l.digest.clone(),
                            size: l.size,
                            done: 0,
                        })
                        .collect();
                }
                PullEvent::LayerProgress { layer, done, .. } => {
                    if let Some(l) = layers.get_mut(*layer) {
                        l.done = *done;
                    }
                }
                PullEvent::LayerDone { layer, .. } => {
                    if let Some(l) = layers.get_mut(*layer) {
                        l.done = l.size;
                    }
                }
                _ => {}
            }
        }
        if let PullEvent::LayerProgress { .. } = ev {
            let _ = self.events.send(Arc::new(ImageEvent {
                id: last_id,
                image_id: id.to_string(),
                at: crate::util::rfc3339(crate::util::now_ms()),
                kind,
                message: None,
                detail: Some(detail),
            }));
            return last_id;
        }
        let message = match &ev {
            PullEvent::Reused { .. } => {
                Some("the image's filesystem is already built: no image work".to_string())
            }
            _ => None,
        };
        let (iid, resolved) = (id.to_string(), ev.clone());
        let layers = lock(&self.live).get(id).cloned().unwrap_or_default();
        let stored = self
            .db
            .write(move |ctx| {
                if let Some(mut row) = ctx.image(&iid)? {
                    if let PullEvent::Resolved {
                        digest,
                        manifest_digest,
                        ..
                    } = &resolved
                    {
                        row.digest = Some(digest.clone());
                        row.manifest_digest = manifest_digest.clone();
                    }
                    row.layers = layers;
                    row.updated_at = crate::util::now_ms();
                    ctx.put_image(&row)?;
                }
                ctx.append_image_event(&iid, &kind, message.as_deref(), Some(&detail))
            })
            .await;
        match stored {
            Ok(e) => {
                let id = e.id;
                let _ = self.events.send(Arc::new(e.to_api()));
                id
            }
            Err(e) => {
                tracing::warn!(image = id, "recording an image event failed: {e}");
                last_id
            }
        }
    }

    /// Records the end of a pull or import.
    async fn finish(&self, id: &str, res: Result<BuiltImage, ImageError>) {
        lock(&self.live).remove(id);
        let iid = id.to_string();
        let failed_digest = res.is_err();
        let out = self
            .db
            .write(move |ctx| {
                let Some(mut row) = ctx.image(&iid)? else {
                    return Ok(None);
                };
                row.updated_at = crate::util::now_ms();
                let (kind, message) = match &res {
                    Ok(b) => {
                        row.status = ImageStatus::Ready;
                        row.digest = Some(b.digest.clone());
                        row.size_bytes = Some(b.size_bytes);
                        row.config = Some(ImageRunConfig {
                            entrypoint: b.run.entrypoint.clone(),
                            cmd: b.run.cmd.clone(),
                            env: b.run.env.clone(),
                            workdir: b.run.workdir.clone(),
                            user: b.run.user.clone(),
                        });
                        for l in &mut row.layers {
                            l.done = l.size;
                        }
                        ("ready", None)
                    }
                    Err(e) => {
                        row.status = ImageStatus::Failed;
                        row.error = Some(e.to_string());
                        ("failed", row.error.clone())
                    }
                };
                ctx.put_image(&row)?;
                let ev = ctx.append_image_event(&iid, kind, message.as_deref(), None)?;
                Ok(Some(ev))
            })
            .await;
        match out {
            Ok(Some(ev)) => {
                let _ = self.events.send(Arc::new(ev.to_api()));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(image = id, "recording the end of a pull failed: {e}"),
        }
        if failed_digest {
            tracing::info!(image = id, "image pull failed");
        }
    }

    /// `DELETE /images/{id}`: refused (409) while a machine was made from
    /// the record; the image's filesystem goes with its last record, unless
    /// a machine of any tenant still uses it.
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<(), ImageServiceError> {
        let row = self
            .db
            .image(tenant, id)?
            .ok_or_else(|| ImageServiceError::NotFound(id.to_string()))?;
        // Its pull would build a filesystem no record holds.
        if row.status == ImageStatus::Pulling {
            return Err(ImageServiceError::Pulling(id.to_string()));
        }
        let (iid, digest) = (row.id.clone(), row.digest.clone());
        let removable = self
            .db
            .write(move |ctx| {
                let users = ctx.machines_using_image(Some(&iid), None)?;
                if users > 0 {
                    return Err(StoreError::Rejected(format!("in use:{users}")));
                }
                ctx.delete_image(&iid)?;
                Ok(match &digest {
                    Some(d) => {
                        ctx.image_records_of(d)? == 0
                            && ctx.machines_using_image(None, Some(d))? == 0
                    }
                    None => false,
                })
            })
            .await
            .map_err(|e| match e {
                StoreError::Rejected(m) if m.starts_with("in use:") => ImageServiceError::InUse {
                    id: id.to_string(),
                    machines: m[7..].parse().unwrap_or(1),
                },
                e => e.into(),
            })?;
        let _ = self.events.send(Arc::new(ImageEvent {
            id: i64::MAX,
            image_id: id.to_string(),
            at: crate::util::rfc3339(crate::util::now_ms()),
            kind: "deleted".into(),
            message: None,
            detail: None,
        }));
        if removable {
            if let Some(d) = &row.digest {
                self.store.remove(d)?;
            }
        }
        Ok(())
    }

    /// Waits until image `id` is no longer `pulling`.
    async fn wait(&self, tenant: &str, id: &str) -> Result<ImageRow, ImageServiceError> {
        let mut rx = self.subscribe();
        loop {
            let row = self
                .db
                .image(tenant, id)?
                .ok_or_else(|| ImageServiceError::NotFound(id.to_string()))?;
            if row.status != ImageStatus::Pulling {
                return Ok(row);
            }
            loop {
                match rx.recv().await {
                    Ok(e) if e.image_id == id && (e.kind == "ready" || e.kind == "failed") => break,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(ImageServiceError::Invalid("the daemon is stopping".into()))
                    }
                }
            }
        }
    }

    /// The built image a machine create names by record id (`img_…`, of
    /// the tenant) or by reference: a ready record of the tenant with that
    /// reference is used as is (no registry traffic); otherwise the image
    /// is pulled first (the slow create). Registries on loopback are
    /// spoken to over plain HTTP; others need a prior `POST /images` for
    /// options such as credentials.
    pub async fn resolve_for_machine(
        self: &Arc<Self>,
        tenant: &str,
        image: &str,
    ) -> Result<(ImageRow, BuiltImage), ImageServiceError> {
        let row = if image.starts_with("img_") {
            self.wait(tenant, image).await?
        } else {
            match self.db.ready_image_by_ref(tenant, image)? {
                Some(r)
                    if r.digest
                        .as_deref()
                        .and_then(|d| self.store.get(d))
                        .is_some() =>
                {
                    let (id, digest) = (r.id.clone(), r.digest.clone());
                    let detail = json!({"digest": digest});
                    let ev = self
                        .db
                        .write(move |ctx| {
                            ctx.append_image_event(
                                &id,
                                "used",
                                Some("a machine was made from the built image: no image work"),
                                Some(&detail),
                            )
                        })
                        .await?;
                    let _ = self.events.send(Arc::new(ev.to_api()));
                    r
                }
                _ => {
                    let started = self
                        .start_pull(
                            tenant,
                            PullImageRequest {
                                reference: image.to_string(),
                                insecure: false,
                                auth: None,
                            },
                        )
                        .await?;
                    self.wait(tenant, &started.id).await?
                }
            }
        };
        match row.status {
            ImageStatus::Ready => {}
            _ => {
                return Err(ImageServiceError::Failed {
                    id: row.id.clone(),
                    reason: row.error.clone().unwrap_or_else(|| "not ready".into()),
                })
            }
        }
        let built = row
            .digest
            .as_deref()
            .and_then(|d| self.store.get(d))
            .ok_or_else(|| ImageServiceError::Failed {
                id: row.id.clone(),
                reason: "its filesystem is missing on the host".into(),
            })?;
        Ok((row, built))
    }
}

/// The `image` of a machine create as the machine's spec records it.
pub async fn machine_image(
    svc: &Arc<ImageService>,
    tenant: &str,
    image: &str,
) -> Result<(super::MachineImage, super::RunConfig), ImageServiceError> {
    if image.is_empty() || image.len() > 512 {
        return Err(ImageServiceError::Invalid(
            "image: an image id or reference of 1 to 512 characters".into(),
        ));
    }
    let (row, built) = svc.resolve_for_machine(tenant, image).await?;
    Ok((
        super::MachineImage {
            image_id: row.id,
            reference: row.reference,
            digest: built.digest,
            disk_bytes: built.size_bytes,
        },
        built.run,
    ))
}

//! Snapshots' lives outside the machine run that takes them: asking for
//! one, deleting one, making machines from one, forks, and removing their
//! files exactly once.
//!
//! A snapshot's files live in `<data dir>/snapshots/<id>/` (the layout of
//! `vmm::image`). The machine's run takes it as a journaled step
//! (`take_snapshot`) and marks the row `ready` or `failed` in the commit
//! that ends the step. A snapshot is *used* while a machine rests on it
//! (`spec.base_snapshot`: the machine's disk is layered over the
//! snapshot's, and its RAM may map the snapshot's) or while another
//! snapshot's disk chain goes through it. Deleting a used snapshot marks it
//! `deleting`; [`collect`] removes the files of every `deleting` or
//! `failed` snapshot nobody uses, then its row (a daemon killed in between
//! finds the row and removes the rest again), and is run after each delete
//! of a machine or snapshot and at startup.

use std::path::{Path, PathBuf};

use hyperfleet_api::SnapshotStatus;

use super::run::RunCtx;
use crate::store::{CachedMachine, MachineRecord, SnapshotRecord, Store, StoreError};
use crate::vmm::{image::ImageDir, BaseImage};

/// Disk chains deeper than this are flattened when a snapshot is taken
/// (its disk rebased onto the rootfs), so reads never walk far.
pub const MAX_LAYERS: usize = 4;

/// Snapshot `id`'s directory.
pub fn dir(snapshots_dir: &Path, id: &str) -> PathBuf {
    snapshots_dir.join(id)
}

/// The snapshot chain from `id` down: `id`, its base, its base's base...
fn chain(store: &Store, id: &str) -> Vec<SnapshotRecord> {
    let mut out: Vec<SnapshotRecord> = Vec::new();
    let mut next = Some(id.to_string());
    while let Some(id) = next.take() {
        if out.iter().any(|s| s.id == id) || out.len() > 64 {
            break; // a cycle cannot be made; do not loop if one were
        }
        match store.snapshot_by_id(&id) {
            Ok(Some(s)) => {
                next = s.base.clone();
                out.push(s);
            }
            Ok(None) => {
                tracing::error!(snapshot = %id, "a machine's base snapshot has no record");
                break;
            }
            Err(e) => {
                tracing::warn!(snapshot = %id, error = %e, "cannot read a base snapshot");
                break;
            }
        }
    }
    out
}

/// What a machine resting on snapshot `id` needs to launch: the image its
/// first start restores and the disk layers under its overlay.
pub(crate) fn base_image(ctx: &RunCtx, id: &str) -> Option<BaseImage> {
    let chain = chain(&ctx.store, id);
    let top = chain.first()?;
    Some(BaseImage {
        id: id.to_string(),
        template: top.kind == SnapshotKind::Template,
        dir: dir(&ctx.snapshots_dir, id),
        layers: chain
            .iter()
            .map(|s| ImageDir(dir(&ctx.snapshots_dir, &s.id)).disk())
            .collect(),
        memory: top.data.memory,
    })
}

/// Removes the files and rows of every snapshot that is `deleting` or
/// `failed` and used by nobody, repeating while removing one frees
/// another. Returns how many went.
pub async fn collect(store: &Store, snapshots_dir: &Path) -> Result<usize, StoreError> {
    let mut removed = 0;
    loop {
        let candidates: Vec<SnapshotRecord> = store
            .all_snapshots()?
            .into_iter()
            .filter(|s| matches!(s.status, SnapshotStatus::Deleting))
            .collect();
        let mut progress = false;
        for s in candidates {
            let id = s.id.clone();
            // Decided in the writer: no machine can start resting on it in
            // between, as creates from it check its status there too.
            let free = store
                .write(move |ctx| {
                    let (machines, snapshots) = ctx.snapshot_users(&id)?;
                    Ok(machines == 0 && snapshots == 0)
                })
                .await?;
            if !free {
                continue;
            }
            let d = dir(snapshots_dir, &s.id);
            if let Err(e) = crate::vmm::remove_dir_idempotent(&d).await {
                tracing::warn!(snapshot = %s.id, error = %e, "cannot remove a snapshot's files");
                continue;
            }
            let id = s.id.clone();
            store.write(move |ctx| ctx.delete_snapshot_row(&id)).await?;
            tracing::info!(snapshot = %s.id, "removed a deleted snapshot's files");
            removed += 1;
            progress = true;
        }
        if !progress {
            return Ok(removed);
        }
    }
}

/// Startup: snapshot directories with no row (a crash between making the
/// directory and recording, or after removing the row) are removed.
pub async fn sweep(store: &Store, snapshots_dir: &Path) -> Result<usize, StoreError> {
    let known: std::collections::HashSet<String> =
        store.all_snapshots()?.into_iter().map(|s| s.id).collect();
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(snapshots_dir) else {
        return Ok(0);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if known.contains(&name) {
            continue;
        }
        if crate::vmm::remove_dir_idempotent(&e.path()).await.is_ok() {
            tracing::info!(dir = %e.path().display(), "removed a snapshot directory with no record");
            removed += 1;
        }
    }
    Ok(removed + collect(store, snapshots_dir).await?)
}

/// How a machine made from a snapshot asked for its sizes and backend:
/// what the create request set explicitly (they must match the snapshot).
#[derive(Debug, Clone, Copy, Default)]
pub struct Explicit {
    pub vcpu_count: Option<u32>,
    pub mem_size_mib: Option<u32>,
    pub vmm: Option<hyperfleet_api::VmmKind>,
}

/// How waiting for a snapshot ended.
#[derive(Debug)]
pub enum SnapshotWait {
    /// Ready or failed: the row as it is now.
    Done(SnapshotRecord),
    /// Still being taken at the deadline.
    TimedOut(SnapshotRecord),
}

use super::supervisor::{LifecycleError, Supervisor};
use crate::store::{EventRecord, MachineSpec, SnapshotData, SnapshotKind};
use crate::util::{new_operation_id, new_snapshot_id, now_ms};
use hyperfleet_api::MachineStatus;
use std::sync::Arc;
use std::time::Duration;

impl Supervisor {
    /// Asks machine `machine`'s run to take a snapshot: records it
    /// `creating` and the job on the machine in one commit. Allowed when
    /// the machine is at rest running, paused, suspended or stopped, with
    /// no other snapshot under way.
    pub async fn take_snapshot(
        self: &Arc<Self>,
        tenant: &str,
        machine: &str,
        name: Option<String>,
        kind: SnapshotKind,
    ) -> Result<SnapshotRecord, LifecycleError> {
        self.take_snapshot_keyed(tenant, machine, name, kind, None)
            .await
    }

    async fn take_snapshot_keyed(
        self: &Arc<Self>,
        tenant: &str,
        machine: &str,
        name: Option<String>,
        kind: SnapshotKind,
        template_key: Option<String>,
    ) -> Result<SnapshotRecord, LifecycleError> {
        let store = &self.ctx().store;
        let current = store
            .get(Some(tenant), machine)?
            .ok_or_else(|| LifecycleError::NotFound(machine.to_string()))?;
        let id = current.rec.id.clone();
        let vmm = current.rec.spec.vmm;
        if !self
            .ctx()
            .backends
            .get(&vmm)
            .is_some_and(|b| b.supports_snapshots())
        {
            return Err(LifecycleError::SnapshotConflict(format!(
                "the {vmm} backend does not take snapshots yet (QEMU machines do); machine {id} \
                 is a {vmm} machine"
            )));
        }
        let sid = new_snapshot_id();
        let tenant = tenant.to_string();
        let (wid, wsid) = (id.clone(), sid.clone());
        let snap = store
            .write(move |ctx| {
                let mut rec = ctx
                    .machine(&wid)?
                    .ok_or_else(|| StoreError::NoSuchMachine(wid.clone()))?;
                if let Err(why) = can_snapshot(&rec) {
                    return Ok(Err(LifecycleError::SnapshotConflict(why)));
                }
                let now = now_ms();
                let snap = SnapshotRecord {
                    id: wsid.clone(),
                    tenant,
                    name,
                    machine_id: wid.clone(),
                    status: SnapshotStatus::Creating,
                    kind,
                    base: rec.spec.base_snapshot.clone(),
                    data: SnapshotData {
                        memory: false,
                        size_bytes: 0,
                        vcpu_count: rec.spec.vcpu_count,
                        mem_size_mib: rec.spec.mem_size_mib,
                        image: rec.spec.image.clone(),
                        vmm: rec.spec.vmm,
                        disk_bytes: rec.spec.disk_bytes,
                        pause_ms: None,
                        error_message: None,
                        template_key,
                        oci: rec.spec.oci.clone(),
                        process: rec.spec.process.clone(),
                        restart: rec.spec.restart,
                    },
                    created_at: now,
                    updated_at: now,
                };
                ctx.put_snapshot(&snap)?;
                let op = new_operation_id();
                let mut ev = EventRecord::new(&wid, "requested");
                ev.from_status = Some(rec.status);
                ev.operation_id = Some(op.clone());
                ev.message = Some(format!("snapshot {wsid} requested"));
                rec.snapshot_job = Some(wsid);
                rec.operation_id = Some(op);
                rec.updated_at = now;
                ctx.put_machine(rec)?;
                ctx.append_event(ev)?;
                Ok(Ok(snap))
            })
            .await??;
        self.ensure_run(&id);
        Ok(snap)
    }

    /// Waits until snapshot `sid` of machine `machine_id` is no longer
    /// being taken, or the deadline passes.
    pub async fn wait_snapshot(
        &self,
        machine_id: &str,
        sid: &str,
        timeout: Duration,
    ) -> Result<SnapshotWait, LifecycleError> {
        let store = &self.ctx().store;
        let deadline = tokio::time::Instant::now() + timeout;
        if let Some(mut rx) = store.subscribe(machine_id)? {
            loop {
                let pending = rx
                    .borrow_and_update()
                    .as_ref()
                    .is_some_and(|m| m.rec.snapshot_job.as_deref() == Some(sid));
                if !pending {
                    break;
                }
                match tokio::time::timeout_at(deadline, rx.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => break,
                    Err(_) => {
                        let s = store
                            .snapshot_by_id(sid)?
                            .ok_or_else(|| LifecycleError::SnapshotNotFound(sid.into()))?;
                        return Ok(SnapshotWait::TimedOut(s));
                    }
                }
            }
        }
        let s = store
            .snapshot_by_id(sid)?
            .ok_or_else(|| LifecycleError::SnapshotNotFound(sid.into()))?;
        Ok(match s.status {
            SnapshotStatus::Creating => SnapshotWait::TimedOut(s),
            _ => SnapshotWait::Done(s),
        })
    }

    /// Deletes snapshot `id_or_name`: its files go now when nobody rests
    /// on it, else with the last machine that does (the row shows
    /// `deleting` until then). A snapshot being taken cannot be deleted.
    pub async fn delete_snapshot(
        self: &Arc<Self>,
        tenant: &str,
        id_or_name: &str,
    ) -> Result<(), LifecycleError> {
        let (tenant, key) = (tenant.to_string(), id_or_name.to_string());
        self.ctx()
            .store
            .write(move |ctx| {
                let Some(mut s) = ctx.snapshot_named(&tenant, &key)? else {
                    return Ok(Err(LifecycleError::SnapshotNotFound(key)));
                };
                match s.status {
                    SnapshotStatus::Creating => {
                        return Ok(Err(LifecycleError::SnapshotConflict(format!(
                            "snapshot {} is still being taken; delete it once it is ready or failed",
                            s.id
                        ))))
                    }
                    SnapshotStatus::Deleting => return Ok(Ok(())),
                    SnapshotStatus::Ready | SnapshotStatus::Failed => {}
                }
                s.status = SnapshotStatus::Deleting;
                s.updated_at = now_ms();
                ctx.put_snapshot(&s)?;
                Ok(Ok(()))
            })
            .await??;
        collect(&self.ctx().store, &self.ctx().snapshots_dir).await?;
        Ok(())
    }

    /// A new machine from snapshot `snapshot` (id or name) of `tenant`.
    pub async fn create_from_snapshot(
        self: &Arc<Self>,
        tenant: &str,
        name: Option<String>,
        mut spec: MachineSpec,
        snapshot: &str,
        explicit: Explicit,
    ) -> Result<Arc<CachedMachine>, LifecycleError> {
        let (s, _) = self
            .ctx()
            .store
            .snapshot(tenant, snapshot)?
            .filter(|(s, _)| s.status != SnapshotStatus::Deleting)
            .ok_or_else(|| LifecycleError::SnapshotNotFound(snapshot.to_string()))?;
        if s.status != SnapshotStatus::Ready {
            return Err(LifecycleError::SnapshotConflict(format!(
                "snapshot {} is {}; machines are made from ready snapshots",
                s.id, s.status
            )));
        }
        let d = &s.data;
        let mismatch = |field: &str, asked: String, has: String| {
            LifecycleError::SnapshotMismatch(format!(
                "{field}: the snapshot {} has {has}; a machine made from it cannot have {asked} \
                 (leave {field} out to take the snapshot's)",
                s.id
            ))
        };
        if let Some(v) = explicit
            .vcpu_count
            .filter(|v| *v != d.vcpu_count && d.memory)
        {
            return Err(mismatch(
                "vcpu_count",
                v.to_string(),
                d.vcpu_count.to_string(),
            ));
        }
        if let Some(v) = explicit
            .mem_size_mib
            .filter(|v| *v != d.mem_size_mib && d.memory)
        {
            return Err(mismatch(
                "mem_size_mib",
                v.to_string(),
                d.mem_size_mib.to_string(),
            ));
        }
        if let Some(v) = explicit.vmm.filter(|v| *v != d.vmm) {
            return Err(mismatch("vmm", v.to_string(), d.vmm.to_string()));
        }
        spec.vmm = d.vmm;
        if d.memory || explicit.vcpu_count.is_none() {
            spec.vcpu_count = d.vcpu_count;
        }
        if d.memory || explicit.mem_size_mib.is_none() {
            spec.mem_size_mib = d.mem_size_mib;
        }
        self.create_machine(tenant, name, spec, Some(&s)).await
    }

    /// Copies of running machine `source`: a snapshot of it (the source
    /// keeps running), then a machine per name made from it and started.
    /// The snapshot is deleted at once; its files go with the last copy.
    pub async fn fork(
        self: &Arc<Self>,
        tenant: &str,
        source: &str,
        names: Vec<Option<String>>,
        timeout: Duration,
    ) -> Result<(Vec<Arc<CachedMachine>>, SnapshotRecord), LifecycleError> {
        let src = self
            .ctx()
            .store
            .get(Some(tenant), source)?
            .ok_or_else(|| LifecycleError::NotFound(source.to_string()))?;
        if !matches!(
            src.rec.status,
            MachineStatus::Running | MachineStatus::Paused
        ) {
            return Err(LifecycleError::SnapshotConflict(format!(
                "cannot fork a machine that is {}: fork copies a running (or paused) machine",
                src.rec.status
            )));
        }
        let snap = self
            .take_snapshot(tenant, &src.rec.id, None, SnapshotKind::Fork)
            .await?;
        let snap = self
            .wait_ready(&src.rec.id, &snap.id, timeout, "fork")
            .await?;
        let mut spec = src.rec.spec.clone();
        spec.access_token = None;
        let mut made = Vec::new();
        let mut failure = None;
        for name in names {
            spec.access_token = Some(crate::util::random_id("hft_", 32));
            match self
                .create_machine(tenant, name, spec.clone(), Some(&snap))
                .await
            {
                Ok(m) => made.push(m),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let mut started = Vec::new();
        if failure.is_none() {
            for m in &made {
                match self
                    .request(tenant, &m.rec.id, super::table::Request::Start)
                    .await
                {
                    Ok((m, _)) => started.push(m),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
        }
        // The copies rest on the snapshot; nobody else may use it.
        if let Err(e) = self.delete_snapshot(tenant, &snap.id).await {
            tracing::warn!(snapshot = %snap.id, error = %e, "could not delete a fork's snapshot");
        }
        if let Some(e) = failure {
            // All or nothing: the copies made so far go again.
            for m in &made {
                let _ = self
                    .request(tenant, &m.rec.id, super::table::Request::ForceDelete)
                    .await;
            }
            return Err(e);
        }
        Ok((started, snap))
    }
}

/// Whether machine `rec` can have a snapshot taken now, and why not.
fn can_snapshot(rec: &MachineRecord) -> Result<(), String> {
    if rec.desired == super::table::Desired::Deleted {
        return Err(format!("machine {} is being deleted", rec.id));
    }
    if let Some(j) = &rec.snapshot_job {
        return Err(format!(
            "machine {} is already taking snapshot {j}; retry when it is ready",
            rec.id
        ));
    }
    let at_rest = rec.desired.as_status() == rec.status;
    match rec.status {
        MachineStatus::Running
        | MachineStatus::Paused
        | MachineStatus::Suspended
        | MachineStatus::Stopped
            if at_rest =>
        {
            Ok(())
        }
        s => Err(format!(
            "cannot take a snapshot of a machine that is {s} (moving toward {}): snapshots are \
             taken of running, paused, suspended or stopped machines",
            rec.desired.as_str()
        )),
    }
}

/// The tenant template builder machines belong to: not a name a key can
/// have (tenants are `[a-z0-9_-]`), so no user sees or touches them.
pub const TEMPLATE_TENANT: &str = "hyperfleet:templates";

/// What a template serves: machines of this backend, guest image and size.
pub fn template_key(
    vmm: hyperfleet_api::VmmKind,
    image: Option<&str>,
    vcpus: u32,
    mem_mib: u32,
) -> String {
    format!("{vmm}/{}/{vcpus}cpu/{mem_mib}mib", image.unwrap_or("none"))
}

impl Supervisor {
    /// The ready template for machines of `spec`'s backend, image and
    /// size, if one was warmed.
    pub(crate) fn template_for(&self, spec: &MachineSpec) -> Option<SnapshotRecord> {
        let key = template_key(
            spec.vmm,
            spec.image.as_deref(),
            spec.vcpu_count,
            spec.mem_size_mib,
        );
        match self.ctx().store.template(&key) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for a template; booting cold");
                None
            }
        }
    }

    /// Makes the template for machines of `spec`'s size (a builder machine
    /// boots, is snapshotted and goes), replacing an older one of the same
    /// key; returns the one that exists when it is ready already.
    pub async fn warm_template(
        self: &Arc<Self>,
        mut spec: MachineSpec,
        timeout: Duration,
    ) -> Result<SnapshotRecord, LifecycleError> {
        let backend = self
            .ctx()
            .backends
            .get(&spec.vmm)
            .ok_or(LifecycleError::BackendDisabled(spec.vmm))?
            .clone();
        spec.image = backend
            .current_image()
            .map_err(|why| LifecycleError::BackendUnavailable(spec.vmm, why))?;
        let key = template_key(
            spec.vmm,
            spec.image.as_deref(),
            spec.vcpu_count,
            spec.mem_size_mib,
        );
        if let Some(t) = self.template_for(&spec) {
            return Ok(t);
        }
        let builder = self
            .create_machine(TEMPLATE_TENANT, None, spec, None)
            .await?;
        let id = builder.rec.id.clone();
        let result = self.build_template(&id, key.clone(), timeout).await;
        // The builder goes whatever happened; its snapshot has files of its own.
        if let Err(e) = self
            .request(TEMPLATE_TENANT, &id, super::table::Request::ForceDelete)
            .await
        {
            tracing::warn!(machine = %id, error = %e, "could not delete a template builder");
        }
        let t = result?;
        // Older templates of the key (an earlier warm) go when unused.
        for old in self.ctx().store.all_snapshots()? {
            if old.kind == SnapshotKind::Template
                && old.id != t.id
                && old.data.template_key.as_deref() == Some(key.as_str())
                && old.status == SnapshotStatus::Ready
            {
                let _ = self.delete_snapshot(TEMPLATE_TENANT, &old.id).await;
            }
        }
        tracing::info!(template = %t.id, key = %key, "template ready");
        Ok(t)
    }

    async fn build_template(
        self: &Arc<Self>,
        id: &str,
        key: String,
        timeout: Duration,
    ) -> Result<SnapshotRecord, LifecycleError> {
        let (_, generation) = self
            .request(TEMPLATE_TENANT, id, super::table::Request::Start)
            .await?;
        match self.wait_generation(id, generation, timeout).await {
            super::WaitOutcome::Reached(_) => {}
            other => {
                return Err(LifecycleError::SnapshotConflict(format!(
                    "the template's guest did not come up: {other:?}"
                )))
            }
        }
        let snap = self
            .take_snapshot_keyed(TEMPLATE_TENANT, id, None, SnapshotKind::Template, Some(key))
            .await?;
        self.wait_ready(id, &snap.id, timeout, "template").await
    }

    /// Waits for snapshot `sid` of machine `machine_id`, made for `what`
    /// (a fork, a template), to be ready; its failure or the deadline is an
    /// error naming it.
    async fn wait_ready(
        &self,
        machine_id: &str,
        sid: &str,
        timeout: Duration,
        what: &str,
    ) -> Result<SnapshotRecord, LifecycleError> {
        match self.wait_snapshot(machine_id, sid, timeout).await? {
            SnapshotWait::Done(s) if s.status == SnapshotStatus::Ready => Ok(s),
            SnapshotWait::Done(s) => Err(LifecycleError::SnapshotConflict(format!(
                "the {what}'s snapshot failed: {}",
                s.data.error_message.unwrap_or_default()
            ))),
            SnapshotWait::TimedOut(s) => Err(LifecycleError::SnapshotConflict(format!(
                "the {what}'s snapshot {} was not taken within {timeout:?}",
                s.id
            ))),
        }
    }

    /// Deletes template `id` (its files go when no machine rests on it).
    pub async fn delete_template(self: &Arc<Self>, id: &str) -> Result<(), LifecycleError> {
        let is_template = self
            .ctx()
            .store
            .snapshot_by_id(id)?
            .is_some_and(|s| s.kind == SnapshotKind::Template);
        if !is_template {
            return Err(LifecycleError::SnapshotNotFound(id.to_string()));
        }
        self.delete_snapshot(TEMPLATE_TENANT, id).await
    }

    /// Startup: template builders a crash interrupted are deleted, and
    /// templates that never became ready go with them.
    pub async fn sweep_templates(self: &Arc<Self>) -> Result<(), LifecycleError> {
        let mut builders = Vec::new();
        self.ctx().store.for_each_machine(|m| {
            if m.tenant == TEMPLATE_TENANT {
                builders.push(m.id);
            }
        })?;
        for id in builders {
            tracing::info!(machine = %id, "deleting a template builder left by a restart");
            self.request(TEMPLATE_TENANT, &id, super::table::Request::ForceDelete)
                .await?;
        }
        for t in self.ctx().store.all_snapshots()? {
            if t.kind == SnapshotKind::Template && t.status == SnapshotStatus::Failed {
                self.delete_snapshot(TEMPLATE_TENANT, &t.id).await?;
            }
        }
        Ok(())
    }
}

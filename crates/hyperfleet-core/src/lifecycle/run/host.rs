//! Host-side effects the run's steps share: the machine's uid and network
//! for its next VMM, killing VMMs, and cleaning up after one is gone.

use std::time::Instant;

use super::{Run, RunError};
use crate::failpoint;
use crate::store::{steps, MachineRecord, VmmIdentity};
use crate::vmm::process;
use crate::vmm::{MachinePaths, Vmm, VmmError};

impl Run {
    /// The uid the machine's next VMM runs as, when its backend runs each
    /// machine's VMM as one: the machine's own, leased once (committed in
    /// one transaction before anything is made for it, so a crash on either
    /// side of the commit leaks nothing and shares nothing) and kept until
    /// the machine is deleted. None when the VMM runs as the daemon's user.
    pub(super) async fn ensure_uid(
        &mut self,
        rec: &MachineRecord,
        backend: &dyn Vmm,
    ) -> Result<Option<u32>, RunError> {
        let Some(range) = backend.jail_uids() else {
            return Ok(None);
        };
        let t0 = Instant::now();
        let uid = crate::vmm::uid::lease(&self.ctx.store, &rec.id, range).await?;
        self.step_done(steps::UID, t0, format!("uid and gid {uid}"));
        failpoint::hit("jail.after_uid");
        Ok(Some(uid))
    }

    /// The machine's network for its next VMM: the lease (taken once and
    /// committed before any device is made), the firewall rules that
    /// include it, then the TAP device, owned by `owner` (the uid the VMM
    /// runs as, when not the daemon's). Every part is idempotent, so a
    /// crash anywhere here is recovered by doing it all again.
    pub(super) async fn ensure_network(
        &mut self,
        rec: &MachineRecord,
        owner: Option<u32>,
    ) -> Result<Option<crate::net::GuestNet>, RunError> {
        let backend = self.backend(rec.spec.vmm)?;
        let Some(net) = self.ctx.net.clone() else {
            return Ok(None);
        };
        let t0 = Instant::now();
        let lease = net.lease(&self.ctx.store, &rec.id).await?;
        self.step_done(
            steps::LEASE,
            t0,
            format!(
                "{}/{} via {}, {}",
                lease.ip, lease.prefix_len, lease.gateway, lease.mac
            ),
        );
        failpoint::hit("network.after_lease");
        let t0 = Instant::now();
        net.sync_rules(&self.ctx.store).await?;
        self.step_done(steps::RULES, t0, format!("table {}", net.config.table));
        let t0 = Instant::now();
        let detail = if backend.machine_netns() {
            // Namespace, veth link and the TAP inside: one idempotent step.
            net.ensure_tap_in_netns(&lease, owner).await?;
            format!(
                "{} in network namespace {}",
                crate::net::netns::INNER_TAP,
                crate::net::netns::name_for(&lease.tap)
            )
        } else {
            net.ensure_tap(&lease, owner).await?;
            lease.tap.clone()
        };
        self.step_done(steps::TAP, t0, detail);
        failpoint::hit("network.after_tap");
        Ok(Some(net.config.guest(&lease)))
    }

    /// Kills the machine's VMM `vmm` and cleans up after it
    /// ([`Run::vmm_gone`]).
    pub(super) async fn end_vmm(
        &self,
        rec: &MachineRecord,
        vmm: &VmmIdentity,
        doing: &'static str,
    ) -> Result<(), VmmError> {
        kill_vmm(vmm, doing).await?;
        self.vmm_gone(rec).await;
        Ok(())
    }

    /// The machine's VMM is gone: its TAP goes, and the backend removes
    /// what the process left (`Vmm::after_exit`). Best effort, logged: a
    /// device or file that could not be removed now is removed by the next
    /// stop, the release or the startup sweep, and a start reuses it.
    pub(super) async fn vmm_gone(&self, rec: &MachineRecord) {
        if let (Some(net), Some(lease)) = (&self.ctx.net, &rec.network) {
            if let Err(e) = net.remove_tap(&lease.tap).await {
                tracing::warn!(machine = %rec.id, tap = %lease.tap, error = %e, "could not remove the TAP device");
            }
        }
        if let Ok(backend) = self.backend(rec.spec.vmm) {
            if let Err(e) = backend.after_exit(&self.launch(rec)).await {
                tracing::warn!(machine = %rec.id, error = %e, "could not remove what the VMM left");
            }
        }
    }
}

/// Kills `vmm` and waits for it to be gone; `doing` names why, for the error.
pub(super) async fn kill_vmm(vmm: &VmmIdentity, doing: &'static str) -> Result<(), VmmError> {
    process::kill(vmm)
        .await
        .map_err(|e| VmmError::host(doing, e))
}

/// Kills every process of the machine: the one `rec` records and any whose
/// command line names its directory (a VMM spawned but not yet recorded).
/// Best effort, logged: the caller records the machine failed either way.
pub(super) async fn kill_everything_of(paths: &MachinePaths, rec: &MachineRecord) {
    let marker = paths.dir.display().to_string();
    let mut victims = process::find_by_marker(&marker);
    if let Some(v) = rec.vmm.clone() {
        if !victims.contains(&v) {
            victims.push(v);
        }
    }
    for v in &victims {
        if let Err(e) = process::kill(v).await {
            tracing::error!(machine = %rec.id, pid = v.pid, error = %e, "could not kill the VMM of a failed step");
        }
    }
}

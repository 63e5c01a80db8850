//! The steps the run carries out, one method each. The journaled ones are
//! declared as [`StepDef`]s and follow the protocol in [`super::journal`];
//! the rest record a decision or an observation in one commit.

use std::time::{Duration, Instant};

use hyperfleet_api::{MachineStatus, SnapshotStatus};

use super::host::{kill_everything_of, kill_vmm};
use super::journal::{failure_timing, Journal, StepDef};
use super::{until, wants_running, Run, RunError, Rx};
use crate::failpoint;
use crate::lifecycle::plan::{after_main_exit, AfterExit, Step};
use crate::lifecycle::table::{Desired, Observation};
use crate::store::{steps, EventRecord, MachineRecord, StoreError};
use crate::util::now_ms;
use crate::vmm::process;
use crate::vmm::{remove_dir_idempotent, Saved, StopPath};
use tokio_util::sync::CancellationToken;

const SPAWN: StepDef = StepDef {
    name: steps::SPAWN,
    after_intent: "spawn.after_intent",
    after_effect: "spawn.after_effect",
    begins: Some(Observation::VmmSpawned),
};

const PAUSE: StepDef = StepDef {
    name: steps::PAUSE,
    after_intent: "pause.after_intent",
    after_effect: "pause.after_effect",
    begins: None,
};

const RESUME: StepDef = StepDef {
    name: steps::RESUME,
    after_intent: "resume.after_intent",
    after_effect: "resume.after_effect",
    begins: None,
};

const GRACEFUL_STOP: StepDef = StepDef {
    name: steps::GRACEFUL_STOP,
    after_intent: "stop.after_intent",
    after_effect: "stop.after_effect",
    begins: Some(Observation::StopBegun),
};

const KILL: StepDef = StepDef {
    name: steps::KILL,
    ..GRACEFUL_STOP
};

const SUSPEND: StepDef = StepDef {
    name: steps::SAVE_STATE,
    after_intent: "suspend.after_intent",
    after_effect: "suspend.after_effect",
    begins: Some(Observation::SuspendBegun),
};

const TAKE_SNAPSHOT: StepDef = StepDef {
    name: steps::TAKE_SNAPSHOT,
    after_intent: "snapshot.after_intent",
    after_effect: "snapshot.after_effect",
    begins: None,
};

const RELEASE: StepDef = StepDef {
    name: steps::RELEASE,
    after_intent: "release.after_intent",
    after_effect: "release.after_effect",
    begins: None,
};

/// How long the restart policy's `n`th boot in a row waits after the
/// exit: 0.5 s, doubling, at most 30 s.
fn restart_delay(n: u32) -> Duration {
    if n == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(500u64.saturating_mul(1 << (n - 1).min(6))).min(Duration::from_secs(30))
}

/// The `exit_reason` of a machine whose guest powered itself off.
pub(crate) const GUEST_POWERED_OFF: &str = "guest powered off";

/// How often, and how far apart, adoption looks again for a VMM spawned
/// before a crash when the first look finds none (about half a second).
const ORPHAN_RESCANS: usize = 10;
const ORPHAN_RESCAN_PAUSE: Duration = Duration::from_millis(50);

impl Run {
    pub(super) async fn execute(
        &mut self,
        step: Step,
        rec: &MachineRecord,
        rx: &mut Rx,
    ) -> Result<(), RunError> {
        match step {
            Step::Idle => Ok(()),
            Step::Converged => {
                let planned = rec.generation;
                self.persist(None, move |r| {
                    r.observed_generation = r.observed_generation.max(planned);
                })
                .await?;
                Ok(())
            }
            Step::AdoptOrphan => self.adopt_orphan(rec).await,
            Step::Prepare => self.prepare(rec).await,
            Step::Spawn { restore } => {
                let Some(waited) = self.restart_back_off(rec, rx).await else {
                    // Something else was asked for meanwhile: plan again.
                    return Ok(());
                };
                self.spawn(rec, restore, waited).await
            }
            Step::WaitReady => self.wait_ready(rec, rx).await,
            Step::Verify => self.verify(rec).await,
            Step::Pause => self.pause_or_resume(rec, true).await,
            Step::Resume => self.pause_or_resume(rec, false).await,
            Step::Stop { kill } => self.stop(rec, kill, rx).await,
            Step::Suspend => self.suspend(rec, rx).await,
            Step::Snapshot { live } => self.take_snapshot(rec, live).await,
            Step::AbandonSnapshot => self.abandon_snapshot(rec).await,
            Step::ForgetVmm(obs) => self.forget_vmm(rec, obs).await,
            Step::SettleStopped => self.settle_stopped(rec).await,
            Step::BeginDelete => {
                self.persist(Some(Journal::done(steps::RELEASE, "begin")), |r| {
                    r.observe(Observation::DeleteBegun)
                })
                .await?;
                Ok(())
            }
            Step::Release => self.release(rec).await,
            Step::CleanupFailed => {
                if let Some(v) = &rec.vmm {
                    kill_vmm(v, "killing the VMM of a failed machine").await?;
                }
                self.vmm_gone(rec).await;
                self.persist(Some(Journal::done(steps::KILL, "cleanup")), |r| {
                    r.vmm = None;
                    r.observe(Observation::VmmExited);
                })
                .await?;
                Ok(())
            }
        }
    }

    async fn adopt_orphan(&mut self, rec: &MachineRecord) -> Result<(), RunError> {
        let marker = self.ctx.paths(&rec.id).dir.display().to_string();
        let t0 = Instant::now();
        // "None found" decides that no VMM was spawned, and the start is
        // then simply done again: it must not be a process caught where its
        // command line cannot be read (mid-exec, as a jailer turning into
        // Firecracker right after the daemon died). Look again a few times
        // before believing it; this path runs only after a crash.
        // A look that fails is no look: "none found" must not come from
        // a host out of file descriptors.
        let look = || process::find_by_marker_checked(&marker).map_err(RunError::Host);
        let mut found = look()?;
        for _ in 0..ORPHAN_RESCANS {
            if !found.is_empty() {
                break;
            }
            tokio::time::sleep(ORPHAN_RESCAN_PAUSE).await;
            found = look()?;
        }
        match found.as_slice() {
            [one] => {
                tracing::warn!(machine = %rec.id, pid = one.pid, "adopting a VMM spawned before the daemon stopped");
                let one = one.clone();
                self.verified = false;
                self.persist(
                    Some(Journal::finished(
                        steps::ADOPT,
                        t0,
                        Some(format!("pid {}", one.pid)),
                    )),
                    move |r| {
                        r.vmm = Some(one);
                        r.current_step = None;
                    },
                )
                .await?;
            }
            many => {
                // Never two VMMs for one machine: if somehow more than one
                // exists, none can be trusted; kill them all and start over.
                for v in many {
                    tracing::warn!(machine = %rec.id, pid = v.pid, "killing an unrecorded duplicate VMM");
                    kill_vmm(v, "killing an unrecorded VMM").await?;
                }
                let detail = if many.is_empty() {
                    "the daemon stopped before the VMM was spawned".to_string()
                } else {
                    format!("killed {} unrecorded VMM processes", many.len())
                };
                self.persist(Some(Journal::failed(steps::SPAWN, t0, detail)), |r| {
                    r.current_step = None
                })
                .await?;
            }
        }
        Ok(())
    }

    async fn prepare(&mut self, rec: &MachineRecord) -> Result<(), RunError> {
        let backend = self.backend(rec.spec.vmm)?;
        let launch = self.launch(rec);
        let t0 = Instant::now();
        // No intent record: preparation is idempotent and everything it
        // makes lives under the machine's directory (known from its id), so
        // recovery simply prepares again while `prepared` is false, and the
        // sweep or release removes the directory of a machine that is gone.
        failpoint::hit("prepare.before_effect");
        backend.prepare(&launch).await?;
        failpoint::hit("prepare.after_effect");
        // No status changes here, so the step gets an event of its own in
        // the same commit (instead of a separate flush later).
        let journal = Journal::finished(steps::PREPARE, t0, None).with_own_event();
        self.persist(Some(journal), |r| {
            r.prepared = true;
            r.current_step = None;
        })
        .await?;
        self.ctx.storage.mark(&rec.id);
        Ok(())
    }

    /// Before a boot the restart policy asked for (the main process exited
    /// and `restart_count` went up): waits [`restart_delay`], so a command
    /// that fails at once does not boot the guest in a tight loop. Whether
    /// to boot now: false when a request changed the machine meanwhile (a
    /// stop wins at once). Not durable: a daemon restart boots at once.
    /// The wait, or None when the run must plan again.
    async fn restart_back_off(&mut self, rec: &MachineRecord, rx: &mut Rx) -> Option<Duration> {
        if rec.status != MachineStatus::Stopped || rec.exit_code.is_none() {
            return Some(Duration::ZERO);
        }
        let delay = restart_delay(rec.restart_count);
        tracing::info!(machine = %rec.id, restart = rec.restart_count, ?delay, "restart policy: backing off before the boot");
        let generation = rec.generation;
        tokio::select! {
            () = tokio::time::sleep(delay) => Some(delay),
            () = until(rx, move |r| r.generation != generation) => None,
        }
    }

    async fn spawn(
        &mut self,
        rec: &MachineRecord,
        restore: bool,
        backed_off: Duration,
    ) -> Result<(), RunError> {
        let backend = self.backend(rec.spec.vmm)?;
        let mut launch = self.launch(rec);
        launch.restore = restore;
        let step = self
            .begin(&SPAWN, |r| {
                r.boot_restart_seq = r.restart_seq;
                r.stop_kill = false;
                // A failure's message, or the reason a guest last exited.
                r.error_message = None;
                r.exit_code = None;
            })
            .await?;
        launch.uid = self.ensure_uid(rec, backend.as_ref()).await?;
        launch.network = self.ensure_network(rec, launch.uid).await?;
        let identity = backend.spawn(&launch).await?;
        self.verified = true;
        // Which path the start takes: the events say (docs/api.md "Events").
        let path = match launch.restore_image() {
            Some((_, _, true)) => "restore of its suspend image".to_string(),
            Some(_) => match &launch.base {
                Some(b) if b.template => format!("template {}", b.id),
                Some(b) => format!("restore of snapshot {}", b.id),
                None => "restore".to_string(),
            },
            // A backend with an image format of its own (Firecracker).
            None if launch.restore => "restore of its suspend image".to_string(),
            None => "boot".to_string(),
        };
        let mut detail = format!("pid {}, {path}", identity.pid);
        if !backed_off.is_zero() {
            detail.push_str(&format!(
                " (restart {} of the restart policy, after {:.1} s)",
                rec.restart_count,
                backed_off.as_secs_f64()
            ));
        }
        self.finish(step, Some(detail), move |r| r.vmm = Some(identity))
            .await?;
        failpoint::hit("spawn.after_commit");
        Ok(())
    }

    async fn wait_ready(&mut self, rec: &MachineRecord, rx: &mut Rx) -> Result<(), RunError> {
        let backend = self.backend(rec.spec.vmm)?;
        let launch = self.launch(rec);
        let Some(vmm) = rec.vmm.clone() else {
            return Ok(());
        };
        let t0 = Instant::now();
        let timeout = self.ctx.boot_timeout;
        // A stop, kill, delete or restart asked for meanwhile ends the wait.
        let restart_seq = rec.restart_seq;
        let outcome = tokio::select! {
            r = backend.wait_ready(&launch, &vmm, timeout) => Some(r),
            _ = until(rx, move |r| {
                !matches!(r.desired, Desired::Running | Desired::Paused | Desired::Suspended)
                    || r.restart_seq != restart_seq
            }) => None,
        };
        let Some(result) = outcome else {
            return Ok(());
        };
        result?;
        // When the guest became running: the agent answered. Taken before
        // the main process starts, so whatever the guest writes from then
        // on (its power-off when the process exits at once) is later than
        // this, however long the commit below takes.
        let ready_at = now_ms();
        // A guest restored from memory takes up the present: a new machine
        // (snapshot, fork, template) its own identity, a resumed one the
        // host's clock and fresh entropy; before it counts as running.
        if let Some((_, _, own)) = launch.restore_image() {
            self.refresh_guest(rec, &launch, backend.as_ref(), !own)
                .await?;
        } else if !launch.restore {
            // A boot: the guest runs the machine's main process, if it has
            // one. (A restored guest has it in its memory already.)
            if let Some(p) = &rec.spec.process {
                self.start_main(rec, &launch, backend.as_ref(), p).await?;
            }
        }
        failpoint::hit("ready.after_effect");
        self.verified = true;
        let restored = rec.has_snapshot;
        self.persist(
            Some(Journal::finished(steps::WAIT_READY, t0, None)),
            move |r| {
                r.observe(Observation::AgentReady);
                r.started_at = Some(ready_at);
                if restored {
                    // The image is consumed: the guest has moved on from it.
                    r.has_snapshot = false;
                }
            },
        )
        .await?;
        if restored {
            let dir = self.ctx.paths(&rec.id).snapshot_dir();
            if let Err(e) = remove_dir_idempotent(&dir).await {
                tracing::warn!(machine = %rec.id, error = %e, "could not remove a consumed suspend image");
            }
        }
        Ok(())
    }

    /// Sends the guest agent a refresh after a restore: for a machine
    /// restored from another's memory (`new_machine`) its address, MAC,
    /// hostname, machine id and boot id, with the clock, entropy and stale
    /// exec sessions dropped, failing the start when any part fails; after
    /// a resume of its own image only the clock and entropy (a failure is
    /// logged: an old agent may not know the request).
    async fn refresh_guest(
        &mut self,
        rec: &MachineRecord,
        launch: &crate::vmm::LaunchSpec,
        backend: &dyn crate::vmm::Vmm,
        new_machine: bool,
    ) -> Result<(), RunError> {
        use hyperfleet_agent_proto::{
            random_boot_id, random_machine_id, MacAddr, NetworkIdentity, RefreshRequest,
        };
        let t0 = Instant::now();
        let doing = if new_machine {
            "giving the restored guest an identity of its own"
        } else {
            "setting the resumed guest's clock"
        };
        let err = |detail: String| crate::vmm::VmmError::Control {
            doing: doing.to_string(),
            detail,
        };
        let agent = match backend.agent(launch).await {
            Ok(a) => a,
            Err(crate::vmm::VmmError::Unsupported { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let host = |e: std::io::Error| err(format!("reading the host's randomness: {e}"));
        let req = if new_machine {
            let mut req = RefreshRequest::new_machine()
                .map_err(host)?
                .hostname(rec.name.clone())
                .machine_id(random_machine_id().map_err(host)?)
                .boot_id(random_boot_id().map_err(host)?);
            if let Some(n) = &launch.network {
                let mut id = NetworkIdentity::new(n.ip, n.prefix_len);
                id.gateway = Some(n.gateway);
                id.mac = Some(
                    n.mac
                        .parse::<MacAddr>()
                        .map_err(|e| err(format!("the lease's MAC {}: {e}", n.mac)))?,
                );
                id.dns = n.dns.clone();
                req = req.network(id);
            }
            req.stamp_clock()
        } else {
            RefreshRequest::resume().map_err(host)?
        };
        let outcome = agent.refresh(req).await;
        let report = match outcome {
            Ok(r) => r,
            Err(e) if !new_machine => {
                tracing::warn!(machine = %rec.id, error = %e, "could not set a resumed guest's clock");
                return Ok(());
            }
            Err(e) => return Err(err(e.to_string()).into()),
        };
        let failed: Vec<String> = report
            .failures()
            .map(|f| {
                format!(
                    "{}: {}",
                    f.step.as_str(),
                    f.error.as_ref().map(|e| e.message.as_str()).unwrap_or("")
                )
            })
            .collect();
        if !failed.is_empty() {
            if new_machine {
                return Err(err(failed.join("; ")).into());
            }
            tracing::warn!(machine = %rec.id, failures = %failed.join("; "), "a resumed guest's refresh failed in part");
        }
        let detail = if new_machine {
            format!(
                "hostname {}, new machine id and boot id{}, clock and RNG reseeded",
                rec.name,
                launch
                    .network
                    .as_ref()
                    .map(|n| format!(", address {}/{} mac {}", n.ip, n.prefix_len, n.mac))
                    .unwrap_or_default()
            )
        } else {
            "clock set from the host, RNG reseeded".to_string()
        };
        self.step_done(steps::REFRESH_IDENTITY, t0, detail);
        Ok(())
    }

    /// Asks the agent of a booted guest to start the machine's main
    /// process. The agent starts it once per boot and answers a repeated
    /// request with what it started, so a daemon that died before
    /// recording `running` asks again harmlessly.
    async fn start_main(
        &mut self,
        rec: &MachineRecord,
        launch: &crate::vmm::LaunchSpec,
        backend: &dyn crate::vmm::Vmm,
        p: &crate::store::MainProcess,
    ) -> Result<(), RunError> {
        let t0 = Instant::now();
        let err = |detail: String| crate::vmm::VmmError::Control {
            doing: "starting the image's main process".to_string(),
            detail,
        };
        let agent = match backend.agent(launch).await {
            Ok(a) => a,
            // A backend with no guest (stub): nothing runs.
            Err(crate::vmm::VmmError::Unsupported { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let req = hyperfleet_agent_proto::MainProcessRequest {
            argv: p.argv.clone(),
            env: p.env(&rec.spec.env),
            cwd: p.workdir.clone(),
            user: p.user.clone(),
        };
        let started = agent
            .start_main(req)
            .await
            .map_err(|e| err(e.to_string()))?;
        let detail = match started.pid {
            Some(pid) if started.already => format!("pid {pid}, started before"),
            Some(pid) => format!("pid {pid}: {}", p.argv.join(" ")),
            None => "it could not start; the console log says why".to_string(),
        };
        self.step_done(steps::START_MAIN, t0, detail);
        Ok(())
    }

    async fn verify(&mut self, rec: &MachineRecord) -> Result<(), RunError> {
        let backend = self.backend(rec.spec.vmm)?;
        let launch = self.launch(rec);
        let t0 = Instant::now();
        let state = backend.run_state(&launch).await?;
        let obs = match state {
            crate::vmm::VmmRunState::Running => Observation::AdoptedRunning,
            crate::vmm::VmmRunState::Paused => Observation::AdoptedPaused,
        };
        self.verified = true;
        let detail = Some(format!("{state:?}").to_lowercase());
        self.persist(
            Some(Journal::finished(steps::VERIFY, t0, detail)),
            move |r| {
                r.observe(obs);
                r.current_step = None;
            },
        )
        .await?;
        Ok(())
    }

    async fn pause_or_resume(&mut self, rec: &MachineRecord, pause: bool) -> Result<(), RunError> {
        let backend = self.backend(rec.spec.vmm)?;
        let launch = self.launch(rec);
        let (def, done) = if pause {
            (&PAUSE, Observation::PauseDone)
        } else {
            (&RESUME, Observation::ResumeDone)
        };
        let step = self.begin(def, |_| {}).await?;
        if pause {
            backend.pause(&launch).await?;
        } else {
            backend.resume(&launch).await?;
        }
        self.finish(step, None, move |r| r.observe(done)).await?;
        Ok(())
    }

    async fn stop(&mut self, rec: &MachineRecord, kill: bool, rx: &mut Rx) -> Result<(), RunError> {
        let Some(vmm) = rec.vmm.clone() else {
            return Ok(());
        };
        let backend = self.backend(rec.spec.vmm)?;
        let launch = self.launch(rec);
        let step = self
            .begin(if kill { &KILL } else { &GRACEFUL_STOP }, |_| {})
            .await?;
        let path = if kill {
            "killed on request".to_string()
        } else {
            let timeout = self.ctx.stop_timeout;
            let graceful = tokio::select! {
                r = backend.shutdown(&launch, &vmm, timeout) => Some(r?),
                _ = until(rx, |r| r.stop_kill) => None,
            };
            match graceful {
                Some(StopPath::Graceful { via }) => format!("guest powered off ({via})"),
                Some(StopPath::KilledAfterTimeout) => {
                    format!("guest did not power off within {timeout:?}; VMM killed")
                }
                None => "escalated to kill on request".to_string(),
            }
        };
        // Whatever happened above, the process must be gone before we say so.
        self.end_vmm(rec, &vmm, "killing the VMM").await?;
        self.finish(step, Some(path), |r| {
            r.vmm = None;
            r.stop_kill = false;
            r.observe(Observation::VmmExited);
        })
        .await?;
        Ok(())
    }

    async fn suspend(&mut self, rec: &MachineRecord, rx: &mut Rx) -> Result<(), RunError> {
        let Some(vmm) = rec.vmm.clone() else {
            return Ok(());
        };
        let backend = self.backend(rec.spec.vmm)?;
        let launch = self.launch(rec);
        let step = self.begin(&SUSPEND, |_| {}).await?;
        // A wake (a resume request) arriving mid-save cancels it: the same
        // VMM goes on, which is quicker than finishing the save and
        // restoring it.
        let cancel = CancellationToken::new();
        let saved = {
            let save = backend.save_state(&launch, &cancel);
            tokio::pin!(save);
            tokio::select! {
                r = &mut save => r,
                () = until(rx, |r| r.desired == Desired::Running) => {
                    if wants_running(rx) {
                        cancel.cancel();
                    }
                    save.await
                }
            }
        }?;
        // A wake that came as the save ended keeps the VMM all the same.
        if saved == Saved::Cancelled || wants_running(rx) {
            if saved == Saved::Complete {
                backend.resume(&launch).await?;
            }
            remove_dir_idempotent(&launch.paths.snapshot_dir()).await?;
            let detail = match saved {
                Saved::Cancelled => "save cancelled half-way by a wake; the VMM continues",
                Saved::Complete => {
                    "a wake arrived as the save ended; the image is discarded and the VMM continues"
                }
            };
            self.finish(step, Some(detail.to_string()), |r| {
                r.observe(Observation::SuspendCancelled);
            })
            .await?;
            return Ok(());
        }
        failpoint::hit("suspend.after_save");
        // The image is complete: record it before the VMM goes, so a crash
        // from here on still ends in `suspended`, not `failed`.
        self.persist(None, |r| r.has_snapshot = true).await?;
        self.end_vmm(rec, &vmm, "stopping the VMM after saving its memory")
            .await?;
        self.finish(step, None, |r| {
            r.vmm = None;
            r.observe(Observation::SuspendDone);
        })
        .await?;
        self.ctx.storage.mark(&rec.id);
        Ok(())
    }

    /// Takes the snapshot `snapshot_job` names into its directory and marks
    /// it `ready` in the commit that ends the step. A snapshot that cannot
    /// be taken fails on its own: the machine goes on as it was.
    async fn take_snapshot(&mut self, rec: &MachineRecord, live: bool) -> Result<(), RunError> {
        let Some(sid) = rec.snapshot_job.clone() else {
            return Ok(());
        };
        let backend = self.backend(rec.spec.vmm)?;
        let launch = self.launch(rec);
        let step = self.begin(&TAKE_SNAPSHOT, |_| {}).await?;
        let dest = crate::lifecycle::snapshots::dir(&self.ctx.snapshots_dir, &sid);
        // Idempotent: what an interrupted attempt left goes first.
        remove_dir_idempotent(&dest).await?;
        let made = match tokio::fs::create_dir_all(&dest).await {
            Ok(()) => {
                // A fork's memory image serves its copies' first start only.
                let durable = !matches!(
                    self.ctx.store.snapshot_by_id(&sid),
                    Ok(Some(s)) if s.kind == crate::store::SnapshotKind::Fork
                );
                backend.snapshot(&launch, &dest, live, durable).await
            }
            Err(e) => Err(crate::vmm::VmmError::host(
                format!("creating {}", dest.display()),
                e,
            )),
        };
        failpoint::hit("snapshot.after_copy");
        let size = crate::vmm::image::disk_usage(&dest);
        let (detail, outcome) = match &made {
            Ok(t) => (
                format!(
                    "snapshot {sid}: {}{}, {} MiB",
                    if t.memory {
                        "memory and disk"
                    } else {
                        "disk only"
                    },
                    t.pause
                        .map(|p| format!(", vCPUs paused {:.1} ms", p.as_secs_f64() * 1e3))
                        .unwrap_or_default(),
                    size >> 20
                ),
                Ok(*t),
            ),
            Err(e) => {
                tracing::warn!(machine = %rec.id, snapshot = %sid, error = %e, "taking a snapshot failed");
                // A VMM left paused by a failed save is found by verifying.
                self.verified = false;
                let _ = remove_dir_idempotent(&dest).await;
                (
                    format!("snapshot {sid} failed: {e}"),
                    Err(crate::util::error_chain(e)),
                )
            }
        };
        let base = rec.spec.base_snapshot.clone();
        self.finish(step, Some(detail), move |r| {
            r.snapshot_job = None;
            r.also(move |ctx| {
                let Some(mut s) = ctx.snapshot(&sid)? else {
                    return Ok(());
                };
                s.updated_at = now_ms();
                match outcome {
                    Ok(t) => {
                        s.status = SnapshotStatus::Ready;
                        s.data.memory = t.memory;
                        s.data.pause_ms = t.pause.map(|p| p.as_secs_f64() * 1e3);
                        s.data.size_bytes = size;
                        s.base = if t.flattened { None } else { base };
                    }
                    Err(message) => {
                        s.status = SnapshotStatus::Failed;
                        s.data.error_message = Some(message);
                    }
                }
                ctx.put_snapshot(&s)
            });
        })
        .await?;
        self.ctx.storage.mark_all();
        Ok(())
    }

    /// The snapshot asked for cannot be taken any more (the machine failed
    /// or is being deleted).
    async fn abandon_snapshot(&mut self, rec: &MachineRecord) -> Result<(), RunError> {
        let Some(sid) = rec.snapshot_job.clone() else {
            return Ok(());
        };
        let dest = crate::lifecycle::snapshots::dir(&self.ctx.snapshots_dir, &sid);
        remove_dir_idempotent(&dest).await?;
        let why = if rec.desired == Desired::Deleted {
            "the machine is being deleted".to_string()
        } else {
            format!(
                "the machine failed: {}",
                rec.error_message.as_deref().unwrap_or("see its events")
            )
        };
        self.persist(
            Some(Journal::done(
                steps::TAKE_SNAPSHOT,
                &format!("abandoned: {why}"),
            )),
            move |r| {
                r.snapshot_job = None;
                if r.current_step.as_deref() == Some(steps::TAKE_SNAPSHOT) {
                    r.current_step = None;
                }
                r.also(move |ctx| {
                    let Some(mut s) = ctx.snapshot(&sid)? else {
                        return Ok(());
                    };
                    s.status = SnapshotStatus::Failed;
                    s.data.error_message = Some(format!("not taken: {why}"));
                    s.updated_at = now_ms();
                    ctx.put_snapshot(&s)
                });
            },
        )
        .await?;
        Ok(())
    }

    async fn forget_vmm(&mut self, rec: &MachineRecord, obs: Observation) -> Result<(), RunError> {
        let was = rec.status;
        // A running guest that powered itself off ends `stopped`, with the
        // reason; anything else unasked-for is a failure.
        let console = match self.backend(rec.spec.vmm) {
            Ok(b) => b.console_log(&self.ctx.paths(&rec.id)),
            Err(_) => self.ctx.paths(&rec.id).console_log(),
        };
        let powered_off = obs == Observation::VmmLost
            && was == MachineStatus::Running
            && crate::vmm::guest_powered_off(&console, rec.started_at);
        // Its main process exiting is what made the guest power off.
        let main_exit = if powered_off && rec.spec.process.is_some() {
            crate::vmm::main_process_exit(&console)
        } else {
            None
        };
        let (obs, detail) = if powered_off {
            let reason = main_exit
                .as_ref()
                .map_or(GUEST_POWERED_OFF.to_string(), |e| e.reason.clone());
            tracing::info!(machine = %rec.id, %reason, "the guest powered itself off");
            (Observation::GuestPoweredOff, reason)
        } else {
            tracing::warn!(machine = %rec.id, status = %was, "the VMM process is gone");
            (obs, format!("VMM gone while {was}"))
        };
        self.vmm_gone(rec).await;
        // The guest was in use until it went.
        let last = self.ctx.activity.last(&rec.id);
        let ephemeral = rec.spec.ephemeral();
        // The restart policy decides on the latest record, in the commit
        // that records the exit: a stop or delete asked for meanwhile wins.
        // An ephemeral machine the policy does not boot again is deleted.
        let exit_code = main_exit.as_ref().map(|e| e.code);
        let restarts = move |r: &MachineRecord| {
            exit_code.is_some_and(|code| after_main_exit(r, code) == AfterExit::Restart)
        };
        // What the policy says on the record the run read (the commit
        // decides again on the latest).
        let journal = if restarts(rec) {
            format!(
                "{detail}; the {} restart policy boots it again",
                rec.spec.restart.unwrap_or_default().policy.as_str()
            )
        } else if powered_off && ephemeral {
            format!("{detail}; ephemeral: deleted")
        } else {
            detail.clone()
        };
        self.persist(Some(Journal::done(steps::FORGET, &journal)), move |r| {
            r.vmm = None;
            r.current_step = None;
            r.observe(obs);
            if let Some(t) = last {
                r.last_active_at = Some(r.last_active_at.map_or(t, |l| l.max(t)));
            }
            if powered_off && r.status == MachineStatus::Stopped {
                let restart = restarts(r);
                r.exit_code = exit_code;
                r.error_message = Some(detail);
                if restart {
                    // Still wanted running: the run boots it again.
                    r.restart_count = r.restart_count.saturating_add(1);
                } else if ephemeral && r.desired != Desired::Deleted {
                    // An ephemeral machine is deleted when it stops.
                    r.desired = Desired::Deleted;
                    r.generation += 1;
                } else if !matches!(r.desired, Desired::Stopped | Desired::Deleted) {
                    // Nobody asked for it, but stopped is now what is
                    // wanted: the run must not boot the guest again.
                    r.desired = Desired::Stopped;
                    r.generation += 1;
                    r.observed_generation = r.generation;
                }
            }
            if r.status == MachineStatus::Failed && was != MachineStatus::Failed {
                r.error_message = Some(format!(
                    "the VMM process exited without being asked to while the machine was {was} \
                         (crash, or killed from outside); see the console log"
                ));
                r.failed_generation = Some(r.generation);
            }
        })
        .await?;
        Ok(())
    }

    async fn settle_stopped(&mut self, rec: &MachineRecord) -> Result<(), RunError> {
        let t0 = Instant::now();
        if rec.has_snapshot {
            remove_dir_idempotent(&self.ctx.paths(&rec.id).snapshot_dir()).await?;
        }
        let journal = rec
            .has_snapshot
            .then(|| Journal::finished(steps::DISCARD_SNAPSHOT, t0, None));
        self.persist(journal, |r| {
            r.has_snapshot = false;
            r.current_step = None;
            // Only the evictor's reason outlives a settle (its request set it).
            r.error_message = r
                .error_message
                .take()
                .filter(|m| m == super::super::evictor::EVICTED_REASON);
            r.observe(Observation::SettledStopped);
        })
        .await?;
        if rec.has_snapshot {
            self.ctx.storage.mark(&rec.id);
        }
        Ok(())
    }

    async fn release(&mut self, rec: &MachineRecord) -> Result<(), RunError> {
        let paths = self.ctx.paths(&rec.id);
        let step = self.begin(&RELEASE, |_| {}).await?;
        // Belt and braces: no process of this machine may outlive it.
        for v in process::find_by_marker(&paths.dir.display().to_string()) {
            tracing::warn!(machine = %rec.id, pid = v.pid, "killing a leftover VMM before release");
            kill_vmm(&v, "killing a leftover VMM").await?;
        }
        match self.backend(rec.spec.vmm) {
            Ok(b) => b.release(&paths).await?,
            Err(_) => remove_dir_idempotent(&paths.dir).await?,
        }
        if let (Some(net), Some(lease)) = (&self.ctx.net, &rec.network) {
            // Unlike other TAP removals this one must succeed: the lease
            // goes with the record, and nothing would own the device after.
            net.remove_tap(&lease.tap).await?;
            // The rules go before the record, so a client told "deleted"
            // finds nothing of the machine left on the host.
            net.sync_rules_excluding(&self.ctx.store, Some(&rec.id))
                .await?;
        }
        // The outcome is the record's removal, with its last event.
        let timing = step.effect_done(None);
        let id = rec.id.clone();
        let mut ev = EventRecord::new(&id, "deleted");
        ev.from_status = Some(rec.status);
        ev.operation_id = rec.operation_id.clone();
        let mut timings = std::mem::take(&mut self.timings);
        timings.push(timing);
        ev.steps = timings;
        self.ctx
            .store
            .write(move |ctx| {
                ctx.append_event(ev)?;
                ctx.delete_machine(&id)
            })
            .await?;
        self.ctx.storage.mark(&rec.id);
        if rec.spec.base_snapshot.is_some() {
            // The machine may have been the last user of a deleted snapshot.
            if let Err(e) =
                crate::lifecycle::snapshots::collect(&self.ctx.store, &self.ctx.snapshots_dir).await
            {
                tracing::warn!(machine = %rec.id, error = %e, "could not remove unused snapshots");
            }
        }
        if let Some(net) = &self.ctx.net {
            // Again after the commit: a rebuild for another machine that
            // ran in between still saw this lease. Should this fail, the
            // next start of the daemon rebuilds the table.
            if let Err(e) = net.sync_rules(&self.ctx.store).await {
                tracing::error!(machine = %rec.id, error = %e, "could not remove the machine's firewall rules");
            }
        }
        Ok(())
    }

    /// A step failed: make sure nothing runs, then record `failed` with the
    /// reason. A failure while deleting is retried instead, after the
    /// back-off.
    pub(super) async fn fail(
        &mut self,
        rec: &MachineRecord,
        step: Step,
        message: String,
    ) -> Result<(), StoreError> {
        tracing::error!(machine = %rec.id, ?step, error = %message, "machine step failed");
        let latest = self
            .ctx
            .store
            .get_by_id(&rec.id)
            .ok()
            .flatten()
            .map(|m| m.rec.clone())
            .unwrap_or_else(|| rec.clone());
        kill_everything_of(&self.ctx.paths(&rec.id), &latest).await;
        self.vmm_gone(&latest).await;
        let deleting = latest.desired == Desired::Deleted;
        self.timings
            .push(failure_timing(&format!("{step:?}"), message.clone()));
        self.persist(Some(Journal::step_failed(message.clone())), move |r| {
            r.vmm = None;
            r.current_step = None;
            r.stop_kill = false;
            r.observe(Observation::StepFailed);
            if !deleting {
                r.error_message = Some(message);
                r.failed_generation = Some(r.generation);
            }
        })
        .await?;
        if deleting {
            // Deleting is retried until it succeeds.
            self.back_off(&"deleting the machine failed").await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failpoint::CRASH_POINTS;

    #[test]
    fn restart_back_off_doubles_from_half_a_second_up_to_30_s() {
        let ms = |n| restart_delay(n).as_millis();
        assert_eq!(ms(0), 0, "not a policy restart");
        assert_eq!((ms(1), ms(2), ms(3), ms(4)), (500, 1000, 2000, 4000));
        assert_eq!(ms(7), 30_000);
        assert_eq!(ms(100), 30_000);
        assert_eq!(ms(u32::MAX), 30_000);
    }

    /// The crash tests enumerate `CRASH_POINTS`: every declared step must
    /// pass only listed points, in the order a machine's life reaches them.
    #[test]
    fn every_declared_step_passes_listed_crash_points_in_order() {
        for def in [
            &SPAWN,
            &PAUSE,
            &RESUME,
            &GRACEFUL_STOP,
            &KILL,
            &SUSPEND,
            &TAKE_SNAPSHOT,
            &RELEASE,
        ] {
            let at = |p: &str| CRASH_POINTS.iter().position(|c| *c == p);
            let (Some(intent), Some(effect)) = (at(def.after_intent), at(def.after_effect)) else {
                panic!("{}: unlisted crash point", def.name);
            };
            assert!(intent < effect, "{}: effect before intent", def.name);
        }
    }
}

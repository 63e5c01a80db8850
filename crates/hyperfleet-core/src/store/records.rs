//! The durable records the store keeps and how they map to API views.

use std::collections::BTreeMap;

use hyperfleet_api::{
    ApiKey, Machine, MachineEvent, MachineNetwork, MachineStatus, Persistence, Scope, StepTiming,
    VmmKind,
};
use serde::{Deserialize, Serialize};

use crate::util::rfc3339;

/// What the machine was created with; immutable after create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineSpec {
    pub vmm: VmmKind,
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    pub exposed_ports: Vec<u32>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub idle_timeout_seconds: Option<u64>,
    pub persistence: Option<Persistence>,
    /// The guest image (asset set id) the machine's disk was made from.
    #[serde(default)]
    pub image: Option<String>,
    /// The size of the machine's disk (what the guest can fill), recorded at
    /// create time for disk quotas; `None` for machines created before
    /// quotas existed and backends that cannot tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// The guest may reach the internet (masqueraded egress).
    #[serde(default = "default_true")]
    pub egress: bool,
    /// The proxy serves exposed ports without credentials.
    #[serde(default)]
    pub public: bool,
    /// Grants proxy access to exposed ports (query parameter or cookie).
    #[serde(default)]
    pub access_token: Option<String>,
    /// The snapshot the machine's disk is layered over (and whose memory its
    /// first start restores, when the snapshot has memory). The snapshot's
    /// files are kept while any machine names it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_snapshot: Option<String>,
    /// The OCI image the machine's disk is made from (None: the asset
    /// set's rootfs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<crate::images::MachineImage>,
    /// The main process a boot starts (an image's entrypoint and command
    /// with the create's overrides); None: the guest only runs its agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<MainProcess>,
    /// What the run does when the main process exits (None: `no`); an
    /// `on-failure` policy always has its `max_retries`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<hyperfleet_api::RestartPolicy>,
}

/// A machine's main process, fixed at create from its image's config and
/// the create's overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MainProcess {
    /// Entrypoint followed by cmd; never empty.
    pub argv: Vec<String>,
    /// The image's `Env` (`KEY=value`, in order); the machine's `env` is
    /// laid over it when the process starts.
    #[serde(default)]
    pub image_env: Vec<String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

impl MainProcess {
    /// The process's whole environment: the image's, with `env` (the
    /// machine's) laid over it.
    pub fn env(&self, env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut all: BTreeMap<String, String> = self
            .image_env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        all.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }
}

fn default_true() -> bool {
    true
}

/// A machine's network lease: chosen and committed before any host device
/// is made for it, kept until the machine is deleted. Every field derives
/// from the /30 block the allocator picked, and each one is also a row of
/// the `leases` table, whose primary key makes a second holder impossible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetLease {
    /// Index of the /30 block in the subnet.
    pub block: u32,
    pub ip: std::net::Ipv4Addr,
    pub gateway: std::net::Ipv4Addr,
    pub prefix_len: u8,
    pub mac: String,
    pub tap: String,
}

/// Identity of a VMM process: enough to tell *our* process from a later
/// process that reused the pid, even across a host reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmIdentity {
    pub pid: i32,
    /// Start time in clock ticks after boot (field 22 of /proc/PID/stat).
    pub start_time: u64,
    /// /proc/sys/kernel/random/boot_id at spawn time.
    pub boot_id: String,
}

/// The state a request asks the machine run to reach (the `desired`
/// column). The lifecycle's transition table decides which request records
/// which; the store only keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Desired {
    Running,
    Paused,
    Stopped,
    Suspended,
    Deleted,
}

impl Desired {
    pub fn as_str(self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Paused => "paused",
            Desired::Stopped => "stopped",
            Desired::Suspended => "suspended",
            Desired::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Desired> {
        [
            Desired::Running,
            Desired::Paused,
            Desired::Stopped,
            Desired::Suspended,
            Desired::Deleted,
        ]
        .into_iter()
        .find(|d| d.as_str() == s)
    }

    /// The public status shown as `desired_status`.
    pub fn as_status(self) -> MachineStatus {
        match self {
            Desired::Running => MachineStatus::Running,
            Desired::Paused => MachineStatus::Paused,
            Desired::Stopped => MachineStatus::Stopped,
            Desired::Suspended => MachineStatus::Suspended,
            Desired::Deleted => MachineStatus::Deleting,
        }
    }
}

/// Step names as journaled (`current_step`, the step journal) and shown in
/// events. They are stored data: the machine run writes them, and whoever
/// reads a record (the network sweep, recovery) may need to recognise one.
pub mod steps {
    pub const PREPARE: &str = "prepare_disk";
    pub const SPAWN: &str = "spawn_vmm";
    pub const LEASE: &str = "lease_network";
    pub const UID: &str = "lease_uid";
    pub const TAP: &str = "create_tap";
    pub const RULES: &str = "apply_firewall";
    pub const ADOPT: &str = "adopt_vmm";
    pub const WAIT_READY: &str = "wait_agent";
    pub const VERIFY: &str = "verify_vmm";
    pub const PAUSE: &str = "pause_vcpus";
    pub const RESUME: &str = "resume_vcpus";
    pub const GRACEFUL_STOP: &str = "graceful_shutdown";
    pub const KILL: &str = "kill_vmm";
    pub const SAVE_STATE: &str = "save_memory";
    pub const DISCARD_SNAPSHOT: &str = "discard_snapshot";
    /// Taking a snapshot (`POST /machines/{id}/snapshots`, fork, template).
    pub const TAKE_SNAPSHOT: &str = "take_snapshot";
    /// Giving a machine restored from another's memory its own identity.
    pub const REFRESH_IDENTITY: &str = "refresh_identity";
    /// Starting the machine's main process after a boot.
    pub const START_MAIN: &str = "start_main_process";
    pub const RELEASE: &str = "release_resources";
    pub const FORGET: &str = "vmm_gone";
    /// Journaled when a step failed (the failed step is in the detail).
    pub const FAILED: &str = "step_failed";
}

/// One machine's durable record: spec, desired state, observed status and
/// everything the machine run needs to resume after a crash.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineRecord {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub spec: MachineSpec,
    pub status: MachineStatus,
    pub desired: Desired,
    /// Bumped by every accepted request that changes the desired state.
    pub generation: u64,
    /// The generation the run last converged on (status == desired).
    pub observed_generation: u64,
    /// Bumped by every accepted restart.
    pub restart_seq: u64,
    /// `restart_seq` when the current VMM was spawned.
    pub boot_restart_seq: u64,
    /// The next stop skips the graceful shutdown.
    pub stop_kill: bool,
    /// The generation at which the run gave up; it retries only after a new request.
    pub failed_generation: Option<u64>,
    /// Why the machine failed; for a `stopped` machine, why it exited
    /// without being asked (`exit_reason` in the API: "guest powered
    /// off"). One column serves both, as a machine is never both; cleared
    /// by the next start.
    pub error_message: Option<String>,
    pub vmm: Option<VmmIdentity>,
    /// The step journaled as started and not yet finished (crash recovery).
    pub current_step: Option<String>,
    /// The create-time work (machine directory, disk) is done.
    pub prepared: bool,
    /// A suspend image exists for this machine.
    pub has_snapshot: bool,
    pub operation_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    /// The network lease, once taken (first start with networking on).
    pub network: Option<NetLease>,
    /// The unprivileged uid (= gid) the machine's jailed VMM runs as, once
    /// leased (first jailed start); kept until the machine is deleted
    /// (`vmm::uid`).
    pub jail_uid: Option<u32>,
    /// A snapshot (its id) the run is to take when the machine is next in
    /// a state to take it (`snapshots` row in status `creating`).
    pub snapshot_job: Option<String>,
    /// When the machine was last used (ms since the epoch), as recorded by
    /// requests and when it stopped being used; None: never recorded. The
    /// idle timer's in-memory activity is newer while the machine runs.
    pub last_active_at: Option<i64>,
    /// The exit code of the main process when its exit stopped the machine
    /// (the restart policy decides whether it boots again); cleared by the
    /// next spawn.
    pub exit_code: Option<i32>,
    /// Boots the restart policy made since the last start or restart
    /// request.
    pub restart_count: u32,
}

impl MachineSpec {
    /// The persistence policy, defaults filled in (machines created before
    /// policies existed are sticky, priority 5).
    pub fn persistence(&self) -> Persistence {
        Persistence::effective(self.persistence.as_ref())
    }

    /// The machine is deleted when it stops and never suspended.
    pub fn ephemeral(&self) -> bool {
        self.persistence().kind == hyperfleet_api::PersistenceType::Ephemeral
    }
}

impl MachineRecord {
    /// A machine as created: `pending`, nothing prepared, no VMM, no lease.
    pub fn new(id: String, tenant: &str, name: String, spec: MachineSpec, now: i64) -> Self {
        MachineRecord {
            id,
            tenant: tenant.to_string(),
            name,
            spec,
            status: MachineStatus::Pending,
            desired: Desired::Stopped,
            generation: 1,
            observed_generation: 1,
            restart_seq: 0,
            boot_restart_seq: 0,
            stop_kill: false,
            failed_generation: None,
            error_message: None,
            vmm: None,
            current_step: None,
            prepared: false,
            has_snapshot: false,
            operation_id: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            network: None,
            jail_uid: None,
            snapshot_job: None,
            last_active_at: None,
            exit_code: None,
            restart_count: 0,
        }
    }

    pub fn to_api(&self) -> Machine {
        self.to_api_with(None)
    }

    /// The API view, with a proxy URL for each exposed port when the proxy
    /// is on.
    pub fn to_api_with(&self, urls: Option<&crate::urls::UrlTemplate>) -> Machine {
        Machine {
            id: self.id.clone(),
            name: self.name.clone(),
            status: self.status,
            // A machine never started wants nothing yet: show it as pending.
            desired_status: if self.status == MachineStatus::Pending
                && self.desired == Desired::Stopped
            {
                MachineStatus::Pending
            } else {
                self.desired.as_status()
            },
            vmm: self.spec.vmm,
            vcpu_count: self.spec.vcpu_count,
            mem_size_mib: self.spec.mem_size_mib,
            exposed_ports: self.spec.exposed_ports.clone(),
            env: self.spec.env.clone(),
            metadata: self.spec.metadata.clone(),
            idle_timeout_seconds: self.spec.idle_timeout_seconds,
            persistence: Some(self.spec.persistence()),
            image: self.spec.image.clone(),
            snapshot_id: self.spec.base_snapshot.clone(),
            generation: self.generation,
            // One column holds both (see the field): a stopped machine's
            // message is why it exited, any other's why it failed.
            error_message: self
                .error_message
                .clone()
                .filter(|_| self.status == MachineStatus::Failed),
            exit_reason: self
                .error_message
                .clone()
                .filter(|_| self.status == MachineStatus::Stopped),
            network: MachineNetwork {
                egress: self.spec.egress,
                ip: self.network.as_ref().map(|n| n.ip.to_string()),
                gateway: self.network.as_ref().map(|n| n.gateway.to_string()),
                prefix_len: self.network.as_ref().map(|n| n.prefix_len),
                mac: self.network.as_ref().map(|n| n.mac.clone()),
                tap: self.network.as_ref().map(|n| n.tap.clone()),
            },
            public: self.spec.public,
            access_token: self.spec.access_token.clone(),
            urls: urls
                .map(|t| {
                    self.spec
                        .exposed_ports
                        .iter()
                        .map(|p| (p.to_string(), t.url(*p, &self.id)))
                        .collect()
                })
                .unwrap_or_default(),
            created_at: rfc3339(self.created_at),
            updated_at: rfc3339(self.updated_at),
            started_at: self.started_at.map(rfc3339),
            // Activity is the supervisor's (in memory): the API fills these in.
            last_active_at: None,
            idle_deadline: None,
            oci_image: self.spec.oci.as_ref().map(|o| o.to_api()),
            // Measured by the storage accounting: the API fills it in.
            stored_bytes: None,
            process: self
                .spec
                .process
                .as_ref()
                .map(|p| hyperfleet_api::MachineProcess {
                    argv: p.argv.clone(),
                    workdir: p.workdir.clone(),
                    user: p.user.clone(),
                }),
            restart_policy: self.spec.restart.unwrap_or_default(),
            restart_count: self.restart_count,
            exit_code: self.exit_code,
        }
    }
}

/// An event as stored (the API view adds RFC 3339 rendering).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub id: i64,
    pub machine_id: String,
    pub at: i64,
    pub kind: String,
    pub from_status: Option<MachineStatus>,
    pub to_status: Option<MachineStatus>,
    pub operation_id: Option<String>,
    pub message: Option<String>,
    pub steps: Vec<StepTiming>,
}

impl EventRecord {
    pub fn new(machine_id: &str, kind: &str) -> Self {
        EventRecord {
            id: 0,
            machine_id: machine_id.to_string(),
            at: crate::util::now_ms(),
            kind: kind.to_string(),
            from_status: None,
            to_status: None,
            operation_id: None,
            message: None,
            steps: Vec::new(),
        }
    }

    pub fn to_api(&self) -> MachineEvent {
        MachineEvent {
            id: self.id,
            machine_id: self.machine_id.clone(),
            at: rfc3339(self.at),
            kind: self.kind.clone(),
            from_status: self.from_status,
            to_status: self.to_status,
            operation_id: self.operation_id.clone(),
            message: self.message.clone(),
            steps: self.steps.clone(),
        }
    }
}

/// An API key as stored: only the hash of the secret.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub hash: String,
    pub prefix: String,
    pub scopes: Vec<Scope>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl KeyRecord {
    pub fn to_api(&self) -> ApiKey {
        ApiKey {
            id: self.id.clone(),
            name: self.name.clone(),
            prefix: self.prefix.clone(),
            tenant: self.tenant.clone(),
            scopes: self.scopes.clone(),
            created_at: rfc3339(self.created_at),
            expires_at: self.expires_at.map(rfc3339),
            revoked_at: self.revoked_at.map(rfc3339),
        }
    }
}

//! Machines: the create request, the machine as the API shows it, and the
//! public status vocabulary.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The observed status of a machine. What the API reports is what the
/// machine run observed on the host, never what was merely requested.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum MachineStatus {
    /// Created, never started: disk and identity are prepared, no VMM.
    Pending,
    /// A VMM process exists and the guest is booting.
    Starting,
    /// The guest agent answered: commands and files work.
    Running,
    /// vCPUs are stopped; memory stays in the VMM process.
    Paused,
    /// Shutting down (graceful, then forced after a deadline).
    Stopping,
    /// No VMM process; the disk is kept. `start` boots from it.
    Stopped,
    /// Memory is being saved to disk.
    Suspending,
    /// Memory saved to disk, no VMM process; `resume`/`start` restores it.
    Suspended,
    /// A step failed; `error_message` says why. Nothing runs.
    Failed,
    /// Releasing everything the machine owns; the record goes away next.
    Deleting,
}

impl MachineStatus {
    pub const ALL: [MachineStatus; 10] = [
        MachineStatus::Pending,
        MachineStatus::Starting,
        MachineStatus::Running,
        MachineStatus::Paused,
        MachineStatus::Stopping,
        MachineStatus::Stopped,
        MachineStatus::Suspending,
        MachineStatus::Suspended,
        MachineStatus::Failed,
        MachineStatus::Deleting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MachineStatus::Pending => "pending",
            MachineStatus::Starting => "starting",
            MachineStatus::Running => "running",
            MachineStatus::Paused => "paused",
            MachineStatus::Stopping => "stopping",
            MachineStatus::Stopped => "stopped",
            MachineStatus::Suspending => "suspending",
            MachineStatus::Suspended => "suspended",
            MachineStatus::Failed => "failed",
            MachineStatus::Deleting => "deleting",
        }
    }
}

impl fmt::Display for MachineStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MachineStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MachineStatus::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = MachineStatus::ALL.iter().map(|x| x.as_str()).collect();
                format!("unknown status '{s}'; expected one of {}", names.join(", "))
            })
    }
}

/// Which virtual machine monitor runs the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmmKind {
    /// QEMU `microvm` (KVM where usable, TCG otherwise).
    Qemu,
    /// Firecracker (needs hardware KVM).
    Firecracker,
    /// A stand-in process with no guest, for testing the control plane.
    Stub,
}

impl VmmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VmmKind::Qemu => "qemu",
            VmmKind::Firecracker => "firecracker",
            VmmKind::Stub => "stub",
        }
    }
}

impl fmt::Display for VmmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VmmKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "qemu" => Ok(VmmKind::Qemu),
            "firecracker" => Ok(VmmKind::Firecracker),
            "stub" => Ok(VmmKind::Stub),
            _ => Err(format!(
                "unknown VMM '{s}'; expected one of qemu, firecracker, stub"
            )),
        }
    }
}

/// What happens to a machine's storage (docs/api.md "Persistence").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PersistenceType {
    /// Kept while the storage budget allows: when the data dir is over
    /// `--storage-budget`, the evictor reclaims sticky machines that are not
    /// running (memory image first, then the machine), lowest `priority`
    /// first, then least recently active.
    Sticky,
    /// Never evicted; when nothing else can be reclaimed, creates and
    /// suspends are refused (507) instead.
    Persistent,
    /// Deleted when it stops (asked to, or its guest powers off) or reaches
    /// its idle timeout; never suspended.
    Ephemeral,
}

impl PersistenceType {
    pub fn as_str(self) -> &'static str {
        match self {
            PersistenceType::Sticky => "sticky",
            PersistenceType::Persistent => "persistent",
            PersistenceType::Ephemeral => "ephemeral",
        }
    }
}

impl fmt::Display for PersistenceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PersistenceType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sticky" => Ok(PersistenceType::Sticky),
            "persistent" => Ok(PersistenceType::Persistent),
            "ephemeral" => Ok(PersistenceType::Ephemeral),
            _ => Err(format!(
                "unknown persistence '{s}'; expected one of sticky, persistent, ephemeral"
            )),
        }
    }
}

/// How long a machine's storage is kept (docs/api.md "Persistence").
/// Default `{"type": "sticky", "priority": 5}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Persistence {
    #[serde(rename = "type")]
    pub kind: PersistenceType,
    /// 0–10, default 5: among sticky machines the evictor reclaims lower
    /// priorities first. Kept, but without effect, for the other types.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[schema(minimum = 0, maximum = 10)]
    pub priority: Option<u8>,
}

impl Persistence {
    /// The priority of a sticky machine created without one.
    pub const DEFAULT_PRIORITY: u8 = 5;
    /// The highest priority.
    pub const MAX_PRIORITY: u8 = 10;

    /// The policy a machine created with `p` has: `p`, else sticky; the
    /// priority filled in.
    pub fn effective(p: Option<&Persistence>) -> Persistence {
        Persistence {
            kind: p.map_or(PersistenceType::Sticky, |p| p.kind),
            priority: Some(
                p.and_then(|p| p.priority)
                    .unwrap_or(Persistence::DEFAULT_PRIORITY),
            ),
        }
    }
}

impl fmt::Display for Persistence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.priority {
            Some(p) => write!(f, "{}:{p}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

/// `sticky`, `sticky:3`, `persistent`: the CLI's form.
impl FromStr for Persistence {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, priority) = match s.split_once(':') {
            Some((k, p)) => {
                let p: u8 = p
                    .parse()
                    .ok()
                    .filter(|p| *p <= Persistence::MAX_PRIORITY)
                    .ok_or_else(|| format!("priority '{p}' is not a whole number from 0 to 10"))?;
                (k, Some(p))
            }
            None => (s, None),
        };
        Ok(Persistence {
            kind: kind.parse()?,
            priority,
        })
    }
}

/// Bounds the API enforces on a machine spec. Documented in docs/api.md.
pub struct Limits {
    pub name_max_len: usize,
    pub vcpu_min: u32,
    pub vcpu_max: u32,
    pub mem_min_mib: u32,
    pub mem_max_mib: u32,
    pub exposed_ports_max: usize,
    pub env_max: usize,
    pub env_key_max_len: usize,
    pub env_value_max_len: usize,
    pub metadata_max: usize,
    pub metadata_key_max_len: usize,
    pub metadata_value_max_len: usize,
    pub idle_timeout_max_seconds: u64,
}

pub const LIMITS: Limits = Limits {
    name_max_len: 63,
    vcpu_min: 1,
    vcpu_max: 32,
    mem_min_mib: 128,
    mem_max_mib: 65536,
    exposed_ports_max: 32,
    env_max: 128,
    env_key_max_len: 128,
    env_value_max_len: 32 * 1024,
    metadata_max: 64,
    metadata_key_max_len: 63,
    metadata_value_max_len: 1024,
    idle_timeout_max_seconds: 7 * 24 * 3600,
};

/// `POST /machines`. Unknown fields are rejected.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMachineRequest {
    /// DNS label (lowercase letters, digits, `-`; starts with a letter; at
    /// most 63 characters), unique per tenant. Generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        max_length = 63,
        pattern = "^(?!m[0-9a-hjkmnp-tv-z]{15}$)[a-z]([a-z0-9-]*[a-z0-9])?$"
    )]
    pub name: Option<String>,
    /// 1–32; default 1.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[schema(minimum = 1, maximum = 32)]
    pub vcpu_count: Option<u32>,
    /// 128–65536 MiB; default 256.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[schema(minimum = 128, maximum = 65536)]
    pub mem_size_mib: Option<u32>,
    /// Guest ports reachable through the proxy, 1–65535, at most 32, no duplicates.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::whole::vec"
    )]
    #[schema(schema_with = crate::schema::exposed_ports)]
    pub exposed_ports: Vec<u32>,
    /// The backend; defaults to the server's `--default-vmm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<VmmKind>,
    /// Suspend the machine after this many seconds without activity; 0:
    /// never; null or absent: the server's `--default-idle-timeout`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[schema(maximum = 604800)]
    pub idle_timeout_seconds: Option<u64>,
    /// How long the machine's storage is kept; default sticky, priority 5
    /// (docs/api.md "Persistence").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistence: Option<Persistence>,
    /// Environment for commands run in the guest, and laid over the image's
    /// for its main process.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = crate::schema::machine_env)]
    pub env: BTreeMap<String, String>,
    /// Free-form labels for the caller's own bookkeeping.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = crate::schema::machine_metadata)]
    pub metadata: BTreeMap<String, String>,
    /// The machine's network; default `{"egress": true}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkRequest>,
    /// Exposed ports are reachable through the proxy without credentials.
    /// Default false: the proxy then asks for an API key or the machine's
    /// access token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<bool>,
    /// Make the machine from this snapshot (id or name): its disk is a
    /// copy-on-write layer over the snapshot's, and when the snapshot holds
    /// memory its first start continues the snapshot's guest instead of
    /// booting. `vcpu_count`, `mem_size_mib` and `vmm` default to the
    /// snapshot's and must match it when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// An OCI image as the machine's root filesystem: an image id of the
    /// tenant (`img_…`, see `/images`) or a reference, pulled first when the
    /// tenant has no ready image of that reference (the create then takes
    /// as long as the pull). Absent: the built-in guest image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 512)]
    pub image: Option<String>,
    // Main process (issue 14): these need `image`.
    /// Replaces the image's `Entrypoint` (and, as with Docker, drops the
    /// image's `Cmd` unless `cmd` is given too); `[]` clears it. Needs `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::process_argv)]
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's `Cmd` (the arguments after the entrypoint, or
    /// the command when there is none); `[]` clears it. Needs `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::process_argv)]
    pub cmd: Option<Vec<String>>,
    /// Replaces the image's `WorkingDir`: an absolute guest path. Needs `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::guest_path)]
    pub workdir: Option<String>,
    /// Replaces the image's `User`: `name`, `uid`, `name:group` or
    /// `uid:gid` (names are looked up in the image's `/etc/passwd` and
    /// `/etc/group`). Needs `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        min_length = 1,
        max_length = 256,
        pattern = "^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?$"
    )]
    pub user: Option<String>,
    /// What happens when the main process exits; default `{"policy": "no"}`.
    /// Needs `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
}

/// When a machine's main process exits, whether the machine boots again
/// (as Fly Machines' restart policy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicyKind {
    /// Never: the machine stays `stopped` with the exit code.
    #[default]
    No,
    /// Whatever the exit code.
    Always,
    /// When the exit code is not 0, at most `max_retries` times in a row.
    OnFailure,
}

impl RestartPolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicyKind::No => "no",
            RestartPolicyKind::Always => "always",
            RestartPolicyKind::OnFailure => "on-failure",
        }
    }
}

/// `restart` of a machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    pub policy: RestartPolicyKind,
    /// `on-failure` only: how many restarts in a row at most, 0–100;
    /// default 3. Shown for `on-failure`, null otherwise.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt"
    )]
    #[schema(minimum = 0, maximum = 100)]
    pub max_retries: Option<u32>,
}

/// `max_retries` of an `on-failure` policy that gives none.
pub const DEFAULT_MAX_RETRIES: u32 = 3;
/// The most `max_retries` accepted.
pub const MAX_RETRIES_MAX: u32 = 100;

/// The main process of a machine made from an image, as it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MachineProcess {
    /// Entrypoint followed by cmd.
    pub argv: Vec<String>,
    /// The working directory; null: `/`.
    pub workdir: Option<String>,
    /// The user; null: root.
    pub user: Option<String>,
}

/// `network` in `POST /machines`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkRequest {
    /// Outbound traffic to the internet, masqueraded through the host's
    /// default route. Default true. Guests never reach each other or the
    /// host's own services either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<bool>,
}

/// A machine's network identity. The address fields are null until the
/// machine first starts (the lease is taken then and kept until delete),
/// and always null when the daemon runs with networking off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MachineNetwork {
    /// Whether the guest may reach the internet.
    pub egress: bool,
    /// The guest's IPv4 address.
    pub ip: Option<String>,
    /// The host end of the machine's point-to-point link (the guest's
    /// default gateway).
    pub gateway: Option<String>,
    /// Prefix length of the link (30: the gateway and the guest).
    pub prefix_len: Option<u8>,
    pub mac: Option<String>,
    /// The host's TAP device for this machine.
    pub tap: Option<String>,
}

/// A machine as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Machine {
    pub id: String,
    pub name: String,
    /// What is true on the host now.
    pub status: MachineStatus,
    /// What was last asked for; the machine run moves `status` toward it.
    pub desired_status: MachineStatus,
    pub vmm: VmmKind,
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    pub exposed_ports: Vec<u32>,
    /// Environment for commands run in the guest (and, over the image's,
    /// for its main process). The values may be
    /// secrets: keys without the `exec` (or `admin`) scope see each value
    /// replaced by `"<redacted>"` (the names stay).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub idle_timeout_seconds: Option<u64>,
    /// The machine's persistence policy, its defaults filled in.
    pub persistence: Option<Persistence>,
    /// The guest image (asset set id) the machine's disk was made from;
    /// null for backends with no guest.
    #[serde(default)]
    pub image: Option<String>,
    /// The snapshot the machine was made from (its disk's base), if any.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// Increases with every accepted change of the desired state.
    pub generation: u64,
    /// Why the machine is `failed`; null otherwise.
    pub error_message: Option<String>,
    /// Why the machine is `stopped` although nobody asked it to stop:
    /// `"guest powered off"` when its guest powered itself off (a finite
    /// workload ended). Null otherwise, and once the machine starts again.
    #[serde(default)]
    pub exit_reason: Option<String>,
    #[serde(default)]
    pub network: MachineNetwork,
    /// Exposed ports are reachable through the proxy without credentials.
    #[serde(default)]
    pub public: bool,
    /// Grants proxy access to this machine's exposed ports, as
    /// `?hf_token=`, or the `hf_token` cookie on the host-name form only
    /// (see docs/networking.md).
    /// Shown only to keys with the `exec` (or `admin`) scope, the scope the
    /// proxy asks of API keys; null for every other key.
    #[serde(default)]
    pub access_token: Option<String>,
    /// The proxy URL of each exposed port, keyed by port.
    #[serde(default)]
    pub urls: BTreeMap<String, String>,
    pub created_at: String,
    pub updated_at: String,
    /// When the guest last became `running`.
    pub started_at: Option<String>,
    /// When the machine was last used (a proxied request or open
    /// connection, a guest call, the guest's own network traffic, a
    /// request that changed its desired state; a daemon restart counts
    /// too). Null unless the machine is running, paused, suspending or
    /// suspended.
    #[serde(default)]
    pub last_active_at: Option<String>,
    /// When the machine will be suspended (an ephemeral one: deleted) for
    /// idleness if nothing uses it meanwhile: while it is `running` with an
    /// idle timeout; null otherwise.
    #[serde(default)]
    pub idle_deadline: Option<String>,
    /// The OCI image the machine's root filesystem was made from; null for
    /// the built-in guest image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci_image: Option<MachineOciImage>,
    /// Bytes the machine holds on the data directory's disk (its disk
    /// overlay and files, plus its memory image while suspended; allocated
    /// blocks, not apparent sizes), as last measured by the storage
    /// accounting (at most about 30 s old); absent until measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
    // Main process (issue 14).
    /// The main process the guest runs (an OCI image's entrypoint and
    /// command, with the create's overrides); null when there is none (the
    /// built-in guest image, an image with neither).
    #[serde(default)]
    pub process: Option<MachineProcess>,
    /// What happens when the main process exits (`restart` of the create
    /// request; named apart from the `restart` action).
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// How many times the restart policy booted the machine again since it
    /// was last started (or restarted) by a request.
    #[serde(default)]
    pub restart_count: u32,
    /// The exit code of the main process when the machine stopped because
    /// it exited (128 + the signal for a process killed by one; 127 or 126
    /// when it could not be started); null otherwise, and once the machine
    /// starts again.
    #[serde(default)]
    pub exit_code: Option<i32>,
}

/// A map that, when present, is one: `null` is refused (absent means
/// unchanged; `{}` empties it).
fn present_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    BTreeMap::deserialize(d).map(Some)
}

/// `PATCH /machines/{id}`: the settings a machine may change after create.
/// Absent fields stay as they are. Unknown fields are rejected.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateMachineRequest {
    /// Seconds without activity before the machine is suspended (or, when
    /// ephemeral, deleted); 0: never; null: the server's
    /// `--default-idle-timeout`. The idle deadline starts over from the
    /// update.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt_nullable"
    )]
    #[schema(value_type = Option<u64>, maximum = 604800, nullable)]
    pub idle_timeout_seconds: Option<Option<u64>>,
    /// The new persistence policy (a priority left out is 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistence: Option<Persistence>,
    /// Replaces the machine's metadata as a whole (`{}` removes it all).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_map"
    )]
    #[schema(schema_with = crate::schema::machine_metadata)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `oci_image` of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MachineOciImage {
    /// The image record (`/images/{id}`).
    pub id: String,
    /// The reference it was pulled as; null for an import.
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    /// The image's config digest.
    pub digest: String,
}

/// What each `env` value reads as to a key that may not see secrets.
pub(crate) const REDACTED: &str = "<redacted>";

impl Machine {
    /// Hides what grants access to the guest or may be a secret in it, for
    /// keys without the `exec` scope: the proxy access token and the env
    /// values.
    pub fn redact_secrets(&mut self) {
        self.access_token = None;
        for v in self.env.values_mut() {
            *v = REDACTED.to_string();
        }
    }
}

/// `GET /machines`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MachineList {
    pub machines: Vec<Machine>,
    /// How many machines match the filter, ignoring limit and offset.
    pub total: u64,
}

#[cfg(test)]
mod schema_tests {
    use super::*;
    use utoipa::PartialSchema;

    /// The bounds in the OpenAPI schema are literals (the derive takes no
    /// constants): they must be the ones the server enforces.
    #[test]
    fn the_schema_states_the_limits_the_server_enforces() {
        let s = serde_json::to_value(CreateMachineRequest::schema()).unwrap();
        let p = &s["properties"];
        assert_eq!(p["vcpu_count"]["minimum"], LIMITS.vcpu_min);
        assert_eq!(p["vcpu_count"]["maximum"], LIMITS.vcpu_max);
        assert_eq!(p["mem_size_mib"]["minimum"], LIMITS.mem_min_mib);
        assert_eq!(p["mem_size_mib"]["maximum"], LIMITS.mem_max_mib);
        assert_eq!(p["name"]["maxLength"], LIMITS.name_max_len);
        assert_eq!(
            p["idle_timeout_seconds"]["maximum"],
            LIMITS.idle_timeout_max_seconds
        );
        assert_eq!(p["exposed_ports"]["maxItems"], LIMITS.exposed_ports_max);
        assert_eq!(p["env"]["maxProperties"], LIMITS.env_max);
        assert_eq!(p["metadata"]["maxProperties"], LIMITS.metadata_max);
        let s = serde_json::to_value(Persistence::schema()).unwrap();
        assert_eq!(
            s["properties"]["priority"]["maximum"],
            Persistence::MAX_PRIORITY
        );
    }

    #[test]
    fn persistence_reads_the_cli_form_and_fills_its_defaults() {
        let p: Persistence = "sticky:3".parse().unwrap();
        assert_eq!((p.kind, p.priority), (PersistenceType::Sticky, Some(3)));
        assert_eq!(p.to_string(), "sticky:3");
        let p: Persistence = "ephemeral".parse().unwrap();
        assert_eq!((p.kind, p.priority), (PersistenceType::Ephemeral, None));
        "sticky:11".parse::<Persistence>().unwrap_err();
        "forever".parse::<Persistence>().unwrap_err();
        let d = Persistence::effective(None);
        assert_eq!((d.kind, d.priority), (PersistenceType::Sticky, Some(5)));
        // null priority in JSON: the default.
        let p: Persistence =
            serde_json::from_str(r#"{"type":"persistent","priority":null}"#).unwrap();
        assert_eq!(Persistence::effective(Some(&p)).priority, Some(5));
    }
}

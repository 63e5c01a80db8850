//! Command-line arguments. Flags fall back to `HYPERFLEET_*` environment
//! variables (and the seeds' `PORT`, `PROXY_PORT`, `DISABLE_AUTH`, read in
//! `serve::settings`); docs/configuration.md has the full table.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hyperfleet_core::config::GuestLimits;

#[derive(Parser)]
#[command(
    name = "hyperfleet",
    version,
    about = "Durable microVMs: daemon and CLI"
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub(crate) struct ClientArgs {
    /// Server URL for client commands.
    #[arg(
        long,
        global = true,
        env = "HYPERFLEET_URL",
        default_value = "http://127.0.0.1:3000"
    )]
    pub url: String,
    /// API key (`hf_…`). Defaults to the server's bootstrap key file when readable.
    #[arg(
        long,
        global = true,
        env = "HYPERFLEET_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Data directory, used to find the bootstrap key file when no key is given.
    #[arg(
        long,
        global = true,
        env = "HYPERFLEET_DATA_DIR",
        default_value = "/var/lib/hyperfleet"
    )]
    pub data_dir: PathBuf,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the daemon.
    // Boxed: the daemon's flags outweigh every other command's.
    Serve(Box<ServeArgs>),
    /// Check this host and say what to fix (for the settings `serve` would
    /// run with: it takes the same flags and environment variables).
    Doctor(Box<DoctorArgs>),
    /// Print the OpenAPI document.
    Openapi,
    /// Create, inspect and control machines.
    #[command(subcommand)]
    Machines(MachinesCmd),
    /// Take, list and delete snapshots (machines are created from them with
    /// `machines create --snapshot`).
    #[command(subcommand)]
    Snapshots(SnapshotsCmd),
    /// Templates: snapshots of a freshly booted guest per machine shape, which
    /// fast creates restore instead of booting (warming needs an admin key).
    #[command(subcommand)]
    Templates(TemplatesCmd),
    /// Manage API keys (admin scope).
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Show and set tenant quotas (setting needs an operator admin key).
    #[command(subcommand)]
    Quota(QuotaCmd),
    /// Show the storage budget, what the data directory holds and the
    /// evictor's latest reclaims (a read key of the operator's tenant).
    Storage,
    /// Pull, import, list and delete OCI images.
    #[command(subcommand)]
    Images(ImagesCmd),
    /// Build and inspect the guest assets (kernel, initramfs, root filesystem).
    #[command(subcommand)]
    Assets(AssetsCmd),
}

#[derive(Subcommand)]
pub(crate) enum AssetsCmd {
    /// Build the guest kernel, initramfs and root filesystem from Debian
    /// packages into <data-dir>/assets/<id> and make it the current set.
    Build {
        /// The static guest agent (default: hyperfleet-agent next to this binary).
        #[arg(long)]
        agent: Option<PathBuf>,
    },
    /// Show the current set; `--verify` rechecks every checksum.
    Show {
        #[arg(long)]
        verify: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum VmmChoice {
    Auto,
    Qemu,
    Firecracker,
    Stub,
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "HYPERFLEET_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port for the API [env: HYPERFLEET_PORT, else PORT] [default: 3000].
    // The environment is read in `serve::settings`: clap takes one name.
    #[arg(long)]
    pub port: Option<u16>,
    /// Development only: no API keys; every request is an admin of tenant
    /// `default` [env: HYPERFLEET_DISABLE_AUTH, else DISABLE_AUTH].
    #[arg(long)]
    pub disable_auth: bool,
    /// Backend for machines created without `vmm` (`auto` picks the best available).
    #[arg(
        long,
        env = "HYPERFLEET_DEFAULT_VMM",
        value_enum,
        default_value = "auto"
    )]
    pub default_vmm: VmmChoice,
    /// The stand-in VMM binary for the `stub` backend (tests).
    #[arg(long, env = "HYPERFLEET_STUB_VMM_BINARY")]
    pub stub_vmm_binary: Option<PathBuf>,
    /// Seconds a guest may take to become ready before the machine fails.
    #[arg(long, env = "HYPERFLEET_BOOT_TIMEOUT", default_value_t = 60)]
    pub boot_timeout: u64,
    /// Seconds a graceful stop may take before the VMM is killed.
    #[arg(long, env = "HYPERFLEET_STOP_TIMEOUT", default_value_t = 10)]
    pub stop_timeout: u64,
    /// Machine records kept in memory (about 1.3 KB each); the rest are read
    /// from the database when asked for.
    #[arg(long, env = "HYPERFLEET_MACHINE_CACHE", default_value_t = hyperfleet_core::store::DEFAULT_CACHED_MACHINES)]
    pub machine_cache: std::num::NonZeroUsize,
    /// The most bytes a JSON-form guest answer carries: a file read as JSON,
    /// the encoded stdout plus stderr of a buffered exec. More goes through
    /// the streamed forms (`?raw=true`, `?stream=true`).
    #[arg(long, env = "HYPERFLEET_GUEST_JSON_MAX_BYTES", default_value_t = GuestLimits::default().json_max_bytes)]
    pub guest_json_max_bytes: usize,
    /// Guest requests (exec, files, logs) one tenant may have in progress at
    /// once; more get 429.
    #[arg(long, env = "HYPERFLEET_GUEST_REQUESTS_PER_TENANT", default_value_t = nonzero(GuestLimits::default().per_tenant))]
    pub guest_requests_per_tenant: std::num::NonZeroUsize,
    /// Guest requests in progress at once, all tenants together; more get 429.
    #[arg(long, env = "HYPERFLEET_GUEST_REQUESTS_TOTAL", default_value_t = nonzero(GuestLimits::default().total))]
    pub guest_requests_total: std::num::NonZeroUsize,
    /// Seconds a client has to send a request's headers, on a new API
    /// connection and between keep-alive requests; then it is closed.
    #[arg(long, env = "HYPERFLEET_API_HEADER_TIMEOUT", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub api_header_timeout: u64,
    /// Seconds an API connection may sit with no request in progress and no
    /// byte moving, or with a response its peer stopped reading, before it
    /// is closed (long-polls and quiet streams are in progress).
    #[arg(long, env = "HYPERFLEET_API_IDLE_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub api_idle_timeout: u64,
    /// API connections served at once (at most a quarter of the open-file
    /// limit); at the cap a new client closes the connection idle longest.
    #[arg(long, env = "HYPERFLEET_API_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub api_max_connections: u64,
    /// Log format.
    #[arg(
        long,
        env = "HYPERFLEET_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// QEMU acceleration: `auto` uses KVM where the host has usable hardware
    /// virtualisation and TCG (software) otherwise (`hyperfleet doctor` explains).
    #[arg(
        long,
        env = "HYPERFLEET_QEMU_ACCEL",
        value_enum,
        default_value = "auto"
    )]
    pub qemu_accel: AccelArg,
    /// Whom QEMU VMMs run as: `machine-uid` runs each as an unprivileged uid
    /// (= gid) of its machine's own from the --jailer-uid-base/--jailer-uid-count
    /// range, with no capabilities or supplementary groups (needs root);
    /// `root` as the daemon's user; `auto` is machine-uid when the daemon
    /// runs as root. QEMU is seccomp-sandboxed either way.
    #[arg(
        long,
        env = "HYPERFLEET_QEMU_RUN_AS",
        value_enum,
        default_value = "auto"
    )]
    pub qemu_run_as: RunAsArg,
    /// The QEMU binary.
    #[arg(
        long,
        env = "HYPERFLEET_QEMU_BINARY",
        default_value = "qemu-system-x86_64"
    )]
    pub qemu_binary: PathBuf,
    /// The Firecracker binary (looked up in PATH, then /usr/local/bin).
    #[arg(
        long,
        env = "HYPERFLEET_FIRECRACKER_BINARY",
        default_value = "firecracker"
    )]
    pub firecracker_binary: PathBuf,
    /// A kernel for Firecracker guests instead of the asset set's (one with
    /// virtio-mmio command-line devices; docs/guests.md).
    #[arg(long, env = "HYPERFLEET_FIRECRACKER_KERNEL")]
    pub firecracker_kernel: Option<PathBuf>,
    /// Run each Firecracker VMM under the jailer (chroot, an unprivileged
    /// uid/gid of its machine's own, cgroup limits). `auto` turns it on when running as root;
    /// `off` is for development.
    #[arg(
        long,
        env = "HYPERFLEET_FIRECRACKER_JAILER",
        value_enum,
        default_value = "auto"
    )]
    pub firecracker_jailer: Toggle,
    /// The jailer binary (looked up in PATH, then /usr/local/bin).
    #[arg(long, env = "HYPERFLEET_JAILER_BINARY", default_value = "jailer")]
    pub jailer_binary: PathBuf,
    /// The first of the unprivileged uids jailed VMMs run as: each machine
    /// gets one of its own (gid = uid), kept until it is deleted. The range
    /// must not contain 0 or any account, group or subordinate id of the
    /// host (/etc/passwd, /etc/group, /etc/subuid, /etc/subgid).
    #[arg(long, env = "HYPERFLEET_JAILER_UID_BASE", default_value_t = hyperfleet_core::vmm::uid::DEFAULT_BASE)]
    pub jailer_uid_base: u32,
    /// How many uids from --jailer-uid-base there are to hand out: a
    /// machine holds one from its first jailed start until it is deleted,
    /// so at most this many machines can hold one at a time.
    #[arg(long, env = "HYPERFLEET_JAILER_UID_COUNT", default_value_t = hyperfleet_core::vmm::uid::DEFAULT_COUNT)]
    pub jailer_uid_count: u32,
    /// Replaced by --jailer-uid-base/--jailer-uid-count (each machine now
    /// runs as a uid of its own); given, the daemon refuses to start.
    #[arg(long, env = "HYPERFLEET_JAILER_UID", hide = true)]
    pub jailer_uid: Option<u32>,
    /// Replaced like --jailer-uid.
    #[arg(long, env = "HYPERFLEET_JAILER_GID", hide = true)]
    pub jailer_gid: Option<u32>,
    /// A network namespace (e.g. /run/netns/vmms) every jailed VMM joins;
    /// only with `--network off` (with networking on, each jailed VMM runs
    /// in a namespace of its machine's own, with its TAP inside).
    #[arg(long, env = "HYPERFLEET_JAILER_NETNS")]
    pub jailer_netns: Option<PathBuf>,
    /// Guest asset set for new machines (default: <data-dir>/assets/current).
    #[arg(long, env = "HYPERFLEET_ASSETS_DIR")]
    pub assets_dir: Option<PathBuf>,
    /// Where running QEMU machines' guest RAM files live, one per machine
    /// (default: /dev/shm/hyperfleet-<hash of the data dir>; keep it on
    /// tmpfs: a disk would get every guest memory write written back).
    #[arg(long, env = "HYPERFLEET_MEMORY_DIR")]
    pub memory_dir: Option<PathBuf>,
    /// Machine networking (a lease, a TAP device and nftables rules per
    /// machine; needs root). `auto` turns it on when running as root.
    #[arg(long, env = "HYPERFLEET_NETWORK", value_enum, default_value = "auto")]
    pub network: Toggle,
    /// The private subnet machines get /30s of.
    #[arg(long, env = "HYPERFLEET_SUBNET", default_value = "172.30.0.0/16")]
    pub subnet: String,
    /// TAP devices are named <prefix><guest IP in hex> (at most 7 characters).
    #[arg(long, env = "HYPERFLEET_TAP_PREFIX", default_value = "hf")]
    pub tap_prefix: String,
    /// Nameservers for guests, comma-separated (default: the host's
    /// non-loopback ones from /etc/resolv.conf, else 1.1.1.1).
    #[arg(long, env = "HYPERFLEET_DNS", value_delimiter = ',')]
    pub dns: Vec<std::net::Ipv4Addr>,
    /// The nft binary (Debian's nftables).
    #[arg(long, env = "HYPERFLEET_NFT_BINARY", default_value = "nft")]
    pub nft_binary: PathBuf,
    /// The nftables table (family inet) Hyperfleet owns.
    #[arg(long, env = "HYPERFLEET_NFT_TABLE", default_value = "hyperfleet")]
    pub nft_table: String,
    /// A private or host network guests may reach (CIDR, repeatable or
    /// comma-separated). By default guests reach neither 10/8, 172.16/12,
    /// 192.168/16, 100.64/10 nor the host's own networks; 169.254/16 never.
    #[arg(
        long = "guest-allow-net",
        env = "HYPERFLEET_GUEST_ALLOW_NETS",
        value_delimiter = ','
    )]
    pub guest_allow_nets: Vec<hyperfleet_core::net::dest::Cidr>,
    /// Machines a tenant without a quota of its own may have (default:
    /// unlimited; `PUT /tenants/{tenant}/quota` sets one per tenant).
    #[arg(long, env = "HYPERFLEET_DEFAULT_QUOTA_MACHINES")]
    pub default_quota_machines: Option<u64>,
    /// vCPUs (summed over its machines) a tenant without a quota of its own
    /// may hold (default: unlimited).
    #[arg(long, env = "HYPERFLEET_DEFAULT_QUOTA_VCPUS")]
    pub default_quota_vcpus: Option<u64>,
    /// Memory in MiB (summed over its machines) a tenant without a quota of
    /// its own may hold (default: unlimited).
    #[arg(long, env = "HYPERFLEET_DEFAULT_QUOTA_MEMORY_MIB")]
    pub default_quota_memory_mib: Option<u64>,
    /// Disk bytes (summed over its machines' disk sizes) a tenant without a
    /// quota of its own may hold (default: unlimited).
    #[arg(long, env = "HYPERFLEET_DEFAULT_QUOTA_DISK_BYTES")]
    pub default_quota_disk_bytes: Option<u64>,
    /// Guest memory the host may promise, as a multiple of its MemTotal: a
    /// start (or resume) is refused when the memory of the machines that
    /// run or are starting plus the new one would pass MemTotal × this −
    /// --memory-reserve-mib. Above 1 overcommits.
    #[arg(long, env = "HYPERFLEET_MEMORY_OVERCOMMIT", default_value_t = 1.0, value_parser = parse_overcommit)]
    pub memory_overcommit: f64,
    /// Memory (MiB) kept for the host itself, not promised to guests.
    #[arg(long, env = "HYPERFLEET_MEMORY_RESERVE_MIB", default_value_t = hyperfleet_core::lifecycle::capacity::DEFAULT_MEMORY_RESERVE_MIB)]
    pub memory_reserve_mib: u64,
    /// Seconds without activity after which a running machine created
    /// without `idle_timeout_seconds` is suspended (0 = never).
    #[arg(long, env = "HYPERFLEET_DEFAULT_IDLE_TIMEOUT", default_value_t = 300)]
    pub default_idle_timeout: u64,
    /// Seconds a request (proxy, exec, files, logs follow) waits for a
    /// suspended machine to wake before it is answered 503.
    #[arg(long, env = "HYPERFLEET_WAKE_TIMEOUT", default_value_t = 30)]
    pub wake_timeout: u64,
    /// Bytes the machines' disks, memory images and snapshots may hold
    /// under the data directory (suffixes K, M, G, T: `10G`); over it, the
    /// evictor reclaims sticky machines that are not running. Default:
    /// what the data directory holds at start plus 80 % of its
    /// filesystem's free space then.
    #[arg(long, env = "HYPERFLEET_STORAGE_BUDGET", value_parser = hyperfleet_core::lifecycle::storage::parse_size)]
    pub storage_budget: Option<u64>,
    /// Port of the reverse proxy to exposed guest ports (0 = any free port)
    /// [env: HYPERFLEET_PROXY_PORT, else PROXY_PORT] [default: 4000].
    #[arg(long)]
    pub proxy_port: Option<u16>,
    /// Turn the reverse proxy off.
    #[arg(long, env = "HYPERFLEET_NO_PROXY", default_value_t = false)]
    pub no_proxy: bool,
    /// Domain of proxy host names: <port>-<machine>.<domain>.
    #[arg(long, env = "HYPERFLEET_PROXY_DOMAIN", default_value = "localhost")]
    pub proxy_domain: String,
    /// Scheme of the proxy URLs shown to clients (`https` behind a TLS terminator).
    #[arg(long, env = "HYPERFLEET_PROXY_SCHEME", default_value = "http")]
    pub proxy_scheme: String,
    /// Port of the proxy URLs shown to clients (default: the proxy's own).
    #[arg(long, env = "HYPERFLEET_PROXY_PUBLIC_PORT")]
    pub proxy_public_port: Option<u16>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Toggle {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum RunAsArg {
    Auto,
    Root,
    MachineUid,
}

#[derive(Args)]
pub(crate) struct DoctorArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Subcommand)]
pub(crate) enum MachinesCmd {
    /// Create a machine (status `pending`); `--start` boots it too.
    // Boxed: its flags outweigh every other machines command's.
    Create(Box<CreateArgs>),
    /// List machines.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        offset: Option<usize>,
    },
    /// Show one machine (id or name).
    Get {
        id: String,
    },
    Start(ActionArgs),
    Stop(ActionArgs),
    Restart(ActionArgs),
    Pause(ActionArgs),
    Resume(ActionArgs),
    /// Hard stop, no graceful shutdown.
    Kill(ActionArgs),
    /// Save memory to disk and stop the VMM.
    Suspend(ActionArgs),
    /// Change a machine's idle timeout, persistence or metadata.
    Update(UpdateArgs),
    /// Delete a machine and release everything it owns.
    Delete {
        id: String,
        /// Stop it first if it runs.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Wait until a machine reaches a status.
    Wait {
        id: String,
        #[arg(long)]
        status: String,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Run a command in a running machine: `exec ID -- CMD ARGS…`. Exits with
    /// the command's exit code (124 on timeout, 128+N when killed by signal N).
    Exec {
        id: String,
        /// Seconds before the command is killed.
        #[arg(long)]
        timeout: Option<f64>,
        /// KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        #[arg(long)]
        cwd: Option<String>,
        /// Interactive: stream this process's standard input to the command
        /// as it arrives, and its output back (the WebSocket form).
        #[arg(long, short = 'i')]
        stdin: bool,
        /// Print output as it arrives instead of when the command ends.
        #[arg(long, short = 's')]
        stream: bool,
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Copy a file into or out of a running machine: `cp LOCAL ID:/path` or
    /// `cp ID:/path LOCAL` (streamed; any size).
    Cp {
        src: String,
        dst: String,
    },
    /// The machine's serial console; `-f` keeps following it.
    Logs {
        id: String,
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        tail: Option<usize>,
    },
    /// A machine's history with step timings; `--follow` streams live.
    Events {
        id: String,
        #[arg(long, short)]
        follow: bool,
    },
    /// Make running copies of a running machine (it keeps running).
    Fork {
        id: String,
        /// How many copies, 1–16 (default 1, or the number of --name).
        #[arg(long)]
        count: Option<u32>,
        /// A name for each copy (repeatable; as many as --count).
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// Answer once the copies exist, before they run.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait (server default 60, at most 600).
        #[arg(long)]
        timeout: Option<u64>,
    },
}

#[derive(Subcommand)]
pub(crate) enum SnapshotsCmd {
    /// Take a snapshot of a machine (running, paused, suspended or stopped;
    /// a running one keeps running).
    Create {
        /// The machine (id or name).
        machine: String,
        /// A name for the snapshot, unique among yours.
        #[arg(long)]
        name: Option<String>,
        /// Answer at once, with the snapshot still `creating`.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait (server default 60, at most 600).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// List snapshots.
    List,
    /// Show one snapshot (id or name).
    Get { id: String },
    /// Delete a snapshot; machines made from it go on (its files stay until
    /// the last of them is deleted).
    Delete { id: String },
}

#[derive(Subcommand)]
pub(crate) enum TemplatesCmd {
    /// Make the template for a machine shape now instead of on first need
    /// (boots a guest; admin scope). Shapes not given take the server's
    /// defaults.
    Warm {
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory in MiB.
        #[arg(long)]
        mem: Option<u32>,
        #[arg(long)]
        vmm: Option<String>,
        /// Seconds to wait for the template's guest to boot and be
        /// snapshotted (server default 300, at most 600).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// List templates.
    List,
    /// Delete a template (by id); creates of its size boot again until the
    /// next warm.
    Delete { id: String },
}

#[derive(Args)]
pub(crate) struct UpdateArgs {
    pub id: String,
    /// Seconds without activity before it is suspended (deleted, when
    /// ephemeral); 0 never; `default` the server's --default-idle-timeout.
    #[arg(long, value_parser = parse_idle_timeout)]
    pub idle_timeout: Option<IdleTimeoutArg>,
    /// sticky[:PRIORITY 0-10], persistent or ephemeral.
    #[arg(long, value_parser = parse_persistence)]
    pub persistence: Option<hyperfleet_api::Persistence>,
    /// KEY=VALUE (repeatable): replaces the machine's metadata.
    #[arg(long = "metadata")]
    pub metadata: Vec<String>,
    /// Remove all metadata.
    #[arg(long, conflicts_with = "metadata")]
    pub clear_metadata: bool,
}

/// `--idle-timeout`: seconds, or the server's default.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdleTimeoutArg(pub Option<u64>);

fn parse_idle_timeout(s: &str) -> Result<IdleTimeoutArg, String> {
    if s == "default" {
        return Ok(IdleTimeoutArg(None));
    }
    s.parse::<u64>()
        .map(|v| IdleTimeoutArg(Some(v)))
        .map_err(|_| format!("'{s}' is neither a number of seconds nor 'default'"))
}

fn parse_persistence(s: &str) -> Result<hyperfleet_api::Persistence, String> {
    s.parse()
}

#[derive(Args)]
pub(crate) struct CreateArgs {
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    #[arg(long)]
    pub mem: Option<u32>,
    /// Guest port to expose through the proxy (repeatable); the output
    /// shows its URL.
    #[arg(long = "expose")]
    pub expose: Vec<u32>,
    /// Exposed ports need no credentials (default: an API key with the
    /// `exec` scope or the machine's access token).
    #[arg(long)]
    pub public: bool,
    /// No outbound internet access for the guest.
    #[arg(long)]
    pub no_egress: bool,
    #[arg(long)]
    pub vmm: Option<String>,
    /// KEY=VALUE (repeatable).
    #[arg(long = "env")]
    pub env: Vec<String>,
    /// KEY=VALUE (repeatable).
    #[arg(long = "metadata")]
    pub metadata: Vec<String>,
    /// Make it from this snapshot (id or name): its disk builds on the
    /// snapshot's, and a snapshot with memory continues its guest on start.
    /// Shape and VMM default to the snapshot's.
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Start it right away and wait for `running`.
    #[arg(long)]
    pub start: bool,
    /// An OCI image (id `img_…` or reference) as the root filesystem;
    /// pulled first when absent.
    #[arg(long)]
    pub image: Option<String>,
    /// Seconds without activity before it is suspended (0 never; default:
    /// the server's --default-idle-timeout).
    #[arg(long)]
    pub idle_timeout: Option<u64>,
    /// sticky[:PRIORITY 0-10] (default sticky:5), persistent or ephemeral.
    #[arg(long, value_parser = parse_persistence)]
    pub persistence: Option<hyperfleet_api::Persistence>,
    /// Replace the image's entrypoint: a JSON array (`'["/bin/sh","-c"]'`)
    /// or one word; `[]` clears it. Needs --image.
    #[arg(long, allow_hyphen_values = true)]
    pub entrypoint: Option<String>,
    /// Replace the image's command: a JSON array (`'["echo","hi"]'`) or
    /// one word; `[]` clears it. Needs --image.
    #[arg(long, allow_hyphen_values = true)]
    pub cmd: Option<String>,
    /// Replace the image's working directory. Needs --image.
    #[arg(long)]
    pub workdir: Option<String>,
    /// Replace the image's user: name, uid, name:group or uid:gid. Needs
    /// --image.
    #[arg(long)]
    pub user: Option<String>,
    /// When the main process exits: `no` (default), `always`,
    /// `on-failure` or `on-failure:N` (at most N restarts in a row).
    /// Needs --image.
    #[arg(long)]
    pub restart: Option<String>,
}

#[derive(Subcommand)]
pub(crate) enum ImagesCmd {
    /// Pull an image from a registry and wait until it is ready.
    Pull {
        /// `registry[:port]/repository[:tag|@sha256:…]`.
        reference: String,
        /// Plain HTTP to the registry.
        #[arg(long)]
        insecure: bool,
        /// Basic auth user; the password is read from HYPERFLEET_REGISTRY_PASSWORD.
        #[arg(long)]
        username: Option<String>,
        /// Return at once (status `pulling`).
        #[arg(long)]
        no_wait: bool,
    },
    /// Import an OCI image layout tar or a `docker save` archive.
    Import {
        file: PathBuf,
    },
    List,
    Get {
        id: String,
    },
    /// Delete an image (refused while machines made from it exist).
    Delete {
        id: String,
    },
}

#[derive(Args)]
pub(crate) struct ActionArgs {
    pub id: String,
    /// Answer at once (202) instead of waiting for the outcome.
    #[arg(long)]
    pub no_wait: bool,
    /// Seconds to wait (server default 60, at most 600).
    #[arg(long)]
    pub timeout: Option<u64>,
}

#[derive(Subcommand)]
pub(crate) enum KeysCmd {
    /// Create a key; its secret is printed once.
    Create {
        #[arg(long, required_unless_present = "admin")]
        name: Option<String>,
        /// read, write, exec or admin (repeatable).
        #[arg(long = "scope", required_unless_present = "admin")]
        scopes: Vec<String>,
        #[arg(long)]
        tenant: Option<String>,
        /// Lifetime in seconds.
        #[arg(long)]
        expires_in: Option<u64>,
        /// Recovery when no admin key works: write a new operator admin key
        /// straight into the database under --data-dir (run on the host as
        /// the daemon's user; works while the daemon runs) instead of asking
        /// the server.
        #[arg(long, conflicts_with_all = ["scopes", "tenant", "expires_in"])]
        admin: bool,
    },
    List,
    /// Revoke a key by id (`key_…`).
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum QuotaCmd {
    /// Show a tenant's limits and what its machines hold.
    Get {
        /// The tenant (default: `default`, the operator's).
        #[arg(long, default_value = "default")]
        tenant: String,
    },
    /// Change a tenant's limits; the ones not given keep their value.
    /// `unlimited` lifts one.
    Set {
        #[arg(long, default_value = "default")]
        tenant: String,
        #[arg(long, value_parser = parse_limit)]
        machines: Option<Limit>,
        #[arg(long, value_parser = parse_limit)]
        vcpus: Option<Limit>,
        #[arg(long, value_parser = parse_limit)]
        memory_mib: Option<Limit>,
        #[arg(long, value_parser = parse_limit)]
        disk_bytes: Option<Limit>,
    },
    /// Drop a tenant's own quota: the server's defaults apply again.
    Reset {
        #[arg(long, default_value = "default")]
        tenant: String,
    },
}

/// A quota limit on the command line: a number, or `unlimited` (`None`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limit(pub Option<u64>);

fn parse_limit(v: &str) -> Result<Limit, String> {
    if v == "unlimited" {
        return Ok(Limit(None));
    }
    v.parse()
        .map(|n| Limit(Some(n)))
        .map_err(|_| format!("'{v}' is neither a whole number nor 'unlimited'"))
}

fn parse_overcommit(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(f) if f.is_finite() && f > 0.0 => Ok(f),
        _ => Err(format!(
            "'{v}' is not a number above 0 (1.0 promises no more than the host has)"
        )),
    }
}

/// A default that is never zero, for a flag that must not be.
fn nonzero(n: usize) -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new(n).unwrap_or(std::num::NonZeroUsize::MIN)
}

//! `serve` and `doctor`: flags → library config, logging set-up.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use hyperfleet_api::VmmKind;
use hyperfleet_core::config::ProxyConfig;
use hyperfleet_core::doctor::{self, Level};
use hyperfleet_core::net::{NetConfig, Subnet};
use hyperfleet_core::Config;

use hyperfleet_core::vmm::firecracker::jailer::JailerConfig;
use hyperfleet_core::vmm::host::AccelChoice;
use hyperfleet_core::vmm::uid::UidRange;

use crate::cli::{AccelArg, ClientArgs, LogFormat, RunAsArg, ServeArgs, Toggle, VmmChoice};

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HYPERFLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log that cannot be written (its disk is full) must not take the
    // daemon down: by default the fmt layer reports a failed write with
    // `eprintln!`, which panics when stderr itself fails — killing whichever
    // thread logged (the store's writer, on a full disk).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn vmm_kind(c: VmmChoice) -> Option<VmmKind> {
    match c {
        VmmChoice::Auto => None,
        VmmChoice::Qemu => Some(VmmKind::Qemu),
        VmmChoice::Firecracker => Some(VmmKind::Firecracker),
        VmmChoice::Stub => Some(VmmKind::Stub),
    }
}

pub(crate) async fn serve(a: ServeArgs, global: &ClientArgs) -> anyhow::Result<()> {
    init_logging(a.log_format);
    let config = settings(&a, global)?;
    // The host's accounts must not overlap the range (doctor checks the
    // same, without refusing).
    let jail = config.firecracker_jailer.as_ref().map(|j| j.uids);
    for uids in [jail, config.qemu_uids].into_iter().flatten() {
        uids.check_host().map_err(|e| anyhow::anyhow!(e))?;
    }
    hyperfleet_core::serve(config)
        .await
        .context("the daemon stopped with an error")
}

/// The daemon's settings from its flags (and their environment variables):
/// what `serve` runs with and what `doctor` checks.
fn settings(a: &ServeArgs, global: &ClientArgs) -> anyhow::Result<Config> {
    let ip: IpAddr = a
        .host
        .parse()
        .with_context(|| format!("--host '{}' is not an IP address", a.host))?;
    let env = |name: &str| std::env::var(name).ok();
    let port = from_env(a.port, PORT, &env, parse_port)?.unwrap_or(3000);
    let proxy_port = from_env(a.proxy_port, PROXY_PORT, &env, parse_port)?.unwrap_or(4000);
    let disable_auth = from_env(
        a.disable_auth.then_some(true),
        DISABLE_AUTH,
        &env,
        parse_bool,
    )?
    .unwrap_or(false);
    let mut config = Config::new(global.data_dir.clone());
    config.network = network_config(a)?;
    config.firecracker_jailer = jailer_config(a, config.network.is_some())?;
    config.qemu_uids = qemu_uids(a)?;
    config.listen = SocketAddr::new(ip, port);
    config.disable_auth = disable_auth;
    config.default_vmm = vmm_kind(a.default_vmm);
    config.stub_binary = a.stub_vmm_binary.clone();
    config.boot_timeout = Duration::from_secs(a.boot_timeout);
    config.stop_timeout = Duration::from_secs(a.stop_timeout);
    config.store.cached_machines = a.machine_cache;
    config.api.header_timeout = Duration::from_secs(a.api_header_timeout);
    config.api.idle_timeout = Duration::from_secs(a.api_idle_timeout);
    config.api.max_connections = usize::try_from(a.api_max_connections).unwrap_or(usize::MAX);
    config.guest = hyperfleet_core::config::GuestLimits {
        json_max_bytes: a.guest_json_max_bytes,
        per_tenant: a.guest_requests_per_tenant.get(),
        total: a.guest_requests_total.get(),
    };
    config.admission = hyperfleet_core::lifecycle::capacity::AdmissionConfig {
        default_quota: hyperfleet_api::QuotaLimits {
            max_machines: a.default_quota_machines,
            max_vcpus: a.default_quota_vcpus,
            max_memory_mib: a.default_quota_memory_mib,
            max_disk_bytes: a.default_quota_disk_bytes,
        },
        memory_overcommit: a.memory_overcommit,
        memory_reserve_mib: a.memory_reserve_mib,
    };
    config.idle = hyperfleet_core::lifecycle::idle::IdleConfig {
        default_timeout: (a.default_idle_timeout > 0)
            .then(|| Duration::from_secs(a.default_idle_timeout)),
        wake_timeout: Duration::from_secs(a.wake_timeout.max(1)),
    };
    config.storage_budget = a.storage_budget;
    config.qemu_binary = a.qemu_binary.clone();
    config.firecracker_binary = a.firecracker_binary.clone();
    // Absolute: Firecracker resolves it from its own working directory,
    // which is the chroot's root when jailed.
    config.firecracker_kernel = a
        .firecracker_kernel
        .clone()
        .map(|k| std::path::absolute(&k).unwrap_or(k));
    config.assets_dir = a.assets_dir.clone();
    config.memory_dir = a.memory_dir.clone();
    config.qemu_accel = match a.qemu_accel {
        AccelArg::Auto => AccelChoice::Auto,
        AccelArg::Kvm => AccelChoice::Kvm,
        AccelArg::Tcg => AccelChoice::Tcg,
    };
    if !a.no_proxy {
        let mut p = ProxyConfig::new(SocketAddr::new(ip, proxy_port));
        p.domain = a.proxy_domain.trim_matches('.').to_ascii_lowercase();
        p.public_scheme = a.proxy_scheme.clone();
        p.public_port = a.proxy_public_port;
        config.proxy = Some(p);
    }
    Ok(config)
}

/// A setting's two environment variables: Hyperfleet's own name and the
/// seeds' shorter one.
type EnvNames = (&'static str, &'static str);
const PORT: EnvNames = ("HYPERFLEET_PORT", "PORT");
const PROXY_PORT: EnvNames = ("HYPERFLEET_PROXY_PORT", "PROXY_PORT");
const DISABLE_AUTH: EnvNames = ("HYPERFLEET_DISABLE_AUTH", "DISABLE_AUTH");

/// The flag's value, else the `HYPERFLEET_*` variable's, else the seeds'
/// name's (an empty variable counts as unset). The longer name wins over
/// the seeds': it can only have been meant for Hyperfleet, while `PORT` is
/// often set for something else in the same environment.
fn from_env<T>(
    flag: Option<T>,
    (ours, seeds): EnvNames,
    env: &dyn Fn(&str) -> Option<String>,
    parse: fn(&str) -> Result<T, String>,
) -> anyhow::Result<Option<T>> {
    if flag.is_some() {
        return Ok(flag);
    }
    for name in [ours, seeds] {
        if let Some(v) = env(name).filter(|v| !v.is_empty()) {
            return parse(&v)
                .map(Some)
                .map_err(|e| anyhow::anyhow!("{name}='{v}': {e}"));
        }
    }
    Ok(None)
}

fn parse_port(v: &str) -> Result<u16, String> {
    v.trim()
        .parse()
        .map_err(|_| "not a port number (0 to 65535)".to_string())
}

/// Like clap's boolean flags read from the environment: the usual words
/// for no are false, anything else is true.
fn parse_bool(v: &str) -> Result<bool, String> {
    let no = ["0", "false", "f", "no", "n", "off"];
    Ok(!no.contains(&v.trim().to_ascii_lowercase().as_str()))
}

fn jailer_config(a: &ServeArgs, network: bool) -> anyhow::Result<Option<JailerConfig>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if a.jailer_uid.is_some() || a.jailer_gid.is_some() {
        anyhow::bail!(
            "--jailer-uid and --jailer-gid (HYPERFLEET_JAILER_UID/GID) were replaced by \
             --jailer-uid-base and --jailer-uid-count: every jailed VMM now runs as a uid (= gid) \
             of its machine's own from that range (default {} from {}); drop the old flags",
            hyperfleet_core::vmm::uid::DEFAULT_COUNT,
            hyperfleet_core::vmm::uid::DEFAULT_BASE
        );
    }
    let on = match a.firecracker_jailer {
        Toggle::On if !root => anyhow::bail!(
            "--firecracker-jailer on needs root (the jailer makes a chroot with device nodes, \
             cgroups and a mount namespace, then drops to the machine's uid); run as root or pass \
             --firecracker-jailer off"
        ),
        Toggle::On => true,
        Toggle::Off => false,
        Toggle::Auto => root,
    };
    if !on {
        if a.jailer_netns.is_some() {
            anyhow::bail!(
                "--jailer-netns needs the jailer (--firecracker-jailer on, or auto as root)"
            );
        }
        return Ok(None);
    }
    let uids =
        UidRange::new(a.jailer_uid_base, a.jailer_uid_count).map_err(|e| anyhow::anyhow!(e))?;
    if a.jailer_netns.is_some() && network {
        anyhow::bail!(
            "--jailer-netns cannot be combined with machine networking: with networking on, each \
             jailed VMM runs in a network namespace of its machine's own, with its TAP inside; \
             pass --network off, or drop --jailer-netns"
        );
    }
    let mut j = JailerConfig::new(a.jailer_binary.clone());
    j.uids = uids;
    j.netns = a.jailer_netns.clone();
    Ok(Some(j))
}

/// The uids QEMU VMMs run as (`--qemu-run-as`): the jailer's range, so a
/// machine holds one uid whichever backend runs it and no two machines of
/// either share one.
fn qemu_uids(a: &ServeArgs) -> anyhow::Result<Option<UidRange>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let on = match a.qemu_run_as {
        RunAsArg::MachineUid if !root => anyhow::bail!(
            "--qemu-run-as machine-uid needs root (the daemon hands each QEMU to its machine's \
             uid); run as root or pass --qemu-run-as root, which runs QEMU as the daemon's user"
        ),
        RunAsArg::MachineUid => true,
        RunAsArg::Root => false,
        RunAsArg::Auto => root,
    };
    if !on {
        return Ok(None);
    }
    UidRange::new(a.jailer_uid_base, a.jailer_uid_count)
        .map(Some)
        .map_err(|e| anyhow::anyhow!(e))
}

fn network_config(a: &ServeArgs) -> anyhow::Result<Option<NetConfig>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let on = match a.network {
        Toggle::On => true,
        Toggle::Off => false,
        Toggle::Auto => {
            if !root {
                tracing::warn!(
                    "machine networking is off: it needs root (TAP devices, nftables); \
                     machines get no network. Run as root or pass --network off to silence this."
                );
            }
            root
        }
    };
    if !on {
        return Ok(None);
    }
    let subnet: Subnet = a
        .subnet
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--subnet: {e}"))?;
    if a.tap_prefix.is_empty()
        || a.tap_prefix.len() > hyperfleet_core::net::lease::TAP_PREFIX_MAX
        || !a
            .tap_prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        anyhow::bail!(
            "--tap-prefix must be 1 to {} lowercase letters or digits, got '{}'",
            hyperfleet_core::net::lease::TAP_PREFIX_MAX,
            a.tap_prefix
        );
    }
    let mut n = NetConfig::new(subnet);
    n.tap_prefix = a.tap_prefix.clone();
    if !a.dns.is_empty() {
        n.dns = a.dns.clone();
    }
    n.nft_binary = a.nft_binary.clone();
    n.table = a.nft_table.clone();
    n.allow_nets = a.guest_allow_nets.clone();
    Ok(Some(n))
}

/// Checks the host for the daemon `serve` would run with the same flags
/// and environment.
pub(crate) fn doctor(a: &ServeArgs, global: &ClientArgs) -> anyhow::Result<()> {
    let config = settings(a, global).context("serve would refuse these settings")?;
    let checks = doctor::run(&config);
    if global.json {
        crate::output::json(&checks)?;
    } else {
        let rows: Vec<Vec<String>> = checks
            .iter()
            .map(|c| {
                let level = match c.level {
                    Level::Ok => "ok",
                    Level::Warn => "WARN",
                    Level::Fail => "FAIL",
                };
                let mut detail = c.detail.clone();
                if !c.fix.is_empty() {
                    detail.push_str(&format!("\n{:>20}→ {}", "", c.fix));
                }
                vec![c.name.to_string(), level.to_string(), detail]
            })
            .collect();
        crate::output::table(&["CHECK", "STATUS", "DETAIL"], &rows);
    }
    if checks.iter().any(|c| c.level == Level::Fail) {
        anyhow::bail!("some checks failed");
    }
    Ok(())
}

/// The key to use: the flag/env, else the bootstrap key file if readable.
pub(crate) fn api_key(args: &ClientArgs) -> Option<String> {
    if let Some(k) = &args.api_key {
        return Some(k.clone());
    }
    std::fs::read_to_string(args.data_dir.join("admin.key"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_flag_wins_then_the_hyperfleet_name_then_the_seeds_name() {
        let both = [("HYPERFLEET_PORT", "3001"), ("PORT", "3002")];
        let seeds = [("PORT", "3002")];
        let port =
            |flag, vars: &[(&str, &str)]| from_env(flag, PORT, &env(vars), parse_port).unwrap();
        assert_eq!(port(Some(3000), &both), Some(3000));
        assert_eq!(port(None, &both), Some(3001));
        assert_eq!(port(None, &seeds), Some(3002));
        assert_eq!(
            port(None, &[("HYPERFLEET_PORT", ""), ("PORT", "3002")]),
            Some(3002)
        );
        assert_eq!(port(None, &[]), None);
        let proxy = [("HYPERFLEET_PROXY_PORT", "4001"), ("PROXY_PORT", "4002")];
        assert_eq!(
            from_env(None, PROXY_PORT, &env(&proxy), parse_port).unwrap(),
            Some(4001)
        );
        let auth = [
            ("HYPERFLEET_DISABLE_AUTH", "false"),
            ("DISABLE_AUTH", "true"),
        ];
        assert_eq!(
            from_env(None, DISABLE_AUTH, &env(&auth), parse_bool).unwrap(),
            Some(false)
        );
        assert_eq!(
            from_env(None, DISABLE_AUTH, &env(&auth[1..]), parse_bool).unwrap(),
            Some(true)
        );
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let e = from_env(None, PORT, &env(&[("PORT", "http")]), parse_port).unwrap_err();
        assert!(e.to_string().contains("PORT='http'"), "{e}");
    }
}

//! `hyperfleet doctor`: checks the host for the settings the daemon would
//! run with (the binary builds the same [`Config`] as `serve`) and says
//! what to fix. What the host offers is detected in `vmm::host`, as the
//! backends detect it.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::config::Config;
use crate::vmm::host::{self, Accel};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    /// What to do about it (empty when ok).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

fn check(
    name: &'static str,
    level: Level,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Check {
    Check {
        name,
        level,
        detail: detail.into(),
        fix: fix.into(),
    }
}

fn first_line(program: &Path, arg: &str) -> Option<String> {
    let out = Command::new(program).arg(arg).output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    text.lines().next().map(|l| l.trim().to_string())
}

fn is_root_or_net_admin() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// The data directory and its secrets (database, WAL/SHM, admin key) must
/// be private to the daemon's user; the daemon tightens them at start.
fn private_modes(dir: &Path) -> Check {
    let loose = crate::daemon::loose_modes(dir);
    if loose.is_empty() {
        return check(
            "data_dir_modes",
            Level::Ok,
            "the data directory and its secrets are private (0700/0600)",
            "",
        );
    }
    let list: Vec<String> = loose
        .iter()
        .map(|(p, m, want)| format!("{} is {m:o} (should be {want:o})", p.display()))
        .collect();
    check(
        "data_dir_modes",
        Level::Warn,
        format!("readable by other users: {}", list.join("; ")),
        "restart the daemon (it tightens them at start) or chmod them yourself",
    )
}

pub fn run(config: &Config) -> Vec<Check> {
    let mut out = Vec::new();

    // Data directory.
    let dir = &config.data_dir;
    let probe = dir.join(".doctor-probe");
    // Made private, as the daemon makes it: doctor must not be what leaves
    // a fresh host's data dir readable by every user.
    let made = {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .is_ok()
    };
    let writable = made && std::fs::write(&probe, b"ok").is_ok();
    let _ = std::fs::remove_file(&probe);
    out.push(if writable {
        check(
            "data_dir",
            Level::Ok,
            format!("{} is writable", dir.display()),
            "",
        )
    } else {
        check(
            "data_dir",
            Level::Fail,
            format!("{} is not writable", dir.display()),
            "run as a user that owns it, or pass --data-dir / HYPERFLEET_DATA_DIR",
        )
    });

    out.push(private_modes(dir));

    // Store.
    let db = config.db_path();
    if db.exists() {
        match rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)))
        {
            Ok(v) if v <= crate::store::schema_version() => out.push(check(
                "store",
                Level::Ok,
                format!("{} (schema {v})", db.display()),
                "",
            )),
            Ok(v) => out.push(check(
                "store",
                Level::Fail,
                format!("schema {v} is newer than this release knows"),
                "upgrade hyperfleet",
            )),
            Err(e) => out.push(check(
                "store",
                Level::Fail,
                format!("cannot read {}: {e}", db.display()),
                "check permissions and disk",
            )),
        }
    } else {
        out.push(check(
            "store",
            Level::Ok,
            format!("{} will be created on first start", db.display()),
            "",
        ));
    }

    // Virtualisation.
    let (accel, why) = host::detect_accel();
    out.push(match accel {
        Accel::HardwareKvm => check("kvm", Level::Ok, why, ""),
        Accel::PvmOnly => check("kvm", Level::Warn, why, "guests run under QEMU TCG (software emulation: boots take seconds, not milliseconds); use a host with hardware virtualisation for Firecracker and KVM speed"),
        Accel::None => check("kvm", Level::Warn, why, "enable VT-x/AMD-V (or nested virtualisation) and load kvm_intel/kvm_amd for KVM speed"),
    });

    // VMM binaries.
    let version = |bin: &Path, extra: &[&str]| {
        host::which(bin, extra).and_then(|b| first_line(&b, "--version"))
    };
    match version(&config.qemu_binary, &[]) {
        Some(v) => out.push(check("qemu", Level::Ok, v, "")),
        None => out.push(check(
            "qemu",
            Level::Warn,
            format!("{} not found", config.qemu_binary.display()),
            "install Debian's qemu-system-x86 (10.x from bookworm-backports on Debian 12)",
        )),
    }
    match version(&config.firecracker_binary, &[host::RELEASE_BIN_DIR]) {
        Some(v) => out.push(check(
            "firecracker",
            if accel == Accel::HardwareKvm {
                Level::Ok
            } else {
                Level::Warn
            },
            if accel == Accel::HardwareKvm {
                v
            } else {
                format!("{v}; but this host cannot boot Firecracker guests (no hardware KVM)")
            },
            if accel == Accel::HardwareKvm {
                ""
            } else {
                "use the qemu backend on this host"
            },
        )),
        None => out.push(check(
            "firecracker",
            Level::Warn,
            format!(
                "{} not found in PATH or {}",
                config.firecracker_binary.display(),
                host::RELEASE_BIN_DIR
            ),
            "install the official Firecracker release binaries (firecracker, jailer) into PATH",
        )),
    }
    out.push(qemu_sandbox_check(config));
    out.extend(jailer_checks(config));
    // Whether the guest kernel finds Firecracker's devices: judged on any
    // host, so a kernel problem shows before the move to hardware KVM.
    if let Ok(set) = crate::assets::AssetSet::load(&config.assets_path()) {
        let verdict =
            crate::vmm::firecracker::kernel::check(config.firecracker_kernel.as_deref(), &set);
        out.push(match verdict {
            Ok(how) => check("firecracker_kernel", Level::Ok, how, ""),
            Err(why) => check(
                "firecracker_kernel",
                Level::Warn,
                why,
                "boot Firecracker guests with a kernel that has ACPI or virtio-mmio command-line \
                 devices and the virtio block, net and vsock drivers (--firecracker-kernel; \
                 docs/guests.md)",
            ),
        });
    }
    match crate::assets::AssetSet::load(&config.assets_path()) {
        Ok(set) => out.push(check(
            "guest_assets",
            Level::Ok,
            format!(
                "{} (kernel {}, agent {})",
                set.id,
                set.manifest.kernel_release,
                set.manifest
                    .agent
                    .as_ref()
                    .map(|a| &a.sha256[..12])
                    .unwrap_or("none: placeholder init")
            ),
            "",
        )),
        Err(e) => out.push(check(
            "guest_assets",
            Level::Warn,
            e.to_string(),
            "run scripts/setup.sh, or `hyperfleet assets build --agent <static hyperfleet-agent>`",
        )),
    }
    match config.stub_binary_path() {
        Some(p) if p.is_file() => out.push(check(
            "stub_vmm",
            Level::Ok,
            format!("{} (test backend)", p.display()),
            "",
        )),
        _ => out.push(check(
            "stub_vmm",
            Level::Ok,
            "not installed (only needed for control-plane tests)",
            "",
        )),
    }

    // Privileges for networking.
    out.push(if is_root_or_net_admin() {
        check(
            "privileges",
            Level::Ok,
            "root or CAP_NET_ADMIN: TAP devices and nftables can be managed",
            "",
        )
    } else {
        check(
            "privileges",
            Level::Warn,
            "neither root nor CAP_NET_ADMIN",
            "run the daemon as root or grant CAP_NET_ADMIN for machine networking",
        )
    });
    out.push(if std::path::Path::new("/dev/net/tun").exists() {
        check("tun", Level::Ok, "/dev/net/tun is present", "")
    } else {
        check(
            "tun",
            Level::Warn,
            "/dev/net/tun is missing: machines cannot get TAP devices",
            "modprobe tun",
        )
    });
    let nft = config
        .network
        .as_ref()
        .map_or(Path::new("nft"), |n| n.nft_binary.as_path());
    match first_line(nft, "--version") {
        Some(v) => out.push(check("nftables", Level::Ok, v, "")),
        None => out.push(check(
            "nftables",
            Level::Warn,
            "nft not found",
            "install Debian's nftables package for machine isolation and egress",
        )),
    }
    out
}

/// How QEMU VMMs are confined, as the daemon would run them: whether this
/// QEMU accepts the seccomp sandbox, whom it runs as, and whether it can
/// read the guest kernel and initramfs it is handed by `/proc/self/fd`.
fn qemu_sandbox_check(config: &Config) -> Check {
    let Some(bin) = host::which(&config.qemu_binary, &[]) else {
        return check(
            "qemu_sandbox",
            Level::Warn,
            "no QEMU to check (see the qemu check)",
            "",
        );
    };
    let seccomp = Command::new(&bin)
        .args(["-sandbox", crate::vmm::qemu::SANDBOX, "-version"])
        .output()
        .map_err(|e| e.to_string())
        .and_then(|o| match o.status.success() {
            true => Ok(()),
            false => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        });
    let run_as = config.qemu_uids.map(|r| (r, r.check_host()));
    let mut unreadable = Vec::new();
    if let (Some(_), Ok(set)) = (
        config.qemu_uids,
        crate::assets::AssetSet::load(&config.assets_path()),
    ) {
        for f in [set.kernel(), set.initramfs()].into_iter().flatten() {
            use std::os::unix::fs::MetadataExt;
            if std::fs::metadata(&f).is_ok_and(|m| m.mode() & 0o004 == 0) {
                unreadable.push(f);
            }
        }
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    qemu_sandbox(seccomp, run_as, root, &unreadable)
}

/// [`qemu_sandbox_check`]'s verdict from what it found.
fn qemu_sandbox(
    seccomp: Result<(), String>,
    run_as: Option<(crate::vmm::uid::UidRange, Result<(), String>)>,
    root: bool,
    unreadable: &[std::path::PathBuf],
) -> Check {
    let name = "qemu_sandbox";
    if let Err(why) = seccomp {
        return check(
            name,
            Level::Fail,
            format!("QEMU refuses -sandbox {}: {why}", crate::vmm::qemu::SANDBOX),
            "install a QEMU built with seccomp (Debian's qemu-system-x86 is); QEMU machines \
             cannot start without it",
        );
    }
    if let Some(f) = unreadable.first() {
        return check(
            name,
            Level::Fail,
            format!(
                "{} is not readable by others, and QEMU, running as its machine's uid, reads it \
                 through /proc/self/fd",
                f.display()
            ),
            "chmod a+r the asset set's vmlinux and initramfs.cpio",
        );
    }
    match run_as {
        Some((_, Err(why))) => check(
            name,
            Level::Warn,
            why,
            "pick a free range with --jailer-uid-base/--jailer-uid-count (the daemon refuses \
             to start with this one)",
        ),
        Some((r, Ok(()))) => check(
            name,
            Level::Ok,
            format!(
                "seccomp sandbox on; each QEMU runs as a uid of its machine's own from {r} \
                 (gid = uid), with no capabilities or supplementary groups, and is handed its \
                 disk, sockets, TAP and /dev/kvm as descriptors, so the uids need no access to \
                 them"
            ),
            "",
        ),
        None if root => check(
            name,
            Level::Warn,
            "seccomp sandbox on, but QEMU VMMs run as root (--qemu-run-as root)",
            "pass --qemu-run-as auto or machine-uid, so each QEMU runs as an unprivileged uid of \
             its machine's own",
        ),
        None => check(
            name,
            Level::Ok,
            "seccomp sandbox on; QEMU VMMs run as the daemon's (unprivileged) user",
            "",
        ),
    }
}

/// The jailer and the uids jailed VMMs lease one each of, as the daemon
/// would run them (it refuses to start a jailer whose range the host's
/// accounts overlap).
fn jailer_checks(config: &Config) -> [Check; 2] {
    let Some(jail) = &config.firecracker_jailer else {
        let off = "the jailer is off (--firecracker-jailer off, or auto without root): \
                   Firecracker VMMs run unjailed as the daemon's user";
        return [
            check(
                "jailer",
                Level::Warn,
                off,
                "run the daemon as root with --firecracker-jailer auto or on (unjailed is for \
                 development only)",
            ),
            check(
                "jailer_uids",
                Level::Ok,
                "no uids needed: the jailer is off",
                "",
            ),
        ];
    };
    let version = host::which(&jail.binary, &[host::RELEASE_BIN_DIR])
        .and_then(|b| first_line(&b, "--version"));
    let cgroups = crate::vmm::firecracker::jailer::Cgroups::detect().describe();
    let jailer = match version {
        Some(v) => check(
            "jailer",
            Level::Ok,
            format!(
                "{v}; {cgroups}; with machine networking, each jailed VMM runs in a network \
                 namespace of its machine's own ({}/{}…)",
                crate::net::netns::NETNS_DIR,
                crate::net::netns::PREFIX
            ),
            "",
        ),
        None => check(
            "jailer",
            Level::Warn,
            format!(
                "{} not found in PATH or {}: the jailer is on, so the daemon reports the \
                 Firecracker backend unavailable",
                jail.binary.display(),
                host::RELEASE_BIN_DIR
            ),
            "install the jailer from the Firecracker release next to firecracker, or run the \
             daemon with --firecracker-jailer off (development only)",
        ),
    };
    let r = jail.uids;
    let uids = match r.check_host() {
        Ok(()) => check(
            "jailer_uids",
            Level::Ok,
            format!(
                "uids {}–{} are free for jailed VMMs (one per machine; gid = uid)",
                r.base,
                r.last()
            ),
            "",
        ),
        Err(why) => check(
            "jailer_uids",
            Level::Warn,
            why,
            "pick a free range with --jailer-uid-base/--jailer-uid-count (the daemon refuses \
             to start a jailer with this one)",
        ),
    };
    [jailer, uids]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::firecracker::jailer::JailerConfig;

    #[test]
    fn the_qemu_sandbox_check_fails_without_seccomp_and_warns_when_qemu_runs_as_root() {
        let r = crate::vmm::uid::UidRange::default();
        let verdict = |seccomp, run_as, root, unreadable: &[std::path::PathBuf]| {
            let c = qemu_sandbox(seccomp, run_as, root, unreadable);
            (c.level, c.detail)
        };
        let (level, detail) = verdict(Err("no seccomp".into()), Some((r, Ok(()))), true, &[]);
        assert_eq!(level, Level::Fail);
        assert!(detail.contains("no seccomp"), "{detail}");
        let (level, detail) = verdict(Ok(()), Some((r, Ok(()))), true, &[]);
        assert_eq!(level, Level::Ok);
        assert!(detail.contains("from 900000–965535"), "{detail}");
        let kernel = [std::path::PathBuf::from("/a/vmlinux")];
        let (level, detail) = verdict(Ok(()), Some((r, Ok(()))), true, &kernel);
        assert_eq!(level, Level::Fail);
        assert!(detail.contains("/a/vmlinux is not readable"), "{detail}");
        let (level, _) = verdict(Ok(()), Some((r, Err("overlap".into()))), true, &[]);
        assert_eq!(level, Level::Warn);
        let (level, detail) = verdict(Ok(()), None, true, &[]);
        assert_eq!(level, Level::Warn);
        assert!(detail.contains("run as root"), "{detail}");
        assert_eq!(verdict(Ok(()), None, false, &[]).0, Level::Ok);
    }

    #[test]
    fn the_jailer_checks_follow_the_settings_serve_built() {
        let mut config = Config::new(std::path::PathBuf::from("/nonexistent"));
        let checks = |config: &Config| jailer_checks(config).map(|c| (c.level, c.detail));
        let [(level, jailer), (_, uids)] = checks(&config);
        assert_eq!(level, Level::Warn);
        assert!(jailer.contains("the jailer is off"), "{jailer}");
        assert!(uids.contains("no uids needed"), "{uids}");

        let mut j = JailerConfig::new("/nonexistent/jailer".into());
        j.uids = crate::vmm::uid::UidRange::new(0xFFFF_FF00, 16).unwrap();
        config.firecracker_jailer = Some(j);
        let [(level, jailer), (_, uids)] = checks(&config);
        assert_eq!(level, Level::Warn);
        assert!(jailer.contains("/nonexistent/jailer not found"), "{jailer}");
        assert!(uids.contains("4294967040"), "{uids}");
    }
}

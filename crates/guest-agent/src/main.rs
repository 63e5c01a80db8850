//! `hyperfleet-agent`: the Hyperfleet guest agent.
//!
//! Runs as PID 1 in a microVM guest (from an initramfs) or as an ordinary process. As PID 1 it
//! first does init's work ([`init`], [`net`]) from the `hf.*` kernel command line ([`config`]),
//! then serves the agent protocol on the channel the host set up ([`transport`]): a
//! virtio-serial port named `hf.agent` (QEMU) or an AF_VSOCK port (Firecracker). It also reaps
//! every orphan ([`reaper`]) and powers the guest off on request, on SIGTERM or on the ACPI
//! power button.
//!
//! Usage as an ordinary process:
//!
//! ```text
//! hyperfleet-agent --listen unix:/path/agent.sock   # one session per connection
//! hyperfleet-agent --listen vsock:1024              # AF_VSOCK listener
//! hyperfleet-agent --stdio                          # one session on stdin/stdout
//! hyperfleet-agent --serial /dev/vport0p1           # a given serial device
//! hyperfleet-agent                                  # find the channel like PID 1 does
//! ```
//!
//! `--log-level error|warn|info|debug` (or `HF_LOG`) sets verbosity; logs go to stderr.

mod config;
mod init;
mod log;
mod net;
mod ops;
mod reaper;
mod session;
mod sysinfo;
mod transport;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyperfleet_agent_proto::PowerAction;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::session::Services;

enum Mode {
    Unix(PathBuf),
    Vsock(u32),
    Stdio,
    Serial(Option<PathBuf>),
}

const USAGE: &str = "usage: hyperfleet-agent [--listen unix:PATH | --listen vsock:PORT | --stdio | --serial DEVICE] [--port-name NAME] [--log-level LEVEL]";

/// Command-line arguments; everything is optional.
struct Args {
    mode: Option<Mode>,
    port_name: Option<String>,
    level: Option<String>,
}

// `--help` prints and ends the process before anything is set up.
#[allow(clippy::exit)]
fn parse_args() -> Result<Args, String> {
    let mut mode = None;
    let mut port_name = None;
    let mut level = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => {
                let v = args.next().ok_or("--listen needs an address")?;
                mode = Some(if let Some(p) = v.strip_prefix("unix:") {
                    Mode::Unix(PathBuf::from(p))
                } else if let Some(p) = v.strip_prefix("vsock:") {
                    Mode::Vsock(p.parse().map_err(|_| format!("bad vsock port {p:?}"))?)
                } else {
                    return Err(format!("unsupported listen address {v:?}"));
                });
            }
            "--stdio" => mode = Some(Mode::Stdio),
            "--serial" => {
                mode = Some(Mode::Serial(Some(PathBuf::from(
                    args.next().ok_or("--serial needs a device path")?,
                ))))
            }
            "--port-name" => port_name = Some(args.next().ok_or("--port-name needs a name")?),
            "--log-level" => level = Some(args.next().ok_or("--log-level needs a level")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            // The kernel passes unknown `key=value`-less words of its command line to init.
            other if getpid() == 1 => info!("ignoring argument {other:?}"),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        mode,
        port_name,
        level,
    })
}

fn getpid() -> i32 {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

// The binary's entry point: its exit code is the session's outcome.
#[allow(clippy::exit)]
fn main() {
    let pid1 = getpid() == 1;
    if pid1 {
        init::early_mounts();
        init::ensure_console();
        init::process_defaults();
    }
    let Args {
        mode,
        port_name,
        level,
    } = match parse_args() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("hyperfleet-agent: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let cmdline = if pid1 {
        std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
    } else {
        String::new()
    };
    let file = std::fs::read_to_string(config::CONFIG_FILE).ok();
    let mut cfg = Config::parse(&cmdline, file.as_deref());
    if let Some(l) = level
        .or_else(|| std::env::var("HF_LOG").ok())
        .or(cfg.log.clone())
    {
        match log::parse_level(&l) {
            Some(l) => log::set_level(l),
            None => warn!("unknown log level {l:?}"),
        }
    }
    for bad in &cfg.invalid {
        warn!("ignoring invalid setting {bad}");
    }
    if let Some(n) = port_name {
        cfg.agent_port = n;
    }
    info!(
        "hyperfleet-agent {} starting (pid {}, kernel {})",
        env!("CARGO_PKG_VERSION"),
        getpid(),
        sysinfo::uname().release
    );

    if pid1 {
        init::load_modules(&cfg.modules);
        if cfg.root.is_some() {
            match init::switch_root(&cfg) {
                // The new root may carry its own config file (cmdline still wins).
                Ok(()) => {
                    if let Ok(f) = std::fs::read_to_string(config::CONFIG_FILE) {
                        let extra = Config::parse(&cmdline, Some(&f));
                        init::load_modules(&extra.modules);
                    }
                }
                Err(e) => error!("switch_root: {e}; staying on the initramfs"),
            }
        }
        if let Some(h) = &cfg.hostname {
            init::set_hostname(h);
        }
        net::configure(&cfg);
    }

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            fatal(pid1);
        }
    };
    let mode = mode.unwrap_or_else(|| default_mode(&cfg));
    let code = rt.block_on(run(mode, cfg, pid1));
    if pid1 {
        // Init must not exit; a session loop that ended is a bug, so power off cleanly.
        init::shutdown(PowerAction::Poweroff);
    }
    std::process::exit(code);
}

/// As PID 1, exiting panics the kernel; power off instead.
#[allow(clippy::exit)] // The entry point's last resort; nothing left to clean up.
fn fatal(pid1: bool) -> ! {
    if pid1 {
        init::shutdown(PowerAction::Poweroff);
    }
    std::process::exit(1);
}

fn default_mode(cfg: &Config) -> Mode {
    match cfg.vsock_port {
        Some(p) if Path::new("/dev/vsock").exists() => Mode::Vsock(p),
        Some(p) => {
            warn!("hf.vsock_port={p} but /dev/vsock is absent (virtio_vsock not loaded?); using virtio-serial");
            Mode::Serial(None)
        }
        None => Mode::Serial(None),
    }
}

async fn run(mode: Mode, cfg: Config, pid1: bool) -> i32 {
    let reaper = match reaper::Reaper::start() {
        Ok(r) => r,
        Err(e) => {
            error!("cannot watch SIGCHLD: {e}");
            return 1;
        }
    };
    if !pid1 {
        // Orphaned descendants of exec'd commands come to us instead of the host's init, so
        // killed process groups are reaped and really gone.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    let (power_tx, mut power_rx) = mpsc::unbounded_channel();
    let svc = Arc::new(Services {
        reaper,
        power: power_tx.clone(),
        pid1,
        execs: ops::exec::ExecTable::new(),
        refresh_lock: tokio::sync::Mutex::new(()),
        main: ops::main_process::MainSlot::new(),
    });
    if pid1 {
        init::watch_power_button(power_tx.clone());
        for (kind, action) in [
            (SignalKind::terminate(), PowerAction::Poweroff),
            (SignalKind::user_defined2(), PowerAction::Poweroff),
            // With ctrl-alt-del disabled the kernel sends SIGINT to init: reboot, like sysvinit.
            (SignalKind::interrupt(), PowerAction::Reboot),
        ] {
            if let Ok(mut s) = signal(kind) {
                let tx = power_tx.clone();
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        let _ = tx.send(action);
                    }
                });
            }
        }
    }
    let server = async {
        match mode {
            Mode::Unix(p) => transport::serve_unix(&p, svc).await.map(|_| 0),
            Mode::Vsock(port) => transport::serve_vsock(port, svc).await.map(|_| 0),
            Mode::Stdio => transport::serve_stdio(svc).await.map(|_| 0),
            Mode::Serial(dev) => {
                transport::serve_serial(&cfg.agent_port, dev, svc).await;
                Ok(0)
            }
        }
    };
    tokio::select! {
        r = server => match r {
            Ok(c) => c,
            Err(e) => {
                error!("agent channel failed: {e}");
                1
            }
        },
        Some(action) = power_rx.recv() => {
            if pid1 {
                init::shutdown(action);
            }
            info!("{action:?} requested; not PID 1, so only the agent exits");
            0
        }
    }
}

//! `hyperfleet-testvmm`: a real process that stands in for a VMM in the
//! control-plane tests.
//!
//! It has no guest. It exists so that the daemon's tests exercise everything
//! around a VMM for real — a detached process with a pid and start time, a
//! control socket, readiness after a boot delay, pause/resume, a "memory"
//! (uptime counter) that survives save/restore, graceful poweroff, and a
//! process that outlives a SIGKILLed daemon — without booting a kernel.
//!
//! Protocol: one command per line on the unix socket, one answer line each.
//! `PING` → `PONG` once booted (else `BOOTING`); `STATE` → `running|paused`;
//! `PAUSE`, `RESUME` → `OK`; `UPTIME` → milliseconds the "guest" has run,
//! including time before a restore; `SAVE <path>` → writes the uptime, `OK`;
//! `POWEROFF` → `OK`, then exits 0 (unless `--ignore-poweroff`);
//! `GUEST_POWEROFF` → `OK`, then writes the kernel's "reboot: Power down" to
//! its output (the machine's console log) and exits 0, as a guest that
//! powers itself off does. `MAIN_EXIT <code>` → `OK`, then the same after
//! the agent's line `hyperfleet: main process exited with code <code>`, as
//! a guest whose main process ended does.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Guest {
    booted_at: Instant,
    never_ready: bool,
    ignore_poweroff: bool,
    paused: bool,
    /// Running time accumulated before the current running stretch.
    carried_ms: u64,
    running_since: Option<Instant>,
}

impl Guest {
    fn uptime_ms(&self) -> u64 {
        self.carried_ms
            + self
                .running_since
                .map(|t| t.elapsed().as_millis() as u64)
                .unwrap_or(0)
    }
}

struct Args {
    socket: PathBuf,
    boot_ms: u64,
    never_ready: bool,
    ignore_poweroff: bool,
    restore: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut socket = None;
    let mut boot_ms = 50;
    let mut never_ready = false;
    let mut ignore_poweroff = false;
    let mut restore = None;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--socket" => socket = it.next().map(PathBuf::from),
            "--boot-ms" => {
                boot_ms = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--boot-ms needs a number of milliseconds")?
            }
            "--never-ready" => never_ready = true,
            "--ignore-poweroff" => ignore_poweroff = true,
            "--restore" => restore = it.next().map(PathBuf::from),
            // The daemon passes the machine directory so that the process can
            // be recognised as the machine's VMM from its command line.
            "--machine-dir" => {
                it.next();
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(Args {
        socket: socket.ok_or("--socket is required")?,
        boot_ms,
        never_ready,
        ignore_poweroff,
        restore,
    })
}

// POWEROFF ends the whole stand-in process from its connection thread, as a
// real VMM exits when its guest powers off.
#[allow(clippy::exit)]
fn handle(stream: UnixStream, guest: Arc<Mutex<Guest>>) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut writer = stream;
    for line in BufReader::new(read_half).lines() {
        let Ok(line) = line else { return };
        let mut parts = line.splitn(2, ' ');
        let cmd = parts.next().unwrap_or("");
        let arg = parts.next();
        let mut exit_after = false;
        let answer = {
            let mut g = guest.lock().unwrap_or_else(|p| p.into_inner());
            match cmd {
                "PING" => {
                    if !g.never_ready && Instant::now() >= g.booted_at {
                        "PONG".to_string()
                    } else {
                        "BOOTING".to_string()
                    }
                }
                "STATE" => if g.paused { "paused" } else { "running" }.to_string(),
                "PAUSE" => {
                    if !g.paused {
                        g.carried_ms = g.uptime_ms();
                        g.running_since = None;
                        g.paused = true;
                    }
                    "OK".to_string()
                }
                "RESUME" => {
                    if g.paused {
                        g.running_since = Some(Instant::now());
                        g.paused = false;
                    }
                    "OK".to_string()
                }
                "UPTIME" => g.uptime_ms().to_string(),
                "SAVE" => match arg {
                    Some(path) => match std::fs::write(path, g.uptime_ms().to_string()) {
                        Ok(()) => "OK".to_string(),
                        Err(e) => format!("ERR cannot save to {path}: {e}"),
                    },
                    None => "ERR SAVE needs a path".to_string(),
                },
                "POWEROFF" => {
                    exit_after = !g.ignore_poweroff;
                    "OK".to_string()
                }
                "GUEST_POWEROFF" => {
                    exit_after = true;
                    println!("reboot: Power down");
                    "OK".to_string()
                }
                "MAIN_EXIT" => match arg.and_then(|a| a.parse::<i32>().ok()) {
                    Some(code) => {
                        exit_after = true;
                        println!("hyperfleet: main process exited with code {code}");
                        println!("reboot: Power down");
                        "OK".to_string()
                    }
                    None => "ERR MAIN_EXIT needs an exit code".to_string(),
                },
                other => format!("ERR unknown command '{other}'"),
            }
        };
        if writeln!(writer, "{answer}").is_err() {
            return;
        }
        if exit_after {
            let _ = writer.flush();
            std::process::exit(0);
        }
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hyperfleet-testvmm: {e}");
            std::process::exit(2);
        }
    };
    let carried_ms = match &args.restore {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(s) => s.trim().parse().unwrap_or(0),
            Err(e) => {
                eprintln!(
                    "hyperfleet-testvmm: cannot restore from {}: {e}",
                    p.display()
                );
                std::process::exit(3);
            }
        },
        None => 0,
    };
    let _ = std::fs::remove_file(&args.socket);
    let listener = match UnixListener::bind(&args.socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "hyperfleet-testvmm: cannot listen on {}: {e}",
                args.socket.display()
            );
            std::process::exit(4);
        }
    };
    let boot = Duration::from_millis(if args.restore.is_some() {
        5
    } else {
        args.boot_ms
    });
    let guest = Arc::new(Mutex::new(Guest {
        booted_at: Instant::now() + boot,
        never_ready: args.never_ready,
        ignore_poweroff: args.ignore_poweroff,
        paused: false,
        carried_ms,
        running_since: Some(Instant::now()),
    }));
    println!("testvmm: listening on {}", args.socket.display());
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let g = guest.clone();
                std::thread::spawn(move || handle(s, g));
            }
            Err(e) => eprintln!("testvmm: accept failed: {e}"),
        }
    }
}

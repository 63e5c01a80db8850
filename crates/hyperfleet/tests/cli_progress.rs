//! The CLI's progress spinner (`src/progress.rs`): drawn on a terminal
//! while a machine action waits, never with `--json` or when the output is
//! piped. The terminal is a real pseudo-terminal from util-linux's
//! `script`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Daemon, Sandbox};
use serde_json::json;

fn cli(d: &Daemon, args: &[&str]) -> Command {
    let mut c = Command::new(common::bin());
    c.args(["--url", &d.url, "--api-key", &d.key]).args(args);
    c
}

/// `args` run under a pseudo-terminal (stdin, stdout and stderr all the
/// terminal); everything it printed, as the terminal got it.
fn on_terminal(d: &Daemon, args: &[&str]) -> Output {
    let bin = common::bin();
    let mut line = vec![
        bin.display().to_string(),
        "--url".into(),
        d.url.clone(),
        "--api-key".into(),
        d.key.clone(),
    ];
    line.extend(args.iter().map(|a| a.to_string()));
    // `script` runs the line with sh -c; nothing here needs quoting beyond
    // the paths, which come from tempfile and cargo.
    Command::new("script")
        .args(["-qec", &line.join(" "), "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .expect("run script")
}

fn have_script() -> bool {
    common::present_or_skip(
        Path::new("/usr/bin/script").exists(),
        "/usr/bin/script (util-linux's bsdutils, an essential Debian package)",
    )
}

#[test]
fn machine_actions_show_a_spinner_on_a_terminal_only() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    // A slow boot, so the wait is long enough for the spinner to draw.
    for name in ["piped", "json", "tty"] {
        d.create(json!({"name": name, "metadata": {"stub_boot_ms": "1500"}}));
    }

    // Piped: the table on stdout, nothing at all on stderr.
    let out = cli(&d, &["machines", "start", "piped"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "stderr: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("running") && !stdout.contains('\x1b'),
        "{stdout}"
    );

    if !have_script() {
        return;
    }
    // A terminal with --json: the JSON and nothing else.
    let out = on_terminal(&d, &["--json", "machines", "start", "json"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("starting json"), "{text}");
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("only JSON");
    assert_eq!(v["status"], "running");

    // A terminal: the spinner says what it waits for, then is cleared
    // before the table.
    let out = on_terminal(&d, &["machines", "start", "tty"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("starting tty"), "no spinner: {text:?}");
    let table = text.rsplit("starting tty").next().unwrap();
    assert!(table.contains("running"), "{text:?}");
}

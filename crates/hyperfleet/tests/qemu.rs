//! Real guests: the daemon boots the guest assets under QEMU (TCG here, KVM
//! where usable), runs commands and moves files through the guest agent,
//! survives a SIGKILL without rebooting the guest, and fails cleanly when a
//! guest cannot come up. Needs qemu-system-x86_64 10.x and the guest assets
//! (scripts/test.sh installs and builds both; in CI nothing is skipped).

mod common;

use std::time::Duration;

use base64::Engine;
use common::{guest_assets, qemu_pids, Daemon, Sandbox};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn start_daemon(sb: &Sandbox, assets: &std::path::Path, extra: &[&str]) -> Daemon {
    let assets = assets.display().to_string();
    let mut args = vec!["--assets-dir", assets.as_str()];
    args.extend_from_slice(extra);
    if !extra.contains(&"--boot-timeout") {
        args.extend_from_slice(&["--boot-timeout", "120"]);
    }
    let args: Vec<&str> = args.to_vec();
    Daemon::start_with(sb, &[], &args)
}

fn exec(d: &Daemon, id: &str, body: Value) -> Value {
    let r = d.call("POST", &format!("/machines/{id}/exec"), Some(body.clone()));
    assert_eq!(r.status, 200, "exec {body}: {}", r.body);
    r.body
}

fn sh(d: &Daemon, id: &str, script: &str) -> String {
    let out = exec(d, id, json!({"command": ["sh", "-c", script]}));
    assert_eq!(out["exit_code"], 0, "{script}: {out}");
    out["stdout"].as_str().unwrap().to_string()
}

#[test]
fn a_real_guest_runs_commands_moves_files_and_leaves_nothing_behind() {
    let Some(assets) = guest_assets() else { return };
    let sb = Sandbox::new();
    let d = start_daemon(&sb, &assets, &["--default-vmm", "qemu"]);
    let m = d.create(json!({"name": "real", "vcpu_count": 1, "mem_size_mib": 256}));
    assert_eq!(m["vmm"], "qemu");
    assert!(
        m["image"].is_string(),
        "the machine records its guest image: {m}"
    );
    let id = m["id"].as_str().unwrap().to_string();

    let r = d.call("POST", "/machines/real/start?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());

    let out = exec(&d, &id, json!({"command": ["uname", "-a"]}));
    assert!(
        out["stdout"].as_str().unwrap().starts_with("Linux real "),
        "{out}"
    );
    let out = exec(
        &d,
        &id,
        json!({"cmd": ["sh", "-c", "echo to-err >&2; exit 3"]}),
    );
    assert_eq!(
        (out["exit_code"].as_i64(), out["stderr"].as_str()),
        (Some(3), Some("to-err\n"))
    );

    // A command past its timeout is reported and its process is gone.
    let out = exec(
        &d,
        &id,
        json!({"command": ["sh", "-c", "sleep 300 & echo $! > /tmp/sleeper; wait"], "timeout": 1}),
    );
    assert_eq!(out["timed_out"], true, "{out}");
    let pid = sh(&d, &id, "cat /tmp/sleeper").trim().to_string();
    let alive = exec(
        &d,
        &id,
        json!({"command": ["sh", "-c", format!("kill -0 {pid}")]}),
    );
    assert_ne!(
        alive["exit_code"], 0,
        "the timed-out process group was killed"
    );

    // Interactive exec over the WebSocket form: stdin streams in, output out.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use futures_util::StreamExt;
        let c = hyperfleet_client::Client::new(&d.url, Some(d.key.clone())).unwrap();
        let req = hyperfleet_api::ExecRequest {
            command: vec![
                "sh".into(),
                "-c".into(),
                "read a; read b; echo \"$b $a\"; exit 4".into(),
            ],
            ..Default::default()
        };
        let (mut input, events) = c.exec_interactive("real", &req).await.unwrap();
        input.send(b"first\n".to_vec()).await.unwrap();
        input.send(b"second\n".to_vec()).await.unwrap();
        input.eof().await.unwrap();
        let mut events = Box::pin(events);
        let (mut out, mut code) = (Vec::new(), None);
        while let Some(ev) = events.next().await {
            match ev.unwrap() {
                hyperfleet_api::ExecStreamEvent::Stdout { data } => {
                    out.extend(B64.decode(data).unwrap())
                }
                hyperfleet_api::ExecStreamEvent::Exit { exit_code, .. } => code = exit_code,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            (String::from_utf8(out).unwrap().as_str(), code),
            ("second first\n", Some(4))
        );
    });

    // 64 MiB up and down, streamed, identical.
    let data: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let want = hex(&Sha256::digest(&data));
    d.put_file("real", "/root/big.bin", data);
    let guest_sum = sh(&d, &id, "sha256sum /root/big.bin");
    assert!(guest_sum.starts_with(&want), "{guest_sum}");
    let back = d.get_file("real", "/root/big.bin");
    assert_eq!(hex(&Sha256::digest(back)), want);
    // The seeds' JSON form and stat.
    let r = d.call(
        "POST",
        "/machines/real/files",
        Some(json!({"path": "/root/note.txt", "content": B64.encode("hello")})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = d.call("GET", "/machines/real/files?path=/root/note.txt", None);
    assert_eq!(r.body["content"], B64.encode("hello"));
    let r = d.call("GET", "/machines/real/files/stat?path=/root/big.bin", None);
    assert_eq!(r.body["size"], 64 << 20);

    // Stop, start: the disk keeps the file.
    let r = d.call("POST", "/machines/real/stop", None);
    assert_eq!(r.body["status"], "stopped", "{}", r.body);
    assert!(qemu_pids(&sb.path().display().to_string()).is_empty());
    let r = d.call(
        "POST",
        "/machines/real/exec",
        Some(json!({"command": ["true"]})),
    );
    assert_eq!((r.status, r.code()), (409, "INVALID_STATE"));
    let r = d.call("POST", "/machines/real/start?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}", r.body);
    assert!(
        sh(&d, &id, "sha256sum /root/big.bin").starts_with(&want),
        "the file survived stop/start"
    );
    let r = d.call("POST", "/machines/real/restart?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}", r.body);
    assert_eq!(sh(&d, &id, "cat /root/note.txt"), "hello");

    let ev = d
        .call("GET", "/machines/real/events", None)
        .body
        .to_string();
    assert!(
        ev.contains("agent poweroff"),
        "stops went through the agent: {ev}"
    );
    let r = d.call("GET", "/machines/real/logs?tail=50", None);
    assert_eq!(r.status, 200);

    let r = d.call("DELETE", "/machines/real?force=true", None);
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(
        qemu_pids(&sb.path().display().to_string()).is_empty(),
        "no QEMU left"
    );
    assert!(
        !sb.machines_dir().join(&id).exists(),
        "no sockets, overlay or logs left"
    );
}

#[test]
fn a_sigkilled_daemon_does_not_reboot_the_guest() {
    let Some(assets) = guest_assets() else { return };
    let sb = Sandbox::new();
    let mut d = start_daemon(&sb, &assets, &["--default-vmm", "qemu"]);
    let m = d.create(json!({"name": "survivor"}));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/survivor/start?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}", r.body);
    let boot_id = sh(&d, &id, "cat /proc/sys/kernel/random/boot_id");
    let up1: f64 = sh(&d, &id, "cut -d' ' -f1 /proc/uptime")
        .trim()
        .parse()
        .unwrap();
    let qemu = qemu_pids(&sb.path().display().to_string());
    assert_eq!(qemu.len(), 1);

    d.kill9();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        qemu_pids(&sb.path().display().to_string()),
        qemu,
        "QEMU outlived the daemon"
    );
    let d = start_daemon(&sb, &assets, &["--default-vmm", "qemu"]);
    let r = d.call("GET", "/machines/survivor", None);
    assert_eq!(r.body["status"], "running");
    assert_eq!(
        sh(&d, &id, "cat /proc/sys/kernel/random/boot_id"),
        boot_id,
        "same boot"
    );
    let up2: f64 = sh(&d, &id, "cut -d' ' -f1 /proc/uptime")
        .trim()
        .parse()
        .unwrap();
    assert!(up2 > up1, "uptime kept growing: {up1} → {up2}");
    assert_eq!(
        qemu_pids(&sb.path().display().to_string()),
        qemu,
        "re-adopted, not rebooted"
    );
    let r = d.call("POST", "/machines/survivor/stop", None);
    assert_eq!(r.body["status"], "stopped", "{}", r.body);
    assert!(qemu_pids(&sb.path().display().to_string()).is_empty());
    assert_eq!(d.call("DELETE", "/machines/survivor", None).status, 204);
}

#[test]
fn guests_that_cannot_come_up_fail_with_the_reason_and_no_process() {
    let Some(assets) = guest_assets() else { return };
    let sb = Sandbox::new();
    // A boot timeout shorter than any boot: the watchdog fires.
    let d = start_daemon(
        &sb,
        &assets,
        &["--default-vmm", "qemu", "--boot-timeout", "1"],
    );
    d.create(json!({"name": "slow"}));
    let r = d.call("POST", "/machines/slow/start", None);
    assert_eq!((r.status, r.code()), (500, "RUNTIME_ERROR"), "{}", r.body);
    let m = d.call("GET", "/machines/slow", None).body;
    assert_eq!(m["status"], "failed");
    let msg = m["error_message"].as_str().unwrap();
    assert!(
        msg.contains("never became ready") && msg.contains("1s"),
        "{msg}"
    );
    assert!(
        qemu_pids(&sb.path().display().to_string()).is_empty(),
        "the VMM of a failed boot is gone"
    );
    assert_eq!(d.call("DELETE", "/machines/slow", None).status, 204);
    drop(d);

    // A guest whose initramfs is garbage: the kernel panics (panic=-1 and
    // -no-reboot make QEMU exit) and the failure names the console's last words.
    let broken = sb.path().join("broken-assets");
    make_broken_set(&assets, &broken);
    let d = start_daemon(&sb, &broken, &["--default-vmm", "qemu"]);
    d.create(json!({"name": "panicky"}));
    let r = d.call("POST", "/machines/panicky/start?timeout=300", None);
    assert_eq!((r.status, r.code()), (500, "RUNTIME_ERROR"), "{}", r.body);
    let m = d.call("GET", "/machines/panicky", None).body;
    let msg = m["error_message"].as_str().unwrap();
    assert!(
        msg.contains("VMM process exited") && msg.to_lowercase().contains("panic"),
        "{msg}"
    );
    assert!(qemu_pids(&sb.path().display().to_string()).is_empty());
    assert_eq!(d.call("DELETE", "/machines/panicky", None).status, 204);
}

/// A copy of the asset set whose initramfs is garbage (manifest updated so
/// the set still loads).
fn make_broken_set(good: &std::path::Path, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(good.join("manifest.json")).unwrap()).unwrap();
    let junk = b"this is not a cpio archive".repeat(64);
    for a in manifest["assets"].as_array_mut().unwrap() {
        let file = a["file"].as_str().unwrap().to_string();
        if a["kind"] == "initramfs" {
            std::fs::write(dir.join(&file), &junk).unwrap();
            a["size"] = json!(junk.len());
            a["sha256"] = json!(hex(&Sha256::digest(&junk)));
        } else {
            std::fs::hard_link(good.join(&file), dir.join(&file))
                .or_else(|_| std::fs::copy(good.join(&file), dir.join(&file)).map(drop))
                .unwrap();
        }
    }
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The peak resident memory of process `pid` (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kb * 1024
}

#[test]
fn a_guest_cannot_make_the_daemon_buffer_more_than_the_json_cap() {
    let Some(assets) = guest_assets() else { return };
    let sb = Sandbox::new();
    let cap: usize = 1 << 20;
    let d = start_daemon(
        &sb,
        &assets,
        &[
            "--default-vmm",
            "qemu",
            "--guest-json-max-bytes",
            "1048576",
            "--guest-requests-per-tenant",
            "2",
        ],
    );
    let m = d.create(json!({"name": "bounded", "vcpu_count": 1, "mem_size_mib": 256}));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/bounded/start?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());

    // A 512 MiB sparse file, a small one, and a link the guest keeps swapping
    // between them: whatever the stat saw, the JSON form reads at most the cap.
    sh(
        &d,
        &id,
        "dd if=/dev/zero of=/tmp/big bs=1048576 count=0 seek=512 2>/dev/null; \
         echo small > /tmp/small; ln -sf /tmp/small /tmp/link; \
         (while :; do ln -sf /tmp/big /tmp/link.new; mv -f /tmp/link.new /tmp/link; \
         ln -sf /tmp/small /tmp/link.new; mv -f /tmp/link.new /tmp/link; done) \
         >/dev/null 2>&1 </dev/null & echo $! > /tmp/swapper",
    );
    let r = d.call("GET", "/machines/bounded/files?path=/tmp/big", None);
    assert_eq!(
        (r.status, r.code()),
        (413, "PAYLOAD_TOO_LARGE"),
        "{}",
        r.body
    );
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("raw=true"),
        "the refusal names the streamed form: {}",
        r.body
    );
    let (mut small, mut refused) = (0, 0);
    for _ in 0..40 {
        let r = d.call("GET", "/machines/bounded/files?path=/tmp/link", None);
        match r.status {
            200 => {
                assert!(r.body["size"].as_u64().unwrap() <= cap as u64, "{}", r.body);
                small += 1;
            }
            413 => refused += 1,
            _ => panic!("unexpected answer {}: {}", r.status, r.body),
        }
    }
    assert_eq!(small + refused, 40);

    // 16 MiB of NULs asked for with a 1 MiB cap: the answer is bounded once
    // encoded (a NUL is six bytes of JSON), not six times the cap.
    let resp = d
        .raw()
        .post(format!("{}/machines/bounded/exec", d.url))
        .bearer_auth(&d.key)
        .json(&json!({"command": ["head", "-c", "16777216", "/dev/zero"],
                      "max_output_bytes": cap}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().unwrap();
    assert!(
        body.len() <= cap + 1024,
        "a {} byte answer for a {cap} byte cap",
        body.len()
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (v["exit_code"].as_i64(), v["truncated"].as_bool()),
        (Some(0), Some(true))
    );
    let r = d.call(
        "POST",
        "/machines/bounded/exec",
        Some(json!({"command": ["true"], "max_output_bytes": 2 * cap})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("stream=true"));

    // All of the above left the daemon small (it idles around 15 MB; reading
    // the 512 MiB file would take it past 700 MB).
    let peak = peak_rss(d.child.id());
    assert!(peak < 200 << 20, "the daemon peaked at {} MiB", peak >> 20);

    // Two guest requests per tenant: a third one at the same time gets 429.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let (url, key) = (d.url.clone(), d.key.clone());
            std::thread::spawn(move || {
                reqwest::blocking::Client::new()
                    .post(format!("{url}/machines/bounded/exec"))
                    .bearer_auth(key)
                    .json(&json!({"command": ["sleep", "4"]}))
                    .send()
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let r = d.call(
        "POST",
        "/machines/bounded/exec",
        Some(json!({"command": ["true"]})),
    );
    assert_eq!(
        (r.status, r.code()),
        (429, "TOO_MANY_REQUESTS"),
        "{}",
        r.body
    );
    for t in slow {
        assert_eq!(t.join().unwrap().unwrap(), 200);
    }
    sh(&d, &id, "kill $(cat /tmp/swapper)");

    // The guest's root cannot be removed by another spelling, nor by '..'.
    for path in ["//", "/./", "/tmp/.."] {
        let r = d.call(
            "DELETE",
            &format!("/machines/bounded/files?path={path}&recursive=true"),
            None,
        );
        assert_eq!(r.status, 400, "{path}: {}", r.body);
    }
    assert!(sh(&d, &id, "ls /").contains("tmp"), "the root is intact");
    let r = d.call(
        "POST",
        "/machines/bounded/exec",
        Some(json!({"command": ["true"], "env": {"A=B": "x"}})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("A=B"));
}

/// Checks that machine `id`'s one QEMU process runs confined: as a single
/// unprivileged uid (= gid, no supplementary groups), with no capabilities,
/// under seccomp, and holding no descriptor of the daemon's data directory
/// besides its own machine's files. Returns the uid.
fn confined_uid(sb: &Sandbox, id: &str) -> u32 {
    let dir = sb.machines_dir().join(id);
    let pids = qemu_pids(&dir.display().to_string());
    assert_eq!(pids.len(), 1, "one QEMU for {id}: {pids:?}");
    let pid = pids[0];
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |key: &str| -> Vec<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in\n{status}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let uid = field("Uid:");
    assert!(
        uid.iter().all(|u| *u == uid[0]) && uid[0] != "0",
        "real, effective, saved and fs uid are the machine's: {uid:?}"
    );
    assert_eq!(field("Gid:"), uid, "gid = uid");
    assert!(field("Groups:").is_empty(), "no supplementary groups");
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(field(caps), ["0000000000000000"], "{caps}");
    }
    assert_eq!(field("Seccomp:"), ["2"], "QEMU's seccomp filter is on");
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let Ok(target) = std::fs::read_link(fd.unwrap().path()) else {
            continue;
        };
        if target.starts_with(sb.path()) {
            assert!(
                target.starts_with(&dir),
                "QEMU holds {} of the daemon's",
                target.display()
            );
        }
    }
    uid[0].parse().unwrap()
}

#[test]
fn as_root_each_qemu_runs_sandboxed_as_its_machines_own_uid() {
    let Some(assets) = guest_assets() else { return };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: only a root daemon runs QEMU as the machines' uids");
        return;
    }
    let sb = Sandbox::new();
    let d = start_daemon(&sb, &assets, &["--default-vmm", "qemu"]);
    let mut ids = Vec::new();
    let mut uids = Vec::new();
    for name in ["conf-a", "conf-b"] {
        let m = d.create(json!({"name": name, "vcpu_count": 1, "mem_size_mib": 256}));
        let id = m["id"].as_str().unwrap().to_string();
        let r = d.call("POST", &format!("/machines/{name}/start?timeout=300"), None);
        assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());
        uids.push(confined_uid(&sb, &id));
        ids.push(id);
    }
    assert_ne!(uids[0], uids[1], "each machine has a uid of its own");
    let id = &ids[0];

    // Exec and files go through the agent channel QEMU was handed.
    assert_eq!(sh(&d, id, "echo confined"), "confined\n");
    d.put_file("conf-a", "/root/f.txt", b"through the sandbox".to_vec());
    assert_eq!(d.get_file("conf-a", "/root/f.txt"), b"through the sandbox");

    // Pause and resume over QMP.
    let r = d.call("POST", "/machines/conf-a/pause?timeout=60", None);
    assert_eq!(r.body["status"], "paused", "{}", r.body);
    let r = d.call("POST", "/machines/conf-a/resume?timeout=60", None);
    assert_eq!(r.body["status"], "running", "{}", r.body);

    // Suspend writes memory through a descriptor QEMU is passed; resume
    // reads it back in a new QEMU of the same uid, without a reboot.
    let boot = sh(&d, id, "cat /proc/sys/kernel/random/boot_id");
    let r = d.call("POST", "/machines/conf-a/suspend?timeout=300", None);
    assert_eq!(r.body["status"], "suspended", "{}\n{}", r.body, d.log());
    let dir = sb.machines_dir().join(id).display().to_string();
    assert!(
        qemu_pids(&dir).is_empty(),
        "a suspended machine has no QEMU"
    );
    let r = d.call("POST", "/machines/conf-a/resume?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());
    assert_eq!(sh(&d, id, "cat /proc/sys/kernel/random/boot_id"), boot);
    assert_eq!(confined_uid(&sb, id), uids[0], "the uid is kept");

    // A graceful stop still reaches the guest.
    let r = d.call("POST", "/machines/conf-a/stop?timeout=120", None);
    assert_eq!(r.body["status"], "stopped", "{}", r.body);
    assert!(qemu_pids(&dir).is_empty());
    let ev = d
        .call("GET", "/machines/conf-a/events", None)
        .body
        .to_string();
    assert!(ev.contains("agent poweroff"), "a graceful stop: {ev}");
    let r = d.call("DELETE", "/machines/conf-b?force=true", None);
    assert_eq!(r.status, 204, "{}", r.body);
}

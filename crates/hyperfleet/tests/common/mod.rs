//! Test harness: runs the real `hyperfleet` daemon binary on a temporary data
//! directory with the stub backend (a real `hyperfleet-testvmm` process per
//! machine), talks to it over HTTP, and cleans up every process it started
//! even when a test fails.

#![allow(dead_code)]

pub(crate) mod crash;
pub(crate) mod netns;
pub(crate) mod oci;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub(crate) fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hyperfleet"))
}

/// The stand-in VMM, built by `cargo test --workspace` next to our binary.
pub(crate) fn testvmm() -> PathBuf {
    let p = bin().with_file_name("hyperfleet-testvmm");
    assert!(
        p.is_file(),
        "MISSING: {} — build it with `cargo build -p hyperfleet-testvmm` (the README's test command does)",
        p.display()
    );
    p
}

/// Where the test command builds the guest assets (`HF_TEST_ASSETS` overrides).
pub(crate) fn assets_dir() -> PathBuf {
    std::env::var_os("HF_TEST_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/hf-test-data/assets/current")
        })
}

/// `ok`, or else a loud `SKIPPED: MISSING: <what>` note outside CI and a
/// panic in CI, where nothing the suite needs may be absent.
pub(crate) fn present_or_skip(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    let msg = format!("MISSING: {what}");
    if std::env::var_os("CI").is_some() {
        panic!("{msg}; CI must not skip");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

/// The guest assets the QEMU tests boot (scripts/test.sh builds them), or
/// `None` with a loud note when absent outside CI. In CI they must exist.
pub(crate) fn guest_assets() -> Option<PathBuf> {
    let dir = assets_dir();
    let ok = dir.join("manifest.json").exists()
        && std::process::Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    let what = format!(
        "qemu-system-x86_64 and guest assets in {} (scripts/test.sh installs and builds them)",
        dir.display()
    );
    present_or_skip(ok, &what).then_some(dir)
}

/// Live QEMU processes whose command line contains `marker`.
pub(crate) fn qemu_pids(marker: &str) -> Vec<i32> {
    pids_matching(marker, "qemu-system")
}

/// A data directory whose processes and files are removed on drop.
pub(crate) struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub(crate) fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::Builder::new()
                .prefix("hf-test-")
                .tempdir()
                .unwrap(),
        }
    }
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
    pub(crate) fn machines_dir(&self) -> PathBuf {
        self.path().join("machines")
    }
    /// Sends one command to the stand-in VMM of machine `id` (its
    /// protocol: crates/testvmm) and returns the answer.
    pub(crate) fn testvmm_command(&self, id: &str, line: &str) -> String {
        use std::io::{BufRead, Write};
        let sock = self.machines_dir().join(id).join("vmm.sock");
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        writeln!(s, "{line}").unwrap();
        let mut answer = String::new();
        std::io::BufReader::new(s).read_line(&mut answer).unwrap();
        answer.trim().to_string()
    }

    /// Live stand-in VMM processes of this sandbox.
    pub(crate) fn vmm_pids(&self) -> Vec<i32> {
        pids_with(&format!("{}/", self.machines_dir().display()))
    }
    pub(crate) fn vmm_pids_of(&self, machine_id: &str) -> Vec<i32> {
        pids_with(&format!(
            "{}",
            self.machines_dir().join(machine_id).display()
        ))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let me = self.path().display().to_string();
        for pid in pids_with(&me).into_iter().chain(qemu_pids(&me)) {
            // SAFETY: kill(2) with a pid we found under our own sandbox.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        // The daemon's guest RAM files live outside the data directory
        // (tmpfs); they go with the sandbox too.
        let _ = std::fs::remove_dir_all(hyperfleet_core::config::default_memory_dir(self.path()));
    }
}

/// Live (non-zombie) stand-in VMMs whose command line contains `marker`.
pub(crate) fn pids_with(marker: &str) -> Vec<i32> {
    pids_matching(marker, "hyperfleet-testvmm")
}

/// Live (non-zombie) processes whose command line contains both strings.
pub(crate) fn pids_matching(marker: &str, program: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.contains(marker) || !cmd.contains(program) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        if state != Some("Z") && state.is_some() {
            out.push(pid);
        }
    }
    out
}

pub(crate) struct Daemon {
    pub child: Child,
    pub url: String,
    pub key: String,
    http: reqwest::blocking::Client,
    data_dir: PathBuf,
    exited: Option<ExitStatus>,
}

pub(crate) struct Resp {
    pub status: u16,
    pub body: Value,
}

impl Resp {
    pub(crate) fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl Daemon {
    pub(crate) fn start(sb: &Sandbox) -> Daemon {
        Self::start_with(sb, &[], &[])
    }

    pub(crate) fn start_with(sb: &Sandbox, env: &[(&str, &str)], args: &[&str]) -> Daemon {
        let dir = sb.path().to_path_buf();
        let addr_file = dir.join("api.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--port", "0"])
            .arg("--stub-vmm-binary")
            .arg(testvmm())
            .args(args)
            .env("HYPERFLEET_LOG", "debug")
            .env_remove("HYPERFLEET_CRASH_AT")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Test defaults, each unless the test sets it.
        for (flag, value) in [
            ("--default-vmm", "stub"),
            ("--stop-timeout", "2"),
            ("--boot-timeout", "10"),
            // Networking changes the host (TAPs, nftables): only the tests
            // that run the daemon in a network namespace of their own turn
            // it on.
            ("--network", "off"),
            ("--proxy-port", "0"),
            // Most tests leave machines alone for longer than they would
            // stay up idle; the idle tests set their own.
            ("--default-idle-timeout", "0"),
        ] {
            if !args.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn hyperfleet serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            if let Ok(s) = std::fs::read_to_string(&addr_file) {
                if s.ends_with('\n') {
                    break s.trim().to_string();
                }
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start; see {}/daemon.log:\n{}",
                dir.display(),
                std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let key = std::fs::read_to_string(dir.join("admin.key"))
            .unwrap_or_default()
            .trim()
            .to_string();
        Daemon {
            child,
            url: format!("http://{addr}"),
            key,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            data_dir: dir,
            exited: None,
        }
    }

    /// A daemon whose machines are real QEMU guests of the guest assets
    /// in `assets` (boot deadline 180 s: TCG is slow), with `extra` flags.
    pub(crate) fn start_qemu(sb: &Sandbox, assets: &Path, extra: &[&str]) -> Daemon {
        let assets = assets.display().to_string();
        let mut args = vec![
            "--assets-dir",
            assets.as_str(),
            "--default-vmm",
            "qemu",
            "--boot-timeout",
            "180",
        ];
        args.extend_from_slice(extra);
        Daemon::start_with(sb, &[], &args)
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("daemon.log")).unwrap_or_default()
    }

    /// A request with the bootstrap admin key.
    pub(crate) fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        self.call_as(&self.key.clone(), method, path, body)
    }

    pub(crate) fn try_call_as(
        &self,
        key: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Resp, reqwest::Error> {
        request(&self.http, &self.url, key, method, path, body)
    }

    pub(crate) fn call_as(&self, key: &str, method: &str, path: &str, body: Option<Value>) -> Resp {
        self.try_call_as(key, method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n--- daemon log ---\n{}", self.log()))
    }

    /// Raw request for contract tests (custom headers / bodies).
    pub(crate) fn raw(&self) -> &reqwest::blocking::Client {
        &self.http
    }

    /// Streams `data` into a guest file; it must be created (201).
    pub(crate) fn put_file(&self, machine: &str, path: &str, data: Vec<u8>) {
        let r = self
            .http
            .put(format!("{}/machines/{machine}/files?path={path}", self.url))
            .bearer_auth(&self.key)
            .body(data)
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().unwrap_or_default());
    }

    /// A guest file's bytes, streamed back.
    pub(crate) fn get_file(&self, machine: &str, path: &str) -> Vec<u8> {
        let r = self
            .http
            .get(format!(
                "{}/machines/{machine}/files?path={path}&raw=true",
                self.url
            ))
            .bearer_auth(&self.key)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.bytes().unwrap().to_vec()
    }

    pub(crate) fn create(&self, body: Value) -> Value {
        let r = self.call("POST", "/api/v1/machines", Some(body));
        assert_eq!(r.status, 201, "create: {}", r.body);
        r.body
    }

    /// Waits for the daemon process to exit on its own.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.exited = Some(s);
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn terminate(&mut self) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.wait_exit(Duration::from_secs(15))
            .expect("daemon exits on SIGTERM")
    }
}

pub(crate) fn killed_by_sigkill(s: &ExitStatus) -> bool {
    s.signal() == Some(libc::SIGKILL)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited.is_none() {
            self.kill9();
        }
    }
}

/// One API request: `key` as the bearer (none when empty), `body` as JSON;
/// the answer's body parsed as JSON when it is, else kept as a string.
pub(crate) fn request(
    http: &reqwest::blocking::Client,
    url: &str,
    key: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Resp, reqwest::Error> {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut r = http.request(m, format!("{url}{path}"));
    if !key.is_empty() {
        r = r.bearer_auth(key);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send()?;
    let status = resp.status().as_u16();
    let text = resp.text()?;
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Ok(Resp { status, body })
}

/// Polls `f` until it returns Some or the deadline passes.
pub(crate) fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

//! OCI images for the tests, built offline from files on the machine: a
//! Rust builder of OCI image layout tars (layers as raw tar entries, so
//! whiteouts and hostile names can be written), and a local registry
//! (Debian's `docker-registry`, CNCF distribution) on loopback, with or
//! without htpasswd auth, that images are pushed to with `skopeo`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};

/// One layer entry.
pub(crate) enum Entry {
    File(&'static str, Vec<u8>, u32),
    Dir(&'static str),
    Symlink(&'static str, &'static str),
}

pub(crate) fn file(name: &'static str, data: &str) -> Entry {
    Entry::File(name, data.as_bytes().to_vec(), 0o644)
}

/// An uncompressed layer tar; names are written raw.
pub(crate) fn layer(entries: &[Entry]) -> Vec<u8> {
    let mut b = Vec::new();
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let (name, data, kind, mode, link): (&str, &[u8], _, u32, &str) = match e {
            Entry::File(n, d, m) => (n, d, tar::EntryType::Regular, *m, ""),
            Entry::Dir(n) => (n, &[], tar::EntryType::Directory, 0o755, ""),
            Entry::Symlink(n, t) => (n, &[], tar::EntryType::Symlink, 0o777, t),
        };
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(data);
        b.extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
    }
    b.extend(std::iter::repeat_n(0u8, 1024));
    b
}

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(b)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Image config fields.
#[derive(Default)]
pub(crate) struct Config {
    pub entrypoint: Vec<&'static str>,
    pub cmd: Vec<&'static str>,
    pub env: Vec<&'static str>,
    pub workdir: Option<&'static str>,
    pub user: Option<&'static str>,
}

/// An OCI image layout tar of `layers` (gzipped), written to `out`.
pub(crate) fn oci_archive(out: &Path, layers: &[Vec<u8>], cfg: &Config) {
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let (mut descs, mut diffs) = (Vec::new(), Vec::new());
    for l in layers {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(l).unwrap();
        let gz = e.finish().unwrap();
        let d = digest(&gz);
        diffs.push(digest(l));
        descs.push(
            json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                          "digest": d, "size": gz.len()}),
        );
        blobs.push((d, gz));
    }
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": cfg.entrypoint, "Cmd": cfg.cmd, "Env": cfg.env,
                   "WorkingDir": cfg.workdir.unwrap_or(""), "User": cfg.user.unwrap_or("")},
        "rootfs": {"type": "layers", "diff_ids": diffs}
    })
    .to_string()
    .into_bytes();
    let cd = digest(&config);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cd, "size": config.len()},
        "layers": descs,
    })
    .to_string()
    .into_bytes();
    let md = digest(&manifest);
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md, "size": manifest.len()}]})
    .to_string();
    blobs.push((cd, config));
    blobs.push((md, manifest));
    let f = std::fs::File::create(out).unwrap();
    let mut t = tar::Builder::new(f);
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, name, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", index.as_bytes());
    for (d, b) in &blobs {
        add(&format!("blobs/sha256/{}", &d[7..]), b);
    }
    t.into_inner().unwrap().sync_all().unwrap();
}

/// The two-layer test image: busybox-static, a file the second layer
/// deletes (whiteout) and a directory it replaces (opaque whiteout).
pub(crate) fn two_layer_image(out: &Path, cfg: &Config) {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static at /bin/busybox");
    let l1 = layer(&[
        Entry::Dir("bin/"),
        Entry::File("bin/busybox", busybox, 0o755),
        Entry::Symlink("bin/sh", "busybox"),
        Entry::Dir("etc/"),
        file("etc/gone", "deleted by layer 2"),
        file("etc/kept", "kept"),
        Entry::Dir("data/"),
        file("data/old", "replaced by layer 2"),
    ]);
    let l2 = layer(&[
        file("etc/.wh.gone", ""),
        Entry::Dir("data/"),
        file("data/.wh..wh..opq", ""),
        file("data/new", "from layer 2"),
    ]);
    oci_archive(out, &[l1, l2], cfg);
}

/// What the image tests need from the host, or a loud skip (a failure in CI).
pub(crate) fn tools_present() -> bool {
    let ok = [
        "docker-registry",
        "skopeo",
        "htpasswd",
        "mkfs.ext4",
        "debugfs",
    ]
    .iter()
    .all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    }) && Path::new("/bin/busybox").exists();
    super::present_or_skip(
        ok,
        "docker-registry, skopeo, htpasswd (apache2-utils), e2fsprogs and busybox-static \
         (scripts/install-oci-deps.sh installs them)",
    )
}

/// A registry on loopback, killed (by pid) on drop.
pub(crate) struct Registry {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub creds: Option<(String, String)>,
}

impl Registry {
    pub(crate) fn start(auth: bool) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("hf-reg-")
            .tempdir()
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
             delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        let creds = auth.then(|| ("tester".to_string(), "s3cret-pw".to_string()));
        if let Some((u, p)) = &creds {
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .unwrap();
            assert!(out.status.success());
            std::fs::write(dir.path().join("htpasswd"), out.stdout).unwrap();
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: hf-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), cfg).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let reg = Registry {
            child,
            port,
            dir,
            creds,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not start: {}",
                std::fs::read_to_string(reg.dir.path().join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        reg
    }

    /// `127.0.0.1:<port>/<name>`.
    pub(crate) fn reference(&self, name: &str) -> String {
        format!("127.0.0.1:{}/{name}", self.port)
    }

    /// Pushes the OCI archive `archive` as `name` (`repo:tag`).
    pub(crate) fn push(&self, archive: &Path, name: &str) -> String {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some((u, p)) = &self.creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        let r = self.reference(name);
        let out = cmd
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://{r}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo push: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        r
    }

    /// The registry's stored copy of blob `digest` (to tamper with).
    pub(crate) fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = &digest[7..];
        self.dir.path().join(format!(
            "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

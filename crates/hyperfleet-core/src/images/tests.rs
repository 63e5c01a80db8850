use std::io::Write;
use std::sync::Mutex as StdMutex;

use super::*;

/// A layer tar from (name, content) pairs; names ending in `/` are
/// directories. Names are written raw (hostile ones too).
pub(crate) fn layer(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        let dir = name.ends_with('/');
        h.set_entry_type(if dir {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        h.set_mode(if dir { 0o755 } else { 0o644 });
        h.set_size(data.len() as u64);
        h.set_mtime(1);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(data.as_bytes());
        b.extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
    }
    b.extend(std::iter::repeat_n(0u8, 1024));
    b
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// An OCI image layout tar with `layers` (uncompressed tars, stored
/// gzipped); `tamper` flips a byte of the last layer blob after its digest
/// was taken.
pub(crate) fn oci_archive(layers: &[Vec<u8>], cmd: &[&str], tamper: bool) -> Vec<u8> {
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut descs = Vec::new();
    let mut diffs = Vec::new();
    for l in layers {
        let gz = gzip(l);
        let d = sha256_digest(&gz);
        diffs.push(sha256_digest(l));
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d, "size": gz.len()}));
        blobs.push((d, gz));
    }
    if tamper {
        let last = blobs.last_mut().unwrap();
        let n = last.1.len();
        last.1[n - 9] ^= 0xff;
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diffs}
    })
    .to_string()
    .into_bytes();
    let cd = sha256_digest(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cd, "size": config.len()},
        "layers": descs,
    })
    .to_string()
    .into_bytes();
    let md = sha256_digest(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": md, "size": manifest.len()}]
    })
    .to_string();
    blobs.push((cd, config));
    blobs.push((md, manifest));
    let mut t = tar::Builder::new(Vec::new());
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
    t.into_inner().unwrap()
}

fn events() -> (Progress, Arc<StdMutex<Vec<PullEvent>>>) {
    let seen = Arc::new(StdMutex::new(Vec::new()));
    let s = seen.clone();
    (Arc::new(move |e| s.lock().unwrap().push(e)), seen)
}

fn debugfs(img: &Path, req: &str) -> String {
    let out = std::process::Command::new("debugfs")
        .args(["-R", req])
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn empty(p: &Path) -> bool {
    std::fs::read_dir(p).unwrap().next().is_none()
}

#[test]
fn an_archive_is_imported_once_with_whiteouts_applied() {
    let d = tempfile::tempdir().unwrap();
    let store = Arc::new(ImageStore::open(d.path(), ImageLimits::default()).unwrap());
    let l1 = layer(&[
        ("etc/", ""),
        ("etc/gone", "x"),
        ("etc/kept", "k"),
        ("data/", ""),
        ("data/old", "o"),
    ]);
    let l2 = layer(&[
        ("etc/.wh.gone", ""),
        ("data/.wh..wh..opq", ""),
        ("data/new", "n"),
    ]);
    let tar = oci_archive(&[l1, l2], &["/bin/app", "--flag"], false);
    let (p, seen) = events();
    let built = archive::import(store.clone(), &tar[..], &p).unwrap();
    assert_eq!(built.run.cmd, ["/bin/app", "--flag"]);
    assert_eq!(built.run.env, ["PATH=/bin"]);
    let root = debugfs(&built.rootfs(), "ls -p /");
    for want in ["etc", "data", "proc", "sys", "dev", "run", "tmp"] {
        assert!(root.contains(&format!("/{want}/")), "{want} in {root}");
    }
    let etc = debugfs(&built.rootfs(), "ls -p /etc");
    assert!(etc.contains("/kept/") && !etc.contains("/gone/"), "{etc}");
    let data = debugfs(&built.rootfs(), "ls -p /data");
    assert!(data.contains("/new/") && !data.contains("/old/"), "{data}");
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, PullEvent::Built { .. })));
    assert!(empty(&d.path().join("images/tmp")));
    // The same image again: no image work.
    let (p, seen) = events();
    let again = archive::import(store.clone(), &tar[..], &p).unwrap();
    assert_eq!(again.digest, built.digest);
    let seen = seen.lock().unwrap();
    assert!(seen.iter().any(|e| matches!(e, PullEvent::Reused { .. })));
    assert!(!seen
        .iter()
        .any(|e| matches!(e, PullEvent::Unpacking { .. })));
    store.remove(&built.digest).unwrap();
    assert!(store.get(&built.digest).is_none());
    assert!(empty(&d.path().join("images/fs")));
}

#[test]
fn a_tampered_blob_or_an_escaping_layer_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let store = Arc::new(ImageStore::open(d.path(), ImageLimits::default()).unwrap());
    let tar = oci_archive(&[layer(&[("a", "1")])], &["/a"], true);
    let err = archive::import(store.clone(), &tar[..], &no_progress()).unwrap_err();
    assert!(matches!(err, ImageError::Digest { .. }), "{err}");
    let tar = oci_archive(
        &[layer(&[("ok", "1"), ("../../escape", "x")])],
        &["/a"],
        false,
    );
    let err = archive::import(store.clone(), &tar[..], &no_progress()).unwrap_err();
    assert!(err.to_string().contains("`..`"), "{err}");
    assert!(!d.path().join("escape").exists());
    assert!(!d.path().join("images/escape").exists());
    for sub in ["tmp", "fs", "blobs/sha256"] {
        assert!(empty(&d.path().join("images").join(sub)), "{sub} is empty");
    }
}

#[test]
fn digests_become_file_names_only_when_well_formed() {
    digest_hex(&format!("sha256:{}", "a".repeat(64))).unwrap();
    for bad in [
        "sha256:../../etc".to_string(),
        format!("sha512:{}", "a".repeat(128)),
        format!("sha256:{}", "A".repeat(64)),
    ] {
        digest_hex(&bad).unwrap_err();
    }
}

#[test]
fn the_main_process_is_the_images_with_dockers_overrides() {
    use crate::validate::ProcessOverrides;
    let run = RunConfig {
        entrypoint: vec!["/entry".into()],
        cmd: vec!["serve".into(), "--port=80".into()],
        env: vec!["PATH=/bin".into()],
        workdir: Some("/app".into()),
        user: Some("app".into()),
    };
    let argv = |ov: ProcessOverrides| main_process(&run, &ov).map(|p| p.argv);
    assert_eq!(
        argv(ProcessOverrides::default()).unwrap(),
        ["/entry", "serve", "--port=80"]
    );
    // A cmd replaces the image's cmd only.
    let ov = ProcessOverrides {
        cmd: Some(vec!["check".into()]),
        ..Default::default()
    };
    assert_eq!(argv(ov).unwrap(), ["/entry", "check"]);
    // An entrypoint drops the image's cmd, unless a cmd is given too.
    let ov = ProcessOverrides {
        entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
        ..Default::default()
    };
    assert_eq!(argv(ov).unwrap(), ["/bin/sh", "-c"]);
    let ov = ProcessOverrides {
        entrypoint: Some(vec![]),
        cmd: Some(vec!["/bin/true".into()]),
        workdir: Some("/tmp".into()),
        user: Some("0:0".into()),
        ..Default::default()
    };
    let p = main_process(&run, &ov).unwrap();
    assert_eq!(p.argv, ["/bin/true"]);
    assert_eq!(
        (p.workdir.as_deref(), p.user.as_deref()),
        (Some("/tmp"), Some("0:0"))
    );
    assert_eq!(p.image_env, ["PATH=/bin"]);
    // Nothing to run: no main process.
    let ov = ProcessOverrides {
        entrypoint: Some(vec![]),
        cmd: Some(vec![]),
        ..Default::default()
    };
    assert_eq!(argv(ov), None);
    assert_eq!(
        main_process(&RunConfig::default(), &Default::default()),
        None
    );
}

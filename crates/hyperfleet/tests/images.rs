//! OCI images through the daemon: pulls from a local registry (Debian's
//! `docker-registry` on loopback, with and without htpasswd auth), imports,
//! the shared filesystem per digest, refusals that leave nothing behind, a
//! daemon SIGKILL during a pull, machines made from images (stub backend),
//! and a real QEMU guest booting an image whose second layer deletes a file
//! and replaces a directory. Images are built in the test from files on the
//! machine (busybox-static). Needs scripts/install-oci-deps.sh.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::oci::{self, Config, Registry};
use common::{eventually, guest_assets, Daemon, Sandbox};
use serde_json::{json, Value};

fn wait_image(d: &Daemon, id: &str) -> Value {
    eventually(
        "the image to leave pulling",
        Duration::from_secs(120),
        || {
            let r = d.call("GET", &format!("/images/{id}"), None);
            assert_eq!(r.status, 200, "{}", r.body);
            (r.body["status"] != "pulling").then_some(r.body)
        },
    )
}

fn pull(d: &Daemon, body: Value) -> Value {
    let r = d.call("POST", "/images", Some(body));
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["status"], "pulling");
    wait_image(d, r.body["id"].as_str().unwrap())
}

fn kinds(d: &Daemon, id: &str) -> Vec<String> {
    let r = d.call("GET", &format!("/images/{id}/events"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect()
}

fn entries(p: &Path) -> Vec<String> {
    std::fs::read_dir(p)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Nothing of unfinished work in the image store.
fn no_leftovers(sb: &Sandbox) {
    for sub in ["tmp", "blobs/sha256"] {
        let p = sb.path().join("images").join(sub);
        assert!(entries(&p).is_empty(), "{sub}: {:?}", entries(&p));
    }
}

fn image_archive(dir: &Path, cfg: &Config) -> std::path::PathBuf {
    let p = dir.join("image.tar");
    oci::two_layer_image(&p, cfg);
    p
}

#[test]
fn pulls_share_one_filesystem_and_report_progress() {
    if !oci::tools_present() {
        return;
    }
    let reg = Registry::start(false);
    let archive = image_archive(reg.dir.path(), &Config::default());
    let r = reg.push(&archive, "layers:1");
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let img = pull(&d, json!({"ref": r}));
    assert_eq!(img["status"], "ready", "{img}");
    let digest = img["digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:"));
    assert!(img["manifest_digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    let layers = img["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for l in layers {
        assert_eq!(l["done"], l["size"], "{img}");
    }
    let k = kinds(&d, img["id"].as_str().unwrap());
    for want in [
        "pulling",
        "resolved",
        "layer_done",
        "unpacking",
        "building",
        "built",
        "ready",
    ] {
        assert!(k.iter().any(|x| x == want), "{want} in {k:?}");
    }
    let fs = sb.path().join("images/fs").join(&digest[7..]);
    assert!(fs.join("rootfs.ext4").is_file());
    no_leftovers(&sb);

    // The same image again: a second record, the same filesystem, no work.
    let again = pull(&d, json!({"ref": r}));
    assert_eq!(again["status"], "ready");
    assert_ne!(again["id"], img["id"]);
    assert_eq!(again["digest"], img["digest"]);
    let k = kinds(&d, again["id"].as_str().unwrap());
    assert!(k.contains(&"reused".to_string()), "{k:?}");
    assert!(!k.contains(&"unpacking".to_string()), "{k:?}");
    assert_eq!(entries(&sb.path().join("images/fs")).len(), 1);

    // Events over SSE end with `ready`.
    let resp = d
        .raw()
        .get(format!(
            "{}/images/{}/events",
            d.url,
            img["id"].as_str().unwrap()
        ))
        .bearer_auth(&d.key)
        .header("accept", "text/event-stream")
        .send()
        .unwrap();
    let text = resp.text().unwrap();
    assert!(text.contains("event: ready"), "{text}");

    let list = d.call("GET", "/images", None);
    assert_eq!(list.body["images"].as_array().unwrap().len(), 2);
    // Deleting one record keeps the filesystem (the other uses it);
    // deleting the last removes it.
    assert_eq!(
        d.call(
            "DELETE",
            &format!("/images/{}", img["id"].as_str().unwrap()),
            None
        )
        .status,
        204
    );
    assert!(fs.exists());
    assert_eq!(
        d.call(
            "DELETE",
            &format!("/images/{}", again["id"].as_str().unwrap()),
            None
        )
        .status,
        204
    );
    assert!(!fs.exists());
    assert_eq!(
        d.call(
            "GET",
            &format!("/images/{}", img["id"].as_str().unwrap()),
            None
        )
        .status,
        404
    );
}

#[test]
fn a_registry_with_basic_auth_needs_the_credentials() {
    if !oci::tools_present() {
        return;
    }
    let reg = Registry::start(true);
    let archive = image_archive(reg.dir.path(), &Config::default());
    let r = reg.push(&archive, "private:1");
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let img = pull(&d, json!({"ref": r}));
    assert_eq!(img["status"], "failed", "{img}");
    assert!(img["error"].as_str().unwrap().contains("registry"), "{img}");
    let (u, p) = reg.creds.clone().unwrap();
    let img = pull(
        &d,
        json!({"ref": r, "auth": {"username": u, "password": p}}),
    );
    assert_eq!(img["status"], "ready", "{img}");
    no_leftovers(&sb);
}

#[test]
fn a_tampered_blob_and_an_escaping_layer_are_refused_leaving_nothing() {
    if !oci::tools_present() {
        return;
    }
    let reg = Registry::start(false);
    let archive = image_archive(reg.dir.path(), &Config::default());
    let r = reg.push(&archive, "tampered:1");
    // Flip a byte of the second layer as the registry stores it.
    let manifest: Value = reqwest::blocking::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/v2/tampered/manifests/1",
            reg.port
        ))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .unwrap()
        .json()
        .unwrap();
    let layer = manifest["layers"][1]["digest"].as_str().unwrap();
    let blob = reg.blob_file(layer);
    let mut bytes = std::fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();

    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let img = pull(&d, json!({"ref": r}));
    assert_eq!(img["status"], "failed", "{img}");
    let err = img["error"].as_str().unwrap();
    assert!(err.contains("verification") && err.contains(layer), "{err}");
    no_leftovers(&sb);
    assert!(entries(&sb.path().join("images/fs")).is_empty());

    // An archive whose layer climbs out with `../`.
    let evil = reg.dir.path().join("evil.tar");
    oci::oci_archive(
        &evil,
        &[oci::layer(&[
            oci::file("ok", "1"),
            oci::file("../../../escaped", "x"),
        ])],
        &Config::default(),
    );
    let resp = d
        .raw()
        .post(format!("{}/images/import", d.url))
        .bearer_auth(&d.key)
        .body(std::fs::read(&evil).unwrap())
        .send()
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("`..`"), "{msg}");
    no_leftovers(&sb);
    assert!(entries(&sb.path().join("images/fs")).is_empty());
    assert!(!sb.path().join("escaped").exists());
}

#[test]
fn a_daemon_killed_during_a_pull_cleans_up_and_pulls_again() {
    if !oci::tools_present() {
        return;
    }
    let reg = Registry::start(false);
    let archive = image_archive(reg.dir.path(), &Config::default());
    let r = reg.push(&archive, "crash:1");
    let sb = Sandbox::new();
    let mut d = Daemon::start_with(&sb, &[("HYPERFLEET_CRASH_AT", "images.after_layer")], &[]);
    let resp = d.call("POST", "/images", Some(json!({"ref": r})));
    assert_eq!(resp.status, 202);
    let id = resp.body["id"].as_str().unwrap().to_string();
    let status = d
        .wait_exit(Duration::from_secs(60))
        .expect("the daemon kills itself at the crash point");
    assert!(common::killed_by_sigkill(&status), "{status:?}");
    // A verified blob was stored when it died.
    assert!(!entries(&sb.path().join("images/blobs/sha256")).is_empty());
    drop(d);
    let d = Daemon::start(&sb);
    let img = d.call("GET", &format!("/images/{id}"), None).body;
    assert_eq!(img["status"], "failed", "{img}");
    assert!(
        img["error"].as_str().unwrap().contains("daemon stopped"),
        "{img}"
    );
    no_leftovers(&sb);
    let img = pull(&d, json!({"ref": r}));
    assert_eq!(img["status"], "ready", "{img}");
}

#[test]
fn machines_are_made_from_images_and_keep_them() {
    if !oci::tools_present() {
        return;
    }
    let reg = Registry::start(false);
    let archive = image_archive(reg.dir.path(), &Config::default());
    let r = reg.push(&archive, "machine:1");
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    // Absent: pulled by the create (loopback registries are plain HTTP).
    let m = d.create(json!({"name": "from-image", "image": r}));
    let oci = &m["oci_image"];
    assert_eq!(oci["ref"], r.as_str(), "{m}");
    let image_id = oci["id"].as_str().unwrap().to_string();
    assert!(oci["digest"].as_str().unwrap().starts_with("sha256:"));
    // Present: the second create does no image work.
    let t = Instant::now();
    let m2 = d.create(json!({"name": "again", "image": r}));
    let second = t.elapsed();
    assert_eq!(m2["oci_image"]["id"], image_id.as_str());
    let k = kinds(&d, &image_id);
    assert_eq!(k.iter().filter(|x| *x == "unpacking").count(), 2, "{k:?}");
    assert!(k.contains(&"used".to_string()), "{k:?}");
    eprintln!("second create with the image: {second:?}");
    // By id too.
    let m3 = d.create(json!({"name": "by-id", "image": image_id}));
    assert_eq!(m3["oci_image"]["digest"], oci["digest"]);
    // In use: 409 until the machines are gone.
    let del = d.call("DELETE", &format!("/images/{image_id}"), None);
    assert_eq!(del.status, 409, "{}", del.body);
    for name in ["from-image", "again", "by-id"] {
        let r = d.call("DELETE", &format!("/machines/{name}?wait=true"), None);
        assert!(
            r.status == 200 || r.status == 202 || r.status == 204,
            "{}",
            r.body
        );
    }
    eventually(
        "the machines to be deleted",
        Duration::from_secs(30),
        || {
            let l = d.call("GET", "/machines", None);
            (l.body["machines"].as_array().unwrap().is_empty()).then_some(())
        },
    );
    assert_eq!(
        d.call("DELETE", &format!("/images/{image_id}"), None)
            .status,
        204
    );
    // An unknown reference fails the create with the pull's reason: the
    // machine's image is not found.
    let bad = d.call(
        "POST",
        "/machines",
        Some(json!({"image": reg.reference("nope:1")})),
    );
    assert_eq!(bad.status, 404, "{}", bad.body);
    assert_eq!(bad.code(), "NOT_FOUND", "{}", bad.body);
}

#[test]
fn a_real_guest_boots_an_image_with_whiteouts_applied() {
    if !oci::tools_present() {
        return;
    }
    let Some(assets) = guest_assets() else { return };
    let sb = Sandbox::new();
    let d = Daemon::start_qemu(&sb, &assets, &[]);
    let dir = tempfile::tempdir().unwrap();
    let archive = image_archive(dir.path(), &Config::default());
    let resp = d
        .raw()
        .post(format!("{}/images/import", d.url))
        .bearer_auth(&d.key)
        .body(std::fs::read(&archive).unwrap())
        .send()
        .unwrap();
    assert_eq!(resp.status(), 201);
    let img: Value = resp.json().unwrap();
    let m = d.create(json!({"name": "img", "image": img["id"], "mem_size_mib": 256}));
    let r = d.call("POST", "/machines/img/start?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());
    let exec = |argv: &[&str]| {
        let r = d.call(
            "POST",
            &format!("/machines/{}/exec", m["id"].as_str().unwrap()),
            Some(json!({"command": argv})),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    };
    let out = exec(&["/bin/busybox", "cat", "/etc/kept"]);
    assert_eq!(out["stdout"], "kept", "{out}");
    let out = exec(&["/bin/busybox", "ls", "/data"]);
    assert_eq!(out["stdout"].as_str().unwrap().trim(), "new", "{out}");
    let out = exec(&["/bin/busybox", "test", "-e", "/etc/gone"]);
    assert_eq!(out["exit_code"], 1, "{out}");
    let r = d.call("POST", "/machines/img/stop?timeout=120", None);
    assert_eq!(r.body["status"], "stopped", "{}", r.body);
}

#[test]
fn oci_layout_and_docker_save_archives_import_as_one_image() {
    if !oci::tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let archive = image_archive(dir.path(), &Config::default());
    let save = dir.path().join("save.tar");
    let out = std::process::Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("docker-archive:{}:test/img:1", save.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let import = |p: &Path| -> Value {
        let resp = d
            .raw()
            .post(format!("{}/images/import", d.url))
            .bearer_auth(&d.key)
            .body(std::fs::File::open(p).unwrap())
            .send()
            .unwrap();
        assert_eq!(resp.status(), 201);
        resp.json().unwrap()
    };
    let a = import(&archive);
    assert_eq!(a["status"], "ready", "{a}");
    assert_eq!(a["source"], "import");
    let b = import(&save);
    assert_eq!(b["status"], "ready", "{b}");
    assert!(b["manifest_digest"].is_null(), "{b}");
    // The same content: the same config digest, one filesystem.
    assert_eq!(a["digest"], b["digest"]);
    assert!(kinds(&d, b["id"].as_str().unwrap()).contains(&"reused".to_string()));
    assert_eq!(entries(&sb.path().join("images/fs")).len(), 1);
    no_leftovers(&sb);
}

#[test]
fn a_real_guest_boots_a_scratch_image_without_a_shell() {
    if !oci::tools_present() {
        return;
    }
    let Some(assets) = guest_assets() else { return };
    let sb = Sandbox::new();
    let d = Daemon::start_qemu(&sb, &assets, &[]);
    // One file, no directories, no shell, no /etc: `FROM scratch`.
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("scratch.tar");
    oci::oci_archive(
        &archive,
        &[oci::layer(&[oci::Entry::File("busybox", busybox, 0o755)])],
        &Config::default(),
    );
    let resp = d
        .raw()
        .post(format!("{}/images/import", d.url))
        .bearer_auth(&d.key)
        .body(std::fs::read(&archive).unwrap())
        .send()
        .unwrap();
    assert_eq!(resp.status(), 201);
    let img: Value = resp.json().unwrap();
    let m = d.create(json!({"name": "scratch", "image": img["id"]}));
    let r = d.call("POST", "/machines/scratch/start?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());
    let r = d.call(
        "POST",
        &format!("/machines/{}/exec", m["id"].as_str().unwrap()),
        Some(json!({"command": ["/busybox", "echo", "no shell needed"]})),
    );
    assert_eq!(r.body["stdout"], "no shell needed\n", "{}", r.body);
    let r = d.call("POST", "/machines/scratch/stop?timeout=120", None);
    assert_eq!(r.body["status"], "stopped", "{}", r.body);
}

//! Imports an image from an archive read as a stream: an OCI image layout
//! in a tar (`skopeo copy … oci-archive:`, `docker save` since 25) or a
//! classic `docker save` archive (`manifest.json` naming a config and
//! layer tars). The archive's regular files are written under a work
//! directory as they arrive (names checked as for layers; links and other
//! entry types are skipped), then read as the layout says; every blob is
//! checked against its digest, and layers against the config's `diff_ids`.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use oci_client::manifest::{OciImageIndex, OciImageManifest};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{
    build, digest_hex, io_err, sha256_digest, verify, BuiltImage, ImageError, ImageStore,
    LayerInfo, Progress, PullEvent,
};

/// Files an archive may hold at most.
const MAX_FILES: u64 = 100_000;

/// Imports the archive `body` (blocking: run it off the async runtime).
pub fn import(
    store: Arc<ImageStore>,
    body: impl Read,
    progress: &Progress,
) -> Result<BuiltImage, ImageError> {
    let work = store.work_dir("import")?;
    let dir = work.0.join("archive");
    std::fs::create_dir(&dir).map_err(io_err("creating the import directory"))?;
    extract(body, &dir, store.limits().max_download_bytes)?;
    let max_json = store.limits().max_json_bytes;
    let (config_raw, manifest_digest, layers) = if dir.join("index.json").is_file() {
        oci_layout(&dir, max_json)?
    } else if dir.join("manifest.json").is_file() {
        docker_save(&dir, max_json)?
    } else {
        return Err(ImageError::Invalid(
            "the archive is neither an OCI image layout (index.json) nor a docker save archive \
             (manifest.json)"
                .into(),
        ));
    };
    if layers.len() > store.limits().max_layers {
        return Err(ImageError::TooLarge(format!(
            "{} layers (at most {})",
            layers.len(),
            store.limits().max_layers
        )));
    }
    let digest = sha256_digest(&config_raw);
    progress(PullEvent::Resolved {
        digest: digest.clone(),
        manifest_digest,
        layers: layers
            .iter()
            .map(|(d, p)| LayerInfo {
                digest: d.clone(),
                size: std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
            })
            .collect(),
    });
    if let Some(b) = store.get(&digest) {
        progress(PullEvent::Reused { digest });
        return Ok(b);
    }
    let lock = store.lock_for(&digest);
    let _held = lock.blocking_lock();
    if let Some(b) = store.get(&digest) {
        progress(PullEvent::Reused { digest });
        return Ok(b);
    }
    let mut files = Vec::new();
    for (i, (d, p)) in layers.into_iter().enumerate() {
        let f = File::open(&p).map_err(io_err(format!("opening layer {d}")))?;
        files.push((d, f));
        progress(PullEvent::LayerDone {
            layer: i,
            cached: false,
        });
    }
    build::build(&store, &config_raw, files.into_iter().map(Ok), progress)
}

fn clean(raw: &[u8]) -> Result<PathBuf, ImageError> {
    use std::os::unix::ffi::OsStrExt;
    let p = Path::new(std::ffi::OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => {
                return Err(ImageError::Invalid(format!(
                    "archive entry {:?} is refused: it leaves the archive's root",
                    String::from_utf8_lossy(raw)
                )))
            }
        }
    }
    if out.components().count() > 6 {
        return Err(ImageError::Invalid(format!(
            "archive entry {:?} is nested too deep for an image archive",
            String::from_utf8_lossy(raw)
        )));
    }
    Ok(out)
}

/// Writes the archive's regular files under `dir`, at most `limit` bytes.
fn extract(body: impl Read, dir: &Path, limit: u64) -> Result<(), ImageError> {
    let mut archive = tar::Archive::new(body);
    let (mut bytes, mut files) = (0u64, 0u64);
    let bad = |e: io::Error| ImageError::Invalid(format!("the archive is not a valid tar: {e}"));
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let rel = clean(&entry.path_bytes())?;
        files += 1;
        bytes += entry.size();
        if files > MAX_FILES || bytes > limit {
            return Err(ImageError::TooLarge(format!(
                "the archive holds more than {MAX_FILES} files or {limit} bytes"
            )));
        }
        let path = dir.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err("creating an import directory"))?;
        }
        let mut f = File::create(&path).map_err(io_err("writing an imported file"))?;
        io::copy(&mut entry, &mut f).map_err(bad)?;
    }
    Ok(())
}

fn read_small(p: &Path, limit: u64) -> Result<Vec<u8>, ImageError> {
    let f = File::open(p).map_err(|_| {
        ImageError::Invalid(format!(
            "the archive lacks {}",
            p.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ))
    })?;
    let mut out = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(io_err("reading an imported file"))?;
    if out.len() as u64 > limit {
        return Err(ImageError::TooLarge(format!(
            "a manifest or config of more than {limit} bytes"
        )));
    }
    Ok(out)
}

fn blob(dir: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    Ok(dir.join("blobs/sha256").join(digest_hex(digest)?))
}

fn verify_file(p: &Path, digest: &str) -> Result<(), ImageError> {
    let mut f = File::open(p)
        .map_err(|_| ImageError::Invalid(format!("the archive lacks blob {digest}")))?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(io_err(format!("reading blob {digest}")))?;
    let got = format!("sha256:{}", hex::encode(h.finalize()));
    if got != digest {
        return Err(ImageError::Digest {
            digest: digest.to_string(),
            message: format!("its content has digest {got}"),
        });
    }
    Ok(())
}

type Parsed = (Vec<u8>, Option<String>, Vec<(String, PathBuf)>);

/// An OCI image layout: `index.json` → (an index →) a manifest.
fn oci_layout(dir: &Path, max_json: u64) -> Result<Parsed, ImageError> {
    let parse_err = |what: &str| {
        let what = what.to_string();
        move |e: serde_json::Error| ImageError::Invalid(format!("the {what} is not valid: {e}"))
    };
    let mut index: OciImageIndex =
        serde_json::from_slice(&read_small(&dir.join("index.json"), max_json)?)
            .map_err(parse_err("index.json"))?;
    for _ in 0..3 {
        let entry = index
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_none_or(|p| p.os == "linux" && p.architecture == "amd64")
            })
            .ok_or_else(|| ImageError::Invalid("the layout has no linux/amd64 image".into()))?
            .clone();
        let raw = read_small(&blob(dir, &entry.digest)?, max_json)?;
        verify(&raw, &entry.digest)?;
        if entry.media_type.contains("index") || entry.media_type.contains("manifest.list") {
            index = serde_json::from_slice(&raw).map_err(parse_err("image index"))?;
            continue;
        }
        let manifest: OciImageManifest =
            serde_json::from_slice(&raw).map_err(parse_err("image manifest"))?;
        let config = read_small(&blob(dir, &manifest.config.digest)?, max_json)?;
        verify(&config, &manifest.config.digest)?;
        let mut layers = Vec::new();
        for l in &manifest.layers {
            let p = blob(dir, &l.digest)?;
            verify_file(&p, &l.digest)?;
            layers.push((l.digest.clone(), p));
        }
        return Ok((config, Some(entry.digest), layers));
    }
    Err(ImageError::Invalid("image indexes nest too deep".into()))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    layers: Vec<String>,
}

/// A `docker save` archive: `manifest.json` names the config and the
/// layer tars (uncompressed; checked against the config's diff_ids when
/// applied).
fn docker_save(dir: &Path, max_json: u64) -> Result<Parsed, ImageError> {
    let list: Vec<DockerManifest> =
        serde_json::from_slice(&read_small(&dir.join("manifest.json"), max_json)?).map_err(
            |e| ImageError::Invalid(format!("the archive's manifest.json is not valid: {e}")),
        )?;
    let [m] = &list[..] else {
        return Err(ImageError::Invalid(format!(
            "the archive holds {} images; import one at a time",
            list.len()
        )));
    };
    let config = read_small(&dir.join(clean(m.config.as_bytes())?), max_json)?;
    let diffs = super::diff_ids(&config)?;
    let mut layers = Vec::new();
    for (i, l) in m.layers.iter().enumerate() {
        let p = dir.join(clean(l.as_bytes())?);
        if !p.is_file() {
            return Err(ImageError::Invalid(format!("the archive lacks layer {l}")));
        }
        let d = diffs.get(i).cloned().unwrap_or_default();
        layers.push((d, p));
    }
    Ok((config, None, layers))
}

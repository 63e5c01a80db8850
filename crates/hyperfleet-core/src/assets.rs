//! Guest assets: the kernel, initramfs and root filesystem every machine
//! boots, built from Debian packages only, versioned and checksummed.
//!
//! A set lives in `<data_dir>/assets/<id>/` where `<id>` is derived from the
//! sha256 of its `manifest.json`; `<data_dir>/assets/current` points at the
//! set new machines use. A machine records the id of the set it was prepared
//! from, and its disk is a copy-on-write overlay whose backing file is in that
//! set, so a set is never changed in place. The build itself is the tested
//! shell pipeline in `scripts/build-guest-assets.sh` (embedded here), which
//! drives `apt-get download`, `dpkg-deb`, `lz4`, `depmod` and `mkfs.ext4`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use sha2::{Digest, Sha256};

const BUILD_SCRIPT: &str = include_str!("../../../scripts/build-guest-assets.sh");
const PLACEHOLDER_INIT: &str = include_str!("../../../scripts/guest/placeholder-init.sh");

/// Errors of the assets boundary.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("no guest assets at {0}: build them with `hyperfleet assets build`")]
    Missing(PathBuf),
    #[error("the asset manifest {path} is unreadable: {message}")]
    BadManifest { path: PathBuf, message: String },
    #[error("asset {file} is missing from {dir}")]
    MissingFile { dir: PathBuf, file: String },
    #[error("asset {file} is corrupt: sha256 {got}, the manifest says {want}")]
    Corrupt {
        file: String,
        got: String,
        want: String,
    },
    #[error("{what} failed: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the asset build failed ({status}); its output is above")]
    BuildFailed { status: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AssetError {
    let what = what.into();
    move |source| AssetError::Io { what, source }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Module {
    pub name: String,
    pub path: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AssetFile {
    pub file: String,
    pub kind: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AgentInfo {
    pub file: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub kernel_release: String,
    pub agent: Option<AgentInfo>,
    pub modules_load_order: Vec<Module>,
    pub assets: Vec<AssetFile>,
}

/// One built, immutable set of guest assets.
#[derive(Debug, Clone)]
pub struct AssetSet {
    pub dir: PathBuf,
    pub id: String,
    pub manifest: Manifest,
}

impl AssetSet {
    /// Loads the set in `dir` (following the `current` link), checking that
    /// every file the manifest names exists with its size. Checksums are
    /// verified by [`AssetSet::verify`] (they cost a read of ~600 MiB).
    pub fn load(dir: &Path) -> Result<AssetSet, AssetError> {
        let manifest_path = dir.join("manifest.json");
        if !manifest_path.exists() {
            return Err(AssetError::Missing(dir.to_path_buf()));
        }
        let raw = std::fs::read(&manifest_path)
            .map_err(io(format!("reading {}", manifest_path.display())))?;
        let manifest: Manifest =
            serde_json::from_slice(&raw).map_err(|e| AssetError::BadManifest {
                path: manifest_path.clone(),
                message: e.to_string(),
            })?;
        if manifest.format != 1 {
            return Err(AssetError::BadManifest {
                path: manifest_path,
                message: format!("format {} is not supported (expected 1)", manifest.format),
            });
        }
        let dir = std::fs::canonicalize(dir).map_err(io(format!("resolving {}", dir.display())))?;
        for a in &manifest.assets {
            let p = dir.join(&a.file);
            let meta = std::fs::metadata(&p).map_err(|_| AssetError::MissingFile {
                dir: dir.clone(),
                file: a.file.clone(),
            })?;
            if meta.len() != a.size {
                return Err(AssetError::Corrupt {
                    file: a.file.clone(),
                    got: format!("size {}", meta.len()),
                    want: format!("size {}", a.size),
                });
            }
        }
        Ok(AssetSet {
            id: set_id(&raw),
            dir,
            manifest,
        })
    }

    fn file_of(&self, kind: &str) -> Result<PathBuf, AssetError> {
        self.manifest
            .assets
            .iter()
            .find(|a| a.kind == kind)
            .map(|a| self.dir.join(&a.file))
            .ok_or_else(|| AssetError::MissingFile {
                dir: self.dir.clone(),
                file: format!("(an asset of kind {kind})"),
            })
    }

    pub fn kernel(&self) -> Result<PathBuf, AssetError> {
        self.file_of("kernel")
    }
    pub fn initramfs(&self) -> Result<PathBuf, AssetError> {
        self.file_of("initramfs")
    }
    pub fn rootfs(&self) -> Result<PathBuf, AssetError> {
        self.file_of("rootfs")
    }

    /// `virtio_ring,virtio,…` for the guest's `hf.modules=`.
    pub fn module_list(&self) -> String {
        self.manifest
            .modules_load_order
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Recomputes every file's sha256 against the manifest.
    pub fn verify(&self) -> Result<(), AssetError> {
        for a in &self.manifest.assets {
            let p = self.dir.join(&a.file);
            let got = sha256_file(&p)?;
            if got != a.sha256 {
                return Err(AssetError::Corrupt {
                    file: a.file.clone(),
                    got,
                    want: a.sha256.clone(),
                });
            }
        }
        Ok(())
    }
}

fn set_id(manifest: &[u8]) -> String {
    hex::encode(&Sha256::digest(manifest)[..8])
}

fn sha256_file(p: &Path) -> Result<String, AssetError> {
    let mut f = std::fs::File::open(p).map_err(io(format!("opening {}", p.display())))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io(format!("reading {}", p.display())))?;
    Ok(hex::encode(h.finalize()))
}

/// Whether `path` is a statically linked ELF (no PT_INTERP program header):
/// the agent runs as PID 1 of a minimal initramfs with no dynamic loader.
pub fn is_static_elf(path: &Path) -> Result<bool, AssetError> {
    let b = std::fs::read(path).map_err(io(format!("reading {}", path.display())))?;
    let bad = || AssetError::BadManifest {
        path: path.to_path_buf(),
        message: "not a 64-bit ELF executable".into(),
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return Err(bad());
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().map_err(|_| bad())?) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let p_type = b.get(o..o + 4).ok_or_else(bad)?;
        if u32::from_le_bytes(p_type.try_into().map_err(|_| bad())?) == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `<data_dir>/assets`
pub fn assets_root(data_dir: &Path) -> PathBuf {
    data_dir.join("assets")
}

/// Builds a new asset set under `<data_dir>/assets/<id>` and points `current`
/// at it. `agent` becomes the guest's `/init`. The build's progress goes to
/// `progress` line by line. Building the same inputs twice gives the same id.
pub fn build(
    data_dir: &Path,
    agent: Option<&Path>,
    mut progress: impl FnMut(&str),
) -> Result<AssetSet, AssetError> {
    let root = assets_root(data_dir);
    std::fs::create_dir_all(&root).map_err(io(format!("creating {}", root.display())))?;
    let work = tempfile_dir(&root)?;
    let result = (|| {
        let scripts = work.join("scripts");
        std::fs::create_dir_all(scripts.join("guest")).map_err(io("writing the build script"))?;
        std::fs::write(scripts.join("build-guest-assets.sh"), BUILD_SCRIPT)
            .map_err(io("writing the build script"))?;
        std::fs::write(scripts.join("guest/placeholder-init.sh"), PLACEHOLDER_INIT)
            .map_err(io("writing the build script"))?;
        let out = work.join("out");
        let mut cmd = Command::new("bash");
        cmd.arg(scripts.join("build-guest-assets.sh")).arg(&out);
        if let Some(a) = agent {
            cmd.arg(a);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("starting bash for the asset build"))?;
        // The script logs to stderr; stdout is passed through too.
        let stderr = child.stderr.take();
        let stdout = child.stdout.take();
        let relay = std::thread::spawn(move || {
            let mut lines = Vec::new();
            if let Some(s) = stdout {
                lines.extend(BufReader::new(s).lines().map_while(Result::ok));
            }
            lines
        });
        if let Some(s) = stderr {
            for line in BufReader::new(s).lines().map_while(Result::ok) {
                progress(&line);
            }
        }
        for line in relay.join().unwrap_or_default() {
            progress(&line);
        }
        let status = child.wait().map_err(io("waiting for the asset build"))?;
        if !status.success() {
            return Err(AssetError::BuildFailed {
                status: status.to_string(),
            });
        }
        let set = AssetSet::load(&out)?;
        let dest = root.join(&set.id);
        if dest.join("manifest.json").exists() {
            progress(&format!(
                "identical asset set {} already present; reusing it",
                set.id
            ));
        } else {
            std::fs::rename(&out, &dest)
                .map_err(io(format!("moving the assets to {}", dest.display())))?;
        }
        point_current(&root, &set.id)?;
        AssetSet::load(&dest)
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn tempfile_dir(root: &Path) -> Result<PathBuf, AssetError> {
    let p = root.join(format!(".build-{}", crate::util::random_id("", 8)));
    std::fs::create_dir_all(&p).map_err(io(format!("creating {}", p.display())))?;
    Ok(p)
}

/// Atomically repoints `current` (a relative symlink) at set `id`.
fn point_current(root: &Path, id: &str) -> Result<(), AssetError> {
    let tmp = root.join(format!(".current-{}", crate::util::random_id("", 8)));
    std::os::unix::fs::symlink(id, &tmp).map_err(io("creating the current link"))?;
    std::fs::rename(&tmp, root.join("current")).map_err(io("replacing the current link"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_set(dir: &Path) {
        std::fs::write(dir.join("vmlinux"), b"kernel").unwrap();
        std::fs::write(dir.join("initramfs.cpio"), b"initrd").unwrap();
        let sha = |b: &[u8]| hex::encode(Sha256::digest(b));
        let manifest = serde_json::json!({
            "format": 1, "kernel_release": "6.1.0-test", "agent": null,
            "modules_load_order": [{"name": "virtio_ring", "path": "a.ko"}, {"name": "virtio", "path": "b.ko"}],
            "assets": [
                {"file": "vmlinux", "kind": "kernel", "sha256": sha(b"kernel"), "size": 6, "source_packages": []},
                {"file": "initramfs.cpio", "kind": "initramfs", "sha256": sha(b"initrd"), "size": 6, "source_packages": []}
            ]
        });
        std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    }

    #[test]
    fn a_set_loads_verifies_and_detects_corruption() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            AssetSet::load(d.path()),
            Err(AssetError::Missing(_))
        ));
        fake_set(d.path());
        let set = AssetSet::load(d.path()).unwrap();
        assert_eq!(set.id.len(), 16);
        assert_eq!(set.module_list(), "virtio_ring,virtio");
        assert!(set.kernel().unwrap().ends_with("vmlinux"));
        set.rootfs().expect_err("the set has no rootfs");
        set.verify().unwrap();
        std::fs::write(d.path().join("vmlinux"), b"KERNEL").unwrap();
        assert!(matches!(set.verify(), Err(AssetError::Corrupt { .. })));
        std::fs::write(d.path().join("vmlinux"), b"short").unwrap();
        assert!(matches!(
            AssetSet::load(d.path()),
            Err(AssetError::Corrupt { .. })
        ));
    }

    #[test]
    fn static_and_dynamic_binaries_are_told_apart() {
        // Every Debian system has a dynamically linked /bin/sh.
        assert!(!is_static_elf(Path::new("/bin/sh")).unwrap());
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("x"), b"#!/bin/sh").unwrap();
        is_static_elf(&d.path().join("x")).expect_err("a script is not an ELF");
    }

    #[test]
    fn current_is_repointed_atomically() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("aaaa")).unwrap();
        fake_set(&d.path().join("aaaa"));
        point_current(d.path(), "aaaa").unwrap();
        point_current(d.path(), "aaaa").unwrap();
        let set = AssetSet::load(&d.path().join("current")).unwrap();
        assert!(set.dir.ends_with("aaaa"));
    }
}

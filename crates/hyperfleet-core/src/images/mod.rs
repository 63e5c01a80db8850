//! OCI images as machines' root filesystems: the content-addressed image
//! store under `<data_dir>/images/`.
//!
//! - [`registry`]: pulls from a registry (the `oci-client` crate: the
//!   distribution API, token and basic auth, manifest lists).
//! - [`archive`]: imports an OCI image layout tar or a `docker save`
//!   archive, read as a stream.
//! - [`unpack`]: applies layers onto a directory, safely (whiteouts,
//!   opaque directories, links, owners, xattrs; nothing escapes the root).
//! - [`build`]: one ext4 filesystem per image (`mkfs.ext4 -d`).
//!
//! Layout:
//!
//! | path | what |
//! |---|---|
//! | `blobs/sha256/<hex>` | layer blobs, only ever renamed in after their digest was verified; removed once the image's filesystem is built |
//! | `fs/<hex>/rootfs.ext4` | the image's filesystem, keyed by the config digest (which names the layers' uncompressed digests, so it fixes the content); read-only, shared by every machine and every tenant's record of that image |
//! | `fs/<hex>/config.json` | the verified image config (entrypoint, cmd, env, workdir, user) |
//! | `tmp/` | work in progress (partial downloads, unpacking); emptied at startup |
//!
//! A filesystem appears under `fs/` by one rename of a finished directory,
//! so a crash leaves either nothing or the whole image. Work on one image
//! digest is serialised in the process: a second pull of the same image
//! waits for the first and then finds it built.

pub mod archive;
pub mod build;
pub mod registry;
pub mod service;
pub mod unpack;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use unpack::UnpackLimits;

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image reference {reference:?} is invalid: {message}")]
    BadReference { reference: String, message: String },
    #[error("the registry refused or failed the request ({doing}): {message}")]
    Registry { doing: String, message: String },
    #[error("blob {digest} failed verification: {message}")]
    Digest { digest: String, message: String },
    #[error("the image exceeds a limit: {0}")]
    TooLarge(String),
    #[error("the image is not usable: {0}")]
    Invalid(String),
    #[error("unpacking layer {layer} ({digest}) failed: {source}")]
    Unpack {
        layer: usize,
        digest: String,
        #[source]
        source: unpack::UnpackError,
    },
    #[error("building the image's filesystem failed: {0}")]
    Build(String),
    #[error("{what} failed: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// What an image may be at most; a registry or archive that goes past a
/// limit fails the pull, and what it sent so far is removed.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    /// Layers per image.
    pub max_layers: usize,
    /// Bytes of one compressed layer blob (and of all together).
    pub max_download_bytes: u64,
    /// Bytes of an image config or manifest read from an archive.
    pub max_json_bytes: u64,
    /// Uncompressed bytes and entries of all layers together.
    pub unpack: UnpackLimits,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_layers: 256,
            max_download_bytes: 16 << 30,
            max_json_bytes: 4 << 20,
            unpack: UnpackLimits::default(),
        }
    }
}

/// One layer as the manifest names it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerInfo {
    pub digest: String,
    pub size: u64,
}

/// What a pull or import reports as it goes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PullEvent {
    /// The manifest and config are read and verified.
    Resolved {
        digest: String,
        manifest_digest: Option<String>,
        layers: Vec<LayerInfo>,
    },
    /// The image's filesystem already exists: no image work at all.
    Reused { digest: String },
    /// Bytes of layer `layer` downloaded so far.
    LayerProgress { layer: usize, done: u64, total: u64 },
    /// Layer `layer` is downloaded and verified (`cached`: it already was).
    LayerDone { layer: usize, cached: bool },
    /// Applying layer `layer` onto the root.
    Unpacking { layer: usize },
    /// Building the filesystem.
    Building,
    /// The filesystem is built.
    Built { size_bytes: u64, duration_ms: u64 },
}

/// Where progress goes (an image record's events, a log line, nothing).
pub type Progress = Arc<dyn Fn(PullEvent) + Send + Sync>;

/// A progress sink that drops everything.
pub fn no_progress() -> Progress {
    Arc::new(|_| {})
}

/// The runtime part of an image config that machines use.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// What a machine made from an OCI image records in its spec: which
/// image, and the size of its disk (for quotas).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineImage {
    pub image_id: String,
    #[serde(default)]
    pub reference: Option<String>,
    /// The config digest: the built filesystem's key.
    pub digest: String,
    pub disk_bytes: u64,
}

impl MachineImage {
    pub fn to_api(&self) -> hyperfleet_api::MachineOciImage {
        hyperfleet_api::MachineOciImage {
            id: self.image_id.clone(),
            reference: self.reference.clone(),
            digest: self.digest.clone(),
        }
    }
}

/// The filesystem a machine made from image `digest` boots over, under
/// `<data_dir>/images` (`images_root`).
pub fn machine_rootfs(images_root: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let p = images_root
        .join("fs")
        .join(digest_hex(digest)?)
        .join("rootfs.ext4");
    if !p.exists() {
        return Err(ImageError::Invalid(format!(
            "the filesystem of image {digest} is missing from {}",
            images_root.display()
        )));
    }
    Ok(p)
}

/// A built image on disk.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The config digest (`sha256:<hex>`): the image's identity.
    pub digest: String,
    pub dir: PathBuf,
    pub size_bytes: u64,
    pub run: RunConfig,
}

impl BuiltImage {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }
}

/// The image store: paths, limits and the in-process work locks.
pub struct ImageStore {
    root: PathBuf,
    limits: ImageLimits,
    /// One lock per image (config) digest and per blob being fetched.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ImageStore {
    /// The store under `<data_dir>/images`; creates its directories.
    pub fn open(data_dir: &Path, limits: ImageLimits) -> Result<ImageStore, ImageError> {
        let root = data_dir.join("images");
        for d in ["blobs/sha256", "fs", "tmp"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io_err(format!("creating {}", p.display())))?;
        }
        Ok(ImageStore {
            root,
            limits,
            locks: Mutex::new(HashMap::new()),
        })
    }

    pub fn limits(&self) -> ImageLimits {
        self.limits
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes the work of pulls and imports a crash cut short (partial
    /// downloads, half-unpacked roots); the blobs already verified stay,
    /// so a resumed pull does not fetch them again.
    pub fn sweep(&self) -> Result<usize, ImageError> {
        let tmp = self.root.join("tmp");
        let mut n = 0;
        for e in std::fs::read_dir(&tmp).map_err(io_err("listing the image work directory"))? {
            let e = e.map_err(io_err("listing the image work directory"))?;
            let p = e.path();
            let r = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            crate::util::absent_ok(r).map_err(io_err(format!("removing {}", p.display())))?;
            n += 1;
        }
        Ok(n)
    }

    /// A fresh work directory under `tmp/`.
    pub(crate) fn work_dir(&self, what: &str) -> Result<WorkDir, ImageError> {
        let p = self
            .root
            .join("tmp")
            .join(format!("{what}-{}", crate::util::random_id("", 10)));
        std::fs::create_dir(&p).map_err(io_err(format!("creating {}", p.display())))?;
        Ok(WorkDir(p))
    }

    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let hex = digest_hex(digest)?;
        Ok(self.root.join("blobs/sha256").join(hex))
    }

    fn fs_dir(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("fs").join(digest_hex(digest)?))
    }

    /// The built image of config digest `digest`, if it is there.
    pub fn get(&self, digest: &str) -> Option<BuiltImage> {
        let dir = self.fs_dir(digest).ok()?;
        let meta = std::fs::metadata(dir.join("rootfs.ext4")).ok()?;
        let raw = std::fs::read(dir.join("config.json")).ok()?;
        let run = run_config(&raw).ok()?;
        Some(BuiltImage {
            digest: digest.to_string(),
            dir,
            size_bytes: meta.len(),
            run,
        })
    }

    /// Removes the built image of `digest` (its records are gone and no
    /// machine uses it). Machines already made from it keep working only
    /// if they do not exist: the caller checks that.
    pub fn remove(&self, digest: &str) -> Result<(), ImageError> {
        let dir = self.fs_dir(digest)?;
        if !dir.exists() {
            return Ok(());
        }
        // Renamed away first, so a crash never leaves a half-removed image
        // under its real name.
        let gone = self
            .root
            .join("tmp")
            .join(format!("rm-{}", crate::util::random_id("", 10)));
        std::fs::rename(&dir, &gone).map_err(io_err(format!("removing {}", dir.display())))?;
        crate::util::absent_ok(std::fs::remove_dir_all(&gone))
            .map_err(io_err(format!("removing {}", gone.display())))
    }

    /// The lock for work on `key` (an image or blob digest).
    pub(crate) fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Drop locks nobody holds any more.
        m.retain(|_, l| Arc::strong_count(l) > 1);
        m.entry(key.to_string()).or_default().clone()
    }
}

/// A work directory removed when dropped (unless kept by renaming it).
pub(crate) struct WorkDir(pub(crate) PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The hex part of a `sha256:<64 hex>` digest; anything else is refused
/// (a digest becomes a file name).
pub(crate) fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| ImageError::Digest {
            digest: digest.to_string(),
            message: "only sha256 digests are supported".into(),
        })?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ImageError::Digest {
            digest: digest.to_string(),
            message: "not a sha256 digest (64 lowercase hex digits)".into(),
        });
    }
    Ok(hex)
}

pub(crate) fn sha256_digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Checks `bytes` against `digest`.
pub(crate) fn verify(bytes: &[u8], digest: &str) -> Result<(), ImageError> {
    digest_hex(digest)?;
    let got = sha256_digest(bytes);
    if got != digest {
        return Err(ImageError::Digest {
            digest: digest.to_string(),
            message: format!("its content has digest {got}"),
        });
    }
    Ok(())
}

/// The parts of an image config (JSON) a machine runs with.
pub fn run_config(raw: &[u8]) -> Result<RunConfig, ImageError> {
    let cfg: oci_spec::image::ImageConfiguration = serde_json::from_slice(raw)
        .map_err(|e| ImageError::Invalid(format!("the image config is not valid: {e}")))?;
    let c = cfg.config().clone().unwrap_or_default();
    Ok(RunConfig {
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        workdir: c.working_dir().clone().filter(|w| !w.is_empty()),
        user: c.user().clone().filter(|u| !u.is_empty()),
    })
}

/// The main process of a machine made from an image with `run` as its
/// config, with the create's overrides, as Docker runs a container: an
/// `entrypoint` given drops the image's `Cmd` unless `cmd` is given too;
/// the command is the entrypoint followed by the cmd. None when that is
/// empty (the guest then only runs its agent).
pub fn main_process(
    run: &RunConfig,
    ov: &crate::validate::ProcessOverrides,
) -> Option<crate::store::MainProcess> {
    let entrypoint = ov
        .entrypoint
        .clone()
        .unwrap_or_else(|| run.entrypoint.clone());
    let cmd = match (&ov.cmd, &ov.entrypoint) {
        (Some(c), _) => c.clone(),
        (None, Some(_)) => Vec::new(),
        (None, None) => run.cmd.clone(),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.first().is_none_or(|a| a.is_empty()) {
        return None;
    }
    Some(crate::store::MainProcess {
        argv,
        image_env: run.env.clone(),
        workdir: ov.workdir.clone().or_else(|| run.workdir.clone()),
        user: ov.user.clone().or_else(|| run.user.clone()),
    })
}

/// The layers' uncompressed digests the config names, and its OS/arch.
pub(crate) fn diff_ids(raw: &[u8]) -> Result<Vec<String>, ImageError> {
    let cfg: oci_spec::image::ImageConfiguration = serde_json::from_slice(raw)
        .map_err(|e| ImageError::Invalid(format!("the image config is not valid: {e}")))?;
    let os = cfg.os().to_string();
    if os != "linux" {
        return Err(ImageError::Invalid(format!(
            "the image is for {os}, not linux"
        )));
    }
    let arch = cfg.architecture().to_string();
    if arch != "amd64" {
        return Err(ImageError::Invalid(format!(
            "the image is for {arch}, guests here are amd64"
        )));
    }
    Ok(cfg.rootfs().diff_ids().clone())
}

#[cfg(test)]
mod tests;

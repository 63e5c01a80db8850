//! One filesystem per image: the verified layers applied in order onto a
//! work directory, then `mkfs.ext4 -d` (e2fsprogs) makes a sparse ext4 image
//! of it, which is renamed into `fs/<hex>/` in one step.
//!
//! Why ext4 and not erofs: a machine's disk is a qcow2 overlay over this
//! file, and the guest mounts it read-write as its root, exactly like the
//! built-in asset set's rootfs, so neither the agent nor the kernel's
//! module set change; erofs is read-only and would need an overlay
//! filesystem inside the guest. (`scripts/bench-images.sh` measures both
//! builders on the same tree; see docs/images.md.)

use std::io::BufReader;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use super::{
    diff_ids, io_err, sha256_digest, unpack::Unpacker, BuiltImage, ImageError, ImageStore,
    Progress, PullEvent,
};

/// Directories the agent mounts over at boot; an image without them (a
/// `FROM scratch` one) gets them empty.
const MOUNT_POINTS: &[(&str, u32)] = &[
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
];

/// Builds (once) the filesystem of the image whose config is `config_raw`
/// from its layer blobs, in order; each blob's digest was verified when it
/// was stored, and each layer's uncompressed digest is verified here
/// against the config's `diff_ids`. `layers` may block until the next
/// layer is downloaded (a pull unpacks layer *i* while later ones still
/// arrive); an `Err` from it ends the build. Blocking: run it off the
/// async runtime.
pub(crate) fn build(
    store: &ImageStore,
    config_raw: &[u8],
    layers: impl Iterator<Item = Result<(String, std::fs::File), ImageError>>,
    progress: &Progress,
) -> Result<BuiltImage, ImageError> {
    let digest = sha256_digest(config_raw);
    if let Some(b) = store.get(&digest) {
        return Ok(b);
    }
    let diffs = diff_ids(config_raw)?;
    let started = Instant::now();
    let work = store.work_dir("build")?;
    let root = work.0.join("root");
    std::fs::create_dir(&root).map_err(io_err("creating the unpack root"))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err("setting the unpack root's mode"))?;
    let mut u =
        Unpacker::new(&root, store.limits.unpack).map_err(io_err("opening the unpack root"))?;
    let mut layers = layers;
    for (i, diff) in diffs.iter().enumerate() {
        let (ldigest, file) = layers.next().ok_or_else(|| {
            ImageError::Invalid(format!(
                "the config names {} layers, the manifest fewer",
                diffs.len()
            ))
        })??;
        progress(PullEvent::Unpacking { layer: i });
        u.apply(BufReader::new(file), Some(diff))
            .map_err(|source| ImageError::Unpack {
                layer: i,
                digest: ldigest,
                source,
            })?;
    }
    if layers.next().is_some() {
        return Err(ImageError::Invalid(format!(
            "the manifest names more layers than the config's {}",
            diffs.len()
        )));
    }
    for (d, mode) in MOUNT_POINTS {
        let p = root.join(d);
        if std::fs::symlink_metadata(&p).is_err() {
            std::fs::create_dir(&p).map_err(io_err(format!("creating /{d} in the image")))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
                .map_err(io_err(format!("setting the mode of /{d}")))?;
        }
    }
    progress(PullEvent::Building);
    let out = work.0.join("out");
    std::fs::create_dir(&out).map_err(io_err("creating the image directory"))?;
    mkfs_ext4(&root, &out.join("rootfs.ext4"))?;
    std::fs::write(out.join("config.json"), config_raw)
        .map_err(io_err("writing the image config"))?;
    // The tree is not needed any more; removing it now keeps the peak disk
    // use of two builds at once lower.
    crate::util::absent_ok(std::fs::remove_dir_all(&root))
        .map_err(io_err("removing the unpack root"))?;
    let dest = store.fs_dir(&digest)?;
    match std::fs::rename(&out, &dest) {
        Ok(()) => {}
        // Built meanwhile by another process (the in-process lock makes
        // this rare): theirs is as good as ours.
        Err(_) if dest.join("rootfs.ext4").exists() => {}
        Err(e) => return Err(io_err(format!("moving the image to {}", dest.display()))(e)),
    }
    let built = store
        .get(&digest)
        .ok_or_else(|| ImageError::Build("the built image is not readable".into()))?;
    progress(PullEvent::Built {
        size_bytes: built.size_bytes,
        duration_ms: started.elapsed().as_millis() as u64,
    });
    Ok(built)
}

/// Bytes and inodes a tree uses (not following symlinks).
fn usage(p: &Path) -> std::io::Result<(u64, u64)> {
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut stack = vec![p.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let m = e.metadata()?;
            inodes += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, inodes + 1))
}

/// `mkfs.ext4 -d root out <size>`: room for the tree plus a quarter and
/// 256 MiB for the guest to write, and inodes to match.
pub(crate) fn mkfs_ext4(root: &Path, out: &Path) -> Result<(), ImageError> {
    let (bytes, inodes) = usage(root).map_err(io_err("measuring the unpacked image"))?;
    let size = (bytes + bytes / 4 + (256 << 20)).div_ceil(4 << 20) * (4 << 20);
    let inodes = inodes + (inodes / 2).max(16384);
    let res = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-t", "ext4", "-L", "hf-image", "-m", "0", "-N"])
        .arg(inodes.to_string())
        .args(["-E", "root_owner=0:0", "-d"])
        .arg(root)
        .arg(out)
        .arg(format!("{}K", size / 1024))
        .output()
        .map_err(io_err("running mkfs.ext4 (from e2fsprogs)"))?;
    if !res.status.success() {
        return Err(ImageError::Build(format!(
            "mkfs.ext4 failed ({}): {}",
            res.status,
            String::from_utf8_lossy(&res.stderr).trim()
        )));
    }
    Ok(())
}

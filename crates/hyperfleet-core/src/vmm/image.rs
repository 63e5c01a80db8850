//! Memory images and disk layers on the host: the files a suspend image or
//! a snapshot is made of, and the copies that make them.
//!
//! An image directory holds:
//! - `state`: the VMM's device state (QEMU's migration stream). With
//!   `ram` beside it, the stream skips guest RAM (QEMU's `x-ignore-shared`)
//!   and is a few dozen KB; without, it carries RAM too (a *stream* image,
//!   from a VMM whose RAM was not a file of its own).
//! - `ram`: guest RAM as a flat file, sparse where the guest never wrote.
//!   Never written again once the image is complete: restores map it
//!   copy-on-write (`MAP_PRIVATE`), so a later write would show through in
//!   pages a restored guest has not copied yet.
//! - `disk.qcow2` (snapshots only): the machine's disk overlay as it was,
//!   frozen; machines made from the snapshot get an overlay over it.
//! - `mem.state` (suspend images of earlier releases): a stream image with
//!   RAM in the default layout, restored the way it was saved.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::VmmError;

/// The files of an image directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDir(pub PathBuf);

/// What kind of memory image a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryImage {
    /// `state` + `ram`: RAM maps straight from the file.
    Flat,
    /// `state` only, RAM inside the stream.
    Stream,
    /// `mem.state` of an earlier release.
    Legacy,
}

impl ImageDir {
    pub fn state(&self) -> PathBuf {
        self.0.join("state")
    }
    pub fn ram(&self) -> PathBuf {
        self.0.join("ram")
    }
    pub fn disk(&self) -> PathBuf {
        self.0.join("disk.qcow2")
    }
    pub fn legacy_state(&self) -> PathBuf {
        self.0.join("mem.state")
    }

    /// The memory image here, if a complete one is.
    pub fn memory(&self) -> Option<MemoryImage> {
        if self.state().is_file() {
            Some(if self.ram().is_file() {
                MemoryImage::Flat
            } else {
                MemoryImage::Stream
            })
        } else if self.legacy_state().is_file() {
            Some(MemoryImage::Legacy)
        } else {
            None
        }
    }

    /// The state file a restore reads.
    pub fn state_for(&self, kind: MemoryImage) -> PathBuf {
        match kind {
            MemoryImage::Legacy => self.legacy_state(),
            _ => self.state(),
        }
    }
}

fn host(what: String) -> impl FnOnce(io::Error) -> VmmError {
    move |e| VmmError::host(what, e)
}

/// Copies `src` to a new file `dst` (replacing it), keeping holes: only the
/// data extents are copied (`SEEK_DATA`/`SEEK_HOLE`, `copy_file_range`), so
/// a guest's RAM file costs what the guest touched, not its size. `dst`
/// gets mode `mode`.
pub fn copy_sparse(src: &Path, dst: &Path, mode: u32) -> Result<u64, VmmError> {
    let never = AtomicBool::new(false);
    copy_sparse_until(src, dst, mode, &never).map(|c| c.unwrap_or(0))
}

/// The most [`copy_sparse_until`] copies between two looks at its stop flag.
const COPY_CHUNK: usize = 16 << 20;

/// [`copy_sparse`] that gives up when `stop` is set (looked at every
/// [`COPY_CHUNK`] bytes): `None` then, and `dst` is left partial for the
/// caller to remove.
pub fn copy_sparse_until(
    src: &Path,
    dst: &Path,
    mode: u32,
    stop: &AtomicBool,
) -> Result<Option<u64>, VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let doing = || format!("copying {} to {}", src.display(), dst.display());
    let from = File::open(src).map_err(host(doing()))?;
    let len = from.metadata().map_err(host(doing()))?.len();
    crate::util::absent_ok(std::fs::remove_file(dst)).map_err(host(doing()))?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(dst)
        .map_err(host(doing()))?;
    to.set_len(len).map_err(host(doing()))?;
    let (fi, fo) = (from.as_raw_fd(), to.as_raw_fd());
    let mut copied = 0u64;
    let mut pos: i64 = 0;
    let mut in_kernel = true;
    let mut buf: Vec<u8> = Vec::new();
    let end = len as i64;
    while pos < end {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fi, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(VmmError::host(doing(), e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fi, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(VmmError::host(doing(), io::Error::last_os_error()));
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let want = ((hole - off_in) as usize).min(COPY_CHUNK);
            let n = if in_kernel {
                // SAFETY: both descriptors are open files we own; the
                // offsets point to locals that outlive the call.
                unsafe { libc::copy_file_range(fi, &mut off_in, fo, &mut off_out, want, 0) }
            } else {
                copy_range(&from, &to, off_in as u64, want.min(buf.len()), &mut buf)
                    .map_err(|e| VmmError::host(doing(), e))? as isize
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                // Across filesystems (tmpfs to disk) on older kernels:
                // copy through memory instead.
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
                ) && in_kernel
                {
                    in_kernel = false;
                    buf = vec![0u8; 1 << 20];
                    continue;
                }
                return Err(VmmError::host(doing(), e));
            }
            if n == 0 {
                break; // the file shrank under us
            }
            if !in_kernel {
                off_in += n as i64;
            }
            copied += n as u64;
        }
        pos = hole;
    }
    Ok(Some(copied))
}

/// Copies `len` bytes at `off` from `from` to the same offset of `to`
/// through `buf`; returns how many (0 at the end of `from`).
fn copy_range(from: &File, to: &File, off: u64, len: usize, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let n = from.read_at(&mut buf[..len], off)?;
    to.write_all_at(&buf[..n], off)?;
    Ok(n)
}

/// Makes `dst` the same file as `src` (a hard link: both are never written
/// again), or a copy where a link cannot be made.
pub fn link_or_copy(src: &Path, dst: &Path) -> Result<(), VmmError> {
    crate::util::absent_ok(std::fs::remove_file(dst))
        .map_err(host(format!("replacing {}", dst.display())))?;
    if std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    copy_sparse(src, dst, 0o600).map(drop)
}

/// Flushes the files of `dir` (or only those in `only`) and the directory
/// itself to disk.
pub fn sync_dir(dir: &Path, only: Option<&[PathBuf]>) -> Result<(), VmmError> {
    let doing = format!("syncing {}", dir.display());
    for entry in std::fs::read_dir(dir).map_err(host(doing.clone()))? {
        let entry = entry.map_err(host(doing.clone()))?;
        if only.is_some_and(|o| !o.contains(&entry.path())) {
            continue;
        }
        if entry.file_type().map_err(host(doing.clone()))?.is_file() {
            File::open(entry.path())
                .and_then(|f| f.sync_all())
                .map_err(host(doing.clone()))?;
        }
    }
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(host(doing))
}

/// Bytes the files under `dir` take on disk (allocated blocks, so sparse
/// files count what they hold).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| if m.is_dir() { 0 } else { m.blocks() * 512 })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn a_sparse_copy_keeps_the_data_and_the_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut f = File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(b"marker").unwrap();
        drop(f);
        copy_sparse(&a, &b, 0o600).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(disk_usage(dir.path()) < 4 << 20, "the copy is sparse");
    }

    #[test]
    fn an_image_dir_says_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let img = ImageDir(dir.path().to_path_buf());
        assert_eq!(img.memory(), None);
        std::fs::write(img.legacy_state(), b"x").unwrap();
        assert_eq!(img.memory(), Some(MemoryImage::Legacy));
        std::fs::write(img.state(), b"x").unwrap();
        assert_eq!(img.memory(), Some(MemoryImage::Stream));
        std::fs::write(img.ram(), b"x").unwrap();
        assert_eq!(img.memory(), Some(MemoryImage::Flat));
    }
}

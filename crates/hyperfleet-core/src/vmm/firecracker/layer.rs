//! Diff snapshot layers: merging a sparse memory layer onto its base.
//!
//! A `"Diff"` snapshot's memory file holds only the pages the guest dirtied
//! since the VM was loaded; everything else is a hole. Firecracker documents
//! merging it by copying its content over the base memory file at the same
//! offsets (what its `rebase-snap` and `snapshot-editor edit-memory rebase`
//! tools do). This module is that copy: the data regions of the layer, found
//! with `SEEK_DATA`/`SEEK_HOLE`, written onto the base, which is then
//! fsynced. Merging the same layer twice gives the same base, so a merge cut
//! short by a crash is finished by merging again — as long as the layer is
//! only removed after the merged base is on disk (the caller's order).
//!
//! A layer is only meaningful on a filesystem that keeps holes: where holes
//! read back as written zeros, the "layer" would overwrite the whole base.
//! [`holes_supported`] asks the filesystem before a diff is taken.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// How much is copied per read/write.
const CHUNK: usize = 1 << 20;

/// One `lseek(fd, offset, whence)`; `Ok(None)` when no data or hole
/// follows `offset` (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
    // SAFETY: lseek on a file descriptor the `File` keeps open; it reads no
    // memory of ours.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The data regions of `file` as `(offset, length)`, in order.
pub(crate) fn data_regions(file: &File) -> io::Result<Vec<(u64, u64)>> {
    let len = file.metadata()?.len();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < len {
        let Some(start) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        // Every file ends in an implicit hole at its end.
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        out.push((start, end - start));
        pos = end;
    }
    Ok(out)
}

/// What a merge copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Merged {
    pub regions: usize,
    pub bytes: u64,
}

fn context(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Copies every data region of `layer` onto `base` at the same offset and
/// fsyncs `base`. `base` never shrinks; it grows to the layer's length if
/// the layer is longer. Idempotent.
pub(crate) fn merge(base: &Path, layer: &Path) -> io::Result<Merged> {
    let src = File::open(layer).map_err(context(format!(
        "opening the memory layer {}",
        layer.display()
    )))?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .open(base)
        .map_err(context(format!(
            "opening the base memory file {}",
            base.display()
        )))?;
    let regions = data_regions(&src).map_err(context(format!(
        "finding the data regions of {}",
        layer.display()
    )))?;
    let mut buf = vec![0u8; CHUNK];
    let mut merged = Merged::default();
    for (start, len) in regions {
        let mut off = start;
        let end = start + len;
        while off < end {
            let n = ((end - off) as usize).min(CHUNK);
            src.read_exact_at(&mut buf[..n], off)
                .map_err(context(format!("reading {} at {off}", layer.display())))?;
            dst.write_all_at(&buf[..n], off)
                .map_err(context(format!("writing {} at {off}", base.display())))?;
            off += n as u64;
        }
        merged.regions += 1;
        merged.bytes += len;
    }
    let layer_len = src.metadata()?.len();
    if dst.metadata()?.len() < layer_len {
        dst.set_len(layer_len)
            .map_err(context(format!("extending {}", base.display())))?;
    }
    dst.sync_all()
        .map_err(context(format!("syncing {}", base.display())))?;
    Ok(merged)
}

/// Whether process `pid` has `file` mapped (by device and inode, so a file
/// unlinked since, or seen through a jail's hard link, still counts).
pub(crate) fn mapped_by(pid: i32, file: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(file)?;
    let dev = format!("{:02x}:{:02x}", libc::major(m.dev()), libc::minor(m.dev()));
    let ino = m.ino().to_string();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(context(format!("reading the memory maps of process {pid}")))?;
    Ok(maps.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(3) == Some(&dev.as_str()) && f.get(4) == Some(&ino.as_str())
    }))
}

/// Whether the filesystem of `dir` reports holes (a sparse probe file's
/// leading hole is found by `SEEK_DATA`). The probe is removed.
pub(crate) fn holes_supported(dir: &Path) -> io::Result<bool> {
    let probe = dir.join(".hole-probe");
    let result = (|| {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&probe)?;
        // Data only in the second MiB: the first is a hole if holes exist.
        f.set_len(2 << 20)?;
        f.write_all_at(&[1], 1 << 20)?;
        Ok(seek(&f, 0, libc::SEEK_DATA)?.is_some_and(|first| first > 0))
    })();
    let _ = std::fs::remove_file(&probe);
    result.map_err(context(format!(
        "probing whether {} keeps sparse files",
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const PAGE: u64 = 4096;

    /// A sparse file of `pages` pages with `fill` written at the pages listed.
    fn sparse(path: &Path, pages: u64, written: &[u64], fill: u8) {
        let f = File::create(path).unwrap();
        f.set_len(pages * PAGE).unwrap();
        for p in written {
            f.write_all_at(&vec![fill; PAGE as usize], p * PAGE)
                .unwrap();
        }
        f.sync_all().unwrap();
    }

    fn page(path: &Path, p: u64) -> Vec<u8> {
        let f = File::open(path).unwrap();
        let mut b = vec![0; PAGE as usize];
        f.read_exact_at(&mut b, p * PAGE).unwrap();
        b
    }

    /// A directory with paths for a base and a layer; None (loudly) where
    /// the filesystem keeps no holes.
    fn pair() -> Option<(tempfile::TempDir, PathBuf, PathBuf)> {
        let dir = tempfile::tempdir().unwrap();
        if !holes_supported(dir.path()).unwrap() {
            eprintln!("SKIPPED: the temporary directory keeps no holes");
            return None;
        }
        let (base, layer) = (dir.path().join("base"), dir.path().join("layer"));
        Some((dir, base, layer))
    }

    #[test]
    fn a_layer_overwrites_exactly_its_dirty_pages() {
        let Some((_dir, base, layer)) = pair() else {
            return;
        };
        // A dense base: every page 0xAA.
        std::fs::write(&base, vec![0xAA; 64 * PAGE as usize]).unwrap();
        // Dirty pages 0, 5, 6 (one region of two pages) and the last one.
        sparse(&layer, 64, &[0, 5, 6, 63], 0x55);
        let regions = data_regions(&File::open(&layer).unwrap()).unwrap();
        let covered: u64 = regions.iter().map(|r| r.1).sum();
        assert!(covered >= 4 * PAGE, "{regions:?}");
        assert!(covered < 64 * PAGE, "the layer is sparse: {regions:?}");

        let m = merge(&base, &layer).unwrap();
        assert_eq!(m.bytes, covered);
        for p in 0..64 {
            let want = if [0, 5, 6, 63].contains(&p) {
                0x55
            } else {
                0xAA
            };
            assert!(page(&base, p).iter().all(|b| *b == want), "page {p}");
        }
        assert_eq!(std::fs::metadata(&base).unwrap().len(), 64 * PAGE);

        // Merging again (a crash after a partial merge) changes nothing.
        let before = std::fs::read(&base).unwrap();
        merge(&base, &layer).unwrap();
        assert_eq!(std::fs::read(&base).unwrap(), before);
    }

    #[test]
    fn an_empty_layer_leaves_the_base_and_a_longer_one_extends_it() {
        let Some((_dir, base, layer)) = pair() else {
            return;
        };
        std::fs::write(&base, vec![7; 8 * PAGE as usize]).unwrap();
        sparse(&layer, 8, &[], 0);
        assert_eq!(merge(&base, &layer).unwrap(), Merged::default());
        assert_eq!(std::fs::read(&base).unwrap(), vec![7; 8 * PAGE as usize]);

        sparse(&layer, 12, &[10], 9);
        merge(&base, &layer).unwrap();
        assert_eq!(std::fs::metadata(&base).unwrap().len(), 12 * PAGE);
        assert!(page(&base, 10).iter().all(|b| *b == 9));
        assert!(page(&base, 7).iter().all(|b| *b == 7));
        assert!(page(&base, 9).iter().all(|b| *b == 0), "grown part reads 0");
    }

    #[test]
    fn missing_files_are_errors_that_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let (base, layer) = (dir.path().join("base"), dir.path().join("layer"));
        let e = merge(&base, &layer).unwrap_err().to_string();
        assert!(e.contains("memory layer") && e.contains("layer"), "{e}");
        sparse(&layer, 1, &[], 0);
        let e = merge(&base, &layer).unwrap_err().to_string();
        assert!(e.contains("base memory file"), "{e}");
        // The probe leaves nothing behind.
        holes_supported(dir.path()).unwrap();
        assert!(!dir.path().join(".hole-probe").exists());
    }

    #[test]
    fn a_mapped_file_is_found_in_the_process_maps_even_unlinked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mapped");
        std::fs::write(&path, vec![1u8; PAGE as usize]).unwrap();
        let me = std::process::id() as i32;
        assert!(!mapped_by(me, &path).unwrap());
        let f = File::open(&path).unwrap();
        // SAFETY: a read-only private mapping of an open file, unmapped below
        // and never dereferenced.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let link = dir.path().join("link");
        std::fs::hard_link(&path, &link).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(mapped_by(me, &link).unwrap(), "found by inode");
        // SAFETY: the mapping made above, of that length.
        unsafe { libc::munmap(addr, PAGE as usize) };
        assert!(!mapped_by(me, &link).unwrap());
    }
}

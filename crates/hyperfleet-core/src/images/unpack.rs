//! The layer unpacker: applies OCI image layers (tar streams, gzip or zstd
//! compressed or not) in order onto one directory on the host, as the
//! image-spec's "Applying Changesets" says, and nothing outside it.
//!
//! Every name is resolved with `openat2(RESOLVE_IN_ROOT)` from a descriptor
//! of the root, so a symlink unpacked earlier (`lib -> /lib`, or `x ->
//! ../../..`) is followed as it would be inside the image and can never
//! lead to the host's files; the entry itself is then made with the `*at`
//! calls relative to its parent's descriptor, without following its last
//! component. Entry names and hard-link targets with `..` or an absolute
//! path are refused outright (as the issue asks, rather than cleaned).
//!
//! Kept: regular files, directories, symlinks, hard links, devices and
//! FIFOs, with mode (setuid/setgid/sticky included), owner, mtime and
//! extended attributes (PAX `SCHILY.xattr.*`). Whiteouts (`.wh.<name>`)
//! remove the name from lower layers; an opaque marker (`.wh..wh..opq`)
//! empties its directory of what lower layers put there. Limits bound the
//! number of entries and the bytes unpacked (a decompression bomb stops at
//! the limit), and each layer's uncompressed digest is checked against the
//! image config's `diff_id`.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// Errors of unpacking a layer.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry {name:?} is refused: {why}")]
    Refused { name: String, why: &'static str },
    #[error("the layer exceeds the limit of {limit} {what}")]
    TooLarge { what: &'static str, limit: u64 },
    #[error("the layer's uncompressed content has digest {got}, but the image config says {want}")]
    DiffId { got: String, want: String },
    #[error("the layer is not a valid tar stream: {0}")]
    Tar(#[source] io::Error),
    #[error("{what} failed while unpacking {name:?}: {source}")]
    Io {
        what: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
}

/// What a layer may hold at most (all layers of an image together).
#[derive(Debug, Clone, Copy)]
pub struct UnpackLimits {
    /// Bytes of uncompressed tar stream.
    pub max_bytes: u64,
    /// Tar entries.
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_bytes: 32 << 30,
            max_entries: 4_000_000,
        }
    }
}

/// The compression of a layer, told by its first bytes (media types lie
/// more often than magic numbers do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Applies layers in order onto `root` (an existing, empty directory at
/// first), counting against one set of limits.
pub struct Unpacker {
    root: OwnedFd,
    limits: UnpackLimits,
    bytes: u64,
    entries: u64,
    /// Whether owners are set (chown needs root; without it files keep the
    /// unpacking user's).
    chown: bool,
}

/// Counts and hashes the uncompressed stream, and stops it at the limit.
struct Counted<R> {
    inner: R,
    hash: Sha256,
    seen: u64,
    budget: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen += n as u64;
        if self.seen > self.budget {
            return Err(io::Error::other(LimitHit));
        }
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

#[derive(Debug)]
struct LimitHit;
impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the unpack size limit was reached")
    }
}
impl std::error::Error for LimitHit {}

fn is_limit(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<LimitHit>())
}

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

impl Unpacker {
    pub fn new(root: &Path, limits: UnpackLimits) -> io::Result<Unpacker> {
        let c = cstr(root.as_os_str())?;
        // SAFETY: `c` is a valid NUL-terminated path; the returned
        // descriptor is checked and then owned.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Unpacker {
            // SAFETY: `fd` is a fresh descriptor nothing else owns.
            root: unsafe { OwnedFd::from_raw_fd(fd) },
            limits,
            bytes: 0,
            entries: 0,
            // SAFETY: geteuid has no preconditions and cannot fail.
            chown: unsafe { libc::geteuid() } == 0,
        })
    }

    /// Applies one layer read from `blob` (compressed or not); `diff_id`
    /// (`sha256:<hex>`), when given, must be the digest of the
    /// uncompressed stream. On error the root is left half-applied: the
    /// caller discards it.
    pub fn apply(&mut self, blob: impl Read, diff_id: Option<&str>) -> Result<(), UnpackError> {
        let mut buffered = BufReader::with_capacity(256 << 10, blob);
        let head = buffered.fill_buf().map_err(UnpackError::Tar)?;
        let stream: Box<dyn Read> = match Compression::sniff(head) {
            Compression::None => Box::new(buffered),
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(buffered).map_err(UnpackError::Tar)?,
            ),
        };
        let budget = self.limits.max_bytes.saturating_sub(self.bytes);
        let mut counted = Counted {
            inner: stream,
            hash: Sha256::new(),
            seen: 0,
            budget,
        };
        let res = self.apply_tar(&mut counted);
        let limit = |e: &io::Error| {
            is_limit(e).then_some(UnpackError::TooLarge {
                what: "uncompressed bytes",
                limit: self.limits.max_bytes,
            })
        };
        if let Err(UnpackError::Tar(e) | UnpackError::Io { source: e, .. }) = &res {
            if let Some(l) = limit(e) {
                return Err(l);
            }
        }
        res?;
        // The digest covers the whole stream, padding after the end
        // marker included.
        if let Err(e) = io::copy(&mut counted, &mut io::sink()) {
            return Err(limit(&e).unwrap_or(UnpackError::Tar(e)));
        }
        self.bytes += counted.seen;
        if let Some(want) = diff_id {
            let got = format!("sha256:{}", hex::encode(counted.hash.finalize()));
            if got != want {
                return Err(UnpackError::DiffId {
                    got,
                    want: want.to_string(),
                });
            }
        }
        Ok(())
    }

    fn apply_tar(&mut self, r: &mut impl Read) -> Result<(), UnpackError> {
        let mut archive = tar::Archive::new(r);
        // Paths already made by this layer: an opaque marker or a whiteout
        // hides only what lower layers made.
        let mut made: HashSet<PathBuf> = HashSet::new();
        for entry in archive.entries().map_err(UnpackError::Tar)? {
            let mut entry = entry.map_err(UnpackError::Tar)?;
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(UnpackError::TooLarge {
                    what: "entries",
                    limit: self.limits.max_entries,
                });
            }
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            let kind = entry.header().entry_type();
            if matches!(
                kind,
                tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
            ) {
                continue;
            }
            let rel = clean(&raw).map_err(|why| UnpackError::Refused {
                name: shown.clone(),
                why,
            })?;
            let Some(name) = rel.file_name().map(|n| n.to_os_string()) else {
                // The root itself ("./"): its metadata is the builder's.
                continue;
            };
            let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            let name_b = name.as_bytes();
            if name_b == OPAQUE.as_bytes() {
                let dir = self.dir(&parent_rel, &shown)?;
                self.empty_dir(&dir, &parent_rel, &made, &shown)?;
                continue;
            }
            if let Some(hidden) = name_b.strip_prefix(WHITEOUT.as_bytes()) {
                if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&b'/')
                {
                    return Err(UnpackError::Refused {
                        name: shown,
                        why: "a whiteout must name an entry of its directory",
                    });
                }
                let target = parent_rel.join(OsStr::from_bytes(hidden));
                if !made.contains(&target) {
                    let dir = self.dir(&parent_rel, &shown)?;
                    remove_at(&dir, OsStr::from_bytes(hidden), &shown)?;
                }
                continue;
            }
            let dir = self.dir(&parent_rel, &shown)?;
            self.make(&dir, &name, &mut entry, kind, &shown)?;
            made.insert(rel);
        }
        Ok(())
    }

    /// The directory `rel` (relative to the root), resolved inside the
    /// root; missing directories are created (0755, as other unpackers do).
    fn dir(&self, rel: &Path, shown: &str) -> Result<OwnedFd, UnpackError> {
        let io_err = |what, source| UnpackError::Io {
            what,
            name: shown.to_string(),
            source,
        };
        match open_in_root(&self.root, rel, libc::O_PATH | libc::O_DIRECTORY) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(io_err("resolving the parent directory", e)),
        }
        let mut prefix = PathBuf::new();
        for comp in rel.components() {
            let parent = open_in_root(&self.root, &prefix, libc::O_PATH | libc::O_DIRECTORY)
                .map_err(|e| io_err("resolving a parent directory", e))?;
            let c = cstr(comp.as_os_str()).map_err(|e| io_err("naming a directory", e))?;
            // SAFETY: valid descriptor and NUL-terminated name.
            if unsafe { libc::mkdirat(parent.as_raw_fd(), c.as_ptr(), 0o755) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(io_err("creating a parent directory", e));
                }
            }
            prefix.push(comp);
        }
        open_in_root(&self.root, rel, libc::O_PATH | libc::O_DIRECTORY)
            .map_err(|e| io_err("resolving the parent directory", e))
    }

    /// Removes what lower layers put in `dir` (an opaque directory).
    fn empty_dir(
        &self,
        dir: &OwnedFd,
        rel: &Path,
        made: &HashSet<PathBuf>,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let listing = std::fs::read_dir(fd_path(dir)).map_err(|source| UnpackError::Io {
            what: "listing an opaque directory",
            name: shown.to_string(),
            source,
        })?;
        for child in listing {
            let child = child.map_err(|source| UnpackError::Io {
                what: "listing an opaque directory",
                name: shown.to_string(),
                source,
            })?;
            let name = child.file_name();
            if !made.contains(&rel.join(&name)) {
                remove_at(dir, &name, shown)?;
            }
        }
        Ok(())
    }

    fn make(
        &mut self,
        dir: &OwnedFd,
        name: &OsStr,
        entry: &mut tar::Entry<'_, impl Read>,
        kind: tar::EntryType,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let io_err = |what: &'static str| {
            let name = shown.to_string();
            move |source| UnpackError::Io { what, name, source }
        };
        let c = cstr(name).map_err(io_err("naming an entry"))?;
        let h = entry.header().clone();
        let mode = h.mode().map_err(UnpackError::Tar)? & 0o7777;
        let uid = h.uid().map_err(UnpackError::Tar)?;
        let gid = h.gid().map_err(UnpackError::Tar)?;
        let mtime = h.mtime().unwrap_or(0);
        let xattrs = xattrs_of(entry);
        // What is there from a lower layer goes, unless both are
        // directories (then the new entry's metadata applies).
        let existing = lstat_at(dir, &c);
        let is_dir = kind == tar::EntryType::Directory;
        let keep_dir = match existing {
            Some(st) if is_dir && st.st_mode & libc::S_IFMT == libc::S_IFDIR => true,
            Some(_) => {
                remove_at(dir, name, shown)?;
                false
            }
            None => false,
        };
        let dfd = dir.as_raw_fd();
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                // SAFETY: valid descriptor and name; the new descriptor is
                // checked, then owned by the File.
                let fd = unsafe {
                    libc::openat(
                        dfd,
                        c.as_ptr(),
                        libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_WRONLY
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o600,
                    )
                };
                if fd < 0 {
                    return Err(io_err("creating a file")(io::Error::last_os_error()));
                }
                // SAFETY: `fd` is fresh and owned by nothing else.
                let mut file = unsafe { File::from_raw_fd(fd) };
                io::copy(entry, &mut file).map_err(io_err("writing a file"))?;
                self.finish_fd(file.as_raw_fd(), uid, gid, mode, mtime, &xattrs)
                    .map_err(io_err("setting a file's metadata"))?;
            }
            tar::EntryType::Directory => {
                if !keep_dir {
                    // SAFETY: valid descriptor and name.
                    if unsafe { libc::mkdirat(dfd, c.as_ptr(), 0o700) } != 0 {
                        return Err(io_err("creating a directory")(io::Error::last_os_error()));
                    }
                }
                let sub = open_at(
                    dir,
                    &c,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                )
                .map_err(io_err("opening a directory"))?;
                self.finish_fd(sub.as_raw_fd(), uid, gid, mode, mtime, &xattrs)
                    .map_err(io_err("setting a directory's metadata"))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or(UnpackError::Refused {
                        name: shown.to_string(),
                        why: "a symlink without a target",
                    })?
                    .into_owned();
                // The target is stored as is (it is only ever followed
                // inside the root, or in the guest).
                let t = CString::new(target).map_err(|_| UnpackError::Refused {
                    name: shown.to_string(),
                    why: "a NUL byte in a symlink target",
                })?;
                // SAFETY: valid strings and descriptor.
                if unsafe { libc::symlinkat(t.as_ptr(), dfd, c.as_ptr()) } != 0 {
                    return Err(io_err("creating a symlink")(io::Error::last_os_error()));
                }
                self.finish_link(dir, &c, uid, gid, mtime)
                    .map_err(io_err("setting a symlink's metadata"))?;
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().ok_or(UnpackError::Refused {
                    name: shown.to_string(),
                    why: "a hard link without a target",
                })?;
                let target = clean(&target).map_err(|why| UnpackError::Refused {
                    name: shown.to_string(),
                    why: match why {
                        "an absolute path" => "a hard link to an absolute path",
                        "a `..` component" => "a hard link with a `..` component",
                        other => other,
                    },
                })?;
                let (Some(tname), Some(tparent)) = (target.file_name(), target.parent()) else {
                    return Err(UnpackError::Refused {
                        name: shown.to_string(),
                        why: "a hard link to the root",
                    });
                };
                let tdir = open_in_root(&self.root, tparent, libc::O_PATH | libc::O_DIRECTORY)
                    .map_err(io_err("resolving a hard link's target"))?;
                let tc = cstr(tname).map_err(io_err("naming a hard link's target"))?;
                // SAFETY: valid descriptors and names; flags 0 = the
                // target's last component is not followed.
                if unsafe { libc::linkat(tdir.as_raw_fd(), tc.as_ptr(), dfd, c.as_ptr(), 0) } != 0 {
                    return Err(io_err("creating a hard link")(io::Error::last_os_error()));
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let fmt = match kind {
                    tar::EntryType::Char => libc::S_IFCHR,
                    tar::EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                let dev = libc::makedev(major, minor);
                // SAFETY: valid descriptor and name.
                if unsafe { libc::mknodat(dfd, c.as_ptr(), fmt | 0o600, dev) } != 0 {
                    return Err(io_err("creating a device node")(io::Error::last_os_error()));
                }
                self.finish_link(dir, &c, uid, gid, mtime)
                    .map_err(io_err("setting a node's owner"))?;
                let path = CString::new(fd_path(dir).join(name).into_os_string().into_vec())
                    .map_err(|_| io_err("naming a node")(io::Error::other("NUL byte")))?;
                // SAFETY: valid path; fchmodat follows no symlink here
                // (the node was just made by us).
                if unsafe { libc::fchmodat(libc::AT_FDCWD, path.as_ptr(), mode, 0) } != 0 {
                    return Err(io_err("setting a node's mode")(io::Error::last_os_error()));
                }
            }
            _ => {
                return Err(UnpackError::Refused {
                    name: shown.to_string(),
                    why: "an unsupported tar entry type",
                })
            }
        }
        Ok(())
    }

    /// Owner, then mode (chown clears setuid bits), then xattrs (chown
    /// clears file capabilities), then times.
    fn finish_fd(
        &self,
        fd: i32,
        uid: u64,
        gid: u64,
        mode: u32,
        mtime: u64,
        xattrs: &[(CString, Vec<u8>)],
    ) -> io::Result<()> {
        // SAFETY: `fd` is an open descriptor for the whole block.
        unsafe {
            if self.chown && libc::fchown(fd, id32(uid)?, id32(gid)?) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::fchmod(fd, mode) != 0 {
                return Err(io::Error::last_os_error());
            }
            for (k, v) in xattrs {
                if libc::fsetxattr(fd, k.as_ptr(), v.as_ptr().cast(), v.len(), 0) != 0 {
                    let e = io::Error::last_os_error();
                    // A host filesystem without that namespace: skipped.
                    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                        return Err(e);
                    }
                }
            }
            let t = times(mtime);
            if libc::futimens(fd, t.as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    fn finish_link(
        &self,
        dir: &OwnedFd,
        c: &CString,
        uid: u64,
        gid: u64,
        mtime: u64,
    ) -> io::Result<()> {
        let dfd = dir.as_raw_fd();
        // SAFETY: valid descriptor and name; AT_SYMLINK_NOFOLLOW acts on the
        // link itself.
        unsafe {
            if self.chown
                && libc::fchownat(
                    dfd,
                    c.as_ptr(),
                    id32(uid)?,
                    id32(gid)?,
                    libc::AT_SYMLINK_NOFOLLOW,
                ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            let t = times(mtime);
            if libc::utimensat(dfd, c.as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

fn id32(v: u64) -> io::Result<u32> {
    u32::try_from(v).map_err(|_| io::Error::other(format!("owner id {v} is out of range")))
}

fn times(mtime: u64) -> [libc::timespec; 2] {
    let t = libc::timespec {
        tv_sec: mtime.min(i64::MAX as u64) as libc::time_t,
        tv_nsec: 0,
    };
    [t, t]
}

fn xattrs_of(entry: &mut tar::Entry<'_, impl Read>) -> Vec<(CString, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(Some(exts)) = entry.pax_extensions() {
        for ext in exts.flatten() {
            let Some(k) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                continue;
            };
            if let Ok(k) = CString::new(k) {
                out.push((k, ext.value_bytes().to_vec()));
            }
        }
    }
    out
}

/// An entry name as a relative path without `.` components; `..` and
/// absolute names are refused.
fn clean(raw: &[u8]) -> Result<PathBuf, &'static str> {
    if raw.contains(&0) {
        return Err("a NUL byte in the name");
    }
    let p = Path::new(OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("a `..` component"),
            Component::RootDir | Component::Prefix(_) => return Err("an absolute path"),
        }
    }
    Ok(out)
}

fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::other("a NUL byte in a name"))
}

/// `/proc/self/fd/N`: a path to an already-resolved directory for the std
/// calls that take paths (listing, recursive removal).
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Opens `rel` under `root` as if `root` were `/`: symlinks (absolute ones
/// included) and `..` stay inside it.
fn open_in_root(root: &OwnedFd, rel: &Path, flags: i32) -> io::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let c = cstr(rel.as_os_str())?;
    // SAFETY: open_how is plain data; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a valid dirfd, a NUL-terminated path and a
    // correctly sized `open_how`; the result is checked and then owned.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn open_at(dir: &OwnedFd, name: &CString, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: valid descriptor and name; the result is checked, then owned.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn lstat_at(dir: &OwnedFd, name: &CString) -> Option<libc::stat> {
    // SAFETY: a zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, name and out-parameter.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    (r == 0).then_some(st)
}

/// Removes `name` in `dir` (recursively for a directory, never following
/// a symlink); absent is fine.
fn remove_at(dir: &OwnedFd, name: &OsStr, shown: &str) -> Result<(), UnpackError> {
    let err = |source| UnpackError::Io {
        what: "removing an entry of a lower layer",
        name: shown.to_string(),
        source,
    };
    let c = cstr(name).map_err(err)?;
    let Some(st) = lstat_at(dir, &c) else {
        return Ok(());
    };
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        // The directory's own path through the already-resolved parent;
        // remove_dir_all does not follow symlinks inside it.
        let path = fd_path(dir).join(name);
        crate::util::absent_ok(std::fs::remove_dir_all(&path)).map_err(err)
    } else {
        // SAFETY: valid descriptor and name.
        if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(err(e));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;

/// A layer built entry by entry; names are written raw, so hostile ones
/// (`../x`, `/etc/x`) can be made too.
#[derive(Default)]
struct Layer {
    b: Vec<u8>,
}

impl Layer {
    fn raw(mut self, name: &str, kind: tar::EntryType, link: &str, mode: u32, data: &[u8]) -> Self {
        let mut h = tar::Header::new_gnu();
        {
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(1234);
        h.set_gid(5678);
        h.set_mtime(1_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.b.extend_from_slice(h.as_bytes());
        self.b.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.b.extend(std::iter::repeat_n(0u8, pad));
        self
    }
    fn file(self, name: &str, data: &str) -> Self {
        self.raw(name, tar::EntryType::Regular, "", 0o644, data.as_bytes())
    }
    fn dir(self, name: &str) -> Self {
        self.raw(name, tar::EntryType::Directory, "", 0o755, b"")
    }
    fn symlink(self, name: &str, target: &str) -> Self {
        self.raw(name, tar::EntryType::Symlink, target, 0o777, b"")
    }
    fn hardlink(self, name: &str, target: &str) -> Self {
        self.raw(name, tar::EntryType::Link, target, 0o644, b"")
    }
    fn tar(mut self) -> Vec<u8> {
        self.b.extend(std::iter::repeat_n(0u8, 1024));
        self.b
    }
    fn gzip(self) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&self.tar()).unwrap();
        e.finish().unwrap()
    }
    fn zstd(self) -> Vec<u8> {
        zstd::encode_all(&self.tar()[..], 1).unwrap()
    }
}

fn diff_id(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn read(root: &Path, p: &str) -> String {
    std::fs::read_to_string(root.join(p)).unwrap()
}

#[test]
fn two_layers_with_whiteouts_opaque_dirs_links_and_modes() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let mut u = Unpacker::new(root, UnpackLimits::default()).unwrap();
    let l1 = Layer::default()
        .dir("etc/")
        .file("etc/gone", "bye")
        .file("etc/kept", "kept")
        .dir("data/")
        .file("data/old1", "1")
        .dir("data/sub/")
        .file("data/sub/old2", "2")
        .raw("bin/tool", tar::EntryType::Regular, "", 0o4755, b"#!tool")
        .hardlink("bin/tool2", "bin/tool")
        .symlink("lib", "usr/lib")
        .dir("usr/lib/")
        .file("usr/lib/libx.so", "x")
        .symlink("abs", "/etc");
    let tar1 = l1.tar();
    u.apply(&tar1[..], Some(&diff_id(&tar1))).unwrap();
    // Layer 2 (gzip): deletes a file, replaces a directory's content
    // (opaque), writes through a symlinked directory, and writes through
    // an absolute symlink, which must stay inside the root.
    let l2 = Layer::default()
        .file("etc/.wh.gone", "")
        .dir("data/")
        .file("data/new", "new")
        .file("data/.wh..wh..opq", "")
        .file("lib/liby.so", "y")
        .file("abs/inside", "in");
    let gz = l2.gzip();
    let mut dec = flate2::read::GzDecoder::new(&gz[..]);
    let mut plain = Vec::new();
    dec.read_to_end(&mut plain).unwrap();
    u.apply(&gz[..], Some(&diff_id(&plain))).unwrap();

    assert!(!root.join("etc/gone").exists());
    assert_eq!(read(root, "etc/kept"), "kept");
    // Opaque: the lower layer's content is gone, this layer's entry (made
    // before the marker in the stream) stays.
    let mut names: Vec<_> = std::fs::read_dir(root.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["new"]);
    assert_eq!(read(root, "usr/lib/liby.so"), "y");
    assert_eq!(read(root, "etc/inside"), "in");
    // Hard link, setuid mode, owner, mtime.
    let m1 = std::fs::metadata(root.join("bin/tool")).unwrap();
    let m2 = std::fs::metadata(root.join("bin/tool2")).unwrap();
    assert_eq!(m1.ino(), m2.ino());
    assert_eq!(m1.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(m1.mtime(), 1_000_000);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!((m1.uid(), m1.gid()), (1234, 5678));
        let l = std::fs::symlink_metadata(root.join("lib")).unwrap();
        assert_eq!(l.uid(), 1234);
    }
    assert_eq!(
        std::fs::read_link(root.join("abs")).unwrap(),
        Path::new("/etc")
    );
}

#[test]
fn zstd_layers_are_read() {
    let d = tempfile::tempdir().unwrap();
    let mut u = Unpacker::new(d.path(), UnpackLimits::default()).unwrap();
    let z = Layer::default().file("a/b", "zz").zstd();
    u.apply(&z[..], None).unwrap();
    assert_eq!(read(d.path(), "a/b"), "zz");
}

#[test]
fn escaping_names_and_links_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for (layer, why) in [
        (Layer::default().file("../evil", "x"), "`..`"),
        (Layer::default().file("a/../../evil", "x"), "`..`"),
        (Layer::default().file("/evil", "x"), "absolute"),
        (Layer::default().hardlink("h", "../../etc/passwd"), "`..`"),
        (Layer::default().hardlink("h", "/etc/passwd"), "absolute"),
        (Layer::default().file(".wh..", ""), "whiteout"),
    ] {
        let mut u = Unpacker::new(&root, UnpackLimits::default()).unwrap();
        let err = u.apply(&layer.tar()[..], None).unwrap_err();
        assert!(matches!(err, UnpackError::Refused { .. }), "{err}");
        assert!(err.to_string().contains(why), "{err}");
    }
    assert!(!d.path().join("evil").exists());
    // A symlink to the outside, then a file written through it: resolved
    // inside the root, where that path does not exist (refused), or
    // inside the root where it does.
    let target = outside.path().to_str().unwrap().to_string();
    let mut u = Unpacker::new(&root, UnpackLimits::default()).unwrap();
    let l = Layer::default()
        .symlink("out", &target)
        .file("out/planted", "x");
    u.apply(&l.tar()[..], None).unwrap_err();
    let l = Layer::default()
        .dir(&format!("{}/", target.trim_start_matches('/')))
        .file("out/planted", "x")
        .symlink("up", "../../../../..")
        .file("up/planted2", "x");
    u.apply(&l.tar()[..], None).unwrap();
    assert!(!outside.path().join("planted").exists());
    assert!(root
        .join(target.trim_start_matches('/'))
        .join("planted")
        .exists());
    assert!(root.join("planted2").exists());
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    // A whiteout through a symlink removes inside the root only.
    std::fs::write(outside.path().join("victim"), "v").unwrap();
    let l = Layer::default()
        .symlink("o2", &target)
        .file("o2/.wh.victim", "");
    u.apply(&l.tar()[..], None).unwrap();
    assert!(outside.path().join("victim").exists());
}

#[test]
fn a_tampered_layer_fails_its_diff_id() {
    let d = tempfile::tempdir().unwrap();
    let mut u = Unpacker::new(d.path(), UnpackLimits::default()).unwrap();
    let good = Layer::default().file("f", "good").tar();
    let bad = Layer::default().file("f", "evil").tar();
    let err = u.apply(&bad[..], Some(&diff_id(&good))).unwrap_err();
    assert!(matches!(err, UnpackError::DiffId { .. }), "{err}");
}

#[test]
fn limits_stop_bombs() {
    let d = tempfile::tempdir().unwrap();
    let big = vec![0u8; 1 << 20];
    let gz = Layer::default()
        .raw("big", tar::EntryType::Regular, "", 0o644, &big)
        .gzip();
    let limits = UnpackLimits {
        max_bytes: 64 << 10,
        max_entries: 10,
    };
    let mut u = Unpacker::new(d.path(), limits).unwrap();
    let err = u.apply(&gz[..], None).unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::TooLarge {
                what: "uncompressed bytes",
                ..
            }
        ),
        "{err}"
    );
    let mut many = Layer::default();
    for i in 0..20 {
        many = many.file(&format!("f{i}"), "");
    }
    let mut u = Unpacker::new(d.path(), limits).unwrap();
    let err = u.apply(&many.tar()[..], None).unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::TooLarge {
                what: "entries",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_file_replaces_a_directory_and_back() {
    let d = tempfile::tempdir().unwrap();
    let mut u = Unpacker::new(d.path(), UnpackLimits::default()).unwrap();
    u.apply(
        &Layer::default().file("x/y", "1").file("z", "2").tar()[..],
        None,
    )
    .unwrap();
    u.apply(
        &Layer::default().file("x", "now a file").dir("z/").tar()[..],
        None,
    )
    .unwrap();
    assert_eq!(read(d.path(), "x"), "now a file");
    assert!(d.path().join("z").is_dir());
}

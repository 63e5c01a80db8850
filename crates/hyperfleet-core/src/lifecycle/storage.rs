//! Storage accounting (docs/api.md "Persistence"): owns the storage budget
//! (`--storage-budget`, or the default measured at start) and the cached
//! measurement of what the data directory holds — each machine's bytes
//! (its directory's files and its memory image), snapshots and OCI images
//! — in allocated blocks, not apparent sizes.
//!
//! Measuring walks directories, so it never happens on an API request:
//! the evictor's loop (`lifecycle::evictor`) measures the machines a run
//! marked changed (after it prepared a disk, saved memory or took a
//! snapshot, or released a machine) as soon as they are marked, the
//! machines with a VMM (whose guests write to their disks without telling
//! anyone), snapshots and images every [`SCAN_EVERY`], and everything at
//! start and every [`FULL_SCAN_EVERY`]; requests read the cache, whose
//! sums are kept as it changes (reading them costs nothing per machine).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::store::lock;
use crate::util::now_ms;
use crate::vmm::image::disk_usage;

/// How often running machines, snapshots and images are measured again.
pub const SCAN_EVERY: Duration = Duration::from_secs(30);

/// How often every machine is measured again (what changed behind the
/// runs' backs: files removed by hand).
pub const FULL_SCAN_EVERY: Duration = Duration::from_secs(600);

/// The default budget's share of the filesystem's free space at start.
pub const DEFAULT_BUDGET_SHARE: f64 = 0.8;

/// How many evictions `GET /storage` remembers.
const RECENT_EVICTIONS: usize = 100;

/// What one machine holds on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineBytes {
    /// Its directory's files: the disk overlay, the console log, …
    pub disk: u64,
    /// Its memory image (suspended machines).
    pub memory: u64,
}

impl MachineBytes {
    pub fn total(self) -> u64 {
        self.disk + self.memory
    }
}

/// The data directory's use, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub machines: u64,
    pub memory_images: u64,
    pub snapshots: u64,
    pub images: u64,
    pub machine_count: u64,
}

impl Totals {
    /// What counts against the budget (images do not: the evictor cannot
    /// reclaim them).
    pub fn used(&self) -> u64 {
        self.machines + self.memory_images + self.snapshots
    }
}

/// One eviction, for `GET /storage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    pub machine_id: String,
    pub machine_name: String,
    /// `memory_image` or `machine`.
    pub what: &'static str,
    pub bytes: u64,
    pub at: i64,
}

#[derive(Default)]
struct Measured {
    machines: HashMap<String, MachineBytes>,
    /// The sums of `machines`, kept as it changes.
    disk: u64,
    memory: u64,
    snapshots: u64,
    images: u64,
    at: Option<i64>,
}

impl Measured {
    fn set(&mut self, id: &str, bytes: Option<MachineBytes>) {
        let old = match bytes {
            Some(b) => self.machines.insert(id.to_string(), b),
            None => self.machines.remove(id),
        };
        if let Some(o) = old {
            self.disk -= o.disk;
            self.memory -= o.memory;
        }
        if let Some(b) = bytes {
            self.disk += b.disk;
            self.memory += b.memory;
        }
    }
}

/// How the budget was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetSource {
    Flag,
    Default,
}

impl BudgetSource {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetSource::Flag => "flag",
            BudgetSource::Default => "default",
        }
    }
}

/// The budget and the cached measurement, shared by the runs (which mark
/// what they changed), the evictor and the API.
pub struct Storage {
    machines_dir: PathBuf,
    snapshots_dir: PathBuf,
    images_dir: PathBuf,
    budget: u64,
    source: BudgetSource,
    measured: Mutex<Measured>,
    /// Machines to measure again soon.
    dirty: Mutex<HashSet<String>>,
    /// Wakes the evictor: something grew.
    pub(crate) changed: tokio::sync::Notify,
    pub(crate) evicted_images: AtomicU64,
    pub(crate) evicted_machines: AtomicU64,
    recent: Mutex<VecDeque<Eviction>>,
}

impl Storage {
    /// Measures the data directory `data_dir` (blocking: at start) and
    /// sets the budget: `budget`, else what is stored now plus
    /// [`DEFAULT_BUDGET_SHARE`] of the filesystem's free space.
    pub fn open(data_dir: &Path, budget: Option<u64>) -> Storage {
        let mut s = Storage {
            machines_dir: data_dir.join("machines"),
            snapshots_dir: data_dir.join("snapshots"),
            images_dir: data_dir.join("images"),
            budget: budget.unwrap_or(0),
            source: if budget.is_some() {
                BudgetSource::Flag
            } else {
                BudgetSource::Default
            },
            measured: Mutex::new(Measured::default()),
            dirty: Mutex::new(HashSet::new()),
            changed: tokio::sync::Notify::new(),
            evicted_images: AtomicU64::new(0),
            evicted_machines: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::new()),
        };
        s.measure_all();
        if budget.is_none() {
            let free = free_bytes(data_dir).unwrap_or(0);
            s.budget = s
                .totals()
                .used()
                .saturating_add((free as f64 * DEFAULT_BUDGET_SHARE) as u64);
        }
        tracing::info!(
            budget_bytes = s.budget,
            source = s.source.as_str(),
            used_bytes = s.totals().used(),
            "storage budget"
        );
        s
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn source(&self) -> BudgetSource {
        self.source
    }

    /// Machine `id` changed what it holds (a step wrote or removed files):
    /// it is measured again soon and the evictor looks.
    pub fn mark(&self, id: &str) {
        lock(&self.dirty).insert(id.to_string());
        self.changed.notify_one();
    }

    /// Something other than a machine grew (a snapshot): the next
    /// measurement is a full one.
    pub fn mark_all(&self) {
        lock(&self.dirty).insert(String::new());
        self.changed.notify_one();
    }

    /// What machine `id` held when last measured.
    pub fn machine(&self, id: &str) -> Option<MachineBytes> {
        lock(&self.measured).machines.get(id).copied()
    }

    /// What each of `ids` holds in total (`None`: not measured yet), read
    /// under one lock (a page of a machine list).
    pub fn machine_totals<'a>(&self, ids: impl Iterator<Item = &'a str>) -> Vec<Option<u64>> {
        let m = lock(&self.measured);
        ids.map(|id| m.machines.get(id).map(|b| b.total()))
            .collect()
    }

    pub fn totals(&self) -> Totals {
        let m = lock(&self.measured);
        Totals {
            machines: m.disk,
            memory_images: m.memory,
            snapshots: m.snapshots,
            images: m.images,
            machine_count: m.machines.len() as u64,
        }
    }

    pub fn measured_at(&self) -> Option<i64> {
        lock(&self.measured).at
    }

    /// Measures everything again (blocking: call from a blocking thread).
    pub fn measure_all(&self) {
        lock(&self.dirty).clear();
        let mut machines = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(&self.machines_dir) {
            for e in entries.flatten() {
                let (Ok(name), true) = (
                    e.file_name().into_string(),
                    e.file_type().is_ok_and(|t| t.is_dir()),
                ) else {
                    continue;
                };
                machines.insert(name, measure_machine(&e.path()));
            }
        }
        let (snapshots, images) = self.others();
        let mut m = Measured {
            snapshots,
            images,
            at: Some(now_ms()),
            ..Measured::default()
        };
        for (id, b) in machines {
            m.set(&id, Some(b));
        }
        *lock(&self.measured) = m;
    }

    /// Snapshots and images: verified blobs and one filesystem per image
    /// digest (`images`); `tmp/` (pulls under way, possibly whole unpacked
    /// trees) is not walked.
    fn others(&self) -> (u64, u64) {
        let snapshots = subdirs_usage(&self.snapshots_dir);
        let images = disk_usage(&self.images_dir.join("blobs/sha256"))
            + subdirs_usage(&self.images_dir.join("fs"));
        (snapshots, images)
    }

    /// Measures machines `ids` (those with a VMM), snapshots and images
    /// again (blocking).
    pub fn measure_some(&self, ids: &[String]) {
        for id in ids {
            self.measure_one(id);
        }
        let (snapshots, images) = self.others();
        let mut m = lock(&self.measured);
        m.snapshots = snapshots;
        m.images = images;
        m.at = Some(now_ms());
    }

    /// Measures what was marked since the last measurement (blocking).
    pub fn measure_marked(&self) {
        let dirty: Vec<String> = lock(&self.dirty).drain().collect();
        if dirty.iter().any(String::is_empty) {
            self.measure_all();
            return;
        }
        for id in dirty {
            self.measure_one(&id);
        }
    }

    /// Measures machine `id` again (blocking); a machine without a
    /// directory holds nothing and is forgotten.
    pub fn measure_one(&self, id: &str) {
        let dir = self.machines_dir.join(id);
        let bytes = dir.is_dir().then(|| measure_machine(&dir));
        lock(&self.measured).set(id, bytes);
    }

    /// Whether anything was marked since the last measurement.
    pub fn has_marked(&self) -> bool {
        !lock(&self.dirty).is_empty()
    }

    pub(crate) fn record_eviction(&self, e: Eviction) {
        let counter = if e.what == "machine" {
            &self.evicted_machines
        } else {
            &self.evicted_images
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut r = lock(&self.recent);
        if r.len() == RECENT_EVICTIONS {
            r.pop_front();
        }
        r.push_back(e);
    }

    /// The latest evictions, oldest first.
    pub fn recent_evictions(&self) -> Vec<Eviction> {
        lock(&self.recent).iter().cloned().collect()
    }
}

/// A machine directory's files (not recursive: what lives in
/// subdirectories other than the memory image — a Firecracker jail's
/// links to the same files — would count twice) and its memory image.
fn measure_machine(dir: &Path) -> MachineBytes {
    MachineBytes {
        disk: disk_usage(dir),
        memory: disk_usage(&dir.join("snapshot")),
    }
}

/// The files of each directory under `dir` (a directory per snapshot).
fn subdirs_usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| disk_usage(&e.path()))
        .sum()
}

/// The bytes an unprivileged user may still write on `dir`'s filesystem.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs(3) fills the zeroed struct we own from a
    // NUL-terminated path that lives across the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// `--storage-budget`: bytes, with an optional binary suffix (`K`, `M`,
/// `G`, `T`; `KiB`/`KB` alike, any case): `10G`, `512M`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        u => return Err(format!("unknown unit '{u}' in '{s}'; use K, M, G or T")),
    };
    let bad = || format!("'{s}' is not a size (bytes, or a number with K, M, G or T)");
    if num.contains('.') {
        let v: f64 = num.parse().map_err(|_| bad())?;
        let bytes = v * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
            return Err(bad());
        }
        return Ok(bytes as u64);
    }
    let v: u64 = num.parse().map_err(|_| bad())?;
    v.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10gib"), Ok(10 << 30));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        parse_size("ten").unwrap_err();
        parse_size("5X").unwrap_err();
        parse_size("").unwrap_err();
        parse_size("99999999999T").unwrap_err();
    }

    #[test]
    fn a_machine_is_its_files_and_its_memory_image() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("machines").join("m1");
        std::fs::create_dir_all(m.join("snapshot")).unwrap();
        std::fs::write(m.join("disk.img"), vec![1u8; 64 << 10]).unwrap();
        std::fs::write(m.join("snapshot").join("state"), vec![1u8; 32 << 10]).unwrap();
        let s = Storage::open(d.path(), Some(1 << 30));
        let b = s.machine("m1").unwrap();
        assert!(b.disk >= 64 << 10 && b.disk < 128 << 10, "{b:?}");
        assert!(b.memory >= 32 << 10 && b.memory < 64 << 10, "{b:?}");
        assert_eq!(s.totals().used(), b.total());
        std::fs::remove_dir_all(m.join("snapshot")).unwrap();
        s.mark("m1");
        s.measure_marked();
        assert_eq!(s.machine("m1").unwrap().memory, 0);
        std::fs::remove_dir_all(&m).unwrap();
        s.measure_one("m1");
        assert_eq!(s.machine("m1"), None);
        assert_eq!(s.totals().used(), 0);
    }
}

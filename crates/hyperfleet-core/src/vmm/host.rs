//! What the host offers the backends: hardware virtualisation (and what it
//! means for guests), the CPU's clock rate, and where a VMM binary is.
//!
//! The backends decide with it at construction and `doctor` reports it; both
//! read the host here so they never disagree.

use std::path::{Path, PathBuf};

/// What virtualisation the host offers, and what it means for guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation with a usable /dev/kvm.
    HardwareKvm,
    /// /dev/kvm is the software-nested PVM module: stock guests cannot boot.
    PvmOnly,
    /// No usable KVM: only software emulation (TCG).
    None,
}

/// `--qemu-accel`: what QEMU is told to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// The host's virtualisation, and a sentence saying why.
pub fn detect_accel() -> (Accel, String) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let kvm_rw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if pvm {
        (Accel::PvmOnly, "/dev/kvm is provided by kvm_pvm (software nested KVM); stock Linux guests die under it with KVM_EXIT_INTERNAL_ERROR, so QEMU must use TCG and Firecracker cannot boot guests here".into())
    } else if hw && kvm_rw {
        (
            Accel::HardwareKvm,
            "hardware virtualisation (vmx/svm) with a usable /dev/kvm".into(),
        )
    } else if hw {
        (
            Accel::None,
            "the CPU has vmx/svm but /dev/kvm is missing or not accessible".into(),
        )
    } else {
        (
            Accel::None,
            "no vmx/svm CPU flag: only software emulation (QEMU TCG) is possible".into(),
        )
    }
}

/// The host TSC frequency in kHz, so a guest can skip its calibration
/// loop (`tsc_early_khz`, `lpj`): about one boot in thirty hung in
/// `calibrate_delay` without it.
pub(crate) fn tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// Where the release tarballs' binaries (Firecracker, the jailer) are
/// usually put, and which a daemon started by an init system may not have
/// in its PATH.
pub(crate) const RELEASE_BIN_DIR: &str = "/usr/local/bin";

/// Finds a binary: a path with a directory as given, else in PATH, else in
/// `extra` directories (in order).
pub(crate) fn which(bin: &Path, extra: &[&str]) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return bin.is_file().then(|| bin.to_path_buf());
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(extra.iter().map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(bin)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_takes_a_path_as_given_and_searches_extra_dirs_after_path() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("hf-which-test");
        std::fs::write(&bin, b"").unwrap();
        assert_eq!(which(&bin, &[]), Some(bin.clone()));
        assert_eq!(which(&dir.path().join("absent"), &[]), None);
        let extra = dir.path().to_str().unwrap();
        assert_eq!(which(Path::new("hf-which-test"), &[extra]), Some(bin));
        assert_eq!(which(Path::new("hf-which-test"), &[]), None);
    }
}

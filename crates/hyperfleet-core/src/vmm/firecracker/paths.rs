//! Where a machine's Firecracker files are (the module docs of
//! `vmm::firecracker` list them), and removing what a VMM that is gone left.

use std::path::PathBuf;

use super::{jailer, FirecrackerVmm};
use crate::vmm::{remove_file_if_present, MachinePaths, VmmError};

impl FirecrackerVmm {
    /// The API socket.
    pub(crate) fn api_socket(paths: &MachinePaths) -> PathBuf {
        paths.dir.join("fc.sock")
    }

    /// The host side of the guest's vsock device.
    pub(crate) fn vsock_socket(paths: &MachinePaths) -> PathBuf {
        paths.dir.join("vsock.sock")
    }

    pub(crate) fn disk(paths: &MachinePaths) -> PathBuf {
        paths.dir.join("disk.ext4")
    }

    pub(super) fn log_file(paths: &MachinePaths) -> PathBuf {
        paths.dir.join("fc.log")
    }

    pub(super) fn metrics_file(paths: &MachinePaths) -> PathBuf {
        paths.dir.join("fc.metrics")
    }

    pub(crate) fn state_file(paths: &MachinePaths) -> PathBuf {
        paths.snapshot_dir().join("vm.state")
    }

    pub(crate) fn mem_file(paths: &MachinePaths) -> PathBuf {
        paths.snapshot_dir().join("mem")
    }

    /// A diff snapshot's memory layer, not yet merged onto `mem_file`.
    pub(crate) fn layer_file(paths: &MachinePaths) -> PathBuf {
        paths.snapshot_dir().join("mem.diff")
    }

    /// A hard link to the memory file the running VMM was restored from (and
    /// maps): the base of its next diff snapshot.
    pub(crate) fn base_file(paths: &MachinePaths) -> PathBuf {
        paths.dir.join("mem.base")
    }

    /// Removes the sockets of a process that is gone.
    pub(super) fn remove_sockets(paths: &MachinePaths) -> Result<(), VmmError> {
        remove_file_if_present(&Self::api_socket(paths))?;
        remove_file_if_present(&Self::vsock_socket(paths))
    }

    /// Removes what a VMM that is gone leaves on the host: its sockets, its
    /// link to the memory file it was restored from, and its jail and
    /// cgroups if it ran jailed (whether or not the jailer is on now).
    pub(super) fn remove_leftovers(&self, paths: &MachinePaths, id: &str) -> Result<(), VmmError> {
        Self::remove_sockets(paths)?;
        remove_file_if_present(&Self::base_file(paths))?;
        jailer::remove_jail(paths)?;
        self.cgroups.remove(id)
    }
}

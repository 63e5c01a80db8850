//! Facts about the guest reported in `Ready`/`HelloReply`: uname, uptime, boot id.

use hyperfleet_agent_proto::{AgentInfo, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

pub(crate) struct Uname {
    pub nodename: String,
    pub release: String,
    pub version: String,
    pub machine: String,
}

pub(crate) fn uname() -> Uname {
    // SAFETY: utsname is plain old data; all-zero is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes into the struct we own; it only fails with EFAULT on a bad pointer.
    unsafe { libc::uname(&mut u) };
    fn s(f: &[libc::c_char]) -> String {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    Uname {
        nodename: s(&u.nodename),
        release: s(&u.release),
        version: s(&u.version),
        machine: s(&u.machine),
    }
}

/// Time since boot (`CLOCK_BOOTTIME`, which counts suspended time like `/proc/uptime`).
pub(crate) fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

pub(crate) fn agent_info(pid1: bool) -> AgentInfo {
    let u = uname();
    AgentInfo {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        min_protocol_version: MIN_PROTOCOL_VERSION,
        max_protocol_version: PROTOCOL_VERSION,
        kernel_release: u.release,
        kernel_version: u.version,
        machine: u.machine,
        hostname: u.nodename,
        uptime_ms: uptime_ms(),
        pid1,
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string()),
    }
}

//! What a tenant and the host can hold: the pure admission checks for
//! tenant quotas (at create) and host memory (when a machine is to get a
//! VMM: start, restart of a stopped or failed machine, resume of a
//! suspended one). The supervisor calls them inside the store's write
//! transaction with figures read in that same transaction, so two
//! concurrent requests cannot both pass on the same headroom.

use hyperfleet_api::{QuotaLimits, QuotaUsage};

use super::plan::failure_current;
use super::table::Desired;
use crate::store::MachineRecord;

/// Server-wide admission settings (`--default-quota-*`,
/// `--memory-overcommit`, `--memory-reserve-mib`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionConfig {
    /// The quota of tenants without one of their own.
    pub default_quota: QuotaLimits,
    /// Guest memory the host may promise, as a multiple of its MemTotal
    /// (> 0; 1.0 promises no more than the host has).
    pub memory_overcommit: f64,
    /// Memory kept for the host itself (the daemon, VMM overhead, caches).
    pub memory_reserve_mib: u64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            default_quota: QuotaLimits::default(),
            memory_overcommit: 1.0,
            memory_reserve_mib: DEFAULT_MEMORY_RESERVE_MIB,
        }
    }
}

pub const DEFAULT_MEMORY_RESERVE_MIB: u64 = 512;

/// What a new machine asks of its tenant's quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_bytes: u64,
}

/// Why a create was refused: the first limit the new machine would pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "tenant '{tenant}' is at its quota of {limit} {what}: it holds {used} and this machine asks \
     for {asked} more (an admin changes the quota with PUT /tenants/{tenant}/quota or \
     `hyperfleet quota set`)"
)]
pub struct QuotaDenied {
    pub tenant: String,
    pub what: &'static str,
    pub limit: u64,
    pub used: u64,
    pub asked: u64,
}

/// Admits a new machine asking `ask` for `tenant`, whose machines hold
/// `usage`, under `limits`. Usage already past a limit (the quota was
/// lowered) refuses every machine that adds to it.
pub fn check_quota(
    tenant: &str,
    limits: &QuotaLimits,
    usage: &QuotaUsage,
    ask: Ask,
) -> Result<(), QuotaDenied> {
    let checks = [
        ("machines", limits.max_machines, usage.machines, 1),
        ("vCPUs", limits.max_vcpus, usage.vcpus, ask.vcpus),
        (
            "MiB of memory",
            limits.max_memory_mib,
            usage.memory_mib,
            ask.memory_mib,
        ),
        (
            "bytes of disk",
            limits.max_disk_bytes,
            usage.disk_bytes,
            ask.disk_bytes,
        ),
    ];
    for (what, limit, used, asked) in checks {
        let Some(limit) = limit else { continue };
        if used.saturating_add(asked) > limit {
            return Err(QuotaDenied {
                tenant: tenant.to_string(),
                what,
                limit,
                used,
                asked,
            });
        }
    }
    Ok(())
}

/// How much guest memory the host allows in all: MemTotal × overcommit −
/// reserve (never below zero).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryBudget {
    pub host_total_mib: u64,
    pub overcommit: f64,
    pub reserve_mib: u64,
}

impl MemoryBudget {
    pub fn allowed_mib(&self) -> u64 {
        let promised = (self.host_total_mib as f64 * self.overcommit).floor();
        // `as` saturates: a huge overcommit is "effectively unlimited".
        (promised as u64).saturating_sub(self.reserve_mib)
    }
}

/// Why a machine may not get a VMM now.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "the host cannot hold this machine's {asked_mib} MiB of memory: machines that run or are \
     starting hold {committed_mib} MiB, and the host allows {allowed_mib} MiB for guests \
     (MemTotal {host_mib} MiB × --memory-overcommit {overcommit} − --memory-reserve-mib \
     {reserve_mib}); stop other machines, or raise --memory-overcommit \
     (HYPERFLEET_MEMORY_OVERCOMMIT)",
    host_mib = budget.host_total_mib,
    overcommit = budget.overcommit,
    reserve_mib = budget.reserve_mib,
    allowed_mib = budget.allowed_mib()
)]
pub struct CapacityDenied {
    pub asked_mib: u64,
    pub committed_mib: u64,
    pub budget: MemoryBudget,
}

/// Admits a machine of `asked_mib` besides the `committed_mib` that
/// machines already holding memory ask for.
pub fn check_memory(
    budget: &MemoryBudget,
    committed_mib: u64,
    asked_mib: u64,
) -> Result<(), CapacityDenied> {
    if committed_mib.saturating_add(asked_mib) <= budget.allowed_mib() {
        return Ok(());
    }
    Err(CapacityDenied {
        asked_mib,
        committed_mib,
        budget: *budget,
    })
}

/// Whether machine `rec` holds host memory: its VMM is recorded, or one is
/// wanted and no current failure stopped it. Must say what
/// `store::quota::HOLDS_MEMORY` says in SQL (a test checks both).
pub fn holds_memory(rec: &MachineRecord) -> bool {
    rec.vmm.is_some()
        || (matches!(rec.desired, Desired::Running | Desired::Paused) && !failure_current(rec))
}

/// `MemTotal` in MiB from the text of `/proc/meminfo`.
pub fn parse_mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(n / 1024),
        Some(_) => None,
    }
}

/// The host's memory in MiB, or `None` when /proc/meminfo cannot tell.
pub fn host_memory_mib() -> Option<u64> {
    parse_mem_total_mib(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::test_machine;
    use crate::store::VmmIdentity;
    use hyperfleet_api::MachineStatus as S;

    const ASK: Ask = Ask {
        vcpus: 2,
        memory_mib: 1024,
        disk_bytes: 100,
    };

    fn usage(machines: u64, vcpus: u64, memory_mib: u64, disk_bytes: u64) -> QuotaUsage {
        QuotaUsage {
            machines,
            vcpus,
            memory_mib,
            disk_bytes,
        }
    }

    #[test]
    fn no_limits_admit_anything() {
        let u = usage(u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(check_quota("t", &QuotaLimits::default(), &u, ASK), Ok(()));
    }

    #[test]
    fn each_limit_is_reached_exactly_and_not_passed() {
        let at = |l: QuotaLimits, u: QuotaUsage| check_quota("t", &l, &u, ASK);
        let machines = QuotaLimits {
            max_machines: Some(3),
            ..Default::default()
        };
        assert_eq!(at(machines, usage(2, 0, 0, 0)), Ok(()));
        let e = at(machines, usage(3, 0, 0, 0)).unwrap_err();
        assert_eq!((e.what, e.limit, e.used, e.asked), ("machines", 3, 3, 1));
        let vcpus = QuotaLimits {
            max_vcpus: Some(4),
            ..Default::default()
        };
        assert_eq!(at(vcpus, usage(1, 2, 0, 0)), Ok(()));
        let e = at(vcpus, usage(1, 3, 0, 0)).unwrap_err();
        assert_eq!((e.what, e.limit, e.used, e.asked), ("vCPUs", 4, 3, 2));
        let mem = QuotaLimits {
            max_memory_mib: Some(2048),
            ..Default::default()
        };
        assert_eq!(at(mem, usage(1, 0, 1024, 0)), Ok(()));
        assert_eq!(
            at(mem, usage(1, 0, 1025, 0)).unwrap_err().what,
            "MiB of memory"
        );
        let disk = QuotaLimits {
            max_disk_bytes: Some(200),
            ..Default::default()
        };
        assert_eq!(at(disk, usage(1, 0, 0, 100)), Ok(()));
        assert_eq!(
            at(disk, usage(1, 0, 0, 101)).unwrap_err().what,
            "bytes of disk"
        );
    }

    #[test]
    fn the_refusal_names_the_limit_the_usage_and_the_request() {
        let l = QuotaLimits {
            max_vcpus: Some(4),
            ..Default::default()
        };
        let msg = check_quota("acme", &l, &usage(2, 3, 0, 0), ASK)
            .unwrap_err()
            .to_string();
        for part in ["'acme'", "quota of 4 vCPUs", "holds 3", "asks for 2"] {
            assert!(msg.contains(part), "{part}: {msg}");
        }
    }

    #[test]
    fn the_budget_is_overcommitted_memory_less_the_reserve() {
        let b = |overcommit, reserve_mib| MemoryBudget {
            host_total_mib: 8192,
            overcommit,
            reserve_mib,
        };
        assert_eq!(b(1.0, 512).allowed_mib(), 7680);
        assert_eq!(b(1.5, 0).allowed_mib(), 12288);
        assert_eq!(b(0.01, 512).allowed_mib(), 0);
        assert_eq!(b(1e30, 512).allowed_mib(), u64::MAX - 512);
    }

    #[test]
    fn memory_is_admitted_up_to_the_budget() {
        let budget = MemoryBudget {
            host_total_mib: 4096,
            overcommit: 1.0,
            reserve_mib: 1024,
        };
        assert_eq!(check_memory(&budget, 2048, 1024), Ok(()));
        let e = check_memory(&budget, 2048, 1025).unwrap_err();
        let msg = e.to_string();
        for part in [
            "1025 MiB",
            "hold 2048 MiB",
            "allows 3072 MiB",
            "--memory-overcommit 1",
        ] {
            assert!(msg.contains(part), "{part}: {msg}");
        }
    }

    #[test]
    fn machines_hold_memory_while_a_vmm_runs_or_is_wanted() {
        let vmm = VmmIdentity {
            pid: 1,
            start_time: 1,
            boot_id: "b".into(),
        };
        assert!(!holds_memory(&test_machine(S::Stopped, Desired::Stopped)));
        assert!(!holds_memory(&test_machine(
            S::Suspended,
            Desired::Suspended
        )));
        // Being started, or resumed from a suspension: already counted.
        assert!(holds_memory(&test_machine(S::Stopped, Desired::Running)));
        assert!(holds_memory(&test_machine(S::Suspended, Desired::Running)));
        assert!(holds_memory(&test_machine(S::Pending, Desired::Running)));
        // A VMM still there while it stops: still counted.
        let mut stopping = test_machine(S::Stopping, Desired::Stopped);
        stopping.vmm = Some(vmm);
        assert!(holds_memory(&stopping));
        // A start that failed holds nothing until the next request.
        let mut failed = test_machine(S::Failed, Desired::Running);
        failed.failed_generation = Some(failed.generation);
        assert!(!holds_memory(&failed));
        failed.generation += 1;
        assert!(holds_memory(&failed));
    }

    #[test]
    fn mem_total_is_read_from_meminfo() {
        let text = "MemTotal:        2014672 kB\nMemFree:          123 kB\n";
        assert_eq!(parse_mem_total_mib(text), Some(1967));
        assert_eq!(parse_mem_total_mib("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total_mib("MemTotal: x kB\n"), None);
    }
}

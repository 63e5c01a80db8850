//! Tenant quotas: what a tenant may hold (machines, vCPUs, memory, disk) and
//! what it holds now.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A tenant's limits; each one absent or `null` is unlimited. `PUT`
/// replaces all four at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimits {
    /// Machines the tenant may have, whatever their status.
    #[serde(default, deserialize_with = "crate::whole::opt")]
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub max_machines: Option<u64>,
    /// Sum of `vcpu_count` over the tenant's machines.
    #[serde(default, deserialize_with = "crate::whole::opt")]
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub max_vcpus: Option<u64>,
    /// Sum of `mem_size_mib` over the tenant's machines.
    #[serde(default, deserialize_with = "crate::whole::opt")]
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub max_memory_mib: Option<u64>,
    /// Sum of the machines' disk sizes (the size of the guest image each
    /// disk was made from, recorded at create time).
    #[serde(default, deserialize_with = "crate::whole::opt")]
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub max_disk_bytes: Option<u64>,
}

impl QuotaLimits {
    /// No limit at all.
    pub fn is_unlimited(&self) -> bool {
        *self == QuotaLimits::default()
    }
}

/// What a tenant's machines hold now, counted over all of them (stopped
/// ones too), in the units of [`QuotaLimits`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QuotaUsage {
    pub machines: u64,
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_bytes: u64,
}

/// `GET`/`PUT /tenants/{tenant}/quota`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Quota {
    pub tenant: String,
    /// The limits in force for the tenant.
    pub limits: QuotaLimits,
    /// True when the tenant has no quota of its own and the server's
    /// defaults (`--default-quota-*`) apply.
    pub default: bool,
    pub usage: QuotaUsage,
}

#[cfg(test)]
mod tests {
    use super::QuotaLimits;

    /// JSON Schema counts `2.0` as an integer, so the server must too (the
    /// schema fuzzer sends such values); fractions and negatives stay refused.
    #[test]
    fn limits_accept_whole_floats_only() {
        let l: QuotaLimits =
            serde_json::from_str(r#"{"max_vcpus": 1256336.0, "max_machines": null}"#)
                .expect("a whole float is an integer");
        assert_eq!(l.max_vcpus, Some(1_256_336));
        assert_eq!(l.max_machines, None);
        // Large whole floats parse exactly (serde_json's float_roundtrip).
        let l: QuotaLimits = serde_json::from_str(r#"{"max_memory_mib": 2251799813685247.0}"#)
            .expect("a large whole float is an integer");
        assert_eq!(l.max_memory_mib, Some(2_251_799_813_685_247));
        for bad in [r#"{"max_vcpus": 2.5}"#, r#"{"max_disk_bytes": -1}"#] {
            serde_json::from_str::<QuotaLimits>(bad).expect_err(bad);
        }
    }
}

//! How many guest requests (exec, files, logs) the daemon serves at once: a slot per
//! request, from the tenant's own pool and from the daemon-wide one. Each request can make
//! the daemon buffer up to the JSON cap (twice over while encoding), so the number of
//! them in flight is what bounds the daemon's memory. Over the limit a request is refused at
//! once with `429 TOO_MANY_REQUESTS` rather than queued: a queue would itself grow without
//! bound, and a client can retry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hyperfleet_api::ErrorCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use super::super::error::ApiError;

/// How much the daemon buffers for one guest request and how many it serves
/// at once, so that guests and clients cannot grow its memory at will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestLimits {
    /// The most a JSON-form answer carries: the bytes of a file read as JSON,
    /// and the encoded stdout plus stderr of a buffered exec. Larger output
    /// goes through the streaming forms.
    pub json_max_bytes: usize,
    /// Guest requests one tenant may have in progress at once.
    pub per_tenant: usize,
    /// Guest requests in progress at once, all tenants together.
    pub total: usize,
}

impl Default for GuestLimits {
    fn default() -> Self {
        GuestLimits {
            json_max_bytes: 16 << 20,
            per_tenant: 8,
            total: 32,
        }
    }
}

/// Tenants with no request in flight are forgotten once the table holds this many.
const FORGET_IDLE_AFTER: usize = 1024;

/// The guest-request slots of one daemon.
pub struct GuestSlots {
    limits: GuestLimits,
    total: Arc<Semaphore>,
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// One request's slot; released when dropped (with the response body that holds it).
pub struct Slot {
    _tenant: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
    /// Keeps the machine from idling while the request lasts.
    _active: Option<crate::lifecycle::idle::KeepActive>,
}

impl Slot {
    /// Counts the request as activity of its machine for as long as the
    /// slot is held (an open exec session, a long stream).
    pub fn keep_active(&mut self, keep: crate::lifecycle::idle::KeepActive) {
        self._active = Some(keep);
    }
}

impl GuestSlots {
    pub fn new(limits: GuestLimits) -> GuestSlots {
        GuestSlots {
            limits,
            total: Arc::new(Semaphore::new(limits.total)),
            tenants: Mutex::new(HashMap::new()),
        }
    }

    pub fn limits(&self) -> GuestLimits {
        self.limits
    }

    /// A slot for one request of `tenant`, or 429 when the tenant or the daemon is at its
    /// limit.
    pub fn acquire(&self, tenant: &str) -> Result<Slot, ApiError> {
        let sem = {
            // A panic while holding this lock cannot leave the map inconsistent (single
            // lookups and inserts), so a poisoned lock is still usable.
            let mut map = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= FORGET_IDLE_AFTER {
                // A tenant's semaphore is shared with its permits: only the map holds an idle one.
                map.retain(|_, s| Arc::strong_count(s) > 1);
            }
            map.entry(tenant.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.limits.per_tenant)))
                .clone()
        };
        let tenant_permit = sem.try_acquire_owned().map_err(|e| {
            busy(
                e,
                format!(
                    "tenant '{tenant}' already has {} guest requests (exec, files, logs) in \
                     progress, the most allowed (--guest-requests-per-tenant); retry when one \
                     has finished",
                    self.limits.per_tenant
                ),
            )
        })?;
        let total_permit = self.total.clone().try_acquire_owned().map_err(|e| {
            busy(
                e,
                format!(
                    "the server already has {} guest requests (exec, files, logs) in progress, \
                     the most allowed (--guest-requests-total); retry shortly",
                    self.limits.total
                ),
            )
        })?;
        Ok(Slot {
            _tenant: tenant_permit,
            _total: total_permit,
            _active: None,
        })
    }
}

fn busy(e: TryAcquireError, message: String) -> ApiError {
    match e {
        TryAcquireError::NoPermits => ApiError::new(ErrorCode::TooManyRequests, message),
        // The semaphores are never closed; should one be, say so rather than pretend.
        TryAcquireError::Closed => ApiError::new(
            ErrorCode::Unavailable,
            "guest requests are no longer accepted (the server is shutting down)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(per_tenant: usize, total: usize) -> GuestSlots {
        GuestSlots::new(GuestLimits {
            json_max_bytes: 1 << 20,
            per_tenant,
            total,
        })
    }

    #[test]
    fn a_tenant_cannot_hold_more_than_its_slots_and_gets_them_back() {
        let s = slots(2, 10);
        let a = s.acquire("t").unwrap();
        let _b = s.acquire("t").unwrap();
        let e = s.acquire("t").err().unwrap();
        assert_eq!(e.code, ErrorCode::TooManyRequests);
        assert!(
            e.message.contains("--guest-requests-per-tenant"),
            "{}",
            e.message
        );
        // Another tenant is not affected.
        let _c = s.acquire("u").unwrap();
        drop(a);
        s.acquire("t").unwrap();
    }

    #[test]
    fn the_daemon_wide_limit_holds_across_tenants() {
        let s = slots(5, 2);
        let _a = s.acquire("t").unwrap();
        let _b = s.acquire("u").unwrap();
        let e = s.acquire("v").err().unwrap();
        assert_eq!(e.code, ErrorCode::TooManyRequests);
        assert!(
            e.message.contains("--guest-requests-total"),
            "{}",
            e.message
        );
        // The refused request gave its tenant slot back.
        drop(_a);
        s.acquire("v").unwrap();
    }

    #[test]
    fn idle_tenants_are_forgotten_busy_ones_kept() {
        let s = slots(1, 4096);
        let held = s.acquire("busy").unwrap();
        for i in 0..FORGET_IDLE_AFTER + 1 {
            drop(s.acquire(&format!("t{i}")).unwrap());
        }
        let n = s.tenants.lock().unwrap().len();
        assert!(n < FORGET_IDLE_AFTER, "{n}");
        assert!(
            s.acquire("busy").is_err(),
            "the busy tenant's slot is still counted"
        );
        drop(held);
    }
}

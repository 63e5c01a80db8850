//! Crash points at every step boundary of the machine run.
//!
//! Built with the `failpoints` feature, setting
//! `HYPERFLEET_CRASH_AT=<point>[,<point>…]` makes the daemon SIGKILL itself
//! the first time it reaches that point: a real kill, with no destructors,
//! flushes or cleanup, exactly like the OOM killer or a power cut of the
//! daemon alone. The crash tests run every point in [`CRASH_POINTS`] in turn
//! and check that a restarted daemon converges with nothing leaked or done
//! twice. Without the feature, [`hit`] compiles to nothing.

/// Every crash point, in the order a machine's life reaches them.
pub const CRASH_POINTS: &[&str] = &[
    "prepare.before_effect",
    "prepare.after_effect",
    "spawn.after_intent",
    "jail.after_uid",
    "network.after_lease",
    "network.after_tap",
    "spawn.after_effect",
    "spawn.after_commit",
    "ready.after_effect",
    "pause.after_intent",
    "pause.after_effect",
    "resume.after_intent",
    "resume.after_effect",
    "stop.after_intent",
    "stop.after_effect",
    "suspend.after_intent",
    "suspend.after_save",
    "suspend.after_effect",
    "snapshot.after_intent",
    "snapshot.after_copy",
    "snapshot.after_effect",
    "release.after_intent",
    "release.after_effect",
];

/// The crash points only a backend that runs each machine's VMM as a uid
/// of its own (jailed Firecracker) reaches.
pub const JAILED_CRASH_POINTS: &[&str] = &["jail.after_uid"];

/// Passes a crash point.
#[inline]
pub fn hit(point: &'static str) {
    debug_assert!(
        CRASH_POINTS.contains(&point),
        "unlisted crash point {point}"
    );
    fail::fail_point!(point);
}

/// Arms the points named in `HYPERFLEET_CRASH_AT`. Returns the armed names.
#[cfg(feature = "failpoints")]
pub fn arm_from_env() -> Vec<String> {
    let Ok(spec) = std::env::var("HYPERFLEET_CRASH_AT") else {
        return Vec::new();
    };
    let mut armed = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let point = name.to_string();
        let label = point.clone();
        let result = fail::cfg_callback(point, move || {
            tracing::warn!(point = %label, "crash point reached: SIGKILL");
            // SAFETY: kill(2) on our own pid with SIGKILL has no memory-safety
            // preconditions; the process ends here.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        });
        match result {
            Ok(()) => armed.push(name.to_string()),
            Err(e) => tracing::error!(point = name, error = %e, "cannot arm crash point"),
        }
    }
    armed
}

#[cfg(not(feature = "failpoints"))]
pub fn arm_from_env() -> Vec<String> {
    if std::env::var_os("HYPERFLEET_CRASH_AT").is_some() {
        tracing::warn!(
            "HYPERFLEET_CRASH_AT is set but this build has no crash points (build with --features failpoints)"
        );
    }
    Vec::new()
}

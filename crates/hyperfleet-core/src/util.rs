//! Small shared helpers: wall-clock time in the store's unit, RFC 3339
//! rendering, random identifiers, error chains on one line, and removal
//! that treats "already gone" as done.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch: the store's unit for timestamps.
pub(crate) fn now_ms() -> i64 {
    // A clock before 1970 is a broken host; 0 keeps ordering sane there.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Renders a store timestamp as RFC 3339 with milliseconds (UTC).
pub(crate) fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// `n` random bytes from the OS.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // getrandom only fails when the OS has no entropy source at all, which
    // no supported Linux host lacks; there is nothing sensible to continue with.
    getrandom::fill(&mut buf).expect("the OS random number generator failed");
    buf
}

const ID_ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// A random lowercase identifier of `len` characters (5 bits each) after `prefix`.
pub(crate) fn random_id(prefix: &str, len: usize) -> String {
    let bytes = random_bytes::<32>();
    let mut s = String::with_capacity(prefix.len() + len);
    s.push_str(prefix);
    for b in bytes.iter().take(len) {
        s.push(ID_ALPHABET[(*b & 31) as usize] as char);
    }
    s
}

/// Machine ids: `m`, then 8 characters of creation time (milliseconds, 40
/// bits), then 7 random characters (35 bits). The alphabet is in ASCII
/// order, so ids sort by creation time: inserts land at the right edge of
/// every index keyed by machine id, which keeps each commit's page writes
/// few. Names may not have this shape, so `GET /machines/{id-or-name}` is
/// never ambiguous.
pub(crate) fn new_machine_id() -> String {
    new_id('m')
}

/// Snapshot ids: like machine ids, with an `s`.
pub(crate) fn new_snapshot_id() -> String {
    new_id('s')
}

/// `kind` followed by 8 characters of creation time (so ids sort by age)
/// and 7 random ones.
fn new_id(kind: char) -> String {
    let ms = now_ms().max(0) as u64;
    let mut s = String::with_capacity(16);
    s.push(kind);
    for i in (0..8).rev() {
        s.push(ID_ALPHABET[((ms >> (i * 5)) & 31) as usize] as char);
    }
    s.push_str(&random_id("", 7));
    s
}

pub(crate) fn looks_like_machine_id(s: &str) -> bool {
    looks_like_id(s, 'm')
}

/// Whether `s` has the shape of an id of `kind` (see [`new_id`]).
pub(crate) fn looks_like_id(s: &str, kind: char) -> bool {
    s.len() == 16 && s.starts_with(kind) && s[1..].bytes().all(|b| ID_ALPHABET.contains(&b))
}

/// Operation ids name one accepted request in events and logs.
pub(crate) fn new_operation_id() -> String {
    random_id("op_", 12)
}

/// An error and its causes on one line (`a: b: c`), for messages and logs;
/// a cause whose text the line already holds is not repeated.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        let text = err.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = err.source();
    }
    s
}

/// The result of removing something, with "it was not there" counted as
/// removed: removals are idempotent.
pub(crate) fn absent_ok(removed: std::io::Result<()>) -> std::io::Result<()> {
    match removed {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Says yes at most once per period: for a warning about a condition that
/// can repeat many times a second (a flood of connections, descriptors
/// running out), so it does not become a flood of log lines.
pub(crate) struct AtMostEvery {
    period: Duration,
    last: Option<std::time::Instant>,
}

impl AtMostEvery {
    pub(crate) const fn new(period: Duration) -> AtMostEvery {
        AtMostEvery { period, last: None }
    }

    /// Whether it is time again (and, if so, counts this as the time).
    pub(crate) fn due(&mut self) -> bool {
        let now = std::time::Instant::now();
        let due = self
            .last
            .is_none_or(|t| now.duration_since(t) >= self.period);
        if due {
            self.last = Some(now);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_every_says_yes_once_per_period() {
        let mut w = AtMostEvery::new(Duration::from_millis(50));
        assert!(w.due(), "the first time");
        assert!(!w.due(), "again at once");
        std::thread::sleep(Duration::from_millis(60));
        assert!(w.due(), "after the period");
    }

    #[test]
    fn machine_ids_have_their_shape() {
        for _ in 0..100 {
            let id = new_machine_id();
            assert!(looks_like_machine_id(&id), "{id}");
        }
        assert!(!looks_like_machine_id("web-1"));
        assert!(!looks_like_machine_id("mABCDEFGHIJKLMNO"));
    }

    #[test]
    fn machine_ids_sort_by_creation_time() {
        let a = new_machine_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_machine_id();
        assert!(a < b, "{a} < {b}");
        assert_ne!(new_machine_id(), new_machine_id());
    }

    #[test]
    fn error_chains_name_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("reading the state")]
        struct Outer(#[source] std::io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("the guest failed: {0}")]
        struct Repeats(#[source] std::io::Error);
        let io = || std::io::Error::other("disk on fire");
        assert_eq!(error_chain(&Outer(io())), "reading the state: disk on fire");
        assert_eq!(
            error_chain(&Repeats(io())),
            "the guest failed: disk on fire"
        );
    }

    #[test]
    fn removing_what_is_absent_succeeds_and_other_failures_stay() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        absent_ok(std::fs::remove_file(&gone)).expect("an absent file counts as removed");
        // A directory is not a file: that failure is kept.
        assert!(absent_ok(std::fs::remove_file(dir.path())).is_err());
    }

    #[test]
    fn rfc3339_renders_utc_millis() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_500), "1970-01-01T00:00:01.500Z");
    }
}

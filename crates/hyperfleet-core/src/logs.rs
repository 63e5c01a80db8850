//! Console logs: reading the tail, following new output, and rotation.
//!
//! VMMs write the serial console straight to `<machine>/console.log` in
//! append mode (they outlive the daemon, so the daemon cannot sit in the
//! middle). Rotation is therefore copy-then-truncate: when the file passes
//! [`ROTATE_AT`], its content moves to `console.log.1` and the file is
//! truncated; the VMM's next append lands at the new end. Followers notice
//! the shrink and start again from the beginning.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Rotate a console log once it is larger than this.
pub const ROTATE_AT: u64 = 8 << 20;

/// The last `lines` lines of `file` and the file's length (where a follower
/// continues). A missing file is empty.
pub async fn tail(file: &Path, lines: usize) -> std::io::Result<(String, u64)> {
    let mut f = match tokio::fs::File::open(file).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), 0)),
        Err(e) => return Err(e),
    };
    let len = f.metadata().await?.len();
    // Console lines are short; read at most the last 4 MiB.
    let start = len.saturating_sub(4 << 20);
    f.seek(SeekFrom::Start(start)).await?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.split_inclusive('\n').collect();
    let keep = all.len().saturating_sub(lines);
    Ok((all[keep..].concat(), start + buf.len() as u64))
}

/// New content of `file` from `offset` on, polled every 200 ms, until
/// `alive()` turns false.
pub fn follow(
    file: PathBuf,
    offset: u64,
    alive: impl Fn() -> bool + Send + 'static,
) -> impl Stream<Item = Bytes> + Send {
    futures_util::stream::unfold(
        (file, offset, alive),
        |(file, mut offset, alive)| async move {
            loop {
                if !alive() {
                    return None;
                }
                let len = tokio::fs::metadata(&file)
                    .await
                    .map(|m| m.len())
                    .unwrap_or(0);
                if len < offset {
                    // Rotated or truncated: start from the top of the new file.
                    offset = 0;
                }
                if len > offset {
                    if let Ok(mut f) = tokio::fs::File::open(&file).await {
                        let want = (len - offset).min(64 << 10) as usize;
                        let mut buf = vec![0u8; want];
                        if f.seek(SeekFrom::Start(offset)).await.is_ok() {
                            if let Ok(n) = f.read(&mut buf).await {
                                if n > 0 {
                                    buf.truncate(n);
                                    offset += n as u64;
                                    return Some((Bytes::from(buf), (file, offset, alive)));
                                }
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    )
}

/// Rotates every machine's console log that passed [`ROTATE_AT`].
pub fn rotate_all(machines_dir: &Path) -> usize {
    let mut rotated = 0;
    let Ok(entries) = std::fs::read_dir(machines_dir) else {
        return 0;
    };
    for e in entries.flatten() {
        let log = e.path().join("console.log");
        match rotate(&log, ROTATE_AT) {
            Ok(true) => rotated += 1,
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(file = %log.display(), error = %err, "console log rotation failed")
            }
        }
    }
    rotated
}

/// Copy-then-truncate rotation of one file; true when it rotated.
pub fn rotate(log: &Path, limit: u64) -> std::io::Result<bool> {
    let len = match std::fs::metadata(log) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= limit {
        return Ok(false);
    }
    let old = log.with_extension("log.1");
    std::fs::copy(log, &old)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::io::Write;

    #[tokio::test]
    async fn tail_takes_the_last_lines() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("console.log");
        assert_eq!(tail(&f, 5).await.unwrap(), (String::new(), 0));
        std::fs::write(&f, "a\nb\nc\nd\n").unwrap();
        let (t, off) = tail(&f, 2).await.unwrap();
        assert_eq!((t.as_str(), off), ("c\nd\n", 8));
    }

    #[tokio::test]
    async fn follow_sees_appends_and_survives_rotation() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("console.log");
        std::fs::write(&f, "old\n").unwrap();
        let s = follow(f.clone(), 4, || true);
        futures_util::pin_mut!(s);
        let mut w = std::fs::OpenOptions::new().append(true).open(&f).unwrap();
        w.write_all(b"new line\n").unwrap();
        assert_eq!(s.next().await.unwrap(), Bytes::from_static(b"new line\n"));
        assert!(rotate(&f, 4).unwrap());
        assert_eq!(
            std::fs::read_to_string(d.path().join("console.log.1")).unwrap(),
            "old\nnew line\n"
        );
        w.write_all(b"after\n").unwrap();
        // The writer kept its append-mode descriptor: its next write lands at
        // the new end of the truncated file, and the follower starts over.
        assert_eq!(s.next().await.unwrap(), Bytes::from_static(b"after\n"));
    }
}

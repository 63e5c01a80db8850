//! File operations: streamed upload/download, stat, list, remove, mkdir.
//!
//! Uploads and downloads move one chunk at a time under flow control, so memory stays bounded
//! by the credit window whatever the file size. Paths are used as given (absolute paths are
//! expected; relative ones resolve against the agent's working directory, `/` as PID 1).

use std::fs::Metadata;
use std::io::SeekFrom;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::UNIX_EPOCH;

use bytes::BytesMut;
use hyperfleet_agent_proto::{
    DirEntry, ErrorCode, Event, FileKind, FileStat, Kind, ReadFileRequest, RemoteError, Reply,
    Request, WriteFileRequest, CHUNK_SIZE,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::session::{Op, OpIn};

/// Directory entries per `Entries` event.
const LIST_BATCH: usize = 256;

pub(super) async fn run(op: &mut Op, req: Request) -> Result<Reply, RemoteError> {
    match req {
        Request::WriteFile(r) => write_file(op, r).await,
        Request::ReadFile(r) => read_file(op, r).await,
        Request::Stat(r) => {
            let p = Path::new(&r.path);
            let m = if r.no_follow {
                tokio::fs::symlink_metadata(p).await
            } else {
                tokio::fs::metadata(p).await
            }
            .map_err(|e| RemoteError::io(&r.path, &e))?;
            let symlink_target = if m.file_type().is_symlink() {
                tokio::fs::read_link(p)
                    .await
                    .ok()
                    .map(|t| t.to_string_lossy().into_owned())
            } else {
                None
            };
            Ok(Reply::Stat(FileStat {
                kind: kind_of(&m),
                size: m.len(),
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                mtime_ms: mtime_ms(&m),
                symlink_target,
            }))
        }
        Request::ListDir(r) => {
            let mut rd = tokio::fs::read_dir(&r.path)
                .await
                .map_err(|e| RemoteError::io(&r.path, &e))?;
            let mut batch = Vec::with_capacity(LIST_BATCH);
            let mut count = 0u64;
            while let Some(ent) = rd
                .next_entry()
                .await
                .map_err(|e| RemoteError::io(&r.path, &e))?
            {
                // An entry removed between readdir and lstat is simply skipped.
                let Ok(m) = tokio::fs::symlink_metadata(ent.path()).await else {
                    continue;
                };
                batch.push(DirEntry {
                    name: ent.file_name().to_string_lossy().into_owned(),
                    kind: kind_of(&m),
                    size: m.len(),
                    mode: m.mode() & 0o7777,
                    mtime_ms: mtime_ms(&m),
                });
                count += 1;
                if batch.len() == LIST_BATCH {
                    op.io.event(&Event::Entries {
                        entries: std::mem::take(&mut batch),
                    });
                }
            }
            if !batch.is_empty() {
                op.io.event(&Event::Entries { entries: batch });
            }
            Ok(Reply::Listed { count })
        }
        Request::Remove(r) => {
            let m = tokio::fs::symlink_metadata(&r.path)
                .await
                .map_err(|e| RemoteError::io(&r.path, &e))?;
            let res = if m.is_dir() {
                if r.recursive {
                    tokio::fs::remove_dir_all(&r.path).await
                } else {
                    tokio::fs::remove_dir(&r.path).await
                }
            } else {
                tokio::fs::remove_file(&r.path).await
            };
            res.map_err(|e| RemoteError::io(&r.path, &e))?;
            Ok(Reply::Removed)
        }
        Request::Mkdir(r) => {
            let mut b = tokio::fs::DirBuilder::new();
            b.recursive(r.parents);
            if let Some(mode) = r.mode {
                b.mode(mode);
            }
            b.create(&r.path)
                .await
                .map_err(|e| RemoteError::io(&r.path, &e))?;
            if let Some(mode) = r.mode {
                // The creation mode is filtered by the umask; set exactly what was asked.
                tokio::fs::set_permissions(&r.path, std::fs::Permissions::from_mode(mode))
                    .await
                    .map_err(|e| RemoteError::io(&r.path, &e))?;
            }
            Ok(Reply::Created)
        }
        Request::Ping
        | Request::Exec(_)
        | Request::Power(_)
        | Request::Refresh(_)
        | Request::StartMain(_) => Err(RemoteError::new(
            ErrorCode::Unsupported,
            "not a file operation",
        )),
    }
}

async fn write_file(op: &mut Op, r: WriteFileRequest) -> Result<Reply, RemoteError> {
    let path = Path::new(&r.path);
    let o = &r.options;
    if o.create_dirs {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| RemoteError::io(&parent.to_string_lossy(), &e))?;
        }
    }
    let mut oo = std::fs::OpenOptions::new();
    oo.write(true).create(true);
    if o.append {
        oo.append(true);
    } else {
        oo.truncate(true);
    }
    if let Some(mode) = o.mode {
        oo.mode(mode);
    }
    let file = oo.open(path).map_err(|e| RemoteError::io(&r.path, &e))?;
    if let Some(mode) = o.mode {
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| RemoteError::io(&r.path, &e))?;
    }
    let mut file = tokio::fs::File::from_std(file);
    let mut written = 0u64;
    loop {
        match op.inbound.recv().await {
            Some(OpIn::Data(b)) => {
                file.write_all(&b)
                    .await
                    .map_err(|e| RemoteError::io(&r.path, &e))?;
                written += b.len() as u64;
                op.io.grant(b.len());
            }
            Some(OpIn::Eof) => break,
            None => return Err(RemoteError::new(ErrorCode::Cancelled, "cancelled")),
        }
    }
    file.flush()
        .await
        .map_err(|e| RemoteError::io(&r.path, &e))?;
    if o.sync {
        file.sync_all()
            .await
            .map_err(|e| RemoteError::io(&r.path, &e))?;
    }
    Ok(Reply::Written { bytes: written })
}

async fn read_file(op: &mut Op, r: ReadFileRequest) -> Result<Reply, RemoteError> {
    let mut file = tokio::fs::File::open(&r.path)
        .await
        .map_err(|e| RemoteError::io(&r.path, &e))?;
    let m = file
        .metadata()
        .await
        .map_err(|e| RemoteError::io(&r.path, &e))?;
    if m.is_dir() {
        return Err(RemoteError::new(
            ErrorCode::IsADirectory,
            format!("{}: is a directory", r.path),
        ));
    }
    let size = m.len();
    let offset = r.offset.min(size);
    let length = r.length.unwrap_or(u64::MAX).min(size - offset);
    if offset > 0 {
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(|e| RemoteError::io(&r.path, &e))?;
    }
    op.io.event(&Event::Opened {
        size,
        offset,
        length,
    });
    let mut sent = 0u64;
    while sent < length {
        let want = (length - sent).min(CHUNK_SIZE as u64) as usize;
        let mut buf = BytesMut::with_capacity(want);
        let n = (&mut file)
            .take(want as u64)
            .read_buf(&mut buf)
            .await
            .map_err(|e| RemoteError::io(&r.path, &e))?;
        if n == 0 {
            break; // The file shrank; the reply says how much was really sent.
        }
        op.io
            .send_data(Kind::Data, buf.freeze())
            .await
            .map_err(|_| RemoteError::new(ErrorCode::Cancelled, "cancelled"))?;
        sent += n as u64;
    }
    Ok(Reply::Read { bytes: sent })
}

fn kind_of(m: &Metadata) -> FileKind {
    let t = m.file_type();
    if t.is_symlink() {
        FileKind::Symlink
    } else if t.is_dir() {
        FileKind::Dir
    } else if t.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    }
}

fn mtime_ms(m: &Metadata) -> i64 {
    match m.modified() {
        Ok(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_millis() as i64,
            Err(e) => -(e.duration().as_millis() as i64),
        },
        Err(_) => 0,
    }
}

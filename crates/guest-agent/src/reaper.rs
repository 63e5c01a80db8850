//! Child processes: spawning and reaping, with one `waitpid(-1)` loop as the only reaper.
//!
//! As PID 1 the agent inherits every orphan in the guest and must reap them all, which means
//! calling `waitpid(-1)`. That would steal exit statuses from any other waiter, so the agent
//! never uses `Child::wait` or tokio's process support: the reaper reaps everything and hands
//! the status of processes the agent started to whoever registered for it.
//!
//! The race with `std::process::Command::spawn` (which itself calls `waitpid` on a child
//! whose `exec` failed) is closed by a lock: spawns hold it shared, the reaper holds it
//! exclusively around its `waitpid(-1, WNOHANG)` loop, so it never runs in the middle of a
//! spawn, and a child that exits immediately is registered before the reaper looks.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// Raw `wait` status of an exited child.
pub(crate) type WaitStatus = i32;

pub(crate) struct Reaper {
    spawn_lock: RwLock<()>,
    waiters: Mutex<HashMap<i32, oneshot::Sender<WaitStatus>>>,
}

impl Reaper {
    /// Creates the reaper and starts its task. Must be called inside the tokio runtime, before
    /// any child is spawned (so no SIGCHLD is missed; a periodic sweep covers it anyway).
    pub(crate) fn start() -> io::Result<Arc<Reaper>> {
        let r = Arc::new(Reaper {
            spawn_lock: RwLock::new(()),
            waiters: Mutex::new(HashMap::new()),
        });
        let mut sig = signal(SignalKind::child())?;
        let me = r.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = sig.recv() => {}
                    _ = tick.tick() => {}
                }
                me.reap_all();
            }
        });
        Ok(r)
    }

    /// Spawns `cmd` and registers for its exit status.
    pub(crate) fn spawn(
        &self,
        cmd: &mut Command,
    ) -> io::Result<(Child, oneshot::Receiver<WaitStatus>)> {
        // Poisoning only means another spawn panicked; the lock protects no data.
        let _g = self.spawn_lock.read().unwrap_or_else(|p| p.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        self.lock_waiters().insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, HashMap<i32, oneshot::Sender<WaitStatus>>> {
        // Every critical section is one insert or remove: a poisoned map is still consistent.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reaps every exited child; returns how many.
    pub(crate) fn reap_all(&self) -> usize {
        let _g = self.spawn_lock.write().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid with a valid pointer to a local c_int; WNOHANG never blocks.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            n += 1;
            match self.lock_waiters().remove(&pid) {
                Some(tx) => {
                    let _ = tx.send(status);
                }
                None => crate::debug!("reaped orphan pid {pid} (status {status:#x})"),
            }
        }
        n
    }
}

/// `(exit_code, signal)` of a raw wait status.
pub(crate) fn decode_status(status: WaitStatus) -> (Option<i32>, Option<i32>) {
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}

//! Operations the agent performs for the host, one per stream: dispatch by request type.
//! `exec` runs processes, `files` the file operations, `refresh` renews the guest's identity,
//! `main_process` starts the machine's main process.
//!
//! Each operation runs in its own task, gets an [`Op`] (output with flow control, input, a
//! cancellation signal) and returns the final reply or a [`RemoteError`]; the session sends it.

pub(crate) mod exec;
mod files;
pub(crate) mod main_process;
mod refresh;

use std::time::Duration;

use hyperfleet_agent_proto::{ErrorCode, PowerRequest, RemoteError, Reply, Request};

use crate::session::{cancelled, Op, Services};

pub(crate) async fn run(mut op: Op, req: Request, svc: &Services) -> Result<Reply, RemoteError> {
    match req {
        Request::Exec(r) => exec::exec(op, r, &svc.reaper, &svc.execs).await,
        // Not cancellable: its parts are short, and stopping between them would leave a guest
        // with half a new identity. A cancelled stream's answer is dropped by the session.
        Request::Refresh(r) => refresh::refresh(r, svc).await,
        // Not cancellable either: it only starts the process, which outlives the stream.
        Request::StartMain(r) => main_process::start_main(r, svc).await,
        Request::Ping => Ok(Reply::Pong {
            uptime_ms: crate::sysinfo::uptime_ms(),
        }),
        Request::Power(PowerRequest { action }) => {
            // Answer first; main acts after a grace period that lets the answer reach the host.
            let tx = svc.power.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = tx.send(action);
            });
            Ok(Reply::Power)
        }
        other => {
            // File operations are not process-bound: dropping the future on cancel is enough.
            let mut cancel = op.cancel.clone();
            tokio::select! {
                r = files::run(&mut op, other) => r,
                _ = cancelled(&mut cancel) => Err(RemoteError::new(ErrorCode::Cancelled, "cancelled")),
            }
        }
    }
}

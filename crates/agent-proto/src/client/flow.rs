//! One stream of the connection as an operation sees it, and flow control in both directions:
//! the agent → host budget the client grants back as the caller consumes data, and the
//! host → agent credit uploads wait for.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};

use super::{Conn, Inbound};
use crate::error::Error;
use crate::frame::{Frame, Kind, CHUNK_SIZE};

/// The host end of one stream. Dropping it before the final response cancels the operation.
pub(super) struct StreamHandle {
    pub(super) conn: Arc<Conn>,
    pub(super) id: u32,
    pub(super) rx: mpsc::UnboundedReceiver<Inbound>,
    pub(super) send_credit: Arc<Semaphore>,
    pub(super) recv_budget: Arc<AtomicI64>,
    pub(super) done: bool,
}

impl StreamHandle {
    pub(super) async fn recv(&mut self) -> Inbound {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    pub(super) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Inbound> {
        if self.done {
            return Poll::Ready(Inbound::Closed);
        }
        let inb = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(i)) => i,
            Poll::Ready(None) => Inbound::Closed,
        };
        if matches!(inb, Inbound::Response(_) | Inbound::Closed) {
            self.done = true;
        }
        Poll::Ready(inb)
    }

    /// Gives the agent `n` more bytes of credit (the caller consumed that much).
    pub(super) fn grant(&self, n: usize) {
        if n == 0 || self.done {
            return;
        }
        self.recv_budget.fetch_add(n as i64, Ordering::SeqCst);
        // A closed connection is reported by the next recv; nothing to do here.
        let _ = self
            .conn
            .shared
            .send(Frame::credit(self.id, n.min(u32::MAX as usize) as u32));
    }

    pub(super) fn sender(&self) -> DataSender {
        DataSender {
            conn: self.conn.clone(),
            id: self.id,
            credit: self.send_credit.clone(),
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        let removed = self.conn.shared.lock().remove(&self.id).is_some();
        if removed && !self.done {
            let _ = self
                .conn
                .shared
                .send(Frame::new(Kind::Cancel, self.id, Bytes::new()));
        }
    }
}

/// Sends data frames on one stream within the credit the agent granted.
#[derive(Clone)]
pub(super) struct DataSender {
    conn: Arc<Conn>,
    id: u32,
    credit: Arc<Semaphore>,
}

impl DataSender {
    pub(super) async fn send_data(&self, kind: Kind, mut data: Bytes) -> Result<(), Error> {
        while !data.is_empty() {
            let n = data.len().min(CHUNK_SIZE);
            let chunk = data.split_to(n);
            // n <= CHUNK_SIZE fits in u32.
            let permit = self
                .credit
                .acquire_many(n as u32)
                .await
                .map_err(|_| Error::StreamFinished)?;
            permit.forget();
            self.conn.shared.send(Frame::new(kind, self.id, chunk))?;
        }
        Ok(())
    }

    pub(super) fn send_eof(&self) -> Result<(), Error> {
        self.conn
            .shared
            .send(Frame::new(Kind::Eof, self.id, Bytes::new()))
    }
}

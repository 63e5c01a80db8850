//! Server-sent event streams: the one framing every `…/events` route uses
//! (a machine's, the tenant's and an image's). A stream is the history the
//! route read, then live events from a broadcast channel the route
//! subscribed to before reading that history (so nothing falls in
//! between), each live event passed through the route's own filter. A
//! client that falls behind the channel gets a `lagged` event and the end
//! of the stream, and reconnects from where it was.

use std::convert::Infallible;
use std::time::Duration;

use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

/// How often an idle stream sends a comment, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Whether the client asked for a stream (`Accept: text/event-stream`)
/// rather than one JSON list.
pub(super) fn wanted(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

/// The `Last-Event-ID` a reconnecting client sent, if it is a number.
pub(super) fn last_event_id(headers: &HeaderMap) -> Option<i64> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// What a route's filter makes of one live event.
pub(super) enum Next {
    /// Not for this stream.
    Skip,
    /// Send it and go on.
    Send(Event),
    /// Send it, then end the stream (the subject is gone or finished).
    End(Event),
}

/// The stream response: `history`, then (unless `ended`) the live events
/// of `live` that `pick` lets through, until it ends the stream or the
/// channel closes. `lagged` tells a client that fell behind how to
/// reconnect.
pub(super) fn respond<T, F>(
    history: Vec<Event>,
    ended: bool,
    live: broadcast::Receiver<T>,
    lagged: &'static str,
    pick: F,
) -> Response
where
    T: Clone + Send + 'static,
    F: FnMut(T) -> Next + Send + 'static,
{
    let live = stream::unfold(
        (live, pick, ended),
        move |(mut rx, mut pick, done)| async move {
            if done {
                return None;
            }
            loop {
                match rx.recv().await {
                    Ok(e) => match pick(e) {
                        Next::Skip => continue,
                        Next::Send(ev) => return Some((Ok(ev), (rx, pick, false))),
                        Next::End(ev) => return Some((Ok(ev), (rx, pick, true))),
                    },
                    Err(RecvError::Lagged(_)) => {
                        let ev = Event::default().event("lagged").data(lagged);
                        return Some((Ok(ev), (rx, pick, true)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    );
    let s: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(stream::iter(history.into_iter().map(Ok)).chain(live));
    Sse::new(s)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

//! Progress for the CLI's long waits (machine actions, asset builds, and
//! later image pulls): a spinner with the elapsed time, or a bar where the
//! total is known, drawn on stderr.
//!
//! Only for people: with `--json`, or when stdout or stderr is not a
//! terminal (piped, redirected, under CI), nothing is drawn and every
//! method does nothing — except [`Progress::line`], which then prints its
//! line to stderr as plain text, so logs keep what a terminal would show.
//! Dropping a `Progress` clears it; the command's own output follows.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::output;

/// How often a spinner turns (and the elapsed time is redrawn).
const TICK: Duration = Duration::from_millis(100);
/// Lines of a step's log kept for [`Progress::fail`].
const TAIL: usize = 30;
/// A wait of unknown length: what it waits for (the prefix), the time
/// elapsed, and the latest line of its log cut to the terminal's width.
const SPINNER: &str = "{spinner} {prefix} {elapsed:.dim} {wide_msg:.dim}";
/// A transfer of known size.
const BYTES_BAR: &str = "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}";
/// A transfer of unknown size.
const BYTES_SPINNER: &str = "{spinner} {msg} {bytes} {bytes_per_sec} {elapsed:.dim}";

/// A spinner or bar on the terminal, or nothing (see the module docs).
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    /// The last lines given to [`Progress::line`] while the bar shows them
    /// one at a time, to print whole should the work fail.
    tail: Mutex<VecDeque<String>>,
}

/// Whether progress is drawn: for a person at a terminal only.
fn shown(json: bool, stdout_tty: bool, stderr_tty: bool) -> bool {
    !json && stdout_tty && stderr_tty
}

fn style(template: &str) -> ProgressStyle {
    // The templates are constants of this module; a bad one is a bug the
    // tests catch, and it falls back to the default style.
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

impl Progress {
    fn new(json: bool, make: impl FnOnce() -> ProgressBar) -> Progress {
        let on = shown(
            json,
            std::io::stdout().is_terminal(),
            std::io::stderr().is_terminal(),
        );
        let bar = on.then(|| {
            let bar = make();
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.enable_steady_tick(TICK);
            bar
        });
        Progress {
            bar,
            tail: Mutex::new(VecDeque::new()),
        }
    }

    /// A spinner saying `msg`, with the time elapsed: for waits of unknown
    /// length.
    pub(crate) fn spinner(json: bool, msg: impl Into<Cow<'static, str>>) -> Progress {
        let msg = msg.into();
        Progress::new(json, || {
            ProgressBar::new_spinner()
                .with_style(style(SPINNER))
                .with_prefix(msg)
        })
    }

    /// A bar of `total` bytes (a spinner counting bytes while the total is
    /// unknown), for transfers: [`Progress::inc`] as bytes arrive.
    pub(crate) fn bytes(
        json: bool,
        total: Option<u64>,
        msg: impl Into<Cow<'static, str>>,
    ) -> Progress {
        let msg = msg.into();
        Progress::new(json, || {
            let bar = match total {
                Some(n) => ProgressBar::new(n).with_style(style(BYTES_BAR)),
                None => ProgressBar::no_length().with_style(style(BYTES_SPINNER)),
            };
            bar.with_message(msg)
        })
    }

    /// Whether anything is drawn.
    #[cfg(test)]
    fn is_shown(&self) -> bool {
        self.bar.is_some()
    }

    /// Moves a bar (or a byte count) on by `n`.
    pub(crate) fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// [`Progress::inc`] as a function of its own, for a stream that
    /// outlives this borrow (an upload's body).
    pub(crate) fn counter(&self) -> impl Fn(u64) + Send + Sync + 'static {
        let bar = self.bar.clone();
        move |n| {
            if let Some(b) = &bar {
                b.inc(n);
            }
        }
    }

    /// A line of the work's log: shown after the spinner on a terminal,
    /// cut to its width (the last [`TAIL`] kept for [`Progress::fail`]),
    /// printed to stderr otherwise.
    pub(crate) fn line(&self, line: &str) {
        let Some(b) = &self.bar else {
            eprintln!("{line}");
            return;
        };
        let line = output::clean(line).replace('\n', " ");
        b.set_message(line.clone());
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        if tail.len() == TAIL {
            tail.pop_front();
        }
        tail.push_back(line);
    }

    /// The work failed: clears the spinner and prints the last lines of its
    /// log (they were shown one at a time), for the error that follows.
    pub(crate) fn fail(self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
            let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
            for line in tail.iter() {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_person_at_a_terminal_sees_progress() {
        assert!(shown(false, true, true));
        assert!(!shown(true, true, true), "--json");
        assert!(!shown(false, false, true), "stdout piped");
        assert!(!shown(false, true, false), "stderr redirected");
    }

    #[test]
    fn the_templates_parse() {
        for t in [SPINNER, BYTES_BAR, BYTES_SPINNER] {
            assert!(ProgressStyle::with_template(t).is_ok(), "{t}");
        }
    }

    #[test]
    fn hidden_progress_does_nothing() {
        let p = Progress::spinner(true, "waiting");
        assert!(!p.is_shown());
        p.inc(3);
        p.fail();
        let b = Progress::bytes(true, Some(10), "pulling");
        assert!(!b.is_shown());
        b.counter()(4);
    }
}

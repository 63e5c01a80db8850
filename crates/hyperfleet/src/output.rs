//! Output for people (aligned tables) and scripts (`--json`).
//!
//! Text that came from the server — key names, machine names, messages,
//! the guest's console — may carry terminal control sequences (an
//! attacker's key name, a guest printing `ESC ]52;…` to write the
//! clipboard or retitle the window). What is printed for people shows
//! control characters as visible escapes instead; `--json` and output
//! redirected away from a terminal stay byte-exact.

use std::borrow::Cow;

use serde::Serialize;

pub(crate) fn json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Whether `c` is shown as is: printable characters, and the line breaks
/// and tabs text is laid out with. Everything else that `char::is_control`
/// knows (C0, DEL, C1 — ESC and CSI among them) is escaped.
fn harmless(c: char, keep: &[char]) -> bool {
    !c.is_control() || keep.contains(&c)
}

fn escape<'a>(s: &'a str, keep: &[char]) -> Cow<'a, str> {
    if s.chars().all(|c| harmless(c, keep)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if harmless(c, keep) {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    Cow::Owned(out)
}

/// `s` for a table cell or a line of text: every control character but the
/// line break shown as an escape (`\u{1b}`).
pub(crate) fn clean(s: &str) -> Cow<'_, str> {
    escape(s, &['\n'])
}

/// Makes a byte stream (the guest's console) safe for a terminal, chunk by
/// chunk: UTF-8 split across chunks is carried over, bytes that are not
/// UTF-8 become U+FFFD, and control characters other than line breaks,
/// carriage returns and tabs are escaped.
#[derive(Default)]
pub(crate) struct TerminalText {
    carry: Vec<u8>,
}

impl TerminalText {
    pub(crate) fn push(&mut self, chunk: &[u8]) -> String {
        self.carry.extend_from_slice(chunk);
        let mut out = String::new();
        let mut rest: &[u8] = &self.carry;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(&escape(s, &['\n', '\r', '\t']));
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (ok, bad) = rest.split_at(e.valid_up_to());
                    // Valid up to here: from_utf8 just said so.
                    let ok = std::str::from_utf8(ok).unwrap_or_default();
                    out.push_str(&escape(ok, &['\n', '\r', '\t']));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &bad[n..];
                        }
                        // An incomplete character at the end: wait for
                        // the next chunk.
                        None => {
                            rest = bad;
                            break;
                        }
                    }
                }
            }
        }
        self.carry = rest.to_vec();
        out
    }
}

/// Prints rows as a table with a header, columns padded to fit; cells are
/// [`clean`]ed.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:<w$}  ", c, w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(clean("web-1"), "web-1");
        assert_eq!(
            clean("key\u{1b}]52;c;aGk=\u{7}\u{9b}31m"),
            "key\\u{1b}]52;c;aGk=\\u{7}\\u{9b}31m"
        );
        assert_eq!(clean("a\tb\rc\nd"), "a\\tb\\rc\nd");
        assert!(matches!(clean("plain ünïcode"), Cow::Borrowed(_)));
    }

    #[test]
    fn console_streams_are_escaped_across_chunk_boundaries() {
        let mut t = TerminalText::default();
        // "é" split over two chunks; an escape sequence; line endings kept.
        let mut out = t.push(b"boot \xc3");
        out += &t.push(b"\xa9\x1b[2J\r\nok\t\x07\n");
        assert_eq!(out, "boot é\\u{1b}[2J\r\nok\t\\u{7}\n");
        // Bytes that are not UTF-8 become U+FFFD, never raw.
        assert_eq!(t.push(b"\x9b31m\xff"), "\u{fffd}31m\u{fffd}");
        // A C1 control encoded as UTF-8 (CSI) is escaped too.
        assert_eq!(t.push("\u{9b}31m".as_bytes()), "\\u{9b}31m");
    }
}

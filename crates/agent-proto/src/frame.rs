//! Framing: the byte layout of one frame, the sync marker, and the incremental decoder.
//!
//! This module owns everything that touches raw bytes on the wire and nothing that knows what a
//! message means. Both ends use it: the host client and the guest agent. See
//! `docs/agent-protocol.md` for the normative description; the constants here are the source of
//! truth for the numbers.
//!
//! Layout of one frame (all integers big-endian):
//!
//! ```text
//! 0      2     3      4          8          12
//! +------+-----+------+----------+----------+----------------+
//! | "HF" | kind| flags| stream   | length   | payload ...    |
//! +------+-----+------+----------+----------+----------------+
//! ```
//!
//! Resync: a peer that may be reading a byte stream mid-frame (a serial port that outlived the
//! previous host connection) recovers by scanning for [`SYNC`], an 8-byte marker that never
//! starts a valid frame. The host sends it before every `Hello`, the agent before every
//! `HelloReply` and `Ready`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Two bytes that start every frame.
pub const MAGIC: [u8; 2] = *b"HF";

/// Marker that precedes `Hello`, `HelloReply` and `Ready`; a decoder that lost framing discards
/// bytes until it has seen this sequence. Its first byte (0xFF) can never start a frame.
pub const SYNC: [u8; 8] = [0xFF, 0x00, b'H', b'F', b'S', b'Y', b'N', b'C'];

/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 12;

/// Largest payload a decoder accepts by default (1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;

/// Largest payload the reference implementation puts in one data frame (64 KiB).
pub const CHUNK_SIZE: usize = 64 * 1024;

/// Credit each side implicitly holds for each new stream, per direction (256 KiB): a sender may
/// put at most this many data bytes on the wire for a stream before the receiver grants more.
pub const INITIAL_WINDOW: u32 = 256 * 1024;

/// Bytes of zeros the host writes before a retried `Hello`: one maximal frame, so that a
/// half-received frame left over from a previous connection is guaranteed to complete and the
/// agent falls into resync mode.
pub const FLUSH_LEN: usize = HEADER_LEN + MAX_PAYLOAD;

/// What a frame is. The numeric values are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Host → agent, stream 0, JSON [`crate::Hello`]. Preceded by [`SYNC`].
    Hello = 1,
    /// Agent → host, stream 0, JSON [`crate::HelloReply`]. Preceded by [`SYNC`].
    HelloReply = 2,
    /// Agent → host, stream 0, JSON [`crate::AgentInfo`], sent unsolicited when the agent
    /// (re)opens its channel. Preceded by [`SYNC`].
    Ready = 3,
    /// Host → agent, JSON [`crate::Request`]; opens the stream named in the header.
    Request = 4,
    /// Agent → host, JSON [`crate::Event`]: intermediate progress of a stream.
    Event = 5,
    /// Agent → host, JSON [`crate::Response`]: final answer; closes the stream.
    Response = 6,
    /// Either direction, raw bytes: file contents or process stdin. Counts against credit.
    Data = 7,
    /// Agent → host, raw bytes of a process's stdout. Counts against credit.
    Stdout = 8,
    /// Agent → host, raw bytes of a process's stderr. Counts against credit.
    Stderr = 9,
    /// Host → agent, empty: no more `Data` on this stream (stdin EOF, end of upload).
    Eof = 10,
    /// Either direction, 4-byte big-endian count: the receiver grants the sender more credit.
    Credit = 11,
    /// Host → agent, empty: abort the operation on this stream.
    Cancel = 12,
}

impl Kind {
    /// Maps a wire byte to a kind.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::HelloReply,
            3 => Kind::Ready,
            4 => Kind::Request,
            5 => Kind::Event,
            6 => Kind::Response,
            7 => Kind::Data,
            8 => Kind::Stdout,
            9 => Kind::Stderr,
            10 => Kind::Eof,
            11 => Kind::Credit,
            12 => Kind::Cancel,
            _ => return None,
        })
    }

    /// Whether this kind's payload counts against the stream's flow-control credit.
    pub fn is_data(self) -> bool {
        matches!(self, Kind::Data | Kind::Stdout | Kind::Stderr)
    }

    /// Whether this kind is preceded by [`SYNC`] on the wire.
    pub fn is_synced(self) -> bool {
        matches!(self, Kind::Hello | Kind::HelloReply | Kind::Ready)
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub stream: u32,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(kind: Kind, stream: u32, payload: impl Into<Bytes>) -> Frame {
        Frame {
            kind,
            stream,
            payload: payload.into(),
        }
    }

    /// A `Credit` frame granting `n` bytes on `stream`.
    pub fn credit(stream: u32, n: u32) -> Frame {
        Frame::new(
            Kind::Credit,
            stream,
            Bytes::copy_from_slice(&n.to_be_bytes()),
        )
    }

    /// Reads the grant of a `Credit` frame.
    pub fn credit_amount(&self) -> Result<u32, FrameError> {
        let arr: [u8; 4] = self.payload[..]
            .try_into()
            .map_err(|_| FrameError::BadCredit {
                len: self.payload.len(),
            })?;
        Ok(u32::from_be_bytes(arr))
    }

    /// The 12-byte header of this frame. Fails when the payload is larger than [`MAX_PAYLOAD`].
    pub fn header(&self) -> Result<[u8; HEADER_LEN], FrameError> {
        header(self.kind, self.stream, self.payload.len())
    }

    /// Appends the full encoding (preceded by [`SYNC`] for hello/ready kinds) to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        let h = self.header()?;
        if self.kind.is_synced() {
            dst.put_slice(&SYNC);
        }
        dst.put_slice(&h);
        dst.put_slice(&self.payload);
        Ok(())
    }

    /// The full encoding as one buffer.
    pub fn to_bytes(&self) -> Result<Bytes, FrameError> {
        let mut b = BytesMut::with_capacity(SYNC.len() + HEADER_LEN + self.payload.len());
        self.encode(&mut b)?;
        Ok(b.freeze())
    }
}

/// Builds a frame header.
pub fn header(kind: Kind, stream: u32, len: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: MAX_PAYLOAD,
        });
    }
    let mut h = [0u8; HEADER_LEN];
    h[0..2].copy_from_slice(&MAGIC);
    h[2] = kind as u8;
    h[3] = 0;
    h[4..8].copy_from_slice(&stream.to_be_bytes());
    // Cannot truncate: len <= MAX_PAYLOAD < u32::MAX was checked above.
    h[8..12].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(h)
}

/// Why bytes could not be decoded as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: u64, max: usize },
    #[error("expected frame magic \"HF\" but found bytes {found:02x?}")]
    BadMagic { found: Vec<u8> },
    #[error("unknown frame kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("frame flags {flags:#04x} are not supported")]
    BadFlags { flags: u8 },
    #[error("credit frame payload must be 4 bytes, not {len}")]
    BadCredit { len: usize },
}

/// Incremental frame decoder with resynchronisation.
///
/// Feed it a growing buffer; each call to [`FrameDecoder::decode`] consumes at most one frame.
/// When the bytes at a frame boundary are not a valid header, `decode` returns the error once
/// and switches itself into resync mode, in which it silently discards bytes until after the
/// next [`SYNC`] marker. A [`SYNC`] marker seen at a frame boundary is skipped.
#[derive(Debug)]
pub struct FrameDecoder {
    max_payload: usize,
    resyncing: bool,
    discarded: u64,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new()
    }
}

impl FrameDecoder {
    /// A decoder at a frame boundary accepting payloads up to [`MAX_PAYLOAD`].
    pub fn new() -> FrameDecoder {
        FrameDecoder::with_max_payload(MAX_PAYLOAD)
    }

    pub fn with_max_payload(max_payload: usize) -> FrameDecoder {
        FrameDecoder {
            max_payload,
            resyncing: false,
            discarded: 0,
        }
    }

    /// A decoder that starts by discarding everything up to the first [`SYNC`]: what a host
    /// uses on a fresh connection, so stale bytes from an earlier connection are ignored.
    pub fn resyncing() -> FrameDecoder {
        let mut d = FrameDecoder::new();
        d.resyncing = true;
        d
    }

    /// Forces resync mode: discard bytes until after the next [`SYNC`].
    pub fn resync(&mut self) {
        self.resyncing = true;
    }

    pub fn is_resyncing(&self) -> bool {
        self.resyncing
    }

    /// Total bytes thrown away while resynchronising.
    pub fn discarded(&self) -> u64 {
        self.discarded
    }

    /// Decodes the next frame from the front of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed. An `Err` leaves the decoder in resync mode;
    /// calling `decode` again continues with the scan.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        loop {
            if self.resyncing {
                match find(buf, &SYNC) {
                    Some(pos) => {
                        self.discarded += pos as u64;
                        buf.advance(pos + SYNC.len());
                        self.resyncing = false;
                    }
                    None => {
                        // Keep a tail that could be the start of a marker split across reads.
                        let keep = buf.len().min(SYNC.len() - 1);
                        let drop = buf.len() - keep;
                        self.discarded += drop as u64;
                        buf.advance(drop);
                        return Ok(None);
                    }
                }
                continue;
            }
            if buf.is_empty() {
                return Ok(None);
            }
            if buf[0] == SYNC[0] {
                let n = buf.len().min(SYNC.len());
                if buf[..n] != SYNC[..n] {
                    return Err(self.fail(FrameError::BadMagic {
                        found: buf[..n.min(2)].to_vec(),
                    }));
                }
                if n < SYNC.len() {
                    return Ok(None);
                }
                buf.advance(SYNC.len());
                continue;
            }
            // Reject a bad magic as soon as its bytes are here, without waiting for a header.
            let m = buf.len().min(2);
            if buf[..m] != MAGIC[..m] {
                return Err(self.fail(FrameError::BadMagic {
                    found: buf[..m].to_vec(),
                }));
            }
            if buf.len() >= 3 && Kind::from_u8(buf[2]).is_none() {
                return Err(self.fail(FrameError::UnknownKind { kind: buf[2] }));
            }
            if buf.len() < HEADER_LEN {
                return Ok(None);
            }
            let flags = buf[3];
            if flags != 0 {
                return Err(self.fail(FrameError::BadFlags { flags }));
            }
            let len = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
            if len > self.max_payload {
                return Err(self.fail(FrameError::TooLarge {
                    len: len as u64,
                    max: self.max_payload,
                }));
            }
            if buf.len() < HEADER_LEN + len {
                buf.reserve(HEADER_LEN + len - buf.len());
                return Ok(None);
            }
            let kind = match Kind::from_u8(buf[2]) {
                Some(k) => k,
                None => return Err(self.fail(FrameError::UnknownKind { kind: buf[2] })),
            };
            let stream = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
            buf.advance(HEADER_LEN);
            let payload = buf.split_to(len).freeze();
            return Ok(Some(Frame {
                kind,
                stream,
                payload,
            }));
        }
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        self.resyncing = true;
        e
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: &Frame) -> BytesMut {
        let mut b = BytesMut::new();
        f.encode(&mut b).unwrap();
        b
    }

    fn decode_all(d: &mut FrameDecoder, buf: &mut BytesMut) -> (Vec<Frame>, Vec<FrameError>) {
        let mut frames = vec![];
        let mut errs = vec![];
        loop {
            match d.decode(buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => errs.push(e),
            }
        }
        (frames, errs)
    }

    #[test]
    fn round_trip_every_kind() {
        for k in 1..=12u8 {
            let kind = Kind::from_u8(k).unwrap();
            let f = Frame::new(kind, 0xdead_beef, Bytes::from(vec![k; k as usize * 100]));
            let mut b = enc(&f);
            let mut d = FrameDecoder::new();
            assert_eq!(d.decode(&mut b).unwrap(), Some(f));
            assert!(b.is_empty());
        }
        assert_eq!(Kind::from_u8(0), None);
        assert_eq!(Kind::from_u8(13), None);
    }

    #[test]
    fn empty_and_max_payloads() {
        let mut d = FrameDecoder::new();
        let f = Frame::new(Kind::Eof, 7, Bytes::new());
        assert_eq!(d.decode(&mut enc(&f)).unwrap(), Some(f));
        let f = Frame::new(Kind::Data, 7, vec![1u8; MAX_PAYLOAD]);
        assert_eq!(d.decode(&mut enc(&f)).unwrap(), Some(f));
    }

    #[test]
    fn byte_by_byte_feeding() {
        let frames: Vec<Frame> = vec![
            Frame::new(Kind::Hello, 0, &b"{\"a\":1}"[..]),
            Frame::new(Kind::Data, 3, vec![9u8; 1000]),
            Frame::credit(3, 4096),
            Frame::new(Kind::Cancel, 3, Bytes::new()),
        ];
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire).unwrap();
        }
        let mut d = FrameDecoder::new();
        let mut buf = BytesMut::new();
        let mut out = vec![];
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(f) = d.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames);
        assert_eq!(out[2].credit_amount().unwrap(), 4096);
    }

    #[test]
    fn oversize_frame_rejected_with_clear_error() {
        let mut b = BytesMut::new();
        b.put_slice(&MAGIC);
        b.put_u8(Kind::Data as u8);
        b.put_u8(0);
        b.put_u32(1);
        b.put_u32((MAX_PAYLOAD + 1) as u32);
        let mut d = FrameDecoder::new();
        let e = d.decode(&mut b).unwrap_err();
        assert_eq!(
            e,
            FrameError::TooLarge {
                len: MAX_PAYLOAD as u64 + 1,
                max: MAX_PAYLOAD
            }
        );
        assert_eq!(
            e.to_string(),
            "frame payload of 1048577 bytes exceeds the 1048576-byte limit"
        );
        assert!(d.is_resyncing());
        // Encoding refuses it too.
        let big = Frame::new(Kind::Data, 1, vec![0u8; MAX_PAYLOAD + 1]);
        assert!(matches!(big.to_bytes(), Err(FrameError::TooLarge { .. })));
        // A smaller configured limit is honoured.
        let mut d = FrameDecoder::with_max_payload(10);
        let mut b = enc(&Frame::new(Kind::Data, 1, vec![0u8; 11]));
        assert!(matches!(d.decode(&mut b), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn bad_magic_kind_flags_detected() {
        let mut d = FrameDecoder::new();
        let mut b = BytesMut::from(&b"XY"[..]);
        assert!(matches!(d.decode(&mut b), Err(FrameError::BadMagic { .. })));
        let mut d = FrameDecoder::new();
        let mut b = BytesMut::from(&b"HF\x63"[..]);
        assert_eq!(
            d.decode(&mut b),
            Err(FrameError::UnknownKind { kind: 0x63 })
        );
        let mut d = FrameDecoder::new();
        let mut b = BytesMut::from(&b"HF\x07\x01\0\0\0\x01\0\0\0\0"[..]);
        assert_eq!(d.decode(&mut b), Err(FrameError::BadFlags { flags: 1 }));
        let f = Frame::new(Kind::Credit, 1, &b"abc"[..]);
        assert_eq!(f.credit_amount(), Err(FrameError::BadCredit { len: 3 }));
    }

    #[test]
    fn sync_at_boundary_is_skipped() {
        let mut b = BytesMut::new();
        b.put_slice(&SYNC);
        b.put_slice(&SYNC);
        let f = Frame::new(Kind::Request, 5, &b"{}"[..]);
        f.encode(&mut b).unwrap();
        let mut d = FrameDecoder::new();
        let (frames, errs) = decode_all(&mut d, &mut b);
        assert_eq!(frames, vec![f]);
        assert!(errs.is_empty());
        // A partial marker waits for more bytes instead of failing.
        let mut b = BytesMut::from(&SYNC[..5]);
        assert_eq!(d.decode(&mut b), Ok(None));
        b.put_slice(&SYNC[5..]);
        assert_eq!(d.decode(&mut b), Ok(None));
        assert!(b.is_empty());
    }

    #[test]
    fn garbage_then_half_frame_then_hello_resyncs() {
        // What a serial port can hold after the host died mid-frame: random garbage, then the
        // start of a frame whose payload never arrived, then a new connection's flush + hello.
        let mut wire = BytesMut::new();
        let earlier = Frame::new(Kind::Request, 1, &b"{\"op\":\"ping\"}"[..]);
        earlier.encode(&mut wire).unwrap();
        let half = enc(&Frame::new(Kind::Data, 9, vec![0xAB; 5000]));
        wire.put_slice(&half[..HEADER_LEN + 1234]);
        // The new host: first hello gets swallowed as payload of the half frame ...
        let hello = Frame::new(Kind::Hello, 0, &b"{\"protocol_version\":1}"[..]);
        hello.encode(&mut wire).unwrap();
        // ... its retry is preceded by a full-frame flush of zeros.
        wire.put_slice(&vec![0u8; FLUSH_LEN]);
        hello.encode(&mut wire).unwrap();
        let after = Frame::new(Kind::Request, 1, &b"{\"op\":\"ping\"}"[..]);
        after.encode(&mut wire).unwrap();

        let mut d = FrameDecoder::new();
        let mut buf = BytesMut::new();
        let mut frames = vec![];
        let mut errs = 0;
        // Feed in odd-sized pieces to exercise markers split across reads.
        for piece in wire.chunks(777) {
            buf.put_slice(piece);
            loop {
                match d.decode(&mut buf) {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => break,
                    Err(_) => errs += 1,
                }
            }
        }
        assert!(errs >= 1);
        // The half frame completes with junk (the receiver drops it: no such stream), then the
        // retried hello and the request come through intact.
        let good: Vec<&Frame> = frames.iter().filter(|f| f.kind != Kind::Data).collect();
        assert_eq!(good, vec![&earlier, &hello, &after]);
        assert!(d.discarded() > 0);
    }

    #[test]
    fn garbage_then_hello_resyncs() {
        let mut wire = BytesMut::new();
        wire.put_slice(b"\x13\x37 garbage HF\x07 from a previous life \xff\xfe\xff\x00HFS");
        let hello = Frame::new(Kind::Hello, 0, &b"{}"[..]);
        hello.encode(&mut wire).unwrap();
        let mut d = FrameDecoder::new();
        let (frames, errs) = decode_all(&mut d, &mut wire);
        assert_eq!(errs.len(), 1);
        assert_eq!(frames, vec![hello]);
    }

    #[test]
    fn resyncing_decoder_skips_stale_frames() {
        let mut wire = BytesMut::new();
        Frame::new(Kind::Stdout, 4, &b"old"[..])
            .encode(&mut wire)
            .unwrap();
        let reply = Frame::new(Kind::HelloReply, 0, &b"{}"[..]);
        reply.encode(&mut wire).unwrap();
        let mut d = FrameDecoder::resyncing();
        let (frames, errs) = decode_all(&mut d, &mut wire);
        assert!(errs.is_empty());
        assert_eq!(frames, vec![reply]);
    }
}

/// Properties of the decoder over generated inputs, in any chunking.
///
/// What the decoder guarantees (and `docs/agent-protocol.md` §5 describes):
/// 1. The frames a sender encodes come out unchanged, in order, with no error and nothing
///    discarded, however the byte stream is split into reads.
/// 2. Garbage at a frame boundary (bytes that cannot start a frame or `SYNC`, or a header that
///    is invalid) is reported once, and then everything up to the next `SYNC` is discarded:
///    frames sent between the garbage and the next hello/ready kind (the ones preceded by
///    `SYNC`) are lost, that frame and everything after it come through. This holds exactly
///    when `SYNC` occurs on the wire only where the sender put it (garbage or a payload that
///    happens to contain the marker moves the resync point, which is the marker's nature).
/// 3. On any bytes at all the decoder never panics, always makes progress, and every frame it
///    yields is bytes that were on the wire, in order (it can read a frame out of garbage that
///    is one, never make one up).
#[cfg(test)]
mod prop {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::Index;

    fn kind() -> impl Strategy<Value = Kind> {
        (1u8..=12).prop_map(|k| Kind::from_u8(k).expect("1..=12 are all kinds"))
    }

    fn frame() -> impl Strategy<Value = Frame> {
        (kind(), any::<u32>(), vec(any::<u8>(), 0..300)).prop_map(|(k, s, p)| Frame::new(k, s, p))
    }

    fn wire_of(f: &Frame) -> Vec<u8> {
        f.to_bytes()
            .expect("payloads here are under MAX_PAYLOAD")
            .to_vec()
    }

    /// A header with the given fields, checked or not.
    fn raw_header(kind: u8, flags: u8, stream: u32, len: u32) -> Vec<u8> {
        let mut h = MAGIC.to_vec();
        h.extend([kind, flags]);
        h.extend(stream.to_be_bytes());
        h.extend(len.to_be_bytes());
        h
    }

    /// Bytes at a frame boundary that the decoder must reject, followed by anything.
    fn garbage() -> impl Strategy<Value = Vec<u8>> {
        let rest = || vec(any::<u8>(), 0..40);
        let not_a_start = any::<u8>().prop_filter("starts a frame or SYNC", |b| {
            *b != MAGIC[0] && *b != SYNC[0]
        });
        let bad_kind = any::<u8>().prop_filter("is a kind", |k| Kind::from_u8(*k).is_none());
        prop_oneof![
            (not_a_start, rest()).prop_map(|(b, r)| [vec![b], r].concat()),
            (bad_kind, rest()).prop_map(|(k, r)| [MAGIC.to_vec(), vec![k], r].concat()),
            (kind(), 1u8.., any::<u32>(), 0u32..300, rest()).prop_map(|(k, fl, s, l, r)| [
                raw_header(k as u8, fl, s, l),
                r
            ]
            .concat()),
            (kind(), any::<u32>(), (MAX_PAYLOAD as u32 + 1).., rest()).prop_map(|(k, s, l, r)| [
                raw_header(k as u8, 0, s, l),
                r
            ]
            .concat()),
        ]
    }

    /// Splits `wire` at the cut points (any order, repeats allowed) into consecutive reads.
    fn split<'a>(wire: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        at.extend([0, wire.len()]);
        at.sort_unstable();
        at.dedup();
        at.windows(2).map(|w| &wire[w[0]..w[1]]).collect()
    }

    struct Fed {
        frames: Vec<Frame>,
        errors: usize,
        left: BytesMut,
    }

    /// Feeds the reads one by one, decoding after each until the decoder wants more.
    fn feed(d: &mut FrameDecoder, reads: &[&[u8]]) -> Fed {
        let mut fed = Fed {
            frames: vec![],
            errors: 0,
            left: BytesMut::new(),
        };
        for r in reads {
            fed.left.put_slice(r);
            // Every frame consumes 12 bytes or more, and an error is followed by a scan that
            // consumes a marker or stops: more calls than this would be a livelock.
            let mut budget = 2 * fed.left.len() + 2;
            loop {
                assert!(budget > 0, "the decoder stopped making progress");
                budget -= 1;
                match d.decode(&mut fed.left) {
                    Ok(Some(f)) => fed.frames.push(f),
                    Ok(None) => break,
                    Err(_) => fed.errors += 1,
                }
            }
        }
        fed
    }

    fn marker_positions(wire: &[u8]) -> Vec<usize> {
        wire.windows(SYNC.len())
            .enumerate()
            .filter(|(_, w)| *w == SYNC)
            .map(|(i, _)| i)
            .collect()
    }

    #[derive(Debug, Clone)]
    enum Piece {
        Frame(Frame),
        Garbage(Vec<u8>),
    }

    proptest! {
        #[test]
        fn any_chunking_yields_exactly_the_frames_sent(
            frames in vec(frame(), 0..12),
            cuts in vec(any::<Index>(), 0..16),
        ) {
            let wire: Vec<u8> = frames.iter().flat_map(wire_of).collect();
            let mut d = FrameDecoder::new();
            let fed = feed(&mut d, &split(&wire, &cuts));
            prop_assert_eq!(fed.frames, frames);
            prop_assert_eq!(fed.errors, 0);
            prop_assert!(fed.left.is_empty());
            prop_assert_eq!(d.discarded(), 0);
            prop_assert!(!d.is_resyncing());
        }

        #[test]
        fn garbage_loses_exactly_the_frames_before_the_next_marker(
            pieces in vec(prop_oneof![
                3 => frame().prop_map(Piece::Frame),
                1 => garbage().prop_map(Piece::Garbage),
            ], 0..12),
            cuts in vec(any::<Index>(), 0..16),
        ) {
            // The model: what the decoder must yield, report and throw away.
            let mut wire = vec![];
            let mut intended_markers = vec![];
            let mut expected = vec![];
            let (mut errors, mut lost_bytes, mut lost) = (0, 0, false);
            for p in &pieces {
                match p {
                    Piece::Garbage(g) => {
                        if !lost {
                            errors += 1;
                            lost = true;
                        }
                        lost_bytes += g.len();
                        wire.extend(g);
                    }
                    Piece::Frame(f) => {
                        if f.kind.is_synced() {
                            intended_markers.push(wire.len());
                            lost = false;
                        }
                        let bytes = wire_of(f);
                        if lost {
                            lost_bytes += bytes.len();
                        } else {
                            expected.push(f.clone());
                        }
                        wire.extend(bytes);
                    }
                }
            }
            prop_assume!(marker_positions(&wire) == intended_markers);

            let mut d = FrameDecoder::new();
            let fed = feed(&mut d, &split(&wire, &cuts));
            prop_assert_eq!(fed.frames, expected);
            prop_assert_eq!(fed.errors, errors);
            prop_assert_eq!(d.is_resyncing(), lost);
            // Lost bytes are discarded, except a tail short of a marker kept for the next read.
            prop_assert_eq!(d.discarded() as usize + fed.left.len(), lost_bytes);
            prop_assert!(fed.left.len() < SYNC.len());
            prop_assert!(lost || fed.left.is_empty());
        }

        #[test]
        fn any_bytes_never_panic_and_yield_only_frames_on_the_wire(
            parts in vec(prop_oneof![
                vec(any::<u8>(), 0..24),
                Just(SYNC.to_vec()),
                Just(MAGIC.to_vec()),
                frame().prop_map(|f| wire_of(&f)),
                (frame(), any::<Index>()).prop_map(|(f, i)| {
                    let w = wire_of(&f);
                    w[..i.index(w.len())].to_vec()
                }),
            ], 0..16),
            cuts in vec(any::<Index>(), 0..16),
            resyncing in any::<bool>(),
        ) {
            let wire = parts.concat();
            // A small limit, so that generated frames also hit the size check.
            let mut d = FrameDecoder::with_max_payload(200);
            if resyncing {
                d.resync();
            }
            let fed = feed(&mut d, &split(&wire, &cuts));
            let mut from = 0;
            for f in &fed.frames {
                let mut bytes = f.header().expect("a decoded frame is within the limit").to_vec();
                bytes.extend_from_slice(&f.payload);
                prop_assert!(f.payload.len() <= 200);
                let at = wire[from..]
                    .windows(bytes.len())
                    .position(|w| w == bytes);
                prop_assert!(at.is_some(), "{:?} is not on the wire after byte {}", f, from);
                from += at.unwrap_or(0) + bytes.len();
            }
            prop_assert!(fed.left.len() <= wire.len() - from);
        }
    }
}

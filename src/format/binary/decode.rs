//! The decoder: the segments of a checked blob (applying a patch block),
//! inflated and read back column by column into entries. Any defect
//! anywhere fails the whole blob.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::header::{check_header, Header};
use super::layout::*;
use super::patch::patch_block;
use super::segments::in_parallel;
use crate::entry::{Entry, ProtoInfo, SeqAdj, Tuple, L4};
use crate::format::FormatError;

/// Decodes a v1 blob completely; any defect anywhere fails the whole blob.
pub fn decode(bytes: &[u8]) -> Result<(Header, Vec<Entry>), FormatError> {
    let (h, mut segs) = decode_segments(bytes)?;
    if segs.len() == 1 {
        return Ok((h, segs.pop().unwrap_or_default()));
    }
    let mut out = crate::format::bigvec::with_capacity(h.count as usize);
    for s in segs {
        out.extend(s);
    }
    Ok((h, out))
}

/// Decodes a v1 blob completely into its segments, in blob order (one for
/// an unsegmented blob), decoding segments in parallel; any defect anywhere
/// fails the whole blob. A patched blob's skipped records are left out and
/// its base timeouts aged.
pub fn decode_segments(bytes: &[u8]) -> Result<(Header, Vec<Vec<Entry>>), FormatError> {
    let h = check_header(bytes)?;
    let payload = &bytes[HEADER_LEN..];
    let segs = payload_segments(&h, payload)?;
    let segmented = h.flags & FLAG_SEGMENTS != 0;
    let segs = in_parallel(
        &segs,
        |i, s| {
            let body = &payload[s.at..s.at + s.stored_len];
            inflate(body, s.raw_len as u32, h.flags)
                .and_then(|raw| decode_raw(&raw, s, h.default_mark))
                .map_err(|e| if segmented { in_segment(i, e) } else { e })
        },
        decoder_panicked,
    )?;
    Ok((h, segs))
}
pub(super) fn decoder_panicked() -> FormatError {
    FormatError::Corrupt("segment decoder thread panicked".into())
}

/// One segment to decode: a row of the segment table (or the whole payload
/// of an unsegmented blob), where its body starts in the payload, and what
/// a patch block says about it.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) count: usize,
    pub(super) raw_len: usize,
    pub(super) stored_len: usize,
    pub(super) at: usize,
    /// Stored index of its first record.
    pub(super) first: usize,
    /// Indices (within the segment) of the records to leave out, ascending.
    pub(super) skip: Vec<u32>,
    /// Seconds to take off every timeout (a base segment of a patch).
    pub(super) age: Option<u32>,
}

/// The segments of `payload`, checked against the header: for a segmented
/// blob the patch block (if any) and the segment table, whose counts, raw
/// and stored lengths must add up exactly, before anything is allocated
/// beyond the table and the skip list (both bounded by the input).
pub(super) fn payload_segments(h: &Header, payload: &[u8]) -> Result<Vec<Segment>, FormatError> {
    if h.flags & FLAG_SEGMENTS == 0 {
        return Ok(vec![Segment {
            count: h.count as usize,
            raw_len: h.raw_len as usize,
            stored_len: payload.len(),
            at: 0,
            first: 0,
            skip: Vec::new(),
            age: None,
        }]);
    }
    let (patch, table_at) = if h.flags & FLAG_PATCH != 0 {
        let (p, len) = patch_block(payload)?;
        (Some(p), len)
    } else {
        (None, 0)
    };
    let corrupt = |m: String| Err(FormatError::Corrupt(m));
    let Some(&n) = payload.get(table_at) else {
        return corrupt("segmented payload without a segment table".into());
    };
    let n = n as usize;
    if n == 0 || n > MAX_SEGMENTS {
        return corrupt(format!(
            "segment table declares {n} segments (1..={MAX_SEGMENTS})"
        ));
    }
    let table_len = 1 + SEGMENT_ENTRY_LEN * n;
    if payload.len() - table_at < table_len {
        return corrupt(format!(
            "segment table of {n} segments needs {table_len} bytes, payload has {}",
            payload.len() - table_at
        ));
    }
    let table = &payload[table_at..];
    let mut segs = Vec::with_capacity(n);
    let (mut count, mut raw, mut at) = (0u64, 0u64, table_at + table_len);
    for i in 0..n {
        let row = 1 + SEGMENT_ENTRY_LEN * i;
        let s = Segment {
            count: le32(table, row) as usize,
            raw_len: le32(table, row + 4) as usize,
            stored_len: le32(table, row + 8) as usize,
            at,
            first: count as usize,
            skip: Vec::new(),
            age: None,
        };
        if s.count == 0 {
            return corrupt(format!("segment {i} holds no entries"));
        }
        if s.count.saturating_mul(MIN_RECORD_LEN) > s.raw_len {
            return corrupt(format!(
                "segment {i}: {} entries cannot fit in {} bytes",
                s.count, s.raw_len
            ));
        }
        if h.flags & FLAG_ZSTD == 0 && s.stored_len != s.raw_len {
            return corrupt(format!(
                "segment {i}: stored raw, {} bytes, but declares {}",
                s.stored_len, s.raw_len
            ));
        }
        count += s.count as u64;
        raw += s.raw_len as u64;
        at = at.saturating_add(s.stored_len);
        segs.push(s);
    }
    if count > MAX_ENTRIES as u64 {
        return Err(FormatError::TooManyEntries {
            count,
            max: MAX_ENTRIES,
        });
    }
    let Some(p) = patch else {
        if count != u64::from(h.count) || raw != u64::from(h.raw_len) || at != payload.len() {
            return corrupt(format!(
                "segment table adds up to {count} entries, {raw} raw and {at} payload bytes; \
                 the header declares {}, {} and {}",
                h.count,
                h.raw_len,
                payload.len()
            ));
        }
        return Ok(segs);
    };
    if p.nbase > n {
        return corrupt(format!(
            "patch block declares {} base segments, the segment table has {n}",
            p.nbase
        ));
    }
    let nskip = p.skip.len() as u64;
    if count != u64::from(h.count) + nskip || raw != u64::from(h.raw_len) || at != payload.len() {
        return corrupt(format!(
            "segment table adds up to {count} records, {raw} raw and {at} payload bytes; \
             the header declares {} entries + {nskip} skipped, {} and {}",
            h.count,
            h.raw_len,
            payload.len()
        ));
    }
    // Hand each base segment its own skips, as indices within it.
    let mut skips = p.skip.iter().enumerate().peekable();
    let mut first = 0u64;
    for (i, s) in segs.iter_mut().enumerate() {
        let end = first + s.count as u64;
        if i < p.nbase {
            s.age = Some(p.age);
            while let Some((_, &g)) = skips.next_if(|(_, &g)| g < end) {
                s.skip.push((g - first) as u32);
            }
        } else if let Some((k, &g)) = skips.peek() {
            if g < end {
                return corrupt(format!(
                    "patch block: skip {k} names stored record {g}, in delta segment {i}; \
                     only the {first} base records can be skipped"
                ));
            }
        }
        first = end;
    }
    if let Some((k, &g)) = skips.next() {
        return corrupt(format!(
            "patch block: skip {k} names stored record {g}, beyond the {first} stored records"
        ));
    }
    Ok(segs)
}

pub(super) fn in_segment(i: usize, e: FormatError) -> FormatError {
    match e {
        FormatError::Corrupt(m) => FormatError::Corrupt(format!("segment {i}: {m}")),
        other => other,
    }
}

/// The raw payload of `stored` (decompressed when `flags` say zstd),
/// exactly `raw_len` bytes.
pub(super) fn inflate(
    stored: &[u8],
    raw_len: u32,
    flags: u16,
) -> Result<std::borrow::Cow<'_, [u8]>, FormatError> {
    if flags & FLAG_ZSTD == 0 {
        return Ok(std::borrow::Cow::Borrowed(stored));
    }
    // Bounded: the output buffer is exactly the declared size, which was
    // checked against MAX_RAW_LEN; a frame that inflates beyond it fails
    // instead of allocating.
    let raw =
        zstd::bulk::decompress(stored, raw_len as usize).map_err(|e| FormatError::Decompress {
            declared: raw_len,
            detail: e.to_string(),
        })?;
    if raw.len() != raw_len as usize {
        return Err(FormatError::Corrupt(format!(
            "payload decompressed to {} bytes, header declares {raw_len}",
            raw.len()
        )));
    }
    Ok(std::borrow::Cow::Owned(raw))
}

pub(super) struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    name: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.b.len() - self.pos < n {
            return Err(FormatError::Corrupt(format!(
                "{} column ends early ({} bytes, needed {} more at {})",
                self.name,
                self.b.len(),
                n,
                self.pos
            )));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn varint(&mut self) -> Result<u64, FormatError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(FormatError::Corrupt(format!(
            "overlong varint in the {} column",
            self.name
        )))
    }
    fn varint_u32(&mut self) -> Result<u32, FormatError> {
        let v = self.varint()?;
        u32::try_from(v)
            .map_err(|_| FormatError::Corrupt(format!("{} value {v} exceeds 32 bits", self.name)))
    }
    fn addr(&mut self, v6: bool) -> Result<IpAddr, FormatError> {
        Ok(if v6 {
            let b: [u8; 16] = self.take(16)?.try_into().unwrap_or([0; 16]);
            IpAddr::V6(Ipv6Addr::from(b))
        } else {
            let b = self.take(4)?;
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        })
    }
    fn done(&self) -> Result<(), FormatError> {
        if self.pos != self.b.len() {
            return Err(FormatError::Corrupt(format!(
                "{} column has {} unused bytes after the last entry",
                self.name,
                self.b.len() - self.pos
            )));
        }
        Ok(())
    }
}

pub(super) fn read_l4(sport: &mut Reader, dport: &mut Reader, kind: u8) -> Result<L4, FormatError> {
    Ok(match kind {
        L4_PORTS => {
            let s = sport.take(2)?;
            let d = dport.take(2)?;
            L4::Ports {
                src: u16::from_be_bytes([s[0], s[1]]),
                dst: u16::from_be_bytes([d[0], d[1]]),
            }
        }
        L4_ICMP => {
            let s = sport.take(2)?;
            let d = dport.take(2)?;
            L4::Icmp {
                id: u16::from_be_bytes([s[0], s[1]]),
                kind: d[0],
                code: d[1],
            }
        }
        _ => L4::None,
    })
}

pub(super) fn read_seq_adj(d: &[u8]) -> SeqAdj {
    SeqAdj {
        correction_pos: le32(d, 0),
        offset_before: le32(d, 4) as i32,
        offset_after: le32(d, 8) as i32,
    }
}

pub(super) fn decode_raw(
    raw: &[u8],
    seg: &Segment,
    default_mark: u32,
) -> Result<Vec<Entry>, FormatError> {
    let mut d = SegDecoder::new(raw, seg, default_mark)?;
    let mut out = crate::format::bigvec::with_capacity(d.kept());
    d.run(raw, usize::MAX, |_, e| out.push(e))?;
    d.finish(raw)?;
    Ok(out)
}

/// Where one segment's decoding stands: its column ranges in the raw
/// payload and how far each has been read, plus the delta state. Holds no
/// borrow, so it can live next to the payload it reads.
#[derive(Debug, Clone)]
pub(super) struct SegDecoder {
    cols: [(usize, usize, &'static str); STREAMS],
    pos: [usize; STREAMS],
    /// Stored records.
    count: usize,
    /// Stored records decoded so far.
    idx: usize,
    default_mark: u32,
    prev_timeout: u32,
    last_near: [Option<IpAddr>; 2],
    /// Stored indices of the records left out (a patch's skips), ascending.
    pub(super) skip: Vec<u32>,
    /// Skips passed so far.
    skipped: usize,
    /// Seconds taken off every timeout (a patch's base segment).
    age: Option<u32>,
    /// Seconds since the state was saved, taken off every timeout after
    /// `age` (§1.3); a record this leaves at 0 expired. 0 when not aging.
    pub(super) load_age: u32,
    /// Records handed out so far.
    pub(super) out: usize,
}

impl SegDecoder {
    /// Parses the column table of `raw` (a v1.0 payload of `seg.count`
    /// records).
    pub(super) fn new(raw: &[u8], seg: &Segment, default_mark: u32) -> Result<Self, FormatError> {
        let count = seg.count;
        let mut d = SegDecoder {
            cols: [(0, 0, ""); STREAMS],
            pos: [0; STREAMS],
            count,
            idx: 0,
            default_mark,
            prev_timeout: 0,
            last_near: [None, None],
            skip: seg.skip.clone(),
            skipped: 0,
            age: seg.age,
            load_age: 0,
            out: 0,
        };
        if raw.is_empty() && count == 0 {
            d.cols = std::array::from_fn(|i| (0, 0, STREAM_NAMES[i]));
            return Ok(d);
        }
        let mut top = Reader {
            b: raw,
            pos: 0,
            name: "payload",
        };
        let nstreams = top.u8()? as usize;
        if nstreams < STREAMS {
            return Err(FormatError::Corrupt(format!(
                "payload has {nstreams} columns, v1 needs {STREAMS}"
            )));
        }
        for i in 0..nstreams {
            let len = top.varint()?;
            let len = usize::try_from(len)
                .ok()
                .filter(|l| *l <= raw.len())
                .ok_or_else(|| {
                    FormatError::Corrupt(format!("column {i} length {len} too large"))
                })?;
            let start = top.pos;
            top.take(len)?;
            // Columns a later minor version appends are optional: skipped.
            if let Some(name) = STREAM_NAMES.get(i) {
                d.cols[i] = (start, start + len, name);
            }
        }
        top.done()?;
        let len = |i: usize| d.cols[i].1 - d.cols[i].0;
        if len(S_FLAGS) != count || len(S_PROTO) != count {
            return Err(FormatError::Corrupt(format!(
                "header declares {count} entries but the flags/proto columns hold {}/{}",
                len(S_FLAGS),
                len(S_PROTO)
            )));
        }
        Ok(d)
    }

    fn readers<'r>(&self, raw: &'r [u8]) -> [Reader<'r>; STREAMS] {
        std::array::from_fn(|i| {
            let (a, b, name) = self.cols[i];
            Reader {
                b: &raw[a..b],
                pos: self.pos[i],
                name,
            }
        })
    }

    /// Records the segment hands out (its stored records less the skipped).
    pub(super) fn kept(&self) -> usize {
        self.count - self.skip.len()
    }

    /// Records still to hand out.
    pub(super) fn remaining(&self) -> usize {
        self.kept() - self.out
    }

    /// Decodes records of `raw` until `n` more were handed to `sink` or the
    /// segment ends; returns how many were. Skipped records are decoded
    /// (they carry delta state) but not handed out; after the last kept
    /// record the skipped ones behind it are consumed too, so that
    /// [`finish`](Self::finish) can check the columns.
    pub(super) fn run(
        &mut self,
        raw: &[u8],
        n: usize,
        mut sink: impl FnMut(usize, Entry),
    ) -> Result<usize, FormatError> {
        let n = n.min(self.remaining());
        if n == 0 && self.idx == self.count {
            return Ok(0);
        }
        let mut cols = self.readers(raw);
        let mut next_skip = self
            .skip
            .get(self.skipped)
            .map_or(usize::MAX, |&s| s as usize);
        let mut done = 0;
        let (mut idx, mut prev_timeout, mut last_near) =
            (self.idx, self.prev_timeout, self.last_near);
        let (default_mark, age, load_age, count) =
            (self.default_mark, self.age, self.load_age, self.count);
        // The last kept record also takes the skipped ones behind it.
        let last = self.out + n == self.kept();
        while done < n || (last && idx < count) {
            let mut e = decode_one(
                &mut cols,
                idx,
                default_mark,
                &mut prev_timeout,
                &mut last_near,
            )?;
            idx += 1;
            if idx - 1 == next_skip {
                self.skipped += 1;
                next_skip = self
                    .skip
                    .get(self.skipped)
                    .map_or(usize::MAX, |&s| s as usize);
                continue;
            }
            if let Some(age) = age {
                e.timeout = e.timeout.saturating_sub(age).max(1);
            }
            // Expired records (0 left) reach only the validating pass,
            // which adds them to `skip`.
            e.timeout = e.timeout.saturating_sub(load_age);
            sink(idx - 1, e);
            done += 1;
        }
        (self.idx, self.prev_timeout, self.last_near) = (idx, prev_timeout, last_near);
        self.out += done;
        for (p, c) in self.pos.iter_mut().zip(&cols) {
            *p = c.pos;
        }
        Ok(done)
    }

    /// After the last record: every column must be used up exactly.
    pub(super) fn finish(&self, raw: &[u8]) -> Result<(), FormatError> {
        for c in &self.readers(raw) {
            c.done()?;
        }
        Ok(())
    }
}

pub(super) fn decode_one(
    c: &mut [Reader],
    idx: usize,
    default_mark: u32,
    prev_timeout: &mut u32,
    last_near: &mut [Option<IpAddr>; 2],
) -> Result<Entry, FormatError> {
    let flags = c[S_FLAGS].u8()?;
    let kind = (flags & R_L4_MASK) >> R_L4_SHIFT;
    if kind > L4_ICMP {
        return Err(FormatError::Corrupt(format!(
            "entry {idx}: unknown record flags {flags:#04x}"
        )));
    }
    let v6 = flags & R_IPV6 != 0;
    let proto = c[S_PROTO].u8()?;
    let near = if flags & R_NEAR_SAME != 0 {
        last_near[usize::from(v6)].ok_or_else(|| {
            FormatError::Corrupt(format!(
                "entry {idx}: refers to a previous address, none yet"
            ))
        })?
    } else {
        c[S_NEAR].addr(v6)?
    };
    last_near[usize::from(v6)] = Some(near);
    let far = c[S_FAR].addr(v6)?;
    let (src, dst) = if flags & R_SWAP != 0 {
        (far, near)
    } else {
        (near, far)
    };
    let (a, b) = c.split_at_mut(S_DPORT);
    let l4 = read_l4(&mut a[S_SPORT], &mut b[0], kind)?;
    let status = c[S_STATUS].varint_u32()?;
    let delta = unzigzag(c[S_TIMEOUT].varint()?);
    let timeout = i64::from(*prev_timeout)
        .checked_add(delta)
        .and_then(|t| u32::try_from(t).ok())
        .ok_or_else(|| FormatError::Corrupt(format!("entry {idx}: timeout out of range")))?;
    *prev_timeout = timeout;
    let mark = default_mark;
    let mut protoinfo = None;
    if flags & R_TCPINFO != 0 {
        let t = c[S_TCPINFO].take(5)?;
        protoinfo = Some(ProtoInfo::Tcp {
            state: t[0],
            wscale_orig: t[1],
            wscale_reply: t[2],
            flags_orig: t[3],
            flags_reply: t[4],
        });
    }
    let orig = Tuple {
        src,
        dst,
        proto,
        l4,
        zone: None,
    };
    let mut reply = None;
    if flags & R_REPLY != 0 {
        let r = &mut c[S_REPLY];
        let rsrc = r.addr(v6)?;
        let rdst = r.addr(v6)?;
        // Reply l4 is stored inline in the reply column: sport part, then
        // dport part, the same layout as the orig columns.
        let l4 = match kind {
            L4_PORTS => {
                let p = r.take(4)?;
                L4::Ports {
                    src: u16::from_be_bytes([p[0], p[1]]),
                    dst: u16::from_be_bytes([p[2], p[3]]),
                }
            }
            L4_ICMP => {
                let p = r.take(4)?;
                L4::Icmp {
                    id: u16::from_be_bytes([p[0], p[1]]),
                    kind: p[2],
                    code: p[3],
                }
            }
            _ => L4::None,
        };
        reply = Some(Tuple {
            src: rsrc,
            dst: rdst,
            proto,
            l4,
            zone: None,
        });
    }
    let mut e = Entry {
        orig,
        reply: orig, // fixed below
        status,
        timeout,
        mark,
        zone: 0,
        labels: None,
        protoinfo,
        seq_adj_orig: None,
        seq_adj_reply: None,
        helper: None,
        id: None,
    };
    let mut reply_zone = None;
    if flags & R_ATTRS != 0 {
        let a = &mut c[S_ATTRS];
        let mut seen = [false; 256];
        loop {
            let t = a.u8()?;
            if t == ATTR_END {
                break;
            }
            let len = a.varint()?;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > a.b.len() {
                return Err(FormatError::Corrupt(format!(
                    "entry {idx}: attribute {t:#04x} length {len} beyond the column"
                )));
            }
            let d = a.take(len)?;
            if std::mem::replace(&mut seen[t as usize], true) {
                return Err(FormatError::Corrupt(format!(
                    "entry {idx}: attribute {t:#04x} appears twice"
                )));
            }
            let want = |n: usize| -> Result<(), FormatError> {
                if len != n {
                    return Err(FormatError::Corrupt(format!(
                        "entry {idx}: attribute {t:#04x} has length {len}, expected {n}"
                    )));
                }
                Ok(())
            };
            match t {
                ATTR_MARK => {
                    want(4)?;
                    e.mark = le32(d, 0);
                }
                ATTR_ZONE => {
                    want(2)?;
                    e.zone = le16(d, 0);
                }
                ATTR_ORIG_ZONE => {
                    want(2)?;
                    e.orig.zone = Some(le16(d, 0));
                }
                ATTR_REPLY_ZONE => {
                    want(2)?;
                    reply_zone = Some(le16(d, 0));
                }
                ATTR_LABELS => {
                    want(16)?;
                    let mut l = [0u8; 16];
                    l.copy_from_slice(d);
                    e.labels = Some(l);
                }
                ATTR_SCTP | ATTR_DCCP if e.protoinfo.is_some() => {
                    return Err(FormatError::Corrupt(format!(
                        "entry {idx}: more than one protocol info"
                    )));
                }
                ATTR_SCTP => {
                    want(9)?;
                    e.protoinfo = Some(ProtoInfo::Sctp {
                        state: d[0],
                        vtag_orig: le32(d, 1),
                        vtag_reply: le32(d, 5),
                    });
                }
                ATTR_DCCP => {
                    want(10)?;
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&d[2..10]);
                    e.protoinfo = Some(ProtoInfo::Dccp {
                        state: d[0],
                        role: d[1],
                        handshake_seq: u64::from_le_bytes(s),
                    });
                }
                ATTR_SEQ_ADJ_ORIG => {
                    want(12)?;
                    e.seq_adj_orig = Some(read_seq_adj(d));
                }
                ATTR_SEQ_ADJ_REPLY => {
                    want(12)?;
                    e.seq_adj_reply = Some(read_seq_adj(d));
                }
                ATTR_HELPER => {
                    if len > MAX_HELPER_LEN {
                        return Err(FormatError::Corrupt(format!(
                            "entry {idx}: helper name of {len} bytes (max {MAX_HELPER_LEN})"
                        )));
                    }
                    let s = std::str::from_utf8(d).map_err(|_| {
                        FormatError::Corrupt(format!("entry {idx}: helper name is not UTF-8"))
                    })?;
                    e.helper = Some(s.to_owned());
                }
                t if t & ATTR_REQUIRED != 0 => {
                    return Err(FormatError::UnknownRequiredAttribute {
                        entry: idx,
                        kind: t,
                    });
                }
                _ => {} // unknown optional attribute: skipped
            }
        }
    }
    e.reply = match reply {
        Some(mut r) => {
            r.zone = reply_zone;
            r
        }
        None => {
            if reply_zone.is_some() {
                return Err(FormatError::Corrupt(format!(
                    "entry {idx}: reply zone without an explicit reply tuple"
                )));
            }
            e.orig.inverse()
        }
    };
    Ok(e)
}

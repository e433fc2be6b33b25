//! State format v1: header, columnar records, zstd, crc32c.
//! The byte-level specification is `docs/state-format.md`; keep them in step.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::FormatError;
use crate::entry::{Entry, ProtoInfo, SeqAdj, Tuple, L4};

pub const MAGIC: [u8; 4] = *b"CTVS";
pub const MAJOR: u8 = 1;
pub const MINOR: u8 = 0;
/// Minor version of a segmented blob (v1.1; only the SEGMENTS flag is new).
pub const MINOR_SEGMENTS: u8 = 1;
/// Minor version of a patched blob (v1.2; only the PATCH flag is new).
pub const MINOR_PATCH: u8 = 2;
pub const HEADER_LEN: usize = 32;

/// Header flag: the sender dropped entries to fit its byte budget.
pub const FLAG_TRUNCATED: u16 = 1 << 0;
/// Header flag: the payload is one zstd frame.
pub const FLAG_ZSTD: u16 = 1 << 1;
/// Header flag (required, v1.1): the payload is a segment table and
/// independently coded segments (`docs/state-format.md` §1.1).
pub const FLAG_SEGMENTS: u16 = 1 << 8;
/// Header flag (required, v1.2): a patch block (base segments, their age,
/// records to skip) precedes the segment table (`docs/state-format.md`
/// §1.2). Only together with SEGMENTS.
pub const FLAG_PATCH: u16 = 1 << 9;
/// Flags this decoder understands. Unknown bits 0–7 are informational and
/// ignored; unknown bits 8–15 change the meaning of the payload and are an
/// error.
const KNOWN_FLAGS: u16 = FLAG_TRUNCATED | FLAG_ZSTD | FLAG_SEGMENTS | FLAG_PATCH;
const REQUIRED_FLAG_MASK: u16 = 0xff00;

/// Ceiling on the decompressed payload a decoder accepts (64 MiB).
pub const MAX_RAW_LEN: usize = 64 << 20;
/// Ceiling on the entry count a decoder accepts.
pub const MAX_ENTRIES: usize = 2_000_000;
/// Smallest possible record: flags, proto, two IPv4 addresses, 1-byte
/// status and timeout varints (other protocol, no ports).
pub const MIN_RECORD_LEN: usize = 12;

/// zstd level: higher levels barely shrink the blob and cost migration
/// downtime (docs/state-format.md, section 1).
pub const ZSTD_LEVEL: i32 = 1;

// Record flags byte.
const R_IPV6: u8 = 1 << 0;
const R_REPLY: u8 = 1 << 1;
const R_NEAR_SAME: u8 = 1 << 2;
const R_ATTRS: u8 = 1 << 3;
const R_TCPINFO: u8 = 1 << 4;
const R_L4_SHIFT: u8 = 5;
const R_L4_MASK: u8 = 0b11 << R_L4_SHIFT;
const R_SWAP: u8 = 1 << 7;
const L4_NONE: u8 = 0;
const L4_PORTS: u8 = 1;
const L4_ICMP: u8 = 2;

// Attribute types; bit 7 set = required (a decoder that does not know it
// must reject the blob), clear = optional (skipped when unknown).
pub const ATTR_END: u8 = 0x00;
pub const ATTR_LABELS: u8 = 0x01;
pub const ATTR_ZONE: u8 = 0x81;
pub const ATTR_ORIG_ZONE: u8 = 0x82;
pub const ATTR_REPLY_ZONE: u8 = 0x83;
pub const ATTR_SCTP: u8 = 0x84;
pub const ATTR_DCCP: u8 = 0x85;
pub const ATTR_SEQ_ADJ_ORIG: u8 = 0x86;
pub const ATTR_SEQ_ADJ_REPLY: u8 = 0x87;
pub const ATTR_HELPER: u8 = 0x88;
pub const ATTR_MARK: u8 = 0x89;
pub const ATTR_REQUIRED: u8 = 0x80;
/// Longest helper name carried (the kernel's limit is 16 bytes).
pub const MAX_HELPER_LEN: usize = 64;

/// Column streams, in payload order.
const S_FLAGS: usize = 0;
const S_PROTO: usize = 1;
const S_NEAR: usize = 2;
const S_FAR: usize = 3;
const S_SPORT: usize = 4;
const S_DPORT: usize = 5;
const S_STATUS: usize = 6;
const S_TIMEOUT: usize = 7;
const S_TCPINFO: usize = 8;
const S_REPLY: usize = 9;
const S_ATTRS: usize = 10;
pub const STREAMS: usize = 11;
const STREAM_NAMES: [&str; STREAMS] = [
    "flags", "proto", "near", "far", "sport", "dport", "status", "timeout", "tcpinfo", "reply",
    "attrs",
];

/// True when `e` can be represented: both tuples of one address family,
/// one protocol and one layer-4 kind (the kernel never makes anything else).
pub fn representable(e: &Entry) -> bool {
    e.orig.src.is_ipv6() == e.orig.dst.is_ipv6()
        && e.reply.src.is_ipv6() == e.orig.src.is_ipv6()
        && e.reply.dst.is_ipv6() == e.orig.src.is_ipv6()
        && e.reply.proto == e.orig.proto
        && l4_kind(&e.orig.l4) == l4_kind(&e.reply.l4)
        && e.helper.as_ref().is_none_or(|h| h.len() <= MAX_HELPER_LEN)
}

fn l4_kind(l4: &L4) -> u8 {
    match l4 {
        L4::None => L4_NONE,
        L4::Ports { .. } => L4_PORTS,
        L4::Icmp { .. } => L4_ICMP,
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_addr(out: &mut Vec<u8>, a: &IpAddr) {
    match a {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

fn put_l4(sport: &mut Vec<u8>, dport: &mut Vec<u8>, l4: &L4) {
    match *l4 {
        L4::Ports { src, dst } => {
            sport.extend_from_slice(&src.to_be_bytes());
            dport.extend_from_slice(&dst.to_be_bytes());
        }
        L4::Icmp { id, kind, code } => {
            sport.extend_from_slice(&id.to_be_bytes());
            dport.extend_from_slice(&[kind, code]);
        }
        L4::None => {}
    }
}

/// The L4 fields in one column: the sport part, then the dport part (the
/// reply tuple's layout).
fn put_l4_inline(out: &mut Vec<u8>, l4: &L4) {
    match *l4 {
        L4::Ports { src, dst } => {
            out.extend_from_slice(&src.to_be_bytes());
            out.extend_from_slice(&dst.to_be_bytes());
        }
        L4::Icmp { id, kind, code } => {
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&[kind, code]);
        }
        L4::None => {}
    }
}

fn put_attr(out: &mut Vec<u8>, kind: u8, data: &[u8]) {
    out.push(kind);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

fn seq_adj_bytes(s: &SeqAdj) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&s.correction_pos.to_le_bytes());
    b[4..8].copy_from_slice(&s.offset_before.to_le_bytes());
    b[8..12].copy_from_slice(&s.offset_after.to_le_bytes());
    b
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// What a record's attribute list holds.
enum Attrs<'a> {
    None,
    /// Only a mark other than the blob's default.
    MarkOnly(u32),
    /// Whatever the entry has (see `Columns::push`).
    Of(&'a Entry),
}

fn tcp_bytes(e: &Entry) -> Option<[u8; 5]> {
    match e.protoinfo {
        Some(ProtoInfo::Tcp {
            state,
            wscale_orig,
            wscale_reply,
            flags_orig,
            flags_reply,
        }) => Some([state, wscale_orig, wscale_reply, flags_orig, flags_reply]),
        _ => None,
    }
}

/// An entry whose record is fully described by a few fields: reply tuple
/// implied (no NAT), no zone, labels, SCTP/DCCP info, sequence adjustment or
/// helper — the great majority of a VM's entries. The warm cache keeps one
/// next to each such entry, so that Save reads ~60 bytes per entry instead
/// of the whole ~230-byte entry (Save is memory-bound: the tables are cold
/// by the time QEMU asks).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Compact {
    pub orig: Tuple,
    pub status: u32,
    pub mark: u32,
    tcp: Option<[u8; 5]>,
    /// The priority class while more than ABOUT_TO_EXPIRE_SECS are left.
    class: u8,
}

impl Compact {
    /// The compact form of `e`, when it has one.
    pub fn of(e: &Entry) -> Option<Compact> {
        let simple = e.zone == 0
            && e.orig.zone.is_none()
            && e.labels.is_none()
            && matches!(e.protoinfo, None | Some(ProtoInfo::Tcp { .. }))
            && e.seq_adj_orig.is_none()
            && e.seq_adj_reply.is_none()
            && e.helper.is_none()
            && representable(e)
            && e.reply == e.orig.inverse();
        simple.then(|| Compact {
            orig: e.orig,
            status: e.status,
            mark: e.mark,
            tcp: tcp_bytes(e),
            class: super::priority::value_class_at(e, u32::MAX) as u8,
        })
    }

    /// [`super::priority::value_key_at`] of the entry with `timeout` left.
    pub fn value_key_at(&self, timeout: u32) -> u64 {
        let class = if timeout <= super::priority::ABOUT_TO_EXPIRE_SECS {
            0
        } else {
            self.class
        };
        (u64::from(class) << 32) | u64::from(timeout)
    }

    /// The entry this stands for, with `timeout` left and no id.
    pub fn to_entry(&self, timeout: u32) -> Entry {
        Entry {
            orig: self.orig,
            reply: self.orig.inverse(),
            status: self.status,
            timeout,
            mark: self.mark,
            zone: 0,
            labels: None,
            protoinfo: self.tcp.map(|t| ProtoInfo::Tcp {
                state: t[0],
                wscale_orig: t[1],
                wscale_reply: t[2],
                flags_orig: t[3],
                flags_reply: t[4],
            }),
            seq_adj_orig: None,
            seq_adj_reply: None,
            helper: None,
            id: None,
        }
    }
}

/// An entry to encode: the entry itself, or its [`Compact`] form.
#[derive(Debug, Clone, Copy)]
pub enum Rec<'a> {
    Full(&'a Entry),
    Fast(&'a Compact),
}

impl Rec<'_> {
    pub fn mark(&self) -> u32 {
        match self {
            Rec::Full(e) => e.mark,
            Rec::Fast(c) => c.mark,
        }
    }

    pub fn value_key_at(&self, timeout: u32) -> u64 {
        match self {
            Rec::Full(e) => super::priority::value_key_at(e, timeout),
            Rec::Fast(c) => c.value_key_at(timeout),
        }
    }

    pub fn representable(&self) -> bool {
        match self {
            Rec::Full(e) => representable(e),
            Rec::Fast(_) => true,
        }
    }

    /// The entry, with `timeout` left (cloned or rebuilt).
    pub fn to_entry(&self, timeout: u32) -> Entry {
        match self {
            Rec::Full(e) => Entry {
                timeout,
                ..(*e).clone()
            },
            Rec::Fast(c) => c.to_entry(timeout),
        }
    }
}

/// Column buffers of one encoding, optionally with each stream's length
/// after every entry so that any prefix can be assembled without
/// re-encoding.
pub struct Columns {
    s: [Vec<u8>; STREAMS],
    /// `offsets[k * STREAMS + i]`: length of stream `i` after `k` entries;
    /// empty when only the whole set (and the empty prefix) is wanted,
    /// which saves 44 bytes of fresh memory per entry.
    offsets: Vec<u32>,
    prefixes: bool,
    n: usize,
    default_mark: u32,
    prev_timeout: u32,
    last_near: [Option<IpAddr>; 2],
}

impl Columns {
    fn new(default_mark: u32, capacity: usize, prefixes: bool) -> Self {
        // Typical per-entry bytes of each column, to avoid regrowing.
        const GUESS: [usize; STREAMS] = [1, 1, 1, 6, 2, 2, 2, 2, 4, 1, 1];
        let mut c = Columns {
            s: GUESS.map(|g| Vec::with_capacity(g * capacity)),
            offsets: if prefixes {
                super::bigvec::with_capacity((capacity + 1) * STREAMS)
            } else {
                Vec::new()
            },
            prefixes,
            n: 0,
            default_mark,
            prev_timeout: 0,
            last_near: [None, None],
        };
        if prefixes {
            c.offsets.extend([0u32; STREAMS]);
        }
        c
    }

    fn len(&self) -> usize {
        self.n
    }

    /// Each stream's length after the first `k` entries: `k` is the whole
    /// set, or any count when prefixes are recorded.
    fn lens(&self, k: usize) -> [u32; STREAMS] {
        if k == self.n {
            return std::array::from_fn(|i| self.s[i].len() as u32);
        }
        assert!(
            self.prefixes,
            "prefix of {k} of {} entries without recorded prefixes",
            self.n
        );
        std::array::from_fn(|i| self.offsets[k * STREAMS + i])
    }

    /// Appends `r` with `timeout` seconds left (its own field is ignored).
    fn push(&mut self, r: Rec, timeout: u32) {
        match r {
            Rec::Full(e) => {
                let reply_implied = e.reply == e.orig.inverse();
                let attrs = e.mark != self.default_mark
                    || e.zone != 0
                    || e.orig.zone.is_some()
                    || (!reply_implied && e.reply.zone.is_some())
                    || e.labels.is_some()
                    || matches!(
                        e.protoinfo,
                        Some(ProtoInfo::Sctp { .. } | ProtoInfo::Dccp { .. })
                    )
                    || e.seq_adj_orig.is_some()
                    || e.seq_adj_reply.is_some()
                    || e.helper.is_some();
                self.push_core(
                    &e.orig,
                    e.status,
                    timeout,
                    tcp_bytes(e),
                    (!reply_implied).then_some(&e.reply),
                    if attrs { Attrs::Of(e) } else { Attrs::None },
                );
            }
            Rec::Fast(c) => {
                let attrs = if c.mark != self.default_mark {
                    Attrs::MarkOnly(c.mark)
                } else {
                    Attrs::None
                };
                self.push_core(&c.orig, c.status, timeout, c.tcp, None, attrs);
            }
        }
    }

    /// One record: `reply` is `None` when it is `orig.inverse()`.
    fn push_core(
        &mut self,
        orig: &Tuple,
        status: u32,
        timeout: u32,
        tcp: Option<[u8; 5]>,
        reply: Option<&Tuple>,
        attrs: Attrs,
    ) {
        let s = &mut self.s;
        let v6 = orig.src.is_ipv6();
        let mut flags = l4_kind(&orig.l4) << R_L4_SHIFT;
        if v6 {
            flags |= R_IPV6;
        }
        // The local side of a VM's flows repeats; keeping it in one column
        // and the peer in the other lets zstd erase the local side.
        let near = &mut self.last_near[usize::from(v6)];
        let swap = *near == Some(orig.dst) && *near != Some(orig.src);
        let (n_addr, f_addr) = if swap {
            flags |= R_SWAP;
            (&orig.dst, &orig.src)
        } else {
            (&orig.src, &orig.dst)
        };
        let near_same = *near == Some(*n_addr);
        *near = Some(*n_addr);
        if near_same {
            flags |= R_NEAR_SAME;
        }
        if reply.is_some() {
            flags |= R_REPLY;
        }
        if !matches!(attrs, Attrs::None) {
            flags |= R_ATTRS;
        }
        if let Some(t) = tcp {
            flags |= R_TCPINFO;
            s[S_TCPINFO].extend_from_slice(&t);
        }
        s[S_FLAGS].push(flags);
        s[S_PROTO].push(orig.proto);
        if !near_same {
            put_addr(&mut s[S_NEAR], n_addr);
        }
        put_addr(&mut s[S_FAR], f_addr);
        {
            let (a, b) = s.split_at_mut(S_DPORT);
            put_l4(&mut a[S_SPORT], &mut b[0], &orig.l4);
        }
        put_varint(&mut s[S_STATUS], u64::from(status));
        // Entries arrive in priority order, so within a class timeouts
        // descend and the deltas are small.
        put_varint(
            &mut s[S_TIMEOUT],
            zigzag(i64::from(timeout) - i64::from(self.prev_timeout)),
        );
        self.prev_timeout = timeout;
        if let Some(r) = reply {
            let out = &mut s[S_REPLY];
            put_addr(out, &r.src);
            put_addr(out, &r.dst);
            put_l4_inline(out, &r.l4);
        }
        let a = &mut s[S_ATTRS];
        match attrs {
            Attrs::None => {}
            Attrs::MarkOnly(mark) => {
                put_attr(a, ATTR_MARK, &mark.to_le_bytes());
                a.push(ATTR_END);
            }
            Attrs::Of(e) => {
                if e.mark != self.default_mark {
                    put_attr(a, ATTR_MARK, &e.mark.to_le_bytes());
                }
                if e.zone != 0 {
                    put_attr(a, ATTR_ZONE, &e.zone.to_le_bytes());
                }
                if let Some(z) = e.orig.zone {
                    put_attr(a, ATTR_ORIG_ZONE, &z.to_le_bytes());
                }
                if reply.is_some() {
                    if let Some(z) = e.reply.zone {
                        put_attr(a, ATTR_REPLY_ZONE, &z.to_le_bytes());
                    }
                }
                if let Some(l) = &e.labels {
                    put_attr(a, ATTR_LABELS, l);
                }
                match e.protoinfo {
                    Some(ProtoInfo::Sctp {
                        state,
                        vtag_orig,
                        vtag_reply,
                    }) => {
                        let mut b = [0u8; 9];
                        b[0] = state;
                        b[1..5].copy_from_slice(&vtag_orig.to_le_bytes());
                        b[5..9].copy_from_slice(&vtag_reply.to_le_bytes());
                        put_attr(a, ATTR_SCTP, &b);
                    }
                    Some(ProtoInfo::Dccp {
                        state,
                        role,
                        handshake_seq,
                    }) => {
                        let mut b = [0u8; 10];
                        b[0] = state;
                        b[1] = role;
                        b[2..10].copy_from_slice(&handshake_seq.to_le_bytes());
                        put_attr(a, ATTR_DCCP, &b);
                    }
                    _ => {}
                }
                if let Some(sa) = &e.seq_adj_orig {
                    put_attr(a, ATTR_SEQ_ADJ_ORIG, &seq_adj_bytes(sa));
                }
                if let Some(sa) = &e.seq_adj_reply {
                    put_attr(a, ATTR_SEQ_ADJ_REPLY, &seq_adj_bytes(sa));
                }
                if let Some(h) = &e.helper {
                    put_attr(a, ATTR_HELPER, h.as_bytes());
                }
                a.push(ATTR_END);
            }
        }
        self.n += 1;
        if self.prefixes {
            for st in &self.s {
                self.offsets.push(st.len() as u32);
            }
        }
    }

    /// Size of the uncompressed payload of the first `k` entries.
    fn raw_len(&self, k: usize) -> usize {
        self.lens(k)
            .iter()
            .map(|&l| l as usize + varint_len(u64::from(l)))
            .sum::<usize>()
            + 1
    }

    /// The uncompressed payload of the first `k` entries.
    fn write_raw(&self, k: usize, out: &mut Vec<u8>) {
        let off = self.lens(k);
        let total: usize = off.iter().map(|&l| l as usize + 5).sum::<usize>() + 1;
        out.reserve(total);
        out.push(STREAMS as u8);
        for (s, &l) in self.s.iter().zip(&off) {
            put_varint(out, u64::from(l));
            out.extend_from_slice(&s[..l as usize]);
        }
    }
}

/// The most common mark, by majority vote (exact when one mark holds more
/// than half the entries, which is the per-VM case; any value is correct).
pub fn default_mark<'a>(entries: impl Iterator<Item = &'a Entry>) -> u32 {
    default_mark_of(entries.map(|e| e.mark))
}

fn default_mark_of(marks: impl Iterator<Item = u32>) -> u32 {
    let (mut cand, mut n) = (0u32, 0usize);
    for mark in marks {
        if n == 0 {
            cand = mark;
            n = 1;
        } else if mark == cand {
            n += 1;
        } else {
            n -= 1;
        }
    }
    cand
}

const PREFETCH_AHEAD: usize = 6;

#[inline(always)]
fn prefetch(e: &Entry) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = (e as *const Entry).cast::<i8>();
        // SAFETY: a prefetch is only a hint: it never faults and the
        // addresses (wrapping arithmetic, no dereference) need not be valid.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(128));
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(std::mem::size_of::<Entry>() - 1));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = e;
}

/// An entry to encode, the seconds it has left (which the encoder writes
/// instead of `entry.timeout`) and its priority key.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub rec: Rec<'a>,
    pub timeout: u32,
    /// `value_key_at(timeout)`, or [`View::EXCLUDED`] for an entry the
    /// format cannot represent. Precomputed, so that ranking reads only
    /// the views: the entries stay untouched until they are encoded.
    pub key: u64,
}

impl<'a> View<'a> {
    /// Key of an entry the encoder leaves out (not [`representable`]).
    pub const EXCLUDED: u64 = u64::MAX;

    pub fn new(rec: Rec<'a>, timeout: u32) -> Self {
        let key = if rec.representable() {
            rec.value_key_at(timeout)
        } else {
            Self::EXCLUDED
        };
        View { rec, timeout, key }
    }

    /// For callers that know the key already (the warm cache keeps each
    /// entry's priority class next to it).
    pub fn with_key(rec: Rec<'a>, timeout: u32, key: u64) -> Self {
        View { rec, timeout, key }
    }
}

#[inline(always)]
fn prefetch_compact(c: &Compact) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = (c as *const Compact).cast::<i8>();
        // SAFETY: a prefetch is only a hint (see `prefetch`).
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(std::mem::size_of::<Compact>() - 1));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = c;
}

/// Encodes entries given in priority order; any prefix can then be turned
/// into a complete blob.
pub struct Encoder {
    cols: Columns,
    raw: Vec<u8>,
    cctx: zstd::bulk::Compressor<'static>,
}

fn compressor() -> Result<zstd::bulk::Compressor<'static>, FormatError> {
    zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|e| FormatError::Compression(e.to_string()))
}

/// Builds the columns of `views` in order.
fn build_columns(views: &[View], default_mark: u32, prefixes: bool) -> Columns {
    let mut cols = Columns::new(default_mark, views.len(), prefixes);
    for (i, v) in views.iter().enumerate() {
        // Priority order visits entries in random memory order; fetch
        // a few ahead so the cache misses overlap.
        if let Some(ahead) = views.get(i + PREFETCH_AHEAD) {
            match ahead.rec {
                Rec::Full(e) => prefetch(e),
                Rec::Fast(c) => prefetch_compact(c),
            }
        }
        cols.push(v.rec, v.timeout);
    }
    cols
}

/// Compresses a raw payload; `None` when compression would not shrink it.
fn compress(
    cctx: &mut zstd::bulk::Compressor<'static>,
    raw: &[u8],
) -> Result<Option<Vec<u8>>, FormatError> {
    if raw.is_empty() {
        return Ok(None);
    }
    let z = cctx
        .compress(raw)
        .map_err(|e| FormatError::Compression(e.to_string()))?;
    Ok((z.len() < raw.len()).then_some(z))
}

/// The 32-byte header followed by `payload`, checksummed.
fn assemble(h: &Header, parts: &[&[u8]]) -> Vec<u8> {
    let payload_len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(HEADER_LEN + payload_len);
    out.extend_from_slice(&MAGIC);
    out.push(MAJOR);
    out.push(h.minor);
    out.extend_from_slice(&h.flags.to_le_bytes());
    out.extend_from_slice(&h.count.to_le_bytes());
    out.extend_from_slice(&h.dropped.to_le_bytes());
    out.extend_from_slice(&h.default_mark.to_le_bytes());
    out.extend_from_slice(&h.raw_len.to_le_bytes());
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    let mut crc = crc32c::crc32c(&out);
    for p in parts {
        crc = crc32c::crc32c_append(crc, p);
    }
    out.extend_from_slice(&crc.to_le_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

fn dropped_u32(dropped: usize) -> u32 {
    dropped.min(u32::MAX as usize) as u32
}

impl Encoder {
    /// Builds the columns of `views` (representable, in the order the blob
    /// will hold them); [`blob`](Self::blob) then takes any prefix.
    pub fn new(views: &[View], default_mark: u32) -> Result<Self, FormatError> {
        Self::build(views, default_mark, true)
    }

    /// Like [`new`](Self::new), but [`blob`](Self::blob) and
    /// [`raw_len`](Self::raw_len) take only all entries or none: cheaper
    /// when everything is expected to fit.
    pub fn whole(views: &[View], default_mark: u32) -> Result<Self, FormatError> {
        Self::build(views, default_mark, false)
    }

    /// Whether any prefix can be taken.
    pub fn has_prefixes(&self) -> bool {
        self.cols.prefixes
    }

    fn build(views: &[View], default_mark: u32, prefixes: bool) -> Result<Self, FormatError> {
        let cctx = compressor()?;
        let cols = build_columns(views, default_mark, prefixes);
        Ok(Encoder {
            cols,
            raw: Vec::new(),
            cctx,
        })
    }

    pub fn len(&self) -> usize {
        self.cols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Uncompressed payload size of the first `k` entries (no compression
    /// done): lets the budget search pick its first attempt cheaply.
    pub fn raw_len(&self, k: usize) -> usize {
        if k == 0 {
            0
        } else {
            self.cols.raw_len(k.min(self.len()))
        }
    }

    /// The complete blob of the first `k` entries, recording `dropped`.
    pub fn blob(&mut self, k: usize, dropped: usize) -> Result<Vec<u8>, FormatError> {
        let k = k.min(self.len());
        self.raw.clear();
        // Zero entries: an empty payload, so the smallest blob is the header.
        if k > 0 {
            self.cols.write_raw(k, &mut self.raw);
        }
        let z = compress(&mut self.cctx, &self.raw)?;
        let (flags, payload): (u16, &[u8]) = match &z {
            Some(z) => (FLAG_ZSTD, z),
            None => (0, &self.raw),
        };
        let h = Header {
            minor: MINOR,
            flags: flags | if dropped > 0 { FLAG_TRUNCATED } else { 0 },
            count: k as u32,
            dropped: dropped_u32(dropped),
            default_mark: self.cols.default_mark,
            raw_len: self.raw.len() as u32,
            payload_len: 0,
        };
        Ok(assemble(&h, &[payload]))
    }
}

/// Fewest entries per segment: below this a second thread costs more than
/// it saves and the smaller zstd context costs ratio.
pub const MIN_SEGMENT_ENTRIES: usize = 16_384;
/// Most segments one blob may hold (the decoder's ceiling).
pub const MAX_SEGMENTS: usize = 16;
/// Bytes of one segment table row: count, raw_len, stored_len (u32 each).
const SEGMENT_ENTRY_LEN: usize = 12;

/// How many segments [`encode_segmented`] uses for `n` entries on this
/// machine: one per CPU (at most 4) while each keeps at least
/// [`MIN_SEGMENT_ENTRIES`].
pub fn default_segments(n: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    cpus.min(4).min(n / MIN_SEGMENT_ENTRIES).max(1)
}

/// The most common mark of `views` ([`default_mark`]), for callers of
/// [`encode_segmented`] and [`Encoder`] that did not get it while ranking.
pub fn views_default_mark(views: &[View]) -> u32 {
    default_mark_of(views.iter().map(|v| v.rec.mark()))
}

/// One compressed segment: `count` records, `raw_len` raw bytes, zstd frame
/// in `bytes` (§1.1: a v1.0 payload decoded with fresh state).
#[derive(Debug, Clone)]
pub struct Frame {
    pub count: u32,
    pub raw_len: u32,
    pub bytes: Vec<u8>,
}

/// Encodes all of `views` (priority order) as one blob in `segments`
/// independent parts built and compressed in parallel (Save is migration
/// downtime and the guest is stopped, so the CPUs are free). One segment
/// gives the plain v1.0 layout. Layout: `docs/state-format.md` §1.1.
pub fn encode_segmented(
    views: &[View],
    segments: usize,
    dropped: usize,
    default_mark: u32,
) -> Result<Vec<u8>, FormatError> {
    let segments = segments.clamp(1, MAX_SEGMENTS).min(views.len().max(1));
    if segments == 1 {
        let n = views.len();
        return Encoder::whole(views, default_mark)?.blob(n, dropped);
    }
    let frames = encode_frames(views, segments, default_mark)?;
    let mut table = Vec::with_capacity(1 + SEGMENT_ENTRY_LEN * frames.len());
    put_segment_table(&mut table, frames.len(), frames.iter());
    let h = Header {
        minor: MINOR_SEGMENTS,
        flags: FLAG_SEGMENTS | FLAG_ZSTD | if dropped > 0 { FLAG_TRUNCATED } else { 0 },
        count: views.len() as u32,
        dropped: dropped_u32(dropped),
        default_mark,
        raw_len: frames.iter().map(|f| f.raw_len).sum(),
        payload_len: 0,
    };
    let mut refs: Vec<&[u8]> = vec![&table];
    refs.extend(frames.iter().map(|f| f.bytes.as_slice()));
    Ok(assemble(&h, &refs))
}

/// `n`, then one row per frame (§1.1).
fn put_segment_table<'a>(out: &mut Vec<u8>, n: usize, frames: impl Iterator<Item = &'a Frame>) {
    out.push(n as u8);
    for f in frames {
        out.extend_from_slice(&f.count.to_le_bytes());
        out.extend_from_slice(&f.raw_len.to_le_bytes());
        out.extend_from_slice(&(f.bytes.len() as u32).to_le_bytes());
    }
}

/// `views`, already in priority order, as `segments` balanced frames
/// (clamped to 1..=[`MAX_SEGMENTS`] and to at most one per view; no views,
/// no frames), built and compressed in parallel. The warm cache keeps these
/// as the base of a patched blob ([`assemble_patched`]); every frame must
/// be encoded with the `default_mark` of the blob it goes into.
pub fn encode_frames(
    views: &[View],
    segments: usize,
    default_mark: u32,
) -> Result<Vec<Frame>, FormatError> {
    if views.is_empty() {
        return Ok(Vec::new());
    }
    if views.len() > MAX_ENTRIES {
        return Err(FormatError::TooManyEntries {
            count: views.len() as u64,
            max: MAX_ENTRIES,
        });
    }
    let segments = segments.clamp(1, MAX_SEGMENTS).min(views.len());
    // Balanced: the first `len % segments` segments take one entry more.
    let (base, extra) = (views.len() / segments, views.len() % segments);
    let mut chunks = Vec::with_capacity(segments);
    let mut rest = views;
    for i in 0..segments {
        let (c, r) = rest.split_at(base + usize::from(i < extra));
        chunks.push(c);
        rest = r;
    }
    // Segments are always compressed (the ZSTD flag covers the whole blob):
    // at MIN_SEGMENT_ENTRIES and more real entries always shrink, and a tiny
    // delta costs a few bytes of frame header at most.
    let work = |part: &[View]| -> Result<Frame, FormatError> {
        let cols = build_columns(part, default_mark, false);
        let mut raw = Vec::new();
        cols.write_raw(part.len(), &mut raw);
        let raw_len = u32::try_from(raw.len())
            .ok()
            .filter(|&l| l as usize <= MAX_RAW_LEN)
            .ok_or(FormatError::DecompressionBomb {
                declared: raw.len() as u64,
                max: MAX_RAW_LEN,
            })?;
        let bytes = compressor()?
            .compress(&raw)
            .map_err(|e| FormatError::Compression(e.to_string()))?;
        Ok(Frame {
            count: part.len() as u32,
            raw_len,
            bytes,
        })
    };
    in_parallel(
        &chunks,
        |_, c| work(c),
        || FormatError::Compression("segment encoder thread panicked".into()),
    )
}

/// Assembles a v1.2 patched blob (§1.2): the `base` frames, whose records
/// lose `age_secs` seconds of timeout on Load and of which the stored
/// indices in `skip` (strictly ascending, below the base's record count)
/// are left out, then the `delta` frames (may be none). All frames must
/// have been encoded with `default_mark`.
///
/// On Save's hot path: one allocation of the exact size, one copy of each
/// frame, one checksum pass; nothing else looks at the frames' bytes.
pub fn assemble_patched(
    base: &[Frame],
    age_secs: u32,
    skip: &[u32],
    delta: &[Frame],
    dropped: usize,
    default_mark: u32,
) -> Result<Vec<u8>, FormatError> {
    let bad = |m: String| Err(FormatError::Patch(m));
    if base.is_empty() {
        return bad("no base segment".into());
    }
    let n = base.len() + delta.len();
    if n > MAX_SEGMENTS {
        return bad(format!(
            "{} base and {} delta segments, at most {MAX_SEGMENTS} in all",
            base.len(),
            delta.len()
        ));
    }
    let (mut records, mut raw, mut bytes) = (0u64, 0u64, 0u64);
    let mut base_records = 0u64;
    for (i, f) in base.iter().chain(delta).enumerate() {
        if f.count == 0 {
            return bad(format!("segment {i} holds no entries"));
        }
        if (f.count as usize).saturating_mul(MIN_RECORD_LEN) > f.raw_len as usize {
            return bad(format!(
                "segment {i}: {} entries cannot fit in {} bytes",
                f.count, f.raw_len
            ));
        }
        records += u64::from(f.count);
        raw += u64::from(f.raw_len);
        bytes += f.bytes.len() as u64;
        if i + 1 == base.len() {
            base_records = records;
        }
    }
    if records > MAX_ENTRIES as u64 {
        return Err(FormatError::TooManyEntries {
            count: records,
            max: MAX_ENTRIES,
        });
    }
    if raw > MAX_RAW_LEN as u64 {
        return Err(FormatError::DecompressionBomb {
            declared: raw,
            max: MAX_RAW_LEN,
        });
    }
    let mut block_len = 1 + varint_len(u64::from(age_secs)) + varint_len(skip.len() as u64);
    let mut next = 0u64;
    for &s in skip {
        let s = u64::from(s);
        if s < next {
            return bad(format!("skip list not strictly ascending at {s}"));
        }
        if s >= base_records {
            return bad(format!(
                "skip of stored record {s}, beyond the {base_records} base records"
            ));
        }
        block_len += varint_len(s - next);
        next = s + 1;
    }
    let payload_len = block_len as u64 + 1 + (SEGMENT_ENTRY_LEN * n) as u64 + bytes;
    let Ok(payload_len) = u32::try_from(payload_len) else {
        return bad(format!("payload of {payload_len} bytes exceeds 32 bits"));
    };
    let total = HEADER_LEN + payload_len as usize;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&MAGIC);
    out.push(MAJOR);
    out.push(MINOR_PATCH);
    let flags =
        FLAG_SEGMENTS | FLAG_ZSTD | FLAG_PATCH | if dropped > 0 { FLAG_TRUNCATED } else { 0 };
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&((records - skip.len() as u64) as u32).to_le_bytes());
    out.extend_from_slice(&dropped_u32(dropped).to_le_bytes());
    out.extend_from_slice(&default_mark.to_le_bytes());
    out.extend_from_slice(&(raw as u32).to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // crc32c, below
    out.push(base.len() as u8);
    put_varint(&mut out, u64::from(age_secs));
    put_varint(&mut out, skip.len() as u64);
    let mut next = 0u32;
    for &s in skip {
        put_varint(&mut out, u64::from(s - next));
        next = s + 1;
    }
    put_segment_table(&mut out, n, base.iter().chain(delta));
    for f in base.iter().chain(delta) {
        out.extend_from_slice(&f.bytes);
    }
    debug_assert_eq!(out.len(), total);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..28]), &out[HEADER_LEN..]);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Header fields of a v1 blob.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub minor: u8,
    pub flags: u16,
    pub count: u32,
    pub dropped: u32,
    pub default_mark: u32,
    pub raw_len: u32,
    pub payload_len: u32,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Checks the header, the size declarations against the ceilings and the
/// checksum; nothing is allocated before these pass.
pub fn check_header(bytes: &[u8]) -> Result<Header, FormatError> {
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Truncated {
            what: "state header",
            needed: HEADER_LEN,
            got: bytes.len(),
        });
    }
    if bytes[..4] != MAGIC {
        return Err(FormatError::WrongMagic {
            found: bytes[..4].to_vec(),
        });
    }
    let major = bytes[4];
    let minor = bytes[5];
    if major != MAJOR {
        return Err(FormatError::UnsupportedVersion { major, minor });
    }
    let flags = le16(bytes, 6);
    let unknown = flags & REQUIRED_FLAG_MASK & !KNOWN_FLAGS;
    if unknown != 0 {
        return Err(FormatError::UnknownFlags(unknown));
    }
    let h = Header {
        minor,
        flags,
        count: le32(bytes, 8),
        dropped: le32(bytes, 12),
        default_mark: le32(bytes, 16),
        raw_len: le32(bytes, 20),
        payload_len: le32(bytes, 24),
    };
    let total = HEADER_LEN as u64 + u64::from(h.payload_len);
    if (bytes.len() as u64) < total {
        return Err(FormatError::Truncated {
            what: "state payload",
            needed: total as usize,
            got: bytes.len(),
        });
    }
    if (bytes.len() as u64) > total {
        return Err(FormatError::TrailingBytes {
            extra: bytes.len() - total as usize,
        });
    }
    let stored = le32(bytes, 28);
    let computed = crc32c::crc32c_append(crc32c::crc32c(&bytes[..28]), &bytes[HEADER_LEN..]);
    if stored != computed {
        return Err(FormatError::ChecksumMismatch { stored, computed });
    }
    if h.count as usize > MAX_ENTRIES {
        return Err(FormatError::TooManyEntries {
            count: u64::from(h.count),
            max: MAX_ENTRIES,
        });
    }
    if h.raw_len as usize > MAX_RAW_LEN {
        return Err(FormatError::DecompressionBomb {
            declared: u64::from(h.raw_len),
            max: MAX_RAW_LEN,
        });
    }
    if (h.count as u64) * (MIN_RECORD_LEN as u64) > u64::from(h.raw_len) {
        return Err(FormatError::AbsurdCount {
            count: h.count,
            raw_len: h.raw_len,
        });
    }
    if h.flags & FLAG_PATCH != 0 && h.flags & FLAG_SEGMENTS == 0 {
        return Err(FormatError::Corrupt(
            "PATCH flag without SEGMENTS (a patch needs the segment layout)".into(),
        ));
    }
    if h.flags & (FLAG_ZSTD | FLAG_SEGMENTS) == 0 && h.raw_len != h.payload_len {
        return Err(FormatError::Corrupt(format!(
            "uncompressed payload is {} bytes but the header declares {}",
            h.payload_len, h.raw_len
        )));
    }
    Ok(h)
}

/// Decodes a v1 blob completely; any defect anywhere fails the whole blob.
pub fn decode(bytes: &[u8]) -> Result<(Header, Vec<Entry>), FormatError> {
    let (h, mut segs) = decode_segments(bytes)?;
    if segs.len() == 1 {
        return Ok((h, segs.pop().unwrap_or_default()));
    }
    let mut out = super::bigvec::with_capacity(h.count as usize);
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
    let segs = layout(&h, payload)?;
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

/// `f` on every item, the first on this thread and every other on a thread
/// of its own (segments are few: at most one per CPU from our encoder,
/// [`MAX_SEGMENTS`] from anyone), results in item order; the first error
/// wins. A worker that panics yields `panicked()`.
fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(usize, &T) -> Result<R, FormatError> + Sync,
    panicked: impl Fn() -> FormatError,
) -> Result<Vec<R>, FormatError> {
    let Some(first) = items.first() else {
        return Ok(Vec::new());
    };
    let f = &f;
    let results: Vec<Result<R, FormatError>> = std::thread::scope(|sc| {
        let handles: Vec<_> = items
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, x)| sc.spawn(move || f(i, x)))
            .collect();
        let mut out = Vec::with_capacity(items.len());
        out.push(f(0, first));
        out.extend(
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(panicked()))),
        );
        out
    });
    results.into_iter().collect()
}

fn decoder_panicked() -> FormatError {
    FormatError::Corrupt("segment decoder thread panicked".into())
}

/// One segment to decode: a row of the segment table (or the whole payload
/// of an unsegmented blob), where its body starts in the payload, and what
/// a patch block says about it.
struct Segment {
    count: usize,
    raw_len: usize,
    stored_len: usize,
    at: usize,
    /// Stored index of its first record.
    first: usize,
    /// Indices (within the segment) of the records to leave out, ascending.
    skip: Vec<u32>,
    /// Seconds to take off every timeout (a base segment of a patch).
    age: Option<u32>,
}

/// The segments of `payload`, checked against the header: for a segmented
/// blob the patch block (if any) and the segment table, whose counts, raw
/// and stored lengths must add up exactly, before anything is allocated
/// beyond the table and the skip list (both bounded by the input).
fn layout(h: &Header, payload: &[u8]) -> Result<Vec<Segment>, FormatError> {
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

/// What a patch block says (§1.2), skips as stored indices.
struct Patch {
    nbase: usize,
    age: u32,
    skip: Vec<u64>,
}

/// Parses the patch block at the start of `payload`; returns it and its
/// length. The skip list is bounded by the input: every gap takes a byte.
fn patch_block(payload: &[u8]) -> Result<(Patch, usize), FormatError> {
    let corrupt = |m: String| FormatError::Corrupt(format!("patch block: {m}"));
    let mut pos = 0usize;
    let u32_at = |pos: &mut usize, what: &dyn Fn() -> String| -> Result<u32, FormatError> {
        let mut v = 0u64;
        for i in 0..10 {
            let Some(&b) = payload.get(*pos) else {
                return Err(corrupt(format!("ends inside the {}", what())));
            };
            *pos += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return u32::try_from(v)
                    .map_err(|_| corrupt(format!("{} {v} exceeds 32 bits", what())));
            }
        }
        Err(corrupt(format!("overlong varint for the {}", what())))
    };
    let Some(&nbase) = payload.first() else {
        return Err(corrupt("ends inside the base segment count".into()));
    };
    pos += 1;
    if nbase == 0 {
        return Err(FormatError::Corrupt(
            "patch block declares 0 base segments (at least 1)".into(),
        ));
    }
    let age = u32_at(&mut pos, &|| "age".into())?;
    let nskip = u32_at(&mut pos, &|| "skip count".into())? as usize;
    let mut skip = Vec::with_capacity(nskip.min(payload.len() - pos));
    let mut next = 0u64;
    for k in 0..nskip {
        let gap = u32_at(&mut pos, &|| format!("gap of skip {k}"))?;
        let s = next.saturating_add(u64::from(gap));
        skip.push(s);
        next = s + 1;
    }
    Ok((
        Patch {
            nbase: nbase as usize,
            age,
            skip,
        },
        pos,
    ))
}

fn in_segment(i: usize, e: FormatError) -> FormatError {
    match e {
        FormatError::Corrupt(m) => FormatError::Corrupt(format!("segment {i}: {m}")),
        other => other,
    }
}

/// The raw payload of `stored` (decompressed when `flags` say zstd),
/// exactly `raw_len` bytes.
fn inflate(
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

struct Reader<'a> {
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

fn read_l4(sport: &mut Reader, dport: &mut Reader, kind: u8) -> Result<L4, FormatError> {
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

fn read_seq_adj(d: &[u8]) -> SeqAdj {
    SeqAdj {
        correction_pos: le32(d, 0),
        offset_before: le32(d, 4) as i32,
        offset_after: le32(d, 8) as i32,
    }
}

fn decode_raw(raw: &[u8], seg: &Segment, default_mark: u32) -> Result<Vec<Entry>, FormatError> {
    let mut d = SegDecoder::new(raw, seg, default_mark)?;
    let mut out = super::bigvec::with_capacity(d.kept());
    d.run(raw, usize::MAX, |_, e| out.push(e))?;
    d.finish(raw)?;
    Ok(out)
}

/// Where one segment's decoding stands: its column ranges in the raw
/// payload and how far each has been read, plus the delta state. Holds no
/// borrow, so it can live next to the payload it reads.
#[derive(Debug, Clone)]
struct SegDecoder {
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
    skip: Vec<u32>,
    /// Skips passed so far.
    skipped: usize,
    /// Seconds taken off every timeout (a patch's base segment).
    age: Option<u32>,
    /// Records handed out so far.
    out: usize,
}

impl SegDecoder {
    /// Parses the column table of `raw` (a v1.0 payload of `seg.count`
    /// records).
    fn new(raw: &[u8], seg: &Segment, default_mark: u32) -> Result<Self, FormatError> {
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
    fn kept(&self) -> usize {
        self.count - self.skip.len()
    }

    /// Records still to hand out.
    fn remaining(&self) -> usize {
        self.kept() - self.out
    }

    /// Decodes records of `raw` until `n` more were handed to `sink` or the
    /// segment ends; returns how many were. Skipped records are decoded
    /// (they carry delta state) but not handed out; after the last kept
    /// record the skipped ones behind it are consumed too, so that
    /// [`finish`](Self::finish) can check the columns.
    fn run(
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
        let (default_mark, age, count) = (self.default_mark, self.age, self.count);
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
    fn finish(&self, raw: &[u8]) -> Result<(), FormatError> {
        for c in &self.readers(raw) {
            c.done()?;
        }
        Ok(())
    }
}

/// A v1 blob validated completely — every record decoded once and thrown
/// away, segments in parallel — that then hands out its entries batch by
/// batch. Load uses it: the whole blob is checked before anything is
/// created, but only the batches created before the reply are built then
/// (100k entries are ~20 MB of fresh memory: building them all first cost
/// Load ~3 ms of migration downtime at 100k).
///
/// Order: when the concatenation of the segments is in priority order
/// (ours always is, but for a patch), blob order. A patch (§1.2) comes out
/// merged instead: in the order a stable priority sort of blob order gives
/// (ties to the lower stored index, i.e. to the lower segment), built batch
/// by batch too. Anything else comes out in blob order and `sorted` is
/// false.
#[derive(Debug)]
pub struct Checked {
    pub header: Header,
    /// Entries come out in priority order.
    pub sorted: bool,
    segs: Vec<(Vec<u8>, SegDecoder)>,
    /// A patch's merge, when the segments overlap.
    merge: Option<Merge>,
    cur: usize,
}

/// Merge state of a patch. Every kept record has a unique *order key*,
/// [`order_key`]: its priority key above its inverted stored index, so that
/// the merge needs no tie rule. Keys are recorded while validating, so the
/// merge picks runs by key and decodes each record once, straight into the
/// batch.
#[derive(Debug)]
struct Merge {
    /// Per segment, the order key of each kept record in blob order;
    /// [`HELD`] marks a record that a later record of its segment must
    /// precede (a base record the age moved into the Worthless class):
    /// it is decoded in passing and kept aside until its turn.
    keys: Vec<Vec<u64>>,
    /// The held records' order keys, descending, and where the merge
    /// stands in them.
    held: Vec<u64>,
    next_held: usize,
    /// Held records decoded so far, by their place in `held`.
    held_entries: Vec<Option<Entry>>,
}

/// Marks a held record's order key (order keys use 56 bits).
const HELD: u64 = 1 << 63;
/// Bits of the stored index in an order key (MAX_ENTRIES < 2^21).
const ORDER_INDEX_BITS: u32 = 21;

/// Larger is earlier: priority key first, then the lower stored index.
fn order_key(key: u64, stored: usize) -> u64 {
    const MASK: u64 = (1 << ORDER_INDEX_BITS) - 1;
    (key << ORDER_INDEX_BITS) | (MASK - (stored as u64 & MASK))
}

impl Checked {
    /// Entries in the blob.
    pub fn len(&self) -> usize {
        self.header.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next up to `n` entries, or `None` after the last.
    pub fn next_batch(&mut self, n: usize) -> Option<Result<Vec<Entry>, FormatError>> {
        let n = n.max(1);
        if self.merge.is_some() {
            return self.next_merged(n);
        }
        while let Some((raw, d)) = self.segs.get_mut(self.cur) {
            if d.remaining() > 0 {
                let mut out = Vec::with_capacity(n.min(d.remaining()));
                return Some(d.run(raw, n, |_, e| out.push(e)).map(|_| out));
            }
            // Done with this segment: its memory goes now.
            self.segs[self.cur].0 = Vec::new();
            self.cur += 1;
        }
        None
    }

    /// [`next_batch`](Self::next_batch) of a merge: repeatedly take the
    /// longest run of the source (a segment's records in blob order, or the
    /// held records) with the largest next order key that stays above every
    /// other source's next key.
    fn next_merged(&mut self, n: usize) -> Option<Result<Vec<Entry>, FormatError>> {
        let m = self.merge.as_mut()?;
        let left: usize = self.segs.iter().map(|(_, d)| d.remaining()).sum::<usize>()
            + m.held.len()
            - m.next_held;
        if left == 0 {
            return None;
        }
        let mut out = Vec::with_capacity(n.min(left));
        // Next record of segment `i` that is not held: (position, key).
        let head = |m: &Merge, segs: &[(Vec<u8>, SegDecoder)], i: usize| {
            let ks = &m.keys[i];
            (segs[i].1.out..ks.len())
                .find(|&p| ks[p] & HELD == 0)
                .map(|p| (p, ks[p]))
        };
        while out.len() < n {
            let held_head = m.held.get(m.next_held).copied();
            let heads: Vec<Option<(usize, u64)>> = (0..self.segs.len())
                .map(|i| head(m, &self.segs, i))
                .collect();
            let best_seg = heads
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.map(|(_, k)| (k, i)))
                .max();
            match (best_seg, held_head) {
                (None, None) => break,
                (best, Some(h)) if best.is_none_or(|(k, _)| h > k) => {
                    // Held records are decoded before their turn: a record
                    // of their own segment with a larger key comes later
                    // in blob order and was handed out already.
                    let Some(e) = m.held_entries[m.next_held].take() else {
                        return Some(Err(FormatError::Corrupt(
                            "merge: held record not yet decoded".into(),
                        )));
                    };
                    out.push(e);
                    m.next_held += 1;
                }
                (Some((_, b)), _) => {
                    let bound = heads
                        .iter()
                        .enumerate()
                        .filter(|&(i, _)| i != b)
                        .filter_map(|(_, h)| h.map(|(_, k)| k))
                        .chain(held_head)
                        .max()
                        .unwrap_or(0);
                    // Kept records of `b` to decode: up to the last one of
                    // the run, held ones included.
                    let ks = &m.keys[b];
                    let from = self.segs[b].1.out;
                    let (mut taken, mut end) = (0, from);
                    for (p, &k) in ks.iter().enumerate().skip(from) {
                        if k & HELD != 0 {
                            continue;
                        }
                        if k < bound || taken == n - out.len() {
                            break;
                        }
                        taken += 1;
                        end = p + 1;
                    }
                    let (raw, d) = &mut self.segs[b];
                    let (held, held_entries) = (&m.held, &mut m.held_entries);
                    let mut pos = from;
                    let r = d.run(raw, end - from, |_, e| {
                        let k = ks[pos];
                        pos += 1;
                        if k & HELD == 0 {
                            out.push(e);
                        } else if let Ok(i) = held.binary_search_by(|h| (k & !HELD).cmp(h)) {
                            held_entries[i] = Some(e);
                        }
                    });
                    if let Err(e) = r {
                        return Some(Err(e));
                    }
                    if d.remaining() == 0 {
                        *raw = Vec::new();
                        m.keys[b] = Vec::new();
                    }
                }
                // Taken by the held arm (its guard holds without a segment).
                (None, Some(_)) => break,
            }
        }
        Some(Ok(out))
    }
}

/// Validates a v1 blob completely without keeping its entries (see
/// [`Checked`]); any defect anywhere fails the whole blob.
pub fn check(bytes: &[u8]) -> Result<Checked, FormatError> {
    let h = check_header(bytes)?;
    let payload = &bytes[HEADER_LEN..];
    let parts = layout(&h, payload)?;
    let segmented = h.flags & FLAG_SEGMENTS != 0;
    let patched = h.flags & FLAG_PATCH != 0;
    struct Done {
        raw: Vec<u8>,
        start: SegDecoder,
        sorted: bool,
        /// First and last key of the records handed out.
        ends: Option<(u64, u64)>,
        /// A patch's order keys (see [`Merge`]) and its held ones.
        keys: Vec<u64>,
        held: Vec<u64>,
    }
    let validate = |s: &Segment| -> Result<Done, FormatError> {
        let raw = inflate(
            &payload[s.at..s.at + s.stored_len],
            s.raw_len as u32,
            h.flags,
        )?
        .into_owned();
        let start = SegDecoder::new(&raw, s, h.default_mark)?;
        let mut d = start.clone();
        let (mut sorted, mut first, mut last) = (true, None, 0u64);
        // Only a patch's segments may need merging: keep their keys.
        let mut keys = Vec::with_capacity(if patched { d.kept() } else { 0 });
        d.run(&raw, usize::MAX, |i, e| {
            let k = super::priority::value_key(&e);
            if first.is_none() {
                first = Some(k);
            } else if k > last {
                sorted = false;
            }
            last = k;
            if patched {
                keys.push(order_key(k, s.first + i));
            }
        })?;
        d.finish(&raw)?;
        let mut held = Vec::new();
        if !sorted {
            // Held: a later record must precede it. What is left is in
            // order: each such record precedes everything after it.
            let mut later = 0u64;
            for k in keys.iter_mut().rev() {
                if *k < later {
                    held.push(*k);
                    *k |= HELD;
                } else {
                    later = *k;
                }
            }
        }
        Ok(Done {
            raw,
            start,
            sorted,
            ends: first.map(|f| (f, last)),
            keys,
            held,
        })
    };
    let one = |i: usize, s: &Segment| {
        validate(s).map_err(|e| if segmented { in_segment(i, e) } else { e })
    };
    let done = in_parallel(&parts, one, decoder_panicked)?;
    let each_sorted = done.iter().all(|d| d.sorted);
    let ends: Vec<(u64, u64)> = done.iter().filter_map(|d| d.ends).collect();
    let in_order = each_sorted && ends.windows(2).all(|w| w[0].1 >= w[1].0);
    let mut merge = (!in_order && patched).then(|| Merge {
        keys: Vec::with_capacity(done.len()),
        held: Vec::new(),
        next_held: 0,
        held_entries: Vec::new(),
    });
    let mut segs = Vec::with_capacity(done.len());
    for d in done {
        if let Some(m) = &mut merge {
            m.keys.push(d.keys);
            m.held.extend(d.held);
        }
        segs.push((d.raw, d.start));
    }
    if let Some(m) = &mut merge {
        m.held.sort_unstable_by(|a, b| b.cmp(a));
        m.held_entries = (0..m.held.len()).map(|_| None).collect();
    }
    Ok(Checked {
        header: h,
        sorted: in_order || merge.is_some(),
        segs,
        merge,
        cur: 0,
    })
}

fn decode_one(
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

#[doc(hidden)]
pub fn debug_stream_sizes(entries: &[&Entry]) -> Vec<(&'static str, usize, usize)> {
    let mut c = Columns::new(default_mark(entries.iter().copied()), entries.len(), false);
    for e in entries {
        c.push(Rec::Full(e), e.timeout);
    }
    c.s.iter()
        .enumerate()
        .map(|(i, s)| {
            let z = zstd::bulk::compress(s, ZSTD_LEVEL)
                .map(|v| v.len())
                .unwrap_or(0);
            (STREAM_NAMES[i], s.len(), z)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_len_matches_encoding() {
        for v in [
            0u64,
            1,
            127,
            128,
            16383,
            16384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }

    #[test]
    fn zigzag_round_trips() {
        for v in [
            0i64,
            1,
            -1,
            432_000,
            -432_000,
            i64::from(u32::MAX),
            -i64::from(u32::MAX),
        ] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }
}

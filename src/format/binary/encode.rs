//! The v1.0 encoder: entries in priority order into the eleven column
//! streams, then one zstd frame behind the header. Any prefix of the
//! entries can be turned into a complete blob (the byte budget's cut).

use std::net::IpAddr;

use super::header::{assemble, dropped_u32, Header};
use super::layout::*;
use super::record::{tcp_bytes, Compact, Rec, View};
use crate::entry::{Entry, ProtoInfo, SeqAdj, Tuple, L4};
use crate::format::FormatError;

pub(super) fn put_addr(out: &mut Vec<u8>, a: &IpAddr) {
    match a {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

pub(super) fn put_l4(sport: &mut Vec<u8>, dport: &mut Vec<u8>, l4: &L4) {
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
pub(super) fn put_l4_inline(out: &mut Vec<u8>, l4: &L4) {
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

pub(super) fn put_attr(out: &mut Vec<u8>, kind: u8, data: &[u8]) {
    out.push(kind);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

pub(super) fn seq_adj_bytes(s: &SeqAdj) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&s.correction_pos.to_le_bytes());
    b[4..8].copy_from_slice(&s.offset_before.to_le_bytes());
    b[8..12].copy_from_slice(&s.offset_after.to_le_bytes());
    b
}

/// What a record's attribute list holds.
pub(super) enum Attrs<'a> {
    None,
    /// Only a mark other than the blob's default.
    MarkOnly(u32),
    /// Whatever the entry has (see `Columns::push`).
    Of(&'a Entry),
}

/// Column buffers of one encoding, optionally with each stream's length
/// after every entry so that any prefix can be assembled without
/// re-encoding.
pub(super) struct Columns {
    pub(super) s: [Vec<u8>; STREAMS],
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
    pub(super) fn new(default_mark: u32, capacity: usize, prefixes: bool) -> Self {
        // Typical per-entry bytes of each column, to avoid regrowing.
        const GUESS: [usize; STREAMS] = [1, 1, 1, 6, 2, 2, 2, 2, 4, 1, 1];
        let mut c = Columns {
            s: GUESS.map(|g| Vec::with_capacity(g * capacity)),
            offsets: if prefixes {
                crate::format::bigvec::with_capacity((capacity + 1) * STREAMS)
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
    pub(super) fn push(&mut self, r: Rec, timeout: u32) {
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
    pub(super) fn write_raw(&self, k: usize, out: &mut Vec<u8>) {
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

pub(super) const PREFETCH_AHEAD: usize = 6;

#[inline(always)]
pub(super) fn prefetch(e: &Entry) {
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

#[inline(always)]
pub(super) fn prefetch_compact(c: &Compact) {
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
pub(super) struct Encoder {
    cols: Columns,
    raw: Vec<u8>,
    cctx: zstd::bulk::Compressor<'static>,
    /// Stamped into every blob with entries (§1.3).
    saved_at: Option<u64>,
}

pub(super) fn compressor() -> Result<zstd::bulk::Compressor<'static>, FormatError> {
    zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|e| FormatError::Compression(e.to_string()))
}

/// Builds the columns of `views` in order.
pub(super) fn build_columns(views: &[View], default_mark: u32, prefixes: bool) -> Columns {
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

/// Compresses a raw payload; `None` when compression would not shrink it,
/// unless `always` (the saved-at frame needs a zstd payload: a few bytes of
/// frame header on a tiny state).
pub(super) fn compress(
    cctx: &mut zstd::bulk::Compressor<'static>,
    raw: &[u8],
    always: bool,
) -> Result<Option<Vec<u8>>, FormatError> {
    if raw.is_empty() {
        return Ok(None);
    }
    let z = cctx
        .compress(raw)
        .map_err(|e| FormatError::Compression(e.to_string()))?;
    Ok((always || z.len() < raw.len()).then_some(z))
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

    fn build(views: &[View], default_mark: u32, prefixes: bool) -> Result<Self, FormatError> {
        let cctx = compressor()?;
        let cols = build_columns(views, default_mark, prefixes);
        Ok(Encoder {
            cols,
            raw: Vec::new(),
            cctx,
            saved_at: None,
        })
    }

    /// Blobs with entries from now on carry `saved_at` (§1.3).
    pub fn saved_at(mut self, saved_at: Option<u64>) -> Self {
        self.saved_at = saved_at;
        self
    }

    pub fn len(&self) -> usize {
        self.cols.len()
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
        // Zero entries: nothing to age, so no stamp either.
        let saved_at = self.saved_at.filter(|_| k > 0);
        let z = compress(&mut self.cctx, &self.raw, saved_at.is_some())?;
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
            saved_at,
        };
        Ok(assemble(&h, &[payload]))
    }
}

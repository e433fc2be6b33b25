//! Validating a blob completely before Load creates anything, then handing
//! out its entries batch by batch, most valuable first (merging a patch's
//! segments when they overlap).

use super::decode::{decoder_panicked, in_segment, inflate, payload_segments, SegDecoder, Segment};
use super::header::{check_header, Header};
use super::layout::*;
use super::segments::in_parallel;
use crate::entry::Entry;
use crate::format::{priority, FormatError};

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
    /// A patch's merge, when the segments overlap (or aging moved records
    /// out of order).
    merge: Option<Merge>,
    cur: usize,
    /// Seconds every timeout was aged by on Load (§1.3).
    pub load_age: u32,
    /// Records that aging left without time: not handed out.
    pub expired: usize,
    /// A progressive check ([`check_progressive`]): the segments
    /// [`complete`](Self::complete) has yet to validate.
    pending: Option<Box<Pending>>,
}

/// What a progressive check left for [`Checked::complete`].
#[derive(Debug)]
struct Pending {
    /// Segments not validated yet, each with its place in `segs`.
    parts: Vec<(usize, Segment)>,
    /// Per segment: its records in priority order, and the first and last
    /// key handed out (validated segments only so far).
    order: Vec<(bool, Option<(u64, u64)>)>,
    /// Entries that may be handed out before `complete`: the first
    /// segment's and the deltas' that rank above its last, so that no
    /// unvalidated segment can hold a record that ranks above one handed
    /// out (in a blob of our encoder).
    limit: usize,
    handed: usize,
    /// The blob's length and header, to refuse completing with another.
    len: usize,
    head: [u8; HEADER_LEN],
}

/// Merge state of a patch. Every kept record has a unique *order key*,
/// [`order_key`]: its priority key above its inverted stored index, so that
/// the merge needs no tie rule. Keys are recorded while validating, so the
/// merge picks runs by key and decodes each record once, straight into the
/// batch.
#[derive(Debug)]
pub(super) struct Merge {
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
pub(super) const HELD: u64 = 1 << 63;
/// Bits of the stored index in an order key (MAX_ENTRIES < 2^21).
pub(super) const ORDER_INDEX_BITS: u32 = 21;

/// Larger is earlier: priority key first, then the lower stored index.
pub(super) fn order_key(key: u64, stored: usize) -> u64 {
    const MASK: u64 = (1 << ORDER_INDEX_BITS) - 1;
    (key << ORDER_INDEX_BITS) | (MASK - (stored as u64 & MASK))
}

impl Checked {
    /// Entries it hands out: those of the blob less the expired.
    pub fn len(&self) -> usize {
        self.header.count as usize - self.expired
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next up to `n` entries, or `None` after the last.
    /// Before [`complete`](Self::complete) of a progressive check, `None`
    /// once the validated part's allowance is handed out.
    pub fn next_batch(&mut self, n: usize) -> Option<Result<Vec<Entry>, FormatError>> {
        let mut n = n.max(1);
        if let Some(p) = &self.pending {
            n = n.min(p.limit - p.handed);
            if n == 0 {
                return None;
            }
        }
        let r = self.next_unlimited(n);
        if let (Some(p), Some(Ok(b))) = (&mut self.pending, &r) {
            p.handed += b.len();
        }
        r
    }

    /// A progressive check not yet [`complete`](Self::complete)d.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Validates what a progressive check ([`check_progressive`]) left,
    /// `bytes` being the blob it checked; then every entry can be handed
    /// out, in the order a whole check gives for a blob of our encoder.
    /// Nothing to do for a whole check. After an error nothing more is
    /// handed out.
    pub fn complete(&mut self, bytes: &[u8]) -> Result<(), FormatError> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let r = self.complete_with(*p, bytes);
        if r.is_err() {
            self.segs.clear();
            self.merge = None;
        }
        r
    }

    fn complete_with(&mut self, p: Pending, bytes: &[u8]) -> Result<(), FormatError> {
        if bytes.len() != p.len || bytes[..HEADER_LEN] != p.head {
            return Err(FormatError::Corrupt(
                "completing the check of another blob than the one checked".into(),
            ));
        }
        let payload = &bytes[HEADER_LEN..];
        let h = &self.header;
        let one = |_: usize, (i, s): &(usize, Segment)| {
            validate_segment(payload, h, s, 0, true).map_err(|e| in_segment(*i, e))
        };
        let done = in_parallel(&p.parts, one, decoder_panicked)?;
        let mut order = p.order;
        let mut held_new = Vec::new();
        let Some(m) = self.merge.as_mut() else {
            return Err(FormatError::Corrupt(
                "progressive check without a merge".into(),
            ));
        };
        for ((i, _), d) in p.parts.iter().zip(done) {
            order[*i] = (d.sorted, d.ends);
            self.segs[*i] = (d.raw, d.start);
            m.keys[*i] = d.keys;
            held_new.extend(d.held);
        }
        let ends: Vec<(u64, u64)> = order.iter().filter_map(|o| o.1).collect();
        let in_order = order.iter().all(|o| o.0) && ends.windows(2).all(|w| w[0].1 >= w[1].0);
        let rest_untouched = self.segs.iter().skip(1).all(|(_, d)| d.out == 0);
        if in_order && m.held.is_empty() && rest_untouched {
            // Blob order from where the first segment stands: cheaper than
            // merging, and the same order.
            self.merge = None;
            return Ok(());
        }
        // The held records still to come, and those of the new segments,
        // in one descending list.
        let mut held: Vec<(u64, Option<Entry>)> = m
            .held
            .drain(m.next_held..)
            .zip(m.held_entries.drain(m.next_held..))
            .collect();
        held.extend(held_new.into_iter().map(|k| (k, None)));
        held.sort_unstable_by_key(|h| std::cmp::Reverse(h.0));
        m.held = held.iter().map(|h| h.0).collect();
        m.held_entries = held.into_iter().map(|h| h.1).collect();
        m.next_held = 0;
        Ok(())
    }

    fn next_unlimited(&mut self, n: usize) -> Option<Result<Vec<Entry>, FormatError>> {
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
/// [`Checked`]); any defect anywhere fails the whole blob. Timeouts are
/// handed out as stored (a patch's base aged by its age).
pub fn check(bytes: &[u8]) -> Result<Checked, FormatError> {
    check_aged(bytes, None)
}

/// [`check`] for a Load at `now_us` (microseconds since the Unix epoch):
/// every timeout is aged by the time since the blob was saved
/// ([`crate::format::load_age`], §1.3), and records that leaves without
/// time are counted in `expired` and never handed out. The age is applied
/// while validating, so the priority order (and the merge, when aging moved
/// records out of it) sees the aged timeouts; nothing is decoded twice.
pub fn check_aged(bytes: &[u8], now_us: Option<u64>) -> Result<Checked, FormatError> {
    check_in(bytes, now_us, false)
}

/// [`check_aged`] for Load's answer: the header, the checksum over the
/// whole blob, the segment table and the patch block are checked, but of
/// the segments only the first (for a patch, the first base segment and
/// the delta segments) is validated, so that the most valuable entries can
/// be created at once; [`Checked::complete`] validates the rest (on
/// Load's restore thread, after the answer). Until then at most the first
/// segment's count of entries is handed out. A whole check instead when
/// that would validate everything anyway (one segment, or only the first
/// plus the deltas) or when the state is aged (the expired count is part
/// of what the first answer reports).
pub fn check_progressive(bytes: &[u8], now_us: Option<u64>) -> Result<Checked, FormatError> {
    check_in(bytes, now_us, true)
}

/// Result of validating one segment.
struct Done {
    raw: Vec<u8>,
    start: SegDecoder,
    sorted: bool,
    /// First and last key of the records handed out.
    ends: Option<(u64, u64)>,
    /// Order keys (see [`Merge`]) and the held ones, when keyed.
    keys: Vec<u64>,
    held: Vec<u64>,
    expired: usize,
}

fn validate_segment(
    payload: &[u8],
    h: &Header,
    s: &Segment,
    load_age: u32,
    keyed: bool,
) -> Result<Done, FormatError> {
    let raw = inflate(
        &payload[s.at..s.at + s.stored_len],
        s.raw_len as u32,
        h.flags,
    )?
    .into_owned();
    let mut start = SegDecoder::new(&raw, s, h.default_mark)?;
    start.load_age = load_age;
    let mut d = start.clone();
    let (mut sorted, mut first, mut last) = (true, None, 0u64);
    let mut keys = Vec::with_capacity(if keyed { d.kept() } else { 0 });
    let mut expired: Vec<u32> = Vec::new();
    d.run(&raw, usize::MAX, |i, e| {
        if load_age > 0 && e.timeout == 0 {
            expired.push(i as u32);
            return;
        }
        let k = priority::value_key(&e);
        if first.is_none() {
            first = Some(k);
        } else if k > last {
            sorted = false;
        }
        last = k;
        if keyed {
            keys.push(order_key(k, s.first + i));
        }
    })?;
    d.finish(&raw)?;
    if !expired.is_empty() {
        // Streaming then passes over them as over a patch's skips.
        start.skip = merge_ascending(&start.skip, &expired);
    }
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
        expired: expired.len(),
    })
}

fn check_in(bytes: &[u8], now_us: Option<u64>, progressive: bool) -> Result<Checked, FormatError> {
    let h = check_header(bytes)?;
    let load_age = now_us.map_or(0, |now| crate::format::load_age(h.saved_at, now));
    let payload = &bytes[HEADER_LEN..];
    let mut parts = payload_segments(&h, payload)?;
    let segmented = h.flags & FLAG_SEGMENTS != 0;
    let patched = h.flags & FLAG_PATCH != 0;
    // The first segment, and a patch's delta segments (they hold what
    // changed since the base, ranked anywhere in it).
    let first_group = |i: usize, s: &Segment| i == 0 || (patched && s.age.is_none());
    let progressive =
        progressive && load_age == 0 && parts.iter().enumerate().any(|(i, s)| !first_group(i, s));
    // Order keys for a merge: a patch's segments may overlap, aging moves
    // records that reach the Worthless class out of order, and a
    // progressive check always merges (it cannot know yet whether the
    // segments are in order).
    let keyed = patched || load_age > 0 || progressive;
    let one = |i: usize, s: &Segment| {
        validate_segment(payload, &h, s, load_age, keyed).map_err(|e| {
            if segmented {
                in_segment(i, e)
            } else {
                e
            }
        })
    };
    if progressive {
        return check_first(bytes, h, parts, first_group, one);
    }
    let done = in_parallel(&parts, one, decoder_panicked)?;
    parts.clear();
    let each_sorted = done.iter().all(|d| d.sorted);
    let ends: Vec<(u64, u64)> = done.iter().filter_map(|d| d.ends).collect();
    let in_order = each_sorted && ends.windows(2).all(|w| w[0].1 >= w[1].0);
    let expired = done.iter().map(|d| d.expired).sum();
    let mut merge = (!in_order && keyed).then(|| Merge {
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
        load_age,
        expired,
        pending: None,
    })
}

/// The progressive part of [`check_in`]: validates the first group, merges
/// over it, and leaves the other segments for [`Checked::complete`].
fn check_first(
    bytes: &[u8],
    h: Header,
    parts: Vec<Segment>,
    first_group: impl Fn(usize, &Segment) -> bool,
    one: impl Fn(usize, &Segment) -> Result<Done, FormatError> + Sync,
) -> Result<Checked, FormatError> {
    let n = parts.len();
    let (now, later): (Vec<_>, Vec<_>) = parts
        .into_iter()
        .enumerate()
        .partition(|(i, s)| first_group(*i, s));
    let done = in_parallel(&now, |_, (i, s)| one(*i, s), decoder_panicked)?;
    // Stand-ins for the segments not validated yet: nothing to hand out.
    let none = Segment {
        count: 0,
        raw_len: 0,
        stored_len: 0,
        at: 0,
        first: 0,
        skip: Vec::new(),
        age: None,
    };
    let blank = SegDecoder::new(&[], &none, h.default_mark)?;
    let mut segs: Vec<(Vec<u8>, SegDecoder)> =
        (0..n).map(|_| (Vec::new(), blank.clone())).collect();
    let mut m = Merge {
        keys: vec![Vec::new(); n],
        held: Vec::new(),
        next_held: 0,
        held_entries: Vec::new(),
    };
    let mut order = vec![(true, None); n];
    let mut limit = 0;
    for ((i, _), d) in now.iter().zip(done) {
        if *i == 0 {
            limit = d.start.kept();
        }
        order[*i] = (d.sorted, d.ends);
        m.keys[*i] = d.keys;
        m.held.extend(d.held);
        segs[*i] = (d.raw, d.start);
    }
    // A patch's delta records that rank above the first segment's last
    // one precede every record of the later base segments too (those
    // follow the first in priority order): they may come out before
    // `complete` as well. A delta of busy flows, whose base records are
    // all skipped, is what a guest misses most.
    if let Some((_, last)) = order[0].1 {
        limit += m
            .keys
            .iter()
            .skip(1)
            .flatten()
            .filter(|&&k| (k & !HELD) >> ORDER_INDEX_BITS > last)
            .count();
    }
    m.held.sort_unstable_by(|a, b| b.cmp(a));
    m.held_entries = (0..m.held.len()).map(|_| None).collect();
    let mut head = [0u8; HEADER_LEN];
    head.copy_from_slice(&bytes[..HEADER_LEN]);
    Ok(Checked {
        header: h,
        sorted: true,
        segs,
        merge: Some(m),
        cur: 0,
        load_age: 0,
        expired: 0,
        pending: Some(Box::new(Pending {
            parts: later,
            order,
            limit,
            handed: 0,
            len: bytes.len(),
            head,
        })),
    })
}

/// Two disjoint ascending lists as one.
fn merge_ascending(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i] < b[j] {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

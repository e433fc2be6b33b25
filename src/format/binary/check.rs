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
    let h = check_header(bytes)?;
    let load_age = now_us.map_or(0, |now| crate::format::load_age(h.saved_at, now));
    let payload = &bytes[HEADER_LEN..];
    let parts = payload_segments(&h, payload)?;
    let segmented = h.flags & FLAG_SEGMENTS != 0;
    let patched = h.flags & FLAG_PATCH != 0;
    // Order keys for a merge: a patch's segments may overlap, and aging
    // moves records that reach the Worthless class out of order.
    let keyed = patched || load_age > 0;
    struct Done {
        raw: Vec<u8>,
        start: SegDecoder,
        sorted: bool,
        /// First and last key of the records handed out.
        ends: Option<(u64, u64)>,
        /// A patch's order keys (see [`Merge`]) and its held ones.
        keys: Vec<u64>,
        held: Vec<u64>,
        expired: usize,
    }
    let validate = |s: &Segment| -> Result<Done, FormatError> {
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
    };
    let one = |i: usize, s: &Segment| {
        validate(s).map_err(|e| if segmented { in_segment(i, e) } else { e })
    };
    let done = in_parallel(&parts, one, decoder_panicked)?;
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

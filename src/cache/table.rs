//! One selector's cached entries: dense arrays of small records plus a
//! compact hash index by key. Save walks every entry and then visits them
//! again in priority order, i.e. at random, which a dense array serves at
//! about half the cost of a hash map (measured: docs/downtime.md, "Warm
//! cache for Save"). Removal swaps the last entry into the hole.
//!
//! What an entry costs (docs/benchmarks.md, "Warm cache costs"): a 32-byte
//! [`Hot`] record, a 32-byte [`Slot`] that holds an IPv4 entry of the
//! compact kind whole (most of a VM's entries), and 8 bytes per index
//! bucket. Entries are never kept as an [`Entry`] (208 bytes) unless the
//! compact form cannot describe them (NAT, zones, labels, …); IPv6 ones of
//! the compact kind keep their [`Compact`] form out of line. A
//! [`Cached`] is rebuilt on demand: events and lookups touch one entry at a
//! time, and Save reads the small records.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::cached::{key, Cached, Key};
use super::index::KeyIndex;
use crate::entry::{Entry, Tuple, L4};
use crate::format::priority::{value_class_at, ABOUT_TO_EXPIRE_SECS};
use crate::format::{self, representable, Compact, Encoded, FormatError, Frame, Rec, View};

/// [`Hot::base`] of an entry that is not in the pre-encoded base.
pub const NO_BASE: u32 = u32::MAX;

/// The oldest a base may be for Save to use it. A base only holds entries
/// with more than this (plus the about-to-expire threshold) left when it
/// was built, so none of them changes priority class or needs a lookup
/// before the base is too old to be used.
pub const MAX_BASE_AGE: Duration = Duration::from_secs(60);

/// An instant in 8 bytes instead of 16: nanoseconds from a process-wide
/// origin (negative before it), exact both ways, so remaining times are
/// estimated exactly as from the `Instant` itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(i64);

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl Stamp {
    pub fn of(t: Instant) -> Stamp {
        let o = origin();
        let ns = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        match t.checked_duration_since(o) {
            Some(d) => Stamp(ns(d)),
            None => Stamp(-ns(o.duration_since(t))),
        }
    }

    pub fn instant(self) -> Instant {
        let o = origin();
        let d = Duration::from_nanos(self.0.unsigned_abs());
        let t = if self.0 >= 0 {
            o.checked_add(d)
        } else {
            o.checked_sub(d)
        };
        t.unwrap_or(o)
    }
}

const HAS_ID: u8 = 1;
const TRUSTED: u8 = 2;
const REPRESENTABLE: u8 = 4;
const EVENTED: u8 = 8;
const PROBED: u8 = 16;
const EXTRAS_KNOWN: u8 = 32;
const COMPLETE: u8 = 64;

/// What Save's first pass reads of an entry, 32 bytes, in a dense array
/// of its own next to the [`Slot`]s: Save walks all of them (is a lookup
/// needed, how long is left, how valuable is it) and then encodes, in
/// priority order, most entries from their slot alone (another 32 bytes).
/// Save is bound by memory: the tables are cold by the time QEMU asks
/// (measured: the same encode takes 8 ms on warm data, 17 ms after 100 ms
/// of idleness). Also holds the [`Cached`] flags, so that the slots need
/// none.
#[derive(Debug, Clone)]
pub struct Hot {
    seen: Stamp,
    /// Seconds left at `seen`.
    pub timeout: u32,
    /// `CTA_ID` when `flags` has `HAS_ID`.
    id: u32,
    /// Its record's position in the pre-encoded [`Base`], or [`NO_BASE`].
    /// A changed entry gets a new `Hot` (with `NO_BASE`), so an entry that
    /// still has a position is exactly what the base holds for it.
    pub base: u32,
    /// Stamped by the table at every new `Hot`, unique within the table
    /// (wrapping after 2^32 changes, far more than can happen while one
    /// base is encoded): an entry whose `ver` is unchanged since a
    /// snapshot has not changed since.
    ver: u32,
    /// Its priority class while more than ABOUT_TO_EXPIRE_SECS are left.
    class: u8,
    flags: u8,
}

impl Hot {
    fn of(c: &Cached) -> Hot {
        let complete = c.complete();
        let flag = |on: bool, f: u8| if on { f } else { 0 };
        Hot {
            seen: Stamp::of(c.seen),
            timeout: c.entry.timeout,
            id: c.entry.id.unwrap_or(0),
            base: NO_BASE,
            ver: 0,
            class: value_class_at(&c.entry, u32::MAX) as u8,
            flags: flag(c.entry.id.is_some(), HAS_ID)
                | flag(c.evented && complete, TRUSTED)
                | flag(representable(&c.entry), REPRESENTABLE)
                | flag(c.evented, EVENTED)
                | flag(c.probed, PROBED)
                | flag(c.extras_known, EXTRAS_KNOWN)
                | flag(complete, COMPLETE),
        }
    }

    fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }

    pub fn id(&self) -> Option<u32> {
        self.has(HAS_ID).then_some(self.id)
    }

    /// Evented and complete: no lookup needed unless about to expire.
    pub fn trusted(&self) -> bool {
        self.has(TRUSTED)
    }

    /// The format can carry it (`format::representable`).
    pub fn representable(&self) -> bool {
        self.has(REPRESENTABLE)
    }

    pub fn evented(&self) -> bool {
        self.has(EVENTED)
    }

    pub fn probed(&self) -> bool {
        self.has(PROBED)
    }

    /// [`Cached::complete`].
    pub fn complete(&self) -> bool {
        self.has(COMPLETE)
    }

    pub fn seen(&self) -> Instant {
        self.seen.instant()
    }

    /// Seconds left now (see [`super::cached::estimate`]).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn estimate(&self, now: Instant) -> u32 {
        self.estimate_at(Stamp::of(now))
    }

    /// [`estimate`](Self::estimate) for a `now` converted once for a
    /// whole walk: whole seconds elapsed, rounded up, saturating.
    pub fn estimate_at(&self, now: Stamp) -> u32 {
        let el = now.0.saturating_sub(self.seen.0).max(0) as u64;
        let secs = el.div_ceil(1_000_000_000);
        self.timeout
            .saturating_sub(u32::try_from(secs).unwrap_or(u32::MAX))
    }

    /// Whether a dump answered from the cache must first look this entry up
    /// in the kernel: it might be gone without an event (silent entry), is
    /// missing attributes, or is so close to expiry that the kernel may have
    /// expired it already or traffic may have refreshed it.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn needs_lookup(&self, now: Instant, margin_secs: u32) -> bool {
        self.needs_lookup_at(Stamp::of(now), margin_secs)
    }

    pub fn needs_lookup_at(&self, now: Stamp, margin_secs: u32) -> bool {
        !self.trusted() || self.estimate_at(now) <= margin_secs
    }

    /// The priority key with `left` seconds left (`priority::value_key_at`),
    /// or `View::EXCLUDED`.
    pub fn key(&self, left: u32) -> u64 {
        if !self.representable() {
            return View::EXCLUDED;
        }
        let class = if left <= ABOUT_TO_EXPIRE_SECS {
            0
        } else {
            self.class
        };
        (u64::from(class) << 32) | u64::from(left)
    }
}

const L4_PORTS: u8 = 0;
const L4_ICMP: u8 = 1;
const L4_NONE: u8 = 2;
/// In [`Packed4::kind`]: `tcp` holds protocol info.
const HAS_TCP: u8 = 0x80;

/// An IPv4 entry of the compact kind in 28 bytes (its [`Compact`] form
/// takes 64: `IpAddr` has room for IPv6). Timeout, id and class are in
/// its [`Hot`] record.
#[derive(Debug, Clone, Copy)]
pub struct Packed4 {
    src: [u8; 4],
    dst: [u8; 4],
    /// Ports (source, destination), or ICMP id, type and code.
    l4: [u8; 4],
    status: u32,
    mark: u32,
    tcp: [u8; 5],
    proto: u8,
    /// `L4_*`, plus [`HAS_TCP`].
    kind: u8,
}

impl Packed4 {
    fn of(c: &Compact) -> Option<Packed4> {
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (c.orig.src, c.orig.dst) else {
            return None;
        };
        let (l4, kind) = match c.orig.l4 {
            L4::Ports { src, dst } => {
                let (a, b) = (src.to_ne_bytes(), dst.to_ne_bytes());
                ([a[0], a[1], b[0], b[1]], L4_PORTS)
            }
            L4::Icmp { id, kind, code } => {
                let a = id.to_ne_bytes();
                ([a[0], a[1], kind, code], L4_ICMP)
            }
            L4::None => ([0; 4], L4_NONE),
        };
        let tcp = c.tcp();
        Some(Packed4 {
            src: src.octets(),
            dst: dst.octets(),
            l4,
            status: c.status,
            mark: c.mark,
            tcp: tcp.unwrap_or_default(),
            proto: c.orig.proto,
            kind: kind | if tcp.is_some() { HAS_TCP } else { 0 },
        })
    }

    fn orig(&self) -> Tuple {
        let l = self.l4;
        let l4 = match self.kind & !HAS_TCP {
            L4_PORTS => L4::Ports {
                src: u16::from_ne_bytes([l[0], l[1]]),
                dst: u16::from_ne_bytes([l[2], l[3]]),
            },
            L4_ICMP => L4::Icmp {
                id: u16::from_ne_bytes([l[0], l[1]]),
                kind: l[2],
                code: l[3],
            },
            _ => L4::None,
        };
        Tuple {
            src: Ipv4Addr::from(self.src).into(),
            dst: Ipv4Addr::from(self.dst).into(),
            proto: self.proto,
            l4,
            zone: None,
        }
    }

    fn compact(&self, class: u8) -> Compact {
        let tcp = (self.kind & HAS_TCP != 0).then_some(self.tcp);
        Compact::from_parts(self.orig(), self.status, self.mark, tcp, class)
    }
}

/// One entry's record, next to its [`Hot`] one.
#[derive(Debug, Clone)]
pub enum Slot {
    /// The IPv4 entries of the compact kind: the great majority.
    V4(Packed4),
    /// Other entries of the compact kind (IPv6).
    Fast(Box<Compact>),
    /// What the compact form cannot describe, as it is.
    Full(Box<Entry>),
}

impl Slot {
    fn of(e: Entry) -> Slot {
        match Compact::of(&e) {
            Some(c) => match Packed4::of(&c) {
                Some(p) => Slot::V4(p),
                None => Slot::Fast(Box::new(c)),
            },
            None => Slot::Full(Box::new(e)),
        }
    }

    fn key(&self) -> Key {
        match self {
            Slot::V4(p) => (p.orig(), 0),
            Slot::Fast(c) => (c.orig, 0),
            Slot::Full(e) => key(e),
        }
    }

    /// The entry, with what its [`Hot`] record keeps.
    fn entry(&self, h: &Hot) -> Entry {
        let mut e = match self {
            Slot::V4(p) => p.compact(h.class).to_entry(h.timeout),
            Slot::Fast(c) => c.to_entry(h.timeout),
            Slot::Full(e) => return (**e).clone(),
        };
        e.id = h.id();
        e
    }
}

/// The selector's entries encoded ahead of time, while no migration runs
/// (docs/downtime.md, "The pre-encoded base"): Save then only encodes what
/// changed since and lists the base records that are no longer valid
/// (state format §1.2), instead of ranking and compressing every entry
/// inside the migration downtime.
#[derive(Debug)]
pub struct Base {
    pub frames: Vec<Frame>,
    pub built: Instant,
    /// The blob's default mark, for the delta too.
    pub mark: u32,
    /// Records in `frames`.
    pub stored: u32,
    /// Bit per record: its entry changed or went away since.
    dead: Vec<u64>,
    /// Records invalidated plus entries added since `built`.
    pub changes: usize,
}

impl Base {
    /// Whole seconds since the base was built, rounded up: a record's
    /// timeout minus this is never more than the cache's own estimate now.
    pub fn age_secs(&self, now: Instant) -> u32 {
        let el = now.saturating_duration_since(self.built);
        let secs = el.as_secs() + u64::from(el.subsec_nanos() > 0);
        u32::try_from(secs).unwrap_or(u32::MAX)
    }

    /// Usable by a Save at `now`.
    pub fn usable(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.built) <= MAX_BASE_AGE
    }

    /// The invalidated records, ascending (the blob's skip list).
    pub fn skipped(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for (w, &bits) in self.dead.iter().enumerate() {
            let mut b = bits;
            while b != 0 {
                out.push((w as u32) * 64 + b.trailing_zeros());
                b &= b - 1;
            }
        }
        out
    }

    /// The state as it is now: this base, `age` seconds old, without its
    /// invalidated records, plus `delta` (the entries the base does not
    /// hold as they are now, each with the time it has left), encoded as
    /// one blob of at most `limit` bytes; `None` when that does not fit (a
    /// whole encode then decides what to drop).
    pub fn patched(
        &self,
        age: u32,
        delta: &[View],
        limit: usize,
    ) -> Result<Option<Encoded>, FormatError> {
        let (ranked, _) = format::rank_and_mark(delta, Some(self.mark));
        let dropped = delta.len() - ranked.len();
        let frames = format::encode_frames(&ranked, 1, self.mark)?;
        let skip = self.skipped();
        let bytes =
            format::assemble_patched(&self.frames, age, &skip, &frames, dropped, self.mark)?;
        if bytes.len() > limit {
            return Ok(None);
        }
        Ok(Some(Encoded {
            bytes,
            kept: self.stored as usize - skip.len() + ranked.len(),
            dropped,
        }))
    }

    fn kill(&mut self, pos: u32) {
        let (w, bit) = ((pos / 64) as usize, pos % 64);
        if let Some(word) = self.dead.get_mut(w) {
            if *word & (1 << bit) == 0 {
                *word |= 1 << bit;
                self.changes += 1;
            }
        }
    }
}

/// Tells tables apart: a base encoded from one table's snapshot is only
/// installed into that same table (a sync replaces the table meanwhile).
static TABLE_IDS: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
pub struct EntryTable {
    index: KeyIndex,
    /// `hot[i]` describes `slots[i]`.
    hot: Vec<Hot>,
    slots: Vec<Slot>,
    base: Option<Base>,
    id: u64,
    /// The next [`Hot::ver`].
    ver: u32,
    /// Entries added under a new key so far.
    inserted: u64,
}

impl Default for EntryTable {
    fn default() -> Self {
        EntryTable::with_capacity(0)
    }
}

/// What Save encodes of one entry: its slot, the seconds it has left and
/// its priority key.
pub type Pick = (u32, u32, u64);

/// A cached record copied out of the table, for encoding a base without
/// holding the cache's lock.
/// (The rare full entries boxed: the copy is mostly compact records, and
/// an inline `Entry` would triple every element.)
#[derive(Debug)]
enum Owned {
    Fast(Compact),
    Full(Box<Entry>),
}

impl Owned {
    fn rec(&self) -> Rec<'_> {
        match self {
            Owned::Fast(c) => Rec::Fast(c),
            Owned::Full(e) => Rec::Full(e),
        }
    }
}

/// What a base is encoded from: the candidates copied out of the table
/// (under the lock: ~4 ms at 100k entries with cold caches), to be encoded
/// without it (~7 ms), so Saves and events are not held up meanwhile.
#[derive(Debug)]
pub struct BaseSnapshot {
    table: u64,
    now: Instant,
    mark: Option<u32>,
    recs: Vec<(Owned, u32, u64)>,
    /// Per candidate: its slot and [`Hot::ver`] at the snapshot.
    slots: Vec<(u32, u32)>,
    inserted: u64,
}

/// An encoded base on its way back into the table it was taken from.
#[derive(Debug)]
pub struct BuiltBase {
    table: u64,
    base: Option<Base>,
    /// Slot and version of each base record, in record order.
    positions: Vec<(u32, u32)>,
    inserted: u64,
}

impl BaseSnapshot {
    /// Ranks and encodes the candidates (no lock needed).
    pub fn encode(self) -> Result<BuiltBase, FormatError> {
        let views: Vec<View> = self
            .recs
            .iter()
            .map(|(r, left, key)| View::with_key(r.rec(), *left, *key))
            .collect();
        let mut built = BuiltBase {
            table: self.table,
            base: None,
            positions: Vec::new(),
            inserted: self.inserted,
        };
        if views.is_empty() {
            return Ok(built);
        }
        let mark = self
            .mark
            .unwrap_or_else(|| format::views_default_mark(&views));
        let order = format::ranked_positions(&views);
        let ranked: Vec<View> = order.iter().map(|&p| views[p as usize]).collect();
        let mut frames =
            format::encode_frames_headed(&ranked, format::default_segments(ranked.len()), mark)?;
        // The compressor's buffers have room for incompressible input, about
        // twice what the frames take; the base is kept for up to a minute.
        for f in &mut frames {
            f.bytes.shrink_to_fit();
        }
        let stored = order.len();
        built.positions = order.iter().map(|&p| self.slots[p as usize]).collect();
        built.base = Some(Base {
            frames,
            built: self.now,
            mark,
            stored: stored as u32,
            dead: vec![0; stored.div_ceil(64)],
            changes: 0,
        });
        Ok(built)
    }
}
impl EntryTable {
    pub fn with_capacity(n: usize) -> Self {
        EntryTable {
            index: KeyIndex::with_capacity(n),
            hot: crate::format::bigvec::with_capacity(n),
            slots: crate::format::bigvec::with_capacity(n),
            base: None,
            id: TABLE_IDS.fetch_add(1, Ordering::Relaxed),
            ver: 0,
            inserted: 0,
        }
    }

    fn next_ver(&mut self) -> u32 {
        let v = self.ver;
        self.ver = self.ver.wrapping_add(1);
        v
    }

    pub fn base(&self) -> Option<&Base> {
        self.base.as_ref()
    }

    /// Slot `i`'s record in the base (if any) no longer describes it.
    fn invalidate(&mut self, i: usize) {
        let pos = self.hot[i].base;
        if let Some(b) = self.base.as_mut() {
            if pos == NO_BASE {
                return;
            }
            b.kill(pos);
        }
    }

    /// The index bucket and slot of `k`.
    fn locate(&self, k: &Key) -> Option<(usize, usize)> {
        let h = self.index.hash(k);
        self.index
            .find(h, |s| self.slots[s as usize].key() == *k)
            .map(|(p, s)| (p, s as usize))
    }

    fn cached_at(&self, i: usize) -> Cached {
        let h = &self.hot[i];
        Cached {
            entry: self.slots[i].entry(h),
            seen: h.seen(),
            evented: h.evented(),
            probed: h.probed(),
            extras_known: h.has(EXTRAS_KNOWN),
        }
    }

    /// `c`'s records, with a new version.
    fn records(&mut self, c: Cached) -> (Hot, Slot) {
        let mut hot = Hot::of(&c);
        hot.ver = self.next_ver();
        (hot, Slot::of(c.entry))
    }

    /// Copies out what a new base is encoded from: the entries that will
    /// stay valid for [`MAX_BASE_AGE`] (trusted, representable, with more
    /// than `margin_secs`, the lookup margin, and the about-to-expire
    /// threshold left after that time), each with the time it has left at
    /// `now`. `mark` is the default mark when the caller knows it.
    pub fn base_snapshot(&self, now: Instant, mark: Option<u32>, margin_secs: u32) -> BaseSnapshot {
        let min_left = ABOUT_TO_EXPIRE_SECS.max(margin_secs) + MAX_BASE_AGE.as_secs() as u32;
        let at = Stamp::of(now);
        let mut recs = Vec::with_capacity(self.slots.len());
        let mut slots = Vec::with_capacity(self.slots.len());
        for (i, (h, s)) in self.hot.iter().zip(&self.slots).enumerate() {
            if !h.trusted() || !h.representable() {
                continue;
            }
            let left = h.estimate_at(at);
            if left > min_left {
                let r = match s {
                    Slot::V4(p) => Owned::Fast(p.compact(h.class)),
                    Slot::Fast(c) => Owned::Fast(**c),
                    Slot::Full(e) => Owned::Full(e.clone()),
                };
                recs.push((r, left, h.key(left)));
                slots.push((i as u32, h.ver));
            }
        }
        BaseSnapshot {
            table: self.id,
            now,
            mark,
            recs,
            slots,
            inserted: self.inserted,
        }
    }

    /// Makes `b` this table's base, replacing the old one, if it was taken
    /// from this table: every record whose entry changed, moved or went
    /// away since the snapshot is dead from the start, and entries added
    /// since count as changes. Returns the records in it; `None` when the
    /// table was replaced meanwhile (the base is then of no use).
    pub fn install_base(&mut self, b: BuiltBase) -> Option<usize> {
        if b.table != self.id {
            return None;
        }
        for h in &mut self.hot {
            h.base = NO_BASE;
        }
        self.base = b.base;
        let Some(base) = self.base.as_mut() else {
            return Some(0);
        };
        for (pos, &(i, ver)) in b.positions.iter().enumerate() {
            match self.hot.get_mut(i as usize) {
                Some(h) if h.ver == ver => h.base = pos as u32,
                _ => base.kill(pos as u32),
            }
        }
        base.changes += (self.inserted - b.inserted) as usize;
        Some(base.stored as usize)
    }

    /// [`base_snapshot`](Self::base_snapshot), encode and
    /// [`install_base`](Self::install_base) in one go.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn build_base(
        &mut self,
        now: Instant,
        mark: Option<u32>,
        margin_secs: u32,
    ) -> Result<usize, FormatError> {
        let built = self.base_snapshot(now, mark, margin_secs).encode()?;
        Ok(self.install_base(built).unwrap_or(0))
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn contains_key(&self, k: &Key) -> bool {
        self.locate(k).is_some()
    }

    /// The entry under `k`, rebuilt from its records.
    pub fn get(&self, k: &Key) -> Option<Cached> {
        self.locate(k).map(|(_, i)| self.cached_at(i))
    }

    /// The [`Hot`] record of the entry under `k`: its id and flags without
    /// rebuilding it.
    pub fn hot_of(&self, k: &Key) -> Option<&Hot> {
        self.locate(k).map(|(_, i)| &self.hot[i])
    }

    /// Runs `f` on the entry under `k`, if any, and stores the result.
    pub fn modify<R>(&mut self, k: &Key, f: impl FnOnce(&mut Cached) -> R) -> Option<R> {
        let (_, i) = self.locate(k)?;
        self.invalidate(i);
        let mut c = self.cached_at(i);
        let r = f(&mut c);
        (self.hot[i], self.slots[i]) = self.records(c);
        Some(r)
    }

    /// Runs `f` on every entry and stores the results. The base goes: any
    /// of its records may have changed.
    pub fn modify_all(&mut self, mut f: impl FnMut(&mut Cached)) {
        self.base = None;
        for i in 0..self.slots.len() {
            let mut c = self.cached_at(i);
            f(&mut c);
            (self.hot[i], self.slots[i]) = self.records(c);
        }
    }

    /// Inserts `c` under `k` (which must be `key(&c.entry)`), returning the
    /// entry it replaces.
    pub fn insert(&mut self, k: Key, c: Cached) -> Option<Cached> {
        debug_assert!(k == key(&c.entry));
        match self.locate(&k) {
            Some((_, i)) => {
                self.invalidate(i);
                let old = self.cached_at(i);
                (self.hot[i], self.slots[i]) = self.records(c);
                Some(old)
            }
            None => {
                self.inserted += 1;
                if let Some(b) = self.base.as_mut() {
                    b.changes += 1;
                }
                let h = self.index.hash(&k);
                // u32 indexes: far above the 2M entries a state may hold.
                self.index.insert(h, self.slots.len() as u32);
                let (hot, slot) = self.records(c);
                self.hot.push(hot);
                self.slots.push(slot);
                None
            }
        }
    }

    pub fn remove(&mut self, k: &Key) -> Option<Cached> {
        let (p, i) = self.locate(k)?;
        self.invalidate(i);
        let c = self.cached_at(i);
        self.index.remove_at(p);
        let last = self.slots.len() - 1;
        self.hot.swap_remove(i);
        self.slots.swap_remove(i);
        if i != last {
            let h = self.index.hash(&self.slots[i].key());
            if let Some(p) = self.index.find_slot(h, last as u32) {
                self.index.set_slot(p, i as u32);
            }
        }
        Some(c)
    }

    /// Every entry's [`Hot`] record, in storage order (slot `i` is
    /// `hot()[i]`).
    pub fn hot(&self) -> &[Hot] {
        &self.hot
    }

    /// Every entry's `CTA_ID`, in storage order.
    pub fn ids(&self) -> impl Iterator<Item = Option<u32>> + '_ {
        self.hot.iter().map(Hot::id)
    }

    /// Every entry, rebuilt, in storage order.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn values(&self) -> impl Iterator<Item = Cached> + '_ {
        (0..self.slots.len()).map(|i| self.cached_at(i))
    }

    /// What the encoder takes for `picks` (slots of this table), in their
    /// order. The IPv4 entries' [`Compact`] forms are unpacked into
    /// `scratch`, all before the first view borrows it.
    pub fn views<'a>(&'a self, picks: &[Pick], scratch: &'a mut Vec<Compact>) -> Vec<View<'a>> {
        scratch.clear();
        let v4 = picks
            .iter()
            .filter(|p| matches!(self.slots[p.0 as usize], Slot::V4(_)))
            .count();
        if scratch.capacity() < v4 {
            *scratch = crate::format::bigvec::with_capacity(v4);
        }
        scratch.extend(
            picks
                .iter()
                .filter_map(|p| match &self.slots[p.0 as usize] {
                    Slot::V4(x) => Some(x.compact(self.hot[p.0 as usize].class)),
                    _ => None,
                }),
        );
        let scratch: &'a Vec<Compact> = scratch;
        let mut unpacked = scratch.iter();
        let mut out = crate::format::bigvec::with_capacity(picks.len());
        out.extend(picks.iter().filter_map(|&(i, left, key)| {
            let rec = match &self.slots[i as usize] {
                Slot::V4(_) => Rec::Fast(unpacked.next()?),
                Slot::Fast(c) => Rec::Fast(c),
                Slot::Full(e) => Rec::Full(e),
            };
            Some(View::with_key(rec, left, key))
        }));
        out
    }

    /// Keys of the entries that need a lookup before Save can trust them.
    pub fn lookup_keys(&self, now: Instant, margin_secs: u32) -> Vec<Key> {
        let at = Stamp::of(now);
        self.hot
            .iter()
            .zip(&self.slots)
            .filter(|(h, _)| h.needs_lookup_at(at, margin_secs))
            .map(|(_, s)| s.key())
            .collect()
    }
}

// Tests only: a lookup that panics has no place on the event path.
#[cfg(test)]
impl EntryTable {
    pub fn at(&self, k: &Key) -> Cached {
        self.get(k).expect("no cached entry for this key")
    }

    fn slot_of(&self, k: &Key) -> Option<usize> {
        self.locate(k).map(|(_, i)| i)
    }

    /// Views of the entries not in the base, with what they have left at
    /// `now`.
    fn delta<'a>(&'a self, now: Instant, scratch: &'a mut Vec<Compact>) -> Vec<View<'a>> {
        let picks: Vec<Pick> = (self.hot.iter().enumerate())
            .filter(|(_, h)| h.base == NO_BASE)
            .map(|(i, h)| {
                let left = h.estimate(now);
                (i as u32, left, h.key(left))
            })
            .collect();
        self.views(&picks, scratch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{proto, Entry, Tuple, L4};
    use std::time::{Duration, Instant};

    fn cached(port: u16) -> Cached {
        let orig = Tuple {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: proto::UDP,
            l4: L4::Ports { src: port, dst: 53 },
            zone: None,
        };
        Cached {
            entry: Entry {
                orig,
                reply: orig.inverse(),
                status: 0,
                timeout: 30,
                mark: 1,
                zone: 0,
                labels: None,
                protoinfo: None,
                seq_adj_orig: None,
                seq_adj_reply: None,
                helper: None,
                id: Some(u32::from(port)),
            },
            seen: Instant::now(),
            evented: true,
            probed: false,
            extras_known: true,
        }
    }

    #[test]
    fn index_follows_swap_remove() {
        let mut t = EntryTable::default();
        for p in 1..=5u16 {
            let c = cached(p);
            assert!(t.insert(key(&c.entry), c).is_none());
        }
        // Removing the first moves the last into its slot.
        assert_eq!(
            t.remove(&key(&cached(1).entry)).map(|c| c.entry.id),
            Some(Some(1))
        );
        assert_eq!(t.len(), 4);
        for p in 2..=5u16 {
            assert_eq!(t.at(&key(&cached(p).entry)).entry.id, Some(u32::from(p)));
        }
        assert!(t.remove(&key(&cached(1).entry)).is_none());
        // Replacing keeps the count and returns the old one.
        let mut c = cached(3);
        c.entry.timeout = 99;
        assert_eq!(
            t.insert(key(&c.entry), c).map(|o| o.entry.timeout),
            Some(30)
        );
        assert_eq!(t.at(&key(&cached(3).entry)).entry.timeout, 99);
        // The last one removed: nothing to move.
        assert!(t.remove(&key(&cached(4).entry)).is_some());
        assert!(t.remove(&key(&cached(5).entry)).is_some());
        assert!(t.remove(&key(&cached(2).entry)).is_some());
        assert!(t.remove(&key(&cached(3).entry)).is_some());
        assert!(t.is_empty());
        assert_eq!(t.values().count(), 0);
        assert!(t.hot.is_empty());
    }

    #[test]
    fn base_records_die_with_every_change_and_the_patch_says_so() {
        let now = Instant::now();
        let mut t = EntryTable::default();
        for p in 1..=40u16 {
            let mut c = cached(p);
            c.seen = now;
            // Ports 1..=5 have too little time left for the base.
            c.entry.timeout = if p <= 5 { 60 } else { 1000 + u32::from(p) };
            t.insert(key(&c.entry), c);
        }
        assert_eq!(t.build_base(now, Some(1), 2).expect("base"), 35);
        let positions: Vec<u32> = t.hot.iter().map(|h| h.base).collect();
        assert_eq!(positions.iter().filter(|&&b| b == NO_BASE).count(), 5);
        // Priority order: the longest timeout first.
        let first = t.hot.iter().find(|h| h.base == 0);
        assert_eq!(first.map(|h| h.timeout), Some(1040));

        let base_pos =
            |t: &EntryTable, p: u16| t.hot[t.slot_of(&key(&cached(p).entry)).expect("cached")].base;
        let (p10, p20) = (base_pos(&t, 10), base_pos(&t, 20));
        t.modify(&key(&cached(10).entry), |c| c.entry.status |= 4);
        t.remove(&key(&cached(20).entry));
        // Port 3 was never in the base: its change kills nothing.
        t.modify(&key(&cached(3).entry), |c| c.entry.timeout = 50);
        let mut c = cached(99);
        c.seen = now;
        t.insert(key(&c.entry), c);
        let b = t.base().expect("still there");
        let mut want = vec![p10, p20];
        want.sort_unstable();
        assert_eq!(b.skipped(), want);
        assert_eq!(b.changes, 3);
        assert_eq!(base_pos(&t, 10), NO_BASE);

        // The patch decodes to exactly the table's entries.
        let later = now + Duration::from_millis(1500);
        let mut scratch = Vec::new();
        let delta = t.delta(later, &mut scratch);
        let b = t.base().expect("base");
        let age = b.age_secs(later);
        assert_eq!(age, 2);
        let enc = b
            .patched(age, &delta, 1 << 20)
            .expect("patch")
            .expect("fits");
        let got = crate::format::decode(&enc.bytes).expect("decodes").entries;
        assert_eq!((enc.kept, enc.dropped, got.len()), (40, 0, 40));
        for c in t.values() {
            let e = got
                .iter()
                .find(|e| e.orig == c.entry.orig)
                .expect("every entry carried");
            let mut want = c.entry.clone();
            want.timeout = super::super::cached::estimate(c.entry.timeout, c.seen, later);
            want.id = None;
            assert_eq!(*e, want);
        }
        // Too big for the limit: None, so that Save encodes whole.
        assert!(b.patched(age, &delta, 64).expect("patch").is_none());

        // A change to everything (a loss of events) drops the base.
        t.modify_all(|_| {});
        assert!(t.base().is_none());
        assert!(t.hot.iter().all(|h| h.base == NO_BASE));
    }

    #[test]
    fn changes_while_a_base_is_encoded_kill_their_records_at_install() {
        let now = Instant::now();
        let mut t = EntryTable::default();
        for p in 1..=20u16 {
            let mut c = cached(p);
            c.seen = now;
            c.entry.timeout = 1000 + u32::from(p);
            t.insert(key(&c.entry), c);
        }
        let snap = t.base_snapshot(now, Some(1), 2);
        // Meanwhile (no lock held in the cache): a change, a removal that
        // moves the last entry into the hole, and a new entry.
        t.modify(&key(&cached(5).entry), |c| c.entry.status |= 2);
        t.remove(&key(&cached(7).entry));
        let mut c = cached(99);
        c.seen = now;
        t.insert(key(&c.entry), c);
        let built = snap.encode().expect("encode");
        // Another table (a sync replaced it) takes no base from this one.
        let mut other = EntryTable::default();
        assert_eq!(other.install_base(built_of(&t, now)), None);
        assert!(other.base().is_none());
        assert_eq!(t.install_base(built), Some(20));
        let b = t.base().expect("installed");
        // Port 5 changed, port 7 is gone, port 20 moved into 7's slot: their
        // records are dead; port 99 is new.
        assert_eq!(b.skipped().len(), 3);
        assert_eq!(b.changes, 4);
        let pos = |p: u16| t.slot_of(&key(&cached(p).entry)).map(|i| t.hot[i].base);
        assert_eq!(pos(5), Some(NO_BASE));
        assert_eq!(pos(20), Some(NO_BASE));
        assert_eq!(pos(99), Some(NO_BASE));
        assert_eq!(pos(7), None);
        assert!((1..=19)
            .filter(|&p| p != 5 && p != 7)
            .all(|p| pos(p).is_some_and(|b| b != NO_BASE)));
        // And the patch carries exactly the table.
        let mut scratch = Vec::new();
        let delta = t.delta(now, &mut scratch);
        let enc = b.patched(0, &delta, 1 << 20).expect("patch").expect("fits");
        let got = crate::format::decode(&enc.bytes).expect("decodes").entries;
        assert_eq!(got.len(), t.len());
        for c in t.values() {
            let e = got
                .iter()
                .find(|e| e.orig == c.entry.orig)
                .expect("carried");
            assert_eq!(e.status, c.entry.status);
        }
    }

    fn built_of(t: &EntryTable, now: Instant) -> BuiltBase {
        t.base_snapshot(now, Some(1), 2).encode().expect("encode")
    }

    #[test]
    fn hot_records_follow_every_change() {
        let mut t = EntryTable::default();
        for p in 1..=4u16 {
            let c = cached(p);
            t.insert(key(&c.entry), c);
        }
        t.remove(&key(&cached(2).entry));
        t.modify(&key(&cached(3).entry), |c| c.entry.timeout = 77);
        t.modify_all(|c| c.evented = c.entry.timeout != 77);
        let mut scratch = Vec::new();
        let delta = t.delta(Instant::now(), &mut scratch);
        for ((h, v), c) in t.hot().iter().zip(&delta).zip(t.values()) {
            assert_eq!(h.id(), c.entry.id);
            assert_eq!(h.timeout, c.entry.timeout);
            assert_eq!(h.trusted(), c.entry.timeout != 77);
            assert!(matches!(v.rec, Rec::Fast(x) if Some(*x) == Compact::of(&c.entry)));
            assert_eq!(
                h.key(30),
                crate::format::priority::value_key_at(&c.entry, 30)
            );
            assert_eq!(h.key(5), crate::format::priority::value_key_at(&c.entry, 5));
        }
        assert_eq!(t.hot().len(), 3);
        // The lookup rule: untrusted, or within the margin of expiring.
        let now = Instant::now();
        let mut c = cached(9);
        c.seen = now;
        c.entry.timeout = 1000;
        let h = Hot::of(&c);
        assert!(h.needs_lookup(now + std::time::Duration::from_secs(998), 2));
        assert!(!h.needs_lookup(now + std::time::Duration::from_secs(997), 2));
        c.evented = false;
        assert!(Hot::of(&c).needs_lookup(now, 2));
    }
}

#[cfg(test)]
mod compact_tests {
    use super::*;
    use crate::entry::{proto, ProtoInfo, SeqAdj};
    use std::time::{Duration, Instant};

    #[test]
    fn records_are_as_small_as_the_memory_bound_assumes() {
        // tests/cache_memory holds the whole cache to 160 B per entry.
        assert_eq!(std::mem::size_of::<Hot>(), 32);
        assert_eq!(std::mem::size_of::<Slot>(), 32);
    }

    #[test]
    fn stamps_estimate_exactly_as_instants_do() {
        let now = Instant::now();
        let before = now.checked_sub(Duration::from_millis(1500)).unwrap_or(now);
        for seen in [before, now, now + Duration::from_nanos(1)] {
            assert_eq!(Stamp::of(seen).instant(), seen);
            for el in [0u64, 1, 999_999_999, 1_000_000_000, 1_000_000_001, 5 << 40] {
                let at = seen + Duration::from_nanos(el);
                for timeout in [0u32, 1, 30, u32::MAX] {
                    let mut c = cached_v4(L4::Ports { src: 1, dst: 2 }, None);
                    c.seen = seen;
                    c.entry.timeout = timeout;
                    assert_eq!(
                        Hot::of(&c).estimate(at),
                        crate::cache::cached::estimate(timeout, seen, at),
                        "seen {seen:?} + {el} ns, timeout {timeout}"
                    );
                }
            }
            // Before it was seen: nothing elapsed.
            let mut c = cached_v4(L4::None, None);
            c.seen = seen;
            assert_eq!(Hot::of(&c).estimate(before), c.entry.timeout);
        }
    }

    fn cached_v4(l4: L4, tcp: Option<ProtoInfo>) -> Cached {
        let orig = Tuple {
            src: "10.0.0.1".parse().unwrap(),
            dst: "192.0.2.7".parse().unwrap(),
            proto: match l4 {
                L4::Ports { .. } if tcp.is_some() => proto::TCP,
                L4::Ports { .. } => proto::UDP,
                L4::Icmp { .. } => proto::ICMP,
                L4::None => 99,
            },
            l4,
            zone: None,
        };
        Cached {
            entry: Entry {
                orig,
                reply: orig.inverse(),
                status: 0x18e,
                timeout: 431_000,
                mark: 0xdead_beef,
                zone: 0,
                labels: None,
                protoinfo: tcp,
                seq_adj_orig: None,
                seq_adj_reply: None,
                helper: None,
                id: Some(77),
            },
            seen: Instant::now(),
            evented: true,
            probed: false,
            extras_known: true,
        }
    }

    /// Every kind of slot gives back exactly the entry and flags it was
    /// made from, and the encoder gets the same compact form as before.
    #[test]
    fn every_kind_of_entry_comes_back_exactly() {
        let tcp = Some(ProtoInfo::Tcp {
            state: 3,
            wscale_orig: 7,
            wscale_reply: 14,
            flags_orig: 0x23,
            flags_reply: 0x01,
        });
        let mut all = vec![
            cached_v4(
                L4::Ports {
                    src: 40000,
                    dst: 443,
                },
                tcp,
            ),
            cached_v4(L4::Ports { src: 53, dst: 5353 }, None),
            cached_v4(
                L4::Icmp {
                    id: 0xbeef,
                    kind: 8,
                    code: 0,
                },
                None,
            ),
            cached_v4(L4::None, None),
        ];
        // IPv6 (compact, out of line).
        let mut v6 = cached_v4(L4::Ports { src: 1, dst: 2 }, tcp);
        v6.entry.orig.src = "2001:db8::1".parse().unwrap();
        v6.entry.orig.dst = "2001:db8::2".parse().unwrap();
        v6.entry.reply = v6.entry.orig.inverse();
        v6.entry.id = None;
        v6.probed = true;
        v6.evented = false;
        all.push(v6);
        // Full: NAT, zones, labels, sequence adjustment, helper.
        let mut nat = cached_v4(L4::Ports { src: 1000, dst: 80 }, tcp);
        nat.entry.reply.dst = "198.51.100.1".parse().unwrap();
        nat.entry.zone = 3;
        nat.entry.orig.zone = Some(3);
        nat.entry.labels = Some([5; 16]);
        nat.entry.seq_adj_orig = Some(SeqAdj {
            correction_pos: 1,
            offset_before: -2,
            offset_after: 3,
        });
        nat.entry.helper = Some("ftp".into());
        nat.extras_known = false;
        all.push(nat);
        let mut t = EntryTable::default();
        for c in &all {
            assert!(t.insert(key(&c.entry), c.clone()).is_none());
        }
        assert!(matches!(t.slots[0], Slot::V4(_)));
        assert!(matches!(t.slots[4], Slot::Fast(_)));
        assert!(matches!(t.slots[5], Slot::Full(_)));
        let now = Instant::now();
        let mut scratch = Vec::new();
        let views = t.delta(now, &mut scratch);
        for (i, c) in all.iter().enumerate() {
            let got = t.at(&key(&c.entry));
            assert_eq!(got.entry, c.entry);
            assert_eq!(got.seen, c.seen);
            assert_eq!(
                (got.evented, got.probed, got.extras_known, got.complete()),
                (c.evented, c.probed, c.extras_known, c.complete())
            );
            let h = t.hot_of(&key(&c.entry)).expect("cached");
            assert_eq!(h.id(), c.entry.id);
            assert_eq!(
                h.key(100),
                crate::format::priority::value_key_at(&c.entry, 100)
            );
            match (Compact::of(&c.entry), views[i].rec) {
                (Some(want), Rec::Fast(x)) => assert_eq!(*x, want),
                (None, Rec::Full(e)) => assert_eq!(*e, c.entry),
                (want, got) => panic!("{want:?} encoded as {got:?}"),
            }
        }
        // And they go again, each under its own key.
        for c in &all {
            assert_eq!(
                t.remove(&key(&c.entry)).map(|r| r.entry),
                Some(c.entry.clone())
            );
        }
        assert!(t.is_empty());
    }

    /// Removal moves the last slot into the hole; the index follows, also
    /// through growth, and agrees with a model.
    #[test]
    fn index_agrees_with_a_model_through_growth_and_removal() {
        let mut t = EntryTable::default();
        let mut model = std::collections::HashMap::new();
        let mut x = 12345u32;
        for step in 0..20_000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let port = (x >> 16) as u16 % 3000;
            let mut c = cached_v4(L4::Ports { src: port, dst: 53 }, None);
            c.entry.id = Some(step);
            let k = key(&c.entry);
            if x.is_multiple_of(3) {
                assert_eq!(
                    t.remove(&k).map(|r| r.entry.id),
                    model.remove(&port).map(Some)
                );
            } else {
                assert_eq!(
                    t.insert(k, c).map(|r| r.entry.id),
                    model.insert(port, step).map(Some)
                );
            }
        }
        assert_eq!(t.len(), model.len());
        for (&port, &id) in &model {
            let c = cached_v4(L4::Ports { src: port, dst: 53 }, None);
            assert_eq!(t.at(&key(&c.entry)).entry.id, Some(id));
        }
    }
}

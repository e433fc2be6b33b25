//! One selector's cached entries: a dense vector of entries plus a hash
//! index by key. Save walks every entry and then visits them again in
//! priority order, i.e. at random, which a dense vector serves at about
//! half the cost of a hash map (measured: docs/downtime.md, "Warm cache for
//! Save"). Removal swaps the last entry into the hole.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::cached::{key, Cached, Key};
use crate::entry::Entry;
use crate::format::priority::{value_class_at, ABOUT_TO_EXPIRE_SECS};
use crate::format::{self, representable, Compact, Encoded, FormatError, Frame, Rec, View};

/// [`Hot::base`] of an entry that is not in the pre-encoded base.
pub const NO_BASE: u32 = u32::MAX;

/// The oldest a base may be for Save to use it. A base only holds entries
/// with more than this (plus the about-to-expire threshold) left when it
/// was built, so none of them changes priority class or needs a lookup
/// before the base is too old to be used.
pub const MAX_BASE_AGE: Duration = Duration::from_secs(60);

/// What Save's first pass reads of an entry, ~32 bytes, in a dense array
/// of its own next to the entries: Save walks all of them (is a lookup
/// needed, how long is left, how valuable is it) and then encodes, in
/// priority order, most entries from their [`Compact`] form alone (one
/// 64-byte line each, in another array). At 100k entries that is ~10 MB
/// of memory instead of ~23 MB, and Save is bound by memory: the tables
/// are cold by the time QEMU asks (measured: the same encode takes 8 ms on
/// warm data, 17 ms after 100 ms of idleness).
#[derive(Debug, Clone)]
pub struct Hot {
    pub seen: Instant,
    /// Seconds left at `seen`.
    pub timeout: u32,
    pub id: Option<u32>,
    /// Evented and complete: no lookup needed unless about to expire.
    pub trusted: bool,
    /// The format can carry it (`format::representable`).
    pub representable: bool,
    /// Its priority class while more than ABOUT_TO_EXPIRE_SECS are left.
    pub class: u8,
    /// Its record's position in the pre-encoded [`Base`], or [`NO_BASE`].
    /// A changed entry gets a new `Hot` (with `NO_BASE`), so an entry that
    /// still has a position is exactly what the base holds for it.
    pub base: u32,
    /// Stamped by the table at every new `Hot`, unique within the table
    /// (wrapping after 2^32 changes, far more than can happen while one
    /// base is encoded): an entry whose `ver` is unchanged since a
    /// snapshot has not changed since.
    ver: u32,
}

impl Hot {
    fn of(c: &Cached) -> Hot {
        Hot {
            seen: c.seen,
            timeout: c.entry.timeout,
            id: c.entry.id,
            trusted: c.evented && c.complete(),
            representable: representable(&c.entry),
            class: value_class_at(&c.entry, u32::MAX) as u8,
            base: NO_BASE,
            ver: 0,
        }
    }

    /// Seconds left now (see [`super::cached::estimate`]).
    pub fn estimate(&self, now: Instant) -> u32 {
        super::cached::estimate(self.timeout, self.seen, now)
    }

    /// Whether a dump answered from the cache must first look this entry up
    /// in the kernel: it might be gone without an event (silent entry), is
    /// missing attributes, or is so close to expiry that the kernel may have
    /// expired it already or traffic may have refreshed it.
    pub fn needs_lookup(&self, now: Instant, margin_secs: u32) -> bool {
        !self.trusted || self.estimate(now) <= margin_secs
    }

    /// The priority key with `left` seconds left (`priority::value_key_at`),
    /// or `View::EXCLUDED`.
    pub fn key(&self, left: u32) -> u64 {
        if !self.representable {
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
    index: HashMap<Key, u32>,
    slots: Vec<Cached>,
    /// `hot[i]` and `compact[i]` describe `slots[i]`.
    hot: Vec<Hot>,
    compact: Vec<Option<Compact>>,
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
        let frames = format::encode_frames(&ranked, format::default_segments(ranked.len()), mark)?;
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
            index: HashMap::with_capacity(n),
            slots: crate::format::bigvec::with_capacity(n),
            hot: Vec::with_capacity(n),
            compact: Vec::with_capacity(n),
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

    /// Copies out what a new base is encoded from: the entries that will
    /// stay valid for [`MAX_BASE_AGE`] (trusted, representable, with more
    /// than `margin_secs`, the lookup margin, and the about-to-expire
    /// threshold left after that time), each with the time it has left at
    /// `now`. `mark` is the default mark when the caller knows it.
    pub fn base_snapshot(&self, now: Instant, mark: Option<u32>, margin_secs: u32) -> BaseSnapshot {
        let min_left = ABOUT_TO_EXPIRE_SECS.max(margin_secs) + MAX_BASE_AGE.as_secs() as u32;
        let mut recs = Vec::with_capacity(self.slots.len());
        let mut slots = Vec::with_capacity(self.slots.len());
        for (i, ((h, x), c)) in self
            .hot
            .iter()
            .zip(&self.compact)
            .zip(&self.slots)
            .enumerate()
        {
            if !h.trusted || !h.representable {
                continue;
            }
            let left = h.estimate(now);
            if left > min_left {
                let r = match x {
                    Some(x) => Owned::Fast(*x),
                    None => Owned::Full(Box::new(c.entry.clone())),
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
        self.index.contains_key(k)
    }

    pub fn get(&self, k: &Key) -> Option<&Cached> {
        self.index.get(k).map(|&i| &self.slots[i as usize])
    }

    /// Runs `f` on the entry under `k`, if any, and keeps its [`Hot`]
    /// record in step.
    pub fn modify<R>(&mut self, k: &Key, f: impl FnOnce(&mut Cached) -> R) -> Option<R> {
        let i = *self.index.get(k)? as usize;
        self.invalidate(i);
        let r = f(&mut self.slots[i]);
        let ver = self.next_ver();
        self.hot[i] = Hot::of(&self.slots[i]);
        self.hot[i].ver = ver;
        self.compact[i] = Compact::of(&self.slots[i].entry);
        Some(r)
    }

    /// Runs `f` on every entry, keeping the [`Hot`] records in step. The
    /// base goes: any of its records may have changed.
    pub fn modify_all(&mut self, mut f: impl FnMut(&mut Cached)) {
        self.base = None;
        let mut ver = self.ver;
        for ((c, h), x) in self
            .slots
            .iter_mut()
            .zip(&mut self.hot)
            .zip(&mut self.compact)
        {
            f(c);
            *h = Hot::of(c);
            h.ver = ver;
            ver = ver.wrapping_add(1);
            *x = Compact::of(&c.entry);
        }
        self.ver = ver;
    }

    /// Inserts `c` under `k` (which must be `key(&c.entry)`), returning the
    /// entry it replaces.
    pub fn insert(&mut self, k: Key, c: Cached) -> Option<Cached> {
        debug_assert!(k == key(&c.entry));
        let mut hot = Hot::of(&c);
        hot.ver = self.next_ver();
        let compact = Compact::of(&c.entry);
        match self.index.get(&k) {
            Some(&i) => {
                let i = i as usize;
                self.invalidate(i);
                (self.hot[i], self.compact[i]) = (hot, compact);
                Some(std::mem::replace(&mut self.slots[i], c))
            }
            None => {
                self.inserted += 1;
                if let Some(b) = self.base.as_mut() {
                    b.changes += 1;
                }
                // u32 indexes: far above the 2M entries a state may hold.
                self.index.insert(k, self.slots.len() as u32);
                self.slots.push(c);
                self.hot.push(hot);
                self.compact.push(compact);
                None
            }
        }
    }

    pub fn remove(&mut self, k: &Key) -> Option<Cached> {
        let i = self.index.remove(k)? as usize;
        self.invalidate(i);
        let c = self.slots.swap_remove(i);
        self.hot.swap_remove(i);
        self.compact.swap_remove(i);
        if let Some(moved) = self.slots.get(i) {
            self.index.insert(key(&moved.entry), i as u32);
        }
        Some(c)
    }

    /// Every entry, in storage order.
    pub fn values(&self) -> std::slice::Iter<'_, Cached> {
        self.slots.iter()
    }

    /// Every entry's [`Hot`] record, in storage order, with what Save
    /// encodes it from (its compact form when it has one).
    pub fn with_hot(&self) -> impl Iterator<Item = (&Hot, Rec<'_>)> {
        self.hot
            .iter()
            .zip(&self.compact)
            .zip(&self.slots)
            .map(|((h, x), c)| {
                let r = match x {
                    Some(x) => Rec::Fast(x),
                    None => Rec::Full(&c.entry),
                };
                (h, r)
            })
    }

    /// Keys of the entries that need a lookup before Save can trust them.
    pub fn lookup_keys(&self, now: Instant, margin_secs: u32) -> Vec<Key> {
        self.hot
            .iter()
            .zip(&self.slots)
            .filter(|(h, _)| h.needs_lookup(now, margin_secs))
            .map(|(_, c)| key(&c.entry))
            .collect()
    }
}

// Tests only: a lookup that panics has no place on the event path.
#[cfg(test)]
impl std::ops::Index<&Key> for EntryTable {
    type Output = Cached;

    fn index(&self, k: &Key) -> &Cached {
        self.get(k).expect("no cached entry for this key")
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
            assert_eq!(t[&key(&cached(p).entry)].entry.id, Some(u32::from(p)));
        }
        assert!(t.remove(&key(&cached(1).entry)).is_none());
        // Replacing keeps the count and returns the old one.
        let mut c = cached(3);
        c.entry.timeout = 99;
        assert_eq!(
            t.insert(key(&c.entry), c).map(|o| o.entry.timeout),
            Some(30)
        );
        assert_eq!(t[&key(&cached(3).entry)].entry.timeout, 99);
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
        let first = t.slots.iter().zip(&t.hot).find(|(_, h)| h.base == 0);
        assert_eq!(first.map(|(c, _)| c.entry.timeout), Some(1040));

        let base_pos =
            |t: &EntryTable, p: u16| t.hot[t.index[&key(&cached(p).entry)] as usize].base;
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
        let delta: Vec<View> = t
            .with_hot()
            .filter(|(h, _)| h.base == NO_BASE)
            .map(|(h, r)| {
                let left = h.estimate(later);
                View::with_key(r, left, h.key(left))
            })
            .collect();
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
        let pos = |p: u16| {
            t.index
                .get(&key(&cached(p).entry))
                .map(|&i| t.hot[i as usize].base)
        };
        assert_eq!(pos(5), Some(NO_BASE));
        assert_eq!(pos(20), Some(NO_BASE));
        assert_eq!(pos(99), Some(NO_BASE));
        assert_eq!(pos(7), None);
        assert!((1..=19)
            .filter(|&p| p != 5 && p != 7)
            .all(|p| pos(p).is_some_and(|b| b != NO_BASE)));
        // And the patch carries exactly the table.
        let delta: Vec<View> = t
            .with_hot()
            .filter(|(h, _)| h.base == NO_BASE)
            .map(|(h, r)| View::with_key(r, h.estimate(now), h.key(h.estimate(now))))
            .collect();
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
        for ((h, r), c) in t.with_hot().zip(t.values()) {
            assert_eq!(h.id, c.entry.id);
            assert_eq!(h.timeout, c.entry.timeout);
            assert_eq!(h.trusted, c.entry.timeout != 77);
            assert!(matches!(r, Rec::Fast(x) if Some(*x) == Compact::of(&c.entry)));
            assert_eq!(
                h.key(30),
                crate::format::priority::value_key_at(&c.entry, 30)
            );
            assert_eq!(h.key(5), crate::format::priority::value_key_at(&c.entry, 5));
        }
        assert_eq!(t.with_hot().count(), 3);
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

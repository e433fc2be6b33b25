//! One selector's cached entries: a dense vector of entries plus a hash
//! index by key. Save walks every entry and then visits them again in
//! priority order, i.e. at random: in a dense vector (~23 MB at 100k
//! entries) that costs about half what it costs in a hash map that holds the
//! entries in its own sparse table (~50 MB, measured 13–17 ms against 8.5 ms
//! for the same encode). Removal swaps the last entry into the hole.

use std::collections::HashMap;
use std::time::Instant;

use super::state::{key, Cached, Key};
use crate::format::binary::representable;
use crate::format::priority::{value_class_at, ABOUT_TO_EXPIRE_SECS};
use crate::format::{Compact, Rec, View};

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
    /// The format can carry it (`binary::representable`).
    pub representable: bool,
    /// Its priority class while more than ABOUT_TO_EXPIRE_SECS are left.
    pub class: u8,
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
        }
    }

    /// Seconds left now (see [`super::state::estimate`]).
    pub fn estimate(&self, now: Instant) -> u32 {
        super::state::estimate(self.timeout, self.seen, now)
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

#[derive(Debug, Default)]
pub struct EntryTable {
    index: HashMap<Key, u32>,
    slots: Vec<Cached>,
    /// `hot[i]` and `compact[i]` describe `slots[i]`.
    hot: Vec<Hot>,
    compact: Vec<Option<Compact>>,
}

impl EntryTable {
    pub fn with_capacity(n: usize) -> Self {
        EntryTable {
            index: HashMap::with_capacity(n),
            slots: crate::format::bigvec::with_capacity(n),
            hot: Vec::with_capacity(n),
            compact: Vec::with_capacity(n),
        }
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
        let r = f(&mut self.slots[i]);
        self.hot[i] = Hot::of(&self.slots[i]);
        self.compact[i] = Compact::of(&self.slots[i].entry);
        Some(r)
    }

    /// Runs `f` on every entry, keeping the [`Hot`] records in step.
    pub fn modify_all(&mut self, mut f: impl FnMut(&mut Cached)) {
        for ((c, h), x) in self
            .slots
            .iter_mut()
            .zip(&mut self.hot)
            .zip(&mut self.compact)
        {
            f(c);
            *h = Hot::of(c);
            *x = Compact::of(&c.entry);
        }
    }

    /// Inserts `c` under `k` (which must be `key(&c.entry)`), returning the
    /// entry it replaces.
    pub fn insert(&mut self, k: Key, c: Cached) -> Option<Cached> {
        debug_assert!(k == key(&c.entry));
        let (hot, compact) = (Hot::of(&c), Compact::of(&c.entry));
        match self.index.get(&k) {
            Some(&i) => {
                let i = i as usize;
                (self.hot[i], self.compact[i]) = (hot, compact);
                Some(std::mem::replace(&mut self.slots[i], c))
            }
            None => {
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
    use std::time::Instant;

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

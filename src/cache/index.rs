//! A table's key index: key → slot in 8 bytes per bucket, where a
//! `HashMap<Key, u32>` holds the 48-byte key again next to the entry
//! (~85 B per entry at its load factor). Each bucket keeps 32 bits of the
//! key's hash and the slot, so a probe compares keys (reading the entry)
//! only when the hashes agree. Open addressing with linear probing and
//! backward-shift deletion: no tombstones, so probe lengths stay those of
//! the load factor however long the table lives.
//!
//! The hash is keyed per table (`RandomState`): tuples are chosen by the
//! guest, and a fixed hash would let it build one long probe chain.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use super::cached::Key;

const EMPTY: u64 = 0;

#[derive(Debug)]
pub struct KeyIndex {
    /// `hash << 32 | (slot + 1)`; [`EMPTY`] for a free bucket.
    buckets: Vec<u64>,
    len: usize,
    hasher: RandomState,
}

fn bucket(hash: u32, slot: u32) -> u64 {
    (u64::from(hash) << 32) | u64::from(slot + 1)
}

fn slot_of(b: u64) -> u32 {
    (b as u32).wrapping_sub(1)
}

fn hash_of(b: u64) -> u32 {
    (b >> 32) as u32
}

/// Buckets for `n` keys at a load of at most 7/8 (a power of two).
fn buckets_for(n: usize) -> usize {
    (n.saturating_mul(8) / 7 + 1).next_power_of_two().max(8)
}

impl KeyIndex {
    pub fn with_capacity(n: usize) -> KeyIndex {
        KeyIndex {
            buckets: if n == 0 {
                Vec::new()
            } else {
                vec![EMPTY; buckets_for(n)]
            },
            len: 0,
            hasher: RandomState::new(),
        }
    }

    pub fn hash(&self, k: &Key) -> u32 {
        // The low bits pick the bucket: fold the high ones in.
        let h = self.hasher.hash_one(k);
        (h ^ (h >> 32)) as u32
    }

    fn mask(&self) -> usize {
        self.buckets.len().wrapping_sub(1)
    }

    /// The slot under `hash` for which `is` holds, and its bucket.
    pub fn find(&self, hash: u32, mut is: impl FnMut(u32) -> bool) -> Option<(usize, u32)> {
        if self.buckets.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut p = hash as usize & mask;
        loop {
            let b = self.buckets[p];
            if b == EMPTY {
                return None;
            }
            if hash_of(b) == hash && is(slot_of(b)) {
                return Some((p, slot_of(b)));
            }
            p = (p + 1) & mask;
        }
    }

    /// Adds `slot` under `hash`; the key must not be in the index yet.
    pub fn insert(&mut self, hash: u32, slot: u32) {
        if (self.len + 1) * 8 > self.buckets.len() * 7 {
            self.grow();
        }
        let mask = self.mask();
        let mut p = hash as usize & mask;
        while self.buckets[p] != EMPTY {
            p = (p + 1) & mask;
        }
        self.buckets[p] = bucket(hash, slot);
        self.len += 1;
    }

    fn grow(&mut self) {
        let n = buckets_for(self.len + 1).max(self.buckets.len() * 2);
        let old = std::mem::replace(&mut self.buckets, vec![EMPTY; n]);
        let mask = self.mask();
        for b in old.into_iter().filter(|&b| b != EMPTY) {
            let mut p = hash_of(b) as usize & mask;
            while self.buckets[p] != EMPTY {
                p = (p + 1) & mask;
            }
            self.buckets[p] = b;
        }
    }

    /// Points the key in bucket `p` (from [`find`](Self::find)) at `slot`.
    pub fn set_slot(&mut self, p: usize, slot: u32) {
        self.buckets[p] = bucket(hash_of(self.buckets[p]), slot);
    }

    /// Empties bucket `p` (from [`find`](Self::find)), moving later keys of
    /// its probe chain back so that none is cut off from its home bucket.
    pub fn remove_at(&mut self, mut p: usize) {
        let mask = self.mask();
        self.buckets[p] = EMPTY;
        self.len -= 1;
        let mut q = (p + 1) & mask;
        loop {
            let b = self.buckets[q];
            if b == EMPTY {
                return;
            }
            let home = hash_of(b) as usize & mask;
            // `b` may move into the hole unless its home lies cyclically
            // in (p, q]: then it would end up before its home.
            if (q.wrapping_sub(home) & mask) >= (q.wrapping_sub(p) & mask) {
                self.buckets[p] = b;
                self.buckets[q] = EMPTY;
                p = q;
            }
            q = (q + 1) & mask;
        }
    }

    /// The bucket holding `slot` under `hash`.
    pub fn find_slot(&self, hash: u32, slot: u32) -> Option<usize> {
        self.find(hash, |s| s == slot).map(|(p, _)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a model, with hashes squeezed into few buckets so that
    /// chains wrap around and deletions shift.
    #[test]
    fn behaves_like_a_map_under_collisions() {
        let mut ix = KeyIndex::with_capacity(0);
        let mut model: std::collections::HashMap<u32, u32> = Default::default();
        let mut rng = 0x1234_5678u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // Key k has hash (k % 16) << 28 | k: equal low bits for many keys.
        let h = |k: u32| ((k % 5) << 28) | (k % 7);
        for _ in 0..20_000 {
            let k = (next() % 300) as u32;
            let found = ix.find(h(k), |s| s == k).map(|(_, s)| s);
            assert_eq!(found, model.get(&k).copied());
            if next().is_multiple_of(2) {
                if found.is_none() {
                    ix.insert(h(k), k);
                    model.insert(k, k);
                }
            } else if let Some((p, _)) = ix.find(h(k), |s| s == k) {
                ix.remove_at(p);
                model.remove(&k);
            }
            assert_eq!(ix.len, model.len());
        }
        for (&k, &s) in &model {
            assert_eq!(ix.find(h(k), |x| x == k).map(|(_, s)| s), Some(s));
        }
    }
}

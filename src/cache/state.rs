//! The cache's tables and the rules that merge events, dumps and lookups
//! into them. No I/O here: everything is driven by [`super::CachedAccess`]
//! under one mutex, which makes the ordering arguments below hold.

use std::collections::HashMap;
use std::time::Instant;

use super::cached::{key, Cached, Key};
use super::table::EntryTable;
use crate::ctnetlink::{EventKind, EventSink};
use crate::entry::{Entry, Selector};

/// One watched selector.
#[derive(Debug)]
pub struct SelCache {
    pub watchers: u32,
    /// Its number in [`Holders`].
    num: u16,
    pub entries: EntryTable,
    /// Warm and no event lost since the last completed sync.
    pub trusted: bool,
    /// Start of the last completed sync dump.
    pub synced_at: Option<Instant>,
    /// Bumped whenever events were lost: a sync that started in an earlier
    /// epoch missed events and cannot make the cache trusted.
    pub epoch: u64,
    pub lost_at: Option<Instant>,
    /// Events applied while a sync dump runs outside the lock, replayed on
    /// top of its snapshot.
    pub log: Option<Vec<(EventKind, Entry, Instant)>>,
    /// Keys found incomplete, for the background lookup.
    pub fix: Vec<Key>,
    /// The last sync brought entries nobody has probed yet.
    pub probe_pending: bool,
    /// How long the last sync dump took: what a direct dump costs.
    pub dump_cost: Option<std::time::Duration>,
    pub last_sync_error: Option<String>,
    pub sync_failed_at: Option<Instant>,
    /// When the last pre-encoded base was built (or tried).
    pub base_tried_at: Option<Instant>,
}

impl SelCache {
    fn new(num: u16) -> SelCache {
        SelCache {
            watchers: 0,
            num,
            entries: EntryTable::default(),
            trusted: false,
            synced_at: None,
            epoch: 0,
            lost_at: None,
            log: None,
            fix: Vec::new(),
            probe_pending: false,
            dump_cost: None,
            last_sync_error: None,
            sync_failed_at: None,
            base_tried_at: None,
        }
    }
}

/// All watched selectors of one namespace and the indexes events need.
#[derive(Debug, Default)]
pub struct Tables {
    pub sels: HashMap<Selector, SelCache>,
    /// Who caches an entry with a given `CTA_ID`: an event for an entry
    /// that left the mark is still recognised.
    holders: Holders,
    /// Selectors by [`SelCache::num`].
    nums: Vec<Option<Selector>>,
    /// Selectors with a full mark mask, by mark (the common case).
    by_mark: HashMap<u32, Vec<Selector>>,
    /// Selectors with a partial mask.
    masked: Vec<Selector>,
    /// Event messages decoded and applied.
    pub applied: u64,
}

fn id_of(e: &Entry) -> u32 {
    e.id.unwrap_or(0)
}

/// In a [`Holders`] value: more than one selector holds the id, or a
/// selector beyond the numbers (find them by key).
const MANY: u16 = u16::MAX;
/// A count that has reached this stays (never drops to a wrong zero).
const STUCK: u32 = 0xFFFF;

/// `CTA_ID` → how many cached entries have it and, when they are all one
/// selector's (nearly always), which: 9 bytes per entry at the map's load,
/// where a list of selectors per id cost ~100 (ids may collide; the key
/// and id are checked again before anything changes).
#[derive(Debug, Default)]
struct Holders(HashMap<u32, u32>);

impl Holders {
    fn hold(&mut self, id: u32, num: u16) {
        let v = self.0.entry(id).or_insert(u32::from(num));
        let count = (*v >> 16).saturating_add(1).min(STUCK);
        let who = if *v as u16 == num { num } else { MANY };
        *v = (count << 16) | u32::from(who);
    }

    fn unhold(&mut self, id: u32) {
        if let Some(v) = self.0.get_mut(&id) {
            let count = *v >> 16;
            if count == STUCK {
                return;
            }
            if count <= 1 {
                self.0.remove(&id);
            } else {
                *v -= 1 << 16;
            }
        }
    }

    /// The selector number holding `id`, [`MANY`], or `None`: nobody.
    fn holder(&self, id: u32) -> Option<u16> {
        self.0.get(&id).map(|&v| v as u16)
    }
}

impl Tables {
    /// Adds one watcher; true when the selector is new (needs a sync).
    pub fn watch(&mut self, sel: Selector) -> bool {
        let free = self.nums.iter().position(Option::is_none);
        let nums = &mut self.nums;
        let sc = self.sels.entry(sel).or_insert_with(|| {
            let num = free.unwrap_or(nums.len());
            if num == nums.len() {
                nums.push(None);
            }
            nums[num] = Some(sel);
            SelCache::new(u16::try_from(num).unwrap_or(MANY))
        });
        sc.watchers += 1;
        let new = sc.watchers == 1;
        if new {
            self.reindex();
        }
        new
    }

    /// Drops one watcher; the last one drops the selector's entries.
    pub fn unwatch(&mut self, sel: Selector) {
        let Some(sc) = self.sels.get_mut(&sel) else {
            return;
        };
        sc.watchers = sc.watchers.saturating_sub(1);
        if sc.watchers == 0 {
            if let Some(sc) = self.sels.remove(&sel) {
                for id in sc.entries.ids() {
                    self.holders.unhold(id.unwrap_or(0));
                }
                if let Some(n) = self.nums.get_mut(usize::from(sc.num)) {
                    *n = None;
                }
            }
            self.reindex();
        }
    }

    fn reindex(&mut self) {
        self.by_mark.clear();
        self.masked.clear();
        for s in self.sels.keys() {
            if s.mark_mask == u32::MAX {
                self.by_mark.entry(s.mark).or_default().push(*s);
            } else {
                self.masked.push(*s);
            }
        }
    }

    /// Every selector is untrusted from now on (events were lost, or event
    /// delivery is off).
    pub fn lost(&mut self, now: Instant) {
        for sc in self.sels.values_mut() {
            sc.trusted = false;
            sc.epoch += 1;
            sc.lost_at = Some(now);
            // A probe's answer may have been among the lost events: probe
            // those entries again.
            let mut reprobe = false;
            sc.entries.modify_all(|c| {
                if c.probed && !c.evented {
                    c.probed = false;
                    reprobe = true;
                }
            });
            sc.probe_pending |= reprobe;
        }
    }

    fn mark_watched(&self, mark: u32) -> bool {
        self.by_mark.contains_key(&mark)
            || self
                .masked
                .iter()
                .any(|s| mark & s.mark_mask == s.mark & s.mark_mask)
    }

    /// Applies one event at `now` to every selector it can concern.
    pub fn apply(&mut self, kind: EventKind, e: Entry, now: Instant) {
        self.applied += 1;
        let mut cands: Vec<Selector> = Vec::new();
        if let Some(v) = self.by_mark.get(&e.mark) {
            cands.extend(v.iter().copied());
        }
        cands.extend(self.masked.iter().copied().filter(|s| s.matches(&e)));
        match self.holders.holder(id_of(&e)) {
            None => {}
            Some(MANY) => {
                let k = key(&e);
                for (s, sc) in &self.sels {
                    if !cands.contains(s) && sc.entries.contains_key(&k) {
                        cands.push(*s);
                    }
                }
            }
            Some(num) => {
                if let Some(Some(s)) = self.nums.get(usize::from(num)) {
                    if !cands.contains(s) {
                        cands.push(*s);
                    }
                }
            }
        }
        for sel in cands {
            let Some(sc) = self.sels.get_mut(&sel) else {
                continue;
            };
            if let Some(log) = sc.log.as_mut() {
                log.push((kind, e.clone(), now));
            }
            apply_one(&mut self.holders, sel, sc, kind, &e, now);
        }
    }

    /// Replaces `sel`'s entries with a sync dump taken from `started`, then
    /// replays the events logged meanwhile. Returns false (and changes
    /// nothing) when the selector is gone or was unwatched and watched again
    /// since the sync started: its log would miss events.
    pub fn install(&mut self, sel: Selector, snapshot: Vec<Entry>, started: Instant) -> bool {
        let Some(sc) = self.sels.get_mut(&sel) else {
            return false;
        };
        let Some(log) = sc.log.take() else {
            return false;
        };
        let old = std::mem::take(&mut sc.entries);
        for id in old.ids() {
            self.holders.unhold(id.unwrap_or(0));
        }
        let mut fresh = EntryTable::with_capacity(snapshot.len());
        for e in snapshot {
            let k = key(&e);
            // Still the same incarnation: what events proved about it holds.
            let same = old.hot_of(&k).filter(|h| h.id() == e.id);
            let evented = same.is_some_and(|h| h.evented());
            let probed = same.is_some_and(|h| h.probed());
            sc.probe_pending |= !evented && !probed;
            self.holders.hold(id_of(&e), sc.num);
            let replaced = fresh.insert(
                k,
                Cached {
                    entry: e,
                    seen: started,
                    evented,
                    probed,
                    extras_known: true,
                },
            );
            // A dump never repeats a key; if one did, one entry is held.
            if let Some(r) = replaced {
                self.holders.unhold(id_of(&r.entry));
            }
        }
        sc.entries = fresh;
        sc.fix.clear();
        for (kind, e, at) in log {
            apply_one(&mut self.holders, sel, sc, kind, &e, at);
        }
        true
    }

    /// Takes the entries of `sel` that still need a probe and marks them
    /// probed.
    pub fn take_probes(&mut self, sel: Selector) -> Vec<Entry> {
        let Some(sc) = self.sels.get_mut(&sel) else {
            return Vec::new();
        };
        sc.probe_pending = false;
        let mut out = Vec::new();
        sc.entries.modify_all(|c| {
            if !c.evented && !c.probed {
                c.probed = true;
                out.push(c.entry.clone());
            }
        });
        out
    }

    /// Drops a silent entry a probe found gone (the same incarnation only).
    pub fn gone(&mut self, sel: Selector, e: &Entry) {
        let Some(sc) = self.sels.get_mut(&sel) else {
            return;
        };
        let k = key(e);
        if sc
            .entries
            .hot_of(&k)
            .is_some_and(|h| h.id() == e.id && !h.evented())
        {
            sc.entries.remove(&k);
            self.holders.unhold(id_of(e));
        }
    }

    /// Applies kernel lookups (`None`: no such entry) for `sel`'s `keys`.
    pub fn apply_lookups(
        &mut self,
        sel: Selector,
        keys: &[Key],
        found: Vec<Option<Entry>>,
        now: Instant,
    ) {
        let Some(sc) = self.sels.get_mut(&sel) else {
            return;
        };
        for (k, got) in keys.iter().zip(found) {
            let Some(old) = sc.entries.remove(k) else {
                continue;
            };
            self.holders.unhold(id_of(&old.entry));
            let Some(e) = got else { continue };
            if !sel.matches(&e) {
                continue; // left the selection without telling us
            }
            self.holders.hold(id_of(&e), sc.num);
            let same = old.entry.id == e.id;
            sc.entries.insert(
                *k,
                Cached {
                    entry: e,
                    seen: now,
                    evented: same && old.evented,
                    probed: same && old.probed,
                    extras_known: true,
                },
            );
        }
    }
}

impl EventSink for Tables {
    fn wanted(&self, mark: u32, id: Option<u32>) -> bool {
        self.mark_watched(mark) || self.holders.holder(id.unwrap_or(0)).is_some()
    }

    fn event(&mut self, kind: EventKind, entry: Entry) {
        // Stamped per event: a long backlog must not age timeouts wrongly.
        self.apply(kind, entry, Instant::now());
    }
}

/// The merge rules for one selector.
fn apply_one(
    holders: &mut Holders,
    sel: Selector,
    sc: &mut SelCache,
    kind: EventKind,
    e: &Entry,
    now: Instant,
) {
    let k = key(e);
    match kind {
        EventKind::Destroy => {
            // Only this incarnation: a DESTROY of an older one replayed over
            // a snapshot must not remove its successor.
            if sc.entries.hot_of(&k).is_some_and(|h| h.id() == e.id) {
                sc.entries.remove(&k);
                holders.unhold(id_of(e));
            }
        }
        EventKind::New | EventKind::Update => {
            if !sel.matches(e) {
                // Moved out of the selection (events arrive in order, so any
                // cached incarnation with this key is older or this one).
                if let Some(old) = sc.entries.remove(&k) {
                    holders.unhold(id_of(&old.entry));
                }
                return;
            }
            let same = sc.entries.hot_of(&k).map(|h| h.id() == e.id);
            match same {
                Some(true) => {
                    let complete = sc.entries.modify(&k, |c| {
                        merge(c, kind, e, now);
                        c.complete()
                    });
                    if complete == Some(false) {
                        sc.fix.push(k);
                    }
                }
                other => {
                    if other.is_some() {
                        if let Some(old) = sc.entries.hot_of(&k) {
                            holders.unhold(old.id().unwrap_or(0));
                        }
                    }
                    holders.hold(id_of(e), sc.num);
                    let c = Cached {
                        entry: e.clone(),
                        seen: now,
                        evented: true,
                        probed: false,
                        // A NEW is complete but for protocol info a packet
                        // may not have reported; an UPDATE carries only
                        // what changed.
                        extras_known: kind == EventKind::New,
                    };
                    if !c.complete() {
                        sc.fix.push(k);
                    }
                    sc.entries.insert(k, c);
                }
            }
        }
    }
}

/// NEW/UPDATE of a cached incarnation: always-present attributes are taken
/// from the event, the others kept unless the event carries them.
fn merge(c: &mut Cached, kind: EventKind, e: &Entry, now: Instant) {
    let old = &c.entry;
    let mut n = e.clone();
    n.protoinfo = e.protoinfo.or(old.protoinfo);
    n.seq_adj_orig = e.seq_adj_orig.or(old.seq_adj_orig);
    n.seq_adj_reply = e.seq_adj_reply.or(old.seq_adj_reply);
    if e.labels.is_none() && old.labels.is_some() {
        // Either nothing happened to the labels, or they were cleared (the
        // kernel sends no CTA_LABELS for all-zero labels): ask the kernel.
        n.labels = old.labels;
        c.extras_known = false;
    }
    if kind == EventKind::New {
        c.extras_known = true;
    }
    c.entry = n;
    c.seen = now;
    c.evented = true;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{proto, ProtoInfo, Tuple, L4};

    fn entry(port: u16, mark: u32, id: u32) -> Entry {
        let orig = Tuple {
            src: "10.1.0.1".parse().unwrap(),
            dst: "10.2.0.1".parse().unwrap(),
            proto: proto::TCP,
            l4: L4::Ports {
                src: port,
                dst: 443,
            },
            zone: None,
        };
        Entry {
            orig,
            reply: orig.inverse(),
            status: 0xe,
            timeout: 1000,
            mark,
            zone: 0,
            labels: None,
            protoinfo: Some(ProtoInfo::Tcp {
                state: 3,
                wscale_orig: 7,
                wscale_reply: 7,
                flags_orig: 3,
                flags_reply: 3,
            }),
            seq_adj_orig: None,
            seq_adj_reply: None,
            helper: None,
            id: Some(id),
        }
    }

    fn tables(sel: Selector) -> Tables {
        let mut t = Tables::default();
        assert!(t.watch(sel));
        t
    }

    #[test]
    fn destroy_during_sync_is_not_resurrected_by_the_snapshot() {
        let sel = Selector::mark(100);
        let mut t = tables(sel);
        let now = Instant::now();
        t.sels.get_mut(&sel).unwrap().log = Some(Vec::new());
        // The dump saw the entry, then it was destroyed before the dump ended.
        let a = entry(1, 100, 11);
        t.apply(EventKind::Destroy, a.clone(), now);
        assert!(t.install(sel, vec![a.clone(), entry(2, 100, 12)], now));
        let sc = &t.sels[&sel];
        assert!(!sc.entries.contains_key(&key(&a)));
        assert_eq!(sc.entries.len(), 1);
    }

    #[test]
    fn stale_destroy_spares_the_next_incarnation() {
        let sel = Selector::mark(100);
        let mut t = tables(sel);
        let now = Instant::now();
        t.sels.get_mut(&sel).unwrap().log = Some(Vec::new());
        t.apply(EventKind::Destroy, entry(1, 100, 11), now);
        // The snapshot already holds the successor with the same tuple.
        assert!(t.install(sel, vec![entry(1, 100, 99)], now));
        assert_eq!(t.sels[&sel].entries.len(), 1);
    }

    #[test]
    fn partial_update_keeps_what_it_does_not_carry() {
        let sel = Selector::mark(100);
        let mut t = tables(sel);
        let now = Instant::now();
        let mut full = entry(1, 100, 11);
        full.labels = Some([1; 16]);
        t.apply(EventKind::New, full.clone(), now);
        let sc = &t.sels[&sel];
        assert!(sc.entries.at(&key(&full)).complete());
        let mut upd = full.clone();
        upd.protoinfo = None;
        upd.labels = None;
        upd.timeout = 50;
        t.apply(EventKind::Update, upd, now);
        let c = &t.sels[&sel].entries.at(&key(&full));
        assert_eq!(c.entry.protoinfo, full.protoinfo);
        assert_eq!(c.entry.labels, full.labels);
        assert_eq!(c.entry.timeout, 50);
        // Cleared labels are indistinguishable from untouched ones.
        assert!(!c.complete());
    }

    #[test]
    fn mark_moves_in_and_out() {
        let sel = Selector::mark(100);
        let mut t = tables(sel);
        let now = Instant::now();
        let e = entry(1, 200, 11);
        assert!(!t.wanted(200, Some(11)));
        let moved_in = Entry {
            mark: 100,
            ..e.clone()
        };
        assert!(t.wanted(100, Some(11)));
        t.apply(EventKind::Update, moved_in, now);
        let c = &t.sels[&sel].entries.at(&key(&e));
        assert!(!c.extras_known, "first seen through an UPDATE");
        assert_eq!(t.sels[&sel].fix.len(), 1);
        // Its id is now known, so leaving the mark is recognised.
        assert!(t.wanted(300, Some(11)));
        t.apply(EventKind::Update, Entry { mark: 300, ..e }, now);
        assert!(t.sels[&sel].entries.is_empty());
        assert!(!t.wanted(300, Some(11)));
    }

    /// An id cached by two selectors (overlapping masks) is found by key
    /// in each, and forgotten only when neither holds it any more.
    #[test]
    fn ids_held_by_several_selectors() {
        let (a, b) = (
            Selector::mark(100),
            Selector {
                mark: 0,
                mark_mask: 0xff00,
                zone: None,
            },
        );
        let mut t = tables(a);
        assert!(t.watch(b));
        let now = Instant::now();
        let e = entry(1, 100, 11);
        t.apply(EventKind::New, e.clone(), now);
        assert_eq!(t.holders.holder(11), Some(MANY));
        // Moved to a mark neither selects: both drop it.
        t.apply(
            EventKind::Update,
            Entry {
                mark: 0x300,
                ..e.clone()
            },
            now,
        );
        assert!(t.sels[&a].entries.is_empty() && t.sels[&b].entries.is_empty());
        assert!(!t.wanted(0x300, Some(11)));
        // One selector's: found through its number, even after a mark move.
        t.unwatch(b);
        t.apply(EventKind::New, e.clone(), now);
        assert_eq!(t.holders.holder(11), Some(t.sels[&a].num));
        t.apply(EventKind::Destroy, Entry { mark: 7, ..e }, now);
        assert!(t.sels[&a].entries.is_empty());
        assert_eq!(t.holders.holder(11), None);
    }

    #[test]
    fn a_sync_without_its_log_installs_nothing() {
        let sel = Selector::mark(100);
        let mut t = tables(sel);
        let now = Instant::now();
        // Unwatched and watched again while the dump ran: no log.
        assert!(!t.install(sel, vec![entry(1, 100, 1)], now));
        assert!(t.sels[&sel].entries.is_empty());
    }

    #[test]
    fn lookups_replace_drop_and_reselect() {
        let sel = Selector::mark(100);
        let mut t = tables(sel);
        let now = Instant::now();
        let (a, b, c) = (entry(1, 100, 1), entry(2, 100, 2), entry(3, 100, 3));
        t.sels.get_mut(&sel).unwrap().log = Some(Vec::new());
        assert!(t.install(sel, vec![a.clone(), b.clone(), c.clone()], now));
        let keys = [key(&a), key(&b), key(&c)];
        let moved = Entry { mark: 7, ..c };
        t.apply_lookups(sel, &keys, vec![Some(a.clone()), None, Some(moved)], now);
        let sc = &t.sels[&sel];
        assert_eq!(sc.entries.len(), 1);
        assert!(sc.entries.contains_key(&key(&a)));
        assert!(!sc.entries.at(&key(&a)).evented);
    }
}

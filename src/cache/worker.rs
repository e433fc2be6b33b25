//! The event thread (one per [`CachedAccess`](super::CachedAccess)): reads
//! events, and runs what is due next: syncs (warm-up, refresh, resync after
//! lost events), probes of entries no event has proven yet, background
//! lookups of incomplete entries, and pre-encoded base builds.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::access::{Shared, State};
use super::cached::Key;
use super::state::Tables;
use super::stats::bump;
use super::wake::poll2;
use crate::access::{AccessError, ConntrackAccess};
use crate::entry::{Entry, Selector};

/// From this many selectors due (or half-way) on, refresh them with one
/// unfiltered walk instead of one filtered walk each.
const COMBINE_MIN: usize = 3;
/// Probes per batch; their UPDATE events are read before the next batch.
const PROBE_BATCH: usize = 256;
/// The event thread re-checks the sysctl and its timers at least this often.
const TICK: Duration = Duration::from_secs(1);

impl Shared {
    /// The event thread: reads events, runs syncs and background lookups.
    pub(super) fn run(self: Arc<Self>) {
        let mut tick_at = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            let (efd, due) = {
                let mut st = self.lock();
                // A queue not emptied within the slice is simply read again
                // on the next turn (poll returns at once).
                self.pump(&mut st, Duration::from_millis(20));
                let due = self.next_job(&mut st);
                let efd = st.events.as_ref().map(|e| e.fd());
                (efd, due)
            };
            match due {
                Some(Job::Sync(sels)) => {
                    self.sync(sels);
                    continue;
                }
                Some(Job::Probe(sel)) => {
                    self.probe(sel);
                    continue;
                }
                Some(Job::Base(sel)) => {
                    _ = self.build_base(sel);
                    continue;
                }
                Some(Job::Fix(sel, keys)) => {
                    // Lock order everywhere: state, then bg.
                    let mut st = self.lock();
                    let bg = self.bg.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(bg) = bg.as_ref() {
                        if let Err(e) = self.lookup(&mut st, bg, sel, &keys) {
                            tracing::warn!(error = %e, "background conntrack lookups failed");
                        }
                    }
                    continue;
                }
                None => {}
            }
            let Some(efd) = efd else { return };
            // Wake often enough to start refreshes on time.
            let period = TICK.min(self.config.refresh_interval / 4);
            let wait = period
                .saturating_sub(tick_at.elapsed())
                .max(Duration::from_millis(10));
            poll2(efd, self.wake.fd(), wait);
            if tick_at.elapsed() >= period {
                tick_at = Instant::now();
            }
            self.wake.drain();
        }
    }

    /// The selectors to sync together with the due `first`: alone, unless
    /// enough others are due or half-way to their refresh that one unfiltered
    /// walk of the namespace beats one filtered walk each (every dump walks
    /// the whole host table). Syncing the half-due early keeps them aligned.
    fn sync_group(&self, t: &Tables, first: Selector, now: Instant) -> Vec<Selector> {
        let half = self.config.refresh_interval / 2;
        let mut group: Vec<Selector> = t
            .sels
            .iter()
            .filter(|(_, sc)| sc.log.is_none())
            .filter(|(_, sc)| {
                sc.synced_at
                    .is_none_or(|at| now.saturating_duration_since(at) >= half)
            })
            .map(|(s, _)| *s)
            .collect();
        if group.len() < COMBINE_MIN {
            return vec![first];
        }
        group.sort_by_key(|s| (s.mark, s.mark_mask, s.zone));
        group
    }

    fn next_job(&self, st: &mut State) -> Option<Job> {
        let now = Instant::now();
        let cfg = &self.config;
        let mut fix = None;
        let mut due = None;
        for (sel, sc) in st.tables.sels.iter_mut() {
            if sc.log.is_some() {
                continue;
            }
            let retry_ok = sc
                .sync_failed_at
                .is_none_or(|t| now.saturating_duration_since(t) >= cfg.resync_delay.max(TICK));
            let after_loss = !sc.trusted
                && sc
                    .lost_at
                    .is_none_or(|t| now.saturating_duration_since(t) >= cfg.resync_delay);
            let refresh = sc
                .synced_at
                .is_none_or(|t| now.saturating_duration_since(t) >= cfg.refresh_interval);
            if retry_ok && !st.events_off && (after_loss || refresh) {
                due = Some(*sel);
                break;
            }
            if sc.probe_pending {
                return Some(Job::Probe(*sel));
            }
            if fix.is_none() && !sc.fix.is_empty() {
                let mut keys = std::mem::take(&mut sc.fix);
                keys.sort_unstable();
                keys.dedup();
                keys.retain(|k| sc.entries.hot_of(k).is_some_and(|h| !h.complete()));
                if !keys.is_empty() {
                    fix = Some(Job::Fix(*sel, keys));
                }
            }
        }
        if let Some(first) = due {
            if let Some(Job::Fix(sel, keys)) = fix {
                // Taken from the selector above: give them back.
                if let Some(sc) = st.tables.sels.get_mut(&sel) {
                    sc.fix.extend(keys);
                }
            }
            return Some(Job::Sync(self.sync_group(&st.tables, first, now)));
        }
        fix.or_else(|| {
            st.tables
                .sels
                .iter()
                .find(|(_, sc)| self.base_due(sc, now))
                .map(|(sel, _)| Job::Base(*sel))
        })
    }

    /// Sends a no-op update to every entry of `sel` that no event has
    /// proven yet: those carrying the event extension answer with an UPDATE
    /// event and need no lookup at Save any more. Runs outside the lock; the
    /// events are applied by the next pump.
    fn probe(&self, sel: Selector) {
        let probes = {
            let mut st = self.lock();
            // Until their answers are read, the selector is not warm
            // (`wait_warm`), though no probe is pending any more.
            st.probing = Some(sel);
            st.tables.take_probes(sel)
        };
        self.probe_batches(sel, &probes);
        self.lock().probing = None;
    }

    fn probe_batches(&self, sel: Selector, probes: &[Entry]) {
        // One batch at a time, each followed by reading its UPDATE events, so
        // the probes never overrun our own receive queue.
        // An event costs about 1 KiB of the receive buffer (skb overhead).
        let batch = (self.config.event_rcvbuf / 1024).clamp(1, PROBE_BATCH);
        for chunk in probes.chunks(batch) {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let res = {
                let bg = self.bg.lock().unwrap_or_else(|p| p.into_inner());
                let refs: Vec<&Entry> = chunk.iter().collect();
                match bg.as_ref() {
                    Some(bg) => bg.touch_entries(&refs),
                    None => return,
                }
            };
            bump(&self.counters.probes, chunk.len() as u64);
            let mut st = self.lock();
            self.pump(&mut st, Duration::from_millis(200));
            match res {
                Ok(codes) => {
                    for (e, c) in chunk.iter().zip(codes) {
                        if c == libc::ENOENT {
                            st.tables.gone(sel, e);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "probing conntrack entries failed");
                    return;
                }
            }
        }
    }

    /// Dumps `sels` outside the lock (one filtered walk for one selector,
    /// one unfiltered walk for a group) and installs each selector's part
    /// with the events logged meanwhile.
    fn sync(&self, sels: Vec<Selector>) {
        let (epochs, started) = {
            let mut st = self.lock();
            self.pump(&mut st, Duration::from_millis(20));
            let mut epochs = Vec::with_capacity(sels.len());
            for sel in &sels {
                if let Some(sc) = st.tables.sels.get_mut(sel) {
                    sc.log = Some(Vec::new());
                    epochs.push((*sel, sc.epoch));
                }
            }
            (epochs, Instant::now())
        };
        let res: Result<Vec<Vec<Entry>>, AccessError> = {
            let bg = self.bg.lock().unwrap_or_else(|p| p.into_inner());
            let ct = bg.as_ref().unwrap_or(&self.direct);
            match epochs.as_slice() {
                [] => return,
                [(sel, _)] => ct.dump(sel).map(|v| vec![v]),
                many => {
                    let idx = SelIndex::new(many.iter().map(|(s, _)| *s));
                    ct.dump_where(|e| idx.matching(e).next().is_some())
                        .map(|all| idx.distribute(all))
                }
            }
        };
        let took = started.elapsed();
        bump(&self.counters.walks, 1);
        let mut st = self.lock();
        let caught_up = self.pump(&mut st, Duration::from_millis(200));
        let now = Instant::now();
        match res {
            Err(e) => {
                tracing::warn!(error = %e, "conntrack cache sync failed");
                for (sel, _) in &epochs {
                    if let Some(sc) = st.tables.sels.get_mut(sel) {
                        sc.log = None;
                        sc.sync_failed_at = Some(now);
                        sc.last_sync_error = Some(e.to_string());
                    }
                }
            }
            Ok(parts) => {
                for ((sel, epoch), snapshot) in epochs.into_iter().zip(parts) {
                    let Some(sc) = st.tables.sels.get_mut(&sel) else {
                        continue;
                    };
                    let same_epoch = sc.epoch == epoch;
                    // For a group this is the unfiltered walk: an upper bound
                    // of the selector's own dump.
                    if !st.tables.install(sel, snapshot, started) {
                        continue;
                    }
                    if let Some(sc) = st.tables.sels.get_mut(&sel) {
                        sc.dump_cost = Some(took);
                        sc.synced_at = Some(started);
                        sc.sync_failed_at = None;
                        sc.last_sync_error = None;
                        sc.trusted = same_epoch && caught_up;
                    }
                    bump(&self.counters.syncs, 1);
                }
            }
        }
    }
}

/// Which of a group of selectors an entry belongs to, without trying each.
struct SelIndex {
    sels: Vec<Selector>,
    by_mark: std::collections::HashMap<u32, Vec<usize>>,
    masked: Vec<usize>,
}

impl SelIndex {
    fn new(sels: impl Iterator<Item = Selector>) -> SelIndex {
        let sels: Vec<Selector> = sels.collect();
        let mut by_mark: std::collections::HashMap<u32, Vec<usize>> = Default::default();
        let mut masked = Vec::new();
        for (i, s) in sels.iter().enumerate() {
            if s.mark_mask == u32::MAX {
                by_mark.entry(s.mark).or_default().push(i);
            } else {
                masked.push(i);
            }
        }
        SelIndex {
            sels,
            by_mark,
            masked,
        }
    }

    fn matching<'a>(&'a self, e: &'a Entry) -> impl Iterator<Item = usize> + 'a {
        self.by_mark
            .get(&e.mark)
            .into_iter()
            .flatten()
            .chain(self.masked.iter())
            .copied()
            .filter(move |&i| self.sels[i].matches(e))
    }

    /// One snapshot per selector, in the order given to `new`.
    fn distribute(&self, all: Vec<Entry>) -> Vec<Vec<Entry>> {
        let mut parts = vec![Vec::new(); self.sels.len()];
        for e in all {
            let hits: Vec<usize> = self.matching(&e).collect();
            if let Some((&last, rest)) = hits.split_last() {
                for &i in rest {
                    parts[i].push(e.clone());
                }
                parts[last].push(e);
            }
        }
        parts
    }
}

enum Job {
    Sync(Vec<Selector>),
    Probe(Selector),
    Fix(Selector, Vec<Key>),
    Base(Selector),
}

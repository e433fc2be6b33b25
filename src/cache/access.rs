//! [`CachedAccess`] itself: the state it shares with its event thread, which
//! calls go straight to the kernel, starting and stopping the thread, and
//! what tests and benchmarks can inspect.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::config::CacheConfig;
use super::state::{SelCache, Tables};
use super::stats::{BaseInfo, CacheStats, Counters};
use super::wake::Wake;
use crate::access::{
    AccessError, CacheMiss, ConntrackAccess, CreateReport, DeleteReport, DumpSource, SavedState,
    WarmState, Warmth,
};
use crate::ctnetlink::{Ctnetlink, EventSocket, EventsSysctl};
use crate::entry::{Entry, Selector};
use crate::format::EncodeOptions;

/// What [`Shared::state`] guards: the tables, the event socket and what
/// Save decides by.
pub(super) struct State {
    pub(super) tables: Tables,
    pub(super) events: Option<EventSocket>,
    pub(super) sysctl: Option<EventsSysctl>,
    /// Kernel lookup cost per entry (ns) in the last sizeable batch, to
    /// choose between lookups and a dump.
    pub(super) lookup_ns: u64,
    /// `nf_conntrack_events` read 0 last time: syncs are pointless.
    pub(super) events_off: bool,
    /// `nf_conntrack_events` as read last time (None: unreadable).
    pub(super) events_value: Option<u32>,
    /// Why the last [`Shared::pump`] that returned false did so.
    pub(super) pump_miss: CacheMiss,
    /// The selector whose entries the event thread is probing right now
    /// (taken from the table, their answers not all read yet).
    pub(super) probing: Option<Selector>,
    /// The selector whose pre-encoded base is being built right now.
    pub(super) building_base: Option<Selector>,
    pub(super) last_fallback: Option<&'static str>,
}

impl State {
    /// Why Save cannot use the cache after a failed pump.
    pub(super) fn pump_miss(&self) -> CacheMiss {
        self.pump_miss
    }

    /// Why the untrusted `sc` cannot answer.
    pub(super) fn untrusted_miss(&self, sc: &SelCache) -> CacheMiss {
        if sc.sync_failed_at.is_some() {
            CacheMiss::SyncFailed
        } else if sc.lost_at.is_some() {
            CacheMiss::EventsLost
        } else {
            CacheMiss::Warming
        }
    }
}

/// What [`CachedAccess`] shares with its event thread.
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// Pass-through operations, fallback dumps and Save-time lookups.
    pub(super) direct: Ctnetlink,
    /// The thread's own socket for sync dumps and background lookups.
    pub(super) bg: Mutex<Option<Ctnetlink>>,
    pub(super) config: CacheConfig,
    pub(super) counters: Counters,
    pub(super) stop: AtomicBool,
    pub(super) wake: Wake,
}

/// A [`ConntrackAccess`] that answers dumps of watched selectors from a
/// cache kept warm by conntrack events (the [module docs](super)).
pub struct CachedAccess {
    pub(super) shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What Save-time lookups cost before we measured (a batched hash lookup in
/// the kernel plus decoding the reply).
const INITIAL_LOOKUP_NS: u64 = 5_000;

impl CachedAccess {
    /// Wraps `direct`. Nothing is subscribed until the first watch.
    pub fn new(direct: Ctnetlink, config: CacheConfig) -> Result<CachedAccess, AccessError> {
        let wake = Wake::new().map_err(|source| AccessError::Netlink {
            op: "cache",
            source,
        })?;
        Ok(CachedAccess {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    tables: Tables::default(),
                    events: None,
                    sysctl: None,
                    lookup_ns: INITIAL_LOOKUP_NS,
                    events_off: false,
                    events_value: None,
                    pump_miss: CacheMiss::Warming,
                    probing: None,
                    building_base: None,
                    last_fallback: None,
                }),
                direct,
                bg: Mutex::new(None),
                config,
                counters: Counters::default(),
                stop: AtomicBool::new(false),
                wake,
            }),
            thread: Mutex::new(None),
        })
    }

    /// The wrapped access.
    pub fn direct(&self) -> &Ctnetlink {
        &self.shared.direct
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            hits: l(&c.hits),
            fallbacks: l(&c.fallbacks),
            unwatched: l(&c.unwatched),
            lookups: l(&c.lookups),
            probes: l(&c.probes),
            losses: l(&c.losses),
            syncs: l(&c.syncs),
            walks: l(&c.walks),
            events_read: l(&c.events_read),
            events_skipped: l(&c.events_skipped),
            base_builds: l(&c.base_builds),
            base_saves: l(&c.base_saves),
            last_fallback: self.shared.lock().last_fallback,
        }
    }

    /// Builds `sel`'s pre-encoded base now, if its entries are trusted, and
    /// returns the records in it. The event thread does this by itself
    /// (`base_min_entries`, `base_interval`); tests and benchmarks that
    /// need a base of a known moment call it.
    pub fn rebuild_base(&self, sel: &Selector) -> Option<usize> {
        self.shared.build_base(*sel)
    }

    /// `sel`'s pre-encoded base, if it has one: records in it, and how
    /// many of its entries changed or were added since it was built.
    pub fn base_info(&self, sel: &Selector) -> Option<BaseInfo> {
        let st = self.shared.lock();
        let b = st.tables.sels.get(sel)?.entries.base()?;
        Some(BaseInfo {
            records: b.stored as usize,
            changes: b.changes,
            bytes: b.frames.iter().map(|f| f.bytes.len()).sum(),
            age: b.built.elapsed(),
        })
    }

    /// Whether a dump of `sel` would be answered from the cache right now
    /// (before catching up on queued events).
    pub fn is_trusted(&self, sel: &Selector) -> bool {
        self.shared
            .lock()
            .tables
            .sels
            .get(sel)
            .is_some_and(|sc| sc.trusted)
    }

    /// Entries cached for `sel` (None when it is not watched).
    pub fn cached_len(&self, sel: &Selector) -> Option<usize> {
        self.shared
            .lock()
            .tables
            .sels
            .get(sel)
            .map(|sc| sc.entries.len())
    }

    /// Waits until `sel` is trusted; false after `timeout`.
    pub fn wait_trusted(&self, sel: &Selector, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.is_trusted(sel) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// How far `sel` is from a Save answered by the cache, and whether it
    /// is settled: warm, or in a state waiting will not change soon.
    fn warmth_now(&self, sel: &Selector) -> (Warmth, bool) {
        let now = Instant::now();
        let st = self.shared.lock();
        let mut w = Warmth::of(WarmState::Cold(CacheMiss::NotWatched));
        w.events_sysctl = st.events_value;
        let Some(sc) = st.tables.sels.get(sel) else {
            return (w, true);
        };
        w.entries = sc.entries.len() as u64;
        w.base_records = sc.entries.base().map_or(0, |b| u64::from(b.stored));
        let cold = |why| WarmState::Cold(why);
        if st.events_off {
            w.state = cold(CacheMiss::EventsOff);
            return (w, true);
        }
        if !sc.trusted {
            w.state = cold(st.untrusted_miss(sc));
            // A failed sync is retried, but only after a second; its error
            // is in the journal, and Save dumps meanwhile.
            return (w, sc.sync_failed_at.is_some());
        }
        if sc.probe_pending || st.probing == Some(*sel) {
            w.state = cold(CacheMiss::Warming);
            return (w, false);
        }
        let cfg = &self.shared.config;
        if sc.entries.len() >= cfg.base_min_entries {
            let usable = sc.entries.base().is_some_and(|b| b.usable(now));
            // Tried since the last sync and still none: it came out
            // empty (no entry can be in one) or failed; Save encodes whole.
            let tried = match (sc.base_tried_at, sc.synced_at) {
                (Some(t), Some(s)) => t >= s,
                _ => false,
            };
            if !usable && (!tried || st.building_base == Some(*sel)) {
                w.state = cold(CacheMiss::Warming);
                return (w, false);
            }
        }
        w.silent = sc.entries.values().filter(|c| !c.evented).count() as u64;
        // What Save would decide about its lookups right now.
        let keys = sc.entries.lookup_keys(now, cfg.verify_margin_secs).len();
        let cost = Duration::from_nanos(st.lookup_ns.saturating_mul(keys as u64));
        let dump_cost = sc.dump_cost.unwrap_or(Duration::MAX);
        w.state = if keys > 0 && (keys > cfg.max_lookups || cost >= dump_cost) {
            cold(CacheMiss::LookupsCostly)
        } else {
            WarmState::Warm
        };
        (w, true)
    }

    /// Starts the event socket and thread on first use.
    fn ensure_started(&self, st: &mut State) -> Result<(), AccessError> {
        if st.events.is_some() {
            return Ok(());
        }
        let sh = &self.shared;
        // Subscribed before anything is dumped, so nothing falls in the gap.
        let events = EventSocket::open(&sh.direct, sh.config.event_rcvbuf)?;
        let sysctl = match EventsSysctl::open(&sh.direct) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "nf_conntrack_events unreadable; assuming events are on");
                None
            }
        };
        // Once per namespace (one cache each): the value decides which
        // connections Save must look up one by one, or whether the cache
        // works at all.
        match sysctl.as_ref().map(|s| s.read()) {
            Some(Ok(1)) | None => {}
            Some(Ok(0)) => {} // the pump says so, also when it changes later
            Some(Ok(v)) => tracing::warn!(
                EVENTS_SYSCTL = v,
                "net.netfilter.nf_conntrack_events is {v} in this network namespace, not 1: \
                 connections opened while no conntrack event listener runs (before this \
                 cache started, or while the helper is stopped) never report events, and \
                 every Save must look them up or dump the whole table; set it to 1 \
                 (see docs/packaging.md)"
            ),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "nf_conntrack_events unreadable; assuming events are on")
            }
        }
        let bg = sh.direct.reopen()?;
        *sh.bg.lock().unwrap_or_else(|p| p.into_inner()) = Some(bg);
        let shared = Arc::clone(&self.shared);
        let handle = std::thread::Builder::new()
            .name("ct-events".into())
            .spawn(move || {
                // Not a lower nice value: Saves wait for the lock this
                // thread holds while it reads events, and a niced holder
                // would make them wait longer on a busy host.
                crate::ctnetlink::batch_this_thread();
                shared.run()
            })
            .map_err(|e| AccessError::Netlink {
                op: "cache",
                source: e,
            })?;
        // Only now: a failure above leaves the cache unstarted, to be tried
        // again by the next watch. The thread waits for our lock.
        st.events = Some(events);
        st.sysctl = sysctl;
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(())
    }
}

impl Drop for CachedAccess {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake();
        if let Some(h) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Tables stay consistent between statements that can panic; a
        // poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the event thread (new work, or time to stop).
    pub(super) fn wake(&self) {
        self.wake.wake();
    }
}

impl ConntrackAccess for CachedAccess {
    fn dump(&self, sel: &Selector) -> Result<Vec<Entry>, AccessError> {
        self.dump_sourced(sel).map(|(es, _)| es)
    }

    fn dump_sourced(&self, sel: &Selector) -> Result<(Vec<Entry>, DumpSource), AccessError> {
        self.cached_dump_sourced(sel)
    }

    fn save_state(&self, sel: &Selector, opts: &EncodeOptions) -> Result<SavedState, AccessError> {
        self.cached_save_state(sel, opts)
    }

    fn delete_saved(&self, sel: &Selector, ids: &[u32]) -> Result<DeleteReport, AccessError> {
        // The kernel's own view decides what is still there.
        self.shared.direct.delete_saved(sel, ids)
    }

    fn create(&self, entries: &[Entry]) -> Result<CreateReport, AccessError> {
        self.shared.direct.create(entries)
    }

    fn create_background(&self, entries: &[Entry]) -> Result<CreateReport, AccessError> {
        self.shared.direct.create_background(entries)
    }

    fn delete_selected(&self, sel: &Selector) -> Result<u64, AccessError> {
        self.shared.direct.delete_selected(sel)
    }

    fn delete_entries(&self, entries: &[Entry]) -> Result<DeleteReport, AccessError> {
        self.shared.direct.delete_entries(entries)
    }

    /// Polls (the event thread changes the state in steps of milliseconds
    /// to a second; 5 ms is far below what a Register waits).
    fn wait_warm(&self, sel: &Selector, timeout: Duration) -> Result<Warmth, AccessError> {
        let end = Instant::now() + timeout;
        loop {
            let (w, settled) = self.warmth_now(sel);
            if settled || Instant::now() >= end {
                return Ok(w);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn watch(&self, sel: &Selector, on: bool) -> Result<(), AccessError> {
        let mut st = self.shared.lock();
        if on {
            self.ensure_started(&mut st)?;
            // Events queued so far belong to the old watch set.
            self.shared.pump(&mut st, self.shared.config.drain_budget);
            st.tables.watch(*sel);
        } else {
            st.tables.unwatch(*sel);
        }
        drop(st);
        self.shared.wake();
        Ok(())
    }
}

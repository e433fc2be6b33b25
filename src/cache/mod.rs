//! Warm conntrack cache: keeps watched selectors' entries current from
//! conntrack events so that Save (a [`ConntrackAccess::dump`] while the guest
//! is stopped) does not walk the kernel's whole, host-wide hash table
//! (12–22 ms empty, 65–130 ms with 200k entries anywhere on the host).
//!
//! [`CachedAccess`] wraps a [`Ctnetlink`] and is itself a
//! [`ConntrackAccess`], so it slots in wherever the plain access does: in the
//! daemon, or inside the sandboxed helper process. `create` and `delete_*`
//! go straight to the kernel; their effects come back as events.
//!
//! # How it stays correct
//! * **One event socket per namespace** (per `CachedAccess`), subscribed to
//!   NEW/UPDATE/DESTROY *before* any dump, and one thread that waits on it and
//!   runs the background dumps. Filtering is in user space: only the mark and
//!   id attributes are read before deciding to decode (see "Why no BPF").
//! * **Sync** (initial warm-up, periodic refresh, resync after loss): the
//!   thread starts logging the selector's events, dumps it *outside* the lock
//!   (Saves of other VMs never wait for a table walk) with its own socket,
//!   then installs the snapshot and replays the logged events in order. So an
//!   entry destroyed after the dump saw it is removed again, a DESTROY of an
//!   older incarnation never removes its successor (ids are compared), and
//!   entries created meanwhile appear.
//! * **Partial events**: UPDATEs carry tuples, status, timeout, mark, id and
//!   helper always, protocol info / labels / sequence adjustment only when
//!   they changed; missing ones are kept from the cached entry. Entries first
//!   seen through an UPDATE (e.g. moved into the mark), NEWs without protocol
//!   info, and UPDATEs that may have cleared labels are looked up in the
//!   kernel (a hash lookup, not a walk) by the thread, and at Save if still
//!   pending.
//! * **Silent entries**: only entries carrying the kernel's event extension
//!   report anything. Under `nf_conntrack_events = 2` (the default) the
//!   extension is attached at creation only if a ctnetlink listener exists
//!   *anywhere on the host* at that moment (checked on 6.18: a listener in
//!   one namespace makes new entries of every namespace report); under 1
//!   always, under 0 never. Entries made without it never report UPDATE or
//!   DESTROY, not even on `conntrack -D`. An entry counts as *proven* once
//!   an event arrived for it. After each sync the thread *probes* unproven
//!   entries with a no-op update (`CTA_MARK` 0 under mask 0: the mark stays
//!   whatever it is), which the kernel reports as an UPDATE exactly when the
//!   entry has the extension; those become proven. Every entry still
//!   unproven is looked up at Save, so a silently deleted entry never comes
//!   back. If the lookups would cost more than a direct dump (per-entry cost
//!   measured on the last sizeable batch, dump cost measured on the last
//!   sync), Save takes the direct dump instead.
//! * **Lost events** (`ENOBUFS`): every selector becomes untrusted; the
//!   thread resyncs after `resync_delay`. Meanwhile Save uses a direct dump.
//!   The same holds while `nf_conntrack_events` is 0 (checked every second
//!   and at each Save) and when Save could not catch up with the event queue
//!   within `drain_budget`.
//! * **Save** first reads every event already queued (so everything the
//!   kernel reported before the call is applied), then answers from the
//!   cache when the selector is trusted and its last sync is no older than
//!   twice the refresh interval plus 1 s; otherwise it makes a direct dump,
//!   exactly what the uncached access does. Worst case for a Save: at most
//!   `drain_budget` (50 ms) of catching up, lookups that were estimated
//!   cheaper than a dump and then failed, and one direct dump — about twice
//!   an uncached Save, far inside the daemon's Save deadline (seconds).
//! * **Pre-encoded base** (`table::Base`, docs/downtime.md): for selectors
//!   with `base_min_entries` or more, the thread keeps their entries encoded
//!   ahead of time, and Save sends that base with a skip list of the
//!   records whose entry changed or went away since, plus the rest encoded
//!   at Save (state format v1.2). Every change to a cached entry goes
//!   through `EntryTable`, which marks the entry's base record dead at the
//!   same time, so the base can never resurrect or duplicate an entry; a
//!   change to every entry (lost events, probes) drops the base. It only
//!   holds trusted entries far from expiry and is used while young enough
//!   that none of them can need a Save-time lookup.
//!
//! # Remaining timeouts
//! Events do not fire per packet, so a cached timeout is stored with the
//! instant it was observed and reported as `timeout - elapsed` (elapsed
//! rounded up, saturating). Packets only extend a timeout, and every state
//! change that shortens it comes with an event, so the estimate is a lower
//! bound of the kernel's value, stale by at most the time since the last
//! event or sync: **at most the refresh interval** (default 30 s) below the
//! kernel's value (up to twice that plus 1 s if a refresh runs late; beyond
//! that Save dumps directly). Exception: TCP's retransmission and
//! unacknowledged-data timeouts (300 s) shorten an ESTABLISHED entry without
//! an event; such an entry can be reported with more time than it has until
//! the next refresh.
//! An entry whose estimate falls to `verify_margin` seconds or less is not
//! dropped (traffic may have refreshed it) but looked up at Save: the kernel
//! says whether it still exists and with how much time; a dump would omit
//! expired entries, and so does the cache.
//!
//! # Why no BPF filter on the socket
//! A classic BPF filter (`SKF_AD_NLATTR` on `CTA_MARK`) could drop other
//! VMs' events before they reach us, but it would also drop the UPDATE that
//! moves an entry *out* of a watched mark (it carries the new mark) and every
//! later event of that entry; the cache would keep another VM's entry.
//! Telling these apart needs the cached ids, which a classic filter cannot
//! see. And it would save little: the kernel builds each event message once,
//! before any socket filter runs. The user-space pre-filter reads two
//! top-level attributes per event and decodes nothing else.
//!
//! # Measured (6.18, 2 shared vCPUs, release build; `tests/cache_measure.rs`,
//! one-off; ranges over three runs at load 2–8)
//! * Memory: 562 B per cached entry (20k entries of the realistic mix: the
//!   hash map at its load factor with key and `Entry`, 208 B, plus the id
//!   index): ~2.7 MiB for a 5k-entry VM, ~54 MiB at 100k.
//! * Event thread at 10k events/s (create + delete of another mark): 1.2 %
//!   of one core (all skipped by the pre-filter, ~1.2 µs per event incl. the
//!   `recv`); 1.4–1.8 % when they are the watched mark's. The kernel side,
//!   paid by whoever changes conntrack while any listener exists: the
//!   creating process spent 258–657 ms instead of 137–201 ms in 100k
//!   creates + deletes (+1.2–4.6 µs per event), whatever the filter.
//! * Save (`dump`), another namespace holding 150k entries (median of 5):
//!
//!   | VM entries | direct dump | cached, proven entries | cached, silent entries |
//!   |---:|---:|---:|---:|
//!   | 1,000 | 16–84 ms | 0.1 ms | 2.2–6.8 ms (1k lookups) |
//!   | 5,000 | 20–118 ms | 0.5–0.6 ms | 12–35 ms (5k lookups) |
//!   | 20,000 | 48–116 ms | 3.3–7.2 ms | direct (lookups ≥ dump) |
//!   | 100,000 | 166–346 ms | 10–18 ms | direct (lookups ≥ dump) |
//!
//!   Lookups cost 2–7 µs per entry. Warm-up (subscribe + first dump) took
//!   26–390 ms in the background; probing 100k pre-existing entries
//!   0.3–0.5 s.
//!   For the fast path, make VM entries carry the event extension: register
//!   VMs when they start (the listener then exists while their connections
//!   are made), or set `net.netfilter.nf_conntrack_events = 1` at boot.
//! * Per VM while idle: its cached entries (above) and its share of the
//!   refresh walks: alone, 16–350 ms of table walk per 30 s (0.05–1.2 % of a
//!   core) on the host above; with three or more VMs one shared walk. The
//!   event thread is shared by all VMs of the namespace.
//!
//! # Limits (documented, not hidden)
//! * A silent entry of *another* mark that later moves into a watched mark
//!   sends no event; it appears at the next sync (≤ `refresh_interval`).
//! * Per-direction TCP flags the kernel changes on plain packets
//!   (`DATA_UNACKNOWLEDGED`, `MAXACK_SET`) are as of the last event or sync,
//!   like timeouts.
//! * Probes are no-op updates of the VM's own entries; other listeners (e.g.
//!   conntrackd) see one UPDATE event per probed entry.
//! * A refresh walks the host-wide table (tens to hundreds of ms with a big
//!   host table). One selector due: one filtered dump. From three selectors
//!   due or half-way to their refresh on: one unfiltered dump of the
//!   namespace, split among them (selectors half-way are refreshed early,
//!   which keeps them aligned), so the idle cost of many VMs is about one
//!   walk per `refresh_interval / 2`, not one per VM.
//! * `watch` fails (and the selector stays a direct dump) when the event
//!   groups cannot be joined, e.g. without CAP_NET_ADMIN.

mod cached;
mod state;
mod table;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::access::{
    AccessError, ConntrackAccess, CreateReport, DeleteReport, DumpSource, SavedState,
};
use crate::ctnetlink::{Ctnetlink, EventError, EventSocket, EventsSysctl};
use crate::entry::{Entry, Selector};
use crate::format::{self, EncodeOptions, View};
use cached::Key;
use state::Tables;
use table::{Base, NO_BASE};

/// Tunables of a [`CachedAccess`].
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// How often each watched selector is dumped again to refresh remaining
    /// timeouts; the staleness bound of reported timeouts.
    pub refresh_interval: Duration,
    /// Receive buffer of the event socket (forced past `rmem_max`).
    pub event_rcvbuf: usize,
    /// Wait after lost events before the background resync, so a burst that
    /// overran the socket is not chased with dumps while it lasts.
    pub resync_delay: Duration,
    /// Entries with this many seconds or less left are looked up at Save.
    pub verify_margin_secs: u32,
    /// The longest Save spends reading queued events before giving up on the
    /// cache for this call and dumping directly.
    pub drain_budget: Duration,
    /// Never more lookups than this at one Save, whatever the estimates say.
    pub max_lookups: usize,
    /// Selectors with at least this many entries keep a pre-encoded base
    /// (docs/downtime.md); below it a whole Save costs about as little.
    /// `usize::MAX` turns the base off.
    pub base_min_entries: usize,
    /// The least time between two builds of one selector's base: what its
    /// CPU cost is bounded by when entries change faster than that.
    pub base_interval: Duration,
}

impl CacheConfig {
    /// The defaults with the daemon's and helper's knobs: the refresh
    /// interval, and whether large VMs keep a pre-encoded base (`--no-base`
    /// turns it off for destinations that read only state format v1.1).
    pub fn new(refresh_interval: Duration, base: bool) -> Self {
        let d = CacheConfig::default();
        CacheConfig {
            refresh_interval,
            base_min_entries: if base { d.base_min_entries } else { usize::MAX },
            ..d
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            refresh_interval: Duration::from_secs(30),
            event_rcvbuf: 16 << 20,
            resync_delay: Duration::from_millis(200),
            verify_margin_secs: 2,
            drain_budget: Duration::from_millis(50),
            max_lookups: 20_000,
            base_min_entries: 4096,
            base_interval: Duration::from_secs(1),
        }
    }
}

/// Counters since the cache was created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Dumps of watched selectors answered from the cache.
    pub hits: u64,
    /// Dumps of watched selectors that went to the kernel (cold, untrusted,
    /// lookups too costly, or a lookup failed).
    pub fallbacks: u64,
    /// Dumps of unwatched selectors (always direct).
    pub unwatched: u64,
    /// Kernel lookups of single entries (at Save and in the background).
    pub lookups: u64,
    /// No-op updates sent to find out which entries report events.
    pub probes: u64,
    /// Times events were lost (ENOBUFS).
    pub losses: u64,
    /// Selectors synced (warm-up, refresh, resync) ...
    pub syncs: u64,
    /// ... and the table walks that took (one walk can sync a group).
    pub walks: u64,
    /// Event messages read, and those skipped by the mark/id pre-filter.
    pub events_read: u64,
    pub events_skipped: u64,
    /// Pre-encoded bases built, and Saves answered from one.
    pub base_builds: u64,
    pub base_saves: u64,
    /// Why the last fallback happened.
    pub last_fallback: Option<&'static str>,
}

/// What [`CachedAccess::base_info`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseInfo {
    pub records: usize,
    pub changes: usize,
    /// Compressed size of its segments.
    pub bytes: usize,
    pub age: Duration,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    fallbacks: AtomicU64,
    unwatched: AtomicU64,
    lookups: AtomicU64,
    probes: AtomicU64,
    losses: AtomicU64,
    syncs: AtomicU64,
    walks: AtomicU64,
    events_read: AtomicU64,
    events_skipped: AtomicU64,
    base_builds: AtomicU64,
    base_saves: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct State {
    tables: Tables,
    events: Option<EventSocket>,
    sysctl: Option<EventsSysctl>,
    /// Kernel lookup cost per entry (ns) in the last sizeable batch, to
    /// choose between lookups and a dump.
    lookup_ns: u64,
    /// `nf_conntrack_events` read 0 last time: syncs are pointless.
    events_off: bool,
    last_fallback: Option<&'static str>,
}

struct Shared {
    state: Mutex<State>,
    /// Pass-through operations, fallback dumps and Save-time lookups.
    direct: Ctnetlink,
    /// The thread's own socket for sync dumps and background lookups.
    bg: Mutex<Option<Ctnetlink>>,
    config: CacheConfig,
    counters: Counters,
    stop: AtomicBool,
    wake: OwnedFd,
}

/// A [`ConntrackAccess`] that answers dumps of watched selectors from a
/// cache kept warm by conntrack events (module docs).
pub struct CachedAccess {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What Save-time lookups cost before we measured (a batched hash lookup in
/// the kernel plus decoding the reply).
const INITIAL_LOOKUP_NS: u64 = 5_000;
/// From this many selectors due (or half-way) on, refresh them with one
/// unfiltered walk instead of one filtered walk each.
const COMBINE_MIN: usize = 3;
/// How late a refresh may be (beyond twice the interval) before Save stops
/// trusting the cache's timeouts.
const OVERDUE_SLACK: Duration = Duration::from_secs(1);
/// Probes per batch; their UPDATE events are read before the next batch.
const PROBE_BATCH: usize = 256;
/// The event thread re-checks the sysctl and its timers at least this often.
const TICK: Duration = Duration::from_secs(1);

impl CachedAccess {
    /// Wraps `direct`. Nothing is subscribed until the first watch.
    pub fn new(direct: Ctnetlink, config: CacheConfig) -> Result<CachedAccess, AccessError> {
        // SAFETY: plain eventfd(2); the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(AccessError::Netlink {
                op: "cache",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: fd is a fresh descriptor we own.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(CachedAccess {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    tables: Tables::default(),
                    events: None,
                    sysctl: None,
                    lookup_ns: INITIAL_LOOKUP_NS,
                    events_off: false,
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
        let bg = sh.direct.reopen()?;
        *sh.bg.lock().unwrap_or_else(|p| p.into_inner()) = Some(bg);
        let shared = Arc::clone(&self.shared);
        let handle = std::thread::Builder::new()
            .name("ct-events".into())
            .spawn(move || shared.run())
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
    fn lock(&self) -> MutexGuard<'_, State> {
        // Tables stay consistent between statements that can panic; a
        // poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Reads queued events into the tables. False when the cache can no
    /// longer be trusted (events lost, delivery off, or the queue could not
    /// be emptied within `budget`).
    fn pump(&self, st: &mut State, budget: Duration) -> bool {
        let State {
            tables,
            events,
            sysctl,
            events_off,
            ..
        } = st;
        let Some(ev) = events.as_mut() else {
            return false;
        };
        let now = Instant::now();
        let ok = match ev.drain(budget, tables) {
            Ok(d) => {
                bump(&self.counters.events_read, d.read);
                bump(&self.counters.events_skipped, d.skipped);
                !d.incomplete
            }
            Err(EventError::Lost) => {
                bump(&self.counters.losses, 1);
                tracing::warn!("conntrack events lost; cache untrusted until resynced");
                tables.lost(now);
                false
            }
            Err(EventError::Io(e)) => {
                tracing::warn!(error = %e, "reading conntrack events failed; cache untrusted");
                tables.lost(now);
                false
            }
        };
        // Entries created while delivery is off never report anything.
        *events_off = matches!(sysctl.as_ref().map(|s| s.read()), Some(Ok(0)));
        if *events_off {
            tables.lost(now);
            return false;
        }
        ok
    }

    /// Looks `keys` of `sel` up in the kernel and applies the answers.
    fn lookup(
        &self,
        st: &mut State,
        ct: &Ctnetlink,
        sel: Selector,
        keys: &[Key],
    ) -> Result<(), AccessError> {
        let Some(sc) = st.tables.sels.get(&sel) else {
            return Ok(());
        };
        let probes: Vec<Entry> = keys
            .iter()
            .filter_map(|k| sc.entries.get(k).map(|c| c.entry.clone()))
            .collect();
        let keys: Vec<Key> = probes.iter().map(cached::key).collect();
        if probes.is_empty() {
            return Ok(());
        }
        let refs: Vec<&Entry> = probes.iter().collect();
        let t0 = Instant::now();
        let found = ct.get_entries(&refs)?;
        // The last sizeable batch predicts best (table and load change); a
        // batch of a few is all syscall and wake-up latency.
        if probes.len() >= 64 {
            let per = t0.elapsed().as_nanos() as u64 / probes.len() as u64;
            st.lookup_ns = per.max(1);
        }
        bump(&self.counters.lookups, probes.len() as u64);
        st.tables.apply_lookups(sel, &keys, found, Instant::now());
        Ok(())
    }

    /// The answer for a watched, trusted selector, or why Save must dump
    /// directly.
    fn answer_cached(&self, sel: &Selector) -> Result<Vec<Entry>, &'static str> {
        self.with_answer(sel, false, |_, views, ids| {
            let mut out = crate::format::bigvec::with_capacity(views.len());
            out.extend(views.iter().zip(ids).map(|(v, id)| {
                let mut e = v.rec.to_entry(v.timeout);
                e.id = id;
                e
            }));
            out
        })
    }

    /// Runs `f` under the lock on the entries of a watched, trusted
    /// selector, as they are in the tables (no copy: ~20 MB at 100k entries
    /// would cost Save milliseconds), each with the seconds it has left now,
    /// and their `CTA_ID`s; or says why Save must dump directly.
    ///
    /// With `use_base` and a usable pre-encoded base, `f` gets the base and
    /// its age, and the views are only the entries the base does not hold
    /// as they are now (the ids are still all of them).
    fn with_answer<R>(
        &self,
        sel: &Selector,
        use_base: bool,
        f: impl FnOnce(Option<(&Base, u32)>, &[View], Vec<Option<u32>>) -> R,
    ) -> Result<R, &'static str> {
        let mut st = self.lock();
        let r = self.answer_locked(&mut st, sel, use_base, f);
        if let Err(why) = r {
            st.last_fallback = Some(why);
            tracing::debug!(
                mark = sel.mark,
                why,
                "conntrack cache not used for this dump"
            );
        }
        r
    }

    fn answer_locked<R>(
        &self,
        st: &mut State,
        sel: &Selector,
        use_base: bool,
        f: impl FnOnce(Option<(&Base, u32)>, &[View], Vec<Option<u32>>) -> R,
    ) -> Result<R, &'static str> {
        if !self.pump(st, self.config.drain_budget) {
            return Err("events lost, off, or not caught up");
        }
        let now = Instant::now();
        let margin = self.config.verify_margin_secs;
        let sc = st.tables.sels.get(sel).ok_or("not watched")?;
        if !sc.trusted {
            return Err("not warm or events lost since the last sync");
        }
        // Slack for a refresh dump in progress.
        let limit = self.config.refresh_interval * 2 + OVERDUE_SLACK;
        let fresh = sc
            .synced_at
            .is_some_and(|t| now.saturating_duration_since(t) <= limit);
        if !fresh {
            return Err("refresh overdue");
        }
        // Entries in a base young enough need no lookup (their timeouts
        // were far from expiry when it was built).
        let base_ok = use_base && sc.entries.base().is_some_and(|b| b.usable(now));
        // One pass collects the answer, as long as no entry needs a lookup
        // (the usual case); otherwise a second one finds all that do.
        let mut views: Vec<View> = Vec::with_capacity(if base_ok { 0 } else { sc.entries.len() });
        let mut ids: Vec<Option<u32>> = Vec::with_capacity(sc.entries.len());
        let mut lookups = false;
        for (h, r) in sc.entries.with_hot() {
            if base_ok && h.base != NO_BASE {
                ids.push(h.id);
                continue;
            }
            if h.needs_lookup(now, margin) {
                lookups = true;
                break;
            }
            let left = h.estimate(now);
            if left > 0 {
                views.push(View::with_key(r, left, h.key(left)));
                ids.push(h.id);
            }
        }
        if !lookups {
            let base = sc.entries.base().filter(|_| base_ok);
            return Ok(f(base.map(|b| (b, b.age_secs(now))), &views, ids));
        }
        drop((views, ids));
        let keys = sc.entries.lookup_keys(now, margin);
        {
            let cost = Duration::from_nanos(st.lookup_ns.saturating_mul(keys.len() as u64));
            let dump_cost = sc.dump_cost.unwrap_or(Duration::MAX);
            if keys.len() > self.config.max_lookups || cost >= dump_cost {
                tracing::debug!(
                    lookups = keys.len(),
                    lookup_ns = st.lookup_ns,
                    dump_us = dump_cost.as_micros() as u64,
                    "lookups would cost more than a dump"
                );
                return Err("lookups would cost more than a dump");
            }
            if let Err(e) = self.lookup(st, &self.direct, *sel, &keys) {
                tracing::warn!(error = %e, "conntrack lookups at Save failed; dumping directly");
                return Err("lookups failed");
            }
        }
        let now = Instant::now();
        let sc = st.tables.sels.get(sel).ok_or("not watched")?;
        let base_ok = base_ok && sc.entries.base().is_some_and(|b| b.usable(now));
        let mut views: Vec<View> = Vec::with_capacity(sc.entries.len());
        let mut ids: Vec<Option<u32>> = Vec::with_capacity(sc.entries.len());
        for (h, r) in sc.entries.with_hot() {
            if base_ok && h.base != NO_BASE {
                ids.push(h.id);
                continue;
            }
            let left = h.estimate(now);
            if left > 0 {
                views.push(View::with_key(r, left, h.key(left)));
                ids.push(h.id);
            }
        }
        let base = sc.entries.base().filter(|_| base_ok);
        Ok(f(base.map(|b| (b, b.age_secs(now))), &views, ids))
    }

    /// The event thread: reads events, runs syncs and background lookups.
    fn run(self: Arc<Self>) {
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
            poll2(efd, self.wake.as_raw_fd(), wait);
            if tick_at.elapsed() >= period {
                tick_at = Instant::now();
            }
            drain_eventfd(self.wake.as_raw_fd());
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
                keys.retain(|k| sc.entries.get(k).is_some_and(|c| !c.complete()));
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

    /// Whether `sc` should get a new pre-encoded base now: it is trusted and
    /// big enough, and has none, or one that changed by more than 1/32 (at
    /// least 256 entries) or is half-way to [`table::MAX_BASE_AGE`]; at
    /// most once per `base_interval`.
    fn base_due(&self, sc: &state::SelCache, now: Instant) -> bool {
        let cfg = &self.config;
        if !sc.trusted || sc.log.is_some() || sc.entries.len() < cfg.base_min_entries {
            return false;
        }
        if sc
            .base_tried_at
            .is_some_and(|t| now.saturating_duration_since(t) < cfg.base_interval)
        {
            return false;
        }
        match sc.entries.base() {
            None => true,
            Some(b) => {
                b.changes >= (b.stored as usize / 32).max(256)
                    || now.saturating_duration_since(b.built) >= table::MAX_BASE_AGE / 2
            }
        }
    }

    /// Builds `sel`'s base: its candidates are copied out under the lock
    /// (~4 ms at 100k entries), encoded without it (~7 ms; Saves, from the
    /// old base, and events go on meanwhile), and installed under it again
    /// (~1 ms).
    /// Returns the records in it, if it was built and installed.
    fn build_base(&self, sel: Selector) -> Option<usize> {
        let started = Instant::now();
        let snap = {
            let mut st = self.lock();
            let sc = st.tables.sels.get_mut(&sel).filter(|sc| sc.trusted)?;
            sc.base_tried_at = Some(started);
            let mark = (sel.mark_mask == u32::MAX).then_some(sel.mark);
            sc.entries
                .base_snapshot(started, mark, self.config.verify_margin_secs)
        };
        let copied = started.elapsed();
        let built = match snap.encode() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "building the pre-encoded base failed");
                return None;
            }
        };
        let mut st = self.lock();
        let n = st.tables.sels.get_mut(&sel)?.entries.install_base(built)?;
        bump(&self.counters.base_builds, 1);
        tracing::debug!(
            mark = sel.mark,
            records = n,
            copy_us = copied.as_micros() as u64,
            us = started.elapsed().as_micros() as u64,
            "pre-encoded base built"
        );
        Some(n)
    }

    /// Sends a no-op update to every entry of `sel` that no event has
    /// proven yet: those carrying the event extension answer with an UPDATE
    /// event and need no lookup at Save any more. Runs outside the lock; the
    /// events are applied by the next pump.
    fn probe(&self, sel: Selector) {
        let probes = self.lock().tables.take_probes(sel);
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

fn poll2(a: i32, b: i32, wait: Duration) {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: two live pollfd structs, count matches.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
}

fn drain_eventfd(fd: i32) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64 (non-blocking eventfd).
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

impl ConntrackAccess for CachedAccess {
    fn dump(&self, sel: &Selector) -> Result<Vec<Entry>, AccessError> {
        self.dump_sourced(sel).map(|(es, _)| es)
    }

    fn dump_sourced(&self, sel: &Selector) -> Result<(Vec<Entry>, DumpSource), AccessError> {
        let direct = |s: &Shared| s.direct.dump(sel).map(|es| (es, DumpSource::Kernel));
        let watched = self.shared.lock().tables.sels.contains_key(sel);
        if !watched {
            bump(&self.shared.counters.unwatched, 1);
            return direct(&self.shared);
        }
        if let Ok(v) = self.shared.answer_cached(sel) {
            bump(&self.shared.counters.hits, 1);
            return Ok((v, DumpSource::Cache));
        }
        bump(&self.shared.counters.fallbacks, 1);
        self.shared.wake();
        direct(&self.shared)
    }

    fn save_state(&self, sel: &Selector, opts: &EncodeOptions) -> Result<SavedState, AccessError> {
        let watched = self.shared.lock().tables.sels.contains_key(sel);
        if !watched {
            bump(&self.shared.counters.unwatched, 1);
            return self.shared.direct.save_state(sel, opts);
        }
        // Encoding under the lock holds back the event thread for those
        // milliseconds; its events queue in the socket meanwhile.
        // One selector's entries all carry its mark when it matches a
        // single mark: no need to look at each for the most common one.
        let mark = (sel.mark_mask == u32::MAX).then_some(sel.mark);
        let whole = |views: &[View], ids: Vec<Option<u32>>| {
            format::encode_views(views, opts, mark)
                .map(|encoded| {
                    Some(SavedState {
                        encoded,
                        source: DumpSource::Cache,
                        ids: ids.into_iter().flatten().collect(),
                    })
                })
                .map_err(|source| AccessError::Encode {
                    entries: views.len(),
                    source,
                })
        };
        let use_base = opts.format == format::Format::Binary;
        let r = self
            .shared
            .with_answer(sel, use_base, |base, views, ids| match base {
                None => whole(views, ids),
                Some((b, age)) => match b.patched(age, views, opts.limit) {
                    Ok(Some(encoded)) => Ok(Some(SavedState {
                        encoded,
                        source: DumpSource::Base,
                        ids: ids.into_iter().flatten().collect(),
                    })),
                    // Too big with the base: a whole encode decides what
                    // to drop.
                    Ok(None) => Ok(None),
                    Err(e) => {
                        tracing::warn!(error = %e, "encoding from the pre-encoded base failed");
                        Ok(None)
                    }
                },
            });
        let r = match r {
            Ok(Ok(None)) => self
                .shared
                .with_answer(sel, false, |_, views, ids| whole(views, ids)),
            other => other,
        };
        match r {
            Ok(Ok(Some(saved))) => {
                bump(&self.shared.counters.hits, 1);
                if saved.source == DumpSource::Base {
                    bump(&self.shared.counters.base_saves, 1);
                }
                Ok(saved)
            }
            Ok(Err(e)) => Err(e),
            // The cache could not answer (or, never in practice, the whole
            // encode came back empty-handed): the kernel can.
            Ok(Ok(None)) | Err(_) => {
                bump(&self.shared.counters.fallbacks, 1);
                self.shared.wake();
                self.shared.direct.save_state(sel, opts)
            }
        }
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

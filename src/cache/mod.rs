//! Warm conntrack cache: keeps watched selectors' entries current from
//! conntrack events so that Save (a [`ConntrackAccess::dump`] while the guest
//! is stopped) does not walk the kernel's whole, host-wide hash table (what
//! that walk costs: docs/downtime.md, "Measured costs of the warm cache").
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
//! * **Warm** ([`ConntrackAccess::wait_warm`], what Register waits for): the
//!   selector is trusted, no probe is pending or in flight, and a selector
//!   with `base_min_entries` or more has a usable base (or its build was
//!   tried since the last sync and is not running). Then a Save needs no
//!   walk and, but for silent entries and those near expiry, no lookup.
//!   It is settled without being warm when waiting cannot help: events
//!   off, a failed sync, or silent entries that cost more to look up than
//!   a dump. Save records in its `SaveNotes` why it dumped (the same
//!   reasons, [`CacheMiss`]) and how many silent entries it looked up, for
//!   the daemon's journal.
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
//!
//! # Where things live
//! The first five files split one type by concern: `Shared`, what
//! [`CachedAccess`] shares with its event thread (each file adds an
//! `impl Shared` block). They use `state.rs`, which uses `table.rs`, which
//! uses `index.rs` and `cached.rs`; none of these imports a file above it.
//! * `access.rs`: [`CachedAccess`] itself: which calls go straight to the
//!   kernel, starting and stopping the event thread, what tests can inspect.
//! * `save.rs`: Save (`dump`, `save_state`) answered from the cache, or why
//!   it must dump directly.
//! * `worker.rs`: the event thread: what is due next, syncs, probes and
//!   background lookups.
//! * `base.rs`: when a selector's pre-encoded base is rebuilt, and the build.
//! * `pump.rs`: reading queued events into the tables; kernel lookups of
//!   single entries.
//! * `wake.rs`: the eventfd that wakes the event thread, and its poll(2).
//! * `config.rs`, `stats.rs`: [`CacheConfig`]; [`CacheStats`], [`BaseInfo`]
//!   and the counters behind them.
//! * `state.rs`: all watched selectors' tables and the rules that merge
//!   events, dumps and lookups into them (no I/O).
//! * `table.rs`: one selector's entries, the records Save reads first, and
//!   the pre-encoded `Base` (kept with the entries: every change to one
//!   marks its base record dead in the same step), stored compactly (a
//!   `Cached` is rebuilt on demand).
//! * `index.rs`: the table's key → slot hash index, 8 bytes per bucket.
//! * `cached.rs`: one cached entry, its key, and its remaining-time estimate.
//!
//! What the cache costs (memory, event thread CPU, Save against a direct
//! dump): docs/downtime.md, "Measured costs of the warm cache"; the latest
//! memory per entry (≤ 160 B, held by tests/cache_memory):
//! docs/benchmarks.md, "Warm cache costs".
//!
//! [`ConntrackAccess`]: crate::access::ConntrackAccess
//! [`ConntrackAccess::wait_warm`]: crate::access::ConntrackAccess::wait_warm
//! [`CacheMiss`]: crate::access::CacheMiss
//! [`ConntrackAccess::dump`]: crate::access::ConntrackAccess::dump
//! [`Ctnetlink`]: crate::ctnetlink::Ctnetlink

mod access;
mod base;
mod cached;
mod config;
mod index;
mod pump;
mod save;
mod state;
mod stats;
mod table;
mod wake;
mod worker;

pub use access::CachedAccess;
pub use config::CacheConfig;
pub use stats::{BaseInfo, CacheStats};

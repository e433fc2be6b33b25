//! What the cache counts: [`CacheStats`] (public, from
//! [`CachedAccess::stats`](super::CachedAccess::stats)), [`BaseInfo`], and
//! the atomic counters behind them, bumped without the cache's lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

/// What [`CachedAccess::base_info`](super::CachedAccess::base_info) reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseInfo {
    pub records: usize,
    pub changes: usize,
    /// Compressed size of its segments.
    pub bytes: usize,
    pub age: Duration,
}

#[derive(Default)]
/// The counters behind [`CacheStats`].
pub(super) struct Counters {
    pub(super) hits: AtomicU64,
    pub(super) fallbacks: AtomicU64,
    pub(super) unwatched: AtomicU64,
    pub(super) lookups: AtomicU64,
    pub(super) probes: AtomicU64,
    pub(super) losses: AtomicU64,
    pub(super) syncs: AtomicU64,
    pub(super) walks: AtomicU64,
    pub(super) events_read: AtomicU64,
    pub(super) events_skipped: AtomicU64,
    pub(super) base_builds: AtomicU64,
    pub(super) base_saves: AtomicU64,
}

pub(super) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

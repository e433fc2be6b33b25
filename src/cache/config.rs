//! [`CacheConfig`]: the cache's tunables and their defaults.

use std::time::Duration;

/// Tunables of a [`CachedAccess`](super::CachedAccess).
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

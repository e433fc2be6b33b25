//! One cached entry and its identity, the lowest layer of the cache:
//! [`super::table`] stores these and [`super::state`] merges events into
//! them; this file imports neither.

use std::time::Instant;

use crate::entry::{proto, Entry, Tuple, L4};

/// An entry's identity among live entries: original tuple and zone (the
/// kernel keeps these unique). `CTA_ID` tells incarnations apart.
pub type Key = (Tuple, u16);

pub fn key(e: &Entry) -> Key {
    (e.orig, e.zone)
}

/// One cached entry.
#[derive(Debug, Clone)]
pub struct Cached {
    /// As last observed; `entry.timeout` is the remaining lifetime at `seen`.
    pub entry: Entry,
    pub seen: Instant,
    /// An event arrived for this incarnation, so it carries the kernel's
    /// event extension: its DESTROY and mark changes will be reported. Entries
    /// only ever seen in dumps may predate every listener and stay silent.
    pub evented: bool,
    /// A no-op update was sent to find out whether it reports events; if
    /// it is still not `evented`, it is truly silent.
    pub probed: bool,
    /// Labels, sequence adjustment and helper are known: false when first
    /// seen through an UPDATE (which carries only what changed) or when an
    /// UPDATE without labels leaves open whether labels were cleared.
    pub extras_known: bool,
}

impl Cached {
    /// Every attribute a dump would give is present.
    pub fn complete(&self) -> bool {
        self.extras_known && (self.entry.protoinfo.is_some() || !needs_protoinfo(&self.entry))
    }
}

/// Seconds left at `now` of an entry that had `timeout` left at `seen`:
/// whole seconds elapsed are rounded up, so never more than the kernel
/// would say for an entry nobody refreshed. The table computes the same
/// from its compact timestamps (`table::Hot::estimate_at`).
#[cfg_attr(not(test), allow(dead_code))]
pub fn estimate(timeout: u32, seen: Instant, now: Instant) -> u32 {
    let el = now.saturating_duration_since(seen);
    let secs = el.as_secs() + u64::from(el.subsec_nanos() > 0);
    let secs = u32::try_from(secs).unwrap_or(u32::MAX);
    timeout.saturating_sub(secs)
}

/// Protocols whose tracker always has protocol info in a dump.
fn needs_protoinfo(e: &Entry) -> bool {
    match e.orig.proto {
        proto::TCP | proto::SCTP => true,
        // 6.16+ track DCCP generically (no ports, no protocol info).
        proto::DCCP => matches!(e.orig.l4, L4::Ports { .. }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn estimate_never_exceeds_the_kernel() {
        let now = Instant::now();
        assert_eq!(estimate(1000, now, now), 1000);
        assert_eq!(estimate(1000, now, now + Duration::from_millis(1)), 999);
        assert_eq!(estimate(1000, now, now + Duration::from_secs(2000)), 0);
        assert_eq!(estimate(1000, now + Duration::from_secs(5), now), 1000);
    }
}

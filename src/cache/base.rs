//! When the event thread rebuilds a selector's pre-encoded base, and the
//! build itself (docs/downtime.md, "The pre-encoded base"). The base and
//! how Save patches it: `Base` and `EntryTable::base_snapshot` /
//! `install_base` in [`super::table`].

use std::time::Instant;

use super::access::Shared;
use super::state;
use super::stats::bump;
use super::table;
use crate::entry::Selector;

impl Shared {
    /// Whether `sc` should get a new pre-encoded base now: it is trusted and
    /// big enough, and has none, or one that changed by more than 1/32 (at
    /// least 256 entries) or is half-way to [`table::MAX_BASE_AGE`]; at
    /// most once per `base_interval`.
    pub(super) fn base_due(&self, sc: &state::SelCache, now: Instant) -> bool {
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
    pub(super) fn build_base(&self, sel: Selector) -> Option<usize> {
        let r = self.build_base_marked(sel);
        let mut st = self.lock();
        if st.building_base == Some(sel) {
            st.building_base = None;
        }
        r
    }

    fn build_base_marked(&self, sel: Selector) -> Option<usize> {
        let started = Instant::now();
        let snap = {
            let mut st = self.lock();
            let sc = st.tables.sels.get_mut(&sel).filter(|sc| sc.trusted)?;
            sc.base_tried_at = Some(started);
            // Until it is installed (or failed), `wait_warm` waits for it.
            st.building_base = Some(sel);
            let sc = st.tables.sels.get_mut(&sel)?;
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
}

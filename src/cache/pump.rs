//! How the tables learn from the kernel between syncs, for Save and the
//! event thread alike: reading the queued events ([`Shared::pump`]), and
//! looking single entries up ([`Shared::lookup`]).

use std::time::{Duration, Instant};

use super::access::{Shared, State};
use super::cached::{self, Key};
use super::stats::bump;
use crate::access::{AccessError, CacheMiss};
use crate::ctnetlink::{Ctnetlink, EventError};
use crate::entry::{Entry, Selector};

impl Shared {
    /// Reads queued events into the tables. False when the cache can no
    /// longer be trusted (events lost, delivery off, or the queue could not
    /// be emptied within `budget`).
    pub(super) fn pump(&self, st: &mut State, budget: Duration) -> bool {
        let State {
            tables,
            events,
            sysctl,
            events_off,
            events_value,
            pump_miss,
            ..
        } = st;
        let Some(ev) = events.as_mut() else {
            *pump_miss = CacheMiss::Warming;
            return false;
        };
        let now = Instant::now();
        let ok = match ev.drain(budget, tables) {
            Ok(d) => {
                bump(&self.counters.events_read, d.read);
                bump(&self.counters.events_skipped, d.skipped);
                *pump_miss = CacheMiss::NotCaughtUp;
                !d.incomplete
            }
            Err(EventError::Lost) => {
                bump(&self.counters.losses, 1);
                tracing::warn!("conntrack events lost; cache untrusted until resynced");
                tables.lost(now);
                *pump_miss = CacheMiss::EventsLost;
                false
            }
            Err(EventError::Io(e)) => {
                tracing::warn!(error = %e, "reading conntrack events failed; cache untrusted");
                tables.lost(now);
                *pump_miss = CacheMiss::EventsLost;
                false
            }
        };
        // Entries created while delivery is off never report anything.
        let value = sysctl.as_ref().and_then(|s| s.read().ok());
        let was_off = *events_off;
        *events_value = value;
        *events_off = value == Some(0);
        if *events_off {
            if !was_off {
                tracing::warn!(
                    "net.netfilter.nf_conntrack_events is 0 in this network namespace: \
                     no conntrack events, so every Save dumps the whole table; set it to 1 \
                     (see docs/packaging.md)"
                );
            }
            tables.lost(now);
            *pump_miss = CacheMiss::EventsOff;
            return false;
        }
        ok
    }

    /// Looks `keys` of `sel` up in the kernel and applies the answers.
    pub(super) fn lookup(
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
            .filter_map(|k| sc.entries.get(k).map(|c| c.entry))
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
}

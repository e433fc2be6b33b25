//! How the tables learn from the kernel between syncs, for Save and the
//! event thread alike: reading the queued events ([`Shared::pump`]), and
//! looking single entries up ([`Shared::lookup`]).

use std::time::{Duration, Instant};

use super::access::{Shared, State};
use super::cached::{self, Key};
use super::stats::bump;
use crate::access::AccessError;
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

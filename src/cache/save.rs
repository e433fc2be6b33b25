//! Save (`dump`, `save_state`) answered from the cache: catch up on queued
//! events, check the selector is trusted and fresh, do the lookups that are
//! cheaper than a dump, and encode from the pre-encoded base plus what
//! changed, or the whole selection; or say why Save must dump directly.

use std::time::{Duration, Instant};

use super::access::{CachedAccess, Shared, State};
use super::stats::bump;
use super::table::{Base, Pick, Stamp, NO_BASE};
use crate::access::{AccessError, CacheMiss, ConntrackAccess, DumpSource, SaveNotes, SavedState};
use crate::entry::{Entry, Selector};
use crate::format::{self, EncodeOptions, View};

/// How late a refresh may be (beyond twice the interval) before Save stops
/// trusting the cache's timeouts.
const OVERDUE_SLACK: Duration = Duration::from_secs(1);

impl Shared {
    /// The answer for a watched, trusted selector, or why Save must dump
    /// directly.
    fn answer_cached(&self, sel: &Selector) -> Result<Vec<Entry>, CacheMiss> {
        self.with_answer(sel, false, &mut SaveNotes::default(), |_, views, ids| {
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
    ///
    /// `notes` gets what the journal needs to explain a slow Save: the
    /// lookups made, the silent entries among them, or why it must dump.
    fn with_answer<R>(
        &self,
        sel: &Selector,
        use_base: bool,
        notes: &mut SaveNotes,
        f: impl FnOnce(Option<(&Base, u32)>, &[View], Vec<Option<u32>>) -> R,
    ) -> Result<R, CacheMiss> {
        let mut st = self.lock();
        let r = self.answer_locked(&mut st, sel, use_base, notes, f);
        if let Err(why) = r {
            st.last_fallback = Some(why.as_str());
            notes.miss = Some(why);
            tracing::debug!(
                mark = sel.mark,
                why = why.as_str(),
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
        notes: &mut SaveNotes,
        f: impl FnOnce(Option<(&Base, u32)>, &[View], Vec<Option<u32>>) -> R,
    ) -> Result<R, CacheMiss> {
        if !self.pump(st, self.config.drain_budget) {
            return Err(st.pump_miss());
        }
        let now = Instant::now();
        let margin = self.config.verify_margin_secs;
        let sc = st.tables.sels.get(sel).ok_or(CacheMiss::NotWatched)?;
        if !sc.trusted {
            return Err(st.untrusted_miss(sc));
        }
        // Slack for a refresh dump in progress.
        let limit = self.config.refresh_interval * 2 + OVERDUE_SLACK;
        let fresh = sc
            .synced_at
            .is_some_and(|t| now.saturating_duration_since(t) <= limit);
        if !fresh {
            return Err(CacheMiss::RefreshOverdue);
        }
        // Entries in a base young enough need no lookup (their timeouts
        // were far from expiry when it was built).
        let base_ok = use_base && sc.entries.base().is_some_and(|b| b.usable(now));
        // One pass collects the answer, as long as no entry needs a lookup
        // (the usual case); otherwise a second one finds all that do.
        let at = Stamp::of(now);
        let hot = sc.entries.hot();
        let mut picks: Vec<Pick> = Vec::with_capacity(if base_ok { 0 } else { hot.len() });
        let mut ids: Vec<Option<u32>> = Vec::with_capacity(hot.len());
        let mut lookups = false;
        for (i, h) in hot.iter().enumerate() {
            if base_ok && h.base != NO_BASE {
                ids.push(h.id());
                continue;
            }
            if h.needs_lookup_at(at, margin) {
                lookups = true;
                break;
            }
            let left = h.estimate_at(at);
            if left > 0 {
                picks.push((i as u32, left, h.key(left)));
                ids.push(h.id());
            }
        }
        if !lookups {
            let base = sc.entries.base().filter(|_| base_ok);
            let mut scratch = Vec::new();
            let views = sc.entries.views(&picks, &mut scratch);
            return Ok(f(base.map(|b| (b, b.age_secs(now))), &views, ids));
        }
        drop((picks, ids));
        let keys = sc.entries.lookup_keys(now, margin);
        // Silent entries are the lookups an operator can do something
        // about (docs/packaging.md); the rest are near expiry or partial.
        let silent = keys
            .iter()
            .filter(|k| sc.entries.get(k).is_some_and(|c| !c.evented))
            .count() as u64;
        notes.silent = notes.silent.max(silent);
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
                return Err(CacheMiss::LookupsCostly);
            }
            let t0 = Instant::now();
            let r = self.lookup(st, &self.direct, *sel, &keys);
            notes.lookups += keys.len() as u64;
            notes.lookup_us += t0.elapsed().as_micros() as u64;
            if let Err(e) = r {
                tracing::warn!(error = %e, "conntrack lookups at Save failed; dumping directly");
                return Err(CacheMiss::LookupsFailed);
            }
        }
        let now = Instant::now();
        let sc = st.tables.sels.get(sel).ok_or(CacheMiss::NotWatched)?;
        let base_ok = base_ok && sc.entries.base().is_some_and(|b| b.usable(now));
        let at = Stamp::of(now);
        let hot = sc.entries.hot();
        let mut picks: Vec<Pick> = Vec::with_capacity(hot.len());
        let mut ids: Vec<Option<u32>> = Vec::with_capacity(hot.len());
        for (i, h) in hot.iter().enumerate() {
            if base_ok && h.base != NO_BASE {
                ids.push(h.id());
                continue;
            }
            let left = h.estimate_at(at);
            if left > 0 {
                picks.push((i as u32, left, h.key(left)));
                ids.push(h.id());
            }
        }
        let base = sc.entries.base().filter(|_| base_ok);
        let mut scratch = Vec::new();
        let views = sc.entries.views(&picks, &mut scratch);
        Ok(f(base.map(|b| (b, b.age_secs(now))), &views, ids))
    }
}

impl CachedAccess {
    /// [`ConntrackAccess::dump_sourced`]: from the cache for a watched,
    /// trusted selector, else from the kernel.
    pub(super) fn cached_dump_sourced(
        &self,
        sel: &Selector,
    ) -> Result<(Vec<Entry>, DumpSource), AccessError> {
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

    /// [`ConntrackAccess::save_state`]: from the pre-encoded base plus what
    /// changed, or the whole cached selection, else from the kernel.
    pub(super) fn cached_save_state(
        &self,
        sel: &Selector,
        opts: &EncodeOptions,
    ) -> Result<SavedState, AccessError> {
        let watched = self.shared.lock().tables.sels.contains_key(sel);
        if !watched {
            bump(&self.shared.counters.unwatched, 1);
            return self.shared.direct.save_state(sel, opts).map(|mut s| {
                s.notes.miss = Some(CacheMiss::NotWatched);
                s
            });
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
                        notes: SaveNotes::default(),
                    })
                })
                .map_err(|source| AccessError::Encode {
                    entries: views.len(),
                    source,
                })
        };
        let use_base = opts.format == format::Format::Binary;
        let mut notes = SaveNotes::default();
        let r = self
            .shared
            .with_answer(sel, use_base, &mut notes, |base, views, ids| match base {
                None => whole(views, ids),
                Some((b, age)) => match b.patched(age, views, opts.limit) {
                    Ok(Some(encoded)) => Ok(Some(SavedState {
                        encoded,
                        source: DumpSource::Base,
                        ids: ids.into_iter().flatten().collect(),
                        notes: SaveNotes::default(),
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
                .with_answer(sel, false, &mut notes, |_, views, ids| whole(views, ids)),
            other => other,
        };
        match r {
            Ok(Ok(Some(mut saved))) => {
                saved.notes = notes;
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
                notes.miss = notes.miss.or(Some(CacheMiss::Other));
                self.shared.direct.save_state(sel, opts).map(|mut s| {
                    s.notes = notes;
                    s
                })
            }
        }
    }
}

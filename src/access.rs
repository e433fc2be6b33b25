//! The one interface through which everything above the codec reaches the
//! kernel's conntrack table: in-process netlink ([`crate::ctnetlink`]) or, in
//! the packaged setup, the sandboxed helper that holds CAP_NET_ADMIN.

use crate::entry::{Entry, Selector};
use crate::format::{self, EncodeOptions, Encoded, FormatError};

/// Why a conntrack operation failed as a whole (per-entry refusals are not
/// errors; they are counted in [`CreateReport`]).
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("conntrack access needs CAP_NET_ADMIN: {op} was refused by the kernel (EPERM)")]
    PermissionDenied { op: &'static str },
    #[error("conntrack {op} failed: {source}")]
    Netlink {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed netlink reply during {op}: {detail}")]
    Protocol { op: &'static str, detail: String },
    #[error("conntrack helper unavailable: {0}")]
    Helper(String),
    #[error("conntrack {op} did not finish within {ms} ms")]
    Timeout { op: &'static str, ms: u64 },
    #[error("encoding {entries} entries failed: {source}")]
    Encode {
        entries: usize,
        #[source]
        source: FormatError,
    },
}

/// What [`ConntrackAccess::save_state`] made of a selector's entries.
#[derive(Debug, Clone)]
pub struct SavedState {
    /// The state for QEMU, within the options' byte limit.
    pub encoded: Encoded,
    pub source: DumpSource,
    /// `CTA_ID` of every dumped entry, also those dropped for space: what
    /// a flush after the migration deletes ([`ConntrackAccess::delete_saved`]).
    pub ids: Vec<u32>,
    /// Why this Save took as long as it did, for the journal (all zero /
    /// `None` for an access without a cache, or a helper too old to say).
    pub notes: SaveNotes,
}

/// Why a warm cache could not answer a Save (or a [`Warmth`] is not warm):
/// the cause the journal names, with what to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMiss {
    /// The selector is not watched (starting its watch failed, or it was
    /// unwatched meanwhile).
    NotWatched,
    /// The first sync, its probes or the pre-encoded base are not done yet.
    Warming,
    /// Events were lost (the event socket overran); a resync follows.
    EventsLost,
    /// `net.netfilter.nf_conntrack_events` is 0 in the namespace.
    EventsOff,
    /// Save could not read the queued events within its drain budget.
    NotCaughtUp,
    /// The last refresh is older than twice the refresh interval.
    RefreshOverdue,
    /// The entries that need a lookup (mostly silent ones) would cost more
    /// than a direct dump, or are more than the per-Save maximum.
    LookupsCostly,
    /// The Save-time lookups failed.
    LookupsFailed,
    /// The last sync dump failed (its error is in the journal).
    SyncFailed,
    /// A cause this side does not know (a newer helper's): treated as a miss.
    Other,
}

impl CacheMiss {
    /// Short text for `CacheStats::last_fallback` and journal fields.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMiss::NotWatched => "not watched",
            CacheMiss::Warming => "not warm yet",
            CacheMiss::EventsLost => "events lost since the last sync",
            CacheMiss::EventsOff => "events off",
            CacheMiss::NotCaughtUp => "events not caught up",
            CacheMiss::RefreshOverdue => "refresh overdue",
            CacheMiss::LookupsCostly => "lookups would cost more than a dump",
            CacheMiss::LookupsFailed => "lookups failed",
            CacheMiss::SyncFailed => "sync failed",
            CacheMiss::Other => "other",
        }
    }

    /// What an operator can change about it (or that nothing needs to).
    pub fn remedy(self) -> &'static str {
        match self {
            CacheMiss::NotWatched => {
                "the VM's warm cache is not running: see the journal of its Register \
                 for why it could not start"
            }
            CacheMiss::Warming => {
                "the cache was still warming up: start the migration after Register \
                 has returned (it waits until the cache is warm)"
            }
            CacheMiss::EventsLost => {
                "conntrack events were lost (event socket overrun by a burst); the cache \
                 resyncs by itself within a second"
            }
            CacheMiss::EventsOff => {
                "set net.netfilter.nf_conntrack_events=1 in the VM's network namespace \
                 (see docs/packaging.md)"
            }
            CacheMiss::NotCaughtUp => {
                "the event queue was too long to read within Save's budget (an event \
                 burst at the moment of the Save)"
            }
            CacheMiss::RefreshOverdue => {
                "the cache's periodic refresh is late (an overloaded host?)"
            }
            CacheMiss::LookupsCostly | CacheMiss::LookupsFailed => {
                "entries that never reported conntrack events are older than \
                 net.netfilter.nf_conntrack_events=1 (see docs/packaging.md); they \
                 report events once they are recreated"
            }
            CacheMiss::SyncFailed => "the cache's dump failed: see the journal for its error",
            CacheMiss::Other => "see the helper's journal",
        }
    }
}

/// What a warm cache reports about one Save beyond the state itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SaveNotes {
    /// Why the cache did not answer (`None`: it did, or there is none).
    pub miss: Option<CacheMiss>,
    /// Entries of the VM that never reported a conntrack event ("silent":
    /// created without the event extension); each needs a kernel lookup
    /// at Save, or made Save dump directly ([`CacheMiss::LookupsCostly`]).
    pub silent: u64,
    /// Kernel lookups Save made (silent entries, entries near expiry or
    /// missing attributes), and how long they took.
    pub lookups: u64,
    pub lookup_us: u64,
}

/// Whether a Save of a selector would be answered from a warm cache now
/// ([`ConntrackAccess::wait_warm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmState {
    /// From the cache (or its pre-encoded base): no table walk at Save.
    Warm,
    /// The access keeps no cache: every Save walks the kernel's table.
    Uncached,
    /// The helper predates the question (it may still have a cache).
    Unknown,
    /// Not (yet) warm: Save would dump directly, for this reason.
    Cold(CacheMiss),
}

/// What [`ConntrackAccess::wait_warm`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Warmth {
    pub state: WarmState,
    /// Entries cached for the selector.
    pub entries: u64,
    /// Of those, entries no event has proven ("silent": probed without an
    /// answer); each is looked up at every Save.
    pub silent: u64,
    /// Records in the selector's pre-encoded base (0: none).
    pub base_records: u64,
    /// `net.netfilter.nf_conntrack_events` of the namespace, if read.
    pub events_sysctl: Option<u32>,
}

impl Warmth {
    /// An access without a cache, or one that cannot say.
    pub fn of(state: WarmState) -> Warmth {
        Warmth {
            state,
            entries: 0,
            silent: 0,
            base_records: 0,
            events_sysctl: None,
        }
    }
}

/// What happened to one entry given to [`ConntrackAccess::create`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    /// An entry with the same original or reply tuple was already there
    /// (EEXIST); it is left as it is.
    Existed,
    /// The kernel would not create it (e.g. EXPECTED bit, missing helper);
    /// the value is the errno.
    Refused(i32),
}

/// Outcome counts of one batch create.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateReport {
    pub created: u64,
    pub existed: u64,
    pub refused: u64,
    /// One (errno, count) pair per distinct errno of the refusals, for logs.
    pub refused_by_errno: Vec<(i32, u64)>,
}

impl CreateReport {
    pub fn add(&mut self, outcome: CreateOutcome) {
        match outcome {
            CreateOutcome::Created => self.created += 1,
            CreateOutcome::Existed => self.existed += 1,
            CreateOutcome::Refused(errno) => {
                self.refused += 1;
                match self.refused_by_errno.iter_mut().find(|(e, _)| *e == errno) {
                    Some((_, n)) => *n += 1,
                    None => self.refused_by_errno.push((errno, 1)),
                }
            }
        }
    }

    pub fn merge(&mut self, other: &CreateReport) {
        self.created += other.created;
        self.existed += other.existed;
        for &(errno, n) in &other.refused_by_errno {
            match self.refused_by_errno.iter_mut().find(|(e, _)| *e == errno) {
                Some((_, m)) => *m += n,
                None => self.refused_by_errno.push((errno, n)),
            }
        }
        self.refused += other.refused;
    }
}

/// Outcome counts of deleting an exact set of entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteReport {
    pub deleted: u64,
    /// Already gone (ENOENT), or no longer the same entry.
    pub missing: u64,
}

/// Where the entries of a [`ConntrackAccess::dump_sourced`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpSource {
    /// A walk of the kernel's table.
    Kernel,
    /// A warm cache (no table walk while the guest is stopped).
    Cache,
    /// A warm cache's pre-encoded base plus what changed since: only the
    /// changes were encoded while the guest was stopped.
    Base,
}

impl DumpSource {
    /// `dump`, `cache` or `base`, as `LastSave.source` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            DumpSource::Kernel => "dump",
            DumpSource::Cache => "cache",
            DumpSource::Base => "base",
        }
    }
}

/// Conntrack table access for one network namespace.
///
/// Implementations must be usable from several threads; every call is
/// synchronous and bounded by the kernel's answer.
pub trait ConntrackAccess: Send + Sync {
    /// Entries selected by `sel`, IPv4 and IPv6 in one pass, with the mark
    /// filter applied in the kernel. Entries with 0 s left are omitted: they
    /// would vanish on the destination anyway.
    fn dump(&self, sel: &Selector) -> Result<Vec<Entry>, AccessError>;

    /// Create `entries` in batches; one entry's refusal never stops the rest.
    fn create(&self, entries: &[Entry]) -> Result<CreateReport, AccessError>;

    /// [`create`](ConntrackAccess::create) for a restore that continues
    /// after Load has answered: the kernel work runs at a lower CPU priority
    /// (`crate::ctnetlink::at_low_priority`), so that on a busy host QEMU,
    /// which is resuming the guest right then, gets the CPU first. The
    /// default is a plain create.
    fn create_background(&self, entries: &[Entry]) -> Result<CreateReport, AccessError> {
        self.create(entries)
    }

    /// Create `entries` for the one VM `sel` selects (a Load's restore):
    /// an entry [`Selector::admits`] does not let in is never created and
    /// counts as refused (EPERM). The helper client sends `sel` with every
    /// request, so the helper checks each entry against the registration's
    /// selector too, not against a selector made up from the entry's own
    /// mark. `background` is [`create_background`](Self::create_background).
    fn create_for(
        &self,
        sel: &Selector,
        entries: &[Entry],
        background: bool,
    ) -> Result<CreateReport, AccessError> {
        let run = |es: &[Entry]| {
            if background {
                self.create_background(es)
            } else {
                self.create(es)
            }
        };
        // The restore hands over only admitted entries: no copy then.
        if entries.iter().all(|e| sel.admits(e)) {
            return run(entries);
        }
        let mut report = CreateReport::default();
        let mut mine = Vec::with_capacity(entries.len());
        for e in entries {
            if sel.admits(e) {
                mine.push(e.clone());
            } else {
                report.add(CreateOutcome::Refused(libc::EPERM));
            }
        }
        if !mine.is_empty() {
            report.merge(&run(&mine)?);
        }
        Ok(report)
    }

    /// Delete every entry selected by `sel`; returns how many were deleted.
    fn delete_selected(&self, sel: &Selector) -> Result<u64, AccessError>;

    /// Delete exactly these entries, leaving anything else alone. An entry
    /// is matched by original tuple and zone, and by its `CTA_ID` when it
    /// has one, so a newer entry that reuses the tuple survives, unless the
    /// kernel built it in the freed object of the old one: the id hashes
    /// the object's address, so it is the old id again. The mark is not
    /// checked (the kernel cannot match it on a single delete).
    fn delete_entries(&self, entries: &[Entry]) -> Result<DeleteReport, AccessError>;

    /// Start (`on`) or stop keeping `sel`'s entries warm so a later
    /// [`dump`](ConntrackAccess::dump) of it is served without walking the
    /// kernel's table (the daemon calls it on Register / Unregister). Only a
    /// hint: `dump` returns the same entries either way. Calls are counted
    /// per selector (two watchers need two `false`). The default does
    /// nothing; `crate::cache::CachedAccess` implements it.
    fn watch(&self, sel: &Selector, on: bool) -> Result<(), AccessError> {
        let _ = (sel, on);
        Ok(())
    }

    /// Waits up to `timeout` until a Save of the watched `sel` would be
    /// answered from the warm cache: trusted after its first sync, the
    /// probes of its entries done, its pre-encoded base built where the
    /// cache builds one; returns at once when it cannot get there (events
    /// off, sync failed, too many silent entries). Register waits for it,
    /// so a migration started right after Register has a fast Save. The
    /// default (no cache) returns at once: every Save dumps directly.
    fn wait_warm(
        &self,
        sel: &Selector,
        timeout: std::time::Duration,
    ) -> Result<Warmth, AccessError> {
        let _ = (sel, timeout);
        Ok(Warmth::of(WarmState::Uncached))
    }

    /// [`dump`](ConntrackAccess::dump), also saying whether the entries came
    /// from a cache or a table walk (for `LastSave.source`). The default
    /// walks the table.
    fn dump_sourced(&self, sel: &Selector) -> Result<(Vec<Entry>, DumpSource), AccessError> {
        self.dump(sel).map(|es| (es, DumpSource::Kernel))
    }

    /// Save's whole job: the selected entries, encoded within `opts`. The
    /// default dumps and encodes; the warm cache encodes from its tables
    /// without copying them, and the helper client has the helper do it,
    /// so only the encoded state crosses its socket.
    fn save_state(&self, sel: &Selector, opts: &EncodeOptions) -> Result<SavedState, AccessError> {
        let (entries, source) = self.dump_sourced(sel)?;
        let encoded = format::encode(&entries, opts).map_err(|source| AccessError::Encode {
            entries: entries.len(),
            source,
        })?;
        Ok(SavedState {
            encoded,
            source,
            ids: entries.iter().filter_map(|e| e.id).collect(),
            notes: SaveNotes::default(),
        })
    }

    /// Deletes the entries of `sel` whose `CTA_ID` is in `ids` (a
    /// [`SavedState`]'s), leaving entries created since and other selectors'
    /// alone. `missing` counts ids no longer found under `sel`. A `CTA_ID`
    /// is a 32-bit hash, so among 100k entries two usually share one: both
    /// are the VM's and both go, so `deleted` may exceed the ids.
    fn delete_saved(&self, sel: &Selector, ids: &[u32]) -> Result<DeleteReport, AccessError> {
        let wanted: std::collections::HashSet<u32> = ids.iter().copied().collect();
        let mut found: Vec<Entry> = self.dump(sel)?;
        found.retain(|e| e.id.is_some_and(|id| wanted.contains(&id)));
        let mut r = if found.is_empty() {
            DeleteReport::default()
        } else {
            self.delete_entries(&found)?
        };
        r.missing += ids_not_found(&wanted, &found);
        Ok(r)
    }
}

/// How many of `wanted` no entry of `found` carries (ids shared by several
/// entries count once).
pub fn ids_not_found(wanted: &std::collections::HashSet<u32>, found: &[Entry]) -> u64 {
    let have: std::collections::HashSet<u32> = found.iter().filter_map(|e| e.id).collect();
    wanted.iter().filter(|id| !have.contains(id)).count() as u64
}

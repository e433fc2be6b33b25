//! The one interface through which everything above the codec reaches the
//! kernel's conntrack table: in-process netlink ([`crate::ctnetlink`]) or, in
//! the packaged setup, the sandboxed helper that holds CAP_NET_ADMIN.

use crate::entry::{Entry, Selector};

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
    /// Up to a few (errno, count) pairs explaining refusals, for logs.
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
}

impl DumpSource {
    /// `dump` or `cache`, as `LastSave.source` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            DumpSource::Kernel => "dump",
            DumpSource::Cache => "cache",
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

    /// Delete every entry selected by `sel`; returns how many were deleted.
    fn delete_selected(&self, sel: &Selector) -> Result<u64, AccessError>;

    /// Delete exactly these entries (matched by original tuple, zone and
    /// mark), leaving anything else alone.
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

    /// [`dump`](ConntrackAccess::dump), also saying whether the entries came
    /// from a cache or a table walk (for `LastSave.source`). The default
    /// walks the table.
    fn dump_sourced(&self, sel: &Selector) -> Result<(Vec<Entry>, DumpSource), AccessError> {
        self.dump(sel).map(|es| (es, DumpSource::Kernel))
    }
}

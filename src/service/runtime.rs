//! Per-VM state the bus layer reads without ever waiting on a Save or Load.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::options::VmConfig;
use crate::entry::Entry;

/// Outcome of one Save or Load, exported as `LastSave` / `LastLoad`.
/// Fields that do not apply to the operation stay 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpReport {
    /// Save: entries put into the blob. Load: entries found in the blob.
    pub entries: u64,
    /// Entries left out to fit the byte budget (Save), or that the sender
    /// reported as left out (Load).
    pub dropped: u64,
    pub created: u64,
    pub existed: u64,
    pub refused: u64,
    /// Size of the blob returned (Save) or received (Load).
    pub bytes: u64,
    pub duration_us: u64,
    /// Empty on success; otherwise why the operation degraded.
    pub error: String,
    /// Completion time, microseconds since the Unix epoch.
    pub timestamp_us: u64,
}

pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// One registered VM. Reports live in watch channels so property reads are
/// a cheap borrow and the bus layer can emit PropertiesChanged on change.
#[derive(Debug)]
pub struct VmRuntime {
    pub config: VmConfig,
    last_save: watch::Sender<Option<OpReport>>,
    last_load: watch::Sender<Option<OpReport>>,
    /// The entries the last successful Save dumped, with their host-local
    /// CTA_ID, so `Unregister(flush)` deletes exactly those and not entries
    /// created since with the same tuple.
    saved: Mutex<Vec<Entry>>,
}

impl VmRuntime {
    pub fn new(config: VmConfig) -> VmRuntime {
        VmRuntime {
            config,
            last_save: watch::Sender::new(None),
            last_load: watch::Sender::new(None),
            saved: Mutex::new(Vec::new()),
        }
    }

    pub fn last_save(&self) -> Option<OpReport> {
        self.last_save.borrow().clone()
    }

    pub fn last_load(&self) -> Option<OpReport> {
        self.last_load.borrow().clone()
    }

    pub fn watch_save(&self) -> watch::Receiver<Option<OpReport>> {
        self.last_save.subscribe()
    }

    pub fn watch_load(&self) -> watch::Receiver<Option<OpReport>> {
        self.last_load.subscribe()
    }

    pub(crate) fn set_last_save(&self, r: OpReport) {
        self.last_save.send_replace(Some(r));
    }

    pub(crate) fn set_last_load(&self, r: OpReport) {
        self.last_load.send_replace(Some(r));
    }

    pub(crate) fn set_saved(&self, entries: Vec<Entry>) {
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = entries;
    }

    /// The entries the last successful Save took.
    pub fn saved(&self) -> Vec<Entry> {
        self.saved.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn clear_saved(&self) {
        self.saved.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

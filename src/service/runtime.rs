//! Per-VM state the bus layer reads without ever waiting on a Save or Load.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::options::{Role, VmConfig};

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
    /// Save: where the entries came from, `cache` or `dump` (empty when
    /// Save degraded). Load: empty.
    pub source: String,
    /// Load: entries created before the reply to QEMU (the most valuable
    /// ones; the rest are created in the background).
    pub created_sync: u64,
    /// Load: time from the call to the end of the whole restore; 0 while
    /// `pending`.
    pub complete_us: u64,
    /// Load: QEMU has its reply and entries are still being created.
    pub pending: bool,
    /// Load: entries not the VM's (mark under the mask, or zone, of
    /// another), never created.
    pub foreign: u64,
    /// Load: the VM's entries carrying what the destination does not take
    /// from a source (a helper not allowed, EXPECTED, ...), never created.
    pub rejected: u64,
    /// Load: entries past the VM's entry cap (the least valuable), never
    /// looked at.
    pub over_cap: u64,
    /// Load: entries whose timeout ran out between Save and this Load (a
    /// state saved long before, `docs/state-format.md` §1.3), never
    /// created.
    pub expired: u64,
    /// Load: seconds every timeout was aged by (the time since Save, 0 for
    /// a live migration or a state that does not say when it was saved).
    pub age_secs: u64,
    /// Load: entries a previous conntrack-vmstated had handled when it
    /// handed this restore over (it stopped, or was killed, before the end);
    /// 0 for a restore that ran in one process.
    pub resumed: u64,
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
    /// `CTA_ID`s of the entries the last successful Save took.
    saved: Mutex<Vec<u32>>,
    /// The background part of the last Load, while it runs.
    restore: Mutex<Option<Restore>>,
    /// Whether a `watch(sel, true)` for this VM succeeded (and so needs its
    /// `watch(sel, false)`).
    watching: AtomicBool,
    /// Bus name of the process that controls this registration (Proxmox
    /// VE's `pve-dbus-vmstate@<vmid>` unit): told of a Quit, and the VM is
    /// unregistered when it disconnects.
    controller: Mutex<Option<String>>,
    /// A Quit is being answered on the VM's own connection, so closing that
    /// connection must wait until the reply is out.
    quitting: AtomicBool,
    /// The QEMU process Save and Load are only for (`qemu_pid`), if bound.
    qemu_pid: Mutex<Option<u32>>,
    /// The QEMU of each end (source, destination) a Prepare bound, until
    /// Finish or Abort: both ends on this host (a migration between two
    /// QEMUs of one host) are both answered, the source's Save and the
    /// destination's Load.
    role_pids: Mutex<(Option<u32>, Option<u32>)>,
    /// The end of a migration this VM is prepared for, from Prepare to
    /// Finish or Abort.
    prepared: Mutex<Option<Role>>,
    /// Destination: `CTA_ID`s of the VM's entries at Prepare, so an Abort
    /// deletes exactly what came after (the Load's), nothing older.
    before_load: Mutex<Option<HashSet<u32>>>,
}

/// Control block of one Load's background restore.
#[derive(Debug, Default)]
pub struct RestoreCtl {
    /// Set to stop the restore between two batches.
    pub(crate) cancel: AtomicBool,
    /// Why, as an `engine::Stop` (0 until cancelled).
    pub(crate) stop_as: AtomicU8,
    /// Why it was cancelled, for its final report.
    pub(crate) cancel_reason: Mutex<String>,
    /// Microseconds from the Load call to the reply to QEMU (0: not yet).
    pub(crate) replied_us: AtomicU64,
    /// Serializes LastLoad updates of this Load between the reply side and
    /// the restore thread; true once the final report is written.
    pub(crate) finished: Mutex<bool>,
}

/// A running background restore: its control block and thread.
#[derive(Debug)]
pub(crate) struct Restore {
    pub(crate) ctl: Arc<RestoreCtl>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

impl VmRuntime {
    pub fn new(config: VmConfig) -> VmRuntime {
        VmRuntime {
            last_save: watch::Sender::new(None),
            last_load: watch::Sender::new(None),
            saved: Mutex::new(Vec::new()),
            restore: Mutex::new(None),
            watching: AtomicBool::new(false),
            qemu_pid: Mutex::new(config.qemu_pid),
            role_pids: Mutex::new((None, None)),
            prepared: Mutex::new(None),
            before_load: Mutex::new(None),
            controller: Mutex::new(None),
            quitting: AtomicBool::new(false),
            config,
        }
    }

    pub fn prepared(&self) -> Option<Role> {
        *self.prepared.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_prepared(&self, role: Option<Role>, before_load: Option<HashSet<u32>>) {
        *self.prepared.lock().unwrap_or_else(|p| p.into_inner()) = role;
        *self.before_load.lock().unwrap_or_else(|p| p.into_inner()) = before_load;
    }

    pub(crate) fn before_load(&self) -> Option<HashSet<u32>> {
        self.before_load
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The QEMU process Save and Load answer, if the VM is bound to one.
    pub fn qemu_pid(&self) -> Option<u32> {
        *self.qemu_pid.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds Save and Load to `pid` (the VM's current QEMU); returns the
    /// process bound before.
    pub fn bind_qemu(&self, pid: u32) -> Option<u32> {
        self.qemu_pid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(pid)
    }

    /// Binds `pid` as the QEMU of this end of a migration; it is also the
    /// VM's QEMU from now on (the latest Prepare moves the binding), while
    /// the other end's QEMU, if prepared on this host too, stays answered.
    pub(crate) fn bind_for_role(&self, role: Role, pid: u32) {
        {
            let mut r = self.role_pids.lock().unwrap_or_else(|p| p.into_inner());
            match role {
                Role::Source => r.0 = Some(pid),
                Role::Destination => r.1 = Some(pid),
            }
        }
        self.bind_qemu(pid);
    }

    /// Ends the migration's bindings: after a Finish the VM's QEMU is the
    /// destination's, after an Abort the source's (the VM runs on there),
    /// where this host bound one.
    pub(crate) fn end_migration(&self, succeeded: bool) {
        let (src, dst) =
            std::mem::take(&mut *self.role_pids.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(pid) = if succeeded { dst } else { src } {
            self.bind_qemu(pid);
        }
    }

    /// Every process Save and Load answer; empty: anyone (not bound).
    pub fn allowed_pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.qemu_pid().into_iter().collect();
        let (src, dst) = *self.role_pids.lock().unwrap_or_else(|p| p.into_inner());
        for p in [src, dst].into_iter().flatten() {
            if !v.contains(&p) {
                v.push(p);
            }
        }
        v
    }

    pub fn controller(&self) -> Option<String> {
        self.controller
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_controller(&self, name: Option<String>) {
        *self.controller.lock().unwrap_or_else(|p| p.into_inner()) = name;
    }

    pub fn set_quitting(&self, on: bool) {
        self.quitting.store(on, Ordering::SeqCst);
    }

    pub fn quitting(&self) -> bool {
        self.quitting.load(Ordering::SeqCst)
    }

    pub(crate) fn take_restore(&self) -> Option<Restore> {
        self.restore
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub(crate) fn set_restore(&self, r: Restore) {
        *self.restore.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    /// Whether a Load's background restore is still creating entries.
    pub fn restore_running(&self) -> bool {
        self.restore
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|r| !r.task.is_finished())
    }

    pub(crate) fn set_watching(&self, on: bool) -> bool {
        self.watching.swap(on, Ordering::SeqCst)
    }

    /// Whether Save is expected to be served from the warm cache (the
    /// access accepted the watch).
    pub fn watching(&self) -> bool {
        self.watching.load(Ordering::SeqCst)
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

    /// Replaces the `CTA_ID`s of the saved entries.
    pub(crate) fn set_saved(&self, ids: Vec<u32>) {
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = ids;
    }

    /// `CTA_ID`s of the entries the last successful Save took.
    pub fn saved(&self) -> Vec<u32> {
        self.saved.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many entries the last successful Save took.
    pub fn saved_len(&self) -> usize {
        self.saved.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub(crate) fn clear_saved(&self) {
        self.saved.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

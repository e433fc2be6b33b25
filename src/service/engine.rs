//! The Save/Load policy QEMU depends on: Save always answers with a valid,
//! non-empty blob of at most [`QEMU_LIMIT`] bytes within a deadline, Load
//! never fails, and both record what happened for `LastSave`/`LastLoad` and
//! the journal. Conntrack work runs on tokio's blocking pool, never on the
//! executor that answers property reads.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::confine::{self, LoadPolicy, Refused};
use super::persist::Store;
use super::runtime::{now_us, OpReport, Restore, RestoreCtl, VmRuntime};
use super::ServiceError;
use crate::access::{
    AccessError, CacheMiss, ConntrackAccess, CreateReport, DeleteReport, DumpSource, SaveNotes,
    SavedState, WarmState, Warmth,
};
use crate::entry::Entry;
use crate::format::{self, EncodeOptions, QEMU_LIMIT};

/// Default Save deadline. QEMU waits 25 s and every millisecond of Save is
/// guest downtime; a dump that takes longer than this is already broken, and
/// answering early with an empty state keeps the migration alive.
pub const DEFAULT_SAVE_DEADLINE_MS: u64 = 2000;

/// Default Load budget: Load creates the most valuable entries for this
/// long, answers QEMU (the guest resumes) and creates the rest in the
/// background. Every millisecond of Load is guest downtime, 1:1: QEMU
/// also spends ~10 ms on its own D-Bus round trips and the blob's transfer
/// at 100k entries, and the whole migration may gain at most 30 ms there
/// (docs/downtime.md). 3 ms still restores the ~600 most valuable entries
/// of a small VM before it resumes; the rest follow at ~200k/s. At 100k
/// entries validating the blob takes about that long by itself.
pub const DEFAULT_LOAD_BUDGET_MS: u64 = 3;

/// How far past its budget a Load may run before QEMU gets its answer
/// anyway: one create call that hangs (a stuck helper is only cut off after
/// its own 10 s) must not hold the guest. Normal batches cost a few ms.
const LOAD_OVERRUN_CAP: Duration = Duration::from_millis(500);

/// First synchronous batch: small, so the most valuable entries are in
/// before the reply even when decoding used up the budget, and its cost
/// sizes the next batches.
const FIRST_BATCH: usize = 128;
/// Bounds of later synchronous batches (sized to half the budget left).
const MIN_BATCH: usize = 32;
const MAX_SYNC_BATCH: usize = 4096;
/// Background batches: large enough for full create speed, small enough
/// that a cancel (a newer Load, a stop past its grace) takes effect within
/// a few ms.
const BACKGROUND_BATCH: usize = 2048;
/// How long a newer Load or a stop waits for a running restore to stop (it
/// stops after its current batch).
const CANCEL_WAIT: Duration = Duration::from_secs(5);

/// How long a restore keeps retrying a batch the access could not take
/// (the helper restarting, e.g. on a package upgrade, or killed and
/// re-activated by its socket) before it gives up on the rest.
const RETRY_FOR: Duration = Duration::from_secs(30);
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Default of how long a stopping daemon lets running restores finish
/// before it hands the rest over to its next start (`--stop-grace-secs`).
/// The largest Load the cap allows (262,144 entries) takes ~1.5 s; the
/// packaged unit's TimeoutStopSec= leaves room above this.
pub const DEFAULT_STOP_GRACE_SECS: u64 = 30;

/// A restore handed over longer ago than this is dropped at start, not
/// resumed: its entries' timeouts are that much stale and the VM has
/// likely moved on (a new Load supersedes a handover anyway).
const PENDING_MAX_AGE: Duration = Duration::from_secs(600);

const HANDOVER_REASON: &str =
    "conntrack-vmstated is stopping; the rest is handed over to its next start";

/// How long `Unregister(flush)` waits for the deletions.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// How long Register waits for the VM's warm cache (first sync of the VM's
/// entries, their probes, the pre-encoded base): ~1 s with 100k entries of
/// the VM among 150k others, ~0.1 s with 5k (docs/downtime.md, "Register
/// to warm"); 10 s is far beyond that, and far inside a D-Bus caller's 25 s.
pub const WARM_TIMEOUT: Duration = Duration::from_secs(10);

/// Save-time lookups of silent entries from this long on are worth a
/// warning: that much downtime goes away with nf_conntrack_events=1.
const SLOW_LOOKUPS_US: u64 = 1000;

/// What [`Engine::wait_warm`] found, and after how long.
#[derive(Debug, Clone, Copy)]
pub struct Warmed {
    pub warmth: Warmth,
    pub took: Duration,
}

impl Warmed {
    /// Whether Saves will come from the cache, or there is none to wait
    /// for (the journal line is a warning otherwise).
    pub fn fine(&self) -> bool {
        matches!(
            self.warmth.state,
            WarmState::Warm | WarmState::Uncached | WarmState::Unknown
        )
    }

    /// The journal's account of it, for the Register line.
    pub fn describe(&self) -> String {
        let w = &self.warmth;
        let ms = self.took.as_millis();
        let silent = if w.silent == 0 {
            String::new()
        } else {
            format!(
                ", {} of them silent (they never reported a conntrack event: older than \
                 net.netfilter.nf_conntrack_events=1, see docs/packaging.md; each Save looks \
                 them up)",
                w.silent
            )
        };
        let base = if w.base_records == 0 {
            String::new()
        } else {
            format!(", pre-encoded base of {} entries", w.base_records)
        };
        match w.state {
            WarmState::Warm => format!(
                "its cache is warm after {ms} ms: {} entries cached{silent}{base}",
                w.entries
            ),
            WarmState::Uncached => "no warm cache, every Save walks the conntrack table".into(),
            WarmState::Unknown => {
                "the helper predates WaitWarm, so Register did not wait for its warm cache".into()
            }
            WarmState::Cold(CacheMiss::LookupsCostly) => format!(
                "its cache is ready after {ms} ms, but {} of its {} entries never reported \
                 conntrack events and looking each up would cost more than a dump, so Saves \
                 walk the table; {}",
                w.silent,
                w.entries,
                CacheMiss::LookupsCostly.remedy()
            ),
            WarmState::Cold(why) => format!(
                "its cache is not warm after {ms} ms ({}): Saves walk the table until it is; {}",
                why.as_str(),
                why.remedy()
            ),
        }
    }
}

/// Returned only if even an empty state cannot be encoded (a broken build).
/// It is the Perl helper's "no entries" payload, which every decoder (ours
/// and the Perl helper's) reads as an empty state, and QEMU still gets the
/// non-empty answer that keeps the VM alive.
const LAST_RESORT_BLOB: &[u8] = b"\0";

/// Where a restore starts: when and how long it may run before answering
/// QEMU, and how many stream entries a previous instance already handled.
struct Begin {
    start: Instant,
    budget: Duration,
    loaded_at_us: u64,
    resume_from: usize,
}

/// Why a restore was stopped early, which decides what happens to its
/// handover file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Stop {
    /// Stopped for good (the file goes).
    Cancel = 1,
    /// A newer Load of the VM took over (the file is that Load's now).
    Superseded = 2,
    /// The daemon stops: the rest is written for the next start.
    Handover = 3,
}

/// Runs Save, Load and flush for registered VMs over one conntrack access.
pub struct Engine {
    access: Arc<dyn ConntrackAccess>,
    save_deadline: Duration,
    load_budget: Duration,
    /// Where the saved entries' ids are kept across restarts, if anywhere.
    store: Option<Store>,
    /// Per-VM entry cap of a Load when the registration sets none.
    max_entries: u64,
    /// The runtime of each VM's last Load, by VM name: its restore goes on
    /// after an Unregister (the entries are the VM's on this host now), so
    /// only a newer Load of the same VM, registered again or not, finds and
    /// supersedes it here; a stop finishes or hands over all of them.
    restores: Mutex<HashMap<String, Arc<VmRuntime>>>,
    /// A non-1 `nf_conntrack_events` was reported (once per daemon: the
    /// helper's journal may be one the operator does not read).
    sysctl_warned: std::sync::atomic::AtomicBool,
}

/// How long after a Save its entry ids are written to disk: QEMU is still
/// sending the migration stream then, and the write must not compete with
/// it for the CPU (a crash within this time only loses what a crash lost
/// before ids were kept on disk at all).
const PERSIST_DELAY: Duration = Duration::from_millis(500);

fn duration_us(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

impl Engine {
    pub fn new(
        access: Arc<dyn ConntrackAccess>,
        save_deadline: Duration,
        load_budget: Duration,
    ) -> Engine {
        Engine {
            access,
            save_deadline,
            load_budget,
            store: None,
            max_entries: confine::DEFAULT_MAX_ENTRIES,
            restores: Mutex::new(HashMap::new()),
            sysctl_warned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The per-VM entry cap of a Load for registrations without their own
    /// `max_entries`; either is bounded by a fraction of the host's table
    /// ([`confine::effective_cap`]).
    pub fn with_max_entries(mut self, n: u64) -> Engine {
        self.max_entries = n.max(1);
        self
    }

    /// Keeps the ids of each VM's last Save in `store` too, so that a flush
    /// after a daemon restart still deletes exactly those entries.
    pub fn with_store(mut self, store: Store) -> Engine {
        self.store = Some(store);
        self
    }

    /// Takes back the ids a previous run kept for `vm` (after a restart).
    pub fn restore_saved(&self, vm: &VmRuntime) {
        let Some(store) = &self.store else {
            return;
        };
        match store.load_ids(&vm.config.vm) {
            Ok(ids) if ids.is_empty() => {}
            Ok(ids) => {
                tracing::info!(
                    VMID = %vm.config.vm,
                    "VM {}: {} saved entry ids of the last Save kept for a flush",
                    vm.config.vm,
                    ids.len()
                );
                vm.set_saved(ids);
            }
            Err(e) => tracing::warn!(VMID = %vm.config.vm, "{e}; a flush will delete nothing"),
        }
    }

    /// Forgets the saved ids of `vm` (it is unregistered, or was flushed).
    pub async fn forget_saved(&self, vm: &Arc<VmRuntime>) {
        vm.clear_saved();
        let Some(store) = self.store.clone() else {
            return;
        };
        let name = vm.config.vm.clone();
        let r = tokio::task::spawn_blocking(move || store.remove_ids(&name)).await;
        if let Ok(Err(e)) = r {
            tracing::warn!(VMID = %vm.config.vm, "{e}");
        }
    }

    /// Writes the VM's current saved ids a little later, off the downtime.
    /// Whatever the VM's ids are by then is written (or the file removed),
    /// so several Saves in a row leave the last one's.
    fn persist_saved_later(&self, vm: &Arc<VmRuntime>) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let vm = vm.clone();
        tokio::spawn(async move {
            tokio::time::sleep(PERSIST_DELAY).await;
            let name = vm.config.vm.clone();
            let r = tokio::task::spawn_blocking(move || store.save_ids(&name, &vm.saved())).await;
            if let Ok(Err(e)) = r {
                tracing::warn!("keeping the saved entry ids failed: {e}; a flush after a restart would delete nothing");
            }
        });
    }

    /// Starts (`on`) keeping the VM's entries warm for Save and returns
    /// once a Save would be answered from the warm cache
    /// ([`wait_warm`](Self::wait_warm)), or stops keeping them (`None`).
    /// A failure is logged, never fatal: Save then dumps directly. Callers
    /// that hold a lock others need, or must not wait (a restore at start),
    /// use [`start_watch`](Self::start_watch) and wait later, or not.
    pub async fn watch(&self, vm: &Arc<VmRuntime>, on: bool) -> Option<Warmed> {
        self.set_watch(vm, on).await;
        if on {
            self.wait_warm(vm).await
        } else {
            None
        }
    }

    /// [`watch`](Self::watch)`(vm, true)` without the wait.
    pub async fn start_watch(&self, vm: &Arc<VmRuntime>) {
        self.set_watch(vm, true).await;
    }

    async fn set_watch(&self, vm: &Arc<VmRuntime>, on: bool) {
        if !on && !vm.set_watching(false) {
            return;
        }
        let access = self.access.clone();
        let sel = vm.config.selector();
        let res = tokio::task::spawn_blocking(move || access.watch(&sel, on))
            .await
            .unwrap_or_else(|e| Err(AccessError::Helper(format!("watch task failed: {e}"))));
        let c = &vm.config;
        match res {
            Ok(()) if on => {
                vm.set_watching(true);
                tracing::debug!(VMID = %c.vm, "watching the entries of VM {} for Save", c.vm);
            }
            Ok(()) => {}
            Err(e) => tracing::warn!(
                VMID = %c.vm,
                VMSTATE_ID = %c.id,
                "{} the warm cache for VM {} failed ({e}); Save dumps directly",
                if on { "starting" } else { "stopping" },
                c.vm
            ),
        }
    }

    /// Waits (bounded by [`WARM_TIMEOUT`], on the blocking pool) until a
    /// Save of the watched VM would be answered from the warm cache; what
    /// Register waits for. `None` when the VM is not watched (its watch
    /// failed, and said so) or the access could not tell (logged).
    pub async fn wait_warm(&self, vm: &Arc<VmRuntime>) -> Option<Warmed> {
        if !vm.watching() {
            return None;
        }
        let start = Instant::now();
        let access = self.access.clone();
        let sel = vm.config.selector();
        let res = tokio::task::spawn_blocking(move || access.wait_warm(&sel, WARM_TIMEOUT))
            .await
            .unwrap_or_else(|e| Err(AccessError::Helper(format!("wait-warm task failed: {e}"))));
        let c = &vm.config;
        let warmth = match res {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(
                    VMID = %c.vm,
                    VMSTATE_ID = %c.id,
                    "waiting for the warm cache of VM {} failed ({e}); a Save now may walk the table",
                    c.vm
                );
                return None;
            }
        };
        if let Some(v) = warmth.events_sysctl.filter(|&v| v != 1) {
            if !self.sysctl_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    EVENTS_SYSCTL = v,
                    "net.netfilter.nf_conntrack_events is {v} in the VMs' network namespace, \
                     not 1: connections opened without the event extension never report \
                     events, and Save must look each up or walk the whole table; set it to 1 \
                     (see docs/packaging.md)"
                );
            }
        }
        Some(Warmed {
            warmth,
            took: start.elapsed(),
        })
    }

    /// Answers QEMU's `Save()`: the VM's entries encoded, or, on any failure
    /// or past the deadline, a valid empty state. Never fails.
    pub async fn save(&self, vm: &Arc<VmRuntime>) -> Vec<u8> {
        let start = Instant::now();
        let access = self.access.clone();
        let sel = vm.config.selector();
        let opts = EncodeOptions {
            limit: QEMU_LIMIT,
            format: vm.config.format.to_format(),
        };
        let mut task: JoinHandle<Result<SavedState, String>> =
            tokio::task::spawn_blocking(move || {
                access.save_state(&sel, &opts).map_err(|e| match e {
                    AccessError::Encode { .. } => e.to_string(),
                    e => format!("dump failed: {e}"),
                })
            });
        let outcome = match tokio::time::timeout(self.save_deadline, &mut task).await {
            Ok(Ok(Ok(saved))) => {
                let len = saved.encoded.bytes.len();
                if len == 0 || len > QEMU_LIMIT {
                    Err(format!(
                        "encoder returned {len} bytes, outside 1..={QEMU_LIMIT}"
                    ))
                } else {
                    Ok(saved)
                }
            }
            Ok(Ok(Err(reason))) => Err(reason),
            Ok(Err(join)) => Err(format!("save task failed: {join}")),
            Err(_) => {
                // The blocking dump keeps running to its end; its result is
                // dropped, since QEMU already has the empty state.
                Err(format!(
                    "dump and encode did not finish within the {} ms save deadline",
                    self.save_deadline.as_millis()
                ))
            }
        };
        let (bytes, report) = match outcome {
            Ok(saved) => {
                let enc = saved.encoded;
                let report = OpReport {
                    source: saved.source.as_str().to_string(),
                    entries: enc.kept as u64,
                    dropped: enc.dropped as u64,
                    bytes: enc.bytes.len() as u64,
                    duration_us: duration_us(start),
                    timestamp_us: now_us(),
                    ..OpReport::default()
                };
                explain_save(vm, saved.source, &saved.notes, report.duration_us);
                // Every dumped entry, also those dropped for space, is the
                // VM's state on this host; a flush after the migration
                // removes all of it.
                vm.set_saved(saved.ids);
                self.persist_saved_later(vm);
                (enc.bytes, report)
            }
            Err(reason) => {
                let (bytes, reason) = match self.empty_state(vm) {
                    Ok(b) => (b, format!("{reason}; sent an empty state")),
                    Err(e) => (
                        LAST_RESORT_BLOB.to_vec(),
                        format!("{reason}; encoding an empty state failed too ({e}), sent a 1-byte placeholder"),
                    ),
                };
                vm.clear_saved();
                self.persist_saved_later(vm);
                let report = OpReport {
                    bytes: bytes.len() as u64,
                    duration_us: duration_us(start),
                    error: reason,
                    timestamp_us: now_us(),
                    ..OpReport::default()
                };
                (bytes, report)
            }
        };
        log_report("Save", vm, &report);
        vm.set_last_save(report);
        bytes
    }

    fn empty_state(&self, vm: &VmRuntime) -> Result<Vec<u8>, String> {
        let opts = EncodeOptions {
            limit: QEMU_LIMIT,
            format: vm.config.format.to_format(),
        };
        match format::encode(&[], &opts) {
            Ok(enc) if !enc.bytes.is_empty() && enc.bytes.len() <= QEMU_LIMIT => Ok(enc.bytes),
            Ok(enc) => Err(format!("it was {} bytes", enc.bytes.len())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Answers QEMU's `Load(data)`: validates the whole blob, creates its
    /// most valuable entries (priority order of the state format) until the
    /// load budget has elapsed, answers, and creates the rest in the
    /// background on the same access (`docs/downtime.md`). Never fails;
    /// every problem ends up in `LastLoad`.
    ///
    /// A restore of an earlier Load that still runs is stopped first (after
    /// its current batch), so two restores never interleave and `LastLoad`
    /// describes this Load.
    pub async fn load(&self, vm: &Arc<VmRuntime>, data: Vec<u8>) {
        let start = Instant::now();
        let loaded_at_us = now_us();
        let bytes = data.len() as u64;
        // A Load here after a Save here (restore or loadvm on the same host,
        // a migration between two QEMUs of one host): the saved entries are
        // the VM's live ones again, and a later flush (Finish of the source,
        // Unregister with flush) must not take them from under it.
        if vm.saved_len() > 0 {
            vm.clear_saved();
            self.persist_saved_later(vm);
            tracing::info!(
                VMID = %vm.config.vm,
                "Load of VM {} on the host of its last Save: those entries are no longer owed a flush",
                vm.config.vm
            );
        }
        let before = lock(&self.restores).insert(vm.config.vm.clone(), vm.clone());
        if let Some(b) = before.filter(|b| !Arc::ptr_eq(b, vm)) {
            self.cancel_restore_as(&b, "superseded by a newer Load", Stop::Superseded)
                .await;
        }
        self.cancel_restore_as(vm, "superseded by a newer Load", Stop::Superseded)
            .await;
        // What an earlier Load of the VM left for a restart is superseded:
        // a valid Load replaces or removes that file off the downtime (its
        // restore thread), a refused one here.
        let refuse = |error: String| {
            self.remove_pending(&vm.config.vm);
            let report = OpReport {
                bytes,
                duration_us: duration_us(start),
                complete_us: duration_us(start),
                error,
                timestamp_us: now_us(),
                ..OpReport::default()
            };
            log_report("Load", vm, &report);
            vm.set_last_load(report);
        };
        if data.is_empty() {
            return refuse("empty state (0 bytes): nothing to load".into());
        }
        if data.len() > QEMU_LIMIT {
            return refuse(format!(
                "state is {} bytes, more than QEMU's limit of {QEMU_LIMIT}: nothing loaded",
                data.len()
            ));
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<OpReport>();
        let ctl = self.start_restore(
            vm,
            data,
            Begin {
                start,
                budget: self.load_budget,
                loaded_at_us,
                resume_from: 0,
            },
            Some(tx),
        );
        let reply = tokio::time::timeout(self.load_budget + LOAD_OVERRUN_CAP, rx).await;
        let replied_us = duration_us(start).max(1);
        // The restore thread recorded its answer time already unless the
        // overrun cap answered for it.
        let _ = ctl
            .replied_us
            .compare_exchange(0, replied_us, Ordering::SeqCst, Ordering::SeqCst);
        match reply {
            Ok(Ok(report)) if report.pending => log_reply(vm, &report),
            Ok(Ok(report)) => log_report("Load", vm, &report),
            Ok(Err(_)) => refuse("load task failed before answering".into()),
            Err(_) => {
                let finished = lock(&ctl.finished);
                if !*finished {
                    let report = OpReport {
                        bytes,
                        duration_us: replied_us,
                        pending: true,
                        error: format!(
                            "no entry batch finished within {} ms; answered QEMU, \
                             LastLoad is updated when creation ends",
                            (self.load_budget + LOAD_OVERRUN_CAP).as_millis()
                        ),
                        timestamp_us: now_us(),
                        ..OpReport::default()
                    };
                    log_reply(vm, &report);
                    vm.set_last_load(report);
                }
            }
        }
    }

    /// Stops the background restore of the VM's last Load, if one runs, and
    /// waits (bounded) until it has: it stops after its current batch. The
    /// entries it created stay. Returns whether one was running.
    pub async fn cancel_restore(&self, vm: &Arc<VmRuntime>, reason: &str) -> bool {
        self.cancel_restore_as(vm, reason, Stop::Cancel).await
    }

    async fn cancel_restore_as(&self, vm: &Arc<VmRuntime>, reason: &str, how: Stop) -> bool {
        let Some(r) = vm.take_restore() else {
            return false;
        };
        if r.task.is_finished() {
            return false;
        }
        *lock(&r.ctl.cancel_reason) = reason.to_string();
        r.ctl.stop_as.store(how as u8, Ordering::SeqCst);
        r.ctl.cancel.store(true, Ordering::SeqCst);
        if tokio::time::timeout(CANCEL_WAIT, r.task).await.is_err() {
            tracing::warn!(
                VMID = %vm.config.vm,
                "the restore of VM {} did not stop within {} s; it stops after its current batch",
                vm.config.vm,
                CANCEL_WAIT.as_secs()
            );
        }
        true
    }

    /// Starts the restore of `data` for `vm` on a blocking thread; with
    /// `tx` it answers there once the budget is used up.
    fn start_restore(
        &self,
        vm: &Arc<VmRuntime>,
        data: Vec<u8>,
        begin: Begin,
        tx: Option<tokio::sync::oneshot::Sender<OpReport>>,
    ) -> Arc<RestoreCtl> {
        let ctl = Arc::new(RestoreCtl::default());
        let job = RestoreJob {
            access: self.access.clone(),
            vm: vm.clone(),
            ctl: ctl.clone(),
            start: begin.start,
            budget: begin.budget,
            bytes: data.len() as u64,
            policy: vm.config.load_policy(),
            cap: vm.config.max_entries.map_or(self.max_entries, u64::from),
            store: self.store.clone(),
            loaded_at_us: begin.loaded_at_us,
            resume_from: begin.resume_from,
            keeper: None,
        };
        let task = tokio::task::spawn_blocking(move || job.run(data, tx));
        vm.set_restore(Restore {
            ctl: ctl.clone(),
            task,
        });
        ctl
    }

    /// The VMs whose restore is still creating entries, registered or not.
    pub fn restoring(&self) -> Vec<Arc<VmRuntime>> {
        lock(&self.restores)
            .values()
            .filter(|rt| rt.restore_running())
            .cloned()
            .collect()
    }

    /// Waits until the VM's restore, if one runs, has ended.
    pub async fn wait_restore(&self, vm: &VmRuntime) {
        while vm.restore_running() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// For a stop: lets running restores finish for up to `grace`, then
    /// stops the rest after their current batch and hands what they did not
    /// create over to the next start (kept in the state directory since
    /// QEMU had its answer). Returns how many were handed over.
    pub async fn finish_restores(&self, grace: Duration) -> usize {
        let running = self.restoring();
        if running.is_empty() {
            return 0;
        }
        let names: Vec<&str> = running.iter().map(|r| r.config.vm.as_str()).collect();
        tracing::info!(
            "finishing the restore of VM {} before stopping (at most {} s)",
            names.join(", "),
            grace.as_secs()
        );
        let end = Instant::now() + grace;
        while Instant::now() < end && running.iter().any(|r| r.restore_running()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut handed = 0;
        for rt in running.iter().filter(|r| r.restore_running()) {
            if self
                .cancel_restore_as(rt, HANDOVER_REASON, Stop::Handover)
                .await
            {
                handed += 1;
            }
        }
        handed
    }

    /// Resumes every restore a previous instance handed over (or left
    /// behind when it was killed): under the registration it was addressed
    /// to, on that VM's runtime when `registered` has it with the same
    /// configuration (so LastLoad shows it), else on its own. One older
    /// than [`PENDING_MAX_AGE`] is dropped. Returns how many were resumed.
    pub async fn resume_pending(
        &self,
        registered: impl Fn(&str) -> Option<Arc<VmRuntime>>,
    ) -> usize {
        let Some(store) = self.store.clone() else {
            return 0;
        };
        let found = tokio::task::spawn_blocking(move || store.load_pending())
            .await
            .unwrap_or_default();
        let mut resumed = 0;
        for p in found {
            let p = match p {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!("a handed-over restore is lost: {e}");
                    continue;
                }
            };
            let vm = p.config.vm.clone();
            let age = Duration::from_micros(now_us().saturating_sub(p.loaded_at_us));
            if age > PENDING_MAX_AGE {
                tracing::warn!(
                    VMID = %vm,
                    "VM {vm}: the restore handed over {} s ago is dropped, not resumed \
                     (older than {} s: its timeouts are stale and the VM may have moved on)",
                    age.as_secs(),
                    PENDING_MAX_AGE.as_secs()
                );
                self.remove_pending(&vm);
                continue;
            }
            let rt = match registered(&vm) {
                Some(rt) if rt.config == p.config => rt,
                _ => Arc::new(VmRuntime::new(p.config.clone())),
            };
            let detached = registered(&vm).is_none_or(|r| !Arc::ptr_eq(&r, &rt));
            if !rt.watching() {
                // A confined helper creates only for watched selectors
                // (warm or not: a restore needs no cache).
                self.start_watch(&rt).await;
            }
            tracing::info!(
                VMID = %vm,
                VMSTATE_ID = %p.config.id,
                RESUMED = p.consumed,
                "Load of VM {vm}: resuming the restore a previous conntrack-vmstated handed \
                     over, after {} of its entries (loaded {} s ago)",
                p.consumed,
                age.as_secs()
            );
            lock(&self.restores).insert(vm.clone(), rt.clone());
            let begin = Begin {
                start: Instant::now(),
                budget: Duration::ZERO,
                loaded_at_us: p.loaded_at_us,
                resume_from: usize::try_from(p.consumed).unwrap_or(usize::MAX),
            };
            self.start_restore(&rt, p.blob, begin, None);
            if detached {
                // Its own watch ends with it.
                let access = self.access.clone();
                let rt2 = rt.clone();
                tokio::spawn(async move {
                    while rt2.restore_running() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let sel = rt2.config.selector();
                    let _ = tokio::task::spawn_blocking(move || access.watch(&sel, false)).await;
                });
            }
            resumed += 1;
        }
        resumed
    }

    fn remove_pending(&self, vm: &str) {
        if let Some(store) = &self.store {
            if let Err(e) = store.remove_pending(vm) {
                tracing::warn!(VMID = %vm, "{e}");
            }
        }
    }

    /// `CTA_ID`s of the VM's entries in the table now.
    pub async fn ids_now(&self, vm: &Arc<VmRuntime>) -> Result<HashSet<u32>, ServiceError> {
        let access = self.access.clone();
        let sel = vm.config.selector();
        let r = tokio::task::spawn_blocking(move || access.dump(&sel))
            .await
            .unwrap_or_else(|e| Err(AccessError::Helper(format!("dump task failed: {e}"))));
        match r {
            Ok(es) => Ok(es.iter().filter_map(|e| e.id).collect()),
            Err(source) => Err(ServiceError::Dump {
                vm: vm.config.vm.clone(),
                source,
            }),
        }
    }

    /// Deletes exactly the entries the VM's last successful Save took
    /// (matched with their CTA_ID), for `Unregister(flush)` on the source.
    pub async fn flush(&self, vm: &Arc<VmRuntime>) -> Result<DeleteReport, ServiceError> {
        let ids = vm.saved();
        let r = self.delete_ids(vm, ids).await?;
        self.forget_saved(vm).await;
        Ok(r)
    }

    /// Deletes the VM's entries with these `CTA_ID`s (what a Save took, or
    /// what a Load created); entries gone already count as missing.
    pub async fn delete_ids(
        &self,
        vm: &Arc<VmRuntime>,
        ids: Vec<u32>,
    ) -> Result<DeleteReport, ServiceError> {
        if ids.is_empty() {
            return Ok(DeleteReport::default());
        }
        let access = self.access.clone();
        let sel = vm.config.selector();
        let task = tokio::task::spawn_blocking(move || access.delete_saved(&sel, &ids));
        let res = match tokio::time::timeout(FLUSH_TIMEOUT, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(AccessError::Helper(format!("flush task failed: {join}"))),
            Err(_) => Err(AccessError::Timeout {
                op: "delete",
                ms: FLUSH_TIMEOUT.as_millis() as u64,
            }),
        };
        match res {
            Ok(r) => Ok(r),
            Err(source) => Err(ServiceError::Flush {
                vm: vm.config.vm.clone(),
                source,
            }),
        }
    }
}

impl Progress {
    /// The next batch of at most `n` entries, until the cap is reached.
    fn next(
        &mut self,
        rest: &mut format::Stream,
        n: usize,
    ) -> Option<Result<Vec<Entry>, format::FormatError>> {
        let n = n.min(self.take - self.consumed);
        if n == 0 {
            return None;
        }
        let b = rest.next_batch(n)?;
        if let Ok(b) = &b {
            self.consumed += b.len();
        }
        Some(b)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One Load's decode and entry creation, on a blocking thread: the
/// synchronous part (until the budget), then the reply, then the rest.
struct RestoreJob {
    access: Arc<dyn ConntrackAccess>,
    vm: Arc<VmRuntime>,
    ctl: Arc<RestoreCtl>,
    start: Instant,
    budget: Duration,
    bytes: u64,
    /// What this VM's Load accepts from its source.
    policy: LoadPolicy,
    /// The configured entry cap (before the table bound).
    cap: u64,
    /// Where the unfinished part is kept for the next instance.
    store: Option<Store>,
    loaded_at_us: u64,
    /// Entries of the stream a previous instance handled already.
    resume_from: usize,
    /// Writes the handover file once QEMU has its answer, beside the
    /// restore rather than before it.
    keeper: Option<std::thread::JoinHandle<()>>,
}

/// Where one restore stands: entries taken from the stream (at most
/// `take`, the cap) and what the policy refused of them.
struct Progress {
    consumed: usize,
    take: usize,
    refused: Refused,
}

impl RestoreJob {
    fn run(mut self, data: Vec<u8>, tx: Option<tokio::sync::oneshot::Sender<OpReport>>) {
        let mut report = OpReport {
            bytes: self.bytes,
            resumed: self.resume_from as u64,
            ..OpReport::default()
        };
        // The cap is known before anything is created: entries past it
        // (the least valuable; the stream is in priority order) are never
        // looked at, and never sorted in memory either.
        let cap = confine::effective_cap(self.cap, confine::conntrack_max());
        let cap = usize::try_from(cap).unwrap_or(usize::MAX);
        // The header, the checksum over the whole blob and the segment
        // table are checked first, and of a large blob the first segment
        // (a patch's deltas with it) is validated: a damaged or bad one
        // creates nothing. The other segments are validated after the
        // answer (`complete` below), before anything of them is created.
        // Aged against the time of the Load itself, which a resumed restore
        // keeps: the same entries expire, so its count of entries handled
        // stays valid.
        let mut rest = match format::stream_progressive(&data, cap, self.loaded_at_us) {
            Ok(d) => d,
            Err(e) => {
                report.error = format!("invalid state, nothing loaded: {e}");
                return self.finish(report, tx);
            }
        };
        if self.resume_from > 0 {
            // Nothing is answered any more: validate it all before skipping.
            if let Err(e) = rest.complete(&data) {
                report.error = format!("invalid state, nothing loaded: {e}");
                return self.finish(report, tx);
            }
        }
        let data = Arc::new(data);
        report.entries = (rest.len() + rest.expired) as u64;
        report.expired = rest.expired as u64;
        report.age_secs = u64::from(rest.age_secs);
        report.dropped = rest.dropped.unwrap_or(0);
        // The stream hands out the most valuable entries first: what the
        // guest would miss most is in before it resumes.
        let total = rest.len();
        let mut p = Progress {
            consumed: 0,
            take: total.min(cap),
            refused: Refused::default(),
        };
        report.over_cap = (total - p.take) as u64;
        let deadline = self.start + self.budget;
        // A resumed restore skips what the previous instance handled; the
        // entries are decoded (the stream is sequential) but not created.
        while p.consumed < self.resume_from.min(p.take) {
            let n = (self.resume_from - p.consumed).min(BACKGROUND_BATCH);
            if p.next(&mut rest, n).is_none() {
                break;
            }
        }
        let mut done = p.consumed;
        let mut totals = CreateReport::default();
        let mut failed: Option<String> = None;
        let mut batch = FIRST_BATCH;
        while let Some(chunk) = p.next(&mut rest, batch) {
            let t = Instant::now();
            let n = match self.create_one(chunk, done, total, &mut totals, &mut p.refused, false) {
                Ok(n) => n,
                Err(why) => {
                    failed = Some(why);
                    break;
                }
            };
            done += n;
            let now = Instant::now();
            let Some(left) = deadline.checked_duration_since(now) else {
                break;
            };
            // Size the next batch to half the budget left at the cost just
            // measured; stop when even a small one would overrun.
            let per_entry = (now - t).as_nanos().max(1) / n as u128;
            if per_entry * MIN_BATCH as u128 > left.as_nanos() {
                break;
            }
            batch = usize::try_from(left.as_nanos() / 2 / per_entry)
                .unwrap_or(MAX_SYNC_BATCH)
                .clamp(MIN_BATCH, MAX_SYNC_BATCH);
        }
        report.created_sync = totals.created;
        if failed.is_some() || done == p.take {
            Self::add_totals(&mut report, &totals, &p.refused);
            report.error = failed.unwrap_or_default();
            if self.stopped_as() == Some(Stop::Handover) {
                self.hand_over(&data, done, &mut report);
            }
            return self.finish(report, tx);
        }
        let mut interim = report.clone();
        Self::add_totals(&mut interim, &totals, &p.refused);
        interim.pending = true;
        interim.duration_us = duration_us(self.start);
        interim.timestamp_us = now_us();
        {
            let finished = lock(&self.ctl.finished);
            if !*finished {
                self.vm.set_last_load(interim.clone());
            }
        }
        let _ = self.ctl.replied_us.compare_exchange(
            0,
            interim.duration_us.max(1),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        if let Some(tx) = tx {
            let _ = tx.send(interim);
        }
        self.keep(&data, done);
        // Only a source that is broken or hostile sends a blob whose first
        // segment is valid and a later one not (the checksum covers it
        // all): what was created stays, as valid entries of the VM, and
        // nothing more is.
        // At a lower priority, like the creates after it: QEMU is resuming
        // the guest now, and on a host with few cores this validation would
        // compete with it.
        let checked = crate::ctnetlink::at_low_priority(|| rest.complete(&data));
        if let Err(e) = checked {
            Self::add_totals(&mut report, &totals, &p.refused);
            report.error = format!(
                "invalid state: {e}; the restore stopped after the {done} entries of \
                 its first segment, handled before the answer"
            );
            return self.finish(report, None);
        }

        while let Some(chunk) = p.next(&mut rest, BACKGROUND_BATCH) {
            match self.create_one(chunk, done, total, &mut totals, &mut p.refused, true) {
                Ok(n) => done += n,
                Err(why) => {
                    failed = Some(why);
                    break;
                }
            }
        }
        Self::add_totals(&mut report, &totals, &p.refused);
        report.error = failed.unwrap_or_default();
        if self.stopped_as() == Some(Stop::Handover) {
            self.hand_over(&data, done, &mut report);
        }
        self.finish(report, None);
    }

    fn stopped_as(&self) -> Option<Stop> {
        match self.ctl.stop_as.load(Ordering::SeqCst) {
            1 => Some(Stop::Cancel),
            2 => Some(Stop::Superseded),
            3 => Some(Stop::Handover),
            _ => None,
        }
    }

    /// Keeps the whole blob, and that `done` entries are handled, for the
    /// next instance, on a thread of its own: the restore goes on meanwhile.
    fn keep(&mut self, data: &Arc<Vec<u8>>, done: usize) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let (data, config, at) = (data.clone(), self.vm.config.clone(), self.loaded_at_us);
        let vm = config.vm.clone();
        let h = std::thread::Builder::new()
            .name("cvs-keep".into())
            .spawn(move || {
                if let Err(e) = store.save_pending(&config, done as u64, at, &data) {
                    tracing::warn!(
                        VMID = %vm,
                        "keeping the restore of VM {vm} for a restart failed: {e}; \
                     if conntrack-vmstated stops before it ends, the rest is lost"
                    );
                }
            });
        self.keeper = h.ok();
    }

    /// Records how far the restore got, for the next start to go on from.
    fn hand_over(&mut self, data: &[u8], done: usize, report: &mut OpReport) {
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
        let r = match &self.store {
            Some(store) => store
                .save_pending(&self.vm.config, done as u64, self.loaded_at_us, data)
                .map_err(|e| e.to_string()),
            None => Err("no state directory".into()),
        };
        if let Err(e) = r {
            report.error = format!(
                "{}; handing it over failed ({e}): the rest is lost",
                report.error
            );
        }
    }

    /// Creates one batch from the stream, unless the restore was cancelled;
    /// returns how many entries it held, or why the restore ends here.
    /// Only entries the VM's [`LoadPolicy`] admits are created, under the
    /// registration's selector (the helper checks each against it again);
    /// the rest are counted in `refused`.
    /// `background`: QEMU has its answer and is resuming the guest; the
    /// kernel work then runs at a lower priority (`create_background`).
    fn create_one(
        &self,
        chunk: Result<Vec<Entry>, format::FormatError>,
        done: usize,
        total: usize,
        totals: &mut CreateReport,
        refused: &mut Refused,
        background: bool,
    ) -> Result<usize, String> {
        // A validated stream cannot fail to decode: only a bug can do that.
        let chunk =
            chunk.map_err(|e| format!("decoding entries failed after {done} of {total}: {e}"))?;
        if self.ctl.cancel.load(Ordering::SeqCst) {
            return Err(self.cancelled(done, total));
        }
        let n = chunk.len();
        let mut admitted = Vec::with_capacity(n);
        for e in chunk {
            match self.policy.admit(e) {
                Ok(e) => admitted.push(e),
                Err(r) => refused.add(r),
            }
        }
        if admitted.is_empty() {
            return Ok(n);
        }
        let c = self
            .create_retrying(&admitted, background)
            .map_err(|e| format!("creating entries failed after {done} of {total}: {e}"))?;
        totals.merge(&c);
        Ok(n)
    }

    /// One create call, repeated for up to [`RETRY_FOR`] while the access
    /// fails as a helper that is restarting does (gone, timing out, a
    /// transient netlink error). A batch the helper half-made before it
    /// went is sent whole again: its made entries then count as existed.
    fn create_retrying(&self, entries: &[Entry], background: bool) -> Result<CreateReport, String> {
        let mut since: Option<Instant> = None;
        loop {
            match self
                .access
                .create_for(&self.policy.selector, entries, background)
            {
                Ok(c) => {
                    if let Some(t) = since {
                        tracing::info!(
                            VMID = %self.vm.config.vm,
                            "restore of VM {}: creating again after {} ms",
                            self.vm.config.vm,
                            t.elapsed().as_millis()
                        );
                    }
                    return Ok(c);
                }
                Err(e) => {
                    let transient = matches!(
                        e,
                        AccessError::Helper(_)
                            | AccessError::Timeout { .. }
                            | AccessError::Netlink { .. }
                    );
                    let t = *since.get_or_insert_with(Instant::now);
                    if !transient
                        || t.elapsed() >= RETRY_FOR
                        || self.ctl.cancel.load(Ordering::SeqCst)
                    {
                        return Err(e.to_string());
                    }
                    if t.elapsed() < RETRY_PAUSE {
                        tracing::warn!(
                            VMID = %self.vm.config.vm,
                            "restore of VM {}: {e}; retrying for up to {} s (the helper may \
                             be restarting)",
                            self.vm.config.vm,
                            RETRY_FOR.as_secs()
                        );
                    }
                    std::thread::sleep(RETRY_PAUSE);
                }
            }
        }
    }

    fn cancelled(&self, done: usize, total: usize) -> String {
        format!(
            "restore stopped after {done} of {total} entries: {}",
            lock(&self.ctl.cancel_reason)
        )
    }

    fn add_totals(report: &mut OpReport, c: &CreateReport, r: &Refused) {
        report.created = c.created;
        report.existed = c.existed;
        report.refused = c.refused;
        report.foreign = r.foreign;
        report.rejected = r.rejected;
        if r.rejected > 0 {
            tracing::debug!(rejected = %r.reasons(), "Load: entries the policy rejected");
        }
        if c.refused > 0 {
            let why: Vec<String> = c
                .refused_by_errno
                .iter()
                .map(|(errno, n)| format!("{n}× {}", std::io::Error::from_raw_os_error(*errno)))
                .collect();
            tracing::info!(refused = %why.join(", "), "Load: refused entries skipped");
        }
    }

    /// Writes the final report. With `tx` (everything happened before the
    /// reply) the answering side logs it; otherwise this logs the
    /// completion of the background part.
    /// The handover file goes too, unless the next instance (a handover)
    /// or a newer Load (superseded) needs it.
    fn finish(mut self, mut report: OpReport, tx: Option<tokio::sync::oneshot::Sender<OpReport>>) {
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
        match self.stopped_as() {
            Some(Stop::Handover | Stop::Superseded) => {}
            _ => {
                if let Some(store) = &self.store {
                    if let Err(e) = store.remove_pending(&self.vm.config.vm) {
                        tracing::warn!(VMID = %self.vm.config.vm, "{e}");
                    }
                }
            }
        }
        report.pending = false;
        report.complete_us = duration_us(self.start);
        report.timestamp_us = now_us();
        let replied = self.ctl.replied_us.load(Ordering::SeqCst);
        report.duration_us = if replied == 0 {
            report.complete_us
        } else {
            replied
        };
        // A background completion is journalled before LastLoad shows
        // it, so whoever sees LastLoad complete finds the line too.
        if tx.is_none() {
            log_complete(&self.vm, &report);
        }
        {
            let mut finished = lock(&self.ctl.finished);
            self.vm.set_last_load(report.clone());
            *finished = true;
        }
        if let Some(tx) = tx {
            if let Err(report) = tx.send(report) {
                // The answer went out already (overrun cap).
                log_complete(&self.vm, &report);
            }
        }
    }
}

/// A warning that says why a Save was slow and what to change, when the
/// cache could not answer it or had to look up many silent entries.
/// Nothing for an access without a cache (no notes).
fn explain_save(vm: &VmRuntime, source: DumpSource, n: &SaveNotes, duration_us: u64) {
    let c = &vm.config;
    let ms = |us: u64| format!("{}.{:01}", us / 1000, us % 1000 / 100);
    let silent_why = |silent: u64| {
        format!(
            "{silent} of VM {}'s entries never reported conntrack events (older than \
             net.netfilter.nf_conntrack_events=1, see docs/packaging.md)",
            c.vm
        )
    };
    match (source, n.miss) {
        (DumpSource::Kernel, Some(why)) => {
            let cause = match why {
                CacheMiss::LookupsCostly | CacheMiss::LookupsFailed if n.silent > 0 => format!(
                    "{}; {}",
                    silent_why(n.silent),
                    if why == CacheMiss::LookupsCostly {
                        "looking each up would have cost more than the walk"
                    } else {
                        "looking them up failed"
                    }
                ),
                _ => why.as_str().to_string(),
            };
            // Lookups of entries near expiry or missing attributes are
            // no one's fault; only silent ones have a remedy.
            let remedy = match why {
                CacheMiss::LookupsCostly | CacheMiss::LookupsFailed if n.silent == 0 => {
                    "the entries that needed a lookup were close to expiry or missing \
                     attributes; nothing to change"
                }
                _ => why.remedy(),
            };
            tracing::warn!(
                VMID = %c.vm,
                VMSTATE_ID = %c.id,
                CAUSE = why.as_str(),
                SILENT = n.silent,
                DURATION_US = duration_us,
                "Save of VM {} walked the conntrack table ({} ms) instead of answering from the \
                 warm cache: {cause}; {}",
                c.vm,
                ms(duration_us),
                remedy
            );
        }
        (DumpSource::Cache | DumpSource::Base, _)
            if n.silent > 0 && n.lookup_us >= SLOW_LOOKUPS_US =>
        {
            tracing::warn!(
                VMID = %c.vm,
                VMSTATE_ID = %c.id,
                CAUSE = "silent entries",
                SILENT = n.silent,
                LOOKUPS = n.lookups,
                LOOKUP_US = n.lookup_us,
                "{}; Save looked them up: {} ms of its {} ms; they report events once they are \
                 recreated",
                silent_why(n.silent),
                ms(n.lookup_us),
                ms(duration_us)
            );
        }
        _ => {}
    }
}

/// The journal line when QEMU gets its answer while entries are still being
/// created.
fn log_reply(vm: &VmRuntime, r: &OpReport) {
    let c = &vm.config;
    tracing::info!(
        VMID = %c.vm,
        VMSTATE_ID = %c.id,
        ENTRIES = r.entries,
        DROPPED = r.dropped,
        CREATED = r.created,
        CREATED_SYNC = r.created_sync,
        EXISTED = r.existed,
        REFUSED = r.refused,
        FOREIGN = r.foreign,
        REJECTED = r.rejected,
        OVER_CAP = r.over_cap,
        EXPIRED = r.expired,
        AGE_SECS = r.age_secs,
        BYTES = r.bytes,
        DURATION_US = r.duration_us,
        "Load of VM {} answered after {} µs: {} of {} entries created, the rest in the background{}{}",
        c.vm,
        r.duration_us,
        r.created_sync,
        r.entries,
        confined_text(r),
        if r.error.is_empty() { String::new() } else { format!(" ({})", r.error) }
    );
}

/// The journal line when a background restore ends.
fn log_complete(vm: &VmRuntime, r: &OpReport) {
    let c = &vm.config;
    if r.error.is_empty() {
        tracing::info!(
            VMID = %c.vm,
            VMSTATE_ID = %c.id,
            ENTRIES = r.entries,
            CREATED = r.created,
            CREATED_SYNC = r.created_sync,
            EXISTED = r.existed,
            REFUSED = r.refused,
            FOREIGN = r.foreign,
            REJECTED = r.rejected,
            OVER_CAP = r.over_cap,
            EXPIRED = r.expired,
            AGE_SECS = r.age_secs,
            DURATION_US = r.duration_us,
            COMPLETE_US = r.complete_us,
            "Load of VM {} complete after {} µs: {} created ({} before the answer), {} existed, {} refused of {} entries{}",
            c.vm, r.complete_us, r.created, r.created_sync, r.existed, r.refused, r.entries, confined_text(r)
        );
    } else {
        tracing::warn!(
            VMID = %c.vm,
            VMSTATE_ID = %c.id,
            ENTRIES = r.entries,
            CREATED = r.created,
            CREATED_SYNC = r.created_sync,
            EXISTED = r.existed,
            REFUSED = r.refused,
            FOREIGN = r.foreign,
            REJECTED = r.rejected,
            OVER_CAP = r.over_cap,
            EXPIRED = r.expired,
            AGE_SECS = r.age_secs,
            DURATION_US = r.duration_us,
            COMPLETE_US = r.complete_us,
            ERROR = %r.error,
            "Load of VM {} ended after {} µs: {}; {} created, {} existed, {} refused of {} entries{}",
            c.vm, r.complete_us, r.error, r.created, r.existed, r.refused, r.entries, confined_text(r)
        );
    }
}

/// One journal line per Save/Load with the structured fields operators
/// filter on (`journalctl VMID=100`).
fn log_report(op: &str, vm: &VmRuntime, r: &OpReport) {
    let c = &vm.config;
    if r.error.is_empty() {
        tracing::info!(
            VMID = %c.vm,
            VMSTATE_ID = %c.id,
            ENTRIES = r.entries,
            DROPPED = r.dropped,
            CREATED = r.created,
            EXISTED = r.existed,
            REFUSED = r.refused,
            FOREIGN = r.foreign,
            REJECTED = r.rejected,
            OVER_CAP = r.over_cap,
            EXPIRED = r.expired,
            AGE_SECS = r.age_secs,
            BYTES = r.bytes,
            DURATION_US = r.duration_us,
            SOURCE = %r.source,
            "{op} of VM {}: {} entries, {} dropped, {} created, {} existed, {} refused{}, {} bytes in {} µs{}",
            c.vm, r.entries, r.dropped, r.created, r.existed, r.refused, confined_text(r), r.bytes, r.duration_us,
            if r.source.is_empty() { String::new() } else { format!(" from the {}", r.source) }
        );
    } else {
        tracing::warn!(
            VMID = %c.vm,
            VMSTATE_ID = %c.id,
            ENTRIES = r.entries,
            DROPPED = r.dropped,
            CREATED = r.created,
            EXISTED = r.existed,
            REFUSED = r.refused,
            FOREIGN = r.foreign,
            REJECTED = r.rejected,
            OVER_CAP = r.over_cap,
            EXPIRED = r.expired,
            AGE_SECS = r.age_secs,
            BYTES = r.bytes,
            DURATION_US = r.duration_us,
            ERROR = %r.error,
            "{op} of VM {} degraded: {} ({} bytes in {} µs)",
            c.vm, r.error, r.bytes, r.duration_us
        );
    }
}

/// `, 1000 foreign, 2 rejected, 5 over the cap` for what a Load's policy
/// kept out, and `, 40 expired (saved 10800 s before)` for what ran out
/// since Save; empty when nothing was kept out.
fn confined_text(r: &OpReport) -> String {
    let mut s = String::new();
    for (n, what) in [
        (r.foreign, "foreign (not the VM's mark or zone)".to_string()),
        (r.rejected, "rejected by the destination's policy".into()),
        (r.over_cap, "over the VM's entry cap".into()),
        (
            r.expired,
            format!("expired (saved {} s before)", r.age_secs),
        ),
    ] {
        if n > 0 {
            s += &format!(", {n} {what}");
        }
    }
    if r.expired == 0 && r.age_secs > 0 {
        s += &format!(", timeouts aged by {} s", r.age_secs);
    }
    s
}

#[cfg(test)]
mod tests;

//! The Save/Load policy QEMU depends on: Save always answers with a valid,
//! non-empty blob of at most [`QEMU_LIMIT`] bytes within a deadline, Load
//! never fails, and both record what happened for `LastSave`/`LastLoad` and
//! the journal. Conntrack work runs on tokio's blocking pool, never on the
//! executor that answers property reads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::runtime::{now_us, OpReport, VmRuntime};
use super::ServiceError;
use crate::access::{AccessError, ConntrackAccess, DeleteReport};
use crate::entry::Entry;
use crate::format::{self, EncodeOptions, QEMU_LIMIT};

/// Default Save deadline. QEMU waits 25 s and every millisecond of Save is
/// guest downtime; a dump that takes longer than this is already broken, and
/// answering early with an empty state keeps the migration alive.
pub const DEFAULT_SAVE_DEADLINE_MS: u64 = 2000;

/// Default Load deadline: past it we answer QEMU (so the guest can resume
/// well before QEMU's 25 s timeout) and let entry creation finish in the
/// background; `LastLoad` is updated when it does.
pub const DEFAULT_LOAD_DEADLINE_MS: u64 = 5000;

/// How long `Unregister(flush)` waits for the deletions.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Returned only if even an empty state cannot be encoded (a broken build):
/// a blob no decoder accepts, so a destination logs it and creates nothing,
/// while QEMU still gets the non-empty answer that keeps the VM alive.
const LAST_RESORT_BLOB: &[u8] = b"\0";

/// Runs Save, Load and flush for registered VMs over one conntrack access.
pub struct Engine {
    access: Arc<dyn ConntrackAccess>,
    save_deadline: Duration,
    load_deadline: Duration,
}

fn duration_us(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

impl Engine {
    pub fn new(
        access: Arc<dyn ConntrackAccess>,
        save_deadline: Duration,
        load_deadline: Duration,
    ) -> Engine {
        Engine {
            access,
            save_deadline,
            load_deadline,
        }
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
        let mut task: JoinHandle<Result<(Vec<Entry>, format::Encoded), String>> =
            tokio::task::spawn_blocking(move || {
                let entries = access.dump(&sel).map_err(|e| format!("dump failed: {e}"))?;
                let enc = format::encode(&entries, &opts)
                    .map_err(|e| format!("encoding {} entries failed: {e}", entries.len()))?;
                Ok((entries, enc))
            });
        let outcome = match tokio::time::timeout(self.save_deadline, &mut task).await {
            Ok(Ok(Ok((entries, enc)))) => {
                if enc.bytes.is_empty() || enc.bytes.len() > QEMU_LIMIT {
                    Err(format!(
                        "encoder returned {} bytes, outside 1..={QEMU_LIMIT}",
                        enc.bytes.len()
                    ))
                } else {
                    Ok((entries, enc))
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
            Ok((entries, enc)) => {
                let report = OpReport {
                    entries: enc.kept as u64,
                    dropped: enc.dropped as u64,
                    bytes: enc.bytes.len() as u64,
                    duration_us: duration_us(start),
                    timestamp_us: now_us(),
                    ..OpReport::default()
                };
                // Every dumped entry, also those dropped for space, is the
                // VM's state on this host; a flush after the migration
                // removes all of it.
                vm.set_saved(entries);
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

    /// Answers QEMU's `Load(data)`: validates the whole blob, then creates
    /// its entries. Never fails; every problem ends up in `LastLoad`.
    pub async fn load(&self, vm: &Arc<VmRuntime>, data: Vec<u8>) {
        let start = Instant::now();
        let bytes = data.len() as u64;
        let refuse = |error: String| {
            let report = OpReport {
                bytes,
                duration_us: duration_us(start),
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
        let access = self.access.clone();
        let mut task: JoinHandle<OpReport> = tokio::task::spawn_blocking(move || {
            let mut report = OpReport {
                bytes,
                ..OpReport::default()
            };
            // decode validates the whole blob first, so a bad one creates
            // nothing at all.
            match format::decode(&data) {
                Err(e) => report.error = format!("invalid state, nothing loaded: {e}"),
                Ok(decoded) => {
                    report.entries = decoded.entries.len() as u64;
                    report.dropped = decoded.dropped.unwrap_or(0);
                    match access.create(&decoded.entries) {
                        Ok(c) => {
                            report.created = c.created;
                            report.existed = c.existed;
                            report.refused = c.refused;
                            if c.refused > 0 {
                                let why: Vec<String> = c
                                    .refused_by_errno
                                    .iter()
                                    .map(|(errno, n)| {
                                        format!(
                                            "{n}× {}",
                                            std::io::Error::from_raw_os_error(*errno)
                                        )
                                    })
                                    .collect();
                                tracing::info!(refused = %why.join(", "), "Load: refused entries skipped");
                            }
                        }
                        Err(e) => report.error = format!("creating entries failed: {e}"),
                    }
                }
            }
            report
        });
        let finish = move |mut report: OpReport, vm: &VmRuntime| {
            report.duration_us = duration_us(start);
            report.timestamp_us = now_us();
            log_report("Load", vm, &report);
            vm.set_last_load(report);
        };
        match tokio::time::timeout(self.load_deadline, &mut task).await {
            Ok(Ok(report)) => finish(report, vm),
            Ok(Err(join)) => refuse(format!("load task failed: {join}")),
            Err(_) => {
                refuse(format!(
                    "still creating entries after the {} ms load deadline; answered QEMU, \
                     LastLoad is updated when creation ends",
                    self.load_deadline.as_millis()
                ));
                let vm = vm.clone();
                tokio::spawn(async move {
                    match task.await {
                        Ok(report) => finish(report, &vm),
                        Err(join) => tracing::error!("load task failed: {join}"),
                    }
                });
            }
        }
    }

    /// Deletes exactly the entries the VM's last successful Save took
    /// (matched with their CTA_ID), for `Unregister(flush)` on the source.
    pub async fn flush(&self, vm: &Arc<VmRuntime>) -> Result<DeleteReport, ServiceError> {
        let entries = vm.saved();
        if entries.is_empty() {
            return Ok(DeleteReport::default());
        }
        let access = self.access.clone();
        let task = tokio::task::spawn_blocking(move || access.delete_entries(&entries));
        let res = match tokio::time::timeout(FLUSH_TIMEOUT, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(AccessError::Helper(format!("flush task failed: {join}"))),
            Err(_) => Err(AccessError::Timeout {
                op: "delete",
                ms: FLUSH_TIMEOUT.as_millis() as u64,
            }),
        };
        match res {
            Ok(r) => {
                vm.clear_saved();
                Ok(r)
            }
            Err(source) => Err(ServiceError::Flush {
                vm: vm.config.vm.clone(),
                source,
            }),
        }
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
            BYTES = r.bytes,
            DURATION_US = r.duration_us,
            "{op} of VM {}: {} entries, {} dropped, {} created, {} existed, {} refused, {} bytes in {} µs",
            c.vm, r.entries, r.dropped, r.created, r.existed, r.refused, r.bytes, r.duration_us
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
            BYTES = r.bytes,
            DURATION_US = r.duration_us,
            ERROR = %r.error,
            "{op} of VM {} degraded: {} ({} bytes in {} µs)",
            c.vm, r.error, r.bytes, r.duration_us
        );
    }
}

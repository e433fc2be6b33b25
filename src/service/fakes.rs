//! In-process stand-ins for the unit tests of [`super::engine`] and
//! [`super::manager`]: an in-memory conntrack table and an endpoint that
//! serves nothing. Both write into one [`Events`] log, so a test sees the
//! order of the manager's calls across the two. What they stand in for is
//! tested for real (kernel conntrack, dbus-daemon, QEMU) in `tests/`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::access::{AccessError, ConntrackAccess, CreateOutcome, CreateReport, DeleteReport};
use crate::access::{DumpSource, SavedState, WarmState, Warmth};
use crate::entry::{Entry, Selector};
use crate::format::{self, EncodeOptions, Encoded};

use super::engine::Engine;
use super::manager::Endpoint;
use super::runtime::VmRuntime;

/// The calls both fakes saw, in order, as short strings (`"connect 100"`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Events(Arc<Mutex<Vec<String>>>);

impl Events {
    pub(crate) fn push(&self, e: impl Into<String>) {
        self.0.lock().unwrap().push(e.into());
    }

    /// Everything recorded so far, emptying the log.
    pub(crate) fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// How [`FakeAccess::save_state`] misbehaves, if it does.
#[derive(Debug, Clone, Default)]
pub(crate) enum SaveFault {
    #[default]
    None,
    /// Fails like a helper that went away.
    Fail,
    /// Returns these bytes as the encoded state (an encoder bug).
    Bytes(Vec<u8>),
    /// Blocks this long first, like a stuck netlink socket.
    Delay(Duration),
}

/// An in-memory conntrack table: entries are matched by original tuple and
/// zone, created ones get the next `CTA_ID`.
#[derive(Default)]
pub(crate) struct FakeAccess {
    pub(crate) events: Events,
    table: Mutex<Vec<Entry>>,
    next_id: Mutex<u32>,
    pub(crate) save_fault: Mutex<SaveFault>,
    /// Deletions fail (a flush error).
    pub(crate) fail_delete: AtomicBool,
    /// Every background create call blocks this long (a slow restore).
    pub(crate) background_delay: Mutex<Duration>,
    /// The next this many create calls fail as a helper that is away
    /// (restarting) does, after creating nothing.
    pub(crate) fail_creates: AtomicUsize,
    /// Some: a cache that gets warm after this long (`wait_warm` blocks
    /// that long, bounded by its timeout, and logs `wait-warm 0x64`).
    /// None: no cache (the trait's default, nothing logged).
    pub(crate) warm_after: Mutex<Option<Duration>>,
}

impl FakeAccess {
    pub(crate) fn new(events: Events) -> Arc<FakeAccess> {
        Arc::new(FakeAccess {
            events,
            next_id: Mutex::new(1),
            ..FakeAccess::default()
        })
    }

    /// Adds entries as the kernel would, each with a fresh `CTA_ID`.
    pub(crate) fn insert(&self, entries: &[Entry]) {
        let mut t = self.table.lock().unwrap();
        let mut id = self.next_id.lock().unwrap();
        for e in entries {
            let mut e = e.clone();
            e.id = Some(*id);
            *id += 1;
            t.push(e);
        }
    }

    /// Adds an entry with this `CTA_ID` (the kernel's is a 32-bit hash, so
    /// two entries may share one).
    pub(crate) fn insert_with_id(&self, e: &Entry, id: u32) {
        let mut e = e.clone();
        e.id = Some(id);
        self.table.lock().unwrap().push(e);
    }

    pub(crate) fn len(&self) -> usize {
        self.table.lock().unwrap().len()
    }
}

fn same(a: &Entry, b: &Entry) -> bool {
    a.orig == b.orig && a.zone == b.zone
}

impl ConntrackAccess for FakeAccess {
    fn dump(&self, sel: &Selector) -> Result<Vec<Entry>, AccessError> {
        let t = self.table.lock().unwrap();
        Ok(t.iter().filter(|e| sel.matches(e)).cloned().collect())
    }

    fn create(&self, entries: &[Entry]) -> Result<CreateReport, AccessError> {
        let away = self
            .fail_creates
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if away.is_ok() {
            self.events.push("create failed");
            return Err(AccessError::Helper(
                "create: cannot connect to the helper: connection refused".into(),
            ));
        }
        self.events.push(format!("create {}", entries.len()));
        let mut r = CreateReport::default();
        let mut fresh = Vec::new();
        {
            let t = self.table.lock().unwrap();
            for e in entries {
                if t.iter().any(|x| same(x, e)) || fresh.iter().any(|x| same(x, e)) {
                    r.add(CreateOutcome::Existed);
                } else {
                    fresh.push(e.clone());
                    r.add(CreateOutcome::Created);
                }
            }
        }
        self.insert(&fresh);
        Ok(r)
    }

    fn create_background(&self, entries: &[Entry]) -> Result<CreateReport, AccessError> {
        self.events.push("background");
        std::thread::sleep(*self.background_delay.lock().unwrap());
        self.create(entries)
    }

    fn delete_selected(&self, sel: &Selector) -> Result<u64, AccessError> {
        let mut t = self.table.lock().unwrap();
        let before = t.len();
        t.retain(|e| !sel.matches(e));
        Ok((before - t.len()) as u64)
    }

    fn delete_entries(&self, entries: &[Entry]) -> Result<DeleteReport, AccessError> {
        self.events.push(format!("delete {}", entries.len()));
        if self.fail_delete.load(Ordering::SeqCst) {
            return Err(AccessError::Helper("injected delete failure".into()));
        }
        let mut t = self.table.lock().unwrap();
        let mut r = DeleteReport::default();
        for e in entries {
            match t
                .iter()
                .position(|x| same(x, e) && (e.id.is_none() || x.id == e.id))
            {
                Some(i) => {
                    t.remove(i);
                    r.deleted += 1;
                }
                None => r.missing += 1,
            }
        }
        Ok(r)
    }

    fn watch(&self, sel: &Selector, on: bool) -> Result<(), AccessError> {
        self.events.push(format!(
            "watch {:#x} {}",
            sel.mark,
            if on { "on" } else { "off" }
        ));
        Ok(())
    }

    fn wait_warm(&self, sel: &Selector, timeout: Duration) -> Result<Warmth, AccessError> {
        let Some(after) = *self.warm_after.lock().unwrap() else {
            return Ok(Warmth::of(WarmState::Uncached));
        };
        self.events.push(format!("wait-warm {:#x}", sel.mark));
        std::thread::sleep(after.min(timeout));
        Ok(Warmth::of(WarmState::Warm))
    }

    fn save_state(&self, sel: &Selector, opts: &EncodeOptions) -> Result<SavedState, AccessError> {
        let fault = self.save_fault.lock().unwrap().clone();
        match fault {
            SaveFault::None => {}
            SaveFault::Fail => return Err(AccessError::Helper("injected dump failure".into())),
            SaveFault::Bytes(bytes) => {
                return Ok(SavedState {
                    encoded: Encoded {
                        bytes,
                        kept: 0,
                        dropped: 0,
                    },
                    source: DumpSource::Cache,
                    ids: vec![],
                    notes: Default::default(),
                })
            }
            SaveFault::Delay(d) => std::thread::sleep(d),
        }
        let es = self.dump(sel)?;
        let encoded = format::encode(&es, opts).map_err(|source| AccessError::Encode {
            entries: es.len(),
            source,
        })?;
        Ok(SavedState {
            encoded,
            source: DumpSource::Kernel,
            ids: es.iter().filter_map(|e| e.id).collect(),
            notes: Default::default(),
        })
    }
}

/// Why [`FakeEndpoint`] would not serve a VM.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct FakeError(pub(crate) String);

/// Serves nothing; records each call and fails where a test asks.
#[derive(Default)]
pub(crate) struct FakeEndpoint {
    pub(crate) events: Events,
    /// VMs whose bus cannot be reached.
    pub(crate) unreachable: Mutex<HashSet<String>>,
    /// VMs whose export fails.
    pub(crate) export_fails: Mutex<HashSet<String>>,
    /// Exported VMs and whether with a link.
    pub(crate) exported: Mutex<HashMap<String, bool>>,
}

impl FakeEndpoint {
    pub(crate) fn new(events: Events) -> FakeEndpoint {
        FakeEndpoint {
            events,
            ..FakeEndpoint::default()
        }
    }
}

impl Endpoint for FakeEndpoint {
    type Link = String;
    type Error = FakeError;

    async fn connect(
        &self,
        rt: &Arc<VmRuntime>,
        _engine: &Arc<Engine>,
    ) -> Result<String, FakeError> {
        let vm = &rt.config.vm;
        self.events.push(format!("connect {vm}"));
        if self.unreachable.lock().unwrap().contains(vm) {
            return Err(FakeError(format!("bus of VM '{vm}' unreachable")));
        }
        Ok(vm.clone())
    }

    async fn export(&self, rt: &Arc<VmRuntime>, link: Option<String>) -> Result<(), FakeError> {
        let vm = &rt.config.vm;
        let linked = link.is_some();
        self.events.push(format!(
            "export {vm} {}",
            if linked { "linked" } else { "unlinked" }
        ));
        if self.export_fails.lock().unwrap().contains(vm) {
            return Err(FakeError(format!("cannot export VM '{vm}'")));
        }
        self.exported.lock().unwrap().insert(vm.clone(), linked);
        Ok(())
    }

    fn is_serving(&self, vm: &str) -> bool {
        self.exported.lock().unwrap().get(vm) == Some(&true)
    }

    async fn unserve(&self, vm: &str) {
        self.events.push(format!("unserve {vm}"));
        self.exported.lock().unwrap().remove(vm);
    }

    async fn withdraw(&self) {
        self.events.push("withdraw");
    }
}

/// `n` distinct established TCP entries of `mark` with pseudo-random peers
/// (seeded), enough for the policy tests here; the realistic mix used by the
/// integration tests and benchmarks lives in the test kit, which unit tests
/// inside the crate cannot link.
pub(crate) fn population(n: usize, seed: u64, mark: u32) -> Vec<Entry> {
    use crate::entry::{status, ProtoInfo, Tuple, L4};
    use std::net::{IpAddr, Ipv4Addr};
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let r = next();
            let src = IpAddr::V4(Ipv4Addr::new(
                10,
                (mark % 250) as u8,
                (i >> 16) as u8,
                (i >> 8) as u8,
            ));
            let dst = IpAddr::V4(Ipv4Addr::from((r >> 32) as u32 | 0x0100_0000));
            let orig = Tuple {
                src,
                dst,
                proto: 6,
                l4: L4::Ports {
                    src: 1024 + (i as u16 % 60000),
                    dst: [443, 80, 22, 5432][(r % 4) as usize],
                },
                zone: None,
            };
            Entry {
                reply: orig.inverse(),
                orig,
                status: status::SEEN_REPLY | status::ASSURED | status::CONFIRMED,
                timeout: 3600 + (r % 400_000) as u32,
                mark,
                zone: 0,
                labels: None,
                protoinfo: Some(ProtoInfo::Tcp {
                    state: 3,
                    wscale_orig: 7,
                    wscale_reply: 7,
                    flags_orig: 0x03,
                    flags_reply: 0x03,
                }),
                seq_adj_orig: None,
                seq_adj_reply: None,
                helper: None,
                id: None,
            }
        })
        .collect()
}

//! The one fake [`ConntrackAccess`], for what the kernel cannot be made to
//! do on demand: a dump that hangs for seconds, a codec bug, an encoder
//! that overruns its limit, a create call held at a gate so a test can act
//! while a restore is half done. Every test that uses it has a real-kernel
//! counterpart.
//!
//! Three backends: an in-memory table ([`FakeAccess::with`]), a sink whose
//! table stays empty ([`FakeAccess::sink`], a slow netlink socket), or a real
//! access underneath ([`FakeAccess::over`], e.g. ctnetlink in a test
//! namespace). Every backend records its calls, honours the delay and can
//! hold the create call that carries one entry.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use conntrack_vmstate::access::{
    AccessError, ConntrackAccess, CreateOutcome, CreateReport, DeleteReport, DumpSource, SaveNotes,
    SavedState, WarmState, Warmth,
};
use conntrack_vmstate::entry::{status, Entry, Selector, Tuple};
use conntrack_vmstate::format::{self, EncodeOptions, Encoded, Format};

/// What the fake was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Dump(Selector),
    Create(Vec<Entry>),
    CreateBackground(usize),
    DeleteSelected(Selector),
    DeleteEntries(Vec<Entry>),
    Watch(Selector, bool),
    SaveState(Selector, usize, Format),
    /// The wait asked for, in ms.
    WaitWarm(Selector, u64),
}

/// An entry's identity in the table: original tuple and zone.
pub fn key(e: &Entry) -> (Tuple, u16) {
    (e.orig, e.zone)
}

enum Backend {
    Table,
    Sink,
    Real(Box<dyn ConntrackAccess>),
}

/// See the module documentation.
pub struct FakeAccess {
    backend: Backend,
    /// The in-memory table (the `with` backend).
    pub entries: Mutex<Vec<Entry>>,
    calls: Mutex<Vec<Call>>,
    /// How long every dump and create blocks its thread.
    pub delay: Mutex<Duration>,
    /// Dump panics (a codec bug).
    pub panic_on_dump: AtomicBool,
    /// A state save_state returns whatever the limit: an encoder bug, which
    /// the real encoder cannot be made to have.
    pub save_bytes: Mutex<Option<Vec<u8>>>,
    /// What the table backend's save_state reports about itself.
    pub save_notes: Mutex<SaveNotes>,
    /// What wait_warm answers, after `warm_delay` (a cache warming up).
    pub warmth: Mutex<Warmth>,
    pub warm_delay: Mutex<Duration>,
    held: Option<(Tuple, u16)>,
    gate: (Mutex<bool>, Condvar),
    /// Set once a call is waiting at the gate.
    waiting: (Mutex<bool>, Condvar),
    order: Mutex<Vec<(Tuple, u16)>>,
}

impl FakeAccess {
    fn new(backend: Backend, held: Option<(Tuple, u16)>) -> FakeAccess {
        FakeAccess {
            backend,
            entries: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            delay: Mutex::new(Duration::ZERO),
            panic_on_dump: AtomicBool::new(false),
            save_bytes: Mutex::new(None),
            save_notes: Mutex::new(SaveNotes::default()),
            warmth: Mutex::new(Warmth::of(WarmState::Uncached)),
            warm_delay: Mutex::new(Duration::ZERO),
            held,
            gate: (Mutex::new(held.is_none()), Condvar::new()),
            waiting: (Mutex::new(false), Condvar::new()),
            order: Mutex::new(Vec::new()),
        }
    }

    /// An in-memory table holding `entries`. Its dump is deliberately
    /// unfiltered (a server must re-check the selector); its save_state
    /// applies the selector, as ctnetlink and the cache do.
    pub fn with(entries: Vec<Entry>) -> Arc<FakeAccess> {
        let f = FakeAccess::new(Backend::Table, None);
        *f.entries.lock().expect("fake lock") = entries;
        Arc::new(f)
    }

    /// A sink whose every dump and create blocks for `delay`, like a stuck
    /// netlink socket: dumps are empty, creates report every entry created.
    pub fn sink(delay: Duration) -> Arc<FakeAccess> {
        let f = FakeAccess::new(Backend::Sink, None);
        *f.delay.lock().expect("fake lock") = delay;
        Arc::new(f)
    }

    /// `real` underneath; the create call carrying `held` waits at a gate
    /// until [`release`](Self::release).
    pub fn over(
        real: impl ConntrackAccess + 'static,
        held: Option<(Tuple, u16)>,
    ) -> Arc<FakeAccess> {
        Arc::new(FakeAccess::new(Backend::Real(Box::new(real)), held))
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("fake lock").clone()
    }

    /// How many dumps were asked for.
    pub fn dumps(&self) -> usize {
        let calls = self.calls.lock().expect("fake lock");
        calls.iter().filter(|c| matches!(c, Call::Dump(_))).count()
    }

    /// Every entry handed to create, in order, as (tuple, zone).
    pub fn order(&self) -> Vec<(Tuple, u16)> {
        self.order.lock().expect("fake lock").clone()
    }

    /// Opens the gate of the held create call.
    pub fn release(&self) {
        *self.gate.0.lock().expect("fake lock") = true;
        self.gate.1.notify_all();
    }

    /// Waits (bounded) until the held call arrived at the gate.
    pub fn wait_held(&self, bound: Duration) -> bool {
        let g = self.waiting.0.lock().expect("fake lock");
        let (g, _) = self
            .waiting
            .1
            .wait_timeout_while(g, bound, |w| !*w)
            .expect("fake lock");
        *g
    }

    fn record(&self, c: Call) {
        self.calls.lock().expect("fake lock").push(c);
    }

    fn pause(&self) {
        let d = *self.delay.lock().expect("fake lock");
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }

    fn hold(&self, entries: &[Entry]) {
        let Some(h) = self.held else {
            return;
        };
        if entries.iter().any(|e| key(e) == h) {
            *self.waiting.0.lock().expect("fake lock") = true;
            self.waiting.1.notify_all();
            let g = self.gate.0.lock().expect("fake lock");
            // Bounded: a test that forgets to release still ends.
            let _ = self
                .gate
                .1
                .wait_timeout_while(g, Duration::from_secs(60), |open| !*open)
                .expect("fake lock");
        }
    }
}

impl ConntrackAccess for FakeAccess {
    fn dump(&self, sel: &Selector) -> Result<Vec<Entry>, AccessError> {
        self.record(Call::Dump(*sel));
        self.pause();
        if self.panic_on_dump.load(Ordering::SeqCst) {
            panic!("simulated codec bug");
        }
        match &self.backend {
            Backend::Table => Ok(self.entries.lock().expect("fake lock").clone()),
            Backend::Sink => Ok(Vec::new()),
            Backend::Real(r) => r.dump(sel),
        }
    }

    fn create(&self, entries: &[Entry]) -> Result<CreateReport, AccessError> {
        self.record(Call::Create(entries.to_vec()));
        self.pause();
        self.hold(entries);
        self.order
            .lock()
            .expect("fake lock")
            .extend(entries.iter().map(key));
        match &self.backend {
            Backend::Table => {
                let mut t = self.entries.lock().expect("fake lock");
                let mut r = CreateReport::default();
                for e in entries {
                    if e.status & status::EXPECTED != 0 {
                        r.add(CreateOutcome::Refused(16));
                    } else if t.iter().any(|x| x.orig == e.orig) {
                        r.add(CreateOutcome::Existed);
                    } else {
                        t.push(e.clone());
                        r.add(CreateOutcome::Created);
                    }
                }
                Ok(r)
            }
            Backend::Sink => Ok(CreateReport {
                created: entries.len() as u64,
                ..CreateReport::default()
            }),
            Backend::Real(r) => r.create(entries),
        }
    }

    fn create_background(&self, entries: &[Entry]) -> Result<CreateReport, AccessError> {
        self.record(Call::CreateBackground(entries.len()));
        self.create(entries)
    }

    fn delete_selected(&self, sel: &Selector) -> Result<u64, AccessError> {
        self.record(Call::DeleteSelected(*sel));
        match &self.backend {
            Backend::Table => {
                let mut t = self.entries.lock().expect("fake lock");
                let before = t.len();
                t.retain(|e| !sel.matches(e));
                Ok((before - t.len()) as u64)
            }
            Backend::Sink => Ok(0),
            Backend::Real(r) => r.delete_selected(sel),
        }
    }

    fn delete_entries(&self, entries: &[Entry]) -> Result<DeleteReport, AccessError> {
        self.record(Call::DeleteEntries(entries.to_vec()));
        match &self.backend {
            Backend::Table => {
                let mut t = self.entries.lock().expect("fake lock");
                let mut r = DeleteReport::default();
                for e in entries {
                    match t.iter().position(|x| x.orig == e.orig) {
                        Some(i) => {
                            t.remove(i);
                            r.deleted += 1
                        }
                        None => r.missing += 1,
                    }
                }
                Ok(r)
            }
            Backend::Sink => Ok(DeleteReport::default()),
            Backend::Real(r) => r.delete_entries(entries),
        }
    }

    fn watch(&self, sel: &Selector, on: bool) -> Result<(), AccessError> {
        self.record(Call::Watch(*sel, on));
        match &self.backend {
            Backend::Real(r) => r.watch(sel, on),
            Backend::Table | Backend::Sink => Ok(()),
        }
    }

    fn save_state(&self, sel: &Selector, opts: &EncodeOptions) -> Result<SavedState, AccessError> {
        // The sink and a real access save as the trait's default does
        // (dump, then encode), so a slow dump makes a slow Save.
        let (entries, source) = match &self.backend {
            Backend::Table => {
                self.record(Call::SaveState(*sel, opts.limit, opts.format));
                if let Some(bytes) = self.save_bytes.lock().expect("fake lock").clone() {
                    return Ok(SavedState {
                        encoded: Encoded {
                            bytes,
                            kept: 0,
                            dropped: 0,
                        },
                        source: DumpSource::Cache,
                        ids: vec![],
                        notes: self.save_notes.lock().expect("fake lock").clone(),
                    });
                }
                let mut es = self.entries.lock().expect("fake lock").clone();
                es.retain(|e| sel.matches(e));
                (es, DumpSource::Cache)
            }
            Backend::Sink | Backend::Real(_) => (self.dump(sel)?, DumpSource::Kernel),
        };
        let encoded = format::encode(&entries, opts).map_err(|source| AccessError::Encode {
            entries: entries.len(),
            source,
        })?;
        let notes = match &self.backend {
            Backend::Table => self.save_notes.lock().expect("fake lock").clone(),
            _ => SaveNotes::default(),
        };
        Ok(SavedState {
            encoded,
            source,
            ids: entries.iter().filter_map(|e| e.id).collect(),
            notes,
        })
    }

    fn wait_warm(&self, sel: &Selector, timeout: Duration) -> Result<Warmth, AccessError> {
        self.record(Call::WaitWarm(*sel, timeout.as_millis() as u64));
        let d = *self.warm_delay.lock().expect("fake lock");
        std::thread::sleep(d.min(timeout));
        Ok(*self.warmth.lock().expect("fake lock"))
    }
}

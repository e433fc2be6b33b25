//! Daemon side: [`HelperClient`] implements [`ConntrackAccess`] by sending
//! requests to the sandboxed helper's socket.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::wire::{self, op, Request, Response};
use crate::access::{
    AccessError, ConntrackAccess, CreateOutcome, CreateReport, DeleteReport, DumpSource, SaveNotes,
    SavedState, WarmState, Warmth,
};
use crate::entry::{Entry, Selector};
use crate::format::{EncodeOptions, Encoded};

/// Default bound of one request, connect to reply. Below the daemon's Save
/// deadline, so a hung helper turns into an error the daemon can still
/// answer QEMU with.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Entries per Create/DeleteEntries request; well under
/// [`wire::MAX_ENTRIES`] so one request stays a few MiB.
const CHUNK: usize = 16_384;

/// Idle connections kept for reuse; more concurrent callers connect anew.
const POOL: usize = 8;

/// Ids per DeleteSaved request (4 MiB), well under [`wire::MAX_REQUEST`].
const IDS_CHUNK: usize = 1 << 20;

/// errno reported for entries the helper would refuse before asking the
/// kernel (mark 0 entries: see [`super::server::validate_selector`]).
const EPERM: i32 = 1;
/// What a confined helper says of a selector nobody watches
/// ([`super::server::confine`]).
const NOT_WATCHED: &str = "is not watched: the helper serves only";
/// errno reported for entries the helper protocol cannot carry.
const EINVAL: i32 = 22;

/// A [`ConntrackAccess`] that forwards to the helper's socket.
///
/// One connection is opened at construction if possible (the helper is
/// socket-activated and stays up while a connection is open); more are
/// opened on demand and reused. When the helper exited while idle, the next call reconnects
/// transparently: a request is resent only when the old connection failed
/// before any byte of a reply arrived, which the helper guarantees means
/// the request was not run (it closes connections only between requests).
pub struct HelperClient {
    path: PathBuf,
    timeout: Duration,
    pool: Mutex<Vec<UnixStream>>,
    watches: Arc<WatchState>,
    /// The helper answered SaveState / DeleteSaved with `unknown opcode`
    /// (it predates them): do the work here until the helper is replaced.
    /// Cleared when a kept connection breaks, the sign of a helper restart
    /// (e.g. the package upgrade that brings the new helper); the request
    /// that notices still takes the old path, the next one the op.
    old_helper_save: AtomicBool,
    old_helper_delete: AtomicBool,
    /// Likewise for CreateBackground: plain Creates until then.
    old_helper_background: AtomicBool,
    /// Likewise for WaitWarm and SaveStateNoted, added together: no wait,
    /// and plain SaveStates, until then.
    old_helper_warm: AtomicBool,
}

/// How much longer than the wait it asks for a WaitWarm may take to be
/// answered before the client gives up on it.
const WAIT_WARM_SLACK: Duration = Duration::from_secs(2);

/// The watches the daemon asked for and the one connection that holds them
/// in the helper (watches live as long as their connection).
struct WatchState {
    path: PathBuf,
    timeout: Duration,
    inner: Mutex<WatchInner>,
    stop: AtomicBool,
    /// Times the watches were sent again on a new connection.
    resends: AtomicU64,
    monitor: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Default)]
struct WatchInner {
    conn: Option<UnixStream>,
    /// Watch calls per selector (the trait counts them); the helper is told
    /// only of the first `true` and the last `false`.
    counts: HashMap<Selector, u32>,
}

/// How often the monitor looks at the watch connection, and the longest
/// wait between reconnect attempts while the helper is away.
const MONITOR_TICK: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// How one attempt failed.
enum Fail {
    /// Before any byte of a reply: safe to retry on a fresh connection.
    BeforeReply(io::Error),
    Other(AccessError),
}

impl HelperClient {
    /// Tries to connect right away (activating the helper and keeping it
    /// up); when that fails, every call connects on demand.
    pub fn new(socket: &Path) -> Result<Self, AccessError> {
        Self::with_timeout(socket, DEFAULT_TIMEOUT)
    }

    /// Like [`HelperClient::new`] with a bound per request.
    pub fn with_timeout(socket: &Path, timeout: Duration) -> Result<Self, AccessError> {
        if socket.as_os_str().is_empty() {
            return Err(AccessError::Helper("empty helper socket path".into()));
        }
        let client = HelperClient {
            path: socket.to_owned(),
            timeout,
            pool: Mutex::new(Vec::new()),
            old_helper_save: AtomicBool::new(false),
            old_helper_background: AtomicBool::new(false),
            old_helper_delete: AtomicBool::new(false),
            old_helper_warm: AtomicBool::new(false),
            watches: Arc::new(WatchState {
                path: socket.to_owned(),
                timeout,
                inner: Mutex::new(WatchInner::default()),
                stop: AtomicBool::new(false),
                resends: AtomicU64::new(0),
                monitor: Mutex::new(None),
            }),
        };
        // Best effort: connecting now socket-activates the helper while the
        // daemon starts, and the open connection keeps it up while the daemon
        // runs. A cold helper costs ~20 ms, which inside Save would be
        // migration downtime. Failure is fine: calls connect lazily.
        if let Ok(s) = UnixStream::connect(&client.path) {
            client.give_back(s);
        }
        Ok(client)
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.path
    }

    /// How many times the watches were sent again to a restarted helper.
    pub fn watch_resends(&self) -> u64 {
        self.watches.resends.load(Ordering::Relaxed)
    }

    /// Selectors currently watched (as the daemon asked; the helper holds
    /// them while the watch connection is up).
    pub fn watched(&self) -> usize {
        self.watches.lock().counts.len()
    }

    fn start_monitor(&self) {
        let mut m = self
            .watches
            .monitor
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if m.is_some() {
            return;
        }
        let st = Arc::clone(&self.watches);
        match std::thread::Builder::new()
            .name("helper-watch".into())
            .spawn(move || st.monitor())
        {
            Ok(h) => *m = Some(h),
            Err(e) => tracing::warn!("cannot start the helper watch monitor: {e}"),
        }
    }

    fn pooled(&self) -> Option<UnixStream> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn give_back(&self, s: UnixStream) {
        let mut p = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if p.len() < POOL {
            p.push(s);
        }
    }

    fn connect(&self, op: &'static str) -> Result<UnixStream, AccessError> {
        UnixStream::connect(&self.path).map_err(|e| {
            AccessError::Helper(format!(
                "{op}: cannot connect to the helper at {}: {e}",
                self.path.display()
            ))
        })
    }

    /// Sends one request frame and returns the reply, retrying once on a
    /// fresh connection when a reused one turns out to be closed.
    fn call(&self, op: &'static str, frame: &[u8]) -> Result<Response, AccessError> {
        self.call_within(op, frame, self.timeout)
    }

    /// [`call`](Self::call) with its own bound, for requests that wait by
    /// design (WaitWarm).
    fn call_within(
        &self,
        op: &'static str,
        frame: &[u8],
        timeout: Duration,
    ) -> Result<Response, AccessError> {
        let deadline = Instant::now() + timeout;
        if let Some(s) = self.pooled() {
            match self.attempt(op, s, frame, deadline) {
                Ok(r) => return Ok(r),
                Err(Fail::BeforeReply(e)) => {
                    tracing::debug!("{op}: reused helper connection failed ({e}); reconnecting");
                    // Possibly a new helper: it may know the newer ops.
                    self.old_helper_save.store(false, Ordering::Relaxed);
                    self.old_helper_delete.store(false, Ordering::Relaxed);
                    self.old_helper_background.store(false, Ordering::Relaxed);
                    self.old_helper_warm.store(false, Ordering::Relaxed);
                }
                Err(Fail::Other(e)) => return Err(e),
            }
        }
        let s = self.connect(op)?;
        match self.attempt(op, s, frame, deadline) {
            Ok(r) => Ok(r),
            Err(Fail::BeforeReply(e)) => Err(self.io_error(op, e)),
            Err(Fail::Other(e)) => Err(e),
        }
    }

    fn io_error(&self, op: &'static str, e: io::Error) -> AccessError {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            AccessError::Timeout {
                op,
                ms: self.timeout.as_millis() as u64,
            }
        } else {
            AccessError::Helper(format!("{op}: helper connection failed: {e}"))
        }
    }

    fn attempt(
        &self,
        op: &'static str,
        mut s: UnixStream,
        frame: &[u8],
        deadline: Instant,
    ) -> Result<Response, Fail> {
        let remaining = |d: Instant| {
            d.checked_duration_since(Instant::now())
                .filter(|r| !r.is_zero())
                .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
        };
        let timeout_err = |e: io::Error| {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                Fail::Other(self.io_error(op, e))
            } else {
                Fail::BeforeReply(e)
            }
        };
        let r = remaining(deadline).map_err(timeout_err)?;
        s.set_write_timeout(Some(r)).map_err(Fail::BeforeReply)?;
        s.write_all(frame).map_err(timeout_err)?;
        // Length prefix: EOF here, before any reply byte, means the helper
        // closed the connection without running the request.
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            let r = remaining(deadline).map_err(timeout_err)?;
            s.set_read_timeout(Some(r)).map_err(Fail::BeforeReply)?;
            match s.read(&mut len[got..]) {
                Ok(0) if got == 0 => {
                    return Err(Fail::BeforeReply(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "helper closed the connection",
                    )));
                }
                Ok(0) => return Err(Fail::Other(self.protocol(op, "reply truncated"))),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if got == 0 => return Err(timeout_err(e)),
                Err(e) => return Err(Fail::Other(self.io_error(op, e))),
            }
        }
        let n = u32::from_le_bytes(len) as usize;
        if n > wire::MAX_RESPONSE {
            return Err(Fail::Other(self.protocol(
                op,
                &format!("reply of {n} bytes exceeds {} bytes", wire::MAX_RESPONSE),
            )));
        }
        let mut buf = vec![0u8; n];
        let mut got = 0;
        while got < n {
            let r = remaining(deadline).map_err(|e| Fail::Other(self.io_error(op, e)))?;
            s.set_read_timeout(Some(r))
                .map_err(|e| Fail::Other(self.io_error(op, e)))?;
            match s.read(&mut buf[got..]) {
                Ok(0) => return Err(Fail::Other(self.protocol(op, "reply truncated"))),
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Fail::Other(self.io_error(op, e))),
            }
        }
        let resp = wire::decode_response(&buf)
            .map_err(|e| Fail::Other(self.protocol(op, &e.to_string())))?;
        // Only a connection whose exchange completed is in a known state.
        self.give_back(s);
        Ok(resp)
    }

    /// [`call`](Self::call) of a request for `sel` that a confined helper
    /// only serves while `sel` is watched: refused as not watched although
    /// this client watches it (the helper restarted a moment ago), the
    /// watches are sent again and the request once more.
    fn call_for(
        &self,
        op: &'static str,
        sel: &Selector,
        frame: &[u8],
    ) -> Result<Response, AccessError> {
        let r = self.call(op, frame)?;
        match &r {
            Response::Error(m) if m.contains(NOT_WATCHED) && self.watches.resend_for(sel) => {
                self.call(op, frame)
            }
            _ => Ok(r),
        }
    }

    fn protocol(&self, op: &'static str, detail: &str) -> AccessError {
        AccessError::Helper(format!("{op}: bad reply from the helper: {detail}"))
    }
}

impl Drop for HelperClient {
    fn drop(&mut self) {
        self.watches.stop.store(true, Ordering::SeqCst);
        let h = self
            .watches
            .monitor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }
}

impl WatchState {
    fn lock(&self) -> MutexGuard<'_, WatchInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One request/reply on the watch connection. Without a connection, or
    /// when it turns out broken (helper restarted), a new one is opened and
    /// every counted selector, this one included, is sent on it. A failed
    /// exchange drops the connection: the helper then drops its watches too.
    fn send(&self, g: &mut WatchInner, sel: Selector, on: bool) -> Result<(), AccessError> {
        let res = match g.conn.as_mut() {
            // No connection: the helper holds no watch of ours.
            None if !on => return Ok(()),
            None => return self.reconnect_for(g, sel),
            Some(c) => self.exchange(c, &Request::Watch(sel, on)),
        };
        match res {
            Ok(Response::Watching(_)) => Ok(()),
            Ok(Response::Error(m)) => Err(refused("watch", m)),
            Ok(r) => {
                g.conn = None;
                Err(unexpected("watch", &r))
            }
            Err(_) if on => self.reconnect_for(g, sel),
            Err(e) => {
                g.conn = None;
                Err(AccessError::Helper(format!(
                    "watch: helper connection failed: {e}"
                )))
            }
        }
    }

    /// [`reconnect`](Self::reconnect), failing only for `sel`'s own refusal.
    fn reconnect_for(&self, g: &mut WatchInner, sel: Selector) -> Result<(), AccessError> {
        let refusals = self.reconnect(g)?;
        self.resends
            .fetch_add(u64::from(g.counts.len() > 1), Ordering::Relaxed);
        let mut mine = Ok(());
        for (s, m) in refusals {
            if s == sel {
                mine = Err(refused("watch", m));
            } else {
                tracing::warn!("helper refused a watch sent again: {m}");
            }
        }
        mine
    }

    /// Opens a new watch connection and sends every counted selector on it.
    /// Selectors the helper refuses stay counted (tried again on the next
    /// reconnect) and are returned.
    fn reconnect(&self, g: &mut WatchInner) -> Result<Vec<(Selector, String)>, AccessError> {
        g.conn = None;
        let mut c = UnixStream::connect(&self.path).map_err(|e| {
            AccessError::Helper(format!(
                "watch: cannot connect to the helper at {}: {e}",
                self.path.display()
            ))
        })?;
        let mut refusals = Vec::new();
        let sels: Vec<Selector> = g.counts.keys().copied().collect();
        for sel in sels {
            match self.exchange(&mut c, &Request::Watch(sel, true)) {
                Ok(Response::Watching(_)) => {}
                Ok(Response::Error(m)) => refusals.push((sel, m)),
                Ok(r) => return Err(unexpected("watch", &r)),
                Err(e) => {
                    return Err(AccessError::Helper(format!(
                        "watch: helper connection failed: {e}"
                    )))
                }
            }
        }
        g.conn = Some(c);
        Ok(refusals)
    }

    /// Sends every watch again on a new connection if `sel` is one of
    /// them: a request for it was refused as not watched, i.e. the helper
    /// restarted and the monitor has not re-sent the watches yet.
    fn resend_for(&self, sel: &Selector) -> bool {
        let mut g = self.lock();
        if !g.counts.contains_key(sel) {
            return false;
        }
        match self.reconnect(&mut g) {
            Ok(refusals) => {
                self.resends.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    watches = g.counts.len(),
                    refused = refusals.len(),
                    "watches sent again to the helper"
                );
                refusals.iter().all(|(s, _)| s != sel)
            }
            Err(e) => {
                tracing::debug!("sending the watches again failed: {e}");
                false
            }
        }
    }

    fn exchange(&self, c: &mut UnixStream, req: &Request) -> io::Result<Response> {
        c.set_write_timeout(Some(self.timeout))?;
        c.set_read_timeout(Some(self.timeout))?;
        c.write_all(&wire::encode_request(req))?;
        let mut len = [0u8; 4];
        c.read_exact(&mut len)?;
        let n = u32::from_le_bytes(len) as usize;
        if n > 1 << 16 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("watch reply of {n} bytes"),
            ));
        }
        let mut buf = vec![0u8; n];
        c.read_exact(&mut buf)?;
        wire::decode_response(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Watches the watch connection: when the helper goes away (stopped,
    /// restarted, crashed) the connection hangs up; then reconnect — which
    /// socket-activates a new helper — and send the watches again, so Saves
    /// are served from a warm cache again without anyone re-registering.
    fn monitor(self: Arc<Self>) {
        let mut backoff = MONITOR_TICK;
        while !self.stop.load(Ordering::SeqCst) {
            let probe = {
                let g = self.lock();
                if g.counts.is_empty() {
                    None
                } else {
                    Some(g.conn.as_ref().and_then(|c| c.try_clone().ok()))
                }
            };
            match probe {
                None => std::thread::sleep(MONITOR_TICK),
                Some(Some(c)) => {
                    if hung_up(&c, MONITOR_TICK) {
                        let mut g = self.lock();
                        // Only if it is still the same connection.
                        if g.conn.as_ref().is_some_and(|x| same_socket(x, &c)) {
                            g.conn = None;
                            tracing::info!("helper connection closed; sending the watches again");
                        }
                    }
                    backoff = MONITOR_TICK;
                }
                Some(None) => {
                    let mut g = self.lock();
                    if g.conn.is_none() && !g.counts.is_empty() {
                        match self.reconnect(&mut g) {
                            Ok(refusals) => {
                                self.resends.fetch_add(1, Ordering::Relaxed);
                                tracing::info!(
                                    watches = g.counts.len(),
                                    refused = refusals.len(),
                                    "watches sent again to the helper"
                                );
                                for (_, m) in refusals {
                                    tracing::warn!("helper refused a watch sent again: {m}");
                                }
                            }
                            Err(e) => {
                                drop(g);
                                tracing::debug!("helper not back yet: {e}");
                                // In ticks, so dropping the client is prompt.
                                let until = Instant::now() + backoff;
                                while Instant::now() < until && !self.stop.load(Ordering::SeqCst) {
                                    std::thread::sleep(MONITOR_TICK);
                                }
                                backoff = (backoff * 2).min(RECONNECT_MAX);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Waits up to `wait` for the peer to hang up (it never sends unasked).
fn hung_up(c: &UnixStream, wait: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: c.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, lives across the call.
    let n = unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as libc::c_int) };
    n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Whether two handles are the same socket (one a clone of the other).
fn same_socket(a: &UnixStream, b: &UnixStream) -> bool {
    let ino = |s: &UnixStream| {
        // SAFETY: fstat on a live descriptor into a zeroed struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        (unsafe { libc::fstat(s.as_raw_fd(), &mut st) } == 0).then_some(st.st_ino)
    };
    ino(a).is_some() && ino(a) == ino(b)
}

fn refused(op: &'static str, msg: String) -> AccessError {
    AccessError::Helper(format!("helper refused {op}: {msg}"))
}

fn unexpected(op: &'static str, r: &Response) -> AccessError {
    let kind = match r {
        Response::Error(_) => "error",
        Response::Entries(_) => "entries",
        Response::Created(_) => "create report",
        Response::Deleted(_) => "delete count",
        Response::DeleteReport(_) => "delete report",
        Response::Watching(_) => "watch count",
        Response::SourcedEntries(..) => "entries",
        Response::SavedState(..) | Response::SavedStateNoted(..) => "saved state",
        Response::Warmth(_) => "warmth",
    };
    AccessError::Helper(format!("{op}: unexpected {kind} reply from the helper"))
}

/// Whether `m` is the error an older helper gives for the request `opcode`
/// it does not know (its decoder's `unknown opcode` refusal).
fn unknown_op(m: &str, opcode: u8) -> bool {
    m.ends_with(&wire::WireError::Opcode(opcode).to_string())
}

/// The trait's own save_state/delete_saved over this client's plain
/// requests: dump (the client checks the selector), encode or delete here.
/// What a helper that predates SaveState/DeleteSaved needs.
struct Plain<'a>(&'a HelperClient);

impl ConntrackAccess for Plain<'_> {
    fn dump(&self, sel: &Selector) -> Result<Vec<Entry>, AccessError> {
        self.0.dump(sel)
    }
    fn dump_sourced(&self, sel: &Selector) -> Result<(Vec<Entry>, DumpSource), AccessError> {
        self.0.dump_sourced(sel)
    }
    fn create(&self, entries: &[Entry]) -> Result<CreateReport, AccessError> {
        self.0.create(entries)
    }
    fn delete_selected(&self, sel: &Selector) -> Result<u64, AccessError> {
        self.0.delete_selected(sel)
    }
    fn delete_entries(&self, entries: &[Entry]) -> Result<DeleteReport, AccessError> {
        self.0.delete_entries(entries)
    }
}

impl HelperClient {
    /// Create or CreateBackground (`opcode`), in chunks per mark; `None`
    /// when the helper does not know the op (only CreateBackground is new,
    /// and an old helper refuses it on the first chunk, before anything was
    /// created). For callers that create entries of several marks at once
    /// (a CLI restore); a Load's restore goes through
    /// [`create_selected`](Self::create_selected).
    fn create_op(
        &self,
        opcode: u8,
        entries: &[Entry],
    ) -> Result<Option<CreateReport>, AccessError> {
        let mut report = CreateReport::default();
        for (mark, group) in by_mark(entries) {
            let sel = Selector::mark(mark);
            if super::server::validate_selector(&sel).is_err() {
                for _ in &group {
                    report.add(CreateOutcome::Refused(EPERM));
                }
                continue;
            }
            match self.create_selected(opcode, &sel, &group, report.created > 0)? {
                Some(r) => report.merge(&r),
                None => return Ok(None),
            }
        }
        Ok(Some(report))
    }

    /// Create or CreateBackground of `entries` under `sel`, the selector
    /// of the VM they are created for: the helper checks every entry
    /// against it. Entries the helper protocol cannot carry (a helper name
    /// the kernel cannot have, a tuple mixing families, reply protocol
    /// differing) are counted as refused (EINVAL) here instead of making
    /// the helper refuse their whole request, and entries `sel` does not
    /// admit as refused (EPERM): one bad entry never costs the others.
    /// `None` as for [`create_op`](Self::create_op), unless `answered`
    /// (some request of this create already succeeded).
    fn create_selected(
        &self,
        opcode: u8,
        sel: &Selector,
        entries: &[&Entry],
        mut answered: bool,
    ) -> Result<Option<CreateReport>, AccessError> {
        let name = if opcode == op::CREATE {
            "create"
        } else {
            "create-background"
        };
        let mut report = CreateReport::default();
        if super::server::validate_selector(sel).is_err() {
            for _ in entries {
                report.add(CreateOutcome::Refused(EPERM));
            }
            return Ok(Some(report));
        }
        let mut sendable: Vec<&Entry> = Vec::with_capacity(entries.len());
        for e in entries {
            if !sel.admits(e) {
                report.add(CreateOutcome::Refused(EPERM));
            } else if !wire::carriable(e) {
                report.add(CreateOutcome::Refused(EINVAL));
            } else {
                sendable.push(e);
            }
        }
        for chunk in sendable.chunks(CHUNK) {
            let frame = wire::encode_batch(opcode, sel, chunk.iter().copied());
            match self.call_for(name, sel, &frame)? {
                Response::Created(r) => {
                    report.merge(&r);
                    answered = true;
                }
                Response::Error(m) if unknown_op(&m, opcode) && !answered => return Ok(None),
                Response::Error(m) => return Err(refused(name, m)),
                r => return Err(unexpected(name, &r)),
            }
        }
        Ok(Some(report))
    }

    /// SaveStateNoted (`noted`) or SaveState; `None` when the helper does
    /// not know the op.
    fn save_state_op(
        &self,
        sel: &Selector,
        opts: &EncodeOptions,
        noted: bool,
    ) -> Result<Option<SavedState>, AccessError> {
        // Above the op's ceiling, asking for the ceiling still keeps the
        // state within the caller's limit; below the floor the helper
        // refuses with its reason.
        let limit = u32::try_from(opts.limit)
            .unwrap_or(u32::MAX)
            .min(wire::MAX_SAVE_LIMIT);
        let (req, opcode) = if noted {
            (
                Request::SaveStateNoted(*sel, limit, opts.format),
                op::SAVE_STATE_NOTED,
            )
        } else {
            (Request::SaveState(*sel, limit, opts.format), op::SAVE_STATE)
        };
        let frame = wire::encode_request(&req);
        let (source, kept, dropped, ids, bytes, notes) =
            match self.call_for("save-state", sel, &frame)? {
                Response::SavedState(source, kept, dropped, ids, bytes) => {
                    (source, kept, dropped, ids, bytes, SaveNotes::default())
                }
                Response::SavedStateNoted(source, kept, dropped, ids, bytes, notes) => {
                    (source, kept, dropped, ids, bytes, notes)
                }
                Response::Error(m) if unknown_op(&m, opcode) => return Ok(None),
                Response::Error(m) => return Err(refused("save-state", m)),
                r => return Err(unexpected("save-state", &r)),
            };
        let bad = |detail: String| self.protocol("save-state", &detail);
        if bytes.is_empty() || bytes.len() > limit as usize {
            return Err(bad(format!(
                "state of {} bytes, outside 1..={limit}",
                bytes.len()
            )));
        }
        // Every dumped entry is kept or dropped, and has at most one id.
        let total = kept
            .checked_add(dropped)
            .ok_or_else(|| bad(format!("kept {kept} + dropped {dropped} overflows")))?;
        if (ids.len() as u64) > total {
            return Err(bad(format!(
                "{} ids for {kept} kept + {dropped} dropped entries",
                ids.len()
            )));
        }
        let (Ok(kept), Ok(dropped)) = (usize::try_from(kept), usize::try_from(dropped)) else {
            return Err(bad(format!("kept {kept} / dropped {dropped} out of range")));
        };
        Ok(Some(SavedState {
            encoded: Encoded {
                bytes,
                kept,
                dropped,
            },
            source,
            ids,
            notes,
        }))
    }

    /// The helper predates WaitWarm and SaveStateNoted: remembered (until
    /// a reconnect) and said once.
    fn note_old_helper_warm(&self) {
        if !self.old_helper_warm.swap(true, Ordering::Relaxed) {
            tracing::info!(
                "the helper predates WaitWarm: Register does not wait for the warm cache, \
                 and Saves do not say why they were slow, until the helper is upgraded"
            );
        }
    }

    /// DeleteSaved of already de-duplicated ids; `None` when the helper
    /// does not know the op (then nothing was deleted).
    fn delete_saved_op(
        &self,
        sel: &Selector,
        ids: &[u32],
    ) -> Result<Option<DeleteReport>, AccessError> {
        let mut report = DeleteReport::default();
        for (i, chunk) in ids.chunks(IDS_CHUNK).enumerate() {
            let frame = wire::encode_delete_saved(sel, chunk);
            match self.call_for("delete-saved", sel, &frame)? {
                Response::DeleteReport(r) => {
                    // Each id is deleted or missing; one id may be several
                    // entries' (CTA_ID is a 32-bit hash), never more than
                    // the ids all missing.
                    let accounted = r.deleted.checked_add(r.missing);
                    if accounted.is_none_or(|n| n < chunk.len() as u64)
                        || r.missing > chunk.len() as u64
                    {
                        return Err(self.protocol(
                            "delete-saved",
                            &format!(
                                "{} deleted + {} missing for {} ids",
                                r.deleted,
                                r.missing,
                                chunk.len()
                            ),
                        ));
                    }
                    report.deleted += r.deleted;
                    report.missing += r.missing;
                }
                Response::Error(m) if i == 0 && unknown_op(&m, op::DELETE_SAVED) => {
                    return Ok(None)
                }
                Response::Error(m) => return Err(refused("delete-saved", m)),
                r => return Err(unexpected("delete-saved", &r)),
            }
        }
        Ok(Some(report))
    }
}

/// Entries grouped by mark, in first-seen order within each group, so every
/// request names exactly the one mark its entries carry.
fn by_mark(entries: &[Entry]) -> BTreeMap<u32, Vec<&Entry>> {
    let mut m: BTreeMap<u32, Vec<&Entry>> = BTreeMap::new();
    for e in entries {
        m.entry(e.mark).or_default().push(e);
    }
    m
}

impl ConntrackAccess for HelperClient {
    fn dump(&self, sel: &Selector) -> Result<Vec<Entry>, AccessError> {
        let frame = wire::encode_request(&wire::Request::Dump(*sel));
        match self.call("dump", &frame)? {
            Response::Entries(es) => {
                if let Some(e) = es.iter().find(|e| !sel.matches(e)) {
                    return Err(self.protocol(
                        "dump",
                        &format!("entry with mark {:#x} outside the selector", e.mark),
                    ));
                }
                Ok(es)
            }
            Response::Error(m) => Err(refused("dump", m)),
            r => Err(unexpected("dump", &r)),
        }
    }

    fn dump_sourced(&self, sel: &Selector) -> Result<(Vec<Entry>, DumpSource), AccessError> {
        let frame = wire::encode_request(&Request::DumpSourced(*sel));
        match self.call("dump", &frame)? {
            Response::SourcedEntries(src, es) => {
                if let Some(e) = es.iter().find(|e| !sel.matches(e)) {
                    return Err(self.protocol(
                        "dump",
                        &format!("entry with mark {:#x} outside the selector", e.mark),
                    ));
                }
                Ok((es, src))
            }
            // A helper older than the opcode (e.g. during a package
            // upgrade): a plain dump still answers the Save.
            Response::Error(m) if m.contains("unknown opcode") => {
                self.dump(sel).map(|es| (es, DumpSource::Kernel))
            }
            Response::Error(m) => Err(refused("dump", m)),
            r => Err(unexpected("dump", &r)),
        }
    }

    /// The helper dumps and encodes (from its warm cache when it has one),
    /// so only the state and the ids cross the socket, not every entry.
    /// A helper that predates the op (daemon upgraded first) gets the
    /// trait's default path: DumpSourced, then encoding here.
    fn save_state(&self, sel: &Selector, opts: &EncodeOptions) -> Result<SavedState, AccessError> {
        if !self.old_helper_warm.load(Ordering::Relaxed) {
            if let Some(saved) = self.save_state_op(sel, opts, true)? {
                return Ok(saved);
            }
            self.note_old_helper_warm();
        }
        if !self.old_helper_save.load(Ordering::Relaxed) {
            if let Some(saved) = self.save_state_op(sel, opts, false)? {
                return Ok(saved);
            }
            self.old_helper_save.store(true, Ordering::Relaxed);
            tracing::info!("the helper predates SaveState; Saves dump and encode in the daemon");
        }
        Plain(self).save_state(sel, opts)
    }

    /// One DeleteSaved request per million ids instead of shipping every
    /// entry of the selector to the daemon and back; the trait's default
    /// with a helper that predates the op.
    fn delete_saved(&self, sel: &Selector, ids: &[u32]) -> Result<DeleteReport, AccessError> {
        if !self.old_helper_delete.load(Ordering::Relaxed) {
            // Duplicates count once, as in the trait's default.
            let mut uniq = ids.to_vec();
            uniq.sort_unstable();
            uniq.dedup();
            if uniq.is_empty() {
                return Ok(DeleteReport::default());
            }
            if let Some(r) = self.delete_saved_op(sel, &uniq)? {
                return Ok(r);
            }
            self.old_helper_delete.store(true, Ordering::Relaxed);
            tracing::info!("the helper predates DeleteSaved; flushes dump into the daemon");
        }
        Plain(self).delete_saved(sel, ids)
    }

    /// The helper waits (its cache is there); the reply comes within the
    /// wait plus `WAIT_WARM_SLACK`. A helper that predates the op: at once.
    fn wait_warm(&self, sel: &Selector, timeout: Duration) -> Result<Warmth, AccessError> {
        if self.old_helper_warm.load(Ordering::Relaxed) {
            return Ok(Warmth::of(WarmState::Unknown));
        }
        let ms = u32::try_from(timeout.as_millis())
            .unwrap_or(u32::MAX)
            .min(wire::MAX_WAIT_WARM_MS);
        let frame = wire::encode_request(&Request::WaitWarm(*sel, ms));
        let within = Duration::from_millis(ms.into()) + WAIT_WARM_SLACK;
        let mut r = self.call_within("wait-warm", &frame, within)?;
        if matches!(&r, Response::Error(m) if m.contains(NOT_WATCHED))
            && self.watches.resend_for(sel)
        {
            r = self.call_within("wait-warm", &frame, within)?;
        }
        match r {
            Response::Warmth(w) => Ok(w),
            Response::Error(m) if unknown_op(&m, op::WAIT_WARM) => {
                self.note_old_helper_warm();
                Ok(Warmth::of(WarmState::Unknown))
            }
            Response::Error(m) => Err(refused("wait-warm", m)),
            r => Err(unexpected("wait-warm", &r)),
        }
    }

    /// Watches live in the helper as long as one dedicated connection stays
    /// open (pooled connections may be dropped any time); a monitor thread
    /// re-sends them when the helper restarts.
    fn watch(&self, sel: &Selector, on: bool) -> Result<(), AccessError> {
        if on {
            super::server::validate_selector(sel).map_err(|m| refused("watch", m))?;
        }
        let st = &self.watches;
        let mut g = st.lock();
        let res = if on {
            let c = g.counts.entry(*sel).or_insert(0);
            *c += 1;
            if *c > 1 {
                return Ok(());
            }
            let r = st.send(&mut g, *sel, true);
            if r.is_err() {
                // Not held by the helper: forget it, the caller knows.
                g.counts.remove(sel);
            }
            r
        } else {
            match g.counts.get_mut(sel) {
                None => return Ok(()),
                Some(c) if *c > 1 => {
                    *c -= 1;
                    return Ok(());
                }
                Some(_) => {
                    g.counts.remove(sel);
                    st.send(&mut g, *sel, false)
                }
            }
        };
        drop(g);
        if on && res.is_ok() {
            self.start_monitor();
        }
        res
    }

    fn create(&self, entries: &[Entry]) -> Result<CreateReport, AccessError> {
        self.create_op(op::CREATE, entries)?
            .ok_or_else(|| refused("create", "the helper does not know Create".into()))
    }

    /// The helper lowers the priority of the kernel work; a helper that
    /// predates the op gets plain Creates.
    fn create_background(&self, entries: &[Entry]) -> Result<CreateReport, AccessError> {
        if !self.old_helper_background.load(Ordering::Relaxed) {
            if let Some(r) = self.create_op(op::CREATE_BACKGROUND, entries)? {
                return Ok(r);
            }
            self.old_helper_background.store(true, Ordering::Relaxed);
            tracing::info!("the helper predates CreateBackground; restores use plain Creates");
        }
        self.create(entries)
    }

    /// The registration's selector goes with every request, so the helper
    /// checks each entry against the VM's own mark and zone.
    fn create_for(
        &self,
        sel: &Selector,
        entries: &[Entry],
        background: bool,
    ) -> Result<CreateReport, AccessError> {
        let refs: Vec<&Entry> = entries.iter().collect();
        if background && !self.old_helper_background.load(Ordering::Relaxed) {
            if let Some(r) = self.create_selected(op::CREATE_BACKGROUND, sel, &refs, false)? {
                return Ok(r);
            }
            self.old_helper_background.store(true, Ordering::Relaxed);
            tracing::info!("the helper predates CreateBackground; restores use plain Creates");
        }
        self.create_selected(op::CREATE, sel, &refs, false)?
            .ok_or_else(|| refused("create", "the helper does not know Create".into()))
    }

    fn delete_selected(&self, sel: &Selector) -> Result<u64, AccessError> {
        let frame = wire::encode_request(&wire::Request::DeleteSelected(*sel));
        match self.call("delete", &frame)? {
            Response::Deleted(n) => Ok(n),
            Response::Error(m) => Err(refused("delete", m)),
            r => Err(unexpected("delete", &r)),
        }
    }

    fn delete_entries(&self, entries: &[Entry]) -> Result<DeleteReport, AccessError> {
        let mut report = DeleteReport::default();
        for (mark, group) in by_mark(entries) {
            let sel = Selector::mark(mark);
            if super::server::validate_selector(&sel).is_err() {
                // Never ours to delete; report them as not deleted.
                report.missing += group.len() as u64;
                continue;
            }
            for chunk in group.chunks(CHUNK) {
                let frame = wire::encode_batch(op::DELETE_ENTRIES, &sel, chunk.iter().copied());
                match self.call("delete-entries", &frame)? {
                    Response::DeleteReport(r) => {
                        report.deleted += r.deleted;
                        report.missing += r.missing;
                    }
                    Response::Error(m) => return Err(refused("delete-entries", m)),
                    r => return Err(unexpected("delete-entries", &r)),
                }
            }
        }
        Ok(report)
    }
}

//! Helper side: accepts daemon connections on a (socket-activated) unix
//! stream socket, validates every request and runs it against a
//! [`ConntrackAccess`] (in production [`crate::ctnetlink::Ctnetlink`]).
//!
//! One thread per connection, so a slow dump for one VM never delays a
//! Save for another, and a connection that sends garbage only loses itself.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::wire::{self, Request, Response};
use std::collections::{HashMap, HashSet};

use crate::access::{AccessError, ConntrackAccess, DeleteReport, SavedState};
use crate::entry::{Entry, Selector, Tuple};
use crate::format::{EncodeOptions, Encoded, Format};

/// Tunables of [`serve`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Exit after this long with no connection open and no request in
    /// flight; systemd starts the helper again on the next connection.
    /// `None` runs until stopped. Open connections keep the helper up: the
    /// daemon holds one while it serves VMs, so a Save never pays for
    /// starting the helper (that would be migration downtime).
    pub idle_timeout: Option<Duration>,
    /// Connections served at once; more are answered with an error and
    /// closed, so a runaway client cannot exhaust threads.
    pub max_connections: usize,
    /// A frame that has started must arrive completely within this time.
    pub frame_timeout: Duration,
    /// Set (e.g. by a SIGTERM handler) to stop: no new connections, requests
    /// in flight are answered, open connections are closed between requests.
    pub stop: Option<&'static AtomicBool>,
    /// Selectors one connection may watch at once (Watch requests beyond it
    /// are refused): the daemon watches one per registered VM.
    pub max_watches_per_connection: usize,
    /// Selectors watched at once over all connections: each costs the
    /// cache's memory and a share of its refresh walks.
    pub max_watches: usize,
    /// Serve only what the daemon needs (see [`confine`]): requests name a
    /// selector some connection watches (the daemon watches each registered
    /// VM's), and DeleteSelected, which the daemon never sends, is refused.
    pub confined: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            idle_timeout: Some(Duration::from_secs(60)),
            max_connections: 64,
            frame_timeout: Duration::from_secs(30),
            stop: None,
            max_watches_per_connection: 2048,
            max_watches: 4096,
            confined: true,
        }
    }
}

/// What a finished [`serve`] did, for its exit log line and for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeSummary {
    pub connections: u64,
    pub requests: u64,
    pub rejected: u64,
}

/// How often blocked reads and the accept loop look at the stop flag.
const TICK: Duration = Duration::from_millis(200);

struct Shared {
    stop: AtomicBool,
    open: AtomicUsize,
    busy: AtomicUsize,
    /// Milliseconds since `start` of the last request start or end.
    last_activity_ms: AtomicU64,
    start: Instant,
    requests: AtomicU64,
    rejected: AtomicU64,
    /// Watches held by all connections.
    watches: AtomicUsize,
    /// Which selectors are watched, by how many connections.
    watched: Mutex<HashMap<Selector, usize>>,
}

impl Shared {
    fn watched_add(&self, sel: Selector, on: bool) {
        let mut m = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        if on {
            *m.entry(sel).or_insert(0) += 1;
        } else if let Some(n) = m.get_mut(&sel) {
            *n -= 1;
            if *n == 0 {
                m.remove(&sel);
            }
        }
    }

    fn is_watched(&self, sel: &Selector) -> bool {
        self.watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(sel)
    }
}

/// The confined helper's rule for one validated request, on its own: an
/// op the daemon uses, for a selector the daemon watches (it watches every
/// registered VM from Register to Unregister). A compromised daemon, or
/// anything else that reaches the socket, can then neither delete by an
/// arbitrary selector (`DeleteSelected(mark 1, mask 1)` would remove every
/// odd-marked entry) nor read, create or flush for a selector nobody
/// registered, without first watching it, which the journal shows.
pub fn confine(req: &Request, watched: impl Fn(&Selector) -> bool) -> Result<(), String> {
    let sel = match req {
        Request::DeleteSelected(_) => {
            return Err("not an operation the daemon uses; refused".into())
        }
        Request::Watch(..) => return Ok(()),
        Request::Dump(s)
        | Request::DumpSourced(s)
        | Request::Create(s, _)
        | Request::CreateBackground(s, _)
        | Request::SaveState(s, ..)
        | Request::SaveStateNoted(s, ..)
        | Request::WaitWarm(s, _)
        | Request::DeleteEntries(s, _)
        | Request::DeleteSaved(s, _) => s,
    };
    if watched(sel) {
        return Ok(());
    }
    Err(format!(
        "selector mark {:#x}/{:#x}{} is not watched: the helper serves only the selectors \
         of registered VMs (Watch first); refused",
        sel.mark,
        sel.mark_mask,
        sel.zone.map(|z| format!(", zone {z}")).unwrap_or_default()
    ))
}

impl Shared {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_activity_ms.load(Ordering::Relaxed)))
    }
}

/// Checks that a request only touches what it claims to. Returns the text of
/// the error reply. Nothing reaches the kernel unless this passes.
pub fn validate(req: &Request) -> Result<(), String> {
    let sel = match req {
        Request::Dump(s)
        | Request::DumpSourced(s)
        | Request::Watch(s, _)
        | Request::DeleteSelected(s)
        | Request::Create(s, _)
        | Request::CreateBackground(s, _)
        | Request::DeleteEntries(s, _)
        | Request::SaveState(s, ..)
        | Request::SaveStateNoted(s, ..)
        | Request::WaitWarm(s, _)
        | Request::DeleteSaved(s, _) => s,
    };
    validate_selector(sel)?;
    if let Request::SaveState(_, limit, _) | Request::SaveStateNoted(_, limit, _) = req {
        validate_save_limit(*limit)?;
    }
    if let Request::Create(s, entries)
    | Request::CreateBackground(s, entries)
    | Request::DeleteEntries(s, entries) = req
    {
        // Created entries must lie wholly in the selector's zone (the
        // kernel finds entries by tuple and zone, never by mark), directional
        // tuple zones included; a delete only names what it finds.
        let creates = !matches!(req, Request::DeleteEntries(..));
        for (i, e) in entries.iter().enumerate() {
            let inside = if creates { s.admits(e) } else { s.matches(e) };
            if !inside {
                return Err(format!(
                    "entry {i} (mark {:#x}, zone {}) is outside the request's selector \
                     (mark {:#x}/{:#x}{})",
                    e.mark,
                    e.zone,
                    s.mark,
                    s.mark_mask,
                    s.zone.map(|z| format!(", zone {z}")).unwrap_or_default()
                ));
            }
            if e.orig.proto != e.reply.proto {
                return Err(format!(
                    "entry {i}: reply protocol {} differs from original protocol {}",
                    e.reply.proto, e.orig.proto
                ));
            }
        }
    }
    Ok(())
}

/// A selector must pick marked entries: `mark & mark_mask == 0` would select
/// the host's own, unmarked connections (and a zero mask every entry), which
/// no VM owns.
pub fn validate_selector(s: &Selector) -> Result<(), String> {
    if s.mark & s.mark_mask == 0 {
        return Err(format!(
            "selector mark {:#x}/{:#x} would select unmarked entries; refused",
            s.mark, s.mark_mask
        ));
    }
    Ok(())
}

/// The byte limit of a SaveState: at least the smallest valid state, at
/// most [`wire::MAX_SAVE_LIMIT`] (one request must not make the helper
/// build an arbitrarily large blob).
pub fn validate_save_limit(limit: u32) -> Result<(), String> {
    if limit < wire::MIN_SAVE_LIMIT {
        return Err(format!(
            "limit {limit} is below the smallest valid state ({} bytes)",
            wire::MIN_SAVE_LIMIT
        ));
    }
    if limit > wire::MAX_SAVE_LIMIT {
        return Err(format!(
            "limit {limit} exceeds the maximum of {} bytes",
            wire::MAX_SAVE_LIMIT
        ));
    }
    Ok(())
}

/// Runs one validated request.
fn execute(req: &Request, access: &dyn ConntrackAccess) -> Response {
    let r = match req {
        Request::Dump(s) => access.dump(s).map(|mut es| {
            // Re-check the kernel's filtering: only what was asked for leaves.
            es.retain(|e| s.matches(e));
            Response::Entries(es)
        }),
        Request::Create(_, es) => access.create(es).map(Response::Created),
        Request::CreateBackground(_, es) => access.create_background(es).map(Response::Created),
        Request::DeleteSelected(s) => access.delete_selected(s).map(Response::Deleted),
        Request::DeleteEntries(s, es) => delete_owned(access, s, es).map(Response::DeleteReport),
        Request::DumpSourced(s) => access.dump_sourced(s).map(|(mut es, src)| {
            es.retain(|e| s.matches(e));
            Response::SourcedEntries(src, es)
        }),
        Request::SaveState(s, limit, format) => {
            save_state(access, s, *limit, *format).map(|r| match r {
                Response::SavedStateNoted(src, kept, dropped, ids, bytes, _) => {
                    Response::SavedState(src, kept, dropped, ids, bytes)
                }
                other => other,
            })
        }
        Request::SaveStateNoted(s, limit, format) => save_state(access, s, *limit, *format),
        // Bounded here too: one request must not hold a connection thread
        // longer than the protocol allows.
        Request::WaitWarm(s, ms) => {
            let ms = (*ms).min(wire::MAX_WAIT_WARM_MS);
            access
                .wait_warm(s, Duration::from_millis(ms.into()))
                .map(Response::Warmth)
        }
        Request::DeleteSaved(s, ids) => {
            delete_saved_owned(access, s, ids).map(Response::DeleteReport)
        }
        // Watches belong to a connection; only `connection` can run them.
        Request::Watch(..) => Ok(Response::Error(
            "watch refused: watches need a connection".into(),
        )),
    };
    r.unwrap_or_else(|e| Response::Error(e.to_string()))
}

/// Save's whole job in the helper. The blob is opaque here, so unlike a
/// Dump it cannot be re-filtered: the selector is applied by the access
/// (ctnetlink filters every dump by it, the cache keeps one table per
/// selector). Its size is checked again, since whatever the encoder did,
/// the daemon must never be handed more than it asked for. Answers
/// SavedStateNoted; the plain SaveState drops the notes.
fn save_state(
    access: &dyn ConntrackAccess,
    sel: &Selector,
    limit: u32,
    format: Format,
) -> Result<Response, AccessError> {
    let opts = EncodeOptions {
        limit: limit as usize,
        format,
    };
    let SavedState {
        encoded: Encoded {
            bytes,
            kept,
            dropped,
        },
        source,
        ids,
        notes,
    } = access.save_state(sel, &opts)?;
    if bytes.is_empty() || bytes.len() > opts.limit {
        return Ok(Response::Error(format!(
            "save-state failed: the encoder returned {} bytes, outside 1..={limit}",
            bytes.len()
        )));
    }
    if ids.len() > wire::MAX_SAVED_IDS {
        return Ok(Response::Error(format!(
            "save-state failed: {} entries exceed the limit of {} ids per reply",
            ids.len(),
            wire::MAX_SAVED_IDS
        )));
    }
    Ok(Response::SavedStateNoted(
        source,
        kept as u64,
        dropped as u64,
        ids,
        bytes,
        notes,
    ))
}

/// Deletes those of `requested` that the kernel itself files under `sel`.
///
/// The kernel deletes by tuple, zone and id and never checks the mark, so the
/// mark a request claims proves nothing: a compromised daemon could name a
/// host or other-VM connection's tuple under its own mark. The helper
/// therefore looks at the table through the selector (a mark-filtered dump)
/// and deletes only entries found there, by the kernel's own CTA_ID; the rest
/// count as missing. A requested id that differs from the kernel's is a newer
/// connection with the same tuple and is left alone as well.
fn delete_owned(
    access: &dyn ConntrackAccess,
    sel: &Selector,
    requested: &[Entry],
) -> Result<DeleteReport, AccessError> {
    let mut owned: HashMap<(Tuple, u16), Entry> = access
        .dump(sel)?
        .into_iter()
        .filter(|e| sel.matches(e))
        .map(|e| ((e.orig, e.zone), e))
        .collect();
    let mut targets = Vec::with_capacity(requested.len());
    for want in requested {
        match owned.remove(&(want.orig, want.zone)) {
            Some(cur) if want.id.is_none() || want.id == cur.id => targets.push(cur),
            _ => {}
        }
    }
    let not_owned = (requested.len() - targets.len()) as u64;
    let mut report = access.delete_entries(&targets)?;
    report.missing += not_owned;
    Ok(report)
}

/// `ConntrackAccess::delete_saved`, with the selector checked again on what
/// the access dumped (as for [`delete_owned`]): an id of another mark's
/// entry only ever counts as missing, whatever the dump returned.
fn delete_saved_owned(
    access: &dyn ConntrackAccess,
    sel: &Selector,
    ids: &[u32],
) -> Result<DeleteReport, AccessError> {
    let wanted: HashSet<u32> = ids.iter().copied().collect();
    let mut targets = access.dump(sel)?;
    targets.retain(|e| sel.matches(e) && e.id.is_some_and(|id| wanted.contains(&id)));
    let mut report = if targets.is_empty() {
        DeleteReport::default()
    } else {
        access.delete_entries(&targets)?
    };
    report.missing += crate::access::ids_not_found(&wanted, &targets);
    Ok(report)
}

/// The selectors one connection watches. Dropped with the connection, so a
/// daemon that exits or crashes never leaves the helper caching for it.
struct Watches<'a> {
    access: &'a dyn ConntrackAccess,
    sh: &'a Shared,
    max_per_connection: usize,
    max_total: usize,
    /// [`ServerConfig::confined`].
    confined: bool,
    set: std::collections::HashSet<Selector>,
    /// Asked for, but the access could not start keeping them warm (e.g.
    /// no CAP_NET_ADMIN): still the daemon's word that it serves them, so a
    /// confined helper answers their requests (with the access's own
    /// error, typically); a later Watch tries the access again.
    failed: std::collections::HashSet<Selector>,
}

impl Watches<'_> {
    fn run(&mut self, sel: Selector, on: bool) -> Response {
        let n = |w: &Self| u32::try_from(w.set.len()).unwrap_or(u32::MAX);
        if !on {
            if self.failed.remove(&sel) {
                self.sh.watches.fetch_sub(1, Ordering::SeqCst);
                self.sh.watched_add(sel, false);
            }
            if self.set.remove(&sel) {
                self.sh.watches.fetch_sub(1, Ordering::SeqCst);
                self.sh.watched_add(sel, false);
                if let Err(e) = self.access.watch(&sel, false) {
                    return Response::Error(e.to_string());
                }
            }
            return Response::Watching(n(self));
        }
        if self.set.contains(&sel) {
            return Response::Watching(n(self));
        }
        if self.failed.contains(&sel) {
            // Its reservation is held already.
            return match self.access.watch(&sel, true) {
                Ok(()) => {
                    self.failed.remove(&sel);
                    self.set.insert(sel);
                    Response::Watching(n(self))
                }
                Err(e) => Response::Error(e.to_string()),
            };
        }
        if self.set.len() + self.failed.len() >= self.max_per_connection {
            return Response::Error(format!(
                "watch refused: this connection already watches {} selectors (limit {})",
                self.set.len(),
                self.max_per_connection
            ));
        }
        // Reserve first, so concurrent connections cannot overshoot.
        if self.sh.watches.fetch_add(1, Ordering::SeqCst) >= self.max_total {
            self.sh.watches.fetch_sub(1, Ordering::SeqCst);
            return Response::Error(format!(
                "watch refused: the helper already watches {} selectors (limit {})",
                self.max_total, self.max_total
            ));
        }
        match self.access.watch(&sel, true) {
            Ok(()) => {
                self.set.insert(sel);
                self.sh.watched_add(sel, true);
                Response::Watching(n(self))
            }
            Err(e) => {
                self.failed.insert(sel);
                self.sh.watched_add(sel, true);
                Response::Error(e.to_string())
            }
        }
    }
}

impl Drop for Watches<'_> {
    fn drop(&mut self) {
        for sel in std::mem::take(&mut self.failed) {
            self.sh.watches.fetch_sub(1, Ordering::SeqCst);
            self.sh.watched_add(sel, false);
        }
        for sel in std::mem::take(&mut self.set) {
            self.sh.watches.fetch_sub(1, Ordering::SeqCst);
            self.sh.watched_add(sel, false);
            if let Err(e) = self.access.watch(&sel, false) {
                tracing::warn!("dropping a watch of a closed connection: {e}");
            }
        }
    }
}

/// Decodes, validates and runs one request payload; never panics outward.
pub fn handle(payload: &[u8], access: &dyn ConntrackAccess) -> (Response, Option<&'static str>) {
    handle_in(payload, access, None)
}

fn handle_in(
    payload: &[u8],
    access: &dyn ConntrackAccess,
    mut watches: Option<&mut Watches<'_>>,
) -> (Response, Option<&'static str>) {
    let req = match wire::decode_request(payload) {
        Ok(r) => r,
        Err(e) => return (Response::Error(format!("malformed request: {e}")), None),
    };
    let name = req.name();
    if let Err(msg) = validate(&req) {
        return (
            Response::Error(format!("{name} refused: {msg}")),
            Some(name),
        );
    }
    if let Some(w) = watches.as_deref() {
        if w.confined {
            if let Err(msg) = confine(&req, |s| w.sh.is_watched(s)) {
                return (
                    Response::Error(format!("{name} refused: {msg}")),
                    Some(name),
                );
            }
        }
    }
    // The codec below is a large piece of code handling kernel input; a bug
    // in it must cost one reply, not the helper and every other connection.
    let run = || match (&req, watches.as_deref_mut()) {
        (Request::Watch(sel, on), Some(w)) => w.run(*sel, *on),
        _ => execute(&req, access),
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(resp) => (resp, Some(name)),
        Err(_) => (
            Response::Error(format!("{name} failed: internal error in the helper")),
            Some(name),
        ),
    }
}

/// Serves `listener` until idle (see [`ServerConfig::idle_timeout`]).
pub fn serve(
    listener: UnixListener,
    access: Arc<dyn ConntrackAccess>,
    cfg: ServerConfig,
) -> io::Result<ServeSummary> {
    listener.set_nonblocking(true)?;
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        open: AtomicUsize::new(0),
        busy: AtomicUsize::new(0),
        last_activity_ms: AtomicU64::new(0),
        start: Instant::now(),
        requests: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        watches: AtomicUsize::new(0),
        watched: Mutex::new(HashMap::new()),
    });
    let threads = Mutex::new(Vec::new());
    let mut connections = 0u64;
    loop {
        let idle = cfg.idle_timeout.is_some_and(|t| {
            shared.open.load(Ordering::SeqCst) == 0
                && shared.busy.load(Ordering::SeqCst) == 0
                && shared.idle_for() >= t
        });
        if idle || cfg.stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            break;
        }
        if !wait_readable(&listener, TICK)? {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // EMFILE and friends: keep serving the connections we have.
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(TICK);
                continue;
            }
        };
        connections += 1;
        shared.touch();
        if shared.open.load(Ordering::SeqCst) >= cfg.max_connections {
            shared.rejected.fetch_add(1, Ordering::Relaxed);
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let msg = format!("too many connections (limit {})", cfg.max_connections);
            let _ = (&stream).write_all(&wire::encode_response(&Response::Error(msg)));
            continue;
        }
        shared.open.fetch_add(1, Ordering::SeqCst);
        let (sh, acc, c) = (shared.clone(), access.clone(), cfg.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("conn-{connections}"))
            .spawn(move || {
                if let Err(e) = connection(stream, &*acc, &sh, &c) {
                    tracing::debug!("connection ended: {e}");
                }
                sh.open.fetch_sub(1, Ordering::SeqCst);
                sh.touch();
            });
        match spawned {
            Ok(h) => {
                let mut t = threads.lock().unwrap_or_else(|p| p.into_inner());
                t.retain(|h: &std::thread::JoinHandle<()>| !h.is_finished());
                t.push(h);
            }
            Err(e) => {
                shared.open.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!("cannot start a connection thread: {e}");
            }
        }
    }
    shared.stop.store(true, Ordering::SeqCst);
    // Connections notice the flag within a tick between requests; a request
    // in flight (or one whose frame has started) is answered first.
    for h in threads.into_inner().unwrap_or_else(|p| p.into_inner()) {
        let _ = h.join();
    }
    Ok(ServeSummary {
        connections,
        requests: shared.requests.load(Ordering::Relaxed),
        rejected: shared.rejected.load(Ordering::Relaxed),
    })
}

fn wait_readable(l: &UnixListener, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, lives across the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(n > 0)
}

enum Read0 {
    Frame(Vec<u8>),
    /// Peer closed, or we are stopping, between frames.
    Closed,
}

/// Reads `buf` fully. `between_frames` means nothing of this frame has been
/// read yet: then a stop request or EOF ends the connection cleanly.
fn read_full(
    s: &mut UnixStream,
    buf: &mut [u8],
    between_frames: bool,
    sh: &Shared,
    frame_timeout: Duration,
) -> io::Result<bool> {
    let mut got = 0;
    let mut started: Option<Instant> = if between_frames {
        None
    } else {
        Some(Instant::now())
    };
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) if got == 0 && started.is_none() => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed mid-frame",
                ))
            }
            Ok(n) => {
                got += n;
                started.get_or_insert_with(Instant::now);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                match started {
                    None if sh.stop.load(Ordering::SeqCst) => return Ok(false),
                    None => {}
                    Some(t) if t.elapsed() > frame_timeout => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "frame not completed in time",
                        ));
                    }
                    Some(_) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn read_request(
    s: &mut UnixStream,
    sh: &Shared,
    cfg: &ServerConfig,
) -> io::Result<Result<Read0, usize>> {
    let mut len = [0u8; 4];
    if !read_full(s, &mut len, true, sh, cfg.frame_timeout)? {
        return Ok(Ok(Read0::Closed));
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > wire::MAX_REQUEST {
        return Ok(Err(n));
    }
    let mut buf = vec![0u8; n];
    read_full(s, &mut buf, false, sh, cfg.frame_timeout)?;
    Ok(Ok(Read0::Frame(buf)))
}

fn connection(
    mut s: UnixStream,
    access: &dyn ConntrackAccess,
    sh: &Shared,
    cfg: &ServerConfig,
) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(TICK))?;
    // A daemon that stops reading must not pin a helper thread forever.
    s.set_write_timeout(Some(cfg.frame_timeout))?;
    let mut watches = Watches {
        access,
        sh,
        max_per_connection: cfg.max_watches_per_connection,
        max_total: cfg.max_watches,
        confined: cfg.confined,
        failed: Default::default(),
        set: Default::default(),
    };
    loop {
        let payload = match read_request(&mut s, sh, cfg)? {
            Ok(Read0::Closed) => return Ok(()),
            Ok(Read0::Frame(p)) => p,
            Err(n) => {
                // The rest of the oversized frame is not read, so the stream
                // cannot be resynchronised: reply and close.
                let msg = format!(
                    "request of {n} bytes exceeds the limit of {} bytes",
                    wire::MAX_REQUEST
                );
                tracing::warn!("{msg}");
                s.write_all(&wire::encode_response(&Response::Error(msg)))?;
                return Ok(());
            }
        };
        sh.busy.fetch_add(1, Ordering::SeqCst);
        sh.touch();
        let t0 = Instant::now();
        let (resp, name) = handle_in(&payload, access, Some(&mut watches));
        let sel = wire::request_selector(&payload);
        drop(payload);
        let mut out = wire::encode_response(&resp);
        if out.len() - 4 > wire::MAX_RESPONSE {
            out = wire::encode_response(&Response::Error(format!(
                "reply of {} bytes exceeds the protocol limit of {} bytes",
                out.len() - 4,
                wire::MAX_RESPONSE
            )));
        }
        sh.requests.fetch_add(1, Ordering::Relaxed);
        log_request(name, sel.as_ref(), &resp, t0.elapsed());
        drop(resp);
        let w = s.write_all(&out);
        sh.busy.fetch_sub(1, Ordering::SeqCst);
        sh.touch();
        w?;
    }
}

/// One line per request, with the same bare journal fields as the daemon's
/// lines (`journalctl -u conntrack-vmstate-helper OP=save-state MARK=0x64`):
/// errors as warnings, the rest at debug level.
fn log_request(name: Option<&str>, sel: Option<&Selector>, resp: &Response, took: Duration) {
    let op = name.unwrap_or("?");
    let mark = sel.map(|s| format!("{:#x}", s.mark));
    let mask = sel.map(|s| format!("{:#x}", s.mark_mask));
    let zone = sel.and_then(|s| s.zone);
    let us = took.as_micros() as u64;
    let entries = match resp {
        Response::Entries(es) | Response::SourcedEntries(_, es) => Some(es.len() as u64),
        Response::Created(r) => Some(r.created),
        Response::Deleted(n) => Some(*n),
        Response::DeleteReport(r) => Some(r.deleted),
        Response::SavedState(_, kept, ..) | Response::SavedStateNoted(_, kept, ..) => Some(*kept),
        Response::Warmth(w) => Some(w.entries),
        Response::Error(_) | Response::Watching(_) => None,
    };
    match resp {
        Response::Error(msg) => tracing::warn!(
            OP = op,
            MARK = mark,
            MARK_MASK = mask,
            ZONE = zone,
            DURATION_US = us,
            ERROR = msg.as_str(),
            "{msg}"
        ),
        _ => tracing::debug!(
            OP = op,
            MARK = mark,
            MARK_MASK = mask,
            ZONE = zone,
            ENTRIES = entries,
            DURATION_US = us,
            "request done"
        ),
    }
}

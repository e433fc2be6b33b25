//! Daemon side: [`HelperClient`] implements [`ConntrackAccess`] by sending
//! requests to the sandboxed helper's socket.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::wire::{self, op, Response};
use crate::access::{AccessError, ConntrackAccess, CreateOutcome, CreateReport, DeleteReport};
use crate::entry::{Entry, Selector};

/// Default bound of one request, connect to reply. Below the daemon's Save
/// deadline, so a hung helper turns into an error the daemon can still
/// answer QEMU with.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Entries per Create/DeleteEntries request; well under
/// [`wire::MAX_ENTRIES`] so one request stays a few MiB.
const CHUNK: usize = 16_384;

/// Idle connections kept for reuse; more concurrent callers connect anew.
const POOL: usize = 8;

/// errno reported for entries the helper would refuse before asking the
/// kernel (mark 0 entries: see [`super::server::validate_selector`]).
const EPERM: i32 = 1;

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
}

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
        let deadline = Instant::now() + self.timeout;
        if let Some(s) = self.pooled() {
            match self.attempt(op, s, frame, deadline) {
                Ok(r) => return Ok(r),
                Err(Fail::BeforeReply(e)) => {
                    tracing::debug!("{op}: reused helper connection failed ({e}); reconnecting")
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

    fn protocol(&self, op: &'static str, detail: &str) -> AccessError {
        AccessError::Helper(format!("{op}: bad reply from the helper: {detail}"))
    }
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
    };
    AccessError::Helper(format!("{op}: unexpected {kind} reply from the helper"))
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

    fn create(&self, entries: &[Entry]) -> Result<CreateReport, AccessError> {
        let mut report = CreateReport::default();
        for (mark, group) in by_mark(entries) {
            let sel = Selector::mark(mark);
            if super::server::validate_selector(&sel).is_err() {
                for _ in &group {
                    report.add(CreateOutcome::Refused(EPERM));
                }
                continue;
            }
            for chunk in group.chunks(CHUNK) {
                let frame = wire::encode_batch(op::CREATE, &sel, chunk.iter().copied());
                match self.call("create", &frame)? {
                    Response::Created(r) => report.merge(&r),
                    Response::Error(m) => return Err(refused("create", m)),
                    r => return Err(unexpected("create", &r)),
                }
            }
        }
        Ok(report)
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

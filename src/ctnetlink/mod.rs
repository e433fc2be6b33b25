//! Native ctnetlink (NETLINK_NETFILTER) codec and socket operations.
//!
//! KERNEL_NOTES_PLACEHOLDER

mod codec;
mod consts;
mod socket;

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

pub use codec::{decode_entry, DecodeError, SETTABLE_STATUS};

use crate::access::{AccessError, ConntrackAccess, CreateOutcome, CreateReport, DeleteReport};
use crate::entry::{Entry, Selector};
use codec::{MsgBuf, NlMsg};
use consts::*;
use socket::NlSocket;

/// Messages per `send`. All their ACKs are queued before we read one, so
/// this must stay well inside the receive buffer (an ACK costs well under
/// 1 KiB of it).
const BATCH: usize = 512;
/// How long one kernel answer may take before the operation gives up.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// Restarts of a dump that the kernel flagged as interrupted or overran.
const DUMP_ATTEMPTS: usize = 8;

const CT_NEW_TYPE: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW;

/// Conntrack access over a netlink socket in one network namespace.
///
/// The socket sits behind a mutex, so one `Ctnetlink` can be shared by
/// several threads; their operations run one after another.
pub struct Ctnetlink {
    ns: File,
    inner: Mutex<Inner>,
    user_filtered: AtomicU64,
}

struct Inner {
    sock: Option<NlSocket>,
    seq: u32,
    rbuf: Vec<u8>,
    wbuf: MsgBuf,
}

fn io_err(op: &'static str, e: io::Error) -> AccessError {
    match e.raw_os_error() {
        Some(libc::EPERM) => AccessError::PermissionDenied { op },
        Some(libc::EAGAIN) => AccessError::Timeout {
            op,
            ms: RECV_TIMEOUT.as_millis() as u64,
        },
        _ => AccessError::Netlink { op, source: e },
    }
}

fn errno_err(op: &'static str, errno: i32) -> AccessError {
    io_err(op, io::Error::from_raw_os_error(errno))
}

fn proto_err(op: &'static str, detail: impl Into<String>) -> AccessError {
    AccessError::Protocol {
        op,
        detail: detail.into(),
    }
}

impl Ctnetlink {
    /// Conntrack access in the calling thread's network namespace.
    pub fn open() -> Result<Self, AccessError> {
        let ns = File::open("/proc/thread-self/ns/net").map_err(|e| io_err("open", e))?;
        Self::with_ns(ns)
    }

    /// Conntrack access in the network namespace at `path` (e.g.
    /// `/run/netns/NAME`); the calling thread stays where it is.
    pub fn open_in_netns(path: &Path) -> Result<Self, AccessError> {
        let ns = File::open(path).map_err(|e| io_err("open", e))?;
        Self::with_ns(ns)
    }

    fn with_ns(ns: File) -> Result<Self, AccessError> {
        let sock = NlSocket::open_in(&ns, RECV_TIMEOUT).map_err(|e| io_err("open", e))?;
        Ok(Ctnetlink {
            ns,
            inner: Mutex::new(Inner {
                sock: Some(sock),
                seq: 0,
                rbuf: Vec::with_capacity(1 << 16),
                wbuf: MsgBuf::with_capacity(BATCH * 256),
            }),
            user_filtered: AtomicU64::new(0),
        })
    }

    /// Entries the kernel returned that the selector re-check threw away
    /// since this handle was opened (the kernel cannot filter zone 0, or an
    /// older kernel ignored a filter attribute).
    pub fn filtered_in_user_space(&self) -> u64 {
        self.user_filtered.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic in another thread cannot leave Inner inconsistent in a way
        // that matters: the socket is reopened on the next failure.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a dump (or, with `del`, a flush) filtered by mark; calls `f` per
    /// decoded entry.
    fn dump_raw(
        &self,
        op: &'static str,
        sel: &Selector,
        mut f: impl FnMut(Entry),
    ) -> Result<(), AccessError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut attempt = 0;
        'restart: loop {
            attempt += 1;
            if attempt > DUMP_ATTEMPTS {
                return Err(proto_err(
                    op,
                    format!("dump interrupted {DUMP_ATTEMPTS} times in a row"),
                ));
            }
            let sock = socket_in(&mut inner.sock, &self.ns, op)?;
            inner.seq = inner.seq.wrapping_add(1);
            let seq = inner.seq;
            inner.wbuf.clear();
            codec::encode_filtered(
                &mut inner.wbuf,
                seq,
                sel.mark,
                sel.mark_mask,
                sel.zone,
                false,
            );
            sock.send(&inner.wbuf.buf).map_err(|e| io_err(op, e))?;
            let mut pending: Vec<Entry> = Vec::new();
            let mut first_err: Option<String> = None;
            let mut intr = false;
            loop {
                if let Err(e) = sock.recv(&mut inner.rbuf) {
                    inner.sock = None;
                    if e.raw_os_error() == Some(libc::ENOBUFS) {
                        continue 'restart;
                    }
                    return Err(io_err(op, e));
                }
                let mut done = false;
                for m in codec::messages(&inner.rbuf) {
                    let m = match m {
                        Ok(m) => m,
                        Err(e) => {
                            first_err.get_or_insert(e.0);
                            continue;
                        }
                    };
                    if m.seq != seq {
                        continue; // left over from an earlier, abandoned operation
                    }
                    if m.flags & NLM_F_DUMP_INTR != 0 {
                        intr = true;
                    }
                    match m.kind {
                        CT_NEW_TYPE => match codec::decode_entry(m.payload) {
                            Ok(e) => {
                                if !sel.matches(&e) {
                                    self.user_filtered.fetch_add(1, Ordering::Relaxed);
                                } else if e.timeout > 0 {
                                    pending.push(e);
                                }
                            }
                            Err(e) => {
                                first_err.get_or_insert(e.0);
                            }
                        },
                        NLMSG_DONE => {
                            done = true;
                            if let Ok(code) = codec::error_code(m.payload) {
                                if code != 0 {
                                    return Err(errno_err(op, code));
                                }
                            }
                        }
                        NLMSG_ERROR => {
                            let code =
                                codec::error_code(m.payload).map_err(|e| proto_err(op, e.0))?;
                            if code != 0 {
                                return Err(errno_err(op, code));
                            }
                        }
                        NLMSG_OVERRUN => {
                            inner.sock = None;
                            continue 'restart;
                        }
                        _ => {}
                    }
                }
                if done {
                    break;
                }
            }
            if let Some(detail) = first_err {
                return Err(proto_err(op, detail));
            }
            if intr {
                continue 'restart;
            }
            pending.into_iter().for_each(&mut f);
            return Ok(());
        }
    }

    /// Sends `items` in batches, one acked request each, and returns the
    /// errno of every request (0 = success) in order.
    fn batch<T>(
        &self,
        op: &'static str,
        items: &[T],
        encode: impl Fn(&mut MsgBuf, &T, u32),
    ) -> Result<Vec<i32>, AccessError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut codes = Vec::with_capacity(items.len());
        for chunk in items.chunks(BATCH) {
            let sock = socket_in(&mut inner.sock, &self.ns, op)?;
            let base = inner.seq.wrapping_add(1);
            inner.seq = inner.seq.wrapping_add(chunk.len() as u32);
            inner.wbuf.clear();
            for (i, it) in chunk.iter().enumerate() {
                encode(&mut inner.wbuf, it, base.wrapping_add(i as u32));
            }
            sock.send(&inner.wbuf.buf).map_err(|e| io_err(op, e))?;
            let mut got: Vec<Option<i32>> = vec![None; chunk.len()];
            let mut left = chunk.len();
            while left > 0 {
                if let Err(e) = sock.recv(&mut inner.rbuf) {
                    inner.sock = None;
                    return Err(io_err(op, e));
                }
                for m in codec::messages(&inner.rbuf) {
                    let m: NlMsg = m.map_err(|e| proto_err(op, e.0))?;
                    if m.kind != NLMSG_ERROR {
                        continue;
                    }
                    let code = codec::error_code(m.payload).map_err(|e| proto_err(op, e.0))?;
                    if code == libc::EPERM {
                        // nfnetlink checks CAP_NET_ADMIN once per send and
                        // answers only the first request: nothing else comes.
                        return Err(AccessError::PermissionDenied { op });
                    }
                    let idx = m.seq.wrapping_sub(base) as usize;
                    if let Some(slot @ None) = got.get_mut(idx) {
                        *slot = Some(code);
                        left -= 1;
                    }
                }
            }
            codes.extend(got.into_iter().map(|c| c.unwrap_or(0)));
        }
        Ok(codes)
    }

    /// Deletes every entry of the mark selection in one kernel-side walk.
    fn flush_by_mark(&self, sel: &Selector) -> Result<(), AccessError> {
        let codes = self.batch("flush", &[()], |m, _, seq| {
            codec::encode_filtered(m, seq, sel.mark, sel.mark_mask, None, true)
        })?;
        match codes.first() {
            Some(0) | None => Ok(()),
            Some(&c) => Err(errno_err("flush", c)),
        }
    }
}

/// The open socket, reopened in `ns` after a failure dropped it.
fn socket_in<'a>(
    slot: &'a mut Option<NlSocket>,
    ns: &File,
    op: &'static str,
) -> Result<&'a NlSocket, AccessError> {
    if slot.is_none() {
        *slot = Some(NlSocket::open_in(ns, RECV_TIMEOUT).map_err(|e| io_err(op, e))?);
    }
    slot.as_ref()
        .ok_or_else(|| proto_err(op, "socket unavailable"))
}

impl ConntrackAccess for Ctnetlink {
    fn dump(&self, sel: &Selector) -> Result<Vec<Entry>, AccessError> {
        let mut out = Vec::new();
        self.dump_raw("dump", sel, |e| out.push(e))?;
        Ok(out)
    }

    fn create(&self, entries: &[Entry]) -> Result<CreateReport, AccessError> {
        let codes = self.batch("create", entries, |m, e, seq| {
            codec::encode_create(m, e, seq)
        })?;
        let mut report = CreateReport::default();
        for c in codes {
            report.add(match c {
                0 => CreateOutcome::Created,
                libc::EEXIST => CreateOutcome::Existed,
                e => CreateOutcome::Refused(e),
            });
        }
        Ok(report)
    }

    fn delete_selected(&self, sel: &Selector) -> Result<u64, AccessError> {
        let selected = self.dump(sel)?;
        if sel.zone.is_some() {
            // The kernel cannot filter a flush by zone: delete exactly what
            // the dump selected.
            return self.delete_entries(&selected).map(|r| r.deleted);
        }
        self.flush_by_mark(sel)?;
        Ok(selected.len() as u64)
    }

    fn delete_entries(&self, entries: &[Entry]) -> Result<DeleteReport, AccessError> {
        let codes = self.batch("delete", entries, |m, e, seq| {
            codec::encode_delete(m, e, seq)
        })?;
        let mut r = DeleteReport::default();
        for c in codes {
            match c {
                0 => r.deleted += 1,
                libc::ENOENT => r.missing += 1,
                e => {
                    tracing::warn!(errno = e, "conntrack delete refused; counted as missing");
                    r.missing += 1;
                }
            }
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests;

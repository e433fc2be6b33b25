//! Native ctnetlink (NETLINK_NETFILTER) codec and socket operations.
//!
//! One raw netlink socket per [`Ctnetlink`] (behind a mutex), bound to the
//! network namespace it was opened for; messages are built and parsed by
//! hand (`codec`). conntrack(8) is never used here.
//!
//! # Dump
//! One `IPCTNL_MSG_CT_GET` dump with `AF_UNSPEC`, `CTA_MARK` and
//! `CTA_MARK_MASK`: the kernel (verified on 6.18, and the code path exists
//! since 5.x) applies the mark filter for IPv4 and IPv6 in the same pass.
//! Every entry is re-checked against the [`Selector`] in user space
//! ([`Ctnetlink::filtered_in_user_space`] counts what that threw away).
//! The zone is *not* sent to the kernel: its zone filter (`CTA_ZONE` on
//! dumps, recent kernels only) matches the zone id of either direction,
//! whereas the selector means `CTA_ZONE`; zones are selected in user space
//! after the kernel's mark filter. Entries with 0 s left are dropped. A dump
//! flagged `NLM_F_DUMP_INTR`, or one that hits `ENOBUFS`/`NLMSG_OVERRUN`, is
//! restarted on a fresh socket (at most 8 times).
//!
//! # What the kernel refuses or rewrites on create, and what we send
//! * Both tuples and `CTA_TIMEOUT` are mandatory. A clash of the original
//!   *or* the reply tuple with an existing entry is `EEXIST` → `Existed`.
//! * Status: the kernel sets `CONFIRMED` itself before it applies
//!   `CTA_STATUS` and answers `EBUSY` to any attempt to change `EXPECTED`,
//!   `CONFIRMED` or `DYING`. We always send `CONFIRMED`; `EXPECTED` and
//!   `DYING` are passed through so those entries are refused (`EBUSY`) and
//!   counted. `SEEN_REPLY`, `ASSURED`, `FIXED_TIMEOUT` are taken as sent.
//!   The kernel silently ignores the NAT bits, `*_NAT_DONE`, `SEQ_ADJUST`,
//!   `TEMPLATE`, `UNTRACKED`/`NAT_CLASH`, `OFFLOAD`, `HW_OFFLOAD` in
//!   `CTA_STATUS`: NAT bits come from `CTA_NAT_*`, `SEQ_ADJUST` from
//!   `CTA_SEQ_ADJ_*`, `HELPER` from `CTA_HELP`; `OFFLOAD`, `HW_OFFLOAD`
//!   and `NAT_CLASH` are host-local and cannot be reproduced.
//! * NAT: sending a NAT'ed reply tuple verbatim creates the entry but with
//!   no NAT bits. For any entry with a NAT or NAT_DONE bit we therefore send
//!   the un-NAT'ed reply (`orig.inverse()`) plus `CTA_NAT_DST` and
//!   `CTA_NAT_SRC`, each an exact single-address, single-port range taken
//!   from the saved reply tuple (ICMP: the id). `nf_nat_setup_info` then
//!   rewrites the reply tuple exactly as on the source, sets
//!   `SRC_NAT`/`DST_NAT` only for the direction that changed and both
//!   `*_NAT_DONE` bits (ctnetlink always sets up both manipulations; an
//!   identity range is a null binding). Exact ranges (min = max) keep the
//!   kernel from picking another port on a clash; a clash is `EEXIST`.
//!   Limit: an entry with only one `*_NAT_DONE` bit comes back with both
//!   (real traffic always passes both NAT hooks). An entry whose reply
//!   differs from the inverse but has no NAT bits is sent verbatim.
//! * TCP: the kernel zeroes the protocol state, then applies state, the
//!   per-direction flags (sent with mask 0xff, so they come back exact) and
//!   the window scale, which it applies **only if both directions carry
//!   `IP_CT_TCP_FLAG_WINDOW_SCALE`** and otherwise silently leaves at 0
//!   (which is what such a source entry had anyway). Window-tracking data
//!   (`td_end`, `td_maxwin`, …) cannot be carried: the kernel starts with
//!   `td_maxwin = 0` and picks the window up from the next packet of each
//!   direction, as for any entry made over ctnetlink. We therefore do not
//!   add `BE_LIBERAL` (it would change the entry); entries made by
//!   conntrack(8) `-I` already carry `BE_LIBERAL|SACK_PERM` and keep them.
//! * Labels: sent with an all-ones `CTA_LABELS_MASK` (replace). The kernel
//!   attaches labels only when the namespace uses connlabels (some
//!   `ct label`/`connlabel` rule); otherwise it drops them silently and
//!   the create still succeeds. All-zero labels are never dumped (`None`).
//! * Zones: `CTA_ZONE` and the directional `CTA_TUPLE_ZONE`s are carried.
//! * `CTA_HELP`: a helper this kernel lacks → `EOPNOTSUPP` → refused.
//!   ICMPv6 echo must use types 128/129; other invalid tuples → `EINVAL`.
//! * DCCP: kernels ≥ 6.16 have no DCCP tracker; such entries are generic
//!   (no ports, no protocol info) and decode as [`L4::None`](crate::entry::L4::None).
//! * Creates go 512 per `send` with `NLM_F_CREATE|NLM_F_EXCL|NLM_F_ACK`;
//!   the kernel handles the whole batch inside `send` and queues every ACK,
//!   so the receive buffer is forced to 32 MiB. Losing ACKs anyway
//!   (`ENOBUFS`) fails the call instead of guessing outcomes.
//! * `EPERM`: nfnetlink checks CAP_NET_ADMIN once per `send` and answers
//!   only the first message → [`AccessError::PermissionDenied`].
//!
//! # Delete
//! * By selector without a zone: one kernel-side flush
//!   (`IPCTNL_MSG_CT_DELETE` without tuple, `CTA_MARK`/`CTA_MARK_MASK`);
//!   the count is that of a dump taken just before (an entry created in
//!   between is deleted but not counted). With a zone: dump, then exact
//!   delete (the kernel cannot filter a flush by `CTA_ZONE`).
//! * Exact set: original tuple, `CTA_ZONE`, and `CTA_ID` when known; the
//!   kernel answers `ENOENT` when the entry is gone or its id differs (a
//!   newer entry with the same tuple) → `missing`. The mark is not checked
//!   by the kernel here; ids are host-local.

mod codec;
mod consts;
mod events;
mod socket;

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

pub use codec::{decode_entry, DecodeError, SETTABLE_STATUS};
pub use events::{
    peek_mark_id, DrainStats, EventError, EventKind, EventSink, EventSocket, EventsSysctl,
};

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

/// An errno the kernel answered with (as opposed to a failed syscall).
fn errno_err(op: &'static str, errno: i32) -> AccessError {
    if errno == libc::EPERM {
        return AccessError::PermissionDenied { op };
    }
    AccessError::Netlink {
        op,
        source: io::Error::from_raw_os_error(errno),
    }
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

    /// One dump of both address families (kernel-side mark filter when
    /// given), keeping the entries with time left that `keep` accepts.
    /// Restarted on a fresh socket when the kernel flags it interrupted or
    /// it overruns; `keep` may therefore see an entry more than once, the
    /// result holds only the last, complete walk.
    fn walk(
        &self,
        op: &'static str,
        mark_filter: Option<(u32, u32)>,
        mut keep: impl FnMut(&Entry) -> bool,
    ) -> Result<Vec<Entry>, AccessError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut out = Vec::new();
        'restart: for _ in 0..DUMP_ATTEMPTS {
            out.clear();
            let sock = socket_in(&mut inner.sock, &self.ns, op)?;
            inner.seq = inner.seq.wrapping_add(1);
            let seq = inner.seq;
            inner.wbuf.clear();
            codec::encode_dump(&mut inner.wbuf, seq, mark_filter);
            sock.send(&inner.wbuf.buf).map_err(|e| io_err(op, e))?;
            let mut intr = false;
            loop {
                if let Err(e) = sock.recv(&mut inner.rbuf) {
                    inner.sock = None;
                    if e.raw_os_error() == Some(libc::ENOBUFS) {
                        continue 'restart;
                    }
                    return Err(io_err(op, e));
                }
                match walk_datagram(&inner.rbuf, seq, &mut out, &mut keep) {
                    Ok(Walk::More { interrupted }) => intr |= interrupted,
                    Ok(Walk::Done { interrupted }) => {
                        if intr || interrupted {
                            continue 'restart;
                        }
                        return Ok(out);
                    }
                    Ok(Walk::Overrun) => {
                        inner.sock = None;
                        continue 'restart;
                    }
                    Err(e) => {
                        // The rest of this dump may still be queued; a fresh
                        // socket keeps it from answering the next request
                        // (a second dump on a socket mid-dump is EBUSY).
                        inner.sock = None;
                        return Err(e.into_access(op));
                    }
                }
            }
        }
        Err(proto_err(
            op,
            format!("dump interrupted {DUMP_ATTEMPTS} times in a row"),
        ))
    }

    /// Sends `items` in batches of [`BATCH`] requests with consecutive
    /// sequence numbers and collects exactly one answer per request, in
    /// order. `answer` classifies each message of the batch: `Some` is the
    /// answer to its request, `None` is no answer (skipped).
    fn exchange<T, A>(
        &self,
        op: &'static str,
        items: &[T],
        encode: impl Fn(&mut MsgBuf, &T, u32),
        mut answer: impl FnMut(NlMsg) -> Result<Option<A>, AccessError>,
    ) -> Result<Vec<A>, AccessError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(BATCH) {
            let sock = socket_in(&mut inner.sock, &self.ns, op)?;
            let base = inner.seq.wrapping_add(1);
            inner.seq = inner.seq.wrapping_add(chunk.len() as u32);
            inner.wbuf.clear();
            for (i, it) in chunk.iter().enumerate() {
                encode(&mut inner.wbuf, it, base.wrapping_add(i as u32));
            }
            sock.send(&inner.wbuf.buf).map_err(|e| io_err(op, e))?;
            let mut got: Vec<Option<A>> = chunk.iter().map(|_| None).collect();
            let mut left = chunk.len();
            while left > 0 {
                if let Err(e) = sock.recv(&mut inner.rbuf) {
                    inner.sock = None;
                    return Err(io_err(op, e));
                }
                for m in codec::messages(&inner.rbuf) {
                    let m: NlMsg = m.map_err(|e| proto_err(op, e.0))?;
                    // Another sequence number: left over from an earlier,
                    // abandoned operation.
                    let Some(slot @ None) = got.get_mut(m.seq.wrapping_sub(base) as usize) else {
                        continue;
                    };
                    if let Some(a) = answer(m)? {
                        *slot = Some(a);
                        left -= 1;
                    }
                }
            }
            out.extend(got.into_iter().flatten());
        }
        Ok(out)
    }

    /// Sends `items` in batches, one acked request each, and returns the
    /// errno of every request (0 = success) in order.
    fn batch<T>(
        &self,
        op: &'static str,
        items: &[T],
        encode: impl Fn(&mut MsgBuf, &T, u32),
    ) -> Result<Vec<i32>, AccessError> {
        self.exchange(op, items, encode, |m| {
            if m.kind != NLMSG_ERROR {
                return Ok(None);
            }
            let code = codec::error_code(m.payload).map_err(|e| proto_err(op, e.0))?;
            if code == libc::EPERM {
                // nfnetlink checks CAP_NET_ADMIN once per send and answers
                // only the first request: nothing else comes.
                return Err(AccessError::PermissionDenied { op });
            }
            Ok(Some(code))
        })
    }

    /// Deletes every entry of the mark selection in one kernel-side walk.
    fn flush_by_mark(&self, sel: &Selector) -> Result<(), AccessError> {
        let codes = self.batch("flush", &[()], |m, _, seq| {
            codec::encode_flush(m, seq, sel.mark, sel.mark_mask)
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

/// Where a dump stands after one datagram.
enum Walk {
    More {
        interrupted: bool,
    },
    Done {
        interrupted: bool,
    },
    /// The kernel dropped part of the answer: start over.
    Overrun,
}

/// A dump failure: a kernel errno, or an answer we could not parse.
enum WalkError {
    Errno(i32),
    Malformed(String),
}

impl WalkError {
    fn into_access(self, op: &'static str) -> AccessError {
        match self {
            WalkError::Errno(c) => errno_err(op, c),
            WalkError::Malformed(d) => proto_err(op, d),
        }
    }
}

/// Handles the messages of one datagram of dump `seq`: decoded entries
/// with time left that `keep` accepts go to `out`; messages of other
/// sequence numbers (left over from an abandoned operation) are skipped.
fn walk_datagram(
    buf: &[u8],
    seq: u32,
    out: &mut Vec<Entry>,
    keep: &mut impl FnMut(&Entry) -> bool,
) -> Result<Walk, WalkError> {
    let mut interrupted = false;
    for m in codec::messages(buf) {
        let m = m.map_err(|e| WalkError::Malformed(e.0))?;
        if m.seq != seq {
            continue;
        }
        interrupted |= m.flags & NLM_F_DUMP_INTR != 0;
        match m.kind {
            CT_NEW_TYPE => {
                let e = codec::decode_entry(m.payload).map_err(|e| WalkError::Malformed(e.0))?;
                // 0 s left: expired, the kernel just has not reaped it yet.
                if e.timeout > 0 && keep(&e) {
                    out.push(e);
                }
            }
            NLMSG_DONE => {
                // A dump that failed midway reports the errno in DONE.
                if let Ok(code @ 1..) = codec::error_code(m.payload) {
                    return Err(WalkError::Errno(code));
                }
                return Ok(Walk::Done { interrupted });
            }
            NLMSG_ERROR => {
                let code = codec::error_code(m.payload).map_err(|e| WalkError::Malformed(e.0))?;
                if code != 0 {
                    return Err(WalkError::Errno(code));
                }
            }
            NLMSG_OVERRUN => return Ok(Walk::Overrun),
            _ => {}
        }
    }
    Ok(Walk::More { interrupted })
}

/// How much lower than the caller's the priority of background work is:
/// nice +10 gives a thread about a tenth of the CPU share of a default one
/// when they compete, and the whole CPU when nothing else wants it.
pub const BACKGROUND_NICE: i32 = 10;

/// Runs `f` on a thread of its own whose nice value is [`BACKGROUND_NICE`]
/// above the caller's, and returns its result. A thread of its own, since
/// nobody can take the nice value back down without `CAP_SYS_NICE`; when
/// the priority cannot be lowered (a seccomp filter without
/// `setpriority`) or no thread can be started, `f` still runs, at the
/// normal priority.
pub fn at_low_priority<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let slot = std::sync::Mutex::new(Some(f));
    let take = || slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    std::thread::scope(|s| {
        let spawned = std::thread::Builder::new()
            .name("ct-background".into())
            .spawn_scoped(s, || {
                lower_this_thread();
                take().map(|f| f())
            });
        let ran = match spawned {
            Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            Err(e) => {
                tracing::debug!(error = %e, "no background thread; creating at normal priority");
                None
            }
        };
        match ran {
            Some(r) => r,
            // Not started: still here to run.
            None => match take() {
                Some(f) => f(),
                None => unreachable!("a started thread always takes the work"),
            },
        }
    })
}

/// Puts the calling thread under `SCHED_BATCH`: the same CPU share as a
/// default thread (so a lock it holds is released as soon as before), but
/// its wake-ups never preempt a running thread, and the scheduler treats it
/// as CPU-bound. For the thread that reads conntrack events: a restore or
/// a flush sends them at up to ~100k a second, and each of its wake-ups
/// would otherwise preempt a guest's vCPU. When the policy cannot be set (a
/// seccomp filter without `sched_setscheduler`), the thread goes on under
/// the default policy.
pub fn batch_this_thread() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall on the calling thread (pid 0) with a valid
    // parameter; the result is checked.
    let failed = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0;
    if failed {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot put the conntrack event thread under SCHED_BATCH"
        );
    }
}

/// Adds [`BACKGROUND_NICE`] to the calling thread's nice value (Linux nice
/// values are per thread).
fn lower_this_thread() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // SAFETY: plain syscalls on our own thread; errors are checked. (A
    // failed getpriority reads as -1, a valid value: then nice 9.)
    unsafe {
        let cur = libc::getpriority(libc::PRIO_PROCESS, tid);
        let failed = libc::setpriority(libc::PRIO_PROCESS, tid, cur + BACKGROUND_NICE) != 0;
        if failed {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "cannot lower the priority of background conntrack work"
            );
        }
    }
}

impl ConntrackAccess for Ctnetlink {
    fn dump(&self, sel: &Selector) -> Result<Vec<Entry>, AccessError> {
        self.walk("dump", Some((sel.mark, sel.mark_mask)), |e| {
            // The kernel filters the mark; the zone (and whatever an older
            // kernel ignored) is selected here.
            let m = sel.matches(e);
            if !m {
                self.user_filtered.fetch_add(1, Ordering::Relaxed);
            }
            m
        })
    }

    fn create_background(&self, entries: &[Entry]) -> Result<CreateReport, AccessError> {
        at_low_priority(|| self.create(entries))
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

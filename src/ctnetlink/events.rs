//! Conntrack events (NFNLGRP_CONNTRACK_NEW / UPDATE / DESTROY) and
//! single-entry lookups, for the warm cache (`crate::cache`).
//!
//! # What the kernel sends (checked against 6.18 and
//! `ctnetlink_conntrack_event`)
//! * Every event carries both tuples, `CTA_ZONE`, `CTA_ID`, `CTA_STATUS`
//!   and `CTA_MARK` whenever the mark is non-zero (an absent mark is 0).
//! * NEW and UPDATE carry `CTA_TIMEOUT`, but `CTA_PROTOINFO` only when the
//!   protocol state changed, `CTA_LABELS` only when labels changed (and not
//!   at all when they became zero), `CTA_SEQ_ADJ_*` only when they changed;
//!   `CTA_HELP` whenever the entry has a helper. A NEW from ctnetlink
//!   (`conntrack -I`, our create) has every bit set, so it is complete; a NEW
//!   made by a packet may lack the protocol info. The merge rules for partial
//!   events live in the cache.
//! * DESTROY carries tuples, id, status, mark and protocol info.
//! * Only entries that carry the event extension produce events at all. With
//!   `net.netfilter.nf_conntrack_events = 2` (the default since 5.19, and
//!   what 6.18 ships) the extension is attached at creation **only if a
//!   ctnetlink listener exists at that moment** — anywhere on the host, not
//!   only in the entry's namespace (verified on 6.18 with a listener in
//!   another namespace). Entries made without it never send UPDATE or
//!   DESTROY, not even when deleted or expired (verified: `conntrack -D` of
//!   such an entry sends nothing). With 1 every new entry gets it; with 0
//!   none does.
//! * Any ctnetlink update of an entry, even one that changes nothing, is
//!   reported as an UPDATE if the entry has the extension: a no-op update
//!   ([`Ctnetlink::touch_entries`]) tells which entries will report.
//! * Expiry produces DESTROY lazily, when the garbage collector or a lookup
//!   finds the entry (seconds later); dumps and lookups already skip it.
//!
//! Lost events: when the socket's receive queue is full the kernel drops the
//! event and the next `recv` fails with `ENOBUFS` (we never set
//! `NETLINK_NO_ENOBUFS`).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use super::codec::{self, attrs, MsgBuf};
use super::consts::*;
use super::socket::{in_netns, recv_datagram, setsockopt_int, NlSocket};
use super::{errno_err, io_err, proto_err, Ctnetlink, CT_NEW_TYPE};
use crate::access::AccessError;
use crate::entry::Entry;

const NFNLGRP_CONNTRACK_NEW: i32 = 1;
const NFNLGRP_CONNTRACK_UPDATE: i32 = 2;
const NFNLGRP_CONNTRACK_DESTROY: i32 = 3;
const NETLINK_ADD_MEMBERSHIP: i32 = 1;
const CT_DELETE_TYPE: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE;

/// What an event says about an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// NFNLGRP_CONNTRACK_NEW: the entry was confirmed.
    New,
    /// NFNLGRP_CONNTRACK_UPDATE: some attributes changed (partial).
    Update,
    /// NFNLGRP_CONNTRACK_DESTROY: the entry is gone.
    Destroy,
}

/// Where [`EventSocket::drain`] delivers events.
pub trait EventSink {
    /// Whether a message with this mark and id is worth decoding.
    fn wanted(&self, mark: u32, id: Option<u32>) -> bool;
    fn event(&mut self, kind: EventKind, entry: Entry);
}

/// Why reading events stopped.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The kernel dropped events for this socket (`ENOBUFS`): whatever was
    /// built from them can no longer be trusted.
    #[error("conntrack events were lost (receive queue overrun)")]
    Lost,
    #[error("reading conntrack events failed: {0}")]
    Io(#[source] io::Error),
}

/// What one [`EventSocket::drain`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct DrainStats {
    /// Event messages read.
    pub read: u64,
    /// Messages skipped by the cheap pre-filter (mark and id only).
    pub skipped: u64,
    /// Messages that failed to decode (counted, otherwise ignored).
    pub malformed: u64,
    /// True when the time bound stopped the drain before the queue was empty.
    pub incomplete: bool,
}

/// A NETLINK_NETFILTER socket subscribed to the conntrack event groups of
/// one network namespace. Reads never block; wait with [`EventSocket::fd`]
/// and poll(2).
pub struct EventSocket {
    sock: NlSocket,
    buf: Vec<u8>,
}

impl EventSocket {
    /// Subscribes to NEW, UPDATE and DESTROY in the namespace of `ct`, with a
    /// receive buffer of `rcvbuf` bytes (SO_RCVBUFFORCE, so it is not capped
    /// by `net.core.rmem_max`; the kernel doubles the value for overhead).
    pub fn open(ct: &Ctnetlink, rcvbuf: usize) -> Result<EventSocket, AccessError> {
        let sock =
            NlSocket::open_in(&ct.ns, Duration::from_secs(1)).map_err(|e| io_err("events", e))?;
        let fd = sock.as_raw_fd();
        let size = rcvbuf.min(i32::MAX as usize) as i32;
        if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size).is_err() {
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, size)
                .map_err(|e| io_err("events", e))?;
        }
        for group in [
            NFNLGRP_CONNTRACK_NEW,
            NFNLGRP_CONNTRACK_UPDATE,
            NFNLGRP_CONNTRACK_DESTROY,
        ] {
            setsockopt_int(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
                .map_err(|e| io_err("events", e))?;
        }
        Ok(EventSocket {
            sock,
            buf: Vec::with_capacity(1 << 16),
        })
    }

    /// The descriptor to poll for readability.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Reads every queued event without blocking, for at most `budget`.
    /// `sink.wanted(mark, id)` is asked first (from two top-level
    /// attributes, no decoding); only wanted messages are decoded and handed
    /// to `sink.event`. `Err(Lost)` means events were dropped before this
    /// call returned; events read before the error were already handed over.
    pub fn drain(
        &mut self,
        budget: Duration,
        sink: &mut impl EventSink,
    ) -> Result<DrainStats, EventError> {
        let start = Instant::now();
        let mut st = DrainStats::default();
        loop {
            if start.elapsed() > budget {
                st.incomplete = true;
                return Ok(st);
            }
            match recv_nowait(self.sock.as_raw_fd(), &mut self.buf) {
                Ok(true) => {}
                Ok(false) => return Ok(st),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Err(EventError::Lost),
                Err(e) => return Err(EventError::Io(e)),
            }
            for m in codec::messages(&self.buf) {
                let Ok(m) = m else {
                    st.malformed += 1;
                    continue;
                };
                let kind = match m.kind {
                    CT_NEW_TYPE if m.flags & NLM_F_CREATE != 0 => EventKind::New,
                    CT_NEW_TYPE => EventKind::Update,
                    CT_DELETE_TYPE => EventKind::Destroy,
                    NLMSG_OVERRUN => return Err(EventError::Lost),
                    _ => continue,
                };
                st.read += 1;
                let (mark, id) = peek_mark_id(m.payload);
                if !sink.wanted(mark, id) {
                    st.skipped += 1;
                    continue;
                }
                match codec::decode_entry(m.payload) {
                    Ok(e) => sink.event(kind, e),
                    Err(_) => st.malformed += 1,
                }
            }
        }
    }
}

/// One datagram into `buf`; `Ok(false)` when nothing is queued.
fn recv_nowait(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<bool> {
    match recv_datagram(fd, buf, libc::MSG_DONTWAIT) {
        Ok(n) => {
            if n > buf.len() {
                // An event never comes near 64 KiB; skip rather than misparse.
                buf.clear();
            }
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// `CTA_MARK` (0 when absent, as the kernel omits a zero mark) and `CTA_ID`
/// of a conntrack message, from its top-level attributes only.
pub fn peek_mark_id(payload: &[u8]) -> (u32, Option<u32>) {
    let (mut mark, mut id) = (0, None);
    let Some(body) = payload.get(NFGENMSG_LEN..) else {
        return (mark, id);
    };
    for a in attrs(body) {
        let Ok((kind, p)) = a else { break };
        match (kind, <[u8; 4]>::try_from(p)) {
            (CTA_MARK, Ok(b)) => mark = u32::from_be_bytes(b),
            (CTA_ID, Ok(b)) => id = Some(u32::from_be_bytes(b)),
            _ => {}
        }
    }
    (mark, id)
}

/// Reads `net.netfilter.nf_conntrack_events` of one namespace: the file is
/// opened from inside the namespace (sysctls under /proc/sys/net belong to
/// the opener's namespace) and re-read with pread, which stays cheap.
pub struct EventsSysctl {
    file: File,
}

impl EventsSysctl {
    pub fn open(ct: &Ctnetlink) -> io::Result<EventsSysctl> {
        let file = in_netns(&ct.ns, || {
            File::open("/proc/sys/net/netfilter/nf_conntrack_events")
        })?;
        Ok(EventsSysctl { file })
    }

    pub fn read(&self) -> io::Result<u32> {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 16];
        let n = self.file.read_at(&mut b, 0)?;
        std::str::from_utf8(&b[..n])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| io::Error::other("unreadable nf_conntrack_events value"))
    }
}

fn encode_get(m: &mut MsgBuf, e: &Entry, seq: u32) {
    let family = if e.is_ipv6() { AF_INET6 } else { AF_INET };
    m.begin_msg(IPCTNL_MSG_CT_GET, NLM_F_REQUEST, seq, family);
    if e.zone != 0 {
        m.be16(CTA_ZONE, e.zone);
    }
    m.tuple(CTA_TUPLE_ORIG, &e.orig);
    m.end_msg();
}

/// A no-op update of `e`: `CTA_MARK` 0 under `CTA_MARK_MASK` 0 keeps the
/// mark whatever it is now (new = (old & !0) ^ 0), so nothing changes and no
/// concurrent mark change can be undone; without `NLM_F_CREATE` a missing
/// entry is `ENOENT`, never created.
fn encode_touch(m: &mut MsgBuf, e: &Entry, seq: u32) {
    let family = if e.is_ipv6() { AF_INET6 } else { AF_INET };
    m.begin_msg(IPCTNL_MSG_CT_NEW, NLM_F_REQUEST | NLM_F_ACK, seq, family);
    if e.zone != 0 {
        m.be16(CTA_ZONE, e.zone);
    }
    m.tuple(CTA_TUPLE_ORIG, &e.orig);
    m.be32(CTA_MARK, 0);
    m.be32(CTA_MARK_MASK, 0);
    m.end_msg();
}

impl Ctnetlink {
    /// Applies a no-op update to each entry. The kernel reports every
    /// ctnetlink update as an UPDATE event *if the entry carries the event
    /// extension*, so a listener learns which entries will report their
    /// DESTROY. Returns the errno per entry (0, or `ENOENT` when gone).
    pub fn touch_entries(&self, entries: &[&Entry]) -> Result<Vec<i32>, AccessError> {
        self.batch("touch", entries, |m, e, seq| encode_touch(m, e, seq))
    }

    /// One dump of the whole namespace (no kernel filter), keeping only the
    /// entries `keep` accepts (and with time left): one table walk for many
    /// selectors, without holding every other entry in memory. Restarted like
    /// [`ConntrackAccess::dump`](crate::access::ConntrackAccess::dump) when
    /// the kernel flags it interrupted or it overruns.
    pub fn dump_where(&self, keep: impl Fn(&Entry) -> bool) -> Result<Vec<Entry>, AccessError> {
        self.walk("dump", None, keep)
    }

    /// A second handle on the same namespace with its own socket, so
    /// background work never queues behind (or in front of) this one's
    /// operations.
    pub fn reopen(&self) -> Result<Ctnetlink, AccessError> {
        let ns = self.ns.try_clone().map_err(|e| io_err("open", e))?;
        Ctnetlink::with_ns(ns)
    }

    /// Looks each entry up by original tuple and zone (a hash lookup in the
    /// kernel, not a table walk), batched. `None`: no such entry (gone or
    /// expired; lookups skip expired entries as dumps do).
    pub fn get_entries(&self, keys: &[&Entry]) -> Result<Vec<Option<Entry>>, AccessError> {
        let op = "get";
        // Without NLM_F_ACK every request gets exactly one answer: the
        // entry, or an error (ENOENT when there is none). Half the messages
        // of acked requests.
        self.exchange(
            op,
            keys,
            |m, e, seq| encode_get(m, e, seq),
            |m| match m.kind {
                CT_NEW_TYPE => codec::decode_entry(m.payload)
                    .map(|e| Some(Some(e)))
                    .map_err(|e| proto_err(op, e.0)),
                NLMSG_ERROR => {
                    match codec::error_code(m.payload).map_err(|e| proto_err(op, e.0))? {
                        0 | libc::ENOENT => Ok(Some(None)),
                        c => Err(errno_err(op, c)),
                    }
                }
                _ => Ok(None),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{proto, Tuple, L4};

    fn sample(mark: u32) -> Entry {
        let orig = Tuple {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: proto::UDP,
            l4: L4::Ports { src: 1, dst: 2 },
            zone: None,
        };
        Entry {
            orig,
            reply: orig.inverse(),
            status: 8,
            timeout: 30,
            mark,
            zone: 0,
            labels: None,
            protoinfo: None,
            seq_adj_orig: None,
            seq_adj_reply: None,
            helper: None,
            id: None,
        }
    }

    #[test]
    fn peek_finds_mark_and_id_without_decoding() {
        let mut m = MsgBuf::with_capacity(256);
        codec::encode_create(&mut m, &sample(0xabcd), 1);
        assert_eq!(peek_mark_id(&m.buf[NLMSG_HDRLEN..]), (0xabcd, None));
        m.clear();
        m.begin_msg(IPCTNL_MSG_CT_NEW, 0, 1, AF_INET);
        m.be32(CTA_ID, 77);
        m.end_msg();
        // No CTA_MARK: the kernel omits a zero mark.
        assert_eq!(peek_mark_id(&m.buf[NLMSG_HDRLEN..]), (0, Some(77)));
        // Garbage never panics.
        assert_eq!(peek_mark_id(&[1, 2]), (0, None));
        assert_eq!(peek_mark_id(&[0, 0, 0, 0, 9, 0, 8, 0]), (0, None));
    }
}

//! What the encoder takes: an entry or its [`Compact`] form ([`Rec`]), with
//! the seconds it has left and its priority key ([`View`]); and which
//! entries the format can carry at all ([`representable`]).

use super::layout::{l4_kind, MAX_HELPER_LEN};
use crate::entry::{Entry, ProtoInfo, Tuple};
use crate::format::priority;

/// True when `e` can be represented: both tuples of one address family,
/// one protocol and one layer-4 kind (the kernel never makes anything else).
pub fn representable(e: &Entry) -> bool {
    e.orig.src.is_ipv6() == e.orig.dst.is_ipv6()
        && e.reply.src.is_ipv6() == e.orig.src.is_ipv6()
        && e.reply.dst.is_ipv6() == e.orig.src.is_ipv6()
        && e.reply.proto == e.orig.proto
        && l4_kind(&e.orig.l4) == l4_kind(&e.reply.l4)
        && e.helper.as_ref().is_none_or(|h| h.len() <= MAX_HELPER_LEN)
}

pub(super) fn tcp_bytes(e: &Entry) -> Option<[u8; 5]> {
    match e.protoinfo {
        Some(ProtoInfo::Tcp {
            state,
            wscale_orig,
            wscale_reply,
            flags_orig,
            flags_reply,
        }) => Some([state, wscale_orig, wscale_reply, flags_orig, flags_reply]),
        _ => None,
    }
}

/// An entry whose record is fully described by a few fields: reply tuple
/// implied (no NAT), no zone, labels, SCTP/DCCP info, sequence adjustment or
/// helper — the great majority of a VM's entries. The warm cache keeps one
/// next to each such entry, so that Save reads ~60 bytes per entry instead
/// of the whole ~230-byte entry (Save is memory-bound: the tables are cold
/// by the time QEMU asks).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Compact {
    pub orig: Tuple,
    pub status: u32,
    pub mark: u32,
    pub(super) tcp: Option<[u8; 5]>,
    /// The priority class while more than ABOUT_TO_EXPIRE_SECS are left.
    class: u8,
}

impl Compact {
    /// The compact form of `e`, when it has one.
    pub fn of(e: &Entry) -> Option<Compact> {
        let simple = e.zone == 0
            && e.orig.zone.is_none()
            && e.labels.is_none()
            && matches!(e.protoinfo, None | Some(ProtoInfo::Tcp { .. }))
            && e.seq_adj_orig.is_none()
            && e.seq_adj_reply.is_none()
            && e.helper.is_none()
            && representable(e)
            && e.reply == e.orig.inverse();
        simple.then(|| Compact {
            orig: e.orig,
            status: e.status,
            mark: e.mark,
            tcp: tcp_bytes(e),
            class: priority::value_class_at(e, u32::MAX) as u8,
        })
    }

    /// Rebuilt from the parts a packed copy of [`Compact::of`]'s result
    /// kept (the warm cache stores IPv4 ones in half the space).
    pub fn from_parts(
        orig: Tuple,
        status: u32,
        mark: u32,
        tcp: Option<[u8; 5]>,
        class: u8,
    ) -> Compact {
        Compact {
            orig,
            status,
            mark,
            tcp,
            class,
        }
    }

    /// TCP state, window scales and flags, when it has protocol info.
    pub fn tcp(&self) -> Option<[u8; 5]> {
        self.tcp
    }

    /// The priority class while more than ABOUT_TO_EXPIRE_SECS are left.
    pub fn class(&self) -> u8 {
        self.class
    }

    /// [`priority::value_key_at`] of the entry with `timeout` left.
    pub fn value_key_at(&self, timeout: u32) -> u64 {
        let class = if timeout <= priority::ABOUT_TO_EXPIRE_SECS {
            0
        } else {
            self.class
        };
        (u64::from(class) << 32) | u64::from(timeout)
    }

    /// The entry this stands for, with `timeout` left and no id.
    pub fn to_entry(&self, timeout: u32) -> Entry {
        Entry {
            orig: self.orig,
            reply: self.orig.inverse(),
            status: self.status,
            timeout,
            mark: self.mark,
            zone: 0,
            labels: None,
            protoinfo: self.tcp.map(|t| ProtoInfo::Tcp {
                state: t[0],
                wscale_orig: t[1],
                wscale_reply: t[2],
                flags_orig: t[3],
                flags_reply: t[4],
            }),
            seq_adj_orig: None,
            seq_adj_reply: None,
            helper: None,
            id: None,
        }
    }
}

/// An entry to encode: the entry itself, or its [`Compact`] form.
#[derive(Debug, Clone, Copy)]
pub enum Rec<'a> {
    Full(&'a Entry),
    Fast(&'a Compact),
}

impl Rec<'_> {
    pub fn mark(&self) -> u32 {
        match self {
            Rec::Full(e) => e.mark,
            Rec::Fast(c) => c.mark,
        }
    }

    pub fn value_key_at(&self, timeout: u32) -> u64 {
        match self {
            Rec::Full(e) => priority::value_key_at(e, timeout),
            Rec::Fast(c) => c.value_key_at(timeout),
        }
    }

    pub fn representable(&self) -> bool {
        match self {
            Rec::Full(e) => representable(e),
            Rec::Fast(_) => true,
        }
    }

    /// The entry, with `timeout` left (cloned or rebuilt).
    pub fn to_entry(&self, timeout: u32) -> Entry {
        match self {
            Rec::Full(e) => Entry {
                timeout,
                ..(*e).clone()
            },
            Rec::Fast(c) => c.to_entry(timeout),
        }
    }
}

/// An entry to encode, the seconds it has left (which the encoder writes
/// instead of `entry.timeout`) and its priority key.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub rec: Rec<'a>,
    pub timeout: u32,
    /// `value_key_at(timeout)`, or [`View::EXCLUDED`] for an entry the
    /// format cannot represent. Precomputed, so that ranking reads only
    /// the views: the entries stay untouched until they are encoded.
    pub key: u64,
}

impl<'a> View<'a> {
    /// Key of an entry the encoder leaves out (not [`representable`]).
    pub const EXCLUDED: u64 = priority::EXCLUDED_KEY;

    pub fn new(rec: Rec<'a>, timeout: u32) -> Self {
        let key = if rec.representable() {
            rec.value_key_at(timeout)
        } else {
            Self::EXCLUDED
        };
        View { rec, timeout, key }
    }

    /// For callers that know the key already (the warm cache keeps each
    /// entry's priority class next to it).
    pub fn with_key(rec: Rec<'a>, timeout: u32, key: u64) -> Self {
        View { rec, timeout, key }
    }
}

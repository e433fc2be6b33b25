//! The domain model of one conntrack entry, independent of how it is read
//! (ctnetlink), carried (state format) or shown (inspect).
//!
//! Every field mirrors a ctnetlink attribute that is needed to recreate an
//! equivalent entry on another host. `Option` means "attribute absent"; the
//! distinction matters for attribute-exact round trips.

use std::net::IpAddr;

/// Bits of `CTA_STATUS` (`enum ip_conntrack_status` in the kernel UAPI).
pub mod status {
    pub const EXPECTED: u32 = 1 << 0;
    pub const SEEN_REPLY: u32 = 1 << 1;
    pub const ASSURED: u32 = 1 << 2;
    pub const CONFIRMED: u32 = 1 << 3;
    pub const SRC_NAT: u32 = 1 << 4;
    pub const DST_NAT: u32 = 1 << 5;
    pub const SEQ_ADJUST: u32 = 1 << 6;
    pub const SRC_NAT_DONE: u32 = 1 << 7;
    pub const DST_NAT_DONE: u32 = 1 << 8;
    pub const DYING: u32 = 1 << 9;
    pub const FIXED_TIMEOUT: u32 = 1 << 10;
    pub const TEMPLATE: u32 = 1 << 11;
    pub const UNTRACKED: u32 = 1 << 12;
    pub const HELPER: u32 = 1 << 13;
    pub const OFFLOAD: u32 = 1 << 14;
    pub const HW_OFFLOAD: u32 = 1 << 15;
}

/// IP protocol numbers the codec knows by name.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const DCCP: u8 = 33;
    pub const GRE: u8 = 47;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
    pub const UDPLITE: u8 = 136;
}

/// TCP conntrack states (`enum tcp_conntrack`).
pub mod tcp_state {
    pub const NONE: u8 = 0;
    pub const SYN_SENT: u8 = 1;
    pub const SYN_RECV: u8 = 2;
    pub const ESTABLISHED: u8 = 3;
    pub const FIN_WAIT: u8 = 4;
    pub const CLOSE_WAIT: u8 = 5;
    pub const LAST_ACK: u8 = 6;
    pub const TIME_WAIT: u8 = 7;
    pub const CLOSE: u8 = 8;
    pub const SYN_SENT2: u8 = 9;

    /// Names as conntrack(8) prints them, indexed by state number.
    pub const NAMES: [&str; 10] = [
        "NONE",
        "SYN_SENT",
        "SYN_RECV",
        "ESTABLISHED",
        "FIN_WAIT",
        "CLOSE_WAIT",
        "LAST_ACK",
        "TIME_WAIT",
        "CLOSE",
        "SYN_SENT2",
    ];
}

/// TCP per-direction flags in `CTA_PROTOINFO_TCP_FLAGS_*` (`IP_CT_TCP_FLAG_*`).
pub mod tcp_flag {
    pub const WINDOW_SCALE: u8 = 0x01;
    pub const SACK_PERM: u8 = 0x02;
    pub const CLOSE_INIT: u8 = 0x04;
    pub const BE_LIBERAL: u8 = 0x08;
    pub const DATA_UNACKNOWLEDGED: u8 = 0x10;
    pub const MAXACK_SET: u8 = 0x20;
    pub const EXP_CHALLENGE_ACK: u8 = 0x40;
    pub const SIMULTANEOUS_OPEN: u8 = 0x80;
}

/// Layer-4 part of a tuple (`CTA_TUPLE_PROTO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4 {
    /// TCP, UDP, UDP-Lite, SCTP, DCCP, and GRE (keys travel as ports).
    Ports { src: u16, dst: u16 },
    /// ICMP and ICMPv6 (`CTA_PROTO_ICMP*_ID/TYPE/CODE`).
    Icmp { id: u16, kind: u8, code: u8 },
    /// Any other protocol: only the protocol number is part of the tuple.
    None,
}

/// One direction's tuple (`CTA_TUPLE_ORIG` / `CTA_TUPLE_REPLY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub l4: L4,
    /// `CTA_TUPLE_ZONE`: only present for directional zones.
    pub zone: Option<u16>,
}

impl Tuple {
    /// The tuple seen from the other direction, as the kernel computes the
    /// reply tuple of an un-NATed entry.
    pub fn inverse(&self) -> Tuple {
        let l4 = match self.l4 {
            L4::Ports { src, dst } => L4::Ports { src: dst, dst: src },
            L4::Icmp { id, kind, code } => L4::Icmp {
                id,
                kind: icmp_reply_type(self.proto, kind).unwrap_or(kind),
                code,
            },
            L4::None => L4::None,
        };
        Tuple {
            src: self.dst,
            dst: self.src,
            proto: self.proto,
            l4,
            zone: self.zone,
        }
    }
}

/// Reply type of an ICMP/ICMPv6 query type, as the kernel's invert_tuple does.
pub fn icmp_reply_type(proto: u8, kind: u8) -> Option<u8> {
    match (proto, kind) {
        (proto::ICMP, 8) => Some(0),
        (proto::ICMP, 0) => Some(8),
        (proto::ICMP, 13) => Some(14),
        (proto::ICMP, 14) => Some(13),
        (proto::ICMP, 15) => Some(16),
        (proto::ICMP, 16) => Some(15),
        (proto::ICMP, 17) => Some(18),
        (proto::ICMP, 18) => Some(17),
        (proto::ICMPV6, 128) => Some(129),
        (proto::ICMPV6, 129) => Some(128),
        (proto::ICMPV6, 139) => Some(140),
        (proto::ICMPV6, 140) => Some(139),
        _ => None,
    }
}

/// Protocol-specific state (`CTA_PROTOINFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtoInfo {
    Tcp {
        state: u8,
        wscale_orig: u8,
        wscale_reply: u8,
        /// `IP_CT_TCP_FLAG_*` of the original direction.
        flags_orig: u8,
        /// `IP_CT_TCP_FLAG_*` of the reply direction.
        flags_reply: u8,
    },
    Sctp {
        state: u8,
        vtag_orig: u32,
        vtag_reply: u32,
    },
    Dccp {
        state: u8,
        role: u8,
        handshake_seq: u64,
    },
}

/// NAT sequence adjustment of one direction (`CTA_SEQ_ADJ_ORIG/REPLY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqAdj {
    pub correction_pos: u32,
    pub offset_before: i32,
    pub offset_after: i32,
}

/// One conntrack entry with everything needed to recreate it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    pub orig: Tuple,
    /// Distinct from `orig.inverse()` for NATed entries.
    pub reply: Tuple,
    /// `CTA_STATUS` bits (see [`status`]).
    pub status: u32,
    /// Remaining lifetime in seconds (`CTA_TIMEOUT`).
    pub timeout: u32,
    /// `CTA_MARK`.
    pub mark: u32,
    /// `CTA_ZONE`; 0 is the default zone.
    pub zone: u16,
    /// `CTA_LABELS`, 128 bits in kernel byte order; `None` when absent.
    pub labels: Option<[u8; 16]>,
    pub protoinfo: Option<ProtoInfo>,
    pub seq_adj_orig: Option<SeqAdj>,
    pub seq_adj_reply: Option<SeqAdj>,
    /// Name of the conntrack helper (`CTA_HELP`), e.g. "ftp". Entries that
    /// depend on a helper the destination lacks are refused there.
    pub helper: Option<String>,
    /// Kernel-assigned `CTA_ID`, host-local: never carried in the state
    /// format. Lets a flush delete exactly the saved entry and not a newer one
    /// with the same tuple.
    pub id: Option<u32>,
}

impl Entry {
    /// True for IPv6 entries.
    pub fn is_ipv6(&self) -> bool {
        self.orig.src.is_ipv6()
    }

    /// True when the reply tuple differs from the inverse of the original one
    /// (the entry is NATed).
    pub fn is_nat(&self) -> bool {
        self.reply != self.orig.inverse()
    }
}

/// Which entries a dump, flush or save selects: the kernel-side mark filter
/// (`(ct.mark & mark_mask) == mark`), optionally one zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Selector {
    pub mark: u32,
    pub mark_mask: u32,
    pub zone: Option<u16>,
}

impl Selector {
    /// Exactly this mark, any zone.
    pub fn mark(mark: u32) -> Self {
        Selector {
            mark,
            mark_mask: u32::MAX,
            zone: None,
        }
    }

    /// Whether `e` is selected; used to re-check kernel filtering and to filter
    /// events in user space.
    pub fn matches(&self, e: &Entry) -> bool {
        (e.mark & self.mark_mask) == (self.mark & self.mark_mask)
            && self.zone.is_none_or(|z| z == e.zone)
    }
}

impl Selector {
    /// Whether `e` may be *created* for this selector: its mark under the
    /// mask is the selector's, and it lives in the selector's zone (both
    /// `CTA_ZONE` and any directional tuple zone). Unlike
    /// [`matches`](Selector::matches), which picks existing entries, this is
    /// the boundary a restore must not cross: the kernel looks entries up
    /// by tuple and zone, never by mark, so an entry in another zone would
    /// answer for another tenant's packets. A selector without a zone
    /// admits any zone (it also saves every zone); hosts that separate
    /// tenants by zone register each VM's zone (docs/trust-model.md).
    pub fn admits(&self, e: &Entry) -> bool {
        let zone_ok = |z: u16| self.zone.is_none_or(|s| s == z);
        (e.mark & self.mark_mask) == (self.mark & self.mark_mask)
            && zone_ok(e.zone)
            && e.orig.zone.is_none_or(zone_ok)
            && e.reply.zone.is_none_or(zone_ok)
    }
}

//! Hand-written encoder and decoder of ctnetlink messages. Decoding borrows
//! the receive buffer and allocates only the `Entry` (and a helper name when
//! present); every length is checked, so malformed input is an error, never a
//! panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::consts::*;
use crate::entry::{proto, status, Entry, ProtoInfo, SeqAdj, Tuple, L4};

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(msg.into()))
}

/// One netlink message: header fields and its payload (after the 16-byte header).
#[derive(Debug, Clone, Copy)]
pub struct NlMsg<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// Iterates over the netlink messages of one datagram.
pub struct NlMsgs<'a> {
    buf: &'a [u8],
}

pub fn messages(buf: &[u8]) -> NlMsgs<'_> {
    NlMsgs { buf }
}

impl<'a> Iterator for NlMsgs<'a> {
    type Item = Result<NlMsg<'a>, DecodeError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        if self.buf.len() < NLMSG_HDRLEN {
            let n = self.buf.len();
            self.buf = &[];
            return Some(err(format!("truncated netlink header ({n} bytes)")));
        }
        let len = u32::from_ne_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > self.buf.len() {
            let have = self.buf.len();
            self.buf = &[];
            return Some(err(format!(
                "netlink message length {len} outside 16..={have}"
            )));
        }
        let msg = NlMsg {
            kind: u16::from_ne_bytes([self.buf[4], self.buf[5]]),
            flags: u16::from_ne_bytes([self.buf[6], self.buf[7]]),
            seq: u32::from_ne_bytes([self.buf[8], self.buf[9], self.buf[10], self.buf[11]]),
            payload: &self.buf[NLMSG_HDRLEN..len],
        };
        let next = align4(len).min(self.buf.len());
        self.buf = &self.buf[next..];
        Some(Ok(msg))
    }
}

/// The errno carried by an NLMSG_ERROR payload (0 for an ACK), positive.
pub fn error_code(payload: &[u8]) -> Result<i32, DecodeError> {
    match payload.get(..4) {
        Some(b) => Ok(-i32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
        None => err("truncated NLMSG_ERROR"),
    }
}

pub const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterates over netlink attributes: (type without flags, payload).
pub struct Attrs<'a> {
    buf: &'a [u8],
}

pub fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs { buf }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), DecodeError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        if self.buf.len() < NLA_HDRLEN {
            let n = self.buf.len();
            self.buf = &[];
            return Some(err(format!("truncated attribute header ({n} bytes left)")));
        }
        let len = u16::from_ne_bytes([self.buf[0], self.buf[1]]) as usize;
        let kind = u16::from_ne_bytes([self.buf[2], self.buf[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > self.buf.len() {
            let have = self.buf.len();
            self.buf = &[];
            return Some(err(format!(
                "attribute type {kind} has length {len}, outside 4..={have}"
            )));
        }
        let payload = &self.buf[NLA_HDRLEN..len];
        let next = align4(len).min(self.buf.len());
        self.buf = &self.buf[next..];
        Some(Ok((kind, payload)))
    }
}

fn fixed<const N: usize>(what: &str, p: &[u8]) -> Result<[u8; N], DecodeError> {
    p.get(..N)
        .and_then(|b| b.try_into().ok())
        .filter(|_| p.len() == N)
        .map_or_else(
            || err(format!("{what}: expected {N} bytes, got {}", p.len())),
            Ok,
        )
}

fn be16(what: &str, p: &[u8]) -> Result<u16, DecodeError> {
    fixed::<2>(what, p).map(u16::from_be_bytes)
}
fn be32(what: &str, p: &[u8]) -> Result<u32, DecodeError> {
    fixed::<4>(what, p).map(u32::from_be_bytes)
}
fn be64(what: &str, p: &[u8]) -> Result<u64, DecodeError> {
    fixed::<8>(what, p).map(u64::from_be_bytes)
}
fn u8_(what: &str, p: &[u8]) -> Result<u8, DecodeError> {
    fixed::<1>(what, p).map(|b| b[0])
}

fn decode_tuple(dir: &str, buf: &[u8]) -> Result<Tuple, DecodeError> {
    let (mut src, mut dst): (Option<IpAddr>, Option<IpAddr>) = (None, None);
    let mut protonum = None;
    let (mut sport, mut dport) = (None, None);
    let (mut icmp_id, mut icmp_type, mut icmp_code) = (None, None, None);
    let mut zone = None;
    for a in attrs(buf) {
        let (kind, p) = a?;
        match kind {
            CTA_TUPLE_IP => {
                for a in attrs(p) {
                    let (kind, p) = a?;
                    match kind {
                        CTA_IP_V4_SRC => {
                            src = Some(Ipv4Addr::from(fixed::<4>("ipv4 src", p)?).into())
                        }
                        CTA_IP_V4_DST => {
                            dst = Some(Ipv4Addr::from(fixed::<4>("ipv4 dst", p)?).into())
                        }
                        CTA_IP_V6_SRC => {
                            src = Some(Ipv6Addr::from(fixed::<16>("ipv6 src", p)?).into())
                        }
                        CTA_IP_V6_DST => {
                            dst = Some(Ipv6Addr::from(fixed::<16>("ipv6 dst", p)?).into())
                        }
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for a in attrs(p) {
                    let (kind, p) = a?;
                    match kind {
                        CTA_PROTO_NUM => protonum = Some(u8_("proto num", p)?),
                        CTA_PROTO_SRC_PORT => sport = Some(be16("src port", p)?),
                        CTA_PROTO_DST_PORT => dport = Some(be16("dst port", p)?),
                        CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => {
                            icmp_id = Some(be16("icmp id", p)?)
                        }
                        CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => {
                            icmp_type = Some(u8_("icmp type", p)?)
                        }
                        CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => {
                            icmp_code = Some(u8_("icmp code", p)?)
                        }
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_ZONE => zone = Some(be16("tuple zone", p)?),
            _ => {}
        }
    }
    let (Some(src), Some(dst)) = (src, dst) else {
        return err(format!(
            "{dir} tuple without source and destination address"
        ));
    };
    if src.is_ipv4() != dst.is_ipv4() {
        return err(format!("{dir} tuple mixes IPv4 and IPv6"));
    }
    let Some(protonum) = protonum else {
        return err(format!("{dir} tuple without protocol number"));
    };
    // Which key a tuple has depends on the tracker the kernel has for the
    // protocol, not on the number alone (6.16+ track DCCP generically, GRE
    // needs its module): take what the kernel sent, but insist on the keys
    // of the protocols conntrack always tracks.
    let l4 = match (sport, dport, icmp_id, icmp_type, icmp_code) {
        (Some(src), Some(dst), ..) => L4::Ports { src, dst },
        (_, _, Some(id), Some(kind), Some(code)) => L4::Icmp { id, kind, code },
        _ if matches!(
            protonum,
            proto::TCP | proto::UDP | proto::UDPLITE | proto::SCTP
        ) =>
        {
            return err(format!("{dir} tuple of protocol {protonum} without ports"));
        }
        _ if matches!(protonum, proto::ICMP | proto::ICMPV6) => {
            return err(format!("{dir} ICMP tuple without id/type/code"));
        }
        _ => L4::None,
    };
    Ok(Tuple {
        src,
        dst,
        proto: protonum,
        l4,
        zone,
    })
}

fn decode_protoinfo(buf: &[u8]) -> Result<Option<ProtoInfo>, DecodeError> {
    let mut out = None;
    for a in attrs(buf) {
        let (kind, p) = a?;
        match kind {
            CTA_PROTOINFO_TCP => {
                let (mut state, mut wo, mut wr, mut fo, mut fr) = (None, 0, 0, 0, 0);
                for a in attrs(p) {
                    let (kind, p) = a?;
                    match kind {
                        CTA_PROTOINFO_TCP_STATE => state = Some(u8_("tcp state", p)?),
                        CTA_PROTOINFO_TCP_WSCALE_ORIGINAL => wo = u8_("tcp wscale orig", p)?,
                        CTA_PROTOINFO_TCP_WSCALE_REPLY => wr = u8_("tcp wscale reply", p)?,
                        // struct nf_ct_tcp_flags { flags, mask }: only `flags` is state.
                        CTA_PROTOINFO_TCP_FLAGS_ORIGINAL => {
                            fo = fixed::<2>("tcp flags orig", p)?[0]
                        }
                        CTA_PROTOINFO_TCP_FLAGS_REPLY => fr = fixed::<2>("tcp flags reply", p)?[0],
                        _ => {}
                    }
                }
                let Some(state) = state else {
                    return err("tcp protoinfo without state");
                };
                out = Some(ProtoInfo::Tcp {
                    state,
                    wscale_orig: wo,
                    wscale_reply: wr,
                    flags_orig: fo,
                    flags_reply: fr,
                });
            }
            CTA_PROTOINFO_SCTP => {
                let (mut state, mut vo, mut vr) = (None, 0, 0);
                for a in attrs(p) {
                    let (kind, p) = a?;
                    match kind {
                        CTA_PROTOINFO_SCTP_STATE => state = Some(u8_("sctp state", p)?),
                        CTA_PROTOINFO_SCTP_VTAG_ORIGINAL => vo = be32("sctp vtag orig", p)?,
                        CTA_PROTOINFO_SCTP_VTAG_REPLY => vr = be32("sctp vtag reply", p)?,
                        _ => {}
                    }
                }
                let Some(state) = state else {
                    return err("sctp protoinfo without state");
                };
                out = Some(ProtoInfo::Sctp {
                    state,
                    vtag_orig: vo,
                    vtag_reply: vr,
                });
            }
            CTA_PROTOINFO_DCCP => {
                let (mut state, mut role, mut hs) = (None, 0, 0);
                for a in attrs(p) {
                    let (kind, p) = a?;
                    match kind {
                        CTA_PROTOINFO_DCCP_STATE => state = Some(u8_("dccp state", p)?),
                        CTA_PROTOINFO_DCCP_ROLE => role = u8_("dccp role", p)?,
                        CTA_PROTOINFO_DCCP_HANDSHAKE_SEQ => hs = be64("dccp handshake seq", p)?,
                        _ => {}
                    }
                }
                let Some(state) = state else {
                    return err("dccp protoinfo without state");
                };
                out = Some(ProtoInfo::Dccp {
                    state,
                    role,
                    handshake_seq: hs,
                });
            }
            _ => {}
        }
    }
    Ok(out)
}

fn decode_seq_adj(buf: &[u8]) -> Result<SeqAdj, DecodeError> {
    let mut s = SeqAdj {
        correction_pos: 0,
        offset_before: 0,
        offset_after: 0,
    };
    for a in attrs(buf) {
        let (kind, p) = a?;
        match kind {
            CTA_SEQADJ_CORRECTION_POS => s.correction_pos = be32("seq adj correction pos", p)?,
            CTA_SEQADJ_OFFSET_BEFORE => s.offset_before = be32("seq adj offset before", p)? as i32,
            CTA_SEQADJ_OFFSET_AFTER => s.offset_after = be32("seq adj offset after", p)? as i32,
            _ => {}
        }
    }
    Ok(s)
}

fn decode_helper(buf: &[u8]) -> Result<Option<String>, DecodeError> {
    for a in attrs(buf) {
        let (kind, p) = a?;
        if kind == CTA_HELP_NAME {
            let end = p.iter().position(|&b| b == 0).unwrap_or(p.len());
            return match std::str::from_utf8(&p[..end]) {
                Ok(s) if !s.is_empty() => Ok(Some(s.to_owned())),
                Ok(_) => Ok(None),
                Err(_) => err("helper name is not UTF-8"),
            };
        }
    }
    Ok(None)
}

/// Decodes the payload of an IPCTNL_MSG_CT_NEW message (nfgenmsg + attributes).
pub fn decode_entry(payload: &[u8]) -> Result<Entry, DecodeError> {
    let Some(body) = payload.get(NFGENMSG_LEN..) else {
        return err(format!(
            "conntrack message of {} bytes has no nfgenmsg",
            payload.len()
        ));
    };
    let (mut orig, mut reply) = (None, None);
    let mut e_status = 0;
    let mut timeout = 0;
    let mut mark = 0;
    let mut zone = 0;
    let mut labels = None;
    let mut protoinfo = None;
    let (mut sa_o, mut sa_r) = (None, None);
    let mut helper = None;
    let mut id = None;
    for a in attrs(body) {
        let (kind, p) = a?;
        match kind {
            CTA_TUPLE_ORIG => orig = Some(decode_tuple("original", p)?),
            CTA_TUPLE_REPLY => reply = Some(decode_tuple("reply", p)?),
            CTA_STATUS => e_status = be32("status", p)?,
            CTA_TIMEOUT => timeout = be32("timeout", p)?,
            CTA_MARK => mark = be32("mark", p)?,
            CTA_ZONE => zone = be16("zone", p)?,
            CTA_ID => id = Some(be32("id", p)?),
            CTA_LABELS => {
                if p.len() > 16 || p.len() % 4 != 0 {
                    return err(format!(
                        "labels of {} bytes (want a multiple of 4, ≤ 16)",
                        p.len()
                    ));
                }
                let mut l = [0u8; 16];
                l[..p.len()].copy_from_slice(p);
                // The kernel omits all-zero labels; keep absent and zero the same.
                if l != [0; 16] {
                    labels = Some(l);
                }
            }
            CTA_PROTOINFO => protoinfo = decode_protoinfo(p)?,
            CTA_SEQ_ADJ_ORIG => sa_o = Some(decode_seq_adj(p)?),
            CTA_SEQ_ADJ_REPLY => sa_r = Some(decode_seq_adj(p)?),
            CTA_HELP => helper = decode_helper(p)?,
            _ => {}
        }
    }
    let Some(orig) = orig else {
        return err("conntrack entry without original tuple");
    };
    let Some(reply) = reply else {
        return err("conntrack entry without reply tuple");
    };
    if orig.proto != reply.proto || orig.src.is_ipv4() != reply.src.is_ipv4() {
        return err("original and reply tuples disagree on protocol or family");
    }
    Ok(Entry {
        orig,
        reply,
        status: e_status,
        timeout,
        mark,
        zone,
        labels,
        protoinfo,
        seq_adj_orig: sa_o,
        seq_adj_reply: sa_r,
        helper,
        id,
    })
}

/// Builds netlink messages into one send buffer.
pub struct MsgBuf {
    pub buf: Vec<u8>,
    start: usize,
    nests: Vec<usize>,
}

impl MsgBuf {
    pub fn with_capacity(n: usize) -> Self {
        MsgBuf {
            buf: Vec::with_capacity(n),
            start: 0,
            nests: Vec::new(),
        }
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.nests.clear();
    }

    /// Starts a ctnetlink message; finish it with [`MsgBuf::end_msg`].
    pub fn begin_msg(&mut self, ct_msg: u16, flags: u16, seq: u32, family: u8) {
        self.start = self.buf.len();
        let kind = (NFNL_SUBSYS_CTNETLINK << 8) | ct_msg;
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version NFNETLINK_V0, res_id 0
        self.buf.extend_from_slice(&[family, 0, 0, 0]);
    }

    pub fn end_msg(&mut self) {
        let len = (self.buf.len() - self.start) as u32;
        self.buf[self.start..self.start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    pub fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = (NLA_HDRLEN + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        let pad = align4(self.buf.len()) - self.buf.len();
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
    }

    pub fn u8(&mut self, kind: u16, v: u8) {
        self.attr(kind, &[v]);
    }
    pub fn be16(&mut self, kind: u16, v: u16) {
        self.attr(kind, &v.to_be_bytes());
    }
    pub fn be32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_be_bytes());
    }
    pub fn be64(&mut self, kind: u16, v: u64) {
        self.attr(kind, &v.to_be_bytes());
    }

    pub fn nest(&mut self, kind: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    pub fn end_nest(&mut self) {
        if let Some(at) = self.nests.pop() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    fn ip(&mut self, v4: u16, v6: u16, a: IpAddr) {
        match a {
            IpAddr::V4(a) => self.attr(v4, &a.octets()),
            IpAddr::V6(a) => self.attr(v6, &a.octets()),
        }
    }

    pub fn tuple(&mut self, kind: u16, t: &Tuple) {
        self.nest(kind);
        self.nest(CTA_TUPLE_IP);
        self.ip(CTA_IP_V4_SRC, CTA_IP_V6_SRC, t.src);
        self.ip(CTA_IP_V4_DST, CTA_IP_V6_DST, t.dst);
        self.end_nest();
        self.nest(CTA_TUPLE_PROTO);
        self.u8(CTA_PROTO_NUM, t.proto);
        match t.l4 {
            L4::Ports { src, dst } => {
                self.be16(CTA_PROTO_SRC_PORT, src);
                self.be16(CTA_PROTO_DST_PORT, dst);
            }
            L4::Icmp { id, kind, code } => {
                let v6 = t.proto == proto::ICMPV6;
                let (i, k, c) = if v6 {
                    (
                        CTA_PROTO_ICMPV6_ID,
                        CTA_PROTO_ICMPV6_TYPE,
                        CTA_PROTO_ICMPV6_CODE,
                    )
                } else {
                    (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE)
                };
                self.be16(i, id);
                self.u8(k, kind);
                self.u8(c, code);
            }
            L4::None => {}
        }
        self.end_nest();
        if let Some(z) = t.zone {
            self.be16(CTA_TUPLE_ZONE, z);
        }
        self.end_nest();
    }

    /// One NAT manipulation as an exact single-address, single-key range, so
    /// the kernel reproduces the saved mapping and never picks another port.
    fn nat_range(&mut self, kind: u16, addr: IpAddr, key: Option<u16>) {
        self.nest(kind);
        match addr {
            IpAddr::V4(a) => {
                self.attr(CTA_NAT_V4_MINIP, &a.octets());
                self.attr(CTA_NAT_V4_MAXIP, &a.octets());
            }
            IpAddr::V6(a) => {
                self.attr(CTA_NAT_V6_MINIP, &a.octets());
                self.attr(CTA_NAT_V6_MAXIP, &a.octets());
            }
        }
        if let Some(k) = key {
            self.nest(CTA_NAT_PROTO);
            self.be16(CTA_PROTONAT_PORT_MIN, k);
            self.be16(CTA_PROTONAT_PORT_MAX, k);
            self.end_nest();
        }
        self.end_nest();
    }
}

const NAT_BITS: u32 =
    status::SRC_NAT | status::DST_NAT | status::SRC_NAT_DONE | status::DST_NAT_DONE;

/// Status bits the kernel takes from `CTA_STATUS` on create. Everything else
/// is either derived from other attributes (NAT, SEQ_ADJUST, HELPER),
/// host-local (OFFLOAD, HW_OFFLOAD, UNTRACKED/NAT_CLASH, TEMPLATE) or refused
/// (EXPECTED, DYING: EBUSY).
pub const SETTABLE_STATUS: u32 = status::SEEN_REPLY | status::ASSURED | status::FIXED_TIMEOUT;

/// Appends one IPCTNL_MSG_CT_NEW (create, exclusive, acked) for `e`.
pub fn encode_create(m: &mut MsgBuf, e: &Entry, seq: u32) {
    let family = if e.is_ipv6() { AF_INET6 } else { AF_INET };
    m.begin_msg(
        IPCTNL_MSG_CT_NEW,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
        family,
    );
    if e.zone != 0 {
        m.be16(CTA_ZONE, e.zone);
    }
    m.tuple(CTA_TUPLE_ORIG, &e.orig);
    let nat = e.status & NAT_BITS != 0;
    if nat {
        // The kernel sets SRC_NAT/DST_NAT and *_NAT_DONE only while it
        // performs NAT itself: send the un-NATed reply and the exact mapping,
        // and let nf_nat_setup_info rewrite the reply tuple as the source
        // host did.
        let mut plain = e.orig.inverse();
        plain.zone = e.reply.zone;
        m.tuple(CTA_TUPLE_REPLY, &plain);
        // What the original direction looks like after NAT.
        let post = e.reply.inverse();
        let (dkey, skey) = match (post.l4, e.orig.l4) {
            (L4::Ports { src, dst }, _) => (Some(dst), Some(src)),
            // ICMP NAT maps the id in either manipulation; DNAT runs first
            // and must keep the original id, SNAT sets the final one.
            (L4::Icmp { id, .. }, L4::Icmp { id: oid, .. }) => (Some(oid), Some(id)),
            _ => (None, None),
        };
        m.nat_range(CTA_NAT_DST, post.dst, dkey);
        m.nat_range(CTA_NAT_SRC, post.src, skey);
    } else {
        m.tuple(CTA_TUPLE_REPLY, &e.reply);
    }
    // CONFIRMED must be present (the kernel sets it before applying the
    // status and refuses to clear it); EXPECTED and DYING are sent as they
    // are so the kernel refuses those entries (EBUSY) and they are counted.
    let st = (e.status & (SETTABLE_STATUS | status::EXPECTED | status::DYING)) | status::CONFIRMED;
    m.be32(CTA_STATUS, st);
    m.be32(CTA_TIMEOUT, e.timeout);
    m.be32(CTA_MARK, e.mark);
    if let Some(l) = e.labels {
        m.attr(CTA_LABELS, &l);
        m.attr(CTA_LABELS_MASK, &[0xff; 16]);
    }
    if let Some(pi) = e.protoinfo {
        m.nest(CTA_PROTOINFO);
        match pi {
            ProtoInfo::Tcp {
                state,
                wscale_orig,
                wscale_reply,
                flags_orig,
                flags_reply,
            } => {
                m.nest(CTA_PROTOINFO_TCP);
                m.u8(CTA_PROTOINFO_TCP_STATE, state);
                m.u8(CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, wscale_orig);
                m.u8(CTA_PROTOINFO_TCP_WSCALE_REPLY, wscale_reply);
                m.attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, &[flags_orig, 0xff]);
                m.attr(CTA_PROTOINFO_TCP_FLAGS_REPLY, &[flags_reply, 0xff]);
                m.end_nest();
            }
            ProtoInfo::Sctp {
                state,
                vtag_orig,
                vtag_reply,
            } => {
                m.nest(CTA_PROTOINFO_SCTP);
                m.u8(CTA_PROTOINFO_SCTP_STATE, state);
                m.be32(CTA_PROTOINFO_SCTP_VTAG_ORIGINAL, vtag_orig);
                m.be32(CTA_PROTOINFO_SCTP_VTAG_REPLY, vtag_reply);
                m.end_nest();
            }
            ProtoInfo::Dccp {
                state,
                role,
                handshake_seq,
            } => {
                m.nest(CTA_PROTOINFO_DCCP);
                m.u8(CTA_PROTOINFO_DCCP_STATE, state);
                m.u8(CTA_PROTOINFO_DCCP_ROLE, role);
                m.be64(CTA_PROTOINFO_DCCP_HANDSHAKE_SEQ, handshake_seq);
                m.end_nest();
            }
        }
        m.end_nest();
    }
    for (kind, sa) in [
        (CTA_SEQ_ADJ_ORIG, e.seq_adj_orig),
        (CTA_SEQ_ADJ_REPLY, e.seq_adj_reply),
    ] {
        if let Some(sa) = sa {
            m.nest(kind);
            m.be32(CTA_SEQADJ_CORRECTION_POS, sa.correction_pos);
            m.be32(CTA_SEQADJ_OFFSET_BEFORE, sa.offset_before as u32);
            m.be32(CTA_SEQADJ_OFFSET_AFTER, sa.offset_after as u32);
            m.end_nest();
        }
    }
    if let Some(h) = &e.helper {
        m.nest(CTA_HELP);
        let mut name = h.as_bytes().to_vec();
        name.push(0);
        m.attr(CTA_HELP_NAME, &name);
        m.end_nest();
    }
    m.end_msg();
}

/// Appends one IPCTNL_MSG_CT_DELETE for exactly `e`: its original tuple and
/// zone, and its CTA_ID when known so a newer entry with the same tuple
/// survives.
pub fn encode_delete(m: &mut MsgBuf, e: &Entry, seq: u32) {
    let family = if e.is_ipv6() { AF_INET6 } else { AF_INET };
    m.begin_msg(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, family);
    if e.zone != 0 {
        m.be16(CTA_ZONE, e.zone);
    }
    m.tuple(CTA_TUPLE_ORIG, &e.orig);
    if let Some(id) = e.id {
        m.be32(CTA_ID, id);
    }
    m.end_msg();
}

/// A dump request for both address families at once, filtered by
/// `(mark, mask)` in the kernel when given.
pub fn encode_dump(m: &mut MsgBuf, seq: u32, mark_filter: Option<(u32, u32)>) {
    m.begin_msg(
        IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        AF_UNSPEC,
    );
    if let Some((mark, mask)) = mark_filter {
        m.be32(CTA_MARK, mark);
        m.be32(CTA_MARK_MASK, mask);
    }
    m.end_msg();
}

/// A flush of every entry with `(ct.mark & mask) == mark`, both address
/// families at once.
pub fn encode_flush(m: &mut MsgBuf, seq: u32, mark: u32, mask: u32) {
    m.begin_msg(
        IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        AF_UNSPEC,
    );
    m.be32(CTA_MARK, mark);
    m.be32(CTA_MARK_MASK, mask);
    m.end_msg();
}

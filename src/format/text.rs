//! conntrack(8) `-o save` text with ` --mark N` appended: the payload of the
//! Proxmox Perl helper (`docs/state-format.md`, "Legacy text").

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use super::{priority, Encoded, FormatError, MAX_ENTRIES};
use crate::entry::{icmp_reply_type, proto, status, tcp_state, Entry, ProtoInfo, Tuple, L4};

/// The Perl helper's "no entries" payload (QEMU rejects an empty `ay`).
pub const EMPTY_PAYLOAD: [u8; 1] = [0];

/// Status bits conntrack(8) prints (and reads back) by name.
const STATUS_NAMES: [(u32, &str); 4] = [
    (status::SEEN_REPLY, "SEEN_REPLY"),
    (status::ASSURED, "ASSURED"),
    (status::FIXED_TIMEOUT, "FIXED_TIMEOUT"),
    (status::EXPECTED, "EXPECTED"),
];

/// SCTP states by number (`enum sctp_conntrack`), as conntrack(8) prints them.
pub const SCTP_STATES: [&str; 10] = [
    "NONE",
    "CLOSED",
    "COOKIE_WAIT",
    "COOKIE_ECHOED",
    "ESTABLISHED",
    "SHUTDOWN_SENT",
    "SHUTDOWN_RECD",
    "SHUTDOWN_ACK_SENT",
    "HEARTBEAT_SENT",
    "HEARTBEAT_ACKED",
];
/// The SCTP states the text carries by name: the heartbeat states are left
/// out (written without `--state`, read back as NONE).
const SCTP_TEXT_STATES: &[&str] = SCTP_STATES.split_at(8).0;
/// DCCP states by number (`enum ct_dccp_states`).
pub const DCCP_STATES: [&str; 10] = [
    "NONE", "REQUEST", "RESPOND", "PARTOPEN", "OPEN", "CLOSEREQ", "CLOSING", "TIMEWAIT", "IGNORE",
    "INVALID",
];

/// conntrack(8)'s name of a TCP state: the kernel's names, except that it
/// prints SYN_SENT2 as "LISTEN".
fn tcp_text_name(state: u8) -> Option<&'static str> {
    if state == tcp_state::SYN_SENT2 {
        return Some("LISTEN");
    }
    tcp_state::NAMES.get(usize::from(state)).copied()
}

/// Protocols conntrack(8) knows by name, as it prints them.
pub fn proto_name(p: u8) -> Option<&'static str> {
    Some(match p {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::UDPLITE => "udplite",
        proto::ICMP => "icmp",
        proto::ICMPV6 => "icmpv6",
        proto::SCTP => "sctp",
        proto::DCCP => "dccp",
        proto::GRE => "gre",
        _ => return None,
    })
}

fn proto_by_name(s: &str) -> Option<u8> {
    Some(match s.to_ascii_lowercase().as_str() {
        "tcp" => proto::TCP,
        "udp" => proto::UDP,
        "udplite" => proto::UDPLITE,
        "icmp" => proto::ICMP,
        "icmpv6" | "ipv6-icmp" => proto::ICMPV6,
        "sctp" => proto::SCTP,
        "dccp" => proto::DCCP,
        "gre" => proto::GRE,
        _ => return s.parse().ok(),
    })
}

fn has_ports(p: u8) -> bool {
    matches!(
        p,
        proto::TCP | proto::UDP | proto::UDPLITE | proto::SCTP | proto::DCCP | proto::GRE
    )
}

/// The text of one entry, as `conntrack -L -o save` prints it plus
/// ` --mark N`, without the newline.
///
/// What the text cannot carry is left out: labels, TCP window scale and
/// flags, sequence adjustment, helper, DCCP handshake sequence. The
/// EXPECTED bit is not written: the kernel refuses it and `conntrack
/// --load-file` stops at the first refused line.
pub fn line(e: &Entry) -> String {
    let mut s = String::with_capacity(200);
    write_line(&mut s, e);
    s
}

/// Appends [`line`]`(e)` to `s`.
fn write_line(s: &mut String, e: &Entry) {
    let _ = write!(s, "-A -t {} -u ", e.timeout);
    let mut any = false;
    for (bit, name) in STATUS_NAMES {
        if e.status & bit != 0 && bit != status::EXPECTED {
            if any {
                s.push(',');
            }
            s.push_str(name);
            any = true;
        }
    }
    if !any {
        s.push_str("UNSET");
    }
    if e.zone != 0 {
        let _ = write!(s, " -w {}", e.zone);
    }
    if let Some(z) = e.orig.zone {
        let _ = write!(s, " --orig-zone {z}");
    }
    if let Some(z) = e.reply.zone {
        let _ = write!(s, " --reply-zone {z}");
    }
    let dnat = e.status & status::DST_NAT_DONE != 0 && e.reply.src != e.orig.dst;
    let snat = e.status & status::SRC_NAT_DONE != 0 && e.reply.dst != e.orig.src;
    let _ = write!(
        s,
        " -s {} -d {} {} {} {} {}",
        e.orig.src,
        e.orig.dst,
        if dnat { "-g" } else { "-r" },
        e.reply.src,
        if snat { "-n" } else { "-q" },
        e.reply.dst
    );
    let p = e.orig.proto;
    match proto_name(p) {
        Some(n) => {
            let _ = write!(s, " -p {n}");
        }
        None => {
            let _ = write!(s, " -p {p}");
        }
    }
    match (e.orig.l4, e.reply.l4) {
        (L4::Ports { src, dst }, L4::Ports { src: rs, dst: rd }) => {
            let (a, b, c, d) = if p == proto::GRE {
                ("--srckey", "--dstkey", "--reply-key-src", "--reply-key-dst")
            } else {
                ("--sport", "--dport", "--reply-port-src", "--reply-port-dst")
            };
            let _ = write!(s, " {a} {src} {b} {dst} {c} {rs} {d} {rd}");
        }
        (L4::Icmp { id, kind, code }, _) => {
            let v = if p == proto::ICMPV6 { "icmpv6" } else { "icmp" };
            let _ = write!(s, " --{v}-type {kind} --{v}-code {code} --{v}-id {id}");
        }
        _ => {}
    }
    match e.protoinfo {
        // conntrack(8) needs a TCP state to create; NONE stands in for an
        // absent or unnamed one.
        Some(ProtoInfo::Tcp { state, .. }) if p == proto::TCP => {
            let n = tcp_text_name(state).unwrap_or("NONE");
            let _ = write!(s, " --state {n}");
        }
        _ if p == proto::TCP => s.push_str(" --state NONE"),
        Some(ProtoInfo::Sctp {
            state,
            vtag_orig,
            vtag_reply,
        }) if p == proto::SCTP => {
            if let Some(n) = SCTP_TEXT_STATES.get(usize::from(state)) {
                let _ = write!(s, " --state {n}");
            }
            let _ = write!(s, " --orig-vtag {vtag_orig} --reply-vtag {vtag_reply}");
        }
        Some(ProtoInfo::Dccp { state, role, .. }) if p == proto::DCCP => {
            if let Some(n) = DCCP_STATES.get(state as usize) {
                let _ = write!(s, " --state {n}");
            }
            let _ = write!(s, " --role {}", if role == 1 { "server" } else { "client" });
        }
        _ => {}
    }
    let _ = write!(s, " --mark {}", e.mark);
}

/// Lines most valuable first, each ending in `\n`, cut before the first
/// line that would cross `limit`; `[0]` when none fit or there are none.
pub fn encode(entries: &[Entry], limit: usize) -> Result<Encoded, FormatError> {
    if limit < EMPTY_PAYLOAD.len() {
        return Err(FormatError::LimitTooSmall {
            limit,
            min: EMPTY_PAYLOAD.len(),
            format: "conntrack-save",
        });
    }
    // Lines go straight into the output; the one that crosses the limit
    // is cut off again.
    let mut out = String::with_capacity(limit.min(entries.len().saturating_mul(200)));
    let mut kept = 0usize;
    for i in priority::ranked_indices(entries, |_| true) {
        let Some(e) = entries.get(i as usize) else {
            break;
        };
        let start = out.len();
        write_line(&mut out, e);
        out.push('\n');
        if out.len() > limit {
            out.truncate(start);
            break;
        }
        kept += 1;
    }
    let mut out = out.into_bytes();
    if out.is_empty() {
        out.extend_from_slice(&EMPTY_PAYLOAD);
    }
    Ok(Encoded {
        bytes: out,
        kept,
        dropped: entries.len().saturating_sub(kept),
    })
}

/// Whether `bytes` should be parsed as conntrack text.
pub fn looks_like_text(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'-')
}

/// Parses every line; one bad line rejects the whole text.
pub fn decode(bytes: &[u8]) -> Result<Vec<Entry>, FormatError> {
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let n = i + 1;
        let text = std::str::from_utf8(raw).map_err(|_| FormatError::BadTextLine {
            line: n,
            reason: "not UTF-8".into(),
            text: String::from_utf8_lossy(raw).into_owned(),
        })?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        if out.len() >= MAX_ENTRIES {
            return Err(FormatError::TooManyEntries {
                count: out.len() as u64 + 1,
                max: MAX_ENTRIES,
            });
        }
        let e = parse_line(text).map_err(|reason| FormatError::BadTextLine {
            line: n,
            reason,
            text: text.to_owned(),
        })?;
        out.push(e);
    }
    Ok(out)
}

fn num<T: TryFrom<u64>>(opt: &str, v: &str) -> Result<T, String> {
    let parsed = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        v.parse::<u64>().ok()
    };
    parsed
        .and_then(|x| T::try_from(x).ok())
        .ok_or_else(|| format!("{opt}: invalid number {v:?}"))
}

fn addr(opt: &str, v: &str) -> Result<IpAddr, String> {
    v.parse()
        .map_err(|_| format!("{opt}: invalid address {v:?}"))
}

/// Address with an optional port, as `--src-nat`/`--dst-nat` take it.
fn nat_addr(opt: &str, v: &str) -> Result<(IpAddr, Option<u16>), String> {
    if let Ok(a) = v.parse::<IpAddr>() {
        return Ok((a, None));
    }
    v.parse::<SocketAddr>()
        .map(|s| (s.ip(), Some(s.port())))
        .map_err(|_| format!("{opt}: invalid address {v:?}"))
}

#[derive(Default)]
struct Parsed {
    timeout: Option<u32>,
    status: u32,
    zone: Option<u16>,
    orig_zone: Option<u16>,
    reply_zone: Option<u16>,
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    rsrc: Option<IpAddr>,
    rdst: Option<IpAddr>,
    dnat: bool,
    snat: bool,
    dnat_port: Option<u16>,
    snat_port: Option<u16>,
    family: Option<bool>,
    proto: Option<u8>,
    sport: Option<u16>,
    dport: Option<u16>,
    rsport: Option<u16>,
    rdport: Option<u16>,
    icmp_type: Option<u8>,
    icmp_code: Option<u8>,
    icmp_id: Option<u16>,
    state: Option<String>,
    vtag_orig: Option<u32>,
    vtag_reply: Option<u32>,
    role: Option<u8>,
    mark: Option<u32>,
    labels: Option<[u8; 16]>,
}

/// One line of `-o save` text (`-A`/`-I` command first) into an entry.
pub fn parse_line(text: &str) -> Result<Entry, String> {
    let mut it = text.split_ascii_whitespace();
    match it.next() {
        Some("-A" | "-I" | "--create") => {}
        Some(c) => return Err(format!("expected -A or -I first, found {c:?}")),
        None => return Err("empty line".into()),
    }
    let mut p = Parsed::default();
    while let Some(opt) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{opt} needs a value"));
        match opt {
            "-t" | "--timeout" => p.timeout = Some(num(opt, val()?)?),
            "-u" | "--status" => p.status |= parse_status(val()?)?,
            "-c" | "--secmark" => {
                // Not carried: ctnetlink cannot set a secmark on create.
                let _: u32 = num(opt, val()?)?;
            }
            "-w" | "--zone" => p.zone = Some(num(opt, val()?)?),
            "--orig-zone" => p.orig_zone = Some(num(opt, val()?)?),
            "--reply-zone" => p.reply_zone = Some(num(opt, val()?)?),
            "-s" | "--src" | "--orig-src" => p.src = Some(addr(opt, val()?)?),
            "-d" | "--dst" | "--orig-dst" => p.dst = Some(addr(opt, val()?)?),
            "-r" | "--reply-src" => p.rsrc = Some(addr(opt, val()?)?),
            "-q" | "--reply-dst" => p.rdst = Some(addr(opt, val()?)?),
            "-g" | "--dst-nat" => {
                let (a, port) = nat_addr(opt, val()?)?;
                p.rsrc = Some(a);
                p.dnat = true;
                p.dnat_port = port;
            }
            "-n" | "--src-nat" => {
                let (a, port) = nat_addr(opt, val()?)?;
                p.rdst = Some(a);
                p.snat = true;
                p.snat_port = port;
            }
            "-f" | "--family" => {
                p.family = Some(match val()? {
                    "ipv4" => false,
                    "ipv6" => true,
                    v => return Err(format!("{opt}: unknown family {v:?}")),
                })
            }
            "-p" | "--protonum" => {
                let v = val()?;
                p.proto =
                    Some(proto_by_name(v).ok_or_else(|| format!("{opt}: unknown protocol {v:?}"))?)
            }
            "--sport" | "--orig-port-src" | "--srckey" | "--orig-key-src" => {
                p.sport = Some(num(opt, val()?)?)
            }
            "--dport" | "--orig-port-dst" | "--dstkey" | "--orig-key-dst" => {
                p.dport = Some(num(opt, val()?)?)
            }
            "--reply-port-src" | "--reply-key-src" => p.rsport = Some(num(opt, val()?)?),
            "--reply-port-dst" | "--reply-key-dst" => p.rdport = Some(num(opt, val()?)?),
            "--icmp-type" | "--icmpv6-type" => p.icmp_type = Some(num(opt, val()?)?),
            "--icmp-code" | "--icmpv6-code" => p.icmp_code = Some(num(opt, val()?)?),
            "--icmp-id" | "--icmpv6-id" => p.icmp_id = Some(num(opt, val()?)?),
            "--state" => p.state = Some(val()?.to_owned()),
            "--orig-vtag" => p.vtag_orig = Some(num(opt, val()?)?),
            "--reply-vtag" => p.vtag_reply = Some(num(opt, val()?)?),
            "--role" => {
                p.role = Some(match val()?.to_ascii_lowercase().as_str() {
                    "client" => 0,
                    "server" => 1,
                    v => return Err(format!("{opt}: unknown DCCP role {v:?}")),
                })
            }
            "-m" | "--mark" => p.mark = Some(num(opt, val()?)?),
            "-l" | "--label" => p.labels = Some(parse_labels(opt, val()?)?),
            _ => return Err(format!("unknown option {opt:?}")),
        }
    }
    build(p)
}

fn parse_status(v: &str) -> Result<u32, String> {
    let mut bits = 0;
    for name in v.split(',') {
        bits |= match name.to_ascii_uppercase().as_str() {
            "UNSET" => 0,
            "SEEN_REPLY" => status::SEEN_REPLY,
            "ASSURED" => status::ASSURED,
            "FIXED_TIMEOUT" => status::FIXED_TIMEOUT,
            "EXPECTED" => status::EXPECTED,
            "OFFLOAD" => status::OFFLOAD,
            "HW_OFFLOAD" => status::HW_OFFLOAD,
            // conntrack(8) ignores these (NAT comes from -g/-n); so do we.
            "SRC_NAT" | "DST_NAT" => 0,
            _ => return Err(format!("-u: unknown status {name:?}")),
        };
    }
    Ok(bits)
}

fn parse_labels(opt: &str, v: &str) -> Result<[u8; 16], String> {
    let mut l = [0u8; 16];
    for name in v.split(',') {
        let bit: u8 = name
            .parse()
            .ok()
            .filter(|b| *b < 128)
            .ok_or_else(|| format!("{opt}: label {name:?} is not a bit number 0-127"))?;
        l[(bit / 8) as usize] |= 1 << (bit % 8);
    }
    Ok(l)
}

fn state_num(names: &[&str], v: &str, what: &str) -> Result<u8, String> {
    names
        .iter()
        .position(|n| *n == v)
        .and_then(|i| u8::try_from(i).ok())
        .ok_or_else(|| format!("--state: unknown {what} state {v:?}"))
}

fn build(p: Parsed) -> Result<Entry, String> {
    let timeout = p.timeout.ok_or("missing -t (timeout)")?;
    let src = p.src.ok_or("missing -s (original source)")?;
    let dst = p.dst.ok_or("missing -d (original destination)")?;
    let rsrc = p.rsrc.unwrap_or(dst);
    let rdst = p.rdst.unwrap_or(src);
    let v6 = src.is_ipv6();
    if [dst, rsrc, rdst].iter().any(|a| a.is_ipv6() != v6) {
        return Err("addresses of different families".into());
    }
    if p.family.is_some_and(|f| f != v6) {
        return Err("-f does not match the addresses".into());
    }
    let pr = p.proto.ok_or("missing -p (protocol)")?;
    let (l4, rl4) = if has_ports(pr) {
        let (sport, dport) = if pr == proto::DCCP {
            // conntrack 1.4.7 prints no DCCP ports in -o save.
            (p.sport.unwrap_or(0), p.dport.unwrap_or(0))
        } else {
            (
                p.sport.ok_or("missing --sport")?,
                p.dport.ok_or("missing --dport")?,
            )
        };
        let rs = p.dnat_port.or(p.rsport).unwrap_or(dport);
        let rd = p.snat_port.or(p.rdport).unwrap_or(sport);
        (
            L4::Ports {
                src: sport,
                dst: dport,
            },
            L4::Ports { src: rs, dst: rd },
        )
    } else if pr == proto::ICMP || pr == proto::ICMPV6 {
        if (pr == proto::ICMPV6) != v6 {
            return Err("ICMP protocol does not match the address family".into());
        }
        let kind = p.icmp_type.ok_or("missing --icmp-type")?;
        let code = p.icmp_code.ok_or("missing --icmp-code")?;
        let id = p.icmp_id.unwrap_or(0);
        (
            L4::Icmp { id, kind, code },
            L4::Icmp {
                id,
                kind: icmp_reply_type(pr, kind).unwrap_or(kind),
                code,
            },
        )
    } else {
        (L4::None, L4::None)
    };
    let protoinfo = match pr {
        proto::TCP => {
            let s = p.state.as_deref().ok_or("missing --state for tcp")?;
            Some(ProtoInfo::Tcp {
                // conntrack(8) prints SYN_SENT2 as LISTEN; take both.
                state: if s == "LISTEN" {
                    tcp_state::SYN_SENT2
                } else {
                    state_num(&tcp_state::NAMES, s, "TCP")?
                },
                wscale_orig: 0,
                wscale_reply: 0,
                flags_orig: 0,
                flags_reply: 0,
            })
        }
        proto::SCTP if p.state.is_some() || p.vtag_orig.is_some() || p.vtag_reply.is_some() => {
            Some(ProtoInfo::Sctp {
                state: match &p.state {
                    Some(s) => state_num(SCTP_TEXT_STATES, s, "SCTP")?,
                    None => 0,
                },
                vtag_orig: p.vtag_orig.unwrap_or(0),
                vtag_reply: p.vtag_reply.unwrap_or(0),
            })
        }
        proto::DCCP if p.state.is_some() || p.role.is_some() => Some(ProtoInfo::Dccp {
            state: match &p.state {
                Some(s) => state_num(&DCCP_STATES, s, "DCCP")?,
                None => 0,
            },
            role: p.role.unwrap_or(0),
            handshake_seq: 0,
        }),
        _ if p.state.is_some() => return Err(format!("--state given for protocol {pr}")),
        _ => None,
    };
    // Every entry a dump lists is confirmed; -o save just does not say so.
    let mut st = p.status | status::CONFIRMED;
    if p.dnat {
        st |= status::DST_NAT | status::DST_NAT_DONE;
    }
    if p.snat {
        st |= status::SRC_NAT | status::SRC_NAT_DONE;
    }
    Ok(Entry {
        orig: Tuple {
            src,
            dst,
            proto: pr,
            l4,
            zone: p.orig_zone,
        },
        reply: Tuple {
            src: rsrc,
            dst: rdst,
            proto: pr,
            l4: rl4,
            zone: p.reply_zone,
        },
        status: st,
        timeout,
        mark: p.mark.unwrap_or(0),
        zone: p.zone.unwrap_or(0),
        labels: p.labels,
        protoinfo,
        seq_adj_orig: None,
        seq_adj_reply: None,
        helper: None,
        id: None,
    })
}

/// What of `e` survives a trip through the text: the entry [`decode`]
/// returns for [`line`]`(e)`.
pub fn text_projection(e: &Entry) -> Entry {
    let mut p = e.clone();
    let keep = status::SEEN_REPLY | status::ASSURED | status::FIXED_TIMEOUT;
    let dnat = e.status & status::DST_NAT_DONE != 0 && e.reply.src != e.orig.dst;
    let snat = e.status & status::SRC_NAT_DONE != 0 && e.reply.dst != e.orig.src;
    p.status = (e.status & keep) | status::CONFIRMED;
    if dnat {
        p.status |= status::DST_NAT | status::DST_NAT_DONE;
    }
    if snat {
        p.status |= status::SRC_NAT | status::SRC_NAT_DONE;
    }
    p.labels = None;
    p.seq_adj_orig = None;
    p.seq_adj_reply = None;
    p.helper = None;
    p.id = None;
    p.protoinfo = match e.protoinfo {
        _ if e.orig.proto == proto::TCP => Some(ProtoInfo::Tcp {
            state: match e.protoinfo {
                Some(ProtoInfo::Tcp { state, .. }) if tcp_text_name(state).is_some() => state,
                _ => 0,
            },
            wscale_orig: 0,
            wscale_reply: 0,
            flags_orig: 0,
            flags_reply: 0,
        }),
        Some(ProtoInfo::Dccp { state, role, .. }) if e.orig.proto == proto::DCCP => {
            Some(ProtoInfo::Dccp {
                state: if (state as usize) < DCCP_STATES.len() {
                    state
                } else {
                    0
                },
                role: if role == 1 { 1 } else { 0 },
                handshake_seq: 0,
            })
        }
        Some(ProtoInfo::Sctp {
            state,
            vtag_orig,
            vtag_reply,
        }) if e.orig.proto == proto::SCTP => Some(ProtoInfo::Sctp {
            state: if usize::from(state) < SCTP_TEXT_STATES.len() {
                state
            } else {
                0
            },
            vtag_orig,
            vtag_reply,
        }),
        _ => None,
    };
    // The text has no reply ICMP fields: conntrack derives them.
    if let L4::Icmp { id, kind, code } = e.orig.l4 {
        p.reply.l4 = L4::Icmp {
            id,
            kind: icmp_reply_type(e.orig.proto, kind).unwrap_or(kind),
            code,
        };
    }
    p
}

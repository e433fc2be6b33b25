//! `save`, `load`, `inspect`, `flush`: direct conntrack work in the caller's
//! network namespace, no daemon involved.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use super::{FlushArgs, InspectArgs, LoadArgs, SaveArgs};
use crate::access::ConntrackAccess;
use crate::ctnetlink::Ctnetlink;
use crate::entry::{proto, status, tcp_state, Entry, ProtoInfo, Selector, Tuple, L4};
use crate::format::{self, text, EncodeOptions, Format};

/// Largest blob `load`/`inspect` read: the decoder's own ceiling on
/// conntrack text, far above anything a 1 MiB binary blob can be.
const MAX_INPUT: u64 = format::MAX_RAW_LEN as u64;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Binary => "binary",
        Format::ConntrackSave => "conntrack-save",
    }
}

fn selector(mark: u32, mark_mask: u32, zone: Option<u16>) -> Selector {
    Selector {
        mark,
        mark_mask,
        zone,
    }
}

fn read_input(path: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    match path {
        None => std::io::stdin()
            .lock()
            .take(MAX_INPUT + 1)
            .read_to_end(&mut buf)
            .context("reading the state blob from standard input")?,
        Some(p) if p == Path::new("-") => std::io::stdin()
            .lock()
            .take(MAX_INPUT + 1)
            .read_to_end(&mut buf)
            .context("reading the state blob from standard input")?,
        Some(p) => std::fs::File::open(p)
            .and_then(|f| f.take(MAX_INPUT + 1).read_to_end(&mut buf))
            .with_context(|| format!("reading {}", p.display()))?,
    };
    if buf.len() as u64 > MAX_INPUT {
        anyhow::bail!("state blob larger than {MAX_INPUT} bytes; refusing to read it");
    }
    Ok(buf)
}

pub fn save(a: SaveArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let format = Format::from(a.format);
    let ct = Ctnetlink::open().context("save: opening conntrack netlink")?;
    let entries = ct
        .dump(&selector(a.mark, a.mark_mask, a.zone))
        .context("save: dumping conntrack entries")?;
    let dump_ms = ms(t0);
    let t1 = Instant::now();
    let enc = format::encode(
        &entries,
        &EncodeOptions {
            limit: a.limit,
            format,
        },
    )
    .context("save: encoding")?;
    let enc_ms = ms(t1);
    match &a.output {
        Some(p) => std::fs::write(p, &enc.bytes)
            .with_context(|| format!("save: writing {}", p.display()))?,
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&enc.bytes)
                .and_then(|()| out.flush())
                .context("save: writing to standard output")?;
        }
    }
    eprintln!(
        "save: {} entries (kept {}, dropped {}), {} bytes {}, dump {:.1} ms, encode {:.1} ms",
        entries.len(),
        enc.kept,
        enc.dropped,
        enc.bytes.len(),
        format_name(format),
        dump_ms,
        enc_ms
    );
    Ok(())
}

pub fn load(a: LoadArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let bytes = read_input(a.input.as_deref()).context("load")?;
    // The whole blob is validated before anything is created; timeouts
    // are aged by the time since Save and what ran out meanwhile is left
    // out (docs/state-format.md §1.3).
    let mut dec = format::stream_loaded_at(&bytes, usize::MAX, format::wall_clock_us())
        .context("load: invalid state blob, nothing created")?;
    let mut entries = Vec::with_capacity(dec.len());
    while let Some(batch) = dec.next_batch(4096) {
        entries.extend(batch.context("load: invalid state blob, nothing created")?);
    }
    let ct = Ctnetlink::open().context("load: opening conntrack netlink")?;
    let report = ct
        .create(&entries)
        .context("load: creating conntrack entries")?;
    let mut why = String::new();
    for (errno, n) in &report.refused_by_errno {
        let _ = write!(
            why,
            "{}{}×{n}",
            if why.is_empty() { " (" } else { ", " },
            nix::errno::Errno::from_raw(*errno)
        );
    }
    if !why.is_empty() {
        why.push(')');
    }
    eprintln!(
        "load: {} entries from {} bytes {}{}: created {}, existed {}, refused {}{}, expired {} (timeouts aged by {} s), {:.1} ms",
        entries.len() + dec.expired,
        bytes.len(),
        format_name(dec.format),
        match dec.dropped {
            Some(d) if d > 0 => format!(" (sender dropped {d})"),
            _ => String::new(),
        },
        report.created,
        report.existed,
        report.refused,
        why,
        dec.expired,
        dec.age_secs,
        ms(t0)
    );
    Ok(())
}

pub fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let bytes = read_input(Some(&a.file)).context("inspect")?;
    let dec = format::decode(&bytes)
        .with_context(|| format!("inspect: {} is not a valid state blob", a.file.display()))?;
    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    for e in &dec.entries {
        text.clear();
        if a.json {
            text.push_str(&entry_json(e).to_string());
        } else {
            render(e, &mut text);
        }
        text.push('\n');
        out.write_all(text.as_bytes())
            .context("inspect: writing to standard output")?;
    }
    if a.json {
        let summary = serde_json::json!({"summary": {
            "entries": dec.entries.len(),
            "bytes": bytes.len(),
            "format": format_name(dec.format),
            "truncated": dec.truncated,
            "dropped": dec.dropped,
            // Timeouts above are as saved; a Load ages them from here.
            "saved_at_us": dec.saved_at,
        }});
        writeln!(out, "{summary}").context("inspect: writing to standard output")?;
    }
    out.flush().context("inspect: writing to standard output")?;
    eprintln!(
        "inspect: {} entries, {} bytes {}, truncated: {}{}, {:.1} ms",
        dec.entries.len(),
        bytes.len(),
        format_name(dec.format),
        if dec.truncated { "yes" } else { "no" },
        match dec.dropped {
            Some(d) => format!(", dropped {d}"),
            None => String::new(),
        },
        ms(t0)
    );
    Ok(())
}

pub fn flush(a: FlushArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let ct = Ctnetlink::open().context("flush: opening conntrack netlink")?;
    let n = ct
        .delete_selected(&selector(a.mark, a.mark_mask, a.zone))
        .context("flush: deleting conntrack entries")?;
    eprintln!(
        "flush: deleted {n} entries (mark {:#x}/{:#x}{}), {:.1} ms",
        a.mark,
        a.mark_mask,
        a.zone.map(|z| format!(", zone {z}")).unwrap_or_default(),
        ms(t0)
    );
    Ok(())
}

fn proto_name(p: u8) -> &'static str {
    text::proto_name(p).unwrap_or("unknown")
}

fn state_name(e: &Entry) -> Option<String> {
    let pick = |names: &[&str], s: u8| {
        names
            .get(s as usize)
            .map(|n| (*n).to_owned())
            .unwrap_or_else(|| format!("STATE_{s}"))
    };
    match e.protoinfo? {
        ProtoInfo::Tcp { state, .. } => Some(pick(&tcp_state::NAMES, state)),
        ProtoInfo::Sctp { state, .. } => Some(pick(&text::SCTP_STATES, state)),
        ProtoInfo::Dccp { state, .. } => Some(pick(&text::DCCP_STATES, state)),
    }
}

const STATUS_NAMES: [(u32, &str); 16] = [
    (status::EXPECTED, "EXPECTED"),
    (status::SEEN_REPLY, "SEEN_REPLY"),
    (status::ASSURED, "ASSURED"),
    (status::CONFIRMED, "CONFIRMED"),
    (status::SRC_NAT, "SRC_NAT"),
    (status::DST_NAT, "DST_NAT"),
    (status::SEQ_ADJUST, "SEQ_ADJUST"),
    (status::SRC_NAT_DONE, "SRC_NAT_DONE"),
    (status::DST_NAT_DONE, "DST_NAT_DONE"),
    (status::DYING, "DYING"),
    (status::FIXED_TIMEOUT, "FIXED_TIMEOUT"),
    (status::TEMPLATE, "TEMPLATE"),
    (status::UNTRACKED, "UNTRACKED"),
    (status::HELPER, "HELPER"),
    (status::OFFLOAD, "OFFLOAD"),
    (status::HW_OFFLOAD, "HW_OFFLOAD"),
];

fn label_bits(l: &[u8; 16]) -> Vec<u32> {
    (0..128u32)
        .filter(|b| l[(b / 8) as usize] & (1 << (b % 8)) != 0)
        .collect()
}

fn render_tuple(t: &Tuple, out: &mut String) {
    let _ = write!(out, "src={} dst={} ", t.src, t.dst);
    match t.l4 {
        L4::Ports { src, dst } if t.proto == proto::GRE => {
            let _ = write!(out, "srckey={src:#x} dstkey={dst:#x} ");
        }
        L4::Ports { src, dst } => {
            let _ = write!(out, "sport={src} dport={dst} ");
        }
        L4::Icmp { id, kind, code } => {
            let _ = write!(out, "type={kind} code={code} id={id} ");
        }
        L4::None => {}
    }
}

/// One line in the manner of `conntrack -L -o extended`, plus what
/// conntrack(8) leaves out (labels as bit numbers, wscale, tuple zones).
pub fn render(e: &Entry, out: &mut String) {
    let (fam, famnum) = if e.is_ipv6() {
        ("ipv6", 10)
    } else {
        ("ipv4", 2)
    };
    let _ = write!(
        out,
        "{fam:<8} {famnum} {:<8} {} {} ",
        proto_name(e.orig.proto),
        e.orig.proto,
        e.timeout
    );
    if let Some(s) = state_name(e) {
        let _ = write!(out, "{s} ");
    }
    render_tuple(&e.orig, out);
    if e.status & status::SEEN_REPLY == 0 {
        out.push_str("[UNREPLIED] ");
    }
    render_tuple(&e.reply, out);
    if e.status & status::ASSURED != 0 {
        out.push_str("[ASSURED] ");
    }
    if e.status & status::FIXED_TIMEOUT != 0 {
        out.push_str("[FIXED_TIMEOUT] ");
    }
    if e.status & status::EXPECTED != 0 {
        out.push_str("[EXPECTED] ");
    }
    if e.is_nat() {
        let kinds: Vec<&str> = [(status::SRC_NAT, "snat"), (status::DST_NAT, "dnat")]
            .iter()
            .filter(|(b, _)| e.status & b != 0)
            .map(|(_, n)| *n)
            .collect();
        let _ = write!(
            out,
            "nat={} ",
            if kinds.is_empty() {
                "reply-tuple".to_owned()
            } else {
                kinds.join(",")
            }
        );
    }
    let _ = write!(out, "mark={} ", e.mark);
    if e.zone != 0 {
        let _ = write!(out, "zone={} ", e.zone);
    }
    if let Some(z) = e.orig.zone {
        let _ = write!(out, "orig-zone={z} ");
    }
    if let Some(z) = e.reply.zone {
        let _ = write!(out, "reply-zone={z} ");
    }
    if let Some(l) = &e.labels {
        let bits: Vec<String> = label_bits(l).iter().map(u32::to_string).collect();
        let _ = write!(out, "labels={} ", bits.join(","));
    }
    match e.protoinfo {
        Some(ProtoInfo::Tcp {
            wscale_orig,
            wscale_reply,
            flags_orig,
            flags_reply,
            ..
        }) => {
            let _ = write!(
                out,
                "wscale={wscale_orig}/{wscale_reply} tcpflags={flags_orig:#04x}/{flags_reply:#04x} "
            );
        }
        Some(ProtoInfo::Sctp {
            vtag_orig,
            vtag_reply,
            ..
        }) => {
            let _ = write!(out, "vtag={vtag_orig}/{vtag_reply} ");
        }
        Some(ProtoInfo::Dccp {
            role,
            handshake_seq,
            ..
        }) => {
            let _ = write!(
                out,
                "role={} handshake-seq={handshake_seq} ",
                if role == 1 { "server" } else { "client" }
            );
        }
        None => {}
    }
    for (name, s) in [
        ("seq-adj-orig", &e.seq_adj_orig),
        ("seq-adj-reply", &e.seq_adj_reply),
    ] {
        if let Some(s) = s {
            let _ = write!(
                out,
                "{name}={}/{}/{} ",
                s.correction_pos, s.offset_before, s.offset_after
            );
        }
    }
    if let Some(h) = &e.helper {
        let _ = write!(out, "helper={h} ");
    }
    let _ = write!(out, "status={:#x}", e.status);
}

fn tuple_json(t: &Tuple) -> serde_json::Value {
    let mut v = serde_json::json!({
        "src": t.src.to_string(),
        "dst": t.dst.to_string(),
        "zone": t.zone,
    });
    match t.l4 {
        L4::Ports { src, dst } => {
            v["sport"] = src.into();
            v["dport"] = dst.into();
        }
        L4::Icmp { id, kind, code } => {
            v["icmp_type"] = kind.into();
            v["icmp_code"] = code.into();
            v["icmp_id"] = id.into();
        }
        L4::None => {}
    }
    v
}

/// One entry as a JSON object (every attribute the state format carries).
pub fn entry_json(e: &Entry) -> serde_json::Value {
    let names: Vec<&str> = STATUS_NAMES
        .iter()
        .filter(|(b, _)| e.status & b != 0)
        .map(|(_, n)| *n)
        .collect();
    let mut v = serde_json::json!({
        "family": if e.is_ipv6() { "ipv6" } else { "ipv4" },
        "proto": proto_name(e.orig.proto),
        "protonum": e.orig.proto,
        "timeout": e.timeout,
        "state": state_name(e),
        "status": e.status,
        "status_names": names,
        "orig": tuple_json(&e.orig),
        "reply": tuple_json(&e.reply),
        "nat": e.is_nat(),
        "mark": e.mark,
        "zone": e.zone,
        "labels": e.labels.as_ref().map(label_bits),
        "helper": e.helper,
    });
    match e.protoinfo {
        Some(ProtoInfo::Tcp {
            wscale_orig,
            wscale_reply,
            flags_orig,
            flags_reply,
            ..
        }) => {
            v["tcp"] = serde_json::json!({
                "wscale_orig": wscale_orig, "wscale_reply": wscale_reply,
                "flags_orig": flags_orig, "flags_reply": flags_reply,
            });
        }
        Some(ProtoInfo::Sctp {
            vtag_orig,
            vtag_reply,
            ..
        }) => {
            v["sctp"] = serde_json::json!({"vtag_orig": vtag_orig, "vtag_reply": vtag_reply});
        }
        Some(ProtoInfo::Dccp {
            role,
            handshake_seq,
            ..
        }) => {
            v["dccp"] = serde_json::json!({"role": role, "handshake_seq": handshake_seq});
        }
        None => {}
    }
    for (name, s) in [
        ("seq_adj_orig", &e.seq_adj_orig),
        ("seq_adj_reply", &e.seq_adj_reply),
    ] {
        if let Some(s) = s {
            v[name] = serde_json::json!({
                "correction_pos": s.correction_pos,
                "offset_before": s.offset_before,
                "offset_after": s.offset_after,
            });
        }
    }
    v
}

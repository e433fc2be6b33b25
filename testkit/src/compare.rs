//! Attribute-by-attribute comparison of two conntrack tables.
//!
//! [`compare`] works on decoded [`Entry`] values (our codec). [`cross_check`]
//! does not trust our codec at all: it normalises what conntrack(8) prints
//! (`-L -o extended,labels` and `-L -o save`, per family, filtered by mark)
//! for two namespaces and compares the text. conntrack(8) prints neither TCP
//! window scale nor TCP flags, so those are only covered by [`compare`].

use std::collections::{BTreeMap, HashMap};
use std::process::Command;

use conntrack_vmstate::entry::{Entry, Tuple};

/// How close two tables must be.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    /// Largest accepted difference of remaining timeouts, in seconds (the
    /// copy is made later, so its timeouts are a little smaller).
    pub timeout_secs: u32,
    /// Status bits not compared. Use 0 (exact) unless a bit is one the
    /// kernel sets on its own on one side only (OFFLOAD, HW_OFFLOAD,
    /// NAT_CLASH); say which in the test.
    pub status_ignore: u32,
}

impl Tolerance {
    pub fn exact_status(timeout_secs: u32) -> Tolerance {
        Tolerance {
            timeout_secs,
            status_ignore: 0,
        }
    }
}

fn key(e: &Entry) -> (Tuple, u16) {
    (e.orig, e.zone)
}

/// Every difference between `want` and `got`, one readable line each; empty
/// when they match. Entries are keyed by original tuple (with its tuple
/// zone) and CTA_ZONE; every field except `id` is compared.
pub fn compare(want: &[Entry], got: &[Entry], tol: Tolerance) -> Vec<String> {
    let mut diffs = Vec::new();
    let mut g: HashMap<(Tuple, u16), &Entry> = HashMap::with_capacity(got.len());
    for e in got {
        if g.insert(key(e), e).is_some() {
            diffs.push(format!("duplicate in copy: {}", show(e)));
        }
    }
    let mut seen = HashMap::with_capacity(want.len());
    for w in want {
        if seen.insert(key(w), ()).is_some() {
            diffs.push(format!("duplicate in source: {}", show(w)));
            continue;
        }
        let Some(c) = g.remove(&key(w)) else {
            diffs.push(format!("missing in copy: {}", show(w)));
            continue;
        };
        let mut d = Vec::new();
        if w.reply != c.reply {
            d.push(format!("reply tuple {:?} != {:?}", w.reply, c.reply));
        }
        let mask = !tol.status_ignore;
        if w.status & mask != c.status & mask {
            d.push(format!(
                "status {:#x} != {:#x}",
                w.status & mask,
                c.status & mask
            ));
        }
        if w.timeout.abs_diff(c.timeout) > tol.timeout_secs {
            d.push(format!(
                "timeout {} != {} (tolerance {})",
                w.timeout, c.timeout, tol.timeout_secs
            ));
        }
        if w.mark != c.mark {
            d.push(format!("mark {} != {}", w.mark, c.mark));
        }
        if w.labels != c.labels {
            d.push(format!("labels {:?} != {:?}", w.labels, c.labels));
        }
        if w.protoinfo != c.protoinfo {
            d.push(format!("protoinfo {:?} != {:?}", w.protoinfo, c.protoinfo));
        }
        if w.seq_adj_orig != c.seq_adj_orig || w.seq_adj_reply != c.seq_adj_reply {
            d.push(format!(
                "seq adj {:?}/{:?} != {:?}/{:?}",
                w.seq_adj_orig, w.seq_adj_reply, c.seq_adj_orig, c.seq_adj_reply
            ));
        }
        if w.helper != c.helper {
            d.push(format!("helper {:?} != {:?}", w.helper, c.helper));
        }
        if !d.is_empty() {
            diffs.push(format!("{}: {}", show(w), d.join("; ")));
        }
    }
    for e in g.values() {
        diffs.push(format!("extra in copy: {}", show(e)));
    }
    diffs.sort();
    diffs
}

fn show(e: &Entry) -> String {
    format!(
        "{:?} {} -> {} {:?} zone {}{}",
        e.orig.proto,
        e.orig.src,
        e.orig.dst,
        e.orig.l4,
        e.zone,
        e.orig
            .zone
            .map(|z| format!(" orig-zone {z}"))
            .unwrap_or_default()
    )
}

/// conntrack(8) listing of one namespace and mark, normalised: remaining
/// timeouts, `use=` and `id=` removed, lines sorted. Both families.
pub fn conntrack_listing(ns_name: &str, mark: u32) -> Vec<String> {
    let mut lines = Vec::new();
    for family in ["ipv4", "ipv6"] {
        for output in ["extended,labels", "save"] {
            let out = Command::new("ip")
                .args(["netns", "exec", ns_name, "conntrack", "-L", "-f", family])
                .args(["-m", &mark.to_string(), "-o", output])
                .output()
                .expect("spawn conntrack");
            assert!(
                out.status.success(),
                "conntrack -L in {ns_name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(n) = normalise(output, l) {
                    lines.push(n);
                }
            }
        }
    }
    lines.sort();
    lines
}

/// One conntrack(8) line without the parts that legitimately differ
/// between source and copy.
pub fn normalise(output: &str, line: &str) -> Option<String> {
    let toks: Vec<&str> = line.split_whitespace().collect();
    if toks.is_empty() {
        return None;
    }
    let mut out = vec![output.split(',').next().unwrap_or(output)];
    if output == "save" {
        let mut i = 0;
        while i < toks.len() {
            if toks[i] == "-t" {
                i += 2;
                continue;
            }
            out.push(toks[i]);
            i += 1;
        }
    } else {
        // "ipv4 2 tcp 6 TIMEOUT rest…"
        for (i, t) in toks.iter().enumerate() {
            if i == 4 || t.starts_with("use=") || t.starts_with("id=") {
                continue;
            }
            out.push(t);
        }
    }
    Some(out.join(" "))
}

/// Differences between conntrack(8)'s view of `mark` in two namespaces, as
/// "only in source"/"only in copy" lines; empty when equal.
pub fn cross_check(src_ns: &str, dst_ns: &str, mark: u32) -> Vec<String> {
    let a = conntrack_listing(src_ns, mark);
    let b = conntrack_listing(dst_ns, mark);
    let mut count: BTreeMap<&str, i64> = BTreeMap::new();
    for l in &a {
        *count.entry(l).or_default() += 1;
    }
    for l in &b {
        *count.entry(l).or_default() -= 1;
    }
    let mut diffs = Vec::new();
    for (l, n) in count {
        if n > 0 {
            diffs.push(format!("only in source ({n}x): {l}"));
        } else if n < 0 {
            diffs.push(format!("only in copy ({}x): {l}", -n));
        }
    }
    diffs
}

//! conntrack(8) on single entries and other small helpers of the cache
//! tests (tests/cache_events.rs, tests/cache_base.rs).

use std::io::Write;
use std::time::{Duration, Instant};

use super::netns::{run_ok, Netns};
use conntrack_vmstate::entry::{proto, status, Entry, L4};

/// conntrack(8) arguments that select exactly `e` (zone 0, ports).
pub fn filter_args(e: &Entry) -> Vec<String> {
    let p = match e.orig.proto {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        _ => panic!("test picks TCP/UDP only"),
    };
    let L4::Ports { src, dst } = e.orig.l4 else {
        panic!("ports")
    };
    let family = if e.is_ipv6() { "ipv6" } else { "ipv4" };
    vec![
        "-f".into(),
        family.into(),
        "-p".into(),
        p.into(),
        "-s".into(),
        e.orig.src.to_string(),
        "-d".into(),
        e.orig.dst.to_string(),
        "--sport".into(),
        src.to_string(),
        "--dport".into(),
        dst.to_string(),
    ]
}

/// `conntrack OP <exactly e> EXTRA…` inside `ns`; must succeed.
pub fn conntrack(ns: &Netns, op: &str, e: &Entry, extra: &[&str]) {
    let mut c = ns.cmd("conntrack");
    c.arg(op).args(filter_args(e)).args(extra);
    run_ok(&mut c);
}

/// Plain, un-NATed, unlabelled TCP/UDP entries of zone 0 with a long time
/// left (easy to address with conntrack(8), and every update really
/// changes them).
pub fn plain(v: &[Entry]) -> Vec<Entry> {
    v.iter()
        .filter(|e| {
            matches!(e.orig.proto, proto::TCP | proto::UDP)
                && e.zone == 0
                && e.orig.zone.is_none()
                && !e.is_nat()
                && e.status & status::FIXED_TIMEOUT == 0
                && e.labels.is_none()
                && e.timeout > 1000
        })
        .cloned()
        .collect()
}

/// `conntrack --load-file` of `lines` inside `ns`.
pub fn load_lines(ns: &Netns, lines: &[String]) {
    let mut f = tempfile::NamedTempFile::new().expect("tempfile");
    for l in lines {
        writeln!(f, "{l}").expect("write");
    }
    f.flush().expect("flush");
    run_ok(ns.cmd("conntrack").arg("--load-file").arg(f.path()));
}

/// Polls `f` every 10 ms until it holds; fails the test after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

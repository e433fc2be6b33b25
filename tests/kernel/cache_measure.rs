//! One-off measurements of the warm cache (not timed tests: they print
//! numbers and assert only correctness). Run on an otherwise idle machine:
//!
//! ```text
//! cargo test --release --test kernel cache_measure -- --ignored --nocapture --test-threads 1
//! ```
//!
//! * memory: bytes the cache holds per entry at 20k and 100k entries (a
//!   counting allocator, `testkit::memory`; the bound is held by
//!   tests/cache_memory);
//! * CPU of the event thread while 10k events/s of other marks go by;
//! * Save (`dump`) latency from the cache vs a direct dump, for VM entries
//!   that send events and for silent ones (older than the listener), with a
//!   host table that also holds 150k entries of another namespace.

use std::path::Path;
use std::time::{Duration, Instant};

use common::compare::{compare, Tolerance};
use common::netns::Netns;
use common::population::{self, Spec};
use conntrack_vmstate::access::ConntrackAccess;
use conntrack_vmstate::cache::{CacheConfig, CachedAccess};
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::{proto, status, Entry, Selector, Tuple, L4};

// The whole binary's allocator: `measure_memory_per_entry` counts with it
// (run alone, `--test-threads 1`).
#[global_allocator]
static A: common::memory::Counting = common::memory::Counting;

const MARK: u32 = 100;

pub(crate) fn ct(ns: &Netns) -> Ctnetlink {
    Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink")
}

/// `n` UDP entries of `mark` from 10.`a`.x.y, an hour left.
pub(crate) fn udp(n: usize, mark: u32, a: u8) -> Vec<Entry> {
    (0..n)
        .map(|i| {
            let orig = Tuple {
                src: std::net::Ipv4Addr::new(10, a, (i >> 16) as u8, (i >> 8) as u8).into(),
                dst: std::net::Ipv4Addr::new(192, 0, 2, i as u8).into(),
                proto: proto::UDP,
                l4: L4::Ports {
                    src: 1024 + (i % 60000) as u16,
                    dst: 53,
                },
                zone: None,
            };
            Entry {
                orig,
                reply: orig.inverse(),
                status: status::CONFIRMED,
                timeout: 3600,
                mark,
                zone: 0,
                labels: None,
                protoinfo: None,
                seq_adj_orig: None,
                seq_adj_reply: None,
                helper: None,
                id: None,
            }
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Times 11 Saves 100 ms apart (so none queues behind the previous one's
/// work): their median and minimum in ms, and the last Save's result.
fn time_saves<S>(mut save: impl FnMut() -> S) -> (f64, f64, S) {
    let mut t = Vec::new();
    let mut last = None;
    for _ in 0..11 {
        std::thread::sleep(Duration::from_millis(100));
        let s = Instant::now();
        let saved = save();
        t.push(ms(s.elapsed()));
        last = Some(saved);
    }
    let min = t.iter().copied().fold(f64::MAX, f64::min);
    (median(t), min, last.expect("11 Saves"))
}

/// utime + stime of the thread named `name` in this process, in ticks.
fn thread_ticks(name: &str) -> u64 {
    let ticks = |t: &common::threads::Task, n| {
        t.stat_field(n)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    common::threads::named(name)
        .iter()
        .map(|t| ticks(t, 14) + ticks(t, 15))
        .sum()
}

#[test]
#[ignore]
fn measure_memory_per_entry() {
    common::needs!(kernel);
    for n in [20_000, 100_000] {
        let m = common::memory::cache_memory(n, 3);
        println!(
            "MEASURE memory: {} entries, {} bytes, {:.0} B/entry (base: {} records, {} B; size_of Entry {} B)",
            m.entries,
            m.bytes,
            m.per_entry(),
            m.base_records,
            m.base_bytes,
            std::mem::size_of::<Entry>()
        );
    }
}

#[test]
#[ignore]
fn measure_event_thread_cpu() {
    common::needs!(kernel);
    let ns = Netns::new("cmcpu");
    let sel = Selector::mark(MARK);
    let direct = ct(&ns);
    direct.create(&udp(2000, MARK, 1)).expect("create");
    let cache = CachedAccess::new(ct(&ns), CacheConfig::default()).expect("cache");
    let hz = 100.0; // USER_HZ on Linux
                    // 5 rounds/s of 1000 creates + 1000 deletes: 10k events/s. `busy` is
                    // the time the creating side spends in the kernel, which is where the
                    // kernel builds and queues the events.
    let rounds = |mark: u32| -> (u64, f64, Duration) {
        let batch = udp(1000, mark, 2);
        let start = Instant::now();
        let mut busy = Duration::ZERO;
        let mut sent = 0u64;
        for round in 0..50u32 {
            let due = start + Duration::from_millis(200 * u64::from(round));
            if let Some(w) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(w);
            }
            let t = Instant::now();
            direct.create(&batch).expect("create");
            let r = direct.delete_entries(&batch).expect("delete");
            busy += t.elapsed();
            assert_eq!(r.deleted, 1000);
            sent += 2000;
        }
        (sent, start.elapsed().as_secs_f64(), busy)
    };
    let (sent, wall, busy) = rounds(999);
    println!(
        "MEASURE no listener: {sent} creates+deletes in {wall:.1} s, creating side busy {:.0} ms",
        ms(busy)
    );
    cache.watch(&sel, true).expect("watch");
    assert!(cache.wait_trusted(&sel, Duration::from_secs(30)));
    for (label, mark) in [("other marks", 999u32), ("the watched mark", MARK)] {
        let t0 = thread_ticks("ct-events");
        let s0 = cache.stats();
        let (sent, wall, busy) = rounds(mark);
        std::thread::sleep(Duration::from_millis(300));
        let cpu = (thread_ticks("ct-events") - t0) as f64 / hz;
        let s1 = cache.stats();
        println!(
            "MEASURE events of {label}: {sent} events in {wall:.1} s ({:.0}/s): event thread {:.2} s CPU = {:.1} % of a core; creating side busy {:.0} ms; read {}, skipped {}, losses {}",
            sent as f64 / wall,
            cpu,
            cpu / wall * 100.0,
            ms(busy),
            s1.events_read - s0.events_read,
            s1.events_skipped - s0.events_skipped,
            s1.losses - s0.losses
        );
    }
    let got = cache.dump(&sel).expect("dump");
    let want = direct.dump(&sel).expect("direct");
    assert!(compare(&want, &got, Tolerance::exact_status(2)).is_empty());
}

#[test]
#[ignore]
fn measure_save_latency() {
    common::needs!(kernel);
    let host = Netns::new("cmhost");
    // Another namespace's 150k entries: the hash table is shared host-wide.
    let noise = ct(&host);
    for part in 0..3u8 {
        let r = noise.create(&udp(50_000, 7, 100 + part)).expect("noise");
        assert_eq!(r.created, 50_000);
    }
    for n in [1_000usize, 5_000, 20_000, 100_000] {
        // evented: made after the watch; probed: made before it but with the
        // event extension (nf_conntrack_events=1, or any listener on the
        // host at the time); silent: made without it.
        for kind in ["evented", "probed", "silent"] {
            let ns = Netns::new("cmsave");
            let pop = population::generate(Spec {
                noise: 0.0,
                ..Spec::new(n, MARK, 9)
            });
            let sel = Selector::mark(MARK);
            let direct = ct(&ns);
            let cfg = CacheConfig {
                max_lookups: usize::MAX,
                ..CacheConfig::default()
            };
            let cache = CachedAccess::new(ct(&ns), cfg).expect("cache");
            let sysctl = |v: u32| {
                common::netns::run_ok(
                    ns.cmd("sysctl")
                        .arg("-qw")
                        .arg(format!("net.netfilter.nf_conntrack_events={v}")),
                );
            };
            if kind != "evented" {
                sysctl(if kind == "probed" { 1 } else { 0 });
                population::load(&ns.name, &pop);
                sysctl(2);
            }
            let t = Instant::now();
            cache.watch(&sel, true).expect("watch");
            assert!(cache.wait_trusted(&sel, Duration::from_secs(60)));
            let warm = t.elapsed();
            if kind == "evented" {
                population::load(&ns.name, &pop);
            } else {
                let end = Instant::now() + Duration::from_secs(60);
                while cache.stats().probes < pop.vm_count() as u64 && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let probe_done = t.elapsed();
            let silent = kind;
            let (mut c, mut d) = (Vec::new(), Vec::new());
            let s0 = cache.stats();
            for _ in 0..5 {
                let t = Instant::now();
                let got = cache.dump(&sel).expect("cached");
                c.push(ms(t.elapsed()));
                let t = Instant::now();
                let want = direct.dump(&sel).expect("direct");
                d.push(ms(t.elapsed()));
                assert_eq!(got.len(), want.len());
            }
            let s1 = cache.stats();
            println!(
                "MEASURE save N={n} {silent}: cached {:.1} ms, direct {:.1} ms (median of 5); hits {}, fallbacks {}, lookups {}; warm-up {:.0} ms, probes done {:.0} ms",
                median(c),
                median(d),
                s1.hits - s0.hits,
                s1.fallbacks - s0.fallbacks,
                s1.lookups - s0.lookups,
                ms(warm),
                ms(probe_done),
            );
        }
    }
}

/// Save (`save_state`, binary) answered from the cache, from the
/// pre-encoded base and (base off) by a whole encode, for entries of the
/// realistic mix created while the cache listens.
#[test]
#[ignore]
fn measure_save_state_from_cache() {
    use conntrack_vmstate::access::DumpSource;
    use conntrack_vmstate::format::EncodeOptions;
    common::needs!(kernel);
    for n in [5_000usize, 100_000] {
        for base in [true, false] {
            let ns = Netns::new("cmstate");
            population::enable_labels(&ns.name);
            let pop = population::generate(Spec {
                noise: 0.0,
                ..Spec::new(n, MARK, 5)
            });
            let sel = Selector::mark(MARK);
            let cache = CachedAccess::new(ct(&ns), CacheConfig::new(Duration::from_secs(30), base))
                .expect("cache");
            cache.watch(&sel, true).expect("watch");
            assert!(cache.wait_trusted(&sel, Duration::from_secs(60)));
            let direct = ct(&ns);
            for chunk in pop.vm_entries.chunks(50_000) {
                direct.create(chunk).expect("create");
            }
            let end = Instant::now() + Duration::from_secs(60);
            while cache.cached_len(&sel) != Some(pop.vm_count()) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            if base {
                assert!(cache.rebuild_base(&sel).is_some_and(|r| r > 0));
            }
            let opts = EncodeOptions::default();
            let want = if base {
                DumpSource::Base
            } else {
                DumpSource::Cache
            };
            let (med, min, bytes) = time_saves(|| {
                let saved = cache.save_state(&sel, &opts).expect("save");
                assert_eq!(saved.source, want);
                saved.encoded.bytes.len()
            });
            println!(
                "MEASURE save_state N={n} {}: {med:.2} ms (median of 11, min {min:.2}), {bytes} B",
                if base {
                    "from the base"
                } else {
                    "whole encode"
                },
            );
        }
    }
}

/// Save answered by `conntrack-vmstate-helper` from its pre-encoded base,
/// as the packaged daemon gets it (`HelperClient::save_state`: the state
/// and the ids cross the helper's socket), on an otherwise idle machine:
/// beside `measure_save_state_from_cache`, what the helper and its socket
/// add to Save.
#[test]
#[ignore]
fn measure_save_state_through_helper() {
    use conntrack_vmstate::access::{DumpSource, WarmState};
    use conntrack_vmstate::format::EncodeOptions;
    use conntrack_vmstate::helper::client::HelperClient;
    common::needs!(kernel);
    let n = 100_000usize;
    let ns = Netns::new("cmhelp");
    population::enable_labels(&ns.name);
    ns.set_conntrack_events(1);
    let pop = population::generate(Spec {
        noise: 0.0,
        ..Spec::new(n, MARK, 5)
    });
    let direct = ct(&ns);
    for chunk in pop.vm_entries.chunks(50_000) {
        direct.create(chunk).expect("create");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("helper.sock");
    let _helper = common::host::start_helper(&ns, dir.path(), &[], &sock);
    let client = HelperClient::new(&sock).expect("helper client");
    let sel = Selector::mark(MARK);
    client.watch(&sel, true).expect("watch");
    // Warm first, then the base the helper builds on its own schedule.
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let w = client
            .wait_warm(&sel, Duration::from_secs(60))
            .expect("wait warm");
        assert_eq!(w.state, WarmState::Warm, "{w:?}");
        if w.base_records > 0 {
            break;
        }
        assert!(Instant::now() < end, "no base after 60 s: {w:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let opts = EncodeOptions::default();
    let (med, min, (bytes, ids)) = time_saves(|| {
        let saved = client.save_state(&sel, &opts).expect("save");
        assert_eq!(saved.source, DumpSource::Base);
        assert_eq!(saved.encoded.kept, pop.vm_count());
        assert_eq!(saved.ids.len(), pop.vm_count(), "one id per saved entry");
        (saved.encoded.bytes.len(), saved.ids.len())
    });
    println!(
        "MEASURE save_state N={n} through the helper: {med:.2} ms (median of 11, min {min:.2}), {bytes} B, {ids} ids"
    );
}

//! `wait_warm` (what Register waits for) against real kernel conntrack in
//! throw-away namespaces: once it says warm, the very next Save comes from
//! the cache or its pre-encoded base, never from a table walk, although
//! every entry existed before the watch; silent entries (made while
//! `nf_conntrack_events` was 0 in the namespace) are counted and named in
//! the Save's notes; with events off it returns at once.
//!
//! `measure_register_to_warm` (ignored) prints how long the warm-up takes:
//!
//! ```text
//! cargo test --release --test kernel cache_warm -- --ignored --nocapture --test-threads 1
//! ```

use std::time::{Duration, Instant};

use common::compare::{compare, Tolerance};
use common::netns::Netns;
use conntrack_vmstate::access::{CacheMiss, ConntrackAccess, DumpSource, WarmState};
use conntrack_vmstate::cache::{CacheConfig, CachedAccess};
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::{Entry, Selector};
use conntrack_vmstate::format::{self, EncodeOptions};

const MARK: u32 = 100;
const WAIT: Duration = Duration::from_secs(60);

use super::cache_measure::{ct, udp};

fn create(ct: &Ctnetlink, es: &[Entry]) {
    let r = ct.create(es).expect("create");
    assert_eq!(r.created, es.len() as u64, "{r:?}");
}

fn assert_same(want: &[Entry], state: &[u8]) {
    let got = format::decode(state)
        .expect("our own state decodes")
        .entries;
    let diffs = compare(want, &got, Tolerance::exact_status(2));
    assert!(
        diffs.is_empty(),
        "{} differences: {:?}",
        diffs.len(),
        &diffs[..diffs.len().min(4)]
    );
    assert_eq!(want.len(), got.len());
}

/// 20,000 entries of the VM and 10,000 of another mark, all made before
/// the watch with the event extension (nf_conntrack_events=1, as the
/// package sets it): right after the watch a Save would walk the table
/// (they are unproven until probed); once `wait_warm` says warm, the next
/// Save is answered from the pre-encoded base, equal to the kernel's.
#[test]
fn save_right_after_wait_warm_comes_from_the_base() {
    common::needs!(kernel);
    let ns = Netns::new("cwarm");
    ns.set_conntrack_events(1);
    let direct = ct(&ns);
    create(&direct, &udp(20_000, MARK, 31));
    create(&direct, &udp(10_000, 7, 32));
    let sel = Selector::mark(MARK);
    let cache = CachedAccess::new(ct(&ns), CacheConfig::default()).expect("cache");
    let t = Instant::now();
    cache.watch(&sel, true).expect("watch");
    let w = cache.wait_warm(&sel, WAIT).expect("wait_warm");
    let took = t.elapsed();
    assert_eq!(w.state, WarmState::Warm, "{w:?} after {took:?}");
    assert_eq!((w.entries, w.silent), (20_000, 0), "{w:?}");
    assert!(w.base_records >= 19_000, "{w:?}");
    assert_eq!(w.events_sysctl, Some(1));
    let saved = cache
        .save_state(&sel, &EncodeOptions::default())
        .expect("save");
    assert_eq!(
        saved.source,
        DumpSource::Base,
        "first Save after warm: {:?} ({:?})",
        saved.notes,
        cache.stats().last_fallback
    );
    assert_eq!(saved.notes.miss, None);
    assert_eq!(saved.notes.lookups, 0);
    assert_same(&direct.dump(&sel).expect("dump"), &saved.encoded.bytes);
    // Already warm: at once.
    let t = Instant::now();
    assert_eq!(
        cache.wait_warm(&sel, WAIT).expect("wait_warm").state,
        WarmState::Warm
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

/// A small VM (below the base threshold): warm means its probes are done,
/// so the Save after it needs no lookup and comes from the cache.
#[test]
fn small_vm_is_warm_once_probed_and_saves_from_the_cache() {
    common::needs!(kernel);
    let ns = Netns::new("cwarmsm");
    ns.set_conntrack_events(1);
    let direct = ct(&ns);
    create(&direct, &udp(800, MARK, 33));
    let sel = Selector::mark(MARK);
    let cache = CachedAccess::new(ct(&ns), CacheConfig::default()).expect("cache");
    cache.watch(&sel, true).expect("watch");
    let w = cache.wait_warm(&sel, WAIT).expect("wait_warm");
    assert_eq!(w.state, WarmState::Warm, "{w:?}");
    assert_eq!((w.entries, w.silent, w.base_records), (800, 0, 0), "{w:?}");
    assert!(cache.stats().probes >= 800, "{:?}", cache.stats());
    let saved = cache
        .save_state(&sel, &EncodeOptions::default())
        .expect("save");
    assert_eq!(saved.source, DumpSource::Cache, "{:?}", saved.notes);
    assert_eq!(saved.notes.lookups, 0, "{:?}", saved.notes);
    assert_same(&direct.dump(&sel).expect("dump"), &saved.encoded.bytes);
}

/// Entries made while the namespace's nf_conntrack_events was 0 never
/// report events: `wait_warm` still settles (it cannot change that), counts
/// them as silent, and the Save's notes say how many it had to look up
/// (or that it walked the table because that was cheaper). The Save is
/// exact either way.
#[test]
fn silent_entries_are_counted_and_named_in_the_save_notes() {
    common::needs!(kernel);
    let ns = Netns::new("cwarmsil");
    let direct = ct(&ns);
    ns.set_conntrack_events(0);
    create(&direct, &udp(3_000, MARK, 34));
    ns.set_conntrack_events(1);
    create(&direct, &udp(1_000, MARK, 35));
    let sel = Selector::mark(MARK);
    let cache = CachedAccess::new(ct(&ns), CacheConfig::default()).expect("cache");
    cache.watch(&sel, true).expect("watch");
    let w = cache.wait_warm(&sel, WAIT).expect("wait_warm");
    assert!(
        matches!(
            w.state,
            WarmState::Warm | WarmState::Cold(CacheMiss::LookupsCostly)
        ),
        "{w:?}"
    );
    assert_eq!((w.entries, w.silent), (4_000, 3_000), "{w:?}");
    let saved = cache
        .save_state(&sel, &EncodeOptions::default())
        .expect("save");
    let n = &saved.notes;
    assert_eq!(n.silent, 3_000, "{n:?}");
    match saved.source {
        DumpSource::Kernel => assert_eq!(n.miss, Some(CacheMiss::LookupsCostly), "{n:?}"),
        _ => {
            assert_eq!(n.miss, None, "{n:?}");
            assert_eq!(n.lookups, 3_000, "{n:?}");
            assert!(n.lookup_us > 0, "{n:?}");
        }
    }
    assert_same(&direct.dump(&sel).expect("dump"), &saved.encoded.bytes);
}

/// With events off in the namespace the cache can never get warm:
/// `wait_warm` says so at once instead of waiting out its bound, and a
/// Save's notes name the cause.
#[test]
fn wait_warm_with_events_off_returns_at_once() {
    common::needs!(kernel);
    let ns = Netns::new("cwarmoff");
    ns.set_conntrack_events(0);
    let direct = ct(&ns);
    create(&direct, &udp(100, MARK, 36));
    let sel = Selector::mark(MARK);
    let cache = CachedAccess::new(ct(&ns), CacheConfig::default()).expect("cache");
    cache.watch(&sel, true).expect("watch");
    let t = Instant::now();
    let w = cache.wait_warm(&sel, WAIT).expect("wait_warm");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(w.state, WarmState::Cold(CacheMiss::EventsOff), "{w:?}");
    assert_eq!(w.events_sysctl, Some(0));
    let saved = cache
        .save_state(&sel, &EncodeOptions::default())
        .expect("save");
    assert_eq!(saved.source, DumpSource::Kernel);
    assert_eq!(saved.notes.miss, Some(CacheMiss::EventsOff));
    // Not watched: at once, and says so.
    let other = Selector::mark(200);
    assert_eq!(
        cache.wait_warm(&other, WAIT).expect("wait_warm").state,
        WarmState::Cold(CacheMiss::NotWatched)
    );
}

/// Prints `MEASURE register-to-warm`: watch → `wait_warm` for a VM of 5k
/// and 100k entries (made before the watch, with the event extension)
/// among 150k entries of another mark in the same namespace, and the first
/// Save after it. The host table is shared: 250k entries need
/// nf_conntrack_max ≥ 262144 and no other test's entries meanwhile.
#[test]
#[ignore]
fn measure_register_to_warm() {
    common::needs!(kernel);
    for n in [5_000usize, 100_000] {
        let ns = Netns::new("cwarmm");
        ns.set_conntrack_events(1);
        let direct = ct(&ns);
        for part in 0..3u8 {
            create(&direct, &udp(50_000, 7, 100 + part));
        }
        create(&direct, &udp(n, MARK, 40));
        let sel = Selector::mark(MARK);
        let cache = CachedAccess::new(ct(&ns), CacheConfig::default()).expect("cache");
        let t = Instant::now();
        cache.watch(&sel, true).expect("watch");
        let w = cache.wait_warm(&sel, WAIT).expect("wait_warm");
        let warm = t.elapsed();
        let t = Instant::now();
        let saved = cache
            .save_state(&sel, &EncodeOptions::default())
            .expect("save");
        let save = t.elapsed();
        let t = Instant::now();
        let walked = direct
            .save_state(&sel, &EncodeOptions::default())
            .expect("direct save");
        let walk = t.elapsed();
        assert_eq!(saved.encoded.kept, walked.encoded.kept);
        println!(
            "MEASURE register-to-warm N={n} with 150000 others: warm after {:.0} ms ({:?}, \
             {} cached, {} silent, base {}; {} probes); first Save {:.1} ms from {:?}; \
             a Save walking the table {:.1} ms",
            warm.as_secs_f64() * 1000.0,
            w.state,
            w.entries,
            w.silent,
            w.base_records,
            cache.stats().probes,
            save.as_secs_f64() * 1000.0,
            saved.source,
            walk.as_secs_f64() * 1000.0,
        );
        drop(cache);
        drop(ns);
    }
}

//! The warm cache against real kernel conntrack in throw-away namespaces:
//! after watch + warm-up, a cached dump equals a direct kernel dump
//! attribute by attribute (timeouts within the documented staleness), through
//! creates, updates, deletes, mark moves, lost events and disabled events.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::compare::{compare, Tolerance};
use common::ctcli::{conntrack, load_lines, plain, wait_for};
use common::netns::{run_ok, Netns};
use common::population::{self, Spec};
use conntrack_vmstate::access::ConntrackAccess;
use conntrack_vmstate::cache::{CacheConfig, CachedAccess};
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::{proto, status, tcp_state, Entry, ProtoInfo, Selector, Tuple, L4};

const MARK: u32 = 100;
const WARM: Duration = Duration::from_secs(20);

fn ct(ns: &Netns) -> Ctnetlink {
    Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink in namespace")
}

fn cache(ns: &Netns, cfg: CacheConfig) -> CachedAccess {
    CachedAccess::new(ct(ns), cfg).expect("cache")
}

/// Timeouts of the cache are a lower bound of the kernel's, and with no
/// traffic they only differ by rounding and the seconds between two dumps.
fn tol() -> Tolerance {
    Tolerance::exact_status(2)
}

fn assert_same(what: &str, want: &[Entry], got: &[Entry]) {
    let diffs = compare(want, got, tol());
    assert!(
        diffs.is_empty(),
        "{what}: {} differences, first: {:?}",
        diffs.len(),
        &diffs[..diffs.len().min(8)]
    );
    assert_eq!(want.len(), got.len(), "{what}: entry count");
}

/// The cached timeouts never exceed the kernel's for entries nobody touched.
fn assert_not_above(cached: &[Entry], direct: &[Entry]) {
    let d: std::collections::HashMap<_, _> = direct.iter().map(|e| ((e.orig, e.zone), e)).collect();
    for c in cached {
        let k = d[&(c.orig, c.zone)];
        assert!(
            c.timeout <= k.timeout + 1,
            "cached timeout {} above kernel {} for {:?}",
            c.timeout,
            k.timeout,
            c.orig
        );
    }
}

/// `n` UDP entries of `mark` from 10.77.a.b, for bursts.
fn udp_entries(n: usize, mark: u32, base: u8) -> Vec<Entry> {
    (0..n)
        .map(|i| {
            let orig = Tuple {
                src: std::net::Ipv4Addr::new(10, base, (i >> 8) as u8, i as u8).into(),
                dst: "192.0.2.1".parse().expect("addr"),
                proto: proto::UDP,
                l4: L4::Ports {
                    src: 40000 + (i % 20000) as u16,
                    dst: 53,
                },
                zone: None,
            };
            Entry {
                orig,
                reply: orig.inverse(),
                status: status::CONFIRMED,
                timeout: 600,
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

#[test]
fn cache_follows_creates_updates_deletes_and_mark_moves() {
    common::needs!(kernel);
    let ns = Netns::new("cachefollow");
    let pop = population::generate(Spec::new(600, MARK, 51));
    population::enable_labels(&ns.name);
    // Half the VM's entries and all noise are silent: made without the
    // event extension, as entries older than the first listener are.
    let half = pop.vm_lines.len() / 2;
    let mut before: Vec<String> = pop.vm_lines[..half].to_vec();
    before.extend(pop.noise_lines.iter().cloned());
    ns.set_conntrack_events(0);
    load_lines(&ns, &before);
    ns.set_conntrack_events(2);

    let sel = Selector::mark(MARK);
    let cache = cache(&ns, CacheConfig::default());
    let direct = ct(&ns);
    cache.watch(&sel, true).expect("watch");
    assert!(cache.wait_trusted(&sel, WARM), "cache warms up");
    let warm = direct.dump(&sel).expect("direct dump");
    assert_eq!(cache.cached_len(&sel), Some(warm.len()));

    // Created after the watch: conntrack(8) lines, labelled lines, and
    // wscale'd TCP through our own codec.
    load_lines(&ns, &pop.vm_lines[half..]);
    for l in &pop.label_lines {
        run_ok(ns.cmd("conntrack").args(l.split_whitespace()));
    }
    let r = direct.create(&pop.direct).expect("codec create");
    assert_eq!(r.created, pop.direct.len() as u64);

    let all = direct.dump(&sel).expect("direct dump");
    assert_eq!(all.len(), pop.vm_count(), "population loaded");
    let now_plain = plain(&all);
    let old_keys: std::collections::HashSet<_> = warm.iter().map(|e| (e.orig, e.zone)).collect();
    let (silent, evented): (Vec<Entry>, Vec<Entry>) = now_plain
        .into_iter()
        .partition(|e| old_keys.contains(&(e.orig, e.zone)));
    assert!(
        silent.len() >= 20 && evented.len() >= 20,
        "enough entries to play with"
    );

    // Updates: a timeout, labels, a mark move out of the VM.
    conntrack(&ns, "-U", &evented[0], &["-t", "7777"]);
    conntrack(&ns, "-U", &evented[1], &["--label-add", "vm-last"]);
    conntrack(&ns, "-U", &evented[2], &["--mark", "555"]);
    // TCP state and status changes.
    let tcp: Vec<&Entry> = evented[8..]
        .iter()
        .filter(|e| e.orig.proto == proto::TCP)
        .collect();
    assert!(tcp.len() >= 2);
    conntrack(&ns, "-U", tcp[0], &["--state", "FIN_WAIT"]);
    conntrack(&ns, "-U", tcp[1], &["-u", "FIXED_TIMEOUT"]);
    // A silent entry leaving the mark sends nothing: the Save-time lookup
    // must catch it.
    conntrack(&ns, "-U", &silent[0], &["--mark", "556"]);
    // Deletes of evented and silent entries.
    for e in evented[3..8].iter().chain(&silent[1..6]) {
        conntrack(&ns, "-D", e, &[]);
    }
    // An entry of another VM created after the watch, then moved into ours.
    let outsider = udp_entries(1, 777, 78).remove(0);
    let r = direct
        .create(std::slice::from_ref(&outsider))
        .expect("create");
    assert_eq!(r.created, 1);
    conntrack(&ns, "-U", &outsider, &["--mark", &MARK.to_string()]);

    let hits = cache.stats().hits;
    let got = cache.dump(&sel).expect("cached dump");
    let want = direct.dump(&sel).expect("direct dump");
    assert_eq!(
        cache.stats().hits,
        hits + 1,
        "answered from the cache, not: {:?}",
        cache.stats().last_fallback
    );
    assert_same("after changes", &want, &got);
    assert_not_above(&got, &want);
    let keys: std::collections::HashSet<_> = got.iter().map(|e| (e.orig, e.zone)).collect();
    assert!(
        got.iter().all(|e| e.mark == MARK),
        "other marks never appear"
    );
    assert!(keys.contains(&(outsider.orig, 0)), "moved in");
    assert!(!keys.contains(&(evented[2].orig, 0)), "moved out");
    assert!(!keys.contains(&(silent[0].orig, 0)), "silently moved out");
    for e in evented[3..8].iter().chain(&silent[1..6]) {
        assert!(!keys.contains(&(e.orig, 0)), "deleted entry came back");
    }
    let t = got
        .iter()
        .find(|e| e.orig == evented[0].orig)
        .expect("updated");
    assert!((7770..=7777).contains(&t.timeout), "timeout {}", t.timeout);
    let f = got.iter().find(|e| e.orig == tcp[0].orig).expect("tcp");
    assert!(
        matches!(f.protoinfo, Some(ProtoInfo::Tcp { state, .. }) if state == tcp_state::FIN_WAIT),
        "{:?}",
        f.protoinfo
    );
    let a = got.iter().find(|e| e.orig == tcp[1].orig).expect("tcp");
    assert_eq!(a.status & status::FIXED_TIMEOUT, status::FIXED_TIMEOUT);
    let l = got
        .iter()
        .find(|e| e.orig == evented[1].orig)
        .expect("labelled");
    assert!(l.labels.is_some(), "label update reflected");

    // Labels cleared (no CTA_LABELS in the event at all) are still right.
    conntrack(&ns, "-U", &evented[1], &["--label-del", "vm-last"]);
    let got = cache.dump(&sel).expect("cached dump");
    let want = direct.dump(&sel).expect("direct dump");
    assert_same("after label clear", &want, &got);
    // Correctness is the comparisons above. A fallback is allowed only for
    // the reasons a loaded machine produces (a late refresh, events not yet
    // drained, the timed lookup-cost estimate), never for lost trust.
    let st = cache.stats();
    assert!(
        st.fallbacks == 0
            || matches!(
                st.last_fallback,
                Some(
                    "refresh overdue"
                        | "events not caught up"
                        | "lookups would cost more than a dump"
                )
            ) && st.losses == 0,
        "fell back: {:?}",
        st.last_fallback
    );
}

#[test]
fn cache_timeouts_age_and_refresh() {
    common::needs!(kernel);
    let ns = Netns::new("cacheage");
    let sel = Selector::mark(MARK);
    let cfg = CacheConfig {
        refresh_interval: Duration::from_secs(2),
        ..CacheConfig::default()
    };
    let cache = cache(&ns, cfg);
    let direct = ct(&ns);
    cache.watch(&sel, true).expect("watch");
    assert!(cache.wait_trusted(&sel, WARM));
    let mut es = udp_entries(50, MARK, 79);
    es.extend(udp_entries(10, 300, 80));
    // Short ones: the estimate reaches the margin and they are looked up.
    for e in &mut es[..5] {
        e.timeout = 4;
    }
    direct.create(&es).expect("create");
    let created = Instant::now();
    let syncs = cache.stats().syncs;
    // Bounded wait, not a fixed sleep: a starved CI runner may run the
    // refresh late, which is no failure of the cache.
    wait_for("two periodic refreshes", Duration::from_secs(30), || {
        cache.stats().syncs >= syncs + 2
    });
    // The 4 s entries are gone from the kernel after 4 s (+ slack).
    if let Some(rest) = Duration::from_millis(5500).checked_sub(created.elapsed()) {
        std::thread::sleep(rest);
    }
    let got = cache.dump(&sel).expect("cached dump");
    let want = direct.dump(&sel).expect("direct dump");
    assert_eq!(want.len(), 45, "the 4 s entries expired in the kernel");
    assert_same("aged", &want, &got);
    assert_not_above(&got, &want);
    assert!(cache.stats().hits >= 1);
}

#[test]
fn cache_lost_events_fall_back_then_resync() {
    common::needs!(kernel);
    let ns = Netns::new("cachelost");
    let sel = Selector::mark(MARK);
    let cfg = CacheConfig {
        // Test-only: a tiny queue so that a burst overruns it for real.
        event_rcvbuf: 4096,
        resync_delay: Duration::from_secs(3),
        ..CacheConfig::default()
    };
    let cache = cache(&ns, cfg);
    let direct = ct(&ns);
    // Silent, so that probing them sends no events into the tiny queue.
    ns.set_conntrack_events(0);
    direct.create(&udp_entries(100, MARK, 81)).expect("create");
    ns.set_conntrack_events(2);
    cache.watch(&sel, true).expect("watch");
    assert!(cache.wait_trusted(&sel, WARM));
    // One create call: the kernel emits 3000 NEW events inside our send.
    let r = direct.create(&udp_entries(3000, MARK, 82)).expect("burst");
    assert_eq!(r.created, 3000);
    wait_for("loss detected", Duration::from_secs(5), || {
        cache.stats().losses >= 1
    });
    assert!(!cache.is_trusted(&sel), "untrusted after a loss");
    let before = cache.stats();
    let got = cache.dump(&sel).expect("fallback dump");
    let want = direct.dump(&sel).expect("direct dump");
    assert_eq!(cache.stats().fallbacks, before.fallbacks + 1, "fell back");
    assert_eq!(cache.stats().hits, before.hits);
    assert_eq!(want.len(), 3100);
    assert_same("fallback", &want, &got);

    assert!(cache.wait_trusted(&sel, WARM), "resynced");
    // The burst's entries came back through the resync dump; their probes
    // prove they report events, so Save needs no lookups for them.
    wait_for("probes of the burst", WARM, || cache.stats().probes >= 3000);
    let got = cache.dump(&sel).expect("cached dump");
    let want = direct.dump(&sel).expect("direct dump");
    assert_eq!(
        cache.stats().hits,
        before.hits + 1,
        "from the cache again, not: {:?}",
        cache.stats().last_fallback
    );
    assert_same("after resync", &want, &got);
}

#[test]
fn cache_with_events_disabled_is_the_direct_dump() {
    common::needs!(kernel);
    let ns = Netns::new("cacheoff");
    run_ok(
        ns.cmd("sysctl")
            .args(["-qw", "net.netfilter.nf_conntrack_events=0"]),
    );
    let sel = Selector::mark(MARK);
    let cache = cache(&ns, CacheConfig::default());
    let direct = ct(&ns);
    direct.create(&udp_entries(200, MARK, 83)).expect("create");
    direct.create(&udp_entries(50, 9, 84)).expect("create");
    cache.watch(&sel, true).expect("watch");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        cache.stats().syncs,
        0,
        "no point dumping while events are off"
    );
    // Created while delivery is off: no event will ever tell.
    direct.create(&udp_entries(30, MARK, 85)).expect("create");
    assert!(!cache.is_trusted(&sel), "never trusted without events");
    let got = cache.dump(&sel).expect("dump");
    let want = direct.dump(&sel).expect("direct");
    assert_eq!(want.len(), 230);
    assert_same("events off", &want, &got);
    assert_eq!(cache.stats().hits, 0);
    assert!(cache.stats().fallbacks >= 1);

    run_ok(
        ns.cmd("sysctl")
            .args(["-qw", "net.netfilter.nf_conntrack_events=2"]),
    );
    assert!(
        cache.wait_trusted(&sel, WARM),
        "trusted once events are back"
    );
    let got = cache.dump(&sel).expect("dump");
    assert_same("events back", &direct.dump(&sel).expect("direct"), &got);
    assert_eq!(cache.stats().hits, 1);
}

#[test]
fn cache_unwatched_selectors_are_direct_and_unwatch_stops_tracking() {
    common::needs!(kernel);
    let ns = Netns::new("cacheunw");
    let a = Selector::mark(MARK);
    let b = Selector::mark(200);
    let cache = cache(&ns, CacheConfig::default());
    let direct = ct(&ns);
    direct.create(&udp_entries(40, MARK, 86)).expect("create");
    direct.create(&udp_entries(25, 200, 87)).expect("create");
    // Never watched: direct, even before anything started.
    let s0 = cache.stats();
    assert_same(
        "cold b",
        &direct.dump(&b).expect("d"),
        &cache.dump(&b).expect("c"),
    );
    assert_eq!(cache.stats().unwatched, s0.unwatched + 1);

    cache.watch(&a, true).expect("watch");
    cache.watch(&a, true).expect("second watcher");
    assert!(cache.wait_trusted(&a, WARM));
    assert_eq!(cache.cached_len(&b), None);
    assert_same(
        "b",
        &direct.dump(&b).expect("d"),
        &cache.dump(&b).expect("c"),
    );
    assert_eq!(cache.stats().unwatched, s0.unwatched + 2);
    assert_same(
        "a",
        &direct.dump(&a).expect("d"),
        &cache.dump(&a).expect("c"),
    );
    assert_eq!(cache.stats().hits, 1);

    // One of two watchers leaves: still watched.
    cache.watch(&a, false).expect("unwatch");
    assert_eq!(cache.cached_len(&a), Some(40));
    cache.watch(&a, false).expect("unwatch");
    assert_eq!(cache.cached_len(&a), None, "tracking stopped");
    direct.create(&udp_entries(5, MARK, 88)).expect("create");
    let got = cache.dump(&a).expect("c");
    assert_eq!(got.len(), 45);
    assert_same("a unwatched", &direct.dump(&a).expect("d"), &got);
    assert_eq!(cache.stats().hits, 1, "no cache answer after unwatch");
    assert_eq!(cache.stats().unwatched, s0.unwatched + 3);
    // The command line tool agrees on what is there.
    let n = Command::new("ip")
        .args(["netns", "exec", &ns.name, "conntrack", "-L", "-m", "100"])
        .output()
        .expect("conntrack");
    let lines = String::from_utf8_lossy(&n.stdout).lines().count();
    assert_eq!(lines, 45);
}

#[test]
fn cache_probe_tells_reporting_entries_from_silent_ones() {
    common::needs!(kernel);
    let ns = Netns::new("cacheprobe");
    let sel = Selector::mark(MARK);
    let direct = ct(&ns);
    // Under 0 no entry gets the event extension. (Under 2, the default, an
    // entry gets it when a listener exists anywhere on the host at its
    // creation, checked on 6.18: not deterministic with parallel tests.)
    ns.set_conntrack_events(0);
    let silent = udp_entries(40, MARK, 89);
    direct.create(&silent).expect("create");
    // Under 1 every entry gets the extension, listener or not.
    ns.set_conntrack_events(1);
    let loud = udp_entries(60, MARK, 90);
    direct.create(&loud).expect("create");

    let cache = cache(&ns, CacheConfig::default());
    cache.watch(&sel, true).expect("watch");
    assert!(cache.wait_trusted(&sel, WARM));
    wait_for("probes", Duration::from_secs(10), || {
        cache.stats().probes >= 100
    });
    // The probes changed nothing.
    let want = direct.dump(&sel).expect("direct");
    assert_eq!(want.len(), 100);
    assert!(want
        .iter()
        .all(|e| e.mark == MARK && e.status == status::CONFIRMED));

    // Only the 40 silent entries still need a lookup at Save.
    let s0 = cache.stats();
    let got = cache.dump(&sel).expect("cached");
    assert_same("probed", &want, &got);
    let s1 = cache.stats();
    assert_eq!(s1.hits, s0.hits + 1);
    assert_eq!(
        s1.lookups - s0.lookups,
        40,
        "lookups of silent entries only"
    );

    // A proven entry reports its deletion; a silent one is caught by lookup.
    conntrack(&ns, "-D", &loud[0], &[]);
    conntrack(&ns, "-D", &silent[0], &[]);
    let got = cache.dump(&sel).expect("cached");
    assert_same("after deletes", &direct.dump(&sel).expect("direct"), &got);
    assert_eq!(got.len(), 98);
    assert_eq!(
        cache.stats().lookups - s1.lookups,
        40,
        "39 silent left + the deleted one"
    );
}

#[test]
fn cache_stays_exact_under_churn_during_syncs() {
    common::needs!(kernel);
    let ns = Netns::new("cachechurn");
    let sel = Selector::mark(MARK);
    let cfg = CacheConfig {
        // Syncs back to back: events keep racing the dumps.
        refresh_interval: Duration::from_millis(20),
        ..CacheConfig::default()
    };
    let cache = cache(&ns, cfg);
    let direct = ct(&ns);
    // Every entry reports events (none silent): Saves need no lookups.
    ns.set_conntrack_events(1);
    let mut live = udp_entries(3000, MARK, 91);
    direct.create(&live).expect("create");
    cache.watch(&sel, true).expect("watch");
    assert!(cache.wait_trusted(&sel, WARM));
    let syncs = cache.stats().syncs;
    let mut other = udp_entries(3000, 400, 92);
    for round in 0..4u8 {
        // For a while, in small steps while syncs run: delete ours, create
        // ours and another mark's, move some of the other mark into ours.
        let end = Instant::now() + Duration::from_millis(400);
        let mut step = 0u8;
        while Instant::now() < end && step < 10 {
            let gone: Vec<Entry> = live.drain(..50).collect();
            let r = direct.delete_entries(&gone).expect("delete");
            assert_eq!(r.deleted, 50);
            let mut fresh = udp_entries(50, MARK, 100 + round);
            for e in &mut fresh {
                e.orig.l4 = L4::Ports {
                    src: 1000 + u16::from(step),
                    dst: 53,
                };
                e.reply = e.orig.inverse();
            }
            direct.create(&fresh).expect("create");
            live.extend(fresh);
            let mut o: Vec<Entry> = other.drain(..20).collect();
            direct.create(&o).expect("create other");
            for e in &mut o[..2] {
                conntrack(&ns, "-U", e, &["--mark", &MARK.to_string()]);
                e.mark = MARK;
                live.push(e.clone());
            }
            step += 1;
        }
        let before = cache.stats();
        let got = cache.dump(&sel).expect("cached");
        let after = cache.stats();
        let want = direct.dump(&sel).expect("direct");
        assert_eq!(want.len(), live.len());
        assert_same(&format!("round {round}"), &want, &got);
        // Whether a Save that finds entries still to look up (moved in a
        // moment ago) uses lookups or dumps is a cost estimate from
        // measured timings, so either may happen on a loaded machine; both
        // are exact. Any other reason to bypass the cache is a failure.
        assert_eq!(
            after.hits + after.fallbacks,
            before.hits + before.fallbacks + 1
        );
        if after.fallbacks > before.fallbacks {
            assert_eq!(
                after.last_fallback,
                Some("lookups would cost more than a dump"),
                "round {round}: {after:?}"
            );
        }
    }
    let st = cache.stats();
    assert!(st.syncs >= syncs + 4, "syncs ran meanwhile: {st:?}");
}

#[test]
fn cache_many_selectors_share_one_walk() {
    common::needs!(kernel);
    let ns = Netns::new("cachemany");
    let cfg = CacheConfig {
        refresh_interval: Duration::from_millis(300),
        ..CacheConfig::default()
    };
    let cache = cache(&ns, cfg);
    let direct = ct(&ns);
    ns.set_conntrack_events(1);
    let sels = [
        Selector::mark(101),
        Selector::mark(102),
        Selector::mark(103),
        // Marks 0x200..=0x2ff.
        Selector {
            mark: 0x200,
            mark_mask: 0xffff_ff00,
            zone: None,
        },
        Selector {
            mark: 101,
            mark_mask: u32::MAX,
            zone: Some(7),
        },
    ];
    for (i, m) in [101u32, 102, 103, 0x201, 0x2fe, 0x300].iter().enumerate() {
        let mut es = udp_entries(100, *m, 100 + i as u8);
        if *m == 101 {
            for e in &mut es[..30] {
                e.zone = 7;
            }
        }
        direct.create(&es).expect("create");
    }
    for s in &sels {
        cache.watch(s, true).expect("watch");
    }
    for s in &sels {
        assert!(cache.wait_trusted(s, WARM));
    }
    let s0 = cache.stats();
    // About 1.2 s of 300 ms refreshes; bounded wait rather than a fixed
    // sleep, so a slow runner is no failure.
    wait_for("ten refreshes", Duration::from_secs(30), || {
        cache.stats().syncs >= s0.syncs + 10
    });
    // Changes while refreshes run.
    direct.create(&udp_entries(10, 102, 120)).expect("create");
    direct.create(&udp_entries(10, 0x2aa, 121)).expect("create");
    let s1 = cache.stats();
    assert!(
        (s1.walks - s0.walks) * 2 <= s1.syncs - s0.syncs,
        "selectors were refreshed together: {s1:?}"
    );
    let want_len = [100, 110, 100, 210, 30];
    for (s, n) in sels.iter().zip(want_len) {
        let got = cache.dump(s).expect("cached");
        let want = direct.dump(s).expect("direct");
        assert_eq!(want.len(), n, "{s:?}");
        assert_same(&format!("{s:?}"), &want, &got);
    }
    assert_eq!(
        cache.stats().hits,
        s1.hits + 5,
        "{:?}",
        cache.stats().last_fallback
    );
}

/// The threads of this process named `ct-events` and their scheduling
/// policies (tests run in parallel, each cache has its own).
fn event_thread_policies() -> Vec<(i32, i32)> {
    common::threads::named("ct-events")
        .into_iter()
        // SAFETY: a query by thread id; a thread gone meanwhile gives -1.
        .map(|t| (t.tid, unsafe { libc::sched_getscheduler(t.tid) }))
        .filter(|&(_, p)| p >= 0)
        .collect()
}

/// The event thread wakes for every conntrack event, up to ~100k a second
/// in a restore or a flush: under SCHED_BATCH those wake-ups never preempt
/// a guest's vCPU (docs/downtime.md, the booted-guest figures).
#[test]
fn the_event_thread_runs_under_sched_batch() {
    common::needs!(kernel);
    let ns = Netns::new("cebatch");
    let c = cache(&ns, CacheConfig::default());
    c.watch(&Selector::mark(MARK), true).expect("watch");
    // The thread sets its policy as it starts: wait for that, bounded.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let threads = event_thread_policies();
        if !threads.is_empty() && threads.iter().all(|&(_, p)| p == libc::SCHED_BATCH) {
            break;
        }
        assert!(
            Instant::now() < end,
            "ct-events threads not under SCHED_BATCH ({}) after 5 s: (tid, policy) {threads:?}",
            libc::SCHED_BATCH
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

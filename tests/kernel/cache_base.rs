//! The warm cache's pre-encoded base against real kernel conntrack in
//! throw-away namespaces: a Save answered from the base plus what changed
//! since holds exactly the entries a direct kernel dump finds, attribute by
//! attribute (timeouts within the documented staleness), through creates,
//! updates, deletes and mark moves after the base was built; destroyed
//! entries never come back; a state too big with the base falls back to a
//! whole encode.

use std::path::Path;
use std::time::Duration;

use common::compare::{compare, Tolerance};
use common::ctcli::{conntrack, load_lines, plain, wait_for};
use common::netns::{run_ok, Netns};
use common::population::{self, Spec};
use conntrack_vmstate::access::{ConntrackAccess, DumpSource};
use conntrack_vmstate::cache::{CacheConfig, CachedAccess};
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::{proto, tcp_state, Entry, ProtoInfo, Selector};
use conntrack_vmstate::format::{self, EncodeOptions};

const MARK: u32 = 100;
const WARM: Duration = Duration::from_secs(20);

fn ct(ns: &Netns) -> Ctnetlink {
    Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink in namespace")
}

/// A base for any selector with entries, rebuilt at most every
/// `interval`.
fn cache(ns: &Netns, interval: Duration) -> CachedAccess {
    let cfg = CacheConfig {
        base_min_entries: 1,
        base_interval: interval,
        // No refresh (it replaces the table and with it the base) while a
        // test runs.
        refresh_interval: Duration::from_secs(300),
        ..CacheConfig::default()
    };
    CachedAccess::new(ct(ns), cfg).expect("cache")
}

/// Save through the cache, decoded; asserts where it came from.
fn save(
    cache: &CachedAccess,
    sel: &Selector,
    opts: &EncodeOptions,
    from: DumpSource,
) -> Vec<Entry> {
    let saved = cache.save_state(sel, opts).expect("save");
    assert_eq!(
        saved.source,
        from,
        "Save source (last fallback: {:?})",
        cache.stats().last_fallback
    );
    assert!(saved.encoded.bytes.len() <= opts.limit);
    let d = format::decode(&saved.encoded.bytes).expect("our own state decodes");
    assert_eq!(d.entries.len(), saved.encoded.kept, "kept count");
    // The ids are every saved entry's, for a later flush.
    let mut ids = saved.ids.clone();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), saved.ids.len(), "ids unique");
    d.entries
}

fn assert_same(what: &str, want: &[Entry], got: &[Entry]) {
    // Timeouts: the cache's estimate (a lower bound of the kernel's, two
    // seconds of slack for rounding and the time between the two reads).
    let diffs = compare(want, got, Tolerance::exact_status(2));
    assert!(
        diffs.is_empty(),
        "{what}: {} differences, first: {:?}",
        diffs.len(),
        &diffs[..diffs.len().min(8)]
    );
    assert_eq!(want.len(), got.len(), "{what}: entry count");
}

#[test]
fn save_from_the_base_equals_the_kernel_after_every_kind_of_change() {
    common::needs!(kernel);
    let ns = Netns::new("cachebase");
    let pop = population::generate(Spec::new(800, MARK, 61));
    population::enable_labels(&ns.name);
    let sel = Selector::mark(MARK);
    // The event thread builds no base after the first during this test
    // (its one build comes before the entries): the test decides when.
    let cache = cache(&ns, Duration::from_secs(3600));
    let direct = ct(&ns);
    cache.watch(&sel, true).expect("watch");
    assert!(cache.wait_trusted(&sel, WARM), "cache warms up");
    // Everything created after the watch, so every entry is evented (a
    // silent one would need a lookup and never be in the base).
    load_lines(&ns, &pop.vm_lines);
    load_lines(&ns, &pop.noise_lines);
    for l in &pop.label_lines {
        run_ok(ns.cmd("conntrack").args(l.split_whitespace()));
    }
    let r = direct.create(&pop.direct).expect("codec create");
    assert_eq!(r.created, pop.direct.len() as u64);
    let all = direct.dump(&sel).expect("direct dump");
    assert_eq!(all.len(), pop.vm_count(), "population loaded");

    // A base of all of them but those with little time left, which stay
    // out of it by design (they may expire or change class before Save).
    let records = cache.rebuild_base(&sel).expect("base built");
    let long_lived = all.iter().filter(|e| e.timeout > 75).count();
    let short = all.iter().filter(|e| e.timeout <= 65).count();
    assert!(
        records >= long_lived && records <= all.len() - short,
        "{records} records of {} entries",
        all.len()
    );
    let opts = EncodeOptions::default();
    let got = save(&cache, &sel, &opts, DumpSource::Base);
    assert_same("unchanged", &direct.dump(&sel).expect("dump"), &got);

    // Changes the base must not hide. Updates: timeout, label, mark move
    // out, TCP state, status; deletes; new entries; a mark move in.
    let p = plain(&all);
    let tcp: Vec<&Entry> = p.iter().filter(|e| e.orig.proto == proto::TCP).collect();
    assert!(
        p.len() >= 40 && tcp.len() >= 4,
        "enough entries to play with"
    );
    let builds = cache.stats().base_builds;
    conntrack(&ns, "-U", &p[0], &["-t", "7777"]);
    conntrack(&ns, "-U", &p[1], &["--label-add", "vm-last"]);
    conntrack(&ns, "-U", &p[2], &["--mark", "555"]);
    conntrack(&ns, "-U", tcp[0], &["--state", "FIN_WAIT"]);
    conntrack(&ns, "-U", tcp[1], &["-u", "FIXED_TIMEOUT"]);
    let deleted: Vec<&Entry> = p[10..20].iter().collect();
    for e in &deleted {
        conntrack(&ns, "-D", e, &[]);
    }
    let fresh: Vec<Entry> = pop
        .direct
        .iter()
        .take(20)
        .map(|e| {
            let mut e = e.clone();
            // Same shapes, other addresses: new entries.
            if let std::net::IpAddr::V4(a) = e.orig.src {
                let o = a.octets();
                e.orig.src = std::net::Ipv4Addr::new(o[0], o[1] ^ 0x40, o[2], o[3]).into();
                e.reply = e.orig.inverse();
            }
            e.id = None;
            e
        })
        .filter(|e| e.orig.src.is_ipv4() && !e.is_nat())
        .collect();
    assert!(!fresh.is_empty());
    assert_eq!(
        direct.create(&fresh).expect("create").created,
        fresh.len() as u64
    );
    let mut outsider = fresh[0].clone();
    if let std::net::IpAddr::V4(a) = outsider.orig.src {
        let o = a.octets();
        outsider.orig.src = std::net::Ipv4Addr::new(o[0], o[1] ^ 0x20, o[2], o[3]).into();
        outsider.reply = outsider.orig.inverse();
    }
    outsider.mark = 777;
    assert_eq!(
        direct
            .create(std::slice::from_ref(&outsider))
            .expect("create")
            .created,
        1
    );
    if outsider.orig.proto == proto::TCP || outsider.orig.proto == proto::UDP {
        conntrack(&ns, "-U", &outsider, &["--mark", &MARK.to_string()]);
    }

    let want = direct.dump(&sel).expect("direct dump");
    let info = cache.base_info(&sel).expect("base");
    let got = save(&cache, &sel, &opts, DumpSource::Base);
    assert_same("after changes", &want, &got);
    // The Save above really patched the old base.
    assert_eq!(cache.stats().base_builds, builds, "no rebuild");
    assert!(info.changes >= 5 + deleted.len() + fresh.len(), "{info:?}");
    let keys: std::collections::HashSet<_> = got.iter().map(|e| (e.orig, e.zone)).collect();
    for e in &deleted {
        assert!(!keys.contains(&(e.orig, e.zone)), "deleted entry came back");
    }
    assert!(!keys.contains(&(p[2].orig, 0)), "moved out");
    for e in &fresh {
        assert!(keys.contains(&(e.orig, e.zone)), "new entry missing: {e:?}");
    }
    let t = got.iter().find(|e| e.orig == p[0].orig).expect("updated");
    assert!((7770..=7777).contains(&t.timeout), "timeout {}", t.timeout);
    let f = got.iter().find(|e| e.orig == tcp[0].orig).expect("tcp");
    assert!(
        matches!(f.protoinfo, Some(ProtoInfo::Tcp { state, .. }) if state == tcp_state::FIN_WAIT),
        "{:?}",
        f.protoinfo
    );
    let l = got.iter().find(|e| e.orig == p[1].orig).expect("labelled");
    assert!(l.labels.is_some(), "label update reflected");

    // Load's order: most valuable first, whatever the base and delta hold.
    let saved = cache.save_state(&sel, &opts).expect("save");
    let mut s = format::stream(&saved.encoded.bytes).expect("stream");
    let mut keys = Vec::new();
    while let Some(b) = s.next_batch(64) {
        keys.extend(b.expect("batch").iter().map(format::priority::value_key));
    }
    assert_eq!(keys.len(), want.len());
    assert!(
        keys.windows(2).all(|w| w[0] >= w[1]),
        "stream in priority order"
    );

    // A limit the patched state does not fit: a whole encode drops the
    // least valuable instead.
    let small = EncodeOptions {
        limit: 4096,
        ..EncodeOptions::default()
    };
    let got = save(&cache, &sel, &small, DumpSource::Cache);
    assert!(!got.is_empty() && got.len() < want.len(), "{}", got.len());

    // Rebuilt after the changes: still the same.
    for e in &p[20..40] {
        conntrack(&ns, "-D", e, &[]);
    }
    cache.rebuild_base(&sel).expect("rebuilt");
    assert_eq!(cache.base_info(&sel).map(|b| b.changes), Some(0));
    let want = direct.dump(&sel).expect("direct dump");
    let got = save(&cache, &sel, &opts, DumpSource::Base);
    assert_same("after a rebuild", &want, &got);
    assert_eq!(cache.stats().base_saves, 4);
}

#[test]
fn the_event_thread_rebuilds_the_base_after_many_changes() {
    common::needs!(kernel);
    let ns = Netns::new("cachebase2");
    let sel = Selector::mark(MARK);
    let cache = cache(&ns, Duration::from_millis(200));
    let direct = ct(&ns);
    cache.watch(&sel, true).expect("watch");
    assert!(cache.wait_trusted(&sel, WARM), "cache warms up");
    let first = population::generate(Spec::new(400, MARK, 63)).vm_entries;
    assert_eq!(
        direct.create(&first).expect("create").created,
        first.len() as u64
    );
    wait_for("a first base", WARM, || cache.base_info(&sel).is_some());
    let builds = cache.stats().base_builds;
    // More than the 256 changes that make a base worth rebuilding.
    let more = population::generate(Spec::new(400, MARK, 64)).vm_entries;
    let r = direct.create(&more).expect("create");
    assert!(r.created >= 300, "{r:?}");
    wait_for("a rebuilt base", WARM, || {
        cache.stats().base_builds > builds
    });
    let want = direct.dump(&sel).expect("direct dump");
    let got = save(&cache, &sel, &EncodeOptions::default(), DumpSource::Base);
    assert_same("after an automatic rebuild", &want, &got);
    // The base's records were checked; the whole population is there.
    assert!(cache
        .base_info(&sel)
        .is_some_and(|b| b.records > first.len()));
}

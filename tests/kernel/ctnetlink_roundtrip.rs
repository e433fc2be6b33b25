//! ctnetlink against the real kernel, in throw-away namespaces: dump by mark,
//! create into an empty namespace, compare every attribute (our codec and,
//! independently, conntrack(8)'s listing), refusals, existing entries.

use std::collections::HashSet;
use std::path::Path;

use common::compare::{compare, cross_check, Tolerance};
use common::netns::Netns;
use common::population::{self, Spec};
use conntrack_vmstate::access::{ConntrackAccess, CreateReport};
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::{proto, status, Entry, ProtoInfo, Selector, L4};

const MARK: u32 = 7;

fn ct(ns: &Netns) -> Ctnetlink {
    Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink in namespace")
}

fn loaded(tag: &str, n: usize, seed: u64) -> (Netns, population::Population) {
    let ns = Netns::new(tag);
    let pop = population::generate(Spec::new(n, MARK, seed));
    population::load(&ns.name, &pop);
    (ns, pop)
}

fn wscale_of(e: &Entry) -> (u8, u8) {
    match e.protoinfo {
        Some(ProtoInfo::Tcp {
            wscale_orig,
            wscale_reply,
            ..
        }) => (wscale_orig, wscale_reply),
        _ => (0, 0),
    }
}

#[test]
fn dump_by_mark_returns_exactly_the_vms_entries() {
    common::needs!(kernel);
    let (ns, pop) = loaded("ctdump", 3000, 11);
    let ct = ct(&ns);
    let got = ct.dump(&Selector::mark(MARK)).expect("dump");
    assert_eq!(got.len(), pop.vm_count(), "entries of mark {MARK}");
    let keys: HashSet<_> = got.iter().map(|e| (e.orig, e.zone)).collect();
    assert_eq!(
        keys, pop.vm_keys,
        "dumped tuples differ from generated ones"
    );
    assert!(got.iter().all(|e| e.mark == MARK));
    assert!(got.iter().all(|e| e.id.is_some() && e.timeout > 0));
    assert!(got.iter().any(Entry::is_ipv6), "IPv6 came in the same pass");
    assert!(got.iter().any(|e| !e.is_ipv6()));
    // The kernel applied the mark filter itself, IPv4 and IPv6 in one
    // AF_UNSPEC dump: nothing of another mark reached user space.
    assert_eq!(ct.filtered_in_user_space(), 0);

    // Every noise mark gives exactly its own entries; together, all noise.
    let mut noise = 0;
    for &m in &pop.noise_marks {
        let d = ct.dump(&Selector::mark(m)).expect("dump noise");
        assert!(d.iter().all(|e| e.mark == m));
        noise += d.len();
    }
    assert_eq!(noise, pop.noise_lines.len());
    assert_eq!(ns.conntrack_count(), pop.vm_count() + noise);

    // Mark mask: the low 16 bits select mark 7 and nothing else here.
    let masked = ct
        .dump(&Selector {
            mark: MARK,
            mark_mask: 0xffff,
            zone: None,
        })
        .expect("masked dump");
    assert_eq!(masked.len(), pop.vm_count());

    // Zone selection (in user space, after the kernel's mark filter).
    let zones: HashSet<u16> = got.iter().map(|e| e.zone).filter(|&z| z != 0).collect();
    assert!(!zones.is_empty(), "population has zoned entries");
    for z in zones.into_iter().chain([0]) {
        let sel = Selector {
            mark: MARK,
            mark_mask: u32::MAX,
            zone: Some(z),
        };
        let d = ct.dump(&sel).expect("zone dump");
        let want = got.iter().filter(|e| e.zone == z).count();
        assert_eq!(d.len(), want, "zone {z}");
        assert!(d.iter().all(|e| e.zone == z && e.mark == MARK));
    }
}

#[test]
fn roundtrip_copies_every_attribute() {
    common::needs!(kernel);
    let (src, pop) = loaded("ctsrc", 3000, 12);
    let dst = Netns::new("ctdst");
    population::enable_labels(&dst.name);
    let (a, b) = (ct(&src), ct(&dst));
    let saved = a.dump(&Selector::mark(MARK)).expect("dump source");
    assert_eq!(saved.len(), pop.vm_count());

    // The population covers what the round trip must carry.
    let count = |f: &dyn Fn(&Entry) -> bool| saved.iter().filter(|e| f(e)).count();
    assert!(count(&|e| e.is_ipv6() && e.orig.proto == proto::TCP) > 0);
    assert!(count(&|e| e.is_ipv6() && e.orig.proto == proto::ICMPV6) > 0);
    assert!(count(&|e| e.orig.proto == proto::ICMP) > 0);
    assert!(count(&|e| e.is_nat() && e.status & status::SRC_NAT != 0) > 0);
    assert!(count(&|e| e.is_nat() && e.status & status::DST_NAT != 0) > 0);
    assert!(count(&|e| e.zone != 0) > 0);
    assert!(count(&|e| e.orig.zone.is_some()) > 0);
    assert!(count(&|e| e.labels.is_some()) > 0);
    assert!(count(&|e| wscale_of(e) != (0, 0)) > 0);
    assert!(count(&|e| e.status & status::FIXED_TIMEOUT != 0) > 0);
    assert!(count(&|e| e.status & status::SEEN_REPLY == 0) > 0);

    let report = b.create(&saved).expect("create");
    assert_eq!(
        report,
        CreateReport {
            created: saved.len() as u64,
            ..Default::default()
        }
    );
    let copy = b.dump(&Selector::mark(MARK)).expect("dump copy");
    let diffs = compare(&saved, &copy, Tolerance::exact_status(5));
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    let diffs = cross_check(&src.name, &dst.name, MARK);
    assert!(
        diffs.is_empty(),
        "conntrack(8) sees differences:\n{}",
        diffs.join("\n")
    );
    // Nothing of another mark was copied.
    assert_eq!(dst.conntrack_count(), saved.len());

    // Loading the same entries again: every one already exists.
    let again = b.create(&saved).expect("create again");
    assert_eq!(again.existed, saved.len() as u64);
    assert_eq!((again.created, again.refused), (0, 0));
    assert_eq!(dst.conntrack_count(), saved.len());
}

/// A copy of `e` that the comparisons must tell apart from `e`.
fn mutations(saved: &[Entry]) -> Vec<(&'static str, Entry, Entry)> {
    let find = |f: &dyn Fn(&Entry) -> bool| {
        saved
            .iter()
            .find(|e| f(e))
            .cloned()
            .expect("entry kind present")
    };
    let mut v = Vec::new();
    let e = find(&|e| e.labels.is_some());
    v.push(("labels", e.clone(), Entry { labels: None, ..e }));
    let e = find(&|e| e.zone != 0);
    v.push(("zone", e.clone(), Entry { zone: 0, ..e }));
    let e = find(&|e| e.zone == 0 && e.labels.is_none() && !e.is_nat());
    v.push((
        "mark",
        e.clone(),
        Entry {
            mark: MARK + 1,
            ..e
        },
    ));
    let e = find(&|e| e.is_nat() && e.labels.is_none() && e.zone == 0);
    let plain = Entry {
        reply: e.orig.inverse(),
        status: e.status
            & !(status::SRC_NAT | status::DST_NAT | status::SRC_NAT_DONE | status::DST_NAT_DONE),
        ..e.clone()
    };
    v.push(("NAT reply tuple", e, plain));
    let e = find(&|e| wscale_of(e) != (0, 0));
    let mut w = e.clone();
    if let Some(ProtoInfo::Tcp {
        ref mut wscale_orig,
        ref mut wscale_reply,
        ..
    }) = w.protoinfo
    {
        *wscale_orig = 0;
        *wscale_reply = 0;
    }
    v.push(("wscale", e, w));
    v
}

#[test]
fn comparisons_fail_on_missing_attributes() {
    common::needs!(kernel);
    let (src, _pop) = loaded("ctcmp", 1500, 13);
    let dst = Netns::new("ctcmpd");
    population::enable_labels(&dst.name);
    let (a, b) = (ct(&src), ct(&dst));
    let saved = a.dump(&Selector::mark(MARK)).expect("dump");
    b.create(&saved).expect("create");
    assert!(cross_check(&src.name, &dst.name, MARK).is_empty());

    for (what, good, bad) in mutations(&saved) {
        // Our comparison, on entries.
        let mut copy = saved.clone();
        let i = copy.iter().position(|e| *e == good).expect("present");
        copy[i] = bad.clone();
        let diffs = compare(&saved, &copy, Tolerance::exact_status(5));
        assert!(!diffs.is_empty(), "compare missed a changed {what}");

        // The independent check, on a real table: swap the entry for the
        // damaged one, then put it back. conntrack(8) shows no wscale.
        if what == "wscale" {
            continue;
        }
        // CTA_ID is host-local: delete the copy's own entry.
        let here = b.dump(&Selector::mark(MARK)).expect("dump");
        let mine = here
            .iter()
            .find(|e| e.orig == good.orig)
            .expect("copy present");
        assert_ne!(mine.id, good.id, "ids are per host");
        let gone = b
            .delete_entries(std::slice::from_ref(mine))
            .expect("delete");
        assert_eq!(gone.deleted, 1, "{what}");
        let r = create_after_delete(&b, &bad);
        if what == "NAT reply tuple" && r.refused_by_errno == [(libc::EINVAL, 1)] {
            // 6.18 sometimes keeps refusing the plain copy of a just-deleted
            // NAT'ed tuple for seconds (the old NAT binding lingers); our
            // own comparison above already caught this mutation.
            eprintln!("{what}: kernel kept refusing the re-create (EINVAL); table check skipped");
            let orig = create_after_delete(&b, &good);
            assert_eq!(orig.created + orig.existed, 1, "{what}: {orig:?}");
            continue;
        }
        assert_eq!(r.created, 1, "{what}: {r:?}");
        let diffs = cross_check(&src.name, &dst.name, MARK);
        assert!(!diffs.is_empty(), "cross-check missed a changed {what}");
        let now = b.dump(&Selector::mark(bad.mark)).expect("dump");
        let cur = now
            .iter()
            .find(|e| e.orig == bad.orig)
            .expect("damaged entry present");
        assert_eq!(
            b.delete_entries(std::slice::from_ref(cur))
                .expect("delete")
                .deleted,
            1
        );
        let r = create_after_delete(&b, &good);
        assert_eq!(r.created, 1, "{what} restore: {r:?}");
        assert!(
            cross_check(&src.name, &dst.name, MARK).is_empty(),
            "{what} not restored"
        );
    }
}

/// Creates `e` where an entry with the same original tuple was deleted a
/// moment ago. Seen on 6.18 (about 1 run in 8 on a loaded machine): swapping
/// a NAT'ed entry for a plain one with the same tuple right after the delete
/// is refused with EINVAL while the old entry's NAT binding is still being
/// torn down; a moment later the same request succeeds. Migrations never do
/// this (they create into a table that never held the entry), so the test
/// retries, bounded, instead of asserting on the kernel's teardown timing.
fn create_after_delete(b: &Ctnetlink, e: &Entry) -> CreateReport {
    let mut r = b.create(std::slice::from_ref(e)).expect("create");
    for _ in 0..60 {
        if r.refused_by_errno != [(libc::EINVAL, 1)] {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        r = b.create(std::slice::from_ref(e)).expect("create");
    }
    r
}

#[test]
fn refused_entries_are_counted_and_the_rest_loads() {
    common::needs!(kernel);
    let (src, _pop) = loaded("ctref", 1000, 14);
    let dst = Netns::new("ctrefd");
    population::enable_labels(&dst.name);
    let saved = ct(&src).dump(&Selector::mark(MARK)).expect("dump");
    let tcp = saved
        .iter()
        .find(|e| e.orig.proto == proto::TCP && !e.is_nat() && e.zone == 0 && !e.is_ipv6())
        .expect("tcp entry")
        .clone();
    let mut bad = Vec::new();
    // EXPECTED: the kernel refuses to set it (EBUSY).
    let mut e = tcp.clone();
    e.orig.l4 = L4::Ports { src: 1, dst: 2 };
    e.reply = e.orig.inverse();
    e.status |= status::EXPECTED;
    bad.push(e);
    // ICMPv6 echo uses type 128; type 8 is no valid ICMPv6 tuple (EINVAL).
    let icmp6 = saved
        .iter()
        .find(|e| e.orig.proto == proto::ICMPV6)
        .expect("icmpv6 entry");
    let mut e = icmp6.clone();
    e.orig.l4 = L4::Icmp {
        id: 4242,
        kind: 8,
        code: 0,
    };
    e.reply = e.orig;
    bad.push(e);
    // A helper this kernel does not have.
    let mut e = tcp.clone();
    e.orig.l4 = L4::Ports { src: 3, dst: 4 };
    e.reply = e.orig.inverse();
    e.helper = Some("no-such-helper".into());
    bad.push(e);

    let mut all = saved.clone();
    // Refusals in the middle of a batch must not stop the rest.
    for (i, b) in bad.iter().enumerate() {
        all.insert(i * 300 + 1, b.clone());
    }
    let r = ct(&dst).create(&all).expect("create");
    assert_eq!(r.created, saved.len() as u64, "{r:?}");
    assert_eq!(r.refused, bad.len() as u64, "{r:?}");
    assert_eq!(r.existed, 0);
    let mut errnos: Vec<i32> = r.refused_by_errno.iter().map(|&(e, _)| e).collect();
    errnos.sort();
    let mut want = vec![libc::EBUSY, libc::EINVAL, libc::EOPNOTSUPP];
    want.sort();
    assert_eq!(errnos, want, "{r:?}");
    assert_eq!(dst.conntrack_count(), saved.len());
    let copy = ct(&dst).dump(&Selector::mark(MARK)).expect("dump copy");
    let diffs = compare(&saved, &copy, Tolerance::exact_status(5));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

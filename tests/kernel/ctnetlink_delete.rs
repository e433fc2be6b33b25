//! Deleting by selector and deleting an exact set, against the real kernel in
//! throw-away namespaces; other marks are never touched.

use std::path::Path;

use common::netns::Netns;
use common::population::{self, Spec};
use conntrack_vmstate::access::{ConntrackAccess, DeleteReport};
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::Selector;

const MARK: u32 = 7;

fn setup(tag: &str, n: usize, seed: u64) -> (Netns, population::Population, Ctnetlink) {
    let ns = Netns::new(tag);
    let pop = population::generate(Spec::new(n, MARK, seed));
    population::load(&ns.name, &pop);
    let ct = Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink");
    (ns, pop, ct)
}

fn noise_counts(ct: &Ctnetlink, pop: &population::Population) -> Vec<usize> {
    pop.noise_marks
        .iter()
        .map(|&m| ct.dump(&Selector::mark(m)).expect("dump").len())
        .collect()
}

#[test]
fn delete_selected_removes_exactly_that_mark() {
    common::needs!(kernel);
    let (ns, pop, ct) = setup("ctdel", 2000, 21);
    let noise_before = noise_counts(&ct, &pop);
    assert_eq!(noise_before.iter().sum::<usize>(), pop.noise_lines.len());

    let n = ct.delete_selected(&Selector::mark(MARK)).expect("delete");
    assert_eq!(n, pop.vm_count() as u64);
    assert!(ct.dump(&Selector::mark(MARK)).expect("dump").is_empty());
    assert_eq!(noise_counts(&ct, &pop), noise_before);
    assert_eq!(ns.conntrack_count(), pop.noise_lines.len());
    // Nothing left to delete.
    assert_eq!(ct.delete_selected(&Selector::mark(MARK)).expect("again"), 0);
}

#[test]
fn delete_selected_with_zone_spares_other_zones() {
    common::needs!(kernel);
    let (ns, pop, ct) = setup("ctdelz", 2000, 22);
    let all = ct.dump(&Selector::mark(MARK)).expect("dump");
    let zone = all
        .iter()
        .map(|e| e.zone)
        .find(|&z| z != 0)
        .expect("a zoned entry");
    let in_zone = all.iter().filter(|e| e.zone == zone).count();
    let sel = Selector {
        mark: MARK,
        mark_mask: u32::MAX,
        zone: Some(zone),
    };
    assert_eq!(ct.delete_selected(&sel).expect("delete"), in_zone as u64);
    let left = ct.dump(&Selector::mark(MARK)).expect("dump");
    assert_eq!(left.len(), all.len() - in_zone);
    assert!(left.iter().all(|e| e.zone != zone));
    assert_eq!(
        ns.conntrack_count(),
        pop.vm_count() + pop.noise_lines.len() - in_zone
    );
}

#[test]
fn delete_entries_removes_exactly_the_given_set() {
    common::needs!(kernel);
    let (ns, pop, ct) = setup("ctdelx", 1500, 23);
    let all = ct.dump(&Selector::mark(MARK)).expect("dump");
    // A set of every third entry, zoned and NATed ones included.
    let set: Vec<_> = all.iter().step_by(3).cloned().collect();
    assert!(set.iter().any(|e| e.zone != 0 || e.orig.zone.is_some()));
    assert!(set.iter().any(|e| e.is_nat()));

    // One of them is deleted and created again: same tuple, new CTA_ID. It
    // is a new connection the flush must not remove. The kernel's id hashes
    // the entry's address, so a recreation that gets the freed object back
    // gets the old id too: a spacer entry created in between takes that
    // object (tried a few times, allocation order is the allocator's).
    let again = set[0].clone();
    let spacer = spacer_for(&all);
    let recreated = (0..10)
        .find_map(|_| {
            let one = std::slice::from_ref(&again);
            assert_eq!(ct.delete_entries(one).expect("delete one").deleted, 1);
            let spacer = std::slice::from_ref(&spacer);
            assert_eq!(ct.create(spacer).expect("spacer").created, 1);
            assert_eq!(ct.create(one).expect("recreate").created, 1);
            assert_eq!(ct.delete_entries(spacer).expect("spacer").deleted, 1);
            ct.dump(&Selector::mark(MARK))
                .expect("dump")
                .into_iter()
                .find(|e| e.orig == again.orig && e.zone == again.zone)
                .filter(|e| e.id != again.id)
        })
        .expect("a recreated entry with a new id within 10 tries");

    let r = ct.delete_entries(&set).expect("delete set");
    assert_eq!(
        r,
        DeleteReport {
            deleted: set.len() as u64 - 1,
            missing: 1
        }
    );
    let left = ct.dump(&Selector::mark(MARK)).expect("dump");
    assert_eq!(left.len(), all.len() - set.len() + 1);
    assert!(left.iter().any(|e| e.id == recreated.id));
    for e in &set[1..] {
        assert!(!left.iter().any(|l| l.orig == e.orig && l.zone == e.zone));
    }
    assert_eq!(
        ns.conntrack_count(),
        pop.vm_count() + pop.noise_lines.len() - set.len() + 1
    );

    // Without an id (entries from another host), the tuple alone decides.
    let mut by_tuple = recreated.clone();
    by_tuple.id = None;
    assert_eq!(ct.delete_entries(&[by_tuple]).expect("delete").deleted, 1);
}

/// An entry no other has: an un-NATed one of `all` moved to an address of
/// the documentation ranges, in both directions.
fn spacer_for(all: &[conntrack_vmstate::entry::Entry]) -> conntrack_vmstate::entry::Entry {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut e = all
        .iter()
        .find(|e| !e.is_nat() && e.zone == 0 && e.orig.zone.is_none())
        .expect("an un-NATed entry in the default zone")
        .clone();
    let addr = match e.orig.src {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(203, 0, 113, 250)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xfa, 0, 0, 0, 0, 1)),
    };
    e.orig.src = addr;
    e.reply.dst = addr;
    e.id = None;
    e
}

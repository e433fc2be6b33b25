//! Everywhere QEMU 7.2 calls Save and Load besides a plain precopy live
//! migration, with the real service, kernel and QEMU (docs/qemu-modes.md):
//! migration to a file restored later on the same host and on another,
//! multifd, postcopy, and savevm/loadvm snapshots on a qcow2 disk. Entries
//! are compared attribute by attribute; LastSave and LastLoad are checked.

use std::path::Path;
use std::time::Instant;

use common::host::{assert_same_entries, Host, WAIT};
use common::population::{self, Spec};
use common::qemu::{drive_args, qcow2, Incoming, Outgoing, Qemu, QemuOpts};
use conntrack_vmstate::entry::Entry;
use serde_json::{json, Value};

use super::migration_daemon::{
    num, pair, qemu, register_qmp, report, start_qemus, text, unregister_qmp, wait_restores,
    AGE_SLACK_S,
};
use super::migration_failed::{fresh_incoming, SLOW_BANDWIDTH};
use super::migration_scoped::{prepare, step};

/// VM 100's entries (realistic mix, 20 % other VMs) on `h`; returns the
/// other VMs' marks.
fn populate(h: &Host, n: usize, seed: u64) -> Vec<u32> {
    let mut spec = Spec::new(n, 100, seed);
    spec.noise = 0.2;
    let pop = population::generate(spec);
    population::load(&h.ns.name, &pop);
    pop.noise_marks
}

fn dumps(h: &Host, marks: &[u32]) -> Vec<(u32, Vec<Entry>)> {
    marks.iter().map(|&m| (m, h.dump(m))).collect()
}

fn assert_untouched(what: &str, h: &Host, was: &[(u32, Vec<Entry>)], since: Instant) {
    let age = since.elapsed().as_secs() as u32 + AGE_SLACK_S;
    for (m, v) in was {
        assert_same_entries(&format!("{what}: VM {m}"), v, &h.dump(*m), age);
    }
}

fn age(since: Instant) -> u32 {
    since.elapsed().as_secs() as u32 + AGE_SLACK_S
}

/// (created, existed, error) of LastLoad once its restore is complete.
fn load_outcome(h: &Host) -> (u64, u64, String) {
    wait_restores(h);
    let l = report(h, "100", "LastLoad");
    println!("LastLoad {l}");
    (num(&l, "created"), num(&l, "existed"), text(&l, "error"))
}

/// (entries, dropped, error) of LastSave.
fn save_outcome(h: &Host) -> (u64, u64, String) {
    let s = report(h, "100", "LastSave");
    println!("LastSave {s}");
    (num(&s, "entries"), num(&s, "dropped"), text(&s, "error"))
}

/// `incoming_from_file` on a new `-incoming defer` QEMU of `h`, prepared as
/// the destination first (the object must exist before the stream is read).
fn restore_prepared(h: &mut Host, name: &str, file: &Path) -> Incoming {
    fresh_incoming(h, name);
    prepare(h, "destination");
    let inc = qemu(h).incoming_from_file(file);
    wait_restores(h);
    inc
}

/// Suspend to disk in the migration-scoped flow: `prepare --role source`,
/// `migrate "exec:cat > FILE"` (QEMU 7.2 has no `file:`), `finish --role
/// source` (the VM runs nowhere now: its saved entries are flushed), QEMU
/// quits. The file is restored on another host, and later on the same host
/// (`prepare --role destination`, `-incoming defer` + `migrate-incoming
/// "exec:cat FILE"`, `finish --role destination`): both times every entry
/// comes back attribute-exact, created anew.
#[test]
fn a_file_saved_vm_restores_on_another_host_and_on_the_same_host() {
    common::needs!(qemu);
    let (mut a, mut b) = pair("fr");
    let noise = populate(&a, 1500, 31);
    let mut other = Spec::new(200, 400, 32);
    other.noise = 0.0;
    population::load(&b.ns.name, &population::generate(other));
    population::enable_labels(&b.ns.name);
    let t0 = Instant::now();
    let a_others = dumps(&a, &noise);
    let b_others = dumps(&b, &[400]);
    a.qemu = Some(Qemu::start(
        a.path(),
        "qemu",
        Some(&a.ns),
        &QemuOpts::default(),
    ));
    prepare(&mut a, "source");
    let before = a.dump(100);
    assert_eq!(before.len(), 1500);
    let file = a.path().join("suspended.bin");
    let out = qemu(&mut a).migrate_to_file(&file);
    assert_eq!(out.status, "completed", "{}", qemu(&mut a).output());
    assert_eq!(qemu(&mut a).status(), "postmigrate");
    assert_eq!(save_outcome(&a), (1500, 0, String::new()));
    step(&mut a, "finish", "source");
    qemu(&mut a).execute("quit", None).ok();
    assert!(
        qemu(&mut a).proc.wait_exit(WAIT).is_some(),
        "QEMU did not quit"
    );
    a.qemu = None;
    assert!(
        a.dump(100).is_empty(),
        "finish did not flush the saved entries"
    );
    assert_untouched("host A after the save", &a, &a_others, t0);

    // Restored on another host.
    assert_eq!(
        restore_prepared(&mut b, "qemu", &file),
        Incoming::Running,
        "{}",
        qemu(&mut b).output()
    );
    assert_same_entries("VM 100 restored on host B", &before, &b.dump(100), age(t0));
    assert_eq!(load_outcome(&b), (1500, 0, String::new()));
    step(&mut b, "finish", "destination");
    assert_eq!(b.dump(100).len(), 1500);
    assert_untouched("host B", &b, &b_others, t0);

    // And on the same host, where finish flushed them.
    assert_eq!(
        restore_prepared(&mut a, "qemu2", &file),
        Incoming::Running,
        "{}",
        qemu(&mut a).output()
    );
    assert_same_entries("VM 100 restored on host A", &before, &a.dump(100), age(t0));
    assert_eq!(load_outcome(&a), (1500, 0, String::new()));
    step(&mut a, "finish", "destination");
    assert_eq!(a.dump(100).len(), 1500);
    assert_untouched("host A after the restore", &a, &a_others, t0);
}

/// Suspend to disk in the always-served flow (`register --qmp` at VM start,
/// `unregister` without flush when QEMU quits): nothing is flushed, so the
/// restore on the same host meets the VM's entries still in the table.
/// Those are counted as existed and left alone; the ones that expired
/// meanwhile (deleted here) are created again. Each entry is there once.
#[test]
fn a_file_restore_on_the_same_host_keeps_what_is_there_and_recreates_the_rest() {
    common::needs!(qemu);
    let mut h = Host::new("fs");
    h.start_daemon();
    let noise = populate(&h, 1500, 33);
    let t0 = Instant::now();
    let others = dumps(&h, &noise);
    h.qemu = Some(Qemu::start(
        h.path(),
        "qemu",
        Some(&h.ns),
        &QemuOpts::default(),
    ));
    register_qmp(&mut h, "100", &[]);
    let before = h.dump(100);
    let file = h.path().join("suspended.bin");
    assert_eq!(qemu(&mut h).migrate_to_file(&file).status, "completed");
    assert_eq!(save_outcome(&h), (1500, 0, String::new()));
    unregister_qmp(&mut h, "100", false);
    qemu(&mut h).execute("quit", None).ok();
    assert!(qemu(&mut h).proc.wait_exit(WAIT).is_some());
    assert_same_entries("VM 100 after the save", &before, &h.dump(100), age(t0));
    // Expired while the VM was suspended.
    let gone: Vec<Entry> = before.iter().step_by(5).cloned().collect();
    assert_eq!(h.delete(&gone), gone.len() as u64);

    fresh_incoming(&mut h, "qemu2");
    register_qmp(&mut h, "100", &[]);
    assert_eq!(qemu(&mut h).incoming_from_file(&file), Incoming::Running);
    let (created, existed, err) = load_outcome(&h);
    assert_eq!(
        (created, existed, err),
        (
            gone.len() as u64,
            (before.len() - gone.len()) as u64,
            String::new()
        )
    );
    let after = h.dump(100);
    assert_eq!(
        after.len(),
        before.len(),
        "an entry is there twice or missing"
    );
    assert_same_entries("VM 100 after the restore", &before, &after, age(t0));
    assert_untouched("other VMs", &h, &others, t0);
}

/// Source and destination set up for a migration over a unix socket (the
/// path reaches across the namespaces), with `caps` on both sides and
/// `params` on both; the destination listens. Returns the URI.
fn socket_migration(
    src: &mut Host,
    dst: &mut Host,
    caps: &[(&str, bool)],
    params: Value,
) -> String {
    for h in [&mut *src, &mut *dst] {
        let q = qemu(h);
        q.set_capabilities(caps);
        q.set_parameters(params.clone());
    }
    let uri = format!("unix:{}", dst.path().join("migration.sock").display());
    qemu(dst).start_incoming(&uri);
    uri
}

/// The entries arrived attribute-exact, Save and Load say so, and finish
/// flushes the source of exactly them.
fn assert_carried(
    src: &mut Host,
    dst: &mut Host,
    before: &[Entry],
    others: &[(u32, Vec<Entry>)],
    t0: Instant,
) {
    let n = before.len() as u64;
    assert_eq!(save_outcome(src), (n, 0, String::new()));
    assert_eq!(load_outcome(dst), (n, 0, String::new()));
    assert_same_entries("VM 100 on the destination", before, &dst.dump(100), age(t0));
    step(src, "finish", "source");
    step(dst, "finish", "destination");
    assert!(src.dump(100).is_empty(), "the source was not flushed");
    assert_untouched("source", src, others, t0);
    for (m, _) in others {
        assert!(dst.dump(*m).is_empty(), "VM {m} reached the destination");
    }
}

fn ram(out: &Outgoing, field: &str) -> u64 {
    out.query
        .pointer(&format!("/ram/{field}"))
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no ram.{field} in {}", out.query))
}

/// multifd (2 channels) moves RAM on extra connections; the device state,
/// ours included, still goes on the main one.
#[test]
fn multifd_migration_carries_the_entries() {
    common::needs!(qemu);
    let (mut src, mut dst) = pair("mf");
    let noise = populate(&src, 2000, 34);
    population::enable_labels(&dst.ns.name);
    let t0 = Instant::now();
    let others = dumps(&src, &noise);
    start_qemus(&mut src, &mut dst);
    prepare(&mut src, "source");
    prepare(&mut dst, "destination");
    let uri = socket_migration(
        &mut src,
        &mut dst,
        &[("multifd", true)],
        json!({ "multifd-channels": 2 }),
    );
    let before = src.dump(100);
    let q = qemu(&mut src);
    q.set_parameters(json!({ "max-bandwidth": 1_000_000_000u64 }));
    q.start_migration(&uri);
    let out = q.wait_migration();
    assert_eq!(out.status, "completed", "{}", q.output());
    assert!(ram(&out, "multifd-bytes") > 0, "no multifd: {}", out.query);
    assert_eq!(
        qemu(&mut dst).wait_running_or_exit(WAIT),
        Incoming::Running,
        "{}",
        qemu(&mut dst).output()
    );
    assert_carried(&mut src, &mut dst, &before, &others, t0);
}

/// Postcopy: the device state travels in the package sent when postcopy
/// starts, and the destination's Load runs before QEMU lets its guest run
/// there (the package's RUN command comes after the device sections).
#[test]
fn postcopy_migration_loads_before_the_destination_runs() {
    common::needs!(qemu);
    let (mut src, mut dst) = pair("pc");
    let noise = populate(&src, 2000, 35);
    population::enable_labels(&dst.ns.name);
    let t0 = Instant::now();
    let others = dumps(&src, &noise);
    src.qemu = Some(Qemu::start(
        src.path(),
        "qemu",
        Some(&src.ns),
        &QemuOpts::default(),
    ));
    dst.qemu = Some(Qemu::start(
        dst.path(),
        "qemu",
        Some(&dst.ns),
        &QemuOpts {
            incoming: true,
            extra: vec!["-trace".into(), "enable=loadvm_postcopy_handle_run".into()],
            ..Default::default()
        },
    ));
    prepare(&mut src, "source");
    prepare(&mut dst, "destination");
    let uri = socket_migration(&mut src, &mut dst, &[("postcopy-ram", true)], json!({}));
    let before = src.dump(100);
    let q = qemu(&mut src);
    // Slow precopy, so postcopy starts while it is active; postcopy itself
    // is not throttled (max-postcopy-bandwidth 0).
    q.set_parameters(json!({ "max-bandwidth": SLOW_BANDWIDTH }));
    q.start_migration(&uri);
    q.wait_migration_status("active");
    q.execute("migrate-start-postcopy", None)
        .expect("migrate-start-postcopy");
    let out = q.wait_migration();
    assert_eq!(out.status, "completed", "{}", q.output());
    assert!(
        ram(&out, "postcopy-bytes") > 0,
        "not postcopy: {}",
        out.query
    );
    let went_postcopy = q
        .qmp()
        .take_events()
        .iter()
        .any(|e| e.pointer("/data/status").and_then(Value::as_str) == Some("postcopy-active"));
    assert!(went_postcopy, "no MIGRATION postcopy-active event");
    assert_eq!(
        qemu(&mut dst).wait_running_or_exit(WAIT),
        Incoming::Running,
        "{}",
        qemu(&mut dst).output()
    );
    let log = qemu(&mut dst).output();
    let loading = log
        .find("dbus_vmstate_loading")
        .expect("no Load in the trace");
    let run = log
        .find("loadvm_postcopy_handle_run")
        .unwrap_or_else(|| panic!("no postcopy RUN in the trace: {log}"));
    assert!(loading < run, "Load after the guest was let run: {log}");
    assert_carried(&mut src, &mut dst, &before, &others, t0);
}

/// savevm/loadvm on a qcow2 disk, always-served VM (`register --qmp`): a
/// snapshot is not a migration, so Save flushes nothing and the VM runs on;
/// loadvm on the same host meets every entry in the table (existed, left
/// as it is, nothing twice, nothing deleted), and after some of the VM's
/// entries were deleted a loadvm creates exactly those again. A snapshot
/// taken with the dbus-vmstate object cannot be loaded without it.
#[test]
fn savevm_and_loadvm_duplicate_nothing_and_flush_nothing() {
    common::needs!(snapshots);
    let mut h = Host::new("sn");
    h.start_daemon();
    let noise = populate(&h, 2000, 36);
    let t0 = Instant::now();
    let others = dumps(&h, &noise);
    let disk = qcow2(h.path(), "disk", 16);
    h.qemu = Some(Qemu::start(
        h.path(),
        "qemu",
        Some(&h.ns),
        &QemuOpts {
            extra: drive_args(&disk),
            ..Default::default()
        },
    ));
    register_qmp(&mut h, "100", &[]);
    let before = h.dump(100);
    assert_eq!(before.len(), 2000);

    assert_eq!(qemu(&mut h).hmp("savevm snap1"), "");
    assert_eq!(qemu(&mut h).status(), "running");
    assert!(
        qemu(&mut h).hmp("info snapshots").contains("snap1"),
        "no snapshot"
    );
    assert_eq!(save_outcome(&h), (2000, 0, String::new()));
    assert_same_entries("VM 100 after savevm", &before, &h.dump(100), age(t0));

    assert_eq!(qemu(&mut h).hmp("loadvm snap1"), "");
    assert_eq!(qemu(&mut h).status(), "running");
    assert_eq!(load_outcome(&h), (0, 2000, String::new()));
    let l = report(&h, "100", "LastLoad");
    println!(
        "MEASURE loadvm meeting 2000 existing entries: Load answered after {} us, complete after {} us",
        num(&l, "duration_us"),
        l.get("complete_us").and_then(Value::as_u64).unwrap_or(num(&l, "duration_us"))
    );
    let after = h.dump(100);
    assert_eq!(after.len(), 2000);
    assert_same_entries("VM 100 after loadvm", &before, &after, age(t0));
    // Left as they were: the very same kernel entries, not new ones.
    let ids = |v: &[Entry]| {
        let mut i: Vec<u32> = v.iter().filter_map(|e| e.id).collect();
        i.sort_unstable();
        i
    };
    assert_eq!(ids(&after), ids(&before), "loadvm replaced entries");

    let gone: Vec<Entry> = before.iter().step_by(4).cloned().collect();
    assert_eq!(h.delete(&gone), gone.len() as u64);
    assert_eq!(qemu(&mut h).hmp("loadvm snap1"), "");
    assert_eq!(
        load_outcome(&h),
        (
            gone.len() as u64,
            (before.len() - gone.len()) as u64,
            String::new()
        )
    );
    let after = h.dump(100);
    assert_eq!(after.len(), 2000);
    assert_same_entries("VM 100 after the second loadvm", &before, &after, age(t0));
    assert_untouched("other VMs", &h, &others, t0);

    // No flush at any point; unregistering (without --flush) keeps them too.
    unregister_qmp(&mut h, "100", false);
    assert_eq!(h.dump(100).len(), 2000);
    // The snapshot has our section; QEMU without the object refuses it and
    // leaves the guest paused.
    let err = qemu(&mut h).hmp("loadvm snap1");
    assert!(
        err.starts_with("Unknown savevm section or instance 'dbus-vmstate/dbus-vmstate' 0.")
            && err.contains("Error: Error -22 while loading VM state"),
        "{err}"
    );
    assert_eq!(qemu(&mut h).status(), "restore-vm");
}

/// The migration-scoped flow outside a migration: QEMU has no dbus-vmstate
/// object, so savevm and loadvm never call Save or Load (nothing saved,
/// nothing to flush), and the snapshot loads in QEMU without the object.
#[test]
fn snapshots_of_a_vm_known_only_for_migrations_do_not_involve_us() {
    common::needs!(snapshots);
    let mut h = Host::new("sm");
    h.start_daemon();
    populate(&h, 300, 37);
    let disk = qcow2(h.path(), "disk", 16);
    h.qemu = Some(Qemu::start(
        h.path(),
        "qemu",
        Some(&h.ns),
        &QemuOpts {
            extra: drive_args(&disk),
            ..Default::default()
        },
    ));
    super::migration_scoped::register_known(&h);
    let before = h.dump(100);
    let t0 = Instant::now();
    assert_eq!(qemu(&mut h).hmp("savevm snap1"), "");
    assert_eq!(qemu(&mut h).hmp("loadvm snap1"), "");
    assert_eq!(qemu(&mut h).status(), "running");
    assert_eq!(report(&h, "100", "LastSave"), json!({}));
    assert_eq!(report(&h, "100", "LastLoad"), json!({}));
    assert!(!qemu(&mut h).output().contains("dbus_vmstate_"));
    assert_same_entries("VM 100", &before, &h.dump(100), age(t0));
}

/// Suspend to disk and restore on the same host without `finish --role
/// source` in between (the VM comes back here, its entries are still
/// valid): the restore meets every entry (existed). A `finish --role
/// source` coming late (a tool finishing the suspend after the restore)
/// must not flush the entries the restored VM now runs on.
#[test]
fn a_late_source_finish_after_a_restore_on_the_same_host_flushes_nothing() {
    common::needs!(qemu);
    let mut h = Host::new("fl");
    h.start_daemon();
    populate(&h, 800, 38);
    let t0 = Instant::now();
    h.qemu = Some(Qemu::start(
        h.path(),
        "qemu",
        Some(&h.ns),
        &QemuOpts::default(),
    ));
    prepare(&mut h, "source");
    let before = h.dump(100);
    let file = h.path().join("suspended.bin");
    assert_eq!(qemu(&mut h).migrate_to_file(&file).status, "completed");
    assert_eq!(save_outcome(&h), (800, 0, String::new()));
    qemu(&mut h).execute("quit", None).ok();
    assert!(qemu(&mut h).proc.wait_exit(WAIT).is_some());

    assert_eq!(restore_prepared(&mut h, "qemu2", &file), Incoming::Running);
    assert_eq!(load_outcome(&h), (0, 800, String::new()));
    step(&mut h, "finish", "destination");
    h.qemu = None;
    h.cli_ok(&["finish", "100", "--role", "source"]);
    assert_same_entries(
        "VM 100 after the late finish",
        &before,
        &h.dump(100),
        age(t0),
    );
    let log = std::fs::read_to_string(h.path().join("daemon0.log")).unwrap();
    assert!(
        log.contains(
            "Load of VM 100 on the host of its last Save: those entries are no longer owed a flush"
        ) && log.contains("Finish of VM 100: not prepared, nothing to do"),
        "{log}"
    );
}

/// A live migration between two QEMUs of one host (e.g. to a newer QEMU
/// binary): one daemon, one registration, both roles prepared. Both QEMUs
/// are answered (the old one's Save, the new one's Load), Load meets every
/// entry (existed), nothing is flushed, the VM runs on in the new QEMU. An
/// always-served VM is prepared the same way and finished without `--qmp`,
/// so the new QEMU keeps its object and the VM stays served.
fn migrate_within_one_host(tag: &str, always: bool) {
    let mut h = Host::new(tag);
    h.start_daemon();
    let noise = populate(&h, 800, 39);
    let t0 = Instant::now();
    let others = dumps(&h, &noise);
    h.qemu = Some(Qemu::start(
        h.path(),
        "qemu",
        Some(&h.ns),
        &QemuOpts::default(),
    ));
    let mut new = Qemu::start(
        h.path(),
        "qemu-new",
        Some(&h.ns),
        &QemuOpts {
            incoming: true,
            ..Default::default()
        },
    );
    if always {
        register_qmp(&mut h, "100", &[]);
    }
    prepare(&mut h, "source");
    new.release_qmp();
    let new_qmp = new.qmp_path.display().to_string();
    let bus = h.bus.address.clone();
    h.cli_ok(&[
        "prepare",
        "100",
        "--role",
        "destination",
        "--bus-address",
        &bus,
        "--qmp",
        &new_qmp,
    ]);
    let before = h.dump(100);
    let file = h.path().join("stream.bin");
    let out = qemu(&mut h).migrate_to_file(&file);
    assert_eq!(out.status, "completed", "{}", qemu(&mut h).output());
    assert_eq!(
        new.incoming_from_file(&file),
        Incoming::Running,
        "{}",
        new.output()
    );
    assert_eq!(save_outcome(&h), (800, 0, String::new()));
    assert_eq!(load_outcome(&h), (0, 800, String::new()));
    if always {
        h.cli_ok(&["finish", "100", "--role", "source"]);
        h.cli_ok(&["finish", "100", "--role", "destination"]);
        let o = new
            .qmp()
            .find_vmstate()
            .unwrap()
            .expect("the new QEMU's object");
        assert_eq!(o.ids, ["conntrack-vmstate-100"]);
        let st = h.status_json("100");
        assert_eq!(text(&st, "Lifecycle"), "always");
        assert!(!text(&st, "UniqueName").is_empty(), "not served: {st}");
    } else {
        step(&mut h, "finish", "source");
        new.release_qmp();
        h.cli_ok(&["finish", "100", "--role", "destination", "--qmp", &new_qmp]);
        assert_eq!(new.qmp().find_vmstate().unwrap(), None);
    }
    assert_same_entries("VM 100", &before, &h.dump(100), age(t0));
    assert_untouched("other VMs", &h, &others, t0);
}

#[test]
fn a_live_migration_within_one_host_keeps_every_entry() {
    common::needs!(qemu);
    migrate_within_one_host("lh", false);
}

#[test]
fn a_live_migration_within_one_host_of_an_always_served_vm_keeps_every_entry() {
    common::needs!(qemu);
    migrate_within_one_host("la", true);
}

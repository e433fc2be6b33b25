//! A migration cancelled during its RAM copy, in the migration-scoped flow
//! with real QEMU 7.2 on both hosts: `abort` on both leaves the source with
//! every entry of the VM and the destination with none of what the attempt
//! brought, other VMs' entries untouched on both, and a second attempt to a
//! fresh destination QEMU carries everything as if the first had not
//! happened. (A destination QEMU killed after Load is in migration_scoped.)

use std::time::Instant;

use common::host::{assert_same_entries, Host, WAIT};
use common::population::{self, Spec};
use common::qemu::{Incoming, Qemu, QemuOpts};
use conntrack_vmstate::entry::Entry;
use serde_json::json;

use super::migration_daemon::{migrate, num, pair, qemu, report, start_qemus, text, AGE_SLACK_S};
use super::migration_scoped::{assert_idle, prepare, register_known, step};

/// A bootless 32 MiB guest's RAM copy is ~0.65 MB: throttled to this, it
/// lasts ~13 s, long enough to act while it is active.
pub(crate) const SLOW_BANDWIDTH: u64 = 50_000;

/// A new destination QEMU on `h`, waiting with `-incoming defer`.
pub(crate) fn fresh_incoming(h: &mut Host, name: &str) {
    h.qemu = Some(Qemu::start(
        h.path(),
        name,
        Some(&h.ns),
        &QemuOpts {
            incoming: true,
            ..Default::default()
        },
    ));
}

fn daemon_log(h: &Host) -> String {
    std::fs::read_to_string(h.path().join("daemon0.log")).unwrap_or_default()
}

fn others(h: &Host, marks: &[u32]) -> Vec<(u32, Vec<Entry>)> {
    marks.iter().map(|&m| (m, h.dump(m))).collect()
}

fn assert_others_untouched(what: &str, h: &Host, was: &[(u32, Vec<Entry>)], since: Instant) {
    let age = since.elapsed().as_secs() as u32 + AGE_SLACK_S;
    for (m, v) in was {
        assert_same_entries(&format!("{what}: VM {m}"), v, &h.dump(*m), age);
    }
}

#[test]
fn cancelled_during_the_ram_copy_abort_keeps_the_source_and_a_second_attempt_works() {
    common::needs!(qemu);
    let (mut src, mut dst) = pair("mc");
    let mut spec = Spec::new(2000, 100, 21);
    spec.noise = 0.2;
    let pop = population::generate(spec);
    population::load(&src.ns.name, &pop);
    let mut other = Spec::new(200, 400, 22);
    other.noise = 0.0;
    population::load(&dst.ns.name, &population::generate(other));
    population::enable_labels(&dst.ns.name);
    let t0 = Instant::now();
    let src_others = others(&src, &pop.noise_marks);
    assert!(src_others.iter().map(|(_, v)| v.len()).sum::<usize>() >= 300);
    let dst_others = others(&dst, &[400]);
    start_qemus(&mut src, &mut dst);
    register_known(&src);
    register_known(&dst);
    prepare(&mut src, "source");
    prepare(&mut dst, "destination");
    let before = src.dump(100);
    assert_eq!(before.len(), 2000);

    // Over a socket, so the destination is reading when the cancel comes.
    let sock = dst.path().join("migration.sock");
    let uri = format!("unix:{}", sock.display());
    qemu(&mut dst).start_incoming(&uri);
    let q = qemu(&mut src);
    q.set_parameters(json!({ "max-bandwidth": SLOW_BANDWIDTH }));
    q.start_migration(&uri);
    q.wait_migration_status("active");
    q.execute("migrate_cancel", None).expect("migrate_cancel");
    let out = q.wait_migration();
    assert_eq!(out.status, "cancelled", "{}", out.query);
    assert_eq!(q.status(), "running", "the source guest runs on");
    // QEMU 7.2's destination reads a stream cut short and exits 1.
    assert_eq!(
        qemu(&mut dst).wait_running_or_exit(WAIT),
        Incoming::Exited(Some(1))
    );
    assert!(
        qemu(&mut dst).output().contains("load of migration failed"),
        "{}",
        qemu(&mut dst).output()
    );
    // Cancelled before the stop-and-copy: neither Save nor Load ran.
    assert_eq!(report(&src, "100", "LastSave"), json!({}));
    assert_eq!(report(&dst, "100", "LastLoad"), json!({}));

    let out = step(&mut dst, "abort", "destination");
    assert!(
        out.ends_with(
            "aborted VM 100 as migration destination: the entries its Load created are deleted\n"
        ),
        "{out}"
    );
    let out = step(&mut src, "abort", "source");
    assert!(
        out.ends_with("aborted VM 100 as migration source: its entries are kept\n"),
        "{out}"
    );
    // A tool may abort unconditionally: a second one does nothing.
    assert_eq!(
        step(&mut src, "abort", "source"),
        "aborted VM 100 as migration source: it was not prepared here, its entries are kept\n"
    );
    assert_same_entries(
        "VM 100 on the source after abort",
        &before,
        &src.dump(100),
        t0.elapsed().as_secs() as u32 + AGE_SLACK_S,
    );
    assert!(
        dst.dump(100).is_empty(),
        "the destination got VM 100 entries"
    );
    assert_others_untouched("source", &src, &src_others, t0);
    assert_others_untouched("destination", &dst, &dst_others, t0);
    assert_idle(&mut src, "source, aborted");
    assert_idle(&mut dst, "destination, aborted");
    assert!(
        daemon_log(&src).contains("Abort of VM 100 as migration source: entries kept"),
        "{}",
        daemon_log(&src)
    );
    assert!(
        daemon_log(&dst).contains(
            "Abort of VM 100 as migration destination: deleted the 0 entries its Load created \
             (0 already gone)"
        ),
        "{}",
        daemon_log(&dst)
    );

    // The second attempt: a new destination QEMU, both prepared again.
    fresh_incoming(&mut dst, "qemu2");
    prepare(&mut src, "source");
    prepare(&mut dst, "destination");
    let before = src.dump(100);
    let t = Instant::now();
    let (out, inc) = migrate(&mut src, &mut dst);
    assert_eq!(out.status, "completed", "{}", qemu(&mut src).output());
    assert_eq!(inc, Incoming::Running, "{}", qemu(&mut dst).output());
    assert_same_entries(
        "VM 100 on the destination, second attempt",
        &before,
        &dst.dump(100),
        t.elapsed().as_secs() as u32 + AGE_SLACK_S,
    );
    let save = report(&src, "100", "LastSave");
    let load = report(&dst, "100", "LastLoad");
    println!("LastSave {save}\nLastLoad {load}");
    assert_eq!(
        (
            num(&save, "entries"),
            num(&save, "dropped"),
            text(&save, "error")
        ),
        (2000, 0, String::new())
    );
    assert_eq!(
        (
            num(&load, "created"),
            num(&load, "existed"),
            text(&load, "error")
        ),
        (2000, 0, String::new())
    );
    step(&mut src, "finish", "source");
    step(&mut dst, "finish", "destination");
    assert!(src.dump(100).is_empty(), "the source was not flushed");
    assert_eq!(dst.dump(100).len(), 2000);
    assert_others_untouched("source after finish", &src, &src_others, t0);
    assert_others_untouched("destination after finish", &dst, &dst_others, t0);
    assert!(
        daemon_log(&src).contains(
            "Finish of VM 100 as migration source: flushed 2000 saved entries (0 already gone)"
        ),
        "{}",
        daemon_log(&src)
    );
}

//! The migration-scoped lifecycle with real QEMU 7.2, kernel and buses: a
//! VM known to both daemons (`register --lifecycle migration`) costs no bus
//! connection and no QEMU object until `prepare`; `finish` after a
//! successful migration flushes exactly what the source saved and leaves
//! the destination's entries; `abort` after a failed one keeps the source's
//! entries and deletes exactly what the destination's Load created. And at
//! scale: 1,000 VMs known to one daemon, 10 migrating at once, on a bus with
//! dbus-daemon's stock limits.

use std::collections::HashMap;
use std::time::Instant;

use common::host::{assert_same_entries, vmstate_owners, wait_vmstate_ids, Host, WAIT};
use common::population::{self, Spec};
use common::qemu::Incoming;
use conntrack_vmstate::bus::proxy::{Manager1Proxy, VmState1Proxy};
use zbus::Variant;

use super::migration_daemon::{
    migrate, num, pair, qemu, report, start_qemus, text, wait_restores, AGE_SLACK_S,
};

/// `prepare 100 --role ROLE --qmp` on one host (our QMP session steps aside:
/// QEMU serves one monitor client at a time).
pub(crate) fn prepare(h: &mut Host, role: &str) -> String {
    qemu(h).release_qmp();
    let qmp = qemu(h).qmp_path.display().to_string();
    let bus = h.bus.address.clone();
    let out = h.cli_ok(&[
        "prepare",
        "100",
        "--role",
        role,
        "--bus-address",
        &bus,
        "--qmp",
        &qmp,
    ]);
    wait_vmstate_ids(&h.bus.address, &["conntrack-vmstate-100"], WAIT);
    out
}

pub(crate) fn step(h: &mut Host, verb: &str, role: &str) -> String {
    let qmp = match h.qemu.as_mut() {
        Some(q) => {
            q.release_qmp();
            Some(q.qmp_path.display().to_string())
        }
        None => None,
    };
    let mut args = vec![verb, "100", "--role", role];
    if let Some(q) = &qmp {
        args.extend(["--qmp", q.as_str()]);
    }
    h.cli_ok(&args)
}

/// Neither our VM connection nor QEMU's object: the VM is only known.
pub(crate) fn assert_idle(h: &mut Host, what: &str) {
    let owners = vmstate_owners(&h.bus.address).unwrap();
    assert!(owners.is_empty(), "{what}: VMState1 owners {owners:?}");
    if let Some(q) = h.qemu.as_mut() {
        if q.proc.try_wait().is_none() {
            assert!(
                q.qmp().find_vmstate().unwrap().is_none(),
                "{what}: QEMU still has a dbus-vmstate object"
            );
        }
    }
    let st = h.status_json("100");
    assert_eq!(
        (
            text(&st, "Lifecycle"),
            text(&st, "Prepared"),
            text(&st, "UniqueName")
        ),
        ("migration".into(), String::new(), String::new()),
        "{what}: {st}"
    );
}

pub(crate) fn register_known(h: &Host) {
    let bus = h.bus.address.clone();
    h.cli_ok(&[
        "register",
        "100",
        "--bus-address",
        &bus,
        "--lifecycle",
        "migration",
    ]);
}

/// Entries made before anything was registered; known VMs on both hosts;
/// prepare, migrate, finish: the entries arrive attribute-exact, the source
/// is flushed of exactly them, and both hosts are back to "known".
#[test]
fn prepare_migrate_finish_carries_the_entries_and_leaves_nothing_served() {
    common::needs!(qemu);
    let (mut src, mut dst) = pair("ms");
    let mut spec = Spec::new(2000, 100, 11);
    spec.noise = 0.2;
    let pop = population::generate(spec);
    population::load(&src.ns.name, &pop);
    let others: Vec<_> = pop.noise_marks.iter().map(|&m| (m, src.dump(m))).collect();
    // The kernel keeps labels only where a connlabel rule exists.
    population::enable_labels(&dst.ns.name);
    start_qemus(&mut src, &mut dst);
    register_known(&src);
    register_known(&dst);
    assert_idle(&mut src, "source, known");
    assert_idle(&mut dst, "destination, known");

    println!("{}", prepare(&mut src, "source"));
    println!("{}", prepare(&mut dst, "destination"));
    for h in [&mut src, &mut dst] {
        let o = qemu(h).qmp().find_vmstate().unwrap().expect("object added");
        assert_eq!(o.ids, vec!["conntrack-vmstate-100".to_string()]);
    }
    assert_eq!(text(&src.status_json("100"), "Prepared"), "source");

    let before = src.dump(100);
    assert_eq!(before.len(), 2000);
    let t = Instant::now();
    let (out, inc) = migrate(&mut src, &mut dst);
    assert_eq!(out.status, "completed", "{}", qemu(&mut src).output());
    assert_eq!(inc, Incoming::Running, "{}", qemu(&mut dst).output());
    assert_same_entries(
        "VM 100",
        &before,
        &dst.dump(100),
        t.elapsed().as_secs() as u32 + AGE_SLACK_S,
    );
    let save = report(&src, "100", "LastSave");
    assert_eq!(
        (num(&save, "entries"), text(&save, "error")),
        (2000, String::new())
    );

    println!("{}", step(&mut src, "finish", "source"));
    println!("{}", step(&mut dst, "finish", "destination"));
    assert!(src.dump(100).is_empty(), "source not flushed");
    for (m, v) in &others {
        assert_eq!(src.dump(*m).len(), v.len(), "mark {m} touched by the flush");
    }
    assert_eq!(dst.dump(100).len(), 2000, "destination lost entries");
    assert_idle(&mut src, "source, finished");
    assert_idle(&mut dst, "destination, finished");
}

/// A migration whose destination QEMU dies after Load: the source resumes
/// the guest (`cont`), abort on both. The source keeps every entry (the VM
/// runs on there), the destination deletes exactly what its Load created
/// and keeps the VM's older entries. A second attempt to a fresh
/// destination QEMU then carries everything.
#[test]
fn abort_after_a_failed_migration_keeps_the_source_and_cleans_the_destination() {
    common::needs!(qemu);
    let (mut src, mut dst) = pair("ma");
    population::load(
        &src.ns.name,
        &population::generate(Spec::new(1500, 100, 12)),
    );
    // Entries of VM 100 the destination had before (it ran there once).
    let mut spec = Spec::new(40, 100, 13);
    spec.noise = 0.0;
    population::load(&dst.ns.name, &population::generate(spec));
    let t0 = Instant::now();
    let dst_before = dst.dump(100);
    assert!(!dst_before.is_empty());
    start_qemus(&mut src, &mut dst);
    register_known(&src);
    register_known(&dst);
    prepare(&mut src, "source");
    prepare(&mut dst, "destination");
    let before = src.dump(100);
    let (out, inc) = migrate(&mut src, &mut dst);
    assert_eq!((out.status.as_str(), inc), ("completed", Incoming::Running));
    wait_restores(&dst);
    assert!(dst.dump(100).len() > dst_before.len() + 1000);
    // The destination's QEMU dies; the source resumes the VM.
    qemu(&mut dst).proc.kill();
    qemu(&mut src).execute("cont", None).unwrap();
    assert_eq!(qemu(&mut src).status(), "running");

    println!("{}", step(&mut dst, "abort", "destination"));
    println!("{}", step(&mut src, "abort", "source"));
    let ids = |v: &[conntrack_vmstate::entry::Entry]| {
        let mut i: Vec<u32> = v.iter().filter_map(|e| e.id).collect();
        i.sort_unstable();
        i
    };
    assert_eq!(
        ids(&dst.dump(100)),
        ids(&dst_before),
        "the destination must keep exactly its older entries"
    );
    let age = || t0.elapsed().as_secs() as u32 + AGE_SLACK_S;
    assert_same_entries(
        "older entries (destination)",
        &dst_before,
        &dst.dump(100),
        age(),
    );
    assert_same_entries("VM 100 (source)", &before, &src.dump(100), age());
    assert_idle(&mut src, "source, aborted");
    assert_idle(&mut dst, "destination, aborted");
    let log = std::fs::read_to_string(dst.path().join("daemon0.log")).unwrap();
    assert!(
        log.contains(&format!(
            "Abort of VM 100 as migration destination: deleted the {} entries its Load created (0 already gone)",
            before.len()
        )),
        "{log}"
    );

    // The second attempt, to a fresh destination QEMU: the older entries
    // stay, the migrated ones arrive, the source is flushed of them.
    super::migration_failed::fresh_incoming(&mut dst, "qemu2");
    prepare(&mut src, "source");
    prepare(&mut dst, "destination");
    let before = src.dump(100);
    let (out, inc) = migrate(&mut src, &mut dst);
    assert_eq!((out.status.as_str(), inc), ("completed", Incoming::Running));
    let want: Vec<_> = before.iter().chain(&dst_before).cloned().collect();
    assert_same_entries(
        "VM 100 (destination, second attempt)",
        &want,
        &dst.dump(100),
        age(),
    );
    let load = report(&dst, "100", "LastLoad");
    assert_eq!(
        (
            num(&load, "created"),
            num(&load, "existed"),
            text(&load, "error")
        ),
        (before.len() as u64, 0, String::new()),
        "{load}"
    );
    step(&mut src, "finish", "source");
    step(&mut dst, "finish", "destination");
    assert!(src.dump(100).is_empty(), "source not flushed");
    assert_eq!(dst.dump(100).len(), want.len());
}

/// Runs the futures concurrently, as separate callers would.
async fn at_once<T: Send + 'static>(
    futs: impl IntoIterator<Item = impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

/// How many bus connections the process `pid` holds.
async fn connections_of(conn: &zbus::Connection, pid: u32) -> usize {
    let dbus = zbus::fdo::DBusProxy::new(conn).await.unwrap();
    let mut n = 0;
    for name in dbus.list_names().await.unwrap() {
        if name.starts_with(':') {
            let p = dbus
                .get_connection_unix_process_id(name.clone().into())
                .await
                .unwrap_or(0);
            n += usize::from(p == pid);
        }
    }
    n
}

fn step_all(m: &Manager1Proxy<'static>, verb: &'static str) -> Vec<zbus::Result<()>> {
    let m = m.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(at_once((0..10).map(move |v| {
        let m = m.clone();
        async move {
            let o = HashMap::from([("role", Variant::from("source"))]);
            let vm = format!("vm{v}");
            match verb {
                "prepare" => m.prepare(&vm, o).await,
                _ => m.finish(&vm, o).await,
            }
        }
    })))
}

/// 1,000 VMs known to one daemon cost it one bus connection; 10 of them
/// prepared at once (10 more connections), saved concurrently as 10 QEMUs
/// would, and finished at once: back to one, their entries flushed. The
/// private bus runs with dbus-daemon's built-in limits, the system bus's
/// (256 connections per user), which 1,000 always-served VMs would exceed.
#[test]
fn a_thousand_known_vms_and_ten_migrating_at_once_on_stock_limits() {
    common::needs!(daemon);
    let mut h = Host::new("mk");
    h.start_daemon();
    let bus = h.bus.address.clone();
    let daemon_pid = h.daemon.as_ref().unwrap().pid();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (conn, m) = rt.block_on(async {
        let conn = zbus::connection::Builder::address(bus.as_str())
            .build()
            .await
            .unwrap();
        let m = Manager1Proxy::new(&conn).await.unwrap();
        (conn, m)
    });
    let t = Instant::now();
    rt.block_on(async {
        for i in 0..1000u32 {
            let o = HashMap::from([
                ("mark", Variant::from(10_000 + i)),
                ("bus_address", Variant::from(bus.as_str())),
                ("lifecycle", Variant::from("migration")),
            ]);
            m.register(&format!("vm{i}"), o).await.unwrap();
        }
    });
    let reg_s = t.elapsed().as_secs_f64();
    assert_eq!(
        rt.block_on(connections_of(&conn, daemon_pid)),
        1,
        "1000 known VMs, one connection"
    );
    assert!(vmstate_owners(&bus).unwrap().is_empty());

    // 100 entries of each of the 10 in the table.
    for v in 0..10u32 {
        let mut spec = Spec::new(100, 10_000 + v, u64::from(v));
        spec.noise = 0.0;
        population::load(&h.ns.name, &population::generate(spec));
    }
    let t = Instant::now();
    let prepared = step_all(&m, "prepare");
    let prep_ms = t.elapsed().as_millis();
    assert!(prepared.iter().all(|r| r.is_ok()), "{prepared:?}");
    assert_eq!(rt.block_on(connections_of(&conn, daemon_pid)), 11);
    let owners = vmstate_owners(&bus).unwrap();
    assert_eq!(owners.len(), 10, "{owners:?}");
    // Save on each, at once, as each VM's QEMU calls it.
    let c = conn.clone();
    let saves = rt.block_on(at_once(owners.keys().cloned().map(move |o| {
        let conn = c.clone();
        async move {
            let vs = VmState1Proxy::builder(&conn)
                .destination(o)
                .build()
                .await
                .unwrap();
            vs.save().await.map(|b| b.len())
        }
    })));
    for s in &saves {
        assert!(matches!(s, Ok(n) if *n > 32), "{saves:?}");
    }
    for v in 0..10 {
        let st = h.status_json(&format!("vm{v}"));
        assert_eq!(num(&st["LastSave"], "entries"), 100, "{st}");
    }
    let fin = step_all(&m, "finish");
    assert!(fin.iter().all(|r| r.is_ok()), "{fin:?}");
    assert_eq!(rt.block_on(connections_of(&conn, daemon_pid)), 1);
    assert!(vmstate_owners(&bus).unwrap().is_empty());
    assert_eq!(
        h.ns.conntrack_count(),
        0,
        "the 10 VMs' saved entries flushed"
    );
    let rss = std::fs::read_to_string(format!("/proc/{daemon_pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or("VmRSS: ?")
        .to_string();
    println!(
        "MEASURE 1000 known VMs registered one after another in {reg_s:.1} s; 10 prepared at \
         once in {prep_ms} ms; daemon {rss}"
    );
}

//! Real live migrations with the real service: two hosts (network
//! namespaces, each with its own conntrack table and private bus),
//! conntrack-vmstated inside each namespace, QEMU 7.2 source and destination
//! wired with `conntrack-vmstate register … --qmp`, the stream in a file.
//! Entries are compared over ctnetlink, every attribute.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::compare;
use common::host::{assert_same_entries, wait_vmstate_ids, Host, WAIT};
use common::population::{self, Spec};
use common::qemu::{Incoming, Outgoing, Qemu, QemuOpts};
use conntrack_vmstate::entry::{status, Entry, ProtoInfo};
use serde_json::Value;

/// How much more than the wall-clock time between two dumps a remaining
/// timeout may have aged. Every hop floors to whole seconds: the source dump,
/// the warm cache's observation and its `timeout - elapsed`, the create on the
/// destination and the destination dump; up to ~3 s on a loaded machine.
pub(crate) const AGE_SLACK_S: u32 = 5;

/// conntrack(8) `--load-file` lines of demo/population: the realistic mix.
pub(crate) fn population(mark: u32, count: usize) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/population");
    let out = Command::new(script)
        .args([mark.to_string(), count.to_string()])
        .output()
        .expect("demo/population");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

fn without_tcp_flags(v: Vec<Entry>) -> Vec<Entry> {
    v.into_iter()
        .map(|mut e| {
            if let Some(ProtoInfo::Tcp {
                wscale_orig,
                wscale_reply,
                flags_orig,
                flags_reply,
                ..
            }) = &mut e.protoinfo
            {
                (*wscale_orig, *wscale_reply, *flags_orig, *flags_reply) = (0, 0, 0, 0);
            }
            e
        })
        .collect()
}

pub(crate) fn v4_v6(entries: &[Entry]) -> (usize, usize) {
    let v4 = entries.iter().filter(|e| e.orig.src.is_ipv4()).count();
    (v4, entries.len() - v4)
}

/// Source QEMU running, destination QEMU waiting (`-incoming defer`); no
/// dbus-vmstate object yet: `register --qmp` adds it on both sides.
pub(crate) fn start_qemus(src: &mut Host, dst: &mut Host) {
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
            vmstate: None,
            incoming: true,
            ..Default::default()
        },
    ));
}

pub(crate) fn qemu(h: &mut Host) -> &mut Qemu {
    h.qemu.as_mut().expect("QEMU started")
}

/// `register VM --qmp` on one host; our QMP session steps aside because
/// QEMU serves one monitor client at a time.
pub(crate) fn register_qmp(h: &mut Host, vm: &str, extra: &[&str]) -> String {
    qemu(h).release_qmp();
    let qmp = qemu(h).qmp_path.display().to_string();
    let mut args = vec!["--qmp", qmp.as_str()];
    args.extend_from_slice(extra);
    let out = h.register(vm, &args);
    // Ready as QEMU will see it: ListQueuedOwners + GetAll show the Id.
    let id = text(&h.status_json(vm), "Id");
    wait_vmstate_ids(&h.bus.address, &[id.as_str()], WAIT);
    out
}

pub(crate) fn unregister_qmp(h: &mut Host, vm: &str, flush: bool) -> String {
    qemu(h).release_qmp();
    let qmp = qemu(h).qmp_path.display().to_string();
    let mut args = vec!["unregister", vm, "--qmp", qmp.as_str()];
    if flush {
        args.push("--flush");
    }
    h.cli_ok(&args)
}

pub(crate) fn migrate(src: &mut Host, dst: &mut Host) -> (Outgoing, Incoming) {
    let stream = src.path().join("stream.bin");
    let out = qemu(src).migrate_to_file(&stream);
    println!(
        "QEMU downtime: {} ms (total {} ms), status {}",
        out.downtime_ms.unwrap_or(0),
        out.total_ms.unwrap_or(0),
        out.status
    );
    if out.status == "completed" {
        assert!(out.downtime_ms.is_some(), "no downtime in {}", out.query);
    }
    let inc = qemu(dst).incoming_from_file(&stream);
    wait_restores(dst);
    (out, inc)
}

/// Load answers QEMU after its budget (15 ms) and creates the rest of the
/// entries in the background (docs/downtime.md): waits (bounded) until no
/// VM of `h` has a restore pending, so the destination's table is final.
pub(crate) fn wait_restores(h: &Host) {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let out = h.cli_ok(&["status", "--json"]);
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let pending: Vec<String> = v
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or(std::slice::from_ref(&v))
            .iter()
            .filter(|vm| vm["LastLoad"]["pending"].as_bool() == Some(true))
            .map(|vm| vm["VmId"].to_string())
            .collect();
        if pending.is_empty() {
            return;
        }
        assert!(Instant::now() < end, "restores still pending: {pending:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn report(h: &Host, vm: &str, which: &str) -> Value {
    h.status_json(vm)
        .get(which)
        .cloned()
        .unwrap_or_else(|| panic!("status {vm}: no {which}"))
}

pub(crate) fn num(v: &Value, k: &str) -> u64 {
    v.get(k)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no {k} in {v}"))
}

pub(crate) fn text(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_owned()
}

pub(crate) fn pair(tag: &str) -> (Host, Host) {
    let mut src = Host::new(&format!("{tag}s"));
    let mut dst = Host::new(&format!("{tag}d"));
    src.start_daemon();
    dst.start_daemon();
    (src, dst)
}

#[test]
fn entries_arrive_attribute_exact_and_flush_removes_exactly_them() {
    common::needs!(qemu);
    let (mut src, mut dst) = pair("ex");
    // The realistic mix: NAT'ed with SRC_NAT/DST_NAT status, zones,
    // FIXED_TIMEOUT, labels, TCP window scale; 20 % other VMs (marks 1100…).
    let pop = population::generate(Spec::new(3000, 100, 7));
    population::load(&src.ns.name, &pop);
    let mut other = Spec::new(300, 400, 8);
    other.noise = 0.0;
    population::load(&dst.ns.name, &population::generate(other));
    let noise_before: Vec<(u32, Vec<Entry>)> =
        pop.noise_marks.iter().map(|&m| (m, src.dump(m))).collect();
    assert!(noise_before.iter().map(|(_, v)| v.len()).sum::<usize>() >= 500);
    let dst400 = dst.dump(400);
    // The other VMs' snapshots are older than the migration: their allowed
    // timeout ageing counts from here.
    let t0 = Instant::now();
    start_qemus(&mut src, &mut dst);

    register_qmp(&mut src, "100", &[]);
    register_qmp(&mut dst, "100", &[]);
    for h in [&mut src, &mut dst] {
        let addr = h.bus.address.clone();
        let o = qemu(h)
            .qmp()
            .find_vmstate()
            .unwrap()
            .expect("register --qmp added the object");
        assert_eq!(
            (o.addr, o.ids),
            (addr, vec!["conntrack-vmstate-100".to_string()])
        );
    }

    let before = src.dump(100);
    let (v4, v6) = v4_v6(&before);
    assert!(
        before.len() == 3000 && v4 > 0 && v6 > 0,
        "{} {v4} {v6}",
        before.len()
    );
    let t = Instant::now();
    let (out, inc) = migrate(&mut src, &mut dst);
    assert_eq!(out.status, "completed", "{}", qemu(&mut src).output());
    assert_eq!(inc, Incoming::Running, "{}", qemu(&mut dst).output());

    let after = dst.dump(100);
    let age = t.elapsed().as_secs() as u32 + AGE_SLACK_S;
    assert_same_entries("VM 100", &before, &after, age);
    let (a4, a6) = v4_v6(&after);
    assert_eq!((a4, a6), (v4, v6));
    // The rich attributes really were there to be carried.
    assert!(after.iter().any(|e| e.labels.is_some()), "no labels");
    assert!(after.iter().any(|e| e.zone != 0), "no zone");
    assert!(
        after.iter().any(|e| e.status & status::SRC_NAT != 0),
        "no SNAT"
    );
    assert!(
        after.iter().any(|e| e.status & status::DST_NAT != 0),
        "no DNAT"
    );
    assert!(
        after.iter().any(|e| matches!(
            e.protoinfo,
            Some(ProtoInfo::Tcp { wscale_orig, .. }) if wscale_orig > 0
        )),
        "no window scale"
    );
    // The netlink branch's comparators: ours decoded, and conntrack(8)'s view.
    let diffs = compare::compare(&before, &after, compare::Tolerance::exact_status(age));
    assert!(diffs.is_empty(), "{diffs:#?}");
    let diffs = compare::cross_check(&src.ns.name, &dst.ns.name, 100);
    assert!(diffs.is_empty(), "{diffs:#?}");

    let save = report(&src, "100", "LastSave");
    let load = report(&dst, "100", "LastLoad");
    println!("LastSave {save}\nLastLoad {load}");
    assert_eq!(text(&save, "error"), "");
    assert_eq!((num(&save, "entries"), num(&save, "dropped")), (3000, 0));
    assert!((1..=1_048_576).contains(&num(&save, "bytes")));
    assert_eq!(text(&load, "error"), "");
    assert_eq!(num(&load, "created"), 3000);

    // Other VMs: untouched on both hosts, never carried.
    let age0 = t0.elapsed().as_secs() as u32 + AGE_SLACK_S;
    for (m, v) in &noise_before {
        assert_same_entries(&format!("VM {m} (source)"), v, &src.dump(*m), age0);
        assert!(dst.dump(*m).is_empty(), "VM {m} reached the destination");
    }
    assert_same_entries("VM 400 (destination)", &dst400, &dst.dump(400), age0);

    // A connection of VM 100 opened on the source after Save is not part of
    // the migrated state: the flush must leave it.
    src.load_entries(
        "-I -p tcp -s 10.0.100.250 -d 192.0.2.77 --sport 999 --dport 80 --state ESTABLISHED \
         -u SEEN_REPLY,ASSURED -t 5000 --mark 100\n",
    );
    unregister_qmp(&mut src, "100", true);
    let left = src.dump(100);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].orig.src.to_string(), "10.0.100.250");
    for (m, v) in &noise_before {
        let age = t0.elapsed().as_secs() as u32 + AGE_SLACK_S;
        assert_same_entries(&format!("VM {m} after flush"), v, &src.dump(*m), age);
    }
    assert_eq!(qemu(&mut src).qmp().find_vmstate().unwrap(), None);
    // The destination keeps what arrived; its QEMU loses the object.
    unregister_qmp(&mut dst, "100", false);
    assert_eq!(dst.dump(100).len(), 3000);
    assert_eq!(qemu(&mut dst).qmp().find_vmstate().unwrap(), None);
}

#[test]
fn two_vms_on_one_shared_bus_migrating_at_once_get_only_their_own() {
    common::needs!(qemu);
    let (src, dst) = pair("sh");
    src.load_entries(&population(100, 1500));
    src.load_entries(&population(101, 1000));
    let (b100, b101) = (src.dump(100), src.dump(101));
    let t = Instant::now();
    let mut sq = Vec::new();
    let mut dq = Vec::new();
    for vm in ["100", "101"] {
        sq.push(Qemu::start(
            src.path(),
            &format!("qemu{vm}"),
            Some(&src.ns),
            &QemuOpts::default(),
        ));
        dq.push(Qemu::start(
            dst.path(),
            &format!("qemu{vm}"),
            Some(&dst.ns),
            &QemuOpts {
                vmstate: None,
                incoming: true,
                ..Default::default()
            },
        ));
    }
    for (i, vm) in ["100", "101"].iter().enumerate() {
        for (h, q) in [(&src, &mut sq[i]), (&dst, &mut dq[i])] {
            q.release_qmp();
            let p = q.qmp_path.display().to_string();
            h.register(vm, &["--qmp", &p]);
        }
    }
    // Both VMs' helpers on each bus, as QEMU will see them.
    for h in [&src, &dst] {
        wait_vmstate_ids(
            &h.bus.address,
            &["conntrack-vmstate-100", "conntrack-vmstate-101"],
            WAIT,
        );
    }

    let streams: Vec<_> = ["100", "101"]
        .iter()
        .map(|vm| src.path().join(format!("stream{vm}.bin")))
        .collect();
    let outs: Vec<Outgoing> = std::thread::scope(|s| {
        let handles: Vec<_> = sq
            .iter_mut()
            .zip(&streams)
            .map(|(q, st)| s.spawn(move || q.migrate_to_file(st)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for o in &outs {
        println!(
            "QEMU downtime (concurrent): {} ms",
            o.downtime_ms.unwrap_or(0)
        );
        assert_eq!(o.status, "completed");
    }
    let incs: Vec<Incoming> = std::thread::scope(|s| {
        let handles: Vec<_> = dq
            .iter_mut()
            .zip(&streams)
            .map(|(q, st)| s.spawn(move || q.incoming_from_file(st)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert_eq!(incs, [Incoming::Running, Incoming::Running]);
    wait_restores(&dst);
    let age = t.elapsed().as_secs() as u32 + AGE_SLACK_S;
    assert_same_entries("VM 100", &b100, &dst.dump(100), age);
    assert_same_entries("VM 101", &b101, &dst.dump(101), age);
    for (vm, n) in [("100", 1500), ("101", 1000)] {
        let save = report(&src, vm, "LastSave");
        let load = report(&dst, vm, "LastLoad");
        assert_eq!(num(&save, "entries"), n, "VM {vm} saved {save}");
        assert_eq!(num(&load, "created"), n, "VM {vm} loaded {load}");
    }
}

#[test]
fn a_custom_id_is_what_qemu_lists_and_migrates() {
    common::needs!(qemu);
    let (mut src, mut dst) = pair("id");
    src.load_entries(&population(100, 200));
    // another VM's entries under the mark the custom registration must not take
    src.load_entries(&population(101, 50));
    start_qemus(&mut src, &mut dst);
    // a VM named by a non-numeric id, so its mark is given explicitly
    let id = "acme-ct.vm-100";
    register_qmp(&mut src, "web-1", &["--id", id, "--mark", "100"]);
    register_qmp(&mut dst, "web-1", &["--id", id, "--mark", "100"]);
    let st = src.status_json("web-1");
    assert_eq!(
        (
            text(&st, "Id").as_str(),
            st.get("Mark").and_then(Value::as_u64)
        ),
        (id, Some(100))
    );
    let o = qemu(&mut dst).qmp().find_vmstate().unwrap().unwrap();
    assert_eq!(o.ids, [id]);
    let before = src.dump(100);
    let t = Instant::now();
    let (out, inc) = migrate(&mut src, &mut dst);
    assert_eq!((out.status.as_str(), inc), ("completed", Incoming::Running));
    assert_same_entries(
        "VM web-1",
        &before,
        &dst.dump(100),
        t.elapsed().as_secs() as u32 + AGE_SLACK_S,
    );
    assert!(dst.dump(101).is_empty());
    assert_eq!(num(&report(&dst, "web-1", "LastLoad"), "created"), 200);
}

/// The source daemon runs without CAP_NET_ADMIN (dropped from its bounding
/// set): the kernel refuses the dump. The migration must still complete and
/// the guest run on the destination, with an empty state.
#[test]
fn save_without_conntrack_access_still_migrates() {
    common::needs!(qemu);
    let mut src = Host::new("caps");
    let mut dst = Host::new("capd");
    let addr = src.bus.address.clone();
    src.start_daemon_with(
        &addr,
        &[
            "setpriv",
            "--bounding-set",
            "-net_admin",
            "--inh-caps",
            "-net_admin",
        ],
        &[],
    );
    dst.start_daemon();
    src.load_entries(&population(100, 100));
    start_qemus(&mut src, &mut dst);
    register_qmp(&mut src, "100", &[]);
    register_qmp(&mut dst, "100", &[]);
    let (out, inc) = migrate(&mut src, &mut dst);
    assert_eq!((out.status.as_str(), inc), ("completed", Incoming::Running));
    let save = report(&src, "100", "LastSave");
    println!("LastSave {save}");
    let err = text(&save, "error");
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    assert!(err.ends_with("sent an empty state"), "{err}");
    assert_eq!(num(&save, "entries"), 0);
    let load = report(&dst, "100", "LastLoad");
    assert_eq!(
        (text(&load, "error").as_str(), num(&load, "created")),
        ("", 0)
    );
    assert!(dst.dump(100).is_empty());
}

/// Conntrack access that does not answer in time: a real dump of a real
/// table against a 1 ms save deadline. Save answers with an empty state at
/// the deadline; the migration completes.
#[test]
fn save_past_its_deadline_still_migrates() {
    common::needs!(qemu);
    let mut src = Host::new("dls");
    let mut dst = Host::new("dld");
    let addr = src.bus.address.clone();
    src.start_daemon_with(&addr, &[], &["--save-deadline-ms", "1"]);
    dst.start_daemon();
    src.load_entries(&population(100, 20000));
    start_qemus(&mut src, &mut dst);
    register_qmp(&mut src, "100", &[]);
    register_qmp(&mut dst, "100", &[]);
    let (out, inc) = migrate(&mut src, &mut dst);
    assert_eq!((out.status.as_str(), inc), ("completed", Incoming::Running));
    let save = report(&src, "100", "LastSave");
    println!("LastSave {save}");
    assert_eq!(
        text(&save, "error"),
        "dump and encode did not finish within the 1 ms save deadline; sent an empty state"
    );
    assert!(num(&save, "duration_us") < 1_000_000);
    assert!(dst.dump(100).is_empty());
}

/// Both daemons are killed (SIGKILL) after `register --qmp` and started
/// again from their state dirs: they serve the VM again with the same Id
/// and mark, and the migration carries the entries.
#[test]
fn daemons_killed_and_restarted_between_register_and_migration() {
    common::needs!(qemu);
    let (mut src, mut dst) = pair("rs");
    src.load_entries(&population(100, 500));
    start_qemus(&mut src, &mut dst);
    register_qmp(&mut src, "100", &[]);
    register_qmp(&mut dst, "100", &[]);
    for h in [&mut src, &mut dst] {
        let killed = h.daemon.as_mut().unwrap().kill();
        assert!(killed.is_some(), "daemon did not die");
        h.start_daemon();
        // QEMU's view: the Id is served again on the bus
        wait_vmstate_ids(&h.bus.address, &["conntrack-vmstate-100"], WAIT);
        let st = h.status_json("100");
        assert_eq!(
            (
                text(&st, "Id").as_str(),
                st.get("Mark").and_then(Value::as_u64)
            ),
            ("conntrack-vmstate-100", Some(100))
        );
    }
    let before = src.dump(100);
    let t = Instant::now();
    let (out, inc) = migrate(&mut src, &mut dst);
    assert_eq!((out.status.as_str(), inc), ("completed", Incoming::Running));
    assert_same_entries(
        "VM 100",
        &before,
        &dst.dump(100),
        t.elapsed().as_secs() as u32 + AGE_SLACK_S,
    );
}

/// One destination host for a given stream: its own namespace, bus, daemon
/// and QEMU; registers VM 100 with `--qmp` and runs the incoming
/// migration. Returns the host (for LastLoad and the table) and the outcome.
fn destination_for(tag: &str, stream: &Path) -> (Host, Incoming) {
    let mut dst = Host::new(tag);
    dst.start_daemon();
    dst.qemu = Some(Qemu::start(
        dst.path(),
        "qemu",
        Some(&dst.ns),
        &QemuOpts {
            vmstate: None,
            incoming: true,
            ..Default::default()
        },
    ));
    register_qmp(&mut dst, "100", &[]);
    let inc = qemu(&mut dst).incoming_from_file(stream);
    wait_restores(&dst);
    (dst, inc)
}

/// Bad data reaches Load for real: the dbus-vmstate section of a real
/// stream is rewritten (reference §7 layout) before the destination reads
/// it. Every destination must resume the guest, create nothing, and say why
/// in LastLoad. Valid legacy text (the Perl helper's payload) is loaded.
#[test]
fn bad_data_at_load_never_breaks_the_migration() {
    common::needs!(qemu);
    use common::qemu::{parse_vmstate_section, rewrite_vmstate_section};
    let (mut src, _unused_dst) = pair("bl");
    src.load_entries(&population(100, 400));
    src.qemu = Some(Qemu::start(
        src.path(),
        "qemu",
        Some(&src.ns),
        &QemuOpts::default(),
    ));
    register_qmp(&mut src, "100", &[]);
    let stream = src.path().join("stream.bin");
    assert_eq!(qemu(&mut src).migrate_to_file(&stream).status, "completed");
    let bytes = std::fs::read(&stream).unwrap();
    let sec = parse_vmstate_section(&bytes).expect("section");
    assert_eq!(sec.entries.len(), 1);
    let (id, blob) = sec.entries[0].clone();
    assert_eq!(id, "conntrack-vmstate-100");
    assert!(blob.len() > 16, "real Save blob: {} bytes", blob.len());

    // The Perl helper's payload: conntrack -L -o save lines + " --mark N".
    let save_text = String::from_utf8(
        common::netns::run_ok(
            src.ns
                .cmd("conntrack")
                .args(["-L", "-o", "save", "-m", "100"]),
        )
        .stdout,
    )
    .unwrap();
    let legacy: String = save_text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("{l} --mark 100\n"))
        .collect();
    assert_eq!(legacy.lines().count(), 400);
    // Taken with the text: the bad cases below take seconds, and the source's
    // timeouts run down meanwhile while the text's stay as they were.
    let before = src.dump(100);

    let mut flipped = blob.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x5a;
    flipped[mid + 1] ^= 0xff;
    let mut oversized = blob.clone();
    oversized.resize(1_048_576, 0xa5);
    let bad_legacy = format!("{legacy}-A -t 300 -s not-an-address -p tcp --sport x --mark 100\n");
    let half = blob.len() / 2;
    let trailing = 1_048_576 - blob.len();
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "bit flips",
            flipped,
            "invalid state, nothing loaded: state blob checksum mismatch".into(),
        ),
        (
            "truncated",
            blob[..half].to_vec(),
            format!(
                "invalid state, nothing loaded: truncated state blob: state payload needs {} \
                 bytes, only {half} present",
                blob.len()
            ),
        ),
        (
            "1 MiB: real blob plus garbage",
            oversized,
            format!(
                "invalid state, nothing loaded: state blob has {trailing} bytes after the \
                 declared payload"
            ),
        ),
        (
            "legacy text with a bad line",
            bad_legacy.into_bytes(),
            "invalid state, nothing loaded: bad conntrack text line 401: -s: invalid address \
             \"not-an-address\""
                .into(),
        ),
        (
            "zero bytes",
            Vec::new(),
            "empty state (0 bytes): nothing to load".into(),
        ),
    ];
    for (i, (what, payload, why)) in cases.into_iter().enumerate() {
        let edited = rewrite_vmstate_section(&bytes, &[(id.clone(), payload.clone())]);
        let path = src.path().join(format!("bad{i}.bin"));
        std::fs::write(&path, edited).unwrap();
        let (dst, inc) = destination_for(&format!("bl{i}"), &path);
        assert_eq!(
            inc,
            Incoming::Running,
            "{what}: {}",
            dst.qemu.as_ref().unwrap().output()
        );
        let load = report(&dst, "100", "LastLoad");
        println!("{what}: LastLoad {load}");
        assert_eq!(num(&load, "bytes"), payload.len() as u64, "{what}");
        let err = text(&load, "error");
        assert!(
            err.starts_with(&why),
            "{what}: {err:?} does not start with {why:?}"
        );
        assert_eq!(num(&load, "created"), 0, "{what}");
        assert!(dst.dump(100).is_empty(), "{what}: entries were created");
    }

    // Valid legacy text loads: hosts running the Perl helper can migrate to us.
    let edited = rewrite_vmstate_section(&bytes, &[(id.clone(), legacy.into_bytes())]);
    let path = src.path().join("legacy.bin");
    std::fs::write(&path, edited).unwrap();
    let (dst, inc) = destination_for("bllg", &path);
    assert_eq!(inc, Incoming::Running);
    let load = report(&dst, "100", "LastLoad");
    println!("legacy text: LastLoad {load}");
    assert_eq!(
        (text(&load, "error").as_str(), num(&load, "created")),
        ("", 400)
    );
    // conntrack(8)'s -o save text has no TCP window scale or flags (the
    // Perl helper loses them, prior-art.md); everything else must match.
    assert_same_entries(
        "legacy text",
        &without_tcp_flags(before),
        &without_tcp_flags(dst.dump(100)),
        30,
    );
}

/// Conntrack access that hangs for real: the daemon reaches conntrack
/// through the sandboxed helper process, which is frozen (SIGSTOP) before
/// the migration. Save answers at its deadline with an empty state, the
/// migration completes and the guest runs on the destination; after the
/// helper is thawed, a second migration carries the entries.
#[test]
fn conntrack_helper_frozen_during_save_still_migrates() {
    common::needs!(qemu);
    use common::host::Proc;
    use nix::sys::signal::{kill, Signal};
    let mut src = Host::new("hgs");
    let mut dst = Host::new("hgd");
    let sock = src.path().join("helper.sock");
    let mut helper = Proc::spawn(
        "helper",
        src.path(),
        src.ns
            .cmd(env!("CARGO_BIN_EXE_conntrack-vmstate-helper"))
            .arg("--listen")
            .arg(&sock)
            .args(["--idle-timeout", "0"]),
    );
    let end = Instant::now() + WAIT;
    while !sock.exists() {
        assert!(
            helper.try_wait().is_none(),
            "helper exited: {}",
            helper.output()
        );
        assert!(Instant::now() < end, "helper socket missing");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let addr = src.bus.address.clone();
    let sock_arg = sock.display().to_string();
    src.start_daemon_with(&addr, &[], &["--helper-socket", &sock_arg]);
    dst.start_daemon();
    src.load_entries(&population(100, 300));
    start_qemus(&mut src, &mut dst);
    register_qmp(&mut src, "100", &[]);
    register_qmp(&mut dst, "100", &[]);

    let pid = nix::unistd::Pid::from_raw(helper.pid() as i32);
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP helper");
    let (out, inc) = migrate(&mut src, &mut dst);
    kill(pid, Signal::SIGCONT).expect("SIGCONT helper");
    assert_eq!((out.status.as_str(), inc), ("completed", Incoming::Running));
    let save = report(&src, "100", "LastSave");
    println!("LastSave {save}");
    assert_eq!(
        text(&save, "error"),
        "dump and encode did not finish within the 2000 ms save deadline; sent an empty state"
    );
    // Save answered at its deadline, well inside QEMU's 25 s
    let d = out.downtime_ms.unwrap_or(0);
    assert!((2000..10_000).contains(&d), "downtime {d} ms");
    assert!(dst.dump(100).is_empty());

    // Thawed, the helper serves again: the next Save (the source guest
    // resumed, migrated again to a fresh destination) carries every entry.
    let before = src.dump(100);
    let t = Instant::now();
    qemu(&mut src).execute("cont", None).ok();
    let mut dst2 = Host::new("hgd2");
    dst2.start_daemon();
    dst2.qemu = Some(Qemu::start(
        dst2.path(),
        "qemu",
        Some(&dst2.ns),
        &QemuOpts {
            vmstate: None,
            incoming: true,
            ..Default::default()
        },
    ));
    register_qmp(&mut dst2, "100", &[]);
    let (out, inc) = migrate(&mut src, &mut dst2);
    assert_eq!((out.status.as_str(), inc), ("completed", Incoming::Running));
    assert_eq!(text(&report(&src, "100", "LastSave"), "error"), "");
    assert_same_entries(
        "VM 100 through the helper",
        &before,
        &dst2.dump(100),
        t.elapsed().as_secs() as u32 + AGE_SLACK_S,
    );
}

/// `register --qmp` / `unregister --qmp` against a QMP socket that is not
/// there: a clear error naming the socket, and nothing registered (QEMU is
/// reached first, for the pid that binds Save and Load).
#[test]
fn register_qmp_with_an_absent_socket_is_a_clear_error() {
    common::needs!(qemu);
    let mut h = Host::new("rq");
    h.start_daemon();
    let sock = h.path().join("absent.qmp");
    let s = sock.display().to_string();
    let out = h.cli(&[
        "register",
        "100",
        "--bus-address",
        &h.bus.address.clone(),
        "--qmp",
        &s,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "conntrack-vmstate: reaching VM 100's QEMU over {s}: cannot connect to QMP socket \
             {s}: No such file or directory (os error 2)"
        )
    );
    // QEMU is reached first (its pid binds Save and Load): nothing was
    // registered for it.
    let st = h.cli(&["status", "100"]);
    assert_eq!(
        String::from_utf8_lossy(&st.stderr).trim_end(),
        "conntrack-vmstate: VM '100' is not registered"
    );
    h.cli_ok(&["register", "100", "--bus-address", &h.bus.address.clone()]);
    let out = h.cli(&["unregister", "100", "--qmp", &s]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot connect to QMP socket {s}")),
        "{err}"
    );
    // a real QEMU now: wired and unwired by the same commands
    h.qemu = Some(Qemu::start(
        h.path(),
        "qemu",
        Some(&h.ns),
        &QemuOpts::default(),
    ));
    register_qmp(&mut h, "100", &[]);
    let o = qemu(&mut h).qmp().find_vmstate().unwrap().unwrap();
    assert_eq!(o.ids, ["conntrack-vmstate-100"]);
    unregister_qmp(&mut h, "100", false);
    assert_eq!(qemu(&mut h).qmp().find_vmstate().unwrap(), None);
    assert!(!h.cli(&["status", "100"]).status.success());
}

/// A source registered with `--format conntrack-save` sends what the
/// Proxmox Perl helper sends (conntrack(8) `-o save` lines + ` --mark N`);
/// the destination recognises and loads it. That text has no labels, TCP
/// window scale or TCP flags; everything else arrives.
#[test]
fn perl_helper_text_format_end_to_end() {
    common::needs!(qemu);
    let (mut src, mut dst) = pair("pl");
    src.load_entries(&population(100, 600));
    start_qemus(&mut src, &mut dst);
    register_qmp(&mut src, "100", &["--format", "conntrack-save"]);
    register_qmp(&mut dst, "100", &[]);
    let before = src.dump(100);
    let t = Instant::now();
    let (out, inc) = migrate(&mut src, &mut dst);
    assert_eq!((out.status.as_str(), inc), ("completed", Incoming::Running));
    let bytes = std::fs::read(src.path().join("stream.bin")).unwrap();
    let sec = common::qemu::parse_vmstate_section(&bytes).unwrap();
    let text_blob = String::from_utf8(sec.entries[0].1.clone()).expect("text payload");
    assert_eq!(text_blob.lines().count(), 600);
    assert!(
        text_blob.lines().all(|l| l.ends_with(" --mark 100")),
        "{}",
        text_blob.lines().next().unwrap_or("")
    );
    let load = report(&dst, "100", "LastLoad");
    assert_eq!(
        (text(&load, "error").as_str(), num(&load, "created")),
        ("", 600)
    );
    assert_same_entries(
        "VM 100 via conntrack-save text",
        &without_tcp_flags(before),
        &without_tcp_flags(dst.dump(100)),
        t.elapsed().as_secs() as u32 + AGE_SLACK_S,
    );
}

//! The migration harness itself, proven with no helper at all: two hosts
//! (namespaces + private buses), real QEMU 7.2 source and destination, the
//! stream in a file. These pin QEMU's behaviour the service tests rely on.

use common::host::Host;
use common::qemu::{parse_vmstate_section, rewrite_vmstate_section, Incoming, Qemu, QemuOpts};

fn with_object(h: &Host, ids: Option<&str>, incoming: bool) -> QemuOpts {
    QemuOpts {
        vmstate: Some((h.bus.address.clone(), ids.map(str::to_owned))),
        incoming,
        ..Default::default()
    }
}

#[test]
fn empty_id_list_on_both_sides_migrates_and_the_destination_runs() {
    common::needs!(qemu);
    let mut src = Host::new("hsrc");
    let mut dst = Host::new("hdst");
    // id-list="" means "expect nobody"; set at run time as management does.
    let mut sq = Qemu::start(
        src.path(),
        "qemu",
        Some(&src.ns),
        &with_object(&src, None, false),
    );
    sq.set_id_list("dv0", "");
    let mut dq = Qemu::start(
        dst.path(),
        "qemu",
        Some(&dst.ns),
        &with_object(&dst, None, true),
    );
    dq.set_id_list("dv0", "");

    let stream = src.path().join("stream.bin");
    let out = sq.migrate_to_file(&stream);
    assert_eq!(out.status, "completed", "{}", sq.output());
    let downtime = out.downtime_ms.expect("downtime reported");
    println!("QEMU downtime, no helper: {downtime} ms");
    assert_eq!(sq.status(), "postmigrate");
    // Events that came in between replies were kept, not mistaken for replies.
    let events = sq.qmp().take_events();
    let names: Vec<String> = events
        .iter()
        .map(|e| {
            let st = e.pointer("/data/status").and_then(|v| v.as_str());
            format!(
                "{}{}",
                e["event"].as_str().unwrap_or("?"),
                st.map(|s| format!(":{s}")).unwrap_or_default()
            )
        })
        .collect();
    println!("QMP events: {names:?}");
    assert!(names.iter().any(|n| n == "STOP"), "{names:?}");
    assert!(names.iter().any(|n| n == "MIGRATION:active"), "{names:?}");

    // The section is in the stream even with no helper: nelem 0, padded.
    let bytes = std::fs::read(&stream).unwrap();
    let sec = parse_vmstate_section(&bytes).expect("dbus-vmstate section");
    assert!(sec.entries.is_empty());
    assert!(
        sec.data_size.is_power_of_two() && sec.data_size >= 16,
        "{sec:?}"
    );

    assert_eq!(
        dq.incoming_from_file(&stream),
        Incoming::Running,
        "{}",
        dq.output()
    );
    src.qemu = Some(sq);
    dst.qemu = Some(dq);
}

#[test]
fn object_only_on_the_source_makes_the_destination_exit_1() {
    common::needs!(qemu);
    let src = Host::new("osrc");
    let dst = Host::new("odst");
    let mut sq = Qemu::start(
        src.path(),
        "qemu",
        Some(&src.ns),
        &with_object(&src, Some(""), false),
    );
    let mut dq = Qemu::start(
        dst.path(),
        "qemu",
        Some(&dst.ns),
        &QemuOpts {
            vmstate: None,
            incoming: true,
            ..Default::default()
        },
    );
    let stream = src.path().join("stream.bin");
    assert_eq!(sq.migrate_to_file(&stream).status, "completed");
    assert_eq!(dq.incoming_from_file(&stream), Incoming::Exited(Some(1)));
    let log = dq.output();
    assert!(
        log.contains("Unknown savevm section or instance 'dbus-vmstate/dbus-vmstate' 0"),
        "{log}"
    );
    assert!(log.contains("load of migration failed"), "{log}");
}

#[test]
fn no_object_on_either_side_migrates() {
    common::needs!(qemu);
    let src = Host::new("nsrc");
    let dst = Host::new("ndst");
    let mut sq = Qemu::start(src.path(), "qemu", Some(&src.ns), &QemuOpts::default());
    let mut dq = Qemu::start(
        dst.path(),
        "qemu",
        Some(&dst.ns),
        &QemuOpts {
            vmstate: None,
            incoming: true,
            ..Default::default()
        },
    );
    let stream = src.path().join("stream.bin");
    let out = sq.migrate_to_file(&stream);
    assert_eq!(out.status, "completed");
    println!(
        "QEMU downtime, no dbus-vmstate object: {} ms",
        out.downtime_ms.unwrap_or(0)
    );
    assert!(parse_vmstate_section(&std::fs::read(&stream).unwrap()).is_none());
    assert_eq!(dq.incoming_from_file(&stream), Incoming::Running);
}

#[test]
fn a_listed_id_without_helper_fails_the_source_and_the_guest_resumes() {
    common::needs!(qemu);
    let src = Host::new("msrc");
    let mut sq = Qemu::start(
        src.path(),
        "qemu",
        Some(&src.ns),
        &with_object(&src, Some("conntrack-vmstate-100"), false),
    );
    let out = sq.migrate_to_file(&src.path().join("stream.bin"));
    assert_eq!(out.status, "failed");
    assert_eq!(sq.wait_status("running"), "running");
    let log = sq.output();
    assert!(
        log.contains("Required VMState Id are missing: conntrack-vmstate-100"),
        "{log}"
    );
}

/// The stream editor used by the bad-data tests really changes what the
/// destination reads: an entry for an Id the destination does not serve is
/// QEMU's `Failed to find proxy Id`.
#[test]
fn a_rewritten_section_is_what_the_destination_reads() {
    common::needs!(qemu);
    let src = Host::new("rsrc");
    let dst = Host::new("rdst");
    let mut sq = Qemu::start(
        src.path(),
        "qemu",
        Some(&src.ns),
        &with_object(&src, Some(""), false),
    );
    let mut dq = Qemu::start(
        dst.path(),
        "qemu",
        Some(&dst.ns),
        &with_object(&dst, Some(""), true),
    );
    let stream = src.path().join("stream.bin");
    assert_eq!(sq.migrate_to_file(&stream).status, "completed");
    let bytes = std::fs::read(&stream).unwrap();
    let edited = rewrite_vmstate_section(&bytes, &[("intruder".into(), b"xyz".to_vec())]);
    let sec = parse_vmstate_section(&edited).unwrap();
    assert_eq!(sec.entries, [("intruder".to_string(), b"xyz".to_vec())]);
    assert_eq!(sec.data_size, 32);
    let edited_path = src.path().join("edited.bin");
    std::fs::write(&edited_path, edited).unwrap();
    assert_eq!(
        dq.incoming_from_file(&edited_path),
        Incoming::Exited(Some(1))
    );
    let log = dq.output();
    assert!(log.contains("Failed to find proxy Id 'intruder'"), "{log}");
}

//! src/qmp.rs against a real QEMU 7.2: wiring and unwiring the dbus-vmstate
//! object, keeping other helpers' Ids, and QEMU's own error texts.

use std::path::Path;
use std::time::Duration;

use common::host::Bus;
use common::qemu::{Qemu, QemuOpts};
use conntrack_vmstate::qmp::{
    self, AttachOutcome, DetachOutcome, QmpClient, QmpError, VmstateObject,
};

fn tmp(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("cvs-qmp-{tag}-{}-", std::process::id()))
        .tempdir()
        .expect("tempdir")
}

fn plain_qemu(dir: &Path) -> Qemu {
    Qemu::start(dir, "qemu", None, &QemuOpts::default())
}

fn object(q: &mut Qemu) -> Option<VmstateObject> {
    q.qmp().find_vmstate().expect("find_vmstate")
}

#[test]
fn attach_creates_then_detach_deletes_the_object() {
    common::needs!(bus_qemu);
    let dir = tmp("create");
    let bus = Bus::start(dir.path());
    let mut q = plain_qemu(dir.path());
    assert_eq!(object(&mut q), None);

    let out = q.qmp().attach_vmstate("vm-100", &bus.address).unwrap();
    assert_eq!(
        out,
        AttachOutcome::Created {
            object: "conntrack-vmstate".into()
        }
    );
    assert_eq!(
        object(&mut q),
        Some(VmstateObject {
            id: "conntrack-vmstate".into(),
            addr: bus.address.clone(),
            ids: vec!["vm-100".into()],
        })
    );
    // idempotent
    assert_eq!(
        q.qmp().attach_vmstate("vm-100", &bus.address).unwrap(),
        AttachOutcome::AlreadyPresent {
            object: "conntrack-vmstate".into()
        }
    );
    assert_eq!(
        q.qmp().detach_vmstate("vm-100").unwrap(),
        DetachOutcome::Deleted {
            object: "conntrack-vmstate".into()
        }
    );
    assert_eq!(object(&mut q), None);
    assert_eq!(
        q.qmp().detach_vmstate("vm-100").unwrap(),
        DetachOutcome::NoObject
    );
}

#[test]
fn an_existing_object_keeps_other_helpers_ids() {
    common::needs!(bus_qemu);
    let dir = tmp("shared");
    let bus = Bus::start(dir.path());
    // Another tool created the object, under its own QOM id, for its helper.
    let mut q = Qemu::start(
        dir.path(),
        "qemu",
        None,
        &QemuOpts {
            vmstate: Some((bus.address.clone(), Some("other-a,other-b".into()))),
            incoming: false,
            ..Default::default()
        },
    );
    let out = q.qmp().attach_vmstate("vm-100", &bus.address).unwrap();
    assert_eq!(
        out,
        AttachOutcome::Added {
            object: "dv0".into(),
            id_list: "other-a,other-b,vm-100".into()
        }
    );
    let o = object(&mut q).unwrap();
    assert_eq!(o.id, "dv0");
    assert_eq!(o.ids, ["other-a", "other-b", "vm-100"]);

    // Removing ours leaves theirs and the object.
    assert_eq!(
        q.qmp().detach_vmstate("vm-100").unwrap(),
        DetachOutcome::Removed {
            object: "dv0".into(),
            id_list: "other-a,other-b".into()
        }
    );
    assert_eq!(object(&mut q).unwrap().ids, ["other-a", "other-b"]);
    // Not ours to delete: the object stays as it is.
    assert_eq!(
        q.qmp().detach_vmstate("vm-100").unwrap(),
        DetachOutcome::NotListed {
            object: "dv0".into()
        }
    );
    assert_eq!(object(&mut q).unwrap().ids, ["other-a", "other-b"]);
}

#[test]
fn an_object_on_another_bus_is_recreated_only_when_nobody_else_uses_it() {
    common::needs!(bus_qemu);
    let dir = tmp("rebus");
    let old = tempfile::tempdir_in(dir.path()).unwrap();
    let new = tempfile::tempdir_in(dir.path()).unwrap();
    let old_bus = Bus::start(old.path());
    let new_bus = Bus::start(new.path());
    let mut q = Qemu::start(
        dir.path(),
        "qemu",
        None,
        &QemuOpts {
            vmstate: Some((old_bus.address.clone(), Some("other".into()))),
            incoming: false,
            ..Default::default()
        },
    );
    let err = q
        .qmp()
        .attach_vmstate("vm-100", &new_bus.address)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "QEMU's dbus-vmstate object /objects/dv0 is connected to {}, not {}, and also \
             serves other Ids (other); it cannot be re-targeted without breaking other helpers",
            old_bus.address, new_bus.address
        )
    );
    // untouched
    assert_eq!(object(&mut q).unwrap().ids, ["other"]);

    // Someone else's object with an empty (maybe unset) id-list: not ours
    // to re-create either.
    q.set_id_list("dv0", "");
    let err = q
        .qmp()
        .attach_vmstate("vm-100", &new_bus.address)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("and its id-list is empty or unset;"),
        "{err}"
    );
    assert_eq!(object(&mut q).unwrap().addr, old_bus.address);

    // Only ours listed (e.g. left from an earlier registration on the old
    // bus): deleted and created again on the new bus.
    q.set_id_list("dv0", "vm-100");
    assert_eq!(
        q.qmp().attach_vmstate("vm-100", &new_bus.address).unwrap(),
        AttachOutcome::Recreated {
            object: "conntrack-vmstate".into()
        }
    );
    let o = object(&mut q).unwrap();
    assert_eq!(
        (o.id.as_str(), o.addr.as_str()),
        ("conntrack-vmstate", new_bus.address.as_str())
    );
}

#[test]
fn unreachable_bus_surfaces_qemus_error() {
    common::needs!(bus_qemu);
    let dir = tmp("nobus");
    let mut q = plain_qemu(dir.path());
    let addr = format!("unix:path={}/no-such-bus", dir.path().display());
    let err = q.qmp().attach_vmstate("vm-100", &addr).unwrap_err();
    assert!(
        matches!(&err, QmpError::Command { command, class, .. }
            if command == "object-add" && class == "GenericError"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "QEMU refused object-add: failed to connect to DBus: 'Could not connect: No such file \
         or directory' (GenericError)"
    );
    assert_eq!(object(&mut q), None, "nothing left behind");
    // the session is still usable after a refused command
    assert_eq!(q.status(), "running");
}

#[test]
fn absent_socket_is_a_clear_error() {
    common::needs!(bus_qemu);
    let dir = tmp("nosock");
    let path = dir.path().join("absent.qmp");
    let err = qmp::attach_vmstate(&path, "vm-100", "unix:path=/nowhere").unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "cannot connect to QMP socket {}: No such file or directory (os error 2)",
            path.display()
        )
    );
    let err = qmp::detach_vmstate(&path, "vm-100").unwrap_err();
    assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");
}

#[test]
fn bad_ids_are_refused_before_qemu_is_touched() {
    common::needs!(bus_qemu);
    let dir = tmp("badid");
    let bus = Bus::start(dir.path());
    let mut q = plain_qemu(dir.path());
    for (id, why) in [
        ("", "empty (QEMU requires 1 to 255 bytes)"),
        ("a,b", "contains a comma, the id-list separator"),
    ] {
        let err = q.qmp().attach_vmstate(id, &bus.address).unwrap_err();
        assert_eq!(err.to_string(), format!("invalid VMState Id {id:?}: {why}"));
    }
    let long = "x".repeat(256);
    assert!(matches!(
        q.qmp().attach_vmstate(&long, &bus.address),
        Err(QmpError::InvalidId { .. })
    ));
    assert_eq!(object(&mut q), None);
}

#[test]
fn a_busy_monitor_times_out_instead_of_hanging() {
    common::needs!(bus_qemu);
    let dir = tmp("busy");
    let mut q = plain_qemu(dir.path());
    // Our own session holds the monitor; QEMU serves one client at a time.
    let _held = q.qmp();
    let t = std::time::Instant::now();
    let err = match QmpClient::connect_with_timeout(&q.qmp_path, Duration::from_millis(300)) {
        Ok(_) => panic!("second client got a greeting while the first holds the monitor"),
        Err(e) => e,
    };
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(
        err.to_string(),
        format!(
            "no answer from QEMU on {} within 300 ms while waiting for the QMP greeting \
             (QEMU busy in a migration, or another client holds the monitor)",
            q.qmp_path.display()
        )
    );
}

#[test]
fn one_shot_functions_wire_a_running_qemu() {
    common::needs!(bus_qemu);
    let dir = tmp("oneshot");
    let bus = Bus::start(dir.path());
    let mut q = plain_qemu(dir.path());
    q.release_qmp();
    qmp::attach_vmstate(&q.qmp_path, "vm-7", &bus.address).unwrap();
    qmp::attach_vmstate(&q.qmp_path, "vm-8", &bus.address).unwrap();
    assert_eq!(object(&mut q).unwrap().ids, ["vm-7", "vm-8"]);
    q.release_qmp();
    qmp::detach_vmstate(&q.qmp_path, "vm-7").unwrap();
    assert_eq!(object(&mut q).unwrap().ids, ["vm-8"]);
    q.release_qmp();
    qmp::detach_vmstate(&q.qmp_path, "vm-8").unwrap();
    assert_eq!(object(&mut q), None);
}

//! Manager1, VM1, ObjectManager and the per-VM VMState1 connections of a
//! real conntrack-vmstated on a private dbus-daemon.

use std::collections::HashMap;
use std::time::Duration;

use common::bus::{gdbus_call, queued_owners, scratch_dir, DaemonOpts, DaemonProc, TestBus};
use conntrack_vmstate::bus::proxy::{Manager1Proxy, Vm1Proxy, VmState1Proxy};
use zbus::{Connection, Variant};

const T: Duration = Duration::from_secs(60);

async fn manager(conn: &Connection) -> Manager1Proxy<'static> {
    Manager1Proxy::new(conn).await.expect("manager proxy")
}

async fn vm_proxy(conn: &Connection, path: &str) -> Vm1Proxy<'static> {
    Vm1Proxy::builder(conn)
        .path(path.to_string())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("vm proxy")
}

/// The D-Bus error name and text of a failed call.
fn dbus_error(e: zbus::Error) -> (String, String) {
    match e {
        zbus::Error::MethodError(name, text, _) => (name.to_string(), text.unwrap_or_default()),
        zbus::Error::FDO(e) => {
            use zbus::DBusError;
            (
                e.name().to_string(),
                e.description().unwrap_or_default().to_string(),
            )
        }
        other => panic!("expected a D-Bus error, got {other:?}"),
    }
}

fn opts<'a>(pairs: &[(&'a str, Variant<'a>)]) -> HashMap<&'a str, Variant<'a>> {
    pairs
        .iter()
        .map(|(k, v)| (*k, v.try_clone().expect("clone")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_exports_vm_object_and_queues_vmstate_connection() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let bus = TestBus::new("mgr-reg");
        let state = scratch_dir("mgr-reg-state");
        let client = bus.connect().await;
        let _d = DaemonProc::start(DaemonOpts::new(&bus.address, state.path()), &client).await;
        let m = manager(&client).await;
        assert_eq!(m.version().await.unwrap(), env!("CARGO_PKG_VERSION"));

        let path = m
            .register(
                "100",
                opts(&[("bus_address", Variant::from(bus.address.as_str()))]),
            )
            .await
            .expect("register");
        assert_eq!(path.as_str(), "/org/conntrack_vmstate/VM/100");
        let vm = vm_proxy(&client, path.as_str()).await;
        assert_eq!(vm.vm_id().await.unwrap(), "100");
        assert_eq!(vm.id().await.unwrap(), "conntrack-vmstate-100");
        assert_eq!(vm.mark().await.unwrap(), 100);
        assert_eq!(vm.mark_mask().await.unwrap(), u32::MAX);
        assert_eq!(vm.zone().await.unwrap(), Vec::<u16>::new());
        assert_eq!(vm.format().await.unwrap(), "binary");
        assert_eq!(vm.bus_address().await.unwrap(), bus.address);
        assert!(vm.last_save().await.unwrap().is_empty());
        assert!(vm.last_load().await.unwrap().is_empty());
        let unique = vm.unique_name().await.unwrap();
        assert!(unique.starts_with(':'), "{unique}");

        // QEMU's discovery: ListQueuedOwners, then GetAll on every owner.
        assert_eq!(
            queued_owners(&client, "org.qemu.VMState1").await,
            vec![unique.clone()]
        );
        let vs = VmState1Proxy::builder(&client)
            .destination(unique.clone())
            .build()
            .await
            .unwrap();
        assert_eq!(vs.id().await.unwrap(), "conntrack-vmstate-100");

        // A non-numeric VM with explicit options.
        let path = m
            .register(
                "web-1",
                opts(&[
                    ("bus_address", Variant::from(bus.address.as_str())),
                    ("mark", Variant::from(7u32)),
                    ("mark_mask", Variant::from(0xffu32)),
                    ("zone", Variant::from(3u16)),
                    ("id", Variant::from("custom-id")),
                    ("format", Variant::from("conntrack-save")),
                ]),
            )
            .await
            .expect("register web-1");
        assert_eq!(path.as_str(), "/org/conntrack_vmstate/VM/web_2d1");
        let vm2 = vm_proxy(&client, path.as_str()).await;
        assert_eq!(vm2.vm_id().await.unwrap(), "web-1");
        assert_eq!(vm2.id().await.unwrap(), "custom-id");
        assert_eq!(vm2.mark().await.unwrap(), 7);
        assert_eq!(vm2.mark_mask().await.unwrap(), 0xff);
        assert_eq!(vm2.zone().await.unwrap(), vec![3]);
        assert_eq!(vm2.format().await.unwrap(), "conntrack-save");
        let owners = queued_owners(&client, "org.qemu.VMState1").await;
        assert_eq!(owners.len(), 2, "{owners:?}");
        assert!(owners.contains(&vm2.unique_name().await.unwrap()));

        // Unregister drops the VM's connection from the queue.
        m.unregister("100", HashMap::new())
            .await
            .expect("unregister");
        let owners = queued_owners(&client, "org.qemu.VMState1").await;
        assert_eq!(owners, vec![vm2.unique_name().await.unwrap()]);
        let (name, _) = dbus_error(vm.vm_id().await.unwrap_err());
        assert_eq!(name, "org.freedesktop.DBus.Error.UnknownObject");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_errors_are_named_and_idempotence_holds() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let bus = TestBus::new("mgr-err");
        let state = scratch_dir("mgr-err-state");
        let client = bus.connect().await;
        let d = DaemonProc::start(DaemonOpts::new(&bus.address, state.path()), &client).await;
        let m = manager(&client).await;
        let addr = Variant::from(bus.address.as_str());
        let base = || opts(&[("bus_address", addr.try_clone().unwrap())]);

        let p1 = m.register("100", base()).await.unwrap();
        // Identical (also when a default is spelled out): same object, still one owner.
        let mut same = base();
        same.insert("mark", Variant::from(100u32));
        same.insert("id", Variant::from("conntrack-vmstate-100"));
        let p2 = m.register("100", same).await.unwrap();
        assert_eq!(p1, p2);
        assert_eq!(queued_owners(&client, "org.qemu.VMState1").await.len(), 1);

        let cases: Vec<(&str, HashMap<&str, Variant>, &str, &str)> = vec![
            ("100", { let mut o = base(); o.insert("mark", Variant::from(5u32)); o },
             "org.conntrack_vmstate.Error.Conflict",
             "VM '100' is already registered with mark 100, not 5; unregister it first to change mark"),
            ("101", { let mut o = base(); o.insert("colour", Variant::from("red")); o },
             "org.conntrack_vmstate.Error.UnknownOption",
             "unknown option 'colour' (known: id, mark, mark_mask, zone, bus_address, format, zone_map, helpers, max_entries, qemu_pid, lifecycle)"),
            ("101", { let mut o = base(); o.insert("mark", Variant::from(-1i32)); o },
             "org.conntrack_vmstate.Error.InvalidOption",
             "invalid option 'mark': must be of type 'u', got 'i'"),
            ("web", base(),
             "org.conntrack_vmstate.Error.InvalidOption",
             "invalid option 'mark': is required because VM 'web' is not a number"),
            ("101", { let mut o = base(); o.insert("id", Variant::from("a,b")); o },
             "org.conntrack_vmstate.Error.InvalidOption",
             "invalid option 'id': 'a,b' contains ',' which QEMU's id-list cannot carry"),
            ("101", { let mut o = base(); o.insert("id", Variant::from("conntrack-vmstate-100")); o },
             "org.conntrack_vmstate.Error.IdInUse",
             &*Box::leak(format!("VMState Id 'conntrack-vmstate-100' is already used by VM '100' on bus {}", bus.address).into_boxed_str())),
            ("", base(), "org.conntrack_vmstate.Error.InvalidVm", "invalid VM name '': is empty"),
            ("102", opts(&[("bus_address", Variant::from("unix:path=/nonexistent/cvs-bus"))]),
             "org.conntrack_vmstate.Error.BusUnreachable", ""),
        ];
        for (vm, o, name, text) in cases {
            let (n, t) = dbus_error(m.register(vm, o).await.unwrap_err());
            assert_eq!(n, name, "{vm}: {t}");
            if text.is_empty() {
                assert!(t.starts_with("cannot serve org.qemu.VMState1 for VM '102' on bus unix:path=/nonexistent/cvs-bus: "), "{t}");
            } else {
                assert_eq!(t, text);
            }
        }
        // Nothing of the failed attempts stuck.
        assert_eq!(queued_owners(&client, "org.qemu.VMState1").await.len(), 1);

        let (n, t) = dbus_error(m.unregister("999", HashMap::new()).await.unwrap_err());
        assert_eq!((n.as_str(), t.as_str()), ("org.conntrack_vmstate.Error.NotRegistered", "VM '999' is not registered"));
        let (n, t) = dbus_error(m.unregister("100", opts(&[("force", Variant::from(true))])).await.unwrap_err());
        assert_eq!((n.as_str(), t.as_str()), ("org.conntrack_vmstate.Error.UnknownOption", "unknown option 'force' (known: flush)"));
        let (n, t) = dbus_error(m.unregister("100", opts(&[("flush", Variant::from(1u32))])).await.unwrap_err());
        assert_eq!((n.as_str(), t.as_str()), ("org.conntrack_vmstate.Error.InvalidOption", "invalid option 'flush': must be of type 'b', got 'u'"));
        // A flush without any Save deletes nothing and succeeds.
        m.unregister("100", opts(&[("flush", Variant::from(true))])).await.unwrap();
        assert!(queued_owners(&client, "org.qemu.VMState1").await.is_empty());
        let log = d.log_text();
        assert!(
            log.contains("Unregister of VM 100: nothing to flush, no Save with entries since the VM was registered"),
            "{log}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_manager_lists_vm_objects() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let bus = TestBus::new("mgr-om");
        let state = scratch_dir("mgr-om-state");
        let client = bus.connect().await;
        let _d = DaemonProc::start(DaemonOpts::new(&bus.address, state.path()), &client).await;
        let m = manager(&client).await;
        for vm in ["1", "2", "3"] {
            m.register(
                vm,
                opts(&[("bus_address", Variant::from(bus.address.as_str()))]),
            )
            .await
            .unwrap();
        }
        m.unregister("2", HashMap::new()).await.unwrap();
        let om = zbus::fdo::ObjectManagerProxy::builder(&client)
            .destination("org.conntrack_vmstate.Manager1")
            .path("/org/conntrack_vmstate")
            .build()
            .await
            .unwrap();
        let objs = om.get_managed_objects().await.unwrap();
        let mut vms: Vec<(String, String)> = objs
            .iter()
            .filter_map(|(p, ifaces)| {
                let props = ifaces.get("org.conntrack_vmstate.VM1")?;
                let id: String = props.get("Id")?.try_clone().ok()?.try_into().ok()?;
                Some((p.to_string(), id))
            })
            .collect();
        vms.sort();
        assert_eq!(
            vms,
            vec![
                (
                    "/org/conntrack_vmstate/VM/1".to_string(),
                    "conntrack-vmstate-1".to_string()
                ),
                (
                    "/org/conntrack_vmstate/VM/3".to_string(),
                    "conntrack-vmstate-3".to_string()
                ),
            ]
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_vms_each_queue_their_own_connection() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let bus = TestBus::new("mgr-20");
        let state = scratch_dir("mgr-20-state");
        let client = bus.connect().await;
        let _d = DaemonProc::start(DaemonOpts::new(&bus.address, state.path()), &client).await;
        let m = manager(&client).await;
        for vm in 1..=20 {
            m.register(
                &vm.to_string(),
                opts(&[("bus_address", Variant::from(bus.address.as_str()))]),
            )
            .await
            .unwrap();
        }
        let owners = queued_owners(&client, "org.qemu.VMState1").await;
        assert_eq!(owners.len(), 20);
        let mut ids = Vec::new();
        for o in &owners {
            let vs = VmState1Proxy::builder(&client)
                .destination(o.clone())
                .build()
                .await
                .unwrap();
            ids.push(vs.id().await.unwrap());
        }
        ids.sort();
        let mut want: Vec<String> = (1..=20).map(|v| format!("conntrack-vmstate-{v}")).collect();
        want.sort();
        assert_eq!(ids, want);
    })
    .await
    .expect("test timed out");
}

/// QEMU is a GDBus client: GetAll and Save through GLib's own tool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdbus_reads_id_and_calls_save() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let bus = TestBus::new("mgr-gdbus");
        let state = scratch_dir("mgr-gdbus-state");
        let client = bus.connect().await;
        let _d = DaemonProc::start(DaemonOpts::new(&bus.address, state.path()), &client).await;
        let m = manager(&client).await;
        let path = m
            .register(
                "100",
                opts(&[("bus_address", Variant::from(bus.address.as_str()))]),
            )
            .await
            .unwrap();
        let unique = vm_proxy(&client, path.as_str())
            .await
            .unique_name()
            .await
            .unwrap();
        let addr = bus.address.clone();
        let (ok, out, err) = tokio::task::spawn_blocking(move || {
            gdbus_call(
                &addr,
                &unique,
                "/org/qemu/VMState1",
                "org.freedesktop.DBus.Properties.GetAll",
                &["org.qemu.VMState1"],
            )
        })
        .await
        .unwrap();
        assert!(ok, "{err}");
        assert_eq!(out.trim(), "({'Id': <'conntrack-vmstate-100'>},)");

        let unique = vm_proxy(&client, path.as_str())
            .await
            .unique_name()
            .await
            .unwrap();
        let addr = bus.address.clone();
        let (ok, out, err) = tokio::task::spawn_blocking(move || {
            gdbus_call(
                &addr,
                &unique,
                "/org/qemu/VMState1",
                "org.qemu.VMState1.Save",
                &[],
            )
        })
        .await
        .unwrap();
        assert!(ok, "{err}");
        // GLib prints a non-empty byte array as `([byte 0x.., ...],)` or, when
        // it is printable, as `(b'...',)`; an empty one would be `(@ay [],)`.
        let out = out.trim();
        assert!(!out.contains("@ay []"), "{out}");
        assert!(
            out.starts_with("([byte 0x") || out.starts_with("(b'") || out.starts_with("(b\""),
            "{out}"
        );
    })
    .await
    .expect("test timed out");
}

/// The VM's bus goes away (its dbus-daemon stops): the daemon notices, and
/// an identical Register then tries to reconnect and reports the bus
/// unreachable instead of claiming the VM is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_vm_bus_is_noticed_and_reported() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let bus = TestBus::new("mgr-lost");
        let vm_bus = TestBus::new("mgr-lost-vm");
        let vm_addr = vm_bus.address.clone();
        let state = scratch_dir("mgr-lost-state");
        let client = bus.connect().await;
        let d = DaemonProc::start(DaemonOpts::new(&bus.address, state.path()), &client).await;
        let m = manager(&client).await;
        m.register(
            "7",
            opts(&[("bus_address", Variant::from(vm_addr.as_str()))]),
        )
        .await
        .unwrap();
        drop(vm_bus);
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while !d
            .log_text()
            .contains("VM 7 is no longer served: its connection to bus")
        {
            assert!(
                std::time::Instant::now() < end,
                "loss not noticed: {}",
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (name, text) = dbus_error(
            m.register(
                "7",
                opts(&[("bus_address", Variant::from(vm_addr.as_str()))]),
            )
            .await
            .unwrap_err(),
        );
        assert_eq!(name, "org.conntrack_vmstate.Error.BusUnreachable");
        assert!(
            text.starts_with(&format!(
                "cannot serve org.qemu.VMState1 for VM '7' on bus {vm_addr}: "
            )),
            "{text}"
        );
        // Still registered (and persisted): Unregister works.
        m.unregister("7", HashMap::new()).await.unwrap();
    })
    .await
    .expect("test timed out");
}

//! The daemon's life: systemd notifications, idle exit, persistence across a
//! kill -9, the CLI, and a strict bus policy.

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::bus::{
    cli, gdbus_call_as, queued_owners, scratch_dir, wait_for_name, DaemonOpts, DaemonProc, TestBus,
};
use conntrack_vmstate::bus::proxy::{Manager1Proxy, Vm1Proxy, VmState1Proxy};
use nix::sys::signal::Signal;
use zbus::Variant;

const T: Duration = Duration::from_secs(90);

fn bus_opt(addr: &str) -> HashMap<&str, Variant<'_>> {
    HashMap::from([("bus_address", Variant::from(addr))])
}

/// Reads notify datagrams until one contains `want` (bounded).
fn notify_until(sock: &UnixDatagram, want: &str, seen: &mut Vec<String>) -> bool {
    let end = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(msg.clone());
            if msg.contains(want) {
                return true;
            }
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_systemd_ready_status_and_stopping() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let bus = TestBus::new("life-notify");
        let state = scratch_dir("life-notify-state");
        let sock_path = state.path().join("notify.sock");
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let client = bus.connect().await;
        let mut o = DaemonOpts::new(&bus.address, state.path());
        o.env
            .push(("NOTIFY_SOCKET".into(), sock_path.display().to_string()));
        o.env.push(("WATCHDOG_USEC".into(), "400000".into()));
        let mut d = DaemonProc::spawn(o);
        let mut seen = Vec::new();
        let ready = tokio::task::block_in_place(|| notify_until(&sock, "READY=1", &mut seen));
        assert!(ready, "no READY=1: {seen:?}\n{}", d.log_text());
        // READY comes only once the manager name is owned.
        assert!(
            wait_for_name(
                &client,
                "org.conntrack_vmstate.Manager1",
                Duration::from_millis(1)
            )
            .await
        );
        assert!(
            seen.last().unwrap().contains("STATUS=Serving 0 VMs"),
            "{seen:?}"
        );
        // WATCHDOG_USEC=400000 (and no WATCHDOG_PID): pings every 200 ms.
        assert!(
            tokio::task::block_in_place(|| notify_until(&sock, "WATCHDOG=1", &mut seen)),
            "{seen:?}"
        );
        let m = Manager1Proxy::new(&client).await.unwrap();
        m.register("100", bus_opt(&bus.address)).await.unwrap();
        assert!(
            tokio::task::block_in_place(|| notify_until(&sock, "STATUS=Serving 1 VM", &mut seen)),
            "{seen:?}"
        );
        d.signal(Signal::SIGTERM);
        assert!(
            tokio::task::block_in_place(|| notify_until(&sock, "STOPPING=1", &mut seen)),
            "{seen:?}"
        );
        let st = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(10)))
            .expect("exit after SIGTERM");
        assert!(st.success(), "{st}");
        // Leaving drops the VM's queued connection.
        assert!(queued_owners(&client, "org.qemu.VMState1").await.is_empty());
        let log = d.log_text();
        assert!(
            log.contains(
                "Register of VM 100: Id conntrack-vmstate-100 mark 0x64/0xffffffff on bus"
            ),
            "{log}"
        );
        assert!(
            log.contains("conntrack-vmstated stopping: SIGTERM"),
            "{log}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_when_idle_but_not_while_a_vm_is_registered() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let bus = TestBus::new("life-idle");
        let state = scratch_dir("life-idle-state");
        let client = bus.connect().await;
        let mut o = DaemonOpts::new(&bus.address, state.path());
        o.extra = vec!["--idle-timeout".into(), "1".into()];
        let mut d = DaemonProc::start(o, &client).await;
        let m = Manager1Proxy::new(&client).await.unwrap();
        m.register("100", bus_opt(&bus.address)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            tokio::task::block_in_place(|| d.wait_exit(Duration::ZERO)).is_none(),
            "exited with a VM registered"
        );
        let t0 = Instant::now();
        m.unregister("100", HashMap::new()).await.unwrap();
        let st = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(10)))
            .expect("idle exit");
        assert!(st.success(), "{st}");
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(900),
            "exited after {waited:?}, before the 1 s idle timeout"
        );
        assert!(!wait_for_name(&client, "org.conntrack_vmstate.Manager1", Duration::ZERO).await);
        assert!(d
            .log_text()
            .contains("stopping: idle timeout with no VM registered"));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_survive_kill_9_and_restart() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let bus = TestBus::new("life-persist");
        let state = scratch_dir("life-persist-state");
        let client = bus.connect().await;
        let mut d = DaemonProc::start(DaemonOpts::new(&bus.address, state.path()), &client).await;
        let m = Manager1Proxy::new(&client).await.unwrap();
        let mut o = bus_opt(&bus.address);
        o.insert("id", Variant::from("vm-a"));
        o.insert("mark", Variant::from(0x1234u32));
        o.insert("zone", Variant::from(7u16));
        m.register("a", o).await.unwrap();
        m.register("200", bus_opt(&bus.address)).await.unwrap();
        m.register("201", bus_opt(&bus.address)).await.unwrap();
        m.unregister("201", HashMap::new()).await.unwrap();
        let before = queued_owners(&client, "org.qemu.VMState1").await;
        assert_eq!(before.len(), 2);

        tokio::task::block_in_place(|| d.kill9());
        // The bus drops a dead process' names promptly.
        let end = Instant::now() + Duration::from_secs(10);
        while !queued_owners(&client, "org.qemu.VMState1").await.is_empty() {
            assert!(Instant::now() < end, "names of the killed daemon stayed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _d2 = DaemonProc::start(DaemonOpts::new(&bus.address, state.path()), &client).await;
        // The name is owned only after restored VMs are served again.
        let owners = queued_owners(&client, "org.qemu.VMState1").await;
        assert_eq!(owners.len(), 2, "{owners:?}");
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
        assert_eq!(
            ids,
            vec!["conntrack-vmstate-200".to_string(), "vm-a".to_string()]
        );
        let vm = Vm1Proxy::builder(&client)
            .path("/org/conntrack_vmstate/VM/a")
            .build()
            .await
            .unwrap();
        assert_eq!(vm.mark().await.unwrap(), 0x1234);
        assert_eq!(vm.zone().await.unwrap(), vec![7]);
        assert_eq!(vm.id().await.unwrap(), "vm-a");
        // And it is still the same registration: identical options are accepted.
        let mut o = bus_opt(&bus.address);
        o.insert("id", Variant::from("vm-a"));
        o.insert("mark", Variant::from(0x1234u32));
        o.insert("zone", Variant::from(7u16));
        m.register("a", o).await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_register_status_unregister() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let bus = TestBus::new("life-cli");
        let state = scratch_dir("life-cli-state");
        let client = bus.connect().await;
        let _d = DaemonProc::start(DaemonOpts::new(&bus.address, state.path()), &client).await;
        let addr = bus.address.clone();
        tokio::task::block_in_place(|| {
            let out = cli(&addr, &["register", "100", "--bus-address", &addr, "--mark-mask", "0xfg", "--zone", "2"]);
            // A malformed number is clap's usage error, before any bus call.
            assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
            // Marks and masks take decimal or 0x hex, as conntrack(8)'s do.
            let out = cli(&addr, &["register", "100", "--bus-address", &addr, "--mark-mask", "0xff", "--zone", "2", "--format", "conntrack-save"]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                format!("registered VM 100: Id conntrack-vmstate-100, mark 0x64/0xff, bus {addr} (/org/conntrack_vmstate/VM/100)")
            );
            let out = cli(&addr, &["register", "100", "--bus-address", &addr, "--mark", "5"]);
            assert_eq!(out.status.code(), Some(1));
            assert_eq!(
                String::from_utf8_lossy(&out.stderr).trim(),
                "conntrack-vmstate: VM '100' is already registered with mark 100, not 5; unregister it first to change mark (org.conntrack_vmstate.Error.Conflict)"
            );
            let out = cli(&addr, &["status", "100", "--json"]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["VmId"], "100");
            assert_eq!(v["Id"], "conntrack-vmstate-100");
            assert_eq!(v["Mark"], 100);
            assert_eq!(v["MarkMask"], 255);
            assert_eq!(v["Zone"], serde_json::json!([2]));
            assert_eq!(v["Format"], "conntrack-save");
            assert_eq!(v["BusAddress"], addr.as_str());
            assert_eq!(v["LastSave"], serde_json::json!({}));
            let out = cli(&addr, &["status"]);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("VM 100\n  Id:        conntrack-vmstate-100\n  mark:      0x64/0xff, zone 2, format conntrack-save\n"), "{text}");
            assert!(text.contains("  last save: never\n  last load: never"), "{text}");
            let out = cli(&addr, &["status", "7"]);
            assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "conntrack-vmstate: VM '7' is not registered");
            let out = cli(&addr, &["unregister", "100", "--flush"]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "unregistered VM 100 (saved entries flushed)");
            let out = cli(&addr, &["status", "--json"]);
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
        });
    })
    .await
    .expect("test timed out");
}

/// A default-deny bus like the system bus: root (the daemon and QEMU here)
/// may own and call; an unprivileged user is denied Register, owning
/// org.qemu.VMState1, and calling the helpers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_policy_allows_only_configured_users() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let bus = TestBus::with_config("life-strict", &common::bus::data("strict-policy.conf"));
        let state = scratch_dir("life-strict-state");
        let client = bus.connect().await;
        let _d = DaemonProc::start(DaemonOpts::new(&bus.address, state.path()), &client).await;
        let m = Manager1Proxy::new(&client).await.unwrap();
        let path = m
            .register("100", bus_opt(&bus.address))
            .await
            .expect("root may register");
        let vm = Vm1Proxy::builder(&client).path(path).build().await.unwrap();
        let unique = vm.unique_name().await.unwrap();
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

        let addr = bus.address.clone();
        tokio::task::block_in_place(|| {
            let nobody = Some(65534);
            let denied = |what: &str, (ok, _out, err): (bool, String, String)| {
                assert!(!ok, "{what} was allowed");
                assert!(
                    err.contains("GDBus.Error:org.freedesktop.DBus.Error.AccessDenied"),
                    "{what}: {err}"
                );
            };
            denied(
                "Register as nobody",
                gdbus_call_as(
                    nobody,
                    &addr,
                    "org.conntrack_vmstate.Manager1",
                    "/org/conntrack_vmstate/Manager1",
                    "org.conntrack_vmstate.Manager1.Register",
                    &["200", "{}"],
                ),
            );
            denied(
                "owning org.qemu.VMState1 as nobody",
                gdbus_call_as(
                    nobody,
                    &addr,
                    "org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus.RequestName",
                    &["org.qemu.VMState1", "0"],
                ),
            );
            denied(
                "GetAll on the helper as nobody",
                gdbus_call_as(
                    nobody,
                    &addr,
                    &unique,
                    "/org/qemu/VMState1",
                    "org.freedesktop.DBus.Properties.GetAll",
                    &["org.qemu.VMState1"],
                ),
            );
            denied(
                "Save as nobody",
                gdbus_call_as(
                    nobody,
                    &addr,
                    &unique,
                    "/org/qemu/VMState1",
                    "org.qemu.VMState1.Save",
                    &[],
                ),
            );
            // The bus driver itself stays reachable, so the denials above are policy.
            let (ok, out, err) = gdbus_call_as(
                nobody,
                &addr,
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.ListQueuedOwners",
                &["org.qemu.VMState1"],
            );
            assert!(ok, "{err}");
            assert!(out.contains(&unique), "{out}");
            // Root, like QEMU on Proxmox, may read the Id.
            let (ok, out, err) = gdbus_call_as(
                None,
                &addr,
                &unique,
                "/org/qemu/VMState1",
                "org.freedesktop.DBus.Properties.GetAll",
                &["org.qemu.VMState1"],
            );
            assert!(ok, "{err}");
            assert_eq!(out.trim(), "({'Id': <'conntrack-vmstate-100'>},)");
        });
    })
    .await
    .expect("test timed out");
}

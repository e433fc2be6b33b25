//! Property reads never wait on a Save: QEMU reads the Id of every owner on
//! a shared bus, so one VM's slow Save must not stall anyone's GetAll.
//!
//! A conntrack dump that hangs for seconds cannot be produced on demand from
//! the kernel, so this test runs the daemon in-process over a real
//! dbus-daemon with a ConntrackAccess whose dump blocks; the real-kernel Save
//! tests are in daemon_vmstate.rs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::bus::{scratch_dir, TestBus};
use common::fake::FakeAccess;
use conntrack_vmstate::bus::proxy::{Manager1Proxy, Vm1Proxy, VmState1Proxy};
use conntrack_vmstate::bus::{Daemon, DaemonConfig};
use conntrack_vmstate::format::QEMU_LIMIT;
use zbus::{OwnedVariant, Variant};

fn get_str(m: &HashMap<String, OwnedVariant>, k: &str) -> String {
    m.get(k)
        .and_then(|v| String::try_from(v.try_clone().ok()?).ok())
        .unwrap_or_else(|| panic!("{k} missing in {m:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn getall_answered_while_twenty_saves_are_blocked() {
    common::needs!(bus);
    tokio::time::timeout(Duration::from_secs(60), async {
        let bus = TestBus::new("conc-20");
        let state = scratch_dir("conc-20-state");
        let access = FakeAccess::sink(Duration::from_secs(4));
        let daemon = Daemon::start(
            DaemonConfig {
                bus_address: Some(bus.address.clone()),
                state_dir: state.path().to_path_buf(),
                save_deadline: Duration::from_millis(1500),
                load_budget: Duration::from_secs(5),
                max_vm_entries: conntrack_vmstate::service::confine::DEFAULT_MAX_ENTRIES,
                stop_grace: Duration::from_secs(30),
            },
            access.clone(),
        )
        .await
        .expect("daemon");
        let client = bus.connect().await;
        let m = Manager1Proxy::new(&client).await.unwrap();
        let mut helpers = Vec::new();
        for vm in 1..=20u32 {
            let path = m
                .register(
                    &vm.to_string(),
                    HashMap::from([("bus_address", Variant::from(bus.address.as_str()))]),
                )
                .await
                .unwrap();
            let vm1 = Vm1Proxy::builder(&client)
                .path(path)
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await
                .unwrap();
            let unique = vm1.unique_name().await.unwrap();
            helpers.push((vm, unique, vm1));
        }

        // LastSave changes are signalled (PropertiesChanged).
        let watched = Vm1Proxy::builder(&client)
            .path("/org/conntrack_vmstate/VM/1")
            .build()
            .await
            .unwrap();
        let mut changes = watched.receive_last_save_changed().await;
        use futures_util::StreamExt;
        // The first item is the current (empty) value.
        let first = changes.next().await.unwrap().get().await.unwrap();
        assert!(first.is_empty());

        // QEMU's clients: one connection per migrating QEMU.
        let start = Instant::now();
        let mut saves = Vec::new();
        for (vm, unique, _) in &helpers {
            let conn = bus.connect().await;
            let unique = unique.clone();
            let vm = *vm;
            saves.push(tokio::spawn(async move {
                let vs = VmState1Proxy::builder(&conn)
                    .destination(unique)
                    .build()
                    .await
                    .unwrap();
                let data = vs.save().await.expect("Save never fails");
                (vm, data.into_vec(), start.elapsed())
            }));
        }
        let end = Instant::now() + Duration::from_secs(5);
        while access.dumps() < 20 {
            assert!(Instant::now() < end, "not all 20 Saves reached the dump");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // Every owner's GetAll, the way QEMU discovers helpers, from a fresh
        // GDBus-like client without cached properties.
        let reader = bus.connect().await;
        let mut slowest = Duration::ZERO;
        for (vm, unique, _) in &helpers {
            let props = zbus::fdo::PropertiesProxy::builder(&reader)
                .destination(unique.clone())
                .path("/org/qemu/VMState1")
                .build()
                .await
                .unwrap();
            let t = Instant::now();
            let all = props
                .get_all(zbus::names::InterfaceName::try_from("org.qemu.VMState1").unwrap())
                .await
                .unwrap();
            slowest = slowest.max(t.elapsed());
            assert_eq!(get_str(&all, "Id"), format!("conntrack-vmstate-{vm}"));
        }
        // All 20 were answered while every Save was still blocked in its dump.
        assert!(
            saves.iter().all(|s| !s.is_finished()),
            "a Save finished before the GetAlls"
        );
        eprintln!("slowest GetAll with 20 Saves in flight: {slowest:?}");
        // VM1 properties on the manager connection answer too.
        assert_eq!(helpers[0].2.id().await.unwrap(), "conntrack-vmstate-1");

        for s in saves {
            let (vm, data, took) = s.await.unwrap();
            assert!(
                !data.is_empty() && data.len() <= QEMU_LIMIT,
                "VM {vm}: {} bytes",
                data.len()
            );
            // Answered at the deadline, not after the 4 s dump.
            assert!(
                took < Duration::from_millis(3500),
                "VM {vm} Save took {took:?}"
            );
        }
        for (vm, _, vm1) in &helpers {
            let last = vm1.last_save().await.unwrap();
            let err = get_str(&last, "error");
            assert_eq!(
                err, "dump and encode did not finish within the 1500 ms save deadline; sent an empty state",
                "VM {vm}"
            );
        }
        let changed = tokio::time::timeout(Duration::from_secs(5), changes.next())
            .await
            .expect("PropertiesChanged for LastSave")
            .unwrap()
            .get()
            .await
            .unwrap();
        assert!(get_str(&changed, "error").starts_with("dump and encode did not finish"));
        daemon.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// A Load whose first entry batch hangs (a stuck helper) answers QEMU at the
/// budget plus the overrun cap, says so in LastLoad (pending), and reports
/// the final counts later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_load_answers_at_deadline_and_finishes_in_background() {
    common::needs!(bus);
    tokio::time::timeout(Duration::from_secs(60), async {
        let bus = TestBus::new("conc-load");
        let state = scratch_dir("conc-load-state");
        let access = FakeAccess::sink(Duration::from_secs(3));
        let daemon = Daemon::start(
            DaemonConfig {
                bus_address: Some(bus.address.clone()),
                state_dir: state.path().to_path_buf(),
                save_deadline: Duration::from_secs(2),
                load_budget: Duration::from_millis(500),
                max_vm_entries: conntrack_vmstate::service::confine::DEFAULT_MAX_ENTRIES,
                stop_grace: Duration::from_secs(30),
            },
            access,
        )
        .await
        .expect("daemon");
        let client = bus.connect().await;
        let (vm1, vs) = common::bus::register(&client, &bus.address, "100").await;
        let text = b"-A -t 3599 -u SEEN_REPLY,ASSURED -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -q 10.0.0.1 -p tcp --sport 1000 --dport 80 --reply-port-src 80 --reply-port-dst 1000 --state ESTABLISHED --mark 100\n";
        let t = Instant::now();
        vs.load(serde_bytes::Bytes::new(text)).await.expect("Load never fails");
        let took = t.elapsed();
        assert!(took < Duration::from_millis(2500), "Load answered after {took:?}, not at its deadline");
        let interim = vm1.last_load().await.unwrap();
        assert_eq!(
            get_str(&interim, "error"),
            "no entry batch finished within 1000 ms; answered QEMU, LastLoad is updated when creation ends"
        );
        assert!(bool::try_from(interim["pending"].try_clone().unwrap()).unwrap());
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let last = vm1.last_load().await.unwrap();
            if get_str(&last, "error").is_empty() {
                let n = |k: &str| u64::try_from(last[k].try_clone().unwrap()).unwrap();
                assert_eq!((n("entries"), n("created"), n("created_sync")), (1, 1, 1));
                assert!(!bool::try_from(last["pending"].try_clone().unwrap()).unwrap());
                // The answer went out at the cap, the restore ended later.
                assert!(n("duration_us") < n("complete_us"), "{last:?}");
                break;
            }
            assert!(Instant::now() < end, "LastLoad never completed: {last:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        daemon.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// Once an idle daemon decided to exit (and gave up its name), a Register
/// that reaches it anyway is refused with ShuttingDown instead of being
/// accepted by a process that is about to stop serving the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_after_idle_decision_is_refused() {
    common::needs!(bus);
    tokio::time::timeout(Duration::from_secs(30), async {
        let bus = TestBus::new("conc-idle");
        let state = scratch_dir("conc-idle-state");
        let access = FakeAccess::sink(Duration::ZERO);
        let daemon = Daemon::start(
            DaemonConfig {
                bus_address: Some(bus.address.clone()),
                state_dir: state.path().to_path_buf(),
                save_deadline: Duration::from_secs(2),
                load_budget: Duration::from_secs(2),
                max_vm_entries: conntrack_vmstate::service::confine::DEFAULT_MAX_ENTRIES,
                stop_grace: Duration::from_secs(30),
            },
            access,
        )
        .await
        .expect("daemon");
        let client = bus.connect().await;
        let unique = daemon.unique_name().expect("unique name");
        let m = Manager1Proxy::builder(&client)
            .destination(unique)
            .build()
            .await
            .unwrap();
        m.register(
            "1",
            HashMap::from([("bus_address", Variant::from(bus.address.as_str()))]),
        )
        .await
        .unwrap();
        assert!(
            !daemon.release_if_idle().await,
            "released with a VM registered"
        );
        m.unregister("1", HashMap::new()).await.unwrap();
        assert!(daemon.release_if_idle().await);
        assert!(
            !common::bus::wait_for_name(&client, "org.conntrack_vmstate.Manager1", Duration::ZERO)
                .await
        );
        match m
            .register(
                "2",
                HashMap::from([("bus_address", Variant::from(bus.address.as_str()))]),
            )
            .await
        {
            Err(zbus::Error::MethodError(name, text, _)) => {
                assert_eq!(name.as_str(), "org.conntrack_vmstate.Error.ShuttingDown");
                assert_eq!(
                    text.as_deref(),
                    Some("conntrack-vmstated is exiting; call again to reach a new instance")
                );
            }
            other => panic!("expected ShuttingDown, got {other:?}"),
        }
        assert!(common::bus::queued_owners(&client, "org.qemu.VMState1")
            .await
            .is_empty());
        daemon.shutdown().await;
    })
    .await
    .expect("test timed out");
}

//! The D-Bus contract, pinned: what the daemon really serves (Introspect on
//! a private bus, in-process daemon over the fake access) must be the
//! introspection XML in `dbus-interfaces/`, one file per interface, which the
//! package installs to /usr/share/dbus-1/interfaces/. A change to a method,
//! property or signal fails here until the file is updated with it: run
//! with `CVS_BLESS=1` to rewrite the files, then review the diff as the
//! API change it is.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use common::bus::{scratch_dir, TestBus};
use common::fake::FakeAccess;
use conntrack_vmstate::bus::proxy::{Manager1Proxy, Vm1Proxy};
use conntrack_vmstate::bus::{Daemon, DaemonConfig};
use zbus::Variant;

/// Interfaces every zbus object serves; not ours to pin.
const STANDARD: &str = "org.freedesktop.DBus.";

/// `(interface name, its <interface> element)` of one Introspect answer,
/// without the standard interfaces and child nodes.
fn interfaces(xml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<interface name=\"") {
        let tail = &rest[start..];
        let end = tail
            .find("</interface>")
            .map(|e| e + "</interface>".len())
            .unwrap_or_else(|| panic!("unterminated <interface> in {xml}"));
        let element = &tail[..end];
        let name_start = "<interface name=\"".len();
        let name_end = element[name_start..]
            .find('"')
            .map(|e| e + name_start)
            .expect("interface name");
        let name = element[name_start..name_end].to_string();
        if !name.starts_with(STANDARD) {
            // As zbus wrote it (the `///` docs become XML comments), with the
            // element's own indentation.
            let line_start = rest[..start].rfind('\n').map_or(0, |i| i + 1);
            let indent = &rest[line_start..start];
            out.push((name, format!("{indent}{element}")));
        }
        rest = &tail[end..];
    }
    out
}

fn document(element: &str) -> String {
    format!(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \
         \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n{element}\n</node>\n"
    )
}

async fn introspect(conn: &zbus::Connection, dest: &str, path: &str) -> String {
    let reply = conn
        .call_method(
            Some(dest),
            path,
            Some("org.freedesktop.DBus.Introspectable"),
            "Introspect",
            &(),
        )
        .await
        .unwrap_or_else(|e| panic!("Introspect {dest} {path}: {e}"));
    reply.body().deserialize::<String>().expect("an XML string")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_interfaces_are_the_pinned_introspection_xml() {
    common::needs!(bus);
    tokio::time::timeout(Duration::from_secs(60), async {
        let bus = TestBus::new("contract");
        let state = scratch_dir("contract-state");
        let daemon = Daemon::start(
            DaemonConfig {
                bus_address: Some(bus.address.clone()),
                state_dir: state.path().to_path_buf(),
                save_deadline: Duration::from_millis(1500),
                load_budget: Duration::from_millis(3),
                max_vm_entries: conntrack_vmstate::service::confine::DEFAULT_MAX_ENTRIES,
                stop_grace: Duration::from_secs(30),
            },
            FakeAccess::with(Vec::new()),
        )
        .await
        .expect("daemon");
        let client = bus.connect().await;
        let m = Manager1Proxy::new(&client).await.unwrap();
        let path = m
            .register(
                "100",
                HashMap::from([("bus_address", Variant::from(bus.address.as_str()))]),
            )
            .await
            .unwrap();
        let vm1 = Vm1Proxy::builder(&client)
            .path(path.clone())
            .build()
            .await
            .unwrap();
        let unique = vm1.unique_name().await.unwrap();
        let manager = daemon.unique_name().expect("manager unique name");

        let mut served: BTreeMap<String, String> = BTreeMap::new();
        for (dest, p) in [
            (manager.as_str(), "/org/conntrack_vmstate/Manager1"),
            (manager.as_str(), path.as_str()),
            (unique.as_str(), "/org/qemu/VMState1"),
        ] {
            for (name, element) in interfaces(&introspect(&client, dest, p).await) {
                served.insert(name, element);
            }
        }
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/dbus-interfaces"));
        let bless = std::env::var_os("CVS_BLESS").is_some();
        let mut pinned: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter_map(|n| n.strip_suffix(".xml").map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        pinned.sort();
        if bless {
            std::fs::create_dir_all(&dir).expect("dbus-interfaces/");
            for (name, element) in &served {
                std::fs::write(dir.join(format!("{name}.xml")), document(element))
                    .expect("write the pinned XML");
            }
            return;
        }
        let names: Vec<String> = served.keys().cloned().collect();
        assert_eq!(
            names, pinned,
            "interfaces served vs dbus-interfaces/*.xml (CVS_BLESS=1 rewrites the files)"
        );
        for (name, element) in &served {
            let file = dir.join(format!("{name}.xml"));
            let want = std::fs::read_to_string(&file).expect("pinned XML");
            assert_eq!(
                document(element),
                want,
                "{name} as served differs from {} (CVS_BLESS=1 rewrites it)",
                file.display()
            );
        }
    })
    .await
    .expect("test timed out");
}

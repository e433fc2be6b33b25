//! The manager's signals (InterfacesAdded, PropertiesChanged of LastLoad)
//! carry VM names, marks and statistics: under the packaged bus policy
//! (dbus-policy/, included as it is) only root and the admin group receive
//! them; a second, unprivileged client subscribed to them gets nothing.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::bus::{scratch_dir, DaemonOpts, DaemonProc, TestBus};
use common::netns::Netns;
use conntrack_vmstate::bus::proxy::{Manager1Proxy, Vm1Proxy, VmState1Proxy};
use conntrack_vmstate::format::{self, EncodeOptions};
use zbus::Variant;

/// A system-bus-like configuration (default deny for calls and owning)
/// plus the packaged policy file. The test's daemon runs as root, not as
/// the package's user, so root may own the manager name here as well.
fn config(dir: &Path) -> std::path::PathBuf {
    let policy = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("dbus-policy/org.conntrack_vmstate.Manager1.conf");
    let text = format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:tmpdir=/tmp</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus"/>
  </policy>
  <include>{}</include>
  <policy user="root">
    <allow own="org.conntrack_vmstate.Manager1"/>
  </policy>
</busconfig>
"#,
        policy.display()
    );
    let p = dir.join("bus.conf");
    std::fs::write(&p, text).unwrap();
    p
}

/// `gdbus monitor` of the manager's signals as `uid` (None: root), for the
/// length of `during`; returns its output.
async fn monitor_while(
    uid: Option<u32>,
    address: &str,
    during: impl std::future::Future<Output = ()>,
) -> String {
    let mut cmd = match uid {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={u}"),
                format!("--regid={u}"),
                "--clear-groups".into(),
                "gdbus".into(),
            ]);
            c
        }
        None => Command::new("gdbus"),
    };
    let mut child = cmd
        .args([
            "monitor",
            "--address",
            address,
            "--dest",
            "org.conntrack_vmstate.Manager1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("gdbus monitor");
    // Until its match rule is in place.
    tokio::time::sleep(Duration::from_millis(700)).await;
    during.await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _ = child.kill();
    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_signals_reach_only_root_and_the_admin_group() {
    common::needs!(daemon);
    tokio::time::timeout(Duration::from_secs(90), async {
        let dir = scratch_dir("cb-bus");
        let bus = TestBus::with_config("cb", &config(dir.path()));
        let ns = Netns::new("cb");
        let state = scratch_dir("cb-state");
        let client = bus.connect().await;
        let mut o = DaemonOpts::new(&bus.address, state.path());
        o.netns = Some(&ns.name);
        let _d = DaemonProc::start(o, &client).await;
        let m = Manager1Proxy::new(&client).await.unwrap();
        let empty = format::encode(&[], &EncodeOptions::default())
            .unwrap()
            .bytes;
        let addr = bus.address.clone();
        // Register (InterfacesAdded) and a Load (PropertiesChanged of
        // LastLoad) while each monitor listens.
        let activity = |vm: &'static str| {
            let (m, client, addr, empty) = (m.clone(), client.clone(), addr.clone(), empty.clone());
            async move {
                let path = m
                    .register(
                        vm,
                        HashMap::from([("bus_address", Variant::from(addr.as_str()))]),
                    )
                    .await
                    .unwrap();
                let v = Vm1Proxy::builder(&client).path(path).build().await.unwrap();
                let vs = VmState1Proxy::builder(&client)
                    .destination(v.unique_name().await.unwrap())
                    .build()
                    .await
                    .unwrap();
                vs.load(serde_bytes::Bytes::new(&empty)).await.unwrap();
            }
        };
        let root = monitor_while(None, &addr, activity("100")).await;
        assert!(root.contains("InterfacesAdded"), "root saw: {root}");
        assert!(root.contains("PropertiesChanged"), "root saw: {root}");
        assert!(root.contains("LastLoad"), "root saw: {root}");
        let nobody = monitor_while(Some(65534), &addr, activity("101")).await;
        for s in ["InterfacesAdded", "PropertiesChanged", "LastLoad", "101"] {
            assert!(!nobody.contains(s), "nobody received {s}: {nobody}");
        }
    })
    .await
    .expect("test timed out");
}

/// A VM registered with `qemu_pid` answers Save and Load only from that
/// process (its bus connection's pid, as the bus daemon knows it from the
/// kernel): another caller — here this test process, when the VM is bound
/// to another pid — gets AccessDenied, its Load creates nothing and cannot
/// cancel anything; bound to this process, the same calls work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_and_load_only_from_the_bound_qemu() {
    common::needs!(daemon);
    tokio::time::timeout(Duration::from_secs(90), async {
        let bus = TestBus::new("cb-pid");
        let ns = Netns::new("cb-pid");
        let state = scratch_dir("cb-pid-state");
        let client = bus.connect().await;
        let mut o = DaemonOpts::new(&bus.address, state.path());
        o.netns = Some(&ns.name);
        let d = DaemonProc::start(o, &client).await;
        let m = Manager1Proxy::new(&client).await.unwrap();
        let empty = format::encode(&[], &EncodeOptions::default())
            .unwrap()
            .bytes;
        let bind = |vm: &'static str, pid: u32| {
            let (m, client, addr) = (m.clone(), client.clone(), bus.address.clone());
            async move {
                let path = m
                    .register(
                        vm,
                        HashMap::from([
                            ("bus_address", Variant::from(addr.as_str())),
                            ("qemu_pid", Variant::from(pid)),
                        ]),
                    )
                    .await
                    .unwrap();
                let v = Vm1Proxy::builder(&client)
                    .path(path)
                    .cache_properties(zbus::proxy::CacheProperties::No)
                    .build()
                    .await
                    .unwrap();
                let vs = VmState1Proxy::builder(&client)
                    .destination(v.unique_name().await.unwrap())
                    .build()
                    .await
                    .unwrap();
                (v, vs)
            }
        };
        // Bound to the daemon's own pid: certainly not this process.
        let other = d.pid();
        let (v, vs) = bind("100", other).await;
        let me = std::process::id();
        let want = format!(
            "org.freedesktop.DBus.Error.AccessDenied: Save of VM '100' is only for its QEMU \
             (pid {other}): called by pid {me}"
        );
        assert_eq!(vs.save().await.unwrap_err().to_string(), want);
        let e = vs.load(serde_bytes::Bytes::new(&empty)).await.unwrap_err();
        assert_eq!(e.to_string(), want.replace("Save of", "Load of"));
        assert!(v.last_load().await.unwrap().is_empty(), "Load ran");
        assert!(v.last_save().await.unwrap().is_empty(), "Save ran");
        assert!(
            d.log_text()
                .contains(&format!("Save of VM 100 refused: called by pid {me}")),
            "{}",
            d.log_text()
        );
        // Bound to this process: served as always.
        let (v, vs) = bind("101", me).await;
        assert!(!vs.save().await.unwrap().is_empty());
        vs.load(serde_bytes::Bytes::new(&empty)).await.unwrap();
        assert!(!v.last_load().await.unwrap().is_empty());
        // The VM's next QEMU registers again with its own pid (not a
        // conflicting registration): the binding moves to it.
        let (v, vs) = bind("100", me).await;
        assert!(!vs.save().await.unwrap().is_empty());
        assert!(!v.last_save().await.unwrap().is_empty());
        assert!(
            d.log_text()
                .contains(&format!("VM 100: Save and Load now only for QEMU pid {me}")),
            "{}",
            d.log_text()
        );
    })
    .await
    .expect("test timed out");
}

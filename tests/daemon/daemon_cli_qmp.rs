//! `register --qmp` / `unregister --qmp` wire a real QEMU 7.2's dbus-vmstate
//! object once the daemon serves the VM, and take it away again.

use std::time::Duration;

use common::bus::{cli, queued_owners, scratch_dir, DaemonOpts, DaemonProc, TestBus};
use common::qemu::{Qemu, QemuOpts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_and_unregister_with_qmp_wire_qemu() {
    common::needs!(qemu);
    tokio::time::timeout(Duration::from_secs(120), async {
        let bus = TestBus::new("qmp-cli");
        let state = scratch_dir("qmp-cli-state");
        let client = bus.connect().await;
        let _d = DaemonProc::start(DaemonOpts::new(&bus.address, state.path()), &client).await;
        let addr = bus.address.clone();
        let dir = state.path().to_path_buf();
        tokio::task::block_in_place(|| {
            let mut qemu = Qemu::start(&dir, "qemu", None, &QemuOpts::default());
            assert!(qemu.qmp().find_vmstate().unwrap().is_none());
            qemu.release_qmp();
            let sock = qemu.qmp_path.display().to_string();
            let out = cli(
                &addr,
                &["register", "100", "--bus-address", &addr, "--qmp", &sock],
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                stdout.ends_with(&format!(
                    "QEMU at {sock}: dbus-vmstate lists conntrack-vmstate-100 on {addr}\n"
                )),
                "{stdout}"
            );
            let obj = qemu
                .qmp()
                .find_vmstate()
                .unwrap()
                .expect("dbus-vmstate object");
            assert_eq!(obj.addr, addr);
            assert_eq!(obj.ids, vec!["conntrack-vmstate-100".to_string()]);
            qemu.release_qmp();
            let out = cli(&addr, &["unregister", "100", "--qmp", &sock]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                qemu.qmp().find_vmstate().unwrap().is_none(),
                "object left behind"
            );
            qemu.release_qmp();
            // A VM that is not registered: nothing is touched, the error says why.
            let out = cli(&addr, &["unregister", "100", "--qmp", &sock]);
            assert_eq!(out.status.code(), Some(1));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.starts_with("conntrack-vmstate: VM '100' is not registered"),
                "{err}"
            );
            qemu.qmp().execute("quit", None).ok();
        });
        assert!(queued_owners(&client, "org.qemu.VMState1").await.is_empty());
    })
    .await
    .expect("test timed out");
}

//! Without CAP_NET_ADMIN every operation is `AccessError::PermissionDenied`.
//! The parent starts this test binary again inside a namespace with
//! CAP_NET_ADMIN removed from the bounding set (setpriv), so the kernel
//! really refuses.

use common::netns::Netns;
use conntrack_vmstate::access::{AccessError, ConntrackAccess};
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::Selector;

const MARK: u32 = 9;
const CHILD_ENV: &str = "CVS_EPERM_CHILD";

#[test]
fn without_cap_net_admin_every_operation_is_permission_denied() {
    common::needs!(kernel);
    let ns = Netns::new("cteperm");
    ns.run(
        "conntrack",
        &[
            "-I",
            "-p",
            "tcp",
            "-s",
            "10.0.0.1",
            "-d",
            "10.0.0.2",
            "--sport",
            "1000",
            "--dport",
            "80",
            "--state",
            "ESTABLISHED",
            "-t",
            "3000",
            "-u",
            "SEEN_REPLY,ASSURED",
            "-m",
            "9",
        ],
    );
    let out = ns.run_test_without_net_admin("ctnetlink_eperm::eperm_child", CHILD_ENV);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("eperm child: 4 operations denied"),
        "{stdout}"
    );
    // The entry is still there, untouched.
    assert_eq!(ns.conntrack_count(), 1);
}

/// Runs only as the child of the test above (inside the namespace, without
/// CAP_NET_ADMIN).
#[test]
#[ignore = "started by without_cap_net_admin_every_operation_is_permission_denied"]
fn eperm_child() {
    common::needs!(kernel);
    assert_eq!(
        std::env::var(CHILD_ENV).as_deref(),
        Ok("1"),
        "run by the parent test only"
    );
    let ct = Ctnetlink::open().expect("socket opens without the capability");
    let sel = Selector::mark(MARK);
    let denied = |r: Result<(), AccessError>, op: &str| match r {
        Err(AccessError::PermissionDenied { op: o }) => {
            assert_eq!(o, op);
        }
        other => panic!("{op}: expected PermissionDenied, got {other:?}"),
    };
    let e = ct.dump(&sel).map(drop);
    if let Err(err) = &e {
        assert_eq!(
            err.to_string(),
            "conntrack access needs CAP_NET_ADMIN: dump was refused by the kernel (EPERM)"
        );
    }
    denied(e, "dump");
    // An entry to create and delete (built by hand: we cannot dump).
    let entry = conntrack_vmstate::entry::Entry {
        orig: conntrack_vmstate::entry::Tuple {
            src: "10.0.0.3".parse().unwrap(),
            dst: "10.0.0.4".parse().unwrap(),
            proto: 17,
            l4: conntrack_vmstate::entry::L4::Ports { src: 5, dst: 6 },
            zone: None,
        },
        reply: conntrack_vmstate::entry::Tuple {
            src: "10.0.0.4".parse().unwrap(),
            dst: "10.0.0.3".parse().unwrap(),
            proto: 17,
            l4: conntrack_vmstate::entry::L4::Ports { src: 6, dst: 5 },
            zone: None,
        },
        status: 0,
        timeout: 100,
        mark: MARK,
        zone: 0,
        labels: None,
        protoinfo: None,
        seq_adj_orig: None,
        seq_adj_reply: None,
        helper: None,
        id: None,
    };
    let many = vec![entry.clone(); 700]; // more than one batch
    denied(ct.create(&many).map(drop), "create");
    denied(ct.delete_selected(&sel).map(drop), "dump");
    denied(ct.delete_entries(&[entry]).map(drop), "delete");
    println!("eperm child: 4 operations denied");
}

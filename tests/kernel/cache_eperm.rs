//! Without CAP_NET_ADMIN the event groups cannot be joined: `watch` fails
//! with a clear error, nothing is started, and a dump stays exactly what the
//! plain access answers. The parent starts this test binary again inside a
//! namespace with CAP_NET_ADMIN removed from the bounding set (setpriv).

use common::netns::Netns;
use conntrack_vmstate::access::{AccessError, ConntrackAccess};
use conntrack_vmstate::cache::{CacheConfig, CachedAccess};
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::Selector;

const CHILD_ENV: &str = "CVS_CACHE_EPERM_CHILD";

#[test]
fn cache_without_cap_net_admin_refuses_to_watch() {
    common::needs!(kernel);
    let ns = Netns::new("cacheeperm");
    let out = ns.run_test_without_net_admin("cache_eperm::cache_eperm_child", CHILD_ENV);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("cache eperm child: done"), "{stdout}");
}

/// Runs only as the child of the test above.
#[test]
#[ignore = "started by cache_without_cap_net_admin_refuses_to_watch"]
fn cache_eperm_child() {
    common::needs!(kernel);
    assert_eq!(
        std::env::var(CHILD_ENV).as_deref(),
        Ok("1"),
        "run by the parent test only"
    );
    let ct = Ctnetlink::open().expect("socket opens without the capability");
    let cache = CachedAccess::new(ct, CacheConfig::default()).expect("cache");
    let sel = Selector::mark(5);
    match cache.watch(&sel, true) {
        Err(AccessError::PermissionDenied { op }) => assert_eq!(op, "events"),
        other => panic!("watch: expected PermissionDenied, got {other:?}"),
    }
    assert_eq!(cache.cached_len(&sel), None, "not watched");
    match cache.dump(&sel) {
        Err(e @ AccessError::PermissionDenied { .. }) => assert_eq!(
            e.to_string(),
            "conntrack access needs CAP_NET_ADMIN: dump was refused by the kernel (EPERM)"
        ),
        other => panic!("dump: expected PermissionDenied, got {other:?}"),
    }
    assert_eq!(cache.stats().unwatched, 1);
    println!("cache eperm child: done");
}

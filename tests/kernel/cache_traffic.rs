//! The warm cache with entries made by real packets on the loopback of a
//! throw-away namespace (CONNMARK stamps them with the VM's mark): NEW
//! events from packets may lack protocol info, packets refresh timeouts
//! without any event, connections close. The cached dump must still equal a
//! direct one.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use common::compare::{compare, Tolerance};
use common::netns::{run_ok, Netns};
use conntrack_vmstate::access::ConntrackAccess;
use conntrack_vmstate::cache::{CacheConfig, CachedAccess};
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::{proto, Selector};

const MARK: u32 = 100;
/// Bound on each socket read: loopback answers at once, a hang fails.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `f` on a thread that lives in the namespace `ns`.
fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(ns.path()).expect("netns handle");
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid nsfs descriptor affects only this thread.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    })
}

#[test]
fn cache_tracks_packet_made_entries() {
    common::needs!(kernel);
    let ns = Netns::new("cachetraffic");
    run_ok(ns.cmd("iptables").args([
        "-t",
        "mangle",
        "-A",
        "OUTPUT",
        "-j",
        "CONNMARK",
        "--set-mark",
        &MARK.to_string(),
    ]));
    let sel = Selector::mark(MARK);
    let cfg = CacheConfig {
        refresh_interval: Duration::from_secs(3600),
        ..CacheConfig::default()
    };
    let direct = Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink");
    let cache = CachedAccess::new(
        Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink"),
        cfg,
    )
    .expect("cache");
    cache.watch(&sel, true).expect("watch");
    assert!(cache.wait_trusted(&sel, Duration::from_secs(20)));
    let syncs = cache.stats().syncs;

    // Established TCP connections (kept open), closed ones, and UDP flows.
    let reported = Instant::now();
    let (open, udp) = in_ns(&ns, || {
        let l = TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = l.local_addr().expect("addr");
        let mut open = Vec::new();
        for i in 0..12 {
            let mut c = TcpStream::connect(addr).expect("connect");
            let (mut s, _) = l.accept().expect("accept");
            for t in [&c, &s] {
                t.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            }
            c.write_all(b"hello").expect("write");
            let mut b = [0u8; 5];
            s.read_exact(&mut b).expect("read");
            s.write_all(b"world").expect("write");
            c.read_exact(&mut b).expect("read");
            if i % 3 == 0 {
                drop(c);
                drop(s); // FIN both ways: TIME_WAIT
            } else {
                open.push((c, s));
            }
        }
        let a = UdpSocket::bind("127.0.0.1:0").expect("udp");
        let b = UdpSocket::bind("127.0.0.1:0").expect("udp");
        for u in [&a, &b] {
            u.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        }
        a.send_to(b"q", b.local_addr().expect("addr"))
            .expect("send");
        let mut buf = [0u8; 8];
        b.recv_from(&mut buf).expect("recv");
        b.send_to(b"r", a.local_addr().expect("addr"))
            .expect("send");
        a.recv_from(&mut buf).expect("recv");
        (open, (a, b))
    });
    std::thread::sleep(Duration::from_millis(2500));
    // Packets now refresh the UDP and TCP timeouts without any event.
    in_ns(&ns, || {
        let (a, b) = &udp;
        a.send_to(b"q", b.local_addr().expect("addr"))
            .expect("send");
        let mut buf = [0u8; 8];
        b.recv_from(&mut buf).expect("recv");
    });
    // How long after its last reported change the UDP entry was refreshed
    // silently (an upper bound: 2.5 s plus however slow this runner is).
    let silent_gap = reported.elapsed().as_secs() as u32;

    let got = cache.dump(&sel).expect("cached dump");
    let want = direct.dump(&sel).expect("direct dump");
    assert_eq!(cache.stats().syncs, syncs, "no sync helped");
    assert!(cache.stats().hits >= 1, "answered from the cache");
    assert!(want.len() >= 13, "12 TCP + 1 UDP, got {}", want.len());
    assert!(want.iter().any(|e| e.orig.proto == proto::UDP));
    // Strict, TCP flags included: the per-direction flags the kernel
    // changes silently (DATA_UNACKNOWLEDGED, MAXACK_SET) are back to their
    // last reported values once every segment is acknowledged.
    let diffs = compare(
        &want,
        &got,
        // The UDP entry was refreshed silently `silent_gap` s after it was
        // last reported: the cache may be that much below the kernel (plus
        // a second of rounding), never above.
        Tolerance::exact_status(silent_gap + 1),
    );
    assert!(diffs.is_empty(), "{diffs:#?}");
    for g in &got {
        let w = want
            .iter()
            .find(|w| w.orig == g.orig)
            .expect("same entries");
        assert!(g.timeout <= w.timeout + 1, "{} > {}", g.timeout, w.timeout);
    }
    drop(open);
}

/// Opened from inside the namespace (as the daemon or the sandboxed helper
/// do with `Ctnetlink::open()`): no setns anywhere, and the
/// `nf_conntrack_events` check reads this namespace's value.
#[test]
fn cache_opened_inside_its_namespace() {
    common::needs!(kernel);
    let ns = Netns::new("cacheinside");
    let sel = Selector::mark(MARK);
    let cache = in_ns(&ns, || {
        CachedAccess::new(Ctnetlink::open().expect("open"), CacheConfig::default()).expect("cache")
    });
    let direct = Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink");
    in_ns(&ns, || cache.watch(&sel, true)).expect("watch");
    assert!(cache.wait_trusted(&sel, Duration::from_secs(20)));
    run_ok(ns.cmd("conntrack").args([
        "-I", "-p", "udp", "-s", "10.3.0.1", "-d", "10.3.0.2", "--sport", "5", "--dport", "53",
        "-t", "500", "-m", "100",
    ]));
    let got = cache.dump(&sel).expect("cached");
    assert_eq!(got.len(), 1);
    assert_eq!(cache.stats().hits, 1, "{:?}", cache.stats().last_fallback);
    assert!(compare(
        &direct.dump(&sel).expect("direct"),
        &got,
        Tolerance::exact_status(1)
    )
    .is_empty());
    run_ok(
        ns.cmd("sysctl")
            .args(["-qw", "net.netfilter.nf_conntrack_events=0"]),
    );
    let got = cache.dump(&sel).expect("dump");
    assert_eq!(got.len(), 1);
    assert_eq!(
        cache.stats().last_fallback,
        Some("events off"),
        "the namespace's own sysctl was read"
    );
}

//! Budgeted Load in the service core (no bus), against the kernel's
//! conntrack in throw-away namespaces: the reply comes before all entries
//! exist, the entries created before it are the most valuable ones, the
//! background part completes attribute-exact, an entry that live traffic
//! made meanwhile is left as the traffic made it, and a second Load or an
//! Unregister stops a running restore.
//!
//! The access under the engine is the real ctnetlink, wrapped to record the
//! order of creation and, where a test needs a deterministic moment ("live
//! traffic before the background part reaches this entry"), to hold back
//! the create call that carries one given entry until the test releases it.
//! No wall-clock time is asserted.

use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::compare::{compare, Tolerance};
use common::fake::{key, FakeAccess};
use common::netns::{run_ok, Netns};
use common::population::{self, Spec};
use conntrack_vmstate::access::ConntrackAccess;
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::{proto, status, tcp_state, Entry, ProtoInfo, Selector, Tuple, L4};
use conntrack_vmstate::format::{self, priority, EncodeOptions, Format, QEMU_LIMIT};
use conntrack_vmstate::service::{Engine, OpReport, OptValue, VmConfig, VmRuntime};

const MARK: u32 = 100;

/// Real ctnetlink in `ns` underneath the kit's fake, which records every
/// entry in the order it is handed to `create` and can hold back the call
/// carrying `held`.
fn recording(ns: &Netns, held: Option<(Tuple, u16)>) -> Arc<FakeAccess> {
    FakeAccess::over(
        Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink"),
        held,
    )
}

fn vm() -> Arc<VmRuntime> {
    let cfg = VmConfig::from_options("100", &[("mark".to_string(), OptValue::U32(MARK))])
        .expect("config");
    Arc::new(VmRuntime::new(cfg))
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    let enc = format::encode(
        entries,
        &EncodeOptions {
            limit: QEMU_LIMIT,
            format: Format::Binary,
        },
    )
    .expect("encode");
    assert_eq!(enc.dropped, 0, "test blob must carry every entry");
    enc.bytes
}

/// Waits (bounded) until LastLoad is no longer pending.
async fn wait_complete(vm: &VmRuntime, bound: Duration) -> OpReport {
    let end = Instant::now() + bound;
    loop {
        let r = vm.last_load().expect("LastLoad");
        if !r.pending && !vm.restore_running() {
            return r;
        }
        assert!(Instant::now() < end, "restore never completed: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` established, assured TCP entries of `MARK` with distinct tuples and
/// remaining timeouts spread so their priority order is well defined.
fn assured(n: usize, net: u8) -> Vec<Entry> {
    (0..n)
        .map(|i| {
            let orig = Tuple {
                src: format!("10.{net}.{}.{}", i / 250, i % 250 + 1)
                    .parse()
                    .unwrap(),
                dst: "192.0.2.80".parse().unwrap(),
                proto: proto::TCP,
                l4: L4::Ports {
                    src: 20000 + (i % 30000) as u16,
                    dst: 443,
                },
                zone: None,
            };
            Entry {
                orig,
                reply: orig.inverse(),
                status: status::SEEN_REPLY | status::ASSURED | status::CONFIRMED,
                timeout: 400_000 - i as u32,
                mark: MARK,
                zone: 0,
                labels: None,
                protoinfo: Some(ProtoInfo::Tcp {
                    state: tcp_state::ESTABLISHED,
                    wscale_orig: 7,
                    wscale_reply: 7,
                    flags_orig: 0x03,
                    flags_reply: 0x03,
                }),
                seq_adj_orig: None,
                seq_adj_reply: None,
                helper: None,
                id: None,
            }
        })
        .collect()
}

/// 50,000 entries of the realistic mix and a 1 ms budget: QEMU gets its
/// answer while entries are still being created; the entries created
/// before it are a prefix of the priority order (in fact every entry is
/// created in priority order); the background part completes and the
/// destination then holds every entry attribute-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgeted_load_answers_early_with_the_most_valuable_entries_first() {
    common::needs!(kernel);
    let src = Netns::new("lb-src");
    let dst = Netns::new("lb-dst");
    let pop = population::generate(Spec::new(50_000, MARK, 0x10ad));
    population::load(&src.name, &pop);
    population::enable_labels(&dst.name);
    let sel = Selector::mark(MARK);
    let saved = Ctnetlink::open_in_netns(Path::new(&src.path()))
        .unwrap()
        .dump(&sel)
        .expect("dump source");
    assert_eq!(saved.len(), pop.vm_count());
    let blob = encode(&saved);
    let decoded = format::decode(&blob).unwrap().entries;
    let order = priority::priority_order(&decoded);

    // The least valuable entry's batch is held until the answer has been
    // looked at, so "pending" is observed without racing the restore.
    let last_key = key(&decoded[*order.last().unwrap()]);
    let access = recording(&dst, Some(last_key));
    let engine = Engine::new(
        access.clone(),
        Duration::from_secs(2),
        Duration::from_millis(1),
    );
    let vm = vm();
    engine.load(&vm, blob.clone()).await;
    let interim = vm.last_load().expect("LastLoad after the answer");
    access.release();
    assert_eq!(interim.error, "", "{interim:?}");
    assert!(
        interim.pending,
        "answered only after the full restore: {interim:?}"
    );
    assert_eq!(interim.entries, saved.len() as u64);
    assert!(
        interim.created_sync > 0 && interim.created_sync < saved.len() as u64,
        "{interim:?}"
    );
    assert_eq!(interim.complete_us, 0);

    let last = wait_complete(&vm, Duration::from_secs(240)).await;
    assert_eq!(last.error, "", "{last:?}");
    assert_eq!(
        (last.entries, last.created, last.existed, last.refused),
        (saved.len() as u64, saved.len() as u64, 0, 0),
        "{last:?}"
    );
    assert_eq!(last.created_sync, interim.created_sync);
    assert!(!last.pending);
    assert!(last.complete_us >= last.duration_us, "{last:?}");

    // Creation order is the priority order of the state format, so the
    // entries created before the answer are its most valuable prefix.
    let want: Vec<(Tuple, u16)> = order.into_iter().map(|i| key(&decoded[i])).collect();
    let got = access.order();
    assert_eq!(got.len(), want.len());
    let value: std::collections::HashMap<(Tuple, u16), u64> = decoded
        .iter()
        .map(|e| (key(e), priority::value_key(e)))
        .collect();
    let values: Vec<u64> = got.iter().map(|k| value[k]).collect();
    assert!(
        values.windows(2).all(|w| w[0] >= w[1]),
        "entries were not created most valuable first"
    );
    let sync = interim.created_sync as usize;
    let least_sync = values[..sync].iter().min().unwrap();
    let most_later = values[sync..].iter().max().unwrap();
    assert!(least_sync >= most_later);
    let classes: Vec<_> = got[..sync]
        .iter()
        .map(|k| priority::value_class(decoded.iter().find(|e| key(e) == *k).unwrap()))
        .collect();
    assert!(
        classes.iter().all(|c| *c == priority::ValueClass::Assured),
        "the synchronous part should be established flows: {classes:?}"
    );

    let restored = Ctnetlink::open_in_netns(Path::new(&dst.path()))
        .unwrap()
        .dump(&sel)
        .expect("dump destination");
    // Remaining timeouts tick between the source dump and this one.
    let diffs = compare(&saved, &restored, Tolerance::exact_status(120));
    assert!(
        diffs.is_empty(),
        "{} differences, first: {:?}",
        diffs.len(),
        &diffs[..diffs.len().min(5)]
    );
}

/// Binds a TCP client to a fixed source port and connects, inside `ns`.
fn connect_from(ns: &Netns, sport: u16, dport: u16) -> (TcpListener, TcpStream, TcpStream) {
    let file = std::fs::File::open(ns.path()).expect("netns handle");
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid nsfs descriptor affects only this thread.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let l = TcpListener::bind(("127.0.0.1", dport)).expect("listen");
            let sin = |port: u16| libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
                },
                sin_zero: [0; 8],
            };
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // SAFETY: plain socket/bind/connect on a fresh descriptor with
            // a live sockaddr_in of the given length.
            let fd = unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
                let a = sin(sport);
                let r = libc::bind(fd, (&a as *const libc::sockaddr_in).cast(), len);
                assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
                let a = sin(dport);
                let r = libc::connect(fd, (&a as *const libc::sockaddr_in).cast(), len);
                assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
                std::os::fd::OwnedFd::from_raw_fd(fd)
            };
            let c = TcpStream::from(fd);
            let (a, _) = l.accept().expect("accept");
            (l, c, a)
        })
        .join()
        .expect("namespace thread")
    })
}

/// The guest resumes while the background part runs, so a packet of a
/// migrated flow can create its entry first. Our create then gets EEXIST:
/// the entry is counted as existed and left exactly as the traffic made it
/// (same kernel id, its own TCP state and timeout), not overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_made_by_live_traffic_meanwhile_is_counted_existed_and_kept() {
    common::needs!(kernel);
    let dst = Netns::new("lb-live");
    run_ok(dst.cmd("iptables").args([
        "-t",
        "mangle",
        "-A",
        "OUTPUT",
        "-j",
        "CONNMARK",
        "--set-mark",
        "100",
    ]));
    let (sport, dport) = (41234u16, 8443u16);
    // The saved copy of that flow: closing (TIME_WAIT), so it is among the
    // least valuable and created in the background.
    let orig = Tuple {
        src: "127.0.0.1".parse().unwrap(),
        dst: "127.0.0.1".parse().unwrap(),
        proto: proto::TCP,
        l4: L4::Ports {
            src: sport,
            dst: dport,
        },
        zone: None,
    };
    let mut flow = assured(1, 0).remove(0);
    flow.orig = orig;
    flow.reply = orig.inverse();
    flow.timeout = 100;
    flow.protoinfo = Some(ProtoInfo::Tcp {
        state: tcp_state::TIME_WAIT,
        wscale_orig: 2,
        wscale_reply: 2,
        flags_orig: 0,
        flags_reply: 0,
    });
    let mut entries = assured(3000, 1);
    entries.push(flow.clone());
    let blob = encode(&entries);

    let access = recording(&dst, Some(key(&flow)));
    let engine = Engine::new(
        access.clone(),
        Duration::from_secs(2),
        Duration::from_millis(1),
    );
    let vm = vm();
    engine.load(&vm, blob).await;
    assert!(vm.last_load().unwrap().pending, "{:?}", vm.last_load());
    assert!(
        access.wait_held(Duration::from_secs(60)),
        "the background part never reached the flow"
    );

    // Live traffic of the flow on the destination, before our create.
    let conns = connect_from(&dst, sport, dport);
    let ct = Ctnetlink::open_in_netns(Path::new(&dst.path())).unwrap();
    let live_before: Vec<Entry> = ct
        .dump(&Selector::mark(MARK))
        .unwrap()
        .into_iter()
        .filter(|e| e.orig == orig)
        .collect();
    assert_eq!(
        live_before.len(),
        1,
        "traffic made no entry: {live_before:?}"
    );
    let live = &live_before[0];
    assert!(matches!(
        live.protoinfo,
        Some(ProtoInfo::Tcp {
            state: tcp_state::ESTABLISHED,
            ..
        })
    ));

    access.release();
    let last = wait_complete(&vm, Duration::from_secs(60)).await;
    assert_eq!(last.error, "", "{last:?}");
    assert_eq!(
        (last.entries, last.created, last.existed, last.refused),
        (3001, 3000, 1, 0),
        "{last:?}"
    );

    let after: Vec<Entry> = ct
        .dump(&Selector::mark(MARK))
        .unwrap()
        .into_iter()
        .filter(|e| e.orig == orig)
        .collect();
    assert_eq!(after.len(), 1);
    let a = &after[0];
    assert_eq!(a.id, live.id, "the live entry was replaced");
    assert_eq!(a.status, live.status, "status overwritten");
    assert_eq!(a.protoinfo, live.protoinfo, "TCP state overwritten");
    assert_eq!(a.reply, live.reply);
    assert!(
        a.timeout > 1000,
        "timeout overwritten with the saved {}: {a:?}",
        flow.timeout
    );
    drop(conns);
}

/// A second Load stops the restore of the first (after its current batch)
/// before starting; `cancel_restore` (what a stop past its grace does
/// before handing the rest over) stops a running one. The entries already
/// created stay; LastLoad says why the restore ended. (An Unregister does
/// not stop a restore: tests/daemon/restore_kept.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_load_and_cancel_stop_a_running_restore() {
    common::needs!(kernel);
    let dst = Netns::new("lb-cancel");
    let first = assured(20_000, 1);
    let held = key(&first[10_000]);
    let access = recording(&dst, Some(held));
    let engine = Arc::new(Engine::new(
        access.clone(),
        Duration::from_secs(2),
        Duration::from_millis(1),
    ));
    let vm = vm();
    engine.load(&vm, encode(&first)).await;
    assert!(access.wait_held(Duration::from_secs(60)));
    assert!(vm.restore_running());

    // The second Load waits for the first restore to stop; the held batch
    // is released meanwhile (it completes, then the restore sees the stop).
    let second = assured(500, 2);
    let (e2, vm2, blob2) = (engine.clone(), vm.clone(), encode(&second));
    let load2 = tokio::spawn(async move { e2.load(&vm2, blob2).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!load2.is_finished(), "the second Load did not wait");
    access.release();
    load2.await.unwrap();
    let last = wait_complete(&vm, Duration::from_secs(60)).await;
    assert_eq!(last.error, "", "{last:?}");
    assert_eq!((last.entries, last.created), (500, 500), "{last:?}");

    let ct = Ctnetlink::open_in_netns(Path::new(&dst.path())).unwrap();
    let have: std::collections::HashSet<(Tuple, u16)> = ct
        .dump(&Selector::mark(MARK))
        .unwrap()
        .iter()
        .map(key)
        .collect();
    let first_made = first.iter().filter(|e| have.contains(&key(e))).count();
    assert!(
        first_made > 10_000 && first_made < first.len(),
        "the first restore should have stopped part-way: {first_made}"
    );
    assert!(second.iter().all(|e| have.contains(&key(e))));

    // Cancelled while a restore runs.
    ct.delete_selected(&Selector::mark(MARK)).unwrap();
    let access = recording(&dst, Some(held));
    let engine = Engine::new(
        access.clone(),
        Duration::from_secs(2),
        Duration::from_millis(1),
    );
    let vm = self::vm();
    engine.load(&vm, encode(&first)).await;
    assert!(access.wait_held(Duration::from_secs(60)));
    let releaser = {
        let a = access.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            a.release();
        })
    };
    assert!(engine.cancel_restore(&vm, "the test stops it").await);
    releaser.join().unwrap();
    assert!(!vm.restore_running());
    let last = vm.last_load().unwrap();
    assert!(!last.pending);
    assert!(
        last.error.starts_with("restore stopped after ")
            && last.error.ends_with(" of 20000 entries: the test stops it"),
        "{last:?}"
    );
    assert!(last.created < 20_000, "{last:?}");
    assert!(!engine.cancel_restore(&vm, "again").await);
}

/// Blobs in state format v1 are already written most valuable first; a
/// legacy text payload (the Perl helper's, in its dump order) is not. Here
/// its lines come least valuable first: the engine still creates the
/// established flows first, and they are what is in before the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_text_in_reverse_order_is_created_most_valuable_first() {
    common::needs!(kernel);
    let dst = Netns::new("lb-text");
    let mut entries = assured(3000, 3);
    for (i, e) in entries.iter_mut().enumerate().skip(1000) {
        // A third closing, a third unreplied: less valuable classes.
        if i < 2000 {
            e.protoinfo = Some(ProtoInfo::Tcp {
                state: tcp_state::TIME_WAIT,
                wscale_orig: 0,
                wscale_reply: 0,
                flags_orig: 0,
                flags_reply: 0,
            });
            e.timeout = 100;
        } else {
            e.status = status::CONFIRMED;
            e.protoinfo = Some(ProtoInfo::Tcp {
                state: tcp_state::SYN_SENT,
                wscale_orig: 0,
                wscale_reply: 0,
                flags_orig: 0,
                flags_reply: 0,
            });
            e.timeout = 100;
        }
    }
    let mut order = priority::priority_order(&entries);
    order.reverse();
    let mut text = String::new();
    for i in &order {
        text.push_str(&format::text::line(&entries[*i]));
        text.push('\n');
    }
    let least = key(&entries[order[0]]);
    let access = recording(&dst, Some(least));
    let engine = Engine::new(
        access.clone(),
        Duration::from_secs(2),
        Duration::from_millis(1),
    );
    let vm = vm();
    engine.load(&vm, text.into_bytes()).await;
    let interim = vm.last_load().unwrap();
    access.release();
    assert!(interim.pending, "{interim:?}");
    let last = wait_complete(&vm, Duration::from_secs(60)).await;
    assert_eq!((last.created, last.error.as_str()), (3000, ""), "{last:?}");

    let value: std::collections::HashMap<(Tuple, u16), u64> = entries
        .iter()
        .map(|e| (key(e), priority::value_key(e)))
        .collect();
    let values: Vec<u64> = access.order().iter().map(|k| value[k]).collect();
    assert_eq!(values.len(), 3000);
    assert!(
        values.windows(2).all(|w| w[0] >= w[1]),
        "not created most valuable first"
    );
    let sync = interim.created_sync as usize;
    assert!(sync > 0 && sync < 3000, "{interim:?}");
    let assured_key = |v: u64| v >> 32 == priority::ValueClass::Assured as u64;
    assert!(values[..sync.min(1000)].iter().all(|v| assured_key(*v)));
}

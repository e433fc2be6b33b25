//! Save and Load through a real conntrack-vmstated running inside throw-away
//! network namespaces (real kernel conntrack), called over a real
//! dbus-daemon the way QEMU calls: by the helper's unique name.

use std::collections::HashMap;
use std::time::Duration;

use common::bus::{scratch_dir, DaemonOpts, DaemonProc, TestBus};
use common::netns::Netns;
use conntrack_vmstate::bus::proxy::{Manager1Proxy, Vm1Proxy, VmState1Proxy};
use conntrack_vmstate::format::{self, QEMU_LIMIT};
use serde_bytes::Bytes;
use zbus::{Connection, OwnedVariant, Variant};

const T: Duration = Duration::from_secs(120);

/// One simulated host: a namespace, a private bus and the daemon inside.
struct Host {
    // Drop order: daemon, bus, namespace, directory.
    daemon: DaemonProc,
    bus: TestBus,
    ns: Netns,
    client: Connection,
    _state: tempfile::TempDir,
}

impl Host {
    async fn new(tag: &str, wrapper: &[&str]) -> Host {
        let ns = Netns::new(tag);
        let bus = TestBus::new(tag);
        let state = scratch_dir(&format!("{tag}-state"));
        let client = bus.connect().await;
        let mut o = DaemonOpts::new(&bus.address, state.path());
        o.netns = Some(&ns.name);
        o.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        let daemon = DaemonProc::start(o, &client).await;
        Host {
            daemon,
            bus,
            ns,
            client,
            _state: state,
        }
    }

    /// Registers `vm` on this host's bus; returns (VM1 proxy, VMState1 proxy).
    async fn register(&self, vm: &str) -> (Vm1Proxy<'static>, VmState1Proxy<'static>) {
        let (vm1, vs) = common::bus::register(&self.client, &self.bus.address, vm).await;
        (vm1, vs)
    }

    /// conntrack(8) lines of one mark, IPv4 and IPv6, without the ticking
    /// timeout and the `use=` counter, sorted: comparable across hosts.
    fn entries(&self, mark: u32) -> Vec<String> {
        let mut lines = Vec::new();
        for fam in ["ipv4", "ipv6"] {
            let out = self
                .ns
                .cmd("conntrack")
                .args(["-L", "-f", fam, "--mark", &mark.to_string()])
                .output()
                .unwrap();
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                let toks: Vec<&str> = l.split_whitespace().collect();
                if toks.len() < 4 {
                    continue;
                }
                let kept: Vec<&str> = toks
                    .iter()
                    .enumerate()
                    .filter(|(i, t)| *i != 2 && !t.starts_with("use="))
                    .map(|(_, t)| *t)
                    .collect();
                lines.push(kept.join(" "));
            }
        }
        lines.sort();
        lines
    }

    fn add(&self, args: &str, mark: u32) {
        let mut a: Vec<String> = args.split_whitespace().map(String::from).collect();
        // --mark last: before -u, conntrack 1.4.7 stores the status as mark.
        a.extend(["--mark".into(), mark.to_string()]);
        let mut full = vec!["-I".to_string()];
        full.extend(a);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        self.ns.run("conntrack", &refs);
    }
}

fn num(m: &HashMap<String, OwnedVariant>, k: &str) -> u64 {
    m.get(k)
        .and_then(|v| u64::try_from(v.try_clone().ok()?).ok())
        .unwrap_or_else(|| panic!("{k} missing in {m:?}"))
}

fn text(m: &HashMap<String, OwnedVariant>, k: &str) -> String {
    m.get(k)
        .and_then(|v| String::try_from(v.try_clone().ok()?).ok())
        .unwrap_or_else(|| panic!("{k} missing in {m:?}"))
}

fn populate(h: &Host) {
    for i in 0..4 {
        h.add(&format!("-s 10.1.0.{i} -d 192.0.2.10 -p tcp --sport {} --dport 443 --state ESTABLISHED -t 3600 -u SEEN_REPLY,ASSURED", 40000 + i), 100);
    }
    h.add(
        "-s 2001:db8::5 -d 2001:db8::53 -p udp --sport 5353 --dport 53 -t 120",
        100,
    );
    h.add("-s 2001:db8::5 -d 2001:db8::80 -p tcp --sport 41000 --dport 80 --state TIME_WAIT -t 100 -u SEEN_REPLY", 100);
    // Another VM's entries, which must never move.
    for i in 0..3 {
        h.add(
            &format!(
                "-s 10.2.0.{i} -d 192.0.2.20 -p udp --sport {} --dport 53 -t 60",
                50000 + i
            ),
            200,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_load_and_flush_move_exactly_one_vms_entries() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let src = Host::new("vms-src", &[]).await;
        let dst = Host::new("vms-dst", &[]).await;
        populate(&src);
        let src_100 = src.entries(100);
        let src_200 = src.entries(200);
        assert_eq!((src_100.len(), src_200.len()), (6, 3));

        let (src_vm, src_vs) = src.register("100").await;
        let (dst_vm, dst_vs) = dst.register("100").await;
        let blob = src_vs.save().await.expect("Save").into_vec();
        assert!(!blob.is_empty() && blob.len() <= QEMU_LIMIT);
        let decoded = format::decode(&blob).expect("valid state");
        assert_eq!(decoded.entries.len(), 6);
        assert!(decoded.entries.iter().all(|e| e.mark == 100));
        let last = src_vm.last_save().await.unwrap();
        assert_eq!(text(&last, "error"), "");
        assert_eq!((num(&last, "entries"), num(&last, "dropped"), num(&last, "bytes")), (6, 0, blob.len() as u64));
        assert!(num(&last, "timestamp") > 0 && num(&last, "duration_us") > 0);
        // Right after Register the cache may still be warming up.
        assert!(["cache", "dump"].contains(&text(&last, "source").as_str()), "{last:?}");

        dst_vs.load(Bytes::new(&blob)).await.expect("Load");
        let last = dst_vm.last_load().await.unwrap();
        assert_eq!(text(&last, "error"), "");
        assert_eq!(
            (num(&last, "entries"), num(&last, "created"), num(&last, "existed"), num(&last, "refused")),
            (6, 6, 0, 0)
        );
        // Six entries fit the budget: all before the answer, nothing pending.
        assert_eq!(num(&last, "created_sync"), 6);
        assert_eq!(last.get("pending").map(|v| bool::try_from(v.try_clone().unwrap()).unwrap()), Some(false));
        assert_eq!(num(&last, "complete_us"), num(&last, "duration_us"));
        assert_eq!(dst.entries(100), src_100, "entries differ after Load");
        assert!(dst.entries(200).is_empty(), "another VM's entries moved");

        // Loading the same state again creates nothing new.
        dst_vs.load(Bytes::new(&blob)).await.expect("Load again");
        let last = dst_vm.last_load().await.unwrap();
        assert_eq!((num(&last, "created"), num(&last, "existed")), (0, 6));
        assert_eq!(dst.entries(100).len(), 6);

        // On the source after the migration: a connection opened since the
        // Save, and the other VM's entries, survive the flush.
        src.add("-s 10.1.0.99 -d 192.0.2.10 -p tcp --sport 45000 --dport 443 --state ESTABLISHED -t 3600 -u SEEN_REPLY,ASSURED", 100);
        let m = Manager1Proxy::new(&src.client).await.unwrap();
        m.unregister("100", HashMap::from([("flush", Variant::from(true))])).await.expect("flush");
        let left = src.entries(100);
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].contains("src=10.1.0.99"), "{left:?}");
        assert_eq!(src.entries(200), src_200);
        let log = src.daemon.log_text();
        assert!(log.contains("Unregister of VM 100: flushed 6 saved entries (0 already gone)"), "{log}");
    })
    .await
    .expect("test timed out");
}

/// The ids of the last Save outlive the daemon: killed and started again
/// between Save and Unregister, it still flushes exactly the saved entries
/// (not one made since), and Unregister removes the ids file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_after_a_daemon_restart_deletes_exactly_the_saved_entries() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let mut src = Host::new("vms-restart", &[]).await;
        populate(&src);
        let src_200 = src.entries(200);
        let (_vm, vs) = src.register("100").await;
        let blob = vs.save().await.expect("Save").into_vec();
        assert_eq!(format::decode(&blob).expect("valid").entries.len(), 6);
        let ids_file = src._state.path().join(format!(
            "saved-{}.ids",
            "100".bytes().map(|b| format!("{b:02x}")).collect::<String>()
        ));
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !ids_file.exists() {
            assert!(std::time::Instant::now() < end, "ids file not written");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::task::block_in_place(|| src.daemon.kill9());
        src.add("-s 10.1.0.98 -d 192.0.2.10 -p tcp --sport 45001 --dport 443 --state ESTABLISHED -t 3600 -u SEEN_REPLY,ASSURED", 100);
        let mut o = DaemonOpts::new(&src.bus.address, src._state.path());
        o.netns = Some(&src.ns.name);
        src.daemon = DaemonProc::start(o, &src.client).await;
        let log = src.daemon.log_text();
        assert!(log.contains("VM 100: 6 saved entry ids of the last Save kept for a flush"), "{log}");
        let m = Manager1Proxy::new(&src.client).await.unwrap();
        m.unregister("100", HashMap::from([("flush", Variant::from(true))])).await.expect("flush");
        let left = src.entries(100);
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].contains("src=10.1.0.98"), "{left:?}");
        assert_eq!(src.entries(200), src_200);
        let log = src.daemon.log_text();
        assert!(log.contains("Unregister of VM 100: flushed 6 saved entries (0 already gone)"), "{log}");
        assert!(!ids_file.exists(), "ids file left after Unregister");
    })
    .await
    .expect("test timed out");
}

/// A daemon without CAP_NET_ADMIN cannot dump: Save still answers with a
/// valid empty state and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_without_cap_net_admin_sends_valid_empty_state() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let src = Host::new(
            "vms-nocap",
            &["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"],
        )
        .await;
        populate(&src);
        let (vm, vs) = src.register("100").await;
        let blob = vs.save().await.expect("Save never fails").into_vec();
        assert!(!blob.is_empty() && blob.len() <= QEMU_LIMIT);
        assert!(format::decode(&blob).expect("valid").entries.is_empty());
        let last = vm.last_save().await.unwrap();
        assert_eq!(
            text(&last, "error"),
            "dump failed: conntrack access needs CAP_NET_ADMIN: dump was refused by the kernel (EPERM); sent an empty state"
        );
        assert_eq!((num(&last, "entries"), num(&last, "bytes")), (0, blob.len() as u64));
        let log = src.daemon.log_text();
        assert!(log.contains("Save of VM 100 degraded: dump failed"), "{log}");
        // The warm cache could not start either: said once, not fatal.
        assert!(
            log.contains("starting the warm cache for VM 100 failed (conntrack access needs CAP_NET_ADMIN")
                && log.contains("); Save dumps directly"),
            "{log}"
        );
        // The entries are untouched.
        assert_eq!(src.entries(100).len(), 6);
    })
    .await
    .expect("test timed out");
}

/// Load never returns an error to QEMU: bad data is reported in LastLoad
/// and creates nothing; good legacy text from the Perl helper loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_bad_data_and_never_fails() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let src = Host::new("vms-lsrc", &[]).await;
        let dst = Host::new("vms-ldst", &[]).await;
        populate(&src);
        let (_, src_vs) = src.register("100").await;
        let (vm, vs) = dst.register("100").await;
        let good = src_vs.save().await.unwrap().into_vec();

        let mut flipped = good.clone();
        let last_byte = flipped.len() - 1;
        flipped[last_byte] ^= 0x40;
        let truncated = good[..good.len() / 2].to_vec();
        let oversized = vec![0x41u8; QEMU_LIMIT + 1];
        let bad_text = b"-A -t 3599 -u SEEN_REPLY,ASSURED -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -q 10.0.0.1 -p tcp --sport 1000 --dport 80 --reply-port-src 80 --reply-port-dst 1000 --state ESTABLISHED --mark 100\n-A this is not conntrack\n".to_vec();
        let cases: Vec<(&str, Vec<u8>, String)> = vec![
            ("empty", Vec::new(), "empty state (0 bytes): nothing to load".into()),
            ("oversized", oversized, format!("state is {} bytes, more than QEMU's limit of 1048576: nothing loaded", QEMU_LIMIT + 1)),
            ("garbage", b"\x00\x01garbage".to_vec(), format!("invalid state, nothing loaded: {}", format::decode(b"\x00\x01garbage").unwrap_err())),
            ("bit flip", flipped.clone(), format!("invalid state, nothing loaded: {}", format::decode(&flipped).unwrap_err())),
            ("truncated", truncated.clone(), format!("invalid state, nothing loaded: {}", format::decode(&truncated).unwrap_err())),
            ("bad legacy line", bad_text.clone(), format!("invalid state, nothing loaded: {}", format::decode(&bad_text).unwrap_err())),
        ];
        for (what, data, want) in cases {
            vs.load(Bytes::new(&data)).await.unwrap_or_else(|e| panic!("{what}: Load failed: {e}"));
            let last = vm.last_load().await.unwrap();
            assert_eq!(text(&last, "error"), want, "{what}");
            assert!(want.contains("nothing"), "{what}: {want}");
            assert_eq!((num(&last, "created"), num(&last, "bytes")), (0, data.len() as u64), "{what}");
            assert_eq!(dst.entries(100).len(), 0, "{what} created entries");
        }
        // The error messages of the decoder are the ones it documents.
        let e = format::decode(&flipped).unwrap_err().to_string();
        assert!(e.contains("checksum") || e.contains("corrupt") || e.contains("decompress"), "{e}");

        // A good Perl-helper payload: conntrack -o save lines plus --mark.
        let legacy = b"-A -t 3599 -u SEEN_REPLY,ASSURED -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -q 10.0.0.1 -p tcp --sport 1000 --dport 80 --reply-port-src 80 --reply-port-dst 1000 --state ESTABLISHED --mark 100\n";
        vs.load(Bytes::new(legacy)).await.unwrap();
        let last = vm.last_load().await.unwrap();
        assert_eq!(text(&last, "error"), "");
        assert_eq!((num(&last, "entries"), num(&last, "created")), (1, 1));
        let got = dst.entries(100);
        assert_eq!(got.len(), 1);
        assert!(got[0].starts_with("tcp 6 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=1000 dport=80 src=10.0.0.2 dst=10.0.0.1 sport=80 dport=1000 [ASSURED] mark=100"), "{got:?}");
    })
    .await
    .expect("test timed out");
}

/// Twenty VMs on one shared bus Save at once over a real table that also
/// holds other marks: each gets exactly its own entries, and every owner's
/// GetAll is answered meanwhile (the blocked-dump variant of this is in
/// daemon_concurrency.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_vms_save_at_once_on_a_shared_bus() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let h = Host::new("vms-20", &[]).await;
        let dir = scratch_dir("vms-20-pop");
        let pop = dir.path().join("pop.txt");
        let mut lines = String::new();
        for mark in (1..=20).chain([250]) {
            let n = if mark == 250 { "20000" } else { "300" };
            let out =
                std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/demo/population"))
                    .args([&mark.to_string(), n])
                    .output()
                    .unwrap();
            assert!(out.status.success());
            lines.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        std::fs::write(&pop, lines).unwrap();
        h.ns.run("conntrack", &["-R", pop.to_str().unwrap()]);

        let mut vms = Vec::new();
        for mark in 1..=20u32 {
            vms.push((mark, h.register(&mark.to_string()).await));
        }
        let mut saves = Vec::new();
        for (mark, (_, vs)) in &vms {
            let (mark, vs) = (*mark, vs.clone());
            saves.push(tokio::spawn(async move {
                (mark, vs.save().await.expect("Save").into_vec())
            }));
        }
        // QEMU's discovery of every owner while the Saves run.
        for (mark, (_, vs)) in &vms {
            let props = zbus::fdo::PropertiesProxy::builder(vs.inner().connection())
                .destination(vs.inner().destination().to_owned())
                .path("/org/qemu/VMState1")
                .build()
                .await
                .unwrap();
            let all = props
                .get_all(zbus::names::InterfaceName::try_from("org.qemu.VMState1").unwrap())
                .await
                .unwrap();
            assert_eq!(text(&all, "Id"), format!("conntrack-vmstate-{mark}"));
        }
        for s in saves {
            let (mark, blob) = s.await.unwrap();
            assert!(!blob.is_empty() && blob.len() <= QEMU_LIMIT);
            let d = format::decode(&blob).unwrap();
            let last = vms[mark as usize - 1].1 .0.last_save().await.unwrap();
            assert_eq!(d.entries.len(), 300, "mark {mark}: {last:?}");
            assert!(
                d.entries.iter().all(|e| e.mark == mark),
                "mark {mark} got another VM's entry"
            );
        }
        for (mark, (vm1, _)) in &vms {
            let last = vm1.last_save().await.unwrap();
            assert_eq!(text(&last, "error"), "", "mark {mark}");
            assert_eq!(num(&last, "entries"), 300, "mark {mark}");
        }
    })
    .await
    .expect("test timed out");
}

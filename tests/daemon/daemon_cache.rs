//! The warm cache and budgeted Load wired into the product: a real
//! conntrack-vmstated (in-process netlink inside a throw-away namespace, or
//! capless through the real helper) over a real dbus-daemon.
//!
//! * Register starts the cache: a Save is then served from it
//!   (`LastSave.source == "cache"`), and entries created or deleted after
//!   Register are present or absent exactly as in the kernel.
//! * Through the helper the same, and after the helper restarts the daemon
//!   sends its watches again, so Saves come from the cache again.
//! * `--no-cache` dumps every time.
//! * A VM of more than 4,096 entries is saved from the pre-encoded base
//!   (`LastSave.source == "base"`), equal to the kernel's entries also after
//!   churn, in-process and through the helper; `--no-base` encodes whole.
//! * A big Load with a small `--load-budget-ms` answers before the restore
//!   is complete and LastLoad/the journal say so.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::bus::{scratch_dir, DaemonOpts, DaemonProc, TestBus};
use common::compare::{compare, Tolerance};
use common::host::spawn_helper;
use common::netns::Netns;
use common::population::{self, Spec};
use conntrack_vmstate::access::ConntrackAccess;
use conntrack_vmstate::bus::proxy::{Manager1Proxy, Vm1Proxy, VmState1Proxy};
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::{Entry, Selector};
use conntrack_vmstate::format::{self, EncodeOptions, Format, QEMU_LIMIT};
use serde_bytes::Bytes;
use zbus::{Connection, OwnedVariant};

const T: Duration = Duration::from_secs(180);
const MARK: u32 = 100;

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

fn flag(m: &HashMap<String, OwnedVariant>, k: &str) -> bool {
    m.get(k)
        .and_then(|v| bool::try_from(v.try_clone().ok()?).ok())
        .unwrap_or_else(|| panic!("{k} missing in {m:?}"))
}

fn add(ns: &Netns, src: &str, sport: u16) {
    ns.run(
        "conntrack",
        &[
            "-I",
            "-s",
            src,
            "-d",
            "192.0.2.10",
            "-p",
            "tcp",
            "--sport",
            &sport.to_string(),
            "--dport",
            "443",
            "--state",
            "ESTABLISHED",
            "-t",
            "3600",
            "-u",
            "SEEN_REPLY,ASSURED",
            "--mark",
            &MARK.to_string(),
        ],
    );
}

fn delete(ns: &Netns, src: &str, sport: u16) {
    ns.run(
        "conntrack",
        &["-D", "-s", src, "-p", "tcp", "--sport", &sport.to_string()],
    );
}

/// The daemon's client side of one VM.
struct Vm {
    vm1: Vm1Proxy<'static>,
    vs: VmState1Proxy<'static>,
}

async fn register(client: &Connection, bus: &str, vm: &str) -> Vm {
    let (vm1, vs) = common::bus::register(client, bus, vm).await;
    Vm { vm1, vs }
}

impl Vm {
    /// One Save: the decoded entries and LastSave.source.
    async fn save(&self) -> (Vec<Entry>, String) {
        let blob = self.vs.save().await.expect("Save").into_vec();
        assert!(!blob.is_empty() && blob.len() <= QEMU_LIMIT);
        let last = self.vm1.last_save().await.unwrap();
        assert_eq!(text(&last, "error"), "", "{last:?}");
        (
            format::decode(&blob).expect("valid").entries,
            text(&last, "source"),
        )
    }

    /// Saves until one comes from `source`; bounded.
    async fn save_until(&self, source: &str, bound: Duration) -> Vec<Entry> {
        let end = Instant::now() + bound;
        loop {
            let (entries, got) = self.save().await;
            if got == source {
                return entries;
            }
            assert!(
                Instant::now() < end,
                "no Save from {source} within {bound:?} (last: {got})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Saves until one is served from the cache (the warm-up runs in the
    /// background after Register); bounded.
    async fn save_from_cache(&self, bound: Duration) -> Vec<Entry> {
        let end = Instant::now() + bound;
        loop {
            let (entries, source) = self.save().await;
            if source == "cache" {
                return entries;
            }
            assert_eq!(source, "dump");
            assert!(
                Instant::now() < end,
                "no Save was served from the cache within {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The kernel's view, for comparison with what Save carried.
fn kernel(ns: &Netns) -> Vec<Entry> {
    Ctnetlink::open_in_netns(Path::new(&ns.path()))
        .unwrap()
        .dump(&Selector::mark(MARK))
        .unwrap()
}

fn assert_same(saved: &[Entry], ns: &Netns) {
    // Cached timeouts may lag by the refresh interval (30 s by default).
    let diffs = compare(&kernel(ns), saved, Tolerance::exact_status(40));
    assert!(diffs.is_empty(), "Save differs from the kernel: {diffs:#?}");
}

fn has(entries: &[Entry], src: &str, sport: u16) -> bool {
    let src: std::net::IpAddr = src.parse().unwrap();
    entries.iter().any(|e| {
        e.orig.src == src
            && matches!(e.orig.l4, conntrack_vmstate::entry::L4::Ports { src: p, .. } if p == sport)
    })
}

/// Entries made before Register (no event has announced them).
fn populate(ns: &Netns) {
    for i in 0..5 {
        add(ns, &format!("10.1.0.{i}"), 40000);
    }
    // Other marks never appear.
    ns.run(
        "conntrack",
        &[
            "-I",
            "-s",
            "10.2.0.1",
            "-d",
            "192.0.2.20",
            "-p",
            "udp",
            "--sport",
            "5000",
            "--dport",
            "53",
            "-t",
            "60",
            "--mark",
            "200",
        ],
    );
}

/// Entries made and deleted right after Register and once warm: every
/// cached Save matches the kernel.
async fn exercise_after_register(ns: &Netns, vm: &Vm) {
    // Right after Register, while the cache may still warm up.
    add(ns, "10.1.1.1", 41000);
    delete(ns, "10.1.0.0", 40000);
    let saved = vm.save_from_cache(Duration::from_secs(30)).await;
    assert!(has(&saved, "10.1.1.1", 41000));
    assert!(!has(&saved, "10.1.0.0", 40000));
    assert_eq!(saved.len(), 5);
    assert!(saved.iter().all(|e| e.mark == MARK));
    assert_same(&saved, ns);

    // Once warm: changes arrive as events.
    add(ns, "10.1.2.2", 42000);
    delete(ns, "10.1.0.1", 40000);
    let (saved, source) = vm.save().await;
    assert_eq!(source, "cache");
    assert!(
        has(&saved, "10.1.2.2", 42000),
        "entry created after Register missing"
    );
    assert!(!has(&saved, "10.1.0.1", 40000), "deleted entry came back");
    assert_eq!(saved.len(), 5);
    assert_same(&saved, ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_after_register_is_served_from_the_warm_cache() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let ns = Netns::new("dc-inproc");
        let bus = TestBus::new("dc-inproc");
        let state = scratch_dir("dc-inproc-state");
        let client = bus.connect().await;
        let mut o = DaemonOpts::new(&bus.address, state.path());
        o.netns = Some(&ns.name);
        let d = DaemonProc::start(o, &client).await;
        populate(&ns);
        let vm = register(&client, &bus.address, "100").await;
        exercise_after_register(&ns, &vm).await;
        let log = d.log_text();
        assert!(log.contains("from the cache"), "{log}");

        // Unregister stops the watch; a new registration starts again.
        let m = Manager1Proxy::new(&client).await.unwrap();
        m.unregister("100", HashMap::new()).await.unwrap();
        let vm = register(&client, &bus.address, "100").await;
        let saved = vm.save_from_cache(Duration::from_secs(30)).await;
        assert_same(&saved, &ns);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_daemon_dumps_every_save() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let ns = Netns::new("dc-nocache");
        let bus = TestBus::new("dc-nocache");
        let state = scratch_dir("dc-nocache-state");
        let client = bus.connect().await;
        let mut o = DaemonOpts::new(&bus.address, state.path());
        o.netns = Some(&ns.name);
        o.extra.push("--no-cache".into());
        let _d = DaemonProc::start(o, &client).await;
        add(&ns, "10.1.0.1", 40000);
        let vm = register(&client, &bus.address, "100").await;
        for _ in 0..3 {
            let (saved, source) = vm.save().await;
            assert_eq!((saved.len(), source.as_str()), (1, "dump"));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await
    .expect("test timed out");
}

/// The packaged split: the capless daemon watches through the helper, whose
/// cache serves Save. After the helper restarts (systemd would start it on
/// the next connection), the daemon's client sends the watches again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helper_cache_serves_save_and_watches_survive_a_helper_restart() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let ns = Netns::new("dc-helper");
        let bus = TestBus::new("dc-helper");
        let state = scratch_dir("dc-helper-state");
        let sock = state.path().join("helper.sock");
        let mut helper = spawn_helper(&ns, state.path(), &sock);
        let client = bus.connect().await;
        let o = DaemonOpts::new(&bus.address, state.path())
            .capless()
            .helper_socket(&sock);
        let d = DaemonProc::start(o, &client).await;
        populate(&ns);
        let vm = register(&client, &bus.address, "100").await;
        exercise_after_register(&ns, &vm).await;

        // Restart the helper; its cache is gone with it.
        helper.stop();
        let _helper = spawn_helper(&ns, state.path(), &sock);
        add(&ns, "10.1.3.3", 43000);
        delete(&ns, "10.1.0.2", 40000);
        let saved = vm.save_from_cache(Duration::from_secs(30)).await;
        assert!(has(&saved, "10.1.3.3", 43000));
        assert!(!has(&saved, "10.1.0.2", 40000));
        assert_same(&saved, &ns);
        let log = d.log_text();
        assert!(log.contains("watches sent again to the helper"), "{log}");
    })
    .await
    .expect("test timed out");
}

/// A VM big enough for a pre-encoded base (6,000 entries, created after
/// Register so they are all evented): its Saves come from the base, equal
/// to the kernel's entries, also after 1 % were deleted and as many
/// created; with `--no-base` the same VM is encoded whole.
async fn big_vm_saves_from_the_base(ns: &Netns, vm: &Vm, base: bool) {
    let ct = Ctnetlink::open_in_netns(Path::new(&ns.path())).unwrap();
    let entries = population::generate(Spec::new(6000, MARK, 71)).vm_entries;
    let r = ct.create(&entries).expect("create");
    assert_eq!(r.created, entries.len() as u64, "{r:?}");
    let want = if base { "base" } else { "cache" };
    let saved = vm.save_until(want, Duration::from_secs(30)).await;
    assert_eq!(saved.len(), entries.len());
    assert_same(&saved, ns);
    ct.delete_entries(&entries[..60]).expect("delete");
    let more = population::generate(Spec::new(60, MARK, 72)).vm_entries;
    let r = ct.create(&more).expect("create");
    assert!(r.created > 50, "{r:?}");
    // Events are read within milliseconds; a Save that raced them would
    // differ from the kernel below, so give them a moment. (A refresh every
    // 30 s replaces the base: a Save in the moment before the next one is
    // built is encoded whole, and the loop saves again.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let saved = vm.save_until(want, Duration::from_secs(30)).await;
    assert_eq!(saved.len(), entries.len() - 60 + r.created as usize);
    assert_same(&saved, ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_vm_saves_from_the_pre_encoded_base_in_process_or_whole_with_no_base() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        for base in [true, false] {
            let ns = Netns::new("dc-base");
            let bus = TestBus::new("dc-base");
            let state = scratch_dir("dc-base-state");
            let client = bus.connect().await;
            let mut o = DaemonOpts::new(&bus.address, state.path());
            o.netns = Some(&ns.name);
            if !base {
                o.extra.push("--no-base".into());
            }
            let _d = DaemonProc::start(o, &client).await;
            let vm = register(&client, &bus.address, "100").await;
            big_vm_saves_from_the_base(&ns, &vm, base).await;
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_vm_saves_from_the_helpers_pre_encoded_base() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let ns = Netns::new("dc-hbase");
        let bus = TestBus::new("dc-hbase");
        let state = scratch_dir("dc-hbase-state");
        let sock = state.path().join("helper.sock");
        let _helper = spawn_helper(&ns, state.path(), &sock);
        let client = bus.connect().await;
        let o = DaemonOpts::new(&bus.address, state.path()).helper_socket(&sock);
        let _d = DaemonProc::start(o, &client).await;
        let vm = register(&client, &bus.address, "100").await;
        big_vm_saves_from_the_base(&ns, &vm, true).await;
    })
    .await
    .expect("test timed out");
}

/// 50,000 entries and a 1 ms budget: Load answers before the restore is
/// complete (created_sync < entries, duration_us < complete_us), LastLoad
/// reports the totals once done, and the journal has one line for the
/// answer and one for the completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_load_answers_within_its_budget_and_reports_completion() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let ns = Netns::new("dc-load");
        let bus = TestBus::new("dc-load");
        let state = scratch_dir("dc-load-state");
        let client = bus.connect().await;
        let mut o = DaemonOpts::new(&bus.address, state.path());
        o.netns = Some(&ns.name);
        o.extra.extend(["--load-budget-ms".into(), "1".into()]);
        let d = DaemonProc::start(o, &client).await;
        let vm = register(&client, &bus.address, "100").await;
        let entries = common::population::entries(50_000, 7, MARK);
        let enc = format::encode(
            &entries,
            &EncodeOptions {
                limit: QEMU_LIMIT,
                format: Format::Binary,
            },
        )
        .unwrap();
        assert_eq!(enc.dropped, 0);
        vm.vs.load(Bytes::new(&enc.bytes)).await.expect("Load");
        let end = Instant::now() + Duration::from_secs(120);
        let last = loop {
            let last = vm.vm1.last_load().await.unwrap();
            if !flag(&last, "pending") {
                break last;
            }
            assert!(Instant::now() < end, "restore never completed: {last:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(text(&last, "error"), "", "{last:?}");
        let n = num(&last, "entries");
        assert_eq!(n, 50_000);
        assert_eq!(
            num(&last, "created") + num(&last, "existed") + num(&last, "refused"),
            n,
            "{last:?}"
        );
        assert!(num(&last, "created") > 40_000, "{last:?}");
        let sync = num(&last, "created_sync");
        assert!(sync > 0 && sync < n, "{last:?}");
        assert!(
            num(&last, "duration_us") < num(&last, "complete_us"),
            "{last:?}"
        );
        // Synthetic entries about to expire may be gone already.
        let short = entries.iter().filter(|e| e.timeout < 60).count() as u64;
        let have = kernel(&ns).len() as u64;
        let created = num(&last, "created");
        assert!(have <= created && have + short >= created, "{have} in the kernel, {created} created, {short} short-lived");
        let log = d.log_text();
        assert!(
            log.contains(&format!(
                "Load of VM 100 answered after {} µs: {sync} of 50000 entries created, the rest in the background",
                num(&last, "duration_us")
            )),
            "{log}"
        );
        assert!(
            log.contains(&format!(
                "Load of VM 100 complete after {} µs",
                num(&last, "complete_us")
            )),
            "{log}"
        );
    })
    .await
    .expect("test timed out");
}

// ------------------------------------------------------- Register waits

/// The VM's entries all exist before Register (made with the event
/// extension, `nf_conntrack_events=1` as the package sets it) among other
/// marks' entries: Register returns only once the cache is warm, so the
/// Save right after it comes from the pre-encoded base, not from a walk
/// of the table, and the journal says how long the warm-up took.
async fn save_right_after_register_is_from_the_base(ns: &Netns, client: &Connection, bus: &str) {
    let ct = Ctnetlink::open_in_netns(Path::new(&ns.path())).unwrap();
    let entries = population::generate(Spec::new(20_000, MARK, 81)).vm_entries;
    let r = ct.create(&entries).expect("create");
    assert_eq!(r.created, entries.len() as u64, "{r:?}");
    let noise = population::generate(Spec::new(10_000, 200, 82)).vm_entries;
    ct.create(&noise).expect("create noise");
    let vm = register(client, bus, "100").await;
    let (saved, source) = vm.save().await;
    assert_eq!(source, "base", "the first Save after Register");
    assert_eq!(saved.len(), entries.len());
    assert_same(&saved, ns);
}

fn assert_warm_line(log: &str) {
    let line = log
        .lines()
        .find(|l| l.contains("Register of VM 100: Id "))
        .unwrap_or_else(|| panic!("no Register line: {log}"));
    assert!(
        line.contains("; its cache is warm after ")
            && line.contains(" ms: 20000 entries cached, pre-encoded base of "),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_returns_when_warm_in_process() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let ns = Netns::new("dc-warm");
        ns.run("sysctl", &["-qw", "net.netfilter.nf_conntrack_events=1"]);
        let bus = TestBus::new("dc-warm");
        let state = scratch_dir("dc-warm-state");
        let client = bus.connect().await;
        let mut o = DaemonOpts::new(&bus.address, state.path());
        o.netns = Some(&ns.name);
        let d = DaemonProc::start(o, &client).await;
        save_right_after_register_is_from_the_base(&ns, &client, &bus.address).await;
        let log = d.log_text();
        assert_warm_line(&log);
        assert!(
            !log.contains("instead of answering from the warm cache"),
            "{log}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_returns_when_the_helpers_cache_is_warm() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let ns = Netns::new("dc-hwarm");
        ns.run("sysctl", &["-qw", "net.netfilter.nf_conntrack_events=1"]);
        let bus = TestBus::new("dc-hwarm");
        let state = scratch_dir("dc-hwarm-state");
        let sock = state.path().join("helper.sock");
        let _helper = spawn_helper(&ns, state.path(), &sock);
        let client = bus.connect().await;
        let o = DaemonOpts::new(&bus.address, state.path())
            .capless()
            .helper_socket(&sock);
        let d = DaemonProc::start(o, &client).await;
        save_right_after_register_is_from_the_base(&ns, &client, &bus.address).await;
        assert_warm_line(&d.log_text());
    })
    .await
    .expect("test timed out");
}

/// Entries made while the namespace's nf_conntrack_events was 0 never
/// report events: they still migrate exactly, and the journal says why
/// the Save was slow and what to change, at Register and at the Save.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_entries_are_explained_in_the_journal() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let ns = Netns::new("dc-silent");
        let ct = Ctnetlink::open_in_netns(Path::new(&ns.path())).unwrap();
        ns.run("sysctl", &["-qw", "net.netfilter.nf_conntrack_events=0"]);
        let silent = population::generate(Spec::new(3000, MARK, 83)).vm_entries;
        let r = ct.create(&silent).expect("create");
        assert_eq!(r.created, 3000, "{r:?}");
        ns.run("sysctl", &["-qw", "net.netfilter.nf_conntrack_events=1"]);
        let bus = TestBus::new("dc-silent");
        let state = scratch_dir("dc-silent-state");
        let client = bus.connect().await;
        let mut o = DaemonOpts::new(&bus.address, state.path());
        o.netns = Some(&ns.name);
        let d = DaemonProc::start(o, &client).await;
        let vm = register(&client, &bus.address, "100").await;
        let (saved, source) = vm.save().await;
        assert_eq!(saved.len(), 3000);
        assert_same(&saved, &ns);
        let log = d.log_text();
        let reg = log
            .lines()
            .find(|l| l.contains("Register of VM 100: Id "))
            .unwrap_or_else(|| panic!("no Register line: {log}"));
        assert!(
            reg.contains("3000 of them silent (they never reported a conntrack event")
                || reg.contains("but 3000 of its 3000 entries never reported conntrack events"),
            "{reg}"
        );
        // Whether Save looked the silent entries up or walked the table
        // is the cache's cost estimate; the journal names the cause and
        // the remedy either way.
        let cause = "3000 of VM 100's entries never reported conntrack events (older than \
                     net.netfilter.nf_conntrack_events=1, see docs/packaging.md)";
        let line = log
            .lines()
            .find(|l| l.contains(cause))
            .unwrap_or_else(|| panic!("no line naming the cause ({source}): {log}"));
        if source == "dump" {
            assert!(
                line.contains("Save of VM 100 walked the conntrack table (")
                    && line.contains(
                        "instead of answering from the warm cache: 3000 of VM 100's entries"
                    )
                    && line.contains("looking each up would have cost more than the walk"),
                "{line}"
            );
        } else {
            assert_eq!(source, "cache");
            assert!(line.contains("; Save looked them up: "), "{line}");
        }
        assert!(line.contains("WARN"), "a warning: {line}");
    })
    .await
    .expect("test timed out");
}

/// The kernel's default nf_conntrack_events=2 (a new namespace's value):
/// the journal says once that it is not 1, naming the sysctl and the doc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sysctl_other_than_1_is_named_once() {
    common::needs!(daemon);
    tokio::time::timeout(T, async {
        let ns = Netns::new("dc-sysctl2");
        ns.run("sysctl", &["-qw", "net.netfilter.nf_conntrack_events=2"]);
        let bus = TestBus::new("dc-sysctl2");
        let state = scratch_dir("dc-sysctl2-state");
        let client = bus.connect().await;
        let mut o = DaemonOpts::new(&bus.address, state.path());
        o.netns = Some(&ns.name);
        let d = DaemonProc::start(o, &client).await;
        add(&ns, "10.1.0.1", 40000);
        register(&client, &bus.address, "100").await;
        register(&client, &bus.address, "101").await;
        let log = d.log_text();
        let warned = |s: &str| log.lines().filter(|l| l.contains(s)).count();
        assert_eq!(
            warned("net.netfilter.nf_conntrack_events is 2 in the VMs' network namespace, not 1"),
            1,
            "{log}"
        );
        assert_eq!(
            warned("net.netfilter.nf_conntrack_events is 2 in this network namespace, not 1"),
            1,
            "{log}"
        );
        assert!(log.contains("(see docs/packaging.md)"), "{log}");
    })
    .await
    .expect("test timed out");
}

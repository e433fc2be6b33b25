//! Load of a state saved long before (a snapshot or a saved VM restored
//! later, `docs/state-format.md` §1.3) through the service core's Load,
//! against the kernel's conntrack in throw-away namespaces: every timeout
//! the kernel holds afterwards is shorter by the time since Save, entries
//! that ran out meanwhile are not created and are counted as expired, and
//! a state saved just now keeps its timeouts.
//!
//! The saved-at time is given to the encoder (three hours ago), nothing
//! waits for time to pass.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::compare::{compare, Tolerance};
use common::netns::Netns;
use common::population::{self, Spec};
use conntrack_vmstate::access::ConntrackAccess;
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::{status, Entry, Selector};
use conntrack_vmstate::format::{self, EncodeOptions};
use conntrack_vmstate::service::{Engine, OpReport, OptValue, VmConfig, VmRuntime};

const MARK: u32 = 100;
const THREE_HOURS: u64 = 3 * 3600;
/// The kernel counts down between Load and the dump that checks it, and
/// the Load itself may run a second or two after the encode on a busy
/// machine.
const SLACK_SECS: u32 = 5;

fn ct(ns: &Netns) -> Ctnetlink {
    Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink in namespace")
}

fn vm() -> Arc<VmRuntime> {
    let cfg = VmConfig::from_options("100", &[("mark".to_string(), OptValue::U32(MARK))])
        .expect("config");
    Arc::new(VmRuntime::new(cfg))
}

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

/// The VM's entries of the realistic mix, dumped from a source namespace
/// (real kernel entries: short UDP/DNS/ICMP and closing TCP of minutes, TCP
/// established of days, some FIXED_TIMEOUT).
fn saved_entries(tag: &str, seed: u64) -> Vec<Entry> {
    let src = Netns::new(tag);
    let pop = population::generate(Spec::new(3000, MARK, seed));
    population::load(&src.name, &pop);
    let saved = ct(&src).dump(&Selector::mark(MARK)).expect("dump source");
    assert_eq!(saved.len(), pop.vm_count());
    saved
}

/// Loads `blob` into a fresh namespace through the engine; the report and
/// what the kernel then holds of the VM.
async fn load(tag: &str, blob: Vec<u8>) -> (OpReport, Vec<Entry>) {
    let dst = Netns::new(tag);
    population::enable_labels(&dst.name);
    let access: Arc<dyn ConntrackAccess> = Arc::new(ct(&dst));
    let engine = Engine::new(access, Duration::from_secs(2), Duration::from_secs(2));
    let vm = vm();
    engine.load(&vm, blob).await;
    let r = wait_complete(&vm, Duration::from_secs(120)).await;
    let copy = ct(&dst)
        .dump(&Selector::mark(MARK))
        .expect("dump destination");
    (r, copy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_saved_three_hours_ago_loads_aged_without_the_expired() {
    common::needs!(kernel);
    let saved = saved_entries("age-src", 0xa9ed);
    let saved_at = format::wall_clock_us() - THREE_HOURS * 1_000_000;
    let blob = format::encode_at(&saved, &EncodeOptions::default(), Some(saved_at))
        .expect("encode")
        .bytes;
    let (r, copy) = load("age-dst", blob).await;
    assert_eq!(r.error, "", "{r:?}");
    // The Load ran within seconds of the encode: the age is three hours.
    let age = r.age_secs;
    assert!(
        (THREE_HOURS..THREE_HOURS + u64::from(SLACK_SECS)).contains(&age),
        "aged by {age} s: {r:?}"
    );
    let age = age as u32;
    let (alive, expired): (Vec<&Entry>, Vec<&Entry>) = saved.iter().partition(|e| e.timeout > age);
    assert!(
        !alive.is_empty() && !expired.is_empty(),
        "the population must have entries on both sides of three hours"
    );
    assert!(
        alive.iter().any(|e| e.status & status::FIXED_TIMEOUT != 0),
        "FIXED_TIMEOUT entries among the aged"
    );
    assert_eq!(
        (r.entries, r.expired, r.created, r.existed, r.refused),
        (
            saved.len() as u64,
            expired.len() as u64,
            alive.len() as u64,
            0,
            0
        ),
        "{r:?}"
    );
    assert_eq!((r.foreign, r.rejected, r.over_cap), (0, 0, 0), "{r:?}");
    // Exactly the entries with more than three hours left, each with
    // three hours less, every other attribute as saved.
    let want: Vec<Entry> = alive
        .iter()
        .map(|e| Entry {
            timeout: e.timeout - age,
            ..(*e).clone()
        })
        .collect();
    let diffs = compare(&want, &copy, Tolerance::exact_status(SLACK_SECS));
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    assert_eq!(copy.len(), alive.len());
    // The kernel only counts down: nothing may have more than aged left.
    for c in &copy {
        let w = want
            .iter()
            .find(|w| w.orig == c.orig && w.zone == c.zone)
            .expect("compared above");
        assert!(c.timeout <= w.timeout, "{c:?} has more than {}", w.timeout);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_saved_now_loads_with_its_timeouts() {
    common::needs!(kernel);
    let saved = saved_entries("now-src", 0x50ed);
    let blob = format::encode(&saved, &EncodeOptions::default())
        .expect("encode")
        .bytes;
    assert!(format::decode(&blob).unwrap().saved_at.is_some());
    let (r, copy) = load("now-dst", blob).await;
    assert_eq!(r.error, "", "{r:?}");
    assert_eq!(
        (r.entries, r.created, r.expired, r.age_secs),
        (saved.len() as u64, saved.len() as u64, 0, 0),
        "{r:?}"
    );
    let diffs = compare(&saved, &copy, Tolerance::exact_status(SLACK_SECS));
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

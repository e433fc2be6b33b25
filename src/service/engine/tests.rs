//! Save's and Load's guarantees over an in-memory table: what QEMU is
//! promised (Save never fails, is never empty, never over QEMU's limit,
//! answers by its deadline; Load never fails and reports what it did) and
//! what Unregister and a stop rely on (flush, restores that finish or are
//! handed over). The same paths over the kernel's table are in
//! tests/kernel/load_budget.rs and tests/daemon/.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::service::fakes::population;
use crate::service::fakes::{Events, FakeAccess, SaveFault};
use crate::service::options::{OptValue, VmConfig};

const MARK: u32 = 100;

fn vm(mark: u32) -> Arc<VmRuntime> {
    let cfg = VmConfig::from_options(
        &mark.to_string(),
        &[("mark".to_string(), OptValue::U32(mark))],
    )
    .expect("config");
    Arc::new(VmRuntime::new(cfg))
}

/// 50 entries of the VM (mark 100) and 10 of another (mark 7).
fn table() -> Arc<FakeAccess> {
    let access = FakeAccess::new(Events::default());
    access.insert(&population(50, 1, MARK));
    access.insert(&population(10, 2, 7));
    access
}

fn engine(access: &Arc<FakeAccess>, deadline_ms: u64, budget_ms: u64) -> Engine {
    Engine::new(
        access.clone(),
        Duration::from_millis(deadline_ms),
        Duration::from_millis(budget_ms),
    )
}

fn decoded_len(bytes: &[u8]) -> usize {
    format::decode(bytes)
        .expect("Save's answer decodes")
        .entries
        .len()
}

fn blob(n: usize, seed: u64) -> Vec<u8> {
    let enc = format::encode(
        &population(n, seed, MARK),
        &EncodeOptions {
            limit: QEMU_LIMIT,
            format: format::Format::Binary,
        },
    )
    .expect("encode");
    assert_eq!(enc.dropped, 0);
    enc.bytes
}

/// Waits (bounded) until the background part of the last Load ended.
async fn complete(vm: &VmRuntime) -> OpReport {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let r = vm.last_load().expect("LastLoad");
        if !r.pending && !vm.restore_running() {
            return r;
        }
        assert!(Instant::now() < end, "restore never completed: {r:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn save_encodes_exactly_the_vms_entries_and_keeps_their_ids() {
    let access = table();
    let (e, rt) = (engine(&access, 2000, 3), vm(MARK));
    let bytes = e.save(&rt).await;
    assert_eq!(decoded_len(&bytes), 50);
    let r = rt.last_save().expect("LastSave");
    assert_eq!(
        (
            r.entries,
            r.dropped,
            r.bytes,
            r.error.as_str(),
            r.source.as_str()
        ),
        (50, 0, bytes.len() as u64, "", "dump")
    );
    assert_eq!(rt.saved_len(), 50);
}

#[tokio::test]
async fn save_never_fails_and_never_answers_empty() {
    let access = table();
    let (e, rt) = (engine(&access, 2000, 3), vm(MARK));
    e.save(&rt).await;
    assert_eq!(rt.saved_len(), 50);
    *access.save_fault.lock().unwrap() = SaveFault::Fail;
    let bytes = e.save(&rt).await;
    assert!(!bytes.is_empty() && bytes.len() <= QEMU_LIMIT);
    assert_eq!(decoded_len(&bytes), 0);
    let r = rt.last_save().expect("LastSave");
    assert_eq!(
        r.error,
        "dump failed: conntrack helper unavailable: injected dump failure; sent an empty state"
    );
    assert_eq!(
        (r.entries, r.bytes, r.source.as_str()),
        (0, bytes.len() as u64, "")
    );
    // A flush after a degraded Save must not delete the earlier Save's
    // entries: this Save took none.
    assert_eq!(rt.saved_len(), 0);

    *access.save_fault.lock().unwrap() = SaveFault::Bytes(Vec::new());
    let bytes = e.save(&rt).await;
    assert_eq!(decoded_len(&bytes), 0);
    assert_eq!(
        rt.last_save().unwrap().error,
        "encoder returned 0 bytes, outside 1..=1048576; sent an empty state"
    );
}

#[tokio::test]
async fn save_never_answers_more_than_qemus_limit() {
    let access = table();
    let (e, rt) = (engine(&access, 2000, 3), vm(MARK));
    *access.save_fault.lock().unwrap() = SaveFault::Bytes(vec![1; QEMU_LIMIT + 1]);
    let bytes = e.save(&rt).await;
    assert!(
        !bytes.is_empty() && bytes.len() <= QEMU_LIMIT,
        "{}",
        bytes.len()
    );
    assert_eq!(decoded_len(&bytes), 0);
    assert_eq!(
        rt.last_save().unwrap().error,
        "encoder returned 1048577 bytes, outside 1..=1048576; sent an empty state"
    );
    // Exactly the limit is what QEMU accepts, and is passed on as it is.
    *access.save_fault.lock().unwrap() = SaveFault::Bytes(vec![1; QEMU_LIMIT]);
    assert_eq!(e.save(&rt).await.len(), QEMU_LIMIT);
    assert_eq!(rt.last_save().unwrap().error, "");
}

#[tokio::test]
async fn save_answers_an_empty_state_at_its_deadline() {
    let access = table();
    let (e, rt) = (engine(&access, 50, 3), vm(MARK));
    *access.save_fault.lock().unwrap() = SaveFault::Delay(Duration::from_millis(800));
    let t = Instant::now();
    let bytes = e.save(&rt).await;
    let took = t.elapsed();
    assert!(took < Duration::from_millis(700), "Save took {took:?}");
    assert_eq!(decoded_len(&bytes), 0);
    let r = rt.last_save().expect("LastSave");
    assert_eq!(
        r.error,
        "dump and encode did not finish within the 50 ms save deadline; sent an empty state"
    );
    assert!(r.duration_us >= 50_000, "{}", r.duration_us);
}

#[tokio::test]
async fn load_refuses_empty_oversized_and_invalid_states_creating_nothing() {
    let access = FakeAccess::new(Events::default());
    let (e, rt) = (engine(&access, 2000, 1000), vm(MARK));
    e.load(&rt, Vec::new()).await;
    let r = rt.last_load().expect("LastLoad");
    assert_eq!(r.error, "empty state (0 bytes): nothing to load");
    assert_eq!((r.bytes, r.pending), (0, false));

    e.load(&rt, vec![1; QEMU_LIMIT + 1]).await;
    assert_eq!(
        rt.last_load().unwrap().error,
        "state is 1048577 bytes, more than QEMU's limit of 1048576: nothing loaded"
    );

    let mut cut = blob(100, 3);
    cut.truncate(cut.len() / 2);
    e.load(&rt, cut.clone()).await;
    let r = rt.last_load().unwrap();
    assert!(
        r.error.starts_with("invalid state, nothing loaded: "),
        "{}",
        r.error
    );
    assert_eq!((r.entries, r.created, r.bytes), (0, 0, cut.len() as u64));
    assert_eq!(access.len(), 0);
    assert!(access.events.take().is_empty(), "nothing may be created");
}

#[tokio::test]
async fn load_within_its_budget_reports_created_and_existed() {
    let access = FakeAccess::new(Events::default());
    let (e, rt) = (engine(&access, 2000, 5000), vm(MARK));
    let b = blob(300, 4);
    e.load(&rt, b.clone()).await;
    let r = rt.last_load().expect("LastLoad");
    assert_eq!(
        (r.entries, r.created, r.created_sync, r.existed, r.refused),
        (300, 300, 300, 0, 0)
    );
    assert_eq!(
        (r.pending, r.error.as_str(), r.bytes),
        (false, "", b.len() as u64)
    );
    assert!(r.complete_us >= r.duration_us);
    assert_eq!(access.len(), 300);
    assert!(!access.events.take().contains(&"background".to_string()));

    // The same state again: every entry is there already and stays.
    e.load(&rt, b).await;
    let r = rt.last_load().unwrap();
    assert_eq!((r.entries, r.created, r.existed), (300, 0, 300));
    assert_eq!(access.len(), 300);
}

#[tokio::test]
async fn load_past_its_budget_answers_then_finishes_in_the_background() {
    let access = FakeAccess::new(Events::default());
    let (e, rt) = (engine(&access, 2000, 0), vm(MARK));
    e.load(&rt, blob(3000, 5)).await;
    // A zero budget still creates the first, most valuable batch before
    // answering.
    let answered = rt.last_load().expect("LastLoad");
    assert_eq!(answered.created_sync, 128);
    let r = complete(&rt).await;
    assert_eq!(
        (r.entries, r.created, r.created_sync, r.existed, r.pending),
        (3000, 3000, 128, 0, false)
    );
    assert_eq!(r.error, "");
    assert!(r.complete_us >= r.duration_us);
    assert_eq!(access.len(), 3000);
    let ev = access.events.take();
    assert_eq!(ev.first().map(String::as_str), Some("create 128"));
    assert!(ev.contains(&"background".to_string()), "{ev:?}");
}

/// 3000 entries in three segments of 1000, the third replaced by one that
/// decodes to no columns (what only a broken or hostile encoder sends; the
/// checksum is right), or not.
fn three_segments(spoil: bool) -> Vec<u8> {
    let v = population(3000, 8, MARK);
    let r = format::rank_views(
        &v.iter()
            .map(|e| format::View::new(format::Rec::Full(e), e.timeout))
            .collect::<Vec<_>>(),
    );
    let mark = format::views_default_mark(&r);
    let mut frames = format::encode_frames(&r, 3, mark).expect("frames");
    if spoil {
        let raw = vec![0u8; frames[2].raw_len as usize];
        frames[2].bytes = zstd::bulk::compress(&raw, 1).expect("zstd");
    }
    format::assemble_patched(&frames, 0, &[], &[], 0, mark).expect("assemble")
}

/// Load validates the first segment before its answer and the rest after:
/// everything arrives from a good blob; from one whose last segment is
/// bad, only what the first segment gave before the answer, and LastLoad
/// says which segment and how much.
#[tokio::test]
async fn load_validates_later_segments_after_its_answer() {
    let access = FakeAccess::new(Events::default());
    // A budget that would create all 3000 at once: the first segment's
    // 1000 are what may be created before the rest is validated.
    let (e, rt) = (engine(&access, 2000, 5000), vm(MARK));
    e.load(&rt, three_segments(false)).await;
    let answered = rt.last_load().expect("LastLoad");
    assert_eq!(answered.created_sync, 1000);
    let r = complete(&rt).await;
    assert_eq!((r.entries, r.created, r.created_sync), (3000, 3000, 1000));
    assert_eq!(r.error, "");
    assert_eq!(access.len(), 3000);

    let access = FakeAccess::new(Events::default());
    let (e, rt) = (engine(&access, 2000, 5000), vm(MARK));
    e.load(&rt, three_segments(true)).await;
    let r = complete(&rt).await;
    assert_eq!((r.entries, r.created, r.created_sync), (3000, 1000, 1000));
    assert!(
        r.error
            .starts_with("invalid state: corrupt state payload: segment 2: payload has 0 columns")
            && r.error.ends_with(
                "; the restore stopped after the 1000 entries of its first segment, handled \
             before the answer"
            ),
        "{}",
        r.error
    );
    assert_eq!(access.len(), 1000);
    assert!(!access.events.take().contains(&"background".to_string()));
}

#[tokio::test]
async fn cancel_restore_stops_the_background_part_and_keeps_what_it_made() {
    let access = FakeAccess::new(Events::default());
    *access.background_delay.lock().unwrap() = Duration::from_millis(100);
    let (e, rt) = (engine(&access, 2000, 0), vm(MARK));
    assert!(!e.cancel_restore(&rt, "nothing runs").await);
    e.load(&rt, blob(20_000, 6)).await;
    assert!(rt.last_load().unwrap().pending);
    assert!(e.cancel_restore(&rt, "the test stops it").await);
    assert!(!rt.restore_running());
    let r = rt.last_load().unwrap();
    let made = access.len() as u64;
    assert_eq!(
        r.error,
        format!("restore stopped after {made} of 20000 entries: the test stops it")
    );
    assert!((128..20_000).contains(&made), "{made}");
    assert_eq!((r.created, r.pending), (made, false));
    // Nothing runs any more: a second cancel finds nothing.
    assert!(!e.cancel_restore(&rt, "again").await);
}

#[tokio::test]
async fn a_newer_load_stops_the_running_restore_first() {
    let access = FakeAccess::new(Events::default());
    *access.background_delay.lock().unwrap() = Duration::from_millis(100);
    let (e, rt) = (engine(&access, 2000, 0), vm(MARK));
    e.load(&rt, blob(20_000, 7)).await;
    assert!(rt.restore_running());
    *access.background_delay.lock().unwrap() = Duration::ZERO;
    e.load(&rt, blob(200, 8)).await;
    let r = complete(&rt).await;
    assert_eq!((r.entries, r.error.as_str()), (200, ""));
}

#[tokio::test]
async fn flush_deletes_exactly_the_saved_entries() {
    let access = table();
    let (e, rt) = (engine(&access, 2000, 3), vm(MARK));
    // Nothing saved: nothing deleted, nothing asked of the table.
    assert_eq!(e.flush(&rt).await.unwrap(), DeleteReport::default());
    e.save(&rt).await;
    // An entry made after the Save is not the Save's to delete.
    access.insert(&population(1, 9, MARK));
    let r = e.flush(&rt).await.expect("flush");
    assert_eq!((r.deleted, r.missing), (50, 0));
    assert_eq!(access.len(), 11);
    assert_eq!(rt.saved_len(), 0);
}

#[tokio::test]
async fn a_failed_flush_keeps_the_saved_ids() {
    let access = table();
    let (e, rt) = (engine(&access, 2000, 3), vm(MARK));
    e.save(&rt).await;
    access.fail_delete.store(true, Ordering::SeqCst);
    let err = e.flush(&rt).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "flushing the saved entries of VM '100' failed: \
         conntrack helper unavailable: injected delete failure"
    );
    assert_eq!(rt.saved_len(), 50);
    assert_eq!(access.len(), 60);
}

#[tokio::test]
async fn saved_ids_survive_a_restart_through_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let access = table();
    let e = engine(&access, 2000, 3).with_store(Store::new(dir.path()));
    let rt = vm(MARK);
    e.save(&rt).await;
    // Written off the downtime, a little later.
    let store = Store::new(dir.path());
    let end = Instant::now() + Duration::from_secs(10);
    while store.load_ids("100").unwrap().len() != 50 {
        assert!(Instant::now() < end, "ids never written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = vm(MARK);
    e.restore_saved(&again);
    assert_eq!(again.saved(), rt.saved());
    e.forget_saved(&again).await;
    assert!(store.load_ids("100").unwrap().is_empty());
    assert_eq!(again.saved_len(), 0);
}

#[tokio::test]
async fn a_restore_waits_out_a_helper_that_is_away_and_loses_nothing() {
    let access = FakeAccess::new(Events::default());
    // The answer's first batch and four more calls find no helper (it is
    // being restarted); the restore goes on once it is back.
    access.fail_creates.store(5, Ordering::SeqCst);
    let (e, rt) = (engine(&access, 2000, 0), vm(MARK));
    e.load(&rt, blob(20_000, 9)).await;
    let r = complete(&rt).await;
    assert_eq!(
        (r.entries, r.created, r.existed, r.error.as_str()),
        (20_000, 20_000, 0, ""),
        "{r:?}"
    );
    assert_eq!(access.len(), 20_000);
    let ev = access.events.take();
    assert_eq!(
        ev.iter().filter(|e| *e == "create failed").count(),
        5,
        "{ev:?}"
    );
}

#[tokio::test]
async fn a_flush_deletes_both_entries_of_a_shared_id_and_counts_it_once() {
    let access = FakeAccess::new(Events::default());
    let two = population(3, 11, MARK);
    // CTA_ID is a 32-bit hash: among 100k entries two usually share one.
    access.insert_with_id(&two[0], 7);
    access.insert_with_id(&two[1], 7);
    access.insert_with_id(&two[2], 8);
    let (e, rt) = (engine(&access, 2000, 3), vm(MARK));
    e.save(&rt).await;
    assert_eq!(rt.saved(), [7, 7, 8]);
    let r = e.flush(&rt).await.expect("flush");
    assert_eq!((r.deleted, r.missing), (3, 0));
    assert_eq!(access.len(), 0);
}

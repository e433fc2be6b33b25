//! Load's progressive validation (`format::stream_progressive`): of a blob
//! with several segments only the first (with a patch's deltas) is
//! validated before the first entries are handed out; `complete` validates
//! the rest. For blobs of our encoder the entries come out in exactly the
//! order of a whole check; a bad later segment is found by `complete`,
//! which then ends the stream; the encoder's head segment keeps the part
//! validated first small.

use common::entries::entry;
use conntrack_vmstate::entry::Entry;
use conntrack_vmstate::format::{
    self, priority, testing, EncodeOptions, FormatError, Rec, View, HEAD_ENTRIES,
};
use proptest::prelude::*;

/// Views of `v` in priority order (what `encode_frames` takes).
fn ranked(v: &[Entry]) -> Vec<View<'_>> {
    priority::priority_order(v)
        .into_iter()
        .map(|i| View::new(Rec::Full(&v[i]), v[i].timeout))
        .collect()
}

fn reseal(b: &mut [u8]) {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..28]), &b[32..]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
}

/// Not aged: Load at the time the blob says it was saved.
fn at_save(blob: &[u8]) -> u64 {
    testing::check_header(blob).unwrap().saved_at.unwrap_or(0)
}

fn drain(s: &mut format::Stream, n: usize) -> Vec<Entry> {
    let mut got = Vec::new();
    while let Some(b) = s.next_batch(n) {
        got.extend(b.expect("batch of a validated part"));
    }
    got
}

/// Hands out up to `before` entries (in batches of `batch`) before
/// `complete`, the rest after; checks the pending state on the way and
/// returns everything, with how many came out before `complete`.
fn progressive(blob: &[u8], before: usize, batch: usize) -> (Vec<Entry>, usize) {
    let mut s = format::stream_progressive(blob, usize::MAX, at_save(blob)).unwrap();
    let mut got = Vec::new();
    while got.len() < before {
        match s.next_batch(batch.min(before - got.len())) {
            Some(b) => got.extend(b.unwrap()),
            None => break,
        }
    }
    let early = got.len();
    s.complete(blob).unwrap();
    assert!(!s.is_pending());
    got.extend(drain(&mut s, batch));
    (got, early)
}

fn whole(blob: &[u8], batch: usize) -> Vec<Entry> {
    drain(&mut format::stream(blob).unwrap(), batch)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A segmented blob of our encoder: the first segment only, then the
    /// rest, gives exactly the whole check's order; never more than the
    /// first segment's entries before `complete`.
    #[test]
    fn segmented_blob_streams_as_a_whole_check_does(
        v in prop::collection::vec(entry(), 2..120),
        k in 2usize..6,
        before in 0usize..200,
        batch in 1usize..40,
    ) {
        let r = ranked(&v);
        let mark = format::views_default_mark(&r);
        let blob = testing::encode_segmented_at(&r, k, 0, mark, Some(1_700_000_000_000_000)).unwrap();
        let s = format::stream_progressive(&blob, usize::MAX, at_save(&blob)).unwrap();
        prop_assert!(s.is_pending(), "{} segments: the rest is left for complete", k.min(v.len()));
        let first = v.len() / k.min(v.len()) + usize::from(v.len() % k.min(v.len()) > 0);
        let (got, early) = progressive(&blob, before, batch);
        prop_assert!(early <= first, "{early} entries before complete, the first segment holds {first}");
        prop_assert_eq!(early, before.min(first));
        prop_assert_eq!(got, whole(&blob, batch));
    }

    /// A patched blob (the warm cache's Save): the first base segment and
    /// the delta first, merged, then everything: exactly the whole check's
    /// order.
    #[test]
    fn patched_blob_streams_as_a_whole_check_does(
        a in prop::collection::vec(entry(), 2..150),
        added in prop::collection::vec(entry(), 0..40),
        skip_every in 2usize..9,
        k in 2usize..5,
        age in 0u32..=60,
        before in 0usize..200,
        batch in 1usize..40,
    ) {
        // As the cache builds a base: every timeout leaves room for the age.
        let a: Vec<Entry> = a.into_iter().map(|e| Entry { timeout: 71 + e.timeout % 100_000, id: None, ..e }).collect();
        let added: Vec<Entry> = added.into_iter().map(|e| Entry { id: None, ..e }).collect();
        let base_views = ranked(&a);
        let mark = format::views_default_mark(&base_views);
        let base = format::encode_frames(&base_views, k, mark).unwrap();
        let skip: Vec<u32> = (0..a.len() as u32).filter(|i| *i as usize % skip_every == 1).collect();
        let delta = format::encode_frames(&ranked(&added), 1, mark).unwrap();
        let blob = format::assemble_patched(&base, age, &skip, &delta, 0, mark).unwrap();
        let (got, early) = progressive(&blob, before, batch);
        let first = base[0].count as usize - skip.iter().filter(|&&s| s < base[0].count).count();
        prop_assert!(early <= first + added.len());
        prop_assert_eq!(got, whole(&blob, batch));
    }
}

/// The encoder's head segment: a base of 4 × HEAD_ENTRIES or more in
/// several frames starts with a frame of HEAD_ENTRIES; smaller ones and
/// single frames stay as they were; Save's whole encode of a large set
/// starts with it too.
#[test]
fn large_encodes_start_with_a_head_segment() {
    let v = common::population::entries(4 * HEAD_ENTRIES + 10, 7, 100);
    let r = ranked(&v);
    let mark = format::views_default_mark(&r);
    let f = format::encode_frames_headed(&r, 2, mark).unwrap();
    let counts: Vec<u32> = f.iter().map(|f| f.count).collect();
    let rest = (r.len() - HEAD_ENTRIES) as u32;
    assert_eq!(counts, vec![HEAD_ENTRIES as u32, rest - rest / 2, rest / 2]);
    // One frame asked for: one frame.
    assert_eq!(format::encode_frames_headed(&r, 1, mark).unwrap().len(), 1);
    // Below 4 × HEAD_ENTRIES: balanced as encode_frames.
    let small = &r[..4 * HEAD_ENTRIES - 1];
    let counts: Vec<u32> = format::encode_frames_headed(small, 2, mark)
        .unwrap()
        .iter()
        .map(|f| f.count)
        .collect();
    assert_eq!(counts, vec![8192, 8191]);
    // The frames are still one priority order: a patch of them decodes to
    // the same entries as the views.
    let blob = format::assemble_patched(&f, 0, &[], &[], 0, mark).unwrap();
    let got = whole(&blob, 1000);
    let want: Vec<Entry> = r.iter().map(|v| v.rec.to_entry(v.timeout)).collect();
    assert_eq!(got, want);

    // Save's whole encode (no limit hit) on a machine with 2 or more CPUs
    // segments a set this size: then the head comes first.
    let blob = format::encode(&v, &EncodeOptions::default()).unwrap().bytes;
    let h = testing::check_header(&blob).unwrap();
    if h.flags & testing::FLAG_SEGMENTS != 0 {
        let first = u32::from_le_bytes(blob[33..37].try_into().unwrap());
        assert_eq!(
            first as usize, HEAD_ENTRIES,
            "first segment of the whole encode"
        );
    }
}

/// A blob whose first segment is valid and whose last is not (checksum
/// repaired, as only a broken or hostile encoder would send it): the first
/// segment's entries are handed out, `complete` names the bad segment and
/// nothing more comes out; a whole check refuses the blob outright. Asking
/// `complete` with another blob is refused too.
#[test]
fn a_bad_later_segment_is_found_by_complete() {
    let v = common::population::entries(3000, 5, 100);
    let r = ranked(&v);
    let mark = format::views_default_mark(&r);
    let good = testing::encode_segmented_at(&r, 3, 0, mark, Some(1_700_000_000_000_000)).unwrap();
    let mut bad = good.clone();
    let table = 33;
    let stored = |i: usize| {
        let row = table + 12 * i;
        u32::from_le_bytes(bad[row + 8..row + 12].try_into().unwrap()) as usize
    };
    let third = table + 12 * 3 + stored(0) + stored(1);
    // Replace the third segment's zstd frame by one of a payload that
    // declares no columns (same raw length, so the table still adds up).
    let raw_len = {
        let row = table + 12 * 2;
        u32::from_le_bytes(bad[row + 4..row + 8].try_into().unwrap()) as usize
    };
    let junk = zstd::bulk::compress(&vec![0u8; raw_len], 1).unwrap();
    // The saved-at frame follows the last segment's zstd frame and counts
    // in its stored length: it stays.
    let frame = zstd_frame_len(&good[third..]);
    let trailer = stored(2) - frame;
    bad.splice(third..third + frame, junk.iter().copied());
    let row = table + 12 * 2;
    bad[row + 8..row + 12].copy_from_slice(&((junk.len() + trailer) as u32).to_le_bytes());
    let payload = (bad.len() - 32) as u32;
    bad[24..28].copy_from_slice(&payload.to_le_bytes());
    reseal(&mut bad);
    let whole_err = format::stream(&bad).unwrap_err();
    assert!(whole_err.to_string().contains("segment 2"), "{whole_err}");

    let mut s = format::stream_progressive(&bad, usize::MAX, at_save(&bad)).unwrap();
    let first = drain(&mut s, 128);
    assert_eq!(first.len(), 1000, "the first segment's entries");
    assert_eq!(first, whole(&good, 128)[..1000].to_vec());
    let err = s.complete(&bad).unwrap_err();
    assert!(matches!(err, FormatError::Corrupt(_)), "{err:?}");
    assert!(err.to_string().contains("segment 2"), "{err}");
    assert!(
        s.next_batch(128).is_none(),
        "nothing after a failed complete"
    );
    // Completing is idempotent once done, and refuses another blob.
    assert!(s.complete(&bad).is_ok());
    let mut s = format::stream_progressive(&good, usize::MAX, at_save(&good)).unwrap();
    let err = s.complete(&bad).unwrap_err();
    assert!(err.to_string().contains("another blob"), "{err}");
}

/// Length of the zstd frame at the start of `b` (its content size is in
/// its header, so the frame ends where decompression stops).
fn zstd_frame_len(b: &[u8]) -> usize {
    zstd::zstd_safe::find_frame_compressed_size(b).unwrap()
}

/// Aged (a state loaded long after its Save) or a single segment: a whole
/// check, nothing left pending.
#[test]
fn aged_or_single_segment_states_are_checked_whole() {
    let v = common::population::entries(500, 9, 100);
    let r = ranked(&v);
    let mark = format::views_default_mark(&r);
    let saved = 1_700_000_000_000_000u64;
    let blob = testing::encode_segmented_at(&r, 3, 0, mark, Some(saved)).unwrap();
    let later = saved + 3_600 * 1_000_000;
    let s = format::stream_progressive(&blob, usize::MAX, later).unwrap();
    assert!(!s.is_pending());
    assert_eq!(s.age_secs, 3_600);
    let one = testing::encode_segmented_at(&r, 1, 0, mark, Some(saved)).unwrap();
    assert!(!format::stream_progressive(&one, usize::MAX, saved)
        .unwrap()
        .is_pending());
    let s = format::stream_progressive(&blob, usize::MAX, saved).unwrap();
    assert!(s.is_pending());
}

/// A busy VM's Save: most of the first base segment's records changed
/// since the base, so they are skipped there and carried by the delta,
/// ranking above the rest. Those delta records may come out before
/// `complete` too (they precede every later base record), in the whole
/// check's order.
#[test]
fn changed_top_entries_in_the_delta_come_out_before_complete() {
    let v = common::population::entries(3000, 13, 100);
    let r = ranked(&v);
    let mark = format::views_default_mark(&r);
    let base = format::encode_frames(&r, 3, mark).unwrap();
    // 900 of the first segment's 1000 records changed: their entries now
    // have a day more left, which ranks them first.
    let skip: Vec<u32> = (0..900).collect();
    let changed: Vec<Entry> = r[..900]
        .iter()
        .map(|w| {
            let mut e = w.rec.to_entry(w.timeout);
            e.timeout += 86_400;
            e
        })
        .collect();
    let delta = format::encode_frames(&ranked(&changed), 1, mark).unwrap();
    let blob = format::assemble_patched(&base, 0, &skip, &delta, 0, mark).unwrap();
    let mut s = format::stream_progressive(&blob, usize::MAX, at_save(&blob)).unwrap();
    assert!(s.is_pending());
    let early = drain(&mut s, 64);
    // The 100 kept records of the first segment and the changed ones that
    // outrank its last kept record.
    assert!(early.len() > 100, "{} before complete", early.len());
    assert!(early.len() <= 1000, "{} before complete", early.len());
    s.complete(&blob).unwrap();
    let mut got = early;
    got.extend(drain(&mut s, 64));
    assert_eq!(got.len(), 3000);
    assert_eq!(got, whole(&blob, 64));
}

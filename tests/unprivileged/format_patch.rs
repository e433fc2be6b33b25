//! Patched blobs (state format v1.2, `docs/state-format.md` §1.2): a
//! pre-encoded base, a skip list, the base's age and a delta decode to
//! exactly the state they describe, through every reader; every defect of
//! the patch block is refused with its own message.

use common::entries::entry;
use conntrack_vmstate::entry::Entry;
use conntrack_vmstate::format::{
    self, priority, sort_by_priority, testing, FormatError, Frame, Rec, View,
};
use proptest::prelude::*;

/// Views of `v` in priority order (what `encode_frames` takes).
fn ranked(v: &[Entry]) -> Vec<View<'_>> {
    priority::priority_order(v)
        .into_iter()
        .map(|i| View::new(Rec::Full(&v[i]), v[i].timeout))
        .collect()
}

/// `v` without ids, in a canonical order: multiset comparison.
fn canon(v: &[Entry]) -> Vec<String> {
    let mut s: Vec<String> = v
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.id = None;
            format!("{e:?}")
        })
        .collect();
    s.sort();
    s
}

fn reseal(b: &mut [u8]) {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..28]), &b[32..]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Every entry of a stream, checking each batch's size.
fn drain(s: &mut format::Stream, n: usize) -> Vec<Entry> {
    let mut got = Vec::new();
    while let Some(b) = s.next_batch(n) {
        let b = b.expect("batch of a validated blob");
        assert!((1..=n).contains(&b.len()), "batch of {} for {n}", b.len());
        got.extend(b);
    }
    assert!(s.next_batch(n).is_none());
    got
}

/// What happens to one base record between the base and Save.
#[derive(Debug, Clone, Copy)]
enum Fate {
    Keep,
    Remove,
    /// Changed: new timeout and status bits, carried in the delta.
    Change(u32, u32),
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        6 => Just(Fate::Keep),
        2 => Just(Fate::Remove),
        2 => (any::<u32>(), any::<u32>()).prop_map(|(t, s)| Fate::Change(t, s)),
    ]
}

/// Timeouts from a narrow range half of the time, so that keys tie within
/// and across segments (the merge's tie rule is observable).
fn narrow(t: u32, lo: u32) -> u32 {
    lo + t % if t & 1 == 0 { 8 } else { 1_000_000 }
}

/// Base timeouts leave room for any age: the class never changes.
fn base_entry() -> impl Strategy<Value = Entry> {
    entry().prop_map(|mut e| {
        e.timeout = narrow(e.timeout, 71);
        e.id = None;
        e
    })
}

/// Delta entries: their timeouts tie with aged base ones now and then.
fn delta_entry() -> impl Strategy<Value = Entry> {
    entry().prop_map(|mut e| {
        e.timeout = narrow(e.timeout, 11);
        e
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(160))]

    /// The cache's Save: base frames of an older state, then removals,
    /// changes and additions as skips plus a delta. Every reader gives
    /// exactly the new state, base timeouts reduced by the age.
    #[test]
    fn patched_blob_decodes_to_the_mutated_state(
        a in prop::collection::vec(base_entry(), 1..120),
        fates in prop::collection::vec(fate(), 120),
        added in prop::collection::vec(delta_entry(), 0..30),
        k in 1usize..5,
        delta_segs in 1usize..3,
        age in 0u32..=60,
        batch in 1usize..40,
    ) {
        let mark = format::views_default_mark(&ranked(&a));
        let base_views = ranked(&a);
        let base = format::encode_frames(&base_views, k, mark).unwrap();
        prop_assert_eq!(base.len(), k.min(a.len()));
        prop_assert_eq!(base.iter().map(|f| f.count as usize).sum::<usize>(), a.len());
        // Stored index i is base_views[i].
        let mut skip = Vec::new();
        let mut want = Vec::new();
        let mut delta_entries: Vec<Entry> = added.iter().map(|e| Entry { id: None, ..e.clone() }).collect();
        for (i, v) in base_views.iter().enumerate() {
            let e = v.rec.to_entry(v.timeout);
            match fates[i] {
                Fate::Keep => want.push(Entry { timeout: (e.timeout - age).max(1), ..e }),
                Fate::Remove => skip.push(i as u32),
                Fate::Change(t, st) => {
                    skip.push(i as u32);
                    delta_entries.push(Entry { timeout: narrow(t, 11), status: e.status ^ st, ..e });
                }
            }
        }
        want.extend(delta_entries.iter().cloned());
        let delta_views = ranked(&delta_entries);
        let delta = format::encode_frames(&delta_views, delta_segs, mark).unwrap();
        let blob = format::assemble_patched(&base, age, &skip, &delta, 3, mark).unwrap();

        let h = testing::check_header(&blob).unwrap();
        prop_assert_eq!(h.count as usize, want.len());
        prop_assert_eq!(h.minor, testing::MINOR_SAVED_AT);
        prop_assert_eq!(
            h.flags,
            testing::FLAG_SEGMENTS | testing::FLAG_ZSTD | testing::FLAG_PATCH | testing::FLAG_TRUNCATED
                | testing::FLAG_SAVED_AT
        );
        prop_assert!(h.saved_at.is_some());
        prop_assert_eq!(h.dropped, 3);

        let d = format::decode(&blob).unwrap();
        prop_assert_eq!(canon(&d.entries), canon(&want));
        prop_assert!(d.truncated);
        prop_assert_eq!(d.dropped, Some(3));
        // Per segment: its kept records, in its own (priority) order.
        let (_, parts) = testing::decode_segments(&blob).unwrap();
        prop_assert_eq!(parts.len(), base.len() + delta.len());
        for p in &parts {
            prop_assert!(p.is_sorted_by_key(|e| std::cmp::Reverse(priority::value_key(e))));
        }

        let mut s = format::stream(&blob).unwrap();
        prop_assert_eq!(s.len(), want.len());
        prop_assert!(s.truncated);
        let got = drain(&mut s, batch);
        prop_assert_eq!(canon(&got), canon(&want));
        prop_assert!(got.is_sorted_by_key(|e| std::cmp::Reverse(priority::value_key(e))));
        // Ties: the merge is a stable sort of blob order.
        let mut stable = d.entries.clone();
        sort_by_priority(&mut stable);
        prop_assert!(got == stable, "stream order is not the stable priority order");
        let c = testing::check(&blob).unwrap();
        prop_assert!(c.sorted);

        // The same state as a v1.1 blob streams in exactly its blob order.
        let mut wm = want.clone();
        sort_by_priority(&mut wm);
        let wv: Vec<View> = wm.iter().map(|e| View::new(Rec::Full(e), e.timeout)).collect();
        let v11 = testing::encode_segmented(&wv, k, 0, mark).unwrap();
        let blob_order = testing::decode(&v11).unwrap().1;
        let mut s = format::stream(&v11).unwrap();
        prop_assert_eq!(drain(&mut s, batch), blob_order);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(160))]

    /// Base records the age moves into the Worthless class (or down to the
    /// 1-second floor) leave their segment out of priority order: the
    /// stream still hands out exactly a stable priority sort of blob
    /// order, batch by batch, without decoding everything first.
    #[test]
    fn aged_base_out_of_order_still_streams_in_priority_order(
        a in prop::collection::vec(entry(), 1..150),
        skip_every in 2usize..9,
        added in prop::collection::vec(delta_entry(), 0..20),
        k in 1usize..4,
        age in 0u32..=60,
        batch in 1usize..40,
    ) {
        let a: Vec<Entry> = a.into_iter().map(|e| Entry { timeout: e.timeout % 90, id: None, ..e }).collect();
        let base_views = ranked(&a);
        let mark = format::views_default_mark(&base_views);
        let base = format::encode_frames(&base_views, k, mark).unwrap();
        let skip: Vec<u32> = (0..a.len() as u32).filter(|i| *i as usize % skip_every == 1).collect();
        let delta_views = ranked(&added);
        let delta = format::encode_frames(&delta_views, 1, mark).unwrap();
        let blob = format::assemble_patched(&base, age, &skip, &delta, 0, mark).unwrap();
        let c = testing::check(&blob).unwrap();
        prop_assert!(c.sorted);
        let mut want = format::decode(&blob).unwrap().entries;
        prop_assert_eq!(want.len(), a.len() - skip.len() + added.len());
        sort_by_priority(&mut want);
        let mut s = format::stream(&blob).unwrap();
        prop_assert_eq!(drain(&mut s, batch), want);
    }
}

/// Base and delta of a hand-checkable size: 300 entries, the first 200 in
/// two base frames, the other 100 in one delta frame.
fn fixture() -> (Vec<Entry>, Vec<Frame>, Vec<Frame>, u32) {
    let v = common::population::entries(300, 21, 4242);
    let order = priority::priority_order(&v);
    let v: Vec<Entry> = order.into_iter().map(|i| v[i].clone()).collect();
    let views: Vec<View> = v
        .iter()
        .map(|e| View::new(Rec::Full(e), e.timeout))
        .collect();
    let mark = format::views_default_mark(&views);
    assert_eq!(mark, 4242, "by_hand writes this default mark");
    let base = format::encode_frames(&views[..200], 2, mark).unwrap();
    let delta = format::encode_frames(&views[200..], 1, mark).unwrap();
    (v, base, delta, mark)
}

/// A v1.2 blob by hand: `block` (patch block), then the segment table and
/// bodies of `frames`; header count = `count`.
fn by_hand(flags: u16, count: u32, block: &[u8], frames: &[Frame]) -> Vec<u8> {
    let mut payload = block.to_vec();
    payload.push(frames.len() as u8);
    for f in frames {
        payload.extend_from_slice(&f.count.to_le_bytes());
        payload.extend_from_slice(&f.raw_len.to_le_bytes());
        payload.extend_from_slice(&(f.bytes.len() as u32).to_le_bytes());
    }
    for f in frames {
        payload.extend_from_slice(&f.bytes);
    }
    let raw_len: u32 = frames.iter().map(|f| f.raw_len).sum();
    wrap(flags, count, raw_len, &payload)
}

/// Header (mark 4242) around `payload`, checksummed.
fn wrap(flags: u16, count: u32, raw_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"CTVS");
    b.extend_from_slice(&[1, 2]);
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&count.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&4242u32.to_le_bytes());
    b.extend_from_slice(&raw_len.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(payload);
    reseal(&mut b);
    b
}

const PATCHED: u16 = testing::FLAG_SEGMENTS | testing::FLAG_ZSTD | testing::FLAG_PATCH;

/// Patch block: nbase, age, then skips as stored indices (gap coded here).
fn block(nbase: u8, age: u64, skips: &[u64]) -> Vec<u8> {
    let mut b = vec![nbase];
    varint(&mut b, age);
    varint(&mut b, skips.len() as u64);
    let mut next = 0;
    for &s in skips {
        varint(&mut b, s - next);
        next = s + 1;
    }
    b
}

fn frames(base: &[Frame], delta: &[Frame]) -> Vec<Frame> {
    base.iter().chain(delta).cloned().collect()
}

fn corrupt_text(b: &[u8]) -> String {
    let via_stream = match format::stream(b) {
        Err(FormatError::Corrupt(m)) => m,
        other => panic!("stream: expected Corrupt, got {:?}", other.map(|s| s.len())),
    };
    match format::decode(b) {
        Err(FormatError::Corrupt(m)) => {
            assert_eq!(m, via_stream, "decode and stream disagree");
            m
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn hand_built_patch_decodes_per_spec() {
    let (v, base, delta, _) = fixture();
    // Skip stored 0 (base segment 0), 150 and 199 (base segment 1).
    let b = by_hand(
        PATCHED,
        297,
        &block(2, 5, &[0, 150, 199]),
        &frames(&base, &delta),
    );
    assert_eq!(
        b,
        format::assemble_patched_at(&base, 5, &[0, 150, 199], &delta, 0, 4242, None).unwrap(),
        "assemble_patched writes what the spec says"
    );
    let (h, parts) = testing::decode_segments(&b).unwrap();
    assert_eq!(h.count, 297);
    assert_eq!(
        parts.iter().map(Vec::len).collect::<Vec<_>>(),
        [99, 98, 100]
    );
    let aged = |e: &Entry| Entry {
        timeout: e.timeout.saturating_sub(5).max(1),
        id: None,
        ..e.clone()
    };
    let want0: Vec<Entry> = v[1..100].iter().map(aged).collect();
    let want1: Vec<Entry> = v[100..199]
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 50)
        .map(|(_, e)| aged(e))
        .collect();
    assert_eq!(parts[0], want0);
    assert_eq!(parts[1], want1);
    let want2: Vec<Entry> = v[200..]
        .iter()
        .map(|e| Entry {
            id: None,
            ..e.clone()
        })
        .collect();
    assert_eq!(parts[2], want2);
    // A timeout the age would take below 1 stays at 1.
    let b = format::assemble_patched(&base, u32::MAX, &[], &delta, 0, 4242).unwrap();
    let (_, parts) = testing::decode_segments(&b).unwrap();
    assert!(parts[0].iter().chain(&parts[1]).all(|e| e.timeout == 1));
    assert_eq!(parts[2], want2);
}

#[test]
fn base_segment_count_out_of_range_is_refused() {
    let (_, base, delta, _) = fixture();
    let f = frames(&base, &delta);
    assert_eq!(
        corrupt_text(&by_hand(PATCHED, 300, &block(0, 5, &[]), &f)),
        "patch block declares 0 base segments (at least 1)"
    );
    assert_eq!(
        corrupt_text(&by_hand(PATCHED, 300, &block(4, 5, &[]), &f)),
        "patch block declares 4 base segments, the segment table has 3"
    );
    // All three segments as base is fine.
    let d = format::decode(&by_hand(PATCHED, 299, &block(3, 0, &[250]), &f)).unwrap();
    assert_eq!(d.entries.len(), 299);
}

#[test]
fn skips_outside_the_base_are_refused() {
    let (_, base, delta, _) = fixture();
    let f = frames(&base, &delta);
    assert_eq!(
        corrupt_text(&by_hand(PATCHED, 298, &block(2, 5, &[3, 200]), &f)),
        "patch block: skip 1 names stored record 200, in delta segment 2; \
         only the 200 base records can be skipped"
    );
    assert_eq!(
        corrupt_text(&by_hand(PATCHED, 299, &block(2, 5, &[300]), &f)),
        "patch block: skip 0 names stored record 300, beyond the 300 stored records"
    );
    // Base only (no delta): beyond the base is beyond everything.
    assert_eq!(
        corrupt_text(&by_hand(PATCHED, 199, &block(2, 5, &[200]), &base)),
        "patch block: skip 0 names stored record 200, beyond the 200 stored records"
    );
    // A gap that does not fit 32 bits.
    let mut bl = vec![2u8, 5, 1];
    varint(&mut bl, 1 << 32);
    assert_eq!(
        corrupt_text(&by_hand(PATCHED, 299, &bl, &f)),
        "patch block: gap of skip 0 4294967296 exceeds 32 bits"
    );
}

#[test]
fn bad_varints_and_truncated_patch_blocks_are_refused() {
    let (_, base, delta, _) = fixture();
    let f = frames(&base, &delta);
    let mut bl = vec![2u8];
    bl.extend_from_slice(&[0x80; 10]);
    bl.push(0);
    assert_eq!(
        corrupt_text(&by_hand(PATCHED, 300, &bl, &f)),
        "patch block: overlong varint for the age"
    );
    assert_eq!(
        corrupt_text(&by_hand(PATCHED, 300, &block(2, 1 << 32, &[]), &f)),
        "patch block: age 4294967296 exceeds 32 bits"
    );
    let mut bl = vec![2u8, 0];
    varint(&mut bl, 1 << 33);
    assert_eq!(
        corrupt_text(&by_hand(PATCHED, 300, &bl, &f)),
        "patch block: skip count 8589934592 exceeds 32 bits"
    );
    // The payload ends inside the patch block (no table follows).
    for (payload, want) in [
        (&[][..], "patch block: ends inside the base segment count"),
        (&[2][..], "patch block: ends inside the age"),
        (&[2, 0x85][..], "patch block: ends inside the age"),
        (&[2, 5][..], "patch block: ends inside the skip count"),
        (
            &[2, 5, 2, 7][..],
            "patch block: ends inside the gap of skip 1",
        ),
    ] {
        assert_eq!(corrupt_text(&wrap(PATCHED, 0, 0, payload)), want);
    }
    // A patch block and an empty or no segment table.
    assert_eq!(
        corrupt_text(&by_hand(PATCHED, 0, &block(1, 0, &[]), &[])),
        "segment table declares 0 segments (1..=16)"
    );
    assert_eq!(
        corrupt_text(&wrap(PATCHED, 0, 0, &block(1, 0, &[]))),
        "segmented payload without a segment table"
    );
}

#[test]
fn counts_must_add_up_with_the_skips() {
    let (_, base, delta, _) = fixture();
    let f = frames(&base, &delta);
    // Two skips: the header must say 298.
    for count in [300, 299, 297] {
        assert_eq!(
            corrupt_text(&by_hand(PATCHED, count, &block(2, 5, &[1, 2]), &f)),
            format!(
                "segment table adds up to 300 records, {} raw and {} payload bytes; \
                 the header declares {count} entries + 2 skipped, {} and {}",
                f.iter().map(|x| x.raw_len).sum::<u32>(),
                by_hand(PATCHED, count, &block(2, 5, &[1, 2]), &f).len() - 32,
                f.iter().map(|x| x.raw_len).sum::<u32>(),
                by_hand(PATCHED, count, &block(2, 5, &[1, 2]), &f).len() - 32,
            )
        );
    }
    assert_eq!(
        format::decode(&by_hand(PATCHED, 298, &block(2, 5, &[1, 2]), &f))
            .unwrap()
            .entries
            .len(),
        298
    );
}

#[test]
fn patch_flag_needs_segments_and_unknown_required_flags_still_refuse() {
    let (_, base, delta, _) = fixture();
    let f = frames(&base, &delta);
    let b = by_hand(
        testing::FLAG_ZSTD | testing::FLAG_PATCH,
        300,
        &block(2, 5, &[]),
        &f,
    );
    assert_eq!(
        corrupt_text(&b),
        "PATCH flag without SEGMENTS (a patch needs the segment layout)"
    );
    let b = by_hand(PATCHED | 0x0400, 300, &block(2, 5, &[]), &f);
    let err = format::decode(&b).unwrap_err();
    assert!(matches!(err, FormatError::UnknownFlags(0x0400)), "{err:?}");
    assert!(matches!(
        format::stream(&b),
        Err(FormatError::UnknownFlags(0x0400))
    ));
    // What a v1.1 decoder checks: PATCH is in the required half.
    assert_eq!(testing::FLAG_PATCH & 0xff00, testing::FLAG_PATCH);
    assert_eq!(testing::FLAG_PATCH & testing::FLAG_SEGMENTS, 0);
}

#[test]
fn assemble_patched_refuses_what_the_decoder_would() {
    let (_, base, delta, mark) = fixture();
    let err = |r: Result<Vec<u8>, FormatError>| match r {
        Err(FormatError::Patch(m)) => m,
        other => panic!("expected Patch error, got {:?}", other.map(|b| b.len())),
    };
    assert_eq!(
        err(format::assemble_patched(&[], 0, &[], &delta, 0, mark)),
        "no base segment"
    );
    assert_eq!(
        err(format::assemble_patched(&base, 0, &[5, 5], &delta, 0, mark)),
        "skip list not strictly ascending at 5"
    );
    assert_eq!(
        err(format::assemble_patched(&base, 0, &[7, 3], &delta, 0, mark)),
        "skip list not strictly ascending at 3"
    );
    assert_eq!(
        err(format::assemble_patched(&base, 0, &[200], &delta, 0, mark)),
        "skip of stored record 200, beyond the 200 base records"
    );
    let many: Vec<Frame> = (0..9).flat_map(|_| base.clone()).collect();
    assert_eq!(
        err(format::assemble_patched(&many, 0, &[], &[], 0, mark)),
        "18 base and 0 delta segments, at most 16 in all"
    );
    let empty = Frame {
        count: 0,
        raw_len: 0,
        bytes: Vec::new(),
    };
    assert_eq!(
        err(format::assemble_patched(&base, 0, &[], &[empty], 0, mark)),
        "segment 2 holds no entries"
    );
    // Every base record skipped and no delta: an empty state, still valid.
    let all: Vec<u32> = (0..200).collect();
    let b = format::assemble_patched(&base, 0, &all, &[], 0, mark).unwrap();
    assert!(format::decode(&b).unwrap().entries.is_empty());
    let mut s = format::stream(&b).unwrap();
    assert!(s.is_empty());
    assert!(s.next_batch(10).is_none());
}

#[test]
fn encode_frames_splits_balanced_and_clamps() {
    let v = common::population::entries(1_000, 22, 4242);
    let r = ranked(&v);
    let mark = format::views_default_mark(&r);
    assert!(format::encode_frames(&[], 4, mark).unwrap().is_empty());
    for (segs, want) in [
        (0usize, vec![1000u32]),
        (3, vec![334, 333, 333]),
        (40, vec![63; 8].into_iter().chain(vec![62; 8]).collect()),
    ] {
        let f = format::encode_frames(&r, segs, mark).unwrap();
        assert_eq!(f.iter().map(|x| x.count).collect::<Vec<_>>(), want);
    }
    assert_eq!(format::encode_frames(&r[..2], 5, mark).unwrap().len(), 2);
    // The frames are exactly encode_segmented's segments.
    let f = format::encode_frames(&r, 3, mark).unwrap();
    let seg = testing::encode_segmented(&r, 3, 0, mark).unwrap();
    let body: Vec<u8> = f.iter().flat_map(|x| x.bytes.clone()).collect();
    assert!(seg.ends_with(&body));
    assert_eq!(seg.len(), 32 + 1 + 36 + body.len());
}

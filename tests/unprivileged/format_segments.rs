//! Segmented blobs (state format v1.1, `docs/state-format.md` §1.1): the
//! parallel encoding round-trips exactly, in priority order, whatever the
//! segment count; every inconsistency of the segment table is refused
//! before anything is decoded.

use common::entries::entry;
use conntrack_vmstate::entry::Entry;
use conntrack_vmstate::format::{self, sort_by_priority, testing, EncodeOptions, FormatError};
use proptest::prelude::*;

fn expected(mut v: Vec<Entry>) -> Vec<Entry> {
    for e in &mut v {
        e.id = None;
    }
    sort_by_priority(&mut v);
    v
}

fn ranked(v: &[Entry]) -> Vec<format::View<'_>> {
    let views: Vec<format::View> = v
        .iter()
        .map(|e| format::View::new(format::Rec::Full(e), e.timeout))
        .collect();
    format::rank_views(&views)
}

/// Rewrites the checksum after a test changed header or payload bytes, so
/// that the check under test is the one that fails.
fn reseal(b: &mut [u8]) {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..28]), &b[32..]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn corrupt_text(b: &[u8]) -> String {
    match format::decode(b) {
        Err(FormatError::Corrupt(m)) => m,
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any segment count gives the same entries as the one-segment blob,
    /// in the same order.
    #[test]
    fn any_segment_count_round_trips(v in prop::collection::vec(entry(), 1..80), segs in 1usize..6) {
        let r = ranked(&v);
        let b = testing::encode_segmented(&r, segs, 0, format::views_default_mark(&r)).unwrap();
        let dec = format::decode(&b).unwrap();
        prop_assert_eq!(dec.entries, expected(v.clone()));
        let (h, parts) = testing::decode_segments(&b).unwrap();
        prop_assert_eq!(h.count as usize, v.len());
        prop_assert_eq!(parts.len(), segs.min(v.len()));
        prop_assert_eq!(h.flags & testing::FLAG_SEGMENTS != 0, segs.min(v.len()) > 1);
    }
}

#[test]
fn realistic_mix_in_segments_round_trips_with_the_same_size() {
    let v = common::population::entries(60_000, 7, 4242);
    let r = ranked(&v);
    let one = testing::encode_segmented(&r, 1, 0, format::views_default_mark(&r)).unwrap();
    let three = testing::encode_segmented(&r, 3, 0, format::views_default_mark(&r)).unwrap();
    assert_eq!(
        (one[5], three[5]),
        (testing::MINOR, testing::MINOR_SEGMENTS)
    );
    // Fresh delta state and zstd context per segment cost little.
    assert!(
        three.len() <= one.len() + one.len() / 25,
        "3 segments {} B vs 1 segment {} B",
        three.len(),
        one.len()
    );
    let (h, parts) = testing::decode_segments(&three).unwrap();
    assert_eq!(h.count, 60_000);
    assert_eq!(
        parts.iter().map(Vec::len).collect::<Vec<_>>(),
        [20_000, 20_000, 20_000]
    );
    assert_eq!(format::decode(&three).unwrap().entries, expected(v));
}

#[test]
fn encode_uses_segments_for_large_states_and_keeps_the_budget() {
    let v = common::population::entries(120_000, 8, 4242);
    let enc = format::encode(&v, &EncodeOptions::default()).unwrap();
    assert!(enc.bytes.len() <= format::QEMU_LIMIT);
    assert_eq!(enc.kept + enc.dropped, v.len());
    let flags = u16::from_le_bytes([enc.bytes[6], enc.bytes[7]]);
    let want_segments = format::default_segments(enc.kept) > 1 && enc.dropped == 0;
    assert_eq!(
        flags & testing::FLAG_SEGMENTS != 0,
        want_segments,
        "{flags:#x}"
    );
    let dec = format::decode(&enc.bytes).unwrap();
    assert_eq!(dec.entries.len(), enc.kept);
    assert_eq!(dec.entries, expected(v)[..enc.kept]);
}

/// A two-segment blob of small entries for the table checks.
fn two_segments() -> Vec<u8> {
    let v = common::population::entries(300, 9, 4242);
    let b = {
        let r = ranked(&v);
        testing::encode_segmented(&r, 2, 0, format::views_default_mark(&r))
    }
    .unwrap();
    assert_eq!(b[32], 2);
    b
}

#[test]
fn segment_table_must_add_up() {
    let good = two_segments();
    // Count of segment 0 one too high.
    let mut b = good.clone();
    let c = le32(&b, 33);
    b[33..37].copy_from_slice(&(c + 1).to_le_bytes());
    reseal(&mut b);
    let m = corrupt_text(&b);
    assert!(m.starts_with("segment table adds up to 301 entries"), "{m}");
    // Raw length of segment 1 changed.
    let mut b = good.clone();
    let r = le32(&b, 33 + 12 + 4);
    b[49..53].copy_from_slice(&(r + 9).to_le_bytes());
    reseal(&mut b);
    assert!(corrupt_text(&b).contains("raw"), "{}", corrupt_text(&b));
    // Stored length moved from segment 1 to segment 0: sums hold, the
    // frames no longer decompress to their declared sizes.
    let mut b = good.clone();
    let (s0, s1) = (le32(&b, 41), le32(&b, 53));
    b[41..45].copy_from_slice(&(s0 + 3).to_le_bytes());
    b[53..57].copy_from_slice(&(s1 - 3).to_le_bytes());
    reseal(&mut b);
    let err = format::decode(&b).unwrap_err();
    assert!(
        matches!(
            err,
            FormatError::Decompress { .. } | FormatError::Corrupt(_)
        ),
        "{err:?}"
    );
}

#[test]
fn segment_counts_out_of_range_are_refused() {
    for (n, want) in [
        (0u8, "segment table declares 0 segments (1..=16)"),
        (17, "segment table declares 17 segments (1..=16)"),
    ] {
        let mut b = two_segments();
        b[32] = n;
        reseal(&mut b);
        assert_eq!(corrupt_text(&b), want);
    }
    // More segments than the payload has table rows for.
    let mut b = two_segments();
    b[32] = 16;
    reseal(&mut b);
    let m = corrupt_text(&b);
    assert!(m.starts_with("segment "), "{m}");
    // A table longer than the whole payload.
    let v = common::population::entries(40, 9, 4242);
    let mut b = {
        let r = ranked(&v);
        testing::encode_segmented(&r, 2, 0, format::views_default_mark(&r))
    }
    .unwrap();
    b.truncate(32 + 1 + 12);
    b[24..28].copy_from_slice(&13u32.to_le_bytes());
    reseal(&mut b);
    assert_eq!(
        corrupt_text(&b),
        "segment table of 2 segments needs 25 bytes, payload has 13"
    );
}

#[test]
fn empty_segment_and_absurd_counts_are_refused() {
    let mut b = two_segments();
    b[33..37].copy_from_slice(&0u32.to_le_bytes());
    reseal(&mut b);
    assert_eq!(corrupt_text(&b), "segment 0 holds no entries");
    let mut b = two_segments();
    b[33..37].copy_from_slice(&1_000_000u32.to_le_bytes());
    reseal(&mut b);
    assert!(corrupt_text(&b).starts_with("segment 0: 1000000 entries cannot fit in"));
}

#[test]
fn a_defect_inside_one_segment_fails_the_whole_blob_and_names_it() {
    // Re-compress segment 1 with one column byte damaged: the table and
    // checksum are right, the records are not.
    let v = common::population::entries(300, 10, 4242);
    let b = {
        let r = ranked(&v);
        testing::encode_segmented(&r, 2, 0, format::views_default_mark(&r))
    }
    .unwrap();
    let (c0, r0, s0) = (le32(&b, 33), le32(&b, 37), le32(&b, 41));
    let (c1, r1, s1) = (le32(&b, 45), le32(&b, 49), le32(&b, 53));
    let body1 = &b[57 + s0 as usize..57 + (s0 + s1) as usize];
    let mut raw1 = zstd::bulk::decompress(body1, r1 as usize).unwrap();
    // The first byte is the column count; 1 column is below what v1 needs.
    raw1[0] = 1;
    let z1 = zstd::bulk::compress(&raw1, 1).unwrap();
    let mut out = b[..57 + s0 as usize].to_vec();
    out[53..57].copy_from_slice(&(z1.len() as u32).to_le_bytes());
    out.extend_from_slice(&z1);
    let payload_len = (out.len() - 32) as u32;
    out[24..28].copy_from_slice(&payload_len.to_le_bytes());
    reseal(&mut out);
    assert_eq!(c0 + c1, 300);
    assert!(r0 > 0);
    assert_eq!(
        corrupt_text(&out),
        "segment 1: payload has 1 columns, v1 needs 11"
    );
}

#[test]
fn segments_flag_is_required_so_a_v1_0_reader_refuses_it() {
    // What a v1.0 decoder checks: bit 8 is in the required half.
    assert_eq!(testing::FLAG_SEGMENTS & 0xff00, testing::FLAG_SEGMENTS);
    let b = two_segments();
    let flags = u16::from_le_bytes([b[6], b[7]]);
    assert_eq!(flags & testing::FLAG_SEGMENTS, testing::FLAG_SEGMENTS);
    assert_eq!(b[4..6], [1, testing::MINOR_SEGMENTS]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The warm cache encodes most entries from their compact form: that
    /// must give exactly the bytes the full entries give, in any segment
    /// count, and the compact form must exist only for entries it can
    /// carry whole.
    #[test]
    fn compact_records_encode_exactly_like_full_entries(
        v in prop::collection::vec(entry(), 1..80),
        segs in 1usize..4,
    ) {
        let compact: Vec<Option<format::Compact>> = v.iter().map(format::Compact::of).collect();
        for (e, c) in v.iter().zip(&compact) {
            if let Some(c) = c {
                let mut want = e.clone();
                want.id = None;
                prop_assert_eq!(c.to_entry(e.timeout), want);
                prop_assert_eq!(
                    c.value_key_at(e.timeout),
                    format::priority::value_key_at(e, e.timeout)
                );
            }
        }
        let full: Vec<format::View> = v.iter().map(|e| format::View::new(format::Rec::Full(e), e.timeout)).collect();
        let fast: Vec<format::View> = v
            .iter()
            .zip(&compact)
            .map(|(e, c)| match c {
                Some(c) => format::View::new(format::Rec::Fast(c), e.timeout),
                None => format::View::new(format::Rec::Full(e), e.timeout),
            })
            .collect();
        let (rf, rc) = (format::rank_views(&full), format::rank_views(&fast));
        let mark = format::views_default_mark(&rf);
        prop_assert_eq!(mark, format::views_default_mark(&rc));
        let a = testing::encode_segmented(&rf, segs, 0, mark).unwrap();
        let b = testing::encode_segmented(&rc, segs, 0, mark).unwrap();
        prop_assert_eq!(a, b);
        let opts = EncodeOptions::default();
        // One saved-at time for both: the blobs must be identical.
        let at = Some(1_790_000_000_000_000);
        prop_assert_eq!(
            format::encode_views_at(&full, &opts, None, at).unwrap().bytes,
            format::encode_views_at(&fast, &opts, None, at).unwrap().bytes
        );
        prop_assert_eq!(
            format::encode_views_at(&full, &opts, Some(mark), at).unwrap().bytes,
            format::encode_views_at(&fast, &opts, Some(mark), at).unwrap().bytes
        );
    }
}

#[test]
fn most_of_the_realistic_mix_has_a_compact_form_and_nat_does_not() {
    let v = common::population::entries(2_000, 11, 4242);
    let n = v
        .iter()
        .filter(|e| format::Compact::of(e).is_some())
        .count();
    assert!(n * 10 >= v.len() * 7, "{n} of {}", v.len());
    for e in &v {
        if e.reply != e.orig.inverse() || e.labels.is_some() || e.zone != 0 {
            assert_eq!(format::Compact::of(e), None, "{e:?}");
        }
    }
}

/// What Load creates from: the stream validates everything first, then
/// hands out exactly the decoded entries, in order, in batches.
#[test]
fn stream_hands_out_the_decoded_entries_in_batches() {
    for (n, segs) in [(0usize, 1usize), (1, 1), (700, 1), (700, 3), (40_000, 2)] {
        let v = common::population::entries(n, 12, 4242);
        let r = ranked(&v);
        let b = testing::encode_segmented(&r, segs, 0, format::views_default_mark(&r)).unwrap();
        let want = format::decode(&b).unwrap().entries;
        let mut s = format::stream(&b).unwrap();
        assert_eq!(s.len(), n);
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        while let Some(batch) = s.next_batch(128) {
            let batch = batch.unwrap();
            sizes.push(batch.len());
            got.extend(batch);
        }
        assert_eq!(got, want, "n {n} segs {segs}");
        assert!(sizes.iter().all(|&k| (1..=128).contains(&k)), "{sizes:?}");
        assert!(s.next_batch(128).is_none());
    }
}

/// A defect in the last record of the last segment fails the stream before
/// it hands out anything; a blob out of priority order comes out sorted.
#[test]
fn stream_refuses_defects_up_front_and_sorts_foreign_order() {
    let v = common::population::entries(700, 13, 4242);
    let r = ranked(&v);
    let good = testing::encode_segmented(&r, 2, 0, format::views_default_mark(&r)).unwrap();
    let mut bad = good.clone();
    // Drop the last byte of segment 1 (its frame no longer decompresses to
    // its declared size), keeping the table and checksum consistent.
    let s1 = le32(&bad, 53);
    bad[53..57].copy_from_slice(&(s1 - 1).to_le_bytes());
    bad.pop();
    let pl = (bad.len() - 32) as u32;
    bad[24..28].copy_from_slice(&pl.to_le_bytes());
    reseal(&mut bad);
    let err = format::stream(&bad).unwrap_err();
    assert!(
        matches!(
            err,
            FormatError::Decompress { .. } | FormatError::Corrupt(_)
        ),
        "{err:?}"
    );
    // Reverse priority order: still every entry, most valuable first.
    let mut rev = r.clone();
    rev.reverse();
    let b = testing::encode_segmented(&rev, 2, 0, format::views_default_mark(&rev)).unwrap();
    let mut s = format::stream(&b).unwrap();
    let mut got = Vec::new();
    while let Some(batch) = s.next_batch(100) {
        got.extend(batch.unwrap());
    }
    // Ties keep the blob's (reversed) order: compare with a stable sort of
    // what the blob holds, and check the order itself.
    let mut want = format::decode(&b).unwrap().entries;
    assert_ne!(want, got, "the blob was meant to be out of order");
    sort_by_priority(&mut want);
    assert!(
        got == want,
        "stream order differs from a stable priority sort"
    );
    assert_eq!(got.len(), v.len());
}

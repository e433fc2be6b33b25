//! The saved-at time (state format v1.3, `docs/state-format.md` §1.3):
//! every layout carries it and reads it back, a decoder that predates it
//! reads the same entries, and Load ages every timeout by the time since
//! Save, leaving out (and counting) what expired meanwhile, with the skew
//! rule for clocks that disagree.

use conntrack_vmstate::entry::{status, Entry};
use conntrack_vmstate::format::{
    self, priority, sort_by_priority, testing, EncodeOptions, Format, FormatError, Rec, View,
    SKEW_ALLOWANCE_SECS,
};

/// A fixed "now" (2026-09-21), so nothing depends on the machine's clock.
const NOW: u64 = 1_790_000_000_000_000;
const SEC: u64 = 1_000_000;

fn ranked(v: &[Entry]) -> Vec<View<'_>> {
    priority::priority_order(v)
        .into_iter()
        .map(|i| View::new(Rec::Full(&v[i]), v[i].timeout))
        .collect()
}

fn no_ids(v: Vec<Entry>) -> Vec<Entry> {
    v.into_iter().map(|e| Entry { id: None, ..e }).collect()
}

fn reseal(b: &mut [u8]) {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..28]), &b[32..]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
}

fn drain(s: &mut format::Stream) -> Vec<Entry> {
    let mut got = Vec::new();
    while let Some(b) = s.next_batch(97) {
        got.extend(b.expect("batch of a validated blob"));
    }
    got
}

/// What Load must create from `stored` (blob order, timeouts as stored)
/// aged by `age`: the entries with more than `age` left, `age` less each,
/// in the order a stable priority sort gives.
fn aged(stored: &[Entry], age: u32) -> Vec<Entry> {
    let mut want: Vec<Entry> = stored
        .iter()
        .filter(|e| e.timeout > age)
        .map(|e| Entry {
            timeout: e.timeout - age,
            id: None,
            ..e.clone()
        })
        .collect();
    sort_by_priority(&mut want);
    want
}

/// The realistic mix with timeouts spread over 1 s .. 5 days, some of them
/// FIXED_TIMEOUT (the kernel counts those down like any other).
fn population(n: usize, seed: u64) -> Vec<Entry> {
    let mut v = common::population::entries(n, seed, 100);
    for (i, e) in v.iter_mut().enumerate() {
        e.timeout = match i % 7 {
            0 => 1 + (i as u32 % 30),
            1 => 3_600 + (i as u32 % 20) - 10,
            2 => 10_800 + (i as u32 % 20) - 10,
            3 => 10_805,
            _ => 432_000 - (i as u32 % 5_000),
        };
        if i % 11 == 0 {
            e.status |= status::FIXED_TIMEOUT;
        }
    }
    v
}

/// The blob of `v` in each layout, saved at `saved_at`: v1.0, v1.1 (three
/// segments) and v1.2 (a base of two segments, aged 7 s, a few records
/// skipped, and a delta).
fn layouts(v: &[Entry], saved_at: Option<u64>) -> Vec<(&'static str, Vec<u8>)> {
    let r = ranked(v);
    let mark = format::views_default_mark(&r);
    let nb = r.len() * 2 / 3;
    let base = format::encode_frames(&r[..nb], 2, mark).unwrap();
    let delta = format::encode_frames(&r[nb..], 1, mark).unwrap();
    vec![
        (
            "v1.0",
            format::encode_at(v, &EncodeOptions::default(), saved_at)
                .unwrap()
                .bytes,
        ),
        (
            "v1.1",
            testing::encode_segmented_at(&r, 3, 0, mark, saved_at).unwrap(),
        ),
        (
            "v1.2",
            format::assemble_patched_at(&base, 7, &[0, 5, 9], &delta, 0, mark, saved_at).unwrap(),
        ),
    ]
}

#[test]
fn every_layout_carries_the_saved_at_time_and_its_entries_unchanged() {
    let v = population(600, 1);
    let at = NOW - 3 * 3600 * SEC + 123_456;
    for ((name, plain), (_, stamped)) in layouts(&v, None).into_iter().zip(layouts(&v, Some(at))) {
        let h = testing::check_header(&stamped).unwrap();
        assert_eq!(h.saved_at, Some(at), "{name}");
        assert_eq!(h.minor, testing::MINOR_SAVED_AT, "{name}");
        assert_eq!(
            h.flags & testing::FLAG_SAVED_AT,
            testing::FLAG_SAVED_AT,
            "{name}"
        );
        // The frame, byte for byte: a zstd skippable frame of 8 bytes.
        let mut frame = vec![0x50, 0x2a, 0x4d, 0x18, 8, 0, 0, 0];
        frame.extend_from_slice(&at.to_le_bytes());
        assert_eq!(stamped[stamped.len() - 16..], frame[..], "{name}");
        assert_eq!(stamped.len(), plain.len() + 16, "{name}");

        let hp = testing::check_header(&plain).unwrap();
        assert_eq!(hp.saved_at, None, "{name}");
        assert_eq!(hp.flags & testing::FLAG_SAVED_AT, 0, "{name}");
        assert_eq!(hp.flags, h.flags & !testing::FLAG_SAVED_AT, "{name}");

        let (d, dp) = (
            format::decode(&stamped).unwrap(),
            format::decode(&plain).unwrap(),
        );
        assert_eq!(d.saved_at, Some(at), "{name}");
        assert_eq!(dp.saved_at, None, "{name}");
        // decode hands out the timeouts as stored: aging is Load's.
        assert_eq!(d.entries, dp.entries, "{name}");
        let s = format::stream(&stamped).unwrap();
        assert_eq!(
            (s.saved_at, s.age_secs, s.expired),
            (Some(at), 0, 0),
            "{name}"
        );
    }
}

#[test]
fn a_tiny_state_is_compressed_to_carry_the_frame() {
    // One entry: stored raw without a saved-at time (compression would
    // not shrink it), compressed with one.
    let v = population(1, 2);
    let plain = format::encode_at(&v, &EncodeOptions::default(), None).unwrap();
    let stamped = format::encode_at(&v, &EncodeOptions::default(), Some(NOW)).unwrap();
    let (hp, hs) = (
        testing::check_header(&plain.bytes).unwrap(),
        testing::check_header(&stamped.bytes).unwrap(),
    );
    assert_eq!(hp.flags & testing::FLAG_ZSTD, 0);
    assert_eq!(
        hs.flags & (testing::FLAG_ZSTD | testing::FLAG_SAVED_AT),
        testing::FLAG_ZSTD | testing::FLAG_SAVED_AT
    );
    assert_eq!(hs.saved_at, Some(NOW));
    assert_eq!(
        format::decode(&stamped.bytes).unwrap().entries,
        no_ids(v.clone())
    );
    // No entries: nothing to age, no frame; the 32-byte header as before.
    let empty = format::encode_at(&[], &EncodeOptions::default(), Some(NOW)).unwrap();
    assert_eq!(empty.bytes.len(), 32);
    assert_eq!(testing::check_header(&empty.bytes).unwrap().saved_at, None);
}

/// A decoder before v1.3 knows neither the flag nor the frame: it skips an
/// unknown informational flag (checked for bit 7 in `format_malformed`)
/// and its zstd decompression steps over a skippable frame. The same blob
/// with the flag moved to an informational bit no release knows is
/// exactly what such a decoder sees; this build's entry decoding, which is
/// that decoder's, must read the same entries from it and find no time.
#[test]
fn a_decoder_before_the_saved_at_time_reads_the_same_entries() {
    let v = population(600, 3);
    for (name, b) in layouts(&v, Some(NOW)) {
        let want = format::decode(&b).unwrap().entries;
        let mut old = b.clone();
        let flags = u16::from_le_bytes([old[6], old[7]]);
        let flags = (flags & !testing::FLAG_SAVED_AT) | 0x0080;
        old[6..8].copy_from_slice(&flags.to_le_bytes());
        reseal(&mut old);
        let d = format::decode(&old).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(d.saved_at, None, "{name}");
        assert_eq!(d.entries, want, "{name}");
        let mut s = format::stream_loaded_at(&old, usize::MAX, NOW + 86_400 * SEC).unwrap();
        assert_eq!((s.age_secs, s.expired), (0, 0), "{name}");
        let mut sorted = want.clone();
        sort_by_priority(&mut sorted);
        assert_eq!(drain(&mut s), sorted, "{name}");
    }
}

#[test]
fn load_ages_every_timeout_and_leaves_out_the_expired() {
    let v = population(900, 4);
    let age = 3 * 3600;
    for (name, b) in layouts(&v, Some(NOW - u64::from(age) * SEC - 500_000)) {
        // What is stored (a patch's base already less its own age).
        let stored = format::decode(&b).unwrap().entries;
        let want = aged(&stored, age);
        assert!(
            want.len() < stored.len() && !want.is_empty(),
            "{name}: the population must have entries on both sides of the age"
        );
        let mut s = format::stream_loaded_at(&b, usize::MAX, NOW).unwrap();
        assert_eq!(s.age_secs, age, "{name}");
        assert_eq!(s.expired, stored.len() - want.len(), "{name}");
        assert_eq!(s.len(), want.len(), "{name}");
        let got = drain(&mut s);
        assert_eq!(got, want, "{name}");
        // An entry with 5 s more than the age is now Worthless (≤ 10 s):
        // aging moved it behind everything of its former class.
        assert!(
            got.iter().any(|e| e.timeout == 5),
            "{name}: an entry aged into the last class"
        );
        assert!(
            got.iter()
                .filter(|e| e.status & status::FIXED_TIMEOUT != 0)
                .count()
                > 0,
            "{name}: FIXED_TIMEOUT entries are aged too"
        );
    }
}

#[test]
fn the_expired_count_is_exact_at_the_boundary() {
    // Left at Save: age − 1, age, age + 1 seconds; saved exactly `age`
    // seconds (and a fraction) ago.
    let age = 10_800u32;
    let mut v = population(3, 5);
    for (e, t) in v.iter_mut().zip([age - 1, age, age + 1]) {
        e.timeout = t;
        e.status = status::SEEN_REPLY | status::ASSURED | status::CONFIRMED;
    }
    let b = format::encode_at(
        &v,
        &EncodeOptions::default(),
        Some(NOW - u64::from(age) * SEC - 999_999),
    )
    .unwrap()
    .bytes;
    let mut s = format::stream_loaded_at(&b, usize::MAX, NOW).unwrap();
    assert_eq!((s.age_secs, s.expired, s.len()), (age, 2, 1));
    let got = drain(&mut s);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].timeout, 1);
    assert_eq!(got[0].orig, v[2].orig);
}

#[test]
fn a_state_without_a_saved_at_time_loads_as_before() {
    let v = population(600, 6);
    for (name, b) in layouts(&v, None) {
        let stored = format::decode(&b).unwrap().entries;
        let mut s = format::stream_loaded_at(&b, usize::MAX, NOW).unwrap();
        assert_eq!((s.saved_at, s.age_secs, s.expired), (None, 0, 0), "{name}");
        assert_eq!(drain(&mut s), aged(&stored, 0), "{name}");
    }
    // Legacy text (the Proxmox Perl helper) cannot say when: age unknown, 0.
    let text = format::encode_at(
        &v,
        &EncodeOptions {
            limit: format::QEMU_LIMIT,
            format: Format::ConntrackSave,
        },
        Some(NOW - 86_400 * SEC),
    )
    .unwrap()
    .bytes;
    let stored = format::decode(&text).unwrap().entries;
    let mut s = format::stream_loaded_at(&text, usize::MAX, NOW).unwrap();
    assert_eq!((s.saved_at, s.age_secs, s.expired), (None, 0, 0));
    assert_eq!(drain(&mut s).len(), stored.len());
}

#[test]
fn a_saved_at_time_in_the_future_or_within_the_skew_allowance_ages_nothing() {
    let v = population(300, 7);
    let skew = SKEW_ALLOWANCE_SECS * SEC;
    for (saved, age) in [
        (NOW + 3600 * SEC, 0),     // destination clock an hour behind
        (NOW, 0),                  // a live migration
        (NOW - skew, 0),           // at the allowance
        (NOW - skew - SEC + 1, 0), // under a second more
        (NOW - skew - SEC, SKEW_ALLOWANCE_SECS as u32 + 1),
    ] {
        for (name, b) in layouts(&v, Some(saved)) {
            let stored = format::decode(&b).unwrap().entries;
            let mut s = format::stream_loaded_at(&b, usize::MAX, NOW).unwrap();
            assert_eq!(s.age_secs, age, "{name} saved at {saved}");
            let want = aged(&stored, age);
            assert_eq!(s.expired, stored.len() - want.len(), "{name}");
            assert_eq!(drain(&mut s), want, "{name} saved at {saved}");
        }
    }
}

#[test]
fn load_age_rule() {
    use format::load_age;
    assert_eq!(load_age(None, NOW), 0);
    assert_eq!(load_age(Some(NOW + 1), NOW), 0);
    assert_eq!(load_age(Some(u64::MAX), NOW), 0);
    assert_eq!(load_age(Some(NOW - SKEW_ALLOWANCE_SECS * SEC), NOW), 0);
    assert_eq!(
        load_age(Some(NOW - (SKEW_ALLOWANCE_SECS + 1) * SEC), NOW),
        SKEW_ALLOWANCE_SECS as u32 + 1
    );
    assert_eq!(load_age(Some(NOW - 10_800 * SEC - 999_999), NOW), 10_800);
    assert_eq!(load_age(Some(0), u64::MAX), u32::MAX);
}

#[test]
fn a_damaged_saved_at_frame_is_refused_by_name() {
    let v = population(50, 8);
    let good = format::encode_at(&v, &EncodeOptions::default(), Some(NOW))
        .unwrap()
        .bytes;
    let corrupt = |b: &[u8]| match format::decode(b) {
        Err(FormatError::Corrupt(m)) => m,
        other => panic!("expected Corrupt, got {other:?}"),
    };
    // The frame's magic damaged (the checksum repaired).
    let mut b = good.clone();
    let at = b.len() - 16;
    b[at] ^= 1;
    reseal(&mut b);
    assert_eq!(
        corrupt(&b),
        "SAVED_AT flag, but the payload does not end in a saved-at frame \
         (found magic 0x184d2a51, length 8; expected 0x184d2a50, 8)"
    );
    // Its length.
    let mut b = good.clone();
    b[at + 4] = 9;
    reseal(&mut b);
    assert_eq!(
        corrupt(&b),
        "SAVED_AT flag, but the payload does not end in a saved-at frame \
         (found magic 0x184d2a50, length 9; expected 0x184d2a50, 8)"
    );
    // The flag on an uncompressed payload.
    let plain = format::encode_at(&v[..1], &EncodeOptions::default(), None)
        .unwrap()
        .bytes;
    let mut b = plain.clone();
    b[6] |= testing::FLAG_SAVED_AT as u8;
    reseal(&mut b);
    assert_eq!(
        corrupt(&b),
        "SAVED_AT flag on an uncompressed payload (the saved-at frame needs ZSTD)"
    );
    // The flag on the header-only state: no payload to end in a frame.
    let mut b = format::encode_at(&[], &EncodeOptions::default(), None)
        .unwrap()
        .bytes;
    b[6] |= (testing::FLAG_SAVED_AT | testing::FLAG_ZSTD) as u8;
    reseal(&mut b);
    assert_eq!(
        corrupt(&b),
        "SAVED_AT flag, but the payload of 0 bytes cannot end in the 16-byte saved-at frame"
    );
    // The flag on a blob that has no frame (the last 16 bytes are the
    // zstd frame itself): refused, not misread as a time.
    let mut b = format::encode_at(&v, &EncodeOptions::default(), None)
        .unwrap()
        .bytes;
    b[6] |= testing::FLAG_SAVED_AT as u8;
    reseal(&mut b);
    assert!(
        corrupt(&b).starts_with("SAVED_AT flag, but the payload does not end in a saved-at frame")
    );
}

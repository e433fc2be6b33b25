//! The fuzz target's property as a plain test (runs in `cargo test`, no
//! nightly needed): random bytes and mutated valid blobs, with the checksum
//! repaired so mutations reach the record parser, never panic the decoder;
//! whatever decodes re-encodes to the same entries. Segmented and patched
//! blobs (v1.1, v1.2) are mutated too.

use conntrack_vmstate::format::{self, sort_by_priority, EncodeOptions, Format};
use proptest::prelude::*;

/// The load path's validate-then-stream must accept exactly what the full
/// decoder accepts, and hand out the same entries in priority order.
fn check_stream(data: &[u8]) {
    let dec = format::decode(data);
    match (dec, format::stream(data)) {
        (Ok(d), Ok(mut s)) => {
            assert_eq!(s.len(), d.entries.len());
            let mut got = Vec::new();
            while let Some(b) = s.next_batch(7) {
                got.extend(b.expect("batch of a validated blob"));
            }
            check_aged(data, &d);
            let mut want = d.entries;
            sort_by_priority(&mut want);
            assert_eq!(got, want);
        }
        (Err(_), Err(_)) => {}
        (d, s) => panic!("decode {:?} but stream {:?}", d.err(), s.err()),
    }
    check_progressive(data);
}

/// Load's progressive stream (first segment now, the rest on `complete`)
/// accepts in the end exactly what the full decoder accepts, and hands out
/// the same entries; a blob the decoder refuses is refused either at once
/// or by `complete`, which then ends the stream.
fn check_progressive(data: &[u8]) {
    // At the saved-at time: not aged, so the progressive path is taken.
    let now = format::testing::check_header(data)
        .ok()
        .and_then(|h| h.saved_at)
        .unwrap_or(0);
    let full = format::decode(data);
    let mut s = match (format::stream_progressive(data, usize::MAX, now), &full) {
        (Ok(s), _) => s,
        (Err(_), Err(_)) => return,
        (Err(e), Ok(_)) => panic!("decode accepts, the progressive stream refuses: {e}"),
    };
    let mut got = Vec::new();
    while let Some(b) = s.next_batch(7) {
        got.extend(b.expect("batch of a validated segment"));
    }
    match (s.complete(data), &full) {
        (Ok(()), Ok(d)) => {
            while let Some(b) = s.next_batch(7) {
                got.extend(b.expect("batch of a validated blob"));
            }
            let key = |v: &[conntrack_vmstate::entry::Entry]| {
                let mut k: Vec<String> = v.iter().map(|e| format!("{e:?}")).collect();
                k.sort();
                k
            };
            assert_eq!(key(&got), key(&d.entries));
        }
        (Err(_), Err(_)) => assert!(
            s.next_batch(7).is_none(),
            "handed out after a failed complete"
        ),
        (c, d) => panic!("decode {:?} but complete {:?}", d.as_ref().err(), c.err()),
    }
}

/// Load's aged stream, an hour and a bit after the saved-at time (or at
/// an arbitrary time for a state that does not say when): exactly the
/// entries with more time left than the age, that much less each, in the
/// order a stable priority sort of the aged entries gives.
fn check_aged(data: &[u8], d: &format::Decoded) {
    let now = d.saved_at.unwrap_or(0).saturating_add(3_601_000_000);
    let mut s = format::stream_loaded_at(data, usize::MAX, now).expect("validated before");
    let age = format::load_age(d.saved_at, now);
    assert_eq!(s.age_secs, age);
    let mut want: Vec<_> = d
        .entries
        .iter()
        .filter(|e| age == 0 || e.timeout > age)
        .map(|e| conntrack_vmstate::entry::Entry {
            timeout: e.timeout - age,
            ..e.clone()
        })
        .collect();
    sort_by_priority(&mut want);
    assert_eq!(s.expired, d.entries.len() - want.len());
    assert_eq!(s.len(), want.len());
    let mut got = Vec::new();
    while let Some(b) = s.next_batch(7) {
        got.extend(b.expect("batch of a validated blob"));
    }
    assert_eq!(got, want);
}

fn check(data: &[u8]) {
    check_stream(data);
    if let Ok(d) = format::decode(data) {
        if d.format == Format::Binary {
            let opts = EncodeOptions {
                limit: usize::MAX,
                format: Format::Binary,
            };
            let enc = format::encode(&d.entries, &opts).unwrap();
            let again = format::decode(&enc.bytes).unwrap();
            let mut want = d.entries;
            sort_by_priority(&mut want);
            assert_eq!(again.entries, want);
        }
    }
}

fn fix_crc(b: &mut [u8]) {
    if b.len() >= 32 {
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..28]), &b[32..]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
    }
}

/// A valid uncompressed blob (the record parser sees mutated bytes as is);
/// without the saved-at frame, which needs a compressed payload.
fn plain_blob(n: usize, seed: u64) -> Vec<u8> {
    let v = common::population::entries(n, seed, 100);
    let mut b = format::encode_at(&v, &EncodeOptions::default(), None)
        .unwrap()
        .bytes;
    let d = format::decode(&b).unwrap();
    assert_eq!(d.entries.len(), n);
    // Re-wrap the payload uncompressed: flags &= !ZSTD, payload = raw.
    let raw_len = u32::from_le_bytes(b[20..24].try_into().unwrap()) as usize;
    if b[6] & 2 != 0 {
        let raw = zstd::bulk::decompress(&b[32..], raw_len).unwrap();
        b.truncate(32);
        b[6] &= !2;
        b[24..28].copy_from_slice(&(raw.len() as u32).to_le_bytes());
        b.extend_from_slice(&raw);
        fix_crc(&mut b);
    }
    b
}

/// A valid segmented blob with its segments stored uncompressed.
fn plain_segmented_blob(n: usize, seed: u64, segs: usize) -> Vec<u8> {
    use format::{testing, Rec, View};
    let v = common::population::entries(n, seed, 100);
    let views: Vec<View> = v
        .iter()
        .map(|e| View::new(Rec::Full(e), e.timeout))
        .collect();
    let r = format::rank_views(&views);
    let b = testing::encode_segmented(&r, segs, 0, format::views_default_mark(&r)).unwrap();
    let k = b[32] as usize;
    let mut table = b[32..33 + 12 * k].to_vec();
    let mut body = Vec::new();
    let mut at = 33 + 12 * k;
    for i in 0..k {
        let row = 1 + 12 * i;
        let raw_len = u32::from_le_bytes(table[row + 4..row + 8].try_into().unwrap()) as usize;
        let stored = u32::from_le_bytes(table[row + 8..row + 12].try_into().unwrap()) as usize;
        let raw = zstd::bulk::decompress(&b[at..at + stored], raw_len).unwrap();
        table[row + 8..row + 12].copy_from_slice(&(raw.len() as u32).to_le_bytes());
        body.extend_from_slice(&raw);
        at += stored;
    }
    let mut out = b[..32].to_vec();
    out[6] &= !2;
    out.extend_from_slice(&table);
    out.extend_from_slice(&body);
    let pl = (out.len() - 32) as u32;
    out[24..28].copy_from_slice(&pl.to_le_bytes());
    fix_crc(&mut out);
    assert_eq!(format::decode(&out).unwrap().entries.len(), n);
    out
}

/// A valid patched blob (v1.2) with its segments stored uncompressed:
/// `segs` base frames of the first two thirds of the entries, every third
/// base record skipped, the rest as one delta frame, base aged by `seed`
/// seconds; without the saved-at frame, which needs compressed segments.
fn plain_patched_blob(n: usize, seed: u64, segs: usize) -> Vec<u8> {
    use format::{testing, Rec, View};
    let v = common::population::entries(n, seed, 100);
    let views: Vec<View> = v
        .iter()
        .map(|e| View::new(Rec::Full(e), e.timeout))
        .collect();
    let r = format::rank_views(&views);
    let mark = format::views_default_mark(&r);
    let nb = (r.len() * 2 / 3).max(1);
    let raw = |f: format::Frame| format::Frame {
        bytes: zstd::bulk::decompress(&f.bytes, f.raw_len as usize).unwrap(),
        ..f
    };
    let base: Vec<_> = format::encode_frames(&r[..nb], segs, mark)
        .unwrap()
        .into_iter()
        .map(raw)
        .collect();
    let delta: Vec<_> = format::encode_frames(&r[nb..], 1, mark)
        .unwrap()
        .into_iter()
        .map(raw)
        .collect();
    let skip: Vec<u32> = (0..nb as u32).filter(|i| i % 3 == 1).collect();
    let mut b =
        format::assemble_patched_at(&base, seed as u32, &skip, &delta, 0, mark, None).unwrap();
    b[6] &= !(testing::FLAG_ZSTD as u8);
    fix_crc(&mut b);
    assert_eq!(
        format::decode(&b).unwrap().entries.len(),
        r.len() - skip.len()
    );
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Mutations anywhere, the patch block included (it is the first
    /// payload bytes: half of the edits go there).
    #[test]
    fn mutated_patched_blobs_never_panic(
        seed in 0u64..8,
        n in 2usize..40,
        segs in 1usize..4,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<bool>()), 1..6),
    ) {
        let mut b = plain_patched_blob(n, seed, segs);
        for (i, v, in_block) in &edits {
            let span = if *in_block { 8.min(b.len() - 32) } else { b.len() - 32 };
            let at = 32 + i.index(span);
            b[at] = *v;
        }
        fix_crc(&mut b);
        check(&b);
    }

    #[test]
    fn mutated_segmented_blobs_never_panic(
        seed in 0u64..8,
        n in 2usize..40,
        segs in 2usize..4,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut b = plain_segmented_blob(n, seed, segs);
        for (i, v) in &edits {
            let at = 32 + i.index(b.len() - 32);
            b[at] = *v;
        }
        fix_crc(&mut b);
        check(&b);
    }

    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..300)) {
        check(&data);
        let mut with_magic = b"CTVS\x01\x00".to_vec();
        with_magic.extend_from_slice(&data);
        fix_crc(&mut with_magic);
        check(&with_magic);
    }

    #[test]
    fn mutated_blobs_never_panic(
        seed in 0u64..8,
        n in 1usize..30,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut b = plain_blob(n, seed);
        for (i, v) in &edits {
            let at = 32 + i.index(b.len() - 32);
            b[at] = *v;
        }
        if truncate {
            let l = 32 + cut.index(b.len() - 32);
            b.truncate(l);
            let pl = (l - 32) as u32;
            b[24..28].copy_from_slice(&pl.to_le_bytes());
            b[20..24].copy_from_slice(&pl.to_le_bytes());
        }
        fix_crc(&mut b);
        check(&b);
    }

    #[test]
    fn mutated_text_never_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut t = b"-A -t 99 -u SEEN_REPLY,ASSURED -w 3 -s 10.0.0.1 -d 10.0.0.2 -g 10.0.0.9 -q 10.0.0.1 -p tcp --sport 1000 --dport 80 --reply-port-src 80 --reply-port-dst 1000 --state ESTABLISHED --mark 100\n".to_vec();
        for (i, v) in &edits {
            let at = i.index(t.len());
            t[at] = *v;
        }
        let _ = format::decode(&t);
    }
}

//! The decoder must never panic, whatever the bytes, and whatever it
//! accepts must survive a re-encode unchanged. Each input is tried as is
//! and with its header checksum repaired, so that mutations reach the
//! record parser instead of stopping at the crc32c check. Inputs that start
//! with `P` also drive a patched blob (v1.2) built here: the rest of the
//! input picks its size and edits its patch block and segment table.
#![no_main]

use conntrack_vmstate::format::{self, sort_by_priority, EncodeOptions, Format};
use libfuzzer_sys::fuzz_target;

/// The load path's validate-then-stream must accept exactly what the full
/// decoder accepts, and hand out the same entries in priority order.
fn check_stream(data: &[u8]) {
    match (format::decode(data), format::stream(data)) {
        (Ok(d), Ok(mut s)) => {
            let mut got = Vec::new();
            while let Some(b) = s.next_batch(7) {
                got.extend(b.expect("batch of a validated blob"));
            }
            check_aged(data, &d);
            let mut want = d.entries;
            sort_by_priority(&mut want);
            assert_eq!(got, want);
            // Load's bounded stream: a blob not in priority order
            // with more entries than it may sort comes out in blob order,
            // but the same entries.
            let mut b = format::stream_bounded(data, 3).expect("validated twice");
            let mut some = Vec::new();
            while let Some(x) = b.next_batch(5) {
                some.extend(x.expect("batch of a validated blob"));
            }
            let key = |v: &[conntrack_vmstate::entry::Entry]| {
                let mut k: Vec<String> = v.iter().map(|e| format!("{e:?}")).collect();
                k.sort();
                k
            };
            assert_eq!(key(&some), key(&want));
        }
        (Err(_), Err(_)) => {}
        (d, s) => panic!("decode {:?} but stream {:?}", d.err(), s.err()),
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
            let enc = format::encode(
                &d.entries,
                &EncodeOptions {
                    limit: usize::MAX,
                    format: Format::Binary,
                },
            )
            .expect("re-encode of decoded entries");
            let again = format::decode(&enc.bytes).expect("decode of re-encoded blob");
            let mut want = d.entries;
            sort_by_priority(&mut want);
            assert_eq!(again.entries, want);
        }
    }
}

/// A valid patched blob of `n` entries: `segs` base frames of the first two
/// thirds, every third base record skipped, the rest as a delta frame.
fn patched_blob(n: usize, seed: u64, segs: usize) -> Vec<u8> {
    use format::{Rec, View};
    let v = testkit::population::entries(n, seed, 100);
    let views: Vec<View> = v
        .iter()
        .map(|e| View::new(Rec::Full(e), e.timeout))
        .collect();
    let r = format::rank_views(&views);
    let mark = format::views_default_mark(&r);
    let nb = (r.len() * 2 / 3).max(1);
    let base = format::encode_frames(&r[..nb], segs, mark).expect("base frames");
    let delta = format::encode_frames(&r[nb..], 1, mark).expect("delta frames");
    let skip: Vec<u32> = (0..nb as u32).filter(|i| i % 3 == 1).collect();
    format::assemble_patched(&base, seed as u32, &skip, &delta, 0, mark).expect("patched blob")
}

/// `P`, seed, n, segments, then (offset, byte) edits within the first 64
/// payload bytes (patch block and segment table; the frames are zstd, the
/// other inputs reach the record parser).
fn patched(data: &[u8]) {
    let [b'P', seed, n, segs, edits @ ..] = data else {
        return;
    };
    let mut b = patched_blob(
        2 + usize::from(*n % 60),
        u64::from(*seed % 8),
        1 + usize::from(*segs % 4),
    );
    let span = (b.len() - 32).min(64);
    for e in edits.chunks_exact(2) {
        b[32 + usize::from(e[0]) % span] = e[1];
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..28]), &b[32..]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    check(&b);
}

fuzz_target!(|data: &[u8]| {
    check(data);
    patched(data);
    if data.len() >= 32 && data.starts_with(b"CTVS") {
        let mut fixed = data.to_vec();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&fixed[..28]), &fixed[32..]);
        fixed[28..32].copy_from_slice(&crc.to_le_bytes());
        check(&fixed);
    }
});

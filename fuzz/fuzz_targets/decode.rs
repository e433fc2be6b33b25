//! The decoder must never panic, whatever the bytes, and whatever it
//! accepts must survive a re-encode unchanged. Each input is tried as is
//! and with its header checksum repaired, so that mutations reach the
//! record parser instead of stopping at the crc32c check.
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
            let mut want = d.entries;
            sort_by_priority(&mut want);
            assert_eq!(got, want);
        }
        (Err(_), Err(_)) => {}
        (d, s) => panic!("decode {:?} but stream {:?}", d.err(), s.err()),
    }
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

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= 32 && data.starts_with(b"CTVS") {
        let mut fixed = data.to_vec();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&fixed[..28]), &fixed[32..]);
        fixed[28..32].copy_from_slice(&crc.to_le_bytes());
        check(&fixed);
    }
});

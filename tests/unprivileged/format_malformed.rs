//! Malformed blobs are rejected as a whole, with the expected error.
//! Blobs here are built by hand from docs/state-format.md, not by the
//! encoder, so the tests also pin the specification.

use conntrack_vmstate::format::{self, testing, EncodeOptions, FormatError};

/// A v1 blob around `raw` (stored uncompressed unless `zstd`).
fn wrap(major: u8, flags: u16, count: u32, raw_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"CTVS");
    b.push(major);
    b.push(0);
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&count.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // dropped
    b.extend_from_slice(&7u32.to_le_bytes()); // default mark
    b.extend_from_slice(&raw_len.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b), payload);
    b.extend_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Raw payload of one IPv4 UDP entry 10.0.0.1:1000 -> 10.0.0.2:53, status
/// 0x0a, timeout 30, with the attribute list `attrs` (without END).
fn one_udp_entry(attrs: Option<&[u8]>) -> Vec<u8> {
    let flags: u8 = (1 << 5) | if attrs.is_some() { 1 << 3 } else { 0 };
    let mut timeout = Vec::new();
    varint(&mut timeout, 60); // zigzag(30 - 0)
    let mut a = Vec::new();
    if let Some(x) = attrs {
        a.extend_from_slice(x);
        a.push(0);
    }
    let cols: [&[u8]; 11] = [
        &[flags],
        &[17],
        &[10, 0, 0, 1],
        &[10, 0, 0, 2],
        &1000u16.to_be_bytes(),
        &53u16.to_be_bytes(),
        &[0x0a],
        &timeout,
        &[],
        &[],
        &a,
    ];
    let mut raw = vec![11u8];
    for c in cols {
        varint(&mut raw, c.len() as u64);
        raw.extend_from_slice(c);
    }
    raw
}

fn small_blob() -> Vec<u8> {
    let v = common::population::entries(3, 9, 7);
    format::encode(&v, &EncodeOptions::default()).unwrap().bytes
}

#[test]
fn hand_built_blob_decodes_per_spec() {
    let raw = one_udp_entry(None);
    let d = format::decode(&wrap(1, 0, 1, raw.len() as u32, &raw)).unwrap();
    assert_eq!(d.entries.len(), 1);
    let e = &d.entries[0];
    assert_eq!(e.orig.src.to_string(), "10.0.0.1");
    assert_eq!(e.orig.dst.to_string(), "10.0.0.2");
    assert_eq!(e.reply, e.orig.inverse());
    assert_eq!((e.status, e.timeout, e.mark, e.zone), (0x0a, 30, 7, 0));
}

#[test]
fn truncation_at_every_length_is_rejected() {
    let b = small_blob();
    for len in 0..b.len() {
        let err = format::decode(&b[..len]).unwrap_err();
        match (len, &err) {
            (0, FormatError::Empty) => {}
            (_, FormatError::Truncated { got, .. }) if *got == len => {}
            _ => panic!("length {len}: unexpected {err:?}"),
        }
    }
    assert!(format::decode(&b).is_ok());
}

#[test]
fn every_bit_flip_is_rejected() {
    let b = small_blob();
    for i in 0..b.len() * 8 {
        let mut c = b.clone();
        c[i / 8] ^= 1 << (i % 8);
        let err = format::decode(&c).expect_err(&format!("flip of bit {i} accepted"));
        if i / 8 >= 28 {
            assert!(
                matches!(err, FormatError::ChecksumMismatch { .. }),
                "bit {i}: {err:?}"
            );
        }
    }
}

#[test]
fn wrong_magic() {
    let mut b = small_blob();
    b[0..4].copy_from_slice(b"XXXX");
    let err = format::decode(&b).unwrap_err();
    assert!(matches!(err, FormatError::WrongMagic { .. }), "{err:?}");
    assert!(err.to_string().contains("wrong magic"), "{err}");
    // The v1 decoder checks the magic itself too.
    let err = testing::decode(&b).unwrap_err();
    assert!(
        matches!(&err, FormatError::WrongMagic { found } if found == b"XXXX"),
        "{err:?}"
    );
}

#[test]
fn newer_major_version_is_a_clear_error() {
    let raw = one_udp_entry(None);
    let err = format::decode(&wrap(2, 0, 1, raw.len() as u32, &raw)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "state format version 2.0 is not supported by this build (reads 1.x); upgrade conntrack-vmstate on this host"
    );
}

#[test]
fn unknown_required_flag_is_rejected_informational_is_not() {
    let raw = one_udp_entry(None);
    // Bit 9 is PATCH since v1.2; bit 10 is the lowest still unknown.
    let err = format::decode(&wrap(1, 0x0400, 1, raw.len() as u32, &raw)).unwrap_err();
    assert!(matches!(err, FormatError::UnknownFlags(0x0400)), "{err:?}");
    let ok = format::decode(&wrap(1, 0x0080, 1, raw.len() as u32, &raw)).unwrap();
    assert_eq!(ok.entries.len(), 1);
}

#[test]
fn absurd_counts_are_refused_before_allocating() {
    let raw = one_udp_entry(None);
    let err = format::decode(&wrap(1, 0, 1_000_000, raw.len() as u32, &raw)).unwrap_err();
    assert!(
        matches!(
            err,
            FormatError::AbsurdCount {
                count: 1_000_000,
                ..
            }
        ),
        "{err:?}"
    );
    let err = format::decode(&wrap(1, 0, u32::MAX, raw.len() as u32, &raw)).unwrap_err();
    assert!(matches!(err, FormatError::TooManyEntries { .. }), "{err:?}");
    // Count mismatching the columns.
    let err = format::decode(&wrap(1, 0, 0, raw.len() as u32, &raw)).unwrap_err();
    assert!(matches!(err, FormatError::Corrupt(_)), "{err:?}");
}

#[test]
fn decompression_bomb_is_refused() {
    // Declared beyond the ceiling: refused from the header alone.
    let frame = zstd::bulk::compress(&vec![0u8; 4096], 1).unwrap();
    let err = format::decode(&wrap(1, 2, 1, 200 << 20, &frame)).unwrap_err();
    assert!(
        matches!(err, FormatError::DecompressionBomb { declared, .. } if declared == 200 << 20),
        "{err:?}"
    );
    assert!(
        err.to_string().starts_with("decompression bomb refused"),
        "{err}"
    );
    // Declared small, inflates large: the bounded decompressor stops.
    let bomb = zstd::bulk::compress(&vec![0u8; 32 << 20], 1).unwrap();
    assert!(bomb.len() < 4096);
    let err = format::decode(&wrap(1, 2, 1, 1000, &bomb)).unwrap_err();
    assert!(
        matches!(err, FormatError::Decompress { declared: 1000, .. }),
        "{err:?}"
    );
}

#[test]
fn unknown_required_attribute_is_an_error_optional_is_skipped() {
    let raw = one_udp_entry(Some(&[0x9f, 2, 1, 2]));
    let err = format::decode(&wrap(1, 0, 1, raw.len() as u32, &raw)).unwrap_err();
    assert!(
        matches!(
            err,
            FormatError::UnknownRequiredAttribute {
                entry: 0,
                kind: 0x9f
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("unknown required attribute 0x9f"),
        "{err}"
    );

    let raw = one_udp_entry(Some(&[0x1f, 3, 1, 2, 3, 0x81, 2, 5, 0]));
    let d = format::decode(&wrap(1, 0, 1, raw.len() as u32, &raw)).unwrap();
    assert_eq!(d.entries[0].zone, 5);
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut b = small_blob();
    b.push(0);
    assert!(matches!(
        format::decode(&b).unwrap_err(),
        FormatError::TrailingBytes { extra: 1 }
    ));
}

#[test]
fn legacy_text_bad_line_names_the_line() {
    let text = b"-A -t 10 -u SEEN_REPLY -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -q 10.0.0.1 -p udp --sport 1 --dport 2 --reply-port-src 2 --reply-port-dst 1 --mark 5\n\
-A -t 10 -u SEEN_REPLY -s 10.0.0.1 -d 10.0.0.2 -p udp --sport 1 --dport 2 --bogus 3 --mark 5\n";
    let err = format::decode(text).unwrap_err();
    match &err {
        FormatError::BadTextLine { line, reason, .. } => {
            assert_eq!(*line, 2);
            assert_eq!(reason, "unknown option \"--bogus\"");
        }
        e => panic!("{e:?}"),
    }
    assert!(
        err.to_string()
            .starts_with("bad conntrack text line 2: unknown option"),
        "{err}"
    );
    let err = format::decode(b"-A -t x -s 1.2.3.4").unwrap_err();
    assert!(
        err.to_string().contains("line 1: -t: invalid number \"x\""),
        "{err}"
    );
    let err = format::decode(b"-A -t 5 -s 1.2.3.4 -d ::1 -p udp --sport 1 --dport 2").unwrap_err();
    assert!(
        err.to_string().contains("addresses of different families"),
        "{err}"
    );
}

#[test]
fn perl_helper_empty_payload_is_empty() {
    let d = format::decode(&[0]).unwrap();
    assert!(d.entries.is_empty());
    assert_eq!(d.format, format::Format::ConntrackSave);
    assert!(matches!(
        format::decode(&[]).unwrap_err(),
        FormatError::Empty
    ));
}

#[test]
fn header_constants_match_the_spec() {
    assert_eq!(format::HEADER_LEN, 32);
    assert_eq!(format::MAX_RAW_LEN, 64 << 20);
    assert_eq!(format::MAX_ENTRIES, 2_000_000);
}

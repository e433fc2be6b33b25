//! The byte layout of state format v1 (`docs/state-format.md`): header
//! fields and flags, the decoder's ceilings, the record flags byte,
//! attribute types and the column streams, and the integer encodings
//! (varints, zigzag, little-endian) every part uses.

use crate::entry::L4;

pub const MAGIC: [u8; 4] = *b"CTVS";
pub(super) const MAJOR: u8 = 1;
pub const MINOR: u8 = 0;
/// Minor version of a segmented blob (v1.1; only the SEGMENTS flag is new).
pub const MINOR_SEGMENTS: u8 = 1;
/// Minor version of a patched blob (v1.2; only the PATCH flag is new).
pub const MINOR_PATCH: u8 = 2;
/// Minor version of a blob that says when it was saved (v1.3: the
/// SAVED_AT flag and its frame, in any of the layouts above).
pub const MINOR_SAVED_AT: u8 = 3;
/// Length of the header, and so of the smallest blob (no entries).
pub const HEADER_LEN: usize = 32;

/// Header flag: the sender dropped entries to fit its byte budget.
pub const FLAG_TRUNCATED: u16 = 1 << 0;
/// Header flag: the payload is one zstd frame.
pub const FLAG_ZSTD: u16 = 1 << 1;
/// Header flag (informational, v1.3): the payload ends in a saved-at frame
/// (`docs/state-format.md` §1.3). Informational, so an older decoder
/// ignores the flag, and the frame is a zstd skippable frame, which its
/// zstd decompression steps over.
pub const FLAG_SAVED_AT: u16 = 1 << 2;
/// Header flag (required, v1.1): the payload is a segment table and
/// independently coded segments (`docs/state-format.md` §1.1).
pub const FLAG_SEGMENTS: u16 = 1 << 8;
/// Header flag (required, v1.2): a patch block (base segments, their age,
/// records to skip) precedes the segment table (`docs/state-format.md`
/// §1.2). Only together with SEGMENTS.
pub const FLAG_PATCH: u16 = 1 << 9;
/// Flags this decoder understands. Unknown bits 0–7 are informational and
/// ignored; unknown bits 8–15 change the meaning of the payload and are an
/// error.
pub(super) const KNOWN_FLAGS: u16 =
    FLAG_TRUNCATED | FLAG_ZSTD | FLAG_SAVED_AT | FLAG_SEGMENTS | FLAG_PATCH;
pub(super) const REQUIRED_FLAG_MASK: u16 = 0xff00;

/// The saved-at frame: a zstd skippable frame (magic 0x184D2A50, LE),
/// content length 8 (u32 LE), then the time (u64 LE, microseconds since the
/// Unix epoch).
pub(super) const SAVED_AT_MAGIC: u32 = 0x184D_2A50;
pub(super) const SAVED_AT_LEN: usize = 16;

/// Ceiling on the decompressed payload a decoder accepts (64 MiB).
pub const MAX_RAW_LEN: usize = 64 << 20;
/// Ceiling on the entry count a decoder accepts.
pub const MAX_ENTRIES: usize = 2_000_000;
/// Smallest possible record: flags, proto, two IPv4 addresses, 1-byte
/// status and timeout varints (other protocol, no ports).
pub(super) const MIN_RECORD_LEN: usize = 12;
/// Most segments one blob may hold (the decoder's ceiling).
pub(super) const MAX_SEGMENTS: usize = 16;
/// Bytes of one segment table row: count, raw_len, stored_len (u32 each).
pub(super) const SEGMENT_ENTRY_LEN: usize = 12;

/// zstd level: higher levels barely shrink the blob and cost migration
/// downtime (docs/state-format.md, section 1).
pub(super) const ZSTD_LEVEL: i32 = 1;

// Record flags byte.
pub(super) const R_IPV6: u8 = 1 << 0;
pub(super) const R_REPLY: u8 = 1 << 1;
pub(super) const R_NEAR_SAME: u8 = 1 << 2;
pub(super) const R_ATTRS: u8 = 1 << 3;
pub(super) const R_TCPINFO: u8 = 1 << 4;
pub(super) const R_L4_SHIFT: u8 = 5;
pub(super) const R_L4_MASK: u8 = 0b11 << R_L4_SHIFT;
pub(super) const R_SWAP: u8 = 1 << 7;
pub(super) const L4_NONE: u8 = 0;
pub(super) const L4_PORTS: u8 = 1;
pub(super) const L4_ICMP: u8 = 2;

// Attribute types; bit 7 set = required (a decoder that does not know it
// must reject the blob), clear = optional (skipped when unknown).
pub(super) const ATTR_END: u8 = 0x00;
pub(super) const ATTR_LABELS: u8 = 0x01;
pub(super) const ATTR_ZONE: u8 = 0x81;
pub(super) const ATTR_ORIG_ZONE: u8 = 0x82;
pub(super) const ATTR_REPLY_ZONE: u8 = 0x83;
pub(super) const ATTR_SCTP: u8 = 0x84;
pub(super) const ATTR_DCCP: u8 = 0x85;
pub(super) const ATTR_SEQ_ADJ_ORIG: u8 = 0x86;
pub(super) const ATTR_SEQ_ADJ_REPLY: u8 = 0x87;
pub(super) const ATTR_HELPER: u8 = 0x88;
pub(super) const ATTR_MARK: u8 = 0x89;
pub(super) const ATTR_REQUIRED: u8 = 0x80;
/// Longest helper name carried (the kernel's limit is 16 bytes).
pub(super) const MAX_HELPER_LEN: usize = 64;

/// Column streams, in payload order.
pub(super) const S_FLAGS: usize = 0;
pub(super) const S_PROTO: usize = 1;
pub(super) const S_NEAR: usize = 2;
pub(super) const S_FAR: usize = 3;
pub(super) const S_SPORT: usize = 4;
pub(super) const S_DPORT: usize = 5;
pub(super) const S_STATUS: usize = 6;
pub(super) const S_TIMEOUT: usize = 7;
pub(super) const S_TCPINFO: usize = 8;
pub(super) const S_REPLY: usize = 9;
pub(super) const S_ATTRS: usize = 10;
pub(super) const STREAMS: usize = 11;
pub(super) const STREAM_NAMES: [&str; STREAMS] = [
    "flags", "proto", "near", "far", "sport", "dport", "status", "timeout", "tcpinfo", "reply",
    "attrs",
];

pub(super) fn l4_kind(l4: &L4) -> u8 {
    match l4 {
        L4::None => L4_NONE,
        L4::Ports { .. } => L4_PORTS,
        L4::Icmp { .. } => L4_ICMP,
    }
}

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(super) fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

pub(super) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(super) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

pub(super) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(super) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The saved-at frame for `us` microseconds since the Unix epoch.
pub(super) fn saved_at_frame(us: u64) -> [u8; SAVED_AT_LEN] {
    let mut f = [0u8; SAVED_AT_LEN];
    f[..4].copy_from_slice(&SAVED_AT_MAGIC.to_le_bytes());
    f[4..8].copy_from_slice(&8u32.to_le_bytes());
    f[8..].copy_from_slice(&us.to_le_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_len_matches_encoding() {
        for v in [
            0u64,
            1,
            127,
            128,
            16383,
            16384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }

    #[test]
    fn zigzag_round_trips() {
        for v in [
            0i64,
            1,
            -1,
            432_000,
            -432_000,
            i64::from(u32::MAX),
            -i64::from(u32::MAX),
        ] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }
}

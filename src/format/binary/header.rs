//! The 32-byte header: writing it (with the checksum over header and
//! payload) and checking it before anything else of a blob is read.

use super::layout::*;
use crate::format::FormatError;

/// Header fields of a v1 blob.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub minor: u8,
    pub flags: u16,
    pub count: u32,
    pub dropped: u32,
    pub default_mark: u32,
    pub raw_len: u32,
    pub payload_len: u32,
    /// When the state was saved, microseconds since the Unix epoch (the
    /// saved-at frame of v1.3, §1.3); `None` for a blob without one.
    pub saved_at: Option<u64>,
}

/// The 32-byte header followed by `payload`, checksummed. With
/// `h.saved_at`, the saved-at frame ends the payload (and the flag and
/// minor version say so); a segmented caller counts its 16 bytes in the
/// last segment's stored length.
pub(super) fn assemble(h: &Header, parts: &[&[u8]]) -> Vec<u8> {
    let stamp = h.saved_at.map(saved_at_frame);
    let stamp: &[u8] = stamp.as_ref().map_or(&[], |s| s.as_slice());
    let parts_len: usize = parts.iter().map(|p| p.len()).sum();
    let payload_len = parts_len + stamp.len();
    let (minor, flags) = match h.saved_at {
        Some(_) => (MINOR_SAVED_AT, h.flags | FLAG_SAVED_AT),
        None => (h.minor, h.flags),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload_len);
    out.extend_from_slice(&MAGIC);
    out.push(MAJOR);
    out.push(minor);
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&h.count.to_le_bytes());
    out.extend_from_slice(&h.dropped.to_le_bytes());
    out.extend_from_slice(&h.default_mark.to_le_bytes());
    out.extend_from_slice(&h.raw_len.to_le_bytes());
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    let mut crc = crc32c::crc32c(&out);
    for p in parts.iter().chain([&stamp]) {
        crc = crc32c::crc32c_append(crc, p);
    }
    out.extend_from_slice(&crc.to_le_bytes());
    for p in parts.iter().chain([&stamp]) {
        out.extend_from_slice(p);
    }
    out
}

pub(super) fn dropped_u32(dropped: usize) -> u32 {
    dropped.min(u32::MAX as usize) as u32
}

/// Checks the header, the size declarations against the ceilings and the
/// checksum; nothing is allocated before these pass.
pub fn check_header(bytes: &[u8]) -> Result<Header, FormatError> {
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Truncated {
            what: "state header",
            needed: HEADER_LEN,
            got: bytes.len(),
        });
    }
    if bytes[..4] != MAGIC {
        return Err(FormatError::WrongMagic {
            found: bytes[..4].to_vec(),
        });
    }
    let major = bytes[4];
    let minor = bytes[5];
    if major != MAJOR {
        return Err(FormatError::UnsupportedVersion { major, minor });
    }
    let flags = le16(bytes, 6);
    let unknown = flags & REQUIRED_FLAG_MASK & !KNOWN_FLAGS;
    if unknown != 0 {
        return Err(FormatError::UnknownFlags(unknown));
    }
    let h = Header {
        minor,
        flags,
        count: le32(bytes, 8),
        dropped: le32(bytes, 12),
        default_mark: le32(bytes, 16),
        raw_len: le32(bytes, 20),
        payload_len: le32(bytes, 24),
        saved_at: None,
    };
    let total = HEADER_LEN as u64 + u64::from(h.payload_len);
    if (bytes.len() as u64) < total {
        return Err(FormatError::Truncated {
            what: "state payload",
            needed: total as usize,
            got: bytes.len(),
        });
    }
    if (bytes.len() as u64) > total {
        return Err(FormatError::TrailingBytes {
            extra: bytes.len() - total as usize,
        });
    }
    let stored = le32(bytes, 28);
    let computed = crc32c::crc32c_append(crc32c::crc32c(&bytes[..28]), &bytes[HEADER_LEN..]);
    if stored != computed {
        return Err(FormatError::ChecksumMismatch { stored, computed });
    }
    if h.count as usize > MAX_ENTRIES {
        return Err(FormatError::TooManyEntries {
            count: u64::from(h.count),
            max: MAX_ENTRIES,
        });
    }
    if h.raw_len as usize > MAX_RAW_LEN {
        return Err(FormatError::DecompressionBomb {
            declared: u64::from(h.raw_len),
            max: MAX_RAW_LEN,
        });
    }
    if (h.count as u64) * (MIN_RECORD_LEN as u64) > u64::from(h.raw_len) {
        return Err(FormatError::AbsurdCount {
            count: h.count,
            raw_len: h.raw_len,
        });
    }
    if h.flags & FLAG_PATCH != 0 && h.flags & FLAG_SEGMENTS == 0 {
        return Err(FormatError::Corrupt(
            "PATCH flag without SEGMENTS (a patch needs the segment layout)".into(),
        ));
    }
    if h.flags & (FLAG_ZSTD | FLAG_SEGMENTS) == 0 && h.raw_len != h.payload_len {
        return Err(FormatError::Corrupt(format!(
            "uncompressed payload is {} bytes but the header declares {}",
            h.payload_len, h.raw_len
        )));
    }
    let saved_at = saved_at(&h, &bytes[HEADER_LEN..])?;
    Ok(Header { saved_at, ..h })
}

/// The saved-at time of a blob whose header carries the SAVED_AT flag
/// (§1.3): the 16-byte zstd skippable frame that ends the payload. The
/// frame stays part of the (last) segment's stored bytes, which zstd
/// steps over when inflating, as a decoder that predates v1.3 does.
fn saved_at(h: &Header, payload: &[u8]) -> Result<Option<u64>, FormatError> {
    if h.flags & FLAG_SAVED_AT == 0 {
        return Ok(None);
    }
    if h.flags & FLAG_ZSTD == 0 {
        return Err(FormatError::Corrupt(
            "SAVED_AT flag on an uncompressed payload (the saved-at frame needs ZSTD)".into(),
        ));
    }
    let Some(at) = payload.len().checked_sub(SAVED_AT_LEN) else {
        return Err(FormatError::Corrupt(format!(
            "SAVED_AT flag, but the payload of {} bytes cannot end in the {SAVED_AT_LEN}-byte saved-at frame",
            payload.len()
        )));
    };
    let f = &payload[at..];
    if le32(f, 0) != SAVED_AT_MAGIC || le32(f, 4) != 8 {
        return Err(FormatError::Corrupt(format!(
            "SAVED_AT flag, but the payload does not end in a saved-at frame \
             (found magic {:#010x}, length {}; expected {SAVED_AT_MAGIC:#010x}, 8)",
            le32(f, 0),
            le32(f, 4)
        )));
    }
    Ok(Some(u64::from(le32(f, 8)) | (u64::from(le32(f, 12)) << 32)))
}

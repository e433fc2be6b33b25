//! State format v1.2 (`docs/state-format.md` §1.2): a patched blob, i.e.
//! pre-encoded base segments, their age and the records to skip, then the
//! delta segments. Writing one here; reading the patch block too, which the
//! decoder applies to the segment table.

use super::header::dropped_u32;
use super::layout::*;
use super::segments::{put_segment_table, Frame};
use crate::format::FormatError;

/// Assembles a v1.2 patched blob (§1.2): the `base` frames, whose records
/// lose `age_secs` seconds of timeout on Load and of which the stored
/// indices in `skip` (strictly ascending, below the base's record count)
/// are left out, then the `delta` frames (may be none). All frames must
/// have been encoded with `default_mark`.
///
/// On Save's hot path: one allocation of the exact size, one copy of each
/// frame, one checksum pass; nothing else looks at the frames' bytes.
///
/// The blob says it was saved now (§1.3); [`assemble_patched_at`] takes
/// the time.
pub fn assemble_patched(
    base: &[Frame],
    age_secs: u32,
    skip: &[u32],
    delta: &[Frame],
    dropped: usize,
    default_mark: u32,
) -> Result<Vec<u8>, FormatError> {
    let now = Some(crate::format::wall_clock_us());
    assemble_patched_at(base, age_secs, skip, delta, dropped, default_mark, now)
}

/// [`assemble_patched`] saved at `saved_at` (microseconds since the Unix
/// epoch; `None`: no saved-at frame, as a release before v1.3 writes it).
pub fn assemble_patched_at(
    base: &[Frame],
    age_secs: u32,
    skip: &[u32],
    delta: &[Frame],
    dropped: usize,
    default_mark: u32,
    saved_at: Option<u64>,
) -> Result<Vec<u8>, FormatError> {
    let bad = |m: String| Err(FormatError::Patch(m));
    if base.is_empty() {
        return bad("no base segment".into());
    }
    let n = base.len() + delta.len();
    if n > MAX_SEGMENTS {
        return bad(format!(
            "{} base and {} delta segments, at most {MAX_SEGMENTS} in all",
            base.len(),
            delta.len()
        ));
    }
    let (mut records, mut raw, mut bytes) = (0u64, 0u64, 0u64);
    let mut base_records = 0u64;
    for (i, f) in base.iter().chain(delta).enumerate() {
        if f.count == 0 {
            return bad(format!("segment {i} holds no entries"));
        }
        if (f.count as usize).saturating_mul(MIN_RECORD_LEN) > f.raw_len as usize {
            return bad(format!(
                "segment {i}: {} entries cannot fit in {} bytes",
                f.count, f.raw_len
            ));
        }
        records += u64::from(f.count);
        raw += u64::from(f.raw_len);
        bytes += f.bytes.len() as u64;
        if i + 1 == base.len() {
            base_records = records;
        }
    }
    if records > MAX_ENTRIES as u64 {
        return Err(FormatError::TooManyEntries {
            count: records,
            max: MAX_ENTRIES,
        });
    }
    if raw > MAX_RAW_LEN as u64 {
        return Err(FormatError::DecompressionBomb {
            declared: raw,
            max: MAX_RAW_LEN,
        });
    }
    let mut block_len = 1 + varint_len(u64::from(age_secs)) + varint_len(skip.len() as u64);
    let mut next = 0u64;
    for &s in skip {
        let s = u64::from(s);
        if s < next {
            return bad(format!("skip list not strictly ascending at {s}"));
        }
        if s >= base_records {
            return bad(format!(
                "skip of stored record {s}, beyond the {base_records} base records"
            ));
        }
        block_len += varint_len(s - next);
        next = s + 1;
    }
    let stamp = saved_at.map(saved_at_frame);
    let stamp: &[u8] = stamp.as_ref().map_or(&[], |s| s.as_slice());
    let payload_len =
        block_len as u64 + 1 + (SEGMENT_ENTRY_LEN * n) as u64 + bytes + stamp.len() as u64;
    let Ok(payload_len) = u32::try_from(payload_len) else {
        return bad(format!("payload of {payload_len} bytes exceeds 32 bits"));
    };
    let total = HEADER_LEN + payload_len as usize;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&MAGIC);
    out.push(MAJOR);
    out.push(if saved_at.is_some() {
        MINOR_SAVED_AT
    } else {
        MINOR_PATCH
    });
    let flags = FLAG_SEGMENTS
        | FLAG_ZSTD
        | FLAG_PATCH
        | if dropped > 0 { FLAG_TRUNCATED } else { 0 }
        | if saved_at.is_some() { FLAG_SAVED_AT } else { 0 };
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&((records - skip.len() as u64) as u32).to_le_bytes());
    out.extend_from_slice(&dropped_u32(dropped).to_le_bytes());
    out.extend_from_slice(&default_mark.to_le_bytes());
    out.extend_from_slice(&(raw as u32).to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // crc32c, below
    out.push(base.len() as u8);
    put_varint(&mut out, u64::from(age_secs));
    put_varint(&mut out, skip.len() as u64);
    let mut next = 0u32;
    for &s in skip {
        put_varint(&mut out, u64::from(s - next));
        next = s + 1;
    }
    put_segment_table(&mut out, n, base.iter().chain(delta), stamp.len());
    for f in base.iter().chain(delta) {
        out.extend_from_slice(&f.bytes);
    }
    out.extend_from_slice(stamp);
    debug_assert_eq!(out.len(), total);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..28]), &out[HEADER_LEN..]);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// What a patch block says (§1.2), skips as stored indices.
pub(super) struct Patch {
    pub(super) nbase: usize,
    pub(super) age: u32,
    pub(super) skip: Vec<u64>,
}

/// Parses the patch block at the start of `payload`; returns it and its
/// length. The skip list is bounded by the input: every gap takes a byte.
pub(super) fn patch_block(payload: &[u8]) -> Result<(Patch, usize), FormatError> {
    let corrupt = |m: String| FormatError::Corrupt(format!("patch block: {m}"));
    let mut pos = 0usize;
    let u32_at = |pos: &mut usize, what: &dyn Fn() -> String| -> Result<u32, FormatError> {
        let mut v = 0u64;
        for i in 0..10 {
            let Some(&b) = payload.get(*pos) else {
                return Err(corrupt(format!("ends inside the {}", what())));
            };
            *pos += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return u32::try_from(v)
                    .map_err(|_| corrupt(format!("{} {v} exceeds 32 bits", what())));
            }
        }
        Err(corrupt(format!("overlong varint for the {}", what())))
    };
    let Some(&nbase) = payload.first() else {
        return Err(corrupt("ends inside the base segment count".into()));
    };
    pos += 1;
    if nbase == 0 {
        return Err(FormatError::Corrupt(
            "patch block declares 0 base segments (at least 1)".into(),
        ));
    }
    let age = u32_at(&mut pos, &|| "age".into())?;
    let nskip = u32_at(&mut pos, &|| "skip count".into())? as usize;
    let mut skip = Vec::with_capacity(nskip.min(payload.len() - pos));
    let mut next = 0u64;
    for k in 0..nskip {
        let gap = u32_at(&mut pos, &|| format!("gap of skip {k}"))?;
        let s = next.saturating_add(u64::from(gap));
        skip.push(s);
        next = s + 1;
    }
    Ok((
        Patch {
            nbase: nbase as usize,
            age,
            skip,
        },
        pos,
    ))
}

//! State format v1.1 (`docs/state-format.md` §1.1): a blob of independent
//! segments behind a segment table, built, compressed and decoded in
//! parallel.

use super::encode::{build_columns, compressor, Encoder};
use super::header::{assemble, dropped_u32, Header};
use super::layout::*;
use super::record::View;
use crate::format::FormatError;

/// Fewest entries per segment: below this a second thread costs more than
/// it saves and the smaller zstd context costs ratio.
pub(super) const MIN_SEGMENT_ENTRIES: usize = 16_384;

/// How many segments [`encode_segmented`] uses for `n` entries on this
/// machine: one per CPU (at most 4) while each keeps at least
/// `MIN_SEGMENT_ENTRIES`.
pub fn default_segments(n: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    cpus.min(4).min(n / MIN_SEGMENT_ENTRIES).max(1)
}

/// One compressed segment: `count` records, `raw_len` raw bytes, zstd frame
/// in `bytes` (§1.1: a v1.0 payload decoded with fresh state).
#[derive(Debug, Clone)]
pub struct Frame {
    pub count: u32,
    pub raw_len: u32,
    pub bytes: Vec<u8>,
}

/// Encodes all of `views` (priority order) as one blob in `segments`
/// independent parts built and compressed in parallel (Save is migration
/// downtime and the guest is stopped, so the CPUs are free). One segment
/// gives the plain v1.0 layout. Layout: `docs/state-format.md` §1.1.
///
/// Without a saved-at time, as a release before v1.3 writes it (tests
/// build such blobs); [`encode_segmented_at`] stamps it.
pub fn encode_segmented(
    views: &[View],
    segments: usize,
    dropped: usize,
    default_mark: u32,
) -> Result<Vec<u8>, FormatError> {
    encode_segmented_at(views, segments, dropped, default_mark, None)
}

/// [`encode_segmented`], the blob saying it was saved at `saved_at`
/// (microseconds since the Unix epoch, §1.3) when it holds entries.
pub fn encode_segmented_at(
    views: &[View],
    segments: usize,
    dropped: usize,
    default_mark: u32,
    saved_at: Option<u64>,
) -> Result<Vec<u8>, FormatError> {
    encode_segmented_in(views, segments, false, dropped, default_mark, saved_at)
}

/// [`encode_segmented_at`] in the frames of [`encode_frames_headed`]: what
/// Save's whole encode writes.
pub(super) fn encode_segmented_headed_at(
    views: &[View],
    segments: usize,
    dropped: usize,
    default_mark: u32,
    saved_at: Option<u64>,
) -> Result<Vec<u8>, FormatError> {
    encode_segmented_in(views, segments, true, dropped, default_mark, saved_at)
}

fn encode_segmented_in(
    views: &[View],
    segments: usize,
    headed: bool,
    dropped: usize,
    default_mark: u32,
    saved_at: Option<u64>,
) -> Result<Vec<u8>, FormatError> {
    let segments = segments.clamp(1, MAX_SEGMENTS).min(views.len().max(1));
    if segments == 1 {
        let n = views.len();
        return Encoder::whole(views, default_mark)?
            .saved_at(saved_at)
            .blob(n, dropped);
    }
    let frames = encode_frames_in(views, segments, headed, default_mark)?;
    let mut table = Vec::with_capacity(1 + SEGMENT_ENTRY_LEN * frames.len());
    let stamp = if saved_at.is_some() { SAVED_AT_LEN } else { 0 };
    put_segment_table(&mut table, frames.len(), frames.iter(), stamp);
    let h = Header {
        minor: MINOR_SEGMENTS,
        flags: FLAG_SEGMENTS | FLAG_ZSTD | if dropped > 0 { FLAG_TRUNCATED } else { 0 },
        count: views.len() as u32,
        dropped: dropped_u32(dropped),
        default_mark,
        raw_len: frames.iter().map(|f| f.raw_len).sum(),
        payload_len: 0,
        saved_at,
    };
    let mut refs: Vec<&[u8]> = vec![&table];
    refs.extend(frames.iter().map(|f| f.bytes.as_slice()));
    Ok(assemble(&h, &refs))
}

/// `n`, then one row per frame (§1.1); the last segment's stored bytes
/// are followed by `trailer` more (the saved-at frame, §1.3).
pub(super) fn put_segment_table<'a>(
    out: &mut Vec<u8>,
    n: usize,
    frames: impl Iterator<Item = &'a Frame>,
    trailer: usize,
) {
    out.push(n as u8);
    for (i, f) in frames.enumerate() {
        let stored = f.bytes.len() + if i + 1 == n { trailer } else { 0 };
        out.extend_from_slice(&f.count.to_le_bytes());
        out.extend_from_slice(&f.raw_len.to_le_bytes());
        out.extend_from_slice(&(stored as u32).to_le_bytes());
    }
}

/// `views`, already in priority order, as `segments` balanced frames
/// (clamped to 1..=`MAX_SEGMENTS` and to at most one per view; no views,
/// no frames), built and compressed in parallel. Every frame must be
/// encoded with the `default_mark` of the blob it goes into.
pub fn encode_frames(
    views: &[View],
    segments: usize,
    default_mark: u32,
) -> Result<Vec<Frame>, FormatError> {
    encode_frames_in(views, segments, false, default_mark)
}

/// Records of the head segment that [`encode_frames_headed`] puts before
/// the balanced ones: what Load validates before its answer
/// (`check_progressive`), ~0.4 ms at this size instead of a whole
/// balanced segment's ~5–10 ms at 100k entries; a zstd context this size
/// still compresses within ~1 B per entry of a large one.
pub const HEAD_ENTRIES: usize = 4096;

/// [`encode_frames`], and when that gives several frames and `views`
/// holds at least 4 × [`HEAD_ENTRIES`], a head frame of the first
/// [`HEAD_ENTRIES`] views before them (`segments` + 1 frames in all, at
/// most `MAX_SEGMENTS`). The warm cache keeps these as the base of a
/// patched blob ([`assemble_patched`](super::patch::assemble_patched)),
/// and Save's whole encode uses them too.
pub fn encode_frames_headed(
    views: &[View],
    segments: usize,
    default_mark: u32,
) -> Result<Vec<Frame>, FormatError> {
    encode_frames_in(views, segments, true, default_mark)
}

fn encode_frames_in(
    views: &[View],
    segments: usize,
    headed: bool,
    default_mark: u32,
) -> Result<Vec<Frame>, FormatError> {
    if views.is_empty() {
        return Ok(Vec::new());
    }
    if views.len() > MAX_ENTRIES {
        return Err(FormatError::TooManyEntries {
            count: views.len() as u64,
            max: MAX_ENTRIES,
        });
    }
    let segments = segments.clamp(1, MAX_SEGMENTS).min(views.len());
    let head = headed && (2..MAX_SEGMENTS).contains(&segments) && views.len() >= 4 * HEAD_ENTRIES;
    let mut chunks = Vec::with_capacity(segments + 1);
    let mut rest = views;
    if head {
        let (c, r) = rest.split_at(HEAD_ENTRIES);
        chunks.push(c);
        rest = r;
    }
    // Balanced: the first `len % segments` segments take one entry more.
    let (base, extra) = (rest.len() / segments, rest.len() % segments);
    for i in 0..segments {
        let (c, r) = rest.split_at(base + usize::from(i < extra));
        chunks.push(c);
        rest = r;
    }
    // Segments are always compressed (the ZSTD flag covers the whole blob):
    // at MIN_SEGMENT_ENTRIES and more real entries always shrink, and a tiny
    // delta costs a few bytes of frame header at most.
    let work = |part: &[View]| -> Result<Frame, FormatError> {
        let cols = build_columns(part, default_mark, false);
        let mut raw = Vec::new();
        cols.write_raw(part.len(), &mut raw);
        let raw_len = u32::try_from(raw.len())
            .ok()
            .filter(|&l| l as usize <= MAX_RAW_LEN)
            .ok_or(FormatError::DecompressionBomb {
                declared: raw.len() as u64,
                max: MAX_RAW_LEN,
            })?;
        let bytes = compressor()?
            .compress(&raw)
            .map_err(|e| FormatError::Compression(e.to_string()))?;
        Ok(Frame {
            count: part.len() as u32,
            raw_len,
            bytes,
        })
    };
    in_parallel(
        &chunks,
        |_, c| work(c),
        || FormatError::Compression("segment encoder thread panicked".into()),
    )
}

/// `f` on every item, the first on this thread and every other on a thread
/// of its own (segments are few: at most one per CPU from our encoder,
/// [`MAX_SEGMENTS`] from anyone), results in item order; the first error
/// wins. A worker that panics yields `panicked()`.
pub(super) fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(usize, &T) -> Result<R, FormatError> + Sync,
    panicked: impl Fn() -> FormatError,
) -> Result<Vec<R>, FormatError> {
    let Some(first) = items.first() else {
        return Ok(Vec::new());
    };
    let f = &f;
    let results: Vec<Result<R, FormatError>> = std::thread::scope(|sc| {
        let handles: Vec<_> = items
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, x)| sc.spawn(move || f(i, x)))
            .collect();
        let mut out = Vec::with_capacity(items.len());
        out.push(f(0, first));
        out.extend(
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(panicked()))),
        );
        out
    });
    results.into_iter().collect()
}

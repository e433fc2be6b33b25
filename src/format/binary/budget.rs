//! Fitting a state into a byte limit: the whole set when it fits (segmented,
//! in parallel), else the longest priority-order prefix that does, found by
//! a few guided attempts (`docs/state-format.md` §5).

use super::encode::Encoder;
use super::layout::HEADER_LEN;
use super::rank::rank_and_mark;
use super::record::View;
use super::segments::{default_segments, encode_segmented_headed_at};
use crate::format::{Encoded, FormatError};

/// Most cut attempts the budget search makes before settling for the best
/// fitting one found.
pub(super) const MAX_CUT_ATTEMPTS: usize = 12;

/// A compression ratio the payload practically never beats (measured ~3.2
/// on the realistic mix); only used to skip hopeless first attempts.
pub(super) const GENEROUS_RATIO: usize = 5;

/// Up to `limit / LIKELY_FITS_BYTES` entries the whole set is expected to
/// fit (the realistic mix takes 7.5–10 B/entry; a wrong guess costs one
/// more column build, ~7 ms at 130k entries).
pub(super) const LIKELY_FITS_BYTES: usize = 8;

/// The largest `k` in `0..=n` with `fits(k)`, given that `fits(0)` holds
/// and `fits` is true up to some point and false after it.
pub(super) fn partition_point(n: usize, fits: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0usize, n + 1);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// `format::encode_views` for the binary format: the most valuable views
/// that fit in `limit` bytes, as one blob, saying it was saved at
/// `saved_at` (§1.3; the saved-at frame counts against the limit).
pub(crate) fn encode_binary(
    views: &[View],
    limit: usize,
    mark: Option<u32>,
    saved_at: Option<u64>,
) -> Result<Encoded, FormatError> {
    if limit < HEADER_LEN {
        return Err(FormatError::LimitTooSmall {
            limit,
            min: HEADER_LEN,
            format: "binary",
        });
    }
    // Blob order is priority order: the budget cut keeps a prefix, the
    // load path creates the most valuable first, and timeouts descend
    // within a class (small deltas).
    let total = views.len();
    let (ranked, mark) = rank_and_mark(views, mark);
    let n = ranked.len();
    // The common case is that everything fits: then the columns are built
    // without the per-entry prefix lengths the cut search needs (44 bytes of
    // fresh memory per entry), in segments built and compressed in parallel.
    // Only when the whole set is too big are they built again with
    // prefixes; beyond `limit / LIKELY_FITS_BYTES` entries that is expected,
    // so prefixes are recorded from the start.
    // The size of a whole-set attempt that did not fit seeds the search.
    let mut too_big_whole: Option<usize> = None;
    if n.saturating_mul(LIKELY_FITS_BYTES) <= limit {
        let b =
            encode_segmented_headed_at(&ranked, default_segments(n), total - n, mark, saved_at)?;
        if b.len() <= limit {
            return Ok(Encoded {
                bytes: b,
                kept: n,
                dropped: total - n,
            });
        }
        too_big_whole = Some(b.len());
    }
    let mut enc = Encoder::new(&ranked, mark)?.saved_at(saved_at);
    // First attempt: everything, unless the raw size shows it cannot fit
    // even at a generous compression ratio; then the largest prefix whose
    // raw size could (saves compressing a table that is far too big).
    let plausible = limit.saturating_mul(GENEROUS_RATIO);
    let first = if enc.raw_len(n) <= plausible {
        n
    } else {
        partition_point(n, |k| enc.raw_len(k) <= plausible)
    };
    let (first_len, b) = match too_big_whole {
        Some(len) if first == n => (len, None),
        _ => {
            let b = enc.blob(first, total - first)?;
            (b.len(), Some(b))
        }
    };
    let b = match b {
        Some(b) if first == n && b.len() <= limit => {
            return Ok(Encoded {
                bytes: b,
                kept: n,
                dropped: total - n,
            })
        }
        other => other,
    };
    let h = HEADER_LEN as f64;
    let room = (limit - HEADER_LEN) as f64;
    // Invariant: `lo` entries fit (0 always does), `hi` entries do not.
    let (mut lo, mut hi) = (0usize, n);
    let mut best: Option<Vec<u8>> = None;
    let used = (first_len as f64 - h).max(1.0);
    let mut guess = (first as f64 * room / used * 0.997) as usize;
    match b {
        Some(b) if b.len() <= limit => {
            lo = first;
            best = Some(b);
        }
        _ => hi = first,
    }
    for _ in 0..MAX_CUT_ATTEMPTS {
        if hi - lo <= 1 {
            break;
        }
        if guess <= lo || guess >= hi {
            guess = lo + (hi - lo) / 2;
        }
        let b = enc.blob(guess, total - guess)?;
        let used = (b.len() as f64 - h).max(1.0);
        if b.len() <= limit {
            lo = guess;
            let slack = limit - b.len();
            best = Some(b);
            // Close enough: the rest would hold under 0.5% more entries.
            if slack <= limit / 200 {
                break;
            }
            guess = (guess as f64 * room / used * 0.999) as usize;
        } else {
            hi = guess;
            guess = (guess as f64 * room / used * 0.997) as usize;
        }
    }
    match best {
        Some(bytes) => Ok(Encoded {
            bytes,
            kept: lo,
            dropped: total - lo,
        }),
        None => Ok(Encoded {
            bytes: enc.blob(0, total)?,
            kept: 0,
            dropped: total,
        }),
    }
}

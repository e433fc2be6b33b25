//! State format v1: header, columnar records, zstd, crc32c.
//! The byte-level specification is `docs/state-format.md`; keep them in step.
//!
//! Private to `format`, which re-exports the few items its users need. One
//! file per part of the format, each depending only on those above it:
//!
//! * `layout`: constants of the byte layout, varints and little-endian reads
//! * `record`: what the encoder takes ([`View`], [`Rec`], [`Compact`])
//! * `rank`: views in blob (priority) order, the default mark
//! * `header`: writing and checking the 32-byte header
//! * `encode`: the v1.0 encoder (columns, one zstd frame, any prefix)
//! * `segments`: v1.1 segments, built and compressed in parallel
//! * `patch`: v1.2 patched blobs (base frames, age, skips, delta)
//!   (the v1.3 saved-at frame: `layout`, written by `header` and `patch`)
//! * `budget`: fitting a state into a byte limit
//! * `decode`: the decoder (payload segments, columns back into entries)
//! * `check`: validating a whole blob, then streaming it batch by batch
//! * `debug`: per-column sizes, for measurements

mod budget;
mod check;
mod debug;
mod decode;
mod encode;
mod header;
mod layout;
mod patch;
mod rank;
mod record;
mod segments;

pub(crate) use budget::encode_binary;
pub use check::{check, check_aged, check_progressive, Checked};
pub use debug::debug_stream_sizes;
pub use decode::{decode, decode_segments};
pub use header::{check_header, Header};
pub use layout::{
    FLAG_PATCH, FLAG_SAVED_AT, FLAG_SEGMENTS, FLAG_TRUNCATED, FLAG_ZSTD, HEADER_LEN, MAGIC,
    MAX_ENTRIES, MAX_RAW_LEN, MINOR, MINOR_PATCH, MINOR_SAVED_AT, MINOR_SEGMENTS,
};
pub use patch::{assemble_patched, assemble_patched_at};
pub(crate) use rank::{rank_and_mark, ranked_positions};
pub use rank::{rank_views, views_default_mark};
pub use record::{representable, Compact, Rec, View};
pub use segments::{
    default_segments, encode_frames, encode_frames_headed, encode_segmented, encode_segmented_at,
    Frame, HEAD_ENTRIES,
};

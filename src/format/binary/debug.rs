//! Per-column sizes of an encoding, for measuring what the columns cost
//! (`examples/stream_sizes.rs`).

use super::encode::Columns;
use super::layout::{STREAM_NAMES, ZSTD_LEVEL};
use super::rank::default_mark;
use super::record::Rec;
use crate::entry::Entry;

#[doc(hidden)]
pub fn debug_stream_sizes(entries: &[&Entry]) -> Vec<(&'static str, usize, usize)> {
    let mut c = Columns::new(default_mark(entries.iter().copied()), entries.len(), false);
    for e in entries {
        c.push(Rec::Full(e), e.timeout);
    }
    c.s.iter()
        .enumerate()
        .map(|(i, s)| {
            let z = zstd::bulk::compress(s, ZSTD_LEVEL)
                .map(|v| v.len())
                .unwrap_or(0);
            (STREAM_NAMES[i], s.len(), z)
        })
        .collect()
}

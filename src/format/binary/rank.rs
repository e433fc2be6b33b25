//! Views in blob order (most valuable first, by the keys [`priority`]
//! defines) and the blob's default mark.

use super::record::View;
use crate::entry::Entry;
use crate::format::priority;

/// The most common mark, by majority vote (exact when one mark holds more
/// than half the entries, which is the per-VM case; any value is correct).
pub(super) fn default_mark<'a>(entries: impl Iterator<Item = &'a Entry>) -> u32 {
    default_mark_of(entries.map(|e| e.mark))
}

pub(super) fn default_mark_of(marks: impl Iterator<Item = u32>) -> u32 {
    let (mut cand, mut n) = (0u32, 0usize);
    for mark in marks {
        if n == 0 {
            cand = mark;
            n = 1;
        } else if mark == cand {
            n += 1;
        } else {
            n -= 1;
        }
    }
    cand
}

/// The most common mark of `views` (`default_mark`), for callers of
/// `encode_segmented` and `Encoder` that did not get it while ranking.
pub fn views_default_mark(views: &[View]) -> u32 {
    default_mark_of(views.iter().map(|v| v.rec.mark()))
}

/// `views` reordered most valuable first (by their keys), ties in input
/// order, without the excluded ones: the same order
/// [`priority::priority_order`] gives entries whose timeout field holds the
/// seconds left.
pub fn rank_views<'a>(views: &[View<'a>]) -> Vec<View<'a>> {
    // Any mark: only the order is wanted.
    rank_and_mark(views, Some(0)).0
}

/// [`rank_views`], and the most common mark of the ranked views
/// ([`default_mark`]) unless the caller knows it: one pass over the
/// views in their given order, instead of another over the entries in
/// priority order, i.e. at random (at 100k entries the tables are more
/// than the CPU cache holds, and Save is bound by memory).
pub(crate) fn rank_and_mark<'a>(views: &[View<'a>], mark: Option<u32>) -> (Vec<View<'a>>, u32) {
    let mark = mark.unwrap_or_else(|| {
        let (mut cand, mut votes) = (0u32, 0usize);
        for v in views.iter().filter(|v| v.key != View::EXCLUDED) {
            let m = v.rec.mark();
            if votes == 0 {
                (cand, votes) = (m, 1);
            } else if m == cand {
                votes += 1;
            } else {
                votes -= 1;
            }
        }
        cand
    });
    let ranked = ranked_positions(views)
        .into_iter()
        .map(|p| views[p as usize])
        .collect();
    (ranked, mark)
}

/// Positions in `views`, most valuable first by their keys, ties in input
/// order, without the excluded ones: [`rank_views`] for a caller that must
/// know where each ranked view came from (the cache's pre-encoded base).
pub(crate) fn ranked_positions(views: &[View]) -> Vec<u32> {
    priority::ranked_by_key(views.len(), views.iter().map(|v| v.key))
}

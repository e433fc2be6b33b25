//! State format v1 (`docs/state-format.md`), the byte budget with its
//! truncation priority, and the legacy conntrack(8) `-o save` text of the
//! Proxmox Perl helper.

use crate::entry::Entry;

#[doc(hidden)]
pub mod bigvec;
mod binary;
pub mod priority;
#[doc(hidden)]
pub mod text;

pub use priority::{priority_order, sort_by_priority, value_class, ValueClass};

// The binary format's API: what to encode (views of entries or of their
// compact forms, in priority order), the ceilings, and the building blocks
// of the warm cache's patched Save (pre-encoded base frames, then a blob
// of base, skips and delta).
pub use binary::{
    assemble_patched, assemble_patched_at, default_segments, encode_frames, encode_frames_headed,
    rank_views, representable, views_default_mark, Compact, Frame, Rec, View, HEADER_LEN,
    HEAD_ENTRIES, MAX_ENTRIES, MAX_RAW_LEN,
};
pub(crate) use binary::{rank_and_mark, ranked_positions};

/// Test support: the binary format's internals that tests, the fuzz target
/// and `examples/stream_sizes` use to build blobs of a chosen shape (a
/// forced segment count) and to look inside them (header fields, flags and
/// versions, segments one by one, the validator's order verdict). Not an
/// API: it follows the implementation.
#[doc(hidden)]
pub mod testing {
    pub use super::binary::{
        check, check_aged, check_header, check_progressive, debug_stream_sizes, decode,
        decode_segments, encode_segmented, encode_segmented_at, Checked, Header, FLAG_PATCH,
        FLAG_SAVED_AT, FLAG_SEGMENTS, FLAG_TRUNCATED, FLAG_ZSTD, MINOR, MINOR_PATCH,
        MINOR_SAVED_AT, MINOR_SEGMENTS,
    };
}

/// QEMU's per-helper limit on the `Save()` payload.
pub const QEMU_LIMIT: usize = 1_048_576;

/// How far the saving host's clock may be ahead of the loading host's
/// before Load believes the difference: a Load at most this long after
/// the saved-at time ages nothing (a live migration, Save to Load in
/// seconds, keeps its timeouts as before v1.3); a later one ages by the
/// whole time since (`docs/state-format.md` §1.3).
pub const SKEW_ALLOWANCE_SECS: u64 = 30;

/// The wall clock (`CLOCK_REALTIME`) in microseconds since the Unix epoch,
/// what a Save stamps and a Load compares with; 0 before the epoch.
pub fn wall_clock_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Seconds to take off every timeout of a state saved at `saved_at_us`
/// and loaded at `now_us` (both microseconds since the Unix epoch): 0 when
/// the state does not say when it was saved (older releases, legacy
/// text), when the saved-at time is in the future (the destination's
/// clock is behind) or at most [`SKEW_ALLOWANCE_SECS`] ago; otherwise the
/// whole seconds elapsed. An entry with no more than this left has expired
/// and is not created.
pub fn load_age(saved_at_us: Option<u64>, now_us: u64) -> u32 {
    let Some(saved) = saved_at_us else {
        return 0;
    };
    let secs = now_us.saturating_sub(saved) / 1_000_000;
    if secs <= SKEW_ALLOWANCE_SECS {
        return 0;
    }
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Wire format of an encoded state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// State format v1: compact records, zstd, checksum.
    Binary,
    /// conntrack(8) `-o save` lines with ` --mark N` appended, as the
    /// Proxmox Perl helper sends and expects.
    ConntrackSave,
}

/// Why a blob could not be decoded, or entries not encoded. Decoding fails
/// as a whole: no entry of a defective blob is ever returned.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("empty state blob (0 bytes)")]
    Empty,
    #[error("truncated state blob: {what} needs {needed} bytes, only {got} present")]
    Truncated {
        what: &'static str,
        needed: usize,
        got: usize,
    },
    #[error("not a conntrack-vmstate blob: wrong magic {found:02x?} (expected \"CTVS\", or conntrack -o save text)")]
    WrongMagic { found: Vec<u8> },
    #[error("state format version {major}.{minor} is not supported by this build (reads 1.x); upgrade conntrack-vmstate on this host")]
    UnsupportedVersion { major: u8, minor: u8 },
    #[error("state blob uses unknown required header flags {0:#06x}")]
    UnknownFlags(u16),
    #[error("state blob has {extra} bytes after the declared payload")]
    TrailingBytes { extra: usize },
    #[error("state blob checksum mismatch: stored crc32c {stored:#010x}, computed {computed:#010x} (corrupted in transit?)")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("state blob declares {count} entries, more than the ceiling of {max}")]
    TooManyEntries { count: u64, max: usize },
    #[error("absurd entry count {count}: a {raw_len}-byte payload cannot hold that many records")]
    AbsurdCount { count: u32, raw_len: u32 },
    #[error("decompression bomb refused: payload declares {declared} bytes decompressed, ceiling is {max}")]
    DecompressionBomb { declared: u64, max: usize },
    #[error("payload does not decompress to its declared {declared} bytes: {detail}")]
    Decompress { declared: u32, detail: String },
    #[error("corrupt state payload: {0}")]
    Corrupt(String),
    #[error("entry {entry}: unknown required attribute {kind:#04x} (written by a newer version?)")]
    UnknownRequiredAttribute { entry: usize, kind: u8 },
    #[error("bad conntrack text line {line}: {reason}: {text:?}")]
    BadTextLine {
        line: usize,
        reason: String,
        text: String,
    },
    #[error("byte limit {limit} is too small: the smallest valid {format} state is {min} bytes")]
    LimitTooSmall {
        limit: usize,
        min: usize,
        format: &'static str,
    },
    #[error("compression failed: {0}")]
    Compression(String),
    #[error("cannot assemble a patched state: {0}")]
    Patch(String),
}

/// Options for [`encode`].
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    /// Hard ceiling for the whole output, headers included.
    pub limit: usize,
    pub format: Format,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            limit: QEMU_LIMIT,
            format: Format::Binary,
        }
    }
}

/// Result of [`encode`]: never empty, never above the limit.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub kept: usize,
    pub dropped: usize,
}

/// Result of [`decode`]: the whole blob was validated before this exists.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub entries: Vec<Entry>,
    pub format: Format,
    /// The sender had to drop entries to fit its budget.
    pub truncated: bool,
    /// Entries the sender dropped, when it recorded the number.
    pub dropped: Option<u64>,
    /// When the state was saved (microseconds since the Unix epoch), when
    /// it says so (v1.3); timeouts are as stored, not aged.
    pub saved_at: Option<u64>,
}

/// Encodes `entries` within `opts.limit` bytes, dropping the least valuable
/// entries ([`priority_order`]) when they do not all fit. A binary state
/// says it was saved now (the timeouts are what is left now).
pub fn encode(entries: &[Entry], opts: &EncodeOptions) -> Result<Encoded, FormatError> {
    encode_at(entries, opts, Some(wall_clock_us()))
}

/// [`encode`], the binary state saying it was saved at `saved_at`
/// (microseconds since the Unix epoch), or, with `None`, not saying when
/// (as a release before v1.3 writes it). The text format has no place for
/// it.
pub fn encode_at(
    entries: &[Entry],
    opts: &EncodeOptions,
    saved_at: Option<u64>,
) -> Result<Encoded, FormatError> {
    match opts.format {
        Format::Binary => {
            let views: Vec<View> = entries
                .iter()
                .map(|e| View::new(Rec::Full(e), e.timeout))
                .collect();
            binary::encode_binary(&views, opts.limit, None, saved_at)
        }
        Format::ConntrackSave => text::encode(entries, opts.limit),
    }
}

/// [`encode`] for entries held elsewhere (the warm cache's tables), each
/// with the seconds it has left: nothing is copied for the binary format.
/// `mark`, when given, is the mark most entries carry (one selector's
/// mark); otherwise it is found by looking at every entry.
pub fn encode_views(
    views: &[View],
    opts: &EncodeOptions,
    mark: Option<u32>,
) -> Result<Encoded, FormatError> {
    encode_views_at(views, opts, mark, Some(wall_clock_us()))
}

/// [`encode_views`] saved at `saved_at` (see [`encode_at`]).
pub fn encode_views_at(
    views: &[View],
    opts: &EncodeOptions,
    mark: Option<u32>,
    saved_at: Option<u64>,
) -> Result<Encoded, FormatError> {
    match opts.format {
        Format::Binary => binary::encode_binary(views, opts.limit, mark, saved_at),
        Format::ConntrackSave => {
            let entries: Vec<Entry> = views.iter().map(|v| v.rec.to_entry(v.timeout)).collect();
            text::encode(&entries, opts.limit)
        }
    }
}

/// A state validated completely, handing out its entries most valuable
/// first, batch by batch (what Load creates from): for our own blobs the
/// entries are built only as they are asked for;
/// anything else (legacy text, a blob not in priority order) is decoded
/// and sorted up front.
#[derive(Debug)]
pub struct Stream {
    inner: StreamInner,
    pub format: Format,
    pub truncated: bool,
    pub dropped: Option<u64>,
    /// When the state was saved, if it says so (microseconds since the
    /// Unix epoch).
    pub saved_at: Option<u64>,
    /// Seconds every timeout handed out was aged by ([`load_age`]).
    pub age_secs: u32,
    /// Entries of the state that had expired by then: not handed out, not
    /// in [`len`](Self::len).
    pub expired: usize,
}

#[derive(Debug)]
enum StreamInner {
    Checked(binary::Checked),
    Sorted { entries: Vec<Entry>, next: usize },
}

impl Stream {
    pub fn len(&self) -> usize {
        match &self.inner {
            StreamInner::Checked(c) => c.len(),
            StreamInner::Sorted { entries, .. } => entries.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A [`stream_progressive`] whose blob is not validated to the end yet:
    /// [`next_batch`](Self::next_batch) hands out at most the first
    /// segment's entries (and a patch's delta entries ranking above its
    /// last) until [`complete`](Self::complete).
    pub fn is_pending(&self) -> bool {
        matches!(&self.inner, StreamInner::Checked(c) if c.is_pending())
    }

    /// Validates the rest of a [`stream_progressive`]'s blob, `bytes` being
    /// that blob; nothing to do for any other stream. After an error it
    /// hands out nothing more.
    pub fn complete(&mut self, bytes: &[u8]) -> Result<(), FormatError> {
        match &mut self.inner {
            StreamInner::Checked(c) => c.complete(bytes),
            StreamInner::Sorted { .. } => Ok(()),
        }
    }

    /// The next up to `n` entries, or `None` after the last (or, while
    /// [`is_pending`](Self::is_pending), after the validated part's). An
    /// error can only mean a bug: the blob was validated before.
    pub fn next_batch(&mut self, n: usize) -> Option<Result<Vec<Entry>, FormatError>> {
        match &mut self.inner {
            StreamInner::Checked(c) => c.next_batch(n),
            StreamInner::Sorted { entries, next } => {
                if *next >= entries.len() {
                    return None;
                }
                let end = entries.len().min(*next + n.max(1));
                let batch = entries[*next..end].to_vec();
                *next = end;
                Some(Ok(batch))
            }
        }
    }
}

/// Validates a state blob completely (any format [`decode`] reads) and
/// returns its entries as a [`Stream`] in priority order, timeouts as
/// stored (not aged).
pub fn stream(bytes: &[u8]) -> Result<Stream, FormatError> {
    stream_bounded(bytes, usize::MAX)
}

/// What Load creates from: [`stream_bounded`] for a Load at `now_us`
/// (microseconds since the Unix epoch), every timeout aged by
/// [`load_age`] and the entries that had expired by then left out and
/// counted in [`Stream::expired`]. The aging is done in the one validating
/// pass over the records.
pub fn stream_loaded_at(bytes: &[u8], max_sort: usize, now_us: u64) -> Result<Stream, FormatError> {
    stream_in(bytes, max_sort, Some(now_us))
}

/// [`stream`], sorting at most `max_sort` entries in memory: a binary blob
/// not in priority order with more entries than that (only a foreign or
/// hostile encoder writes one; ~200 B per decoded entry) is handed out in
/// blob order instead, batch by batch, so its memory stays the validated
/// payload's. Load passes its entry cap: it never creates more anyway.
pub fn stream_bounded(bytes: &[u8], max_sort: usize) -> Result<Stream, FormatError> {
    stream_in(bytes, max_sort, None)
}

/// [`stream_loaded_at`] for Load's answer: of a binary blob with several
/// segments, only the first (with a patch's deltas) is validated now, the
/// rest by [`Stream::complete`] (`binary::check_progressive`), so the
/// most valuable entries are created after a fraction of the validation.
/// Everything the header, the checksum and the segment table can show is
/// checked before the first entry is handed out.
pub fn stream_progressive(
    bytes: &[u8],
    max_sort: usize,
    now_us: u64,
) -> Result<Stream, FormatError> {
    stream_with(bytes, max_sort, Some(now_us), true)
}

fn stream_in(bytes: &[u8], max_sort: usize, now_us: Option<u64>) -> Result<Stream, FormatError> {
    stream_with(bytes, max_sort, now_us, false)
}

fn stream_with(
    bytes: &[u8],
    max_sort: usize,
    now_us: Option<u64>,
    progressive: bool,
) -> Result<Stream, FormatError> {
    if bytes.starts_with(&binary::MAGIC) {
        let c = if progressive {
            binary::check_progressive(bytes, now_us)?
        } else {
            binary::check_aged(bytes, now_us)?
        };
        let (truncated, dropped, saved_at, age_secs, expired) = (
            c.header.flags & binary::FLAG_TRUNCATED != 0,
            Some(u64::from(c.header.dropped)),
            c.header.saved_at,
            c.load_age,
            c.expired,
        );
        // An aged stream is always sorted (it merges), so the unsorted
        // fallback only ever sees timeouts that need no aging.
        let inner = if c.sorted || c.len() > max_sort {
            StreamInner::Checked(c)
        } else {
            let mut entries = binary::decode(bytes)?.1;
            sort_by_priority(&mut entries);
            StreamInner::Sorted { entries, next: 0 }
        };
        return Ok(Stream {
            inner,
            format: Format::Binary,
            truncated,
            dropped,
            saved_at,
            age_secs,
            expired,
        });
    }
    // Legacy text does not say when it was saved: its age is unknown, so 0.
    let d = decode(bytes)?;
    let mut entries = d.entries;
    sort_by_priority(&mut entries);
    Ok(Stream {
        inner: StreamInner::Sorted { entries, next: 0 },
        format: d.format,
        truncated: d.truncated,
        dropped: d.dropped,
        saved_at: None,
        age_secs: 0,
        expired: 0,
    })
}

/// Decodes a state blob: state format v1, conntrack(8) `-o save` text with
/// ` --mark N` (the Perl helper's payload), or the Perl helper's 1-byte
/// `[0]` "empty" payload.
pub fn decode(bytes: &[u8]) -> Result<Decoded, FormatError> {
    if bytes.is_empty() {
        return Err(FormatError::Empty);
    }
    if bytes == [0] {
        return Ok(Decoded {
            entries: Vec::new(),
            format: Format::ConntrackSave,
            truncated: false,
            dropped: None,
            saved_at: None,
        });
    }
    if bytes.starts_with(&binary::MAGIC) {
        let (h, entries) = binary::decode(bytes)?;
        return Ok(Decoded {
            entries,
            format: Format::Binary,
            truncated: h.flags & binary::FLAG_TRUNCATED != 0,
            dropped: Some(u64::from(h.dropped)),
            saved_at: h.saved_at,
        });
    }
    if bytes.len() < binary::MAGIC.len() && binary::MAGIC.starts_with(bytes) {
        return Err(FormatError::Truncated {
            what: "state header",
            needed: binary::HEADER_LEN,
            got: bytes.len(),
        });
    }
    if text::looks_like_text(bytes) {
        let entries = text::decode(bytes)?;
        return Ok(Decoded {
            entries,
            format: Format::ConntrackSave,
            truncated: false,
            dropped: None,
            saved_at: None,
        });
    }
    Err(FormatError::WrongMagic {
        found: bytes[..bytes.len().min(4)].to_vec(),
    })
}

//! Byte-level encoding of helper protocol frames (see `docs/helper-protocol.md`).
//!
//! Everything is little-endian. Decoding never panics and never allocates more
//! than the frame it was given justifies: counts are checked against the
//! bytes that remain before any vector is reserved.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::access::{
    CacheMiss, CreateReport, DeleteReport, DumpSource, SaveNotes, WarmState, Warmth,
};
use crate::entry::{Entry, ProtoInfo, Selector, SeqAdj, Tuple, L4};
use crate::format::Format;

/// Protocol version carried in every frame. A peer speaking another version
/// gets an error reply naming both.
pub const VERSION: u8 = 1;

/// Largest request frame the helper reads (payload bytes after the length).
/// Sized for [`MAX_ENTRIES`] entries of the largest encoding with room to
/// spare; anything bigger is refused before it is buffered.
pub const MAX_REQUEST: usize = 16 << 20;

/// Largest response frame the client accepts: a dump of a whole mark on a
/// host with a very large conntrack table (2M entries at ~100 bytes).
pub const MAX_RESPONSE: usize = 256 << 20;

/// Most entries one Create or DeleteEntries request may carry. The client
/// splits larger batches; the helper refuses larger counts.
pub const MAX_ENTRIES: usize = 65_536;

/// `NF_CT_HELPER_NAME_LEN` minus the terminating NUL.
pub const MAX_HELPER_NAME: usize = 15;

/// Smallest byte limit a SaveState may ask for: the smallest valid state
/// (a binary header without entries).
pub const MIN_SAVE_LIMIT: u32 = crate::format::HEADER_LEN as u32;

/// Largest byte limit a SaveState may ask for, and so the largest state a
/// SavedState reply may carry. QEMU takes 1 MiB; the rest is headroom for
/// other callers without letting one request build an unbounded blob.
pub const MAX_SAVE_LIMIT: u32 = 64 << 20;

/// Most ids a SavedState reply or DeleteSaved request may carry: as many
/// as entries a largest Dump reply could (every dumped entry has one id).
/// Per-request [`MAX_ENTRIES`] would be too few: one VM may have more.
pub const MAX_SAVED_IDS: usize = MAX_RESPONSE / MIN_ENTRY;

/// Request opcodes.
pub mod op {
    pub const DUMP: u8 = 1;
    pub const CREATE: u8 = 2;
    pub const DELETE_SELECTED: u8 = 3;
    pub const DELETE_ENTRIES: u8 = 4;
    /// Added in protocol 1 without a version bump: a helper that predates
    /// them answers `unknown opcode`, which the client treats as "no cache"
    /// (watch) or retries as a plain Dump (dump-sourced).
    pub const WATCH: u8 = 5;
    pub const DUMP_SOURCED: u8 = 6;
    /// Added in protocol 1 as well: Save's whole job in the helper, so only
    /// the encoded state and the ids cross the socket, and the flush by
    /// those ids. A helper that predates them answers `unknown opcode`; the
    /// client then dumps and encodes (deletes) itself.
    pub const SAVE_STATE: u8 = 7;
    pub const DELETE_SAVED: u8 = 8;
    /// Added in protocol 1 as well: Create for a restore that goes on after
    /// Load answered, run at a lower CPU priority. A helper that predates
    /// it answers `unknown opcode`; the client then sends plain Creates.
    pub const CREATE_BACKGROUND: u8 = 9;
    /// Added in protocol 1 as well, together: wait until a watched
    /// selector's Save would come from the warm cache (Register waits for
    /// it), and SaveState whose reply also says why a Save was slow. A
    /// helper that predates them answers `unknown opcode`; the client then
    /// does not wait, and sends plain SaveStates (it learns both from the
    /// first refusal of either, so a Save after Register pays no extra
    /// round trip).
    pub const WAIT_WARM: u8 = 10;
    pub const SAVE_STATE_NOTED: u8 = 11;
    /// Replies have the high bit set.
    pub const R_ERROR: u8 = 0x80;
    pub const R_ENTRIES: u8 = 0x81;
    pub const R_CREATED: u8 = 0x82;
    pub const R_DELETED: u8 = 0x83;
    pub const R_DELETE_REPORT: u8 = 0x84;
    pub const R_WATCHING: u8 = 0x85;
    pub const R_SOURCED_ENTRIES: u8 = 0x86;
    pub const R_SAVED_STATE: u8 = 0x87;
    pub const R_WARMTH: u8 = 0x88;
    pub const R_SAVED_STATE_NOTED: u8 = 0x89;
}

/// Longest wait a WaitWarm may ask for; longer asks wait this long. The
/// daemon asks for 10 s.
pub const MAX_WAIT_WARM_MS: u32 = 60_000;

/// A request from the daemon. Create and DeleteEntries name the selector
/// every one of their entries must match, so the helper can check that a
/// request only touches the marks it claims to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Dump(Selector),
    Create(Selector, Vec<Entry>),
    CreateBackground(Selector, Vec<Entry>),
    DeleteSelected(Selector),
    DeleteEntries(Selector, Vec<Entry>),
    /// Start (`true`) or stop keeping the selector's entries warm in the
    /// helper's cache, for as long as this connection stays open.
    Watch(Selector, bool),
    /// Dump, and say whether the cache or the kernel answered.
    DumpSourced(Selector),
    /// The selected entries encoded in `format` within `limit` bytes
    /// (`ConntrackAccess::save_state`).
    SaveState(Selector, u32, Format),
    /// Delete the selected entries whose CTA_ID is one of these
    /// (`ConntrackAccess::delete_saved`); answered with a DeleteReport.
    DeleteSaved(Selector, Vec<u32>),
    /// Wait up to this many ms until a Save of the selector would be
    /// answered from the warm cache (`ConntrackAccess::wait_warm`).
    WaitWarm(Selector, u32),
    /// SaveState answered with SavedStateNoted.
    SaveStateNoted(Selector, u32, Format),
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::Dump(_) => "dump",
            Request::Create(..) => "create",
            Request::CreateBackground(..) => "create-background",
            Request::DeleteSelected(_) => "delete-selected",
            Request::DeleteEntries(..) => "delete-entries",
            Request::Watch(..) => "watch",
            Request::DumpSourced(_) => "dump",
            Request::SaveState(..) => "save-state",
            Request::DeleteSaved(..) => "delete-saved",
            Request::WaitWarm(..) => "wait-warm",
            Request::SaveStateNoted(..) => "save-state",
        }
    }
}

/// A reply from the helper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Error(String),
    Entries(Vec<Entry>),
    Created(CreateReport),
    Deleted(u64),
    DeleteReport(DeleteReport),
    /// Selectors this connection watches after a Watch request.
    Watching(u32),
    SourcedEntries(DumpSource, Vec<Entry>),
    /// Answer to SaveState: source, kept, dropped, the CTA_ID of every
    /// entry dumped (kept or dropped), and the encoded state.
    SavedState(DumpSource, u64, u64, Vec<u32>, Vec<u8>),
    /// Answer to WaitWarm.
    Warmth(Warmth),
    /// Answer to SaveStateNoted: SavedState's fields, then what the cache
    /// says about the Save.
    SavedStateNoted(DumpSource, u64, u64, Vec<u32>, Vec<u8>, SaveNotes),
}

/// Why a frame could not be decoded. The text goes back to the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame truncated: needed {need} more bytes at offset {at}")]
    Truncated { at: usize, need: usize },
    #[error("unsupported protocol version {got} (this side speaks {VERSION})")]
    Version { got: u8 },
    #[error("unknown opcode {0:#04x}")]
    Opcode(u8),
    #[error("invalid {what} {value} at offset {at}")]
    Invalid {
        what: &'static str,
        value: u64,
        at: usize,
    },
    #[error("{count} entries exceed the limit of {MAX_ENTRIES} per request")]
    TooManyEntries { count: u64 },
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("helper name is not UTF-8")]
    HelperName,
    #[error("{count} ids exceed the limit of {MAX_SAVED_IDS}")]
    TooManyIds { count: u64 },
    #[error("state of {len} bytes exceeds the limit of {MAX_SAVE_LIMIT} bytes")]
    StateTooLarge { len: u64 },
}

// ---------------------------------------------------------------- encoding

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
}

/// Presence bits of an entry's optional attributes.
mod has {
    pub const LABELS: u8 = 1 << 0;
    pub const PROTOINFO: u8 = 1 << 1;
    pub const SEQ_ADJ_ORIG: u8 = 1 << 2;
    pub const SEQ_ADJ_REPLY: u8 = 1 << 3;
    pub const HELPER: u8 = 1 << 4;
    pub const ID: u8 = 1 << 5;
    pub const ALL: u8 = 0x3f;
}

fn put_selector(w: &mut W, s: &Selector) {
    w.u32(s.mark);
    w.u32(s.mark_mask);
    match s.zone {
        Some(z) => {
            w.u8(1);
            w.u16(z);
        }
        None => w.u8(0),
    }
}

fn put_tuple(w: &mut W, t: &Tuple) {
    match (&t.src, &t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            w.u8(4);
            w.bytes(&s.octets());
            w.bytes(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            w.u8(6);
            w.bytes(&s.octets());
            w.bytes(&d.octets());
        }
        // A tuple mixing families cannot exist in the kernel. It is sent as
        // family 0, which the helper rejects with a clear error, rather than
        // the client silently rewriting an address.
        _ => {
            w.u8(0);
            return;
        }
    }
    w.u8(t.proto);
    match t.l4 {
        L4::None => w.u8(0),
        L4::Ports { src, dst } => {
            w.u8(1);
            w.u16(src);
            w.u16(dst);
        }
        L4::Icmp { id, kind, code } => {
            w.u8(2);
            w.u16(id);
            w.u8(kind);
            w.u8(code);
        }
    }
    match t.zone {
        Some(z) => {
            w.u8(1);
            w.u16(z);
        }
        None => w.u8(0),
    }
}

fn put_entry(w: &mut W, e: &Entry) {
    put_tuple(w, &e.orig);
    put_tuple(w, &e.reply);
    w.u32(e.status);
    w.u32(e.timeout);
    w.u32(e.mark);
    w.u16(e.zone);
    let mut bits = 0u8;
    if e.labels.is_some() {
        bits |= has::LABELS;
    }
    if e.protoinfo.is_some() {
        bits |= has::PROTOINFO;
    }
    if e.seq_adj_orig.is_some() {
        bits |= has::SEQ_ADJ_ORIG;
    }
    if e.seq_adj_reply.is_some() {
        bits |= has::SEQ_ADJ_REPLY;
    }
    if e.helper.is_some() {
        bits |= has::HELPER;
    }
    if e.id.is_some() {
        bits |= has::ID;
    }
    w.u8(bits);
    if let Some(l) = &e.labels {
        w.bytes(l);
    }
    if let Some(p) = &e.protoinfo {
        match *p {
            ProtoInfo::Tcp {
                state,
                wscale_orig,
                wscale_reply,
                flags_orig,
                flags_reply,
            } => {
                w.u8(1);
                w.bytes(&[state, wscale_orig, wscale_reply, flags_orig, flags_reply]);
            }
            ProtoInfo::Sctp {
                state,
                vtag_orig,
                vtag_reply,
            } => {
                w.u8(2);
                w.u8(state);
                w.u32(vtag_orig);
                w.u32(vtag_reply);
            }
            ProtoInfo::Dccp {
                state,
                role,
                handshake_seq,
            } => {
                w.u8(3);
                w.u8(state);
                w.u8(role);
                w.u64(handshake_seq);
            }
        }
    }
    for s in [&e.seq_adj_orig, &e.seq_adj_reply].into_iter().flatten() {
        w.u32(s.correction_pos);
        w.i32(s.offset_before);
        w.i32(s.offset_after);
    }
    if let Some(h) = &e.helper {
        // Longer names cannot exist in the kernel; the helper refuses them.
        let b = h.as_bytes();
        let n = b.len().min(255);
        w.u8(n as u8);
        w.bytes(&b[..n]);
    }
    if let Some(id) = e.id {
        w.u32(id);
    }
}

fn put_entries<'e>(w: &mut W, entries: impl ExactSizeIterator<Item = &'e Entry>) {
    w.u32(u32::try_from(entries.len()).unwrap_or(u32::MAX));
    for e in entries {
        put_entry(w, e);
    }
}

fn put_ids(w: &mut W, ids: &[u32]) {
    w.u32(u32::try_from(ids.len()).unwrap_or(u32::MAX));
    w.0.reserve(ids.len() * 4);
    for &id in ids {
        w.u32(id);
    }
}

/// The fields SavedState and SavedStateNoted share, in their order.
fn put_saved(w: &mut W, src: DumpSource, kept: u64, dropped: u64, ids: &[u32], bytes: &[u8]) {
    w.u8(source_code(src));
    w.u64(kept);
    w.u64(dropped);
    put_ids(w, ids);
    w.u32(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
    w.bytes(bytes);
}

fn format_code(f: Format) -> u8 {
    match f {
        Format::Binary => 0,
        Format::ConntrackSave => 1,
    }
}

fn source_code(s: DumpSource) -> u8 {
    match s {
        DumpSource::Kernel => 0,
        DumpSource::Cache => 1,
        DumpSource::Base => 2,
    }
}

/// [`CacheMiss`] on the wire: 0 is "no miss". Codes are never reused; a
/// reader maps codes it does not know to [`CacheMiss::Other`].
fn miss_code(m: Option<CacheMiss>) -> u8 {
    match m {
        None => 0,
        Some(CacheMiss::NotWatched) => 1,
        Some(CacheMiss::Warming) => 2,
        Some(CacheMiss::EventsLost) => 3,
        Some(CacheMiss::EventsOff) => 4,
        Some(CacheMiss::NotCaughtUp) => 5,
        Some(CacheMiss::RefreshOverdue) => 6,
        Some(CacheMiss::LookupsCostly) => 7,
        Some(CacheMiss::LookupsFailed) => 8,
        Some(CacheMiss::SyncFailed) => 9,
        Some(CacheMiss::Other) => 255,
    }
}

fn miss_of(code: u8) -> Option<CacheMiss> {
    Some(match code {
        0 => return None,
        1 => CacheMiss::NotWatched,
        2 => CacheMiss::Warming,
        3 => CacheMiss::EventsLost,
        4 => CacheMiss::EventsOff,
        5 => CacheMiss::NotCaughtUp,
        6 => CacheMiss::RefreshOverdue,
        7 => CacheMiss::LookupsCostly,
        8 => CacheMiss::LookupsFailed,
        9 => CacheMiss::SyncFailed,
        _ => CacheMiss::Other,
    })
}

/// [`WarmState`] as (state code, miss code).
fn warm_codes(s: WarmState) -> (u8, u8) {
    match s {
        WarmState::Warm => (0, 0),
        WarmState::Uncached => (1, 0),
        WarmState::Unknown => (2, 0),
        WarmState::Cold(m) => (3, miss_code(Some(m))),
    }
}

/// The reverse of [`warm_codes`]; what this side does not know is
/// `Unknown` (never taken for warm), a cold state without a cause `Other`.
fn warm_of(state: u8, miss: u8) -> WarmState {
    match state {
        0 => WarmState::Warm,
        1 => WarmState::Uncached,
        3 => WarmState::Cold(miss_of(miss).unwrap_or(CacheMiss::Other)),
        _ => WarmState::Unknown,
    }
}

/// `nf_conntrack_events` on the wire; `u32::MAX` is "not read".
const SYSCTL_UNKNOWN: u32 = u32::MAX;

fn frame(opcode: u8, body: impl FnOnce(&mut W)) -> Vec<u8> {
    frame_sized(opcode, 64, body)
}

/// [`frame`] with room for `size` bytes from the start, so a large body is
/// not copied again while the frame grows.
fn frame_sized(opcode: u8, size: usize, body: impl FnOnce(&mut W)) -> Vec<u8> {
    // Length prefix is patched in at the end.
    let mut w = W(Vec::with_capacity(size));
    w.u32(0);
    w.u8(VERSION);
    w.u8(opcode);
    body(&mut w);
    let len = u32::try_from(w.0.len() - 4).unwrap_or(u32::MAX);
    w.0[..4].copy_from_slice(&len.to_le_bytes());
    w.0
}

/// The complete frame (length prefix included) of a request.
pub fn encode_request(r: &Request) -> Vec<u8> {
    match r {
        Request::Dump(s) => frame(op::DUMP, |w| put_selector(w, s)),
        Request::DeleteSelected(s) => frame(op::DELETE_SELECTED, |w| put_selector(w, s)),
        Request::Create(s, es) => encode_batch(op::CREATE, s, es.iter()),
        Request::CreateBackground(s, es) => encode_batch(op::CREATE_BACKGROUND, s, es.iter()),
        Request::DeleteEntries(s, es) => encode_batch(op::DELETE_ENTRIES, s, es.iter()),
        Request::Watch(s, on) => frame(op::WATCH, |w| {
            put_selector(w, s);
            w.u8(u8::from(*on));
        }),
        Request::DumpSourced(s) => frame(op::DUMP_SOURCED, |w| put_selector(w, s)),
        Request::SaveState(s, limit, format) => frame(op::SAVE_STATE, |w| {
            put_selector(w, s);
            w.u32(*limit);
            w.u8(format_code(*format));
        }),
        Request::DeleteSaved(s, ids) => encode_delete_saved(s, ids),
        Request::WaitWarm(s, ms) => frame(op::WAIT_WARM, |w| {
            put_selector(w, s);
            w.u32(*ms);
        }),
        Request::SaveStateNoted(s, limit, format) => frame(op::SAVE_STATE_NOTED, |w| {
            put_selector(w, s);
            w.u32(*limit);
            w.u8(format_code(*format));
        }),
    }
}

/// The frame of a DeleteSaved request over borrowed ids.
pub fn encode_delete_saved(sel: &Selector, ids: &[u32]) -> Vec<u8> {
    frame_sized(op::DELETE_SAVED, 32 + ids.len() * 4, |w| {
        put_selector(w, sel);
        put_ids(w, ids);
    })
}

/// The frame of a Create or DeleteEntries request over borrowed entries, so
/// the client does not clone a batch to send it.
pub fn encode_batch<'e>(
    opcode: u8,
    sel: &Selector,
    entries: impl ExactSizeIterator<Item = &'e Entry>,
) -> Vec<u8> {
    frame(opcode, |w| {
        put_selector(w, sel);
        put_entries(w, entries);
    })
}

/// Whether the helper's decoder and validation take `e` as it is: a
/// helper name of 1..=[`MAX_HELPER_NAME`] bytes, one address family in
/// both tuples, one protocol. A request carrying any other entry is
/// refused whole, so a client drops such entries first.
pub fn carriable(e: &Entry) -> bool {
    let v6 = e.orig.src.is_ipv6();
    e.helper
        .as_ref()
        .is_none_or(|h| (1..=MAX_HELPER_NAME).contains(&h.len()))
        && [e.orig.dst, e.reply.src, e.reply.dst]
            .iter()
            .all(|a| a.is_ipv6() == v6)
        && e.orig.proto == e.reply.proto
}

/// The complete frame (length prefix included) of a response.
pub fn encode_response(r: &Response) -> Vec<u8> {
    match r {
        Response::Error(msg) => frame(op::R_ERROR, |w| {
            // Error texts are short; cap them so a runaway message cannot
            // grow a reply without bound.
            let b = msg.as_bytes();
            let n = b.len().min(4096);
            w.u16(n as u16);
            w.bytes(&b[..n]);
        }),
        Response::Entries(es) => frame(op::R_ENTRIES, |w| put_entries(w, es.iter())),
        Response::Created(c) => frame(op::R_CREATED, |w| {
            w.u64(c.created);
            w.u64(c.existed);
            w.u64(c.refused);
            let n = c.refused_by_errno.len().min(255);
            w.u8(n as u8);
            for &(errno, count) in &c.refused_by_errno[..n] {
                w.i32(errno);
                w.u64(count);
            }
        }),
        Response::Deleted(n) => frame(op::R_DELETED, |w| w.u64(*n)),
        Response::DeleteReport(d) => frame(op::R_DELETE_REPORT, |w| {
            w.u64(d.deleted);
            w.u64(d.missing);
        }),
        Response::Watching(n) => frame(op::R_WATCHING, |w| w.u32(*n)),
        Response::SourcedEntries(src, es) => frame(op::R_SOURCED_ENTRIES, |w| {
            w.u8(source_code(*src));
            put_entries(w, es.iter())
        }),
        Response::SavedState(src, kept, dropped, ids, bytes) => {
            frame_sized(op::R_SAVED_STATE, 32 + ids.len() * 4 + bytes.len(), |w| {
                put_saved(w, *src, *kept, *dropped, ids, bytes)
            })
        }
        Response::Warmth(x) => frame(op::R_WARMTH, |w| {
            let (state, miss) = warm_codes(x.state);
            w.u8(state);
            w.u8(miss);
            w.u64(x.entries);
            w.u64(x.silent);
            w.u64(x.base_records);
            w.u32(x.events_sysctl.unwrap_or(SYSCTL_UNKNOWN));
        }),
        Response::SavedStateNoted(src, kept, dropped, ids, bytes, notes) => frame_sized(
            op::R_SAVED_STATE_NOTED,
            64 + ids.len() * 4 + bytes.len(),
            |w| {
                put_saved(w, *src, *kept, *dropped, ids, bytes);
                w.u8(miss_code(notes.miss));
                w.u64(notes.silent);
                w.u64(notes.lookups);
                w.u64(notes.lookup_us);
            },
        ),
    }
}

// ---------------------------------------------------------------- decoding

struct R<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let rest = self.b.len() - self.at;
        if rest < n {
            return Err(WireError::Truncated {
                at: self.at,
                need: n - rest,
            });
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn i32(&mut self) -> Result<i32, WireError> {
        Ok(i32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn invalid(&self, what: &'static str, value: u64) -> WireError {
        WireError::Invalid {
            what,
            value,
            at: self.at.saturating_sub(1),
        }
    }
    fn flag(&mut self, what: &'static str) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.invalid(what, v.into())),
        }
    }
    fn end(&self) -> Result<(), WireError> {
        match self.b.len() - self.at {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

fn get_selector(r: &mut R) -> Result<Selector, WireError> {
    let mark = r.u32()?;
    let mark_mask = r.u32()?;
    let zone = if r.flag("zone flag")? {
        Some(r.u16()?)
    } else {
        None
    };
    Ok(Selector {
        mark,
        mark_mask,
        zone,
    })
}

fn get_tuple(r: &mut R) -> Result<Tuple, WireError> {
    let (src, dst) = match r.u8()? {
        4 => (
            IpAddr::V4(Ipv4Addr::from(r.arr::<4>()?)),
            IpAddr::V4(Ipv4Addr::from(r.arr::<4>()?)),
        ),
        6 => (
            IpAddr::V6(Ipv6Addr::from(r.arr::<16>()?)),
            IpAddr::V6(Ipv6Addr::from(r.arr::<16>()?)),
        ),
        f => return Err(r.invalid("address family", f.into())),
    };
    let proto = r.u8()?;
    let l4 = match r.u8()? {
        0 => L4::None,
        1 => L4::Ports {
            src: r.u16()?,
            dst: r.u16()?,
        },
        2 => L4::Icmp {
            id: r.u16()?,
            kind: r.u8()?,
            code: r.u8()?,
        },
        t => return Err(r.invalid("layer-4 kind", t.into())),
    };
    let zone = if r.flag("tuple zone flag")? {
        Some(r.u16()?)
    } else {
        None
    };
    Ok(Tuple {
        src,
        dst,
        proto,
        l4,
        zone,
    })
}

fn get_seq_adj(r: &mut R) -> Result<SeqAdj, WireError> {
    Ok(SeqAdj {
        correction_pos: r.u32()?,
        offset_before: r.i32()?,
        offset_after: r.i32()?,
    })
}

fn get_entry(r: &mut R) -> Result<Entry, WireError> {
    let orig = get_tuple(r)?;
    let reply = get_tuple(r)?;
    if orig.src.is_ipv6() != reply.src.is_ipv6() {
        return Err(r.invalid("reply tuple family (differs from original)", 0));
    }
    let status = r.u32()?;
    let timeout = r.u32()?;
    let mark = r.u32()?;
    let zone = r.u16()?;
    let bits = r.u8()?;
    if bits & !has::ALL != 0 {
        return Err(r.invalid("attribute bits", bits.into()));
    }
    let labels = if bits & has::LABELS != 0 {
        Some(r.arr::<16>()?)
    } else {
        None
    };
    let protoinfo = if bits & has::PROTOINFO != 0 {
        Some(match r.u8()? {
            1 => {
                let [state, wscale_orig, wscale_reply, flags_orig, flags_reply] = r.arr::<5>()?;
                ProtoInfo::Tcp {
                    state,
                    wscale_orig,
                    wscale_reply,
                    flags_orig,
                    flags_reply,
                }
            }
            2 => ProtoInfo::Sctp {
                state: r.u8()?,
                vtag_orig: r.u32()?,
                vtag_reply: r.u32()?,
            },
            3 => ProtoInfo::Dccp {
                state: r.u8()?,
                role: r.u8()?,
                handshake_seq: r.u64()?,
            },
            t => return Err(r.invalid("protoinfo kind", t.into())),
        })
    } else {
        None
    };
    let seq_adj_orig = if bits & has::SEQ_ADJ_ORIG != 0 {
        Some(get_seq_adj(r)?)
    } else {
        None
    };
    let seq_adj_reply = if bits & has::SEQ_ADJ_REPLY != 0 {
        Some(get_seq_adj(r)?)
    } else {
        None
    };
    let helper = if bits & has::HELPER != 0 {
        let n = usize::from(r.u8()?);
        if n == 0 || n > MAX_HELPER_NAME {
            return Err(r.invalid("helper name length", n as u64));
        }
        let s = std::str::from_utf8(r.take(n)?).map_err(|_| WireError::HelperName)?;
        Some(s.to_owned())
    } else {
        None
    };
    let id = if bits & has::ID != 0 {
        Some(r.u32()?)
    } else {
        None
    };
    Ok(Entry {
        orig,
        reply,
        status,
        timeout,
        mark,
        zone,
        labels,
        protoinfo,
        seq_adj_orig,
        seq_adj_reply,
        helper,
        id,
    })
}

/// Smallest possible encoded entry: two IPv4 tuples without ports or zone
/// (1+4+4+1+1+1 each), status, timeout, mark, zone and the presence byte.
const MIN_ENTRY: usize = 2 * 12 + 4 + 4 + 4 + 2 + 1;

fn get_entries(r: &mut R, limit: usize) -> Result<Vec<Entry>, WireError> {
    let count = r.u32()? as usize;
    if count > limit {
        return Err(WireError::TooManyEntries {
            count: count as u64,
        });
    }
    // Never reserve more than the remaining bytes can possibly hold.
    let remaining = r.b.len() - r.at;
    if count > remaining / MIN_ENTRY {
        return Err(WireError::Truncated {
            at: r.at,
            need: count * MIN_ENTRY - remaining,
        });
    }
    let mut v = Vec::with_capacity(count);
    for _ in 0..count {
        v.push(get_entry(r)?);
    }
    Ok(v)
}

fn get_ids(r: &mut R) -> Result<Vec<u32>, WireError> {
    let count = r.u32()? as usize;
    if count > MAX_SAVED_IDS {
        return Err(WireError::TooManyIds {
            count: count as u64,
        });
    }
    // Never reserve more than the remaining bytes can hold.
    let b = r.take(count * 4)?;
    Ok(b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn get_source(r: &mut R) -> Result<DumpSource, WireError> {
    match r.u8()? {
        0 => Ok(DumpSource::Kernel),
        1 => Ok(DumpSource::Cache),
        2 => Ok(DumpSource::Base),
        v => Err(r.invalid("dump source", v.into())),
    }
}

fn get_format(r: &mut R) -> Result<Format, WireError> {
    match r.u8()? {
        0 => Ok(Format::Binary),
        1 => Ok(Format::ConntrackSave),
        v => Err(r.invalid("state format", v.into())),
    }
}

/// The fields SavedState and SavedStateNoted share: source, kept,
/// dropped, ids, state.
type Saved = (DumpSource, u64, u64, Vec<u32>, Vec<u8>);

fn get_saved(r: &mut R) -> Result<Saved, WireError> {
    let src = get_source(r)?;
    let kept = r.u64()?;
    let dropped = r.u64()?;
    let ids = get_ids(r)?;
    let len = r.u32()?;
    if len > MAX_SAVE_LIMIT {
        return Err(WireError::StateTooLarge { len: len.into() });
    }
    let bytes = r.take(len as usize)?.to_vec();
    Ok((src, kept, dropped, ids, bytes))
}

fn header(r: &mut R) -> Result<u8, WireError> {
    let version = r.u8()?;
    if version != VERSION {
        return Err(WireError::Version { got: version });
    }
    r.u8()
}

/// Decodes a request payload (the bytes after the length prefix).
pub fn decode_request(payload: &[u8]) -> Result<Request, WireError> {
    let mut r = R { b: payload, at: 0 };
    let opcode = header(&mut r)?;
    let req = match opcode {
        op::DUMP => Request::Dump(get_selector(&mut r)?),
        op::DELETE_SELECTED => Request::DeleteSelected(get_selector(&mut r)?),
        op::CREATE => {
            let s = get_selector(&mut r)?;
            Request::Create(s, get_entries(&mut r, MAX_ENTRIES)?)
        }
        op::CREATE_BACKGROUND => {
            let s = get_selector(&mut r)?;
            Request::CreateBackground(s, get_entries(&mut r, MAX_ENTRIES)?)
        }
        op::DELETE_ENTRIES => {
            let s = get_selector(&mut r)?;
            Request::DeleteEntries(s, get_entries(&mut r, MAX_ENTRIES)?)
        }
        op::WATCH => {
            let s = get_selector(&mut r)?;
            Request::Watch(s, r.flag("watch flag")?)
        }
        op::DUMP_SOURCED => Request::DumpSourced(get_selector(&mut r)?),
        op::SAVE_STATE => {
            let s = get_selector(&mut r)?;
            let limit = r.u32()?;
            Request::SaveState(s, limit, get_format(&mut r)?)
        }
        op::DELETE_SAVED => {
            let s = get_selector(&mut r)?;
            Request::DeleteSaved(s, get_ids(&mut r)?)
        }
        op::WAIT_WARM => {
            let s = get_selector(&mut r)?;
            Request::WaitWarm(s, r.u32()?)
        }
        op::SAVE_STATE_NOTED => {
            let s = get_selector(&mut r)?;
            let limit = r.u32()?;
            Request::SaveStateNoted(s, limit, get_format(&mut r)?)
        }
        other => return Err(WireError::Opcode(other)),
    };
    r.end()?;
    Ok(req)
}

/// The selector of a request payload without decoding the rest (every
/// request starts with one), for the helper's log lines; `None` for what
/// [`decode_request`] would refuse before the selector.
pub fn request_selector(payload: &[u8]) -> Option<Selector> {
    let mut r = R { b: payload, at: 0 };
    header(&mut r).ok()?;
    get_selector(&mut r).ok()
}

/// Decodes a response payload (the bytes after the length prefix).
pub fn decode_response(payload: &[u8]) -> Result<Response, WireError> {
    let mut r = R { b: payload, at: 0 };
    let opcode = header(&mut r)?;
    let resp = match opcode {
        op::R_ERROR => {
            let n = usize::from(r.u16()?);
            Response::Error(String::from_utf8_lossy(r.take(n)?).into_owned())
        }
        op::R_ENTRIES => Response::Entries(get_entries(&mut r, usize::MAX)?),
        op::R_CREATED => {
            let created = r.u64()?;
            let existed = r.u64()?;
            let refused = r.u64()?;
            let n = r.u8()?;
            let mut refused_by_errno = Vec::with_capacity(n.into());
            for _ in 0..n {
                refused_by_errno.push((r.i32()?, r.u64()?));
            }
            Response::Created(CreateReport {
                created,
                existed,
                refused,
                refused_by_errno,
            })
        }
        op::R_DELETED => Response::Deleted(r.u64()?),
        op::R_DELETE_REPORT => Response::DeleteReport(DeleteReport {
            deleted: r.u64()?,
            missing: r.u64()?,
        }),
        op::R_WATCHING => Response::Watching(r.u32()?),
        op::R_SOURCED_ENTRIES => {
            let src = get_source(&mut r)?;
            Response::SourcedEntries(src, get_entries(&mut r, usize::MAX)?)
        }
        op::R_SAVED_STATE => {
            let (src, kept, dropped, ids, bytes) = get_saved(&mut r)?;
            Response::SavedState(src, kept, dropped, ids, bytes)
        }
        // The two replies added last are extensible: a newer helper may
        // append fields, which this side skips (hence no `end()` check).
        op::R_WARMTH => {
            let (state, miss) = (r.u8()?, r.u8()?);
            let entries = r.u64()?;
            let silent = r.u64()?;
            let base_records = r.u64()?;
            let sysctl = r.u32()?;
            return Ok(Response::Warmth(Warmth {
                state: warm_of(state, miss),
                entries,
                silent,
                base_records,
                events_sysctl: (sysctl != SYSCTL_UNKNOWN).then_some(sysctl),
            }));
        }
        op::R_SAVED_STATE_NOTED => {
            let (src, kept, dropped, ids, bytes) = get_saved(&mut r)?;
            let notes = SaveNotes {
                miss: miss_of(r.u8()?),
                silent: r.u64()?,
                lookups: r.u64()?,
                lookup_us: r.u64()?,
            };
            return Ok(Response::SavedStateNoted(
                src, kept, dropped, ids, bytes, notes,
            ));
        }
        other => return Err(WireError::Opcode(other)),
    };
    r.end()?;
    Ok(resp)
}

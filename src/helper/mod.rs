//! The daemon ↔ sandboxed conntrack helper protocol (client and server).
//!
//! The daemon holds no capability; it asks the helper, which holds only
//! CAP_NET_ADMIN, to dump, create and delete entries. The protocol is
//! specified in `docs/helper-protocol.md`; in short:
//!
//! * a unix stream socket (`/run/conntrack-vmstate-helper.sock`, socket
//!   activated, mode 0600, owned by the daemon's user: only it can connect);
//! * frames `u32 length (LE) | u8 version (1) | u8 opcode | body`;
//! * requests Dump(selector), Create(selector, entries),
//!   DeleteSelected(selector), DeleteEntries(selector, entries),
//!   Watch(selector, on), DumpSourced(selector), SaveState(selector, limit,
//!   format) and DeleteSaved(selector, ids); one reply per request, in
//!   order. SaveState runs Save's dump and encode in the helper, so only the
//!   encoded state and the entries' ids cross the socket. Watched selectors are kept warm by the helper's
//!   [`crate::cache::CachedAccess`] while the watching connection is open;
//!   the client re-sends them after a helper restart;
//! * the helper validates every request before the kernel sees it: size and
//!   count limits, a selector must select marked entries, and every entry of
//!   Create/DeleteEntries must match the request's selector — so a daemon
//!   can only touch the marks it names. Malformed input gets an error reply,
//!   never a crash, and costs only its own connection.

pub mod client;
pub mod server;
pub mod wire;

pub use client::HelperClient;
pub use server::{serve, ServeSummary, ServerConfig};

/// Where the packaged `.socket` unit listens, and where the daemon looks
/// for the helper unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/conntrack-vmstate-helper.sock";

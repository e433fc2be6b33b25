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

/// Where the packaged `.socket` unit listens.
pub const DEFAULT_SOCKET: &str = "/run/conntrack-vmstate-helper.sock";

/// Command line of `conntrack-vmstate-helper` (libexec; started by systemd).
#[derive(Debug, clap::Parser)]
#[command(
    name = "conntrack-vmstate-helper",
    version,
    about = "Sandboxed conntrack helper of conntrack-vmstated: runs the daemon's \
             dump/create/delete requests with CAP_NET_ADMIN"
)]
pub struct HelperArgs {
    /// Listen on this socket path instead of the socket systemd passes
    /// (LISTEN_FDS); for tests and manual runs.
    #[arg(long)]
    pub listen: Option<std::path::PathBuf>,
    /// Exit after this many seconds with no connection open (0: never);
    /// systemd starts the helper again on the next connection.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout: u64,
    /// Connections served at once.
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
    /// How often the warm cache re-reads each watched VM's entries from the
    /// kernel to refresh remaining timeouts (the staleness bound of the
    /// timeouts a Save reports).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub cache_refresh_secs: u64,
    /// Refuse Watch requests: every dump walks the kernel's table.
    #[arg(long)]
    pub no_cache: bool,
    /// Encode every Save whole (state format v1.1) instead of patching the
    /// warm cache's pre-encoded base (v1.2, less migration downtime): for
    /// migrations to hosts whose conntrack-vmstated predates v1.2.
    #[arg(long)]
    pub no_base: bool,
}

//! Command line of `conntrack-vmstated`, in the library so that the
//! build-time generator renders its man page from the same definitions as
//! `--help` (the helper's are in [`crate::helper::HelperArgs`]).

use std::path::PathBuf;

use clap::Parser;

use crate::service::{DEFAULT_LOAD_BUDGET_MS, DEFAULT_SAVE_DEADLINE_MS};

/// Carries VMs' conntrack entries through QEMU live migration: a manager on
/// D-Bus (org.conntrack_vmstate.Manager1) registers VMs, and for each one an
/// org.qemu.VMState1 helper answers QEMU's dbus-vmstate Save and Load.
#[derive(Debug, Parser)]
#[command(name = "conntrack-vmstated", version, about, long_about)]
pub struct DaemonArgs {
    /// D-Bus address of the bus to serve the manager on (default: the system bus).
    #[arg(long, value_name = "ADDR")]
    pub bus_address: Option<String>,
    /// Directory for persisted registrations (default: $RUNTIME_DIRECTORY, else /run/conntrack-vmstate).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Exit after this many seconds without any registered VM (0: never).
    /// D-Bus activation starts the daemon again on the next call.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub idle_timeout: u64,
    /// Reach conntrack through the sandboxed helper listening on this socket
    /// instead of in-process netlink (which needs CAP_NET_ADMIN).
    #[arg(long, value_name = "PATH")]
    pub helper_socket: Option<PathBuf>,
    /// Save answers QEMU with an empty state (and records why) if dumping and
    /// encoding take longer than this; QEMU itself gives up after 25000 ms and
    /// every millisecond of Save is guest downtime.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_SAVE_DEADLINE_MS)]
    pub save_deadline_ms: u64,
    /// Load creates the most valuable entries for this long, then answers
    /// QEMU (the guest resumes) and creates the rest in the background;
    /// LastLoad says when the restore is complete. (`--load-deadline-ms` is
    /// the old name of the same knob.)
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_LOAD_BUDGET_MS, alias = "load-deadline-ms")]
    pub load_budget_ms: u64,
    /// Most entries one Load creates for a VM registered without its own
    /// `max_entries`; the rest (the least valuable) are counted as
    /// over_cap. Never more than a quarter of nf_conntrack_max.
    #[arg(long, value_name = "N", default_value_t = crate::service::confine::DEFAULT_MAX_ENTRIES, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_vm_entries: u64,
    /// How often the warm cache re-reads each registered VM's entries from
    /// the kernel to refresh remaining timeouts: the staleness bound of the
    /// timeouts Save reports. Ignored with --helper-socket (the helper keeps
    /// the cache; see its own option).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub cache_refresh_secs: u64,
    /// Do not keep registered VMs' entries warm: every Save walks the
    /// kernel's conntrack table. In-process mode only.
    #[arg(long)]
    pub no_cache: bool,
    /// Encode every Save whole (state format v1.1) instead of patching the
    /// warm cache's pre-encoded base (v1.2, less migration downtime): for
    /// migrations to hosts whose conntrack-vmstated predates v1.2. Ignored
    /// with --helper-socket (see the helper's own option).
    #[arg(long)]
    pub no_base: bool,
}

/// The state directory: `--state-dir`, else the first of systemd's
/// `$RUNTIME_DIRECTORY`, else /run/conntrack-vmstate.
pub fn state_dir(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| {
        // systemd may pass several directories separated by ':'.
        std::env::var_os("RUNTIME_DIRECTORY").and_then(|v| {
            v.to_str()
                .and_then(|s| s.split(':').next())
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
    })
    .unwrap_or_else(|| PathBuf::from("/run/conntrack-vmstate"))
}

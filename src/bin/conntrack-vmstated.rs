//! `conntrack-vmstated`: serves `org.qemu.VMState1` for registered VMs so
//! their conntrack entries travel with QEMU live migrations.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use conntrack_vmstate::access::ConntrackAccess;
use conntrack_vmstate::bus::{self, DaemonConfig};
use conntrack_vmstate::cache::{CacheConfig, CachedAccess};
use conntrack_vmstate::service::{DEFAULT_LOAD_BUDGET_MS, DEFAULT_SAVE_DEADLINE_MS};

/// Carries VMs' conntrack entries through QEMU live migration: a manager on
/// D-Bus (org.conntrack_vmstate.Manager1) registers VMs, and for each one an
/// org.qemu.VMState1 helper answers QEMU's dbus-vmstate Save and Load.
#[derive(Debug, Parser)]
#[command(name = "conntrack-vmstated", version, about, long_about)]
struct Args {
    /// D-Bus address of the bus to serve the manager on (default: the system bus).
    #[arg(long, value_name = "ADDR")]
    bus_address: Option<String>,
    /// Directory for persisted registrations (default: $RUNTIME_DIRECTORY, else /run/conntrack-vmstate).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Exit after this many seconds without any registered VM (0: never).
    /// D-Bus activation starts the daemon again on the next call.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    idle_timeout: u64,
    /// Reach conntrack through the sandboxed helper listening on this socket
    /// instead of in-process netlink (which needs CAP_NET_ADMIN).
    #[arg(long, value_name = "PATH")]
    helper_socket: Option<PathBuf>,
    /// Save answers QEMU with an empty state (and records why) if dumping and
    /// encoding take longer than this; QEMU itself gives up after 25000 ms and
    /// every millisecond of Save is guest downtime.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_SAVE_DEADLINE_MS)]
    save_deadline_ms: u64,
    /// Load creates the most valuable entries for this long, then answers
    /// QEMU (the guest resumes) and creates the rest in the background;
    /// LastLoad says when the restore is complete. (`--load-deadline-ms` is
    /// the old name of the same knob.)
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_LOAD_BUDGET_MS, alias = "load-deadline-ms")]
    load_budget_ms: u64,
    /// How often the warm cache re-reads each registered VM's entries from
    /// the kernel to refresh remaining timeouts: the staleness bound of the
    /// timeouts Save reports. Ignored with --helper-socket (the helper keeps
    /// the cache; see its own option).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    cache_refresh_secs: u64,
    /// Do not keep registered VMs' entries warm: every Save walks the
    /// kernel's conntrack table. In-process mode only.
    #[arg(long)]
    no_cache: bool,
}

fn state_dir(arg: Option<PathBuf>) -> PathBuf {
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    bus::logging::init("conntrack-vmstated");
    let access: Arc<dyn ConntrackAccess> = match &args.helper_socket {
        Some(p) => Arc::new(
            conntrack_vmstate::helper::HelperClient::new(p)
                .with_context(|| format!("conntrack helper at {}", p.display()))?,
        ),
        None => {
            let ct =
                conntrack_vmstate::ctnetlink::Ctnetlink::open().context("opening ctnetlink")?;
            if args.no_cache {
                Arc::new(ct)
            } else {
                let cfg = CacheConfig {
                    refresh_interval: Duration::from_secs(args.cache_refresh_secs),
                    ..CacheConfig::default()
                };
                Arc::new(CachedAccess::new(ct, cfg).context("starting the conntrack cache")?)
            }
        }
    };
    let cfg = DaemonConfig {
        bus_address: args.bus_address,
        state_dir: state_dir(args.state_dir),
        save_deadline: Duration::from_millis(args.save_deadline_ms),
        load_budget: Duration::from_millis(args.load_budget_ms),
    };
    let idle = (args.idle_timeout > 0).then(|| Duration::from_secs(args.idle_timeout));
    // Few worker threads suffice: conntrack work runs on the blocking pool.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let res = rt.block_on(bus::run(cfg, access, idle));
    if let Err(e) = &res {
        tracing::error!("conntrack-vmstated failed: {e}");
    }
    res.map_err(Into::into)
}

//! `conntrack-vmstated`: serves `org.qemu.VMState1` for registered VMs so
//! their conntrack entries travel with QEMU live migrations.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use conntrack_vmstate::access::ConntrackAccess;
use conntrack_vmstate::bus::args::DaemonArgs;
use conntrack_vmstate::bus::{self, DaemonConfig};
use conntrack_vmstate::cache::{CacheConfig, CachedAccess};

fn main() -> anyhow::Result<()> {
    let args = DaemonArgs::parse();
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
                let cfg =
                    CacheConfig::new(Duration::from_secs(args.cache_refresh_secs), !args.no_base);
                Arc::new(CachedAccess::new(ct, cfg).context("starting the conntrack cache")?)
            }
        }
    };
    let cfg = DaemonConfig {
        bus_address: args.bus_address,
        state_dir: bus::args::state_dir(args.state_dir),
        save_deadline: Duration::from_millis(args.save_deadline_ms),
        load_budget: Duration::from_millis(args.load_budget_ms),
        max_vm_entries: args.max_vm_entries,
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

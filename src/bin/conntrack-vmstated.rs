//! `conntrack-vmstated`: serves `org.qemu.VMState1` for registered VMs so
//! their conntrack entries travel with QEMU live migrations.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use conntrack_vmstate::access::ConntrackAccess;
use conntrack_vmstate::args::DaemonArgs;
use conntrack_vmstate::bus::{self, DaemonConfig};
use conntrack_vmstate::helper::HelperClient;
use conntrack_vmstate::{logging, systemd};

fn main() -> anyhow::Result<()> {
    let args = DaemonArgs::parse();
    logging::init("conntrack-vmstated");
    let access: Arc<dyn ConntrackAccess> = if args.in_process {
        args.common.open_access()?
    } else {
        let p = &args.helper_socket;
        Arc::new(
            HelperClient::new(p).with_context(|| format!("conntrack helper at {}", p.display()))?,
        )
    };
    let cfg = DaemonConfig {
        bus_address: args.bus_address,
        state_dir: systemd::state_dir(args.state_dir),
        save_deadline: Duration::from_millis(args.save_deadline_ms),
        load_budget: Duration::from_millis(args.load_budget_ms),
        max_vm_entries: args.max_vm_entries,
        stop_grace: Duration::from_secs(args.stop_grace_secs),
    };
    // Few worker threads suffice: conntrack work runs on the blocking pool.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let res = rt.block_on(bus::run(cfg, access, args.common.idle_timeout()));
    if let Err(e) = &res {
        tracing::error!("conntrack-vmstated failed: {e}");
    }
    res.map_err(Into::into)
}

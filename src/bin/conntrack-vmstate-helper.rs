//! `conntrack-vmstate-helper`: the sandboxed, socket-activated process that
//! holds CAP_NET_ADMIN and does all netlink conntrack work for the daemon.

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use conntrack_vmstate::access::{AccessError, ConntrackAccess, CreateReport, DeleteReport};
use conntrack_vmstate::args::HelperArgs;
use conntrack_vmstate::entry::{Entry, Selector};
use conntrack_vmstate::helper::{self, ServerConfig};
use conntrack_vmstate::{logging, systemd};

fn main() -> std::process::ExitCode {
    // Before any thread exists: reads and clears LISTEN_* from the environment.
    let activated = systemd::take_listener();
    let args = HelperArgs::parse();
    logging::init("conntrack-vmstate-helper");
    match run(args, activated) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("conntrack-vmstate-helper failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: HelperArgs, activated: std::io::Result<Option<UnixListener>>) -> anyhow::Result<()> {
    let activated = activated.context("reading the socket passed by systemd")?;
    let listener = match (activated, &args.listen) {
        (Some(l), None) => l,
        (None, Some(path)) => {
            // A stale socket file from an earlier run would make bind fail.
            if path.exists() {
                std::fs::remove_file(path)
                    .with_context(|| format!("removing stale {}", path.display()))?;
            }
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?
        }
        (Some(_), Some(_)) => bail!("--listen given, but systemd also passed a socket"),
        (None, None) => bail!(
            "no socket: start through conntrack-vmstate-helper.socket or pass --listen PATH \
             (the packaged socket is {})",
            helper::DEFAULT_SOCKET
        ),
    };
    // systemd stops the helper with SIGTERM: answer what is in flight, then exit.
    let stop = systemd::StopSignals::install().context("installing the stop signal handlers")?;
    let mut access = args.common.open_access()?;
    if args.common.no_cache {
        access = Arc::new(NoWatch(access));
    }
    let cfg = ServerConfig {
        idle_timeout: args.common.idle_timeout(),
        max_connections: args.max_connections.max(1),
        stop: Some(stop.flag()),
        ..ServerConfig::default()
    };
    systemd::notify_ready("Serving conntrack requests");
    tracing::info!("serving conntrack requests");
    let summary = helper::serve(listener, access, cfg).context("serving")?;
    systemd::notify_stopping();
    tracing::info!(
        CONNECTIONS = summary.connections,
        REQUESTS = summary.requests,
        REJECTED = summary.rejected,
        "{}",
        match stop.received() {
            Some(sig) => format!("stopped: {sig}"),
            None => "idle, exiting".into(),
        }
    );
    Ok(())
}

/// `--no-cache`: the plain access, refusing watches so the daemon logs that
/// its Saves dump directly.
struct NoWatch(Arc<dyn ConntrackAccess>);

impl ConntrackAccess for NoWatch {
    fn dump(&self, sel: &Selector) -> Result<Vec<Entry>, AccessError> {
        self.0.dump(sel)
    }
    fn create(&self, entries: &[Entry]) -> Result<CreateReport, AccessError> {
        self.0.create(entries)
    }
    fn create_background(&self, entries: &[Entry]) -> Result<CreateReport, AccessError> {
        self.0.create_background(entries)
    }
    fn delete_selected(&self, sel: &Selector) -> Result<u64, AccessError> {
        self.0.delete_selected(sel)
    }
    fn delete_entries(&self, entries: &[Entry]) -> Result<DeleteReport, AccessError> {
        self.0.delete_entries(entries)
    }
    fn watch(&self, _sel: &Selector, _on: bool) -> Result<(), AccessError> {
        Err(AccessError::Helper(
            "the helper runs with --no-cache".into(),
        ))
    }
}

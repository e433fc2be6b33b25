//! `conntrack-vmstate-helper`: the sandboxed, socket-activated process that
//! holds CAP_NET_ADMIN and does all netlink conntrack work for the daemon.

use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use conntrack_vmstate::access::{AccessError, ConntrackAccess, CreateReport, DeleteReport};
use conntrack_vmstate::cache::{CacheConfig, CachedAccess};
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::{Entry, Selector};
use conntrack_vmstate::helper::{self, server, HelperArgs, ServerConfig};

fn main() -> std::process::ExitCode {
    // Before any thread exists: reads and clears LISTEN_* from the environment.
    let activated = server::listener_from_systemd();
    let args = HelperArgs::parse();
    // systemd's journal adds time and unit; keep lines plain.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(args, activated) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conntrack-vmstate-helper: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Set by SIGTERM/SIGINT; the server polls it.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// systemd stops the helper with SIGTERM: answer what is in flight, then exit.
fn handle_stop_signals() -> anyhow::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &act) }.with_context(|| format!("installing {sig} handler"))?;
    }
    Ok(())
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
    handle_stop_signals()?;
    let ct = Ctnetlink::open().context("opening the conntrack netlink socket")?;
    let access: Arc<dyn ConntrackAccess> = if args.no_cache {
        Arc::new(NoWatch(ct))
    } else {
        let cfg = CacheConfig::new(Duration::from_secs(args.cache_refresh_secs), !args.no_base);
        Arc::new(CachedAccess::new(ct, cfg).context("starting the conntrack cache")?)
    };
    let cfg = ServerConfig {
        idle_timeout: (args.idle_timeout > 0).then(|| Duration::from_secs(args.idle_timeout)),
        max_connections: args.max_connections.max(1),
        stop: Some(&STOP),
        ..ServerConfig::default()
    };
    tracing::info!("serving conntrack requests");
    let summary = helper::serve(listener, access, cfg).context("serving")?;
    tracing::info!(
        connections = summary.connections,
        requests = summary.requests,
        rejected = summary.rejected,
        "{}",
        if STOP.load(Ordering::SeqCst) {
            "stopped"
        } else {
            "idle, exiting"
        }
    );
    Ok(())
}

/// `--no-cache`: the plain access, refusing watches so the daemon logs that
/// its Saves dump directly.
struct NoWatch(Ctnetlink);

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

//! Daemon start and stop: the manager connection, the objects on it, the
//! restore at start before the manager name is owned, systemd
//! notification, idle exit and signals. What a Register or Unregister does
//! is [`Manager`]'s; serving a VM is [`BusEndpoint`]'s.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use zbus::connection::Builder;
use zbus::fdo::{ObjectManager, RequestNameFlags, RequestNameReply};

use super::endpoint::BusEndpoint;
use super::ifaces::Manager1;
use super::{system_bus_address, MANAGER_NAME, MANAGER_PATH, OBJECT_ROOT};
use crate::access::ConntrackAccess;
use crate::service::{Engine, Manager, Registry, Store};

/// What the daemon needs besides its conntrack access.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Bus of the manager; `None` is the system bus.
    pub bus_address: Option<String>,
    pub state_dir: PathBuf,
    pub save_deadline: Duration,
    /// Load creates entries synchronously for this long, then answers QEMU
    /// and creates the rest in the background.
    pub load_budget: Duration,
    /// Per-VM entry cap of a Load for registrations without `max_entries`
    /// (bounded by half of nf_conntrack_max when that is readable).
    pub max_vm_entries: u64,
    /// How long a stop lets running restores finish before handing the rest
    /// over to the next start.
    pub stop_grace: Duration,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot connect to the manager bus {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: zbus::Error,
    },
    #[error("{MANAGER_NAME} is already owned on {address}: another conntrack-vmstated runs")]
    NameTaken { address: String },
    #[error("cannot own {MANAGER_NAME} on {address}: {source}")]
    RequestName {
        address: String,
        #[source]
        source: zbus::Error,
    },
    #[error("cannot serve {path}: {source}")]
    Serve {
        path: &'static str,
        #[source]
        source: zbus::Error,
    },
    /// Not a start failure: the daemon stopped before `n` restores ended.
    /// Failing the unit on purpose makes systemd (`Restart=on-failure`)
    /// start the instance that completes them, unless it was stopped.
    #[error(
        "stopped with {n} restore(s) unfinished after the {grace_s} s grace; \
         the next start completes them"
    )]
    HandedOver { n: usize, grace_s: u64 },
}

/// A running daemon: manager name owned, registrations served.
pub struct Daemon {
    manager: Arc<Manager<BusEndpoint>>,
    address: String,
    stop_grace: Duration,
}

impl Daemon {
    /// Connects, serves the manager and ObjectManager, serves every persisted
    /// registration again, and only then owns the manager name, so a caller
    /// that sees the name sees the restored VMs too.
    pub async fn start(
        cfg: DaemonConfig,
        access: Arc<dyn ConntrackAccess>,
    ) -> Result<Daemon, DaemonError> {
        let address = cfg.bus_address.clone().unwrap_or_else(system_bus_address);
        let builder = match &cfg.bus_address {
            Some(a) => Builder::address(a.as_str()),
            None => Builder::system(),
        };
        let manager = builder
            .build()
            .await
            .map_err(|source| DaemonError::Connect {
                address: address.clone(),
                source,
            })?;
        let engine = Arc::new(
            Engine::new(access, cfg.save_deadline, cfg.load_budget)
                .with_store(Store::new(&cfg.state_dir))
                .with_max_entries(cfg.max_vm_entries),
        );
        let mgr = Arc::new(Manager::new(
            Registry::new(Store::new(&cfg.state_dir)),
            engine,
            BusEndpoint::new(manager.clone()),
        ));
        mgr.endpoint().set_owner(Arc::downgrade(&mgr));
        let server = manager.object_server();
        server
            .at(OBJECT_ROOT, ObjectManager)
            .await
            .map_err(|source| DaemonError::Serve {
                path: OBJECT_ROOT,
                source,
            })?;
        server
            .at(
                MANAGER_PATH,
                Manager1 {
                    manager: mgr.clone(),
                },
            )
            .await
            .map_err(|source| DaemonError::Serve {
                path: MANAGER_PATH,
                source,
            })?;

        // Failures are logged there; the daemon starts anyway.
        mgr.restore().await;

        match manager
            .request_name_with_flags(MANAGER_NAME, RequestNameFlags::DO_NOT_QUEUE)
            .await
        {
            Ok(RequestNameReply::PrimaryOwner) | Ok(RequestNameReply::AlreadyOwner) => {}
            Ok(_) => return Err(DaemonError::NameTaken { address }),
            Err(source) => return Err(DaemonError::RequestName { address, source }),
        }
        Ok(Daemon {
            manager: mgr,
            address,
            stop_grace: cfg.stop_grace,
        })
    }

    /// Unique name of the manager connection.
    pub fn unique_name(&self) -> Option<String> {
        self.manager
            .endpoint()
            .manager()
            .unique_name()
            .map(|n| n.to_string())
    }

    /// The manager bus address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Number of registered VMs; changes on Register/Unregister.
    pub fn vm_count(&self) -> tokio::sync::watch::Receiver<usize> {
        self.manager.vm_count()
    }

    /// If no VM is registered, gives up the manager name (so the next call
    /// activates a new instance instead of reaching one that is exiting) and
    /// returns true. Serialized with Register so none slips in between.
    pub async fn release_if_idle(&self) -> bool {
        self.manager.close_if_idle().await
    }

    /// Stops serving every VM (their registrations stay persisted), lets
    /// running restores finish within the stop grace and leaves the bus.
    /// Returns how many restores were handed over to the next start.
    pub async fn shutdown(self) -> usize {
        self.manager.shutdown(self.stop_grace).await
    }
}

/// Runs the daemon until SIGTERM/SIGINT or the idle timeout, talking to
/// systemd: READY=1 once the manager name is owned and persisted VMs are
/// served again, STATUS= with the VM count, watchdog pings, STOPPING=1.
pub async fn run(
    cfg: DaemonConfig,
    access: Arc<dyn ConntrackAccess>,
    idle_timeout: Option<Duration>,
) -> Result<(), DaemonError> {
    use crate::systemd;

    let stop = systemd::StopSignals::install().ok();
    let daemon = Daemon::start(cfg, access).await?;
    let mut count = daemon.vm_count();
    let status = |n: usize| format!("Serving {n} VM{}", if n == 1 { "" } else { "s" });
    let n = *count.borrow_and_update();
    systemd::notify_ready(&status(n));
    tracing::info!(
        "conntrack-vmstated ready on {}: {}",
        daemon.address(),
        status(n)
    );

    let watchdog = systemd::watchdog_ping_interval().map(|d| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(d);
            loop {
                tick.tick().await;
                systemd::notify_watchdog();
            }
        })
    });

    let mut idle_since = (n == 0).then(Instant::now);
    let mut check = tokio::time::interval(Duration::from_millis(250));
    let reason = loop {
        tokio::select! {
            sig = async { Some(stop.as_ref()?.recv().await) }, if stop.is_some() => {
                break sig.unwrap_or("a stop signal")
            }
            changed = count.changed() => {
                if changed.is_err() { break "manager state gone"; }
                let n = *count.borrow_and_update();
                systemd::notify_status(&status(n));
                idle_since = (n == 0).then(Instant::now);
            }
            _ = check.tick() => {
                if let (Some(limit), Some(since)) = (idle_timeout, idle_since) {
                    if since.elapsed() >= limit && daemon.release_if_idle().await {
                        break "idle timeout with no VM registered";
                    }
                }
            }
        }
    };
    systemd::notify_stopping();
    tracing::info!("conntrack-vmstated stopping: {reason}");
    let grace_s = daemon.stop_grace.as_secs();
    // The watchdog keeps going while restores finish.
    let handed = daemon.shutdown().await;
    if let Some(w) = watchdog {
        w.abort();
    }
    if handed > 0 {
        return Err(DaemonError::HandedOver { n: handed, grace_s });
    }
    Ok(())
}

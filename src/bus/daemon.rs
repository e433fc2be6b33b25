//! Wiring: the manager connection, one connection per VM, restore at start,
//! systemd notification, idle exit and signals.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::task::AbortHandle;
use zbus::connection::Builder;
use zbus::fdo::{ObjectManager, RequestNameFlags, RequestNameReply};
use zbus::Connection;
use zbus::OwnedObjectPath;

use super::error::Error;
use super::ifaces::{Manager1, Vm1, VmState1};
use super::{MANAGER_NAME, MANAGER_PATH, OBJECT_ROOT, VMSTATE_NAME, VMSTATE_PATH, VM_PATH_PREFIX};
use crate::access::ConntrackAccess;
use crate::service::{
    escape_path_element, parse_unregister, Admission, Engine, OptValue, Registry, Store, VmConfig,
    VmRuntime,
};

/// How long connecting to a VM's bus may take before Register gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// (bounded by a quarter of nf_conntrack_max when that is readable).
    pub max_vm_entries: u64,
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
}

/// One served VM: its own bus connection and the tasks that turn report
/// changes into PropertiesChanged.
struct Served {
    conn: Option<Connection>,
    /// Cleared when the VM's bus drops the connection (e.g. the bus daemon
    /// restarted), so an identical Register reconnects instead of
    /// reporting success for a VM nobody serves.
    alive: Arc<AtomicBool>,
    watchers: Vec<AbortHandle>,
}

/// State shared by the manager interface and the daemon loop.
pub(crate) struct Shared {
    registry: Mutex<Registry>,
    served: Mutex<HashMap<String, Served>>,
    /// Serializes Register/Unregister/idle exit: each spans awaits (connecting
    /// to a VM's bus) between deciding and committing.
    ops: tokio::sync::Mutex<()>,
    engine: Arc<Engine>,
    manager: Connection,
    vm_count: tokio::sync::watch::Sender<usize>,
    /// Set (under `ops`) once the daemon decided to exit: a Register that
    /// was queued behind that decision must fail rather than succeed on a
    /// process that is about to stop serving it.
    closing: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The effective address of the system bus, as QEMU must be given it.
pub fn system_bus_address() -> String {
    std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
        .unwrap_or_else(|_| "unix:path=/run/dbus/system_bus_socket".to_string())
}

/// Object path of a VM's `VM1` object.
pub fn vm_object_path(vm: &str) -> String {
    format!("{VM_PATH_PREFIX}/{}", escape_path_element(vm))
}

impl Shared {
    fn path(vm: &str) -> OwnedObjectPath {
        // The escaping only yields [A-Za-z0-9_], always a valid element.
        OwnedObjectPath::try_from(vm_object_path(vm)).unwrap_or_else(|_| {
            OwnedObjectPath::try_from(VM_PATH_PREFIX).expect("constant path is valid")
        })
    }

    pub(crate) async fn register(
        &self,
        vm: &str,
        options: &[(String, OptValue)],
    ) -> Result<OwnedObjectPath, Error> {
        let cfg = VmConfig::from_options(vm, options)?;
        let _ops = self.ops.lock().await;
        self.check_open()?;
        let admission = lock(&self.registry).admit(cfg)?;
        let path = Self::path(vm);
        match admission {
            Admission::Existing(rt) => {
                // A restored VM whose bus was unreachable at start is retried.
                let serving = lock(&self.served)
                    .get(vm)
                    .is_some_and(|s| s.conn.is_some() && s.alive.load(Ordering::SeqCst));
                if !serving {
                    self.serve(rt.clone(), true).await?;
                }
                if !rt.watching() {
                    self.engine.watch(&rt, true).await;
                }
                tracing::info!(
                    VMID = %vm,
                    VMSTATE_ID = %rt.config.id,
                    "Register of VM {vm}: already registered with these options"
                );
            }
            Admission::New(cfg) => {
                let rt = Arc::new(VmRuntime::new(cfg.clone()));
                self.serve(rt.clone(), true).await?;
                let inserted = lock(&self.registry).insert_runtime(rt.clone());
                if let Err(e) = inserted {
                    self.unserve(vm).await;
                    return Err(e.into());
                }
                // From now on Save is served from the warm cache.
                self.engine.watch(&rt, true).await;
                tracing::info!(
                    VMID = %vm,
                    VMSTATE_ID = %cfg.id,
                    MARK = cfg.mark,
                    BUS = %cfg.bus_key(),
                    "Register of VM {vm}: Id {} mark {:#x}/{:#x} on bus {}",
                    cfg.id, cfg.mark, cfg.mark_mask, cfg.bus_key()
                );
                self.count_changed();
            }
        }
        Ok(path)
    }

    pub(crate) async fn unregister(
        &self,
        vm: &str,
        options: &[(String, OptValue)],
    ) -> Result<(), Error> {
        let flush = parse_unregister(options)?;
        let _ops = self.ops.lock().await;
        self.check_open()?;
        let rt = lock(&self.registry).get(vm).ok_or_else(|| {
            Error::from(crate::service::ServiceError::NotRegistered { vm: vm.into() })
        })?;
        // Without a Save that took entries (none since the VM was
        // registered, or one that fell back to an empty state) there is
        // nothing to flush, and the log says so rather than claiming a flush.
        let had_saved = rt.saved_len() > 0;
        let flushed = if flush {
            Some(self.engine.flush(&rt).await?)
        } else {
            None
        };
        lock(&self.registry).remove(vm)?;
        self.engine.forget_saved(&rt).await;
        self.unserve(vm).await;
        let stopped = self
            .engine
            .cancel_restore(&rt, "the VM was unregistered")
            .await;
        if stopped {
            tracing::info!(VMID = %vm, "Unregister of VM {vm}: stopped its running restore");
        }
        self.engine.watch(&rt, false).await;
        let (deleted, missing) = flushed.map_or((0, 0), |r| (r.deleted, r.missing));
        tracing::info!(
            VMID = %vm,
            VMSTATE_ID = %rt.config.id,
            FLUSH = flush,
            DELETED = deleted,
            MISSING = missing,
            "Unregister of VM {vm}{}",
            match (flush, had_saved) {
                (false, _) => String::new(),
                (true, true) =>
                    format!(": flushed {deleted} saved entries ({missing} already gone)"),
                (true, false) =>
                    ": nothing to flush, no Save with entries since the VM was registered".into(),
            }
        );
        self.count_changed();
        Ok(())
    }

    /// Connects to the VM's bus, queues on `org.qemu.VMState1` and exports
    /// the VM1 object. With `strict`, an unreachable bus is an error;
    /// otherwise (restore at start) the VM is exported without a connection.
    async fn serve(&self, rt: Arc<VmRuntime>, strict: bool) -> Result<(), Error> {
        let vm = rt.config.vm.clone();
        let address = rt
            .config
            .bus_address
            .clone()
            .unwrap_or_else(system_bus_address);
        let conn = match self.connect_vm(rt.clone(), &address).await {
            Ok(c) => Some(c),
            Err(e) if strict => return Err(e),
            Err(e) => {
                tracing::error!(VMID = %vm, "VM {vm} is not served: {e}");
                None
            }
        };
        let unique_name = conn
            .as_ref()
            .and_then(|c| c.unique_name().map(|n| n.to_string()))
            .unwrap_or_default();
        let path = Self::path(&vm);
        let server = self.manager.object_server();
        // Replacing covers a retry for a VM exported without a connection.
        let _ = server.remove::<Vm1, _>(&path).await;
        let vm1_addr = address.clone();
        let vm1 = Vm1 {
            rt: rt.clone(),
            bus_address: address,
            unique_name,
        };
        server.at(&path, vm1).await?;
        let mut watchers = Vec::new();
        if let Ok(iface) = server.interface::<_, Vm1>(&path).await {
            let (i, r) = (iface.clone(), rt.clone());
            watchers.push(
                tokio::spawn(async move {
                    let mut rx = r.watch_save();
                    while rx.changed().await.is_ok() {
                        let _ = i.get().await.last_save_changed(i.signal_emitter()).await;
                    }
                })
                .abort_handle(),
            );
            watchers.push(
                tokio::spawn(async move {
                    let mut rx = rt.watch_load();
                    while rx.changed().await.is_ok() {
                        let _ = iface
                            .get()
                            .await
                            .last_load_changed(iface.signal_emitter())
                            .await;
                    }
                })
                .abort_handle(),
            );
        }
        let alive = Arc::new(AtomicBool::new(conn.is_some()));
        if let Some(c) = &conn {
            let (c, alive, vm, addr) = (c.clone(), alive.clone(), vm.clone(), vm1_addr);
            watchers.push(
                tokio::spawn(async move {
                    c.closed().await;
                    alive.store(false, Ordering::SeqCst);
                    tracing::error!(
                        VMID = %vm,
                        "VM {vm} is no longer served: its connection to bus {addr} closed; \
                         Register it again once the bus is back"
                    );
                })
                .abort_handle(),
            );
        }
        if let Some(old) = lock(&self.served).insert(
            vm,
            Served {
                conn,
                alive,
                watchers,
            },
        ) {
            old.watchers.iter().for_each(AbortHandle::abort);
        }
        Ok(())
    }

    async fn connect_vm(&self, rt: Arc<VmRuntime>, address: &str) -> Result<Connection, Error> {
        let unreachable = |reason: String| {
            Error::BusUnreachable(format!(
                "cannot serve {VMSTATE_NAME} for VM '{}' on bus {address}: {reason}",
                rt.config.vm
            ))
        };
        let builder = match &rt.config.bus_address {
            Some(a) => Builder::address(a.as_str()),
            None => Builder::system(),
        };
        let iface = VmState1 {
            rt: rt.clone(),
            engine: self.engine.clone(),
        };
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            builder.serve_at(VMSTATE_PATH, iface).build(),
        )
        .await
        .map_err(|_| {
            unreachable(format!(
                "no connection within {} s",
                CONNECT_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| unreachable(e.to_string()))?;
        // Queue, never DO_NOT_QUEUE and never replace: every VM of this bus
        // owns the name at once and QEMU asks all of them (ListQueuedOwners).
        match conn
            .request_name_with_flags(VMSTATE_NAME, RequestNameFlags::empty())
            .await
        {
            Ok(RequestNameReply::PrimaryOwner)
            | Ok(RequestNameReply::InQueue)
            | Ok(RequestNameReply::AlreadyOwner) => Ok(conn),
            Ok(RequestNameReply::Exists) => Err(unreachable("the name could not be queued".into())),
            Err(e) => Err(unreachable(e.to_string())),
        }
    }

    async fn unserve(&self, vm: &str) {
        let served = lock(&self.served).remove(vm);
        let _ = self
            .manager
            .object_server()
            .remove::<Vm1, _>(Self::path(vm))
            .await;
        if let Some(s) = served {
            s.watchers.iter().for_each(AbortHandle::abort);
            if let Some(conn) = s.conn {
                let _ = conn.release_name(VMSTATE_NAME).await;
                let _ = conn.close().await;
            }
        }
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown(
                "conntrack-vmstated is exiting; call again to reach a new instance".into(),
            ));
        }
        Ok(())
    }

    fn count_changed(&self) {
        let n = lock(&self.registry).len();
        self.vm_count.send_replace(n);
    }
}

/// A running daemon: manager name owned, registrations served.
pub struct Daemon {
    shared: Arc<Shared>,
    address: String,
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
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry::new(Store::new(&cfg.state_dir))),
            served: Mutex::new(HashMap::new()),
            ops: tokio::sync::Mutex::new(()),
            engine,
            manager: manager.clone(),
            vm_count: tokio::sync::watch::Sender::new(0),
            closing: AtomicBool::new(false),
        });
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
                    shared: shared.clone(),
                },
            )
            .await
            .map_err(|source| DaemonError::Serve {
                path: MANAGER_PATH,
                source,
            })?;

        let persisted = lock(&shared.registry).persisted();
        match persisted {
            Ok(cfgs) => {
                for c in cfgs {
                    let rt = lock(&shared.registry).insert_restored(c);
                    shared.engine.restore_saved(&rt);
                    let (vm, id) = (rt.config.vm.clone(), rt.config.id.clone());
                    let _ = shared.serve(rt.clone(), false).await;
                    shared.engine.watch(&rt, true).await;
                    tracing::info!(VMID = %vm, VMSTATE_ID = %id, "Restored registration of VM {vm}");
                }
            }
            Err(e) => tracing::error!("starting without saved registrations: {e}"),
        }
        shared.count_changed();

        match manager
            .request_name_with_flags(MANAGER_NAME, RequestNameFlags::DO_NOT_QUEUE)
            .await
        {
            Ok(RequestNameReply::PrimaryOwner) | Ok(RequestNameReply::AlreadyOwner) => {}
            Ok(_) => return Err(DaemonError::NameTaken { address }),
            Err(source) => return Err(DaemonError::RequestName { address, source }),
        }
        Ok(Daemon { shared, address })
    }

    /// Unique name of the manager connection.
    pub fn unique_name(&self) -> Option<String> {
        self.shared.manager.unique_name().map(|n| n.to_string())
    }

    /// The manager bus address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Number of registered VMs; changes on Register/Unregister.
    pub fn vm_count(&self) -> tokio::sync::watch::Receiver<usize> {
        self.shared.vm_count.subscribe()
    }

    /// If no VM is registered, gives up the manager name (so the next call
    /// activates a new instance instead of reaching one that is exiting) and
    /// returns true. Serialized with Register so none slips in between.
    pub async fn release_if_idle(&self) -> bool {
        let _ops = self.shared.ops.lock().await;
        if !lock(&self.shared.registry).is_empty() {
            return false;
        }
        self.shared.closing.store(true, Ordering::SeqCst);
        let _ = self.shared.manager.release_name(MANAGER_NAME).await;
        true
    }

    /// Stops serving every VM (their registrations stay persisted) and
    /// leaves the bus.
    pub async fn shutdown(self) {
        let _ops = self.shared.ops.lock().await;
        self.shared.closing.store(true, Ordering::SeqCst);
        let vms: Vec<String> = lock(&self.shared.served).keys().cloned().collect();
        for vm in vms {
            self.shared.unserve(&vm).await;
        }
        // A restore still running would keep the process alive; its VM is
        // registered again by the next instance, the entries made so far stay.
        let all = lock(&self.shared.registry).all();
        for rt in all {
            self.shared
                .engine
                .cancel_restore(&rt, "conntrack-vmstated is stopping")
                .await;
        }
        let _ = self.shared.manager.release_name(MANAGER_NAME).await;
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
    use sd_notify::NotifyState;
    use tokio::signal::unix::{signal, SignalKind};

    let mut sigterm = signal(SignalKind::terminate()).ok();
    let mut sigint = signal(SignalKind::interrupt()).ok();
    let daemon = Daemon::start(cfg, access).await?;
    let mut count = daemon.vm_count();
    let status = |n: usize| format!("Serving {n} VM{}", if n == 1 { "" } else { "s" });
    let n = *count.borrow_and_update();
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status(n))]);
    tracing::info!(
        "conntrack-vmstated ready on {}: {}",
        daemon.address(),
        status(n)
    );

    let watchdog = sd_notify::watchdog_enabled().map(|d| {
        tokio::spawn(async move {
            // Ping at half the interval, as sd_watchdog_enabled(3) advises.
            let mut tick = tokio::time::interval(d / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        })
    });

    let mut idle_since = (n == 0).then(Instant::now);
    let mut check = tokio::time::interval(Duration::from_millis(250));
    let reason = loop {
        tokio::select! {
            _ = async { sigterm.as_mut()?.recv().await }, if sigterm.is_some() => break "SIGTERM",
            _ = async { sigint.as_mut()?.recv().await }, if sigint.is_some() => break "SIGINT",
            changed = count.changed() => {
                if changed.is_err() { break "manager state gone"; }
                let n = *count.borrow_and_update();
                let _ = sd_notify::notify(&[NotifyState::Status(&status(n))]);
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
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("Stopping")]);
    tracing::info!("conntrack-vmstated stopping: {reason}");
    if let Some(w) = watchdog {
        w.abort();
    }
    daemon.shutdown().await;
    Ok(())
}

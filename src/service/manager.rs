//! Registration policy: Register, Unregister, restore at start and the exit
//! decision, in the one order that keeps the registry, the state directory,
//! the warm cache and what is served on the VMs' buses consistent. Serving
//! itself (a bus connection per VM, the exported objects) is behind
//! [`Endpoint`], which the bus layer implements with zbus and the tests with
//! a fake, so this order is tested without a bus.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::engine::Engine;
use super::options::{parse_unregister, OptValue, VmConfig};
use super::runtime::VmRuntime;
use super::{Admission, Registry, ServiceError};

/// Where a registered VM is served to QEMU and to management.
///
/// Serving is two steps so the manager decides what an unreachable bus
/// means: [`connect`](Endpoint::connect) reaches the VM's bus (and queues
/// for QEMU there), [`export`](Endpoint::export) makes the VM visible to
/// management, with or without that link.
pub trait Endpoint: Send + Sync + 'static {
    /// A VM's own connection to its bus; dropping it stops serving there.
    type Link: Send + 'static;
    /// Why serving failed; the text names the VM and the bus.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Reaches the VM's bus and answers QEMU's Save/Load there with
    /// `engine`.
    fn connect(
        &self,
        rt: &Arc<VmRuntime>,
        engine: &Arc<Engine>,
    ) -> impl Future<Output = Result<Self::Link, Self::Error>> + Send;

    /// Makes the VM visible to management, replacing an earlier export of
    /// it; `None`: its bus was unreachable (restore at start), so it is
    /// listed but not served.
    fn export(
        &self,
        rt: &Arc<VmRuntime>,
        link: Option<Self::Link>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Whether the VM is exported with a link that is still open.
    fn is_serving(&self, vm: &str) -> bool;

    /// Stops serving the VM and removes its export; nothing if there is none.
    fn unserve(&self, vm: &str) -> impl Future<Output = ()> + Send;

    /// Stops accepting management calls (the bus gives up the manager name),
    /// once the manager decided to exit.
    fn withdraw(&self) -> impl Future<Output = ()> + Send;
}

/// Why a Register failed: the request itself, or serving it.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Endpoint(E),
}

/// What restoring the persisted registrations at start did.
#[derive(Debug)]
pub struct Restored<E> {
    /// Every VM registered again, in the order of the state file.
    pub vms: Vec<String>,
    /// The VMs among them that are listed but not served, and why.
    pub unserved: Vec<(String, E)>,
    /// Why the state file could not be read (the daemon starts with none).
    pub error: Option<ServiceError>,
}

/// The registered VMs and what is served for them, kept consistent.
pub struct Manager<E: Endpoint> {
    registry: Mutex<Registry>,
    /// Serializes Register/Unregister/exit: each spans awaits (connecting to
    /// a VM's bus) between deciding and committing.
    ops: tokio::sync::Mutex<()>,
    engine: Arc<Engine>,
    endpoint: E,
    vm_count: watch::Sender<usize>,
    /// Set (under `ops`) once the daemon decided to exit: a Register that
    /// was queued behind that decision must fail rather than succeed on a
    /// process that is about to stop serving it.
    closing: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<E: Endpoint> Manager<E> {
    /// A manager with nothing registered yet; see [`Manager::restore`].
    pub fn new(registry: Registry, engine: Arc<Engine>, endpoint: E) -> Manager<E> {
        let n = registry.len();
        Manager {
            registry: Mutex::new(registry),
            ops: tokio::sync::Mutex::new(()),
            engine,
            endpoint,
            vm_count: watch::Sender::new(n),
            closing: AtomicBool::new(false),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn endpoint(&self) -> &E {
        &self.endpoint
    }

    /// The registered VM called `vm`, if any.
    pub fn get(&self, vm: &str) -> Option<Arc<VmRuntime>> {
        lock(&self.registry).get(vm)
    }

    /// Number of registered VMs; changes on Register/Unregister.
    pub fn vm_count(&self) -> watch::Receiver<usize> {
        self.vm_count.subscribe()
    }

    /// Registers again every VM the state directory lists, with the saved
    /// ids of its last Save: served where its bus is reachable, otherwise
    /// listed without a link, so an identical Register retries it. An
    /// unreadable state file starts empty; both are logged and reported.
    pub async fn restore(&self) -> Restored<E::Error> {
        let _ops = self.ops.lock().await;
        let mut out = Restored {
            vms: Vec::new(),
            unserved: Vec::new(),
            error: None,
        };
        let persisted = lock(&self.registry).persisted();
        match persisted {
            Ok(cfgs) => {
                for c in cfgs {
                    let rt = lock(&self.registry).insert_restored(c);
                    self.engine.restore_saved(&rt);
                    let (vm, id) = (rt.config.vm.clone(), rt.config.id.clone());
                    let link = match self.endpoint.connect(&rt, &self.engine).await {
                        Ok(l) => Some(l),
                        Err(e) => {
                            tracing::error!(VMID = %vm, "VM {vm} is not served: {e}");
                            out.unserved.push((vm.clone(), e));
                            None
                        }
                    };
                    let _ = self.endpoint.export(&rt, link).await;
                    self.engine.watch(&rt, true).await;
                    tracing::info!(VMID = %vm, VMSTATE_ID = %id, "Restored registration of VM {vm}");
                    out.vms.push(vm);
                }
            }
            Err(e) => {
                tracing::error!("starting without saved registrations: {e}");
                out.error = Some(e);
            }
        }
        self.count_changed();
        out
    }

    /// Registers `vm` (idempotent for identical options) and serves it:
    /// admit → connect → export → insert (persisted) → watch. Whatever fails
    /// leaves nothing inserted, persisted or served.
    pub async fn register(
        &self,
        vm: &str,
        options: &[(String, OptValue)],
    ) -> Result<(), ManagerError<E::Error>> {
        let cfg = VmConfig::from_options(vm, options)?;
        let _ops = self.ops.lock().await;
        self.check_open()?;
        let admission = lock(&self.registry).admit(cfg)?;
        match admission {
            Admission::Existing(rt) => {
                // A restored VM whose bus was unreachable at start is retried.
                if !self.endpoint.is_serving(vm) {
                    self.serve(&rt).await?;
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
                self.serve(&rt).await?;
                let inserted = lock(&self.registry).insert_runtime(rt.clone());
                if let Err(e) = inserted {
                    self.endpoint.unserve(vm).await;
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
        Ok(())
    }

    /// Unregisters `vm`: flush (if asked) → remove (persisted) → forget the
    /// saved ids → unserve → stop a running restore → stop watching. A
    /// failed flush or write leaves the VM registered and served.
    pub async fn unregister(
        &self,
        vm: &str,
        options: &[(String, OptValue)],
    ) -> Result<(), ServiceError> {
        let flush = parse_unregister(options)?;
        let _ops = self.ops.lock().await;
        self.check_open()?;
        let rt = lock(&self.registry)
            .get(vm)
            .ok_or_else(|| ServiceError::NotRegistered { vm: vm.into() })?;
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
        self.endpoint.unserve(vm).await;
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

    /// If no VM is registered, decides to exit: later calls are refused and
    /// the endpoint withdraws (so the next call reaches a new instance
    /// instead of this exiting one). Serialized with Register so none slips
    /// in between. Returns whether it decided so.
    pub async fn close_if_idle(&self) -> bool {
        let _ops = self.ops.lock().await;
        if !lock(&self.registry).is_empty() {
            return false;
        }
        self.closing.store(true, Ordering::SeqCst);
        self.endpoint.withdraw().await;
        true
    }

    /// Stops serving every VM (their registrations stay persisted, for the
    /// next instance), stops running restores and withdraws.
    pub async fn shutdown(&self) {
        let _ops = self.ops.lock().await;
        self.closing.store(true, Ordering::SeqCst);
        let all = lock(&self.registry).all();
        for rt in &all {
            self.endpoint.unserve(&rt.config.vm).await;
        }
        // A restore still running would keep the process alive; its VM is
        // registered again by the next instance, the entries made so far stay.
        for rt in &all {
            self.engine
                .cancel_restore(rt, "conntrack-vmstated is stopping")
                .await;
        }
        self.endpoint.withdraw().await;
    }

    /// Connects and exports; an unreachable bus is an error and exports
    /// nothing.
    async fn serve(&self, rt: &Arc<VmRuntime>) -> Result<(), ManagerError<E::Error>> {
        let link = self
            .endpoint
            .connect(rt, &self.engine)
            .await
            .map_err(ManagerError::Endpoint)?;
        self.endpoint
            .export(rt, Some(link))
            .await
            .map_err(ManagerError::Endpoint)
    }

    fn check_open(&self) -> Result<(), ServiceError> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(ServiceError::ShuttingDown);
        }
        Ok(())
    }

    fn count_changed(&self) {
        let n = lock(&self.registry).len();
        self.vm_count.send_replace(n);
    }
}

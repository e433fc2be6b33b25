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

use super::engine::{Engine, Warmed};
use super::options::{parse_migration_step, parse_unregister, Lifecycle, OptValue, Role, VmConfig};
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
    /// Restores a previous instance handed over, resumed now.
    pub resumed: usize,
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
            resumed: 0,
        };
        let persisted = lock(&self.registry).persisted();
        match persisted {
            Ok(cfgs) => {
                for c in cfgs {
                    let rt = lock(&self.registry).insert_restored(c);
                    self.engine.restore_saved(&rt);
                    let (vm, id) = (rt.config.vm.clone(), rt.config.id.clone());
                    if rt.config.lifecycle == Lifecycle::Migration {
                        // Known, not served: a Prepare interrupted by the
                        // restart is run again by its caller.
                        let _ = self.endpoint.export(&rt, None).await;
                        out.vms.push(vm);
                        continue;
                    }
                    let link = match self.endpoint.connect(&rt, &self.engine).await {
                        Ok(l) => Some(l),
                        Err(e) => {
                            tracing::error!(VMID = %vm, "VM {vm} is not served: {e}");
                            out.unserved.push((vm.clone(), e));
                            None
                        }
                    };
                    let _ = self.endpoint.export(&rt, link).await;
                    self.engine.start_watch(&rt).await;
                    tracing::info!(VMID = %vm, VMSTATE_ID = %id, "Restored registration of VM {vm}");
                    // Not waited for: the daemon is ready (and other VMs
                    // served) before every cache is warm; the journal says
                    // when this one is.
                    let (engine, rt2) = (self.engine.clone(), rt.clone());
                    tokio::spawn(async move {
                        if let Some(w) = engine.wait_warm(&rt2).await {
                            log_warmed(&rt2, "restored registration", &w);
                        }
                    });
                    out.vms.push(vm);
                }
            }
            Err(e) => {
                tracing::error!("starting without saved registrations: {e}");
                out.error = Some(e);
            }
        }
        // After the registrations, so a resumed restore of a registered VM
        // reports in its LastLoad.
        out.resumed = self
            .engine
            .resume_pending(|vm| lock(&self.registry).get(vm))
            .await;
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
        let qemu_pid = cfg.qemu_pid;
        let ops = self.ops.lock().await;
        self.check_open()?;
        let admission = lock(&self.registry).admit(cfg)?;
        match admission {
            Admission::Existing(rt) if rt.config.lifecycle == Lifecycle::Migration => {
                if let Some(pid) = qemu_pid {
                    rt.bind_qemu(pid);
                }
                tracing::info!(
                    VMID = %vm,
                    VMSTATE_ID = %rt.config.id,
                    "Register of VM {vm}: already known with these options"
                );
            }
            Admission::New(cfg) if cfg.lifecycle == Lifecycle::Migration => {
                let rt = Arc::new(VmRuntime::new(cfg.clone()));
                self.endpoint
                    .export(&rt, None)
                    .await
                    .map_err(ManagerError::Endpoint)?;
                let inserted = lock(&self.registry).insert_runtime(rt.clone());
                if let Err(e) = inserted {
                    self.endpoint.unserve(vm).await;
                    return Err(e.into());
                }
                tracing::info!(
                    VMID = %vm,
                    VMSTATE_ID = %cfg.id,
                    MARK = cfg.mark,
                    BUS = %cfg.bus_key(),
                    "Register of VM {vm}: Id {} mark {:#x}/{:#x} on bus {}, served only from \
                     Prepare to Finish or Abort of a migration",
                    cfg.id, cfg.mark, cfg.mark_mask, cfg.bus_key()
                );
                self.count_changed();
            }
            Admission::Existing(rt) => {
                // The VM's next QEMU (restarted, or the one of this
                // migration) takes over the binding.
                if let Some(pid) = qemu_pid {
                    if rt.bind_qemu(pid) != Some(pid) {
                        tracing::info!(
                            VMID = %vm,
                            "VM {vm}: Save and Load now only for QEMU pid {pid}"
                        );
                    }
                }
                // A restored VM whose bus was unreachable at start is retried.
                if !self.endpoint.is_serving(vm) {
                    self.serve(&rt).await?;
                }
                if !rt.watching() {
                    self.engine.start_watch(&rt).await;
                }
                drop(ops);
                // Also here: a registration restored at start may still be
                // warming when the orchestrator registers it before a
                // migration.
                let warmed = self.engine.wait_warm(&rt).await;
                tracing::info!(
                    VMID = %vm,
                    VMSTATE_ID = %rt.config.id,
                    "Register of VM {vm}: already registered with these options{}",
                    warmed.map(|w| format!("; {}", w.describe())).unwrap_or_default()
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
                self.engine.start_watch(&rt).await;
                self.count_changed();
                // Register returns once a Save would come from the warm
                // cache: orchestrators migrate right after it. Waited for
                // without the lock, so other VMs' calls go on meanwhile
                // (an Unregister meanwhile ends the wait at once).
                drop(ops);
                let warmed = self.engine.wait_warm(&rt).await;
                let text = format!(
                    "Register of VM {vm}: Id {} mark {:#x}/{:#x} on bus {}",
                    cfg.id,
                    cfg.mark,
                    cfg.mark_mask,
                    cfg.bus_key()
                );
                match warmed {
                    Some(w) => log_warmed_line(&rt, &text, &w),
                    None => tracing::info!(
                        VMID = %vm,
                        VMSTATE_ID = %cfg.id,
                        MARK = cfg.mark,
                        BUS = %cfg.bus_key(),
                        "{text}"
                    ),
                }
            }
        }
        Ok(())
    }

    /// Unregisters `vm`: flush (if asked) → remove (persisted) → forget the
    /// saved ids → unserve → stop watching. A running restore is not
    /// stopped: its entries are the VM's on this host from the moment QEMU
    /// had Load's answer (Proxmox VE stops the destination's helper right
    /// after the migration), so it goes on to its end and the watch its
    /// creates need is dropped then. A failed flush or write leaves the VM
    /// registered and served.
    pub async fn unregister(
        &self,
        vm: &str,
        options: &[(String, OptValue)],
    ) -> Result<(), ServiceError> {
        let flush = parse_unregister(options)?;
        let _ops = self.ops.lock().await;
        self.check_open()?;
        let rt = self.registered(vm)?;
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
        if self.unwatch_after_restore(&rt).await {
            tracing::info!(
                VMID = %vm,
                "Unregister of VM {vm}: its running restore goes on to the end"
            );
        }
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

    /// Stops watching the VM, once its restore (if one runs) has ended: a
    /// confined helper creates entries only for watched selectors. Returns
    /// whether a restore was running.
    async fn unwatch_after_restore(&self, rt: &Arc<VmRuntime>) -> bool {
        if !rt.restore_running() {
            self.engine.watch(rt, false).await;
            return false;
        }
        let engine = self.engine.clone();
        let rt = rt.clone();
        tokio::spawn(async move {
            engine.wait_restore(&rt).await;
            engine.watch(&rt, false).await;
        });
        true
    }

    /// Serves the VM for one migration: connects it to its bus (queued on
    /// org.qemu.VMState1), binds it to its QEMU, warms its cache; on the
    /// destination it also notes which of the VM's entries exist already,
    /// so an Abort deletes only what the Load adds. Idempotent.
    pub async fn prepare(
        &self,
        vm: &str,
        options: &[(String, OptValue)],
    ) -> Result<(), ManagerError<E::Error>> {
        let step = parse_migration_step("Prepare", options)?;
        let ops = self.ops.lock().await;
        self.check_open()?;
        let rt = self.registered(vm)?;
        if let Some(pid) = step.qemu_pid {
            rt.bind_for_role(step.role, pid);
        }
        if !self.endpoint.is_serving(vm) {
            self.serve(&rt).await?;
        }
        if !rt.watching() {
            self.engine.start_watch(&rt).await;
        }
        // Returns once a Save would come from the warm cache, as Register
        // does, and without the lock: ten VMs prepared at once warm at once.
        // The destination waits too: its first sync walks the host's table,
        // which must not compete with the Load and the guest's resume.
        drop(ops);
        let warmed = self.engine.wait_warm(&rt).await;
        // Now answered from the cache; no Load comes before Prepare returned
        // (QEMU is given the Id after it).
        // A source prepared on the host where this VM's destination already
        // is (a migration between two QEMUs of one host) keeps what the
        // destination noted: an Abort there must still know which entries
        // were here before the Load.
        let before = match step.role {
            Role::Source => rt.before_load(),
            Role::Destination => Some(self.engine.ids_now(&rt).await?),
        };
        let existing = before.as_ref().map_or(0, |b| b.len());
        rt.set_prepared(Some(step.role), before);
        let text = format!(
            "Prepare of VM {vm} as migration {}: served on bus {}{}{}",
            step.role.as_str(),
            rt.config.bus_key(),
            rt.qemu_pid()
                .map(|p| format!(", for QEMU pid {p}"))
                .unwrap_or_default(),
            if step.role == Role::Destination {
                format!(", {existing} of its entries here already")
            } else {
                String::new()
            }
        );
        match warmed {
            Some(w) => log_warmed_line(&rt, &text, &w),
            None => tracing::info!(
                VMID = %vm,
                VMSTATE_ID = %rt.config.id,
                ROLE = step.role.as_str(),
                "{text}"
            ),
        }
        Ok(())
    }

    /// Ends a migration that succeeded. Source: deletes exactly the entries
    /// the Save took. Destination: keeps the entries (a running restore goes
    /// on). Both: a VM of the migration lifecycle is known again, with no
    /// connection and no watch. A failed flush leaves it prepared.
    pub async fn finish(
        &self,
        vm: &str,
        options: &[(String, OptValue)],
    ) -> Result<(), ManagerError<E::Error>> {
        let step = parse_migration_step("Finish", options)?;
        let _ops = self.ops.lock().await;
        self.check_open()?;
        let rt = self.registered(vm)?;
        // A restart since Prepare forgets the preparation, not what the Save
        // took (its ids are kept in the state directory): the source still
        // owes that flush.
        let prepared = rt.prepared().is_some();
        let owes_flush = step.role == Role::Source && rt.saved_len() > 0;
        if !prepared && !owes_flush {
            tracing::info!(VMID = %vm, "Finish of VM {vm}: not prepared, nothing to do");
            return Ok(());
        }
        let flushed = match step.role {
            Role::Source => Some(self.engine.flush(&rt).await?),
            Role::Destination => None,
        };
        let restoring = prepared && self.release(&rt, true).await;
        let (deleted, missing) = flushed.map_or((0, 0), |r| (r.deleted, r.missing));
        tracing::info!(
            VMID = %vm,
            VMSTATE_ID = %rt.config.id,
            ROLE = step.role.as_str(),
            DELETED = deleted,
            MISSING = missing,
            "Finish of VM {vm} as migration {}{}{}",
            step.role.as_str(),
            match step.role {
                Role::Source =>
                    format!(": flushed {deleted} saved entries ({missing} already gone)"),
                Role::Destination => ": entries kept".into(),
            },
            if restoring { "; its running restore goes on to the end" } else { "" }
        );
        Ok(())
    }

    /// Ends a migration that failed or was cancelled. Source: keeps every
    /// entry (the VM runs on here). Destination: unless the VM runs there
    /// (`vm_running`), stops a running restore and deletes exactly what the
    /// Load created since Prepare. Both: known again, as after Finish.
    pub async fn abort(
        &self,
        vm: &str,
        options: &[(String, OptValue)],
    ) -> Result<(), ManagerError<E::Error>> {
        let step = parse_migration_step("Abort", options)?;
        let _ops = self.ops.lock().await;
        self.check_open()?;
        let rt = self.registered(vm)?;
        if rt.prepared().is_none() {
            // As a Finish of the source still flushes after a restart, an
            // Abort of it still forgets: the VM runs on here.
            if step.role == Role::Source && rt.saved_len() > 0 {
                self.engine.forget_saved(&rt).await;
                tracing::info!(
                    VMID = %vm,
                    "Abort of VM {vm} as migration source: not prepared; what its last Save \
                     took is no longer owed a flush, entries kept"
                );
            } else {
                tracing::info!(VMID = %vm, "Abort of VM {vm}: not prepared, nothing to do");
            }
            return Ok(());
        }
        let mut what = String::from(": entries kept");
        if step.role == Role::Source {
            self.engine.forget_saved(&rt).await;
        } else if step.vm_running {
            what = ": the VM runs here, entries kept".into();
        } else if let Some(before) = rt.before_load() {
            self.engine
                .cancel_restore(&rt, "the migration was aborted")
                .await;
            let created: Vec<u32> = self
                .engine
                .ids_now(&rt)
                .await?
                .into_iter()
                .filter(|id| !before.contains(id))
                .collect();
            let r = self.engine.delete_ids(&rt, created).await?;
            what = format!(
                ": deleted the {} entries its Load created ({} already gone)",
                r.deleted, r.missing
            );
        } else {
            // Without what a Prepare as destination noted, "what the Load
            // created" is unknown: every entry of the VM here would look new.
            what = ": not prepared as the destination here, entries kept".into();
        }
        self.release(&rt, false).await;
        tracing::info!(
            VMID = %vm,
            VMSTATE_ID = %rt.config.id,
            ROLE = step.role.as_str(),
            "Abort of VM {vm} as migration {}{what}",
            step.role.as_str()
        );
        Ok(())
    }

    /// After Finish or Abort: a VM of the migration lifecycle is listed
    /// without a connection or watch again; an always-served VM stays as it
    /// is. Returns whether a restore still runs.
    async fn release(&self, rt: &Arc<VmRuntime>, succeeded: bool) -> bool {
        rt.set_prepared(None, None);
        rt.end_migration(succeeded);
        if rt.config.lifecycle != Lifecycle::Migration {
            return rt.restore_running();
        }
        self.endpoint.unserve(&rt.config.vm).await;
        let _ = self.endpoint.export(rt, None).await;
        self.unwatch_after_restore(rt).await
    }

    fn registered(&self, vm: &str) -> Result<Arc<VmRuntime>, ServiceError> {
        lock(&self.registry)
            .get(vm)
            .ok_or_else(|| ServiceError::NotRegistered { vm: vm.into() })
    }

    /// If no VM is registered, decides to exit: later calls are refused and
    /// the endpoint withdraws (so the next call reaches a new instance
    /// instead of this exiting one). Serialized with Register so none slips
    /// in between. Returns whether it decided so.
    pub async fn close_if_idle(&self) -> bool {
        let _ops = self.ops.lock().await;
        // A restore that outlived its VM's Unregister keeps the process.
        if !lock(&self.registry).is_empty() || !self.engine.restoring().is_empty() {
            return false;
        }
        self.closing.store(true, Ordering::SeqCst);
        self.endpoint.withdraw().await;
        true
    }

    /// Stops serving every VM (their registrations stay persisted, for the
    /// next instance), lets running restores finish for up to `grace` and
    /// hands the rest over to the next start, and withdraws. Returns how
    /// many restores were handed over.
    pub async fn shutdown(&self, grace: std::time::Duration) -> usize {
        let _ops = self.ops.lock().await;
        self.closing.store(true, Ordering::SeqCst);
        let all = lock(&self.registry).all();
        for rt in &all {
            self.endpoint.unserve(&rt.config.vm).await;
        }
        let handed = self.engine.finish_restores(grace).await;
        self.endpoint.withdraw().await;
        handed
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

/// The journal line of a VM whose cache Register (or a restore at start)
/// waited for: `what` of VM, then how warm it got.
fn log_warmed(rt: &VmRuntime, what: &str, w: &Warmed) {
    let text = format!("VM {} ({what})", rt.config.vm);
    log_warmed_line(rt, &text, w);
}

fn log_warmed_line(rt: &VmRuntime, text: &str, w: &Warmed) {
    let c = &rt.config;
    let ms = w.took.as_millis() as u64;
    let (cached, silent) = (w.warmth.entries, w.warmth.silent);
    if w.fine() {
        tracing::info!(
            VMID = %c.vm,
            VMSTATE_ID = %c.id,
            MARK = c.mark,
            BUS = %c.bus_key(),
            WARM_MS = ms,
            CACHED = cached,
            SILENT = silent,
            "{text}; {}",
            w.describe()
        );
    } else {
        tracing::warn!(
            VMID = %c.vm,
            VMSTATE_ID = %c.id,
            MARK = c.mark,
            BUS = %c.bus_key(),
            WARM_MS = ms,
            CACHED = cached,
            SILENT = silent,
            "{text}; {}",
            w.describe()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::service::fakes::population;
    use crate::service::fakes::{Events, FakeAccess, FakeEndpoint};
    use crate::service::Store;

    struct Setup {
        events: Events,
        access: Arc<FakeAccess>,
        manager: Manager<FakeEndpoint>,
        dir: tempfile::TempDir,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        setup_in(dir)
    }

    /// A manager over `dir` as state directory, as the daemon composes it.
    fn setup_in(dir: tempfile::TempDir) -> Setup {
        let events = Events::default();
        let access = FakeAccess::new(events.clone());
        setup_over(dir, access, Duration::from_secs(5))
    }

    /// As [`setup_in`] over an existing table, with a Load budget.
    fn setup_over(dir: tempfile::TempDir, access: Arc<FakeAccess>, budget: Duration) -> Setup {
        let events = access.events.clone();
        let engine = Arc::new(
            Engine::new(access.clone(), Duration::from_secs(2), budget)
                .with_store(Store::new(dir.path())),
        );
        let manager = Manager::new(
            Registry::new(Store::new(dir.path())),
            engine,
            FakeEndpoint::new(events.clone()),
        );
        Setup {
            events,
            access,
            manager,
            dir,
        }
    }

    impl Setup {
        fn persisted(&self) -> Vec<String> {
            Store::new(self.dir.path())
                .load()
                .unwrap()
                .into_iter()
                .map(|c| c.vm)
                .collect()
        }

        fn unreachable(&self, vm: &str, yes: bool) {
            let mut u = self.manager.endpoint().unreachable.lock().unwrap();
            if yes {
                u.insert(vm.to_string());
            } else {
                u.remove(vm);
            }
        }
    }

    fn opts(o: &[(&str, OptValue)]) -> Vec<(String, OptValue)> {
        o.iter().map(|(n, v)| (n.to_string(), v.clone())).collect()
    }

    fn flush(on: bool) -> Vec<(String, OptValue)> {
        opts(&[("flush", OptValue::Bool(on))])
    }

    fn text<T: std::fmt::Debug, E: std::fmt::Display>(r: Result<T, E>) -> String {
        r.expect_err("must fail").to_string()
    }

    #[tokio::test]
    async fn register_serves_then_persists_then_watches() {
        let s = setup();
        s.manager.register("100", &[]).await.unwrap();
        assert_eq!(
            s.events.take(),
            ["connect 100", "export 100 linked", "watch 0x64 on"]
        );
        assert_eq!(s.persisted(), ["100"]);
        assert!(s.manager.get("100").unwrap().watching());
        assert_eq!(*s.manager.vm_count().borrow(), 1);
    }

    #[tokio::test]
    async fn register_whose_bus_is_unreachable_leaves_nothing_behind() {
        let s = setup();
        s.unreachable("100", true);
        let e = s.manager.register("100", &[]).await.unwrap_err();
        assert!(matches!(e, ManagerError::Endpoint(_)));
        assert_eq!(e.to_string(), "bus of VM '100' unreachable");
        assert_eq!(s.events.take(), ["connect 100"]);
        assert!(s.manager.get("100").is_none());
        assert!(s.persisted().is_empty());
        assert_eq!(*s.manager.vm_count().borrow(), 0);
    }

    #[tokio::test]
    async fn register_whose_export_fails_leaves_nothing_behind() {
        let s = setup();
        let ep = s.manager.endpoint();
        ep.export_fails.lock().unwrap().insert("100".into());
        let e = text(s.manager.register("100", &[]).await);
        assert_eq!(e, "cannot export VM '100'");
        assert_eq!(s.events.take(), ["connect 100", "export 100 linked"]);
        assert!(s.manager.get("100").is_none());
        assert!(s.persisted().is_empty());
    }

    #[tokio::test]
    async fn register_that_cannot_be_persisted_is_unserved_again() {
        let s = setup();
        // The state directory becomes a file: every write fails.
        let state = s.dir.path().to_path_buf();
        std::fs::remove_dir_all(&state).unwrap();
        std::fs::write(&state, b"not a directory").unwrap();
        let e = s.manager.register("100", &[]).await.unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "cannot write registrations to {}: ",
                state.join("registrations.json").display()
            )),
            "{e}"
        );
        assert_eq!(
            s.events.take(),
            ["connect 100", "export 100 linked", "unserve 100"]
        );
        assert!(s.manager.get("100").is_none());
        std::fs::remove_file(&state).unwrap();
    }

    #[tokio::test]
    async fn identical_register_is_idempotent_and_different_ones_are_named() {
        let s = setup();
        s.manager.register("100", &[]).await.unwrap();
        s.events.take();
        s.manager.register("100", &[]).await.unwrap();
        // Served and watched already: nothing to do.
        assert!(s.events.take().is_empty());
        assert_eq!(*s.manager.vm_count().borrow(), 1);

        let e = text(
            s.manager
                .register("100", &opts(&[("mark", OptValue::U32(5))]))
                .await,
        );
        assert_eq!(
            e,
            "VM '100' is already registered with mark 100, not 5; unregister it first to change mark"
        );
        let e = text(
            s.manager
                .register(
                    "101",
                    &opts(&[("id", OptValue::Str("conntrack-vmstate-100".into()))]),
                )
                .await,
        );
        assert_eq!(
            e,
            "VMState Id 'conntrack-vmstate-100' is already used by VM '100' on bus system"
        );
        let e = text(
            s.manager
                .register("100", &opts(&[("colour", OptValue::Bool(true))]))
                .await,
        );
        assert_eq!(
            e,
            "unknown option 'colour' (known: id, mark, mark_mask, zone, bus_address, format, zone_map, \
             helpers, max_entries, qemu_pid, lifecycle)"
        );
        let e = text(s.manager.register("vm-a", &[]).await);
        assert_eq!(
            e,
            "invalid option 'mark': is required because VM 'vm-a' is not a number"
        );
        assert!(s.events.take().is_empty(), "refused requests touch nothing");
        assert_eq!(s.persisted(), ["100"]);
    }

    #[tokio::test]
    async fn identical_register_reconnects_a_vm_that_is_not_served() {
        let s = setup();
        s.manager.register("100", &[]).await.unwrap();
        // Its bus dropped the link.
        s.manager
            .endpoint()
            .exported
            .lock()
            .unwrap()
            .insert("100".into(), false);
        s.events.take();
        s.manager.register("100", &[]).await.unwrap();
        assert_eq!(s.events.take(), ["connect 100", "export 100 linked"]);
        // And while the bus is still unreachable, the retry says so.
        s.manager
            .endpoint()
            .exported
            .lock()
            .unwrap()
            .insert("100".into(), false);
        s.unreachable("100", true);
        let e = text(s.manager.register("100", &[]).await);
        assert_eq!(e, "bus of VM '100' unreachable");
        assert!(s.manager.get("100").is_some(), "stays registered");
    }

    #[tokio::test]
    async fn unregister_flushes_removes_forgets_unserves_then_unwatches() {
        let s = setup();
        s.access.insert(&population(20, 1, 100));
        s.access.insert(&population(5, 2, 7));
        s.manager.register("100", &[]).await.unwrap();
        let rt = s.manager.get("100").unwrap();
        s.manager.engine().save(&rt).await;
        assert_eq!(rt.saved_len(), 20);
        s.events.take();
        s.manager.unregister("100", &flush(true)).await.unwrap();
        assert_eq!(
            s.events.take(),
            ["delete 20", "unserve 100", "watch 0x64 off"]
        );
        assert_eq!(s.access.len(), 5);
        assert!(s.manager.get("100").is_none());
        assert!(s.persisted().is_empty());
        assert!(!rt.watching());
        assert_eq!(*s.manager.vm_count().borrow(), 0);
        let ids = Store::new(s.dir.path()).load_ids("100").unwrap();
        assert!(ids.is_empty(), "saved ids forgotten");
    }

    #[tokio::test]
    async fn unregister_without_flush_leaves_the_entries() {
        let s = setup();
        s.access.insert(&population(20, 1, 100));
        s.manager.register("100", &[]).await.unwrap();
        let rt = s.manager.get("100").unwrap();
        s.manager.engine().save(&rt).await;
        s.events.take();
        s.manager.unregister("100", &[]).await.unwrap();
        assert_eq!(s.events.take(), ["unserve 100", "watch 0x64 off"]);
        assert_eq!(s.access.len(), 20);
        assert_eq!(rt.saved_len(), 0);
    }

    #[tokio::test]
    async fn a_failed_flush_leaves_the_vm_registered_and_served() {
        let s = setup();
        s.access.insert(&population(20, 1, 100));
        s.manager.register("100", &[]).await.unwrap();
        let rt = s.manager.get("100").unwrap();
        s.manager.engine().save(&rt).await;
        s.access
            .fail_delete
            .store(true, std::sync::atomic::Ordering::SeqCst);
        s.events.take();
        let e = s.manager.unregister("100", &flush(true)).await.unwrap_err();
        assert!(matches!(e, ServiceError::Flush { .. }));
        assert_eq!(
            e.to_string(),
            "flushing the saved entries of VM '100' failed: \
             conntrack helper unavailable: injected delete failure"
        );
        assert_eq!(s.events.take(), ["delete 20"]);
        assert!(s.manager.get("100").is_some());
        assert!(s.manager.endpoint().is_serving("100"));
        assert!(rt.watching());
        assert_eq!(s.persisted(), ["100"]);
        assert_eq!(rt.saved_len(), 20, "a retry still deletes them");
        assert_eq!(s.access.len(), 20);
    }

    #[tokio::test]
    async fn unregister_that_cannot_be_persisted_changes_nothing() {
        let s = setup();
        s.manager.register("100", &[]).await.unwrap();
        s.events.take();
        let state = s.dir.path().to_path_buf();
        std::fs::remove_dir_all(&state).unwrap();
        std::fs::write(&state, b"not a directory").unwrap();
        let e = s.manager.unregister("100", &[]).await.unwrap_err();
        assert!(matches!(e, ServiceError::Persist { .. }), "{e}");
        assert!(s.events.take().is_empty(), "nothing unserved or unwatched");
        assert!(s.manager.get("100").unwrap().watching());
        assert!(s.manager.endpoint().is_serving("100"));
        std::fs::remove_file(&state).unwrap();
    }

    #[tokio::test]
    async fn unregister_errors_are_named() {
        let s = setup();
        let e = s.manager.unregister("999", &[]).await.unwrap_err();
        assert!(matches!(e, ServiceError::NotRegistered { .. }));
        assert_eq!(e.to_string(), "VM '999' is not registered");
        let e = text(
            s.manager
                .unregister("100", &opts(&[("flush", OptValue::U32(1))]))
                .await,
        );
        assert_eq!(e, "invalid option 'flush': must be of type 'b', got 'u'");
        let e = text(
            s.manager
                .unregister("100", &opts(&[("force", OptValue::Bool(true))]))
                .await,
        );
        assert_eq!(e, "unknown option 'force' (known: flush)");
        assert!(s.events.take().is_empty());
    }

    #[tokio::test]
    async fn once_closing_register_and_unregister_are_refused() {
        let s = setup();
        s.manager.register("100", &[]).await.unwrap();
        assert!(!s.manager.close_if_idle().await, "a VM is registered");
        s.manager.unregister("100", &[]).await.unwrap();
        s.events.take();
        assert!(s.manager.close_if_idle().await);
        assert_eq!(s.events.take(), ["withdraw"]);
        let refused = "conntrack-vmstated is exiting; call again to reach a new instance";
        let e = s.manager.register("100", &[]).await.unwrap_err();
        assert!(matches!(
            e,
            ManagerError::Service(ServiceError::ShuttingDown)
        ));
        assert_eq!(e.to_string(), refused);
        assert_eq!(text(s.manager.unregister("100", &[]).await), refused);
        assert!(s.events.take().is_empty());
        assert!(s.persisted().is_empty());
    }

    #[tokio::test]
    async fn shutdown_unserves_everything_but_keeps_it_persisted() {
        let s = setup();
        s.manager.register("100", &[]).await.unwrap();
        s.manager.register("101", &[]).await.unwrap();
        s.events.take();
        s.manager.shutdown(Duration::from_secs(5)).await;
        assert_eq!(s.events.take(), ["unserve 100", "unserve 101", "withdraw"]);
        assert_eq!(s.persisted(), ["100", "101"]);
        assert_eq!(
            text(s.manager.register("102", &[]).await),
            "conntrack-vmstated is exiting; call again to reach a new instance"
        );
    }

    #[tokio::test]
    async fn restore_serves_persisted_vms_again_and_reports_unreachable_ones() {
        let s = setup();
        s.access.insert(&population(20, 1, 100));
        s.manager.register("100", &[]).await.unwrap();
        s.manager.register("101", &[]).await.unwrap();
        let rt = s.manager.get("100").unwrap();
        s.manager.engine().save(&rt).await;
        let saved = rt.saved();
        // The saved ids are written a little after the Save.
        let store = Store::new(s.dir.path());
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while store.load_ids("100").unwrap() != saved {
            assert!(std::time::Instant::now() < end, "ids never written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.manager.shutdown(Duration::from_secs(5)).await;

        // A new instance over the same state directory.
        let s = setup_in(s.dir);
        s.unreachable("101", true);
        let restored = s.manager.restore().await;
        assert_eq!(restored.vms, ["100", "101"]);
        assert!(restored.error.is_none());
        let unserved: Vec<(String, String)> = restored
            .unserved
            .iter()
            .map(|(vm, e)| (vm.clone(), e.to_string()))
            .collect();
        assert_eq!(
            unserved,
            [("101".to_string(), "bus of VM '101' unreachable".to_string())]
        );
        assert_eq!(
            s.events.take(),
            [
                "connect 100",
                "export 100 linked",
                "watch 0x64 on",
                "connect 101",
                "export 101 unlinked",
                "watch 0x65 on"
            ]
        );
        assert_eq!(*s.manager.vm_count().borrow(), 2);
        // A flush after the restart still deletes exactly the saved entries.
        assert_eq!(s.manager.get("100").unwrap().saved(), saved);
        // The unreachable one is listed and retried by an identical Register.
        s.unreachable("101", false);
        s.manager.register("101", &[]).await.unwrap();
        assert_eq!(s.events.take(), ["connect 101", "export 101 linked"]);
        s.manager.unregister("100", &flush(true)).await.unwrap();
        assert_eq!(s.access.len(), 0);
    }

    /// Register returns only after the warm cache said warm, after the
    /// watch; an identical Register waits too (cheap once warm).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn register_returns_after_the_cache_is_warm() {
        let s = setup();
        *s.access.warm_after.lock().unwrap() = Some(Duration::from_millis(300));
        let t = std::time::Instant::now();
        s.manager.register("100", &[]).await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(
            s.events.take(),
            [
                "connect 100",
                "export 100 linked",
                "watch 0x64 on",
                "wait-warm 0x64"
            ]
        );
        s.manager.register("100", &[]).await.unwrap();
        assert_eq!(s.events.take(), ["wait-warm 0x64"]);
    }

    /// One VM's wait does not hold up another's Register or Unregister:
    /// the manager's lock is not held while waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_one_vm_does_not_hold_up_the_others() {
        let s = Arc::new(setup());
        s.manager.register("101", &[]).await.unwrap();
        *s.access.warm_after.lock().unwrap() = Some(Duration::from_secs(3));
        let s2 = s.clone();
        let slow = tokio::spawn(async move { s2.manager.register("100", &[]).await });
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !s.events.take().contains(&"wait-warm 0x64".to_string()) {
            assert!(std::time::Instant::now() < end, "never waited");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = std::time::Instant::now();
        s.manager.unregister("101", &[]).await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        slow.await.unwrap().unwrap();
    }

    /// Registrations restored at start are not waited for (the daemon is
    /// ready at once); the wait runs in the background.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restore_at_start_does_not_wait_for_the_warm_cache() {
        let s = setup();
        s.manager.register("100", &[]).await.unwrap();
        s.manager.shutdown(Duration::from_secs(5)).await;
        let s = setup_in(s.dir);
        *s.access.warm_after.lock().unwrap() = Some(Duration::from_secs(5));
        let t = std::time::Instant::now();
        let restored = s.manager.restore().await;
        assert_eq!(restored.vms, ["100"]);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn restore_from_a_corrupt_state_file_starts_empty_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("registrations.json");
        std::fs::write(&file, b"{not json").unwrap();
        let s = setup_in(dir);
        let restored = s.manager.restore().await;
        assert!(restored.vms.is_empty());
        let e = restored.error.expect("reported").to_string();
        assert!(
            e.starts_with(&format!(
                "registrations in {} could not be read (moved to {}.corrupt): ",
                file.display(),
                file.display()
            )),
            "{e}"
        );
        assert!(s.events.take().is_empty());
        assert_eq!(*s.manager.vm_count().borrow(), 0);
        s.manager.register("100", &[]).await.unwrap();
        assert_eq!(s.persisted(), ["100"]);
    }

    fn state_blob(n: usize, seed: u64, mark: u32) -> Vec<u8> {
        let enc = crate::format::encode(
            &population(n, seed, mark),
            &crate::format::EncodeOptions {
                limit: crate::format::QEMU_LIMIT,
                format: crate::format::Format::Binary,
            },
        )
        .unwrap();
        assert_eq!(enc.dropped, 0);
        enc.bytes
    }

    /// A destination whose Load answered after 128 entries and whose
    /// background batches (2048 entries) take 30 ms each.
    async fn restoring(dir: tempfile::TempDir, n: usize) -> (Setup, Arc<VmRuntime>) {
        let access = FakeAccess::new(Events::default());
        *access.background_delay.lock().unwrap() = Duration::from_millis(30);
        let s = setup_over(dir, access, Duration::ZERO);
        s.manager.register("100", &[]).await.unwrap();
        let rt = s.manager.get("100").unwrap();
        s.manager.engine().load(&rt, state_blob(n, 3, 100)).await;
        assert!(rt.restore_running(), "{:?}", rt.last_load());
        s.events.take();
        (s, rt)
    }

    async fn until_restored(rt: &VmRuntime) -> crate::service::OpReport {
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while rt.restore_running() || rt.last_load().is_some_and(|r| r.pending) {
            assert!(std::time::Instant::now() < end, "{:?}", rt.last_load());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        rt.last_load().unwrap()
    }

    #[tokio::test]
    async fn unregister_lets_the_restore_finish_and_unwatches_after_it() {
        let (s, rt) = restoring(tempfile::tempdir().unwrap(), 20_000).await;
        s.manager.unregister("100", &[]).await.unwrap();
        assert!(s.manager.get("100").is_none());
        // The restore's own calls go on meanwhile.
        let ev: Vec<String> = s
            .events
            .take()
            .into_iter()
            .filter(|e| !e.starts_with("background") && !e.starts_with("create"))
            .collect();
        assert_eq!(
            ev.first().map(String::as_str),
            Some("unserve 100"),
            "{ev:?}"
        );
        assert!(!ev.contains(&"watch 0x64 off".to_string()), "{ev:?}");
        assert!(rt.restore_running(), "Unregister must not stop the restore");
        let r = until_restored(&rt).await;
        assert_eq!((r.created, r.error.as_str()), (20_000, ""), "{r:?}");
        assert_eq!(s.access.len(), 20_000);
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while !s.events.take().contains(&"watch 0x64 off".to_string()) {
            assert!(std::time::Instant::now() < end, "never unwatched");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!rt.watching());
        // Done: the next start has nothing to resume.
        assert!(Store::new(s.dir.path()).load_pending().is_empty());
    }

    #[tokio::test]
    async fn idle_exit_waits_for_a_restore_that_outlived_its_vm() {
        let (s, rt) = restoring(tempfile::tempdir().unwrap(), 20_000).await;
        s.manager.unregister("100", &[]).await.unwrap();
        assert!(!s.manager.close_if_idle().await, "a restore runs");
        until_restored(&rt).await;
        assert!(s.manager.close_if_idle().await);
        assert_eq!(s.access.len(), 20_000);
    }

    #[tokio::test]
    async fn shutdown_finishes_a_running_restore_within_its_grace() {
        let (s, rt) = restoring(tempfile::tempdir().unwrap(), 20_000).await;
        assert_eq!(s.manager.shutdown(Duration::from_secs(30)).await, 0);
        assert!(!rt.restore_running());
        let r = rt.last_load().unwrap();
        assert_eq!((r.created, r.error.as_str()), (20_000, ""), "{r:?}");
        assert!(Store::new(s.dir.path()).load_pending().is_empty());
    }

    #[tokio::test]
    async fn shutdown_past_its_grace_hands_over_and_the_next_start_completes() {
        let (s, rt) = restoring(tempfile::tempdir().unwrap(), 20_000).await;
        assert_eq!(s.manager.shutdown(Duration::ZERO).await, 1);
        let r = rt.last_load().unwrap();
        let made = s.access.len();
        assert!((128..20_000).contains(&made), "{made}");
        assert_eq!(
            r.error,
            format!(
                "restore stopped after {made} of 20000 entries: conntrack-vmstated is \
                 stopping; the rest is handed over to its next start"
            )
        );
        let kept: Vec<_> = Store::new(s.dir.path()).load_pending();
        assert_eq!(kept.len(), 1);
        let p = kept[0].as_ref().unwrap();
        assert_eq!((p.config.vm.as_str(), p.consumed), ("100", made as u64));

        // The next instance, same state directory and table.
        let Setup { access, dir, .. } = s;
        *access.background_delay.lock().unwrap() = Duration::ZERO;
        let next = setup_over(dir, access, Duration::ZERO);
        let out = next.manager.restore().await;
        assert_eq!(
            (out.vms.as_slice(), out.resumed),
            (&["100".to_string()][..], 1)
        );
        let rt = next.manager.get("100").unwrap();
        let r = until_restored(&rt).await;
        assert_eq!(
            (r.resumed, r.created, r.existed, r.error.as_str()),
            (made as u64, 20_000 - made as u64, 0, ""),
            "{r:?}"
        );
        assert_eq!(next.access.len(), 20_000);
        assert!(Store::new(next.dir.path()).load_pending().is_empty());
    }

    #[tokio::test]
    async fn a_restore_handed_over_for_an_unregistered_vm_completes_on_its_own() {
        let (s, _rt) = restoring(tempfile::tempdir().unwrap(), 20_000).await;
        s.manager.unregister("100", &[]).await.unwrap();
        assert_eq!(s.manager.shutdown(Duration::ZERO).await, 1);
        let Setup { access, dir, .. } = s;
        *access.background_delay.lock().unwrap() = Duration::ZERO;
        // The first instance's deferred unwatch, once its restore stopped.
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while !access.events.take().contains(&"watch 0x64 off".to_string()) {
            assert!(std::time::Instant::now() < end, "never unwatched");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let next = setup_over(dir, access, Duration::ZERO);
        let out = next.manager.restore().await;
        assert_eq!((out.vms.len(), out.resumed), (0, 1));
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while next.access.len() < 20_000 || !next.manager.engine().restoring().is_empty() {
            assert!(std::time::Instant::now() < end, "{}", next.access.len());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(next.access.len(), 20_000);
        // Its watch (the helper creates only for watched selectors) is
        // taken for the restore and dropped after it.
        let end = std::time::Instant::now() + Duration::from_secs(5);
        let mut ev = Vec::new();
        while !ev.contains(&"watch 0x64 off".to_string()) {
            assert!(std::time::Instant::now() < end, "{ev:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
            ev.extend(next.events.take());
        }
        assert_eq!(
            ev.first().map(String::as_str),
            Some("watch 0x64 on"),
            "{ev:?}"
        );
        assert!(next.manager.close_if_idle().await);
    }

    fn role(r: &str) -> Vec<(String, OptValue)> {
        opts(&[("role", OptValue::Str(r.into()))])
    }

    fn migration() -> Vec<(String, OptValue)> {
        opts(&[("lifecycle", OptValue::Str("migration".into()))])
    }

    #[tokio::test]
    async fn a_migration_vm_is_known_without_connection_or_watch_until_prepared() {
        let s = setup();
        s.manager.register("100", &migration()).await.unwrap();
        assert_eq!(s.events.take(), ["export 100 unlinked"]);
        assert_eq!(s.persisted(), ["100"]);
        // Registering again changes nothing; another lifecycle is a conflict.
        s.manager.register("100", &migration()).await.unwrap();
        assert!(s.events.take().is_empty());
        assert_eq!(
            text(s.manager.register("100", &[]).await),
            "VM '100' is already registered with lifecycle migration, not always; unregister \
             it first to change lifecycle"
        );
        // Its mark is reserved all the same.
        assert!(text(
            s.manager
                .register("other", &opts(&[("mark", OptValue::U32(100))]))
                .await
        )
        .starts_with("mark 0x64/0xffffffff of VM 'other' overlaps VM '100'"));

        s.manager.prepare("100", &role("source")).await.unwrap();
        assert_eq!(
            s.events.take(),
            ["connect 100", "export 100 linked", "watch 0x64 on"]
        );
        let rt = s.manager.get("100").unwrap();
        assert_eq!(rt.prepared(), Some(Role::Source));
        // Prepare again: already served, nothing more.
        s.manager.prepare("100", &role("source")).await.unwrap();
        assert!(s.events.take().is_empty());
        // A restart knows it, but does not serve it.
        s.manager.shutdown(Duration::from_secs(1)).await;
        let Setup { dir, .. } = s;
        let again = setup_in(dir);
        let out = again.manager.restore().await;
        assert_eq!(out.vms, ["100"]);
        assert_eq!(again.events.take(), ["export 100 unlinked"]);
        assert_eq!(again.manager.get("100").unwrap().prepared(), None);
    }

    #[tokio::test]
    async fn finish_on_the_source_flushes_the_save_and_releases_the_vm() {
        let s = setup();
        s.access.insert(&population(30, 1, 100));
        s.access.insert(&population(5, 2, 7));
        s.manager.register("100", &migration()).await.unwrap();
        s.manager.prepare("100", &role("source")).await.unwrap();
        let rt = s.manager.get("100").unwrap();
        s.manager.engine().save(&rt).await;
        s.events.take();
        s.manager.finish("100", &role("source")).await.unwrap();
        assert_eq!(
            s.events.take(),
            [
                "delete 30",
                "unserve 100",
                "export 100 unlinked",
                "watch 0x64 off"
            ]
        );
        assert_eq!(s.access.len(), 5);
        assert_eq!((rt.prepared(), rt.saved_len()), (None, 0));
        assert!(s.manager.get("100").is_some(), "still known");
        // Not prepared any more: a second Finish has nothing to do.
        s.manager.finish("100", &role("source")).await.unwrap();
        assert!(s.events.take().is_empty());
    }

    #[tokio::test]
    async fn abort_on_the_source_keeps_everything() {
        let s = setup();
        s.access.insert(&population(30, 1, 100));
        s.manager.register("100", &migration()).await.unwrap();
        s.manager.prepare("100", &role("source")).await.unwrap();
        let rt = s.manager.get("100").unwrap();
        s.manager.engine().save(&rt).await;
        s.events.take();
        s.manager.abort("100", &role("source")).await.unwrap();
        assert_eq!(
            s.events.take(),
            ["unserve 100", "export 100 unlinked", "watch 0x64 off"]
        );
        assert_eq!((s.access.len(), rt.saved_len()), (30, 0));
    }

    #[tokio::test]
    async fn a_load_on_the_host_of_the_save_leaves_nothing_to_flush() {
        let access = FakeAccess::new(Events::default());
        let s = setup_over(tempfile::tempdir().unwrap(), access, Duration::ZERO);
        s.access.insert(&population(30, 1, 100));
        s.manager.register("100", &migration()).await.unwrap();
        s.manager.prepare("100", &role("source")).await.unwrap();
        let rt = s.manager.get("100").unwrap();
        let blob = s.manager.engine().save(&rt).await;
        assert_eq!(rt.saved_len(), 30);
        // Kept for a flush after a restart, half a second after the Save.
        let store = Store::new(s.dir.path());
        kept_ids_reach(&store, 30).await;
        // Restored here (suspend to disk and back): every entry is there.
        s.manager
            .prepare("100", &role("destination"))
            .await
            .unwrap();
        s.manager.engine().load(&rt, blob).await;
        let load = until_restored(&rt).await;
        assert_eq!((load.created, load.existed), (0, 30));
        assert_eq!(rt.saved_len(), 0);
        s.manager.finish("100", &role("destination")).await.unwrap();
        s.events.take();
        // A Finish of the source coming late has nothing left to flush.
        s.manager.finish("100", &role("source")).await.unwrap();
        assert!(
            !s.events.take().iter().any(|e| e.starts_with("delete")),
            "the restored VM's entries were flushed"
        );
        assert_eq!(s.access.len(), 30);
        // Nor after a restart: the kept ids went with them.
        kept_ids_reach(&store, 0).await;
    }

    /// Waits (bounded) until VM 100's saved ids in the state directory
    /// number `n`: they are written a little after a Save or a Load.
    async fn kept_ids_reach(store: &Store, n: usize) {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = store.load_ids("100").unwrap().len();
            if got == n {
                return;
            }
            assert!(
                std::time::Instant::now() < end,
                "{got} saved ids kept, want {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn role_pid(r: &str, pid: u32) -> Vec<(String, OptValue)> {
        let mut o = role(r);
        o.push(("qemu_pid".into(), OptValue::U32(pid)));
        o
    }

    #[tokio::test]
    async fn both_ends_on_one_host_answer_both_qemus_until_finish_or_abort() {
        let s = setup();
        s.manager.register("100", &migration()).await.unwrap();
        let rt = s.manager.get("100").unwrap();
        for (succeeded, after) in [(true, 2), (false, 1)] {
            s.manager
                .prepare("100", &role_pid("source", 1))
                .await
                .unwrap();
            s.manager
                .prepare("100", &role_pid("destination", 2))
                .await
                .unwrap();
            // The old QEMU's Save and the new one's Load are both answered.
            assert_eq!(rt.allowed_pids(), [2, 1]);
            if succeeded {
                s.manager.finish("100", &role("source")).await.unwrap();
            } else {
                s.manager.abort("100", &role("destination")).await.unwrap();
            }
            // The VM runs in the new QEMU after a Finish, the old one after
            // an Abort.
            assert_eq!(rt.allowed_pids(), [after], "succeeded: {succeeded}");
        }
    }

    #[tokio::test]
    async fn abort_as_destination_deletes_only_with_what_a_destination_prepare_noted() {
        let access = FakeAccess::new(Events::default());
        let s = setup_over(tempfile::tempdir().unwrap(), access, Duration::ZERO);
        s.access.insert(&population(20, 9, 100));
        s.manager.register("100", &migration()).await.unwrap();
        // The wrong host: prepared as the source, aborted as the destination.
        s.manager.prepare("100", &role("source")).await.unwrap();
        s.events.take();
        s.manager.abort("100", &role("destination")).await.unwrap();
        assert!(
            !s.events.take().iter().any(|e| e.starts_with("delete")),
            "the VM's entries here were taken for its Load's"
        );
        assert_eq!(s.access.len(), 20);
        // Both ends here, the destination prepared first: what it noted
        // survives the source's Prepare, and its Abort deletes the Load's only.
        s.manager
            .prepare("100", &role("destination"))
            .await
            .unwrap();
        s.manager.prepare("100", &role("source")).await.unwrap();
        let rt = s.manager.get("100").unwrap();
        s.manager.engine().load(&rt, state_blob(300, 4, 100)).await;
        until_restored(&rt).await;
        assert_eq!(s.access.len(), 320);
        s.manager.abort("100", &role("destination")).await.unwrap();
        assert_eq!(s.access.len(), 20);
    }

    #[tokio::test]
    async fn abort_of_the_source_after_a_restart_forgets_what_the_save_took() {
        let s = setup();
        s.access.insert(&population(30, 1, 100));
        s.manager.register("100", &migration()).await.unwrap();
        s.manager.prepare("100", &role("source")).await.unwrap();
        let rt = s.manager.get("100").unwrap();
        s.manager.engine().save(&rt).await;
        let store = Store::new(s.dir.path());
        kept_ids_reach(&store, 30).await;
        s.manager.shutdown(Duration::from_secs(1)).await;
        let Setup { access, dir, .. } = s;
        let next = setup_over(dir, access, Duration::from_secs(5));
        next.manager.restore().await;
        next.manager.abort("100", &role("source")).await.unwrap();
        assert!(Store::new(next.dir.path())
            .load_ids("100")
            .unwrap()
            .is_empty());
        // A Finish coming after it has nothing to flush: the VM ran on here.
        next.manager.finish("100", &role("source")).await.unwrap();
        assert_eq!(next.access.len(), 30);
    }

    #[tokio::test]
    async fn abort_on_the_destination_deletes_exactly_what_the_load_created() {
        let access = FakeAccess::new(Events::default());
        let s = setup_over(tempfile::tempdir().unwrap(), access, Duration::ZERO);
        // The VM's entries already here (it ran here before) and another VM's.
        s.access.insert(&population(3, 9, 100));
        s.access.insert(&population(5, 2, 7));
        s.manager.register("100", &migration()).await.unwrap();
        s.manager
            .prepare("100", &role("destination"))
            .await
            .unwrap();
        let rt = s.manager.get("100").unwrap();
        s.manager
            .engine()
            .load(&rt, state_blob(2_000, 4, 100))
            .await;
        until_restored(&rt).await;
        assert_eq!(s.access.len(), 2_008);
        s.events.take();
        s.manager.abort("100", &role("destination")).await.unwrap();
        let ev = s.events.take();
        assert_eq!(
            ev.first().map(String::as_str),
            Some("delete 2000"),
            "{ev:?}"
        );
        assert_eq!(s.access.len(), 8, "the 3 older and the other VM's 5 stay");
        assert_eq!(rt.prepared(), None);
    }

    #[tokio::test]
    async fn abort_on_the_destination_where_the_vm_runs_and_finish_keep_the_entries() {
        let access = FakeAccess::new(Events::default());
        let s = setup_over(tempfile::tempdir().unwrap(), access, Duration::ZERO);
        s.manager.register("100", &migration()).await.unwrap();
        for (op, extra) in [("abort", true), ("finish", false)] {
            s.manager
                .prepare("100", &role("destination"))
                .await
                .unwrap();
            let rt = s.manager.get("100").unwrap();
            s.manager.engine().load(&rt, state_blob(500, 5, 100)).await;
            until_restored(&rt).await;
            let mut o = role("destination");
            if extra {
                o.push(("vm_running".into(), OptValue::Bool(true)));
                s.manager.abort("100", &o).await.unwrap();
            } else {
                s.manager.finish("100", &o).await.unwrap();
            }
            assert_eq!(s.access.len(), 500, "{op}");
            assert!(
                !s.events.take().iter().any(|e| e.starts_with("delete")),
                "{op}"
            );
        }
    }

    #[tokio::test]
    async fn migration_steps_name_their_problems() {
        let s = setup();
        assert_eq!(
            text(s.manager.prepare("100", &role("source")).await),
            "VM '100' is not registered"
        );
        s.manager.register("100", &migration()).await.unwrap();
        assert_eq!(
            text(s.manager.prepare("100", &[]).await),
            "invalid option 'role': is required: Prepare of the 'source' or the 'destination'?"
        );
        assert_eq!(
            text(s.manager.finish("100", &role("sauce")).await),
            "invalid option 'role': 'sauce' is not a role; use 'source' or 'destination'"
        );
        let mut o = role("source");
        o.push(("vm_running".into(), OptValue::Bool(true)));
        assert_eq!(
            text(s.manager.finish("100", &o).await),
            "unknown option 'vm_running' (known: role)"
        );
        let o = opts(&[("role", OptValue::U32(1))]);
        assert_eq!(
            text(s.manager.abort("100", &o).await),
            "invalid option 'role': must be of type 's', got 'u'"
        );
    }

    #[tokio::test]
    async fn finish_on_the_source_after_a_restart_still_flushes_what_the_save_took() {
        let s = setup();
        s.access.insert(&population(30, 1, 100));
        s.manager.register("100", &migration()).await.unwrap();
        s.manager.prepare("100", &role("source")).await.unwrap();
        let rt = s.manager.get("100").unwrap();
        s.manager.engine().save(&rt).await;
        // The ids reach the state directory half a second after the Save.
        let store = Store::new(s.dir.path());
        kept_ids_reach(&store, 30).await;
        s.manager.shutdown(Duration::from_secs(1)).await;
        let Setup { access, dir, .. } = s;
        let next = setup_over(dir, access, Duration::from_secs(5));
        next.manager.restore().await;
        assert_eq!(next.manager.get("100").unwrap().prepared(), None);
        next.manager.finish("100", &role("source")).await.unwrap();
        assert_eq!(next.access.len(), 0, "the saved entries are flushed");
        // The destination's Finish has nothing to do then.
        next.manager
            .finish("100", &role("destination"))
            .await
            .unwrap();
    }
}

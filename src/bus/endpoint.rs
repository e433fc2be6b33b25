//! How a registered VM is served with zbus: its own connection to its bus,
//! queued on `org.qemu.VMState1`, and its `VM1` object on the manager
//! connection, whose report changes become PropertiesChanged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tokio::task::AbortHandle;
use zbus::connection::Builder;
use zbus::fdo::{RequestNameFlags, RequestNameReply};
use zbus::Connection;

use super::error::Error;
use super::ifaces::{Vm1, VmState1};
use super::proxmox::VmStateHelper;
use super::{system_bus_address, vm_path, MANAGER_NAME, VMSTATE_NAME, VMSTATE_PATH};
use crate::service::{Endpoint, Engine, Manager, VmRuntime};

/// How long connecting to a VM's bus may take before Register gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a VM connection outlives its unregistration while the Quit
/// that caused it is answered on it.
const QUIT_REPLY_GRACE: Duration = Duration::from_secs(1);

/// One served VM: its own bus connection and the tasks that turn report
/// changes into PropertiesChanged.
struct Served {
    rt: Arc<VmRuntime>,
    conn: Option<Connection>,
    /// Cleared when the VM's bus drops the connection (e.g. the bus daemon
    /// restarted), so an identical Register reconnects instead of
    /// reporting success for a VM nobody serves.
    alive: Arc<AtomicBool>,
    watchers: Vec<AbortHandle>,
}

/// The zbus [`Endpoint`]: VM objects on the manager connection, one
/// connection per VM on the VM's bus.
pub struct BusEndpoint {
    manager: Connection,
    served: Mutex<HashMap<String, Served>>,
    /// The manager serving through this endpoint, for the interfaces on a
    /// VM's connection that act on its registration (Proxmox VE's Quit).
    owner: OnceLock<Weak<Manager<BusEndpoint>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BusEndpoint {
    /// Serves VM objects on `manager`, the connection that owns (or will
    /// own) the manager name.
    pub fn new(manager: Connection) -> BusEndpoint {
        BusEndpoint {
            manager,
            served: Mutex::new(HashMap::new()),
            owner: OnceLock::new(),
        }
    }

    /// Tells the endpoint which manager serves through it (once, right
    /// after the manager is made).
    pub fn set_owner(&self, owner: Weak<Manager<BusEndpoint>>) {
        let _ = self.owner.set(owner);
    }

    pub fn manager(&self) -> &Connection {
        &self.manager
    }
}

/// The VM's effective bus address, as management must hand it to QEMU.
fn address(rt: &VmRuntime) -> String {
    rt.config
        .bus_address
        .clone()
        .unwrap_or_else(system_bus_address)
}

impl Endpoint for BusEndpoint {
    type Link = Connection;
    type Error = Error;

    async fn connect(
        &self,
        rt: &Arc<VmRuntime>,
        engine: &Arc<Engine>,
    ) -> Result<Connection, Error> {
        let address = address(rt);
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
            engine: engine.clone(),
        };
        // Proxmox VE's qemu-server looks for its management interface on
        // the VMState1 owner itself (docs/proxmox.md).
        let pve = VmStateHelper {
            rt: rt.clone(),
            manager: self.owner.get().cloned().unwrap_or_default(),
        };
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            builder
                .serve_at(VMSTATE_PATH, iface)
                .serve_at(VMSTATE_PATH, pve)
                .build(),
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

    async fn export(&self, rt: &Arc<VmRuntime>, conn: Option<Connection>) -> Result<(), Error> {
        let vm = rt.config.vm.clone();
        let address = address(rt);
        let unique_name = conn
            .as_ref()
            .and_then(|c| c.unique_name().map(|n| n.to_string()))
            .unwrap_or_default();
        let path = vm_path(&vm);
        let server = self.manager.object_server();
        // Replacing covers a retry for a VM exported without a connection.
        let _ = server.remove::<Vm1, _>(&path).await;
        let vm1 = Vm1 {
            rt: rt.clone(),
            bus_address: address.clone(),
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
            let r = rt.clone();
            watchers.push(
                tokio::spawn(async move {
                    let mut rx = r.watch_load();
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
            let (c, alive, vm, addr) = (c.clone(), alive.clone(), vm.clone(), address);
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
                rt: rt.clone(),
                conn,
                alive,
                watchers,
            },
        ) {
            old.watchers.iter().for_each(AbortHandle::abort);
        }
        Ok(())
    }

    fn is_serving(&self, vm: &str) -> bool {
        lock(&self.served)
            .get(vm)
            .is_some_and(|s| s.conn.is_some() && s.alive.load(Ordering::SeqCst))
    }

    async fn unserve(&self, vm: &str) {
        let served = lock(&self.served).remove(vm);
        let _ = self
            .manager
            .object_server()
            .remove::<Vm1, _>(vm_path(vm))
            .await;
        if let Some(s) = served {
            s.watchers.iter().for_each(AbortHandle::abort);
            if let Some(conn) = s.conn {
                let _ = conn.release_name(VMSTATE_NAME).await;
                if s.rt.quitting() {
                    // The Quit that led here is answered on this very
                    // connection: close it once that reply is out.
                    tokio::spawn(async move {
                        tokio::time::sleep(QUIT_REPLY_GRACE).await;
                        let _ = conn.close().await;
                    });
                } else {
                    let _ = conn.close().await;
                }
            }
        }
    }

    async fn withdraw(&self) {
        let _ = self.manager.release_name(MANAGER_NAME).await;
    }
}

//! `com.proxmox.VMStateHelper`, the management interface qemu-server
//! expects next to `org.qemu.VMState1` on the same connection
//! (`PVE::QemuServer::DBusVMState::qemu_del_dbus_vmstate`): it reads
//! `NumMigratedEntries` and calls `Quit()` on the owner whose Id is
//! `pve-vmstate-<vmid>`, addressed by its unique name. Also the
//! `controller` binding of a registration: the process that registered
//! the VM (`conntrack-vmstate proxmox-helper`, the unit qemu-server
//! starts) is told of a Quit, and the VM is unregistered when it leaves.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use zbus::{interface, Connection};

use super::endpoint::BusEndpoint;
use super::error::Error;
use super::{vm_object_path, VM_INTERFACE};
use crate::service::{Endpoint, Manager, VmRuntime};

/// How long Quit waits for the controlling process to remove QEMU's object
/// and unregister; qemu-server gives Quit 70 s (QMP `object-del` may take
/// up to 60 s while QEMU is busy).
const CONTROLLER_BOUND: Duration = Duration::from_secs(65);

/// Signal the daemon sends (unicast) to a VM's controller when qemu-server
/// calls Quit.
pub const QUIT_REQUESTED: &str = "QuitRequested";

pub struct VmStateHelper {
    pub(crate) rt: Arc<VmRuntime>,
    pub(crate) manager: Weak<Manager<BusEndpoint>>,
}

#[interface(name = "com.proxmox.VMStateHelper")]
impl VmStateHelper {
    /// Entries carried by this registration: those the last Save put into
    /// the state, or, on a destination, those the last Load restored
    /// (created or already there). qemu-server logs it as "migrated N
    /// conntrack state entries".
    #[zbus(property(emits_changed_signal = "false"))]
    fn num_migrated_entries(&self) -> u32 {
        let n = match (self.rt.last_save(), self.rt.last_load()) {
            (Some(s), _) => s.entries,
            (None, Some(l)) => l.created + l.existed,
            (None, None) => 0,
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Stops serving the VM, keeping its entries (qemu-server flushes the
    /// source by mark itself). With a controlling process, that process
    /// first removes QEMU's `dbus-vmstate` object if the VM runs here.
    async fn quit(&self) -> Result<(), Error> {
        let Some(manager) = self.manager.upgrade() else {
            return Ok(());
        };
        quit(&manager, &self.rt).await
    }
}

/// Whether `rt` is still the registration held for its VM.
fn current<E: Endpoint>(m: &Manager<E>, rt: &Arc<VmRuntime>) -> bool {
    m.get(&rt.config.vm)
        .is_some_and(|cur| Arc::ptr_eq(&cur, rt))
}

/// Waits until `rt` is no longer registered, at most `bound`.
async fn wait_unregistered<E: Endpoint>(
    m: &Manager<E>,
    rt: &Arc<VmRuntime>,
    bound: Duration,
) -> bool {
    let mut count = m.vm_count();
    let wait = async {
        while current(m, rt) {
            if count.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::time::timeout(bound, wait).await.is_ok()
}

async fn quit(m: &Arc<Manager<BusEndpoint>>, rt: &Arc<VmRuntime>) -> Result<(), Error> {
    let vm = rt.config.vm.clone();
    if !current(m, rt) {
        return Ok(());
    }
    rt.set_quitting(true);
    if let Some(controller) = rt.controller() {
        let path = vm_object_path(&vm);
        let sent = m
            .endpoint()
            .manager()
            .emit_signal(
                Some(controller.as_str()),
                path.as_str(),
                VM_INTERFACE,
                QUIT_REQUESTED,
                &(),
            )
            .await;
        match sent {
            Ok(()) => {
                if wait_unregistered(m, rt, CONTROLLER_BOUND).await {
                    tracing::info!(VMID = %vm, "Quit of VM {vm}: its controller {controller} detached it");
                    return Ok(());
                }
                tracing::warn!(
                    VMID = %vm,
                    "Quit of VM {vm}: controller {controller} did not unregister within {} s; \
                     unregistering",
                    CONTROLLER_BOUND.as_secs()
                );
            }
            Err(e) => tracing::warn!(
                VMID = %vm,
                "Quit of VM {vm}: telling controller {controller} failed ({e}); unregistering"
            ),
        }
    }
    if current(m, rt) {
        m.unregister(&vm, &[]).await?;
    }
    tracing::info!(VMID = %vm, "Quit of VM {vm}: no longer served");
    Ok(())
}

/// Makes `controller` the VM's controlling process and unregisters the VM
/// (keeping its entries) once that process leaves the bus. `conn` is the
/// manager connection, where the controller is a peer.
pub(crate) async fn bind_controller<E: Endpoint>(
    manager: &Arc<Manager<E>>,
    conn: &Connection,
    rt: &Arc<VmRuntime>,
    controller: String,
) {
    rt.set_controller(Some(controller.clone()));
    let dbus = match zbus::fdo::DBusProxy::new(conn).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("cannot watch controller {controller}: {e}");
            return;
        }
    };
    let stream = dbus
        .receive_name_owner_changed_with_args(&[(0, controller.as_str())])
        .await;
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch controller {controller}: {e}");
            return;
        }
    };
    let (manager, rt) = (Arc::downgrade(manager), Arc::downgrade(rt));
    tokio::spawn(async move {
        // Subscribed first, then checked: a controller that left in between
        // is seen either way.
        let gone_already = match zbus::names::BusName::try_from(controller.as_str()) {
            Ok(n) => !dbus.name_has_owner(n).await.unwrap_or(true),
            Err(_) => true,
        };
        if !gone_already {
            while let Some(sig) = stream.next().await {
                if sig.args().is_ok_and(|a| a.new_owner().is_none()) {
                    break;
                }
            }
        }
        let (Some(manager), Some(rt)) = (manager.upgrade(), rt.upgrade()) else {
            return;
        };
        if rt.controller().as_deref() != Some(controller.as_str()) || !current(&manager, &rt) {
            return;
        }
        let vm = rt.config.vm.clone();
        tracing::warn!(
            VMID = %vm,
            "VM {vm}: its controller {controller} left the bus; unregistering (entries kept)"
        );
        if let Err(e) = manager.unregister(&vm, &[]).await {
            tracing::error!(VMID = %vm, "Unregister of VM {vm} after its controller left: {e}");
        }
    });
}

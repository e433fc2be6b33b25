//! The thin D-Bus edge: Manager1, VM1 and org.qemu.VMState1 objects that
//! validate, call into [`crate::service`] and translate errors
//! ([`ifaces`], [`error`]); the zbus [`crate::service::Endpoint`] that
//! serves each VM on its bus ([`endpoint`]); daemon start and stop
//! ([`daemon`]). What Register and Unregister do, and in which order, is
//! [`crate::service::Manager`]'s.

pub mod daemon;
pub mod endpoint;
pub mod error;
pub mod ifaces;
pub mod proxmox;
pub mod proxy;

pub use daemon::{run, Daemon, DaemonConfig, DaemonError};
pub use endpoint::BusEndpoint;
pub use error::Error;

use zbus::OwnedObjectPath;

use crate::service::escape_path_element;

/// Well-known name of the manager.
pub const MANAGER_NAME: &str = "org.conntrack_vmstate.Manager1";
pub const MANAGER_PATH: &str = "/org/conntrack_vmstate/Manager1";
pub const MANAGER_INTERFACE: &str = "org.conntrack_vmstate.Manager1";
/// Where the ObjectManager lists the VM objects.
pub const OBJECT_ROOT: &str = "/org/conntrack_vmstate";
pub const VM_PATH_PREFIX: &str = "/org/conntrack_vmstate/VM";
pub const VM_INTERFACE: &str = "org.conntrack_vmstate.VM1";
/// QEMU's helper name, path and interface (backends/dbus-vmstate.c).
pub const VMSTATE_NAME: &str = "org.qemu.VMState1";
pub const VMSTATE_PATH: &str = "/org/qemu/VMState1";

/// The effective address of the system bus, as QEMU must be given it.
pub fn system_bus_address() -> String {
    std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
        .unwrap_or_else(|_| "unix:path=/run/dbus/system_bus_socket".to_string())
}

/// Object path of a VM's `VM1` object.
pub fn vm_object_path(vm: &str) -> String {
    format!("{VM_PATH_PREFIX}/{}", escape_path_element(vm))
}

/// [`vm_object_path`] as a typed path.
pub(crate) fn vm_path(vm: &str) -> OwnedObjectPath {
    // The escaping only yields [A-Za-z0-9_], always a valid element.
    OwnedObjectPath::try_from(vm_object_path(vm)).unwrap_or_else(|_| {
        OwnedObjectPath::try_from(VM_PATH_PREFIX).expect("constant path is valid")
    })
}

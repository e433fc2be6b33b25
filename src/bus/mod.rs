//! The thin D-Bus edge: Manager1, VM1 and org.qemu.VMState1 objects that
//! validate, call into [`crate::service`] and translate errors.

pub mod daemon;
pub mod error;
pub mod ifaces;
pub mod proxy;

pub use daemon::{run, system_bus_address, vm_object_path, Daemon, DaemonConfig, DaemonError};
pub use error::Error;

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

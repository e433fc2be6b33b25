//! Client proxies of our interfaces, for the CLI and the tests.

use std::collections::HashMap;

use zbus::proxy;
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

#[proxy(
    interface = "org.conntrack_vmstate.Manager1",
    default_service = "org.conntrack_vmstate.Manager1",
    default_path = "/org/conntrack_vmstate/Manager1"
)]
pub trait Manager1 {
    fn register(
        &self,
        vm: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> zbus::Result<OwnedObjectPath>;
    fn unregister(&self, vm: &str, options: HashMap<&str, Variant<'_>>) -> zbus::Result<()>;
    fn prepare(&self, vm: &str, options: HashMap<&str, Variant<'_>>) -> zbus::Result<()>;
    fn finish(&self, vm: &str, options: HashMap<&str, Variant<'_>>) -> zbus::Result<()>;
    fn abort(&self, vm: &str, options: HashMap<&str, Variant<'_>>) -> zbus::Result<()>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}

#[proxy(
    interface = "org.conntrack_vmstate.VM1",
    default_service = "org.conntrack_vmstate.Manager1"
)]
pub trait Vm1 {
    #[zbus(property)]
    fn vm_id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn mark(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn mark_mask(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn zone(&self) -> zbus::Result<Vec<u16>>;
    #[zbus(property)]
    fn format(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn bus_address(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn unique_name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn lifecycle(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn prepared(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn last_save(&self) -> zbus::Result<HashMap<String, OwnedVariant>>;
    #[zbus(property)]
    fn last_load(&self) -> zbus::Result<HashMap<String, OwnedVariant>>;
}

/// QEMU's side of `org.qemu.VMState1`; address a VM's connection by its
/// unique name (the shared name reaches only the primary owner).
#[proxy(interface = "org.qemu.VMState1", default_path = "/org/qemu/VMState1")]
pub trait VmState1 {
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    fn save(&self) -> zbus::Result<serde_bytes::ByteBuf>;
    fn load(&self, data: &serde_bytes::Bytes) -> zbus::Result<()>;
}

//! `register`, `unregister`, `status`: talk to conntrack-vmstated's Manager1.

use super::{RegisterArgs, StatusArgs, UnregisterArgs};

pub fn register(_a: RegisterArgs) -> anyhow::Result<()> {
    anyhow::bail!("register: not implemented yet")
}
pub fn unregister(_a: UnregisterArgs) -> anyhow::Result<()> {
    anyhow::bail!("unregister: not implemented yet")
}
pub fn status(_a: StatusArgs) -> anyhow::Result<()> {
    anyhow::bail!("status: not implemented yet")
}

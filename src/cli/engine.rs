//! `save`, `load`, `inspect`, `flush`: direct conntrack work in the caller's
//! network namespace, no daemon involved.

use super::{FlushArgs, InspectArgs, LoadArgs, SaveArgs};

pub fn save(_a: SaveArgs) -> anyhow::Result<()> {
    anyhow::bail!("save: not implemented yet")
}
pub fn load(_a: LoadArgs) -> anyhow::Result<()> {
    anyhow::bail!("load: not implemented yet")
}
pub fn inspect(_a: InspectArgs) -> anyhow::Result<()> {
    anyhow::bail!("inspect: not implemented yet")
}
pub fn flush(_a: FlushArgs) -> anyhow::Result<()> {
    anyhow::bail!("flush: not implemented yet")
}

//! Native ctnetlink (NETLINK_NETFILTER) codec and socket operations.

use crate::access::{AccessError, ConntrackAccess, CreateReport, DeleteReport};
use crate::entry::{Entry, Selector};

/// Conntrack access over a netlink socket in the caller's network namespace.
pub struct Ctnetlink {}

impl Ctnetlink {
    /// Opens the netlink socket(s) needed; fails without CAP_NET_ADMIN only
    /// on first use, as the kernel checks per request.
    pub fn open() -> Result<Self, AccessError> {
        Ok(Ctnetlink {})
    }
}

fn unimplemented_yet() -> AccessError {
    AccessError::Helper("ctnetlink codec not implemented yet".into())
}

impl ConntrackAccess for Ctnetlink {
    fn dump(&self, _sel: &Selector) -> Result<Vec<Entry>, AccessError> {
        Err(unimplemented_yet())
    }
    fn create(&self, _entries: &[Entry]) -> Result<CreateReport, AccessError> {
        Err(unimplemented_yet())
    }
    fn delete_selected(&self, _sel: &Selector) -> Result<u64, AccessError> {
        Err(unimplemented_yet())
    }
    fn delete_entries(&self, _entries: &[Entry]) -> Result<DeleteReport, AccessError> {
        Err(unimplemented_yet())
    }
}

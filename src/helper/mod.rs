//! The daemon ↔ sandboxed conntrack helper protocol (client and server).
//!
//! The daemon holds no capability; it asks the helper, which holds only
//! CAP_NET_ADMIN, to dump, create and delete entries.

use std::path::Path;

use crate::access::{AccessError, ConntrackAccess, CreateReport, DeleteReport};
use crate::entry::{Entry, Selector};

/// Client side: a [`ConntrackAccess`] that forwards to the helper's socket.
pub struct HelperClient {}

impl HelperClient {
    /// Connects lazily: the helper is socket-activated on first use.
    pub fn new(_socket: &Path) -> Result<Self, AccessError> {
        Err(AccessError::Helper(
            "helper protocol not implemented yet".into(),
        ))
    }
}

fn unimplemented_yet() -> AccessError {
    AccessError::Helper("helper protocol not implemented yet".into())
}

impl ConntrackAccess for HelperClient {
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

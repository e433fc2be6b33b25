//! The one D-Bus error type of our management interfaces. QEMU-facing
//! `Save`/`Load` never return it: they never fail.

use crate::service::{ManagerError, ServiceError};

/// Errors of `org.conntrack_vmstate.Manager1`, named
/// `org.conntrack_vmstate.Error.<Variant>`; the text says what to fix.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.conntrack_vmstate.Error")]
pub enum Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// An option name `Register`/`Unregister` does not know.
    UnknownOption(String),
    /// A known option with a wrong type or value (also a missing `mark`).
    InvalidOption(String),
    /// The VM name cannot be used.
    InvalidVm(String),
    /// The VM is registered with different options.
    Conflict(String),
    /// Another VM already uses this VMState Id on this bus.
    IdInUse(String),
    /// `Unregister` of a VM that is not registered.
    NotRegistered(String),
    /// The VM's bus could not be reached, or `org.qemu.VMState1` could not
    /// be queued for there.
    BusUnreachable(String),
    /// The state directory could not be written; nothing was changed.
    Persistence(String),
    /// Deleting the saved entries (or, on an aborted destination, the
    /// Load's) failed; the VM stays registered and prepared.
    FlushFailed(String),
    /// Listing the VM's entries failed (Prepare on a destination).
    DumpFailed(String),
    /// The daemon is exiting (idle timeout or signal); a new call activates
    /// a new instance.
    ShuttingDown(String),
}

impl From<ServiceError> for Error {
    fn from(e: ServiceError) -> Self {
        let text = e.to_string();
        match e {
            ServiceError::UnknownOption { .. } => Error::UnknownOption(text),
            ServiceError::InvalidOption { .. } => Error::InvalidOption(text),
            ServiceError::InvalidVm { .. } => Error::InvalidVm(text),
            ServiceError::Conflict { .. } | ServiceError::MarkOverlap { .. } => {
                Error::Conflict(text)
            }
            ServiceError::IdInUse { .. } => Error::IdInUse(text),
            ServiceError::NotRegistered { .. } => Error::NotRegistered(text),
            ServiceError::Persist { .. } | ServiceError::CorruptState { .. } => {
                Error::Persistence(text)
            }
            ServiceError::Flush { .. } => Error::FlushFailed(text),
            ServiceError::Dump { .. } => Error::DumpFailed(text),
            ServiceError::ShuttingDown => Error::ShuttingDown(text),
        }
    }
}

impl From<ManagerError<Error>> for Error {
    fn from(e: ManagerError<Error>) -> Self {
        match e {
            ManagerError::Service(e) => e.into(),
            ManagerError::Endpoint(e) => e,
        }
    }
}

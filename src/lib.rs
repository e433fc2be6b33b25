//! conntrack-vmstate: carry a VM's conntrack entries through QEMU live
//! migration as an `org.qemu.VMState1` helper.
//!
//! Layering: the domain core ([`entry`], [`ctnetlink`], [`format`],
//! [`service`]) never imports zbus; [`bus`] is the thin D-Bus edge and the
//! binaries in `src/bin/` only parse arguments and call into the library.

pub mod access;
pub mod bus;
pub mod cache;
pub mod cli;
pub mod ctnetlink;
pub mod entry;
pub mod format;
pub mod helper;
pub mod qmp;
pub mod service;

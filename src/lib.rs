//! conntrack-vmstate: carry a VM's conntrack entries through QEMU live
//! migration as an `org.qemu.VMState1` helper.
//!
//! Layering: the domain core ([`entry`], [`ctnetlink`], [`format`],
//! [`service`]) never imports zbus; [`bus`] is the thin D-Bus edge and the
//! binaries in `src/bin/` only parse arguments ([`args`]) and call into the
//! library. What the services take from and tell systemd (socket
//! activation, sd_notify, watchdog, runtime directory, journal, stop
//! signals) is [`systemd`]; their log set-up is [`logging`].

pub mod access;
pub mod args;
pub mod bus;
pub mod cache;
pub mod cli;
pub mod ctnetlink;
pub mod entry;
pub mod format;
pub mod helper;
pub mod logging;
pub mod qmp;
pub mod service;
pub mod systemd;

//! The daemon tier: a private dbus-daemon, the real daemon and helper
//! processes, QEMU live migrations. Needs root, dbus-daemon, gdbus and
//! qemu-system-x86_64, except the in-process daemon over the fake access
//! (daemon_concurrency) and QEMU's QMP wiring (qmp_vmstate), which need
//! only dbus-daemon (and QEMU). As a normal user outside CI every test
//! that cannot run says it skipped.

// `common::…` in every module: the kit, once for the whole binary.
extern crate testkit as common;

mod confine_bus;
mod confine_load;
mod daemon_cache;
mod daemon_cli_qmp;
mod daemon_concurrency;
mod daemon_helper;
mod daemon_journal;
mod daemon_lifecycle;
mod daemon_manager;
mod daemon_vmstate;
mod dbus_contract;
mod migration_daemon;
mod migration_failed;
mod migration_harness;
mod migration_scoped;
mod proxmox_helper;
mod qemu_modes;
mod qmp_vmstate;
mod restore_kept;

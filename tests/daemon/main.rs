//! The daemon tier: a private dbus-daemon, the real daemon and helper
//! processes, QEMU live migrations. Needs root, dbus-daemon, gdbus and
//! qemu-system-x86_64; as a normal user outside CI every test says it
//! skipped.

// `common::…` in every module: the kit, once for the whole binary.
extern crate testkit as common;

mod daemon_cache;
mod daemon_cli_qmp;
mod daemon_concurrency;
mod daemon_helper;
mod daemon_journal;
mod daemon_lifecycle;
mod daemon_manager;
mod daemon_vmstate;
mod migration_daemon;
mod migration_harness;
mod qmp_vmstate;

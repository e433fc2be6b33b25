//! A minimal QMP client: enough to add, re-target and delete QEMU's
//! `dbus-vmstate` object.

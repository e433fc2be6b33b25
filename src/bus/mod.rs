//! The thin D-Bus edge: Manager1, VM1 and org.qemu.VMState1 objects that
//! validate, call into [`crate::service`] and translate errors.

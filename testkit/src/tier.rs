//! What a privileged test needs, and the one rule for skipping it.
//!
//! A test of the `kernel` or `daemon` tier starts with
//! `common::needs!(kernel);` (or `daemon`, `qemu`, `snapshots`; `bus`, `bus_qemu` for
//! tests that need no root). As a normal
//! user outside CI it then skips, printing one line with its name and the
//! reason, so the unprivileged run says what it did not cover. As root, or
//! whenever `CI` is set, skipping is impossible: a missing tool or missing
//! root fails the test loudly, so a broken CI setup cannot pass by
//! skipping everything.

use std::io::Write;

/// Tools the kernel tier runs: namespaces and conntrack(8).
const KERNEL_TOOLS: &[&str] = &["ip", "conntrack"];

/// Tools the daemon tier runs: the kernel tier's and a private bus.
const DAEMON_TOOLS: &[&str] = &["ip", "conntrack", "dbus-daemon", "gdbus"];

/// Tools of the daemon tier's migrations: the daemon tier's and QEMU.
const QEMU_TOOLS: &[&str] = &[
    "ip",
    "conntrack",
    "dbus-daemon",
    "gdbus",
    "qemu-system-x86_64",
];

/// Tools of the QEMU tests that take snapshots: QEMU's and qemu-img for
/// the qcow2 disk the snapshot lives in.
const SNAPSHOT_TOOLS: &[&str] = &[
    "ip",
    "conntrack",
    "dbus-daemon",
    "gdbus",
    "qemu-system-x86_64",
    "qemu-img",
];

/// Tools of tests that only need a private bus (and QEMU), not root.
const BUS_TOOLS: &[&str] = &["dbus-daemon"];
const BUS_QEMU_TOOLS: &[&str] = &["dbus-daemon", "qemu-system-x86_64"];

/// `true`: skip this test (the line saying so is printed). Panics instead
/// when skipping is not allowed.
pub fn kernel() -> bool {
    skip_unless(KERNEL_TOOLS, true)
}

/// As [`kernel`], for tests that also need dbus-daemon and gdbus.
pub fn daemon() -> bool {
    skip_unless(DAEMON_TOOLS, true)
}

/// As [`daemon`], for tests that also run QEMU.
pub fn qemu() -> bool {
    skip_unless(QEMU_TOOLS, true)
}

/// As [`qemu`], for tests that also create a qcow2 disk.
pub fn snapshots() -> bool {
    skip_unless(SNAPSHOT_TOOLS, true)
}

/// A private dbus-daemon only (an in-process daemon over the fake
/// access): runs as any user that has dbus-daemon.
pub fn bus() -> bool {
    skip_unless(BUS_TOOLS, false)
}

/// A private dbus-daemon and QEMU, no namespace: runs as any user that has
/// both.
pub fn bus_qemu() -> bool {
    skip_unless(BUS_QEMU_TOOLS, false)
}

fn skip_unless(tools: &[&str], needs_root: bool) -> bool {
    let root = nix::unistd::geteuid().is_root();
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    let reason = match (root || !needs_root, missing.is_empty()) {
        (true, true) => return false,
        (false, true) => "not root (needs network namespaces and CAP_NET_ADMIN)".to_string(),
        (true, false) => format!("missing {} on PATH", missing.join(", ")),
        (false, false) => format!("not root; missing {} on PATH", missing.join(", ")),
    };
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string();
    if root || std::env::var_os("CI").is_some() {
        panic!("{test}: cannot run: {reason}; skipping is not allowed as root or under CI");
    }
    // Straight to the file descriptor: libtest captures print!/eprint!, and
    // a skip must be seen in a passing run. One write, so the line does
    // not interleave with libtest's result lines of parallel tests.
    let line = format!("skipped {test}: {reason}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    true
}

fn on_path(tool: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|d| {
        let p = d.join(tool);
        std::fs::metadata(&p).is_ok_and(|m| m.is_file())
    })
}

/// `needs!(kernel)`, `needs!(daemon)`, `needs!(qemu)`: returns from the
/// calling test when it is to be skipped (see the module documentation).
#[macro_export]
macro_rules! needs {
    ($tier:ident) => {
        if $crate::tier::$tier() {
            return;
        }
    };
}

//! The one test kit of conntrack-vmstate, used by the three test binaries
//! (`tests/unprivileged`, `tests/kernel`, `tests/daemon`), the benchmarks
//! and the demo. A workspace member, so it compiles once instead of once
//! per test binary.
//!
//! - [`netns`], [`ctcli`]: throw-away network namespaces and conntrack(8);
//! - [`bus`]: a private dbus-daemon per test ([`bus::TestBus`] over
//!   [`host::Bus`], tests/data/allow-all.conf), the daemon process
//!   ([`bus::DaemonOpts::command`], [`bus::DaemonProc`]) and the one Register
//!   helper ([`bus::register`]); the in-process daemon is
//!   `conntrack_vmstate::bus::Daemon` over a [`fake::FakeAccess`];
//! - [`host`]: the one process type ([`host::Proc`]), the helper process
//!   ([`host::start_helper`]) and a simulated hypervisor host (namespace,
//!   bus, daemon, helper, QEMU) for migrations;
//! - [`qemu`]: a real QEMU over QMP;
//! - [`population`]: the one realistic population generator;
//! - [`memory`]: a counting allocator and what the warm cache holds per
//!   entry;
//! - [`entries`]: proptest strategies for single entries;
//! - [`fake`]: the one fake `ConntrackAccess`, for what the kernel cannot
//!   be made to do on demand;
//! - [`floor`]: a dbus-vmstate helper that costs nothing, for the
//!   benchmarks' floor;
//! - [`compare`]: entry comparisons with tolerances;
//! - [`tier`]: what a privileged test needs, and the skip rule;
//! - [`threads`]: this process's threads by name.

pub mod bus;
pub mod compare;
pub mod ctcli;
pub mod entries;
pub mod fake;
pub mod floor;
pub mod host;
pub mod memory;
pub mod netns;
pub mod population;
pub mod qemu;
pub mod threads;
pub mod tier;

use std::path::PathBuf;
use std::time::Duration;

/// The one bound of every wait in the kit: long enough for a loaded 2-core
/// CI machine, short enough that a hang fails the test instead of the CI
/// job.
pub const WAIT: Duration = Duration::from_secs(60);

/// Path of one of the package's binaries (`conntrack-vmstated`, …).
///
/// `CARGO_BIN_EXE_*` exists only while compiling the package's own
/// integration tests, not this crate, so the path is found from the running
/// executable: cargo puts test and bench binaries in `<profile>/deps/` and
/// examples in `<profile>/examples/`, the package's binaries in
/// `<profile>/`, and builds those binaries before any test or bench.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("executable has a directory")
        .to_path_buf();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built (run through cargo test / cargo bench)",
        path.display()
    );
    path
}

/// Path of a file in tests/data.
pub fn data(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data")).join(name)
}

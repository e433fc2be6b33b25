//! Command lines of `conntrack-vmstated` and `conntrack-vmstate-helper`, in
//! the library so that the build-time generator renders their man pages
//! from the same definitions as `--help`.
//!
//! The options both programs have are one struct, [`CommonArgs`], flattened
//! into each, and [`CommonArgs::open_access`] is the one place that turns
//! them into a conntrack access. Every option can also be set through an
//! environment variable named `CONNTRACK_VMSTATE_` and the option's name in
//! capitals with `_` for `-` (`--no-base` is `CONNTRACK_VMSTATE_NO_BASE`), so
//! a unit drop-in changes an option with `Environment=` and leaves the
//! packaged `ExecStart=` alone. A command-line option wins over its
//! variable. Switches take `1`/`0`, `yes`/`no`, `true`/`false`, `on`/`off`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser};

use crate::access::{AccessError, ConntrackAccess};
use crate::cache::{CacheConfig, CachedAccess};
use crate::ctnetlink::Ctnetlink;
use crate::helper::DEFAULT_SOCKET;
use crate::service::{DEFAULT_LOAD_BUDGET_MS, DEFAULT_SAVE_DEADLINE_MS};

/// Options of both programs. The warm cache lives in the process that talks
/// to the kernel: the helper, or a daemon started with `--in-process`. A
/// daemon that uses the helper has no cache of its own and ignores the
/// cache options; set them on the helper.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Exit after this many seconds with nothing to serve (0: never): the
    /// daemon when no VM is registered, the helper when no connection is
    /// open. The next D-Bus call (daemon) or connection (helper) starts it
    /// again.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 60,
        env = "CONNTRACK_VMSTATE_IDLE_TIMEOUT"
    )]
    pub idle_timeout: u64,
    /// How often the warm cache re-reads each registered VM's entries from
    /// the kernel to refresh remaining timeouts: the staleness bound of the
    /// timeouts a Save reports. Like --no-cache and --no-base, this applies
    /// where the warm cache lives: in the helper, or in conntrack-vmstated
    /// --in-process (a daemon using the helper ignores it).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3600),
        env = "CONNTRACK_VMSTATE_CACHE_REFRESH_SECS"
    )]
    pub cache_refresh_secs: u64,
    /// Keep no warm cache: every Save walks the kernel's conntrack table (a
    /// helper tells the daemon so by refusing its watches).
    #[arg(
        long,
        env = "CONNTRACK_VMSTATE_NO_CACHE",
        value_parser = BoolishValueParser::new()
    )]
    pub no_cache: bool,
    /// Encode every Save whole (state format v1.1) instead of patching the
    /// warm cache's pre-encoded base (v1.2, less migration downtime): for
    /// migrations to hosts whose conntrack-vmstated predates v1.2. Set it
    /// where the warm cache lives (see --cache-refresh-secs).
    #[arg(
        long,
        env = "CONNTRACK_VMSTATE_NO_BASE",
        value_parser = BoolishValueParser::new()
    )]
    pub no_base: bool,
}

impl CommonArgs {
    /// `--idle-timeout`, `None` for never.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout > 0).then(|| Duration::from_secs(self.idle_timeout))
    }

    /// The conntrack access these options ask for: netlink behind the warm
    /// cache (which builds pre-encoded bases unless `--no-base`), or plain
    /// netlink with `--no-cache`. Needs CAP_NET_ADMIN.
    pub fn open_access(&self) -> Result<Arc<dyn ConntrackAccess>, OpenError> {
        let ct = Ctnetlink::open().map_err(OpenError::Netlink)?;
        if self.no_cache {
            return Ok(Arc::new(ct));
        }
        let cfg = CacheConfig::new(Duration::from_secs(self.cache_refresh_secs), !self.no_base);
        Ok(Arc::new(
            CachedAccess::new(ct, cfg).map_err(OpenError::Cache)?,
        ))
    }
}

/// Why [`CommonArgs::open_access`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("opening the conntrack netlink socket: {0}")]
    Netlink(#[source] AccessError),
    #[error("starting the conntrack cache: {0}")]
    Cache(#[source] AccessError),
}

/// Carries VMs' conntrack entries through QEMU live migration: a manager on
/// D-Bus (org.conntrack_vmstate.Manager1) registers VMs, and for each one an
/// org.qemu.VMState1 helper answers QEMU's dbus-vmstate Save and Load.
///
/// Every option can also be set through the environment variable named in
/// its description (a command-line option wins), e.g. in a drop-in of
/// conntrack-vmstated.service: Environment=CONNTRACK_VMSTATE_IDLE_TIMEOUT=300.
#[derive(Debug, Parser)]
#[command(name = "conntrack-vmstated", version, about, long_about)]
pub struct DaemonArgs {
    /// D-Bus address of the bus to serve the manager on (default: the system bus).
    #[arg(long, value_name = "ADDR", env = "CONNTRACK_VMSTATE_BUS_ADDRESS")]
    pub bus_address: Option<String>,
    /// Directory for persisted registrations (default: $RUNTIME_DIRECTORY, else /run/conntrack-vmstate).
    #[arg(long, value_name = "DIR", env = "CONNTRACK_VMSTATE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Reach conntrack through the sandboxed helper listening on this
    /// socket (the daemon then needs no capability). Of --helper-socket and
    /// --in-process on the command line, the one given last wins.
    #[arg(
        long,
        value_name = "PATH",
        default_value = DEFAULT_SOCKET,
        env = "CONNTRACK_VMSTATE_HELPER_SOCKET",
        overrides_with = "in_process"
    )]
    pub helper_socket: PathBuf,
    /// Talk to the kernel's conntrack over netlink in this process instead
    /// of through the helper: needs CAP_NET_ADMIN, keeps the warm cache
    /// here. For tests, benchmarks and hosts without the helper units.
    #[arg(
        long,
        env = "CONNTRACK_VMSTATE_IN_PROCESS",
        value_parser = BoolishValueParser::new(),
        overrides_with = "helper_socket"
    )]
    pub in_process: bool,
    /// Save answers QEMU with an empty state (and records why) if dumping and
    /// encoding take longer than this; QEMU itself gives up after 25000 ms and
    /// every millisecond of Save is guest downtime.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = DEFAULT_SAVE_DEADLINE_MS,
        env = "CONNTRACK_VMSTATE_SAVE_DEADLINE_MS"
    )]
    pub save_deadline_ms: u64,
    /// Load creates the most valuable entries for this long, then answers
    /// QEMU (the guest resumes) and creates the rest in the background;
    /// LastLoad says when the restore is complete. (`--load-deadline-ms` is
    /// the old name of the same knob.)
    #[arg(
        long,
        value_name = "MS",
        default_value_t = DEFAULT_LOAD_BUDGET_MS,
        alias = "load-deadline-ms",
        env = "CONNTRACK_VMSTATE_LOAD_BUDGET_MS"
    )]
    pub load_budget_ms: u64,
    /// Most entries one Load creates for a VM registered without its own
    /// `max_entries`; the rest (the least valuable) are counted as
    /// over_cap. Never more than half of nf_conntrack_max.
    #[arg(
        long,
        value_name = "N",
        default_value_t = crate::service::confine::DEFAULT_MAX_ENTRIES,
        value_parser = clap::value_parser!(u64).range(1..),
        env = "CONNTRACK_VMSTATE_MAX_VM_ENTRIES"
    )]
    pub max_vm_entries: u64,
    /// On SIGTERM, running restores (entries of a Load that QEMU already has
    /// its answer for) are finished for up to this long; what is left is
    /// handed over to the next start through the state directory. 0 hands
    /// over at once. Keep it below the unit's TimeoutStopSec=.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = crate::service::engine::DEFAULT_STOP_GRACE_SECS,
        env = "CONNTRACK_VMSTATE_STOP_GRACE_SECS"
    )]
    pub stop_grace_secs: u64,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Sandboxed conntrack helper of conntrack-vmstated: runs the daemon's
/// dump/create/delete requests with CAP_NET_ADMIN and keeps the registered
/// VMs' entries warm for Save.
///
/// Every option can also be set through the environment variable named in
/// its description (a command-line option wins), e.g. in a drop-in of
/// conntrack-vmstate-helper.service: Environment=CONNTRACK_VMSTATE_NO_BASE=yes.
#[derive(Debug, Parser)]
#[command(
    name = "conntrack-vmstate-helper",
    version,
    about = "Sandboxed conntrack helper of conntrack-vmstated: runs the daemon's \
             dump/create/delete requests with CAP_NET_ADMIN",
    long_about
)]
pub struct HelperArgs {
    /// Listen on this socket path instead of the socket systemd passes
    /// (LISTEN_FDS); for tests and manual runs.
    #[arg(long, value_name = "PATH", env = "CONNTRACK_VMSTATE_LISTEN")]
    pub listen: Option<PathBuf>,
    /// Connections served at once.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 64,
        env = "CONNTRACK_VMSTATE_MAX_CONNECTIONS"
    )]
    pub max_connections: usize,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::sync::Mutex;

    /// Parsing reads the process environment, which one test changes.
    static ENV: Mutex<()> = Mutex::new(());

    fn env_lock() -> std::sync::MutexGuard<'static, ()> {
        ENV.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[test]
    fn definitions_are_consistent() {
        DaemonArgs::command().debug_assert();
        HelperArgs::command().debug_assert();
    }

    #[test]
    fn daemon_uses_the_helper_unless_in_process_comes_last() {
        let _g = env_lock();
        let p = |a: &[&str]| {
            DaemonArgs::try_parse_from(
                std::iter::once("conntrack-vmstated").chain(a.iter().copied()),
            )
            .unwrap()
        };
        let d = p(&[]);
        assert!(!d.in_process);
        assert_eq!(d.helper_socket, PathBuf::from(DEFAULT_SOCKET));
        assert!(p(&["--in-process"]).in_process);
        let d = p(&["--in-process", "--helper-socket", "/tmp/h.sock"]);
        assert!(!d.in_process);
        assert_eq!(d.helper_socket, PathBuf::from("/tmp/h.sock"));
        assert!(p(&["--helper-socket", "/tmp/h.sock", "--in-process"]).in_process);
    }

    #[test]
    fn common_options_parse_the_same_in_both() {
        let _g = env_lock();
        let d = DaemonArgs::try_parse_from([
            "conntrack-vmstated",
            "--no-base",
            "--cache-refresh-secs",
            "5",
            "--idle-timeout",
            "0",
        ])
        .unwrap();
        let h = HelperArgs::try_parse_from([
            "conntrack-vmstate-helper",
            "--no-base",
            "--cache-refresh-secs",
            "5",
            "--idle-timeout",
            "0",
        ])
        .unwrap();
        for c in [&d.common, &h.common] {
            assert!(c.no_base && !c.no_cache);
            assert_eq!((c.cache_refresh_secs, c.idle_timeout()), (5, None));
        }
        let e = HelperArgs::try_parse_from(["h", "--cache-refresh-secs", "0"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
    }

    /// Every option names its variable, with the one prefix, so the man
    /// pages list them all.
    #[test]
    fn every_option_has_an_environment_variable() {
        for cmd in [DaemonArgs::command(), HelperArgs::command()] {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                let long = a.get_long().expect("long option");
                let want = format!(
                    "CONNTRACK_VMSTATE_{}",
                    long.to_uppercase().replace('-', "_")
                );
                assert_eq!(
                    a.get_env().and_then(|e| e.to_str()),
                    Some(want.as_str()),
                    "{} --{long}",
                    cmd.get_name()
                );
            }
        }
    }

    /// What a drop-in's `Environment=` does: the variables set the options,
    /// the command line still wins, and a bad value is an error naming it.
    #[test]
    fn environment_sets_options_and_the_command_line_wins() {
        let _g = env_lock();
        let vars = [
            ("CONNTRACK_VMSTATE_IDLE_TIMEOUT", "7"),
            ("CONNTRACK_VMSTATE_NO_BASE", "yes"),
            ("CONNTRACK_VMSTATE_NO_CACHE", "0"),
            ("CONNTRACK_VMSTATE_IN_PROCESS", "on"),
        ];
        // SAFETY: test-only; every test that parses holds ENV, and nothing
        // else in the crate's tests reads these variables.
        for (k, v) in vars {
            unsafe { std::env::set_var(k, v) };
        }
        let d = DaemonArgs::try_parse_from(["conntrack-vmstated"]);
        let h = HelperArgs::try_parse_from(["h", "--idle-timeout", "0"]);
        let d2 = DaemonArgs::try_parse_from(["conntrack-vmstated", "--helper-socket", "/x"]);
        unsafe { std::env::set_var("CONNTRACK_VMSTATE_NO_BASE", "maybe") };
        let bad = HelperArgs::try_parse_from(["h"]);
        for (k, _) in vars {
            unsafe { std::env::remove_var(k) };
        }
        let d = d.unwrap();
        assert!(d.in_process && d.common.no_base && !d.common.no_cache);
        assert_eq!(d.common.idle_timeout(), Some(Duration::from_secs(7)));
        let h = h.unwrap();
        assert!(h.common.no_base);
        assert_eq!(h.common.idle_timeout(), None);
        // Against another option's variable the command line does not win
        // silently: which conntrack access the daemon uses is refused as
        // ambiguous.
        assert_eq!(
            d2.unwrap_err().kind(),
            clap::error::ErrorKind::ArgumentConflict
        );
        let e = bad.unwrap_err().to_string();
        assert!(e.contains("maybe") && e.contains("--no-base"), "{e}");
    }
}

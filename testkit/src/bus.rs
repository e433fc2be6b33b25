//! A private `dbus-daemon` per test and the `conntrack-vmstated` processes
//! that serve on it. Every process is stopped by its PID (TERM, then KILL
//! after a bound) on drop, and every wait is bounded.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use conntrack_vmstate::bus::proxy::{Manager1Proxy, Vm1Proxy, VmState1Proxy};
use std::collections::HashMap;
use zbus::zvariant::Variant;

static NEXT: AtomicU32 = AtomicU32::new(0);

pub use crate::host::{Bus, Proc};
pub use crate::{data, WAIT};

/// A unique scratch directory, readable by unprivileged test users (the
/// strict-policy test connects as `nobody`).
pub fn scratch_dir(tag: &str) -> tempfile::TempDir {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = tempfile::Builder::new()
        .prefix(&format!("cvs-{tag}-{}-{n}-", std::process::id()))
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// A private message bus in its own scratch directory: the kit's one
/// dbus-daemon ([`Bus`]), for tests that talk to it through zbus.
pub struct TestBus {
    pub address: String,
    // Fields drop in order: the bus process before its directory.
    _bus: Bus,
    _dir: tempfile::TempDir,
}

impl TestBus {
    /// A bus where everyone may own and call anything.
    pub fn new(tag: &str) -> TestBus {
        TestBus::with_config(tag, &data("allow-all.conf"))
    }

    /// A bus with the given configuration file.
    pub fn with_config(tag: &str, config: &Path) -> TestBus {
        let dir = scratch_dir(tag);
        let bus = Bus::with_config(dir.path(), config);
        TestBus {
            address: bus.address.clone(),
            _bus: bus,
            _dir: dir,
        }
    }

    pub async fn connect(&self) -> zbus::Connection {
        tokio::time::timeout(
            WAIT,
            zbus::connection::Builder::address(self.address.as_str()).build(),
        )
        .await
        .expect("connect timeout")
        .expect("connect to test bus")
    }
}

/// Waits until `name` has an owner on the bus.
pub async fn wait_for_name(conn: &zbus::Connection, name: &str, limit: Duration) -> bool {
    let dbus = zbus::fdo::DBusProxy::new(conn).await.expect("DBusProxy");
    let end = Instant::now() + limit;
    loop {
        let bus_name = zbus::names::BusName::try_from(name).expect("bus name");
        if dbus.name_has_owner(bus_name).await.unwrap_or(false) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Unique names queued on `name`, primary owner first (what QEMU sees).
pub async fn queued_owners(conn: &zbus::Connection, name: &str) -> Vec<String> {
    let dbus = zbus::fdo::DBusProxy::new(conn).await.expect("DBusProxy");
    let bus_name = zbus::names::WellKnownName::try_from(name).expect("name");
    match dbus.list_queued_owners(bus_name).await {
        Ok(v) => v.into_iter().map(|n| n.to_string()).collect(),
        Err(zbus::fdo::Error::NameHasNoOwner(_)) => Vec::new(),
        Err(e) => panic!("ListQueuedOwners: {e}"),
    }
}

/// A `conntrack-vmstated` process: the kit's one process type
/// ([`Proc`]: TERM, then KILL, on drop), its output in
/// `<state dir>.log`.
pub struct DaemonProc {
    proc: Proc,
    pub log: PathBuf,
}

/// How to start a daemon.
pub struct DaemonOpts<'a> {
    pub bus: &'a str,
    pub state_dir: &'a Path,
    pub extra: Vec<String>,
    /// Run inside this network namespace (`ip netns exec` execs, so the PID
    /// is the daemon's).
    pub netns: Option<&'a str>,
    /// Prefix, e.g. `setpriv …` to drop capabilities.
    pub wrapper: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl<'a> DaemonOpts<'a> {
    pub fn new(bus: &'a str, state_dir: &'a Path) -> Self {
        DaemonOpts {
            bus,
            state_dir,
            extra: vec!["--idle-timeout".into(), "0".into()],
            netns: None,
            wrapper: Vec::new(),
            env: Vec::new(),
        }
    }
}

impl DaemonOpts<'_> {
    /// The with-helper variant: every conntrack operation goes to the
    /// conntrack-vmstate-helper on `sock` (see
    /// [`start_helper`](crate::host::start_helper)).
    pub fn helper_socket(mut self, sock: &Path) -> Self {
        self.extra
            .extend(["--helper-socket".to_string(), sock.display().to_string()]);
        self
    }

    /// Without CAP_NET_ADMIN, as the packaged daemon runs beside its
    /// helper: any entry it reports came through the helper.
    pub fn capless(mut self) -> Self {
        self.wrapper = [
            "setpriv",
            "--inh-caps=-net_admin",
            "--bounding-set=-net_admin",
            "--",
        ]
        .map(String::from)
        .to_vec();
        self
    }

    /// The daemon's command line and environment: the one way the kit
    /// starts `conntrack-vmstated` (also [`Host`](crate::host::Host)'s).
    /// Not under a test's systemd: no notify socket, no watchdog.
    pub fn command(&self) -> Command {
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = self.netns {
            argv.extend(["ip", "netns", "exec", ns].map(String::from));
        }
        argv.extend(self.wrapper.iter().cloned());
        argv.push(crate::bin("conntrack-vmstated").display().to_string());
        argv.extend([
            "--bus-address".into(),
            self.bus.into(),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            // The tests run as root without the helper unit; those that
            // test the helper pass --helper-socket, which comes later and
            // so wins.
            "--in-process".into(),
        ]);
        argv.extend(self.extra.iter().cloned());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }
}

impl DaemonProc {
    pub fn spawn(o: DaemonOpts<'_>) -> DaemonProc {
        let log = o.state_dir.with_extension("log");
        let proc = Proc::spawn_logged("conntrack-vmstated", log.clone(), &mut o.command());
        DaemonProc { proc, log }
    }

    /// Starts a daemon and waits until it owns the manager name.
    pub async fn start(o: DaemonOpts<'_>, client: &zbus::Connection) -> DaemonProc {
        let mut d = DaemonProc::spawn(o);
        if !wait_for_name(client, "org.conntrack_vmstate.Manager1", WAIT).await {
            let st = d.proc.stop();
            panic!(
                "daemon did not own its name ({st:?}); log:\n{}",
                d.log_text()
            );
        }
        d
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log_text(&self) -> String {
        self.proc.output()
    }

    /// Waits (bounded, blocking) until the log holds `needle`: a line
    /// written after the effect a test waited for (the last entry in the
    /// kernel) reaches the log a moment later.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        let end = std::time::Instant::now() + limit;
        loop {
            if self.log_text().contains(needle) {
                return true;
            }
            if std::time::Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        self.proc.kill();
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.proc.pid() as i32), sig);
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.proc.wait_exit(limit)
    }
}

/// Runs the CLI with the manager on `bus` (status not checked).
pub fn cli(bus: &str, args: &[&str]) -> std::process::Output {
    Command::new(crate::bin("conntrack-vmstate"))
        .args(args)
        .env("CONNTRACK_VMSTATE_MANAGER_ADDRESS", bus)
        .output()
        .expect("run conntrack-vmstate")
}

/// `gdbus call …` (GLib's client, as QEMU uses); returns (success, stdout, stderr).
pub fn gdbus_call(
    address: &str,
    dest: &str,
    path: &str,
    method: &str,
    args: &[&str],
) -> (bool, String, String) {
    gdbus_call_as(None, address, dest, path, method, args)
}

/// Like [`gdbus_call`], optionally as another user through setpriv.
pub fn gdbus_call_as(
    uid: Option<u32>,
    address: &str,
    dest: &str,
    path: &str,
    method: &str,
    args: &[&str],
) -> (bool, String, String) {
    let mut cmd = match uid {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={u}"),
                format!("--regid={u}"),
                "--clear-groups".into(),
                "gdbus".into(),
            ]);
            c
        }
        None => Command::new("gdbus"),
    };
    cmd.args([
        "call",
        "--address",
        address,
        "--dest",
        dest,
        "--object-path",
        path,
        "--method",
        method,
        "--timeout",
        "20",
    ])
    .args(args);
    let out = cmd.output().expect("run gdbus");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Registers `vm` with the manager on `client`'s bus, its VMState1
/// connection on `bus_address`; returns its Vm1 object (properties not
/// cached, so every read is fresh) and the VMState1 proxy QEMU would call.
/// The one Register helper of the daemon tests.
pub async fn register(
    client: &zbus::Connection,
    bus_address: &str,
    vm: &str,
) -> (Vm1Proxy<'static>, VmState1Proxy<'static>) {
    let m = Manager1Proxy::new(client).await.expect("manager proxy");
    let path = m
        .register(
            vm,
            HashMap::from([("bus_address", Variant::from(bus_address))]),
        )
        .await
        .unwrap_or_else(|e| panic!("Register {vm}: {e}"));
    let vm1 = Vm1Proxy::builder(client)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("Vm1 proxy");
    let unique = vm1.unique_name().await.expect("VMState1 connection name");
    let vs = VmState1Proxy::builder(client)
        .destination(unique)
        .build()
        .await
        .expect("VMState1 proxy");
    (vm1, vs)
}

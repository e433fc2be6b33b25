//! A private `dbus-daemon` per test and the `conntrack-vmstated` processes
//! that serve on it. Every process is stopped by its PID (TERM, then KILL
//! after a bound) on drop, and every wait is bounded.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Default bound of every wait in these helpers.
pub const WAIT: Duration = Duration::from_secs(20);

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

/// Path of a file in tests/data.
pub fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Stops a child: SIGTERM, then SIGKILL after `grace`; always reaps it.
pub fn stop(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    if let Some(st) = wait_exit(child, grace) {
        return Some(st);
    }
    let _ = kill(pid, Signal::SIGKILL);
    child.wait().ok()
}

/// Waits up to `limit` for the child to exit.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A private message bus.
pub struct TestBus {
    pub address: String,
    child: Child,
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
        let socket = dir.path().join("bus");
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .arg(format!("--address=unix:path={}", socket.display()))
            .args(["--nofork", "--print-address"])
            .stdout(Stdio::piped())
            // Its only stderr line here is a harmless fd-limit warning.
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dbus-daemon");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(WAIT) {
            Ok(l) if !l.trim().is_empty() => l,
            _ => {
                stop(&mut child, Duration::from_secs(2));
                panic!("dbus-daemon printed no address within {WAIT:?}");
            }
        };
        // Connect by path only: the printed address carries a guid that
        // zbus would then insist on.
        let _ = line;
        TestBus {
            address: format!("unix:path={}", socket.display()),
            child,
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

impl Drop for TestBus {
    fn drop(&mut self) {
        stop(&mut self.child, Duration::from_secs(5));
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

/// A `conntrack-vmstated` process.
pub struct DaemonProc {
    child: Child,
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

impl DaemonProc {
    pub fn spawn(o: DaemonOpts<'_>) -> DaemonProc {
        let log = o.state_dir.with_extension("log");
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = o.netns {
            argv.extend(["ip", "netns", "exec", ns].map(String::from));
        }
        argv.extend(o.wrapper.iter().cloned());
        argv.push(env!("CARGO_BIN_EXE_conntrack-vmstated").into());
        argv.extend([
            "--bus-address".into(),
            o.bus.into(),
            "--state-dir".into(),
            o.state_dir.display().to_string(),
            "--in-process".into(),
        ]);
        argv.extend(o.extra.iter().cloned());
        let logf = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env("RUST_LOG", "info");
        for (k, v) in &o.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn conntrack-vmstated");
        DaemonProc { child, log }
    }

    /// Starts a daemon and waits until it owns the manager name.
    pub async fn start(o: DaemonOpts<'_>, client: &zbus::Connection) -> DaemonProc {
        let mut d = DaemonProc::spawn(o);
        if !wait_for_name(client, "org.conntrack_vmstate.Manager1", WAIT).await {
            let st = stop(&mut d.child, Duration::from_secs(2));
            panic!(
                "daemon did not own its name ({st:?}); log:\n{}",
                d.log_text()
            );
        }
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        wait_exit(&mut self.child, limit)
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        stop(&mut self.child, Duration::from_secs(5));
    }
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

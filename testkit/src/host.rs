//! A simulated hypervisor host: a network namespace (its own conntrack
//! table), a private dbus-daemon, optionally the conntrack-vmstated daemon
//! inside the namespace and a QEMU. Every process is tracked by PID and
//! stopped TERM → KILL on drop; the namespace and the temp dir go last.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::netns::Netns;
use super::qemu::Qemu;

static NEXT_FILE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

pub use crate::WAIT;

/// The real conntrack-vmstate-helper inside `ns`, listening on `sock`
/// (removed first); returns once it accepts connections.
pub fn spawn_helper(ns: &Netns, dir: &Path, sock: &Path) -> Proc {
    start_helper(ns, dir, &[], sock)
}

/// The one way the kit starts conntrack-vmstate-helper: inside `ns`,
/// behind `wrap` (e.g. setpriv to keep only CAP_NET_ADMIN, as the packaged
/// unit does), listening on `sock` (removed first), its output in
/// `<dir>/helper.log`. Returns once the helper accepts connections.
pub fn start_helper(ns: &Netns, dir: &Path, wrap: &[&str], sock: &Path) -> Proc {
    let _ = std::fs::remove_file(sock);
    let helper = crate::bin("conntrack-vmstate-helper");
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = ns.cmd(first);
            c.args(rest).arg(&helper);
            c
        }
        None => ns.cmd(&helper),
    };
    cmd.arg("--listen")
        .arg(sock)
        .args(["--idle-timeout", "0"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let mut p = Proc::spawn("helper", dir, &mut cmd);
    let end = Instant::now() + WAIT;
    // A connection rather than the file: bind() creates the file before
    // listen(). The helper takes a connection closed without a request
    // as a normal end.
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Some(s) = p.try_wait() {
            panic!("conntrack-vmstate-helper exited {s}: {}", p.output());
        }
        assert!(
            Instant::now() < end,
            "helper not listening after {WAIT:?}: {}",
            p.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// A child process stopped TERM, then KILL after 5 s, when dropped. Its
/// stdout and stderr go to `<dir>/<name>.log`.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: std::process::Child,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(name: &str, dir: &Path, cmd: &mut Command) -> Proc {
        Proc::spawn_logged(name, dir.join(format!("{name}.log")), cmd)
    }

    /// As [`spawn`](Self::spawn), its output in `log`.
    pub fn spawn_logged(name: &str, log: PathBuf, cmd: &mut Command) -> Proc {
        let out = File::create(&log).expect("create log");
        let err = out.try_clone().expect("dup log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} {cmd:?}: {e}"));
        Proc {
            name: name.to_owned(),
            log,
            child,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Exit status if the process has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for the process to end by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the process wrote so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// TERM, then KILL after 5 s; returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(s) = self.try_wait() {
            return Some(s);
        }
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if let Some(s) = self.wait_exit(Duration::from_secs(5)) {
            return Some(s);
        }
        let _ = self.child.kill();
        self.wait_exit(Duration::from_secs(5))
    }

    /// SIGKILL at once (a crash, as far as the process is concerned).
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let _ = self.child.kill();
        self.wait_exit(Duration::from_secs(5))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private dbus-daemon whose socket is `<dir>/bus`. Unix path sockets are
/// not bound to a network namespace, so it runs outside; a test may put a
/// daemon of one "host" on another host's bus to share it.
pub struct Bus {
    pub address: String,
    pub proc: Proc,
}

impl Bus {
    /// A bus where everyone may own and call anything, with default limits,
    /// so that QEMU's own 25 s stays the only timeout (reference §10):
    /// tests/data/allow-all.conf.
    pub fn start(dir: &Path) -> Bus {
        Bus::with_config(dir, &crate::data("allow-all.conf"))
    }

    /// A bus with the given configuration file (e.g. the strict policy).
    pub fn with_config(dir: &Path, conf: &Path) -> Bus {
        let sock = dir.join("bus");
        let address = format!("unix:path={}", sock.display());
        let mut proc = Proc::spawn(
            "dbus-daemon",
            dir,
            Command::new("dbus-daemon")
                .arg(format!("--config-file={}", conf.display()))
                .arg(format!("--address={address}"))
                .arg("--nofork")
                .arg("--print-address"),
        );
        let end = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if let Some(s) = proc.try_wait() {
                panic!("dbus-daemon exited {s}: {}", proc.output());
            }
            assert!(
                Instant::now() < end,
                "dbus-daemon not listening after {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Bus { address, proc }
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// The Ids of every queued owner of `org.qemu.VMState1`, discovered exactly
/// as QEMU does: ListQueuedOwners, then GetAll on `/org/qemu/VMState1` of
/// each owner. Owners whose GetAll fails or lacks a string Id are left out,
/// as QEMU skips them. Maps unique name → Id.
pub fn vmstate_owners(bus_address: &str) -> Result<HashMap<String, String>, String> {
    block_on(bounded(async {
        let conn = connect(bus_address)
            .await
            .map_err(|e| format!("connect {bus_address}: {e}"))?;
        let dbus = zbus::fdo::DBusProxy::new(&conn)
            .await
            .map_err(|e| e.to_string())?;
        let name = zbus::names::WellKnownName::from_static_str_unchecked("org.qemu.VMState1");
        let owners = match dbus.list_queued_owners(name).await {
            Ok(o) => o,
            Err(zbus::fdo::Error::NameHasNoOwner(_)) => Vec::new(),
            Err(e) => return Err(format!("ListQueuedOwners: {e}")),
        };
        let mut ids = HashMap::new();
        for owner in owners {
            let props = zbus::fdo::PropertiesProxy::builder(&conn)
                .destination(owner.to_string())
                .path("/org/qemu/VMState1")
                .build()
                .await
                .map_err(|e| e.to_string())?;
            let iface = zbus::names::InterfaceName::from_static_str_unchecked("org.qemu.VMState1");
            let call = props.get_all(iface);
            let Ok(Ok(all)) = tokio::time::timeout(Duration::from_secs(25), call).await else {
                continue;
            };
            if let Some(id) = all.get("Id").and_then(|v| String::try_from(v.clone()).ok()) {
                ids.insert(owner.to_string(), id);
            }
        }
        Ok(ids)
    }))
}

/// Bounds a whole bus conversation (connect included): a frozen bus or
/// owner must fail the test, not hang it. Longer than QEMU's 25 s per call
/// so a slow GetAll is seen as QEMU would see it.
async fn bounded<T>(f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| Err("no answer from the bus within 30 s".into()))
}

/// Waits (bounded) until some owner of `org.qemu.VMState1` on the bus
/// reports each of `ids`; returns the unique names serving them.
pub fn wait_vmstate_ids(bus_address: &str, ids: &[&str], timeout: Duration) -> Vec<String> {
    let end = Instant::now() + timeout;
    let mut last: Result<HashMap<String, String>, String> = Err("not asked yet".into());
    loop {
        if let Ok(found) = &last {
            let names: Vec<String> = ids
                .iter()
                .filter_map(|id| {
                    found
                        .iter()
                        .find(|(_, v)| v.as_str() == *id)
                        .map(|(k, _)| k.clone())
                })
                .collect();
            if names.len() == ids.len() {
                return names;
            }
        }
        assert!(
            Instant::now() < end,
            "VMState Ids {ids:?} not on {bus_address} after {timeout:?}; last view: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
        last = vmstate_owners(bus_address);
    }
}

/// Waits (bounded) until `name` has an owner on the bus.
pub fn wait_name(bus_address: &str, name: &str, timeout: Duration) {
    let end = Instant::now() + timeout;
    while !name_owned(bus_address, name) {
        assert!(
            Instant::now() < end,
            "{name} not owned on {bus_address} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

async fn connect(bus_address: &str) -> zbus::Result<zbus::Connection> {
    zbus::connection::Builder::address(bus_address)
        .build()
        .await
}

/// The manager's well-known name (docs/dbus-interface.md).
pub const MANAGER_NAME: &str = "org.conntrack_vmstate.Manager1";

/// One simulated host. Fields drop in declaration order: QEMU, then the
/// daemon, then its conntrack helper, then the bus, then the namespace,
/// then the directory.
pub struct Host {
    pub qemu: Option<Qemu>,
    pub daemon: Option<Proc>,
    pub helper: Option<Proc>,
    pub bus: Bus,
    pub ns: Netns,
    pub dir: tempfile::TempDir,
    pub name: String,
}

impl Host {
    /// A namespace `cvs-<tag>-<pid>-<n>` and a private bus in a fresh
    /// temp dir.
    pub fn new(tag: &str) -> Host {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cvs-{tag}-{}-", std::process::id()))
            .tempdir()
            .expect("tempdir");
        let ns = Netns::new(tag);
        let bus = Bus::start(dir.path());
        Host {
            qemu: None,
            daemon: None,
            helper: None,
            bus,
            name: ns.name.clone(),
            ns,
            dir,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts conntrack-vmstated inside this host's namespace with its
    /// manager on `manager_bus` (normally this host's bus), its state in
    /// `<dir>/state` and `extra` arguments; `wrap` runs before it inside the
    /// namespace (e.g. setpriv to drop a capability). Waits until the
    /// manager name is owned.
    pub fn start_daemon_with(&mut self, manager_bus: &str, wrap: &[&str], extra: &[&str]) {
        let state = self.path().join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        let mut o = crate::bus::DaemonOpts::new(manager_bus, &state);
        o.netns = Some(&self.ns.name);
        o.wrapper = wrap.iter().map(|s| s.to_string()).collect();
        o.extra.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = o.command();
        let n = self.daemon_starts();
        let mut p = Proc::spawn(&format!("daemon{n}"), self.dir.path(), &mut cmd);
        let end = Instant::now() + WAIT;
        // Check the process as well, so a crash reports the daemon's own
        // message instead of a timeout.
        loop {
            if let Some(s) = p.try_wait() {
                panic!("conntrack-vmstated exited {s}: {}", p.output());
            }
            if name_owned(manager_bus, MANAGER_NAME) {
                break;
            }
            assert!(
                Instant::now() < end,
                "manager not on the bus after {WAIT:?}: {}",
                p.output()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        self.daemon = Some(p);
    }

    /// Starts conntrack-vmstate-helper inside this host's namespace,
    /// listening on `<dir>/helper.sock`, behind `wrap` (e.g. setpriv to keep
    /// only CAP_NET_ADMIN, as the packaged unit does). Returns the socket
    /// path once the helper accepts connections.
    pub fn start_helper(&mut self, wrap: &[&str]) -> PathBuf {
        let sock = self.path().join("helper.sock");
        let p = start_helper(&self.ns, self.dir.path(), wrap, &sock);
        self.helper = Some(p);
        sock
    }

    pub fn start_daemon(&mut self) {
        let addr = self.bus.address.clone();
        self.start_daemon_on(&addr);
    }

    pub fn start_daemon_on(&mut self, manager_bus: &str) {
        self.start_daemon_with(manager_bus, &[], &[]);
    }

    fn daemon_starts(&self) -> usize {
        (0..)
            .find(|n| !self.path().join(format!("daemon{n}.log")).exists())
            .unwrap_or(0)
    }

    /// Runs the CLI inside this namespace with the manager on this host's
    /// bus; returns the output (status not checked).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.ns
            .cmd(crate::bin("conntrack-vmstate"))
            .args(args)
            .env("CONNTRACK_VMSTATE_MANAGER_ADDRESS", &self.bus.address)
            .output()
            .expect("run conntrack-vmstate")
    }

    /// As [`cli`](Self::cli), panicking with stderr on failure; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "conntrack-vmstate {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `status VM --json`: the VM's properties (Id, Mark, LastSave, …).
    pub fn status_json(&self, vm: &str) -> serde_json::Value {
        let out = self.cli_ok(&["status", vm, "--json"]);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"));
        // one VM: its object (a one-element list is accepted too)
        match v {
            serde_json::Value::Array(mut a) if a.len() == 1 => a.remove(0),
            o @ serde_json::Value::Object(_) => o,
            other => panic!("status {vm} --json: expected one VM, got {other}"),
        }
    }

    /// `register VM --bus-address <this bus> [extra…]`.
    pub fn register(&self, vm: &str, extra: &[&str]) -> String {
        let mut args = vec!["register", vm, "--bus-address", &self.bus.address];
        args.extend_from_slice(extra);
        self.cli_ok(&args)
    }

    /// Creates entries from conntrack(8) `--load-file` lines in this namespace.
    pub fn load_entries(&self, lines: &str) {
        let n = NEXT_FILE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let f = self.path().join(format!("population-{n}.txt"));
        std::fs::write(&f, lines).expect("write population");
        super::netns::run_ok(self.ns.cmd("conntrack").arg("--load-file").arg(&f));
    }

    /// Every entry of `mark` (IPv4 and IPv6), read over ctnetlink, every
    /// attribute the codec captures.
    pub fn dump(&self, mark: u32) -> Vec<conntrack_vmstate::entry::Entry> {
        use conntrack_vmstate::access::ConntrackAccess;
        let ct = conntrack_vmstate::ctnetlink::Ctnetlink::open_in_netns(Path::new(&self.ns.path()))
            .expect("open ctnetlink in netns");
        ct.dump(&conntrack_vmstate::entry::Selector {
            mark,
            mark_mask: u32::MAX,
            zone: None,
        })
        .expect("dump")
    }

    /// Deletes exactly `entries` (by tuple) over ctnetlink; returns how many
    /// the kernel deleted.
    pub fn delete(&self, entries: &[conntrack_vmstate::entry::Entry]) -> u64 {
        use conntrack_vmstate::access::ConntrackAccess;
        let ct = conntrack_vmstate::ctnetlink::Ctnetlink::open_in_netns(Path::new(&self.ns.path()))
            .expect("open ctnetlink in netns");
        ct.delete_entries(entries).expect("delete").deleted
    }
}

fn name_owned(bus_address: &str, name: &str) -> bool {
    block_on(bounded(async {
        let conn = connect(bus_address).await.map_err(|e| e.to_string())?;
        let dbus = zbus::fdo::DBusProxy::new(&conn)
            .await
            .map_err(|e| e.to_string())?;
        let n = zbus::names::BusName::try_from(name).map_err(|e| e.to_string())?;
        dbus.name_has_owner(n).await.map_err(|e| e.to_string())
    }))
    .unwrap_or(false)
}

fn normalised(e: &conntrack_vmstate::entry::Entry) -> conntrack_vmstate::entry::Entry {
    let mut e = e.clone();
    e.timeout = 0;
    e.id = None;
    e
}

/// Asserts `dst` holds exactly the entries of `src`, every attribute equal
/// except the kernel id and the remaining timeout; a timeout may only have
/// gone down, by at most `max_age_s`. Returns the count.
pub fn assert_same_entries(
    what: &str,
    src: &[conntrack_vmstate::entry::Entry],
    dst: &[conntrack_vmstate::entry::Entry],
    max_age_s: u32,
) -> usize {
    let index = |v: &[conntrack_vmstate::entry::Entry]| {
        let mut m = std::collections::BTreeMap::new();
        for e in v {
            m.insert(format!("{:?}", normalised(e)), e.timeout);
        }
        m
    };
    let (s, d) = (index(src), index(dst));
    assert_eq!(s.len(), src.len(), "{what}: duplicate source entries");
    let missing: Vec<&String> = s.keys().filter(|k| !d.contains_key(*k)).collect();
    let extra: Vec<&String> = d.keys().filter(|k| !s.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {} of {} entries missing or different on the destination, {} unexpected;\n\
         first missing: {:?}\nfirst unexpected: {:?}",
        missing.len(),
        s.len(),
        extra.len(),
        missing.first(),
        extra.first()
    );
    for (k, st) in &s {
        let dt = d[k];
        assert!(
            dt <= st + 1 && dt + max_age_s >= *st,
            "{what}: timeout {st} s on the source became {dt} s (allowed age {max_age_s} s): {k}"
        );
    }
    s.len()
}

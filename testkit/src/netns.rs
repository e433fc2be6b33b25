//! Throw-away network namespaces: every test host is one. The conntrack table
//! of the namespace the tests start in is never touched.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace created with `ip netns add`, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `cvs-<tag>-<pid>-<n>` with loopback up.
    pub fn new(tag: &str) -> Netns {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("cvs-{tag}-{}-{n}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        run_ok(ns.cmd("ip").args(["link", "set", "lo", "up"]));
        ns
    }

    /// A command that runs inside this namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `program args…` inside and returns stdout; panics with stderr on failure.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = run_ok(self.cmd(program).args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sets `net.netfilter.nf_conntrack_events` of this namespace (a new
    /// one starts at the kernel's default, 2; the package sets 1 on a host).
    pub fn set_conntrack_events(&self, v: u32) {
        run_ok(
            self.cmd("sysctl")
                .arg("-qw")
                .arg(format!("net.netfilter.nf_conntrack_events={v}")),
        );
    }

    /// Path of the namespace handle, for setns(2).
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Number of conntrack entries in this namespace (`conntrack -C` is global,
    /// so this counts a dump of both families).
    /// A failing conntrack(8) panics: counting nothing would let a "nothing
    /// was created" assertion pass without looking.
    pub fn conntrack_count(&self) -> usize {
        let out = run_ok(self.cmd("conntrack").args(["-L", "-f", "ipv4"]));
        let out6 = run_ok(self.cmd("conntrack").args(["-L", "-f", "ipv6"]));
        count_lines(&out) + count_lines(&out6)
    }
}

fn count_lines(o: &Output) -> usize {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

impl Netns {
    /// Runs the ignored test `test` (full name) of the running test binary
    /// again inside this namespace with CAP_NET_ADMIN removed from its
    /// bounding set, with `env=1` set so the child knows it is one;
    /// returns its output. How a test proves the kernel refuses an
    /// operation without the capability.
    pub fn run_test_without_net_admin(&self, test: &str, env: &str) -> Output {
        let exe = std::env::current_exe().expect("test binary");
        self.cmd("setpriv")
            .args(["--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"])
            .arg(exe)
            .args([
                "--exact",
                test,
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(env, "1")
            .output()
            .expect("spawn child")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
    }
}

/// Runs a command, panicking with its stderr when it fails.
pub fn run_ok(c: &mut Command) -> Output {
    let out = c.output().unwrap_or_else(|e| panic!("spawn {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

//! Daemon benchmark: Register round trip, idle RSS, RSS with many
//! VMs registered, and Save of a VM's entries measured as a D-Bus call, on a
//! private dbus-daemon with conntrack-vmstated inside a throw-away network
//! namespace populated by `demo/population` + `conntrack -R` after the VM
//! is registered (the warm cache sees the entries being created).
//!
//!   cargo build --release --bins --examples
//!   sudo target/release/examples/daemon-bench [--entries 5000] [--vms 500]
//!
//! Prints a Markdown table; bench/run runs it, docs/benchmarks.md holds a
//! recorded run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use conntrack_vmstate::bus::proxy::{Manager1Proxy, Vm1Proxy, VmState1Proxy};
use zbus::Variant;

#[derive(Parser)]
struct Args {
    /// Entries of the saved VM (mark 100).
    #[arg(long, default_value_t = 5000)]
    entries: usize,
    /// VMs registered for the RSS measurement.
    #[arg(long, default_value_t = 500)]
    vms: usize,
    /// Repetitions of each timed call.
    #[arg(long, default_value_t = 50)]
    iterations: usize,
    /// Extra argument for conntrack-vmstated (repeatable), e.g. --no-cache.
    #[arg(long, allow_hyphen_values = true)]
    daemon_arg: Vec<String>,
}

/// Kills by PID (TERM, then KILL after 5 s) on drop.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")
}

/// (median, p90, min, max) in ms.
fn stats(mut v: Vec<Duration>) -> (f64, f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (
        ms(v[v.len() / 2]),
        ms(v[v.len() * 9 / 10]),
        ms(v[0]),
        ms(v[v.len() - 1]),
    )
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    // target/<profile>/examples/daemon-bench → target/<profile>/
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .and_then(Path::parent)
        .context("binary dir")?
        .to_path_buf())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::Builder::new().prefix("cvs-bench-").tempdir()?;
    let ns = Netns(format!("cvs-bench-{}", std::process::id()));
    if !Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()?
        .success()
    {
        bail!("ip netns add failed (run as root)");
    }
    // dbus-daemon's built-in limit is 256 connections per user (also on
    // Debian's system bus); one connection per VM needs more for 500 VMs.
    let conf = dir.path().join("bus.conf");
    let allow_all = std::fs::read_to_string(root.join("tests/data/allow-all.conf"))?;
    std::fs::write(
        &conf,
        allow_all.replace(
            "</busconfig>",
            "  <limit name=\"max_connections_per_user\">100000</limit>\n</busconfig>",
        ),
    )?;
    let sock = dir.path().join("bus");
    let address = format!("unix:path={}", sock.display());
    let _bus = Guard(
        Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .arg(format!("--address={address}"))
            .args(["--nofork"])
            .stderr(Stdio::null())
            .spawn()?,
    );
    let end = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if Instant::now() > end {
            bail!("dbus-daemon did not start");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let state = dir.path().join("state");
    let daemon = Guard(
        Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(bin_dir()?.join("conntrack-vmstated"))
            .args([
                "--bus-address",
                &address,
                "--idle-timeout",
                "0",
                "--in-process",
                "--state-dir",
            ])
            .arg(&state)
            .args(&a.daemon_arg)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()?,
    );
    let pid = daemon.0.id();
    let conn = zbus::connection::Builder::address(address.as_str())
        .build()
        .await?;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
    let end = Instant::now() + Duration::from_secs(10);
    while !dbus
        .name_has_owner("org.conntrack_vmstate.Manager1".try_into()?)
        .await?
    {
        if Instant::now() > end {
            bail!("daemon did not start");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = rss_kib(pid)?;
    let m = Manager1Proxy::new(&conn).await?;
    let opts = || HashMap::from([("bus_address", Variant::from(address.as_str()))]);

    let mut reg = Vec::new();
    for i in 0..a.iterations {
        let vm = format!("{}", 100_000 + i);
        let t = Instant::now();
        m.register(&vm, opts()).await?;
        reg.push(t.elapsed());
        m.unregister(&vm, HashMap::new()).await?;
    }

    // Registered before its entries exist, as a VM is registered when it
    // starts: Save is then served by the warm cache (LastSave source).
    let path = m.register("100", opts()).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pop = dir.path().join("pop.txt");
    let out = Command::new(root.join("demo/population"))
        .args(["100", &a.entries.to_string()])
        .output()?;
    std::fs::write(&pop, &out.stdout)?;
    let st = Command::new("ip")
        .args(["netns", "exec", &ns.0, "conntrack", "-R"])
        .arg(&pop)
        .stderr(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("conntrack -R failed");
    }

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let vm = Vm1Proxy::builder(&conn).path(path).build().await?;
    let vs = VmState1Proxy::builder(&conn)
        .destination(vm.unique_name().await?)
        .build()
        .await?;
    let mut saves = Vec::new();
    let mut bytes = 0;
    for _ in 0..a.iterations {
        let t = Instant::now();
        let b = vs.save().await?;
        saves.push(t.elapsed());
        bytes = b.len();
    }
    let decoded = conntrack_vmstate::format::decode(vs.save().await?.as_slice())?;

    for i in 1..a.vms {
        m.register(&format!("{}", 200_000 + i), opts()).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let many_rss = rss_kib(pid)?;

    let source = vm
        .last_save()
        .await?
        .get("source")
        .and_then(|v| String::try_from(v.clone()).ok())
        .unwrap_or_else(|| "direct dump".into());
    let (r50, r90, rmin, rmax) = stats(reg);
    let (s50, s90, smin, smax) = stats(saves);
    println!("| measure | target | median [min–max] | p90 |");
    println!("|---|---|---|---|");
    println!(
        "| Register round trip (ms, n={}) | ≤ 5 ms | {r50:.2} [{rmin:.2}–{rmax:.2}] | {r90:.2} |",
        a.iterations
    );
    println!(
        "| Save of {} entries as a D-Bus call (ms, n={}, {bytes} B blob, Save from: {source}) | ≤ 10 ms | {s50:.2} [{smin:.2}–{smax:.2}] | {s90:.2} |",
        decoded.entries.len(),
        a.iterations
    );
    println!(
        "| daemon RSS idle (VmRSS) | ≤ 10 MiB | {:.1} MiB | |",
        idle_rss as f64 / 1024.0
    );
    println!(
        "| daemon RSS with {} VMs registered | ≤ 64 MiB | {:.1} MiB | |",
        a.vms,
        many_rss as f64 / 1024.0
    );
    Ok(())
}

//! The floor under any dbus-vmstate helper, alone: what QEMU 7.2,
//! dbus-daemon and the migration stream add to a migration for a state of
//! S bytes when the helper itself costs nothing (`testkit::floor`: Save
//! answered with an incompressible blob made beforehand, Load's data
//! dropped), on a real private dbus-daemon, with the bench's bootless TCG
//! QEMU pair and the stream through a file. No conntrack table is
//! involved; `bench/run`'s flow part measures the same floor beside ours,
//! on the loaded hosts and with our real state.
//!
//! `cargo run --release --example vmstate-floor -- [REPS] [BYTES…]`
//! (defaults: 9 repetitions; 0 = no dbus-vmstate object, then 51,978 and
//! 927,605 B, our states of 5k and 100k entries).

use serde_json::json;
use testkit::bus::{scratch_dir, Bus};
use testkit::floor::FloorHelper;
use testkit::qemu::{Incoming, Qemu, QemuOpts};

struct Mig {
    downtime: f64,
    incoming: f64,
}

fn migrate(bus: &str, k: usize, object: bool) -> Mig {
    let dir = scratch_dir("floor");
    let mk = |incoming| QemuOpts {
        vmstate: object.then(|| (bus.to_owned(), Some("floor".to_owned()))),
        incoming,
        ..Default::default()
    };
    let mut sq = Qemu::start(dir.path(), &format!("q{k}s"), None, &mk(false));
    let mut dq = Qemu::start(dir.path(), &format!("q{k}d"), None, &mk(true));
    let stream = dir.path().join("stream.bin");
    let out = sq.migrate_to_file(&stream);
    assert_eq!(out.status, "completed", "migration: {}", out.query);
    dq.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "events", "state": true}]})),
    )
    .expect("destination events");
    assert_eq!(dq.incoming_from_file(&stream), Incoming::Running);
    Mig {
        downtime: out.downtime_ms.unwrap_or(0) as f64,
        incoming: dq.incoming_ms(),
    }
}

/// utime + stime of a process, ms (the bus daemon is one thread, so its
/// CPU time is a lower bound of what it adds in series).
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // the fields after the command name, which is in parentheses
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (tick(11) + tick(12)) * 1e3 / hz
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// xorshift: the same incompressible bytes every run.
fn blob(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let reps: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(9);
    let mut sizes: Vec<usize> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    if sizes.is_empty() {
        sizes = vec![0, 51_978, 927_605];
    }
    let dir = scratch_dir("floor-bus");
    let bus = Bus::start(dir.path());
    println!(
        "| state bytes | reps | downtime ms | incoming ms | dbus-daemon CPU ms per migration |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for &s in &sizes {
        let helper = (s > 0).then(|| FloorHelper::serve(&bus.address, "floor", blob(s)));
        let cpu0 = cpu_ms(bus.proc.pid());
        let runs: Vec<Mig> = (0..reps).map(|k| migrate(&bus.address, k, s > 0)).collect();
        let cpu = (cpu_ms(bus.proc.pid()) - cpu0) / reps as f64;
        if let Some(h) = &helper {
            anyhow::ensure!(
                h.calls() == (reps as u64, reps as u64),
                "QEMU made {:?} Saves/Loads, not {reps} each",
                h.calls()
            );
        }
        println!(
            "| {s} | {reps} | {:.1} | {:.1} | {cpu:.1} |",
            median(runs.iter().map(|m| m.downtime).collect()),
            median(runs.iter().map(|m| m.incoming).collect()),
        );
    }
    Ok(())
}

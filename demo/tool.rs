//! The demo's helper (`cargo build --example demo-tool`): the migration
//! steps of a management tool over the project's own QMP client, and an
//! entry-by-entry comparison of two hosts' conntrack tables over ctnetlink.
//!
//!   demo-tool migrate  QMP_SOCKET STREAM  source: migrate into STREAM, wait
//!                                         for completed/failed, print
//!                                         `status=… downtime_ms=… total_ms=…`
//!   demo-tool incoming QMP_SOCKET STREAM  destination: migrate-incoming from
//!                                         STREAM, wait until the guest runs
//!                                         (STREAM `unix:PATH`: a socket, for
//!                                         both, instead of a file)
//!   demo-tool status   QMP_SOCKET         print query-status' status
//!   demo-tool vmstate  QMP_SOCKET         print QEMU's dbus-vmstate object
//!                                         (`none` when there is none)
//!   demo-tool populate NETNS_NAME MARK COUNT SEED NOISE
//!                                         the tests' realistic population
//!                                         (testkit/src/population.rs) of
//!                                         VM MARK plus NOISE×COUNT entries of
//!                                         other VMs; prints the other marks
//!   demo-tool compare  NETNS_A NETNS_B MARK
//!                                         every attribute of every entry of
//!                                         MARK in both namespaces (paths like
//!                                         /run/netns/NAME); exit 1 on any
//!                                         difference

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use conntrack_vmstate::access::ConntrackAccess;
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::{Entry, Selector};
use conntrack_vmstate::qmp::QmpClient;
use serde_json::{json, Value};

// The same generator the tests use, so the demo shows the same mix: NAT'ed
// entries with their status bits, zones, FIXED_TIMEOUT, labels, TCP window
// scale.
use testkit::population;

const WAIT: Duration = Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .context("usage: demo-tool migrate|incoming|status|vmstate|quit QMP_SOCKET [STREAM] | compare NETNS_A NETNS_B MARK")
    };
    if arg(0)? == "populate" {
        return populate(
            arg(1)?,
            arg(2)?.parse().context("MARK")?,
            arg(3)?.parse().context("COUNT")?,
            arg(4)?.parse().context("SEED")?,
            arg(5)?.parse().context("NOISE")?,
        );
    }
    if arg(0)? == "compare" {
        let mark: u32 = arg(3)?.parse().context("MARK")?;
        return compare(Path::new(arg(1)?), Path::new(arg(2)?), mark);
    }
    let mut qmp = QmpClient::connect(Path::new(arg(1)?))?;
    match arg(0)? {
        "migrate" => migrate(&mut qmp, arg(2)?),
        "incoming" => incoming(&mut qmp, arg(2)?),
        "vmstate" => {
            match qmp.find_vmstate()? {
                None => println!("none"),
                Some(o) => println!("{} on {} listing {}", o.id, o.addr, o.ids.join(",")),
            }
            Ok(())
        }
        "status" => {
            println!("{}", status(&mut qmp)?);
            Ok(())
        }
        "quit" => {
            // QEMU may close the socket before its reply reaches us
            let _ = qmp.execute("quit", None);
            Ok(())
        }
        other => bail!("unknown command {other:?}"),
    }
}

fn status(qmp: &mut QmpClient) -> anyhow::Result<String> {
    let v = qmp.execute("query-status", None)?;
    Ok(v.get("status")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned())
}

/// A stream file through `exec:` (QEMU 7.2 has no `file:` URI; exec: is what
/// its own tests use), or a `unix:` socket for a live migration whose
/// destination receives while the source sends.
fn uri(stream: &str, cat: &str) -> String {
    if stream.starts_with("unix:") {
        stream.to_owned()
    } else {
        format!("exec:{cat} {stream}")
    }
}

fn migrate(qmp: &mut QmpClient, stream: &str) -> anyhow::Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "events", "state": true}]})),
    )?;
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": 1_000_000_000u64})),
    )?;
    qmp.execute("migrate", Some(json!({"uri": uri(stream, "cat >")})))?;
    let end = Instant::now() + WAIT;
    loop {
        let q = qmp.execute("query-migrate", None)?;
        let st = q.get("status").and_then(Value::as_str).unwrap_or("");
        // QEMU 7.2 sets "completed" a moment before it stores the times;
        // until then query-migrate reports total-time 0.
        let times_ready =
            st != "completed" || q.get("total-time").and_then(Value::as_u64).unwrap_or(0) > 0;
        if times_ready && matches!(st, "completed" | "failed" | "cancelled") {
            let n = |k: &str| {
                q.get(k)
                    .and_then(Value::as_u64)
                    .map_or_else(|| "-".to_owned(), |v| v.to_string())
            };
            println!(
                "status={st} downtime_ms={} total_ms={}",
                n("downtime"),
                n("total-time")
            );
            if st != "completed" {
                bail!("migration {st}");
            }
            return Ok(());
        }
        if Instant::now() >= end {
            bail!("migration still {st} after {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn incoming(qmp: &mut QmpClient, stream: &str) -> anyhow::Result<()> {
    qmp.execute("migrate-incoming", Some(json!({"uri": uri(stream, "cat")})))?;
    let end = Instant::now() + WAIT;
    loop {
        // A failed incoming migration makes QEMU 7.2 exit 1: the QMP error
        // here is the first sign; the caller reads QEMU's exit and log.
        let st = status(qmp).context("destination QEMU went away during the incoming migration")?;
        if st == "running" {
            println!("running");
            return Ok(());
        }
        if Instant::now() >= end {
            bail!("destination still {st} after {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn populate(ns: &str, mark: u32, n: usize, seed: u64, noise: f64) -> anyhow::Result<()> {
    let mut spec = population::Spec::new(n, mark, seed);
    spec.noise = noise;
    let pop = population::generate(spec);
    population::load(ns, &pop);
    eprintln!(
        "VM {mark}: {} entries ({} labelled, {} with TCP window scale); other VMs: {} entries",
        pop.vm_count(),
        pop.label_lines.len(),
        pop.direct.len(),
        pop.noise_lines.len()
    );
    if noise > 0.0 {
        let marks: Vec<String> = pop.noise_marks.iter().map(u32::to_string).collect();
        println!("{}", marks.join(" "));
    }
    Ok(())
}

fn dump(netns: &Path, mark: u32) -> anyhow::Result<Vec<Entry>> {
    let ct = Ctnetlink::open_in_netns(netns)
        .with_context(|| format!("conntrack access in {}", netns.display()))?;
    Ok(ct.dump(&Selector::mark(mark))?)
}

/// The entry without what legitimately differs between hosts: the kernel's
/// id and the remaining timeout.
fn key(e: &Entry) -> String {
    let mut e = e.clone();
    e.timeout = 0;
    e.id = None;
    format!("{e:?}")
}

fn compare(a: &Path, b: &Path, mark: u32) -> anyhow::Result<()> {
    let index = |v: Vec<Entry>| -> std::collections::BTreeMap<String, u32> {
        v.iter().map(|e| (key(e), e.timeout)).collect()
    };
    let (ea, eb) = (index(dump(a, mark)?), index(dump(b, mark)?));
    let missing: Vec<&String> = ea.keys().filter(|k| !eb.contains_key(*k)).collect();
    let extra: Vec<&String> = eb.keys().filter(|k| !ea.contains_key(*k)).collect();
    if !missing.is_empty() || !extra.is_empty() {
        for k in missing.iter().take(3) {
            eprintln!("only in {}: {k}", a.display());
        }
        for k in extra.iter().take(3) {
            eprintln!("only in {}: {k}", b.display());
        }
        println!(
            "NO: {} of {} entries missing or different, {} unexpected",
            missing.len(),
            ea.len(),
            extra.len()
        );
        std::process::exit(1);
    }
    let drift: Vec<i64> = ea
        .iter()
        .map(|(k, t)| i64::from(*t) - i64::from(eb[k]))
        .collect();
    println!(
        "yes: {} entries identical in every attribute (tuples, NAT reply tuple, status, mark, \
         zone, labels, TCP state/window scale/flags, NAT sequence adjustment, helper); \
         remaining timeouts differ by {}..{} s",
        ea.len(),
        drift.iter().min().unwrap_or(&0),
        drift.iter().max().unwrap_or(&0)
    );
    Ok(())
}

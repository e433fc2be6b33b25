//! The demo's QMP driver (`cargo build --example demo-qmp`): the migration
//! steps of a management tool, over the project's own QMP client.
//!
//!   demo-qmp migrate  QMP_SOCKET STREAM   source: migrate into STREAM, wait
//!                                         for completed/failed, print
//!                                         `status=… downtime_ms=… total_ms=…`
//!   demo-qmp incoming QMP_SOCKET STREAM   destination: migrate-incoming from
//!                                         STREAM, wait until the guest runs
//!   demo-qmp status   QMP_SOCKET          print query-status' status
//!   demo-qmp quit     QMP_SOCKET

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use conntrack_vmstate::qmp::QmpClient;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .context("usage: demo-qmp migrate|incoming|status|quit QMP_SOCKET [STREAM]")
    };
    let mut qmp = QmpClient::connect(Path::new(arg(1)?))?;
    match arg(0)? {
        "migrate" => migrate(&mut qmp, arg(2)?),
        "incoming" => incoming(&mut qmp, arg(2)?),
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

fn migrate(qmp: &mut QmpClient, stream: &str) -> anyhow::Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "events", "state": true}]})),
    )?;
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": 1_000_000_000u64})),
    )?;
    // QEMU 7.2 has no file: URI; exec: is what its own tests use
    qmp.execute(
        "migrate",
        Some(json!({"uri": format!("exec:cat > {stream}")})),
    )?;
    let end = Instant::now() + WAIT;
    loop {
        let q = qmp.execute("query-migrate", None)?;
        let st = q.get("status").and_then(Value::as_str).unwrap_or("");
        if matches!(st, "completed" | "failed" | "cancelled") {
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
    qmp.execute(
        "migrate-incoming",
        Some(json!({"uri": format!("exec:cat {stream}")})),
    )?;
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

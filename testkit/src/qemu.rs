//! A real `qemu-system-x86_64` (7.2, TCG, bootless) driven over QMP, and the
//! migration steps of reference §10: source → `exec:cat > stream.bin`,
//! destination `-incoming defer` + `migrate-incoming exec:cat stream.bin`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use conntrack_vmstate::qmp::{QmpClient, QmpError};
use serde_json::{json, Value};

use super::host::{Proc, WAIT};
use super::netns::Netns;

/// How to start one QEMU.
#[derive(Debug, Clone, Default)]
pub struct QemuOpts {
    /// `-object dbus-vmstate,id=dv0,addr=…[,id-list=…]` at start.
    pub vmstate: Option<(String, Option<String>)>,
    /// `-incoming defer`.
    pub incoming: bool,
    /// More arguments, e.g. [`drive_args`] for the disk a snapshot lives in.
    pub extra: Vec<String>,
}

pub struct Qemu {
    pub proc: Proc,
    pub qmp_path: PathBuf,
    qmp: Option<QmpClient>,
}

/// How an outgoing migration ended.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub status: String,
    /// QEMU's reported downtime in ms (completed migrations only).
    pub downtime_ms: Option<u64>,
    pub total_ms: Option<u64>,
    pub query: Value,
}

/// How an incoming migration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Running,
    /// QEMU exited with this code; its output is in the log.
    Exited(Option<i32>),
}

impl Qemu {
    /// Starts QEMU (inside `ns` when given) with its QMP socket at
    /// `<dir>/<name>.qmp` and waits until QMP answers.
    pub fn start(dir: &Path, name: &str, ns: Option<&Netns>, opts: &QemuOpts) -> Qemu {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let mut cmd = match ns {
            Some(ns) => ns.cmd("qemu-system-x86_64"),
            None => Command::new("qemu-system-x86_64"),
        };
        cmd.args([
            "-M",
            "pc",
            "-accel",
            "tcg",
            "-m",
            "32",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-msg",
            "timestamp=on",
            "-trace",
            "enable=dbus_vmstate_*",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if let Some((addr, ids)) = &opts.vmstate {
            let mut o = format!("dbus-vmstate,id=dv0,addr={addr}");
            if let Some(ids) = ids {
                // a comma inside a -object value is written doubled
                o.push_str(&format!(",id-list={}", ids.replace(',', ",,")));
            }
            cmd.arg("-object").arg(o);
        }
        if opts.incoming {
            cmd.args(["-incoming", "defer"]);
        }
        cmd.args(&opts.extra);
        let mut proc = Proc::spawn(name, dir, &mut cmd);
        let end = Instant::now() + WAIT;
        let client = loop {
            if let Some(s) = proc.try_wait() {
                panic!("{name}: QEMU exited {s} at start: {}", proc.output());
            }
            if qmp_path.exists() {
                if let Ok(c) = QmpClient::connect(&qmp_path) {
                    break c;
                }
            }
            assert!(Instant::now() < end, "{name}: no QMP after {WAIT:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        Qemu {
            proc,
            qmp_path,
            qmp: Some(client),
        }
    }

    /// The test's own QMP session. QEMU serves one client at a time, so a
    /// test that wants the CLI's `--qmp` to get through releases it first
    /// with [`release_qmp`](Self::release_qmp).
    pub fn qmp(&mut self) -> &mut QmpClient {
        if self.qmp.is_none() {
            self.qmp = Some(QmpClient::connect(&self.qmp_path).expect("QMP reconnect"));
        }
        self.qmp.as_mut().expect("just set")
    }

    pub fn release_qmp(&mut self) {
        self.qmp = None;
    }

    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.qmp().execute(cmd, args)
    }

    pub fn set_id_list(&mut self, object: &str, ids: &str) {
        self.execute(
            "qom-set",
            Some(
                json!({"path": format!("/objects/{object}"), "property": "id-list", "value": ids}),
            ),
        )
        .expect("qom-set id-list");
    }

    /// `migrate-set-capabilities` with each (capability, state).
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) {
        let caps: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({"capability": c, "state": on}))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": caps })),
        )
        .unwrap_or_else(|e| panic!("migrate-set-capabilities {caps:?}: {e}"));
    }

    /// `migrate-set-parameters` with `params` (an object).
    pub fn set_parameters(&mut self, params: Value) {
        self.execute("migrate-set-parameters", Some(params.clone()))
            .unwrap_or_else(|e| panic!("migrate-set-parameters {params}: {e}"));
    }

    /// `migrate` to `uri`, returning at once (MIGRATION events on).
    pub fn start_migration(&mut self, uri: &str) {
        self.set_capabilities(&[("events", true)]);
        self.execute("migrate", Some(json!({ "uri": uri })))
            .unwrap_or_else(|e| panic!("migrate {uri}: {e}"));
    }

    /// Source side: migrates into `stream` and polls `query-migrate` (bounded)
    /// until completed or failed.
    pub fn migrate_to_file(&mut self, stream: &Path) -> Outgoing {
        // A bootless 32 MiB guest is ~0.65 MB of stream; do not let the
        // default 32 MiB/s throttle stretch the test.
        self.set_parameters(json!({"max-bandwidth": 1_000_000_000u64}));
        self.start_migration(&format!("exec:cat > {}", stream.display()));
        self.wait_migration()
    }

    /// Polls `query-migrate` (bounded) until the outgoing migration is
    /// completed, failed or cancelled.
    pub fn wait_migration(&mut self) -> Outgoing {
        let end = Instant::now() + WAIT;
        loop {
            let q = self.execute("query-migrate", None).expect("query-migrate");
            let status = q
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            // QEMU 7.2 sets "completed" a moment before it stores the
            // times; until then query-migrate reports total-time 0.
            let times_ready = status != "completed"
                || q.get("total-time").and_then(Value::as_u64).unwrap_or(0) > 0;
            if times_ready && (status == "completed" || status == "failed" || status == "cancelled")
            {
                return Outgoing {
                    downtime_ms: q.get("downtime").and_then(Value::as_u64),
                    total_ms: q.get("total-time").and_then(Value::as_u64),
                    status,
                    query: q,
                };
            }
            assert!(
                Instant::now() < end,
                "migration still {status} after {WAIT:?}: {q}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `query-migrate` (bounded) until the outgoing migration is in
    /// `want` (e.g. `active`); panics if it ends first.
    pub fn wait_migration_status(&mut self, want: &str) -> Value {
        let end = Instant::now() + WAIT;
        loop {
            let q = self.execute("query-migrate", None).expect("query-migrate");
            let status = q.get("status").and_then(Value::as_str).unwrap_or("");
            if status == want {
                return q;
            }
            assert!(
                !matches!(status, "completed" | "failed" | "cancelled"),
                "migration ended {status} before it was {want}: {q}"
            );
            assert!(
                Instant::now() < end,
                "migration still {status}, not {want}, after {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// An HMP command through QMP's `human-monitor-command`; returns its
    /// text. HMP reports most failures as text, not as a QMP error.
    pub fn hmp(&mut self, command: &str) -> String {
        let v = self
            .execute(
                "human-monitor-command",
                Some(json!({ "command-line": command })),
            )
            .unwrap_or_else(|e| panic!("HMP {command}: {e}"));
        v.as_str().unwrap_or_default().to_owned()
    }

    /// Destination side: `migrate-incoming` from `uri`, returning at once
    /// (a socket URI listens from then on).
    pub fn start_incoming(&mut self, uri: &str) {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .unwrap_or_else(|e| panic!("migrate-incoming {uri}: {e}"));
    }

    /// Destination side: `migrate-incoming` from `stream`, then waits
    /// (bounded) until the guest runs or QEMU exits.
    pub fn incoming_from_file(&mut self, stream: &Path) -> Incoming {
        self.start_incoming(&format!("exec:cat {}", stream.display()));
        self.wait_running_or_exit(WAIT)
    }

    /// Destination side, after an incoming migration with the `events`
    /// capability: ms from QEMU's MIGRATION "active" (the stream starts
    /// being read) to RESUME (the guest runs), by QEMU's own event
    /// timestamps — reading the stream, dbus-vmstate's Load, resuming.
    pub fn incoming_ms(&mut self) -> f64 {
        let events = self.qmp().take_events();
        let at = |pred: &dyn Fn(&Value) -> bool| {
            events.iter().find(|e| pred(e)).and_then(|e| {
                let ts = e.get("timestamp")?;
                Some(ts.get("seconds")?.as_f64()? * 1e3 + ts.get("microseconds")?.as_f64()? / 1e3)
            })
        };
        let active = at(&|e| e["event"] == "MIGRATION" && e["data"]["status"] == "active");
        let resume = at(&|e| e["event"] == "RESUME");
        match (active, resume) {
            (Some(a), Some(r)) => r - a,
            _ => panic!("destination events incomplete: {events:?}"),
        }
    }

    pub fn wait_running_or_exit(&mut self, timeout: Duration) -> Incoming {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.proc.try_wait() {
                self.qmp = None;
                return Incoming::Exited(s.code());
            }
            match self.execute("query-status", None) {
                Ok(v) if v.get("status").and_then(Value::as_str) == Some("running") => {
                    return Incoming::Running
                }
                Ok(_) => {}
                Err(_) => {
                    // QEMU is exiting: the monitor went away before the
                    // process did.
                    self.qmp = None;
                    if let Some(s) = self.proc.wait_exit(Duration::from_secs(5)) {
                        return Incoming::Exited(s.code());
                    }
                }
            }
            assert!(
                Instant::now() < end,
                "destination neither running nor exited after {timeout:?}: {}",
                self.proc.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `query-status` (bounded) until it is `want`; returns the last
    /// status seen. A migration that fails at its end reports "failed" a
    /// moment before the source's guest leaves "finish-migrate".
    pub fn wait_status(&mut self, want: &str) -> String {
        let end = Instant::now() + WAIT;
        loop {
            let s = self.status();
            if s == want || Instant::now() >= end {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn status(&mut self) -> String {
        self.execute("query-status", None)
            .ok()
            .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_default()
    }

    pub fn output(&self) -> String {
        self.proc.output()
    }
}

/// A new qcow2 image `<dir>/<name>.qcow2` of `mib` MiB: with it attached
/// ([`drive_args`]) `savevm` has somewhere to keep the snapshot.
pub fn qcow2(dir: &Path, name: &str, mib: u32) -> PathBuf {
    let path = dir.join(format!("{name}.qcow2"));
    crate::netns::run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg(format!("{mib}M")),
    );
    path
}

/// `-drive` for `image` with no guest device: a bootless guest needs none,
/// and the block layer still takes snapshots of it.
pub fn drive_args(image: &Path) -> Vec<String> {
    vec![
        "-drive".into(),
        format!("file={},if=none,id=d0,format=qcow2", image.display()),
    ]
}

/// The dbus-vmstate section of a saved stream (reference §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmstateSection {
    /// Offset of `be32 data_size` in the stream.
    pub size_offset: usize,
    /// `data_size` as written (the allocated, power-of-two size).
    pub data_size: usize,
    /// Entries (Id, payload) in stream order.
    pub entries: Vec<(String, Vec<u8>)>,
}

const SECTION_NAME: &[u8] = b"dbus-vmstate/dbus-vmstate";

fn be32(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

/// Finds and decodes the dbus-vmstate section.
pub fn parse_vmstate_section(stream: &[u8]) -> Option<VmstateSection> {
    // 0x04 (SECTION_FULL), be32 section_id, u8 25, name, be32 instance, be32 version
    let name_at = stream
        .windows(SECTION_NAME.len() + 1)
        .position(|w| w[0] as usize == SECTION_NAME.len() && &w[1..] == SECTION_NAME)?;
    if name_at < 5 || stream[name_at - 5] != 0x04 {
        return None;
    }
    let size_offset = name_at + 1 + SECTION_NAME.len() + 8;
    let data_size = be32(stream, size_offset)?;
    let data = stream.get(size_offset + 4..size_offset + 4 + data_size)?;
    let nelem = be32(data, 0)?;
    let mut at = 4;
    let mut entries = Vec::new();
    for _ in 0..nelem {
        let idlen = be32(data, at)?;
        let id = String::from_utf8_lossy(data.get(at + 4..at + 4 + idlen)?).into_owned();
        at += 4 + idlen;
        let len = be32(data, at)?;
        let payload = data.get(at + 4..at + 4 + len)?.to_vec();
        at += 4 + len;
        entries.push((id, payload));
    }
    Some(VmstateSection {
        size_offset,
        data_size,
        entries,
    })
}

/// Returns a copy of `stream` whose dbus-vmstate section carries `entries`
/// instead, laid out and padded as QEMU writes it, so the destination reads
/// exactly these payloads.
pub fn rewrite_vmstate_section(stream: &[u8], entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let sec = parse_vmstate_section(stream).expect("dbus-vmstate section in stream");
    let mut data = Vec::new();
    data.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for (id, payload) in entries {
        data.extend_from_slice(&(id.len() as u32).to_be_bytes());
        data.extend_from_slice(id.as_bytes());
        data.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        data.extend_from_slice(payload);
    }
    let padded = data.len().next_power_of_two().max(16);
    data.resize(padded, 0);
    let mut out = Vec::with_capacity(stream.len() + padded);
    out.extend_from_slice(&stream[..sec.size_offset]);
    out.extend_from_slice(&(padded as u32).to_be_bytes());
    out.extend_from_slice(&data);
    out.extend_from_slice(&stream[sec.size_offset + 4 + sec.data_size..]);
    out
}

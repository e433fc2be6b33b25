//! The project benchmark: our ctnetlink codec, state format
//! and service next to conntrack(8), measured in the same run on the same
//! throw-away network namespaces. Run it with `bench/run` (see
//! bench/README.md); it prints Markdown tables on stdout.
//!
//!   cargo bench --bench vmstate -- [--quick] [--part codec|service|migration]…
//!       [--n N]… [--reps R] [--others N] [--helper]
//!
//! (the binary only runs when given `--bench`, as cargo bench does:
//! `cargo test --all-targets` runs bench targets too).
//!
//! A `[[bench]]` target (harness = false, test = false) rather than an
//! example: it reuses the test kit (testkit/: namespaces, buses, daemons
//! and QEMU processes stopped by PID, namespaces deleted on drop), which
//! finds the package's binaries next to the bench binary, and a bench
//! target is built with them. It is not part of the shipped package.

extern crate testkit as common;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use common::floor::FloorHelper;
use common::host::{wait_name, wait_vmstate_ids, Bus, Host, Proc, MANAGER_NAME};
use common::netns::Netns;
use common::population::{self, Spec};
use common::qemu::{Incoming, Qemu, QemuOpts};
use conntrack_vmstate::access::ConntrackAccess;
use conntrack_vmstate::bus::proxy::{Manager1Proxy, Vm1Proxy, VmState1Proxy};
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::{Entry, Selector};
use conntrack_vmstate::format::{self, EncodeOptions, Format, QEMU_LIMIT};
use zbus::{OwnedVariant, Variant};

#[derive(Parser)]
struct Args {
    /// N = 1k and 5k only, 3 repetitions, fewer migrations (≤ 2 min).
    #[arg(long)]
    quick: bool,
    /// Parts to run (default: all).
    #[arg(long, value_parser = ["codec", "service", "migration", "flow", "flow-silent"])]
    part: Vec<String>,
    /// Repetitions per measurement (default 5, quick 3).
    #[arg(long)]
    reps: Option<usize>,
    /// Entries of other marks on the service/migration hosts.
    #[arg(long, default_value_t = 150_000)]
    others: usize,
    /// Entry counts of the VM (repeatable) for every part, instead of 1k,
    /// 5k, 20k, 100k (quick: 1k, 5k; the quick migration part: 5k).
    #[arg(long = "n", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    n: Vec<u64>,
    /// Service and migration parts: each host's daemon in the packaged
    /// configuration, without any capability, reaching conntrack through a
    /// conntrack-vmstate-helper (CAP_NET_ADMIN only) in the host namespace.
    #[arg(long)]
    helper: bool,
    /// Passed by cargo bench; without it (cargo test) nothing runs.
    #[arg(long, hide = true)]
    bench: bool,
}

const MARK: u32 = 100;

/// How each host's conntrack-vmstated reaches conntrack.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// As root inside the host namespace, netlink (and the warm cache) in
    /// the daemon's own process.
    InProcess,
    /// As packaged: the daemon holds no capability and sends every
    /// conntrack operation to conntrack-vmstate-helper (which keeps the warm
    /// cache) over its unix socket.
    Helper,
}

impl Setup {
    fn label(self) -> &'static str {
        match self {
            Setup::InProcess => "daemon: in-process netlink (root)",
            Setup::Helper => {
                "daemon: capability-less, via conntrack-vmstate-helper (packaged setup)"
            }
        }
    }
}

/// median [min–max] of a sample.
struct Sample(Vec<f64>);

impl Sample {
    fn new() -> Sample {
        Sample(Vec::new())
    }
    fn push(&mut self, v: f64) {
        self.0.push(v);
    }
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }
    fn median(&self) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return f64::NAN;
        }
        if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        }
    }
    fn show(&self) -> String {
        let v = self.sorted();
        match v.len() {
            0 => "–".into(),
            1 => num(v[0]),
            _ => format!(
                "{} [{}–{}]",
                num(self.median()),
                num(v[0]),
                num(v[v.len() - 1])
            ),
        }
    }
}

fn num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Runs conntrack(8) directly inside `ns` (setns before exec, no `ip netns
/// exec` in between: the Perl helper runs in the host's namespace already)
/// and returns its wall time including process start, and its output.
fn conntrack_in(ns: &Netns, args: &[&str]) -> (f64, Output) {
    let (wall, _, out) = conntrack_cpu(ns, args);
    (wall, out)
}

/// CPU time (user + system, ms) of `who` (RUSAGE_THREAD or RUSAGE_CHILDREN).
fn cpu_ms(who: libc::c_int) -> f64 {
    // SAFETY: getrusage writes into the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// As [`conntrack_in`], also returning the process's CPU time (user +
/// system, kernel netlink work included): reaped children's rusage grows by
/// exactly this process, the only child reaped meanwhile.
fn conntrack_cpu(ns: &Netns, args: &[&str]) -> (f64, f64, Output) {
    let f = File::open(ns.path()).expect("open netns");
    let fd = f.as_raw_fd();
    let mut c = Command::new("conntrack");
    c.args(args).stdin(Stdio::null());
    // SAFETY: setns(2) is async-signal-safe; fd stays open until after spawn.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let c0 = cpu_ms(libc::RUSAGE_CHILDREN);
    let t = Instant::now();
    let out = c.output().expect("spawn conntrack");
    let el = ms(t.elapsed());
    let cpu = cpu_ms(libc::RUSAGE_CHILDREN) - c0;
    drop(f);
    assert!(
        out.status.success(),
        "conntrack {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (el, cpu, out)
}

/// A dump of an empty namespace: the fixed, host-wide cost of every dump
/// (ctnetlink walks the hash table shared by all namespaces), which shows
/// how full the rest of the machine's conntrack table is right now.
fn walk_cost(reps: usize) -> Sample {
    let ns = Netns::new("bcempty");
    let c = ct(&ns);
    let mut s = Sample::new();
    for _ in 0..reps {
        let t = Instant::now();
        let d = c.dump(&Selector::mark(MARK)).expect("empty dump");
        s.push(ms(t.elapsed()));
        assert!(d.is_empty());
    }
    s
}

fn ct(ns: &Netns) -> Ctnetlink {
    Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink in netns")
}

fn everything() -> Selector {
    Selector {
        mark: 0,
        mark_mask: 0,
        zone: None,
    }
}

/// The Perl helper's payload from real conntrack(8) output: every `-o save`
/// line with ` --mark N` appended.
fn perl_payload(save: &[u8], mark: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(save.len() + save.len() / 16);
    for l in save.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        out.extend_from_slice(l);
        writeln!(out, " --mark {mark}").expect("vec write");
    }
    out
}

/// Lines of `payload` (whole lines) that fit in QEMU's 1 MiB.
fn lines_in_limit(payload: &[u8]) -> usize {
    let mut used = 0;
    let mut n = 0;
    for l in payload.split_inclusive(|&b| b == b'\n') {
        if used + l.len() > QEMU_LIMIT {
            break;
        }
        used += l.len();
        n += 1;
    }
    n
}

fn create_all(c: &Ctnetlink, entries: &[Entry], what: &str) {
    for chunk in entries.chunks(50_000) {
        let r = c.create(chunk).expect("create");
        assert_eq!(
            r.created + r.existed,
            chunk.len() as u64,
            "{what}: not all created: {r:?}"
        );
    }
}

// ------------------------------------------------------ codec and format

fn part_codec(ns_list: &[usize], reps: usize) {
    println!("## Codec and state format vs conntrack(8)\n");
    println!(
        "Each N: the realistic mix of VM mark {MARK} plus 20 % entries of other marks in a \
         fresh namespace (created with our codec); {reps} repetitions, median [min–max], ms.\n"
    );
    let mut dump_rows = Vec::new();
    let mut fmt_rows = Vec::new();
    let mut size_rows = Vec::new();
    let mut create_rows = Vec::new();
    for &n in ns_list {
        eprintln!("codec: N = {n}");
        let pop = population::generate(Spec::new(n, MARK, 11 + n as u64));
        let empty = walk_cost(reps);
        let src = Netns::new("bcsrc");
        population::enable_labels(&src.name);
        let cs = ct(&src);
        create_all(&cs, &pop.vm_entries, "vm");
        create_all(&cs, &pop.noise_entries, "noise");
        let sel = Selector::mark(MARK);
        let mark = MARK.to_string();

        // Dumps, interleaved so that drift on the shared machine hits all.
        let (mut ours, mut save, mut list) = (Sample::new(), Sample::new(), Sample::new());
        let (mut ours_cpu, mut save_cpu) = (Sample::new(), Sample::new());
        let mut entries = Vec::new();
        let mut save_out = Vec::new();
        for _ in 0..reps {
            let c0 = cpu_ms(libc::RUSAGE_THREAD);
            let t = Instant::now();
            entries = cs.dump(&sel).expect("dump");
            ours.push(ms(t.elapsed()));
            ours_cpu.push(cpu_ms(libc::RUSAGE_THREAD) - c0);
            let (t, c, o) = conntrack_cpu(&src, &["-L", "-m", &mark, "-o", "save"]);
            save.push(t);
            save_cpu.push(c);
            save_out = o.stdout;
            let (t, _) = conntrack_in(&src, &["-L", "-m", &mark]);
            list.push(t);
        }
        assert_eq!(entries.len(), n, "our dump");
        let save_lines = save_out.split(|&b| b == b'\n').filter(|l| !l.is_empty());
        assert_eq!(save_lines.count(), n, "conntrack -o save lines");
        dump_rows.push(format!(
            "| {} | {} | {} | {} | {} | {:.1}× / {:.1}× | {:.0}k | {} / {} ({:.1}×) |",
            thousands(n),
            empty.show(),
            ours.show(),
            save.show(),
            list.show(),
            save.median() / ours.median(),
            list.median() / ours.median(),
            n as f64 / ours.median(),
            num(ours_cpu.median()),
            num(save_cpu.median()),
            save_cpu.median() / ours_cpu.median(),
        ));

        // Encode (records + zstd + checksum) and decode, in-process.
        let unlimited = EncodeOptions {
            limit: usize::MAX,
            format: Format::Binary,
        };
        let (mut enc_t, mut enc1m_t, mut dec_t) = (Sample::new(), Sample::new(), Sample::new());
        let mut blob = Vec::new();
        let mut kept_1m = 0;
        let mut bytes_1m = 0;
        for _ in 0..reps.max(5) {
            let t = Instant::now();
            let e = format::encode(&entries, &unlimited).expect("encode");
            enc_t.push(ms(t.elapsed()));
            blob = e.bytes;
            let t = Instant::now();
            let e = format::encode(&entries, &EncodeOptions::default()).expect("encode 1 MiB");
            enc1m_t.push(ms(t.elapsed()));
            kept_1m = e.kept;
            bytes_1m = e.bytes.len();
            let t = Instant::now();
            let d = format::decode(&blob).expect("decode");
            dec_t.push(ms(t.elapsed()));
            assert_eq!(d.entries.len(), n);
        }
        fmt_rows.push(format!(
            "| {} | {} | {} | {} | {:.1} M/s |",
            thousands(n),
            enc_t.show(),
            enc1m_t.show(),
            dec_t.show(),
            n as f64 / dec_t.median() / 1e3
        ));

        // Sizes: ours, our emitter of the Perl format, real conntrack output.
        let perl = perl_payload(&save_out, MARK);
        let ours_text = format::encode(
            &entries,
            &EncodeOptions {
                limit: usize::MAX,
                format: Format::ConntrackSave,
            },
        )
        .expect("text");
        let ours_text_1m = format::encode(
            &entries,
            &EncodeOptions {
                limit: QEMU_LIMIT,
                format: Format::ConntrackSave,
            },
        )
        .expect("text 1 MiB");
        size_rows.push(format!(
            "| {} | {} | {:.2} | {} ({} B) | {:.1} | {} | {:.1} | {} |",
            thousands(n),
            thousands(blob.len()),
            blob.len() as f64 / n as f64,
            thousands(kept_1m),
            thousands(bytes_1m),
            perl.len() as f64 / n as f64,
            thousands(lines_in_limit(&perl)),
            ours_text.bytes.len() as f64 / n as f64,
            thousands(ours_text_1m.kept),
        ));

        // Create into an empty namespace: ours from the dump, conntrack(8)
        // --load-file of the Perl payload (its `-o save` lines carry no
        // labels, so no line trips 1.4.7's --label-add crash).
        let dst = Netns::new("bcdst");
        population::enable_labels(&dst.name);
        let cd = ct(&dst);
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        std::fs::write(file.path(), &perl).expect("write payload");
        let path = file.path().display().to_string();
        let (mut oc, mut cc) = (Sample::new(), Sample::new());
        let (mut ours_made, mut theirs_made) = (0, 0);
        for _ in 0..reps {
            cd.delete_selected(&everything()).expect("flush");
            let t = Instant::now();
            let r = cd.create(&entries).expect("create");
            oc.push(ms(t.elapsed()));
            ours_made = r.created;
            cd.delete_selected(&everything()).expect("flush");
            let (t, _) = conntrack_in(&dst, &["--load-file", &path]);
            cc.push(t);
            theirs_made = cd.dump(&sel).expect("count").len();
        }
        create_rows.push(format!(
            "| {} | {} | {:.0}k | {} | {:.0}k | {} / {} |",
            thousands(n),
            oc.show(),
            n as f64 / oc.median(),
            cc.show(),
            n as f64 / cc.median(),
            thousands(ours_made as usize),
            thousands(theirs_made),
        ));
        cd.delete_selected(&everything()).expect("flush");
        cs.delete_selected(&everything()).expect("flush");
    }
    println!("### Dump of the VM's entries (mark filter in the kernel)\n");
    println!("| N | empty-namespace dump (host-wide walk, before) | ours (ctnetlink → `Vec<Entry>`) | `conntrack -L -m N -o save` | `conntrack -L -m N` | conntrack(8) ÷ ours (save / default) | ours, entries/s | CPU ms (user + sys, medians): ours / `-o save` |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in dump_rows {
        println!("{r}");
    }
    println!("\nconntrack(8) times are whole processes (spawn included, stdout read into memory), started directly inside the namespace.\n");
    println!("### Encode and decode (state format v1, in-process)\n");
    println!("| N | encode + compress, no limit | encode to 1 MiB (with cut search) | validate + decode | decode rate |");
    println!("|---:|---:|---:|---:|---:|");
    for r in fmt_rows {
        println!("{r}");
    }
    println!("\n### Size: bytes per entry and entries in 1 MiB (1,048,576 B)\n");
    println!("| N | our blob, B | our B/entry | ours: kept in 1 MiB | Perl payload (real `-o save` + ` --mark N`) B/entry | Perl: lines in 1 MiB | our ConntrackSave emitter B/entry | emitter: kept in 1 MiB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in size_rows {
        println!("{r}");
    }
    // Capacity beyond the largest N: the same mix, in memory only (the
    // entries as created, no kernel round trip), cut to 1 MiB.
    let big = population::generate(Spec {
        n: 250_000,
        mark: MARK,
        seed: 99,
        noise: 0.0,
    })
    .vm_entries;
    let e = format::encode(&big, &EncodeOptions::default()).expect("encode 250k");
    let t = format::encode(
        &big,
        &EncodeOptions {
            limit: QEMU_LIMIT,
            format: Format::ConntrackSave,
        },
    )
    .expect("text 250k");
    println!(
        "\nCapacity: of 250,000 entries of the mix (in memory, not dumped), our 1 MiB blob keeps **{}** ({} B, {:.2} B/entry); the Perl format keeps {}.",
        thousands(e.kept),
        thousands(e.bytes.len()),
        e.bytes.len() as f64 / e.kept as f64,
        thousands(t.kept)
    );
    println!("\n### Create into an empty namespace\n");
    println!("| N | ours (batched ctnetlink) ms | ours entries/s | `conntrack --load-file` (Perl payload) ms | conntrack(8) entries/s | created: ours / conntrack(8) |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in create_rows {
        println!("{r}");
    }
    println!("\nconntrack(8)'s `-o save` carries no labels (and no wscale), so its payload has none and its `--load-file` creates fewer attributes than ours; labels also make conntrack 1.4.7 `--load-file` crash, which is moot here.\n");
}

// ------------------------------------------------ Save, Load, migration

/// Blocking D-Bus calls from the benchmark's own thread.
struct Client {
    rt: tokio::runtime::Runtime,
}

impl Client {
    fn new() -> Client {
        Client {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio"),
        }
    }
    fn on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }
}

/// A VM registered with one host's daemon, and proxies to its objects.
struct Vm {
    conn: zbus::Connection,
    name: String,
    id: String,
    path: zbus::OwnedObjectPath,
    unique: String,
}

fn register(cl: &Client, h: &Host, vm: &str) -> Vm {
    register_on(cl, &h.bus.address, vm)
}

fn register_on(cl: &Client, bus: &str, vm: &str) -> Vm {
    register_as(cl, bus, vm, None)
}

/// The migration-scoped flow's first step on one host: the VM registered
/// as known (lifecycle `migration`), then prepared for `role`.
fn prepare(cl: &Client, h: &Host, vm: &str, role: &str) -> Vm {
    register_as(cl, &h.bus.address, vm, Some(role))
}

fn register_as(cl: &Client, bus: &str, vm: &str, role: Option<&str>) -> Vm {
    cl.on(async {
        let conn = zbus::connection::Builder::address(bus)
            .build()
            .await
            .expect("connect");
        let m = Manager1Proxy::new(&conn).await.expect("manager");
        let mut opts = HashMap::from([("bus_address", Variant::from(bus))]);
        if role.is_some() {
            opts.insert("lifecycle", Variant::from("migration"));
        }
        let path = m.register(vm, opts).await.expect("Register");
        if let Some(r) = role {
            let o = HashMap::from([("role", Variant::from(r))]);
            m.prepare(vm, o).await.expect("Prepare");
        }
        let v = Vm1Proxy::builder(&conn)
            .path(path.clone())
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .expect("vm proxy");
        Vm {
            unique: v.unique_name().await.expect("UniqueName"),
            id: v.id().await.expect("Id"),
            conn,
            name: vm.to_owned(),
            path,
        }
    })
}

impl Vm {
    fn save(&self, cl: &Client) -> (f64, Vec<u8>) {
        cl.on(async {
            let vs = VmState1Proxy::builder(&self.conn)
                .destination(self.unique.as_str())
                .build()
                .await
                .expect("vmstate proxy");
            let t = Instant::now();
            let b = vs.save().await.expect("Save");
            (ms(t.elapsed()), b.into_vec())
        })
    }
    fn load(&self, cl: &Client, blob: &[u8]) -> f64 {
        cl.on(async {
            let vs = VmState1Proxy::builder(&self.conn)
                .destination(self.unique.as_str())
                .build()
                .await
                .expect("vmstate proxy");
            let t = Instant::now();
            vs.load(serde_bytes::Bytes::new(blob)).await.expect("Load");
            ms(t.elapsed())
        })
    }
    fn prop(&self, cl: &Client, which: &str) -> HashMap<String, OwnedVariant> {
        cl.on(async {
            let v = Vm1Proxy::builder(&self.conn)
                .path(self.path.clone())
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await
                .expect("vm proxy");
            if which == "LastSave" {
                v.last_save().await.expect("LastSave")
            } else {
                v.last_load().await.expect("LastLoad")
            }
        })
    }
    fn finish(&self, cl: &Client, role: &str) {
        cl.on(async {
            let m = Manager1Proxy::new(&self.conn).await.expect("manager");
            let o = HashMap::from([("role", Variant::from(role))]);
            m.finish(&self.name, o).await.expect("Finish");
        })
    }
    fn unregister(self, cl: &Client) {
        cl.on(async {
            let m = Manager1Proxy::new(&self.conn).await.expect("manager");
            m.unregister(&self.name, HashMap::new())
                .await
                .expect("Unregister");
        })
    }
}

fn get_u64(m: &HashMap<String, OwnedVariant>, k: &str) -> Option<u64> {
    let v = m.get(k)?;
    u64::try_from(v)
        .ok()
        .or_else(|| u32::try_from(v).ok().map(u64::from))
        .or_else(|| i64::try_from(v).ok().map(|x| x.max(0) as u64))
}

fn get_bool(m: &HashMap<String, OwnedVariant>, k: &str) -> Option<bool> {
    m.get(k).and_then(|v| bool::try_from(v).ok())
}

fn get_str(m: &HashMap<String, OwnedVariant>, k: &str) -> Option<String> {
    m.get(k).and_then(|v| String::try_from(v.clone()).ok())
}

/// `others` entries of 20 other marks, as the rest of a busy host.
fn other_entries(others: usize, seed: u64) -> Vec<Entry> {
    let pop = population::generate(Spec {
        n: others,
        mark: 7,
        seed,
        noise: 0.0,
    });
    pop.vm_entries
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e.mark = 7000 + (i % 20) as u32;
            e
        })
        .collect()
}

fn vm_entries(n: usize, mark: u32) -> Vec<Entry> {
    population::generate(Spec {
        n,
        mark,
        seed: 1000 + u64::from(mark),
        noise: 0.0,
    })
    .vm_entries
}

/// Waits (bounded) until `mark` has `n` entries in the namespace.
fn wait_count(c: &Ctnetlink, mark: u32, n: usize, what: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let got = c.dump(&Selector::mark(mark)).expect("dump").len();
        if got == n {
            return;
        }
        assert!(Instant::now() < end, "{what}: {got} of {n} entries");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One sentence for the text above a table.
fn setup_sentence(setup: Setup) -> &'static str {
    match setup {
        Setup::InProcess => {
            "each daemon runs as root inside its host namespace and does netlink (and keeps \
             its warm cache) in its own process"
        }
        Setup::Helper => {
            "each daemon runs without any capability (setpriv: empty bounding set) with \
             `--helper-socket`, and a conntrack-vmstate-helper with only CAP_NET_ADMIN, \
             started inside the host namespace, does every conntrack operation and keeps the \
             warm cache, as the Debian package runs them (without the systemd sandboxing)"
        }
    }
}

/// Panics with the logs if a host's daemon or helper has exited: a crash
/// during the run would otherwise show up only as slow or empty results.
fn check_alive(hs: &mut Hosts) {
    for h in [&mut hs.src, &mut hs.dst] {
        for p in [h.daemon.as_mut(), h.helper.as_mut()].into_iter().flatten() {
            if let Some(s) = p.try_wait() {
                panic!("{} of {} exited {s}: {}", p.name, h.name, p.output());
            }
        }
    }
}

struct Hosts {
    src: Host,
    dst: Host,
    /// A second daemon in the source namespace with `--no-cache`, on its
    /// own bus: Save as a direct dump, for comparison.
    nocache: NoCache,
}

struct NoCache {
    // Drop order: daemon, bus, directory.
    _daemon: Proc,
    bus: Bus,
    _dir: tempfile::TempDir,
}

/// The helper keeps only CAP_NET_ADMIN, as units/conntrack-vmstate-helper.service
/// grants (AmbientCapabilities=, CapabilityBoundingSet=). It stays uid 0
/// (its socket lives in the host's root-owned temp dir): uid 0's exec gets
/// exactly the inheritable and bounding capabilities, here that one.
const HELPER_PRIVS: &[&str] = &[
    "setpriv",
    "--inh-caps=-all,+net_admin",
    "--bounding-set=-all,+net_admin",
    "--",
];

/// The daemon holds no capability at all (the packaged unit's empty
/// CapabilityBoundingSet=). uid 0 only so that it can reach the root-owned
/// temp dir, bus and helper socket, as its own user reaches its own on a
/// real host; without CAP_NET_ADMIN the kernel refuses it ctnetlink.
const DAEMON_PRIVS: &[&str] = &[
    "setpriv",
    "--inh-caps=-all",
    "--bounding-set=-all",
    "--no-new-privs",
    "--",
];

const CAP_NET_ADMIN: u64 = 1 << 12;

/// (CapPrm, CapEff) of a running process.
fn caps(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no {k} in /proc/{pid}/status"))
    };
    (field("CapPrm:"), field("CapEff:"))
}

/// Asserts that `p` is the binary itself (setpriv and `ip netns exec`
/// exec'd into it) and holds exactly `want` as permitted and effective
/// capabilities: the table must not claim a configuration that did not run.
fn assert_caps(p: &Proc, binary: &str, want: u64) {
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", p.pid())).unwrap_or_default();
    // comm is cut to 15 bytes.
    let head = &binary[..binary.len().min(15)];
    assert_eq!(comm.trim_end(), head, "{} (PID {})", p.name, p.pid());
    let (prm, eff) = caps(p.pid());
    assert!(
        prm == want && eff == want,
        "{} (PID {}): CapPrm {prm:#x}, CapEff {eff:#x}, expected {want:#x}",
        p.name,
        p.pid()
    );
}

fn hosts(others: usize, setup: Setup) -> Hosts {
    let mut src = Host::new("bsvsrc");
    let mut dst = Host::new("bsvdst");
    for (h, seed) in [(&mut src, 1u64), (&mut dst, 2)] {
        population::enable_labels(&h.ns.name);
        create_all(&ct(&h.ns), &other_entries(others, seed), "others");
        match setup {
            Setup::InProcess => h.start_daemon(),
            Setup::Helper => {
                let sock = h.start_helper(HELPER_PRIVS);
                let bus = h.bus.address.clone();
                let sock = sock.display().to_string();
                h.start_daemon_with(&bus, DAEMON_PRIVS, &["--helper-socket", &sock]);
                let helper = h.helper.as_ref().expect("helper started");
                assert_caps(helper, "conntrack-vmstate-helper", CAP_NET_ADMIN);
                let daemon = h.daemon.as_ref().expect("daemon started");
                assert_caps(daemon, "conntrack-vmstated", 0);
            }
        }
    }
    let dir = tempfile::Builder::new()
        .prefix(&format!("cvs-bsvnc-{}-", std::process::id()))
        .tempdir()
        .expect("tempdir");
    let bus = Bus::start(dir.path());
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let mut cmd = src.ns.cmd(env!("CARGO_BIN_EXE_conntrack-vmstated"));
    cmd.arg("--bus-address")
        .arg(&bus.address)
        .arg("--state-dir")
        .arg(&state)
        .args(["--idle-timeout", "0", "--in-process", "--no-cache"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let daemon = Proc::spawn("daemon-nocache", dir.path(), &mut cmd);
    wait_name(&bus.address, MANAGER_NAME, Duration::from_secs(60));
    Hosts {
        src,
        dst,
        nocache: NoCache {
            _daemon: daemon,
            bus,
            _dir: dir,
        },
    }
}

fn part_service(hs: &mut Hosts, ns_list: &[usize], reps: usize, others: usize, setup: Setup) {
    println!(
        "## Save and Load as D-Bus calls, host table with {} other entries ({})\n",
        thousands(others),
        setup.label()
    );
    println!(
        "Two hosts (namespaces), each with {} entries of 20 other marks, its own dbus-daemon and \
         conntrack-vmstated (release); {}. Client: zbus, timing around the method call. {reps} \
         repetitions, median [min–max], ms.\n",
        thousands(others),
        setup_sentence(setup)
    );
    println!(
        "Dump of an empty namespace with these hosts up (host-wide walk): {} ms.\n",
        walk_cost(reps).show()
    );
    let cl = Client::new();
    let cs = ct(&hs.src.ns);
    let cd = ct(&hs.dst.ns);
    let mut save_rows = Vec::new();
    let mut load_rows = Vec::new();
    for (i, &n) in ns_list.iter().enumerate() {
        eprintln!("service: N = {n}");
        // Realistic case: registered (cache warm) before the VM's
        // connections exist, so its entries send events.
        let mark = 300 + i as u32;
        let vm = register(&cl, &hs.src, &mark.to_string());
        let ncvm = register_on(&cl, &hs.nocache.bus.address, &mark.to_string());
        std::thread::sleep(Duration::from_millis(500));
        let entries = vm_entries(n, mark);
        create_all(&cs, &entries, "vm");
        std::thread::sleep(Duration::from_millis(1000));
        // Direct dump, in-process, for reference (what an uncached Save does
        // before encoding).
        let (mut save_t, mut ssave_t, mut direct_t) = (Sample::new(), Sample::new(), Sample::new());
        let mut nc_t = Sample::new();
        let mut blob = Vec::new();
        for _ in 0..reps {
            let (t, b) = vm.save(&cl);
            save_t.push(t);
            blob = b;
            let (t, _) = ncvm.save(&cl);
            nc_t.push(t);
            let t = Instant::now();
            let d = cs.dump(&Selector::mark(mark)).expect("direct");
            direct_t.push(ms(t.elapsed()));
            // TIME_WAIT entries (30–120 s) may expire during a long run.
            assert!(d.len() * 100 >= n * 98, "direct dump: {} of {n}", d.len());
        }
        let last = vm.prop(&cl, "LastSave");
        let daemon_us = get_u64(&last, "duration_us").unwrap_or(0);
        let nclast = ncvm.prop(&cl, "LastSave");
        // Churn since the pre-encoded base: 1 % of the entries deleted and
        // as many new ones (2 % changes, below the 1/32 that makes the
        // daemon rebuild the base), so these Saves carry a delta and a
        // skip list.
        let churn = n / 100;
        let gone: Vec<Entry> = entries.iter().take(churn).cloned().collect();
        cs.delete_entries(&gone).expect("churn: delete");
        let fresh: Vec<Entry> = vm_entries(n + churn, mark + 1000)
            .into_iter()
            .take(churn)
            .map(|mut e| {
                e.mark = mark;
                e
            })
            .collect();
        let made = cs.create(&fresh).expect("churn: create");
        std::thread::sleep(Duration::from_millis(300));
        let mut churn_t = Sample::new();
        for _ in 0..reps {
            let (t, b) = vm.save(&cl);
            churn_t.push(t);
            let got = format::decode(&b)
                .expect("decode churned Save")
                .entries
                .len();
            let want = n - churn + made.created as usize;
            assert!(
                got * 100 >= want * 98 && got <= want,
                "churned Save: {got} of {want}"
            );
        }
        let clast = vm.prop(&cl, "LastSave");
        vm.unregister(&cl);
        ncvm.unregister(&cl);
        // One VM's entries at a time: 150k + 2 × 100k would pass the
        // kernel's nf_conntrack_max (262,144 here, read-only in a netns).
        cs.delete_selected(&Selector::mark(mark)).expect("flush");
        // Silent case: entries made without the event extension
        // (nf_conntrack_events = 0 while they are created, like entries
        // made before any listener existed), registered afterwards.
        let smark = 600 + i as u32;
        hs.src.ns.set_conntrack_events(0);
        create_all(&cs, &vm_entries(n, smark), "silent vm");
        hs.src.ns.set_conntrack_events(2);
        let svm = register(&cl, &hs.src, &smark.to_string());
        std::thread::sleep(Duration::from_millis(1500));
        for _ in 0..reps {
            let (t, b) = svm.save(&cl);
            ssave_t.push(t);
            let got = format::decode(&b)
                .expect("decode silent Save")
                .entries
                .len();
            assert!(got * 100 >= n * 98, "silent Save: {got} of {n}");
        }
        let slast = svm.prop(&cl, "LastSave");
        let kept = format::decode(&blob).expect("decode Save").entries.len();
        save_rows.push(format!(
            "| {} | {} ({}, last {:.1} in the daemon) | {} ({}, last {:.1} in the daemon) | {} ({}) | {} ({}) | {} | {} B, {} entries |",
            thousands(n),
            save_t.show(),
            get_str(&last, "source").unwrap_or_else(|| "–".into()),
            daemon_us as f64 / 1e3,
            churn_t.show(),
            get_str(&clast, "source").unwrap_or_else(|| "–".into()),
            get_u64(&clast, "duration_us").unwrap_or(0) as f64 / 1e3,
            nc_t.show(),
            get_str(&nclast, "source").unwrap_or_else(|| "–".into()),
            ssave_t.show(),
            get_str(&slast, "source").unwrap_or_else(|| "–".into()),
            direct_t.show(),
            thousands(blob.len()),
            thousands(kept),
        ));
        svm.unregister(&cl);
        cs.delete_selected(&Selector::mark(smark)).expect("flush");

        // Load on the destination: reply, then full restore (LastLoad).
        let dvm = register(&cl, &hs.dst, &mark.to_string());
        let (mut reply_t, mut full_t) = (Sample::new(), Sample::new());
        let mut sync_n = String::from("–");
        for _ in 0..reps {
            cd.delete_selected(&Selector::mark(mark)).expect("flush");
            let before = dvm.prop(&cl, "LastLoad");
            let t0 = Instant::now();
            let t = dvm.load(&cl, &blob);
            reply_t.push(t);
            // Bounded wait for the report of this Load to be complete.
            let end = Instant::now() + Duration::from_secs(120);
            let rep = loop {
                let r = dvm.prop(&cl, "LastLoad");
                let fresh =
                    get_u64(&r, "timestamp") != get_u64(&before, "timestamp") || before.is_empty();
                let pending = get_bool(&r, "pending").unwrap_or(false);
                if fresh && !pending {
                    break r;
                }
                assert!(Instant::now() < end, "Load not complete: {r:?}");
                std::thread::sleep(Duration::from_millis(5));
            };
            let full = get_u64(&rep, "complete_us")
                .filter(|&us| us > 0)
                .or_else(|| get_u64(&rep, "duration_us"))
                .map(|us| us as f64 / 1e3)
                .unwrap_or_else(|| ms(t0.elapsed()));
            full_t.push(full.max(t));
            if let Some(s) = get_u64(&rep, "created_sync") {
                sync_n = thousands(s as usize);
            }
            let made = get_u64(&rep, "created").unwrap_or(0) as usize;
            assert_eq!(made, kept, "Load created {made} of {kept}: {rep:?}");
        }
        wait_count(&cd, mark, kept, "restored");
        load_rows.push(format!(
            "| {} | {} | {} | {} | {:.0}k |",
            thousands(kept),
            reply_t.show(),
            sync_n,
            full_t.show(),
            kept as f64 / full_t.median(),
        ));
        dvm.unregister(&cl);
        cd.delete_selected(&Selector::mark(mark)).expect("flush");
    }
    check_alive(hs);
    println!(
        "### Save (`org.qemu.VMState1.Save` on the VM's connection; {})\n",
        setup.label()
    );
    println!("| N | Save, warm cache, registered before the entries existed (LastSave source) | same VM after 1 % of its entries were deleted and 1 % created (base + delta) | Save, daemon with `--no-cache`, always in-process (source) | Save, warm cache, entries older than any listener (\"silent\") (source) | direct dump in-process, no encode, no D-Bus | blob |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for r in save_rows {
        println!("{r}");
    }
    println!(
        "\n### Load (`org.qemu.VMState1.Load` of that blob into the destination; {})\n",
        setup.label()
    );
    println!("| entries | Load reply | created before the reply | full restore (LastLoad) | full restore entries/s |");
    println!("|---:|---:|---:|---:|---:|");
    for r in load_rows {
        println!("{r}");
    }
    println!();
}

// ------------------------------------------------------------ migration

struct Mig {
    downtime: f64,
    total: f64,
    incoming: f64,
}

/// One migration src → dst through a stream file, fresh QEMUs each time.
/// `vmstate`: Ids of the dbus-vmstate objects (None: no object at all).
fn migrate_once(hs: &mut Hosts, k: usize, vmstate: Option<&str>) -> Mig {
    migrate_pair(&hs.src, &hs.dst, k, vmstate)
}

/// [`migrate_once`] between any two hosts.
fn migrate_pair(src: &Host, dst: &Host, k: usize, vmstate: Option<&str>) -> Mig {
    let mk = |h: &Host, incoming: bool| QemuOpts {
        vmstate: vmstate.map(|id| (h.bus.address.clone(), Some(id.to_owned()))),
        incoming,
        ..Default::default()
    };
    let so = mk(src, false);
    let dopt = mk(dst, true);
    let mut sq = Qemu::start(src.path(), &format!("q{k}s"), Some(&src.ns), &so);
    let mut dq = Qemu::start(dst.path(), &format!("q{k}d"), Some(&dst.ns), &dopt);
    let stream = src.path().join(format!("stream{k}.bin"));
    let out = sq.migrate_to_file(&stream);
    assert_eq!(out.status, "completed", "migration: {}", out.query);
    dq.execute(
        "migrate-set-capabilities",
        Some(serde_json::json!({"capabilities": [{"capability": "events", "state": true}]})),
    )
    .expect("destination events");
    let inc = dq.incoming_from_file(&stream);
    assert_eq!(inc, Incoming::Running, "destination: {}", dq.output());
    let incoming = dq.incoming_ms();
    let _ = std::fs::remove_file(&stream);
    drop(sq);
    drop(dq);
    Mig {
        downtime: out.downtime_ms.unwrap_or(0) as f64,
        total: out.total_ms.unwrap_or(0) as f64,
        incoming,
    }
}

fn part_migration(hs: &mut Hosts, ns_list: &[usize], reps: usize, setup: Setup) {
    println!(
        "## QEMU-reported downtime of a real migration ({})\n",
        setup.label()
    );
    println!(
        "QEMU 7.2 (TCG, 32 MiB, bootless) in each host namespace, stream through a file \
         (`exec:cat`), fresh QEMUs per migration; {}. *downtime* is what the source's \
         `query-migrate` reports (guest stop → end of the stream: includes Save, not the \
         destination's Load); *incoming* is the destination's MIGRATION \"active\" → RESUME \
         event timestamps (reading the stream, Load, resume). *Save* and *Load reply* are the \
         daemons' own LastSave / LastLoad `duration_us` of the same migrations (call received → \
         answer sent), the part of the added time spent in conntrack-vmstated{}; the rest is \
         QEMU, D-Bus and the stream. {reps} repetitions, median [min–max], ms.\n",
        setup_sentence(setup),
        if setup == Setup::Helper {
            " and its helper"
        } else {
            ""
        }
    );
    let cl = Client::new();
    let cs = ct(&hs.src.ns);
    let cd = ct(&hs.dst.ns);
    let mut rows = Vec::new();
    let mut k = 0;
    for (i, &n) in ns_list.iter().enumerate() {
        eprintln!("migration: N = {n}");
        let mark = 900 + i as u32;
        let vm = register(&cl, &hs.src, &mark.to_string());
        let dvm = register(&cl, &hs.dst, &mark.to_string());
        wait_vmstate_ids(
            &hs.src.bus.address,
            &[vm.id.as_str()],
            Duration::from_secs(30),
        );
        wait_vmstate_ids(
            &hs.dst.bus.address,
            &[dvm.id.as_str()],
            Duration::from_secs(30),
        );
        std::thread::sleep(Duration::from_millis(500));
        create_all(&cs, &vm_entries(n, mark), "vm");
        std::thread::sleep(Duration::from_millis(1000));
        let mark_s = mark.to_string();
        let (mut none_d, mut none_i) = (Sample::new(), Sample::new());
        let (mut svc_d, mut svc_i) = (Sample::new(), Sample::new());
        let (mut ct_save, mut ct_load) = (Sample::new(), Sample::new());
        let (mut arrived, mut saved) = (0, 0);
        let (mut our_save, mut our_load) = (Sample::new(), Sample::new());
        let mut save_source = String::from("–");
        let mut totals = Sample::new();
        for _ in 0..reps {
            k += 1;
            let m = migrate_once(hs, k, None);
            none_d.push(m.downtime);
            none_i.push(m.incoming);
            k += 1;
            cd.delete_selected(&Selector::mark(mark)).expect("flush");
            let before = dvm.prop(&cl, "LastLoad");
            let before_save = vm.prop(&cl, "LastSave");
            let m = migrate_once(hs, k, Some(&vm.id));
            svc_d.push(m.downtime);
            svc_i.push(m.incoming);
            totals.push(m.total);
            // Load may finish in the background after the reply: wait for
            // this migration's report to be complete, then count.
            let end = Instant::now() + Duration::from_secs(60);
            let load = loop {
                let r = dvm.prop(&cl, "LastLoad");
                let fresh = get_u64(&r, "timestamp") != get_u64(&before, "timestamp");
                if fresh && !get_bool(&r, "pending").unwrap_or(false) {
                    break r;
                }
                assert!(Instant::now() < end, "Load not complete: {r:?}");
                std::thread::sleep(Duration::from_millis(20));
            };
            arrived = cd.dump(&Selector::mark(mark)).expect("dump").len();
            let save = vm.prop(&cl, "LastSave");
            assert_ne!(
                get_u64(&save, "timestamp"),
                get_u64(&before_save, "timestamp"),
                "no Save recorded for this migration: {save:?}"
            );
            saved = get_u64(&save, "entries").unwrap_or(0) as usize;
            let us = |r: &HashMap<String, OwnedVariant>, what: &str| {
                get_u64(r, "duration_us")
                    .unwrap_or_else(|| panic!("{what} without duration_us: {r:?}"))
            };
            our_save.push(us(&save, "LastSave") as f64 / 1e3);
            // duration_us of a Load is the time to its reply (complete_us
            // is the full restore, which may end after the guest resumed).
            our_load.push(us(&load, "LastLoad") as f64 / 1e3);
            save_source = get_str(&save, "source").unwrap_or_else(|| "–".into());
            // The Perl helper's pipeline, conntrack(8) timed alone: `-L -o
            // save` on the source inside Save, `--load-file` of the payload
            // on the destination inside Load.
            let (t, o) = conntrack_in(&hs.src.ns, &["-L", "-m", &mark_s, "-o", "save"]);
            ct_save.push(t);
            let file = tempfile::NamedTempFile::new().expect("tempfile");
            std::fs::write(file.path(), perl_payload(&o.stdout, mark)).expect("payload");
            cd.delete_selected(&Selector::mark(mark)).expect("flush");
            let path = file.path().display().to_string();
            let (t, _) = conntrack_in(&hs.dst.ns, &["--load-file", &path]);
            ct_load.push(t);
        }
        let added_src = svc_d.median() - none_d.median();
        let added_dst = svc_i.median() - none_i.median();
        rows.push(format!(
            "| {} | {} | {} / {} | {} / {} | {:+.0} / {:+.0} = {:+.0} | {} ({}) / {} | {:+.0} / {:+.0} | {} / {} | {:+.0} | {} / {} |",
            thousands(n),
            reps,
            none_d.show(),
            none_i.show(),
            svc_d.show(),
            svc_i.show(),
            added_src,
            added_dst,
            added_src + added_dst,
            our_save.show(),
            save_source,
            our_load.show(),
            added_src - our_save.median(),
            added_dst - our_load.median(),
            ct_save.show(),
            ct_load.show(),
            ct_save.median() + ct_load.median(),
            thousands(saved),
            thousands(arrived),
        ));
        vm.unregister(&cl);
        dvm.unregister(&cl);
        cs.delete_selected(&Selector::mark(mark)).expect("flush");
        cd.delete_selected(&Selector::mark(mark)).expect("flush");
    }
    check_alive(hs);
    println!("| N | reps | no dbus-vmstate: downtime / incoming | with conntrack-vmstated: downtime / incoming | added by the service (medians): source + destination | of which in our daemon: Save `duration_us` (LastSave source, last rep) / Load reply `duration_us` | rest, QEMU + D-Bus (added − ours, medians): source / destination | conntrack(8) pipeline: `-L -o save` / `--load-file` | added by conntrack(8) (sum of medians) | entries saved / on the destination after our migration (last rep) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!("{r}");
    }
    println!("\nThe conntrack(8) pipeline is not run inside a migration: its two commands are timed on the same hosts and entries and their medians added to the no-dbus-vmstate migration (the Perl helper runs exactly these inside Save and Load, plus its own D-Bus marshalling, measured at ~1–2.5 s per MiB in measured-baselines.md §5, not added here).\n");
}

/// How a VM's entries came to be before it was registered.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Created while the namespace reports conntrack events
    /// (`nf_conntrack_events=1`, as the package sets it from boot on).
    Events,
    /// Created while `nf_conntrack_events=0` (or before the package): the
    /// kernel never reports their updates or their end.
    Silent,
}

/// Starts a host's daemon (and, packaged, its helper) as a migration-time
/// orchestrator finds it: not running, nothing warm.
fn start_fresh(h: &mut Host, setup: Setup) {
    match setup {
        Setup::InProcess => h.start_daemon(),
        Setup::Helper => {
            let sock = h.start_helper(HELPER_PRIVS);
            let bus = h.bus.address.clone();
            let sock = sock.display().to_string();
            h.start_daemon_with(&bus, DAEMON_PRIVS, &["--helper-socket", &sock]);
        }
    }
}

/// SIGTERM to the daemon, then the helper, as `systemctl stop` sends it;
/// waits for each to exit within the unit's TimeoutStopSec (90 s). Returns
/// how long the daemon took to exit.
fn stop_host(h: &mut Host) -> f64 {
    let mut took = 0.0;
    for p in [h.daemon.take(), h.helper.take()].into_iter().flatten() {
        let mut p = p;
        let t = Instant::now();
        let pid = nix::unistd::Pid::from_raw(p.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let st = p.wait_exit(Duration::from_secs(90));
        assert!(
            st.is_some(),
            "{} did not exit within 90 s of SIGTERM",
            p.name
        );
        if took == 0.0 {
            took = ms(t.elapsed());
        }
    }
    took
}

/// The flow real orchestrators run (Proxmox VE starts its helper at
/// migration time and stops it right after), migration-scoped: the VM's
/// entries exist before anything serves it, the daemons start fresh, the
/// migration starts as soon as Prepare returned on both hosts, and right
/// after it both hosts Finish and both daemons get SIGTERM. Then the destination must hold
/// every entry, attribute-exact. Next to it, in the same repetitions, the
/// same migration without any dbus-vmstate object.
fn part_flow(ns_list: &[usize], reps: usize, others: usize, setup: Setup, origin: Origin) {
    println!(
        "## Orchestrated flow: entries before Prepare, daemons started for the migration and \
         stopped right after ({}; entries {})\n",
        setup.label(),
        match origin {
            Origin::Events => "created with nf_conntrack_events=1",
            Origin::Silent => "created with nf_conntrack_events=0 (\"silent\")",
        }
    );
    println!(
        "Each host namespace holds {} entries of 20 other marks; {}. Per repetition: the \
         migration without dbus-vmstate (fresh QEMUs, as in the migration part), then fresh \
         daemons on both hosts, Register (lifecycle migration) and Prepare on the source and \
         the destination (*prepare* = the four calls until they returned, i.e. until Save would \
         be fast), at once the migration with dbus-vmstate, right after it Finish on both hosts \
         (the source's flushes what Save took) and SIGTERM to both daemons \
         (*stop* = SIGTERM → exit of the destination's daemon), then the destination's entries \
         of the VM compared attribute by attribute with the source's taken before the \
         migration (all of them, every repetition). *downtime* / *incoming* as in the migration \
         part. *Floor*: right after the baseline, the same migration with a dbus-vmstate helper \
         that costs nothing (`testkit::floor`: Save answers with the VM's state encoded \
         beforehand, the same bytes ours sends; Load drops its data) on the same buses: what \
         QEMU, dbus-daemon and the stream add for that many bytes, under any helper. \
         {reps} repetitions, median [min–max], ms.\n",
        thousands(others),
        setup_sentence(setup)
    );
    let mut src = Host::new("bflsrc");
    let mut dst = Host::new("bfldst");
    for (h, seed) in [(&src, 1u64), (&dst, 2)] {
        population::enable_labels(&h.ns.name);
        h.ns.set_conntrack_events(1);
        create_all(&ct(&h.ns), &other_entries(others, seed), "others");
    }
    let cl = Client::new();
    let cs = ct(&src.ns);
    let cd = ct(&dst.ns);
    let mut rows = Vec::new();
    let mut k = 0;
    for (i, &n) in ns_list.iter().enumerate() {
        eprintln!("flow: N = {n}");
        let mark = 800 + i as u32;
        let started = Instant::now();
        let (mut none_d, mut none_i) = (Sample::new(), Sample::new());
        let (mut svc_d, mut svc_i) = (Sample::new(), Sample::new());
        let (mut floor_d, mut floor_i) = (Sample::new(), Sample::new());
        let mut floor_bytes = 0;
        let (mut reg, mut stop) = (Sample::new(), Sample::new());
        let (mut our_save, mut our_load) = (Sample::new(), Sample::new());
        let mut sources = Vec::new();
        let mut arrived = Vec::new();
        for _ in 0..reps {
            // The VM's entries exist before anything serves it; Finish on
            // the source flushed the previous repetition's.
            if origin == Origin::Silent {
                src.ns.set_conntrack_events(0);
            }
            create_all(&cs, &vm_entries(n, mark), "vm");
            src.ns.set_conntrack_events(1);
            let before = src.dump(mark);
            assert_eq!(before.len(), n, "VM entries on the source");
            k += 1;
            let m = migrate_pair(&src, &dst, k, None);
            none_d.push(m.downtime);
            none_i.push(m.incoming);
            let state = format::encode(
                &before,
                &EncodeOptions {
                    limit: QEMU_LIMIT,
                    format: Format::Binary,
                },
            )
            .expect("encode the floor's state");
            floor_bytes = state.bytes.len();
            let (fs, fd) = (
                FloorHelper::serve(&src.bus.address, "floor", state.bytes),
                FloorHelper::serve(&dst.bus.address, "floor", Vec::new()),
            );
            k += 1;
            let m = migrate_pair(&src, &dst, k, Some("floor"));
            assert_eq!(
                (fs.calls(), fd.calls()),
                ((1, 0), (0, 1)),
                "floor helper calls"
            );
            drop((fs, fd));
            floor_d.push(m.downtime);
            floor_i.push(m.incoming);
            start_fresh(&mut src, setup);
            start_fresh(&mut dst, setup);
            let t = Instant::now();
            let vm = prepare(&cl, &src, &mark.to_string(), "source");
            let dvm = prepare(&cl, &dst, &mark.to_string(), "destination");
            reg.push(ms(t.elapsed()));
            k += 1;
            let m = migrate_pair(&src, &dst, k, Some(&vm.id));
            svc_d.push(m.downtime);
            svc_i.push(m.incoming);
            let save = vm.prop(&cl, "LastSave");
            let load = dvm.prop(&cl, "LastLoad");
            vm.finish(&cl, "source");
            dvm.finish(&cl, "destination");
            assert!(src.dump(mark).is_empty(), "Finish did not flush the source");
            stop_host(&mut src);
            stop.push(stop_host(&mut dst));
            let us = |r: &HashMap<String, OwnedVariant>, what: &str| {
                get_u64(r, "duration_us")
                    .unwrap_or_else(|| panic!("{what} without duration_us: {r:?}"))
            };
            our_save.push(us(&save, "LastSave") as f64 / 1e3);
            our_load.push(us(&load, "LastLoad") as f64 / 1e3);
            sources.push(get_str(&save, "source").unwrap_or_else(|| "–".into()));
            // Nothing runs any more on the destination: what is there now
            // is what the VM keeps.
            let got = dst.dump(mark);
            arrived.push(got.len());
            let age = started.elapsed().as_secs() as u32 + 5;
            common::host::assert_same_entries(
                &format!("flow N={n}: destination after both daemons stopped"),
                &before,
                &got,
                age,
            );
            cd.delete_selected(&Selector::mark(mark)).expect("flush");
            cs.delete_selected(&Selector::mark(mark)).expect("flush");
        }
        let added_src = svc_d.median() - none_d.median();
        let added_dst = svc_i.median() - none_i.median();
        let floor_src = floor_d.median() - none_d.median();
        let floor_dst = floor_i.median() - none_i.median();
        sources.sort();
        sources.dedup();
        rows.push(format!(
            "| {} | {} | {} / {} | {} / {} ({} B): {:+.0} / {:+.0} = {:+.0} | {} | {} / {} | {:+.0} / {:+.0} = **{:+.0}** | {:+.0} | {} ({}) / {} | {} | {} of {} in every rep |",
            thousands(n),
            reps,
            none_d.show(),
            none_i.show(),
            floor_d.show(),
            floor_i.show(),
            thousands(floor_bytes),
            floor_src,
            floor_dst,
            floor_src + floor_dst,
            reg.show(),
            svc_d.show(),
            svc_i.show(),
            added_src,
            added_dst,
            added_src + added_dst,
            added_src + added_dst - floor_src - floor_dst,
            our_save.show(),
            sources.join(", "),
            our_load.show(),
            stop.show(),
            thousands(*arrived.iter().min().unwrap_or(&0)),
            thousands(n),
        ));
    }
    println!("| N | reps | no dbus-vmstate: downtime / incoming | floor, a helper that costs nothing with the same state: downtime / incoming (bytes): added source / destination = sum | prepare (both hosts) | with conntrack-vmstated: downtime / incoming | added (medians): source + destination | added above the floor | ours: Save `duration_us` (LastSave source) / Load reply `duration_us` | stop (destination daemon, SIGTERM → exit) | on the destination after both daemons stopped, attribute-exact |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!("{r}");
    }
    println!();
}

/// Every namespace's table is bounded by the host-wide nf_conntrack_max
/// (read-only inside a namespace): the codec part holds N + 20 %, a host N +
/// the other marks' entries. Refuse up front instead of failing a create
/// half-way through the run.
fn check_table_room(ns_list: &[usize], others: usize, hosts: bool) -> Result<(), String> {
    let path = "/proc/sys/net/netfilter/nf_conntrack_max";
    let max: usize = std::fs::read_to_string(path)
        .map_err(|e| format!("{path}: {e} (is nf_conntrack loaded?)"))?
        .trim()
        .parse()
        .map_err(|e| format!("{path}: {e}"))?;
    let n = ns_list.iter().copied().max().unwrap_or(0);
    let need = if hosts {
        (n + n / 5).max(n + others)
    } else {
        n + n / 5
    };
    if need > max {
        return Err(format!(
            "N = {n} needs {need} conntrack entries in one namespace (N + 20 % for the codec \
             part, N + --others {others} on a host); nf_conntrack_max is {max}"
        ));
    }
    Ok(())
}

fn main() {
    let a = Args::parse();
    // `cargo test --all-targets` runs bench targets too, without --bench:
    // the benchmark takes minutes and needs root, so it only runs when
    // cargo bench (or bench/run) asks for it.
    if !a.bench {
        eprintln!("vmstate bench: not run (run `bench/run` or `cargo bench --bench vmstate`)");
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("vmstate bench: run as root (network namespaces, conntrack)");
        std::process::exit(1);
    }
    let reps = a.reps.unwrap_or(if a.quick { 3 } else { 5 });
    let mut chosen: Vec<usize> = a.n.iter().map(|&n| n as usize).collect();
    chosen.sort_unstable();
    chosen.dedup();
    let ns_list: Vec<usize> = if !chosen.is_empty() {
        chosen.clone()
    } else if a.quick {
        vec![1_000, 5_000]
    } else {
        vec![1_000, 5_000, 20_000, 100_000]
    };
    let all = a.part.is_empty();
    let want = |p: &str| all || a.part.iter().any(|x| x == p);
    let others = if a.quick {
        a.others.min(30_000)
    } else {
        a.others
    };
    let setup = if a.helper {
        Setup::Helper
    } else {
        Setup::InProcess
    };
    if let Err(e) = check_table_room(
        &ns_list,
        others,
        ["service", "migration", "flow", "flow-silent"]
            .into_iter()
            .any(want),
    ) {
        eprintln!("vmstate bench: {e}");
        std::process::exit(2);
    }
    if want("codec") {
        part_codec(&ns_list, reps);
    }
    if want("service") || want("migration") {
        eprintln!("hosts: {others} other entries each; {}", setup.label());
        let mut hs = hosts(others, setup);
        if want("service") {
            part_service(&mut hs, &ns_list, reps, others, setup);
        }
        if want("migration") {
            let mig_n: Vec<usize> = if a.quick && chosen.is_empty() {
                vec![5_000]
            } else {
                ns_list.clone()
            };
            // QEMU's downtime figures scatter by several ms between
            // migrations on a small machine: more repetitions for their
            // medians.
            let mig_reps = if a.quick || a.reps.is_some() { reps } else { 9 };
            part_migration(&mut hs, &mig_n, mig_reps, setup);
        }
    }
    // Fresh hosts of its own: its daemons start and stop every repetition.
    let flow_n: Vec<usize> = if chosen.is_empty() {
        if a.quick {
            vec![5_000]
        } else {
            vec![5_000, 100_000]
        }
    } else {
        ns_list.clone()
    };
    let flow_reps = if a.quick || a.reps.is_some() { reps } else { 5 };
    if want("flow") {
        part_flow(&flow_n, flow_reps, others, setup, Origin::Events);
    }
    if want("flow-silent") {
        part_flow(&flow_n, flow_reps, others, setup, Origin::Silent);
    }
}

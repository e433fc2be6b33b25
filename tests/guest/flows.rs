//! The guest scenario's traffic: one static program (std only, so it builds
//! with plain `rustc` into the guest's initramfs without the workspace's
//! dependencies) for both ends of every long-lived connection.
//!
//!   flows guest NAT_SERVER            in the guest: TCP echo on :7001,
//!                                     TCP bulk source on :7002, UDP echo on
//!                                     :7003 (all dual-stack), and an
//!                                     outbound TCP client to NAT_SERVER that
//!                                     the host masquerades
//!   flows client ECHO4 ECHO6 BULK UDP NAT_LISTEN STOPFILE WAKEFILE
//!                                     in the client namespace: one long-lived
//!                                     connection per flow, every byte checked;
//!                                     prints `ports NAME=PORT…` (the local
//!                                     ports of its TCP connections) and
//!                                     `ready`,
//!                                     runs until STOPFILE exists, then prints
//!                                     one report line per flow
//!
//! Besides the five busy flows, two interactive sessions to ECHO4 go idle
//! once connected (`tcp4-idle-1h`, `tcp4-idle-1d`: the caller ages their
//! conntrack entries to look idle that long, so they rank behind most of the
//! VM's entries and are created by the background part of a restore). When
//! WAKEFILE appears (the caller creates it as the destination runs) each
//! sends one line and then goes on like the interactive flow; its report
//! line adds `wake_reply_ms`, the time from that line to its echo: what
//! waking right after the switchover costs a flow whose entry is not there
//! yet.
//!
//! Every 200 ms the client prints `progress idle_ms=A,B,…` (ms since each
//! busy flow last delivered, or since its wake for an idle one; `failed` for
//! a flow that failed).
//!
//! A report line: `flow=NAME rx=N max_gap_ms=G gap_start_ms=T idle_ms=I
//! status=alive|hung|error:…`. `gap_start_ms` is the Unix time in ms at which
//! the largest pause in received data began, so the caller can relate it to
//! the migration (an idle flow's pause is its idle time: not reported as a
//! gap); `idle_ms` is the time since the last data arrived: a flow whose
//! packets the firewall drops hangs rather than fails.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Interactive messages: one fixed-size line every TICK, so a pause in the
/// replies is a pause of the connection, not of the sender.
const TICK: Duration = Duration::from_millis(20);
const UDP_TICK: Duration = Duration::from_millis(10);
/// The bulk source is paced: the point is every byte verified through the
/// switchover, not saturating two shared cores.
const BULK_RATE: u64 = 4 << 20;
const BULK_CHUNK: usize = 16 << 10;
/// Without data for this long at the end, a flow counts as hung.
const HUNG: Duration = Duration::from_millis(1000);
/// Lines an idle session exchanges before it goes quiet: enough for ASSURED
/// and an RTT estimate, so its retransmission timer is the one of a real
/// session that has been used.
const IDLE_WARMUP: u64 = 5;
/// The idle sessions, in the order of their report lines.
const IDLE_FLOWS: [&str; 2] = ["tcp4-idle-1h", "tcp4-idle-1d"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("guest") if args.len() == 2 => guest(&args[1]),
        Some("client") if args.len() == 8 => client(&args[1..]),
        _ => Err(
            "usage: flows guest NAT_SERVER | flows client ECHO4 ECHO6 BULK UDP NAT_LISTEN STOPFILE WAKEFILE"
                .into(),
        ),
    };
    if let Err(e) = r {
        eprintln!("flows: {e}");
        std::process::exit(1);
    }
}

type Res<T> = Result<T, String>;

fn addr(s: &str) -> Res<SocketAddr> {
    s.parse().map_err(|e| format!("{s}: {e}"))
}

fn unix_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

/// The bulk pattern: the stream is a sequence of little-endian u64 block
/// numbers, so any lost, duplicated or reordered byte shows at its offset.
fn pattern_byte(offset: u64) -> u8 {
    (offset / 8).to_le_bytes()[(offset % 8) as usize]
}

fn line(seq: u64) -> String {
    format!("{seq:015}\n")
}

// ---- the guest side --------------------------------------------------------

fn guest(nat_server: &str) -> Res<()> {
    let nat = addr(nat_server)?;
    let echo = TcpListener::bind("[::]:7001").map_err(|e| format!("bind 7001: {e}"))?;
    let bulk = TcpListener::bind("[::]:7002").map_err(|e| format!("bind 7002: {e}"))?;
    let udp = UdpSocket::bind("[::]:7003").map_err(|e| format!("bind 7003: {e}"))?;
    thread::spawn(move || {
        for s in echo.incoming().flatten() {
            thread::spawn(move || {
                let mut r = s.try_clone().expect("clone");
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    thread::spawn(move || {
        for s in bulk.incoming().flatten() {
            thread::spawn(move || bulk_source(s));
        }
    });
    thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], peer);
        }
    });
    println!("flows: guest services up");
    // The outbound connection: reconnect when it ends, so each run of the
    // client namespace's server gets a fresh one.
    loop {
        if let Ok(s) = TcpStream::connect_timeout(&nat, Duration::from_secs(1)) {
            nat_client(s);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn bulk_source(mut s: TcpStream) {
    let start = Instant::now();
    let mut off = 0u64;
    let mut buf = vec![0u8; BULK_CHUNK];
    loop {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = pattern_byte(off + i as u64);
        }
        if s.write_all(&buf).is_err() {
            return;
        }
        off += BULK_CHUNK as u64;
        let due = Duration::from_secs_f64(off as f64 / BULK_RATE as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            thread::sleep(wait);
        }
    }
}

/// Sends numbered lines and checks that the server echoes them in order; on
/// any mismatch it drops the connection, which the server reports.
fn nat_client(s: TcpStream) {
    // A connection the firewall cut hangs rather than fails: give it up
    // after a quiet spell longer than any stall the scenario allows, so the
    // next run of the server gets a new one.
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let mut w = s.try_clone().expect("clone");
    thread::spawn(move || {
        let mut seq = 0u64;
        while w.write_all(line(seq).as_bytes()).is_ok() {
            seq += 1;
            thread::sleep(TICK);
        }
    });
    let mut expect = 0u64;
    for l in BufReader::new(&s).lines() {
        match l {
            Ok(l) if l.trim().parse::<u64>() == Ok(expect) => expect += 1,
            _ => break,
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
}

// ---- the client side -------------------------------------------------------

struct Stats {
    name: &'static str,
    rx: u64,
    last: Option<(Instant, SystemTime)>,
    max_gap: Duration,
    gap_start: Option<SystemTime>,
    error: Option<String>,
    /// An idle session: when it sent its wake-up line, and when that line's
    /// echo came back.
    idle: bool,
    woke: Option<Instant>,
    wake_reply: Option<Duration>,
}

type Shared = Arc<Mutex<Stats>>;

fn stats(name: &'static str) -> Shared {
    Arc::new(Mutex::new(Stats {
        name,
        rx: 0,
        last: None,
        max_gap: Duration::ZERO,
        gap_start: None,
        error: None,
        idle: IDLE_FLOWS.contains(&name),
        woke: None,
        wake_reply: None,
    }))
}

fn arrived(st: &Shared, n: u64) {
    let mut s = st.lock().unwrap();
    let now = (Instant::now(), SystemTime::now());
    if let Some((last, wall)) = s.last {
        let gap = now.0 - last;
        if gap > s.max_gap {
            s.max_gap = gap;
            s.gap_start = Some(wall);
        }
    }
    s.last = Some(now);
    s.rx += n;
    if let (Some(woke), None) = (s.woke, s.wake_reply) {
        s.wake_reply = Some(now.0 - woke);
    }
}

/// An idle session wakes: its quiet spell is not a gap, the wait for its
/// first echo is.
fn woke(st: &Shared) {
    let mut s = st.lock().unwrap();
    let now = (Instant::now(), SystemTime::now());
    s.woke = Some(now.0);
    s.last = Some(now);
}

fn failed(st: &Shared, e: String) {
    let mut s = st.lock().unwrap();
    s.error.get_or_insert(e);
}

fn read_err(e: std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionReset => "reset".into(),
        _ => format!("read: {e}"),
    }
}

fn connect(a: &str) -> Res<TcpStream> {
    let a = addr(a)?;
    let s = TcpStream::connect_timeout(&a, Duration::from_secs(5))
        .map_err(|e| format!("connect {a}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(s)
}

/// The interactive session: numbered lines every TICK, each echo checked.
/// With `wake`, an idle one: quiet after IDLE_WARMUP lines until the file
/// `wake` exists, then on as before.
fn echo_flow(s: TcpStream, st: Shared, wake: Option<String>) {
    let mut w = s.try_clone().expect("clone");
    let wst = st.clone();
    thread::spawn(move || {
        let mut seq = 0u64;
        loop {
            if let Some(wake) = wake.as_deref().filter(|_| seq == IDLE_WARMUP) {
                // polled, not watched: the client namespace has nothing
                // else to do and 2 ms is well below the gaps measured
                while !std::path::Path::new(wake).exists() {
                    thread::sleep(Duration::from_millis(2));
                }
                woke(&wst);
            }
            if let Err(e) = w.write_all(line(seq).as_bytes()) {
                return failed(&wst, format!("write: {e}"));
            }
            seq += 1;
            thread::sleep(TICK);
        }
    });
    lines_in_order(BufReader::new(s), &st, None);
}

/// Reads numbered lines, each must be the next; optionally echoes them.
fn lines_in_order(mut r: BufReader<TcpStream>, st: &Shared, mut echo: Option<TcpStream>) {
    let mut expect = 0u64;
    let mut l = String::new();
    loop {
        l.clear();
        match r.read_line(&mut l) {
            Ok(0) => return failed(st, "closed by peer".into()),
            Ok(_) => {}
            Err(e) => return failed(st, read_err(e)),
        }
        if l.trim().parse::<u64>() != Ok(expect) {
            return failed(st, format!("line {expect}: got {:?}", l.trim()));
        }
        expect += 1;
        if let Some(w) = echo.as_mut() {
            if let Err(e) = w.write_all(l.as_bytes()) {
                return failed(st, format!("write: {e}"));
            }
        }
        arrived(st, 1);
    }
}

fn bulk_flow(mut s: TcpStream, st: Shared) {
    let mut off = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => return failed(&st, "closed by peer".into()),
            Ok(n) => n,
            Err(e) => return failed(&st, read_err(e)),
        };
        for (i, &b) in buf[..n].iter().enumerate() {
            if b != pattern_byte(off + i as u64) {
                return failed(&st, format!("byte {} differs", off + i as u64));
            }
        }
        off += n as u64;
        arrived(&st, n as u64);
    }
}

fn udp_flow(sock: UdpSocket, st: Shared, sent: Arc<Mutex<u64>>) {
    let w = sock.try_clone().expect("clone");
    thread::spawn(move || {
        let mut seq = 0u64;
        loop {
            if w.send(&seq.to_le_bytes()).is_ok() {
                seq += 1;
                *sent.lock().unwrap() = seq;
            }
            thread::sleep(UDP_TICK);
        }
    });
    let mut buf = [0u8; 64];
    loop {
        match sock.recv(&mut buf) {
            Ok(8) => arrived(&st, 1),
            Ok(n) => return failed(&st, format!("datagram of {n} bytes")),
            // an ICMP unreachable shows as ECONNREFUSED on a connected socket
            Err(e) => return failed(&st, format!("recv: {e}")),
        }
    }
}

fn client(a: &[String]) -> Res<()> {
    let (echo4, echo6, bulk, udp, nat_listen, stop, wake) =
        (&a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6]);
    let nat =
        TcpListener::bind(addr(nat_listen)?).map_err(|e| format!("bind {nat_listen}: {e}"))?;
    let all = [
        stats("tcp4-interactive"),
        stats("tcp6-interactive"),
        stats("tcp4-bulk"),
        stats("udp4-echo"),
        stats("tcp4-nat-outbound"),
        stats(IDLE_FLOWS[0]),
        stats(IDLE_FLOWS[1]),
    ];
    let mut ports = Vec::new();
    let mut port = |name: &str, s: &TcpStream| -> Res<()> {
        let p = s.local_addr().map_err(|e| e.to_string())?.port();
        ports.push(format!("{name}={p}"));
        Ok(())
    };
    let s = connect(echo4)?;
    port("tcp4-interactive", &s)?;
    let st = all[0].clone();
    thread::spawn(move || echo_flow(s, st, None));
    let s = connect(echo6)?;
    port("tcp6-interactive", &s)?;
    let st = all[1].clone();
    thread::spawn(move || echo_flow(s, st, None));
    let s = connect(bulk)?;
    port("tcp4-bulk", &s)?;
    let st = all[2].clone();
    thread::spawn(move || bulk_flow(s, st));
    let u = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    u.connect(addr(udp)?).map_err(|e| e.to_string())?;
    let udp_sent = Arc::new(Mutex::new(0u64));
    let (st, sent) = (all[3].clone(), udp_sent.clone());
    thread::spawn(move || udp_flow(u, st, sent));
    // the guest connects out on its own (it retries): wait for it, bounded
    nat.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        match nat.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                return Err(format!(
                    "the guest's outbound connection did not arrive: {e}"
                ))
            }
        }
    };
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let st = all[4].clone();
    let w = s.try_clone().map_err(|e| e.to_string())?;
    thread::spawn(move || lines_in_order(BufReader::new(s), &st, Some(w)));
    for (i, name) in IDLE_FLOWS.iter().enumerate() {
        let s = connect(echo4)?;
        port(name, &s)?;
        let (st, wake) = (all[5 + i].clone(), wake.clone());
        thread::spawn(move || echo_flow(s, st, Some(wake)));
    }
    println!("ports {}", ports.join(" "));
    // ready once every flow has delivered data
    let deadline = Instant::now() + Duration::from_secs(20);
    while all.iter().any(|s| s.lock().unwrap().rx == 0) {
        if Instant::now() > deadline {
            return Err("not every flow delivered data within 20 s".into());
        }
        thread::sleep(Duration::from_millis(20));
    }
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    // Progress for the caller, which waits for every flow to deliver again
    // after the switchover instead of guessing how long that takes.
    let mut tick = 0u32;
    while !std::path::Path::new(stop).exists() {
        thread::sleep(Duration::from_millis(50));
        tick += 1;
        if tick.is_multiple_of(4) {
            let now = Instant::now();
            let idle: Vec<String> = all
                .iter()
                .map(|st| {
                    let s = st.lock().unwrap();
                    let i = s.last.map_or(999_999, |(t, _)| (now - t).as_millis());
                    if s.error.is_some() {
                        "failed".into()
                    } else {
                        i.to_string()
                    }
                })
                .collect();
            println!("progress idle_ms={}", idle.join(","));
            std::io::stdout().flush().map_err(|e| e.to_string())?;
        }
    }
    let now = Instant::now();
    let udp_sent = *udp_sent.lock().unwrap();
    for st in &all {
        let s = st.lock().unwrap();
        let idle = s.last.map_or(Duration::MAX, |(t, _)| now - t);
        let status = match (&s.error, idle > HUNG) {
            (Some(e), _) => format!("error:{}", e.replace(' ', "_")),
            (None, true) => "hung".into(),
            (None, false) => "alive".into(),
        };
        let extra = if s.name.starts_with("udp") {
            format!(" sent={udp_sent} lost={}", udp_sent.saturating_sub(s.rx))
        } else if s.idle {
            let reply = s
                .wake_reply
                .map_or("none".into(), |d| d.as_millis().to_string());
            format!(" wake_reply_ms={reply}")
        } else {
            String::new()
        };
        println!(
            "flow={} rx={}{extra} max_gap_ms={} gap_start_ms={} idle_ms={} status={status}",
            s.name,
            s.rx,
            s.max_gap.as_millis(),
            s.gap_start.map_or(0, unix_ms),
            idle.as_millis().min(999_999),
        );
    }
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    std::process::exit(0);
}

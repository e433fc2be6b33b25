//! A deterministic, realistic conntrack population of one VM (plus noise of
//! other VMs), as conntrack(8) `-I` lines for `--load-file`.
//!
//! The mix follows the project issue: ~57 % IPv4 TCP ESTABLISHED+ASSURED with
//! 432000 s minus an exponential idle time (mean 1 h), 8 % TIME_WAIT, 3 %
//! SYN_SENT unreplied, 2 % other closing states, 10 % UDP DNS (a third
//! unreplied), 5 % long-lived UDP, 3 % ICMP echo, 12 % IPv6 (TCP, UDP and a
//! little ICMPv6 echo); ~10 % of the IPv4 TCP/UDP entries SNAT'ed or DNAT'ed;
//! a few percent with a zone (CTA_ZONE or a directional orig zone), with
//! FIXED_TIMEOUT, with labels. Peers are a few hot servers plus a long tail of
//! random public addresses. Tuples (original and reply) are unique.
//!
//! conntrack(8) cannot set TCP window scaling, so a subset of the VM's TCP
//! entries (`Population::direct`) is created through our own ctnetlink
//! create instead, with `IP_CT_TCP_FLAG_WINDOW_SCALE` in both directions and
//! wscale values (the kernel drops wscale unless both directions carry that
//! flag). Their `-I` lines (without wscale) are in `direct_lines`, for tools
//! that only take text.
//!
//! conntrack 1.4.7 `--load-file` crashes (SIGSEGV) on any line that follows a
//! `--label-add` line, so labelled lines are kept apart (`label_lines`) and
//! loaded one conntrack(8) process each. Labels also need the namespace to
//! use connlabels at all: [`enable_labels`] adds a connlabel rule.

use std::collections::HashSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

use conntrack_vmstate::entry::{proto, status, tcp_flag, tcp_state, Entry, ProtoInfo, Tuple, L4};

/// Parameters of a population.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Entries of the VM.
    pub n: usize,
    /// The VM's CONNMARK.
    pub mark: u32,
    pub seed: u64,
    /// Entries of other VMs (other marks), as a fraction of `n`.
    pub noise: f64,
}

impl Spec {
    pub fn new(n: usize, mark: u32, seed: u64) -> Spec {
        Spec {
            n,
            mark,
            seed,
            noise: 0.2,
        }
    }
}

/// What [`generate`] produced.
#[derive(Debug, Clone, Default)]
pub struct Population {
    /// Unlabelled `-I` lines of the VM loaded by conntrack(8).
    pub vm_lines: Vec<String>,
    /// Labelled `-I` lines of the VM (loaded one process each).
    pub label_lines: Vec<String>,
    /// `-I` lines of other VMs.
    pub noise_lines: Vec<String>,
    /// VM entries created through ctnetlink (TCP with window scaling).
    pub direct: Vec<Entry>,
    /// The same entries as `-I` lines (without wscale), for text consumers.
    pub direct_lines: Vec<String>,
    /// (original tuple, zone) of every VM entry, whichever way it is loaded.
    pub vm_keys: HashSet<(Tuple, u16)>,
    /// Marks used by the noise entries.
    pub noise_marks: Vec<u32>,
    /// Every VM entry (all of the above) as our codec creates it, for
    /// benchmarks that populate a namespace without conntrack(8).
    pub vm_entries: Vec<Entry>,
    /// Every noise entry as our codec creates it.
    pub noise_entries: Vec<Entry>,
}

impl Population {
    pub fn vm_count(&self) -> usize {
        self.vm_keys.len()
    }

    /// Every line, VM and noise, for text-only consumers (labelled last).
    pub fn all_lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self.vm_lines.clone();
        v.extend(self.direct_lines.iter().cloned());
        v.extend(self.noise_lines.iter().cloned());
        v.extend(self.label_lines.iter().cloned());
        v
    }
}

/// splitmix64: small, deterministic, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }
}

/// Smallest remaining timeout of short-lived entries (DNS, ICMP). Real ones
/// go down to 0 s, but entries must outlive a whole test on a slow, shared
/// 2-core CI machine (a comparison test ran past 20 s under load and saw an
/// entry expire on one side only), or the exact counts and comparisons the
/// tests assert would depend on timing.
const SHORT_MIN: u64 = 120;

const LABELS: [(&str, usize); 5] = [
    ("vm-trusted", 0),
    ("vm-monitored", 1),
    ("vm-lb", 5),
    ("vm-app", 42),
    ("vm-last", 127),
];

#[derive(Clone, Copy, PartialEq)]
enum Nat {
    None,
    Src(IpAddr, u16),
    Dst(IpAddr, u16),
}

/// One generated entry, before it becomes a line or an `Entry`.
#[derive(Clone)]
struct Gen {
    orig: Tuple,
    tcp_state: Option<u8>,
    timeout: u32,
    status: u32,
    mark: u32,
    zone: u16,
    orig_zone: Option<u16>,
    labels: Vec<usize>,
    nat: Nat,
    wscale: Option<(u8, u8)>,
}

impl Gen {
    fn reply(&self) -> Tuple {
        let mut r = self.orig.inverse();
        match self.nat {
            Nat::Src(ip, port) => {
                r.dst = ip;
                if let L4::Ports { src, .. } = r.l4 {
                    r.l4 = L4::Ports { src, dst: port };
                }
            }
            Nat::Dst(ip, port) => {
                r.src = ip;
                if let L4::Ports { dst, .. } = r.l4 {
                    r.l4 = L4::Ports { src: port, dst };
                }
            }
            Nat::None => {}
        }
        r.zone = None;
        r
    }

    fn line(&self) -> String {
        let p = match self.orig.proto {
            proto::TCP => "tcp",
            proto::UDP => "udp",
            proto::ICMP => "icmp",
            proto::ICMPV6 => "icmpv6",
            _ => "unknown",
        };
        let mut s = format!("-I -p {p} -s {} -d {}", self.orig.src, self.orig.dst);
        match self.orig.l4 {
            L4::Ports { src, dst } => s += &format!(" --sport {src} --dport {dst}"),
            L4::Icmp { id, kind, code } => {
                let v = if self.orig.proto == proto::ICMPV6 {
                    "icmpv6"
                } else {
                    "icmp"
                };
                s += &format!(" --{v}-type {kind} --{v}-code {code} --{v}-id {id}");
            }
            L4::None => {}
        }
        if let Some(st) = self.tcp_state {
            s += &format!(" --state {}", tcp_state::NAMES[st as usize]);
        }
        s += &format!(" -t {}", self.timeout);
        let mut names = Vec::new();
        for (bit, name) in [
            (status::SEEN_REPLY, "SEEN_REPLY"),
            (status::ASSURED, "ASSURED"),
            (status::FIXED_TIMEOUT, "FIXED_TIMEOUT"),
        ] {
            if self.status & bit != 0 {
                names.push(name);
            }
        }
        if !names.is_empty() {
            s += &format!(" -u {}", names.join(","));
        }
        s += &format!(" -m {}", self.mark);
        if self.zone != 0 {
            s += &format!(" -w {}", self.zone);
        }
        if let Some(z) = self.orig_zone {
            s += &format!(" --orig-zone {z}");
        }
        match self.nat {
            Nat::Src(ip, port) => s += &format!(" --src-nat {ip}:{port}"),
            Nat::Dst(ip, port) => s += &format!(" --dst-nat {ip}:{port}"),
            Nat::None => {}
        }
        if !self.labels.is_empty() {
            let names: Vec<&str> = self
                .labels
                .iter()
                .filter_map(|b| LABELS.iter().find(|(_, x)| x == b).map(|(n, _)| *n))
                .collect();
            s += &format!(" --label-add {}", names.join(","));
        }
        s
    }

    /// The entry as our codec creates it (only used for the wscale subset).
    fn entry(&self) -> Entry {
        let mut st = self.status | status::CONFIRMED;
        match self.nat {
            Nat::Src(..) => st |= status::SRC_NAT | status::SRC_NAT_DONE | status::DST_NAT_DONE,
            Nat::Dst(..) => st |= status::DST_NAT | status::SRC_NAT_DONE | status::DST_NAT_DONE,
            Nat::None => {}
        }
        let labels = (!self.labels.is_empty()).then(|| {
            let mut l = [0u8; 16];
            for &b in &self.labels {
                l[b / 8] |= 1 << (b % 8);
            }
            l
        });
        let protoinfo = self.tcp_state.map(|state| {
            let (wo, wr) = self.wscale.unwrap_or((0, 0));
            let base = tcp_flag::SACK_PERM | tcp_flag::BE_LIBERAL;
            let ws = if self.wscale.is_some() {
                tcp_flag::WINDOW_SCALE
            } else {
                0
            };
            ProtoInfo::Tcp {
                state,
                wscale_orig: wo,
                wscale_reply: wr,
                flags_orig: base | ws,
                flags_reply: base | ws,
            }
        });
        let mut orig = self.orig;
        orig.zone = self.orig_zone;
        Entry {
            orig,
            reply: self.reply(),
            status: st,
            timeout: self.timeout,
            mark: self.mark,
            zone: self.zone,
            labels,
            protoinfo,
            seq_adj_orig: None,
            seq_adj_reply: None,
            helper: None,
            id: None,
        }
    }
}

fn public_v4(rng: &mut Rng) -> Ipv4Addr {
    loop {
        let a = Ipv4Addr::from(rng.next_u64() as u32);
        let o = a.octets();
        let reserved = o[0] == 0
            || o[0] == 10
            || o[0] == 127
            || o[0] >= 224
            || (o[0] == 100 && (64..128).contains(&o[1]))
            || (o[0] == 169 && o[1] == 254)
            || (o[0] == 172 && (16..32).contains(&o[1]))
            || (o[0] == 192 && o[1] == 168);
        if !reserved {
            return a;
        }
    }
}

fn public_v6(rng: &mut Rng) -> Ipv6Addr {
    let hi = 0x2a00_0000_0000_0000u64 | (rng.next_u64() >> 8);
    Ipv6Addr::from(((hi as u128) << 64) | rng.next_u64() as u128)
}

struct Ctx {
    rng: Rng,
    used: HashSet<(Tuple, u16)>,
    hot4: Vec<Ipv4Addr>,
    hot6: Vec<Ipv6Addr>,
    snat4: Vec<Ipv4Addr>,
}

impl Ctx {
    fn peer4(&mut self) -> IpAddr {
        if self.rng.chance(0.4) {
            let i = self.rng.below(self.hot4.len() as u64) as usize;
            self.hot4[i].into()
        } else {
            public_v4(&mut self.rng).into()
        }
    }
    fn peer6(&mut self) -> IpAddr {
        if self.rng.chance(0.4) {
            let i = self.rng.below(self.hot6.len() as u64) as usize;
            self.hot6[i].into()
        } else {
            public_v6(&mut self.rng).into()
        }
    }
    fn eph(&mut self) -> u16 {
        self.rng.range(32768, 60999) as u16
    }
    /// Reserves both tuples of `g`; false when either is taken.
    fn claim(&mut self, g: &Gen) -> bool {
        let mut o = g.orig;
        o.zone = None;
        let mut r = g.reply();
        r.zone = None;
        // The kernel checks each tuple against both directions of others.
        let ko = (o, g.zone);
        let kr = (r, g.zone);
        if self.used.contains(&ko) || self.used.contains(&kr) {
            return false;
        }
        self.used.insert(ko);
        self.used.insert(kr);
        true
    }
}

fn vm_addrs(mark: u32) -> (Ipv4Addr, Ipv6Addr) {
    let m = mark.to_be_bytes();
    (
        Ipv4Addr::new(10, m[2], m[3], 2),
        Ipv6Addr::new(
            0xfd00,
            0,
            m[0] as u16,
            m[1] as u16,
            m[2] as u16,
            m[3] as u16,
            0,
            2,
        ),
    )
}

/// Draws one entry of the realistic mix for the VM with `mark`.
fn draw(c: &mut Ctx, mark: u32, full_mix: bool) -> Gen {
    let (v4, v6) = vm_addrs(mark);
    let r = c.rng.f64() * 100.0;
    let est_timeout = |rng: &mut Rng| {
        let idle = -(1.0 - rng.f64()).ln() * 3600.0;
        (432_000.0 - idle).max(600.0) as u32
    };
    let mut g = Gen {
        orig: Tuple {
            src: v4.into(),
            dst: v4.into(),
            proto: proto::TCP,
            l4: L4::Ports { src: 0, dst: 0 },
            zone: None,
        },
        tcp_state: None,
        timeout: 0,
        status: 0,
        mark,
        zone: 0,
        orig_zone: None,
        labels: Vec::new(),
        nat: Nat::None,
        wscale: None,
    };
    let replied = status::SEEN_REPLY | status::ASSURED;
    let peer = c.peer4();
    let eph = c.eph();
    let inbound = c.rng.chance(0.25);
    let tcp_ports = |rng: &mut Rng| [443u16, 80, 22, 5432, 993, 8080][rng.below(6) as usize];
    let set_tcp = |g: &mut Gen, rng: &mut Rng, local: IpAddr| {
        let svc = tcp_ports(rng);
        if inbound {
            g.orig.src = peer;
            g.orig.dst = local;
            g.orig.l4 = L4::Ports { src: eph, dst: svc };
        } else {
            g.orig.src = local;
            g.orig.dst = peer;
            g.orig.l4 = L4::Ports { src: eph, dst: svc };
        }
    };
    if r < 57.0 || !full_mix && r < 80.0 {
        set_tcp(&mut g, &mut c.rng, v4.into());
        g.tcp_state = Some(tcp_state::ESTABLISHED);
        g.status = replied;
        g.timeout = est_timeout(&mut c.rng);
    } else if r < 65.0 {
        set_tcp(&mut g, &mut c.rng, v4.into());
        g.tcp_state = Some(tcp_state::TIME_WAIT);
        g.status = replied;
        // Real ones are at most 120 s; kept above SHORT_MIN for the same
        // reason as the short-lived entries.
        g.timeout = c.rng.range(SHORT_MIN, SHORT_MIN + 60) as u32;
    } else if r < 68.0 {
        set_tcp(&mut g, &mut c.rng, v4.into());
        g.tcp_state = Some(tcp_state::SYN_SENT);
        g.timeout = c.rng.range(60, 120) as u32;
    } else if r < 70.0 {
        set_tcp(&mut g, &mut c.rng, v4.into());
        let s = [
            tcp_state::FIN_WAIT,
            tcp_state::CLOSE_WAIT,
            tcp_state::LAST_ACK,
            tcp_state::CLOSE,
        ];
        g.tcp_state = Some(s[c.rng.below(4) as usize]);
        g.status = replied;
        g.timeout = c.rng.range(SHORT_MIN, 3600) as u32;
    } else if r < 80.0 {
        g.orig.proto = proto::UDP;
        g.orig.src = v4.into();
        let resolvers = [[9, 9, 9, 9], [1, 1, 1, 1], [8, 8, 8, 8]];
        g.orig.dst = if c.rng.chance(0.7) {
            Ipv4Addr::from(resolvers[c.rng.below(3) as usize]).into()
        } else {
            peer
        };
        g.orig.l4 = L4::Ports { src: eph, dst: 53 };
        g.status = if c.rng.chance(0.33) {
            0
        } else {
            status::SEEN_REPLY
        };
        g.timeout = c.rng.range(SHORT_MIN, SHORT_MIN + 10) as u32;
    } else if r < 85.0 {
        g.orig.proto = proto::UDP;
        g.orig.src = v4.into();
        g.orig.dst = peer;
        let svc = [123u16, 443, 4500, 51820, 1194][c.rng.below(5) as usize];
        g.orig.l4 = L4::Ports { src: eph, dst: svc };
        g.status = replied;
        g.timeout = c.rng.range(60, 180) as u32;
    } else if r < 88.0 {
        g.orig.proto = proto::ICMP;
        g.orig.src = v4.into();
        g.orig.dst = peer;
        g.orig.l4 = L4::Icmp {
            id: c.rng.below(65536) as u16,
            kind: 8,
            code: 0,
        };
        g.status = if c.rng.chance(0.8) {
            status::SEEN_REPLY
        } else {
            0
        };
        g.timeout = c.rng.range(SHORT_MIN, SHORT_MIN + 10) as u32;
    } else {
        let peer6 = c.peer6();
        let x = c.rng.f64();
        g.orig.src = v6.into();
        g.orig.dst = peer6;
        if x < 0.08 {
            g.orig.proto = proto::ICMPV6;
            g.orig.l4 = L4::Icmp {
                id: c.rng.below(65536) as u16,
                kind: 128,
                code: 0,
            };
            g.status = status::SEEN_REPLY;
            g.timeout = c.rng.range(SHORT_MIN, SHORT_MIN + 10) as u32;
        } else if x < 0.35 {
            g.orig.proto = proto::UDP;
            g.orig.l4 = L4::Ports { src: eph, dst: 53 };
            g.status = status::SEEN_REPLY;
            g.timeout = c.rng.range(SHORT_MIN, SHORT_MIN + 10) as u32;
        } else {
            set_tcp(&mut g, &mut c.rng, v6.into());
            if inbound {
                g.orig.src = peer6;
            } else {
                g.orig.dst = peer6;
            }
            g.tcp_state = Some(tcp_state::ESTABLISHED);
            g.status = replied;
            g.timeout = est_timeout(&mut c.rng);
        }
    }
    if !full_mix {
        return g;
    }
    let v4_ports = g.orig.src.is_ipv4() && matches!(g.orig.proto, proto::TCP | proto::UDP);
    if v4_ports && c.rng.chance(0.11) {
        if inbound {
            // A published service: the peer talks to a public address that
            // DNAT maps to the VM.
            let i = c.rng.below(c.snat4.len() as u64) as usize;
            let (svc, vm_port) = match g.orig.l4 {
                L4::Ports { dst, .. } => (dst, [dst, 8080, 8443][c.rng.below(3) as usize]),
                _ => (0, 0),
            };
            g.orig.dst = c.snat4[i].into();
            if let L4::Ports { src, .. } = g.orig.l4 {
                g.orig.l4 = L4::Ports { src, dst: svc };
            }
            g.nat = Nat::Dst(v4.into(), vm_port);
        } else if c.rng.chance(0.3) {
            // DNAT towards a private backend.
            let be = Ipv4Addr::new(172, 16, c.rng.below(4) as u8, c.rng.range(2, 250) as u8);
            let port = [8080u16, 8443, 3000][c.rng.below(3) as usize];
            g.nat = Nat::Dst(be.into(), port);
        } else {
            let i = c.rng.below(c.snat4.len() as u64) as usize;
            let port = c.rng.range(1024, 65535) as u16;
            g.nat = Nat::Src(c.snat4[i].into(), port);
        }
    }
    let z = c.rng.f64();
    if z < 0.03 {
        g.zone = c.rng.range(1, 4) as u16;
    } else if z < 0.04 {
        g.orig_zone = Some(c.rng.range(5, 6) as u16);
    }
    if g.tcp_state == Some(tcp_state::ESTABLISHED) && c.rng.chance(0.03) {
        g.status |= status::FIXED_TIMEOUT;
    }
    if c.rng.chance(0.03) {
        let a = c.rng.below(LABELS.len() as u64) as usize;
        g.labels.push(LABELS[a].1);
        if c.rng.chance(0.4) {
            let b = c.rng.below(LABELS.len() as u64) as usize;
            if b != a {
                g.labels.push(LABELS[b].1);
            }
        }
        g.labels.sort();
    }
    if g.tcp_state.is_some() && g.labels.is_empty() && c.rng.chance(0.4) {
        g.wscale = Some((c.rng.range(0, 14) as u8, c.rng.range(0, 14) as u8));
    }
    g
}

/// Generates the population described by `spec`; the same spec always gives
/// the same lines.
pub fn generate(spec: Spec) -> Population {
    let mut rng = Rng::new(spec.seed);
    let hot4 = (0..6).map(|_| public_v4(&mut rng)).collect();
    let hot6 = (0..4).map(|_| public_v6(&mut rng)).collect();
    let snat4 = (0..3).map(|_| public_v4(&mut rng)).collect();
    let mut c = Ctx {
        rng,
        used: HashSet::new(),
        hot4,
        hot6,
        snat4,
    };
    let mut pop = Population::default();
    while pop.vm_keys.len() < spec.n {
        let g = draw(&mut c, spec.mark, true);
        if !c.claim(&g) {
            continue;
        }
        let mut o = g.orig;
        o.zone = g.orig_zone;
        pop.vm_keys.insert((o, g.zone));
        pop.vm_entries.push(g.entry());
        if g.wscale.is_some() {
            pop.direct.push(g.entry());
            pop.direct_lines.push(g.line());
        } else if g.labels.is_empty() {
            pop.vm_lines.push(g.line());
        } else {
            pop.label_lines.push(g.line());
        }
    }
    let noise_n = (spec.n as f64 * spec.noise).round() as usize;
    let marks: Vec<u32> = (1..=4u32)
        .map(|i| spec.mark.wrapping_add(i * 1000).max(1))
        .filter(|&m| m != spec.mark)
        .collect();
    pop.noise_marks = marks.clone();
    let mut made = 0;
    while made < noise_n {
        let m = marks[c.rng.below(marks.len() as u64) as usize];
        let g = draw(&mut c, m, false);
        if !c.claim(&g) {
            continue;
        }
        pop.noise_lines.push(g.line());
        pop.noise_entries.push(g.entry());
        made += 1;
    }
    pop
}

/// Makes the namespace use connlabels (a connlabel rule), without which the
/// kernel silently drops labels given on create.
pub fn enable_labels(ns_name: &str) {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns_name, "iptables", "-t", "mangle", "-A", "OUTPUT",
        ])
        .args(["-m", "connlabel", "--label", "vm-last"])
        .output()
        .expect("spawn iptables");
    assert!(
        out.status.success(),
        "enabling connlabels in {ns_name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Loads `pop` into the namespace `ns_name`: conntrack(8) `--load-file` for
/// plain lines, one conntrack(8) per labelled line, our create for the
/// wscale subset. Panics with the tool's error when anything fails to load.
pub fn load(ns_name: &str, pop: &Population) {
    enable_labels(ns_name);
    let mut file = tempfile::NamedTempFile::new().expect("tempfile");
    let mut plain = 0;
    for l in pop.vm_lines.iter().chain(pop.noise_lines.iter()) {
        writeln!(file, "{l}").expect("write load file");
        plain += 1;
    }
    file.flush().expect("flush load file");
    if plain > 0 {
        let out = Command::new("ip")
            .args(["netns", "exec", ns_name, "conntrack", "--load-file"])
            .arg(file.path())
            .output()
            .expect("spawn conntrack");
        assert!(
            out.status.success(),
            "conntrack --load-file in {ns_name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for l in &pop.label_lines {
        let out = Command::new("ip")
            .args(["netns", "exec", ns_name, "conntrack"])
            .args(l.split_whitespace())
            .output()
            .expect("spawn conntrack");
        assert!(
            out.status.success(),
            "conntrack {l}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if !pop.direct.is_empty() {
        use conntrack_vmstate::access::ConntrackAccess;
        let ct = conntrack_vmstate::ctnetlink::Ctnetlink::open_in_netns(std::path::Path::new(
            &format!("/run/netns/{ns_name}"),
        ))
        .expect("ctnetlink in test namespace");
        let r = ct.create(&pop.direct).expect("create wscale entries");
        assert_eq!(
            r.created,
            pop.direct.len() as u64,
            "wscale entries not all created: {r:?}"
        );
    }
}

/// The VM's entries of the realistic mix as our codec creates them, without
/// lines or noise: the population of the format tests, the format
/// examples and the fuzz seeds (what `format::synth` was). The same
/// generator as [`generate`], so every measurement uses one mix.
pub fn entries(n: usize, seed: u64, mark: u32) -> Vec<Entry> {
    generate(Spec {
        n,
        mark,
        seed,
        noise: 0.0,
    })
    .vm_entries
}

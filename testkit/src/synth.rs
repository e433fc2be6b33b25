//! A deterministic synthetic population of one VM's entries, the
//! "realistic mix" of the engine issue, for size/speed measurements and
//! budget tests. Not used at run time.
//!
//! Mix: 57% IPv4 TCP ESTABLISHED/ASSURED (timeout 432000 s minus an
//! exponential idle time, mean 1 h), 8% TIME_WAIT, 3% SYN_SENT unreplied,
//! 2% other closing TCP states, 10% DNS over UDP (a fifth unreplied), 5%
//! long-lived UDP, 3% ICMP echo, 12% IPv6 TCP/UDP; ~10% of IPv4 TCP/UDP
//! NATed; a few percent with a zone, FIXED_TIMEOUT or labels. Peers: a few
//! hot servers and a long tail of random public addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::entry::{proto, status, tcp_flag, tcp_state, Entry, ProtoInfo, Tuple, L4};

/// xorshift64*: small, fast, good enough for test populations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }
}

const VM4: Ipv4Addr = Ipv4Addr::new(10, 20, 30, 40);
const VM6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0x30, 0, 0, 0, 0x40);

fn peer4(r: &mut Rng) -> Ipv4Addr {
    // 40% to a handful of hot servers, the rest a long tail of random
    // public addresses (these compress badly; that is the point).
    if r.chance(0.4) {
        let hot = [
            [93, 184, 216, 34],
            [151, 101, 1, 69],
            [140, 82, 121, 4],
            [8, 8, 8, 8],
            [1, 1, 1, 1],
            [192, 0, 2, 10],
        ];
        let h = hot[r.below(hot.len() as u64) as usize];
        Ipv4Addr::new(h[0], h[1], h[2], h[3])
    } else {
        let v = r.next_u64() as u32;
        let first = 11 + (v >> 24) % 212; // 11..222: public-ish
        Ipv4Addr::from((first << 24) | (v & 0x00ff_ffff))
    }
}

fn peer6(r: &mut Rng) -> Ipv6Addr {
    if r.chance(0.4) {
        Ipv6Addr::new(0x2606, 0x4700, 0, 0, 0, 0, 0x6810, 0x85e5)
    } else {
        let a = r.next_u64();
        let b = r.next_u64();
        Ipv6Addr::new(
            0x2000 | (a as u16 & 0x0fff),
            (a >> 16) as u16,
            (a >> 32) as u16,
            (a >> 48) as u16,
            0,
            0,
            (b >> 16) as u16,
            b as u16,
        )
    }
}

fn eph(r: &mut Rng) -> u16 {
    32768 + r.below(28232) as u16
}

fn tcp(state: u8, ws: bool) -> Option<ProtoInfo> {
    let f = tcp_flag::SACK_PERM | if ws { tcp_flag::WINDOW_SCALE } else { 0 };
    Some(ProtoInfo::Tcp {
        state,
        wscale_orig: if ws { 7 } else { 0 },
        wscale_reply: if ws { 9 } else { 0 },
        flags_orig: f,
        flags_reply: f,
    })
}

fn entry(src: IpAddr, dst: IpAddr, pr: u8, l4: L4, st: u32, timeout: u32, mark: u32) -> Entry {
    let orig = Tuple {
        src,
        dst,
        proto: pr,
        l4,
        zone: None,
    };
    Entry {
        orig,
        reply: orig.inverse(),
        status: st | status::CONFIRMED,
        timeout,
        mark,
        zone: 0,
        labels: None,
        protoinfo: None,
        seq_adj_orig: None,
        seq_adj_reply: None,
        helper: None,
        id: None,
    }
}

/// `n` entries of the realistic mix, all with `mark`.
pub fn population(n: usize, seed: u64, mark: u32) -> Vec<Entry> {
    let mut r = Rng::new(seed);
    let mut out = Vec::with_capacity(n);
    let assured = status::SEEN_REPLY | status::ASSURED;
    for _ in 0..n {
        let roll = r.below(100);
        let outbound = r.chance(0.8);
        let mut e;
        let peer = IpAddr::V4(peer4(&mut r));
        let (src, dst) = if outbound {
            (IpAddr::V4(VM4), peer)
        } else {
            (peer, IpAddr::V4(VM4))
        };
        let ports = |r: &mut Rng, service: u16| L4::Ports {
            src: eph(r),
            dst: service,
        };
        let svc = [443u16, 443, 443, 80, 22, 5432, 8080][r.below(7) as usize];
        match roll {
            0..=56 => {
                let idle = (-(1.0 - r.f64()).ln() * 3600.0) as u32;
                e = entry(
                    src,
                    dst,
                    proto::TCP,
                    ports(&mut r, svc),
                    assured,
                    432_000u32.saturating_sub(idle).max(1),
                    0,
                );
                e.protoinfo = tcp(tcp_state::ESTABLISHED, r.chance(0.9));
            }
            57..=64 => {
                e = entry(
                    src,
                    dst,
                    proto::TCP,
                    ports(&mut r, svc),
                    assured,
                    1 + r.below(120) as u32,
                    0,
                );
                e.protoinfo = tcp(tcp_state::TIME_WAIT, true);
            }
            65..=67 => {
                e = entry(
                    src,
                    dst,
                    proto::TCP,
                    ports(&mut r, svc),
                    0,
                    1 + r.below(120) as u32,
                    0,
                );
                e.protoinfo = tcp(tcp_state::SYN_SENT, false);
            }
            68..=69 => {
                let st = [
                    tcp_state::FIN_WAIT,
                    tcp_state::CLOSE_WAIT,
                    tcp_state::LAST_ACK,
                    tcp_state::CLOSE,
                ][r.below(4) as usize];
                e = entry(
                    src,
                    dst,
                    proto::TCP,
                    ports(&mut r, svc),
                    assured,
                    1 + r.below(120) as u32,
                    0,
                );
                e.protoinfo = tcp(st, true);
            }
            70..=79 => {
                let dns = IpAddr::V4(
                    [
                        Ipv4Addr::new(10, 20, 0, 1),
                        Ipv4Addr::new(8, 8, 8, 8),
                        Ipv4Addr::new(1, 1, 1, 1),
                    ][r.below(3) as usize],
                );
                let replied = r.chance(0.8);
                e = entry(
                    IpAddr::V4(VM4),
                    dns,
                    proto::UDP,
                    L4::Ports {
                        src: eph(&mut r),
                        dst: 53,
                    },
                    if replied { status::SEEN_REPLY } else { 0 },
                    1 + r.below(30) as u32,
                    0,
                );
            }
            80..=84 => {
                let us = [123u16, 51820, 443, 1194][r.below(4) as usize];
                e = entry(
                    src,
                    dst,
                    proto::UDP,
                    ports(&mut r, us),
                    assured,
                    60 + r.below(120) as u32,
                    0,
                );
            }
            85..=87 => {
                e = entry(
                    IpAddr::V4(VM4),
                    IpAddr::V4(peer4(&mut r)),
                    proto::ICMP,
                    L4::Icmp {
                        id: r.below(65536) as u16,
                        kind: 8,
                        code: 0,
                    },
                    status::SEEN_REPLY,
                    1 + r.below(30) as u32,
                    0,
                );
            }
            _ => {
                let p = IpAddr::V6(peer6(&mut r));
                let (s6, d6) = if outbound {
                    (IpAddr::V6(VM6), p)
                } else {
                    (p, IpAddr::V6(VM6))
                };
                if r.chance(0.75) {
                    let idle = (-(1.0 - r.f64()).ln() * 3600.0) as u32;
                    e = entry(
                        s6,
                        d6,
                        proto::TCP,
                        ports(&mut r, svc),
                        assured,
                        432_000u32.saturating_sub(idle).max(1),
                        0,
                    );
                    e.protoinfo = tcp(tcp_state::ESTABLISHED, true);
                } else {
                    e = entry(
                        s6,
                        d6,
                        proto::UDP,
                        L4::Ports {
                            src: eph(&mut r),
                            dst: 53,
                        },
                        status::SEEN_REPLY,
                        1 + r.below(30) as u32,
                        0,
                    );
                }
            }
        }
        // ~10% of IPv4 TCP/UDP NATed.
        if !e.is_ipv6() && matches!(e.orig.proto, proto::TCP | proto::UDP) && r.chance(0.1) {
            if r.chance(0.5) {
                // SNAT: reply goes to the public address.
                e.reply.dst = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
                if let L4::Ports { src, dst } = e.reply.l4 {
                    e.reply.l4 = L4::Ports {
                        src,
                        dst: dst.wrapping_add(r.below(100) as u16),
                    };
                }
                e.status |= status::SRC_NAT | status::SRC_NAT_DONE;
            } else {
                e.reply.src = IpAddr::V4(Ipv4Addr::new(10, 20, 30, 99));
                e.status |= status::DST_NAT | status::DST_NAT_DONE;
            }
        }
        if r.chance(0.03) {
            e.zone = 1 + r.below(3) as u16;
        }
        if r.chance(0.02) {
            e.status |= status::FIXED_TIMEOUT;
        }
        if r.chance(0.02) {
            let mut l = [0u8; 16];
            l[0] = 1 << r.below(8);
            l[5] = 0x04;
            e.labels = Some(l);
        }
        e.mark = mark;
        out.push(e);
    }
    out
}

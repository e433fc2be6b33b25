//! Entries conntrack(8) cannot make, created and read back through our
//! codec on the real kernel: every protocol family of tuple, protocol info,
//! NAT variants (SNAT+DNAT, ICMP id mapping, IPv6, null bindings), sequence
//! adjustment, directional zones. What goes in must come out, attribute by
//! attribute.

use std::net::IpAddr;
use std::path::Path;

use common::compare::{compare, Tolerance};
use common::netns::Netns;
use conntrack_vmstate::access::ConntrackAccess;
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::{
    proto, status, tcp_flag, tcp_state, Entry, ProtoInfo, Selector, SeqAdj, Tuple, L4,
};

const MARK: u32 = 0x5a;
const NAT_DONE: u32 = status::SRC_NAT_DONE | status::DST_NAT_DONE;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn entry(p: u8, src: &str, dst: &str, l4: L4) -> Entry {
    let orig = Tuple {
        src: ip(src),
        dst: ip(dst),
        proto: p,
        l4,
        zone: None,
    };
    Entry {
        orig,
        reply: orig.inverse(),
        status: status::CONFIRMED | status::SEEN_REPLY | status::ASSURED,
        timeout: 3000,
        mark: MARK,
        zone: 0,
        labels: None,
        // The kernel always reports TCP state.
        protoinfo: (p == proto::TCP).then_some(ProtoInfo::Tcp {
            state: tcp_state::ESTABLISHED,
            wscale_orig: 0,
            wscale_reply: 0,
            flags_orig: tcp_flag::BE_LIBERAL,
            flags_reply: tcp_flag::BE_LIBERAL,
        }),
        seq_adj_orig: None,
        seq_adj_reply: None,
        helper: None,
        id: None,
    }
}

fn ports(src: u16, dst: u16) -> L4 {
    L4::Ports { src, dst }
}

/// The kernel's reply after NAT: `post` is the original direction as it
/// leaves the host.
fn natted(mut e: Entry, post_src: (&str, u16), post_dst: (&str, u16)) -> Entry {
    let mut post = e.orig;
    post.src = ip(post_src.0);
    post.dst = ip(post_dst.0);
    post.l4 = match post.l4 {
        L4::Ports { .. } => ports(post_src.1, post_dst.1),
        L4::Icmp { kind, code, .. } => L4::Icmp {
            id: post_src.1,
            kind,
            code,
        },
        L4::None => L4::None,
    };
    e.reply = post.inverse();
    e.status |= NAT_DONE;
    if post.src != e.orig.src
        || matches!((post.l4, e.orig.l4), (L4::Ports { src: a, .. }, L4::Ports { src: b, .. }) if a != b)
        || matches!((post.l4, e.orig.l4), (L4::Icmp { id: a, .. }, L4::Icmp { id: b, .. }) if a != b)
    {
        e.status |= status::SRC_NAT;
    }
    if post.dst != e.orig.dst
        || matches!((post.l4, e.orig.l4), (L4::Ports { dst: a, .. }, L4::Ports { dst: b, .. }) if a != b)
    {
        e.status |= status::DST_NAT;
    }
    e
}

fn tcp_info(state: u8, ws: Option<(u8, u8)>, extra: u8) -> Option<ProtoInfo> {
    let base = tcp_flag::SACK_PERM
        | extra
        | if ws.is_some() {
            tcp_flag::WINDOW_SCALE
        } else {
            0
        };
    let (wo, wr) = ws.unwrap_or((0, 0));
    Some(ProtoInfo::Tcp {
        state,
        wscale_orig: wo,
        wscale_reply: wr,
        flags_orig: base,
        flags_reply: base | tcp_flag::MAXACK_SET,
    })
}

fn specimens() -> Vec<Entry> {
    let mut v = Vec::new();
    // TCP without BE_LIBERAL, with wscale and internal flags.
    let mut e = entry(proto::TCP, "10.1.0.1", "198.51.100.1", ports(40000, 443));
    e.protoinfo = tcp_info(
        tcp_state::ESTABLISHED,
        Some((7, 9)),
        tcp_flag::DATA_UNACKNOWLEDGED,
    );
    v.push(e);
    // TCP with seq adjustment (status SEQ_ADJUST comes from the attributes).
    let mut e = entry(proto::TCP, "10.1.0.1", "198.51.100.1", ports(40001, 21));
    e.protoinfo = tcp_info(tcp_state::ESTABLISHED, None, tcp_flag::BE_LIBERAL);
    e.seq_adj_orig = Some(SeqAdj {
        correction_pos: 123_456,
        offset_before: -4,
        offset_after: 12,
    });
    e.seq_adj_reply = Some(SeqAdj {
        correction_pos: 654_321,
        offset_before: 3,
        offset_after: -7,
    });
    e.status |= status::SEQ_ADJUST;
    v.push(e);
    // IPv6 TCP in a directional zone, with labels and FIXED_TIMEOUT.
    let mut e = entry(proto::TCP, "2001:db8::1", "2001:db8:1::2", ports(40002, 22));
    e.protoinfo = tcp_info(tcp_state::CLOSE_WAIT, Some((14, 0)), 0);
    e.orig.zone = Some(77);
    e.reply.zone = None;
    e.status |= status::FIXED_TIMEOUT;
    e.labels = Some([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80]);
    v.push(e);
    // Reply-direction zone.
    let mut e = entry(proto::UDP, "10.1.0.1", "198.51.100.2", ports(40003, 4500));
    e.reply.zone = Some(78);
    v.push(e);
    // UDP-Lite, SCTP, GRE: port-keyed tuples; SCTP protoinfo.
    v.push(entry(
        proto::UDPLITE,
        "10.1.0.1",
        "198.51.100.3",
        ports(40004, 5000),
    ));
    let mut e = entry(proto::SCTP, "10.1.0.1", "198.51.100.4", ports(40005, 3868));
    e.protoinfo = Some(ProtoInfo::Sctp {
        state: 3, // ESTABLISHED
        vtag_orig: 0xdead_beef,
        vtag_reply: 0x0102_0304,
    });
    v.push(e);
    v.push(entry(
        proto::GRE,
        "10.1.0.1",
        "198.51.100.6",
        ports(0x1111, 0x2222),
    ));
    // A protocol conntrack only knows generically (OSPF).
    v.push(entry(89, "10.1.0.1", "224.0.0.5", L4::None));
    // ICMP and ICMPv6 echo; unreplied.
    let mut e = entry(
        proto::ICMP,
        "10.1.0.1",
        "198.51.100.7",
        L4::Icmp {
            id: 99,
            kind: 8,
            code: 0,
        },
    );
    e.status = status::CONFIRMED;
    v.push(e);
    v.push(entry(
        proto::ICMPV6,
        "2001:db8::1",
        "2001:db8:1::7",
        L4::Icmp {
            id: 98,
            kind: 128,
            code: 0,
        },
    ));
    // NAT: SNAT with port, DNAT with port, both at once, IPv6 SNAT, ICMP id
    // mapping, and a null binding (both *_NAT_DONE, no mapping).
    let e = entry(proto::TCP, "10.1.0.2", "198.51.100.8", ports(40010, 443));
    v.push(natted(e, ("203.0.113.1", 61000), ("198.51.100.8", 443)));
    let e = entry(proto::TCP, "198.51.100.9", "203.0.113.2", ports(40011, 80));
    v.push(natted(e, ("198.51.100.9", 40011), ("10.1.0.3", 8080)));
    let e = entry(proto::UDP, "10.1.0.4", "203.0.113.3", ports(40012, 53));
    v.push(natted(e, ("203.0.113.4", 62000), ("10.9.9.9", 5353)));
    let e = entry(proto::TCP, "fd00::4", "2001:db8::9", ports(40013, 443));
    v.push(natted(e, ("2001:db8:ffff::1", 40013), ("2001:db8::9", 443)));
    let e = entry(
        proto::ICMP,
        "10.1.0.5",
        "198.51.100.10",
        L4::Icmp {
            id: 500,
            kind: 8,
            code: 0,
        },
    );
    v.push(natted(e, ("203.0.113.5", 700), ("198.51.100.10", 0)));
    let e = entry(proto::UDP, "10.1.0.6", "198.51.100.11", ports(40014, 123));
    v.push(natted(e, ("10.1.0.6", 40014), ("198.51.100.11", 123)));
    v
}

#[test]
fn every_protocol_and_nat_variant_round_trips() {
    common::needs!(kernel);
    let ns = Netns::new("ctproto");
    population_labels(&ns);
    let ct = Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink");
    let want = specimens();
    let r = ct.create(&want).expect("create");
    assert_eq!(r.created, want.len() as u64, "{r:?}");
    let got = ct.dump(&Selector::mark(MARK)).expect("dump");
    let diffs = compare(&want, &got, Tolerance::exact_status(5));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    // The null binding really is one: DONE bits, no NAT bits, plain reply.
    let null = got
        .iter()
        .find(|e| e.orig.l4 == ports(40014, 123))
        .expect("null binding");
    assert_eq!(
        null.status & (NAT_DONE | status::SRC_NAT | status::DST_NAT),
        NAT_DONE
    );
    assert!(!null.is_nat());
    // And a second copy of the dump is identical (dump → create → dump is
    // a fixed point), in another namespace.
    let ns2 = Netns::new("ctproto2");
    population_labels(&ns2);
    let ct2 = Ctnetlink::open_in_netns(Path::new(&ns2.path())).expect("ctnetlink");
    assert_eq!(ct2.create(&got).expect("create").created, got.len() as u64);
    let again = ct2.dump(&Selector::mark(MARK)).expect("dump");
    let diffs = compare(&got, &again, Tolerance::exact_status(5));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn wscale_needs_the_window_scale_flag_in_both_directions() {
    common::needs!(kernel);
    let ns = Netns::new("ctws");
    let ct = Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink");
    let mut e = entry(proto::TCP, "10.1.0.1", "198.51.100.1", ports(40000, 443));
    e.protoinfo = Some(ProtoInfo::Tcp {
        state: tcp_state::ESTABLISHED,
        wscale_orig: 7,
        wscale_reply: 9,
        flags_orig: tcp_flag::WINDOW_SCALE,
        flags_reply: 0,
    });
    assert_eq!(ct.create(&[e]).expect("create").created, 1);
    let got = ct.dump(&Selector::mark(MARK)).expect("dump");
    // The kernel ignores the values silently: documented in ctnetlink.
    assert!(matches!(
        got[0].protoinfo,
        Some(ProtoInfo::Tcp {
            wscale_orig: 0,
            wscale_reply: 0,
            ..
        })
    ));
}

fn population_labels(ns: &Netns) {
    common::population::enable_labels(&ns.name);
}

/// DCCP: kernels up to 6.15 track it (ports and protoinfo); 6.16 removed
/// the tracker and handle DCCP like any unknown protocol. Either way the
/// entry is created and read back as the kernel keeps it.
#[test]
fn dccp_round_trips_as_the_kernel_tracks_it() {
    common::needs!(kernel);
    let ns = Netns::new("ctdccp");
    let ct = Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink");
    let mut e = entry(proto::DCCP, "10.1.0.1", "198.51.100.5", ports(40006, 5004));
    e.protoinfo = Some(ProtoInfo::Dccp {
        state: 4, // OPEN
        role: 0,
        handshake_seq: 0x0000_1234_5678_9abc,
    });
    assert_eq!(
        ct.create(std::slice::from_ref(&e)).expect("create").created,
        1
    );
    let got = ct.dump(&Selector::mark(MARK)).expect("dump");
    assert_eq!(got.len(), 1);
    let g = &got[0];
    if g.orig.l4 == L4::None {
        // Generic tracking: no ports, no protocol info.
        assert_eq!(g.protoinfo, None);
        assert_eq!(g.reply.l4, L4::None);
    } else {
        let diffs = compare(&[e], &got, Tolerance::exact_status(5));
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    }
}

/// One handle shared by several threads: creates and dumps interleave
/// without mixing up answers.
#[test]
fn one_handle_serves_several_threads() {
    common::needs!(kernel);
    let ns = Netns::new("ctthreads");
    let ct = Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink");
    std::thread::scope(|s| {
        for t in 0..4u16 {
            let ct = &ct;
            s.spawn(move || {
                let mine: Vec<Entry> = (0..1500u16)
                    .map(|i| {
                        let mut e = entry(
                            proto::UDP,
                            "10.2.0.1",
                            "198.51.100.1",
                            ports(t * 10_000 + i, 53),
                        );
                        e.mark = 1000 + u32::from(t);
                        e
                    })
                    .collect();
                for chunk in mine.chunks(300) {
                    let r = ct.create(chunk).expect("create");
                    assert_eq!(r.created, chunk.len() as u64);
                    let d = ct.dump(&Selector::mark(1000 + u32::from(t))).expect("dump");
                    assert!(d.iter().all(|e| e.mark == 1000 + u32::from(t)));
                }
                let d = ct.dump(&Selector::mark(1000 + u32::from(t))).expect("dump");
                assert_eq!(d.len(), mine.len());
            });
        }
    });
    assert_eq!(ns.conntrack_count(), 6000);
}

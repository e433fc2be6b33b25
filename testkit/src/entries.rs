//! proptest strategies for arbitrary, kernel-plausible conntrack entries:
//! every protocol class, IPv4/IPv6, NAT, zones, labels, protoinfo variants,
//! sequence adjustment and helpers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use conntrack_vmstate::entry::{proto, Entry, ProtoInfo, SeqAdj, Tuple, L4};
use proptest::prelude::*;

pub fn addr(v6: bool) -> BoxedStrategy<IpAddr> {
    if v6 {
        any::<u128>()
            .prop_map(|a| IpAddr::V6(Ipv6Addr::from(a)))
            .boxed()
    } else {
        any::<u32>()
            .prop_map(|a| IpAddr::V4(Ipv4Addr::from(a)))
            .boxed()
    }
}

/// A protocol number consistent with the family.
pub fn protocol(v6: bool) -> BoxedStrategy<u8> {
    let icmp = if v6 { proto::ICMPV6 } else { proto::ICMP };
    prop_oneof![
        4 => Just(proto::TCP),
        3 => Just(proto::UDP),
        1 => Just(proto::UDPLITE),
        1 => Just(proto::SCTP),
        1 => Just(proto::DCCP),
        1 => Just(proto::GRE),
        2 => Just(icmp),
        1 => any::<u8>().prop_filter("other protocol", |p| ![1, 6, 17, 33, 47, 58, 132, 136].contains(p)),
    ]
    .boxed()
}

pub fn l4_for(p: u8) -> BoxedStrategy<L4> {
    match p {
        proto::TCP | proto::UDP | proto::UDPLITE | proto::SCTP | proto::DCCP | proto::GRE => {
            (any::<u16>(), any::<u16>())
                .prop_map(|(src, dst)| L4::Ports { src, dst })
                .boxed()
        }
        proto::ICMP | proto::ICMPV6 => (any::<u16>(), any::<u8>(), any::<u8>())
            .prop_map(|(id, kind, code)| L4::Icmp { id, kind, code })
            .boxed(),
        _ => Just(L4::None).boxed(),
    }
}

fn protoinfo_for(p: u8) -> BoxedStrategy<Option<ProtoInfo>> {
    match p {
        proto::TCP => prop::option::weighted(
            0.9,
            (0u8..10, 0u8..15, 0u8..15, any::<u8>(), any::<u8>()).prop_map(
                |(state, wscale_orig, wscale_reply, flags_orig, flags_reply)| ProtoInfo::Tcp {
                    state,
                    wscale_orig,
                    wscale_reply,
                    flags_orig,
                    flags_reply,
                },
            ),
        )
        .boxed(),
        proto::SCTP => prop::option::of((0u8..10, any::<u32>(), any::<u32>()).prop_map(
            |(state, vtag_orig, vtag_reply)| ProtoInfo::Sctp {
                state,
                vtag_orig,
                vtag_reply,
            },
        ))
        .boxed(),
        proto::DCCP => prop::option::of((0u8..10, 0u8..2, any::<u64>()).prop_map(
            |(state, role, handshake_seq)| ProtoInfo::Dccp {
                state,
                role,
                handshake_seq,
            },
        ))
        .boxed(),
        _ => Just(None).boxed(),
    }
}

fn seq_adj() -> impl Strategy<Value = Option<SeqAdj>> {
    prop::option::weighted(
        0.1,
        (any::<u32>(), any::<i32>(), any::<i32>()).prop_map(|(c, b, a)| SeqAdj {
            correction_pos: c,
            offset_before: b,
            offset_after: a,
        }),
    )
}

/// Any entry the kernel could hold (both tuples of one family and protocol).
pub fn entry() -> impl Strategy<Value = Entry> {
    any::<bool>()
        .prop_flat_map(|v6| (Just(v6), protocol(v6)))
        .prop_flat_map(|(v6, p)| {
            let tuple = (
                addr(v6),
                addr(v6),
                l4_for(p),
                prop::option::weighted(0.1, any::<u16>()),
            );
            (
                tuple.clone(),
                prop::option::weighted(0.15, tuple),
                (
                    any::<u32>(),
                    any::<u32>(),
                    prop_oneof![3 => Just(100u32), 1 => any::<u32>()],
                ),
                (
                    prop_oneof![4 => Just(0u16), 1 => any::<u16>()],
                    prop::option::weighted(0.1, any::<[u8; 16]>()),
                    protoinfo_for(p),
                ),
                (
                    seq_adj(),
                    seq_adj(),
                    prop::option::weighted(0.05, "[a-z][a-z0-9-]{0,15}"),
                ),
                Just(p),
                any::<Option<u32>>(),
            )
        })
        .prop_map(
            |(
                o,
                r,
                (status, timeout, mark),
                (zone, labels, protoinfo),
                (sa_o, sa_r, helper),
                p,
                id,
            )| {
                let orig = Tuple {
                    src: o.0,
                    dst: o.1,
                    proto: p,
                    l4: o.2,
                    zone: o.3,
                };
                let reply = match r {
                    Some(r) => Tuple {
                        src: r.0,
                        dst: r.1,
                        proto: p,
                        l4: r.2,
                        zone: r.3,
                    },
                    None => orig.inverse(),
                };
                Entry {
                    orig,
                    reply,
                    status,
                    timeout,
                    mark,
                    zone,
                    labels,
                    protoinfo,
                    seq_adj_orig: sa_o,
                    seq_adj_reply: sa_r,
                    helper,
                    id,
                }
            },
        )
}

//! Decoder robustness on byte buffers: malformed input is an error with a
//! useful detail, never a panic.

use super::codec::{self, attrs, decode_entry, messages, MsgBuf};
use super::consts::*;
use crate::entry::{proto, status, Entry, ProtoInfo, SeqAdj, Tuple, L4};

fn sample() -> Entry {
    let orig = Tuple {
        src: "2001:db8::1".parse().unwrap(),
        dst: "2001:db8::2".parse().unwrap(),
        proto: proto::TCP,
        l4: L4::Ports {
            src: 1234,
            dst: 443,
        },
        zone: Some(3),
    };
    Entry {
        orig,
        reply: Tuple {
            zone: None,
            ..orig.inverse()
        },
        status: status::CONFIRMED | status::SEEN_REPLY | status::ASSURED,
        timeout: 4321,
        mark: 0xdead_beef,
        zone: 9,
        labels: Some([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]),
        protoinfo: Some(ProtoInfo::Tcp {
            state: 3,
            wscale_orig: 7,
            wscale_reply: 8,
            flags_orig: 0x0b,
            flags_reply: 0x2b,
        }),
        seq_adj_orig: Some(SeqAdj {
            correction_pos: 1,
            offset_before: -2,
            offset_after: 3,
        }),
        seq_adj_reply: None,
        helper: Some("ftp".into()),
        id: None,
    }
}

/// The payload (nfgenmsg + attributes) of a create message for `e`.
fn payload(e: &Entry) -> Vec<u8> {
    let mut m = MsgBuf::with_capacity(512);
    codec::encode_create(&mut m, e, 1);
    m.buf[NLMSG_HDRLEN..].to_vec()
}

#[test]
fn create_message_decodes_back_to_the_entry() {
    let e = sample();
    let got = decode_entry(&payload(&e)).expect("decode");
    assert_eq!(got, e);
    let mut icmp = sample();
    icmp.orig = Tuple {
        src: "10.0.0.1".parse().unwrap(),
        dst: "10.0.0.2".parse().unwrap(),
        proto: proto::ICMP,
        l4: L4::Icmp {
            id: 7,
            kind: 8,
            code: 0,
        },
        zone: None,
    };
    icmp.reply = icmp.orig.inverse();
    icmp.protoinfo = None;
    assert_eq!(decode_entry(&payload(&icmp)).expect("decode"), icmp);
}

#[test]
fn every_truncation_is_an_error_or_a_shorter_entry_never_a_panic() {
    let p = payload(&sample());
    for cut in 0..p.len() {
        if let Ok(e) = decode_entry(&p[..cut]) {
            // Only a cut between top-level attributes can still decode.
            assert_eq!(e.orig, sample().orig);
        }
    }
    assert!(decode_entry(&p[..3]).unwrap_err().0.contains("no nfgenmsg"));
    // A cut in the middle of the first tuple.
    let err = decode_entry(&p[..NFGENMSG_LEN + 20]).unwrap_err();
    assert!(err.0.contains("length"), "{err}");
}

#[test]
fn bad_attribute_lengths_are_errors() {
    // Attribute claiming 200 bytes in a 8-byte buffer.
    let buf = [200u8, 0, 1, 0, 0, 0, 0, 0];
    let e = attrs(&buf).next().unwrap().unwrap_err();
    assert_eq!(e.0, "attribute type 1 has length 200, outside 4..=8");
    // Length below the header size.
    let buf = [2u8, 0, 1, 0];
    assert!(attrs(&buf).next().unwrap().is_err());
    // Three stray bytes.
    let buf = [1u8, 2, 3];
    assert!(attrs(&buf)
        .next()
        .unwrap()
        .unwrap_err()
        .0
        .contains("truncated"));

    // A status of 3 bytes inside an otherwise valid entry.
    let mut m = MsgBuf::with_capacity(256);
    m.begin_msg(IPCTNL_MSG_CT_NEW, 0, 1, AF_INET);
    let e = sample();
    m.tuple(CTA_TUPLE_ORIG, &e.orig);
    m.tuple(CTA_TUPLE_REPLY, &e.reply);
    m.attr(CTA_STATUS, &[0, 0, 8]);
    m.end_msg();
    let err = decode_entry(&m.buf[NLMSG_HDRLEN..]).unwrap_err();
    assert_eq!(err.0, "status: expected 4 bytes, got 3");
}

#[test]
fn semantic_errors_are_reported() {
    type Build = Box<dyn Fn(&mut MsgBuf)>;
    let cases: Vec<(Build, &str)> = vec![
        (
            Box::new(|m| m.tuple(CTA_TUPLE_REPLY, &sample().reply)),
            "without original tuple",
        ),
        (
            Box::new(|m| m.tuple(CTA_TUPLE_ORIG, &sample().orig)),
            "without reply tuple",
        ),
        (
            Box::new(|m| {
                m.tuple(CTA_TUPLE_ORIG, &sample().orig);
                m.tuple(CTA_TUPLE_REPLY, &sample().reply);
                m.attr(CTA_LABELS, &[0xff; 20]);
            }),
            "labels of 20 bytes",
        ),
        (
            Box::new(|m| {
                m.nest(CTA_TUPLE_ORIG);
                m.nest(CTA_TUPLE_IP);
                m.attr(CTA_IP_V4_SRC, &[10, 0, 0, 1]);
                m.attr(CTA_IP_V6_DST, &[0; 16]);
                m.end_nest();
                m.nest(CTA_TUPLE_PROTO);
                m.u8(CTA_PROTO_NUM, proto::UDP);
                m.end_nest();
                m.end_nest();
            }),
            "mixes IPv4 and IPv6",
        ),
        (
            Box::new(|m| {
                let mut t = sample().orig;
                t.l4 = L4::None; // a TCP tuple without ports
                m.tuple(CTA_TUPLE_ORIG, &t);
            }),
            "of protocol 6 without ports",
        ),
        (
            Box::new(|m| {
                m.tuple(CTA_TUPLE_ORIG, &sample().orig);
                let mut r = sample().reply;
                r.proto = proto::UDP;
                m.tuple(CTA_TUPLE_REPLY, &r);
            }),
            "disagree on protocol",
        ),
        (
            Box::new(|m| {
                m.tuple(CTA_TUPLE_ORIG, &sample().orig);
                m.tuple(CTA_TUPLE_REPLY, &sample().reply);
                m.nest(CTA_PROTOINFO);
                m.nest(CTA_PROTOINFO_TCP);
                m.u8(CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, 1);
                m.end_nest();
                m.end_nest();
            }),
            "tcp protoinfo without state",
        ),
    ];
    for (build, want) in cases {
        let mut m = MsgBuf::with_capacity(256);
        m.begin_msg(IPCTNL_MSG_CT_NEW, 0, 1, AF_INET);
        build(&mut m);
        m.end_msg();
        let err = decode_entry(&m.buf[NLMSG_HDRLEN..]).unwrap_err();
        assert!(err.0.contains(want), "{err} lacks {want:?}");
    }
}

#[test]
fn unknown_attributes_are_skipped() {
    let mut m = MsgBuf::with_capacity(512);
    m.begin_msg(IPCTNL_MSG_CT_NEW, 0, 1, AF_INET6);
    m.attr(200, &[1, 2, 3, 4, 5]);
    let e = sample();
    m.tuple(CTA_TUPLE_ORIG, &e.orig);
    m.tuple(CTA_TUPLE_REPLY, &e.reply);
    m.nest(99);
    m.attr(1, &[0; 7]);
    m.end_nest();
    m.be32(CTA_STATUS, e.status);
    m.end_msg();
    let got = decode_entry(&m.buf[NLMSG_HDRLEN..]).expect("decode");
    assert_eq!(
        (got.orig, got.reply, got.status),
        (e.orig, e.reply, e.status)
    );
}

#[test]
fn bad_message_headers_are_errors() {
    let mut m = MsgBuf::with_capacity(256);
    codec::encode_create(&mut m, &sample(), 5);
    let mut buf = m.buf.clone();
    let msgs: Vec<_> = messages(&buf).collect();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].as_ref().unwrap().seq, 5);
    buf[0..4].copy_from_slice(&10_000u32.to_ne_bytes());
    let e = messages(&buf).next().unwrap().unwrap_err();
    assert!(e.0.contains("outside 16..="), "{e}");
    assert!(messages(&buf[..10]).next().unwrap().is_err());
    assert!(codec::error_code(&[1, 2]).is_err());
    assert_eq!(codec::error_code(&(-17i32).to_ne_bytes()), Ok(17));
}

proptest::proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
        let _ = decode_entry(&bytes);
        for m in messages(&bytes).flatten() {
            let _ = decode_entry(m.payload);
        }
    }

    #[test]
    fn flipped_bytes_in_a_valid_message_never_panic(at in 0usize..400, val in proptest::num::u8::ANY) {
        let mut p = payload(&sample());
        let i = at % p.len();
        p[i] = val;
        let _ = decode_entry(&p);
    }
}

/// Set on every message of a dump answer (the codec does not need it).
const NLM_F_MULTI: u16 = 0x02;

/// One raw netlink message, padded to 4 bytes as the kernel sends it.
fn nlmsg(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = (NLMSG_HDRLEN + payload.len()) as u32;
    let mut b = Vec::new();
    b.extend_from_slice(&len.to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(payload);
    b.resize(codec::align4(b.len()), 0);
    b
}

/// An entry message of a dump answer with sequence number `seq`.
fn dumped(e: &Entry, seq: u32, flags: u16) -> Vec<u8> {
    nlmsg(super::CT_NEW_TYPE, flags, seq, &payload(e))
}

fn errno_payload(errno: i32) -> Vec<u8> {
    (-errno).to_ne_bytes().to_vec()
}

#[test]
fn dump_datagrams_are_followed_to_done() {
    use super::{walk_datagram, Walk, WalkError};
    let e = sample();
    let mut other = sample();
    other.timeout = 0; // expired: dropped
    let mut out = Vec::new();
    let mut seen = 0;
    let mut keep = |_: &Entry| {
        seen += 1;
        true
    };
    // Two entries of this dump, one of an abandoned earlier one (seq 6).
    let mut d = dumped(&e, 7, NLM_F_MULTI);
    d.extend(dumped(&e, 6, NLM_F_MULTI));
    d.extend(dumped(&other, 7, NLM_F_MULTI));
    assert!(matches!(
        walk_datagram(&d, 7, &mut out, &mut keep),
        Ok(Walk::More { interrupted: false })
    ));
    assert_eq!(out, vec![e.clone()]);
    // The next datagram ends the dump; the kernel flagged it interrupted.
    let mut d = dumped(&e, 7, NLM_F_MULTI | NLM_F_DUMP_INTR);
    d.extend(nlmsg(NLMSG_DONE, NLM_F_MULTI, 7, &errno_payload(0)));
    assert!(matches!(
        walk_datagram(&d, 7, &mut out, &mut keep),
        Ok(Walk::Done { interrupted: true })
    ));
    assert_eq!(out.len(), 2);
    assert_eq!(seen, 2, "expired and foreign entries never reach `keep`");

    // A dump that failed midway says so in DONE, or answers NLMSG_ERROR.
    let d = nlmsg(NLMSG_DONE, NLM_F_MULTI, 7, &errno_payload(libc::EINTR));
    assert!(matches!(
        walk_datagram(&d, 7, &mut out, &mut |_| true),
        Err(WalkError::Errno(libc::EINTR))
    ));
    let d = nlmsg(NLMSG_ERROR, 0, 7, &errno_payload(libc::EPERM));
    assert!(matches!(
        walk_datagram(&d, 7, &mut out, &mut |_| true),
        Err(WalkError::Errno(libc::EPERM))
    ));
    // Errors of other requests are not ours.
    let d = nlmsg(NLMSG_ERROR, 0, 3, &errno_payload(libc::EPERM));
    assert!(matches!(
        walk_datagram(&d, 7, &mut out, &mut |_| true),
        Ok(Walk::More { .. })
    ));
    let d = nlmsg(NLMSG_OVERRUN, 0, 7, &[]);
    assert!(matches!(
        walk_datagram(&d, 7, &mut out, &mut |_| true),
        Ok(Walk::Overrun)
    ));
    // A broken entry or header fails the dump with the decoder's detail.
    let mut bad = dumped(&e, 7, NLM_F_MULTI);
    bad.truncate(NLMSG_HDRLEN + 2);
    bad[..4].copy_from_slice(&((NLMSG_HDRLEN + 2) as u32).to_ne_bytes());
    match walk_datagram(&bad, 7, &mut out, &mut |_| true) {
        Err(WalkError::Malformed(d)) => assert!(d.contains("nfgenmsg"), "{d}"),
        _ => panic!("accepted a truncated entry"),
    }
    let d = nlmsg(NLMSG_DONE, 0, 7, &[]);
    assert!(matches!(
        walk_datagram(&d[..10], 7, &mut out, &mut |_| true),
        Err(WalkError::Malformed(_))
    ));
}

#[test]
fn background_work_runs_on_another_thread_at_a_lower_priority() {
    let nice = || {
        // SAFETY: plain syscalls about the calling thread.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            (tid, libc::getpriority(libc::PRIO_PROCESS, tid))
        }
    };
    let (me, before) = nice();
    let (tid, inside) = super::at_low_priority(nice);
    assert_ne!(tid, me, "a thread of its own");
    assert_eq!(inside, (before + super::BACKGROUND_NICE).min(19));
    assert_eq!(nice(), (me, before), "the caller keeps its priority");
    // Results and panics come back to the caller.
    assert_eq!(super::at_low_priority(|| 7), 7);
    let p = std::panic::catch_unwind(|| super::at_low_priority(|| panic!("bug")));
    assert!(p.is_err());
}

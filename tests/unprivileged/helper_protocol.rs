//! Helper protocol: encode/decode round trips, validation of hostile
//! requests, and the client's reconnect/timeout behaviour against a real
//! helper server on a unix socket.
//!
//! The server here runs over a recording in-memory table instead of the
//! kernel: these tests are about what the protocol layer lets through, and
//! "nothing reached the kernel" is asserted by the table never seeing a call.
//! The same paths against the kernel's conntrack are in `helper_kernel.rs`.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// The kit's fake in its in-memory-table form: an unfiltered dump, a
// selector-applying save_state, every call recorded.
use common::fake::{Call, FakeAccess as Table};
use conntrack_vmstate::access::{
    AccessError, CacheMiss, ConntrackAccess, CreateReport, DeleteReport, DumpSource, SaveNotes,
    WarmState, Warmth,
};
use conntrack_vmstate::entry::{proto, status, Entry, ProtoInfo, Selector, SeqAdj, Tuple, L4};
use conntrack_vmstate::format::{self, EncodeOptions, Format};
use conntrack_vmstate::helper::wire::{self, Request, Response, WireError};
use conntrack_vmstate::helper::{serve, server, HelperClient, ServeSummary, ServerConfig};
use proptest::prelude::*;

// ------------------------------------------------------------------ fixtures

fn tcp4(mark: u32, sport: u16) -> Entry {
    let orig = Tuple {
        src: "10.0.0.2".parse().unwrap(),
        dst: "192.0.2.10".parse().unwrap(),
        proto: proto::TCP,
        l4: L4::Ports {
            src: sport,
            dst: 443,
        },
        zone: None,
    };
    Entry {
        orig,
        reply: orig.inverse(),
        status: status::SEEN_REPLY | status::ASSURED | status::CONFIRMED,
        timeout: 431_000,
        mark,
        zone: 0,
        labels: None,
        protoinfo: Some(ProtoInfo::Tcp {
            state: 3,
            wscale_orig: 7,
            wscale_reply: 9,
            flags_orig: 0x23,
            flags_reply: 0x23,
        }),
        seq_adj_orig: None,
        seq_adj_reply: None,
        helper: None,
        id: Some(0xdead_beef),
    }
}

/// Every optional attribute present, NAT reply tuple, IPv6, zones.
fn rich6(mark: u32) -> Entry {
    let orig = Tuple {
        src: "2001:db8::2".parse().unwrap(),
        dst: "2001:db8:ffff::1".parse().unwrap(),
        proto: proto::SCTP,
        l4: L4::Ports {
            src: 5000,
            dst: 36412,
        },
        zone: Some(7),
    };
    let mut reply = orig.inverse();
    reply.dst = "2001:db8:1::99".parse().unwrap();
    Entry {
        orig,
        reply,
        status: status::SEEN_REPLY | status::CONFIRMED | status::SRC_NAT | status::SRC_NAT_DONE,
        timeout: 17,
        mark,
        zone: 7,
        labels: Some([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]),
        protoinfo: Some(ProtoInfo::Sctp {
            state: 3,
            vtag_orig: 0x1234_5678,
            vtag_reply: 0x9abc_def0,
        }),
        seq_adj_orig: Some(SeqAdj {
            correction_pos: 1000,
            offset_before: -5,
            offset_after: 12,
        }),
        seq_adj_reply: Some(SeqAdj {
            correction_pos: 2000,
            offset_before: 3,
            offset_after: -4,
        }),
        helper: Some("ftp".into()),
        id: None,
    }
}

fn icmp4(mark: u32) -> Entry {
    let orig = Tuple {
        src: "10.0.0.2".parse().unwrap(),
        dst: "198.51.100.1".parse().unwrap(),
        proto: proto::ICMP,
        l4: L4::Icmp {
            id: 77,
            kind: 8,
            code: 0,
        },
        zone: None,
    };
    Entry {
        orig,
        reply: orig.inverse(),
        status: status::CONFIRMED,
        timeout: 29,
        mark,
        zone: 0,
        labels: None,
        protoinfo: Some(ProtoInfo::Dccp {
            state: 1,
            role: 2,
            handshake_seq: u64::MAX - 3,
        }),
        seq_adj_orig: None,
        seq_adj_reply: None,
        helper: None,
        id: None,
    }
}

fn gre6(mark: u32) -> Entry {
    let orig = Tuple {
        src: "fe80::1".parse().unwrap(),
        dst: "fe80::2".parse().unwrap(),
        proto: 99,
        l4: L4::None,
        zone: None,
    };
    Entry {
        orig,
        reply: orig.inverse(),
        status: 0,
        timeout: 1,
        mark,
        zone: 65535,
        labels: Some([0; 16]),
        protoinfo: None,
        seq_adj_orig: None,
        seq_adj_reply: None,
        helper: None,
        id: Some(0),
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

struct Server {
    path: PathBuf,
    _dir: tempfile::TempDir,
    handle: Option<JoinHandle<ServeSummary>>,
}

impl Server {
    fn start(table: Arc<Table>, cfg: ServerConfig) -> Server {
        let dir = tempfile::Builder::new()
            .prefix(&format!(
                "cvs-helper-{}-{}-",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ))
            .tempdir()
            .unwrap();
        let path = dir.path().join("helper.sock");
        let mut s = Server {
            path,
            _dir: dir,
            handle: None,
        };
        s.restart(table, cfg);
        s
    }
    fn restart(&mut self, table: Arc<Table>, cfg: ServerConfig) {
        let _ = std::fs::remove_file(&self.path);
        let l = UnixListener::bind(&self.path).unwrap();
        self.handle = Some(std::thread::spawn(move || serve(l, table, cfg).unwrap()));
    }
    /// Waits (bounded) for an idle server to exit by itself.
    fn wait_exit(&mut self, bound: Duration) -> ServeSummary {
        let h = self.handle.take().expect("running");
        let t0 = Instant::now();
        while !h.is_finished() {
            assert!(t0.elapsed() < bound, "server did not exit within {bound:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        h.join().unwrap()
    }
    fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

/// Unconfined: these tests drive every op directly, without the watches
/// a confined helper wants first (tests/confine_helper.rs tests that).
fn cfg_idle(ms: u64) -> ServerConfig {
    ServerConfig {
        idle_timeout: Some(Duration::from_millis(ms)),
        confined: false,
        ..ServerConfig::default()
    }
}

/// Sends raw bytes and reads one reply frame (None: closed without reply).
fn exchange(s: &mut UnixStream, bytes: &[u8]) -> Option<Response> {
    s.write_all(bytes).unwrap();
    read_reply(s)
}

fn read_reply(s: &mut UnixStream) -> Option<Response> {
    let mut len = [0u8; 4];
    if s.read_exact(&mut len).is_err() {
        return None;
    }
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut buf).unwrap();
    Some(wire::decode_response(&buf).unwrap())
}

fn error_text(r: Option<Response>) -> String {
    match r {
        Some(Response::Error(m)) => m,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

fn payload(frame: &[u8]) -> &[u8] {
    &frame[4..]
}

// ------------------------------------------------------------- round trips

#[test]
fn every_request_round_trips() {
    let entries = vec![tcp4(100, 1), rich6(100), icmp4(100), gre6(100)];
    let sel = Selector {
        mark: 100,
        mark_mask: 0xffff,
        zone: Some(7),
    };
    for req in [
        Request::Dump(sel),
        Request::DeleteSelected(Selector::mark(5)),
        Request::Create(sel, entries.clone()),
        Request::CreateBackground(sel, entries.clone()),
        Request::DeleteEntries(Selector::mark(100), entries),
        Request::Create(Selector::mark(1), vec![]),
        Request::Watch(sel, true),
        Request::Watch(Selector::mark(7), false),
        Request::DumpSourced(sel),
        Request::SaveState(sel, 1_048_576, Format::Binary),
        Request::SaveState(Selector::mark(3), 32, Format::ConntrackSave),
        Request::SaveState(Selector::mark(3), u32::MAX, Format::Binary),
        Request::DeleteSaved(sel, vec![1, u32::MAX, 0, 1]),
        Request::DeleteSaved(Selector::mark(1), vec![]),
        Request::WaitWarm(sel, 10_000),
        Request::WaitWarm(Selector::mark(3), u32::MAX),
        Request::SaveStateNoted(sel, 1_048_576, Format::Binary),
        Request::SaveStateNoted(Selector::mark(3), 32, Format::ConntrackSave),
    ] {
        let f = wire::encode_request(&req);
        assert_eq!(
            u32::from_le_bytes(f[..4].try_into().unwrap()) as usize,
            f.len() - 4
        );
        assert_eq!(f[4], wire::VERSION);
        assert_eq!(wire::decode_request(payload(&f)).unwrap(), req);
    }
}

#[test]
fn every_response_round_trips() {
    for resp in [
        Response::Error("no such thing".into()),
        Response::Entries(vec![rich6(3), tcp4(3, 9)]),
        Response::Entries(vec![]),
        Response::Created(CreateReport {
            created: 5,
            existed: 2,
            refused: 3,
            refused_by_errno: vec![(16, 2), (22, 1)],
        }),
        Response::Deleted(u64::MAX),
        Response::Watching(3),
        Response::SourcedEntries(DumpSource::Cache, vec![rich6(3)]),
        Response::SourcedEntries(DumpSource::Kernel, vec![]),
        Response::DeleteReport(DeleteReport {
            deleted: 8,
            missing: 1,
        }),
        Response::SavedState(
            DumpSource::Cache,
            3,
            u64::MAX,
            vec![7, 8, u32::MAX],
            b"CTVS and some bytes".to_vec(),
        ),
        Response::SavedState(DumpSource::Kernel, 0, 0, vec![], vec![0]),
        Response::Warmth(Warmth {
            state: WarmState::Warm,
            entries: 100_000,
            silent: 3,
            base_records: 99_000,
            events_sysctl: Some(1),
        }),
        Response::Warmth(Warmth::of(WarmState::Uncached)),
        Response::Warmth(Warmth::of(WarmState::Unknown)),
        Response::Warmth(Warmth {
            events_sysctl: Some(u32::MAX - 1),
            ..Warmth::of(WarmState::Cold(CacheMiss::EventsOff))
        }),
        Response::SavedStateNoted(
            DumpSource::Kernel,
            3,
            1,
            vec![7, 8, 9],
            b"CTVS".to_vec(),
            SaveNotes {
                miss: Some(CacheMiss::LookupsCostly),
                silent: 20_000,
                lookups: 0,
                lookup_us: 0,
            },
        ),
        Response::SavedStateNoted(
            DumpSource::Base,
            0,
            0,
            vec![],
            vec![0],
            SaveNotes::default(),
        ),
    ] {
        let f = wire::encode_response(&resp);
        assert_eq!(wire::decode_response(payload(&f)).unwrap(), resp);
    }
}

fn arb_tuple(v6: bool) -> impl Strategy<Value = Tuple> {
    let addr = move || {
        if v6 {
            any::<u128>().prop_map(|a| IpAddr::V6(a.into())).boxed()
        } else {
            any::<u32>().prop_map(|a| IpAddr::V4(a.into())).boxed()
        }
    };
    let l4 = prop_oneof![
        Just(L4::None),
        (any::<u16>(), any::<u16>()).prop_map(|(src, dst)| L4::Ports { src, dst }),
        (any::<u16>(), any::<u8>(), any::<u8>()).prop_map(|(id, kind, code)| L4::Icmp {
            id,
            kind,
            code
        }),
    ];
    (addr(), addr(), any::<u8>(), l4, any::<Option<u16>>()).prop_map(
        |(src, dst, proto, l4, zone)| Tuple {
            src,
            dst,
            proto,
            l4,
            zone,
        },
    )
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    let pi = prop_oneof![
        Just(None),
        any::<[u8; 5]>().prop_map(|b| Some(ProtoInfo::Tcp {
            state: b[0],
            wscale_orig: b[1],
            wscale_reply: b[2],
            flags_orig: b[3],
            flags_reply: b[4]
        })),
        (any::<u8>(), any::<u32>(), any::<u32>()).prop_map(|(state, vtag_orig, vtag_reply)| Some(
            ProtoInfo::Sctp {
                state,
                vtag_orig,
                vtag_reply
            }
        )),
        (any::<u8>(), any::<u8>(), any::<u64>()).prop_map(|(state, role, handshake_seq)| Some(
            ProtoInfo::Dccp {
                state,
                role,
                handshake_seq
            }
        )),
    ];
    let seq = || {
        proptest::option::of(
            (any::<u32>(), any::<i32>(), any::<i32>()).prop_map(|(a, b, c)| SeqAdj {
                correction_pos: a,
                offset_before: b,
                offset_after: c,
            }),
        )
    };
    any::<bool>()
        .prop_flat_map(move |v6| {
            (
                arb_tuple(v6),
                arb_tuple(v6),
                (any::<u32>(), any::<u32>(), any::<u32>(), any::<u16>()),
                any::<Option<[u8; 16]>>(),
                pi.clone(),
                seq(),
                seq(),
                proptest::option::of("[a-z0-9-]{1,15}"),
                any::<Option<u32>>(),
            )
        })
        .prop_map(
            |(
                orig,
                mut reply,
                (status, timeout, mark, zone),
                labels,
                protoinfo,
                sa,
                sb,
                helper,
                id,
            )| {
                reply.proto = orig.proto;
                Entry {
                    orig,
                    reply,
                    status,
                    timeout,
                    mark,
                    zone,
                    labels,
                    protoinfo,
                    seq_adj_orig: sa,
                    seq_adj_reply: sb,
                    helper,
                    id,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn arbitrary_entries_round_trip(entries in proptest::collection::vec(arb_entry(), 0..40)) {
        let req = Request::DeleteEntries(Selector::mark(1), entries.clone());
        let f = wire::encode_request(&req);
        prop_assert_eq!(wire::decode_request(payload(&f)).unwrap(), req);
        let resp = Response::Entries(entries);
        let f = wire::encode_response(&resp);
        prop_assert_eq!(wire::decode_response(payload(&f)).unwrap(), resp);
    }

    /// Truncating or flipping any byte gives an error or a different but
    /// well-formed request; it never panics.
    #[test]
    fn corrupted_requests_never_panic(
        entries in proptest::collection::vec(arb_entry(), 1..8),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let f = wire::encode_request(&Request::Create(Selector::mark(1), entries));
        let p = payload(&f);
        let n = cut.index(p.len());
        prop_assert!(wire::decode_request(&p[..n]).is_err());
        let mut q = p.to_vec();
        let i = flip.index(q.len());
        q[i] ^= 1 << bit;
        let _ = wire::decode_request(&q);
        let _ = wire::decode_response(&q);
    }
}

#[test]
fn decode_errors_are_specific() {
    let f = wire::encode_request(&Request::Dump(Selector::mark(100)));
    let mut p = payload(&f).to_vec();
    p[0] = 2;
    assert_eq!(
        wire::decode_request(&p).unwrap_err().to_string(),
        "unsupported protocol version 2 (this side speaks 1)"
    );
    let mut p = payload(&f).to_vec();
    p[1] = 0x7f;
    assert_eq!(wire::decode_request(&p), Err(WireError::Opcode(0x7f)));
    let mut p = payload(&f).to_vec();
    p.push(0);
    assert_eq!(wire::decode_request(&p), Err(WireError::Trailing(1)));
    assert_eq!(
        wire::decode_request(&payload(&f)[..5])
            .unwrap_err()
            .to_string(),
        "frame truncated: needed 1 more bytes at offset 2"
    );
    // Count far above the limit: refused before any allocation.
    let mut p = vec![wire::VERSION, wire::op::CREATE];
    p.extend_from_slice(&100u32.to_le_bytes());
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    p.push(0);
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        wire::decode_request(&p).unwrap_err().to_string(),
        "4294967295 entries exceed the limit of 65536 per request"
    );
    // Count within the limit but more than the bytes can hold.
    let mut p = vec![wire::VERSION, wire::op::CREATE];
    p.extend_from_slice(&100u32.to_le_bytes());
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    p.push(0);
    p.extend_from_slice(&60_000u32.to_le_bytes());
    p.extend_from_slice(&[0u8; 100]);
    assert!(matches!(
        wire::decode_request(&p),
        Err(WireError::Truncated { .. })
    ));
    // A helper name longer than the kernel allows.
    let mut e = tcp4(100, 1);
    e.helper = Some("a-very-long-helper-name".into());
    let f = wire::encode_request(&Request::Create(Selector::mark(100), vec![e]));
    assert!(wire::decode_request(payload(&f))
        .unwrap_err()
        .to_string()
        .starts_with("invalid helper name length 23"),);
    // A tuple mixing IPv4 and IPv6.
    let mut e = tcp4(100, 1);
    e.orig.dst = "::1".parse().unwrap();
    let f = wire::encode_request(&Request::Create(Selector::mark(100), vec![e]));
    assert!(wire::decode_request(payload(&f))
        .unwrap_err()
        .to_string()
        .starts_with("invalid address family 0"),);
}

// ------------------------------------------------------ server validation

#[test]
fn requests_outside_their_selector_never_reach_the_table() {
    let table = Table::with(vec![tcp4(100, 1), tcp4(200, 2)]);
    let srv = Server::start(table.clone(), cfg_idle(60_000));
    let mut s = srv.raw();
    let cases: Vec<(Request, &str)> = vec![
        (
            Request::Create(Selector::mark(100), vec![tcp4(100, 5), tcp4(200, 6)]),
            "create refused: entry 1 (mark 0xc8, zone 0) is outside the request's selector (mark 0x64/0xffffffff)",
        ),
        (
            Request::DeleteEntries(Selector::mark(100), vec![tcp4(200, 2)]),
            "delete-entries refused: entry 0 (mark 0xc8, zone 0) is outside the request's selector (mark 0x64/0xffffffff)",
        ),
        (
            Request::DeleteEntries(
                Selector {
                    mark: 100,
                    mark_mask: u32::MAX,
                    zone: Some(3),
                },
                vec![tcp4(100, 1)],
            ),
            "delete-entries refused: entry 0 (mark 0x64, zone 0) is outside the request's selector (mark 0x64/0xffffffff, zone 3)",
        ),
        (
            Request::Dump(Selector {
                mark: 100,
                mark_mask: 0,
                zone: None,
            }),
            "dump refused: selector mark 0x64/0x0 would select unmarked entries; refused",
        ),
        (
            Request::DeleteSelected(Selector::mark(0)),
            "delete-selected refused: selector mark 0x0/0xffffffff would select unmarked entries; refused",
        ),
        (
            Request::DeleteSelected(Selector {
                mark: 0x1_0000,
                mark_mask: 0xffff,
                zone: None,
            }),
            "delete-selected refused: selector mark 0x10000/0xffff would select unmarked entries; refused",
        ),
        (
            Request::Create(Selector::mark(100), {
                let mut e = tcp4(100, 1);
                e.reply.proto = proto::UDP;
                vec![e]
            }),
            "create refused: entry 0: reply protocol 17 differs from original protocol 6",
        ),
    ];
    for (req, want) in cases {
        let got = error_text(exchange(&mut s, &wire::encode_request(&req)));
        assert_eq!(got, want);
    }
    // The same connection still works after every refusal.
    match exchange(
        &mut s,
        &wire::encode_request(&Request::Dump(Selector::mark(200))),
    ) {
        Some(Response::Entries(es)) => assert_eq!(es, vec![tcp4(200, 2)]),
        other => panic!("{other:?}"),
    }
    assert_eq!(table.calls(), vec![Call::Dump(Selector::mark(200))]);
    assert_eq!(table.entries.lock().unwrap().len(), 2);
}

#[test]
fn malformed_frames_get_error_replies_and_the_connection_survives() {
    let table = Table::with(vec![tcp4(100, 1)]);
    let srv = Server::start(table.clone(), cfg_idle(60_000));
    let mut s = srv.raw();
    let frame = |p: &[u8]| {
        let mut f = (p.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(p);
        f
    };
    assert_eq!(
        error_text(exchange(&mut s, &frame(&[]))),
        "malformed request: frame truncated: needed 1 more bytes at offset 0"
    );
    assert_eq!(
        error_text(exchange(&mut s, &frame(&[7, 1]))),
        "malformed request: unsupported protocol version 7 (this side speaks 1)"
    );
    assert_eq!(
        error_text(exchange(&mut s, &frame(&[1, 0x81]))),
        "malformed request: unknown opcode 0x81"
    );
    assert_eq!(
        error_text(exchange(
            &mut s,
            &frame(&[1, 1, 100, 0, 0, 0, 255, 255, 255, 255, 2])
        )),
        "malformed request: invalid zone flag 2 at offset 10"
    );
    let garbage: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert!(error_text(exchange(&mut s, &frame(&garbage))).starts_with("malformed request: "));
    match exchange(
        &mut s,
        &wire::encode_request(&Request::Dump(Selector::mark(100))),
    ) {
        Some(Response::Entries(es)) => assert_eq!(es.len(), 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(table.calls().len(), 1);
}

#[test]
fn oversized_frame_is_refused_and_only_that_connection_closed() {
    let table = Table::with(vec![tcp4(100, 1)]);
    let srv = Server::start(table.clone(), cfg_idle(60_000));
    let mut bystander = srv.raw();
    let mut s = srv.raw();
    let len = (wire::MAX_REQUEST as u32 + 1).to_le_bytes();
    assert_eq!(
        error_text(exchange(&mut s, &len)),
        "request of 16777217 bytes exceeds the limit of 16777216 bytes"
    );
    assert!(read_reply(&mut s).is_none(), "connection must be closed");
    match exchange(
        &mut bystander,
        &wire::encode_request(&Request::Dump(Selector::mark(100))),
    ) {
        Some(Response::Entries(es)) => assert_eq!(es.len(), 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn stalled_partial_frame_is_dropped_without_blocking_others() {
    let table = Table::with(vec![tcp4(100, 1)]);
    let srv = Server::start(
        table.clone(),
        ServerConfig {
            frame_timeout: Duration::from_millis(400),
            ..cfg_idle(60_000)
        },
    );
    let mut staller = srv.raw();
    staller.write_all(&[50, 0, 0, 0, 1, 1]).unwrap();
    let mut other = srv.raw();
    match exchange(
        &mut other,
        &wire::encode_request(&Request::Dump(Selector::mark(100))),
    ) {
        Some(Response::Entries(es)) => assert_eq!(es.len(), 1),
        r => panic!("{r:?}"),
    }
    let t0 = Instant::now();
    assert!(read_reply(&mut staller).is_none());
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(table.calls().len(), 1);
}

#[test]
fn dump_returns_only_the_selected_mark_even_if_the_table_overshares() {
    let table = Table::with(vec![tcp4(100, 1), tcp4(200, 2), rich6(100), tcp4(0, 3)]);
    let srv = Server::start(table.clone(), cfg_idle(60_000));
    let c = HelperClient::new(&srv.path).unwrap();
    let got = c.dump(&Selector::mark(100)).unwrap();
    assert_eq!(got, vec![tcp4(100, 1), rich6(100)]);
    let got = c
        .dump(&Selector {
            mark: 100,
            mark_mask: u32::MAX,
            zone: Some(7),
        })
        .unwrap();
    assert_eq!(got, vec![rich6(100)]);
}

#[test]
fn a_panicking_codec_costs_one_reply_not_the_helper() {
    let table = Table::with(vec![tcp4(100, 1)]);
    table.panic_on_dump.store(true, Ordering::SeqCst);
    let srv = Server::start(table.clone(), cfg_idle(60_000));
    let c = HelperClient::new(&srv.path).unwrap();
    let err = c.dump(&Selector::mark(100)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "conntrack helper unavailable: helper refused dump: dump failed: internal error in the helper"
    );
    table.panic_on_dump.store(false, Ordering::SeqCst);
    assert_eq!(c.dump(&Selector::mark(100)).unwrap().len(), 1);
}

#[test]
fn too_many_connections_are_answered_and_closed() {
    let table = Table::with(vec![]);
    let srv = Server::start(
        table,
        ServerConfig {
            max_connections: 2,
            ..cfg_idle(60_000)
        },
    );
    let mut a = srv.raw();
    let mut b = srv.raw();
    // Make sure both are accepted and counted before the third arrives.
    for s in [&mut a, &mut b] {
        assert!(matches!(
            exchange(s, &wire::encode_request(&Request::Dump(Selector::mark(1)))),
            Some(Response::Entries(_))
        ));
    }
    let mut c = srv.raw();
    assert_eq!(
        error_text(read_reply(&mut c)),
        "too many connections (limit 2)"
    );
    drop(a);
    // Once one closes, new connections are served again (bounded wait).
    let t0 = Instant::now();
    loop {
        let mut d = srv.raw();
        // Until the server has seen `a` close, it may still refuse (and
        // close) `d`, so the write may fail too.
        let r = d
            .write_all(&wire::encode_request(&Request::Dump(Selector::mark(1))))
            .ok()
            .and_then(|()| read_reply(&mut d));
        if matches!(r, Some(Response::Entries(_))) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{r:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------------ client

#[test]
fn client_create_splits_by_mark_and_counts_unmarked_as_refused() {
    let table = Table::with(vec![tcp4(100, 1)]);
    let srv = Server::start(table.clone(), cfg_idle(60_000));
    let c = HelperClient::new(&srv.path).unwrap();
    let mut expected = tcp4(100, 4);
    expected.status |= status::EXPECTED;
    let batch = vec![
        tcp4(100, 1),
        tcp4(200, 2),
        tcp4(100, 3),
        tcp4(0, 9),
        expected.clone(),
    ];
    let r = c.create(&batch).unwrap();
    assert_eq!(
        r,
        CreateReport {
            created: 2,
            existed: 1,
            refused: 2,
            refused_by_errno: vec![(1, 1), (16, 1)],
        }
    );
    assert_eq!(
        table.calls(),
        vec![
            Call::Create(vec![tcp4(100, 1), tcp4(100, 3), expected]),
            Call::Create(vec![tcp4(200, 2)]),
        ]
    );
    let d = c
        .delete_entries(&[tcp4(100, 3), tcp4(200, 2), tcp4(200, 77), tcp4(0, 1)])
        .unwrap();
    assert_eq!(
        d,
        DeleteReport {
            deleted: 2,
            missing: 2
        }
    );
    assert_eq!(c.delete_selected(&Selector::mark(100)).unwrap(), 1);
    assert_eq!(table.entries.lock().unwrap().clone(), vec![]);
}

#[test]
fn idle_exit_waits_for_open_connections() {
    let table = Table::with(vec![tcp4(100, 1)]);
    let mut srv = Server::start(table.clone(), cfg_idle(300));
    let c = HelperClient::new(&srv.path).unwrap();
    assert_eq!(c.dump(&Selector::mark(100)).unwrap().len(), 1);
    // The client keeps its connection: the helper stays up past its idle
    // timeout, so the next Save does not wait for a helper to start.
    std::thread::sleep(Duration::from_millis(900));
    assert!(!srv.handle.as_ref().unwrap().is_finished());
    assert_eq!(c.dump(&Selector::mark(100)).unwrap().len(), 1);
    drop(c);
    let summary = srv.wait_exit(Duration::from_secs(5));
    assert_eq!(
        summary,
        ServeSummary {
            connections: 1,
            requests: 2,
            rejected: 0
        }
    );
}

#[test]
fn client_reconnects_transparently_after_the_helper_stopped() {
    let table = Table::with(vec![tcp4(100, 1)]);
    let stop: &'static std::sync::atomic::AtomicBool =
        Box::leak(Box::new(std::sync::atomic::AtomicBool::new(false)));
    let mut srv = Server::start(
        table.clone(),
        ServerConfig {
            stop: Some(stop),
            ..cfg_idle(60_000)
        },
    );
    let c = HelperClient::new(&srv.path).unwrap();
    assert_eq!(c.dump(&Selector::mark(100)).unwrap().len(), 1);
    // As systemd's SIGTERM would: the helper closes the client's idle
    // connection and exits.
    stop.store(true, Ordering::SeqCst);
    let summary = srv.wait_exit(Duration::from_secs(5));
    assert_eq!(summary.requests, 1);
    // As systemd would on the next connection: a fresh helper instance. The
    // client's pooled connection is dead; it reconnects and resends.
    srv.restart(table.clone(), cfg_idle(60_000));
    assert_eq!(c.dump(&Selector::mark(100)).unwrap().len(), 1);
    assert_eq!(table.calls().len(), 2);
}

#[test]
fn client_times_out_on_a_hung_helper_and_recovers() {
    let table = Table::with(vec![tcp4(100, 1)]);
    *table.delay.lock().unwrap() = Duration::from_millis(1500);
    let srv = Server::start(table.clone(), cfg_idle(60_000));
    let c = HelperClient::with_timeout(&srv.path, Duration::from_millis(300)).unwrap();
    let t0 = Instant::now();
    let err = c.dump(&Selector::mark(100)).unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_millis(1200),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(
        err.to_string(),
        "conntrack dump did not finish within 300 ms"
    );
    *table.delay.lock().unwrap() = Duration::ZERO;
    // The late reply of the timed-out request must not be taken for this one.
    assert_eq!(c.dump(&Selector::mark(100)).unwrap(), vec![tcp4(100, 1)]);
}

#[test]
fn client_without_a_helper_reports_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.sock");
    let c = HelperClient::new(&path).unwrap();
    let err = c.dump(&Selector::mark(1)).unwrap_err();
    assert!(matches!(err, AccessError::Helper(_)));
    assert_eq!(
        err.to_string(),
        format!(
            "conntrack helper unavailable: dump: cannot connect to the helper at {}: No such file or directory (os error 2)",
            path.display()
        )
    );
    assert!(HelperClient::new(Path::new("")).is_err());
}

#[test]
fn concurrent_clients_are_served_concurrently() {
    let table = Table::with(vec![tcp4(100, 1)]);
    *table.delay.lock().unwrap() = Duration::from_millis(400);
    let srv = Server::start(table.clone(), cfg_idle(60_000));
    let c = Arc::new(HelperClient::new(&srv.path).unwrap());
    let t0 = Instant::now();
    let hs: Vec<_> = (0..6)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || c.dump(&Selector::mark(100)).unwrap().len())
        })
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap(), 1);
    }
    // Six 400 ms requests one after the other would take 2.4 s.
    assert!(
        t0.elapsed() < Duration::from_millis(1800),
        "{:?}",
        t0.elapsed()
    );
}

fn watch_calls(t: &Table) -> Vec<(u32, bool)> {
    t.calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Watch(s, on) => Some((s.mark, on)),
            _ => None,
        })
        .collect()
}

fn watch_frame(mark: u32, mask: u32, on: bool) -> Vec<u8> {
    let sel = Selector {
        mark,
        mark_mask: mask,
        zone: None,
    };
    wire::encode_request(&Request::Watch(sel, on))
}

/// Watch requests are validated like the others, bounded per connection and
/// per helper, idempotent per connection, and every watch of a connection
/// is dropped when it closes (a crashed daemon leaves nothing behind).
#[test]
fn watches_are_validated_bounded_and_dropped_with_their_connection() {
    let table = Table::with(vec![]);
    let srv = Server::start(
        table.clone(),
        ServerConfig {
            max_watches_per_connection: 2,
            max_watches: 3,
            ..cfg_idle(60_000)
        },
    );
    let mut a = srv.raw();
    assert_eq!(
        error_text(exchange(&mut a, &watch_frame(0, u32::MAX, true))),
        "watch refused: selector mark 0x0/0xffffffff would select unmarked entries; refused"
    );
    assert_eq!(
        error_text(exchange(&mut a, &watch_frame(5, 0, true))),
        "watch refused: selector mark 0x5/0x0 would select unmarked entries; refused"
    );
    let mut bad = watch_frame(5, u32::MAX, true);
    *bad.last_mut().unwrap() = 2;
    assert!(
        error_text(exchange(&mut a, &bad)).starts_with("malformed request: invalid watch flag 2")
    );
    assert!(watch_calls(&table).is_empty(), "{:?}", table.calls());

    assert_eq!(
        exchange(&mut a, &watch_frame(1, u32::MAX, true)),
        Some(Response::Watching(1))
    );
    assert_eq!(
        exchange(&mut a, &watch_frame(1, u32::MAX, true)),
        Some(Response::Watching(1))
    );
    assert_eq!(
        exchange(&mut a, &watch_frame(2, u32::MAX, true)),
        Some(Response::Watching(2))
    );
    assert_eq!(
        error_text(exchange(&mut a, &watch_frame(3, u32::MAX, true))),
        "watch refused: this connection already watches 2 selectors (limit 2)"
    );
    let mut b = srv.raw();
    assert_eq!(
        exchange(&mut b, &watch_frame(3, u32::MAX, true)),
        Some(Response::Watching(1))
    );
    assert_eq!(
        error_text(exchange(&mut b, &watch_frame(4, u32::MAX, true))),
        "watch refused: the helper already watches 3 selectors (limit 3)"
    );
    assert_eq!(
        exchange(&mut b, &watch_frame(3, u32::MAX, false)),
        Some(Response::Watching(0))
    );
    // Unwatching what this connection never watched changes nothing.
    assert_eq!(
        exchange(&mut b, &watch_frame(1, u32::MAX, false)),
        Some(Response::Watching(0))
    );
    assert_eq!(
        watch_calls(&table),
        vec![(1, true), (2, true), (3, true), (3, false)]
    );

    drop(a);
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let mut w = watch_calls(&table);
        if w.len() == 6 {
            w[4..].sort();
            assert_eq!(&w[4..], &[(1, false), (2, false)]);
            break;
        }
        assert!(
            Instant::now() < end,
            "watches of a closed connection kept: {w:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The freed room is usable again.
    assert_eq!(
        exchange(&mut b, &watch_frame(4, u32::MAX, true)),
        Some(Response::Watching(1))
    );
}

/// The client counts watches per selector and tells the helper only of the
/// first and the last; its watch connection keeps an idle helper up; after
/// the helper restarts, the client sends its watches again by itself.
#[test]
fn client_watches_survive_a_helper_restart_and_keep_it_up() {
    let table = Table::with(vec![tcp4(100, 1)]);
    let stop: &'static std::sync::atomic::AtomicBool =
        Box::leak(Box::new(std::sync::atomic::AtomicBool::new(false)));
    let mut srv = Server::start(
        table.clone(),
        ServerConfig {
            stop: Some(stop),
            ..cfg_idle(300)
        },
    );
    let c = HelperClient::new(&srv.path).unwrap();
    let (s100, s200) = (Selector::mark(100), Selector::mark(200));
    c.watch(&s100, true).unwrap();
    c.watch(&s100, true).unwrap();
    c.watch(&s200, true).unwrap();
    c.watch(&s200, false).unwrap();
    assert_eq!(
        watch_calls(&table),
        vec![(100, true), (200, true), (200, false)]
    );
    assert_eq!(c.watched(), 1);
    assert!(c.watch(&Selector::mark(0), true).is_err());
    let (es, src) = c.dump_sourced(&s100).unwrap();
    assert_eq!((es.len(), src), (1, DumpSource::Kernel));

    std::thread::sleep(Duration::from_millis(900));
    assert!(
        !srv.handle.as_ref().unwrap().is_finished(),
        "helper exited while watched"
    );

    // Stopped (its watches die with it), then started again.
    stop.store(true, Ordering::SeqCst);
    srv.wait_exit(Duration::from_secs(5));
    let fresh = Table::with(vec![tcp4(100, 1)]);
    srv.restart(fresh.clone(), cfg_idle(60_000));
    let end = Instant::now() + Duration::from_secs(10);
    while watch_calls(&fresh) != vec![(100, true)] {
        assert!(
            Instant::now() < end,
            "watches not sent again: {:?}",
            fresh.calls()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The monitor counts the resend right after the helper acknowledged it,
    // which this thread may see first.
    while c.watch_resends() < 1 {
        assert!(Instant::now() < end, "resend not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    // One more unwatch of the counted pair: still watched once.
    c.watch(&s100, false).unwrap();
    assert_eq!(watch_calls(&fresh), vec![(100, true)]);
    c.watch(&s100, false).unwrap();
    assert_eq!(watch_calls(&fresh), vec![(100, true), (100, false)]);
    assert_eq!(c.watched(), 0);
}

// ------------------------------------------------ SaveState and DeleteSaved

fn raw_payload(opcode: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![wire::VERSION, opcode];
    p.extend_from_slice(body);
    p
}

fn selector_bytes(mark: u32) -> Vec<u8> {
    let mut b = mark.to_le_bytes().to_vec();
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    b.push(0);
    b
}

#[test]
fn save_state_frames_are_bounded_and_errors_specific() {
    // Unknown state format.
    let mut body = selector_bytes(100);
    body.extend_from_slice(&4096u32.to_le_bytes());
    body.push(2);
    assert_eq!(
        wire::decode_request(&raw_payload(wire::op::SAVE_STATE, &body))
            .unwrap_err()
            .to_string(),
        "invalid state format 2 at offset 15"
    );
    // An id count above the ceiling is refused before anything is reserved.
    let mut body = selector_bytes(100);
    body.extend_from_slice(&(wire::MAX_SAVED_IDS as u32 + 1).to_le_bytes());
    assert_eq!(
        wire::decode_request(&raw_payload(wire::op::DELETE_SAVED, &body))
            .unwrap_err()
            .to_string(),
        format!(
            "{} ids exceed the limit of {}",
            wire::MAX_SAVED_IDS + 1,
            wire::MAX_SAVED_IDS
        )
    );
    // A count the bytes present cannot hold.
    let mut body = selector_bytes(100);
    body.extend_from_slice(&1000u32.to_le_bytes());
    body.extend_from_slice(&[0; 8]);
    assert_eq!(
        wire::decode_request(&raw_payload(wire::op::DELETE_SAVED, &body)),
        Err(WireError::Truncated { at: 15, need: 3992 })
    );
    // A reply claiming a state above the ceiling, or more than is there.
    let reply = |blob_len: u32, present: usize| {
        let mut body = vec![1u8];
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&blob_len.to_le_bytes());
        body.extend(std::iter::repeat_n(7u8, present));
        wire::decode_response(&raw_payload(wire::op::R_SAVED_STATE, &body))
    };
    assert_eq!(
        reply(wire::MAX_SAVE_LIMIT + 1, 0).unwrap_err().to_string(),
        "state of 67108865 bytes exceeds the limit of 67108864 bytes"
    );
    assert_eq!(
        reply(100, 10),
        Err(WireError::Truncated { at: 27, need: 90 })
    );
    assert_eq!(
        reply(10, 10),
        Ok(Response::SavedState(
            DumpSource::Cache,
            1,
            0,
            vec![],
            vec![7; 10]
        ))
    );
    assert_eq!(reply(9, 10), Err(WireError::Trailing(1)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Any body after the new opcodes decodes or fails; it never panics
    /// and never allocates from a claimed count.
    #[test]
    fn arbitrary_save_frames_never_panic(
        body in proptest::collection::vec(any::<u8>(), 0..64),
        which in 0usize..3,
    ) {
        let opcode = [wire::op::SAVE_STATE, wire::op::DELETE_SAVED, wire::op::R_SAVED_STATE][which];
        let p = raw_payload(opcode, &body);
        let _ = wire::decode_request(&p);
        let _ = wire::decode_response(&p);
    }

    #[test]
    fn saved_state_replies_round_trip(
        kept in any::<u64>(),
        dropped in any::<u64>(),
        ids in proptest::collection::vec(any::<u32>(), 0..200),
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        source in 0..3u8,
    ) {
        let src = [DumpSource::Kernel, DumpSource::Cache, DumpSource::Base][usize::from(source)];
        let resp = Response::SavedState(src, kept, dropped, ids.clone(), bytes);
        let f = wire::encode_response(&resp);
        prop_assert_eq!(wire::decode_response(payload(&f)).unwrap(), resp);
        let req = Request::DeleteSaved(Selector::mark(9), ids);
        let f = wire::encode_request(&req);
        prop_assert_eq!(wire::decode_request(payload(&f)).unwrap(), req);
    }
}

fn vm_entries(mark: u32, n: u16) -> Vec<Entry> {
    (1..=n)
        .map(|i| {
            let mut e = tcp4(mark, i);
            e.id = Some(mark * 100_000 + u32::from(i));
            e
        })
        .collect()
}

fn without_ids(mut es: Vec<Entry>) -> Vec<Entry> {
    for e in &mut es {
        e.id = None;
    }
    es.sort_by_key(|e| e.orig.l4);
    es
}

#[test]
fn save_state_requests_are_validated_before_the_table() {
    let table = Table::with(vm_entries(100, 3));
    let srv = Server::start(table.clone(), cfg_idle(60_000));
    let mut s = srv.raw();
    let sel = Selector::mark(100);
    let cases: Vec<(Request, &str)> = vec![
        (
            Request::SaveState(sel, 0, Format::Binary),
            "save-state refused: limit 0 is below the smallest valid state (32 bytes)",
        ),
        (
            Request::SaveState(sel, 31, Format::ConntrackSave),
            "save-state refused: limit 31 is below the smallest valid state (32 bytes)",
        ),
        (
            Request::SaveState(sel, 64 * 1024 * 1024 + 1, Format::Binary),
            "save-state refused: limit 67108865 exceeds the maximum of 67108864 bytes",
        ),
        (
            Request::SaveState(sel, u32::MAX, Format::Binary),
            "save-state refused: limit 4294967295 exceeds the maximum of 67108864 bytes",
        ),
        (
            Request::SaveState(
                Selector {
                    mark: 100,
                    mark_mask: 0,
                    zone: None,
                },
                4096,
                Format::Binary,
            ),
            "save-state refused: selector mark 0x64/0x0 would select unmarked entries; refused",
        ),
        (
            Request::DeleteSaved(Selector::mark(0), vec![10_000_001]),
            "delete-saved refused: selector mark 0x0/0xffffffff would select unmarked entries; refused",
        ),
    ];
    for (req, want) in cases {
        assert_eq!(
            error_text(exchange(&mut s, &wire::encode_request(&req))),
            want
        );
    }
    assert_eq!(table.calls(), vec![]);
    // The limits themselves are accepted, on the same connection.
    for limit in [32, 64 * 1024 * 1024] {
        match exchange(
            &mut s,
            &wire::encode_request(&Request::SaveState(sel, limit, Format::Binary)),
        ) {
            Some(Response::SavedState(DumpSource::Cache, kept, dropped, ids, bytes)) => {
                assert!(bytes.len() <= limit as usize);
                assert_eq!(kept + dropped, 3);
                assert_eq!(ids, vec![10_000_001, 10_000_002, 10_000_003]);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(table.entries.lock().unwrap().len(), 3);
}

#[test]
fn client_save_state_runs_in_the_helper_and_respects_the_limit() {
    let mut all = vm_entries(100, 60);
    all.extend(vm_entries(200, 5));
    let table = Table::with(all);
    let srv = Server::start(table.clone(), cfg_idle(60_000));
    let c = HelperClient::new(&srv.path).unwrap();
    let sel = Selector::mark(100);

    let saved = c.save_state(&sel, &EncodeOptions::default()).unwrap();
    // One SaveState, no dump: the entries never crossed the socket.
    assert_eq!(
        table.calls(),
        vec![Call::SaveState(sel, format::QEMU_LIMIT, Format::Binary)]
    );
    assert_eq!(saved.source, DumpSource::Cache);
    assert_eq!((saved.encoded.kept, saved.encoded.dropped), (60, 0));
    assert_eq!(
        saved.ids,
        (1..=60).map(|i| 10_000_000 + i).collect::<Vec<u32>>()
    );
    let decoded = format::decode(&saved.encoded.bytes).unwrap();
    assert_eq!(
        without_ids(decoded.entries),
        without_ids(vm_entries(100, 60))
    );

    // A limit that holds only some: kept + dropped is everything, the ids
    // are everything's (a flush deletes what was dropped too).
    let opts = EncodeOptions {
        limit: 200,
        format: Format::Binary,
    };
    let small = c.save_state(&sel, &opts).unwrap();
    assert!(small.encoded.bytes.len() <= 200);
    assert!(small.encoded.kept > 0 && small.encoded.kept < 60);
    assert_eq!(small.encoded.kept + small.encoded.dropped, 60);
    assert_eq!(small.ids.len(), 60);
    let decoded = format::decode(&small.encoded.bytes).unwrap();
    assert_eq!(decoded.entries.len(), small.encoded.kept);
    assert_eq!(decoded.dropped, Some(small.encoded.dropped as u64));

    // A limit above the op's ceiling is asked for as the ceiling.
    let huge = EncodeOptions {
        limit: usize::MAX,
        format: Format::ConntrackSave,
    };
    let text = c.save_state(&sel, &huge).unwrap();
    assert_eq!(
        table.calls().last(),
        Some(&Call::SaveState(
            sel,
            wire::MAX_SAVE_LIMIT as usize,
            Format::ConntrackSave
        ))
    );
    let decoded = format::decode(&text.encoded.bytes).unwrap();
    assert_eq!(decoded.format, Format::ConntrackSave);
    assert_eq!(decoded.entries.len(), 60);

    // Below the smallest state: the helper's reason.
    let err = c
        .save_state(
            &sel,
            &EncodeOptions {
                limit: 31,
                format: Format::Binary,
            },
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "conntrack helper unavailable: helper refused save-state: save-state refused: limit 31 \
         is below the smallest valid state (32 bytes)"
    );
}

#[test]
fn helper_never_sends_a_state_above_the_limit() {
    let table = Table::with(vm_entries(100, 3));
    let srv = Server::start(table.clone(), cfg_idle(60_000));
    let mut s = srv.raw();
    let c = HelperClient::new(&srv.path).unwrap();
    let sel = Selector::mark(100);
    for (bytes, want) in [
        (
            vec![1u8; 65],
            "save-state failed: the encoder returned 65 bytes, outside 1..=64",
        ),
        (
            vec![],
            "save-state failed: the encoder returned 0 bytes, outside 1..=64",
        ),
    ] {
        *table.save_bytes.lock().unwrap() = Some(bytes);
        assert_eq!(
            error_text(exchange(
                &mut s,
                &wire::encode_request(&Request::SaveState(sel, 64, Format::Binary))
            )),
            want
        );
        let err = c
            .save_state(
                &sel,
                &EncodeOptions {
                    limit: 64,
                    format: Format::Binary,
                },
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("conntrack helper unavailable: helper refused save-state: {want}")
        );
    }
    // Exactly at the limit is fine.
    *table.save_bytes.lock().unwrap() = Some(vec![1u8; 64]);
    match exchange(
        &mut s,
        &wire::encode_request(&Request::SaveState(sel, 64, Format::Binary)),
    ) {
        Some(Response::SavedState(_, _, _, _, b)) => assert_eq!(b, vec![1u8; 64]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn client_delete_saved_is_one_request_and_counts_missing_ids() {
    let mut all = vm_entries(100, 5);
    all.extend(vm_entries(200, 2));
    let table = Table::with(all);
    let srv = Server::start(table.clone(), cfg_idle(60_000));
    let c = HelperClient::new(&srv.path).unwrap();
    let sel = Selector::mark(100);
    // Two of ours, one twice; one of mark 200 (the table oversharing its
    // dump must not get it deleted); one nobody has.
    let ids = [10_000_002, 10_000_004, 10_000_002, 20_000_001, 77];
    let r = c.delete_saved(&sel, &ids).unwrap();
    assert_eq!(
        r,
        DeleteReport {
            deleted: 2,
            missing: 2
        }
    );
    let mut want_deleted = vm_entries(100, 5);
    want_deleted.retain(|e| matches!(e.id, Some(10_000_002 | 10_000_004)));
    assert_eq!(
        table.calls(),
        vec![Call::Dump(sel), Call::DeleteEntries(want_deleted)]
    );
    let left: Vec<Option<u32>> = table.entries.lock().unwrap().iter().map(|e| e.id).collect();
    assert_eq!(
        left,
        [10_000_001, 10_000_003, 10_000_005, 20_000_001, 20_000_002].map(Some)
    );
    // Nothing to delete: no request at all.
    assert_eq!(c.delete_saved(&sel, &[]).unwrap(), DeleteReport::default());
    assert_eq!(table.calls().len(), 2);
}

// ------------------------------------- a helper built before SaveState

type Answer = Arc<dyn Fn(&[u8]) -> Response + Send + Sync>;

/// A helper speaking the wire protocol with answers of the test's choosing:
/// an older helper build (which cannot be produced from this tree) or one
/// that breaks the protocol. Records every request's opcode.
struct Fake {
    path: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    ops: Arc<Mutex<Vec<u8>>>,
    accept: Option<JoinHandle<()>>,
}

impl Fake {
    fn start(path: &Path, answer: Answer) -> Fake {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).unwrap();
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let ops = Arc::new(Mutex::new(Vec::new()));
        let (st, cs, os) = (stop.clone(), conns.clone(), ops.clone());
        let accept = std::thread::spawn(move || {
            let t0 = Instant::now();
            while !st.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(60) {
                let mut s = match l.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                s.set_nonblocking(false).unwrap();
                cs.lock().unwrap().push(s.try_clone().unwrap());
                let (os, answer) = (os.clone(), answer.clone());
                std::thread::spawn(move || loop {
                    let mut len = [0u8; 4];
                    if s.read_exact(&mut len).is_err() {
                        return;
                    }
                    let mut p = vec![0u8; u32::from_le_bytes(len) as usize];
                    if s.read_exact(&mut p).is_err() {
                        return;
                    }
                    os.lock().unwrap().push(p.get(1).copied().unwrap_or(0));
                    if s.write_all(&wire::encode_response(&answer(&p))).is_err() {
                        return;
                    }
                });
            }
        });
        Fake {
            path: path.to_owned(),
            stop,
            conns,
            ops,
            accept: Some(accept),
        }
    }

    /// Opcodes received so far (and forgets them).
    fn take_ops(&self) -> Vec<u8> {
        std::mem::take(&mut *self.ops.lock().unwrap())
    }
}

impl Drop for Fake {
    /// As a helper that exits: the listener goes and open connections are
    /// closed (between requests).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A helper that runs requests like this build's, except that it does not
/// know `unknown`: it answers them as a build before them did, with its
/// decoder's refusal (text pinned here, not taken from the code).
fn older_helper(table: Arc<Table>, unknown: &'static [u8]) -> Answer {
    Arc::new(move |p: &[u8]| match p.get(1) {
        Some(op) if unknown.contains(op) => {
            Response::Error(format!("malformed request: unknown opcode {op:#04x}"))
        }
        _ => server::handle(p, &*table).0,
    })
}

fn fake_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!(
            "cvs-helper-fake-{}-{}-",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ))
        .tempdir()
        .unwrap()
}

#[test]
fn client_falls_back_when_the_helper_predates_save_state_and_remembers() {
    use wire::op;
    let mut all = vm_entries(100, 8);
    all.extend(vm_entries(200, 3));
    let table = Table::with(all);
    let dir = fake_dir();
    let path = dir.path().join("helper.sock");
    let old = Fake::start(
        &path,
        // Older than SaveState is older than the ops added after it too.
        older_helper(
            table.clone(),
            &[
                op::SAVE_STATE,
                op::DELETE_SAVED,
                op::WAIT_WARM,
                op::SAVE_STATE_NOTED,
            ],
        ),
    );
    let c = HelperClient::new(&path).unwrap();
    let sel = Selector::mark(100);

    // First Save: the ops are refused, the daemon dumps and encodes itself.
    let saved = c.save_state(&sel, &EncodeOptions::default()).unwrap();
    assert_eq!(
        old.take_ops(),
        vec![op::SAVE_STATE_NOTED, op::SAVE_STATE, op::DUMP_SOURCED]
    );
    assert_eq!(saved.source, DumpSource::Kernel);
    assert_eq!((saved.encoded.kept, saved.encoded.dropped), (8, 0));
    assert_eq!(
        saved.ids,
        (1..=8).map(|i| 10_000_000 + i).collect::<Vec<u32>>()
    );
    let decoded = format::decode(&saved.encoded.bytes).unwrap();
    assert_eq!(
        without_ids(decoded.entries),
        without_ids(vm_entries(100, 8))
    );
    // Remembered: later Saves do not ask again.
    let again = c.save_state(&sel, &EncodeOptions::default()).unwrap();
    assert_eq!(old.take_ops(), vec![op::DUMP_SOURCED]);
    assert_eq!(again.ids, saved.ids);
    // The table's own save_state never ran: the old helper has none.
    assert!(!table
        .calls()
        .iter()
        .any(|c| matches!(c, Call::SaveState(..))));

    // Flush the same way: dump into the daemon, delete by entries.
    let ids = [10_000_001, 10_000_008, 20_000_001, 5];
    let r = c.delete_saved(&sel, &ids).unwrap();
    assert_eq!(
        r,
        DeleteReport {
            deleted: 2,
            missing: 2
        }
    );
    assert_eq!(
        old.take_ops(),
        vec![op::DELETE_SAVED, op::DUMP, op::DELETE_ENTRIES]
    );
    let r = c.delete_saved(&sel, &ids).unwrap();
    assert_eq!(
        r,
        DeleteReport {
            deleted: 0,
            missing: 4
        }
    );
    assert_eq!(old.take_ops(), vec![op::DUMP]);
    assert_eq!(table.entries.lock().unwrap().len(), 9);

    // The helper is upgraded (it restarts): the client's next request
    // finds its kept connection closed, and from then on it uses the ops.
    drop(old);
    let new = Fake::start(&path, older_helper(table.clone(), &[]));
    let first = c.save_state(&sel, &EncodeOptions::default()).unwrap();
    assert_eq!(new.take_ops(), vec![op::DUMP_SOURCED]);
    assert_eq!(first.ids.len(), 6);
    let up = c.save_state(&sel, &EncodeOptions::default()).unwrap();
    assert_eq!(new.take_ops(), vec![op::SAVE_STATE_NOTED]);
    assert_eq!(up.source, DumpSource::Cache);
    assert_eq!(up.ids.len(), 6);
    let r = c.delete_saved(&sel, &[10_000_002]).unwrap();
    assert_eq!(
        r,
        DeleteReport {
            deleted: 1,
            missing: 0
        }
    );
    assert_eq!(new.take_ops(), vec![op::DELETE_SAVED]);
}

/// CreateBackground reaches the access's `create_background` (the kernel
/// work at a lower priority); a helper that predates it gets plain Creates,
/// remembered until it restarts.
#[test]
fn create_background_reaches_the_helper_or_falls_back_to_plain_creates() {
    use wire::op;
    let table = Table::with(Vec::new());
    let dir = fake_dir();
    let path = dir.path().join("helper.sock");
    let old = Fake::start(&path, older_helper(table.clone(), &[op::CREATE_BACKGROUND]));
    let c = HelperClient::new(&path).unwrap();
    let first = vm_entries(100, 5);
    let r = c.create_background(&first).unwrap();
    assert_eq!((r.created, r.existed), (5, 0));
    assert_eq!(old.take_ops(), vec![op::CREATE_BACKGROUND, op::CREATE]);
    let again = vm_entries(100, 7);
    let r = c.create_background(&again).unwrap();
    assert_eq!((r.created, r.existed), (2, 5));
    assert_eq!(old.take_ops(), vec![op::CREATE]);
    assert!(!table
        .calls()
        .iter()
        .any(|c| matches!(c, Call::CreateBackground(_))));

    // Upgraded helper: the op from the next connection on.
    drop(old);
    let new = Fake::start(&path, older_helper(table.clone(), &[]));
    let more = vm_entries(101, 3);
    c.create_background(&more).unwrap();
    c.create_background(&more).unwrap();
    let ops = new.take_ops();
    assert_eq!(ops.last(), Some(&op::CREATE_BACKGROUND), "{ops:?}");
    assert_eq!(
        table
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::CreateBackground(3)))
            .count(),
        ops.iter().filter(|&&o| o == op::CREATE_BACKGROUND).count()
    );
    // The selector check applies to it like to Create.
    let mut wrong = vm_entries(102, 1);
    wrong[0].mark = 555;
    let frame = wire::encode_request(&wire::Request::CreateBackground(Selector::mark(102), wrong));
    let (resp, _) = server::handle(payload(&frame), &*table);
    assert!(
        matches!(&resp, Response::Error(m) if m.contains("is outside the request's selector")),
        "{resp:?}"
    );
}

#[test]
fn client_falls_back_to_a_plain_dump_with_an_even_older_helper() {
    use wire::op;
    let table = Table::with(vm_entries(100, 4));
    let dir = fake_dir();
    let path = dir.path().join("helper.sock");
    let old = Fake::start(
        &path,
        older_helper(
            table.clone(),
            &[
                op::DUMP_SOURCED,
                op::SAVE_STATE,
                op::DELETE_SAVED,
                op::WAIT_WARM,
                op::SAVE_STATE_NOTED,
            ],
        ),
    );
    let c = HelperClient::new(&path).unwrap();
    let saved = c
        .save_state(&Selector::mark(100), &EncodeOptions::default())
        .unwrap();
    assert_eq!(
        old.take_ops(),
        vec![
            op::SAVE_STATE_NOTED,
            op::SAVE_STATE,
            op::DUMP_SOURCED,
            op::DUMP
        ]
    );
    assert_eq!(saved.source, DumpSource::Kernel);
    assert_eq!(saved.encoded.kept, 4);
    let decoded = format::decode(&saved.encoded.bytes).unwrap();
    assert_eq!(
        without_ids(decoded.entries),
        without_ids(vm_entries(100, 4))
    );
}

#[test]
fn client_rejects_a_helper_that_breaks_the_save_contract() {
    let dir = fake_dir();
    let path = dir.path().join("helper.sock");
    let limit = format::QEMU_LIMIT;
    let cases: Vec<(Response, String)> = vec![
        (
            Response::SavedState(DumpSource::Cache, 1, 0, vec![1], vec![1; limit + 1]),
            "state of 1048577 bytes, outside 1..=1048576".into(),
        ),
        (
            Response::SavedState(DumpSource::Cache, 1, 0, vec![1], vec![]),
            "state of 0 bytes, outside 1..=1048576".into(),
        ),
        (
            Response::SavedState(DumpSource::Kernel, 1, 1, vec![1, 2, 3], vec![1; 40]),
            "3 ids for 1 kept + 1 dropped entries".into(),
        ),
        (
            Response::SavedState(DumpSource::Kernel, u64::MAX, 1, vec![], vec![1; 40]),
            "kept 18446744073709551615 + dropped 1 overflows".into(),
        ),
        (
            Response::SavedStateNoted(
                DumpSource::Cache,
                1,
                0,
                vec![1],
                vec![],
                SaveNotes::default(),
            ),
            "state of 0 bytes, outside 1..=1048576".into(),
        ),
    ];
    for (resp, detail) in cases {
        let fake = Fake::start(&path, Arc::new(move |_: &[u8]| resp.clone()));
        let c = HelperClient::new(&path).unwrap();
        let err = c
            .save_state(&Selector::mark(100), &EncodeOptions::default())
            .unwrap_err();
        assert!(matches!(err, AccessError::Helper(_)));
        assert_eq!(
            err.to_string(),
            format!(
                "conntrack helper unavailable: save-state: bad reply from the helper: {detail}"
            )
        );
        assert_eq!(fake.take_ops(), vec![wire::op::SAVE_STATE_NOTED]);
    }
    // The wrong kind of reply.
    let _fake = Fake::start(&path, Arc::new(|_: &[u8]| Response::Entries(vec![])));
    let c = HelperClient::new(&path).unwrap();
    assert_eq!(
        c.save_state(&Selector::mark(100), &EncodeOptions::default())
            .unwrap_err()
            .to_string(),
        "conntrack helper unavailable: save-state: unexpected entries reply from the helper"
    );
    // A delete report must account for every id, and may count more
    // entries than ids (CTA_ID is a 32-bit hash: two entries can share
    // one), never more missing ids than were sent.
    drop(_fake);
    for ((deleted, missing), bad) in [((3, 0), false), ((0, 1), true), ((0, 3), true)] {
        let fake = Fake::start(
            &path,
            Arc::new(move |_: &[u8]| Response::DeleteReport(DeleteReport { deleted, missing })),
        );
        let c = HelperClient::new(&path).unwrap();
        let r = c.delete_saved(&Selector::mark(100), &[1, 2]);
        if bad {
            assert_eq!(
                r.unwrap_err().to_string(),
                format!(
                    "conntrack helper unavailable: delete-saved: bad reply from the helper: \
                     {deleted} deleted + {missing} missing for 2 ids"
                )
            );
        } else {
            assert_eq!(r.unwrap(), DeleteReport { deleted, missing });
        }
        drop(fake);
    }
}

// ------------------------------------------------ WaitWarm and SaveStateNoted

/// The two replies added last skip fields appended by a newer helper, and
/// codes this side does not know decode to what is never taken for warm.
#[test]
fn warmth_and_noted_replies_decode_unknown_values_safely() {
    use wire::op;
    // Warmth: state, miss, entries, silent, base records, sysctl.
    let warmth = |state: u8, miss: u8, extra: &[u8]| {
        let mut b = vec![wire::VERSION, op::R_WARMTH, state, miss];
        for v in [5u64, 1, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        b.extend_from_slice(extra);
        match wire::decode_response(&b).unwrap() {
            Response::Warmth(w) => w,
            r => panic!("{r:?}"),
        }
    };
    let w = warmth(0, 0, &[]);
    assert_eq!(w.state, WarmState::Warm);
    assert_eq!((w.entries, w.silent, w.events_sysctl), (5, 1, None));
    assert_eq!(warmth(0, 0, &[1, 2, 3, 4]).state, WarmState::Warm);
    assert_eq!(warmth(9, 0, &[]).state, WarmState::Unknown);
    assert_eq!(warmth(3, 200, &[]).state, WarmState::Cold(CacheMiss::Other));
    assert_eq!(warmth(3, 0, &[]).state, WarmState::Cold(CacheMiss::Other));
    assert_eq!(
        warmth(3, 4, &[]).state,
        WarmState::Cold(CacheMiss::EventsOff)
    );
    // Truncated: an error, not a guess.
    let f = wire::encode_response(&Response::Warmth(Warmth::of(WarmState::Warm)));
    assert!(wire::decode_response(&payload(&f)[..payload(&f).len() - 1]).is_err());

    // SavedStateNoted with an unknown miss code and appended fields.
    let f = wire::encode_response(&Response::SavedStateNoted(
        DumpSource::Kernel,
        1,
        0,
        vec![4],
        vec![9],
        SaveNotes {
            miss: Some(CacheMiss::Warming),
            silent: 2,
            lookups: 3,
            lookup_us: 4,
        },
    ));
    let mut p = payload(&f).to_vec();
    let miss_at = p.len() - 25;
    p[miss_at] = 77;
    p.extend_from_slice(&[0xaa; 12]);
    match wire::decode_response(&p).unwrap() {
        Response::SavedStateNoted(src, 1, 0, ids, bytes, n) => {
            assert_eq!((src, ids, bytes), (DumpSource::Kernel, vec![4], vec![9]));
            assert_eq!(
                n,
                SaveNotes {
                    miss: Some(CacheMiss::Other),
                    silent: 2,
                    lookups: 3,
                    lookup_us: 4
                }
            );
        }
        r => panic!("{r:?}"),
    }
}

/// An old daemon sends plain SaveStates: a new helper answers them with
/// the plain SavedState an old decoder reads (it refuses trailing bytes),
/// and the notes only go with SaveStateNoted.
#[test]
fn plain_save_state_gets_the_plain_reply_and_noted_gets_the_notes() {
    let table = Table::with(vm_entries(100, 4));
    let notes = SaveNotes {
        miss: None,
        silent: 4,
        lookups: 4,
        lookup_us: 1500,
    };
    *table.save_notes.lock().unwrap() = notes.clone();
    let sel = Selector::mark(100);
    let plain = wire::encode_request(&Request::SaveState(sel, 1 << 20, Format::Binary));
    let (r, _) = server::handle(payload(&plain), &*table);
    let f = wire::encode_response(&r);
    assert_eq!(f[5], wire::op::R_SAVED_STATE);
    assert!(matches!(
        wire::decode_response(payload(&f)).unwrap(),
        Response::SavedState(DumpSource::Cache, 4, 0, _, _)
    ));
    let noted = wire::encode_request(&Request::SaveStateNoted(sel, 1 << 20, Format::Binary));
    match server::handle(payload(&noted), &*table).0 {
        Response::SavedStateNoted(DumpSource::Cache, 4, 0, _, _, n) => assert_eq!(n, notes),
        r => panic!("{r:?}"),
    }
    // Validated like SaveState.
    let bad = wire::encode_request(&Request::SaveStateNoted(sel, 1, Format::Binary));
    assert!(error_text(Some(server::handle(payload(&bad), &*table).0)).contains("below"));
}

/// Through a real server: the client's wait reaches the access with the
/// wait it asked for (capped by the protocol), and Saves carry the notes.
#[test]
fn client_wait_warm_and_save_notes_cross_the_helper() {
    let table = Table::with(vm_entries(100, 3));
    let warm = Warmth {
        state: WarmState::Warm,
        entries: 3,
        silent: 1,
        base_records: 0,
        events_sysctl: Some(2),
    };
    *table.warmth.lock().unwrap() = warm;
    let notes = SaveNotes {
        miss: None,
        silent: 1,
        lookups: 1,
        lookup_us: 7,
    };
    *table.save_notes.lock().unwrap() = notes.clone();
    let srv = Server::start(table.clone(), cfg_idle(60_000));
    let c = HelperClient::new(&srv.path).unwrap();
    let sel = Selector::mark(100);
    assert_eq!(
        c.wait_warm(&sel, Duration::from_millis(1500)).unwrap(),
        warm
    );
    assert_eq!(c.wait_warm(&sel, Duration::from_secs(3600)).unwrap(), warm);
    let waits: Vec<Call> = table
        .calls()
        .into_iter()
        .filter(|c| matches!(c, Call::WaitWarm(..)))
        .collect();
    assert_eq!(
        waits,
        vec![
            Call::WaitWarm(sel, 1500),
            Call::WaitWarm(sel, u64::from(wire::MAX_WAIT_WARM_MS))
        ]
    );
    let saved = c.save_state(&sel, &EncodeOptions::default()).unwrap();
    assert_eq!(saved.notes, notes);
    assert_eq!(saved.encoded.kept, 3);
}

/// A helper that waits longer than the client's own request bound still
/// answers a WaitWarm: its bound is the wait plus slack, not the bound of
/// other requests.
#[test]
fn client_wait_warm_outlasts_the_request_timeout() {
    let table = Table::with(vec![]);
    *table.warm_delay.lock().unwrap() = Duration::from_millis(800);
    *table.warmth.lock().unwrap() = Warmth::of(WarmState::Warm);
    let srv = Server::start(table.clone(), cfg_idle(60_000));
    let c = HelperClient::with_timeout(&srv.path, Duration::from_millis(300)).unwrap();
    let w = c
        .wait_warm(&Selector::mark(100), Duration::from_secs(1))
        .unwrap();
    assert_eq!(w.state, WarmState::Warm);
}

/// An older helper refuses WaitWarm: the client returns at once, says it
/// cannot tell, and its next Save goes straight to the plain SaveState
/// (no extra round trip inside the downtime).
#[test]
fn client_against_a_helper_before_wait_warm_does_not_wait() {
    use wire::op;
    let table = Table::with(vm_entries(100, 2));
    let dir = fake_dir();
    let path = dir.path().join("helper.sock");
    let old = Fake::start(
        &path,
        older_helper(table.clone(), &[op::WAIT_WARM, op::SAVE_STATE_NOTED]),
    );
    let c = HelperClient::new(&path).unwrap();
    let sel = Selector::mark(100);
    let t0 = Instant::now();
    let w = c.wait_warm(&sel, Duration::from_secs(10)).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(w.state, WarmState::Unknown);
    let saved = c.save_state(&sel, &EncodeOptions::default()).unwrap();
    assert_eq!(saved.notes, SaveNotes::default());
    assert_eq!(saved.encoded.kept, 2);
    assert_eq!(old.take_ops(), vec![op::WAIT_WARM, op::SAVE_STATE]);
    // Asked again: remembered, no request at all.
    let w = c.wait_warm(&sel, Duration::from_secs(10)).unwrap();
    assert_eq!(w.state, WarmState::Unknown);
    assert!(old.take_ops().is_empty());
}

/// A confined helper answers WaitWarm only for a watched selector.
#[test]
fn confined_helper_refuses_wait_warm_for_unwatched_selectors() {
    let table = Table::with(vec![]);
    *table.warmth.lock().unwrap() = Warmth::of(WarmState::Warm);
    let srv = Server::start(
        table.clone(),
        ServerConfig {
            idle_timeout: Some(Duration::from_secs(60)),
            ..ServerConfig::default()
        },
    );
    let mut s = srv.raw();
    let ask = wire::encode_request(&Request::WaitWarm(Selector::mark(100), 100));
    let m = error_text(exchange(&mut s, &ask));
    assert!(m.contains("is not watched"), "{m}");
    assert!(!table
        .calls()
        .iter()
        .any(|c| matches!(c, Call::WaitWarm(..))));
    let watch = wire::encode_request(&Request::Watch(Selector::mark(100), true));
    assert!(matches!(
        exchange(&mut s, &watch),
        Some(Response::Watching(1))
    ));
    match exchange(&mut s, &ask) {
        Some(Response::Warmth(w)) => assert_eq!(w.state, WarmState::Warm),
        r => panic!("{r:?}"),
    }
}

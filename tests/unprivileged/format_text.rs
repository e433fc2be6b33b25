//! conntrack(8) `-o save` text: the Proxmox Perl helper's payload. Emit and
//! parse round trip, and real interop with conntrack-tools 1.4.7 in
//! throw-away network namespaces.

use std::io::Write;
use std::net::IpAddr;
use std::process::Stdio;

use common::entries::entry;
use common::netns::{run_ok, Netns};
use conntrack_vmstate::entry::{proto, status, ProtoInfo, L4};
use conntrack_vmstate::format::{self, text, EncodeOptions, Format};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn emit_then_parse_gives_the_text_projection(e in entry()) {
        let line = text::line(&e);
        let parsed = text::parse_line(&line).map_err(|r| TestCaseError::fail(format!("{r}: {line}")))?;
        prop_assert_eq!(parsed, text::text_projection(&e), "{}", line);
    }
}

#[test]
fn perl_helper_line_parses_exactly() {
    let l = "-A -t 431999 -u SEEN_REPLY,ASSURED -w 3 -s 10.1.2.3 -d 93.184.216.34 -g 10.9.9.9 -q 10.1.2.3 -p tcp --sport 40000 --dport 443 --reply-port-src 8443 --reply-port-dst 40000 --state ESTABLISHED --mark 100";
    let d = format::decode(l.as_bytes()).unwrap();
    assert_eq!(d.format, Format::ConntrackSave);
    let e = &d.entries[0];
    assert_eq!(e.orig.src, "10.1.2.3".parse::<IpAddr>().unwrap());
    assert_eq!(e.orig.dst, "93.184.216.34".parse::<IpAddr>().unwrap());
    assert_eq!(e.reply.src, "10.9.9.9".parse::<IpAddr>().unwrap());
    assert_eq!(e.reply.dst, e.orig.src);
    assert_eq!(
        e.orig.l4,
        L4::Ports {
            src: 40000,
            dst: 443
        }
    );
    assert_eq!(
        e.reply.l4,
        L4::Ports {
            src: 8443,
            dst: 40000
        }
    );
    assert_eq!(
        e.status,
        status::SEEN_REPLY
            | status::ASSURED
            | status::CONFIRMED
            | status::DST_NAT
            | status::DST_NAT_DONE
    );
    assert_eq!((e.timeout, e.mark, e.zone), (431_999, 100, 3));
    assert!(matches!(e.protoinfo, Some(ProtoInfo::Tcp { state: 3, .. })));
}

#[test]
fn full_vocabulary_parses() {
    let lines = [
        "-A -t 29 -u UNSET -s 2001:db8::1 -d 2001:db8::2 -r 2001:db8::2 -q 2001:db8::1 -p icmpv6 --icmpv6-type 128 --icmpv6-code 0 --icmpv6-id 55 --mark 1",
        "-A -t 29 -u UNSET -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -q 10.0.0.1 -p icmp --icmp-type 8 --icmp-code 0 --icmp-id 55 --mark 1",
        "-A -t 29 -u UNSET -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -q 10.0.0.1 -p sctp --sport 53 --dport 5353 --reply-port-src 5353 --reply-port-dst 53 --state ESTABLISHED --orig-vtag 5 --reply-vtag 6 --mark 1",
        "-A -t 29 -u UNSET -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -q 10.0.0.1 -p gre --srckey 53 --dstkey 5353 --reply-key-src 5353 --reply-key-dst 53 --mark 1",
        "-A -t 29 -u UNSET -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -q 10.0.0.1 -p 99 --mark 1",
        "-A -t 29 -u UNSET -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -q 10.0.0.1 -p dccp --mark 1",
        "-A -t 29 -u SEEN_REPLY,FIXED_TIMEOUT -c 5 --orig-zone 4 --reply-zone 5 -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -n 10.7.7.7 -p udp --sport 7 --dport 6 --reply-port-src 6 --reply-port-dst 7 -l 0,42,127 --mark 0x10",
    ];
    let d = format::decode(lines.join("\n").as_bytes()).unwrap();
    let e = &d.entries;
    assert_eq!(e.len(), 7);
    assert_eq!(
        e[0].orig.l4,
        L4::Icmp {
            id: 55,
            kind: 128,
            code: 0
        }
    );
    assert_eq!(
        e[0].reply.l4,
        L4::Icmp {
            id: 55,
            kind: 129,
            code: 0
        }
    );
    assert_eq!(
        e[1].reply.l4,
        L4::Icmp {
            id: 55,
            kind: 0,
            code: 0
        }
    );
    assert_eq!(
        e[2].protoinfo,
        Some(ProtoInfo::Sctp {
            state: 4,
            vtag_orig: 5,
            vtag_reply: 6
        })
    );
    assert_eq!(
        (e[3].orig.proto, e[3].orig.l4),
        (proto::GRE, L4::Ports { src: 53, dst: 5353 })
    );
    assert_eq!((e[4].orig.proto, e[4].orig.l4), (99, L4::None));
    assert_eq!(e[5].orig.l4, L4::Ports { src: 0, dst: 0 });
    let z = &e[6];
    assert_eq!((z.orig.zone, z.reply.zone, z.mark), (Some(4), Some(5), 16));
    assert_eq!(z.status & status::FIXED_TIMEOUT, status::FIXED_TIMEOUT);
    assert_eq!(
        z.status & (status::SRC_NAT | status::SRC_NAT_DONE),
        status::SRC_NAT | status::SRC_NAT_DONE
    );
    let mut l = [0u8; 16];
    l[0] = 1;
    l[5] = 1 << 2;
    l[15] = 1 << 7;
    assert_eq!(z.labels, Some(l));
}

/// Entries created with conntrack(8) `-I`, covering the protocols and
/// attributes its text can carry. Marks go last (see prior-art.md).
const CREATE: &[&str] = &[
    "-s 10.1.0.1 -d 93.184.216.34 -p tcp --sport 40001 --dport 443 --state ESTABLISHED -u SEEN_REPLY,ASSURED -t 431000",
    "-s 10.1.0.1 -d 93.184.216.35 -p tcp --sport 40002 --dport 80 --state TIME_WAIT -u SEEN_REPLY,ASSURED -t 100",
    "-s 10.1.0.1 -d 93.184.216.36 -p tcp --sport 40003 --dport 22 --state SYN_SENT -t 100",
    "-s 10.1.0.1 -d 93.184.216.37 -p tcp --sport 40004 --dport 443 --state ESTABLISHED -u SEEN_REPLY,ASSURED -t 5000 --dst-nat 10.9.9.9",
    "-s 10.1.0.1 -d 93.184.216.38 -p tcp --sport 40005 --dport 443 --state ESTABLISHED -u SEEN_REPLY,ASSURED -t 5000 --src-nat 198.51.100.7",
    "-s 10.1.0.1 -d 93.184.216.39 -p tcp --sport 40006 --dport 443 --state ESTABLISHED -u SEEN_REPLY,ASSURED -t 5000 -w 3",
    "-s 10.1.0.1 -d 8.8.8.8 -p udp --sport 50000 --dport 53 -u SEEN_REPLY -t 30",
    "-s 10.1.0.1 -d 192.0.2.9 -p udp --sport 50001 --dport 123 -u SEEN_REPLY,ASSURED,FIXED_TIMEOUT -t 170",
    "-s 10.1.0.1 -d 192.0.2.10 -p icmp --icmp-type 8 --icmp-code 0 --icmp-id 77 -t 30",
    "-s 2001:db8::1 -d 2001:db8::2 -p icmpv6 --icmpv6-type 128 --icmpv6-code 0 --icmpv6-id 78 -t 30",
    "-s 2001:db8::1 -d 2606:4700::6810:85e5 -p tcp --sport 40007 --dport 443 --state ESTABLISHED -u SEEN_REPLY,ASSURED -t 431000",
    "-s 2001:db8::1 -d 2001:4860:4860::8888 -p udp --sport 50002 --dport 53 -t 30",
    "-s 10.1.0.1 -d 192.0.2.11 -p sctp --sport 5000 --dport 5001 --state ESTABLISHED --orig-vtag 11 --reply-vtag 12 -t 3000",
    "-s 10.1.0.1 -d 192.0.2.12 -p gre --srckey 7 --dstkey 8 -t 300",
    "-s 10.1.0.1 -d 192.0.2.13 -p udplite --sport 9 --dport 10 -t 60",
    "-s 10.1.0.1 -d 192.0.2.14 -p 99 -t 60",
];

fn dump_save(ns: &Netns) -> Vec<String> {
    let mut lines = Vec::new();
    for fam in ["ipv4", "ipv6"] {
        let out = ns.run("conntrack", &["-L", "-f", fam, "-o", "save"]);
        lines.extend(out.lines().filter(|l| !l.is_empty()).map(str::to_owned));
    }
    lines
}

/// A line without its `-t N` (timeouts tick between dumps).
fn without_timeout(l: &str) -> String {
    let mut out = Vec::new();
    let mut it = l.split_whitespace();
    while let Some(w) = it.next() {
        if w == "-t" {
            it.next();
        } else {
            out.push(w);
        }
    }
    out.join(" ")
}

#[test]
fn real_conntrack_interop() {
    common::needs!(kernel);
    let src = Netns::new("fmt-text-src");
    let dst = Netns::new("fmt-text-dst");
    for c in CREATE {
        let mut args: Vec<&str> = vec!["-I"];
        args.extend(c.split_whitespace());
        args.extend(["--mark", "100"]);
        src.run("conntrack", &args);
    }
    // Entries of another mark are not part of the payload.
    src.run(
        "conntrack",
        &[
            "-I",
            "-s",
            "10.1.0.1",
            "-d",
            "192.0.2.99",
            "-p",
            "udp",
            "--sport",
            "1",
            "--dport",
            "2",
            "-t",
            "60",
            "--mark",
            "200",
        ],
    );
    let listed = run_ok(src.cmd("conntrack").args(["-L", "-m", "100", "-o", "save"]));
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    let mut payload = String::new();
    for l in listed.lines().filter(|l| !l.is_empty()) {
        // What the Perl helper sends: each line plus " --mark <vmid>".
        payload.push_str(l);
        payload.push_str(" --mark 100\n");
    }
    let d = format::decode(payload.as_bytes()).unwrap();
    assert_eq!(d.entries.len(), CREATE.len(), "{payload}");
    assert!(d.entries.iter().all(|e| e.mark == 100));
    let by_dst = |a: &str| {
        d.entries
            .iter()
            .find(|e| e.orig.dst == a.parse::<IpAddr>().unwrap())
            .unwrap()
    };
    let dnat = by_dst("93.184.216.37");
    assert_eq!(dnat.reply.src, "10.9.9.9".parse::<IpAddr>().unwrap());
    assert_ne!(dnat.status & status::DST_NAT, 0);
    let snat = by_dst("93.184.216.38");
    assert_eq!(snat.reply.dst, "198.51.100.7".parse::<IpAddr>().unwrap());
    assert_ne!(snat.status & status::SRC_NAT, 0);
    assert_eq!(by_dst("93.184.216.39").zone, 3);
    assert!(matches!(
        by_dst("93.184.216.35").protoinfo,
        Some(ProtoInfo::Tcp { state: 7, .. })
    ));
    assert_eq!(by_dst("93.184.216.36").status & status::SEEN_REPLY, 0);
    assert_ne!(by_dst("192.0.2.9").status & status::FIXED_TIMEOUT, 0);
    assert_eq!(
        by_dst("2001:db8::2").reply.l4,
        L4::Icmp {
            id: 78,
            kind: 129,
            code: 0
        }
    );
    assert_eq!(
        by_dst("192.0.2.11").protoinfo,
        Some(ProtoInfo::Sctp {
            state: 4,
            vtag_orig: 11,
            vtag_reply: 12
        })
    );

    // Emit our text and load it the way the Perl helper's Load does.
    let t = format::encode(
        &d.entries,
        &EncodeOptions {
            limit: format::QEMU_LIMIT,
            format: Format::ConntrackSave,
        },
    )
    .unwrap();
    assert_eq!((t.kept, t.dropped), (CREATE.len(), 0));
    let mut child = dst
        .cmd("conntrack")
        .args(["--load-file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&t.bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "load-file: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut a: Vec<String> = dump_save(&src)
        .iter()
        .map(|l| without_timeout(l))
        .filter(|l| !l.contains("192.0.2.99"))
        .collect();
    let mut b: Vec<String> = dump_save(&dst).iter().map(|l| without_timeout(l)).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let marked = run_ok(dst.cmd("conntrack").args(["-L", "-m", "100"]));
    assert_eq!(
        String::from_utf8_lossy(&marked.stdout).lines().count(),
        CREATE.len()
    );
}

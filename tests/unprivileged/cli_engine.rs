//! `conntrack-vmstate inspect` and CLI errors that need no kernel access.

use std::process::{Command, Output};

use conntrack_vmstate::entry::{status, ProtoInfo};
use conntrack_vmstate::format::{self, EncodeOptions, Format};

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_conntrack-vmstate"))
        .args(args)
        .output()
        .expect("run conntrack-vmstate")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sample() -> Vec<conntrack_vmstate::entry::Entry> {
    let mut v = common::population::entries(40, 5, 100);
    // Make sure the listing has each attribute to show.
    v[0].labels = Some({
        let mut l = [0u8; 16];
        l[0] = 1;
        l[5] = 4;
        l
    });
    v[0].zone = 7;
    v[0].timeout = 400_000;
    v[0].protoinfo = Some(ProtoInfo::Tcp {
        state: 3,
        wscale_orig: 7,
        wscale_reply: 9,
        flags_orig: 0x23,
        flags_reply: 0x23,
    });
    v[0].orig.proto = 6;
    v[0].reply = v[0].orig.inverse();
    v[0].reply.src = "10.9.9.9".parse().unwrap();
    v[0].status = status::SEEN_REPLY
        | status::ASSURED
        | status::CONFIRMED
        | status::DST_NAT
        | status::DST_NAT_DONE;
    v
}

#[test]
fn inspect_lists_every_entry_with_attributes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.bin");
    let v = sample();
    let enc = format::encode(&v, &EncodeOptions::default()).unwrap();
    std::fs::write(&path, &enc.bytes).unwrap();
    let out = cli(&["inspect", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 40);
    let first = v[0].orig;
    let line = stdout
        .lines()
        .find(|l| {
            l.contains(&format!("src={} dst={}", first.src, first.dst)) && l.contains("zone=7")
        })
        .unwrap_or_else(|| panic!("no line for entry 0:\n{stdout}"));
    for part in [
        "ipv4     2 tcp      6 400000 ESTABLISHED",
        "[ASSURED]",
        "nat=dnat",
        "src=10.9.9.9",
        "mark=100",
        "labels=0,42",
        "wscale=7/9",
    ] {
        assert!(line.contains(part), "{part:?} missing in {line}");
    }
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "inspect: 40 entries, {} bytes binary, truncated: no, dropped 0, ",
            enc.bytes.len()
        )),
        "{err}"
    );
}

#[test]
fn inspect_json_is_one_object_per_entry_plus_summary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.bin");
    let v = sample();
    let enc = format::encode(
        &v,
        &EncodeOptions {
            limit: 200,
            format: Format::Binary,
        },
    )
    .unwrap();
    assert!(enc.dropped > 0);
    std::fs::write(&path, &enc.bytes).unwrap();
    let out = cli(&["inspect", "--json", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let objs: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objs.len(), enc.kept + 1);
    let summary = &objs[enc.kept]["summary"];
    assert_eq!(summary["entries"], enc.kept);
    assert_eq!(summary["truncated"], true);
    assert_eq!(summary["dropped"], enc.dropped);
    assert_eq!(summary["format"], "binary");
    let d = format::decode(&enc.bytes).unwrap();
    assert_eq!(
        summary["saved_at_us"],
        d.saved_at.expect("a Save stamps its time")
    );
    for (o, e) in objs.iter().zip(&d.entries) {
        assert_eq!(o["orig"]["src"], e.orig.src.to_string());
        assert_eq!(o["timeout"], e.timeout);
        assert_eq!(o["mark"], e.mark);
        assert_eq!(o["status"], e.status);
    }
}

#[test]
fn inspect_reads_perl_helper_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.txt");
    std::fs::write(
        &path,
        "-A -t 99 -u SEEN_REPLY,ASSURED -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -q 10.0.0.1 -p tcp --sport 1000 --dport 80 --reply-port-src 80 --reply-port-dst 1000 --state ESTABLISHED --mark 100\n",
    )
    .unwrap();
    let out = cli(&["inspect", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim_end(),
        "ipv4     2 tcp      6 99 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=1000 dport=80 src=10.0.0.2 dst=10.0.0.1 sport=80 dport=1000 [ASSURED] mark=100 wscale=0/0 tcpflags=0x00/0x00 status=0xe"
    );
    assert!(
        text(&out.stderr).starts_with("inspect: 1 entries, "),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn inspect_of_a_corrupt_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.bin");
    let mut b = format::encode(&sample(), &EncodeOptions::default())
        .unwrap()
        .bytes;
    let last = b.len() - 1;
    b[last] ^= 0x40;
    std::fs::write(&path, &b).unwrap();
    let out = cli(&["inspect", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = text(&out.stderr);
    assert!(
        err.contains("is not a valid state blob: state blob checksum mismatch"),
        "{err}"
    );

    std::fs::write(&path, b"garbage!").unwrap();
    let err = text(&cli(&["inspect", path.to_str().unwrap()]).stderr);
    assert!(err.contains("wrong magic"), "{err}");

    let out = cli(&["inspect", "/nonexistent/state.bin"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("reading /nonexistent/state.bin: No such file or directory"),
        "{err}"
    );
}

#[test]
fn bad_options_are_rejected_by_clap() {
    let out = cli(&["save", "--mark", "1", "--format", "xml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("invalid value 'xml' for '--format <FORMAT>'"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(&["save", "--mark", "1", "--limit", "-5"]);
    assert_eq!(out.status.code(), Some(2));
    let out = cli(&["inspect"]);
    assert_eq!(out.status.code(), Some(2));
    let out = cli(&["flush"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--mark <MARK>"),
        "{}",
        text(&out.stderr)
    );
}

//! `save`, `load`, `flush` end to end through the CLI binary, inside
//! throw-away network namespaces with the kernel's conntrack.

use std::path::Path;
use std::process::Output;

use common::compare::{compare, cross_check, Tolerance};
use common::netns::Netns;
use common::population::{self, Spec};
use conntrack_vmstate::access::ConntrackAccess;
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::Selector;
use conntrack_vmstate::format;

const MARK: u32 = 4100;

fn cli(ns: &Netns, args: &[&str]) -> Output {
    ns.cmd(env!("CARGO_BIN_EXE_conntrack-vmstate"))
        .args(args)
        .output()
        .expect("run conntrack-vmstate")
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "failed ({}): {err}", o.status);
    err
}

fn ct(ns: &Netns) -> Ctnetlink {
    Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink in namespace")
}

fn loaded(tag: &str, n: usize, seed: u64) -> (Netns, population::Population) {
    let ns = Netns::new(tag);
    let pop = population::generate(Spec::new(n, MARK, seed));
    population::load(&ns.name, &pop);
    (ns, pop)
}

#[test]
fn save_load_copies_every_attribute_and_flush_only_takes_the_mark() {
    common::needs!(kernel);
    let (src, pop) = loaded("clisrc", 1500, 21);
    let dst = Netns::new("clidst");
    population::enable_labels(&dst.name);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.bin");
    let f = file.to_str().unwrap();
    let n = pop.vm_count();

    let err = ok(&cli(&src, &["save", "--mark", &MARK.to_string(), "-o", f]));
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(
        err.starts_with(&format!(
            "save: {n} entries (kept {n}, dropped 0), {size} bytes binary, dump "
        )),
        "{err}"
    );
    let err = ok(&cli(&dst, &["load", "-i", f]));
    assert!(
        err.starts_with(&format!(
            "load: {n} entries from {size} bytes binary: created {n}, existed 0, refused 0, "
        )),
        "{err}"
    );
    let saved = ct(&src).dump(&Selector::mark(MARK)).unwrap();
    let copy = ct(&dst).dump(&Selector::mark(MARK)).unwrap();
    assert_eq!(saved.len(), n);
    let diffs = compare(&saved, &copy, Tolerance::exact_status(10));
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    let diffs = cross_check(&src.name, &dst.name, MARK);
    assert!(
        diffs.is_empty(),
        "conntrack(8) sees differences:\n{}",
        diffs.join("\n")
    );
    assert_eq!(
        dst.conntrack_count(),
        n,
        "entries of other marks were carried"
    );

    // Flush takes exactly the VM's entries.
    let before = src.conntrack_count();
    let noise_before: Vec<usize> = pop
        .noise_marks
        .iter()
        .map(|m| ct(&src).dump(&Selector::mark(*m)).unwrap().len())
        .collect();
    assert_eq!(noise_before.iter().sum::<usize>(), pop.noise_lines.len());
    let err = ok(&cli(&src, &["flush", "--mark", &MARK.to_string()]));
    assert!(
        err.starts_with(&format!(
            "flush: deleted {n} entries (mark {MARK:#x}/0xffffffff), "
        )),
        "{err}"
    );
    assert_eq!(src.conntrack_count(), before - n);
    assert!(ct(&src).dump(&Selector::mark(MARK)).unwrap().is_empty());
    for (m, want) in pop.noise_marks.iter().zip(noise_before) {
        let left = ct(&src).dump(&Selector::mark(*m)).unwrap().len();
        assert_eq!(left, want, "mark {m}");
    }
}

#[test]
fn budget_and_conntrack_save_format_through_the_cli() {
    common::needs!(kernel);
    let (src, pop) = loaded("clibud", 800, 22);
    let n = pop.vm_count();
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.bin");
    let err = ok(&cli(
        &src,
        &[
            "save",
            "--mark",
            &MARK.to_string(),
            "--limit",
            "2000",
            "-o",
            small.to_str().unwrap(),
        ],
    ));
    let bytes = std::fs::read(&small).unwrap();
    assert!(bytes.len() <= 2000);
    let d = format::decode(&bytes).unwrap();
    assert!(d.truncated);
    let kept = d.entries.len();
    assert!(kept > 0 && kept < n);
    assert!(
        err.starts_with(&format!(
            "save: {n} entries (kept {kept}, dropped {}), {} bytes binary",
            n - kept,
            bytes.len()
        )),
        "{err}"
    );
    let dst = Netns::new("clibud-dst");
    let err = ok(&cli(&dst, &["load", "-i", small.to_str().unwrap()]));
    assert!(
        err.contains(&format!(
            " (sender dropped {}): created {kept}, existed 0, refused 0",
            n - kept
        )),
        "{err}"
    );
    assert_eq!(dst.conntrack_count(), kept);

    // Text for a Perl-helper host, loaded by conntrack(8) as that helper does.
    let txt = dir.path().join("state.txt");
    let err = ok(&cli(
        &src,
        &[
            "save",
            "--mark",
            &MARK.to_string(),
            "--format",
            "conntrack-save",
            "-o",
            txt.to_str().unwrap(),
        ],
    ));
    assert!(err.contains(" bytes conntrack-save,"), "{err}");
    let body = std::fs::read_to_string(&txt).unwrap();
    assert_eq!(body.lines().count(), n);
    assert!(body
        .lines()
        .all(|l| l.starts_with("-A ") && l.ends_with(&format!(" --mark {MARK}"))));
    let perl = Netns::new("cliperl");
    let out = perl
        .cmd("conntrack")
        .args(["--load-file", txt.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ct(&perl).dump(&Selector::mark(MARK)).unwrap().len(), n);
}

#[test]
fn load_of_a_malformed_blob_creates_nothing() {
    common::needs!(kernel);
    let (src, _pop) = loaded("climal", 200, 23);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.bin");
    ok(&cli(
        &src,
        &[
            "save",
            "--mark",
            &MARK.to_string(),
            "-o",
            file.to_str().unwrap(),
        ],
    ));
    let mut b = std::fs::read(&file).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 1;
    std::fs::write(&file, &b).unwrap();
    let dst = Netns::new("climal-dst");
    let out = cli(&dst, &["load", "-i", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("load: invalid state blob, nothing created: state blob checksum mismatch"),
        "{err}"
    );
    assert_eq!(dst.conntrack_count(), 0);

    // Legacy text: two good lines, then a bad one: nothing is created.
    let good = "-A -t 99 -u SEEN_REPLY -s 10.0.0.1 -d 10.0.0.2 -r 10.0.0.2 -q 10.0.0.1 -p udp --sport 1 --dport 2 --reply-port-src 2 --reply-port-dst 1 --mark 5";
    let good2 = good
        .replace("--sport 1 ", "--sport 3 ")
        .replace("--reply-port-dst 1 ", "--reply-port-dst 3 ");
    std::fs::write(
        &file,
        format!("{good}\n{good2}\n-A -t 99 -s 10.0.0.1 -p udp --mark 5\n"),
    )
    .unwrap();
    let out = cli(&dst, &["load", "-i", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad conntrack text line 3: missing -d (original destination)"),
        "{err}"
    );
    assert_eq!(dst.conntrack_count(), 0);

    // The same two good lines alone do load.
    std::fs::write(&file, format!("{good}\n{good2}\n")).unwrap();
    let err = ok(&cli(&dst, &["load", "-i", file.to_str().unwrap()]));
    assert!(err.starts_with("load: 2 entries from "), "{err}");
    assert_eq!(dst.conntrack_count(), 2);
}

/// `load` of a state saved three hours ago (a saved VM restored later):
/// every timeout is three hours shorter, what ran out meanwhile is not
/// created, and the summary line says how many and by how much.
#[test]
fn load_ages_a_state_saved_hours_ago() {
    common::needs!(kernel);
    let (src, _pop) = loaded("cliage", 1200, 23);
    let saved = ct(&src).dump(&Selector::mark(MARK)).unwrap();
    let age = 3 * 3600u32;
    let blob = format::encode_at(
        &saved,
        &format::EncodeOptions::default(),
        Some(format::wall_clock_us() - u64::from(age) * 1_000_000),
    )
    .unwrap()
    .bytes;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("old.bin");
    std::fs::write(&file, &blob).unwrap();
    let dst = Netns::new("cliage-dst");
    population::enable_labels(&dst.name);
    let err = ok(&cli(&dst, &["load", "-i", file.to_str().unwrap()]));
    // The CLI ran within seconds: its age is three hours and a few seconds
    // at most; which entries expired follows from the age it reports.
    let aged = |a: u32| format!("(timeouts aged by {a} s)");
    let got = (age..age + 5)
        .find(|a| err.contains(&aged(*a)))
        .unwrap_or_else(|| panic!("no age of about {age} s: {err}"));
    let want: Vec<_> = saved
        .iter()
        .filter(|e| e.timeout > got)
        .map(|e| conntrack_vmstate::entry::Entry {
            timeout: e.timeout - got,
            ..e.clone()
        })
        .collect();
    let expired = saved.len() - want.len();
    assert!(
        expired > 0 && !want.is_empty(),
        "{expired} of {}",
        saved.len()
    );
    assert!(
        err.starts_with(&format!(
            "load: {} entries from {} bytes binary: created {}, existed 0, refused 0, expired {expired} {}, ",
            saved.len(),
            blob.len(),
            want.len(),
            aged(got)
        )),
        "{err}"
    );
    let copy = ct(&dst).dump(&Selector::mark(MARK)).unwrap();
    let diffs = compare(&want, &copy, Tolerance::exact_status(5));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

//! The real `conntrack-vmstate-helper` binary, running inside throw-away
//! network namespaces, driven through `HelperClient` against the kernel's
//! conntrack: an attribute-exact copy, hostile requests that must not touch
//! the table, and the privilege model of the packaged unit (an unprivileged
//! user with only ambient CAP_NET_ADMIN works, without it a clear error).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::compare::{compare, cross_check, Tolerance};
use common::netns::Netns;
use common::population::{self, Spec};
use conntrack_vmstate::access::{
    AccessError, ConntrackAccess, CreateReport, DeleteReport, DumpSource,
};
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::{Selector, Tuple};
use conntrack_vmstate::format::{self, EncodeOptions, Format};
use conntrack_vmstate::helper::wire::{self, Request, Response};
use conntrack_vmstate::helper::HelperClient;

const MARK: u32 = 4242;

/// A helper process inside a namespace, killed (TERM, then KILL) on drop.
struct Helper {
    child: Child,
    path: PathBuf,
    _dir: tempfile::TempDir,
    /// Watches MARK as the daemon watches a registered VM: a confined
    /// helper serves only watched selectors.
    _watcher: Option<HelperClient>,
}

impl Helper {
    /// `wrap` is put between `ip netns exec NS` and the helper (e.g. setpriv).
    fn start(ns: &Netns, wrap: &[&str]) -> Helper {
        Helper::start_with(ns, wrap, &[])
    }

    /// [`Helper::start`] with extra helper arguments.
    fn start_with(ns: &Netns, wrap: &[&str], extra: &[&str]) -> Helper {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cvs-hk-{}-", std::process::id()))
            .tempdir()
            .expect("tempdir");
        // An unprivileged helper must be able to bind in here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let path = dir.path().join("helper.sock");
        let mut cmd = ns.cmd(
            wrap.first()
                .copied()
                .unwrap_or(env!("CARGO_BIN_EXE_conntrack-vmstate-helper")),
        );
        if !wrap.is_empty() {
            cmd.args(&wrap[1..])
                .arg(env!("CARGO_BIN_EXE_conntrack-vmstate-helper"));
        }
        let child = cmd
            .args(extra)
            .args(["--idle-timeout", "0", "--listen"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn helper");
        let mut h = Helper {
            child,
            path,
            _dir: dir,
            _watcher: None,
        };
        let t0 = Instant::now();
        while !h.path.exists() {
            if let Ok(Some(st)) = h.child.try_wait() {
                panic!("helper exited during startup: {st}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "helper socket did not appear"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let w = h.client();
        // Refused only by a helper without CAP_NET_ADMIN (its cache cannot
        // dump); its requests then fail for that reason.
        let _ = w.watch(&Selector::mark(MARK), true);
        h._watcher = Some(w);
        h
    }

    fn client(&self) -> HelperClient {
        HelperClient::new(&self.path).expect("client")
    }

    fn raw(&self, req: &Request) -> Response {
        let mut s = UnixStream::connect(&self.path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&wire::encode_request(req)).unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut buf).unwrap();
        wire::decode_response(&buf).unwrap()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn direct(ns: &Netns) -> Ctnetlink {
    Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink")
}

#[test]
fn copy_through_two_helpers_is_attribute_exact() {
    common::needs!(kernel);
    let src = Netns::new("hksrc");
    let dst = Netns::new("hkdst");
    let pop = population::generate(Spec::new(2000, MARK, 31));
    population::load(&src.name, &pop);
    population::enable_labels(&dst.name);
    let (hs, hd) = (Helper::start(&src, &[]), Helper::start(&dst, &[]));
    let (cs, cd) = (hs.client(), hd.client());

    let saved = cs.dump(&Selector::mark(MARK)).expect("dump via helper");
    assert_eq!(saved.len(), pop.vm_count());
    // The helper adds and loses nothing compared with asking the kernel directly.
    let mut direct_dump = direct(&src)
        .dump(&Selector::mark(MARK))
        .expect("direct dump");
    assert!(compare(&direct_dump, &saved, Tolerance::exact_status(5)).is_empty());
    direct_dump.clear();

    // Half as a restore's synchronous part, half as its background part
    // (CreateBackground: the helper lowers the thread's priority).
    let half = saved.len() / 2;
    let mut report = cd.create(&saved[..half]).expect("create via helper");
    report.merge(
        &cd.create_background(&saved[half..])
            .expect("background create via helper"),
    );
    assert_eq!(
        report,
        CreateReport {
            created: saved.len() as u64,
            ..Default::default()
        }
    );
    let copy = cd.dump(&Selector::mark(MARK)).expect("dump copy");
    let diffs = compare(&saved, &copy, Tolerance::exact_status(5));
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    let diffs = cross_check(&src.name, &dst.name, MARK);
    assert!(diffs.is_empty(), "conntrack(8) sees:\n{}", diffs.join("\n"));
    assert_eq!(dst.conntrack_count(), saved.len());

    // Flush on the source: exactly the saved entries; other marks stay.
    let noise_before = src.conntrack_count() - saved.len();
    let d = cs.delete_entries(&saved).expect("delete via helper");
    assert_eq!(
        d,
        DeleteReport {
            deleted: saved.len() as u64,
            missing: 0
        }
    );
    assert_eq!(src.conntrack_count(), noise_before);
    // Deleting by selector is not an op the daemon uses: a confined
    // helper refuses it even for a watched selector.
    assert_eq!(
        cd.delete_selected(&Selector::mark(MARK))
            .unwrap_err()
            .to_string(),
        "conntrack helper unavailable: helper refused delete: delete-selected refused: \
         not an operation the daemon uses; refused"
    );
    assert_eq!(dst.conntrack_count(), saved.len());
}

#[test]
fn hostile_requests_do_not_touch_the_kernel_table() {
    common::needs!(kernel);
    let ns = Netns::new("hkhost");
    let pop = population::generate(Spec::new(300, MARK, 32));
    population::load(&ns.name, &pop);
    // An unmarked entry: the host's own connection.
    ns.run(
        "conntrack",
        &[
            "-I",
            "-p",
            "tcp",
            "-s",
            "10.9.9.1",
            "-d",
            "10.9.9.2",
            "--sport",
            "1000",
            "--dport",
            "22",
            "--state",
            "ESTABLISHED",
            "-t",
            "600",
            "-u",
            "SEEN_REPLY,ASSURED",
        ],
    );
    let before = ns.conntrack_count();
    let h = Helper::start(&ns, &[]);
    let other = pop.noise_marks[0];
    let victims = direct(&ns)
        .dump(&Selector::mark(other))
        .expect("dump noise");
    assert!(!victims.is_empty());

    // Deleting another VM's entries while claiming our mark.
    let r = h.raw(&Request::DeleteEntries(
        Selector::mark(MARK),
        victims.clone(),
    ));
    assert_eq!(
        r,
        Response::Error(format!(
            "delete-entries refused: entry 0 (mark {:#x}, zone {}) is outside the request's \
             selector (mark {MARK:#x}/0xffffffff)",
            victims[0].mark, victims[0].zone
        ))
    );
    // The same tuples with our mark forged onto them: the kernel deletes by
    // tuple and id and ignores the mark, so only the helper's own look at the
    // table can refuse this.
    let forged: Vec<_> = victims
        .iter()
        .map(|v| {
            let mut f = v.clone();
            f.mark = MARK;
            f
        })
        .collect();
    let r = h.raw(&Request::DeleteEntries(Selector::mark(MARK), forged));
    assert_eq!(
        r,
        Response::DeleteReport(conntrack_vmstate::access::DeleteReport {
            deleted: 0,
            missing: victims.len() as u64,
        })
    );
    // Wiping everything with a zero mask, or the unmarked host entries.
    for sel in [
        Selector {
            mark: MARK,
            mark_mask: 0,
            zone: None,
        },
        Selector::mark(0),
    ] {
        let r = h.raw(&Request::DeleteSelected(sel));
        assert!(
            matches!(&r, Response::Error(m) if m.ends_with("would select unmarked entries; refused")),
            "{r:?}"
        );
        let r = h.raw(&Request::Dump(sel));
        assert!(matches!(r, Response::Error(_)), "{r:?}");
    }
    // Creating entries under a mark the request does not name.
    let mut forged = victims[0].clone();
    forged.orig.l4 = conntrack_vmstate::entry::L4::Ports { src: 1, dst: 2 };
    forged.reply = forged.orig.inverse();
    let r = h.raw(&Request::Create(Selector::mark(MARK), vec![forged]));
    assert!(matches!(r, Response::Error(m) if m.starts_with("create refused: entry 0")));

    assert_eq!(ns.conntrack_count(), before);
    assert_eq!(
        direct(&ns)
            .dump(&Selector::mark(other))
            .expect("dump")
            .len(),
        victims.len()
    );
    // And the helper still serves legitimate requests.
    assert_eq!(
        h.client().dump(&Selector::mark(MARK)).expect("dump").len(),
        pop.vm_count()
    );
}

#[test]
fn unprivileged_helper_needs_exactly_ambient_cap_net_admin() {
    common::needs!(kernel);
    let ns = Netns::new("hkcap");
    let pop = population::generate(Spec::new(50, MARK, 33));
    population::load(&ns.name, &pop);
    let base = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--no-new-privs",
    ];

    // As the unit runs it: nobody with CAP_NET_ADMIN inheritable + ambient.
    let mut with_cap = base.to_vec();
    with_cap.extend([
        "--inh-caps=-all,+net_admin",
        "--ambient-caps=-all,+net_admin",
        "--bounding-set=-all,+net_admin",
    ]);
    let h = Helper::start(&ns, &with_cap);
    let caps = std::fs::read_to_string(format!("/proc/{}/status", h.child.id())).unwrap();
    let eff = caps
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|s| s.trim().to_owned())
        .unwrap();
    assert_eq!(eff, "0000000000001000", "CapEff of the helper");
    let c = h.client();
    let all = c.dump(&Selector::mark(MARK)).expect("dump");
    assert_eq!(all.len(), pop.vm_count());
    // Background creates work as nobody too (lowering one's own priority
    // needs no privilege).
    let one = &all[..1];
    assert_eq!(c.delete_entries(one).expect("delete").deleted, 1);
    assert_eq!(
        c.create_background(one).expect("background create").created,
        1
    );
    drop(h);

    // Without it: a clear error, not a crash, and the helper keeps serving.
    let mut without = base.to_vec();
    without.extend([
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
    ]);
    let h = Helper::start(&ns, &without);
    for _ in 0..2 {
        let err = h.client().dump(&Selector::mark(MARK)).unwrap_err();
        assert!(matches!(err, AccessError::Helper(_)));
        assert_eq!(
            err.to_string(),
            "conntrack helper unavailable: helper refused dump: conntrack access needs \
             CAP_NET_ADMIN: dump was refused by the kernel (EPERM)"
        );
    }
    assert!(h.path.exists());
}

fn key_set(es: &[conntrack_vmstate::entry::Entry]) -> std::collections::HashSet<(Tuple, u16)> {
    es.iter().map(|e| (e.orig, e.zone)).collect()
}

fn id_set(es: &[conntrack_vmstate::entry::Entry]) -> Vec<u32> {
    let mut v: Vec<u32> = es
        .iter()
        .map(|e| e.id.expect("kernel entry has a CTA_ID"))
        .collect();
    v.sort_unstable();
    v
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort_unstable();
    v
}

/// SaveState through the real helper: the blob holds exactly the
/// namespace's entries of the mark, attribute-exact, with the kernel's ids;
/// the same from the helper's warm cache once the selector is watched; a
/// small limit truncates within it; bad limits are refused with their
/// reason and touch nothing.
#[test]
fn save_state_through_the_helper_is_attribute_exact_and_bounded() {
    common::needs!(kernel);
    let ns = Netns::new("hksave");
    let pop = population::generate(Spec::new(2000, MARK, 34));
    // Entries carry the event extension whether or not some ctnetlink
    // listener exists on the host while they are loaded (under the default
    // 2 that decides it), so the warm cache can vouch for them.
    ns.run("sysctl", &["-qw", "net.netfilter.nf_conntrack_events=1"]);
    population::load(&ns.name, &pop);
    // A warm-up that cannot catch up with its events on a busy machine is
    // retried at the next refresh: keep that short.
    let h = Helper::start_with(&ns, &[], &["--cache-refresh-secs", "1"]);
    let c = h.client();
    let sel = Selector::mark(MARK);

    let saved = c
        .save_state(&sel, &EncodeOptions::default())
        .expect("save via helper");
    let kernel = direct(&ns).dump(&sel).expect("direct dump");
    assert_eq!(kernel.len(), pop.vm_count());
    assert_eq!(saved.source, DumpSource::Kernel);
    assert_eq!(
        (saved.encoded.kept, saved.encoded.dropped),
        (kernel.len(), 0)
    );
    assert!(saved.encoded.bytes.len() <= format::QEMU_LIMIT);
    assert_eq!(sorted(saved.ids.clone()), id_set(&kernel));
    let decoded = format::decode(&saved.encoded.bytes).expect("decode");
    assert_eq!(decoded.format, Format::Binary);
    assert!(!decoded.truncated);
    let diffs = compare(&kernel, &decoded.entries, Tolerance::exact_status(5));
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );

    // Served by the helper's warm cache once watched (it warms up in the
    // background): still exactly the kernel's entries.
    c.watch(&sel, true).expect("watch");
    let t0 = Instant::now();
    let cached = loop {
        let s = c
            .save_state(&sel, &EncodeOptions::default())
            .expect("save via helper");
        if s.source == DumpSource::Cache {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no Save served from the cache"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Timeouts count down while the cache warms: compare with a fresh look.
    let kernel = direct(&ns).dump(&sel).expect("direct dump");
    assert_eq!(kernel.len(), pop.vm_count());
    assert_eq!(sorted(cached.ids.clone()), id_set(&kernel));
    let decoded = format::decode(&cached.encoded.bytes).expect("decode");
    let diffs = compare(&kernel, &decoded.entries, Tolerance::exact_status(5));
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );

    // The Perl helper's text format, also encoded in the helper.
    let text = c
        .save_state(
            &sel,
            &EncodeOptions {
                limit: format::QEMU_LIMIT,
                format: Format::ConntrackSave,
            },
        )
        .expect("text save via helper");
    let decoded = format::decode(&text.encoded.bytes).expect("decode text");
    assert_eq!(decoded.format, Format::ConntrackSave);
    assert_eq!(text.encoded.kept, kernel.len());
    assert_eq!(key_set(&decoded.entries), key_set(&kernel));

    // A limit too small for everything: the most valuable prefix, within it.
    let limit = 4096;
    let small = c
        .save_state(
            &sel,
            &EncodeOptions {
                limit,
                format: Format::Binary,
            },
        )
        .expect("truncated save via helper");
    let n = small.encoded.kept;
    assert!(
        small.encoded.bytes.len() <= limit,
        "{}",
        small.encoded.bytes.len()
    );
    assert!(n > 0 && n < kernel.len(), "kept {n} of {}", kernel.len());
    assert_eq!(small.encoded.dropped, kernel.len() - n);
    // Every dumped entry's id, also of those dropped: the flush deletes them.
    assert_eq!(sorted(small.ids.clone()), id_set(&kernel));
    let decoded = format::decode(&small.encoded.bytes).expect("decode");
    assert!(decoded.truncated);
    assert_eq!(decoded.dropped, Some((kernel.len() - n) as u64));
    assert_eq!(decoded.entries.len(), n);
    let by_key: std::collections::HashMap<_, _> = kernel
        .iter()
        .map(|e| ((e.orig, e.zone), e.clone()))
        .collect();
    let want: Vec<_> = decoded
        .entries
        .iter()
        .map(|e| {
            by_key
                .get(&(e.orig, e.zone))
                .cloned()
                .expect("kept entry is the kernel's")
        })
        .collect();
    assert!(compare(&want, &decoded.entries, Tolerance::exact_status(5)).is_empty());

    // Bad limits: refused with the reason, before anything is dumped.
    let before = ns.conntrack_count();
    for (limit, want) in [
        (
            0u32,
            "save-state refused: limit 0 is below the smallest valid state (32 bytes)",
        ),
        (
            31,
            "save-state refused: limit 31 is below the smallest valid state (32 bytes)",
        ),
        (
            wire::MAX_SAVE_LIMIT + 1,
            "save-state refused: limit 67108865 exceeds the maximum of 67108864 bytes",
        ),
    ] {
        assert_eq!(
            h.raw(&Request::SaveState(sel, limit, Format::Binary)),
            Response::Error(want.into())
        );
    }
    assert_eq!(
        h.raw(&Request::SaveState(Selector::mark(0), 4096, Format::Binary)),
        Response::Error(
            "save-state refused: selector mark 0x0/0xffffffff would select unmarked entries; \
             refused"
                .into()
        )
    );
    let err = c
        .save_state(
            &sel,
            &EncodeOptions {
                limit: 0,
                format: Format::Binary,
            },
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "conntrack helper unavailable: helper refused save-state: save-state refused: limit 0 \
         is below the smallest valid state (32 bytes)"
    );
    // The smallest limit gives the smallest valid state: no entry, all dropped.
    let least = c
        .save_state(
            &sel,
            &EncodeOptions {
                limit: 32,
                format: Format::Binary,
            },
        )
        .expect("smallest save");
    assert_eq!(least.encoded.bytes.len(), 32);
    assert_eq!(
        (least.encoded.kept, least.encoded.dropped),
        (0, kernel.len())
    );
    assert_eq!(ns.conntrack_count(), before);
}

/// DeleteSaved through the real helper deletes exactly the entries of the
/// mark with the given ids; ids of other marks' entries and unknown ids
/// count as missing and are left alone.
#[test]
fn delete_saved_through_the_helper_deletes_exactly_those_ids() {
    common::needs!(kernel);
    let ns = Netns::new("hkdelsaved");
    let pop = population::generate(Spec::new(1500, MARK, 35));
    population::load(&ns.name, &pop);
    let h = Helper::start(&ns, &[]);
    let c = h.client();
    let sel = Selector::mark(MARK);
    let saved = c
        .save_state(&sel, &EncodeOptions::default())
        .expect("save via helper");
    assert_eq!(saved.ids.len(), pop.vm_count());

    // An entry of the VM that is not in the saved set (made after the Save).
    ns.run(
        "conntrack",
        &[
            "-I",
            "-p",
            "udp",
            "-s",
            "10.77.0.1",
            "-d",
            "10.77.0.2",
            "--sport",
            "5353",
            "--dport",
            "53",
            "-t",
            "600",
            "--mark",
            &MARK.to_string(),
        ],
    );
    let later = direct(&ns).dump(&sel).expect("dump");
    assert_eq!(later.len(), pop.vm_count() + 1);
    let other = pop.noise_marks[0];
    let victims = direct(&ns)
        .dump(&Selector::mark(other))
        .expect("dump noise");
    assert!(!victims.is_empty());
    let noise_before = ns.conntrack_count() - later.len();

    let mut ids = saved.ids.clone();
    // Another VM's ids claimed under our mark, an id nobody has, and a
    // duplicate: none of them may delete anything.
    ids.extend(victims.iter().filter_map(|e| e.id));
    let unknown = (1..u32::MAX)
        .find(|i| !later.iter().chain(&victims).any(|e| e.id == Some(*i)))
        .unwrap();
    ids.push(unknown);
    ids.push(saved.ids[0]);
    let r = c.delete_saved(&sel, &ids).expect("delete-saved via helper");
    assert_eq!(
        r,
        DeleteReport {
            deleted: saved.ids.len() as u64,
            missing: victims.len() as u64 + 1,
        }
    );
    let left = direct(&ns).dump(&sel).expect("dump");
    assert_eq!(left.len(), 1);
    assert_eq!(
        left[0].orig.l4,
        conntrack_vmstate::entry::L4::Ports { src: 5353, dst: 53 }
    );
    assert_eq!(
        id_set(&direct(&ns).dump(&Selector::mark(other)).expect("dump")),
        id_set(&victims)
    );
    assert_eq!(ns.conntrack_count(), noise_before + 1);

    // Again: everything is gone, so everything is missing.
    let r = c.delete_saved(&sel, &saved.ids).expect("again");
    assert_eq!(
        r,
        DeleteReport {
            deleted: 0,
            missing: saved.ids.len() as u64
        }
    );
    // Refused selector: nothing is deleted.
    assert_eq!(
        h.raw(&Request::DeleteSaved(
            Selector::mark(0),
            vec![left[0].id.unwrap()]
        )),
        Response::Error(
            "delete-saved refused: selector mark 0x0/0xffffffff would select unmarked entries; \
             refused"
                .into()
        )
    );
    assert_eq!(ns.conntrack_count(), noise_before + 1);
}

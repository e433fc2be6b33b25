//! The real `conntrack-vmstate-helper` binary, running inside throw-away
//! network namespaces, driven through `HelperClient` against the kernel's
//! conntrack: an attribute-exact copy, hostile requests that must not touch
//! the table, and the privilege model of the packaged unit (an unprivileged
//! user with only ambient CAP_NET_ADMIN works, without it a clear error).

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::compare::{compare, cross_check, Tolerance};
use common::netns::Netns;
use common::population::{self, Spec};
use conntrack_vmstate::access::{AccessError, ConntrackAccess, CreateReport, DeleteReport};
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::Selector;
use conntrack_vmstate::helper::wire::{self, Request, Response};
use conntrack_vmstate::helper::HelperClient;

const MARK: u32 = 4242;

/// A helper process inside a namespace, killed (TERM, then KILL) on drop.
struct Helper {
    child: Child,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Helper {
    /// `wrap` is put between `ip netns exec NS` and the helper (e.g. setpriv).
    fn start(ns: &Netns, wrap: &[&str]) -> Helper {
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

    let report = cd.create(&saved).expect("create via helper");
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
    assert_eq!(
        cd.delete_selected(&Selector::mark(MARK)).expect("flush"),
        saved.len() as u64
    );
    assert_eq!(dst.conntrack_count(), 0);
}

#[test]
fn hostile_requests_do_not_touch_the_kernel_table() {
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
    assert_eq!(
        h.client().dump(&Selector::mark(MARK)).expect("dump").len(),
        pop.vm_count()
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

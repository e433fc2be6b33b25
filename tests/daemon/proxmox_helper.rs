//! The Proxmox VE flow with the real pieces: `conntrack-vmstate
//! proxmox-helper <vmid>` started on both hosts as `pve-dbus-vmstate@<vmid>`
//! would be (READY=1 only once QEMU has the `pve-vmstate` object), a real
//! QEMU migration, then exactly the calls qemu-server's
//! `qemu_del_dbus_vmstate` makes: ListQueuedOwners, `Properties.Get(Id)` on
//! each owner's unique name, `NumMigratedEntries`, `Quit()`.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::host::{assert_same_entries, Host, Proc, WAIT};
use common::population::{self, Spec};
use common::qemu::{Incoming, Qemu, QemuOpts};
use zbus::names::{BusName, WellKnownName};

const VMID: u32 = 100;
const ID: &str = "pve-vmstate-100";

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

async fn connect(addr: &str) -> zbus::Connection {
    zbus::connection::Builder::address(addr)
        .method_timeout(Duration::from_secs(75))
        .build()
        .await
        .expect("connect")
}

/// `proxmox-helper 100` inside the host's namespace, notifying a socket of
/// the test as systemd's NOTIFY_SOCKET would be.
struct PveHelper {
    proc: Proc,
    notify: UnixDatagram,
}

impl PveHelper {
    fn start(h: &mut Host, tag: &str) -> PveHelper {
        let qemu = h.qemu.as_mut().expect("QEMU");
        // QEMU serves one QMP client at a time: step aside for the helper.
        qemu.release_qmp();
        let qmp = qemu.qmp_path.clone();
        let sock = h.path().join(format!("notify-{tag}"));
        let notify = UnixDatagram::bind(&sock).expect("bind notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut cmd = h.ns.cmd(env!("CARGO_BIN_EXE_conntrack-vmstate"));
        cmd.args(["proxmox-helper", &VMID.to_string(), "--qmp"])
            .arg(&qmp)
            .args(["--bus-address", &h.bus.address])
            .env("CONNTRACK_VMSTATE_MANAGER_ADDRESS", &h.bus.address)
            .env("NOTIFY_SOCKET", &sock);
        let proc = Proc::spawn(&format!("pve-helper-{tag}"), h.path(), &mut cmd);
        PveHelper { proc, notify }
    }

    /// Waits for READY=1 and returns every notification seen until then.
    fn wait_ready(&mut self) -> String {
        let end = Instant::now() + WAIT;
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = self.notify.recv(&mut buf) {
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                seen.push('\n');
                if seen.lines().any(|l| l == "READY=1") {
                    return seen;
                }
            }
            if let Some(s) = self.proc.try_wait() {
                panic!(
                    "proxmox-helper exited {s} before READY: {}",
                    self.proc.output()
                );
            }
            assert!(
                Instant::now() < end,
                "no READY=1 after {WAIT:?}: {}",
                self.proc.output()
            );
        }
    }
}

/// `org.qemu.VMState1.Save` called by this test process (not the VM's
/// QEMU) on the owner whose Id is `pve-vmstate-100`: its error.
fn save_from_another_process(bus: &str) -> String {
    block_on(async {
        let conn = connect(bus).await;
        let dbus = zbus::fdo::DBusProxy::new(&conn).await.expect("bus proxy");
        let owners = dbus
            .list_queued_owners(WellKnownName::from_static_str_unchecked(
                "org.qemu.VMState1",
            ))
            .await
            .expect("ListQueuedOwners");
        for owner in owners {
            let props = zbus::fdo::PropertiesProxy::builder(&conn)
                .destination(owner.to_string())
                .path("/org/qemu/VMState1")
                .build()
                .await
                .expect("properties proxy");
            let iface = zbus::names::InterfaceName::from_static_str_unchecked("org.qemu.VMState1");
            let id = props.get(iface, "Id").await.ok();
            if id.and_then(|v| String::try_from(v).ok()).as_deref() != Some(ID) {
                continue;
            }
            let r = conn
                .call_method(
                    Some(owner.as_str()),
                    "/org/qemu/VMState1",
                    Some("org.qemu.VMState1"),
                    "Save",
                    &(),
                )
                .await;
            return match r {
                Err(zbus::Error::FDO(e)) => match *e {
                    zbus::fdo::Error::AccessDenied(text) => format!("AccessDenied: {text}"),
                    other => format!("not AccessDenied: {other:?}"),
                },
                other => format!("not refused: {other:?}"),
            };
        }
        panic!("no owner with Id {ID}");
    })
}

/// qemu-server's `qemu_del_dbus_vmstate($vmid)`, call for call: returns
/// `NumMigratedEntries` of the owner whose Id is `pve-vmstate-<vmid>`
/// after its `Quit()` returned, or None when no owner has that Id.
fn qemu_del_dbus_vmstate(bus: &str) -> Option<u32> {
    block_on(async {
        let conn = connect(bus).await;
        let dbus = zbus::fdo::DBusProxy::new(&conn).await.expect("bus proxy");
        let owners = match dbus
            .list_queued_owners(WellKnownName::from_static_str_unchecked(
                "org.qemu.VMState1",
            ))
            .await
        {
            Ok(o) => o,
            Err(zbus::fdo::Error::NameHasNoOwner(_)) => Vec::new(),
            Err(e) => panic!("ListQueuedOwners: {e}"),
        };
        for owner in owners {
            let props = zbus::fdo::PropertiesProxy::builder(&conn)
                .destination(owner.to_string())
                .path("/org/qemu/VMState1")
                .build()
                .await
                .expect("properties proxy");
            let iface = zbus::names::InterfaceName::from_static_str_unchecked("org.qemu.VMState1");
            let Ok(id) = props.get(iface, "Id").await else {
                continue;
            };
            if String::try_from(id).ok().as_deref() != Some(ID) {
                continue;
            }
            let helper =
                zbus::names::InterfaceName::from_static_str_unchecked("com.proxmox.VMStateHelper");
            let num = props
                .get(helper, "NumMigratedEntries")
                .await
                .expect("NumMigratedEntries");
            let num = u32::try_from(num).expect("NumMigratedEntries is a u32");
            let t = Instant::now();
            conn.call_method(
                Some(owner.as_str()),
                "/org/qemu/VMState1",
                Some("com.proxmox.VMStateHelper"),
                "Quit",
                &(),
            )
            .await
            .expect("Quit");
            println!("Quit on {owner} answered after {:?}", t.elapsed());
            return Some(num);
        }
        None
    })
}

fn start_qemu(h: &mut Host, incoming: bool) {
    h.qemu = Some(Qemu::start(
        h.path(),
        "qemu",
        Some(&h.ns),
        &QemuOpts {
            vmstate: None,
            incoming,
            ..Default::default()
        },
    ));
}

fn qemu(h: &mut Host) -> &mut Qemu {
    h.qemu.as_mut().expect("QEMU")
}

/// (object id, addr, id-list) of the QEMU's dbus-vmstate object, if any.
fn vmstate_object(h: &mut Host) -> Option<(String, String, Vec<String>)> {
    qemu(h)
        .qmp()
        .find_vmstate()
        .expect("qom-list")
        .map(|o| (o.id, o.addr, o.ids))
}

fn registered(h: &Host) -> bool {
    let out = h.cli(&["status", &VMID.to_string()]);
    out.status.success()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < end, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn qemu_server_sequence_migrates_and_quit_cleans_up_both_nodes() {
    common::needs!(qemu);
    let mut src = Host::new("pves");
    let mut dst = Host::new("pved");
    src.start_daemon();
    dst.start_daemon();
    let pop = population::generate(Spec::new(2000, VMID, 11));
    population::load(&src.ns.name, &pop);
    // A firewall that labels connections has connlabels on; without it the
    // kernel drops labels on create.
    population::enable_labels(&dst.ns.name);
    start_qemu(&mut src, false);
    start_qemu(&mut dst, true);

    // qemu-server: `systemctl start pve-dbus-vmstate@100` on the source in
    // prepare(), on the target after its incoming QEMU started.
    let mut hs = PveHelper::start(&mut src, "src");
    let notes = hs.wait_ready();
    assert!(
        notes.contains("STATUS=serving VM 100 as pve-vmstate-100"),
        "{notes}"
    );
    let mut hd = PveHelper::start(&mut dst, "dst");
    hd.wait_ready();
    // READY=1 came after object-add: the object is there with Proxmox's names.
    for h in [&mut src, &mut dst] {
        let addr = h.bus.address.clone();
        assert_eq!(
            vmstate_object(h),
            Some(("pve-vmstate".to_string(), addr, vec![ID.to_string()]))
        );
    }

    // Bound to its QEMU (the QMP socket's peer): another process's Save
    // is refused, QEMU's own below goes through.
    let refused = save_from_another_process(&src.bus.address);
    let qemu_pid = qemu(&mut src).proc.pid();
    assert_eq!(
        refused,
        format!(
            "AccessDenied: Save of VM '100' is only for its QEMU (pid {qemu_pid}): called by pid {}",
            std::process::id()
        )
    );
    let before = src.dump(VMID);
    assert_eq!(before.len(), 2000);
    let stream = src.path().join("stream.bin");
    let t = Instant::now();
    let out = qemu(&mut src).migrate_to_file(&stream);
    assert_eq!(out.status, "completed", "{}", qemu(&mut src).output());
    let inc = qemu(&mut dst).incoming_from_file(&stream);
    assert_eq!(inc, Incoming::Running, "{}", qemu(&mut dst).output());

    // phase3_cleanup: first locally (the source), then the target through
    // the API; the target's helper is stopped right after Load answered,
    // while its restore may still run.
    // qemu-server holds QMP only per command; so does the test from here.
    qemu(&mut src).release_qmp();
    qemu(&mut dst).release_qmp();
    let n_src = qemu_del_dbus_vmstate(&src.bus.address).expect("source owner with pve Id");
    let n_dst = qemu_del_dbus_vmstate(&dst.bus.address).expect("target owner with pve Id");
    assert_eq!(n_src, 2000, "NumMigratedEntries on the source");
    assert!(n_dst <= 2000, "NumMigratedEntries on the target: {n_dst}");

    for (h, p) in [(&mut src, &mut hs), (&mut dst, &mut hd)] {
        let st = p.proc.wait_exit(WAIT).expect("helper exits after Quit");
        assert!(st.success(), "helper: {st}: {}", p.proc.output());
        let log = p.proc.output();
        assert!(log.contains("Quit: QEMU's dbus-vmstate: Deleted"), "{log}");
        assert!(!registered(h), "VM still registered");
        assert_eq!(vmstate_object(h), None, "object left in QEMU");
    }
    // The restore was not cut short by the target's Quit.
    wait_until("all entries on the target", || dst.dump(VMID).len() == 2000);
    let after = dst.dump(VMID);
    let age = t.elapsed().as_secs() as u32 + 5;
    assert_same_entries("VM 100", &before, &after, age);
    // No flush from us: qemu-server flushes the source by mark itself.
    assert_eq!(src.dump(VMID).len(), 2000);
    // Nobody answers for the VM any more: a leftover check finds nothing.
    assert_eq!(qemu_del_dbus_vmstate(&src.bus.address), None);
}

/// The unique name of the connection whose process is `pid`.
fn name_of_pid(bus: &str, pid: u32) -> String {
    block_on(async {
        let conn = connect(bus).await;
        let dbus = zbus::fdo::DBusProxy::new(&conn).await.expect("bus proxy");
        for n in dbus.list_names().await.expect("ListNames") {
            if !n.starts_with(':') {
                continue;
            }
            let b = BusName::try_from(n.to_string()).expect("name");
            if dbus.get_connection_unix_process_id(b).await.ok() == Some(pid) {
                return n.to_string();
            }
        }
        panic!("no connection of pid {pid}");
    })
}

#[test]
fn forged_quit_is_ignored_sigterm_detaches_and_a_killed_helper_unregisters() {
    common::needs!(qemu);
    let mut h = Host::new("pvek");
    h.start_daemon();
    start_qemu(&mut h, false);
    let mut p = PveHelper::start(&mut h, "a");
    p.wait_ready();
    assert!(registered(&h));

    // Any peer can send a unicast signal; only the daemon's counts.
    let helper_name = name_of_pid(&h.bus.address, p.proc.pid());
    block_on(async {
        let conn = connect(&h.bus.address).await;
        let path = conntrack_vmstate::bus::vm_object_path("100");
        conn.emit_signal(
            Some(helper_name.as_str()),
            path.as_str(),
            "org.conntrack_vmstate.VM1",
            "QuitRequested",
            &(),
        )
        .await
        .expect("emit");
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        p.proc.try_wait().is_none(),
        "a forged signal stopped the helper: {}",
        p.proc.output()
    );
    assert!(vmstate_object(&mut h).is_some());

    // systemctl stop: SIGTERM removes the object and unregisters.
    qemu(&mut h).release_qmp();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.proc.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let st = p.proc.wait_exit(WAIT).expect("exits on SIGTERM");
    assert!(st.success(), "{st}: {}", p.proc.output());
    assert!(
        p.proc
            .output()
            .contains("SIGTERM: QEMU's dbus-vmstate: Deleted"),
        "{}",
        p.proc.output()
    );
    assert!(!registered(&h));
    assert_eq!(vmstate_object(&mut h), None);

    // A helper that dies without cleaning up: the daemon unregisters the VM.
    let mut p = PveHelper::start(&mut h, "b");
    p.wait_ready();
    assert!(registered(&h));
    p.proc.kill();
    wait_until("VM unregistered after its controller died", || {
        !registered(&h)
    });
    let log = h.daemon.as_ref().expect("daemon").output();
    assert!(
        log.contains("left the bus; unregistering (entries kept)"),
        "{log}"
    );
}

#[test]
fn helper_refuses_bad_vm_ids_and_fails_when_qemu_is_unreachable() {
    common::needs!(qemu);
    let mut h = Host::new("pveb");
    h.start_daemon();
    let out = h.cli(&["proxmox-helper", "abc"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "conntrack-vmstate: 'abc' is not a Proxmox VE VM id (an integer from 100 up)"
    );
    let missing = h.path().join("none.qmp");
    let (qmp, bus) = (missing.display().to_string(), h.bus.address.clone());
    let out = h.cli(&[
        "proxmox-helper",
        "100",
        "--qmp",
        &qmp,
        "--bus-address",
        &bus,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reaching VM 100's QEMU over") && err.contains("cannot connect to QMP socket"),
        "{err}"
    );
    // Nothing stays registered for a VM whose QEMU never got the object.
    assert!(!registered(&h));
}

//! Proxmox VE: `qm migrate --online --with-conntrack-state 1` starts
//! `pve-dbus-vmstate@<vmid>.service` on both nodes. `proxmox enable` gives
//! that unit a drop-in whose `ExecStart` is `proxmox-helper <vmid>`, which
//! does what qemu-server expects of its Perl helper (same Id, QMP object,
//! READY=1 after `object-add`, `com.proxmox.VMStateHelper.Quit`), with the
//! VM served by conntrack-vmstated. `proxmox disable` removes the drop-in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use futures_util::StreamExt;
use zbus::{Connection, MatchRule, MessageStream, Variant};

use super::manage::{call_error, clone_opts, connect, runtime, with_retries};
use super::{FormatArg, ProxmoxEnableArgs, ProxmoxHelperArgs, ProxmoxUnitArgs};
use crate::bus::proxy::Manager1Proxy;
use crate::bus::{MANAGER_NAME, VM_INTERFACE};

/// qemu-server's template unit (`src/usr/pve-dbus-vmstate@.service`).
pub const PVE_UNIT: &str = "pve-dbus-vmstate@.service";
/// Our drop-in's file name inside `<systemd dir>/pve-dbus-vmstate@.service.d/`.
pub const DROPIN_NAME: &str = "conntrack-vmstate.conf";
/// The QOM id qemu-server's helper gives its object.
pub const QMP_OBJECT_ID: &str = "pve-vmstate";
/// First line of the drop-in: `disable` removes only a file that has it.
const DROPIN_MARKER: &str = "# Managed by `conntrack-vmstate proxmox enable`";
/// Where the units of an installed qemu-server may live.
const PVE_UNIT_DIRS: [&str; 3] = [
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
    "/etc/systemd/system",
];

/// The VMState Id qemu-server looks for (`DBusVMState.pm`: `pve-vmstate-<vmid>`).
pub fn pve_id(vmid: u32) -> String {
    format!("pve-vmstate-{vmid}")
}

/// Proxmox VE VM ids are integers from 100 up; they are also the CONNMARK
/// pve-firewall and proxmox-firewall set.
fn parse_vmid(s: &str) -> anyhow::Result<u32> {
    match s.parse::<u32>() {
        Ok(n) if n >= 100 => Ok(n),
        _ => bail!("'{s}' is not a Proxmox VE VM id (an integer from 100 up)"),
    }
}

/// The drop-in's text. Every line but `ExecStart` and the format keeps
/// qemu-server's unit as it is (`Type=notify`, `Slice=qemu.slice`,
/// `PartOf=<vmid>.scope`).
pub fn dropin_text(format: FormatArg) -> String {
    format!(
        "{DROPIN_MARKER}; `conntrack-vmstate proxmox disable` removes it.
#
# qemu-server starts this unit for a migration with conntrack state on both
# nodes. Instead of its Perl helper, conntrack-vmstated serves the VM (binary
# state: ~100k entries per MiB, IPv6, labels, NAT), queued on org.qemu.VMState1
# with the Id pve-vmstate-<vmid> and answering com.proxmox.VMStateHelper.
# This process registers the VM, adds QEMU's dbus-vmstate object pve-vmstate,
# sends READY=1, and on Quit (or stop) removes the object and unregisters.
[Service]
ExecStart=
ExecStart=/usr/bin/conntrack-vmstate proxmox-helper %i
# binary, or conntrack-save while any node of the cluster still runs the
# Perl helper (it reads only conntrack(8) text). Load reads both.
Environment=CONNTRACK_VMSTATE_PVE_FORMAT={format}
# It only talks to the system bus and the VM's QMP socket, both owned by
# root (this unit's user): no capability, no network, nothing writable.
CapabilityBoundingSet=
NoNewPrivileges=yes
PrivateNetwork=yes
RestrictAddressFamilies=AF_UNIX
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
UMask=0077
",
        format = format.name()
    )
}

fn dropin_path(systemd_dir: &Path) -> PathBuf {
    systemd_dir.join(format!("{PVE_UNIT}.d")).join(DROPIN_NAME)
}

fn pve_unit_installed() -> Option<PathBuf> {
    PVE_UNIT_DIRS
        .iter()
        .map(|d| Path::new(d).join(PVE_UNIT))
        .find(|p| p.exists())
}

fn daemon_reload(a: &ProxmoxUnitArgs) -> anyhow::Result<()> {
    if a.no_reload || !Path::new("/run/systemd/system").exists() {
        return Ok(());
    }
    let st = std::process::Command::new("systemctl")
        .arg("daemon-reload")
        .status()
        .context("running systemctl daemon-reload")?;
    if !st.success() {
        bail!("systemctl daemon-reload failed ({st})");
    }
    Ok(())
}

pub fn enable(a: ProxmoxEnableArgs) -> anyhow::Result<()> {
    let unit = pve_unit_installed();
    if unit.is_none() && !a.force {
        bail!(
            "{PVE_UNIT} not found in {}: is qemu-server 9 installed (Proxmox VE 9)? --force installs the drop-in anyway",
            PVE_UNIT_DIRS.join(", ")
        );
    }
    let path = dropin_path(&a.unit.systemd_dir);
    if let Ok(old) = std::fs::read_to_string(&path) {
        if !old.starts_with(DROPIN_MARKER) {
            bail!(
                "{} exists and was not written by conntrack-vmstate; not touching it",
                path.display()
            );
        }
    }
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("no parent of {}", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Written next to the target and renamed, so systemd never reads half a file.
    let tmp = dir.join(format!(".{DROPIN_NAME}.tmp"));
    std::fs::write(&tmp, dropin_text(a.format))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("installing {}", path.display()))?;
    daemon_reload(&a.unit)?;
    println!(
        "enabled: {PVE_UNIT} runs conntrack-vmstate (state format {}) through {}",
        a.format.name(),
        path.display()
    );
    println!("helpers already running keep the old program until their next start");
    Ok(())
}

pub fn disable(a: ProxmoxUnitArgs) -> anyhow::Result<()> {
    let path = dropin_path(&a.systemd_dir);
    match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("not enabled: {} does not exist", path.display());
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        Ok(old) if !old.starts_with(DROPIN_MARKER) => {
            bail!(
                "{} was not written by conntrack-vmstate; not removing it",
                path.display()
            )
        }
        Ok(_) => {}
    }
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        // Only when empty: an admin's own drop-ins stay.
        let _ = std::fs::remove_dir(dir);
    }
    daemon_reload(&a)?;
    println!("disabled: {PVE_UNIT} runs qemu-server's own helper again");
    Ok(())
}

pub fn status(a: ProxmoxUnitArgs) -> anyhow::Result<()> {
    let path = dropin_path(&a.systemd_dir);
    let unit = pve_unit_installed();
    match std::fs::read_to_string(&path) {
        Ok(t) if t.starts_with(DROPIN_MARKER) => {
            let format = t
                .lines()
                .find_map(|l| l.strip_prefix("Environment=CONNTRACK_VMSTATE_PVE_FORMAT="))
                .unwrap_or("?");
            println!("enabled ({}), state format {format}", path.display());
        }
        Ok(_) => println!("not enabled: {} exists but is not ours", path.display()),
        Err(_) => println!("not enabled"),
    }
    match unit {
        Some(u) => println!("qemu-server unit: {}", u.display()),
        None => println!("qemu-server unit: {PVE_UNIT} not installed"),
    }
    Ok(())
}

/// Why the helper stops serving the VM.
enum Stop {
    /// `com.proxmox.VMStateHelper.Quit` (qemu-server, after a migration).
    Quit,
    /// SIGTERM or SIGINT (`systemctl stop`, `PartOf=<vmid>.scope`).
    Signal(&'static str),
    /// Somebody else unregistered the VM (admin, daemon restart lost it).
    Unregistered,
}

fn notify(state: &[sd_notify::NotifyState]) {
    let _ = sd_notify::notify(state);
}

pub fn helper(a: ProxmoxHelperArgs) -> anyhow::Result<()> {
    let vmid = parse_vmid(&a.vmid)?;
    let id = pve_id(vmid);
    let vm = vmid.to_string();
    let qmp = a
        .qmp
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/run/qemu-server/{vmid}.qmp")));
    runtime()?.block_on(async {
        let conn = connect(&a.manager).await?;
        let m = Manager1Proxy::new(&conn).await?;
        let mut opts: HashMap<&str, Variant> = HashMap::new();
        opts.insert("id", Variant::from(id.as_str()));
        opts.insert("mark", Variant::from(vmid));
        opts.insert("format", Variant::from(a.format.name()));
        if let Some(b) = &a.bus_address {
            opts.insert("bus_address", Variant::from(b.as_str()));
        }
        // The daemon tells this connection when Quit is called, and
        // unregisters the VM should this process die.
        opts.insert("controller", Variant::from(true));
        // Save and Load then answer only this QEMU (docs/trust-model.md):
        // its pid from the QMP socket's peer credentials.
        let pid = super::manage::qemu_pid(&qmp, &format!("VM {vmid}'s QEMU")).await?;
        if let Some(p) = pid {
            opts.insert("qemu_pid", Variant::from(p));
        }
        let register = async || {
            with_retries(async || m.register(&vm, clone_opts(&opts)?).await)
                .await
                .with_context(|| format!("registering VM {vmid} as {id}"))
        };
        register().await?;
        let mut signals = Signals::subscribe(&conn, &vm).await?;
        let vmp = super::manage::vm_proxy(&conn, &vm).await?;
        let bus = vmp.bus_address().await?;
        let (s, i, b) = (qmp.clone(), id.clone(), bus.clone());
        let attached = tokio::task::spawn_blocking(move || {
            crate::qmp::QmpClient::connect(&s)?.attach_vmstate_as(QMP_OBJECT_ID, &i, &b)
        })
        .await?;
        if let Err(e) = attached {
            let _ = m.unregister(&vm, HashMap::new()).await;
            return Err(anyhow!(e)).with_context(|| {
                format!(
                    "adding dbus-vmstate {QMP_OBJECT_ID} to VM {vmid}'s QEMU over {}",
                    qmp.display()
                )
            });
        }
        // Only now may qemu-server go on: the destination's QEMU must have
        // the object before the migration stream arrives.
        let status = format!("serving VM {vmid} as {id}");
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]);
        eprintln!("{status}: QEMU's {QMP_OBJECT_ID} lists it on {bus}");
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let stop = loop {
            tokio::select! {
                ev = signals.next() => match ev? {
                    Event::Quit => break Stop::Quit,
                    Event::Removed => break Stop::Unregistered,
                    Event::NewManager => {
                        // A restarted daemon serves the VM again from its
                        // state directory, but no longer knows this process.
                        register().await?;
                        signals = Signals::subscribe(&conn, &vm).await?;
                        eprintln!("conntrack-vmstated restarted: VM {vmid} registered again");
                    }
                },
                _ = term.recv() => break Stop::Signal("SIGTERM"),
                _ = int.recv() => break Stop::Signal("SIGINT"),
            }
        };
        notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping"),
        ]);
        finish(&m, &vm, &id, &qmp, stop).await
    })
}

/// What the helper waits for from the daemon.
enum Event {
    /// The daemon got `com.proxmox.VMStateHelper.Quit` for this VM.
    Quit,
    /// The VM's object went away: somebody unregistered it.
    Removed,
    /// The manager name lost or changed its owner (daemon restarted, or
    /// stopped, e.g. by a package upgrade).
    NewManager,
}

/// Signals from the daemon that currently owns the manager name. Matched by
/// its unique name: a unicast signal reaches this connection whatever the
/// match rules say, so a well-known sender name would let any peer on the
/// bus fake a Quit.
struct Signals {
    quit: MessageStream,
    removed: MessageStream,
    owner: MessageStream,
    path: String,
}

impl Signals {
    async fn subscribe(conn: &Connection, vm: &str) -> anyhow::Result<Signals> {
        let dbus = zbus::fdo::DBusProxy::new(conn).await?;
        let name = zbus::names::BusName::try_from(MANAGER_NAME)?;
        let owner = dbus
            .get_name_owner(name)
            .await
            .context("finding conntrack-vmstated on the bus")?;
        let path = crate::bus::vm_object_path(vm);
        let rule = |iface: &'static str, member: &'static str| {
            MatchRule::builder()
                .msg_type(zbus::message::Type::Signal)
                .sender(owner.clone())
                .interface(iface)
                .member(member)
                .build()
        };
        let quit_rule = MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(owner.clone())
            .interface(VM_INTERFACE)
            .member(crate::bus::proxmox::QUIT_REQUESTED)
            .path(path.clone())
            .build()?;
        let owner_rule = MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender("org.freedesktop.DBus")
            .interface("org.freedesktop.DBus")
            .member("NameOwnerChanged")
            .arg(0, MANAGER_NAME)
            .build()?;
        Ok(Signals {
            quit: MessageStream::for_match_rule(quit_rule, conn, None).await?,
            removed: MessageStream::for_match_rule(
                rule("org.freedesktop.DBus.ObjectManager", "InterfacesRemoved")?,
                conn,
                None,
            )
            .await?,
            owner: MessageStream::for_match_rule(owner_rule, conn, None).await?,
            path,
        })
    }

    async fn next(&mut self) -> anyhow::Result<Event> {
        loop {
            tokio::select! {
                Some(_) = self.quit.next() => return Ok(Event::Quit),
                Some(msg) = self.removed.next() => {
                    let ours = msg.ok().and_then(|m| {
                        m.body()
                            .deserialize::<(zbus::OwnedObjectPath, Vec<String>)>()
                            .ok()
                            .map(|(p, ifaces)| {
                                p.as_str() == self.path && ifaces.iter().any(|i| i == VM_INTERFACE)
                            })
                    });
                    if ours == Some(true) {
                        return Ok(Event::Removed);
                    }
                }
                // Gone or replaced: registering again activates a new
                // daemon if needed and makes it know this process.
                Some(_) = self.owner.next() => return Ok(Event::NewManager),
                else => bail!("the connection to the bus closed"),
            }
        }
    }
}

/// Removes the QEMU object while the VM still runs here (the destination
/// after success, the source after a failure), then unregisters without
/// flushing: after success qemu-server itself flushes the source by mark.
async fn finish(
    m: &Manager1Proxy<'_>,
    vm: &str,
    id: &str,
    qmp: &Path,
    stop: Stop,
) -> anyhow::Result<()> {
    let why = match stop {
        Stop::Quit => "Quit",
        Stop::Signal(s) => s,
        Stop::Unregistered => "unregistered elsewhere",
    };
    let (s, i) = (qmp.to_path_buf(), id.to_string());
    // A QEMU that is gone (the source after success) has nothing to remove.
    let detached = tokio::task::spawn_blocking(move || {
        if !s.exists() {
            return Ok(None);
        }
        match crate::qmp::QmpClient::connect(&s) {
            Ok(mut c) => c.detach_vmstate(&i).map(Some),
            Err(crate::qmp::QmpError::Connect { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    })
    .await?;
    match detached {
        Ok(Some(outcome)) => eprintln!("{why}: QEMU's dbus-vmstate: {outcome:?}"),
        Ok(None) => eprintln!("{why}: QEMU is not running here, no object to remove"),
        Err(e) => eprintln!("{why}: removing QEMU's dbus-vmstate failed: {e}"),
    }
    if !matches!(stop, Stop::Unregistered) {
        match m.unregister(vm, HashMap::new()).await {
            Ok(()) => {}
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.conntrack_vmstate.Error.NotRegistered" => {}
            Err(e) => return Err(call_error(e)).context(format!("unregistering VM {vm}")),
        }
    }
    eprintln!("{why}: VM {vm} no longer served");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_are_proxmox_ids() {
        assert_eq!(parse_vmid("100").expect("valid"), 100);
        assert_eq!(pve_id(100), "pve-vmstate-100");
        for bad in ["99", "abc", "-1", "1e3", ""] {
            let e = parse_vmid(bad).expect_err(bad).to_string();
            assert_eq!(
                e,
                format!("'{bad}' is not a Proxmox VE VM id (an integer from 100 up)")
            );
        }
    }

    #[test]
    fn dropin_is_recognised_and_names_the_format() {
        let t = dropin_text(FormatArg::ConntrackSave);
        assert!(t.starts_with(DROPIN_MARKER));
        assert!(
            t.contains("\nExecStart=\nExecStart=/usr/bin/conntrack-vmstate proxmox-helper %i\n")
        );
        assert!(t.contains("\nEnvironment=CONNTRACK_VMSTATE_PVE_FORMAT=conntrack-save\n"));
    }

    #[test]
    fn enable_disable_round_trip_and_foreign_files_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let unit = ProxmoxUnitArgs {
            systemd_dir: dir.path().to_path_buf(),
            no_reload: true,
        };
        let e = enable(ProxmoxEnableArgs {
            format: FormatArg::Binary,
            force: false,
            unit: ProxmoxUnitArgs { ..unit.clone() },
        });
        if pve_unit_installed().is_none() {
            assert!(e
                .expect_err("no qemu-server")
                .to_string()
                .contains("not found"));
        }
        enable(ProxmoxEnableArgs {
            format: FormatArg::Binary,
            force: true,
            unit: unit.clone(),
        })
        .expect("enable");
        let p = dropin_path(dir.path());
        assert_eq!(
            std::fs::read_to_string(&p).expect("written"),
            dropin_text(FormatArg::Binary)
        );
        disable(unit.clone()).expect("disable");
        assert!(!p.exists() && !p.parent().expect("dir").exists());
        disable(unit.clone()).expect("disable twice is fine");
        std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        std::fs::write(&p, "[Service]\n").expect("foreign");
        let e = disable(unit.clone()).expect_err("foreign file").to_string();
        assert!(e.contains("was not written by conntrack-vmstate"), "{e}");
        let e = enable(ProxmoxEnableArgs {
            format: FormatArg::Binary,
            force: true,
            unit,
        })
        .expect_err("foreign file")
        .to_string();
        assert!(e.contains("not touching it"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).expect("kept"), "[Service]\n");
    }
}

//! `register`, `unregister`, `status`: talk to conntrack-vmstated's Manager1,
//! and with `--qmp` wire the VM's QEMU (`crate::qmp`) on the same command.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use zbus::{Connection, OwnedVariant, Variant};

use super::{ManagerArgs, RegisterArgs, StatusArgs, UnregisterArgs};
use crate::bus::proxy::{Manager1Proxy, Vm1Proxy};
use crate::bus::{MANAGER_NAME, OBJECT_ROOT, VM_INTERFACE};

/// Bound on each call; the first one may wait for D-Bus activation.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

pub(super) async fn connect(m: &ManagerArgs) -> anyhow::Result<Connection> {
    let builder = match &m.manager_address {
        Some(a) => zbus::connection::Builder::address(a.as_str()),
        None => zbus::connection::Builder::system(),
    };
    let what = m.manager_address.as_deref().unwrap_or("the system bus");
    tokio::time::timeout(CALL_TIMEOUT, builder.method_timeout(CALL_TIMEOUT).build())
        .await
        .map_err(|_| anyhow!("connecting to {what} timed out"))?
        .with_context(|| format!("connecting to {what}"))
}

/// Turns a D-Bus error into its text, keeping the error name for context.
pub(super) fn call_error(e: zbus::Error) -> anyhow::Error {
    match e {
        zbus::Error::MethodError(name, text, _) => {
            anyhow!("{} ({name})", text.unwrap_or_default())
        }
        other => anyhow!(other),
    }
}

/// An idle daemon that decided to exit answers ShuttingDown; the next call
/// activates a fresh instance, so such calls are retried a few times.
fn is_shutting_down(e: &zbus::Error) -> bool {
    matches!(e, zbus::Error::MethodError(name, _, _)
        if name.as_str() == "org.conntrack_vmstate.Error.ShuttingDown")
}

const RETRIES: usize = 5;
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Runs `call`, again after a pause while the daemon answers ShuttingDown
/// (at most [`RETRIES`] more times).
pub(super) async fn with_retries<T>(
    mut call: impl AsyncFnMut() -> zbus::Result<T>,
) -> anyhow::Result<T> {
    let mut attempt = 0;
    loop {
        match call().await {
            Err(e) if is_shutting_down(&e) && attempt < RETRIES => {
                attempt += 1;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            r => return r.map_err(call_error),
        }
    }
}

/// A copy of call options (a `Variant` holding a descriptor cannot be
/// cloned infallibly).
pub(super) fn clone_opts<'a>(
    opts: &HashMap<&'a str, Variant<'a>>,
) -> zbus::Result<HashMap<&'a str, Variant<'a>>> {
    opts.iter().map(|(k, v)| Ok((*k, v.try_clone()?))).collect()
}

pub(super) async fn vm_proxy<'a>(conn: &'a Connection, vm: &str) -> anyhow::Result<Vm1Proxy<'a>> {
    let path = crate::bus::vm_object_path(vm);
    Ok(Vm1Proxy::builder(conn)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?)
}

/// Register's options from the command line (without `qemu_pid`).
pub(super) fn registration_options(a: &RegisterArgs) -> HashMap<&'_ str, Variant<'_>> {
    let mut opts: HashMap<&str, Variant> = HashMap::new();
    if let Some(id) = &a.id {
        opts.insert("id", Variant::from(id.as_str()));
    }
    if let Some(v) = a.mark {
        opts.insert("mark", Variant::from(v));
    }
    if let Some(v) = a.mark_mask {
        opts.insert("mark_mask", Variant::from(v));
    }
    if let Some(v) = a.zone {
        opts.insert("zone", Variant::from(v));
    }
    if let Some(b) = &a.bus_address {
        opts.insert("bus_address", Variant::from(b.as_str()));
    }
    if let Some(f) = a.format {
        opts.insert("format", Variant::from(f.name()));
    }
    if let Some(l) = a.lifecycle {
        opts.insert("lifecycle", Variant::from(l.name()));
    }
    opts
}

pub fn register(a: RegisterArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        if a.qmp.is_some() && a.lifecycle == Some(super::LifecycleArg::Migration) {
            bail!(
                "--qmp does not go with --lifecycle migration: such a VM's QEMU gets its \
                 dbus-vmstate object from `prepare --qmp` only, for the migration"
            );
        }
        let conn = connect(&a.manager).await?;
        let mut opts = registration_options(&a);
        if let Some(sock) = &a.qmp {
            // Save and Load then answer only this QEMU (docs/trust-model.md).
            // Reached first: nothing is registered for an unreachable QEMU.
            if let Some(pid) = qemu_pid(sock, &format!("VM {}'s QEMU", a.vmid)).await? {
                opts.insert("qemu_pid", Variant::from(pid));
            }
        }
        let m = Manager1Proxy::new(&conn).await?;
        let path = with_retries(async || m.register(&a.vmid, clone_opts(&opts)?).await).await?;
        let vm = vm_proxy(&conn, &a.vmid).await?;
        let (id, bus) = (vm.id().await?, vm.bus_address().await?);
        println!(
            "registered VM {}: Id {id}, mark {:#x}/{:#x}, bus {bus} ({})",
            a.vmid,
            vm.mark().await?,
            vm.mark_mask().await?,
            path.as_str()
        );
        if let Some(sock) = a.qmp {
            // Register returned after the VM's connection queued on
            // org.qemu.VMState1, so QEMU finds it from now on.
            let s = sock.clone();
            let (id2, bus2) = (id.clone(), bus.clone());
            tokio::task::spawn_blocking(move || crate::qmp::attach_vmstate(&s, &id2, &bus2))
                .await?
                .with_context(|| {
                    format!(
                        "VM {} is registered, but adding Id {id} to QEMU's dbus-vmstate over {} failed",
                        a.vmid,
                        sock.display()
                    )
                })?;
            println!("QEMU at {}: dbus-vmstate lists {id} on {bus}", sock.display());
        }
        Ok(())
    })
}

/// The pid of `what` (a VM's QEMU) behind `sock`, from the socket's peer
/// credentials (None where the kernel reports none).
pub(super) async fn qemu_pid(sock: &std::path::Path, what: &str) -> anyhow::Result<Option<u32>> {
    let s = sock.to_path_buf();
    tokio::task::spawn_blocking(move || crate::qmp::QmpClient::connect(&s).map(|c| c.peer_pid()))
        .await?
        .with_context(|| format!("reaching {what} over {}", sock.display()))
}

pub fn unregister(a: UnregisterArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let conn = connect(&a.manager).await?;
        if let Some(sock) = &a.qmp {
            // QEMU first: the object must never list an Id nobody serves.
            let vm = vm_proxy(&conn, &a.vmid).await?;
            let id = vm
                .id()
                .await
                .map_err(|e| anyhow!("VM '{}' is not registered ({e})", a.vmid))?;
            let s = sock.clone();
            let id2 = id.clone();
            tokio::task::spawn_blocking(move || crate::qmp::detach_vmstate(&s, &id2))
                .await?
                .with_context(|| {
                    format!(
                        "removing Id {id} from QEMU's dbus-vmstate over {}",
                        sock.display()
                    )
                })?;
        }
        let m = Manager1Proxy::new(&conn).await?;
        let mut opts: HashMap<&str, Variant> = HashMap::new();
        if a.flush {
            opts.insert("flush", Variant::from(true));
        }
        with_retries(async || m.unregister(&a.vmid, clone_opts(&opts)?).await).await?;
        println!(
            "unregistered VM {}{}",
            a.vmid,
            if a.flush {
                " (saved entries flushed)"
            } else {
                ""
            }
        );
        Ok(())
    })
}

fn to_json(v: &OwnedVariant) -> serde_json::Value {
    match &**v {
        Variant::Str(s) => serde_json::Value::from(s.as_str()),
        Variant::U64(n) => serde_json::Value::from(*n),
        Variant::U32(n) => serde_json::Value::from(*n),
        Variant::U16(n) => serde_json::Value::from(*n),
        Variant::Bool(b) => serde_json::Value::from(*b),
        other => match Vec::<u16>::try_from(other.try_clone().unwrap_or(Variant::U8(0))) {
            Ok(v) => serde_json::Value::from(v),
            Err(_) => match HashMap::<String, OwnedVariant>::try_from(
                other.try_clone().unwrap_or(Variant::U8(0)),
            ) {
                Ok(m) => serde_json::Value::Object(
                    m.iter().map(|(k, v)| (k.clone(), to_json(v))).collect(),
                ),
                Err(_) => serde_json::Value::from(other.to_string()),
            },
        },
    }
}

fn report_line(r: &serde_json::Value) -> String {
    let Some(o) = r.as_object().filter(|o| !o.is_empty()) else {
        return "never".into();
    };
    let n = |k: &str| o.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let mut s = format!(
        "{} entries, {} dropped, {} created, {} existed, {} refused, {} bytes, {} µs",
        n("entries"),
        n("dropped"),
        n("created"),
        n("existed"),
        n("refused"),
        n("bytes"),
        n("duration_us")
    );
    if n("expired") > 0 || n("age_secs") > 0 {
        s.push_str(&format!(
            ", {} expired (timeouts aged by {} s)",
            n("expired"),
            n("age_secs")
        ));
    }
    if let Some(e) = o
        .get("error")
        .and_then(|v| v.as_str())
        .filter(|e| !e.is_empty())
    {
        s.push_str(&format!("; error: {e}"));
    }
    s
}

pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let conn = connect(&a.manager).await?;
        let om = zbus::fdo::ObjectManagerProxy::builder(&conn)
            .destination(MANAGER_NAME)
            .path(OBJECT_ROOT)
            .build()
            .await?;
        let objs = om
            .get_managed_objects()
            .await
            .context("listing VMs (is conntrack-vmstated reachable?)")?;
        // VM name → its properties as JSON, sorted by VM name.
        let mut vms: BTreeMap<String, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
        for ifaces in objs.values() {
            let Some(props) = ifaces.get(VM_INTERFACE) else {
                continue;
            };
            let m: serde_json::Map<String, serde_json::Value> = props
                .iter()
                .map(|(k, v)| (k.to_string(), to_json(v)))
                .collect();
            let name = m
                .get("VmId")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string();
            vms.insert(name, m);
        }
        if let Some(vm) = &a.vmid {
            vms.retain(|k, _| k == vm);
            if vms.is_empty() {
                bail!("VM '{vm}' is not registered");
            }
        }
        if a.json {
            // One VM asked for: its object; otherwise the list of all.
            let mut list: Vec<serde_json::Value> =
                vms.into_values().map(serde_json::Value::Object).collect();
            let out = match (&a.vmid, list.len()) {
                (Some(_), 1) => list.remove(0),
                _ => serde_json::Value::Array(list),
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
            return Ok(());
        }
        if vms.is_empty() {
            println!("no VM registered");
        }
        for (name, p) in &vms {
            let s = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
            let u = |k: &str| p.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            let zone = p
                .get("Zone")
                .and_then(|v| v.as_array())
                .and_then(|a| a.first())
                .map_or_else(|| "any".to_string(), |z| z.to_string());
            println!("VM {name}");
            println!("  Id:        {}", s("Id"));
            println!(
                "  mark:      {:#x}/{:#x}, zone {zone}, format {}",
                u("Mark"),
                u("MarkMask"),
                s("Format")
            );
            println!("  bus:       {} as {}", s("BusAddress"), s("UniqueName"));
            println!(
                "  last save: {}",
                report_line(p.get("LastSave").unwrap_or(&serde_json::Value::Null))
            );
            println!(
                "  last load: {}",
                report_line(p.get("LastLoad").unwrap_or(&serde_json::Value::Null))
            );
        }
        Ok(())
    })
}

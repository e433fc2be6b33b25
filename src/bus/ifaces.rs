//! The three interfaces the daemon serves: they turn D-Bus values into
//! plain ones, call the [`Manager`] or the [`Engine`], and translate errors
//! into [`Error`]. Every method takes `&self` and reads state that is never
//! held across an await, so property reads are answered while a Save or
//! Load is in flight (a `&mut self` method would hold zbus' interface lock
//! across its awaits).

use std::collections::HashMap;
use std::sync::Arc;

use serde_bytes::ByteBuf;
use zbus::interface;
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

use super::error::Error;
use super::vm_path;
use crate::service::{Endpoint, Engine, Manager, OpReport, OptValue, VmRuntime};

/// `org.conntrack_vmstate.Manager1` at `/org/conntrack_vmstate/Manager1`.
pub struct Manager1<E: Endpoint> {
    pub(crate) manager: Arc<Manager<E>>,
}

/// Strips the D-Bus wrapping so the core validates plain values.
fn plain_options(options: HashMap<String, OwnedVariant>) -> Vec<(String, OptValue)> {
    let mut v: Vec<(String, OptValue)> = options
        .into_iter()
        .map(|(k, v)| {
            let val = match &*v {
                Variant::Str(s) => OptValue::Str(s.to_string()),
                Variant::U32(n) => OptValue::U32(*n),
                Variant::U16(n) => OptValue::U16(*n),
                Variant::Bool(b) => OptValue::Bool(*b),
                other => OptValue::Other(other.value_signature().to_string()),
            };
            (k, val)
        })
        .collect();
    // A dict has no order; sort so the first reported problem is stable.
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[interface(name = "org.conntrack_vmstate.Manager1")]
impl<E> Manager1<E>
where
    E: Endpoint<Error = Error>,
{
    /// Registers a VM (idempotent for identical options) and starts serving
    /// `org.qemu.VMState1` for it on its bus.
    #[zbus(out_args("vm_object"))]
    async fn register(
        &self,
        vm: String,
        mut options: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<OwnedObjectPath, Error> {
        // `controller` binds the VM to the calling connection; it is not a
        // property of the registration (not persisted, not compared).
        let controller = match options.remove("controller").as_deref() {
            None | Some(Variant::Bool(false)) => None,
            Some(Variant::Bool(true)) => hdr.sender().map(|s| s.to_string()),
            Some(other) => {
                return Err(Error::InvalidOption(format!(
                    "option 'controller' must be a boolean (b), got {}",
                    other.value_signature()
                )))
            }
        };
        self.manager.register(&vm, &plain_options(options)).await?;
        if let (Some(c), Some(rt)) = (controller, self.manager.get(&vm)) {
            super::proxmox::bind_controller(&self.manager, conn, &rt, c).await;
        }
        Ok(vm_path(&vm))
    }

    /// Stops serving a VM; with `flush`, first deletes exactly the entries
    /// its last Save took.
    async fn unregister(
        &self,
        vm: String,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<(), Error> {
        Ok(self
            .manager
            .unregister(&vm, &plain_options(options))
            .await?)
    }

    /// Serves a registered VM for one migration (options: `role`
    /// "source"|"destination", `qemu_pid`): connected to its bus, bound to
    /// its QEMU, its cache warm; returns when Save would be fast.
    async fn prepare(
        &self,
        vm: String,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<(), Error> {
        Ok(self.manager.prepare(&vm, &plain_options(options)).await?)
    }

    /// Ends a migration that succeeded (`role`): the source deletes exactly
    /// what its Save took, the destination keeps its entries; a VM of the
    /// migration lifecycle then holds no bus connection again.
    async fn finish(
        &self,
        vm: String,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<(), Error> {
        Ok(self.manager.finish(&vm, &plain_options(options)).await?)
    }

    /// Ends a migration that failed (`role`, `vm_running`): the source keeps
    /// everything, the destination deletes what its Load created unless
    /// the VM runs there.
    async fn abort(&self, vm: String, options: HashMap<String, OwnedVariant>) -> Result<(), Error> {
        Ok(self.manager.abort(&vm, &plain_options(options)).await?)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }
}

/// `org.conntrack_vmstate.VM1` at `/org/conntrack_vmstate/VM/<vm>`.
pub struct Vm1 {
    pub(crate) rt: Arc<VmRuntime>,
    /// The effective address of the VM's bus (also for the system bus), so
    /// management can hand it to QEMU's `dbus-vmstate` object as it is.
    pub(crate) bus_address: String,
    pub(crate) unique_name: String,
}

fn report_dict(r: Option<OpReport>) -> HashMap<String, OwnedVariant> {
    let mut m = HashMap::new();
    let Some(r) = r else { return m };
    for (k, v) in [
        ("entries", r.entries),
        ("dropped", r.dropped),
        ("created", r.created),
        ("existed", r.existed),
        ("refused", r.refused),
        ("bytes", r.bytes),
        ("duration_us", r.duration_us),
        ("timestamp", r.timestamp_us),
    ] {
        m.insert(k.to_string(), OwnedVariant::from(v));
    }
    m.insert("error".into(), OwnedVariant::from(zbus::Str::from(r.error)));
    m
}

fn save_dict(r: Option<OpReport>) -> HashMap<String, OwnedVariant> {
    let source = r.as_ref().map(|r| r.source.clone());
    let mut m = report_dict(r);
    if let Some(s) = source {
        m.insert("source".into(), OwnedVariant::from(zbus::Str::from(s)));
    }
    m
}

fn load_dict(r: Option<OpReport>) -> HashMap<String, OwnedVariant> {
    let extra = r.as_ref().map(|r| {
        (
            r.created_sync,
            r.complete_us,
            r.pending,
            [
                ("foreign", r.foreign),
                ("rejected", r.rejected),
                ("over_cap", r.over_cap),
                ("resumed", r.resumed),
                ("expired", r.expired),
                ("age_secs", r.age_secs),
            ],
        )
    });
    let mut m = report_dict(r);
    if let Some((created_sync, complete_us, pending, confined)) = extra {
        for (k, v) in confined {
            m.insert(k.into(), OwnedVariant::from(v));
        }
        m.insert("created_sync".into(), OwnedVariant::from(created_sync));
        m.insert("pending".into(), OwnedVariant::from(pending));
        // Absent while pending: a reader that waits for the key never takes
        // an interim report for the final one.
        if !pending {
            m.insert("complete_us".into(), OwnedVariant::from(complete_us));
        }
    }
    m
}

#[interface(name = "org.conntrack_vmstate.VM1")]
impl Vm1 {
    /// Sent only to the VM's `controller` (unicast), when Proxmox VE's
    /// qemu-server calls `com.proxmox.VMStateHelper.Quit`: detach QEMU's
    /// object and unregister (docs/proxmox.md). Declared here so that the
    /// contract lists it; `bus::proxmox` sends it to one destination.
    #[zbus(signal)]
    async fn quit_requested(emitter: &zbus::object_server::SignalEmitter<'_>) -> zbus::Result<()>;

    #[zbus(property(emits_changed_signal = "const"))]
    fn vm_id(&self) -> String {
        self.rt.config.vm.clone()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> String {
        self.rt.config.id.clone()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn mark(&self) -> u32 {
        self.rt.config.mark
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn mark_mask(&self) -> u32 {
        self.rt.config.mark_mask
    }

    /// Empty, or the one conntrack zone the VM's entries are taken from.
    #[zbus(property(emits_changed_signal = "const"))]
    fn zone(&self) -> Vec<u16> {
        self.rt.config.zone.into_iter().collect()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn format(&self) -> String {
        self.rt.config.format.as_str().to_string()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn bus_address(&self) -> String {
        self.bus_address.clone()
    }

    /// `always` (served from Register to Unregister) or `migration`
    /// (served only from Prepare to Finish or Abort).
    #[zbus(property(emits_changed_signal = "const"))]
    fn lifecycle(&self) -> String {
        self.rt.config.lifecycle.as_str().to_string()
    }

    /// `source` or `destination` from Prepare to Finish or Abort, else empty.
    #[zbus(property(emits_changed_signal = "false"))]
    fn prepared(&self) -> String {
        self.rt
            .prepared()
            .map_or_else(String::new, |r| r.as_str().to_string())
    }

    /// Unique name of the VM's own connection that queues on
    /// `org.qemu.VMState1`; empty while its bus is unreachable or
    /// the VM is not prepared (migration lifecycle).
    #[zbus(property(emits_changed_signal = "const"))]
    fn unique_name(&self) -> String {
        self.unique_name.clone()
    }

    /// entries, dropped, bytes, duration_us, error, timestamp (µs since the
    /// epoch), source (`base`, `cache` or `dump`) of the last Save; empty before the
    /// first.
    #[zbus(property)]
    fn last_save(&self) -> HashMap<String, OwnedVariant> {
        save_dict(self.rt.last_save())
    }

    /// entries, dropped, created, created_sync, existed, refused, foreign,
    /// rejected, over_cap, resumed (entries a previous instance had handled
    /// when it handed this restore over), expired (timeouts that ran out
    /// since Save), age_secs (seconds every timeout was aged by), bytes,
    /// duration_us (to the answer), complete_us (to the full restore; absent
    /// while pending), pending, error, timestamp of the last Load; empty
    /// before the first.
    #[zbus(property)]
    fn last_load(&self) -> HashMap<String, OwnedVariant> {
        load_dict(self.rt.last_load())
    }
}

/// `org.qemu.VMState1` at `/org/qemu/VMState1` on the VM's own connection.
pub struct VmState1 {
    pub(crate) rt: Arc<VmRuntime>,
    pub(crate) engine: Arc<Engine>,
}

#[interface(name = "org.qemu.VMState1")]
impl VmState1 {
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> String {
        self.rt.config.id.clone()
    }

    /// Never an error for the VM's QEMU, never empty, never more than 1 MiB
    /// (QEMU would leave the VM running nowhere). A VM registered with
    /// `qemu_pid` answers only that process; anyone else gets AccessDenied.
    #[zbus(out_args("data"))]
    async fn save(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> zbus::fdo::Result<ByteBuf> {
        self.caller_is_qemu(&hdr, conn, "Save").await?;
        Ok(ByteBuf::from(self.engine.save(&self.rt).await))
    }

    /// Never an error for the VM's QEMU (it would exit); problems land in
    /// LastLoad. Bound like Save: another caller could otherwise cancel a
    /// running restore with an empty Load.
    async fn load(
        &self,
        data: ByteBuf,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> zbus::fdo::Result<()> {
        self.caller_is_qemu(&hdr, conn, "Load").await?;
        self.engine.load(&self.rt, data.into_vec()).await;
        Ok(())
    }
}

impl VmState1 {
    /// With `qemu_pid`, the caller's pid as the bus daemon reports it
    /// (GetConnectionUnixProcessID, from the kernel's SO_PEERCRED of its
    /// connection) must be the VM's QEMU.
    async fn caller_is_qemu(
        &self,
        hdr: &zbus::message::Header<'_>,
        conn: &zbus::Connection,
        op: &str,
    ) -> zbus::fdo::Result<()> {
        let allowed = self.rt.allowed_pids();
        if allowed.is_empty() {
            return Ok(());
        }
        let want = allowed
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" or ");
        let vm = &self.rt.config.vm;
        let denied = |why: String| {
            tracing::warn!(VMID = %vm, "{op} of VM {vm} refused: {why}");
            zbus::fdo::Error::AccessDenied(format!(
                "{op} of VM '{vm}' is only for its QEMU (pid {want}): {why}"
            ))
        };
        let Some(sender) = hdr.sender() else {
            return Err(denied("the call names no sender".into()));
        };
        let dbus = zbus::fdo::DBusProxy::new(conn)
            .await
            .map_err(|e| denied(format!("cannot ask the bus who called: {e}")))?;
        let pid = dbus
            .get_connection_unix_process_id(sender.clone().into())
            .await
            .map_err(|e| denied(format!("the bus does not say who {sender} is: {e}")))?;
        if allowed.contains(&pid) {
            Ok(())
        } else {
            Err(denied(format!("called by pid {pid}")))
        }
    }
}

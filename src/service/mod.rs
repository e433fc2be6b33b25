//! The VM registry behind the daemon: registrations, persistence, the
//! order of Register/Unregister/restore ([`manager`]), and the Save/Load
//! policy that never fails a migration ([`engine`]). No zbus in here: the
//! bus layer ([`crate::bus`]) hands plain values in, implements
//! [`Endpoint`], and translates [`ServiceError`] at its edge.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::access::AccessError;

pub mod confine;
pub mod engine;
#[cfg(test)]
mod fakes;
pub mod manager;
pub mod options;
pub mod persist;
pub mod runtime;

pub use engine::{Engine, DEFAULT_LOAD_BUDGET_MS, DEFAULT_SAVE_DEADLINE_MS};
pub use manager::{Endpoint, Manager, ManagerError, Restored};
pub use options::{
    escape_path_element, parse_migration_step, parse_unregister, Lifecycle, MigrationStep,
    OptValue, Role, SaveFormat, VmConfig,
};
pub use persist::Store;
pub use runtime::{OpReport, RestoreCtl, VmRuntime};

/// Why a management request was refused. Every message names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("unknown option '{option}' (known: {known})")]
    UnknownOption { option: String, known: String },
    #[error("invalid option '{option}': {reason}")]
    InvalidOption { option: String, reason: String },
    #[error("invalid VM name '{vm}': {reason}")]
    InvalidVm { vm: String, reason: String },
    #[error(
        "VM '{vm}' is already registered with {option} {current}, not {requested}; \
         unregister it first to change {option}"
    )]
    Conflict {
        vm: String,
        option: &'static str,
        current: String,
        requested: String,
    },
    #[error("VMState Id '{id}' is already used by VM '{other_vm}' on bus {bus}")]
    IdInUse {
        id: String,
        bus: String,
        other_vm: String,
    },
    #[error(
        "mark {mark:#x}/{mask:#x}{zone} of VM '{vm}' overlaps VM '{other_vm}' \
         ({other_mark:#x}/{other_mask:#x}{other_zone}): an entry could belong to both, so \
         a Load for one could create the other's; choose marks that differ under both masks"
    )]
    MarkOverlap {
        vm: String,
        mark: u32,
        mask: u32,
        zone: String,
        other_vm: String,
        other_mark: u32,
        other_mask: u32,
        other_zone: String,
    },
    #[error("VM '{vm}' is not registered")]
    NotRegistered { vm: String },
    #[error("cannot write registrations to {}: {source}", path.display())]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{what} in {} could not be read (moved to {}): {reason}",
        path.display(),
        moved_to.display()
    )]
    CorruptState {
        what: &'static str,
        path: PathBuf,
        moved_to: PathBuf,
        reason: String,
    },
    #[error("flushing the saved entries of VM '{vm}' failed: {source}")]
    Flush {
        vm: String,
        #[source]
        source: AccessError,
    },
    #[error("listing the entries of VM '{vm}' failed: {source}")]
    Dump {
        vm: String,
        #[source]
        source: AccessError,
    },
    /// The daemon decided to exit (idle or signal) and gave up its name.
    #[error("conntrack-vmstated is exiting; call again to reach a new instance")]
    ShuttingDown,
}

/// What [`Registry::admit`] decided about a Register request.
#[derive(Debug)]
pub enum Admission {
    /// Registered before with identical options: nothing to do.
    Existing(Arc<VmRuntime>),
    /// New and free of conflicts: set it up, then [`Registry::insert_runtime`] it.
    New(VmConfig),
}

/// The registered VMs and their persisted list. Callers serialize
/// admit → set up → insert/remove themselves ([`Manager`] holds one lock
/// across them), so this type needs no locking of its own.
pub struct Registry {
    vms: BTreeMap<String, Arc<VmRuntime>>,
    store: Store,
}

impl Registry {
    /// An empty registry that persists into `store`.
    pub fn new(store: Store) -> Registry {
        Registry {
            vms: BTreeMap::new(),
            store,
        }
    }

    /// The registrations saved by a previous run, to be served again.
    pub fn persisted(&self) -> Result<Vec<VmConfig>, ServiceError> {
        self.store.load()
    }

    pub fn len(&self) -> usize {
        self.vms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }

    pub fn get(&self, vm: &str) -> Option<Arc<VmRuntime>> {
        self.vms.get(vm).cloned()
    }

    pub fn all(&self) -> Vec<Arc<VmRuntime>> {
        self.vms.values().cloned().collect()
    }

    /// Decides whether `cfg` may be registered: identical re-registers are
    /// accepted as they are, a different one for the same VM is a conflict
    /// naming the first differing option, and an Id must be unique per bus
    /// (QEMU aborts or picks an arbitrary owner on duplicates).
    pub fn admit(&self, cfg: VmConfig) -> Result<Admission, ServiceError> {
        if let Some(rt) = self.vms.get(&cfg.vm) {
            return match rt.config.first_difference(&cfg) {
                None => Ok(Admission::Existing(rt.clone())),
                Some((option, current, requested)) => Err(ServiceError::Conflict {
                    vm: cfg.vm,
                    option,
                    current,
                    requested,
                }),
            };
        }
        if let Some(other) = self.vms.values().find(|o| overlaps(&o.config, &cfg)) {
            let z = |c: &VmConfig| c.zone.map(|z| format!(" zone {z}")).unwrap_or_default();
            return Err(ServiceError::MarkOverlap {
                vm: cfg.vm.clone(),
                mark: cfg.mark,
                mask: cfg.mark_mask,
                zone: z(&cfg),
                other_vm: other.config.vm.clone(),
                other_mark: other.config.mark,
                other_mask: other.config.mark_mask,
                other_zone: z(&other.config),
            });
        }
        if let Some(other) = self
            .vms
            .values()
            .find(|o| o.config.id == cfg.id && o.config.bus_key() == cfg.bus_key())
        {
            return Err(ServiceError::IdInUse {
                id: cfg.id.clone(),
                bus: cfg.bus_key().to_string(),
                other_vm: other.config.vm.clone(),
            });
        }
        Ok(Admission::New(cfg))
    }

    /// Adds an admitted VM and persists the new list; on a write error the
    /// registry is left as it was.
    pub fn insert_runtime(&mut self, rt: Arc<VmRuntime>) -> Result<Arc<VmRuntime>, ServiceError> {
        let vm = rt.config.vm.clone();
        self.vms.insert(vm.clone(), rt.clone());
        if let Err(e) = self.persist() {
            self.vms.remove(&vm);
            return Err(e);
        }
        Ok(rt)
    }

    /// Adds a VM read back from the state directory, without rewriting it.
    pub fn insert_restored(&mut self, cfg: VmConfig) -> Arc<VmRuntime> {
        let rt = Arc::new(VmRuntime::new(cfg));
        self.vms.insert(rt.config.vm.clone(), rt.clone());
        rt
    }

    /// Removes a VM and persists the new list; on a write error the VM stays.
    pub fn remove(&mut self, vm: &str) -> Result<Arc<VmRuntime>, ServiceError> {
        let rt = self
            .vms
            .remove(vm)
            .ok_or_else(|| ServiceError::NotRegistered { vm: vm.to_string() })?;
        if let Err(e) = self.persist() {
            self.vms.insert(vm.to_string(), rt);
            return Err(e);
        }
        Ok(rt)
    }

    fn persist(&self) -> Result<(), ServiceError> {
        let cfgs: Vec<VmConfig> = self.vms.values().map(|r| r.config.clone()).collect();
        self.store.save(&cfgs)
    }
}

/// Whether some entry could be selected by both registrations: a mark
/// matching both (mark, mask) pairs exists exactly when the marks agree on
/// the bits both masks keep, and two different zones never overlap. Marks
/// are the boundary every Save, Load and flush relies on: whoever may
/// register (root, the admin group) must not be able to register a second
/// VM over another VM's entries.
pub fn overlaps(a: &VmConfig, b: &VmConfig) -> bool {
    let zones_meet = match (a.zone, b.zone) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    };
    zones_meet && (a.mark ^ b.mark) & a.mark_mask & b.mark_mask == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vm: &str, opts: &[(&str, OptValue)]) -> VmConfig {
        let opts: Vec<(String, OptValue)> = opts
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect();
        VmConfig::from_options(vm, &opts).unwrap()
    }

    #[test]
    fn admit_insert_remove_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = Registry::new(Store::new(dir.path()));
        let a = cfg("100", &[]);
        let Admission::New(c) = reg.admit(a.clone()).unwrap() else {
            panic!("expected new")
        };
        reg.insert_runtime(Arc::new(VmRuntime::new(c))).unwrap();
        assert!(matches!(
            reg.admit(a.clone()).unwrap(),
            Admission::Existing(_)
        ));
        let e = reg
            .admit(cfg("100", &[("mark", OptValue::U32(5))]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "VM '100' is already registered with mark 100, not 5; unregister it first to change mark"
        );
        let e = reg
            .admit(cfg(
                "101",
                &[("id", OptValue::Str("conntrack-vmstate-100".into()))],
            ))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "VMState Id 'conntrack-vmstate-100' is already used by VM '100' on bus system"
        );
        // The same Id on another bus is fine: QEMU only sees its own bus.
        assert!(reg
            .admit(cfg(
                "101",
                &[
                    ("id", OptValue::Str("conntrack-vmstate-100".into())),
                    ("bus_address", OptValue::Str("unix:path=/x".into()))
                ]
            ))
            .is_ok());
        assert_eq!(Store::new(dir.path()).load().unwrap(), vec![a]);
        reg.remove("100").unwrap();
        assert!(Store::new(dir.path()).load().unwrap().is_empty());
        assert_eq!(
            reg.remove("100").unwrap_err().to_string(),
            "VM '100' is not registered"
        );
    }

    #[test]
    fn overlapping_marks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = Registry::new(Store::new(dir.path()));
        let a = cfg(
            "a",
            &[
                ("mark", OptValue::U32(0x100)),
                ("mark_mask", OptValue::U32(0xff00)),
            ],
        );
        reg.insert_runtime(Arc::new(VmRuntime::new(a))).unwrap();
        let e = reg
            .admit(cfg("b", &[("mark", OptValue::U32(0x1ab))]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "mark 0x1ab/0xffffffff of VM 'b' overlaps VM 'a' (0x100/0xff00): an entry could \
             belong to both, so a Load for one could create the other's; choose marks that \
             differ under both masks"
        );
        // A mask keeping bits the other's mark lacks, or another zone, is fine.
        assert!(reg
            .admit(cfg("c", &[("mark", OptValue::U32(0x2ab))]))
            .is_ok());
        let z = |vm: &str, m: u32, zone: u16| {
            cfg(
                vm,
                &[("mark", OptValue::U32(m)), ("zone", OptValue::U16(zone))],
            )
        };
        reg.insert_runtime(Arc::new(VmRuntime::new(z("d", 0x500, 1))))
            .unwrap();
        assert!(reg.admit(z("e", 0x500, 2)).is_ok());
        assert!(matches!(
            reg.admit(z("f", 0x500, 1)),
            Err(ServiceError::MarkOverlap { .. })
        ));
        assert!(matches!(
            reg.admit(cfg("g", &[("mark", OptValue::U32(0x500))])),
            Err(ServiceError::MarkOverlap { .. })
        ));
    }

    #[test]
    fn unwritable_state_dir_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let mut reg = Registry::new(Store::new(file.join("state")));
        let e = reg
            .insert_runtime(Arc::new(VmRuntime::new(cfg("100", &[]))))
            .unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "cannot write registrations to {}: ",
                file.join("state/registrations.json").display()
            )),
            "{e}"
        );
        assert!(reg.is_empty());
    }
}

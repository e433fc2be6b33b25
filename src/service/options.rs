//! Registration options: what a caller may ask for, their defaults, and the
//! rules QEMU imposes on a VMState Id.

use serde::{Deserialize, Serialize};

use super::confine::{LoadPolicy, MAX_HELPER_NAME};
use super::ServiceError;
use crate::entry::Selector;
use crate::format::Format;

/// One option value as it arrived, already stripped of its D-Bus wrapping so
/// the core can validate it without knowing about zbus.
#[derive(Debug, Clone, PartialEq)]
pub enum OptValue {
    Str(String),
    U32(u32),
    U16(u16),
    Bool(bool),
    /// Anything else; the string is the D-Bus signature it came with, kept
    /// for the error message.
    Other(String),
}

impl OptValue {
    fn signature(&self) -> &str {
        match self {
            OptValue::Str(_) => "s",
            OptValue::U32(_) => "u",
            OptValue::U16(_) => "q",
            OptValue::Bool(_) => "b",
            OptValue::Other(s) => s,
        }
    }
}

/// Encoding of the Save payload, as persisted and as named on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SaveFormat {
    Binary,
    ConntrackSave,
}

impl SaveFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            SaveFormat::Binary => "binary",
            SaveFormat::ConntrackSave => "conntrack-save",
        }
    }

    pub fn to_format(self) -> Format {
        match self {
            SaveFormat::Binary => Format::Binary,
            SaveFormat::ConntrackSave => Format::ConntrackSave,
        }
    }
}

/// A validated registration: everything needed to serve one VM, with every
/// default filled in, so comparing two of them tells whether a re-register
/// is identical.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub vm: String,
    /// The VMState Id QEMU sees.
    pub id: String,
    pub mark: u32,
    pub mark_mask: u32,
    pub zone: Option<u16>,
    /// Bus of the VM's QEMU; `None` is the system bus.
    pub bus_address: Option<String>,
    pub format: SaveFormat,
    /// Load: entries arriving in zone `.0` are created in `.1` (the
    /// registration's zone). Absent in registrations of older versions.
    #[serde(default)]
    pub zone_map: Option<(u16, u16)>,
    /// Load: conntrack helpers restored entries may name; `None` is
    /// [`super::confine::DEFAULT_HELPERS`].
    #[serde(default)]
    pub helpers: Option<Vec<String>>,
    /// Load: most entries created per Load (the daemon's default when
    /// `None`), always bounded by a fraction of `nf_conntrack_max`.
    #[serde(default)]
    pub max_entries: Option<u32>,
    /// Only the process with this pid (the VM's QEMU, as the bus reports
    /// its connection) may call Save and Load; `register --qmp` sets it
    /// from the QMP socket's peer. `None`: whoever the bus policy lets in.
    /// A binding to one QEMU process, not a property of the registration:
    /// not compared (a Register from the VM's next QEMU moves it, see
    /// `VmRuntime::bind_qemu`) and not persisted (after a restart a stale
    /// pid would refuse the VM's own QEMU; the next Register binds again).
    #[serde(skip)]
    pub qemu_pid: Option<u32>,
    /// When the VM is served on its bus (absent in older registrations:
    /// always).
    #[serde(default)]
    pub lifecycle: Lifecycle,
}

/// When a registered VM holds a connection on its bus and a watch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lifecycle {
    /// From Register to Unregister (`register --qmp` at VM start).
    #[default]
    Always,
    /// Only between Prepare and Finish/Abort of a migration: otherwise the
    /// VM is known (listed, its mark reserved) but costs no bus connection,
    /// no watch and no QEMU object.
    Migration,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Always => "always",
            Lifecycle::Migration => "migration",
        }
    }
}

/// Which end of a migration a Prepare, Finish or Abort is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Destination,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Destination => "destination",
        }
    }
}

/// Options of Prepare, Finish and Abort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStep {
    pub role: Role,
    /// Prepare: bind Save and Load to this QEMU process.
    pub qemu_pid: Option<u32>,
    /// Abort on the destination: the VM runs here after all (the
    /// migration completed before the abort), so nothing is deleted.
    pub vm_running: bool,
}

/// Option names `Prepare`, `Finish` and `Abort` accept.
pub const MIGRATION_OPTIONS: [&str; 3] = ["role", "qemu_pid", "vm_running"];

/// Validates the options of Prepare, Finish or Abort (`op`); `role` is
/// required, `qemu_pid` only for Prepare, `vm_running` only for Abort.
pub fn parse_migration_step(
    op: &str,
    options: &[(String, OptValue)],
) -> Result<MigrationStep, ServiceError> {
    let mut role = None;
    let mut qemu_pid = None;
    let mut vm_running = false;
    let invalid = |option: &str, reason: String| ServiceError::InvalidOption {
        option: option.into(),
        reason,
    };
    for (name, value) in options {
        match (name.as_str(), value) {
            ("role", OptValue::Str(s)) => {
                role = Some(match s.as_str() {
                    "source" => Role::Source,
                    "destination" => Role::Destination,
                    other => {
                        return Err(invalid(
                            "role",
                            format!("'{other}' is not a role; use 'source' or 'destination'"),
                        ))
                    }
                })
            }
            ("qemu_pid", OptValue::U32(0)) if op == "Prepare" => {
                return Err(invalid("qemu_pid", "is 0, not a process".into()))
            }
            ("qemu_pid", OptValue::U32(v)) if op == "Prepare" => qemu_pid = Some(*v),
            ("vm_running", OptValue::Bool(b)) if op == "Abort" => vm_running = *b,
            ("role" | "qemu_pid" | "vm_running", v)
                if matches!(
                    (name.as_str(), op),
                    ("role", _) | ("qemu_pid", "Prepare") | ("vm_running", "Abort")
                ) =>
            {
                let want = match name.as_str() {
                    "role" => "s",
                    "qemu_pid" => "u",
                    _ => "b",
                };
                return Err(invalid(
                    name,
                    format!("must be of type '{want}', got '{}'", v.signature()),
                ));
            }
            (unknown, _) => {
                let known: Vec<&str> = MIGRATION_OPTIONS
                    .iter()
                    .copied()
                    .filter(|o| match *o {
                        "qemu_pid" => op == "Prepare",
                        "vm_running" => op == "Abort",
                        _ => true,
                    })
                    .collect();
                return Err(ServiceError::UnknownOption {
                    option: unknown.into(),
                    known: known.join(", "),
                });
            }
        }
    }
    let role = role.ok_or_else(|| {
        invalid(
            "role",
            format!("is required: {op} of the 'source' or the 'destination'?"),
        )
    })?;
    Ok(MigrationStep {
        role,
        qemu_pid,
        vm_running,
    })
}

/// Option names `Register` accepts, in the order conflicts are reported.
pub const REGISTER_OPTIONS: [&str; 11] = [
    "id",
    "mark",
    "mark_mask",
    "zone",
    "bus_address",
    "format",
    "zone_map",
    "helpers",
    "max_entries",
    "qemu_pid",
    "lifecycle",
];
/// Option names `Unregister` accepts.
pub const UNREGISTER_OPTIONS: [&str; 1] = ["flush"];

/// QEMU rejects Ids outside 1..=255 bytes (dbus-vmstate.c 138-142).
pub const ID_MAX_BYTES: usize = 255;
/// VM names end up in object paths, journal fields and file names.
pub const VM_MAX_BYTES: usize = 255;

impl VmConfig {
    /// The kernel-side filter of this VM's entries.
    pub fn selector(&self) -> Selector {
        Selector {
            mark: self.mark,
            mark_mask: self.mark_mask,
            zone: self.zone,
        }
    }

    /// What a Load for this VM accepts from its source.
    pub fn load_policy(&self) -> LoadPolicy {
        let mut p = LoadPolicy::new(self.selector());
        p.zone_map = self.zone_map;
        if let Some(h) = &self.helpers {
            p.helpers = h.clone();
        }
        p
    }

    /// Key under which Ids must be unique: the bus the Id is visible on.
    pub fn bus_key(&self) -> &str {
        self.bus_address.as_deref().unwrap_or("system")
    }

    /// Validates `Register(vm, options)` and fills in the defaults.
    pub fn from_options(
        vm: &str,
        options: &[(String, OptValue)],
    ) -> Result<VmConfig, ServiceError> {
        validate_vm(vm)?;
        let mut id = None;
        let mut mark = None;
        let mut mark_mask = None;
        let mut zone = None;
        let mut bus_address = None;
        let mut format = None;
        let mut zone_map = None;
        let mut helpers = None;
        let mut max_entries = None;
        let mut qemu_pid = None;
        let mut lifecycle = Lifecycle::Always;
        for (name, value) in options {
            match (name.as_str(), value) {
                ("id", OptValue::Str(s)) => id = Some(s.clone()),
                ("mark", OptValue::U32(v)) => mark = Some(*v),
                ("mark_mask", OptValue::U32(v)) => mark_mask = Some(*v),
                ("zone", OptValue::U16(v)) => zone = Some(*v),
                ("bus_address", OptValue::Str(s)) => bus_address = Some(s.clone()),
                ("format", OptValue::Str(s)) => {
                    format = Some(match s.as_str() {
                        "binary" => SaveFormat::Binary,
                        "conntrack-save" => SaveFormat::ConntrackSave,
                        other => {
                            return Err(ServiceError::InvalidOption {
                                option: "format".into(),
                                reason: format!(
                                    "'{other}' is not a format; use 'binary' or 'conntrack-save'"
                                ),
                            })
                        }
                    })
                }
                ("zone_map", OptValue::Str(s)) => zone_map = Some(parse_zone_map(s)?),
                ("helpers", OptValue::Str(s)) => helpers = Some(parse_helpers(s)?),
                ("max_entries", OptValue::U32(0)) => {
                    return Err(ServiceError::InvalidOption {
                        option: "max_entries".into(),
                        reason: "is 0; a Load would create nothing".into(),
                    })
                }
                ("max_entries", OptValue::U32(v)) => max_entries = Some(*v),
                ("qemu_pid", OptValue::U32(0)) => {
                    return Err(ServiceError::InvalidOption {
                        option: "qemu_pid".into(),
                        reason: "is 0, not a process".into(),
                    })
                }
                ("qemu_pid", OptValue::U32(v)) => qemu_pid = Some(*v),
                ("lifecycle", OptValue::Str(s)) => {
                    lifecycle = match s.as_str() {
                        "always" => Lifecycle::Always,
                        "migration" => Lifecycle::Migration,
                        other => {
                            return Err(ServiceError::InvalidOption {
                                option: "lifecycle".into(),
                                reason: format!(
                                    "'{other}' is not a lifecycle; use 'always' or 'migration'"
                                ),
                            })
                        }
                    }
                }
                (known, v) if REGISTER_OPTIONS.contains(&known) => {
                    return Err(ServiceError::InvalidOption {
                        option: known.into(),
                        reason: format!(
                            "must be of type '{}', got '{}'",
                            register_option_type(known),
                            v.signature()
                        ),
                    })
                }
                (unknown, _) => {
                    return Err(ServiceError::UnknownOption {
                        option: unknown.into(),
                        known: REGISTER_OPTIONS.join(", "),
                    })
                }
            }
        }
        let mark = match mark {
            Some(m) => m,
            None => vm.parse::<u32>().map_err(|_| ServiceError::InvalidOption {
                option: "mark".into(),
                reason: format!("is required because VM '{vm}' is not a number"),
            })?,
        };
        let id = id.unwrap_or_else(|| format!("conntrack-vmstate-{vm}"));
        validate_id(&id)?;
        if let Some(addr) = &bus_address {
            if addr.is_empty() {
                return Err(ServiceError::InvalidOption {
                    option: "bus_address".into(),
                    reason: "is empty; omit it for the system bus".into(),
                });
            }
        }
        if let Some((from, to)) = zone_map {
            if zone != Some(to) {
                return Err(ServiceError::InvalidOption {
                    option: "zone_map".into(),
                    reason: format!(
                        "maps zone {from} to {to}, so the registration's zone must be {to} (it is {})",
                        zone.map_or_else(|| "not set".to_string(), |z| z.to_string())
                    ),
                });
            }
        }
        Ok(VmConfig {
            vm: vm.to_string(),
            id,
            mark,
            mark_mask: mark_mask.unwrap_or(u32::MAX),
            zone,
            bus_address,
            format: format.unwrap_or(SaveFormat::Binary),
            zone_map,
            helpers,
            max_entries,
            qemu_pid,
            lifecycle,
        })
    }

    /// The first option in which `other` differs from `self`, with both
    /// values rendered for the error message.
    pub fn first_difference(&self, other: &VmConfig) -> Option<(&'static str, String, String)> {
        fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
            v.as_ref()
                .map_or_else(|| "(none)".into(), |v| v.to_string())
        }
        let zmap =
            |m: &Option<(u16, u16)>| m.map_or_else(|| "(none)".into(), |(a, b)| format!("{a}:{b}"));
        let helpers = |h: &Option<Vec<String>>| {
            h.as_ref()
                .map_or_else(|| "(default)".into(), |h| format!("'{}'", h.join(",")))
        };
        let pairs: [(&'static str, String, String); 10] = [
            ("id", self.id.clone(), other.id.clone()),
            ("mark", self.mark.to_string(), other.mark.to_string()),
            (
                "mark_mask",
                format!("{:#x}", self.mark_mask),
                format!("{:#x}", other.mark_mask),
            ),
            ("zone", opt(&self.zone), opt(&other.zone)),
            (
                "bus_address",
                opt(&self.bus_address),
                opt(&other.bus_address),
            ),
            (
                "format",
                self.format.as_str().into(),
                other.format.as_str().into(),
            ),
            ("zone_map", zmap(&self.zone_map), zmap(&other.zone_map)),
            ("helpers", helpers(&self.helpers), helpers(&other.helpers)),
            (
                "max_entries",
                opt(&self.max_entries),
                opt(&other.max_entries),
            ),
            (
                "lifecycle",
                self.lifecycle.as_str().into(),
                other.lifecycle.as_str().into(),
            ),
        ];
        pairs.into_iter().find(|(_, a, b)| a != b)
    }
}

/// `OLD:NEW`: the zone the VM's entries had on the source, and the
/// registration's zone they are created in here.
fn parse_zone_map(s: &str) -> Result<(u16, u16), ServiceError> {
    let bad = || ServiceError::InvalidOption {
        option: "zone_map".into(),
        reason: format!(
            "'{}' is not OLD:NEW with two zone numbers 0..=65535",
            s.escape_debug()
        ),
    };
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    Ok((
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    ))
}

/// Comma-separated helper names; empty allows none.
fn parse_helpers(s: &str) -> Result<Vec<String>, ServiceError> {
    let mut out = Vec::new();
    for h in s.split(',').map(str::trim).filter(|h| !h.is_empty()) {
        if h.len() > MAX_HELPER_NAME || h.chars().any(|c| c.is_control() || c == '/') {
            return Err(ServiceError::InvalidOption {
                option: "helpers".into(),
                reason: format!(
                    "'{}' is not a conntrack helper name (1 to {MAX_HELPER_NAME} bytes, no '/' or control characters)",
                    h.escape_debug()
                ),
            });
        }
        out.push(h.to_string());
    }
    Ok(out)
}

/// Typed for the error message of a wrongly typed known option.
fn register_option_type(name: &str) -> &'static str {
    match name {
        "mark" | "mark_mask" | "max_entries" | "qemu_pid" => "u",
        "zone" => "q",
        _ => "s",
    }
}

/// Parses `Unregister`'s options; returns whether to flush.
pub fn parse_unregister(options: &[(String, OptValue)]) -> Result<bool, ServiceError> {
    let mut flush = false;
    for (name, value) in options {
        match (name.as_str(), value) {
            ("flush", OptValue::Bool(b)) => flush = *b,
            ("flush", v) => {
                return Err(ServiceError::InvalidOption {
                    option: "flush".into(),
                    reason: format!("must be of type 'b', got '{}'", v.signature()),
                })
            }
            (unknown, _) => {
                return Err(ServiceError::UnknownOption {
                    option: unknown.into(),
                    known: UNREGISTER_OPTIONS.join(", "),
                })
            }
        }
    }
    Ok(flush)
}

/// A VM name is used in object paths (escaped), journal fields and logs.
pub fn validate_vm(vm: &str) -> Result<(), ServiceError> {
    let reason = if vm.is_empty() {
        "is empty"
    } else if vm.len() > VM_MAX_BYTES {
        "is longer than 255 bytes"
    } else if vm.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    Err(ServiceError::InvalidVm {
        vm: vm.escape_debug().to_string(),
        reason: reason.into(),
    })
}

/// QEMU's rules for a VMState Id: 1..=255 bytes; no ',' because `id-list`
/// is a comma-separated list.
pub fn validate_id(id: &str) -> Result<(), ServiceError> {
    let reason = if id.is_empty() {
        "is empty (QEMU needs 1 to 255 bytes)".to_string()
    } else if id.len() > ID_MAX_BYTES {
        format!("is {} bytes long (QEMU allows at most 255)", id.len())
    } else if id.contains(',') {
        "contains ',' which QEMU's id-list cannot carry".to_string()
    } else if id.chars().any(char::is_control) {
        "contains control characters".to_string()
    } else {
        return Ok(());
    };
    Err(ServiceError::InvalidOption {
        option: "id".into(),
        reason: format!("'{}' {reason}", id.escape_debug()),
    })
}

/// Escapes a VM name into one object path element the way systemd does for
/// bus labels: `[A-Za-z0-9]` stays, every other byte becomes `_xx`.
pub fn escape_path_element(vm: &str) -> String {
    if vm.is_empty() {
        return "_".into();
    }
    let mut out = String::with_capacity(vm.len());
    for b in vm.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(name: &str, v: OptValue) -> (String, OptValue) {
        (name.to_string(), v)
    }

    #[test]
    fn defaults_for_numeric_vm() {
        let c = VmConfig::from_options("100", &[]).unwrap();
        assert_eq!(
            c,
            VmConfig {
                vm: "100".into(),
                id: "conntrack-vmstate-100".into(),
                mark: 100,
                mark_mask: u32::MAX,
                zone: None,
                bus_address: None,
                format: SaveFormat::Binary,
                zone_map: None,
                helpers: None,
                max_entries: None,
                qemu_pid: None,
                lifecycle: Lifecycle::Always,
            }
        );
    }

    #[test]
    fn non_numeric_vm_needs_mark() {
        let e = VmConfig::from_options("web", &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid option 'mark': is required because VM 'web' is not a number"
        );
        let c = VmConfig::from_options("web", &[o("mark", OptValue::U32(7))]).unwrap();
        assert_eq!(c.mark, 7);
    }

    #[test]
    fn unknown_and_mistyped_options_are_named() {
        let e =
            VmConfig::from_options("1", &[o("colour", OptValue::Str("red".into()))]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown option 'colour' (known: id, mark, mark_mask, zone, bus_address, format, \
             zone_map, helpers, max_entries, qemu_pid, lifecycle)"
        );
        let e = VmConfig::from_options("1", &[o("mark", OptValue::Str("1".into()))]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid option 'mark': must be of type 'u', got 's'"
        );
        let e = VmConfig::from_options("1", &[o("zone", OptValue::U32(1))]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid option 'zone': must be of type 'q', got 'u'"
        );
        let e =
            VmConfig::from_options("1", &[o("format", OptValue::Str("xml".into()))]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid option 'format': 'xml' is not a format; use 'binary' or 'conntrack-save'"
        );
    }

    #[test]
    fn id_rules_follow_qemu() {
        for (id, msg) in [
            (
                "",
                "invalid option 'id': '' is empty (QEMU needs 1 to 255 bytes)",
            ),
            (
                "a,b",
                "invalid option 'id': 'a,b' contains ',' which QEMU's id-list cannot carry",
            ),
        ] {
            let e = VmConfig::from_options("1", &[o("id", OptValue::Str(id.into()))]).unwrap_err();
            assert_eq!(e.to_string(), msg);
        }
        let long = "x".repeat(256);
        let e = VmConfig::from_options("1", &[o("id", OptValue::Str(long))]).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("is 256 bytes long (QEMU allows at most 255)"),
            "{e}"
        );
        assert!(VmConfig::from_options("1", &[o("id", OptValue::Str("x".repeat(255)))]).is_ok());
    }

    #[test]
    fn vm_names_are_checked_and_escaped() {
        assert!(validate_vm("").is_err());
        assert!(validate_vm("a\nb").is_err());
        assert!(validate_vm(&"9".repeat(256)).is_err());
        assert_eq!(escape_path_element("100"), "100");
        assert_eq!(escape_path_element("web-1.a"), "web_2d1_2ea");
        assert_eq!(escape_path_element("_"), "_5f");
    }

    #[test]
    fn first_difference_names_the_option() {
        let a = VmConfig::from_options("5", &[]).unwrap();
        let b = VmConfig::from_options("5", &[o("zone", OptValue::U16(3))]).unwrap();
        assert_eq!(a.first_difference(&a.clone()), None);
        assert_eq!(
            a.first_difference(&b),
            Some(("zone", "(none)".into(), "3".into()))
        );
    }

    #[test]
    fn load_policy_options() {
        let c = VmConfig::from_options(
            "5",
            &[
                o("zone", OptValue::U16(7)),
                o("zone_map", OptValue::Str("3:7".into())),
                o("helpers", OptValue::Str("ftp, sip".into())),
                o("max_entries", OptValue::U32(1000)),
            ],
        )
        .unwrap();
        assert_eq!(c.zone_map, Some((3, 7)));
        assert_eq!(c.helpers, Some(vec!["ftp".to_string(), "sip".to_string()]));
        assert_eq!(c.max_entries, Some(1000));
        let p = c.load_policy();
        assert_eq!(p.zone_map, Some((3, 7)));
        assert_eq!(p.helpers, vec!["ftp".to_string(), "sip".to_string()]);
        let none = VmConfig::from_options("5", &[o("helpers", OptValue::Str("".into()))]).unwrap();
        assert!(none.load_policy().helpers.is_empty());
        for (opts, msg) in [
            (
                vec![o("zone_map", OptValue::Str("3:7".into()))],
                "invalid option 'zone_map': maps zone 3 to 7, so the registration's zone must be 7 (it is not set)",
            ),
            (
                vec![o("zone_map", OptValue::Str("3-7".into()))],
                "invalid option 'zone_map': '3-7' is not OLD:NEW with two zone numbers 0..=65535",
            ),
            (
                vec![o("helpers", OptValue::Str("ftp,../../x".into()))],
                "invalid option 'helpers': '../../x' is not a conntrack helper name (1 to 15 bytes, no '/' or control characters)",
            ),
            (
                vec![o("max_entries", OptValue::U32(0))],
                "invalid option 'max_entries': is 0; a Load would create nothing",
            ),
            (
                vec![o("max_entries", OptValue::U16(1))],
                "invalid option 'max_entries': must be of type 'u', got 'q'",
            ),
            (
                vec![o("qemu_pid", OptValue::U32(0))],
                "invalid option 'qemu_pid': is 0, not a process",
            ),
        ] {
            assert_eq!(
                VmConfig::from_options("5", &opts).unwrap_err().to_string(),
                msg
            );
        }
        // Registrations written by older versions lack the new fields.
        let old = r#"{"vm":"5","id":"x","mark":5,"mark_mask":4294967295,"zone":null,"bus_address":null,"format":"binary"}"#;
        let c: VmConfig = serde_json::from_str(old).unwrap();
        assert_eq!((c.zone_map, c.helpers, c.max_entries), (None, None, None));
    }

    #[test]
    fn unregister_options() {
        assert!(!parse_unregister(&[]).unwrap());
        assert!(parse_unregister(&[o("flush", OptValue::Bool(true))]).unwrap());
        assert_eq!(
            parse_unregister(&[o("force", OptValue::Bool(true))])
                .unwrap_err()
                .to_string(),
            "unknown option 'force' (known: flush)"
        );
    }
}

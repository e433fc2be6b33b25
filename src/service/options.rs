//! Registration options: what a caller may ask for, their defaults, and the
//! rules QEMU imposes on a VMState Id.

use serde::{Deserialize, Serialize};

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
}

/// Option names `Register` accepts, in the order conflicts are reported.
pub const REGISTER_OPTIONS: [&str; 6] =
    ["id", "mark", "mark_mask", "zone", "bus_address", "format"];
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
        Ok(VmConfig {
            vm: vm.to_string(),
            id,
            mark,
            mark_mask: mark_mask.unwrap_or(u32::MAX),
            zone,
            bus_address,
            format: format.unwrap_or(SaveFormat::Binary),
        })
    }

    /// The first option in which `other` differs from `self`, with both
    /// values rendered for the error message.
    pub fn first_difference(&self, other: &VmConfig) -> Option<(&'static str, String, String)> {
        fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
            v.as_ref()
                .map_or_else(|| "(none)".into(), |v| v.to_string())
        }
        let pairs: [(&'static str, String, String); 6] = [
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
        ];
        pairs.into_iter().find(|(_, a, b)| a != b)
    }
}

/// Typed for the error message of a wrongly typed known option.
fn register_option_type(name: &str) -> &'static str {
    match name {
        "mark" | "mark_mask" => "u",
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
            "unknown option 'colour' (known: id, mark, mark_mask, zone, bus_address, format)"
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

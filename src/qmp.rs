//! A minimal QMP client: enough to add, re-target and delete QEMU's
//! `dbus-vmstate` object, and to drive migrations in tests and the demo.
//!
//! Synchronous on purpose: a management command does a handful of
//! request/response round trips and then exits; a runtime would buy nothing.
//! Every read is bounded by a deadline, because a QEMU that is inside a
//! helper's `Save` holds its big lock and does not answer QMP until the call
//! returns (up to GDBus' 25 s).
//!
//! QEMU allows only one `dbus-vmstate` object per process and lets `id-list`
//! be changed at run time, so several helpers (ours and, say, another
//! project's) share one object: we only ever add or remove our own Id in the
//! comma-separated `id-list` and leave the others alone.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// The QOM id we give the object when we create it.
pub const VMSTATE_OBJECT_ID: &str = "conntrack-vmstate";

/// The QOM type name of QEMU's object.
pub const VMSTATE_TYPE: &str = "dbus-vmstate";

/// Bound on connecting, the greeting and each command. Generous, because a
/// QEMU busy in a migration answers late, but far below "hangs forever".
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Events kept for [`QmpClient::take_events`]; older ones are dropped.
const MAX_EVENTS: usize = 256;

/// Longest Id QEMU accepts (`dbus_get_proxies`: 1..255 bytes).
pub const MAX_ID_LEN: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    // The io error is part of the message and deliberately not a `source`:
    // error chains (anyhow's `{:#}`) would print it twice.
    #[error("cannot connect to QMP socket {}: {cause}", path.display())]
    Connect {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("QMP I/O on {}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "no answer from QEMU on {} within {} ms while waiting for {waiting_for} \
         (QEMU busy in a migration, or another client holds the monitor)",
        path.display(),
        timeout.as_millis()
    )]
    Timeout {
        path: PathBuf,
        waiting_for: String,
        timeout: Duration,
    },
    #[error("QEMU closed the QMP connection {} while waiting for {waiting_for}", path.display())]
    Closed { path: PathBuf, waiting_for: String },
    #[error("malformed QMP message from {}: {detail}", path.display())]
    Protocol { path: PathBuf, detail: String },
    /// QEMU answered the command with an error; `desc` is QEMU's own text
    /// (e.g. `failed to connect to DBus: …`).
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("invalid VMState Id {id:?}: {reason}")]
    InvalidId { id: String, reason: &'static str },
    #[error(
        "QEMU's dbus-vmstate object {object} is connected to {existing}, not {wanted}, and \
         {others}; it cannot be re-targeted without breaking other helpers"
    )]
    BusMismatch {
        object: String,
        existing: String,
        wanted: String,
        others: String,
    },
}

/// What [`QmpClient::attach_vmstate`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachOutcome {
    /// No object existed; one was created with our Id.
    Created { object: String },
    /// An object existed; our Id was appended to its `id-list`.
    Added { object: String, id_list: String },
    /// Our Id was already listed on an object using the same bus.
    AlreadyPresent { object: String },
    /// Our object (or one listing only our Id) pointed at another bus: it
    /// was deleted and created again on `bus_address`.
    Recreated { object: String },
}

/// What [`QmpClient::detach_vmstate`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetachOutcome {
    /// There is no dbus-vmstate object.
    NoObject,
    /// The object does not list our Id; it was left untouched.
    NotListed { object: String },
    /// Our Id was removed; other Ids remain.
    Removed { object: String, id_list: String },
    /// Ours was the only Id; the object was deleted.
    Deleted { object: String },
}

/// The dbus-vmstate object of a QEMU, as read over QMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmstateObject {
    /// QOM id (the object lives at `/objects/<id>`).
    pub id: String,
    pub addr: String,
    /// `id-list` split on commas, empty items dropped. QEMU reports an unset
    /// `id-list` as "" too, so "unset" and "expect nobody" look the same here.
    pub ids: Vec<String>,
}

/// Checks an Id the way QEMU will (1..255 bytes) plus the one rule QEMU
/// cannot check: a comma would split it into two Ids in `id-list`.
pub fn validate_id(id: &str) -> Result<(), QmpError> {
    let reason = if id.is_empty() {
        "empty (QEMU requires 1 to 255 bytes)"
    } else if id.len() > MAX_ID_LEN {
        "longer than 255 bytes (QEMU rejects it)"
    } else if id.contains(',') {
        "contains a comma, the id-list separator"
    } else {
        return Ok(());
    };
    Err(QmpError::InvalidId {
        id: id.to_owned(),
        reason,
    })
}

fn split_ids(list: &str) -> Vec<String> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// One QMP session, capabilities already negotiated.
pub struct QmpClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
    next_id: u64,
    /// Events seen while waiting for replies, oldest first (tests read
    /// MIGRATION and STOP events from here).
    events: Vec<Value>,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities, all within
    /// [`DEFAULT_TIMEOUT`].
    pub fn connect(path: &Path) -> Result<QmpClient, QmpError> {
        Self::connect_with_timeout(path, DEFAULT_TIMEOUT)
    }

    /// Pid of the QEMU process serving this monitor, from the socket's
    /// peer credentials (the kernel's, not anything QEMU says): the process
    /// whose bus connection a VM registration may be bound to
    /// (`qemu_pid`). `None` where the kernel reports no pid.
    pub fn peer_pid(&self) -> Option<u32> {
        nix::sys::socket::getsockopt(&self.writer, nix::sys::socket::sockopt::PeerCredentials)
            .ok()
            .and_then(|c| u32::try_from(c.pid()).ok())
            .filter(|&p| p > 0)
    }

    /// As [`connect`](Self::connect), with `timeout` bounding every later
    /// command as well.
    pub fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<QmpClient, QmpError> {
        let stream = UnixStream::connect(path).map_err(|cause| QmpError::Connect {
            path: path.to_owned(),
            cause,
        })?;
        let io = |cause| QmpError::Io {
            path: path.to_owned(),
            cause,
        };
        let writer = stream.try_clone().map_err(io)?;
        let mut client = QmpClient {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            writer,
            timeout,
            next_id: 1,
            events: Vec::new(),
        };
        // QEMU serves one monitor client at a time; a second client's connect
        // succeeds but its greeting only comes once the first one leaves.
        let deadline = Instant::now() + timeout;
        let greeting = client.read_message(deadline, "the QMP greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(client.protocol(format!("expected a QMP greeting, got {greeting}")));
        }
        client.execute("qmp_capabilities", None)?;
        Ok(client)
    }

    /// Events received so far (drained).
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    fn protocol(&self, detail: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            detail,
        }
    }

    fn read_message(&mut self, deadline: Instant, waiting_for: &str) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        loop {
            let now = Instant::now();
            let timed_out = || QmpError::Timeout {
                path: self.path.clone(),
                waiting_for: waiting_for.to_owned(),
                timeout: self.timeout,
            };
            if now >= deadline {
                return Err(timed_out());
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(deadline - now))
                .map_err(|cause| QmpError::Io {
                    path: self.path.clone(),
                    cause,
                })?;
            // read_until keeps what it got before a timeout in `line`, so a
            // message split across reads is reassembled.
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => {
                    return Err(QmpError::Closed {
                        path: self.path.clone(),
                        waiting_for: waiting_for.to_owned(),
                    })
                }
                Ok(_) if line.ends_with(b"\n") => break,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(timed_out())
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(cause) => {
                    return Err(QmpError::Io {
                        path: self.path.clone(),
                        cause,
                    })
                }
            }
        }
        serde_json::from_slice(&line).map_err(|e| {
            self.protocol(format!(
                "{e} in {:?}",
                String::from_utf8_lossy(&line).trim_end()
            ))
        })
    }

    /// Sends one command and returns its `return` value. Events that arrive
    /// meanwhile are kept in [`take_events`](Self::take_events); a reply
    /// with another id (left over from an earlier timed-out command) is
    /// skipped. After [`QmpError::Timeout`] part of a message may have been
    /// consumed: drop the client and connect again.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::from(command));
        msg.insert("id".into(), Value::from(id));
        if let Some(a) = arguments {
            msg.insert("arguments".into(), a);
        }
        let mut bytes = Value::Object(msg).to_string().into_bytes();
        bytes.push(b'\n');
        let deadline = Instant::now() + self.timeout;
        self.writer
            .set_write_timeout(Some(self.timeout))
            .and_then(|()| self.writer.write_all(&bytes))
            .map_err(|cause| match cause.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => QmpError::Timeout {
                    path: self.path.clone(),
                    waiting_for: format!("sending {command}"),
                    timeout: self.timeout,
                },
                _ => QmpError::Io {
                    path: self.path.clone(),
                    cause,
                },
            })?;
        let waiting_for = format!("the reply to {command}");
        loop {
            let mut msg = self.read_message(deadline, &waiting_for)?;
            if msg.get("event").is_some() {
                // Kept for callers that want them, bounded so a client nobody
                // drains cannot grow without end.
                if self.events.len() >= MAX_EVENTS {
                    self.events.remove(0);
                }
                self.events.push(msg);
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(err) = msg.get("error") {
                let text = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            return match msg.get_mut("return") {
                Some(v) => Ok(v.take()),
                None => Err(self.protocol(format!("reply without return or error: {msg}"))),
            };
        }
    }

    fn qom_get_str(&mut self, path: &str, property: &str) -> Result<String, QmpError> {
        let v = self.execute("qom-get", Some(json!({"path": path, "property": property})))?;
        match v {
            Value::String(s) => Ok(s),
            other => {
                Err(self.protocol(format!("qom-get {path} {property}: not a string: {other}")))
            }
        }
    }

    fn qom_set_str(&mut self, path: &str, property: &str, value: &str) -> Result<(), QmpError> {
        self.execute(
            "qom-set",
            Some(json!({"path": path, "property": property, "value": value})),
        )?;
        Ok(())
    }

    /// The dbus-vmstate object, whatever its QOM id (another tool may have
    /// created it), or `None`.
    pub fn find_vmstate(&mut self) -> Result<Option<VmstateObject>, QmpError> {
        let list = self.execute("qom-list", Some(json!({"path": "/objects"})))?;
        let Some(items) = list.as_array() else {
            return Err(self.protocol(format!("qom-list /objects: not a list: {list}")));
        };
        let wanted = format!("child<{VMSTATE_TYPE}>");
        let Some(id) = items
            .iter()
            .find(|i| i.get("type").and_then(Value::as_str) == Some(&wanted))
            .and_then(|i| i.get("name").and_then(Value::as_str))
            .map(str::to_owned)
        else {
            return Ok(None);
        };
        let path = format!("/objects/{id}");
        let addr = self.qom_get_str(&path, "addr")?;
        let ids = split_ids(&self.qom_get_str(&path, "id-list")?);
        Ok(Some(VmstateObject { id, addr, ids }))
    }

    fn object_add(
        &mut self,
        object_id: &str,
        bus_address: &str,
        id_list: &str,
    ) -> Result<(), QmpError> {
        self.execute(
            "object-add",
            Some(json!({
                "qom-type": VMSTATE_TYPE,
                "id": object_id,
                "addr": bus_address,
                "id-list": id_list,
            })),
        )?;
        Ok(())
    }

    /// Makes QEMU's dbus-vmstate object expect `vmstate_id` on
    /// `bus_address`: creates the object, or adds the Id to an existing
    /// object's `id-list` keeping the Ids already there.
    ///
    /// QEMU connects to the bus once, when the object is created, so an
    /// existing object on another bus cannot simply be re-pointed: when it
    /// serves nobody else it is re-created, otherwise this is
    /// [`QmpError::BusMismatch`].
    pub fn attach_vmstate(
        &mut self,
        vmstate_id: &str,
        bus_address: &str,
    ) -> Result<AttachOutcome, QmpError> {
        self.attach_vmstate_as(VMSTATE_OBJECT_ID, vmstate_id, bus_address)
    }

    /// [`Self::attach_vmstate`], naming a created object `object_id`
    /// (Proxmox VE's tools expect theirs to be `pve-vmstate`).
    pub fn attach_vmstate_as(
        &mut self,
        object_id: &str,
        vmstate_id: &str,
        bus_address: &str,
    ) -> Result<AttachOutcome, QmpError> {
        validate_id(vmstate_id)?;
        let Some(obj) = self.find_vmstate()? else {
            self.object_add(object_id, bus_address, vmstate_id)?;
            return Ok(AttachOutcome::Created {
                object: object_id.to_owned(),
            });
        };
        let path = format!("/objects/{}", obj.id);
        if obj.addr != bus_address {
            let others: Vec<&str> = obj
                .ids
                .iter()
                .map(String::as_str)
                .filter(|i| *i != vmstate_id)
                .collect();
            // Re-creating is safe only when nobody else can depend on the
            // object: it lists no other Id, and it is ours or lists our Id.
            // Someone else's object with an empty id-list may be one whose
            // id-list is unset (QEMU reports both as ""), which serves every
            // helper on its bus.
            let ours = obj.id == object_id || obj.ids.iter().any(|i| i == vmstate_id);
            if !others.is_empty() || !ours {
                return Err(QmpError::BusMismatch {
                    object: path,
                    existing: obj.addr,
                    wanted: bus_address.to_owned(),
                    others: if others.is_empty() {
                        "its id-list is empty or unset".to_owned()
                    } else {
                        format!("also serves other Ids ({})", others.join(","))
                    },
                });
            }
            self.execute("object-del", Some(json!({"id": obj.id})))?;
            self.object_add(object_id, bus_address, vmstate_id)?;
            return Ok(AttachOutcome::Recreated {
                object: object_id.to_owned(),
            });
        }
        if obj.ids.iter().any(|i| i == vmstate_id) {
            return Ok(AttachOutcome::AlreadyPresent { object: obj.id });
        }
        let mut ids = obj.ids;
        ids.push(vmstate_id.to_owned());
        let id_list = ids.join(",");
        self.qom_set_str(&path, "id-list", &id_list)?;
        Ok(AttachOutcome::Added {
            object: obj.id,
            id_list,
        })
    }

    /// Removes `vmstate_id` from the object's `id-list`; deletes the object
    /// when ours was its only Id, so the object is on neither side after
    /// both hosts unregister (QEMU requires both or neither).
    pub fn detach_vmstate(&mut self, vmstate_id: &str) -> Result<DetachOutcome, QmpError> {
        validate_id(vmstate_id)?;
        let Some(obj) = self.find_vmstate()? else {
            return Ok(DetachOutcome::NoObject);
        };
        if !obj.ids.iter().any(|i| i == vmstate_id) {
            return Ok(DetachOutcome::NotListed { object: obj.id });
        }
        let rest: Vec<String> = obj.ids.into_iter().filter(|i| i != vmstate_id).collect();
        if rest.is_empty() {
            self.execute("object-del", Some(json!({"id": obj.id})))?;
            return Ok(DetachOutcome::Deleted { object: obj.id });
        }
        let id_list = rest.join(",");
        self.qom_set_str(&format!("/objects/{}", obj.id), "id-list", &id_list)?;
        Ok(DetachOutcome::Removed {
            object: obj.id,
            id_list,
        })
    }
}

/// One-shot [`QmpClient::attach_vmstate`] for the CLI's `register --qmp`.
/// QEMU serves one QMP client at a time, so the read-modify-write of
/// `id-list` cannot interleave with another client on the same socket.
pub fn attach_vmstate(
    qmp_socket: &Path,
    vmstate_id: &str,
    bus_address: &str,
) -> Result<(), QmpError> {
    QmpClient::connect(qmp_socket)?.attach_vmstate(vmstate_id, bus_address)?;
    Ok(())
}

/// One-shot [`QmpClient::detach_vmstate`] for the CLI's `unregister --qmp`.
pub fn detach_vmstate(qmp_socket: &Path, vmstate_id: &str) -> Result<(), QmpError> {
    QmpClient::connect(qmp_socket)?.detach_vmstate(vmstate_id)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_like_qemu_does() {
        assert!(validate_id("conntrack-vmstate-100").is_ok());
        assert!(validate_id(&"x".repeat(255)).is_ok());
        let e = validate_id("").unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid VMState Id \"\": empty (QEMU requires 1 to 255 bytes)"
        );
        assert!(validate_id(&"x".repeat(256))
            .unwrap_err()
            .to_string()
            .contains("longer than 255 bytes"));
        assert!(validate_id("a,b")
            .unwrap_err()
            .to_string()
            .contains("contains a comma"));
    }

    #[test]
    fn id_list_splitting_drops_empty_items() {
        assert_eq!(split_ids(""), Vec::<String>::new());
        assert_eq!(split_ids("a,,b,"), vec!["a", "b"]);
    }
}

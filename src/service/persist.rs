//! Registrations on disk, so a daemon restarted between Register and the
//! migration serves the VM again with the same Id and mark.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::options::VmConfig;
use super::ServiceError;

const FILE_NAME: &str = "registrations.json";
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    vms: Vec<VmConfig>,
}

/// The registrations file in the state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Store {
        Store { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Reads the saved registrations; a missing file is an empty list. A
    /// file that cannot be read back is moved aside (never deleted) and
    /// reported, so the daemon still starts and the data can be inspected.
    pub fn load(&self) -> Result<Vec<VmConfig>, ServiceError> {
        let path = self.path();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ServiceError::Persist { path, source: e }),
        };
        let parsed: Result<OnDisk, String> = serde_json::from_slice::<OnDisk>(&text)
            .map_err(|e| e.to_string())
            .and_then(|d| {
                if d.version == VERSION {
                    Ok(d)
                } else {
                    Err(format!("unsupported version {}", d.version))
                }
            });
        match parsed {
            Ok(d) => Ok(d.vms),
            Err(reason) => {
                let aside = path.with_extension("json.corrupt");
                let _ = std::fs::rename(&path, &aside);
                Err(ServiceError::CorruptState {
                    what: "registrations",
                    path,
                    moved_to: aside,
                    reason,
                })
            }
        }
    }

    /// Replaces the file atomically (see `Store::replace`).
    pub fn save(&self, vms: &[VmConfig]) -> Result<(), ServiceError> {
        let data = OnDisk {
            version: VERSION,
            vms: vms.to_vec(),
        };
        let bytes = serde_json::to_vec_pretty(&data).map_err(|e| ServiceError::Persist {
            path: self.path(),
            source: std::io::Error::other(e),
        })?;
        self.replace(&self.path(), &bytes)
    }

    /// Where the `CTA_ID`s of `vm`'s last Save are kept. The name is hex, so
    /// any VM name is a safe file name. A name whose hex would not fit
    /// `NAME_MAX` with the temporary file's decoration (VM names over
    /// [`IDS_HEX_NAME_MAX`] bytes) is cut and completed with a 64-bit hash
    /// of the whole name; such files also carry the whole name, so a
    /// colliding hash never hands one VM another's ids. Shorter names keep
    /// the name they always had, so files of older versions are read.
    pub fn ids_path(&self, vm: &str) -> PathBuf {
        let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let b = vm.as_bytes();
        if b.len() <= IDS_HEX_NAME_MAX {
            return self.dir.join(format!("saved-{}.ids", hex(b)));
        }
        let h1 = crc32c::crc32c(b);
        let h2 = crc32c::crc32c_append(0x5a5a_5a5a, b);
        self.dir.join(format!(
            "saved-{}-{h1:08x}{h2:08x}.ids",
            hex(&b[..IDS_HEX_PREFIX])
        ))
    }

    /// Keeps the `CTA_ID`s of `vm`'s last Save, so that `Unregister` with
    /// `flush` still deletes exactly those entries after a daemon restart
    /// (CTA_IDs belong to the kernel, not to the process). An empty list
    /// removes the file.
    pub fn save_ids(&self, vm: &str, ids: &[u32]) -> Result<(), ServiceError> {
        if ids.is_empty() {
            return self.remove_ids(vm);
        }
        let mut b = Vec::with_capacity(14 + vm.len() + 4 * ids.len());
        if vm.len() <= IDS_HEX_NAME_MAX {
            b.extend_from_slice(&IDS_MAGIC);
        } else {
            // The file name holds only a hash of this name: keep it whole.
            b.extend_from_slice(&IDS_NAMED_MAGIC);
            b.extend_from_slice(&(vm.len() as u16).to_le_bytes());
            b.extend_from_slice(vm.as_bytes());
        }
        b.extend_from_slice(&(ids.len() as u32).to_le_bytes());
        for id in ids {
            b.extend_from_slice(&id.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        self.replace(&self.ids_path(vm), &b)
    }

    /// The ids [`Store::save_ids`] kept for `vm`, empty when there are none.
    /// A file that cannot be read back is moved aside and reported.
    pub fn load_ids(&self, vm: &str) -> Result<Vec<u32>, ServiceError> {
        let mut path = self.ids_path(vm);
        let mut read = std::fs::read(&path);
        if let (Err(e), Some(legacy)) = (&read, self.legacy_ids_path(vm)) {
            if e.kind() == std::io::ErrorKind::NotFound {
                path = legacy;
                read = std::fs::read(&path);
            }
        }
        let b = match read {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ServiceError::Persist { path, source: e }),
        };
        let parse = || -> Result<Vec<u32>, String> {
            if b.len() < 12 || (b[..4] != IDS_MAGIC && b[..4] != IDS_NAMED_MAGIC) {
                return Err("not a saved-ids file".into());
            }
            let (body, crc) = b.split_at(b.len() - 4);
            if crc32c::crc32c(body).to_le_bytes() != crc {
                return Err("checksum mismatch".into());
            }
            let mut rest = &body[4..];
            if body[..4] == IDS_NAMED_MAGIC {
                let n = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
                let name = rest
                    .get(2..2 + n)
                    .ok_or_else(|| format!("declares a {n}-byte VM name it does not hold"))?;
                if name != vm.as_bytes() {
                    return Err(format!(
                        "holds the ids of VM '{}'",
                        String::from_utf8_lossy(name).escape_debug()
                    ));
                }
                rest = &rest[2 + n..];
            }
            if rest.len() < 4 {
                return Err("truncated".into());
            }
            let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let ids = &rest[4..];
            if ids.len() != n.saturating_mul(4) {
                return Err(format!("declares {n} ids, holds {} bytes", ids.len()));
            }
            Ok(ids
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        parse().map_err(|reason| {
            let aside = path.with_extension("ids.corrupt");
            let _ = std::fs::rename(&path, &aside);
            ServiceError::CorruptState {
                what: "saved entry ids",
                path,
                moved_to: aside,
                reason,
            }
        })
    }

    /// The plain hex name an older version used for a name too long for
    /// it now, when that name was a valid file name at all (NAME_MAX).
    fn legacy_ids_path(&self, vm: &str) -> Option<PathBuf> {
        (vm.len() > IDS_HEX_NAME_MAX && 6 + 2 * vm.len() + 4 <= 255).then(|| {
            let hex: String = vm.bytes().map(|b| format!("{b:02x}")).collect();
            self.dir.join(format!("saved-{hex}.ids"))
        })
    }

    pub fn remove_ids(&self, vm: &str) -> Result<(), ServiceError> {
        if let Some(legacy) = self.legacy_ids_path(vm) {
            let _ = std::fs::remove_file(legacy);
        }
        let path = self.ids_path(vm);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ServiceError::Persist { path, source: e }),
        }
    }

    /// Replaces `path` atomically: write a temporary file in the same
    /// directory, fsync it, rename it over the old one, fsync the directory.
    /// A crash at any point leaves either the old or the new content.
    fn replace(&self, path: &Path, bytes: &[u8]) -> Result<(), ServiceError> {
        let err = |source| ServiceError::Persist {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            sync_dir(&self.dir)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(e)
        })
    }
}

/// A Load's restore that had not finished when its daemon stopped: the
/// whole blob as QEMU gave it, how far the restore got, and the
/// registration it was addressed to (whose policy the rest is created
/// under). Kept from the moment QEMU has its answer until the restore ends,
/// so the next instance completes it after a stop, a crash or a kill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRestore {
    pub config: VmConfig,
    /// Entries of the (capped) priority stream already handled.
    pub consumed: u64,
    /// When the Load was called, microseconds since the Unix epoch.
    pub loaded_at_us: u64,
    pub blob: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct PendingHeader {
    config: VmConfig,
    consumed: u64,
    loaded_at_us: u64,
}

const PENDING_MAGIC: [u8; 4] = *b"CTVR";
const PENDING_PREFIX: &str = "restore-";
const PENDING_SUFFIX: &str = ".pending";

impl Store {
    /// Where the pending restore of `vm` is kept: a hash of the name (the
    /// file holds the name itself), so any VM name fits NAME_MAX.
    pub fn pending_path(&self, vm: &str) -> PathBuf {
        let b = vm.as_bytes();
        let h1 = crc32c::crc32c(b);
        let h2 = crc32c::crc32c_append(0x5a5a_5a5a, b);
        self.dir
            .join(format!("{PENDING_PREFIX}{h1:08x}{h2:08x}{PENDING_SUFFIX}"))
    }

    /// Keeps (or replaces) the pending restore of `config`'s VM: `blob`
    /// whole, `consumed` of its stream entries handled; atomically.
    pub fn save_pending(
        &self,
        config: &VmConfig,
        consumed: u64,
        loaded_at_us: u64,
        blob: &[u8],
    ) -> Result<(), ServiceError> {
        let path = self.pending_path(&config.vm);
        let header = serde_json::to_vec(&PendingHeader {
            config: config.clone(),
            consumed,
            loaded_at_us,
        })
        .map_err(|e| ServiceError::Persist {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        let mut b = Vec::with_capacity(12 + header.len() + blob.len());
        b.extend_from_slice(&PENDING_MAGIC);
        b.extend_from_slice(&(header.len() as u32).to_le_bytes());
        b.extend_from_slice(&header);
        b.extend_from_slice(blob);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        self.replace(&path, &b)
    }

    pub fn remove_pending(&self, vm: &str) -> Result<(), ServiceError> {
        let path = self.pending_path(vm);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ServiceError::Persist { path, source: e }),
        }
    }

    /// Every pending restore in the state directory. A file that cannot be
    /// read back is moved aside (never deleted) and reported in its place.
    pub fn load_pending(&self) -> Vec<Result<PendingRestore, ServiceError>> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = dir
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(PENDING_PREFIX) && n.ends_with(PENDING_SUFFIX))
            })
            .collect();
        paths.sort();
        paths.into_iter().map(|p| self.read_pending(&p)).collect()
    }

    fn read_pending(&self, path: &Path) -> Result<PendingRestore, ServiceError> {
        let b = std::fs::read(path).map_err(|source| ServiceError::Persist {
            path: path.to_path_buf(),
            source,
        })?;
        let parse = || -> Result<PendingRestore, String> {
            if b.len() < 12 || b[..4] != PENDING_MAGIC {
                return Err("not a pending-restore file".into());
            }
            let (body, crc) = b.split_at(b.len() - 4);
            if crc32c::crc32c(body).to_le_bytes() != crc {
                return Err("checksum mismatch".into());
            }
            let n = u32::from_le_bytes([body[4], body[5], body[6], body[7]]) as usize;
            let header = body
                .get(8..8usize.saturating_add(n))
                .ok_or_else(|| format!("declares a {n}-byte header it does not hold"))?;
            let h: PendingHeader = serde_json::from_slice(header).map_err(|e| e.to_string())?;
            if self.pending_path(&h.config.vm) != path {
                return Err(format!(
                    "holds the restore of VM '{}'",
                    h.config.vm.escape_debug()
                ));
            }
            Ok(PendingRestore {
                config: h.config,
                consumed: h.consumed,
                loaded_at_us: h.loaded_at_us,
                blob: body[8 + n..].to_vec(),
            })
        };
        parse().map_err(|reason| {
            let aside = path.with_extension("pending.corrupt");
            let _ = std::fs::rename(path, &aside);
            ServiceError::CorruptState {
                what: "pending restore",
                path: path.to_path_buf(),
                moved_to: aside,
                reason,
            }
        })
    }
}

const IDS_MAGIC: [u8; 4] = *b"CTVI";
/// A saved-ids file that names its VM (long names, see [`Store::ids_path`]).
const IDS_NAMED_MAGIC: [u8; 4] = *b"CTVN";

/// VM names up to this many bytes keep the plain hex file name:
/// `.saved-<hex>.ids.<pid>.tmp` (the temporary file) then stays within
/// NAME_MAX (255) for any pid.
pub const IDS_HEX_NAME_MAX: usize = 110;
/// Bytes of a longer name kept in hex before the hash.
const IDS_HEX_PREFIX: usize = 64;

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::options::VmConfig;

    #[test]
    fn round_trip_and_corrupt_file_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("sub"));
        assert!(store.load().unwrap().is_empty());
        let a = VmConfig::from_options("100", &[]).unwrap();
        let b = VmConfig::from_options("7", &[]).unwrap();
        store.save(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(store.load().unwrap(), vec![a, b]);

        std::fs::write(store.path(), b"{not json").unwrap();
        let e = store.load().unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "registrations in {} could not be read (moved to {}.corrupt)",
                store.path().display(),
                store.path().display()
            )),
            "{e}"
        );
        assert!(!store.path().exists());
        assert!(store.path().with_extension("json.corrupt").exists());
        assert!(store.load().unwrap().is_empty());
    }

    #[test]
    fn pending_restore_round_trips_and_a_damaged_one_is_moved_aside() {
        let save = |s: &Store, p: &PendingRestore| {
            s.save_pending(&p.config, p.consumed, p.loaded_at_us, &p.blob)
                .unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        assert!(store.load_pending().is_empty());
        let long = "v".repeat(250);
        let mut p = PendingRestore {
            config: VmConfig::from_options("100", &[]).unwrap(),
            consumed: 128,
            loaded_at_us: 1_700_000_000_000_000,
            blob: vec![1, 2, 3, 0, 255],
        };
        save(&store, &p);
        let q = PendingRestore {
            config: VmConfig::from_options(
                &long,
                &[
                    ("mark".to_string(), crate::service::OptValue::U32(7)),
                    (
                        "id".to_string(),
                        crate::service::OptValue::Str("long".into()),
                    ),
                ],
            )
            .unwrap(),
            blob: Vec::new(),
            ..p.clone()
        };
        save(&store, &q);
        let mut got: Vec<PendingRestore> = store
            .load_pending()
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        got.sort_by_key(|p| p.config.vm.len());
        assert_eq!(got, vec![p.clone(), q.clone()]);
        // A later save of the same VM replaces it.
        p.consumed = 4096;
        save(&store, &p);
        assert_eq!(store.load_pending().len(), 2);
        store.remove_pending(&long).unwrap();
        store.remove_pending(&long).unwrap();
        let got: Vec<PendingRestore> = store
            .load_pending()
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(got, vec![p.clone()]);
        // One flipped byte: refused, moved aside, gone from the list after.
        let path = store.pending_path("100");
        let mut b = std::fs::read(&path).unwrap();
        b[10] ^= 1;
        std::fs::write(&path, &b).unwrap();
        let e = store.load_pending().pop().unwrap().unwrap_err().to_string();
        assert!(
            e.contains("pending restore in") && e.ends_with("checksum mismatch"),
            "{e}"
        );
        assert!(store.load_pending().is_empty());
        assert!(path.with_extension("pending.corrupt").exists());
        // A file renamed to another VM's name is not taken for that VM.
        save(&store, &p);
        std::fs::rename(store.pending_path("100"), store.pending_path("7")).unwrap();
        let e = store.load_pending().pop().unwrap().unwrap_err().to_string();
        assert!(e.ends_with("holds the restore of VM '100'"), "{e}");
    }

    #[test]
    fn saved_ids_round_trip_and_corrupt_file_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        assert!(store.load_ids("100").unwrap().is_empty());
        store.save_ids("100", &[7, 1, u32::MAX]).unwrap();
        store.save_ids("vm/../x", &[3]).unwrap();
        assert_eq!(store.load_ids("100").unwrap(), vec![7, 1, u32::MAX]);
        assert_eq!(store.load_ids("vm/../x").unwrap(), vec![3]);
        assert!(store.ids_path("vm/../x").starts_with(dir.path()));
        // An empty list removes the file.
        store.save_ids("vm/../x", &[]).unwrap();
        assert!(!store.ids_path("vm/../x").exists());
        // A damaged file is refused, moved aside, and reads as none after.
        let p = store.ids_path("100");
        let mut b = std::fs::read(&p).unwrap();
        b[9] ^= 1;
        std::fs::write(&p, &b).unwrap();
        let e = store.load_ids("100").unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        assert!(p.with_extension("ids.corrupt").exists());
        assert!(store.load_ids("100").unwrap().is_empty());
        store.remove_ids("100").unwrap();
    }

    #[test]
    fn long_vm_names_fit_name_max_and_never_share_ids() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let edge = "e".repeat(IDS_HEX_NAME_MAX);
        let a = "a".repeat(255);
        let b = format!("{}b", "a".repeat(254));
        for (vm, ids) in [(&edge, vec![1]), (&a, vec![2, 3]), (&b, vec![4])] {
            let p = store.ids_path(vm);
            let name = p.file_name().unwrap().len();
            assert!(name + 20 <= 255, "{} is {name} bytes", p.display());
            store.save_ids(vm, &ids).unwrap();
            assert_eq!(store.load_ids(vm).unwrap(), ids);
        }
        assert_ne!(store.ids_path(&a), store.ids_path(&b));
        // The plain name is unchanged up to the edge (older files read).
        assert_eq!(
            store.ids_path(&edge).file_name().unwrap().to_string_lossy(),
            format!("saved-{}.ids", "65".repeat(IDS_HEX_NAME_MAX))
        );
        // A file under a long name's path that names another VM is refused.
        std::fs::copy(store.ids_path(&a), store.ids_path(&b)).unwrap();
        let e = store.load_ids(&b).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("holds the ids of VM '{a}'")),
            "{e}"
        );
        // What an older version wrote for a 115-byte name is still found.
        let old = "o".repeat(115);
        let legacy = dir.path().join(format!("saved-{}.ids", "6f".repeat(115)));
        Store::new(dir.path()).save_ids("x", &[9]).unwrap();
        std::fs::rename(store.ids_path("x"), &legacy).unwrap();
        assert_eq!(store.load_ids(&old).unwrap(), vec![9]);
        store.remove_ids(&old).unwrap();
        assert!(!legacy.exists());
    }
}

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
                    path,
                    moved_to: aside,
                    reason,
                })
            }
        }
    }

    /// Replaces the file atomically: write a temporary file in the same
    /// directory, fsync it, rename it over the old one, fsync the directory.
    /// A crash at any point leaves either the old or the new list.
    pub fn save(&self, vms: &[VmConfig]) -> Result<(), ServiceError> {
        let path = self.path();
        let err = |source| ServiceError::Persist {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        let data = OnDisk {
            version: VERSION,
            vms: vms.to_vec(),
        };
        let bytes = serde_json::to_vec_pretty(&data).map_err(|e| err(std::io::Error::other(e)))?;
        let tmp = self
            .dir
            .join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            sync_dir(&self.dir)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(e)
        })
    }
}

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
}

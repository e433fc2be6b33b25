//! State format v1 (`docs/state-format.md`), the byte budget with its
//! truncation priority, and the legacy conntrack(8) `-o save` text of the
//! Proxmox Perl helper.

use crate::entry::Entry;

/// QEMU's per-helper limit on the `Save()` payload.
pub const QEMU_LIMIT: usize = 1_048_576;

/// Wire format of an encoded state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// State format v1: compact records, zstd, checksum.
    Binary,
    /// conntrack(8) `-o save` lines with ` --mark N` appended, as the
    /// Proxmox Perl helper sends and expects.
    ConntrackSave,
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("state format not implemented yet")]
    Unimplemented,
}

/// Options for [`encode`].
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    /// Hard ceiling for the whole output, headers included.
    pub limit: usize,
    pub format: Format,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            limit: QEMU_LIMIT,
            format: Format::Binary,
        }
    }
}

/// Result of [`encode`]: never empty, never above the limit.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub kept: usize,
    pub dropped: usize,
}

/// Result of [`decode`]: the whole blob was validated before this exists.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub entries: Vec<Entry>,
    pub format: Format,
    /// The sender had to drop entries to fit its budget.
    pub truncated: bool,
    /// Entries the sender dropped, when it recorded the number.
    pub dropped: Option<u64>,
}

pub fn encode(_entries: &[Entry], _opts: &EncodeOptions) -> Result<Encoded, FormatError> {
    Err(FormatError::Unimplemented)
}

pub fn decode(_bytes: &[u8]) -> Result<Decoded, FormatError> {
    Err(FormatError::Unimplemented)
}

//! Logging set-up of the daemon: structured journald lines with bare field
//! names (`journalctl VMID=100`), and a readable stderr log whenever stderr
//! is not already the journal.

use std::os::fd::AsFd;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// True when systemd connected our stderr to the journal (JOURNAL_STREAM
/// names its device and inode), so a stderr log would duplicate every line.
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let stderr = std::io::stderr();
    match nix::sys::stat::fstat(stderr.as_fd()) {
        Ok(st) => dev == st.st_dev.to_string() && ino == st.st_ino.to_string(),
        Err(_) => false,
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides the default `info`.
pub fn init(identifier: &str) {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let journald = tracing_journald::layer().ok().map(|l| {
        // INFO is routine here (one line per Save/Load), so it maps to
        // journald's "info" (6), not the crate default "notice" (5).
        let prio = tracing_journald::PriorityMappings {
            info: tracing_journald::Priority::Informational,
            debug: tracing_journald::Priority::Debug,
            ..tracing_journald::PriorityMappings::new()
        };
        l.with_field_prefix(None)
            .with_syslog_identifier(identifier.to_string())
            .with_priority_mappings(prio)
            .with_filter(filter())
    });
    let stderr = (journald.is_none() || !stderr_is_journal()).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_filter(filter())
    });
    let _ = tracing_subscriber::registry()
        .with(journald)
        .with(stderr)
        .try_init();
}

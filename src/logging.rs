//! Logging set-up of both services: structured journald lines with bare
//! field names (`journalctl VMID=100`, `journalctl -u
//! conntrack-vmstate-helper OP=save-state`), and a readable stderr log
//! whenever stderr is not already the journal (by hand, in tests).

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Installs the global subscriber; `identifier` becomes SYSLOG_IDENTIFIER.
/// `RUST_LOG` overrides the default `info`.
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
    let stderr = (journald.is_none() || !crate::systemd::stderr_is_journal()).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            // Escape codes only for a person at a terminal, not in log files.
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter())
    });
    let _ = tracing_subscriber::registry()
        .with(journald)
        .with(stderr)
        .try_init();
}

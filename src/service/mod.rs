//! The VM registry behind the daemon: registrations, persistence, and the
//! Save/Load policy that never fails a migration. No zbus in here.

//! This process's threads by name, from `/proc/self/task`: what tests and
//! measurements read of the threads the product names (`ct-events`,
//! `ct-background`).

use std::path::PathBuf;

/// One thread of this process.
pub struct Task {
    pub tid: i32,
    /// Its `/proc/self/task/TID` directory.
    pub dir: PathBuf,
}

impl Task {
    /// Field `n` (1-based, as in proc(5)) of its `stat`, counted after the
    /// `)` that ends the name, so a name with spaces cannot shift it; None
    /// once the thread is gone.
    pub fn stat_field(&self, n: usize) -> Option<String> {
        let stat = std::fs::read_to_string(self.dir.join("stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        rest.split_whitespace()
            .nth(n.checked_sub(3)?)
            .map(str::to_owned)
    }
}

/// The threads of this process named `name` right now.
pub fn named(name: &str) -> Vec<Task> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse().ok()?;
            Some(Task { tid, dir: t.path() })
        })
        .collect()
}

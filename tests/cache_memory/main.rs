//! The warm cache's memory per entry, held to its bound: a binary of its
//! own because it counts every allocation of the process, which is only
//! sound while no other test runs beside it (tests/kernel runs its tests
//! in parallel). Needs root, like the kernel tier.

extern crate testkit as common;

use common::memory::{cache_memory, Counting};

#[global_allocator]
static A: Counting = Counting;

/// What one cached entry may cost (the kernel's own entry is ~300 B): a
/// host evacuation migrates several 100k-entry VMs at once.
const MAX_BYTES_PER_ENTRY: f64 = 160.0;

#[test]
fn cached_entries_cost_at_most_160_bytes_each() {
    common::needs!(kernel);
    let m = cache_memory(20_000, 3);
    println!(
        "MEASURE memory: {} entries, {} bytes, {:.0} B/entry (base: {} records, {} B)",
        m.entries,
        m.bytes,
        m.per_entry(),
        m.base_records,
        m.base_bytes
    );
    assert!(m.base_records > 0, "the event thread built no base");
    assert!(
        m.per_entry() <= MAX_BYTES_PER_ENTRY,
        "{:.0} B per cached entry, more than {MAX_BYTES_PER_ENTRY}",
        m.per_entry()
    );
}

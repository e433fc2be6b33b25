//! What the warm cache holds per entry, measured: an allocation-counting
//! global allocator ([`Counting`], declared by the binary that measures)
//! and [`cache_memory`], the bytes a [`CachedAccess`] allocates for one
//! selector of the realistic mix, pre-encoded base included.
//!
//! Sound only while nothing else in the process allocates meanwhile: the
//! measuring binary runs one test at a time (a binary of its own, or
//! `--test-threads 1`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use conntrack_vmstate::access::ConntrackAccess;
use conntrack_vmstate::cache::{CacheConfig, CachedAccess};
use conntrack_vmstate::ctnetlink::Ctnetlink;
use conntrack_vmstate::entry::Selector;

use crate::netns::Netns;
use crate::population::{self, Spec};

static LIVE: AtomicIsize = AtomicIsize::new(0);

/// Bytes currently allocated through [`Counting`] (requested sizes: what
/// the program asks for, before the system allocator's own overhead).
pub fn live() -> isize {
    LIVE.load(Ordering::SeqCst)
}

/// The system allocator, counting live bytes.
pub struct Counting;

// SAFETY: delegates to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

/// One measurement of [`cache_memory`].
#[derive(Debug, Clone, Copy)]
pub struct CacheMemory {
    pub entries: usize,
    /// Allocated by the cache for them: tables, indexes, pre-encoded base.
    pub bytes: isize,
    /// Records in the pre-encoded base (0: none was built).
    pub base_records: usize,
    /// Its compressed size (part of `bytes`).
    pub base_bytes: usize,
}

impl CacheMemory {
    pub fn per_entry(&self) -> f64 {
        self.bytes as f64 / self.entries.max(1) as f64
    }
}

const MARK: u32 = 100;

/// Loads `n` entries of the realistic mix (plus 20 % of other marks) into
/// a fresh namespace with our create, while the cache listens, then counts
/// what watching their mark adds to the live bytes once the cache is warm
/// and holds its pre-encoded base. Only valid under a [`Counting`] global allocator.
pub fn cache_memory(n: usize, seed: u64) -> CacheMemory {
    let ns = Netns::new("cmmem");
    population::enable_labels(&ns.name);
    let pop = population::generate(Spec::new(n, MARK, seed));
    let open = || Ctnetlink::open_in_netns(Path::new(&ns.path())).expect("ctnetlink");
    let sel = Selector::mark(MARK);
    let cache = CachedAccess::new(open(), CacheConfig::default()).expect("cache");
    // The thread, its sockets and buffers first, so that only the tables
    // are counted; and a listener before the entries, so that they carry
    // the event extension and the cache can trust them (and build a base).
    let other = Selector::mark(1);
    cache.watch(&other, true).expect("watch");
    assert!(cache.wait_trusted(&other, crate::WAIT));
    let direct = open();
    for part in [&pop.vm_entries, &pop.noise_entries] {
        for chunk in part.chunks(50_000) {
            let r = direct.create(chunk).expect("create");
            assert_eq!(r.created, chunk.len() as u64, "not all created: {r:?}");
        }
    }
    drop(direct);
    std::thread::sleep(Duration::from_millis(500));
    let before = live();
    cache.watch(&sel, true).expect("watch");
    assert!(cache.wait_trusted(&sel, crate::WAIT));
    // The event thread builds the base by itself once the selector is warm.
    let end = Instant::now() + crate::WAIT;
    while cache.base_info(&sel).is_none() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = live();
    let entries = cache.cached_len(&sel).expect("watched");
    assert_eq!(entries, pop.vm_count());
    let (base_records, base_bytes) = cache
        .base_info(&sel)
        .map_or((0, 0), |b| (b.records, b.bytes));
    drop(cache);
    CacheMemory {
        entries,
        bytes: after - before,
        base_records,
        base_bytes,
    }
}

//! Large vectors on the downtime path (100k decoded or cached entries are
//! ~20 MB): first touching 4 KiB pages costs one page fault each, measured
//! at ~8 ms for 20 MB on a 2-core VM, more than decoding them. Asking for
//! transparent huge pages cuts that to ~3 ms where the host allows them
//! (`transparent_hugepage` = `always` or `madvise`); elsewhere it is a no-op.

/// Below this many bytes the hint is not worth a syscall.
const HUGE_MIN_BYTES: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// `Vec::with_capacity(n)`, with its storage marked for huge pages when it
/// is large.
pub fn with_capacity<T>(n: usize) -> Vec<T> {
    let v: Vec<T> = Vec::with_capacity(n);
    let bytes = v.capacity().saturating_mul(std::mem::size_of::<T>());
    if bytes >= HUGE_MIN_BYTES {
        hint_huge(v.as_ptr() as usize, bytes);
    }
    v
}

#[cfg(target_os = "linux")]
fn hint_huge(start: usize, len: usize) {
    // Only whole 2 MiB pages inside the allocation: the hint must not touch
    // memory the allocator handed to anyone else.
    let a = start.saturating_add(HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    let end = start.saturating_add(len) & !(HUGE_PAGE - 1);
    if end > a {
        // SAFETY: [a, end) lies inside the vector's own, live allocation;
        // MADV_HUGEPAGE only changes how its pages are backed, never their
        // contents. A failure (THP off, old kernel) just leaves small pages.
        unsafe {
            libc::madvise(a as *mut libc::c_void, end - a, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn hint_huge(_start: usize, _len: usize) {}

#[cfg(test)]
mod tests {
    #[test]
    fn large_and_small_vectors_work_as_usual() {
        for n in [0usize, 10, 1 << 20] {
            let mut v: Vec<u64> = super::with_capacity(n);
            assert!(v.capacity() >= n);
            v.extend(0..n as u64);
            assert_eq!(
                v.iter().sum::<u64>(),
                (n as u64) * (n as u64).saturating_sub(1) / 2
            );
        }
    }
}

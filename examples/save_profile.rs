//! Where Save and Load time goes at N entries (default 100k) of the
//! synthetic mix: a copy out of a hash map (what the warm cache did before
//! it encoded from its own tables), encode, decode.
//! Medians of 9 runs, wall and this thread's CPU time (the machine is
//! shared). `cargo run --release --example save_profile [-- N]`

use std::collections::HashMap;
use std::time::Instant;

use conntrack_vmstate::entry::Entry;
use conntrack_vmstate::format::{self, bigvec, EncodeOptions};

fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

#[derive(Default)]
struct Stat(Vec<(f64, f64)>);

impl Stat {
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let (t, c) = (Instant::now(), cpu_ms());
        let v = f();
        self.0.push((t.elapsed().as_secs_f64() * 1e3, cpu_ms() - c));
        v
    }
    fn show(&self) -> String {
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        format!(
            "{:.2} / {:.2}",
            med(self.0.iter().map(|x| x.0).collect()),
            med(self.0.iter().map(|x| x.1).collect())
        )
    }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    // Like the warm cache: entries live in a hash map, in its order.
    let map: HashMap<u64, Entry> = testkit::population::entries(n, 42, 100)
        .into_iter()
        .enumerate()
        .map(|(i, e)| ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15), e))
        .collect();
    let mut scan = Stat::default();
    let (mut copy, mut enc, mut dec, mut free) = (
        Stat::default(),
        Stat::default(),
        Stat::default(),
        Stat::default(),
    );
    let mut bytes = 0;
    for _ in 0..9 {
        // A pass that only reads each entry (the cache's lookup check).
        let stale = scan.time(|| map.values().filter(|e| e.timeout <= 2).count());
        assert!(stale <= n);
        let entries = copy.time(|| {
            let mut v: Vec<Entry> = bigvec::with_capacity(map.len());
            v.extend(map.values().cloned());
            v
        });
        let e = enc.time(|| format::encode(&entries, &EncodeOptions::default()).expect("encode"));
        bytes = e.bytes.len();
        let d = dec.time(|| format::decode(&e.bytes).expect("decode"));
        assert_eq!(d.entries.len(), n);
        free.time(|| drop((entries, d)));
    }
    println!(
        "N {n}: blob {bytes} B | scan map {} | copy out of map {} | encode {} | decode {} | free both {} (ms wall / CPU, medians of 9)",
        scan.show(),
        copy.show(),
        enc.show(),
        dec.show(),
        free.show()
    );
}

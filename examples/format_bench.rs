//! One-off measurement of state format v1 on the synthetic realistic mix
//! (`testkit::population::entries`): bytes/entry, entries in 1 MiB, encode and decode
//! times. Wall time and this thread's CPU time are both reported (best of
//! 9), because the machine is shared.
//! `cargo run --release --example format_bench`

use std::time::Instant;

use conntrack_vmstate::format::{self, EncodeOptions, Format};

fn cpu_now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

/// (best wall ms, best CPU ms, last result)
fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, f64, T) {
    let (mut wall, mut cpu) = (f64::MAX, f64::MAX);
    let mut last = None;
    for _ in 0..runs {
        let (t, c) = (Instant::now(), cpu_now());
        let v = f();
        cpu = cpu.min(cpu_now() - c);
        wall = wall.min(t.elapsed().as_secs_f64() * 1e3);
        last = Some(v);
    }
    (wall, cpu, last.expect("runs > 0"))
}

fn main() {
    println!("| N | blob bytes | B/entry | encode ms wall / CPU | decode ms wall / CPU | text (Perl format) bytes | text entries in 1 MiB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &[1_000usize, 5_000, 20_000, 100_000] {
        let entries = testkit::population::entries(n, 42 + n as u64, 100);
        let opts = EncodeOptions {
            limit: usize::MAX,
            format: Format::Binary,
        };
        let (ew, ec, enc) = best_of(9, || format::encode(&entries, &opts).expect("encode"));
        let (dw, dc, dec) = best_of(9, || format::decode(&enc.bytes).expect("decode"));
        assert_eq!(dec.entries.len(), n);
        let text = format::encode(
            &entries,
            &EncodeOptions {
                limit: usize::MAX,
                format: Format::ConntrackSave,
            },
        )
        .expect("text");
        let text1m = format::encode(
            &entries,
            &EncodeOptions {
                limit: format::QEMU_LIMIT,
                format: Format::ConntrackSave,
            },
        )
        .expect("text");
        println!(
            "| {n} | {} | {:.2} | {ew:.2} / {ec:.2} | {dw:.2} / {dc:.2} | {} | {} |",
            enc.bytes.len(),
            enc.bytes.len() as f64 / n as f64,
            text.bytes.len(),
            text1m.kept
        );
    }
    println!();
    println!("| input N | kept in 1 MiB | dropped | blob bytes | B/kept entry | encode with cut ms wall / CPU |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for &n in &[100_000usize, 150_000, 300_000] {
        let entries = testkit::population::entries(n, 7, 100);
        let (w, c, enc) = best_of(5, || {
            format::encode(&entries, &EncodeOptions::default()).expect("encode")
        });
        assert!(enc.bytes.len() <= format::QEMU_LIMIT);
        println!(
            "| {n} | {} | {} | {} | {:.2} | {w:.1} / {c:.1} |",
            enc.kept,
            enc.dropped,
            enc.bytes.len(),
            enc.bytes.len() as f64 / enc.kept as f64,
        );
    }
}

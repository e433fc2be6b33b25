//! One-off measurement of state format v1 on the synthetic realistic mix:
//! bytes/entry, entries in 1 MiB, encode and decode times.
//! `cargo run --release --example format_bench`

use std::time::Instant;

use conntrack_vmstate::format::{self, synth, EncodeOptions, Format};

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::MAX;
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
        last = Some(v);
    }
    (best, last.expect("runs > 0"))
}

fn main() {
    println!("| N | bytes | B/entry | encode ms (best of 7) | decode ms (best of 7) | text bytes | text kept in 1 MiB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &[1_000usize, 5_000, 20_000, 100_000] {
        let entries = synth::population(n, 42 + n as u64, 100);
        let opts = EncodeOptions {
            limit: usize::MAX,
            format: Format::Binary,
        };
        let (enc_ms, enc) = best_of(7, || format::encode(&entries, &opts).expect("encode"));
        let (dec_ms, dec) = best_of(7, || format::decode(&enc.bytes).expect("decode"));
        assert_eq!(dec.entries.len(), n);
        let text = format::encode(
            &entries,
            &EncodeOptions {
                limit: format::QEMU_LIMIT,
                format: Format::ConntrackSave,
            },
        )
        .expect("text");
        println!(
            "| {n} | {} | {:.2} | {enc_ms:.2} | {dec_ms:.2} | {} | {} |",
            enc.bytes.len(),
            enc.bytes.len() as f64 / n as f64,
            text.bytes.len(),
            text.kept
        );
    }
    // Capacity: how many entries of the mix one QEMU payload holds.
    for &n in &[150_000usize, 300_000] {
        let entries = synth::population(n, 7, 100);
        let (ms, enc) = best_of(3, || {
            format::encode(&entries, &EncodeOptions::default()).expect("encode")
        });
        println!(
            "input {n}: kept {} dropped {} in {} bytes ({:.2} B/entry), encode with cut {ms:.1} ms",
            enc.kept,
            enc.dropped,
            enc.bytes.len(),
            enc.bytes.len() as f64 / enc.kept as f64
        );
    }
}

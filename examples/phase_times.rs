use conntrack_vmstate::format::{binary, priority, synth};
use std::time::Instant;
fn main() {
    let e = synth::population(100_000, 142, 100);
    for _ in 0..3 {
        let t = Instant::now();
        let mut keyed: Vec<(u64, u32)> = e
            .iter()
            .enumerate()
            .filter(|(_, x)| binary::representable(x))
            .map(|(i, x)| (!priority::value_key(x), i as u32))
            .collect();
        let t1 = t.elapsed();
        keyed.sort_unstable();
        let t2 = t.elapsed();
        let r: Vec<_> = keyed.iter().map(|&(_, i)| &e[i as usize]).collect();
        let mut enc = binary::Encoder::new(&r).unwrap();
        let t3 = t.elapsed();
        let b = enc.blob(r.len(), 0).unwrap();
        let t4 = t.elapsed();
        let z = zstd::bulk::compress(&b[..], 1).unwrap();
        let t5 = t.elapsed();
        println!(
            "keys {:?} sort {:?} cols {:?} blob {:?} (rezstd of blob {:?}, {} B)",
            t1,
            t2 - t1,
            t3 - t2,
            t4 - t3,
            t5 - t4,
            z.len()
        );
    }
}

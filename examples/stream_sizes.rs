fn main() {
    let mut e = testkit::population::entries(100_000, 142, 100);
    conntrack_vmstate::format::sort_by_priority(&mut e);
    let r: Vec<_> = e.iter().collect();
    let mut t = 0;
    for (n, raw, z) in conntrack_vmstate::format::testing::debug_stream_sizes(&r) {
        t += z;
        println!("{n:8} raw {raw:8} zstd {z:8} {:.2} B/e", z as f64 / 1e5);
    }
    println!("total {t}");
}

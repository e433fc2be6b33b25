//! Writes a few valid blobs (binary and text) as fuzzing seeds into the
//! directory given as the first argument.
use conntrack_vmstate::format::{self, EncodeOptions, Format};
fn main() {
    let dir = std::env::args().nth(1).expect("usage: fuzz_seeds DIR");
    for (i, n) in [0usize, 1, 3, 20, 200].into_iter().enumerate() {
        let v = testkit::population::entries(n, i as u64, 100);
        for (f, name) in [(Format::Binary, "bin"), (Format::ConntrackSave, "txt")] {
            let e = format::encode(
                &v,
                &EncodeOptions {
                    limit: 1 << 20,
                    format: f,
                },
            )
            .expect("encode");
            std::fs::write(format!("{dir}/seed-{n}.{name}"), &e.bytes).expect("write seed");
        }
    }
}

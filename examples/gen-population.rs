//! Prints a deterministic, realistic conntrack population as conntrack(8)
//! `-I` lines (for `conntrack --load-file`), for the demo and benchmarks.
//!
//! Labelled lines come last: conntrack 1.4.7 `--load-file` crashes on any
//! line that follows a `--label-add` line, so load those one process each.
//! The window-scale subset the tests create through ctnetlink is printed as
//! plain lines (conntrack(8) cannot set wscale).

use clap::Parser;
use std::io::Write;
use testkit::population;

#[derive(Parser)]
struct Args {
    /// Entries of the VM.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// The VM's conntrack mark.
    #[arg(long, default_value_t = 1)]
    mark: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Entries of other marks, as a fraction of N.
    #[arg(long, default_value_t = 0.2)]
    noise: f64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let pop = population::generate(population::Spec {
        n: a.n,
        mark: a.mark,
        seed: a.seed,
        noise: a.noise,
    });
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for l in pop.all_lines() {
        writeln!(out, "{l}")?;
    }
    out.flush()?;
    Ok(())
}

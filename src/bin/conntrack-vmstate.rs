//! `conntrack-vmstate`: the admin and management CLI.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = conntrack_vmstate::cli::Cli::parse();
    match conntrack_vmstate::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conntrack-vmstate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

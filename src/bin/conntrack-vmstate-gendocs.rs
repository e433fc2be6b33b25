//! Build-time generator (not installed): man pages and shell completions of
//! `conntrack-vmstate`, derived from the same clap definitions as `--help`,
//! so the packaged documentation cannot drift from the binary.
//!
//! Usage: `conntrack-vmstate-gendocs OUTDIR` writes
//! `OUTDIR/man/*.1` (the command and one page per subcommand),
//! `OUTDIR/man/conntrack-vmstate-helper.8`, `OUTDIR/man/conntrack-vmstated.8` and
//! `OUTDIR/completions/{conntrack-vmstate.bash,_conntrack-vmstate,conntrack-vmstate.fish}`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        bail!("usage: conntrack-vmstate-gendocs OUTDIR");
    };
    let out = PathBuf::from(out);
    let man = out.join("man");
    let comp = out.join("completions");
    for d in [&man, &comp] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let cmd = conntrack_vmstate::cli::Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    // The libexec programs are started by systemd, not by users: section 8.
    for (page, cmd) in [
        (
            "conntrack-vmstate-helper.8",
            conntrack_vmstate::args::HelperArgs::command(),
        ),
        (
            "conntrack-vmstated.8",
            conntrack_vmstate::args::DaemonArgs::command(),
        ),
    ] {
        let page = man.join(page);
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd).section("8").render(&mut buf)?;
        std::fs::write(&page, buf).with_context(|| format!("writing {}", page.display()))?;
    }
    let name = cmd.get_name().to_owned();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut c = cmd.clone();
        clap_complete::generate_to(shell, &mut c, &name, &comp)
            .with_context(|| format!("writing {shell} completion to {}", comp.display()))?;
    }
    Ok(())
}

//! Command line of `conntrack-vmstate`. The `///` comments on the fields
//! below are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub mod engine;
pub mod manage;
pub mod migrate;
pub mod proxmox;

/// Carry a VM's conntrack entries through QEMU live migration.
#[derive(Debug, Parser)]
#[command(name = "conntrack-vmstate", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Dump the entries of one mark from this network namespace into a state blob.
    Save(SaveArgs),
    /// Create the entries of a state blob (binary or conntrack(8) text) in this network namespace.
    Load(LoadArgs),
    /// Show the entries of a state blob, like `conntrack -L`.
    Inspect(InspectArgs),
    /// Delete every entry of one mark in this network namespace.
    Flush(FlushArgs),
    /// Register a VM with the conntrack-vmstated daemon (before migrating, on both hosts).
    Register(RegisterArgs),
    /// Unregister a VM; with --flush, delete the entries saved for it (source, after success).
    Unregister(UnregisterArgs),
    /// Show registered VMs and their last Save/Load.
    Status(StatusArgs),
    /// Before a migration, on both hosts: serve the VM (registering it, lifecycle migration, if new), warm its cache, bind and wire its QEMU; returns when Save would be fast.
    Prepare(PrepareArgs),
    /// After a migration succeeded, on both hosts: the source deletes exactly what it saved, the destination keeps its entries; QEMU unwired, the VM holds no bus connection again.
    Finish(StepArgs),
    /// After a migration failed or was cancelled, on both hosts: the source keeps everything, the destination deletes what its Load created unless the VM runs there.
    Abort(StepArgs),
    /// Proxmox VE: let `qm migrate --with-conntrack-state` use conntrack-vmstate (enable, disable, status).
    Proxmox(ProxmoxArgs),
    /// Serve one Proxmox VE VM for qemu-server; what pve-dbus-vmstate@<VMID>.service runs once enabled.
    ProxmoxHelper(ProxmoxHelperArgs),
}

/// Output encoding of `save`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// State format v1: compact, compressed, checksummed.
    Binary,
    /// conntrack(8) `-o save` lines plus ` --mark N`, for hosts running the Perl helper.
    ConntrackSave,
}

impl FormatArg {
    /// The name `--format` takes (also the daemon's `format` option).
    pub fn name(self) -> &'static str {
        match self {
            FormatArg::Binary => "binary",
            FormatArg::ConntrackSave => "conntrack-save",
        }
    }
}

impl From<FormatArg> for crate::format::Format {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Binary => crate::format::Format::Binary,
            FormatArg::ConntrackSave => crate::format::Format::ConntrackSave,
        }
    }
}

/// A mark or mask in decimal or `0x` hexadecimal, as firewall rules and
/// conntrack(8) write them.
fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?} is not a 32-bit number (decimal or 0x hex): {e}"))
}

#[derive(Debug, Args)]
pub struct SaveArgs {
    /// Save entries whose conntrack mark equals this (after --mark-mask).
    #[arg(long, value_parser = parse_u32)]
    pub mark: u32,
    /// Mask applied to the entry's mark before comparing.
    #[arg(long, default_value_t = u32::MAX, value_parser = parse_u32)]
    pub mark_mask: u32,
    /// Only entries of this conntrack zone.
    #[arg(long)]
    pub zone: Option<u16>,
    /// Byte budget of the output; least valuable entries are dropped to fit.
    #[arg(long, default_value_t = crate::format::QEMU_LIMIT)]
    pub limit: usize,
    /// Output encoding.
    #[arg(long, value_enum, default_value_t = FormatArg::Binary)]
    pub format: FormatArg,
    /// Write the blob here instead of standard output.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Read the blob from here instead of standard input.
    #[arg(short, long)]
    pub input: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The state blob to show (`-` for standard input).
    pub file: PathBuf,
    /// Print JSON, one object per entry plus a summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FlushArgs {
    /// Delete entries whose conntrack mark equals this (after --mark-mask).
    #[arg(long, value_parser = parse_u32)]
    pub mark: u32,
    /// Mask applied to the entry's mark before comparing.
    #[arg(long, default_value_t = u32::MAX, value_parser = parse_u32)]
    pub mark_mask: u32,
    /// Only entries of this conntrack zone.
    #[arg(long)]
    pub zone: Option<u16>,
}

#[derive(Debug, Args)]
pub struct ManagerArgs {
    /// D-Bus address of the bus the daemon's manager is on (default: the system bus).
    #[arg(long, env = "CONNTRACK_VMSTATE_MANAGER_ADDRESS")]
    pub manager_address: Option<String>,
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The VM, e.g. its numeric id; used in object paths, logs and the default Id.
    pub vmid: String,
    /// VMState Id QEMU sees (default: conntrack-vmstate-<VMID>).
    #[arg(long)]
    pub id: Option<String>,
    /// Conntrack mark of the VM's entries (default: VMID, when numeric).
    #[arg(long, value_parser = parse_u32)]
    pub mark: Option<u32>,
    /// Mask applied to entries' marks before comparing.
    #[arg(long, value_parser = parse_u32)]
    pub mark_mask: Option<u32>,
    /// Only entries of this conntrack zone.
    #[arg(long)]
    pub zone: Option<u16>,
    /// Bus of the VM's QEMU dbus-vmstate object (default: the system bus).
    #[arg(long)]
    pub bus_address: Option<String>,
    /// Encoding of Save: binary, or conntrack-save for a destination running the Perl helper.
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// When the VM is served: always (from register on), or migration (known only; served from `prepare` to `finish`/`abort`).
    #[arg(long, value_enum)]
    pub lifecycle: Option<LifecycleArg>,
    #[command(flatten)]
    pub manager: ManagerArgs,
    /// QMP socket of the VM's QEMU: bind Save and Load to it, and add the dbus-vmstate object (or set its id-list) once registered.
    #[arg(long)]
    pub qmp: Option<PathBuf>,
}

/// `--lifecycle` of `register`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LifecycleArg {
    /// Served on its bus from register to unregister.
    Always,
    /// Known only; served from `prepare` to `finish` or `abort`.
    Migration,
}

impl LifecycleArg {
    pub fn name(self) -> &'static str {
        match self {
            LifecycleArg::Always => "always",
            LifecycleArg::Migration => "migration",
        }
    }
}

/// Which end of a migration this host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// The host the VM leaves (Save).
    Source,
    /// The host the VM arrives on (Load).
    Destination,
}

impl RoleArg {
    pub fn name(self) -> &'static str {
        match self {
            RoleArg::Source => "source",
            RoleArg::Destination => "destination",
        }
    }
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Which end of the migration this host is.
    #[arg(long, value_enum)]
    pub role: RoleArg,
    #[command(flatten)]
    pub register: RegisterArgs,
}

#[derive(Debug, Args)]
pub struct StepArgs {
    /// The VM given to `prepare`.
    pub vmid: String,
    /// Which end of the migration this host is.
    #[arg(long, value_enum)]
    pub role: RoleArg,
    #[command(flatten)]
    pub manager: ManagerArgs,
    /// QMP socket of the VM's QEMU: delete its dbus-vmstate object first (and, on an aborted destination, ask whether the VM runs there).
    #[arg(long)]
    pub qmp: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UnregisterArgs {
    /// The VM given to `register`.
    pub vmid: String,
    /// Delete exactly the entries the last Save took (source side, after a successful migration).
    #[arg(long)]
    pub flush: bool,
    #[command(flatten)]
    pub manager: ManagerArgs,
    /// QMP socket of the VM's QEMU: delete its dbus-vmstate object first.
    #[arg(long)]
    pub qmp: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this VM.
    pub vmid: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub manager: ManagerArgs,
}

#[derive(Debug, Args)]
pub struct ProxmoxArgs {
    #[command(subcommand)]
    pub action: ProxmoxAction,
}

#[derive(Debug, Subcommand)]
pub enum ProxmoxAction {
    /// Install the drop-in that makes pve-dbus-vmstate@.service run `conntrack-vmstate proxmox-helper`.
    Enable(ProxmoxEnableArgs),
    /// Remove that drop-in: qemu-server's own Perl helper runs again.
    Disable(ProxmoxUnitArgs),
    /// Say whether the drop-in is installed, and with which state format.
    Status(ProxmoxUnitArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ProxmoxUnitArgs {
    /// systemd's directory for local unit configuration.
    #[arg(long, default_value = "/etc/systemd/system")]
    pub systemd_dir: PathBuf,
    /// Do not run `systemctl daemon-reload` afterwards.
    #[arg(long)]
    pub no_reload: bool,
}

#[derive(Debug, Args)]
pub struct ProxmoxEnableArgs {
    /// Encoding of Save: binary, or conntrack-save while any node still runs the Perl helper.
    #[arg(long, value_enum, default_value_t = FormatArg::Binary)]
    pub format: FormatArg,
    /// Install even though qemu-server's pve-dbus-vmstate@.service is not found.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub unit: ProxmoxUnitArgs,
}

#[derive(Debug, Args)]
pub struct ProxmoxHelperArgs {
    /// The Proxmox VE VM id; also its CONNMARK, as pve-firewall sets it.
    pub vmid: String,
    /// QMP socket of the VM's QEMU.
    #[arg(long, default_value = None, help = "QMP socket of the VM's QEMU [default: /run/qemu-server/<VMID>.qmp]")]
    pub qmp: Option<PathBuf>,
    /// Encoding of Save (Load reads both).
    #[arg(long, value_enum, env = "CONNTRACK_VMSTATE_PVE_FORMAT", default_value_t = FormatArg::Binary)]
    pub format: FormatArg,
    /// Bus of the VM's QEMU dbus-vmstate object (default: the system bus, as on Proxmox VE).
    #[arg(long)]
    pub bus_address: Option<String>,
    #[command(flatten)]
    pub manager: ManagerArgs,
}

/// Runs one parsed command; the binary turns the error into a message and a
/// non-zero exit.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Save(a) => engine::save(a),
        Command::Load(a) => engine::load(a),
        Command::Inspect(a) => engine::inspect(a),
        Command::Flush(a) => engine::flush(a),
        Command::Register(a) => manage::register(a),
        Command::Prepare(a) => migrate::prepare(a),
        Command::Finish(a) => migrate::finish(a),
        Command::Abort(a) => migrate::abort(a),
        Command::Unregister(a) => manage::unregister(a),
        Command::Status(a) => manage::status(a),
        Command::Proxmox(a) => match a.action {
            ProxmoxAction::Enable(a) => proxmox::enable(a),
            ProxmoxAction::Disable(a) => proxmox::disable(a),
            ProxmoxAction::Status(a) => proxmox::status(a),
        },
        Command::ProxmoxHelper(a) => proxmox::helper(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_take_decimal_and_hex() {
        let cli = Cli::try_parse_from([
            "conntrack-vmstate",
            "save",
            "--mark",
            "0x64",
            "--mark-mask",
            "0xFFFF",
        ])
        .expect("parses");
        let Command::Save(a) = cli.command else {
            panic!("not save: {cli:?}");
        };
        assert_eq!((a.mark, a.mark_mask), (100, 0xffff));
        let cli = Cli::try_parse_from(["conntrack-vmstate", "flush", "--mark", "4294967295"])
            .expect("parses");
        let Command::Flush(a) = cli.command else {
            panic!("not flush: {cli:?}");
        };
        assert_eq!((a.mark, a.mark_mask), (u32::MAX, u32::MAX));
        for bad in ["0x1_0000_0000", "0x100000000", "4294967296", "ten", "0x"] {
            let e = Cli::try_parse_from(["conntrack-vmstate", "save", "--mark", bad])
                .expect_err(bad)
                .to_string();
            assert!(
                e.contains(&format!(
                    "{bad:?} is not a 32-bit number (decimal or 0x hex)"
                )),
                "{bad}: {e}"
            );
        }
    }
}

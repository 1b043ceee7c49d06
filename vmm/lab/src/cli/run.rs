//! `vmm run`: one guest, its console, the exit table and the statistics.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use vmm::image::GuestImage;
use vmm::run::{exit_status, run};
use vmm::view::ViewKind;
use vmm::vm::{DedupPolicy, RunConfig};

use super::args::{guest_mem, parse_timeout, KsmArgs};
use super::stats_file::StatsFile;
use super::{print_out, report, CliError, STATUS_BAD_INPUT};
use crate::run_table::render_table;

pub(super) const AFTER_HELP: &str = "\
IMAGE is the name of a built-in guest (see `vmm images`) or a path to an ELF file
(a name containing '/' is always a path). The guest's console goes to standard output,
followed by the table; --stats-json writes the statistics document (schema 1, README.md).";

#[derive(Debug, clap::Args)]
pub(super) struct RunArgs {
    /// Built-in image name or path to an ELF64 x86-64 executable.
    image: String,
    /// Guest RAM: bytes, or a number with a K, M or G suffix (at least 2M, a multiple of 4K).
    #[arg(long, default_value = "64M", value_name = "SIZE")]
    mem: String,
    /// Write the run's statistics as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// End the run (with its statistics, exit status 3) after SECS seconds.
    #[arg(long, value_name = "SECS", allow_hyphen_values = true)]
    timeout: Option<String>,
    /// Deduplication policy.
    #[arg(long, value_enum, default_value = "off")]
    dedup: DedupPolicy,
    /// How the secondary MMU's table is made real for KVM.
    #[arg(long, value_enum, default_value = "memslot")]
    view: ViewKind,
    /// Do not print the exit table (the console and --stats-json are unaffected).
    #[arg(long)]
    no_table: bool,
    /// Listen on this Unix socket for `vmm ctl` (switch ksmd's run state while the guest runs).
    #[arg(long, value_name = "SOCKET")]
    control: Option<PathBuf>,
    /// Make a soft-dirty round (clear_refs 4 over guest RAM) every MS
    /// milliseconds from a VMM thread, as a live migration's pre-copy loop would.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    soft_dirty_ms: Option<u64>,
    #[command(flatten)]
    ksm: KsmArgs,
}

/// Runs the guest; the status is the guest's (see `vmm --help`), or 2 when
/// the statistics could not be written.
pub(super) fn run_command(kvm_device: PathBuf, args: RunArgs) -> Result<ExitCode, CliError> {
    let mem_bytes = guest_mem(&args.mem)?;
    let config = RunConfig {
        mem_bytes,
        ksm: args.ksm.knobs()?,
        timeout: args.timeout.as_deref().map(parse_timeout).transpose()?,
        image: GuestImage::resolve(&args.image, mem_bytes)?,
        dedup: args.dedup,
        view: args.view,
        console: Box::new(std::io::stdout()),
        kvm_device,
        mm_hook: None,
        builtin_ksm: true,
        memslot_limit: None,
        control: args.control.clone(),
        soft_dirty_interval: args.soft_dirty_ms.map(Duration::from_millis),
    };
    // Opened first: a path that cannot be written is bad input, refused
    // before the guest runs (see `stats_file`).
    let stats_file = args.stats_json.as_deref().map(StatsFile::open).transpose()?;
    vmm::signals::install(true).map_err(CliError::Signals)?;
    let stats = match run(config) {
        Ok(stats) => stats,
        Err(e) => {
            if let Some(file) = stats_file {
                file.abandon();
            }
            return Err(e.into());
        }
    };
    let status = exit_status(&stats);
    // The statistics first: a table that cannot be printed (a closed pipe)
    // must not cost them.
    if let Some(file) = stats_file {
        if let Err(e) = file.write(&stats) {
            report(&e);
            return Ok(ExitCode::from(STATUS_BAD_INPUT.max(status)));
        }
    }
    if !args.no_table {
        if let Err(e) = print_out(format_args!("\n{}", render_table(&stats))) {
            report(&e);
            return Ok(ExitCode::from(STATUS_BAD_INPUT.max(status)));
        }
    }
    if status != 0 {
        eprintln!("vmm: guest {}: {}", stats.config.image, stats.guest.end.detail);
    }
    Ok(ExitCode::from(status))
}

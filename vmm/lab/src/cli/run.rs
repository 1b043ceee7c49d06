//! `vmm run`: one guest or a fleet, its console, the exit table and the
//! statistics.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use vmm::image::GuestImage;
use vmm::run::{exit_status, run};
use vmm::stats::RunStats;
use vmm::view::ViewKind;
use vmm::vm::{DedupPolicy, RunConfig};

use super::args::{guest_mem, parse_timeout, policy_parser, Format, KsmArgs, KvmArg};
use super::stats_file::StatsFile;
use super::{report, CliError, STATUS_BAD_INPUT};
use crate::run_table::{render_csv, render_table};

pub(super) const AFTER_HELP: &str = "\
IMAGE is the name of a built-in guest (see `vmm images`) or a path to an ELF file
(a name containing '/' is always a path). The guest's console goes to standard output,
followed by the table; with --stats-json - or --format json|csv, standard output holds
only that document, and the console and the table go to standard error.
The table shows, per phase and for the whole run, the exits the VMM served as
`perf kvm stat report` shows VM exits (time: from KVM_RUN's return to the next entry)
and the host KVM's statistics as `kvm_stat` shows them. The statistics document is
schema 1 (README.md, \"Statistics\").";

#[derive(Debug, clap::Args)]
pub(super) struct RunArgs {
    /// Built-in image name or path to an ELF64 x86-64 executable.
    image: String,
    /// Guest RAM: bytes, or a number with a K, M or G suffix (at least 2M, a multiple of 4K).
    #[arg(long, default_value = "64M", value_name = "SIZE")]
    mem: String,
    /// Write the run's statistics as JSON to FILE; `-` is standard output (`./-` is a file).
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// What standard output gets after the console: the table, the statistics (json), or
    /// every figure as CSV records.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// End the run (with its statistics, exit status 3) after SECS seconds.
    #[arg(long, value_name = "SECS", allow_hyphen_values = true)]
    timeout: Option<String>,
    /// Deduplication policy.
    #[arg(long, value_parser = policy_parser(), default_value = "off")]
    dedup: DedupPolicy,
    /// How the secondary MMU's table is made real for KVM.
    #[arg(long, value_enum, default_value = "uffd")]
    view: ViewKind,
    /// Do not print the exit table (the console and --stats-json are unaffected).
    #[arg(long)]
    no_table: bool,
    /// No closing note on standard error when the guest did not succeed (the exit status says it).
    #[arg(long, short)]
    quiet: bool,
    /// Listen on this Unix socket for `vmm ctl` (switch ksmd's run state, watch the guest).
    #[arg(long, value_name = "SOCKET")]
    control: Option<PathBuf>,
    /// Run N guests of the image together, each its own VM, vCPU thread and mm,
    /// deduplicated together (ABI 1.1 fleets; the table shows the fleet, then each guest).
    #[arg(long, value_name = "N", default_value_t = 1)]
    guests: u32,
    /// Make a soft-dirty round (clear_refs 4 over guest RAM) every MS
    /// milliseconds from a VMM thread, as a live migration's pre-copy loop would.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    soft_dirty_ms: Option<u64>,
    #[command(flatten)]
    kvm: KvmArg,
    #[command(flatten)]
    ksm: KsmArgs,
}

/// Where the run's outputs go.
struct Outputs {
    /// The --stats-json file, unless it is standard output.
    file: Option<StatsFile>,
    /// The statistics document goes to standard output.
    stats_to_stdout: bool,
    /// Standard output carries a document: the console and the table go
    /// to standard error.
    stdout_is_data: bool,
}

impl Outputs {
    fn open(args: &RunArgs) -> Result<Self, CliError> {
        let dash = args.stats_json.as_deref().is_some_and(|p| p.as_os_str() == "-");
        if dash && args.format != Format::Table {
            return Err(CliError::TwoOnStdout(if args.format == Format::Json { "json" } else { "csv" }));
        }
        // Opened first: a path that cannot be written is bad input, refused
        // before the guest runs (see `stats_file`).
        let file = args.stats_json.as_deref().filter(|_| !dash).map(StatsFile::open).transpose()?;
        Ok(Self { file, stats_to_stdout: dash, stdout_is_data: dash || args.format != Format::Table })
    }
}

/// Runs the guest; the status is the guest's (see `vmm --help`), or 2 when
/// the statistics could not be written.
pub(super) fn run_command(kvm_before: Option<PathBuf>, args: RunArgs) -> Result<ExitCode, CliError> {
    let mem_bytes = guest_mem(&args.mem)?;
    let outputs = Outputs::open(&args)?;
    let console: Box<dyn Write + Send> =
        if outputs.stdout_is_data { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) };
    let config = RunConfig {
        mem_bytes,
        ksm: args.ksm.knobs()?,
        timeout: args.timeout.as_deref().map(parse_timeout).transpose()?,
        image: GuestImage::resolve(&args.image, mem_bytes)?,
        dedup: args.dedup,
        view: args.view,
        console,
        kvm_device: args.kvm.device(kvm_before),
        mm_hook: None,
        builtin_ksm: true,
        memslot_limit: None,
        control: args.control.clone(),
        soft_dirty_interval: args.soft_dirty_ms.map(Duration::from_millis),
        guests: args.guests,
    };
    vmm::signals::install(true).map_err(CliError::Signals)?;
    let stats = match run(config) {
        Ok(stats) => stats,
        Err(e) => {
            if let Some(file) = outputs.file {
                file.abandon();
            }
            return Err(e.into());
        }
    };
    let status = exit_status(&stats);
    if let Err(e) = write_outputs(&args, outputs, &stats) {
        report(&e);
        return Ok(ExitCode::from(STATUS_BAD_INPUT.max(status)));
    }
    if status != 0 && !args.quiet {
        eprintln!("vmm: guest {}: {}", stats.config.image, stats.guest.end.detail);
    }
    Ok(ExitCode::from(status))
}

/// The statistics first, then the table: a table that cannot be printed
/// (a closed pipe) must not cost them.
fn write_outputs(args: &RunArgs, outputs: Outputs, stats: &RunStats) -> Result<(), CliError> {
    if let Some(file) = outputs.file {
        file.write(stats)?;
    }
    let json = || serde_json::to_string_pretty(stats).map_err(CliError::Json);
    if outputs.stats_to_stdout {
        super::print_out(json()?)?;
    }
    match args.format {
        Format::Json => super::print_out(json()?),
        Format::Csv => super::print_bytes(render_csv(stats).as_bytes()),
        Format::Table if args.no_table => Ok(()),
        Format::Table if outputs.stdout_is_data => {
            // Standard error: nothing to report an error on.
            let _ = writeln!(std::io::stderr().lock(), "\n{}", render_table(stats));
            Ok(())
        }
        Format::Table => super::print_out(format_args!("\n{}", render_table(stats))),
    }
}

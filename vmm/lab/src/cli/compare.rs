//! `vmm compare`: one guest under several policies, side by side.

use std::path::PathBuf;
use std::process::ExitCode;

use vmm::image::GuestImage;
use vmm::view::ViewKind;
use vmm::vm::DedupPolicy;

use super::args::{
    check_guests, check_repeat, guest_mem, parse_timeout, policy_parser, this_vmm, Format, KsmArgs, KvmArg,
};
use super::CliError;
use crate::compare::{compare, table, CompareConfig, CompareError};
use crate::cost::CostProfile;
use crate::progress::Terminal;

pub(super) const AFTER_HELP: &str = "\
Each run is a child `vmm run --stats-json`; runs go repeat by repeat, every policy in turn.
DIR must be new, empty, or an earlier comparison's (marked by DIR/.vmm-compare), which is
replaced whole. On a terminal, standard error shows how far the comparison is and the time left.
Cells are the median over the repeats, ± half the min-max range, and (in parentheses) the
difference from `off`. The `kernel` policy (the host's own KSM) needs root; without it, it is
skipped with the reason and the other policies still run. Exit status: 0 when every run
succeeded and every guest read the same as under the first policy (off if given), 1 otherwise,
2 for bad input.

Examples:
  vmm compare pagefill --mem 16M --repeat 3 --out results/pagefill
  vmm compare converge --mem 257M --policies range-flush,change-pte,kernel --view uffd --repeat 1
  vmm compare pagefill --mem 16M --project vmm/lab/profiles/hw-vmx-ept.json --project host.json";

#[derive(Debug, clap::Args)]
pub(super) struct CompareArgs {
    /// Built-in image name or path to an ELF64 x86-64 executable.
    image: String,
    /// The policies, comma-separated, in the order of the table's columns.
    #[arg(long, value_parser = policy_parser(), value_delimiter = ',', default_value = "off,change-pte,range-flush,legacy,kernel")]
    policies: Vec<DedupPolicy>,
    /// Runs per policy.
    #[arg(long, default_value_t = 3, value_name = "N")]
    repeat: u32,
    /// Where compare.json, compare.svg and each run's statistics (runs/) go.
    #[arg(long, default_value = "compare-out", value_name = "DIR")]
    out: PathBuf,
    /// What standard output gets: the side-by-side table, compare.json's document (json), or
    /// one CSV record per phase, figure and policy.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// No progress and no notes on standard error (errors still).
    #[arg(long, short)]
    quiet: bool,
    /// Guests per run: N guests of the image deduplicated together (a fleet); the table
    /// shows the fleet's figures, then each guest's exits.
    #[arg(long, default_value_t = 1, value_name = "N")]
    guests: u32,
    /// Guest RAM: bytes, or a number with a K, M or G suffix.
    #[arg(long, default_value = "16M", value_name = "SIZE")]
    mem: String,
    /// The view of the built-in policies (`kernel` always uses the memslot view).
    #[arg(long, value_enum, default_value = "uffd")]
    view: ViewKind,
    /// End a run (with its statistics, counted as failed) after SECS seconds.
    #[arg(long, default_value = "600", value_name = "SECS")]
    timeout: String,
    /// Also project each policy's guest time onto the host of this cost profile (repeatable;
    /// needs the off policy): off's time plus the events beyond off's times their cost.
    #[arg(long, value_name = "PROFILE")]
    project: Vec<PathBuf>,
    #[command(flatten)]
    kvm: KvmArg,
    #[command(flatten)]
    ksm: KsmArgs,
}

/// Runs the comparison and prints its table: status 0 when every run
/// succeeded and every guest read the same, 1 otherwise.
pub(super) fn compare_command(kvm_before: Option<PathBuf>, args: CompareArgs) -> Result<ExitCode, CliError> {
    let (format, quiet) = (args.format, args.quiet);
    let config = config(kvm_before, args)?;
    let report = compare(&config, &mut Terminal::new("vmm compare", quiet))?;
    match format {
        Format::Table => super::print_out(format_args!(
            "{}wrote {} and {}",
            table::render(&report),
            config.out.join("compare.json").display(),
            config.out.join("compare.svg").display()
        ))?,
        Format::Json => super::print_out(serde_json::to_string_pretty(&report)?)?,
        Format::Csv => super::print_bytes(table::render_csv(&report).as_bytes())?,
    }
    if report.reports_identical && report.failed_runs.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}

/// The arguments, checked before anything runs.
fn config(kvm_before: Option<PathBuf>, args: CompareArgs) -> Result<CompareConfig, CliError> {
    let mem_bytes = guest_mem(&args.mem)?;
    let knobs = args.ksm.knobs()?;
    let timeout = parse_timeout(&args.timeout)?;
    check_repeat(args.repeat)?;
    let mut policies = Vec::new();
    for p in args.policies {
        if policies.contains(&p) {
            return Err(CliError::DuplicatePolicy(p.name()));
        }
        policies.push(p);
    }
    check_guests(args.guests, mem_bytes)?;
    GuestImage::resolve(&args.image, mem_bytes)?.validate(mem_bytes)?;
    let profiles = args.project.iter().map(|p| CostProfile::load(p)).collect::<Result<Vec<_>, _>>();
    let profiles = profiles.map_err(CompareError::Profile)?;
    if !profiles.is_empty() && !policies.contains(&DedupPolicy::Off) {
        return Err(CompareError::ProjectionWithoutOff.into());
    }
    Ok(CompareConfig {
        image: args.image,
        mem_bytes,
        policies,
        repeat: args.repeat,
        guests: args.guests,
        out: args.out,
        view: args.view,
        timeout_secs: timeout.as_secs_f64(),
        knobs,
        kvm_device: args.kvm.device(kvm_before),
        vmm: this_vmm()?,
        profiles,
    })
}

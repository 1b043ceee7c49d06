//! The command line: `vmm run`, `vmm images`, `vmm compare`, `vmm ctl`,
//! `vmm bench`, `vmm report`, `vmm completions`, `vmm man`, one module per
//! subcommand.
//!
//! Bad input and setup failures end with one line on standard error,
//! `vmm: error: ` and the error with its causes, and exit status 2.

mod args;
mod bench;
mod compare;
mod ctl;
mod report;
mod run;
mod stats_file;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use vmm::control::ControlError;
use vmm::image::ImageError;
use vmm::vm::VmError;

use crate::bench::dedup::DedupBenchError;
use crate::bench::BenchError;
use crate::compare::CompareError;
use args::ArgError;

const AFTER_HELP: &str = "\
Examples:
  vmm images                                  list the built-in guests
  vmm run hello                               boot a guest, print its console and the exit table
  vmm run pagefill --mem 64M --stats-json s.json
  vmm run pagefill --dedup change-pte         deduplicate, secondary MMU updated in place
  vmm run pagefill --dedup range-flush --view uffd
  vmm compare pagefill --repeat 3 --out out   every policy side by side: table, out/compare.json, out/compare.svg
  vmm run pagefill --stats-json - | jq .      the statistics on stdout (console and table on stderr)
  vmm run mixed --dedup range-flush --control /tmp/vmm.sock   then: vmm ctl /tmp/vmm.sock run 1
  vmm ctl /tmp/vmm.sock watch                 a live kvm_stat-like view of the running guest
  vmm bench                                   the cost of one VM exit on this machine, as JSON
  vmm bench fault --view memslot              one secondary-MMU fault against the bare mechanism
  vmm bench dedup                             scan and merge cost per page, against the host's KSM
  vmm run template --guests 8 --mem 16M --dedup change-pte   a fleet of 8 guests, deduplicated together
  vmm bench profile --out host.json           this host's cost per event (a cost profile)
  vmm bench model --profile host.json         the profile's predictions against measured runs
  vmm compare pagefill --project vmm/lab/profiles/hw-vmx-ept.json   each policy projected to hardware KVM
  vmm report docs/results --readme README.md  the README's results section from the JSON

Guests are static ELF64 x86-64 executables written against the tiny-guest
ABI v1 (guest-images/README.md). Exit status: 0 guest succeeded, 1 guest
reported a non-zero exit code, 2 bad input or setup failure, 3 guest ended
abnormally (triple fault, timeout, interrupt, KVM error).";

/// `vmm --version`: the program's version, and the versions of the
/// contracts it speaks (each checked against its constant in a test).
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ntiny-guest ABI 1.1, statistics schema 1, compare schema vmm-compare 1, control protocol vmm-control 1"
);

/// A userspace laboratory for KSM and KVM's secondary MMU: runs tiny guests
/// on real KVM and counts every VM exit.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, long_version = LONG_VERSION, after_help = AFTER_HELP)]
pub struct Cli {
    /// Accepted before the subcommand for scripts written when it was a
    /// global option; `vmm run|compare|bench --kvm PATH` is the documented place.
    #[arg(long = "kvm", hide = true, value_name = "PATH")]
    kvm_before_subcommand: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a guest and print its console, then a per-phase table of VM exits.
    #[command(after_help = run::AFTER_HELP)]
    Run(run::RunArgs),
    /// List the built-in guest images, one line each.
    Images,
    /// Run one guest under several deduplication policies, N times each, interleaved, and
    /// print a per-phase side-by-side table; write DIR/compare.json and DIR/compare.svg.
    #[command(after_help = compare::AFTER_HELP)]
    Compare(compare::CompareArgs),
    /// Talk to a running `vmm run --control SOCKET`: `run 0|1|2` switches the deduplicator's
    /// run state (0 stop ksmd, 1 start it, 2 stop and unmerge all); `status` prints the guest's
    /// phase, the run state, the exits and the KVM statistics so far as JSON; `watch` redraws
    /// them as kvm_stat does.
    #[command(after_help = ctl::AFTER_HELP)]
    Ctl(ctl::CtlArgs),
    /// Measure, print JSON: `floor` (default), the median cost of one port-I/O VM exit;
    /// `fault`, one secondary-MMU fault end to end against the bare mechanism of --view;
    /// `dedup`, scan and merge cost per page and convergence, against the host's KSM.
    Bench(bench::BenchArgs),
    /// Render results from compare and bench JSON: the README's Results section (Markdown)
    /// and one chart per workload with both views.
    #[command(after_help = report::AFTER_HELP)]
    Report(report::ReportArgs),
    /// Print a shell completion script for bash, zsh or fish.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), from the same definitions as --help.
    Man,
}

/// Why a command could not do its job: bad input or a setup failure.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// The arguments do not parse (clap's first line and a hint).
    #[error("{0} (see vmm --help)")]
    Usage(String),
    /// An argument cannot be honoured.
    #[error(transparent)]
    Arg(#[from] ArgError),
    /// The image cannot be found, read or used.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The VM could not be built.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The --stats-json file cannot be created.
    #[error("cannot create --stats-json file {path}")]
    StatsFile {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The statistics could not be written.
    #[error("cannot write statistics to {path}")]
    WriteStats {
        /// The file.
        path: String,
        /// The OS or encoding error.
        #[source]
        source: std::io::Error,
    },
    /// The --stats-json path is a FIFO nobody reads.
    #[error("--stats-json {0} is a FIFO with no reader: nothing would read the statistics")]
    StatsNoReader(String),
    /// Standard output cannot be written (a closed pipe, a full disk).
    #[error("cannot write to standard output")]
    Stdout(#[source] std::io::Error),
    /// The signal handlers of a run could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// `--policies` names a policy twice.
    #[error("--policies names {0} twice")]
    DuplicatePolicy(&'static str),
    /// The comparison failed.
    #[error(transparent)]
    Compare(#[from] CompareError),
    /// The benchmark's guest is not built in.
    #[error("the built-in image {0} is missing")]
    MissingImage(&'static str),
    /// `--warmup` and `--exits` ask for more exits than the bench guest takes.
    #[error(
        "--warmup plus twice --exits (the VMM's path and the bare loop) must be under {0} (the bench guest's port \
         writes)"
    )]
    TooManyExits(u64),
    /// `vmm bench floor` or `fault` failed.
    #[error(transparent)]
    Bench(#[from] BenchError),
    /// `vmm bench dedup` failed.
    #[error(transparent)]
    DedupBench(#[from] DedupBenchError),
    /// A report could not be encoded as JSON.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// The control socket cannot be reached.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// `vmm report` failed.
    #[error(transparent)]
    Report(#[from] crate::report::ReportError),
    /// Two outputs were asked for on standard output.
    #[error("--stats-json - and --format {0} both write standard output: give one of them")]
    TwoOnStdout(&'static str),
}

/// Status for bad input and setup failures.
const STATUS_BAD_INPUT: u8 = 2;

/// Writes `text` and a newline to standard output: a closed pipe or a full
/// disk is an error of the command (one line, non-zero status), not a panic.
fn print_out(text: impl std::fmt::Display) -> Result<(), CliError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|()| out.flush()).map_err(CliError::Stdout)
}

/// Writes bytes to standard output, as [`print_out`] does text.
fn print_bytes(bytes: &[u8]) -> Result<(), CliError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes).and_then(|()| out.flush()).map_err(CliError::Stdout)
}

/// Prints `err` and its causes on one line of standard error.
fn report(err: &CliError) {
    eprintln!("vmm: error: {}", vmm::error_chain(err));
}

/// Parses the arguments and runs the command; returns the process status.
pub fn main_with_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            report(&usage(&e));
            return ExitCode::from(STATUS_BAD_INPUT);
        }
    };
    let done = match cli.command {
        Command::Images => {
            let list: Vec<String> =
                guest_images::IMAGES.iter().map(|image| format!("{:<24} {}", image.name, image.summary)).collect();
            print_out(list.join("\n")).map(|()| ExitCode::SUCCESS)
        }
        Command::Run(args) => run::run_command(cli.kvm_before_subcommand, args),
        Command::Compare(args) => compare::compare_command(cli.kvm_before_subcommand, args),
        Command::Ctl(args) => ctl::ctl_command(&args),
        Command::Bench(args) => bench::bench_command(cli.kvm_before_subcommand, &args),
        Command::Report(args) => report::report_command(&args),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "vmm", &mut script);
            print_bytes(&script).map(|()| ExitCode::SUCCESS)
        }
        Command::Man => {
            let mut page = Vec::new();
            let man = clap_mangen::Man::new(Cli::command());
            man.render(&mut page)
                .map_err(CliError::Stdout)
                .and_then(|()| print_bytes(&page))
                .map(|()| ExitCode::SUCCESS)
        }
    };
    done.unwrap_or_else(|e| {
        report(&e);
        ExitCode::from(STATUS_BAD_INPUT)
    })
}

/// clap's first line says what is wrong; the rest is a usage hint.
fn usage(e: &clap::Error) -> CliError {
    let text = e.to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut first = lines.next().unwrap_or("bad arguments").trim_start_matches("error: ").to_string();
    // "the following required arguments were not provided:" lists them below.
    if first.ends_with(':') {
        if let Some(what) = lines.next() {
            first = format!("{first} {what}");
        }
    }
    CliError::Usage(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_version_names_the_versions_in_force() {
        let protocol = format!("control protocol {} {}", vmm::control::PROTOCOL, vmm::control::PROTOCOL_VERSION);
        let schema = format!("statistics schema {}", vmm::stats::SCHEMA_VERSION);
        let compare = format!(
            "compare schema {} {}",
            crate::compare::summary::COMPARE_SCHEMA,
            crate::compare::summary::COMPARE_VERSION
        );
        for part in [protocol, schema, compare] {
            assert!(LONG_VERSION.contains(&part), "{part} not in {LONG_VERSION}");
        }
        Cli::command().debug_assert();
    }

    #[test]
    fn kvm_is_an_option_of_the_commands_that_use_it_only() {
        let cli = Cli::command();
        let has_kvm = |name: &str| {
            let sub = cli.find_subcommand(name).expect("subcommand");
            sub.get_arguments().any(|a| a.get_long() == Some("kvm"))
        };
        assert!(has_kvm("run") && has_kvm("compare") && has_kvm("bench"));
        assert!(!has_kvm("ctl") && !has_kvm("images") && !has_kvm("report"));
        assert!(cli.get_arguments().all(|a| a.get_long() != Some("kvm") || a.is_hide_set()));
    }
}

//! The command line: `vmm run`, `vmm images`, `vmm compare`, `vmm ctl`, `vmm bench`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::image::GuestImage;
use crate::memory::check_mem_size;
use crate::run::{exit_status, run};
use crate::size::{format_size, parse_size};
use crate::stats::render_table;
use crate::view::ViewKind;
use crate::vm::{DedupPolicy, RunConfig};

const AFTER_HELP: &str = "\
Examples:
  vmm images                                  list the built-in guests
  vmm run hello                               boot a guest, print its console and the exit table
  vmm run pagefill --mem 64M --stats-json s.json
  vmm run pagefill --dedup change-pte         deduplicate, secondary MMU updated in place
  vmm run pagefill --dedup range-flush --view uffd
  vmm compare pagefill --repeat 3 --out out   every policy side by side: table, out/compare.json, out/compare.svg
  vmm run mixed --dedup range-flush --control /tmp/vmm.sock   then: vmm ctl /tmp/vmm.sock run 1
  vmm bench                                   the cost of one VM exit on this machine, as JSON
  vmm bench fault --view memslot              one secondary-MMU fault against the bare mechanism
  vmm bench dedup                             scan and merge cost per page, against the host's KSM

Guests are static ELF64 x86-64 executables written against the tiny-guest
ABI v1 (guest-images/README.md). Exit status: 0 guest succeeded, 1 guest
reported a non-zero exit code, 2 bad input or setup failure, 3 guest ended
abnormally (triple fault, timeout, interrupt, KVM error).";

/// A userspace laboratory for KSM and KVM's secondary MMU: runs tiny guests
/// on real KVM and counts every VM exit.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// The KVM device node.
    #[arg(long, global = true, default_value = "/dev/kvm", value_name = "PATH")]
    pub kvm: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a guest and print its console, then a per-phase table of VM exits.
    #[command(after_help = "IMAGE is the name of a built-in guest (see `vmm images`) or a path to an ELF file\n\
(a name containing '/' is always a path). The guest's console goes to standard output,\n\
followed by the table; --stats-json writes the statistics document (schema 1, README.md).")]
    Run(RunArgs),
    /// List the built-in guest images, one line each.
    Images,
    /// Run one guest under several deduplication policies, N times each, interleaved, and
    /// print a per-phase side-by-side table; write DIR/compare.json and DIR/compare.svg.
    #[command(after_help = COMPARE_HELP)]
    Compare(CompareArgs),
    /// Talk to a running `vmm run --control SOCKET`: `run 0|1|2` switches the deduplicator's
    /// run state (0 stop ksmd, 1 start it, 2 stop and unmerge all); `status` prints the guest's
    /// phase, the run state and the deduplicator's figures as JSON.
    #[command(after_help = "Example:\n  vmm run mixed --dedup range-flush --control /tmp/vmm.sock &\n  \
vmm ctl /tmp/vmm.sock run 1\n  vmm ctl /tmp/vmm.sock status\n\n\
The change is made before the reply comes back, so it shows in the statistics of the phase \
under way and of every phase after. Exit status: 0 done, 1 refused (the reason on stderr), 2 the \
socket cannot be reached.")]
    Ctl(CtlArgs),
    /// Measure, print JSON: `floor` (default), the median cost of one port-I/O VM exit;
    /// `fault`, one secondary-MMU fault end to end against the bare mechanism of --view;
    /// `dedup`, scan and merge cost per page and convergence, against the host's KSM.
    Bench(BenchArgs),
}

const COMPARE_HELP: &str = "\
Each run is a child `vmm run --stats-json`; runs go repeat by repeat, every policy in turn.
Cells are the median over the repeats, ± half the min-max range, and (in parentheses) the
difference from `off`. The `kernel` policy (the host's own KSM) needs root; without it, it is
skipped with the reason and the other policies still run. Exit status: 0 when every run
succeeded and every guest read the same as under the first policy (off if given), 1 otherwise,
2 for bad input.

Examples:
  vmm compare pagefill --mem 16M --repeat 3 --out results/pagefill
  vmm compare converge --mem 257M --policies range-flush,change-pte,kernel --view uffd --repeat 1";

#[derive(Debug, clap::Args)]
struct CompareArgs {
    /// Built-in image name or path to an ELF64 x86-64 executable.
    image: String,
    /// The policies, comma-separated, in the order of the table's columns.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "off,change-pte,range-flush,legacy,kernel")]
    policies: Vec<DedupPolicy>,
    /// Runs per policy.
    #[arg(long, default_value_t = 3, value_name = "N")]
    repeat: u32,
    /// Where compare.json, compare.svg and each run's statistics (runs/) go.
    #[arg(long, default_value = "compare-out", value_name = "DIR")]
    out: PathBuf,
    /// Guest RAM: bytes, or a number with a K, M or G suffix.
    #[arg(long, default_value = "16M", value_name = "SIZE")]
    mem: String,
    /// The view of the built-in policies (`kernel` uses one plain memslot).
    #[arg(long, value_enum, default_value = "memslot")]
    view: ViewKind,
    /// End a run (with its statistics, counted as failed) after SECS seconds.
    #[arg(long, default_value = "600", value_name = "SECS")]
    timeout: String,
    #[command(flatten)]
    ksm: KsmArgs,
}

#[derive(Debug, clap::Args)]
struct CtlArgs {
    /// The socket given to `vmm run --control`.
    socket: PathBuf,
    /// The request: `run 0|1|2` or `status`.
    #[arg(required = true, num_args = 1.., value_name = "REQUEST")]
    request: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
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
    #[command(flatten)]
    ksm: KsmArgs,
}

/// The deduplicator's knobs, with the names and defaults of /sys/kernel/mm/ksm.
#[derive(Debug, clap::Args)]
struct KsmArgs {
    /// ksmd at launch: 0 stopped (the guest may start it through port 0x501), 1 running, 2 unmerge.
    #[arg(long, default_value_t = 0, value_name = "0|1|2", help_heading = "Deduplicator (ksm)")]
    ksm_run: u32,
    /// Pages ksmd scans per batch.
    #[arg(long, default_value_t = 100, value_name = "N", help_heading = "Deduplicator (ksm)")]
    pages_to_scan: u32,
    /// Sleep between ksmd batches.
    #[arg(long, default_value_t = 20, value_name = "MS", help_heading = "Deduplicator (ksm)")]
    sleep_millisecs: u32,
    /// Most pages sharing one KSM page.
    #[arg(long, default_value_t = 256, value_name = "N", help_heading = "Deduplicator (ksm)")]
    max_page_sharing: u32,
    /// Merge zero-filled pages with the zero page.
    #[arg(long, default_value_t = 0, value_name = "0|1", help_heading = "Deduplicator (ksm)")]
    use_zero_pages: u8,
    /// Skip pages that keep failing to merge.
    #[arg(long, default_value_t = 1, value_name = "0|1", help_heading = "Deduplicator (ksm)")]
    smart_scan: u8,
}

impl KsmArgs {
    fn knobs(&self) -> Result<ksm::KsmKnobs, String> {
        let flag = |name: &str, v: u8| match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(format!("--{name} takes 0 or 1, not {v}")),
        };
        let knobs = ksm::KsmKnobs {
            run: self.ksm_run,
            pages_to_scan: self.pages_to_scan,
            sleep_millisecs: self.sleep_millisecs,
            max_page_sharing: self.max_page_sharing,
            use_zero_pages: flag("use-zero-pages", self.use_zero_pages)?,
            smart_scan: flag("smart-scan", self.smart_scan)?,
        };
        // Checked whatever the policy: a bad knob is bad input even with
        // deduplication off.
        knobs.check().map_err(|e| e.to_string())?;
        Ok(knobs)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchWhat {
    /// The exit floor.
    Floor,
    /// A secondary-MMU fault against the bare mechanism.
    Fault,
    /// Scan and merge cost per page and convergence, against the host's KSM.
    Dedup,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// What to measure.
    #[arg(value_enum, default_value = "floor")]
    what: BenchWhat,
    /// The view (fault: default memslot; dedup: default uffd, which holds any size).
    #[arg(long, value_enum)]
    view: Option<ViewKind>,
    /// Guest RAM (fault: default 64M, pagefill faults once per page above 2 MiB;
    /// dedup: default 257M, 255 MiB of pages).
    #[arg(long, value_name = "SIZE")]
    mem: Option<String>,
    /// Runs per policy and guest (dedup).
    #[arg(long, default_value_t = 3, value_name = "N")]
    repeat: u32,
    /// Where each run's statistics go (dedup; default: a fresh temporary directory).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Number of exits to time (floor).
    #[arg(long, default_value_t = 20_000)]
    exits: usize,
    /// Exits taken before timing starts.
    #[arg(long, default_value_t = 1_000)]
    warmup: usize,
}

/// Status for bad input and setup failures.
const STATUS_BAD_INPUT: u8 = 2;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmm: error: {msg}");
    ExitCode::from(STATUS_BAD_INPUT)
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let secs: f64 = text.parse().map_err(|_| format!("--timeout '{text}' is not a number of seconds"))?;
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return Err(format!("--timeout '{text}' must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
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
            // clap's first line says what is wrong; the rest is a usage hint.
            let text = e.to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut first = lines.next().unwrap_or("bad arguments").trim_start_matches("error: ").to_string();
            // "the following required arguments were not provided:" lists them below.
            if first.ends_with(':') {
                if let Some(what) = lines.next() {
                    first = format!("{first} {what}");
                }
            }
            return fail(format!("{first} (see vmm --help)"));
        }
    };
    match cli.command {
        Command::Images => {
            for image in guest_images::IMAGES {
                println!("{:<24} {}", image.name, image.summary);
            }
            ExitCode::SUCCESS
        }
        Command::Run(args) => run_command(cli.kvm, args),
        Command::Compare(args) => compare_command(cli.kvm, args),
        Command::Ctl(args) => match crate::control::request(&args.socket, &args.request.join(" ")) {
            Ok(reply) => match reply.strip_prefix("error: ") {
                Some(why) => {
                    eprintln!("vmm ctl: {why}");
                    ExitCode::from(1)
                }
                None => {
                    println!("{reply}");
                    ExitCode::SUCCESS
                }
            },
            Err(e) => fail(e),
        },
        Command::Bench(args) => bench_command(cli.kvm, args),
    }
}

fn run_command(kvm_device: PathBuf, args: RunArgs) -> ExitCode {
    let mem_bytes = match guest_mem(&args.mem) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    let ksm = match args.ksm.knobs() {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    let timeout = match args.timeout.as_deref().map(parse_timeout).transpose() {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let image = match GuestImage::resolve(&args.image, mem_bytes) {
        Ok(i) => i,
        Err(e) => return fail(e),
    };
    // Open the statistics file first: a path that cannot be written is bad
    // input, refused before the guest runs. It is emptied only when the
    // statistics are written, so a run that fails to start keeps what an
    // earlier run left there.
    let open = |p: &PathBuf| OpenOptions::new().write(true).create(true).truncate(false).open(p);
    let stats_file = match args.stats_json.as_ref().map(open).transpose() {
        Ok(f) => f,
        Err(e) => {
            let path = args.stats_json.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            return fail(format!("cannot create --stats-json file {path}: {e}"));
        }
    };
    if let Err(e) = crate::signals::install(true) {
        return fail(format!("cannot install signal handlers: {e}"));
    }
    let config = RunConfig {
        image,
        mem_bytes,
        dedup: args.dedup,
        view: args.view,
        timeout,
        console: Box::new(std::io::stdout()),
        kvm_device,
        mm_hook: None,
        ksm,
        builtin_ksm: true,
        memslot_limit: None,
        control: args.control.clone(),
    };
    let stats = match run(config) {
        Ok(s) => s,
        Err(e) => return fail(crate::error_chain(&e)),
    };
    if !args.no_table {
        println!("\n{}", render_table(&stats));
    }
    if let (Some(mut file), Some(path)) = (stats_file, args.stats_json.as_ref()) {
        let written = serde_json::to_vec_pretty(&stats).map_err(std::io::Error::other).and_then(|json| {
            file.set_len(0)?;
            file.write_all(&json)?;
            file.write_all(b"\n")
        });
        if let Err(e) = written {
            eprintln!("vmm: error: cannot write statistics to {}: {e}", path.display());
            return ExitCode::from(STATUS_BAD_INPUT.max(exit_status(&stats)));
        }
    }
    let status = exit_status(&stats);
    if status != 0 {
        eprintln!("vmm: guest {}: {}", stats.config.image, stats.guest.end.detail);
    }
    ExitCode::from(status)
}

/// Most repeats a comparison takes.
const MAX_REPEAT: u32 = 1000;

/// `--mem`: parsed and checked against ABI v1 and the host.
fn guest_mem(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text).map_err(|e| format!("--mem: {e}"))?;
    check_mem_size(bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// `--repeat`: between 1 and MAX_REPEAT.
fn check_repeat(repeat: u32) -> Result<(), String> {
    if repeat == 0 || repeat > MAX_REPEAT {
        return Err(format!("--repeat {repeat} must be between 1 and {MAX_REPEAT}"));
    }
    Ok(())
}

/// This executable, which runs each child `vmm run`.
fn this_vmm() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("cannot find the vmm executable to run: {e}"))
}

fn compare_command(kvm_device: PathBuf, args: CompareArgs) -> ExitCode {
    let mem_bytes = match guest_mem(&args.mem) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    let knobs = match args.ksm.knobs() {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    let timeout = match parse_timeout(&args.timeout) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    if let Err(e) = check_repeat(args.repeat) {
        return fail(e);
    }
    let mut policies = Vec::new();
    for p in args.policies {
        if policies.contains(&p) {
            return fail(format!("--policies names {} twice", p.name()));
        }
        policies.push(p);
    }
    if let Err(e) = GuestImage::resolve(&args.image, mem_bytes).and_then(|i| i.validate(mem_bytes).map(|_| i)) {
        return fail(e);
    }
    let vmm = match this_vmm() {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let config = crate::compare::CompareConfig {
        image: args.image,
        mem_bytes,
        policies,
        repeat: args.repeat,
        out: args.out,
        view: args.view,
        timeout_secs: timeout.as_secs_f64(),
        knobs,
        kvm_device,
        vmm,
    };
    match crate::compare::compare(&config, &mut |line| eprintln!("vmm compare: {line}")) {
        Ok(report) => {
            print!("{}", crate::compare::table::render(&report));
            println!(
                "wrote {} and {}",
                config.out.join("compare.json").display(),
                config.out.join("compare.svg").display()
            );
            if report.reports_identical && report.failed_runs.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => fail(e),
    }
}

fn bench_command(kvm_device: PathBuf, args: BenchArgs) -> ExitCode {
    match args.what {
        BenchWhat::Fault => return bench_fault(kvm_device, &args),
        BenchWhat::Dedup => return bench_dedup(kvm_device, &args),
        BenchWhat::Floor => {}
    }
    let Some(flood) = guest_images::find("misbehave-port-flood") else {
        return fail("the built-in image misbehave-port-flood is missing");
    };
    let needed = crate::bench::exit_floor_exits_needed(args.warmup, args.exits);
    if args.exits == 0 || needed.is_none_or(|n| n as u64 >= guest_images::PORT_FLOOD_WRITES) {
        return fail(format!(
            "--warmup plus twice --exits (the VMM's path and the bare loop) must be under {} (the bench \
             guest's port writes)",
            guest_images::PORT_FLOOD_WRITES
        ));
    }
    let mem_bytes = 16 << 20;
    let config = RunConfig {
        image: GuestImage { name: flood.name.to_string(), bytes: flood.elf.to_vec() },
        mem_bytes,
        dedup: DedupPolicy::Off,
        view: ViewKind::Memslot,
        timeout: None,
        console: Box::new(std::io::sink()),
        kvm_device,
        mm_hook: None,
        ksm: Default::default(),
        builtin_ksm: true,
        memslot_limit: None,
        control: None,
    };
    match crate::bench::exit_floor(config, args.warmup, args.exits) {
        Ok(report) => {
            match serde_json::to_string_pretty(&report) {
                Ok(json) => println!("{json}"),
                Err(e) => return fail(e),
            }
            eprintln!(
                "vmm: exit floor: median {:.1} us through the VMM, {:.1} us bare KVM_RUN ({:.3}x), {} exits each ({} \
                 guest RAM)",
                report.port_io_exit.median_ns / 1e3,
                report.bare_exit.median_ns / 1e3,
                report.ratio,
                report.port_io_exit.samples,
                format_size(mem_bytes)
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn bench_dedup(kvm_device: PathBuf, args: &BenchArgs) -> ExitCode {
    let mem_bytes = match guest_mem(args.mem.as_deref().unwrap_or("257M")) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    if let Err(e) = check_repeat(args.repeat) {
        return fail(e);
    }
    let vmm = match this_vmm() {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("vmm-bench-dedup-{}", std::process::id())));
    let config = crate::bench::dedup::DedupBenchConfig {
        mem_bytes,
        policies: vec![DedupPolicy::RangeFlush, DedupPolicy::ChangePte],
        repeat: args.repeat,
        out: out.clone(),
        base: crate::compare::CompareConfig {
            image: String::new(),
            mem_bytes,
            policies: Vec::new(),
            repeat: 1,
            out: out.clone(),
            view: args.view.unwrap_or(ViewKind::Uffd),
            timeout_secs: 600.0,
            knobs: ksm::KsmKnobs::default(),
            kvm_device,
            vmm,
        },
    };
    let report = match crate::bench::dedup::bench_dedup(&config, &mut |l| eprintln!("vmm bench dedup: {l}")) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    match serde_json::to_string_pretty(&report) {
        Ok(json) => println!("{json}"),
        Err(e) => return fail(e),
    }
    for (name, r) in &report.policies {
        eprintln!(
            "vmm bench dedup: {name:<11} scan {:.2} us/page, merge {:.2} us/page, converge {:.3} s wall, {:.3} s CPU{}",
            r.scan_ns_per_page / 1e3,
            r.merge_ns_per_page / 1e3,
            r.converge.wall_ns / 1e9,
            r.converge.cpu_ns / 1e9,
            r.ratio_to_kernel.as_ref().map_or(String::new(), |k| format!(
                " (x kernel: scan {:.2}, merge {:.2}, wall {:.2}, CPU {:.2})",
                k["scan_ns_per_page"], k["merge_ns_per_page"], k["converge_wall"], k["converge_cpu"]
            ))
        );
    }
    if args.out.is_none() {
        let _ = std::fs::remove_dir_all(&out);
    }
    ExitCode::SUCCESS
}

fn bench_fault(kvm_device: PathBuf, args: &BenchArgs) -> ExitCode {
    let mem_bytes = match guest_mem(args.mem.as_deref().unwrap_or("64M")) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    if let Err(e) = crate::signals::install(false) {
        return fail(format!("cannot install signal handlers: {e}"));
    }
    let view = args.view.unwrap_or(ViewKind::Memslot);
    let make = |image: &'static str| RunConfig {
        image: GuestImage::resolve(image, mem_bytes)
            .unwrap_or_else(|_| GuestImage { name: image.into(), bytes: Vec::new() }),
        mem_bytes,
        dedup: DedupPolicy::RangeFlush,
        view,
        timeout: None,
        console: Box::new(std::io::sink()),
        kvm_device: kvm_device.clone(),
        mm_hook: None,
        ksm: Default::default(),
        builtin_ksm: false,
        memslot_limit: None,
        control: None,
    };
    match crate::bench::fault_cost(make) {
        Ok(report) => match serde_json::to_string_pretty(&report) {
            Ok(json) => {
                println!("{json}");
                eprintln!(
                    "vmm: {} view: a secondary-MMU fault costs {:.1} us, the bare mechanism {:.1} us ({:.2}x)",
                    report.view,
                    report.fault_ns / 1e3,
                    report.bare_ns / 1e3,
                    report.ratio
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Err(e) => fail(e),
    }
}

//! `vmm bench`: the exit floor, a secondary-MMU fault, the deduplicator
//! against the host's KSM; each prints its report as JSON and a summary
//! line on standard error.

use std::path::PathBuf;
use std::process::ExitCode;

use vmm::image::GuestImage;
use vmm::size::format_size;
use vmm::view::ViewKind;
use vmm::vm::{DedupPolicy, RunConfig};

use super::args::{check_repeat, guest_mem, this_vmm};
use super::CliError;
use crate::bench::dedup::{bench_dedup, DedupBenchConfig, DedupBenchReport};
use crate::bench::{exit_floor, exit_floor_exits_needed, fault_cost};
use crate::compare::CompareConfig;

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
pub(super) struct BenchArgs {
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

/// Runs the bench `args.what` names.
pub(super) fn bench_command(kvm_device: PathBuf, args: &BenchArgs) -> Result<ExitCode, CliError> {
    match args.what {
        BenchWhat::Floor => bench_floor(kvm_device, args),
        BenchWhat::Fault => bench_fault(kvm_device, args),
        BenchWhat::Dedup => bench_dedup_command(kvm_device, args),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// A bench run of a built-in guest: no deduplicator, console discarded.
fn bench_config(kvm_device: PathBuf, image: GuestImage, mem_bytes: u64) -> RunConfig {
    RunConfig {
        image,
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
        soft_dirty_interval: None,
    }
}

fn bench_floor(kvm_device: PathBuf, args: &BenchArgs) -> Result<(), CliError> {
    const FLOOD: &str = "misbehave-port-flood";
    let flood = guest_images::find(FLOOD).ok_or(CliError::MissingImage(FLOOD))?;
    let needed = exit_floor_exits_needed(args.warmup, args.exits);
    if args.exits == 0 || needed.is_none_or(|n| n as u64 >= guest_images::PORT_FLOOD_WRITES) {
        return Err(CliError::TooManyExits(guest_images::PORT_FLOOD_WRITES));
    }
    let mem_bytes = 16 << 20;
    let image = GuestImage { name: flood.name.to_string(), bytes: flood.elf.to_vec() };
    let report = exit_floor(bench_config(kvm_device, image, mem_bytes), args.warmup, args.exits)?;
    super::print_out(serde_json::to_string_pretty(&report)?)?;
    eprintln!(
        "vmm: exit floor: median {:.1} us through the VMM, {:.1} us bare KVM_RUN ({:.3}x), {} exits each ({} guest \
         RAM)",
        report.port_io_exit.median_ns / 1e3,
        report.bare_exit.median_ns / 1e3,
        report.ratio,
        report.port_io_exit.samples,
        format_size(mem_bytes)
    );
    Ok(())
}

fn bench_fault(kvm_device: PathBuf, args: &BenchArgs) -> Result<(), CliError> {
    let mem_bytes = guest_mem(args.mem.as_deref().unwrap_or("64M"))?;
    vmm::signals::install(false).map_err(CliError::Signals)?;
    let view = args.view.unwrap_or(ViewKind::Memslot);
    let make = |image: &'static str| RunConfig {
        dedup: DedupPolicy::RangeFlush,
        view,
        builtin_ksm: false,
        ..bench_config(
            kvm_device.clone(),
            GuestImage::resolve(image, mem_bytes)
                .unwrap_or_else(|_| GuestImage { name: image.into(), bytes: Vec::new() }),
            mem_bytes,
        )
    };
    let report = fault_cost(make)?;
    super::print_out(serde_json::to_string_pretty(&report)?)?;
    eprintln!(
        "vmm: {} view: a secondary-MMU fault costs {:.1} us, the bare mechanism {:.1} us ({:.2}x)",
        report.view,
        report.fault_ns / 1e3,
        report.bare_ns / 1e3,
        report.ratio
    );
    Ok(())
}

fn bench_dedup_command(kvm_device: PathBuf, args: &BenchArgs) -> Result<(), CliError> {
    let mem_bytes = guest_mem(args.mem.as_deref().unwrap_or("257M"))?;
    check_repeat(args.repeat)?;
    let vmm = this_vmm()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("vmm-bench-dedup-{}", std::process::id())));
    let config = DedupBenchConfig {
        mem_bytes,
        policies: vec![DedupPolicy::RangeFlush, DedupPolicy::ChangePte],
        repeat: args.repeat,
        out: out.clone(),
        base: CompareConfig {
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
    let report = bench_dedup(&config, &mut |l| eprintln!("vmm bench dedup: {l}"))?;
    super::print_out(serde_json::to_string_pretty(&report)?)?;
    print_dedup_summary(&report);
    if args.out.is_none() {
        let _ = std::fs::remove_dir_all(&out);
    }
    Ok(())
}

/// One line per policy on standard error: its costs, and its ratios to the
/// kernel's when the kernel ran.
fn print_dedup_summary(report: &DedupBenchReport) {
    for (name, r) in &report.policies {
        let ratios = r.ratio_to_kernel.as_ref().map_or(String::new(), |k| {
            format!(
                " (x kernel: scan {:.2}, merge {:.2}, wall {:.2}, CPU {:.2})",
                k["scan_ns_per_page"], k["merge_ns_per_page"], k["converge_wall"], k["converge_cpu"]
            )
        });
        eprintln!(
            "vmm bench dedup: {name:<11} scan {:.2} us/page, merge {:.2} us/page, converge {:.3} s wall, {:.3} s CPU{ratios}",
            r.scan_ns_per_page / 1e3,
            r.merge_ns_per_page / 1e3,
            r.converge.wall_ns / 1e9,
            r.converge.cpu_ns / 1e9,
        );
    }
}

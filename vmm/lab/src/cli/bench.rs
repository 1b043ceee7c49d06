//! `vmm bench`: the exit floor, a secondary-MMU fault, the deduplicator
//! against the host's KSM; each prints its report (JSON by default, with
//! the unit and kind of each figure in `units`; or a table, or CSV) and a
//! summary line on standard error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vmm::image::GuestImage;
use vmm::size::format_size;
use vmm::view::ViewKind;
use vmm::vm::{DedupPolicy, RunConfig};

use serde::Serialize;
use serde_json::Value;

use super::args::{check_guests, check_repeat, guest_mem, this_vmm, Format, KvmArg};
use super::CliError;
use crate::bench::dedup::{bench_dedup, DedupBenchConfig, DedupBenchReport};
use crate::bench::model::{bench_model, render_model, ModelConfig, MODEL_WORKLOADS};
use crate::bench::profile::{bench_profile, write_profile, ProfileBenchConfig};
use crate::bench::{exit_floor, exit_floor_exits_needed, fault_cost, BenchError};
use crate::compare::{CompareConfig, CompareError};
use crate::cost::CostProfile;
use crate::progress::Terminal;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchWhat {
    /// The exit floor.
    Floor,
    /// A secondary-MMU fault against the bare mechanism.
    Fault,
    /// Scan and merge cost per page and convergence, against the host's KSM.
    Dedup,
    /// This host's cost profile (needs --out FILE): each event's cost from a microbenchmark.
    Profile,
    /// The cost model checked: measured against predicted time per workload and policy (needs --profile).
    Model,
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
    /// Guests of `converge` per run (dedup): a fleet converging together, each guest of --mem.
    #[arg(long, default_value_t = 1, value_name = "N")]
    guests: u32,
    /// dedup and model: where each run's statistics go (default: a fresh temporary directory);
    /// profile: the file the profile is written to.
    #[arg(long, value_name = "DIR|FILE")]
    out: Option<PathBuf>,
    /// The profile `model` checks (normally this host's, from `vmm bench profile`).
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Other hosts' profiles `model` projects every run onto as well (repeatable).
    #[arg(long, value_name = "FILE")]
    project: Vec<PathBuf>,
    /// The name `profile` gives the profile (default: this-host-VIEW).
    #[arg(long)]
    name: Option<String>,
    /// The workloads `model` runs, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = MODEL_WORKLOADS.iter().map(|w| w.to_string()))]
    workloads: Vec<String>,
    /// Number of exits to time (floor).
    #[arg(long, default_value_t = 20_000)]
    exits: usize,
    /// Exits taken before timing starts.
    #[arg(long, default_value_t = 1_000)]
    warmup: usize,
    /// What standard output gets: the report as JSON, a table, or CSV records (figure, value, unit, kind).
    #[arg(long, value_enum, default_value = "json")]
    format: Format,
    /// No progress, notes or summary on standard error (errors still).
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    kvm: KvmArg,
}

/// Runs the bench `args.what` names.
pub(super) fn bench_command(kvm_before: Option<PathBuf>, args: &BenchArgs) -> Result<ExitCode, CliError> {
    let kvm_device = args.kvm.device(kvm_before);
    match args.what {
        BenchWhat::Floor => bench_floor(kvm_device, args),
        BenchWhat::Fault => bench_fault(kvm_device, args),
        BenchWhat::Dedup => bench_dedup_command(kvm_device, args),
        BenchWhat::Profile => bench_profile_command(kvm_device, args),
        BenchWhat::Model => bench_model_command(kvm_device, args),
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
        guests: 1,
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
    print_report(&report, args.format)?;
    if args.quiet {
        return Ok(());
    }
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

/// The configuration of a bench run whose memory hook drives the secondary
/// MMU (range-flush, no built-in deduplicator), for built-in image `image`.
fn hooked_config(kvm_device: PathBuf, mem_bytes: u64, view: ViewKind) -> impl Fn(&'static str) -> RunConfig {
    move |image| RunConfig {
        dedup: DedupPolicy::RangeFlush,
        view,
        builtin_ksm: false,
        ..bench_config(
            kvm_device.clone(),
            GuestImage::resolve(image, mem_bytes)
                .unwrap_or_else(|_| GuestImage { name: image.into(), bytes: Vec::new() }),
            mem_bytes,
        )
    }
}

fn bench_fault(kvm_device: PathBuf, args: &BenchArgs) -> Result<(), CliError> {
    let mem_bytes = guest_mem(args.mem.as_deref().unwrap_or("64M"))?;
    vmm::signals::install(false).map_err(CliError::Signals)?;
    let view = args.view.unwrap_or(ViewKind::Memslot);
    let make = hooked_config(kvm_device.clone(), mem_bytes, view);
    let report = fault_cost(make)?;
    print_report(&report, args.format)?;
    if args.quiet {
        return Ok(());
    }
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
    check_guests(args.guests, mem_bytes)?;
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
        guests: args.guests,
        out: out.clone(),
        base: compare_base(kvm_device, mem_bytes, args.view.unwrap_or(ViewKind::Uffd), &out, vmm),
    };
    let report = bench_dedup(&config, &mut Terminal::new("vmm bench dedup", args.quiet))?;
    print_report(&report, args.format)?;
    if !args.quiet {
        print_dedup_summary(&report);
    }
    if args.out.is_none() {
        let _ = std::fs::remove_dir_all(&out);
    }
    Ok(())
}

/// The template of the child runs a bench makes (image, policies and
/// repeat are set per use).
fn compare_base(kvm_device: PathBuf, mem_bytes: u64, view: ViewKind, out: &Path, vmm: PathBuf) -> CompareConfig {
    CompareConfig {
        image: String::new(),
        mem_bytes,
        policies: Vec::new(),
        repeat: 1,
        guests: 1,
        out: out.to_path_buf(),
        view,
        timeout_secs: 600.0,
        knobs: ksm::KsmKnobs::default(),
        kvm_device,
        vmm,
        profiles: Vec::new(),
    }
}

/// A fresh temporary directory for a bench's runs.
fn temp_out(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-bench-{what}-{}", std::process::id()))
}

fn bench_profile_command(kvm_device: PathBuf, args: &BenchArgs) -> Result<(), CliError> {
    let path = args.out.clone().ok_or_else(|| CliError::Usage("bench profile needs --out FILE".into()))?;
    let mem_bytes = guest_mem(args.mem.as_deref().unwrap_or("16M"))?;
    check_repeat(args.repeat)?;
    vmm::signals::install(false).map_err(CliError::Signals)?;
    let view = args.view.unwrap_or(ViewKind::Uffd);
    let runs = temp_out("profile");
    let config = ProfileBenchConfig {
        name: args.name.clone().unwrap_or_else(|| format!("this-host-{}", view.name())),
        view,
        mem_bytes,
        repeat: args.repeat,
        out: runs.clone(),
        base: compare_base(kvm_device.clone(), mem_bytes, view, &runs, this_vmm()?),
    };
    let make = hooked_config(kvm_device.clone(), mem_bytes, view);
    let profile = bench_profile(&config, &make, &mut Terminal::new("vmm bench profile", args.quiet));
    let _ = std::fs::remove_dir_all(&runs);
    let json = serde_json::to_string_pretty(&profile.map_err(BenchError::from)?)?;
    write_profile(&path, &json).map_err(BenchError::from)?;
    if !args.quiet {
        eprintln!("vmm bench profile: wrote {}", path.display());
    }
    super::print_out(json)
}

fn bench_model_command(kvm_device: PathBuf, args: &BenchArgs) -> Result<(), CliError> {
    let path = args.profile.as_deref().ok_or_else(|| CliError::Usage("bench model needs --profile FILE".into()))?;
    let profile = CostProfile::load(path).map_err(CompareError::Profile)?;
    let mem_bytes = guest_mem(args.mem.as_deref().unwrap_or("16M"))?;
    check_repeat(args.repeat)?;
    let out = args.out.clone().unwrap_or_else(|| temp_out("model"));
    let view = args.view.unwrap_or(ViewKind::Uffd);
    use DedupPolicy::{ChangePte, EventAware, Legacy, Off, RangeFlush};
    let base = CompareConfig {
        policies: vec![Off, ChangePte, RangeFlush, Legacy, EventAware],
        repeat: args.repeat,
        ..compare_base(kvm_device, mem_bytes, view, &out, this_vmm()?)
    };
    let others = args.project.iter().map(|p| CostProfile::load(p)).collect::<Result<Vec<_>, _>>();
    let others = others.map_err(CompareError::Profile)?;
    let config = ModelConfig { workloads: args.workloads.clone(), out: out.clone(), base, profile, others };
    let report = bench_model(&config, &mut Terminal::new("vmm bench model", args.quiet));
    if args.out.is_none() {
        let _ = std::fs::remove_dir_all(&out);
    }
    let report = report?;
    match args.format {
        Format::Table => super::print_out(render_model(&report)),
        format => {
            if !args.quiet {
                eprint!("{}", render_model(&report));
            }
            print_report(&report, format)
        }
    }
}

/// The unit and kind of a bench figure, by its key.
fn bench_unit(key: &str) -> Option<(&'static str, &'static str)> {
    Some(match key {
        k if k.starts_with("ratio") || k.starts_with("converge_") => ("ratio", "level"),
        "error" | "max_abs_error" | "median_abs_error" | "limit" | "goal" => ("ratio", "level"),
        "within_limit" | "within_goal" | "points" => ("points", "count"),
        "samples" | "faults" => ("samples", "count"),
        "pages_scanned" | "pages_merged" => ("pages", "count"),
        "mem_bytes" => ("bytes", "level"),
        "repeat" => ("runs", "count"),
        "guests" => ("guests", "count"),
        k if k.ends_with("_ns") || k.ends_with("_ns_per_page") || k.ends_with("_ns_per_fault") => ("ns", "time"),
        k if k.ends_with("_per_scanned_page") => ("ns", "time"),
        _ => return None,
    })
}

/// Every number in `v` as (dotted path, value), in document order.
fn leaves(v: &Value, path: &str, out: &mut Vec<(String, f64)>) {
    match v {
        Value::Object(map) => {
            for (k, x) in map {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                leaves(x, &p, out);
            }
        }
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                leaves(x, &format!("{path}.{i}"), out);
            }
        }
        Value::Number(n) => out.extend(n.as_f64().map(|f| (path.to_string(), f))),
        _ => {}
    }
}

/// Prints a bench report in `format`: JSON with a `units` map (unit and
/// kind of each figure, by key), a table, or CSV records.
fn print_report(report: &impl Serialize, format: Format) -> Result<(), CliError> {
    let mut v = serde_json::to_value(report)?;
    let mut figures = Vec::new();
    leaves(&v, "", &mut figures);
    let unit = |path: &str| bench_unit(path.rsplit('.').next().unwrap_or(path));
    match format {
        Format::Json => {
            let units: serde_json::Map<String, Value> = figures
                .iter()
                .filter_map(|(p, _)| {
                    let key = p.rsplit('.').next().unwrap_or(p);
                    unit(p).map(|(u, k)| (key.to_string(), serde_json::json!({ "unit": u, "kind": k })))
                })
                .collect();
            if let Some(map) = v.as_object_mut() {
                map.insert("units".into(), Value::Object(units));
            }
            super::print_out(serde_json::to_string_pretty(&v)?)
        }
        Format::Table => {
            let width = figures.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
            let lines: Vec<String> = figures
                .iter()
                .map(|(p, x)| format!("{p:<width$}  {:>16}  {}", crate::csv::number(*x), unit(p).map_or("", |u| u.0)))
                .collect();
            super::print_out(lines.join("\n"))
        }
        Format::Csv => {
            let mut out = crate::csv::record(&["figure", "value", "unit", "kind"]);
            for (p, x) in &figures {
                let (u, k) = unit(p).unwrap_or(("", ""));
                out.push_str(&crate::csv::record(&[p.as_str(), &crate::csv::number(*x), u, k]));
            }
            super::print_bytes(out.as_bytes())
        }
    }
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
    let limit = report.change_pte_merge_limit_ns.map_or(String::new(), |l| {
        format!("; change-pte's merge may cost range-flush's + 1.1x (remap - zap) = {:.2} us/page", l / 1e3)
    });
    eprintln!(
        "vmm bench dedup: bare view remap {:.2} us/page, bare zap {:.3} us/page{limit}",
        report.bare_remap_ns / 1e3,
        report.bare_zap_ns / 1e3
    );
}

//! `vmm bench profile`: this host's cost profile, each figure from a
//! microbenchmark of its event in this lab on this host, never from the
//! workloads the model is checked against (`vmm bench model`): the exit
//! floor, the calibration guests `unique` and `converge` (whose passes and
//! reads isolate scans, zaps, in-place updates, merges, secondary-MMU
//! faults and host refaults), and the primary MMU's copy-on-write
//! copy timed in this process. Each cost's `source` says how.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use vmm::view::ViewKind;
use vmm::vm::{DedupPolicy, RunConfig};

use super::{exit_floor, BenchError};
use crate::compare::fold::{flatten, median};
use crate::compare::{run_once, CompareConfig, RunError};
use crate::cost::{Cost, CostKind, CostProfile, PROFILE_SCHEMA, PROFILE_VERSION};
use crate::progress::Progress;

/// The calibration guests' phases: the dedup pass, then the reads after it.
const PASS_PHASE: u32 = 2;
const READ_PHASE: u32 = 3;

/// How each cost is measured, as its profile entry says.
const EXIT_IO: &str = "`vmm bench floor`: the median port-I/O exit round trip through the VMM's exit path (KVM_RUN's \
                       return to its next return)";
const EXIT_OTHER: &str = "= exit_io: the same KVM_RUN round trip to the VMM (MMIO and port-I/O exits cost the same \
                          on this kind of host: 25.6 and 25.7 us in host-facts.md); not measured on its own";
const FAULT: &str = "`converge`'s reads after its pass under range-flush (every page zapped: one secondary-MMU fault \
                     each): their wall time beyond off's, per fault beyond off's";
const SCAN: &str = "wall time of `unique`'s dedup pass (nothing merges; the vCPU waits for the pass) per page scanned";
const ZAP: &str = "time inside the view per entry zapped in `converge`'s pass under range-flush \
                   (shadow_mmu.view_ns / zapped)";
const UPDATE: &str = "time inside the view per change_pte applied in `converge`'s pass under change-pte \
                      (shadow_mmu.view_ns / change_pte_applied)";
const MERGE: &str = "`converge`'s pass under range-flush: its wall time less its pages scanned x page_scanned and its \
                     time inside the view, per merge";
const MERGE_NONE: &str = "0: the pass took no longer than its scans and its view work, so a merge adds nothing \
                          measurable here; ";
const REFAULT: &str = "`converge`'s reads after its pass under change-pte (every page's host mapping replaced, no \
                       secondary-MMU fault): their wall time beyond off's, per pf_fixed beyond off's";
const COW: &str = "the primary MMU's wp_page_copy of write-protected pages timed in this process (frame allocated, \
                   4 KiB copied, pte changed inside a notified range; the secondary MMU behind a recording view), mean";
const FLUSH: &str = "0: a flush is no operation of its own in this lab; the view's zap or update that makes KVM's \
                     mapping go is timed under zap and change_pte, so it is not counted twice";

const VIEW_REMAP: &str = "a bare remap of one page of the uffd view's window (mmap of another frame, UFFDIO_REGISTER, \
                          UFFDIO_CONTINUE write-protected: vmm::view::uffd::bare_view_costs) plus one host_refault \
                          for the host KVM's retry of the fault the remap raced with";
const VIEW_REMAP_NONE: &str = "0: the memslot view has no window to remap; it counts no such event";

/// Pages the copy-on-write microbenchmark copies.
const COW_PAGES: u64 = 4_096;

/// Pages the bare remap of the uffd view's window is timed over.
const BARE_REMAP_PAGES: usize = 4_096;

/// Errors of `vmm bench profile`.
#[derive(Debug, thiserror::Error)]
pub enum ProfileBenchError {
    /// A bench it reuses (the exit floor, the fault) failed.
    #[error("measuring {what}")]
    Bench {
        /// The figure being measured.
        what: &'static str,
        /// Why.
        #[source]
        source: Box<BenchError>,
    },
    /// The bare remap of the uffd view could not be timed.
    #[error("cannot time a bare remap of the uffd view")]
    BareRemap(#[source] vmm::view::ViewError),
    /// A calibration run gave no statistics.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The directory for the runs' statistics could not be created.
    #[error("cannot create {path}")]
    CreateDir {
        /// The directory.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A calibration guest did not succeed.
    #[error("{image} under {policy}: {detail}")]
    Guest {
        /// The guest.
        image: &'static str,
        /// The policy.
        policy: &'static str,
        /// How the run ended.
        detail: String,
    },
    /// A calibration run counted none of the events a cost is per.
    #[error("{what}: {image} under {policy} counted no {per}, so no cost per event can be computed")]
    NothingCounted {
        /// The cost.
        what: &'static str,
        /// The guest.
        image: &'static str,
        /// The policy.
        policy: &'static str,
        /// The figure divided by.
        per: &'static str,
    },
    /// The in-process copy-on-write microbenchmark could not build its MMUs.
    #[error("building the copy-on-write microbenchmark's frame pool")]
    Pool(#[source] shadow_mmu::FramePoolError),
    /// The profile could not be written.
    #[error("cannot write the profile to {path}")]
    Write {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A copy-on-write copy failed.
    #[error("copying page {gfn} on write")]
    Cow {
        /// The guest page.
        gfn: u64,
        /// Why.
        #[source]
        source: shadow_mmu::PrimaryMmuError,
    },
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct ProfileBenchConfig {
    /// The profile's name.
    pub name: String,
    /// The view whose costs are measured.
    pub view: ViewKind,
    /// Guest RAM of the calibration guests and the fault bench.
    pub mem_bytes: u64,
    /// Runs per calibration guest and policy (figures are their medians).
    pub repeat: u32,
    /// Where the calibration runs' statistics go.
    pub out: PathBuf,
    /// Template for the calibration runs (image, policy and RAM are set per run).
    pub base: CompareConfig,
}

/// One calibration guest under one policy: per phase number, the median
/// of each flat figure over the repeats.
type Medians = BTreeMap<u32, BTreeMap<String, f64>>;

/// The calibration runs: (guest, policy).
const PLAN: [(&str, DedupPolicy); 4] = [
    ("unique", DedupPolicy::RangeFlush),
    ("converge", DedupPolicy::Off),
    ("converge", DedupPolicy::RangeFlush),
    ("converge", DedupPolicy::ChangePte),
];

/// Runs every guest and policy of [`PLAN`] `config.repeat` times,
/// interleaved repeat by repeat (so that a drift of the machine hits all
/// alike), and folds each one's phases.
fn calibrate(config: &ProfileBenchConfig, progress: &mut dyn Progress) -> Result<[Medians; 4], ProfileBenchError> {
    let mut values: [BTreeMap<u32, BTreeMap<String, Vec<u64>>>; 4] = Default::default();
    let total = config.repeat * PLAN.len() as u32;
    for repeat in 0..config.repeat {
        for (k, &(image, policy)) in PLAN.iter().enumerate() {
            let what =
                format!("calibrating: {image} under {} (repeat {}/{})", policy.name(), repeat + 1, config.repeat);
            progress.step(repeat * PLAN.len() as u32 + k as u32, total, &what);
            let run = CompareConfig {
                image: image.into(),
                mem_bytes: config.mem_bytes,
                view: config.view,
                ..config.base.clone()
            };
            let path = config.out.join(format!("{image}-{}-{repeat}.json", policy.name()));
            let (status, stats) = run_once(&run, policy, &path)?;
            if status != 0 {
                return Err(ProfileBenchError::Guest { image, policy: policy.name(), detail: stats.guest.end.detail });
            }
            for phase in &stats.phases {
                for (name, v) in flatten(&phase.figures) {
                    values[k].entry(phase.phase).or_default().entry(name).or_default().push(v);
                }
            }
        }
    }
    Ok(values.map(|by_phase| {
        by_phase.into_iter().map(|(n, m)| (n, m.into_iter().map(|(k, v)| (k, median(&v))).collect())).collect()
    }))
}

/// A figure of one phase (0 when the counter did not move).
fn figure(m: &Medians, phase: u32, name: &str) -> f64 {
    m.get(&phase).and_then(|p| p.get(name)).copied().unwrap_or(0.0)
}

/// `num / den`, or the error that names what was not counted.
fn per(
    num: f64,
    den: f64,
    what: &'static str,
    (image, policy): (&'static str, DedupPolicy),
    per: &'static str,
) -> Result<f64, ProfileBenchError> {
    if den > 0.0 {
        Ok((num / den).max(0.0))
    } else {
        Err(ProfileBenchError::NothingCounted { what, image, policy: policy.name(), per })
    }
}

fn cost(ns: f64, kind: CostKind, source: String) -> Cost {
    Cost { ns, kind, source }
}

/// The costs the calibration guests measure: scans, zaps, in-place
/// updates, merges and host refaults.
fn calibration_costs(
    config: &ProfileBenchConfig,
    progress: &mut dyn Progress,
) -> Result<BTreeMap<String, Cost>, ProfileBenchError> {
    use DedupPolicy::{ChangePte, RangeFlush};
    let [unique, off, rf, cp] = calibrate(config, progress)?;
    let how =
        format!("{} MiB, {} view, median of {} run(s)", config.mem_bytes >> 20, config.view.name(), config.repeat);
    let (p, r) = (PASS_PHASE, READ_PHASE);
    let scan = per(
        figure(&unique, p, "wall_ns"),
        figure(&unique, p, "ksm.pages_scanned"),
        "page_scanned",
        ("unique", RangeFlush),
        "pages scanned",
    )?;
    let zap = per(
        figure(&rf, p, "shadow_mmu.view_ns"),
        figure(&rf, p, "shadow_mmu.zapped"),
        "zap",
        ("converge", RangeFlush),
        "entries zapped",
    )?;
    let update = per(
        figure(&cp, p, "shadow_mmu.view_ns"),
        figure(&cp, p, "shadow_mmu.change_pte_applied"),
        "change_pte",
        ("converge", ChangePte),
        "change_pte updates",
    )?;
    let merge_ns =
        figure(&rf, p, "wall_ns") - figure(&rf, p, "ksm.pages_scanned") * scan - figure(&rf, p, "shadow_mmu.view_ns");
    let merge = per(merge_ns, figure(&rf, p, "ksm.merges"), "merge", ("converge", RangeFlush), "merges")?;
    let faults = |m: &Medians| {
        ["exits.ept_read", "exits.ept_write", "exits.ept_fetch"].iter().map(|f| figure(m, r, f)).sum::<f64>()
    };
    let fault = per(
        figure(&rf, r, "wall_ns") - figure(&off, r, "wall_ns"),
        faults(&rf) - faults(&off),
        "secondary_mmu_fault",
        ("converge", RangeFlush),
        "secondary-MMU faults",
    )?;
    let refaults = figure(&cp, r, "kvm.pf_fixed") - figure(&off, r, "kvm.pf_fixed");
    let refault = per(
        figure(&cp, r, "wall_ns") - figure(&off, r, "wall_ns"),
        refaults,
        "host_refault",
        ("converge", ChangePte),
        "host refaults",
    )?;
    let measured = |ns, source: &str| (ns, CostKind::Measured, format!("{source}; {how}"));
    let merge_source = if merge == 0.0 { format!("{MERGE_NONE}{MERGE}") } else { MERGE.to_string() };
    Ok(BTreeMap::from([
        ("secondary_mmu_fault", measured(fault, FAULT)),
        ("page_scanned", measured(scan, SCAN)),
        ("zap", measured(zap, ZAP)),
        ("change_pte", measured(update, UPDATE)),
        ("merge", (merge, CostKind::Derived, format!("{merge_source}; {how}"))),
        ("host_refault", measured(refault, REFAULT)),
    ])
    .into_iter()
    .map(|(key, (ns, kind, source))| (key.to_string(), cost(ns, kind, source)))
    .collect())
}

/// The primary MMU's copy-on-write copy (`wp_page_copy`: a frame
/// allocated, 4 KiB copied, the pte changed inside a notified range), timed
/// in this process over [`COW_PAGES`] write-protected pages, with the
/// secondary MMU behind a recording view (so no view work is in it).
fn cow_copy_ns() -> Result<f64, ProfileBenchError> {
    use shadow_mmu::{GuestMmus, Policy};
    let mmus =
        GuestMmus::new_recording(Policy::RangeFlush, 0, COW_PAGES, COW_PAGES).map_err(ProfileBenchError::Pool)?;
    let mut mm = mmus.mm.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for gfn in 0..COW_PAGES {
        mm.write_protect_page(gfn).map_err(|source| ProfileBenchError::Cow { gfn, source })?;
    }
    let start = Instant::now();
    for gfn in 0..COW_PAGES {
        mm.wp_page_copy(gfn).map_err(|source| ProfileBenchError::Cow { gfn, source })?;
    }
    Ok(start.elapsed().as_nanos() as f64 / COW_PAGES as f64)
}

/// A remap of the view during a fault: under the uffd view its bare
/// mechanism, timed in this process, plus the host KVM's retry
/// (`refault_ns`, one host refault).
fn view_remap_cost(view: ViewKind, refault_ns: f64) -> Result<Cost, ProfileBenchError> {
    if view != ViewKind::Uffd {
        return Ok(cost(0.0, CostKind::Derived, VIEW_REMAP_NONE.into()));
    }
    let bare = vmm::view::uffd::bare_view_costs(BARE_REMAP_PAGES).map_err(ProfileBenchError::BareRemap)?;
    Ok(cost(bare.remap_ns + refault_ns, CostKind::Derived, format!("{VIEW_REMAP} ({BARE_REMAP_PAGES} pages)")))
}

/// The exit round trip, from the exit-floor bench. (The secondary-MMU
/// fault is measured on a calibration guest rather than by `vmm bench
/// fault`, so that every figure but this one comes from the same runs.)
fn bench_costs(
    make: &dyn Fn(&'static str) -> RunConfig,
    progress: &mut dyn Progress,
) -> Result<BTreeMap<String, Cost>, ProfileBenchError> {
    let bench = |what| move |e| ProfileBenchError::Bench { what, source: Box::new(e) };
    progress.note("measuring the exit floor");
    let floor = exit_floor(make("misbehave-port-flood"), 1_000, 10_000).map_err(bench("exit_io"))?;
    let exit = floor.port_io_exit.median_ns;
    Ok(BTreeMap::from([
        (
            "exit_io".into(),
            cost(exit, CostKind::Measured, format!("{EXIT_IO} ({} samples)", floor.port_io_exit.samples)),
        ),
        ("exit_other".into(), cost(exit, CostKind::Derived, EXIT_OTHER.into())),
    ]))
}

/// The host, for people: name, kernel, CPU model.
fn host_line(view: ViewKind) -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|l| l.trim_start_matches([' ', '\t', ':']));
    format!(
        "{} (Linux {}, {}, {} CPUs), the {} view of this lab",
        read("/proc/sys/kernel/hostname").trim(),
        read("/proc/sys/kernel/osrelease").trim(),
        cpu.unwrap_or("CPU unknown"),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        view.name()
    )
}

/// Measures this host's profile; `make` builds a bench run of a built-in
/// guest under the view (as `vmm bench fault` does).
pub fn bench_profile(
    config: &ProfileBenchConfig,
    make: &dyn Fn(&'static str) -> RunConfig,
    progress: &mut dyn Progress,
) -> Result<CostProfile, ProfileBenchError> {
    std::fs::create_dir_all(&config.out)
        .map_err(|source| ProfileBenchError::CreateDir { path: config.out.display().to_string(), source })?;
    let mut costs = bench_costs(make, progress)?;
    costs.extend(calibration_costs(config, progress)?);
    let cow = format!("{COW} ({COW_PAGES} pages)");
    costs.insert("cow_copy".into(), cost(cow_copy_ns()?, CostKind::Measured, cow));
    costs.insert("tlb_flush".into(), cost(0.0, CostKind::Derived, FLUSH.into()));
    let refault = costs.get("host_refault").map_or(0.0, |c| c.ns);
    costs.insert("view_remap".into(), view_remap_cost(config.view, refault)?);
    Ok(CostProfile {
        schema: PROFILE_SCHEMA.into(),
        version: PROFILE_VERSION,
        name: config.name.clone(),
        host: host_line(config.view),
        costs,
        not_found: Vec::new(),
    })
}

/// Writes a profile's JSON text to `path`, with a final newline.
pub fn write_profile(path: &std::path::Path, json: &str) -> Result<(), ProfileBenchError> {
    std::fs::write(path, format!("{json}\n"))
        .map_err(|source| ProfileBenchError::Write { path: path.display().to_string(), source })
}

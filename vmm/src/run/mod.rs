//! One run of a guest, from a [`RunConfig`] to its [`RunStats`]: build the
//! VM, open the control socket, run the vCPU until the run ends
//! (`vcpu_loop`), then settle the end of the run (stop the VMM's helper
//! threads, take the last readings, give the host's KSM back: `end`).

mod end;
mod fleet;
mod vcpu_loop;

use std::sync::Arc;
use std::time::Duration;

pub use end::exit_status;

use crate::builder::build_fleet;
use crate::config::{HookPoint, MmHook, MmHookError, RunConfig};
use crate::control::{ControlServer, ControlState};
use crate::dedup::{DedupError, RunState};
use crate::guest_ram::GuestRamError;
use crate::phases::PhaseTracker;
use crate::serial::Console;
use crate::soft_dirty::SoftDirtyThread;
use crate::stats::{ConfigRecord, GuestRecord, RunStats, SCHEMA_VERSION};
use crate::vcpu::{Devices, RunEnd};
use crate::view::ViewError;
use crate::vm::{lock, Vm, VmError};

/// Why the VMM could not go on serving a started guest. The run then ends
/// as `vmm_error`, with this error's chain in its record.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A secondary-MMU fault or an access the VMM completes failed.
    #[error(transparent)]
    GuestRam(#[from] GuestRamError),
    /// The deduplicator failed.
    #[error(transparent)]
    Dedup(#[from] DedupError),
    /// The view could not follow a change of the secondary MMU.
    #[error(transparent)]
    View(#[from] ViewError),
    /// A memory hook failed.
    #[error("memory hook at {point:?} failed")]
    Hook {
        /// When it was called.
        point: HookPoint,
        /// Its error.
        #[source]
        source: MmHookError,
    },
}

/// Builds the VMs and runs the guests to their end: one guest alone, or a
/// fleet (`config.guests` > 1, see `run/fleet.rs`). An error means nothing ran
/// (bad configuration or KVM setup); every way a started guest ends, clean
/// or not, comes back as statistics.
pub fn run(mut config: RunConfig) -> Result<RunStats, VmError> {
    let mut vms = build_fleet(&config)?;
    let record = ConfigRecord {
        image: config.image.name.clone(),
        mem_bytes: config.mem_bytes,
        dedup: config.dedup.name().to_string(),
        view: config.dedup.effective_view(config.view).name().to_string(),
        timeout_secs: config.timeout.map(|t| t.as_secs_f64()),
        guests: config.guests,
    };
    let units = crate::units::of_vm(&vms[0]);
    if vms.len() > 1 {
        return Ok(fleet::run_fleet(vms, &mut config, record, units));
    }
    let vm = vms.remove(0);
    let console = std::mem::replace(&mut config.console, Box::new(std::io::sink()));
    let mut devices = Devices { console: Console::new(console), reports: Vec::new(), memory: vm.guest_ram() };
    let control = Arc::new(ControlState::for_vm(&vm, config.dedup.name()));
    let server = config.control.as_deref().map(|p| ControlServer::start(p, control.clone())).transpose()?;
    let hook = config.mm_hook.take();
    let settled = run_alone(vm, &mut devices, hook, &control, &config);
    drop(server);
    Ok(RunStats {
        schema: SCHEMA_VERSION,
        config: record,
        guest: guest_record(&settled, devices),
        phases: settled.phases,
        total: settled.total,
        units,
        guests: Vec::new(),
    })
}

/// Runs a guest alone, the deduplicator started and stopped with it.
fn run_alone(
    mut vm: Vm,
    devices: &mut Devices,
    hook: Option<MmHook>,
    control: &ControlState,
    config: &RunConfig,
) -> end::Settled {
    let started = start_dedup(&vm, config);
    let rounds = match started.and_then(|()| start_soft_dirty(&vm, config.soft_dirty_interval)) {
        Ok(rounds) => rounds,
        // The guest never ran: phase 0 is reported, empty, with every figure.
        Err(end) => return end::never_started(&vm, end, PhaseTracker::start(&vm)),
    };
    let (end, phases) = vcpu_loop::VcpuLoop::start(&mut vm, devices, hook, control, config.timeout).run();
    end::settle(vm, end, phases, control, rounds)
}

/// The deduplicator's run state at the start (`--ksm-run`).
fn start_dedup(vm: &Vm, config: &RunConfig) -> Result<(), RunEnd> {
    RunState::try_from(config.ksm.run)
        .and_then(|state| lock(&vm.dedup).set_run(state))
        .map_err(|e| RunEnd::vmm_error(&e))
}

/// The guest's record, its console flushed (a console that could not be
/// written is said once).
fn guest_record(settled: &end::Settled, mut devices: Devices) -> GuestRecord {
    devices.console.flush();
    if let Some(e) = devices.console.lost() {
        eprintln!("vmm: the guest's console output could not all be written: {e}");
    }
    GuestRecord {
        exit_code: settled.exit_code(),
        reports: devices.reports,
        end: end::end_record(&settled.end, settled.rip),
    }
}

/// The `--soft-dirty-ms` thread, if asked for. Its failure raises the flag
/// the watchdog polls for a failed ksmd (either ends the run at once).
fn start_soft_dirty(vm: &Vm, interval: Option<Duration>) -> Result<Option<SoftDirtyThread>, RunEnd> {
    let Some(interval) = interval else { return Ok(None) };
    let failed = lock(&vm.dedup).ksmd_failure_flag();
    SoftDirtyThread::start(vm.mm.clone(), interval, failed)
        .map(Some)
        .map_err(|e| RunEnd::VmmError(format!("cannot start the soft-dirty thread: {e}")))
}

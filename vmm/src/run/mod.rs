//! One run of a guest, from a [`RunConfig`] to its [`RunStats`]: build the
//! VM, open the control socket, run the vCPU until the run ends
//! (`vcpu_loop`), then settle the end of the run (stop the VMM's helper
//! threads, take the last readings, give the host's KSM back: `end`).

mod end;
mod vcpu_loop;

use std::sync::Arc;
use std::time::Duration;

pub use end::exit_status;

use crate::config::{HookPoint, MmHookError, RunConfig};
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

/// Builds the VM and runs the guest to its end. An error means nothing ran
/// (bad configuration or KVM setup); every way a started guest ends, clean
/// or not, comes back as statistics.
pub fn run(config: RunConfig) -> Result<RunStats, VmError> {
    let mut vm = Vm::new(&config)?;
    let record = ConfigRecord {
        image: config.image.name.clone(),
        mem_bytes: config.mem_bytes,
        dedup: config.dedup.name().to_string(),
        view: config.dedup.effective_view(config.view).name().to_string(),
        timeout_secs: config.timeout.map(|t| t.as_secs_f64()),
    };
    let mut devices = Devices { console: Console::new(config.console), reports: Vec::new(), memory: vm.guest_ram() };
    let control = Arc::new(ControlState::for_vm(&vm, config.dedup.name()));
    let units = crate::units::of_vm(&vm);
    let server = config.control.as_deref().map(|p| ControlServer::start(p, control.clone())).transpose()?;
    let started = RunState::try_from(config.ksm.run)
        .and_then(|state| lock(&vm.dedup).set_run(state))
        .map_err(|e| RunEnd::vmm_error(&e))
        .and_then(|()| start_soft_dirty(&vm, config.soft_dirty_interval));
    let settled = match started {
        Ok(rounds) => {
            let (end, phases) =
                vcpu_loop::VcpuLoop::start(&mut vm, &mut devices, config.mm_hook, &control, config.timeout).run();
            end::settle(vm, end, phases, &control, rounds)
        }
        // The guest never ran: phase 0 is reported, empty, with every figure.
        Err(end) => end::never_started(&vm, end, PhaseTracker::start(&vm)),
    };
    drop(server);
    devices.console.flush();
    if let Some(e) = devices.console.lost() {
        eprintln!("vmm: the guest's console output could not all be written: {e}");
    }
    Ok(RunStats {
        schema: SCHEMA_VERSION,
        config: record,
        guest: GuestRecord {
            exit_code: settled.exit_code(),
            reports: devices.reports,
            end: end::end_record(&settled.end, settled.rip),
        },
        phases: settled.phases,
        total: settled.total,
        units,
    })
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

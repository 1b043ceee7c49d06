//! The vCPU loop: enter the guest, map the exit to an outcome
//! ([`handle_exit`]), act on the outcome, until the run ends.

use std::sync::atomic::Ordering;
use std::time::Duration;

use shadow_mmu::Access;

use super::RunError;
use crate::config::{HookPoint, MmHook};
use crate::control::ControlState;
use crate::guest_ram::{GuestRam, GuestRamError};
use crate::phases::PhaseTracker;
use crate::signals::{StopRequest, Watchdog};
use crate::stats::ExitKind;
use crate::vcpu::{handle_exit, handle_run_error, Devices, Outcome, RunEnd, MAX_PHASES};
use crate::vm::{lock, Vm};
use crate::x86::MAX_INSN_LEN;

/// The state of a running vCPU loop.
pub(super) struct VcpuLoop<'a> {
    vm: &'a mut Vm,
    devices: &'a mut Devices,
    hook: Option<MmHook>,
    control: &'a ControlState,
    watchdog: Watchdog,
    phases: PhaseTracker,
}

impl<'a> VcpuLoop<'a> {
    /// Starts phase 0 and the watchdog on the calling thread, which becomes
    /// the vCPU thread.
    pub(super) fn start(
        vm: &'a mut Vm,
        devices: &'a mut Devices,
        hook: Option<MmHook>,
        control: &'a ControlState,
        timeout: Option<Duration>,
    ) -> Self {
        // Phase 0 starts before the deadline is set: a run ended by its
        // timeout always spans at least the timeout.
        let phases = PhaseTracker::start(vm);
        let faults = vm.view_faults.clone();
        let ksmd_failed = lock(&vm.dedup).ksmd_failure_flag();
        // A view that could not follow a change made off the vCPU thread (by
        // ksmd) ends the run at once, not at the guest's next exit.
        let mmu = vm.mmu.clone();
        let failed = move || faults.failed() || ksmd_failed.load(Ordering::SeqCst) || lock(&mmu).has_view_error();
        let watchdog = Watchdog::start(timeout, Box::new(failed));
        vm.gate.register_vcpu_thread();
        Self { vm, devices, hook, control, watchdog, phases }
    }

    /// Runs the guest until the run ends; returns how, and the phases so
    /// far. The watchdog stops here.
    pub(super) fn run(mut self) -> (RunEnd, PhaseTracker) {
        let end = loop {
            self.vm.gate.enter_run();
            let result = self.vm.vcpu.run();
            self.vm.gate.exit_run();
            let outcome = match result {
                Ok(exit) => handle_exit(self.devices, self.phases.exits(), exit),
                Err(e) => handle_run_error(&e, self.phases.exits(), &self.watchdog),
            };
            match self.act(outcome) {
                Ok(None) => {}
                Ok(Some(end)) => break end,
                Err(e) => break RunEnd::vmm_error(&e),
            }
        };
        (end, self.phases)
    }

    /// Acts on one outcome: Some(end) when the run is over.
    fn act(&mut self, outcome: Outcome) -> Result<Option<RunEnd>, RunError> {
        match outcome {
            Outcome::Continue => Ok(None),
            Outcome::NextPhase(n) => self.next_phase(n),
            // The vCPU waits while the deduplicator serves the request.
            Outcome::Dedup(value) => self.dedup_request(value),
            Outcome::EmulationFailure => self.emulation_failure(),
            Outcome::VmmThreadFailed => Ok(Some(self.thread_failure())),
            Outcome::End(end) => Ok(Some(end)),
        }
    }

    fn next_phase(&mut self, n: u32) -> Result<Option<RunEnd>, RunError> {
        if self.phases.count() >= MAX_PHASES {
            return Ok(Some(RunEnd::GuestLimit(format!(
                "the guest started more than {MAX_PHASES} phases (port 0x500); the run was ended"
            ))));
        }
        self.phases.next(self.vm, n);
        self.control.phase.store(n, Ordering::SeqCst);
        let failed = lock(&self.vm.dedup).ksmd_failed();
        if let Some(e) = failed {
            return Err(e.into());
        }
        self.call_hook(HookPoint::PhaseStart(n)).map(|()| None)
    }

    /// A request on port 0x501. A pass of the host's ksmd polls the
    /// watchdog: cancelled by a timeout or a signal, the run ends as that.
    fn dedup_request(&mut self, value: u32) -> Result<Option<RunEnd>, RunError> {
        let watchdog = &self.watchdog;
        let served = lock(&self.vm.dedup).request(value, &|| watchdog.stop_request() != StopRequest::None);
        match served {
            Err(e) if e.is_cancelled() => return Ok(Some(self.stopped())),
            other => other?,
        }
        view_error(self.vm)?;
        self.call_hook(HookPoint::DedupRequest(value)).map(|()| None)
    }

    /// How the run ends when the watchdog stopped the work under way.
    fn stopped(&mut self) -> RunEnd {
        match self.watchdog.stop_request() {
            StopRequest::Timeout => RunEnd::Timeout,
            StopRequest::Interrupted(sig) => RunEnd::Interrupted(sig),
            StopRequest::VmmFailure | StopRequest::None => self.thread_failure(),
        }
    }

    /// KVM could not emulate an instruction: a fetch from a page the
    /// secondary MMU does not map (counted `ept_fetch`, served, and the
    /// guest goes on), or a real failure (`internal_error`).
    fn emulation_failure(&mut self) -> Result<Option<RunEnd>, RunError> {
        let fetch = serve_fetch(self.vm, &self.devices.memory);
        let kind = if matches!(fetch, Ok(false)) { ExitKind::InternalError } else { ExitKind::EptFetch };
        self.phases.exits().record(kind);
        match fetch? {
            true => Ok(None),
            false => Ok(Some(RunEnd::InternalError)),
        }
    }

    /// A VMM thread serving the guest failed: the end carries its error.
    fn thread_failure(&mut self) -> RunEnd {
        if let Some(e) = lock(&self.vm.dedup).ksmd_failed() {
            return RunEnd::vmm_error(&e);
        }
        match view_error(self.vm) {
            Err(e) => RunEnd::vmm_error(&e),
            // The fault thread's own error replaces this one when it stops.
            Ok(()) => RunEnd::VmmError("a VMM thread serving the guest failed".into()),
        }
    }

    /// Calls the memory hook, then reports a view that could not follow.
    fn call_hook(&mut self, point: HookPoint) -> Result<(), RunError> {
        if let Some(hook) = self.hook.as_mut() {
            hook(point, &mut lock(&self.vm.mm)).map_err(|source| RunError::Hook { point, source })?;
        }
        view_error(self.vm)
    }
}

/// A view that could not follow its secondary MMU ends the run.
fn view_error(vm: &Vm) -> Result<(), RunError> {
    match lock(&vm.mmu).take_view_error() {
        Some(e) => Err(RunError::View(e)),
        None => Ok(()),
    }
}

/// An emulation failure at RIP: if the instruction's bytes are guest RAM
/// the secondary MMU does not map (a fetch from a memslot hole), serve the
/// fetch fault and return true.
fn serve_fetch(vm: &Vm, memory: &GuestRam) -> Result<bool, GuestRamError> {
    let Ok(regs) = vm.vcpu.get_regs() else { return Ok(false) };
    // The guest's page tables are the identity map: gpa = RIP.
    for gpa in [regs.rip, regs.rip + MAX_INSN_LEN - 1] {
        if memory.is_guest_ram(gpa) && !memory.is_mapped(gpa) {
            memory.fault(gpa, Access::Fetch)?;
            return Ok(true);
        }
    }
    Ok(false)
}

//! One run of a guest, from a [`RunConfig`] to its [`RunStats`].

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use shadow_mmu::Access;

use crate::control::{ControlServer, ControlState};
use crate::dedup::DedupControl;
use crate::phases::PhaseTracker;
use crate::serial::Console;
use crate::signals::{StopRequest, Watchdog};
use crate::stats::{ConfigRecord, EndRecord, ExitKind, Figures, GuestRecord, PhaseStats, RunStats, SCHEMA_VERSION};
use crate::vcpu::{handle_exit, handle_run_error, Devices, GuestRam, Outcome, RunEnd, MAX_PHASES};
use crate::vm::{lock, HookPoint, MmHook, RunConfig, Vm, VmError};

/// HLT's opcode, looked for at RIP when a CPL-3 guest's HLT surfaces as a
/// fault (HLT is privileged; with no IDT the #GP becomes a triple fault).
const HLT_OPCODE: u8 = 0xF4;
/// KVM_INTERNAL_ERROR_EMULATION: the suberror of an instruction KVM could
/// not emulate, which is how a fetch from a memslot hole comes back.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
/// The longest x86 instruction, for fetches that straddle a page boundary.
const MAX_INSN_LEN: u64 = 15;

/// Builds the VM and runs the guest to its end. An error means nothing ran
/// (bad configuration or KVM setup); every way a started guest ends, clean
/// or not, comes back as statistics.
pub fn run(mut config: RunConfig) -> Result<RunStats, VmError> {
    let vm = Vm::new(&config)?;
    let record = ConfigRecord {
        image: config.image.name.clone(),
        mem_bytes: config.mem_bytes,
        dedup: config.dedup.name().to_string(),
        view: config.dedup.effective_view(config.view).name().to_string(),
        timeout_secs: config.timeout.map(|t| t.as_secs_f64()),
    };
    let memory = vm.guest_ram();
    let mut devices = Devices { console: Console::new(config.console), reports: Vec::new(), memory };
    let mut hook = config.mm_hook.take();
    let dedup = Arc::new(Mutex::new(DedupControl::new(vm.ksm.clone(), vm.mm.clone(), vm.host_ksm.clone())));
    let control = Arc::new(ControlState {
        dedup: dedup.clone(),
        phase: AtomicU32::new(0),
        policy: config.dedup.name().to_string(),
        ksm_figures: {
            let (ksm, host_ksm, host) = (vm.ksm.clone(), vm.host_ksm.clone(), vm.mm.clone());
            Box::new(move || crate::phases::dedup_figures(ksm.as_ref(), host_ksm.as_ref(), &host))
        },
        closed: AtomicBool::new(false),
    });
    let server = match config.control.as_deref().map(|p| ControlServer::start(p, control.clone())).transpose() {
        Ok(s) => s,
        Err(e) => return Err(VmError::Control(e)),
    };
    let started = lock(&dedup).set_run(config.ksm.run);
    let (end, phases, total, rip) = match started {
        Ok(()) => run_loop(vm, &mut devices, &mut hook, &control, config.timeout),
        // The guest never ran: phase 0 is reported, empty, with every figure.
        Err(e) => {
            let (phases, total) = PhaseTracker::start(&vm).finish(&vm);
            (RunEnd::VmmError(e), phases, total, None)
        }
    };
    drop(server);
    devices.console.flush();
    let exit_code = match end {
        RunEnd::GuestExit(code) => Some(code),
        RunEnd::Hlt => Some(0),
        _ => None,
    };
    Ok(RunStats {
        schema: SCHEMA_VERSION,
        config: record,
        guest: GuestRecord { exit_code, reports: devices.reports, end: end_record(&end, rip) },
        phases,
        total,
    })
}

type LoopResult = (RunEnd, Vec<PhaseStats>, Figures, Option<u64>);

/// A view that could not follow its secondary MMU ends the run.
fn view_error(vm: &Vm) -> Result<(), String> {
    match lock(&vm.mmu).take_view_error() {
        Some(e) => Err(e.to_string()),
        None => Ok(()),
    }
}

/// Calls the host hook, then reports a view that could not follow.
fn call_hook(hook: &mut Option<MmHook>, vm: &Vm, point: HookPoint) -> Result<(), String> {
    if let Some(hook) = hook.as_mut() {
        hook(point, &mut lock(&vm.mm)).map_err(|e| format!("host hook at {point:?} failed: {e}"))?;
    }
    view_error(vm)
}

/// An emulation failure at `rip`: if the instruction's bytes are guest RAM
/// the secondary MMU does not map (a fetch from a memslot hole), serve the
/// fetch fault and go on; otherwise the run ends.
fn serve_fetch(vm: &Vm, memory: &GuestRam) -> Result<bool, String> {
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

fn run_loop(
    mut vm: Vm,
    devices: &mut Devices,
    hook: &mut Option<MmHook>,
    control: &ControlState,
    timeout: Option<std::time::Duration>,
) -> LoopResult {
    let dedup = &control.dedup;
    let faults = vm.view_faults.clone();
    let ksmd_failed = lock(dedup).ksmd_failure_flag();
    // A view that could not follow a change made off the vCPU thread (by
    // ksmd) ends the run at once, not at the guest's next exit.
    let mmu = vm.mmu.clone();
    let failed = move || faults.failed() || ksmd_failed.load(Ordering::SeqCst) || lock(&mmu).has_view_error();
    let watchdog = Watchdog::start(timeout, Box::new(failed));
    vm.gate.register_vcpu_thread();
    let mut phases = PhaseTracker::start(&vm);
    let mut end = loop {
        vm.gate.enter_run();
        let result = vm.vcpu.run();
        vm.gate.exit_run();
        let outcome = match result {
            Ok(exit) => handle_exit(devices, phases.exits(), exit),
            Err(e) => handle_run_error(&e, phases.exits(), &watchdog),
        };
        let result = match outcome {
            Outcome::Continue => Ok(()),
            Outcome::NextPhase(_) if phases.count() >= MAX_PHASES => {
                break RunEnd::GuestLimit(format!(
                    "the guest started more than {MAX_PHASES} phases (port 0x500); the run was ended"
                ));
            }
            Outcome::NextPhase(n) => {
                phases.next(&vm, n);
                control.phase.store(n, Ordering::SeqCst);
                let failed = lock(dedup).ksmd_failed();
                match failed {
                    Some(e) => Err(e),
                    None => call_hook(hook, &vm, HookPoint::PhaseStart(n)),
                }
            }
            // The vCPU waits while the deduplicator serves the request.
            Outcome::Dedup(v) => lock(dedup)
                .request(v, &|| watchdog.stop_request() != StopRequest::None)
                .and_then(|()| view_error(&vm))
                .and_then(|()| call_hook(hook, &vm, HookPoint::DedupRequest(v))),
            Outcome::EmulationFailure => match serve_fetch(&vm, &devices.memory) {
                Ok(true) => {
                    phases.exits().record(ExitKind::EptFetch);
                    Ok(())
                }
                Ok(false) => {
                    phases.exits().record(ExitKind::InternalError);
                    break RunEnd::InternalError;
                }
                Err(e) => {
                    phases.exits().record(ExitKind::EptFetch);
                    Err(e)
                }
            },
            // The fault thread's own error replaces this one below.
            Outcome::VmmThreadFailed => {
                let failed = lock(dedup).ksmd_failed().or_else(|| view_error(&vm).err());
                break RunEnd::VmmError(failed.unwrap_or_else(|| "a VMM thread serving the guest failed".into()));
            }
            Outcome::End(end) => break end,
        };
        if let Err(e) = result {
            break RunEnd::VmmError(e);
        }
    };
    drop(watchdog);
    if let Some(thread) = vm.fault_thread.take() {
        if let Some(e) = thread.stop() {
            end = RunEnd::VmmError(format!("userfaultfd fault thread: {e}"));
        }
    }
    let shut = {
        let mut d = lock(dedup);
        // No run-state change from outside after this (it would restart ksmd
        // for the last readings, or change the host's KSM after its release).
        control.closed.store(true, Ordering::SeqCst);
        d.shutdown()
    };
    if let Err(e) = shut {
        if matches!(end, RunEnd::GuestExit(_) | RunEnd::Hlt) {
            end = RunEnd::VmmError(e);
        }
    }
    let rip = match end {
        RunEnd::GuestExit(_) | RunEnd::Hlt => None,
        _ => vm.vcpu.get_regs().ok().map(|r| r.rip),
    };
    if end == RunEnd::TripleFault {
        let mut op = [0u8; 1];
        if rip.is_some_and(|rip| vm.read_guest(rip, &mut op) && op[0] == HLT_OPCODE) {
            let exits = phases.exits();
            exits.shutdown -= 1;
            exits.hlt += 1;
            end = RunEnd::Hlt;
        }
    }
    if end == RunEnd::InternalError {
        // SAFETY: reading the `internal` member of the kvm_run union is what
        // KVM_EXIT_INTERNAL_ERROR documents; it is plain data.
        let suberror = unsafe { vm.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
        // Under the memslot view the emulator performs every access to a
        // page the secondary MMU unmapped or write-protected; AVX is the
        // known case it cannot do (guest-images/README.md).
        let what = if suberror == KVM_INTERNAL_ERROR_EMULATION {
            " (instruction emulation failed: KVM's emulator cannot perform this access to a page the secondary MMU \
             unmapped or write-protected; AVX is such an access, --view uffd needs no emulation)"
        } else {
            ""
        };
        end = RunEnd::Unexpected(format!("KVM internal error, suberror {suberror}{what}"));
    }
    let (phase_stats, total) = phases.finish(&vm);
    let released = lock(dedup).release();
    if let Err(e) = released {
        if matches!(end, RunEnd::GuestExit(_) | RunEnd::Hlt) {
            end = RunEnd::VmmError(e);
        }
    }
    (end, phase_stats, total, rip)
}

fn end_record(end: &RunEnd, rip: Option<u64>) -> EndRecord {
    let (reason, detail) = match end {
        RunEnd::GuestExit(code) => ("exit", format!("the guest wrote {code} to port 0xf4")),
        RunEnd::Hlt => ("hlt", "the guest halted with interrupts disabled".to_string()),
        RunEnd::TripleFault => ("triple_fault", "the guest triple-faulted (an exception with no IDT)".to_string()),
        RunEnd::Timeout => ("timeout", "the guest was still running when --timeout expired".to_string()),
        RunEnd::Interrupted => ("interrupted", "the run was interrupted (SIGINT or SIGTERM)".to_string()),
        RunEnd::InternalError => ("internal_error", "KVM reported an internal error".to_string()),
        RunEnd::FailEntry(r) => ("fail_entry", format!("VM entry failed, hardware reason {r:#x}")),
        RunEnd::Unexpected(what) => ("unexpected_exit", what.clone()),
        RunEnd::KvmRunFailed(what) => ("vmm_error", format!("KVM_RUN failed: {what}")),
        RunEnd::VmmError(what) => ("vmm_error", what.clone()),
        RunEnd::GuestLimit(what) => ("guest_limit", what.clone()),
    };
    let detail = match rip {
        Some(rip) => format!("{detail}, RIP {rip:#x}"),
        None => detail,
    };
    EndRecord { reason: reason.to_string(), rip, detail }
}

/// The VMM's exit status for a run: 0 when the guest succeeded, 1 when it
/// reported a non-zero exit code, 3 when it ended abnormally.
pub fn exit_status(stats: &RunStats) -> u8 {
    match stats.guest.exit_code {
        Some(0) => 0,
        Some(_) => 1,
        None => 3,
    }
}

//! One run of a guest, from a [`RunConfig`] to its [`RunStats`].

use crate::phases::PhaseTracker;
use crate::serial::Console;
use crate::signals::Watchdog;
use crate::stats::{ConfigRecord, EndRecord, GuestRecord, RunStats, SCHEMA_VERSION};
use crate::vcpu::{handle_exit, handle_run_error, Devices, Outcome, RunEnd};
use crate::vm::{RunConfig, Vm, VmError};

/// HLT's opcode, looked for at RIP when a CPL-3 guest's HLT surfaces as a
/// fault (HLT is privileged; with no IDT the #GP becomes a triple fault).
const HLT_OPCODE: u8 = 0xF4;

/// Builds the VM and runs the guest to its end. An error means nothing ran
/// (bad configuration or KVM setup); every way a started guest ends, clean
/// or not, comes back as statistics.
pub fn run(config: RunConfig) -> Result<RunStats, VmError> {
    let vm = Vm::new(&config)?;
    let record = ConfigRecord {
        image: config.image.name.clone(),
        mem_bytes: config.mem_bytes,
        dedup: config.dedup.name().to_string(),
        view: config.view.name().to_string(),
        timeout_secs: config.timeout.map(|t| t.as_secs_f64()),
    };
    let mut devices =
        Devices { console: Console::new(config.console), reports: Vec::new(), mem_bytes: config.mem_bytes };
    let (end, phases, total, rip) = run_loop(vm, &mut devices, config.timeout);
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

type LoopResult = (RunEnd, Vec<crate::stats::PhaseStats>, crate::stats::Figures, Option<u64>);

fn run_loop(mut vm: Vm, devices: &mut Devices, timeout: Option<std::time::Duration>) -> LoopResult {
    let watchdog = Watchdog::start(timeout);
    let mut phases = PhaseTracker::start(&vm);
    let mut end = loop {
        let outcome = match vm.vcpu.run() {
            Ok(exit) => handle_exit(devices, phases.exits(), exit),
            Err(e) => handle_run_error(&e, phases.exits(), &watchdog),
        };
        match outcome {
            Outcome::Continue => {}
            Outcome::NextPhase(n) => phases.next(&vm, n),
            // Without a deduplicator (policy off) a request has nothing to do.
            Outcome::Dedup(_) => {}
            Outcome::End(end) => break end,
        }
    };
    drop(watchdog);
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
        end = RunEnd::Unexpected(format!("KVM internal error, suberror {suberror}"));
    }
    let (phase_stats, total) = phases.finish(&vm);
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

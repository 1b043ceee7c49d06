//! Per-phase accounting: at every phase boundary (a guest write to port
//! 0x500) the counters of every layer are read and the phase's figures are
//! what moved since the boundary before.

use std::time::Instant;

use crate::exit_times::{merge_times, ExitEvent, ExitTimer, ExitTimes, ServiceTime, UFFD_READ, UFFD_WRITE};
use crate::kvm_stats::Snapshot;
use crate::stats::{is_gauge, Counters, ExitCounts, ExitKind, Figures, PhaseStats, SignedCounters};
use crate::vm::{lock, Vm};

/// Cumulative readings of every layer at one instant.
#[derive(Debug, Clone, Default)]
struct Readings {
    kvm_vm: Snapshot,
    kvm_vcpu: Snapshot,
    shadow_mmu: Counters,
    ksm: Counters,
    ksm_signed: SignedCounters,
    /// (reads, writes) served off the vCPU thread.
    view_faults: (u64, u64),
    /// What serving those since the reading before took.
    view_fault_times: ExitTimes,
    at: Option<Instant>,
}

impl Readings {
    fn take(vm: &Vm) -> Self {
        // Frames freed since the last reading go back to the host now, so
        // the memory figures of the phase are what the host really holds.
        let _ = lock(&vm.mm).flush_holes();
        let (ksm, ksm_signed) = lock(&vm.dedup).figures();
        Self {
            // A stats read that fails mid-run costs the kvm section, not the run.
            kvm_vm: vm.vm_stats.snapshot().unwrap_or_default(),
            kvm_vcpu: vm.vcpu_stats.snapshot().unwrap_or_default(),
            shadow_mmu: shadow_mmu_counters(vm),
            ksm,
            ksm_signed,
            view_faults: vm.view_faults.counts(),
            view_fault_times: vm.view_faults.take_served(),
            at: Some(Instant::now()),
        }
    }
}

/// The secondary MMU's counters (with its view's) and the primary MMU's.
fn shadow_mmu_counters(vm: &Vm) -> Counters {
    let mut out: Counters = lock(&vm.mmu).counters().into_iter().map(|(n, v)| (n.to_string(), v)).collect();
    let host = lock(&vm.mm).stats();
    for (name, v) in [
        ("view_host_faults", vm.view_faults.host_faults()),
        ("cow_copies", host.cow_copies),
        ("cow_reuses", host.cow_reuses),
        ("frames_freed", host.frames_freed),
        ("frames_allocated", host.frames_allocated),
        ("notifier_ranges", host.notifier_ranges),
        ("change_pte_calls", host.change_pte_calls),
        ("soft_dirty_rounds", host.soft_dirty_rounds),
        ("soft_dirty_pages", host.soft_dirty_pages),
        ("batch_wrprotected", host.batch_wrprotected),
    ] {
        out.insert(name.to_string(), v);
    }
    out
}

/// What moved in named counters: counters by their increase, gauges by their
/// value at the end.
pub fn counters_moved(before: &Counters, after: &Counters) -> Counters {
    after
        .iter()
        .map(|(name, &a)| {
            let v = if is_gauge(name) { a } else { a.saturating_sub(before.get(name).copied().unwrap_or(0)) };
            (name.clone(), v)
        })
        .collect()
}

fn figures_between(vm: &Vm, a: &Readings, b: &Readings, mut exits: ExitCounts) -> Figures {
    // Faults the userfaultfd view served without a KVM exit count as the
    // secondary-MMU faults they are.
    let reads = b.view_faults.0.saturating_sub(a.view_faults.0);
    let writes = b.view_faults.1.saturating_sub(a.view_faults.1);
    exits.ept_read += reads;
    exits.ept_write += writes;
    exits.total += reads + writes;
    let mut exit_times = ExitTimes::new();
    for (key, n) in [(UFFD_READ, reads), (UFFD_WRITE, writes)] {
        // The faults of a stretch are served within it (the vCPU waits for
        // each); should the timed ones not match the count, the count wins.
        match b.view_fault_times.get(key) {
            Some(t) if t.samples == n => exit_times.insert(key.to_string(), t.clone()),
            _ if n > 0 => exit_times.insert(key.to_string(), ServiceTime::untimed(n)),
            _ => None,
        };
    }
    let mut kvm = vm.vm_stats.moved(&a.kvm_vm, &b.kvm_vm);
    for (name, v) in vm.vcpu_stats.moved(&a.kvm_vcpu, &b.kvm_vcpu) {
        // VM and vCPU statistics have distinct names in KVM; should one ever
        // appear in both, the vCPU's is kept apart rather than lost.
        let key = if kvm.contains_key(&name) { format!("vcpu.{name}") } else { name };
        kvm.insert(key, v);
    }
    let wall_ns = match (a.at, b.at) {
        (Some(s), Some(e)) => u64::try_from(e.duration_since(s).as_nanos()).unwrap_or(u64::MAX),
        _ => 0,
    };
    Figures {
        exits,
        shadow_mmu: counters_moved(&a.shadow_mmu, &b.shadow_mmu),
        ksm: counters_moved(&a.ksm, &b.ksm),
        ksm_signed: b.ksm_signed.clone(),
        kvm,
        wall_ns,
        exit_times,
    }
}

/// Keeps the current phase's exit counts, times and name, and closes
/// phases.
#[derive(Debug)]
pub struct PhaseTracker {
    number: u32,
    name: Option<String>,
    exits: ExitCounts,
    /// Exit service times of the running phase, then of each finished one.
    timers: Vec<ExitTimer>,
    phase_start: Readings,
    run_start: Readings,
    finished: Vec<PhaseStats>,
}

impl PhaseTracker {
    /// Starts phase 0.
    pub fn start(vm: &Vm) -> Self {
        let now = Readings::take(vm);
        Self {
            number: 0,
            name: None,
            exits: ExitCounts::default(),
            timers: vec![ExitTimer::default()],
            phase_start: now.clone(),
            run_start: now,
            finished: Vec::new(),
        }
    }

    /// Phases so far, the running one included.
    pub fn count(&self) -> usize {
        self.finished.len() + 1
    }

    /// The running phase's position in the run (0 for the first).
    pub fn position(&self) -> usize {
        self.finished.len()
    }

    /// The running phase's exit counts.
    pub fn exits(&mut self) -> &mut ExitCounts {
        &mut self.exits
    }

    /// Names the running phase (a later name replaces an earlier one).
    pub fn name_current(&mut self, name: String) {
        self.name = Some(name);
    }

    /// One exit of `event`, counted in the phase at `position`, served in
    /// `ns` (the phase may have ended since: a phase marker's exit counts
    /// in the phase it ends).
    pub fn record_service(&mut self, position: usize, event: ExitEvent, ns: u64) {
        if let Some(timer) = self.timers.get_mut(position) {
            timer.record(event, ns);
        }
    }

    /// The running phase's last exit was a triple fault on a HLT: it is
    /// counted, and timed, as the `hlt` it was.
    pub fn recount_shutdown_as_hlt(&mut self) {
        self.exits.shutdown = self.exits.shutdown.saturating_sub(1);
        self.exits.hlt += 1;
        if let Some(timer) = self.timers.last_mut() {
            timer.reclassify(ExitEvent::reason(ExitKind::Shutdown), ExitEvent::reason(ExitKind::Hlt));
        }
    }

    /// Ends the running phase and starts phase `number`.
    pub fn next(&mut self, vm: &Vm, number: u32) {
        let now = Readings::take(vm);
        self.close(vm, &now);
        self.phase_start = now;
        self.number = number;
        self.timers.push(ExitTimer::default());
    }

    fn close(&mut self, vm: &Vm, now: &Readings) {
        let exits = std::mem::take(&mut self.exits);
        let figures = figures_between(vm, &self.phase_start, now, exits);
        self.finished.push(PhaseStats { phase: self.number, name: self.name.take(), figures });
    }

    /// Ends the last phase; returns every phase and the whole run's figures.
    pub fn finish(mut self, vm: &Vm) -> (Vec<PhaseStats>, Figures) {
        let now = Readings::take(vm);
        self.close(vm, &now);
        let mut total = figures_between(vm, &self.run_start, &now, ExitCounts::default());
        total.exits = ExitCounts::default();
        total.exit_times = ExitTimes::new();
        for (p, timer) in self.finished.iter_mut().zip(&self.timers) {
            merge_times(&mut p.figures.exit_times, &timer.times());
            total.exits.add(&p.figures.exits);
            merge_times(&mut total.exit_times, &p.figures.exit_times);
        }
        (self.finished, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_move_by_increase_and_gauges_by_level() {
        let before = Counters::from([("view_slot_changes".into(), 3), ("view_slots".into(), 5)]);
        let after = Counters::from([("view_slot_changes".into(), 7), ("view_slots".into(), 2)]);
        let moved = counters_moved(&before, &after);
        assert_eq!(moved["view_slot_changes"], 4);
        assert_eq!(moved["view_slots"], 2);
    }
}

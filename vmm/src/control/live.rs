//! What a running guest has done so far, for `vmm ctl SOCKET status` and
//! `watch`: its exits by event (counted by the vCPU thread as it serves
//! them), the secondary-MMU faults the userfaultfd view served, and the
//! host KVM's statistics that moved since the run started (read through
//! stats file descriptors of the control thread's own).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::exit_times::{ExitEvent, UFFD_READ, UFFD_WRITE};
use crate::kvm_stats::{KvmStats, Snapshot};
use crate::stats::ExitCounts;
use crate::view::ViewFaults;

/// Exits served so far, by event; the vCPU thread adds, any thread reads.
#[derive(Debug, Default)]
pub struct LiveExits {
    by_event: [AtomicU64; ExitEvent::ALL.len()],
}

impl LiveExits {
    /// One more exit of `event`.
    pub fn record(&self, event: ExitEvent) {
        self.by_event[event.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// How many of each event so far.
    pub fn counts(&self) -> Vec<(ExitEvent, u64)> {
        ExitEvent::ALL.iter().map(|&e| (e, self.by_event[e.index()].load(Ordering::Relaxed))).collect()
    }
}

/// The host KVM's statistics of the running VM and vCPU, and their values
/// when the run started.
#[derive(Debug)]
pub struct LiveKvm {
    vm: KvmStats,
    vcpu: KvmStats,
    vm_start: Snapshot,
    vcpu_start: Snapshot,
}

impl LiveKvm {
    /// Takes the starting values of these statistics.
    pub fn start(vm: KvmStats, vcpu: KvmStats) -> Option<Self> {
        let (vm_start, vcpu_start) = (vm.snapshot().ok()?, vcpu.snapshot().ok()?);
        Some(Self { vm, vcpu, vm_start, vcpu_start })
    }

    /// Every statistic that moved since the start (cumulative counters by
    /// their increase, levels by their value), and the names of the levels.
    fn moved(&self) -> (BTreeMap<String, u64>, Vec<String>) {
        let mut moved = BTreeMap::new();
        let mut levels = Vec::new();
        for (stats, start, prefix) in [(&self.vm, &self.vm_start, ""), (&self.vcpu, &self.vcpu_start, "vcpu.")] {
            let Ok(now) = stats.snapshot() else { continue };
            let level_names: Vec<&str> = stats.level_names().collect();
            for (name, v) in stats.moved(start, &now) {
                let key = if moved.contains_key(&name) { format!("{prefix}{name}") } else { name.clone() };
                if level_names.contains(&name.as_str()) {
                    levels.push(key.clone());
                }
                moved.insert(key, v);
            }
        }
        (moved, levels)
    }
}

/// The exit part of a status: exits by reason as the statistics count them
/// (the userfaultfd view's faults among `ept_read` and `ept_write`), by
/// event (only those that happened), and the host KVM's statistics.
pub(super) fn exits_status(exits: &LiveExits, faults: &Arc<ViewFaults>, kvm: Option<&LiveKvm>) -> Value {
    let mut counts = ExitCounts::default();
    let mut events = serde_json::Map::new();
    for (event, n) in exits.counts() {
        if n > 0 {
            events.insert(event.name().to_string(), json!(n));
        }
        counts.record_n(event.kind(), n);
    }
    let (reads, writes) = faults.counts();
    counts.ept_read += reads;
    counts.ept_write += writes;
    counts.total += reads + writes;
    for (key, n) in [(UFFD_READ, reads), (UFFD_WRITE, writes)] {
        if n > 0 {
            events.insert(key.to_string(), json!(n));
        }
    }
    let (kvm, levels) = kvm.map(LiveKvm::moved).unwrap_or_default();
    json!({ "exits": counts, "exit_events": events, "kvm": kvm, "kvm_levels": levels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit_times::PortClass;
    use crate::stats::ExitKind;

    #[test]
    fn live_exits_add_up_by_reason_and_by_event() {
        let live = LiveExits::default();
        for _ in 0..3 {
            live.record(ExitEvent::io(PortClass::Console));
        }
        live.record(ExitEvent::io(PortClass::Phase));
        live.record(ExitEvent::reason(ExitKind::EptRead));
        let faults = Arc::new(ViewFaults::default());
        faults.record(shadow_mmu::Access::Read);
        let v = exits_status(&live, &faults, None);
        assert_eq!(v["exits"]["io"], 4);
        assert_eq!(v["exits"]["ept_read"], 2, "the uffd view's fault is a secondary-MMU fault too");
        assert_eq!(v["exits"]["total"], 6);
        assert_eq!(v["exit_events"]["io:console"], 3);
        assert_eq!(v["exit_events"][UFFD_READ], 1);
        assert!(v["exit_events"].get("hlt").is_none(), "events that never happened are left out");
    }
}

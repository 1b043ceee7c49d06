//! The unit and kind of every figure a run reports, from the source that
//! knows it: the host KVM's statistics descriptors for `kvm.*`
//! ([`crate::kvm_stats`]), the table [`OWN_FIGURES`] for the VMM's own.
//!
//! A run's document carries them in its top-level `units` map, keyed by the
//! figure's flat name (`exits.io`, `shadow_mmu.installed`, `ksm.cpu_ns`,
//! `kvm.pf_fixed`, `wall_ns`): an addition within schema 1.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a figure's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FigureKind {
    /// Events counted: per phase, how many happened in it.
    Count,
    /// A level (a size, a state): per phase, its value at the phase's end.
    Level,
    /// Time spent: per phase, how much of it was spent in the phase.
    Time,
}

/// A figure's unit and kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FigureUnit {
    /// What one of it is: `exits`, `pages`, `bytes`, `ns`, ... (for the
    /// host KVM's statistics, KVM's own unit: `none`, `bytes`, `ns`,
    /// `cycles`, `boolean`).
    pub unit: String,
    /// Count, level or time.
    pub kind: FigureKind,
}

impl FigureUnit {
    /// A unit of this kind.
    pub fn new(unit: &str, kind: FigureKind) -> Self {
        Self { unit: unit.to_string(), kind }
    }
}

/// Units by flat figure name.
pub type Units = BTreeMap<String, FigureUnit>;

use FigureKind::{Count, Level, Time};

/// The VMM's own figures (every layer but the host KVM), by flat name.
pub const OWN_FIGURES: &[(&str, &str, FigureKind)] = &[
    ("exits.io", "exits", Count),
    ("exits.mmio", "exits", Count),
    ("exits.hlt", "exits", Count),
    ("exits.ept_read", "exits", Count),
    ("exits.ept_write", "exits", Count),
    ("exits.ept_fetch", "exits", Count),
    ("exits.shutdown", "exits", Count),
    ("exits.internal_error", "exits", Count),
    ("exits.intr", "exits", Count),
    ("exits.other", "exits", Count),
    ("exits.total", "exits", Count),
    ("wall_ns", "ns", Time),
    // The secondary MMU.
    ("shadow_mmu.installed", "entries", Count),
    ("shadow_mmu.zapped", "entries", Count),
    ("shadow_mmu.change_pte_applied", "calls", Count),
    ("shadow_mmu.change_pte_missed", "calls", Count),
    ("shadow_mmu.flushes", "flushes", Count),
    ("shadow_mmu.fault_retries", "faults", Count),
    ("shadow_mmu.view_updates", "updates", Count),
    ("shadow_mmu.view_batches", "batches", Count),
    ("shadow_mmu.host_pages_moved", "pages", Count),
    ("shadow_mmu.view_ns", "ns", Time),
    ("shadow_mmu.ept_entries", "entries", Level),
    ("shadow_mmu.batch_wrprotected", "entries", Count),
    ("shadow_mmu.wrprot_ranges", "ranges", Count),
    ("shadow_mmu.wrprot_entries", "entries", Count),
    // The views.
    ("shadow_mmu.view_slots", "slots", Level),
    ("shadow_mmu.view_slots_max", "slots", Level),
    ("shadow_mmu.view_slot_creates", "slots", Count),
    ("shadow_mmu.view_slot_deletes", "slots", Count),
    ("shadow_mmu.view_vcpu_kicks", "kicks", Count),
    ("shadow_mmu.view_compactions", "compactions", Count),
    ("shadow_mmu.view_zap_all_deletes", "slots", Count),
    ("shadow_mmu.view_remaps", "pages", Count),
    ("shadow_mmu.view_remap_runs", "calls", Count),
    ("shadow_mmu.view_absent_remaps", "pages", Count),
    ("shadow_mmu.view_unbatched_remaps", "pages", Count),
    ("shadow_mmu.view_continues", "calls", Count),
    ("shadow_mmu.view_wp_changes", "calls", Count),
    ("shadow_mmu.view_zaps", "calls", Count),
    ("shadow_mmu.view_faults", "faults", Count),
    ("shadow_mmu.view_fault_wakes", "wakes", Count),
    ("shadow_mmu.view_chunks_registered", "chunks", Count),
    ("shadow_mmu.view_host_faults", "faults", Count),
    // The primary MMU.
    ("shadow_mmu.cow_copies", "pages", Count),
    ("shadow_mmu.cow_reuses", "pages", Count),
    ("shadow_mmu.unshare_copies", "pages", Count),
    ("shadow_mmu.frames_freed", "frames", Count),
    ("shadow_mmu.frames_allocated", "frames", Count),
    ("shadow_mmu.notifier_ranges", "ranges", Count),
    ("shadow_mmu.change_pte_calls", "calls", Count),
    ("shadow_mmu.soft_dirty_rounds", "rounds", Count),
    ("shadow_mmu.soft_dirty_pages", "pages", Count),
    // The deduplicator, with the names of /sys/kernel/mm/ksm.
    ("ksm.pages_shared", "pages", Level),
    ("ksm.pages_sharing", "pages", Level),
    ("ksm.pages_unshared", "pages", Level),
    ("ksm.pages_volatile", "pages", Level),
    ("ksm.full_scans", "scans", Count),
    ("ksm.pages_scanned", "pages", Count),
    ("ksm.pages_skipped", "pages", Count),
    ("ksm.ksm_zero_pages", "pages", Level),
    ("ksm.stable_node_chains", "nodes", Level),
    ("ksm.stable_node_dups", "nodes", Level),
    ("ksm.general_profit", "bytes", Level),
    ("ksm_signed.general_profit", "bytes", Level),
    ("ksm_signed.ksm_process_profit", "bytes", Level),
    ("ksm.bytes_returned", "bytes", Count),
    ("ksm.memfd_resident_bytes", "bytes", Level),
    ("ksm.metadata_bytes", "bytes", Level),
    ("ksm.rmap_items", "items", Level),
    ("ksm.merges", "pages", Count),
    ("ksm.scan_ns", "ns", Time),
    ("ksm.cpu_ns", "ns", Time),
    ("ksm.pass_ns", "ns", Time),
    ("ksm.ksm_merging_pages", "pages", Level),
    ("ksm.ksm_process_profit", "bytes", Level),
];

/// The unit of one of the VMM's own figures, by flat name.
pub fn own_unit(name: &str) -> Option<FigureUnit> {
    OWN_FIGURES.iter().find(|(n, _, _)| *n == name).map(|&(_, unit, kind)| FigureUnit::new(unit, kind))
}

/// The VMM's own figures' units.
pub fn own_units() -> Units {
    OWN_FIGURES.iter().map(|&(n, unit, kind)| (n.to_string(), FigureUnit::new(unit, kind))).collect()
}

/// Every figure's unit for a run of `vm`: the VMM's own, and the host
/// KVM's statistics from their descriptors (a vCPU statistic whose name a
/// VM statistic has too also as `kvm.vcpu.<name>`, as a run reports it).
pub fn of_vm(vm: &crate::vm::Vm) -> Units {
    let mut units = own_units();
    for (name, unit) in vm.vm_stats.units() {
        units.insert(format!("kvm.{name}"), unit);
    }
    for (name, unit) in vm.vcpu_stats.units() {
        let key = format!("kvm.{name}");
        let key = if units.contains_key(&key) { format!("kvm.vcpu.{name}") } else { key };
        units.insert(key, unit);
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{is_gauge, GAUGES};

    #[test]
    fn the_levels_of_the_table_are_the_gauges_counters_move_by() {
        for gauge in GAUGES {
            let in_table = ["shadow_mmu", "ksm"].iter().filter_map(|s| own_unit(&format!("{s}.{gauge}"))).next();
            assert_eq!(in_table.map(|u| u.kind), Some(Level), "{gauge}");
        }
        for (name, _, kind) in OWN_FIGURES {
            let bare = name.rsplit('.').next().unwrap_or(name);
            if *kind == Level {
                assert!(is_gauge(bare), "{name} is a level but phases would count it by its increase");
            }
        }
    }

    #[test]
    fn units_serialise_as_unit_and_kind() {
        let v = serde_json::to_value(own_unit("ksm.cpu_ns").expect("listed")).expect("json");
        assert_eq!(v, serde_json::json!({"unit": "ns", "kind": "time"}));
    }
}

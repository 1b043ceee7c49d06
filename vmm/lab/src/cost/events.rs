//! The events a cost profile prices, and how each is counted from a run's
//! flat figures (`exits.io`, `shadow_mmu.zapped`, `kvm.pf_fixed`, ...).

use std::collections::BTreeMap;

/// One event the lab counts, as a profile prices it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventDef {
    /// The key in a profile's `costs` and in a projection's `events`.
    pub key: &'static str,
    /// What one event is, for people.
    pub what: &'static str,
    /// The run figures whose sum counts it (flat names).
    pub figures: &'static [&'static str],
}

/// The secondary-MMU faults, which `host_refault` leaves out.
const FAULT_FIGURES: &[&str] = &["exits.ept_read", "exits.ept_write", "exits.ept_fetch"];

/// The key of the event counted from the host KVM's refaults.
const HOST_REFAULT: &str = "host_refault";

/// Every event a profile must price, in display order.
pub const EVENTS: &[EventDef] = &[
    EventDef { key: "exit_io", what: "a port-I/O exit to the VMM and back into the guest", figures: &["exits.io"] },
    EventDef {
        key: "exit_other",
        what: "any other exit to the VMM that is not a secondary-MMU fault (MMIO outside RAM, HLT, shutdown, \
               internal error, other; not a signal's)",
        figures: &["exits.mmio", "exits.hlt", "exits.shutdown", "exits.internal_error", "exits.other"],
    },
    EventDef {
        key: "secondary_mmu_fault",
        what: "a secondary-MMU (EPT) fault served end to end: the exit or fault event, the handler's host \
               lookup and install, the guest going on",
        figures: FAULT_FIGURES,
    },
    EventDef {
        key: HOST_REFAULT,
        what: "a page the host KVM faults in again itself (its pf_fixed) beyond the secondary-MMU faults, \
               after the host mapping under it changed",
        figures: &["kvm.pf_fixed"],
    },
    EventDef {
        key: "view_remap",
        what: "a remap of the VMM's view made while the guest waits on a fault whose frame changed (a \
               copy-on-write break), and the host KVM's retry of that fault: a cost of emulating the secondary \
               MMU in userspace",
        figures: &["shadow_mmu.view_unbatched_remaps"],
    },
    EventDef {
        key: "change_pte",
        what: "an in-place update of one secondary-MMU entry by change_pte",
        figures: &["shadow_mmu.change_pte_applied"],
    },
    EventDef { key: "zap", what: "one secondary-MMU entry zapped", figures: &["shadow_mmu.zapped"] },
    EventDef { key: "tlb_flush", what: "one TLB flush of the secondary MMU", figures: &["shadow_mmu.flushes"] },
    EventDef { key: "page_scanned", what: "one page scanned by the deduplicator", figures: &["ksm.pages_scanned"] },
    EventDef {
        key: "merge",
        what: "one page merged into a KSM page (write_protect_page, compare, replace_page), its scan and the \
               secondary MMU's own work aside",
        figures: &["ksm.merges"],
    },
    EventDef {
        key: "cow_copy",
        what: "one copy-on-write copy of a shared page in the primary MMU (a write, or an unshare)",
        figures: &["shadow_mmu.cow_copies", "shadow_mmu.unshare_copies"],
    },
];

/// How many `event`s a stretch's figures count (a missing figure is 0: a
/// counter that did not move). `host_refault` is the host KVM's `pf_fixed`
/// less the secondary-MMU faults, never below 0.
pub fn event_count(event: &EventDef, figures: &BTreeMap<String, f64>) -> f64 {
    let sum = |names: &[&str]| names.iter().map(|n| figures.get(*n).copied().unwrap_or(0.0)).sum::<f64>();
    if event.key == HOST_REFAULT {
        (sum(event.figures) - sum(FAULT_FIGURES)).max(0.0)
    } else {
        sum(event.figures)
    }
}

/// The event definition of `key`.
pub fn event(key: &str) -> Option<&'static EventDef> {
    EVENTS.iter().find(|e| e.key == key)
}

//! A fleet's own figures, from its guests' (statistics schema 1, ABI 1.1
//! additions): the document of a fleet run keeps each guest's in `guests`
//! and puts the fleet's where a single guest's would be.
//!
//! * Exits, exit times, the secondary- and primary-MMU figures and the host
//!   KVM's statistics belong to one guest each (its own VM, mm and view):
//!   the fleet's are their sums.
//! * The deduplicator's figures are fleet-wide already (as sysfs is
//!   host-wide): the fleet's are those of the guest whose phase (or run)
//!   ended last.
//! * Phases are lined up by position (guests of one image run the same
//!   phases); a phase's wall time is its longest guest's.

use crate::exit_times::merge_times;
use crate::stats::{Counters, EndRecord, Figures, GuestRecord, GuestStats, PhaseStats};

/// One guest's statistics and when its run started, from the fleet's start.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// What the guest reported.
    pub stats: GuestStats,
    /// Its start, in ns after the fleet's.
    pub start_ns: u64,
}

impl GuestRun {
    /// When phase `position` ended (the run's end past the last), in ns
    /// after the fleet's start.
    fn end_of(&self, position: usize) -> u64 {
        let phases = &self.stats.phases;
        let upto = position.saturating_add(1).min(phases.len());
        self.start_ns + phases[..upto].iter().map(|p| p.figures.wall_ns).sum::<u64>()
    }
}

/// The fleet's outcome: exit code 0 when every guest's is, the first
/// non-zero one when every guest ended by itself, none when one did not.
pub fn fleet_guest_record(guests: &[GuestStats]) -> GuestRecord {
    let codes: Option<Vec<u32>> = guests.iter().map(|g| g.guest.exit_code).collect();
    let exit_code = codes.map(|c| c.iter().copied().find(|&c| c != 0).unwrap_or(0));
    let first_bad = guests.iter().find(|g| g.guest.exit_code != Some(0));
    let reason = first_bad.map_or("exit", |g| g.guest.end.reason.as_str()).to_string();
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for g in guests {
        match counts.iter_mut().find(|(r, _)| *r == g.guest.end.reason) {
            Some((_, n)) => *n += 1,
            None => counts.push((&g.guest.end.reason, 1)),
        }
    }
    let tally: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {r}")).collect();
    let mut detail = format!("{} guests: {}", guests.len(), tally.join(", "));
    if let Some(g) = first_bad {
        detail.push_str(&format!("; guest {}: {}", g.index, g.guest.end.detail));
    }
    GuestRecord { exit_code, reports: Vec::new(), end: EndRecord { reason, rip: None, detail } }
}

/// The fleet's phases: position by position, over the guests that have one
/// there.
pub fn fleet_phases(guests: &[GuestRun]) -> Vec<PhaseStats> {
    let positions = guests.iter().map(|g| g.stats.phases.len()).max().unwrap_or(0);
    (0..positions)
        .map(|pos| {
            let at: Vec<(&GuestRun, &PhaseStats)> =
                guests.iter().filter_map(|g| g.stats.phases.get(pos).map(|p| (g, p))).collect();
            let (_, first) = at[0];
            let last = at.iter().max_by_key(|(g, _)| g.end_of(pos)).map_or(first, |(_, p)| p);
            let figures = sum_figures(at.iter().map(|(_, p)| &p.figures), &last.figures);
            PhaseStats { phase: first.phase, name: first.name.clone(), figures }
        })
        .collect()
}

/// The fleet's whole run.
pub fn fleet_total(guests: &[GuestRun]) -> Figures {
    let last = guests.iter().max_by_key(|g| g.end_of(usize::MAX)).map(|g| &g.stats.total);
    sum_figures(guests.iter().map(|g| &g.stats.total), last.unwrap_or(&Figures::default()))
}

/// The sum of `each` guest's figures, with the deduplicator's from `last`.
fn sum_figures<'a>(each: impl Iterator<Item = &'a Figures>, last: &Figures) -> Figures {
    let mut sum = Figures { ksm: last.ksm.clone(), ksm_signed: last.ksm_signed.clone(), ..Figures::default() };
    for f in each {
        sum.exits.add(&f.exits);
        merge_times(&mut sum.exit_times, &f.exit_times);
        add_counters(&mut sum.shadow_mmu, &f.shadow_mmu);
        add_counters(&mut sum.kvm, &f.kvm);
        sum.wall_ns = sum.wall_ns.max(f.wall_ns);
    }
    sum
}

/// Adds named counters (levels too: the fleet's level is the sum of its
/// guests').
fn add_counters(sum: &mut Counters, more: &Counters) {
    for (name, v) in more {
        *sum.entry(name.clone()).or_insert(0) += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::ExitKind;

    fn phase(number: u32, io: u64, wall_ns: u64, sharing: u64) -> PhaseStats {
        let mut f = Figures { wall_ns, ..Figures::default() };
        for _ in 0..io {
            f.exits.record(ExitKind::Io);
        }
        f.shadow_mmu.insert("installed".into(), io);
        f.ksm.insert("pages_sharing".into(), sharing);
        PhaseStats { phase: number, name: Some(format!("p{number}")), figures: f }
    }

    fn guest(index: u64, code: Option<u32>, reason: &str, phases: Vec<PhaseStats>, start_ns: u64) -> GuestRun {
        let total = sum_figures(phases.iter().map(|p| &p.figures), &phases.last().expect("a phase").figures);
        let end = EndRecord { reason: reason.into(), rip: None, detail: format!("{reason} of {index}") };
        let guest = GuestRecord { exit_code: code, reports: vec![index], end };
        GuestRun { stats: GuestStats { index, guest, phases, total }, start_ns }
    }

    #[test]
    fn own_figures_add_up_and_the_deduplicators_come_from_the_last_to_end() {
        // Guest 1 ends phase 0 later (started later), with the fleet-wide
        // figure read then.
        let g0 = guest(0, Some(0), "exit", vec![phase(0, 2, 100, 5), phase(1, 1, 50, 9)], 0);
        let g1 = guest(1, Some(0), "exit", vec![phase(0, 3, 100, 7), phase(1, 1, 10, 8)], 30);
        let phases = fleet_phases(&[g0.clone(), g1.clone()]);
        assert_eq!(phases.len(), 2);
        assert_eq!((phases[0].figures.exits.io, phases[0].figures.shadow_mmu["installed"]), (5, 5));
        assert_eq!(phases[0].figures.ksm["pages_sharing"], 7, "guest 1 ended phase 0 at 130, guest 0 at 100");
        assert_eq!(phases[1].figures.ksm["pages_sharing"], 9, "guest 0 ended phase 1 at 150, guest 1 at 140");
        assert_eq!(phases[0].figures.wall_ns, 100);
        assert_eq!(phases[1].name.as_deref(), Some("p1"));
        let total = fleet_total(&[g0, g1]);
        assert_eq!(total.exits.total, 7);
        assert_eq!(total.ksm["pages_sharing"], 9);
    }

    #[test]
    fn a_guest_with_fewer_phases_counts_where_it_has_them() {
        let g0 = guest(0, Some(0), "exit", vec![phase(0, 2, 10, 0), phase(1, 4, 10, 0)], 0);
        let g1 = guest(1, None, "timeout", vec![phase(0, 1, 10, 0)], 0);
        let phases = fleet_phases(&[g0.clone(), g1.clone()]);
        assert_eq!((phases[0].figures.exits.io, phases[1].figures.exits.io), (3, 4));
        let record = fleet_guest_record(&[g0.stats, g1.stats]);
        assert_eq!(record.exit_code, None, "a guest that did not end by itself");
        assert_eq!(record.end.reason, "timeout");
        assert_eq!(record.end.detail, "2 guests: 1 exit, 1 timeout; guest 1: timeout of 1");
    }

    #[test]
    fn the_fleet_exits_zero_only_when_every_guest_does() {
        let ok = guest(0, Some(0), "exit", vec![phase(0, 1, 1, 0)], 0).stats;
        let bad = guest(1, Some(3), "exit", vec![phase(0, 1, 1, 0)], 0).stats;
        assert_eq!(fleet_guest_record(&[ok.clone(), ok.clone()]).exit_code, Some(0));
        assert_eq!(fleet_guest_record(&[ok, bad]).exit_code, Some(3));
    }
}

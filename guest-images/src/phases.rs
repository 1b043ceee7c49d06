//! The phases of the built-in images in one table: for each image that
//! marks phases, the io exits of every phase and the names it gives them
//! (port 0x504, ABI 1.1), so that a test can hold any run to them. These
//! are the images' own figures; the tests read them from here, never write
//! them again.

use crate::*;

/// The phases of one built-in image, run as a single guest (guest 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhasePlan {
    /// The image's name.
    pub image: &'static str,
    /// Io exits of phases 0 to the last: each phase's port writes and reads
    /// (a marker counts in the phase it ends, a name in the phase it names,
    /// the exit in the last phase). With dedup off these are all the exits.
    pub io: &'static [u64],
    /// Names of phases 1 to the last (phase 0, before the first marker, has
    /// none). Repeated phases repeat their name.
    pub names: &'static [&'static str],
}

impl PhasePlan {
    /// The last phase the image marks.
    pub fn last_phase(&self) -> u32 {
        self.names.len() as u32
    }

    /// Io exits of the whole run.
    pub fn io_exits(&self) -> u64 {
        self.io.iter().sum()
    }

    /// The name of phase `phase` (none for phase 0 or past the last).
    pub fn name(&self, phase: u32) -> Option<&'static str> {
        (phase as usize).checked_sub(1).and_then(|i| self.names.get(i)).copied()
    }
}

/// Every built-in image that marks phases, as a single guest, sorted by
/// name, where its io exits are the same on every host. `hello` and the
/// `misbehave-*` images that mark none take all their exits in phase 0
/// (see their own constants); `misbehave-phase-flood` marks phases without
/// end; `misbehave-ports`' string I/O takes as many exits as the host's KVM
/// makes of it ([`MISBEHAVE_PORTS_PHASE_IO`]). `misbehave-beyond-map` ends
/// in phase 2 with a triple fault, and `misbehave-sse-merged` may end in
/// phase 3 with a KVM internal error.
pub const PHASE_PLANS: &[PhasePlan] = &[
    PhasePlan { image: "access", io: &ACCESS_PHASE_IO, names: &ACCESS_PHASE_NAMES },
    PhasePlan { image: "converge", io: &CONVERGE_PHASE_IO, names: &CONVERGE_PHASE_NAMES },
    PhasePlan { image: "cowstorm", io: &COWSTORM_PHASE_IO, names: &COWSTORM_PHASE_NAMES },
    PhasePlan { image: "dirtylog", io: &DIRTYLOG_PHASE_IO, names: &DIRTYLOG_PHASE_NAMES },
    PhasePlan { image: "gcheap", io: &GCHEAP_PHASE_IO, names: &GCHEAP_PHASE_NAMES },
    PhasePlan { image: "kvstore", io: &KVSTORE_PHASE_IO, names: &KVSTORE_PHASE_NAMES },
    PhasePlan { image: "ltp-ksm01", io: &LTP_KSM01_PHASE_IO, names: &LTP_KSM01_PHASE_NAMES },
    PhasePlan {
        image: "ltp-ksm01-fleet",
        io: &LTP_KSM01_FLEET_GUEST0_PHASE_IO,
        names: &LTP_KSM01_FLEET_GUEST0_PHASE_NAMES,
    },
    PhasePlan {
        image: "misbehave-beyond-map",
        io: &MISBEHAVE_BEYOND_MAP_PHASE_IO,
        names: &MISBEHAVE_BEYOND_MAP_PHASE_NAMES,
    },
    PhasePlan {
        image: "misbehave-dedup-flood",
        io: &MISBEHAVE_DEDUP_FLOOD_PHASE_IO,
        names: &MISBEHAVE_DEDUP_FLOOD_PHASE_NAMES,
    },
    PhasePlan {
        image: "misbehave-merged-code",
        io: &MISBEHAVE_MERGED_CODE_PHASE_IO,
        names: &MISBEHAVE_MERGED_CODE_PHASE_NAMES,
    },
    PhasePlan {
        image: "misbehave-sse-merged",
        io: &MISBEHAVE_SSE_MERGED_PHASE_IO,
        names: &MISBEHAVE_SSE_MERGED_PHASE_NAMES,
    },
    PhasePlan {
        image: "misbehave-unmerge-ksmd",
        io: &MISBEHAVE_UNMERGE_KSMD_PHASE_IO,
        names: &MISBEHAVE_UNMERGE_KSMD_PHASE_NAMES,
    },
    PhasePlan {
        image: "misbehave-zero-pages",
        io: &MISBEHAVE_ZERO_PAGES_PHASE_IO,
        names: &MISBEHAVE_ZERO_PAGES_PHASE_NAMES,
    },
    PhasePlan { image: "mixed", io: &MIXED_PHASE_IO, names: &MIXED_PHASE_NAMES },
    PhasePlan { image: "pagefill", io: &PAGEFILL_PHASE_IO, names: &PAGEFILL_PHASE_NAMES },
    PhasePlan { image: "stress", io: &STRESS_PHASE_IO, names: &STRESS_PHASE_NAMES },
    PhasePlan { image: "template", io: &TEMPLATE_PHASE_IO, names: &TEMPLATE_PHASE_NAMES },
    PhasePlan { image: "unique", io: &UNIQUE_PHASE_IO, names: &UNIQUE_PHASE_NAMES },
    PhasePlan { image: "volatile", io: &VOLATILE_PHASE_IO, names: &VOLATILE_PHASE_NAMES },
];

/// The phase plan of built-in image `image`, if it marks phases.
pub fn phase_plan(image: &str) -> Option<&'static PhasePlan> {
    PHASE_PLANS.iter().find(|plan| plan.image == image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::PHASE_NAME_MAX_LEN;
    use crate::sim::contains;

    #[test]
    fn every_plan_is_an_image_with_a_name_for_each_phase() {
        assert!(PHASE_PLANS.windows(2).all(|w| w[0].image < w[1].image));
        for plan in PHASE_PLANS {
            let image = find(plan.image).unwrap_or_else(|| panic!("{}: no such image", plan.image));
            assert_eq!(plan.io.len(), plan.names.len() + 1, "{}: io for phases 0 to the last", plan.image);
            assert_eq!(plan.io[0], 1, "{}: phase 0 holds the first marker only", plan.image);
            assert_eq!((plan.name(0), plan.name(plan.last_phase() + 1)), (None, None));
            for name in plan.names {
                assert!(!name.is_empty() && name.len() <= PHASE_NAME_MAX_LEN, "{}: {name:?}", plan.image);
                assert!(name.bytes().all(|b| (0x20..0x7F).contains(&b)), "{}: {name:?} not printable", plan.image);
                let with_nul = [name.as_bytes(), b"\0"].concat();
                assert!(contains(image.elf, &with_nul), "{}: {name:?} not in the image", plan.image);
            }
        }
    }

    #[test]
    fn the_plans_add_up_to_each_images_io_exits() {
        let totals = [
            ("access", ACCESS_IO_EXITS),
            ("converge", CONVERGE_IO_EXITS),
            ("cowstorm", COWSTORM_IO_EXITS),
            ("dirtylog", DIRTYLOG_IO_EXITS),
            ("gcheap", GCHEAP_IO_EXITS),
            ("kvstore", KVSTORE_IO_EXITS),
            ("ltp-ksm01", LTP_KSM01_IO_EXITS),
            ("ltp-ksm01-fleet", 39),
            ("misbehave-dedup-flood", 5135),
            ("misbehave-merged-code", 17),
            ("misbehave-zero-pages", 19),
            ("mixed", MIXED_IO_EXITS),
            ("pagefill", PAGEFILL_IO_EXITS),
            ("stress", STRESS_IO_EXITS),
            ("template", TEMPLATE_IO_EXITS),
            ("unique", UNIQUE_IO_EXITS),
            ("volatile", VOLATILE_IO_EXITS),
        ];
        for (image, io) in totals {
            assert_eq!(phase_plan(image).map(PhasePlan::io_exits), Some(io), "{image}");
        }
        assert_eq!(phase_plan("hello"), None);
    }

    #[test]
    fn each_images_summary_gives_its_io_exits() {
        let with_commas = |n: u64| {
            let digits = n.to_string();
            let mut text = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i) % 3 == 0 {
                    text.push(',');
                }
                text.push(c);
            }
            text
        };
        assert_eq!(
            (with_commas(5135), with_commas(100), with_commas(100_001)),
            ("5,135".into(), "100".into(), "100,001".into())
        );
        for plan in PHASE_PLANS {
            let summary = find(plan.image).expect("image").summary;
            let io = format!("{} io exits", with_commas(plan.io_exits()));
            assert!(summary.contains(&io), "{}: the summary does not say {io:?}: {summary}", plan.image);
        }
    }
}

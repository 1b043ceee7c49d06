//! `template` (c/template.c): the same large image in every guest of a
//! fleet, merged, then diverged by each guest's own writes; its phases, io
//! exits per guest, exact reports and the merges and faults of a fleet.

use crate::abi::WORKLOAD_REGION_START;
use crate::guest_numbers::{SPLITMIX_GAMMA, TEMPLATE_DIVERGE_STRIDE, TEMPLATE_SEED};
use crate::model::{mix64, split_reports};
use crate::pagefill::{pagefill_pages, PAGEFILL_WORDS_PER_PAGE};

/// First guest-physical address of `template`'s image (2 MiB).
pub const TEMPLATE_START: u64 = WORKLOAD_REGION_START;

/// The last phase `template` marks.
pub const TEMPLATE_PHASES: u32 = 6;

/// The names of `template`'s phases 1 to 6.
pub const TEMPLATE_PHASE_NAMES: [&str; TEMPLATE_PHASES as usize] =
    ["load the image", "merge pass", "read the image", "diverge", "merge pass", "checksum"];

/// Io exits of each phase, 0 to 6, for guest 0, which asks for the passes
/// (phases 2 and 5: name, barrier, dedup request, barrier, marker); every
/// other guest of a fleet takes one fewer in phases 2 and 5 (see
/// [`template_phase_io`]).
pub const TEMPLATE_PHASE_IO: [u64; TEMPLATE_PHASES as usize + 1] = [1, 2, 5, 4, 2, 5, 4];

/// Io exits of guest 0 (and of a single guest): 6 markers, 6 names, 4
/// barriers, 2 dedup requests, 4 reports, 1 exit.
pub const TEMPLATE_IO_EXITS: u64 = 6 + 6 + 4 + 2 + 4 + 1;

/// Io exits of each phase of guest `guest_index`: [`TEMPLATE_PHASE_IO`],
/// less the dedup requests for a guest other than 0.
pub fn template_phase_io(guest_index: u64) -> [u64; TEMPLATE_PHASES as usize + 1] {
    let mut io = TEMPLATE_PHASE_IO;
    if guest_index != 0 {
        io[2] -= 1;
        io[5] -= 1;
    }
    io
}

/// Number of pages of `template`'s image: the region [2 MiB, RAM).
pub fn template_pages(mem_bytes: u64) -> u64 {
    pagefill_pages(mem_bytes)
}

/// Word `w` of page `page` of the image, the same in every guest.
pub fn template_image_word(page: u64, w: u64) -> u64 {
    mix64(TEMPLATE_SEED.wrapping_add(page * PAGEFILL_WORDS_PER_PAGE).wrapping_add(w))
}

/// The pages guest `guest_index` rewrites in phase 4: every page `p` of the
/// image with `p % 8 == guest_index % 8`. With dedup on in a fleet, each is
/// one copy-on-write fault (`ept_write`).
pub fn template_pages_written(mem_bytes: u64, guest_index: u64) -> u64 {
    let first = guest_index % TEMPLATE_DIVERGE_STRIDE;
    template_pages(mem_bytes).saturating_sub(first).div_ceil(TEMPLATE_DIVERGE_STRIDE)
}

/// The exact report list of guest `guest_index` of a `template` fleet with
/// `mem_bytes` of RAM each: the sum of every word of the image (phase 3,
/// the same in every guest), then the sum of every word after the guest's
/// own writes (phase 6); each low half first. A single guest is guest 0.
pub fn template_expected_reports(mem_bytes: u64, guest_index: u64) -> Vec<u64> {
    let pages = template_pages(mem_bytes);
    let image = (0..pages * PAGEFILL_WORDS_PER_PAGE).fold(0u64, |s, i| {
        s.wrapping_add(template_image_word(i / PAGEFILL_WORDS_PER_PAGE, i % PAGEFILL_WORDS_PER_PAGE))
    });
    let stamp = (guest_index + 1).wrapping_mul(SPLITMIX_GAMMA);
    let diverged =
        (guest_index % TEMPLATE_DIVERGE_STRIDE..pages).step_by(TEMPLATE_DIVERGE_STRIDE as usize).fold(image, |s, p| {
            let old = template_image_word(p, 0);
            s.wrapping_sub(old).wrapping_add(old ^ stamp)
        });
    split_reports(&[image, diverged])
}

/// The faults of one guest of a `template` fleet of `guests` guests (the
/// built-in deduplicator, `max_page_sharing` at least `guests`): the
/// `(ept_read, ept_write)` of phases 3 and 4, where they are certain.
///
/// Alone (`guests` = 1) no page of the image matches another, the pass
/// merges none of them and the guest never faults. In a fleet the first
/// pass merges every page of the image `guests` ways; phase 3's reads then
/// fault once per page where the pass zapped the entries (`zaps`: under
/// range-flush and legacy, not change-pte), and phase 4's writes take one
/// copy-on-write fault per page written under every policy.
pub fn template_faults(mem_bytes: u64, guest_index: u64, guests: u64, zaps: bool) -> [(u64, u64); 2] {
    if guests < 2 {
        return [(0, 0), (0, 0)];
    }
    let reads = if zaps { template_pages(mem_bytes) } else { 0 };
    [(reads, 0), (0, template_pages_written(mem_bytes, guest_index))]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{reports_of, to_usize};

    /// Runs template's algorithm on a simulated RAM, word by word.
    fn simulate(mem_bytes: u64, guest_index: u64) -> Vec<u64> {
        let words = to_usize(PAGEFILL_WORDS_PER_PAGE);
        let pages = to_usize(template_pages(mem_bytes));
        let mut ram: Vec<u64> =
            (0..pages * words).map(|i| template_image_word((i / words) as u64, (i % words) as u64)).collect();
        let sum = |ram: &[u64]| ram.iter().fold(0u64, |s, &w| s.wrapping_add(w));
        let image = sum(&ram);
        for (p, page) in ram.chunks_mut(words).enumerate() {
            if p as u64 % TEMPLATE_DIVERGE_STRIDE == guest_index % TEMPLATE_DIVERGE_STRIDE {
                page[0] ^= (guest_index + 1).wrapping_mul(SPLITMIX_GAMMA);
            }
        }
        reports_of(&[image, sum(&ram)])
    }

    #[test]
    fn template_model_matches_a_simulation() {
        for mem in [0, 2 << 20, (2 << 20) + 4096, (2 << 20) + 9 * 4096, 4 << 20] {
            for guest in [0, 1, 7, 8, 13] {
                assert_eq!(template_expected_reports(mem, guest), simulate(mem, guest), "{mem:#x} guest {guest}");
            }
        }
    }

    #[test]
    fn image_pages_differ_and_guests_diverge_apart() {
        let first: Vec<u64> = (0..16).map(|p| template_image_word(p, 0)).collect();
        assert!(first.iter().enumerate().all(|(i, a)| first[..i].iter().all(|b| a != b)));
        assert_eq!(template_expected_reports(4 << 20, 0)[..2], template_expected_reports(4 << 20, 3)[..2]);
        assert_ne!(template_expected_reports(4 << 20, 0)[2..], template_expected_reports(4 << 20, 3)[2..]);
        // 512 pages: 64 written by each of 8 guests; guests 0 and 8 write the same pages.
        assert_eq!(template_pages_written(4 << 20, 0), 64);
        assert_eq!(template_pages_written(4 << 20, 7), 64);
        assert_eq!(template_pages_written((2 << 20) + 9 * 4096, 0), 2);
        assert_eq!(template_pages_written((2 << 20) + 9 * 4096, 1), 1);
        assert_eq!(template_pages_written((2 << 20) + 9 * 4096, 2), 1);
        assert_eq!(template_pages_written((2 << 20) + 2 * 4096, 2), 0);
    }

    #[test]
    fn io_per_guest_adds_up() {
        assert_eq!(TEMPLATE_PHASE_IO.iter().sum::<u64>(), TEMPLATE_IO_EXITS);
        assert_eq!(template_phase_io(0), TEMPLATE_PHASE_IO);
        assert_eq!(template_phase_io(2).iter().sum::<u64>(), TEMPLATE_IO_EXITS - 2);
    }
}

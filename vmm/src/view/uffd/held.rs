//! The remaps a batch of the secondary MMU's updates holds back until its
//! end, when [`super::UffdView`] makes them real a run at a time.

use shadow_mmu::Pfn;

/// A remap of one page of W made inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct HeldRemap {
    /// The frame the page is to map.
    pub(super) pfn: Pfn,
    /// The access the page is populated with (writable or not), or `None`
    /// to leave it absent (a host page that moved under a zapped page).
    pub(super) populate: Option<bool>,
}

/// The batch's held remaps, at most one per page of W.
#[derive(Debug)]
pub(super) struct HeldRemaps {
    /// In the order they were made.
    remaps: Vec<(usize, HeldRemap)>,
    /// Which pages have one.
    held: Vec<bool>,
}

impl HeldRemaps {
    /// None held, for a window of `nr_pages` pages.
    pub(super) fn new(nr_pages: usize) -> Self {
        Self { remaps: Vec::new(), held: vec![false; nr_pages] }
    }

    /// Whether page `i` has a held remap.
    pub(super) fn contains(&self, i: usize) -> bool {
        self.held.get(i).copied().unwrap_or(false)
    }

    /// Holds `remap` of page `i`, which has none yet.
    pub(super) fn push(&mut self, i: usize, remap: HeldRemap) {
        debug_assert!(!self.held[i], "page {i} held twice");
        self.held[i] = true;
        self.remaps.push((i, remap));
    }

    /// Every held remap, in page order; none is held afterwards.
    pub(super) fn take(&mut self) -> Vec<(usize, HeldRemap)> {
        let mut remaps = std::mem::take(&mut self.remaps);
        for &(i, _) in &remaps {
            self.held[i] = false;
        }
        remaps.sort_unstable_by_key(|&(i, _)| i);
        remaps
    }
}

/// The runs `(first page, pages, first page's remap)` of neighbouring pages
/// of `remaps` (in page order) in which each remap `joins` the one before.
pub(super) fn held_runs(
    remaps: &[(usize, HeldRemap)],
    joins: impl Fn(&HeldRemap, &HeldRemap) -> bool,
) -> Vec<(usize, usize, HeldRemap)> {
    let mut runs: Vec<(usize, usize, HeldRemap)> = Vec::new();
    for (k, &(i, remap)) in remaps.iter().enumerate() {
        let joined = k > 0 && remaps[k - 1].0 + 1 == i && joins(&remaps[k - 1].1, &remap);
        match runs.last_mut() {
            Some((_, n, _)) if joined => *n += 1,
            _ => runs.push((i, 1, remap)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remap(pfn: Pfn, writable: bool) -> HeldRemap {
        HeldRemap { pfn, populate: Some(writable) }
    }

    #[test]
    fn held_remaps_come_back_in_page_order_and_run_while_each_page_joins() {
        let mut held = HeldRemaps::new(10);
        for (i, pfn, writable) in [(9, 8, false), (3, 40, true), (5, 42, false), (4, 41, true), (6, 7, false)] {
            held.push(i, remap(pfn, writable));
        }
        assert!(held.contains(3) && !held.contains(7));
        let remaps = held.take();
        assert!(!held.contains(3) && held.take().is_empty());
        assert_eq!(remaps.iter().map(|&(i, _)| i).collect::<Vec<_>>(), vec![3, 4, 5, 6, 9]);
        let shape = |runs: Vec<(usize, usize, HeldRemap)>| runs.iter().map(|&(i, n, _)| (i, n)).collect::<Vec<_>>();
        // Neighbouring pages, whatever they map: a gap at 7 and 8.
        assert_eq!(shape(held_runs(&remaps, |_, _| true)), vec![(3, 4), (9, 1)]);
        // Onto neighbouring frames: 6 maps frame 7, not 43.
        assert_eq!(shape(held_runs(&remaps, |a, b| b.pfn == a.pfn + 1)), vec![(3, 3), (6, 1), (9, 1)]);
        // ... with one access: 5 is read-only.
        let one_access = held_runs(&remaps, |a, b| b.pfn == a.pfn + 1 && a.populate == b.populate);
        assert_eq!(shape(one_access.clone()), vec![(3, 2), (5, 1), (6, 1), (9, 1)]);
        assert_eq!(one_access[1].2, remap(42, false));
        assert!(held_runs(&[], |_, _| true).is_empty());
    }
}

//! `gcheap` (c/gcheap.c): a managed runtime's heap under a copying
//! (Cheney, semispace) collector that zeroes the old semispace; its phases,
//! io exits, and a simulation of the heap that gives its exact reports and
//! the copy-on-write faults its writes take after each dedup pass.

use crate::abi::{PAGE_SIZE, WORKLOAD_REGION_START};
use crate::guest_numbers::{
    GCHEAP_CYCLES, GCHEAP_EXTRA_WORDS, GCHEAP_REF_ONE_IN, GCHEAP_ROOTS, GCHEAP_SEED, SPLITMIX_GAMMA,
};
use crate::model::{split_reports, splitmix64};
use crate::pagefill::{pagefill_pages, PAGEFILL_WORDS_PER_PAGE};

/// First guest-physical address of `gcheap`'s region (its roots, then its
/// two semispaces): 2 MiB.
pub const GCHEAP_START: u64 = WORKLOAD_REGION_START;

/// The last phase `gcheap` marks: three per cycle, then the checksum.
pub const GCHEAP_PHASES: u32 = 3 * GCHEAP_CYCLES as u32 + 1;

/// The names of `gcheap`'s phases 1 to 13.
pub const GCHEAP_PHASE_NAMES: [&str; GCHEAP_PHASES as usize] = {
    let mut names = ["allocate"; GCHEAP_PHASES as usize];
    let mut cycle = 0;
    while cycle < GCHEAP_CYCLES as usize {
        names[3 * cycle + 1] = "collect";
        names[3 * cycle + 2] = "merge pass";
        cycle += 1;
    }
    names[GCHEAP_PHASES as usize - 1] = "checksum";
    names
};

/// Io exits of each phase, 0 to 13: the first marker; per cycle allocate
/// (name + marker), collect (name + report + marker) and the pass (name +
/// dedup + marker); the checksum (name + 6 reports + exit).
pub const GCHEAP_PHASE_IO: [u64; GCHEAP_PHASES as usize + 1] = [1, 2, 3, 3, 2, 3, 3, 2, 3, 3, 2, 3, 3, 8];

/// Io exits of a `gcheap` run with at least one page above 2 MiB (with none
/// the guest skips the cycles): 13 markers, 13 names, 4 dedup requests, 10
/// reports, 1 exit.
pub const GCHEAP_IO_EXITS: u64 = 13 + 13 + 4 + 10 + 1;

/// Bit 0 of a header that forwards to the object's copy.
const FORWARDED: u64 = 1;

/// The heap, word by word, as c/gcheap.c runs it, and which pages each
/// phase wrote.
struct Heap {
    /// The region: the root page, then the two semispaces.
    words: Vec<u64>,
    /// Word index of each semispace's start: `from`, `to`.
    from: usize,
    to: usize,
    space_words: usize,
    free: usize,
    allocated: u64,
    rng: u64,
    /// Pages written since the run began (present, so a pass scans them).
    present: Vec<bool>,
    /// Pages merged at the last pass and not written since.
    merged: Vec<bool>,
    /// Copy-on-write faults of the phase running: first writes to merged pages.
    faults: u64,
}

impl Heap {
    fn new(mem_bytes: u64, guest_index: u64) -> Self {
        let pages = pagefill_pages(mem_bytes) as usize;
        let space_pages = pages.saturating_sub(1) / 2;
        let words_per_page = PAGEFILL_WORDS_PER_PAGE as usize;
        Heap {
            words: vec![0; pages * words_per_page],
            from: words_per_page,
            to: (1 + space_pages) * words_per_page,
            space_words: space_pages * words_per_page,
            free: 0,
            allocated: 0,
            rng: GCHEAP_SEED.wrapping_add(guest_index.wrapping_mul(SPLITMIX_GAMMA)),
            present: vec![false; pages],
            merged: vec![false; pages],
            faults: 0,
        }
    }

    /// The guest-physical address of word `i`.
    fn address(i: usize) -> u64 {
        GCHEAP_START + i as u64 * 8
    }

    /// The word index of guest-physical address `a`.
    fn index(a: u64) -> usize {
        ((a - GCHEAP_START) / 8) as usize
    }

    fn store(&mut self, i: usize, value: u64) {
        let page = i / PAGEFILL_WORDS_PER_PAGE as usize;
        if self.merged[page] {
            self.merged[page] = false;
            self.faults += 1;
        }
        self.present[page] = true;
        self.words[i] = value;
    }

    fn allocate(&mut self) {
        loop {
            let draw = splitmix64(&mut self.rng);
            let words = 2 + (draw % (GCHEAP_EXTRA_WORDS + 1)) as usize;
            let refs = usize::from((draw >> 32) % GCHEAP_REF_ONE_IN == 0);
            if self.free + words > self.space_words {
                return;
            }
            let object = self.from + self.free;
            self.free += words;
            self.store(object, (words as u64) << 32 | (refs as u64) << 1);
            for r in 1..=refs {
                let root = (splitmix64(&mut self.rng) % GCHEAP_ROOTS) as usize;
                self.store(object + r, self.words[root]);
            }
            for w in 1 + refs..words {
                self.store(object + w, self.allocated.wrapping_mul(SPLITMIX_GAMMA).wrapping_add(w as u64));
            }
            let root = (splitmix64(&mut self.rng) % GCHEAP_ROOTS) as usize;
            self.store(root, Self::address(object));
            self.allocated += 1;
        }
    }

    fn forward(&mut self, to_free: &mut usize, reference: u64) -> u64 {
        if reference == 0 {
            return 0;
        }
        let object = Self::index(reference);
        let header = self.words[object];
        if header & FORWARDED != 0 {
            return header & !FORWARDED;
        }
        let words = (header >> 32) as usize;
        let copy = self.to + *to_free;
        for w in 0..words {
            self.store(copy + w, self.words[object + w]);
        }
        *to_free += words;
        self.store(object, Self::address(copy) | FORWARDED);
        Self::address(copy)
    }

    /// Cheney's collection, the zeroing of from-space and the swap; the
    /// live bytes.
    fn collect(&mut self) -> u64 {
        let mut to_free = 0;
        for root in 0..GCHEAP_ROOTS as usize {
            let forwarded = self.forward(&mut to_free, self.words[root]);
            self.store(root, forwarded);
        }
        let mut scan = 0;
        while scan < to_free {
            let header = self.words[self.to + scan];
            for r in 1..=((header >> 1) & 0x7FFF_FFFF) as usize {
                let forwarded = self.forward(&mut to_free, self.words[self.to + scan + r]);
                self.store(self.to + scan + r, forwarded);
            }
            scan += (header >> 32) as usize;
        }
        for w in self.from..self.from + self.space_words {
            self.store(w, 0);
        }
        std::mem::swap(&mut self.from, &mut self.to);
        self.free = to_free;
        to_free as u64 * 8
    }

    /// A dedup pass: the present pages that are all zero merge (into one
    /// KSM page, or the zero page with `use_zero_pages`); nothing else
    /// matches (object words are unique).
    fn pass(&mut self) {
        let words_per_page = PAGEFILL_WORDS_PER_PAGE as usize;
        for page in 0..self.present.len() {
            let zero = self.words[page * words_per_page..][..words_per_page].iter().all(|&w| w == 0);
            self.merged[page] = self.present[page] && zero;
        }
    }
}

/// What a `gcheap` run does, from the simulation: its reports and the
/// copy-on-write faults (`ept_write`) of each phase, 0 to 13.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcheapRun {
    /// The report list.
    pub reports: Vec<u64>,
    /// `ept_write` of each phase with dedup on.
    pub write_faults: Vec<u64>,
}

/// Simulates guest `guest_index` of `gcheap` with `mem_bytes` of RAM.
///
/// Reports: the live bytes after each of the 4 collections (one report
/// each), then the sum of the live heap's words and of the roots, the live
/// bytes and the objects allocated (64-bit each, low half first). They are
/// the same with dedup off and under every policy.
///
/// Faults, with the built-in deduplicator and ksmd off: a pass merges the
/// pages that are present (written at least once: a page never touched is
/// not scanned, as in Linux) and all zero, that is the zeroed semispace
/// and the part of the other not yet written; every first write to such a
/// page afterwards is one copy-on-write fault under every policy and view.
/// The guest never reads a merged page (the collector reads what it
/// copied, the mutator the roots), so there are no read faults. Exact when
/// every zero page fits one KSM page (`max_page_sharing` at least the
/// semispaces' pages) or with `use_zero_pages` 1 (each is then mapped to the
/// zero page); with chains of KSM pages a last zero page alone in its run
/// may stay unmerged.
pub fn gcheap_run(mem_bytes: u64, guest_index: u64) -> GcheapRun {
    let mut heap = Heap::new(mem_bytes, guest_index);
    let mut reports = Vec::new();
    let mut write_faults = vec![0; GCHEAP_PHASES as usize + 1];
    if heap.words.is_empty() {
        return GcheapRun { reports: vec![0; 6], write_faults };
    }
    for cycle in 0..GCHEAP_CYCLES as usize {
        heap.allocate();
        write_faults[3 * cycle + 1] = std::mem::take(&mut heap.faults);
        reports.push(heap.collect() & 0xFFFF_FFFF);
        write_faults[3 * cycle + 2] = std::mem::take(&mut heap.faults);
        heap.pass();
    }
    let live = &heap.words[heap.from..heap.from + heap.free];
    let roots = &heap.words[..GCHEAP_ROOTS as usize];
    let sum = roots.iter().chain(live).fold(0u64, |s, &w| s.wrapping_add(w));
    reports.extend(split_reports(&[sum, heap.free as u64 * 8, heap.allocated]));
    GcheapRun { reports, write_faults }
}

/// The exact report list of `gcheap` guest `guest_index` with `mem_bytes`
/// of RAM (see [`gcheap_run`]).
pub fn gcheap_expected_reports(mem_bytes: u64, guest_index: u64) -> Vec<u64> {
    gcheap_run(mem_bytes, guest_index).reports
}

/// Bytes of each of `gcheap`'s semispaces for `mem_bytes` of RAM.
pub fn gcheap_semispace_bytes(mem_bytes: u64) -> u64 {
    pagefill_pages(mem_bytes).saturating_sub(1) / 2 * PAGE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heap_without_pages_reports_zeros_and_a_page_holds_the_roots() {
        assert_eq!(gcheap_expected_reports(2 << 20, 0), vec![0; 6]);
        let one = gcheap_expected_reports((2 << 20) + 4096, 0);
        assert_eq!(one, vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "no semispace: nothing allocated, roots null");
    }

    #[test]
    fn phases_and_io_add_up() {
        assert_eq!(GCHEAP_PHASE_IO.iter().sum::<u64>(), GCHEAP_IO_EXITS);
        assert_eq!(GCHEAP_PHASE_NAMES[..4], ["allocate", "collect", "merge pass", "allocate"]);
    }

    #[test]
    fn the_live_heap_fits_and_most_objects_die() {
        let run = gcheap_run(8 << 20, 0);
        assert_eq!(run.reports.len(), 4 + 6);
        let space = gcheap_semispace_bytes(8 << 20);
        for &live in &run.reports[..4] {
            assert!(live > 0 && live < space / 8, "live {live} of {space}");
        }
        let allocated = run.reports[8] | run.reports[9] << 32;
        assert!(allocated > 4 * space / 8 / 20, "{allocated} objects");
        assert_ne!(gcheap_expected_reports(8 << 20, 1), run.reports);
    }

    #[test]
    fn zeroed_semispaces_take_a_write_fault_per_page_the_next_cycle_writes() {
        // 8 MiB: 1,536 pages, a root page and two semispaces of 767 pages.
        // The first pass finds only the zeroed semispace present (the other,
        // never written past the live objects, is not scanned); from then on
        // each allocation writes the untouched tail of the other semispace,
        // merged with it, and each collection copies into the zeroed one.
        let run = gcheap_run(8 << 20, 0);
        let live_pages = |c: usize| run.reports[c].div_ceil(PAGE_SIZE);
        let f = &run.write_faults;
        assert_eq!((f[1], f[2], f[3]), (0, 0, 0), "nothing merged before the first pass");
        assert_eq!(f[4], 0, "cycle 2 allocates over pages the first pass did not scan");
        assert_eq!(f[5], live_pages(1), "the collection copies into the merged zeroed semispace");
        assert_eq!(f[7], 767 - live_pages(0), "cycle 3 allocates over the merged tail");
        assert_eq!(f[8], live_pages(2));
        assert_eq!(f[13], 0);
    }
}

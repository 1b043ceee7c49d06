//! Which chunks of W are registered with the userfaultfd: W is registered
//! lazily, a chunk at a time, the first time the secondary MMU restricts a
//! page of the chunk (module documentation of [`super`]).

/// Pages per chunk: 2 MiB of W. Registering a chunk splits W's VMA at
/// most twice, and neighbouring registered chunks merge back into one VMA,
/// so registration adds at most one VMA per chunk to the map count; the
/// guest's first touches of holes in a registered chunk are userspace
/// faults, so a chunk should not be much larger than what one merge batch
/// touches.
pub(super) const CHUNK_PAGES: usize = 512;

/// The registration state of W's chunks.
#[derive(Debug)]
pub(super) struct Chunks {
    registered: Vec<bool>,
    nr_pages: usize,
}

impl Chunks {
    /// `nr_pages` pages of W, no chunk registered.
    pub(super) fn new(nr_pages: usize) -> Self {
        Self { registered: vec![false; nr_pages.div_ceil(CHUNK_PAGES)], nr_pages }
    }

    /// The runs of pages `(first, pages)` of the chunks overlapping pages
    /// `[i, i + n)` that are not registered yet, neighbouring chunks in one
    /// run. Nothing is marked: [`Chunks::mark`] each run once it is
    /// registered.
    pub(super) fn unregistered(&self, i: usize, n: usize) -> Vec<(usize, usize)> {
        if n == 0 {
            return Vec::new();
        }
        let (first, last) = (i / CHUNK_PAGES, (i + n - 1) / CHUNK_PAGES);
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for c in (first..=last.min(self.registered.len().saturating_sub(1))).filter(|&c| !self.registered[c]) {
            let start = c * CHUNK_PAGES;
            let pages = CHUNK_PAGES.min(self.nr_pages - start);
            match runs.last_mut() {
                Some((s, len)) if *s + *len == start => *len += pages,
                _ => runs.push((start, pages)),
            }
        }
        runs
    }

    /// Marks the chunks of pages `[first, first + pages)` registered.
    pub(super) fn mark(&mut self, first: usize, pages: usize) {
        for c in first / CHUNK_PAGES..(first + pages).div_ceil(CHUNK_PAGES) {
            self.registered[c] = true;
        }
    }

    /// Whether page `i`'s chunk is registered.
    pub(super) fn is_registered(&self, i: usize) -> bool {
        self.registered.get(i / CHUNK_PAGES).copied().unwrap_or(false)
    }

    /// Chunks registered so far.
    pub(super) fn count(&self) -> u64 {
        self.registered.iter().filter(|&&r| r).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unregistered_chunks_come_back_as_runs_clipped_to_the_window() {
        let mut c = Chunks::new(3 * CHUNK_PAGES + 10);
        assert_eq!(c.unregistered(0, 0), vec![]);
        assert_eq!(c.unregistered(5, 1), vec![(0, CHUNK_PAGES)]);
        // A range over all four chunks: one run, the last chunk clipped.
        assert_eq!(c.unregistered(1, 3 * CHUNK_PAGES + 2), vec![(0, 3 * CHUNK_PAGES + 10)]);
        c.mark(CHUNK_PAGES, CHUNK_PAGES);
        assert!(c.is_registered(CHUNK_PAGES) && c.is_registered(2 * CHUNK_PAGES - 1));
        assert!(!c.is_registered(2 * CHUNK_PAGES));
        // The registered chunk splits the run in two.
        assert_eq!(
            c.unregistered(0, 3 * CHUNK_PAGES + 10),
            vec![(0, CHUNK_PAGES), (2 * CHUNK_PAGES, CHUNK_PAGES + 10)]
        );
        c.mark(2 * CHUNK_PAGES, CHUNK_PAGES + 10);
        assert_eq!(c.unregistered(3 * CHUNK_PAGES, 10), vec![]);
        assert_eq!(c.count(), 3);
    }
}

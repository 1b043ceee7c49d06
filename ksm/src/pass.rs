//! The synchronous full pass (port 0x501, value 1), this prototype's own:
//! full scans over every mm on the list until one changes nothing, which
//! the guest waits for; and its
//! cancellable form, which polls its caller every [`KSM_SCAN_SLICE`].

use std::time::Instant;

use crate::ksm::{Ksm, KsmError};
use crate::scan::{ScanStop, KSM_SCAN_SLICE};

/// The most full scans one `full_pass` does.
const MAX_PASS_SCANS: u32 = 8;

impl Ksm {
    /// One synchronous full deduplication pass (port 0x501, value 1): full
    /// scans until one of them changed nothing (no checksum recorded, no
    /// merge, no page leaving a KSM page), a fixpoint: every page that held
    /// still has had its chance to merge with everything it can merge with
    /// (a page is searched for in the trees only once its checksum held for
    /// a scan, and room on a full KSM page can appear late in a scan). A
    /// quiet guest takes three scans: checksums, merges, the quiet one. At
    /// most eight scans. Returns the scans done.
    ///
    /// Smart scan skips nothing during a pass (crate docs, "Deliberate
    /// differences from mm/ksm.c").
    pub fn full_pass(&mut self) -> Result<u32, KsmError> {
        self.full_pass_cancellable(&|| false)
    }

    /// [`Ksm::full_pass`] that asks `cancelled` before every stretch of at
    /// most [`KSM_SCAN_SLICE`] and stops with [`KsmError::Cancelled`] once it
    /// says yes; the pages scanned so far keep what the scan did to them.
    pub fn full_pass_cancellable(&mut self, cancelled: &dyn Fn() -> bool) -> Result<u32, KsmError> {
        self.ksm_scan.in_full_pass = true;
        let result = self.full_pass_scans(cancelled);
        self.ksm_scan.in_full_pass = false;
        result
    }

    /// Events that change what a later scan would find.
    fn changes(&self) -> u64 {
        self.checksum_updates + self.stats.merges + self.departures
    }

    fn full_pass_scans(&mut self, cancelled: &dyn Fn() -> bool) -> Result<u32, KsmError> {
        let mut scans = 0;
        // A scan ksmd left half done is finished first; it does not count as
        // the quiet scan that ends the pass, which must see every page.
        if self.ksm_scan.in_scan {
            self.finish_scan(cancelled)?;
            scans += 1;
        }
        loop {
            let before = self.changes();
            self.finish_scan(cancelled)?;
            scans += 1;
            if self.changes() == before || scans >= MAX_PASS_SCANS {
                return Ok(scans);
            }
        }
    }

    /// Scans to the end of the full scan under way (a whole one if none
    /// is), in stretches of at most [`KSM_SCAN_SLICE`], asking `cancelled`
    /// before each.
    fn finish_scan(&mut self, cancelled: &dyn Fn() -> bool) -> Result<(), KsmError> {
        loop {
            if cancelled() {
                return Err(KsmError::Cancelled);
            }
            let (_, stop) = self.scan_pages(u64::MAX, Some(Instant::now() + KSM_SCAN_SLICE))?;
            if stop == ScanStop::ScanEnd {
                return Ok(());
            }
        }
    }
}

//! Unmerging, after mm/ksm.c's `unmerge_and_remove_all_rmap_items` (run =
//! 2): every page mapping a KSM page or the zero page gets a private copy
//! (`break_cow`), and both trees are emptied.

use std::sync::Mutex;

use shadow_mmu::{lock, PrimaryMmu};

use crate::ksm::{Ksm, KsmError};
use crate::rmap::RmapState;

impl Ksm {
    /// Unmerges everything (run = 2, port 0x501 value 4): every page mapping
    /// a KSM page or the zero page gets a private copy (`break_cow`), and
    /// both trees are emptied. Afterwards no two guest pages share a frame.
    pub fn unmerge_all(&mut self, host: &Mutex<PrimaryMmu>) -> Result<(), KsmError> {
        let mut h = lock(host);
        for idx in 0..self.rmap.len() {
            let state = self.rmap[idx].state;
            if state == RmapState::Stable || state == RmapState::Zero {
                // break_cow: a write fault without the write.
                h.get_user_page(self.gfn(idx), true)?;
            }
            self.remove_rmap_item_from_tree(idx, &mut h);
        }
        self.unstable.clear();
        self.ksm_scan.cursor = 0;
        h.flush_holes()?;
        Ok(())
    }
}

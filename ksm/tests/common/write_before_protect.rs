//! A vCPU write that lands just before KSM write-protects a page: the race
//! `write_protect_page` must lose gracefully.

use std::sync::{Arc, Mutex};

use shadow_mmu::{FramePool, Gfn, MmuNotifier, MmuNotifierRange, Pfn, Pte, PAGE_SHIFT};
use vm_memory::{Bytes, GuestAddress};

use super::Lab;

/// A notifier subscriber standing for a vCPU write that lands just before
/// KSM write-protects `gfn`: at the first range opened on `gfn` it writes
/// `data` into frame `pfn` (the page's frame, still writable then).
pub struct WriteBeforeProtect {
    pool: Arc<FramePool>,
    gfn: Gfn,
    pfn: Pfn,
    data: Vec<u8>,
    done: bool,
}

impl WriteBeforeProtect {
    /// Arms the write on `gfn` (its frame now) in `lab`'s primary MMU.
    pub fn arm(lab: &Lab, gfn: Gfn, data: Vec<u8>) {
        let pfn = lab.host().pte(gfn).expect("pte").pfn;
        let hook = Self { pool: lab.guest.pool.clone(), gfn, pfn, data, done: false };
        lab.host().mmu_notifier_register(Arc::new(Mutex::new(hook)));
    }
}

impl MmuNotifier for WriteBeforeProtect {
    fn invalidate_range_start(&mut self, range: &MmuNotifierRange) {
        if !self.done && range.contains(self.gfn) {
            self.done = true;
            let at = GuestAddress(self.pfn << PAGE_SHIFT);
            self.pool.direct_map().write_slice(&self.data, at).expect("write the frame");
        }
    }
    fn invalidate_range_end(&mut self, _: &MmuNotifierRange) {}
    fn change_pte(&mut self, _: Gfn, _: Pte) {}
}

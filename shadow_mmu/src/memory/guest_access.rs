//! The VMM's own reads and writes of guest-physical memory, through the
//! direct map onto the frames the host ptes map now (the VMM completing an
//! access KVM retired, reading what the guest points it at); boot memory
//! is the guest's reserved frames, from its base frame on.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::{PrimaryMmu, PrimaryMmuError};
use crate::frame_pool::{Pfn, PAGE_SHIFT, PAGE_SIZE};

impl PrimaryMmu {
    /// Reads guest-physical memory as the guest would see it now.
    pub fn read_guest(&self, gpa: u64, buf: &mut [u8]) -> Result<(), PrimaryMmuError> {
        self.access_guest(gpa, buf.len(), |mem, host, at, len| mem.read_slice(&mut buf[at..at + len], host), false)
    }

    /// Writes guest-physical memory; every page written must have a writable
    /// pte (break copy-on-write first with [`PrimaryMmu::get_user_page`]).
    pub fn write_guest(&mut self, gpa: u64, data: &[u8]) -> Result<(), PrimaryMmuError> {
        self.access_guest(gpa, data.len(), |mem, host, at, len| mem.write_slice(&data[at..at + len], host), true)
    }

    /// The frame that guest-physical `gpa` reaches now, and whether it may be
    /// written.
    fn frame_of(&self, gpa: u64) -> Result<(Pfn, bool), PrimaryMmuError> {
        let gfn = gpa >> PAGE_SHIFT;
        if gfn < self.first_gfn {
            // The VMM's boot memory: linear from the guest's base frame.
            return Ok((self.base_pfn + gfn, true));
        }
        let pte = self.pte(gfn)?;
        Ok((pte.pfn, pte.writable))
    }

    /// Runs `op(direct map, host address, offset in the buffer, length)` for
    /// each page piece of [gpa, gpa + len), refusing a write through a
    /// read-only pte.
    fn access_guest(
        &self,
        gpa: u64,
        len: usize,
        mut op: impl FnMut(&GuestMemoryMmap, GuestAddress, usize, usize) -> Result<(), GuestMemoryError>,
        write: bool,
    ) -> Result<(), PrimaryMmuError> {
        let mut done = 0usize;
        while done < len {
            let at = gpa + done as u64;
            let in_page = ((PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize).min(len - done);
            let (pfn, writable) = self.frame_of(at)?;
            if write && !writable {
                return Err(PrimaryMmuError::ReadOnly(at >> PAGE_SHIFT));
            }
            let host = GuestAddress((pfn << PAGE_SHIFT) | (at & (PAGE_SIZE - 1)));
            op(self.pool().direct_map(), host, done, in_page)
                .map_err(|source| PrimaryMmuError::Access { gpa: at, source })?;
            done += in_page;
        }
        Ok(())
    }
}

//! Segment descriptors: one definition gives both the GDT bytes the guest's
//! CPU reads and the `kvm_segment` handed to KVM_SET_SREGS, so they can't
//! disagree.

use kvm_bindings::kvm_segment;

use super::layout::{TSS_ADDR, TSS_LIMIT};

/// A flat segment as the VMM defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Selector (index × 8 | RPL).
    pub selector: u16,
    /// Base address.
    pub base: u64,
    /// Limit in bytes (scaled by 4 KiB when `granularity`).
    pub limit: u32,
    /// Descriptor type field (e.g. 0xB: execute/read, accessed; 0x3: read/write, accessed).
    pub kind: u8,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// S bit: code or data (true) or system (false).
    pub code_or_data: bool,
    /// D/B bit (32-bit default size); must be 0 for 64-bit code.
    pub db: bool,
    /// L bit: 64-bit code.
    pub long: bool,
    /// G bit: limit counts 4 KiB units.
    pub granularity: bool,
}

/// GDT index of the user data segment.
pub const USER_DATA_INDEX: u16 = 1;
/// GDT index of the user 64-bit code segment.
pub const USER_CODE_INDEX: u16 = 2;
/// GDT index of the TSS descriptor (it takes two slots).
pub const TSS_INDEX: u16 = 3;
/// Number of 8-byte GDT slots.
pub const GDT_SLOTS: usize = 5;

/// The CPL-3 data segment (SS, DS, ES, FS, GS).
pub const USER_DATA: Segment = Segment {
    selector: (USER_DATA_INDEX << 3) | 3,
    base: 0,
    limit: 0xF_FFFF,
    kind: 0x3,
    dpl: 3,
    code_or_data: true,
    db: true,
    long: false,
    granularity: true,
};

/// The CPL-3 64-bit code segment (CS).
pub const USER_CODE: Segment = Segment {
    selector: (USER_CODE_INDEX << 3) | 3,
    base: 0,
    limit: 0xF_FFFF,
    kind: 0xB,
    dpl: 3,
    code_or_data: true,
    db: false,
    long: true,
    granularity: true,
};

/// The (busy, 64-bit) TSS that VM entry requires in TR. Its I/O permission
/// bitmap allows every port, so the guest's `in`/`out` are legal at CPL 3
/// whatever RFLAGS.IOPL holds: PVM keeps no virtual IOPL across exits (it
/// reloads RFLAGS from the hardware's, IOPL 0) and then checks the bitmap.
pub const TSS: Segment = Segment {
    selector: TSS_INDEX << 3,
    base: TSS_ADDR,
    limit: TSS_LIMIT,
    kind: 0xB,
    dpl: 0,
    code_or_data: false,
    db: false,
    long: false,
    granularity: false,
};

impl Segment {
    fn access_byte(&self) -> u64 {
        (1 << 7) | (u64::from(self.dpl & 3) << 5) | (u64::from(self.code_or_data) << 4) | u64::from(self.kind & 0xF)
    }

    fn flags_nibble(&self) -> u64 {
        (u64::from(self.granularity) << 3) | (u64::from(self.db) << 2) | (u64::from(self.long) << 1)
    }

    /// The low 8 bytes of the descriptor, in the SDM's layout.
    pub fn descriptor(&self) -> u64 {
        let base = self.base & 0xFFFF_FFFF;
        let limit = u64::from(self.limit);
        (limit & 0xFFFF)
            | ((base & 0xFF_FFFF) << 16)
            | (self.access_byte() << 40)
            | (((limit >> 16) & 0xF) << 48)
            | (self.flags_nibble() << 52)
            | (((base >> 24) & 0xFF) << 56)
    }

    /// The segment as KVM_SET_SREGS takes it (limit already scaled).
    pub fn kvm_segment(&self) -> kvm_segment {
        let limit = if self.granularity { (self.limit << 12) | 0xFFF } else { self.limit };
        kvm_segment {
            base: self.base,
            limit,
            selector: self.selector,
            type_: self.kind,
            present: 1,
            dpl: self.dpl,
            db: u8::from(self.db),
            s: u8::from(self.code_or_data),
            l: u8::from(self.long),
            g: u8::from(self.granularity),
            avl: 0,
            unusable: 0,
            padding: 0,
        }
    }
}

/// The GDT as little-endian 8-byte slots: null, user data, user code, TSS (2 slots).
pub fn gdt_slots() -> [u64; GDT_SLOTS] {
    [
        0,
        USER_DATA.descriptor(),
        USER_CODE.descriptor(),
        TSS.descriptor(),
        TSS.base >> 32, // upper half of the 16-byte system descriptor
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_sdm_encoding() {
        // Well-known flat 64-bit user code / data descriptors.
        assert_eq!(USER_CODE.descriptor(), 0x00AF_FB00_0000_FFFF);
        assert_eq!(USER_DATA.descriptor(), 0x00CF_F300_0000_FFFF);
        // 64-bit busy TSS at 0x6000, limit 0x2068 (TSS + I/O bitmap), DPL 0.
        assert_eq!(TSS.descriptor(), 0x0000_8B00_6000_2068);
    }

    #[test]
    fn kvm_segments_carry_cpl3_selectors() {
        let cs = USER_CODE.kvm_segment();
        assert_eq!((cs.selector & 3, cs.dpl, cs.l, cs.db), (3, 3, 1, 0));
        assert_eq!(cs.limit, 0xFFFF_FFFF);
        let ss = USER_DATA.kvm_segment();
        assert_eq!((ss.selector & 3, ss.dpl, ss.type_), (3, 3, 3));
        let tr = TSS.kvm_segment();
        assert_eq!((tr.s, tr.type_, tr.limit), (0, 0xB, TSS_LIMIT));
        assert_eq!(usize::from(TSS.selector >> 3) + 2, GDT_SLOTS);
    }
}

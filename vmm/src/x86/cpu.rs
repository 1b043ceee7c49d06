//! The vCPU's registers at the guest's entry point (ABI v1).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use super::gdt::{gdt_slots, GDT_SLOTS, TSS, USER_CODE, USER_DATA};
#[cfg(doc)]
use super::layout::TSS_ADDR;
use super::layout::{GDT_ADDR, PML4_ADDR, STACK_TOP, TSS_IOMAP_BYTES, TSS_IOMAP_OFFSET};

/// CR0: protection enable, monitor coprocessor, extension type, paging
/// (EM and TS clear: x87 and SSE run, and never trap).
pub const CR0_PE_MP_ET_PG: u64 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 31);
/// CR4: physical address extension, and OSFXSR and OSXMMEXCPT, which make
/// SSE instructions legal. Ring 3 on the development machines' KVM runs SSE
/// whatever CR4 says, but KVM's instruction emulator, which performs a guest
/// access to a hole or a read-only memslot (a page the secondary MMU does
/// not map, or maps read-only), follows CR4: without OSFXSR an SSE access to
/// such a page would be a #UD (a triple fault) under a deduplication policy
/// and succeed with dedup off. OSXSAVE stays clear, so AVX (VEX) is not
/// enabled: KVM's emulator cannot perform AVX accesses at all.
pub const CR4_PAE_OSFXSR_OSXMMEXCPT: u64 = (1 << 5) | (1 << 9) | (1 << 10);
/// EFER: long mode enable and active.
pub const EFER_LME_LMA: u64 = (1 << 8) | (1 << 10);
/// RFLAGS: IOPL 3, the always-one bit 1, interrupts disabled.
pub const RFLAGS_IOPL3: u64 = (3 << 12) | (1 << 1);

/// A KVM ioctl of the vCPU's setup failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed")]
pub struct CpuSetupError {
    /// The ioctl.
    pub what: &'static str,
    /// KVM's error.
    #[source]
    pub source: kvm_ioctls::Error,
}

/// Puts `vcpu` at the guest's entry point per ABI v1: the CPUID this KVM
/// supports, the general registers, long mode at CPL 3 and the x87/SSE
/// reset state.
pub fn configure_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    entry: u64,
    ram_bytes: u64,
    seat: FleetSeat,
) -> Result<(), CpuSetupError> {
    let failed = |what| move |source| CpuSetupError { what, source };
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(failed("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(failed("KVM_SET_CPUID2"))?;
    vcpu.set_regs(&entry_regs(entry, ram_bytes, seat)).map_err(failed("KVM_SET_REGS"))?;
    let mut sregs = vcpu.get_sregs().map_err(failed("KVM_GET_SREGS"))?;
    set_long_mode_cpl3(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(failed("KVM_SET_SREGS"))?;
    vcpu.set_fpu(&entry_fpu()).map_err(failed("KVM_SET_FPU"))
}

/// Sets up long mode at CPL 3 on top of the sregs KVM returned (so that
/// fields the VMM has no opinion on keep KVM's values).
pub fn set_long_mode_cpl3(sregs: &mut kvm_sregs) {
    sregs.cr0 = CR0_PE_MP_ET_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE_OSFXSR_OSXMMEXCPT;
    sregs.efer = EFER_LME_LMA;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT_SLOTS * 8 - 1) as u16;
    // No IDT: any exception escalates to a triple fault (ABI v1).
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = USER_CODE.kvm_segment();
    let data = USER_DATA.kvm_segment();
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = TSS.kvm_segment();
    sregs.ldt.unusable = 1;
    sregs.ldt.present = 0;
}

/// x87 control word at entry: every exception masked, 64-bit precision
/// (the FNINIT value).
pub const FCW_DEFAULT: u16 = 0x037F;
/// MXCSR at entry: every SSE exception masked, round to nearest (the reset
/// value).
pub const MXCSR_DEFAULT: u32 = 0x1F80;

/// The x87/SSE state at entry: the reset values, registers zero.
pub fn entry_fpu() -> kvm_fpu {
    kvm_fpu { fcw: FCW_DEFAULT, mxcsr: MXCSR_DEFAULT, ..Default::default() }
}

/// Where a guest stands in its fleet (ABI 1.1: RSI and RDX at entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetSeat {
    /// The guest's index, 0..count.
    pub index: u64,
    /// The number of guests in the fleet (1 for a single guest).
    pub count: u64,
}

impl FleetSeat {
    /// A guest on its own.
    pub const ALONE: FleetSeat = FleetSeat { index: 0, count: 1 };
}

/// General registers at entry: RIP, RSP at the stack top, RDI = RAM size,
/// RSI = the guest's index in its fleet, RDX = the number of guests.
pub fn entry_regs(entry: u64, ram_bytes: u64, seat: FleetSeat) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: STACK_TOP,
        rdi: ram_bytes,
        rsi: seat.index,
        rdx: seat.count,
        rflags: RFLAGS_IOPL3,
        ..Default::default()
    }
}

/// The TSS bytes to place at [`TSS_ADDR`]: a zero TSS whose I/O map base
/// points at a bitmap of zeros (every port allowed), then the 0xFF byte the
/// SDM requires after the bitmap.
pub fn tss_bytes() -> Vec<u8> {
    let mut tss = vec![0u8; (TSS_IOMAP_OFFSET + TSS_IOMAP_BYTES + 1) as usize];
    tss[0x66..0x68].copy_from_slice(&(TSS_IOMAP_OFFSET as u16).to_le_bytes());
    if let Some(last) = tss.last_mut() {
        *last = 0xFF;
    }
    tss
}

/// The GDT bytes to place at [`GDT_ADDR`].
pub fn gdt_bytes() -> Vec<u8> {
    gdt_slots().iter().flat_map(|d| d.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_state_matches_abi_v1() {
        let mut sregs = kvm_sregs::default();
        set_long_mode_cpl3(&mut sregs);
        assert_eq!((sregs.cr0, sregs.cr4, sregs.efer), (0x8000_0013, 0x620, 0x500));
        assert_eq!((entry_fpu().fcw, entry_fpu().mxcsr), (0x37F, 0x1F80));
        assert_eq!(sregs.cs.dpl, 3);
        assert_eq!(sregs.ss.selector & 3, 3);
        let regs = entry_regs(0x10_0000, 64 << 20, FleetSeat { index: 2, count: 3 });
        assert_eq!((regs.rsi, regs.rdx), (2, 3));
        assert_eq!(regs.rflags, 0x3002);
        assert_eq!((regs.rip, regs.rdi, regs.rsp), (0x10_0000, 64 << 20, STACK_TOP));
        assert_eq!(gdt_bytes().len(), usize::from(sregs.gdt.limit) + 1);
        let tss = tss_bytes();
        assert_eq!(tss.len() as u32, sregs.tr.limit + 1);
        assert_eq!(u16::from_le_bytes([tss[0x66], tss[0x67]]), 0x68);
        assert!(tss[0x68..tss.len() - 1].iter().all(|&b| b == 0), "every port allowed");
    }
}

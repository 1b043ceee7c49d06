//! Guests written by the tests themselves, as raw ELF images.

/// A minimal ABI-v1 guest that takes phases 0, 1, 2 and 1 again, then exits
/// 0; the second phase 1 also writes port 0x80, so its figures differ from
/// the first one's.
pub fn phase_reuse_guest() -> Vec<u8> {
    let mut code = vec![0xBA, 0x00, 0x05, 0x00, 0x00]; // mov edx, 0x500
    for phase in [1u32, 2, 1] {
        code.push(0xB8); // mov eax, phase
        code.extend(phase.to_le_bytes());
        code.push(0xEF); // out dx, eax
    }
    code.extend([0xBA, 0x80, 0x00, 0x00, 0x00]); // mov edx, 0x80
    code.extend([0xEE, 0xEE, 0xEE]); // out dx, al (three times)
    code.extend([0xBA, 0xF4, 0x00, 0x00, 0x00]); // mov edx, 0xf4
    code.extend([0x31, 0xC0, 0xEF, 0xF4]); // xor eax, eax; out dx, eax; hlt
    static_elf(&code, 5)
}

/// A static ELF64 x86-64 executable with one PT_LOAD of `image` at 1 MiB
/// (the entry point), with segment flags `p_flags` (5: R+X, 7: R+W+X).
pub fn static_elf(image: &[u8], p_flags: u32) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let mut elf = b"\x7fELF".to_vec();
    elf.extend([2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // ELFCLASS64, little-endian, version 1
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(62u16.to_le_bytes()); // EM_X86_64
    elf.extend(1u32.to_le_bytes());
    for v in [LOAD, 64, 0] {
        elf.extend(v.to_le_bytes()); // e_entry, e_phoff, e_shoff
    }
    elf.extend(0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        elf.extend(v.to_le_bytes()); // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
    }
    elf.extend(1u32.to_le_bytes()); // PT_LOAD
    elf.extend(p_flags.to_le_bytes());
    let len = image.len() as u64;
    for v in [64 + 56, LOAD, LOAD, len, len, 0x1000] {
        elf.extend(v.to_le_bytes()); // offset, vaddr, paddr, filesz, memsz, align
    }
    elf.extend_from_slice(image);
    elf
}

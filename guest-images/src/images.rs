//! The table of built-in images: each one's name, a line saying what it does,
//! and its ELF, embedded from `$OUT_DIR/<name>.elf` (built by build.rs).

use crate::abi::GUEST_BASE;

/// A built-in guest image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Image {
    /// The image's name, e.g. `"hello"` (the `asm/<name>.S` it is built from).
    pub name: &'static str,
    /// One line saying what the guest does and which exits it takes.
    pub summary: &'static str,
    /// The static ELF64 x86-64 executable, loaded at 1 MiB.
    pub elf: &'static [u8],
}

impl Image {
    /// The first guest-physical address past the image's PT_LOAD segments
    /// (memory up to `p_memsz`, `.bss` included): its end once loaded.
    pub fn load_end(&self) -> u64 {
        let elf = self.elf;
        let field = |at: usize, len: usize| elf[at..at + len].iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b));
        let (phoff, phentsize, phnum) = (field(32, 8) as usize, field(54, 2) as usize, field(56, 2) as usize);
        (0..phnum)
            .map(|i| phoff + i * phentsize)
            .filter(|&ph| field(ph, 4) == PT_LOAD)
            .map(|ph| field(ph + 24, 8) + field(ph + 40, 8))
            .max()
            .unwrap_or(GUEST_BASE)
    }
}

/// The program header type of a loadable segment.
const PT_LOAD: u64 = 1;

/// Embeds `$OUT_DIR/<name>.elf`, built by build.rs from `asm/<name>.S`.
macro_rules! image {
    ($name:literal, $summary:expr) => {
        Image { name: $name, summary: $summary, elf: include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".elf")) }
    };
}

/// Every built-in image, sorted by name.
pub const IMAGES: &[Image] = &[
    image!(
        "access",
        "reads of 1, 2, 4, 8 bytes, a page-crossing read and write, a call into another page, \
         16-byte SSE loads and stores, after a dedup request: 24 io exits plus the faults of zapped pages"
    ),
    image!(
        "converge",
        "fills RAM above 2 MiB with 64 groups of identical pages, one dedup pass (a fleet's between \
         barriers), reports a checksum: 10 io exits (size it with --mem: 257M = 256 MiB of pages)"
    ),
    image!(
        "cowstorm",
        "fills RAM above 2 MiB with 8 groups of identical pages, then 4 rounds of a dedup pass and a \
         write to every page (a copy-on-write storm), reports a checksum: 27 io exits plus one write fault \
         per page and round"
    ),
    image!(
        "dirtylog",
        "C: a pre-copy loop, 4 soft-dirty rounds each followed by reads of all memory and writes to a \
         working set that halves round by round, reports 5 checksums: 43 io exits plus one write fault per \
         page written (and read faults where a round zaps)"
    ),
    image!(
        "gcheap",
        "C: a managed heap under a copying (Cheney) collector that zeroes the old semispace, 4 cycles of \
         allocate, collect and a dedup pass, reports live bytes and a checksum: 41 io exits plus one write \
         fault per merged zero page written"
    ),
    image!("hello", "prints \"Hello from a tiny guest\\n\" on COM1, exits 0: 25 io exits"),
    image!(
        "kvstore",
        "C: a hash-table key-value store over RAM above 2 MiB, YCSB zipfian requests (workload B, a dedup \
         pass, workload A), half its values copies of 8 templates, reports 3 checksums: 18 io exits plus the \
         faults of merged values"
    ),
    image!(
        "ltp-ksm01",
        "C: LTP ksm01's create_same_memory in one guest: three children as three regions, LTP's four \
         stages of contents with a pass each, the 'e' byte, unmerge, stop: 24 io exits plus the faults of \
         merged pages"
    ),
    image!(
        "ltp-ksm01-fleet",
        "C: LTP ksm01 as a fleet: guest i is LTP's child i, stages between barriers, guest 0 asks for the \
         passes: 39 io exits for guest 0 (33 for the others) plus the faults of merged pages"
    ),
    image!(
        "misbehave-beyond-map",
        "a qword written and read across the end of RAM (half RAM, half MMIO), a read at 4 GiB - 8, then \
         one at 4 GiB, past the identity map: 8 io exits and 3 mmio exits, then a triple fault at 0x100000"
    ),
    image!(
        "misbehave-beyond-ram",
        "reads and writes just past RAM, reads port 0x80, reports the reads, \
         exits 0: 2 mmio + 5 io exits"
    ),
    image!(
        "misbehave-dedup-flood",
        "C: 2,000 ksmd start/stop pairs, 10 passes, 100 unmerges and 1,000 values that are no request, \
         rewriting a group of pages between them, then a checksum: 5,135 io exits plus timing-dependent faults"
    ),
    image!("misbehave-exit-code", "exits with code 3 at once: 1 io exit"),
    image!("misbehave-hlt", "executes HLT at its entry point (ends the run with code 0): no io exit"),
    image!(
        "misbehave-low-read",
        "reads and writes its stack (1 io exit), then reads the VMM's PML4 at 0x3000, supervisor-only: \
         a triple fault at 0x100000"
    ),
    image!(
        "misbehave-low-write",
        "reports the RAM size (1 io exit), then writes the VMM's PML4 at 0x3000, supervisor-only: a \
         triple fault at 0x100000 and nothing written"
    ),
    image!(
        "misbehave-merged-code",
        "C: code copied into twin pages and its own image copied into data, a pass merges them, then it \
         runs the merged code and patches it (self-modifying code on merged pages): 17 io exits plus fetch \
         and copy-on-write faults"
    ),
    image!(
        "misbehave-phase-flood",
        "starts phase after phase through port 0x500 and never stops: the VMM ends the run (guest_limit)"
    ),
    image!(
        "misbehave-port-end",
        "reads port 0xFFFF at 8 bits (2 io exits), then at 16 bits, past the port space: a triple fault \
         at 0x100000 on this host (PVM), 2 io exits more and exit 0 where the CPU performs it"
    ),
    image!("misbehave-port-flood", "writes port 0x80 100,000 times, exits 0: 100,001 io exits"),
    image!(
        "misbehave-ports",
        "C: in and out of 8, 16 and 32 bits to the ABI's ports, their neighbours and every 257th port, \
         phase names the VMM must refuse, narrow reports, rep ins and rep outs, COM1's registers: 1,666 io \
         exits on this host"
    ),
    image!("misbehave-spin", "prints \"spinning\\n\" (9 io exits), then loops forever"),
    image!(
        "misbehave-sse-merged",
        "two identical pages, a pass, then paddq xmm0 on one of them: 10 io exits, or a KVM internal \
         error at 0x100000 where the memslot view makes KVM emulate it (range-flush, legacy)"
    ),
    image!("misbehave-triple-fault", "prints \"about to fault\\n\" (15 io exits), then ud2 at 0x100000: triple fault"),
    image!(
        "misbehave-unmerge-ksmd",
        "C: 16 rounds of ksmd started, a spin while it merges, a write, an unmerge while it runs, and a \
         check of every word: 43 io exits plus timing-dependent faults"
    ),
    image!(
        "misbehave-zero-pages",
        "C: half its pages zero, a quarter never touched, passes with and without use_zero_pages, reads \
         and writes of the merged zero pages: 19 io exits plus one fault per zero page touched"
    ),
    image!(
        "mixed",
        "fills RAM above 2 MiB with 8 groups, one dedup pass, then 16 paced phases that read every page \
         and write every 8th: 44 io exits plus policy-dependent read and write faults"
    ),
    image!(
        "pagefill",
        "fills RAM above 2 MiB with 16 groups of identical pages, dedups, \
         rewrites a word per page, dedups, reports 3 checksums: 21 io exits"
    ),
    image!(
        "stress",
        "fills RAM above 2 MiB, dedups, starts ksmd, writes 100,000 pseudo-random words while it \
         merges, reports a checksum: 12 io exits plus policy-dependent faults"
    ),
    image!(
        "template",
        "C: every guest of a fleet fills RAM above 2 MiB with the same image, a pass, then each rewrites \
         its own eighth of the pages, a pass, 2 checksums: 23 io exits for guest 0 (21 for the others)"
    ),
    image!(
        "unique",
        "fills RAM above 2 MiB with pages all different, one dedup pass (nothing merges), a checksum: \
         10 io exits and no fault"
    ),
    image!(
        "volatile",
        "starts ksmd and rewrites every page 4,097 times with unique, ever-changing content: nothing \
         merges, 11 io exits and no fault"
    ),
];

/// Looks up a built-in image by its exact name.
pub fn find(name: &str) -> Option<&'static Image> {
    IMAGES.iter().find(|image| image.name == name)
}

/// Guest-physical (= virtual) address every built-in image is linked at:
/// the ABI's [`GUEST_BASE`] (link.ld takes it from the generated
/// `abi-numbers.ld`).
pub const IMAGE_BASE: u64 = GUEST_BASE;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{contains, to_usize};
    use crate::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
    }
    /// A PT_LOAD segment: (p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz).
    type Load = (u32, u64, u64, u64, u64, u64);

    /// Checks the ELF header by hand; returns (e_entry, PT_LOAD segments).
    fn parse(image: &Image) -> (u64, Vec<Load>) {
        let b = image.elf;
        let name = image.name;
        assert!(b.len() >= 64, "{name}: too short");
        assert_eq!(&b[..4], b"\x7fELF", "{name}: magic");
        assert_eq!(b[4], 2, "{name}: not ELFCLASS64");
        assert_eq!(b[5], 1, "{name}: not little-endian");
        assert_eq!(b[6], 1, "{name}: EI_VERSION");
        assert_eq!(u16_at(b, 16), 2, "{name}: e_type is not ET_EXEC");
        assert_eq!(u16_at(b, 18), 62, "{name}: e_machine is not EM_X86_64");
        assert_eq!(u32_at(b, 20), 1, "{name}: e_version");
        let entry = u64_at(b, 24);
        let phoff = to_usize(u64_at(b, 32));
        let phentsize = usize::from(u16_at(b, 54));
        let phnum = usize::from(u16_at(b, 56));
        assert_eq!(phentsize, 56, "{name}: e_phentsize");
        assert!(phoff + phnum * phentsize <= b.len(), "{name}: phdrs past end");
        let loads: Vec<Load> = (0..phnum)
            .map(|i| phoff + i * phentsize)
            .filter(|&ph| u64::from(u32_at(b, ph)) == PT_LOAD)
            .map(|ph| {
                (
                    u32_at(b, ph + 4),
                    u64_at(b, ph + 8),
                    u64_at(b, ph + 16),
                    u64_at(b, ph + 24),
                    u64_at(b, ph + 32),
                    u64_at(b, ph + 40),
                )
            })
            .collect();
        (entry, loads)
    }

    /// The file bytes at guest-physical address `gpa`, to the segment's end.
    fn bytes_at(image: &Image, gpa: u64) -> &'static [u8] {
        let (_, loads) = parse(image);
        let &(_, offset, _, paddr, filesz, _) = loads
            .iter()
            .find(|l| (l.3..l.3 + l.4).contains(&gpa))
            .unwrap_or_else(|| panic!("{}: {gpa:#x} not in the file", image.name));
        &image.elf[to_usize(offset + gpa - paddr)..to_usize(offset + filesz)]
    }

    #[test]
    fn every_image_is_a_valid_elf64_x86_64_exec_above_1mib() {
        for image in IMAGES {
            let name = image.name;
            let (entry, loads) = parse(image);
            assert!(!loads.is_empty(), "{name}: no PT_LOAD");
            assert!(entry >= IMAGE_BASE, "{name}: entry {entry:#x} below 1 MiB");
            for &(flags, offset, vaddr, paddr, filesz, memsz) in &loads {
                assert!(paddr >= IMAGE_BASE, "{name}: p_paddr {paddr:#x} below 1 MiB");
                assert_eq!(paddr, vaddr, "{name}: p_paddr != p_vaddr");
                assert!(filesz <= memsz, "{name}: p_filesz > p_memsz");
                assert!(memsz > 0, "{name}: empty PT_LOAD");
                assert!(offset + filesz <= image.elf.len() as u64, "{name}: segment past end of file");
                assert!(paddr + memsz < PAGEFILL_START, "{name}: image reaches 2 MiB");
                assert_ne!(flags & 1, 0, "{name}: PT_LOAD not executable");
            }
            assert!(
                loads.iter().any(|l| (l.3..l.3 + l.4).contains(&entry) && l.0 & 1 != 0),
                "{name}: entry {entry:#x} not in an executable PT_LOAD"
            );
        }
    }

    #[test]
    fn images_are_sorted_unique_and_findable() {
        assert!(IMAGES.windows(2).all(|w| w[0].name < w[1].name));
        for image in IMAGES {
            assert_eq!(find(image.name), Some(image));
            assert!(!image.summary.is_empty());
        }
        // Every source in asm/ and c/ is a built-in image.
        let sources = |dir: &str, ext: &str| {
            std::fs::read_dir(format!("{}/{dir}", env!("CARGO_MANIFEST_DIR")))
                .expect("source directory")
                .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == ext)))
                .count()
        };
        assert_eq!(IMAGES.len(), sources("asm", "S") + sources("c", "c"));
        assert!(find("pagefill").is_some());
        assert!(find("nope").is_none());
        assert!(find("").is_none());
    }
    #[test]
    fn images_match_their_documented_constants() {
        let image = |name| find(name).expect("image exists");
        let with_nul = |s: &str| [s.as_bytes(), b"\0"].concat();
        assert!(contains(image("hello").elf, &with_nul(HELLO_MESSAGE)));
        assert_eq!(HELLO_MESSAGE.len(), 24);
        assert!(contains(image("misbehave-spin").elf, &with_nul(SPIN_MESSAGE)));
        let fault = image("misbehave-triple-fault");
        assert!(contains(fault.elf, &with_nul(TRIPLE_FAULT_MESSAGE)));
        assert_eq!(&bytes_at(fault, TRIPLE_FAULT_RIP)[..2], [0x0F, 0x0B], "ud2");
        assert_ne!(parse(fault).0, TRIPLE_FAULT_RIP, "entry is not the ud2");
        let hlt = image("misbehave-hlt");
        assert_eq!(bytes_at(hlt, parse(hlt).0)[0], 0xF4, "hlt at the entry");
        let flood = image("misbehave-port-flood").elf;
        assert!(contains(flood, &u32::try_from(PORT_FLOOD_WRITES).expect("u32").to_le_bytes()));
        let pagefill = image("pagefill").elf;
        assert!(contains(pagefill, &PAGEFILL_GROUP_MUL.to_le_bytes()));
        assert!(contains(pagefill, &PAGEFILL_WORD_MUL.to_le_bytes()));
    }
    #[test]
    fn new_images_contain_their_constants() {
        let image = |name| find(name).expect("image exists").elf;
        let imm32 = |v: u64| u32::try_from(v).expect("u32").to_le_bytes();
        assert!(contains(image("cowstorm"), &PAGEFILL_GROUP_MUL.to_le_bytes()));
        assert!(contains(image("cowstorm"), &PAGEFILL_WORD_MUL.to_le_bytes()));
        assert!(contains(image("mixed"), &imm32(MIXED_SPIN)));
        assert!(contains(image("volatile"), &VOLATILE_KEY_MUL.to_le_bytes()));
        assert!(contains(image("volatile"), &imm32(VOLATILE_SWEEPS)));
    }
}

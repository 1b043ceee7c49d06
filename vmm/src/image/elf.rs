//! Checking an ELF file against ABI v1's image rules before anything is
//! loaded: a static ELF64 x86-64 executable whose PT_LOAD segments lie in
//! guest RAM at or above 1 MiB, with the entry point inside one of them.

use super::{ElfInfo, Segment};
use crate::x86::layout::GUEST_BASE;

pub(super) const EHDR_SIZE: usize = 64;
pub(super) const PHDR_SIZE: usize = 56;
pub(super) const ET_EXEC: u16 = 2;
pub(super) const EM_X86_64: u16 = 62;
pub(super) const PT_LOAD: u32 = 1;
const EV_CURRENT: u32 = 1;

/// Why an ELF file is not a usable image, in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    /// No ELF magic.
    #[error("not an ELF file (bad magic number)")]
    NotElf,
    /// Shorter than an ELF header.
    #[error("truncated ELF header ({0} bytes, need {EHDR_SIZE})")]
    ShortHeader(usize),
    /// ELFCLASS32.
    #[error("not a 64-bit ELF (ELFCLASS64 required)")]
    Not64Bit,
    /// Big-endian.
    #[error("not a little-endian ELF")]
    NotLittleEndian,
    /// EI_VERSION or e_version is not EV_CURRENT.
    #[error("ELF version {0}, not EV_CURRENT (1)")]
    Version(u32),
    /// A header field lies past the end of the file.
    #[error("truncated ELF header")]
    Truncated,
    /// Another machine.
    #[error("built for machine {0}, not x86-64 (EM_X86_64 = 62)")]
    Machine(u16),
    /// Not ET_EXEC.
    #[error("ELF type {0} is not a static executable (ET_EXEC = 2)")]
    Type(u16),
    /// e_phentsize is not the ELF64 program header's size.
    #[error("program header size {0}, expected {PHDR_SIZE}")]
    PhdrSize(u16),
    /// A program header lies outside the file.
    #[error("program header {0} lies outside the file")]
    PhdrOutside(usize),
    /// A segment's file bytes lie outside the file.
    #[error("segment {0} claims file bytes beyond the end of the file")]
    FileBytesOutside(usize),
    /// p_filesz > p_memsz.
    #[error("segment {index} has p_filesz {filesz} larger than p_memsz {memsz}")]
    FileszOverMemsz {
        /// Segment index.
        index: usize,
        /// p_filesz.
        filesz: u64,
        /// p_memsz.
        memsz: u64,
    },
    /// A segment in the VMM's low megabyte.
    #[error(
        "segment {index} at {paddr:#x} lies below 1 MiB, which belongs to the VMM (ABI v1: link at or above 0x100000)"
    )]
    BelowGuestBase {
        /// Segment index.
        index: usize,
        /// p_paddr.
        paddr: u64,
    },
    /// A segment past the end of guest RAM.
    #[error(
        "segment {index} [{paddr:#x}, +{memsz:#x}) does not fit in {ram:#x} bytes of guest RAM (give more with --mem)"
    )]
    OutsideRam {
        /// Segment index.
        index: usize,
        /// p_paddr.
        paddr: u64,
        /// p_memsz.
        memsz: u64,
        /// Guest RAM size.
        ram: u64,
    },
    /// Nothing to load.
    #[error("no PT_LOAD segment: nothing to load")]
    NoLoadSegment,
    /// e_entry is not in a loaded segment.
    #[error("entry point {0:#x} is not inside any loaded segment")]
    EntryOutside(u64),
}

fn field<const N: usize>(bytes: &[u8], offset: usize) -> Result<[u8; N], ElfError> {
    let end = offset.checked_add(N).ok_or(ElfError::Truncated)?;
    bytes.get(offset..end).and_then(|b| b.try_into().ok()).ok_or(ElfError::Truncated)
}

fn u16_at(bytes: &[u8], offset: usize) -> Result<u16, ElfError> {
    field(bytes, offset).map(u16::from_le_bytes)
}

fn u32_at(bytes: &[u8], offset: usize) -> Result<u32, ElfError> {
    field(bytes, offset).map(u32::from_le_bytes)
}

fn u64_at(bytes: &[u8], offset: usize) -> Result<u64, ElfError> {
    field(bytes, offset).map(u64::from_le_bytes)
}

/// The ELF header's fields this VMM uses.
struct Header {
    entry: u64,
    phoff: u64,
    phnum: u16,
}

/// Checks the ELF header: identity, machine, type, program header size.
fn check_header(bytes: &[u8]) -> Result<Header, ElfError> {
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    if bytes.len() < EHDR_SIZE {
        return Err(ElfError::ShortHeader(bytes.len()));
    }
    if bytes[4] != 2 {
        return Err(ElfError::Not64Bit);
    }
    if bytes[5] != 1 {
        return Err(ElfError::NotLittleEndian);
    }
    let e_version = u32_at(bytes, 20)?;
    for version in [u32::from(bytes[6]), e_version] {
        if version != EV_CURRENT {
            return Err(ElfError::Version(version));
        }
    }
    let (e_type, e_machine) = (u16_at(bytes, 16)?, u16_at(bytes, 18)?);
    if e_machine != EM_X86_64 {
        return Err(ElfError::Machine(e_machine));
    }
    if e_type != ET_EXEC {
        return Err(ElfError::Type(e_type));
    }
    let phentsize = u16_at(bytes, 54)?;
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(ElfError::PhdrSize(phentsize));
    }
    Ok(Header { entry: u64_at(bytes, 24)?, phoff: u64_at(bytes, 32)?, phnum: u16_at(bytes, 56)? })
}

/// Program header `index`: its segment if it is PT_LOAD and legal.
fn load_segment(bytes: &[u8], phoff: u64, index: usize, ram_bytes: u64) -> Result<Option<Segment>, ElfError> {
    let at = usize::try_from(phoff)
        .ok()
        .and_then(|o| o.checked_add(index * PHDR_SIZE))
        .filter(|o| o.checked_add(PHDR_SIZE).is_some_and(|end| end <= bytes.len()))
        .ok_or(ElfError::PhdrOutside(index))?;
    if u32_at(bytes, at)? != PT_LOAD {
        return Ok(None);
    }
    let p_offset = u64_at(bytes, at + 8)?;
    let paddr = u64_at(bytes, at + 24)?;
    let filesz = u64_at(bytes, at + 32)?;
    let memsz = u64_at(bytes, at + 40)?;
    if p_offset.checked_add(filesz).is_none_or(|end| end > bytes.len() as u64) {
        return Err(ElfError::FileBytesOutside(index));
    }
    if filesz > memsz {
        return Err(ElfError::FileszOverMemsz { index, filesz, memsz });
    }
    if paddr < GUEST_BASE {
        return Err(ElfError::BelowGuestBase { index, paddr });
    }
    if paddr.checked_add(memsz).is_none_or(|end| end > ram_bytes) {
        return Err(ElfError::OutsideRam { index, paddr, memsz, ram: ram_bytes });
    }
    Ok(Some(Segment { paddr, filesz, memsz }))
}

/// Checks `bytes` against ABI v1's image rules for `ram_bytes` of guest RAM.
pub fn validate_elf(bytes: &[u8], ram_bytes: u64) -> Result<ElfInfo, ElfError> {
    let header = check_header(bytes)?;
    let mut segments = Vec::new();
    for index in 0..usize::from(header.phnum) {
        segments.extend(load_segment(bytes, header.phoff, index, ram_bytes)?);
    }
    if segments.is_empty() {
        return Err(ElfError::NoLoadSegment);
    }
    if !segments.iter().any(|s| (s.paddr..s.paddr + s.memsz).contains(&header.entry)) {
        return Err(ElfError::EntryOutside(header.entry));
    }
    Ok(ElfInfo { entry: header.entry, segments })
}

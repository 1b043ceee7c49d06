//! Guest images: finding them (a path or a built-in name), checking them
//! against ABI v1, and loading their segments into guest RAM.
//!
//! The checks are done here, before anything runs, so that each broken image
//! gets a sentence that says what is wrong; the copy itself is linux-loader's.

use std::path::{Path, PathBuf};

use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryMmap};

mod elf;
#[cfg(test)]
mod fuzz;

pub use elf::{validate_elf, ElfError};

use crate::x86::layout::GUEST_BASE;

/// Errors of image resolution, validation and loading.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Neither a readable file nor a built-in image.
    #[error("no image '{0}': not a file and not a built-in image (`vmm images` lists those)")]
    NotFound(String),
    /// The file could not be read.
    #[error("cannot read image {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a regular file (a device, a FIFO, a directory...).
    #[error("image {0} is not a regular file: give an ELF file or a built-in image name")]
    NotAFile(PathBuf),
    /// Larger than the guest's RAM: it cannot be an image that fits.
    #[error(
        "image {path} is {size} bytes, more than the {ram} bytes of guest RAM it would have to fit in: it was not read"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Guest RAM.
        ram: u64,
    },
    /// The bytes are not a loadable ELF64 x86-64 executable per ABI v1.
    #[error("image {name} is not usable")]
    Invalid {
        /// The image's name or path.
        name: String,
        /// What is wrong.
        #[source]
        reason: ElfError,
    },
    /// linux-loader refused the image after validation passed.
    #[error("cannot load image {name}")]
    Load {
        /// The image's name or path.
        name: String,
        /// linux-loader's error.
        #[source]
        reason: linux_loader::loader::Error,
    },
}

/// A guest image's bytes and the name it goes by.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Built-in name, or the path as given.
    pub name: String,
    /// The ELF file.
    pub bytes: Vec<u8>,
}

/// A PT_LOAD segment of a validated image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical load address.
    pub paddr: u64,
    /// Bytes copied from the file.
    pub filesz: u64,
    /// Bytes occupied in memory (the rest is zero).
    pub memsz: u64,
}

/// What ABI v1 needs to know of a validated image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// `e_entry`.
    pub entry: u64,
    /// The PT_LOAD segments, in file order.
    pub segments: Vec<Segment>,
}

impl GuestImage {
    /// Resolves `spec` for a guest of `ram_bytes`: a built-in image name,
    /// or (when it names no built-in image or contains a `/`) a path to an
    /// ELF file. Only a regular file is read, and only if it is no larger
    /// than guest RAM (an image must fit in it): a device, a FIFO or a huge
    /// file is refused before a byte is read.
    pub fn resolve(spec: &str, ram_bytes: u64) -> Result<Self, ImageError> {
        if !spec.contains('/') {
            if let Some(image) = guest_images::find(spec) {
                return Ok(Self { name: image.name.to_string(), bytes: image.elf.to_vec() });
            }
        }
        let path = Path::new(spec);
        if std::fs::symlink_metadata(path).is_err() {
            return Err(ImageError::NotFound(spec.to_string()));
        }
        let bytes = read_bounded(path, ram_bytes)?;
        Ok(Self { name: spec.to_string(), bytes })
    }

    /// Checks the image against ABI v1 for a guest of `ram_bytes`.
    pub fn validate(&self, ram_bytes: u64) -> Result<ElfInfo, ImageError> {
        validate_elf(&self.bytes, ram_bytes).map_err(|reason| ImageError::Invalid { name: self.name.clone(), reason })
    }

    /// Validates, then copies every PT_LOAD segment to its `p_paddr` in `mem`
    /// (which must be zero-filled: bytes past `p_filesz` are not written).
    pub fn load(&self, mem: &GuestMemoryMmap, ram_bytes: u64) -> Result<ElfInfo, ImageError> {
        let info = self.validate(ram_bytes)?;
        let mut reader = std::io::Cursor::new(self.bytes.as_slice());
        Elf::load(mem, None, &mut reader, Some(GuestAddress(GUEST_BASE)))
            .map_err(|reason| ImageError::Load { name: self.name.clone(), reason })?;
        Ok(info)
    }
}

/// Reads the regular file at `path`, at most `limit` bytes. It is opened
/// non-blocking, so a FIFO is refused at once instead of waiting for a
/// writer, and its size is checked before anything is read.
fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, ImageError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let read_err = |source| ImageError::Read { path: path.to_path_buf(), source };
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(ImageError::NotAFile(path.to_path_buf()));
    }
    if meta.len() > limit {
        return Err(ImageError::TooLarge { path: path.to_path_buf(), size: meta.len(), ram: limit });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // A file that grows while it is read is still read no further than the limit.
    let read = file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(read_err)?;
    if read as u64 > limit {
        return Err(ImageError::TooLarge { path: path.to_path_buf(), size: read as u64, ram: limit });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::elf::{EHDR_SIZE, EM_X86_64, ET_EXEC, PHDR_SIZE, PT_LOAD};
    use super::*;
    use vm_memory::Bytes;

    /// A minimal ELF64 x86-64 executable with one PT_LOAD segment of `code`.
    fn elf(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
        let mut b = vec![0u8; EHDR_SIZE + PHDR_SIZE];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&paddr.to_le_bytes());
        b[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        b[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
        b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = EHDR_SIZE;
        let offset = (EHDR_SIZE + PHDR_SIZE) as u64;
        b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
        b[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        b[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        b.extend_from_slice(code);
        b
    }

    const RAM: u64 = 4 << 20;

    #[test]
    fn accepts_a_good_image_and_loads_it_at_paddr() {
        let bytes = elf(0x10_0000, &[0xf4, 0x90, 0x90], 0x2000);
        let info = validate_elf(&bytes, RAM).expect("valid");
        assert_eq!(info.entry, 0x10_0000);
        assert_eq!(info.segments, vec![Segment { paddr: 0x10_0000, filesz: 3, memsz: 0x2000 }]);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("mem");
        let image = GuestImage { name: "t".into(), bytes };
        image.load(&mem, RAM).expect("load");
        let mut code = [0u8; 4];
        mem.read_slice(&mut code, GuestAddress(0x10_0000)).expect("read");
        assert_eq!(code, [0xf4, 0x90, 0x90, 0]);
    }

    fn reason(bytes: &[u8]) -> String {
        validate_elf(bytes, RAM).expect_err("must be refused").to_string()
    }

    #[test]
    fn refuses_each_abi_violation_with_its_reason() {
        assert!(reason(b"#!/bin/sh\n").contains("not an ELF"));
        assert!(reason(b"\x7fELF").contains("truncated"));
        let good = elf(0x10_0000, &[0x90], 0x1000);
        let mut b = good.clone();
        b[4] = 1;
        assert!(reason(&b).contains("64-bit"));
        let mut b = good.clone();
        b[5] = 2;
        assert!(reason(&b).contains("little-endian"));
        let mut b = good.clone();
        b[6] = 0; // EI_VERSION: EV_NONE
        assert!(reason(&b).contains("ELF version 0"));
        let mut b = good.clone();
        b[20..24].copy_from_slice(&2u32.to_le_bytes());
        assert!(reason(&b).contains("ELF version 2"));
        let mut b = good.clone();
        b[18..20].copy_from_slice(&183u16.to_le_bytes()); // aarch64
        assert!(reason(&b).contains("not x86-64"));
        let mut b = good.clone();
        b[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
        assert!(reason(&b).contains("static executable"));
        assert!(reason(&elf(0x8_0000, &[0x90], 0x1000)).contains("below 1 MiB"));
        assert!(reason(&elf(RAM - 0x800, &[0x90], 0x1000)).contains("does not fit"));
        assert!(reason(&elf(u64::MAX - 8, &[0x90], 0x1000)).contains("does not fit"));
        let mut b = good.clone();
        b.truncate(b.len() - 1);
        assert!(reason(&b).contains("beyond the end"));
        let mut b = good.clone();
        b[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes());
        assert!(reason(&b).contains("entry point"));
        let mut b = good;
        b[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(reason(&b).contains("outside the file"));
    }

    #[test]
    fn resolve_reports_missing_images() {
        let err = GuestImage::resolve("/nonexistent/guest.elf", RAM).expect_err("missing");
        assert!(err.to_string().contains("no image"));
    }

    #[test]
    fn resolve_reads_only_regular_files_no_larger_than_guest_ram() {
        // Devices would be read without end.
        for dev in ["/dev/zero", "/dev/urandom"] {
            let err = GuestImage::resolve(dev, RAM).expect_err("a device");
            assert!(matches!(err, ImageError::NotAFile(_)), "{dev}: {err}");
        }
        let dir = std::env::temp_dir().join(format!("vmm-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        // A FIFO with no writer would block the open and the read forever.
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mkfifo reads a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let err = GuestImage::resolve(fifo.to_str().expect("utf-8"), RAM).expect_err("a FIFO");
        assert!(matches!(err, ImageError::NotAFile(_)), "{err}");
        // A sparse file with a valid header, larger than RAM: refused unread.
        let big = dir.join("big.elf");
        let mut bytes = elf(0x10_0000, &[0xf4], 0x1000);
        bytes.resize(4096, 0);
        std::fs::write(&big, &bytes).expect("write");
        std::fs::OpenOptions::new().write(true).open(&big).expect("open").set_len(1 << 30).expect("grow");
        let err = GuestImage::resolve(big.to_str().expect("utf-8"), RAM).expect_err("too large");
        assert!(matches!(err, ImageError::TooLarge { size, ram: RAM, .. } if size == 1 << 30), "{err}");
        // The same file cut to its header is read.
        std::fs::OpenOptions::new().write(true).open(&big).expect("open").set_len(4096).expect("cut");
        let image = GuestImage::resolve(big.to_str().expect("utf-8"), RAM).expect("read");
        assert_eq!(image.bytes.len(), 4096);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! Port 0x504 (tiny-guest ABI 1.1): the guest names its current phase by
//! writing the guest-physical address of a NUL-terminated, printable-ASCII
//! name of at most [`PHASE_NAME_MAX_LEN`] bytes.
//!
//! The name is read from guest memory as the guest sees it (through the
//! primary MMU, at or above 1 MiB: the low megabyte is the VMM's). A bad
//! write is refused with a note on standard error (the first
//! [`NOTED_REFUSALS`] of a run, then one line saying the rest are not
//! printed) and the run goes on.

use crate::x86::layout::GUEST_BASE;

/// The longest name, in bytes, without its NUL.
pub const PHASE_NAME_MAX_LEN: usize = 63;

/// Refusals of a run printed on standard error.
pub const NOTED_REFUSALS: u64 = 3;

/// Why a write to port 0x504 names nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhaseNameError {
    /// Not a 32-bit write.
    #[error("a {0}-bit write (the port takes 32-bit addresses)")]
    Width(usize),
    /// The address is in the VMM's low megabyte.
    #[error("address {0:#x} is in the low megabyte, which is the VMM's (put the name in the image or above 1 MiB)")]
    LowMegabyte(u64),
    /// The address is not guest RAM.
    #[error("address {0:#x} is outside guest RAM")]
    OutsideRam(u64),
    /// Guest RAM ends before the NUL.
    #[error("the name at {0:#x} runs to the end of guest RAM without a NUL")]
    PastRam(u64),
    /// No NUL within the longest name.
    #[error("the name at {0:#x} is longer than {PHASE_NAME_MAX_LEN} bytes")]
    TooLong(u64),
    /// A byte that is not printable ASCII.
    #[error("byte {at} of the name is {byte:#04x}, not printable ASCII")]
    NotPrintable {
        /// Its offset in the name.
        at: usize,
        /// The byte.
        byte: u8,
    },
    /// Nothing before the NUL.
    #[error("the name is empty")]
    Empty,
    /// The primary MMU could not read the page.
    #[error("the name at {0:#x} cannot be read")]
    Unreadable(u64),
}

/// The name a write of `data` to port 0x504 points at, in guest RAM of
/// `mem_bytes` read with `read` (false when it cannot be read).
pub fn read_phase_name(
    data: &[u8],
    mem_bytes: u64,
    read: impl Fn(u64, &mut [u8]) -> bool,
) -> Result<String, PhaseNameError> {
    let Ok(bytes) = <[u8; 4]>::try_from(data) else {
        return Err(PhaseNameError::Width(data.len() * 8));
    };
    let gpa = u64::from(u32::from_le_bytes(bytes));
    if gpa < GUEST_BASE {
        return Err(PhaseNameError::LowMegabyte(gpa));
    }
    if gpa >= mem_bytes {
        return Err(PhaseNameError::OutsideRam(gpa));
    }
    let len = (mem_bytes - gpa).min(PHASE_NAME_MAX_LEN as u64 + 1) as usize;
    let mut buf = vec![0u8; len];
    if !read(gpa, &mut buf) {
        return Err(PhaseNameError::Unreadable(gpa));
    }
    let Some(end) = buf.iter().position(|&b| b == 0) else {
        return Err(if len <= PHASE_NAME_MAX_LEN {
            PhaseNameError::PastRam(gpa)
        } else {
            PhaseNameError::TooLong(gpa)
        });
    };
    if end == 0 {
        return Err(PhaseNameError::Empty);
    }
    if let Some(at) = buf[..end].iter().position(|b| !(0x20..=0x7E).contains(b)) {
        return Err(PhaseNameError::NotPrintable { at, byte: buf[at] });
    }
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// The note for the `n`-th refusal of a run (1-based): the refusal itself
/// for the first [`NOTED_REFUSALS`], one line that says the rest are not
/// printed for the next, nothing after.
pub fn refusal_note(n: u64, data: &[u8], err: &PhaseNameError) -> Option<String> {
    match n {
        n if n <= NOTED_REFUSALS => {
            let value = data.iter().rev().fold(0u64, |v, &b| (v << 8) | u64::from(b));
            Some(format!("vmm: guest wrote {value:#x} to the phase-name port 0x504: {err}; refused"))
        }
        n if n == NOTED_REFUSALS + 1 => Some("vmm: more phase names refused; no longer printed".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: u64 = 4 << 20;

    /// Guest RAM holding `text` at `gpa`, zero elsewhere.
    fn ram_with(gpa: u64, text: &[u8]) -> impl Fn(u64, &mut [u8]) -> bool + '_ {
        move |at, buf| {
            for (i, b) in buf.iter_mut().enumerate() {
                let a = at + i as u64;
                *b = if a >= gpa && a < gpa + text.len() as u64 { text[(a - gpa) as usize] } else { 0 };
            }
            true
        }
    }

    fn name(addr: u64, text: &[u8]) -> Result<String, PhaseNameError> {
        read_phase_name(&(addr as u32).to_le_bytes(), RAM, ram_with(addr, text))
    }

    #[test]
    fn a_good_name_is_read_up_to_its_nul() {
        assert_eq!(name(0x20_0000, b"merge pass\0junk"), Ok("merge pass".to_string()));
        let longest = [b'x'; PHASE_NAME_MAX_LEN];
        assert_eq!(name(0x20_0000, &longest).map(|n| n.len()), Ok(PHASE_NAME_MAX_LEN));
    }

    #[test]
    fn bad_addresses_and_names_are_refused_with_the_reason() {
        assert_eq!(name(0, b"x"), Err(PhaseNameError::LowMegabyte(0)));
        assert_eq!(name(0x1000, b"x"), Err(PhaseNameError::LowMegabyte(0x1000)));
        assert_eq!(name(RAM, b"x"), Err(PhaseNameError::OutsideRam(RAM)));
        assert_eq!(name(0x20_0000, &[b'y'; 64]), Err(PhaseNameError::TooLong(0x20_0000)));
        assert_eq!(name(0x20_0000, b"two\nlines"), Err(PhaseNameError::NotPrintable { at: 3, byte: b'\n' }));
        assert_eq!(name(0x20_0000, b""), Err(PhaseNameError::Empty));
        assert_eq!(name(RAM - 4, b"abcd"), Err(PhaseNameError::PastRam(RAM - 4)));
        let data = 0x20_0000u32.to_le_bytes();
        assert_eq!(read_phase_name(&data[..1], RAM, ram_with(0, b"")), Err(PhaseNameError::Width(8)));
        assert_eq!(read_phase_name(&data[..2], RAM, ram_with(0, b"")), Err(PhaseNameError::Width(16)));
        assert_eq!(read_phase_name(&data, RAM, |_, _| false), Err(PhaseNameError::Unreadable(0x20_0000)));
    }

    #[test]
    fn only_the_first_refusals_are_noted() {
        let err = PhaseNameError::Empty;
        let data = 0x1234u32.to_le_bytes();
        let first = refusal_note(1, &data, &err).expect("noted");
        assert!(first.contains("0x1234") && first.contains("empty"), "{first}");
        assert!(refusal_note(NOTED_REFUSALS, &data, &err).is_some());
        assert!(refusal_note(NOTED_REFUSALS + 1, &data, &err).expect("last").contains("no longer printed"));
        assert_eq!(refusal_note(NOTED_REFUSALS + 2, &data, &err), None);
    }
}

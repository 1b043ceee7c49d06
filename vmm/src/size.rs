//! Memory sizes on the command line: bytes, or a number with a K, M or G suffix.

/// Errors of size parsing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    /// The text is not a number with an optional K/M/G suffix.
    #[error("'{0}' is not a size: give bytes or a number with a K, M or G suffix, e.g. 64M")]
    Malformed(String),
    /// The value does not fit in 64 bits.
    #[error("'{0}' is too large")]
    Overflow(String),
}

/// Parses `4096`, `64K`, `64M`, `1G` (binary units, case-insensitive, an
/// optional trailing `B` or `iB` is accepted: `64MiB`).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    const UNITS: [(&str, u32); 10] = [
        ("kib", 10),
        ("kb", 10),
        ("k", 10),
        ("mib", 20),
        ("mb", 20),
        ("m", 20),
        ("gib", 30),
        ("gb", 30),
        ("g", 30),
        ("b", 0),
    ];
    let lower = text.trim().to_ascii_lowercase();
    let (digits, shift) = UNITS
        .iter()
        .find_map(|(suffix, shift)| lower.strip_suffix(suffix).map(|d| (d, *shift)))
        .unwrap_or((lower.as_str(), 0));
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SizeError::Malformed(text.to_string()));
    }
    let value: u64 = digits.parse().map_err(|_| SizeError::Overflow(text.to_string()))?;
    value.checked_mul(1u64 << shift).ok_or_else(|| SizeError::Overflow(text.to_string()))
}

/// Formats a byte count the way it would be typed: `64M`, `1G`, `4100`.
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes % (1u64 << shift) == 0 {
            return format!("{}{}", bytes >> shift, suffix);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_suffixed_sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64MB"), Ok(64 << 20));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn rejects_junk_and_overflow() {
        for bad in ["", "M", "-1M", "1.5G", "12Q", "0x100", "64 M", "1iB"] {
            assert!(matches!(parse_size(bad), Err(SizeError::Malformed(_))), "{bad}");
        }
        assert!(matches!(parse_size("99999999999999999999"), Err(SizeError::Overflow(_))));
        assert!(matches!(parse_size("17179869184G"), Err(SizeError::Overflow(_))));
    }

    #[test]
    fn formats_round_sizes() {
        assert_eq!(format_size(64 << 20), "64M");
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(4100), "4100");
        assert_eq!(format_size(0), "0");
    }
}

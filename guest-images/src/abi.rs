//! The numbers of the tiny-guest ABI, version 1.1 (`guest-abi.md`): ports,
//! deduplication requests, the start of the guest's memory, the page size.
//!
//! They are defined once, in `src/abi/numbers.rs`, which this module and
//! build.rs both `include!`: build.rs writes every one as a `.set` line into
//! `$OUT_DIR/abi-numbers.inc`, which `asm/abi.inc` includes, so the images'
//! assembly, the VMM and any Rust guest tooling read the same numbers.
//! [`ASM_NUMBERS`] is that generated include, for a guest written outside
//! this crate.

include!("abi/numbers.rs");

/// The generated GNU as include (`$OUT_DIR/abi-numbers.inc`): one
/// `.set NAME, VALUE` line for each of [`NUMBERS`], each after its doc
/// comment. `asm/abi.inc` includes it; write it next to your own guest's
/// sources to build that guest against this crate's `abi.inc`.
pub const ASM_NUMBERS: &str = include_str!(concat!(env!("OUT_DIR"), "/abi-numbers.inc"));

/// The generated C header (`$OUT_DIR/ksmlab-abi.h`): one `#define
/// KSMLAB_NAME VALUE` for each of [`NUMBERS`], each after its doc comment.
/// The C guest kit's `ksmlab.h` and `start.S` include it; write it (and
/// [`LD_NUMBERS`]) into a directory to build a C guest against the kit
/// outside this crate's build (`KSMLAB_ABI_DIR` of `c/kit/ksmlab-cc`).
pub const C_NUMBERS: &str = include_str!(concat!(env!("OUT_DIR"), "/ksmlab-abi.h"));

/// The generated linker-script fragment (`$OUT_DIR/abi-numbers.ld`) that
/// `link.ld` and the kit's `ksmlab.ld` include: `GUEST_BASE`.
pub const LD_NUMBERS: &str = include_str!(concat!(env!("OUT_DIR"), "/abi-numbers.ld"));

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The `.set NAME, VALUE` lines of a GNU as include, by name; panics on
    /// a name set twice or a value that is not a hexadecimal or decimal
    /// number.
    fn set_lines(include: &str) -> BTreeMap<&str, u64> {
        let mut sets = BTreeMap::new();
        for line in include.lines().map(str::trim).filter(|l| l.starts_with(".set")) {
            let (name, value) = line[".set".len()..].split_once(',').expect("`.set NAME, VALUE`");
            let value = value.trim();
            let value = match value.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => value.parse(),
            }
            .unwrap_or_else(|e| panic!("{line}: {e}"));
            assert!(sets.insert(name.trim(), value).is_none(), "{line}: set twice");
        }
        sets
    }

    #[test]
    fn generated_include_holds_every_number_with_its_value() {
        let sets = set_lines(ASM_NUMBERS);
        for number in NUMBERS {
            assert_eq!(sets.get(number.name), Some(&number.value), "{}", number.name);
        }
        assert_eq!(sets.len(), NUMBERS.len(), "the include sets a name that is not an ABI number");
    }

    #[test]
    fn generated_c_header_defines_every_number_with_its_value() {
        let mut defines = BTreeMap::new();
        let defines_a_value = |l: &&str| l.starts_with("#define KSMLAB_") && l.split_whitespace().count() == 3;
        for line in C_NUMBERS.lines().filter(defines_a_value) {
            let mut words = line.split_whitespace().skip(1);
            let (name, value) = (words.next().expect("a name"), words.next().expect("a value"));
            let value = u64::from_str_radix(value.trim_start_matches("0x"), 16).expect("hexadecimal");
            assert!(defines.insert(name.trim_start_matches("KSMLAB_").to_owned(), value).is_none(), "{line}");
        }
        for number in NUMBERS {
            assert_eq!(defines.get(number.name), Some(&number.value), "{}", number.name);
        }
        assert_eq!(defines.len(), NUMBERS.len(), "the header defines a name that is not an ABI number");
        assert!(LD_NUMBERS.contains(&format!("GUEST_BASE = {GUEST_BASE:#x};")));
    }

    #[test]
    fn numbers_are_those_of_guest_abi_1_1() {
        let spec = [
            ("ABI_VERSION_MAJOR", 1),
            ("ABI_VERSION_MINOR", 1),
            ("GUEST_BASE", 1 << 20),
            ("PAGE_SIZE", 4096),
            ("MIN_STACK_BYTES", 16 << 10),
            ("WORKLOAD_REGION_START", 2 << 20),
            ("COM1_BASE", 0x3F8),
            ("COM1_PORTS", 8),
            ("PORT_EXIT", 0xF4),
            ("PORT_PHASE", 0x500),
            ("PORT_DEDUP", 0x501),
            ("PORT_REPORT", 0x502),
            ("PORT_BARRIER", 0x503),
            ("PORT_PHASE_NAME", 0x504),
            ("PHASE_NAME_MAX_LEN", 63),
            ("DEDUP_PASS", 1),
            ("DEDUP_START", 2),
            ("DEDUP_STOP", 3),
            ("DEDUP_UNMERGE", 4),
            ("DEDUP_SOFT_DIRTY", 5),
        ];
        let numbers: Vec<(&str, u64)> = NUMBERS.iter().map(|n| (n.name, n.value)).collect();
        assert_eq!(numbers, spec);
        assert!(NUMBERS.iter().all(|n| !n.doc.trim().is_empty()), "every number says what it means");
    }

    #[test]
    fn set_lines_reads_hex_and_decimal_and_refuses_garbage() {
        let sets = set_lines("# comment\n        .set A, 0x10\n.set B,7\n");
        assert_eq!(sets, BTreeMap::from([("A", 16), ("B", 7)]));
        assert!(std::panic::catch_unwind(|| set_lines(".set A, 1\n.set A, 2\n")).is_err());
        assert!(std::panic::catch_unwind(|| set_lines(".set A, ten\n")).is_err());
    }
}

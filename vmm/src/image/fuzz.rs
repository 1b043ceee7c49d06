//! Mutation tests of the image checks and the loader: every mutant of a
//! valid image is either refused with an [`ElfError`] or loads inside guest
//! RAM; none panics. A fixed budget runs in the test suite
//! (`PROPTEST_CASES` raises it for a long run).

use proptest::prelude::*;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{validate_elf, GuestImage};
use crate::x86::layout::GUEST_BASE;

/// Guest RAM of the mutants: small, so that "does not fit" is common.
const RAM: u64 = 4 << 20;

/// One change to an image's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    /// Overwrite one byte.
    Byte(usize, u8),
    /// Overwrite a little-endian field of 2, 4 or 8 bytes with an edge value.
    Field(usize, u8, u64),
    /// Cut the file.
    Truncate(usize),
    /// Append bytes.
    Extend(Vec<u8>),
}

/// Values at the edges of what the checks compare against.
fn edge_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(GUEST_BASE - 1),
        Just(GUEST_BASE),
        Just(RAM - 1),
        Just(RAM),
        Just(u64::from(u32::MAX)),
        Just(u64::MAX),
        Just(u64::MAX - 8),
        any::<u64>(),
    ]
}

/// Offsets where mutations matter most: the ELF header and the first
/// program headers, and anywhere at all.
fn offset() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..64, 64usize..64 + 3 * 56, 0usize..8192]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (offset(), any::<u8>()).prop_map(|(o, b)| Mutation::Byte(o, b)),
        (offset(), prop_oneof![Just(2u8), Just(4), Just(8)], edge_value())
            .prop_map(|(o, w, v)| Mutation::Field(o, w, v)),
        (0usize..8192).prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Byte(o, b) => {
            if let Some(x) = bytes.get_mut(*o) {
                *x = *b;
            }
        }
        Mutation::Field(o, width, v) => {
            let le = v.to_le_bytes();
            let w = usize::from(*width);
            if let Some(dst) = bytes.get_mut(*o..o.saturating_add(w)) {
                dst.copy_from_slice(&le[..w]);
            }
        }
        Mutation::Truncate(n) => bytes.truncate(*n),
        Mutation::Extend(more) => bytes.extend_from_slice(more),
    }
}

/// The built-in images small enough for [`RAM`].
fn seeds() -> Vec<&'static [u8]> {
    guest_images::IMAGES.iter().map(|i| i.elf).filter(|elf| validate_elf(elf, RAM).is_ok()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_mutant_is_refused_or_loads_inside_guest_ram(
        seed in any::<prop::sample::Index>(),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let seeds = seeds();
        prop_assume!(!seeds.is_empty());
        let mut bytes = seeds[seed.index(seeds.len())].to_vec();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let Ok(info) = validate_elf(&bytes, RAM) else { return Ok(()) };
        for s in &info.segments {
            prop_assert!(s.paddr >= GUEST_BASE && s.paddr + s.memsz <= RAM, "{s:?}");
            prop_assert!(s.filesz <= s.memsz);
        }
        prop_assert!(info.segments.iter().any(|s| (s.paddr..s.paddr + s.memsz).contains(&info.entry)));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("guest memory");
        // linux-loader may still refuse what the checks let through (it has
        // rules of its own); it must not panic or write outside RAM.
        let _ = GuestImage { name: "mutant".into(), bytes }.load(&mem, RAM);
    }
}

#[test]
fn the_seeds_are_valid_images() {
    assert!(seeds().len() >= 5, "the mutation test needs built-in images that fit {RAM} bytes");
}

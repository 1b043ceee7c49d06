// The numbers the built-in C guests (c/<name>.c) and their Rust models share,
// defined once. Two files use this one: src/lib.rs, as the private module
// `guest_numbers` (the models read them from there), and build.rs, which
// `include!`s it and writes each as `#define NAME VALUE` into
// `$OUT_DIR/guest-numbers.h` for the C guests (c/guest.h includes it). So
// this file holds items only: no `use`, no inner attribute.
//
// Unlike the ABI's numbers (src/abi/numbers.rs) these are no promise of the
// VMM: they are the workloads' own choices, here so that a model and its
// guest cannot drift apart.

/// Defines each number as a `pub const` with its doc comment, and
/// [`GUEST_NUMBERS`] listing them all, so that no number can be left out of
/// the C header.
macro_rules! guest_numbers {
    ($($(#[doc = $doc:literal])+ $name:ident: $ty:ty = $value:expr;)+) => {
        $($(#[doc = $doc])+ pub const $name: $ty = $value;)+

        /// Every number of this module with its name, in order: what
        /// build.rs writes into `$OUT_DIR/guest-numbers.h`.
        pub const GUEST_NUMBERS: &[(&str, u64)] = &[$((stringify!($name), $name as u64)),+];
    };
}

guest_numbers! {
    /// The golden-ratio increment of SplitMix64 (Steele, Lea and Flood,
    /// "Fast splittable pseudorandom number generators", OOPSLA 2014), the
    /// generator every C guest draws from.
    SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
    /// SplitMix64's first finalizer multiplier.
    SPLITMIX_MUL1: u64 = 0xBF58_476D_1CE4_E5B9;
    /// SplitMix64's second finalizer multiplier.
    SPLITMIX_MUL2: u64 = 0x94D0_49BB_1331_11EB;
    /// 64-bit FNV offset basis (YCSB's `Utils.FNV_OFFSET_BASIS_64`).
    FNV_OFFSET_BASIS_64: u64 = 0xCBF2_9CE4_8422_2325;
    /// 64-bit FNV prime (YCSB's `Utils.FNV_PRIME_64`).
    FNV_PRIME_64: u64 = 0x0000_0100_0000_01B3;

    /// kvstore: seed of guest 0's generator; guest `i` starts from
    /// `KVSTORE_SEED + i * SPLITMIX_GAMMA`.
    KVSTORE_SEED: u64 = 0x4B56_5354_4F52_4531;
    /// kvstore: one index page (256 slots of 16 bytes) per this many pages
    /// of the region, rounded up.
    KVSTORE_PAGES_PER_INDEX_PAGE: u64 = 64;
    /// kvstore: templates a value may be a copy of (the duplicate content of
    /// a cache: the same object stored under many keys).
    KVSTORE_TEMPLATES: u64 = 8;
    /// kvstore: percentage of written values that are a copy of a template;
    /// the others are unique to their key and version.
    KVSTORE_TEMPLATE_PERCENT: u64 = 50;
    /// kvstore: requests of each run phase per record loaded.
    KVSTORE_OPS_PER_RECORD: u64 = 4;
    /// kvstore: percentage of reads in YCSB's workload B (the rest updates).
    KVSTORE_READ_PERCENT_B: u64 = 95;
    /// kvstore: percentage of reads in YCSB's workload A.
    KVSTORE_READ_PERCENT_A: u64 = 50;
    /// kvstore: the item count of YCSB's `ScrambledZipfianGenerator`
    /// (`ITEM_COUNT` + 1 = 10^16 + 1, the zipfian it scrambles).
    KVSTORE_ZIPF_ITEMS: u64 = 10_000_000_000_000_001;
    /// kvstore: 2^64 / zetan, zetan = 26.46902820178302 (YCSB's `ZETAN`):
    /// a draw `u` (a 64-bit fraction) below it is item 0.
    KVSTORE_ZIPF_FIRST_Q64: u64 = 0x09AB_F34B_072D_9980;
    /// kvstore: 2^64 (1 + 0.5^theta) / zetan, theta = 0.99: a draw below it
    /// (and not below the first) is item 1.
    KVSTORE_ZIPF_SECOND_Q64: u64 = 0x0E8A_894D_D28C_AA80;
    /// kvstore: YCSB's eta = (1 - (2 / items)^(1 - theta)) / (1 - zeta(2) /
    /// zetan), as a fraction of 2^63.
    KVSTORE_ZIPF_ETA_Q63: u64 = 0x292B_0864_8C2B_0600;
    /// kvstore: YCSB's alpha = 1 / (1 - theta) = 100, the power the draw is
    /// raised to.
    KVSTORE_ZIPF_ALPHA: u64 = 100;

    /// template: seed of the image's content, the same in every guest.
    TEMPLATE_SEED: u64 = 0x5445_4D50_4C41_5445;
    /// template: guest `i` writes every page `p` of its image with
    /// `p % TEMPLATE_DIVERGE_STRIDE == i % TEMPLATE_DIVERGE_STRIDE`.
    TEMPLATE_DIVERGE_STRIDE: u64 = 8;

    /// dirtylog: seed of the content the guest fills its pages with.
    DIRTYLOG_SEED: u64 = 0x4449_5254_594C_4F47;
    /// dirtylog: rounds of its pre-copy loop; round `r` writes the first
    /// `pages >> r` pages.
    DIRTYLOG_ROUNDS: u64 = 4;

    /// gcheap: seed of the mutator's generator.
    GCHEAP_SEED: u64 = 0x4743_4845_4150_3031;
    /// gcheap: root slots (one page of them, first in the region).
    GCHEAP_ROOTS: u64 = 512;
    /// gcheap: collection cycles (allocate, collect, merge pass).
    GCHEAP_CYCLES: u64 = 4;
    /// gcheap: an object is 2 to 2 + `GCHEAP_EXTRA_WORDS` words long, its
    /// header included.
    GCHEAP_EXTRA_WORDS: u64 = 30;
    /// gcheap: one object in this many holds a reference (to the object
    /// of a random root), so that most objects die young.
    GCHEAP_REF_ONE_IN: u64 = 4;

    /// misbehave-dedup-flood and misbehave-unmerge-ksmd: groups of
    /// identical pages they fill their region with.
    MISBEHAVE_FLOOD_GROUPS: u64 = 8;
    /// misbehave-dedup-flood: ksmd start/stop pairs.
    MISBEHAVE_FLOOD_PAIRS: u64 = 2000;
    /// misbehave-dedup-flood: synchronous passes.
    MISBEHAVE_FLOOD_PASSES: u64 = 10;
    /// misbehave-dedup-flood: unmerge requests (a pass before every tenth).
    MISBEHAVE_FLOOD_UNMERGES: u64 = 100;
    /// misbehave-dedup-flood: values written to the dedup port that are no
    /// request.
    MISBEHAVE_FLOOD_JUNK: u64 = 1000;
    /// misbehave-unmerge-ksmd: rounds of start, spin, write, unmerge.
    MISBEHAVE_UNMERGE_ROUNDS: u64 = 16;
    /// misbehave-unmerge-ksmd: spin iterations while ksmd runs in a round
    /// (about 2 ms natively).
    MISBEHAVE_UNMERGE_SPIN: u64 = 2_000_000;
}

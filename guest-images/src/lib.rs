//! The built-in guest images of the VMM lab.
//!
//! Each image is a tiny static ELF64 x86-64 executable written in assembly
//! against the tiny-guest ABI, version 1 (`guest-abi.md`, summarised in this
//! crate's `README.md`). The build script assembles `asm/<name>.S` with GNU
//! `as` and links it with `ld -T link.ld` at 1 MiB; this crate embeds the
//! results, so the VMM and its tests can run a guest by name without any
//! file on disk. [`IMAGES`] lists them, [`find`] looks one up.
//!
//! The constants and model functions here document what each image does, so
//! that tests can check a run's exits and reports exactly: in particular
//! [`pagefill_expected_reports`] computes the checksums `pagefill` reports
//! for a given RAM size, and the comparison workloads `cowstorm`, `mixed`
//! and `volatile` have theirs ([`cowstorm_expected_reports`],
//! [`mixed_expected_reports`], [`volatile_expected_reports`]) and their
//! io exits per phase.

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
         16-byte SSE loads and stores, after a dedup request: 21 io exits plus the faults of zapped pages"
    ),
    image!(
        "converge",
        "fills RAM above 2 MiB with 64 groups of identical pages, one dedup pass, reports a checksum: \
         7 io exits (size it with --mem: 257M = 256 MiB of pages)"
    ),
    image!(
        "cowstorm",
        "fills RAM above 2 MiB with 8 groups of identical pages, then 4 rounds of a dedup pass and a \
         write to every page (a copy-on-write storm), reports a checksum: 17 io exits plus one write fault \
         per page and round"
    ),
    image!("hello", "prints \"Hello from a tiny guest\\n\" on COM1, exits 0: 25 io exits"),
    image!(
        "misbehave-beyond-ram",
        "reads and writes just past RAM, reads port 0x80, reports the reads, \
         exits 0: 2 mmio + 5 io exits"
    ),
    image!("misbehave-exit-code", "exits with code 3 at once: 1 io exit"),
    image!("misbehave-hlt", "executes HLT at its entry point (ends the run with code 0): no io exit"),
    image!(
        "misbehave-phase-flood",
        "starts phase after phase through port 0x500 and never stops: the VMM ends the run (guest_limit)"
    ),
    image!("misbehave-port-flood", "writes port 0x80 100,000 times, exits 0: 100,001 io exits"),
    image!("misbehave-spin", "prints \"spinning\\n\" (9 io exits), then loops forever"),
    image!("misbehave-triple-fault", "prints \"about to fault\\n\" (15 io exits), then ud2 at 0x100000: triple fault"),
    image!(
        "mixed",
        "fills RAM above 2 MiB with 8 groups, one dedup pass, then 16 paced phases that read every page \
         and write every 8th: 25 io exits plus policy-dependent read and write faults"
    ),
    image!(
        "pagefill",
        "fills RAM above 2 MiB with 16 groups of identical pages, dedups, \
         rewrites a word per page, dedups, reports 3 checksums: 15 io exits"
    ),
    image!(
        "stress",
        "fills RAM above 2 MiB, dedups, starts ksmd, writes 100,000 pseudo-random words while it \
         merges, reports a checksum: 9 io exits plus policy-dependent faults"
    ),
    image!(
        "unique",
        "fills RAM above 2 MiB with pages all different, one dedup pass (nothing merges), a checksum: \
         7 io exits and no fault"
    ),
    image!(
        "volatile",
        "starts ksmd and rewrites every page 4,097 times with unique, ever-changing content: nothing \
         merges, 8 io exits and no fault"
    ),
];

/// Looks up a built-in image by its exact name.
pub fn find(name: &str) -> Option<&'static Image> {
    IMAGES.iter().find(|image| image.name == name)
}

/// Guest-physical (= virtual) address every built-in image is linked at.
pub const IMAGE_BASE: u64 = 0x10_0000;

/// Size of a guest page in bytes.
pub const PAGE_SIZE: u64 = 4096;

/// What `hello` prints on COM1, one io exit per byte.
pub const HELLO_MESSAGE: &str = "Hello from a tiny guest\n";

/// What `misbehave-spin` prints on COM1 before it loops forever.
pub const SPIN_MESSAGE: &str = "spinning\n";

/// What `misbehave-triple-fault` prints on COM1 before it faults.
pub const TRIPLE_FAULT_MESSAGE: &str = "about to fault\n";

/// Guest RIP of the `ud2` in `misbehave-triple-fault`: the first byte of its
/// `.text`, so the triple fault the VMM reports is at this address.
pub const TRIPLE_FAULT_RIP: u64 = IMAGE_BASE;

/// Exit code `misbehave-exit-code` ends its run with.
pub const MISBEHAVE_EXIT_CODE: u32 = 3;

/// The unknown port `misbehave-port-flood` writes (and
/// `misbehave-beyond-ram` reads).
pub const UNKNOWN_PORT: u16 = 0x80;

/// How many times `misbehave-port-flood` writes [`UNKNOWN_PORT`].
pub const PORT_FLOOD_WRITES: u64 = 100_000;

/// First guest-physical address `pagefill` fills (2 MiB): its region is
/// `[PAGEFILL_START, RAM size rounded down to a page)`.
pub const PAGEFILL_START: u64 = 0x20_0000;

/// Number of groups of identical pages `pagefill` writes: page `i` of the
/// region belongs to group `i % PAGEFILL_GROUPS`.
pub const PAGEFILL_GROUPS: u64 = 16;

/// Multiplier of the group term of [`pagefill_pattern`].
pub const PAGEFILL_GROUP_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// Multiplier of the word term of [`pagefill_pattern`].
pub const PAGEFILL_WORD_MUL: u64 = 0x100_0000_01B3;

/// Number of 8-byte words in a page.
pub const PAGEFILL_WORDS_PER_PAGE: u64 = PAGE_SIZE / 8;

/// Number of phases `pagefill` marks (phases 1 to 6; phase 0 is the part of
/// the run before the first marker).
pub const PAGEFILL_PHASES: u32 = 6;

/// Io exits `pagefill` takes whatever the RAM size: 6 phase markers + 2
/// dedup requests + 6 reports + 1 exit. With dedup off these are all its
/// exits.
pub const PAGEFILL_IO_EXITS: u64 = 6 + 2 + 6 + 1;

/// Number of pages `pagefill` fills for a guest of `mem_bytes` bytes of RAM:
/// `(mem_bytes rounded down to a page - 2 MiB) / 4096`, or 0 when RAM is not
/// larger than 2 MiB.
pub fn pagefill_pages(mem_bytes: u64) -> u64 {
    (mem_bytes & !(PAGE_SIZE - 1)).saturating_sub(PAGEFILL_START) / PAGE_SIZE
}

/// The value `pagefill` writes in phase 1 to 8-byte word `word` (0..512) of
/// every page of group `group` (0..16):
/// `((group + 1) * 0x9E3779B97F4A7C15) ^ (word * 0x100000001B3)`, wrapping.
/// No such value is zero, so no filled page is a zero page.
pub fn pagefill_pattern(group: u64, word: u64) -> u64 {
    (group + 1).wrapping_mul(PAGEFILL_GROUP_MUL) ^ word.wrapping_mul(PAGEFILL_WORD_MUL)
}

/// The value `pagefill` stores in phase 4 to word 1 of every page of group
/// `group`: `pagefill_pattern(group, 1) + 1`, wrapping. Every page of a group
/// gets the same value, so the groups stay groups of identical pages.
pub fn pagefill_rewritten_word1(group: u64) -> u64 {
    pagefill_pattern(group, 1).wrapping_add(1)
}

/// The exact report list `pagefill` produces for a guest of `mem_bytes`
/// bytes of RAM (the values it writes to port 0x502, in order, each a
/// 32-bit value widened to `u64`).
///
/// Three 64-bit checksums (wrapping sums), each reported as two port writes,
/// low 32 bits first, then high 32 bits:
///
/// 1. phase 3: the sum of word 0 of every page;
/// 2. phase 6: the sum of word 1 of every page (after the phase-4 rewrite);
/// 3. phase 6: the sum of every word of every page.
///
/// Deduplication must not change these: they are the same with dedup off.
pub fn pagefill_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let pages = pagefill_pages(mem_bytes);
    let (mut word0, mut word1, mut all) = (0u64, 0u64, 0u64);
    for group in 0..PAGEFILL_GROUPS {
        let count = pages / PAGEFILL_GROUPS + u64::from(group < pages % PAGEFILL_GROUPS);
        let new_word1 = pagefill_rewritten_word1(group);
        let page_sum = (0..PAGEFILL_WORDS_PER_PAGE)
            .map(|w| if w == 1 { new_word1 } else { pagefill_pattern(group, w) })
            .fold(0u64, u64::wrapping_add);
        word0 = word0.wrapping_add(count.wrapping_mul(pagefill_pattern(group, 0)));
        word1 = word1.wrapping_add(count.wrapping_mul(new_word1));
        all = all.wrapping_add(count.wrapping_mul(page_sum));
    }
    [word0, word1, all].into_iter().flat_map(|sum| [sum & 0xFFFF_FFFF, sum >> 32]).collect()
}

/// First page `access` uses (A; B, C, D and E follow).
pub const ACCESS_START: u64 = 0x20_0000;

/// Pages `access` uses from [`ACCESS_START`]: A, B, C, D and E.
pub const ACCESS_PAGES: u64 = 5;

/// The reports of `access`: byte [A+5], word [A+0x101], dword [A+0x203],
/// the page-crossing qword [A+0xFFC] (low, high), the qword written across
/// A|B and read back (low, high), 42 from the code on page C, the 16-byte
/// SSE load [D+0x10] (four halves, low first) and the 16-byte SSE store to
/// [E+0x28] read back (four halves).
pub const ACCESS_EXPECTED_REPORTS: [u64; 16] = [
    0x05,
    0x0201,
    0x0605_0403,
    0xFFFE_FDFC,
    0x0302_0100,
    0x5566_7788,
    0x1122_3344,
    42,
    0x1312_1110,
    0x1716_1514,
    0x1B1A_1918,
    0x1F1E_1D1C,
    0x89AB_CDEF,
    0x0123_4567,
    0x7654_3210,
    0xFEDC_BA98,
];

/// Groups of identical pages `converge` fills.
pub const CONVERGE_GROUPS: u64 = 64;

/// The report list `converge` produces for `mem_bytes` of RAM: the wrapping
/// sum of word 0 of every page, low 32 bits then high.
pub fn converge_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let pages = pagefill_pages(mem_bytes);
    let sum = (0..pages).fold(0u64, |acc, i| acc.wrapping_add(pagefill_pattern(i % CONVERGE_GROUPS, 0)));
    vec![sum & 0xFFFF_FFFF, sum >> 32]
}

/// The report list `unique` produces for `mem_bytes` of RAM: the wrapping
/// sum of word 0 of every page (each page's own address), low 32 bits then high.
pub fn unique_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let pages = pagefill_pages(mem_bytes);
    let sum = (0..pages).fold(0u64, |acc, i| acc.wrapping_add(PAGEFILL_START + i * 4096));
    vec![sum & 0xFFFF_FFFF, sum >> 32]
}

/// Io exits `unique` takes under every policy.
pub const UNIQUE_IO_EXITS: u64 = 7;

/// First guest-physical address `stress` writes.
pub const STRESS_START: u64 = 0x20_0000;
/// Number of page contents `stress` starts from (page i is group i % 4).
pub const STRESS_GROUPS: u64 = 4;
/// Number of pseudo-random writes `stress` makes.
pub const STRESS_ITERATIONS: u64 = 100_000;
/// Io exits `stress` takes whatever the policy: 3 phase markers, 3 dedup
/// requests, 2 reports, 1 exit.
pub const STRESS_IO_EXITS: u64 = 9;

/// The report list `stress` produces for `mem_bytes` of RAM: the wrapping
/// sum of every word of every page after its writes, low 32 bits then high.
pub fn stress_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let pages = (mem_bytes & !(PAGE_SIZE - 1)).saturating_sub(STRESS_START) / PAGE_SIZE;
    let mut word0: Vec<u64> = (0..pages).map(|i| pagefill_pattern(i % STRESS_GROUPS, 0)).collect();
    if pages > 0 {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..STRESS_ITERATIONS {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            word0[((x >> 33) % pages) as usize] = x >> 62;
        }
    }
    let rest_of_page =
        |g: u64| (1..PAGEFILL_WORDS_PER_PAGE).map(|w| pagefill_pattern(g, w)).fold(0u64, u64::wrapping_add);
    let sum = (0..pages)
        .fold(0u64, |acc, i| acc.wrapping_add(word0[i as usize]).wrapping_add(rest_of_page(i % STRESS_GROUPS)));
    vec![sum & 0xFFFF_FFFF, sum >> 32]
}

/// Splits 64-bit checksums into the report list a guest produces for them:
/// each as two port writes, low 32 bits first, then high 32 bits.
fn split_reports(sums: &[u64]) -> Vec<u64> {
    sums.iter().flat_map(|&sum| [sum & 0xFFFF_FFFF, sum >> 32]).collect()
}

/// How many of `pages` pages (counted from 0) have index `i % period == residue`.
fn residue_count(pages: u64, period: u64, residue: u64) -> u64 {
    pages / period + u64::from(residue < pages % period)
}

/// Wrapping sum of the 512 words of a page of group `group` holding
/// `pagefill_pattern(group, w)` in every word except word `word`, which
/// holds `value`.
fn pattern_page_sum_with(group: u64, word: u64, value: u64) -> u64 {
    (0..PAGEFILL_WORDS_PER_PAGE)
        .map(|w| if w == word { value } else { pagefill_pattern(group, w) })
        .fold(0u64, u64::wrapping_add)
}

/// First guest-physical address `cowstorm` fills (2 MiB).
pub const COWSTORM_START: u64 = 0x20_0000;

/// Groups of identical pages `cowstorm` fills (page `i` is in group `i % 8`).
/// At most 256 pages per group (Linux's default `max_page_sharing`) fit one
/// KSM page: up to 10 MiB of RAM every pass makes exactly 8 KSM pages.
pub const COWSTORM_GROUPS: u64 = 8;

/// Rounds of `cowstorm`: each a synchronous pass, then a write to every page.
pub const COWSTORM_ROUNDS: u64 = 4;

/// The last phase `cowstorm` marks (the checksum phase): phase 1 fills,
/// round `r` is phases `2r` (pass) and `2r + 1` (storm), then the checksum.
pub const COWSTORM_PHASES: u32 = 2 * COWSTORM_ROUNDS as u32 + 2;

/// Io exits `cowstorm` takes in each phase, phases 0 to [`COWSTORM_PHASES`]
/// (a phase marker counts in the phase it ends): the first marker; fill;
/// then per round a pass (dedup request + marker) and a storm (marker);
/// the checksum phase (2 reports + exit).
pub const COWSTORM_PHASE_IO: [u64; COWSTORM_PHASES as usize + 1] = [1, 1, 2, 1, 2, 1, 2, 1, 2, 1, 3];

/// Io exits `cowstorm` takes whatever the RAM size and policy: 10 phase
/// markers + 4 dedup requests + 2 reports + 1 exit.
pub const COWSTORM_IO_EXITS: u64 = 10 + 4 + 2 + 1;

/// Number of pages `cowstorm` fills and writes (its region is pagefill's).
/// With deduplication on, each storm phase takes one copy-on-write fault
/// (`ept_write`) per page: this many.
pub fn cowstorm_pages(mem_bytes: u64) -> u64 {
    pagefill_pages(mem_bytes)
}

/// Whether phase `phase` of `cowstorm` is a storm phase (a write to every
/// page that the pass just before merged): phases 3, 5, 7 and 9.
pub fn cowstorm_is_storm_phase(phase: u32) -> bool {
    (3..COWSTORM_PHASES).contains(&phase) && phase % 2 == 1
}

/// Whether phase `phase` of `cowstorm` is a synchronous pass: 2, 4, 6, 8.
pub fn cowstorm_is_pass_phase(phase: u32) -> bool {
    (2..COWSTORM_PHASES).contains(&phase) && phase % 2 == 0
}

/// The value the storm of round `round` (1 to 4) stores into word 1 of
/// every page of group `group`: `pagefill_pattern(group, 1) + round`,
/// wrapping.
pub fn cowstorm_word1(group: u64, round: u64) -> u64 {
    pagefill_pattern(group, 1).wrapping_add(round)
}

/// The exact report list `cowstorm` produces for `mem_bytes` of RAM: the
/// wrapping sum of every word of every page after the last storm (word 1
/// of group `g` holds [`cowstorm_word1`]`(g, 4)`), low 32 bits then high.
/// Deduplication must not change it.
pub fn cowstorm_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let pages = cowstorm_pages(mem_bytes);
    let sum = (0..COWSTORM_GROUPS).fold(0u64, |acc, g| {
        let page = pattern_page_sum_with(g, 1, cowstorm_word1(g, COWSTORM_ROUNDS));
        acc.wrapping_add(residue_count(pages, COWSTORM_GROUPS, g).wrapping_mul(page))
    });
    split_reports(&[sum])
}

/// First guest-physical address `mixed` fills (2 MiB).
pub const MIXED_START: u64 = 0x20_0000;

/// Groups of identical pages `mixed` fills (page `i` is in group `i % 8`).
pub const MIXED_GROUPS: u64 = 8;

/// `mixed` writes every `MIXED_STRIDE`-th page per phase: in its read/write
/// phase `j` (0-based), the pages `i` with `i % 8 == j % 8`.
pub const MIXED_STRIDE: u64 = 8;

/// Read/write phases of `mixed` (guest phases 3 to 18).
pub const MIXED_RW_PHASES: u32 = 16;

/// The guest phase number of `mixed`'s first read/write phase (`j = 0`).
pub const MIXED_FIRST_RW_PHASE: u32 = 3;

/// The last phase `mixed` marks (reports and exit): 19.
pub const MIXED_PHASES: u32 = MIXED_FIRST_RW_PHASE + MIXED_RW_PHASES;

/// Iterations of the spin loop that ends every read/write phase of `mixed`
/// (2^28: about 64 ms at the 4 G iterations per second of the development
/// machines), so that the run lasts long enough to switch ksmd from outside.
pub const MIXED_SPIN: u64 = 1 << 28;

/// Io exits `mixed` takes in each phase, phases 0 to [`MIXED_PHASES`]: a
/// marker each, plus the dedup request in phase 2 and 4 reports + exit in
/// phase 19.
pub const MIXED_PHASE_IO: [u64; MIXED_PHASES as usize + 1] =
    [1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 5];

/// Io exits `mixed` takes whatever the RAM size and policy: 19 phase
/// markers + 1 dedup request + 4 reports + 1 exit.
pub const MIXED_IO_EXITS: u64 = 19 + 1 + 4 + 1;

/// Number of pages `mixed` fills (its region is pagefill's).
pub fn mixed_pages(mem_bytes: u64) -> u64 {
    pagefill_pages(mem_bytes)
}

/// Number of pages `mixed` writes in guest phase `phase` (0 outside the
/// read/write phases 3 to 18): every 8th page, `i % 8 == (phase - 3) % 8`.
/// In phases 3 to 10 each is a write to a merged page (a copy-on-write
/// fault with deduplication on); from phase 11 on, to a private one.
pub fn mixed_pages_written(mem_bytes: u64, phase: u32) -> u64 {
    if !(MIXED_FIRST_RW_PHASE..MIXED_PHASES).contains(&phase) {
        return 0;
    }
    let class = u64::from(phase - MIXED_FIRST_RW_PHASE) % MIXED_STRIDE;
    residue_count(mixed_pages(mem_bytes), MIXED_STRIDE, class)
}

/// The exact report list `mixed` produces for `mem_bytes` of RAM: the
/// wrapping sum of every word-0 load of the 16 read/write phases (each
/// before that phase's store), then the wrapping sum of every word of every
/// page at the end; each low 32 bits then high. Page `i`'s word 0 starts
/// at `pagefill_pattern(i % 8, 0)` and grows by one at every store.
pub fn mixed_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let pages = mixed_pages(mem_bytes);
    let period = MIXED_GROUPS.max(MIXED_STRIDE); // both powers of two
    let (mut reads, mut all) = (0u64, 0u64);
    for class in 0..period {
        let count = residue_count(pages, period, class);
        let group = class % MIXED_GROUPS;
        let mut word0 = pagefill_pattern(group, 0);
        for j in 0..u64::from(MIXED_RW_PHASES) {
            reads = reads.wrapping_add(count.wrapping_mul(word0));
            if class % MIXED_STRIDE == j % MIXED_STRIDE {
                word0 = word0.wrapping_add(1);
            }
        }
        all = all.wrapping_add(count.wrapping_mul(pattern_page_sum_with(group, 0, word0)));
    }
    split_reports(&[reads, all])
}

/// First guest-physical address `volatile` writes (2 MiB).
pub const VOLATILE_START: u64 = 0x20_0000;

/// Sweeps of `volatile` while ksmd runs (sweeps 1 to 4096; sweep 0, before
/// ksmd starts, comes on top).
pub const VOLATILE_SWEEPS: u64 = 4096;

/// Multiplier of [`volatile_key`].
pub const VOLATILE_KEY_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// The last phase `volatile` marks (reports and exit).
pub const VOLATILE_PHASES: u32 = 3;

/// Io exits `volatile` takes in each phase, phases 0 to 3: the first marker;
/// sweep 0, dedup 2 and the marker; the sweeps, dedup 3 and the marker; 2
/// reports + exit.
pub const VOLATILE_PHASE_IO: [u64; VOLATILE_PHASES as usize + 1] = [1, 2, 2, 3];

/// Io exits `volatile` takes whatever the RAM size, policy, view and ksmd's
/// timing: 3 phase markers + 2 dedup requests + 2 reports + 1 exit. These
/// are all its exits.
pub const VOLATILE_IO_EXITS: u64 = 3 + 2 + 2 + 1;

/// Number of pages `volatile` rewrites (its region is pagefill's).
pub fn volatile_pages(mem_bytes: u64) -> u64 {
    pagefill_pages(mem_bytes)
}

/// The key of sweep `sweep`: `(sweep + 1) * 0x9E3779B97F4A7C15`, wrapping.
/// Sweep `s` stores `address ^ volatile_key(s)` into words 1 to 511 of
/// every page (word 0 holds the page's own address).
pub fn volatile_key(sweep: u64) -> u64 {
    (sweep + 1).wrapping_mul(VOLATILE_KEY_MUL)
}

/// Wrapping sum of `x ^ key` over every multiple `x` of `step` (a power of
/// two) in `[start, end)` (both multiples of `step`), in O(64): bit by bit,
/// counting the `x` that have the bit set.
fn xor_sum_of_multiples(start: u64, end: u64, step: u64, key: u64) -> u64 {
    let shift = step.trailing_zeros();
    let (t0, t1) = (start >> shift, end >> shift);
    let count = t1 - t0;
    // Numbers t in [0, n) whose bit c is set.
    let ones_below = |n: u64, c: u32| {
        let period = 1u128 << (c + 1);
        let half = 1u128 << c;
        let n = u128::from(n);
        (n / period * half + (n % period).saturating_sub(half)) as u64
    };
    (0..64u32).fold(0u64, |acc, bit| {
        let set = if bit < shift { 0 } else { ones_below(t1, bit - shift) - ones_below(t0, bit - shift) };
        let differ = if key >> bit & 1 == 1 { count - set } else { set };
        acc.wrapping_add(differ.wrapping_mul(1u64.wrapping_shl(bit)))
    })
}

/// The exact report list `volatile` produces for `mem_bytes` of RAM: the
/// wrapping sum of every word of every page after the last sweep, low 32
/// bits then high. Page at address `A` holds `A` in word 0 and
/// `(A + 8w) ^ volatile_key(4096)` in word `w` (1 to 511). Computed in
/// closed form, so any RAM size is modelled at once.
pub fn volatile_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let end = VOLATILE_START + volatile_pages(mem_bytes) * PAGE_SIZE;
    let key = volatile_key(VOLATILE_SWEEPS);
    // Every word but word 0: the 8-byte words of the region minus the page starts.
    let words = xor_sum_of_multiples(VOLATILE_START, end, 8, key);
    let page_starts_xored = xor_sum_of_multiples(VOLATILE_START, end, PAGE_SIZE, key);
    let page_starts = xor_sum_of_multiples(VOLATILE_START, end, PAGE_SIZE, 0);
    split_reports(&[words.wrapping_sub(page_starts_xored).wrapping_add(page_starts)])
}

#[cfg(test)]
mod tests {
    use super::*;

    const PT_LOAD: u32 = 1;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
    }

    fn to_usize(v: u64) -> usize {
        usize::try_from(v).expect("fits in usize")
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
            .filter(|&ph| u32_at(b, ph) == PT_LOAD)
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
        // Every source in asm/ is a built-in image.
        let sources = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/asm"))
            .expect("asm/")
            .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "S")))
            .count();
        assert_eq!(IMAGES.len(), sources);
        assert!(find("pagefill").is_some());
        assert!(find("nope").is_none());
        assert!(find("").is_none());
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
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
    fn pagefill_pages_rounds_down_and_starts_at_2mib() {
        assert_eq!(pagefill_pages(0), 0);
        assert_eq!(pagefill_pages(1 << 20), 0);
        assert_eq!(pagefill_pages(PAGEFILL_START), 0);
        assert_eq!(pagefill_pages(PAGEFILL_START + 4095), 0);
        assert_eq!(pagefill_pages(PAGEFILL_START + 4096), 1);
        assert_eq!(pagefill_pages(64 << 20), (62 << 20) / 4096);
        assert_eq!(pagefill_pages(u64::MAX), (u64::MAX - 4095 - PAGEFILL_START) / 4096);
    }

    #[test]
    fn pagefill_pattern_is_never_zero_and_groups_differ() {
        for g in 0..PAGEFILL_GROUPS {
            assert_ne!(pagefill_rewritten_word1(g), 0);
            assert_ne!(pagefill_rewritten_word1(g), pagefill_pattern(g, 1));
            for w in 0..PAGEFILL_WORDS_PER_PAGE {
                assert_ne!(pagefill_pattern(g, w), 0, "group {g} word {w}");
            }
            for h in 0..g {
                assert_ne!(pagefill_pattern(g, 0), pagefill_pattern(h, 0));
            }
        }
    }

    /// Runs pagefill's algorithm on a simulated RAM, word by word.
    fn simulate(mem_bytes: u64) -> Vec<u64> {
        let words = to_usize(PAGEFILL_WORDS_PER_PAGE);
        let pages = to_usize(pagefill_pages(mem_bytes));
        let group = |i: usize| i as u64 % PAGEFILL_GROUPS;
        let mut ram = vec![0u64; pages * words];
        for (i, page) in ram.chunks_mut(words).enumerate() {
            for (w, word) in page.iter_mut().enumerate() {
                *word = pagefill_pattern(group(i), w as u64);
            }
        }
        let sum0 = ram.chunks(words).fold(0u64, |s, p| s.wrapping_add(p[0]));
        for (i, page) in ram.chunks_mut(words).enumerate() {
            page[1] = pagefill_pattern(group(i), 1).wrapping_add(1);
        }
        let sum1 = ram.chunks(words).fold(0u64, |s, p| s.wrapping_add(p[1]));
        let all = ram.iter().fold(0u64, |s, &w| s.wrapping_add(w));
        [sum0, sum1, all].iter().flat_map(|&s| [s as u32 as u64, s >> 32]).collect()
    }

    #[test]
    fn pagefill_model_matches_a_simulation() {
        for mem in [
            0,
            1 << 20,
            PAGEFILL_START,
            PAGEFILL_START + 4095,
            PAGEFILL_START + 4096,
            PAGEFILL_START + 15 * 4096,
            PAGEFILL_START + 16 * 4096 + 100,
            PAGEFILL_START + 37 * 4096,
            4 << 20,
            16 << 20,
        ] {
            assert_eq!(pagefill_expected_reports(mem), simulate(mem), "mem {mem:#x}");
        }
    }

    #[test]
    fn pagefill_model_gives_sane_values() {
        assert_eq!(pagefill_expected_reports(PAGEFILL_START), vec![0; 6]);
        for mem in [PAGEFILL_START + 4096, 64 << 20, 1 << 30, 16 << 30] {
            let reports = pagefill_expected_reports(mem);
            assert_eq!(reports.len(), 6);
            assert!(reports.iter().all(|&r| r <= u64::from(u32::MAX)));
            assert!(reports.iter().any(|&r| r != 0));
        }
        // One page of group 0: the checksums are that page's words.
        let one = pagefill_expected_reports(PAGEFILL_START + 4096);
        let join = |i: usize| one[i] | one[i + 1] << 32;
        assert_eq!(join(0), PAGEFILL_GROUP_MUL);
        assert_eq!(join(2), pagefill_rewritten_word1(0));
        // 16 GiB is modelled without walking 4 million pages.
        assert_ne!(pagefill_expected_reports(16 << 30), pagefill_expected_reports(8 << 30));
    }

    /// Simulated guest RAM: `pages` pages of 512 words, filled with
    /// pagefill's pattern in `groups` groups (the `fill_groups` macro).
    fn filled(pages: usize, groups: u64) -> Vec<u64> {
        let words = to_usize(PAGEFILL_WORDS_PER_PAGE);
        let mut ram = vec![0u64; pages * words];
        for (i, page) in ram.chunks_mut(words).enumerate() {
            for (w, word) in page.iter_mut().enumerate() {
                *word = pagefill_pattern(i as u64 % groups, w as u64);
            }
        }
        ram
    }

    fn reports_of(sums: &[u64]) -> Vec<u64> {
        sums.iter().flat_map(|&s| [s as u32 as u64, s >> 32]).collect()
    }

    /// RAM sizes for the simulations: empty, partial pages, a few pages,
    /// group counts that do not divide N, and a few MiB.
    const SIM_SIZES: [u64; 10] = [
        0,
        1 << 20,
        PAGEFILL_START,
        PAGEFILL_START + 4095,
        PAGEFILL_START + 4096,
        PAGEFILL_START + 7 * 4096,
        PAGEFILL_START + 9 * 4096 + 100,
        PAGEFILL_START + 37 * 4096,
        4 << 20,
        8 << 20,
    ];

    /// Runs cowstorm's algorithm on a simulated RAM, word by word.
    fn simulate_cowstorm(mem_bytes: u64) -> Vec<u64> {
        let words = to_usize(PAGEFILL_WORDS_PER_PAGE);
        let mut ram = filled(to_usize(cowstorm_pages(mem_bytes)), COWSTORM_GROUPS);
        for round in 1..=COWSTORM_ROUNDS {
            for (i, page) in ram.chunks_mut(words).enumerate() {
                page[1] = pagefill_pattern(i as u64 % COWSTORM_GROUPS, 1).wrapping_add(round);
            }
        }
        reports_of(&[ram.iter().fold(0u64, |s, &w| s.wrapping_add(w))])
    }

    #[test]
    fn cowstorm_model_matches_a_simulation() {
        for mem in SIM_SIZES {
            assert_eq!(cowstorm_expected_reports(mem), simulate_cowstorm(mem), "mem {mem:#x}");
        }
        assert_eq!(cowstorm_expected_reports(PAGEFILL_START), vec![0, 0]);
        assert_ne!(cowstorm_expected_reports(16 << 30), cowstorm_expected_reports(8 << 30));
    }

    #[test]
    fn cowstorm_phases_and_io_add_up() {
        assert_eq!(COWSTORM_PHASE_IO.iter().sum::<u64>(), COWSTORM_IO_EXITS);
        let storms: Vec<u32> = (0..=COWSTORM_PHASES).filter(|&p| cowstorm_is_storm_phase(p)).collect();
        let passes: Vec<u32> = (0..=COWSTORM_PHASES).filter(|&p| cowstorm_is_pass_phase(p)).collect();
        assert_eq!(storms, [3, 5, 7, 9]);
        assert_eq!(passes, [2, 4, 6, 8]);
        for p in 0..=COWSTORM_PHASES {
            // A pass phase has the dedup request on top of its marker.
            assert_eq!(COWSTORM_PHASE_IO[p as usize] == 2, cowstorm_is_pass_phase(p), "phase {p}");
        }
        // Every storm changes every group (so the next pass sees new content)
        // and keeps the groups apart.
        for g in 0..COWSTORM_GROUPS {
            for r in 1..=COWSTORM_ROUNDS {
                assert_ne!(cowstorm_word1(g, r), cowstorm_word1(g, r - 1));
                for h in 0..g {
                    assert_ne!(cowstorm_word1(g, r), cowstorm_word1(h, r));
                }
            }
        }
        // Up to 10 MiB every group fits one KSM page (max_page_sharing 256).
        assert!(cowstorm_pages(10 << 20).div_ceil(COWSTORM_GROUPS) <= 256);
    }

    /// Runs mixed's algorithm on a simulated RAM, word by word.
    fn simulate_mixed(mem_bytes: u64) -> Vec<u64> {
        let words = to_usize(PAGEFILL_WORDS_PER_PAGE);
        let mut ram = filled(to_usize(mixed_pages(mem_bytes)), MIXED_GROUPS);
        let mut reads = 0u64;
        for j in 0..u64::from(MIXED_RW_PHASES) {
            for (i, page) in ram.chunks_mut(words).enumerate() {
                let word0 = page[0];
                reads = reads.wrapping_add(word0);
                if i as u64 % MIXED_STRIDE == j % MIXED_STRIDE {
                    page[0] = word0.wrapping_add(1);
                }
            }
        }
        reports_of(&[reads, ram.iter().fold(0u64, |s, &w| s.wrapping_add(w))])
    }

    #[test]
    fn mixed_model_matches_a_simulation() {
        for mem in SIM_SIZES {
            assert_eq!(mixed_expected_reports(mem), simulate_mixed(mem), "mem {mem:#x}");
        }
        assert_eq!(mixed_expected_reports(PAGEFILL_START), vec![0; 4]);
        assert_ne!(mixed_expected_reports(16 << 30), mixed_expected_reports(8 << 30));
    }

    #[test]
    fn mixed_phases_and_io_add_up() {
        assert_eq!(MIXED_PHASE_IO.iter().sum::<u64>(), MIXED_IO_EXITS);
        assert_eq!(MIXED_PHASES, 19);
        for mem in SIM_SIZES {
            let n = mixed_pages(mem);
            // The phases 3 to 10 write each page once, so do 11 to 18; no
            // other phase writes.
            let first: u64 = (3..11).map(|p| mixed_pages_written(mem, p)).sum();
            let second: u64 = (11..19).map(|p| mixed_pages_written(mem, p)).sum();
            assert_eq!((first, second), (n, n), "mem {mem:#x}");
            for p in [0, 1, 2, 19, 20] {
                assert_eq!(mixed_pages_written(mem, p), 0);
            }
        }
        // 8 MiB: 1,536 pages, 192 written per phase.
        assert_eq!(mixed_pages_written(8 << 20, 3), 192);
        // Groups and classes coincide, so a phase writes whole groups.
        assert_eq!(MIXED_GROUPS, MIXED_STRIDE);
    }

    /// Runs volatile's algorithm on a simulated RAM; with `every_sweep`,
    /// sweep by sweep (slow), else only sweep 0 and the last one (every
    /// sweep rewrites the same words). Also checks, after every simulated
    /// sweep, that no two pages are identical.
    fn simulate_volatile(mem_bytes: u64, every_sweep: bool) -> Vec<u64> {
        let words = to_usize(PAGEFILL_WORDS_PER_PAGE);
        let pages = to_usize(volatile_pages(mem_bytes));
        let mut ram = vec![0u64; pages * words];
        for (i, page) in ram.chunks_mut(words).enumerate() {
            page[0] = VOLATILE_START + i as u64 * PAGE_SIZE;
        }
        let sweeps: Vec<u64> = if every_sweep { (0..=VOLATILE_SWEEPS).collect() } else { vec![0, VOLATILE_SWEEPS] };
        for s in sweeps {
            for (i, page) in ram.chunks_mut(words).enumerate() {
                let base = VOLATILE_START + i as u64 * PAGE_SIZE;
                for (w, word) in page.iter_mut().enumerate().skip(1) {
                    *word = (base + 8 * w as u64) ^ volatile_key(s);
                }
            }
            let distinct: std::collections::HashSet<&[u64]> = ram.chunks(words).collect();
            assert_eq!(distinct.len(), pages, "sweep {s}: two pages are identical");
        }
        reports_of(&[ram.iter().fold(0u64, |s, &w| s.wrapping_add(w))])
    }

    #[test]
    fn volatile_model_matches_a_simulation() {
        for mem in SIM_SIZES {
            assert_eq!(volatile_expected_reports(mem), simulate_volatile(mem, false), "mem {mem:#x}");
        }
        for mem in [PAGEFILL_START + 4096, PAGEFILL_START + 3 * 4096] {
            assert_eq!(volatile_expected_reports(mem), simulate_volatile(mem, true), "mem {mem:#x}");
        }
        assert_eq!(volatile_expected_reports(PAGEFILL_START), vec![0, 0]);
        assert_ne!(volatile_expected_reports(16 << 30), volatile_expected_reports(8 << 30));
    }

    #[test]
    fn volatile_xor_sums_match_brute_force() {
        let keys = [0, 1, 0xFFF8, volatile_key(0), volatile_key(VOLATILE_SWEEPS), u64::MAX];
        let ranges = [(0, 0), (0, 4096), (8, 4096), (0x20_0000, 0x20_0000 + 37 * 4096), (0x1F_F000, 0x40_1000)];
        for key in keys {
            for (start, end) in ranges {
                for step in [8, PAGE_SIZE] {
                    let (start, end) = (start / step * step, end / step * step);
                    let brute = (start..end).step_by(step as usize).fold(0u64, |a, x| a.wrapping_add(x ^ key));
                    assert_eq!(xor_sum_of_multiples(start, end, step, key), brute, "{start:#x}..{end:#x} /{step}");
                }
            }
        }
    }

    #[test]
    fn volatile_sweeps_change_every_word_and_io_adds_up() {
        assert_eq!(VOLATILE_PHASE_IO.iter().sum::<u64>(), VOLATILE_IO_EXITS);
        // Consecutive keys differ, so every sweep changes every rewritten word
        // (and the page's checksum): no page holds still while ksmd runs.
        for s in 1..=VOLATILE_SWEEPS {
            assert_ne!(volatile_key(s), volatile_key(s - 1));
        }
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

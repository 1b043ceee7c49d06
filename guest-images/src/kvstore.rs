//! `kvstore` (c/kvstore.c): an in-memory key-value store under YCSB's
//! workloads B and A; its layout, phases, io exits, and a simulation of the
//! store that gives its exact reports and, for a single guest, the merges
//! and faults of its dedup pass.

use crate::abi::{PAGE_SIZE, WORKLOAD_REGION_START};
use crate::guest_numbers::*;
use crate::model::{mix64, split_reports, splitmix64, ycsb_hash};
use crate::pagefill::PAGEFILL_WORDS_PER_PAGE;

/// First guest-physical address of `kvstore`'s region (its index, then its
/// values): 2 MiB.
pub const KVSTORE_START: u64 = WORKLOAD_REGION_START;

/// The last phase `kvstore` marks.
pub const KVSTORE_PHASES: u32 = 5;

/// The names of `kvstore`'s phases 1 to 5.
pub const KVSTORE_PHASE_NAMES: [&str; KVSTORE_PHASES as usize] =
    ["load", "run B: 95% reads, 5% updates", "merge pass", "run A: 50% reads, 50% updates", "checksum"];

/// Io exits of each phase, 0 to 5 (a marker counts in the phase it ends,
/// a name in the phase it names): the first marker; name + marker; name +
/// 2 reports + marker; name + dedup + marker; name + 2 reports + marker;
/// name + 2 reports + exit.
pub const KVSTORE_PHASE_IO: [u64; KVSTORE_PHASES as usize + 1] = [1, 2, 4, 3, 4, 4];

/// Io exits of each phase of guest `guest_index` of a fleet of `guests`
/// (ABI 1.1): in a fleet the pass is the fleet's, between two barriers, and
/// only guest 0 asks for it; a guest alone takes [`KVSTORE_PHASE_IO`].
pub fn kvstore_phase_io(guest_index: u64, guests: u64) -> [u64; KVSTORE_PHASES as usize + 1] {
    let mut io = KVSTORE_PHASE_IO;
    if guests > 1 {
        io[3] += if guest_index == 0 { 2 } else { 1 };
    }
    io
}

/// Io exits of a single `kvstore` guest, whatever the RAM, policy and view.
pub const KVSTORE_IO_EXITS: u64 = 5 + 5 + 1 + 6 + 1;

/// Bytes of an index slot: the key (top bit set when occupied), the record
/// number and the version, 32 bits each.
const SLOT_BYTES: u64 = 16;

/// The top bit of an occupied slot's key.
const OCCUPIED: u64 = 1 << 63;

/// The shape of `kvstore`'s store for a RAM size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvstoreLayout {
    /// Pages of the index (256 slots each), from [`KVSTORE_START`].
    pub index_pages: u64,
    /// Records loaded: one value page each, right after the index.
    pub records: u64,
}

/// The store's shape for `mem_bytes` of RAM: one index page per
/// `KVSTORE_PAGES_PER_INDEX_PAGE` pages of the region (rounded up), and as
/// many records as fit while the index is at most half full.
pub fn kvstore_layout(mem_bytes: u64) -> KvstoreLayout {
    let region = (mem_bytes & !(PAGE_SIZE - 1)).saturating_sub(KVSTORE_START) / PAGE_SIZE;
    let index_pages = region.div_ceil(KVSTORE_PAGES_PER_INDEX_PAGE);
    let slots = index_pages * (PAGE_SIZE / SLOT_BYTES);
    KvstoreLayout { index_pages, records: (region - index_pages).min(slots / 2) }
}

/// What a value page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    /// A copy of template `t`.
    Template(u64),
    /// The value unique to a key and version.
    Unique { key: u64, version: u64 },
}

impl Value {
    fn word(self, w: u64) -> u64 {
        match self {
            Value::Template(t) => mix64(KVSTORE_SEED ^ (t << 32) ^ w),
            Value::Unique { key, version } => {
                mix64(key.wrapping_add(version.wrapping_mul(SPLITMIX_GAMMA)).wrapping_add(w))
            }
        }
    }

    fn sum(self) -> u64 {
        (0..PAGEFILL_WORDS_PER_PAGE).fold(0u64, |s, w| s.wrapping_add(self.word(w)))
    }
}

/// An index slot: (key with [`OCCUPIED`], record, version); all 0 when empty.
type Slot = (u64, u32, u32);

/// How run A used a record's value page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Usage {
    /// The first request for it was a read.
    read_first: bool,
    /// Some request wrote it.
    written: bool,
    /// Some request used it.
    touched: bool,
}

/// The store, request by request, as c/kvstore.c runs it.
struct Store {
    slots: Vec<Slot>,
    values: Vec<Value>,
    rng: u64,
    template_sums: Vec<u64>,
}

impl Store {
    fn new(mem_bytes: u64, guest_index: u64) -> Self {
        let layout = kvstore_layout(mem_bytes);
        let nslots = layout.index_pages * (PAGE_SIZE / SLOT_BYTES);
        Store {
            slots: vec![(0, 0, 0); nslots as usize],
            values: Vec::with_capacity(layout.records as usize),
            rng: KVSTORE_SEED.wrapping_add(guest_index.wrapping_mul(SPLITMIX_GAMMA)),
            template_sums: (0..KVSTORE_TEMPLATES).map(|t| Value::Template(t).sum()).collect(),
        }
    }

    fn records(&self) -> u64 {
        self.values.len() as u64
    }

    /// A new value for `key` at `version`, as the generator decides.
    fn new_value(&mut self, key: u64, version: u64) -> Value {
        let pick = splitmix64(&mut self.rng);
        if pick % 100 < KVSTORE_TEMPLATE_PERCENT {
            Value::Template((pick >> 32) % KVSTORE_TEMPLATES)
        } else {
            Value::Unique { key, version }
        }
    }

    fn sum(&self, value: Value) -> u64 {
        match value {
            Value::Template(t) => self.template_sums[t as usize],
            unique => unique.sum(),
        }
    }

    /// The slot of `key`, or the empty one where it would go.
    fn lookup(&self, key: u64) -> usize {
        let n = self.slots.len();
        let mut i = (key % n as u64) as usize;
        while self.slots[i].0 & OCCUPIED != 0 && self.slots[i].0 != key | OCCUPIED {
            i = (i + 1) % n;
        }
        i
    }

    fn load(&mut self, records: u64) {
        for k in 0..records {
            let key = ycsb_hash(k);
            let slot = self.lookup(key);
            self.slots[slot] = (key | OCCUPIED, k as u32, 0);
            let value = self.new_value(key, 0);
            self.values.push(value);
        }
    }

    /// YCSB's scrambled zipfian: a record number (see c/kvstore.c).
    fn scrambled_zipfian(&mut self) -> u64 {
        ycsb_hash(zipfian(splitmix64(&mut self.rng))) % self.records()
    }

    /// `ops` requests, `read_percent` of them reads; the sum of every word
    /// read. `usage` records how each record was used.
    fn run(&mut self, ops: u64, read_percent: u64, usage: &mut [Usage]) -> u64 {
        let mut read_sum = 0u64;
        for _ in 0..ops {
            let is_read = splitmix64(&mut self.rng) % 100 < read_percent;
            let key = ycsb_hash(self.scrambled_zipfian());
            let slot = self.lookup(key);
            let record = self.slots[slot].1 as usize;
            let used = &mut usage[record];
            used.read_first |= !used.touched && is_read;
            used.written |= !is_read;
            used.touched = true;
            if is_read {
                read_sum = read_sum.wrapping_add(self.sum(self.values[record]));
            } else {
                self.slots[slot].2 += 1;
                self.values[record] = self.new_value(key, u64::from(self.slots[slot].2));
            }
        }
        read_sum
    }

    /// The sum of every index word and every value word.
    fn checksum(&self) -> u64 {
        let index = self.slots.iter().fold(0u64, |s, &(key, record, version)| {
            s.wrapping_add(key).wrapping_add(u64::from(record) | u64::from(version) << 32)
        });
        self.values.iter().fold(index, |s, &v| s.wrapping_add(self.sum(v)))
    }
}

/// YCSB's `ZipfianGenerator.nextLong` for the draw `u` (a 64-bit fraction)
/// in fixed point, as c/kvstore.c computes it.
fn zipfian(u: u64) -> u64 {
    if u < KVSTORE_ZIPF_FIRST_Q64 {
        return 0;
    }
    if u < KVSTORE_ZIPF_SECOND_Q64 {
        return 1;
    }
    let mul_q63 = |a: u64, b: u64| ((u128::from(a) * u128::from(b)) >> 63) as u64;
    let one_minus_u = (((1u128 << 64) - u128::from(u)) >> 1) as u64;
    let mut x = (1u64 << 63) - mul_q63(KVSTORE_ZIPF_ETA_Q63, one_minus_u);
    let mut power = 1u64 << 63;
    let mut e = KVSTORE_ZIPF_ALPHA;
    while e != 0 {
        if e & 1 == 1 {
            power = mul_q63(power, x);
        }
        x = mul_q63(x, x);
        e >>= 1;
    }
    ((u128::from(KVSTORE_ZIPF_ITEMS) * u128::from(power)) >> 63) as u64
}

/// What a whole `kvstore` run did, from the simulation.
struct Simulation {
    reports: Vec<u64>,
    /// Each record's value at the dedup pass.
    at_pass: Vec<Value>,
    /// How run A used each record.
    usage: Vec<Usage>,
}

fn simulate(mem_bytes: u64, guest_index: u64) -> Simulation {
    let layout = kvstore_layout(mem_bytes);
    let mut store = Store::new(mem_bytes, guest_index);
    store.load(layout.records);
    let ops = layout.records * KVSTORE_OPS_PER_RECORD;
    let mut usage = vec![Usage::default(); layout.records as usize];
    let run_b = store.run(ops, KVSTORE_READ_PERCENT_B, &mut usage);
    let at_pass = store.values.clone();
    usage.fill(Usage::default());
    let run_a = store.run(ops, KVSTORE_READ_PERCENT_A, &mut usage);
    Simulation { reports: split_reports(&[run_b, run_a, store.checksum()]), at_pass, usage }
}

/// The exact report list of `kvstore` guest `guest_index` with `mem_bytes`
/// of RAM: the sum of every value word read in run B, the same for run A,
/// then the sum of every index and value word at the end; each 64-bit sum
/// low half first. Deduplication must not change it.
pub fn kvstore_expected_reports(mem_bytes: u64, guest_index: u64) -> Vec<u64> {
    simulate(mem_bytes, guest_index).reports
}

/// What the dedup pass of a single `kvstore` guest merges, and the faults
/// that follow, exactly (the built-in deduplicator, ksmd off, a
/// `max_page_sharing` at least [`KvstoreDedup::largest_group`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvstoreDedup {
    /// Value pages holding each template at the pass: a template held by 2
    /// or more pages is merged into one KSM page.
    pub template_pages: Vec<u64>,
    /// Value pages the pass merges (templates held twice or more; unique
    /// values and index pages never match another page).
    pub merged: u64,
    /// KSM pages the pass makes (one per template held twice or more).
    pub ksm_pages: u64,
    /// The largest group of identical pages.
    pub largest_group: u64,
    /// Merged pages run A writes (phase 4): one `ept_write` each, under
    /// every policy and view (a page read first is mapped read-only by then:
    /// its first write still breaks copy-on-write).
    pub run_a_write_faults: u64,
    /// Merged pages run A reads before any write (phase 4): one `ept_read`
    /// each where the pass zapped them (range-flush, legacy), none under
    /// change-pte.
    pub run_a_read_faults: u64,
    /// Merged pages run A never touched, which the checksum reads (phase
    /// 5): one `ept_read` each where the pass zapped them.
    pub checksum_read_faults: u64,
}

/// [`KvstoreDedup`] of a single `kvstore` guest with `mem_bytes` of RAM.
pub fn kvstore_dedup_model(mem_bytes: u64) -> KvstoreDedup {
    let sim = simulate(mem_bytes, 0);
    let mut template_pages = vec![0u64; KVSTORE_TEMPLATES as usize];
    for value in &sim.at_pass {
        if let Value::Template(t) = value {
            template_pages[*t as usize] += 1;
        }
    }
    let is_merged = |v: &Value| matches!(v, Value::Template(t) if template_pages[*t as usize] >= 2);
    let count = |pick: fn(&Usage) -> bool| {
        sim.at_pass.iter().zip(&sim.usage).filter(|&(v, u)| is_merged(v) && pick(u)).count() as u64
    };
    KvstoreDedup {
        merged: template_pages.iter().filter(|&&n| n >= 2).sum(),
        ksm_pages: template_pages.iter().filter(|&&n| n >= 2).count() as u64,
        largest_group: template_pages.iter().copied().max().unwrap_or(0),
        run_a_write_faults: count(|u| u.written),
        run_a_read_faults: count(|u| u.read_first),
        checksum_read_faults: count(|u| !u.touched),
        template_pages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits_the_region_and_keeps_the_index_half_empty() {
        for mem in [0, 2 << 20, (2 << 20) + 4096, 4 << 20, 8 << 20, 64 << 20] {
            let l = kvstore_layout(mem);
            let region = (mem & !4095).saturating_sub(KVSTORE_START) / PAGE_SIZE;
            assert!(l.index_pages + l.records <= region, "{mem:#x}: {l:?}");
            assert!(l.records * 2 <= l.index_pages * 256, "{mem:#x}: {l:?}");
        }
        assert_eq!(kvstore_layout(8 << 20), KvstoreLayout { index_pages: 24, records: 1512 });
        assert_eq!(kvstore_layout(2 << 20), KvstoreLayout { index_pages: 0, records: 0 });
    }

    #[test]
    fn zipf_constants_are_ycsbs_formulas() {
        let theta = 0.99f64;
        let zetan = 26.469_028_201_783_02f64; // ScrambledZipfianGenerator.ZETAN
        let items = KVSTORE_ZIPF_ITEMS as f64;
        let zeta2 = 1.0 + 0.5f64.powf(theta);
        let eta = (1.0 - (2.0 / items).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        let close = |fixed: u64, exact: f64| (fixed as f64 - exact).abs() <= exact * 1e-14;
        assert!(close(KVSTORE_ZIPF_FIRST_Q64, 2f64.powi(64) / zetan));
        assert!(close(KVSTORE_ZIPF_SECOND_Q64, 2f64.powi(64) * zeta2 / zetan));
        assert!(close(KVSTORE_ZIPF_ETA_Q63, eta * 2f64.powi(63)));
        assert_eq!(KVSTORE_ZIPF_ALPHA as f64, (1.0 / (1.0 - theta)).round());
        assert_eq!(KVSTORE_ZIPF_ITEMS, 10_000_000_000_000_000 + 1);
    }

    #[test]
    fn zipfian_follows_ycsbs_skew() {
        // Item 0 takes 1 / zetan of the draws (3.8%), item 1 1 / (2^0.99
        // zetan) (1.9%); the fixed-point power agrees with f64 across the range.
        let mut rng = 7u64;
        let draws = 200_000;
        let (mut zeros, mut ones) = (0, 0);
        for _ in 0..draws {
            match zipfian(splitmix64(&mut rng)) {
                0 => zeros += 1,
                1 => ones += 1,
                _ => {}
            }
        }
        let share = |n: i32| f64::from(n) / f64::from(draws);
        assert!((share(zeros) - 0.0378).abs() < 0.002, "{}", share(zeros));
        assert!((share(ones) - 0.0190).abs() < 0.002, "{}", share(ones));
        let eta = KVSTORE_ZIPF_ETA_Q63 as f64 / 2f64.powi(63);
        for u in [KVSTORE_ZIPF_SECOND_Q64, 1 << 62, 1 << 63, u64::MAX - 12345] {
            let uf = u as f64 / 2f64.powi(64);
            let exact = KVSTORE_ZIPF_ITEMS as f64 * (eta * uf - eta + 1.0).powf(100.0);
            let fixed = zipfian(u) as f64;
            assert!((fixed - exact).abs() <= exact * 1e-12 + 1.0, "u {u:#x}: {fixed} against {exact}");
        }
    }

    #[test]
    fn reports_differ_by_guest_and_size_and_an_empty_store_reports_zeros() {
        assert_eq!(kvstore_expected_reports(2 << 20, 0), vec![0; 6]);
        let a = kvstore_expected_reports(4 << 20, 0);
        assert_eq!(a.len(), 6);
        assert_ne!(a, kvstore_expected_reports(4 << 20, 1));
        assert_ne!(a, kvstore_expected_reports(5 << 20, 0));
    }

    #[test]
    fn phases_and_io_add_up() {
        assert_eq!(KVSTORE_PHASE_IO.iter().sum::<u64>(), KVSTORE_IO_EXITS);
    }

    #[test]
    fn the_dedup_model_stays_within_the_merged_pages() {
        let d = kvstore_dedup_model(8 << 20);
        let l = kvstore_layout(8 << 20);
        assert!(d.run_a_read_faults + d.checksum_read_faults <= d.merged);
        assert!(d.run_a_write_faults <= d.merged);
        assert!(d.merged <= l.records && d.ksm_pages <= KVSTORE_TEMPLATES);
        // About half the values are template copies, in 8 groups.
        assert!(d.merged > l.records / 3 && d.merged < l.records * 2 / 3, "{d:?}");
        assert!(d.largest_group <= 256, "{d:?}");
    }
}

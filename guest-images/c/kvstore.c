/* kvstore: an in-memory key-value store serving a YCSB-style request mix.
 *
 * The store is an open-addressing hash table (linear probing) of 16-byte
 * slots, index pages first in the region [2 MiB, RAM), followed by one 4 KiB
 * value page per record (YCSB's record with 10 fields of about 400 bytes).
 * Record `k` has key ycsb_hash(k) (YCSB's "user" + hash(keynum)). A value is
 * a copy of one of KVSTORE_TEMPLATES templates (the same object cached under
 * many keys: the duplicates a deduplicator finds) or unique to its key and
 * version, half and half (KVSTORE_TEMPLATE_PERCENT). Requests pick their key
 * with YCSB's scrambled zipfian generator (theta 0.99) in 64-bit fixed point,
 * from a SplitMix64 generator seeded per guest index.
 *
 *   phase 1 "load": insert every record
 *   phase 2 "run B": 4 requests per record, 95% reads, 5% updates; report
 *           the sum of every value read
 *   phase 3 "merge pass": one dedup pass
 *   phase 4 "run A": 4 requests per record, 50% reads, 50% updates; report
 *           the sum of every value read
 *   phase 5 "checksum": report the sum of every index and value word; exit 0
 *
 * The Rust model is guest_images::kvstore_expected_reports (a simulation of
 * the same store); guest-images/README.md has the exit model.
 */
#include "guest.h"

/* One slot of the index: an occupied slot has the top bit of `key` set
 * (YCSB's keys are non-negative, so that bit is free). */
struct slot {
	uint64_t key;
	uint32_t record;
	uint32_t version;
};

#define OCCUPIED (1ULL << 63)
#define SLOTS_PER_PAGE (PAGE_SIZE / sizeof(struct slot))

struct store {
	struct slot *slots;
	uint64_t nslots;
	uint64_t values;  /* address of record 0's value page */
	uint64_t records; /* records loaded */
	uint64_t rng;
};

/* The store's shape for `region_pages` pages at `start`: index pages first
 * (one per KVSTORE_PAGES_PER_INDEX_PAGE, rounded up), then as many records
 * as fit while the index stays at most half full. */
static struct store store_layout(uint64_t start, uint64_t region_pages, uint64_t guest_index)
{
	uint64_t index_pages = (region_pages + KVSTORE_PAGES_PER_INDEX_PAGE - 1) / KVSTORE_PAGES_PER_INDEX_PAGE;
	uint64_t nslots = index_pages * SLOTS_PER_PAGE;
	uint64_t records = region_pages > index_pages ? region_pages - index_pages : 0;

	if (records > nslots / 2)
		records = nslots / 2;
	return (struct store){
		.slots = (struct slot *)(uintptr_t)start,
		.nslots = nslots,
		.values = start + index_pages * PAGE_SIZE,
		.records = records,
		.rng = KVSTORE_SEED + guest_index * SPLITMIX_GAMMA,
	};
}

/* Word `w` of template `t`. */
static uint64_t template_word(uint64_t t, uint64_t w)
{
	return mix64(KVSTORE_SEED ^ (t << 32) ^ w);
}

/* Word `w` of the unique value of `key` at `version`. */
static uint64_t unique_word(uint64_t key, uint64_t version, uint64_t w)
{
	return mix64(key + version * SPLITMIX_GAMMA + w);
}

/* Writes a new value for `key` at `version` into `page`: a template copy or
 * a unique value, as the generator decides. */
static void write_value(struct store *s, uint64_t *page, uint64_t key, uint64_t version)
{
	uint64_t pick = splitmix64(&s->rng);

	if (pick % 100 < KVSTORE_TEMPLATE_PERCENT) {
		uint64_t t = (pick >> 32) % KVSTORE_TEMPLATES;
		for (uint64_t w = 0; w < WORDS_PER_PAGE; w++)
			page[w] = template_word(t, w);
	} else {
		for (uint64_t w = 0; w < WORDS_PER_PAGE; w++)
			page[w] = unique_word(key, version, w);
	}
}

/* The slot of `key`: its own, or the empty one where it would go. */
static struct slot *lookup(struct store *s, uint64_t key)
{
	uint64_t i = key % s->nslots;

	while ((s->slots[i].key & OCCUPIED) && s->slots[i].key != (key | OCCUPIED))
		i = (i + 1) % s->nslots;
	return &s->slots[i];
}

static void load(struct store *s)
{
	for (uint64_t k = 0; k < s->records; k++) {
		uint64_t key = ycsb_hash(k);
		struct slot *slot = lookup(s, key);

		*slot = (struct slot){ .key = key | OCCUPIED, .record = (uint32_t)k, .version = 0 };
		write_value(s, page_at(s->values, k), key, 0);
	}
}

/* (a * b) / 2^63, for fractions of 2^63. */
static uint64_t mul_q63(uint64_t a, uint64_t b)
{
	return (uint64_t)(((unsigned __int128)a * b) >> 63);
}

/* YCSB's ZipfianGenerator.nextLong over KVSTORE_ZIPF_ITEMS items with its
 * precomputed zetan (as ScrambledZipfianGenerator uses it), in fixed point:
 * u is a 64-bit fraction, x = eta * u - eta + 1 a fraction of 2^63. */
static uint64_t zipfian(uint64_t *rng)
{
	uint64_t u = splitmix64(rng);

	if (u < KVSTORE_ZIPF_FIRST_Q64)
		return 0;
	if (u < KVSTORE_ZIPF_SECOND_Q64)
		return 1;
	uint64_t one_minus_u = (uint64_t)((((unsigned __int128)1 << 64) - u) >> 1);
	uint64_t x = (1ULL << 63) - mul_q63(KVSTORE_ZIPF_ETA_Q63, one_minus_u);
	uint64_t power = 1ULL << 63;
	for (uint64_t e = KVSTORE_ZIPF_ALPHA; e; e >>= 1) {
		if (e & 1)
			power = mul_q63(power, x);
		x = mul_q63(x, x);
	}
	return (uint64_t)(((unsigned __int128)KVSTORE_ZIPF_ITEMS * power) >> 63);
}

/* YCSB's ScrambledZipfianGenerator.nextValue: a record number. */
static uint64_t scrambled_zipfian(struct store *s)
{
	return ycsb_hash(zipfian(&s->rng)) % s->records;
}

/* `ops` requests (none when no record fits), `read_percent` of them reads
 * (of the whole value); the rest write a new value. Returns the sum of every
 * word read. */
static uint64_t run(struct store *s, uint64_t ops, uint64_t read_percent)
{
	uint64_t read_sum = 0;

	for (uint64_t i = 0; i < ops; i++) {
		uint64_t is_read = splitmix64(&s->rng) % 100 < read_percent;
		uint64_t key = ycsb_hash(scrambled_zipfian(s));
		struct slot *slot = lookup(s, key);
		uint64_t *value = page_at(s->values, slot->record);

		if (is_read) {
			read_sum += sum_words(value, WORDS_PER_PAGE);
		} else {
			slot->version++;
			write_value(s, value, key, slot->version);
		}
	}
	return read_sum;
}

/* The merge pass. A guest alone asks for it. In a fleet the pass is the
 * fleet's: every guest waits at barrier 1 (every store loaded and run
 * through B), guest 0 asks for the pass, every guest waits at barrier 2 (no
 * store runs A before the pass has ended), so that what merges does not
 * depend on how the guests' threads were scheduled. */
static void merge_pass(uint64_t guest_index, uint64_t guest_count)
{
	if (ksm_fleet_size(guest_count) == 1) {
		ksm_dedup(KSMLAB_DEDUP_PASS);
		return;
	}
	ksm_barrier(1);
	if (guest_index == 0)
		ksm_dedup(KSMLAB_DEDUP_PASS);
	ksm_barrier(2);
}

int main(uint64_t ram_bytes, uint64_t guest_index, uint64_t guest_count)
{
	uint64_t start = KSMLAB_WORKLOAD_REGION_START;
	struct store s = store_layout(start, pages_from(start, ram_bytes), guest_index);
	uint64_t ops = s.records * KVSTORE_OPS_PER_RECORD;

	ksm_phase_named(1, "load");
	load(&s);

	ksm_phase_named(2, "run B: 95% reads, 5% updates");
	ksm_report64(run(&s, ops, KVSTORE_READ_PERCENT_B));

	ksm_phase_named(3, "merge pass");
	merge_pass(guest_index, guest_count);

	ksm_phase_named(4, "run A: 50% reads, 50% updates");
	ksm_report64(run(&s, ops, KVSTORE_READ_PERCENT_A));

	ksm_phase_named(5, "checksum");
	uint64_t index_words = (s.values - start) / 8;
	ksm_report64(sum_words((uint64_t *)(uintptr_t)start, index_words + s.records * WORDS_PER_PAGE));
	return 0;
}

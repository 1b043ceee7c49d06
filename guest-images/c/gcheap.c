/* gcheap: the heap of a managed runtime, collected by a copying collector.
 *
 * The region [2 MiB, RAM) holds a page of GCHEAP_ROOTS root slots, then two
 * semispaces of equal size. The mutator allocates objects (a header word
 * holding the size in words and the number of references, the references,
 * then data) with a bump pointer, each stored into a random root slot, so
 * that the object there before is garbage unless something references it;
 * one object in GCHEAP_REF_ONE_IN references the object of a random root.
 * When the next object does not fit, Cheney's algorithm (C. J. Cheney, "A
 * nonrecursive list compacting algorithm", CACM 1970) copies what the roots
 * reach into the other semispace, and the old one is zeroed, as a runtime
 * zeroes memory before handing it out again: zero pages appear, and the
 * next cycle's allocations write over them. A dedup pass follows each
 * collection.
 *
 *   per cycle c (1 to 4), phases 3c - 2, 3c - 1, 3c:
 *     "allocate": allocate until the semispace is full
 *     "collect": copy the live objects, zero the old semispace; report the
 *                live bytes
 *     "merge pass": one dedup pass
 *   phase 13 "checksum": report the sum of the live heap's words and the
 *                roots, the live bytes and the objects allocated; exit 0
 *
 * The Rust model is guest_images::gcheap_expected_reports (a simulation of
 * the same heap); guest-images/README.md has the exit model.
 */
#include "guest.h"

#define FORWARDED 1ULL

struct heap {
	uint64_t *roots;
	uint64_t *from, *to;  /* the two semispaces */
	uint64_t space_words; /* words in each */
	uint64_t free;        /* next free word of `from` */
	uint64_t allocated;   /* objects allocated so far */
	uint64_t rng;
};

static uint64_t header(uint64_t words, uint64_t refs)
{
	return words << 32 | refs << 1;
}

static uint64_t object_words(uint64_t header)
{
	return header >> 32;
}

static uint64_t object_refs(uint64_t header)
{
	return (header >> 1) & 0x7FFFFFFF;
}

/* Allocates objects until the next one does not fit. */
static void allocate(struct heap *h)
{
	for (;;) {
		uint64_t draw = splitmix64(&h->rng);
		uint64_t words = 2 + draw % (GCHEAP_EXTRA_WORDS + 1);
		uint64_t refs = (draw >> 32) % GCHEAP_REF_ONE_IN == 0;

		if (h->free + words > h->space_words)
			return;
		uint64_t *object = &h->from[h->free];
		h->free += words;
		object[0] = header(words, refs);
		for (uint64_t r = 1; r <= refs; r++)
			object[r] = h->roots[splitmix64(&h->rng) % GCHEAP_ROOTS];
		for (uint64_t w = 1 + refs; w < words; w++)
			object[w] = h->allocated * SPLITMIX_GAMMA + w;
		h->roots[splitmix64(&h->rng) % GCHEAP_ROOTS] = (uint64_t)(uintptr_t)object;
		h->allocated++;
	}
}

/* Cheney's copy of one reference: the object's new address in to-space,
 * copying it there first unless it already was (its header then forwards). */
static uint64_t forward(struct heap *h, uint64_t *to_free, uint64_t ref)
{
	if (!ref)
		return 0;
	uint64_t *object = (uint64_t *)(uintptr_t)ref;
	if (object[0] & FORWARDED)
		return object[0] & ~FORWARDED;
	uint64_t words = object_words(object[0]);
	uint64_t *copy = &h->to[*to_free];
	memcpy(copy, object, words * 8);
	*to_free += words;
	object[0] = (uint64_t)(uintptr_t)copy | FORWARDED;
	return (uint64_t)(uintptr_t)copy;
}

/* Copies what the roots reach into to-space, zeroes from-space, swaps the
 * two; returns the live bytes. */
static uint64_t collect(struct heap *h)
{
	uint64_t to_free = 0;

	for (uint64_t r = 0; r < GCHEAP_ROOTS; r++)
		h->roots[r] = forward(h, &to_free, h->roots[r]);
	for (uint64_t scan = 0; scan < to_free; scan += object_words(h->to[scan]))
		for (uint64_t r = 1; r <= object_refs(h->to[scan]); r++)
			h->to[scan + r] = forward(h, &to_free, h->to[scan + r]);
	memset(h->from, 0, h->space_words * 8);
	uint64_t *old = h->from;
	h->from = h->to;
	h->to = old;
	h->free = to_free;
	return to_free * 8;
}

int main(uint64_t ram_bytes, uint64_t guest_index, uint64_t guest_count)
{
	(void)guest_count;
	uint64_t start = KSMLAB_WORKLOAD_REGION_START;
	uint64_t pages = pages_from(start, ram_bytes);
	uint64_t space_pages = pages ? (pages - 1) / 2 : 0;
	struct heap h = {
		.roots = page_at(start, 0),
		.from = page_at(start, 1),
		.to = page_at(start, 1 + space_pages),
		.space_words = space_pages * WORDS_PER_PAGE,
		.rng = GCHEAP_SEED + guest_index * SPLITMIX_GAMMA,
	};
	uint32_t phase = 1;

	for (uint64_t cycle = 0; cycle < GCHEAP_CYCLES && pages; cycle++) {
		ksm_phase_named(phase++, "allocate");
		allocate(&h);
		ksm_phase_named(phase++, "collect");
		ksm_report((uint32_t)collect(&h));
		ksm_phase_named(phase++, "merge pass");
		ksm_dedup(KSMLAB_DEDUP_PASS);
	}

	ksm_phase_named(phase, "checksum");
	uint64_t sum = pages ? sum_words(h.roots, GCHEAP_ROOTS) + sum_words(h.from, h.free) : 0;
	ksm_report64(sum);
	ksm_report64(h.free * 8);
	ksm_report64(h.allocated);
	return 0;
}

/* guest.h - what the built-in C guests share: their region of RAM, a
 * generator, YCSB's hash, page sums. The numbers they share with their Rust
 * models (src/guest_numbers.rs) come from the generated guest-numbers.h, the
 * ABI's from ksmlab-abi.h (through ksmlab.h). Each function here has a Rust
 * twin in src/model.rs, which the models compute with.
 */
#ifndef GUEST_H
#define GUEST_H

#include "ksmlab.h"
#include "guest-numbers.h"

#define PAGE_SIZE KSMLAB_PAGE_SIZE
#define WORDS_PER_PAGE (KSMLAB_PAGE_SIZE / 8)

/* The first byte after the image (ksmlab.ld), and its page-aligned end. */
extern char __image_end[];

static inline uint64_t image_end_page(void)
{
	return ((uint64_t)(uintptr_t)__image_end + PAGE_SIZE - 1) & ~(uint64_t)(PAGE_SIZE - 1);
}

/* Pages of [start, RAM rounded down to a page): 0 if RAM ends below start. */
static inline uint64_t pages_from(uint64_t start, uint64_t ram_bytes)
{
	uint64_t end = ram_bytes & ~(uint64_t)(PAGE_SIZE - 1);
	return end > start ? (end - start) / PAGE_SIZE : 0;
}

/* Page `i` of a region that starts at `start`, as 512 words. */
static inline uint64_t *page_at(uint64_t start, uint64_t i)
{
	return (uint64_t *)(uintptr_t)(start + i * PAGE_SIZE);
}

/* SplitMix64: the next value of the generator whose state is `*state`. */
static inline uint64_t splitmix64(uint64_t *state)
{
	uint64_t z = (*state += SPLITMIX_GAMMA);
	z = (z ^ (z >> 30)) * SPLITMIX_MUL1;
	z = (z ^ (z >> 27)) * SPLITMIX_MUL2;
	return z ^ (z >> 31);
}

/* SplitMix64's finalizer alone: a well-mixed function of `x`. */
static inline uint64_t mix64(uint64_t x)
{
	uint64_t state = x;
	return splitmix64(&state);
}

/* YCSB's Utils.fnvhash64: FNV-1a over the 8 bytes of `v`, low byte first,
 * made non-negative as Java's Math.abs does (wrapping, on the signed value). */
static inline uint64_t ycsb_hash(uint64_t v)
{
	uint64_t h = FNV_OFFSET_BASIS_64;
	for (int i = 0; i < 8; i++) {
		h ^= v & 0xFF;
		h *= FNV_PRIME_64;
		v >>= 8;
	}
	return (int64_t)h < 0 ? -h : h;
}

/* Wrapping sum of the `n` words at `p`. */
static inline uint64_t sum_words(const uint64_t *p, uint64_t n)
{
	uint64_t sum = 0;
	for (uint64_t i = 0; i < n; i++)
		sum += p[i];
	return sum;
}

#endif /* GUEST_H */

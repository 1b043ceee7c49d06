/* ltp_ksm.h - LTP ksm01's create_same_memory as guest code, shared by
 * ltp-ksm01.c (three children as three regions of one guest) and
 * ltp-ksm01-fleet.c (child i as guest i of a fleet).
 *
 * LTP (testcases/kernel/mem/ksm/ksm_test.h, create_same_memory) forks num
 * (3) children of size MB each, and in four stages each child fills all its
 * memory with one letter (ksm_child_memset), KSM merges (ksmd with
 * pages_to_scan covering everything, sleep 0), LTP checks pages_shared,
 * pages_sharing, pages_volatile and pages_unshared (ksm_group_check), and
 * the child verifies its bytes (verify). Then run = 2 unmerges, run = 0
 * stops. Here a synchronous dedup pass stands for ksmd's full scans and a
 * report of the bytes that differ from LTP's expectation stands for verify.
 * The code is written here; only the letters and the stage structure are
 * LTP's (guest-images/README.md cites the lines).
 */
#ifndef LTP_KSM_H
#define LTP_KSM_H

#include "guest.h"

/* LTP's stages of memsets, before the unmerge. */
#define LTP_STAGES 4

/* The letter child `child` fills its memory with in stage `stage` (0-3):
 * LTP's ksm_data0 for child 0 and every child from 3 on, ksm_data1 for
 * child 1, ksm_data2 for child 2. */
static inline char ltp_letter(uint64_t child, int stage)
{
	static const char data[3][LTP_STAGES] = {
		{ 'c', 'c', 'd', 'd' }, /* ksm_data0 */
		{ 'a', 'b', 'd', 'd' }, /* ksm_data1 */
		{ 'a', 'a', 'd', 'd' }, /* ksm_data2 */
	};
	return data[child < 3 ? child : 0][stage];
}

/* Whether LTP's mergeable_size is one byte short of the child's memory in
 * this stage (child 1, stage 4): its last byte is then 'e'. */
static inline int ltp_has_e(uint64_t child, int stage)
{
	return child == 1 && stage == 3;
}

/* The byte LTP expects at offset `at` of a child's `bytes` bytes. */
static inline char ltp_expected(uint64_t child, int stage, uint64_t at, uint64_t bytes)
{
	return ltp_has_e(child, stage) && at == bytes - 1 ? 'e' : ltp_letter(child, stage);
}

/* ksm_child_memset: `pages` pages at `start` filled with the stage's
 * letter, the last byte 'e' where LTP writes it. */
static inline void ltp_memset(uint64_t start, uint64_t pages, uint64_t child, int stage)
{
	char *memory = (char *)(uintptr_t)start;
	uint64_t bytes = pages * PAGE_SIZE;

	memset(memory, ltp_letter(child, stage), bytes);
	if (bytes && ltp_has_e(child, stage))
		memory[bytes - 1] = 'e';
}

/* verify: how many bytes of the child's memory differ from LTP's
 * expectation (0 when the VMM kept every byte). Word by word, then byte by
 * byte only in a word that differs. */
static inline uint64_t ltp_verify(uint64_t start, uint64_t pages, uint64_t child, int stage)
{
	const uint64_t *words = (const uint64_t *)(uintptr_t)start;
	uint64_t bytes = pages * PAGE_SIZE;
	uint64_t fill = (uint8_t)ltp_letter(child, stage) * 0x0101010101010101ULL;
	uint64_t wrong = 0;

	for (uint64_t i = 0; i < bytes / 8; i++) {
		if (words[i] == fill && !(ltp_has_e(child, stage) && i == bytes / 8 - 1))
			continue;
		for (uint64_t b = 0; b < 8; b++)
			wrong += ((const char *)&words[i])[b] != ltp_expected(child, stage, i * 8 + b, bytes);
	}
	return wrong;
}

#endif /* LTP_KSM_H */

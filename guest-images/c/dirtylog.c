/* dirtylog: the pre-copy loop of a live migration, as the guest sees it.
 *
 * The guest fills the region [2 MiB, RAM) with pages all different, then
 * runs DIRTYLOG_ROUNDS rounds. Each round asks the VMM for a soft-dirty
 * round (port 0x501 = 5, ABI 1.1: all guest RAM becomes read-only in one
 * batch range, as clear_refs 4 does, so that the pages written next can be
 * told apart), reads all of memory (what a migration thread copying pages
 * does to the guest's caches, here done by the guest so that the reads are
 * its own), then writes one word of each page of a working set that shrinks
 * round by round: round r writes the first pages >> r pages, one store each.
 *
 *   phase 1 "fill": every word of every page
 *   per round r, phases 2 + 3r, 3 + 3r, 4 + 3r:
 *     "soft-dirty round": dedup 5
 *     "read all memory": sum every word; report it
 *     "write the working set": word 1 of pages [0, pages >> r) := a value
 *                              of the round
 *   phase 14 "checksum": sum every word; report it; exit 0
 *
 * The Rust model is guest_images::dirtylog_expected_reports, the exit model
 * guest_images::dirtylog_faults (guest-images/README.md).
 */
#include "guest.h"

int main(uint64_t ram_bytes, uint64_t guest_index, uint64_t guest_count)
{
	(void)guest_index;
	(void)guest_count;
	uint64_t start = KSMLAB_WORKLOAD_REGION_START;
	uint64_t pages = pages_from(start, ram_bytes);
	uint64_t *words = page_at(start, 0);
	uint32_t phase = 1;

	ksm_phase_named(phase++, "fill");
	for (uint64_t i = 0; i < pages * WORDS_PER_PAGE; i++)
		words[i] = mix64(DIRTYLOG_SEED + i);

	for (uint64_t round = 0; round < DIRTYLOG_ROUNDS; round++) {
		ksm_phase_named(phase++, "soft-dirty round");
		ksm_dedup(KSMLAB_DEDUP_SOFT_DIRTY);

		ksm_phase_named(phase++, "read all memory");
		ksm_report64(sum_words(words, pages * WORDS_PER_PAGE));

		ksm_phase_named(phase++, "write the working set");
		for (uint64_t p = 0; p < pages >> round; p++)
			page_at(start, p)[1] = (round + 1) * SPLITMIX_GAMMA + p;
	}

	ksm_phase_named(phase, "checksum");
	ksm_report64(sum_words(words, pages * WORDS_PER_PAGE));
	return 0;
}

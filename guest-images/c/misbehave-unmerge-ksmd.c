/* misbehave-unmerge-ksmd: unmerge requests while ksmd is merging, and
 * writes in between.
 *
 * The region [2 MiB, RAM) holds pages in MISBEHAVE_FLOOD_GROUPS groups of
 * identical content (as misbehave-dedup-flood's). MISBEHAVE_UNMERGE_ROUNDS
 * times: start ksmd (dedup 2), spin MISBEHAVE_UNMERGE_SPIN iterations while
 * it scans and merges, rewrite word 0 of one group (copy-on-write where
 * merged), ask for an unmerge (dedup 4) while ksmd still runs, and check
 * that every page still holds what the guest wrote (the number of words
 * that differ is summed into a report: 0). ksmd is stopped at the end.
 *
 *   phase 1 "fill"
 *   phase 2 "unmerge while ksmd merges": the rounds; report the words that
 *       differed (0)
 *   phase 3 "checksum": stop ksmd; sum every word; report it; exit 0
 *
 * guest_images::misbehave_unmerge_ksmd_expected_reports is the model; what
 * ksmd merges and when depends on its timing.
 */
#include "guest.h"

static uint64_t expected_word(uint64_t page, uint64_t w, const uint64_t *stamps)
{
	uint64_t group = page % MISBEHAVE_FLOOD_GROUPS;

	if (w == 0 && stamps[group])
		return stamps[group];
	return mix64(group * WORDS_PER_PAGE + w);
}

int main(uint64_t ram_bytes, uint64_t guest_index, uint64_t guest_count)
{
	(void)guest_index;
	(void)guest_count;
	uint64_t start = KSMLAB_WORKLOAD_REGION_START;
	uint64_t pages = pages_from(start, ram_bytes);
	uint64_t stamps[MISBEHAVE_FLOOD_GROUPS] = { 0 };
	uint64_t wrong = 0;

	ksm_phase_named(1, "fill");
	for (uint64_t p = 0; p < pages; p++)
		for (uint64_t w = 0; w < WORDS_PER_PAGE; w++)
			page_at(start, p)[w] = expected_word(p, w, stamps);

	ksm_phase_named(2, "unmerge while ksmd merges");
	for (uint64_t round = 0; round < MISBEHAVE_UNMERGE_ROUNDS; round++) {
		ksm_dedup(KSMLAB_DEDUP_START);
		for (volatile uint64_t spin = 0; spin < MISBEHAVE_UNMERGE_SPIN; spin++)
			;
		uint64_t group = round % MISBEHAVE_FLOOD_GROUPS;
		stamps[group] = mix64(round) | 1;
		for (uint64_t p = group; p < pages; p += MISBEHAVE_FLOOD_GROUPS)
			page_at(start, p)[0] = stamps[group];
		ksm_dedup(KSMLAB_DEDUP_UNMERGE);
		for (uint64_t p = 0; p < pages; p++)
			for (uint64_t w = 0; w < WORDS_PER_PAGE; w++)
				wrong += page_at(start, p)[w] != expected_word(p, w, stamps);
	}
	ksm_report(wrong);

	ksm_phase_named(3, "checksum");
	ksm_dedup(KSMLAB_DEDUP_STOP);
	ksm_report64(sum_words(page_at(start, 0), pages * WORDS_PER_PAGE));
	return 0;
}

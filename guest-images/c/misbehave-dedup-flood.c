/* misbehave-dedup-flood: thousands of dedup requests, while the guest's
 * pages keep changing: ksmd started and stopped in quick pairs, passes,
 * unmerges, and values that are no request at all.
 *
 * The region [2 MiB, RAM) holds pages in MISBEHAVE_FLOOD_GROUPS groups of
 * identical content, word w of a page of group g being mix64(g * 512 + w),
 * so that every pass and every ksmd batch finds something to merge; the
 * guest rewrites word 0 of one group between the requests (copy-on-write
 * where merged), keeping the groups identical.
 *
 *   phase 1 "fill": every page
 *   phase 2 "ksmd start/stop pairs": MISBEHAVE_FLOOD_PAIRS times: dedup 2,
 *       rewrite a group, dedup 3
 *   phase 3 "passes": MISBEHAVE_FLOOD_PASSES times: dedup 1, rewrite a group
 *   phase 4 "unmerges": MISBEHAVE_FLOOD_UNMERGES times: dedup 4, rewrite a
 *       group; every tenth time a pass first, so there is something to
 *       unmerge
 *   phase 5 "not requests": MISBEHAVE_FLOOD_JUNK values that are no
 *       request (0, 6, 7, 0x80000001, 0xFFFFFFFF, in turn): ignored
 *   phase 6 "checksum": sum every word; report it; exit 0
 *
 * guest_images::misbehave_dedup_flood_expected_reports is the model; which
 * pages ksmd merges between a start and a stop depends on its timing, the
 * io exits do not.
 */
#include "guest.h"

static const uint32_t junk[] = { 0, 6, 7, 0x80000001, 0xFFFFFFFF };

struct region {
	uint64_t start;
	uint64_t pages;
	uint64_t round; /* rewrites so far */
};

/* Word 0 of every page of group round % GROUPS := a value of the round. */
static void rewrite_group(struct region *r)
{
	uint64_t group = r->round % MISBEHAVE_FLOOD_GROUPS;

	for (uint64_t p = group; p < r->pages; p += MISBEHAVE_FLOOD_GROUPS)
		page_at(r->start, p)[0] = mix64(r->round);
	r->round++;
}

int main(uint64_t ram_bytes, uint64_t guest_index, uint64_t guest_count)
{
	(void)guest_index;
	(void)guest_count;
	struct region r = { .start = KSMLAB_WORKLOAD_REGION_START };

	r.pages = pages_from(r.start, ram_bytes);
	ksm_phase_named(1, "fill");
	for (uint64_t p = 0; p < r.pages; p++)
		for (uint64_t w = 0; w < WORDS_PER_PAGE; w++)
			page_at(r.start, p)[w] = mix64((p % MISBEHAVE_FLOOD_GROUPS) * WORDS_PER_PAGE + w);

	ksm_phase_named(2, "ksmd start/stop pairs");
	for (uint64_t i = 0; i < MISBEHAVE_FLOOD_PAIRS; i++) {
		ksm_dedup(KSMLAB_DEDUP_START);
		rewrite_group(&r);
		ksm_dedup(KSMLAB_DEDUP_STOP);
	}

	ksm_phase_named(3, "passes");
	for (uint64_t i = 0; i < MISBEHAVE_FLOOD_PASSES; i++) {
		ksm_dedup(KSMLAB_DEDUP_PASS);
		rewrite_group(&r);
	}

	ksm_phase_named(4, "unmerges");
	for (uint64_t i = 0; i < MISBEHAVE_FLOOD_UNMERGES; i++) {
		if (i % 10 == 0)
			ksm_dedup(KSMLAB_DEDUP_PASS);
		ksm_dedup(KSMLAB_DEDUP_UNMERGE);
		rewrite_group(&r);
	}

	ksm_phase_named(5, "not requests");
	for (uint64_t i = 0; i < MISBEHAVE_FLOOD_JUNK; i++)
		ksm_dedup(junk[i % (sizeof junk / sizeof junk[0])]);

	ksm_phase_named(6, "checksum");
	ksm_report64(sum_words(page_at(r.start, 0), r.pages * WORDS_PER_PAGE));
	return 0;
}

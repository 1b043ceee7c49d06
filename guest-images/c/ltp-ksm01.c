/* ltp-ksm01: LTP ksm01 (create_same_memory, ltp_ksm.h) in one guest: its
 * three children are three regions of S pages each, from the first page
 * after the image to the end of RAM (S = a third of those pages; the 0 to 2
 * pages left over get content of their own, the address of each word, so
 * that they never match another page). A stage is one phase:
 *
 *   phases 1-4: the three children's memsets of the stage; a dedup pass
 *               (LTP's ksmd scans); verify: report the bytes that differ
 *   phase 5 "KSM unmerging...": unmerge (LTP's run = 2); verify stage 4's
 *               bytes again (LTP's children do, once resumed); report
 *   phase 6 "stop KSM.": stop (run = 0); exit 0
 *
 * At the end of phases 1-4 the deduplicator's figures are LTP's for three
 * children of S pages, plus the guest's own pages (guest-images/README.md;
 * guest_images::ltp_ksm01_expected).
 */
#include "ltp_ksm.h"

#define CHILDREN 3

static const char *const stage_names[LTP_STAGES] = {
	"children 0 1 2 allocate 'c' 'a' 'a'; KSM merging...",
	"children 0 1 2 allocate 'c' 'b' 'a'",
	"children 0 1 2 allocate 'd' 'd' 'd'",
	"children 0 1 2 allocate 'd' 'd' 'd' except one page with 'e'",
};

/* Bytes of the three children's memory that differ from stage `stage`. */
static uint64_t verify_children(uint64_t start, uint64_t pages, int stage)
{
	uint64_t wrong = 0;

	for (uint64_t child = 0; child < CHILDREN; child++)
		wrong += ltp_verify(start + child * pages * PAGE_SIZE, pages, child, stage);
	return wrong;
}

int main(uint64_t ram_bytes, uint64_t guest_index, uint64_t guest_count)
{
	(void)guest_index;
	(void)guest_count;
	uint64_t start = image_end_page();
	uint64_t available = pages_from(start, ram_bytes);
	uint64_t pages = available / CHILDREN;

	for (uint64_t *w = page_at(start, CHILDREN * pages); w < page_at(start, available); w++)
		*w = (uint64_t)(uintptr_t)w;

	for (int stage = 0; stage < LTP_STAGES; stage++) {
		ksm_phase_named(stage + 1, stage_names[stage]);
		for (uint64_t child = 0; child < CHILDREN; child++)
			ltp_memset(start + child * pages * PAGE_SIZE, pages, child, stage);
		ksm_dedup(KSMLAB_DEDUP_PASS);
		ksm_report(verify_children(start, pages, stage));
	}

	ksm_phase_named(LTP_STAGES + 1, "KSM unmerging...");
	ksm_dedup(KSMLAB_DEDUP_UNMERGE);
	ksm_report(verify_children(start, pages, LTP_STAGES - 1));

	ksm_phase_named(LTP_STAGES + 2, "stop KSM.");
	ksm_dedup(KSMLAB_DEDUP_STOP);
	return 0;
}

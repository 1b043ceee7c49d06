/* misbehave-zero-pages: many zero pages, as a freshly zeroed heap or page
 * cache holds, for the deduplicator with and without use_zero_pages.
 *
 * Page p of the region [2 MiB, RAM) is, by p % 4:
 *   0: written with its own address in word 0 (unlike every other page);
 *   1, 2: written with zeros (present, all zero);
 *   3: never touched until phase 3 reads it.
 *
 *   phase 1 "fill": pages 0, 1 and 2 mod 4 as above
 *   phase 2 "merge pass": the present zero pages (1 and 2 mod 4) merge: into
 *       KSM pages, or with use_zero_pages 1 into the zero page
 *   phase 3 "read every page": sum every word (the untouched pages read as
 *       zero); report it
 *   phase 4 "write zero pages": word 1 of every page 1 mod 4 := its index
 *   phase 5 "merge pass": now the pages 3 mod 4 are present and zero too
 *   phase 6 "checksum": sum every word; report it; exit 0
 *
 * guest_images::misbehave_zero_pages_expected_reports and _faults are the
 * model.
 */
#include "guest.h"

int main(uint64_t ram_bytes, uint64_t guest_index, uint64_t guest_count)
{
	(void)guest_index;
	(void)guest_count;
	uint64_t start = KSMLAB_WORKLOAD_REGION_START;
	uint64_t pages = pages_from(start, ram_bytes);

	ksm_phase_named(1, "fill");
	for (uint64_t p = 0; p < pages; p++) {
		if (p % 4 == 0)
			page_at(start, p)[0] = (uint64_t)(uintptr_t)page_at(start, p);
		else if (p % 4 != 3)
			memset(page_at(start, p), 0, PAGE_SIZE);
	}

	ksm_phase_named(2, "merge pass");
	ksm_dedup(KSMLAB_DEDUP_PASS);

	ksm_phase_named(3, "read every page");
	ksm_report64(sum_words(page_at(start, 0), pages * WORDS_PER_PAGE));

	ksm_phase_named(4, "write zero pages");
	for (uint64_t p = 1; p < pages; p += 4)
		page_at(start, p)[1] = p;

	ksm_phase_named(5, "merge pass");
	ksm_dedup(KSMLAB_DEDUP_PASS);

	ksm_phase_named(6, "checksum");
	ksm_report64(sum_words(page_at(start, 0), pages * WORDS_PER_PAGE));
	return 0;
}

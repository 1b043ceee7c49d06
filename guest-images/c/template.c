/* template: every guest of a fleet holds the same large image, as VMs booted
 * from one disk image hold the same page cache, then diverges by its own
 * writes.
 *
 * Word w of page p of the region [2 MiB, RAM) is image_word(p, w): every
 * page differs from every other page of the guest, and every guest holds
 * the same bytes, so a guest alone has nothing to merge and a fleet of N
 * merges each page N ways. Guest i (RSI) then rewrites word 0 of every page
 * p with p % 8 == i % 8, a value of its own. Guest 0 asks for the passes;
 * barriers keep every guest out of its memory while one runs (a single
 * guest never waits).
 *
 *   phase 1 "load the image": write every page
 *   phase 2 "merge pass": barrier; guest 0: dedup pass; barrier
 *   phase 3 "read the image": sum every word; report it
 *   phase 4 "diverge": rewrite this guest's pages
 *   phase 5 "merge pass": barrier; guest 0: dedup pass; barrier
 *   phase 6 "checksum": sum every word; report it; exit 0
 *
 * The Rust model is guest_images::template_expected_reports; the exit
 * model is in guest-images/README.md.
 */
#include "guest.h"

static uint64_t image_word(uint64_t page, uint64_t w)
{
	return mix64(TEMPLATE_SEED + page * WORDS_PER_PAGE + w);
}

/* Every guest at the barrier; guest 0 runs a pass; every guest waits for
 * it at the second barrier. `barrier` numbers the first of the two. */
static void fleet_pass(uint64_t guest_index, uint32_t barrier)
{
	ksm_barrier(barrier);
	if (guest_index == 0)
		ksm_dedup(KSMLAB_DEDUP_PASS);
	ksm_barrier(barrier + 1);
}

int main(uint64_t ram_bytes, uint64_t guest_index, uint64_t guest_count)
{
	uint64_t start = KSMLAB_WORKLOAD_REGION_START;
	uint64_t pages = pages_from(start, ram_bytes);
	uint64_t index = ksm_fleet_size(guest_count) > 1 ? guest_index : 0;

	ksm_phase_named(1, "load the image");
	for (uint64_t p = 0; p < pages; p++)
		for (uint64_t w = 0; w < WORDS_PER_PAGE; w++)
			page_at(start, p)[w] = image_word(p, w);

	ksm_phase_named(2, "merge pass");
	fleet_pass(index, 1);

	ksm_phase_named(3, "read the image");
	ksm_report64(sum_words(page_at(start, 0), pages * WORDS_PER_PAGE));

	ksm_phase_named(4, "diverge");
	for (uint64_t p = index % TEMPLATE_DIVERGE_STRIDE; p < pages; p += TEMPLATE_DIVERGE_STRIDE)
		page_at(start, p)[0] = image_word(p, 0) ^ ((index + 1) * SPLITMIX_GAMMA);

	ksm_phase_named(5, "merge pass");
	fleet_pass(index, 3);

	ksm_phase_named(6, "checksum");
	ksm_report64(sum_words(page_at(start, 0), pages * WORDS_PER_PAGE));
	return 0;
}

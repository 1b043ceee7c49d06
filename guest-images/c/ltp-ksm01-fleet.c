/* ltp-ksm01-fleet: LTP ksm01 (create_same_memory, ltp_ksm.h) as a fleet:
 * guest i is LTP's child i (3 guests for LTP's default num = 3; a guest from
 * 3 on fills as child 0 does, as LTP's children from 3 on do). Its memory is
 * every page from the first after the image to the end of RAM. Barriers
 * separate the stages as LTP's SIGSTOP / SIGCONT do, and guest 0 makes the
 * dedup requests for the fleet:
 *
 *   phases 1-4: barrier (every guest has ended the stage before); memset;
 *               barrier; guest 0: dedup pass; barrier; verify; report the
 *               bytes that differ
 *   phase 5 "KSM unmerging...": barrier; guest 0: unmerge; barrier; verify
 *               stage 4's bytes again; report
 *   phase 6 "stop KSM.": barrier; guest 0: stop; exit 0
 *
 * A single guest (a VMM without fleets) is child 0 and never waits.
 */
#include "ltp_ksm.h"

/* LTP's message for a child's memset: "child %d allocates %u MB filled
 * with '%c'" (the child's number and size are the guest's and its RAM). */
static const char *const stage_names[3][LTP_STAGES] = {
	{ "allocates memory filled with 'c'", "allocates memory filled with 'c'",
	  "allocates memory filled with 'd'", "allocates memory filled with 'd'" },
	{ "allocates memory filled with 'a'", "allocates memory filled with 'b'",
	  "allocates memory filled with 'd'",
	  "allocates memory filled with 'd' except one page with 'e'" },
	{ "allocates memory filled with 'a'", "allocates memory filled with 'a'",
	  "allocates memory filled with 'd'", "allocates memory filled with 'd'" },
};

/* Every guest at barrier `first`, guest 0 makes `request`, every guest
 * waits for it at barrier `first + 1`. */
static void fleet_request(uint64_t child, uint32_t first, uint32_t request)
{
	ksm_barrier(first);
	if (child == 0)
		ksm_dedup(request);
	ksm_barrier(first + 1);
}

int main(uint64_t ram_bytes, uint64_t guest_index, uint64_t guest_count)
{
	uint64_t child = ksm_fleet_size(guest_count) > 1 ? guest_index : 0;
	uint64_t start = image_end_page();
	uint64_t pages = pages_from(start, ram_bytes);
	uint32_t barrier = 1;

	for (int stage = 0; stage < LTP_STAGES; stage++) {
		ksm_phase_named(stage + 1, stage_names[child < 3 ? child : 0][stage]);
		ksm_barrier(barrier++);
		ltp_memset(start, pages, child, stage);
		fleet_request(child, barrier, KSMLAB_DEDUP_PASS);
		barrier += 2;
		ksm_report(ltp_verify(start, pages, child, stage));
	}

	ksm_phase_named(LTP_STAGES + 1, "KSM unmerging...");
	fleet_request(child, barrier, KSMLAB_DEDUP_UNMERGE);
	barrier += 2;
	ksm_report(ltp_verify(start, pages, child, LTP_STAGES - 1));

	ksm_phase_named(LTP_STAGES + 2, "stop KSM.");
	ksm_barrier(barrier);
	if (child == 0)
		ksm_dedup(KSMLAB_DEDUP_STOP);
	return 0;
}

/* misbehave-merged-code: instruction fetches from merged pages, and code
 * that modifies a merged page it then runs.
 *
 *   phase 1 "copy code into data": pages P (2 MiB) and Q (P + 4 KiB) each
 *       get `mov eax, 42; ret` at their start, and the pages after them a
 *       copy of the guest's own image (its code: the pages from 1 MiB to
 *       its end), so that P and Q are twins and every page of the image has
 *       a twin in data;
 *   phase 2 "merge pass": dedup 1: P and Q merge, and so does each page of
 *       the image with its copy: the guest now runs on merged code pages;
 *   phase 3 "run merged code": call P, call Q: report 42, 42;
 *   phase 4 "modify merged code": store 43 into Q's immediate (a write to
 *       a merged page: copy-on-write), call Q, call P: report 43, 42;
 *   phase 5 "patch own code": store 8 into the immediate of `patchable`
 *       (`mov eax, 7; ret` in the guest's own, merged, code page) and call
 *       it: report 8; exit 0.
 *
 * Whatever the policy and view, the reports are 42, 42, 43, 42, 8; the
 * faults each policy takes are in guest-images/README.md.
 */
#include "guest.h"

/* A function whose immediate the guest patches, in its own code. */
__asm__(".pushsection .text\n"
	".globl patchable\n"
	"patchable:\n"
	"	movl $7, %eax\n"
	"	ret\n"
	".popsection");
int patchable(void);

/* `mov eax, imm32; ret`, the immediate at byte 1. */
static void write_function(uint8_t *page, uint32_t value)
{
	page[0] = 0xB8;
	memcpy(&page[1], &value, 4);
	page[5] = 0xC3;
}

static int call(const void *code)
{
	return ((int (*)(void))(uintptr_t)code)();
}

int main(uint64_t ram_bytes, uint64_t guest_index, uint64_t guest_count)
{
	(void)ram_bytes;
	(void)guest_index;
	(void)guest_count;
	uint8_t *p = (uint8_t *)page_at(KSMLAB_WORKLOAD_REGION_START, 0);
	uint8_t *q = (uint8_t *)page_at(KSMLAB_WORKLOAD_REGION_START, 1);
	uint64_t image_bytes = image_end_page() - KSMLAB_GUEST_BASE;

	ksm_phase_named(1, "copy code into data");
	write_function(p, 42);
	write_function(q, 42);
	memcpy(q + PAGE_SIZE, (const void *)(uintptr_t)KSMLAB_GUEST_BASE, image_bytes);

	ksm_phase_named(2, "merge pass");
	ksm_dedup(KSMLAB_DEDUP_PASS);

	ksm_phase_named(3, "run merged code");
	ksm_report(call(p));
	ksm_report(call(q));

	ksm_phase_named(4, "modify merged code");
	uint32_t patch = 43;
	memcpy(&q[1], &patch, 4);
	ksm_report(call(q));
	ksm_report(call(p));

	ksm_phase_named(5, "patch own code");
	uint8_t *own = (uint8_t *)(uintptr_t)patchable;
	own[1] = 8;
	ksm_report(patchable());
	return 0;
}

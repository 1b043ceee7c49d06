/* ksmlab.h - the tiny-guest ABI, version 1.1, for guests written in C.
 *
 * The contract is guest-abi.md (summarised in guest-images/README.md). Every
 * number here comes from the generated header ksmlab-abi.h, which
 * guest-images/build.rs writes into its OUT_DIR from src/abi/numbers.rs, the
 * one place the numbers are defined (each as KSMLAB_<name>, the Rust and
 * assembly name with a prefix): compile with that directory on the include
 * path (ksmlab-cc does).
 *
 * The guest runs in 64-bit long mode at CPL 3 with IOPL 3: each call below
 * is one `out` (one io exit), except ksm_puts (one per byte) and
 * ksm_phase_named (two). start.S calls
 *
 *     int main(uint64_t ram_bytes, uint64_t guest_index, uint64_t guest_count);
 *
 * with RDI, RSI and RDX as the VMM set them and exits with its return value.
 * A VMM older than ABI 1.1 does not set RSI and RDX (it leaves them 0):
 * ksm_fleet_size() reads a count of 0 as a single guest.
 *
 * There is no IDT: any exception (a #PF outside the identity map or in the
 * VMM's low megabyte, a #GP, a #UD) ends the run as a triple fault.
 */
#ifndef KSMLAB_H
#define KSMLAB_H

#include <stddef.h>
#include <stdint.h>

#include "ksmlab-abi.h"

/* The guest's entry point, called by start.S (see above). */
int main(uint64_t ram_bytes, uint64_t guest_index, uint64_t guest_count);

/* The compiler may call these (struct copies, zeroing); support.c has them. */
void *memset(void *dst, int byte, size_t len);
void *memcpy(void *restrict dst, const void *restrict src, size_t len);
void *memmove(void *dst, const void *src, size_t len);
int memcmp(const void *a, const void *b, size_t len);

/* One 32-bit port write: one io exit. */
static inline void ksm_out32(uint16_t port, uint32_t value)
{
	__asm__ volatile("outl %0, %w1" : : "a"(value), "Nd"(port) : "memory");
}

/* One 8-bit port write: one io exit. */
static inline void ksm_out8(uint16_t port, uint8_t value)
{
	__asm__ volatile("outb %0, %w1" : : "a"(value), "Nd"(port) : "memory");
}

/* One 32-bit port read: one io exit (all-ones where no device is). */
static inline uint32_t ksm_in32(uint16_t port)
{
	uint32_t value;
	__asm__ volatile("inl %w1, %0" : "=a"(value) : "Nd"(port) : "memory");
	return value;
}

/* Ends the run with exit code `code` (0 = success). Never returns: were the
 * VMM to resume the guest, ud2 makes that a triple fault, not a wild run. */
static inline __attribute__((noreturn)) void ksm_exit(uint32_t code)
{
	ksm_out32(KSMLAB_PORT_EXIT, code);
	for (;;)
		__asm__ volatile("ud2");
}

/* Ends the current phase and starts phase `n`. */
static inline void ksm_phase(uint32_t n)
{
	ksm_out32(KSMLAB_PORT_PHASE, n);
}

/* 1.1: names the current phase. `name` is a NUL-terminated printable-ASCII
 * string of at most KSMLAB_PHASE_NAME_MAX_LEN bytes in guest RAM above
 * KSMLAB_GUEST_BASE (a string literal is: the identity map makes its address
 * the guest-physical one). */
static inline void ksm_phase_name(const char *name)
{
	ksm_out32(KSMLAB_PORT_PHASE_NAME, (uint32_t)(uintptr_t)name);
}

/* Starts phase `n` and names it: two io exits. */
static inline void ksm_phase_named(uint32_t n, const char *name)
{
	ksm_phase(n);
	ksm_phase_name(name);
}

/* A dedup request: KSMLAB_DEDUP_PASS (the vCPU waits for the pass),
 * _START, _STOP, _UNMERGE, _SOFT_DIRTY. In a fleet it acts on every guest. */
static inline void ksm_dedup(uint32_t request)
{
	ksm_out32(KSMLAB_PORT_DEDUP, request);
}

/* Appends `value` to the run's report list. */
static inline void ksm_report(uint32_t value)
{
	ksm_out32(KSMLAB_PORT_REPORT, value);
}

/* Appends a 64-bit value as two reports, low half first. */
static inline void ksm_report64(uint64_t value)
{
	ksm_report((uint32_t)value);
	ksm_report((uint32_t)(value >> 32));
}

/* 1.1: waits until every running guest of the fleet has written `value`
 * (a single guest never waits). */
static inline void ksm_barrier(uint32_t value)
{
	ksm_out32(KSMLAB_PORT_BARRIER, value);
}

/* Writes one byte to the console (COM1's transmit register): one io exit. */
static inline void ksm_putc(char c)
{
	ksm_out8(KSMLAB_COM1_BASE, (uint8_t)c);
}

/* Writes a NUL-terminated string to the console, one io exit per byte. */
static inline void ksm_puts(const char *s)
{
	while (*s)
		ksm_putc(*s++);
}

/* 1.1: the number of guests in the fleet from main's `guest_count`; a VMM
 * older than 1.1 leaves RDX 0 (or unset), which means a single guest. */
static inline uint64_t ksm_fleet_size(uint64_t guest_count)
{
	return guest_count ? guest_count : 1;
}

#endif /* KSMLAB_H */

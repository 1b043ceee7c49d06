/* misbehave-ports: port I/O of every width to the ABI's ports, their
 * neighbours and a sweep of the whole port space; none may crash the VMM.
 *
 *   phase 1 "port reads" (32-bit marker): `in` of 8, 16 and 32 bits from
 *       the ABI's ports but COM1 (0xF4, 0x500-0x504), their neighbours
 *       (0xF3, 0xF5, 0x4FF, 0x505, 0x3F7, 0x400) and every port 257 k (0,
 *       0x101, ... 0xFFFF; 0xFFFF at 8 bits only: a wider access would
 *       reach past the port space, misbehave-port-end's case): each must
 *       read all-ones. Reports how many did, and how many reads there were.
 *   phase 2 "port writes" (an 8-bit marker): `out` of 8, 16 and 32 bits to
 *       the neighbours and the sweep (dropped); to the barrier port (a
 *       single guest never waits); phase names the VMM must refuse (null,
 *       past RAM, in the low megabyte, too long, not printable, unending,
 *       narrow writes); an 8-bit and a 16-bit report (this VMM appends them
 *       zero-extended: the ABI defines 32-bit writes only); 8- and 16-bit
 *       writes of 0 to the dedup port (not a request: ignored).
 *   phase 3 "string port i/o" (a 16-bit marker): rep insb / insw / insd of
 *       16 elements from port 0x80 (all-ones: reports the 0xFF bytes), rep
 *       outsb of a line to COM1, rep outsw to port 0x80, rep outsd of four
 *       reports.
 *   phase 4 "uart registers": an 8-bit read of each COM1 register, a
 *       16-bit read of LSR and a 32-bit read of MCR: reports each (the
 *       16550A's state, as the VMM emulates it).
 *   Then a 16-bit write of 0 to the exit port ends the run with code 0.
 *
 * guest_images::misbehave_ports_expected_reports is the model.
 */
#include "guest.h"

static const uint16_t neighbours[] = { 0xF3, 0xF5, 0x4FF, 0x505, 0x3F7, 0x400 };
static const uint16_t abi_ports[] = { 0xF4, 0x500, 0x501, 0x502, 0x503, 0x504 };

#define SWEEP_STRIDE 0x101
#define SWEEP_PORTS 256

static const char bad_newline[] = "bad\nname";
static const char too_long[] = "a phase name of sixty-four bytes, one more than the ABI allows!!";
static const char line[] = "rep outsb to COM1\n";
static const uint32_t four_reports[4] = { 0x11111111, 0x22222222, 0x33333333, 0x44444444 };

static uint8_t in8(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %w1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static uint16_t in16(uint16_t port)
{
	uint16_t v;
	__asm__ volatile("inw %w1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static void out16(uint16_t port, uint16_t v)
{
	__asm__ volatile("outw %0, %w1" : : "a"(v), "Nd"(port) : "memory");
}

/* Reads `port` at every width that stays inside the port space (an access
 * past port 0xFFFF is misbehave-port-end's); counts the reads and the
 * all-ones ones. */
static void read_all_widths(uint16_t port, uint32_t *reads, uint32_t *all_ones)
{
	*all_ones += in8(port) == 0xFF;
	*reads += 1;
	if (port <= 0xFFFE) {
		*all_ones += in16(port) == 0xFFFF;
		*reads += 1;
	}
	if (port <= 0xFFFC) {
		*all_ones += ksm_in32(port) == 0xFFFFFFFF;
		*reads += 1;
	}
}

/* Writes `port` at every width that stays inside the port space. */
static void write_all_widths(uint16_t port)
{
	ksm_out8(port, 0x5A);
	if (port <= 0xFFFE)
		out16(port, 0x5AA5);
	if (port <= 0xFFFC)
		ksm_out32(port, 0x5AA5A55A);
}

static void port_reads(void)
{
	uint32_t reads = 0, all_ones = 0;

	for (size_t i = 0; i < sizeof abi_ports / sizeof abi_ports[0]; i++)
		read_all_widths(abi_ports[i], &reads, &all_ones);
	for (size_t i = 0; i < sizeof neighbours / sizeof neighbours[0]; i++)
		read_all_widths(neighbours[i], &reads, &all_ones);
	for (uint32_t k = 0; k < SWEEP_PORTS; k++)
		read_all_widths((uint16_t)(k * SWEEP_STRIDE), &reads, &all_ones);
	ksm_report(all_ones);
	ksm_report(reads);
}

static void port_writes(uint64_t ram_bytes)
{
	for (size_t i = 0; i < sizeof neighbours / sizeof neighbours[0]; i++)
		write_all_widths(neighbours[i]);
	for (uint32_t k = 0; k < SWEEP_PORTS; k++)
		write_all_widths((uint16_t)(k * SWEEP_STRIDE)); /* no ABI port is a multiple of 0x101 */

	ksm_out8(KSMLAB_PORT_BARRIER, 1);
	out16(KSMLAB_PORT_BARRIER, 2);
	ksm_barrier(3);

	/* The last 8 bytes of RAM: a name without its NUL before RAM ends. */
	char *unending = (char *)(uintptr_t)((ram_bytes & ~7ULL) - 8);
	memset(unending, 'x', 8);
	ksm_out32(KSMLAB_PORT_PHASE_NAME, 0);
	ksm_out32(KSMLAB_PORT_PHASE_NAME, (uint32_t)ram_bytes);
	ksm_out32(KSMLAB_PORT_PHASE_NAME, 0x1000);
	ksm_phase_name(too_long);
	ksm_phase_name(bad_newline);
	ksm_phase_name(unending);
	ksm_out8(KSMLAB_PORT_PHASE_NAME, 0x12);
	out16(KSMLAB_PORT_PHASE_NAME, 0x1234);
	ksm_phase_name("port writes");

	ksm_out8(KSMLAB_PORT_REPORT, 0xAB);
	out16(KSMLAB_PORT_REPORT, 0xABCD);
	ksm_out8(KSMLAB_PORT_DEDUP, 0);
	out16(KSMLAB_PORT_DEDUP, 0);
}

static void string_io(void)
{
	uint8_t buffer[16 * 4];
	void *dst = buffer;
	const void *src;
	uint64_t count;
	uint32_t ff = 0;

	memset(buffer, 0, sizeof buffer);
	count = 16;
	__asm__ volatile("rep insb" : "+D"(dst), "+c"(count) : "d"((uint16_t)0x80) : "memory");
	for (int i = 0; i < 16; i++)
		ff += buffer[i] == 0xFF;
	memset(buffer, 0, sizeof buffer);
	dst = buffer, count = 16;
	__asm__ volatile("rep insw" : "+D"(dst), "+c"(count) : "d"((uint16_t)0x80) : "memory");
	for (int i = 0; i < 32; i++)
		ff += buffer[i] == 0xFF;
	memset(buffer, 0, sizeof buffer);
	dst = buffer, count = 16;
	__asm__ volatile("rep insl" : "+D"(dst), "+c"(count) : "d"((uint16_t)0x80) : "memory");
	for (int i = 0; i < 64; i++)
		ff += buffer[i] == 0xFF;
	ksm_report(ff);

	src = line, count = sizeof line - 1;
	__asm__ volatile("rep outsb" : "+S"(src), "+c"(count) : "d"((uint16_t)KSMLAB_COM1_BASE) : "memory");
	src = four_reports, count = 8;
	__asm__ volatile("rep outsw" : "+S"(src), "+c"(count) : "d"((uint16_t)0x80) : "memory");
	src = four_reports, count = 4;
	__asm__ volatile("rep outsl" : "+S"(src), "+c"(count) : "d"((uint16_t)KSMLAB_PORT_REPORT) : "memory");
}

static void uart_registers(void)
{
	for (uint16_t port = KSMLAB_COM1_BASE; port < KSMLAB_COM1_BASE + KSMLAB_COM1_PORTS; port++)
		ksm_report(in8(port));
	ksm_report(in16(KSMLAB_COM1_BASE + 5));
	ksm_report(ksm_in32(KSMLAB_COM1_BASE + 4));
}

int main(uint64_t ram_bytes, uint64_t guest_index, uint64_t guest_count)
{
	(void)guest_index;
	(void)guest_count;

	ksm_phase_named(1, "port reads");
	port_reads();

	ksm_out8(KSMLAB_PORT_PHASE, 2);
	port_writes(ram_bytes);

	out16(KSMLAB_PORT_PHASE, 3);
	ksm_phase_name("string port i/o");
	string_io();

	ksm_phase_named(4, "uart registers");
	uart_registers();

	out16(KSMLAB_PORT_EXIT, 0);
	for (;;)
		__asm__ volatile("ud2");
}

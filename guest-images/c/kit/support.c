/* support.c - what a freestanding compiler may call on its own: GCC and
 * Clang emit calls to memset, memcpy, memmove and memcmp for struct copies,
 * zeroing and comparisons even with -ffreestanding. memset, memcpy and
 * memmove are the string instructions (rep stosb / movsb, fast on every
 * x86-64 since Ivy Bridge), so the compiler cannot turn them back into calls
 * to themselves (GCC recognises memset and memcpy loops, not memcmp's); each
 * is an access KVM's instruction emulator can perform, should it meet a page
 * the secondary MMU has zapped (the memslot view).
 */
#include "ksmlab.h"

void *memset(void *dst, int byte, size_t len)
{
	void *d = dst;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(len) : "a"(byte) : "memory");
	return dst;
}

void *memcpy(void *restrict dst, const void *restrict src, size_t len)
{
	void *d = dst;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(len) : : "memory");
	return dst;
}

void *memmove(void *dst, const void *src, size_t len)
{
	const unsigned char *s = src;
	unsigned char *d = dst;

	if (d <= s || d >= s + len)
		return memcpy(dst, src, len);
	/* Overlapping, destination above: copy backwards. */
	d += len - 1;
	s += len - 1;
	__asm__ volatile("std; rep movsb; cld" : "+D"(d), "+S"(s), "+c"(len) : : "memory");
	return dst;
}

int memcmp(const void *a, const void *b, size_t len)
{
	const unsigned char *x = a, *y = b;

	for (size_t i = 0; i < len; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

/*
 * Parsing of human quantities on command lines: byte sizes ("512M", "4GiB", "1048576").
 */
#ifndef KVF_CORE_UNITS_H
#define KVF_CORE_UNITS_H

#include <stdint.h>

/* Parses a byte count: digits, then optionally one of k, m, g, t (any case, powers of 1024)
 * followed by an optional "i" and an optional "B". Returns 0, or -1 on anything else or overflow.
 */
int kvf__parse_size(const char *s, uint64_t *out);

#endif

/*
 * Parsing of human quantities on command lines: byte sizes ("512M", "4GiB", "1048576").
 */
#ifndef KVF_CORE_UNITS_H
#define KVF_CORE_UNITS_H

#include <stddef.h>
#include <stdint.h>

/* Parses a byte count: digits, then optionally one of k, m, g, t (any case, powers of 1024)
 * followed by an optional "i" and an optional "B". Returns 0, or -1 on anything else or overflow.
 */
int kvf__parse_size(const char *s, uint64_t *out);

/* Formats a byte count as a size a person reads ("512 MiB", "4 GiB", "1.5 TiB", "4096 B") into
 * buf (at least 16 bytes). Returns buf. */
char *kvf__fmt_size(uint64_t bytes, char *buf, size_t len);

#endif

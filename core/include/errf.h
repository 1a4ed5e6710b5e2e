/*
 * The one way a setup call reports an error with context: one line into the caller's err buffer
 * (see docs/style.md, "Errors"), and the code returned.
 */
#ifndef KVF_CORE_ERRF_H
#define KVF_CORE_ERRF_H

#include <stddef.h>

/* Formats one line into err (nothing when err is NULL or errlen 0) and returns code, so that a
 * failure is one statement: `return kvf__errf(err, errlen, KVF_EINVAL, "bad port %s", s);`. */
int kvf__errf(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif

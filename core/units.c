#include "units.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

int kvf__parse_size(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    if (!s || *s < '0' || *s > '9')
        return -1;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s)
        return -1;
    uint64_t mul = 1;
    if (*end) {
        char u = (char)(*end | 0x20);
        mul = u == 'k'   ? 1ull << 10
              : u == 'm' ? 1ull << 20
              : u == 'g' ? 1ull << 30
              : u == 't' ? 1ull << 40
                         : 0;
        if (!mul)
            return -1;
        end++;
        if (*end == 'i' || *end == 'I')
            end++;
        if (*end == 'b' || *end == 'B')
            end++;
        if (*end)
            return -1;
    }
    if (v > UINT64_MAX / mul)
        return -1;
    *out = v * mul;
    return 0;
}

char *kvf__fmt_size(uint64_t bytes, char *buf, size_t len)
{
    static const char *const unit[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    int u = 0;
    double v = (double)bytes;
    while (v >= 1024.0 && u < 6) {
        v /= 1024.0;
        u++;
    }
    if (u == 0 || v == (double)(uint64_t)v)
        snprintf(buf, len, "%.0f %s", v, unit[u]);
    else
        snprintf(buf, len, "%.3g %s", v, unit[u]);
    return buf;
}

#include "units.h"

#include <errno.h>
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

/*
 * Strict configuration files (jsonkeys.h).
 */
#include "jsonkeys.h"

#include <stdio.h>
#include <string.h>

/* Edit distance of a and b (insertions, deletions, substitutions, adjacent swaps), capped: keys
 * are short. */
static size_t distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63)
        return 99;
    size_t d[64][64];
    for (size_t i = 0; i <= la; i++)
        d[i][0] = i;
    for (size_t j = 0; j <= lb; j++)
        d[0][j] = j;
    for (size_t i = 1; i <= la; i++) {
        for (size_t j = 1; j <= lb; j++) {
            size_t cost = a[i - 1] != b[j - 1];
            size_t v = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < v)
                v = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + cost < v)
                v = d[i - 1][j - 1] + cost;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                d[i - 2][j - 2] + 1 < v)
                v = d[i - 2][j - 2] + 1;
            d[i][j] = v;
        }
    }
    return d[la][lb];
}

int kvf__json_keys_check(const json_t *o, const char *const *known, const char *where, char *err,
                         size_t errlen)
{
    if (!json_is_object(o)) {
        snprintf(err, errlen, "%s: must be an object", where);
        return -1;
    }
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)o, k, v)
    {
        size_t i = 0, best = 0, best_d = 99;
        for (; known[i]; i++) {
            if (!strcmp(known[i], k))
                break;
            size_t dd = distance(k, known[i]);
            if (dd < best_d)
                best_d = dd, best = i;
        }
        if (known[i])
            continue;
        char list[512] = "";
        size_t at = 0;
        for (size_t j = 0; known[j] && at < sizeof list; j++) {
            int n = snprintf(list + at, sizeof list - at, "%s%s", j ? ", " : "", known[j]);
            if (n < 0)
                break;
            at += (size_t)n;
        }
        if (best_d <= 2 && best_d < strlen(k))
            snprintf(err, errlen, "%s: unknown key \"%s\" (did you mean \"%s\"? known: %s)", where,
                     k, known[best], list);
        else
            snprintf(err, errlen, "%s: unknown key \"%s\" (known: %s)", where, k, list);
        return -1;
    }
    return 0;
}

/*
 * The disk tier's engine where kvfabric was built without liburing: a tier cannot be opened, and
 * says why. The other calls are never reached (no kvf__disk exists); they answer as a tier that is
 * down would.
 */
#include "disk.h"

#include "kvf/error.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

int kvf__disk_open(kvf__disk **out, const kvf__disk_opts *o, char *err, size_t errlen)
{
    *out = NULL;
    snprintf(err, errlen,
             "disk tier %s: this build has no io_uring (liburing-dev was missing when it was "
             "configured)",
             o && o->path ? o->path : "");
    return KVF_EINFEASIBLE;
}

const char *kvf__disk_note(const kvf__disk *d)
{
    (void)d;
    return "";
}

void kvf__disk_close(kvf__disk **d)
{
    if (d)
        *d = NULL;
}

int kvf__disk_put(kvf__disk *d, uint64_t ns, const kvf_key *key, const void *data, uint64_t len)
{
    (void)d, (void)ns, (void)key, (void)data, (void)len;
    return KVF_EIO;
}

int kvf__disk_flush(kvf__disk *d)
{
    (void)d;
    return KVF_EIO;
}

int kvf__disk_remove(kvf__disk *d, uint64_t ns, const kvf_key *key)
{
    (void)d, (void)ns, (void)key;
    return KVF_EIO;
}

int64_t kvf__disk_clear(kvf__disk *d, uint64_t ns)
{
    (void)d, (void)ns;
    return (int64_t)KVF_EIO;
}

void kvf__disk_usage(kvf__disk *d, uint64_t *entries, uint64_t *bytes, uint64_t *verify_failures)
{
    (void)d;
    *entries = *bytes = *verify_failures = 0;
}

uint64_t kvf__disk_get_reads(kvf__disk *d)
{
    (void)d;
    return 0;
}

uint64_t kvf__disk_direct_puts(kvf__disk *d)
{
    (void)d;
    return 0;
}

uint64_t kvf__disk_direct_gets(kvf__disk *d)
{
    (void)d;
    return 0;
}

int kvf__disk_down(kvf__disk *d)
{
    (void)d;
    return ENODEV;
}

int kvf__disk_contains(kvf__disk *d, uint64_t ns, const kvf_key *key, uint64_t *len)
{
    (void)d, (void)ns, (void)key, (void)len;
    return 0;
}

uint64_t kvf__disk_offset(kvf__disk *d, uint64_t ns, const kvf_key *key)
{
    (void)d, (void)ns, (void)key;
    return UINT64_MAX;
}

int kvf__disk_get(kvf__disk *d, uint64_t ns, const kvf_key *key, void *buf, uint64_t cap,
                  uint64_t *len)
{
    (void)d, (void)ns, (void)key, (void)buf, (void)cap, (void)len;
    return KVF_EIO;
}

int kvf__disk_get_many(kvf__disk *d, uint64_t ns, size_t n, const kvf_key *keys, void *const *bufs,
                       const uint64_t *caps, uint64_t *lens, int *st)
{
    (void)d, (void)ns, (void)keys, (void)bufs, (void)caps;
    for (size_t i = 0; i < n; i++)
        st[i] = KVF_EIO, lens[i] = 0;
    return 0;
}

void kvf__disk_stats_get(kvf__disk *d, kvf__disk_stats *st)
{
    (void)d;
    memset(st, 0, sizeof *st);
    st->down = ENODEV;
}

void kvf__disk_set_drop_hook(kvf__disk *d, void (*fn)(void *ud, uint64_t ns, const kvf_key *key),
                             void *ud)
{
    (void)d, (void)fn, (void)ud; /* no device is ever opened: nothing is dropped */
}

void kvf__disk_each(kvf__disk *d, void (*fn)(void *ud, uint64_t ns, const kvf_key *key), void *ud)
{
    (void)d, (void)fn, (void)ud; /* no device is ever opened: it holds nothing */
}

unsigned kvf__disk_note_read(kvf__disk *d, uint64_t ns, const kvf_key *key)
{
    (void)d, (void)ns, (void)key;
    return 0;
}

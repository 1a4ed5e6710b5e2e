/*
 * The disk tier's index (disk_int.h): (ns, key) -> the newest object record, open addressing with
 * linear probing and deletion by backward shift (no tombstones to sweep).
 */
#define _GNU_SOURCE
#include "disk_int.h"

#include "kvf/error.h"

#include <string.h>

static uint64_t slot_of(const kvf__disk *d, uint64_t ns, uint64_t lo, uint64_t hi)
{
    uint64_t h = lo ^ (hi * 0x9E3779B97F4A7C15ull) ^ (ns * 0xC2B2AE3D27D4EB4Full);
    h ^= h >> 29;
    return h & (d->cap - 1);
}

ent *kvf__dk_find(kvf__disk *d, uint64_t ns, uint64_t lo, uint64_t hi)
{
    for (uint64_t i = slot_of(d, ns, lo, hi);; i = (i + 1) & (d->cap - 1)) {
        ent *e = &d->tab[i];
        if (!e->used)
            return NULL;
        if (e->ns == ns && e->lo == lo && e->hi == hi)
            return e;
    }
}

void kvf__dk_erase(kvf__disk *d, ent *e)
{
    pthread_mutex_lock(&d->imu);
    d->count--;
    d->data_bytes -= e->len;
    uint64_t i = (uint64_t)(e - d->tab);
    /* backward-shift deletion: the entries after it that probed past it move up */
    for (uint64_t j = (i + 1) & (d->cap - 1);; j = (j + 1) & (d->cap - 1)) {
        ent *x = &d->tab[j];
        if (!x->used)
            break;
        uint64_t home = slot_of(d, x->ns, x->lo, x->hi);
        if (((j - home) & (d->cap - 1)) >= ((j - i) & (d->cap - 1))) {
            d->tab[i] = *x;
            i = j;
        }
    }
    memset(&d->tab[i], 0, sizeof d->tab[i]);
    pthread_mutex_unlock(&d->imu);
}

int kvf__dk_grow(kvf__disk *d)
{
    uint64_t ncap = d->cap ? d->cap * 2 : 1024;
    ent *old = d->tab, *nt = calloc(ncap, sizeof *nt);
    if (!nt)
        return -1;
    uint64_t ocap = d->cap;
    d->tab = nt;
    d->cap = ncap;
    for (uint64_t i = 0; i < ocap; i++)
        if (old[i].used) {
            uint64_t j = slot_of(d, old[i].ns, old[i].lo, old[i].hi);
            while (nt[j].used)
                j = (j + 1) & (ncap - 1);
            nt[j] = old[i];
        }
    free(old);
    return 0;
}

/* Indexes an object record (a later sequence replaces an earlier). */
int kvf__dk_set(kvf__disk *d, uint64_t ns, uint64_t lo, uint64_t hi, uint64_t off, uint64_t len,
                uint64_t seq, int paged)
{
    pthread_mutex_lock(&d->imu);
    if ((d->count + 1) * 10 >= d->cap * 7 && kvf__dk_grow(d) != 0) {
        pthread_mutex_unlock(&d->imu);
        return -1;
    }
    ent *e = kvf__dk_find(d, ns, lo, hi);
    if (e) {
        if (e->seq > seq) {
            pthread_mutex_unlock(&d->imu);
            return 0;
        }
        d->data_bytes -= e->len;
    } else {
        uint64_t i = slot_of(d, ns, lo, hi);
        while (d->tab[i].used)
            i = (i + 1) & (d->cap - 1);
        e = &d->tab[i];
        d->count++;
    }
    *e = (ent){.ns = ns,
               .lo = lo,
               .hi = hi,
               .off = off,
               .len = len,
               .seq = seq,
               .ext = (uint32_t)((off - DATA_OFF) / d->ext_bytes),
               .used = 1,
               .paged = (uint8_t)(paged != 0)};
    d->data_bytes += len;
    pthread_mutex_unlock(&d->imu);
    return 0;
}

void kvf__dk_drop_key(kvf__disk *d, uint64_t ns, uint64_t lo, uint64_t hi, uint64_t seq)
{
    ent *e = kvf__dk_find(d, ns, lo, hi);
    if (e && e->seq < seq)
        kvf__dk_erase(d, e);
}

/* Every entry matching (ns, ext) (ext UINT64_MAX: any; all_ns: any namespace) goes. */
uint64_t kvf__dk_drop_where(kvf__disk *d, int all_ns, uint64_t ns, uint64_t ext, uint64_t below)
{
    uint64_t n = 0;
    for (uint64_t i = 0; i < d->cap;) {
        ent *e = &d->tab[i];
        if (e->used && (all_ns || e->ns == ns) && (ext == UINT64_MAX || e->ext == ext) &&
            e->seq < below) {
            if (d->on_drop) {
                kvf_key k = {.lo = e->lo, .hi = e->hi};
                d->on_drop(d->drop_ud, e->ns, &k);
            }
            kvf__dk_erase(d, e); /* the slot now holds a shifted entry, or is empty: look again */
            n++;
            continue;
        }
        i++;
    }
    return n;
}

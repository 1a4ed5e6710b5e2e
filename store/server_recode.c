/*
 * COMPRESS and DECOMPRESS on the storage node's server: each object is re-encoded into a new
 * block and swapped in, only if no reader appeared meanwhile (docs/store.md, "Codecs"). This runs
 * on the loop thread: it is a management operation, and it bounds its work by the batch.
 */
#include "server_int.h"

#include "kvf/error.h"
#include "kvf/object.h"

#include "bytes.h"
#include "cache.h"
#include "codec.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

/* The buffers a batch's re-encodings share, grown to the largest object met so far. */
typedef struct recode_bufs {
    uint8_t *tmp, *scratch, *scratch2;
    size_t tmpcap;
} recode_bufs;

/* Re-encodes the object of key in namespace ns with codec and swaps it in. Returns its status:
 * the miss, the parse, re-encoding or swap error (KVF_ENOMEM where b could not grow), or 0. */
static int recode_one(kvf_server *s, uint64_t ns, const kvf_key *key, uint32_t codec,
                      recode_bufs *b)
{
    uint32_t eid;
    const uint8_t *p;
    uint64_t len;
    kvf__cache_lock(s->o.cache);
    int rc = kvf__cache_acquire_locked(s->o.cache, ns, key, &eid, &p, &len);
    kvf__cache_unlock(s->o.cache);
    if (rc)
        return rc;
    kvf_obj_info info;
    rc = kvf_obj_parse(p, len, &info);
    size_t need = rc ? 0 : kvf_obj_raw_size(info.layers, 0) + info.raw_bytes;
    if (!rc && need > b->tmpcap) {
        uint32_t maxseg = 0;
        for (uint32_t l = 0; l < info.layers; l++)
            if (kvf_obj_seg_at(&info, l).raw_len > maxseg)
                maxseg = kvf_obj_seg_at(&info, l).raw_len;
        free(b->tmp);
        free(b->scratch);
        free(b->scratch2);
        b->tmp = malloc(need);
        b->scratch = malloc((size_t)maxseg + kvf__codec_bound(maxseg));
        b->scratch2 = malloc((size_t)maxseg + 64);
        b->tmpcap = (b->tmp && b->scratch && b->scratch2) ? need : 0;
        if (!b->tmpcap)
            rc = KVF_ENOMEM;
    }
    size_t out = 0;
    if (!rc)
        rc = kvf_obj_recode(p, len, (kvf_codec)codec, b->tmp, b->tmpcap, &out, b->scratch,
                            b->scratch2);
    uint64_t newoff = 0;
    uint8_t *dst = NULL;
    kvf__cache_lock(s->o.cache);
    if (!rc)
        rc = kvf__cache_swap_begin_locked(s->o.cache, eid, out, &newoff, &dst);
    kvf__cache_unlock(s->o.cache);
    if (!rc)
        memcpy(dst, b->tmp, out);
    kvf__cache_lock(s->o.cache);
    if (!rc)
        rc = kvf__cache_swap_locked(s->o.cache, eid, newoff, out);
    kvf__cache_release_locked(s->o.cache, eid);
    kvf__cache_unlock(s->o.cache);
    return rc;
}

void kvf__req_recode(conn *c)
{
    kvf_server *s = c->lp->srv;
    uint32_t n = c->h.item_count;
    uint64_t ns = kvf__get_u64(c->rbuf);
    uint32_t codec = c->h.opcode == KVF_OP_DECOMPRESS ? KVF_CODEC_NONE : kvf__get_u32(c->rbuf + 8);
    if (codec >= KVF_CODEC_COUNT_) {
        kvf__reply_error(c, KVF_EINVAL, 0, "unknown codec %" PRIu32, codec);
        return;
    }
    int32_t *st = malloc((size_t)n * 4);
    if (!st) {
        kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory");
        return;
    }
    recode_bufs b = {0};
    for (uint32_t i = 0; i < n; i++) {
        kvf_key key = kvf__wire_key_get(c->rbuf + 16 + 16 * (size_t)i);
        st[i] = recode_one(s, ns, &key, codec, &b);
    }
    free(b.tmp);
    free(b.scratch);
    free(b.scratch2);
    kvf__reply_statuses(c, st, n);
}

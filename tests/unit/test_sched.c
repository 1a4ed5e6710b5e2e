/*
 * Unit tests of the scheduler core: the prefix index (the index hashes tokens itself; engine hashes
 * only link parents and removals), event decoding of both encodings against vectors made by an
 * independent encoder (tests/sched_vectors.py, python3-msgpack), sequence gaps, and each placement
 * policy on hand-built states.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>

#include "kvf/kvf.h"
#include "scheduler.h"

#include "ingest.h"

static const char *vectors_path;

/* kvf_sched_new with the index sized for what a test puts in it, where the test does not say
 * (the tests that fill it grow it, so the growth runs too): the default's 192 MiB of tables,
 * zeroed at every creation, cost seconds each under ThreadSanitizer. */
static int sched_new(kvf_sched **s, const kvf_sched_opts *o)
{
    kvf_sched_opts x = *o;
    if (!x.expected_blocks)
        x.expected_blocks = 4096;
    return kvf_sched_new(s, &x);
}

static kvf_sched *new_sched(kvf_policy p)
{
    kvf_sched_opts o = {.policy = p};
    kvf_sched_cost_defaults(&o.cost);
    kvf_sched *s;
    assert_int_equal(sched_new(&s, &o), 0);
    return s;
}

static int add(kvf_sched *s, const char *id, kvf_role role, uint32_t bt, uint64_t cap)
{
    kvf_instance_info in;
    memset(&in, 0, sizeof in);
    snprintf(in.id, sizeof in.id, "%s", id);
    in.role = role;
    in.block_tokens = bt;
    in.capacity_blocks = cap;
    int idx;
    assert_int_equal(kvf_sched_instance_add(s, &in, &idx), 0);
    return idx;
}

static void seq(uint32_t *t, size_t n, uint32_t from)
{
    for (size_t i = 0; i < n; i++)
        t[i] = from + (uint32_t)i;
}

static void test_sched_index_matches_tokens_not_engine_hashes(void **state)
{
    (void)state;
    kvf_sched *s = new_sched(KVF_POLICY_KVF_COST);
    int a = add(s, "a", KVF_ROLE_BOTH, 4, 1000), b = add(s, "b", KVF_ROLE_BOTH, 4, 1000);
    uint32_t t[32];
    seq(t, 32, 1);
    uint64_t ha[4] = {11, 12, 13, 14}, hb[2] = {900, 901};
    assert_int_equal(kvf_sched_block_stored(s, a, ha, 4, 0, 0, t, 16, 4, KVF_TIER_DEVICE), 0);
    /* b holds the same first two blocks under entirely different engine hashes. */
    assert_int_equal(kvf_sched_block_stored(s, b, hb, 2, 0, 0, t, 8, 4, KVF_TIER_DEVICE), 0);
    assert_int_equal(kvf_sched_match(s, a, t, 32), 16);
    assert_int_equal(kvf_sched_match(s, b, t, 32), 8);
    /* A different first token: nobody matches, the chain is prefix-sensitive. */
    uint32_t u[32];
    memcpy(u, t, sizeof u);
    u[0] = 999;
    assert_int_equal(kvf_sched_match(s, a, u, 32), 0);
    /* The same block contents after a different prefix do not match either. */
    u[0] = 1;
    u[2] = 777;
    assert_int_equal(kvf_sched_match(s, a, u, 32), 0);
    /* Extending a's chain by parent hash. */
    uint64_t h5 = 15;
    assert_int_equal(kvf_sched_block_stored(s, a, &h5, 1, 1, 14, t + 16, 4, 4, KVF_TIER_DEVICE), 0);
    assert_int_equal(kvf_sched_match(s, a, t, 32), 20);
    /* A parent the index never saw: refused, those blocks cannot be matched. */
    uint64_t h9 = 99;
    assert_int_equal(kvf_sched_block_stored(s, a, &h9, 1, 1, 12345, t, 4, 4, KVF_TIER_DEVICE),
                     KVF_ENOENT);
    /* Removal of a middle block cuts the prefix there; unknown removals are counted. */
    uint64_t r = 12, unknown = 424242;
    assert_int_equal(kvf_sched_block_removed(s, a, &r, 1), 0);
    assert_int_equal(kvf_sched_match(s, a, t, 32), 4);
    assert_int_equal(kvf_sched_block_removed(s, a, &unknown, 1), 0);
    kvf_index_stats st;
    kvf_sched_index_stats(s, &st);
    assert_int_equal(st.unknown_removals, 1);
    assert_int_equal(kvf_sched_match(s, b, t, 32), 8);
    assert_int_equal(kvf_sched_all_cleared(s, b), 0);
    assert_int_equal(kvf_sched_match(s, b, t, 32), 0);
    /* Bad input. */
    assert_int_equal(kvf_sched_block_stored(s, 77, ha, 1, 0, 0, t, 4, 4, KVF_TIER_DEVICE),
                     KVF_ENOENT);
    assert_int_equal(kvf_sched_block_stored(s, a, ha, 2, 0, 0, t, 7, 4, KVF_TIER_DEVICE),
                     KVF_EINVAL);
    kvf_instance_info bad;
    memset(&bad, 0, sizeof bad);
    assert_int_equal(kvf_sched_instance_add(s, &bad, NULL), KVF_EINVAL);
    kvf_sched_destroy(&s);
    assert_null(s);
}

/* Removing an instance: its holdings and engine hashes leave the index, placement no longer sees
 * it, and a later registration takes its slot without inheriting any of it. */
static void test_sched_instance_remove(void **state)
{
    (void)state;
    kvf_sched *s = new_sched(KVF_POLICY_LONGEST_PREFIX);
    int a = add(s, "a", KVF_ROLE_BOTH, 4, 1000), b = add(s, "b", KVF_ROLE_BOTH, 4, 1000);
    int c = add(s, "c", KVF_ROLE_BOTH, 4, 1000);
    uint32_t t[16];
    seq(t, 16, 1);
    uint64_t ha[2] = {11, 12}, hb[4] = {900, 901, 902, 903};
    assert_int_equal(kvf_sched_block_stored(s, a, ha, 2, 0, 0, t, 8, 4, KVF_TIER_DEVICE), 0);
    assert_int_equal(kvf_sched_block_stored(s, b, hb, 4, 0, 0, t, 16, 4, KVF_TIER_DEVICE), 0);
    kvf_place_req rq = {.tokens = t, .n_tokens = 16};
    kvf_place_res rs;
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.prefill, b);

    assert_int_equal(kvf_sched_instance_remove(s, b), 0);
    assert_int_equal(kvf_sched_instance_remove(s, b), KVF_ENOENT);
    assert_int_equal(kvf_sched_instance_count(s), 2);
    assert_int_equal(kvf_sched_instance_slots(s), 3);
    assert_null(kvf_sched_instance_get(s, b));
    assert_int_equal(kvf_sched_instance_find(s, "b"), -1);
    kvf_index_stats st;
    kvf_sched_index_stats(s, &st);
    assert_int_equal(st.holdings, 2); /* a's two blocks */
    assert_int_equal(st.blocks, 2);
    assert_int_equal(kvf_sched_match(s, a, t, 16), 8);
    assert_int_equal(kvf_sched_block_stored(s, b, hb, 1, 0, 0, t, 4, 4, KVF_TIER_DEVICE),
                     KVF_ENOENT);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.prefill, a);

    /* The next registration takes the free slot and inherits no engine hash of b's. */
    int d = add(s, "d", KVF_ROLE_BOTH, 4, 1000);
    assert_int_equal(d, b);
    assert_int_equal(kvf_sched_match(s, d, t, 16), 0);
    uint64_t h = 904;
    assert_int_equal(kvf_sched_block_stored(s, d, &h, 1, 1, 903, t + 16 - 4, 4, 4, KVF_TIER_DEVICE),
                     KVF_ENOENT);

    /* Removing the last slot shrinks the bound; removing all leaves nobody to place on. */
    assert_int_equal(kvf_sched_instance_remove(s, c), 0);
    assert_int_equal(kvf_sched_instance_slots(s), 2);
    assert_int_equal(kvf_sched_instance_remove(s, a), 0);
    assert_int_equal(kvf_sched_instance_remove(s, d), 0);
    assert_int_equal(kvf_sched_instance_slots(s), 0);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), KVF_ENOENT);
    kvf_sched_index_stats(s, &st);
    assert_int_equal(st.holdings, 0);

    /* A full table frees a slot by removal. */
    char id[16];
    for (int i = 0; i < KVF_SCHED_MAX_INSTANCES; i++) {
        snprintf(id, sizeof id, "i%d", i);
        add(s, id, KVF_ROLE_BOTH, 4, 1000);
    }
    kvf_instance_info in;
    memset(&in, 0, sizeof in);
    snprintf(in.id, sizeof in.id, "late");
    in.role = KVF_ROLE_BOTH;
    in.block_tokens = 4;
    assert_int_equal(kvf_sched_instance_add(s, &in, NULL), KVF_ENOSPC);
    assert_int_equal(kvf_sched_instance_remove(s, 77), 0);
    int late;
    assert_int_equal(kvf_sched_instance_add(s, &in, &late), 0);
    assert_int_equal(late, 77);
    kvf_sched_destroy(&s);
}

/* Many blocks: the table grows and every chain still matches. */
static void test_sched_index_grows(void **state)
{
    (void)state;
    kvf_sched_opts o = {.policy = KVF_POLICY_KVF_COST, .expected_blocks = 100};
    kvf_sched_cost_defaults(&o.cost);
    kvf_sched *s;
    assert_int_equal(sched_new(&s, &o), 0);
    int a = add(s, "a", KVF_ROLE_BOTH, 16, 1 << 20);
    static uint32_t t[16 * 64];
    uint64_t h[64];
    for (uint32_t seqn = 0; seqn < 300; seqn++) {
        seq(t, 16 * 64, seqn * 100000);
        for (int i = 0; i < 64; i++)
            h[i] = seqn * 1000u + (uint64_t)i + 1;
        assert_int_equal(kvf_sched_block_stored(s, a, h, 64, 0, 0, t, 16 * 64, 16, KVF_TIER_DEVICE),
                         0);
    }
    kvf_index_stats st;
    kvf_sched_index_stats(s, &st);
    assert_int_equal(st.blocks, 300 * 64);
    for (uint32_t seqn = 0; seqn < 300; seqn += 37) {
        seq(t, 16 * 64, seqn * 100000);
        assert_int_equal(kvf_sched_match(s, a, t, 16 * 64), 16 * 64);
    }
    kvf_sched_destroy(&s);
}

/* kvf_sched_apply_some(), 7 blocks a slice, leaves the index and the counters as one
 * kvf_sched_apply() of the whole batch does: a chain split across slices goes on from its last
 * block, removals split alike, and a chain whose parent the index never saw counts once. */
static void test_sched_apply_in_slices(void **state)
{
    (void)state;
    uint32_t tok[40 * 4], tok2[10 * 4];
    seq(tok, 160, 0);
    seq(tok2, 40, 5000);
    uint64_t h[40], h2[10];
    for (int i = 0; i < 40; i++)
        h[i] = 1001 + (uint64_t)i;
    for (int i = 0; i < 10; i++)
        h2[i] = 2001 + (uint64_t)i;
    kvf_kve ev[3] = {
        {.type = KVF_KVE_BLOCK_STORED,
         .hashes = h,
         .n_hashes = 40,
         .tokens = tok,
         .n_tokens = 160,
         .block_size = 4},
        {.type = KVF_KVE_BLOCK_STORED,
         .hashes = h2,
         .n_hashes = 10,
         .has_parent = 1,
         .parent = 99999,
         .tokens = tok2,
         .n_tokens = 40,
         .block_size = 4},
        {.type = KVF_KVE_BLOCK_REMOVED, .hashes = h + 30, .n_hashes = 10},
    };
    kvf_sched *s[2];
    kvf_ingest_stats st[2];
    kvf_event_source src = {.instance = 0, .store = -1};
    char err[200];
    for (int k = 0; k < 2; k++) {
        s[k] = new_sched(KVF_POLICY_KVF_COST);
        add(s[k], "i0", KVF_ROLE_BOTH, 4, 1000);
        memset(&st[k], 0, sizeof st[k]);
    }
    assert_int_equal(kvf_sched_apply(s[0], &src, ev, 3, 0, &st[0], err, sizeof err), 0);
    kvf_apply_cursor cur = {0, 0};
    int calls = 0;
    do {
        assert_int_equal(
            kvf_sched_apply_some(s[1], &src, ev, 3, 0, &cur, 7, &st[1], err, sizeof err), 0);
        calls++;
    } while (cur.event < 3 && calls < 100);
    assert_true(calls >= 8); /* 40 + 10 blocks stored and 10 removed, 7 at a time */
    assert_int_equal(st[1].batches, 1);
    assert_int_equal(st[0].stored, st[1].stored);
    assert_int_equal(st[0].removed, st[1].removed);
    assert_int_equal(st[0].unknown_parents, 1);
    assert_int_equal(st[1].unknown_parents, 1);
    kvf_index_stats ix[2];
    for (int k = 0; k < 2; k++) {
        kvf_sched_index_stats(s[k], &ix[k]);
        assert_int_equal(kvf_sched_match(s[k], 0, tok, 160), 30 * 4);
    }
    assert_int_equal(ix[0].blocks, ix[1].blocks);
    assert_int_equal(ix[1].blocks, 30);
    for (int k = 0; k < 2; k++)
        kvf_sched_destroy(&s[k]);
}

static void test_sched_events_both_encodings(void **state)
{
    (void)state;
    FILE *f = fopen(vectors_path, "rb");
    if (!f)
        fail_msg("cannot read the vectors file %s", vectors_path ? vectors_path : "(none)");
    kvf_sched *s = new_sched(KVF_POLICY_KVF_COST);
    int i0 = add(s, "i0", KVF_ROLE_BOTH, 4, 1000), i1 = add(s, "i1", KVF_ROLE_BOTH, 4, 1000);
    int i2 = add(s, "i2", KVF_ROLE_BOTH, 4, 1000);
    assert_int_equal(i2, 2);
    kvf_ingest_stats st;
    memset(&st, 0, sizeof st);
    uint8_t hdr[8];
    int batches = 0;
    while (fread(hdr, 1, 8, f) == 8) {
        uint32_t src = hdr[0] | hdr[1] << 8 | hdr[2] << 16 | (uint32_t)hdr[3] << 24;
        uint32_t len = hdr[4] | hdr[5] << 8 | hdr[6] << 16 | (uint32_t)hdr[7] << 24;
        uint8_t *p = malloc(len);
        assert_int_equal(fread(p, 1, len, f), len);
        kvf_event_source es = {.instance = src >= 1000 ? -1 : (int)src,
                               .store = src >= 1000 ? (int)(src - 1000) : -1};
        char err[200] = "";
        assert_int_equal(kvf_sched_ingest(s, &es, p, len, &st, err, sizeof err), 0);
        free(p);
        batches++;
        if (batches == 3) {
            /* After the first three batches: i0 holds 4 blocks, i1 the first 2 (as host). */
            uint32_t t[16];
            seq(t, 16, 1);
            assert_int_equal(kvf_sched_match(s, i0, t, 16), 16);
            assert_int_equal(kvf_sched_match(s, i1, t, 16), 8);
        }
    }
    fclose(f);
    assert_int_equal(batches, 8);
    uint32_t t[16];
    seq(t, 16, 1);
    assert_int_equal(kvf_sched_match(s, i0, t, 16), 4); /* block 102 removed */
    assert_int_equal(kvf_sched_match(s, i1, t, 16), 4); /* its -5 block removed */
    assert_int_equal(kvf_sched_match(s, i2, t, 16), 0); /* cleared */
    assert_int_equal(st.malformed, 1);
    assert_int_equal(st.unknown_types, 1);
    assert_int_equal(st.chunks, 3);
    /* The store still holds the first key, not the second. */
    kvf_key k[2];
    for (int i = 0; i < 2; i++) {
        uint8_t b[16];
        for (int j = 0; j < 16; j++)
            b[j] = (uint8_t)(16 * i + j);
        memcpy(&k[i].lo, b, 8);
        memcpy(&k[i].hi, b + 8, 8);
    }
    kvf_place_req rq = {.tokens = t, .n_tokens = 16, .chunk_keys = k, .n_chunks = 2};
    kvf_place_res rs;
    kvf_sched_set_policy(s, KVF_POLICY_KVF_COST);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    /* Garbage is an error for the batch, not a crash. */
    kvf_event_source es = {.instance = 0, .store = -1};
    char err[200];
    static const uint8_t junk[] = {0xc1, 0x00, 0x01};
    assert_int_equal(kvf_sched_ingest(s, &es, junk, sizeof junk, &st, err, sizeof err), KVF_EPROTO);
    static const uint8_t notbatch[] = {0x93, 0x01, 0x02, 0x03}; /* [1, 2, 3] */
    assert_int_equal(kvf_sched_ingest(s, &es, notbatch, sizeof notbatch, &st, err, sizeof err),
                     KVF_EPROTO);
    kvf_sched_destroy(&s);
}

/* A replay walked answer by answer (kvf_replay_walk, kvf-sched's and kvf-relay's): answers
 * before the first asked for skipped, a late join that starts at 1 no loss, each hole said once
 * with where it starts, a window that starts after what was asked said as such, an end short of
 * it said unless said already, and no loss said at 0 right after the caller cleared. */
static void test_sched_replay_walk(void **state)
{
    (void)state;
    kvf_replay_walk w;
    uint64_t lost = 0;
    /* a late join up to batch 5 (asked from 0): answers 1..4, then the batch in hand */
    kvf_replay_walk_init(&w, 0, 5, 0);
    for (uint64_t s = 1; s <= 4; s++)
        assert_int_equal(kvf_replay_walk_step(&w, s, &lost),
                         KVF_REPLAY_APPLY | (s == 4 ? KVF_REPLAY_DONE : 0));
    assert_int_equal(kvf_replay_walk_short(&w, &lost), 0);
    /* a gap 10..19 asked: 9 (before it) skipped, 10, a hole at 11..12, 13, then the window ends */
    kvf_replay_walk_init(&w, 10, 20, 0);
    assert_int_equal(kvf_replay_walk_step(&w, 9, &lost), 0);
    assert_int_equal(kvf_replay_walk_step(&w, 10, &lost), KVF_REPLAY_APPLY);
    assert_int_equal(kvf_replay_walk_step(&w, 13, &lost), KVF_REPLAY_HOLE | KVF_REPLAY_APPLY);
    assert_int_equal(lost, 11);
    assert_int_equal(kvf_replay_walk_short(&w, &lost), 1);
    assert_int_equal(lost, 14);
    /* a window that starts after the batches asked for: one loss, not a second at the end */
    kvf_replay_walk_init(&w, 10, 20, 0);
    assert_int_equal(kvf_replay_walk_step(&w, 20, &lost),
                     KVF_REPLAY_HOLE | KVF_REPLAY_PAST | KVF_REPLAY_DONE);
    assert_int_equal(lost, 10);
    assert_int_equal(kvf_replay_walk_short(&w, &lost), 0);
    /* just cleared (a restart): a window starting late says nothing more */
    kvf_replay_walk_init(&w, 0, 8, 1);
    assert_int_equal(kvf_replay_walk_step(&w, 6, &lost), KVF_REPLAY_APPLY);
    assert_int_equal(kvf_replay_walk_step(&w, 7, &lost), KVF_REPLAY_APPLY | KVF_REPLAY_DONE);
    /* numbers that wrap past 2^64 compare as the tracker compares them */
    kvf_replay_walk_init(&w, UINT64_MAX - 1, 2, 0);
    assert_int_equal(kvf_replay_walk_step(&w, UINT64_MAX - 1, &lost), KVF_REPLAY_APPLY);
    assert_int_equal(kvf_replay_walk_step(&w, 1, &lost),
                     KVF_REPLAY_HOLE | KVF_REPLAY_APPLY | KVF_REPLAY_DONE);
    assert_int_equal(lost, UINT64_MAX);
    /* answers that stopped (no end marker): where to go on from, and whether a loss was said
     * just before it; none once the batch in hand was reached */
    int cleared = -1;
    uint64_t rest = 0;
    kvf_replay_walk_init(&w, 10, 20, 0);
    assert_int_equal(kvf_replay_walk_cut(&w, &rest, &cleared), 1);
    assert_true(rest == 10 && cleared == 0);
    assert_int_equal(kvf_replay_walk_step(&w, 10, &lost), KVF_REPLAY_APPLY);
    assert_int_equal(kvf_replay_walk_cut(&w, &rest, &cleared), 1);
    assert_true(rest == 11 && cleared == 0);
    assert_int_equal(kvf_replay_walk_step(&w, 13, &lost), KVF_REPLAY_HOLE | KVF_REPLAY_APPLY);
    assert_int_equal(kvf_replay_walk_cut(&w, &rest, &cleared), 1);
    assert_true(rest == 14 && cleared == 0);
    kvf_replay_walk_init(&w, 0, 8, 1); /* just cleared, nothing yet */
    assert_int_equal(kvf_replay_walk_cut(&w, &rest, &cleared), 1);
    assert_true(rest == 0 && cleared == 1);
    assert_int_equal(kvf_replay_walk_step(&w, 7, &lost), KVF_REPLAY_APPLY | KVF_REPLAY_DONE);
    assert_int_equal(kvf_replay_walk_cut(&w, &rest, &cleared), 0);
    /* a window that starts past the batches asked for: a loss, nothing to go on with */
    kvf_replay_walk_init(&w, 10, 20, 0);
    assert_int_equal(kvf_replay_walk_step(&w, 25, &lost),
                     KVF_REPLAY_HOLE | KVF_REPLAY_PAST | KVF_REPLAY_DONE);
    assert_int_equal(kvf_replay_walk_cut(&w, &rest, &cleared), 0);
}

/* A publisher's replay budget (kvf_replay_charge): the whole of it at first, spent by the time
 * replays take, refilled at a tenth of the time that passes, held off for ten times an
 * overdraft, never above the cap; and the back-off of a socket that did not answer. */
static void test_sched_replay_credit(void **state)
{
    (void)state;
    const uint64_t ms = 1000000;
    kvf_replay_credit c = {0};
    uint64_t t = 1000 * ms;
    assert_int_equal(kvf_replay_charge(&c, t, t + 600 * ms), 0); /* 400 ms left */
    t += 600 * ms;
    /* 500 ms more, 50 ms refilled meanwhile: 50 ms short, held off ten times that */
    uint64_t until = kvf_replay_charge(&c, t, t + 500 * ms);
    t += 500 * ms;
    assert_true(until == t + 500 * ms);
    t += 10000 * ms; /* 1 s refilled: the cap */
    assert_int_equal(kvf_replay_charge(&c, t, t + 900 * ms), 0);
    assert_true(c.left_ns == (int64_t)(100 * ms));
    /* a socket that did not answer: 2 s, doubling each time in a row, 60 s at most */
    unsigned b = 0;
    assert_true(kvf_replay_back_off(&b, t) == t + 2000 * ms && b == 2000);
    assert_true(kvf_replay_back_off(&b, t) == t + 4000 * ms);
    for (int k = 0; k < 10; k++)
        kvf_replay_back_off(&b, t);
    assert_int_equal(b, 60000);
}

/* What a replay owes (kvf_replay_debt): the earlier start of two debts kept, modulo 2^64; a
 * restart's debt replaces the earlier life's; a gap after a restart's debt is no longer
 * "cleared". */
static void test_sched_replay_debt(void **state)
{
    (void)state;
    kvf_replay_debt d = {0};
    kvf_replay_owe(&d, 50, 0);
    assert_true(d.owed && d.from == 50 && !d.cleared);
    kvf_replay_owe(&d, 70, 0);
    assert_int_equal(d.from, 50);
    kvf_replay_owe(&d, 30, 0);
    assert_int_equal(d.from, 30);
    kvf_replay_owe(&d, UINT64_MAX - 3, 0); /* before 30, modulo 2^64 */
    assert_int_equal(d.from, UINT64_MAX - 3);
    kvf_replay_owe(&d, 0, 1); /* a restart: the earlier life's debt goes */
    assert_true(d.owed && d.from == 0 && d.cleared);
    kvf_replay_owe(&d, 9, 0);
    assert_true(d.from == 0 && !d.cleared);
}

static void test_sched_sequence_gaps(void **state)
{
    (void)state;
    kvf_seq_tracker t = {0};
    uint8_t b[8] = {0};
    uint64_t from = 0;
    b[7] = 5;
    assert_int_equal(kvf_seq_check(&t, b, &from), 0);
    b[7] = 6;
    assert_int_equal(kvf_seq_check(&t, b, &from), 0);
    b[7] = 9;
    assert_int_equal(kvf_seq_check(&t, b, &from), 1);
    assert_int_equal(from, 7);
    assert_int_equal(t.missed, 2);
    b[6] = 1; /* 265: big-endian */
    assert_int_equal(kvf_seq_check(&t, b, &from), 1);
    assert_int_equal(from, 10);
}

static int seq_at(kvf_seq_tracker *t, uint64_t n, uint64_t *from)
{
    uint8_t b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(n >> (56 - 8 * i));
    return kvf_seq_check(t, b, from);
}

/* Numbers near 2^63 and 2^64, going backwards or jumping: gaps counted modulo 2^64, restarts
 * counted as such, and the missed count never huge. */
static void test_sched_sequence_extremes(void **state)
{
    (void)state;
    kvf_seq_tracker t = {0};
    uint64_t from = 0, half = (uint64_t)1 << 63;
    assert_int_equal(seq_at(&t, half - 10, &from), KVF_SEQ_NEXT);
    assert_int_equal(seq_at(&t, half + 5, &from), KVF_SEQ_GAP);
    assert_true(from == half - 9);
    assert_true(t.missed == 14);
    assert_int_equal(seq_at(&t, half + 5, &from), KVF_SEQ_NEXT); /* a repeat */
    assert_int_equal(seq_at(&t, 3, &from), KVF_SEQ_RESTART);     /* backwards */
    assert_int_equal(seq_at(&t, 4, &from), KVF_SEQ_NEXT);
    assert_int_equal(seq_at(&t, 4 + KVF_SEQ_MAX_GAP + 2, &from), KVF_SEQ_RESTART);
    assert_int_equal(seq_at(&t, UINT64_MAX - 2, &from), KVF_SEQ_RESTART);
    assert_int_equal(seq_at(&t, UINT64_MAX, &from), KVF_SEQ_GAP);
    assert_true(from == UINT64_MAX - 1);
    assert_int_equal(seq_at(&t, 0, &from), KVF_SEQ_NEXT); /* 2^64 - 1 is followed by 0 */
    assert_int_equal(seq_at(&t, 3, &from), KVF_SEQ_GAP);
    assert_true(from == 1);
    assert_int_equal(seq_at(&t, 4 + KVF_SEQ_MAX_GAP, &from), KVF_SEQ_GAP); /* the largest gap */
    assert_true(t.missed == 14 + 1 + 2 + KVF_SEQ_MAX_GAP);
    assert_true(t.gaps == 4);
    assert_true(t.restarts == 3);
}

/* Two prefill instances: "hot" holds the prompt's prefix but is busy; "cold" is idle. */
static void report(kvf_sched *s, int a, const kvf_instance_load *la, int b,
                   const kvf_instance_load *lb)
{
    kvf_sched_instance_load(s, a, la);
    kvf_sched_instance_load(s, b, lb);
}

static void test_sched_policies_on_a_hand_built_state(void **state)
{
    (void)state;
    /* The policies' own choices, without the decode instance taking the long prompt off a
     * swamped prefill instance (test_sched_decode_overflow). */
    kvf_sched_opts o = {.policy = KVF_POLICY_ROUND_ROBIN};
    kvf_sched_cost_defaults(&o.cost);
    o.cost.decode_overflow = 0;
    kvf_sched *s;
    assert_int_equal(sched_new(&s, &o), 0);
    int hot = add(s, "hot", KVF_ROLE_PREFILL, 16, 100000);
    int cold = add(s, "cold", KVF_ROLE_PREFILL, 16, 100000);
    int dec = add(s, "dec", KVF_ROLE_DECODE, 16, 100000);
    static uint32_t t[8192];
    seq(t, 8192, 5);
    uint64_t h[448];
    for (int i = 0; i < 448; i++)
        h[i] = (uint64_t)i + 1;
    /* hot holds 7168 of the 8192 tokens. */
    assert_int_equal(kvf_sched_block_stored(s, hot, h, 448, 0, 0, t, 7168, 16, KVF_TIER_DEVICE), 0);
    kvf_instance_load busy = {.queued_prefill_tokens = 4000, .used_blocks = 5000};
    kvf_instance_load idle = {0};
    kvf_sched_instance_load(s, hot, &busy);
    kvf_sched_instance_load(s, cold, &idle);
    kvf_place_req rq = {.tokens = t, .n_tokens = 8192, .output_tokens = 100};
    kvf_place_res rs;
    int picks[2] = {0, 0};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
        picks[rs.prefill == hot]++;
    }
    assert_int_equal(picks[0], 2); /* round robin alternates */
    /* place() counts what it sends until the engines report again: report before each. */
    kvf_sched_set_policy(s, KVF_POLICY_LEAST_LOADED);
    report(s, hot, &busy, cold, &idle);
    kvf_sched_place(s, &rq, &rs);
    assert_int_equal(rs.prefill, cold);
    kvf_sched_set_policy(s, KVF_POLICY_LONGEST_PREFIX);
    report(s, hot, &busy, cold, &idle);
    kvf_sched_place(s, &rq, &rs);
    assert_int_equal(rs.prefill, hot);
    assert_int_equal(rs.cached_device, 7168);
    kvf_sched_set_policy(s, KVF_POLICY_KVF_COST);
    report(s, hot, &busy, cold, &idle);
    kvf_sched_place(s, &rq, &rs);
    /* 4000 queued tokens cost 0.4 s; recomputing 7168 tokens costs more: go to the cache. */
    assert_int_equal(rs.prefill, hot);
    assert_int_equal(rs.decode, dec);
    assert_true(rs.expected_ttft_s > 0.4 && rs.expected_ttft_s < 1.0);
    /* Every planned action says whether it is real. */
    assert_true(rs.n_actions >= 3);
    for (int i = 0; i < rs.n_actions; i++)
        assert_int_equal(rs.actions[i].label, KVF_LABEL_REAL);
    /* A much busier cache-holder loses to the idle one under the cost model, but not under
     * longest prefix. */
    busy.queued_prefill_tokens = 200000;
    report(s, hot, &busy, cold, &idle);
    kvf_sched_place(s, &rq, &rs);
    assert_int_equal(rs.prefill, cold);
    kvf_sched_set_policy(s, KVF_POLICY_LONGEST_PREFIX);
    report(s, hot, &busy, cold, &idle);
    kvf_sched_place(s, &rq, &rs);
    assert_int_equal(rs.prefill, hot);
    /* Dynamo's cost: prefill blocks after overlap plus active blocks. hot: 64 + 5000 + 12500,
     * cold: 512 + 0: cold. */
    kvf_sched_set_policy(s, KVF_POLICY_DYNAMO_COST);
    report(s, hot, &busy, cold, &idle);
    kvf_sched_place(s, &rq, &rs);
    assert_int_equal(rs.prefill, cold);
    /* A burst before any load report: what place() sent is counted, so equal idle instances
     * take turns instead of one taking everything. */
    kvf_sched_set_policy(s, KVF_POLICY_KVF_COST);
    kvf_instance_load idle2 = {0};
    report(s, hot, &idle2, cold, &idle);
    static uint32_t cold_t[2048];
    seq(cold_t, 2048, 77);
    kvf_place_req burst = {.tokens = cold_t, .n_tokens = 2048, .output_tokens = 10};
    int first;
    kvf_sched_place(s, &burst, &rs);
    first = rs.prefill;
    kvf_sched_place(s, &burst, &rs);
    assert_int_not_equal(rs.prefill, first);
    /* Early rejection when the best estimate misses the SLO by the reject factor. */
    kvf_sched_destroy(&s);
    o.policy = KVF_POLICY_KVF_COST;
    kvf_sched_cost_defaults(&o.cost);
    o.cost.reject_factor = 1.0;
    assert_int_equal(sched_new(&s, &o), 0);
    add(s, "only", KVF_ROLE_BOTH, 16, 100000);
    rq.slo_ttft_s = 0.1;
    kvf_sched_place(s, &rq, &rs);
    assert_true(rs.rejected);
    rq.slo_ttft_s = 10;
    kvf_sched_place(s, &rq, &rs);
    assert_false(rs.rejected);
    kvf_sched_destroy(&s);
}

/* A short uncached suffix is prefilled where it will decode. */
static void test_sched_conditional_disaggregation(void **state)
{
    (void)state;
    kvf_sched *s = new_sched(KVF_POLICY_KVF_COST);
    int p = add(s, "p", KVF_ROLE_PREFILL, 16, 100000);
    int d = add(s, "d", KVF_ROLE_BOTH, 16, 100000);
    kvf_instance_load busy = {.queued_prefill_tokens = 1000};
    kvf_sched_instance_load(s, d, &busy);
    static uint32_t t[4096];
    seq(t, 4096, 1);
    uint64_t h[250];
    for (int i = 0; i < 250; i++)
        h[i] = (uint64_t)i + 1;
    assert_int_equal(kvf_sched_block_stored(s, d, h, 250, 0, 0, t, 4000, 16, KVF_TIER_DEVICE), 0);
    kvf_place_req rq = {.tokens = t, .n_tokens = 4096};
    kvf_place_res rs;
    kvf_sched_place(s, &rq, &rs);
    assert_int_equal(rs.decode, d);
    assert_int_equal(rs.prefill, d); /* 96 uncached tokens: no handoff */
    assert_true(rs.colocated);
    /* A decode-only instance prefills a short suffix too; a long one goes to the prefill
     * instance and is handed off. */
    int d2 = add(s, "d2", KVF_ROLE_DECODE, 16, 1000000);
    kvf_sched_block_stored(s, d2, h, 250, 0, 0, t, 4000, 16, KVF_TIER_DEVICE);
    kvf_sched_place(s, &rq, &rs);
    assert_int_equal(rs.decode, d2);
    assert_int_equal(rs.prefill, d2);
    static uint32_t cold[4096];
    seq(cold, 4096, 99);
    kvf_place_req rc = {.tokens = cold, .n_tokens = 4096};
    kvf_sched_place(s, &rc, &rs);
    assert_int_equal(rs.decode, d2);
    assert_int_equal(rs.prefill, p);
    assert_false(rs.colocated);
    /* A short suffix stays with the chosen prefill instance when the decode instance's own queue
     * costs more than the handoff saves. (It went to the decode instance whatever its queue,
     * overriding the placement policy for a sixth to a quarter of a replayed trace's requests.)
     * p holds the prefix too, and is idle; d2 has 40 s of prefill queued. */
    assert_int_equal(kvf_sched_block_stored(s, p, h, 250, 0, 0, t, 4000, 16, KVF_TIER_DEVICE), 0);
    kvf_instance_load swamped = {.queued_prefill_s = 40.0};
    kvf_sched_instance_load(s, d2, &swamped);
    kvf_sched_place(s, &rq, &rs);
    assert_int_equal(rs.decode, d2);
    assert_int_equal(rs.prefill, p);
    assert_false(rs.colocated);
    assert_true(rs.expected_ttft_s < 1.0);
    kvf_sched_destroy(&s);
}

/* A long suffix goes to an idle decode instance when the prefill instance is queued deeper than
 * the prefill costs there (decode_overflow), never when the prefill tier is idle or the rule is
 * off. */
static void test_sched_decode_overflow(void **state)
{
    (void)state;
    for (int on = 0; on <= 1; on++) {
        kvf_sched_opts o = {.policy = KVF_POLICY_KVF_COST};
        kvf_sched_cost_defaults(&o.cost);
        assert_int_equal(o.cost.decode_overflow, 1);
        o.cost.decode_overflow = (uint32_t)on;
        kvf_sched *s;
        assert_int_equal(sched_new(&s, &o), 0);
        int p = add(s, "p", KVF_ROLE_PREFILL, 16, 100000);
        int d = add(s, "d", KVF_ROLE_DECODE, 16, 100000);
        static uint32_t t[4096];
        seq(t, 4096, 7);
        kvf_place_req rq = {.tokens = t, .n_tokens = 4096};
        kvf_place_res rs;
        /* Idle prefill tier: the prefill instance, with a handoff. */
        kvf_sched_place(s, &rq, &rs);
        assert_int_equal(rs.prefill, p);
        assert_int_equal(rs.decode, d);
        /* The prefill instance has 0.3 s queued, less than this prompt's ~0.41 s of prefill
         * (4096 tokens at 10k/s plus attention): it still goes there. */
        kvf_instance_load some = {.queued_prefill_s = 0.3};
        kvf_instance_load idle = {0};
        kvf_sched_instance_load(s, p, &some);
        kvf_sched_instance_load(s, d, &idle);
        kvf_sched_place(s, &rq, &rs);
        assert_int_equal(rs.prefill, p);
        /* 5 s queued: the decode instance prefills it when the rule is on. */
        kvf_instance_load deep = {.queued_prefill_s = 5.0};
        kvf_sched_instance_load(s, p, &deep);
        kvf_sched_instance_load(s, d, &idle);
        kvf_sched_place(s, &rq, &rs);
        assert_int_equal(rs.decode, d);
        assert_int_equal(rs.prefill, on ? d : p);
        assert_int_equal(rs.colocated, on);
        assert_true(on ? rs.expected_ttft_s < 1.0 : rs.expected_ttft_s > 5.0);
        /* The decode instance queued as deep: no gain, the prefill instance again. */
        kvf_sched_instance_load(s, p, &deep);
        kvf_sched_instance_load(s, d, &deep);
        kvf_sched_place(s, &rq, &rs);
        assert_int_equal(rs.prefill, p);
        kvf_sched_destroy(&s);
    }
    /* A burst before any load report: what place() sent counts in seconds, attention included
     * (prompts of 4096 tokens cost 0.88 s each here, of which 0.04 s linear): the third long
     * prompt finds both prefill instances queued deeper than its own prefill and overflows to
     * the idle decode instance. Counted in tokens at the linear rate alone, the queues looked
     * 0.04 s deep and it did not. */
    kvf_sched_opts bo = {.policy = KVF_POLICY_KVF_COST};
    kvf_sched_cost_defaults(&bo.cost);
    bo.cost.prefill_tokens_per_s = 1e5;
    bo.cost.prefill_attn_s_per_tok2 = 1e-7;
    kvf_sched *bs;
    assert_int_equal(sched_new(&bs, &bo), 0);
    int p1 = add(bs, "p1", KVF_ROLE_PREFILL, 16, 100000);
    int p2 = add(bs, "p2", KVF_ROLE_PREFILL, 16, 100000);
    int dd = add(bs, "d", KVF_ROLE_DECODE, 16, 100000);
    int placed[3];
    for (int k = 0; k < 3; k++) {
        static uint32_t lp[4096];
        seq(lp, 4096, 500 + (uint32_t)k);
        kvf_place_req lr = {.tokens = lp, .n_tokens = 4096};
        kvf_place_res lres;
        assert_int_equal(kvf_sched_place(bs, &lr, &lres), 0);
        placed[k] = lres.prefill;
    }
    assert_true((placed[0] == p1 && placed[1] == p2) || (placed[0] == p2 && placed[1] == p1));
    assert_int_equal(placed[2], dd);
    kvf_sched_destroy(&bs);

    /* Engines sharing a host's cores: a decode engine's prefill is priced at the slowdown that
     * sharing brings. Two prefill engines 1.5 s deep: on 4 cores the decode engine's 0.88 s
     * prefill saves more than it lasts; on 2 cores it would run at 2/3 speed (1.32 s) and save
     * 1.08 s: not worth it. 5 s deep, worth it even there. */
    for (uint32_t cores = 2; cores <= 4; cores += 2) {
        assert_int_equal(sched_new(&bs, &bo), 0);
        int ix[3];
        for (int k = 0; k < 3; k++) {
            kvf_instance_info in;
            memset(&in, 0, sizeof in);
            snprintf(in.id, sizeof in.id, "e%d", k);
            in.role = k < 2 ? KVF_ROLE_PREFILL : KVF_ROLE_DECODE;
            in.block_tokens = 16;
            in.capacity_blocks = 100000;
            snprintf(in.compute, sizeof in.compute, "cpu@host");
            in.compute_slots = cores;
            in.compute_uses = 1;
            assert_int_equal(kvf_sched_instance_add(bs, &in, &ix[k]), 0);
        }
        for (int deep_s = 0; deep_s < 2; deep_s++) {
            kvf_instance_load deep2 = {.queued_prefill_tokens = 8192,
                                       .queued_prefill_s = deep_s ? 5.0 : 1.5};
            kvf_instance_load none = {0};
            kvf_sched_instance_load(bs, ix[0], &deep2);
            kvf_sched_instance_load(bs, ix[1], &deep2);
            kvf_sched_instance_load(bs, ix[2], &none);
            static uint32_t lp[4096];
            seq(lp, 4096, 900 + (uint32_t)deep_s);
            kvf_place_req lr = {.tokens = lp, .n_tokens = 4096};
            kvf_place_res lres;
            assert_int_equal(kvf_sched_place(bs, &lr, &lres), 0);
            assert_int_equal(lres.decode, ix[2]);
            assert_int_equal(lres.prefill, cores == 2 && !deep_s ? ix[0] : ix[2]);
            if (cores != 2 || deep_s)
                continue;
            /* The SLO rescue: through the prefill tier this prompt's TTFT is about 2.4 s (1.5 s
             * queued, 0.88 s of prefill, the handoff); on the idle decode engine, priced at the
             * slowdown, 1.32 s. An objective of 2 s that the one misses and the other meets
             * sends it to the decode engine; one of 1 s that both miss, or of 3 s that both
             * meet, leaves it with the prefill tier. */
            const double slo[] = {2.0, 1.0, 3.0};
            for (int k = 0; k < 3; k++) {
                kvf_sched_instance_load(bs, ix[0], &deep2);
                kvf_sched_instance_load(bs, ix[1], &deep2);
                kvf_sched_instance_load(bs, ix[2], &none);
                lr.slo_ttft_s = slo[k];
                assert_int_equal(kvf_sched_place(bs, &lr, &lres), 0);
                assert_int_equal(lres.decode, ix[2]);
                assert_int_equal(lres.prefill, k == 0 ? ix[2] : ix[0]);
                /* rescued, its estimate is the decode engine's, at the slowdown: 0.88 x 1.5 */
                if (k == 0)
                    assert_true(lres.expected_ttft_s > 1.2 && lres.expected_ttft_s < 1.45);
            }
            /* Only onto spare time: a decode engine with prefill work of its own queued (0.2 s,
             * so that it would still meet the objective) is not given the rescue. */
            kvf_instance_load some = {.queued_prefill_tokens = 512, .queued_prefill_s = 0.2};
            kvf_sched_instance_load(bs, ix[0], &deep2);
            kvf_sched_instance_load(bs, ix[1], &deep2);
            kvf_sched_instance_load(bs, ix[2], &some);
            lr.slo_ttft_s = 2.0;
            assert_int_equal(kvf_sched_place(bs, &lr, &lres), 0);
            assert_int_equal(lres.prefill, ix[0]);
        }
        kvf_sched_destroy(&bs);
    }

    /* The cost file sets it, 0 or 1 only. */
    kvf_sched_cost c;
    kvf_sched_cost_defaults(&c);
    char path[] = "/tmp/kvf_test_overflow_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *j = "{\"decode_overflow\": 0, \"load_deadline_base_s\": 0.05, "
                    "\"load_deadline_s_per_ktok\": 0.01, \"remote_load_bytes_per_s\": 1.25e9}";
    assert_int_equal(write(fd, j, strlen(j)), (ssize_t)strlen(j));
    close(fd);
    char err[256];
    assert_int_equal(kvf_sched_cost_load(path, &c, err, sizeof err), 0);
    assert_int_equal(c.decode_overflow, 0);
    assert_true(c.load_deadline_base_s == 0.05 && c.load_deadline_s_per_ktok == 0.01);
    assert_true(c.remote_load_bytes_per_s == 1.25e9);
    fd = open(path, O_WRONLY | O_TRUNC);
    j = "{\"decode_overflow\": 2}";
    assert_int_equal(write(fd, j, strlen(j)), (ssize_t)strlen(j));
    close(fd);
    assert_int_not_equal(kvf_sched_cost_load(path, &c, err, sizeof err), 0);
    assert_non_null(strstr(err, "decode_overflow"));
    unlink(path);
}

/* An instance that prefills and decodes, in blocks of 16 tokens, with the reference engine's
 * capabilities. */
static kvf_instance_info both_instance(const char *id)
{
    kvf_instance_info in;
    memset(&in, 0, sizeof in);
    snprintf(in.id, sizeof in.id, "%s", id);
    in.role = KVF_ROLE_BOTH;
    in.block_tokens = 16;
    in.capacity_blocks = 100000;
    return in;
}

/* A chunk is held while either tier of a node holds it; chunks only a disk tier holds load at the
 * disks' rate: the default until a node publishes its measured one, never above the network's. */
static void test_sched_store_tiers(void **state)
{
    (void)state;
    kvf_sched *s = new_sched(KVF_POLICY_KVF_COST);
    kvf_instance_info in = both_instance("cpu");
    int c;
    assert_int_equal(kvf_sched_instance_add(s, &in, &c), 0);
    static uint32_t t[1024];
    seq(t, 1024, 3);
    kvf_key keys[4];
    for (int i = 0; i < 4; i++)
        keys[i] = (kvf_key){.lo = (uint64_t)i + 500, .hi = 9};
    kvf_sched_cost dc;
    kvf_sched_cost_defaults(&dc);
    double kvb = dc.kv_bytes_per_token, net = dc.load_bytes_per_s;
    kvf_place_req rq = {.tokens = t, .n_tokens = 1024, .chunk_keys = keys, .n_chunks = 4};
    kvf_place_res rs;
    assert_int_equal(kvf_sched_store_chunks(s, 0, keys, 4, 1, 0), 0);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.cached_store, 1024);
    assert_true(fabs(rs.load_s - 1024 * kvb / net) < 1e-9);
    /* chunks 2 and 3 demoted: off DRAM, then on disk */
    assert_int_equal(kvf_sched_store_chunks(s, 0, keys + 2, 2, 0, 0), 0);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.cached_store, 512);
    assert_int_equal(kvf_sched_store_chunks(s, 0, keys + 2, 2, 1, 1), 0);
    kvf_index_stats ix;
    kvf_sched_index_stats(s, &ix);
    assert_int_equal(ix.store_dram_chunks, 2);
    assert_int_equal(ix.store_disk_chunks, 2);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.cached_store, 1024);
    assert_true(fabs(rs.load_s - (512 * kvb / net + 512 * kvb / dc.disk_load_bytes_per_s)) < 1e-9);
    /* the node's measured rate replaces the default; a later one is averaged with it */
    assert_int_equal(kvf_sched_store_rates(s, 0, 1e9), 0);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_true(fabs(rs.load_s - (512 * kvb / net + 512 * kvb / 1e9)) < 1e-9);
    assert_int_equal(kvf_sched_store_rates(s, 0, 3e9), 0);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_true(fabs(rs.load_s - (512 * kvb / net + 512 * kvb / 2e9)) < 1e-9);
    /* several nodes: their mean */
    assert_int_equal(kvf_sched_store_rates(s, 1, 4e9), 0);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_true(fabs(rs.load_s - (512 * kvb / net + 512 * kvb / 3e9)) < 1e-9);
    /* a disk faster than the network loads at the network's rate */
    for (int i = 0; i < 8; i++)
        assert_int_equal(kvf_sched_store_rates(s, 0, 1e12), 0);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_true(fabs(rs.load_s - 1024 * kvb / net) < 1e-6);
    assert_int_equal(kvf_sched_store_rates(s, 0, 0), KVF_EINVAL);
    assert_int_equal(kvf_sched_store_rates(s, KVF_SCHED_MAX_STORES, 1e9), KVF_EINVAL);
    /* promoted again: both tiers; its DRAM copy evicted: still held, on disk */
    assert_int_equal(kvf_sched_store_chunks(s, 0, keys + 2, 1, 1, 0), 0);
    assert_int_equal(kvf_sched_store_chunks(s, 0, keys + 2, 1, 0, 0), 0);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.cached_store, 1024);
    /* dropped from disk (its extent reused): the run ends before it */
    assert_int_equal(kvf_sched_store_chunks(s, 0, keys + 2, 1, 0, 1), 0);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.cached_store, 512);
    assert_true(fabs(rs.load_s - 512 * kvb / net) < 1e-9);
    /* evicting what a tier does not hold changes nothing */
    assert_int_equal(kvf_sched_store_chunks(s, 0, keys + 2, 1, 0, 1), 0);
    kvf_sched_index_stats(s, &ix);
    assert_int_equal(ix.store_dram_chunks, 2);
    assert_int_equal(ix.store_disk_chunks, 1);
    assert_int_equal(ix.holdings, 3);
    /* another node's chunk, then node 0 forgotten whole (before its snapshot): node 1 stays */
    assert_int_equal(kvf_sched_store_chunks(s, 1, keys, 1, 1, 1), 0);
    assert_int_equal(kvf_sched_store_cleared(s, 0), 0);
    kvf_sched_index_stats(s, &ix);
    assert_int_equal(ix.store_dram_chunks, 0);
    assert_int_equal(ix.store_disk_chunks, 1);
    assert_int_equal(ix.holdings, 1);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.cached_store, 256);
    assert_int_equal(kvf_sched_store_cleared(s, KVF_SCHED_MAX_STORES), KVF_EINVAL);
    kvf_sched_destroy(&s);
}

/* The sources of a planned load: each chunk from the nearest node holding it (on the engine's
 * host, then in its zone, then elsewhere; DRAM before disk only at the same nearness; then the
 * lowest node), in runs; a node that left is never named. */
/* Zone-priced loads (cost.remote_load_bytes_per_s): an instance whose zone holds none of the
 * prefix pays the remote rate for it, so kvf_cost weighs a queue in the prefix's zone against a
 * transfer from another; without the rate, or for an instance without a zone, every load is
 * priced at load_bytes_per_s, as before. */
static void test_sched_zone_priced_loads(void **state)
{
    (void)state;
    for (int priced = 0; priced < 2; priced++) {
        kvf_sched_opts o = {.policy = KVF_POLICY_KVF_COST};
        kvf_sched_cost_defaults(&o.cost);
        if (priced)
            o.cost.remote_load_bytes_per_s = o.cost.load_bytes_per_s / 10;
        kvf_sched *s;
        assert_int_equal(sched_new(&s, &o), 0);
        kvf_instance_info a = both_instance("in-za"), b = both_instance("in-zb");
        snprintf(a.endpoint, sizeof a.endpoint, "http://10.0.1.5:8000");
        snprintf(a.zone, sizeof a.zone, "za");
        snprintf(b.endpoint, sizeof b.endpoint, "http://10.0.2.5:8000");
        snprintf(b.zone, sizeof b.zone, "zb");
        int ia, ib;
        assert_int_equal(kvf_sched_instance_add(s, &a, &ia), 0);
        assert_int_equal(kvf_sched_instance_add(s, &b, &ib), 0);
        assert_int_equal(kvf_sched_store_where(s, 0, "10.0.1.9:7000", "za"), 0);
        assert_int_equal(kvf_sched_store_where(s, 1, "10.0.2.9:7000", "zb"), 0);
        static uint32_t t[4096];
        seq(t, 4096, 21);
        kvf_key keys[16];
        for (int i = 0; i < 16; i++)
            keys[i] = (kvf_key){.lo = (uint64_t)i + 3100, .hi = 91};
        /* the prefix's 16 chunks (4,096 tokens) on node 0 only, in zone za */
        assert_int_equal(kvf_sched_store_chunks(s, 0, keys, 16, 1, 0), 0);
        /* za's instance has a queue worth more than loading the prefix at load_bytes_per_s and
         * less than loading it at the remote rate */
        double local_s = 4096 * o.cost.kv_bytes_per_token / o.cost.load_bytes_per_s;
        kvf_instance_load q = {.queued_prefill_tokens =
                                   3.0 * local_s * o.cost.prefill_tokens_per_s};
        kvf_instance_load idle = {0};
        kvf_place_req rq = {.tokens = t, .n_tokens = 4096, .chunk_keys = keys, .n_chunks = 16};
        kvf_place_res rs;
        kvf_sched_instance_load(s, ia, &q);
        kvf_sched_instance_load(s, ib, &idle);
        assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
        assert_int_equal(rs.cached_store, 4096);
        printf("remote rate %s: placed on %s, load %.1f ms\n", priced ? "set" : "unset",
               rs.prefill == ia ? "za" : "zb", rs.load_s * 1e3);
        if (!priced) {
            assert_int_equal(rs.prefill, ib); /* the shorter queue: every load costs the same */
        } else {
            assert_int_equal(rs.prefill, ia); /* the prefix's zone: its queue beats the link */
            assert_true(fabs(rs.load_s - local_s) < 1e-9);
            /* za much busier: zb after all, its load priced at the remote rate (and the plan's
             * deadline with it) */
            q.queued_prefill_tokens *= 100;
            kvf_sched_instance_load(s, ia, &q);
            kvf_sched_instance_load(s, ib, &idle);
            assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
            assert_int_equal(rs.prefill, ib);
            assert_true(fabs(rs.load_s - 10 * local_s) < 1e-9);
            assert_true(rs.load_deadline_s >= 2 * rs.load_s);
            /* a replica of the first half in zb: only the second half is remote for zb */
            assert_int_equal(kvf_sched_store_chunks(s, 1, keys, 8, 1, 0), 0);
            kvf_sched_instance_load(s, ib, &idle);
            assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
            assert_int_equal(rs.prefill, ib);
            assert_true(fabs(rs.load_s - 5.5 * local_s) < 1e-9);
            /* an instance without a zone: not priced */
            kvf_instance_info c = both_instance("in-nozone");
            snprintf(c.endpoint, sizeof c.endpoint, "http://10.0.3.5:8000");
            int ic;
            assert_int_equal(kvf_sched_instance_add(s, &c, &ic), 0);
            kvf_sched_instance_load(s, ib, &q);
            kvf_sched_instance_load(s, ic, &idle);
            assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
            assert_int_equal(rs.prefill, ic);
            assert_true(fabs(rs.load_s - local_s) < 1e-9);
            /* chunks only a disk tier holds load at the disk's rate, never also as remote: a
             * prompt whose first half is in za's DRAM and second half on zb's disk only */
            kvf_key k2[16];
            for (int i = 0; i < 16; i++)
                k2[i] = (kvf_key){.lo = (uint64_t)i + 5100, .hi = 92};
            assert_int_equal(kvf_sched_store_chunks(s, 0, k2, 8, 1, 0), 0);
            assert_int_equal(kvf_sched_store_chunks(s, 1, k2 + 8, 8, 1, 1), 0);
            static uint32_t t2[4096];
            seq(t2, 4096, 22);
            kvf_place_req rq2 = {.tokens = t2, .n_tokens = 4096, .chunk_keys = k2, .n_chunks = 16};
            kvf_sched_instance_load(s, ia, &idle);
            kvf_sched_instance_load(s, ib, &q);
            kvf_sched_instance_load(s, ic, &q);
            assert_int_equal(kvf_sched_place(s, &rq2, &rs), 0);
            assert_int_equal(rs.prefill, ia);
            double want =
                local_s / 2 + 2048 * o.cost.kv_bytes_per_token / o.cost.disk_load_bytes_per_s;
            assert_true(fabs(rs.load_s - want) < 1e-9);
        }
        kvf_sched_destroy(&s);
    }
}

static void test_sched_nearest_replica(void **state)
{
    (void)state;
    char h[64];
    const char *hosts[][2] = {{"http://LocalHost:80/x", "127.0.0.1"},
                              {"[::1]:7000", "127.0.0.1"},
                              {"127.3.4.5:9", "127.0.0.1"},
                              {"[fe80::1]:7", "fe80::1"},
                              {"fe80::2", "fe80::2"},
                              {"10.0.0.1", "10.0.0.1"},
                              {"tcp://H.example:5", "h.example"},
                              {"", ""}};
    for (size_t i = 0; i < sizeof hosts / sizeof hosts[0]; i++) {
        kvf_sched_host_of(hosts[i][0], h, sizeof h);
        assert_string_equal(h, hosts[i][1]);
    }
    kvf_sched *s = new_sched(KVF_POLICY_KVF_COST);
    kvf_instance_info in = both_instance("eng");
    snprintf(in.endpoint, sizeof in.endpoint, "http://10.0.0.5:8000");
    snprintf(in.zone, sizeof in.zone, "z1");
    int c;
    assert_int_equal(kvf_sched_instance_add(s, &in, &c), 0);
    assert_int_equal(kvf_sched_store_where(s, 0, "10.0.0.9:7000", "z2"), 0);
    assert_int_equal(kvf_sched_store_where(s, 1, "10.0.0.7:7000", "z1"), 0);
    assert_int_equal(kvf_sched_store_where(s, 2, "10.0.0.5:7001", NULL), 0);
    /* node 3: nowhere known */
    assert_string_equal(kvf_sched_store_addr(s, 1), "10.0.0.7:7000");
    assert_string_equal(kvf_sched_store_addr(s, 3), "");
    assert_int_equal(kvf_sched_store_where(s, KVF_SCHED_MAX_STORES, "a:1", NULL), KVF_EINVAL);
    char big[300];
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = 0;
    assert_int_equal(kvf_sched_store_where(s, 4, big, NULL), KVF_EINVAL);

    static uint32_t t[2048];
    seq(t, 2048, 11);
    kvf_key keys[8];
    for (int i = 0; i < 8; i++)
        keys[i] = (kvf_key){.lo = (uint64_t)i + 900, .hi = 77};
    /* node 0: all, chunk 5 on disk only; node 1: 0-3; node 2: 2-3 on disk only; node 3: 4-5 */
    assert_int_equal(kvf_sched_store_chunks(s, 0, keys, 5, 1, 0), 0);
    assert_int_equal(kvf_sched_store_chunks(s, 0, keys + 5, 1, 1, 1), 0);
    assert_int_equal(kvf_sched_store_chunks(s, 0, keys + 6, 2, 1, 0), 0);
    assert_int_equal(kvf_sched_store_chunks(s, 1, keys, 4, 1, 0), 0);
    assert_int_equal(kvf_sched_store_chunks(s, 2, keys + 2, 2, 1, 1), 0);
    assert_int_equal(kvf_sched_store_chunks(s, 3, keys + 4, 2, 1, 0), 0);
    kvf_place_req rq = {.tokens = t, .n_tokens = 2048, .chunk_keys = keys, .n_chunks = 8};
    kvf_place_res rs;
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.cached_store, 2048);
    const kvf_store_source want[] = {{1, KVF_NEAR_ZONE, 0, 0, 512},
                                     {2, KVF_NEAR_HOST, 1, 512, 512},
                                     {0, KVF_NEAR_REMOTE, 0, 1024, 256},
                                     {3, KVF_NEAR_REMOTE, 0, 1280, 256},
                                     {0, KVF_NEAR_REMOTE, 0, 1536, 512}};
    assert_int_equal(rs.n_sources, 5);
    assert_false(rs.sources_truncated);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(rs.sources[i].node, want[i].node);
        assert_int_equal(rs.sources[i].near, want[i].near);
        assert_int_equal(rs.sources[i].disk_only, want[i].disk_only);
        assert_int_equal(rs.sources[i].from, want[i].from);
        assert_int_equal(rs.sources[i].tokens, want[i].tokens);
    }
    assert_string_equal(kvf_near_name(KVF_NEAR_ZONE), "zone");
    /* node 2 gone (its lease lapsed): chunks 0-3 from node 1, in one run */
    assert_int_equal(kvf_sched_store_cleared(s, 2), 0);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.n_sources, 4);
    assert_int_equal(rs.sources[0].node, 1);
    assert_int_equal(rs.sources[0].tokens, 1024);
    /* node 1's place forgotten: every node is as far, so the lowest holding each chunk */
    assert_int_equal(kvf_sched_store_where(s, 1, NULL, NULL), 0);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.n_sources, 3);
    assert_int_equal(rs.sources[0].node, 0);
    assert_int_equal(rs.sources[0].tokens, 1280);
    assert_int_equal(rs.sources[1].node, 3);
    assert_int_equal(rs.sources[2].node, 0);
    /* an instance whose record names its host: node 0's host is its own */
    snprintf(in.host, sizeof in.host, "10.0.0.9");
    assert_int_equal(kvf_sched_instance_add(s, &in, &c), 0);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.n_sources, 1);
    assert_int_equal(rs.sources[0].node, 0);
    assert_int_equal(rs.sources[0].near, KVF_NEAR_HOST);
    assert_int_equal(rs.sources[0].tokens, 2048);
    /* a prefix the instance holds itself is not loaded: the sources start after it */
    assert_int_equal(kvf_sched_store_cleared(s, 0), 0);
    assert_int_equal(kvf_sched_store_chunks(s, 1, keys + 4, 4, 1, 0), 0);
    uint64_t eh[32];
    for (int i = 0; i < 32; i++)
        eh[i] = 5000 + (uint64_t)i;
    assert_int_equal(kvf_sched_block_stored(s, c, eh, 32, 0, 0, t, 512, 16, KVF_TIER_DEVICE), 0);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.cached_device, 512);
    assert_int_equal(rs.cached_store, 1536);
    assert_int_equal(rs.n_sources, 1);
    assert_int_equal(rs.sources[0].node, 1);
    assert_int_equal(rs.sources[0].tokens, 1536);
    /* more runs than a plan lists: the first KVF_PLAN_MAX_SOURCES, and the rest said to be there */
    static uint32_t t2[256 * 20];
    seq(t2, 256 * 20, 40000);
    kvf_key k2[20];
    for (int i = 0; i < 20; i++) {
        k2[i] = (kvf_key){.lo = (uint64_t)i + 7000, .hi = 78};
        assert_int_equal(kvf_sched_store_chunks(s, 5 + i % 2, &k2[i], 1, 1, 0), 0);
    }
    kvf_place_req rq2 = {.tokens = t2, .n_tokens = 256 * 20, .chunk_keys = k2, .n_chunks = 20};
    assert_int_equal(kvf_sched_place(s, &rq2, &rs), 0);
    assert_int_equal(rs.n_sources, KVF_PLAN_MAX_SOURCES);
    assert_true(rs.sources_truncated);
    for (int i = 0; i < KVF_PLAN_MAX_SOURCES; i++)
        assert_int_equal(rs.sources[i].node, 5 + i % 2);
    /* without stores, no load and no source */
    kvf_sched_set_no_stores(s, 1);
    assert_int_equal(kvf_sched_place(s, &rq2, &rs), 0);
    assert_int_equal(rs.n_sources, 0);
    /* a host or zone that does not fit its field is refused */
    memset(in.zone, 'z', sizeof in.zone);
    assert_int_equal(kvf_sched_instance_add(s, &in, NULL), KVF_EINVAL);
    kvf_sched_destroy(&s);
}

/* Plans carry the classifier's labels; an instance that cannot load from the store gets no
 * credit for what the store holds. */
static void test_sched_plans_are_classified(void **state)
{
    (void)state;
    kvf_sched *s = new_sched(KVF_POLICY_KVF_COST);
    kvf_instance_info in = both_instance("gpu");
    /* vLLM's record: KV in CUDA memory, which this build's transfer path cannot reach. */
    snprintf(in.capabilities, sizeof in.capabilities, "{\"base\":\"vllm\"}");
    int g;
    assert_int_equal(kvf_sched_instance_add(s, &in, &g), 0);
    static uint32_t t[1024];
    seq(t, 1024, 1);
    kvf_key keys[4];
    for (int i = 0; i < 4; i++) {
        keys[i].lo = (uint64_t)i + 100;
        keys[i].hi = 7;
    }
    assert_int_equal(kvf_sched_store_chunks(s, 0, keys, 4, 1, 0), 0);
    kvf_place_req rq = {.tokens = t, .n_tokens = 1024, .chunk_keys = keys, .n_chunks = 4};
    kvf_place_res rs;
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.prefill, g);
    assert_int_equal(rs.cached_store, 0);
    assert_true(rs.load_deadline_s == 0); /* nothing to load: no deadline */
    int saw_save = 0;
    for (int i = 0; i < rs.n_actions; i++) {
        if (rs.actions[i].kind == KVF_ACT_SAVE_TO_STORE) {
            saw_save = 1;
            assert_int_equal(rs.actions[i].label, KVF_LABEL_BACKEND_INFEASIBLE);
        }
        if (rs.actions[i].kind == KVF_ACT_PREFILL)
            assert_int_equal(rs.actions[i].label, KVF_LABEL_REAL);
    }
    assert_true(saw_save);
    /* The reference engine's record: the store's 1024 tokens count (up to the last token). */
    memset(in.capabilities, 0, sizeof in.capabilities);
    snprintf(in.id, sizeof in.id, "cpu");
    int c;
    assert_int_equal(kvf_sched_instance_add(s, &in, &c), 0);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.prefill, c);
    assert_int_equal(rs.cached_store, 1024);
    /* The planned load's deadline: the base, plus twice a thousand tokens' load time at the
     * cost model's bandwidth per thousand tokens (0.2 s + 2 x 10.5 ms x 1.024). */
    kvf_sched_cost dc;
    kvf_sched_cost_defaults(&dc);
    double per_ktok = 2.0 * 1000.0 * dc.kv_bytes_per_token / dc.load_bytes_per_s;
    assert_true(fabs(rs.load_deadline_s - (0.2 + per_ktok * 1.024)) < 1e-9);
    /* The KV cannot be handed to the CUDA-memory instance: it decodes where it was prefilled. */
    assert_int_equal(rs.decode, c);
    for (int i = 0; i < rs.n_actions; i++)
        assert_int_equal(rs.actions[i].label, KVF_LABEL_REAL);
    /* A record that does not parse is refused at registration. */
    snprintf(in.id, sizeof in.id, "bad");
    snprintf(in.capabilities, sizeof in.capabilities, "{\"base\":\"nonesuch\"}");
    assert_int_equal(kvf_sched_instance_add(s, &in, NULL), KVF_EINVAL);
    kvf_sched_destroy(&s);
}

/* The waiting-queue rule: within the oldest k, the least work (or the longest cached prefix),
 * and every k-th pick the oldest, so nothing waits behind more than k later arrivals. */
static void test_sched_queue_pick(void **state)
{
    (void)state;
    kvf_sched_cost c;
    kvf_sched_cost_defaults(&c);
    assert_int_equal(c.queue_by_work, 1);
    c.klpm_k = 4;
    /* Oldest first; the fifth is outside the window of 4 (it would win on either criterion). */
    const size_t cached[] = {10, 900, 20, 5, 9000};
    const double work[] = {3.0, 1.0, 0.5, 0.7, 0.05};
    assert_int_equal(kvf_sched_queue_pick(&c, cached, work, 5, 0), 2); /* least work in window */
    assert_int_equal(kvf_sched_queue_pick(&c, cached, work, 5, 3), 0); /* the k-th: the oldest */
    assert_int_equal(kvf_sched_queue_pick(&c, cached, work, 5, 7), 0);
    c.queue_by_work = 0;
    assert_int_equal(kvf_sched_queue_pick(&c, cached, work, 5, 1), 1); /* k-LPM: longest prefix */
    c.klpm_k = 0;
    assert_int_equal(kvf_sched_queue_pick(&c, cached, work, 5, 1), 0); /* FIFO */
    c.klpm_k = 4;
    assert_int_equal(kvf_sched_queue_pick(&c, cached, work, 1, 1), 0);
    assert_int_equal(kvf_sched_queue_pick(&c, NULL, NULL, 0, 1), 0);
    /* Starvation bound: with a stream of ever-shorter arrivals, the oldest still runs within k
     * picks. */
    c.queue_by_work = 1;
    double w[4];
    size_t cc[4] = {0};
    int oldest_ran = 0;
    for (uint64_t pick = 0; pick < 4 && !oldest_ran; pick++) {
        for (int i = 0; i < 4; i++)
            w[i] = i == 0 ? 100.0 : 1.0 / (double)(pick * 4 + (uint64_t)i + 1);
        oldest_ran = kvf_sched_queue_pick(&c, cc, w, 4, pick) == 0;
    }
    assert_true(oldest_ran);
}

/* Each discipline of the table orders by its own key within the same window and fairness rule;
 * a discipline reads only what kvf_queue_reads() names (the others' arrays are NULL here, so a
 * read outside it would crash); the compatible kvf_sched_queue_pick is the table's work or lpm. */
static void test_sched_queue_disciplines(void **state)
{
    (void)state;
    /* Oldest first. Fewest tokens: 1; least work: 2; longest cached prefix: 3; the fifth would
     * win every key but lies outside a window of 4. */
    const size_t tokens[] = {9000, 100, 8000, 7000, 1};
    const size_t cached[] = {0, 0, 7000, 7950, 9000};
    const double work[] = {0.9, 0.01, 0.005, 0.02, 0.0};
    /* Response ratios (waited + work) / work: 2, 3, 1, 3.5 and (0.01 + 0.001) / 0.001 = 11 (work
     * under a millisecond counts as one): the highest of the four is 3's, and the fifth's beyond.
     */
    const double waited[] = {0.9, 0.02, 0.0, 0.05, 0.01};
    kvf_queue_view all = {
        .n = 5, .tokens = tokens, .cached = cached, .work_s = work, .waited_s = waited};
    const struct {
        kvf_queue q;
        unsigned reads;
        size_t pick;
    } want[] = {
        {KVF_QUEUE_FIFO, 0, 0},
        {KVF_QUEUE_WORK, KVF_QUEUE_READS_WORK, 2},
        {KVF_QUEUE_SJF, KVF_QUEUE_READS_TOKENS, 1},
        {KVF_QUEUE_LPM, KVF_QUEUE_READS_CACHED, 3},
        {KVF_QUEUE_HRRN, KVF_QUEUE_READS_WORK | KVF_QUEUE_READS_WAITED, 3},
    };
    assert_int_equal(sizeof want / sizeof want[0], KVF_QUEUE_COUNT_);
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        kvf_queue q = want[i].q;
        unsigned r = kvf_queue_reads(q);
        assert_int_equal(r, want[i].reads);
        kvf_queue_view only = {.n = 5,
                               .tokens = r & KVF_QUEUE_READS_TOKENS ? tokens : NULL,
                               .cached = r & KVF_QUEUE_READS_CACHED ? cached : NULL,
                               .work_s = r & KVF_QUEUE_READS_WORK ? work : NULL,
                               .waited_s = r & KVF_QUEUE_READS_WAITED ? waited : NULL};
        assert_int_equal(kvf_sched_queue_pick_by(q, 4, &only, 0), want[i].pick);
        assert_int_equal(kvf_sched_queue_pick_by(q, 4, &all, 0), want[i].pick);
        /* Every k-th pick the oldest; a window under 2 is arrival order. */
        assert_int_equal(kvf_sched_queue_pick_by(q, 4, &all, 3), 0);
        assert_int_equal(kvf_sched_queue_pick_by(q, 1, &all, 0), 0);
        assert_int_equal(kvf_sched_queue_pick_by(q, 0, &all, 0), 0);
        /* With a window of 5 the fifth is seen, and wins wherever it has a key. */
        assert_int_equal(kvf_sched_queue_pick_by(q, 5, &all, 0), q == KVF_QUEUE_FIFO ? 0 : 4);
        /* Names round-trip. */
        kvf_queue back;
        assert_int_equal(kvf_queue_parse(kvf_queue_name(q), &back), 0);
        assert_int_equal(back, q);
    }
    /* Equal keys go to the oldest. */
    const size_t same[] = {5, 5, 5};
    kvf_queue_view tie = {.n = 3, .tokens = same};
    assert_int_equal(kvf_sched_queue_pick_by(KVF_QUEUE_SJF, 8, &tie, 0), 0);
    kvf_queue_view none = {.n = 0};
    assert_int_equal(kvf_sched_queue_pick_by(KVF_QUEUE_WORK, 8, &none, 0), 0);
    assert_int_equal(kvf_sched_queue_pick_by(KVF_QUEUE_COUNT_, 8, &all, 0), 0);
    assert_int_equal(kvf_queue_reads(KVF_QUEUE_COUNT_), 0);
    kvf_queue q;
    assert_int_equal(kvf_queue_parse("edf", &q), KVF_EINVAL);
    assert_string_equal(kvf_queue_name(KVF_QUEUE_COUNT_), "?");
    /* The cost constants name a discipline: what the engine's --queue and calibration file set. */
    kvf_sched_cost c;
    kvf_sched_cost_defaults(&c);
    assert_int_equal(kvf_sched_cost_queue(&c), KVF_QUEUE_WORK);
    c.queue_by_work = 0;
    assert_int_equal(kvf_sched_cost_queue(&c), KVF_QUEUE_LPM);
    c.klpm_k = 1;
    assert_int_equal(kvf_sched_cost_queue(&c), KVF_QUEUE_FIFO);
    c.klpm_k = 4;
    c.queue_by_work = 1;
    assert_int_equal(kvf_sched_queue_pick(&c, cached, work, 5, 0), 2);
}

/* hrrn: work's order among requests that have waited as long; a long request that has waited
 * long enough for its ratio to pass a fresh short one's runs first; so a long prompt behind a
 * stream of slightly shorter ones runs after a bounded wait, where work starves it until the k-th
 * pick. */
static void test_sched_queue_hrrn(void **state)
{
    (void)state;
    const double work[] = {4.0, 1.0, 2.0};
    const double same[] = {0.5, 0.5, 0.5};
    kvf_queue_view v = {.n = 3, .work_s = work, .waited_s = same};
    assert_int_equal(kvf_sched_queue_pick_by(KVF_QUEUE_HRRN, 128, &v, 0), 1);
    const double long_wait[] = {3.0, 0.0, 0.0}; /* 1.75 against 1 and 1 */
    v.waited_s = long_wait;
    assert_int_equal(kvf_sched_queue_pick_by(KVF_QUEUE_HRRN, 128, &v, 0), 0);
    const double short_waited[] = {3.0, 1.0, 0.0}; /* 1.75 against 2 */
    v.waited_s = short_waited;
    assert_int_equal(kvf_sched_queue_pick_by(KVF_QUEUE_HRRN, 128, &v, 0), 1);
    /* Nothing left to compute (work 0) counts as a millisecond: its ratio is finite and a 2 s
     * request that waited 0.5 s (1.25) runs before a zero-work one that has not waited (1). */
    const double zw[] = {0.0, 2.0}, za[] = {0.0, 0.5};
    kvf_queue_view z = {.n = 2, .work_s = zw, .waited_s = za};
    assert_int_equal(kvf_sched_queue_pick_by(KVF_QUEUE_HRRN, 128, &z, 0), 1);
    /* A wait below zero counts as none: ratios 1 and 1, the oldest. */
    const double nw[] = {1.0, 2.0}, na[] = {-5.0, 0.0};
    kvf_queue_view neg = {.n = 2, .work_s = nw, .waited_s = na};
    assert_int_equal(kvf_sched_queue_pick_by(KVF_QUEUE_HRRN, 128, &neg, 0), 0);
    /* A 1 s request that came when a 0.9 s one started, against the next 0.9 s one, which came
     * 0.05 s before each pick: work passes it over every time (20 picks here, up to the window's
     * k-th); under hrrn its ratio grows with each pick it waits (1, then 1.9, against 1.06), and
     * it runs at the second. */
    for (int q = 0; q < 2; q++) {
        kvf_queue disc = q ? KVF_QUEUE_HRRN : KVF_QUEUE_WORK;
        int ran_at = -1;
        for (int pick = 0; pick < 20 && ran_at < 0; pick++) {
            const double w2[] = {1.0, 0.9};
            const double a2[] = {0.9 * pick, 0.05};
            kvf_queue_view s2 = {.n = 2, .work_s = w2, .waited_s = a2};
            if (kvf_sched_queue_pick_by(disc, 128, &s2, (uint64_t)pick) == 0)
                ran_at = pick;
        }
        if (disc == KVF_QUEUE_WORK)
            assert_int_equal(ran_at, -1);
        else
            assert_int_equal(ran_at, 1);
    }
}

static void test_sched_cost_file(void **state)
{
    (void)state;
    char path[] = "/tmp/kvf-cost-XXXXXX";
    int fd = mkstemp(path);
    const char *j = "{\"prefill_tokens_per_s\": 5000, \"klpm_k\": 4, \"queue_by_work\": 0}";
    assert_int_equal(write(fd, j, strlen(j)), (ssize_t)strlen(j));
    close(fd);
    kvf_sched_cost c;
    kvf_sched_cost_defaults(&c);
    char err[200];
    assert_int_equal(kvf_sched_cost_load(path, &c, err, sizeof err), 0);
    assert_true(c.prefill_tokens_per_s == 5000);
    assert_int_equal(c.klpm_k, 4);
    assert_int_equal(c.queue_by_work, 0);
    fd = open(path, O_WRONLY | O_TRUNC);
    const char *b = "{\"speed\": 1}";
    assert_int_equal(write(fd, b, strlen(b)), (ssize_t)strlen(b));
    close(fd);
    assert_int_equal(kvf_sched_cost_load(path, &c, err, sizeof err), KVF_EINVAL);
    assert_non_null(strstr(err, "speed"));
    unlink(path);
    kvf_policy pol;
    assert_int_equal(kvf_policy_parse("dynamo_cost", &pol), 0);
    assert_int_equal(pol, KVF_POLICY_DYNAMO_COST);
    assert_int_equal(kvf_policy_parse("random", &pol), KVF_EINVAL);
}

/* A prompt that no instance's whole KV memory can hold is refused (no instance can serve it),
 * not placed on the one with the most free memory; an instance whose record does not say its
 * memory is taken as able to. */
static void test_sched_prompt_beyond_every_instance(void **state)
{
    (void)state;
    kvf_sched *s = new_sched(KVF_POLICY_KVF_COST);
    int a = add(s, "a", KVF_ROLE_BOTH, 16, 64);   /* 1,024 tokens */
    (void)add(s, "p", KVF_ROLE_PREFILL, 16, 256); /* 4,096 tokens, prefill only */
    static uint32_t t[5000];
    seq(t, 5000, 1);
    kvf_place_req rq = {.tokens = t, .n_tokens = 2000, .output_tokens = 4};
    kvf_place_res rs;
    assert_int_equal(kvf_sched_place(s, &rq, &rs), KVF_ENOENT); /* p prefills, nobody decodes */
    rq.n_tokens = 5000;
    assert_int_equal(kvf_sched_place(s, &rq, &rs), KVF_ENOENT);
    rq.n_tokens = 1000, rq.output_tokens = 100; /* 1,100 > 1,024 on a */
    assert_int_equal(kvf_sched_place(s, &rq, &rs), KVF_ENOENT);
    rq.output_tokens = 16;
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.decode, a);
    int u = add(s, "u", KVF_ROLE_BOTH, 16, 0); /* memory not said */
    rq.n_tokens = 5000;
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.decode, u);
    kvf_sched_destroy(&s);
}

/* Among instances that only decode, the decode instance is the one decoding fewest sequences,
 * its memory in use a tie-breaker that weighs at most one decode; one whose free memory cannot
 * hold the request comes last. (Memory weighed first sent every decode of a burst to the instance
 * whose cache held less.) Instances that also prefill come after those, by free memory. */
static void test_sched_decode_choice(void **state)
{
    (void)state;
    kvf_sched_opts o = {.policy = KVF_POLICY_KVF_COST};
    kvf_sched_cost_defaults(&o.cost);
    o.cost.disagg_threshold_tokens = 0; /* the prefill instance prefills: the decode choice alone */
    o.cost.decode_overflow = 0;
    kvf_sched *s;
    assert_int_equal(sched_new(&s, &o), 0);
    int p = add(s, "p", KVF_ROLE_PREFILL, 16, 100000);
    int d1 = add(s, "d1", KVF_ROLE_DECODE, 16, 10000); /* 160,000 tokens */
    int d2 = add(s, "d2", KVF_ROLE_DECODE, 16, 10000);
    static uint32_t t[2048];
    seq(t, 2048, 901);
    kvf_place_req rq = {.tokens = t, .n_tokens = 2048, .output_tokens = 32};
    kvf_place_res rs;
    kvf_instance_load idle = {0};
    /* d1's cache holds 60% of its memory, d2's 5%: a burst of decodes alternates between them
     * (place() counts each decode it sends) instead of all going to d2. */
    kvf_instance_load l1 = {.used_blocks = 6000}, l2 = {.used_blocks = 500};
    kvf_sched_instance_load(s, p, &idle);
    kvf_sched_instance_load(s, d1, &l1);
    kvf_sched_instance_load(s, d2, &l2);
    int on[2] = {0, 0};
    for (int i = 0; i < 8; i++) {
        assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
        assert_int_equal(rs.prefill, p);
        assert_true(rs.decode == d1 || rs.decode == d2);
        on[rs.decode == d2]++;
    }
    assert_true(on[0] >= 3 && on[1] >= 3);
    /* Equal decodes: the emptier one. */
    l1.active_decodes = l2.active_decodes = 2;
    kvf_sched_instance_load(s, d1, &l1);
    kvf_sched_instance_load(s, d2, &l2);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.decode, d2);
    /* One decode fewer outweighs any share of memory in use... */
    l1.active_decodes = 1, l1.used_blocks = 9000;
    kvf_sched_instance_load(s, d1, &l1);
    kvf_sched_instance_load(s, d2, &l2);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.decode, d1);
    /* ...but not memory too short for the request beside what the instance holds. */
    l1.used_blocks = 9990; /* 160 tokens free */
    kvf_sched_instance_load(s, d1, &l1);
    kvf_sched_instance_load(s, d2, &l2);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.decode, d2);
    /* One whose capacity is not reported is taken as half full: after d2 (5% in use) at equal
     * decodes, before d1 at 90% (l1.used_blocks 9000 with one decode fewer than d1 had). */
    int u = add(s, "u", KVF_ROLE_DECODE, 16, 0);
    kvf_instance_load lu = {.active_decodes = 2};
    l1.used_blocks = 9000, l1.active_decodes = 2;
    kvf_sched_instance_load(s, d1, &l1);
    kvf_sched_instance_load(s, d2, &l2);
    kvf_sched_instance_load(s, u, &lu);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.decode, d2);
    kvf_sched_instance_load(s, d1, &l1);
    kvf_sched_instance_load(s, d2, &(kvf_instance_load){.used_blocks = 500, .active_decodes = 3});
    kvf_sched_instance_load(s, u, &lu);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.decode, u);
    assert_int_equal(kvf_sched_instance_remove(s, u), 0);
    /* An instance that only decodes before one that also prefills, whatever their memory; among
     * those that also prefill, the most free memory first (its cache evicts the least). */
    int b1 = add(s, "b1", KVF_ROLE_BOTH, 16, 1000000);
    int b2 = add(s, "b2", KVF_ROLE_BOTH, 16, 1000000);
    kvf_instance_load lb1 = {.used_blocks = 900000},
                      lb2 = {.used_blocks = 1000, .active_decodes = 3};
    kvf_sched_instance_load(s, d1, &l1);
    kvf_sched_instance_load(s, d2, &l2);
    kvf_sched_instance_load(s, b1, &lb1);
    kvf_sched_instance_load(s, b2, &lb2);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.decode, d2);
    assert_int_equal(kvf_sched_instance_remove(s, d1), 0);
    assert_int_equal(kvf_sched_instance_remove(s, d2), 0);
    kvf_sched_instance_load(s, b1, &lb1);
    kvf_sched_instance_load(s, b2, &lb2);
    assert_int_equal(kvf_sched_place(s, &rq, &rs), 0);
    assert_int_equal(rs.decode, b2);
    kvf_sched_destroy(&s);
}

/* First contact's window of stale live batches starts at the first live batch read after the
 * replay, however long after the replay that is; a batch past the replay's last, or any after
 * the window, ends it. */
static void test_contact_stale_window(void **state)
{
    (void)state;
    const uint64_t s = 1000000000ull;
    kvf_contact c = {.done = 1, .have = 1, .upto = 10, .skip_until_ns = 0};
    /* read 30 s after the replay: still the first live batches, a duplicate is skipped */
    assert_int_equal(kvf_contact_stale(&c, 7, 100 * s), 1);
    assert_int_equal(kvf_contact_stale(&c, 10, 101 * s), 1);
    /* the window (2 s from the first batch read) has passed: a low number is new (a restart) */
    assert_int_equal(kvf_contact_stale(&c, 3, 102 * s + 1), 0);
    assert_int_equal(c.have, 0);
    assert_int_equal(kvf_contact_stale(&c, 4, 102 * s + 2), 0);
    /* a batch beyond the replay ends the window at once */
    c = (kvf_contact){.done = 1, .have = 1, .upto = 10};
    assert_int_equal(kvf_contact_stale(&c, 11, 5 * s), 0);
    assert_int_equal(kvf_contact_stale(&c, 9, 5 * s + 1), 0);
    /* nothing replayed: nothing stale */
    c = (kvf_contact){.done = 1};
    assert_int_equal(kvf_contact_stale(&c, 0, s), 0);
}

int main(int argc, char **argv)
{
    vectors_path = argc > 1 ? argv[1] : NULL;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sched_index_matches_tokens_not_engine_hashes),
        cmocka_unit_test(test_sched_instance_remove),
        cmocka_unit_test(test_sched_index_grows),
        cmocka_unit_test(test_sched_events_both_encodings),
        cmocka_unit_test(test_sched_apply_in_slices),
        cmocka_unit_test(test_sched_replay_walk),
        cmocka_unit_test(test_sched_replay_debt),
        cmocka_unit_test(test_sched_replay_credit),
        cmocka_unit_test(test_sched_sequence_gaps),
        cmocka_unit_test(test_sched_sequence_extremes),
        cmocka_unit_test(test_sched_policies_on_a_hand_built_state),
        cmocka_unit_test(test_sched_conditional_disaggregation),
        cmocka_unit_test(test_sched_decode_overflow),
        cmocka_unit_test(test_sched_store_tiers),
        cmocka_unit_test(test_sched_nearest_replica),
        cmocka_unit_test(test_sched_zone_priced_loads),
        cmocka_unit_test(test_contact_stale_window),
        cmocka_unit_test(test_sched_prompt_beyond_every_instance),
        cmocka_unit_test(test_sched_plans_are_classified),
        cmocka_unit_test(test_sched_cost_file),
        cmocka_unit_test(test_sched_decode_choice),
        cmocka_unit_test(test_sched_queue_pick),
        cmocka_unit_test(test_sched_queue_disciplines),
        cmocka_unit_test(test_sched_queue_hrrn),
    };
    return cmocka_run_group_tests_name("sched", tests, NULL, NULL);
}

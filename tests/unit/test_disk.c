/*
 * The disk tier's storage engine (store/disk.c) on a real file through io_uring and O_DIRECT:
 * objects round-trip and survive a reopen; removals and clears survive it too; the log reuses its
 * oldest extent and a reopen rebuilds exactly what was indexed; bits flipped in the file are
 * misses, never wrong bytes; a writer killed with SIGKILL at random moments leaves only whole
 * objects (every one acknowledged by a flush present and exact); a failing device takes the tier
 * down with errors, not a crash. The files live beside the build (O_DIRECT needs a file system
 * that takes it; tmpfs does not, and is refused with the reason).
 */
#define _GNU_SOURCE
#include "disk.h"
#include "disk_int.h"
#include "tier.h"

#include "kvf/error.h"

#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#define MiB (1ull << 20)

static char g_path[512];

static kvf_key key_of(uint64_t i)
{
    return (kvf_key){.lo = i * 0x9E3779B97F4A7C15ull + 1, .hi = i ^ 0xabcdef};
}

/* An object's bytes, derived from its number: a wrong byte anywhere is seen. */
static void fill(uint64_t i, uint8_t *b, uint64_t len)
{
    uint64_t s = i * 0x2545F4914F6CDD1Dull + 7;
    for (uint64_t k = 0; k < len; k++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        b[k] = (uint8_t)s;
    }
}

static int g_large; /* the crash test's objects: every 16th a large one */

static uint64_t len_of(uint64_t i)
{
    /* a large one is written in pieces, its header last */
    return g_large && i % 16 == 5 ? 5 * MiB + i % 4096 : 1000 + (i * 7919) % (200 * 1024);
}

static kvf__disk *open_disk(uint64_t size, uint64_t ext)
{
    kvf__disk_opts o = {.path = g_path, .size = size, .extent_bytes = ext};
    kvf__disk *d = NULL;
    char err[300] = "";
    int rc = kvf__disk_open(&d, &o, err, sizeof err);
    if (rc)
        fail_msg("open: %s (%d)", err, rc);
    return d;
}

/* Whether object i is present and exact (1), absent (0); a wrong byte fails the test. */
static int check_obj(kvf__disk *d, uint64_t i)
{
    uint64_t len = len_of(i), got = 0;
    uint8_t *b = malloc(len), *want = malloc(len);
    kvf_key k = key_of(i);
    int rc = kvf__disk_get(d, 1, &k, b, len, &got);
    int present = rc == 0;
    if (present) {
        fill(i, want, len);
        assert_int_equal(got, len);
        assert_memory_equal(b, want, len);
    } else {
        assert_int_equal(rc, KVF_ENOENT);
    }
    free(b);
    free(want);
    return present;
}

static void put_obj(kvf__disk *d, uint64_t i)
{
    uint64_t len = len_of(i);
    /* every other large one from page-aligned memory: written straight from it, no copy, in a
     * record whose data begins at its second block (the arena's large blocks are aligned so) */
    uint8_t *b =
        len > 4 * MiB && i % 2 ? aligned_alloc(4096, (len + 4095) / 4096 * 4096) : malloc(len);
    fill(i, b, len);
    kvf_key k = key_of(i);
    assert_int_equal(kvf__disk_put(d, 1, &k, b, len), 0);
    free(b);
}

/* Puts objects from..from+n-1 of len bytes (their bytes from fill) under namespace ns; b: room for
 * len. */
static void put_objs(kvf__disk *d, uint64_t ns, uint64_t from, uint64_t n, uint64_t len, uint8_t *b)
{
    for (uint64_t i = from; i < from + n; i++) {
        fill(i, b, len);
        kvf_key k = key_of(i);
        assert_int_equal(kvf__disk_put(d, ns, &k, b, len), 0);
    }
}

static int setup(void **state)
{
    (void)state;
    snprintf(g_path, sizeof g_path, "test_disk.%d.dat", (int)getpid());
    unlink(g_path);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    unlink(g_path);
    return 0;
}

static void test_round_trip_and_reopen(void **state)
{
    (void)state;
    kvf__disk *d = open_disk(64 * MiB, 4 * MiB);
    for (uint64_t i = 0; i < 100; i++)
        put_obj(d, i);
    kvf_key k = key_of(5);
    uint64_t len = 0;
    assert_int_equal(kvf__disk_flush(d), 0);
    assert_true(kvf__disk_contains(d, 1, &k, &len));
    assert_int_equal(len, len_of(5));
    assert_false(kvf__disk_contains(d, 2, &k, &len)); /* another namespace */
    uint8_t small[16];
    assert_int_equal(kvf__disk_get(d, 1, &k, small, sizeof small, &len), KVF_EOVERFLOW);
    for (uint64_t i = 0; i < 100; i++)
        assert_true(check_obj(d, i));
    kvf__disk_close(&d);
    d = open_disk(64 * MiB, 4 * MiB);
    kvf__disk_stats st;
    kvf__disk_stats_get(d, &st);
    assert_int_equal(st.rebuilt_entries, 100);
    for (uint64_t i = 0; i < 100; i++)
        assert_true(check_obj(d, i));
    /* written after the reopen: after the last record, found after another */
    for (uint64_t i = 100; i < 120; i++)
        put_obj(d, i);
    kvf__disk_close(&d);
    d = open_disk(64 * MiB, 4 * MiB);
    for (uint64_t i = 0; i < 120; i++)
        assert_true(check_obj(d, i));
    kvf__disk_close(&d);
    /* another geometry: formatted, nothing of the old life read as current */
    d = open_disk(64 * MiB, 2 * MiB);
    kvf__disk_stats_get(d, &st);
    assert_int_equal(st.entries, 0);
    kvf__disk_close(&d);
}

static void test_removals_and_clears_survive(void **state)
{
    (void)state;
    kvf__disk *d = open_disk(32 * MiB, 2 * MiB);
    for (uint64_t i = 0; i < 40; i++)
        put_obj(d, i);
    uint8_t b[64] = {1};
    kvf_key other = key_of(1000);
    assert_int_equal(kvf__disk_put(d, 7, &other, b, sizeof b), 0);
    kvf_key k3 = key_of(3);
    assert_int_equal(kvf__disk_remove(d, 1, &k3), 0);
    assert_int_equal(kvf__disk_remove(d, 1, &k3), KVF_ENOENT);
    assert_int_equal(kvf__disk_clear(d, 7), 1);
    kvf__disk_close(&d);
    d = open_disk(32 * MiB, 2 * MiB);
    assert_false(check_obj(d, 3));
    assert_false(kvf__disk_contains(d, 7, &other, NULL));
    for (uint64_t i = 0; i < 40; i++)
        if (i != 3)
            assert_true(check_obj(d, i));
    /* written again after its tombstone: back */
    put_obj(d, 3);
    kvf__disk_close(&d);
    d = open_disk(32 * MiB, 2 * MiB);
    assert_true(check_obj(d, 3));
    kvf__disk_close(&d);
}

static void test_the_log_reuses_its_oldest_extent(void **state)
{
    (void)state;
    /* 4 extents of 1 MiB: about 20 objects each; 300 objects go round several times */
    kvf__disk *d = open_disk(MiB + 4 * MiB, MiB);
    for (uint64_t i = 0; i < 300; i++) {
        uint64_t len = 40000 + i;
        uint8_t *b = malloc(len);
        fill(i, b, len);
        kvf_key k = key_of(i);
        assert_int_equal(kvf__disk_put(d, 1, &k, b, len), 0);
        free(b);
    }
    assert_int_equal(kvf__disk_flush(d), 0);
    kvf__disk_stats st;
    kvf__disk_stats_get(d, &st);
    assert_true(st.extents_reused > 0 && st.dropped_by_reuse > 0);
    if (!(st.entries > 40 && st.entries <= 100)) /* 25 a 1 MiB extent, 4 extents */
        fail_msg("entries after wrapping: %llu", (unsigned long long)st.entries);
    /* the newest are there, the oldest are not, and a reopen finds exactly the same */
    uint8_t present[300];
    for (uint64_t i = 0; i < 300; i++) {
        kvf_key k = key_of(i);
        present[i] = (uint8_t)kvf__disk_contains(d, 1, &k, NULL);
    }
    assert_true(present[299] && !present[0]);
    uint64_t entries = st.entries;
    kvf__disk_close(&d);
    d = open_disk(MiB + 4 * MiB, MiB);
    kvf__disk_stats_get(d, &st);
    assert_int_equal(st.entries, entries);
    for (uint64_t i = 0; i < 300; i++) {
        kvf_key k = key_of(i);
        uint64_t len = 0;
        assert_int_equal(kvf__disk_contains(d, 1, &k, &len), present[i]);
        if (present[i]) {
            uint8_t *b = malloc(len), *w = malloc(len);
            assert_int_equal(kvf__disk_get(d, 1, &k, b, len, &len), 0);
            fill(i, w, len);
            assert_memory_equal(b, w, len);
            free(b);
            free(w);
        }
    }
    kvf__disk_close(&d);
}

/* Flips one byte of the file at off. */
static void flip(uint64_t off)
{
    int fd = open(g_path, O_RDWR);
    assert_true(fd >= 0);
    uint8_t c;
    assert_int_equal(pread(fd, &c, 1, (off_t)off), 1);
    c ^= 0x5a;
    assert_int_equal(pwrite(fd, &c, 1, (off_t)off), 1);
    fsync(fd);
    close(fd);
}

static void test_flipped_bits_are_misses(void **state)
{
    (void)state;
    /* One extent's worth, laid out in order from the first extent: record i of equal sizes sits
     * at 1 MiB + 4 KiB + i * size. */
    kvf__disk *d = open_disk(16 * MiB, 4 * MiB);
    const uint64_t len = 8192 - 64, size = 8192;
    for (uint64_t i = 0; i < 10; i++) {
        uint8_t b[8192];
        fill(i, b, len);
        kvf_key k = key_of(i);
        assert_int_equal(kvf__disk_put(d, 1, &k, b, len), 0);
    }
    kvf__disk_close(&d);
    flip(MiB + 4096 + 2 * size + 64 + 100); /* object 2's data */
    flip(MiB + 4096 + 6 * size + 20);       /* object 6's header: its extent's scan ends there */
    d = open_disk(16 * MiB, 4 * MiB);
    uint8_t b[8192], w[8192];
    uint64_t got;
    for (uint64_t i = 0; i < 10; i++) {
        kvf_key k = key_of(i);
        int rc = kvf__disk_get(d, 1, &k, b, sizeof b, &got);
        if (i == 2 || i >= 6) {
            assert_int_equal(rc, KVF_ENOENT);
        } else {
            assert_int_equal(rc, 0);
            fill(i, w, len);
            assert_memory_equal(b, w, len);
        }
    }
    kvf__disk_stats st;
    kvf__disk_stats_get(d, &st);
    assert_int_equal(st.verify_failures, 1); /* object 2, dropped */
    kvf_key k2 = key_of(2);
    assert_false(kvf__disk_contains(d, 1, &k2, NULL));
    kvf__disk_close(&d);
}

/* kvf__disk_get_many of ids[0..n) (every one put with len bytes and whole), each checked
 * against what was put (b: room for one). 0, or the first id that did not come back whole. */
static int get_all(kvf__disk *d, const uint64_t *ids, size_t n, uint64_t len, uint8_t *b)
{
    kvf_key *keys = malloc(n * sizeof *keys);
    void **bufs = malloc(n * sizeof *bufs);
    uint64_t *caps = malloc(n * sizeof *caps), *lens = malloc(n * sizeof *lens);
    int *st = malloc(n * sizeof *st), bad = 0;
    assert_true(n > 0 && keys && bufs && caps && lens && st);
    for (size_t i = 0; i < n; i++) {
        keys[i] = key_of(ids[i]);
        caps[i] = len;
        bufs[i] = malloc(len);
    }
    assert_int_equal(kvf__disk_get_many(d, 1, n, keys, bufs, caps, lens, st), 0);
    for (size_t i = 0; i < n; i++) {
        fill(ids[i], b, len);
        if (!bad && (st[i] || lens[i] != len || memcmp(bufs[i], b, len) != 0))
            bad = (int)ids[i] + 1;
        free(bufs[i]);
    }
    free(keys), free(bufs), free(caps), free(lens), free(st);
    return bad;
}

/* Many objects at once (kvf__disk_get_many): records side by side in the log are read in runs,
 * each record still checked on its own. 300 small objects of one size lie in order in the first
 * extent; one of them has a byte flipped, one is asked with too small a buffer, one key was never
 * put, and two large objects go one by one: all in one call, in shuffled order. */
static void test_get_many_reads_runs(void **state)
{
    (void)state;
    enum { N = 300, ASK = N + 3 };
    const uint64_t len = 8192 - 64, size = 8192, big = 3 * MiB + 123;
    kvf__disk *d = open_disk(64 * MiB, 4 * MiB);
    uint8_t *b = malloc(big);
    put_objs(d, 1, 0, N, len, b);
    put_objs(d, 1, 1000, 2, big, b);
    kvf__disk_close(&d);
    flip(MiB + 4096 + 50 * size + 64 + 321); /* object 50's data */
    d = open_disk(64 * MiB, 4 * MiB);
    uint64_t ids[ASK];
    for (uint64_t i = 0; i < N; i++)
        ids[i] = (i * 7 + 3) % N; /* every one once, out of order */
    ids[N] = 999;                 /* never put */
    ids[N + 1] = 1000, ids[N + 2] = 1001;
    kvf_key keys[ASK];
    void *bufs[ASK];
    uint64_t caps[ASK], lens[ASK];
    int st[ASK];
    for (size_t i = 0; i < ASK; i++) {
        keys[i] = key_of(ids[i]);
        caps[i] = ids[i] >= 1000 ? big : ids[i] == 7 ? len - 1 : len;
        bufs[i] = malloc(caps[i]);
    }
    assert_int_equal(kvf__disk_get_many(d, 1, ASK, keys, bufs, caps, lens, st), 0);
    for (size_t i = 0; i < ASK; i++) {
        uint64_t id = ids[i], want_len = id >= 1000 ? big : len;
        if (id == 999) {
            assert_int_equal(st[i], KVF_ENOENT);
        } else if (id == 50) {
            assert_int_equal(st[i], KVF_ENOENT); /* did not check: dropped */
        } else if (id == 7) {
            assert_int_equal(st[i], KVF_EOVERFLOW);
            assert_int_equal(lens[i], len);
        } else {
            assert_int_equal(st[i], 0);
            assert_int_equal(lens[i], want_len);
            fill(id, b, want_len);
            assert_memory_equal(bufs[i], b, want_len);
        }
        free(bufs[i]);
    }
    kvf__disk_stats s;
    kvf__disk_stats_get(d, &s);
    assert_int_equal(s.verify_failures, 1);
    kvf_key k50 = key_of(50);
    assert_false(kvf__disk_contains(d, 1, &k50, NULL));
    assert_int_equal(s.gets, ASK);
    /* the 300 neighbours in one read (2.4 MiB in all, under a run's 4 MiB; object 7, not read,
     * is read past), the large ones one each */
    assert_int_equal(s.get_reads, 3);
    /* Records wanted with others between them (a batch's keys demoted interleaved with another
     * request's): every other one of 200 is read in runs that read past the others (half of each
     * span wanted), 1.6 MiB in one read; ten at each end of the 300, 2.3 MiB apart, in two. */
    uint64_t r0 = s.get_reads;
    size_t n = 0;
    for (uint64_t i = 1; i < 200; i += 2) /* the odd ones: object 50 is gone */
        ids[n++] = i;
    assert_int_equal(get_all(d, ids, n, len, b), 0);
    kvf__disk_stats_get(d, &s);
    assert_int_equal(s.get_reads - r0, 1);
    n = 0;
    for (uint64_t i = 0; i < 10; i++)
        ids[n++] = i, ids[n++] = N - 1 - i;
    r0 = s.get_reads;
    assert_int_equal(get_all(d, ids, n, len, b), 0);
    kvf__disk_stats_get(d, &s);
    assert_int_equal(s.get_reads - r0, 2);
    free(b);
    kvf__disk_close(&d);
}

static void test_large_objects_in_pieces(void **state)
{
    (void)state;
    /* 5 MiB objects are read in 2 MiB pieces, checked and copied as they land */
    const uint64_t len = 5 * MiB + 123, size = 5 * MiB + 4096; /* header + data, 4 KiB units */
    kvf__disk *d = open_disk(64 * MiB, 16 * MiB);
    uint8_t *b = malloc(len), *w = malloc(len);
    for (uint64_t i = 0; i < 3; i++) {
        fill(100 + i, b, len);
        kvf_key k = key_of(100 + i);
        assert_int_equal(kvf__disk_put(d, 1, &k, b, len), 0);
    }
    /* A put returns with its last pieces still being written (the next one's first are made
     * meanwhile): a flush indexes what it wrote, and a removal finds a put still in flight. */
    assert_int_equal(kvf__disk_flush(d), 0);
    for (uint64_t i = 0; i < 3; i++) {
        kvf_key k = key_of(100 + i);
        uint64_t got = 0;
        assert_int_equal(kvf__disk_contains(d, 1, &k, &got), 1);
        assert_int_equal(got, len);
    }
    fill(200, b, len);
    kvf_key gone = key_of(200);
    assert_int_equal(kvf__disk_put(d, 1, &gone, b, len), 0);
    assert_int_equal(kvf__disk_remove(d, 1, &gone), 0);
    uint64_t got0 = 0;
    assert_int_equal(kvf__disk_get(d, 1, &gone, b, len, &got0), KVF_ENOENT);
    kvf__disk_close(&d);
    d = open_disk(64 * MiB, 16 * MiB);
    assert_int_equal(kvf__disk_get(d, 1, &gone, b, len, &got0), KVF_ENOENT); /* and after */
    for (uint64_t i = 0; i < 3; i++) {
        kvf_key k = key_of(100 + i);
        uint64_t got = 0;
        memset(b, 0, len);
        assert_int_equal(kvf__disk_get(d, 1, &k, b, len, &got), 0);
        fill(100 + i, w, len);
        assert_int_equal(got, len);
        assert_memory_equal(b, w, len);
    }
    kvf__disk_close(&d);
    /* a byte of object 1's third piece, and the last byte of object 2's data */
    flip(MiB + 4096 + size + 4 * MiB + 77);
    flip(MiB + 4096 + 2 * size + 64 + len - 1);
    d = open_disk(64 * MiB, 16 * MiB);
    for (uint64_t i = 0; i < 3; i++) {
        kvf_key k = key_of(100 + i);
        uint64_t got = 0;
        int rc = kvf__disk_get(d, 1, &k, b, len, &got);
        assert_int_equal(rc, i == 0 ? 0 : KVF_ENOENT);
    }
    kvf__disk_stats st;
    kvf__disk_stats_get(d, &st);
    assert_int_equal(st.verify_failures, 2);
    kvf__disk_close(&d);
    free(b);
    free(w);
}

/* Large objects in page-aligned memory are written straight from it: a record with its header
 * alone in the first block and its data from the second, whole blocks written from the caller's
 * memory and the last partial one through a buffer. They read back exact, before and after a
 * reopen, through get and get_many; a flipped byte in a middle piece or in the last data byte is
 * a miss; and the caller's memory may change once the put returns (its data was written by then).
 */
static void test_large_objects_from_aligned_memory(void **state)
{
    (void)state;
    const uint64_t lens[3] = {5 * MiB + 123, 6 * MiB, 5 * MiB + 4095};
    kvf__disk *d = open_disk(64 * MiB, 24 * MiB);
    uint8_t *b = aligned_alloc(4096, 6 * MiB + 4096), *w = malloc(6 * MiB + 4096);
    uint64_t off[3], at = MiB + 4096; /* the first extent's records */
    for (uint64_t i = 0; i < 3; i++) {
        fill(300 + i, b, lens[i]);
        kvf_key k = key_of(300 + i);
        assert_int_equal(kvf__disk_put(d, 1, &k, b, lens[i]), 0);
        memset(b, 0xee, lens[i]); /* the put has returned: its data is on disk already */
        off[i] = at;
        at += 4096 + (lens[i] + 4095) / 4096 * 4096;
    }
    assert_int_equal(kvf__disk_flush(d), 0);
    kvf__disk_stats st;
    kvf__disk_stats_get(d, &st);
    assert_int_equal(st.direct_puts, 3);
    for (int reopen = 0; reopen < 2; reopen++) {
        for (uint64_t i = 0; i < 3; i++) {
            kvf_key k = key_of(300 + i);
            uint64_t got = 0;
            memset(b, 0, lens[i]);
            assert_int_equal(kvf__disk_get(d, 1, &k, b, 6 * MiB + 4096, &got), 0);
            fill(300 + i, w, lens[i]);
            assert_int_equal(got, lens[i]);
            assert_memory_equal(b, w, lens[i]);
        }
        /* through get_many too, beside a small packed record */
        uint8_t small[100];
        fill(399, small, sizeof small);
        kvf_key sk = key_of(399);
        assert_int_equal(kvf__disk_put(d, 1, &sk, small, sizeof small), 0);
        assert_int_equal(kvf__disk_flush(d), 0);
        kvf_key keys[2] = {key_of(301), sk};
        uint8_t *big = malloc(6 * MiB), got_small[100];
        void *bufs[2] = {big, got_small};
        uint64_t caps[2] = {6 * MiB, sizeof got_small}, glens[2];
        int gst[2];
        assert_int_equal(kvf__disk_get_many(d, 1, 2, keys, bufs, caps, glens, gst), 0);
        assert_int_equal(gst[0], 0);
        assert_int_equal(gst[1], 0);
        fill(301, w, lens[1]);
        assert_memory_equal(big, w, lens[1]);
        assert_memory_equal(got_small, small, sizeof small);
        free(big);
        kvf__disk_close(&d);
        d = open_disk(64 * MiB, 24 * MiB);
    }
    kvf__disk_close(&d);
    /* a byte of object 0's third piece's data, and the last data byte of object 2 */
    flip(off[0] + 4096 + 4 * MiB + 77);
    flip(off[2] + 4096 + lens[2] - 1);
    d = open_disk(64 * MiB, 24 * MiB);
    for (uint64_t i = 0; i < 3; i++) {
        kvf_key k = key_of(300 + i);
        uint64_t got = 0;
        assert_int_equal(kvf__disk_get(d, 1, &k, b, 6 * MiB + 4096, &got), i == 1 ? 0 : KVF_ENOENT);
    }
    kvf__disk_stats_get(d, &st);
    assert_int_equal(st.verify_failures, 2);
    assert_int_equal(st.direct_gets, 3); /* into b, page-aligned: straight, no copy */
    kvf__disk_close(&d);
    free(b);
    free(w);
}

/* The reader beside test_large_puts_are_indexed_only_when_written's writer: every key the index
 * names, read at once and compared. */
typedef struct large_reader {
    kvf__disk *d;
    uint64_t first, n, len;
    atomic_int stop;
    atomic_ulong reads, wrong;
} large_reader;

static void *read_large(void *arg)
{
    large_reader *a = arg;
    uint8_t *b = malloc(a->len), *w = malloc(a->len);
    while (b && w && !atomic_load(&a->stop)) {
        for (uint64_t i = a->first; i < a->first + a->n; i++) {
            kvf_key k = key_of(i);
            uint64_t got = 0;
            if (!kvf__disk_contains(a->d, 1, &k, &got))
                continue;
            int rc = kvf__disk_get(a->d, 1, &k, b, a->len, &got);
            if (rc == KVF_ENOENT)
                continue; /* its extent reused meanwhile */
            fill(i, w, a->len);
            if (rc || got != a->len || memcmp(b, w, a->len) != 0)
                atomic_fetch_add(&a->wrong, 1);
            atomic_fetch_add(&a->reads, 1);
        }
    }
    free(b), free(w);
    return NULL;
}

/* Large puts return before their last pieces are written: a reader that reads every key as soon
 * as the index names it never finds one not yet whole (a wrong byte or a verification failure),
 * while puts keep coming. */
static void test_large_puts_are_indexed_only_when_written(void **state)
{
    (void)state;
    const uint64_t len = 5 * MiB + 123;
    kvf__disk *d = open_disk(256 * MiB, 32 * MiB);
    large_reader a = {.d = d, .first = 300, .n = 40, .len = len};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, read_large, &a), 0);
    uint8_t *b = malloc(len), *got_b = malloc(len);
    /* Right after each put returns, its last pieces are still in flight: a key the index does
     * not name yet must read as a miss, never as the bytes written so far. */
    unsigned in_flight = 0;
    for (uint64_t i = a.first; i < a.first + a.n; i++) {
        fill(i, b, len);
        kvf_key k = key_of(i);
        assert_int_equal(kvf__disk_put(d, 1, &k, b, len), 0);
        uint64_t got = 0;
        if (kvf__disk_contains(d, 1, &k, &got))
            continue;
        in_flight++;
        int rc = kvf__disk_get(d, 1, &k, got_b, len, &got);
        if (rc == 0) /* indexed between the two calls: whole, then */
            assert_memory_equal(got_b, b, len);
        else
            assert_int_equal(rc, KVF_ENOENT);
    }
    print_message("%u of %llu large puts still in flight when they returned\n", in_flight,
                  (unsigned long long)a.n);
    assert_int_equal(kvf__disk_flush(d), 0);
    atomic_store(&a.stop, 1);
    pthread_join(t, NULL);
    kvf__disk_stats st;
    kvf__disk_stats_get(d, &st);
    print_message("%lu reads beside the puts, %lu wrong, %llu verification failures\n",
                  (unsigned long)atomic_load(&a.reads), (unsigned long)atomic_load(&a.wrong),
                  (unsigned long long)st.verify_failures);
    assert_int_equal(atomic_load(&a.wrong), 0);
    assert_int_equal(st.verify_failures, 0);
    /* the last ones, flushed: all there */
    for (uint64_t i = a.first + a.n - 4; i < a.first + a.n; i++) {
        kvf_key k = key_of(i);
        uint64_t got = 0;
        assert_int_equal(kvf__disk_contains(d, 1, &k, &got), 1);
    }
    kvf__disk_close(&d);
    free(b), free(got_b);
}

/* The writer of the crash test: objects from first on, a flush every 4, each flushed number
 * written to fd (what was acknowledged), until killed. */
static void crash_writer(uint64_t first, int fd)
{
    kvf__disk_opts o = {.path = g_path, .size = 1024 * MiB, .extent_bytes = 16 * MiB};
    kvf__disk *d = NULL;
    char err[300];
    if (kvf__disk_open(&d, &o, err, sizeof err) != 0)
        _exit(3);
    uint8_t *b = malloc(6 * MiB);
    uint64_t written = 0;
    for (uint64_t i = first;; i++) {
        if (written > 96 * MiB) /* six rounds of this fit the tier: no extent reused */
            pause();
        uint64_t len = len_of(i);
        fill(i, b, len);
        kvf_key k = key_of(i);
        if (kvf__disk_put(d, 1, &k, b, len) != 0)
            _exit(4);
        written += len;
        if (i % 4 == 3) {
            if (kvf__disk_flush(d) != 0)
                _exit(5);
            if (write(fd, &i, sizeof i) != (ssize_t)sizeof i)
                _exit(6);
        }
    }
}

static void test_killed_writers_leave_whole_objects(void **state)
{
    (void)state;
    srand((unsigned)time(NULL));
    enum { ROUNDS = 6 };
    g_large = 1;
    uint64_t next = 0, from[ROUNDS], upto[ROUNDS]; /* round r acknowledged [from, upto) */
    for (int r = 0; r < ROUNDS; r++) {
        uint64_t acked = next;
        from[r] = next;
        int p[2];
        assert_int_equal(pipe(p), 0);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            close(p[0]);
            crash_writer(next, p[1]);
        }
        close(p[1]);
        /* once it writes (its first flush acknowledged), at a random moment of its writing */
        uint64_t v;
        if (read(p[0], &v, sizeof v) == (ssize_t)sizeof v)
            acked = v + 1;
        usleep((useconds_t)(rand() % 100000));
        kill(pid, SIGKILL);
        int status;
        waitpid(pid, &status, 0);
        assert_true(WIFSIGNALED(status));
        while (read(p[0], &v, sizeof v) == (ssize_t)sizeof v)
            acked = v + 1;
        close(p[0]);
        /* every object the index names is whole; every acknowledged one is there (the tier holds
         * all of them: no extent was reused) */
        upto[r] = acked;
        kvf__disk *d = open_disk(1024 * MiB, 16 * MiB);
        uint64_t hi = acked + 64;
        for (uint64_t i = 0; i < hi; i++) {
            int present = check_obj(d, i), want = 0;
            for (int q = 0; q <= r; q++)
                want |= i >= from[q] && i < upto[q];
            if (want && !present)
                fail_msg("round %d: object %llu was acknowledged and is missing", r,
                         (unsigned long long)i);
        }
        kvf__disk_stats st;
        kvf__disk_stats_get(d, &st);
        assert_int_equal(st.extents_reused, 0);
        kvf__disk_close(&d);
        next = hi; /* the next round writes after what may be there */
    }
    g_large = 0;
    for (int r = 0; r < ROUNDS; r++)
        assert_true(upto[r] > from[r]); /* every round acknowledged writes before its kill */
}

typedef struct fault_state {
    int writes, fail_at, err;
} fault_state;

static int fault(void *ud, int is_write, uint64_t off, uint64_t len)
{
    (void)off, (void)len;
    fault_state *f = ud;
    if (!is_write)
        return 0;
    return ++f->writes >= f->fail_at ? -f->err : 0;
}

static void test_a_failing_device_takes_the_tier_down(void **state)
{
    (void)state;
    kvf__disk *d = open_disk(16 * MiB, 2 * MiB);
    for (uint64_t i = 0; i < 10; i++)
        put_obj(d, i);
    kvf__disk_close(&d);
    fault_state f = {.fail_at = 1 << 30, .err = EIO};
    kvf__disk_opts o = {
        .path = g_path, .size = 16 * MiB, .extent_bytes = 2 * MiB, .fault = fault, .fault_ud = &f};
    char err[300];
    assert_int_equal(kvf__disk_open(&d, &o, err, sizeof err), 0);
    assert_true(check_obj(d, 1));
    f.fail_at = f.writes + 1; /* the next write fails */
    uint8_t b[100] = {0};
    kvf_key k = key_of(500);
    assert_int_equal(kvf__disk_put(d, 1, &k, b, sizeof b), 0); /* buffered */
    assert_int_equal(kvf__disk_flush(d), KVF_EIO);
    kvf__disk_stats st;
    kvf__disk_stats_get(d, &st);
    assert_int_equal(st.down, EIO);
    uint64_t len;
    kvf_key k1 = key_of(1);
    assert_int_equal(kvf__disk_get(d, 1, &k1, b, sizeof b, &len), KVF_EIO);
    assert_int_equal(kvf__disk_put(d, 1, &k, b, sizeof b), KVF_EIO);
    kvf__disk_close(&d);
    /* ENOSPC the same way, from a fresh open */
    f = (fault_state){.fail_at = 1 << 30, .err = ENOSPC};
    assert_int_equal(kvf__disk_open(&d, &o, err, sizeof err), 0);
    f.fail_at = f.writes + 1;
    assert_int_equal(kvf__disk_put(d, 1, &k, b, sizeof b), 0);
    assert_int_equal(kvf__disk_flush(d), KVF_EIO);
    kvf__disk_stats_get(d, &st);
    assert_int_equal(st.down, ENOSPC);
    kvf__disk_close(&d);
    /* what was written before the faults is still whole */
    d = open_disk(16 * MiB, 2 * MiB);
    for (uint64_t i = 0; i < 10; i++)
        assert_true(check_obj(d, i));
    kvf__disk_close(&d);
}

/* A request the kernel refused stays in the ring's queue, and the next submission would take it:
 * kvf__dk_unsubmit makes it a no-op whose completion kvf__dk_wait skips. A read of /dev/zero
 * into a marked buffer, prepared and unsubmitted, then a no-op of this caller's: the wait gives
 * the caller's, and the buffer is untouched. */
static void test_unsubmitted_requests_are_never_done(void **state)
{
    (void)state;
    struct io_uring ring;
    assert_int_equal(io_uring_queue_init(8, &ring, 0), 0);
    int fd = open("/dev/zero", O_RDONLY);
    assert_true(fd >= 0);
    uint8_t buf[4096];
    memset(buf, 0xAA, sizeof buf);
    struct io_uring_sqe *stale = io_uring_get_sqe(&ring);
    io_uring_prep_read(stale, fd, buf, sizeof buf, 0);
    io_uring_sqe_set_data64(stale, 1);
    kvf__dk_unsubmit(stale);
    struct io_uring_sqe *mine = io_uring_get_sqe(&ring);
    io_uring_prep_nop(mine);
    io_uring_sqe_set_data64(mine, 7);
    assert_int_equal(io_uring_submit(&ring), 2);
    struct io_uring_cqe *cqe;
    assert_int_equal(kvf__dk_wait(&ring, &cqe), 0);
    assert_int_equal(io_uring_cqe_get_data64(cqe), 7);
    io_uring_cqe_seen(&ring, cqe);
    for (size_t i = 0; i < sizeof buf; i++)
        assert_int_equal(buf[i], 0xAA);
    close(fd);
    io_uring_queue_exit(&ring);
}

static void test_bad_places_are_refused(void **state)
{
    (void)state;
    kvf__disk *d = NULL;
    char err[300] = "";
    kvf__disk_opts o = {.path = g_path, .size = 3 * MiB, .extent_bytes = 2 * MiB};
    assert_int_equal(kvf__disk_open(&d, &o, err, sizeof err), KVF_EINVAL); /* < 2 extents */
    assert_non_null(strstr(err, "fewer than 2 extents"));
    o = (kvf__disk_opts){.path = g_path, .size = 0};
    assert_int_equal(kvf__disk_open(&d, &o, err, sizeof err), KVF_EINVAL);
    o = (kvf__disk_opts){.path = g_path, .size = 8 * MiB, .extent_bytes = 3000};
    assert_int_equal(kvf__disk_open(&d, &o, err, sizeof err), KVF_EINVAL);
    struct stat sb;
    if (stat("/dev/shm", &sb) == 0) { /* tmpfs: no O_DIRECT, said so */
        char p[128];
        snprintf(p, sizeof p, "/dev/shm/kvf-disk-%d", (int)getpid());
        o = (kvf__disk_opts){.path = p, .size = 8 * MiB, .extent_bytes = MiB};
        int rc = kvf__disk_open(&d, &o, err, sizeof err);
        unlink(p);
        if (rc) {
            assert_int_equal(rc, KVF_EIO);
            assert_non_null(strstr(err, "O_DIRECT"));
        } else {
            kvf__disk_close(&d);
        }
    }
    assert_null(d);
}

/* The tier's readers held at their reads' start while the gate is shut (a fault hook that fails
 * nothing). */
static pthread_mutex_t g_gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_gate_cv = PTHREAD_COND_INITIALIZER;
static int g_gate_shut, g_gate_held;
/* The reads that came to the gate: their generation (g_gate_gen when they came; moving it on lets
 * those held go while the gate stays shut to the next) and offsets. */
static int g_gate_gen, g_arrived;
static int g_arr_gen[256];
static uint64_t g_arr_off[256];

static int gate(void *ud, int dev, int is_write, uint64_t off, uint64_t len)
{
    (void)ud, (void)dev, (void)len;
    if (is_write)
        return 0;
    pthread_mutex_lock(&g_gate_mu);
    int gen = g_gate_gen;
    if (g_arrived < 256)
        g_arr_gen[g_arrived] = gen, g_arr_off[g_arrived++] = off;
    g_gate_held++;
    pthread_cond_broadcast(&g_gate_cv);
    while (g_gate_shut && gen == g_gate_gen)
        pthread_cond_wait(&g_gate_cv, &g_gate_mu);
    g_gate_held--;
    pthread_mutex_unlock(&g_gate_mu);
    return 0;
}

static void gate_set(int shut, int next_gen)
{
    pthread_mutex_lock(&g_gate_mu);
    g_gate_shut = shut;
    g_gate_gen += next_gen;
    if (!shut)
        g_arrived = 0;
    pthread_cond_broadcast(&g_gate_cv);
    pthread_mutex_unlock(&g_gate_mu);
}

static atomic_int g_done;

static void req_done(kvf__tier_req *r)
{
    (void)r;
    atomic_fetch_add(&g_done, 1);
}

/* Waits (at most 10 s) until cond() holds under the gate's lock. */
static int gate_wait(int (*cond)(void))
{
    for (int i = 0; i < 1000; i++) {
        pthread_mutex_lock(&g_gate_mu);
        int ok = cond();
        pthread_mutex_unlock(&g_gate_mu);
        if (ok)
            return 1;
        usleep(10000);
    }
    return 0;
}

static int four_held(void)
{
    return g_gate_held == 4;
}

/* Four reads held that came in the gate's present generation. */
static int four_held_now(void)
{
    int n = 0;
    for (int i = 0; i < g_arrived; i++)
        n += g_arr_gen[i] == g_gate_gen;
    return n == 4 && g_gate_held == 4;
}

/* Promotions that wait together are read together (store/tier_submit.c, merge_waiting): a client's
 * batch striped over four event loops came as four requests whose keys were demoted interleaved
 * (every fourth record one request's). Dealt apart, each reader's keys would be one record in four,
 * one read each (64 reads); merged, the 64 lie side by side and take four reads, one per reader.
 * gather_us 0: the device's four readers are held busy (at a read of a request of four keys)
 * while the four requests queue, and one in another namespace; then they are let go. gather_us
 * > 0: the readers are idle, and the first request waits that long for the others to come (the
 * store's --disk-gather-us). Either way every object comes back exact, each request is answered
 * once, and the other namespace's keys are misses. tenants: the four requests are four tenants',
 * which are never merged (a work's reservations wait as one), so they take the 64 reads. */
static void promotions_together(uint32_t gather_us, int tenants)
{
    enum { Q = 4, PER = 16, PLUG = 100 };
    const uint64_t len = 8192 - 64;
    uint8_t *b = malloc(len), *want = malloc(len);
    kvf__disk *d = open_disk(64 * MiB, 4 * MiB);
    for (uint64_t j = 0; j < PER; j++)
        for (uint64_t q = 0; q < Q; q++) { /* object q * PER + j: request q's j-th */
            fill(q * PER + j, b, len);
            kvf_key k = key_of(q * PER + j);
            assert_int_equal(kvf__disk_put(d, 1, &k, b, len), 0);
        }
    put_objs(d, 1, PLUG, 4, len, b);
    kvf__disk_close(&d);

    kvf_cache *c = NULL;
    char err[300] = "";
    kvf_cache_opts co = {.memory = 64 * MiB, .reserve_ms = 1000};
    assert_int_equal(kvf__cache_open(&c, &co, err, sizeof err), 0);
    kvf__tier_opts to = {
        .n = 1, .cache = c, .extent_bytes = 4 * MiB, .fault = gate, .gather_us = gather_us};
    int plugged = gather_us == 0;
    to.paths[0] = g_path;
    to.sizes[0] = 64 * MiB;
    kvf__tier *t = NULL;
    if (kvf__tier_open(&t, &to, err, sizeof err) != 0)
        fail_msg("tier: %s", err);

    /* the four readers held by a request of four keys, one each */
    kvf_key pk[4], keys[Q + 1][PER];
    int32_t pst[4], st[Q + 1][PER];
    uint32_t peid[4], eids[Q + 1][PER];
    for (int i = 0; i < 4; i++)
        pk[i] = key_of(PLUG + (uint64_t)i), pst[i] = KVF_ENOENT;
    kvf__tier_req plug = {.kind = KVF_TIER_PROMOTE,
                          .ns = 1,
                          .n = 4,
                          .keys = pk,
                          .st = pst,
                          .eids = peid,
                          .done = req_done};
    atomic_store(&g_done, 0);
    if (plugged) {
        gate_set(1, 0);
        assert_int_equal(kvf__tier_submit(t, &plug), 0);
        assert_true(gate_wait(four_held));
    }

    kvf__tier_req rq[Q + 1];
    for (int q = 0; q <= Q; q++) {
        for (int j = 0; j < PER; j++) {
            keys[q][j] = key_of((uint64_t)(q < Q ? q : 0) * PER + (uint64_t)j);
            st[q][j] = KVF_ENOENT;
        }
        rq[q] = (kvf__tier_req){.kind = KVF_TIER_PROMOTE,
                                .ns = q < Q ? 1 : 2, /* the last: another namespace */
                                .tenant = tenants ? (uint32_t)q + 1 : 0,
                                .n = PER,
                                .keys = keys[q],
                                .st = st[q],
                                .eids = eids[q],
                                .done = req_done};
        assert_int_equal(kvf__tier_submit(t, &rq[q]), 0);
        if (!plugged)
            usleep(20000); /* idle readers would have taken it by then, but for the gathering */
    }
    gate_set(0, 0);
    for (int i = 0; i < 1000 && atomic_load(&g_done) < Q + 1 + plugged; i++)
        usleep(10000);
    assert_int_equal(atomic_load(&g_done), Q + 1 + plugged);

    kvf__tier_stats ts;
    kvf__tier_stats_get(t, &ts);
    assert_int_equal(ts.promoted, 4 * plugged + Q * PER);
    /* the plug's four, then one per reader for the 64 (one each where they are not merged) */
    assert_int_equal(ts.promote_reads, 4 * plugged + (tenants ? Q * PER : 4));
    for (int q = 0; q <= Q; q++)
        for (int j = 0; j < PER; j++) {
            if (q == Q) {
                assert_int_equal(st[q][j], KVF_ENOENT);
                continue;
            }
            assert_int_equal(st[q][j], 0);
            uint32_t e;
            const uint8_t *p;
            uint64_t got;
            kvf__cache_lock(c);
            assert_int_equal(kvf__cache_acquire_locked(c, 1, &keys[q][j], &e, &p, &got), 0);
            fill((uint64_t)q * PER + (uint64_t)j, want, len);
            assert_int_equal(got, len);
            assert_memory_equal(p, want, len);
            kvf__cache_release_locked(c, e);
            kvf__cache_release_locked(c, eids[q][j]); /* the tier's reference, for its caller */
            kvf__cache_unlock(c);
        }
    kvf__cache_lock(c);
    for (int i = 0; i < 4 && plugged; i++) {
        assert_int_equal(pst[i], 0);
        kvf__cache_release_locked(c, peid[i]);
    }
    kvf__cache_unlock(c);
    kvf__tier_close(&t);
    kvf__cache_close(&c);
    free(b);
    free(want);
}

static void test_waiting_promotions_are_read_together(void **state)
{
    (void)state;
    promotions_together(0, 0);
}

static void test_promotions_of_other_tenants_are_not_merged(void **state)
{
    (void)state;
    promotions_together(0, 1);
}

static void test_promotions_gather_those_that_come_with_them(void **state)
{
    (void)state;
    promotions_together(300 * 1000, 0); /* far longer than the 100 ms the submissions take */
}

/* Merged promotions keep the place of the first of them (store/tier_submit.c, merge_waiting): with
 * the device's four readers held, a request of namespace 1 (A1), then one of namespace 2 (B), then
 * another of namespace 1 (A2) queue; A2 merges with A1, and the merged works stay ahead of B. Let
 * go, the readers' next four reads are A's (A's records lie before B's in the log), then B's;
 * before, the merged works went to the queue's end, behind B. */
static void test_merged_promotions_keep_their_place(void **state)
{
    (void)state;
    enum { PER = 16 };
    const uint64_t len = 8192 - 64;
    uint8_t *b = malloc(len);
    kvf__disk *d = open_disk(64 * MiB, 4 * MiB);
    /* A1's and A2's objects (0..31, namespace 1), B's (200.., namespace 2), the plug's (100..) */
    put_objs(d, 1, 0, 2 * PER, len, b);
    put_objs(d, 2, 200, PER, len, b);
    put_objs(d, 1, 100, 4, len, b);
    assert_int_equal(kvf__disk_flush(d), 0);
    kvf_key kb = key_of(200);
    uint64_t b_off = kvf__disk_offset(d, 2, &kb);
    assert_true(b_off != UINT64_MAX);
    kvf__disk_close(&d);

    kvf_cache *c = NULL;
    char err[300] = "";
    kvf_cache_opts co = {.memory = 64 * MiB, .reserve_ms = 1000};
    assert_int_equal(kvf__cache_open(&c, &co, err, sizeof err), 0);
    kvf__tier_opts to = {.n = 1, .cache = c, .extent_bytes = 4 * MiB, .fault = gate};
    to.paths[0] = g_path;
    to.sizes[0] = 64 * MiB;
    kvf__tier *t = NULL;
    if (kvf__tier_open(&t, &to, err, sizeof err) != 0)
        fail_msg("tier: %s", err);

    enum { R = 4 }; /* the plug, A1, B, A2 */
    static const uint64_t first[R] = {100, 0, 200, PER}, ns[R] = {1, 1, 2, 1};
    static const uint32_t count[R] = {4, PER, PER, PER};
    kvf_key keys[R][PER];
    int32_t st[R][PER];
    uint32_t eids[R][PER];
    kvf__tier_req rq[R];
    atomic_store(&g_done, 0);
    gate_set(1, 0);
    for (int q = 0; q < R; q++) {
        for (uint32_t j = 0; j < count[q]; j++)
            keys[q][j] = key_of(first[q] + j), st[q][j] = KVF_ENOENT;
        rq[q] = (kvf__tier_req){.kind = KVF_TIER_PROMOTE,
                                .ns = ns[q],
                                .n = count[q],
                                .keys = keys[q],
                                .st = st[q],
                                .eids = eids[q],
                                .done = req_done};
        assert_int_equal(kvf__tier_submit(t, &rq[q]), 0);
        if (q == 0)
            assert_true(gate_wait(four_held)); /* the plug's four reads hold the readers */
    }
    gate_set(1, 1); /* the plug's reads go; the next four are held */
    assert_true(gate_wait(four_held_now));
    uint64_t b_first = 0; /* the offset of a read of B's among the four, if any */
    pthread_mutex_lock(&g_gate_mu);
    for (int i = 0; i < g_arrived; i++)
        if (g_arr_gen[i] == g_gate_gen && g_arr_off[i] >= b_off)
            b_first = g_arr_off[i];
    pthread_mutex_unlock(&g_gate_mu);
    gate_set(0, 0); /* before any failure: no reader is left held */
    if (b_first)
        fail_msg("a read of B's (offset %llu) came before A's", (unsigned long long)b_first);
    for (int i = 0; i < 1000 && atomic_load(&g_done) < R; i++)
        usleep(10000);
    assert_int_equal(atomic_load(&g_done), R);
    kvf__cache_lock(c);
    for (int q = 0; q < R; q++)
        for (uint32_t j = 0; j < count[q]; j++) {
            assert_int_equal(st[q][j], 0);
            kvf__cache_release_locked(c, eids[q][j]);
        }
    kvf__cache_unlock(c);
    kvf__tier_close(&t);
    kvf__cache_close(&c);
    free(b);
}

/* Whether this machine can run the tier here: io_uring allowed (a container's seccomp profile may
 * refuse it) and O_DIRECT taken by the file system of the working directory. NULL, or why not. */
static const char *unavailable(void)
{
    static char why[200];
    kvf__disk_opts o = {.path = g_path, .size = 8 * MiB, .extent_bytes = MiB};
    kvf__disk *d = NULL;
    int rc = kvf__disk_open(&d, &o, why, sizeof why);
    kvf__disk_close(&d);
    unlink(g_path);
    return rc == KVF_EINFEASIBLE || (rc == KVF_EIO && strstr(why, "O_DIRECT")) ? why : NULL;
}

int main(void)
{
    setup(NULL);
    const char *why = unavailable();
    if (why) {
        printf("test_disk: skipped: %s\n", why);
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_round_trip_and_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_removals_and_clears_survive, setup, teardown),
        cmocka_unit_test_setup_teardown(test_the_log_reuses_its_oldest_extent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_flipped_bits_are_misses, setup, teardown),
        cmocka_unit_test_setup_teardown(test_get_many_reads_runs, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unsubmitted_requests_are_never_done, setup, teardown),
        cmocka_unit_test_setup_teardown(test_large_objects_in_pieces, setup, teardown),
        cmocka_unit_test_setup_teardown(test_large_objects_from_aligned_memory, setup, teardown),
        cmocka_unit_test_setup_teardown(test_large_puts_are_indexed_only_when_written, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_killed_writers_leave_whole_objects, setup, teardown),
        cmocka_unit_test_setup_teardown(test_a_failing_device_takes_the_tier_down, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_places_are_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_waiting_promotions_are_read_together, setup, teardown),
        cmocka_unit_test_setup_teardown(test_promotions_gather_those_that_come_with_them, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_promotions_of_other_tenants_are_not_merged, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_merged_promotions_keep_their_place, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

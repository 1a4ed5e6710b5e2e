/*
 * The disk benchmarks' own ceiling (bench_util.h): io_uring with O_DIRECT straight from one
 * aligned buffer, one request in flight, the object's size a request: what the device gives a
 * writer or reader with no copy, no hash and no index, in the same run as the thing measured.
 * fio does the same where it is installed; this one is there on every host that builds the tier.
 */
#define _GNU_SOURCE
#include "bench_util.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t gcd(uint64_t a, uint64_t b)
{
    while (b) {
        uint64_t t = a % b;
        a = b, b = t;
    }
    return a;
}

/* One request of len bytes at off, waited for. 0, or -1 (said). */
static int one(struct io_uring *ring, int fd, int wr, void *buf, uint64_t len, uint64_t off)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (!sqe)
        return -1;
    if (wr)
        io_uring_prep_write(sqe, fd, buf, (unsigned)len, off);
    else
        io_uring_prep_read(sqe, fd, buf, (unsigned)len, off);
    int rc = io_uring_submit(ring);
    struct io_uring_cqe *cqe = NULL;
    while (rc >= 0 && (rc = io_uring_wait_cqe(ring, &cqe)) == -EINTR)
        ;
    if (rc < 0) {
        fprintf(stderr, "kvf-bench: raw io_uring: %s\n", strerror(-rc));
        return -1;
    }
    int res = cqe->res;
    io_uring_cqe_seen(ring, cqe);
    if (res < 0 || (uint64_t)res != len) {
        fprintf(stderr, "kvf-bench: raw io_uring %s of %llu bytes: %s\n", wr ? "write" : "read",
                (unsigned long long)len, res < 0 ? strerror(-res) : "short");
        return -1;
    }
    return 0;
}

double bench_uring_rate(const char *dir, const char *rw, uint64_t bs, uint64_t total)
{
    char file[4200];
    snprintf(file, sizeof file, "%s/kvf-bench-raw.%d.dat", dir, (int)getpid());
    double gbps = bench_uring_rate_file(file, rw, bs, total);
    if (!strcmp(rw, "read"))
        unlink(file);
    return gbps;
}

double bench_uring_rate_file(const char *file, const char *rw, uint64_t bs, uint64_t total)
{
    int wr = !strcmp(rw, "write");
    uint64_t n = bs ? total / bs : 0;
    if (!n || bs > (1u << 30))
        return -1;
    int fd = open(file, (wr ? O_CREAT | O_TRUNC | O_RDWR : O_RDONLY) | O_DIRECT, 0600);
    if (fd < 0) {
        fprintf(stderr, "kvf-bench: raw io_uring: %s: %s\n", file, strerror(errno));
        return -1;
    }
    void *buf = NULL;
    struct io_uring ring;
    double gbps = -1;
    if (posix_memalign(&buf, 4096, bs) != 0) {
        fprintf(stderr, "kvf-bench: raw io_uring: no memory for a %llu-byte buffer\n",
                (unsigned long long)bs);
        close(fd);
        return -1;
    }
    /* a write's bytes that do not compress, as the objects' do not (a read overwrites them) */
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (uint64_t i = 0; wr && i + 8 <= bs; i += 8) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        memcpy((char *)buf + i, &x, 8);
    }
    int qe = io_uring_queue_init(4, &ring, 0);
    if (qe < 0)
        fprintf(stderr, "kvf-bench: raw io_uring: %s\n", strerror(-qe));
    /* randread: block i at (i * step) mod n, step coprime to n: every block once, scattered */
    uint64_t step = 1;
    if (!strcmp(rw, "randread"))
        for (step = (n * 61803) / 100000 | 1; step > 1 && gcd(step, n) != 1; step++)
            ;
    if (qe == 0) {
        double t0 = now_s();
        uint64_t i = 0;
        while (i < n && one(&ring, fd, wr, buf, bs, (i * step) % n * bs) == 0)
            i++;
        double t = now_s() - t0;
        if (i == n && t > 0)
            gbps = (double)(n * bs) / t / 1e9;
        io_uring_queue_exit(&ring);
    }
    free(buf);
    close(fd);
    return gbps;
}

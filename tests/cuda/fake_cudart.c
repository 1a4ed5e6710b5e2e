/*
 * A fake CUDA runtime for the tests of machines without a GPU: the functions libkvf's loader
 * resolves (cuda/include/cu.h), with the ABI of the major version it is built for. "Device"
 * memory is host memory the fake allocated and tracks (so cudaPointerGetAttributes can tell it
 * from host memory); copies are memcpy, done at once; streams and events are tokens that the
 * fake checks on every call, so a stream passed where the ABI has another argument is caught.
 *
 * Built once per case (tests/CMakeLists.txt): FAKE_RUNTIME (e.g. 13000, 12080, 11080) and,
 * optionally, FAKE_OMIT_WAIT_EVENT (no cudaStreamWaitEvent, a missing symbol). Every symbol is
 * exported under the version node of its soname (libcudart.so.13 or .so.12), as the real ones.
 * FAKE_CUDART_FAIL_COPY=N makes the Nth copy call fail with cudaErrorLaunchFailure (719).
 * FAKE_CUDART_BLOCKING_SYNC=1 refuses events created without cudaEventBlockingSync
 * (cudaErrorInvalidValue).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef FAKE_RUNTIME
#define FAKE_RUNTIME 13000
#endif

#define STREAM_MAGIC 0x5354524dU
#define EVENT_MAGIC  0x4556454eU

typedef struct token {
    unsigned magic;
} token;

typedef struct block {
    struct block *next;
    uint8_t *p;
    size_t n;
} block;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static block *blocks;
static long copies;
static __thread int last_error;

static int err(int e)
{
    if (e)
        last_error = e;
    return e;
}

static int is_device(const void *p, size_t n)
{
    const uint8_t *b = p;
    int found = 0;
    pthread_mutex_lock(&mu);
    for (block *k = blocks; k && !found; k = k->next)
        found = b >= k->p && b + n <= k->p + k->n;
    pthread_mutex_unlock(&mu);
    return found;
}

static int copy_fails(void)
{
    const char *s = getenv("FAKE_CUDART_FAIL_COPY");
    pthread_mutex_lock(&mu);
    long n = ++copies;
    pthread_mutex_unlock(&mu);
    return s && atol(s) == n;
}

static int stream_ok(void *s)
{
    return s == NULL || ((token *)s)->magic == STREAM_MAGIC;
}

int cudaRuntimeGetVersion(int *v)
{
    *v = FAKE_RUNTIME;
    return 0;
}

int cudaDriverGetVersion(int *v)
{
    *v = FAKE_RUNTIME;
    return 0;
}

const char *cudaGetErrorName(int e)
{
    switch (e) {
    case 0:
        return "cudaSuccess";
    case 1:
        return "cudaErrorInvalidValue";
    case 2:
        return "cudaErrorMemoryAllocation";
    case 719:
        return "cudaErrorLaunchFailure";
    default:
        return "cudaErrorUnknown";
    }
}

int cudaGetLastError(void)
{
    int e = last_error;
    last_error = 0;
    return e;
}

int cudaGetDeviceCount(int *n)
{
    *n = 1;
    return 0;
}

int cudaGetDevice(int *d)
{
    *d = 0;
    return 0;
}

int cudaSetDevice(int d)
{
    return err(d == 0 ? 0 : 101);
}

int cudaDeviceGetAttribute(int *v, int attr, int dev)
{
    *v = attr == 75 ? 9 : attr == 76 ? 0 : attr == 16 ? 4 : 0;
    return 0;
}

int cudaDeviceSynchronize(void)
{
    return 0;
}

int cudaPointerGetAttributes(void *a, const void *p)
{
    int *head = a;
    head[0] = is_device(p, 1) ? 2 : 0;
    head[1] = head[0] ? 0 : -2;
    return 0;
}

int cudaMalloc(void **p, size_t n)
{
    block *k = malloc(sizeof *k);
    uint8_t *m = malloc(n ? n : 1);
    if (!k || !m) {
        free(k);
        free(m);
        return err(2);
    }
    k->p = m;
    k->n = n;
    pthread_mutex_lock(&mu);
    k->next = blocks;
    blocks = k;
    pthread_mutex_unlock(&mu);
    *p = m;
    return 0;
}

int cudaFree(void *p)
{
    pthread_mutex_lock(&mu);
    for (block **k = &blocks; *k; k = &(*k)->next) {
        if ((*k)->p == p) {
            block *d = *k;
            *k = d->next;
            pthread_mutex_unlock(&mu);
            free(d->p);
            free(d);
            return 0;
        }
    }
    pthread_mutex_unlock(&mu);
    return err(1);
}

int cudaHostAlloc(void **p, size_t n, unsigned flags)
{
    *p = malloc(n ? n : 1);
    return *p ? 0 : err(2);
}

int cudaFreeHost(void *p)
{
    free(p);
    return 0;
}

int cudaHostRegister(void *p, size_t n, unsigned flags)
{
    return p && n ? 0 : err(1);
}

int cudaHostUnregister(void *p)
{
    return 0;
}

int cudaMemcpy(void *d, const void *s, size_t n, int kind)
{
    memmove(d, s, n);
    return 0;
}

int cudaMemcpyAsync(void *d, const void *s, size_t n, int kind, void *stream)
{
    if (!stream_ok(stream))
        return err(400);
    if (copy_fails())
        return err(719);
    memmove(d, s, n);
    return 0;
}

int cudaMemset(void *d, int v, size_t n)
{
    memset(d, v, n);
    return 0;
}

static void *token_new(unsigned magic)
{
    token *t = malloc(sizeof *t);
    if (t)
        t->magic = magic;
    return t;
}

int cudaStreamCreateWithFlags(void **s, unsigned flags)
{
    *s = token_new(STREAM_MAGIC);
    return *s ? 0 : err(2);
}

int cudaStreamDestroy(void *s)
{
    if (!s || ((token *)s)->magic != STREAM_MAGIC)
        return err(400);
    ((token *)s)->magic = 0;
    free(s);
    return 0;
}

int cudaStreamSynchronize(void *s)
{
    return stream_ok(s) ? 0 : err(400);
}

#ifndef FAKE_OMIT_WAIT_EVENT
int cudaStreamWaitEvent(void *s, void *e, unsigned flags)
{
    return stream_ok(s) && e && ((token *)e)->magic == EVENT_MAGIC ? 0 : err(400);
}
#endif

int cudaEventCreateWithFlags(void **e, unsigned flags)
{
    /* FAKE_CUDART_BLOCKING_SYNC=1: an event a host thread could spin on (no
     * cudaEventBlockingSync, 0x01) is refused, so that a test sees every one of them. */
    const char *strict = getenv("FAKE_CUDART_BLOCKING_SYNC");
    if (strict && *strict == '1' && !(flags & 0x01u))
        return err(1);
    *e = token_new(EVENT_MAGIC);
    return *e ? 0 : err(2);
}

int cudaEventDestroy(void *e)
{
    if (!e || ((token *)e)->magic != EVENT_MAGIC)
        return err(400);
    ((token *)e)->magic = 0;
    free(e);
    return 0;
}

int cudaEventRecord(void *e, void *s)
{
    return e && ((token *)e)->magic == EVENT_MAGIC && stream_ok(s) ? 0 : err(400);
}

int cudaEventSynchronize(void *e)
{
    return e && ((token *)e)->magic == EVENT_MAGIC ? 0 : err(400);
}

int cudaEventQuery(void *e)
{
    return cudaEventSynchronize(e);
}

int cudaEventElapsedTime(float *ms, void *a, void *b)
{
    *ms = 0;
    return 0;
}

typedef struct attrs {
    int order;
    int loc[4];
    unsigned flags;
} attrs;

static __attribute__((unused)) int batch(void *const *dsts, const void *const *srcs,
                                         const size_t *sizes, size_t n, attrs *a, size_t *idx,
                                         size_t na, void *stream)
{
    if (!stream_ok(stream) || !a || !idx || na != 1 || idx[0] != 0 || a->order != 1)
        return err(1);
    if (copy_fails())
        return err(719);
    for (size_t i = 0; i < n; i++)
        memmove(dsts[i], srcs[i], sizes[i]);
    return 0;
}

#if FAKE_RUNTIME >= 13000
int cudaMemcpyBatchAsync(void *const *dsts, const void *const *srcs, const size_t *sizes, size_t n,
                         attrs *a, size_t *idx, size_t na, void *stream)
{
    return batch(dsts, srcs, sizes, n, a, idx, na, stream);
}
#elif FAKE_RUNTIME >= 12080
int cudaMemcpyBatchAsync(void *const *dsts, const void *const *srcs, const size_t *sizes, size_t n,
                         attrs *a, size_t *idx, size_t na, size_t *fail_idx, void *stream)
{
    /* The 12.8 ABI: failIdx is a pointer the call writes, before the stream. */
    if (!fail_idx || ((token *)fail_idx)->magic == STREAM_MAGIC)
        return err(1);
    *fail_idx = SIZE_MAX;
    return batch(dsts, srcs, sizes, n, a, idx, na, stream);
}
#endif

#include "probe.h"

#include "kvf/error.h"

#include "tcp.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <unistd.h>

#ifdef KVF_HAVE_VERBS
#include <infiniband/verbs.h>
#endif

static void step(kvf_probe_report *r, const char *name, int ok, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void step(kvf_probe_report *r, const char *name, int ok, const char *fmt, ...)
{
    if (r->n_steps == (int)(sizeof r->steps / sizeof r->steps[0]))
        return;
    kvf_probe_step *s = &r->steps[r->n_steps++];
    s->name = name;
    s->ok = ok;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->detail, sizeof s->detail, fmt, ap);
    va_end(ap);
}

static void probe_rdma(kvf_probe_report *r)
{
#ifdef KVF_HAVE_VERBS
    r->verbs_built = 1;
    int n = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    if (!list) {
        step(r, "rdma", 0, "libibverbs lists no device (no RDMA hardware or driver)");
        return;
    }
    r->rdma_listed = n;
    /* A device counts when it opens and registers a small locked buffer for remote access: that
     * is what a one-sided transfer needs from this side. */
    size_t len = 64 * 1024;
    void *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < n && buf != MAP_FAILED; i++) {
        struct ibv_context *ctx = ibv_open_device(list[i]);
        if (!ctx)
            continue;
        struct ibv_pd *pd = ibv_alloc_pd(ctx);
        struct ibv_mr *mr = pd ? ibv_reg_mr(pd, buf, len,
                                            IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ |
                                                IBV_ACCESS_REMOTE_WRITE)
                               : NULL;
        if (mr) {
            r->rdma_opened++;
            ibv_dereg_mr(mr);
        }
        if (pd)
            ibv_dealloc_pd(pd);
        ibv_close_device(ctx);
    }
    if (buf != MAP_FAILED)
        munmap(buf, len);
    ibv_free_device_list(list);
    step(r, "rdma", r->rdma_opened > 0,
         "%d device(s) listed, %d opened and registered 64 KiB; one-sided RDMA needs a peer to "
         "verify and is not claimed",
         n, r->rdma_opened);
#else
    step(r, "rdma", 0, "this build has no libibverbs: RDMA not probed");
#endif
}

/* CUDA as libkvf's connector finds it (cuda/): the runtime loaded by its versioned symbols, the
 * driver's version, the devices, batched copies and NVRTC for the page-copy kernel. */
static void probe_cuda(kvf_probe_report *r)
{
    kvf_cuda_info *ci = &r->cuda;
    if (kvf_cuda_probe(ci) != 0) {
        step(r, "cuda", 0, "%.150s", ci->why);
        return;
    }
    r->cuda_devices = ci->devices;
    step(r, "cuda", 1,
         "runtime %d.%d, driver %d.%d, %d device(s), cc %d.%d, %d SMs, batched copies %s, NVRTC "
         "%d.%d",
         ci->runtime_version / 1000, ci->runtime_version % 1000 / 10, ci->driver_version / 1000,
         ci->driver_version % 1000 / 10, ci->devices, ci->cc_major, ci->cc_minor, ci->sm_count,
         ci->batch_copy ? "yes" : "no", ci->nvrtc_version / 1000, ci->nvrtc_version % 1000 / 10);
}

/* The engine's features come from its built-in record (its public API): a host probe cannot run
 * an engine. kvf-mlx-probe executes mlx-lm's; the other engines' are declared. */
static void probe_engine(kvf_probe_report *r, const char *engine)
{
    kvf_caps *c = &r->caps, e;
    if (!engine || !*engine)
        return;
    snprintf(c->engine, sizeof c->engine, "%s", engine);
    if (kvf_caps_builtin(engine, &e) != 0 || !e.engine[0]) {
        step(r, "engine", 0, "%s: no built-in engine record; only the name is recorded", engine);
        return;
    }
    c->mem_kinds = e.mem_kinds;
    c->paged = e.paged;
    c->layerwise_hooks = e.layerwise_hooks;
    c->async_load = e.async_load;
    c->external_connector = e.external_connector;
    c->quant_bits = e.quant_bits;
    c->quant_groups = e.quant_groups;
    c->trim = e.trim;
    c->partial_evict = e.partial_evict;
    c->trim_can_fail = e.trim_can_fail;
    c->rotating_cache = e.rotating_cache;
    c->rotating_with_quant = e.rotating_with_quant;
    step(r, "engine", 1, "%s features from its built-in record (public API), not executed", engine);
}

int kvf__probe_host(kvf_probe_report *r, const char *engine)
{
    memset(r, 0, sizeof *r);
    kvf_caps *c = &r->caps;
    struct utsname u;
    uname(&u);
    snprintf(c->name, sizeof c->name, "probe:%.56s", u.nodename);
    snprintf(c->platform, sizeof c->platform, "%s",
             !strcmp(u.sysname, "Darwin") ? "macos" : "linux");
#if defined(__APPLE__) && defined(__aarch64__)
    c->apple_silicon = 1;
#endif
    /* TCP: bind a listener on loopback. */
    int fd;
    uint16_t port = 0;
    char err[160];
    if (kvf__tcp_listen("127.0.0.1", 0, 4, &fd, &port, err, sizeof err) == 0) {
        close(fd);
        c->transports |= KVF_TRANSPORT_TCP;
        step(r, "tcp", 1, "listener bound on 127.0.0.1:%u", port);
    } else {
        step(r, "tcp", 0, "%s", err);
    }
    probe_rdma(r);
    c->rdma_devices = r->rdma_opened;
    if (r->rdma_opened)
        c->transports |= KVF_TRANSPORT_RDMA;
    c->rdma_one_sided = 0; /* not verified without a peer */
    /* Locked memory: staging and RDMA registration need it. */
    size_t n = 64 * 1024;
    void *buf = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf != MAP_FAILED && mlock(buf, n) == 0) {
        munlock(buf, n);
        step(r, "mlock", 1, "locked and unlocked %zu bytes", n);
    } else {
        step(r, "mlock", 0, "cannot lock memory (memlock limit)");
    }
    if (buf != MAP_FAILED)
        munmap(buf, n);
    probe_cuda(r);
    /* The transfer path moves host and unified memory, and CUDA device memory where the runtime
     * loaded and a device is there. */
    c->mem_kinds = KVF_MEMK_HOST;
    c->xfer_mem_kinds = KVF_MEMK_HOST | KVF_MEMK_UNIFIED | (r->cuda.usable ? KVF_MEMK_CUDA : 0);
    probe_engine(r, engine);
    int trc = kvf_telemetry_read(&r->telemetry);
    step(r, "telemetry", trc == 0, "MemAvailable %llu MiB, PSI %s, cgroup %s",
         (unsigned long long)(r->telemetry.mem_available >> 20),
         r->telemetry.have_psi ? "readable" : "absent",
         r->telemetry.have_cgroup ? "readable" : "absent");
    return 0;
}

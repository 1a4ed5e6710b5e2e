/*
 * The CUDA loader's paths (cuda/loader.c), with the fake runtimes of tests/cuda/fake_cudart.c:
 * no library, an old runtime, a missing symbol, the 12.8 ABI of cudaMemcpyBatchAsync (failIdx)
 * and 13.0's (none), a runtime error by name, and a connector's registration refused with the
 * loader's reason. The loader runs once per process, so each case runs in a child of its own
 * with $KVF_CUDART set.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvf/connector.h"
#include "kvf/cuda.h"
#include "kvf/error.h"

#include "cu.h"
#include "cucopy.h"

/* Runs fn in a child with KVF_CUDART=lib (NULL: a path that does not exist); its output goes to
 * out. Returns the child's exit status. */
static int in_child(const char *lib, int (*fn)(char *out, size_t len), char *out, size_t len)
{
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(p[0]);
        setenv("KVF_CUDART", lib ? lib : "/nonexistent/libcudart.so.13", 1);
        char buf[1024] = "";
        int rc = fn(buf, sizeof buf);
        ssize_t w = write(p[1], buf, strlen(buf));
        (void)w;
        _exit(rc);
    }
    close(p[1]);
    size_t got = 0;
    ssize_t r;
    while (got + 1 < len && (r = read(p[0], out + got, len - 1 - got)) > 0)
        got += (size_t)r;
    out[got] = 0;
    close(p[0]);
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static int probe(char *out, size_t len)
{
    kvf_cuda_info ci;
    int rc = kvf_cuda_probe(&ci);
    snprintf(out, len, "usable=%d runtime=%d driver=%d batch=%d why=%s", ci.usable,
             ci.runtime_version, ci.driver_version, ci.batch_copy, ci.why);
    return rc == 0 ? 0 : 1;
}

/* A round trip of scattered pages through a copier: both directions, checked. */
static int copier_round_trip(char *out, size_t len)
{
    char err[300];
    const kvf__cu *cu = kvf__cuda(err, sizeof err);
    if (!cu) {
        snprintf(out, len, "not loaded: %s", err);
        return 1;
    }
    enum { PAGES = 37, PB = 1000 };
    uint8_t *dev = NULL, host[PAGES * PB], back[PAGES * PB];
    if (cu->Malloc((void **)&dev, 64 * PB))
        return 2;
    void *pages[PAGES];
    for (int i = 0; i < PAGES; i++) {
        pages[i] = dev + (size_t)((i * 7) % 64) * PB;
        for (int b = 0; b < PB; b++)
            host[i * PB + b] = (uint8_t)(i * 13 + b);
    }
    kvf__cucopy cc;
    if (kvf__cucopy_init(&cc, cu, 0, NULL, err, sizeof err))
        return 3;
    int rc = kvf__cucopy_begin(&cc, KVF__CU_H2D, PB, 0);
    if (!rc)
        rc = kvf__cucopy_group(&cc, host, pages, PAGES);
    if (!rc)
        rc = kvf__cucopy_end(&cc);
    if (!rc)
        rc = kvf__cucopy_begin(&cc, KVF__CU_D2H, PB, 0);
    if (!rc)
        rc = kvf__cucopy_group(&cc, back, pages, PAGES);
    if (!rc)
        rc = kvf__cucopy_end(&cc);
    snprintf(out, len, "rc=%s calls=%llu err=%s", kvf_err_name(rc),
             (unsigned long long)cc.batch_calls, cc.errmsg);
    kvf__cucopy_fini(&cc);
    cu->Free(dev);
    if (rc)
        return 4;
    return memcmp(host, back, sizeof host) == 0 ? 0 : 5;
}

static void test_cuda_loader_no_library(void **state)
{
    (void)state;
    char out[1024];
    assert_int_equal(in_child(NULL, probe, out, sizeof out), 1);
    assert_non_null(strstr(out, "usable=0"));
    assert_non_null(strstr(out, "cannot load /nonexistent/libcudart.so.13"));
}

static void test_cuda_loader_old_runtime(void **state)
{
    (void)state;
    char out[1024];
    assert_int_equal(in_child(FAKE_CUDART_OLD, probe, out, sizeof out), 1);
    assert_non_null(strstr(out, "runtime 11.8"));
    assert_non_null(strstr(out, "needs 12.0"));
}

static void test_cuda_loader_missing_symbol(void **state)
{
    (void)state;
    char out[1024];
    assert_int_equal(in_child(FAKE_CUDART_NOSYM, probe, out, sizeof out), 1);
    assert_non_null(strstr(out, "lacks cudaStreamWaitEvent"));
}

static void test_cuda_loader_abi_12_8(void **state)
{
    (void)state;
    char out[1024];
    assert_int_equal(in_child(FAKE_CUDART_12, probe, out, sizeof out), 0);
    assert_non_null(strstr(out, "runtime=12080"));
    assert_non_null(strstr(out, "batch=1"));
    /* The fake checks failIdx is there, before the stream: a 13.0 call would be refused. */
    int rc = in_child(FAKE_CUDART_12, copier_round_trip, out, sizeof out);
    if (rc)
        fail_msg("12.8 ABI: child %d: %s", rc, out);
}

static void test_cuda_loader_abi_13(void **state)
{
    (void)state;
    char out[1024];
    assert_int_equal(in_child(FAKE_CUDART_13, probe, out, sizeof out), 0);
    assert_non_null(strstr(out, "runtime=13000"));
    assert_non_null(strstr(out, "batch=1"));
    int rc = in_child(FAKE_CUDART_13, copier_round_trip, out, sizeof out);
    if (rc)
        fail_msg("13.0 ABI: child %d: %s", rc, out);
}

static void test_cuda_loader_unversioned_library(void **state)
{
    (void)state;
    /* No version nodes: taken by name, with the ABI of the version it reports (12.8: failIdx,
     * which the fake checks). */
    char out[1024];
    assert_int_equal(in_child(FAKE_CUDART_12_UNVERSIONED, probe, out, sizeof out), 0);
    assert_non_null(strstr(out, "runtime=12080"));
    int rc = in_child(FAKE_CUDART_12_UNVERSIONED, copier_round_trip, out, sizeof out);
    if (rc)
        fail_msg("unversioned 12.8: child %d: %s", rc, out);
}

static void test_cuda_loader_12_0_copies_one_by_one(void **state)
{
    (void)state;
    char out[1024];
    assert_int_equal(in_child(FAKE_CUDART_12_0, probe, out, sizeof out), 0);
    assert_non_null(strstr(out, "batch=0"));
    assert_non_null(strstr(out, "one copy per page"));
    int rc = in_child(FAKE_CUDART_12_0, copier_round_trip, out, sizeof out);
    if (rc)
        fail_msg("12.0: child %d: %s", rc, out);
}

static int failing_copy(char *out, size_t len)
{
    setenv("FAKE_CUDART_FAIL_COPY", "1", 1);
    return copier_round_trip(out, len) == 4 ? 0 : 1;
}

static void test_cuda_loader_error_by_name(void **state)
{
    (void)state;
    char out[1024];
    int rc = in_child(FAKE_CUDART_13, failing_copy, out, sizeof out);
    if (rc)
        fail_msg("child %d: %s", rc, out);
    assert_non_null(strstr(out, "rc=KVF_EIO"));
    assert_non_null(strstr(out, "cudaMemcpyBatchAsync: cudaErrorLaunchFailure (719)"));
}

static int register_without_runtime(char *out, size_t len)
{
    /* No store is needed to be refused: the connector opens lazily on an unreachable node. */
    kvf_layout l;
    if (kvf_layout_preset("ref-tiny", &l))
        return 2;
    const char *nodes[1] = {"127.0.0.1:1"};
    kvf_connector_opts o = {.nodes = nodes, .n_nodes = 1, .layout = l, .deadline_ms = 200};
    kvf_connector *cn;
    char err[400];
    if (kvf_connector_open(&cn, &o, err, sizeof err)) {
        snprintf(out, len, "open: %s", err);
        return 3;
    }
    kvf_kv_layer reg[4];
    static uint8_t mem[8][1 << 16];
    for (int i = 0; i < 4; i++)
        reg[i] = (kvf_kv_layer){mem[2 * i], mem[2 * i + 1], 8192, 4, KVF_MEM_CUDA};
    int rc = kvf_connector_register(cn, reg, 4, err, sizeof err);
    snprintf(out, len, "%s %s", kvf_err_name(rc), err);
    kvf_connector_close(&cn);
    return 0;
}

static void test_cuda_register_without_runtime_is_infeasible(void **state)
{
    (void)state;
    char out[1024];
    assert_int_equal(in_child(NULL, register_without_runtime, out, sizeof out), 0);
    assert_non_null(strstr(out, "KVF_EINFEASIBLE"));
    assert_non_null(strstr(out, "memory_kind"));
    assert_non_null(strstr(out, "no CUDA runtime"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cuda_loader_no_library),
        cmocka_unit_test(test_cuda_loader_old_runtime),
        cmocka_unit_test(test_cuda_loader_missing_symbol),
        cmocka_unit_test(test_cuda_loader_abi_12_8),
        cmocka_unit_test(test_cuda_loader_abi_13),
        cmocka_unit_test(test_cuda_loader_12_0_copies_one_by_one),
        cmocka_unit_test(test_cuda_loader_unversioned_library),
        cmocka_unit_test(test_cuda_loader_error_by_name),
        cmocka_unit_test(test_cuda_register_without_runtime_is_infeasible),
    };
    return cmocka_run_group_tests_name("cuda_loader", tests, NULL, NULL);
}

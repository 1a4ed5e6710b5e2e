/*
 * Unit tests of kvf probe and telemetry on this host: the probe executes its actions and its
 * record agrees with what it found, the record feeds the classifier, and telemetry values are
 * consistent. Nothing here assumes RDMA or CUDA: on a host without them the record must say so.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "kvf/kvf.h"

#include "probe.h"

static void test_probe_record_matches_what_it_found(void **state)
{
    (void)state;
    kvf_probe_report r;
    assert_int_equal(kvf__probe_host(&r, "reference"), 0);
    assert_true(r.n_steps >= 5);
    /* Every CI and developer host here can bind a loopback listener. */
    assert_true(r.caps.transports & KVF_TRANSPORT_TCP);
    assert_string_equal(r.steps[0].name, "tcp");
    assert_true(r.steps[0].ok);
    /* The record claims exactly the RDMA devices that opened, and never unverified one-sided. */
    assert_int_equal(r.caps.rdma_devices, r.rdma_opened);
    assert_int_equal((r.caps.transports & KVF_TRANSPORT_RDMA) != 0, r.rdma_opened > 0);
    assert_int_equal(r.caps.rdma_one_sided, 0);
    kvf_caps store;
    kvf_caps_builtin("kvf-store", &store);
    kvf_verdict v;
    kvf_classify(KVF_ACTION_RDMA_READ, &r.caps, &store, 0, &v);
    assert_int_equal(v.label, KVF_FEAS_BACKEND_INFEASIBLE);
    assert_int_equal(v.reason, KVF_FEAS_NO_RDMA_DEVICE); /* the store's record has no RDMA */
    /* The engine's features come from its built-in record, and a step says so. */
    kvf_caps ref;
    kvf_caps_builtin("reference", &ref);
    assert_string_equal(r.caps.engine, "reference");
    assert_int_equal(r.caps.paged, ref.paged);
    assert_int_equal(r.caps.layerwise_hooks, 1);
    assert_int_equal(r.caps.async_load, ref.async_load);
    int seen = 0;
    for (int i = 0; i < r.n_steps; i++)
        if (!strcmp(r.steps[i].name, "engine")) {
            seen = 1;
            assert_true(r.steps[i].ok);
            assert_non_null(strstr(r.steps[i].detail, "not executed"));
        }
    assert_true(seen);
    /* The probed record round-trips through JSON. */
    char *t = kvf_caps_to_json(&r.caps);
    kvf_caps back;
    char err[200];
    assert_int_equal(kvf_caps_from_json(t, strlen(t), &back, err, sizeof err), 0);
    assert_memory_equal(&back, &r.caps, sizeof back);
    free(t);
}

static void test_probe_unknown_engine_records_only_the_name(void **state)
{
    (void)state;
    kvf_probe_report r, bare;
    assert_int_equal(kvf__probe_host(&r, "no-such-engine"), 0);
    assert_int_equal(kvf__probe_host(&bare, NULL), 0);
    assert_string_equal(r.caps.engine, "no-such-engine");
    assert_string_equal(bare.caps.engine, "");
    assert_int_equal(r.caps.paged, 0);
    assert_int_equal(r.caps.layerwise_hooks, 0);
    assert_int_equal(r.caps.mem_kinds, KVF_MEMK_HOST);
    int failed = 0;
    for (int i = 0; i < r.n_steps; i++)
        failed |= !strcmp(r.steps[i].name, "engine") && !r.steps[i].ok;
    assert_true(failed);
    for (int i = 0; i < bare.n_steps; i++)
        assert_string_not_equal(bare.steps[i].name, "engine");
}

static void test_probe_telemetry_is_consistent(void **state)
{
    (void)state;
    kvf_telemetry t;
    assert_int_equal(kvf_telemetry_read(&t), 0);
    assert_true(t.mem_total > (64ull << 20));
    assert_true(t.mem_available > 0 && t.mem_available <= t.mem_total);
    if (t.have_psi)
        assert_true(t.psi_some_avg10 >= 0 && t.psi_some_avg10 <= 100);
    if (t.have_cgroup)
        assert_true(t.cgroup_usage > 0);
    double p = kvf_telemetry_pressure(&t);
    assert_true(p >= 0 && p <= 1);
    /* The pressure figure follows its inputs. */
    kvf_telemetry x = {.mem_total = 100, .mem_available = 25};
    assert_true(kvf_telemetry_pressure(&x) > 0.74 && kvf_telemetry_pressure(&x) < 0.76);
    x.have_psi = 1;
    x.psi_some_avg10 = 90;
    assert_true(kvf_telemetry_pressure(&x) > 0.89);
    x.have_cgroup = 1;
    x.cgroup_limit = 10;
    x.cgroup_usage = 10;
    assert_true(kvf_telemetry_pressure(&x) == 1.0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_probe_record_matches_what_it_found),
        cmocka_unit_test(test_probe_unknown_engine_records_only_the_name),
        cmocka_unit_test(test_probe_telemetry_is_consistent),
    };
    return cmocka_run_group_tests_name("probe", tests, NULL, NULL);
}

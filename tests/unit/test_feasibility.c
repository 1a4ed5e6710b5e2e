/*
 * Unit tests of the feasibility classifier: the rule chain for every action against each built-in
 * engine record (with a storage node as the remote side) and the expected label and reason, engine
 * to engine handoffs, simulated labels, record JSON round trips, the optimality gap, and the memory
 * estimator against hand-computed values for public model configs.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "kvf/kvf.h"

#define R  KVF_FEAS_REAL
#define I  KVF_FEAS_BACKEND_INFEASIBLE
#define OK KVF_FEAS_NONE

typedef struct expect {
    kvf_feas_label label;
    kvf_feas_reason reason;
} expect;

/* Rows: actions in KVF_ACTION_MAP order. Columns: mlx-lm, vllm, llama.cpp, reference, each
 * acting against a kvf-store node. */
static const expect table[KVF_ACTION_COUNT_][4] = {
    /* store */ {{R, OK}, {I, KVF_FEAS_MEMORY_KIND}, {R, OK}, {R, OK}},
    /* retrieve */ {{R, OK}, {I, KVF_FEAS_MEMORY_KIND}, {R, OK}, {R, OK}},
    /* lookup */ {{R, OK}, {R, OK}, {R, OK}, {R, OK}},
    /* move */ {{R, OK}, {I, KVF_FEAS_MEMORY_KIND}, {R, OK}, {R, OK}},
    /* prefetch */
    {{I, KVF_FEAS_NO_ASYNC_LOAD}, {I, KVF_FEAS_MEMORY_KIND}, {I, KVF_FEAS_NO_ASYNC_LOAD}, {R, OK}},
    /* evict */ {{R, OK}, {R, OK}, {R, OK}, {R, OK}},
    /* pin */ {{R, OK}, {R, OK}, {R, OK}, {R, OK}},
    /* unpin */ {{R, OK}, {R, OK}, {R, OK}, {R, OK}},
    /* clear */ {{R, OK}, {R, OK}, {R, OK}, {R, OK}},
    /* compress */ {{R, OK}, {R, OK}, {R, OK}, {R, OK}},
    /* decompress */ {{R, OK}, {R, OK}, {R, OK}, {R, OK}},
    /* rdma_read */
    {{I, KVF_FEAS_NO_RDMA_DEVICE},
     {I, KVF_FEAS_NO_RDMA_DEVICE},
     {I, KVF_FEAS_NO_RDMA_DEVICE},
     {I, KVF_FEAS_NO_RDMA_DEVICE}},
    /* rdma_write */
    {{I, KVF_FEAS_NO_RDMA_DEVICE},
     {I, KVF_FEAS_NO_RDMA_DEVICE},
     {I, KVF_FEAS_NO_RDMA_DEVICE},
     {I, KVF_FEAS_NO_RDMA_DEVICE}},
    /* layerwise_load */
    {{I, KVF_FEAS_NO_PAGED_LAYOUT},
     {I, KVF_FEAS_MEMORY_KIND},
     {I, KVF_FEAS_NO_PAGED_LAYOUT},
     {R, OK}},
    /* pd_handoff_direct */
    {{I, KVF_FEAS_NO_EXTERNAL_CONNECTOR},
     {I, KVF_FEAS_NO_EXTERNAL_CONNECTOR},
     {I, KVF_FEAS_NO_EXTERNAL_CONNECTOR},
     {I, KVF_FEAS_NO_EXTERNAL_CONNECTOR}},
    /* pd_handoff_store */ {{R, OK}, {I, KVF_FEAS_MEMORY_KIND}, {R, OK}, {R, OK}},
    /* kv_quantization */ {{R, OK}, {R, OK}, {R, OK}, {I, KVF_FEAS_NO_QUANTIZATION}},
    /* trim */ {{R, OK}, {I, KVF_FEAS_NO_TRIM}, {R, OK}, {I, KVF_FEAS_NO_TRIM}},
};

static void test_feasibility_rule_chain_matrix(void **state)
{
    (void)state;
    const char *engines[4] = {"mlx-lm", "vllm", "llama.cpp", "reference"};
    kvf_caps store;
    assert_int_equal(kvf_caps_builtin("kvf-store", &store), 0);
    for (int e = 0; e < 4; e++) {
        kvf_caps l;
        assert_int_equal(kvf_caps_builtin(engines[e], &l), 0);
        for (int a = 0; a < KVF_ACTION_COUNT_; a++) {
            kvf_verdict v;
            assert_int_equal(kvf_classify((kvf_action_id)a, &l, &store, 0, &v), 0);
            if (v.label != table[a][e].label || v.reason != table[a][e].reason)
                fail_msg("%s %s: got %s/%s (%s), expected %s/%s", engines[e],
                         kvf_action_name((kvf_action_id)a), kvf_feas_label_name(v.label),
                         kvf_feas_reason_name(v.reason), v.why,
                         kvf_feas_label_name(table[a][e].label),
                         kvf_feas_reason_name(table[a][e].reason));
            /* Every refusal names the side that lacks the capability. */
            if (v.label != R)
                assert_true(strstr(v.why, engines[e]) || strstr(v.why, "kvf-store"));
            /* With evaluation allowed, infeasible becomes simulated; the reason stays. */
            kvf_verdict s;
            kvf_classify((kvf_action_id)a, &l, &store, 1, &s);
            assert_int_equal(s.label, v.label == R ? R : KVF_FEAS_SIMULATED);
            assert_int_equal(s.reason, v.reason);
        }
    }
    kvf_verdict v;
    kvf_caps m;
    kvf_caps_builtin("mlx-lm", &m);
    assert_int_equal(kvf_classify(KVF_ACTION_COUNT_, &m, &store, 0, &v), KVF_EINVAL);
    /* llama.cpp can trim, and the sentence says a partial removal may be refused. */
    kvf_caps_builtin("llama.cpp", &m);
    kvf_classify(KVF_ACTION_TRIM, &m, &store, 0, &v);
    assert_non_null(strstr(v.why, "may be refused"));
}

/* Engine to engine: the direct handoff needs one-sided RDMA into memory both sides can reach. */
static void test_feasibility_handoffs(void **state)
{
    (void)state;
    kvf_caps a, b;
    char err[200];
    kvf_caps_builtin("vllm", &a);
    kvf_caps_builtin("vllm", &b);
    kvf_verdict v;
    kvf_classify(KVF_ACTION_PD_HANDOFF_DIRECT, &a, &b, 0, &v);
    assert_int_equal(v.reason, KVF_FEAS_MEMORY_KIND); /* this build cannot reach CUDA memory */
    const char *cuda = "{\"base\":\"vllm\",\"name\":\"vllm-cuda\",\"xfer_mem_kinds\":7}";
    assert_int_equal(kvf_caps_from_json(cuda, strlen(cuda), &a, err, sizeof err), 0);
    b = a;
    kvf_classify(KVF_ACTION_PD_HANDOFF_DIRECT, &a, &b, 0, &v);
    assert_int_equal(v.label, R);
    b.rdma_one_sided = 0;
    kvf_classify(KVF_ACTION_PD_HANDOFF_DIRECT, &a, &b, 0, &v);
    assert_int_equal(v.reason, KVF_FEAS_NO_ONE_SIDED);
    b.rdma_devices = 0;
    kvf_classify(KVF_ACTION_RDMA_READ, &a, &b, 0, &v);
    assert_int_equal(v.reason, KVF_FEAS_NO_RDMA_DEVICE);
    /* No transport in common. */
    kvf_caps x, y;
    kvf_caps_builtin("reference", &x);
    kvf_caps_builtin("kvf-store", &y);
    y.transports = KVF_TRANSPORT_RDMA;
    kvf_classify(KVF_ACTION_RETRIEVE, &x, &y, 0, &v);
    assert_int_equal(v.reason, KVF_FEAS_NO_COMMON_TRANSPORT);
    kvf_classify(KVF_ACTION_COMPRESS, &x, &x, 0, &v);
    assert_int_equal(v.reason, KVF_FEAS_NO_STORE);
}

static void test_feasibility_records_json(void **state)
{
    (void)state;
    for (size_t i = 0; kvf_caps_builtin_name(i); i++) {
        kvf_caps c, r;
        assert_int_equal(kvf_caps_builtin(kvf_caps_builtin_name(i), &c), 0);
        char *t = kvf_caps_to_json(&c);
        assert_non_null(t);
        char err[200];
        assert_int_equal(kvf_caps_from_json(t, strlen(t), &r, err, sizeof err), 0);
        assert_memory_equal(&c, &r, sizeof c);
        free(t);
    }
    kvf_caps c;
    char err[200];
    const char *bad[] = {
        "[]",           "{\"base\":\"nope\"}",  "{\"speed\":1}", "{\"paged\":\"yes\"}",
        "{\"name\":7}", "{\"rdma_devices\":-1}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(kvf_caps_from_json(bad[i], strlen(bad[i]), &c, err, sizeof err),
                         KVF_EINVAL);
    assert_int_equal(kvf_caps_builtin("tensorrt", &c), KVF_ENOENT);
    kvf_action_id a;
    assert_int_equal(kvf_action_parse("pd_handoff_store", &a), 0);
    assert_int_equal(a, KVF_ACTION_PD_HANDOFF_STORE);
    assert_int_equal(kvf_action_parse("teleport", &a), KVF_EINVAL);
}

static void test_feasibility_gap(void **state)
{
    (void)state;
    kvf_gap_state s;
    kvf_gap_state_defaults(&s);
    kvf_caps mlx, vllm_cuda, store;
    kvf_caps_builtin("mlx-lm", &mlx);
    kvf_caps_builtin("kvf-store", &store);
    kvf_gap g;
    assert_int_equal(kvf_optimality_gap(&mlx, &store, &s, &g), 0);
    /* Prefetch would save the most but mlx-lm cannot load while computing: the best real action
     * is a plain retrieve, and the gap is their difference. */
    assert_int_equal(g.best_all, KVF_ACTION_PREFETCH);
    assert_int_equal(g.best_feasible, KVF_ACTION_RETRIEVE);
    assert_true(g.gap > 0.25 && g.gap < 0.35);
    assert_true(g.gap == g.score_all - g.score_feasible);
    /* Where everything is real, the gap is zero. */
    char err[200];
    const char *all = "{\"base\":\"vllm\",\"xfer_mem_kinds\":7}";
    kvf_caps_from_json(all, strlen(all), &vllm_cuda, err, sizeof err);
    store.transports |= KVF_TRANSPORT_RDMA;
    store.rdma_devices = 1;
    store.rdma_one_sided = 1;
    store.xfer_mem_kinds = 7;
    assert_int_equal(kvf_optimality_gap(&vllm_cuda, &store, &s, &g), 0);
    assert_true(g.gap == 0);
    /* Scores move with the state: nothing cached, nothing to save. */
    s.cached_tokens = 0;
    assert_true(kvf_action_score(KVF_ACTION_RETRIEVE, &s) == 0);
}

/* Hand-computed: llama-3.1-8b bf16 is 32 x 2 x 8 x 128 x 2 = 131072 bytes a token; 8K tokens are
 * 1 GiB; 80 GiB hold 655360 tokens. deepseek-v3 (MLA) is 61 x 576 x 2 = 70272 bytes a token. */
static void test_feasibility_estimator(void **state)
{
    (void)state;
    kvf_layout l;
    kvf_estimate e;
    kvf_layout_preset("llama-3.1-8b", &l);
    assert_int_equal(kvf_layout_estimate(&l, 8192, 4, 80ull << 30, &e), 0);
    assert_int_equal(e.bytes_per_token, 131072);
    assert_int_equal(e.bytes_per_chunk, 131072ull * 256);
    assert_int_equal(e.bytes_per_sequence, 1ull << 30);
    assert_int_equal(e.bytes_total, 4ull << 30);
    assert_int_equal(e.chunks_per_sequence, 32);
    assert_int_equal(e.tokens_fit, 655360);
    assert_int_equal(e.sequences_fit, 80);
    kvf_layout_preset("deepseek-v3", &l);
    assert_int_equal(kvf_layout_estimate(&l, 131072, 1, 0, &e), 0);
    assert_int_equal(e.bytes_per_token, 70272);
    assert_int_equal(e.bytes_per_sequence, 70272ull * 131072);
    assert_int_equal(e.tokens_fit, 0);
    kvf_layout_preset("llama-3.1-70b", &l);
    l.tp_size = 8;
    l.tp_rank = 3;
    assert_int_equal(kvf_layout_estimate(&l, 1000, 1, 1ull << 30, &e), 0);
    assert_int_equal(e.bytes_per_token, 327680 / 8); /* one head per rank */
    assert_int_equal(e.tokens_fit, (1ull << 30) / 40960);
    assert_int_equal(kvf_layout_estimate(&l, UINT64_MAX / 2, 4, 0, &e), KVF_EOVERFLOW);
    l.layers = 0;
    assert_int_equal(kvf_layout_estimate(&l, 1, 1, 0, &e), KVF_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_feasibility_rule_chain_matrix),
        cmocka_unit_test(test_feasibility_handoffs),
        cmocka_unit_test(test_feasibility_records_json),
        cmocka_unit_test(test_feasibility_gap),
        cmocka_unit_test(test_feasibility_estimator),
    };
    return cmocka_run_group_tests_name("feasibility", tests, NULL, NULL);
}

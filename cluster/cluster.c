/*
 * kvf cluster up|down|status|send --config cluster.json [--netns] [--json]: a kvfabric cluster on
 * one machine (docs/operations.md).
 *
 * up starts N kvf-store, one kvf-sched and P prefill and D decode kvf-engine processes, each
 * waited for by its ready line, and writes what it started to RUN_DIR/state.json; down stops them
 * (SIGTERM, then SIGKILL after 5 s) and removes what up made; status says which are alive and
 * what each serves; send puts one request through it (send.c). With --netns every process is a host
 * of its own: a network namespace joined to the others through a bridge by a veth pair, its link
 * shaped with tc (bandwidth with tbf; latency with netem where the kernel has it), and this host
 * reaches them through one more veth. A failure or Ctrl-C during up undoes everything up did.
 */
#include "cluster.h"
#include "cluster_int.h"

#include "cli_common.h"
#include "proc.h"
#include "send.h"

#include "auth.h"
#include "http.h"
#include "kvf/kvf.h"
#include "tcp.h"

#include "jsonkeys.h"
#include "units.h"

#include <errno.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* Configuration */

static const char *cfg_where = "config"; /* the file being read, for messages */

static int get_int(json_t *o, const char *k, int def, int lo, int hi, int *out)
{
    json_t *v = json_object_get(o, k);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return -kvf__cluster_fail("%s: \"%s\" must be an integer in %d..%d", cfg_where, k, lo, hi);
    *out = (int)json_integer_value(v);
    return 0;
}

static int get_str(json_t *o, const char *k, const char *def, char *out, size_t n)
{
    json_t *v = json_object_get(o, k);
    if (v && (!json_is_string(v) || strlen(json_string_value(v)) >= n))
        return -kvf__cluster_fail("%s: \"%s\" must be a string of at most %zu bytes", cfg_where, k,
                                  n - 1);
    snprintf(out, n, "%s", v ? json_string_value(v) : def);
    return 0;
}

/* Checks what the JSON types cannot: the names that go into shell commands and interface names,
 * and the number of processes; fills in the default run directory. Returns 0, or 1 after
 * printing the field at fault. */
static int check_cfg(cfg *c)
{
    for (const char *p = c->name; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9')) || p - c->name >= 8)
            return kvf__cluster_fail(
                "%s: \"name\" must be 1..8 characters of a-z and 0-9 (it names "
                "network interfaces)",
                cfg_where);
    if (!c->name[0])
        return kvf__cluster_fail("%s: \"name\" is empty", cfg_where);
    for (const char *p = c->rate; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '.'))
            return kvf__cluster_fail("%s: netns.rate is a tc rate such as 10gbit or 500mbit",
                                     cfg_where);
    int dots = 0;
    for (const char *p = c->subnet; *p; p++) {
        if (*p == '.')
            dots++;
        else if (*p < '0' || *p > '9')
            dots = 99;
    }
    if (dots != 2)
        return kvf__cluster_fail(
            "%s: netns.subnet is the first three numbers of a /24, e.g. 10.77.0", cfg_where);
    if (c->etcd == 2)
        return kvf__cluster_fail("%s: \"etcd\" is 0 (none), 1 or 3 members: two cannot lose one",
                                 cfg_where);
    if (c->scheds * c->sched_shards > 16)
        return kvf__cluster_fail("%s: \"scheds\" x \"sched_shards\" is %d kvf-sched processes, "
                                 "at most 16",
                                 cfg_where, c->scheds * c->sched_shards);
    if (c->replicate_hits && c->replicas > c->stores)
        return kvf__cluster_fail("%s: \"replicas\" (%d holders of a hot chunk) is more than the "
                                 "%d \"stores\"",
                                 cfg_where, c->replicas, c->stores);
    if (c->replicate_hits && (!c->etcd || c->stores < 2))
        return kvf__cluster_fail("%s: \"replicate_hits\" needs \"etcd\" (the stores find each "
                                 "other there) and 2 or more \"stores\"",
                                 cfg_where);
    if (strcmp(c->engine, "kvf-engine") && strcmp(c->engine, "transformers"))
        return kvf__cluster_fail("%s: \"engine\" is kvf-engine or transformers, not \"%s\"",
                                 cfg_where, c->engine);
    uint64_t mem = 0;
    uint64_t disk = 0;
    if (c->store_disk[0] && (kvf__parse_size(c->store_disk, &disk) != 0 || disk < (64u << 20)))
        return kvf__cluster_fail("%s: \"store_disk\" must be a size of 64M or more such as "
                                 "\"8G\" (each store's disk tier, a file in the run directory), "
                                 "not \"%s\"",
                                 cfg_where, c->store_disk);
    if (strcmp(c->gpu_share, "timeslice") && strcmp(c->gpu_share, "mps"))
        return kvf__cluster_fail("%s: \"gpu_share\" is \"timeslice\" (the engines' processes "
                                 "take turns on a GPU they share) or \"mps\" (through an MPS "
                                 "control daemon, their kernels at once), not \"%s\"",
                                 cfg_where, c->gpu_share);
    if (strcmp(c->store_shm, "auto") && strcmp(c->store_shm, "off"))
        return kvf__cluster_fail("%s: \"store_shm\" is \"auto\" (same-host engines map the "
                                 "store's arena) or \"off\" (every engine over TCP), not \"%s\"",
                                 cfg_where, c->store_shm);
    if (kvf__parse_size(c->store_memory, &mem) != 0 || mem < (1u << 20))
        return kvf__cluster_fail("%s: \"store_memory\" must be a size of 1M or more such as "
                                 "512M or 4G, not \"%s\"",
                                 cfg_where, c->store_memory);
    if (c->stores + c->prefill + c->decode + c->n_ext + 1 > 200)
        return kvf__cluster_fail("%s: too many processes", cfg_where);
    if (!c->run_dir[0])
        snprintf(c->run_dir, sizeof c->run_dir, "build/cluster/%s", c->name);
    return 0;
}
/* An endpoint of an external engine's events: tcp://HOST:PORT. */
static int tcp_endpoint(const char *s)
{
    const char *colon = strrchr(s, ':');
    return !strncmp(s, "tcp://", 6) && strlen(s) > 6 && colon && colon > s + 6 && colon[1] >= '0' &&
           colon[1] <= '9' && strspn(colon + 1, "0123456789") == strlen(colon + 1);
}

/* "external_engines": [{"id", "role", "endpoint", "events", "replay", "block_tokens"}, ...]. */
static int load_external(json_t *a, cfg *c)
{
    static const char *const keys[] = {"id",     "role",         "endpoint", "events",
                                       "replay", "block_tokens", NULL};
    if (!a)
        return 0;
    if (!json_is_array(a) || json_array_size(a) > MAX_EXTERNAL)
        return kvf__cluster_fail("%s: \"external_engines\" must be an array of at most %d engines",
                                 cfg_where, MAX_EXTERNAL);
    size_t i;
    json_t *v;
    json_array_foreach(a, i, v)
    {
        ext_engine *e = &c->ext[i];
        char where[600], kerr[700];
        snprintf(where, sizeof where, "%s: external_engines[%zu]", cfg_where, i);
        if (!json_is_object(v))
            return kvf__cluster_fail("%s: not an object", where);
        if (kvf__json_keys_check(v, keys, where, kerr, sizeof kerr) != 0)
            return kvf__cluster_fail("%s", kerr);
        const char *saved = cfg_where;
        cfg_where = where;
        int rc = get_str(v, "id", "", e->id, sizeof e->id) ||
                 get_str(v, "role", "both", e->role, sizeof e->role) ||
                 get_str(v, "endpoint", "", e->endpoint, sizeof e->endpoint) ||
                 get_str(v, "events", "", e->events, sizeof e->events) ||
                 get_str(v, "replay", "", e->replay, sizeof e->replay) ||
                 get_int(v, "block_tokens", 16, 1, 65536, &e->block_tokens);
        cfg_where = saved;
        if (rc)
            return 1;
        if (!e->id[0] || strspn(e->id, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                       "0123456789._-") != strlen(e->id))
            return kvf__cluster_fail("%s: \"id\" must be 1..63 characters of A-Z, a-z, 0-9, ., _ "
                                     "and -",
                                     where);
        for (size_t j = 0; j < i; j++)
            if (!strcmp(c->ext[j].id, e->id))
                return kvf__cluster_fail("%s: \"id\" \"%s\" is given twice", where, e->id);
        if (strcmp(e->role, "prefill") && strcmp(e->role, "decode") && strcmp(e->role, "both"))
            return kvf__cluster_fail("%s: \"role\" is prefill, decode or both, not \"%s\"", where,
                                     e->role);
        if (!tcp_endpoint(e->events))
            return kvf__cluster_fail("%s: \"events\" is the engine's KV events publisher, "
                                     "tcp://HOST:PORT (vLLM's kv_events_config endpoint), not "
                                     "\"%s\"",
                                     where, e->events);
        if (e->replay[0] && !tcp_endpoint(e->replay))
            return kvf__cluster_fail("%s: \"replay\" is the engine's replay socket, "
                                     "tcp://HOST:PORT (vLLM's replay_endpoint), not \"%s\"",
                                     where, e->replay);
        c->n_ext = (int)i + 1;
    }
    return 0;
}

static int load_cfg(const char *path, cfg *c)
{
    memset(c, 0, sizeof *c);
    cfg_where = path;
    json_error_t je;
    json_t *o = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!o || !json_is_object(o)) {
        json_decref(o);
        return kvf__cluster_fail("%s:%d: %s", path, je.line, o ? "not a JSON object" : je.text);
    }
    int max_tokens = 16384, rc = 0;
    static const char *const top_keys[] = {"name",
                                           "model",
                                           "engine",
                                           "engine_args",
                                           "python",
                                           "gpu_share",
                                           "store_memory",
                                           "store_disk",
                                           "store_shm",
                                           "policy",
                                           "run_dir",
                                           "stores",
                                           "prefill",
                                           "decode",
                                           "store_threads",
                                           "netns",
                                           "engine_max_tokens",
                                           "scheds",
                                           "etcd",
                                           "etcd_ttl",
                                           "replicate_hits",
                                           "replicas",
                                           "sched_shards",
                                           "external_engines",
                                           NULL};
    static const char *const netns_keys[] = {"subnet", "rate", "delay_ms", NULL};
    char kerr[700], where[600];
    json_t *ns = json_object_get(o, "netns");
    snprintf(where, sizeof where, "%s: netns", path);
    if (kvf__json_keys_check(o, top_keys, path, kerr, sizeof kerr) != 0 ||
        (ns && kvf__json_keys_check(ns, netns_keys, where, kerr, sizeof kerr) != 0)) {
        json_decref(o);
        return kvf__cluster_fail("%s", kerr);
    }
    if (ns && !json_is_object(ns))
        rc = kvf__cluster_fail("%s: \"netns\" must be an object", cfg_where);
    double delay = 0;
    json_t *dv = ns ? json_object_get(ns, "delay_ms") : NULL;
    if (dv && (!json_is_number(dv) || json_number_value(dv) < 0 || json_number_value(dv) > 1000))
        rc = kvf__cluster_fail("%s: netns.delay_ms must be a number of milliseconds in 0..1000",
                               cfg_where);
    delay = dv ? json_number_value(dv) : 0;
    if (rc || get_str(o, "name", "local", c->name, sizeof c->name) ||
        get_str(o, "model", "ref-tiny", c->model, sizeof c->model) ||
        get_str(o, "engine", "kvf-engine", c->engine, sizeof c->engine) ||
        get_str(o, "engine_args", "", c->engine_args, sizeof c->engine_args) ||
        get_str(o, "python", "python3", c->python, sizeof c->python) ||
        get_str(o, "gpu_share", "timeslice", c->gpu_share, sizeof c->gpu_share) ||
        get_str(o, "store_memory", "256M", c->store_memory, sizeof c->store_memory) ||
        get_str(o, "store_disk", "", c->store_disk, sizeof c->store_disk) ||
        get_str(o, "store_shm", "auto", c->store_shm, sizeof c->store_shm) ||
        get_str(o, "policy", "kvf_cost", c->policy, sizeof c->policy) ||
        get_str(o, "run_dir", "", c->run_dir, sizeof c->run_dir) ||
        get_int(o, "stores", 1, 1, 16, &c->stores) ||
        get_int(o, "prefill", 1, 1, 16, &c->prefill) ||
        get_int(o, "decode", 1, 1, 16, &c->decode) ||
        get_int(o, "store_threads", 1, 1, 64, &c->store_threads) ||
        get_int(o, "scheds", 1, 1, 4, &c->scheds) || get_int(o, "etcd", 0, 0, 3, &c->etcd) ||
        get_int(o, "etcd_ttl", 5, 2, 60, &c->etcd_ttl) ||
        get_int(o, "replicate_hits", 0, 0, 255, &c->replicate_hits) ||
        get_int(o, "replicas", 2, 2, 8, &c->replicas) ||
        get_int(o, "sched_shards", 1, 1, 8, &c->sched_shards) ||
        get_int(o, "engine_max_tokens", 16384, 256, 1 << 20, &max_tokens) ||
        (ns && get_str(ns, "subnet", "10.77.0", c->subnet, sizeof c->subnet)) ||
        (ns && get_str(ns, "rate", "", c->rate, sizeof c->rate))) {
        json_decref(o);
        return 1;
    }
    if (load_external(json_object_get(o, "external_engines"), c) != 0) {
        json_decref(o);
        return 1;
    }
    json_decref(o);
    if (!ns)
        snprintf(c->subnet, sizeof c->subnet, "10.77.0");
    c->max_tokens = max_tokens;
    c->delay_ms = delay;
    return check_cfg(c);
}

/* ------------------------------------------------------------------------------------------ */
/* down, status */

static int cmd_down(const cfg *c)
{
    proc p[MAX_PROCS];
    int np, netns;
    if (kvf__cluster_state_read(c, p, &np, &netns) != 0) {
        printf("kvf cluster down: no cluster \"%s\" is up (no %s/state.json)\n", c->name,
               c->run_dir);
        return 0;
    }
    int alive = 0;
    for (int i = 0; i < np; i++)
        alive += kvf__cluster_ours_alive(p[i].pid);
    kvf__cluster_mps mps;
    kvf__cluster_state_mps(c, &mps);
    int had_mps = mps.started;
    kvf__cluster_stop_procs(p, np, 0);
    if (netns)
        kvf__cluster_netns_down(c, p, np);
    kvf__cluster_mps_stop(&mps); /* after its clients, the engines */
    char path[600];
    kvf__cluster_state_path(c, path, sizeof path);
    unlink(path);
    printf("kvf cluster down \"%s\": stopped %d of %d processes (the others had already "
           "exited)%s%s; logs stay in %s\n",
           c->name, alive, np, netns ? ", removed the network namespaces" : "",
           had_mps ? ", asked the MPS control daemon to quit" : "", c->run_dir);
    return 0;
}

/* One line of what a process serves, from its own API. */
static void probe(const proc *q, char *out, size_t n, json_t **detail)
{
    char url[256], err[256];
    long status = 0;
    json_t *r = NULL;
    *detail = NULL;
    if (!strcmp(q->kind, "store")) {
        char host[160];
        uint16_t port;
        int fd = -1;
        if (kvf__addr_parse(q->addr, host, sizeof host, &port) == 0 &&
            kvf__tcp_connect(host, port, 2000, &fd, err, sizeof err) == 0) {
            close(fd);
            snprintf(out, n, "accepting connections");
        } else {
            snprintf(out, n, "NOT accepting connections");
        }
        return;
    }
    int etcd = !strcmp(q->kind, "etcd"), relay = !strcmp(q->kind, "relay");
    snprintf(url, sizeof url, "http://%s%s", q->addr,
             etcd                       ? "/health"
             : relay                    ? "/v1/relay"
             : strcmp(q->kind, "sched") ? "/v1/health"
                                        : "/v1/index/stats");
    if (kvf__http_call("GET", url, NULL, 2000, &status, &r, err, sizeof err) != 0 ||
        status != 200 || !r) {
        snprintf(out, n, "NOT answering %.200s", url);
        json_decref(r);
        return;
    }
    if (etcd)
        snprintf(out, n, "etcd member, health %s",
                 json_string_value(json_object_get(r, "health"))
                     ? json_string_value(json_object_get(r, "health"))
                     : "unknown");
    else if (relay)
        snprintf(out, n, "relaying %.160s: %lld batches in, %lld out, %lld lost",
                 json_string_value(json_object_get(r, "from"))
                     ? json_string_value(json_object_get(r, "from"))
                     : "?",
                 (long long)json_integer_value(json_object_get(r, "batches")),
                 (long long)json_integer_value(json_object_get(r, "published")),
                 (long long)json_integer_value(json_object_get(r, "lost")));
    else if (!strcmp(q->kind, "sched"))
        snprintf(out, n, "%lld instances, %lld blocks indexed, %lld event batches",
                 (long long)json_integer_value(json_object_get(r, "instances")),
                 (long long)json_integer_value(json_object_get(r, "blocks")),
                 (long long)json_integer_value(json_object_get(r, "batches")));
    else
        snprintf(out, n, "%lld requests served, %lld waiting",
                 (long long)json_integer_value(json_object_get(r, "requests")),
                 (long long)json_integer_value(json_object_get(r, "waiting")));
    *detail = r;
}

static int cmd_status(const cfg *c, int json)
{
    proc p[MAX_PROCS];
    int np, netns;
    if (kvf__cluster_state_read(c, p, &np, &netns) != 0) {
        if (json)
            printf("{\"name\":\"%s\",\"up\":false}\n", c->name);
        else
            printf("cluster \"%s\": not up (no %s/state.json)\n", c->name, c->run_dir);
        return 3;
    }
    int alive_all = 1;
    json_t *arr = json_array();
    if (!json)
        printf("cluster \"%s\" (%s):\n", c->name, netns ? "network namespaces" : "loopback");
    for (int i = 0; i < np; i++) {
        int alive = kvf__cluster_ours_alive(p[i].pid);
        alive_all &= alive;
        char what[256] = "";
        json_t *detail = NULL;
        if (alive)
            probe(&p[i], what, sizeof what, &detail);
        if (json)
            json_array_append_new(arr, json_pack("{s:s,s:s,s:s,s:i,s:b,s:s,s:o*}", "name",
                                                 p[i].name, "kind", p[i].kind, "addr", p[i].addr,
                                                 "pid", (int)p[i].pid, "alive", alive, "status",
                                                 what, "detail", detail));
        else {
            printf("  %-10s %-7s %-22s pid %-7d %s %s\n", p[i].name, p[i].kind, p[i].addr,
                   (int)p[i].pid, alive ? "up  " : "DOWN", what);
            json_decref(detail);
        }
    }
    if (json) {
        json_t *o = json_pack("{s:s,s:b,s:b,s:o}", "name", c->name, "up", alive_all, "netns", netns,
                              "procs", arr);
        char *t = json_dumps(o, JSON_COMPACT);
        printf("%s\n", t);
        free(t);
        json_decref(o);
    } else {
        json_decref(arr);
    }
    return alive_all ? 0 : 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Options */

#define SYNOPSIS                                                                         \
    "kvf cluster up|down|status|send --config FILE [--netns] [--json] [--synthetic N | " \
    "--tokens-file F] [--seed S] [--max-tokens M]"

enum {
    OPT_CONFIG = KVF__CLI_OPT_OWN,
    OPT_NETNS,
    OPT_MAX_TOKENS,
};

static const struct option cluster_opts[] = {
    {"config", required_argument, NULL, OPT_CONFIG},
    {"netns", no_argument, NULL, OPT_NETNS},
    {"max-tokens", required_argument, NULL, OPT_MAX_TOKENS},
    KVF__CLI_OPTS_TOKENS,
    KVF__CLI_OPTS_JSON,
    KVF__CLI_OPTS_HELP,
    KVF__CLI_OPTS_END,
};

static const char cluster_usage[] =
    "usage: " SYNOPSIS "\n"
    "Starts (up), stops (down) or inspects (status) a kvfabric cluster on this machine: the\n"
    "stores, kvf-sched, and the prefill and decode engines that FILE asks for; or sends one\n"
    "request through it (send) as its clients do: placed by kvf-sched, prefilled, decoded.\n"
    "  --config FILE                    the cluster, as JSON (see cluster/demo.json)\n"
    "  --netns                          up: every process in a network namespace of its own,\n"
    "                                   its link shaped as FILE says (needs root)\n"
    "  --json                           status, send: one JSON object on stdout\n"
    "  --synthetic N [--seed S]         send: a prompt of N deterministic tokens\n"
    "  --tokens-file FILE               send: the prompt's token ids\n"
    "  --max-tokens M                   send: tokens to generate (default 8)\n"
    "exit status: 0 done (status: every process is up), 1 a step failed (status: a process\n"
    "             is down; send: the request failed or was rejected), 2 a usage or\n"
    "             configuration error, 3 status, send: no cluster is up,\n"
    "             130 up was interrupted and undid what it had done\n";

typedef struct cluster_args {
    const char *action; /* up, down, status or send */
    const char *config;
    int netns, json;
    kvf__cli_target send; /* send: the prompt's tokens */
    long max_tokens;
} cluster_args;

/* argv[0] is "cluster", argv[1] the action, the options follow. */
static int parse_cluster(int argc, char **argv, cluster_args *a)
{
    const char *v;
    int c;
    a->action = argc > 1 ? argv[1] : "";
    if (!strcmp(a->action, "--help") || !strcmp(a->action, "-h")) {
        fputs(cluster_usage, stdout);
        return 0;
    }
    if (strcmp(a->action, "up") && strcmp(a->action, "down") && strcmp(a->action, "status") &&
        strcmp(a->action, "send")) {
        if (!a->action[0])
            return kvf__cluster_fail("an action is required (usage: " SYNOPSIS ")") + 1;
        return kvf__cluster_fail("%s \"%s\" (usage: " SYNOPSIS ")",
                                 a->action[0] == '-' ? "unknown option" : "unknown action",
                                 a->action) +
               1;
    }
    while ((c = kvf__cli_next_opt(argc - 1, argv + 1, cluster_opts, &v)) != 0) {
        if (c == 'h') {
            fputs(cluster_usage, stdout);
            return 0;
        } else if (c == OPT_CONFIG) {
            a->config = v;
        } else if (c == OPT_NETNS) {
            a->netns = 1;
        } else if (c == KVF__CLI_OPT_JSON) {
            a->json = 1;
        } else if (c == OPT_MAX_TOKENS) {
            if (kvf__cli_parse_long("--max-tokens", v, &a->max_tokens) != 0)
                return 2;
            if (a->max_tokens < 1 || a->max_tokens > 4096)
                return kvf__cluster_fail("--max-tokens must be 1..4096") + 1;
        } else if (c == KVF__CLI_OPT_SYNTHETIC || c == KVF__CLI_OPT_SEED ||
                   c == KVF__CLI_OPT_TOKENS_FILE) {
            if (kvf__cli_target_set(&a->send, c, v) != 0)
                return 2;
        } else if (c == KVF__CLI_OPT_NOVALUE) {
            return kvf__cluster_fail("%s needs a value (usage: " SYNOPSIS ")", v) + 1;
        } else {
            return kvf__cluster_fail("unknown option %s (usage: " SYNOPSIS ")", v) + 1;
        }
    }
    if (!a->config)
        return kvf__cluster_fail("--config FILE is required (see cluster/demo.json)") + 1;
    return KVF__CLI_RUN;
}

/* Sends one request through the cluster's router (send.c), with the cluster's model. */
static int cmd_send(const cfg *c, cluster_args *a)
{
    proc p[MAX_PROCS];
    int np, netns;
    if (kvf__cluster_state_read(c, p, &np, &netns) != 0) {
        fprintf(stderr, "kvf cluster send: cluster \"%s\" is not up (no %s/state.json)\n", c->name,
                c->run_dir);
        return 3;
    }
    char scheds[700] = ""; /* every replica: the router fails over between them */
    for (int i = 0; i < np; i++)
        if (!strcmp(p[i].kind, "sched")) {
            size_t l = strlen(scheds);
            snprintf(scheds + l, sizeof scheds - l, "%s%s", l ? "," : "", p[i].addr);
        }
    const char *sched = scheds[0] ? scheds : NULL;
    if (!sched)
        return kvf__cluster_fail("the state of cluster \"%s\" names no kvf-sched", c->name);
    char tokens[640];
    snprintf(tokens, sizeof tokens, "%s/sched.tokens", c->run_dir);
    kvf__sched_token_from_file(tokens);  /* none: a cluster of an older launcher */
    kvf__auth_cred_from_dir(c->run_dir); /* the chunk keys depend on the tenant's salt */
    a->send.model = c->model;
    return kvf__cluster_send(sched, &a->send, (uint32_t)a->max_tokens, a->json);
}

int kvf__cli_cluster(int argc, char **argv)
{
    cluster_args a = {.max_tokens = 8};
    kvf__cli_target_init(&a.send);
    int rc = parse_cluster(argc, argv, &a);
    cfg c;
    if (rc == KVF__CLI_RUN && load_cfg(a.config, &c) != 0)
        rc = 2;
    if (rc == KVF__CLI_RUN) {
        if (!strcmp(a.action, "up"))
            rc = kvf__cluster_up(&c, a.netns);
        else if (!strcmp(a.action, "down"))
            rc = cmd_down(&c);
        else if (!strcmp(a.action, "send"))
            rc = cmd_send(&c, &a);
        else
            rc = cmd_status(&c, a.json);
    }
    kvf__cli_target_free(&a.send);
    return rc;
}

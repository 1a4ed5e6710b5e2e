/*
 * kvf cluster up (cluster_int.h): starts the stores, calibrates the cost model, starts kvf-sched
 * and the engines, each waited for by its ready line, with the cluster's credentials (made here,
 * docs/security.md), and writes the state file; a failure or Ctrl-C undoes every step.
 */
#include "cluster_int.h"

#include "creds.h"
#include "proc.h"
#include "units.h"

#include "auth.h"
#include "kvf/kvf.h"

#include <errno.h>
#include <jansson.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* up */

/* Exit status of an up that Ctrl-C (or SIGTERM) interrupted. */
#define INTERRUPTED 130

/* What up has started so far, and what its later steps need from the earlier ones. */
typedef struct launch {
    const cfg *c;
    int netns;
    proc p[MAX_PROCS]; /* started, in order; undo stops them in reverse */
    int np;
    char shaping[256]; /* how the links are shaped (--netns), for the last line and state.json */
    char store_bin[1024], sched_bin[1024], engine_bin[1024], relay_bin[1024];
    char ext_config[700];    /* kvf-sched's --config naming the external engines (empty: none) */
    char stores[2048];       /* the stores' addresses, comma-separated */
    char store_events[2048]; /* their chunk-event endpoints, in the same order */
    char store_snaps[2048];  /* their snapshot endpoints, in the same order */
    char cost[700];          /* the cost model calibrate measured */
    char sched[700];         /* kvf-sched's replicas' addresses, comma-separated */
    char shards_arg[16];     /* "sched_shards", as the engines' --event-shards */
    char etcd[600];          /* the etcd members' endpoints ("etcd"), comma-separated */
    char etcd_ttl[16];       /* the stores' and replicas' leases, seconds */
    char tokens[640];        /* kvf-sched's token file, in the run directory */
    char token_env[160];     /* KVF_SCHED_TOKEN=..., for the engines */
    char tenants[640];       /* the stores' tenants file (--auth), in the run directory */
    char cred_env[760];      /* KVF_CREDENTIAL=RUN_DIR/cluster.cred, for the engines */
    char admin_cred[700];    /* kvf-sched's key for the KV events (an admin subscriber) */
    char events_cred[700];   /* the publishers' CURVE key (stores, engines) */
    char events_key[65];     /* its X25519 public key in hex, for kvf-sched */
    /* engine "transformers": where the interpreter finds the package and libkvf, the layout file
     * the calibration writes, and engine_args split into words */
    char py_path_env[1100], py_lib_env[1100], layout_file[700], args_buf[512];
    char *extra[32];
    int n_extra;
    kvf__cluster_mps mps; /* "gpu_share": "mps" */
    char mps_env[300];    /* CUDA_MPS_PIPE_DIRECTORY=..., for the engines (empty: none) */
    char mps_log_env[600];
} launch;

/* Engines run by the Python package load a model first (transformers' import alone takes
 * seconds; an 8B model's weights more): they get longer to say they are ready. */
#define PY_READY_MS 600000

static int py_engine(const cfg *c)
{
    return !strcmp(c->engine, "transformers");
}

/* Starts p as args (in p's namespace when it has one), its output in RUN_DIR/NAME.log, and waits
 * for its ready line, whose listen= becomes p->addr. Returns 0, or 1 after printing why. */
static int start_one(const cfg *c, proc *p, char **args, int n_args, char *const env[],
                     int ready_ms)
{
    char *argv[80];
    int k = 0;
    if (p->ns[0]) {
        argv[k++] = (char *)"ip";
        argv[k++] = (char *)"netns";
        argv[k++] = (char *)"exec";
        argv[k++] = p->ns;
    }
    for (int i = 0; i < n_args && k < 79; i++)
        argv[k++] = args[i];
    argv[k] = NULL;
    snprintf(p->log, sizeof p->log, "%s/%s.log", c->run_dir, p->name);
    unlink(p->log);
    char err[512];
    p->pid = kvf__proc_spawn_detached(argv, p->log, env, err, sizeof err);
    if (p->pid < 0)
        return kvf__cluster_fail("%s: %s", p->name, err);
    if (kvf__proc_wait_ready(p->pid, p->log, ready_ms, &kvf__cluster_interrupted, p->ready,
                             sizeof p->ready, err, sizeof err) != 0)
        return kvf__cluster_fail("%s (%s) %s", p->name, p->log, err);
    if (kvf__proc_ready_field(p->ready, "listen", p->addr, sizeof p->addr) != 0)
        return kvf__cluster_fail("%s (%s): its ready line names no address: \"%s\"", p->name,
                                 p->log, p->ready);
    printf("  %-10s %-7s %-22s pid %-7d log %s\n", p->name, p->kind, p->addr, (int)p->pid, p->log);
    fflush(stdout);
    return 0;
}

/* The next process, and its host: with --netns a namespace of its own at address number L->np,
 * listening on port 7400 (events on 7401); otherwise loopback, the process choosing its ports.
 * Returns NULL when the namespace cannot be made. */
static proc *add_proc(launch *L, const char *name, const char *kind, char listen[64],
                      char events[64])
{
    proc *q = &L->p[L->np++];
    memset(q, 0, sizeof *q);
    snprintf(q->name, sizeof q->name, "%s", name);
    snprintf(q->kind, sizeof q->kind, "%s", kind);
    if (!L->netns) {
        snprintf(listen, 64, "127.0.0.1:0");
        snprintf(events, 64, "127.0.0.1:0");
        return q;
    }
    kvf__cluster_ns_name(L->c, name, q->ns, sizeof q->ns);
    if (kvf__cluster_netns_host(L->c, q, L->np, L->shaping, sizeof L->shaping) != 0)
        return NULL;
    snprintf(listen, 64, "%s.%d:7400", L->c->subnet, L->np);
    snprintf(events, 64, "%s.%d:7401", L->c->subnet, L->np);
    return q;
}

static void append_to_list(char *list, size_t n, const char *item)
{
    size_t l = strlen(list);
    snprintf(list + l, n - l, "%s%s", l ? "," : "", item);
}

static int mkdirs(const char *path)
{
    char buf[600];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *s = buf + 1; *s; s++) {
        if (*s != '/')
            continue;
        *s = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return -1;
        *s = '/';
    }
    return mkdir(buf, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

/* Refuses a cluster whose state file names processes that are still alive. */
static int refuse_if_up(const cfg *c)
{
    proc p[MAX_PROCS];
    int np = 0, netns;
    if (kvf__cluster_state_read(c, p, &np, &netns) != 0)
        return 0;
    for (int i = 0; i < np; i++)
        if (kvf__cluster_ours_alive(p[i].pid))
            return kvf__cluster_fail(
                "cluster \"%s\" is already up (%s/state.json); run kvf cluster down first", c->name,
                c->run_dir);
    return 0;
}

/* Ctrl-C and SIGTERM set kvf__cluster_interrupted instead of ending up, so that it can undo what it
 * did. */
static void catch_interrupts(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kvf__cluster_on_interrupt;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* The steps of up, in order. Each returns 0, 1 after printing why it failed, or INTERRUPTED;
 * the first that does not return 0 ends up, and undo() reverses what the earlier ones did. */

/* With --netns: the command log, and the hub that joins the hosts' namespaces. */
static int begin_netns(launch *L)
{
    if (!L->netns)
        return 0;
    char cmdlog[620];
    snprintf(cmdlog, sizeof cmdlog, "%s/netns.log", L->c->run_dir);
    kvf__cluster_cmdlog = fopen(cmdlog, "w");
    setenv("KVF_CMDLOG", cmdlog, 1);
    kvf__cluster_netns_down(L->c, L->p, 0); /* leftovers of a crashed run of the same name */
    return kvf__cluster_netns_hub(L->c, L->shaping, sizeof L->shaping);
}

/* The engine's command: kvf-engine --serve, or the interpreter running kvfabric.serve with the
 * config's engine_args after rest. Returns the words written (argv[n] is not set). */
static int engine_argv(launch *L, char **argv, int max, char **rest, int n_rest)
{
    int k = 0;
    if (py_engine(L->c)) {
        argv[k++] = (char *)L->c->python;
        argv[k++] = "-m";
        argv[k++] = "kvfabric.serve";
    } else {
        argv[k++] = L->engine_bin;
        argv[k++] = "--serve";
    }
    for (int i = 0; i < n_rest && k < max - 1; i++)
        argv[k++] = rest[i];
    for (int i = 0; py_engine(L->c) && i < L->n_extra && k < max - 1; i++)
        argv[k++] = L->extra[i];
    /* the engines register in etcd too, where the cluster has one: every replica then learns
     * them from there and removes one when its lease goes */
    if (L->etcd[0] && k + 6 < max) {
        char *e[] = {"--etcd", L->etcd, "--cluster", (char *)L->c->name, "--etcd-ttl", L->etcd_ttl};
        for (int i = 0; i < 6; i++)
            argv[k++] = e[i];
    }
    return k;
}

/* For engine "transformers": PYTHONPATH for the kvfabric package ($KVF_PYTHONPATH, else the
 * source tree's python/ this build came from), KVF_LIBRARY for the libkvf.so beside this build's
 * programs, and engine_args in words. */
static int python_engine_env(launch *L)
{
    const char *dir = getenv("KVF_PYTHONPATH");
#ifdef KVF_PYTHON_DIR
    dir = dir && dir[0] ? dir : KVF_PYTHON_DIR;
#endif
    char probe[1200];
    snprintf(probe, sizeof probe, "%s/kvfabric/serve.py", dir ? dir : "");
    if (!dir || access(probe, R_OK) != 0)
        return kvf__cluster_fail("engine \"transformers\" runs the kvfabric Python package: set "
                                 "KVF_PYTHONPATH to the folder holding kvfabric/ (python/ in the "
                                 "source tree)");
    snprintf(L->py_path_env, sizeof L->py_path_env, "PYTHONPATH=%s", dir);
    char lib[1060];
    snprintf(lib, sizeof lib, "%s", L->engine_bin);
    char *slash = strrchr(lib, '/');
    if (slash) {
        snprintf(slash, sizeof lib - (size_t)(slash - lib), "/../libkvf.so");
        if (access(lib, R_OK) == 0)
            snprintf(L->py_lib_env, sizeof L->py_lib_env, "KVF_LIBRARY=%s", lib);
    }
    snprintf(L->args_buf, sizeof L->args_buf, "%s", L->c->engine_args);
    char *sv = NULL;
    for (char *t = strtok_r(L->args_buf, " \t", &sv); t; t = strtok_r(NULL, " \t", &sv)) {
        if (L->n_extra == 32)
            return kvf__cluster_fail("config: \"engine_args\" has more than 32 words");
        L->extra[L->n_extra++] = t;
    }
    return 0;
}

/* Finds the daemons' programs and says what up is about to start. */
static int announce(launch *L)
{
    const cfg *c = L->c;
    snprintf(L->store_bin, sizeof L->store_bin, "%s", kvf__proc_find_bin("kvf-store"));
    snprintf(L->sched_bin, sizeof L->sched_bin, "%s", kvf__proc_find_bin("kvf-sched"));
    snprintf(L->engine_bin, sizeof L->engine_bin, "%s", kvf__proc_find_bin("kvf-engine"));
    snprintf(L->relay_bin, sizeof L->relay_bin, "%s", kvf__proc_find_bin("kvf-relay"));
    if (py_engine(c) && python_engine_env(L) != 0)
        return 1;
    snprintf(L->shards_arg, sizeof L->shards_arg, "%d", c->sched_shards);
    printf("kvf cluster up \"%s\": %d store(s), %d scheduler(s), %d prefill and %d decode "
           "engine(s), model %s (%s), %s%s\n",
           c->name, c->stores, c->scheds * c->sched_shards, c->prefill, c->decode, c->model,
           py_engine(c) ? "python3 -m kvfabric.serve" : "kvf-engine",
           L->netns ? "one network namespace per host" : "loopback",
           c->etcd == 3 ? ", etcd of 3 members"
           : c->etcd    ? ", etcd of 1 member"
                        : "");
    return 0;
}

/* Credentials for the stores (docs/security.md, creds.h), in the run directory, readable by their
 * owner only: the tenant "cluster" that the engines and tools use (cluster.cred), an admin for an
 * operator's management requests and kvf-sched's event subscriptions (admin.cred), the stores'
 * tenants file with their public keys (store.tenants), and the events key. */
static int make_credentials(launch *L)
{
    const char *rd = L->c->run_dir;
    char err[4400];
    if (kvf__cluster_make_creds(rd, "store.tenants", 0, L->events_key, err, sizeof err) != 0)
        return kvf__cluster_fail("%s", err);
    snprintf(L->tenants, sizeof L->tenants, "%s/store.tenants", rd);
    snprintf(L->cred_env, sizeof L->cred_env, "KVF_CREDENTIAL=%s/cluster.cred", rd);
    snprintf(L->admin_cred, sizeof L->admin_cred, "%s/admin.cred", rd);
    snprintf(L->events_cred, sizeof L->events_cred, "%s/events.cred", rd);
    return 0;
}

/* "etcd": 1 or 3 members, before anything that registers in them. */
static int start_etcd(launch *L)
{
    const cfg *c = L->c;
    if (!c->etcd)
        return 0;
    char client[3][64], peer[3][64];
    proc *first = NULL;
    for (int i = 0; i < c->etcd; i++) {
        char name[32];
        snprintf(name, sizeof name, "etcd%d", i);
        proc *q = add_proc(L, name, "etcd", client[i], peer[i]);
        if (!q)
            return 1;
        first = first ? first : q;
        if (!L->netns) {
            int cp = kvf__cluster_free_port(), pp = kvf__cluster_free_port();
            if (cp < 0 || pp < 0)
                return kvf__cluster_fail("no free port on loopback for %s", name);
            snprintf(client[i], 64, "127.0.0.1:%d", cp);
            snprintf(peer[i], 64, "127.0.0.1:%d", pp);
        }
    }
    snprintf(L->etcd_ttl, sizeof L->etcd_ttl, "%d", c->etcd_ttl);
    return kvf__cluster_etcd_start(c, first, c->etcd, client, peer, L->etcd, sizeof L->etcd);
}

static int start_store(launch *L, int i)
{
    const cfg *c = L->c;
    char node[16], name[32], threads[16], listen[64], events[64], ep[160];
    snprintf(node, sizeof node, "%d", i);
    snprintf(name, sizeof name, "store%d", i);
    snprintf(threads, sizeof threads, "%d", c->store_threads);
    proc *q = add_proc(L, name, "store", listen, events);
    if (!q)
        return 1;
    /* Every client authenticates (--auth), every event subscriber too (CURVE): also in
     * namespaces, whose addresses are not loopback, no --insecure. */
    char *args[] = {L->store_bin,
                    "--listen",
                    listen,
                    "--memory",
                    (char *)c->store_memory,
                    "--threads",
                    threads,
                    "--auth",
                    L->tenants,
                    "--log-level",
                    "info",
                    "--events",
                    events,
                    "--node",
                    node,
                    "--events-credential",
                    L->events_cred};
    /* "store_disk": a disk tier under each store's arena, a file of the run directory */
    char disk[1200];
    char *with_disk[sizeof args / sizeof args[0] + 4];
    int n = (int)(sizeof args / sizeof args[0]);
    memcpy(with_disk, args, sizeof args);
    if (c->store_disk[0]) {
        snprintf(disk, sizeof disk, "%s/store%d.disk:%s", c->run_dir, i, c->store_disk);
        with_disk[n++] = "--disk";
        with_disk[n++] = disk;
    }
    /* "store_shm": "off" makes every engine use TCP (a same-host engine would map the arena) */
    if (!strcmp(c->store_shm, "off")) {
        with_disk[n++] = "--shm";
        with_disk[n++] = "off";
    }
    char *with_etcd[sizeof with_disk / sizeof with_disk[0] + 12];
    memcpy(with_etcd, with_disk, sizeof with_disk);
    char rep[16], reps[16];
    if (L->etcd[0]) { /* registered under a lease: kvf-sched finds it there */
        char *e[] = {"--etcd", L->etcd, "--cluster", (char *)c->name, "--etcd-ttl", L->etcd_ttl};
        memcpy(with_etcd + n, e, sizeof e);
        n += 6;
        /* hot entries copied to the next store of their key: the stores find each other in
         * etcd, as kvf-sched finds them */
        if (c->replicate_hits) { /* pushed as an admin: a copy keeps its namespace */
            snprintf(rep, sizeof rep, "%d", c->replicate_hits);
            snprintf(reps, sizeof reps, "%d", c->replicas);
            with_etcd[n++] = "--replicate-hits";
            with_etcd[n++] = rep;
            with_etcd[n++] = "--replicas";
            with_etcd[n++] = reps;
            with_etcd[n++] = "--copy-credential";
            with_etcd[n++] = L->admin_cred;
        }
    }
    /* A store touches its whole arena before its ready line (prefault): 2 s more per GiB, so
     * that a large arena on a slow host is not taken for a store that failed to start. */
    uint64_t mem = 0;
    kvf__parse_size(c->store_memory, &mem); /* checked with the config */
    uint64_t ready_ms = READY_MS + (mem >> 30) * 2000;
    if (start_one(c, q, with_etcd, n, NULL, ready_ms > 600000 ? 600000 : (int)ready_ms) != 0)
        return 1;
    /* kvf-sched subscribes to each store's chunk events, numbered in this order. */
    if (kvf__proc_ready_field(q->ready, "events", ep, sizeof ep) == 0) {
        append_to_list(L->store_events, sizeof L->store_events, ep);
        if (kvf__proc_ready_field(q->ready, "snapshot", ep, sizeof ep) != 0 || !strcmp(ep, "-"))
            return kvf__cluster_fail("%s: no snapshot endpoint in its ready line", q->name);
        append_to_list(L->store_snaps, sizeof L->store_snaps, ep);
    }
    append_to_list(L->stores, sizeof L->stores, q->addr);
    return 0;
}

static int start_stores(launch *L)
{
    if (make_credentials(L) != 0)
        return 1;
    for (int i = 0; i < L->c->stores; i++) {
        if (kvf__cluster_interrupted)
            return INTERRUPTED;
        if (start_store(L, i) != 0)
            return 1;
    }
    return 0;
}

/* Waits for the calibration run pid to exit, unless Ctrl-C comes first: then it is one of ours to
 * stop. Returns 0 with its wait status in *status, or -1 when it did not exit by itself. */
static int wait_calibration(pid_t pid, int *status)
{
    pid_t w;
    while ((w = waitpid(pid, status, 0)) < 0 && errno == EINTR && !kvf__cluster_interrupted)
        ;
    if (w == pid)
        return 0;
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return -1;
}

/* The scheduler's cost model, measured on this host by an engine of the model served
 * (kvf-engine --calibrate), into L->cost. */
static int calibrate(launch *L)
{
    char *env[] = {"OPENBLAS_NUM_THREADS=1", L->token_env,  L->cred_env,
                   L->py_path_env,           L->py_lib_env, L->mps_env,
                   L->mps_log_env,           NULL};
    const cfg *c = L->c;
    if (kvf__cluster_interrupted)
        return INTERRUPTED;
    char log[700], err[256], maxt[24];
    snprintf(L->cost, sizeof L->cost, "%s/cost.json", c->run_dir);
    snprintf(log, sizeof log, "%s/calibrate.log", c->run_dir);
    snprintf(L->layout_file, sizeof L->layout_file, "%s/layout.json", c->run_dir);
    snprintf(maxt, sizeof maxt, "%ld", c->max_tokens);
    unlink(log);
    char *rest[] = {"--calibrate",  L->cost, "--model",      (char *)c->model,
                    "--max-tokens", maxt,    "--layout-out", L->layout_file};
    char *argv[80];
    /* kvf-engine's calibration knows the model's layout: no --layout-out */
    int n = engine_argv(L, argv, 80, rest, py_engine(c) ? 8 : 6);
    argv[n] = NULL;
    /* kvf-engine --calibrate takes no --serve, nor --max-tokens */
    char *ref[] = {L->engine_bin, "--calibrate", L->cost, "--model", (char *)c->model, NULL};
    pid_t pid = kvf__proc_spawn_detached(py_engine(c) ? argv : ref, log, env, err, sizeof err);
    int st = 0;
    int exited = pid > 0 && wait_calibration(pid, &st) == 0;
    if (kvf__cluster_interrupted)
        return INTERRUPTED;
    if (!exited || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        return kvf__cluster_fail("calibrating the cost model failed (%s)", log);
    printf("  cost model: %s (measured here; %s)\n", L->cost, log);
    return 0;
}

/* A fresh token for kvf-sched in RUN_DIR/sched.tokens, readable by its owner only (creds.h);
 * L->token_env hands it to the engines, and the state file names the file for kvf cluster send
 * and kvf-bench e2e. */
static int make_token(launch *L)
{
    char hex[65], err[4400];
    if (kvf__cluster_make_token(L->c->run_dir, hex, err, sizeof err) != 0)
        return kvf__cluster_fail("%s", err);
    snprintf(L->tokens, sizeof L->tokens, "%s/sched.tokens", L->c->run_dir);
    snprintf(L->token_env, sizeof L->token_env, "KVF_SCHED_TOKEN=%s", hex);
    return 0;
}

/* External engine i's relay ("relay0", ...): it follows the engine's events (and replay socket)
 * and publishes them again in the cluster's shards of kvf-sched's index (one shard: one stream),
 * under the events key as the cluster's engines do, with a replay window of its own. Its record,
 * under the relay's endpoints, goes into o; where the cluster has etcd the relay registers it
 * there itself, under its lease, and o gets nothing (the replicas learn it from etcd, and drop
 * it when the relay dies). */
static int start_relay(launch *L, int i, json_t *o)
{
    const cfg *c = L->c;
    const ext_engine *e = &c->ext[i];
    char name[32], listen[64], events[64], ev[160], rep[160];
    snprintf(name, sizeof name, "relay%d", i);
    proc *q = add_proc(L, name, "relay", listen, events);
    if (!q)
        return 1;
    char *args[32] = {L->relay_bin,   "--from",    (char *)e->events, "--shards", L->shards_arg,
                      "--events",     events,      "--listen",        listen,     "--credential",
                      L->events_cred, "--tenants", L->tenants};
    int n = 13;
    if (e->replay[0]) {
        args[n++] = "--from-replay";
        args[n++] = (char *)e->replay;
    }
    char *reg = NULL;
    if (L->etcd[0]) {
        json_t *r = json_pack("{s:s,s:s,s:s,s:i}", "id", e->id, "role", e->role, "endpoint",
                              e->endpoint, "block_tokens", e->block_tokens);
        reg = r ? json_dumps(r, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
        json_decref(r);
        if (!reg)
            return kvf__cluster_fail("out of memory");
        char *x[] = {"--etcd",     L->etcd,     "--cluster",  (char *)c->name,
                     "--etcd-ttl", L->etcd_ttl, "--register", reg};
        memcpy(args + n, x, sizeof x);
        n += (int)(sizeof x / sizeof x[0]);
    }
    /* its topic: the cluster tenant's, as the engines' (KVF_CREDENTIAL) */
    char *env[] = {L->cred_env, NULL};
    int rc = start_one(c, q, args, n, env, READY_MS);
    free(reg);
    if (rc != 0)
        return 1;
    if (kvf__proc_ready_field(q->ready, "events", ev, sizeof ev) != 0 ||
        kvf__proc_ready_field(q->ready, "replay", rep, sizeof rep) != 0)
        return kvf__cluster_fail("%s (%s): its ready line names no events or replay endpoint: "
                                 "\"%s\"",
                                 q->name, q->log, q->ready);
    printf("  %-10s relays %s (%s) for %s%s\n", "", e->events,
           e->replay[0] ? e->replay : "no replay", e->id, L->etcd[0] ? ", registered in etcd" : "");
    if (L->etcd[0])
        return 0;
    json_t *r = json_pack("{s:s,s:s,s:s,s:s,s:s,s:i,s:i}", "id", e->id, "role", e->role, "endpoint",
                          e->endpoint, "events", ev, "replay", rep, "block_tokens", e->block_tokens,
                          "event_shards", c->sched_shards);
    if (!r || json_array_append_new(json_object_get(o, "instances"), r) != 0)
        return kvf__cluster_fail("out of memory");
    return 0;
}

/* "external_engines": their relays, and the file that tells kvf-sched's replicas of them. */
static int start_relays(launch *L)
{
    const cfg *c = L->c;
    if (!c->n_ext)
        return 0;
    json_t *o = json_pack("{s:[]}", "instances");
    int rc = o ? 0 : kvf__cluster_fail("out of memory");
    for (int i = 0; !rc && i < c->n_ext; i++)
        rc = kvf__cluster_interrupted ? INTERRUPTED : start_relay(L, i, o);
    if (L->etcd[0]) { /* the relays registered the engines in etcd */
        json_decref(o);
        return rc;
    }
    snprintf(L->ext_config, sizeof L->ext_config, "%s/external.json", c->run_dir);
    if (!rc && json_dump_file(o, L->ext_config, JSON_INDENT(2)) != 0)
        rc = kvf__cluster_fail("cannot write %s: %s", L->ext_config, strerror(errno));
    json_decref(o);
    return rc;
}

/* kvf-sched process r ("scheds" replicas of each of "sched_shards" shards, shard by shard):
 * "sched", then "sched1", ... */
static int start_replica(launch *L, int r, const char *chunk)
{
    const cfg *c = L->c;
    char name[32], listen[64], events[64], shard[32];
    snprintf(name, sizeof name, r ? "sched%d" : "sched", r);
    proc *q = add_proc(L, name, "sched", listen, events);
    if (!q)
        return 1;
    char *args[32] = {L->sched_bin, "--listen", listen,           "--policy",   (char *)c->policy,
                      "--cost",     L->cost,    "--chunk-tokens", (char *)chunk};
    int n = 9;
    if (L->etcd[0]) { /* the stores come and go through etcd */
        char *e[] = {"--etcd", L->etcd, "--cluster", (char *)c->name, "--etcd-ttl", L->etcd_ttl};
        memcpy(args + n, e, sizeof e);
        n += 6;
    } else {
        args[n++] = "--stores";
        args[n++] = L->stores;
        if (L->store_events[0]) { /* only when a store publishes events */
            args[n++] = "--store-events";
            args[n++] = L->store_events;
            args[n++] = "--store-snapshots";
            args[n++] = L->store_snaps;
        }
    }
    /* Every request that changes kvf-sched's state is authenticated, also in namespaces. */
    args[n++] = "--tokens";
    args[n++] = L->tokens;
    /* The KV events come over CURVE, kvf-sched an admin subscriber that sees every tenant's. */
    args[n++] = "--events-credential";
    args[n++] = L->admin_cred;
    args[n++] = "--events-server-key";
    args[n++] = L->events_key;
    if (L->ext_config[0]) { /* the external engines, reached through their relays */
        args[n++] = "--config";
        args[n++] = L->ext_config;
    }
    if (c->sched_shards > 1) { /* its shard of the index: the engines publish by shard */
        snprintf(shard, sizeof shard, "%d/%d", r / c->scheds, c->sched_shards);
        args[n++] = "--shard";
        args[n++] = shard;
    }
    if (start_one(c, q, args, n, NULL, READY_MS) != 0)
        return 1;
    append_to_list(L->sched, sizeof L->sched, q->addr);
    return 0;
}

static int start_sched(launch *L)
{
    const cfg *c = L->c;
    if (kvf__cluster_interrupted)
        return INTERRUPTED;
    kvf_layout lay;
    unsigned ct = kvf_layout_preset(c->model, &lay) == 0 ? lay.chunk_tokens : 256u;
    if (py_engine(c)) { /* the layout the calibration wrote */
        json_error_t je;
        json_t *o = json_load_file(L->layout_file, 0, &je);
        json_t *v = json_object_get(json_object_get(o, "layout"), "chunk_tokens");
        int ok = json_is_integer(v) && json_integer_value(v) > 0;
        ct = ok ? (unsigned)json_integer_value(v) : ct;
        json_decref(o);
        if (!ok)
            return kvf__cluster_fail("%s: no layout.chunk_tokens", L->layout_file);
    }
    char chunk[16];
    snprintf(chunk, sizeof chunk, "%u", ct);
    if (make_token(L) != 0)
        return 1;
    for (int r = 0; r < c->scheds * c->sched_shards; r++) {
        if (kvf__cluster_interrupted)
            return INTERRUPTED;
        if (start_replica(L, r, chunk) != 0)
            return 1;
    }
    return 0;
}

/* Engine i: the prefill engines first, then the decode engines. */
static int start_engine(launch *L, int i)
{
    char *env[] = {"OPENBLAS_NUM_THREADS=1", L->token_env,  L->cred_env,
                   L->py_path_env,           L->py_lib_env, L->mps_env,
                   L->mps_log_env,           NULL};
    const cfg *c = L->c;
    int pre = i < c->prefill;
    char name[32], listen[64], events[64], maxt[24];
    snprintf(name, sizeof name, "%s%d", pre ? "prefill" : "decode", pre ? i : i - c->prefill);
    snprintf(maxt, sizeof maxt, "%ld", c->max_tokens);
    proc *q = add_proc(L, name, pre ? "prefill" : "decode", listen, events);
    if (!q)
        return 1;
    /* Its requests with the cluster's token (as kvf-sched's), its events over CURVE: also in
     * namespaces, no --insecure. */
    char *args[] = {"--id",
                    q->name,
                    "--role",
                    q->kind,
                    "--listen",
                    listen,
                    "--sched",
                    L->sched,
                    "--events",
                    events,
                    "--model",
                    (char *)c->model,
                    "--max-tokens",
                    maxt,
                    "--cost",
                    L->cost,
                    "--events-credential",
                    L->events_cred,
                    "--events-tenants",
                    L->tenants,
                    "--tokens",
                    L->tokens};
    char *argv[80];
    int n = engine_argv(L, argv, 78, args, (int)(sizeof args / sizeof args[0]));
    if (c->sched_shards > 1) { /* kvf-sched's index is sharded: events go by shard */
        argv[n++] = "--event-shards";
        argv[n++] = L->shards_arg;
    }
    return start_one(c, q, argv, n, env, py_engine(c) ? PY_READY_MS : READY_MS);
}

static int start_engines(launch *L)
{
    for (int i = 0; i < L->c->prefill + L->c->decode; i++) {
        if (kvf__cluster_interrupted)
            return INTERRUPTED;
        if (start_engine(L, i) != 0)
            return 1;
    }
    return 0;
}

/* "gpu_share": "mps": the daemon the engines reach the GPU through (cluster_mps.c). */
static int start_gpu_share(launch *L)
{
    if (kvf__cluster_interrupted)
        return INTERRUPTED;
    /* A daemon an earlier up of this cluster started and no down stopped (its processes died:
     * refuse_if_up let this up go on) is stopped first, or nothing would reach it again. */
    kvf__cluster_mps old;
    kvf__cluster_state_mps(L->c, &old);
    if (old.started) {
        printf("  stopping the MPS control daemon an earlier up left (pipes %s)\n", old.pipe);
        kvf__cluster_mps_stop(&old);
    }
    if (strcmp(L->c->gpu_share, "mps") && getenv("CUDA_MPS_PIPE_DIRECTORY")) {
        /* "timeslice" means what it says, whatever daemon this shell names */
        printf("  gpu share: time slices (CUDA_MPS_PIPE_DIRECTORY, set here, not given to the "
               "engines: \"gpu_share\": \"mps\" uses it)\n");
        unsetenv("CUDA_MPS_PIPE_DIRECTORY");
    }
    if (kvf__cluster_mps_start(L->c, &L->mps) != 0)
        return 1;
    if (L->mps.pipe[0])
        snprintf(L->mps_env, sizeof L->mps_env, "CUDA_MPS_PIPE_DIRECTORY=%s", L->mps.pipe);
    if (L->mps.log_dir[0])
        snprintf(L->mps_log_env, sizeof L->mps_log_env, "CUDA_MPS_LOG_DIRECTORY=%s",
                 L->mps.log_dir);
    return 0;
}

static int record_state(launch *L)
{
    if (kvf__cluster_interrupted)
        return INTERRUPTED;
    return kvf__cluster_state_write(L->c, L->p, L->np, L->netns, L->shaping, &L->mps);
}

static int (*const up_steps[])(launch *L) = {
    begin_netns, announce,     start_gpu_share, start_etcd,    start_stores,
    calibrate,   start_relays, start_sched,     start_engines, record_state,
};

/* Stops what up started and removes what it made. Returns the exit status: INTERRUPTED after
 * Ctrl-C, whichever step noticed it first, else rc. */
static int undo(launch *L, int rc)
{
    if (kvf__cluster_interrupted) {
        fprintf(stderr, "kvf cluster: interrupted: undoing\n");
        rc = INTERRUPTED;
    }
    kvf__cluster_stop_procs(L->p, L->np, 1);
    if (L->netns)
        kvf__cluster_netns_down(L->c, L->p, L->np);
    kvf__cluster_mps_stop(&L->mps);
    return rc;
}

int kvf__cluster_up(const cfg *c, int netns)
{
    if (refuse_if_up(c) != 0)
        return 1;
    if (netns && c->n_ext)
        return kvf__cluster_fail("\"external_engines\" are reached from this host's network: "
                                 "not with --netns, whose processes each have a network of "
                                 "their own");
    if (mkdirs(c->run_dir) != 0)
        return kvf__cluster_fail("cannot create %s: %s", c->run_dir, strerror(errno));
    catch_interrupts();
    launch L = {.c = c, .netns = netns};
    int rc = 0;
    for (size_t i = 0; i < sizeof up_steps / sizeof up_steps[0] && !rc; i++)
        rc = up_steps[i](&L);
    if (rc)
        rc = undo(&L, rc);
    else
        printf("cluster \"%s\" is up: scheduler(s) http://%s, state in %s/state.json%s%s\n",
               c->name, L.sched, c->run_dir, L.shaping[0] ? "; links: " : "", L.shaping);
    if (kvf__cluster_cmdlog)
        fclose(kvf__cluster_cmdlog);
    kvf__cluster_cmdlog = NULL;
    return rc;
}

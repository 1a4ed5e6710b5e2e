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

#include "cli_common.h"
#include "proc.h"
#include "send.h"

#include "auth.h"
#include "http.h"
#include "kvf/kvf.h"
#include "tcp.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_PROCS 64
#define READY_MS  30000

typedef struct cfg {
    char name[16], model[32], store_memory[32], policy[32], run_dir[512];
    int stores, prefill, decode, store_threads;
    long max_tokens;
    /* --netns */
    char subnet[32], rate[32];
    double delay_ms;
} cfg;

typedef struct proc {
    char name[32], kind[16], addr[160], log[600], ns[64];
    char ready[512]; /* its ready line: listen=, events=, ... */
    pid_t pid;
} proc;

static volatile int g_interrupted;

static void on_interrupt(int sig)
{
    (void)sig;
    g_interrupted = 1;
}

static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "kvf cluster: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Configuration */

static int get_int(json_t *o, const char *k, int def, int lo, int hi, int *out)
{
    json_t *v = json_object_get(o, k);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return -fail("config: \"%s\" must be an integer in %d..%d", k, lo, hi);
    *out = (int)json_integer_value(v);
    return 0;
}

static int get_str(json_t *o, const char *k, const char *def, char *out, size_t n)
{
    json_t *v = json_object_get(o, k);
    if (v && (!json_is_string(v) || strlen(json_string_value(v)) >= n))
        return -fail("config: \"%s\" must be a string of at most %zu bytes", k, n - 1);
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
            return fail("config: \"name\" must be 1..8 characters of a-z and 0-9 (it names "
                        "network interfaces)");
    if (!c->name[0])
        return fail("config: \"name\" is empty");
    for (const char *p = c->rate; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '.'))
            return fail("config: netns.rate is a tc rate such as 10gbit or 500mbit");
    int dots = 0;
    for (const char *p = c->subnet; *p; p++) {
        if (*p == '.')
            dots++;
        else if (*p < '0' || *p > '9')
            dots = 99;
    }
    if (dots != 2)
        return fail("config: netns.subnet is the first three numbers of a /24, e.g. 10.77.0");
    if (c->stores + c->prefill + c->decode + 1 > 200)
        return fail("config: too many processes");
    if (!c->run_dir[0])
        snprintf(c->run_dir, sizeof c->run_dir, "build/cluster/%s", c->name);
    return 0;
}
static int load_cfg(const char *path, cfg *c)
{
    memset(c, 0, sizeof *c);
    json_error_t je;
    json_t *o = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!o || !json_is_object(o)) {
        json_decref(o);
        return fail("%s:%d: %s", path, je.line, o ? "not a JSON object" : je.text);
    }
    int max_tokens = 16384, rc = 0;
    json_t *ns = json_object_get(o, "netns");
    if (ns && !json_is_object(ns))
        rc = fail("config: \"netns\" must be an object");
    double delay = 0;
    json_t *dv = ns ? json_object_get(ns, "delay_ms") : NULL;
    if (dv && (!json_is_number(dv) || json_number_value(dv) < 0 || json_number_value(dv) > 1000))
        rc = fail("config: netns.delay_ms must be a number of milliseconds in 0..1000");
    delay = dv ? json_number_value(dv) : 0;
    if (rc || get_str(o, "name", "local", c->name, sizeof c->name) ||
        get_str(o, "model", "ref-tiny", c->model, sizeof c->model) ||
        get_str(o, "store_memory", "256M", c->store_memory, sizeof c->store_memory) ||
        get_str(o, "policy", "kvf_cost", c->policy, sizeof c->policy) ||
        get_str(o, "run_dir", "", c->run_dir, sizeof c->run_dir) ||
        get_int(o, "stores", 1, 1, 16, &c->stores) ||
        get_int(o, "prefill", 1, 1, 16, &c->prefill) ||
        get_int(o, "decode", 1, 1, 16, &c->decode) ||
        get_int(o, "store_threads", 1, 1, 64, &c->store_threads) ||
        get_int(o, "engine_max_tokens", 16384, 256, 1 << 20, &max_tokens) ||
        (ns && get_str(ns, "subnet", "10.77.0", c->subnet, sizeof c->subnet)) ||
        (ns && get_str(ns, "rate", "", c->rate, sizeof c->rate))) {
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
/* Network namespaces */

static FILE *g_cmdlog;

/* Runs a shell command, its output appended to the run directory's netns.log. Every name put
 * into one is checked first (a-z, 0-9, '.', '-'). */
static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...)
{
    char cmd[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    if (g_cmdlog) {
        fprintf(g_cmdlog, "$ %s\n", cmd);
        fflush(g_cmdlog);
    }
    char full[1200];
    snprintf(full, sizeof full, "%s >>%s 2>&1", cmd, g_cmdlog ? "\"$KVF_CMDLOG\"" : "/dev/null");
    int st = system(full);
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

static void ns_name(const cfg *c, const char *host, char *out, size_t n)
{
    snprintf(out, n, "kvf-%s-%s", c->name, host);
}

static void netns_down(const cfg *c, const proc *p, int np)
{
    char ns[64];
    for (int i = 0; i < np; i++)
        if (p[i].ns[0])
            sh("ip netns del %s", p[i].ns);
    ns_name(c, "hub", ns, sizeof ns);
    sh("ip netns del %s", ns);
    sh("ip link del kvr-%s", c->name);
}

/* Makes the hub (a bridge) and this host's veth into it. */
static int netns_hub(const cfg *c, char *shaping, size_t sl)
{
    char hub[64];
    ns_name(c, "hub", hub, sizeof hub);
    if (sh("ip netns add %s", hub) != 0)
        return fail("cannot create network namespaces here (this needs root or CAP_SYS_ADMIN and "
                    "iproute2; the commands and their output are in the run directory's "
                    "netns.log)");
    if (sh("ip -n %s link add br0 type bridge", hub) || sh("ip -n %s link set br0 up", hub) ||
        sh("ip -n %s link set lo up", hub) ||
        sh("ip link add kvr-%s type veth peer name vroot netns %s", c->name, hub) ||
        sh("ip -n %s link set vroot master br0 up", hub) ||
        sh("ip addr add %s.254/24 dev kvr-%s", c->subnet, c->name) ||
        sh("ip link set kvr-%s up", c->name))
        return fail("cannot build the bridge between the namespaces (see netns.log)");
    snprintf(shaping, sl, "%s%s%s", c->rate[0] ? c->rate : "unshaped bandwidth",
             c->delay_ms > 0 ? ", delay " : "", c->delay_ms > 0 ? "requested" : "");
    return 0;
}

/* Makes host k's namespace (named p->ns), its veth into the hub and its shaping. */
static int netns_host(const cfg *c, proc *p, int k, char *shaping, size_t sl)
{
    char hub[64];
    ns_name(c, "hub", hub, sizeof hub);
    if (sh("ip netns add %s", p->ns) ||
        sh("ip link add eth0 netns %s type veth peer name v%d netns %s", p->ns, k, hub) ||
        sh("ip -n %s link set v%d master br0 up", hub, k) ||
        sh("ip -n %s addr add %s.%d/24 dev eth0", p->ns, c->subnet, k) ||
        sh("ip -n %s link set eth0 up", p->ns) || sh("ip -n %s link set lo up", p->ns))
        return fail("cannot make the namespace of %s (see netns.log)", p->name);
    if (c->delay_ms > 0) {
        char rate[64] = "";
        if (c->rate[0])
            snprintf(rate, sizeof rate, " rate %s", c->rate);
        if (sh("tc -n %s qdisc add dev eth0 root netem delay %.3fms%s", p->ns, c->delay_ms, rate) ==
            0) {
            snprintf(shaping, sl, "%s, %.3f ms each way out of every host (netem)",
                     c->rate[0] ? c->rate : "unshaped bandwidth", c->delay_ms);
            return 0;
        }
        snprintf(shaping, sl, "%s (tbf); latency NOT emulated: this kernel has no sch_netem",
                 c->rate[0] ? c->rate : "unshaped bandwidth");
    } else if (c->rate[0]) {
        snprintf(shaping, sl, "%s (tbf), no added latency", c->rate);
    }
    if (c->rate[0] && sh("tc -n %s qdisc replace dev eth0 root tbf rate %s burst 1mb latency 50ms",
                         p->ns, c->rate) != 0)
        return fail("tc refused rate %s on %s (see netns.log)", c->rate, p->name);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* State */

static void state_path(const cfg *c, char *out, size_t n)
{
    snprintf(out, n, "%s/state.json", c->run_dir);
}

static int write_state(const cfg *c, const proc *p, int np, int netns, const char *shaping)
{
    json_t *arr = json_array(), *stores = json_array(), *engines = json_array();
    const char *sched = "";
    for (int i = 0; i < np; i++) {
        json_array_append_new(arr, json_pack("{s:s,s:s,s:i,s:s,s:s,s:s}", "name", p[i].name, "kind",
                                             p[i].kind, "pid", (int)p[i].pid, "addr", p[i].addr,
                                             "log", p[i].log, "netns", p[i].ns));
        if (!strcmp(p[i].kind, "store"))
            json_array_append_new(stores, json_string(p[i].addr));
        else if (!strcmp(p[i].kind, "sched"))
            sched = p[i].addr;
        else
            json_array_append_new(engines, json_string(p[i].addr));
    }
    json_t *o =
        json_pack("{s:s,s:s,s:s,s:o,s:o,s:o,s:b,s:s,s:s}", "name", c->name, "model", c->model,
                  "sched", sched, "stores", stores, "engines", engines, "procs", arr, "netns",
                  netns, "shaping", shaping ? shaping : "", "policy", c->policy);
    char path[600], tmp[620];
    state_path(c, path, sizeof path);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int rc = json_dump_file(o, tmp, JSON_INDENT(2)) == 0 && rename(tmp, path) == 0 ? 0 : -1;
    json_decref(o);
    return rc ? fail("cannot write %s", path) : 0;
}

static int read_state(const cfg *c, proc *p, int *np, int *netns)
{
    char path[600];
    state_path(c, path, sizeof path);
    json_t *o = json_load_file(path, 0, NULL);
    *np = 0;
    *netns = 0;
    if (!o)
        return -1;
    json_t *arr = json_object_get(o, "procs");
    *netns = json_is_true(json_object_get(o, "netns"));
    for (size_t i = 0; i < json_array_size(arr) && *np < MAX_PROCS; i++) {
        json_t *v = json_array_get(arr, i);
        proc *q = &p[(*np)++];
        memset(q, 0, sizeof *q);
        snprintf(q->name, sizeof q->name, "%s", json_string_value(json_object_get(v, "name")));
        snprintf(q->kind, sizeof q->kind, "%s", json_string_value(json_object_get(v, "kind")));
        snprintf(q->addr, sizeof q->addr, "%s", json_string_value(json_object_get(v, "addr")));
        snprintf(q->log, sizeof q->log, "%s", json_string_value(json_object_get(v, "log")));
        const char *ns = json_string_value(json_object_get(v, "netns"));
        snprintf(q->ns, sizeof q->ns, "%s", ns ? ns : "");
        q->pid = (pid_t)json_integer_value(json_object_get(v, "pid"));
    }
    json_decref(o);
    return 0;
}

/* A pid from the state file is ours only while its command line is one of our programs. */
static int ours_alive(pid_t pid)
{
    if (pid <= 0 || kill(pid, 0) != 0)
        return 0;
    char path[64], cmd[256] = "";
    snprintf(path, sizeof path, "/proc/%d/cmdline", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 1; /* no /proc: trust the pid */
    size_t n = fread(cmd, 1, sizeof cmd - 1, f);
    fclose(f);
    cmd[n] = '\0';
    return strstr(cmd, "kvf-") != NULL;
}

/* Whether p is to be stopped: a child of this process (up undoing itself: it may not have
 * reached exec yet, so its command line proves nothing), or a pid whose command line is still
 * ours (down, from the state file). */
static int alive_to_stop(const proc *p, int children)
{
    if (!children)
        return ours_alive(p->pid);
    return p->pid > 0 && waitpid(p->pid, NULL, WNOHANG) == 0;
}

static void stop_procs(proc *p, int np, int children)
{
    for (int i = np - 1; i >= 0; i--)
        if (alive_to_stop(&p[i], children))
            kill(p[i].pid, SIGTERM);
    for (int t = 0; t < 250; t++) {
        int alive = 0;
        for (int i = 0; i < np; i++) {
            if (!children && p[i].pid > 0)
                waitpid(p[i].pid, NULL, WNOHANG);
            alive += alive_to_stop(&p[i], children);
        }
        if (!alive)
            return;
        usleep(20000);
    }
    for (int i = 0; i < np; i++)
        if (alive_to_stop(&p[i], children)) {
            fprintf(stderr, "kvf cluster: %s (pid %d) ignored SIGTERM for 5 s: killed\n", p[i].name,
                    (int)p[i].pid);
            kill(p[i].pid, SIGKILL);
            waitpid(p[i].pid, NULL, 0);
        }
}

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
    char store_bin[1024], sched_bin[1024], engine_bin[1024];
    char stores[2048];       /* the stores' addresses, comma-separated */
    char store_events[2048]; /* their chunk-event endpoints, in the same order */
    char cost[700];          /* the cost model calibrate measured */
    char sched[160];         /* kvf-sched's address */
    char tokens[640];        /* kvf-sched's token file, in the run directory */
    char token_env[160];     /* KVF_SCHED_TOKEN=..., for the engines */
    char tenants[640];       /* the stores' tenants file (--auth), in the run directory */
    char cred_env[760];      /* KVF_CREDENTIAL=RUN_DIR/cluster.cred, for the engines */
    char admin_cred[700];    /* kvf-sched's key for the KV events (an admin subscriber) */
    char events_cred[700];   /* the publishers' CURVE key (stores, engines) */
    char events_key[65];     /* its X25519 public key in hex, for kvf-sched */
} launch;

/* Starts p as args (in p's namespace when it has one), its output in RUN_DIR/NAME.log, and waits
 * for its ready line, whose listen= becomes p->addr. Returns 0, or 1 after printing why. */
static int start_one(const cfg *c, proc *p, char **args, int n_args, char *const env[])
{
    char *argv[48];
    int k = 0;
    if (p->ns[0]) {
        argv[k++] = (char *)"ip";
        argv[k++] = (char *)"netns";
        argv[k++] = (char *)"exec";
        argv[k++] = p->ns;
    }
    for (int i = 0; i < n_args && k < 47; i++)
        argv[k++] = args[i];
    argv[k] = NULL;
    snprintf(p->log, sizeof p->log, "%s/%s.log", c->run_dir, p->name);
    unlink(p->log);
    char err[512];
    p->pid = kvf__proc_spawn_detached(argv, p->log, env, err, sizeof err);
    if (p->pid < 0)
        return fail("%s: %s", p->name, err);
    if (kvf__proc_wait_ready(p->pid, p->log, READY_MS, &g_interrupted, p->ready, sizeof p->ready,
                             err, sizeof err) != 0)
        return fail("%s (%s) %s", p->name, p->log, err);
    if (kvf__proc_ready_field(p->ready, "listen", p->addr, sizeof p->addr) != 0)
        return fail("%s (%s): its ready line names no address: \"%s\"", p->name, p->log, p->ready);
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
    ns_name(L->c, name, q->ns, sizeof q->ns);
    if (netns_host(L->c, q, L->np, L->shaping, sizeof L->shaping) != 0)
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
    if (read_state(c, p, &np, &netns) != 0)
        return 0;
    for (int i = 0; i < np; i++)
        if (ours_alive(p[i].pid))
            return fail("cluster \"%s\" is already up (%s/state.json); run kvf cluster down first",
                        c->name, c->run_dir);
    return 0;
}

/* Ctrl-C and SIGTERM set g_interrupted instead of ending up, so that it can undo what it did. */
static void catch_interrupts(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_interrupt;
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
    g_cmdlog = fopen(cmdlog, "w");
    setenv("KVF_CMDLOG", cmdlog, 1);
    netns_down(L->c, L->p, 0); /* leftovers of a crashed run of the same name */
    return netns_hub(L->c, L->shaping, sizeof L->shaping);
}

/* Finds the daemons' programs and says what up is about to start. */
static int announce(launch *L)
{
    const cfg *c = L->c;
    snprintf(L->store_bin, sizeof L->store_bin, "%s", kvf__proc_find_bin("kvf-store"));
    snprintf(L->sched_bin, sizeof L->sched_bin, "%s", kvf__proc_find_bin("kvf-sched"));
    snprintf(L->engine_bin, sizeof L->engine_bin, "%s", kvf__proc_find_bin("kvf-engine"));
    printf("kvf cluster up \"%s\": %d store(s), 1 scheduler, %d prefill and %d decode engine(s), "
           "model %s, %s\n",
           c->name, c->stores, c->prefill, c->decode, c->model,
           L->netns ? "one network namespace per host" : "loopback");
    return 0;
}

/* The publishers' CURVE identity (events.cred): the stores and engines secure their KV events
 * with it, kvf-sched knows its public key. It is in no tenants file: it authenticates nobody. */
static int make_events_key(launch *L)
{
    kvf_credential cred;
    uint8_t pk[KVF_AUTH_PK_LEN], xpk[32];
    char err[300];
    snprintf(L->events_cred, sizeof L->events_cred, "%s/events.cred", L->c->run_dir);
    unlink(L->events_cred);
    int rc = kvf__cred_new(&cred, "events", pk) != 0 ||
             kvf__cred_write(L->events_cred, &cred, err, sizeof err) != 0 ||
             kvf__auth_curve_pk(pk, xpk) != 0;
    kvf__auth_wipe(&cred, sizeof cred);
    if (rc)
        return fail("cannot make the events key %s", L->events_cred);
    for (int i = 0; i < 32; i++)
        snprintf(L->events_key + 2 * i, 3, "%02x", xpk[i]);
    return 0;
}

/* Credentials for the stores (docs/security.md), in the run directory, readable by their owner
 * only: the tenant "cluster" that the engines and tools use (cluster.cred), an admin for an
 * operator's management requests and kvf-sched's event subscriptions (admin.cred), the stores'
 * tenants file with their public keys (store.tenants), and the events key. */
static int make_credentials(launch *L)
{
    const char *rd = L->c->run_dir;
    const struct {
        const char *name, *file;
        int role;
    } who[] = {{"cluster", "cluster.cred", KVF_ROLE_TENANT},
               {"admin", "admin.cred", KVF_ROLE_ADMIN}};
    snprintf(L->tenants, sizeof L->tenants, "%s/store.tenants", rd);
    unlink(L->tenants);
    int fd = open(L->tenants, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f) {
        if (fd >= 0)
            close(fd);
        return fail("cannot write %s: %s", L->tenants, strerror(errno));
    }
    fprintf(f, "# kvf cluster up: the stores' tenants (kvf auth list --tenants this file)\n");
    int rc = 0;
    for (size_t i = 0; i < sizeof who / sizeof who[0] && !rc; i++) {
        char path[700], err[300], line[512];
        snprintf(path, sizeof path, "%s/%s", rd, who[i].file);
        unlink(path);
        kvf_credential cred;
        kvf_tenant_key k = {.role = who[i].role};
        snprintf(k.name, sizeof k.name, "%s", who[i].name);
        if (kvf__cred_new(&cred, who[i].name, k.pk) != 0 ||
            kvf__cred_write(path, &cred, err, sizeof err) != 0)
            rc = fail("cannot make the credential %s", path);
        kvf__auth_wipe(&cred, sizeof cred);
        kvf__tenant_key_format(&k, line, sizeof line);
        fputs(line, f);
        if (i == 0)
            snprintf(L->cred_env, sizeof L->cred_env, "KVF_CREDENTIAL=%s", path);
        else
            snprintf(L->admin_cred, sizeof L->admin_cred, "%s", path);
    }
    if (fclose(f) != 0 && !rc)
        rc = fail("cannot write %s", L->tenants);
    return rc ? rc : make_events_key(L);
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
    if (start_one(c, q, args, (int)(sizeof args / sizeof args[0]), NULL) != 0)
        return 1;
    /* kvf-sched subscribes to each store's chunk events, numbered in this order. */
    if (kvf__proc_ready_field(q->ready, "events", ep, sizeof ep) == 0)
        append_to_list(L->store_events, sizeof L->store_events, ep);
    append_to_list(L->stores, sizeof L->stores, q->addr);
    return 0;
}

static int start_stores(launch *L)
{
    if (make_credentials(L) != 0)
        return 1;
    for (int i = 0; i < L->c->stores; i++) {
        if (g_interrupted)
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
    while ((w = waitpid(pid, status, 0)) < 0 && errno == EINTR && !g_interrupted)
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
    char *env[] = {"OPENBLAS_NUM_THREADS=1", L->token_env, L->cred_env, NULL};
    const cfg *c = L->c;
    if (g_interrupted)
        return INTERRUPTED;
    char log[700], err[256];
    snprintf(L->cost, sizeof L->cost, "%s/cost.json", c->run_dir);
    snprintf(log, sizeof log, "%s/calibrate.log", c->run_dir);
    unlink(log);
    char *args[] = {L->engine_bin, "--calibrate", L->cost, "--model", (char *)c->model, NULL};
    pid_t pid = kvf__proc_spawn_detached(args, log, env, err, sizeof err);
    int st = 0;
    int exited = pid > 0 && wait_calibration(pid, &st) == 0;
    if (g_interrupted)
        return INTERRUPTED;
    if (!exited || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        return fail("calibrating the cost model failed (%s)", log);
    printf("  cost model: %s (measured here; %s)\n", L->cost, log);
    return 0;
}

/* A fresh token for kvf-sched (32 bytes of the kernel's random numbers, in hex) in
 * RUN_DIR/sched.tokens, readable by its owner only; L->token_env hands it to the engines, and the
 * state file names the file for kvf cluster send and kvf-bench e2e. */
static int make_token(launch *L)
{
    unsigned char r[32];
    if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r)
        return fail("cannot draw a token for kvf-sched: %s", strerror(errno));
    char hex[65];
    for (size_t i = 0; i < sizeof r; i++)
        snprintf(hex + 2 * i, 3, "%02x", r[i]);
    snprintf(L->tokens, sizeof L->tokens, "%s/sched.tokens", L->c->run_dir);
    int fd = open(L->tokens, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    char line[128];
    int n = snprintf(line, sizeof line,
                     "# kvf cluster up: the cluster's engines and tools\ncluster %s\n", hex);
    int ok = fd >= 0 && fchmod(fd, 0600) == 0 && write(fd, line, (size_t)n) == n;
    if (fd >= 0)
        close(fd);
    if (!ok)
        return fail("cannot write %s: %s", L->tokens, strerror(errno));
    snprintf(L->token_env, sizeof L->token_env, "KVF_SCHED_TOKEN=%s", hex);
    return 0;
}

static int start_sched(launch *L)
{
    const cfg *c = L->c;
    if (g_interrupted)
        return INTERRUPTED;
    char listen[64], events[64], chunk[16];
    proc *q = add_proc(L, "sched", "sched", listen, events);
    if (!q)
        return 1;
    kvf_layout lay;
    snprintf(chunk, sizeof chunk, "%u",
             kvf_layout_preset(c->model, &lay) == 0 ? lay.chunk_tokens : 256u);
    char *args[24] = {L->sched_bin,      "--listen",       listen,    "--policy",
                      (char *)c->policy, "--stores",       L->stores, "--cost",
                      L->cost,           "--chunk-tokens", chunk};
    int n = 11;
    if (L->store_events[0]) { /* only when a store publishes events */
        args[n++] = "--store-events";
        args[n++] = L->store_events;
    }
    /* Every request that changes kvf-sched's state is authenticated, also in namespaces. */
    if (make_token(L) != 0)
        return 1;
    args[n++] = "--tokens";
    args[n++] = L->tokens;
    /* The KV events come over CURVE, kvf-sched an admin subscriber that sees every tenant's. */
    args[n++] = "--events-credential";
    args[n++] = L->admin_cred;
    args[n++] = "--events-server-key";
    args[n++] = L->events_key;
    if (start_one(c, q, args, n, NULL) != 0)
        return 1;
    snprintf(L->sched, sizeof L->sched, "%s", q->addr);
    return 0;
}

/* Engine i: the prefill engines first, then the decode engines. */
static int start_engine(launch *L, int i)
{
    char *env[] = {"OPENBLAS_NUM_THREADS=1", L->token_env, L->cred_env, NULL};
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
    char *args[] = {L->engine_bin,
                    "--serve",
                    "--id",
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
    return start_one(c, q, args, (int)(sizeof args / sizeof args[0]), env);
}

static int start_engines(launch *L)
{
    for (int i = 0; i < L->c->prefill + L->c->decode; i++) {
        if (g_interrupted)
            return INTERRUPTED;
        if (start_engine(L, i) != 0)
            return 1;
    }
    return 0;
}

static int record_state(launch *L)
{
    if (g_interrupted)
        return INTERRUPTED;
    return write_state(L->c, L->p, L->np, L->netns, L->shaping);
}

static int (*const up_steps[])(launch *L) = {
    begin_netns, announce, start_stores, calibrate, start_sched, start_engines, record_state,
};

/* Stops what up started and removes what it made. Returns the exit status: INTERRUPTED after
 * Ctrl-C, whichever step noticed it first, else rc. */
static int undo(launch *L, int rc)
{
    if (g_interrupted) {
        fprintf(stderr, "kvf cluster: interrupted: undoing\n");
        rc = INTERRUPTED;
    }
    stop_procs(L->p, L->np, 1);
    if (L->netns)
        netns_down(L->c, L->p, L->np);
    return rc;
}

static int cmd_up(const cfg *c, int netns)
{
    if (refuse_if_up(c) != 0)
        return 1;
    if (mkdirs(c->run_dir) != 0)
        return fail("cannot create %s: %s", c->run_dir, strerror(errno));
    catch_interrupts();
    launch L = {.c = c, .netns = netns};
    int rc = 0;
    for (size_t i = 0; i < sizeof up_steps / sizeof up_steps[0] && !rc; i++)
        rc = up_steps[i](&L);
    if (rc)
        rc = undo(&L, rc);
    else
        printf("cluster \"%s\" is up: scheduler http://%s, state in %s/state.json%s%s\n", c->name,
               L.sched, c->run_dir, L.shaping[0] ? "; links: " : "", L.shaping);
    if (g_cmdlog)
        fclose(g_cmdlog);
    g_cmdlog = NULL;
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* down, status */

static int cmd_down(const cfg *c)
{
    proc p[MAX_PROCS];
    int np, netns;
    if (read_state(c, p, &np, &netns) != 0) {
        printf("kvf cluster down: no cluster \"%s\" is up (no %s/state.json)\n", c->name,
               c->run_dir);
        return 0;
    }
    int alive = 0;
    for (int i = 0; i < np; i++)
        alive += ours_alive(p[i].pid);
    stop_procs(p, np, 0);
    if (netns)
        netns_down(c, p, np);
    char path[600];
    state_path(c, path, sizeof path);
    unlink(path);
    printf("kvf cluster down \"%s\": stopped %d of %d processes (the others had already "
           "exited)%s; logs stay in %s\n",
           c->name, alive, np, netns ? ", removed the network namespaces" : "", c->run_dir);
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
    snprintf(url, sizeof url, "http://%s%s", q->addr,
             strcmp(q->kind, "sched") ? "/v1/health" : "/v1/index/stats");
    if (kvf__http_call("GET", url, NULL, 2000, &status, &r, err, sizeof err) != 0 ||
        status != 200 || !r) {
        snprintf(out, n, "NOT answering %.200s", url);
        json_decref(r);
        return;
    }
    if (!strcmp(q->kind, "sched"))
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
    if (read_state(c, p, &np, &netns) != 0) {
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
        int alive = ours_alive(p[i].pid);
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
        strcmp(a->action, "send"))
        return fail("usage: " SYNOPSIS) + 1;
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
                return fail("--max-tokens must be 1..4096") + 1;
        } else if (c == KVF__CLI_OPT_SYNTHETIC || c == KVF__CLI_OPT_SEED ||
                   c == KVF__CLI_OPT_TOKENS_FILE) {
            if (kvf__cli_target_set(&a->send, c, v) != 0)
                return 2;
        } else if (c == KVF__CLI_OPT_NOVALUE) {
            return fail("%s needs a value (usage: " SYNOPSIS ")", v) + 1;
        } else {
            return fail("unknown option %s (usage: " SYNOPSIS ")", v) + 1;
        }
    }
    if (!a->config)
        return fail("--config FILE is required (see cluster/demo.json)") + 1;
    return KVF__CLI_RUN;
}

/* Sends one request through the cluster's router (send.c), with the cluster's model. */
static int cmd_send(const cfg *c, cluster_args *a)
{
    proc p[MAX_PROCS];
    int np, netns;
    if (read_state(c, p, &np, &netns) != 0) {
        fprintf(stderr, "kvf cluster send: cluster \"%s\" is not up (no %s/state.json)\n", c->name,
                c->run_dir);
        return 3;
    }
    const char *sched = NULL;
    for (int i = 0; i < np; i++)
        if (!strcmp(p[i].kind, "sched"))
            sched = p[i].addr;
    if (!sched)
        return fail("the state of cluster \"%s\" names no kvf-sched", c->name);
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
            rc = cmd_up(&c, a.netns);
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

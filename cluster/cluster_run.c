/*
 * What `kvf cluster up` makes and `kvf cluster down` removes (cluster_int.h): the hosts' network
 * namespaces and the hub joining them (--netns), the state file, and stopping the processes it
 * names.
 */
#define _XOPEN_SOURCE 700 /* nftw */
#include "cluster_int.h"

#include <errno.h>
#include <ftw.h>
#include <jansson.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

volatile int kvf__cluster_interrupted;

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

void kvf__cluster_rm_tree(const char *path)
{
    nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

void kvf__cluster_on_interrupt(int sig)
{
    (void)sig;
    kvf__cluster_interrupted = 1;
}

int kvf__cluster_fail(const char *fmt, ...)
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
/* Network namespaces */

FILE *kvf__cluster_cmdlog;

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
    if (kvf__cluster_cmdlog) {
        fprintf(kvf__cluster_cmdlog, "$ %s\n", cmd);
        fflush(kvf__cluster_cmdlog);
    }
    char full[1200];
    snprintf(full, sizeof full, "%s >>%s 2>&1", cmd,
             kvf__cluster_cmdlog ? "\"$KVF_CMDLOG\"" : "/dev/null");
    int st = system(full);
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

void kvf__cluster_ns_name(const cfg *c, const char *host, char *out, size_t n)
{
    snprintf(out, n, "kvf-%s-%s", c->name, host);
}

void kvf__cluster_netns_down(const cfg *c, const proc *p, int np)
{
    char ns[64];
    for (int i = 0; i < np; i++)
        if (p[i].ns[0])
            sh("ip netns del %s", p[i].ns);
    kvf__cluster_ns_name(c, "hub", ns, sizeof ns);
    sh("ip netns del %s", ns);
    sh("ip link del kvr-%s", c->name);
}

/* Makes the hub (a bridge) and this host's veth into it. */
int kvf__cluster_netns_hub(const cfg *c, char *shaping, size_t sl)
{
    char hub[64];
    kvf__cluster_ns_name(c, "hub", hub, sizeof hub);
    if (sh("ip netns add %s", hub) != 0)
        return kvf__cluster_fail(
            "cannot create network namespaces here (this needs root or CAP_SYS_ADMIN and "
            "iproute2; the commands and their output are in the run directory's "
            "netns.log)");
    if (sh("ip -n %s link add br0 type bridge", hub) || sh("ip -n %s link set br0 up", hub) ||
        sh("ip -n %s link set lo up", hub) ||
        sh("ip link add kvr-%s type veth peer name vroot netns %s", c->name, hub) ||
        sh("ip -n %s link set vroot master br0 up", hub) ||
        sh("ip addr add %s.254/24 dev kvr-%s", c->subnet, c->name) ||
        sh("ip link set kvr-%s up", c->name))
        return kvf__cluster_fail("cannot build the bridge between the namespaces (see netns.log)");
    snprintf(shaping, sl, "%s%s%s", c->rate[0] ? c->rate : "unshaped bandwidth",
             c->delay_ms > 0 ? ", delay " : "", c->delay_ms > 0 ? "requested" : "");
    return 0;
}

/* Makes host k's namespace (named p->ns), its veth into the hub and its shaping. */
int kvf__cluster_netns_host(const cfg *c, proc *p, int k, char *shaping, size_t sl)
{
    char hub[64];
    kvf__cluster_ns_name(c, "hub", hub, sizeof hub);
    if (sh("ip netns add %s", p->ns) ||
        sh("ip link add eth0 netns %s type veth peer name v%d netns %s", p->ns, k, hub) ||
        sh("ip -n %s link set v%d master br0 up", hub, k) ||
        sh("ip -n %s addr add %s.%d/24 dev eth0", p->ns, c->subnet, k) ||
        sh("ip -n %s link set eth0 up", p->ns) || sh("ip -n %s link set lo up", p->ns))
        return kvf__cluster_fail("cannot make the namespace of %s (see netns.log)", p->name);
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
        return kvf__cluster_fail("tc refused rate %s on %s (see netns.log)", c->rate, p->name);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* State */

void kvf__cluster_state_path(const cfg *c, char *out, size_t n)
{
    snprintf(out, n, "%s/state.json", c->run_dir);
}

int kvf__cluster_state_write(const cfg *c, const proc *p, int np, int netns, const char *shaping,
                             const kvf__cluster_mps *mps)
{
    json_t *arr = json_array(), *stores = json_array(), *engines = json_array();
    json_t *scheds = json_array(), *etcd = json_array();
    const char *sched = "";
    for (int i = 0; i < np; i++) {
        json_array_append_new(arr, json_pack("{s:s,s:s,s:i,s:s,s:s,s:s}", "name", p[i].name, "kind",
                                             p[i].kind, "pid", (int)p[i].pid, "addr", p[i].addr,
                                             "log", p[i].log, "netns", p[i].ns));
        if (!strcmp(p[i].kind, "store"))
            json_array_append_new(stores, json_string(p[i].addr));
        else if (!strcmp(p[i].kind, "sched")) {
            sched = sched[0] ? sched : p[i].addr; /* the first replica */
            json_array_append_new(scheds, json_string(p[i].addr));
        } else if (!strcmp(p[i].kind, "etcd"))
            json_array_append_new(etcd, json_string(p[i].addr));
        else
            json_array_append_new(engines, json_string(p[i].addr));
    }
    json_t *o =
        json_pack("{s:s,s:s,s:s,s:o,s:o,s:o,s:b,s:s,s:s}", "name", c->name, "model", c->model,
                  "sched", sched, "stores", stores, "engines", engines, "procs", arr, "netns",
                  netns, "shaping", shaping ? shaping : "", "policy", c->policy);
    json_object_set_new(o, "engine", json_string(c->engine));
    json_object_set_new(o, "scheds", scheds); /* every replica, the first being "sched" */
    json_object_set_new(o, "etcd", etcd);
    json_object_set_new(o, "gpu_share", json_string(c->gpu_share));
    if (mps && mps->pipe[0]) /* down stops the daemon only where up started it */
        json_object_set_new(o, "mps",
                            json_pack("{s:s,s:s,s:s,s:b}", "pipe", mps->pipe, "log_dir",
                                      mps->log_dir, "log", mps->log, "started", mps->started));
    if (!strcmp(c->engine, "transformers")) { /* the model's layout, for kvf-bench e2e */
        char lf[600];
        snprintf(lf, sizeof lf, "%s/layout.json", c->run_dir);
        json_object_set_new(o, "layout_file", json_string(lf));
    }
    char path[600], tmp[620];
    kvf__cluster_state_path(c, path, sizeof path);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int rc = json_dump_file(o, tmp, JSON_INDENT(2)) == 0 && rename(tmp, path) == 0 ? 0 : -1;
    json_decref(o);
    return rc ? kvf__cluster_fail("cannot write %s", path) : 0;
}

int kvf__cluster_state_read(const cfg *c, proc *p, int *np, int *netns)
{
    char path[600];
    kvf__cluster_state_path(c, path, sizeof path);
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

void kvf__cluster_state_mps(const cfg *c, kvf__cluster_mps *m)
{
    memset(m, 0, sizeof *m);
    char path[600];
    kvf__cluster_state_path(c, path, sizeof path);
    json_t *o = json_load_file(path, 0, NULL);
    json_t *v = json_object_get(o, "mps");
    const char *pipe = json_string_value(json_object_get(v, "pipe"));
    const char *dir = json_string_value(json_object_get(v, "log_dir"));
    const char *log = json_string_value(json_object_get(v, "log"));
    if (pipe && dir && log) {
        snprintf(m->pipe, sizeof m->pipe, "%s", pipe);
        snprintf(m->log_dir, sizeof m->log_dir, "%s", dir);
        snprintf(m->log, sizeof m->log, "%s", log);
        m->started = json_is_true(json_object_get(v, "started"));
    }
    json_decref(o);
}

/* A pid from the state file is ours only while its command line is one of our programs. */
int kvf__cluster_ours_alive(pid_t pid)
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
    if (strstr(cmd, "kvf-")) /* argv[0]: one of our binaries */
        return 1;
    for (size_t i = 0; i < n; i++)
        cmd[i] = cmd[i] ? cmd[i] : ' ';
    /* an interpreter running our engine (python3 -m kvfabric.serve), or an etcd member the
     * launcher named */
    return strstr(cmd, " -m kvfabric.serve ") != NULL || strstr(cmd, " --name kvf-etcd-") != NULL;
}

/* Whether p is to be stopped: a child of this process (up undoing itself: it may not have
 * reached exec yet, so its command line proves nothing), or a pid whose command line is still
 * ours (down, from the state file). */
static int alive_to_stop(const proc *p, int children)
{
    if (!children)
        return kvf__cluster_ours_alive(p->pid);
    return p->pid > 0 && waitpid(p->pid, NULL, WNOHANG) == 0;
}

void kvf__cluster_stop_procs(proc *p, int np, int children)
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

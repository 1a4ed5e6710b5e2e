/*
 * kvf deploy render: from one deployment file (the hosts of the stores, kvf-sched and the
 * engines), everything each host's systemd units need (docs/operations.md, "Deploying on several
 * machines"): the environment files of kvf-store@N, kvf-sched and kvf-engine@ID with the wiring
 * between them (the stores' numbers and event endpoints in kvf-sched's order, the engines'
 * scheduler, tokens and credentials), the cluster's credentials made once, and per host the
 * list of units to enable. Nothing is started and no host is contacted.
 */
#include "cmd_deploy.h"

#include "args.h"
#include "creds.h"
#include "jsonkeys.h"
#include "units.h"

#include "kvf/kvf.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_HOSTS   256
#define MAX_STORES  64
#define MAX_ENGINES 256
#define PATH_MAX_   4200

typedef struct d_store {
    const char *host, *memory;
    long port, events_port, metrics_port, threads;
} d_store;

typedef struct d_engine {
    char id[64];
    const char *host, *role;
    long port, events_port, max_tokens;
} d_engine;

typedef struct deploy {
    const char *path; /* the deployment file, for messages */
    const char *name, *model, *policy, *etc, *log_format, *cost;
    const char *sched_host;
    long sched_port, chunk_tokens;
    uint64_t tenant_bytes;
    d_store stores[MAX_STORES];
    int n_stores;
    d_engine engines[MAX_ENGINES];
    int n_engines;
    json_t *root;
} deploy;

static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "kvf deploy: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 2;
}

/* A string member (default def when absent); no whitespace, which systemd would split on. */
static int get_str(const deploy *d, const json_t *o, const char *where, const char *k,
                   const char *def, const char **out)
{
    json_t *v = json_object_get(o, k);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!json_is_string(v) || !json_string_length(v) || json_string_length(v) > 255 ||
        strpbrk(json_string_value(v), " \t\n\"'\\"))
        return fail("%s: %s.%s must be a string of 1..255 bytes without spaces or quotes", d->path,
                    where, k);
    *out = json_string_value(v);
    return 0;
}

static int get_long(const deploy *d, const json_t *o, const char *where, const char *k, long def,
                    long lo, long hi, long *out)
{
    json_t *v = json_object_get(o, k);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return fail("%s: %s.%s must be an integer in %ld..%ld", d->path, where, k, lo, hi);
    *out = (long)json_integer_value(v);
    return 0;
}

/* How many of the first n (host, port) pairs before this one share its host: the next free
 * pair of ports on that host. */
static int host_index(const char *const *hosts, int n, const char *host)
{
    int k = 0;
    for (int i = 0; i < n; i++)
        k += !strcmp(hosts[i], host);
    return k;
}

static int read_stores(deploy *d, const json_t *arr)
{
    static const char *const keys[] = {"host",   "port",    "events_port", "metrics_port",
                                       "memory", "threads", NULL};
    if (!json_is_array(arr) || !json_array_size(arr) || json_array_size(arr) > MAX_STORES)
        return fail("%s: \"stores\" must be an array of 1..%d stores", d->path, MAX_STORES);
    const char *hosts[MAX_STORES];
    for (size_t i = 0; i < json_array_size(arr); i++) {
        json_t *o = json_array_get(arr, i);
        char where[64], err[700];
        snprintf(where, sizeof where, "stores[%zu]", i);
        char kwhere[700];
        snprintf(kwhere, sizeof kwhere, "%s: %s", d->path, where);
        if (kvf__json_keys_check(o, keys, kwhere, err, sizeof err) != 0)
            return fail("%s", err);
        d_store *s = &d->stores[d->n_stores];
        if (get_str(d, o, where, "host", NULL, &s->host))
            return 2;
        if (!s->host)
            return fail("%s: %s needs \"host\"", d->path, where);
        int k = host_index(hosts, d->n_stores, s->host);
        hosts[d->n_stores] = s->host;
        uint64_t mem;
        if (get_str(d, o, where, "memory", "1G", &s->memory) ||
            get_long(d, o, where, "port", 7400 + 2 * k, 1, 65535, &s->port) ||
            get_long(d, o, where, "events_port", s->port + 1, 1, 65535, &s->events_port) ||
            get_long(d, o, where, "metrics_port", 9400 + k, 1, 65535, &s->metrics_port) ||
            get_long(d, o, where, "threads", 0, 0, 64, &s->threads))
            return 2;
        if (kvf__parse_size(s->memory, &mem) != 0 || mem < (1u << 20))
            return fail("%s: %s.memory: \"%s\" is not a size of at least 1M", d->path, where,
                        s->memory);
        d->n_stores++;
    }
    return 0;
}

static int read_engines(deploy *d, const json_t *arr)
{
    static const char *const keys[] = {"host",        "id",         "role", "port",
                                       "events_port", "max_tokens", NULL};
    if (!json_is_array(arr) || json_array_size(arr) > MAX_ENGINES)
        return fail("%s: \"engines\" must be an array of at most %d engines", d->path, MAX_ENGINES);
    const char *hosts[MAX_ENGINES];
    int n_role[3] = {0, 0, 0};
    for (size_t i = 0; i < json_array_size(arr); i++) {
        json_t *o = json_array_get(arr, i);
        char where[64], err[700], kwhere[700];
        snprintf(where, sizeof where, "engines[%zu]", i);
        snprintf(kwhere, sizeof kwhere, "%s: %s", d->path, where);
        if (kvf__json_keys_check(o, keys, kwhere, err, sizeof err) != 0)
            return fail("%s", err);
        d_engine *e = &d->engines[d->n_engines];
        const char *id = NULL;
        if (get_str(d, o, where, "host", NULL, &e->host) ||
            get_str(d, o, where, "role", "both", &e->role) || get_str(d, o, where, "id", NULL, &id))
            return 2;
        if (!e->host)
            return fail("%s: %s needs \"host\"", d->path, where);
        int r = !strcmp(e->role, "prefill") ? 0 : !strcmp(e->role, "decode") ? 1 : 2;
        if (strcmp(e->role, "prefill") && strcmp(e->role, "decode") && strcmp(e->role, "both"))
            return fail("%s: %s.role is prefill, decode or both, not \"%s\"", d->path, where,
                        e->role);
        if (id)
            snprintf(e->id, sizeof e->id, "%s", id);
        else
            snprintf(e->id, sizeof e->id, "%s%d", e->role, n_role[r]);
        n_role[r]++;
        for (int j = 0; j < d->n_engines; j++)
            if (!strcmp(d->engines[j].id, e->id))
                return fail("%s: %s: the id \"%s\" is taken", d->path, where, e->id);
        int k = host_index(hosts, d->n_engines, e->host);
        hosts[d->n_engines] = e->host;
        if (get_long(d, o, where, "port", 7600 + 2 * k, 1, 65535, &e->port) ||
            get_long(d, o, where, "events_port", e->port + 1, 1, 65535, &e->events_port) ||
            get_long(d, o, where, "max_tokens", 16384, 256, 1 << 20, &e->max_tokens))
            return 2;
        d->n_engines++;
    }
    return 0;
}

static int read_deploy(const char *path, deploy *d)
{
    static const char *const keys[] = {"name",       "model",        "policy", "etc",
                                       "log_format", "cost",         "sched",  "stores",
                                       "engines",    "tenant_bytes", NULL};
    static const char *const sched_keys[] = {"host", "port", NULL};
    memset(d, 0, sizeof *d);
    d->path = path;
    json_error_t je;
    d->root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!d->root || !json_is_object(d->root))
        return fail("%s:%d: %s", path, je.line, d->root ? "not a JSON object" : je.text);
    char err[700], where[700];
    json_t *sc = json_object_get(d->root, "sched");
    snprintf(where, sizeof where, "%s: sched", path);
    if (kvf__json_keys_check(d->root, keys, path, err, sizeof err) != 0 ||
        (sc && kvf__json_keys_check(sc, sched_keys, where, err, sizeof err) != 0))
        return fail("%s", err);
    const char *bytes = NULL;
    if (get_str(d, d->root, "deploy", "name", "kvfabric", &d->name) ||
        get_str(d, d->root, "deploy", "model", "ref-tiny", &d->model) ||
        get_str(d, d->root, "deploy", "policy", "kvf_cost", &d->policy) ||
        get_str(d, d->root, "deploy", "etc", "/etc/kvfabric", &d->etc) ||
        get_str(d, d->root, "deploy", "log_format", "json", &d->log_format) ||
        get_str(d, d->root, "deploy", "cost", NULL, &d->cost) ||
        get_str(d, d->root, "deploy", "tenant_bytes", "0", &bytes))
        return 2;
    if (d->etc[0] != '/')
        return fail("%s: \"etc\" must be an absolute path, not \"%s\"", path, d->etc);
    if (strcmp(d->log_format, "json") && strcmp(d->log_format, "text"))
        return fail("%s: \"log_format\" is json or text, not \"%s\"", path, d->log_format);
    static const char *const policies[] = {"round_robin", "least_loaded", "longest_prefix",
                                           "dynamo_cost", "kvf_cost",     NULL};
    int known = 0;
    for (const char *const *p = policies; *p && !known; p++)
        known = !strcmp(*p, d->policy);
    if (!known)
        return fail("%s: \"policy\" is round_robin, least_loaded, longest_prefix, dynamo_cost or "
                    "kvf_cost, not \"%s\"",
                    path, d->policy);
    kvf_layout lay;
    if (kvf_layout_preset(d->model, &lay) != 0)
        return fail("%s: \"model\": \"%s\" is not a model preset (kvf estimate --help lists them)",
                    path, d->model);
    d->chunk_tokens = (long)lay.chunk_tokens;
    if (kvf__parse_size(bytes, &d->tenant_bytes) != 0)
        return fail("%s: \"tenant_bytes\": \"%s\" is not a size", path, bytes);
    if (!json_is_object(sc))
        return fail("%s: \"sched\" must be an object with the scheduler's \"host\"", path);
    if (get_str(d, sc, "sched", "host", NULL, &d->sched_host) ||
        get_long(d, sc, "sched", "port", 7500, 1, 65535, &d->sched_port))
        return 2;
    if (!d->sched_host)
        return fail("%s: sched needs \"host\"", path);
    json_t *eng = json_object_get(d->root, "engines");
    if (read_stores(d, json_object_get(d->root, "stores")) || (eng && read_engines(d, eng)))
        return 2;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Writing */

static int mkdir_p(const char *path, mode_t mode)
{
    char p[PATH_MAX_];
    snprintf(p, sizeof p, "%s", path);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/')
            continue;
        *s = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST)
            return -1;
        *s = '/';
    }
    return mkdir(p, mode) != 0 && errno != EEXIST ? -1 : 0;
}

/* The host's etc directory in the output: OUT/hosts/HOST/etc/kvfabric (made). */
static int host_dir(const char *out, const char *host, char *dir, size_t len)
{
    snprintf(dir, len, "%s/hosts/%s/etc/kvfabric", out, host);
    if (mkdir_p(dir, 0750) != 0)
        return fail("cannot make %s: %s", dir, strerror(errno));
    return 0;
}

static int copy_file(const char *from, const char *to)
{
    FILE *in = fopen(from, "rb");
    int fd = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    FILE *o = fd >= 0 ? fdopen(fd, "wb") : NULL;
    int rc = in && o ? 0 : -1;
    char buf[8192];
    for (size_t n; !rc && (n = fread(buf, 1, sizeof buf, in)) > 0;)
        rc = fwrite(buf, 1, n, o) == n ? 0 : -1;
    if (in)
        fclose(in);
    if (o)
        rc |= fclose(o);
    else if (fd >= 0)
        close(fd);
    return rc ? fail("cannot copy %s to %s: %s", from, to, strerror(errno)) : 0;
}

/* Copies credentials/NAME into the host's directory. */
static int give(const char *out, const char *host, const char *name)
{
    char dir[PATH_MAX_], from[PATH_MAX_], to[PATH_MAX_ + 64];
    if (host_dir(out, host, dir, sizeof dir) != 0)
        return 2;
    snprintf(from, sizeof from, "%s/credentials/%s", out, name);
    snprintf(to, sizeof to, "%s/%s", dir, name);
    return copy_file(from, to);
}

/* Writes the environment file NAME on host (mode 0640: root and the kvfabric group). */
static int write_env(const char *out, const char *host, const char *name, const char *text)
{
    char dir[PATH_MAX_], path[PATH_MAX_ + 64];
    if (host_dir(out, host, dir, sizeof dir) != 0)
        return 2;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f) {
        if (fd >= 0)
            close(fd);
        return fail("cannot write %s: %s", path, strerror(errno));
    }
    fputs(text, f);
    return fclose(f) ? fail("cannot write %s", path) : 0;
}

/* Appends a unit to enable on host (OUT/hosts/HOST/units, one a line, in start order). */
static int add_unit(const char *out, const char *host, const char *unit)
{
    char path[PATH_MAX_];
    snprintf(path, sizeof path, "%s/hosts/%s/units", out, host);
    FILE *f = fopen(path, "a");
    if (!f)
        return fail("cannot write %s: %s", path, strerror(errno));
    fprintf(f, "%s\n", unit);
    return fclose(f) ? fail("cannot write %s", path) : 0;
}

static int render_stores(const deploy *d, const char *out, char *stores, size_t slen, char *events,
                         size_t elen)
{
    size_t su = 0, eu = 0;
    for (int i = 0; i < d->n_stores; i++) {
        const d_store *s = &d->stores[i];
        char text[2048], name[64], unit[64], threads[32] = "";
        if (s->threads)
            snprintf(threads, sizeof threads, " --threads %ld", s->threads);
        snprintf(text, sizeof text,
                 "# kvf deploy render (%s): storage node %d on %s\n"
                 "KVF_STORE_ARGS=--listen %s:%ld --memory %s%s --node %d --auth %s/tenants "
                 "--events %s:%ld --events-credential %s/events.cred "
                 "--shm /run/kvfabric-store-%d/store.sock --metrics 127.0.0.1:%ld "
                 "--log-format %s\n",
                 d->name, i, s->host, s->host, s->port, s->memory, threads, i, d->etc, s->host,
                 s->events_port, d->etc, i, s->metrics_port, d->log_format);
        snprintf(name, sizeof name, "store-%d.env", i);
        snprintf(unit, sizeof unit, "kvf-store@%d", i);
        if (write_env(out, s->host, name, text) || give(out, s->host, "tenants") ||
            give(out, s->host, "events.cred") || add_unit(out, s->host, unit))
            return 2;
        su += (size_t)snprintf(stores + su, slen - su, "%s%s:%ld", i ? "," : "", s->host, s->port);
        eu += (size_t)snprintf(events + eu, elen - eu, "%stcp://%s:%ld", i ? "," : "", s->host,
                               s->events_port);
        if (su >= slen || eu >= elen)
            return fail("too many stores for one command line");
    }
    return 0;
}

static int render_sched(const deploy *d, const char *out, const char *stores, const char *events,
                        const char *events_key)
{
    char text[20000], cost[PATH_MAX_ + 16] = "";
    if (d->cost)
        snprintf(cost, sizeof cost, " --cost %s", d->cost);
    snprintf(text, sizeof text,
             "# kvf deploy render (%s): the scheduler on %s\n"
             "KVF_SCHED_ARGS=--listen %s:%ld --policy %s%s --chunk-tokens %ld --stores %s "
             "--store-events %s --tokens %s/sched.tokens --events-credential %s/admin.cred "
             "--events-server-key %s --log-format %s\n",
             d->name, d->sched_host, d->sched_host, d->sched_port, d->policy, cost, d->chunk_tokens,
             stores, events, d->etc, d->etc, events_key, d->log_format);
    if (write_env(out, d->sched_host, "sched.env", text) ||
        give(out, d->sched_host, "sched.tokens") || give(out, d->sched_host, "admin.cred") ||
        add_unit(out, d->sched_host, "kvf-sched"))
        return 2;
    return 0;
}

static int render_engines(const deploy *d, const char *out, const char *token)
{
    for (int i = 0; i < d->n_engines; i++) {
        const d_engine *e = &d->engines[i];
        char text[PATH_MAX_ + 6000], name[96], unit[96], cost[PATH_MAX_ + 16] = "";
        if (d->cost)
            snprintf(cost, sizeof cost, " --cost %s", d->cost);
        snprintf(text, sizeof text,
                 "# kvf deploy render (%s): engine %s (%s) on %s\n"
                 "KVF_ENGINE_ARGS=--id %s --role %s --listen %s:%ld --sched %s:%ld --model %s "
                 "--max-tokens %ld%s --events %s:%ld --events-credential %s/events.cred "
                 "--events-tenants %s/tenants --tokens %s/sched.tokens --log-format %s\n"
                 "KVF_CREDENTIAL=%s/cluster.cred\n"
                 "KVF_SCHED_TOKEN=%s\n",
                 d->name, e->id, e->role, e->host, e->id, e->role, e->host, e->port, d->sched_host,
                 d->sched_port, d->model, e->max_tokens, cost, e->host, e->events_port, d->etc,
                 d->etc, d->etc, d->log_format, d->etc, token);
        snprintf(name, sizeof name, "engine-%s.env", e->id);
        snprintf(unit, sizeof unit, "kvf-engine@%s", e->id);
        if (write_env(out, e->host, name, text) || give(out, e->host, "cluster.cred") ||
            give(out, e->host, "events.cred") || give(out, e->host, "tenants") ||
            give(out, e->host, "sched.tokens") || add_unit(out, e->host, unit))
            return 2;
    }
    return 0;
}

/* The hosts in start order (stores, then the scheduler, then engines), each once. */
static int hosts_of(const deploy *d, const char **hosts)
{
    int n = 0;
    const char *all[MAX_STORES + 1 + MAX_ENGINES];
    int m = 0;
    for (int i = 0; i < d->n_stores; i++)
        all[m++] = d->stores[i].host;
    all[m++] = d->sched_host;
    for (int i = 0; i < d->n_engines; i++)
        all[m++] = d->engines[i].host;
    for (int i = 0; i < m && n < MAX_HOSTS; i++) {
        int seen = 0;
        for (int j = 0; j < n && !seen; j++)
            seen = !strcmp(hosts[j], all[i]);
        if (!seen)
            hosts[n++] = all[i];
    }
    return n;
}

static int write_scripts(const deploy *d, const char *out)
{
    const char *hosts[MAX_HOSTS];
    int n = hosts_of(d, hosts);
    char path[PATH_MAX_];
    snprintf(path, sizeof path, "%s/README", out);
    FILE *r = fopen(path, "w");
    if (!r)
        return fail("cannot write %s: %s", path, strerror(errno));
    fprintf(r,
            "kvf deploy render: cluster \"%s\" (%d store(s), kvf-sched on %s, %d engine(s)).\n\n"
            "On each host H below, as root, with kvfabric installed (its units in systemd's unit\n"
            "path) and a system user kvfabric:\n\n"
            "  install -d -m 0750 -g kvfabric %s\n"
            "  cp hosts/H/etc/kvfabric/* %s/\n"
            "  chgrp kvfabric %s/* && chmod 0640 %s/*        # settings, the tenants file\n"
            "  chown kvfabric %s/*.cred %s/*.tokens && chmod 0600 %s/*.cred %s/*.tokens\n"
            "  sh hosts/H/enable.sh\n\n"
            "(The daemons refuse a credential that anyone but its owner may read.)\n\n"
            "Hosts, in the order to do them (stores, then the scheduler, then engines):\n",
            d->name, d->n_stores, d->sched_host, d->n_engines, d->etc, d->etc, d->etc, d->etc,
            d->etc, d->etc, d->etc, d->etc);
    for (int i = 0; i < n; i++) {
        fprintf(r, "  %s\n", hosts[i]);
        char units[PATH_MAX_], script[PATH_MAX_];
        snprintf(units, sizeof units, "%s/hosts/%s/units", out, hosts[i]);
        snprintf(script, sizeof script, "%s/hosts/%s/enable.sh", out, hosts[i]);
        FILE *u = fopen(units, "r"), *s = fopen(script, "w");
        if (!u || !s) {
            if (u)
                fclose(u);
            if (s)
                fclose(s);
            fclose(r);
            return fail("cannot write %s", script);
        }
        fprintf(s, "#!/bin/sh\n# kvf deploy render (%s): the units of %s, in order\nset -e\n",
                d->name, hosts[i]);
        char line[256];
        while (fgets(line, sizeof line, u)) {
            line[strcspn(line, "\n")] = '\0';
            fprintf(s, "systemctl enable --now %s\n", line);
        }
        fclose(u);
        if (fclose(s) != 0 || chmod(script, 0755) != 0) {
            fclose(r);
            return fail("cannot write %s", script);
        }
    }
    fprintf(r, "\ncredentials/ holds the cluster's credentials: cluster.cred (the engines' and\n"
               "tools' tenant: KVF_CREDENTIAL for kvf get/put/lookup), admin.cred (operators),\n"
               "sched.tokens (kvf-sched's bearer token for its API). Keep them as secrets.\n");
    return fclose(r) ? fail("cannot write %s", path) : 0;
}

static int render(const deploy *d, const char *out)
{
    char creds[PATH_MAX_], events_key[65], token[65], err[PATH_MAX_ + 300];
    char hosts_dir[PATH_MAX_];
    snprintf(hosts_dir, sizeof hosts_dir, "%s/hosts", out);
    if (access(hosts_dir, F_OK) == 0)
        return fail("%s exists: render into a new directory (the credentials are new each time)",
                    hosts_dir);
    snprintf(creds, sizeof creds, "%s/credentials", out);
    if (mkdir_p(creds, 0700) != 0)
        return fail("cannot make %s: %s", creds, strerror(errno));
    if (kvf__cluster_make_creds(creds, "tenants", d->tenant_bytes, events_key, err, sizeof err) ||
        kvf__cluster_make_token(creds, token, err, sizeof err)) {
        fprintf(stderr, "kvf deploy: %s\n", err);
        return 1;
    }
    char stores[8192], events[8192];
    int rc = render_stores(d, out, stores, sizeof stores, events, sizeof events);
    if (!rc)
        rc = render_sched(d, out, stores, events, events_key);
    if (!rc)
        rc = render_engines(d, out, token);
    if (!rc)
        rc = write_scripts(d, out);
    if (!rc) {
        const char *hosts[MAX_HOSTS];
        int n = hosts_of(d, hosts);
        printf("kvf deploy: rendered \"%s\" for %d host(s) into %s (%s/README says what to do "
               "on each)\n",
               d->name, n, out, out);
    }
    return rc;
}

int kvf__cli_deploy(int argc, char **argv)
{
    const char *config = NULL, *out = NULL;
    const kvf__arg args[] = {
        KVF__OPT("config", KVF__ARG_STR, &config, "DEPLOY.json",
                 "the deployment file: the hosts of the stores, the scheduler and the engines",
                 NULL),
        KVF__OPT("out", KVF__ARG_STR, &out, "DIR", "where the hosts' files go (a new directory)",
                 NULL),
    };
    const kvf__args_spec spec = {
        .prog = "kvf deploy render",
        .synopsis = "--config DEPLOY.json --out DIR",
        .summary = "Writes, for every host of the deployment file, the environment files of its "
                   "systemd units (kvf-store@N, kvf-sched, kvf-engine@ID) with the wiring between "
                   "them, the cluster's credentials (made here) and the units to enable, in "
                   "DIR/hosts/HOST/; DIR/README says what to do on each host. Nothing is started.",
        .epilog = "The deployment file (docs/operations.md): {\"name\", \"model\", \"policy\", "
                  "\"etc\", \"log_format\", \"cost\", \"tenant_bytes\", \"sched\": {\"host\", "
                  "\"port\"}, \"stores\": [{\"host\", \"memory\", \"threads\", \"port\", "
                  "\"events_port\", \"metrics_port\"}], \"engines\": [{\"host\", \"role\", "
                  "\"id\", \"port\", \"events_port\", \"max_tokens\"}]}\n"
                  "exit status: 0 rendered, 1 a file could not be written, 2 a usage error or a "
                  "deployment file refused",
        .args = args,
        .n = sizeof args / sizeof args[0],
        .max_positional = 0,
    };
    /* one action, render: `kvf deploy --help` is its help */
    if (argc < 2 || (strcmp(argv[1], "render") && argv[1][0] != '-')) {
        if (argc >= 2)
            fprintf(stderr, "kvf deploy: unknown action \"%s\" (render)\n", argv[1]);
        kvf__args_usage(&spec, stderr);
        return 2;
    }
    int at = strcmp(argv[1], "render") ? 0 : 1; /* options alone: read them, for --help */
    int rc = kvf__args_parse(&spec, argc - at, argv + at, NULL);
    if (rc != KVF__ARGS_GO_ON)
        return rc;
    if (!at)
        return fail("%s: the action comes first: kvf deploy render ... (see --help)", argv[1]);
    if (!config || !out)
        return fail("render needs --config and --out (see --help)");
    deploy d;
    rc = read_deploy(config, &d);
    if (!rc)
        rc = render(&d, out);
    json_decref(d.root);
    return rc;
}

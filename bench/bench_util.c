#include "bench_util.h"

#include "auth.h"
#include "proc.h"
#include "units.h"

#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <netinet/in.h>

int bench_args(const char *bench, const char *synopsis, const char *summary, const char *epilog,
               const kvf__arg *args, size_t n, int argc, char **argv)
{
    char prog[64];
    snprintf(prog, sizeof prog, "kvf-bench %s", bench);
    char **v = calloc((size_t)argc + 2, sizeof *v);
    if (!v) {
        fprintf(stderr, "%s: out of memory\n", prog);
        return -1;
    }
    v[0] = prog;
    for (int i = 0; i < argc; i++)
        v[i + 1] = argv[i];
    const kvf__args_spec spec = {
        .prog = prog,
        .synopsis = synopsis,
        .summary = summary,
        .epilog = epilog ? epilog : "exit status: 0 done, 1 a measurement failed, 2 a usage error",
        .args = args,
        .n = n,
        .max_positional = 0,
    };
    int rc = kvf__args_parse(&spec, argc + 1, v, NULL);
    free(v);
    return rc == KVF__ARGS_GO_ON ? 0 : rc == 0 ? 1 : -1;
}

double bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

void bench_sort(double *v, size_t n)
{
    qsort(v, n, sizeof *v, cmp_double);
}

double bench_quantile_sorted(const double *v, size_t n, double q)
{
    if (n == 0)
        return 0;
    size_t i = (size_t)(q * (double)(n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

double bench_quantile(double *v, size_t n, double q)
{
    bench_sort(v, n);
    return bench_quantile_sorted(v, n, q);
}

double bench_rss_mib(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    double kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %lf kB", &kb) == 1)
            break;
    fclose(f);
    return kb < 0 ? -1 : kb / 1024.0;
}

void bench_progress(const char *bench, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "[%s] ", bench);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

int bench_start_store(bench_proc *p, const char *bin, const char *memory, const char *extra)
{
    char err[640];
    if (!bin)
        bin = kvf__proc_find_bin("kvf-store");
    p->pid = kvf__proc_start_store(bin, memory, extra, 20000, &p->port, err, sizeof err);
    if (p->pid < 0) {
        fprintf(stderr, "kvf-bench: %s\n", err);
        return -1;
    }
    return 0;
}

int bench_store_client_open(const char *bench, bench_proc *store, const char *bin,
                            const char *memory, const char *extra, const char *host,
                            const kvf_client_opts *co, kvf_client **cl)
{
    if (bench_start_store(store, bin, memory, extra) != 0)
        return -1;
    char addr[300];
    snprintf(addr, sizeof addr, "%s:%u", host, store->port);
    const char *nodes[1] = {addr};
    kvf_client_opts one = *co;
    one.nodes = nodes;
    one.n_nodes = 1;
    char err[256];
    if (kvf_client_open(cl, &one, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench %s: %s\n", bench, err);
        bench_stop(store);
        return -1;
    }
    return 0;
}

/* A free loopback port: bind to 0, read it back, release it. */
static uint16_t free_port(void)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof a;
    uint16_t port = 0;
    if (s >= 0 && bind(s, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(s, (struct sockaddr *)&a, &sl) == 0)
        port = ntohs(a.sin_port);
    if (s >= 0)
        close(s);
    return port;
}

int bench_start_redis(bench_proc *p)
{
    p->port = free_port();
    char port[16];
    snprintf(port, sizeof port, "%u", p->port);
    char *argv[] = {(char *)"redis-server",
                    (char *)"--port",
                    port,
                    (char *)"--bind",
                    (char *)"127.0.0.1",
                    (char *)"--save",
                    (char *)"",
                    (char *)"--appendonly",
                    (char *)"no",
                    (char *)"--protected-mode",
                    (char *)"no",
                    (char *)"--loglevel",
                    (char *)"warning",
                    NULL};
    int fd;
    p->pid = kvf__proc_spawn(argv, &fd);
    if (p->pid < 0)
        return -1;
    close(fd);
    /* Ready when it answers PING; give up after 10 s. */
    for (int i = 0; i < 200; i++) {
        struct timeval tv = {0, 200000};
        redisContext *c = redisConnectWithTimeout("127.0.0.1", p->port, tv);
        if (c && !c->err) {
            redisReply *r = redisCommand(c, "PING");
            int ok = r && r->type == REDIS_REPLY_STATUS;
            freeReplyObject(r);
            redisFree(c);
            if (ok)
                return 0;
        } else if (c) {
            redisFree(c);
        }
        int st;
        if (waitpid(p->pid, &st, WNOHANG) == p->pid) {
            p->pid = 0;
            return -1; /* exited: not installed or failed */
        }
        usleep(50000);
    }
    bench_stop(p);
    return -1;
}

void bench_stop(bench_proc *p)
{
    if (p->pid <= 0)
        return;
    kill(p->pid, SIGTERM);
    for (int i = 0; i < 500; i++) {
        if (waitpid(p->pid, NULL, WNOHANG) == p->pid) {
            p->pid = 0;
            return;
        }
        usleep(10000);
    }
    kill(p->pid, SIGKILL);
    waitpid(p->pid, NULL, 0);
    p->pid = 0;
}

json_t *bench_result_new(const char *bench)
{
    json_t *res = json_object();
    json_object_set_new(res, "bench", json_string(bench));
    return res;
}

void bench_json_real(json_t *result, const char *key, double v)
{
    json_object_set_new(result, key, json_real(v));
}

bench_spread bench_spread_of(const double *v, size_t n)
{
    bench_spread s = {0};
    double *w = n ? malloc(n * sizeof *w) : NULL;
    if (!w)
        return s;
    memcpy(w, v, n * sizeof *w);
    s.median = bench_quantile(w, n, 0.5);
    s.p10 = bench_quantile(w, n, 0.1);
    s.p90 = bench_quantile(w, n, 0.9);
    free(w);
    return s;
}

bench_spread bench_json_rounds(json_t *result, const char *key, const double *v, size_t n)
{
    bench_spread s = bench_spread_of(v, n);
    char k[128];
    json_t *arr = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(arr, json_real(v[i]));
    bench_json_real(result, key, s.median);
    snprintf(k, sizeof k, "%s_rounds", key);
    json_object_set_new(result, k, arr);
    snprintf(k, sizeof k, "%s_p10", key);
    bench_json_real(result, k, s.p10);
    snprintf(k, sizeof k, "%s_p90", key);
    bench_json_real(result, k, s.p90);
    return s;
}

void bench_emit(json_t *result, int json)
{
    if (!json)
        return;
    char *t = json_dumps(result, JSON_COMPACT | JSON_SORT_KEYS | JSON_REAL_PRECISION(6));
    if (t) {
        printf("%s\n", t);
        free(t);
    }
}

int bench_plot_bars(const char *png, const bench_bars *b)
{
    char dat[] = "/tmp/kvf-bench-plot-XXXXXX";
    int fd = mkstemp(dat);
    if (fd < 0)
        return -1;
    FILE *f = fdopen(fd, "w");
    double vmax = 0, vmin = 0;
    for (size_t i = 0; i < b->n; i++) {
        double lo = b->lo ? b->lo[i] : b->values[i], hi = b->hi ? b->hi[i] : b->values[i];
        fprintf(f, "%zu \"%s\" %.6g %d %.6g %.6g\n", i, b->labels[i], b->values[i], b->groups[i],
                lo, hi);
        vmax = b->values[i] > vmax ? b->values[i] : vmax;
        if (b->values[i] > 0 && (vmin == 0 || b->values[i] < vmin))
            vmin = b->values[i];
    }
    fclose(f);
    const char *fmt = vmax >= 100 ? "%.0f" : vmax >= 10 ? "%.1f" : "%.2f";
    FILE *g = popen("gnuplot", "w");
    if (!g) {
        unlink(dat);
        return -1;
    }
    /* Whiskers: the 10th-90th percentile over the rounds where given. A log axis where the values
     * span decades (a short prompt's TTFT beside a long one's). The note under the plot says what
     * a reader needs to read it right. */
    fprintf(g,
            "set terminal pngcairo size 1000,%d font 'sans,10'\n"
            "set output '%s'\n"
            "set title \"%s\" noenhanced\n"
            "set ylabel '%s'\n"
            "set style fill solid 0.85 border -1\n"
            "set boxwidth 0.7\n"
            "set grid ytics\n"
            "set xtics rotate by -30 left\n"
            "set key off\n"
            "set palette defined (0 '#888888', 1 '#1f77b4', 2 '#d62728')\n"
            "unset colorbox\n"
            "set cbrange [0:2]\n",
            b->note ? 600 : 520, png, b->title, b->ylabel);
    if (b->logy && vmin > 0)
        fprintf(g, "set logscale y\nset yrange [%g:%g]\n", vmin / 2, vmax * 2.5);
    else
        fprintf(g, "set yrange [0:*]\n");
    if (b->note)
        fprintf(g,
                "set bmargin 9\nset label 1 \"%s\" at screen 0.02, screen 0.06 left "
                "font 'sans,9' noenhanced\n",
                b->note);
    fprintf(g,
            "plot '%s' using 1:3:4:xtic(2) with boxes lc palette, "
            "'' using 1:3:5:6 with yerrorbars lc rgb '#222222' pt -1 lw 1.2, "
            "'' using 1:6:(sprintf('%s',$3)) with labels offset 0,0.8\n",
            dat, fmt);
    int rc = pclose(g);
    unlink(dat);
    if (rc != 0) {
        fprintf(stderr, "kvf-bench: gnuplot failed; is gnuplot installed?\n");
        return -1;
    }
    return 0;
}

int bench_keyspace(kvf_keyspace *ks, const kvf_layout *layout, char *err, size_t errlen)
{
    uint8_t salt[KVF_SALT_MAX];
    size_t n = 0;
    if (kvf__auth_key_salt(NULL, NULL, 0, salt, sizeof salt, &n, err, errlen) != 0)
        return -1;
    return kvf_keyspace_init(ks, layout, (const char *)salt, n) == 0 ? 0 : -1;
}

int bench_auth_make(const char *dir, const char *const *names, size_t n, char *tenants, size_t tlen)
{
    snprintf(tenants, tlen, "%s/tenants", dir);
    FILE *f = fopen(tenants, "w");
    if (!f) {
        fprintf(stderr, "kvf-bench: %s: %s\n", tenants, strerror(errno));
        return -1;
    }
    chmod(tenants, 0600);
    int rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        char cred[4200], err[300], line[512];
        snprintf(cred, sizeof cred, "%s/%s.cred", dir, names[i]);
        kvf_credential c;
        kvf_tenant_key k = {.role = KVF_ROLE_TENANT};
        snprintf(k.name, sizeof k.name, "%s", names[i]);
        if (kvf__cred_new(&c, names[i], k.pk) != 0 ||
            kvf__cred_write(cred, &c, err, sizeof err) != 0) {
            fprintf(stderr, "kvf-bench: cannot make the credential %s\n", cred);
            rc = -1;
        }
        kvf__auth_wipe(&c, sizeof c);
        kvf__tenant_key_format(&k, line, sizeof line);
        fputs(line, f);
    }
    if (fclose(f) != 0)
        rc = -1;
    return rc;
}

void bench_auth_remove(const char *dir, const char *const *names, size_t n)
{
    char p[4200];
    for (size_t i = 0; i < n; i++) {
        snprintf(p, sizeof p, "%s/%s.cred", dir, names[i]);
        unlink(p);
    }
    snprintf(p, sizeof p, "%s/tenants", dir);
    unlink(p);
    rmdir(dir);
}

/* fio writing (rw "write") or reading ("read", "randread") a file of total bytes in dir with
 * block size bs, io_uring, O_DIRECT, queue depth 1 (bench_util.h). */
double bench_fio_rate(const char *dir, const char *rw, uint64_t bs, uint64_t total)
{
    char file[4200];
    snprintf(file, sizeof file, "%s/kvf-bench-fio.%d.dat", dir, (int)getpid());
    double gbps = bench_fio_rate_jobs(file, rw, bs, total, 1, 1, 0);
    if (!strcmp(rw, "read"))
        unlink(file);
    return gbps;
}

double bench_fio_rate_jobs(const char *file, const char *rw, uint64_t bs, uint64_t total, int depth,
                           int jobs, int readonly)
{
    char cmd[8192];
    jobs = jobs < 1 ? 1 : jobs;
    /* jobs > 1: each its own 1/jobs of the total, one after another in the file, reported as one */
    uint64_t each = total / (uint64_t)jobs / bs * bs;
    char split[160] = "";
    if (jobs > 1)
        snprintf(split, sizeof split, " --offset_increment=%llu --group_reporting",
                 (unsigned long long)each);
    snprintf(cmd, sizeof cmd,
             "fio --name=kvf --filename=%s --rw=%s --bs=%llu --size=%llu --ioengine=io_uring "
             "--iodepth=%d --direct=1 --numjobs=%d%s%s --output-format=json 2>/dev/null",
             file, rw, (unsigned long long)bs, (unsigned long long)(jobs > 1 ? each : total),
             depth < 1 ? 1 : depth, jobs, split, readonly ? " --readonly" : "");
    FILE *p = popen(cmd, "r");
    if (!p)
        return -1;
    char *out = NULL;
    size_t cap = 0, used = 0;
    for (;;) {
        if (used + 4096 > cap) {
            cap = cap ? cap * 2 : 65536;
            char *n = realloc(out, cap);
            if (!n)
                break;
            out = n;
        }
        size_t k = fread(out + used, 1, cap - used - 1, p);
        if (!k)
            break;
        used += k;
    }
    int st = pclose(p);
    double gbps = -1;
    if (out && st == 0) {
        out[used] = '\0';
        json_error_t je;
        json_t *j = json_loads(out, 0, &je);
        json_t *job = json_array_get(json_object_get(j, "jobs"), 0);
        json_t *bw = json_object_get(json_object_get(job, strcmp(rw, "write") ? "read" : "write"),
                                     "bw_bytes");
        if (json_is_number(bw))
            gbps = json_number_value(bw) / 1e9;
        json_decref(j);
    }
    free(out);
    return gbps;
}

int bench_fio_present(void)
{
    return system("fio --version >/dev/null 2>&1") == 0;
}

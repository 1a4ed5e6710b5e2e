/*
 * The etcd members of a cluster whose file asks for them ("etcd": 1 or 3; docs/membership.md):
 * each in a data folder of the run directory made afresh, on loopback (free ports) or in a
 * namespace of its own (--netns: port 7400 for clients, 7401 for its peers), healthy before the
 * stores and kvf-sched that register in it start.
 */
#include "cluster_int.h"

#include "http.h"
#include "proc.h"

#include <arpa/inet.h>
#include <jansson.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int kvf__cluster_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    int port = -1;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &al) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0)
        close(fd);
    return port;
}

/* Whether the member at addr answers GET /health with {"health": "true"}. */
static int healthy(const char *addr)
{
    char url[128], err[256];
    snprintf(url, sizeof url, "http://%s/health", addr);
    long status = 0;
    json_t *r = NULL;
    int ok =
        kvf__http_call("GET", url, NULL, 1000, &status, &r, err, sizeof err) == 0 && status == 200;
    const char *h = json_string_value(json_object_get(r, "health"));
    ok = ok && h && !strcmp(h, "true");
    json_decref(r);
    return ok;
}

int kvf__cluster_etcd_start(const cfg *c, proc *p, int n, char client[][64], char peer[][64],
                            char *endpoints, size_t len)
{
    char initial[1024] = "";
    for (int i = 0; i < n; i++) {
        size_t l = strlen(initial);
        snprintf(initial + l, sizeof initial - l, "%skvf-etcd-%s-%d=http://%s", i ? "," : "",
                 c->name, i, peer[i]);
    }
    endpoints[0] = 0;
    for (int i = 0; i < n; i++) {
        char name[64], data[700], curl[96], purl[96], token[64];
        snprintf(name, sizeof name, "kvf-etcd-%s-%d", c->name, i);
        snprintf(data, sizeof data, "%s/%s.data", c->run_dir, p[i].name);
        snprintf(curl, sizeof curl, "http://%s", client[i]);
        snprintf(purl, sizeof purl, "http://%s", peer[i]);
        snprintf(token, sizeof token, "kvf-%s", c->name);
        kvf__cluster_rm_tree(data); /* a fresh cluster: no earlier state */
        char *argv[40];
        int k = 0;
        if (p[i].ns[0]) {
            argv[k++] = "ip", argv[k++] = "netns", argv[k++] = "exec";
            argv[k++] = p[i].ns;
        }
        char *rest[] = {"etcd",  "--name",
                        name,    "--data-dir",
                        data,    "--listen-client-urls",
                        curl,    "--advertise-client-urls",
                        curl,    "--listen-peer-urls",
                        purl,    "--initial-advertise-peer-urls",
                        purl,    "--initial-cluster",
                        initial, "--initial-cluster-state",
                        "new",   "--initial-cluster-token",
                        token,   NULL};
        for (int j = 0; rest[j]; j++)
            argv[k++] = rest[j];
        argv[k] = NULL;
        snprintf(p[i].log, sizeof p[i].log, "%s/%s.log", c->run_dir, p[i].name);
        snprintf(p[i].addr, sizeof p[i].addr, "%s", client[i]);
        char err[512];
        p[i].pid = kvf__proc_spawn_detached(argv, p[i].log, NULL, err, sizeof err);
        if (p[i].pid < 0)
            return kvf__cluster_fail("%s: %s (is etcd-server installed? cluster/deps.sh installs "
                                     "it)",
                                     p[i].name, err);
        size_t l = strlen(endpoints);
        snprintf(endpoints + l, len - l, "%s%s", l ? "," : "", curl);
    }
    /* every member healthy (a member of three needs a quorum: they start together) */
    for (int i = 0; i < n; i++) {
        struct timespec t0, t;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (;;) {
            if (kvf__cluster_interrupted)
                return 1;
            if (healthy(p[i].addr))
                break;
            if (waitpid(p[i].pid, NULL, WNOHANG) == p[i].pid)
                return kvf__cluster_fail("%s exited before it was healthy (is etcd-server "
                                         "installed? see %s)",
                                         p[i].name, p[i].log);
            clock_gettime(CLOCK_MONOTONIC, &t);
            if ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 > READY_MS)
                return kvf__cluster_fail("%s was not healthy within %d s (see %s)", p[i].name,
                                         READY_MS / 1000, p[i].log);
            usleep(100000);
        }
        printf("  %-10s %-7s %-22s pid %-7d log %s\n", p[i].name, p[i].kind, p[i].addr,
               (int)p[i].pid, p[i].log);
        fflush(stdout);
    }
    return 0;
}

/*
 * What the parts of `kvf cluster` share (cluster.c: the configuration and the down, status and send
 * actions; cluster_up.c: up; cluster_run.c: what up makes and down removes, namespaces, the state
 * file and the processes). Only cluster/ includes it.
 */
#ifndef KVF_CLUSTER_CLUSTER_INT_H
#define KVF_CLUSTER_CLUSTER_INT_H

#include <stdio.h>
#include <sys/types.h>

#define MAX_PROCS 64
#define READY_MS  30000

/* Engines the launcher does not start ("external_engines": vLLM's, which publish one stream of KV
 * events in its format): a kvf-relay before each republishes its events to the kvf-sched replicas,
 * secured and by shard, and the replicas route to it as they are told in a --config file. */
#define MAX_EXTERNAL 8
typedef struct ext_engine {
    char id[64], role[16], endpoint[160], events[160], replay[160];
    int block_tokens;
} ext_engine;

typedef struct cfg {
    char name[16], model[256], store_memory[32], store_disk[32], store_shm[16], policy[32],
        run_dir[512];
    /* the engines: "kvf-engine" (the reference engine) or "transformers" (python3 -m
     * kvfabric.serve, with engine_args appended, run by the interpreter python) */
    char engine[16], engine_args[512], python[256];
    /* how the engines share a GPU: "timeslice" (the driver's default: the processes' contexts
     * take turns) or "mps" (an MPS control daemon: their kernels run at once; cluster_mps.c) */
    char gpu_share[16];
    int stores, prefill, decode, store_threads;
    int scheds;         /* kvf-sched replicas of each shard (1 to 4) */
    int sched_shards;   /* shards of kvf-sched's index (1 to 8; "sched_shards") */
    int etcd;           /* etcd members the launcher starts (0: none, static lists; 1 or 3) */
    int etcd_ttl;       /* the leases of the stores and replicas, seconds */
    int replicate_hits; /* the stores' --replicate-hits (0: off; needs etcd) */
    int replicas;       /* their --replicas: holders of each hot chunk (2..8, <= stores) */
    long max_tokens;
    ext_engine ext[MAX_EXTERNAL];
    int n_ext;
    /* --netns */
    char subnet[32], rate[32];
    double delay_ms;
} cfg;

typedef struct proc {
    char name[32], kind[16], addr[160], log[600], ns[64];
    char ready[512]; /* its ready line: listen=, events=, ... */
    pid_t pid;
} proc;

/* The MPS control daemon of a cluster whose "gpu_share" is "mps" (cluster_mps.c). */
typedef struct kvf__cluster_mps {
    char pipe[256];    /* CUDA_MPS_PIPE_DIRECTORY, empty without MPS */
    char log_dir[560]; /* CUDA_MPS_LOG_DIRECTORY (RUN_DIR/mps) */
    char log[600];     /* the control program's own output (RUN_DIR/mps.log) */
    int started;       /* this launcher started it (and down stops it) */
} kvf__cluster_mps;

/* cluster_mps.c: with "gpu_share": "mps", starts a control daemon (or takes the operator's, from
 * CUDA_MPS_PIPE_DIRECTORY) and waits for its pipes; m->pipe stays empty otherwise. Returns 0, or
 * 1 after printing why; where m->started is set then, the caller stops it (kvf__cluster_mps_stop).
 */
int kvf__cluster_mps_start(const cfg *c, kvf__cluster_mps *m);
/* Asks a daemon that up started to quit (once: m->started is cleared) and removes its pipes'
 * directory. 0, or -1 after printing how to stop it by hand. */
int kvf__cluster_mps_stop(kvf__cluster_mps *m);

/* Set by SIGINT/SIGTERM while up runs (kvf__cluster_on_interrupt), so that it can undo. */
extern volatile int kvf__cluster_interrupted;
void kvf__cluster_on_interrupt(int sig);
/* Prints "kvf cluster: " and the message on stderr; returns 1. */
int kvf__cluster_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* cluster_run.c: removes path and everything under it (links not followed); what is not there
 * is no error. */
void kvf__cluster_rm_tree(const char *path);

/* cluster_run.c: network namespaces (--netns). The commands run go to the file
 * kvf__cluster_cmdlog (NULL: nowhere). */
extern FILE *kvf__cluster_cmdlog;
/* The namespace name of host in cluster c ("kvf-NAME-HOST"). */
void kvf__cluster_ns_name(const cfg *c, const char *host, char *out, size_t n);
/* Removes the namespaces of p[0..np) and the hub. */
void kvf__cluster_netns_down(const cfg *c, const proc *p, int np);
/* Makes the hub that joins the hosts' namespaces; shaping gets how the links are shaped. Returns
 * 0, or 1 after printing why. */
int kvf__cluster_netns_hub(const cfg *c, char *shaping, size_t sl);
/* Makes host k's namespace (named p->ns), its veth into the hub and its shaping. Returns 0, or 1
 * after printing why. */
int kvf__cluster_netns_host(const cfg *c, proc *p, int k, char *shaping, size_t sl);

/* cluster_etcd.c: starts the n etcd members p[0..n) (named, their namespaces made), member i
 * serving clients on client[i] and its peers on peer[i] ("HOST:PORT"), and waits until each is
 * healthy. endpoints gets their "http://HOST:PORT" list. 0, or 1 after printing why. */
int kvf__cluster_etcd_start(const cfg *c, proc *p, int n, char client[][64], char peer[][64],
                            char *endpoints, size_t len);
/* A port free on loopback now (-1: none). */
int kvf__cluster_free_port(void);

/* cluster_run.c: the state file (RUN_DIR/state.json) and the processes it names. */
void kvf__cluster_state_path(const cfg *c, char *out, size_t n);
int kvf__cluster_state_write(const cfg *c, const proc *p, int np, int netns, const char *shaping,
                             const kvf__cluster_mps *mps);
/* Returns 0 with what the state file names (at most MAX_PROCS), or -1 where there is none. */
int kvf__cluster_state_read(const cfg *c, proc *p, int *np, int *netns);
/* The MPS daemon the state file names (m->started 0 where it names none that up started). */
void kvf__cluster_state_mps(const cfg *c, kvf__cluster_mps *m);
/* A pid from the state file is ours only while its command line is one of our programs. */
int kvf__cluster_ours_alive(pid_t pid);
/* Stops p[0..np): SIGTERM in reverse order, SIGKILL to what is left after 5 s. children: they
 * are this process's own (up undoing itself), else pids from the state file (down). */
void kvf__cluster_stop_procs(proc *p, int np, int children);

/* cluster_up.c: `kvf cluster up`. Returns the exit status (130 when interrupted). */
int kvf__cluster_up(const cfg *c, int netns);

#endif

/*
 * A fake RDMA fabric for tests: libibverbs' and librdmacm's calls that kvfabric makes are wrapped
 * at link time (-Wl,--wrap) by functions that connect queue pairs inside this process and carry
 * out READs and WRITEs with memcpy, checking every lkey and rkey against the registrations. No
 * machine here has an RDMA device, not even Soft-RoCE. Tests read the counters and set the hooks
 * of `F` (under F.mu where the fabric may be running).
 */
#ifndef KVF_TESTS_FAKE_FABRIC_H
#define KVF_TESTS_FAKE_FABRIC_H

#include <infiniband/verbs.h>
#include <pthread.h>
#include <rdma/rdma_cma.h>
#include <stdint.h>

#define MAX_MRS 16384 /* a batch of more than 1,024 objects registers each */
#define MAX_EVS 64
#define MAX_WC  8192

typedef struct fchan {
    struct rdma_event_channel ch; /* fd: a pipe's read end, readable while events wait */
    int wfd;
    struct rdma_cm_event *evs[MAX_EVS];
    int n;
} fchan;

typedef struct fid {
    struct rdma_cm_id id;
    struct fid *peer;
    uint16_t port; /* bound (listener) or resolved (active side) */
    int listening, gone;
    int in_error; /* its queue pair failed a request: every later one is flushed */
    struct ibv_qp qp;
} fid;

/* A hook on every work request before it is carried out: returns a completion status to fail
 * it with (IBV_WC_SUCCESS: carry it out). After the copy, `after` may alter what landed. */
typedef enum ibv_wc_status (*wr_hook)(int opcode, void *local, uint64_t remote, uint32_t len,
                                      long index);
typedef void (*wr_after)(int opcode, void *local, uint32_t len, long index);

typedef struct fake_fabric {
    pthread_mutex_t mu;
    struct ibv_context ctx;
    struct ibv_pd pd;
    struct ibv_cq cq;
    struct ibv_mr *mrs[MAX_MRS];
    uint32_t next_key;
    fid *listeners[8];
    struct ibv_wc wc[MAX_WC];
    int wc_head, wc_n;
    long reads, writes, read_bytes, write_bytes, connects, errors;
    wr_hook hook;
    wr_after after;
} fake_fabric;

extern fake_fabric F;

/* Forgets the counters and hooks of the last test and (re)installs the fake verbs. */
void fabric_reset(void);

#endif

/*
 * What the files of the daemon kvf-sched share: its state, the events thread (subscriber.c), the
 * instance table (registry.c) and the HTTP routes (http_api.c). main.c starts and stops them. Not
 * a public interface.
 *
 * Lock order: there is one lock, mu. It serialises the scheduler core (not thread-safe) between
 * the HTTP thread and the events thread, and guards every field below that either thread writes
 * after startup, except stop. Functions named _locked expect it held, or run before the events
 * thread starts. No thread waits on the network with mu held: the events thread asks a replay
 * socket and waits for its answers without it (subscriber.c).
 */
#ifndef KVF_SCHED_DAEMON_H
#define KVF_SCHED_DAEMON_H

#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "record.h"
#include "scheduler.h"

#include "http.h"
#include "metrics.h"
#include "ingest.h"
#include "log.h"
#include "pubsub.h"

#define KVF_SCHED_MAX_SUBS KVF_ZSUBS_MAX

/* A publisher of KV events the events thread subscribes to. */
typedef struct kvf__sched_sub {
    kvf_event_source src;
    char endpoint[128];
    char replay_ep[128];
    kvf_seq_tracker seq;
    /* The replay socket's back-off, the events thread's alone (not under mu): it is not asked
     * before replay_down_until_ns (CLOCK_MONOTONIC), set after a request got no answer. */
    uint64_t replay_down_until_ns;
    unsigned replay_backoff_ms; /* the last back-off; 0 once the socket answers */
    /* The instance it feeds was removed (registry.c): its batches are dropped from then on, and
     * the events thread closes it and frees its number. */
    int dead;
    int used; /* a subscription is made in this entry */
    /* A storage node with a snapshot socket (its "replay" endpoint): what it holds is asked for
     * whole at first contact and after a gap (snapshot()), never batch by batch. */
    int snapshots;
    int snapped;        /* a snapshot was applied since the subscription was made */
    int warned_sharded; /* an unsharded replica told that this engine's events are sharded */
    uint64_t snap_seq;  /* the last batch it reflects: the stream's next is snap_seq + 1 */
    /* A snapshot under way (subscriber.c), read a slice a round; the node's stream is left
     * queued meanwhile and applied over it after. The events thread's alone. */
    int snap_active, snap_cleared;
    uint64_t snap_deadline_ns, snap_heard_ns, snap_batches, snap_chunks;
    /* An engine with a replay socket: everything its window holds is asked for as soon as the
     * subscription is made (the events thread's alone, as seq). */
    kvf_contact contact;
    /* Warnings about its batches, at most one a second (subscriber.c, warn_batch): a publisher
     * of garbage must not fill the log. */
    kvf__log_quiet warned, warned_resync;
    kvf_replay_credit credit; /* its replays' share of the events thread (ingest.h) */
    kvf_replay_debt debt;     /* what a replay still owes (ingest.h); the events thread's alone */
    int debt_unasked;         /* the debt is a gap owed for the round's time, not after an ask */
} kvf__sched_sub;

/* What the daemon keeps of an instance beside the core's record, by slot (registry.c). */
typedef struct kvf__sched_reg {
    uint64_t seen_ns; /* its registration or last load report (CLOCK_MONOTONIC) */
    int pinned;       /* from the cluster file (--config): never expires */
    char replay[128]; /* the replay endpoint it registered with */
    char owner[64]; /* the token that registered it (--tokens); empty: none, or the cluster file */
    /* the shards it publishes its events in, as its record says (0: it does not say); one that
     * differs from this replica's is told once and counted: its events never reach this index */
    uint32_t event_shards;
} kvf__sched_reg;

/* A placement sent and not yet seen in its engine's load report (sent.c). */
typedef struct kvf__sched_sent {
    uint64_t ticket;
    uint64_t until_ns;      /* kept until then (CLOCK_MONOTONIC), unless listed before */
    int slot;               /* the prefill instance; -1: answered (the entry waits to be dropped) */
    double tokens, seconds; /* the work place() added to that instance's load */
    uint32_t decodes;       /* and the decode it added there (1: colocated) */
} kvf__sched_sent;

#define KVF__SCHED_SENT_MAX 4096

typedef struct kvf__sched_daemon {
    kvf_sched *s;
    pthread_mutex_t mu;
    kvf_log lg;
    /* The events thread's (subscriber.c). */
    kvf__zsubs *zs;        /* the subscriber sockets, one per entry of subs (same index) */
    kvf__kve_decoder *dec; /* batches are decoded into it without d->mu, then applied with it */
    kvf__sched_sub subs[KVF_SCHED_MAX_SUBS];
    int n_subs;
    /* subscriptions requested by the HTTP thread, made by the events thread */
    kvf_event_source pending_src[KVF_SCHED_MAX_SUBS];
    char pending_ep[KVF_SCHED_MAX_SUBS][128];
    char pending_replay[KVF_SCHED_MAX_SUBS][128];
    int n_pending;
    kvf_ingest_stats ingest;
    uint64_t seq_gaps, seq_missed, seq_restarts; /* saturating */
    uint64_t replayed, replay_timeouts, replays_owed_retried;
    /* The events thread's: the subscription whose snapshot, first contact or owed replay is
     * asked first in the next round (subscriber.c, a round's asking time is bounded). */
    int asks_from;
    uint64_t round_until_ns; /* the end of this round's asking time (events thread) */
    uint64_t asks_deferred;  /* asks a round left to the next for the time it had spent */
    uint64_t late_joins;     /* first contacts that asked the replay socket for what came before */
    uint64_t resyncs; /* replays whose window did not reach back: the source's blocks dropped */
    uint64_t snapshots, snapshot_failures; /* storage nodes' snapshots applied, and not had */
    /* The index's shard this replica holds (--shard K/N; shards 1: the whole index): it subscribes
     * to the engines' topic of shard K only (kvf_events_opts.shards). */
    uint32_t shard, shards;
    uint64_t sharded_dropped; /* an unsharded replica's: sharded batches it cannot apply */
    /* The instance table's (registry.c), written by both threads. */
    kvf__sched_reg reg[KVF_SCHED_MAX_INSTANCES];
    uint64_t ttl_ns; /* an instance expires this long after it was last seen; 0: never */
    uint64_t expired, deleted;
    /* The HTTP thread's (http_api.c). */
    uint64_t placements, rejections;
    /* Placements not yet in their engines' load reports, oldest first (sent.c): a ring of
     * sent_n entries from sent_head, each kept at most sent_window_ns (--placement-ack-s). */
    kvf__sched_sent sent[KVF__SCHED_SENT_MAX];
    size_t sent_head, sent_n;
    uint64_t next_ticket, sent_window_ns;
    uint64_t sent_acked;          /* placements a load report listed */
    uint64_t sent_readded;        /* times a placement's work was added to a report's figures */
    uint64_t sent_reports_behind; /* load reports taken before a request placed there arrived */
    uint64_t sent_expired;        /* placements never listed within the window */
    kvf__httpd *httpd;
    /* /metrics (core/metrics.h): the counters above mirrored at each scrape, and histograms
     * observed where they happen. */
    kvf__metrics *metrics;
    kvf__series *place_seconds, *ingest_batch_seconds;
    char stores[4096]; /* data addresses of the storage nodes, comma-separated (--stores) */
    /* Membership on etcd (members.c): the stores registered, by node (their records; "" for
     * none), and this replica's own registration. */
    struct kvf__watcher *store_watch, *engine_watch;
    struct kvf__member *self;
    char (*store_rec)[512]; /* KVF_SCHED_MAX_STORES */
    uint64_t store_joins, store_leaves, engine_joins, engine_leaves;
    atomic_int stop;
} kvf__sched_daemon;

/* ------------------------------------------------------------------------------------------ */
/* Placements sent, not yet seen in a load report (sent.c) */

/* Seeds the tickets (random, below 2^53) and empties the ring. */
void kvf__sched_sent_init(kvf__sched_daemon *d);
/* A placement on instance slot `slot` that added tokens and seconds (and decodes decodes) to its
 * load, kept for the window plus later_s (the time until the request is expected there): its
 * ticket, `ticket` where not 0 (the decode half of a placement noted already), else a new one. */
uint64_t kvf__sched_sent_note_locked(kvf__sched_daemon *d, uint64_t ticket, int slot, double tokens,
                                     double seconds, uint32_t decodes, double later_s);
/* Sorts a report's tickets, as kvf__sched_sent_apply_locked() wants them (without the lock). */
void kvf__sched_sent_sort(uint64_t *acks, size_t n_acks);
/* A load report L of instance slot `slot` listing the tickets acks[0..n_acks) (sorted; has_acks:
 * the report has the list, maybe empty): the placements it lists are answered; the work of the
 * others still within the window is added to L. Without the list, every placement there is
 * answered. */
void kvf__sched_sent_apply_locked(kvf__sched_daemon *d, int slot, const uint64_t *acks,
                                  size_t n_acks, int has_acks, kvf_instance_load *L);
/* The placements kept and not answered, those past the window dropped first. */
size_t kvf__sched_sent_pending_locked(kvf__sched_daemon *d);
/* Instance slot `slot` was removed: its placements are forgotten. */
void kvf__sched_sent_forget_locked(kvf__sched_daemon *d, int slot);

/* Makes d->metrics, the registry /metrics exposes (http_api.c). Returns 0 or -1. */
int kvf__sched_metrics_open(kvf__sched_daemon *d);

/* ------------------------------------------------------------------------------------------ */
/* The events thread (subscriber.c) */

/* Asks the events thread to subscribe to the KV events that endpoint ep publishes for src (and
 * to ask replay, if not NULL or empty, for missed batches). An empty ep asks nothing; beyond
 * KVF_SCHED_MAX_SUBS pending requests the rest are dropped. */
void kvf__sched_subscribe_locked(kvf__sched_daemon *d, const kvf_event_source *src, const char *ep,
                                 const char *replay);
/* The same for storage node `node`'s subscription. */
void kvf__sched_unsubscribe_store_locked(kvf__sched_daemon *d, int node);
/* Ends the subscriptions that feed instance slot idx, made or pending: none of their batches is
 * applied after this returns, and the events thread closes their sockets. */
void kvf__sched_unsubscribe_locked(kvf__sched_daemon *d, int idx);
/* The subscriptions made and not ended. */
int kvf__sched_subscriptions_locked(const kvf__sched_daemon *d);
/* One round of the events thread: makes the subscriptions asked for and applies every batch that
 * arrived (waiting 100 ms at most for one). */
void kvf__sched_events_round(kvf__sched_daemon *d);

/* ------------------------------------------------------------------------------------------ */
/* Membership on etcd (members.c) */

typedef struct kvf__sched_etcd {
    const char *etcd, *cluster, *advertise; /* --etcd, --cluster, --advertise */
    int ttl_s;
    uint16_t port; /* where this replica serves HTTP */
} kvf__sched_etcd;

/* Follows the stores registered under /kvfabric/CLUSTER/stores/ (subscribing to each one's
 * events and snapshots as it joins, dropping it from placement the moment its key goes) and
 * registers this replica under /kvfabric/CLUSTER/scheds/. 0, or 1 after saying why. */
int kvf__sched_etcd_start(kvf__sched_daemon *d, const kvf__sched_etcd *o);
/* Whether the first listing of the stores is in (1 without etcd). Called with d->mu held. */
int kvf__sched_etcd_synced_locked(kvf__sched_daemon *d);
/* Revokes this replica's registration and stops following the stores. */
void kvf__sched_etcd_stop(kvf__sched_daemon *d);

/* ------------------------------------------------------------------------------------------ */
/* The instance table (registry.c) */

/* Registers *in (replay: its replay endpoint, may be empty) and asks for its events. An id that
 * is registered already must come with the same fields: then it counts as a heartbeat. pinned
 * (the cluster file's) never expires. Returns 0 with *fresh 1 for a new instance and 0 for a
 * repeat, *idx its slot; KVF_EEXIST when the id is registered with other fields (the first that
 * differs, with both values, in err); KVF_ENOSPC when the table is full; KVF_EINVAL for a record
 * the core refuses. */
int kvf__sched_register_locked(kvf__sched_daemon *d, const kvf_instance_info *in,
                               const char *replay, uint32_t event_shards, int pinned, int *idx,
                               int *fresh, char *err, size_t errlen);
/* Notes that instance idx was heard from (a load report). */
void kvf__sched_seen_locked(kvf__sched_daemon *d, int idx);
/* Removes instance idx from the table, the index and the subscriptions. 0 or KVF_ENOENT. */
int kvf__sched_remove_locked(kvf__sched_daemon *d, int idx);
/* Removes every instance not heard from within d->ttl_ns, but the pinned. */
void kvf__sched_expire_locked(kvf__sched_daemon *d);
/* The events thread: expires instances, then runs kvf__sched_events_round, until d->stop is set.
 * arg is the daemon. */
void *kvf__sched_events_main(void *arg);

/* ------------------------------------------------------------------------------------------ */
/* The HTTP API (http_api.c) */

/* The HTTP server's handler (a kvf__http_handler): answers one request; cls is the daemon. */
unsigned kvf__sched_http_route(void *cls, const char *method, const char *url, json_t *o,
                               kvf__http_reply *c);

#endif

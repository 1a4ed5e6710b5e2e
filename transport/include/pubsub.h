/*
 * KV event streams over ZeroMQ (libzmq), the way vLLM publishes them and kvf-sched reads them:
 * each batch is one multipart message [topic, 8-byte big-endian sequence number, payload] on a PUB
 * socket; a subscriber that sees a gap in the sequence may ask the publisher's replay socket
 * (ROUTER) for the batches it missed through a DEALER. This file owns the sockets' lifecycle and
 * turns libzmq's -1/zmq_errno() convention into KVF_E* codes; what the payload means is
 * proto/kvevents.h's business.
 */
#ifndef KVF_TRANSPORT_PUBSUB_H
#define KVF_TRANSPORT_PUBSUB_H

#include <stddef.h>
#include <stdint.h>

/* A PUB socket with its own ZeroMQ context. */
typedef struct kvf__zpub kvf__zpub;

/* Binds a PUB socket on host:port (port 0: a free port) that keeps unsent messages for at most
 * linger_ms when closed. *endpoint gets the bound "tcp://HOST:PORT". Returns 0, KVF_EADDRINUSE
 * (cannot bind) or KVF_ENOMEM, with one line in err. Caller owns *out; free with
 * kvf__zpub_close(). */
int kvf__zpub_open(kvf__zpub **out, const char *host, uint16_t port, int linger_ms, char *endpoint,
                   size_t eplen, char *err, size_t errlen);
/* Security of a publisher (docs/security.md, "KV events"): ZeroMQ's CURVE (the publisher is a
 * CURVE server, every subscriber proves a key pair, and the stream is encrypted), with a ZAP
 * handler that asks allow() whom a subscriber's public key belongs to. An admin subscriber gets
 * the topics it asks for; any other is confined to the topic tenant_prefix + its name + "/",
 * whatever it asks (the socket is an XPUB applying subscriptions itself), so it receives only the
 * batches sent under its own tenant's topic. */
typedef struct kvf__zsec {
    uint8_t secret[32]; /* the publisher's CURVE (X25519) secret key */
    /* Called on the ZAP thread with a subscriber's CURVE public key: 1 with its name (at most
     * namelen bytes with the NUL) and *admin, or 0 to refuse it. */
    int (*allow)(void *ud, const uint8_t pk[32], char *name, size_t namelen, int *admin);
    void *ud;
    const char *tenant_prefix;
} kvf__zsec;

/* As kvf__zpub_open, secured by sec (copied). The same errors, and KVF_ENOTSUP where libzmq was
 * built without CURVE. */
int kvf__zpub_open_secure(kvf__zpub **out, const char *host, uint16_t port, int linger_ms,
                          const kvf__zsec *sec, char *endpoint, size_t eplen, char *err,
                          size_t errlen);
/* A secured publisher applies the subscriptions that arrived meanwhile (nothing for an open
 * one). kvf__zpub_send does it too; a thread that sends seldom calls this in between. Same thread
 * rule as kvf__zpub_send. */
void kvf__zpub_service(kvf__zpub *p);
/* Sends one batch [topic, seq as 8 bytes big-endian, payload]. Returns 0 or KVF_EIO. One thread
 * at a time (ZeroMQ sockets are not thread-safe). */
int kvf__zpub_send(kvf__zpub *p, const char *topic, uint64_t seq, const void *payload, size_t len);
/* Keeps the last `batches` batches sent (at most `bytes` of payload) and answers replay requests
 * for them (vLLM's protocol: a request is the first sequence number wanted, 8 bytes big-endian;
 * the answers are (sequence, payload) and an empty end) on a ROUTER socket bound on host:port
 * (port 0: a free one), served by a thread of its own; secured as the publisher is: on a secured
 * publisher a tenant gets its own topic's batches only, an admin every batch. *endpoint gets the
 * bound address. Call before the first send. 0, KVF_EINVAL, KVF_ENOMEM or KVF_EADDRINUSE (one
 * line in err). */
int kvf__zpub_replay(kvf__zpub *p, const char *host, uint16_t port, size_t batches, size_t bytes,
                     char *endpoint, size_t eplen, char *err, size_t errlen);
/* A snapshot's way out: one batch under topic. Returns 0, or -1 when the snapshot has ended (the
 * requester is gone): the producer should stop. */
typedef int (*kvf__zpub_snap_emit)(void *ectx, const char *topic, const void *payload, size_t len);
/* Produces a snapshot of what the publisher's stream describes (everything held now) by calling
 * emit for each batch. Called on the replay thread, one request at a time. Returns 0, or -1 when
 * it could not be made whole: the requester then gets no end marker and asks again. */
typedef int (*kvf__zpub_snap_fn)(void *ctx, kvf__zpub_snap_emit emit, void *ectx);
/* Instead of a replay window (a publisher has one or the other): answers every request on a
 * ROUTER bound on host:port with a snapshot, fn's batches numbered with the last sequence number
 * sent when the snapshot began (the requester applies the stream's later batches over it), then
 * the end marker; a requester sees only the topics it may (as kvf__zpub_replay). fn is called on
 * the socket's own thread until kvf__zpub_close(). 0, KVF_EINVAL, KVF_ENOMEM or KVF_EADDRINUSE
 * (one line in err). */
int kvf__zpub_snapshots(kvf__zpub *p, const char *host, uint16_t port, kvf__zpub_snap_fn fn,
                        void *ctx, char *endpoint, size_t eplen, char *err, size_t errlen);
/* Closes the sockets and their context. Accepts NULL; clears *p. */
void kvf__zpub_close(kvf__zpub **p);

/* A set of SUB sockets (one per publisher, each with an optional DEALER to its replay socket)
 * polled together by one thread. */
typedef struct kvf__zsubs kvf__zsubs;

/* The frames of one received message. Borrowed: valid until the next kvf__zsubs_recv() (a
 * message of a subscription) or kvf__zsubs_replay_recv() (an answer of a replay socket). */
typedef struct kvf__zmsg {
    int frames;        /* frames the message had (more than 3 are received and dropped) */
    const void *topic; /* the first frame of three (a subscription's topic), or NULL */
    size_t topic_len;
    const void *seq; /* the second-to-last frame of the first three, or NULL */
    size_t seq_len;
    const void *payload; /* the last frame of the first three */
    size_t len;
} kvf__zmsg;

#define KVF_ZSUBS_MAX 1024

/* Caller owns *out; free with kvf__zsubs_close(). 0 or KVF_ENOMEM. */
int kvf__zsubs_open(kvf__zsubs **out);
/* Every publisher added from now on is reached over CURVE: server_pk is the publishers' public
 * key, (pk, sk) this subscriber's key pair (X25519). Where a publisher does not know the key, its
 * stream stays silent (ZeroMQ retries the handshake). */
void kvf__zsubs_curve(kvf__zsubs *s, const uint8_t server_pk[32], const uint8_t pk[32],
                      const uint8_t sk[32]);
/* Subscribes to every topic of the publisher at endpoint ("tcp://HOST:PORT"), and connects to
 * its replay socket when replay is not NULL or empty (a replay socket that cannot be reached is
 * left out, with the reason in err, and the subscription still made). *idx gets the publisher's
 * number in the set: the lowest free one. Returns 0, KVF_E2BIG (KVF_ZSUBS_MAX reached) or
 * KVF_ECONNREFUSED (cannot connect) with one line in err. */
int kvf__zsubs_add(kvf__zsubs *s, const char *endpoint, const char *replay, int *idx, char *err,
                   size_t errlen);
/* As kvf__zsubs_add, subscribed to the topics that start with `topic` only (NULL or "": all),
 * and its replay requests name that prefix: the replay socket answers with the batches whose
 * topic starts with it only (a sharded publisher's shard, KVF_EVENTS_SHARD_TOPIC). */
int kvf__zsubs_add_topic(kvf__zsubs *s, const char *endpoint, const char *replay, const char *topic,
                         int *idx, char *err, size_t errlen);
/* Closes publisher idx's sockets; its number may be given to a later kvf__zsubs_add(). A number
 * that names none is ignored. */
void kvf__zsubs_drop(kvf__zsubs *s, int idx);
/* Whether publisher idx has a replay socket. */
int kvf__zsubs_has_replay(const kvf__zsubs *s, int idx);
/* Waits up to timeout_ms for messages; ready[i] (KVF_ZSUBS_MAX entries) gets 1 for each
 * publisher that has one. Returns how many are ready (0 on a timeout), or KVF_EIO. */
int kvf__zsubs_poll(kvf__zsubs *s, int timeout_ms, uint8_t *ready);
/* As kvf__zsubs_poll, but for each publisher i with held[i] set its stream is left out (its
 * batches stay queued) and its replay socket waited on instead: ready[i] is then 0, and the
 * call returns when an answer came there. */
int kvf__zsubs_poll_held(kvf__zsubs *s, int timeout_ms, const uint8_t *held, uint8_t *ready);
/* Receives one message of publisher idx without waiting: 0 with *m, KVF_EAGAIN when none is
 * there, or KVF_EIO. */
int kvf__zsubs_recv(kvf__zsubs *s, int idx, kvf__zmsg *m);
/* Asks publisher idx's replay socket for the batches from sequence number `from` on (vLLM's
 * replay protocol: the request is `from` as 8 bytes big-endian). Never waits: 0, KVF_ENOTCONN (no
 * replay socket), KVF_EAGAIN (the request cannot be queued now: no peer, or it reads nothing) or
 * KVF_EIO. */
int kvf__zsubs_replay_ask(kvf__zsubs *s, int idx, uint64_t from);
/* Receives one answer of the replay socket, waiting up to timeout_ms: 0 with *m (an answer is
 * [sequence, payload]; an empty payload ends the replay), KVF_ETIMEDOUT, or KVF_EIO. */
int kvf__zsubs_replay_recv(kvf__zsubs *s, int idx, int timeout_ms, kvf__zmsg *m);
/* Replaces publisher idx's replay socket by a new one to the same endpoint: the answers still
 * coming to a request given up on (a timeout, a replay cut short) go to the old one and are lost
 * with it, never taken for a later request's (an answer names no request). Also drops requests
 * still queued for a peer that never came. 0, KVF_ENOTCONN (none) or KVF_EIO (none any more:
 * kvf__zsubs_has_replay() then says 0). */
int kvf__zsubs_replay_reset(kvf__zsubs *s, int idx);
/* Closes every socket and the context. Accepts NULL; clears *s. */
void kvf__zsubs_close(kvf__zsubs **s);

#endif

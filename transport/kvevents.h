/*
 * Sending one batch of KV events the way vLLM does (and kvf-sched reads): a ZeroMQ multipart
 * message [topic, 8-byte big-endian sequence number, msgpack payload]. Used by kvf-store's chunk
 * events and kvf-engine's block events.
 */
#ifndef KVF_TRANSPORT_KVEVENTS_H
#define KVF_TRANSPORT_KVEVENTS_H

#include <stddef.h>
#include <stdint.h>

/* Sends on a PUB socket. Returns 0 or -1 (zmq_errno() says why). */
int kvf__kv_events_send(void *sock, const char *topic, uint64_t seq, const void *payload,
                        size_t len);

#endif

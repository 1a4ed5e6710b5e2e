/*
 * Where a key lives: rendezvous hashing ("A name-based mapping scheme for rendezvous", Thaler
 * and Ravishankar, 1996). A key goes to the node with the highest hash(key, node), so a node
 * joining or leaving moves only its own share of the keys.
 */
#include "client_int.h"

#include "clock.h"
#include "rendezvous.h"

#include <stdint.h>
#include <string.h>
#include <strings.h>

size_t kvf_client_node_of(const kvf_client *c, const kvf_key *key)
{
    /* With kvf_client_set_reroute(): the highest score among the nodes that are not marked down
     * now (io.c: down for a backoff
     * after a request it did not answer or a connection it refused), else among all. A key whose
     * node is down goes to the next node in its order, as rendezvous hashing moves a leaving
     * node's keys: its puts land there and its gets look there (a replica of a hot chunk, or
     * what was put meanwhile), and once a probe after the backoff finds the node the key goes
     * home again. Chunks are immutable under their key, so a key read from
     * another node than it was put to is a miss at worst, never other bytes. */
    uint64_t now = atomic_load_explicit(&c->reroute, memory_order_relaxed) ? kvf__now_ns() : 0;
    size_t best = 0, best_up = SIZE_MAX;
    uint64_t bs = 0, bs_up = 0;
    for (size_t i = 0; i < c->n_nodes; i++) {
        uint64_t s = kvf__rendezvous_score(key->lo, key->hi, c->nodes[i].seed);
        if (i == 0 || s > bs)
            bs = s, best = i;
        uint64_t until =
            now ? atomic_load_explicit(&c->nodes[i].down_until, memory_order_relaxed) : 0;
        /* down until a probe finds it again: the client's first I/O engine probes it once its
         * backoff has passed, apart from any request (probe_down_nodes, io.c), so no request
         * of its keys waits on it or fails with it meanwhile */
        int up = !until;
        if (up && (best_up == SIZE_MAX || s > bs_up))
            bs_up = s, best_up = i;
    }
    return best_up != SIZE_MAX ? best_up : best;
}

void kvf_client_set_reroute(kvf_client *c, int on)
{
    atomic_store(&c->reroute, on != 0);
}

int kvf__client_rerouted(const kvf_client *c, const kvf_key *key)
{
    if (!atomic_load_explicit(&c->reroute, memory_order_relaxed))
        return 0;
    size_t home = 0;
    uint64_t bs = 0;
    for (size_t i = 0; i < c->n_nodes; i++) {
        uint64_t s = kvf__rendezvous_score(key->lo, key->hi, c->nodes[i].seed);
        if (i == 0 || s > bs)
            bs = s, home = i;
    }
    return kvf_client_node_of(c, key) != home;
}

size_t kvf__key_node(const kvf_client *c, const kvf_batch *b, int get, size_t i)
{
    if (get && b->nodes && b->nodes[i] < c->n_nodes &&
        !atomic_load_explicit(&c->nodes[b->nodes[i]].down_until, memory_order_relaxed))
        return b->nodes[i];
    return kvf_client_node_of(c, &b->keys[i]);
}

/* Whether host is a name of this host's usual loopback address, however spelt ("localhost",
 * 127.0.0.1, ::1). Other 127.x.y.z addresses are addresses of their own: two nodes may listen on
 * the same port of 127.0.0.1 and 127.0.0.2. */
static int loopback(const char *h)
{
    return !strcasecmp(h, "localhost") || !strcmp(h, "127.0.0.1") || !strcmp(h, "::1") ||
           !strcasecmp(h, "ip6-localhost");
}

int kvf_client_node_index(const kvf_client *c, const char *addr)
{
    if (!c || !addr)
        return -1;
    if (!strncmp(addr, "tcp://", 6))
        addr += 6;
    char host[256];
    uint16_t port;
    if (kvf__addr_parse(addr, host, sizeof host, &port) != 0)
        return -1;
    for (size_t i = 0; i < c->n_nodes; i++) {
        const kvf__node *N = &c->nodes[i];
        if (N->port == port &&
            (!strcasecmp(N->host, host) || (loopback(N->host) && loopback(host))))
            return (int)i;
    }
    return -1;
}

size_t kvf_client_node_count(const kvf_client *c)
{
    return c->n_nodes;
}

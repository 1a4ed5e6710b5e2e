/*
 * Where a key lives: rendezvous hashing ("A name-based mapping scheme for rendezvous", Thaler
 * and Ravishankar, 1996). A key goes to the node with the highest hash(key, node), so a node
 * joining or leaving moves only its own share of the keys.
 */
#include "client_int.h"

#include "bytes.h"

size_t kvf_client_node_of(const kvf_client *c, const kvf_key *key)
{
    size_t best = 0;
    uint64_t bs = 0;
    for (size_t i = 0; i < c->n_nodes; i++) {
        uint64_t s = kvf__fmix64(key->lo ^ kvf__fmix64(key->hi ^ c->nodes[i].seed));
        if (i == 0 || s > bs) {
            bs = s;
            best = i;
        }
    }
    return best;
}

size_t kvf_client_node_count(const kvf_client *c)
{
    return c->n_nodes;
}

/*
 * The data commands of kvf (cmd_data.c): stats, put, get, lookup, evict, pin, unpin, compress
 * and clear against kvf-store nodes, and keys, which computes a token sequence's chunk keys.
 */
#ifndef KVF_CLUSTER_CMD_DATA_H
#define KVF_CLUSTER_CMD_DATA_H

/* Each runs one subcommand: argv[0] is its name, the rest its options. Returns the exit status:
 * 0 on success, 1 when a request failed, 2 on a usage error; put also 3 when a chunk was
 * refused, get 4 when a fetched chunk does not match its synthetic content. */
int kvf__cli_stats(int argc, char **argv);
int kvf__cli_put(int argc, char **argv);
int kvf__cli_get(int argc, char **argv);
int kvf__cli_lookup(int argc, char **argv);
int kvf__cli_evict(int argc, char **argv);
int kvf__cli_pin(int argc, char **argv);
int kvf__cli_unpin(int argc, char **argv);
int kvf__cli_compress(int argc, char **argv);
int kvf__cli_clear(int argc, char **argv);
int kvf__cli_keys(int argc, char **argv);

#endif

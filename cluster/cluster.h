/* kvf cluster up|down|status|send (cluster.c). */
#ifndef KVF_CLUSTER_CLUSTER_H
#define KVF_CLUSTER_CLUSTER_H

/* Runs `kvf cluster ACTION [options]`: argv[0] is "cluster", argv[1] the action (up, down,
 * status or send). Returns the exit status: 0 on success, 1 when a step failed (status: a process
 * is down; send: the request failed), 2 on a usage or configuration error, 3 when status or send
 * finds no cluster up, 130 when up was interrupted. */
int kvf__cli_cluster(int argc, char **argv);

#endif

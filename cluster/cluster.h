/* kvf cluster up|down|status (cluster.c). */
#ifndef KVF_CLUSTER_CLUSTER_H
#define KVF_CLUSTER_CLUSTER_H

/* argv[0] is "cluster". Returns the exit status. */
int kvf__cli_cluster(int argc, char **argv);

#endif

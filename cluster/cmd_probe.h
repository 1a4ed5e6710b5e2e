/* kvf probe (cmd_probe.c): this host's capability record, found by executing tiny actions. */
#ifndef KVF_CLUSTER_CMD_PROBE_H
#define KVF_CLUSTER_CMD_PROBE_H

/* argv[0] is "probe", the rest its options. Returns the exit status: 0 on success, 1 when the
 * record cannot be printed, 2 on a usage error. */
int kvf__cli_probe(int argc, char **argv);

#endif

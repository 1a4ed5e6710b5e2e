/*
 * kvf estimate and kvf classify (cmd_feasibility.c): what a workload's KV needs in memory, and
 * which remote actions a pair of hosts can carry out, with the gap between the best of all and
 * the best they can.
 */
#ifndef KVF_CLUSTER_CMD_FEASIBILITY_H
#define KVF_CLUSTER_CMD_FEASIBILITY_H

/* Each runs one subcommand: argv[0] is its name, the rest its options. Returns the exit status:
 * 0 on success, 2 on a usage error or input that cannot be used. */
int kvf__cli_estimate(int argc, char **argv);
int kvf__cli_classify(int argc, char **argv);

#endif

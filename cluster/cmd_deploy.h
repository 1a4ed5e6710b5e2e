/*
 * kvf deploy render: the files of a multi-host deployment's systemd units (cmd_deploy.c).
 */
#ifndef KVF_CLUSTER_CMD_DEPLOY_H
#define KVF_CLUSTER_CMD_DEPLOY_H

/* Runs `kvf deploy ACTION [options]`: argv[0] is "deploy". Returns the exit status. */
int kvf__cli_deploy(int argc, char **argv);

#endif

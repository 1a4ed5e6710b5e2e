/*
 * kvf auth: tenants and credentials for storage nodes that authenticate (docs/security.md).
 */
#ifndef KVF_CLUSTER_CMD_AUTH_H
#define KVF_CLUSTER_CMD_AUTH_H

int kvf__cli_auth(int argc, char **argv);

#endif

/*
 * Starting kvfabric daemons as child processes, for the benchmarks and the integration tests: a
 * daemon started with "--listen 127.0.0.1:0" prints one ready line naming the port it bound
 * ("... listen=127.0.0.1:PORT ..."); these helpers start it, wait for that line and parse it.
 * Children die with their parent on Linux (PR_SET_PDEATHSIG), so a crashed caller leaves none.
 */
#ifndef KVF_CLUSTER_PROC_H
#define KVF_CLUSTER_PROC_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Starts argv[0] (searched in PATH when it has no slash) with its stdout on a pipe, whose read end
 * goes to *out_fd. Returns the pid, or -1. */
pid_t kvf__proc_spawn(char *const argv[], int *out_fd);

/* Starts a daemon and waits up to timeout_ms for its ready line. Returns the pid with *port set,
 * or -1 with the reason (and what the daemon printed) in err; a child that did not become ready
 * is killed and reaped. */
pid_t kvf__proc_start_daemon(char *const argv[], int timeout_ms, uint16_t *port, char *err,
                             size_t errlen);

/* kvf-store at bin on 127.0.0.1:0 with --memory memory, warnings only, and extra (options
 * separated by spaces, or NULL). As kvf__proc_start_daemon. */
pid_t kvf__proc_start_store(const char *bin, const char *memory, const char *extra, int timeout_ms,
                            uint16_t *port, char *err, size_t errlen);

/* Finds the path of a sibling program: name in this executable's directory (CMake puts every
 * executable of the project in one folder, bin/, of the build tree as of an install), else name
 * alone (searched in PATH). Returns a static buffer. */
const char *kvf__proc_find_bin(const char *name);

/* Starts argv[0] in a session of its own (it outlives the caller), with stdout and stderr
 * appended to log_path and the environment variables of env ("NAME=VALUE", NULL-terminated; may
 * be NULL) added. Returns the pid, or -1 with the reason in err. */
pid_t kvf__proc_spawn_detached(char *const argv[], const char *log_path, char *const env[],
                               char *err, size_t errlen);

/* Waits up to timeout_ms for pid to print its ready line ("NAME ready listen=ADDR key=value ...")
 * into log_path, and copies that line into line. *stop (may be NULL) set from a signal handler
 * ends the wait early. Returns 0, or -1 with the reason (and the log's last line) in err. */
int kvf__proc_wait_ready(pid_t pid, const char *log_path, int timeout_ms, const volatile int *stop,
                         char *line, size_t linelen, char *err, size_t errlen);
/* The value of key ("listen", "events") on a ready line. Returns 0, or -1 when the line has none
 * (or says "-"). */
int kvf__proc_ready_field(const char *line, const char *key, char *out, size_t n);

#endif

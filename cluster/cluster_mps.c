/*
 * "gpu_share": "mps" (cluster_int.h): the engines of a cluster that share one GPU reach it through
 * an MPS control daemon (NVIDIA's Multi-Process Service), so that their kernels run on the GPU at
 * once instead of in time slices between the processes' contexts (docs/cluster.md, "Engines
 * sharing one GPU"). up starts one daemon of this user's, its pipes in a directory of its own
 * under /tmp (the daemon's sockets need a short path) and its logs in RUN_DIR/mps, and gives the
 * engines CUDA_MPS_PIPE_DIRECTORY; down (and an up that fails) asks it to quit. Where
 * CUDA_MPS_PIPE_DIRECTORY is already set, the operator runs a daemon: the engines use it, and the
 * launcher neither starts nor stops one.
 */
#define _GNU_SOURCE /* mkdtemp */
#include "cluster_int.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* How long the control program may take to start its daemon, or to answer "quit". */
#define MPS_CMD_MS 10000
/* How long the daemon may take to make its pipes after it started. */
#define MPS_READY_MS 5000

/* The control program: $KVF_MPS_CONTROL (tests give a fake), else the driver's, from PATH. */
static const char *control_program(void)
{
    const char *p = getenv("KVF_MPS_CONTROL");
    return p && p[0] ? p : "nvidia-cuda-mps-control";
}

/* Runs the control program with arg (NULL: none) in the daemon's environment, writing input (NULL:
 * none) to its stdin, its output appended to log. Returns its exit status (127: it could not be
 * run), -1 where it could not be started or did not end within MPS_CMD_MS (then killed), -2 where
 * a signal ended it. */
static int run_control(const kvf__cluster_mps *m, const char *arg, const char *input)
{
    int in[2];
    if (pipe(in) != 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0) {
        close(in[0]);
        close(in[1]);
        return -1;
    }
    if (pid == 0) {
        setpgid(0, 0); /* a terminal's Ctrl-C is the launcher's to handle, not the daemon's */
        dup2(in[0], 0);
        close(in[0]);
        close(in[1]);
        /* never the launcher's own output: the daemon would hold a caller's pipe open */
        int fd = open(m->log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        fd = fd >= 0 ? fd : open("/dev/null", O_WRONLY);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            if (fd > 2)
                close(fd);
        }
        setenv("CUDA_MPS_PIPE_DIRECTORY", m->pipe, 1);
        setenv("CUDA_MPS_LOG_DIRECTORY", m->log_dir, 1);
        const char *prog = control_program();
        char *argv[] = {(char *)prog, (char *)arg, NULL};
        execvp(prog, argv);
        fprintf(stderr, "cannot run %s: %s\n", prog, strerror(errno));
        _exit(127);
    }
    close(in[0]);
    if (input) { /* a program that exits without reading is no SIGPIPE here */
        struct sigaction ign = {.sa_handler = SIG_IGN}, was;
        sigemptyset(&ign.sa_mask);
        sigaction(SIGPIPE, &ign, &was);
        ssize_t w = write(in[1], input, strlen(input)); /* a few bytes: within PIPE_BUF */
        (void)w;
        sigaction(SIGPIPE, &was, NULL);
    }
    close(in[1]);
    for (int waited = 0; waited < MPS_CMD_MS; waited += 20) {
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid)
            return WIFEXITED(status) ? WEXITSTATUS(status) : -2;
        usleep(20000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return -1;
}

/* Whether dir holds anything (the daemon's pipes). */
static int has_entries(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    int any = 0;
    for (struct dirent *e; !any && (e = readdir(d));)
        any = strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
    closedir(d);
    return any;
}

/* The last line of the control program's log, for an error message. */
static void last_line(const char *log, char *out, size_t n)
{
    char buf[512];
    out[0] = '\0';
    FILE *f = fopen(log, "r");
    while (f && fgets(buf, sizeof buf, f)) {
        buf[strcspn(buf, "\n")] = '\0';
        if (buf[0])
            snprintf(out, n, "%.300s", buf);
    }
    if (f)
        fclose(f);
}

int kvf__cluster_mps_start(const cfg *c, kvf__cluster_mps *m)
{
    memset(m, 0, sizeof *m);
    if (strcmp(c->gpu_share, "mps"))
        return 0;
    const char *have = getenv("CUDA_MPS_PIPE_DIRECTORY");
    if (have && have[0]) { /* the operator's daemon */
        if (strlen(have) >= sizeof m->pipe)
            return kvf__cluster_fail("\"gpu_share\": \"mps\": CUDA_MPS_PIPE_DIRECTORY is longer "
                                     "than %zu characters",
                                     sizeof m->pipe - 1);
        snprintf(m->pipe, sizeof m->pipe, "%s", have);
        if (!has_entries(m->pipe))
            return kvf__cluster_fail("\"gpu_share\": \"mps\": CUDA_MPS_PIPE_DIRECTORY=%s holds no "
                                     "MPS control daemon's pipes (start it with "
                                     "nvidia-cuda-mps-control -d, or unset the variable and "
                                     "the launcher starts one)",
                                     m->pipe);
        printf("  gpu share: MPS, the daemon of CUDA_MPS_PIPE_DIRECTORY=%s (not started or "
               "stopped here)\n",
               m->pipe);
        return 0;
    }
    snprintf(m->log_dir, sizeof m->log_dir, "%s/mps", c->run_dir);
    snprintf(m->log, sizeof m->log, "%s/mps.log", c->run_dir);
    if (mkdir(m->log_dir, 0700) != 0 && errno != EEXIST)
        return kvf__cluster_fail("cannot create %s: %s", m->log_dir, strerror(errno));
    char *abs = realpath(m->log_dir, NULL); /* the daemon runs from another directory */
    if (abs) {
        snprintf(m->log_dir, sizeof m->log_dir, "%s", abs);
        free(abs);
    }
    snprintf(m->pipe, sizeof m->pipe, "/tmp/kvf-mps-%s-XXXXXX", c->name);
    if (!mkdtemp(m->pipe))
        return kvf__cluster_fail("cannot create a directory for the MPS daemon's pipes in /tmp: "
                                 "%s",
                                 strerror(errno));
    int rc = run_control(m, "-d", NULL);
    char why[400];
    if (rc != 0) {
        last_line(m->log, why, sizeof why);
        if (rc < 0 && run_control(m, NULL, "quit\n") != 0 && has_entries(m->pipe))
            m->started = 1; /* a daemon it may have left: its pipes stay, undo asks it again */
        else
            kvf__cluster_rm_tree(m->pipe);
        return kvf__cluster_fail("\"gpu_share\": \"mps\": %s -d %s%s%s (it comes with the NVIDIA "
                                 "driver; \"gpu_share\": \"timeslice\" runs the engines without "
                                 "it)",
                                 control_program(),
                                 rc == 127  ? "could not be run"
                                 : rc == -1 ? "did not start its daemon within 10 s"
                                 : rc == -2 ? "was ended by a signal"
                                            : "failed",
                                 why[0] ? ": " : "", why);
    }
    m->started = 1;
    for (int waited = 0; !has_entries(m->pipe); waited += 20) { /* undo stops it */
        if (kvf__cluster_interrupted)
            return 1;
        if (waited >= MPS_READY_MS)
            return kvf__cluster_fail("\"gpu_share\": \"mps\": the MPS control daemon made no pipes "
                                     "in %s within %d ms (its logs: %s)",
                                     m->pipe, MPS_READY_MS, m->log_dir);
        usleep(20000);
    }
    printf("  gpu share: MPS, a control daemon of this user's (pipes %s, logs %s)\n", m->pipe,
           m->log_dir);
    fflush(stdout);
    return 0;
}

int kvf__cluster_mps_stop(kvf__cluster_mps *m)
{
    if (!m->started)
        return 0;
    m->started = 0; /* asked once */
    int rc = run_control(m, NULL, "quit\n");
    if (rc == 0) { /* it ends its server and its pipes; what it leaves goes with the directory */
        for (int waited = 0; has_entries(m->pipe) && waited < 1000; waited += 20)
            usleep(20000);
        kvf__cluster_rm_tree(m->pipe);
    } else if (!has_entries(m->pipe)) {
        rmdir(m->pipe); /* no daemon made pipes there: nothing to stop */
        return 0;
    } else
        fprintf(stderr,
                "kvf cluster: the MPS control daemon (pipes %s) did not answer \"quit\" "
                "(see %s): stop it with: echo quit | CUDA_MPS_PIPE_DIRECTORY=%s %s\n",
                m->pipe, m->log, m->pipe, control_program());
    return rc == 0 ? 0 : -1;
}

#include "proc.h"

#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#define READY_KEY "listen=127.0.0.1:"

pid_t kvf__proc_spawn(char *const argv[], int *out_fd)
{
    int pfd[2];
    if (pipe(pfd) != 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0) {
        close(pfd[0]);
        close(pfd[1]);
        return -1;
    }
    if (pid == 0) {
#ifdef __linux__
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* die with the caller, whatever happens to it */
#endif
        dup2(pfd[1], 1);
        close(pfd[0]);
        close(pfd[1]);
        execvp(argv[0], argv);
        _exit(127);
    }
    close(pfd[1]);
    *out_fd = pfd[0];
    return pid;
}

pid_t kvf__proc_start_daemon(char *const argv[], int timeout_ms, uint16_t *port, char *err,
                             size_t errlen)
{
    int fd;
    pid_t pid = kvf__proc_spawn(argv, &fd);
    if (pid < 0) {
        snprintf(err, errlen, "%s: cannot start a process", argv[0]);
        return -1;
    }
    char line[512];
    size_t got = 0;
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    int timed_out = 0;
    while (got < sizeof line - 1 && !memchr(line, '\n', got)) {
        if (poll(&pf, 1, timeout_ms) <= 0) {
            timed_out = 1;
            break;
        }
        ssize_t r = read(fd, line + got, sizeof line - 1 - got);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    line[got] = '\0';
    const char *at = strstr(line, READY_KEY);
    int p = at ? atoi(at + strlen(READY_KEY)) : 0;
    if (p <= 0 || p > 65535) {
        line[strcspn(line, "\n")] = '\0';
        if (timed_out)
            snprintf(err, errlen, "%s printed no ready line within %d ms: \"%s\"", argv[0],
                     timeout_ms, line);
        else
            snprintf(err, errlen, "%s exited or closed its output without a ready line: \"%s\"",
                     argv[0], line);
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        return -1;
    }
    *port = (uint16_t)p;
    return pid;
}

pid_t kvf__proc_start_store(const char *bin, const char *memory, const char *extra, int timeout_ms,
                            uint16_t *port, char *err, size_t errlen)
{
    char *argv[24];
    int k = 0;
    char extra_buf[512];
    argv[k++] = (char *)bin;
    argv[k++] = (char *)"--listen";
    argv[k++] = (char *)"127.0.0.1:0";
    argv[k++] = (char *)"--memory";
    argv[k++] = (char *)memory;
    argv[k++] = (char *)"--log-level";
    argv[k++] = (char *)"warn";
    if (extra) {
        snprintf(extra_buf, sizeof extra_buf, "%s", extra);
        for (char *t = strtok(extra_buf, " "); t && k < 23; t = strtok(NULL, " "))
            argv[k++] = t;
    }
    argv[k] = NULL;
    return kvf__proc_start_daemon(argv, timeout_ms, port, err, errlen);
}

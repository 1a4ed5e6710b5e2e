#include "proc.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
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

const char *kvf__proc_find_bin(const char *name)
{
    static char out[2 * PATH_MAX];
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = '\0';
        char *slash = strrchr(self, '/');
        if (slash) {
            *slash = '\0';
            snprintf(out, sizeof out, "%s/%s", self, name);
            if (access(out, X_OK) == 0)
                return out;
        }
    }
    snprintf(out, sizeof out, "%s", name);
    return out;
}

pid_t kvf__proc_spawn_detached(char *const argv[], const char *log_path, char *const env[],
                               char *err, size_t errlen)
{
    int fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
        snprintf(err, errlen, "%s: %s", log_path, strerror(errno));
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(err, errlen, "fork: %s", strerror(errno));
        close(fd);
        return -1;
    }
    if (pid == 0) {
        setsid();
        int null = open("/dev/null", O_RDONLY);
        if (null >= 0)
            dup2(null, 0);
        dup2(fd, 1);
        dup2(fd, 2);
        for (size_t i = 0; env && env[i]; i++)
            putenv(env[i]);
        execvp(argv[0], argv);
        fprintf(stderr, "cannot start %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(fd);
    return pid;
}

int kvf__proc_ready_field(const char *line, const char *key, char *out, size_t n)
{
    size_t kl = strlen(key);
    for (const char *at = strstr(line, key); at; at = strstr(at + 1, key)) {
        if (at == line || at[-1] != ' ' || at[kl] != '=')
            continue;
        at += kl + 1;
        size_t vl = strcspn(at, " \n");
        if (vl == 0 || (vl == 1 && at[0] == '-'))
            return -1;
        snprintf(out, n, "%.*s", (int)vl, at);
        return 0;
    }
    return -1;
}

int kvf__proc_wait_ready(pid_t pid, const char *log_path, int timeout_ms, const volatile int *stop,
                         char *line, size_t linelen, char *err, size_t errlen)
{
    char buf[8192], last[256] = "";
    for (int waited = 0; waited <= timeout_ms; waited += 20) {
        FILE *f = fopen(log_path, "r");
        while (f && fgets(buf, sizeof buf, f)) {
            if (strstr(buf, " ready listen=")) {
                buf[strcspn(buf, "\n")] = '\0';
                snprintf(line, linelen, "%s", buf);
                fclose(f);
                return 0;
            }
            buf[strcspn(buf, "\n")] = '\0';
            snprintf(last, sizeof last, "%.200s", buf);
        }
        if (f)
            fclose(f);
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid || kill(pid, 0) != 0) {
            snprintf(err, errlen, "exited before it was ready; its log ends with: \"%s\"", last);
            return -1;
        }
        if (stop && *stop) {
            snprintf(err, errlen, "interrupted while waiting for it to be ready");
            return -1;
        }
        usleep(20000);
    }
    snprintf(err, errlen, "printed no ready line within %d ms; its log ends with: \"%s\"",
             timeout_ms, last);
    return -1;
}

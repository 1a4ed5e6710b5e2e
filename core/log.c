#include "log.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

static const char *const level_names[] = {"DEBUG", "INFO", "WARN", "ERROR", "OFF"};

int kvf__log_level_parse(const char *s, kvf_log_level *out)
{
    static const char *const lower[] = {"debug", "info", "warn", "error", "off"};
    for (int i = 0; i <= KVF_LOG_OFF; i++) {
        if (strcasecmp(s, lower[i]) == 0) {
            *out = (kvf_log_level)i;
            return 0;
        }
    }
    if (strcasecmp(s, "warning") == 0) {
        *out = KVF_LOG_WARN;
        return 0;
    }
    return -1;
}

void kvf__log_vwrite(const kvf_log *lg, kvf_log_level level, const char *fmt, va_list ap)
{
    if (!kvf__log_enabled(lg, level) || level >= KVF_LOG_OFF)
        return;
    char line[1024];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(
        line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s %s: ", tm.tm_year + 1900,
        tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000L,
        level_names[level], (lg && lg->name) ? lg->name : "kvf");
    if (n < 0)
        return;
    if ((size_t)n < sizeof line)
        vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    if (lg && lg->sink) {
        lg->sink(lg->ud, level, line);
        return;
    }
    /* One fputs of the whole line keeps lines from concurrent threads whole. */
    size_t len = strlen(line);
    if (len + 1 < sizeof line) {
        line[len] = '\n';
        line[len + 1] = '\0';
    }
    fputs(line, stderr);
}

void kvf__log_write(const kvf_log *lg, kvf_log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvf__log_vwrite(lg, level, fmt, ap);
    va_end(ap);
}

void kvf__daemon_signals(void (*on_stop)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

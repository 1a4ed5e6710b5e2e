#include "log.h"

#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

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

int kvf__log_format_parse(const char *s, kvf_log_format *out)
{
    if (!strcmp(s, "text") || !strcmp(s, "json")) {
        *out = strcmp(s, "text") ? KVF_LOG_JSON : KVF_LOG_TEXT;
        return 0;
    }
    return -1;
}

/* Whether stderr is the journal's stream (systemd sets JOURNAL_STREAM to its device:inode): lines
 * then start with their syslog priority, "<6>", which journald reads as the entry's PRIORITY. */
static int stderr_is_journal(void)
{
    static atomic_int known = -1; /* threads log at once: whichever looks first, the same answer */
    int k = atomic_load_explicit(&known, memory_order_relaxed);
    if (k >= 0)
        return k;
    const char *js = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;
    k = js && sscanf(js, "%llu:%llu", &dev, &ino) == 2 && fstat(2, &st) == 0 &&
        (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
    atomic_store_explicit(&known, k, memory_order_relaxed);
    return k;
}

void kvf__log_vwrite(const kvf_log *lg, kvf_log_level level, const char *fmt, va_list ap)
{
    if (!kvf__log_enabled(lg, level) || level >= KVF_LOG_OFF)
        return;
    static const int priority[] = {7, 6, 4, 3}; /* syslog: debug, info, warning, err */
    char line[8192], msg[1024], stamp[64];      /* a message escaped in JSON fits in line */
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    snprintf(stamp, sizeof stamp, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000L);
    vsnprintf(msg, sizeof msg, fmt, ap);
    const char *name = (lg && lg->name) ? lg->name : "kvf";
    const char *prio = "";
    char pbuf[8];
    if (!(lg && lg->sink) && stderr_is_journal()) {
        snprintf(pbuf, sizeof pbuf, "<%d>", priority[level]);
        prio = pbuf;
    }
    if (lg && lg->format == KVF_LOG_JSON) {
        static const char *const lower[] = {"debug", "info", "warn", "error"};
        json_t *o = json_pack("{s:s,s:s,s:s,s:i,s:s}", "ts", stamp, "level", lower[level],
                              "component", name, "pid", (int)getpid(), "msg", msg);
        char *j = o ? json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII) : NULL;
        json_decref(o);
        if (!j)
            return;
        snprintf(line, sizeof line, "%s%s", prio, j);
        free(j);
    } else {
        snprintf(line, sizeof line, "%s%s %-5s %s: %s", prio, stamp, level_names[level], name, msg);
    }
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

static void (*sig_on_stop)(int);
static void (*sig_on_hup)(int);
static pthread_t sig_thread;

/* A thread started before main blocked the signals (a library's: OpenBLAS starts its workers
 * from a constructor) may still be handed one: it is passed on to the signal thread, where
 * sigwait takes it. pthread_kill is a tgkill: safe in a handler. */
static void forward(int sig)
{
    pthread_kill(sig_thread, sig);
}

static void daemon_set(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGHUP);
}

void kvf__daemon_block_signals(void)
{
    sigset_t set;
    daemon_set(&set);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* Runs until the process exits: a second SIGTERM calls on_stop again (the callbacks allow it). */
static void *signal_main(void *arg)
{
    (void)arg;
    sigset_t set;
    daemon_set(&set);
    for (;;) {
        int sig = 0;
        if (sigwait(&set, &sig) != 0)
            continue;
        if (sig == SIGHUP) {
            if (sig_on_hup)
                sig_on_hup(sig);
        } else {
            sig_on_stop(sig);
        }
    }
    return NULL;
}

int kvf__daemon_signals(void (*on_stop)(int), void (*on_hup)(int))
{
    kvf__daemon_block_signals(); /* the caller's thread at least, had main not done it */
    sig_on_stop = on_stop;
    sig_on_hup = on_hup;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&sig_thread, &at, signal_main, NULL);
    pthread_attr_destroy(&at);
    if (rc != 0)
        return -1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    return 0;
}

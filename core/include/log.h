/*
 * Logging with levels and timestamps. A kvf_log is owned by whoever owns the context it hangs off
 * (a daemon's main, a client handle); there is no global logger. Lines go to stderr by default:
 *   2026-11-22T06:03:29.123Z INFO  kvf-store: listening on 127.0.0.1:7400
 * A NULL kvf_log logs warnings and errors to stderr.
 */
#ifndef KVF_CORE_LOG_H
#define KVF_CORE_LOG_H

#include <stdarg.h>
#include <stdint.h>

typedef enum kvf_log_level {
    KVF_LOG_DEBUG = 0,
    KVF_LOG_INFO = 1,
    KVF_LOG_WARN = 2,
    KVF_LOG_ERROR = 3,
    KVF_LOG_OFF = 4,
} kvf_log_level;

/* Receives one formatted line without its newline. */
typedef void (*kvf_log_sink)(void *ud, kvf_log_level level, const char *line);

/* A line's format (--log-format): text as above, or one JSON object a line
 * ({"ts":"2026-11-22T06:03:29.123Z","level":"info","component":"kvf-store","pid":7,
 *   "msg":"listening on 127.0.0.1:7400"}), for log collectors. */
typedef enum kvf_log_format {
    KVF_LOG_TEXT = 0,
    KVF_LOG_JSON = 1,
} kvf_log_format;

typedef struct kvf_log {
    kvf_log_level level; /* lines below this level are dropped */
    const char *name;    /* borrowed; the component name printed in each line */
    kvf_log_sink sink;   /* NULL: stderr */
    void *ud;
    kvf_log_format format; /* KVF_LOG_TEXT unless set */
} kvf_log;

/* Parses "debug", "info", "warn", "error" or "off". Returns 0 or -1. */
int kvf__log_level_parse(const char *s, kvf_log_level *out);
/* Parses "text" or "json". Returns 0 or -1. */
int kvf__log_format_parse(const char *s, kvf_log_format *out);

void kvf__log_write(const kvf_log *lg, kvf_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void kvf__log_vwrite(const kvf_log *lg, kvf_log_level level, const char *fmt, va_list ap);

static inline int kvf__log_enabled(const kvf_log *lg, kvf_log_level level)
{
    return level >= (lg ? lg->level : KVF_LOG_WARN);
}

#define kvf_debug(lg, ...)                                  \
    do {                                                    \
        if (kvf__log_enabled(lg, KVF_LOG_DEBUG))            \
            kvf__log_write(lg, KVF_LOG_DEBUG, __VA_ARGS__); \
    } while (0)
#define kvf_info(lg, ...)  kvf__log_write(lg, KVF_LOG_INFO, __VA_ARGS__)
#define kvf_warn(lg, ...)  kvf__log_write(lg, KVF_LOG_WARN, __VA_ARGS__)
#define kvf_error(lg, ...) kvf__log_write(lg, KVF_LOG_ERROR, __VA_ARGS__)

/* A line that a peer can make happen at will (a malformed batch, a client's odd field) is logged
 * at most once a second: kvf__log_due(&q, now_ns, &quiet) says 1 when it is due (then *quiet gets
 * how many were left out since the last), else counts it and says 0, so that nothing is formatted
 * for a line left out. Under the caller's lock or on one thread. */
typedef struct kvf__log_quiet {
    uint64_t said_ns; /* the last one logged (0: none yet) */
    uint64_t quiet;   /* left out since */
} kvf__log_quiet;

static inline int kvf__log_due(kvf__log_quiet *q, uint64_t now_ns, uint64_t *quiet)
{
    if (q->said_ns && now_ns - q->said_ns < 1000000000ull) {
        q->quiet++;
        return 0;
    }
    *quiet = q->quiet;
    q->said_ns = now_ns;
    q->quiet = 0;
    return 1;
}

/* A daemon's signals. kvf__daemon_block_signals(), first in main (before any thread starts),
 * blocks SIGTERM, SIGINT and SIGHUP in every thread, so that none of them is interrupted (a handler
 * run on a thread of a library, or a sanitizer's deferred delivery, could miss them) and ignores
 * SIGPIPE (a peer that goes away is an error return, not a death). kvf__daemon_signals() then
 * starts one thread that takes them with sigwait: SIGTERM and SIGINT call on_stop, SIGHUP calls
 * on_hup (NULL: ignored). The callbacks run on that thread, not in a signal handler; they should
 * set a flag or wake a loop. A signal that comes before kvf__daemon_signals() waits for it; one
 * handed to a thread that started before main blocked them (a library's) is passed on to that
 * thread.
 * 0, or -1 when the thread could not start (the daemon should exit). */
void kvf__daemon_block_signals(void);
int kvf__daemon_signals(void (*on_stop)(int), void (*on_hup)(int));

#endif

/*
 * Readiness and liveness for a service manager (systemd's Type=notify, through libsystemd's
 * sd_notify): a daemon says READY=1 once it serves, STOPPING=1 when it begins to stop, and, where
 * the unit sets WatchdogSec=, pings the watchdog from a thread of its own at half the interval.
 * Without a service manager (no $NOTIFY_SOCKET) every call does nothing; in a build without
 * libsystemd they do nothing either, and kvf__notify_ready says so once where $NOTIFY_SOCKET asks.
 */
#ifndef KVF_CORE_NOTIFY_H
#define KVF_CORE_NOTIFY_H

#include "log.h"

/* READY=1 with a STATUS= line (status may be NULL), and the watchdog's thread where asked for. */
void kvf__notify_ready(const kvf_log *lg, const char *status);
/* STOPPING=1; stops the watchdog's thread. */
void kvf__notify_stopping(void);

#endif

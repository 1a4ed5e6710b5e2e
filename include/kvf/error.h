/*
 * kvf/error.h - the one error space of kvfabric.
 *
 * Every public function returns int: 0 on success or a negative KVF_E* code on failure. The
 * codes are fixed numbers, the same on every platform, because they also travel on the wire as
 * reply statuses (docs/protocol.md). They are defined once, in KVF_ERRNO_MAP, which generates the
 * enum, kvf_strerror() and kvf_err_name(); nothing else lists them. Only transport/ sees errno;
 * it translates with kvf_err_from_errno() where the failure happens.
 */
#ifndef KVF_ERROR_H
#define KVF_ERROR_H

#include "kvf/export.h"

#ifdef __cplusplus
extern "C" {
#endif

/* XX(name, number, message). Numbers are part of the wire protocol: never reuse or renumber. */
#define KVF_ERRNO_MAP(XX)                                                                       \
    XX(EINVAL, 1, "invalid argument")                                                           \
    XX(ENOMEM, 2, "out of memory")                                                              \
    XX(ENOSPC, 3, "no space left: the store is full of pinned, referenced or reserved entries") \
    XX(EPROTO, 4, "protocol error")                                                             \
    XX(ETIMEDOUT, 5, "operation timed out")                                                     \
    XX(ECONNREFUSED, 6, "connection refused")                                                   \
    XX(ECHECKSUM, 7, "checksum mismatch")                                                       \
    XX(EINFEASIBLE, 8, "action is infeasible on this backend")                                  \
    XX(ENOENT, 9, "no such entry")                                                              \
    XX(EEXIST, 10, "entry already exists")                                                      \
    XX(EBUSY, 11, "resource busy")                                                              \
    XX(EAGAIN, 12, "resource temporarily unavailable")                                          \
    XX(E2BIG, 13, "request too large")                                                          \
    XX(ECANCELED, 14, "operation canceled")                                                     \
    XX(ECLOSED, 15, "handle is closed")                                                         \
    XX(EIO, 16, "input/output error")                                                           \
    XX(EVERSION, 17, "unsupported version")                                                     \
    XX(ENAMESPACE, 18, "key belongs to another namespace")                                      \
    XX(ELAYOUT, 19, "layout mismatch")                                                          \
    XX(ECONNRESET, 20, "connection reset by peer")                                              \
    XX(ENOTCONN, 21, "not connected")                                                           \
    XX(EPIPE, 22, "broken pipe")                                                                \
    XX(EADDRINUSE, 23, "address already in use")                                                \
    XX(EADDRNOTAVAIL, 24, "address not available")                                              \
    XX(EHOSTUNREACH, 25, "host unreachable")                                                    \
    XX(ENETUNREACH, 26, "network unreachable")                                                  \
    XX(EACCES, 27, "permission denied")                                                         \
    XX(ENOTSUP, 28, "operation not supported")                                                  \
    XX(ERANGE, 29, "value out of range")                                                        \
    XX(EOVERFLOW, 30, "value too large for its type")                                           \
    XX(EMFILE, 31, "too many open files")                                                       \
    XX(EINTR, 32, "interrupted")                                                                \
    XX(ENODEV, 33, "no such device")                                                            \
    XX(EQUOTA, 34, "tenant quota exceeded")                                                     \
    XX(EUNKNOWN, 99, "unknown system error")

typedef enum kvf_err {
    KVF_OK = 0,
#define KVF_ERR_ENUM_(name, num, msg) KVF_##name = -(num),
    KVF_ERRNO_MAP(KVF_ERR_ENUM_)
#undef KVF_ERR_ENUM_
} kvf_err;

/* A sentence describing err, e.g. "checksum mismatch". Never NULL: an unknown code gets
 * "unknown error code". Borrowed; static storage. */
KVF_API const char *kvf_strerror(int err);

/* The symbolic name of err, e.g. "KVF_ECHECKSUM" ("KVF_OK" for 0). Never NULL. Borrowed; static. */
KVF_API const char *kvf_err_name(int err);

/* Translates a positive errno value (as set by the C library) into a KVF_E* code. An errno with no
 * counterpart becomes KVF_EUNKNOWN; 0 becomes KVF_OK. */
KVF_API int kvf_err_from_errno(int errnum);

/* Whether err is one of the codes above (or 0). Used to validate statuses read from the wire. */
KVF_API int kvf_err_is_known(int err);

/* Whether err, one storage node's answer for one key of a get, is that node's alone, so that
 * another node holding the key may give it: a miss, or that node failing (down, refusing, reset,
 * silent, sending bytes that did not check). Not a cancellation or a close, nor what any node
 * would answer the same (a buffer too small, another layout, no memory). */
KVF_API int kvf_err_ask_elsewhere(int err);

#ifdef __cplusplus
}
#endif
#endif

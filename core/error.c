/*
 * The error space: names and messages generated from KVF_ERRNO_MAP, the one errno translation
 * table of the project, and kvf__errf (errf.h).
 */
#include "kvf/error.h"

#include "errf.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>

const char *kvf_strerror(int err)
{
    switch (err) {
    case KVF_OK:
        return "success";
#define XX(name, num, msg) \
    case KVF_##name:       \
        return msg;
        KVF_ERRNO_MAP(XX)
#undef XX
    default:
        return "unknown error code";
    }
}

const char *kvf_err_name(int err)
{
    switch (err) {
    case KVF_OK:
        return "KVF_OK";
#define XX(name, num, msg) \
    case KVF_##name:       \
        return "KVF_" #name;
        KVF_ERRNO_MAP(XX)
#undef XX
    default:
        return "KVF_E?";
    }
}

int kvf_err_ask_elsewhere(int err)
{
    return err == KVF_ENOENT || err == KVF_EHOSTUNREACH || err == KVF_ECONNREFUSED ||
           err == KVF_ECONNRESET || err == KVF_ETIMEDOUT || err == KVF_ECHECKSUM ||
           err == KVF_EPROTO || err == KVF_EIO;
}

int kvf_err_is_known(int err)
{
    switch (err) {
    case KVF_OK:
#define XX(name, num, msg) case KVF_##name:
        KVF_ERRNO_MAP(XX)
#undef XX
        return 1;
    default:
        return 0;
    }
}

int kvf_err_from_errno(int errnum)
{
    switch (errnum) {
    case 0:
        return KVF_OK;
    case EINVAL:
        return KVF_EINVAL;
    case ENOMEM:
    case ENOBUFS:
        return KVF_ENOMEM;
    case ENOSPC:
        return KVF_ENOSPC;
    case EPROTO:
        return KVF_EPROTO;
    case ETIMEDOUT:
        return KVF_ETIMEDOUT;
    case ECONNREFUSED:
        return KVF_ECONNREFUSED;
    case ENOENT:
        return KVF_ENOENT;
    case EEXIST:
        return KVF_EEXIST;
    case EBUSY:
        return KVF_EBUSY;
    case EAGAIN:
#if defined(EWOULDBLOCK) && EWOULDBLOCK != EAGAIN
    case EWOULDBLOCK:
#endif
        return KVF_EAGAIN;
    case E2BIG:
    case EMSGSIZE:
        return KVF_E2BIG;
    case ECANCELED:
        return KVF_ECANCELED;
    case EBADF:
        return KVF_ECLOSED;
    case EIO:
        return KVF_EIO;
    case ECONNRESET:
    case ECONNABORTED:
        return KVF_ECONNRESET;
    case ENOTCONN:
        return KVF_ENOTCONN;
    case EPIPE:
        return KVF_EPIPE;
    case EADDRINUSE:
        return KVF_EADDRINUSE;
    case EADDRNOTAVAIL:
        return KVF_EADDRNOTAVAIL;
    case EHOSTUNREACH:
    case EHOSTDOWN:
        return KVF_EHOSTUNREACH;
    case ENETUNREACH:
    case ENETDOWN:
        return KVF_ENETUNREACH;
    case EACCES:
    case EPERM:
        return KVF_EACCES;
    case ENOTSUP:
#if defined(EOPNOTSUPP) && EOPNOTSUPP != ENOTSUP
    case EOPNOTSUPP:
#endif
    case ENOSYS:
        return KVF_ENOTSUP;
    case ERANGE:
    case EDOM:
        return KVF_ERANGE;
    case EOVERFLOW:
        return KVF_EOVERFLOW;
    case EMFILE:
    case ENFILE:
        return KVF_EMFILE;
    case EINTR:
        return KVF_EINTR;
    case ENODEV:
    case ENXIO:
        return KVF_ENODEV;
    default:
        return KVF_EUNKNOWN;
    }
}

int kvf__errf(char *err, size_t errlen, int code, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}

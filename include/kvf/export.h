/*
 * kvf/export.h - symbol visibility. libkvf is built with hidden visibility; only declarations
 * marked KVF_API are exported from the shared library.
 */
#ifndef KVF_EXPORT_H
#define KVF_EXPORT_H

#if defined(_WIN32)
#define KVF_API
#elif defined(__GNUC__) || defined(__clang__)
#define KVF_API __attribute__((visibility("default")))
#else
#define KVF_API
#endif

#endif

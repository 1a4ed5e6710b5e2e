/*
 * The memory under the arena (arena.h): anonymous, or a sealed memfd that read-only views can be
 * handed out of to clients on this host (docs/shm.md).
 */
#define _GNU_SOURCE
#include "arena.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

void *kvf__arena_map(uint64_t *size, int shared, int hugepages, int prefault, int *fd_out,
                     int *ro_ok, char *err, size_t errlen)
{
    int pop = 0;
#ifdef MAP_POPULATE
    pop = prefault ? MAP_POPULATE : 0;
#endif
    *fd_out = -1;
    *ro_ok = 0;
    if (!shared) {
        void *m =
            mmap(NULL, *size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | pop, -1, 0);
        if (m == MAP_FAILED)
            snprintf(err, errlen, "cannot map an arena of %llu bytes", (unsigned long long)*size);
        return m;
    }
    unsigned fl = MFD_CLOEXEC | MFD_ALLOW_SEALING;
#ifdef MFD_HUGETLB
    if (hugepages) {
        fl |= MFD_HUGETLB;
        *size = (*size + (2u << 20) - 1) & ~(uint64_t)((2u << 20) - 1);
    }
#endif
    int fd = memfd_create("kvf-arena", fl);
    if (fd < 0 || ftruncate(fd, (off_t)*size) != 0) {
        snprintf(err, errlen, "cannot make a shared arena of %llu bytes%s: %s",
                 (unsigned long long)*size, hugepages ? " on huge pages" : "", strerror(errno));
        if (fd >= 0)
            close(fd);
        return MAP_FAILED;
    }
    void *m = mmap(NULL, *size, PROT_READ | PROT_WRITE, MAP_SHARED | pop, fd, 0);
    if (m == MAP_FAILED) {
        snprintf(err, errlen, "cannot map a shared arena of %llu bytes%s: %s",
                 (unsigned long long)*size, hugepages ? " on huge pages" : "", strerror(errno));
        close(fd);
        return MAP_FAILED;
    }
    /* No later mapping may write, and the size is fixed: a read-only view handed to a client
     * cannot be turned writable, nor the arena cut under the node. Kernels before 5.1 lack
     * F_SEAL_FUTURE_WRITE: no read-only view is handed out there. */
    int seals = F_SEAL_SHRINK | F_SEAL_GROW;
#ifdef F_SEAL_FUTURE_WRITE
    *ro_ok = fcntl(fd, F_ADD_SEALS, seals | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL) == 0;
#endif
    if (!*ro_ok)
        fcntl(fd, F_ADD_SEALS, seals);
    *fd_out = fd;
    return m;
}

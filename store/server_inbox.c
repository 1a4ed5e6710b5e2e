/*
 * A loop's inbox: how other threads hand a loop work for its connections. A COPY worker posts its
 * reply here, and a loop that accepted a connection meant for another loop hands it over here;
 * the loop drains its inbox when its wake pipe becomes readable (server_loop.c). This file calls
 * nothing above it, so a worker can post without depending on the loop that drains.
 */
#include "server_int.h"

#include <unistd.h>

static const char wake_byte = 'w';

void kvf__inbox_wake(loop *lp)
{
    ssize_t w = write(lp->wake[1], &wake_byte, 1);
    (void)w; /* a full pipe already holds a wake-up */
}

void kvf__inbox_push(loop *lp, deferred *d)
{
    pthread_mutex_lock(&lp->inbox_mu);
    d->next = lp->inbox;
    lp->inbox = d;
    pthread_mutex_unlock(&lp->inbox_mu);
    kvf__inbox_wake(lp);
}

deferred *kvf__inbox_take(loop *lp)
{
    pthread_mutex_lock(&lp->inbox_mu);
    deferred *d = lp->inbox;
    lp->inbox = NULL;
    pthread_mutex_unlock(&lp->inbox_mu);
    return d;
}

void kvf__inbox_post(loop *lp, uint64_t conn_id, out_msg *m, deferred *d)
{
    d->conn_id = conn_id;
    d->msg = m;
    d->fd = -1;
    kvf__inbox_push(lp, d);
}

/* One KV event batch on the wire (kvevents.h). */
#include "kvevents.h"

#include <string.h>
#include <zmq.h>

int kvf__kv_events_send(void *sock, const char *topic, uint64_t seq, const void *payload,
                        size_t len)
{
    uint8_t be[8];
    for (int i = 7; i >= 0; i--, seq >>= 8)
        be[i] = (uint8_t)seq;
    if (zmq_send(sock, topic, strlen(topic), ZMQ_SNDMORE) < 0 ||
        zmq_send(sock, be, 8, ZMQ_SNDMORE) < 0 || zmq_send(sock, payload, len, 0) < 0)
        return -1;
    return 0;
}

/* RESP2 server on netstack (resp.c). */
#ifndef COLOCORE_RESP_H
#define COLOCORE_RESP_H
#include "nettypes.h"
void resp_init(uint16_t port);
extern uint64_t resp_commands;
/* The host's CLOCK_MONOTONIC in ns, for TIME: lib.c in the guest, the hosted harness on
 * Linux (tests/net/hosted/kvnet_hosted.c). */
uint64_t clock_ns(void);
#endif

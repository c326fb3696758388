/* RESP2 server on netstack (resp.c). */
#ifndef COLOCORE_RESP_H
#define COLOCORE_RESP_H
#include "nettypes.h"
void resp_init(uint16_t port);
extern uint64_t resp_commands;
#endif

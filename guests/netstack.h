/* kvnet's network stack: Ethernet, ARP (answers and a small cache), IPv4, ICMP echo and
 * a TCP server (passive open only). Plain C against a small driver interface, so the
 * same sources run in the guest (virtio-net, netdrv.c) and hosted against a Linux tap
 * (tests/net/hosted).
 *
 * Determinism: every value the stack chooses (initial sequence numbers, IP ids, which
 * slot a connection takes) is a function of the stack's own state and the frames it was
 * given; the clock only decides when timers fire (retransmission, TIME_WAIT, ARP
 * expiry). Two copies of a guest at the same state fed the same frames in the same
 * batches send the same bytes (hybrid COLO compares them).
 *
 * One batch = net_input() for each received frame, then net_output(): the application
 * runs on every connection with input, replies are segmented and pure ACKs are sent for
 * connections that got data but had nothing to answer. The driver flushes its TX ring
 * once per batch. */
#ifndef COLOCORE_NETSTACK_H
#define COLOCORE_NETSTACK_H

#include "nettypes.h"

#define NET_MTU         1500
#define ETH_HLEN        14
#define ETH_FRAME_MAX   (ETH_HLEN + NET_MTU)
#define NET_NCONN       512             /* TCBs: 256+ live connections plus TIME_WAIT */
#define TCP_RXBUF       8192            /* per connection: the receive window */
#define TCP_TXBUF       8192            /* per connection: unacknowledged + unsent replies */

struct net_config {
    uint8_t mac[6];
    uint32_t ip, mask, gw;              /* host byte order */
    uint16_t port;                      /* the TCP port served */
};

/* ---- provided by the driver ---- */
/* a buffer for one outgoing frame (ETH_FRAME_MAX bytes), or NULL when the TX ring is
 * full (the caller drops the frame; TCP retransmits) */
uint8_t *drv_tx_buffer(void);
void drv_tx_commit(uint8_t *buf, uint32_t len);

/* ---- provided by the application (resp.c) ---- */
/* input arrived on connection `id` (or its peer closed: tcp_rx_eof); consume with
 * tcp_rx_peek/tcp_rx_consume, answer with tcp_write (never more than tcp_tx_room) */
void app_input(int id);
void app_open(int id);                  /* a connection was established */
void app_closed(int id);                /* a connection is gone (closed, reset, aborted) */

/* ---- the stack ---- */
void net_init(const struct net_config *cfg);
void net_input(const uint8_t *frame, uint32_t len, uint64_t now_ms);
void net_output(uint64_t now_ms);       /* end of a batch */
void net_timers(uint64_t now_ms);       /* call at least every few ms when net_next_timer says */
uint64_t net_next_timer(void);          /* absolute ms of the next timer, 0 if none */
void net_announce(uint64_t now_ms);     /* gratuitous ARP (ANNOUNCE, after migration) */

/* socket-ish calls for the application, by connection id */
uint32_t tcp_rx_avail(int id);
/* up to two contiguous pieces of the received bytes (the buffer is a ring) */
uint32_t tcp_rx_peek(int id, const uint8_t **p1, uint32_t *n1, const uint8_t **p2, uint32_t *n2);
void tcp_rx_consume(int id, uint32_t n);
int tcp_rx_eof(int id);                 /* the peer sent FIN and every byte was consumed */
uint32_t tcp_tx_room(int id);
uint32_t tcp_write(int id, const void *data, uint32_t len);
void tcp_close(int id);                 /* FIN after everything written */
void tcp_abort(int id);                 /* RST now */

struct net_stats {
    uint64_t rx_frames, tx_frames, rx_dropped, rx_bad_csum, rx_runt, arp_replies,
             icmp_echo, tcp_rst_sent, tcp_retransmits, tcp_accepted, tcp_syn_evicted,
             tcp_tw_reused, conns_open;
};
extern struct net_stats net_stats;

#endif

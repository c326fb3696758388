/* kvnet's network stack (see netstack.h): Ethernet, ARP, IPv4, ICMP echo, TCP server.
 *
 * Frames are parsed by byte offsets (no packed structs, no unaligned loads). TCP is the
 * RFC 793 state machine for a passive opener, with: the MSS option, go-back-N
 * retransmission with exponential backoff (RTO 200 ms doubling to 10 s, abort after
 * 8 tries), a congestion window that restarts at one segment after a timeout, zero-window
 * probes, in-order reassembly only (out-of-order segments are dropped and answered with
 * a duplicate ACK), RFC 5961 challenge ACKs for in-window RST/SYN that do not match
 * exactly, and TIME_WAIT that is short (4 s) and yields its slot to a new SYN whenever
 * the table is full. A SYN flood can hold at most half of the table in SYN_RCVD:
 * beyond that the oldest half-open connection is dropped, so established connections
 * and their slots are never taken by a flood. */
#include "netstack.h"

#define SEQ_LT(a, b)  ((int32_t)((a) - (b)) < 0)
#define SEQ_LE(a, b)  ((int32_t)((a) - (b)) <= 0)
#define SEQ_GT(a, b)  ((int32_t)((a) - (b)) > 0)
#define SEQ_GE(a, b)  ((int32_t)((a) - (b)) >= 0)

#define ETH_P_IP   0x0800
#define ETH_P_ARP  0x0806
#define IP_HLEN    20
#define TCP_HLEN   20

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_PSH 0x08
#define TH_ACK 0x10

#define RTO_MIN_MS      200
#define RTO_MAX_MS      10000
#define RTX_MAX         8
#define SYNACK_MAX      4
#define TIME_WAIT_MS    4000
#define FIN_WAIT2_MS    30000
#define SYN_RCVD_MAX    (NET_NCONN / 2)
#define MSS_DEFAULT     536
#define MSS_OURS        (NET_MTU - IP_HLEN - TCP_HLEN)
#define CWND_MAX        65535

#define ARP_N           32
#define ARP_TTL_MS      600000
#define ARP_RETRY_MS    1000
#define ARP_TRIES       3

enum { CLOSED, SYN_RCVD, ESTABLISHED, CLOSE_WAIT, LAST_ACK, FIN_WAIT_1, FIN_WAIT_2,
       CLOSING, TIME_WAIT };

/* per-connection flags */
#define F_ACK_NOW    0x01       /* send an ACK in this batch (pure if nothing else goes) */
#define F_APP_KICK   0x02       /* the application has something to look at */
#define F_CLOSE_REQ  0x04       /* the application closed: FIN after the data */
#define F_FIN_SENT   0x08       /* our FIN occupies snd_nxt - 1 */
#define F_FIN_ACKED  0x10
#define F_APP_LIVE   0x20       /* app_open was called, app_closed is owed */
#define F_PROBE      0x40       /* the next output may send one byte into a zero window */

struct tcb {
    uint8_t state, flags, retries;
    uint8_t mac_ok;
    uint32_t rip;
    uint16_t rport, mss;
    int16_t next;               /* hash chain */
    uint32_t iss, snd_una, snd_nxt, snd_wnd, cwnd;
    uint32_t rcv_nxt, rcv_adv;  /* rcv_adv: right edge of the window last advertised */
    uint32_t rto;
    uint64_t rtx_at;            /* retransmission / probe deadline, 0 = off */
    uint64_t state_at;          /* TIME_WAIT / FIN_WAIT_2 expiry, 0 = off */
    uint64_t born;              /* creation order (SYN_RCVD eviction) */
    uint32_t rx_head, rx_len;
    uint32_t tx_head, tx_len;   /* tx_head: ring index of the byte at snd_una */
    uint8_t rx[TCP_RXBUF];
    uint8_t tx[TCP_TXBUF];
};

struct arp_entry {
    uint32_t ip;
    uint8_t mac[6];
    uint8_t state;              /* 0 free, 1 resolving, 2 valid */
    uint8_t tries;
    uint64_t expires, retry_at, used;
    uint32_t held_len;          /* one IP packet waiting for the answer */
    uint8_t held[NET_MTU];
};

static struct net_config cfg;
static struct tcb tcbs[NET_NCONN];
#define HASH_N 1024
static int16_t hash_head[HASH_N];
static struct arp_entry arp[ARP_N];
static uint16_t ip_id;
static uint64_t conn_counter, use_counter;
static uint64_t isn_secret;
static uint32_t syn_rcvd_count;
static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
struct net_stats net_stats;

/* ---- bytes ---- */

static inline uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = (uint8_t)v; }
static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

static uint32_t csum_add(uint32_t sum, const uint8_t *p, uint32_t n)
{
    while (n > 1) {
        sum += (uint32_t)(p[0] << 8 | p[1]);
        p += 2;
        n -= 2;
    }
    if (n)
        sum += (uint32_t)p[0] << 8;
    return sum;
}

static uint16_t csum_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static uint32_t pseudo_sum(uint32_t src, uint32_t dst, uint8_t proto, uint32_t len)
{
    return (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + proto + len;
}

static uint64_t mix64(uint64_t x)        /* splitmix64 finaliser */
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* ---- ARP ---- */

static struct arp_entry *arp_lookup(uint32_t ip)
{
    for (int i = 0; i < ARP_N; i++)
        if (arp[i].state && arp[i].ip == ip)
            return &arp[i];
    return NULL;
}

static struct arp_entry *arp_slot(uint32_t ip)
{
    struct arp_entry *e = arp_lookup(ip), *victim = NULL;
    if (e)
        return e;
    for (int i = 0; i < ARP_N; i++) {
        if (!arp[i].state)
            return &arp[i];
        if (!victim || arp[i].used < victim->used)
            victim = &arp[i];
    }
    return victim;                      /* least recently used */
}

static void eth_header(uint8_t *f, const uint8_t *dst, uint16_t type)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, cfg.mac, 6);
    put16(f + 12, type);
}

static void arp_send(uint16_t op, const uint8_t *eth_dst, const uint8_t *tha, uint32_t tpa)
{
    uint8_t *f = drv_tx_buffer();
    if (!f)
        return;
    eth_header(f, eth_dst, ETH_P_ARP);
    uint8_t *a = f + ETH_HLEN;
    put16(a, 1);
    put16(a + 2, ETH_P_IP);
    a[4] = 6;
    a[5] = 4;
    put16(a + 6, op);
    memcpy(a + 8, cfg.mac, 6);
    put32(a + 14, cfg.ip);
    memcpy(a + 18, tha, 6);
    put32(a + 24, tpa);
    memset(a + 28, 0, 18);              /* pad to the 60-byte minimum */
    drv_tx_commit(f, ETH_HLEN + 46);
    net_stats.tx_frames++;
}

static void arp_request(uint32_t ip)
{
    static const uint8_t zero[6];
    arp_send(1, bcast, zero, ip);
}

static void arp_learn(uint32_t ip, const uint8_t *mac, int create, uint64_t now)
{
    struct arp_entry *e = create ? arp_slot(ip) : arp_lookup(ip);
    if (!e)
        return;
    int was_resolving = e->state == 1 && e->ip == ip;
    if (e->ip != ip)
        e->held_len = 0;
    e->ip = ip;
    memcpy(e->mac, mac, 6);
    e->state = 2;
    e->expires = now + ARP_TTL_MS;
    e->used = ++use_counter;
    if (was_resolving && e->held_len) {
        uint8_t *f = drv_tx_buffer();
        if (f) {
            eth_header(f, e->mac, ETH_P_IP);
            memcpy(f + ETH_HLEN, e->held, e->held_len);
            drv_tx_commit(f, ETH_HLEN + e->held_len);
            net_stats.tx_frames++;
        }
        e->held_len = 0;
    }
}

static void arp_input(const uint8_t *a, uint32_t len, uint64_t now)
{
    if (len < 28 || get16(a) != 1 || get16(a + 2) != ETH_P_IP || a[4] != 6 || a[5] != 4)
        return;
    uint16_t op = get16(a + 6);
    uint32_t spa = get32(a + 14), tpa = get32(a + 24);
    const uint8_t *sha = a + 8;
    if (spa == 0 || spa == cfg.ip || (sha[0] & 1))
        return;                         /* probes, conflicts and multicast senders: ignore */
    /* RFC 826: refresh what we know; learn the sender when the packet is for us */
    arp_learn(spa, sha, tpa == cfg.ip, now);
    if (op == 1 && tpa == cfg.ip) {
        arp_send(2, sha, sha, spa);
        net_stats.arp_replies++;
    }
}

/* Send the IP packet at f + ETH_HLEN (total length ip_len) to the next hop of `dst`:
 * at once when its MAC is known, else after ARP answers (one packet held per entry). */
static void ip_route_send(uint8_t *f, uint32_t dst, uint32_t ip_len, uint64_t now)
{
    uint32_t hop = ((dst & cfg.mask) == (cfg.ip & cfg.mask) || !cfg.gw) ? dst : cfg.gw;
    struct arp_entry *e = arp_lookup(hop);
    if (e && e->state == 2 && e->expires > now) {
        e->used = ++use_counter;
        eth_header(f, e->mac, ETH_P_IP);
        drv_tx_commit(f, ETH_HLEN + ip_len);
        net_stats.tx_frames++;
        return;
    }
    /* the frame buffer was not committed: the driver hands it out again */
    e = arp_slot(hop);
    if (e->state != 1 || e->ip != hop) {
        e->ip = hop;
        e->state = 1;
        e->tries = 0;
        e->retry_at = 0;
    }
    e->used = ++use_counter;
    memcpy(e->held, f + ETH_HLEN, ip_len);
    e->held_len = ip_len;
    if (e->retry_at <= now) {
        e->tries++;
        e->retry_at = now + ARP_RETRY_MS;
        arp_request(hop);
    }
}

static void ip_header(uint8_t *ip, uint32_t dst, uint8_t proto, uint32_t total)
{
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip + 2, (uint16_t)total);
    put16(ip + 4, ip_id++);
    put16(ip + 6, 0x4000);              /* DF */
    ip[8] = 64;
    ip[9] = proto;
    put16(ip + 10, 0);
    put32(ip + 12, cfg.ip);
    put32(ip + 16, dst);
    put16(ip + 10, csum_fold(csum_add(0, ip, IP_HLEN)));
}

/* ---- ICMP ---- */

static void icmp_input(uint32_t src, const uint8_t *p, uint32_t len, uint64_t now)
{
    if (len < 8 || p[0] != 8 || p[1] != 0 || csum_fold(csum_add(0, p, len)) != 0)
        return;
    uint8_t *f = drv_tx_buffer();
    if (!f)
        return;
    uint8_t *ip = f + ETH_HLEN, *r = ip + IP_HLEN;
    memcpy(r, p, len);
    r[0] = 0;                           /* echo reply, same id, sequence and data */
    put16(r + 2, 0);
    put16(r + 2, csum_fold(csum_add(0, r, len)));
    ip_header(ip, src, 1, IP_HLEN + len);
    net_stats.icmp_echo++;
    ip_route_send(f, src, IP_HLEN + len, now);
}

/* ---- TCP: the connection table ---- */

static inline uint32_t tuple_hash(uint32_t ip, uint16_t port)
{
    return (uint32_t)(mix64(((uint64_t)ip << 16) | port) & (HASH_N - 1));
}

static struct tcb *tcb_lookup(uint32_t ip, uint16_t port)
{
    for (int i = hash_head[tuple_hash(ip, port)]; i >= 0; i = tcbs[i].next)
        if (tcbs[i].rip == ip && tcbs[i].rport == port)
            return &tcbs[i];
    return NULL;
}

static void tcb_free(struct tcb *c)
{
    int id = (int)(c - tcbs);
    int16_t *pp = &hash_head[tuple_hash(c->rip, c->rport)];
    while (*pp >= 0 && *pp != id)
        pp = &tcbs[*pp].next;
    if (*pp == id)
        *pp = c->next;
    if (c->state == SYN_RCVD)
        syn_rcvd_count--;
    if (c->flags & F_APP_LIVE) {
        c->flags &= ~F_APP_LIVE;
        net_stats.conns_open--;
        app_closed(id);
    }
    c->state = CLOSED;
    c->flags = 0;
}

/* A slot for a new connection: a free one, else the TIME_WAIT that would expire first,
 * else (a flood) the oldest half-open one. Established connections are never taken. */
static struct tcb *tcb_alloc(void)
{
    struct tcb *tw = NULL, *half = NULL;
    int free_slot = -1;
    for (int i = 0; i < NET_NCONN; i++) {
        struct tcb *c = &tcbs[i];
        if (c->state == CLOSED) {
            if (free_slot < 0)
                free_slot = i;
        } else if (c->state == TIME_WAIT) {
            if (!tw || c->state_at < tw->state_at)
                tw = c;
        } else if (c->state == SYN_RCVD) {
            if (!half || c->born < half->born)
                half = c;
        }
    }
    if (syn_rcvd_count >= SYN_RCVD_MAX && half) {
        net_stats.tcp_syn_evicted++;
        tcb_free(half);
        return half;
    }
    if (free_slot >= 0)
        return &tcbs[free_slot];
    if (tw) {
        net_stats.tcp_tw_reused++;
        tcb_free(tw);
        return tw;
    }
    if (half) {
        net_stats.tcp_syn_evicted++;
        tcb_free(half);
        return half;
    }
    return NULL;
}

static uint32_t rcv_wnd(const struct tcb *c)
{
    uint32_t w = TCP_RXBUF - c->rx_len;
    return w > 65535 ? 65535 : w;
}

/* ---- TCP: output ---- */

/* One segment: `len` payload bytes taken from the TX ring at offset `off` from snd_una. */
static int tcp_segment(struct tcb *c, uint32_t seq, uint8_t flags, uint32_t off, uint32_t len,
                       uint64_t now)
{
    uint8_t *f = drv_tx_buffer();
    if (!f)
        return 0;
    uint8_t *ip = f + ETH_HLEN, *t = ip + IP_HLEN;
    uint32_t hlen = TCP_HLEN + ((flags & TH_SYN) ? 4 : 0);
    put16(t, cfg.port);
    put16(t + 2, c->rport);
    put32(t + 4, seq);
    put32(t + 8, (flags & TH_ACK) ? c->rcv_nxt : 0);
    t[12] = (uint8_t)((hlen / 4) << 4);
    t[13] = flags;
    uint32_t wnd = rcv_wnd(c);
    put16(t + 14, (uint16_t)wnd);
    put16(t + 16, 0);
    put16(t + 18, 0);
    if (flags & TH_SYN) {
        t[20] = 2;
        t[21] = 4;
        put16(t + 22, MSS_OURS);
    }
    if (len) {
        uint32_t start = (c->tx_head + off) % TCP_TXBUF, first = TCP_TXBUF - start;
        if (first > len)
            first = len;
        memcpy(t + hlen, c->tx + start, first);
        memcpy(t + hlen + first, c->tx, len - first);
    }
    uint32_t tlen = hlen + len;
    put16(t + 16, csum_fold(csum_add(pseudo_sum(cfg.ip, c->rip, 6, tlen), t, tlen)));
    ip_header(ip, c->rip, 6, IP_HLEN + tlen);
    c->rcv_adv = c->rcv_nxt + wnd;
    c->flags &= ~F_ACK_NOW;
    ip_route_send(f, c->rip, IP_HLEN + tlen, now);
    return 1;
}

/* RST for a segment that belongs to no connection (RFC 793 "reset generation"). */
static void tcp_reset_reply(uint32_t src, uint16_t sport, uint32_t seq, uint32_t ack,
                            uint8_t flags, uint32_t seglen, uint64_t now)
{
    uint8_t *f = drv_tx_buffer();
    if (!f)
        return;
    uint8_t *ip = f + ETH_HLEN, *t = ip + IP_HLEN;
    put16(t, cfg.port);
    put16(t + 2, sport);
    if (flags & TH_ACK) {
        put32(t + 4, ack);
        put32(t + 8, 0);
        t[13] = TH_RST;
    } else {
        put32(t + 4, 0);
        put32(t + 8, seq + seglen);
        t[13] = TH_RST | TH_ACK;
    }
    t[12] = (TCP_HLEN / 4) << 4;
    put16(t + 14, 0);
    put16(t + 16, 0);
    put16(t + 18, 0);
    put16(t + 16, csum_fold(csum_add(pseudo_sum(cfg.ip, src, 6, TCP_HLEN), t, TCP_HLEN)));
    ip_header(ip, src, 6, IP_HLEN + TCP_HLEN);
    net_stats.tcp_rst_sent++;
    ip_route_send(f, src, IP_HLEN + TCP_HLEN, now);
}

static void arm_rtx(struct tcb *c, uint64_t now)
{
    if (!c->rtx_at)
        c->rtx_at = now + c->rto;
}

static void tcp_output(struct tcb *c, uint64_t now)
{
    int sent = 0;
    if (c->state == SYN_RCVD) {
        if (c->snd_nxt == c->iss) {
            if (tcp_segment(c, c->iss, TH_SYN | TH_ACK, 0, 0, now))
                c->snd_nxt = c->iss + 1;
            arm_rtx(c, now);
        }
        return;
    }
    if (c->state == ESTABLISHED || c->state == CLOSE_WAIT || c->state == FIN_WAIT_1 ||
        c->state == CLOSING || c->state == LAST_ACK) {
        uint32_t in_flight = c->snd_nxt - c->snd_una - ((c->flags & F_FIN_SENT) ? 1 : 0);
        uint32_t unsent = c->tx_len - in_flight;
        uint32_t wnd = c->snd_wnd < c->cwnd ? c->snd_wnd : c->cwnd;
        if (c->flags & F_PROBE && unsent && c->snd_wnd == 0)
            wnd = (c->snd_nxt - c->snd_una) + 1;          /* one byte into a zero window */
        c->flags &= ~F_PROBE;
        while (unsent && !(c->flags & F_FIN_SENT)) {
            int32_t usable = (int32_t)(c->snd_una + wnd - c->snd_nxt);
            if (usable <= 0)
                break;
            uint32_t n = unsent < c->mss ? unsent : c->mss;
            if (n > (uint32_t)usable)
                n = (uint32_t)usable;
            uint8_t fl = TH_ACK | (n == unsent ? TH_PSH : 0);
            if (!tcp_segment(c, c->snd_nxt, fl, in_flight, n, now))
                break;
            c->snd_nxt += n;
            in_flight += n;
            unsent -= n;
            sent = 1;
        }
        if (unsent || c->snd_nxt != c->snd_una)
            arm_rtx(c, now);            /* data in flight, or a zero window to probe */
        if ((c->flags & F_CLOSE_REQ) && !unsent && !(c->flags & F_FIN_SENT)) {
            if (tcp_segment(c, c->snd_nxt, TH_FIN | TH_ACK, 0, 0, now)) {
                c->snd_nxt++;
                c->flags |= F_FIN_SENT;
                if (c->state == ESTABLISHED)
                    c->state = FIN_WAIT_1;
                else if (c->state == CLOSE_WAIT)
                    c->state = LAST_ACK;
                sent = 1;
                arm_rtx(c, now);
            }
        }
    }
    if ((c->flags & F_ACK_NOW) && !sent && c->state != CLOSED)
        tcp_segment(c, c->snd_nxt, TH_ACK, 0, 0, now);
}

/* ---- TCP: input ---- */

static void tcp_new(uint32_t src, uint16_t sport, uint32_t seq, uint32_t wnd,
                    const uint8_t *opt, uint32_t optlen, uint64_t now)
{
    struct tcb *c = tcb_alloc();
    if (!c)
        return;
    uint16_t mss = MSS_DEFAULT;
    for (uint32_t i = 0; i < optlen;) {
        uint8_t kind = opt[i];
        if (kind == 0)
            break;
        if (kind == 1) {
            i++;
            continue;
        }
        if (i + 1 >= optlen || opt[i + 1] < 2 || i + opt[i + 1] > optlen)
            break;
        if (kind == 2 && opt[i + 1] == 4)
            mss = get16(opt + i + 2);
        i += opt[i + 1];
    }
    if (mss > MSS_OURS)
        mss = MSS_OURS;
    if (mss < 64)
        mss = 64;
    memset(c, 0, (uint8_t *)c->rx - (uint8_t *)c);   /* header only, not the buffers */
    c->rip = src;
    c->rport = sport;
    c->mss = mss;
    c->state = SYN_RCVD;
    syn_rcvd_count++;
    c->born = ++conn_counter;
    /* the initial sequence number is a function of guest state only (docs/DESIGN.md) */
    c->iss = (uint32_t)mix64(isn_secret ^ ((uint64_t)src << 16 | sport) ^ (c->born << 48));
    c->snd_una = c->snd_nxt = c->iss;
    c->snd_wnd = wnd;
    c->cwnd = 10 * mss;
    c->rcv_nxt = seq + 1;
    c->rto = RTO_MIN_MS;
    int id = (int)(c - tcbs);
    uint32_t h = tuple_hash(src, sport);
    c->next = hash_head[h];
    hash_head[h] = (int16_t)id;
    tcp_output(c, now);
}

static void tcp_established(struct tcb *c)
{
    if (c->state == SYN_RCVD)
        syn_rcvd_count--;
    c->state = ESTABLISHED;
    c->rtx_at = 0;
    c->retries = 0;
    c->rto = RTO_MIN_MS;
    c->flags |= F_APP_LIVE;
    net_stats.tcp_accepted++;
    net_stats.conns_open++;
    app_open((int)(c - tcbs));
}

static void tcp_input(uint32_t src, const uint8_t *t, uint32_t len, uint64_t now)
{
    if (len < TCP_HLEN)
        return;
    uint32_t hlen = (uint32_t)(t[12] >> 4) * 4;
    if (hlen < TCP_HLEN || hlen > len)
        return;
    if (csum_fold(csum_add(pseudo_sum(src, cfg.ip, 6, len), t, len)) != 0) {
        net_stats.rx_bad_csum++;
        return;
    }
    uint16_t sport = get16(t), dport = get16(t + 2);
    uint32_t seq = get32(t + 4), ack = get32(t + 8);
    uint8_t flags = t[13] & 0x3f;
    uint32_t wnd = get16(t + 14);
    const uint8_t *data = t + hlen;
    uint32_t dlen = len - hlen;
    uint32_t seglen = dlen + ((flags & TH_SYN) ? 1 : 0) + ((flags & TH_FIN) ? 1 : 0);
    if (sport == 0)
        return;
    if (dport != cfg.port) {
        if (!(flags & TH_RST))
            tcp_reset_reply(src, sport, seq, ack, flags, seglen, now);
        return;
    }
    struct tcb *c = tcb_lookup(src, sport);
    if (c && c->state == TIME_WAIT && (flags & (TH_SYN | TH_ACK | TH_RST)) == TH_SYN &&
        SEQ_GT(seq, c->rcv_nxt)) {
        net_stats.tcp_tw_reused++;
        tcb_free(c);                    /* a new incarnation of the same pair */
        c = NULL;
    }
    if (!c) {
        if (flags & TH_RST)
            return;
        if (flags & TH_ACK) {
            tcp_reset_reply(src, sport, seq, ack, flags, seglen, now);
            return;
        }
        if ((flags & (TH_SYN | TH_FIN)) == TH_SYN)
            tcp_new(src, sport, seq, wnd, t + TCP_HLEN, hlen - TCP_HLEN, now);
        return;
    }
    if (c->state == SYN_RCVD && (flags & (TH_SYN | TH_ACK | TH_RST)) == TH_SYN &&
        seq + 1 == c->rcv_nxt) {
        c->snd_nxt = c->iss;            /* the SYN again: our SYN-ACK was lost */
        tcp_output(c, now);
        return;
    }
    /* acceptability (RFC 793 p. 69) */
    uint32_t w = rcv_wnd(c);
    int ok;
    if (seglen == 0)
        ok = w == 0 ? seq == c->rcv_nxt
                    : SEQ_GE(seq, c->rcv_nxt) && SEQ_LT(seq, c->rcv_nxt + w);
    else
        ok = w != 0 && ((SEQ_GE(seq, c->rcv_nxt) && SEQ_LT(seq, c->rcv_nxt + w)) ||
                        (SEQ_GE(seq + seglen - 1, c->rcv_nxt) &&
                         SEQ_LT(seq + seglen - 1, c->rcv_nxt + w)));
    if (!ok && seglen > 0 && w == 0 && seq == c->rcv_nxt)
        ok = 1;                         /* a zero-window probe: take its ACK, not its data */
    if (!ok) {
        if (!(flags & TH_RST))
            c->flags |= F_ACK_NOW;
        return;
    }
    if (flags & TH_RST) {
        if (seq == c->rcv_nxt)
            tcb_free(c);
        else
            c->flags |= F_ACK_NOW;      /* RFC 5961 challenge ACK */
        return;
    }
    if (flags & TH_SYN) {
        c->flags |= F_ACK_NOW;          /* RFC 5961 challenge ACK */
        return;
    }
    if (!(flags & TH_ACK))
        return;
    if (c->state == SYN_RCVD) {
        if (ack != c->iss + 1) {
            tcp_reset_reply(src, sport, seq, ack, flags, seglen, now);
            return;
        }
        c->snd_una = ack;
        c->snd_wnd = wnd;
        tcp_established(c);
    }
    if (SEQ_GT(ack, c->snd_nxt)) {
        c->flags |= F_ACK_NOW;          /* acknowledges what we never sent */
        return;
    }
    if (SEQ_GT(ack, c->snd_una)) {
        uint32_t n = ack - c->snd_una;
        if ((c->flags & F_FIN_SENT) && ack == c->snd_nxt) {
            n--;
            c->flags |= F_FIN_ACKED;
        }
        c->tx_head = (c->tx_head + n) % TCP_TXBUF;
        c->tx_len -= n;
        c->snd_una = ack;
        c->retries = 0;
        c->rto = RTO_MIN_MS;
        c->rtx_at = 0;
        c->cwnd = c->cwnd + c->mss > CWND_MAX ? CWND_MAX : c->cwnd + c->mss;
        c->flags |= F_APP_KICK;         /* room for replies again */
    } else if (c->snd_wnd == 0) {
        c->retries = 0;                 /* a peer that answers probes is alive */
    }
    if (SEQ_GE(ack, c->snd_una))
        c->snd_wnd = wnd;
    if (c->flags & F_FIN_ACKED) {
        if (c->state == FIN_WAIT_1) {
            c->state = FIN_WAIT_2;
            c->state_at = now + FIN_WAIT2_MS;
        } else if (c->state == CLOSING) {
            c->state = TIME_WAIT;
            c->state_at = now + TIME_WAIT_MS;
        } else if (c->state == LAST_ACK) {
            tcb_free(c);
            return;
        }
    }
    if (dlen && (c->state == ESTABLISHED || c->state == FIN_WAIT_1 || c->state == FIN_WAIT_2)) {
        if (SEQ_LT(seq, c->rcv_nxt)) {
            uint32_t skip = c->rcv_nxt - seq;
            if (skip >= dlen) {
                dlen = 0;
            } else {
                data += skip;
                dlen -= skip;
            }
            seq = c->rcv_nxt;
        }
        if (seq != c->rcv_nxt) {
            c->flags |= F_ACK_NOW;      /* out of order: dropped, a duplicate ACK asks again */
            return;
        }
        uint32_t room = TCP_RXBUF - c->rx_len;
        uint32_t take = dlen < room ? dlen : room;
        if (take) {
            uint32_t at = (c->rx_head + c->rx_len) % TCP_RXBUF, first = TCP_RXBUF - at;
            if (first > take)
                first = take;
            memcpy(c->rx + at, data, first);
            memcpy(c->rx, data + first, take - first);
            c->rx_len += take;
            c->rcv_nxt += take;
            c->flags |= F_APP_KICK | F_ACK_NOW;
        }
        if (take < dlen) {
            c->flags |= F_ACK_NOW;
            return;                     /* a FIN behind bytes we could not take waits */
        }
    } else if (dlen && seq == c->rcv_nxt) {
        c->flags |= F_ACK_NOW;          /* data after the peer's FIN: not taken */
        return;
    }
    if ((flags & TH_FIN) && seq + dlen == c->rcv_nxt) {
        switch (c->state) {
        case ESTABLISHED:
            c->rcv_nxt++;
            c->state = CLOSE_WAIT;
            c->flags |= F_APP_KICK;
            break;
        case FIN_WAIT_1:
            c->rcv_nxt++;
            if (c->flags & F_FIN_ACKED) {
                c->state = TIME_WAIT;
                c->state_at = now + TIME_WAIT_MS;
            } else {
                c->state = CLOSING;
            }
            break;
        case FIN_WAIT_2:
            c->rcv_nxt++;
            c->state = TIME_WAIT;
            c->state_at = now + TIME_WAIT_MS;
            break;
        default:
            break;
        }
        c->flags |= F_ACK_NOW;
    } else if ((flags & TH_FIN) && c->state == TIME_WAIT) {
        c->state_at = now + TIME_WAIT_MS;   /* our last ACK was lost: again */
        c->flags |= F_ACK_NOW;
    }
}

/* ---- IPv4 ---- */

static void ip_input(const uint8_t *ip, uint32_t len, uint64_t now)
{
    if (len < IP_HLEN || (ip[0] >> 4) != 4)
        return;
    uint32_t ihl = (uint32_t)(ip[0] & 0xf) * 4;
    uint32_t total = get16(ip + 2);
    if (ihl < IP_HLEN || total < ihl || total > len) {
        net_stats.rx_runt++;
        return;
    }
    if (csum_fold(csum_add(0, ip, ihl)) != 0) {
        net_stats.rx_bad_csum++;
        return;
    }
    if (get16(ip + 6) & 0x3fff)
        return;                         /* fragments are not reassembled */
    uint32_t src = get32(ip + 12), dst = get32(ip + 16);
    if (dst != cfg.ip || src == 0 || src == 0xffffffff || (src >> 28) == 0xe ||
        (src & ~cfg.mask) == ~cfg.mask)
        return;
    if (ip[9] == 6)
        tcp_input(src, ip + ihl, total - ihl, now);
    else if (ip[9] == 1)
        icmp_input(src, ip + ihl, total - ihl, now);
}

/* ---- the stack's entry points ---- */

void net_init(const struct net_config *c)
{
    cfg = *c;
    for (int i = 0; i < HASH_N; i++)
        hash_head[i] = -1;
    for (int i = 0; i < NET_NCONN; i++)
        tcbs[i].state = CLOSED;
    memset(arp, 0, sizeof(arp));
    memset(&net_stats, 0, sizeof(net_stats));
    syn_rcvd_count = 0;
    conn_counter = use_counter = 0;
    /* guest state only: the configuration seeds the ISN secret and the IP ids */
    isn_secret = mix64(((uint64_t)cfg.ip << 32) ^ ((uint64_t)cfg.mac[2] << 24 | cfg.mac[3] << 16 |
                       cfg.mac[4] << 8 | cfg.mac[5]) ^ cfg.port);
    ip_id = (uint16_t)isn_secret;
}

void net_input(const uint8_t *f, uint32_t len, uint64_t now)
{
    net_stats.rx_frames++;
    if (len < ETH_HLEN) {
        net_stats.rx_runt++;
        return;
    }
    if (memcmp(f, cfg.mac, 6) && memcmp(f, bcast, 6)) {
        net_stats.rx_dropped++;
        return;
    }
    uint16_t type = get16(f + 12);
    if (type == ETH_P_IP)
        ip_input(f + ETH_HLEN, len - ETH_HLEN, now);
    else if (type == ETH_P_ARP)
        arp_input(f + ETH_HLEN, len - ETH_HLEN, now);
    else
        net_stats.rx_dropped++;
}

void net_output(uint64_t now)
{
    for (int i = 0; i < NET_NCONN; i++) {
        struct tcb *c = &tcbs[i];
        if (c->state == CLOSED)
            continue;
        if ((c->flags & F_APP_KICK) && (c->flags & F_APP_LIVE)) {
            c->flags &= ~F_APP_KICK;
            app_input(i);
            if (c->state == CLOSED)
                continue;
        }
        /* a window that opened by more than two segments is worth telling */
        if (c->state != SYN_RCVD && (int32_t)(c->rcv_nxt + rcv_wnd(c) - c->rcv_adv) >= 2 * (int32_t)c->mss)
            c->flags |= F_ACK_NOW;
        tcp_output(c, now);
    }
}

void net_timers(uint64_t now)
{
    for (int i = 0; i < ARP_N; i++) {
        struct arp_entry *e = &arp[i];
        if (e->state == 1 && e->retry_at <= now) {
            if (e->tries >= ARP_TRIES) {
                e->state = 0;           /* nobody answers: drop what waited */
                e->held_len = 0;
            } else {
                e->tries++;
                e->retry_at = now + ARP_RETRY_MS;
                arp_request(e->ip);
            }
        } else if (e->state == 2 && e->expires <= now) {
            e->state = 0;
        }
    }
    for (int i = 0; i < NET_NCONN; i++) {
        struct tcb *c = &tcbs[i];
        if (c->state == CLOSED)
            continue;
        if (c->state_at && c->state_at <= now &&
            (c->state == TIME_WAIT || c->state == FIN_WAIT_2)) {
            tcb_free(c);
            continue;
        }
        if (!c->rtx_at || c->rtx_at > now)
            continue;
        c->rtx_at = 0;
        if (++c->retries > (c->state == SYN_RCVD ? SYNACK_MAX : RTX_MAX)) {
            if (c->state != SYN_RCVD)
                tcp_segment(c, c->snd_nxt, TH_RST | TH_ACK, 0, 0, now);
            tcb_free(c);                /* the peer is gone */
            continue;
        }
        net_stats.tcp_retransmits++;
        c->rto = c->rto * 2 > RTO_MAX_MS ? RTO_MAX_MS : c->rto * 2;
        if (c->state == SYN_RCVD) {
            c->snd_nxt = c->iss;
        } else {
            if (c->snd_wnd == 0)
                c->flags |= F_PROBE;
            c->snd_nxt = c->snd_una;    /* go back N: resend from the first unacked byte */
            if (c->flags & F_FIN_SENT) {
                c->flags &= ~F_FIN_SENT;
                if (c->state == FIN_WAIT_1)
                    c->state = ESTABLISHED;
                else if (c->state == LAST_ACK)
                    c->state = CLOSE_WAIT;
                else if (c->state == CLOSING)
                    c->state = CLOSE_WAIT;      /* FIN received: only ours is missing */
                c->flags |= F_CLOSE_REQ;
            }
            c->cwnd = c->mss;
        }
        uint8_t keep = c->retries;
        uint32_t rto = c->rto;
        tcp_output(c, now);
        c->retries = keep;
        c->rto = rto;
        if (!c->rtx_at)
            c->rtx_at = now + c->rto;
    }
}

uint64_t net_next_timer(void)
{
    uint64_t next = 0;
#define CONSIDER(t) do { if ((t) && (!next || (t) < next)) next = (t); } while (0)
    for (int i = 0; i < ARP_N; i++) {
        if (arp[i].state == 1)
            CONSIDER(arp[i].retry_at);
        else if (arp[i].state == 2)
            CONSIDER(arp[i].expires);
    }
    for (int i = 0; i < NET_NCONN; i++) {
        if (tcbs[i].state == CLOSED)
            continue;
        CONSIDER(tcbs[i].rtx_at);
        CONSIDER(tcbs[i].state_at);
    }
    return next;
}

void net_announce(uint64_t now)
{
    (void)now;
    arp_send(1, bcast, bcast, cfg.ip);  /* gratuitous ARP: sender = target = our address */
}

/* ---- the application's side ---- */

uint32_t tcp_rx_avail(int id)
{
    return tcbs[id].rx_len;
}

uint32_t tcp_rx_peek(int id, const uint8_t **p1, uint32_t *n1, const uint8_t **p2, uint32_t *n2)
{
    struct tcb *c = &tcbs[id];
    uint32_t first = TCP_RXBUF - c->rx_head;
    if (first > c->rx_len)
        first = c->rx_len;
    *p1 = c->rx + c->rx_head;
    *n1 = first;
    *p2 = c->rx;
    *n2 = c->rx_len - first;
    return c->rx_len;
}

void tcp_rx_consume(int id, uint32_t n)
{
    struct tcb *c = &tcbs[id];
    if (n > c->rx_len)
        n = c->rx_len;
    c->rx_head = (c->rx_head + n) % TCP_RXBUF;
    c->rx_len -= n;
    if (!c->rx_len)
        c->rx_head = 0;
}

int tcp_rx_eof(int id)
{
    struct tcb *c = &tcbs[id];
    return c->rx_len == 0 && (c->state == CLOSE_WAIT || c->state == LAST_ACK ||
                              c->state == CLOSING || c->state == TIME_WAIT);
}

uint32_t tcp_tx_room(int id)
{
    struct tcb *c = &tcbs[id];
    if (c->flags & F_CLOSE_REQ)
        return 0;
    return TCP_TXBUF - c->tx_len;
}

uint32_t tcp_write(int id, const void *data, uint32_t len)
{
    struct tcb *c = &tcbs[id];
    uint32_t room = tcp_tx_room(id);
    if (len > room)
        len = room;
    uint32_t at = (c->tx_head + c->tx_len) % TCP_TXBUF, first = TCP_TXBUF - at;
    if (first > len)
        first = len;
    memcpy(c->tx + at, data, first);
    memcpy(c->tx, (const uint8_t *)data + first, len - first);
    c->tx_len += len;
    return len;
}

void tcp_close(int id)
{
    tcbs[id].flags |= F_CLOSE_REQ;
}

void tcp_abort(int id)
{
    struct tcb *c = &tcbs[id];
    if (c->state == CLOSED)
        return;
    tcp_segment(c, c->snd_nxt, TH_RST | TH_ACK, 0, 0, 0);
    tcb_free(c);
}

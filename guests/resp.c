/* RESP2 (the Redis protocol) over netstack's TCP connections, on the kvtable store.
 *
 * Each connection has a streaming parser: bytes are taken from the TCP receive ring as
 * they come, arguments are copied into the connection's argument buffer, and a command
 * runs once it is complete and the connection has room for its largest reply (otherwise
 * it waits for the client to read; the unread input then closes the TCP window). So a
 * client that stops reading slows only itself.
 *
 * Bad input: an argument larger than the buffer, or more arguments than it holds, is
 * read and thrown away and the command answers `-ERR ... too large` (the connection stays
 * usable); a malformed request (a bad length, a missing '$', a header line that never
 * ends) answers `-ERR Protocol error: ...` and the connection is closed, as Redis does.
 * A client that vanishes mid-request (FIN or RST) loses only its partial request. */
#include "netstack.h"
#include "kvtable.h"
#include "resp.h"

#define MAXARGS     64
#define ARGBUF      4096
#define LINE_MAX_R  32                  /* "*<count>" and "$<len>" lines */
#define MAX_REPLY   (ARGBUF + 128)      /* the most one command can answer */
#define MAX_MULTIBULK (1024 * 1024)
#define MAX_BULK    (512L * 1024 * 1024)

enum { S_TYPE, S_COUNT, S_BULKHDR, S_BULKDATA, S_INLINE, S_READY, S_DEAD };
enum { E_NONE, E_TOO_MANY, E_TOO_BIG };

struct resp_conn {
    uint8_t state, err, quit;
    uint8_t proto;                      /* 2, or 3 after HELLO 3 (redis-py 8 asks for it) */
    int32_t expected, nargs;
    int64_t bulk_left;                  /* payload bytes of the current bulk still to come */
    uint32_t crlf_left;                 /* then this many terminator bytes */
    uint32_t used;
    uint32_t arg_off[MAXARGS], arg_len[MAXARGS];
    uint32_t line_len;
    char line[LINE_MAX_R];
    char buf[ARGBUF];
};

static struct resp_conn conns[NET_NCONN];
static uint16_t resp_port;
uint64_t resp_commands;

void resp_init(uint16_t port)
{
    resp_port = port;
}

static void reset_cmd(struct resp_conn *r)
{
    r->state = S_TYPE;
    r->err = E_NONE;
    r->expected = r->nargs = 0;
    r->used = 0;
    r->line_len = 0;
    r->bulk_left = 0;
    r->crlf_left = 0;
}

void app_open(int id)
{
    memset(&conns[id], 0, sizeof(conns[id]) - ARGBUF);
    conns[id].proto = 2;
    reset_cmd(&conns[id]);
}

void app_closed(int id)
{
    conns[id].state = S_DEAD;
}

/* ---- replies ---- */

static char *put_str(char *p, const char *s)
{
    while (*s)
        *p++ = *s++;
    return p;
}

static char *put_int(char *p, int64_t v)
{
    char tmp[24];
    int n = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    if (v < 0)
        *p++ = '-';
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    while (n)
        *p++ = tmp[--n];
    return p;
}

static char *put_bulk(char *p, const char *s, uint32_t n)
{
    *p++ = '$';
    p = put_int(p, n);
    *p++ = '\r';
    *p++ = '\n';
    memcpy(p, s, n);
    p += n;
    *p++ = '\r';
    *p++ = '\n';
    return p;
}

static char *put_num(char *p, char type, int64_t v)
{
    *p++ = type;
    p = put_int(p, v);
    *p++ = '\r';
    *p++ = '\n';
    return p;
}

/* RESP3 differs from RESP2 only where kvnet's replies need it: null and maps */
static char *put_null(char *p, const struct resp_conn *r)
{
    return put_str(p, r->proto == 3 ? "_\r\n" : "$-1\r\n");
}

static void send_str(int id, const char *s)
{
    tcp_write(id, s, (uint32_t)strlen(s));
}

/* ---- commands ---- */

static int word_is(const char *w, uint32_t n, const char *cmd)
{
    uint32_t i = 0;
    for (; i < n && cmd[i]; i++) {
        char c = w[i];
        if (c >= 'a' && c <= 'z')
            c = (char)(c - 32);
        if (c != cmd[i])
            return 0;
    }
    return i == n && !cmd[i];
}

static int parse_i64(const char *s, uint32_t n, int64_t *out)
{
    uint64_t v = 0;
    int neg = 0;
    uint32_t i = 0;
    if (n == 0 || n > 20)
        return 0;
    if (s[0] == '-') {
        neg = 1;
        i = 1;
        if (n == 1)
            return 0;
    }
    if (s[i] == '0' && n > i + 1)
        return 0;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        if (v > (9223372036854775808ULL - (uint64_t)(s[i] - '0')) / 10)
            return 0;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    if (!neg && v > 9223372036854775807ULL)
        return 0;
    *out = neg ? (int64_t)(0 - v) : (int64_t)v;
    return 1;
}

static void arity_error(int id, const char *name, uint32_t n)
{
    char msg[96], *p = put_str(msg, "-ERR wrong number of arguments for '");
    for (uint32_t i = 0; i < n && i < 32; i++) {
        char c = name[i];
        *p++ = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
    }
    p = put_str(p, "' command\r\n");
    tcp_write(id, msg, (uint32_t)(p - msg));
}

static int check_sizes(int id, struct resp_conn *r, uint32_t first, uint32_t step, int values)
{
    for (uint32_t i = first; i < (uint32_t)r->nargs; i += step) {
        if (r->arg_len[i] > KV_KMAX) {
            send_str(id, "-ERR key too long (max 32 bytes)\r\n");
            return 0;
        }
        if (values && r->arg_len[i + 1] > KV_KMAX) {
            send_str(id, "-ERR value too long (max 32 bytes)\r\n");
            return 0;
        }
    }
    return 1;
}

static void execute(int id, struct resp_conn *r)
{
    char out[MAX_REPLY], *p = out;
    const char *a[MAXARGS];
    uint32_t *l = r->arg_len;
    uint32_t n = (uint32_t)r->nargs;
    for (uint32_t i = 0; i < n; i++)
        a[i] = r->buf + r->arg_off[i];
    resp_commands++;
    if (r->err == E_TOO_MANY) {
        send_str(id, "-ERR too many arguments (max 64)\r\n");
        return;
    }
    if (r->err == E_TOO_BIG) {
        send_str(id, "-ERR request too large (max 4096 bytes of arguments)\r\n");
        return;
    }
    const char *cmd = a[0];
    uint32_t cl = l[0];
    if (word_is(cmd, cl, "GET")) {
        if (n != 2)
            return arity_error(id, cmd, cl);
        struct kv_entry *e = l[1] <= KV_KMAX ? kv_find(a[1], l[1], kv_hash(a[1], l[1])) : NULL;
        if (e && e->used)
            p = put_bulk(p, e->val, e->vlen);
        else
            p = put_null(p, r);
    } else if (word_is(cmd, cl, "SET")) {
        if (n != 3) {
            if (n > 3)
                send_str(id, "-ERR syntax error\r\n");
            else
                arity_error(id, cmd, cl);
            return;
        }
        if (!check_sizes(id, r, 1, 2, 1))
            return;
        p = put_str(p, kv_set(a[1], l[1], a[2], l[2]) ? "+OK\r\n"
                                                       : "-ERR table full\r\n");
    } else if (word_is(cmd, cl, "PING")) {
        if (n > 2)
            return arity_error(id, cmd, cl);
        p = n == 2 ? put_bulk(p, a[1], l[1]) : put_str(p, "+PONG\r\n");
    } else if (word_is(cmd, cl, "ECHO")) {
        if (n != 2)
            return arity_error(id, cmd, cl);
        p = put_bulk(p, a[1], l[1]);
    } else if (word_is(cmd, cl, "DEL") || word_is(cmd, cl, "EXISTS")) {
        int del = word_is(cmd, cl, "DEL");
        int64_t count = 0;
        if (n < 2)
            return arity_error(id, cmd, cl);
        for (uint32_t i = 1; i < n; i++) {
            if (l[i] > KV_KMAX)
                continue;
            if (del)
                count += kv_del(a[i], l[i]);
            else
                count += kv_find(a[i], l[i], kv_hash(a[i], l[i]))->used;
        }
        p = put_num(p, ':', count);
    } else if (word_is(cmd, cl, "INCR") || word_is(cmd, cl, "DECR") ||
               word_is(cmd, cl, "INCRBY") || word_is(cmd, cl, "DECRBY")) {
        /* redis-py's incr() is INCRBY key 1 */
        int by = word_is(cmd, cl, "INCRBY") || word_is(cmd, cl, "DECRBY");
        int neg = cmd[0] == 'd' || cmd[0] == 'D';
        int64_t v = 0, d = 1;
        if (n != (by ? 3u : 2u))
            return arity_error(id, cmd, cl);
        if (!check_sizes(id, r, 1, 1, 0))
            return;
        if (by && (!parse_i64(a[2], l[2], &d) || (neg && d == (-9223372036854775807LL - 1))))
            return send_str(id, "-ERR value is not an integer or out of range\r\n");
        if (neg)
            d = -d;
        struct kv_entry *e = kv_find(a[1], l[1], kv_hash(a[1], l[1]));
        if ((e->used && !parse_i64(e->val, e->vlen, &v)) ||
            (d > 0 && v > 9223372036854775807LL - d) ||
            (d < 0 && v < (-9223372036854775807LL - 1) - d))
            return send_str(id, "-ERR increment or decrement would overflow, or the value is "
                                "not an integer\r\n");
        char num[24];
        v += d;
        uint32_t nl = (uint32_t)(put_int(num, v) - num);
        if (!kv_set(a[1], l[1], num, nl))
            return send_str(id, "-ERR table full\r\n");
        p = put_num(p, ':', v);
    } else if (word_is(cmd, cl, "MSET")) {
        if (n < 3 || !(n & 1))
            return arity_error(id, cmd, cl);
        if (!check_sizes(id, r, 1, 2, 1))
            return;
        uint64_t fresh = 0;
        for (uint32_t i = 1; i < n; i += 2)
            fresh += !kv_find(a[i], l[i], kv_hash(a[i], l[i]))->used;
        if (fresh > kv_room()) {        /* all or nothing */
            send_str(id, "-ERR table full\r\n");
            return;
        }
        for (uint32_t i = 1; i < n; i += 2)
            kv_set(a[i], l[i], a[i + 1], l[i + 1]);
        p = put_str(p, "+OK\r\n");
    } else if (word_is(cmd, cl, "MGET")) {
        if (n < 2)
            return arity_error(id, cmd, cl);
        p = put_num(p, '*', n - 1);
        for (uint32_t i = 1; i < n; i++) {
            struct kv_entry *e = l[i] <= KV_KMAX ? kv_find(a[i], l[i], kv_hash(a[i], l[i])) : NULL;
            if (e && e->used)
                p = put_bulk(p, e->val, e->vlen);
            else
                p = put_null(p, r);
        }
    } else if (word_is(cmd, cl, "TIME")) {
        /* the host's clock (CLOCK_MONOTONIC: seconds, microseconds): the one reply that
         * differs between two copies of this guest, which is what hybrid COLO's tests
         * need to make them diverge on purpose */
        if (n != 1)
            return arity_error(id, cmd, cl);
        uint64_t ns = clock_ns();
        char sec[24], usec[8];
        uint32_t sl = (uint32_t)(put_int(sec, (int64_t)(ns / 1000000000ULL)) - sec);
        uint32_t us = (uint32_t)(ns / 1000ULL % 1000000ULL);
        for (int i = 5; i >= 0; i--, us /= 10)
            usec[i] = (char)('0' + us % 10);
        p = put_num(p, '*', 2);
        p = put_bulk(p, sec, sl);
        p = put_bulk(p, usec, 6);
    } else if (word_is(cmd, cl, "DBSIZE")) {
        if (n != 1)
            return arity_error(id, cmd, cl);
        p = put_num(p, ':', (int64_t)kv_count());
    } else if (word_is(cmd, cl, "FLUSHALL") || word_is(cmd, cl, "FLUSHDB")) {
        if (n > 2)
            return send_str(id, "-ERR syntax error\r\n");
        kv_flush();
        p = put_str(p, "+OK\r\n");
    } else if (word_is(cmd, cl, "QUIT")) {
        p = put_str(p, "+OK\r\n");
        r->quit = 1;
    } else if (word_is(cmd, cl, "CONFIG") || word_is(cmd, cl, "COMMAND")) {
        /* clients probe these when they connect: nothing to report */
        int config = word_is(cmd, cl, "CONFIG");
        if (config && (n < 2 || !word_is(a[1], l[1], "GET")))
            return send_str(id, "-ERR CONFIG: only CONFIG GET is supported\r\n");
        p = put_str(p, config && r->proto == 3 ? "%0\r\n" : "*0\r\n");
    } else if (word_is(cmd, cl, "HELLO")) {
        int64_t v = r->proto;
        if (n >= 2 && (!parse_i64(a[1], l[1], &v) || v < 2 || v > 3))
            return send_str(id, "-NOPROTO sorry, this protocol version is not supported\r\n");
        for (uint32_t i = 2; i < n; i++)
            if (word_is(a[i], l[i], "AUTH"))
                return send_str(id, "-ERR AUTH: kvnet has no passwords; drop AUTH\r\n");
        r->proto = (uint8_t)v;
        p = put_str(p, v == 3 ? "%7\r\n" : "*14\r\n");
        p = put_bulk(p, "server", 6);
        p = put_bulk(p, "redis", 5);
        p = put_bulk(p, "version", 7);
        p = put_bulk(p, "7.0.0", 5);
        p = put_bulk(p, "proto", 5);
        p = put_num(p, ':', v);
        p = put_bulk(p, "id", 2);
        p = put_num(p, ':', id + 1);
        p = put_bulk(p, "mode", 4);
        p = put_bulk(p, "standalone", 10);
        p = put_bulk(p, "role", 4);
        p = put_bulk(p, "master", 6);
        p = put_bulk(p, "modules", 7);
        p = put_str(p, "*0\r\n");
    } else if (word_is(cmd, cl, "CLIENT")) {
        if (n >= 2 && (word_is(a[1], l[1], "SETINFO") || word_is(a[1], l[1], "SETNAME")))
            p = put_str(p, "+OK\r\n");
        else
            return send_str(id, "-ERR CLIENT: only SETINFO and SETNAME are supported\r\n");
    } else if (word_is(cmd, cl, "SELECT")) {
        if (n != 2)
            return arity_error(id, cmd, cl);
        p = put_str(p, (l[1] == 1 && a[1][0] == '0') ? "+OK\r\n" : "-ERR DB index is out of range\r\n");
    } else if (word_is(cmd, cl, "INFO")) {
        char body[512], *b = body;
        b = put_str(b, "# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\n"
                       "os:colocore kvnet\r\narch_bits:64\r\ntcp_port:");
        b = put_int(b, resp_port);
        b = put_str(b, "\r\n\r\n# Clients\r\nconnected_clients:");
        b = put_int(b, (int64_t)net_stats.conns_open);
        b = put_str(b, "\r\n\r\n# Stats\r\ntotal_commands_processed:");
        b = put_int(b, (int64_t)resp_commands);
        b = put_str(b, "\r\n\r\n# Keyspace\r\ndb0:keys=");
        b = put_int(b, (int64_t)kv_count());
        b = put_str(b, ",expires=0,avg_ttl=0\r\n");
        p = put_bulk(p, body, (uint32_t)(b - body));
    } else {
        p = put_str(p, "-ERR unknown command '");
        for (uint32_t i = 0; i < cl && i < 64; i++)
            *p++ = (cmd[i] == '\r' || cmd[i] == '\n') ? ' ' : cmd[i];
        p = put_str(p, "'\r\n");
    }
    tcp_write(id, out, (uint32_t)(p - out));
}

/* ---- parsing ---- */

static void protocol_error(int id, struct resp_conn *r, const char *why)
{
    char msg[128], *p = put_str(msg, "-ERR Protocol error: ");
    p = put_str(p, why);
    p = put_str(p, "\r\n");
    tcp_write(id, msg, (uint32_t)(p - msg));
    tcp_close(id);
    r->state = S_DEAD;
}

static int line_number(struct resp_conn *r, int64_t *v)
{
    uint32_t n = r->line_len;
    if (n && r->line[n - 1] == '\r')
        n--;
    return n > 1 && parse_i64(r->line + 1, n - 1, v);
}

static void inline_split(struct resp_conn *r)
{
    uint32_t n = r->used, i = 0;
    if (n && r->buf[n - 1] == '\r')
        n--;
    r->nargs = 0;
    while (i < n) {
        while (i < n && (r->buf[i] == ' ' || r->buf[i] == '\t'))
            i++;
        if (i == n)
            break;
        uint32_t s = i;
        while (i < n && r->buf[i] != ' ' && r->buf[i] != '\t')
            i++;
        if (r->nargs == MAXARGS) {
            r->err = E_TOO_MANY;
            break;
        }
        r->arg_off[r->nargs] = s;
        r->arg_len[r->nargs++] = i - s;
    }
}

/* Feed `n` bytes; returns how many were taken (stops when a command is ready). */
static uint32_t parse(int id, struct resp_conn *r, const uint8_t *d, uint32_t n)
{
    uint32_t i = 0;
    while (i < n && r->state != S_READY && r->state != S_DEAD) {
        switch (r->state) {
        case S_TYPE:
            if (d[i] == '*') {
                r->state = S_COUNT;
                r->line_len = 0;
            } else if (d[i] == '\r' || d[i] == '\n') {
                i++;                    /* blank lines between requests */
            } else {
                r->state = S_INLINE;
                r->used = 0;
            }
            break;
        case S_COUNT:
        case S_BULKHDR: {
            uint8_t c = d[i++];
            if (c == '\n') {
                int64_t v;
                if (r->state == S_COUNT) {
                    if (!line_number(r, &v) || v > MAX_MULTIBULK)
                        return protocol_error(id, r, "invalid multibulk length"), i;
                    if (v <= 0) {
                        reset_cmd(r);   /* an empty request: no reply, as Redis */
                        break;
                    }
                    r->expected = (int32_t)v;
                    if (v > MAXARGS)
                        r->err = E_TOO_MANY;
                    r->state = S_BULKHDR;
                    r->line_len = 0;
                } else {
                    if (r->line[0] != '$') {
                        char why[40], *p = put_str(why, "expected '$', got '");
                        *p++ = (r->line[0] >= 32 && r->line[0] < 127) ? r->line[0] : '?';
                        *p++ = '\'';
                        *p = 0;
                        return protocol_error(id, r, why), i;
                    }
                    if (!line_number(r, &v) || v < 0 || v > MAX_BULK)
                        return protocol_error(id, r, "invalid bulk length"), i;
                    r->bulk_left = v;
                    r->crlf_left = 2;
                    if (r->err == E_NONE && r->nargs < MAXARGS && (uint64_t)v > ARGBUF - r->used)
                        r->err = E_TOO_BIG;
                    if (r->err == E_NONE) {
                        r->arg_off[r->nargs] = r->used;
                        r->arg_len[r->nargs] = (uint32_t)v;
                    }
                    r->state = S_BULKDATA;
                }
            } else {
                if (r->line_len == LINE_MAX_R)
                    return protocol_error(id, r, "header line too long"), i;
                r->line[r->line_len++] = (char)c;
            }
            break;
        }
        case S_BULKDATA: {
            if (r->bulk_left) {
                uint32_t take = n - i;
                if ((int64_t)take > r->bulk_left)
                    take = (uint32_t)r->bulk_left;
                if (r->err == E_NONE) {
                    memcpy(r->buf + r->used, d + i, take);
                    r->used += take;
                }
                r->bulk_left -= take;
                i += take;
            } else if (r->crlf_left) {
                r->crlf_left--;
                i++;
            }
            if (!r->bulk_left && !r->crlf_left) {
                r->nargs++;
                if (r->nargs == r->expected) {
                    if (r->nargs > MAXARGS)
                        r->nargs = MAXARGS;
                    r->state = S_READY;
                } else {
                    r->state = S_BULKHDR;
                    r->line_len = 0;
                }
            }
            break;
        }
        case S_INLINE: {
            uint8_t c = d[i++];
            if (c == '\n') {
                inline_split(r);
                if (r->nargs == 0) {
                    reset_cmd(r);
                    break;
                }
                r->state = S_READY;
            } else {
                if (r->used == ARGBUF)
                    return protocol_error(id, r, "too big inline request"), i;
                r->buf[r->used++] = (char)c;
            }
            break;
        }
        }
    }
    return i;
}

void app_input(int id)
{
    struct resp_conn *r = &conns[id];
    for (;;) {
        if (r->state == S_READY) {
            if (tcp_tx_room(id) < MAX_REPLY)
                return;                 /* the client is not reading: wait for its ACKs */
            execute(id, r);
            int quit = r->quit;
            reset_cmd(r);
            if (quit) {
                tcp_close(id);
                r->state = S_DEAD;
            }
            continue;
        }
        const uint8_t *p1, *p2;
        uint32_t n1, n2;
        if (!tcp_rx_peek(id, &p1, &n1, &p2, &n2)) {
            if (tcp_rx_eof(id))
                tcp_close(id);          /* a partial request dies with its client */
            return;
        }
        if (r->state == S_DEAD) {
            tcp_rx_consume(id, n1 + n2);        /* closing: input is ignored */
            continue;
        }
        uint32_t used = parse(id, r, p1, n1);
        if (used == n1 && n2 && r->state != S_READY && r->state != S_DEAD)
            used += parse(id, r, p2, n2);
        tcp_rx_consume(id, used);
    }
}

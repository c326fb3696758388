/* kvstore: a key-value service on the virtio console (line protocol, see README.md).
 * All state is in guest RAM: the key-value table of kvtable.c, shared with kvnet. */
#include "guest.h"
#include "kvtable.h"

const char guest_name[] = "kvstore";

#define KMAX KV_KMAX

static void reply(const char *s, uint32_t n)
{
    con_write(s, n);
    con_write("\n", 1);
}

#define REPLY(s) reply(s, sizeof(s) - 1)

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r';
}

static int word_is(const char *w, uint32_t n, const char *cmd)
{
    uint32_t i = 0;
    for (; i < n && cmd[i]; i++) {
        char c = w[i];
        if (c >= 'a' && c <= 'z')
            c -= 32;
        if (c != cmd[i])
            return 0;
    }
    return i == n && !cmd[i];
}

static void handle_line(char *line, uint32_t len, int too_long)
{
    const char *tok[4];
    uint32_t tlen[4], ntok = 0;
    if (too_long) {
        REPLY("ERR line too long");
        return;
    }
    for (uint32_t i = 0; i < len;) {
        while (i < len && is_space(line[i]))
            i++;
        if (i == len)
            break;
        uint32_t s = i;
        while (i < len && !is_space(line[i]))
            i++;
        if (ntok == 4) {
            ntok++;
            break;
        }
        tok[ntok] = line + s;
        tlen[ntok++] = i - s;
    }
    if (ntok == 0)
        return;                                 /* blank line: no reply */
    const char *cmd = tok[0];
    uint32_t cl = tlen[0];
    if (word_is(cmd, cl, "PING")) {
        if (ntok != 1)
            REPLY("ERR usage: PING");
        else
            REPLY("PONG");
    } else if (word_is(cmd, cl, "GET") || word_is(cmd, cl, "DEL") || word_is(cmd, cl, "SET")) {
        int set = word_is(cmd, cl, "SET"), del = word_is(cmd, cl, "DEL");
        if (ntok != (set ? 3u : 2u)) {
            if (set)
                REPLY("ERR usage: SET key value");
            else if (del)
                REPLY("ERR usage: DEL key");
            else
                REPLY("ERR usage: GET key");
            return;
        }
        if (tlen[1] > KMAX) {
            REPLY("ERR key too long (max 32 bytes)");
            return;
        }
        if (set && tlen[2] > KMAX) {
            REPLY("ERR value too long (max 32 bytes)");
            return;
        }
        if (set) {
            if (!kv_set(tok[1], tlen[1], tok[2], tlen[2]))
                REPLY("ERR table full");
            else
                REPLY("OK");
        } else if (del) {
            kv_del(tok[1], tlen[1]);
            REPLY("OK");
        } else {
            struct kv_entry *e = kv_find(tok[1], tlen[1], kv_hash(tok[1], tlen[1]));
            if (e->used)
                reply(e->val, e->vlen);
            else
                REPLY("NIL");
        }
    } else if (word_is(cmd, cl, "COUNT")) {
        if (ntok != 1) {
            REPLY("ERR usage: COUNT");
        } else {
            char buf[24];
            reply(buf, fmt_u64(buf, kv_count()) - buf);
        }
    } else {
        REPLY("ERR unknown command");
    }
}

int guest_main(void)
{
    kv_setup("kvstore");
    con_init();
    lines_handler = handle_line;
    for (;;) {
        if (!con_poll(lines_feed)) {
            plat_wait();                        /* idle: the VMM delivers input or times out */
            continue;
        }
        con_flush();                            /* one TX notify per batch */
    }
}

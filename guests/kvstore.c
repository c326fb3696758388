/* kvstore: a key-value service on the virtio console (line protocol, see README.md).
 * All state is in guest RAM: an open-addressing (linear probing, backward-shift delete)
 * hash table placed after the image and sized from the multiboot memory info. */
#include "guest.h"

const char guest_name[] = "kvstore";

#define KMAX 32
#define DEFAULT_SLOTS 262144UL          /* 72-byte entries: 18 MiB */
#define MIN_SLOTS 1024UL

struct entry {
    uint32_t hash;
    uint8_t used, klen, vlen, pad;
    char key[KMAX];
    char val[KMAX];
};

_Static_assert(sizeof(struct entry) == 72, "entry layout");

static struct entry *table;
static uint64_t mask, count, limit;
/* RAM is not promised to be zero, but zeroing 18 MiB up front costs ~30 ms of page
 * faults under kvm_pvm: table pages are zeroed on first use, tracked by this bitmap
 * (placed, zeroed, in front of the table). */
static uint64_t *zeroed;

static void touch_page(uint64_t page)
{
    if (!(zeroed[page >> 6] & (1UL << (page & 63)))) {
        memset((char *)table + (page << 12), 0, 4096);
        zeroed[page >> 6] |= 1UL << (page & 63);
    }
}

static inline struct entry *slot(uint64_t i)
{
    uint64_t off = i * sizeof(struct entry);
    touch_page(off >> 12);
    touch_page((off + sizeof(struct entry) - 1) >> 12);
    return &table[i];
}

static uint32_t hash_key(const char *k, uint32_t n)
{
    uint32_t h = 2166136261u;                   /* FNV-1a */
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)k[i]) * 16777619u;
    return h ^ (h >> 15);
}

/* slot holding the key, or the empty slot where it would go */
static struct entry *find(const char *k, uint32_t n, uint32_t h)
{
    for (uint64_t i = h & mask;; i = (i + 1) & mask) {
        struct entry *e = slot(i);
        if (!e->used)
            return e;
        if (e->hash == h && e->klen == n && !memcmp(e->key, k, n))
            return e;
    }
}

static void erase(struct entry *e)
{
    uint64_t i = e - table, j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (!slot(j)->used)
            break;
        uint64_t home = table[j].hash & mask;
        /* move j back into the hole at i unless its home lies cyclically in (i, j] */
        int stays = (i <= j) ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            table[i] = table[j];
            i = j;
        }
    }
    table[i].used = 0;
    count--;
}

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
        uint32_t h = hash_key(tok[1], tlen[1]);
        struct entry *e = find(tok[1], tlen[1], h);
        if (set) {
            if (!e->used) {
                if (count >= limit) {
                    REPLY("ERR table full");
                    return;
                }
                e->hash = h;
                e->klen = (uint8_t)tlen[1];
                memcpy(e->key, tok[1], tlen[1]);
                e->used = 1;
                count++;
            }
            e->vlen = (uint8_t)tlen[2];
            memcpy(e->val, tok[2], tlen[2]);
            REPLY("OK");
        } else if (del) {
            if (e->used)
                erase(e);
            REPLY("OK");
        } else if (e->used) {
            reply(e->val, e->vlen);
        } else {
            REPLY("NIL");
        }
    } else if (word_is(cmd, cl, "COUNT")) {
        if (ntok != 1) {
            REPLY("ERR usage: COUNT");
        } else {
            char buf[24];
            reply(buf, fmt_u64(buf, count) - buf);
        }
    } else {
        REPLY("ERR unknown command");
    }
}

static void table_init(void)
{
    char arg[32], msg[160], *p;
    uint64_t slots = DEFAULT_SLOTS, end = ram_end();
    uint64_t start = ((uintptr_t)__image_end + 0xFFFFF) & ~0xFFFFFUL, base, pages, bitmap;
#define TABLE_BASE(n) (start + ((((n) * sizeof(struct entry) + 4095) / 4096 + 63) / 64 * 8 + 4095) / 4096 * 4096)
    if (cmdline_get("slots", arg, sizeof(arg))) {
        if (!parse_u64(arg, &slots) || slots < 16 || (slots & (slots - 1)) || slots > (1UL << 26))
            panic(PANIC_BAD_ARG, "kvstore: slots= must be a power of two, 16..2^26\n");
    } else {
        while (slots > MIN_SLOTS && TABLE_BASE(slots) + slots * sizeof(struct entry) > end)
            slots >>= 1;
    }
    base = TABLE_BASE(slots);
    if (!end || base + slots * sizeof(struct entry) > end) {
        p = msg;
        const char *t = "kvstore: hash table does not fit in RAM: need ";
        memcpy(p, t, strlen(t));
        p += strlen(t);
        p = fmt_hex(p, base + slots * sizeof(struct entry));
        t = ", RAM ends at ";
        memcpy(p, t, strlen(t));
        p += strlen(t);
        p = fmt_hex(p, end);
        *p++ = '\n';
        *p = 0;
        panic(PANIC_NO_MEMORY, msg);
    }
    table = (struct entry *)base;
    mask = slots - 1;
    limit = slots - slots / 8;                  /* keep the load factor <= 7/8 */
    count = 0;
    pages = (slots * sizeof(struct entry) + 4095) / 4096;
    bitmap = (pages + 63) / 64 * 8;
    zeroed = (uint64_t *)start;
    memset(zeroed, 0, bitmap);
}

int guest_main(void)
{
    table_init();
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

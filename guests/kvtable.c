/* The key-value table (see kvtable.h). */
#include "kvtable.h"

#define MIN_SLOTS 1024UL
#define DEFAULT_SLOTS 262144UL          /* 72-byte entries: 18 MiB */

_Static_assert(sizeof(struct kv_entry) == 72, "entry layout");

static struct kv_entry *table;
static uint64_t mask, count, limit, npages;
/* RAM is not promised to be zero, but zeroing 18 MiB up front costs ~30 ms of page
 * faults under kvm_pvm: table pages are zeroed on first use, tracked by this bitmap. */
static uint64_t *zeroed;

void kv_init(void *t, uint64_t slots, uint64_t *bitmap)
{
    table = t;
    mask = slots - 1;
    limit = slots - slots / 8;                  /* keep the load factor <= 7/8 */
    count = 0;
    zeroed = bitmap;
    npages = (slots * sizeof(struct kv_entry) + 4095) / 4096;
}

static void touch_page(uint64_t page)
{
    if (!(zeroed[page >> 6] & (1UL << (page & 63)))) {
        memset((char *)table + (page << 12), 0, 4096);
        zeroed[page >> 6] |= 1UL << (page & 63);
    }
}

static inline struct kv_entry *slot(uint64_t i)
{
    uint64_t off = i * sizeof(struct kv_entry);
    touch_page(off >> 12);
    touch_page((off + sizeof(struct kv_entry) - 1) >> 12);
    return &table[i];
}

uint32_t kv_hash(const char *k, uint32_t n)
{
    uint32_t h = 2166136261u;                   /* FNV-1a */
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)k[i]) * 16777619u;
    return h ^ (h >> 15);
}

struct kv_entry *kv_find(const char *k, uint32_t n, uint32_t h)
{
    for (uint64_t i = h & mask;; i = (i + 1) & mask) {
        struct kv_entry *e = slot(i);
        if (!e->used)
            return e;
        if (e->hash == h && e->klen == n && !memcmp(e->key, k, n))
            return e;
    }
}

static void erase(struct kv_entry *e)
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

int kv_set(const char *k, uint32_t kl, const char *v, uint32_t vl)
{
    uint32_t h = kv_hash(k, kl);
    struct kv_entry *e = kv_find(k, kl, h);
    if (!e->used) {
        if (count >= limit)
            return 0;
        e->hash = h;
        e->klen = (uint8_t)kl;
        memcpy(e->key, k, kl);
        e->used = 1;
        count++;
    }
    e->vlen = (uint8_t)vl;
    memcpy(e->val, v, vl);
    return 1;
}

int kv_del(const char *k, uint32_t kl)
{
    struct kv_entry *e = kv_find(k, kl, kv_hash(k, kl));
    if (!e->used)
        return 0;
    erase(e);
    return 1;
}

uint64_t kv_count(void)
{
    return count;
}

uint64_t kv_room(void)
{
    return limit - count;
}

void kv_flush(void)
{
    /* pages are zeroed again on their next use */
    memset(zeroed, 0, (npages + 63) / 64 * 8);
    count = 0;
}

#ifndef COLOCORE_HOSTED
void kv_setup(const char *who)
{
    char arg[32], msg[160], *p;
    uint64_t slots = DEFAULT_SLOTS, end = ram_end();
    uint64_t start = ((uintptr_t)__image_end + 0xFFFFF) & ~0xFFFFFUL, base, pages, bitmap;
#define TABLE_BASE(n) (start + ((((n) * sizeof(struct kv_entry) + 4095) / 4096 + 63) / 64 * 8 + 4095) / 4096 * 4096)
    if (cmdline_get("slots", arg, sizeof(arg))) {
        if (!parse_u64(arg, &slots) || slots < 16 || (slots & (slots - 1)) || slots > (1UL << 26)) {
            p = msg;
            memcpy(p, who, strlen(who));
            p += strlen(who);
            const char *t = ": slots= must be a power of two, 16..2^26\n";
            memcpy(p, t, strlen(t) + 1);
            panic(PANIC_BAD_ARG, msg);
        }
    } else {
        while (slots > MIN_SLOTS && TABLE_BASE(slots) + slots * sizeof(struct kv_entry) > end)
            slots >>= 1;
    }
    base = TABLE_BASE(slots);
    if (!end || base + slots * sizeof(struct kv_entry) > end) {
        p = msg;
        memcpy(p, who, strlen(who));
        p += strlen(who);
        const char *t = ": hash table does not fit in RAM: need ";
        memcpy(p, t, strlen(t));
        p += strlen(t);
        p = fmt_hex(p, base + slots * sizeof(struct kv_entry));
        t = ", RAM ends at ";
        memcpy(p, t, strlen(t));
        p += strlen(t);
        p = fmt_hex(p, end);
        *p++ = '\n';
        *p = 0;
        panic(PANIC_NO_MEMORY, msg);
    }
    pages = (slots * sizeof(struct kv_entry) + 4095) / 4096;
    bitmap = (pages + 63) / 64 * 8;
    memset((void *)start, 0, bitmap);
    kv_init((void *)base, slots, (uint64_t *)start);
}
#endif

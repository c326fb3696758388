/* The key-value table shared by kvstore (console line protocol) and kvnet (RESP over
 * TCP): open addressing, linear probing, backward-shift deletion, 72-byte entries.
 * Plain C with no platform calls, so the hosted test build (tests/net/hosted) links it
 * too; kv_setup() (guest only) places the table in RAM after the image. */
#ifndef COLOCORE_KVTABLE_H
#define COLOCORE_KVTABLE_H

#include "nettypes.h"

#define KV_KMAX 32                      /* longest key and longest value, bytes */

struct kv_entry {
    uint32_t hash;
    uint8_t used, klen, vlen, pad;
    char key[KV_KMAX];
    char val[KV_KMAX];
};

/* `bitmap` has one bit per 4 KiB page of the table, zeroed by the caller: table pages
 * are zeroed on first use, so a large table costs nothing at boot. */
void kv_init(void *table, uint64_t slots, uint64_t *bitmap);
uint32_t kv_hash(const char *k, uint32_t n);
/* the entry holding the key, or the empty entry where it would go (used == 0) */
struct kv_entry *kv_find(const char *k, uint32_t n, uint32_t h);
/* returns 0 when the key is new and the table is full */
int kv_set(const char *k, uint32_t kl, const char *v, uint32_t vl);
int kv_del(const char *k, uint32_t kl);             /* 1 if it was there */
uint64_t kv_count(void);
uint64_t kv_room(void);                             /* keys that may still be added */
void kv_flush(void);                                /* drop every key */

#ifndef COLOCORE_HOSTED
/* guest: size the table from the multiboot memory info (cmdline slots=N overrides),
 * place it after the image; panics (naming `who`) when it does not fit */
void kv_setup(const char *who);
#endif

#endif

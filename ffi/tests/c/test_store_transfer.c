/* The kvmesh C ABI's block store and block transfers from C, run under AddressSanitizer and
 * UBSan by ffi/tests/c_abi.rs.
 * Usage: test_store_transfer SCRATCH_DIR REDIS_URL
 * SCRATCH_DIR is an empty directory for the disk tiers; REDIS_URL a running Redis server. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvmesh.h"

static int failures = 0;
#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, " (last error %d: %s)\n", kvmesh_last_error_code(), \
                    kvmesh_last_error());                                  \
            failures++;                                                    \
        }                                                                  \
    } while (0)
/* The last call failed with `code` and a message containing `text`. */
#define CHECK_ERR(code, text)                                              \
    do {                                                                   \
        CHECK(kvmesh_last_error_code() == (code), "error code %d, wanted %d", \
              kvmesh_last_error_code(), (code));                           \
        CHECK(strstr(kvmesh_last_error(), (text)) != NULL, "message lacks \"%s\"", (text)); \
    } while (0)

#define BB 16384 /* bytes of one store block */
#define NKEYS 8

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Deterministic bytes for block `seed`. */
static void fill(uint8_t *p, size_t n, uint64_t seed) {
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        p[i] = (uint8_t)x;
    }
}

static int same_as(const uint8_t *p, size_t n, uint64_t seed) {
    uint8_t *want = malloc(n);
    fill(want, n, seed);
    int ok = memcmp(p, want, n) == 0;
    free(want);
    return ok;
}

/* Several threads put and get through one store at once. */
#define THREADS 4
#define PER_THREAD 32
typedef struct {
    kvmesh_store *st;
    int id;
    int bad;
} store_job;

static void *store_worker(void *arg) {
    store_job *j = arg;
    uint8_t *b = malloc(BB);
    for (int i = 0; i < PER_THREAD; i++) {
        uint64_t key = (uint64_t)(j->id * 1000 + i + 1);
        fill(b, BB, key);
        int r = kvmesh_store_put(j->st, key, b, BB);
        if (r != KVMESH_OK) {
            fprintf(stderr, "thread %d: put of block %llu: %d (%s)\n", j->id,
                    (unsigned long long)key, r, kvmesh_last_error());
            j->bad++;
        }
    }
    /* Every thread's blocks, its own and the others' (some may still be on their way). */
    for (int t = 0; t < THREADS; t++) {
        for (int i = 0; i < PER_THREAD; i++) {
            uint64_t key = (uint64_t)(t * 1000 + i + 1);
            int r = kvmesh_store_get(j->st, key, b, BB, NULL);
            if (r < 0 || (t == j->id && r != 1) || (r == 1 && !same_as(b, BB, key))) {
                fprintf(stderr, "thread %d: get of block %llu (thread %d's): %d%s (%s)\n", j->id,
                        (unsigned long long)key, t, r,
                        r == 1 ? ", wrong bytes" : "", r < 0 ? kvmesh_last_error() : "");
                j->bad++;
            }
        }
    }
    free(b);
    return NULL;
}

static void store_threads(const char *scratch) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/disk-threads", scratch);
    kvmesh_store_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.block_bytes = BB;
    cfg.host_bytes = 16 * BB; /* fewer slots than blocks: puts evict while others read */
    cfg.disk_dir = dir;
    cfg.disk_bytes = 4 * THREADS * PER_THREAD * (uint64_t)BB;
    cfg.s3fifo = true;
    kvmesh_store *st = kvmesh_store_new(&cfg);
    CHECK(st != NULL, "store for threads");
    if (!st) return;
    pthread_t th[THREADS];
    store_job jobs[THREADS];
    for (int t = 0; t < THREADS; t++) {
        jobs[t] = (store_job){st, t, 0};
        CHECK(pthread_create(&th[t], NULL, store_worker, &jobs[t]) == 0, "thread %d", t);
    }
    for (int t = 0; t < THREADS; t++) {
        pthread_join(th[t], NULL);
        CHECK(jobs[t].bad == 0, "thread %d: %d bad results", t, jobs[t].bad);
    }
    CHECK(kvmesh_store_flush(st) == KVMESH_OK, "flush");
    kvmesh_store_stats s;
    CHECK(kvmesh_store_get_stats(st, &s) == KVMESH_OK && s.disk.blocks == THREADS * PER_THREAD,
          "disk blocks %llu", (unsigned long long)s.disk.blocks);
    kvmesh_store_free(st);
}

static void store_tests(const char *scratch, const char *redis_url) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/disk", scratch);
    uint8_t *buf = malloc(BB);

    /* Bad configurations: errors with a message, never crashes. */
    CHECK(kvmesh_store_new(NULL) == NULL, "null config");
    CHECK_ERR(KVMESH_ERR_INVALID, "config is null");
    kvmesh_store_config cfg;
    memset(&cfg, 0, sizeof cfg);
    CHECK(kvmesh_store_new(&cfg) == NULL, "zero block size");
    CHECK_ERR(KVMESH_ERR_INVALID, "block_bytes");
    cfg.block_bytes = BB;
    cfg.host_bytes = BB - 1;
    CHECK(kvmesh_store_new(&cfg) == NULL, "host tier without a block");
    CHECK_ERR(KVMESH_ERR_INVALID, "host_bytes");
    cfg.host_bytes = 4 * BB; /* host memory holds 4 of the 8 blocks */
    cfg.disk_bytes = 64 * BB;
    CHECK(kvmesh_store_new(&cfg) == NULL, "disk size without a directory");
    CHECK_ERR(KVMESH_ERR_INVALID, "disk_dir");
    cfg.disk_dir = dir;

    /* Block keys of a prompt, as kvindex computes them. */
    uint32_t tokens[NKEYS * 16 + 5];
    for (size_t i = 0; i < sizeof tokens / sizeof tokens[0]; i++) tokens[i] = 1000 + (uint32_t)i;
    uint64_t keys[NKEYS], salted[NKEYS];
    size_t nk = 0;
    CHECK(kvmesh_block_keys("m", NULL, NULL, tokens, NKEYS * 16 + 5, 16, keys, NKEYS, &nk) == KVMESH_OK, "keys");
    CHECK(nk == NKEYS, "%zu keys", nk);
    CHECK(kvmesh_block_keys("m", NULL, "tenant", tokens, NKEYS * 16, 16, salted, NKEYS, &nk) == KVMESH_OK, "salted keys");
    CHECK(salted[0] != keys[0] && salted[7] != keys[7], "a salt changes the keys");
    CHECK(kvmesh_block_keys("m", NULL, NULL, tokens, NKEYS * 16, 16, keys, 2, &nk) == KVMESH_ERR_INVALID, "short key buffer");
    CHECK(nk == NKEYS, "needed %zu", nk);
    CHECK(kvmesh_block_keys("m", NULL, NULL, tokens, NKEYS * 16, 0, keys, NKEYS, &nk) == KVMESH_ERR_INVALID, "block size 0");
    CHECK(kvmesh_block_keys(NULL, NULL, NULL, tokens, 16, 16, keys, NKEYS, &nk) == KVMESH_ERR_INVALID, "null model");
    CHECK(kvmesh_block_keys("m", NULL, NULL, tokens, NKEYS * 16, 16, keys, NKEYS, &nk) == KVMESH_OK, "keys again");

    kvmesh_store *st = kvmesh_store_new(&cfg);
    CHECK(st != NULL, "store_new");
    if (!st) { free(buf); return; }
    CHECK(kvmesh_store_block_bytes(st) == BB, "block bytes");
    kvmesh_store_config busy = cfg;
    CHECK(kvmesh_store_new(&busy) == NULL, "a disk tier open twice");
    CHECK_ERR(KVMESH_ERR_STORE, "in use");

    /* Put, with bad input refused. */
    for (int i = 0; i < NKEYS; i++) {
        fill(buf, BB, (uint64_t)i);
        CHECK(kvmesh_store_put(st, keys[i], buf, BB) == KVMESH_OK, "put %d", i);
    }
    CHECK(kvmesh_store_put(st, 42, buf, BB - 1) == KVMESH_ERR_INVALID, "short block");
    CHECK_ERR(KVMESH_ERR_INVALID, "16383 bytes");
    CHECK(kvmesh_store_put(st, 42, NULL, BB) == KVMESH_ERR_INVALID, "null data");
    CHECK_ERR(KVMESH_ERR_INVALID, "data is null");
    CHECK(kvmesh_store_put(NULL, 42, buf, BB) == KVMESH_ERR_INVALID, "null store");
    CHECK_ERR(KVMESH_ERR_INVALID, "store is null");
    CHECK(kvmesh_store_get(st, keys[0], buf, BB + 1, NULL) == KVMESH_ERR_INVALID, "long out");
    CHECK(kvmesh_store_get(st, keys[0], NULL, BB, NULL) == KVMESH_ERR_INVALID, "null out");
    CHECK(kvmesh_store_flush(st) == KVMESH_OK, "flush");

    /* Lookup of leading blocks: all 8, the last 4 still in host memory. */
    int32_t tiers[NKEYS + 2];
    size_t held = 99;
    CHECK(kvmesh_store_lookup(st, keys, NKEYS, false, tiers, NKEYS + 2, &held) == KVMESH_OK, "lookup");
    CHECK(held == NKEYS, "held %zu", held);
    int host = 0, disk = 0;
    for (size_t i = 0; i < held && i < NKEYS; i++) {
        host += tiers[i] == KVMESH_TIER_HOST;
        disk += tiers[i] == KVMESH_TIER_DISK;
    }
    CHECK(host == 4 && disk == 4, "host %d disk %d", host, disk);
    CHECK(tiers[NKEYS - 1] == KVMESH_TIER_HOST && tiers[0] == KVMESH_TIER_DISK, "tiers %d %d", tiers[0], tiers[NKEYS - 1]);
    uint64_t gap[4] = {keys[0], keys[1], 12345, keys[3]};
    CHECK(kvmesh_store_lookup(st, gap, 4, false, NULL, 0, &held) == KVMESH_OK && held == 2, "a missing block ends the prefix: %zu", held);
    CHECK(kvmesh_store_lookup(st, keys, NKEYS, false, tiers, NKEYS, NULL) == KVMESH_ERR_INVALID, "null held");
    CHECK(kvmesh_store_lookup(st, NULL, 3, false, tiers, NKEYS, &held) == KVMESH_ERR_INVALID, "null keys");

    /* Get every block back, bytes intact, from whichever tier. */
    for (int i = 0; i < NKEYS; i++) {
        int32_t tier = -1;
        memset(buf, 0, BB);
        CHECK(kvmesh_store_get(st, keys[i], buf, BB, &tier) == 1, "get %d", i);
        CHECK(same_as(buf, BB, (uint64_t)i), "bytes of block %d", i);
        CHECK(tier == KVMESH_TIER_HOST || tier == KVMESH_TIER_DISK, "tier %d", tier);
    }
    CHECK(kvmesh_store_get(st, 12345, buf, BB, NULL) == 0, "absent block");

    kvmesh_store_stats s;
    CHECK(kvmesh_store_get_stats(st, &s) == KVMESH_OK, "stats");
    CHECK(s.has_disk && !s.has_remote, "tiers %d %d", s.has_disk, s.has_remote);
    CHECK(s.disk.stores == NKEYS && s.written == NKEYS && s.write_errors == 0, "disk stores %llu written %llu",
          (unsigned long long)s.disk.stores, (unsigned long long)s.written);
    CHECK(s.host.capacity_blocks == 4 && s.host.blocks == 4, "host %llu/%llu",
          (unsigned long long)s.host.blocks, (unsigned long long)s.host.capacity_blocks);
    CHECK(s.disk.hits >= 4 && s.promotions >= 4, "disk hits %llu", (unsigned long long)s.disk.hits);
    CHECK(kvmesh_store_get_stats(st, NULL) == KVMESH_ERR_INVALID, "null stats");

    /* A put that does not wait for the write-behind queue. */
    fill(buf, BB, 4242);
    CHECK(kvmesh_store_try_put(st, 4242, buf, BB) == KVMESH_OK, "try_put");
    CHECK(kvmesh_store_try_put(st, 4242, buf, 3) == KVMESH_ERR_INVALID, "try_put of a short block");
    memset(buf, 0, BB);
    CHECK(kvmesh_store_get(st, 4242, buf, BB, NULL) == 1 && same_as(buf, BB, 4242), "try_put's block");
    CHECK(kvmesh_store_remove(st, 4242) == 1, "remove try_put's block");

    /* Remove from every tier. */
    CHECK(kvmesh_store_remove(st, keys[0]) == 1, "remove");
    CHECK(kvmesh_store_get(st, keys[0], buf, BB, NULL) == 0, "removed block");
    CHECK(kvmesh_store_remove(st, keys[0]) == 0, "remove again");
    kvmesh_store_free(st);

    /* Another block size on the same directory is refused... */
    kvmesh_store_config other = cfg;
    other.block_bytes = 2 * BB;
    other.host_bytes = 4 * 2 * BB;
    other.disk_bytes = 32 * 2 * BB;
    CHECK(kvmesh_store_new(&other) == NULL, "another geometry");
    CHECK_ERR(KVMESH_ERR_STORE, "incompatible");

    /* ...the same one finds the blocks again, on disk. */
    st = kvmesh_store_new(&cfg);
    CHECK(st != NULL, "reopen");
    if (st) {
        CHECK(kvmesh_store_lookup(st, keys + 1, NKEYS - 1, false, tiers, NKEYS, &held) == KVMESH_OK, "lookup after reopen");
        CHECK(held == NKEYS - 1, "held after reopen %zu", held);
        for (size_t i = 0; i < held; i++) CHECK(tiers[i] == KVMESH_TIER_DISK, "tier %d", tiers[i]);
        int32_t tier = -1;
        CHECK(kvmesh_store_get(st, keys[5], buf, BB, &tier) == 1 && tier == KVMESH_TIER_DISK, "get after reopen: tier %d", tier);
        CHECK(same_as(buf, BB, 5), "bytes after reopen");
        CHECK(kvmesh_store_get(st, keys[5], buf, BB, &tier) == 1 && tier == KVMESH_TIER_HOST, "promoted: tier %d", tier);
        CHECK(kvmesh_store_get(st, keys[0], buf, BB, NULL) == 0, "a removed block stays removed");
        kvmesh_store_free(st);
    }

    /* Redis behind host memory: a second store (empty host memory) reads the first's blocks. */
    kvmesh_store_config rc;
    memset(&rc, 0, sizeof rc);
    rc.block_bytes = BB;
    rc.host_bytes = 4 * BB;
    rc.redis_url = redis_url;
    st = kvmesh_store_new(&rc);
    CHECK(st != NULL, "store with redis");
    if (st) {
        for (int i = 0; i < 2; i++) {
            fill(buf, BB, 100 + (uint64_t)i);
            CHECK(kvmesh_store_put(st, salted[i], buf, BB) == KVMESH_OK, "put to redis %d", i);
        }
        CHECK(kvmesh_store_flush(st) == KVMESH_OK, "flush to redis");
        kvmesh_store_free(st);
    }
    st = kvmesh_store_new(&rc);
    CHECK(st != NULL, "second store with redis");
    if (st) {
        CHECK(kvmesh_store_lookup(st, salted, 3, false, tiers, NKEYS, &held) == KVMESH_OK && held == 0, "local lookup %zu", held);
        CHECK(kvmesh_store_lookup(st, salted, 3, true, tiers, NKEYS, &held) == KVMESH_OK && held == 2, "remote lookup %zu", held);
        CHECK(tiers[0] == KVMESH_TIER_REMOTE, "tier %d", tiers[0]);
        int32_t tier = -1;
        CHECK(kvmesh_store_get(st, salted[1], buf, BB, &tier) == 1 && tier == KVMESH_TIER_REMOTE, "get from redis: tier %d", tier);
        CHECK(same_as(buf, BB, 101), "bytes from redis");
        CHECK(kvmesh_store_get_stats(st, &s) == KVMESH_OK && s.has_remote && s.remote.hits == 1, "redis hits %llu",
              (unsigned long long)s.remote.hits);
        CHECK(kvmesh_store_remove(st, salted[0]) == 1, "remove from redis");
        CHECK(kvmesh_store_lookup(st, salted, 3, true, tiers, NKEYS, &held) == KVMESH_OK && held == 0, "removed from redis %zu", held);
        kvmesh_store_free(st);
    }
    rc.redis_url = "not a url";
    CHECK(kvmesh_store_new(&rc) == NULL, "bad redis url");
    CHECK_ERR(KVMESH_ERR_STORE, "redis");

    kvmesh_store_free(NULL);
    free(buf);
}

#define TB (1 << 20) /* bytes of each agent's memory */
#define NBLK 16
#define BLK 16384

static kvmesh_agent *agent(const char *name, unsigned timeout_ms) {
    kvmesh_agent_config c;
    memset(&c, 0, sizeof c);
    c.name = name;
    c.timeout_ms = timeout_ms;
    c.shm = true;
    kvmesh_agent *a = kvmesh_agent_new(&c);
    CHECK(a != NULL, "agent %s", name);
    return a;
}

/* Several threads post their own transfers on one agent at once. */
typedef struct {
    kvmesh_agent *a;
    uint8_t *src, *dst;
    int id;
    int result;
} xfer_job;

static void *xfer_worker(void *arg) {
    xfer_job *j = arg;
    kvmesh_desc l[4], r[4];
    for (int i = 0; i < 4; i++) {
        /* Thread j's quarter of each 4-block group: scattered on both sides. */
        size_t off = ((size_t)i * THREADS + (size_t)j->id) * 4096;
        l[i].addr = (uint64_t)(uintptr_t)(j->src + off);
        r[i].addr = (uint64_t)(uintptr_t)(j->dst + off);
        l[i].len = r[i].len = 4096;
    }
    kvmesh_descs *ld = kvmesh_descs_new(l, 4), *rd = kvmesh_descs_new(r, 4);
    int backend = j->id % 2 ? KVMESH_BACKEND_SHM : KVMESH_BACKEND_TCP;
    kvmesh_xfer *x = kvmesh_agent_prepare(j->a, KVMESH_OP_WRITE, ld, "decode", rd, backend);
    char msg[8];
    snprintf(msg, sizeof msg, "t%d", j->id);
    j->result = x ? kvmesh_xfer_post(x, (const uint8_t *)msg, strlen(msg)) : kvmesh_last_error_code();
    if (j->result == KVMESH_OK) j->result = kvmesh_xfer_wait(x, 10000);
    kvmesh_xfer_free(x);
    kvmesh_descs_free(ld);
    kvmesh_descs_free(rd);
    return NULL;
}

/* Loads `from`'s metadata into `into` through a blob; returns 0 on success. */
static int load(kvmesh_agent *into, kvmesh_agent *from, const char *want) {
    size_t len = 0;
    if (kvmesh_agent_export_metadata(from, NULL, 0, &len) != KVMESH_OK) return -1;
    uint8_t *blob = malloc(len);
    size_t len2 = 0;
    int r = kvmesh_agent_export_metadata(from, blob, len, &len2);
    CHECK(r == KVMESH_OK && len2 == len, "export %d %zu %zu", r, len, len2);
    char name[64];
    r = kvmesh_agent_load_remote(into, blob, len, name, sizeof name);
    CHECK(r == KVMESH_OK && strcmp(name, want) == 0, "load_remote %d", r);
    free(blob);
    return r;
}

static void transfer_tests(void) {
    /* Bad configurations. */
    CHECK(kvmesh_agent_new(NULL) == NULL, "null config");
    CHECK_ERR(KVMESH_ERR_INVALID, "config is null");
    kvmesh_agent_config bad;
    memset(&bad, 0, sizeof bad);
    CHECK(kvmesh_agent_new(&bad) == NULL, "no name");
    CHECK_ERR(KVMESH_ERR_INVALID, "name is null");
    bad.name = "x";
    bad.threads = 100000;
    CHECK(kvmesh_agent_new(&bad) == NULL, "too many threads");
    CHECK_ERR(KVMESH_ERR_INVALID, "threads");
    bad.threads = 0;
    bad.listen = "localhost";
    CHECK(kvmesh_agent_new(&bad) == NULL, "bad listen address");
    CHECK_ERR(KVMESH_ERR_INVALID, "IP:PORT");

    kvmesh_agent *a = agent("prefill", 3000), *b = agent("decode", 3000);
    if (!a || !b) { kvmesh_agent_free(a); kvmesh_agent_free(b); return; }
    const char *addr_a = kvmesh_agent_listen_addr(a);
    CHECK(addr_a && strncmp(addr_a, "127.0.0.1:", 10) == 0, "listen addr %s", addr_a ? addr_a : "(null)");

    /* a registers the caller's own (ASan-tracked) memory; b a kvmesh buffer. */
    uint8_t *mem_a = malloc(TB);
    fill(mem_a, TB, 7);
    uint32_t ra = 0, rb = 0;
    CHECK(kvmesh_agent_register(a, mem_a, TB, &ra) == KVMESH_OK, "register");
    CHECK(kvmesh_agent_register(a, mem_a + 4096, 4096, NULL) == KVMESH_ERR_INVALID, "overlapping region");
    CHECK(kvmesh_agent_register(a, NULL, 4096, NULL) == KVMESH_ERR_INVALID, "null region");
    CHECK_ERR(KVMESH_ERR_INVALID, "addr is null");
    CHECK(kvmesh_buffer_new(0) == NULL, "empty buffer");
    kvmesh_buffer *buf_b = kvmesh_buffer_new(TB);
    CHECK(buf_b != NULL && kvmesh_buffer_len(buf_b) == TB, "buffer");
    if (!buf_b) { free(mem_a); kvmesh_agent_free(a); kvmesh_agent_free(b); return; }
    uint8_t *mem_b = kvmesh_buffer_data(buf_b);
    CHECK(((uintptr_t)mem_b & 4095) == 0 && mem_b[0] == 0 && mem_b[TB - 1] == 0, "page-aligned zeroed buffer");
    CHECK(kvmesh_agent_register_buffer(b, buf_b, &rb) == KVMESH_OK, "register_buffer");
    CHECK(kvmesh_agent_register_buffer(b, NULL, &rb) == KVMESH_ERR_INVALID, "null buffer");

    /* Metadata: by blob one way, over the side channel the other. */
    size_t need = 0;
    CHECK(kvmesh_agent_export_metadata(b, NULL, 0, &need) == KVMESH_OK && need > 0, "size query %zu", need);
    uint8_t small[4];
    CHECK(kvmesh_agent_export_metadata(b, small, sizeof small, &need) == KVMESH_ERR_INVALID, "short metadata buffer");
    CHECK(kvmesh_agent_load_remote(a, (const uint8_t *)"\x01\x02garbage", 9, NULL, 0) == KVMESH_ERR_INVALID, "garbage metadata");
    CHECK_ERR(KVMESH_ERR_INVALID, "metadata");
    CHECK(load(a, b, "decode") == KVMESH_OK, "a loads b");
    char name[64], tiny[3];
    CHECK(kvmesh_agent_connect(b, addr_a, tiny, sizeof tiny) == KVMESH_ERR_INVALID, "short name buffer");
    CHECK(kvmesh_agent_connect(b, addr_a, name, sizeof name) == KVMESH_OK && strcmp(name, "prefill") == 0, "b connects to a");
    double t0 = now();
    CHECK(kvmesh_agent_connect(b, "127.0.0.1:1", NULL, 0) == KVMESH_ERR_TRANSFER, "nobody listening");
    CHECK(now() - t0 < 10, "refused in %.1f s", now() - t0);
    CHECK(kvmesh_agent_connect(b, "no port", NULL, 0) == KVMESH_ERR_INVALID, "bad address");

    /* Descriptor lists: a's blocks scattered (every other block), b's contiguous. */
    uint64_t src[NBLK];
    kvmesh_desc dst[NBLK];
    for (int i = 0; i < NBLK; i++) {
        src[i] = (uint64_t)(uintptr_t)(mem_a + (size_t)(2 * i) * BLK);
        dst[i].addr = (uint64_t)(uintptr_t)(mem_b + (size_t)i * BLK);
        dst[i].len = BLK;
    }
    kvmesh_descs *l = kvmesh_descs_new_blocks(src, NBLK, BLK);
    kvmesh_descs *r = kvmesh_descs_new(dst, NBLK);
    CHECK(kvmesh_descs_len(l) == NBLK && kvmesh_descs_len(r) == NBLK, "lists");
    CHECK(kvmesh_descs_new(NULL, 3) == NULL, "null descriptors");
    CHECK(kvmesh_descs_new_blocks(src, NBLK, 0) == NULL, "zero block length");

    /* WRITE a -> b over TCP, with a notification after the data. */
    kvmesh_xfer *w = kvmesh_agent_prepare(a, KVMESH_OP_WRITE, l, "decode", r, KVMESH_BACKEND_TCP);
    CHECK(w != NULL, "prepare write");
    if (w) {
        CHECK(kvmesh_xfer_status(w) == KVMESH_XFER_IDLE, "idle");
        CHECK(kvmesh_xfer_wait(w, 10) == KVMESH_ERR_INVALID, "wait before post");
        CHECK(kvmesh_xfer_post(w, (const uint8_t *)"blocks 0-15", 11) == KVMESH_OK, "post write");
        CHECK(kvmesh_xfer_wait(w, 10000) == KVMESH_OK, "write done");
        CHECK(kvmesh_xfer_status(w) == KVMESH_XFER_DONE, "done");
        kvmesh_xfer_stats xs;
        CHECK(kvmesh_xfer_get_stats(w, &xs) == KVMESH_OK, "stats");
        CHECK(xs.backend == KVMESH_BACKEND_TCP && xs.op == KVMESH_OP_WRITE && xs.bytes == NBLK * BLK && xs.posts == 1,
              "backend %d op %d bytes %llu", xs.backend, xs.op, (unsigned long long)xs.bytes);
        kvmesh_notif *n = NULL;
        CHECK(kvmesh_agent_wait_notif(b, 10000, &n) == 1 && n != NULL, "notification");
        if (n) {
            size_t len = 0;
            const uint8_t *msg = kvmesh_notif_msg(n, &len);
            CHECK(strcmp(kvmesh_notif_from(n), "prefill") == 0, "from %s", kvmesh_notif_from(n));
            CHECK(len == 11 && memcmp(msg, "blocks 0-15", 11) == 0, "message of %zu bytes", len);
            kvmesh_notif_free(n);
        }
        int ok = 1;
        for (int i = 0; i < NBLK; i++) ok &= memcmp(mem_b + (size_t)i * BLK, mem_a + (size_t)(2 * i) * BLK, BLK) == 0;
        CHECK(ok, "written bytes");
        CHECK(mem_b[NBLK * BLK] == 0, "nothing written past the list");
    }
    kvmesh_xfer_free(w);

    /* READ b -> a into a's odd blocks: over TCP, shared memory, and the default backend. */
    memset(mem_b, 0xab, NBLK * BLK);
    for (int i = 0; i < NBLK; i++) src[i] = (uint64_t)(uintptr_t)(mem_a + (size_t)(2 * i + 1) * BLK);
    kvmesh_descs *l2 = kvmesh_descs_new_blocks(src, NBLK, BLK);
    int read_backends[3] = {KVMESH_BACKEND_TCP, KVMESH_BACKEND_SHM, KVMESH_BACKEND_DEFAULT};
    for (int k = 0; k < 3; k++) {
        int backend = read_backends[k];
        /* Between agents of one host the default is shared memory. */
        int used = backend == KVMESH_BACKEND_TCP ? KVMESH_BACKEND_TCP : KVMESH_BACKEND_SHM;
        for (int i = 0; i < NBLK; i++) memset(mem_a + (size_t)(2 * i + 1) * BLK, 0, BLK);
        kvmesh_xfer *rd = kvmesh_agent_prepare(a, KVMESH_OP_READ, l2, "decode", r, backend);
        CHECK(rd != NULL, "prepare read (backend %d)", backend);
        if (!rd) continue;
        CHECK(kvmesh_xfer_post(rd, NULL, 0) == KVMESH_OK, "post read");
        CHECK(kvmesh_xfer_wait(rd, 10000) == KVMESH_OK, "read done");
        int ok = 1;
        for (int i = 0; i < NBLK; i++) {
            const uint8_t *p = mem_a + (size_t)(2 * i + 1) * BLK;
            for (int j = 0; j < BLK; j++) ok &= p[j] == 0xab;
        }
        CHECK(ok, "read bytes (backend %d)", backend);
        kvmesh_xfer_stats xs;
        CHECK(kvmesh_xfer_get_stats(rd, &xs) == KVMESH_OK && xs.backend == used && xs.op == KVMESH_OP_READ,
              "backend %d moved it, wanted %d", xs.backend, used);
        /* A second post of the same prepared transfer. */
        CHECK(kvmesh_xfer_post(rd, NULL, 0) == KVMESH_OK && kvmesh_xfer_wait(rd, 10000) == KVMESH_OK, "second post");
        CHECK(kvmesh_xfer_get_stats(rd, &xs) == KVMESH_OK && xs.posts == 2, "posts %llu", (unsigned long long)xs.posts);
        kvmesh_xfer_free(rd);
    }

    /* A WRITE over shared memory, with its notification. */
    kvmesh_xfer *ws = kvmesh_agent_prepare(a, KVMESH_OP_WRITE, l, "decode", r, KVMESH_BACKEND_SHM);
    CHECK(ws != NULL, "prepare shm write");
    if (ws) {
        CHECK(kvmesh_xfer_post(ws, (const uint8_t *)"shm", 3) == KVMESH_OK, "post shm write");
        kvmesh_notif *n = NULL;
        CHECK(kvmesh_agent_wait_notif(b, 10000, &n) == 1, "shm notification");
        /* The notification comes after the data: the bytes are there when it is read. */
        int ok = 1;
        for (int i = 0; i < NBLK; i++) ok &= memcmp(mem_b + (size_t)i * BLK, mem_a + (size_t)(2 * i) * BLK, BLK) == 0;
        CHECK(ok, "bytes visible at the notification");
        size_t len = 0;
        const uint8_t *msg = kvmesh_notif_msg(n, &len);
        CHECK(n && len == 3 && memcmp(msg, "shm", 3) == 0, "shm message");
        kvmesh_notif_free(n);
        CHECK(kvmesh_xfer_wait(ws, 10000) == KVMESH_OK, "shm write done");
    }
    kvmesh_xfer_free(ws);

    /* Four threads, four transfers at once, half over TCP, half over shared memory. */
    memset(mem_b, 0, TB);
    pthread_t th[THREADS];
    xfer_job jobs[THREADS];
    for (int t = 0; t < THREADS; t++) {
        jobs[t] = (xfer_job){a, mem_a, mem_b, t, -100};
        CHECK(pthread_create(&th[t], NULL, xfer_worker, &jobs[t]) == 0, "thread %d", t);
    }
    for (int t = 0; t < THREADS; t++) {
        pthread_join(th[t], NULL);
        CHECK(jobs[t].result == KVMESH_OK, "thread %d: %d", t, jobs[t].result);
    }
    CHECK(memcmp(mem_a, mem_b, 16 * 4096) == 0, "every thread's bytes");
    int seen = 0;
    for (int k = 0; k < THREADS; k++) {
        kvmesh_notif *tn = NULL;
        if (kvmesh_agent_wait_notif(b, 10000, &tn) != 1) break;
        size_t len = 0;
        const uint8_t *msg = kvmesh_notif_msg(tn, &len);
        if (len == 2 && msg[0] == 't' && msg[1] >= '0' && msg[1] < '0' + THREADS) seen |= 1 << (msg[1] - '0');
        kvmesh_notif_free(tn);
    }
    CHECK(seen == (1 << THREADS) - 1, "notifications of threads %x", seen);

    /* A cancelled post ends cancelled, or done if it finished first; the handle reports which. */
    kvmesh_xfer *cx = kvmesh_agent_prepare(a, KVMESH_OP_WRITE, l, "decode", r, KVMESH_BACKEND_TCP);
    CHECK(cx != NULL, "prepare for cancel");
    if (cx) {
        CHECK(kvmesh_xfer_post(cx, NULL, 0) == KVMESH_OK, "post to cancel");
        CHECK(kvmesh_xfer_cancel(cx) == KVMESH_OK, "cancel");
        int rc = kvmesh_xfer_wait(cx, 10000);
        int cancelled = rc == KVMESH_ERR_TRANSFER && strstr(kvmesh_last_error(), "cancelled") != NULL;
        int st = kvmesh_xfer_status(cx);
        CHECK((rc == KVMESH_OK && st == KVMESH_XFER_DONE) || (cancelled && st == KVMESH_XFER_CANCELLED),
              "after cancel: wait %d, status %d", rc, st);
        kvmesh_xfer_free(cx);
    }
    CHECK(kvmesh_xfer_cancel(NULL) == KVMESH_ERR_INVALID, "cancel null");

    /* Notifications on their own, and none waiting. */
    CHECK(kvmesh_agent_send_notif(b, "prefill", (const uint8_t *)"hello", 5) == KVMESH_OK, "send_notif");
    kvmesh_notif *n = NULL;
    CHECK(kvmesh_agent_wait_notif(a, 10000, &n) == 1, "standalone notification");
    CHECK(n && strcmp(kvmesh_notif_from(n), "decode") == 0, "from");
    kvmesh_notif_free(n);
    n = (kvmesh_notif *)1;
    CHECK(kvmesh_agent_wait_notif(a, 0, &n) == 0 && n == NULL, "no notification");
    CHECK(kvmesh_agent_wait_notif(a, 0, NULL) == KVMESH_ERR_INVALID, "null out");
    CHECK(kvmesh_agent_send_notif(b, "nobody", (const uint8_t *)"x", 1) == KVMESH_ERR_TRANSFER, "notification to nobody");

    /* Bad transfers are refused when prepared. */
    kvmesh_descs *one = kvmesh_descs_new(dst, 1);
    CHECK(kvmesh_agent_prepare(a, KVMESH_OP_WRITE, l, "decode", one, KVMESH_BACKEND_TCP) == NULL, "length mismatch");
    CHECK_ERR(KVMESH_ERR_INVALID, "16 local descriptors against 1 remote");
    kvmesh_desc outside = {(uint64_t)(uintptr_t)(mem_b + TB - 100), 200};
    kvmesh_descs *out = kvmesh_descs_new(&outside, 1);
    kvmesh_descs *l1 = kvmesh_descs_new_blocks(src, 1, 200);
    CHECK(kvmesh_agent_prepare(a, KVMESH_OP_WRITE, l1, "decode", out, KVMESH_BACKEND_TCP) == NULL, "outside the peer's memory");
    CHECK_ERR(KVMESH_ERR_INVALID, "outside every memory region");
    CHECK(kvmesh_agent_prepare(a, KVMESH_OP_WRITE, l, "nobody", r, KVMESH_BACKEND_TCP) == NULL, "unknown peer");
    CHECK_ERR(KVMESH_ERR_TRANSFER, "unknown remote agent");
    CHECK(kvmesh_agent_prepare(a, 7, l, "decode", r, KVMESH_BACKEND_TCP) == NULL, "bad op");
    CHECK_ERR(KVMESH_ERR_INVALID, "op 7");
    CHECK(kvmesh_agent_prepare(a, KVMESH_OP_READ, l, "decode", r, 9) == NULL, "bad backend");
    CHECK(kvmesh_agent_prepare(a, KVMESH_OP_READ, l, "decode", r, KVMESH_BACKEND_UCX) == NULL, "UCX not enabled");
    CHECK_ERR(KVMESH_ERR_TRANSFER, "ucx");
    CHECK(kvmesh_agent_prepare(a, KVMESH_OP_READ, NULL, "decode", r, KVMESH_BACKEND_TCP) == NULL, "null list");
    CHECK_ERR(KVMESH_ERR_INVALID, "local is null");
    CHECK(kvmesh_xfer_post(NULL, NULL, 0) == KVMESH_ERR_INVALID, "null xfer");
    CHECK(kvmesh_xfer_status(NULL) == KVMESH_ERR_INVALID, "null xfer status");
    kvmesh_descs_free(one);
    kvmesh_descs_free(out);
    kvmesh_descs_free(l1);

    /* A peer that died: the transfer fails within the timeout. (Over TCP: in this one process
     * the shared-memory backend would still find the dead agent's process alive.) */
    kvmesh_agent *c = agent("gone", 2000);
    kvmesh_buffer *buf_c = kvmesh_buffer_new(TB);
    if (c && buf_c) {
        CHECK(kvmesh_agent_register_buffer(c, buf_c, NULL) == KVMESH_OK, "register c");
        for (int i = 0; i < NBLK; i++) dst[i].addr = (uint64_t)(uintptr_t)(kvmesh_buffer_data(buf_c) + (size_t)i * BLK);
        kvmesh_descs *rc = kvmesh_descs_new(dst, NBLK);
        CHECK(load(a, c, "gone") == KVMESH_OK, "a loads c");
        kvmesh_agent_free(c);
        c = NULL;
        /* With a notification and without. */
        for (int k = 0; k < 2; k++) {
            kvmesh_xfer *x = kvmesh_agent_prepare(a, KVMESH_OP_WRITE, l, "gone", rc, KVMESH_BACKEND_TCP);
            CHECK(x != NULL, "prepare to a dead peer");
            if (!x) continue;
            t0 = now();
            int rp = kvmesh_xfer_post(x, k ? (const uint8_t *)"n" : NULL, (size_t)k);
            int rw = rp == KVMESH_OK ? kvmesh_xfer_wait(x, 10000) : rp;
            CHECK(rw == KVMESH_ERR_TRANSFER, "dead peer (notification %d): %d", k, rw);
            CHECK(now() - t0 < 8, "failed in %.1f s", now() - t0);
            CHECK(kvmesh_xfer_status(x) == KVMESH_XFER_FAILED, "failed status");
            CHECK(strlen(kvmesh_last_error()) > 0, "a message");
            kvmesh_xfer_free(x);
        }
        kvmesh_descs_free(rc);
    }
    kvmesh_agent_free(c);
    kvmesh_buffer_free(buf_c);

    CHECK(kvmesh_agent_remove_remote(a, "decode") == 1, "remove remote");
    CHECK(kvmesh_agent_remove_remote(a, "decode") == 0, "remove again");
    CHECK(kvmesh_agent_deregister(a, ra) == KVMESH_OK, "deregister");
    CHECK(kvmesh_agent_deregister(a, ra) == KVMESH_ERR_INVALID, "deregister twice");

    kvmesh_descs_free(l);
    kvmesh_descs_free(l2);
    kvmesh_descs_free(r);
    kvmesh_agent_free(a);
    kvmesh_agent_free(b);
    /* b kept the buffer registered until it was freed; the handle is released last. */
    kvmesh_buffer_free(buf_b);
    kvmesh_agent_free(NULL);
    kvmesh_descs_free(NULL);
    kvmesh_xfer_free(NULL);
    kvmesh_notif_free(NULL);
    kvmesh_buffer_free(NULL);
    free(mem_a);
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s SCRATCH_DIR REDIS_URL\n", argv[0]); return 2; }
    store_tests(argv[1], argv[2]);
    store_threads(argv[1]);
    transfer_tests();
    if (failures) { fprintf(stderr, "%d checks failed\n", failures); return 1; }
    printf("all store and transfer checks passed\n");
    return 0;
}

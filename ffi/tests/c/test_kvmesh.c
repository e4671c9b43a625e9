/* The kvmesh C ABI from C, run under AddressSanitizer by ffi/tests/c_abi.rs.
 * Usage: test_kvmesh PUB_ENDPOINT REPLAY_ENDPOINT
 * The harness publishes vLLM KV events on PUB_ENDPOINT: engine blocks holding tokens 100..131. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kvmesh.h"

static int failures = 0;
#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, " (last error: %s)\n", kvmesh_last_error());   \
            failures++;                                                    \
        }                                                                  \
    } while (0)

/* A tiny msgpack writer, enough for one vLLM BlockStored batch. */
typedef struct { unsigned char b[4096]; size_t n; } buf;
static void put(buf *w, unsigned char c) { w->b[w->n++] = c; }
static void str(buf *w, const char *s) {
    size_t n = strlen(s);
    put(w, 0xa0 | (unsigned char)n);
    memcpy(w->b + w->n, s, n);
    w->n += n;
}
static void put_uint(buf *w, unsigned v) {
    if (v < 128) { put(w, (unsigned char)v); }
    else { put(w, 0xcd); put(w, (unsigned char)(v >> 8)); put(w, (unsigned char)v); }
}

/* [ts, [{"type": "BlockStored", "block_hashes": [hash], "parent_block_hash": nil,
 *        "token_ids": [first .. first+15], "block_size": 16, "lora_id": nil, "medium": "GPU"}], 0] */
static size_t stored_batch(buf *w, unsigned hash, unsigned first) {
    w->n = 0;
    put(w, 0x93);
    put(w, 0xcb); for (int i = 0; i < 8; i++) put(w, i == 0 ? 0x3f : (i == 1 ? 0xf0 : 0)); /* 1.0 */
    put(w, 0x91);
    put(w, 0x87);
    str(w, "type"); str(w, "BlockStored");
    str(w, "block_hashes"); put(w, 0x91); put_uint(w, hash);
    str(w, "parent_block_hash"); put(w, 0xc0);
    str(w, "token_ids"); put(w, 0xdc); put(w, 0); put(w, 16);
    for (unsigned t = first; t < first + 16; t++) put_uint(w, t);
    str(w, "block_size"); put(w, 16);
    str(w, "lora_id"); put(w, 0xc0);
    str(w, "medium"); str(w, "GPU");
    put(w, 0);
    return w->n;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Matched blocks of the best engine in an answer (and frees it); -1 for a null answer. */
static int best(kvmesh_scores *s, const char *want_name) {
    if (!s) return -1;
    int m = 0;
    if (kvmesh_scores_len(s) > 0) {
        kvmesh_engine_score e;
        CHECK(kvmesh_scores_get(s, 0, &e) == KVMESH_OK, "get");
        if (want_name) CHECK(strcmp(e.name, want_name) == 0, "engine %s", e.name);
        CHECK(e.matched_tokens == e.matched_blocks * 16, "tokens %u", e.matched_tokens);
        CHECK(e.tiers[0] == e.matched_blocks, "gpu tier %u", e.tiers[0]);
        m = (int)e.matched_blocks;
    }
    kvmesh_scores_free(s);
    return m;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s PUB_ENDPOINT REPLAY_ENDPOINT\n", argv[0]); return 2; }
    unsigned tokens[64];
    for (int i = 0; i < 64; i++) tokens[i] = 100 + i;
    unsigned first_tokens[32];
    for (int i = 0; i < 32; i++) first_tokens[i] = i;

    CHECK(strlen(kvmesh_version()) > 0, "version");

    /* Null and bad arguments are errors, never crashes. */
    CHECK(kvmesh_index_score(NULL, "m", tokens, 4, NULL, NULL) == NULL, "null index");
    CHECK(kvmesh_last_error_code() == KVMESH_ERR_INVALID, "code %d", kvmesh_last_error_code());
    CHECK(strstr(kvmesh_last_error(), "index is null") != NULL, "message");
    kvmesh_index *ix = kvmesh_index_new(0);
    CHECK(ix != NULL, "index_new");
    CHECK(kvmesh_index_score(ix, "m", NULL, 4, NULL, NULL) == NULL, "null tokens with a length");
    CHECK(kvmesh_index_apply(ix, "e", "m", (const unsigned char *)"\x93\xff", 2) == KVMESH_ERR_INDEX, "garbage batch");
    CHECK(kvmesh_index_apply(ix, NULL, "m", NULL, 0) == KVMESH_ERR_INVALID, "null name");
    CHECK(kvmesh_index_remove_engine(ix, "nobody") == KVMESH_ERR_INDEX, "unknown engine");
    CHECK(kvmesh_scores_len(NULL) == 0, "len of null");
    kvmesh_scores_free(NULL);
    kvmesh_index_free(NULL);

    /* Events handed in by the caller. */
    buf w;
    size_t n = stored_batch(&w, 7, 0);
    CHECK(kvmesh_index_apply(ix, "local", "m", w.b, n) == KVMESH_OK, "apply");
    CHECK(best(kvmesh_index_score(ix, "m", first_tokens, 32, NULL, NULL), "local") == 1, "applied block");
    CHECK(best(kvmesh_index_score(ix, "m", first_tokens, 32, "some-lora", NULL), NULL) == 0, "LoRA namespace");
    kvmesh_scores *s = kvmesh_index_score(ix, "m", first_tokens, 32, NULL, NULL);
    kvmesh_engine_score e;
    CHECK(kvmesh_scores_get(s, 5, &e) == KVMESH_ERR_INVALID, "out of range");
    CHECK(kvmesh_scores_get(s, 0, NULL) == KVMESH_ERR_INVALID, "null out");
    kvmesh_scores_free(s);
    CHECK(kvmesh_index_remove_engine(ix, "local") == KVMESH_OK, "remove");
    CHECK(best(kvmesh_index_score(ix, "m", first_tokens, 32, NULL, NULL), NULL) == 0, "purged");

    /* A real engine's stream (the harness's ZMQ publisher). */
    CHECK(kvmesh_index_subscribe(ix, "pub", "m", argv[1], argv[2]) == KVMESH_OK, "subscribe");
    CHECK(kvmesh_index_subscribe(ix, "bad", "m", "not-an-endpoint", NULL) != KVMESH_OK, "bad endpoint");
    int got = 0;
    for (double t0 = now(); now() - t0 < 20 && got != 2; usleep(50000))
        got = best(kvmesh_index_score(ix, "m", tokens, 64, NULL, NULL), "pub");
    CHECK(got == 2, "subscribed engine's blocks: %d", got);

    /* A daemon in this process, asked through the client. */
    char config[1024];
    snprintf(config, sizeof config,
             "listen = \"127.0.0.1:0\"\ngrpc_listen = \"off\"\nmodel = \"m\"\n"
             "[[engines]]\nname = \"pub\"\nendpoint = \"%s\"\nreplay_endpoint = \"%s\"\n",
             argv[1], argv[2]);
    kvmesh_daemon *d = kvmesh_daemon_start(config);
    CHECK(d != NULL, "daemon_start");
    if (d) {
        const char *url = kvmesh_daemon_http_url(d);
        CHECK(url && strncmp(url, "http://127.0.0.1:", 17) == 0, "url %s", url ? url : "(null)");
        kvmesh_client *c = kvmesh_client_new(url, NULL);
        CHECK(c != NULL, "client_new");
        got = 0;
        for (double t0 = now(); now() - t0 < 20 && got != 2; usleep(50000))
            got = best(kvmesh_client_score(c, "m", tokens, 64, NULL, NULL), "pub");
        CHECK(got == 2, "daemon's answer: %d", got);
        kvmesh_client_free(c);
        CHECK(kvmesh_daemon_stop(d) == KVMESH_OK, "daemon_stop");
    }
    CHECK(kvmesh_daemon_start("listen = 5") == NULL, "bad configuration");
    CHECK(strstr(kvmesh_last_error(), "configuration") != NULL, "message: %s", kvmesh_last_error());

    /* A daemon that is not there: a transport error, not a hang or a crash. */
    kvmesh_client *dead = kvmesh_client_new("http://127.0.0.1:1", NULL);
    CHECK(kvmesh_client_score(dead, "m", tokens, 8, NULL, NULL) == NULL, "dead daemon");
    CHECK(kvmesh_last_error_code() == KVMESH_ERR_TRANSPORT, "code %d", kvmesh_last_error_code());
    kvmesh_client_free(dead);
    CHECK(kvmesh_client_new("ftp://x", NULL) == NULL, "bad url");

    kvmesh_index_free(ix);
    if (failures) { fprintf(stderr, "%d checks failed\n", failures); return 1; }
    printf("all C ABI checks passed\n");
    return 0;
}

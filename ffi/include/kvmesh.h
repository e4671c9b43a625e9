/* The kvmesh C ABI. Generated from ffi/src by cbindgen: do not edit (ffi/tests/header.rs
 * checks it; KVMESH_BLESS=1 cargo test -p kvmesh-ffi --test header regenerates it). */

#ifndef KVMESH_H
#define KVMESH_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

// Success.
#define KVMESH_OK 0

// An argument is null, not UTF-8, or out of range.
#define KVMESH_ERR_INVALID -1

// The index refused the operation (e.g. an unknown engine, a malformed event batch).
#define KVMESH_ERR_INDEX -2

// The daemon could not be reached.
#define KVMESH_ERR_TRANSPORT -3

// The daemon refused the request.
#define KVMESH_ERR_REFUSED -4

// A Rust panic was caught at the boundary (a bug; the handle may be unusable).
#define KVMESH_ERR_PANIC -5

// A client of a `kvmesh serve` daemon's HTTP API.
typedef struct kvmesh_client kvmesh_client;

// A `kvmesh serve` daemon in this process.
typedef struct kvmesh_daemon kvmesh_daemon;

// kvindex in this process.
typedef struct kvmesh_index kvmesh_index;

// Engines' answers to one score request, best first.
typedef struct kvmesh_scores kvmesh_scores;

// One engine's answer to a score request. `name` belongs to the `kvmesh_scores` it came from.
typedef struct kvmesh_engine_score {
  const char *name;
  // Leading blocks of the prompt the engine holds on some tier.
  uint32_t matched_blocks;
  // `matched_blocks` times the engine's block size.
  uint32_t matched_tokens;
  // Of the matched blocks, how many are on each tier: GPU, CPU, storage, remote.
  uint32_t tiers[4];
  // Tier-weighted score; engines come sorted by it, best first.
  double score;
} kvmesh_engine_score;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// The message of the last failed call on this thread ("" if none); valid until the next failed
// call on this thread.
const char *kvmesh_last_error(void);

// The `KVMESH_ERR_*` code of the last failed call on this thread (`KVMESH_OK` if none); for
// functions that return a null handle on failure.
int32_t kvmesh_last_error_code(void);

// The library's version, e.g. "0.1.0".
const char *kvmesh_version(void);

// The number of engines in an answer (0 for null).
//
// # Safety
// `scores` is null or a live handle from a score function.
size_t kvmesh_scores_len(const struct kvmesh_scores *scores);

// Copies engine `i` of an answer into `*out`.
//
// # Safety
// `scores` is null or a live handle; `out` is null or writable.
int32_t kvmesh_scores_get(const struct kvmesh_scores *scores,
                          size_t i,
                          struct kvmesh_engine_score *out);

// Releases an answer (null is ignored).
//
// # Safety
// `scores` is null or a live handle, not used afterwards.
void kvmesh_scores_free(struct kvmesh_scores *scores);

// A new, empty index holding at most `byte_budget` bytes (0: the default, 1 GiB).
struct kvmesh_index *kvmesh_index_new(uint64_t byte_budget);

// Releases an index and stops its subscriptions (null is ignored).
//
// # Safety
// `index` is null or a live handle, not used afterwards.
void kvmesh_index_free(struct kvmesh_index *index);

// Subscribes to an engine's KV-event stream: `endpoint` is its ZMQ publisher
// (`tcp://HOST:PORT`), `replay_endpoint` its replay socket or null.
//
// # Safety
// `index` is null or live; strings are null or NUL-terminated.
int32_t kvmesh_index_subscribe(const struct kvmesh_index *index,
                               const char *name,
                               const char *model,
                               const char *endpoint,
                               const char *replay_endpoint);

// Applies one vLLM KV-event batch (the msgpack payload, frame 3 of vLLM's ZMQ message) to an
// engine, registering the engine on first use. For callers that receive events themselves.
//
// # Safety
// `index` is null or live; strings are null or NUL-terminated; `payload` points to `len`
// readable bytes (or is null with `len == 0`).
int32_t kvmesh_index_apply(const struct kvmesh_index *index,
                           const char *name,
                           const char *model,
                           const uint8_t *payload,
                           size_t len);

// Unsubscribes from an engine (if subscribed) and purges its blocks.
//
// # Safety
// `index` is null or live; `name` is null or NUL-terminated.
int32_t kvmesh_index_remove_engine(const struct kvmesh_index *index, const char *name);

// Scores a prompt's token ids: every engine holding a prefix of it, best first. `lora_name` and
// `cache_salt` may be null. Returns null on error.
//
// # Safety
// `index` is null or live; strings are null or NUL-terminated; `tokens` points to `n` readable
// ids (or is null with `n == 0`).
struct kvmesh_scores *kvmesh_index_score(const struct kvmesh_index *index,
                                         const char *model,
                                         const uint32_t *tokens,
                                         size_t n,
                                         const char *lora_name,
                                         const char *cache_salt);

// A client of the daemon at `url` (`http://HOST:PORT`); `token` is its bearer token or null.
// Connections are made per request, so this does not fail when the daemon is down.
//
// # Safety
// Strings are null or NUL-terminated.
struct kvmesh_client *kvmesh_client_new(const char *url, const char *token);

// Releases a client (null is ignored).
//
// # Safety
// `client` is null or a live handle, not used afterwards.
void kvmesh_client_free(struct kvmesh_client *client);

// Asks the daemon to score a prompt's token ids (as [`kvmesh_index_score`]). Returns null on
// error: `KVMESH_ERR_TRANSPORT` or `KVMESH_ERR_REFUSED` kinds are told by `kvmesh_last_error`.
//
// # Safety
// As for [`kvmesh_index_score`], with a live client.
struct kvmesh_scores *kvmesh_client_score(const struct kvmesh_client *client,
                                          const char *model,
                                          const uint32_t *tokens,
                                          size_t n,
                                          const char *lora_name,
                                          const char *cache_salt);

// Starts a daemon from a TOML configuration (the format `kvmesh serve --print-config` prints;
// "" for the defaults). Port 0 in `listen` or `grpc_listen` picks a free port; see
// [`kvmesh_daemon_http_url`]. Returns null on error.
//
// # Safety
// `config_toml` is null or NUL-terminated.
struct kvmesh_daemon *kvmesh_daemon_start(const char *config_toml);

// The daemon's HTTP API, e.g. "http://127.0.0.1:43121"; valid while the daemon runs.
//
// # Safety
// `daemon` is null or live.
const char *kvmesh_daemon_http_url(const struct kvmesh_daemon *daemon);

// Stops a daemon and releases it (null is ignored); writes its last snapshot if it has one.
//
// # Safety
// `daemon` is null or a live handle, not used afterwards.
int32_t kvmesh_daemon_stop(struct kvmesh_daemon *daemon);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* KVMESH_H */

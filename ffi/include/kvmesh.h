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

// The block store failed (I/O, a full or read-only disk, corrupt data, a Redis failure).
#define KVMESH_ERR_STORE -6

// A transfer or an agent failed (a dead, silent or unknown peer, a cancelled transfer, a backend
// that is not available).
#define KVMESH_ERR_TRANSFER -7

// Not finished yet: a wait that timed out, a post while the previous one is pending, a full
// write-behind queue. Retrying later may succeed.
#define KVMESH_ERR_BUSY -8

// A block held in host memory.
#define KVMESH_TIER_HOST 0

// A block held on the local disk tier.
#define KVMESH_TIER_DISK 1

// A block held on the remote (Redis) tier.
#define KVMESH_TIER_REMOTE 2

// Remote memory into local memory.
#define KVMESH_OP_READ 0

// Local memory into remote memory.
#define KVMESH_OP_WRITE 1

// The agent's choice: shared memory with an agent of the same host (when enabled), TCP
// otherwise.
#define KVMESH_BACKEND_DEFAULT 0

// TCP (works across hosts).
#define KVMESH_BACKEND_TCP 1

// Same-host shared memory (`process_vm_readv`/`process_vm_writev`).
#define KVMESH_BACKEND_SHM 2

// UCX (libucp >= 1.22 loaded at run time; both agents need `ucx`).
#define KVMESH_BACKEND_UCX 3

// GPU memory to GPU memory of another process on the same host (CUDA IPC; a build with the
// `cuda` feature).
#define KVMESH_BACKEND_CUDA_IPC 4

// Prepared, never posted.
#define KVMESH_XFER_IDLE 0

// Posted, not finished.
#define KVMESH_XFER_PENDING 1

// Every byte moved.
#define KVMESH_XFER_DONE 2

// Cancelled before completion: the destination's bytes are unspecified.
#define KVMESH_XFER_CANCELLED 3

// Failed (`kvmesh_last_error` says why): the destination's bytes are unspecified.
#define KVMESH_XFER_FAILED 4

// A transfer agent.
typedef struct kvmesh_agent kvmesh_agent;

// Page-aligned, zeroed host memory owned by kvmesh, for `kvmesh_agent_register_buffer`.
typedef struct kvmesh_buffer kvmesh_buffer;

// A client of a `kvmesh serve` daemon's HTTP API.
typedef struct kvmesh_client kvmesh_client;

// A `kvmesh serve` daemon in this process.
typedef struct kvmesh_daemon kvmesh_daemon;

// A list of host-memory descriptors.
typedef struct kvmesh_descs kvmesh_descs;

// kvindex in this process.
typedef struct kvmesh_index kvmesh_index;

// A notification received from a peer.
typedef struct kvmesh_notif kvmesh_notif;

// Engines' answers to one score request, best first.
typedef struct kvmesh_scores kvmesh_scores;

// A tiered block store.
typedef struct kvmesh_store kvmesh_store;

// A prepared transfer.
typedef struct kvmesh_xfer kvmesh_xfer;

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

// Settings of a store. Zero and null fields are absent tiers or defaults, so a zeroed struct
// with `block_bytes` and `host_bytes` set is a host-only store.
typedef struct kvmesh_store_config {
  // Bytes of one block; every block of a store has this size. Required.
  size_t block_bytes;
  // Host memory for blocks, in bytes (rounded down to whole blocks; at least one block).
  uint64_t host_bytes;
  // Directory of the disk tier (created if missing), or null for none. The tier recovers the
  // blocks a previous store left there.
  const char *disk_dir;
  // Bytes of blocks the disk tier may hold (at least one block when `disk_dir` is set).
  uint64_t disk_bytes;
  // `redis://HOST:PORT/DB` of a Redis tier searched after the disk, or null for none.
  const char *redis_url;
  // Evict by S3-FIFO instead of LRU (host and disk tiers).
  bool s3fifo;
  // Lock the host memory in RAM (`mlock`) when the process may (skipped otherwise).
  bool lock_memory;
} kvmesh_store_config;

// Counters of one tier, over the store's life.
typedef struct kvmesh_tier_stats {
  // Reads served.
  uint64_t hits;
  // Reads of blocks the tier did not hold.
  uint64_t misses;
  // Blocks written.
  uint64_t stores;
  // Writes skipped because the block was already there.
  uint64_t dedup;
  // Writes refused by the admission filter.
  uint64_t rejected;
  // Blocks evicted to make room.
  uint64_t evictions;
  // Failed operations (I/O, network, corruption).
  uint64_t errors;
  // Reads that failed verification (counted in `errors` too).
  uint64_t corrupt;
  uint64_t bytes_read;
  uint64_t bytes_written;
  // Blocks held now (0 where the tier cannot know, e.g. Redis).
  uint64_t blocks;
  // Blocks the tier can hold (0 where unbounded or unknown).
  uint64_t capacity_blocks;
  uint64_t used_bytes;
  uint64_t capacity_bytes;
  // Bytes read per nanosecond spent reading (= GB/s).
  double read_gbps;
  // Bytes written per nanosecond spent writing (= GB/s).
  double write_gbps;
} kvmesh_tier_stats;

// Every tier's counters and the write-behind pipeline's.
typedef struct kvmesh_store_stats {
  struct kvmesh_tier_stats host;
  // Whether the store has a disk tier (`disk` is zero otherwise).
  bool has_disk;
  struct kvmesh_tier_stats disk;
  // Whether the store has a Redis tier (`remote` is zero otherwise).
  bool has_remote;
  struct kvmesh_tier_stats remote;
  // Blocks queued for write-behind.
  uint64_t queued;
  // Blocks written down (all lower tiers tried).
  uint64_t written;
  // Write-behind failures (any tier).
  uint64_t write_errors;
  // Puts that waited for queue room.
  uint64_t backpressure_waits;
  // Gets served by another request's load of the same block.
  uint64_t coalesced;
  // Blocks loaded from a lower tier into host memory.
  uint64_t promotions;
  // Prefetches skipped at their deadline.
  uint64_t deadline_missed;
  // Blocks in the write-behind queue now.
  uint64_t in_queue;
} kvmesh_store_stats;

// Settings of an agent. Null and zero fields take the defaults.
typedef struct kvmesh_agent_config {
  // The agent's name, unique among the agents that talk to each other. Required.
  const char *name;
  // `IP:PORT` of the agent's TCP listener (side channel and TCP backend); null:
  // `127.0.0.1:0` (a free port, see `kvmesh_agent_listen_addr`).
  const char *listen;
  // The IP address peers should use when it differs from the bound one (needed when
  // listening on 0.0.0.0), or null.
  const char *advertise;
  // A peer that makes no progress for this long fails every transfer in flight on it
  // (milliseconds; 0: 10000).
  uint32_t timeout_ms;
  // Threads of the agent's network runtime (0: 2; at most 1024).
  uint32_t threads;
  // Enables the same-host shared-memory backend.
  bool shm;
  // Enables the UCX backend (fails when libucp >= 1.22 cannot be loaded).
  bool ucx;
} kvmesh_agent_config;

// One contiguous piece of host memory: address and length in bytes.
typedef struct kvmesh_desc {
  uint64_t addr;
  uint64_t len;
} kvmesh_desc;

// Statistics of a transfer's last post.
typedef struct kvmesh_xfer_stats {
  // The backend that moves it, a `KVMESH_BACKEND_*` (never `DEFAULT`).
  int32_t backend;
  // `KVMESH_OP_READ` or `KVMESH_OP_WRITE`.
  int32_t op;
  // Bytes moved by one post.
  uint64_t bytes;
  // Descriptors after merging neighbours contiguous on both sides.
  uint64_t descs;
  // How many times the transfer was posted.
  uint64_t posts;
  // From the last post to its completion (0 while pending).
  uint64_t duration_ns;
} kvmesh_xfer_stats;

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

// A new store; the disk tier, if any, recovers its blocks first. Returns null on error
// (`KVMESH_ERR_INVALID` for a bad configuration, `KVMESH_ERR_STORE` when a tier cannot be
// opened, e.g. a disk tier of another block size).
//
// # Safety
// `config` is null or points to a readable config whose strings are null or NUL-terminated.
struct kvmesh_store *kvmesh_store_new(const struct kvmesh_store_config *config);

// Releases a store (null is ignored) after writing every queued block down to its lower tiers.
//
// # Safety
// `store` is null or a live handle, not used afterwards (nor during the call by another thread).
void kvmesh_store_free(struct kvmesh_store *store);

// Bytes of one block of the store (0 for null).
//
// # Safety
// `store` is null or live.
size_t kvmesh_store_block_bytes(const struct kvmesh_store *store);

// Stores a block of exactly `kvmesh_store_block_bytes` bytes under `key`: into host memory now
// (evicting the coldest unpinned blocks if needed), to the disk and Redis tiers in the
// background. Waits while the write-behind queue is full. A key already held is left as it is.
//
// # Safety
// `store` is null or live; `data` points to `len` readable bytes (or is null with `len == 0`).
int32_t kvmesh_store_put(const struct kvmesh_store *store,
                         uint64_t key,
                         const uint8_t *data,
                         size_t len);

// Like `kvmesh_store_put`, but fails with `KVMESH_ERR_BUSY` instead of waiting when the
// write-behind queue (or host memory, all pinned by queued blocks) is full; the block may then
// be in host memory only.
//
// # Safety
// As for `kvmesh_store_put`.
int32_t kvmesh_store_try_put(const struct kvmesh_store *store,
                             uint64_t key,
                             const uint8_t *data,
                             size_t len);

// Copies the block under `key` from the fastest tier holding it into `out` (exactly
// `kvmesh_store_block_bytes` bytes); a block found below host memory is promoted to it.
// Returns 1 when found (and writes its tier, a `KVMESH_TIER_*`, to `tier` unless null), 0 when
// no tier holds it, or a negative `KVMESH_ERR_*`. A block that fails verification is an error,
// never returned.
//
// # Safety
// `store` is null or live; `out` points to `len` writable bytes (or is null with `len == 0`);
// `tier` is null or writable.
int32_t kvmesh_store_get(const struct kvmesh_store *store,
                         uint64_t key,
                         uint8_t *out,
                         size_t len,
                         int32_t *tier);

// How many leading blocks of `keys` the store holds, without reading them: writes the count to
// `*held` and the tier (`KVMESH_TIER_*`) of each of those blocks to `tiers` (up to `tiers_len`
// entries; `tiers` may be null with `tiers_len == 0`). Redis is asked (one round trip per
// block) only when `remote` is set.
//
// # Safety
// `store` is null or live; `keys` points to `n` readable keys (or is null with `n == 0`);
// `tiers` points to `tiers_len` writable entries (or is null with `tiers_len == 0`); `held` is
// null or writable.
int32_t kvmesh_store_lookup(const struct kvmesh_store *store,
                            const uint64_t *keys,
                            size_t n,
                            bool remote,
                            int32_t *tiers,
                            size_t tiers_len,
                            size_t *held);

// Removes the block under `key` from every tier (after the queued write-behind work, so a
// removed block does not come back). Returns 1 when some tier held it, 0 when none did, or a
// negative `KVMESH_ERR_*` (`KVMESH_ERR_BUSY` while another thread is reading the block).
//
// # Safety
// `store` is null or live.
int32_t kvmesh_store_remove(const struct kvmesh_store *store, uint64_t key);

// Waits until every queued block has been written down to the lower tiers (or failed; failures
// are counted in the stats' `write_errors`).
//
// # Safety
// `store` is null or live.
int32_t kvmesh_store_flush(const struct kvmesh_store *store);

// Copies the store's statistics into `*out`.
//
// # Safety
// `store` is null or live; `out` is null or writable.
int32_t kvmesh_store_get_stats(const struct kvmesh_store *store, struct kvmesh_store_stats *out);

// The kvmesh block keys of a prompt: one per full block of `block_size` tokens, each chained
// over every block before it and seeded by the namespace (`model`; `lora_name` and `cache_salt`
// may be null), the keys kvindex and kvstore use. Writes `n / block_size` keys to `keys` (which
// has room for `keys_len`) and their number to `*written`; when `keys_len` is too small,
// nothing is written but `*written` (the number needed) and the call fails.
//
// # Safety
// Strings are null or NUL-terminated; `tokens` points to `n` readable ids (or is null with
// `n == 0`); `keys` points to `keys_len` writable keys (or is null with `keys_len == 0`);
// `written` is null or writable.
int32_t kvmesh_block_keys(const char *model,
                          const char *lora_name,
                          const char *cache_salt,
                          const uint32_t *tokens,
                          size_t n,
                          size_t block_size,
                          uint64_t *keys,
                          size_t keys_len,
                          size_t *written);

// A new agent, listening at once. Returns null on error.
//
// # Safety
// `config` is null or points to a readable config whose strings are null or NUL-terminated.
struct kvmesh_agent *kvmesh_agent_new(const struct kvmesh_agent_config *config);

// Releases an agent (null is ignored); transfers still in flight on it fail.
//
// # Safety
// `agent` is null or a live handle, not used afterwards.
void kvmesh_agent_free(struct kvmesh_agent *agent);

// Where the agent listens, `IP:PORT` (for a peer's `kvmesh_agent_connect`); valid while the
// agent lives. Null on error.
//
// # Safety
// `agent` is null or live.
const char *kvmesh_agent_listen_addr(const struct kvmesh_agent *agent);

// Registers `len` bytes of the caller's memory at `addr` with the agent; writes the region's id
// to `*region` unless null.
//
// # Safety
// `agent` is null or live; `region` is null or writable; `[addr, addr + len)` is readable and
// writable memory of this process that stays valid until it is deregistered (or the agent is
// freed) and no transfer touches it any more: peers read and write it at any time in between.
int32_t kvmesh_agent_register(const struct kvmesh_agent *agent,
                              void *addr,
                              size_t len,
                              uint32_t *region);

// Registers a `kvmesh_buffer` (kept alive while registered, even once the caller freed its
// handle); writes the region's id to `*region` unless null.
//
// # Safety
// `agent` and `buffer` are null or live; `region` is null or writable.
int32_t kvmesh_agent_register_buffer(const struct kvmesh_agent *agent,
                                     const struct kvmesh_buffer *buffer,
                                     uint32_t *region);

// Deregisters a region. Peers should load the agent's metadata again.
//
// # Safety
// `agent` is null or live.
int32_t kvmesh_agent_deregister(const struct kvmesh_agent *agent, uint32_t region);

// Copies the agent's metadata (a versioned blob for peers' `kvmesh_agent_load_remote`) into
// `out` and its length to `*len`. With `out` null and `cap` 0 it only writes the length; a
// `cap` too small fails with `KVMESH_ERR_INVALID` after writing the length needed. Export it
// again after registering or deregistering memory.
//
// # Safety
// `agent` is null or live; `out` points to `cap` writable bytes (or is null with `cap == 0`);
// `len` is null or writable.
int32_t kvmesh_agent_export_metadata(const struct kvmesh_agent *agent,
                                     uint8_t *out,
                                     size_t cap,
                                     size_t *len);

// Loads (or replaces) a peer's metadata blob, from its `kvmesh_agent_export_metadata`. Writes
// the peer's name, NUL-terminated, to `name` (room for `name_cap` bytes) unless it is null.
//
// # Safety
// `agent` is null or live; `blob` points to `len` readable bytes; `name` is null or points to
// `name_cap` writable bytes.
int32_t kvmesh_agent_load_remote(const struct kvmesh_agent *agent,
                                 const uint8_t *blob,
                                 size_t len,
                                 char *name,
                                 size_t name_cap);

// Fetches a peer's metadata over its side channel at `addr` (`HOST:PORT`, its
// `kvmesh_agent_listen_addr`) and loads it; writes the peer's name as
// `kvmesh_agent_load_remote` does. Fails with `KVMESH_ERR_TRANSFER` when nobody answers
// within the agent's timeout.
//
// # Safety
// `agent` is null or live; `addr` is null or NUL-terminated; `name` is null or points to
// `name_cap` writable bytes.
int32_t kvmesh_agent_connect(const struct kvmesh_agent *agent,
                             const char *addr,
                             char *name,
                             size_t name_cap);

// Forgets a peer and closes the connection to it. Returns 1 if it was known, 0 if not.
//
// # Safety
// `agent` is null or live; `name` is null or NUL-terminated.
int32_t kvmesh_agent_remove_remote(const struct kvmesh_agent *agent, const char *name);

// Sends a notification on its own (no transfer) to a loaded peer, over TCP.
//
// # Safety
// `agent` is null or live; `remote` is null or NUL-terminated; `msg` points to `len` readable
// bytes (or is null with `len == 0`).
int32_t kvmesh_agent_send_notif(const struct kvmesh_agent *agent,
                                const char *remote,
                                const uint8_t *msg,
                                size_t len);

// Takes the oldest notification received, waiting up to `timeout_ms` milliseconds for one (0:
// do not wait). Returns 1 and writes a new `kvmesh_notif` to `*out` (free it with
// `kvmesh_notif_free`), or returns 0 and writes null when none came.
//
// # Safety
// `agent` is null or live; `out` is null or writable.
int32_t kvmesh_agent_wait_notif(const struct kvmesh_agent *agent,
                                uint32_t timeout_ms,
                                struct kvmesh_notif **out);

// The name of the agent that sent a notification ("" for null); valid while `notif` lives.
//
// # Safety
// `notif` is null or live.
const char *kvmesh_notif_from(const struct kvmesh_notif *notif);

// The bytes of a notification, and their number in `*len` (unless null); valid while `notif`
// lives. Null (and 0) for null.
//
// # Safety
// `notif` is null or live; `len` is null or writable.
const uint8_t *kvmesh_notif_msg(const struct kvmesh_notif *notif, size_t *len);

// Releases a notification (null is ignored).
//
// # Safety
// `notif` is null or a live handle, not used afterwards.
void kvmesh_notif_free(struct kvmesh_notif *notif);

// A new zeroed buffer of `len` bytes (at least 1). Returns null on error.
struct kvmesh_buffer *kvmesh_buffer_new(size_t len);

// The buffer's first byte (null for null). Peers may read and write the buffer while it is
// registered: read it after the transfer or notification that filled it.
//
// # Safety
// `buffer` is null or live.
uint8_t *kvmesh_buffer_data(const struct kvmesh_buffer *buffer);

// The buffer's length in bytes (0 for null).
//
// # Safety
// `buffer` is null or live.
size_t kvmesh_buffer_len(const struct kvmesh_buffer *buffer);

// Releases the caller's handle of a buffer (null is ignored); the memory lives on while an
// agent has it registered.
//
// # Safety
// `buffer` is null or a live handle, not used afterwards (nor its data pointer, unless the
// buffer is still registered).
void kvmesh_buffer_free(struct kvmesh_buffer *buffer);

// A descriptor list of the `n` descriptors of `descs`, in order. They are checked against the
// registered regions by `kvmesh_agent_prepare`. Returns null on error.
//
// # Safety
// `descs` points to `n` readable descriptors (or is null with `n == 0`).
struct kvmesh_descs *kvmesh_descs_new(const struct kvmesh_desc *descs, size_t n);

// A descriptor list of `n` blocks of `block_len` bytes each, block `i` at `addrs[i]` (a
// scheduler's list of KV blocks). Returns null on error.
//
// # Safety
// `addrs` points to `n` readable addresses (or is null with `n == 0`).
struct kvmesh_descs *kvmesh_descs_new_blocks(const uint64_t *addrs, size_t n, uint64_t block_len);

// The number of descriptors of a list (0 for null).
//
// # Safety
// `descs` is null or live.
size_t kvmesh_descs_len(const struct kvmesh_descs *descs);

// Releases a descriptor list (null is ignored). Transfers prepared from it keep their own copy.
//
// # Safety
// `descs` is null or a live handle, not used afterwards.
void kvmesh_descs_free(struct kvmesh_descs *descs);

// Prepares a transfer (`KVMESH_OP_READ` or `KVMESH_OP_WRITE`) between `local` (memory this
// agent registered) and `remote_descs` (memory the loaded peer `remote` registered), pairwise:
// both lists have as many descriptors, of equal lengths. `backend` is a `KVMESH_BACKEND_*`.
// Every descriptor is checked against both sides' regions now. Returns null on error
// (`KVMESH_ERR_INVALID` for bad lists, `KVMESH_ERR_TRANSFER` for an unknown peer or a backend
// that is not available).
//
// # Safety
// `agent`, `local` and `remote_descs` are null or live; `remote` is null or NUL-terminated.
struct kvmesh_xfer *kvmesh_agent_prepare(const struct kvmesh_agent *agent,
                                         int32_t op,
                                         const struct kvmesh_descs *local,
                                         const char *remote,
                                         const struct kvmesh_descs *remote_descs,
                                         int32_t backend);

// Releases a transfer (null is ignored). A pending one runs on in the background: keep its
// memory valid until it could have finished (the agent's timeout).
//
// # Safety
// `xfer` is null or a live handle, not used afterwards.
void kvmesh_xfer_free(struct kvmesh_xfer *xfer);

// Starts the transfer. `notif` (`len` bytes), if not null, is delivered to the peer once the
// data is visible there (for a READ: once it has been read); null sends none. Fails with
// `KVMESH_ERR_BUSY` while the previous post is pending.
//
// # Safety
// `xfer` is null or live; `notif` is null or points to `len` readable bytes.
int32_t kvmesh_xfer_post(const struct kvmesh_xfer *xfer, const uint8_t *notif, size_t len);

// The transfer's state, a `KVMESH_XFER_*`, without waiting (negative for a null handle). For
// `KVMESH_XFER_FAILED`, `kvmesh_last_error` says why.
//
// # Safety
// `xfer` is null or live.
int32_t kvmesh_xfer_status(const struct kvmesh_xfer *xfer);

// Waits up to `timeout_ms` milliseconds for the current post to finish. Returns `KVMESH_OK`
// when every byte moved, `KVMESH_ERR_BUSY` when it is still pending (it goes on),
// `KVMESH_ERR_TRANSFER` when it failed or was cancelled, `KVMESH_ERR_INVALID` when it was never
// posted.
//
// # Safety
// `xfer` is null or live.
int32_t kvmesh_xfer_wait(const struct kvmesh_xfer *xfer, uint32_t timeout_ms);

// Asks the backend to stop the current post; it ends cancelled (or done, if it finished
// first) once the backend no longer touches its memory: wait for it.
//
// # Safety
// `xfer` is null or live.
int32_t kvmesh_xfer_cancel(const struct kvmesh_xfer *xfer);

// Copies a transfer's statistics into `*out`.
//
// # Safety
// `xfer` is null or live; `out` is null or writable.
int32_t kvmesh_xfer_get_stats(const struct kvmesh_xfer *xfer, struct kvmesh_xfer_stats *out);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* KVMESH_H */

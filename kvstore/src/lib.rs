//! kvstore: a tiered store of KV-cache blocks (host memory, local disk, Redis, peer nodes).
//!
//! When an inference engine evicts a prefix from its GPU cache, kvstore keeps the blocks one tier
//! down so the next request reloads them instead of recomputing them, and announces them as vLLM
//! KV events so a router (kvindex, llm-d) sees where they are.
//!
//! * [`host`]: a preallocated, page-aligned arena of fixed-size slots (huge pages and `mlock`
//!   when available), O(1) allocation, LRU or S3-FIFO eviction ([`policy`]), dedup by key, pins;
//! * [`disk`]: O_DIRECT slots in one file plus an rkyv header table, crash-safe recovery,
//!   an admission filter;
//! * [`remote`]: Redis and peer kvstore nodes over TCP, with timeouts, retries, checksums, and
//!   failures that fail closed;
//! * [`store`]: the [`TieredStore`] pipeline: write-behind with bounded queues and
//!   backpressure, prefetch with deadlines, single-flight loads, prefix lookups without loading;
//! * [`events`]: every store and eviction as a vLLM `BlockStored`/`BlockRemoved` event
//!   (medium `CPU` or `STORAGE`), optionally published over ZMQ;
//! * [`stats`]: per-tier counters.
//!
//! Every type is `Send + Sync` and every call is blocking unless its name ends in `_async`, so
//! the store can be driven from C and Python (through the crate's `ffi` and `python` wrappers)
//! as well as from async Rust.
//!
//! ## Blocks and keys
//!
//! A block is addressed by its [`kvindex::BlockKey`]: a chain hash over the tokens of the block
//! and of all blocks before it, seeded by the [`kvindex::Namespace`] (model, LoRA adapter, cache
//! salt). Two tenants or two models therefore never share a block. Every block of one store has
//! the same size, `block_bytes`, fixed at creation.
//!
//! ## How a vLLM KV layout maps to block bytes
//!
//! One kvstore block holds **every layer's K and V for one vLLM block** (one engine, one
//! tensor-parallel rank) in one fixed order: layer-major, each layer's page copied as the
//! engine lays it out. With `L` layers, `H` KV heads (this rank's), `N` tokens per block, head
//! sizes `D` (K) and `Dv` (V) and a cache dtype of `s` bytes, vLLM 0.32's page per layer and block
//! is `page = H × N × (D + Dv) × s` bytes and
//!
//! ```text
//! block_bytes = L × page            block = [ layer 0 page | layer 1 page | ... | layer L-1 page ]
//! ```
//!
//! Inside a page the bytes are exactly the engine's, so a copy engine moves pages without
//! reshaping them:
//!
//! * `LBHNC` (`HND`; the CPU backend's only layout, NIXL's choice on CUDA): per head, `N` tokens;
//!   the CPU backend stores **K for the `N` tokens, then V for the `N` tokens** inside each
//!   `(block, head)` slab (`[B, H, 2N, D]` view).
//! * `LBNHC` (`NHD`, CUDA FlashAttention's default): per token, per head, `[K(D) | V(Dv)]`.
//!
//! Layer-outer layouts (`L…`) give page `(l, b)` at `offset + l × num_blocks × page + b × page`
//! in vLLM's backing buffer, so gathering a block is `L` copies of `page` bytes (what the
//! OffloadingConnector calls one opaque byte row per layer). Block-outer layouts (`B…`) already
//! hold a block's layers contiguously: one copy of `block_bytes`. Because the layout changes the
//! bytes, the layout and the dtype belong to the store's identity: engines with different
//! layouts, dtypes or tensor-parallel ranks must use different namespaces (for example a
//! distinct `model` string per rank and layout), never the same store keys.
//!
//! Example: Llama-3-8B (L = 32, H = 8, D = Dv = 128, bf16) at vLLM's CUDA block of 16 tokens:
//! page = 8 × 16 × 256 × 2 = 64 KiB, block = 2 MiB; on the CPU backend (block of 128 tokens),
//! page = 512 KiB and block = 16 MiB.
//!
//! ```
//! use kvstore::{HostConfig, HostTier};
//! use kvindex::{KeyHasher, Namespace};
//! let host = HostTier::new(&HostConfig::new(1 << 20, 64 << 10))?;
//! let tokens: Vec<u32> = (0..32).collect();
//! let keys = KeyHasher::new().chain(&Namespace::model("m"), &tokens, 16);
//! host.put(keys[0], &vec![7u8; 64 << 10])?;
//! assert_eq!(host.get(keys[0]).unwrap()[0], 7);
//! # Ok::<(), kvstore::StoreError>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

/// The CUDA copy engine (feature `cuda`): gathers vLLM's GPU KV blocks into host slots and
/// scatters them back.
#[cfg(feature = "cuda")]
pub use kvstore_cuda as cuda;
pub mod disk;
pub mod error;
pub mod events;
pub mod host;
pub mod policy;
pub mod remote;
mod staging;
pub mod stats;
pub mod store;

pub use disk::{Admission, BlockHeader, DirectIo, DiskConfig, DiskPut, DiskTier, Recovery};
pub use error::{Result, StoreError};
pub use events::{BlockMeta, TierEvents};
pub use host::{ArenaInfo, GpuPin, HostBlock, HostConfig, HostPut, HostTier, HugePages};
pub use kvindex::BlockKey;
pub use policy::PolicyKind;
pub use remote::{
    BlockSource, PeerConfig, PeerServer, PeerTier, RedisConfig, RedisTier, RemoteConfig, RemoteTier,
};
pub use stats::{TierCounters, TierStats};
pub use store::{
    Lookup, PipelineStats, Prefetch, Prefetched, StoreConfig, StoreStats, TierKind, TieredStore,
};

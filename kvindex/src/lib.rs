//! kvindex: a global index of which engine holds which KV blocks, on which tier.
//!
//! A scheduler in front of many vLLM engines asks it, for a prompt, how long a prefix each engine
//! already holds. The pieces:
//!
//! * [`key`]: kvmesh's own block identity, 64-bit XXH3 chains over token ids with the namespace
//!   (model, LoRA adapter, cache salt, multimodal items) folded in;
//! * [`vllm_hash`]: vLLM's own block hashes (`sha256_cbor`, `xxhash_cbor`, `sha256`, `xxhash`),
//!   bit-exact with vLLM 0.32, so clients may ask by vLLM hash;
//! * [`event`] and [`codec`]: vLLM's KV-event batches and their msgpack wire forms (tagged maps
//!   and legacy arrays), decoded without panics on any input;
//! * [`index`]: the in-memory [`Index`] (lock-free queries, one writer at a time, a byte budget)
//!   on top of [`table`]; [`redis_backend`] keeps the same contract ([`IndexBackend`]) on Redis;
//! * [`ingest`]: ZMQ subscriptions to engines with sequence tracking, replay, restart and
//!   disconnect handling, and orphan recovery; [`publish`]: the same protocol's publishing side;
//! * [`trace`]: workloads from Mooncake-format request traces, for benchmarks and the demo.
//!
//! ```
//! use kvindex::{EngineSpec, Index, KeyHasher, Namespace, Query, QueryBlocks};
//! let index = Index::default();
//! let id = index.add_engine(EngineSpec { pod: "pod-a".into(), dp_rank: 0, model: "m".into() })?;
//! // Events from the engine would be applied with `index.apply(id, &batch)`.
//! let tokens: Vec<u32> = (0..64).collect();
//! let ns = Namespace::model("m");
//! let q = Query { namespace: &ns, blocks: QueryBlocks::Tokens { tokens: &tokens, mm: &[] }, engines: None };
//! assert!(index.query(&q).is_empty());
//! # let _ = (id, KeyHasher::new());
//! # Ok::<(), kvindex::IndexError>(())
//! ```
#![deny(unsafe_code)]

pub mod backend;
pub mod codec;
pub mod error;
pub mod event;
pub mod index;
#[cfg(feature = "zmq")]
pub mod ingest;
pub mod key;
mod name;
#[cfg(feature = "zmq")]
pub mod publish;
#[cfg(feature = "redis")]
pub mod redis_backend;
pub mod snapshot;
pub mod table;
pub mod trace;
pub mod vllm_hash;

pub use backend::IndexBackend;
pub use error::{ErrorKind, IndexError, Result};
pub use event::{BlockRemoved, BlockStored, EngineHash, EventBatch, ExtraKey, KvEvent, Medium};
pub use index::{
    ApplyReport, EngineId, EngineMatch, EngineSpec, EngineStats, Index, IndexConfig, IndexStats,
    Query, QueryBlocks, Tier,
};
pub use key::{BlockKey, KeyHasher, MmItem, Namespace};
pub use name::EngineName;
#[cfg(feature = "redis")]
pub use redis_backend::RedisIndex;

//! kvindex: a global index of which engine holds which KV blocks, on which tier.
//!
//! (Model documentation is completed in `index.rs`; this header is expanded once all modules land.)
#![deny(unsafe_code)]

pub mod backend;
pub mod codec;
pub mod error;
pub mod event;
pub mod index;
#[cfg(feature = "zmq")]
pub mod ingest;
pub mod key;
#[cfg(feature = "zmq")]
pub mod publish;
#[cfg(feature = "redis")]
pub mod redis_backend;
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
#[cfg(feature = "redis")]
pub use redis_backend::RedisIndex;

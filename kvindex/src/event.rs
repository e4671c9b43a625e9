//! vLLM KV-event batches as plain Rust values.
//!
//! These types mirror `vllm/distributed/kv_events.py` (vLLM 0.32): an [`EventBatch`] is what one
//! ZMQ message carries. Decoding and encoding of the msgpack wire form live in [`crate::codec`].

/// A block hash as the engine publishes it, an opaque 64-bit id.
///
/// vLLM sends either an int (the last 8 bytes of the digest, big-endian) or the whole digest as
/// `bin`; both map to the same value: the last 8 bytes read big-endian (shorter byte strings are
/// left-padded with zeros), exactly like vLLM's `int.from_bytes(digest, "big") & (2**64 - 1)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EngineHash(pub u64);

impl EngineHash {
    /// The engine hash of a digest given as bytes (vLLM's `maybe_convert_block_hash`).
    pub fn from_digest(bytes: &[u8]) -> Self {
        let tail = &bytes[bytes.len().saturating_sub(8)..];
        let mut v = 0u64;
        for &b in tail {
            v = (v << 8) | u64::from(b);
        }
        EngineHash(v)
    }
}

/// The storage medium named by an event (`medium`, refined by `locality`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Medium {
    /// `"GPU"` (also what the CPU build of vLLM reports for its own KV cache).
    Gpu,
    /// `"CPU"`: host-memory offload tier.
    Cpu,
    /// `"STORAGE"`: disk or file-system tier.
    Storage,
    /// Any other string, kept verbatim.
    Other(String),
}

impl Medium {
    /// Parses vLLM's medium string (case-insensitive for the known names).
    pub fn parse(s: &str) -> Self {
        if s.eq_ignore_ascii_case("GPU") {
            Medium::Gpu
        } else if s.eq_ignore_ascii_case("CPU") {
            Medium::Cpu
        } else if s.eq_ignore_ascii_case("STORAGE") || s.eq_ignore_ascii_case("DISK") {
            Medium::Storage
        } else {
            Medium::Other(s.to_owned())
        }
    }

    /// The string vLLM uses for this medium.
    pub fn as_str(&self) -> &str {
        match self {
            Medium::Gpu => "GPU",
            Medium::Cpu => "CPU",
            Medium::Storage => "STORAGE",
            Medium::Other(s) => s,
        }
    }
}

/// One element of an event's per-block `extra_keys` list, as vLLM publishes it (untagged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtraKey {
    /// A bare string: the LoRA name, or the cache salt (first block only).
    Str(String),
    /// A multimodal item: `[identifier, offset of the item relative to the block start]`.
    Mm { identifier: String, offset: i64 },
    /// Raw bytes: the digest of a block's prompt embeddings.
    Bytes(Vec<u8>),
    /// An integer (older vLLM versions published `lora_int_id` here).
    Int(i64),
    /// Anything else, kept as its msgpack bytes so nothing is lost.
    Other(Vec<u8>),
}

/// `BlockStored`: new full blocks entered an engine's cache (or an offload tier).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockStored {
    pub block_hashes: Vec<EngineHash>,
    pub parent_block_hash: Option<EngineHash>,
    /// Token ids of all the blocks, concatenated; empty in placeholder tier events.
    pub token_ids: Vec<u32>,
    /// Tokens per block (0 in placeholder tier events).
    pub block_size: u32,
    pub lora_id: Option<i64>,
    pub medium: Option<Medium>,
    pub lora_name: Option<String>,
    /// Per block: that block's untagged extra keys, or `None`.
    pub extra_keys: Option<Vec<Option<Vec<ExtraKey>>>>,
    pub group_idx: Option<i64>,
    pub kv_cache_spec_kind: Option<String>,
    pub kv_cache_spec_sliding_window: Option<i64>,
    pub locality: Option<String>,
    pub ownership: Option<String>,
    pub session_id: Option<String>,
}

/// `BlockRemoved`: blocks left an engine's cache (vLLM sends one hash per event).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockRemoved {
    pub block_hashes: Vec<EngineHash>,
    pub medium: Option<Medium>,
    pub group_idx: Option<i64>,
    pub locality: Option<String>,
    pub ownership: Option<String>,
}

/// One event of a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum KvEvent {
    BlockStored(BlockStored),
    BlockRemoved(BlockRemoved),
    /// `AllBlocksCleared`: the engine's prefix cache was reset.
    AllBlocksCleared,
}

/// One published batch: `[ts, [events...], data_parallel_rank]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventBatch {
    /// Publisher's `time.time()` in seconds.
    pub ts: f64,
    pub events: Vec<KvEvent>,
    pub data_parallel_rank: Option<i64>,
}

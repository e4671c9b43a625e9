//! Workloads from request traces, for benchmarks and the demo.
//!
//! A trace in the Mooncake JSONL format (`{"timestamp", "input_length", "output_length",
//! "hash_ids"}` per line, each hash id naming a 512-token prefix block) is expanded into token ids
//! at any block size: sub-block `j` of hash id `h` gets tokens derived from `(h, j)` only, so equal
//! hash ids give equal token blocks and therefore shared chains. [`LruEngine`] simulates one
//! engine's prefix cache (an LRU of fixed capacity that evicts leaves first, as vLLM's free queue
//! does) and produces the vLLM event batches a real engine would publish for each request.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::Deserialize;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::event::{BlockRemoved, BlockStored, EngineHash, EventBatch, KvEvent, Medium};
use crate::{IndexError, Result};

/// Tokens per trace hash id in the Mooncake traces.
pub const TRACE_BLOCK_TOKENS: usize = 512;

/// One request of a trace.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct TraceRequest {
    /// Milliseconds since the start of the trace.
    pub timestamp: u64,
    pub input_length: usize,
    pub output_length: usize,
    pub hash_ids: Vec<u64>,
}

/// Reads a Mooncake JSONL trace. Blank lines are skipped; a malformed line is an error naming it.
pub fn load_trace(path: &Path, limit: Option<usize>) -> Result<Vec<TraceRequest>> {
    let f = std::fs::File::open(path).map_err(|e| {
        IndexError::InvalidArgument(format!("cannot open trace {}: {e}", path.display()))
    })?;
    let mut out = Vec::new();
    for (n, line) in BufReader::new(f).lines().enumerate() {
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        let line =
            line.map_err(|e| IndexError::InvalidArgument(format!("{}: {e}", path.display())))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: TraceRequest = serde_json::from_str(&line).map_err(|e| {
            IndexError::InvalidArgument(format!("{} line {}: {e}", path.display(), n + 1))
        })?;
        out.push(r);
    }
    Ok(out)
}

/// The token ids of a request's prompt, as full blocks of `block_size` (a divisor of 512).
pub fn prompt_tokens(req: &TraceRequest, block_size: usize) -> Vec<u32> {
    let per_id = TRACE_BLOCK_TOKENS / block_size;
    let blocks = (req.input_length / block_size).min(req.hash_ids.len() * per_id);
    let mut out = Vec::with_capacity(blocks * block_size);
    for b in 0..blocks {
        let (h, j) = (req.hash_ids[b / per_id], (b % per_id) as u64);
        let seed = (h << 8) ^ j ^ ((block_size as u64) << 56);
        for t in 0..block_size as u64 {
            // Ids below 32000, like a real vocabulary; equal (h, j, t) give equal tokens.
            out.push((xxh3_64_with_seed(&t.to_le_bytes(), seed) % 32_000) as u32);
        }
    }
    out
}

/// How a simulated engine names its blocks (its own "vLLM hash"): parent hash and block tokens.
pub type EngineHashFn = dyn Fn(Option<u64>, &[u32]) -> u64 + Send + Sync;

/// A default engine hash: an XXH3 chain with its own seed (stands in for vLLM's sha256).
pub fn default_engine_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut buf = Vec::with_capacity(tokens.len() * 4);
    for t in tokens {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_64_with_seed(&buf, parent.unwrap_or(0x005e_ed0f_e11e))
}

/// One engine's prefix cache: an LRU of `capacity` blocks.
pub struct LruEngine {
    capacity: usize,
    block_size: usize,
    tick: u64,
    /// Engine hash → last use.
    last_use: HashMap<u64, u64>,
    /// Last use → engine hash (eviction order).
    order: BTreeMap<u64, u64>,
}

/// What one request did to an engine.
#[derive(Clone, Debug, Default)]
pub struct StepOutcome {
    /// Blocks of the prompt found in the cache (consecutive from block 0).
    pub hit_blocks: usize,
    /// Full blocks in the prompt.
    pub prompt_blocks: usize,
    /// The batch the engine publishes (empty events when nothing changed).
    pub batch: EventBatch,
}

impl LruEngine {
    /// An empty cache of `capacity` blocks of `block_size` tokens.
    pub fn new(capacity: usize, block_size: usize) -> Self {
        LruEngine {
            capacity,
            block_size,
            tick: 0,
            last_use: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.last_use.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.last_use.is_empty()
    }

    /// The engine hashes of the blocks held.
    pub fn held(&self) -> impl Iterator<Item = u64> + '_ {
        self.last_use.keys().copied()
    }

    /// How many leading blocks of `hashes` the cache holds.
    pub fn cached_prefix(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.last_use.contains_key(h))
            .count()
    }

    fn touch(&mut self, h: u64) {
        self.tick += 1;
        if let Some(old) = self.last_use.insert(h, self.tick) {
            self.order.remove(&old);
        }
        self.order.insert(self.tick, h);
    }

    /// Serves a prompt: hits its cached prefix, stores the rest, evicting least recently used
    /// blocks (leaves first: a request's blocks are touched last-to-first). `hashes` are the
    /// prompt's block hashes under this engine's hash function.
    pub fn serve(&mut self, tokens: &[u32], hashes: &[u64], ts: f64) -> StepOutcome {
        let n = hashes.len();
        let hit = self.cached_prefix(hashes);
        let mut events = Vec::new();
        let new = n - hit;
        let mut removed = Vec::new();
        // Evict what the new blocks need, never this request's own prefix.
        let protected: std::collections::HashSet<u64> = hashes[..hit].iter().copied().collect();
        while self.last_use.len() + new > self.capacity {
            let victim = self
                .order
                .iter()
                .map(|(&t, &h)| (t, h))
                .find(|(_, h)| !protected.contains(h));
            let Some((t, h)) = victim else { break };
            self.order.remove(&t);
            self.last_use.remove(&h);
            removed.push(h);
        }
        for h in removed {
            events.push(KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![EngineHash(h)],
                medium: Some(Medium::Gpu),
                group_idx: Some(0),
                ..Default::default()
            }));
        }
        let room = self.capacity.saturating_sub(self.last_use.len());
        let stored = new.min(room);
        if stored > 0 {
            let bs = self.block_size;
            events.push(KvEvent::BlockStored(BlockStored {
                block_hashes: hashes[hit..hit + stored]
                    .iter()
                    .map(|&h| EngineHash(h))
                    .collect(),
                parent_block_hash: (hit > 0).then(|| EngineHash(hashes[hit - 1])),
                token_ids: tokens[hit * bs..(hit + stored) * bs].to_vec(),
                block_size: bs as u32,
                medium: Some(Medium::Gpu),
                extra_keys: Some(vec![None; stored]),
                group_idx: Some(0),
                kv_cache_spec_kind: Some("full_attention".into()),
                ..Default::default()
            }));
        }
        for &h in hashes[..hit + stored].iter().rev() {
            self.touch(h);
        }
        StepOutcome {
            hit_blocks: hit,
            prompt_blocks: n,
            batch: EventBatch {
                ts,
                events,
                data_parallel_rank: Some(0),
            },
        }
    }
}

/// The engine hashes of a prompt's blocks under `f`.
pub fn engine_hashes(tokens: &[u32], block_size: usize, f: &EngineHashFn) -> Vec<u64> {
    let mut prev = None;
    tokens
        .chunks_exact(block_size)
        .map(|b| {
            let h = f(prev, b);
            prev = Some(h);
            h
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_hash_ids_share_token_blocks() {
        let a = TraceRequest {
            timestamp: 0,
            input_length: 1100,
            output_length: 1,
            hash_ids: vec![0, 1, 2],
        };
        let b = TraceRequest {
            timestamp: 0,
            input_length: 1024,
            output_length: 1,
            hash_ids: vec![0, 1],
        };
        let c = TraceRequest {
            timestamp: 0,
            input_length: 1024,
            output_length: 1,
            hash_ids: vec![0, 9],
        };
        let (ta, tb, tc) = (
            prompt_tokens(&a, 16),
            prompt_tokens(&b, 16),
            prompt_tokens(&c, 16),
        );
        assert_eq!(ta.len(), 1100 / 16 * 16);
        assert_eq!(&ta[..1024], &tb[..]);
        assert_eq!(&ta[..512], &tc[..512]);
        assert_ne!(&ta[512..1024], &tc[512..]);
    }

    #[test]
    fn lru_engine_hits_and_evicts_leaves_first() {
        let mut e = LruEngine::new(4, 2);
        let toks: Vec<u32> = (0..6).collect();
        let h = engine_hashes(&toks, 2, &default_engine_hash);
        let o = e.serve(&toks, &h, 0.0);
        assert_eq!((o.hit_blocks, o.batch.events.len()), (0, 1));
        let o = e.serve(&toks, &h, 0.0);
        assert_eq!(o.hit_blocks, 3);
        assert!(o.batch.events.is_empty());
        // A different prompt of 2 blocks evicts one block: the old chain's leaf.
        let other: Vec<u32> = (100..104).collect();
        let ho = engine_hashes(&other, 2, &default_engine_hash);
        let o = e.serve(&other, &ho, 0.0);
        match &o.batch.events[0] {
            KvEvent::BlockRemoved(r) => assert_eq!(r.block_hashes[0].0, h[2]),
            ev => panic!("expected a removal, got {ev:?}"),
        }
        assert_eq!(e.cached_prefix(&h), 2);
    }
}

//! Tier events: every store and eviction on the host and disk tiers as a vLLM KV event.
//!
//! A stored block becomes a `BlockStored` with `medium` `"CPU"` (host tier) or `"STORAGE"` (disk
//! tier), `locality` `"LOCAL"`, the block's key as its hash, and — when the caller passed
//! [`BlockMeta`] — the parent's key, the token ids, the block size and the LoRA name, exactly as
//! vLLM's OffloadingConnector does in its self-describing mode. An eviction becomes a
//! `BlockRemoved` on the same medium. Events are published over ZMQ with kvindex's
//! [`EventPublisher`](kvindex::publish::EventPublisher) (vLLM's wire protocol: topic, sequence
//! number, msgpack batch) and/or kept for [`TierEvents::take_events`] (a vLLM connector hands
//! them to vLLM's own publisher from `take_events()`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use kvindex::{BlockKey, BlockRemoved, BlockStored, EngineHash, EventBatch, KvEvent, Medium};
use parking_lot::Mutex;

use crate::error::{Result, StoreError};

/// What is known of a block beyond its key (for self-describing events).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockMeta {
    /// The block's token ids (the block size is their number).
    pub tokens: Vec<u32>,
    /// The key of the block before it in its sequence (`None` for a first block).
    pub parent: Option<BlockKey>,
    /// The LoRA adapter's name.
    pub lora_name: Option<String>,
}

/// Where tier events go.
pub struct TierEvents {
    #[cfg(feature = "zmq")]
    publisher: Option<kvindex::publish::EventPublisher>,
    keep: bool,
    cap: usize,
    pending: Mutex<Vec<KvEvent>>,
    dropped: AtomicU64,
    published: AtomicU64,
    errors: AtomicU64,
}

impl TierEvents {
    /// Events kept in memory (up to `cap`; older ones are counted as dropped) for
    /// [`TierEvents::take_events`].
    pub fn buffered(cap: usize) -> Self {
        TierEvents {
            #[cfg(feature = "zmq")]
            publisher: None,
            keep: true,
            cap,
            pending: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
            published: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    /// Events published over ZMQ as they happen (and not kept).
    #[cfg(feature = "zmq")]
    pub fn publish(ctx: &zmq::Context, cfg: kvindex::publish::PublisherConfig) -> Result<Self> {
        let p =
            kvindex::publish::EventPublisher::start(ctx, cfg).map_err(|e| StoreError::Remote {
                tier: "event publisher".into(),
                reason: e.to_string(),
            })?;
        Ok(TierEvents {
            publisher: Some(p),
            keep: false,
            ..TierEvents::buffered(0)
        })
    }

    /// The publisher's endpoint, if publishing.
    pub fn endpoint(&self) -> Option<&str> {
        #[cfg(feature = "zmq")]
        if let Some(p) = &self.publisher {
            return Some(p.endpoint());
        }
        None
    }

    /// Takes every kept event, oldest first.
    pub fn take_events(&self) -> Vec<KvEvent> {
        std::mem::take(&mut *self.pending.lock())
    }

    /// (published batches, dropped events, publish errors).
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.published.load(Relaxed),
            self.dropped.load(Relaxed),
            self.errors.load(Relaxed),
        )
    }

    fn emit(&self, events: Vec<KvEvent>) {
        if events.is_empty() {
            return;
        }
        #[cfg(feature = "zmq")]
        if let Some(p) = &self.publisher {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            let batch = EventBatch {
                ts,
                events: events.clone(),
                data_parallel_rank: None,
            };
            match p.publish(&batch) {
                Ok(_) => {
                    self.published.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    self.errors.fetch_add(1, Relaxed);
                    tracing::warn!(error = %e, "tier event publish failed");
                }
            }
        }
        #[cfg(not(feature = "zmq"))]
        let _ = (
            SystemTime::now(),
            UNIX_EPOCH,
            std::mem::size_of::<EventBatch>(),
        );
        if self.keep {
            let mut p = self.pending.lock();
            p.extend(events);
            if p.len() > self.cap {
                let extra = p.len() - self.cap;
                p.drain(..extra);
                self.dropped.fetch_add(extra as u64, Relaxed);
            }
        }
    }

    /// Announces a block stored on `medium`.
    pub fn stored(&self, medium: Medium, key: BlockKey, meta: Option<&BlockMeta>) {
        let mut ev = BlockStored {
            block_hashes: vec![EngineHash(key.0)],
            medium: Some(medium),
            locality: Some("LOCAL".into()),
            ..Default::default()
        };
        if let Some(m) = meta {
            ev.parent_block_hash = m.parent.map(|p| EngineHash(p.0));
            ev.token_ids = m.tokens.clone();
            ev.block_size = m.tokens.len() as u32;
            ev.lora_name = m.lora_name.clone();
        }
        self.emit(vec![KvEvent::BlockStored(ev)]);
    }

    /// Announces blocks removed from `medium`.
    pub fn removed(&self, medium: Medium, keys: &[BlockKey]) {
        // vLLM sends one hash per BlockRemoved; so do we.
        let evs = keys
            .iter()
            .map(|k| {
                KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![EngineHash(k.0)],
                    medium: Some(medium.clone()),
                    locality: Some("LOCAL".into()),
                    ..Default::default()
                })
            })
            .collect();
        self.emit(evs);
    }
}

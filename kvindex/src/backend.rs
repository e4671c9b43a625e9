//! The index contract, implemented in memory ([`crate::Index`]) and on Redis
//! ([`crate::redis_backend::RedisIndex`]), so one test suite and one ingestion layer serve both.

use crate::index::{ApplyReport, EngineId, EngineMatch, EngineSpec, Index, Query};
use crate::{BlockStored, EventBatch, Result};

/// What an index backend does. Every method may be called from any thread.
pub trait IndexBackend: Send + Sync {
    /// Registers an engine (idempotent for the same spec).
    fn add_engine(&self, spec: EngineSpec) -> Result<EngineId>;
    /// Removes an engine and purges everything it held.
    fn remove_engine(&self, id: EngineId) -> Result<()>;
    /// Forgets everything an engine held (engine restart, `AllBlocksCleared`).
    fn clear_engine(&self, id: EngineId) -> Result<()>;
    /// Applies one event batch of an engine.
    fn apply(&self, id: EngineId, batch: &EventBatch) -> Result<ApplyReport>;
    /// Applies the batch with sequence number `seq` of an engine's stream; backends that persist
    /// their state record `seq` with it (see [`IndexBackend::applied_seq`]).
    fn apply_at(&self, id: EngineId, seq: u64, batch: &EventBatch) -> Result<ApplyReport> {
        let _ = seq;
        self.apply(id, batch)
    }
    /// The last sequence number applied for an engine, when the backend knows it (an index
    /// restored from a snapshot); ingestion resumes after it.
    fn applied_seq(&self, id: EngineId) -> Option<u64> {
        let _ = id;
        None
    }
    /// Applies an orphan with its recovered ancestry (see [`Index::apply_stored_with_ancestry`]).
    fn apply_stored_with_ancestry(
        &self,
        id: EngineId,
        ancestors: &[BlockStored],
        orphan: &BlockStored,
    ) -> Result<bool>;
    /// Counts orphans that could not be recovered.
    fn note_unrecovered(&self, n: u64);
    /// Per engine, the longest consecutive prefix held, per-tier counts and score; best first.
    fn query(&self, q: &Query<'_>) -> Result<Vec<EngineMatch>>;
}

impl IndexBackend for Index {
    fn add_engine(&self, spec: EngineSpec) -> Result<EngineId> {
        Index::add_engine(self, spec)
    }
    fn remove_engine(&self, id: EngineId) -> Result<()> {
        Index::remove_engine(self, id)
    }
    fn clear_engine(&self, id: EngineId) -> Result<()> {
        Index::clear_engine(self, id)
    }
    fn apply(&self, id: EngineId, batch: &EventBatch) -> Result<ApplyReport> {
        Index::apply(self, id, batch)
    }
    fn apply_at(&self, id: EngineId, seq: u64, batch: &EventBatch) -> Result<ApplyReport> {
        Index::apply_at(self, id, seq, batch)
    }
    fn applied_seq(&self, id: EngineId) -> Option<u64> {
        Index::applied_seq(self, id)
    }
    fn apply_stored_with_ancestry(
        &self,
        id: EngineId,
        ancestors: &[BlockStored],
        orphan: &BlockStored,
    ) -> Result<bool> {
        Index::apply_stored_with_ancestry(self, id, ancestors, orphan)
    }
    fn note_unrecovered(&self, n: u64) {
        Index::note_unrecovered(self, n)
    }
    fn query(&self, q: &Query<'_>) -> Result<Vec<EngineMatch>> {
        Ok(Index::query(self, q))
    }
}

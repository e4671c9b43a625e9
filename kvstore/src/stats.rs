//! Per-tier counters: hits, misses, bytes, bandwidth, occupancy, evictions, errors.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Live counters of one tier (lock-free, shared by every thread).
#[derive(Default, Debug)]
pub struct TierCounters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) stores: AtomicU64,
    pub(crate) dedup: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) corrupt: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) read_ns: AtomicU64,
    pub(crate) write_ns: AtomicU64,
}

impl TierCounters {
    pub(crate) fn read_done(&self, bytes: usize, since: Instant) {
        self.hits.fetch_add(1, Relaxed);
        self.bytes_read.fetch_add(bytes as u64, Relaxed);
        self.read_ns
            .fetch_add(since.elapsed().as_nanos() as u64, Relaxed);
    }

    pub(crate) fn write_done(&self, bytes: usize, since: Instant) {
        self.stores.fetch_add(1, Relaxed);
        self.bytes_written.fetch_add(bytes as u64, Relaxed);
        self.write_ns
            .fetch_add(since.elapsed().as_nanos() as u64, Relaxed);
    }

    pub(crate) fn miss(&self) {
        self.misses.fetch_add(1, Relaxed);
    }

    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }

    /// A snapshot, with the occupancy the tier reports.
    pub fn snapshot(
        &self,
        tier: &'static str,
        blocks: u64,
        capacity_blocks: u64,
        block_bytes: u64,
    ) -> TierStats {
        let g = |a: &AtomicU64| a.load(Relaxed);
        let gbps = |b: u64, ns: u64| if ns == 0 { 0.0 } else { b as f64 / ns as f64 };
        TierStats {
            tier,
            hits: g(&self.hits),
            misses: g(&self.misses),
            stores: g(&self.stores),
            dedup: g(&self.dedup),
            rejected: g(&self.rejected),
            evictions: g(&self.evictions),
            errors: g(&self.errors),
            corrupt: g(&self.corrupt),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            read_gbps: gbps(g(&self.bytes_read), g(&self.read_ns)),
            write_gbps: gbps(g(&self.bytes_written), g(&self.write_ns)),
            blocks,
            capacity_blocks,
            used_bytes: blocks * block_bytes,
            capacity_bytes: capacity_blocks * block_bytes,
        }
    }
}

/// A snapshot of one tier's statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct TierStats {
    /// `host`, `disk`, `redis` or `peer`.
    pub tier: &'static str,
    /// Reads served.
    pub hits: u64,
    /// Reads of blocks the tier did not hold.
    pub misses: u64,
    /// Blocks written.
    pub stores: u64,
    /// Writes skipped because the block was already there.
    pub dedup: u64,
    /// Writes refused by the admission filter.
    pub rejected: u64,
    /// Blocks evicted to make room.
    pub evictions: u64,
    /// Failed operations (I/O, network, corruption).
    pub errors: u64,
    /// Reads that failed verification (counted in `errors` too).
    pub corrupt: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Bytes read per nanosecond spent reading (= GB/s), over the tier's life.
    pub read_gbps: f64,
    /// Bytes written per nanosecond spent writing (= GB/s).
    pub write_gbps: f64,
    /// Blocks held now (0 where the tier cannot know, e.g. Redis).
    pub blocks: u64,
    /// Blocks the tier can hold (0 where unbounded or unknown).
    pub capacity_blocks: u64,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
}

impl TierStats {
    /// Occupancy in [0, 1] (0 when the capacity is unknown).
    pub fn occupancy(&self) -> f64 {
        if self.capacity_blocks == 0 {
            0.0
        } else {
            self.blocks as f64 / self.capacity_blocks as f64
        }
    }
}

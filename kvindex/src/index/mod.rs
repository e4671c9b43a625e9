//! The in-memory index: which engine holds which block, on which tier.
//!
//! # Model
//!
//! * **Blocks** are named by [`BlockKey`]s (see [`crate::key`]). The block table maps a key to
//!   the engines holding it: one 16-byte slot per (key, group of 32 engines, tier), whose value
//!   packs a presence bit per engine, the group, the tier, the block's depth in its chain
//!   (saturating at 31), a "more slots of this key follow" bit (so lookups stop at the first slot
//!   of most keys) and a 16-bit recency stamp. A block on one tier of up to 32 engines takes one
//!   slot.
//! * **Aliases** map an engine's own block hash (opaque, as published in its events) to the key
//!   kvmesh computed for that block. Aliases are shared between engines: engines with the same hash
//!   algorithm and seed agree on them, and a 64-bit collision between different ones is counted.
//!   A removal that leaves a block with no holder marks its alias dead in place (the removal
//!   names the alias, and its slot is in cache then); marked aliases still resolve tier events
//!   and parents that come late, and are dropped by the next sweep or rebuild of the alias
//!   table. Aliases of blocks evicted or purged (which name no alias) are found by a cleaning
//!   pass that looks up each alias's block.
//! * **Reference counts.** A block announced twice by one engine on one tier needs two removals;
//!   the rare counts above one live in a side map.
//!
//! # Threads
//!
//! One writer at a time (a mutex serialises [`Index::apply`] and the engine operations). Queries
//! take no lock at all: they read the tables through atomics (see [`crate::table`]) and never wait
//! behind ingestion. A query walks the prompt's chain with the next blocks' keys computed and
//! their slots prefetched ahead, and follows engines 32 at a time as bit masks. Tables grow (or are cleaned) by building a new table and swapping a pointer;
//! a query that started on the old table finishes on it.
//!
//! # Memory
//!
//! Both tables are bounded by [`IndexConfig::byte_budget`] (half each). When the block table can
//! grow no more, the least recently used blocks are evicted, deepest first among equally old ones,
//! so chains shrink from their leaves. `bytes_per_block` in [`IndexStats`] is measured, not assumed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::event::{BlockRemoved, BlockStored, EngineHash, EventBatch, ExtraKey, KvEvent, Medium};
use crate::key::{
    block_extras, prefetch_block_tokens, root_seed, BlockExtras, BlockKey, KeyHasher, MmItem,
    Namespace,
};
use crate::table::{Occupancy, Table, MARK, SLOT_BYTES};
use crate::EngineName;
use crate::{IndexError, Result};

mod walk;
use walk::{walk_chain, Walk};

/// A storage tier of an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Tier {
    /// The engine's own KV cache (vLLM's `"GPU"` medium, also on the CPU build).
    Gpu = 0,
    /// Host-memory offload.
    Cpu = 1,
    /// Local disk or file-system offload.
    Storage = 2,
    /// A remote or shared store (events with `locality = "REMOTE"` or an unknown medium).
    Remote = 3,
}

/// Number of tiers.
pub const TIERS: usize = 4;

impl Tier {
    /// All tiers, in order.
    pub const ALL: [Tier; TIERS] = [Tier::Gpu, Tier::Cpu, Tier::Storage, Tier::Remote];

    /// The tier an event's `medium` and `locality` name. A missing medium is the GPU tier.
    pub fn of(medium: Option<&Medium>, locality: Option<&str>) -> Tier {
        if locality.is_some_and(|l| l.eq_ignore_ascii_case("REMOTE")) {
            return Tier::Remote;
        }
        match medium {
            None | Some(Medium::Gpu) => Tier::Gpu,
            Some(Medium::Cpu) => Tier::Cpu,
            Some(Medium::Storage) => Tier::Storage,
            Some(Medium::Other(_)) => Tier::Remote,
        }
    }

    /// Lower-case name (`gpu`, `cpu`, `storage`, `remote`).
    pub fn name(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::Cpu => "cpu",
            Tier::Storage => "storage",
            Tier::Remote => "remote",
        }
    }
}

/// Settings of an [`Index`].
#[derive(Clone, Debug)]
pub struct IndexConfig {
    /// Upper bound of the tables' memory, in bytes. Default 1 GiB.
    pub byte_budget: usize,
    /// Score weight of a block per tier (a block on several tiers counts its best). Default
    /// gpu 1.0, cpu 0.8, storage 0.5, remote 0.25.
    pub tier_weights: [f64; TIERS],
    /// Slots each table starts with. Default 4096.
    pub initial_slots: usize,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            byte_budget: 1 << 30,
            tier_weights: [1.0, 0.8, 0.5, 0.25],
            initial_slots: 4096,
        }
    }
}

/// Identifies an engine: a pod (or any unique name) and a data-parallel rank.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EngineSpec {
    /// Pod or instance name, unique in the cluster.
    pub pod: String,
    /// Data-parallel rank (0 when not data-parallel).
    pub dp_rank: u32,
    /// The model the engine serves; it scopes the engine's block keys.
    pub model: String,
}

impl EngineSpec {
    /// The engine's display name: `pod` for rank 0, `pod#dp<rank>` otherwise.
    pub fn name(&self) -> String {
        if self.dp_rank == 0 {
            self.pod.clone()
        } else {
            format!("{}#dp{}", self.pod, self.dp_rank)
        }
    }
}

/// The index's handle of a registered engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EngineId(pub u32);

/// Engines per block-table slot.
const LANES: u32 = 32;
/// At most this many engines (256 groups of 32).
pub const MAX_ENGINES: usize = 8192;

/// What readers know of an engine.
pub struct EngineInfo {
    /// The engine's identity.
    pub spec: EngineSpec,
    /// Display name.
    pub name: EngineName,
    /// Tokens per block as learned from its events (0 until the first event with tokens).
    block_size: AtomicU32,
}

impl EngineInfo {
    /// Tokens per block, if known yet.
    pub fn block_size(&self) -> Option<u32> {
        match self.block_size.load(Ordering::Relaxed) {
            0 => None,
            b => Some(b),
        }
    }
}

// Block-table value layout: [stamp 16][more 1][depth 5][tier 2][group 8][presence 32].
const GROUP_SHIFT: u32 = 32;
const TIER_SHIFT: u32 = 40;
const DEPTH_SHIFT: u32 = 42;
const MAX_DEPTH: u32 = 31;
/// Another slot of the same key follows this one in probe order (readers stop where it is clear).
const MORE: u64 = 1 << 47;
const STAMP_SHIFT: u32 = 48;

#[inline]
fn v_group(v: u64) -> u32 {
    ((v >> GROUP_SHIFT) & 0xff) as u32
}
#[inline]
fn v_tier(v: u64) -> usize {
    ((v >> TIER_SHIFT) & 0x3) as usize
}
/// Group and tier together: what makes slots of one key distinct.
#[inline]
fn v_class(v: u64) -> u32 {
    ((v >> GROUP_SHIFT) & 0x3ff) as u32
}
#[inline]
fn class_of(g: u32, tier: Tier) -> u32 {
    g | ((tier as u32) << 8)
}
#[inline]
fn v_depth(v: u64) -> u32 {
    ((v >> DEPTH_SHIFT) & 0x1f) as u32
}
#[inline]
fn v_stamp(v: u64) -> u16 {
    (v >> STAMP_SHIFT) as u16
}
#[inline]
fn with_stamp(v: u64, stamp: u16) -> u64 {
    (v & !(0xffff << STAMP_SHIFT)) | (u64::from(stamp) << STAMP_SHIFT)
}
#[inline]
fn lane_bit(lane: u32) -> u64 {
    1u64 << lane
}

/// Load factor above which a table is grown, cleaned or evicted.
const MAX_LOAD: f64 = 0.85;
/// Growth factor of a table.
const GROWTH: f64 = 1.5;
/// A table rebuilt for the slots it holds (a cleaned alias table) starts at this load.
const GROW_TO: f64 = 0.72;
/// A cleaned alias table is moved to one sized for its live aliases when that is smaller than
/// this fraction of it.
const SHRINK_BELOW: f64 = 0.9;
/// Eviction brings the block table down to this load.
const EVICT_TO: f64 = 0.75;
/// At most this many stored blocks per tick of the recency clock.
const CLOCK_TICK_OPS: u64 = 4096;

/// Counters of an index. A snapshot; see [`Index::stats`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IndexStats {
    /// Registered engines.
    pub engines: usize,
    /// Distinct block keys held by at least one engine.
    pub blocks: usize,
    /// (engine, block, tier) memberships.
    pub memberships: usize,
    /// Live block-table slots (one per key, group of 32 engines and tier).
    pub block_slots: usize,
    /// Slots of the block table, live or free.
    pub block_capacity: usize,
    /// Engine-hash aliases held.
    pub aliases: usize,
    /// Slots of the alias table, live or free.
    pub alias_capacity: usize,
    /// Bytes held by the tables.
    pub bytes: usize,
    /// `bytes / blocks` (0 when empty).
    pub bytes_per_block: f64,
    /// The configured byte budget.
    pub byte_budget: usize,
    /// Events applied.
    pub events: u64,
    /// Block announcements applied (BlockStored, per block).
    pub blocks_stored: u64,
    /// Block removals applied (BlockRemoved, per block).
    pub blocks_removed: u64,
    /// Removals of blocks the index did not know.
    pub unknown_removals: u64,
    /// Stored events whose parent was unknown (reported to the caller).
    pub orphans: u64,
    /// Orphans later applied with their recovered ancestry.
    pub orphans_recovered: u64,
    /// Orphans the caller could not recover (see [`Index::note_unrecovered`]).
    pub orphans_unrecovered: u64,
    /// Tokenless tier events whose engine hash was unknown.
    pub unresolved_tier_events: u64,
    /// Events of KV-cache groups other than 0 (hybrid models), not indexed.
    pub other_group_events: u64,
    /// Events whose token count does not match their blocks.
    pub malformed_events: u64,
    /// Engine hashes that collided with another block's alias.
    pub alias_conflicts: u64,
    /// Blocks evicted to stay within the byte budget.
    pub evicted_blocks: u64,
    /// Queries answered.
    pub queries: u64,
}

/// Per-engine counters.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineStats {
    pub id: EngineId,
    pub name: EngineName,
    pub spec: EngineSpec,
    /// Blocks held, per tier.
    pub blocks: [u64; TIERS],
    pub block_size: Option<u32>,
}

/// What applying one batch did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApplyReport {
    pub blocks_stored: usize,
    pub blocks_removed: usize,
    pub cleared: bool,
    /// Stored events whose parent hash is unknown: nothing of them was applied. The caller may
    /// recover their ancestry (through a replay) and call [`Index::apply_stored_with_ancestry`].
    pub orphans: Vec<BlockStored>,
    /// Tokenless tier-event hashes that resolved to no known block.
    pub unresolved: Vec<EngineHash>,
}

/// Which blocks a query asks about.
#[derive(Clone, Copy, Debug)]
pub enum QueryBlocks<'a> {
    /// A prompt's token ids (keys are computed per engine block size), with its multimodal items.
    Tokens { tokens: &'a [u32], mm: &'a [MmItem] },
    /// kvmesh block keys, computed by the caller.
    Keys(&'a [BlockKey]),
    /// vLLM's own block hashes (int form), as computed by the caller with the engines' algorithm.
    VllmHashes(&'a [EngineHash]),
}

/// A question to the index.
#[derive(Clone, Copy, Debug)]
pub struct Query<'a> {
    /// Namespace of the prompt (used for [`QueryBlocks::Tokens`]; engines of other models are
    /// skipped).
    pub namespace: &'a Namespace,
    pub blocks: QueryBlocks<'a>,
    /// Only these engines (all when `None`).
    pub engines: Option<&'a [EngineId]>,
}

/// One engine's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineMatch {
    pub engine: EngineId,
    pub name: EngineName,
    /// Longest run of consecutive blocks from block 0 held on any tier.
    pub matched_blocks: u32,
    /// `matched_blocks` times the engine's block size.
    pub matched_tokens: u32,
    /// Of the matched blocks, how many are held on each tier.
    pub tiers: [u32; TIERS],
    /// Sum over matched blocks of the best weight among the tiers holding each.
    pub score: f64,
}

/// `x`'s place in `f64::total_cmp` order, as an unsigned integer.
fn score_order(x: f64) -> u64 {
    let b = x.to_bits();
    // Negative numbers: all bits flipped; positive ones: the sign bit set.
    if b >> 63 == 1 {
        !b
    } else {
        b | (1 << 63)
    }
}

/// The registered engines as readers see them: a slot per engine id, and each engine's place in
/// name order (a query's ties are broken by name, without comparing names per query).
struct Directory {
    list: Vec<Option<Arc<EngineInfo>>>,
    /// The registered engines' slots in name order.
    by_name: Vec<u32>,
}

impl Directory {
    fn new(list: Vec<Option<Arc<EngineInfo>>>) -> Self {
        let mut order: Vec<(&str, u32)> = list
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (&*e.name, i as u32)))
            .collect();
        order.sort_unstable();
        let by_name = order.into_iter().map(|(_, i)| i).collect();
        Directory { list, by_name }
    }
}

impl std::ops::Deref for Directory {
    type Target = [Option<Arc<EngineInfo>>];
    fn deref(&self) -> &Self::Target {
        &self.list
    }
}

struct Inner {
    config: IndexConfig,
    blocks: ArcSwap<Table>,
    aliases: ArcSwap<Table>,
    engines: ArcSwap<Directory>,
    clock: AtomicU64,
    queries: AtomicU64,
    writer: Mutex<Writer>,
}

/// Writer-side state, under the writer lock.
struct Writer {
    blocks: Arc<Table>,
    aliases: Arc<Table>,
    blocks_occ: Occupancy,
    aliases_occ: Occupancy,
    distinct: usize,
    /// Keys that lost their last holder by eviction or engine purge (which name no alias, so
    /// their aliases stay unmarked) since the alias table was last cleaned: an upper bound on
    /// its unmarked dead aliases, which decides between sweeping, growing and cleaning it.
    dead_aliases: usize,
    /// Alias slots marked dead (their block lost its last holder through a removal, which names
    /// the alias): dropped for free when the alias table is rebuilt or swept, found meanwhile by
    /// late tier events.
    dead_marked: usize,
    memberships: usize,
    /// Announcements beyond the first, per (engine, key, tier).
    dups: HashMap<(u32, u64, u8), u32>,
    counts: Vec<[u64; TIERS]>,
    /// Per engine slot: the last sequence number applied (see [`Index::apply_at`]).
    applied: Vec<Option<u64>>,
    by_spec: HashMap<EngineSpec, u32>,
    hasher: KeyHasher,
    scratch: Vec<BlockKey>,
    evict_hand: usize,
    ops: u64,
    stats: IndexStats,
}

/// The index. Cheap to clone (a shared handle); `Send + Sync`.
#[derive(Clone)]
pub struct Index {
    inner: Arc<Inner>,
}

impl Default for Index {
    fn default() -> Self {
        Index::new(IndexConfig::default())
    }
}

impl Index {
    /// An empty index.
    pub fn new(config: IndexConfig) -> Self {
        let slots = config.initial_slots.max(64);
        let blocks = Arc::new(Table::new(slots));
        let aliases = Arc::new(Table::new(slots));
        let writer = Writer {
            blocks: blocks.clone(),
            aliases: aliases.clone(),
            blocks_occ: Occupancy::default(),
            aliases_occ: Occupancy::default(),
            distinct: 0,
            dead_aliases: 0,
            dead_marked: 0,
            memberships: 0,
            dups: HashMap::new(),
            counts: Vec::new(),
            applied: Vec::new(),
            by_spec: HashMap::new(),
            hasher: KeyHasher::new(),
            scratch: Vec::new(),
            evict_hand: 0,
            ops: 0,
            stats: IndexStats {
                byte_budget: config.byte_budget,
                ..IndexStats::default()
            },
        };
        Index {
            inner: Arc::new(Inner {
                config,
                blocks: ArcSwap::new(blocks),
                aliases: ArcSwap::new(aliases),
                engines: ArcSwap::new(Arc::new(Directory::new(Vec::new()))),
                clock: AtomicU64::new(0),
                queries: AtomicU64::new(0),
                writer: Mutex::new(writer),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &IndexConfig {
        &self.inner.config
    }

    /// Registers an engine (idempotent: the same spec gives the same id).
    pub fn add_engine(&self, spec: EngineSpec) -> Result<EngineId> {
        let mut w = self.inner.writer.lock();
        if let Some(&id) = w.by_spec.get(&spec) {
            return Ok(EngineId(id));
        }
        let engines = self.inner.engines.load_full();
        let slot = match engines.iter().position(Option::is_none) {
            Some(s) => s,
            None if engines.len() < MAX_ENGINES => engines.len(),
            None => return Err(IndexError::TooManyEngines { limit: MAX_ENGINES }),
        };
        let mut next = engines.list.clone();
        if slot == next.len() {
            next.push(None);
        }
        next[slot] = Some(Arc::new(EngineInfo {
            name: EngineName::new(&spec.name()),
            spec: spec.clone(),
            block_size: AtomicU32::new(0),
        }));
        self.inner.engines.store(Arc::new(Directory::new(next)));
        if w.counts.len() <= slot {
            w.counts.resize(slot + 1, [0; TIERS]);
        }
        w.counts[slot] = [0; TIERS];
        if w.applied.len() <= slot {
            w.applied.resize(slot + 1, None);
        }
        w.applied[slot] = None;
        w.by_spec.insert(spec, slot as u32);
        w.stats.engines = w.by_spec.len();
        Ok(EngineId(slot as u32))
    }

    /// Looks an engine up by its spec.
    pub fn engine_id(&self, spec: &EngineSpec) -> Option<EngineId> {
        self.inner
            .writer
            .lock()
            .by_spec
            .get(spec)
            .map(|&i| EngineId(i))
    }

    /// Looks an engine up by its display name.
    pub fn engine_by_name(&self, name: &str) -> Option<EngineId> {
        self.inner
            .engines
            .load()
            .iter()
            .enumerate()
            .find_map(|(i, e)| {
                e.as_ref()
                    .filter(|e| &*e.name == name)
                    .map(|_| EngineId(i as u32))
            })
    }

    /// What readers know of an engine.
    pub fn engine(&self, id: EngineId) -> Option<Arc<EngineInfo>> {
        self.inner
            .engines
            .load()
            .get(id.0 as usize)
            .cloned()
            .flatten()
    }

    /// All registered engines.
    pub fn engines(&self) -> Vec<(EngineId, Arc<EngineInfo>)> {
        self.inner
            .engines
            .load()
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.clone().map(|e| (EngineId(i as u32), e)))
            .collect()
    }

    /// Removes an engine and purges every block it held.
    pub fn remove_engine(&self, id: EngineId) -> Result<()> {
        let mut w = self.inner.writer.lock();
        let info = self
            .engine(id)
            .ok_or_else(|| IndexError::UnknownEngine(format!("#{}", id.0)))?;
        w.purge(id.0);
        if let Some(a) = w.applied.get_mut(id.0 as usize) {
            *a = None;
        }
        w.by_spec.remove(&info.spec);
        w.stats.engines = w.by_spec.len();
        let mut next = self.inner.engines.load().list.clone();
        next[id.0 as usize] = None;
        self.inner.engines.store(Arc::new(Directory::new(next)));
        Ok(())
    }

    /// Forgets every block of one engine (as for `AllBlocksCleared`, or an engine restart).
    pub fn clear_engine(&self, id: EngineId) -> Result<()> {
        self.engine(id)
            .ok_or_else(|| IndexError::UnknownEngine(format!("#{}", id.0)))?;
        self.inner.writer.lock().purge(id.0);
        Ok(())
    }

    /// Applies the batch with sequence number `seq` of engine `id`'s stream, and records `seq`
    /// (under the same lock, so a snapshot's contents and sequence numbers agree).
    pub fn apply_at(&self, id: EngineId, seq: u64, batch: &EventBatch) -> Result<ApplyReport> {
        self.apply_inner(id, Some(seq), batch)
    }

    /// The last sequence number applied for engine `id` through [`Index::apply_at`].
    pub fn applied_seq(&self, id: EngineId) -> Option<u64> {
        self.inner
            .writer
            .lock()
            .applied
            .get(id.0 as usize)
            .copied()
            .flatten()
    }

    /// Applies one batch of events published by engine `id`.
    pub fn apply(&self, id: EngineId, batch: &EventBatch) -> Result<ApplyReport> {
        self.apply_inner(id, None, batch)
    }

    fn apply_inner(
        &self,
        id: EngineId,
        seq: Option<u64>,
        batch: &EventBatch,
    ) -> Result<ApplyReport> {
        let info = self
            .engine(id)
            .ok_or_else(|| IndexError::UnknownEngine(format!("#{}", id.0)))?;
        let mut w = self.inner.writer.lock();
        let mut report = ApplyReport::default();
        // vLLM sends one BlockRemoved per evicted block, many per batch: fetch the aliases of the
        // removals a few events ahead so their cache misses overlap.
        const REMOVALS_AHEAD: usize = 8;
        let prefetch_removal = |w: &Writer, ev: Option<&KvEvent>| {
            if let Some(KvEvent::BlockRemoved(r)) = ev {
                for h in &r.block_hashes {
                    w.aliases.prefetch(alias_slot(*h));
                }
            }
        };
        for ev in batch.events.iter().take(REMOVALS_AHEAD) {
            prefetch_removal(&w, Some(ev));
        }
        for (i, ev) in batch.events.iter().enumerate() {
            prefetch_removal(&w, batch.events.get(i + REMOVALS_AHEAD));
            // Half-way there, the alias is in cache: fetch the block's slot too.
            if let Some(KvEvent::BlockRemoved(r)) = batch.events.get(i + REMOVALS_AHEAD / 2) {
                for h in &r.block_hashes {
                    if let Some(k) = w.resolve(*h) {
                        w.blocks.prefetch(k);
                    }
                }
            }
            w.stats.events += 1;
            match ev {
                KvEvent::BlockStored(s) => {
                    w.apply_stored(&self.inner, id.0, &info, s, false, &mut report)
                }
                KvEvent::BlockRemoved(r) => w.apply_removed(id.0, r, &mut report),
                KvEvent::AllBlocksCleared => {
                    w.purge(id.0);
                    report.cleared = true;
                }
            }
        }
        if let Some(seq) = seq {
            let slot = id.0 as usize;
            if w.applied.len() <= slot {
                w.applied.resize(slot + 1, None);
            }
            w.applied[slot] = Some(seq);
        }
        w.publish(&self.inner);
        Ok(report)
    }

    /// Applies an orphaned `BlockStored` together with its recovered ancestry: `ancestors` are
    /// the Stored events that lead from a known block (or the root) to the orphan's parent, oldest
    /// first. Ancestors are marked held without raising reference counts (they are re-announcements
    /// of blocks the engine already has). Returns false (and applies nothing) if the ancestry does
    /// not connect.
    pub fn apply_stored_with_ancestry(
        &self,
        id: EngineId,
        ancestors: &[BlockStored],
        orphan: &BlockStored,
    ) -> Result<bool> {
        let info = self
            .engine(id)
            .ok_or_else(|| IndexError::UnknownEngine(format!("#{}", id.0)))?;
        let mut w = self.inner.writer.lock();
        let mut report = ApplyReport::default();
        for a in ancestors {
            w.apply_stored(&self.inner, id.0, &info, a, true, &mut report);
            if !report.orphans.is_empty() {
                w.stats.orphans -= report.orphans.len() as u64;
                w.publish(&self.inner);
                return Ok(false);
            }
        }
        w.apply_stored(&self.inner, id.0, &info, orphan, false, &mut report);
        let ok = report.orphans.is_empty();
        if ok {
            w.stats.orphans_recovered += 1;
        } else {
            w.stats.orphans -= 1;
        }
        w.publish(&self.inner);
        Ok(ok)
    }

    /// Counts orphans the caller could not recover (no replay endpoint, or a replay that did not
    /// reach back far enough).
    pub fn note_unrecovered(&self, n: u64) {
        self.inner.writer.lock().stats.orphans_unrecovered += n;
    }

    /// Answers a query without taking any lock. Engines with no matched block are omitted;
    /// the rest are sorted by score (best first), then by name.
    pub fn query(&self, q: &Query<'_>) -> Vec<EngineMatch> {
        self.inner.queries.fetch_add(1, Ordering::Relaxed);
        let engines = self.inner.engines.load();
        let blocks = self.inner.blocks.load();
        let stamp = self.inner.clock.load(Ordering::Relaxed) as u16;
        let n = engines.len();
        thread_local! {
            static WALK: std::cell::RefCell<Walk> = std::cell::RefCell::new(Walk::default());
        }
        // A query never queries again while it runs, so the scratch is never borrowed twice.
        WALK.with_borrow_mut(|walk| self.query_with(q, &engines, &blocks, stamp, n, walk))
    }

    fn query_with(
        &self,
        q: &Query<'_>,
        engines: &Directory,
        blocks: &Table,
        stamp: u16,
        n: usize,
        walk: &mut Walk,
    ) -> Vec<EngineMatch> {
        walk.reset(n);
        let weights = &self.inner.config.tier_weights;
        let allowed = |i: usize| match q.engines {
            None => true,
            Some(list) => list.iter().any(|e| e.0 as usize == i),
        };
        match q.blocks {
            QueryBlocks::Tokens { tokens, mm } => {
                // One walk per distinct block size among the candidate engines of this model.
                let mut sizes: Vec<u32> = Vec::new();
                for (i, e) in engines.iter().enumerate() {
                    if let Some(e) = e {
                        if e.spec.model == q.namespace.model && allowed(i) {
                            if let Some(bs) = e.block_size() {
                                if !sizes.contains(&bs) {
                                    sizes.push(bs);
                                }
                            }
                        }
                    }
                }
                let mut hasher = KeyHasher::new();
                for bs in sizes {
                    for (i, e) in engines.iter().enumerate() {
                        walk.allowed[i] = e.as_ref().is_some_and(|e| {
                            e.spec.model == q.namespace.model && e.block_size() == Some(bs)
                        }) && allowed(i);
                    }
                    let bsz = bs as usize;
                    let mut prev = q.namespace.root_seed();
                    let nblocks = tokens.len() / bsz;
                    walk_chain(blocks, walk, weights, stamp, nblocks, |i| {
                        prefetch_block_tokens(tokens, i, bsz);
                        let toks = &tokens[i * bsz..(i + 1) * bsz];
                        let k = if mm.is_empty() {
                            hasher.next(prev, toks)
                        } else {
                            hasher.next_with(prev, toks, &block_extras(mm, i, bsz))
                        };
                        prev = k.0;
                        Some(k.0)
                    });
                }
            }
            QueryBlocks::Keys(keys) => {
                for (i, e) in engines.iter().enumerate() {
                    walk.allowed[i] = e.is_some() && allowed(i);
                }
                walk_chain(blocks, walk, weights, stamp, keys.len(), |i| {
                    Some(keys[i].0)
                });
            }
            QueryBlocks::VllmHashes(hashes) => {
                for (i, e) in engines.iter().enumerate() {
                    walk.allowed[i] = e.is_some() && allowed(i);
                }
                let aliases = self.inner.aliases.load();
                walk_chain(blocks, walk, weights, stamp, hashes.len(), |i| {
                    aliases.get(alias_slot(hashes[i]))
                });
            }
        }
        // Best score first, ties in name order: the engines are taken in name order (kept with
        // the directory) and sorted stably by score alone, which is linear when most scores
        // tie (a sorted run).
        let mut order: Vec<(u64, u32)> = Vec::new();
        for &i in &engines.by_name {
            if walk.matched[i as usize] != 0 {
                order.push((!score_order(walk.score[i as usize]), i));
            }
        }
        order.sort_by_key(|o| o.0);
        let mut out: Vec<EngineMatch> = Vec::with_capacity(order.len());
        for (_, i) in order {
            let i = i as usize;
            let Some(e) = &engines[i] else { continue };
            let bs = e.block_size().unwrap_or(0);
            out.push(EngineMatch {
                engine: EngineId(i as u32),
                name: e.name,
                matched_blocks: walk.matched[i],
                matched_tokens: walk.matched[i] * bs,
                tiers: walk.tiers[i],
                score: walk.score[i],
            });
        }
        out
    }

    /// The key an engine's block hash maps to, if known.
    pub fn resolve(&self, hash: EngineHash) -> Option<BlockKey> {
        self.inner
            .aliases
            .load()
            .get(alias_slot(hash))
            .map(BlockKey)
    }

    /// The engines holding `key`, with the tiers each holds it on.
    pub fn holders(&self, key: BlockKey) -> Vec<(EngineId, Vec<Tier>)> {
        let blocks = self.inner.blocks.load();
        let mut out = Vec::new();
        let mut by_engine: std::collections::BTreeMap<EngineId, Vec<Tier>> = Default::default();
        blocks.for_each(key.0, |v| {
            let (g, tier) = (v_group(v), Tier::ALL[v_tier(v)]);
            let mut mask = v as u32;
            while mask != 0 {
                let lane = mask.trailing_zeros();
                mask &= mask - 1;
                by_engine
                    .entry(EngineId(g * LANES + lane))
                    .or_default()
                    .push(tier);
            }
            true
        });
        for (e, mut tiers) in by_engine {
            tiers.sort();
            out.push((e, tiers));
        }
        out
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> IndexStats {
        let w = self.inner.writer.lock();
        let mut s = w.stats.clone();
        s.blocks = w.distinct;
        s.memberships = w.memberships;
        s.block_slots = w.blocks_occ.live;
        s.block_capacity = w.blocks.capacity();
        s.aliases = w.aliases_occ.live - w.dead_marked;
        s.alias_capacity = w.aliases.capacity();
        s.bytes = w.bytes();
        s.bytes_per_block = if w.distinct == 0 {
            0.0
        } else {
            s.bytes as f64 / w.distinct as f64
        };
        s.queries = self.inner.queries.load(Ordering::Relaxed);
        s
    }

    /// Per-engine counters.
    pub fn engine_stats(&self) -> Vec<EngineStats> {
        let w = self.inner.writer.lock();
        self.engines()
            .into_iter()
            .map(|(id, e)| EngineStats {
                id,
                name: e.name,
                spec: e.spec.clone(),
                blocks: w.counts.get(id.0 as usize).copied().unwrap_or_default(),
                block_size: e.block_size(),
            })
            .collect()
    }

    /// The index's state, consistent with the sequence numbers recorded by [`Index::apply_at`]
    /// (taken under the writer's lock; queries go on meanwhile).
    pub fn snapshot(&self) -> crate::snapshot::Snapshot {
        let w = self.inner.writer.lock();
        let engines = self
            .engines()
            .into_iter()
            .map(|(id, e)| crate::snapshot::SnapEngine {
                slot: id.0,
                pod: e.spec.pod.clone(),
                dp_rank: e.spec.dp_rank,
                model: e.spec.model.clone(),
                block_size: e.block_size().unwrap_or(0),
                applied_seq: w.applied.get(id.0 as usize).copied().flatten(),
                counts: w.counts.get(id.0 as usize).copied().unwrap_or_default(),
            })
            .collect();
        let mut blocks = Vec::with_capacity(w.blocks_occ.live);
        w.blocks.scan(|_, k, v| blocks.push((k, v & !MORE)));
        let mut aliases = Vec::with_capacity(w.aliases_occ.live);
        w.aliases.scan(|_, k, v| {
            if k & MARK == 0 {
                aliases.push((k, v));
            }
        });
        let dups = w.dups.iter().map(|(&(e, k, t), &c)| (e, k, t, c)).collect();
        crate::snapshot::Snapshot {
            engines,
            blocks,
            aliases,
            dups,
            clock: self.inner.clock.load(Ordering::Relaxed),
        }
    }

    /// An index holding a snapshot's state.
    pub fn restore(config: IndexConfig, snap: &crate::snapshot::Snapshot) -> Result<Index> {
        let index = Index::new(config);
        {
            let mut w = index.inner.writer.lock();
            let slots = snap
                .engines
                .iter()
                .map(|e| e.slot as usize + 1)
                .max()
                .unwrap_or(0);
            if slots > MAX_ENGINES {
                return Err(IndexError::Snapshot(format!(
                    "engine slot {} out of range",
                    slots - 1
                )));
            }
            let mut dir: Vec<Option<Arc<EngineInfo>>> = vec![None; slots];
            w.counts = vec![[0; TIERS]; slots];
            w.applied = vec![None; slots];
            for e in &snap.engines {
                let spec = EngineSpec {
                    pod: e.pod.clone(),
                    dp_rank: e.dp_rank,
                    model: e.model.clone(),
                };
                let slot = e.slot as usize;
                if dir[slot].is_some() || w.by_spec.contains_key(&spec) {
                    return Err(IndexError::Snapshot(format!(
                        "engine {} appears twice",
                        spec.name()
                    )));
                }
                dir[slot] = Some(Arc::new(EngineInfo {
                    name: EngineName::new(&spec.name()),
                    spec: spec.clone(),
                    block_size: AtomicU32::new(e.block_size),
                }));
                w.counts[slot] = e.counts;
                w.applied[slot] = e.applied_seq;
                w.by_spec.insert(spec, e.slot);
            }
            w.stats.engines = w.by_spec.len();
            index.inner.engines.store(Arc::new(Directory::new(dir)));
            let cap = |n: usize| {
                ((n as f64 / 0.6) as usize).max(index.inner.config.initial_slots.max(64))
            };
            let blocks = Table::new(cap(snap.blocks.len()));
            let mut occ = Occupancy::default();
            let mut keys = HashSet::with_capacity(snap.blocks.len());
            let mut memberships = 0usize;
            for &(k, v) in &snap.blocks {
                if k <= crate::table::TOMB {
                    return Err(IndexError::Snapshot(
                        "reserved key in the block table".into(),
                    ));
                }
                // Slots of one key are chained by the `MORE` bit, rebuilt here.
                if !keys.insert(k) {
                    blocks.mark_before(k, usize::MAX, MORE);
                }
                blocks.insert(k, v & !MORE, &mut occ);
                memberships += (v as u32).count_ones() as usize;
            }
            let aliases = Table::new(cap(snap.aliases.len()));
            let mut aocc = Occupancy::default();
            for &(k, v) in &snap.aliases {
                if k <= crate::table::TOMB {
                    return Err(IndexError::Snapshot(
                        "reserved key in the alias table".into(),
                    ));
                }
                aliases.insert(alias_slot_raw(k), v, &mut aocc);
            }
            w.blocks = Arc::new(blocks);
            w.blocks_occ = occ;
            w.aliases = Arc::new(aliases);
            w.aliases_occ = aocc;
            w.distinct = keys.len();
            w.memberships = memberships;
            w.dups = snap
                .dups
                .iter()
                .map(|&(e, k, t, c)| ((e, k, t), c))
                .collect();
            index.inner.clock.store(snap.clock, Ordering::Relaxed);
            w.publish(&index.inner);
        }
        Ok(index)
    }

    /// Every (key, engine, tier) membership, for tests and snapshots.
    pub fn memberships(&self) -> Vec<(BlockKey, EngineId, Tier)> {
        let _w = self.inner.writer.lock();
        let blocks = self.inner.blocks.load();
        let mut out = Vec::new();
        blocks.scan(|_, k, v| {
            let (g, tier) = (v_group(v), Tier::ALL[v_tier(v)]);
            let mut mask = v as u32;
            while mask != 0 {
                let lane = mask.trailing_zeros();
                mask &= mask - 1;
                out.push((BlockKey(k), EngineId(g * LANES + lane), tier));
            }
        });
        out.sort();
        out
    }
}

/// The alias table's key for an engine hash (0 and 1 are reserved by the table).
#[inline]
pub(crate) fn alias_key(h: EngineHash) -> u64 {
    if h.0 < 2 {
        h.0 ^ 0xA5A5_5A5A_0F0F_F0F0
    } else {
        h.0
    }
}

/// The alias table's key of an engine hash: [`alias_key`] with the table's [`MARK`] bit clear
/// (a dead alias is the same key with the bit set).
#[inline]
pub(crate) fn alias_slot(h: EngineHash) -> u64 {
    alias_slot_raw(alias_key(h))
}

/// [`alias_slot`] of an alias key already mapped by [`alias_key`] (as snapshots hold them).
#[inline]
fn alias_slot_raw(k: u64) -> u64 {
    let k = k & !MARK;
    if k <= crate::table::TOMB {
        k | 0x25A5_5A5A_0F0F_F0F0
    } else {
        k
    }
}

/// What an event's per-block extra keys say, once the LoRA name is set aside.
struct ParsedExtras {
    salt: Option<String>,
    extras: BlockExtras,
}

fn parse_extras(keys: Option<&Vec<ExtraKey>>, lora_name: Option<&str>) -> ParsedExtras {
    let mut out = ParsedExtras {
        salt: None,
        extras: BlockExtras::default(),
    };
    let Some(keys) = keys else { return out };
    let mut lora_skipped = lora_name.is_none();
    for k in keys {
        match k {
            ExtraKey::Str(s) => {
                if !lora_skipped && Some(s.as_str()) == lora_name {
                    lora_skipped = true;
                } else {
                    out.salt = Some(s.clone());
                }
            }
            ExtraKey::Mm { identifier, offset } => {
                out.extras.mm.push((identifier.clone(), *offset))
            }
            ExtraKey::Bytes(b) => out.extras.prompt_embeds = Some(b.clone()),
            ExtraKey::Int(_) | ExtraKey::Other(_) => {}
        }
    }
    out
}

/// The keys of a `BlockStored` event's blocks (with tokens), given its parent's key (`None` when
/// the event starts a chain). The caller has checked `token_ids.len() == n * block_size`.
pub(crate) fn event_keys(
    hasher: &mut KeyHasher,
    model: &str,
    ev: &BlockStored,
    parent: Option<u64>,
    out: &mut Vec<BlockKey>,
) {
    out.clear();
    let bs = ev.block_size as usize;
    if bs == 0 {
        return;
    }
    let extras_of = |i: usize| {
        ev.extra_keys
            .as_ref()
            .and_then(|x| x.get(i))
            .and_then(|x| x.as_ref())
    };
    let mut prev = match parent {
        Some(k) => k,
        None => {
            let first = parse_extras(extras_of(0), ev.lora_name.as_deref());
            root_seed(model, ev.lora_name.as_deref(), first.salt.as_deref())
        }
    };
    for (i, toks) in ev
        .token_ids
        .chunks_exact(bs)
        .enumerate()
        .take(ev.block_hashes.len())
    {
        let key = match extras_of(i) {
            None => hasher.next(prev, toks),
            Some(x) => {
                let parsed = parse_extras(Some(x), ev.lora_name.as_deref());
                hasher.next_with(prev, toks, &parsed.extras)
            }
        };
        out.push(key);
        prev = key.0;
    }
}

/// What [`Writer::remove`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Removal {
    /// The engine did not hold the block on that tier.
    NotHeld,
    /// Removed; the block is still held (by that engine on another tier or through another
    /// announcement, or by another engine).
    StillHeld,
    /// Removed, and no engine holds the block on any tier any more.
    Unheld,
}

/// The capacity a full table of `cap` slots grows to, holding `used` slots, at most `max`.
fn grown(cap: usize, used: usize, max: usize) -> usize {
    ((cap as f64 * GROWTH) as usize)
        .max((used as f64 / GROW_TO) as usize)
        .min(max)
}

impl Writer {
    fn bytes(&self) -> usize {
        self.blocks.bytes()
            + self.aliases.bytes()
            + self.dups.capacity() * (std::mem::size_of::<((u32, u64, u8), u32)>() + 1)
    }

    fn max_slots(&self, config: &IndexConfig) -> usize {
        (config.byte_budget / 2 / SLOT_BYTES).max(64)
    }

    fn publish(&self, inner: &Inner) {
        if !Arc::ptr_eq(&inner.blocks.load(), &self.blocks) {
            inner.blocks.store(self.blocks.clone());
        }
        if !Arc::ptr_eq(&inner.aliases.load(), &self.aliases) {
            inner.aliases.store(self.aliases.clone());
        }
    }

    fn tick(&mut self, inner: &Inner, n: u64) {
        // The clock ticks about 256 times per table's worth of stores, so recency stays
        // meaningful for small and large tables alike.
        let every = (self.blocks.capacity() as u64 / 256).clamp(16, CLOCK_TICK_OPS);
        self.ops += n;
        if self.ops >= every {
            self.ops = 0;
            inner.clock.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The key of an engine hash: its alias, live or marked dead.
    fn resolve(&self, h: EngineHash) -> Option<u64> {
        let ak = alias_slot(h);
        self.aliases
            .lookup(ak)
            .or_else(|| self.aliases.lookup(ak | MARK))
    }

    fn depth_of(&self, key: u64) -> u32 {
        self.blocks.lookup(key).map_or(0, v_depth)
    }

    fn apply_stored(
        &mut self,
        inner: &Inner,
        e: u32,
        info: &EngineInfo,
        ev: &BlockStored,
        restore: bool,
        report: &mut ApplyReport,
    ) {
        if ev.group_idx.unwrap_or(0) != 0 {
            self.stats.other_group_events += 1;
            return;
        }
        let tier = Tier::of(ev.medium.as_ref(), ev.locality.as_deref());
        let stamp = inner.clock.load(Ordering::Relaxed) as u16;
        if ev.token_ids.is_empty() || ev.block_size == 0 {
            // A placeholder tier event: the blocks are named only by the engine's hashes.
            for &h in &ev.block_hashes {
                match self.resolve(h) {
                    Some(k) => {
                        let depth = self.depth_of(k);
                        // The block is held again: a dead alias comes back to life.
                        self.add_alias(inner, h, k);
                        self.add(inner, k, e, tier, depth, stamp, restore);
                        report.blocks_stored += 1;
                    }
                    None => {
                        self.stats.unresolved_tier_events += 1;
                        report.unresolved.push(h);
                    }
                }
            }
            self.stats.blocks_stored += report.blocks_stored as u64;
            return;
        }
        let bs = ev.block_size as usize;
        let n = ev.block_hashes.len();
        if ev.token_ids.len() != n * bs {
            self.stats.malformed_events += 1;
            return;
        }
        if info.block_size.load(Ordering::Relaxed) == 0 {
            info.block_size.store(ev.block_size, Ordering::Relaxed);
        }
        let (parent, mut depth) = match ev.parent_block_hash {
            None => (None, 0),
            Some(p) => match self.resolve(p) {
                Some(k) => (Some(k), self.depth_of(k) + 1),
                None => {
                    self.stats.orphans += 1;
                    report.orphans.push(ev.clone());
                    return;
                }
            },
        };
        let mut keys = std::mem::take(&mut self.scratch);
        event_keys(&mut self.hasher, &info.spec.model, ev, parent, &mut keys);
        // Fetch the table slots a few blocks ahead, so their cache misses overlap.
        const AHEAD: usize = 8;
        for (h, k) in ev.block_hashes.iter().zip(&keys).take(AHEAD) {
            self.aliases.prefetch_probe(alias_slot(*h));
            self.blocks.prefetch_probe(k.0);
        }
        for (i, (&h, &key)) in ev.block_hashes.iter().zip(&keys).enumerate() {
            if let (Some(ah), Some(ak)) = (ev.block_hashes.get(i + AHEAD), keys.get(i + AHEAD)) {
                self.aliases.prefetch_probe(alias_slot(*ah));
                self.blocks.prefetch_probe(ak.0);
            }
            self.add_alias(inner, h, key.0);
            self.add(inner, key.0, e, tier, depth, stamp, restore);
            depth += 1;
        }
        self.scratch = keys;
        report.blocks_stored += n;
        self.stats.blocks_stored += n as u64;
        self.tick(inner, n as u64);
    }

    fn apply_removed(&mut self, e: u32, ev: &BlockRemoved, report: &mut ApplyReport) {
        if ev.group_idx.unwrap_or(0) != 0 {
            self.stats.other_group_events += 1;
            return;
        }
        let tier = Tier::of(ev.medium.as_ref(), ev.locality.as_deref());
        for &h in &ev.block_hashes {
            let ak = alias_slot(h);
            let removed = match self.aliases.find(ak, |_| true) {
                Some(idx) => match self.remove(self.aliases.val(idx), e, tier) {
                    Removal::NotHeld => false,
                    Removal::StillHeld => true,
                    Removal::Unheld => {
                        // No engine holds the block any more: mark its alias dead, in place
                        // (its slot is in cache now), for the next rebuild or sweep to drop.
                        self.aliases.set_key(idx, ak | MARK);
                        self.dead_marked += 1;
                        true
                    }
                },
                None => false,
            };
            if removed {
                report.blocks_removed += 1;
                self.stats.blocks_removed += 1;
            } else {
                self.stats.unknown_removals += 1;
            }
        }
    }

    fn add_alias(&mut self, inner: &Inner, h: EngineHash, key: u64) {
        let ak = alias_slot(h);
        let mut seen = false;
        match self.aliases.find_or_vacancy(ak, &mut seen, |_| true) {
            Ok(idx) => {
                let old = self.aliases.val(idx);
                if old != key {
                    // Either a 64-bit collision between engines with different hash functions,
                    // or a dead alias (its block was dropped) being reused: keep the one in use.
                    if self.blocks.lookup(old).is_some() {
                        self.stats.alias_conflicts += 1;
                    } else {
                        self.aliases.set_val(idx, key);
                    }
                }
            }
            Err(mut vacancy) => {
                // An alias marked dead (its block is stored again) is revived where it lies.
                if self.dead_marked > 0 {
                    if let Some(idx) = self.aliases.find(ak | MARK, |_| true) {
                        self.aliases.set_val(idx, key);
                        self.aliases.set_key(idx, ak);
                        self.dead_marked -= 1;
                        return;
                    }
                }
                if self.alias_room(inner) {
                    vacancy = match self.aliases.find_or_vacancy(ak, &mut seen, |_| true) {
                        Ok(i) | Err(i) => i,
                    };
                }
                self.aliases.fill(vacancy, ak, key, &mut self.aliases_occ);
            }
        }
    }

    /// Marks (key, engine, tier) held. `restore` re-marks without counting a new announcement.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        inner: &Inner,
        key: u64,
        e: u32,
        tier: Tier,
        depth: u32,
        stamp: u16,
        restore: bool,
    ) {
        let (g, lane) = (e / LANES, e % LANES);
        let bit = lane_bit(lane);
        let class = class_of(g, tier);
        let mut key_seen = false;
        match self
            .blocks
            .find_or_vacancy(key, &mut key_seen, |v| v_class(v) == class)
        {
            Ok(idx) => {
                let v = self.blocks.val(idx);
                if v & bit != 0 {
                    if !restore {
                        *self.dups.entry((e, key, tier as u8)).or_insert(0) += 1;
                    }
                    if v_stamp(v) != stamp {
                        self.blocks.set_val(idx, with_stamp(v, stamp));
                    }
                    return;
                }
                self.blocks.set_val(idx, with_stamp(v | bit, stamp));
            }
            Err(mut vacancy) => {
                if self.block_room(inner) {
                    // The table was rebuilt or evicted: look again.
                    key_seen = false;
                    vacancy = match self.blocks.find_or_vacancy(key, &mut key_seen, |_| false) {
                        Ok(i) | Err(i) => i,
                    };
                }
                let mut v = bit
                    | (u64::from(g) << GROUP_SHIFT)
                    | ((tier as u64) << TIER_SHIFT)
                    | (u64::from(depth.min(MAX_DEPTH)) << DEPTH_SHIFT)
                    | (u64::from(stamp) << STAMP_SHIFT);
                if key_seen {
                    // Keep readers going from this key's earlier slots to the new one (marked
                    // first), and from the new one to any later slot.
                    let limit = self.blocks.probe_distance(key, vacancy);
                    if self.blocks.mark_before(key, limit, MORE) {
                        v |= MORE;
                    }
                }
                self.blocks.fill(vacancy, key, v, &mut self.blocks_occ);
                if !key_seen {
                    self.distinct += 1;
                }
            }
        }
        self.memberships += 1;
        self.counts[e as usize][tier as usize] += 1;
    }

    /// Drops one announcement of (key, engine, tier). A block left with no holder at all is
    /// reported as [`Removal::Unheld`]: the caller marks its alias dead.
    fn remove(&mut self, key: u64, e: u32, tier: Tier) -> Removal {
        if !self.dups.is_empty() {
            if let Some(c) = self.dups.get_mut(&(e, key, tier as u8)) {
                *c -= 1;
                if *c == 0 {
                    self.dups.remove(&(e, key, tier as u8));
                }
                return Removal::StillHeld;
            }
        }
        let (g, lane) = (e / LANES, e % LANES);
        let bit = lane_bit(lane);
        let class = class_of(g, tier);
        let Some(idx) = self.blocks.find(key, |v| v_class(v) == class) else {
            return Removal::NotHeld;
        };
        let v = self.blocks.val(idx);
        if v & bit == 0 {
            return Removal::NotHeld;
        }
        let nv = v & !bit;
        let mut out = Removal::StillHeld;
        if nv as u32 == 0 {
            self.blocks.remove(idx, &mut self.blocks_occ);
            if self.blocks.lookup(key).is_none() {
                self.distinct -= 1;
                out = Removal::Unheld;
            }
        } else {
            self.blocks.set_val(idx, nv);
        }
        self.memberships -= 1;
        self.counts[e as usize][tier as usize] -= 1;
        out
    }

    /// Removes every membership of engine `e`.
    fn purge(&mut self, e: u32) {
        let (g, lane) = (e / LANES, e % LANES);
        let mask = lane_bit(lane);
        let mut hits = Vec::new();
        self.blocks.scan(|_, k, v| {
            if v_group(v) == g && v & mask != 0 {
                hits.push((k, v_class(v)));
            }
        });
        // Removals shift slots: find each one again.
        for (k, class) in hits {
            let Some(idx) = self.blocks.find(k, |v| v_class(v) == class) else {
                continue;
            };
            let v = self.blocks.val(idx);
            self.memberships -= 1;
            let nv = v & !mask;
            if nv as u32 == 0 {
                self.blocks.remove(idx, &mut self.blocks_occ);
                if self.blocks.lookup(k).is_none() {
                    self.distinct -= 1;
                    self.dead_aliases += 1;
                }
            } else {
                self.blocks.set_val(idx, nv);
            }
        }
        self.dups.retain(|&(de, _, _), _| de != e);
        if let Some(c) = self.counts.get_mut(e as usize) {
            *c = [0; TIERS];
        }
    }

    /// Makes room for one more block slot. Returns true if the table changed.
    fn block_room(&mut self, inner: &Inner) -> bool {
        let cap = self.blocks.capacity();
        let used = self.blocks_occ.live + 1;
        if (used as f64) <= MAX_LOAD * cap as f64 {
            return false;
        }
        let max = self.max_slots(&inner.config);
        if cap < max {
            self.rebuild_blocks(grown(cap, used, max));
        } else {
            self.evict(inner, (EVICT_TO * cap as f64) as usize);
        }
        true
    }

    fn rebuild_blocks(&mut self, cap: usize) {
        let (t, occ) = self.blocks.rebuild_with_more(cap, MORE, |_, _| true);
        self.blocks = Arc::new(t);
        self.blocks_occ = occ;
    }

    /// Makes room for one more alias: drops aliases of blocks no engine holds, grows, or evicts.
    /// Returns true if the table changed.
    fn alias_room(&mut self, inner: &Inner) -> bool {
        let cap = self.aliases.capacity();
        let used = self.aliases_occ.live + 1;
        if (used as f64) <= MAX_LOAD * cap as f64 {
            return false;
        }
        let max = self.max_slots(&inner.config);
        let live = self.aliases_occ.live;
        // Aliases marked dead cost nothing to find; those of blocks evicted or purged (which
        // name no alias) are found only by looking up every alias's block.
        let dead = self.dead_marked + self.dead_aliases;
        if dead * 8 < live && cap < max {
            // Few aliases are dead: grow, dropping the marked ones on the way.
            let (t, occ) = self
                .aliases
                .rebuild(grown(cap, used, max), |k, _| k & MARK == 0);
            self.aliases = Arc::new(t);
            self.aliases_occ = occ;
            self.dead_marked = 0;
            return true;
        }
        let fit = |live: usize| {
            ((live as f64 / GROW_TO) as usize).max(inner.config.initial_slots.max(64))
        };
        if self.dead_aliases * 8 < live {
            // Most dead aliases are marked: drop them in place, in one pass over the table.
            self.aliases
                .sweep(|k, _| k & MARK != 0, &mut self.aliases_occ);
            self.dead_marked = 0;
            let live = self.aliases_occ.live;
            let resized = if live as f64 > EVICT_TO * cap as f64 && cap < max {
                grown(cap, live + 1, max)
            } else if (fit(live + 1) as f64) < SHRINK_BELOW * cap as f64 {
                fit(live + 1)
            } else {
                cap
            };
            if resized != cap {
                let (t, occ) = self.aliases.rebuild(resized, |_, _| true);
                self.aliases = Arc::new(t);
                self.aliases_occ = occ;
            }
            if (self.aliases_occ.live + 1) as f64 <= MAX_LOAD * self.aliases.capacity() as f64 {
                return true;
            }
        }
        let live_est = self.aliases_occ.live.saturating_sub(self.dead_aliases);
        let cap = self.aliases.capacity();
        let mut target = cap;
        if live_est as f64 > EVICT_TO * cap as f64 {
            if cap < max {
                target = self::grown(cap, live_est + 1, max);
            } else {
                // At the budget with live aliases: evict blocks so their aliases can go.
                let want = (self.blocks_occ.live as f64 * 0.8) as usize;
                self.evict(inner, want);
            }
        }
        // Drop the aliases of blocks no engine holds any more (marked ones kept until now for
        // tier events that arrive after the block left the GPU, e.g. an offload completing
        // late).
        let blocks = self.blocks.clone();
        let (t, occ) = self.aliases.rebuild_prefetching(
            target,
            |k, v| {
                if k & MARK == 0 {
                    blocks.prefetch(v)
                }
            },
            |k, v| k & MARK == 0 && blocks.lookup(v).is_some(),
        );
        // Far fewer were live than the table holds: move them to a table sized for them, as a
        // grown one would be (a plain copy, no lookups).
        let fit = fit(occ.live + 1);
        let (t, occ) = if (fit as f64) < SHRINK_BELOW * t.capacity() as f64 {
            t.rebuild(fit, |_, _| true)
        } else {
            (t, occ)
        };
        self.aliases = Arc::new(t);
        self.aliases_occ = occ;
        self.dead_aliases = 0;
        self.dead_marked = 0;
        true
    }

    /// Evicts blocks until at most `target` block slots are live: in windows of the table, the
    /// oldest stamps first and, among equally old, the deepest blocks first.
    fn evict(&mut self, inner: &Inner, target: usize) {
        const WINDOW: usize = 512;
        let now = inner.clock.load(Ordering::Relaxed) as u16;
        let cap = self.blocks.capacity();
        let mut cands: Vec<(u16, u32, usize, u64, u64)> = Vec::with_capacity(WINDOW);
        let mut guard = 0;
        while self.blocks_occ.live > target && guard < 4 * (cap / WINDOW + 1) {
            guard += 1;
            cands.clear();
            for off in 0..WINDOW {
                let idx = (self.evict_hand + off) % cap;
                let k = self.blocks.key(idx);
                if k > crate::table::TOMB {
                    let v = self.blocks.val(idx);
                    cands.push((now.wrapping_sub(v_stamp(v)), v_depth(v), idx, k, v));
                }
            }
            self.evict_hand = (self.evict_hand + WINDOW) % cap;
            // Oldest first, then deepest.
            cands.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
            let excess = self.blocks_occ.live - target;
            let take = excess.min(cands.len().div_ceil(4)).max(1).min(cands.len());
            for &(_, _, idx, k, v) in &cands[..take] {
                // Removals shift slots: skip a candidate that moved (or whose value changed).
                if self.blocks.key(idx) != k || self.blocks.val(idx) != v {
                    continue;
                }
                let (g, t) = (v_group(v), v_tier(v));
                let mut mask = v as u32;
                while mask != 0 {
                    let lane = mask.trailing_zeros();
                    mask &= mask - 1;
                    let e = g * LANES + lane;
                    self.memberships -= 1;
                    if let Some(c) = self.counts.get_mut(e as usize) {
                        c[t] = c[t].saturating_sub(1);
                    }
                    if !self.dups.is_empty() {
                        self.dups.remove(&(e, k, t as u8));
                    }
                }
                self.blocks.remove(idx, &mut self.blocks_occ);
                if self.blocks.lookup(k).is_none() {
                    self.distinct -= 1;
                    self.dead_aliases += 1;
                }
                self.stats.evicted_blocks += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests;

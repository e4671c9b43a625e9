//! The tiered store: host memory in front, disk and remote tiers behind, joined by a pipeline.
//!
//! * **Write-behind.** [`TieredStore::put`] copies the block into the host tier and returns; a
//!   pool of writer threads copies it down to the disk and remote tiers. The queue is bounded:
//!   when it is full, `put` blocks until there is room (backpressure) and
//!   [`TieredStore::try_put`] returns [`StoreError::Busy`]. A queued block stays pinned in the
//!   host tier until it has been written down, so it cannot be evicted before it is safe.
//! * **Loads.** [`TieredStore::get`] serves from the host tier, else loads from disk (straight
//!   into a host slot with O_DIRECT), else from the remotes in order, and promotes the block to
//!   the host tier. Concurrent requests for one block share one load (single-flight).
//! * **Prefetch.** [`TieredStore::prefetch`] starts loads on a pool of loader threads with a
//!   deadline; loads that have not started by the deadline are skipped, and the handle reports
//!   each block's outcome.
//! * **Lookup.** [`TieredStore::lookup`] says how many leading blocks of a sequence are held and
//!   on which tier, from the tiers' indexes, without reading any block.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender, TrySendError};
use kvindex::{BlockKey, KeyHasher, Medium, Namespace};
use parking_lot::{Condvar, Mutex};

use crate::disk::{DiskConfig, DiskPut, DiskTier};
use crate::error::{Result, StoreError};
use crate::events::{BlockMeta, TierEvents};
use crate::host::{HostConfig, HostPut, HostTier, PinnedPut};
use crate::remote::{BlockSource, RemoteTier};
use crate::stats::TierStats;

/// A fill function copying `data` into a slot.
fn copy_from(data: &[u8]) -> impl FnMut(&mut [u8]) -> Result<()> + '_ {
    move |dst| {
        dst.copy_from_slice(data);
        Ok(())
    }
}

/// Which tier holds a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TierKind {
    Host,
    Disk,
    /// The remote tier at this position of [`StoreConfig::remotes`].
    Remote(usize),
}

/// Settings of a [`TieredStore`].
pub struct StoreConfig {
    pub host: HostConfig,
    pub disk: Option<DiskConfig>,
    /// Remote tiers, searched in order after the disk.
    pub remotes: Vec<Arc<dyn RemoteTier>>,
    /// Blocks waiting to be written down (bounded; at most half the host slots are used).
    pub write_queue: usize,
    /// Threads writing blocks down.
    pub writers: usize,
    /// Threads loading blocks for prefetch and async gets.
    pub loaders: usize,
    /// Also write every block to the remote tiers (write-behind), not just to disk.
    pub write_remote: bool,
    /// Where tier events go.
    pub events: Option<Arc<TierEvents>>,
}

impl StoreConfig {
    /// A host-only store; add tiers by setting the fields.
    pub fn new(host: HostConfig) -> Self {
        StoreConfig {
            host,
            disk: None,
            remotes: Vec::new(),
            write_queue: 256,
            writers: 2,
            loaders: 4,
            write_remote: true,
            events: None,
        }
    }
}

/// How many leading blocks are available, and where.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lookup {
    /// Tier of each leading block held (its length is the number of leading blocks available).
    pub tiers: Vec<TierKind>,
}

impl Lookup {
    /// Number of leading blocks available.
    pub fn blocks(&self) -> usize {
        self.tiers.len()
    }

    /// Leading blocks available on `tier`.
    pub fn on(&self, tier: TierKind) -> usize {
        self.tiers.iter().filter(|&&t| t == tier).count()
    }
}

/// The outcome of one block of a prefetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prefetched {
    /// Already in the host tier.
    Host,
    /// Loaded into the host tier from this tier.
    Loaded(TierKind),
    /// No tier holds it.
    Missing,
    /// The load failed (the message says why); the block must be recomputed.
    Failed(String),
    /// The deadline passed first.
    Deadline,
}

/// Store-wide counters beyond the tiers' own.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PipelineStats {
    /// Blocks queued for write-behind.
    pub queued: u64,
    /// Blocks written down (per block, all lower tiers tried).
    pub written: u64,
    /// Write-behind failures (any tier).
    pub write_errors: u64,
    /// Puts that waited for queue room.
    pub backpressure_waits: u64,
    /// Gets served by another request's load of the same block.
    pub coalesced: u64,
    /// Blocks loaded from a lower tier into the host tier.
    pub promotions: u64,
    /// Prefetches skipped at their deadline.
    pub deadline_missed: u64,
    /// Blocks in the write-behind queue now.
    pub in_queue: u64,
}

/// Every tier's statistics.
#[derive(Clone, Debug)]
pub struct StoreStats {
    pub host: TierStats,
    pub disk: Option<TierStats>,
    pub remotes: Vec<TierStats>,
    pub pipeline: PipelineStats,
}

struct WriteJob {
    key: BlockKey,
    data: Bytes,
    meta: Option<Arc<BlockMeta>>,
    remote: bool,
}

type Reply = Box<dyn FnOnce(Result<Option<(Bytes, TierKind)>>) + Send>;

struct LoadJob {
    key: BlockKey,
    deadline: Option<Instant>,
    reply: Reply,
}

type FlightResult = std::result::Result<Option<(Bytes, TierKind)>, Arc<StoreError>>;

#[derive(Default)]
struct Flight {
    done: Mutex<Option<FlightResult>>,
    cv: Condvar,
}

#[derive(Default)]
struct Counters {
    queued: AtomicU64,
    written: AtomicU64,
    write_errors: AtomicU64,
    backpressure: AtomicU64,
    coalesced: AtomicU64,
    promotions: AtomicU64,
    deadline: AtomicU64,
}

struct Core {
    host: HostTier,
    disk: Option<DiskTier>,
    remotes: Vec<Arc<dyn RemoteTier>>,
    events: Option<Arc<TierEvents>>,
    flights: Mutex<HashMap<BlockKey, Arc<Flight>>>,
    pending: AtomicUsize,
    drained: (Mutex<()>, Condvar),
    c: Counters,
}

struct Handle {
    core: Arc<Core>,
    wb: Option<Sender<WriteJob>>,
    load: Option<Sender<LoadJob>>,
    write_remote: bool,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.wb.take();
        self.load.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The tiered store. Cheap to clone; every clone is the same store. Dropping the last clone
/// finishes the queued write-behind work and stops the threads.
#[derive(Clone)]
pub struct TieredStore {
    h: Arc<Handle>,
}

impl TieredStore {
    /// Builds every tier (the disk tier recovers its blocks) and starts the threads.
    pub fn new(cfg: StoreConfig) -> Result<Self> {
        let host = HostTier::new(&cfg.host)?;
        let disk = match &cfg.disk {
            Some(d) => {
                if d.block_bytes != cfg.host.block_bytes {
                    return Err(StoreError::Invalid(format!(
                        "disk blocks of {} bytes, host blocks of {}",
                        d.block_bytes, cfg.host.block_bytes
                    )));
                }
                Some(DiskTier::open(d)?)
            }
            None => None,
        };
        // Queued blocks are pinned in the host tier: keep half of it free for new blocks.
        let qcap = cfg
            .write_queue
            .clamp(1, (host.capacity_blocks() / 2).max(1));
        let core = Arc::new(Core {
            host,
            disk,
            remotes: cfg.remotes,
            events: cfg.events,
            flights: Mutex::new(HashMap::new()),
            pending: AtomicUsize::new(0),
            drained: (Mutex::new(()), Condvar::new()),
            c: Counters::default(),
        });
        let mut threads = Vec::new();
        let lower = core.disk.is_some() || !core.remotes.is_empty();
        let wb = if lower {
            let (tx, rx) = bounded::<WriteJob>(qcap);
            for i in 0..cfg.writers.max(1) {
                let (core, rx) = (core.clone(), rx.clone());
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("kvstore-writer-{i}"))
                        .spawn(move || writer(core, rx))
                        .map_err(|e| StoreError::io("spawning a writer", e))?,
                );
            }
            Some(tx)
        } else {
            None
        };
        let (ltx, lrx) = unbounded::<LoadJob>();
        for i in 0..cfg.loaders.max(1) {
            let (core, rx) = (core.clone(), lrx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("kvstore-loader-{i}"))
                    .spawn(move || loader(core, rx))
                    .map_err(|e| StoreError::io("spawning a loader", e))?,
            );
        }
        Ok(TieredStore {
            h: Arc::new(Handle {
                core,
                wb,
                load: Some(ltx),
                write_remote: cfg.write_remote,
                threads,
            }),
        })
    }

    /// The host tier.
    pub fn host(&self) -> &HostTier {
        &self.h.core.host
    }

    /// The disk tier, if any.
    pub fn disk(&self) -> Option<&DiskTier> {
        self.h.core.disk.as_ref()
    }

    /// The remote tiers.
    pub fn remotes(&self) -> &[Arc<dyn RemoteTier>] {
        &self.h.core.remotes
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.h.core.host.block_bytes()
    }

    /// Stores a block: into the host tier now, down to the lower tiers in the background.
    /// Blocks while the write-behind queue is full.
    pub fn put(&self, key: BlockKey, data: &[u8], meta: Option<BlockMeta>) -> Result<()> {
        self.put_inner(
            key,
            data.len(),
            &mut copy_from(data),
            meta,
            true,
            self.h.write_remote,
        )
    }

    /// Like [`TieredStore::put`], but the block is written straight into its host slot by `fill`
    /// (which gets exactly [`TieredStore::block_bytes`] bytes), e.g. gathered from an engine's
    /// KV pages without an intermediate buffer. If `fill` fails nothing is stored. A key already
    /// held is not filled again.
    pub fn put_with(
        &self,
        key: BlockKey,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
        meta: Option<BlockMeta>,
    ) -> Result<()> {
        let len = self.block_bytes();
        self.put_inner(key, len, fill, meta, true, self.h.write_remote)
    }

    /// Like [`TieredStore::put`], but fails with [`StoreError::Busy`] instead of waiting for
    /// queue room (the block is then in the host tier only).
    pub fn try_put(&self, key: BlockKey, data: &[u8], meta: Option<BlockMeta>) -> Result<()> {
        self.put_inner(
            key,
            data.len(),
            &mut copy_from(data),
            meta,
            false,
            self.h.write_remote,
        )
    }

    fn put_inner(
        &self,
        key: BlockKey,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
        meta: Option<BlockMeta>,
        wait: bool,
        remote: bool,
    ) -> Result<()> {
        let core = &self.h.core;
        let write_down = self.h.wb.is_some() && (core.disk.is_some() || remote);
        let stored = loop {
            // A block that goes down to lower tiers stays pinned from the moment it is stored
            // until its writer is done: a concurrent put must not evict it before that (it would
            // be lost from every tier).
            // `Some((evicted, pin))` when stored, `None` when the key was already held.
            let r = if write_down {
                core.host.put_pinned(key, len, &mut *fill).map(|p| match p {
                    PinnedPut::Stored { evicted, block } => Some((evicted, Some(block))),
                    PinnedPut::Present => None,
                })
            } else {
                core.host.put_with(key, len, &mut *fill).map(|p| match p {
                    HostPut::Stored { evicted } => Some((evicted, None)),
                    HostPut::Present => None,
                })
            };
            match r {
                // Every host slot is pinned, some by blocks waiting to be written down: that is
                // backpressure too. Wait for the writers (or refuse, for try_put).
                Err(StoreError::AllPinned { .. }) if core.pending.load(Relaxed) > 0 => {
                    if !wait {
                        return Err(StoreError::Busy);
                    }
                    core.c.backpressure.fetch_add(1, Relaxed);
                    let (m, cv) = &core.drained;
                    let mut g = m.lock();
                    cv.wait_for(&mut g, Duration::from_millis(20));
                }
                r => break r?,
            }
        };
        let Some((evicted, pinned)) = stored else {
            return Ok(());
        };
        if let Some(ev) = &core.events {
            ev.removed(Medium::Cpu, &evicted);
            ev.stored(Medium::Cpu, key, meta.as_ref());
        }
        let (Some(wb), Some(pinned)) = (&self.h.wb, pinned) else {
            return Ok(());
        };
        let job = WriteJob {
            key,
            data: pinned.into_bytes(),
            meta: meta.map(Arc::new),
            remote,
        };
        core.pending.fetch_add(1, Relaxed);
        core.c.queued.fetch_add(1, Relaxed);
        let sent = match wb.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) if wait => {
                core.c.backpressure.fetch_add(1, Relaxed);
                wb.send(job).map_err(|_| StoreError::Closed)
            }
            Err(TrySendError::Full(_)) => Err(StoreError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(StoreError::Closed),
        };
        if sent.is_err() {
            core.c.queued.fetch_sub(1, Relaxed);
            core.done_one();
        }
        sent
    }

    /// The block under `key` from the fastest tier holding it (promoted to the host tier), or
    /// `None`. The returned bytes pin the block's host slot until dropped.
    pub fn get(&self, key: BlockKey) -> Result<Option<Bytes>> {
        Ok(self.h.core.get(key)?.map(|(b, _)| b))
    }

    /// Like [`TieredStore::get`], also saying which tier served it.
    pub fn get_from(&self, key: BlockKey) -> Result<Option<(Bytes, TierKind)>> {
        self.h.core.get(key)
    }

    /// [`TieredStore::get`] as a future (the load runs on the store's loader threads; works with
    /// any executor).
    pub fn get_async(
        &self,
        key: BlockKey,
    ) -> impl Future<Output = Result<Option<Bytes>>> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let submitted = match &self.h.load {
            Some(l) => l
                .send(LoadJob {
                    key,
                    deadline: None,
                    reply: Box::new(move |r| {
                        let _ = tx.send(r);
                    }),
                })
                .is_ok(),
            None => false,
        };
        async move {
            if !submitted {
                return Err(StoreError::Closed);
            }
            match rx.await {
                Ok(r) => r.map(|o| o.map(|(b, _)| b)),
                Err(_) => Err(StoreError::Closed),
            }
        }
    }

    /// Starts loading `keys` into the host tier; loads not started by `deadline` are skipped.
    pub fn prefetch(&self, keys: &[BlockKey], deadline: Instant) -> Prefetch {
        let n = keys.len();
        let state = Arc::new((Mutex::new((vec![None; n], 0usize)), Condvar::new()));
        for (i, &key) in keys.iter().enumerate() {
            let st = state.clone();
            let finish = move |o: Prefetched| {
                let (m, cv) = &*st;
                let mut g = m.lock();
                if g.0[i].is_none() {
                    g.0[i] = Some(o);
                    g.1 += 1;
                }
                cv.notify_all();
            };
            if self.h.core.host.contains(key) {
                finish(Prefetched::Host);
                continue;
            }
            let job = LoadJob {
                key,
                deadline: Some(deadline),
                reply: Box::new(move |r| {
                    finish(match r {
                        Ok(Some((_, t))) => Prefetched::Loaded(t),
                        Ok(None) => Prefetched::Missing,
                        Err(StoreError::Deadline(_)) => Prefetched::Deadline,
                        Err(e) => Prefetched::Failed(e.to_string()),
                    })
                }),
            };
            if let Some(l) = &self.h.load {
                if let Err(e) = l.send(job) {
                    (e.into_inner().reply)(Err(StoreError::Closed));
                }
            }
        }
        Prefetch {
            state,
            deadline,
            core: self.h.core.clone(),
        }
    }

    /// How many leading blocks of `keys` are held, and on which tier, without loading them.
    /// Remote tiers are asked (one round trip per block) only when `remote` is set.
    pub fn lookup(&self, keys: &[BlockKey], remote: bool) -> Lookup {
        let core = &self.h.core;
        let mut tiers = Vec::new();
        'blocks: for &k in keys {
            if core.host.contains(k) {
                tiers.push(TierKind::Host);
                continue;
            }
            if core.disk.as_ref().is_some_and(|d| d.contains(k)) {
                tiers.push(TierKind::Disk);
                continue;
            }
            if remote {
                for (i, r) in core.remotes.iter().enumerate() {
                    if r.contains(k).unwrap_or(false) {
                        tiers.push(TierKind::Remote(i));
                        continue 'blocks;
                    }
                }
            }
            break;
        }
        Lookup { tiers }
    }

    /// [`TieredStore::lookup`] for a token sequence: its full blocks of `block_size` tokens
    /// keyed in `ns`.
    pub fn lookup_tokens(
        &self,
        ns: &Namespace,
        tokens: &[u32],
        block_size: usize,
        remote: bool,
    ) -> Lookup {
        let keys = KeyHasher::new().chain(ns, tokens, block_size);
        self.lookup(&keys, remote)
    }

    /// Waits until the write-behind queue is empty (every queued block written down or failed).
    pub fn flush(&self) {
        let core = &self.h.core;
        let (m, cv) = &core.drained;
        let mut g = m.lock();
        while core.pending.load(Relaxed) > 0 {
            cv.wait_for(&mut g, Duration::from_millis(50));
        }
    }

    /// Every tier's statistics.
    pub fn stats(&self) -> StoreStats {
        let core = &self.h.core;
        let g = |a: &AtomicU64| a.load(Relaxed);
        StoreStats {
            host: core.host.stats(),
            disk: core.disk.as_ref().map(|d| d.stats()),
            remotes: core.remotes.iter().map(|r| r.stats()).collect(),
            pipeline: PipelineStats {
                queued: g(&core.c.queued),
                written: g(&core.c.written),
                write_errors: g(&core.c.write_errors),
                backpressure_waits: g(&core.c.backpressure),
                coalesced: g(&core.c.coalesced),
                promotions: g(&core.c.promotions),
                deadline_missed: g(&core.c.deadline),
                in_queue: core.pending.load(Relaxed) as u64,
            },
        }
    }
}

impl BlockSource for TieredStore {
    fn block_bytes(&self) -> usize {
        TieredStore::block_bytes(self)
    }

    fn get_local(&self, key: BlockKey) -> Result<Option<Bytes>> {
        self.h.core.get_local(key).map(|o| o.map(|(b, _)| b))
    }

    fn put_local(&self, key: BlockKey, data: &[u8]) -> Result<()> {
        // A peer's block stays local: writing it to our remotes could send it back.
        self.put_inner(key, data.len(), &mut copy_from(data), None, true, false)
    }

    fn contains_local(&self, key: BlockKey) -> bool {
        self.h.core.host.contains(key) || self.h.core.disk.as_ref().is_some_and(|d| d.contains(key))
    }
}

/// A running prefetch.
pub struct Prefetch {
    #[allow(clippy::type_complexity)]
    state: Arc<(Mutex<(Vec<Option<Prefetched>>, usize)>, Condvar)>,
    deadline: Instant,
    core: Arc<Core>,
}

impl Prefetch {
    /// Waits until every block is done or the deadline passes; blocks not done by then are
    /// [`Prefetched::Deadline`].
    pub fn wait(self) -> Vec<Prefetched> {
        let (m, cv) = &*self.state;
        let mut g = m.lock();
        while g.1 < g.0.len() {
            if cv.wait_until(&mut g, self.deadline).timed_out() {
                break;
            }
        }
        let mut out = Vec::with_capacity(g.0.len());
        for o in g.0.iter_mut() {
            out.push(match o.take() {
                Some(o) => o,
                None => {
                    self.core.c.deadline.fetch_add(1, Relaxed);
                    *o = Some(Prefetched::Deadline);
                    Prefetched::Deadline
                }
            });
        }
        out
    }

    /// Whether every block is done.
    pub fn is_done(&self) -> bool {
        let g = self.state.0.lock();
        g.1 == g.0.len()
    }
}

impl Core {
    /// One write-behind job finished: wake `flush` and puts waiting for host room.
    fn done_one(&self) {
        self.pending.fetch_sub(1, Relaxed);
        let _g = self.drained.0.lock();
        self.drained.1.notify_all();
    }

    fn get(&self, key: BlockKey) -> Result<Option<(Bytes, TierKind)>> {
        self.load(key, true)
    }

    fn get_local(&self, key: BlockKey) -> Result<Option<(Bytes, TierKind)>> {
        self.load(key, false)
    }

    /// Host hit, or one shared load for all concurrent requests of `key`.
    fn load(&self, key: BlockKey, remote: bool) -> Result<Option<(Bytes, TierKind)>> {
        if let Some(b) = self.host.get(key) {
            return Ok(Some((b.into_bytes(), TierKind::Host)));
        }
        let (flight, leader) = {
            let mut f = self.flights.lock();
            match f.get(&key) {
                Some(fl) => (fl.clone(), false),
                None => {
                    let fl = Arc::new(Flight::default());
                    f.insert(key, fl.clone());
                    (fl, true)
                }
            }
        };
        if !leader {
            self.c.coalesced.fetch_add(1, Relaxed);
            let mut g = flight.done.lock();
            while g.is_none() {
                flight.cv.wait(&mut g);
            }
            return match g.as_ref().expect("flight finished") {
                Ok(v) => Ok(v.clone()),
                Err(e) => Err(StoreError::Shared(e.clone())),
            };
        }
        let r = self.load_uncached(key, remote);
        let shared: FlightResult = match &r {
            Ok(v) => Ok(v.clone()),
            Err(e) => Err(Arc::new(StoreError::Shared(Arc::new(clone_err(e))))),
        };
        *flight.done.lock() = Some(shared);
        flight.cv.notify_all();
        self.flights.lock().remove(&key);
        r
    }

    fn promoted(&self, key: BlockKey, evicted: &[BlockKey], tier: TierKind) {
        self.c.promotions.fetch_add(1, Relaxed);
        if let Some(ev) = &self.events {
            ev.removed(Medium::Cpu, evicted);
            ev.stored(Medium::Cpu, key, None);
        }
        let _ = tier;
    }

    fn load_uncached(&self, key: BlockKey, remote: bool) -> Result<Option<(Bytes, TierKind)>> {
        let mut err: Option<StoreError> = None;
        if let Some(d) = &self.disk {
            if d.contains(key) {
                let bb = self.host.block_bytes();
                // The promoted block comes back pinned: a concurrent put cannot evict it
                // between its promotion and this read.
                let r = self
                    .host
                    .put_pinned(key, bb, |dst| match d.get_into(key, dst) {
                        Ok(true) => Ok(()),
                        Ok(false) => Err(StoreError::Invalid("__miss".into())),
                        Err(e) => Err(e),
                    });
                let direct = match r {
                    Ok(PinnedPut::Stored { evicted, block }) => {
                        self.promoted(key, &evicted, TierKind::Disk);
                        return Ok(Some((block.into_bytes(), TierKind::Disk)));
                    }
                    // Held in host memory by now (or still being filled there by a concurrent
                    // put): take it from there if it is ready, else read it from disk.
                    Ok(PinnedPut::Present) => match self.host.get(key) {
                        Some(b) => return Ok(Some((b.into_bytes(), TierKind::Host))),
                        None => true,
                    },
                    Err(StoreError::Invalid(m)) if m == "__miss" => false,
                    // No host room: serve straight from disk without promoting.
                    Err(StoreError::AllPinned { .. }) => true,
                    Err(e) => {
                        err = Some(e);
                        false
                    }
                };
                if direct {
                    match d.get(key) {
                        Ok(Some(b)) => return Ok(Some((b, TierKind::Disk))),
                        Ok(None) => {}
                        Err(e) => err = Some(e),
                    }
                }
            }
        }
        if remote {
            for (i, r) in self.remotes.iter().enumerate() {
                match r.get(key) {
                    Ok(Some(b)) => {
                        if let Ok(HostPut::Stored { evicted }) = self.host.put(key, &b) {
                            self.promoted(key, &evicted, TierKind::Remote(i));
                        }
                        return Ok(Some((b, TierKind::Remote(i))));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        if err.is_none() {
                            err = Some(e);
                        }
                    }
                }
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }
}

fn clone_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Shared(a) => StoreError::Shared(a.clone()),
        other => StoreError::Remote {
            tier: "store".into(),
            reason: other.to_string(),
        },
    }
}

fn writer(core: Arc<Core>, rx: Receiver<WriteJob>) {
    while let Ok(job) = rx.recv() {
        let mut failed = false;
        if let Some(d) = &core.disk {
            match d.put(job.key, &job.data) {
                Ok(DiskPut::Stored { evicted }) => {
                    if let Some(ev) = &core.events {
                        ev.removed(Medium::Storage, &evicted);
                        ev.stored(Medium::Storage, job.key, job.meta.as_deref());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    failed = true;
                    tracing::warn!(key = format_args!("{:016x}", job.key.0), error = %e, "write-behind to disk failed");
                }
            }
        }
        if job.remote {
            for r in &core.remotes {
                if let Err(e) = r.put(job.key, &job.data) {
                    failed = true;
                    tracing::warn!(tier = r.name(), key = format_args!("{:016x}", job.key.0), error = %e, "write-behind to remote failed");
                }
            }
        }
        drop(job);
        if failed {
            core.c.write_errors.fetch_add(1, Relaxed);
        }
        core.c.written.fetch_add(1, Relaxed);
        core.done_one();
    }
}

fn loader(core: Arc<Core>, rx: Receiver<LoadJob>) {
    while let Ok(job) = rx.recv() {
        if job.deadline.is_some_and(|d| Instant::now() >= d) {
            core.c.deadline.fetch_add(1, Relaxed);
            (job.reply)(Err(StoreError::Deadline(job.key.0)));
            continue;
        }
        let r = core.get(job.key);
        (job.reply)(r);
    }
}

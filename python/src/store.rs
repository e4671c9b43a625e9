//! `kvmesh.BlockStore`: kvstore's tiered store (host memory, optionally a local disk) driven from
//! Python, with the copies between an engine's KV pages and the store done in Rust, the GIL
//! released.
//!
//! The engine's KV cache is registered once as a list of layers, each a base address and a
//! stride between consecutive blocks (vLLM's layer-outer layouts: block `b` of layer `l` starts
//! at `base[l] + b * stride[l]`), all with pages of the same size. One store block is every
//! layer's page of one engine block, layer after layer (see kvstore's crate documentation).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use kvindex::{BlockKey, KvEvent, Medium};
use kvstore::{DiskConfig, HostConfig, StoreConfig, StoreError, TierEvents, TierKind, TieredStore};

/// Where the engine's KV pages are.
struct Layout {
    /// Per layer: base address and bytes between consecutive blocks.
    layers: Vec<(usize, usize)>,
    page: usize,
    num_blocks: usize,
}

impl Layout {
    fn check(&self, block: u64) -> Result<usize, StoreError> {
        let b = block as usize;
        if b >= self.num_blocks {
            return Err(StoreError::Invalid(format!(
                "block id {block} is outside the registered {} blocks",
                self.num_blocks
            )));
        }
        Ok(b)
    }
}

/// The engine's KV cache in GPU memory, moved by kvstore's CUDA copy engine to and from the
/// (GPU-pinned) host tier's slots.
#[cfg(feature = "cuda")]
struct GpuLayout {
    engine: kvstore::cuda::Engine,
    cache: kvstore::cuda::KvCache,
    slots: kvstore::cuda::SlotSpec,
    /// The host arena: base address, length, bytes between slots.
    base: u64,
    len: usize,
    stride: usize,
}

#[cfg(feature = "cuda")]
fn gpu_err(e: kvstore::cuda::CudaError) -> StoreError {
    StoreError::Invalid(format!("CUDA copy engine: {e}"))
}

#[cfg(feature = "cuda")]
impl GpuLayout {
    fn check(&self, block: u64) -> Result<u32, StoreError> {
        let n = self.cache.spec().num_blocks;
        u32::try_from(block).ok().filter(|&b| b < n).ok_or_else(|| {
            StoreError::Invalid(format!(
                "block id {block} is outside the registered {n} blocks"
            ))
        })
    }

    /// The host slot a pointer into the arena is in.
    fn slot_of(&self, p: *const u8) -> Option<u32> {
        let off = (p as u64).checked_sub(self.base)?;
        if off >= self.len as u64 || !off.is_multiple_of(self.stride as u64) {
            return None;
        }
        u32::try_from(off / self.stride as u64).ok()
    }

    /// Gathers GPU block `block` into the host slot holding `dst`.
    fn gather(&self, block: u32, dst: &mut [u8]) -> Result<(), StoreError> {
        let slot = self
            .slot_of(dst.as_ptr())
            .ok_or_else(|| StoreError::Invalid("a host slot outside the arena".into()))?;
        let moves = [kvstore::cuda::BlockMove { block, slot }];
        // SAFETY: the arena is pinned and mapped for the GPU (checked at registration) and lives
        // as long as the store; `dst` is this slot, which the tier hands to nobody else while it
        // is being filled; `wait` returns only once the copy is done.
        unsafe {
            self.engine.gather_raw(
                &self.cache,
                self.base,
                self.len,
                &self.slots,
                &moves,
                kvstore::cuda::CopyPath::Auto,
            )
        }
        .and_then(|t| t.wait())
        .map_err(gpu_err)
    }
}

/// A tiered store of KV blocks (host memory, and a disk tier when `disk_path` is given).
///
/// Blocks are `block_bytes` long and addressed by 64-bit keys. `save` and `load` move blocks
/// between the store and the KV pages registered with `register_layers`; both release the GIL.
#[pyclass(module = "kvmesh", frozen)]
pub struct BlockStore {
    store: TieredStore,
    events: Arc<TierEvents>,
    layout: RwLock<Option<Layout>>,
    /// Loads still to fail on purpose (fault injection for tests of the recompute path).
    fail_loads: AtomicU64,
    /// Blocks pinned in the host arena for peers to read: lease id -> (expiry, pinned blocks).
    leases: Mutex<HashMap<u64, (Instant, Vec<Bytes>)>>,
    next_lease: AtomicU64,
    #[cfg(feature = "cuda")]
    gpu: RwLock<Option<GpuLayout>>,
}

fn err(e: StoreError) -> PyErr {
    match e {
        StoreError::Invalid(m) => PyValueError::new_err(m),
        other => PyRuntimeError::new_err(format!("kvstore: {other}")),
    }
}

fn tier_name(t: TierKind) -> &'static str {
    match t {
        TierKind::Host => "host",
        TierKind::Disk => "disk",
        TierKind::Remote(_) => "remote",
    }
}

#[pymethods]
impl BlockStore {
    /// A store of `host_bytes` of host memory for blocks of `block_bytes`, and a disk tier of
    /// `disk_bytes` in the folder `disk_path` when it is given (blocks are written down to it in
    /// the background and survive restarts). With `gpu`, the host memory is pinned and mapped
    /// for GPU 0, for `register_gpu_layers` (an error where there is no GPU).
    #[new]
    #[pyo3(signature = (block_bytes, host_bytes, disk_path=None, disk_bytes=0, lock_memory=false, gpu=false))]
    fn new(
        block_bytes: usize,
        host_bytes: u64,
        disk_path: Option<String>,
        disk_bytes: u64,
        lock_memory: bool,
        gpu: bool,
    ) -> PyResult<Self> {
        if block_bytes == 0 {
            return Err(PyValueError::new_err("block_bytes must be positive"));
        }
        let mut host = HostConfig::new(host_bytes, block_bytes);
        host.lock_memory = lock_memory;
        if gpu {
            host.gpu_pin = kvstore::GpuPin::Require;
        }
        let mut cfg = StoreConfig::new(host);
        if let Some(dir) = disk_path {
            if disk_bytes < block_bytes as u64 {
                return Err(PyValueError::new_err(format!(
                    "disk_bytes ({disk_bytes}) holds no block of {block_bytes} bytes"
                )));
            }
            cfg.disk = Some(DiskConfig::new(dir, disk_bytes, block_bytes));
        }
        let events = Arc::new(TierEvents::buffered(1 << 20));
        cfg.events = Some(events.clone());
        let store = TieredStore::new(cfg).map_err(err)?;
        Ok(BlockStore {
            store,
            events,
            layout: RwLock::new(None),
            fail_loads: AtomicU64::new(0),
            leases: Mutex::new(HashMap::new()),
            next_lease: AtomicU64::new(1),
            #[cfg(feature = "cuda")]
            gpu: RwLock::new(None),
        })
    }

    /// Bytes of one block.
    #[getter]
    fn block_bytes(&self) -> usize {
        self.store.block_bytes()
    }

    /// Blocks the host tier holds at most.
    #[getter]
    fn host_capacity_blocks(&self) -> usize {
        self.store.host().capacity_blocks()
    }

    /// Registers the engine's KV pages: `layers` is a list of `(base_address, block_stride)`,
    /// one per layer, each block's page `page_bytes` long, `num_blocks` blocks per layer. The
    /// memory must stay valid (the caller keeps the tensors alive) for as long as this store
    /// saves or loads blocks.
    fn register_layers(
        &self,
        layers: Vec<(usize, usize)>,
        page_bytes: usize,
        num_blocks: usize,
    ) -> PyResult<()> {
        if layers.is_empty() || page_bytes == 0 || num_blocks == 0 {
            return Err(PyValueError::new_err(
                "register_layers needs at least one layer, one block and a positive page size",
            ));
        }
        if layers.len() * page_bytes != self.store.block_bytes() {
            return Err(PyValueError::new_err(format!(
                "{} layers of {page_bytes}-byte pages make {} bytes per block, the store's blocks are {}",
                layers.len(),
                layers.len() * page_bytes,
                self.store.block_bytes()
            )));
        }
        for (i, &(base, stride)) in layers.iter().enumerate() {
            if base == 0 || stride < page_bytes {
                return Err(PyValueError::new_err(format!(
                    "layer {i}: base {base:#x}, stride {stride} (a stride shorter than the page of {page_bytes} bytes)"
                )));
            }
        }
        *self.layout.write() = Some(Layout {
            layers,
            page: page_bytes,
            num_blocks,
        });
        Ok(())
    }

    /// Registers the engine's KV cache in GPU memory, moved by kvstore's CUDA copy engine:
    /// `layers` holds the device address of each layer's block 0 (for vLLM's CUDA caches, one
    /// for K and one for V per attention layer), `block_stride` the bytes between consecutive
    /// blocks, each page `num_heads` x `tokens_per_block` rows of `entry_bytes` in `layout`
    /// (`"LBNHC"`/`"NHD"` or `"LBHNC"`/`"HND"`). The store must have been made with `gpu=True`.
    /// Blocks are kept in the store in the same layout.
    #[pyo3(signature = (layers, block_stride, num_blocks, num_heads, tokens_per_block, entry_bytes, layout, device=0))]
    #[allow(clippy::too_many_arguments, unused_variables)]
    fn register_gpu_layers(
        &self,
        py: Python<'_>,
        layers: Vec<u64>,
        block_stride: u64,
        num_blocks: u32,
        num_heads: u32,
        tokens_per_block: u32,
        entry_bytes: u32,
        layout: &str,
        device: usize,
    ) -> PyResult<()> {
        #[cfg(not(feature = "cuda"))]
        return Err(PyRuntimeError::new_err(
            "this kvmesh was built without its cuda feature",
        ));
        #[cfg(feature = "cuda")]
        {
            use kvstore::cuda::{CacheSpec, Engine, EngineConfig, KvLayout, PageShape, SlotSpec};
            let layout = KvLayout::from_vllm(layout).ok_or_else(|| {
                PyValueError::new_err(format!("layout {layout:?}: LBNHC (NHD) or LBHNC (HND)"))
            })?;
            let arena = self.store.host().arena();
            if !arena.gpu_pinned {
                return Err(PyRuntimeError::new_err(
                    "the store's host memory is not pinned for the GPU: make it with gpu=True",
                ));
            }
            let shape = PageShape {
                num_heads,
                tokens_per_block,
                entry_bytes,
            };
            if layers.len() as u64 * shape.page_bytes() != self.store.block_bytes() as u64 {
                return Err(PyValueError::new_err(format!(
                    "{} layers of {}-byte pages make {} bytes per block, the store's blocks are {}",
                    layers.len(),
                    shape.page_bytes(),
                    layers.len() as u64 * shape.page_bytes(),
                    self.store.block_bytes()
                )));
            }
            let spec = CacheSpec {
                layers,
                num_blocks,
                block_stride,
                shape,
                layout,
            };
            let (base, len, stride) = (arena.ptr as u64, arena.len, arena.slot_stride);
            let g = py
                .detach(|| -> kvstore::cuda::Result<GpuLayout> {
                    let engine = Engine::new(EngineConfig {
                        device,
                        ..EngineConfig::default()
                    })?;
                    // SAFETY: the caller keeps the cache's memory allocated while this store
                    // uses it (the documented contract of this method).
                    let cache = unsafe { engine.register_cache(spec) }?;
                    let slots = SlotSpec {
                        num_slots: (len / stride) as u32,
                        slot_stride: stride as u64,
                        layout,
                    };
                    Ok(GpuLayout {
                        engine,
                        cache,
                        slots,
                        base,
                        len,
                        stride,
                    })
                })
                .map_err(|e| PyRuntimeError::new_err(format!("CUDA copy engine: {e}")))?;
            *self.gpu.write() = Some(g);
            Ok(())
        }
    }

    /// Makes the copy engine's later copies wait for the work queued so far on the CUDA stream
    /// `stream` (e.g. ``torch.cuda.current_stream().cuda_stream``, the forward pass that wrote
    /// the blocks a save reads). A no-op without a registered GPU cache.
    #[allow(unused_variables)]
    fn order_after(&self, stream: usize) -> PyResult<()> {
        #[cfg(feature = "cuda")]
        if let Some(g) = self.gpu.read().as_ref() {
            // SAFETY: the caller passes a live stream of the device's primary context (what
            // torch's current stream is).
            unsafe { g.engine.order_after(stream as *mut std::ffi::c_void) }
                .map_err(|e| PyRuntimeError::new_err(format!("CUDA copy engine: {e}")))?;
        }
        Ok(())
    }

    /// Copies engine blocks `block_ids` into the store under `keys` (pairwise). Returns the keys
    /// that could not be stored (an empty list when all were); a key already held counts as
    /// stored.
    fn save(&self, py: Python<'_>, keys: Vec<u64>, block_ids: Vec<u64>) -> PyResult<Vec<u64>> {
        if keys.len() != block_ids.len() {
            return Err(PyValueError::new_err("keys and block_ids differ in length"));
        }
        #[cfg(feature = "cuda")]
        if self.gpu.read().is_some() {
            return py.detach(|| self.save_gpu(&keys, &block_ids));
        }
        py.detach(|| {
            let guard = self.layout.read();
            let l = guard.as_ref().ok_or_else(not_registered)?;
            let mut failed = Vec::new();
            for (&k, &b) in keys.iter().zip(&block_ids) {
                let b = l.check(b).map_err(err)?;
                let mut gather = |dst: &mut [u8]| {
                    for (i, &(base, stride)) in l.layers.iter().enumerate() {
                        // SAFETY: register_layers' contract: each layer's `num_blocks` pages
                        // of `page` bytes at `base + b * stride` are valid memory; b < num_blocks.
                        let src = unsafe {
                            std::slice::from_raw_parts((base + b * stride) as *const u8, l.page)
                        };
                        dst[i * l.page..(i + 1) * l.page].copy_from_slice(src);
                    }
                    Ok(())
                };
                if self.store.put_with(BlockKey(k), &mut gather, None).is_err() {
                    failed.push(k);
                }
            }
            Ok(failed)
        })
    }

    /// Copies the blocks under `keys` into engine blocks `block_ids` (pairwise), from whichever
    /// tier holds them. Returns one flag per block: `False` where the block is missing or its
    /// load failed (that engine block then holds nothing usable and must be recomputed).
    fn load(&self, py: Python<'_>, keys: Vec<u64>, block_ids: Vec<u64>) -> PyResult<Vec<bool>> {
        if keys.len() != block_ids.len() {
            return Err(PyValueError::new_err("keys and block_ids differ in length"));
        }
        #[cfg(feature = "cuda")]
        if self.gpu.read().is_some() {
            return py.detach(|| self.load_gpu(&keys, &block_ids));
        }
        py.detach(|| {
            let guard = self.layout.read();
            let l = guard.as_ref().ok_or_else(not_registered)?;
            let mut ok = Vec::with_capacity(keys.len());
            for (&k, &b) in keys.iter().zip(&block_ids) {
                let b = l.check(b).map_err(err)?;
                if self.injected_failure() {
                    ok.push(false);
                    continue;
                }
                let data = match self.store.get(BlockKey(k)) {
                    Ok(Some(d)) if d.len() == l.layers.len() * l.page => d,
                    _ => {
                        ok.push(false);
                        continue;
                    }
                };
                for (i, &(base, stride)) in l.layers.iter().enumerate() {
                    // SAFETY: as in `save`; the engine does not touch a block being loaded.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut((base + b * stride) as *mut u8, l.page)
                    };
                    dst.copy_from_slice(&data[i * l.page..(i + 1) * l.page]);
                }
                ok.push(true);
            }
            Ok(ok)
        })
    }

    /// Stores raw bytes (exactly one block) under `key`.
    fn put(&self, py: Python<'_>, key: u64, data: &[u8]) -> PyResult<()> {
        py.detach(|| self.store.put(BlockKey(key), data, None))
            .map_err(err)
    }

    /// The bytes under `key`, or `None`.
    fn get<'py>(
        &self,
        py: Python<'py>,
        key: u64,
    ) -> PyResult<Option<Bound<'py, pyo3::types::PyBytes>>> {
        let got = py.detach(|| self.store.get(BlockKey(key))).map_err(err)?;
        Ok(got.map(|b| pyo3::types::PyBytes::new(py, &b)))
    }

    /// The tier (`"host"` or `"disk"`) of each leading block of `keys` the store holds, without
    /// loading anything: its length is the number of leading blocks available.
    fn lookup(&self, py: Python<'_>, keys: Vec<u64>) -> Vec<&'static str> {
        let keys: Vec<BlockKey> = keys.into_iter().map(BlockKey).collect();
        py.detach(|| self.store.lookup(&keys, false))
            .tiers
            .into_iter()
            .map(tier_name)
            .collect()
    }

    /// `(address, length)` of the host tier's arena, the memory every host block lives in (for
    /// registering it with a transfer agent, so that peers can read blocks in place).
    fn arena(&self) -> (u64, u64) {
        let a = self.store.host().arena();
        (a.ptr as u64, a.len as u64)
    }

    /// Pins the leading blocks of `keys` the store holds (a block on the disk tier is brought
    /// into host memory first) so that a peer can read them in place, for at most `ttl_s`
    /// seconds. Returns the lease id and the arena address of each pinned block, in order; the
    /// list stops at the first block the store lacks (lease 0 when it is empty). Expired leases
    /// are released on the way.
    fn lease(&self, py: Python<'_>, keys: Vec<u64>, ttl_s: f64) -> PyResult<(u64, Vec<u64>)> {
        if !(ttl_s > 0.0 && ttl_s.is_finite()) {
            return Err(PyValueError::new_err(format!(
                "ttl_s must be positive, not {ttl_s}"
            )));
        }
        self.expire_leases();
        let arena = self.store.host().arena();
        let (lo, hi) = (arena.ptr as usize, arena.ptr as usize + arena.len);
        let pinned = py.detach(|| {
            let mut pinned = Vec::with_capacity(keys.len());
            for &k in &keys {
                match self.store.get(BlockKey(k)) {
                    // Only blocks in the arena can be read by a peer (and are pinned by `b`).
                    Ok(Some(b))
                        if (b.as_ptr() as usize) >= lo && b.as_ptr() as usize + b.len() <= hi =>
                    {
                        pinned.push(b)
                    }
                    _ => break,
                }
            }
            pinned
        });
        if pinned.is_empty() {
            return Ok((0, Vec::new()));
        }
        let addrs = pinned.iter().map(|b| b.as_ptr() as u64).collect();
        let id = self.next_lease.fetch_add(1, Relaxed);
        let expiry = Instant::now() + Duration::from_secs_f64(ttl_s);
        self.leases.lock().insert(id, (expiry, pinned));
        Ok((id, addrs))
    }

    /// Unpins the blocks of a lease; `False` if it is unknown (already released or expired).
    fn release(&self, lease: u64) -> bool {
        self.leases.lock().remove(&lease).is_some()
    }

    /// Releases the leases whose time is up; returns how many.
    fn expire_leases(&self) -> usize {
        let now = Instant::now();
        let mut g = self.leases.lock();
        let before = g.len();
        g.retain(|_, (expiry, _)| *expiry > now);
        before - g.len()
    }

    /// Leases currently held.
    #[getter]
    fn leases_held(&self) -> usize {
        self.leases.lock().len()
    }

    /// Makes the next `n` block loads fail, as a failing tier would (for tests of the recompute
    /// path).
    fn inject_load_failures(&self, n: u64) {
        self.fail_loads.store(n, Relaxed);
    }

    /// Waits until every block queued for the disk tier is written.
    fn flush(&self, py: Python<'_>) {
        py.detach(|| self.store.flush())
    }

    /// Tier changes since the last call: `(stored, medium, key)` tuples in order, `stored` True
    /// for a block stored on `medium` (`"CPU"` or `"STORAGE"`), False for one removed.
    fn take_events(&self) -> Vec<(bool, String, u64)> {
        let mut out = Vec::new();
        for ev in self.events.take_events() {
            let (stored, medium, hashes) = match ev {
                KvEvent::BlockStored(s) => (true, s.medium, s.block_hashes),
                KvEvent::BlockRemoved(r) => (false, r.medium, r.block_hashes),
                _ => continue,
            };
            let medium = medium.as_ref().map_or("CPU", Medium::as_str).to_string();
            for h in hashes {
                out.push((stored, medium.clone(), h.0));
            }
        }
        out
    }

    /// Counters per tier (`host`, `disk`) and of the write-behind pipeline, as a dict of dicts.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.store.stats();
        let out = PyDict::new(py);
        let mut tiers = vec![s.host];
        tiers.extend(s.disk);
        for t in tiers {
            let d = PyDict::new(py);
            d.set_item("hits", t.hits)?;
            d.set_item("misses", t.misses)?;
            d.set_item("stores", t.stores)?;
            d.set_item("dedup", t.dedup)?;
            d.set_item("evictions", t.evictions)?;
            d.set_item("errors", t.errors)?;
            d.set_item("corrupt", t.corrupt)?;
            d.set_item("bytes_read", t.bytes_read)?;
            d.set_item("bytes_written", t.bytes_written)?;
            d.set_item("blocks", t.blocks)?;
            out.set_item(t.tier, d)?;
        }
        let p = PyDict::new(py);
        p.set_item("written", s.pipeline.written)?;
        p.set_item("write_errors", s.pipeline.write_errors)?;
        p.set_item("promotions", s.pipeline.promotions)?;
        out.set_item("pipeline", p)?;
        Ok(out)
    }
}

impl BlockStore {
    /// Whether this load fails on purpose (`inject_load_failures`).
    fn injected_failure(&self) -> bool {
        self.fail_loads
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[cfg(feature = "cuda")]
impl BlockStore {
    fn save_gpu(&self, keys: &[u64], block_ids: &[u64]) -> PyResult<Vec<u64>> {
        let guard = self.gpu.read();
        let g = guard.as_ref().ok_or_else(not_registered)?;
        let blocks = block_ids
            .iter()
            .map(|&b| g.check(b))
            .collect::<Result<Vec<u32>, _>>()
            .map_err(err)?;
        // Each block is gathered straight into its host slot and waited for before the slot is
        // published; a few threads keep several gathers queued on the GPU meanwhile.
        let threads = keys.len().clamp(1, 4);
        let failed = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for t in 0..threads {
                let (failed, blocks) = (&failed, &blocks);
                s.spawn(move || {
                    for i in (t..keys.len()).step_by(threads) {
                        let mut gather = |dst: &mut [u8]| g.gather(blocks[i], dst);
                        if self
                            .store
                            .put_with(BlockKey(keys[i]), &mut gather, None)
                            .is_err()
                        {
                            failed.lock().push(keys[i]);
                        }
                    }
                });
            }
        });
        Ok(failed.into_inner())
    }

    /// Scatters the host slots of the blocks under `keys` into GPU blocks `block_ids` with one
    /// copy: blocks the store lacks, or holds outside the host arena, are reported as failed.
    fn load_gpu(&self, keys: &[u64], block_ids: &[u64]) -> PyResult<Vec<bool>> {
        let guard = self.gpu.read();
        let g = guard.as_ref().ok_or_else(not_registered)?;
        let mut ok = vec![false; keys.len()];
        let mut moves = Vec::with_capacity(keys.len());
        let mut pinned = Vec::with_capacity(keys.len());
        for (i, (&k, &b)) in keys.iter().zip(block_ids).enumerate() {
            let b = g.check(b).map_err(err)?;
            if self.injected_failure() {
                continue;
            }
            // The bytes pin their host slot until the copy is done.
            if let Ok(Some(d)) = self.store.get(BlockKey(k)) {
                if let Some(slot) = g.slot_of(d.as_ptr()) {
                    moves.push(kvstore::cuda::BlockMove { block: b, slot });
                    pinned.push(d);
                    ok[i] = true;
                }
            }
        }
        if moves.is_empty() {
            return Ok(ok);
        }
        // SAFETY: the arena is pinned and mapped for the GPU; the slots read are pinned by
        // `pinned` until `wait` returns; the GPU blocks written are the engine's to fill (vLLM
        // does not touch blocks being loaded).
        let done = unsafe {
            g.engine.scatter_raw(
                g.base,
                g.len,
                &g.slots,
                &g.cache,
                &moves,
                kvstore::cuda::CopyPath::Auto,
            )
        }
        .and_then(|t| t.wait());
        drop(pinned);
        // A failed copy leaves every destination block unknown: the caller recomputes them all.
        done.map(|()| ok).map_err(|e| {
            PyRuntimeError::new_err(format!(
                "CUDA copy engine: loading {} blocks into the GPU failed: {e}",
                moves.len()
            ))
        })
    }
}

fn not_registered() -> PyErr {
    PyRuntimeError::new_err("register_layers was not called: the store does not know the KV pages")
}

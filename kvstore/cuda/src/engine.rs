//! The copy engine: gathers KV blocks from a GPU cache into pinned host slots and scatters them
//! back, on its own streams.
//!
//! Two ways to move pages:
//!
//! * **kernel**: one launch of a copy kernel that reads or writes the mapped pinned host memory
//!   directly over PCIe. Per-page cost is a few integer operations, so 4 KiB pages move as fast as
//!   2 MiB ones; it can also convert between the LBNHC and LBHNC row orders on the way.
//! * **DMA**: one `cuMemcpyAsync` per page on the copy engines, which leaves the SMs to the model;
//!   worth it only for large pages, where the per-copy overhead is amortised.
//!
//! [`CopyPath::Auto`] takes DMA for pages of [`EngineConfig::dma_threshold`] and more, the staged
//! path (the kernel on the GPU side, one DMA per slot) for slots of
//! [`EngineConfig::staged_threshold`] and more, and the kernel otherwise. [`CopyPath::Batch`]
//! (`cuMemcpyBatchAsync`, CUDA 12.8+) and [`CopyPath::Bulk`] are there to compare against.
//!
//! Gathers run on one stream and scatters on another, so both directions proceed at once; a
//! [`Transfer`] completes on an event that other streams can wait on
//! ([`Transfer::make_stream_wait`]), and [`Engine::order_after`] makes the engine's streams wait
//! for work already queued on a model stream (the forward pass that wrote the KV).

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys;

use crate::driver::{check, Device, DeviceBuffer, PinnedBuffer};
use crate::error::{CudaError, Result};
use crate::layout::{validate_moves, BlockMove, CacheSpec, SlotSpec};

const KERNEL_SOURCE: &str = include_str!("kernels.cu");
const KERNEL_NAME: &std::ffi::CStr = c"kvmesh_copy_pages";
const BULK_KERNEL_NAME: &std::ffi::CStr = c"kvmesh_copy_pages_bulk";
/// Bytes one block of the bulk kernel moves at a time (BULK_CHUNK in kernels.cu).
const BULK_CHUNK: u64 = 16384;
const BULK_THREADS: u32 = 256;

/// How a transfer moves its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CopyPath {
    /// Kernel for pages under the engine's DMA threshold (and for any layout conversion), DMA
    /// for larger ones.
    Auto,
    /// Always the copy kernel.
    Kernel,
    /// One `cuMemcpyAsync` per page (what vLLM's own block swap does).
    Dma,
    /// One `cuMemcpyBatchAsync` for all pages (needs a CUDA 12.8+ driver).
    Batch,
    /// A kernel whose host-side accesses go through Hopper's bulk copy engine (sm_90+), in
    /// 16 KiB pieces; no layout conversion.
    Bulk,
    /// The copy kernel gathers pages GPU-to-GPU into a staging buffer in slot order, then one DMA
    /// per slot (one block of every layer, contiguous in host memory; runs of adjacent slots
    /// merged; one `cuMemcpyBatchAsync` when the driver has it) moves them to the host, and the
    /// reverse for scatters. The DMA engines' large PCIe
    /// transactions leave room for the other direction, so gathers and scatters at once go
    /// faster than with the kernel alone, when slots are large enough for DMA to pay.
    Staged,
}

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// GPU ordinal. Default 0.
    pub device: usize,
    /// Pages of at least this many bytes go by DMA under [`CopyPath::Auto`]. Default 2 MiB.
    pub dma_threshold: u64,
    /// Most thread blocks one copy kernel uses; 0 means one per multiprocessor. Fewer leave more
    /// of the GPU to the model. Default 0.
    pub max_ctas: u32,
    /// Threads per block of the copy kernel (a multiple of 32, at most 512). Default 512.
    pub threads: u32,
    /// 16-byte loads each thread of the copy kernel keeps in flight (1 to 16). Default 4.
    pub unroll: u32,
    /// L2 prefetch size hint on the copy kernel's loads: 0 (none), 128 or 256 bytes. Default 0.
    pub l2_prefetch: u32,
    /// Under [`CopyPath::Auto`], transfers whose slots (one block of every layer) are at least
    /// this many bytes go [`CopyPath::Staged`]. Default 512 KiB (on an H100 smaller slots do
    /// better with the kernel alone; larger ones move both ways at once about 10% faster staged).
    pub staged_threshold: u64,
    /// GPU memory each direction may use for [`CopyPath::Staged`], allocated on first use;
    /// larger transfers go through it in pieces. Default 64 MiB.
    pub staging_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            device: 0,
            dma_threshold: 2 << 20,
            max_ctas: 0,
            threads: 512,
            unroll: 4,
            l2_prefetch: 0,
            staged_threshold: 512 << 10,
            staging_bytes: 64 << 20,
        }
    }
}

/// Must match `KernelParams` in kernels.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct KernelParams {
    descriptors: u64,
    host_base: u64,
    slot_stride: u64,
    block_stride: u64,
    page_bytes: u64,
    num_moves: u32,
    num_layers: u32,
    page_vecs: u32,
    row_vecs: u32,
    dst_outer: u32,
    dst_inner: u32,
    transpose: u32,
    to_host: u32,
    total_vecs: u32,
    pad: u32,
}

/// A GPU KV cache whose layer ranges the driver confirmed as device memory.
#[derive(Debug)]
pub struct KvCache {
    spec: CacheSpec,
}

impl KvCache {
    /// Its geometry.
    pub fn spec(&self) -> &CacheSpec {
        &self.spec
    }
}

type BatchV1 = unsafe extern "C" fn(
    *mut u64,
    *mut u64,
    *mut usize,
    usize,
    *mut sys::CUmemcpyAttributes,
    *mut usize,
    usize,
    *mut usize,
    sys::CUstream,
) -> sys::CUresult;
type BatchV2 = unsafe extern "C" fn(
    *mut u64,
    *mut u64,
    *mut usize,
    usize,
    *mut sys::CUmemcpyAttributes,
    *mut usize,
    usize,
    sys::CUstream,
) -> sys::CUresult;

#[derive(Clone, Copy)]
enum BatchFn {
    V1(BatchV1),
    V2(BatchV2),
}

struct BatchApi {
    _lib: libloading::Library,
    f: BatchFn,
}

fn load_batch_api() -> Option<BatchApi> {
    for name in ["libcuda.so.1", "libcuda.so"] {
        // SAFETY: libcuda is already loaded by the driver bindings; this takes another reference.
        let Ok(lib) = (unsafe { libloading::Library::new(name) }) else {
            continue;
        };
        // SAFETY: the symbols are looked up with the signatures of CUDA 13's
        // cuMemcpyBatchAsync_v2 and CUDA 12.8's cuMemcpyBatchAsync.
        unsafe {
            if let Ok(f) = lib.get::<BatchV2>(b"cuMemcpyBatchAsync_v2") {
                let f = *f;
                return Some(BatchApi {
                    _lib: lib,
                    f: BatchFn::V2(f),
                });
            }
            if let Ok(f) = lib.get::<BatchV1>(b"cuMemcpyBatchAsync") {
                let f = *f;
                return Some(BatchApi {
                    _lib: lib,
                    f: BatchFn::V1(f),
                });
            }
        }
        return None;
    }
    None
}

struct LaneState {
    staging: PinnedBuffer,
    descriptors: DeviceBuffer,
    upload_done: sys::CUevent,
    seen: Vec<u64>,
    dsts: Vec<u64>,
    srcs: Vec<u64>,
    sizes: Vec<usize>,
    stage: Option<DeviceBuffer>,
    stage_moves: Vec<BlockMove>,
}

/// One direction: a stream and the scratch its submissions reuse.
struct Lane {
    stream: sys::CUstream,
    state: Mutex<LaneState>,
}

/// The CUDA copy engine of one GPU.
pub struct Engine {
    d2h: Lane,
    h2d: Lane,
    module: sys::CUmodule,
    function: sys::CUfunction,
    bulk_function: Option<sys::CUfunction>,
    batch: Option<BatchApi>,
    config: EngineConfig,
    ctas: u32,
    device: Arc<Device>,
}

// SAFETY: the raw handles are driver objects usable from any thread (with the context bound,
// which every method does); mutable scratch is behind a Mutex.
unsafe impl Send for Engine {}
// SAFETY: as above.
unsafe impl Sync for Engine {}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("device", &self.device.ordinal())
            .field("config", &self.config)
            .field("ctas", &self.ctas)
            .finish()
    }
}

impl Lane {
    fn new(device: &Arc<Device>) -> Result<Lane> {
        // Destroyed in Engine::drop.
        let stream = device.new_stream()?;
        Ok(Lane {
            stream,
            state: Mutex::new(LaneState {
                staging: PinnedBuffer::alloc(device, 64 << 10)?,
                descriptors: DeviceBuffer::alloc(device, 64 << 10)?,
                upload_done: device.new_event()?,
                seen: Vec::new(),
                dsts: Vec::new(),
                srcs: Vec::new(),
                sizes: Vec::new(),
                stage: None,
                stage_moves: Vec::new(),
            }),
        })
    }
}

impl Engine {
    /// Opens the device, compiles the copy kernel with NVRTC and creates the streams.
    pub fn new(config: EngineConfig) -> Result<Engine> {
        if config.threads == 0 || !config.threads.is_multiple_of(32) || config.threads > 512 {
            return Err(CudaError::InvalidLayout {
                reason: format!("{} threads per block", config.threads),
            });
        }
        if config.unroll == 0 || config.unroll > 16 || ![0, 128, 256].contains(&config.l2_prefetch)
        {
            return Err(CudaError::InvalidLayout {
                reason: format!(
                    "unroll {} / l2_prefetch {} (1..=16 / 0, 128 or 256)",
                    config.unroll, config.l2_prefetch
                ),
            });
        }
        let device = Device::open(config.device)?;
        let (major, minor) = device.compute_capability()?;
        let defines = [
            format!("-DUNROLL={}", config.unroll),
            format!("-DKVMESH_L2_HINT={}", config.l2_prefetch),
        ];
        let ptx =
            crate::nvrtc::compile_ptx(KERNEL_SOURCE, "kvmesh_kernels.cu", major, minor, &defines)?;
        device.bind()?;
        let mut module = std::ptr::null_mut();
        // SAFETY: `ptx` is NUL-terminated PTX; the module is unloaded in Drop.
        check("cuModuleLoadData", unsafe {
            sys::cuModuleLoadData(&mut module, ptx.as_ptr() as *const c_void)
        })?;
        let mut function = std::ptr::null_mut();
        // SAFETY: the module is loaded and the name NUL-terminated.
        let got = check("cuModuleGetFunction", unsafe {
            sys::cuModuleGetFunction(&mut function, module, KERNEL_NAME.as_ptr())
        });
        if let Err(e) = got {
            // SAFETY: loaded above, unloaded once.
            unsafe { sys::cuModuleUnload(module) };
            return Err(e);
        }
        let mut bulk_function = None;
        if major >= 9 {
            let mut f = std::ptr::null_mut();
            // SAFETY: the module is loaded and the name NUL-terminated.
            if unsafe { sys::cuModuleGetFunction(&mut f, module, BULK_KERNEL_NAME.as_ptr()) }
                == sys::CUresult::CUDA_SUCCESS
            {
                bulk_function = Some(f);
            }
        }
        let sms = device.multiprocessors()?;
        let ctas = if config.max_ctas == 0 {
            sms
        } else {
            config.max_ctas
        };
        Ok(Engine {
            d2h: Lane::new(&device)?,
            h2d: Lane::new(&device)?,
            module,
            function,
            bulk_function,
            batch: load_batch_api(),
            config,
            ctas,
            device,
        })
    }

    /// The device.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// The settings in force.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Whether [`CopyPath::Bulk`] is available (a Hopper or newer GPU).
    pub fn has_bulk_copy(&self) -> bool {
        self.bulk_function.is_some()
    }

    /// Whether [`CopyPath::Batch`] is available (driver 12.8 or newer).
    pub fn has_batch_copy(&self) -> bool {
        self.batch.is_some()
    }

    /// Checks a cache's geometry and asks the driver whether each layer's whole range
    /// (`num_blocks` blocks from its base) lies inside one device allocation.
    ///
    /// # Safety
    /// The memory must stay allocated for as long as the returned [`KvCache`] is used, and the
    /// pages a transfer writes must not be used by other work while it runs (order them with
    /// [`Engine::order_after`] and [`Transfer::make_stream_wait`]).
    pub unsafe fn register_cache(&self, spec: CacheSpec) -> Result<KvCache> {
        spec.validate()?;
        let span = spec.layer_span();
        for &base in &spec.layers {
            let (start, size) = self.device.allocation_of(base)?;
            if base + span > start + size {
                return Err(CudaError::InvalidPointer {
                    what: "cache layer",
                    ptr: base,
                    reason: format!(
                        "{span} bytes from the layer base run past the end of its allocation \
                         ({size} bytes at {start:#x})"
                    ),
                });
            }
        }
        Ok(KvCache { spec })
    }

    /// Makes both engine streams wait for the work queued so far on `stream`.
    ///
    /// # Safety
    /// `stream` must be a live CUDA stream of this device's primary context (e.g.
    /// `torch.cuda.current_stream().cuda_stream`), or null for the legacy default stream.
    pub unsafe fn order_after(&self, stream: *mut c_void) -> Result<()> {
        self.device.bind()?;
        let ev = self.device.new_event()?;
        // SAFETY: the caller vouches for `stream`; `ev` is ours and destroyed below (the driver
        // keeps what the waits need).
        let r = unsafe {
            check(
                "cuEventRecord",
                sys::cuEventRecord(ev, stream as sys::CUstream),
            )
            .and_then(|_| {
                check(
                    "cuStreamWaitEvent",
                    sys::cuStreamWaitEvent(self.d2h.stream, ev, 0),
                )
            })
            .and_then(|_| {
                check(
                    "cuStreamWaitEvent",
                    sys::cuStreamWaitEvent(self.h2d.stream, ev, 0),
                )
            })
        };
        // SAFETY: created above.
        unsafe { sys::cuEventDestroy_v2(ev) };
        r
    }

    /// Copies the pages of `moves` from the GPU cache into host slots (GPU → host).
    ///
    /// Returns once the copy is queued; the [`Transfer`] borrows `host` mutably until it is done.
    pub fn gather<'a>(
        &'a self,
        cache: &'a KvCache,
        host: &'a mut PinnedBuffer,
        slots: &SlotSpec,
        moves: &[BlockMove],
        path: CopyPath,
    ) -> Result<Transfer<'a>> {
        // SAFETY: a PinnedBuffer is pinned, mapped host memory; the transfer borrows it mutably
        // until it is done, so it stays valid and nobody else touches it.
        unsafe { self.gather_raw(cache, host.addr(), host.len(), slots, moves, path) }
    }

    /// Copies host slots into the GPU cache's blocks (host → GPU).
    pub fn scatter<'a>(
        &'a self,
        host: &'a PinnedBuffer,
        slots: &SlotSpec,
        cache: &'a KvCache,
        moves: &[BlockMove],
        path: CopyPath,
    ) -> Result<Transfer<'a>> {
        // SAFETY: as in `gather`; the transfer borrows the buffer until it is done.
        unsafe { self.scatter_raw(host.addr(), host.len(), slots, cache, moves, path) }
    }

    /// [`Engine::gather`] into host memory named by its address: for memory the caller pinned
    /// and mapped for this device (`cuMemHostRegister`), such as kvstore's GPU-pinned host tier,
    /// whose other slots other threads use meanwhile.
    ///
    /// # Safety
    /// `host_addr .. host_addr + host_len` must be pinned host memory mapped for this device that
    /// stays valid until the transfer is done, and nobody may touch the slots the moves write
    /// until then.
    pub unsafe fn gather_raw(
        &self,
        cache: &KvCache,
        host_addr: u64,
        host_len: usize,
        slots: &SlotSpec,
        moves: &[BlockMove],
        path: CopyPath,
    ) -> Result<Transfer<'_>> {
        self.submit(
            &self.d2h, cache, host_addr, host_len, slots, moves, path, true,
        )
    }

    /// [`Engine::scatter`] from host memory named by its address.
    ///
    /// # Safety
    /// As for [`Engine::gather_raw`]; the slots the moves read must not be written until the
    /// transfer is done.
    pub unsafe fn scatter_raw(
        &self,
        host_addr: u64,
        host_len: usize,
        slots: &SlotSpec,
        cache: &KvCache,
        moves: &[BlockMove],
        path: CopyPath,
    ) -> Result<Transfer<'_>> {
        self.submit(
            &self.h2d, cache, host_addr, host_len, slots, moves, path, false,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn submit<'a>(
        &'a self,
        lane: &'a Lane,
        cache: &KvCache,
        host_addr: u64,
        host_len: usize,
        slots: &SlotSpec,
        moves: &[BlockMove],
        path: CopyPath,
        to_host: bool,
    ) -> Result<Transfer<'a>> {
        let spec = &cache.spec;
        slots.validate(spec, host_len as u64)?;
        let mut st = lane
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        validate_moves(spec, slots, moves, to_host, &mut st.seen)?;
        self.device.bind()?;
        let page = spec.shape.page_bytes();
        let transpose = spec.layout != slots.layout;
        let gpu_aligned = page.is_multiple_of(16)
            && spec.block_stride.is_multiple_of(16)
            && spec.layers.iter().all(|&b| b.is_multiple_of(16))
            && (!transpose || spec.shape.entry_bytes.is_multiple_of(16));
        let aligned =
            gpu_aligned && slots.slot_stride.is_multiple_of(16) && host_addr.is_multiple_of(16);
        let slot_bytes = spec.layers.len() as u64 * page;
        let path = match path {
            CopyPath::Auto if !transpose && (page >= self.config.dma_threshold || !aligned) => {
                CopyPath::Dma
            }
            CopyPath::Auto if gpu_aligned && slot_bytes >= self.config.staged_threshold => {
                CopyPath::Staged
            }
            CopyPath::Auto => CopyPath::Kernel,
            p => p,
        };
        if transpose && !matches!(path, CopyPath::Kernel | CopyPath::Staged) {
            return Err(CudaError::InvalidLayout {
                reason: "converting between LBNHC and LBHNC needs the kernel or staged path".into(),
            });
        }
        if path == CopyPath::Staged && !gpu_aligned {
            return Err(CudaError::InvalidLayout {
                reason: "the staged path needs 16-byte aligned pages, strides and rows".into(),
            });
        }
        if path == CopyPath::Bulk && self.bulk_function.is_none() {
            return Err(CudaError::InvalidLayout {
                reason: "the bulk path needs a Hopper (sm_90) or newer GPU".into(),
            });
        }
        if matches!(path, CopyPath::Kernel | CopyPath::Bulk) && !aligned {
            return Err(CudaError::InvalidLayout {
                reason: "the kernel path needs 16-byte aligned pages, strides and rows".into(),
            });
        }
        if !moves.is_empty() {
            let queued = match path {
                CopyPath::Kernel | CopyPath::Bulk => self.launch_kernel(
                    lane,
                    &mut st,
                    spec,
                    host_addr,
                    slots,
                    moves,
                    to_host,
                    path == CopyPath::Bulk,
                ),
                CopyPath::Batch => {
                    self.batch_copy(lane, &mut st, spec, host_addr, slots, moves, to_host)
                }
                CopyPath::Staged => {
                    self.staged_copy(lane, &mut st, spec, host_addr, slots, moves, to_host)
                }
                _ => self.dma_copy(lane, spec, host_addr, slots, moves, to_host),
            };
            if let Err(e) = queued {
                // Part of the work may be queued: let it finish before the caller reuses memory.
                // SAFETY: our stream.
                unsafe { sys::cuStreamSynchronize(lane.stream) };
                return Err(e);
            }
        }
        drop(st);
        let event = self.device.new_event()?;
        // SAFETY: our event and stream.
        let rc = check("cuEventRecord", unsafe {
            sys::cuEventRecord(event, lane.stream)
        });
        if let Err(e) = rc {
            // SAFETY: our stream and event.
            unsafe {
                sys::cuStreamSynchronize(lane.stream);
                sys::cuEventDestroy_v2(event);
            }
            return Err(e);
        }
        Ok(Transfer {
            device: &self.device,
            event,
            bytes: moves.len() as u64 * spec.layers.len() as u64 * page,
            done: false,
            _borrow: PhantomData,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_kernel(
        &self,
        lane: &Lane,
        st: &mut LaneState,
        spec: &CacheSpec,
        host_addr: u64,
        slots: &SlotSpec,
        moves: &[BlockMove],
        to_host: bool,
        bulk: bool,
    ) -> Result<()> {
        let layers = spec.layers.len();
        let page = spec.shape.page_bytes();
        let total_vecs = moves.len() as u64 * layers as u64 * (page / 16);
        let limit = (1u64 << 31)
            - self.config.unroll as u64 * self.ctas as u64 * self.config.threads as u64;
        if total_vecs >= limit {
            return Err(CudaError::TooLarge {
                bytes: total_vecs * 16,
            });
        }
        // Descriptor table: layer bases, then block ids, then slot ids.
        let desc_bytes = layers * 8 + moves.len() * 8;
        // SAFETY: the event was recorded after the previous upload from `staging` (or never).
        check("cuEventSynchronize", unsafe {
            sys::cuEventSynchronize(st.upload_done)
        })?;
        if st.staging.len() < desc_bytes {
            st.staging = PinnedBuffer::alloc(&self.device, desc_bytes.next_power_of_two())?;
        }
        if st.descriptors.len() < desc_bytes {
            // The old table may still be read by a queued kernel.
            // SAFETY: our stream.
            check("cuStreamSynchronize", unsafe {
                sys::cuStreamSynchronize(lane.stream)
            })?;
            st.descriptors = DeviceBuffer::alloc(&self.device, desc_bytes.next_power_of_two())?;
        }
        {
            let buf = st.staging.as_mut_slice();
            let (bases, ids) = buf[..desc_bytes].split_at_mut(layers * 8);
            for (chunk, &b) in bases.chunks_exact_mut(8).zip(&spec.layers) {
                chunk.copy_from_slice(&b.to_ne_bytes());
            }
            let (blocks, slot_ids) = ids.split_at_mut(moves.len() * 4);
            for ((bc, sc), m) in blocks
                .chunks_exact_mut(4)
                .zip(slot_ids.chunks_exact_mut(4))
                .zip(moves)
            {
                bc.copy_from_slice(&m.block.to_ne_bytes());
                sc.copy_from_slice(&m.slot.to_ne_bytes());
            }
        }
        // SAFETY: both buffers hold at least `desc_bytes`; the staging buffer is not touched again
        // before `upload_done` completes.
        unsafe {
            check(
                "cuMemcpyHtoDAsync",
                sys::cuMemcpyHtoDAsync_v2(
                    st.descriptors.ptr(),
                    st.staging.addr() as *const c_void,
                    desc_bytes,
                    lane.stream,
                ),
            )?;
            check(
                "cuEventRecord",
                sys::cuEventRecord(st.upload_done, lane.stream),
            )?;
        }
        let (dst_layout, src_layout) = if to_host {
            (slots.layout, spec.layout)
        } else {
            (spec.layout, slots.layout)
        };
        let (dst_outer, dst_inner) = dst_layout.dims(spec.shape);
        let mut params = KernelParams {
            descriptors: st.descriptors.ptr(),
            host_base: host_addr,
            slot_stride: slots.slot_stride,
            block_stride: spec.block_stride,
            page_bytes: page,
            num_moves: moves.len() as u32,
            num_layers: layers as u32,
            page_vecs: (page / 16) as u32,
            row_vecs: spec.shape.entry_bytes / 16,
            dst_outer,
            dst_inner,
            transpose: (dst_layout != src_layout) as u32,
            to_host: to_host as u32,
            total_vecs: total_vecs as u32,
            pad: 0,
        };
        let (function, threads, grid) = match (bulk, self.bulk_function) {
            (true, Some(f)) => {
                let chunks = moves.len() as u64 * layers as u64 * page.div_ceil(BULK_CHUNK);
                (f, BULK_THREADS, chunks.clamp(1, self.ctas as u64) as u32)
            }
            _ => {
                let per_cta = self.config.unroll as u64 * self.config.threads as u64;
                let grid = total_vecs.div_ceil(per_cta).clamp(1, self.ctas as u64) as u32;
                (self.function, self.config.threads, grid)
            }
        };
        let mut args = [&mut params as *mut KernelParams as *mut c_void];
        // SAFETY: the kernel takes one KernelParams by value; every address in it was validated
        // (cache ranges at registration, slots against the host buffer, moves against both).
        check("cuLaunchKernel", unsafe {
            sys::cuLaunchKernel(
                function,
                grid,
                1,
                1,
                threads,
                1,
                1,
                0,
                lane.stream,
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn staged_copy(
        &self,
        lane: &Lane,
        st: &mut LaneState,
        spec: &CacheSpec,
        host_addr: u64,
        slots: &SlotSpec,
        moves: &[BlockMove],
        to_host: bool,
    ) -> Result<()> {
        let slot_bytes = spec.layers.len() as u64 * spec.shape.page_bytes();
        let per_chunk = (self.config.staging_bytes / slot_bytes).clamp(1, u32::MAX as u64) as usize;
        let want = per_chunk.min(moves.len()) as u64 * slot_bytes;
        if st.stage.as_ref().is_none_or(|b| (b.len() as u64) < want) {
            // The old buffer may still be in use by queued work.
            // SAFETY: our stream.
            check("cuStreamSynchronize", unsafe {
                sys::cuStreamSynchronize(lane.stream)
            })?;
            st.stage = None;
            st.stage = Some(DeviceBuffer::alloc(&self.device, want as usize)?);
        }
        let stage = match &st.stage {
            Some(b) => b.ptr(),
            None => unreachable!("allocated just above"),
        };
        let stage_slots = SlotSpec {
            num_slots: per_chunk as u32,
            slot_stride: slot_bytes,
            layout: slots.layout,
        };
        let mut local = std::mem::take(&mut st.stage_moves);
        let mut result = Ok(());
        for chunk in moves.chunks(per_chunk) {
            local.clear();
            local.extend(chunk.iter().enumerate().map(|(i, m)| BlockMove {
                block: m.block,
                slot: i as u32,
            }));
            result = if to_host {
                self.launch_kernel(lane, st, spec, stage, &stage_slots, &local, true, false)
                    .and_then(|_| {
                        self.slot_dmas(lane, st, stage, host_addr, slots, slot_bytes, chunk, true)
                    })
            } else {
                self.slot_dmas(lane, st, stage, host_addr, slots, slot_bytes, chunk, false)
                    .and_then(|_| {
                        self.launch_kernel(
                            lane,
                            st,
                            spec,
                            stage,
                            &stage_slots,
                            &local,
                            false,
                            false,
                        )
                    })
            };
            if result.is_err() {
                break;
            }
        }
        st.stage_moves = local;
        result
    }

    /// One DMA per slot between the staging buffer (slot `i` of `chunk` at `i * slot_bytes`) and
    /// the host slots, merging runs of consecutive slots when slots are packed.
    #[allow(clippy::too_many_arguments)]
    fn slot_dmas(
        &self,
        lane: &Lane,
        st: &mut LaneState,
        stage: u64,
        host_addr: u64,
        slots: &SlotSpec,
        slot_bytes: u64,
        chunk: &[BlockMove],
        to_host: bool,
    ) -> Result<()> {
        let packed = slots.slot_stride == slot_bytes;
        st.dsts.clear();
        st.srcs.clear();
        st.sizes.clear();
        let mut i = 0;
        while i < chunk.len() {
            let mut j = i + 1;
            while packed && j < chunk.len() && chunk[j].slot == chunk[j - 1].slot + 1 {
                j += 1;
            }
            let host = host_addr + chunk[i].slot as u64 * slots.slot_stride;
            let dev = stage + i as u64 * slot_bytes;
            let (d, s) = if to_host { (host, dev) } else { (dev, host) };
            st.dsts.push(d);
            st.srcs.push(s);
            st.sizes.push(((j - i) as u64 * slot_bytes) as usize);
            i = j;
        }
        if st.sizes.len() > 1 && self.batch.is_some() {
            return self.issue_batch(lane, st, to_host);
        }
        for k in 0..st.sizes.len() {
            let (d, s, n) = (st.dsts[k], st.srcs[k], st.sizes[k]);
            // SAFETY: the host range lies in the validated slots, the device range in staging.
            unsafe {
                if to_host {
                    check(
                        "cuMemcpyDtoHAsync",
                        sys::cuMemcpyDtoHAsync_v2(d as *mut c_void, s, n, lane.stream),
                    )?;
                } else {
                    check(
                        "cuMemcpyHtoDAsync",
                        sys::cuMemcpyHtoDAsync_v2(d, s as *const c_void, n, lane.stream),
                    )?;
                }
            }
        }
        Ok(())
    }

    fn dma_copy(
        &self,
        lane: &Lane,
        spec: &CacheSpec,
        host_addr: u64,
        slots: &SlotSpec,
        moves: &[BlockMove],
        to_host: bool,
    ) -> Result<()> {
        let page = spec.shape.page_bytes() as usize;
        for m in moves {
            for (l, &base) in spec.layers.iter().enumerate() {
                let gpu = base + spec.block_offset(m.block);
                let host = host_addr + slots.page_offset(spec, m.slot, l as u32);
                // SAFETY: both ranges were validated (see launch_kernel).
                unsafe {
                    if to_host {
                        check(
                            "cuMemcpyDtoHAsync",
                            sys::cuMemcpyDtoHAsync_v2(host as *mut c_void, gpu, page, lane.stream),
                        )?;
                    } else {
                        check(
                            "cuMemcpyHtoDAsync",
                            sys::cuMemcpyHtoDAsync_v2(
                                gpu,
                                host as *const c_void,
                                page,
                                lane.stream,
                            ),
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn batch_copy(
        &self,
        lane: &Lane,
        st: &mut LaneState,
        spec: &CacheSpec,
        host_addr: u64,
        slots: &SlotSpec,
        moves: &[BlockMove],
        to_host: bool,
    ) -> Result<()> {
        let page = spec.shape.page_bytes() as usize;
        st.dsts.clear();
        st.srcs.clear();
        st.sizes.clear();
        for m in moves {
            for (l, &base) in spec.layers.iter().enumerate() {
                let gpu = base + spec.block_offset(m.block);
                let host = host_addr + slots.page_offset(spec, m.slot, l as u32);
                let (d, s) = if to_host { (host, gpu) } else { (gpu, host) };
                st.dsts.push(d);
                st.srcs.push(s);
                st.sizes.push(page);
            }
        }
        self.issue_batch(lane, st, to_host)
    }

    /// One `cuMemcpyBatchAsync` of the copies in `st.dsts`, `st.srcs` and `st.sizes`.
    fn issue_batch(&self, lane: &Lane, st: &mut LaneState, to_host: bool) -> Result<()> {
        let Some(api) = &self.batch else {
            return Err(CudaError::Driver {
                call: "cuMemcpyBatchAsync",
                code: sys::CUresult::CUDA_ERROR_NOT_SUPPORTED as u32,
                name: "not in this driver (needs CUDA 12.8+)".into(),
            });
        };
        let device_loc = sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: self.device.ordinal() as i32,
        };
        let host_loc = sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST,
            id: 0,
        };
        let (src_loc, dst_loc) = if to_host {
            (device_loc, host_loc)
        } else {
            (host_loc, device_loc)
        };
        let mut attrs = [sys::CUmemcpyAttributes {
            srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint: src_loc,
            dstLocHint: dst_loc,
            flags: 0,
        }];
        let mut attr_idx = [0usize];
        let n = st.dsts.len();
        let mut fail_idx = usize::MAX;
        // SAFETY: the three arrays hold `n` validated copies; one attribute applies from index 0.
        let rc = unsafe {
            match api.f {
                BatchFn::V2(f) => f(
                    st.dsts.as_mut_ptr(),
                    st.srcs.as_mut_ptr(),
                    st.sizes.as_mut_ptr(),
                    n,
                    attrs.as_mut_ptr(),
                    attr_idx.as_mut_ptr(),
                    1,
                    lane.stream,
                ),
                BatchFn::V1(f) => f(
                    st.dsts.as_mut_ptr(),
                    st.srcs.as_mut_ptr(),
                    st.sizes.as_mut_ptr(),
                    n,
                    attrs.as_mut_ptr(),
                    attr_idx.as_mut_ptr(),
                    1,
                    &mut fail_idx,
                    lane.stream,
                ),
            }
        };
        check("cuMemcpyBatchAsync", rc)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.device.bind().is_err() {
            return;
        }
        for lane in [&self.d2h, &self.h2d] {
            // SAFETY: our stream and event, destroyed once after the stream drained.
            unsafe {
                sys::cuStreamSynchronize(lane.stream);
                if let Ok(st) = lane.state.lock() {
                    sys::cuEventDestroy_v2(st.upload_done);
                }
                sys::cuStreamDestroy_v2(lane.stream);
            }
        }
        // SAFETY: no launch can be pending (streams drained); unloaded once.
        unsafe {
            sys::cuModuleUnload(self.module);
        }
    }
}

/// A queued transfer. Dropping it waits for completion, so the memory it borrows stays valid.
#[must_use = "a transfer should be waited on to learn whether it succeeded"]
pub struct Transfer<'a> {
    device: &'a Arc<Device>,
    event: sys::CUevent,
    bytes: u64,
    done: bool,
    _borrow: PhantomData<&'a mut ()>,
}

impl Transfer<'_> {
    /// Bytes this transfer moves.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether it has finished (errors show up in [`Transfer::wait`]).
    pub fn is_done(&self) -> bool {
        if self.done {
            return true;
        }
        // SAFETY: our event.
        let rc = unsafe { sys::cuEventQuery(self.event) };
        rc != sys::CUresult::CUDA_ERROR_NOT_READY
    }

    /// Waits until the data is in place; a fault during the copy is returned here.
    pub fn wait(mut self) -> Result<()> {
        self.sync()
    }

    /// Makes `stream` wait for this transfer without blocking the host (e.g. the forward pass
    /// that reads scattered blocks).
    ///
    /// # Safety
    /// `stream` must be a live stream of this device's primary context.
    pub unsafe fn make_stream_wait(&self, stream: *mut c_void) -> Result<()> {
        self.device.bind()?;
        // SAFETY: the caller vouches for `stream`; the event is ours.
        check("cuStreamWaitEvent", unsafe {
            sys::cuStreamWaitEvent(stream as sys::CUstream, self.event, 0)
        })
    }

    fn sync(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        self.device.bind()?;
        // SAFETY: our event.
        check("cuEventSynchronize", unsafe {
            sys::cuEventSynchronize(self.event)
        })
    }
}

impl Drop for Transfer<'_> {
    fn drop(&mut self) {
        let _ = self.sync();
        // SAFETY: our event, destroyed once.
        unsafe {
            sys::cuEventDestroy_v2(self.event);
        }
    }
}

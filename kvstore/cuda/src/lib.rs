//! kvmesh's CUDA copy engine: moves scattered KV blocks of vLLM's CUDA caches between GPU memory
//! and pinned host memory.
//!
//! Offload lives or dies by small fragments: one `cudaMemcpyAsync` per 16 KiB page reaches a few
//! GB/s on an H100, far under the 53–55 GB/s the PCIe link gives. [`Engine`] instead launches one
//! copy kernel per transfer that reads or writes mapped pinned host memory directly, so 4 KiB
//! pages move near link speed; large pages can go by DMA on the copy engines instead
//! ([`CopyPath`]).
//!
//! The CUDA driver is loaded at run time and the kernel compiled with NVRTC when an [`Engine`] is
//! made, so the crate builds and links on machines without CUDA; there [`Engine::new`] returns
//! [`CudaError::NoDriver`].
//!
//! ```no_run
//! use kvstore_cuda::*;
//! let engine = Engine::new(EngineConfig::default())?;
//! let shape = PageShape { num_heads: 8, tokens_per_block: 16, entry_bytes: 512 };
//! let gpu = DeviceBuffer::alloc(engine.device(), 32 * 1024 * shape.page_bytes() as usize)?;
//! let layers = (0..32).map(|l| gpu.ptr() + l * 1024 * shape.page_bytes()).collect();
//! let spec = CacheSpec::contiguous(layers, 1024, shape, KvLayout::Lbnhc);
//! // SAFETY: `gpu` outlives `cache` and nothing else writes it.
//! let cache = unsafe { engine.register_cache(spec)? };
//! let slots = SlotSpec::packed(cache.spec(), 64, KvLayout::Lbnhc);
//! let mut host = PinnedBuffer::alloc(engine.device(), slots.bytes() as usize)?;
//! let moves = [BlockMove { block: 17, slot: 0 }, BlockMove { block: 3, slot: 1 }];
//! engine.gather(&cache, &mut host, &slots, &moves, CopyPath::Auto)?.wait()?;
//! engine.scatter(&host, &slots, &cache, &moves, CopyPath::Auto)?.wait()?;
//! # Ok::<(), CudaError>(())
//! ```

mod copylist;
mod driver;
mod engine;
mod error;
pub mod layout;
mod nvrtc;

pub use copylist::{CopyList, CopyPending, DMA_FROM};
pub use driver::{driver_present, Device, DeviceBuffer, IpcMemory, PinnedBuffer};
pub use engine::{CopyPath, Engine, EngineConfig, KvCache, Transfer};
pub use error::{CudaError, ErrorKind, Result};
pub use layout::{BlockMove, CacheSpec, KvLayout, PageShape, SlotSpec};

/// Why GPU tests and benchmarks cannot run here, or `None` when a GPU is usable.
///
/// Checks for the driver library and a device without compiling anything.
pub fn gpu_unavailable_reason() -> Option<String> {
    match Device::open(0) {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

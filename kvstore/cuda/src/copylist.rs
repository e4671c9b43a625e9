//! One launch for many copies: a list of `(destination, source, length)` between memory the GPU
//! reaches (its own, a peer GPU's, another process's mapped through CUDA IPC, mapped pinned host
//! memory), for transfers of many small fragments, where one DMA per fragment would cost more
//! than the bytes. Fragments of [`DMA_FROM`] bytes or more still go to the copy engines.

use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys;

use crate::driver::{check, Device, PinnedBuffer};
use crate::error::Result;

const SOURCE: &str = r#"
typedef unsigned long long u64;
struct alignas(16) V { unsigned x, y, z, w; };
// items: n triples (dst, src, len), in mapped host memory. Each block takes items in turn; its
// threads copy 16-byte vectors when all three are multiples of 16, bytes otherwise. Three threads
// fetch an item's triple into shared memory for the whole block, and fetch the block's next
// triple before copying the current item, so the host round trip overlaps the copy.
extern "C" __global__ void __launch_bounds__(256) kvmesh_copy_list(const u64* items, unsigned n) {
    __shared__ u64 desc[2][3];
    unsigned i = blockIdx.x;
    if (i >= n) return;
    if (threadIdx.x < 3) desc[0][threadIdx.x] = items[3 * i + threadIdx.x];
    __syncthreads();
    for (unsigned b = 0; i < n; i += gridDim.x, b ^= 1) {
        unsigned j = i + gridDim.x;
        u64 next = 0;
        if (threadIdx.x < 3 && j < n) next = items[3 * j + threadIdx.x];
        u64 dst = desc[b][0], src = desc[b][1], len = desc[b][2];
        if (((dst | src | len) & 15) == 0) {
            V* d = (V*)dst;
            const V* s = (const V*)src;
            u64 nv = len / 16;
            u64 k = threadIdx.x;
            for (; k + 3 * blockDim.x < nv; k += 4 * blockDim.x) {
                V a = s[k], b = s[k + blockDim.x], c = s[k + 2 * blockDim.x], e = s[k + 3 * blockDim.x];
                d[k] = a; d[k + blockDim.x] = b; d[k + 2 * blockDim.x] = c; d[k + 3 * blockDim.x] = e;
            }
            for (; k < nv; k += blockDim.x) d[k] = s[k];
        } else {
            char* d = (char*)dst;
            const char* s = (const char*)src;
            for (u64 k = threadIdx.x; k < len; k += blockDim.x) d[k] = s[k];
        }
        // Every thread has read desc[b]; the next triple goes into the other half.
        if (threadIdx.x < 3 && j < n) desc[b ^ 1][threadIdx.x] = next;
        __syncthreads();
    }
}
"#;

/// Fragments of at least this many bytes are copied by the copy engines. On one H200 the kernel
/// moved 256 KiB fragments at 1024 GB/s where one DMA per 1 MiB fragment gave 245 GB/s.
pub const DMA_FROM: usize = 16 << 20;
/// Kernel items are at most this long: longer fragments are cut into pieces, so that a list of
/// a few large fragments still keeps every multiprocessor busy (one block copies one item at a
/// time; 32 fragments of 2 MiB as 32 items reached 607 GB/s on one H200, 256 KiB ones 1093).
const PIECE: usize = 128 << 10;
const THREADS: u32 = 256;

/// The list-copy kernel of one GPU, with its stream and a few reusable item buffers (one per
/// launch still in flight).
pub struct CopyList {
    device: Arc<Device>,
    module: sys::CUmodule,
    function: sys::CUfunction,
    stream: sys::CUstream,
    slots: Mutex<Vec<Slot>>,
    ctas: u32,
}

/// An item buffer and the event recorded after the last launch that read it: free once that
/// event has completed.
struct Slot {
    items: Option<PinnedBuffer>,
    done: sys::CUevent,
}

/// Item buffers kept for launches in flight; a launch waits for the oldest when all are busy.
const SLOTS: usize = 4;

/// A launched list copy ([`CopyList::launch`]). [`CopyPending::wait`] returns once every copy is
/// done; dropping it waits too, so the memory it copies is never released under it.
pub struct CopyPending {
    list: Arc<CopyList>,
    done: sys::CUevent,
    waited: bool,
}

// SAFETY: an event handle may be waited on from any thread with the context bound.
unsafe impl Send for CopyPending {}

impl CopyPending {
    /// Waits until the copies are done.
    pub fn wait(mut self) -> Result<()> {
        self.waited = true;
        self.list.device.bind()?;
        // SAFETY: the event lives as long as the list, which `self` keeps alive. If its slot
        // was reused meanwhile, the event marks a later launch on the same stream, which
        // completes after this one.
        check("cuEventSynchronize", unsafe {
            sys::cuEventSynchronize(self.done)
        })
    }
}

impl Drop for CopyPending {
    fn drop(&mut self) {
        if !self.waited && self.list.device.bind().is_ok() {
            // SAFETY: as in `wait`.
            unsafe { sys::cuEventSynchronize(self.done) };
        }
    }
}

// SAFETY: the handles may be used from any thread once the context is bound; launches are
// serialised by the slots' lock, and a slot's items are rewritten only once its event says the
// launch that read them is done.
unsafe impl Send for CopyList {}
// SAFETY: as above.
unsafe impl Sync for CopyList {}

impl CopyList {
    /// Compiles the kernel for `device` (NVRTC) and creates its stream.
    pub fn new(device: &Arc<Device>) -> Result<CopyList> {
        let (major, minor) = device.compute_capability()?;
        let ptx = crate::nvrtc::compile_ptx(SOURCE, "kvmesh_copy_list.cu", major, minor, &[])?;
        device.bind()?;
        let mut module = std::ptr::null_mut();
        // SAFETY: NUL-terminated PTX; unloaded in Drop (or below on failure).
        check("cuModuleLoadData", unsafe {
            sys::cuModuleLoadData(&mut module, ptx.as_ptr() as *const c_void)
        })?;
        let name = CString::new("kvmesh_copy_list").expect("no NUL");
        let mut function = std::ptr::null_mut();
        let mut stream = std::ptr::null_mut();
        // SAFETY: the module is loaded; valid out-pointers.
        let r = check("cuModuleGetFunction", unsafe {
            sys::cuModuleGetFunction(&mut function, module, name.as_ptr())
        })
        .and_then(|_| {
            // Destroyed in Drop.
            stream = device.new_stream()?;
            Ok(())
        });
        if let Err(e) = r {
            // SAFETY: loaded above, unloaded once.
            unsafe { sys::cuModuleUnload(module) };
            return Err(e);
        }
        Ok(CopyList {
            device: device.clone(),
            module,
            function,
            stream,
            slots: Mutex::new(Vec::new()),
            ctas: device.multiprocessors()? * 4,
        })
    }

    /// Starts copying every `(dst, src, len)` on this list's stream and returns without
    /// waiting: fragments of [`DMA_FROM`] bytes or more by DMA, the rest in one kernel launch.
    ///
    /// # Safety
    /// Every `src` must be valid for `len` bytes of reads and every `dst` for `len` bytes of
    /// writes that nothing else uses until the returned [`CopyPending`] has been waited for (or
    /// dropped), all reachable from this GPU.
    pub unsafe fn launch(self: &Arc<Self>, pairs: &[(u64, u64, usize)]) -> Result<CopyPending> {
        self.device.bind()?;
        let mut small: Vec<(u64, u64, usize)> = Vec::with_capacity(pairs.len());
        for &(dst, src, len) in pairs.iter().filter(|p| p.2 > 0 && p.2 < DMA_FROM) {
            let mut off = 0;
            while off < len {
                let n = PIECE.min(len - off);
                small.push((dst + off as u64, src + off as u64, n));
                off += n;
            }
        }
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        // A slot whose last launch has finished, a new one, or else the first (waited for).
        let free = slots.iter().position(|s| {
            // SAFETY: the slots' events are live while the list is.
            (unsafe { sys::cuEventQuery(s.done) }) == sys::CUresult::CUDA_SUCCESS
        });
        let i = match free {
            Some(i) => i,
            None if slots.len() < SLOTS => {
                // Destroyed in Drop.
                let done = self.device.new_event()?;
                slots.push(Slot { items: None, done });
                slots.len() - 1
            }
            None => {
                // SAFETY: as above.
                check("cuEventSynchronize", unsafe {
                    sys::cuEventSynchronize(slots[0].done)
                })?;
                0
            }
        };
        let slot = &mut slots[i];
        for &(dst, src, len) in pairs.iter().filter(|p| p.2 >= DMA_FROM) {
            // SAFETY: the caller's contract; the stream is live.
            let r = check("cuMemcpyAsync", unsafe {
                sys::cuMemcpyAsync(dst, src, len, self.stream)
            });
            if let Err(e) = r {
                return Err(self.after_failure(e));
            }
        }
        if !small.is_empty() {
            let need = small.len() * 24;
            if slot.items.as_ref().is_none_or(|b| b.len() < need) {
                slot.items = None;
                match PinnedBuffer::alloc(&self.device, need.next_power_of_two()) {
                    Ok(b) => slot.items = Some(b),
                    Err(e) => return Err(self.after_failure(e)),
                }
            }
            let buf = slot.items.as_mut().expect("allocated");
            let words = buf.as_mut_slice();
            for (i, &(dst, src, len)) in small.iter().enumerate() {
                words[i * 24..i * 24 + 8].copy_from_slice(&dst.to_le_bytes());
                words[i * 24 + 8..i * 24 + 16].copy_from_slice(&src.to_le_bytes());
                words[i * 24 + 16..i * 24 + 24].copy_from_slice(&(len as u64).to_le_bytes());
            }
            let mut list = buf.addr();
            let mut n = small.len() as u32;
            let mut args = [
                &mut list as *mut u64 as *mut c_void,
                &mut n as *mut u32 as *mut c_void,
            ];
            let grid = n.min(self.ctas).max(1);
            // SAFETY: the kernel takes (const u64*, unsigned); the list lies in mapped pinned
            // memory the GPU reads (unified addressing), untouched until the slot's event,
            // recorded below, has completed.
            let r = check("cuLaunchKernel", unsafe {
                sys::cuLaunchKernel(
                    self.function,
                    grid,
                    1,
                    1,
                    THREADS,
                    1,
                    1,
                    0,
                    self.stream,
                    args.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            });
            if let Err(e) = r {
                return Err(self.after_failure(e));
            }
        }
        // SAFETY: the event and the stream are live.
        let r = check("cuEventRecord", unsafe {
            sys::cuEventRecord(slot.done, self.stream)
        });
        if let Err(e) = r {
            return Err(self.after_failure(e));
        }
        Ok(CopyPending {
            list: self.clone(),
            done: slot.done,
            waited: false,
        })
    }

    /// A launch failed part-way: waits for whatever was queued (so nothing still runs on the
    /// caller's memory or reads the slot's items), then returns `e`.
    fn after_failure(&self, e: crate::error::CudaError) -> crate::error::CudaError {
        // SAFETY: the stream is live.
        unsafe { sys::cuStreamSynchronize(self.stream) };
        e
    }
}

impl Drop for CopyList {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: created in `new` (events in `launch`), released once; no `CopyPending` is
            // left (each holds the list).
            unsafe {
                sys::cuStreamSynchronize(self.stream);
                for s in self
                    .slots
                    .get_mut()
                    .unwrap_or_else(|p| p.into_inner())
                    .drain(..)
                {
                    sys::cuEventDestroy_v2(s.done);
                }
                sys::cuStreamDestroy_v2(self.stream);
                sys::cuModuleUnload(self.module);
            }
        }
    }
}

//! The CUDA driver, loaded at run time, and the memory the engine works with.
//!
//! [`Device`] retains the device's *primary* context, the one the CUDA runtime (and so PyTorch and
//! vLLM) uses, so pointers from the model's allocator are valid here. Every call binds it to the
//! calling thread first.

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use cudarc::driver::sys;

use crate::error::{CudaError, Result};

/// Turns a driver status into a `Result`, naming the call.
pub(crate) fn check(call: &'static str, rc: sys::CUresult) -> Result<()> {
    if rc == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut p: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static string (or leaves it null).
    let name = unsafe {
        if sys::cuGetErrorName(rc, &mut p) == sys::CUresult::CUDA_SUCCESS && !p.is_null() {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        } else {
            format!("{rc:?}")
        }
    };
    Err(CudaError::Driver {
        call,
        code: rc as u32,
        name,
    })
}

/// Whether the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda; nothing is called.
    unsafe { sys::is_culib_present() }
}

/// One GPU, through its primary context.
#[derive(Debug)]
pub struct Device {
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    ordinal: usize,
}

// SAFETY: a CUDA context handle may be used from any thread; every use binds it first.
unsafe impl Send for Device {}
// SAFETY: as above; the driver serialises what needs it.
unsafe impl Sync for Device {}

impl Device {
    /// Opens GPU `ordinal`, or explains why there is none.
    pub fn open(ordinal: usize) -> Result<Arc<Device>> {
        if !driver_present() {
            return Err(CudaError::NoDriver {
                reason: "libcuda.so could not be loaded".into(),
            });
        }
        // SAFETY: the library is present; cuInit may be called any number of times.
        let rc = unsafe { sys::cuInit(0) };
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(CudaError::NoDriver {
                reason: format!("cuInit failed: {:?}", rc),
            });
        }
        let mut count = 0;
        // SAFETY: valid out-pointer.
        check("cuDeviceGetCount", unsafe {
            sys::cuDeviceGetCount(&mut count)
        })?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::NoDevice {
                ordinal,
                count: count.max(0) as usize,
            });
        }
        let mut dev = 0;
        // SAFETY: valid out-pointer; the ordinal is in range.
        check("cuDeviceGet", unsafe {
            sys::cuDeviceGet(&mut dev, ordinal as i32)
        })?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: valid device and out-pointer; released in Drop.
        check("cuDevicePrimaryCtxRetain", unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut ctx, dev)
        })?;
        let d = Device { dev, ctx, ordinal };
        d.bind()?;
        Ok(Arc::new(d))
    }

    /// Makes this device's context current on the calling thread.
    pub(crate) fn bind(&self) -> Result<()> {
        // SAFETY: the context is retained for as long as `self` lives.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// A device attribute.
    pub(crate) fn attribute(&self, attr: sys::CUdevice_attribute) -> Result<i32> {
        let mut v = 0;
        // SAFETY: valid out-pointer and device.
        check("cuDeviceGetAttribute", unsafe {
            sys::cuDeviceGetAttribute(&mut v, attr, self.dev)
        })?;
        Ok(v)
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        Ok((
            self.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            self.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ))
    }

    /// Number of multiprocessors.
    pub fn multiprocessors(&self) -> Result<u32> {
        Ok(self
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            .max(1) as u32)
    }

    /// The device's name.
    pub fn name(&self) -> Result<String> {
        let mut buf = [0 as std::ffi::c_char; 256];
        // SAFETY: the buffer's length is passed.
        check("cuDeviceGetName", unsafe {
            sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as i32, self.dev)
        })?;
        // SAFETY: the driver NUL-terminates the name within the buffer.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    /// The driver's CUDA version, e.g. 13000 for 13.0.
    pub fn driver_version(&self) -> Result<i32> {
        let mut v = 0;
        // SAFETY: valid out-pointer.
        check("cuDriverGetVersion", unsafe {
            sys::cuDriverGetVersion(&mut v)
        })?;
        Ok(v)
    }

    /// Copies `len` bytes from device address `src` to host memory at `dst`, synchronously.
    ///
    /// # Safety
    /// `dst` must be valid for `len` bytes of writes, and `src .. src + len` device memory of
    /// this GPU (or memory the driver maps for it).
    pub unsafe fn copy_to_host(&self, dst: *mut u8, src: u64, len: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller's contract.
        check("cuMemcpyDtoH", unsafe {
            sys::cuMemcpyDtoH_v2(dst as *mut c_void, src, len)
        })
    }

    /// Copies `len` bytes from host memory at `src` to device address `dst`, synchronously.
    ///
    /// # Safety
    /// `src` must be valid for `len` bytes of reads, and `dst .. dst + len` device memory of
    /// this GPU that nothing else uses meanwhile.
    pub unsafe fn copy_to_device(&self, dst: u64, src: *const u8, len: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller's contract.
        check("cuMemcpyHtoD", unsafe {
            sys::cuMemcpyHtoD_v2(dst, src as *const c_void, len)
        })
    }

    /// A CUDA IPC handle for the device allocation that starts at `base`: another process on
    /// this host maps it with [`IpcMemory::open`].
    pub fn ipc_handle(&self, base: u64) -> Result<[u8; 64]> {
        self.bind()?;
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: valid out-pointer; the driver validates `base`.
        check("cuIpcGetMemHandle", unsafe {
            sys::cuIpcGetMemHandle(&mut h, base)
        })?;
        let mut out = [0u8; 64];
        for (o, &c) in out.iter_mut().zip(h.reserved.iter()) {
            *o = c as u8;
        }
        Ok(out)
    }

    /// Copies each `(dst, src, len)` between addresses the driver knows (device memory of any
    /// GPU, memory mapped from another process, pinned host memory), queued on one stream of
    /// this device and waited for.
    ///
    /// # Safety
    /// Every `src` must be valid for `len` bytes of reads and every `dst` for `len` bytes of
    /// writes that nothing else uses meanwhile.
    pub unsafe fn copy_batch(&self, pairs: &[(u64, u64, usize)]) -> Result<()> {
        // Destroyed below.
        let stream = self.new_stream()?;
        let run = || -> Result<()> {
            for &(dst, src, len) in pairs {
                // SAFETY: the caller's contract; the stream is live.
                check("cuMemcpyAsync", unsafe {
                    sys::cuMemcpyAsync(dst, src, len, stream)
                })?;
            }
            // SAFETY: the stream is live.
            check("cuStreamSynchronize", unsafe {
                sys::cuStreamSynchronize(stream)
            })
        };
        let r = run();
        // SAFETY: created above; a failed copy leaves the stream destroyable. On error the
        // stream is first waited for, so no copy still runs once this returns.
        unsafe {
            if r.is_err() {
                sys::cuStreamSynchronize(stream);
            }
            sys::cuStreamDestroy_v2(stream);
        }
        r
    }

    /// A new event without timing in this device's context; the caller destroys it
    /// (`cuEventDestroy`).
    pub(crate) fn new_event(&self) -> Result<sys::CUevent> {
        self.bind()?;
        let mut e = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the context is current.
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
        })?;
        Ok(e)
    }

    /// A new stream of this device that does not wait for the legacy default stream; the caller
    /// destroys it (`cuStreamDestroy`).
    pub(crate) fn new_stream(&self) -> Result<sys::CUstream> {
        self.bind()?;
        let mut stream = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the context is current.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(
                &mut stream,
                sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
            )
        })?;
        Ok(stream)
    }

    /// Waits until all work on the device is done.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: a context is current.
        check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
    }

    /// The device allocation that contains `ptr`: `(start, size)`, or an error if `ptr` is not
    /// device memory of this context.
    pub fn allocation_of(&self, ptr: u64) -> Result<(u64, u64)> {
        self.bind()?;
        let mut base = 0u64;
        let mut size = 0usize;
        // SAFETY: valid out-pointers; the driver validates `ptr`.
        let rc = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) };
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(CudaError::InvalidPointer {
                what: "device memory",
                ptr,
                reason: format!("not a device allocation ({rc:?})"),
            });
        }
        Ok((base, size as u64))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `open`.
        unsafe {
            sys::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}

fn oom_or(call: &'static str, what: &'static str, bytes: usize, rc: sys::CUresult) -> CudaError {
    if rc == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        CudaError::OutOfMemory { what, bytes }
    } else {
        match check(call, rc) {
            Err(e) => e,
            Ok(()) => CudaError::OutOfMemory { what, bytes },
        }
    }
}

/// Device memory from `cuMemAlloc`, freed on drop.
#[derive(Debug)]
pub struct DeviceBuffer {
    device: Arc<Device>,
    ptr: u64,
    len: usize,
}

impl DeviceBuffer {
    /// Allocates `len` bytes (contents undefined).
    pub fn alloc(device: &Arc<Device>, len: usize) -> Result<DeviceBuffer> {
        device.bind()?;
        let mut ptr = 0u64;
        // SAFETY: valid out-pointer; the size is checked by the driver.
        let rc = unsafe { sys::cuMemAlloc_v2(&mut ptr, len.max(1)) };
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(oom_or("cuMemAlloc", "device", len, rc));
        }
        Ok(DeviceBuffer {
            device: device.clone(),
            ptr,
            len,
        })
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `src` to offset `offset` (synchronously).
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.check_range(offset, src.len())?;
        self.device.bind()?;
        // SAFETY: the range is inside the allocation; `src` is valid for its length.
        check("cuMemcpyHtoD", unsafe {
            sys::cuMemcpyHtoD_v2(
                self.ptr + offset as u64,
                src.as_ptr() as *const c_void,
                src.len(),
            )
        })
    }

    /// Copies from offset `offset` into `dst` (synchronously).
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check_range(offset, dst.len())?;
        self.device.bind()?;
        // SAFETY: the range is inside the allocation; `dst` is valid for its length.
        check("cuMemcpyDtoH", unsafe {
            sys::cuMemcpyDtoH_v2(
                dst.as_mut_ptr() as *mut c_void,
                self.ptr + offset as u64,
                dst.len(),
            )
        })
    }

    /// Sets every byte to `value` (synchronously).
    pub fn fill(&self, value: u8) -> Result<()> {
        self.device.bind()?;
        // SAFETY: the whole allocation.
        check("cuMemsetD8", unsafe {
            sys::cuMemsetD8_v2(self.ptr, value, self.len)
        })?;
        self.device.synchronize()
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(CudaError::InvalidPointer {
                what: "device buffer range",
                ptr: self.ptr + offset as u64,
                reason: format!("{len} bytes at offset {offset} exceed {} bytes", self.len),
            }),
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: allocated by cuMemAlloc and freed once.
            unsafe {
                sys::cuMemFree_v2(self.ptr);
            }
        }
    }
}

/// Page-locked host memory mapped into the GPU's address space (`cuMemHostAlloc` with
/// `DEVICEMAP | PORTABLE`): DMA runs at full speed and kernels can read and write it directly.
#[derive(Debug)]
pub struct PinnedBuffer {
    device: Arc<Device>,
    ptr: *mut u8,
    len: usize,
    owned: bool,
}

// SAFETY: the buffer is plain memory owned by this value; access goes through &/&mut self.
unsafe impl Send for PinnedBuffer {}
// SAFETY: shared access only reads.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// Allocates `len` bytes of pinned, mapped host memory, zeroed.
    pub fn alloc(device: &Arc<Device>, len: usize) -> Result<PinnedBuffer> {
        device.bind()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: valid out-pointer; freed with cuMemFreeHost in Drop.
        let rc = unsafe { sys::cuMemHostAlloc(&mut p, len.max(1), flags) };
        if rc != sys::CUresult::CUDA_SUCCESS || p.is_null() {
            return Err(oom_or("cuMemHostAlloc", "pinned host", len, rc));
        }
        let mut b = PinnedBuffer {
            device: device.clone(),
            ptr: p as *mut u8,
            len,
            owned: true,
        };
        b.as_mut_slice().fill(0);
        Ok(b)
    }

    /// Pins and maps memory the caller owns (e.g. a host tier's arena).
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid, writable memory that outlives the returned value and is not
    /// accessed through other references while a transfer into it runs.
    pub unsafe fn register(device: &Arc<Device>, ptr: *mut u8, len: usize) -> Result<PinnedBuffer> {
        device.bind()?;
        let flags = sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_PORTABLE;
        // SAFETY: the caller guarantees the range; unregistered in Drop.
        let rc = unsafe { sys::cuMemHostRegister_v2(ptr as *mut c_void, len, flags) };
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(oom_or("cuMemHostRegister", "pinned host", len, rc));
        }
        Ok(PinnedBuffer {
            device: device.clone(),
            ptr,
            len,
            owned: false,
        })
    }

    /// The address, valid on the host and (through unified addressing) on the device.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` bytes while `self` lives; transfers that write it hold
        // `&mut self` (see `Engine::gather`), so no write races this borrow.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The device this memory is mapped for.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.device.bind().is_err() {
            return;
        }
        // SAFETY: allocated (or registered) in the constructor, released once.
        unsafe {
            if self.owned {
                sys::cuMemFreeHost(self.ptr as *mut c_void);
            } else {
                sys::cuMemHostUnregister(self.ptr as *mut c_void);
            }
        }
    }
}

/// Device memory exported by another process (`cudaIpcGetMemHandle`, or torch's
/// `UntypedStorage._share_cuda_()`), mapped into this one; unmapped on drop.
#[derive(Debug)]
pub struct IpcMemory {
    device: Arc<Device>,
    ptr: u64,
}

impl IpcMemory {
    /// Opens a 64-byte CUDA IPC memory handle. The exporting process must keep the memory
    /// allocated until this value is dropped.
    pub fn open(device: &Arc<Device>, handle: &[u8]) -> Result<IpcMemory> {
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        if handle.len() != h.reserved.len() {
            return Err(CudaError::InvalidPointer {
                what: "IPC handle",
                ptr: 0,
                reason: format!("{} bytes, not 64", handle.len()),
            });
        }
        for (d, &s) in h.reserved.iter_mut().zip(handle) {
            *d = s as std::ffi::c_char;
        }
        device.bind()?;
        let mut ptr = 0u64;
        // SAFETY: valid out-pointer; the driver validates the handle.
        check("cuIpcOpenMemHandle", unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                h,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        })?;
        Ok(IpcMemory {
            device: device.clone(),
            ptr,
        })
    }

    /// The mapped base address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for IpcMemory {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: opened in `open`, closed once.
            unsafe {
                sys::cuIpcCloseMemHandle(self.ptr);
            }
        }
    }
}

//! GPU memory through host staging (feature `cuda`), for machines without GPUDirect RDMA.
//!
//! A GPU region is registered like host memory ([`MemKind::Vram`], checked against the driver's
//! allocations) and published in the agent's metadata. Its bytes move over TCP through pinned
//! host buffers sized to each transfer:
//! * on the side that posts a transfer, its GPU descriptors are copied into a staging buffer
//!   before a WRITE is sent, and out of it once a READ has arrived, before the transfer is
//!   reported done;
//! * on the side that serves one, a READ of GPU memory is copied to the host before it is sent,
//!   and a WRITE into GPU memory is received into host memory and copied to the GPU before it is
//!   acknowledged and its notification delivered.
//!
//! Either way the transfer completes, and its notification arrives, only once the data is where
//! it was addressed. Shared-memory and UCX transfers of GPU memory are refused.
//!
//! Between GPU memory of two processes on one host ([`crate::Backend::CudaIpc`]), no host memory
//! is involved: each GPU region's metadata carries the CUDA IPC handle of its allocation, the
//! initiating agent maps the peer's allocations into its own address space (once per remote
//! allocation) and the driver copies device to device, peer to peer between two GPUs. The peer
//! process is watched as for shared memory (a pidfd): a transfer during which it exited fails,
//! whatever the copies returned. The notification follows over the TCP connection once the
//! copies have completed.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use kvstore_cuda::{CopyList, Device, IpcMemory, PinnedBuffer};

use crate::agent::{Inner, Remote};
use crate::desc::MemKind;
use crate::error::{peer_err, Error, Result};
use crate::xfer::{Op, Seg, XferShared};

fn cuda_err(what: &str, e: kvstore_cuda::CudaError) -> Error {
    match e.kind() {
        kvstore_cuda::ErrorKind::Unavailable => Error::Unavailable {
            backend: "cuda",
            msg: format!("{what}: {e}"),
        },
        _ => Error::Io(format!("{what}: {e}")),
    }
}

/// The GPU `ordinal` (opened once per process).
pub(crate) fn device(ordinal: u32) -> Result<Arc<Device>> {
    static DEVICES: OnceLock<Mutex<HashMap<u32, Arc<Device>>>> = OnceLock::new();
    let mut g = DEVICES.get_or_init(Default::default).lock();
    if let Some(d) = g.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = Device::open(ordinal as usize).map_err(|e| cuda_err("opening the GPU", e))?;
    g.insert(ordinal, d.clone());
    Ok(d)
}

/// The list-copy kernel of GPU `ordinal` (compiled once per process), or why there is none.
fn copy_list(ordinal: u32) -> std::result::Result<Arc<CopyList>, String> {
    type Lists = Mutex<HashMap<u32, std::result::Result<Arc<CopyList>, String>>>;
    static LISTS: OnceLock<Lists> = OnceLock::new();
    let mut g = LISTS.get_or_init(Default::default).lock();
    g.entry(ordinal)
        .or_insert_with(|| {
            device(ordinal)
                .map_err(|e| e.to_string())
                .and_then(|d| CopyList::new(&d).map(Arc::new).map_err(|e| e.to_string()))
        })
        .clone()
}

/// Checks that `[addr, addr + len)` lies in one device allocation of GPU `dev`.
pub(crate) fn check_region(addr: u64, len: u64, dev: u32) -> Result<()> {
    let d = device(dev)?;
    let (start, size) = d
        .allocation_of(addr)
        .map_err(|e| Error::Invalid(format!("GPU region {addr:#x}+{len}: {e}")))?;
    if addr + len > start + size {
        return Err(Error::Invalid(format!(
            "GPU region {addr:#x}+{len} runs past the end of its allocation ({size} bytes at {start:#x})"
        )));
    }
    Ok(())
}

/// The CUDA IPC export of the GPU region at `addr` (see [`crate::RegionMeta::ipc`]): the
/// handle of its allocation and the allocation's start; empty when the driver will not export
/// it (memory from a stream-ordered pool, for one), in which case peers stage through the host.
pub(crate) fn ipc_export(addr: u64, dev: u32) -> Vec<u8> {
    let export = || -> Result<Vec<u8>> {
        let d = device(dev)?;
        let (base, _) = d
            .allocation_of(addr)
            .map_err(|e| cuda_err("finding the allocation", e))?;
        let h = d
            .ipc_handle(base)
            .map_err(|e| cuda_err("exporting the allocation", e))?;
        Ok(crate::metadata::ipc_bytes(&h, base))
    };
    // Not exportable: peers stage through the host (and say so when CUDA IPC is asked for).
    export().unwrap_or_default()
}

/// A remote agent's GPU allocations mapped into this process, by allocation start.
#[derive(Default)]
pub(crate) struct IpcMaps(Mutex<HashMap<u64, Arc<IpcMemory>>>);

impl IpcMaps {
    /// Where remote region `rid`'s allocation is mapped in this process, and where it starts in
    /// the peer's: `(mapped, base)`. The allocation is mapped on first use (into GPU `dev`'s
    /// context).
    fn mapping(&self, r: &Remote, rid: u32, dev: &Arc<Device>) -> Result<(u64, u64)> {
        let meta = r.meta.regions.iter().find(|m| m.id == rid).ok_or_else(|| {
            peer_err(&r.meta.name, format!("region {rid} is not in its metadata"))
        })?;
        let (handle, base) = meta.ipc_handle().ok_or_else(|| {
            peer_err(&r.meta.name, format!("region {rid} has no CUDA IPC handle"))
        })?;
        let mut g = self.0.lock();
        let m = match g.get(&base) {
            Some(m) => m.clone(),
            None => {
                let m =
                    Arc::new(IpcMemory::open(dev, handle).map_err(|e| {
                        peer_err(&r.meta.name, format!("mapping its GPU memory: {e}"))
                    })?);
                g.insert(base, m.clone());
                m
            }
        };
        Ok((m.ptr(), base))
    }
}

/// A CUDA IPC transfer's copies, worked out when it is prepared: each `(dst, src, len)` in this
/// process's addresses, the peer's side translated into the mapping of its allocation (mapped
/// here on first use, into GPU `local_dev`'s context). Posting then only launches the copies.
pub(crate) fn ipc_pairs(
    r: &Remote,
    op: Op,
    local: &[Seg],
    remote: &[Seg],
    regions: &[u32],
    local_dev: u32,
) -> Result<Vec<(u64, u64, usize)>> {
    let name = &r.meta.name;
    let dev = device(local_dev)?;
    let mut pairs = Vec::with_capacity(local.len());
    // The mapping of the region the previous fragment was in (most fragments share one).
    let mut last: Option<(u32, u64, u64)> = None;
    for ((l, rs), &rid) in local.iter().zip(remote).zip(regions) {
        let (mapped, base) = match last {
            Some((id, m, b)) if id == rid => (m, b),
            _ => {
                let (m, b) = r.ipc.mapping(r, rid, &dev)?;
                last = Some((rid, m, b));
                (m, b)
            }
        };
        if rs.addr < base {
            return Err(peer_err(
                name,
                format!(
                    "address {:#x} lies before its allocation {base:#x}",
                    rs.addr
                ),
            ));
        }
        let there = mapped + (rs.addr - base);
        pairs.push(match op {
            Op::Write => (there, l.addr, l.len as usize),
            Op::Read => (l.addr, there, l.len as usize),
        });
    }
    Ok(pairs)
}

/// Runs a [`crate::Backend::CudaIpc`] transfer on the same-host worker thread: the copies worked
/// out at prepare ([`ipc_pairs`]), between the same-host checks of the peer.
///
/// With `KVTRANSFER_TRACE_IPC` set in the environment, each transfer prints where its time went
/// (from post: the worker picking it up, the copies done, the peer checked and notified), for
/// tuning the per-transfer cost.
pub(crate) fn run_ipc(inner: &Arc<Inner>, x: &XferShared) -> Result<()> {
    static TRACE: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| std::env::var_os("KVTRANSFER_TRACE_IPC").is_some());
    if !*TRACE {
        return crate::shm::same_host(inner, x, |_| copy_ipc(x));
    }
    let posted = (*x.posted_at.lock()).unwrap_or_else(std::time::Instant::now);
    let start = posted.elapsed();
    let mut copied = std::time::Duration::ZERO;
    let r = crate::shm::same_host(inner, x, |_| {
        let r = copy_ipc(x);
        copied = posted.elapsed();
        r
    });
    eprintln!(
        "[kvtransfer ipc] {} fragments, {} bytes: picked up {:?}, copied {:?}, done {:?} after post",
        x.local.len(),
        x.total,
        start,
        copied,
        posted.elapsed()
    );
    r
}

/// A CUDA IPC transfer's copies, launched at post and not yet waited for.
pub(crate) type IpcPending = kvstore_cuda::CopyPending;

/// Launches a CUDA IPC transfer's copies from the posting thread, so the GPU starts at once and
/// the same-host worker only waits for them (`None` where the list-copy kernel is unavailable:
/// the worker then copies). The peer must be alive.
pub(crate) fn launch_ipc(x: &XferShared) -> Result<Option<IpcPending>> {
    let name = &x.remote.meta.name;
    if crate::shm::peer_of(&x.remote)?.exited() {
        return Err(peer_err(name, "process exited"));
    }
    let Ok(list) = copy_list(x.local_dev) else {
        return Ok(None);
    };
    // SAFETY: local segments lie in this agent's registered GPU regions (checked at prepare);
    // remote ones in the peer's registered regions as its metadata lists them, translated into
    // the mapping of their allocation, which the peer keeps while registered and which stays
    // mapped here while the transfer's `Remote` lives. The copies are waited for (or their
    // handle dropped, which waits) before the transfer completes.
    unsafe { list.launch(&x.ipc_pairs) }
        .map(Some)
        .map_err(|e| peer_err(name, format!("GPU copy: {e}")))
}

/// Waits for the copies a post launched, for a transfer that will not reach the worker.
pub(crate) fn abandon_ipc(x: &XferShared) {
    if let Some(p) = x.ipc_pending.lock().take() {
        let _ = p.wait();
    }
}

/// Finishes an IPC transfer's copies on the worker (see [`run_ipc`]): waits for those launched
/// at post or, where the list-copy kernel is unavailable, copies one DMA per fragment.
fn copy_ipc(x: &XferShared) -> Result<()> {
    let name = &x.remote.meta.name;
    let pending = x.ipc_pending.lock().take();
    let copied = match pending {
        Some(p) => p.wait(),
        None if x.is_cancelled() => return Err(Error::Cancelled),
        // SAFETY: as for `launch_ipc`.
        None => unsafe { device(x.local_dev)?.copy_batch(&x.ipc_pairs) },
    };
    copied.map_err(|e| peer_err(name, format!("GPU copy: {e}")))?;
    if x.is_cancelled() {
        return Err(Error::Cancelled);
    }
    Ok(())
}

/// One piece of a staged transfer: memory of `kind` on `dev` at `addr`, and its place in the
/// staging buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece {
    pub kind: MemKind,
    pub dev: u32,
    pub addr: u64,
    pub off: usize,
    pub len: usize,
}

/// A pinned host buffer standing in for the pieces of one transfer.
pub(crate) struct Staging {
    buf: PinnedBuffer,
    pieces: Vec<Piece>,
}

impl Staging {
    /// A buffer for `pieces` (their offsets are assigned here, back to back), pinned for the GPU
    /// of the first GPU piece.
    pub fn new(mut pieces: Vec<Piece>) -> Result<Staging> {
        let dev = pieces
            .iter()
            .find(|p| p.kind == MemKind::Vram)
            .map_or(0, |p| p.dev);
        let mut off = 0usize;
        for p in &mut pieces {
            p.off = off;
            off += p.len;
        }
        let buf = PinnedBuffer::alloc(&device(dev)?, off.max(1))
            .map_err(|e| cuda_err("allocating a staging buffer", e))?;
        Ok(Staging { buf, pieces })
    }

    /// The staging buffer as one segment.
    pub fn seg(&self) -> Seg {
        Seg {
            addr: self.buf.addr(),
            len: self.pieces.iter().map(|p| p.len as u64).sum(),
        }
    }

    /// The staging address of each piece, in order.
    pub fn segs(&self) -> Vec<Seg> {
        self.pieces
            .iter()
            .map(|p| Seg {
                addr: self.buf.addr() + p.off as u64,
                len: p.len as u64,
            })
            .collect()
    }

    /// Copies every piece into the staging buffer.
    pub fn gather(&self) -> Result<()> {
        for p in &self.pieces {
            let dst = (self.buf.addr() + p.off as u64) as *mut u8;
            match p.kind {
                // SAFETY: the piece was checked against a registered GPU region; `dst` is inside
                // the staging buffer (offsets are assigned within its length).
                MemKind::Vram => unsafe { device(p.dev)?.copy_to_host(dst, p.addr, p.len) }
                    .map_err(|e| cuda_err("copying GPU memory to the host", e))?,
                // SAFETY: the piece was checked against a registered host region, which stays
                // valid while registered; `dst` as above.
                MemKind::Dram => unsafe {
                    std::ptr::copy_nonoverlapping(p.addr as *const u8, dst, p.len)
                },
            }
        }
        Ok(())
    }

    /// Copies the staging buffer out to every piece.
    pub fn scatter(&self) -> Result<()> {
        for p in &self.pieces {
            let src = (self.buf.addr() + p.off as u64) as *const u8;
            match p.kind {
                // SAFETY: as in `gather`, the other way.
                MemKind::Vram => unsafe { device(p.dev)?.copy_to_device(p.addr, src, p.len) }
                    .map_err(|e| cuda_err("copying host memory to the GPU", e))?,
                // SAFETY: as in `gather`, the other way.
                MemKind::Dram => unsafe {
                    std::ptr::copy_nonoverlapping(src, p.addr as *mut u8, p.len)
                },
            }
        }
        Ok(())
    }
}

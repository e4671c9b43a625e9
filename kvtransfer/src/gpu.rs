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

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use kvstore_cuda::{Device, PinnedBuffer};

use crate::desc::MemKind;
use crate::error::{Error, Result};
use crate::xfer::Seg;

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

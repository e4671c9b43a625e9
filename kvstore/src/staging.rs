//! Staging buffers for the disk tier's direct I/O, backed by transparent huge pages.
//!
//! A direct read or write pins the user pages it moves for the length of the request, page by
//! page. Into ordinary 4 KiB pages that is 64 pins per 256 KiB and 512 per 2 MiB, and on a
//! virtual machine every pinned page may also cost the hypervisor a mapping. Through one 2 MiB
//! huge page it is a single pin. On the development machine (a Firecracker guest, ext4 on a
//! virtio disk, 4 threads, psync) plain `pread`s of 256 KiB went from 1.6 to 2.5 GB/s and of
//! 2 MiB from 1.4–1.7 to 2.1 GB/s when the buffer was a huge page, and first writes of 2 MiB
//! from 1.5 to 2.1 GB/s; at 16 KiB it made no difference. So a block of [`STAGE_MIN`] or more
//! is read into a staging buffer of the tier's (and checksummed there, part by part as the
//! parts arrive) and copied out to the caller's memory; the copy costs a fraction of what the
//! pinning saves. Writes gain less, since the copy in comes before the I/O: in the store
//! benchmark's first writes, staging took 1 MiB blocks from 1.99–2.11 to 2.15–2.21 GB/s and
//! 2 MiB blocks from 1.70–1.86 to 2.02–2.06, but cost 64 KiB blocks 10% (1.16 to 1.05) and
//! 256 KiB blocks 20% (2.03 to 1.61), so only blocks of [`WRITE_STAGE_MIN`] or more are written
//! from a staging buffer. Where transparent huge pages are off, staging would only add a copy,
//! so the tier reads and writes the caller's memory directly.
//!
//! Buffers are kept in a small pool per tier, one per concurrent I/O, and unmapped with it.

use std::ptr::NonNull;

use parking_lot::Mutex;

/// Blocks of at least this many bytes are read through a staging buffer.
pub const STAGE_MIN: usize = 64 << 10;
/// Blocks of at least this many bytes are written from a staging buffer.
pub const WRITE_STAGE_MIN: usize = 1 << 20;
const HUGE_PAGE: usize = 2 << 20;
/// Buffers a pool keeps when they are given back (more are unmapped).
const POOL_KEEP: usize = 16;

/// One staging buffer: an anonymous mapping of whole huge pages, faulted in when made.
pub(crate) struct Staging {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is a private mapping owned by this value.
unsafe impl Send for Staging {}

impl Staging {
    fn map(len: usize) -> Option<Staging> {
        let (ptr, _) = crate::host::map_aligned(len, true).ok()?;
        // SAFETY: `ptr..ptr+len` is the writable mapping just made, not yet in use.
        unsafe { crate::host::populate(ptr.as_ptr(), len) };
        Some(Staging { ptr, len })
    }

    /// The whole buffer.
    pub(crate) fn buf(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes are mapped, writable and initialised (faulted in as zeros).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing borrows it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A tier's staging buffers.
pub(crate) struct StagePool {
    bytes: usize,
    free: Mutex<Vec<Staging>>,
}

impl StagePool {
    /// A pool of buffers of at least `slot_bytes`, or `None` where staging would not pay: blocks
    /// under [`STAGE_MIN`], or no transparent huge pages.
    pub(crate) fn new(slot_bytes: usize) -> Option<StagePool> {
        if slot_bytes < STAGE_MIN || !crate::host::thp_available() {
            return None;
        }
        Some(StagePool {
            bytes: slot_bytes.next_multiple_of(HUGE_PAGE),
            free: Mutex::new(Vec::new()),
        })
    }

    /// A buffer for one I/O, or `None` if none can be mapped (the caller then does without).
    pub(crate) fn take(&self) -> Option<Staged<'_>> {
        let buf = match self.free.lock().pop() {
            Some(b) => b,
            None => Staging::map(self.bytes)?,
        };
        Some(Staged {
            pool: self,
            buf: Some(buf),
        })
    }
}

/// A buffer lent by a [`StagePool`], given back when dropped.
pub(crate) struct Staged<'a> {
    pool: &'a StagePool,
    buf: Option<Staging>,
}

impl Staged<'_> {
    /// The buffer's first `len` bytes.
    pub(crate) fn get(&mut self, len: usize) -> &mut [u8] {
        match self.buf.as_mut() {
            Some(b) => &mut b.buf()[..len],
            None => &mut [],
        }
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            let mut free = self.pool.free.lock();
            if free.len() < POOL_KEEP {
                free.push(b);
            }
        }
    }
}

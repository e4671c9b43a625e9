use std::sync::Arc;

use crate::desc::MemKind;
use crate::error::{Error, Result};

/// Identifies a region registered with an agent (unique within that agent's lifetime).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub u32);

struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this struct; access to its bytes is through raw
// pointers whose users state their own synchronisation.
unsafe impl Send for Mapping {}
// SAFETY: as above, the struct itself holds no interior state besides the pointer.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned in HostBuffer::new.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// Page-aligned, zeroed host memory owned by kvtransfer (an anonymous mapping). Cloning shares
/// the same memory; registering a `HostBuffer` keeps it alive for as long as it is registered.
///
/// Remote agents read and write this memory while transfers run: read it with
/// [`HostBuffer::read_at`] after the transfer that filled it completed (or after its
/// notification arrived).
#[derive(Clone)]
pub struct HostBuffer {
    map: Arc<Mapping>,
}

impl HostBuffer {
    pub fn new(len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::Invalid(
                "a HostBuffer needs at least one byte".into(),
            ));
        }
        // SAFETY: anonymous private mapping, no file descriptor, kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Io(format!(
                "mmap of {len} bytes failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(HostBuffer {
            map: Arc::new(Mapping {
                ptr: ptr.cast(),
                len,
            }),
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.map.ptr
    }

    /// The address of byte 0, as descriptors name it.
    pub fn addr(&self) -> u64 {
        self.map.ptr as u64
    }

    pub fn len(&self) -> usize {
        self.map.len
    }

    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// Copies `src` into the buffer at `offset`.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.check(offset, src.len())?;
        // SAFETY: bounds checked above; the mapping lives as long as self.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.map.ptr.add(offset), src.len());
        }
        Ok(())
    }

    /// Copies bytes at `offset` into `dst`.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check(offset, dst.len())?;
        // SAFETY: bounds checked above; the mapping lives as long as self.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.ptr.add(offset), dst.as_mut_ptr(), dst.len());
        }
        Ok(())
    }

    /// Fills the buffer with `byte`.
    pub fn fill(&self, byte: u8) {
        // SAFETY: the whole mapping, which lives as long as self.
        unsafe { std::ptr::write_bytes(self.map.ptr, byte, self.map.len) }
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.map.len => Ok(()),
            _ => Err(Error::Invalid(format!(
                "range {offset}+{len} outside a buffer of {} bytes",
                self.map.len
            ))),
        }
    }
}

/// Regions sorted by address, searchable by range.
#[derive(Default, Clone)]
pub(crate) struct RegionTable {
    pub regions: Vec<(u64, u64, u32, MemKind, u32)>, // addr, len, id, kind, dev
}

impl RegionTable {
    pub fn insert(&mut self, addr: u64, len: u64, id: u32, kind: MemKind, dev: u32) -> Result<()> {
        let end = addr
            .checked_add(len)
            .ok_or_else(|| Error::Invalid("region wraps the address space".into()))?;
        let i = self.regions.partition_point(|r| r.0 < addr);
        let overlaps_prev = i > 0 && {
            let p = self.regions[i - 1];
            p.0 + p.1 > addr && p.3 == kind && p.4 == dev
        };
        let overlaps_next = i < self.regions.len() && {
            let n = self.regions[i];
            n.0 < end && n.3 == kind && n.4 == dev
        };
        if overlaps_prev || overlaps_next {
            return Err(Error::Invalid(format!(
                "region {addr:#x}+{len} overlaps a registered region"
            )));
        }
        self.regions.insert(i, (addr, len, id, kind, dev));
        Ok(())
    }

    pub fn remove(&mut self, id: u32) -> bool {
        let before = self.regions.len();
        self.regions.retain(|r| r.2 != id);
        before != self.regions.len()
    }

    /// The region containing `[addr, addr+len)`, of any kind: `(id, kind, dev)`.
    #[inline]
    pub fn find_any(&self, addr: u64, len: u64) -> Option<(u32, MemKind, u32)> {
        let end = addr.checked_add(len)?;
        let i = self.regions.partition_point(|r| r.0 <= addr);
        if i == 0 {
            return None;
        }
        let r = self.regions[i - 1];
        (end <= r.0 + r.1).then_some((r.2, r.3, r.4))
    }

    /// The region id containing `[addr, addr+len)` of `kind`/`dev`, if any.
    #[inline]
    pub fn find(&self, addr: u64, len: u64, kind: MemKind, dev: u32) -> Option<u32> {
        let end = addr.checked_add(len)?;
        let i = self.regions.partition_point(|r| r.0 <= addr);
        if i == 0 {
            return None;
        }
        let r = self.regions[i - 1];
        (r.3 == kind && r.4 == dev && end <= r.0 + r.1).then_some(r.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_lookup() {
        let mut t = RegionTable::default();
        t.insert(1000, 100, 1, MemKind::Dram, 0).unwrap();
        t.insert(2000, 100, 2, MemKind::Dram, 0).unwrap();
        assert!(t.insert(1050, 10, 3, MemKind::Dram, 0).is_err());
        assert!(t.insert(950, 60, 3, MemKind::Dram, 0).is_err());
        assert_eq!(t.find(1000, 100, MemKind::Dram, 0), Some(1));
        assert_eq!(t.find(1000, 101, MemKind::Dram, 0), None);
        assert_eq!(t.find(999, 2, MemKind::Dram, 0), None);
        assert_eq!(t.find(2050, 50, MemKind::Dram, 0), Some(2));
        assert_eq!(t.find(2050, 50, MemKind::Vram, 0), None);
        assert_eq!(t.find(u64::MAX, 2, MemKind::Dram, 0), None);
        assert!(t.remove(1));
        assert_eq!(t.find(1000, 1, MemKind::Dram, 0), None);
    }

    #[test]
    fn host_buffer_bounds() {
        let b = HostBuffer::new(4096).unwrap();
        b.write_at(4090, &[1; 6]).unwrap();
        assert!(b.write_at(4091, &[1; 6]).is_err());
        let mut out = [0u8; 6];
        b.read_at(4090, &mut out).unwrap();
        assert_eq!(out, [1; 6]);
        assert!(b.read_at(usize::MAX, &mut out).is_err());
    }
}

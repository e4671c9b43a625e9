//! The host-memory tier: a preallocated arena of fixed-size slots.
//!
//! The arena is one anonymous mapping made at start (backed by explicit huge pages when the
//! system has them reserved, else transparent huge pages when enabled), faulted in up front and
//! locked in memory when the process is allowed to. Slots are `block_bytes` rounded up to 4 KiB,
//! so every slot is page-aligned: the disk tier writes them with O_DIRECT without a bounce
//! buffer, and a GPU copy engine can register the whole arena once ([`HostTier::arena`]).
//!
//! Allocation is a free-list pop or one eviction step of the policy (O(1) amortised). A block
//! handed out by [`HostTier::get`] is pinned until its [`HostBlock`] (or the [`Bytes`] made from
//! it) is dropped: pinned slots are never evicted, removed or reused.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use kvindex::BlockKey;
use parking_lot::Mutex;

use crate::error::{Result, StoreError};
use crate::policy::{Policy, PolicyKind};
use crate::stats::{TierCounters, TierStats};

/// Page size the slots are aligned to.
pub const SLOT_ALIGN: usize = 4096;

/// Settings of a host tier.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Memory for blocks, in bytes (rounded down to whole slots).
    pub capacity_bytes: u64,
    /// Bytes of one block (every block of a store has this size).
    pub block_bytes: usize,
    /// Eviction policy.
    pub policy: PolicyKind,
    /// Lock the arena in RAM (`mlock`) when the process may; logged and skipped otherwise.
    pub lock_memory: bool,
    /// Back the arena with huge pages when available.
    pub huge_pages: bool,
    /// Page-lock the arena and map it for the GPU (`cuMemHostRegister`), so that a GPU copy
    /// engine moves blocks straight between the GPU and the slots at full speed.
    pub gpu_pin: GpuPin,
}

/// Whether the host tier's arena is pinned for the GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GpuPin {
    /// Plain memory.
    #[default]
    Off,
    /// Pinned when a GPU is present (and kvstore is built with its `cuda` feature); plain memory,
    /// logged, otherwise.
    IfPresent,
    /// Pinned, or the tier is not made (the error says why).
    Require,
}

impl HostConfig {
    /// A tier of `capacity_bytes` for blocks of `block_bytes`, LRU, locked, huge pages.
    pub fn new(capacity_bytes: u64, block_bytes: usize) -> Self {
        HostConfig {
            capacity_bytes,
            block_bytes,
            policy: PolicyKind::Lru,
            lock_memory: true,
            huge_pages: true,
            gpu_pin: GpuPin::Off,
        }
    }
}

/// How the arena is backed by huge pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugePages {
    /// Explicit 2 MiB huge pages (`MAP_HUGETLB`).
    Explicit,
    /// Transparent huge pages requested with `madvise(MADV_HUGEPAGE)`.
    Transparent,
    /// Normal pages.
    None,
}

/// What the arena got from the system.
#[derive(Clone, Copy, Debug)]
pub struct ArenaInfo {
    /// Start of the arena.
    pub ptr: *mut u8,
    /// Length of the arena in bytes.
    pub len: usize,
    /// Distance between consecutive slots.
    pub slot_stride: usize,
    /// Whether `mlock` succeeded.
    pub locked: bool,
    pub huge_pages: HugePages,
    /// Whether the arena is pinned and mapped for the GPU ([`GpuPin`]).
    pub gpu_pinned: bool,
}

// SAFETY: ArenaInfo is plain data describing the mapping; the pointer is only a description.
unsafe impl Send for ArenaInfo {}
// SAFETY: as above, it is never dereferenced through this type.
unsafe impl Sync for ArenaInfo {}

struct Arena {
    ptr: NonNull<u8>,
    len: usize,
    locked: bool,
    huge: HugePages,
}

// SAFETY: the arena is a private anonymous mapping owned by this value; concurrent access to
// its slots is coordinated by the tier's slot states and pins.
unsafe impl Send for Arena {}
// SAFETY: as above.
unsafe impl Sync for Arena {}

const MADV_POPULATE_WRITE: libc::c_int = 23;

impl Arena {
    fn map(len: usize, huge: bool, lock: bool) -> Result<Arena> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let mut kind = HugePages::None;
        let mut ptr = libc::MAP_FAILED;
        if huge && len.is_multiple_of(2 << 20) {
            // SAFETY: an anonymous mapping with no address hint has no preconditions.
            ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    prot,
                    flags | libc::MAP_HUGETLB,
                    -1,
                    0,
                )
            };
            if ptr != libc::MAP_FAILED {
                kind = HugePages::Explicit;
            }
        }
        if ptr == libc::MAP_FAILED {
            let (p, advised) = map_aligned(len, huge && thp_available())
                .map_err(|e| StoreError::io(format!("mapping a host arena of {len} bytes"), e))?;
            ptr = p.as_ptr().cast();
            if advised {
                kind = HugePages::Transparent;
            }
        }
        // Fault every page in now, so the first block copies do not pay for it.
        // SAFETY: ptr..ptr+len is our writable mapping.
        unsafe { populate(ptr.cast(), len) };
        let mut locked = false;
        if lock {
            // SAFETY: ptr..ptr+len is our mapping.
            if unsafe { libc::mlock(ptr, len) } == 0 {
                locked = true;
            } else {
                tracing::warn!(
                    bytes = len,
                    error = %std::io::Error::last_os_error(),
                    "host tier: mlock refused (RLIMIT_MEMLOCK or no CAP_IPC_LOCK); the arena may be swapped"
                );
            }
        }
        tracing::info!(bytes = len, ?kind, locked, "host tier arena mapped");
        Ok(Arena {
            ptr: NonNull::new(ptr as *mut u8).expect("mmap returned a null mapping"),
            len,
            locked,
            huge: kind,
        })
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and no HostBlock outlives the tier (they hold an Arc).
        unsafe {
            libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len);
        }
    }
}

/// Registers the arena with GPU 0 as `pin` asks.
#[cfg(feature = "cuda")]
fn gpu_register(arena: &Arena, pin: GpuPin) -> Result<Option<kvstore_cuda::PinnedBuffer>> {
    if pin == GpuPin::Off {
        return Ok(None);
    }
    let registered = kvstore_cuda::Device::open(0).and_then(|dev| {
        // SAFETY: the arena is a live mapping of `len` bytes owned by the tier, which keeps the
        // registration in a field dropped before the arena; the copy engine is the only other
        // writer of its slots, into slots the tier hands it.
        unsafe { kvstore_cuda::PinnedBuffer::register(&dev, arena.ptr.as_ptr(), arena.len) }
    });
    match registered {
        Ok(b) => Ok(Some(b)),
        Err(e) if pin == GpuPin::IfPresent && e.kind() == kvstore_cuda::ErrorKind::Unavailable => {
            tracing::info!(reason = %e, "host tier: not pinned for the GPU");
            Ok(None)
        }
        Err(e) => Err(StoreError::Invalid(format!(
            "pinning the host tier's {} bytes for the GPU: {e}",
            arena.len
        ))),
    }
}

/// A private, writable anonymous mapping of `len` bytes that starts on a 2 MiB boundary (so
/// transparent huge pages can back all of it), advised for them when `thp`. Returns its start
/// and whether the advice was taken; it is unmapped with `munmap(start, len)`.
pub(crate) fn map_aligned(len: usize, thp: bool) -> std::io::Result<(NonNull<u8>, bool)> {
    const HUGE_PAGE: usize = 2 << 20;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // One huge page more than needed, so that an aligned stretch of `len` lies inside.
    let span = len + HUGE_PAGE;
    // SAFETY: an anonymous mapping with no address hint has no preconditions.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), span, prot, flags, -1, 0) };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = (raw as usize).next_multiple_of(HUGE_PAGE);
    let (head, tail) = (start - raw as usize, raw as usize + span - (start + len));
    // SAFETY: the trimmed pieces lie inside the mapping just made and nothing uses them;
    // start..start+len is the rest of it.
    let advised = unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
        thp && libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) == 0
    };
    let ptr = NonNull::new(start as *mut u8).expect("mmap returned a null mapping");
    Ok((ptr, advised))
}

/// Faults every page of `ptr..ptr+len` in now (`MADV_POPULATE_WRITE`, or a write per page where
/// the kernel is older).
///
/// # Safety
/// `ptr..ptr+len` must be a writable mapping whose contents may be overwritten with zeros.
pub(crate) unsafe fn populate(ptr: *mut u8, len: usize) {
    // SAFETY: the caller's contract.
    unsafe {
        if libc::madvise(ptr.cast(), len, MADV_POPULATE_WRITE) != 0 {
            for off in (0..len).step_by(SLOT_ALIGN) {
                ptr.add(off).write_volatile(0);
            }
        }
    }
}

pub(crate) fn thp_available() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| s.contains("[always]") || s.contains("[madvise]"))
        .unwrap_or(false)
}

#[derive(Clone, Copy)]
struct Slot {
    key: BlockKey,
    len: u32,
    pins: u32,
    used: bool,
    ready: bool,
}

const EMPTY_SLOT: Slot = Slot {
    key: BlockKey(0),
    len: 0,
    pins: 0,
    used: false,
    ready: false,
};

struct State {
    map: HashMap<BlockKey, u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    policy: Policy,
}

struct Shared {
    /// The arena's GPU registration (dropped, so unregistered, before the arena is unmapped).
    #[cfg(feature = "cuda")]
    pinned: Option<kvstore_cuda::PinnedBuffer>,
    arena: Arena,
    stride: usize,
    block_bytes: usize,
    nslots: usize,
    state: Mutex<State>,
    stats: TierCounters,
}

/// What a put did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPut {
    /// Stored; these blocks were evicted to make room.
    Stored { evicted: Vec<BlockKey> },
    /// The key was already held (or being written): nothing was copied.
    Present,
}

/// What [`HostTier::put_pinned`] did.
pub(crate) enum PinnedPut {
    /// Stored, and pinned until `block` is dropped; these blocks were evicted to make room.
    Stored {
        evicted: Vec<BlockKey>,
        block: HostBlock,
    },
    /// The key was already held (or being written): nothing was copied or pinned.
    Present,
}

/// The host-memory tier. Cheap to clone; every clone is the same tier.
#[derive(Clone)]
pub struct HostTier {
    sh: Arc<Shared>,
}

impl HostTier {
    /// Maps and prefaults the arena.
    pub fn new(cfg: &HostConfig) -> Result<Self> {
        if cfg.block_bytes == 0 || cfg.block_bytes > u32::MAX as usize {
            return Err(StoreError::Invalid(format!(
                "block_bytes must be in 1..=4 GiB, got {}",
                cfg.block_bytes
            )));
        }
        let stride = cfg.block_bytes.div_ceil(SLOT_ALIGN) * SLOT_ALIGN;
        let nslots = (cfg.capacity_bytes / stride as u64) as usize;
        if nslots == 0 {
            return Err(StoreError::Invalid(format!(
                "host capacity {} bytes holds no block of {} bytes",
                cfg.capacity_bytes, cfg.block_bytes
            )));
        }
        if nslots >= u32::MAX as usize {
            return Err(StoreError::Invalid("too many host slots".into()));
        }
        let len = nslots * stride;
        let arena = Arena::map(len, cfg.huge_pages, cfg.lock_memory)?;
        #[cfg(feature = "cuda")]
        let pinned = gpu_register(&arena, cfg.gpu_pin)?;
        #[cfg(not(feature = "cuda"))]
        match cfg.gpu_pin {
            GpuPin::Off => {}
            GpuPin::IfPresent => tracing::info!(
                "host tier: not pinned for the GPU (kvstore was built without its cuda feature)"
            ),
            GpuPin::Require => {
                return Err(StoreError::Invalid(
                    "a GPU-pinned host tier needs kvstore's cuda feature".into(),
                ))
            }
        }
        Ok(HostTier {
            sh: Arc::new(Shared {
                #[cfg(feature = "cuda")]
                pinned,
                arena,
                stride,
                block_bytes: cfg.block_bytes,
                nslots,
                state: Mutex::new(State {
                    map: HashMap::with_capacity(nslots),
                    slots: vec![EMPTY_SLOT; nslots],
                    free: (0..nslots as u32).rev().collect(),
                    policy: Policy::new(cfg.policy, nslots),
                }),
                stats: TierCounters::default(),
            }),
        })
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.sh.block_bytes
    }

    /// Number of slots.
    pub fn capacity_blocks(&self) -> usize {
        self.sh.nslots
    }

    /// The arena, for registering it with a device (`cudaHostRegister`, RDMA).
    pub fn arena(&self) -> ArenaInfo {
        ArenaInfo {
            ptr: self.sh.arena.ptr.as_ptr(),
            len: self.sh.arena.len,
            slot_stride: self.sh.stride,
            locked: self.sh.arena.locked,
            huge_pages: self.sh.arena.huge,
            gpu_pinned: self.gpu_pinned(),
        }
    }

    fn gpu_pinned(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.sh.pinned.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    fn slot_ptr(&self, s: u32) -> *mut u8 {
        // SAFETY: s < nslots, so the offset is inside the arena.
        unsafe { self.sh.arena.ptr.as_ptr().add(s as usize * self.sh.stride) }
    }

    /// Copies `data` (exactly one block) in under `key`. A key already present is not copied
    /// again ([`HostPut::Present`]).
    pub fn put(&self, key: BlockKey, data: &[u8]) -> Result<HostPut> {
        self.check_len(data.len())?;
        self.put_with(key, data.len(), |dst| {
            dst.copy_from_slice(data);
            Ok(())
        })
    }

    fn check_len(&self, len: usize) -> Result<()> {
        if len != self.sh.block_bytes {
            return Err(StoreError::Invalid(format!(
                "block is {len} bytes, this store's blocks are {}",
                self.sh.block_bytes
            )));
        }
        Ok(())
    }

    /// Stores a block by filling its slot in place: `fill` gets the slot's `len` bytes (a DMA
    /// engine or a disk read can write straight into it). If `fill` fails the slot is freed and
    /// nothing is stored.
    pub fn put_with(
        &self,
        key: BlockKey,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<HostPut> {
        Ok(match self.store(key, len, fill, false)? {
            Some((evicted, _)) => HostPut::Stored { evicted },
            None => HostPut::Present,
        })
    }

    /// Like [`HostTier::put_with`], but a block it stores comes back pinned (the writer's pin is
    /// handed over), so that no concurrent put can evict it before the pipeline has written it
    /// down.
    pub(crate) fn put_pinned(
        &self,
        key: BlockKey,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<PinnedPut> {
        Ok(match self.store(key, len, fill, true)? {
            Some((evicted, slot)) => PinnedPut::Stored {
                evicted,
                block: HostBlock {
                    tier: self.clone(),
                    slot,
                    len,
                },
            },
            None => PinnedPut::Present,
        })
    }

    /// Stores a block: `None` if the key was already held, else the evicted keys and the slot
    /// (still pinned by the writer if `keep_pin`: the caller then owns that pin).
    fn store(
        &self,
        key: BlockKey,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
        keep_pin: bool,
    ) -> Result<Option<(Vec<BlockKey>, u32)>> {
        self.check_len(len)?;
        let t0 = Instant::now();
        let mut evicted = Vec::new();
        let slot = {
            let mut st = self.sh.state.lock();
            if st.map.contains_key(&key) {
                self.sh
                    .stats
                    .dedup
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(None);
            }
            let s = match st.free.pop() {
                Some(s) => s,
                None => {
                    let State { slots, policy, .. } = &mut *st;
                    let v = policy
                        .victim(|s| slots[s as usize].pins > 0, |s| slots[s as usize].key)
                        .ok_or(StoreError::AllPinned { tier: "host" })?;
                    let old = slots[v as usize].key;
                    st.map.remove(&old);
                    evicted.push(old);
                    self.sh
                        .stats
                        .evictions
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    v
                }
            };
            st.slots[s as usize] = Slot {
                key,
                len: len as u32,
                pins: 1,
                used: true,
                ready: false,
            };
            st.map.insert(key, s);
            s
        };
        // SAFETY: the slot is ours alone: it is marked used and not ready, so no reader gets it,
        // and its writer pin keeps it from eviction; len <= stride.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(slot), len) };
        let filled = fill(dst);
        let mut st = self.sh.state.lock();
        match filled {
            Ok(()) => {
                let sl = &mut st.slots[slot as usize];
                sl.ready = true;
                if !keep_pin {
                    sl.pins -= 1;
                }
                st.policy.insert(slot, key);
                drop(st);
                self.sh.stats.write_done(len, t0);
                Ok(Some((evicted, slot)))
            }
            Err(e) => {
                st.map.remove(&key);
                st.slots[slot as usize] = EMPTY_SLOT;
                st.free.push(slot);
                drop(st);
                self.sh.stats.error();
                Err(e)
            }
        }
    }

    /// The block under `key`, pinned until the handle is dropped, or `None`.
    pub fn get(&self, key: BlockKey) -> Option<HostBlock> {
        let t0 = Instant::now();
        let mut st = self.sh.state.lock();
        let Some(&s) = st.map.get(&key) else {
            drop(st);
            self.sh.stats.miss();
            return None;
        };
        let sl = &mut st.slots[s as usize];
        if !sl.ready {
            drop(st);
            self.sh.stats.miss();
            return None;
        }
        sl.pins += 1;
        let len = sl.len as usize;
        st.policy.touch(s);
        drop(st);
        self.sh.stats.read_done(len, t0);
        Some(HostBlock {
            tier: self.clone(),
            slot: s,
            len,
        })
    }

    /// Copies the block under `key` into `dst` (which must be one block long); `false` on a miss.
    pub fn get_into(&self, key: BlockKey, dst: &mut [u8]) -> Result<bool> {
        self.check_len(dst.len())?;
        match self.get(key) {
            Some(b) => {
                dst.copy_from_slice(&b);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Whether `key` is held (does not count as an access).
    pub fn contains(&self, key: BlockKey) -> bool {
        let st = self.sh.state.lock();
        st.map
            .get(&key)
            .is_some_and(|&s| st.slots[s as usize].ready)
    }

    /// Removes `key`. Returns `false` if it is absent, still being written, or pinned.
    pub fn remove(&self, key: BlockKey) -> bool {
        let mut st = self.sh.state.lock();
        let Some(&s) = st.map.get(&key) else {
            return false;
        };
        let sl = st.slots[s as usize];
        if !sl.ready || sl.pins > 0 {
            return false;
        }
        st.map.remove(&key);
        st.policy.remove(s);
        st.slots[s as usize] = EMPTY_SLOT;
        st.free.push(s);
        true
    }

    /// Every held key (unordered).
    pub fn keys(&self) -> Vec<BlockKey> {
        let st = self.sh.state.lock();
        st.map
            .iter()
            .filter(|(_, &s)| st.slots[s as usize].ready)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Number of blocks held.
    pub fn len(&self) -> usize {
        self.sh.state.lock().map.len()
    }

    /// Whether the tier is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `key` is pinned now.
    pub fn is_pinned(&self, key: BlockKey) -> bool {
        let st = self.sh.state.lock();
        st.map
            .get(&key)
            .is_some_and(|&s| st.slots[s as usize].pins > 0)
    }

    /// Statistics.
    pub fn stats(&self) -> TierStats {
        let blocks = self.len() as u64;
        self.sh.stats.snapshot(
            "host",
            blocks,
            self.sh.nslots as u64,
            self.sh.block_bytes as u64,
        )
    }

    fn unpin(&self, s: u32) {
        let mut st = self.sh.state.lock();
        let sl = &mut st.slots[s as usize];
        debug_assert!(sl.used && sl.pins > 0);
        sl.pins = sl.pins.saturating_sub(1);
    }
}

/// A pinned block of the host tier; derefs to its bytes. The slot cannot be evicted or reused
/// while this handle (or a [`Bytes`] made from it) lives.
pub struct HostBlock {
    tier: HostTier,
    slot: u32,
    len: usize,
}

impl HostBlock {
    /// The block's bytes as [`Bytes`] without copying; the pin lasts as long as the `Bytes`.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }

    /// Address of the block in the arena (for DMA).
    pub fn as_ptr(&self) -> *const u8 {
        self.tier.slot_ptr(self.slot)
    }
}

impl std::ops::Deref for HostBlock {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the slot is ready (written) and pinned, so nobody writes it while this handle
        // lives; len <= stride.
        unsafe { std::slice::from_raw_parts(self.tier.slot_ptr(self.slot), self.len) }
    }
}

impl AsRef<[u8]> for HostBlock {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for HostBlock {
    fn drop(&mut self) {
        self.tier.unpin(self.slot);
    }
}

impl std::fmt::Debug for HostBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBlock")
            .field("slot", &self.slot)
            .field("len", &self.len)
            .finish()
    }
}

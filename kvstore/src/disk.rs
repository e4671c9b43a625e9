//! The local-disk tier: fixed-size, page-aligned slots in one data file, written and read with
//! O_DIRECT, and a header per block in a side table.
//!
//! ## Files (in the tier's directory)
//!
//! * `kvstore.<j>.dat` for `j` in `0..stripes`: page-aligned slots of `slot_bytes` (the block
//!   size rounded up to 4 KiB); slot `i` lives in file `i % stripes` at `(i / stripes) ×
//!   slot_bytes` (several files let direct writes proceed in parallel; see
//!   [`DiskConfig::stripes`]). Opened with `O_DIRECT`; that it is in
//!   effect is *verified* at open (a misaligned direct read must be refused by the kernel). When
//!   the file system does not honour it (tmpfs, some FUSE and network file systems) the tier
//!   either refuses to open ([`DirectIo::Require`]) or says so in a warning and in
//!   [`DiskTier::direct_io`] and goes on with the page cache ([`DirectIo::Prefer`]).
//! * `kvstore.hdr`: a 4 KiB superblock (format version and geometry, checked at every open:
//!   another geometry is refused, never overwritten), then one 64-byte header per slot:
//!   [`BlockHeader`] archived with rkyv (key, length, XXH3-64 checksum of the payload, format
//!   version, a write sequence number and a checksum of the header itself).
//!
//! Keeping headers in a side table lets payload slots stay exactly page-sized: a 16 KiB block
//! costs 16 KiB of disk and one aligned write, not 20 KiB.
//!
//! ## Crash safety
//!
//! A block is written in this order: (1) if the slot held another block, its header is zeroed;
//! (2) the payload is written (with O_DIRECT it is on the device when the call returns; a large
//! block goes as four parts, and every part has completed, short parts finished with `pwrite`,
//! before the next step; any failure stops here, so no header is written); (3) the header is
//! written. A header therefore only ever describes a payload that was complete
//! when the header was written. After `kill -9` at any moment, recovery reads the header table,
//! keeps every header whose own checksum, magic and version are right, and every later read
//! verifies the payload's checksum against its header: a torn or stale payload is reported as
//! [`StoreError::Corrupt`] and dropped, never returned. With [`DiskConfig::sync`] the payload and
//! header are also `fdatasync`ed, which extends the guarantee to power loss.
//!
//! ## I/O engine
//!
//! Synchronous `pwrite` and `pread` for blocks under 128 KiB, on the caller's thread;
//! concurrency comes from the callers (the store's write-behind and loader thread pools, or the
//! application's own threads). A block of 128 KiB or more is read as four parts submitted
//! together with Linux native AIO (a context per thread; `pread` where the kernel refuses it),
//! and each part is checksummed as soon as it and those before it have arrived, so the checksum
//! overlaps the read instead of following it: on the development machine (ext4 on a virtio
//! disk, 2 shared vCPUs) that took 256 KiB–1 MiB reads from 68–76% to 83–100% of fio's. The
//! bytes in flight per caller stay one block (in four requests). A block of 128 KiB or more is
//! also written with native AIO, as one request (see `AIO_MIN` for why not in parts), and its
//! checksum is taken while it is in flight. [`DiskConfig::native_aio`] `= false` turns both off (one `pread`/`pwrite` per block);
//! that is also the path taken where the kernel refuses native AIO (said once in a warning), and
//! a part that fails to submit or comes back short is read or written again with `pread`/`pwrite`;
//! a part that fails fails the whole call. A block of 64 KiB or more is read into one of the
//! tier's staging buffers of transparent huge pages and copied out part by part as each part is
//! checksummed, and one of 1 MiB or more is copied into one and written from there, because
//! direct I/O pins the caller's memory page by page and a huge page is one pin (see
//! `staging.rs` for the figures);
//! [`DiskConfig::staging`] `= false`, or no transparent huge pages, reads and writes the caller's
//! memory directly. `benches/run store` also shows
//! fio with io_uring at iodepth 4: its gain over `psync` is its deeper queue (16 I/Os in flight
//! against 4 at 16 KiB), which callers get with more threads; at 256 KiB and above both engines
//! are near the device's limit.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use kvindex::BlockKey;
use parking_lot::Mutex;
use rkyv::{Archive, Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{Result, StoreError};
use crate::policy::{Policy, PolicyKind};
use crate::staging::{StagePool, Staged, WRITE_STAGE_MIN};
use crate::stats::{TierCounters, TierStats};

/// Alignment of direct I/O (offsets, lengths and buffers).
pub const IO_ALIGN: usize = 4096;
/// Bytes of one header entry.
pub const HEADER_BYTES: usize = 64;
/// Version of the on-disk format.
pub const FORMAT_VERSION: u16 = 1;
const BLOCK_MAGIC: u32 = 0x4b56_424b; // "KVBK"
const SUPER_MAGIC: u64 = 0x4b56_4d53_544f_5231; // "KVMSTOR1"
/// Name of data file `i` of a tier.
pub fn data_file_name(i: usize) -> String {
    format!("kvstore.{i}.dat")
}
const HDR_FILE: &str = "kvstore.hdr";

/// Whether the disk tier insists on O_DIRECT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirectIo {
    /// Refuse to open where O_DIRECT is not in effect.
    Require,
    /// Use O_DIRECT where the file system honours it, otherwise log a warning and use the page
    /// cache.
    #[default]
    Prefer,
    /// Never use O_DIRECT.
    Off,
}

/// Which blocks the disk tier accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Every block offered.
    All,
    /// Only a block offered at least twice (in a window of `tracked` distinct keys; the counts
    /// are forgotten when the window fills). Protects the SSD from one-off blocks.
    SeenTwice { tracked: usize },
}

/// Settings of a disk tier.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// Directory of the tier's two files (created if missing).
    pub dir: PathBuf,
    /// Bytes of payload the tier may hold (rounded down to whole slots).
    pub capacity_bytes: u64,
    /// Bytes of one block.
    pub block_bytes: usize,
    pub policy: PolicyKind,
    pub direct: DirectIo,
    pub admission: Admission,
    /// Reserve the data file's space at creation (`fallocate`), so a full disk shows up at open
    /// instead of at a later write.
    pub preallocate: bool,
    /// `fdatasync` payload and header on every write (survives power loss, not just crashes).
    pub sync: bool,
    /// Data files the slots are striped over (slot `i` in file `i % stripes`). On ext4 and XFS a
    /// direct write into a not-yet-written extent holds the file's lock exclusively, so writers
    /// to one file queue up; several files let them proceed in parallel.
    pub stripes: usize,
    /// Use Linux native AIO for direct I/O of blocks of 128 KiB or more (reads in parts, each
    /// checksummed as it arrives; writes submitted before the checksum is taken, so the two
    /// overlap). `false`: one `pread`/`pwrite` per block on the caller's thread, the path also
    /// taken where the kernel refuses native AIO. Both keep the same format and guarantees.
    pub native_aio: bool,
    /// Read blocks of 64 KiB or more into the tier's own buffers of transparent huge pages (and
    /// copy them out), and write blocks of 1 MiB or more from them (copied in), when direct I/O
    /// is in effect and the system has transparent huge pages: pinning one huge page per
    /// request instead of a page per 4 KiB made direct reads of 256 KiB ~50% faster here (see
    /// `staging.rs`). `false`: I/O goes straight to and from the caller's memory.
    pub staging: bool,
}

impl DiskConfig {
    /// A tier in `dir` with O_DIRECT preferred, LRU, every block admitted, preallocated.
    pub fn new(dir: impl Into<PathBuf>, capacity_bytes: u64, block_bytes: usize) -> Self {
        DiskConfig {
            dir: dir.into(),
            capacity_bytes,
            block_bytes,
            policy: PolicyKind::Lru,
            direct: DirectIo::Prefer,
            admission: Admission::All,
            preallocate: true,
            sync: false,
            stripes: 8,
            native_aio: true,
            staging: true,
        }
    }
}

/// A block's header as stored in the header table.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHeader {
    pub magic: u32,
    pub version: u16,
    pub flags: u16,
    pub len: u32,
    pub key: u64,
    /// XXH3-64 of the payload.
    pub checksum: u64,
    /// Write sequence number (the newest copy of a key wins at recovery).
    pub seq: u64,
    /// XXH3-64 of the fields above.
    pub check: u64,
}

impl BlockHeader {
    fn new(key: BlockKey, len: u32, checksum: u64, seq: u64) -> Self {
        let mut h = BlockHeader {
            magic: BLOCK_MAGIC,
            version: FORMAT_VERSION,
            flags: 0,
            len,
            key: key.0,
            checksum,
            seq,
            check: 0,
        };
        h.check = h.self_check();
        h
    }

    fn self_check(&self) -> u64 {
        let mut b = [0u8; 36];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..20].copy_from_slice(&self.key.to_le_bytes());
        b[20..28].copy_from_slice(&self.checksum.to_le_bytes());
        b[28..36].copy_from_slice(&self.seq.to_le_bytes());
        xxh3_64(&b)
    }

    /// The entry's bytes (rkyv archive, zero-padded to [`HEADER_BYTES`]).
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(self).expect("header serialises");
        let mut out = [0u8; HEADER_BYTES];
        out[..bytes.len()].copy_from_slice(&bytes);
        out
    }

    /// Decodes and validates an entry; `None` for an empty, torn or foreign entry.
    pub fn decode(entry: &[u8]) -> Option<BlockHeader> {
        let n = std::mem::size_of::<ArchivedBlockHeader>();
        if entry.len() < n || entry.iter().all(|&b| b == 0) {
            return None;
        }
        let mut al = rkyv::util::AlignedVec::<16>::with_capacity(n);
        al.extend_from_slice(&entry[..n]);
        let h = rkyv::from_bytes::<BlockHeader, rkyv::rancor::Error>(&al).ok()?;
        (h.magic == BLOCK_MAGIC && h.version == FORMAT_VERSION && h.check == h.self_check())
            .then_some(h)
    }
}

#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
struct Superblock {
    magic: u64,
    version: u32,
    block_bytes: u64,
    slot_bytes: u64,
    slots: u64,
    stripes: u64,
    check: u64,
}

impl Superblock {
    fn sum(&self) -> u64 {
        let mut b = [0u8; 44];
        b[36..44].copy_from_slice(&self.stripes.to_le_bytes());
        b[0..8].copy_from_slice(&self.magic.to_le_bytes());
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..20].copy_from_slice(&self.block_bytes.to_le_bytes());
        b[20..28].copy_from_slice(&self.slot_bytes.to_le_bytes());
        b[28..36].copy_from_slice(&self.slots.to_le_bytes());
        xxh3_64(&b)
    }
}

/// A heap buffer aligned for direct I/O.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: the buffer is uniquely owned heap memory.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes, capacity rounded up to [`IO_ALIGN`].
    pub fn zeroed(len: usize) -> Self {
        let cap = len.div_ceil(IO_ALIGN).max(1) * IO_ALIGN;
        let layout = std::alloc::Layout::from_size_align(cap, IO_ALIGN).expect("valid layout");
        // SAFETY: layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, cap }
    }

    /// The whole aligned capacity.
    fn full_mut(&mut self) -> &mut [u8] {
        // SAFETY: cap bytes were allocated and are initialised (zeroed).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }

    fn full(&self) -> &[u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.full()[..self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.full_mut()[..len]
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.cap, IO_ALIGN).expect("valid layout");
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

#[derive(Clone, Copy)]
struct DSlot {
    key: BlockKey,
    len: u32,
    checksum: u64,
    pins: u32,
    ready: bool,
    /// The slot's header on disk may describe a block (must be zeroed before reuse).
    has_header: bool,
}

const EMPTY: DSlot = DSlot {
    key: BlockKey(0),
    len: 0,
    checksum: 0,
    pins: 0,
    ready: false,
    has_header: false,
};

struct DState {
    map: HashMap<BlockKey, u32>,
    slots: Vec<DSlot>,
    free: Vec<u32>,
    policy: Policy,
    seen: HashMap<BlockKey, u8>,
}

static OPEN_DIRS: Mutex<std::collections::BTreeSet<PathBuf>> =
    Mutex::new(std::collections::BTreeSet::new());

/// A directory registered as open in this process; unregistered on drop.
struct Registered(PathBuf);

impl Drop for Registered {
    fn drop(&mut self) {
        OPEN_DIRS.lock().remove(&self.0);
    }
}

struct Shared {
    // Dropped last (fields drop in order): the files are closed before the directory is free.
    dir: PathBuf,
    data: Vec<File>,
    hdr: File,
    direct: bool,
    /// Native AIO for large blocks ([`DiskConfig::native_aio`]).
    aio: bool,
    /// Huge-page staging buffers ([`DiskConfig::staging`]), where they pay.
    stage: Option<StagePool>,
    read_only: bool,
    sync: bool,
    admission: Admission,
    block_bytes: usize,
    slot_bytes: usize,
    nslots: usize,
    seq: AtomicU64,
    state: Mutex<DState>,
    stats: TierCounters,
    _registered: Registered,
}

/// What a disk put did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskPut {
    /// Written; these blocks were evicted to make room.
    Stored { evicted: Vec<BlockKey> },
    /// Already held.
    Present,
    /// Refused by the admission filter (not an error).
    NotAdmitted,
}

/// What recovery found at open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Blocks recovered.
    pub blocks: usize,
    /// Header entries that were neither empty nor valid (torn or foreign), cleared.
    pub bad_headers: usize,
    /// Older duplicate copies of a key, dropped.
    pub duplicates: usize,
}

/// The disk tier. Cheap to clone.
#[derive(Clone)]
pub struct DiskTier {
    sh: Arc<Shared>,
    recovery: Recovery,
}

fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT)
    )
}

fn is_read_only(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
    )
}

impl DiskTier {
    /// Opens (or creates) the tier in `cfg.dir` and recovers every valid block. A read-only
    /// directory or file system opens the tier read-only (reads work, writes fail with
    /// [`StoreError::ReadOnly`]); a full disk fails here when preallocating.
    pub fn open(cfg: &DiskConfig) -> Result<DiskTier> {
        if cfg.block_bytes == 0 || cfg.block_bytes > u32::MAX as usize {
            return Err(StoreError::Invalid(format!(
                "block_bytes must be in 1..=4 GiB, got {}",
                cfg.block_bytes
            )));
        }
        let slot_bytes = cfg.block_bytes.div_ceil(IO_ALIGN) * IO_ALIGN;
        let nslots = (cfg.capacity_bytes / slot_bytes as u64) as usize;
        if nslots == 0 || nslots >= u32::MAX as usize {
            return Err(StoreError::Invalid(format!(
                "disk capacity {} bytes gives {nslots} slots of {slot_bytes} bytes",
                cfg.capacity_bytes
            )));
        }
        let dir = cfg.dir.clone();
        let dshow = dir.display().to_string();
        if let Err(e) = std::fs::create_dir_all(&dir) {
            if !dir.is_dir() {
                return Err(StoreError::io(format!("creating {dshow}"), e));
            }
        }
        let hdr_path = dir.join(HDR_FILE);
        let stripes = cfg.stripes.clamp(1, nslots);
        let hdr_len = (IO_ALIGN + nslots * HEADER_BYTES) as u64;
        let data_len = (nslots.div_ceil(stripes) * slot_bytes) as u64;

        // Read-write if we can, read-only if the directory refuses writes.
        let mut read_only = false;
        let hdr = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&hdr_path)
        {
            Ok(f) => f,
            Err(e) if is_read_only(&e) => {
                read_only = true;
                File::open(&hdr_path).map_err(|e2| {
                    StoreError::io(
                        format!(
                            "disk tier at {dshow} is read-only ({e}) and has no existing {HDR_FILE}"
                        ),
                        e2,
                    )
                })?
            }
            Err(e) => return Err(StoreError::io(format!("opening {}", hdr_path.display()), e)),
        };
        if read_only {
            tracing::warn!(dir = %dshow, "disk tier opened read-only: the directory refuses writes");
        }
        // One opener at a time: a POSIX record lock against other processes (not inherited by
        // children, so a fork elsewhere in the process cannot keep it), and a registry of the
        // directories open in this process.
        let canon = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
        if !OPEN_DIRS.lock().insert(canon.clone()) {
            return Err(StoreError::io(
                format!("disk tier at {dshow} is in use by another process or handle"),
                std::io::Error::from_raw_os_error(libc::EBUSY),
            ));
        }
        let registered = Registered(canon);
        // SAFETY: an all-zero flock struct is valid; the fields we need are set below.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = if read_only {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        } as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: F_SETLK on our descriptor with a valid flock struct.
        if unsafe { libc::fcntl(hdr.as_raw_fd(), libc::F_SETLK, &fl) } != 0 {
            return Err(StoreError::io(
                format!("disk tier at {dshow} is in use by another process or handle"),
                std::io::Error::last_os_error(),
            ));
        }

        // Superblock: write for a new tier, check for an existing one.
        let existing = hdr
            .metadata()
            .map_err(|e| StoreError::io("stat header table", e))?
            .len();
        let want = Superblock {
            magic: SUPER_MAGIC,
            version: FORMAT_VERSION as u32,
            block_bytes: cfg.block_bytes as u64,
            slot_bytes: slot_bytes as u64,
            slots: nslots as u64,
            stripes: stripes as u64,
            check: 0,
        };
        let want = Superblock {
            check: want.sum(),
            ..want
        };
        let fresh = existing == 0;
        if fresh {
            if read_only {
                return Err(StoreError::ReadOnly(dshow));
            }
            let enc = rkyv::to_bytes::<rkyv::rancor::Error>(&want).expect("superblock serialises");
            let mut page = vec![0u8; IO_ALIGN];
            page[..enc.len()].copy_from_slice(&enc);
            hdr.set_len(hdr_len)
                .and_then(|_| hdr.write_all_at(&page, 0))
                .map_err(|e| full_or_io(&dshow, "writing the header table", e))?;
        } else {
            let mut page = vec![0u8; IO_ALIGN];
            hdr.read_exact_at(&mut page, 0)
                .map_err(|e| StoreError::Incompatible {
                    path: dshow.clone(),
                    reason: format!("header table is truncated ({e})"),
                })?;
            let n = std::mem::size_of::<ArchivedSuperblock>();
            let mut al = rkyv::util::AlignedVec::<16>::with_capacity(n);
            al.extend_from_slice(&page[..n]);
            let got = rkyv::from_bytes::<Superblock, rkyv::rancor::Error>(&al)
                .ok()
                .filter(|s| s.magic == SUPER_MAGIC && s.check == s.sum())
                .ok_or_else(|| StoreError::Incompatible {
                    path: dshow.clone(),
                    reason: "not a kvstore header table (bad superblock)".into(),
                })?;
            if got.version != want.version {
                return Err(StoreError::Incompatible {
                    path: dshow,
                    reason: format!(
                        "format version {} (this build reads {})",
                        got.version, want.version
                    ),
                });
            }
            if got != want {
                return Err(StoreError::Incompatible {
                    path: dshow,
                    reason: format!(
                        "written for {} slots of {}-byte blocks in {} files, configured for {} slots of {}-byte blocks in {} files",
                        got.slots, got.block_bytes, got.stripes, want.slots, want.block_bytes, want.stripes
                    ),
                });
            }
            if existing < hdr_len {
                return Err(StoreError::Incompatible {
                    path: dshow,
                    reason: format!("header table is {existing} bytes, expected {hdr_len}"),
                });
            }
        }

        let (first, direct) =
            open_data(&dir.join(data_file_name(0)), cfg.direct, read_only, &dshow)?;
        let mut data = vec![first];
        let mode = if direct {
            DirectIo::Require
        } else {
            DirectIo::Off
        };
        for i in 1..stripes {
            data.push(open_data(&dir.join(data_file_name(i)), mode, read_only, &dshow)?.0);
        }
        if !read_only {
            for f in &data {
                let cur = f
                    .metadata()
                    .map_err(|e| StoreError::io("stat data file", e))?
                    .len();
                if cur < data_len {
                    f.set_len(data_len)
                        .map_err(|e| full_or_io(&dshow, "sizing the data file", e))?;
                }
                if cfg.preallocate {
                    // SAFETY: fallocate on our descriptor, mode 0 (allocate, keep size).
                    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, data_len as i64) };
                    if r != 0 {
                        let e = std::io::Error::last_os_error();
                        if is_full(&e) {
                            return Err(StoreError::DiskFull {
                                path: dshow,
                                source: e,
                            });
                        }
                        tracing::warn!(error = %e, "disk tier: fallocate unsupported; space is allocated on write");
                    }
                }
            }
        }

        // Recovery: read the header table.
        let mut table = vec![0u8; nslots * HEADER_BYTES];
        hdr.read_exact_at(&mut table, IO_ALIGN as u64)
            .map_err(|e| StoreError::io("reading the header table", e))?;
        let mut slots = vec![EMPTY; nslots];
        let mut map: HashMap<BlockKey, u32> = HashMap::with_capacity(nslots);
        let mut rec = Recovery::default();
        let mut found: Vec<(u64, u32)> = Vec::new();
        let mut clear: Vec<u32> = Vec::new();
        let mut seq_max = 0u64;
        let mut seqs = vec![0u64; nslots];
        for s in 0..nslots {
            let e = &table[s * HEADER_BYTES..(s + 1) * HEADER_BYTES];
            match BlockHeader::decode(e) {
                Some(h) if h.len as usize == cfg.block_bytes => {
                    seq_max = seq_max.max(h.seq);
                    seqs[s] = h.seq;
                    let key = BlockKey(h.key);
                    slots[s] = DSlot {
                        key,
                        len: h.len,
                        checksum: h.checksum,
                        pins: 0,
                        ready: true,
                        has_header: true,
                    };
                    if let Some(&other) = map.get(&key) {
                        rec.duplicates += 1;
                        let (keep, drop) = if seqs[other as usize] >= h.seq {
                            (other, s as u32)
                        } else {
                            (s as u32, other)
                        };
                        map.insert(key, keep);
                        slots[drop as usize] = EMPTY;
                        clear.push(drop);
                    } else {
                        map.insert(key, s as u32);
                    }
                }
                Some(_) => {
                    rec.bad_headers += 1;
                    clear.push(s as u32);
                }
                None => {
                    if e.iter().any(|&b| b != 0) {
                        rec.bad_headers += 1;
                        clear.push(s as u32);
                    }
                }
            }
        }
        if !read_only {
            for &s in &clear {
                hdr.write_all_at(&[0u8; HEADER_BYTES], header_off(s))
                    .map_err(|e| full_or_io(&dshow, "clearing a bad header", e))?;
            }
        }
        for (&k, &s) in &map {
            let _ = k;
            found.push((seqs[s as usize], s));
        }
        found.sort_unstable();
        let mut policy = Policy::new(cfg.policy, nslots);
        for &(_, s) in &found {
            policy.insert(s, slots[s as usize].key);
        }
        let free: Vec<u32> = (0..nslots as u32)
            .rev()
            .filter(|&s| !slots[s as usize].ready)
            .collect();
        rec.blocks = map.len();
        if rec.bad_headers > 0 || rec.duplicates > 0 {
            tracing::warn!(dir = %dshow, ?rec, "disk tier recovered with damaged entries dropped");
        }
        tracing::info!(dir = %dshow, blocks = rec.blocks, direct, read_only, "disk tier opened");
        Ok(DiskTier {
            sh: Arc::new(Shared {
                dir,
                data,
                hdr,
                direct,
                aio: cfg.native_aio,
                stage: if direct && cfg.staging {
                    StagePool::new(slot_bytes)
                } else {
                    None
                },
                read_only,
                sync: cfg.sync,
                admission: cfg.admission,
                block_bytes: cfg.block_bytes,
                slot_bytes,
                nslots,
                seq: AtomicU64::new(seq_max + 1),
                state: Mutex::new(DState {
                    map,
                    slots,
                    free,
                    policy,
                    seen: HashMap::new(),
                }),
                stats: TierCounters::default(),
                _registered: registered,
            }),
            recovery: rec,
        })
    }

    /// Whether O_DIRECT is in effect (verified at open).
    pub fn direct_io(&self) -> bool {
        self.sh.direct
    }

    /// Whether blocks move through the tier's huge-page staging buffers
    /// ([`DiskConfig::staging`]; only with direct I/O, blocks of 64 KiB or more and transparent
    /// huge pages).
    pub fn staging(&self) -> bool {
        self.sh.stage.is_some()
    }

    /// A staging buffer for one I/O, if the tier stages ([`DiskTier::staging`]).
    fn staged(&self) -> Option<Staged<'_>> {
        self.sh.stage.as_ref().and_then(|p| p.take())
    }

    /// Whether the tier was opened read-only.
    pub fn read_only(&self) -> bool {
        self.sh.read_only
    }

    /// What recovery found at open.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    /// The tier's directory.
    pub fn dir(&self) -> &Path {
        &self.sh.dir
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.sh.block_bytes
    }

    /// Number of slots.
    pub fn capacity_blocks(&self) -> usize {
        self.sh.nslots
    }

    /// Number of blocks held.
    pub fn len(&self) -> usize {
        self.sh.state.lock().map.len()
    }

    /// Whether the tier holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `key` is held (not counted as an access).
    pub fn contains(&self, key: BlockKey) -> bool {
        let st = self.sh.state.lock();
        st.map
            .get(&key)
            .is_some_and(|&s| st.slots[s as usize].ready)
    }

    /// Every held key.
    pub fn keys(&self) -> Vec<BlockKey> {
        let st = self.sh.state.lock();
        st.map
            .iter()
            .filter(|(_, &s)| st.slots[s as usize].ready)
            .map(|(k, _)| *k)
            .collect()
    }

    fn dshow(&self) -> String {
        self.sh.dir.display().to_string()
    }

    /// Writes a block, subject to the admission filter.
    pub fn put(&self, key: BlockKey, data: &[u8]) -> Result<DiskPut> {
        self.put_inner(key, data, false)
    }

    /// Writes a block, bypassing the admission filter.
    pub fn put_admitted(&self, key: BlockKey, data: &[u8]) -> Result<DiskPut> {
        self.put_inner(key, data, true)
    }

    /// Whether the admission filter would take `key` now (counts nothing).
    pub fn would_admit(&self, key: BlockKey) -> bool {
        match self.sh.admission {
            Admission::All => true,
            Admission::SeenTwice { .. } => {
                self.sh.state.lock().seen.get(&key).copied().unwrap_or(0) >= 1
            }
        }
    }

    fn put_inner(&self, key: BlockKey, data: &[u8], force: bool) -> Result<DiskPut> {
        if data.len() != self.sh.block_bytes {
            return Err(StoreError::Invalid(format!(
                "block is {} bytes, this store's blocks are {}",
                data.len(),
                self.sh.block_bytes
            )));
        }
        if self.sh.read_only {
            return Err(StoreError::ReadOnly(self.dshow()));
        }
        let t0 = Instant::now();
        let mut evicted = Vec::new();
        let (slot, zero_header) = {
            let mut st = self.sh.state.lock();
            if st.map.contains_key(&key) {
                self.sh.stats.dedup.fetch_add(1, Relaxed);
                return Ok(DiskPut::Present);
            }
            if let (Admission::SeenTwice { tracked }, false) = (self.sh.admission, force) {
                if st.seen.len() >= tracked.max(1) && !st.seen.contains_key(&key) {
                    st.seen.clear();
                }
                let c = st.seen.entry(key).or_insert(0);
                *c = c.saturating_add(1);
                if *c < 2 {
                    self.sh.stats.rejected.fetch_add(1, Relaxed);
                    return Ok(DiskPut::NotAdmitted);
                }
                st.seen.remove(&key);
            }
            let s = match st.free.pop() {
                Some(s) => s,
                None => {
                    let DState { slots, policy, .. } = &mut *st;
                    let v = policy
                        .victim(|s| slots[s as usize].pins > 0, |s| slots[s as usize].key)
                        .ok_or(StoreError::AllPinned { tier: "disk" })?;
                    let old = slots[v as usize].key;
                    st.map.remove(&old);
                    evicted.push(old);
                    self.sh.stats.evictions.fetch_add(1, Relaxed);
                    v
                }
            };
            let had = st.slots[s as usize].has_header;
            st.slots[s as usize] = DSlot {
                key,
                len: data.len() as u32,
                checksum: 0,
                pins: 1,
                ready: false,
                has_header: had,
            };
            st.map.insert(key, s);
            (s, had)
        };
        let r = self.write_slot(slot, key, data, zero_header);
        let mut st = self.sh.state.lock();
        match r {
            Ok(checksum) => {
                let sl = &mut st.slots[slot as usize];
                sl.ready = true;
                sl.pins = 0;
                sl.checksum = checksum;
                sl.has_header = true;
                st.policy.insert(slot, key);
                drop(st);
                self.sh.stats.write_done(data.len(), t0);
                Ok(DiskPut::Stored { evicted })
            }
            Err((e, header_state)) => {
                st.map.remove(&key);
                st.slots[slot as usize] = DSlot {
                    has_header: header_state,
                    ..EMPTY
                };
                if header_state {
                    // The old header could not be cleared: keep the slot out of use rather than
                    // risk a stale header over new bytes. (The slot's block was evicted.)
                } else {
                    st.free.push(slot);
                }
                drop(st);
                self.sh.stats.error();
                Err(e)
            }
        }
    }

    /// Writes payload then header. On error returns whether a (stale) header may remain.
    fn write_slot(
        &self,
        slot: u32,
        key: BlockKey,
        data: &[u8],
        zero_header: bool,
    ) -> std::result::Result<u64, (StoreError, bool)> {
        let dshow = self.dshow();
        if zero_header {
            self.sh
                .hdr
                .write_all_at(&[0u8; HEADER_BYTES], header_off(slot))
                .map_err(|e| (full_or_io(&dshow, "clearing a header", e), true))?;
        }
        let (file, off) = self.locate(slot);
        let aligned = (data.as_ptr() as usize).is_multiple_of(IO_ALIGN)
            && data.len().is_multiple_of(IO_ALIGN);
        // The payload is complete on disk (every part of it, whichever way it was written)
        // before `write_and_sum` returns, and only then is the header written below.
        let mut staged = if data.len() >= WRITE_STAGE_MIN {
            self.staged()
        } else {
            None
        };
        let res = if let Some(st) = staged.as_mut() {
            let buf = st.get(self.sh.slot_bytes);
            buf[..data.len()].copy_from_slice(data);
            buf[data.len()..].fill(0);
            write_and_sum(file, self.io_mode(), off, buf, data.len())
        } else if aligned || !self.sh.direct {
            write_and_sum(file, self.io_mode(), off, data, data.len())
        } else {
            let mut buf = AlignedBuf::zeroed(data.len());
            buf.copy_from_slice(data);
            let n = self.sh.slot_bytes.min(buf.cap);
            write_and_sum(file, self.io_mode(), off, &buf.full()[..n], data.len())
        };
        let checksum = res.map_err(|e| (full_or_io(&dshow, "writing a block", e), false))?;
        if self.sh.sync {
            file.sync_data()
                .map_err(|e| (full_or_io(&dshow, "syncing the data file", e), false))?;
        }
        let seq = self.sh.seq.fetch_add(1, Relaxed);
        let h = BlockHeader::new(key, data.len() as u32, checksum, seq);
        self.sh
            .hdr
            .write_all_at(&h.encode(), header_off(slot))
            .map_err(|e| (full_or_io(&dshow, "writing a header", e), true))?;
        if self.sh.sync {
            self.sh
                .hdr
                .sync_data()
                .map_err(|e| (full_or_io(&dshow, "syncing the header table", e), true))?;
        }
        Ok(checksum)
    }

    fn io_mode(&self) -> IoMode {
        IoMode {
            direct: self.sh.direct,
            aio: self.sh.aio,
        }
    }

    /// The data file and offset of slot `slot` (slots are striped over the files).
    fn locate(&self, slot: u32) -> (&File, u64) {
        let n = self.sh.data.len();
        let s = slot as usize;
        (&self.sh.data[s % n], ((s / n) * self.sh.slot_bytes) as u64)
    }

    fn pin(&self, key: BlockKey) -> Option<(u32, usize, u64)> {
        let mut st = self.sh.state.lock();
        let &s = st.map.get(&key)?;
        let sl = &mut st.slots[s as usize];
        if !sl.ready {
            return None;
        }
        sl.pins += 1;
        let r = (s, sl.len as usize, sl.checksum);
        st.policy.touch(s);
        Some(r)
    }

    fn unpin_or_drop(&self, key: BlockKey, slot: u32, corrupt: bool) {
        let mut st = self.sh.state.lock();
        let sl = &mut st.slots[slot as usize];
        sl.pins = sl.pins.saturating_sub(1);
        if corrupt && sl.pins == 0 && sl.key == key && sl.ready {
            st.map.remove(&key);
            st.policy.remove(slot);
            if self
                .sh
                .hdr
                .write_all_at(&[0u8; HEADER_BYTES], header_off(slot))
                .is_ok()
            {
                st.slots[slot as usize] = EMPTY;
                st.free.push(slot);
            } else {
                st.slots[slot as usize] = DSlot {
                    has_header: true,
                    ..EMPTY
                };
            }
        }
    }

    /// Reads and verifies the block under `key`. `Ok(None)` on a miss; a block that fails its
    /// checksum is dropped and reported as [`StoreError::Corrupt`].
    pub fn get(&self, key: BlockKey) -> Result<Option<Bytes>> {
        let Some((slot, len, sum)) = self.pin(key) else {
            self.sh.stats.miss();
            return Ok(None);
        };
        if let Some(mut st) = self.staged() {
            let buf = st.get(self.sh.slot_bytes);
            self.unpin_after_read(key, slot, len, sum, buf, None)?;
            return Ok(Some(Bytes::copy_from_slice(&buf[..len])));
        }
        let mut buf = AlignedBuf::zeroed(len);
        self.unpin_after_read(key, slot, len, sum, buf.full_mut(), None)?;
        Ok(Some(Bytes::from_owner(buf)))
    }

    /// Reads and verifies the block under `key` into `dst` (one block long). Reads straight into
    /// `dst` when it is page-aligned (a host-tier slot is), else through a bounce buffer.
    pub fn get_into(&self, key: BlockKey, dst: &mut [u8]) -> Result<bool> {
        if dst.len() != self.sh.block_bytes {
            return Err(StoreError::Invalid(format!(
                "destination is {} bytes, blocks are {}",
                dst.len(),
                self.sh.block_bytes
            )));
        }
        let Some((slot, len, sum)) = self.pin(key) else {
            self.sh.stats.miss();
            return Ok(false);
        };
        if let Some(mut st) = self.staged() {
            // Each part is copied out as soon as it is checksummed.
            let buf = st.get(self.sh.slot_bytes);
            self.unpin_after_read(key, slot, len, sum, buf, Some(dst))?;
        } else if (dst.as_ptr() as usize).is_multiple_of(IO_ALIGN) && len.is_multiple_of(IO_ALIGN) {
            self.unpin_after_read(key, slot, len, sum, dst, None)?;
        } else {
            let mut buf = AlignedBuf::zeroed(len);
            self.unpin_after_read(key, slot, len, sum, buf.full_mut(), None)?;
            dst.copy_from_slice(&buf);
        }
        Ok(true)
    }

    /// Reads slot `slot` into `buf` (at least `len` bytes, aligned as direct I/O needs), checks
    /// it against `expect` (the checksum taken with the pin: a pinned slot is not rewritten) and
    /// unpins. With `copy_to`, the block's bytes are also copied there as they are checksummed;
    /// they are the block's only if this returns `Ok`.
    fn unpin_after_read(
        &self,
        key: BlockKey,
        slot: u32,
        len: usize,
        expect: u64,
        buf: &mut [u8],
        copy_to: Option<&mut [u8]>,
    ) -> Result<()> {
        let t0 = Instant::now();
        let (file, off) = self.locate(slot);
        let n = buf.len().min(self.sh.slot_bytes);
        let sum = match read_and_sum(file, self.io_mode(), off, &mut buf[..n], len, copy_to) {
            Ok(sum) => sum,
            Err(e) => {
                self.unpin_or_drop(key, slot, false);
                self.sh.stats.error();
                return Err(StoreError::io(format!("reading block {:016x}", key.0), e));
            }
        };
        if sum != expect {
            self.unpin_or_drop(key, slot, true);
            self.sh.stats.error();
            self.sh.stats.corrupt.fetch_add(1, Relaxed);
            tracing::error!(
                key = format_args!("{:016x}", key.0),
                "disk tier: checksum mismatch, block dropped"
            );
            return Err(StoreError::corrupt(
                "disk",
                key,
                "payload checksum mismatch",
            ));
        }
        self.unpin_or_drop(key, slot, false);
        self.sh.stats.read_done(len, t0);
        Ok(())
    }

    /// Removes `key` (its header is cleared on disk). `false` if absent or pinned.
    pub fn remove(&self, key: BlockKey) -> Result<bool> {
        if self.sh.read_only {
            return Err(StoreError::ReadOnly(self.dshow()));
        }
        let mut st = self.sh.state.lock();
        let Some(&s) = st.map.get(&key) else {
            return Ok(false);
        };
        let sl = st.slots[s as usize];
        if !sl.ready || sl.pins > 0 {
            return Ok(false);
        }
        self.sh
            .hdr
            .write_all_at(&[0u8; HEADER_BYTES], header_off(s))
            .map_err(|e| full_or_io(&self.dshow(), "clearing a header", e))?;
        st.map.remove(&key);
        st.policy.remove(s);
        st.slots[s as usize] = EMPTY;
        st.free.push(s);
        Ok(true)
    }

    /// Reads every block and drops those that fail verification; returns how many were dropped.
    pub fn verify_all(&self) -> usize {
        let mut bad = 0;
        for k in self.keys() {
            if let Err(StoreError::Corrupt { .. }) = self.get(k) {
                bad += 1;
            }
        }
        bad
    }

    /// Statistics.
    pub fn stats(&self) -> TierStats {
        self.sh.stats.snapshot(
            "disk",
            self.len() as u64,
            self.sh.nslots as u64,
            self.sh.block_bytes as u64,
        )
    }
}

/// Blocks at least this large are read and written with native AIO, so the checksum runs while
/// the I/O is in flight. Reads go in [`AIO_PARTS`] parts submitted together, each hashed as it
/// arrives. Writes go as one request: every part of a write into a never-written (preallocated)
/// extent costs the file system an extent conversion when it completes, and on the development
/// machine (ext4) first writes of 256 KiB–2 MiB blocks in four parts reached 70–81% of fio's
/// single `pwrite`s, in one request 83–101%; overwrites were as fast either way.
const AIO_MIN: usize = 128 << 10;
/// Parts of an AIO read (the bytes in flight stay one block).
const AIO_PARTS: usize = 4;

/// Whether a direct block of `len` bytes goes through native AIO in [`AIO_PARTS`] parts.
fn uses_aio(mode: IoMode, len: usize) -> bool {
    mode.direct && mode.aio && len >= AIO_MIN && len.is_multiple_of(IO_ALIGN * AIO_PARTS)
}

/// Reads `buf.len()` bytes at `off` (aligned as direct I/O needs) and returns the XXH3-64 of the
/// first `len`. A large block is read as [`AIO_PARTS`] parts submitted at once with Linux
/// native AIO, and each part is hashed as soon as it and those before it have arrived, so the
/// checksum overlaps the I/O instead of following it; smaller blocks, and systems without
/// native AIO, use one `pread`.
fn read_and_sum(
    file: &File,
    mode: IoMode,
    off: u64,
    buf: &mut [u8],
    len: usize,
    mut copy_to: Option<&mut [u8]>,
) -> std::io::Result<u64> {
    if uses_aio(mode, buf.len()) {
        let r = aio::with_ctx(|ctx| chunked_read(ctx, file, off, buf, len, copy_to.as_deref_mut()));
        if let Some(r) = r {
            return r;
        }
    }
    file.read_exact_at(buf, off)?;
    if let Some(dst) = copy_to {
        dst[..len].copy_from_slice(&buf[..len]);
    }
    Ok(xxh3_64(&buf[..len]))
}

/// Writes `buf` at `off` (aligned as direct I/O needs) and returns the XXH3-64 of its first
/// `len` bytes. Every byte is on disk (as far as O_DIRECT puts it there) when this returns
/// `Ok`; on `Err` some may not be. A large direct block is submitted with Linux native AIO and
/// hashed while the write is in flight; a part the kernel does not take, or that comes back
/// short, is written (the rest of it) with `pwrite`. Smaller blocks, buffered I/O and systems
/// without native AIO hash first, then use one `pwrite`.
fn write_and_sum(
    file: &File,
    mode: IoMode,
    off: u64,
    buf: &[u8],
    len: usize,
) -> std::io::Result<u64> {
    if uses_aio(mode, buf.len()) && (buf.as_ptr() as usize).is_multiple_of(IO_ALIGN) {
        if let Some(r) = aio::with_ctx(|ctx| aio_write(ctx, file, off, buf, len)) {
            return r;
        }
    }
    let sum = xxh3_64(&buf[..len]);
    file.write_all_at(buf, off)?;
    Ok(sum)
}

fn aio_write(
    ctx: &aio::Ctx,
    file: &File,
    off: u64,
    buf: &[u8],
    len: usize,
) -> std::io::Result<u64> {
    let mut cb = [aio::Iocb::pwrite(
        file.as_raw_fd(),
        buf.as_ptr(),
        buf.len(),
        off,
        0,
    )];
    // SAFETY: the iocb points into `buf`, which the kernel only reads and which outlives this
    // call; `reap` below waits for the request (if submitted) before `buf` can go away.
    let submitted = unsafe { ctx.submit(&mut cb) };
    // The checksum is taken while the block is being written (both only read `buf`).
    let sum = xxh3_64(&buf[..len]);
    let mut res = 0i64;
    ctx.reap(submitted, |_, r| res = r);
    let done = if submitted == 1 {
        if res < 0 {
            return Err(std::io::Error::from_raw_os_error(-res as i32));
        }
        (res as usize).min(buf.len())
    } else {
        0
    };
    if done < buf.len() {
        file.write_all_at(&buf[done..], off + done as u64)?;
    }
    Ok(sum)
}

fn chunked_read(
    ctx: &aio::Ctx,
    file: &File,
    off: u64,
    buf: &mut [u8],
    len: usize,
    mut copy_to: Option<&mut [u8]>,
) -> std::io::Result<u64> {
    let part = buf.len() / AIO_PARTS;
    let base = buf.as_mut_ptr();
    let mut cbs: [aio::Iocb; AIO_PARTS] = std::array::from_fn(|i| {
        // SAFETY: `base + i*part .. + part` lies inside `buf`.
        aio::Iocb::pread(
            file.as_raw_fd(),
            unsafe { base.add(i * part) },
            part,
            off + (i * part) as u64,
            i as u64,
        )
    });
    let mut got = [0i64; AIO_PARTS];
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut hashed = 0usize; // parts hashed so far (in order)
    let mut done = [false; AIO_PARTS];
    // SAFETY: every iocb points into `buf`, which outlives this call and is not touched until
    // its part is reported done; `reap` waits for every submitted request before returning.
    let submitted = unsafe { ctx.submit(&mut cbs) };
    ctx.reap(submitted, |i, res| {
        got[i] = res;
        done[i] = true;
        while hashed < AIO_PARTS && done[hashed] && got[hashed] == part as i64 {
            let a = hashed * part;
            let b = ((hashed + 1) * part).min(len);
            if a < b {
                // SAFETY: part `hashed` is complete and no request writes to it any more.
                let bytes = unsafe { std::slice::from_raw_parts(base.add(a), b - a) };
                hasher.update(bytes);
                if let Some(dst) = copy_to.as_deref_mut() {
                    dst[a..b].copy_from_slice(bytes);
                }
            }
            hashed += 1;
        }
    });
    // Parts that were not submitted, came back short or failed: read them with `pread`.
    for i in hashed..AIO_PARTS {
        if i >= submitted || got[i] != part as i64 {
            if i < submitted && got[i] < 0 {
                return Err(std::io::Error::from_raw_os_error(-got[i] as i32));
            }
            file.read_exact_at(&mut buf[i * part..(i + 1) * part], off + (i * part) as u64)?;
        }
        let a = i * part;
        let b = ((i + 1) * part).min(len);
        if a < b {
            hasher.update(&buf[a..b]);
            if let Some(dst) = copy_to.as_deref_mut() {
                dst[a..b].copy_from_slice(&buf[a..b]);
            }
        }
    }
    Ok(hasher.digest())
}

/// Linux native AIO (`io_submit`), used for direct reads and writes of large blocks; a context
/// per thread, created on first use. Where the kernel or a sandbox refuses it, blocks are read
/// with `pread` and written with `pwrite` (said once in a warning).
mod aio {
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

    /// `struct iocb` of the kernel ABI (x86-64 and aarch64, little-endian).
    #[repr(C)]
    #[derive(Default)]
    pub struct Iocb {
        data: u64,
        key: u32,
        rw_flags: i32,
        opcode: u16,
        reqprio: i16,
        fildes: u32,
        buf: u64,
        nbytes: u64,
        offset: i64,
        reserved2: u64,
        flags: u32,
        resfd: u32,
    }

    const IOCB_CMD_PREAD: u16 = 0;
    const IOCB_CMD_PWRITE: u16 = 1;

    impl Iocb {
        pub fn pread(fd: i32, buf: *mut u8, len: usize, off: u64, tag: u64) -> Iocb {
            Iocb {
                data: tag,
                opcode: IOCB_CMD_PREAD,
                fildes: fd as u32,
                buf: buf as u64,
                nbytes: len as u64,
                offset: off as i64,
                ..Default::default()
            }
        }

        pub fn pwrite(fd: i32, buf: *const u8, len: usize, off: u64, tag: u64) -> Iocb {
            Iocb {
                data: tag,
                opcode: IOCB_CMD_PWRITE,
                fildes: fd as u32,
                buf: buf as u64,
                nbytes: len as u64,
                offset: off as i64,
                ..Default::default()
            }
        }
    }

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct IoEvent {
        data: u64,
        obj: u64,
        res: i64,
        res2: i64,
    }

    /// Requests one context may have in flight.
    const DEPTH: usize = 8;

    pub struct Ctx(libc::c_ulong);

    impl Ctx {
        fn new() -> std::io::Result<Ctx> {
            let mut id: libc::c_ulong = 0;
            // SAFETY: io_setup writes the new context's id into `id`.
            let r = unsafe { libc::syscall(libc::SYS_io_setup, DEPTH as libc::c_long, &mut id) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Ctx(id))
        }

        /// Submits `cbs`; returns how many the kernel took (a prefix of `cbs`; 0 when it
        /// refuses them all, said once in a warning). Every one taken must be waited for with
        /// [`Ctx::reap`] before this context is used for anything else.
        ///
        /// # Safety
        /// Each iocb's buffer must be valid for its length (for writes by the kernel, for a
        /// read) until `reap` has reported it, and must not be accessed elsewhere in a way that
        /// conflicts with the request before then.
        pub unsafe fn submit(&self, cbs: &mut [Iocb]) -> usize {
            assert!(cbs.len() <= DEPTH);
            let mut ptrs = [std::ptr::null_mut::<Iocb>(); DEPTH];
            for (p, c) in ptrs.iter_mut().zip(cbs.iter_mut()) {
                *p = c as *mut Iocb;
            }
            loop {
                // SAFETY: `ptrs` points at live iocbs (caller's contract for their buffers).
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_io_submit,
                        self.0,
                        cbs.len() as libc::c_long,
                        ptrs.as_mut_ptr(),
                    )
                };
                if r >= 0 {
                    return r as usize;
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    // Nothing was submitted: the caller does every part with pread/pwrite.
                    if !SUBMIT_REFUSED.swap(true, Relaxed) {
                        tracing::warn!(error = %e, "disk tier: io_submit refused a request; such blocks are read with pread and written with pwrite instead");
                    }
                    return 0;
                }
            }
        }

        /// Waits for `n` submitted requests, calling `done(tag, result)` as each completes.
        pub fn reap(&self, n: usize, mut done: impl FnMut(usize, i64)) {
            let mut left = n;
            let mut evs = [IoEvent::default(); DEPTH];
            while left > 0 {
                // SAFETY: `evs` has room for `left` (at most DEPTH) events.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_io_getevents,
                        self.0,
                        1 as libc::c_long,
                        left.min(DEPTH) as libc::c_long,
                        evs.as_mut_ptr(),
                        std::ptr::null_mut::<libc::timespec>(),
                    )
                };
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    // Cannot wait: the buffers may still be in use by the kernel. Nothing safe
                    // is left to do but stop.
                    panic!("io_getevents failed with requests in flight: {e}");
                }
                for ev in &evs[..r as usize] {
                    done(ev.data as usize, ev.res);
                }
                left -= r as usize;
            }
        }
    }

    impl Drop for Ctx {
        fn drop(&mut self) {
            // SAFETY: our context; nothing is in flight between calls.
            unsafe { libc::syscall(libc::SYS_io_destroy, self.0) };
        }
    }

    static UNAVAILABLE: AtomicBool = AtomicBool::new(false);
    static SUBMIT_REFUSED: AtomicBool = AtomicBool::new(false);

    thread_local! {
        static CTX: RefCell<Option<Ctx>> = const { RefCell::new(None) };
    }

    /// Runs `f` with this thread's context; `None` where native AIO is unavailable.
    pub fn with_ctx<T>(f: impl FnOnce(&Ctx) -> T) -> Option<T> {
        if UNAVAILABLE.load(Relaxed) {
            return None;
        }
        CTX.with(|c| {
            let mut c = c.try_borrow_mut().ok()?;
            if c.is_none() {
                match Ctx::new() {
                    Ok(x) => *c = Some(x),
                    Err(e) => {
                        if !UNAVAILABLE.swap(true, Relaxed) {
                            tracing::warn!(error = %e, "disk tier: native AIO unavailable, large blocks are read with one pread and written with one pwrite each");
                        }
                        return None;
                    }
                }
            }
            c.as_ref().map(f)
        })
    }
}

/// How a tier does its data I/O.
#[derive(Clone, Copy)]
struct IoMode {
    /// O_DIRECT is in effect.
    direct: bool,
    /// Native AIO may be used ([`DiskConfig::native_aio`]).
    aio: bool,
}

fn header_off(slot: u32) -> u64 {
    IO_ALIGN as u64 + slot as u64 * HEADER_BYTES as u64
}

fn full_or_io(dir: &str, what: &str, e: std::io::Error) -> StoreError {
    if is_full(&e) {
        StoreError::DiskFull {
            path: dir.to_string(),
            source: e,
        }
    } else if e.raw_os_error() == Some(libc::EROFS) {
        StoreError::ReadOnly(dir.to_string())
    } else {
        StoreError::io(format!("{what} in {dir}"), e)
    }
}

/// Opens the data file, with O_DIRECT when asked, and verifies that O_DIRECT is in effect.
fn open_data(path: &Path, mode: DirectIo, read_only: bool, dshow: &str) -> Result<(File, bool)> {
    let open = |direct: bool| {
        let mut o = OpenOptions::new();
        o.read(true);
        if !read_only {
            o.write(true).create(true).truncate(false);
        }
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    };
    if mode == DirectIo::Off {
        let f = open(false).map_err(|e| full_or_io(dshow, "opening the data file", e))?;
        return Ok((f, false));
    }
    let reason = match open(true) {
        Ok(f) => match verify_direct(&f, path.parent().unwrap_or(Path::new(".")), read_only) {
            Ok(()) => return Ok((f, true)),
            Err(r) => r,
        },
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            format!("the file system refuses O_DIRECT at open ({e})")
        }
        Err(e) => return Err(full_or_io(dshow, "opening the data file", e)),
    };
    if mode == DirectIo::Require {
        return Err(StoreError::DirectIoUnavailable {
            path: dshow.to_string(),
            reason,
        });
    }
    tracing::warn!(dir = %dshow, %reason, "disk tier: O_DIRECT not in effect, falling back to buffered I/O through the page cache");
    let f = open(false).map_err(|e| full_or_io(dshow, "opening the data file", e))?;
    Ok((f, false))
}

/// O_DIRECT is in effect when the flag stuck and the kernel refuses a misaligned direct read of
/// written data. (Reads of holes and unwritten extents skip the alignment check, so the probe
/// runs on a scratch file it writes first; a read-only tier probes its data file.)
fn verify_direct(f: &File, dir: &Path, read_only: bool) -> std::result::Result<(), String> {
    // SAFETY: F_GETFL on our descriptor.
    let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 || fl & libc::O_DIRECT == 0 {
        return Err("O_DIRECT did not stick on the descriptor".into());
    }
    let mut buf = AlignedBuf::zeroed(2 * IO_ALIGN);
    buf.full_mut().fill(0x5A);
    let probe_path = dir.join("kvstore.probe");
    let scratch;
    let probe: &File = if read_only {
        f
    } else {
        scratch = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe_path)
            .map_err(|e| format!("cannot create the O_DIRECT probe file: {e}"))?;
        let w = scratch.write_all_at(buf.full(), 0);
        if let Err(e) = w {
            let _ = std::fs::remove_file(&probe_path);
            return Err(format!("an aligned direct write failed: {e}"));
        }
        &scratch
    };
    let full = buf.full_mut();
    // An aligned buffer at file offset 1: direct I/O must refuse it.
    let r = probe.read_at(&mut full[..IO_ALIGN], 1);
    if !read_only {
        let _ = std::fs::remove_file(&probe_path);
    }
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Ok(_) => Err("a misaligned read succeeded, so the file system ignores O_DIRECT".into()),
        Err(e) => Err(format!("probe read failed: {e}")),
    }
}

//! The tiered block store (kvstore's `TieredStore`) through the C ABI.
//!
//! A `kvmesh_store` holds fixed-size blocks under 64-bit keys (kvmesh block keys, see
//! [`kvmesh_block_keys`]) in host memory, written behind to a local disk tier and a Redis tier
//! when configured. `kvmesh_store_put` returns once the block is in host memory; the lower tiers
//! are written by background threads (`kvmesh_store_flush` waits for them, and
//! `kvmesh_store_free` finishes them before it returns, so a disk tier reopened later holds
//! every block put before).

use std::ffi::c_char;
use std::sync::Arc;

use kvindex::{BlockKey, KeyHasher, Namespace};
use kvstore::{
    DiskConfig, HostConfig, PolicyKind, RedisConfig, RedisTier, RemoteTier, StoreConfig,
    StoreError, TierKind, TierStats, TieredStore,
};

use crate::{
    guard_ptr, opt_str, put_opt, put_req, req, req_str, run, slice, slice_mut, Fail,
    KVMESH_ERR_BUSY, KVMESH_ERR_INVALID, KVMESH_ERR_STORE, KVMESH_OK,
};

/// A block held in host memory.
pub const KVMESH_TIER_HOST: i32 = 0;
/// A block held on the local disk tier.
pub const KVMESH_TIER_DISK: i32 = 1;
/// A block held on the remote (Redis) tier.
pub const KVMESH_TIER_REMOTE: i32 = 2;

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Fail {
        let code = match &e {
            StoreError::Invalid(_) => KVMESH_ERR_INVALID,
            StoreError::Busy => KVMESH_ERR_BUSY,
            _ => KVMESH_ERR_STORE,
        };
        Fail(code, format!("{e} ({})", e.kind()))
    }
}

fn tier_code(t: TierKind) -> i32 {
    match t {
        TierKind::Host => KVMESH_TIER_HOST,
        TierKind::Disk => KVMESH_TIER_DISK,
        TierKind::Remote(_) => KVMESH_TIER_REMOTE,
    }
}

/// Settings of a store. Zero and null fields are absent tiers or defaults, so a zeroed struct
/// with `block_bytes` and `host_bytes` set is a host-only store.
#[repr(C)]
pub struct kvmesh_store_config {
    /// Bytes of one block; every block of a store has this size. Required.
    pub block_bytes: usize,
    /// Host memory for blocks, in bytes (rounded down to whole blocks; at least one block).
    pub host_bytes: u64,
    /// Directory of the disk tier (created if missing), or null for none. The tier recovers the
    /// blocks a previous store left there.
    pub disk_dir: *const c_char,
    /// Bytes of blocks the disk tier may hold (at least one block when `disk_dir` is set).
    pub disk_bytes: u64,
    /// `redis://HOST:PORT/DB` of a Redis tier searched after the disk, or null for none.
    pub redis_url: *const c_char,
    /// Evict by S3-FIFO instead of LRU (host and disk tiers).
    pub s3fifo: bool,
    /// Lock the host memory in RAM (`mlock`) when the process may (skipped otherwise).
    pub lock_memory: bool,
}

/// A tiered block store.
pub struct kvmesh_store {
    store: TieredStore,
    redis: Option<Arc<RedisTier>>,
}

/// A new store; the disk tier, if any, recovers its blocks first. Returns null on error
/// (`KVMESH_ERR_INVALID` for a bad configuration, `KVMESH_ERR_STORE` when a tier cannot be
/// opened, e.g. a disk tier of another block size).
///
/// # Safety
/// `config` is null or points to a readable config whose strings are null or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_store_new(config: *const kvmesh_store_config) -> *mut kvmesh_store {
    guard_ptr(|| {
        // SAFETY: null or readable per the contract.
        let c = unsafe { req(config, "config") }?;
        // SAFETY: strings per the contract.
        let (disk_dir, redis_url) = unsafe {
            (
                opt_str(c.disk_dir, "disk_dir")?,
                opt_str(c.redis_url, "redis_url")?,
            )
        };
        let bb = c.block_bytes;
        if bb == 0 {
            return Err("block_bytes must be positive".into());
        }
        if c.host_bytes < bb as u64 {
            return Err(
                format!("host_bytes ({}) holds no block of {bb} bytes", c.host_bytes).into(),
            );
        }
        let policy = if c.s3fifo {
            PolicyKind::S3Fifo
        } else {
            PolicyKind::Lru
        };
        let mut host = HostConfig::new(c.host_bytes, bb);
        host.policy = policy;
        host.lock_memory = c.lock_memory;
        let mut cfg = StoreConfig::new(host);
        if let Some(dir) = disk_dir {
            if dir.is_empty() {
                return Err("disk_dir is empty".into());
            }
            if c.disk_bytes < bb as u64 {
                return Err(
                    format!("disk_bytes ({}) holds no block of {bb} bytes", c.disk_bytes).into(),
                );
            }
            let mut d = DiskConfig::new(dir, c.disk_bytes, bb);
            d.policy = policy;
            cfg.disk = Some(d);
        } else if c.disk_bytes != 0 {
            return Err("disk_bytes is set but disk_dir is null".into());
        }
        let redis = match redis_url {
            Some(url) => {
                let tier = Arc::new(RedisTier::new(RedisConfig::new(url, bb))?);
                cfg.remotes.push(tier.clone() as Arc<dyn RemoteTier>);
                Some(tier)
            }
            None => None,
        };
        let store = TieredStore::new(cfg)?;
        Ok(Box::new(kvmesh_store { store, redis }))
    })
}

/// Releases a store (null is ignored) after writing every queued block down to its lower tiers.
///
/// # Safety
/// `store` is null or a live handle, not used afterwards (nor during the call by another thread).
#[no_mangle]
pub unsafe extern "C" fn kvmesh_store_free(store: *mut kvmesh_store) {
    if !store.is_null() {
        // SAFETY: a live handle from Box::into_raw, released once per the contract.
        let s = unsafe { Box::from_raw(store) };
        // Joining the writer threads cannot unwind into C: a panic is caught and dropped.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(s)));
    }
}

/// Bytes of one block of the store (0 for null).
///
/// # Safety
/// `store` is null or live.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_store_block_bytes(store: *const kvmesh_store) -> usize {
    // SAFETY: null or live per the contract.
    unsafe { store.as_ref() }.map_or(0, |s| s.store.block_bytes())
}

/// Stores a block of exactly `kvmesh_store_block_bytes` bytes under `key`: into host memory now
/// (evicting the coldest unpinned blocks if needed), to the disk and Redis tiers in the
/// background. Waits while the write-behind queue is full. A key already held is left as it is.
///
/// # Safety
/// `store` is null or live; `data` points to `len` readable bytes (or is null with `len == 0`).
#[no_mangle]
pub unsafe extern "C" fn kvmesh_store_put(
    store: *const kvmesh_store,
    key: u64,
    data: *const u8,
    len: usize,
) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let s = unsafe { req(store, "store") }?;
        // SAFETY: `len` readable bytes per the contract.
        let data = unsafe { slice(data, len, "data") }?;
        let bb = s.store.block_bytes();
        if data.len() != bb {
            return Err(
                format!("data is {} bytes, the store's blocks are {bb}", data.len()).into(),
            );
        }
        s.store.put(BlockKey(key), data, None)?;
        Ok(KVMESH_OK)
    })
}

/// Like `kvmesh_store_put`, but fails with `KVMESH_ERR_BUSY` instead of waiting when the
/// write-behind queue (or host memory, all pinned by queued blocks) is full; the block may then
/// be in host memory only.
///
/// # Safety
/// As for `kvmesh_store_put`.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_store_try_put(
    store: *const kvmesh_store,
    key: u64,
    data: *const u8,
    len: usize,
) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let s = unsafe { req(store, "store") }?;
        // SAFETY: `len` readable bytes per the contract.
        let data = unsafe { slice(data, len, "data") }?;
        let bb = s.store.block_bytes();
        if data.len() != bb {
            return Err(
                format!("data is {} bytes, the store's blocks are {bb}", data.len()).into(),
            );
        }
        s.store.try_put(BlockKey(key), data, None)?;
        Ok(KVMESH_OK)
    })
}

/// Copies the block under `key` from the fastest tier holding it into `out` (exactly
/// `kvmesh_store_block_bytes` bytes); a block found below host memory is promoted to it.
/// Returns 1 when found (and writes its tier, a `KVMESH_TIER_*`, to `tier` unless null), 0 when
/// no tier holds it, or a negative `KVMESH_ERR_*`. A block that fails verification is an error,
/// never returned.
///
/// # Safety
/// `store` is null or live; `out` points to `len` writable bytes (or is null with `len == 0`);
/// `tier` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_store_get(
    store: *const kvmesh_store,
    key: u64,
    out: *mut u8,
    len: usize,
    tier: *mut i32,
) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let s = unsafe { req(store, "store") }?;
        // SAFETY: `len` writable bytes per the contract.
        let out = unsafe { slice_mut(out, len, "out") }?;
        let bb = s.store.block_bytes();
        if out.len() != bb {
            return Err(format!("out is {} bytes, the store's blocks are {bb}", out.len()).into());
        }
        match s.store.get_from(BlockKey(key))? {
            Some((bytes, t)) => {
                if bytes.len() != bb {
                    return Err(Fail(
                        KVMESH_ERR_STORE,
                        format!("block {key:016x} is {} bytes, not {bb}", bytes.len()),
                    ));
                }
                out.copy_from_slice(&bytes);
                // SAFETY: null or writable per the contract.
                unsafe { put_opt(tier, tier_code(t)) };
                Ok(1)
            }
            None => Ok(0),
        }
    })
}

/// How many leading blocks of `keys` the store holds, without reading them: writes the count to
/// `*held` and the tier (`KVMESH_TIER_*`) of each of those blocks to `tiers` (up to `tiers_len`
/// entries; `tiers` may be null with `tiers_len == 0`). Redis is asked (one round trip per
/// block) only when `remote` is set.
///
/// # Safety
/// `store` is null or live; `keys` points to `n` readable keys (or is null with `n == 0`);
/// `tiers` points to `tiers_len` writable entries (or is null with `tiers_len == 0`); `held` is
/// null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_store_lookup(
    store: *const kvmesh_store,
    keys: *const u64,
    n: usize,
    remote: bool,
    tiers: *mut i32,
    tiers_len: usize,
    held: *mut usize,
) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let s = unsafe { req(store, "store") }?;
        // SAFETY: slices per the contract.
        let (keys, tiers) = unsafe {
            (
                slice(keys, n, "keys")?,
                slice_mut(tiers, tiers_len, "tiers")?,
            )
        };
        if held.is_null() {
            return Err("held is null".into());
        }
        let keys: Vec<BlockKey> = keys.iter().map(|&k| BlockKey(k)).collect();
        let l = s.store.lookup(&keys, remote);
        for (dst, &t) in tiers.iter_mut().zip(&l.tiers) {
            *dst = tier_code(t);
        }
        // SAFETY: checked non-null above; writable per the contract.
        unsafe { put_req(held, l.blocks(), "held") }?;
        Ok(KVMESH_OK)
    })
}

/// Removes the block under `key` from every tier (after the queued write-behind work, so a
/// removed block does not come back). Returns 1 when some tier held it, 0 when none did, or a
/// negative `KVMESH_ERR_*` (`KVMESH_ERR_BUSY` while another thread is reading the block).
///
/// # Safety
/// `store` is null or live.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_store_remove(store: *const kvmesh_store, key: u64) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let s = unsafe { req(store, "store") }?;
        let k = BlockKey(key);
        s.store.flush();
        let mut removed = s.store.host().remove(k);
        if let Some(d) = s.store.disk() {
            removed |= d.remove(k)?;
        }
        if let Some(r) = &s.redis {
            if r.contains(k)? {
                r.remove(k)?;
                removed = true;
            }
        }
        if s.store.host().contains(k) || s.store.disk().is_some_and(|d| d.contains(k)) {
            return Err(Fail(
                KVMESH_ERR_BUSY,
                format!("block {key:016x} is being read; remove it again later"),
            ));
        }
        Ok(i32::from(removed))
    })
}

/// Waits until every queued block has been written down to the lower tiers (or failed; failures
/// are counted in the stats' `write_errors`).
///
/// # Safety
/// `store` is null or live.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_store_flush(store: *const kvmesh_store) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let s = unsafe { req(store, "store") }?;
        s.store.flush();
        Ok(KVMESH_OK)
    })
}

/// Counters of one tier, over the store's life.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct kvmesh_tier_stats {
    /// Reads served.
    pub hits: u64,
    /// Reads of blocks the tier did not hold.
    pub misses: u64,
    /// Blocks written.
    pub stores: u64,
    /// Writes skipped because the block was already there.
    pub dedup: u64,
    /// Writes refused by the admission filter.
    pub rejected: u64,
    /// Blocks evicted to make room.
    pub evictions: u64,
    /// Failed operations (I/O, network, corruption).
    pub errors: u64,
    /// Reads that failed verification (counted in `errors` too).
    pub corrupt: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Blocks held now (0 where the tier cannot know, e.g. Redis).
    pub blocks: u64,
    /// Blocks the tier can hold (0 where unbounded or unknown).
    pub capacity_blocks: u64,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    /// Bytes read per nanosecond spent reading (= GB/s).
    pub read_gbps: f64,
    /// Bytes written per nanosecond spent writing (= GB/s).
    pub write_gbps: f64,
}

impl From<&TierStats> for kvmesh_tier_stats {
    fn from(t: &TierStats) -> Self {
        kvmesh_tier_stats {
            hits: t.hits,
            misses: t.misses,
            stores: t.stores,
            dedup: t.dedup,
            rejected: t.rejected,
            evictions: t.evictions,
            errors: t.errors,
            corrupt: t.corrupt,
            bytes_read: t.bytes_read,
            bytes_written: t.bytes_written,
            blocks: t.blocks,
            capacity_blocks: t.capacity_blocks,
            used_bytes: t.used_bytes,
            capacity_bytes: t.capacity_bytes,
            read_gbps: t.read_gbps,
            write_gbps: t.write_gbps,
        }
    }
}

/// Every tier's counters and the write-behind pipeline's.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct kvmesh_store_stats {
    pub host: kvmesh_tier_stats,
    /// Whether the store has a disk tier (`disk` is zero otherwise).
    pub has_disk: bool,
    pub disk: kvmesh_tier_stats,
    /// Whether the store has a Redis tier (`remote` is zero otherwise).
    pub has_remote: bool,
    pub remote: kvmesh_tier_stats,
    /// Blocks queued for write-behind.
    pub queued: u64,
    /// Blocks written down (all lower tiers tried).
    pub written: u64,
    /// Write-behind failures (any tier).
    pub write_errors: u64,
    /// Puts that waited for queue room.
    pub backpressure_waits: u64,
    /// Gets served by another request's load of the same block.
    pub coalesced: u64,
    /// Blocks loaded from a lower tier into host memory.
    pub promotions: u64,
    /// Prefetches skipped at their deadline.
    pub deadline_missed: u64,
    /// Blocks in the write-behind queue now.
    pub in_queue: u64,
}

/// Copies the store's statistics into `*out`.
///
/// # Safety
/// `store` is null or live; `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_store_get_stats(
    store: *const kvmesh_store,
    out: *mut kvmesh_store_stats,
) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let s = unsafe { req(store, "store") }?;
        let st = s.store.stats();
        let p = &st.pipeline;
        let remote = st.remotes.first();
        let v = kvmesh_store_stats {
            host: (&st.host).into(),
            has_disk: st.disk.is_some(),
            disk: st.disk.as_ref().map(Into::into).unwrap_or_default(),
            has_remote: remote.is_some(),
            remote: remote.map(Into::into).unwrap_or_default(),
            queued: p.queued,
            written: p.written,
            write_errors: p.write_errors,
            backpressure_waits: p.backpressure_waits,
            coalesced: p.coalesced,
            promotions: p.promotions,
            deadline_missed: p.deadline_missed,
            in_queue: p.in_queue,
        };
        // SAFETY: null or writable per the contract.
        unsafe { put_req(out, v, "out") }?;
        Ok(KVMESH_OK)
    })
}

/// The kvmesh block keys of a prompt: one per full block of `block_size` tokens, each chained
/// over every block before it and seeded by the namespace (`model`; `lora_name` and `cache_salt`
/// may be null), the keys kvindex and kvstore use. Writes `n / block_size` keys to `keys` (which
/// has room for `keys_len`) and their number to `*written`; when `keys_len` is too small,
/// nothing is written but `*written` (the number needed) and the call fails.
///
/// # Safety
/// Strings are null or NUL-terminated; `tokens` points to `n` readable ids (or is null with
/// `n == 0`); `keys` points to `keys_len` writable keys (or is null with `keys_len == 0`);
/// `written` is null or writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)] // A C signature.
pub unsafe extern "C" fn kvmesh_block_keys(
    model: *const c_char,
    lora_name: *const c_char,
    cache_salt: *const c_char,
    tokens: *const u32,
    n: usize,
    block_size: usize,
    keys: *mut u64,
    keys_len: usize,
    written: *mut usize,
) -> i32 {
    run(|| {
        // SAFETY: arguments per the contract.
        let (model, lora, salt, tokens, keys) = unsafe {
            (
                req_str(model, "model")?,
                opt_str(lora_name, "lora_name")?,
                opt_str(cache_salt, "cache_salt")?,
                slice(tokens, n, "tokens")?,
                slice_mut(keys, keys_len, "keys")?,
            )
        };
        if written.is_null() {
            return Err("written is null".into());
        }
        if block_size == 0 {
            return Err("block_size must be positive".into());
        }
        let need = tokens.len() / block_size;
        // SAFETY: checked non-null above; writable per the contract.
        unsafe { put_req(written, need, "written") }?;
        if keys.len() < need {
            return Err(format!(
                "keys has room for {} keys, {} tokens in blocks of {block_size} make {need}",
                keys.len(),
                tokens.len()
            )
            .into());
        }
        let ns = Namespace {
            model: model.to_owned(),
            lora_name: lora.map(str::to_owned),
            cache_salt: salt.map(str::to_owned),
        };
        for (dst, k) in keys
            .iter_mut()
            .zip(KeyHasher::new().chain(&ns, tokens, block_size))
        {
            *dst = k.0;
        }
        Ok(KVMESH_OK)
    })
}

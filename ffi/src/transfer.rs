//! Block transfers (kvtransfer) through the C ABI.
//!
//! A `kvmesh_agent` registers memory (`kvmesh_agent_register` for the caller's own memory,
//! `kvmesh_agent_register_buffer` for a page-aligned `kvmesh_buffer` kvmesh owns), exports its
//! metadata as a byte blob for its peers (`kvmesh_agent_export_metadata`), loads theirs
//! (`kvmesh_agent_load_remote`, or `kvmesh_agent_connect` over the side channel every agent
//! serves), and prepares transfers between a local and a remote descriptor list
//! (`kvmesh_descs`, built from a C array in one call) with `kvmesh_agent_prepare`. A prepared
//! `kvmesh_xfer` is posted (READ or WRITE, with an optional notification the peer receives once
//! the data is visible there) as often as needed, polled (`kvmesh_xfer_status`) or awaited
//! (`kvmesh_xfer_wait`), and cancelled. Peers' notifications come from
//! `kvmesh_agent_wait_notif`.
//!
//! Memory a transfer touches must stay registered and valid until the transfer finished:
//! freeing a pending `kvmesh_xfer` lets it run on in the background.

use std::ffi::{c_char, c_void, CString};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use kvtransfer::{
    Agent, AgentConfig, AgentMetadata, Backend, DescList, Error, HostBuffer, MemKind, Notif, Op,
    RegionId, XferHandle, XferStatus,
};

use crate::{
    guard_ptr, opt_str, put_name, put_opt, put_req, req, req_str, run, slice, Fail,
    KVMESH_ERR_BUSY, KVMESH_ERR_INVALID, KVMESH_ERR_TRANSFER, KVMESH_OK,
};

/// Remote memory into local memory.
pub const KVMESH_OP_READ: i32 = 0;
/// Local memory into remote memory.
pub const KVMESH_OP_WRITE: i32 = 1;

/// The agent's choice: shared memory with an agent of the same host (when enabled), TCP
/// otherwise.
pub const KVMESH_BACKEND_DEFAULT: i32 = 0;
/// TCP (works across hosts).
pub const KVMESH_BACKEND_TCP: i32 = 1;
/// Same-host shared memory (`process_vm_readv`/`process_vm_writev`).
pub const KVMESH_BACKEND_SHM: i32 = 2;
/// UCX (libucp >= 1.22 loaded at run time; both agents need `ucx`).
pub const KVMESH_BACKEND_UCX: i32 = 3;
/// GPU memory to GPU memory of another process on the same host (CUDA IPC; a build with the
/// `cuda` feature).
pub const KVMESH_BACKEND_CUDA_IPC: i32 = 4;

/// Prepared, never posted.
pub const KVMESH_XFER_IDLE: i32 = 0;
/// Posted, not finished.
pub const KVMESH_XFER_PENDING: i32 = 1;
/// Every byte moved.
pub const KVMESH_XFER_DONE: i32 = 2;
/// Cancelled before completion: the destination's bytes are unspecified.
pub const KVMESH_XFER_CANCELLED: i32 = 3;
/// Failed (`kvmesh_last_error` says why): the destination's bytes are unspecified.
pub const KVMESH_XFER_FAILED: i32 = 4;

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        let code = match &e {
            Error::Invalid(_) | Error::OutOfRegion { .. } | Error::Metadata(_) => {
                KVMESH_ERR_INVALID
            }
            Error::Busy => KVMESH_ERR_BUSY,
            _ => KVMESH_ERR_TRANSFER,
        };
        Fail(code, e.to_string())
    }
}

fn backend_code(b: Backend) -> i32 {
    match b {
        Backend::Tcp => KVMESH_BACKEND_TCP,
        Backend::Shm => KVMESH_BACKEND_SHM,
        Backend::Ucx => KVMESH_BACKEND_UCX,
        Backend::CudaIpc => KVMESH_BACKEND_CUDA_IPC,
    }
}

fn op_code(op: Op) -> i32 {
    match op {
        Op::Read => KVMESH_OP_READ,
        Op::Write => KVMESH_OP_WRITE,
    }
}

/// Settings of an agent. Null and zero fields take the defaults.
#[repr(C)]
pub struct kvmesh_agent_config {
    /// The agent's name, unique among the agents that talk to each other. Required.
    pub name: *const c_char,
    /// `IP:PORT` of the agent's TCP listener (side channel and TCP backend); null:
    /// `127.0.0.1:0` (a free port, see `kvmesh_agent_listen_addr`).
    pub listen: *const c_char,
    /// The IP address peers should use when it differs from the bound one (needed when
    /// listening on 0.0.0.0), or null.
    pub advertise: *const c_char,
    /// A peer that makes no progress for this long fails every transfer in flight on it
    /// (milliseconds; 0: 10000).
    pub timeout_ms: u32,
    /// Threads of the agent's network runtime (0: 2; at most 1024).
    pub threads: u32,
    /// Enables the same-host shared-memory backend.
    pub shm: bool,
    /// Enables the UCX backend (fails when libucp >= 1.22 cannot be loaded).
    pub ucx: bool,
}

/// A transfer agent.
pub struct kvmesh_agent {
    agent: Agent,
    listen: CString,
}

/// A new agent, listening at once. Returns null on error.
///
/// # Safety
/// `config` is null or points to a readable config whose strings are null or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_agent_new(config: *const kvmesh_agent_config) -> *mut kvmesh_agent {
    guard_ptr(|| {
        // SAFETY: null or readable per the contract.
        let c = unsafe { req(config, "config") }?;
        // SAFETY: strings per the contract.
        let (name, listen, advertise) = unsafe {
            (
                req_str(c.name, "name")?,
                opt_str(c.listen, "listen")?,
                opt_str(c.advertise, "advertise")?,
            )
        };
        let mut cfg = AgentConfig::new(name);
        if let Some(l) = listen {
            cfg.listen = l
                .parse()
                .map_err(|e| format!("listen {l:?} is not IP:PORT: {e}"))?;
        }
        if let Some(a) = advertise {
            cfg.advertise = Some(
                a.parse()
                    .map_err(|e| format!("advertise {a:?} is not an IP address: {e}"))?,
            );
        }
        if c.timeout_ms > 0 {
            cfg.timeout = Duration::from_millis(u64::from(c.timeout_ms));
        }
        if c.threads > 1024 {
            return Err(format!("threads {} is more than 1024", c.threads).into());
        }
        if c.threads > 0 {
            cfg.threads = c.threads as usize;
        }
        cfg.shm = c.shm;
        cfg.ucx = c.ucx;
        let agent = Agent::new(cfg)?;
        let listen = CString::new(agent.listen_addr().to_string()).unwrap_or_default();
        Ok(Box::new(kvmesh_agent { agent, listen }))
    })
}

/// Releases an agent (null is ignored); transfers still in flight on it fail.
///
/// # Safety
/// `agent` is null or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_agent_free(agent: *mut kvmesh_agent) {
    if !agent.is_null() {
        // SAFETY: a live handle from Box::into_raw, released once per the contract.
        let a = unsafe { Box::from_raw(agent) };
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(a)));
    }
}

/// Where the agent listens, `IP:PORT` (for a peer's `kvmesh_agent_connect`); valid while the
/// agent lives. Null on error.
///
/// # Safety
/// `agent` is null or live.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_agent_listen_addr(agent: *const kvmesh_agent) -> *const c_char {
    // SAFETY: null or live per the contract.
    match unsafe { agent.as_ref() } {
        Some(a) => a.listen.as_ptr(),
        None => {
            crate::set_error(KVMESH_ERR_INVALID, "agent is null");
            std::ptr::null()
        }
    }
}

/// Registers `len` bytes of the caller's memory at `addr` with the agent; writes the region's id
/// to `*region` unless null.
///
/// # Safety
/// `agent` is null or live; `region` is null or writable; `[addr, addr + len)` is readable and
/// writable memory of this process that stays valid until it is deregistered (or the agent is
/// freed) and no transfer touches it any more: peers read and write it at any time in between.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_agent_register(
    agent: *const kvmesh_agent,
    addr: *mut c_void,
    len: usize,
    region: *mut u32,
) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let a = unsafe { req(agent, "agent") }?;
        if addr.is_null() {
            return Err("addr is null".into());
        }
        if len == 0 {
            return Err("cannot register an empty region".into());
        }
        // SAFETY: the memory stays valid while registered, per this function's contract.
        let id = unsafe {
            a.agent
                .register_raw(addr as u64, len as u64, MemKind::Dram, 0)
        }?;
        // SAFETY: null or writable per the contract.
        unsafe { put_opt(region, id.0) };
        Ok(KVMESH_OK)
    })
}

/// Registers a `kvmesh_buffer` (kept alive while registered, even once the caller freed its
/// handle); writes the region's id to `*region` unless null.
///
/// # Safety
/// `agent` and `buffer` are null or live; `region` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_agent_register_buffer(
    agent: *const kvmesh_agent,
    buffer: *const kvmesh_buffer,
    region: *mut u32,
) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let (a, b) = unsafe { (req(agent, "agent")?, req(buffer, "buffer")?) };
        let id = a.agent.register(&b.buf)?;
        // SAFETY: null or writable per the contract.
        unsafe { put_opt(region, id.0) };
        Ok(KVMESH_OK)
    })
}

/// Deregisters a region. Peers should load the agent's metadata again.
///
/// # Safety
/// `agent` is null or live.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_agent_deregister(agent: *const kvmesh_agent, region: u32) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let a = unsafe { req(agent, "agent") }?;
        a.agent.deregister(RegionId(region))?;
        Ok(KVMESH_OK)
    })
}

/// Copies the agent's metadata (a versioned blob for peers' `kvmesh_agent_load_remote`) into
/// `out` and its length to `*len`. With `out` null and `cap` 0 it only writes the length; a
/// `cap` too small fails with `KVMESH_ERR_INVALID` after writing the length needed. Export it
/// again after registering or deregistering memory.
///
/// # Safety
/// `agent` is null or live; `out` points to `cap` writable bytes (or is null with `cap == 0`);
/// `len` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_agent_export_metadata(
    agent: *const kvmesh_agent,
    out: *mut u8,
    cap: usize,
    len: *mut usize,
) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let a = unsafe { req(agent, "agent") }?;
        // SAFETY: `cap` writable bytes per the contract.
        let out = unsafe { crate::slice_mut(out, cap, "out") }?;
        let blob = a.agent.export_metadata();
        // SAFETY: null or writable per the contract.
        unsafe { put_req(len, blob.len(), "len") }?;
        if out.is_empty() {
            return Ok(KVMESH_OK);
        }
        if out.len() < blob.len() {
            return Err(format!(
                "out has {} bytes, the metadata needs {}",
                out.len(),
                blob.len()
            )
            .into());
        }
        out[..blob.len()].copy_from_slice(&blob);
        Ok(KVMESH_OK)
    })
}

/// Loads a peer's metadata blob into `a`, once `name` (`cap` bytes, or null) is known to hold
/// the peer's name.
fn load_checked(a: &kvmesh_agent, blob: &[u8], name: *mut c_char, cap: usize) -> Result<(), Fail> {
    let peer = AgentMetadata::decode(blob)?.name;
    // Checked before loading, so a short buffer changes nothing.
    if !name.is_null() && peer.len() + 1 > cap {
        return Err(format!(
            "name of {cap} bytes cannot hold the peer's name {peer:?} and its NUL"
        )
        .into());
    }
    let loaded = a.agent.load_remote(blob)?;
    // SAFETY: `name` is null or has `cap` writable bytes (the callers' contracts).
    unsafe { put_name(name, cap, &loaded, "name") }
}

/// Loads (or replaces) a peer's metadata blob, from its `kvmesh_agent_export_metadata`. Writes
/// the peer's name, NUL-terminated, to `name` (room for `name_cap` bytes) unless it is null.
///
/// # Safety
/// `agent` is null or live; `blob` points to `len` readable bytes; `name` is null or points to
/// `name_cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_agent_load_remote(
    agent: *const kvmesh_agent,
    blob: *const u8,
    len: usize,
    name: *mut c_char,
    name_cap: usize,
) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let a = unsafe { req(agent, "agent") }?;
        // SAFETY: `len` readable bytes per the contract.
        let blob = unsafe { slice(blob, len, "blob") }?;
        load_checked(a, blob, name, name_cap)?;
        Ok(KVMESH_OK)
    })
}

/// Fetches a peer's metadata over its side channel at `addr` (`HOST:PORT`, its
/// `kvmesh_agent_listen_addr`) and loads it; writes the peer's name as
/// `kvmesh_agent_load_remote` does. Fails with `KVMESH_ERR_TRANSFER` when nobody answers
/// within the agent's timeout.
///
/// # Safety
/// `agent` is null or live; `addr` is null or NUL-terminated; `name` is null or points to
/// `name_cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_agent_connect(
    agent: *const kvmesh_agent,
    addr: *const c_char,
    name: *mut c_char,
    name_cap: usize,
) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let a = unsafe { req(agent, "agent") }?;
        // SAFETY: string per the contract.
        let addr = unsafe { req_str(addr, "addr") }?;
        let sa: SocketAddr = addr
            .to_socket_addrs()
            .map_err(|e| format!("addr {addr:?} is not HOST:PORT: {e}"))?
            .next()
            .ok_or_else(|| format!("addr {addr:?} resolves to no address"))?;
        let blob = a.agent.fetch_metadata(sa)?;
        load_checked(a, &blob, name, name_cap)?;
        Ok(KVMESH_OK)
    })
}

/// Forgets a peer and closes the connection to it. Returns 1 if it was known, 0 if not.
///
/// # Safety
/// `agent` is null or live; `name` is null or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_agent_remove_remote(
    agent: *const kvmesh_agent,
    name: *const c_char,
) -> i32 {
    run(|| {
        // SAFETY: arguments per the contract.
        let (a, name) = unsafe { (req(agent, "agent")?, req_str(name, "name")?) };
        Ok(i32::from(a.agent.remove_remote(name)))
    })
}

/// Sends a notification on its own (no transfer) to a loaded peer, over TCP.
///
/// # Safety
/// `agent` is null or live; `remote` is null or NUL-terminated; `msg` points to `len` readable
/// bytes (or is null with `len == 0`).
#[no_mangle]
pub unsafe extern "C" fn kvmesh_agent_send_notif(
    agent: *const kvmesh_agent,
    remote: *const c_char,
    msg: *const u8,
    len: usize,
) -> i32 {
    run(|| {
        // SAFETY: arguments per the contract.
        let (a, remote, msg) = unsafe {
            (
                req(agent, "agent")?,
                req_str(remote, "remote")?,
                slice(msg, len, "msg")?,
            )
        };
        a.agent.send_notif(remote, msg)?;
        Ok(KVMESH_OK)
    })
}

/// A notification received from a peer.
pub struct kvmesh_notif {
    from: CString,
    msg: Vec<u8>,
}

/// Takes the oldest notification received, waiting up to `timeout_ms` milliseconds for one (0:
/// do not wait). Returns 1 and writes a new `kvmesh_notif` to `*out` (free it with
/// `kvmesh_notif_free`), or returns 0 and writes null when none came.
///
/// # Safety
/// `agent` is null or live; `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_agent_wait_notif(
    agent: *const kvmesh_agent,
    timeout_ms: u32,
    out: *mut *mut kvmesh_notif,
) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let a = unsafe { req(agent, "agent") }?;
        if out.is_null() {
            return Err("out is null".into());
        }
        // One at a time: the rest stay queued for the next call.
        let got = a
            .agent
            .wait_notif(Duration::from_millis(u64::from(timeout_ms)));
        let (p, r) = match got {
            Some(Notif { from, msg }) => {
                let from = CString::new(from.replace('\0', " ")).unwrap_or_default();
                (Box::into_raw(Box::new(kvmesh_notif { from, msg })), 1)
            }
            None => (std::ptr::null_mut(), 0),
        };
        // SAFETY: checked non-null above; writable per the contract.
        unsafe { put_req(out, p, "out") }?;
        Ok(r)
    })
}

/// The name of the agent that sent a notification ("" for null); valid while `notif` lives.
///
/// # Safety
/// `notif` is null or live.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_notif_from(notif: *const kvmesh_notif) -> *const c_char {
    // SAFETY: null or live per the contract.
    match unsafe { notif.as_ref() } {
        Some(n) => n.from.as_ptr(),
        None => c"".as_ptr(),
    }
}

/// The bytes of a notification, and their number in `*len` (unless null); valid while `notif`
/// lives. Null (and 0) for null.
///
/// # Safety
/// `notif` is null or live; `len` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_notif_msg(
    notif: *const kvmesh_notif,
    len: *mut usize,
) -> *const u8 {
    // SAFETY: null or live per the contract.
    let (p, n) = match unsafe { notif.as_ref() } {
        Some(n) => (n.msg.as_ptr(), n.msg.len()),
        None => (std::ptr::null(), 0),
    };
    // SAFETY: null or writable per the contract.
    unsafe { put_opt(len, n) };
    p
}

/// Releases a notification (null is ignored).
///
/// # Safety
/// `notif` is null or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_notif_free(notif: *mut kvmesh_notif) {
    if !notif.is_null() {
        // SAFETY: a live handle from Box::into_raw, released once per the contract.
        drop(unsafe { Box::from_raw(notif) });
    }
}

/// Page-aligned, zeroed host memory owned by kvmesh, for `kvmesh_agent_register_buffer`.
pub struct kvmesh_buffer {
    buf: HostBuffer,
}

/// A new zeroed buffer of `len` bytes (at least 1). Returns null on error.
#[no_mangle]
pub extern "C" fn kvmesh_buffer_new(len: usize) -> *mut kvmesh_buffer {
    guard_ptr(|| {
        Ok(Box::new(kvmesh_buffer {
            buf: HostBuffer::new(len)?,
        }))
    })
}

/// The buffer's first byte (null for null). Peers may read and write the buffer while it is
/// registered: read it after the transfer or notification that filled it.
///
/// # Safety
/// `buffer` is null or live.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_buffer_data(buffer: *const kvmesh_buffer) -> *mut u8 {
    // SAFETY: null or live per the contract.
    unsafe { buffer.as_ref() }.map_or(std::ptr::null_mut(), |b| b.buf.as_ptr())
}

/// The buffer's length in bytes (0 for null).
///
/// # Safety
/// `buffer` is null or live.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_buffer_len(buffer: *const kvmesh_buffer) -> usize {
    // SAFETY: null or live per the contract.
    unsafe { buffer.as_ref() }.map_or(0, |b| b.buf.len())
}

/// Releases the caller's handle of a buffer (null is ignored); the memory lives on while an
/// agent has it registered.
///
/// # Safety
/// `buffer` is null or a live handle, not used afterwards (nor its data pointer, unless the
/// buffer is still registered).
#[no_mangle]
pub unsafe extern "C" fn kvmesh_buffer_free(buffer: *mut kvmesh_buffer) {
    if !buffer.is_null() {
        // SAFETY: a live handle from Box::into_raw, released once per the contract.
        drop(unsafe { Box::from_raw(buffer) });
    }
}

/// One contiguous piece of host memory: address and length in bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct kvmesh_desc {
    pub addr: u64,
    pub len: u64,
}

/// A list of host-memory descriptors.
pub struct kvmesh_descs {
    list: DescList,
}

/// A descriptor list of the `n` descriptors of `descs`, in order. They are checked against the
/// registered regions by `kvmesh_agent_prepare`. Returns null on error.
///
/// # Safety
/// `descs` points to `n` readable descriptors (or is null with `n == 0`).
#[no_mangle]
pub unsafe extern "C" fn kvmesh_descs_new(
    descs: *const kvmesh_desc,
    n: usize,
) -> *mut kvmesh_descs {
    guard_ptr(|| {
        // SAFETY: `n` readable descriptors per the contract.
        let d = unsafe { slice(descs, n, "descs") }?;
        let mut list = DescList::with_capacity(MemKind::Dram, d.len());
        for x in d {
            list.push(x.addr, x.len, 0);
        }
        Ok(Box::new(kvmesh_descs { list }))
    })
}

/// A descriptor list of `n` blocks of `block_len` bytes each, block `i` at `addrs[i]` (a
/// scheduler's list of KV blocks). Returns null on error.
///
/// # Safety
/// `addrs` points to `n` readable addresses (or is null with `n == 0`).
#[no_mangle]
pub unsafe extern "C" fn kvmesh_descs_new_blocks(
    addrs: *const u64,
    n: usize,
    block_len: u64,
) -> *mut kvmesh_descs {
    guard_ptr(|| {
        // SAFETY: `n` readable addresses per the contract.
        let a = unsafe { slice(addrs, n, "addrs") }?;
        if block_len == 0 && !a.is_empty() {
            return Err("block_len must be positive".into());
        }
        let mut list = DescList::with_capacity(MemKind::Dram, a.len());
        for &addr in a {
            list.push(addr, block_len, 0);
        }
        Ok(Box::new(kvmesh_descs { list }))
    })
}

/// The number of descriptors of a list (0 for null).
///
/// # Safety
/// `descs` is null or live.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_descs_len(descs: *const kvmesh_descs) -> usize {
    // SAFETY: null or live per the contract.
    unsafe { descs.as_ref() }.map_or(0, |d| d.list.len())
}

/// Releases a descriptor list (null is ignored). Transfers prepared from it keep their own copy.
///
/// # Safety
/// `descs` is null or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_descs_free(descs: *mut kvmesh_descs) {
    if !descs.is_null() {
        // SAFETY: a live handle from Box::into_raw, released once per the contract.
        drop(unsafe { Box::from_raw(descs) });
    }
}

/// A prepared transfer.
pub struct kvmesh_xfer {
    h: XferHandle,
}

/// Prepares a transfer (`KVMESH_OP_READ` or `KVMESH_OP_WRITE`) between `local` (memory this
/// agent registered) and `remote_descs` (memory the loaded peer `remote` registered), pairwise:
/// both lists have as many descriptors, of equal lengths. `backend` is a `KVMESH_BACKEND_*`.
/// Every descriptor is checked against both sides' regions now. Returns null on error
/// (`KVMESH_ERR_INVALID` for bad lists, `KVMESH_ERR_TRANSFER` for an unknown peer or a backend
/// that is not available).
///
/// # Safety
/// `agent`, `local` and `remote_descs` are null or live; `remote` is null or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_agent_prepare(
    agent: *const kvmesh_agent,
    op: i32,
    local: *const kvmesh_descs,
    remote: *const c_char,
    remote_descs: *const kvmesh_descs,
    backend: i32,
) -> *mut kvmesh_xfer {
    guard_ptr(|| {
        // SAFETY: arguments per the contract.
        let (a, local, remote, remote_descs) = unsafe {
            (
                req(agent, "agent")?,
                req(local, "local")?,
                req_str(remote, "remote")?,
                req(remote_descs, "remote_descs")?,
            )
        };
        let op = match op {
            KVMESH_OP_READ => Op::Read,
            KVMESH_OP_WRITE => Op::Write,
            o => {
                return Err(format!("op {o} is neither KVMESH_OP_READ nor KVMESH_OP_WRITE").into())
            }
        };
        let backend = match backend {
            KVMESH_BACKEND_DEFAULT => None,
            KVMESH_BACKEND_TCP => Some(Backend::Tcp),
            KVMESH_BACKEND_SHM => Some(Backend::Shm),
            KVMESH_BACKEND_UCX => Some(Backend::Ucx),
            KVMESH_BACKEND_CUDA_IPC => Some(Backend::CudaIpc),
            b => return Err(format!("backend {b} is not a KVMESH_BACKEND_*").into()),
        };
        let h = a
            .agent
            .prepare(op, &local.list, remote, &remote_descs.list, backend)?;
        Ok(Box::new(kvmesh_xfer { h }))
    })
}

/// Releases a transfer (null is ignored). A pending one runs on in the background: keep its
/// memory valid until it could have finished (the agent's timeout).
///
/// # Safety
/// `xfer` is null or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_xfer_free(xfer: *mut kvmesh_xfer) {
    if !xfer.is_null() {
        // SAFETY: a live handle from Box::into_raw, released once per the contract.
        drop(unsafe { Box::from_raw(xfer) });
    }
}

/// Starts the transfer. `notif` (`len` bytes), if not null, is delivered to the peer once the
/// data is visible there (for a READ: once it has been read); null sends none. Fails with
/// `KVMESH_ERR_BUSY` while the previous post is pending.
///
/// # Safety
/// `xfer` is null or live; `notif` is null or points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_xfer_post(
    xfer: *const kvmesh_xfer,
    notif: *const u8,
    len: usize,
) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let x = unsafe { req(xfer, "xfer") }?;
        let notif = if notif.is_null() {
            if len != 0 {
                return Err(format!("notif is null but its length is {len}").into());
            }
            None
        } else {
            // SAFETY: `len` readable bytes per the contract.
            Some(unsafe { slice(notif, len, "notif") }?)
        };
        x.h.post(notif)?;
        Ok(KVMESH_OK)
    })
}

/// The transfer's state, a `KVMESH_XFER_*`, without waiting (negative for a null handle). For
/// `KVMESH_XFER_FAILED`, `kvmesh_last_error` says why.
///
/// # Safety
/// `xfer` is null or live.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_xfer_status(xfer: *const kvmesh_xfer) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let x = unsafe { req(xfer, "xfer") }?;
        Ok(match x.h.status() {
            XferStatus::Idle => KVMESH_XFER_IDLE,
            XferStatus::Pending => KVMESH_XFER_PENDING,
            XferStatus::Done => KVMESH_XFER_DONE,
            XferStatus::Cancelled => KVMESH_XFER_CANCELLED,
            XferStatus::Failed(e) => {
                crate::set_error(KVMESH_ERR_TRANSFER, e.to_string());
                KVMESH_XFER_FAILED
            }
        })
    })
}

/// Waits up to `timeout_ms` milliseconds for the current post to finish. Returns `KVMESH_OK`
/// when every byte moved, `KVMESH_ERR_BUSY` when it is still pending (it goes on),
/// `KVMESH_ERR_TRANSFER` when it failed or was cancelled, `KVMESH_ERR_INVALID` when it was never
/// posted.
///
/// # Safety
/// `xfer` is null or live.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_xfer_wait(xfer: *const kvmesh_xfer, timeout_ms: u32) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let x = unsafe { req(xfer, "xfer") }?;
        match x
            .h
            .wait_timeout(Duration::from_millis(u64::from(timeout_ms)))
        {
            Ok(_) => Ok(KVMESH_OK),
            Err(Error::Busy) => Err(Fail(
                KVMESH_ERR_BUSY,
                format!("transfer still pending after {timeout_ms} ms"),
            )),
            Err(Error::Invalid(m)) => Err(Fail(KVMESH_ERR_INVALID, m)),
            Err(e) => Err(Fail(KVMESH_ERR_TRANSFER, e.to_string())),
        }
    })
}

/// Asks the backend to stop the current post; it ends cancelled (or done, if it finished
/// first) once the backend no longer touches its memory: wait for it.
///
/// # Safety
/// `xfer` is null or live.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_xfer_cancel(xfer: *const kvmesh_xfer) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let x = unsafe { req(xfer, "xfer") }?;
        x.h.cancel();
        Ok(KVMESH_OK)
    })
}

/// Statistics of a transfer's last post.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct kvmesh_xfer_stats {
    /// The backend that moves it, a `KVMESH_BACKEND_*` (never `DEFAULT`).
    pub backend: i32,
    /// `KVMESH_OP_READ` or `KVMESH_OP_WRITE`.
    pub op: i32,
    /// Bytes moved by one post.
    pub bytes: u64,
    /// Descriptors after merging neighbours contiguous on both sides.
    pub descs: u64,
    /// How many times the transfer was posted.
    pub posts: u64,
    /// From the last post to its completion (0 while pending).
    pub duration_ns: u64,
}

/// Copies a transfer's statistics into `*out`.
///
/// # Safety
/// `xfer` is null or live; `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_xfer_get_stats(
    xfer: *const kvmesh_xfer,
    out: *mut kvmesh_xfer_stats,
) -> i32 {
    run(|| {
        // SAFETY: null or live per the contract.
        let x = unsafe { req(xfer, "xfer") }?;
        let s = x.h.stats();
        let v = kvmesh_xfer_stats {
            backend: backend_code(s.backend),
            op: op_code(s.op),
            bytes: s.bytes,
            descs: s.descs as u64,
            posts: s.posts,
            duration_ns: u64::try_from(s.duration.as_nanos()).unwrap_or(u64::MAX),
        };
        // SAFETY: null or writable per the contract.
        unsafe { put_req(out, v, "out") }?;
        Ok(KVMESH_OK)
    })
}

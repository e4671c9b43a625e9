//! kvtransfer: NIXL-style movement of KV blocks between engines and tiers.
//!
//! The model follows NIXL's: a named [`Agent`] registers memory regions once, exports its
//! metadata as a versioned byte blob ([`Agent::export_metadata`]), loads its peers' blobs
//! ([`Agent::load_remote`], or [`Agent::connect`] over the small TCP side channel every agent
//! serves), builds descriptor lists ([`DescList`]), prepares transfer handles for a pair of local
//! and remote lists ([`Agent::prepare`]) and posts READs or WRITEs on them
//! ([`XferHandle::post`]), with an optional notification that the remote agent receives only after
//! the data is visible there ([`Agent::get_notifs`]). Completion is polled
//! ([`XferHandle::status`]) or awaited ([`XferHandle::wait`], [`XferHandle::wait_timeout`]);
//! transfers can be cancelled and each keeps its statistics ([`XferStats`]).
//!
//! Backends ([`Backend`]):
//! * `Tcp`: tokio, one connection per pair of agents, data read and written straight into
//!   registered memory with vectored socket calls; works across hosts.
//! * `Shm`: same host only, `process_vm_readv`/`process_vm_writev` between the two processes
//!   (one copy, no staging); notifications and liveness go over the TCP connection.
//! * `Ucx`: UCP RMA put/get with remote keys and active messages for notifications, through
//!   `kvmesh-ucx-sys` with `libucp` loaded at run time ([`AgentConfig::ucx`]).
//!
//! GPU memory ([`MemKind::Vram`], feature `cuda`) is registered like host memory and moves over
//! TCP through pinned host staging buffers (no GPUDirect here); see the `gpu` module.
//!
//! Failures fail closed: a dead or silent peer fails every transfer in flight on it within the
//! agent's timeout, a notification is only delivered when every byte of its WRITE arrived, and a
//! transfer is never reported complete unless all of its bytes moved.

mod agent;
mod desc;
mod error;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(not(feature = "cuda"))]
#[path = "gpu_off.rs"]
mod gpu;
mod mem;
mod metadata;
mod shm;
mod tcp;
mod ucx;
mod wire;
mod xfer;

pub use agent::{Agent, AgentConfig, Notif, UcxData};
pub use desc::{Desc, DescList, MemKind};
pub use error::{Error, Result};
pub use mem::{HostBuffer, RegionId};
pub use metadata::{AgentMetadata, RegionMeta, METADATA_VERSION};
pub use xfer::{Backend, Op, XferHandle, XferStats, XferStatus};

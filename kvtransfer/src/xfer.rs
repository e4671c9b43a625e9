use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::agent::{Inner, Remote};
use crate::error::{Error, Result};

/// Direction of a transfer, seen from the agent that posts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Remote memory into local memory.
    Read,
    /// Local memory into remote memory.
    Write,
}

/// The transport that moves a transfer's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    Tcp,
    Shm,
    Ucx,
    /// GPU to GPU on one host (feature `cuda`): the peer's GPU allocations mapped through CUDA
    /// IPC and copied by the driver.
    CudaIpc,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Tcp => "tcp",
            Backend::Shm => "shm",
            Backend::Ucx => "ucx",
            Backend::CudaIpc => "cuda_ipc",
        }
    }
}

/// State of a prepared transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XferStatus {
    /// Prepared, never posted.
    Idle,
    /// Posted, not finished.
    Pending,
    /// Every byte moved (and the notification, if any, was handed to the transport).
    Done,
    /// Cancelled before completion: the data at the destination is unspecified.
    Cancelled,
    /// Failed: the data at the destination is unspecified.
    Failed(Error),
}

/// Statistics of the last post of a transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XferStats {
    pub backend: Backend,
    pub op: Op,
    pub bytes: u64,
    /// Descriptors after merging neighbours that are contiguous on both sides.
    pub descs: usize,
    /// How many times the handle was posted.
    pub posts: u64,
    /// From post to completion (zero while pending).
    pub duration: Duration,
}

impl XferStats {
    /// Bytes per second of the last completed post.
    pub fn gbps(&self) -> f64 {
        let s = self.duration.as_secs_f64();
        if s == 0.0 {
            0.0
        } else {
            self.bytes as f64 / s / 1e9
        }
    }
}

pub(crate) const IDLE: u8 = 0;
pub(crate) const PENDING: u8 = 1;
pub(crate) const DONE: u8 = 2;
pub(crate) const CANCELLED: u8 = 3;
pub(crate) const FAILED: u8 = 4;

/// A contiguous piece of a transfer, as (address, length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seg {
    pub addr: u64,
    pub len: u64,
}

pub(crate) struct XferShared {
    pub op: Op,
    pub backend: Backend,
    pub remote: Arc<Remote>,
    pub local: Vec<Seg>,
    pub remote_segs: Vec<Seg>,
    /// Remote region ids of each remote segment (UCX rkeys, CUDA IPC mappings).
    #[allow(dead_code)]
    pub remote_regions: Vec<u32>,
    /// The GPU of the local segments, when they are GPU memory.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub local_dev: u32,
    pub total: u64,
    /// CUDA IPC: every copy as `(dst, src, len)` in this process's addresses (see
    /// `gpu::ipc_pairs`); empty for other backends.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub ipc_pairs: Vec<(u64, u64, usize)>,
    /// CUDA IPC: the copies launched by the current post, for the worker to wait for.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub ipc_pending: Mutex<Option<crate::gpu::IpcPending>>,
    /// The remote segments encoded for the TCP wire (addr, len pairs).
    pub wire_descs: Vec<u8>,
    pub state: AtomicU8,
    pub cancel: AtomicBool,
    /// Id of the current post on the wire.
    pub wire_id: AtomicU64,
    pub notif: Mutex<Option<Vec<u8>>>,
    pub err: Mutex<Option<Error>>,
    pub posted_at: Mutex<Option<Instant>>,
    pub duration: Mutex<Duration>,
    pub posts: AtomicU64,
    pub lock: Mutex<()>,
    pub cv: Condvar,
    pub notify: tokio::sync::Notify,
    pub agent: std::sync::Weak<Inner>,
    /// Host staging of this side's GPU descriptors (the backends move `local`, which then names
    /// the staging buffer): filled before a WRITE is sent, emptied into the GPU once a READ has
    /// arrived, before the transfer is done.
    pub staging: Option<crate::gpu::Staging>,
}

impl XferShared {
    /// Finishes the current post. Called exactly once per post by the backend, after it stopped
    /// touching the transfer's memory.
    pub fn complete(&self, mut res: Result<()>) {
        if let (Ok(()), Op::Read, Some(s)) = (&res, self.op, &self.staging) {
            if self.state.load(Ordering::Acquire) == PENDING {
                res = s.scatter();
            }
        }
        let now = Instant::now();
        let state = match &res {
            Ok(()) => DONE,
            Err(Error::Cancelled) => CANCELLED,
            Err(_) => FAILED,
        };
        {
            let _g = self.lock.lock();
            if self.state.load(Ordering::Acquire) != PENDING {
                return;
            }
            if let Some(t) = *self.posted_at.lock() {
                *self.duration.lock() = now - t;
            }
            if let Err(e) = res {
                *self.err.lock() = Some(e);
            }
            self.state.store(state, Ordering::Release);
            self.cv.notify_all();
        }
        self.notify.notify_waiters();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    pub fn take_notif(&self) -> Option<Vec<u8>> {
        self.notif.lock().take()
    }

    fn result(&self) -> Option<Result<()>> {
        match self.state.load(Ordering::Acquire) {
            DONE => Some(Ok(())),
            CANCELLED => Some(Err(Error::Cancelled)),
            FAILED => Some(Err(self
                .err
                .lock()
                .clone()
                .unwrap_or(Error::Io("transfer failed".into())))),
            _ => None,
        }
    }
}

/// A prepared transfer between a local and a remote descriptor list. Post it as often as needed
/// (one post at a time). Dropping a pending handle lets the transfer finish in the background.
pub struct XferHandle {
    pub(crate) st: Arc<XferShared>,
}

impl XferHandle {
    /// Starts the transfer. `notif`, if given, is delivered to the remote agent once the data is
    /// visible there (for a READ: once it has been read). Fails with [`Error::Busy`] while a
    /// previous post is pending.
    pub fn post(&self, notif: Option<&[u8]>) -> Result<()> {
        let st = &self.st;
        if let Some(n) = notif {
            if n.len() > crate::wire::MAX_NOTIF {
                return Err(Error::Invalid(format!(
                    "notification of {} bytes exceeds {} bytes",
                    n.len(),
                    crate::wire::MAX_NOTIF
                )));
            }
        }
        {
            let _g = st.lock.lock();
            let s = st.state.load(Ordering::Acquire);
            if s == PENDING {
                return Err(Error::Busy);
            }
            *st.notif.lock() = notif.map(|n| n.to_vec());
            *st.err.lock() = None;
            *st.duration.lock() = Duration::ZERO;
            st.cancel.store(false, Ordering::Relaxed);
            *st.posted_at.lock() = Some(Instant::now());
            st.posts.fetch_add(1, Ordering::Relaxed);
            st.state.store(PENDING, Ordering::Release);
        }
        let agent = match st.agent.upgrade() {
            Some(a) => a,
            None => {
                let e = Error::Invalid("the agent was dropped".into());
                st.complete(Err(e.clone()));
                return Err(e);
            }
        };
        if let (Op::Write, Some(s)) = (st.op, &st.staging) {
            if let Err(e) = s.gather() {
                st.complete(Err(e.clone()));
                return Err(e);
            }
        }
        // CUDA IPC: the copies start here; the same-host worker waits for them, checks the peer
        // and sends the notification.
        if st.backend == Backend::CudaIpc {
            match crate::gpu::launch_ipc(st) {
                Ok(p) => *st.ipc_pending.lock() = p,
                Err(e) => {
                    st.complete(Err(e.clone()));
                    return Err(e);
                }
            }
        }
        if let Err(e) = agent.submit(&self.st) {
            // Copies already launched must end before the caller may reuse the memory.
            crate::gpu::abandon_ipc(st);
            st.complete(Err(e.clone()));
            return Err(e);
        }
        Ok(())
    }

    /// Current state, without blocking.
    pub fn status(&self) -> XferStatus {
        match self.st.state.load(Ordering::Acquire) {
            IDLE => XferStatus::Idle,
            PENDING => XferStatus::Pending,
            DONE => XferStatus::Done,
            CANCELLED => XferStatus::Cancelled,
            _ => XferStatus::Failed(
                self.st
                    .err
                    .lock()
                    .clone()
                    .unwrap_or(Error::Io("failed".into())),
            ),
        }
    }

    /// Waits (async) for the current post to finish.
    pub async fn wait(&self) -> Result<XferStats> {
        loop {
            let n = self.st.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.st.state.load(Ordering::Acquire) == IDLE {
                return Err(Error::Invalid("transfer was never posted".into()));
            }
            if let Some(r) = self.st.result() {
                return r.map(|()| self.stats());
            }
            n.await;
        }
    }

    /// Blocks until the current post finishes or `timeout` passes ([`Error::Busy`] then; the
    /// transfer goes on).
    pub fn wait_timeout(&self, timeout: Duration) -> Result<XferStats> {
        let deadline = Instant::now() + timeout;
        let mut g = self.st.lock.lock();
        loop {
            if self.st.state.load(Ordering::Acquire) == IDLE {
                return Err(Error::Invalid("transfer was never posted".into()));
            }
            if let Some(r) = self.st.result() {
                drop(g);
                return r.map(|()| self.stats());
            }
            if self.st.cv.wait_until(&mut g, deadline).timed_out() {
                if let Some(r) = self.st.result() {
                    drop(g);
                    return r.map(|()| self.stats());
                }
                return Err(Error::Busy);
            }
        }
    }

    /// Asks the backend to stop the current post. It ends as [`XferStatus::Cancelled`] (or
    /// `Done` if it finished first) once the backend no longer touches its memory; wait for it.
    pub fn cancel(&self) {
        self.st.cancel.store(true, Ordering::Relaxed);
    }

    pub fn stats(&self) -> XferStats {
        XferStats {
            backend: self.st.backend,
            op: self.st.op,
            bytes: self.st.total,
            descs: self.st.local.len(),
            posts: self.st.posts.load(Ordering::Relaxed),
            duration: *self.st.duration.lock(),
        }
    }

    pub fn backend(&self) -> Backend {
        self.st.backend
    }

    /// The name of the remote agent.
    pub fn remote_name(&self) -> &str {
        &self.st.remote.meta.name
    }
}

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::desc::{DescList, MemKind};
use crate::error::{Error, Result};
use crate::mem::{HostBuffer, RegionId, RegionTable};
use crate::metadata::{AgentMetadata, RegionMeta};
use crate::xfer::{Backend, Op, Seg, XferHandle, XferShared, IDLE};
use crate::{shm, tcp, wire};

/// Configuration of an [`Agent`].
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The agent's name, unique among the agents that talk to each other.
    pub name: String,
    /// Where the TCP listener (side channel and TCP backend) binds. Default `127.0.0.1:0`.
    pub listen: SocketAddr,
    /// The address peers should use, if it differs from the bound one (e.g. bound to 0.0.0.0).
    pub advertise: Option<IpAddr>,
    /// A peer that makes no progress for this long fails every transfer in flight on it.
    pub timeout: Duration,
    /// Threads of the agent's tokio runtime.
    pub threads: usize,
    /// Enables the same-host shared-memory backend.
    pub shm: bool,
    /// Enables the UCX backend (libucp >= 1.22 loaded at run time; `Agent::new` fails with a
    /// clear message when it cannot be loaded).
    pub ucx: bool,
    /// How the UCX backend moves data (see [`UcxData`]).
    pub ucx_data: UcxData,
}

/// How the UCX backend moves data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UcxData {
    /// UCX put/get where the endpoint has a transport with native RMA (RDMA, or a same-host
    /// one), kvtransfer's own active messages elsewhere (TCP only).
    #[default]
    Auto,
    /// UCX put/get on every endpoint. Without native RMA UCX emulates them in software, and
    /// UCX 1.22 then aborts a target whose initiator dies with a request in flight.
    Rma,
    /// kvtransfer's active messages on every endpoint: the target copies each chunk in after
    /// checking it against its registered regions.
    ActiveMessages,
}

impl AgentConfig {
    pub fn new(name: impl Into<String>) -> Self {
        AgentConfig {
            name: name.into(),
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            advertise: None,
            timeout: Duration::from_secs(10),
            threads: 2,
            shm: true,
            ucx: false,
            ucx_data: UcxData::Auto,
        }
    }
}

/// A notification received from a remote agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notif {
    pub from: String,
    pub msg: Vec<u8>,
}

pub(crate) struct LocalRegion {
    pub addr: u64,
    pub len: u64,
    pub kind: MemKind,
    pub dev: u32,
    pub owner: Option<HostBuffer>,
    /// UCX memory handle token and packed remote key.
    pub ucx: Option<(usize, Vec<u8>)>,
    /// GPU memory: its allocation's CUDA IPC handle and start (see [`RegionMeta::ipc`]).
    pub ipc: Vec<u8>,
}

/// What an incoming transfer touches (see [`Inner::check_incoming`]).
pub(crate) struct Incoming {
    pub keep: Vec<HostBuffer>,
    pub staging: Option<crate::gpu::Staging>,
}

pub(crate) struct Remote {
    pub meta: AgentMetadata,
    pub table: RegionTable,
    pub same_host: bool,
    pub conn: Mutex<Option<Arc<tcp::Conn>>>,
    pub shm: Mutex<Option<Arc<shm::Peer>>>,
    /// Its GPU allocations mapped into this process (CUDA IPC), opened on first use.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub ipc: crate::gpu::IpcMaps,
}

impl Remote {
    /// The live connection to this remote, opened on first use and reopened after a failure.
    pub fn conn(&self, inner: &Arc<Inner>) -> Result<Arc<tcp::Conn>> {
        let mut g = self.conn.lock();
        if let Some(c) = g.as_ref() {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::Invalid("the agent was dropped".into()));
        }
        let c = tcp::Conn::open(inner, &self.meta);
        *g = Some(c.clone());
        Ok(c)
    }
}

pub(crate) struct Inner {
    pub name: String,
    pub instance: u64,
    pub cfg: AgentConfig,
    pub rt: tokio::runtime::Handle,
    pub listen_addr: SocketAddr,
    pub boot_id: String,
    pub pid_start: u64,
    pub regions: RwLock<(RegionTable, HashMap<u32, LocalRegion>)>,
    next_region: AtomicU32,
    pub next_wire_id: AtomicU64,
    pub remotes: RwLock<HashMap<String, Arc<Remote>>>,
    notifs: Mutex<VecDeque<Notif>>,
    notif_cv: Condvar,
    notif_async: tokio::sync::Notify,
    pub closed: AtomicBool,
    shm: Option<shm::Worker>,
    pub ucx: std::sync::OnceLock<crate::ucx::Ucx>,
}

impl Inner {
    pub fn push_notif(&self, n: Notif) {
        self.notifs.lock().push_back(n);
        self.notif_cv.notify_all();
        self.notif_async.notify_waiters();
    }

    pub fn metadata(&self) -> AgentMetadata {
        let g = self.regions.read();
        let mut regions: Vec<RegionMeta> =
            g.1.iter()
                .map(|(&id, r)| RegionMeta {
                    id,
                    addr: r.addr,
                    len: r.len,
                    kind: r.kind,
                    dev: r.dev,
                    ucx_rkey: r.ucx.as_ref().map(|u| u.1.clone()).unwrap_or_default(),
                    ipc: r.ipc.clone(),
                })
                .collect();
        regions.sort_by_key(|r| r.id);
        AgentMetadata {
            name: self.name.clone(),
            instance: self.instance,
            pid: std::process::id(),
            pid_start: self.pid_start,
            boot_id: self.boot_id.clone(),
            tcp_addrs: vec![self.listen_addr],
            regions,
            ucx_worker: self
                .ucx
                .get()
                .map(|u| u.worker_addr.clone())
                .unwrap_or_default(),
        }
    }

    /// Validates incoming remote segments against the live region table; returns the owners
    /// of kvtransfer-allocated memory touched, to keep them alive while in use, and, when some
    /// segments are GPU memory, a host staging buffer standing in for all of them.
    pub fn check_incoming(&self, segs: &[Seg]) -> Result<Incoming, String> {
        let g = self.regions.read();
        let mut ids: Vec<u32> = Vec::new();
        let mut gpu = false;
        for (i, s) in segs.iter().enumerate() {
            match g.0.find_any(s.addr, s.len) {
                Some((id, kind, _)) => {
                    gpu |= kind == MemKind::Vram;
                    if ids.last() != Some(&id) {
                        ids.push(id)
                    }
                }
                None => {
                    return Err(format!(
                        "descriptor {i} ({:#x} + {} bytes) lies outside every memory region {:?} registered",
                        s.addr, s.len, self.name
                    ))
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        let keep = ids
            .iter()
            .filter_map(|id| g.1.get(id).and_then(|r| r.owner.clone()))
            .collect();
        #[cfg(feature = "cuda")]
        let staging = if gpu {
            let pieces = segs
                .iter()
                .filter(|s| s.len > 0)
                .filter_map(|s| {
                    let (_, kind, dev) = g.0.find_any(s.addr, s.len)?;
                    Some(crate::gpu::Piece {
                        kind,
                        dev,
                        addr: s.addr,
                        off: 0,
                        len: s.len as usize,
                    })
                })
                .collect();
            Some(crate::gpu::Staging::new(pieces).map_err(|e| e.to_string())?)
        } else {
            None
        };
        #[cfg(not(feature = "cuda"))]
        let staging = if gpu {
            return Err("GPU memory is registered but kvtransfer lacks its cuda feature".into());
        } else {
            None
        };
        Ok(Incoming { keep, staging })
    }

    pub fn submit(self: &Arc<Self>, st: &Arc<XferShared>) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Invalid("the agent was dropped".into()));
        }
        st.wire_id.store(
            self.next_wire_id.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        match st.backend {
            Backend::Tcp => st.remote.conn(self)?.send_xfer(st.clone()),
            Backend::Shm => match &self.shm {
                Some(w) => w.submit(st.clone()),
                None => Err(Error::Unavailable {
                    backend: "shm",
                    msg: "disabled in this agent's configuration".into(),
                }),
            },
            Backend::Ucx => match self.ucx.get() {
                Some(u) => u.submit(st.clone()),
                None => Err(Error::Unavailable {
                    backend: "ucx",
                    msg: "not enabled in this agent".into(),
                }),
            },
            // Runs on the same-host worker, as shared memory does.
            Backend::CudaIpc => match &self.shm {
                Some(w) => w.submit(st.clone()),
                None => Err(Error::Unavailable {
                    backend: "cuda_ipc",
                    msg: "the same-host backends are disabled in this agent's configuration".into(),
                }),
            },
        }
    }
}

/// A transfer agent: owns registered memory, knows its peers, and moves bytes between them.
/// Dropping it stops its threads; transfers still in flight then fail.
pub struct Agent {
    inner: Arc<Inner>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Result<Agent> {
        if cfg.name.is_empty() || cfg.name.len() > 4096 {
            return Err(Error::Invalid("an agent name has 1 to 4096 bytes".into()));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.threads.max(1))
            .thread_name(format!("kvtransfer-{}", cfg.name))
            .enable_all()
            .build()?;
        let std_listener = std::net::TcpListener::bind(cfg.listen)
            .map_err(|e| Error::Io(format!("cannot listen on {}: {e}", cfg.listen)))?;
        std_listener.set_nonblocking(true)?;
        let mut listen_addr = std_listener.local_addr()?;
        if let Some(ip) = cfg.advertise {
            listen_addr.set_ip(ip);
        } else if listen_addr.ip().is_unspecified() {
            return Err(Error::Invalid(
                "listening on an unspecified address needs `advertise`".into(),
            ));
        }
        let shm = if cfg.shm {
            Some(shm::Worker::new()?)
        } else {
            None
        };
        if cfg.shm {
            shm::allow_peers();
        }
        let inner = Arc::new(Inner {
            name: cfg.name.clone(),
            instance: random_u64(),
            rt: rt.handle().clone(),
            listen_addr,
            boot_id: boot_id(),
            pid_start: shm::pid_start(std::process::id()).unwrap_or(0),
            regions: RwLock::new((RegionTable::default(), HashMap::new())),
            next_region: AtomicU32::new(1),
            next_wire_id: AtomicU64::new(1),
            remotes: RwLock::new(HashMap::new()),
            notifs: Mutex::new(VecDeque::new()),
            notif_cv: Condvar::new(),
            notif_async: tokio::sync::Notify::new(),
            closed: AtomicBool::new(false),
            shm,
            ucx: std::sync::OnceLock::new(),
            cfg,
        });
        if inner.cfg.ucx {
            let u = crate::ucx::Ucx::start(Arc::downgrade(&inner), &inner.name, inner.cfg.timeout)?;
            let _ = inner.ucx.set(u);
        }
        if let Some(w) = &inner.shm {
            w.start(Arc::downgrade(&inner))?;
        }
        let listener = {
            let _g = rt.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        rt.spawn(tcp::accept_loop(Arc::downgrade(&inner), listener));
        Ok(Agent {
            inner,
            rt: Some(rt),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Where the side channel and TCP backend listen.
    pub fn listen_addr(&self) -> SocketAddr {
        self.inner.listen_addr
    }

    /// This agent's metadata, decoded.
    pub fn metadata(&self) -> AgentMetadata {
        self.inner.metadata()
    }

    /// This agent's metadata as a versioned blob, for peers' [`Agent::load_remote`]. Export it
    /// again after registering or deregistering memory.
    pub fn export_metadata(&self) -> Vec<u8> {
        self.inner.metadata().encode()
    }

    /// Registers a kvtransfer-owned buffer (kept alive while registered).
    pub fn register(&self, buf: &HostBuffer) -> Result<RegionId> {
        self.insert_region(
            buf.addr(),
            buf.len() as u64,
            MemKind::Dram,
            0,
            Some(buf.clone()),
        )
    }

    /// Registers memory the caller owns: host memory ([`MemKind::Dram`]) or, with the `cuda`
    /// feature, memory of GPU `dev` ([`MemKind::Vram`]; checked to lie in one device
    /// allocation; moved over TCP through host staging).
    ///
    /// # Safety
    /// `[addr, addr + len)` must stay valid, readable and writable memory of this process (or
    /// of the GPU) until it is deregistered and no transfer touches it any more; remote agents
    /// read and write it at any time in between.
    pub unsafe fn register_raw(
        &self,
        addr: u64,
        len: u64,
        kind: MemKind,
        dev: u32,
    ) -> Result<RegionId> {
        if kind == MemKind::Vram {
            #[cfg(not(feature = "cuda"))]
            return Err(Error::Unavailable {
                backend: "cuda",
                msg: "GPU memory registration needs kvtransfer's cuda feature".into(),
            });
            #[cfg(feature = "cuda")]
            crate::gpu::check_region(addr, len, dev)?;
        }
        self.insert_region(addr, len, kind, dev, None)
    }

    fn insert_region(
        &self,
        addr: u64,
        len: u64,
        kind: MemKind,
        dev: u32,
        owner: Option<HostBuffer>,
    ) -> Result<RegionId> {
        if len == 0 || addr == 0 {
            return Err(Error::Invalid(
                "cannot register an empty or null region".into(),
            ));
        }
        let ipc = if kind == MemKind::Vram {
            crate::gpu::ipc_export(addr, dev)
        } else {
            Vec::new()
        };
        let id = self.inner.next_region.fetch_add(1, Ordering::Relaxed);
        let mut g = self.inner.regions.write();
        g.0.insert(addr, len, id, kind, dev)?;
        let ucx = match self.inner.ucx.get().filter(|_| kind == MemKind::Dram) {
            Some(u) => match u.register(addr, len) {
                Ok(x) => Some(x),
                Err(e) => {
                    g.0.remove(id);
                    return Err(e);
                }
            },
            None => None,
        };
        g.1.insert(
            id,
            LocalRegion {
                addr,
                len,
                kind,
                dev,
                owner,
                ucx,
                ipc,
            },
        );
        Ok(RegionId(id))
    }

    /// Deregisters a region. Transfers already prepared on it fail their bounds check at the
    /// target; peers should load fresh metadata.
    pub fn deregister(&self, id: RegionId) -> Result<()> {
        let mut g = self.inner.regions.write();
        let Some(r) = g.1.remove(&id.0) else {
            return Err(Error::Invalid(format!("region {} is not registered", id.0)));
        };
        g.0.remove(id.0);
        if let (Some(u), Some((token, _))) = (self.inner.ucx.get(), r.ucx) {
            u.deregister(token);
        }
        Ok(())
    }

    /// Loads (or replaces) a remote agent's metadata; returns its name. Loading metadata of a
    /// restarted agent replaces the old entry, and its next transfer connects to the new
    /// process.
    pub fn load_remote(&self, blob: &[u8]) -> Result<String> {
        let meta = AgentMetadata::decode(blob)?;
        if meta.name == self.inner.name && meta.instance == self.inner.instance {
            return Err(Error::Invalid(
                "cannot load this agent's own metadata".into(),
            ));
        }
        let table = meta.region_table()?;
        let same_host = meta.boot_id == self.inner.boot_id && !meta.boot_id.is_empty();
        let name = meta.name.clone();
        let remote = Arc::new(Remote {
            meta,
            table,
            same_host,
            conn: Mutex::new(None),
            shm: Mutex::new(None),
            ipc: Default::default(),
        });
        let old = self.inner.remotes.write().insert(name.clone(), remote);
        if let Some(old) = old {
            if let Some(c) = old.conn.lock().take() {
                c.close();
            }
        }
        Ok(name)
    }

    /// Forgets a remote agent and closes its connection.
    pub fn remove_remote(&self, name: &str) -> bool {
        match self.inner.remotes.write().remove(name) {
            Some(r) => {
                if let Some(c) = r.conn.lock().take() {
                    c.close();
                }
                true
            }
            None => false,
        }
    }

    /// The metadata currently loaded for `name`.
    pub fn remote_metadata(&self, name: &str) -> Option<AgentMetadata> {
        self.inner.remotes.read().get(name).map(|r| r.meta.clone())
    }

    /// Fetches a remote agent's metadata blob over its TCP side channel (blocking).
    pub fn fetch_metadata(&self, addr: SocketAddr) -> Result<Vec<u8>> {
        tcp::fetch_metadata_blocking(addr, self.inner.cfg.timeout)
    }

    /// Fetches a remote agent's metadata over its side channel and loads it; returns its name.
    pub fn connect(&self, addr: SocketAddr) -> Result<String> {
        let blob = self.fetch_metadata(addr)?;
        self.load_remote(&blob)
    }

    /// The backend [`Agent::prepare`] picks when given none: shared memory with an agent on
    /// the same host, TCP otherwise.
    pub fn default_backend(&self, remote: &str) -> Result<Backend> {
        let r = self.remote(remote)?;
        Ok(if r.same_host && self.inner.shm.is_some() {
            Backend::Shm
        } else {
            Backend::Tcp
        })
    }

    fn remote(&self, name: &str) -> Result<Arc<Remote>> {
        self.inner
            .remotes
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownAgent(name.to_string()))
    }

    /// Prepares a transfer between `local` descriptors (this agent's registered memory) and
    /// `remote_descs` (memory `remote` registered, as its metadata says), pairwise: both lists
    /// have the same number of descriptors with equal lengths. Neighbours contiguous on both
    /// sides are merged.
    pub fn prepare(
        &self,
        op: Op,
        local: &DescList,
        remote: &str,
        remote_descs: &DescList,
        backend: Option<Backend>,
    ) -> Result<XferHandle> {
        let r = self.remote(remote)?;
        if local.len() != remote_descs.len() {
            return Err(Error::Invalid(format!(
                "{} local descriptors against {} remote ones",
                local.len(),
                remote_descs.len()
            )));
        }
        let gpu = local.kind() == MemKind::Vram || remote_descs.kind() == MemKind::Vram;
        if gpu && cfg!(not(feature = "cuda")) {
            return Err(Error::Unavailable {
                backend: "cuda",
                msg: "GPU memory transfers need kvtransfer's cuda feature".into(),
            });
        }
        // GPU to GPU with another process on this host: CUDA IPC, when its allocations are
        // exported (checked per region below).
        let ipc_possible = cfg!(feature = "cuda")
            && local.kind() == MemKind::Vram
            && remote_descs.kind() == MemKind::Vram
            && r.same_host
            && r.meta.pid != std::process::id()
            && self.inner.shm.is_some();
        let requested = backend;
        let backend = match backend {
            None if ipc_possible => Backend::CudaIpc,
            // Other GPU memory goes through host staging, which the TCP backend does on both
            // sides.
            None if gpu => Backend::Tcp,
            Some(Backend::CudaIpc) if !ipc_possible => {
                return Err(Error::Unavailable {
                    backend: "cuda_ipc",
                    msg: format!(
                        "CUDA IPC moves GPU memory to GPU memory of another process on this host \
                         with the same-host backends enabled ({remote:?} is {}on this host)",
                        if r.same_host { "" } else { "not " }
                    ),
                })
            }
            Some(b @ (Backend::Shm | Backend::Ucx)) if gpu => {
                return Err(Error::Unavailable {
                    backend: b.name(),
                    msg: "GPU memory moves over TCP through host staging (no GPUDirect here)"
                        .into(),
                })
            }
            Some(b) => b,
            None => self.default_backend(remote)?,
        };
        match backend {
            Backend::Shm if !r.same_host => {
                return Err(Error::Unavailable {
                    backend: "shm",
                    msg: format!("{remote:?} is on another host"),
                })
            }
            Backend::Shm if self.inner.shm.is_none() => {
                return Err(Error::Unavailable {
                    backend: "shm",
                    msg: "disabled in this agent's configuration".into(),
                })
            }
            Backend::Ucx if self.inner.ucx.get().is_none() => {
                return Err(Error::Unavailable {
                    backend: "ucx",
                    msg: "not enabled in this agent (AgentConfig::ucx)".into(),
                })
            }
            Backend::Ucx if r.meta.ucx_worker.is_empty() => {
                return Err(Error::Unavailable {
                    backend: "ucx",
                    msg: format!("{remote:?} did not enable UCX"),
                })
            }
            _ => {}
        }
        let mut lsegs: Vec<Seg> = Vec::with_capacity(local.len());
        let mut rsegs: Vec<Seg> = Vec::with_capacity(local.len());
        let mut rregs: Vec<u32> = Vec::with_capacity(local.len());
        let mut total = 0u64;
        {
            let g = self.inner.regions.read();
            let (lk, rk) = (local.kind(), remote_descs.kind());
            for (i, (l, d)) in local
                .as_slice()
                .iter()
                .zip(remote_descs.as_slice())
                .enumerate()
            {
                if l.len != d.len {
                    return Err(Error::Invalid(format!(
                        "descriptor {i}: local length {} differs from remote length {}",
                        l.len, d.len
                    )));
                }
                if l.len == 0 {
                    continue;
                }
                let lid = g.0.find(l.addr, l.len, lk, l.dev);
                if lid.is_none() {
                    return Err(Error::OutOfRegion {
                        agent: self.inner.name.clone(),
                        index: i,
                        addr: l.addr,
                        len: l.len,
                    });
                }
                let rid = r
                    .table
                    .find(d.addr, d.len, rk, d.dev)
                    .ok_or(Error::OutOfRegion {
                        agent: remote.to_string(),
                        index: i,
                        addr: d.addr,
                        len: d.len,
                    })?;
                total += l.len;
                if let (Some(pl), Some(pr)) = (lsegs.last_mut(), rsegs.last_mut()) {
                    if pl.addr + pl.len == l.addr
                        && pr.addr + pr.len == d.addr
                        && rregs.last() == Some(&rid)
                    {
                        pl.len += l.len;
                        pr.len += l.len;
                        continue;
                    }
                }
                lsegs.push(Seg {
                    addr: l.addr,
                    len: l.len,
                });
                rsegs.push(Seg {
                    addr: d.addr,
                    len: d.len,
                });
                rregs.push(rid);
            }
        }
        // The peer's GPU regions the driver would not export (usually none).
        let unexported: Vec<u32> = r
            .meta
            .regions
            .iter()
            .filter(|m| m.kind == MemKind::Vram && m.ipc.is_empty())
            .map(|m| m.id)
            .collect();
        let backend = if backend == Backend::CudaIpc
            && !unexported.is_empty()
            && rregs.iter().any(|id| unexported.contains(id))
        {
            // A remote allocation the driver would not export.
            if requested == Some(Backend::CudaIpc) {
                return Err(Error::Unavailable {
                    backend: "cuda_ipc",
                    msg: format!("{remote:?} registered GPU memory that CUDA IPC cannot map"),
                });
            }
            Backend::Tcp
        } else {
            backend
        };
        if lsegs.len() > wire::MAX_DESCS {
            return Err(Error::Invalid(format!(
                "{} descriptors exceed the limit of {}",
                lsegs.len(),
                wire::MAX_DESCS
            )));
        }
        let wire_descs = if backend == Backend::Tcp {
            wire::encode_segs(&rsegs)
        } else {
            Vec::new()
        };
        let local_dev = local.as_slice().first().map_or(0, |d| d.dev);
        if local.kind() == MemKind::Vram && local.as_slice().iter().any(|d| d.dev != local_dev) {
            return Err(Error::Invalid(
                "the local descriptors of one transfer must be on one GPU".into(),
            ));
        }
        // This side's GPU descriptors: the backend moves a host staging buffer in their place
        // (CUDA IPC copies them where they are).
        #[cfg(feature = "cuda")]
        let staging = if local.kind() == MemKind::Vram && backend != Backend::CudaIpc {
            let dev = local_dev;
            let pieces = lsegs
                .iter()
                .map(|s| crate::gpu::Piece {
                    kind: MemKind::Vram,
                    dev,
                    addr: s.addr,
                    off: 0,
                    len: s.len as usize,
                })
                .collect();
            let s = crate::gpu::Staging::new(pieces)?;
            lsegs = s.segs();
            Some(s)
        } else {
            None
        };
        #[cfg(not(feature = "cuda"))]
        let staging = None;
        // CUDA IPC: the peer's allocations are mapped and every copy worked out now, so that a
        // post only launches them.
        let ipc_pairs = if backend == Backend::CudaIpc {
            crate::gpu::ipc_pairs(&r, op, &lsegs, &rsegs, &rregs, local_dev)?
        } else {
            Vec::new()
        };
        Ok(XferHandle {
            st: Arc::new(XferShared {
                op,
                backend,
                remote: r,
                local: lsegs,
                remote_segs: rsegs,
                remote_regions: rregs,
                local_dev,
                total,
                wire_descs,
                state: IDLE.into(),
                cancel: false.into(),
                wire_id: 0.into(),
                notif: Mutex::new(None),
                err: Mutex::new(None),
                posted_at: Mutex::new(None),
                duration: Mutex::new(Duration::ZERO),
                posts: 0.into(),
                lock: Mutex::new(()),
                cv: Condvar::new(),
                notify: tokio::sync::Notify::new(),
                agent: Arc::downgrade(&self.inner),
                staging,
                ipc_pairs,
                ipc_pending: Mutex::new(None),
            }),
        })
    }

    /// Sends a notification on its own (no transfer) to `remote`, over TCP.
    pub fn send_notif(&self, remote: &str, msg: &[u8]) -> Result<()> {
        if msg.len() > wire::MAX_NOTIF {
            return Err(Error::Invalid("notification too large".into()));
        }
        let r = self.remote(remote)?;
        r.conn(&self.inner)?.send_notif(msg.to_vec())
    }

    /// Takes every notification received so far.
    pub fn get_notifs(&self) -> Vec<Notif> {
        self.inner.notifs.lock().drain(..).collect()
    }

    /// Waits up to `timeout` for a notification.
    pub fn wait_notif(&self, timeout: Duration) -> Option<Notif> {
        let deadline = std::time::Instant::now() + timeout;
        let mut g = self.inner.notifs.lock();
        loop {
            if let Some(n) = g.pop_front() {
                return Some(n);
            }
            if self.inner.notif_cv.wait_until(&mut g, deadline).timed_out() {
                return g.pop_front();
            }
        }
    }

    /// Waits (async) for the next notification.
    pub async fn recv_notif(&self) -> Notif {
        loop {
            let n = self.inner.notif_async.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if let Some(x) = self.inner.notifs.lock().pop_front() {
                return x;
            }
            n.await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Release);
        for (_, r) in self.inner.remotes.write().drain() {
            if let Some(c) = r.conn.lock().take() {
                c.close();
            }
        }
        if let Some(w) = &self.inner.shm {
            w.stop();
        }
        if let Some(u) = self.inner.ucx.get() {
            u.stop();
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn random_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u64::from_le_bytes(b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    xxhash_rust::xxh3::xxh3_64(
        &[t.to_le_bytes(), (std::process::id() as u64).to_le_bytes()].concat(),
    )
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

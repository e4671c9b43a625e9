//! `kvmesh.TransferAgent`: a kvtransfer agent driven from Python (the GIL released while it waits).
//!
//! An agent registers memory, serves its metadata on a small TCP side channel, connects to peers
//! by address and moves bytes between its registered memory and theirs with batched READs and
//! WRITEs, each optionally carrying a notification the peer receives once the data is visible.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use pyo3::exceptions::{PyConnectionError, PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use kvtransfer::{
    Agent, AgentConfig, Backend, DescList, Error, MemKind, Op, XferHandle, XferStatus,
};

fn err(e: Error) -> PyErr {
    match e {
        Error::Invalid(m) => PyValueError::new_err(m),
        e @ (Error::Timeout { .. } | Error::Io(_) | Error::Peer { .. }) => {
            PyConnectionError::new_err(e.to_string())
        }
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

fn backend(name: Option<&str>) -> PyResult<Option<Backend>> {
    Ok(match name {
        None | Some("auto") => None,
        Some("tcp") => Some(Backend::Tcp),
        Some("shm") => Some(Backend::Shm),
        Some("ucx") => Some(Backend::Ucx),
        Some("cuda_ipc") => Some(Backend::CudaIpc),
        Some(other) => {
            return Err(PyValueError::new_err(format!(
                "unknown backend {other:?} (auto, tcp, shm, ucx or cuda_ipc)"
            )))
        }
    })
}

fn resolve(host: &str, port: u16) -> PyResult<SocketAddr> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| PyConnectionError::new_err(format!("resolving {host}:{port}: {e}")))?
        .next()
        .ok_or_else(|| PyConnectionError::new_err(format!("{host}:{port} has no address")))
}

fn parse_op(op: &str) -> PyResult<Op> {
    match op {
        "read" => Ok(Op::Read),
        "write" => Ok(Op::Write),
        o => Err(PyValueError::new_err(format!("op {o:?}: read or write"))),
    }
}

/// Host memory (`None`) or memory of GPU `Some(ordinal)`.
fn mem_kind(gpu: Option<u32>) -> (MemKind, u32) {
    match gpu {
        Some(dev) => (MemKind::Vram, dev),
        None => (MemKind::Dram, 0),
    }
}

/// Per-layer `(base, block_stride)` pairs and the page size: descriptors of whole blocks.
fn block_descs(layers: &[(u64, u64)], page: u64, ids: &[u64], gpu: Option<u32>) -> DescList {
    let (kind, dev) = mem_kind(gpu);
    let mut d = DescList::with_capacity(kind, layers.len() * ids.len());
    for &(base, stride) in layers {
        for &b in ids {
            d.push(base + b * stride, page, dev);
        }
    }
    d
}

/// A kvtransfer agent.
#[pyclass(module = "kvmesh", frozen)]
pub struct TransferAgent {
    agent: Agent,
}

/// A posted transfer.
#[pyclass(module = "kvmesh", frozen)]
pub struct Transfer {
    handle: XferHandle,
}

#[pymethods]
impl Transfer {
    /// `"pending"`, `"done"`, `"cancelled"` or `"failed: <why>"`.
    fn status(&self) -> String {
        match self.handle.status() {
            XferStatus::Idle => "idle".into(),
            XferStatus::Pending => "pending".into(),
            XferStatus::Done => "done".into(),
            XferStatus::Cancelled => "cancelled".into(),
            XferStatus::Failed(e) => format!("failed: {e}"),
        }
    }

    /// Waits up to `timeout_s` for the transfer; returns the bytes moved, raises if it failed or
    /// timed out.
    fn wait(&self, py: Python<'_>, timeout_s: f64) -> PyResult<u64> {
        let t = Duration::from_secs_f64(timeout_s.max(0.0));
        match py.detach(|| self.handle.wait_timeout(t)) {
            Ok(s) => Ok(s.bytes),
            Err(Error::Busy) => Err(PyTimeoutError::new_err(format!(
                "transfer not finished after {timeout_s} s"
            ))),
            Err(e) => Err(err(e)),
        }
    }

    /// Cancels the transfer (the destination's bytes are then unspecified).
    fn cancel(&self) {
        self.handle.cancel()
    }

    /// The backend that moves the bytes (`"tcp"`, `"shm"`, `"ucx"` or `"cuda_ipc"`).
    #[getter]
    fn backend(&self) -> &'static str {
        self.handle.stats().backend.name()
    }
}

impl TransferAgent {
    /// Prepares and posts one transfer (called with the GIL released).
    fn post(
        &self,
        op: Op,
        local: &DescList,
        remote: &str,
        remote_descs: &DescList,
        notif: Option<Vec<u8>>,
        backend: Option<Backend>,
    ) -> PyResult<Transfer> {
        let h = self
            .agent
            .prepare(op, local, remote, remote_descs, backend)
            .map_err(err)?;
        h.post(notif.as_deref()).map_err(err)?;
        Ok(Transfer { handle: h })
    }
}

#[pymethods]
impl TransferAgent {
    /// An agent named `name` (unique among its peers) serving its side channel on `listen`
    /// (`"HOST:PORT"`, port 0 for any) and telling peers to reach it at `advertise` (an IP) when
    /// that differs from the bound address. A peer making no progress for `timeout_s` fails
    /// the transfers in flight on it.
    #[new]
    #[pyo3(signature = (name, listen="127.0.0.1:0", advertise=None, timeout_s=10.0, shm=true, ucx=false))]
    fn new(
        py: Python<'_>,
        name: String,
        listen: &str,
        advertise: Option<&str>,
        timeout_s: f64,
        shm: bool,
        ucx: bool,
    ) -> PyResult<Self> {
        let mut cfg = AgentConfig::new(name);
        cfg.listen = listen
            .parse()
            .map_err(|e| PyValueError::new_err(format!("listen address {listen:?}: {e}")))?;
        cfg.advertise = match advertise {
            Some(a) => Some(
                a.parse()
                    .map_err(|e| PyValueError::new_err(format!("advertise address {a:?}: {e}")))?,
            ),
            None => None,
        };
        cfg.timeout = Duration::from_secs_f64(timeout_s.max(0.001));
        cfg.shm = shm;
        cfg.ucx = ucx;
        let agent = py.detach(|| Agent::new(cfg)).map_err(err)?;
        Ok(TransferAgent { agent })
    }

    #[getter]
    fn name(&self) -> String {
        self.agent.name().to_string()
    }

    /// `(host, port)` of the side channel as peers should use it.
    #[getter]
    fn address(&self) -> (String, u16) {
        let a = self
            .agent
            .metadata()
            .tcp_addrs
            .first()
            .copied()
            .unwrap_or_else(|| self.agent.listen_addr());
        (a.ip().to_string(), a.port())
    }

    /// Registers `length` bytes of this process's memory at `address` for peers to read and
    /// write, or of GPU `gpu` (an ordinal; moved over TCP through host staging). The memory
    /// must stay valid until the agent is dropped.
    #[pyo3(signature = (address, length, gpu=None))]
    fn register(&self, address: u64, length: u64, gpu: Option<u32>) -> PyResult<u32> {
        let (kind, dev) = mem_kind(gpu);
        // SAFETY: the caller's contract (documented above): the region stays valid memory of
        // this process for the agent's lifetime.
        let id = unsafe { self.agent.register_raw(address, length, kind, dev) }.map_err(err)?;
        Ok(id.0)
    }

    /// Fetches the metadata of the agent serving `host:port` and loads it; returns its name.
    fn connect(&self, py: Python<'_>, host: &str, port: u16) -> PyResult<String> {
        let addr = resolve(host, port)?;
        py.detach(|| self.agent.connect(addr)).map_err(err)
    }

    /// Reads (`op="read"`: remote into local) or writes (`op="write"`) whole KV blocks:
    /// `local_layers` and `remote_layers` are `(base, block_stride)` per layer, `page_bytes` the
    /// bytes of one block of one layer, and block `local_ids[i]` pairs with `remote_ids[i]`. The
    /// peer gets `notif` once the data is visible. `local_gpu`/`remote_gpu` name the GPU holding
    /// that side's pages (None: host memory). Returns the posted transfer.
    #[pyo3(signature = (op, remote, local_layers, remote_layers, page_bytes, local_ids, remote_ids, notif=None, backend=None, local_gpu=None, remote_gpu=None))]
    #[allow(clippy::too_many_arguments)]
    fn transfer_blocks(
        &self,
        py: Python<'_>,
        op: &str,
        remote: &str,
        local_layers: Vec<(u64, u64)>,
        remote_layers: Vec<(u64, u64)>,
        page_bytes: u64,
        local_ids: Vec<u64>,
        remote_ids: Vec<u64>,
        notif: Option<Vec<u8>>,
        backend: Option<&str>,
        local_gpu: Option<u32>,
        remote_gpu: Option<u32>,
    ) -> PyResult<Transfer> {
        let op = parse_op(op)?;
        if local_layers.len() != remote_layers.len() {
            return Err(PyValueError::new_err(format!(
                "{} local layers against {} remote ones",
                local_layers.len(),
                remote_layers.len()
            )));
        }
        if local_ids.len() != remote_ids.len() {
            return Err(PyValueError::new_err(format!(
                "{} local blocks against {} remote ones",
                local_ids.len(),
                remote_ids.len()
            )));
        }
        let backend = self::backend(backend)?;
        py.detach(|| {
            let local = block_descs(&local_layers, page_bytes, &local_ids, local_gpu);
            let rem = block_descs(&remote_layers, page_bytes, &remote_ids, remote_gpu);
            self.post(op, &local, remote, &rem, notif, backend)
        })
    }

    /// Reads (`op="read"`: remote into local) or writes (`op="write"`) `local[i]` against
    /// `remote[i]`, each an `(address, length)` pair of registered memory of equal lengths. The
    /// peer gets `notif` once the data is visible. `local_gpu`/`remote_gpu` as for
    /// `transfer_blocks`. Returns the posted transfer.
    #[pyo3(signature = (op, remote, local, remote_regions, notif=None, backend=None, local_gpu=None, remote_gpu=None))]
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &self,
        py: Python<'_>,
        op: &str,
        remote: &str,
        local: Vec<(u64, u64)>,
        remote_regions: Vec<(u64, u64)>,
        notif: Option<Vec<u8>>,
        backend: Option<&str>,
        local_gpu: Option<u32>,
        remote_gpu: Option<u32>,
    ) -> PyResult<Transfer> {
        let op = parse_op(op)?;
        if local.len() != remote_regions.len() {
            return Err(PyValueError::new_err(format!(
                "{} local regions against {} remote ones",
                local.len(),
                remote_regions.len()
            )));
        }
        let backend = self::backend(backend)?;
        py.detach(|| {
            let ((lk, ld), (rk, rd)) = (mem_kind(local_gpu), mem_kind(remote_gpu));
            let mut l = DescList::with_capacity(lk, local.len());
            let mut r = DescList::with_capacity(rk, local.len());
            for (&(la, ll), &(ra, rl)) in local.iter().zip(&remote_regions) {
                l.push(la, ll, ld);
                r.push(ra, rl, rd);
            }
            self.post(op, &l, remote, &r, notif, backend)
        })
    }

    /// Waits up to `timeout_s` for the next notification; `(from_agent, message)` or `None`.
    fn wait_notif<'py>(
        &self,
        py: Python<'py>,
        timeout_s: f64,
    ) -> Option<(String, Bound<'py, PyBytes>)> {
        let t = Duration::from_secs_f64(timeout_s.max(0.0));
        py.detach(|| self.agent.wait_notif(t))
            .map(|n| (n.from, PyBytes::new(py, &n.msg)))
    }

    /// Sends `msg` to `remote` on its own (no data).
    fn send_notif(&self, py: Python<'_>, remote: &str, msg: Vec<u8>) -> PyResult<()> {
        py.detach(|| self.agent.send_notif(remote, &msg))
            .map_err(err)
    }

    /// Every notification received so far, as `(from_agent, message)`.
    fn get_notifs<'py>(&self, py: Python<'py>) -> Vec<(String, Bound<'py, PyBytes>)> {
        self.agent
            .get_notifs()
            .into_iter()
            .map(|n| (n.from, PyBytes::new(py, &n.msg)))
            .collect()
    }
}

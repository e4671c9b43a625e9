//! Without the `cuda` feature no transfer touches GPU memory: staging cannot exist, and no GPU
//! memory is mapped from other processes.

use std::sync::Arc;

use crate::agent::Inner;
use crate::error::{Error, Result};
use crate::xfer::{Seg, XferShared};

/// No GPU region is exported without the `cuda` feature.
pub(crate) fn ipc_export(_addr: u64, _dev: u32) -> Vec<u8> {
    Vec::new()
}

/// What every CUDA IPC step says without the `cuda` feature.
fn no_cuda() -> Error {
    Error::Unavailable {
        backend: "cuda_ipc",
        msg: "GPU memory transfers need kvtransfer's cuda feature".into(),
    }
}

/// Nothing is mapped without the `cuda` feature.
#[derive(Default)]
pub(crate) struct IpcMaps;

/// Never exists without the `cuda` feature.
pub(crate) enum IpcPending {}

/// Nothing is ever launched without the `cuda` feature.
pub(crate) fn abandon_ipc(_x: &XferShared) {}

/// Never chosen without the `cuda` feature (`prepare` refuses it).
pub(crate) fn ipc_pairs(
    _r: &crate::agent::Remote,
    _op: crate::xfer::Op,
    _local: &[Seg],
    _remote: &[Seg],
    _regions: &[u32],
    _local_dev: u32,
) -> Result<Vec<(u64, u64, usize)>> {
    Err(no_cuda())
}

/// Never chosen without the `cuda` feature (`prepare` refuses it).
pub(crate) fn launch_ipc(_x: &XferShared) -> Result<Option<IpcPending>> {
    Err(no_cuda())
}

/// Never chosen without the `cuda` feature (`prepare` refuses it).
pub(crate) fn run_ipc(_inner: &Arc<Inner>, _x: &XferShared) -> Result<()> {
    Err(no_cuda())
}

/// Never constructed without the `cuda` feature.
pub(crate) enum Staging {}

impl Staging {
    pub fn seg(&self) -> Seg {
        match *self {}
    }

    pub fn gather(&self) -> Result<()> {
        match *self {}
    }

    pub fn scatter(&self) -> Result<()> {
        match *self {}
    }
}

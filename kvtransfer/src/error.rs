use std::time::Duration;

/// Errors of kvtransfer. Cloneable: one failure is reported to every waiter of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("unknown remote agent {0:?}: load its metadata first")]
    UnknownAgent(String),
    #[error("malformed agent metadata: {0}")]
    Metadata(String),
    #[error("descriptor {index} ({addr:#x} + {len} bytes) lies outside every memory region {agent:?} registered")]
    OutOfRegion {
        agent: String,
        index: usize,
        addr: u64,
        len: u64,
    },
    #[error("peer {peer:?}: {msg}")]
    Peer { peer: String, msg: String },
    #[error("no progress from peer {peer:?} for {after:?}: transfer failed")]
    Timeout { peer: String, after: Duration },
    #[error("transfer cancelled")]
    Cancelled,
    #[error("transfer still in progress")]
    Busy,
    #[error("backend {backend} is not available: {msg}")]
    Unavailable { backend: &'static str, msg: String },
    #[error("i/o error: {0}")]
    Io(String),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn peer_err(peer: &str, msg: impl std::fmt::Display) -> Error {
    Error::Peer {
        peer: peer.to_string(),
        msg: msg.to_string(),
    }
}

//! The one error type of kvindex.

/// Everything that can go wrong in kvindex. Messages are lower case; numbers are fields.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// A KV-event payload is not a valid vLLM event batch.
    #[error("malformed kv-event batch at byte {offset}: {reason}")]
    Decode { offset: usize, reason: &'static str },
    /// A hash algorithm name vLLM does not have.
    #[error("unknown prefix-caching hash algorithm {0:?}")]
    UnknownHashAlgo(String),
    /// vLLM's pickle-based hashes cannot be reproduced outside CPython when extra keys are present.
    #[error("pickle-based vLLM hashes with extra keys are not reproducible; use sha256_cbor")]
    PickleExtraKeys,
    /// A query or an event refers to an engine the index does not know.
    #[error("unknown engine {0:?}")]
    UnknownEngine(String),
    /// The index cannot hold more engines.
    #[error("too many engines (limit {limit})")]
    TooManyEngines { limit: usize },
    /// A caller passed an argument that cannot be used.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A ZMQ socket failed.
    #[error("zmq: {0}")]
    Zmq(String),
    /// The Redis backend failed.
    #[error("redis: {0}")]
    Redis(String),
    /// A snapshot could not be written, read or trusted.
    #[error("snapshot: {0}")]
    Snapshot(String),
}

/// A coarse classification of [`IndexError`], for C and Python bindings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorKind {
    Decode = 1,
    InvalidArgument = 2,
    UnknownEngine = 3,
    Capacity = 4,
    Io = 5,
}

impl IndexError {
    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            IndexError::Decode { .. } => ErrorKind::Decode,
            IndexError::UnknownHashAlgo(_)
            | IndexError::PickleExtraKeys
            | IndexError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            IndexError::UnknownEngine(_) => ErrorKind::UnknownEngine,
            IndexError::TooManyEngines { .. } => ErrorKind::Capacity,
            IndexError::Zmq(_) | IndexError::Redis(_) | IndexError::Snapshot(_) => ErrorKind::Io,
        }
    }
}

/// Result alias for kvindex.
pub type Result<T, E = IndexError> = std::result::Result<T, E>;

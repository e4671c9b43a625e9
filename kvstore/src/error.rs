//! Errors of every tier. Bad input, dead peers, full disks and corrupt data are errors, never
//! panics; a block that cannot be proven intact is never returned.

use kvindex::BlockKey;

/// Result of kvstore operations.
pub type Result<T> = std::result::Result<T, StoreError>;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A caller's argument is not acceptable (wrong block length, zero capacity, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Every slot of a tier is pinned (being read or transferred), so nothing can be evicted.
    #[error("{tier} tier is full and every block in it is pinned")]
    AllPinned { tier: &'static str },
    /// The file system has no room left (ENOSPC or the file-size limit).
    #[error("disk tier at {path} is out of space: {source}")]
    DiskFull {
        path: String,
        source: std::io::Error,
    },
    /// The disk tier was opened on a read-only directory: it serves reads only.
    #[error("disk tier at {0} is read-only (the directory or file system refuses writes)")]
    ReadOnly(String),
    /// O_DIRECT was required but the file system does not honour it.
    #[error("O_DIRECT is not available on {path}: {reason}")]
    DirectIoUnavailable { path: String, reason: String },
    /// An I/O error, with what was being done.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// Stored bytes failed verification (checksum, key, length or format); the block was dropped.
    #[error("block {key:016x} is corrupt on the {tier} tier: {reason}")]
    Corrupt {
        tier: &'static str,
        key: u64,
        reason: String,
    },
    /// The files of a disk tier were written with another format or geometry.
    #[error("disk tier at {path} is incompatible: {reason}")]
    Incompatible { path: String, reason: String },
    /// A remote tier (Redis, peer) failed after its retries.
    #[error("remote {tier} failed: {reason}")]
    Remote { tier: String, reason: String },
    /// A remote operation ran past its timeout.
    #[error("remote {tier} timed out after {ms} ms")]
    Timeout { tier: String, ms: u64 },
    /// A deadline (prefetch, onboard) passed before the block arrived.
    #[error("deadline passed before block {0:016x} was loaded")]
    Deadline(u64),
    /// The write-behind queue is full (only from the non-blocking calls).
    #[error("write-behind queue is full")]
    Busy,
    /// The store is shutting down.
    #[error("the store is closed")]
    Closed,
    /// The error of a load shared by several requests of one block (single-flight).
    #[error("{0}")]
    Shared(std::sync::Arc<StoreError>),
}

impl StoreError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn corrupt(tier: &'static str, key: BlockKey, reason: impl Into<String>) -> Self {
        StoreError::Corrupt {
            tier,
            key: key.0,
            reason: reason.into(),
        }
    }

    /// A short, stable name of the error's kind (for the C ABI and Python exceptions).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Invalid(_) => "invalid",
            StoreError::AllPinned { .. } => "all_pinned",
            StoreError::DiskFull { .. } => "disk_full",
            StoreError::ReadOnly(_) => "read_only",
            StoreError::DirectIoUnavailable { .. } => "direct_io_unavailable",
            StoreError::Io { .. } => "io",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::Incompatible { .. } => "incompatible",
            StoreError::Remote { .. } => "remote",
            StoreError::Timeout { .. } => "timeout",
            StoreError::Deadline(_) => "deadline",
            StoreError::Busy => "busy",
            StoreError::Closed => "closed",
            StoreError::Shared(e) => e.kind(),
        }
    }
}

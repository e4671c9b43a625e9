//! The crate's one error type.

/// What went wrong, coarsely: the C and Python layers map this, not the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No driver, no device, or no NVRTC: the GPU path cannot run on this machine.
    Unavailable,
    /// The caller passed something unusable (bad pointer, out-of-range block, bad geometry).
    InvalidArgument,
    /// GPU or pinned host memory could not be allocated.
    OutOfMemory,
    /// A CUDA driver call failed (including faults reported when a transfer completes).
    Driver,
}

/// Errors of the CUDA copy engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// The CUDA driver library (libcuda) could not be loaded or initialised.
    #[error("no CUDA driver: {reason}")]
    NoDriver { reason: String },
    /// The driver loaded but there is no device with this ordinal.
    #[error("no CUDA device with ordinal {ordinal} ({count} devices present)")]
    NoDevice { ordinal: usize, count: usize },
    /// NVRTC could not be loaded, or the kernels failed to compile.
    #[error("nvrtc: {message}")]
    Nvrtc { message: String },
    /// A driver call returned an error code.
    #[error("{call} failed: {name} (CUresult {code})")]
    Driver {
        call: &'static str,
        code: u32,
        name: String,
    },
    /// An allocation failed for lack of memory.
    #[error("out of {what} memory allocating {bytes} bytes")]
    OutOfMemory { what: &'static str, bytes: usize },
    /// A pointer given to the engine does not name memory it can use.
    #[error("invalid pointer {ptr:#x} for {what}: {reason}")]
    InvalidPointer {
        what: &'static str,
        ptr: u64,
        reason: String,
    },
    /// The geometry of a cache or of host slots is unusable.
    #[error("invalid layout: {reason}")]
    InvalidLayout { reason: String },
    /// A block id outside the registered cache.
    #[error("block {block} out of range: the cache has {num_blocks} blocks")]
    BlockOutOfRange { block: u32, num_blocks: u32 },
    /// A host slot outside the host buffer.
    #[error("slot {slot} out of range: the host buffer has {num_slots} slots")]
    SlotOutOfRange { slot: u32, num_slots: u32 },
    /// Two moves of one transfer would write the same destination.
    #[error("destination {index} appears twice in one transfer")]
    DuplicateDestination { index: u32 },
    /// A transfer's moves do not fit one launch.
    #[error("transfer too large: {bytes} bytes in one call")]
    TooLarge { bytes: u64 },
}

impl CudaError {
    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CudaError::NoDriver { .. } | CudaError::NoDevice { .. } | CudaError::Nvrtc { .. } => {
                ErrorKind::Unavailable
            }
            CudaError::Driver { .. } => ErrorKind::Driver,
            CudaError::OutOfMemory { .. } => ErrorKind::OutOfMemory,
            CudaError::InvalidPointer { .. }
            | CudaError::InvalidLayout { .. }
            | CudaError::BlockOutOfRange { .. }
            | CudaError::SlotOutOfRange { .. }
            | CudaError::DuplicateDestination { .. }
            | CudaError::TooLarge { .. } => ErrorKind::InvalidArgument,
        }
    }
}

/// Result with [`CudaError`].
pub type Result<T, E = CudaError> = std::result::Result<T, E>;

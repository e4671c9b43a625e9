//! The kvmesh C ABI.
//!
//! Not built yet: this crate holds the place of the C ABI (index, store and transfer handles) in
//! the workspace layout. It exports nothing until that work lands.
#![forbid(unsafe_code)]

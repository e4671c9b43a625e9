//! kvstore: tiered offload of KV blocks to host memory, local disk and remote stores.
//!
//! Not built yet: this crate holds the place of the tiered store in the workspace layout. It
//! exports nothing until that work lands.
#![forbid(unsafe_code)]

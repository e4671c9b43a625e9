//! kvtransfer: NIXL-style movement of KV blocks between engines and tiers.
//!
//! Not built yet: this crate holds the place of the transfer engine in the workspace layout
//! (agents, memory registration, descriptor lists, UCX/TCP/shared-memory backends). It exports
//! nothing until that work lands.
#![forbid(unsafe_code)]

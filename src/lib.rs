//! kvmesh: KV-cache infrastructure for distributed LLM inference.
//!
//! The libraries hold the logic ([`kvindex`] for the global block index); this crate is the
//! `kvmesh` command, its daemon ([`serve`]) and the client schedulers use to talk to it
//! ([`client`]).

pub mod client;
pub mod serve;

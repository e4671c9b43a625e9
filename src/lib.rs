//! kvmesh: KV-cache infrastructure for distributed LLM inference.
//!
//! The libraries hold the logic ([`kvindex`] for the global block index); this crate is the
//! `kvmesh` command and the client schedulers use to talk to its daemon ([`client`]).

pub mod client;

//! Agent metadata: what a peer needs to reach an agent and address its registered memory,
//! encoded as a versioned, checksummed byte blob.
//!
//! Layout (little endian): `b"KVTM"`, version `u16`, then the fields of [`AgentMetadata`] in
//! order (strings and byte strings as `u32` length + bytes), then an xxh3-64 of everything before.

use std::net::SocketAddr;

use crate::desc::MemKind;
use crate::error::{Error, Result};
use crate::mem::RegionTable;

pub const METADATA_VERSION: u16 = 2;
const MAGIC: &[u8; 4] = b"KVTM";
const MAX_BLOB: usize = 64 << 20;

/// One registered region as peers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionMeta {
    pub id: u32,
    pub addr: u64,
    pub len: u64,
    pub kind: MemKind,
    pub dev: u32,
    /// UCX remote key (packed), empty when UCX is not in use.
    pub ucx_rkey: Vec<u8>,
    /// For GPU memory: the CUDA IPC handle of the device allocation holding the region (64
    /// bytes) and that allocation's start address (u64 LE), so a process on the same host can
    /// map it; empty otherwise, or when the driver would not export it.
    pub ipc: Vec<u8>,
}

/// Bytes of a CUDA IPC handle.
const IPC_HANDLE: usize = 64;

/// The [`RegionMeta::ipc`] bytes for an allocation's `handle` and start address `base`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn ipc_bytes(handle: &[u8; IPC_HANDLE], base: u64) -> Vec<u8> {
    let mut v = handle.to_vec();
    v.extend_from_slice(&base.to_le_bytes());
    v
}

impl RegionMeta {
    /// The CUDA IPC handle of the region's allocation and the allocation's start address, when
    /// it was exported.
    pub fn ipc_handle(&self) -> Option<(&[u8], u64)> {
        if self.ipc.len() != IPC_HANDLE + 8 {
            return None;
        }
        let (handle, base) = self.ipc.split_at(IPC_HANDLE);
        Some((handle, u64::from_le_bytes(base.try_into().ok()?)))
    }
}

/// Decoded metadata of an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentMetadata {
    pub name: String,
    /// Random per agent instance: a restarted agent has a new one.
    pub instance: u64,
    pub pid: u32,
    /// Start time of `pid` (clock ticks since boot, /proc/PID/stat field 22): guards against a
    /// reused pid.
    pub pid_start: u64,
    /// The host's boot id: agents on the same host (and boot) may use the shared-memory backend.
    pub boot_id: String,
    /// Where the agent's TCP listener (side channel and TCP backend) can be reached.
    pub tcp_addrs: Vec<SocketAddr>,
    pub regions: Vec<RegionMeta>,
    /// The agent's UCP worker address, empty when UCX is not in use.
    pub ucx_worker: Vec<u8>,
}

impl AgentMetadata {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(128 + self.regions.len() * 40 + self.ucx_worker.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&METADATA_VERSION.to_le_bytes());
        put_bytes(&mut b, self.name.as_bytes());
        b.extend_from_slice(&self.instance.to_le_bytes());
        b.extend_from_slice(&self.pid.to_le_bytes());
        b.extend_from_slice(&self.pid_start.to_le_bytes());
        put_bytes(&mut b, self.boot_id.as_bytes());
        b.extend_from_slice(&(self.tcp_addrs.len() as u32).to_le_bytes());
        for a in &self.tcp_addrs {
            put_bytes(&mut b, a.to_string().as_bytes());
        }
        b.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for r in &self.regions {
            b.extend_from_slice(&r.id.to_le_bytes());
            b.extend_from_slice(&r.addr.to_le_bytes());
            b.extend_from_slice(&r.len.to_le_bytes());
            b.push(r.kind as u8);
            b.extend_from_slice(&r.dev.to_le_bytes());
            put_bytes(&mut b, &r.ucx_rkey);
            put_bytes(&mut b, &r.ipc);
        }
        put_bytes(&mut b, &self.ucx_worker);
        let sum = xxhash_rust::xxh3::xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    pub fn decode(blob: &[u8]) -> Result<AgentMetadata> {
        let bad = |m: &str| Error::Metadata(m.to_string());
        if blob.len() > MAX_BLOB {
            return Err(bad("blob larger than 64 MiB"));
        }
        if blob.len() < 4 + 2 + 8 || &blob[..4] != MAGIC {
            return Err(bad("not kvtransfer agent metadata (bad magic)"));
        }
        let version = u16::from_le_bytes([blob[4], blob[5]]);
        if version != METADATA_VERSION {
            return Err(Error::Metadata(format!(
                "metadata version {version} is not supported (this build reads version {METADATA_VERSION})"
            )));
        }
        let (body, sum) = blob.split_at(blob.len() - 8);
        let want = u64::from_le_bytes(sum.try_into().expect("8 bytes"));
        if xxhash_rust::xxh3::xxh3_64(body) != want {
            return Err(bad("checksum mismatch (truncated or damaged blob)"));
        }
        let mut r = Reader { b: body, at: 6 };
        let name = r.string()?;
        if name.is_empty() {
            return Err(bad("empty agent name"));
        }
        let instance = r.u64()?;
        let pid = r.u32()?;
        let pid_start = r.u64()?;
        let boot_id = r.string()?;
        let n = r.u32()? as usize;
        if n > 64 {
            return Err(bad("too many addresses"));
        }
        let mut tcp_addrs = Vec::with_capacity(n);
        for _ in 0..n {
            let s = r.string()?;
            tcp_addrs.push(
                s.parse()
                    .map_err(|_| Error::Metadata(format!("bad socket address {s:?}")))?,
            );
        }
        let n = r.u32()? as usize;
        if n > r.remaining() / 33 {
            return Err(bad("region count larger than the blob"));
        }
        let mut regions = Vec::with_capacity(n);
        for _ in 0..n {
            let id = r.u32()?;
            let addr = r.u64()?;
            let len = r.u64()?;
            let kind = MemKind::from_u8(r.u8()?).ok_or_else(|| bad("unknown memory kind"))?;
            let dev = r.u32()?;
            let ucx_rkey = r.bytes()?.to_vec();
            let ipc = r.bytes()?.to_vec();
            if !ipc.is_empty() && ipc.len() != IPC_HANDLE + 8 {
                return Err(bad(
                    "a CUDA IPC export has 72 bytes (handle, then allocation start)",
                ));
            }
            if addr.checked_add(len).is_none() {
                return Err(bad("region wraps the address space"));
            }
            regions.push(RegionMeta {
                id,
                addr,
                len,
                kind,
                dev,
                ucx_rkey,
                ipc,
            });
        }
        let ucx_worker = r.bytes()?.to_vec();
        if r.remaining() != 0 {
            return Err(bad("trailing bytes"));
        }
        Ok(AgentMetadata {
            name,
            instance,
            pid,
            pid_start,
            boot_id,
            tcp_addrs,
            regions,
            ucx_worker,
        })
    }

    pub(crate) fn region_table(&self) -> Result<RegionTable> {
        let mut t = RegionTable::default();
        for r in &self.regions {
            t.insert(r.addr, r.len, r.id, r.kind, r.dev)
                .map_err(|e| Error::Metadata(format!("region {}: {e}", r.id)))?;
        }
        Ok(t)
    }
}

fn put_bytes(b: &mut Vec<u8>, s: &[u8]) {
    b.extend_from_slice(&(s.len() as u32).to_le_bytes());
    b.extend_from_slice(s);
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.at
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(Error::Metadata("truncated".into()));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| Error::Metadata("string is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AgentMetadata {
        AgentMetadata {
            name: "prefill-0".into(),
            instance: 0x1234_5678_9abc,
            pid: 42,
            pid_start: 777,
            boot_id: "b0".into(),
            tcp_addrs: vec![
                "127.0.0.1:5000".parse().unwrap(),
                "[::1]:6000".parse().unwrap(),
            ],
            regions: vec![RegionMeta {
                id: 3,
                addr: 0x7f00_0000_0000,
                len: 1 << 20,
                kind: MemKind::Dram,
                dev: 0,
                ucx_rkey: vec![9, 8, 7],
                ipc: vec![5; 72],
            }],
            ucx_worker: vec![1, 2, 3, 4],
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(AgentMetadata::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused() {
        let blob = sample().encode();
        for n in 0..blob.len() {
            assert!(
                AgentMetadata::decode(&blob[..n]).is_err(),
                "truncated to {n}"
            );
        }
        for i in 0..blob.len() {
            let mut b = blob.clone();
            b[i] ^= 0x10;
            assert!(AgentMetadata::decode(&b).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn other_version_is_named() {
        let mut blob = sample().encode();
        blob[4] = 9;
        let e = AgentMetadata::decode(&blob).unwrap_err().to_string();
        assert!(e.contains("version 9"), "{e}");
    }
}

//! Snapshots of an in-memory index, so a restarted daemon answers at once instead of empty.
//!
//! A snapshot holds the engines (with their slots, so block memberships keep their meaning),
//! every block-table and alias-table entry, reference counts, and per engine the last sequence
//! number applied, taken under the writer's lock so contents and sequence numbers agree. After a
//! restore, ingestion resumes after those sequence numbers: later batches are replayed from the
//! engines' replay buffers, and an engine that restarted meanwhile is cleared.
//!
//! On disk: `KVMSNAP1`, the payload's length (u64 LE), its XXH3-64 (u64 LE), then the payload
//! (rkyv). Files are written to a temporary name, synced and renamed, so a crash leaves the old
//! snapshot or the new one, never a torn file; a truncated or altered file is refused.

use std::io::Write;
use std::path::Path;

use rkyv::{Archive, Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::{IndexError, Result};

/// One engine in a snapshot.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SnapEngine {
    pub slot: u32,
    pub pod: String,
    pub dp_rank: u32,
    pub model: String,
    /// Tokens per block (0 if not known yet).
    pub block_size: u32,
    pub applied_seq: Option<u64>,
    pub counts: [u64; 4],
}

/// The state of an index.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub engines: Vec<SnapEngine>,
    /// Block-table entries: key, value (engine presence, group, tier, depth, stamp).
    pub blocks: Vec<(u64, u64)>,
    /// Alias-table entries: engine hash (as stored), block key.
    pub aliases: Vec<(u64, u64)>,
    /// Announcements beyond the first: engine slot, key, tier, count.
    pub dups: Vec<(u32, u64, u8, u32)>,
    pub clock: u64,
}

const MAGIC: &[u8; 8] = b"KVMSNAP1";
const HEADER: usize = 24;

fn corrupt(what: impl Into<String>) -> IndexError {
    IndexError::Snapshot(what.into())
}

/// Encodes a snapshot with its header.
pub fn encode(s: &Snapshot) -> Result<Vec<u8>> {
    let payload = rkyv::to_bytes::<rkyv::rancor::Error>(s).map_err(|e| corrupt(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxh3_64(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes and checks a snapshot.
pub fn decode(bytes: &[u8]) -> Result<Snapshot> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(corrupt("not a kvmesh snapshot (bad magic or too short)"));
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().map_err(|_| corrupt("header"))?) as usize;
    let sum = u64::from_le_bytes(bytes[16..24].try_into().map_err(|_| corrupt("header"))?);
    let payload = &bytes[HEADER..];
    if payload.len() != len {
        return Err(corrupt(format!(
            "truncated: {} of {len} payload bytes",
            payload.len()
        )));
    }
    if xxh3_64(payload) != sum {
        return Err(corrupt("checksum mismatch"));
    }
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(payload.len());
    aligned.extend_from_slice(payload);
    rkyv::from_bytes::<Snapshot, rkyv::rancor::Error>(&aligned).map_err(|e| corrupt(e.to_string()))
}

/// Writes a snapshot atomically: a temporary file, synced, renamed over `path`.
pub fn write(path: &Path, s: &Snapshot) -> Result<()> {
    let bytes = encode(s)?;
    let io = |e: std::io::Error| corrupt(format!("writing {}: {e}", path.display()));
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Reads a snapshot file.
pub fn read(path: &Path) -> Result<Snapshot> {
    let bytes =
        std::fs::read(path).map_err(|e| corrupt(format!("reading {}: {e}", path.display())))?;
    decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            engines: vec![SnapEngine {
                slot: 3,
                pod: "p".into(),
                dp_rank: 1,
                model: "m".into(),
                block_size: 16,
                applied_seq: Some(41),
                counts: [1, 0, 0, 0],
            }],
            blocks: vec![(7, 1 << 3)],
            aliases: vec![(99, 7)],
            dups: vec![(3, 7, 0, 1)],
            clock: 5,
        }
    }

    #[test]
    fn round_trip_and_refuse_damage() {
        let s = sample();
        let bytes = encode(&s).unwrap();
        assert_eq!(decode(&bytes).unwrap(), s);
        for cut in [0, 8, HEADER, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(decode(&flipped), Err(IndexError::Snapshot(m)) if m.contains("checksum")));
        let dir = std::env::temp_dir().join(format!("kvindex-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("index.snap");
        write(&path, &s).unwrap();
        assert_eq!(read(&path).unwrap(), s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

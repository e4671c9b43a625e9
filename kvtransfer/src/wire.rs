//! The TCP wire protocol: 24-byte frame headers, then the frame's payload.
//!
//! Header: kind `u8`, status `u8`, 2 bytes zero, `a: u32`, `id: u64`, `len: u64` (little endian).

use std::io::{IoSlice, IoSliceMut};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::xfer::Seg;

pub const HDR: usize = 24;
pub const MAX_NOTIF: usize = 1 << 20;
pub const MAX_DESCS: usize = 1 << 24;
pub const MAX_MSG: usize = 64 << 20;
/// Bytes per DATA frame: cancellation is checked between frames.
pub const CHUNK: u64 = 8 << 20;
const IOV_BATCH: usize = 1024;

/// `a` = protocol version, `id` = instance the initiator expects, payload = initiator's name.
pub const HELLO: u8 = 1;
/// `status` 0 ok; payload = error message.
pub const HELLO_REPLY: u8 = 2;
pub const GET_MD: u8 = 3;
/// payload = metadata blob.
pub const MD: u8 = 4;
/// `a` = descriptor count, `id` = transfer, `len` = payload bytes (descs then notif), `status`
/// bit 0 = has a notification.
pub const WRITE: u8 = 5;
/// `id` = transfer, `len` = data bytes that follow.
pub const DATA: u8 = 6;
/// `id` = transfer, `status` 0 = all data sent, 1 = aborted.
pub const WRITE_END: u8 = 7;
/// `id` = transfer, `status` (ST_*), payload = error message.
pub const ACK: u8 = 8;
/// Same layout as WRITE.
pub const READ: u8 = 9;
/// `id` = transfer, `status` (ST_*), payload = error message.
pub const READ_END: u8 = 10;
/// payload = notification message.
pub const NOTIF: u8 = 11;

pub const PROTO_VERSION: u32 = 1;

pub const ST_OK: u8 = 0;
pub const ST_ERR: u8 = 1;
pub const ST_CANCELLED: u8 = 2;

#[derive(Clone, Copy, Debug)]
pub struct Hdr {
    pub kind: u8,
    pub status: u8,
    pub a: u32,
    pub id: u64,
    pub len: u64,
}

impl Hdr {
    pub fn new(kind: u8, status: u8, a: u32, id: u64, len: u64) -> Hdr {
        Hdr {
            kind,
            status,
            a,
            id,
            len,
        }
    }

    pub fn encode(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0] = self.kind;
        b[1] = self.status;
        b[4..8].copy_from_slice(&self.a.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HDR]) -> Hdr {
        Hdr {
            kind: b[0],
            status: b[1],
            a: u32::from_le_bytes(b[4..8].try_into().expect("4")),
            id: u64::from_le_bytes(b[8..16].try_into().expect("8")),
            len: u64::from_le_bytes(b[16..24].try_into().expect("8")),
        }
    }
}

pub async fn read_hdr<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Hdr> {
    let mut b = [0u8; HDR];
    r.read_exact(&mut b).await?;
    Ok(Hdr::decode(&b))
}

pub async fn read_payload<R: AsyncReadExt + Unpin>(
    r: &mut R,
    len: u64,
    max: usize,
) -> std::io::Result<Vec<u8>> {
    if len as usize > max || len > max as u64 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame payload of {len} bytes exceeds {max}"),
        ));
    }
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v).await?;
    Ok(v)
}

pub async fn write_frame<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    h: Hdr,
    payload: &[&[u8]],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(HDR + payload.iter().map(|p| p.len()).sum::<usize>());
    buf.extend_from_slice(&h.encode());
    for p in payload {
        buf.extend_from_slice(p);
    }
    w.write_all(&buf).await
}

/// Encodes segments as (addr, len) pairs.
pub fn encode_segs(segs: &[Seg]) -> Vec<u8> {
    let mut v = Vec::with_capacity(segs.len() * 16);
    for s in segs {
        v.extend_from_slice(&s.addr.to_le_bytes());
        v.extend_from_slice(&s.len.to_le_bytes());
    }
    v
}

pub fn decode_segs(b: &[u8], n: usize) -> Option<Vec<Seg>> {
    if b.len() < n.checked_mul(16)? {
        return None;
    }
    Some(
        b[..n * 16]
            .chunks_exact(16)
            .map(|c| Seg {
                addr: u64::from_le_bytes(c[..8].try_into().expect("8")),
                len: u64::from_le_bytes(c[8..].try_into().expect("8")),
            })
            .collect(),
    )
}

/// A position inside a list of segments.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cursor {
    pub seg: usize,
    pub off: u64,
}

/// Reads exactly `n` bytes from the socket into `segs` starting at `cur` (advanced), with
/// vectored reads.
///
/// # Safety
/// Every segment must be memory the caller may write for the duration of the call.
pub async unsafe fn read_into_segs(
    r: &mut OwnedReadHalf,
    segs: &[Seg],
    cur: &mut Cursor,
    mut n: u64,
) -> std::io::Result<()> {
    while n > 0 {
        let mut iov: Vec<IoSliceMut<'_>> = Vec::with_capacity(IOV_BATCH.min(segs.len()));
        let mut want = 0u64;
        let (mut s, mut off) = (cur.seg, cur.off);
        while want < n && iov.len() < IOV_BATCH && s < segs.len() {
            let take = (segs[s].len - off).min(n - want);
            // SAFETY: the caller guarantees the segment is writable memory; take stays within it.
            let sl = unsafe {
                std::slice::from_raw_parts_mut((segs[s].addr + off) as *mut u8, take as usize)
            };
            iov.push(IoSliceMut::new(sl));
            want += take;
            off += take;
            if off == segs[s].len {
                s += 1;
                off = 0;
            }
        }
        if want == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "more data than the descriptors hold",
            ));
        }
        let got = loop {
            r.readable().await?;
            match r.try_read_vectored(&mut iov) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed mid-transfer",
                    ))
                }
                Ok(k) => break k as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        advance(segs, cur, got);
        n -= got;
    }
    Ok(())
}

/// Writes `n` bytes of `segs` starting at `cur` (advanced) to the socket, vectored.
///
/// # Safety
/// Every segment must be memory the caller may read for the duration of the call.
pub async unsafe fn write_from_segs(
    w: &mut OwnedWriteHalf,
    segs: &[Seg],
    cur: &mut Cursor,
    mut n: u64,
) -> std::io::Result<()> {
    while n > 0 {
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(IOV_BATCH.min(segs.len()));
        let mut want = 0u64;
        let (mut s, mut off) = (cur.seg, cur.off);
        while want < n && iov.len() < IOV_BATCH && s < segs.len() {
            let take = (segs[s].len - off).min(n - want);
            // SAFETY: the caller guarantees the segment is readable memory; take stays within it.
            let sl = unsafe {
                std::slice::from_raw_parts((segs[s].addr + off) as *const u8, take as usize)
            };
            iov.push(IoSlice::new(sl));
            want += take;
            off += take;
            if off == segs[s].len {
                s += 1;
                off = 0;
            }
        }
        if want == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "ran past the descriptors",
            ));
        }
        let k = w.write_vectored(&iov).await? as u64;
        if k == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "connection closed mid-transfer",
            ));
        }
        advance(segs, cur, k);
        n -= k;
    }
    Ok(())
}

pub fn advance(segs: &[Seg], cur: &mut Cursor, mut k: u64) {
    while k > 0 && cur.seg < segs.len() {
        let left = segs[cur.seg].len - cur.off;
        if k < left {
            cur.off += k;
            return;
        }
        k -= left;
        cur.seg += 1;
        cur.off = 0;
    }
}

/// Discards `n` bytes from the socket.
pub async fn discard<R: AsyncReadExt + Unpin>(r: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    while n > 0 {
        let k = (n as usize).min(buf.len());
        r.read_exact(&mut buf[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

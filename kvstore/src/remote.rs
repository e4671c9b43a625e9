//! Remote tiers: Redis and peer kvstore nodes over TCP.
//!
//! Both carry every block with a small header (magic, format version, key, length, XXH3-64 of the
//! payload) and check it on the way back: a value under the wrong key, of the wrong length or
//! with a bad checksum is an error ([`StoreError::Corrupt`]), never data. Every operation has a
//! timeout; failed operations are retried on a fresh connection a configured number of times and
//! then fail closed ([`StoreError::Remote`] / [`StoreError::Timeout`]): a caller never gets a
//! block it cannot trust, and a dead remote only costs the timeout.
//!
//! The Redis tier speaks RESP2 itself on a `TcpStream` (or Unix socket; the URL, with AUTH and
//! database, is parsed by the `redis` crate): `SET` is one vectored write of the framing and
//! value header from a small buffer and the payload from the caller's slice, and a `GET` reply
//! is read straight into the block it is returned in. A general client copies a large value
//! twice more each way (into the command and its packed form; into the parser's buffer and out
//! of it), which costs more than the checksum pass. A connection that sees anything unexpected
//! (an error reply, a malformed line, a timeout) is dropped, never reused; a value of the wrong
//! size is read past and refused.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvindex::BlockKey;
use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{Result, StoreError};
use crate::stats::{TierCounters, TierStats};

/// A tier reached over the network.
pub trait RemoteTier: Send + Sync {
    /// A name for logs and stats (`redis`, `peer`).
    fn name(&self) -> &'static str;
    /// Stores a block.
    fn put(&self, key: BlockKey, data: &[u8]) -> Result<()>;
    /// Fetches and verifies a block; `Ok(None)` when the remote does not hold it.
    fn get(&self, key: BlockKey) -> Result<Option<Bytes>>;
    /// Whether the remote holds `key`.
    fn contains(&self, key: BlockKey) -> Result<bool>;
    /// Statistics.
    fn stats(&self) -> TierStats;
}

const MAGIC: u32 = 0x4b56_5231; // "KVR1"
const VERSION: u16 = 1;
/// Bytes of the header in front of every remote value.
pub const VALUE_HEADER: usize = 28;

fn value_header(key: BlockKey, data: &[u8]) -> [u8; VALUE_HEADER] {
    let mut h = [0u8; VALUE_HEADER];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&key.0.to_le_bytes());
    h[16..20].copy_from_slice(&(data.len() as u32).to_le_bytes());
    h[20..28].copy_from_slice(&xxh3_64(data).to_le_bytes());
    h
}

/// Checks a remote value (its header `h` and payload `p`) for `key`.
fn check_value(
    tier: &'static str,
    key: BlockKey,
    h: &[u8; VALUE_HEADER],
    p: &[u8],
    block_bytes: usize,
) -> Result<()> {
    check_header(tier, key, h, VALUE_HEADER + p.len(), block_bytes)?;
    let sum = u64::from_le_bytes(h[20..28].try_into().unwrap());
    if xxh3_64(p) != sum {
        return Err(StoreError::corrupt(tier, key, "payload checksum mismatch"));
    }
    Ok(())
}

/// Checks the header of a value of `total` bytes; the payload is not looked at.
fn check_header(
    tier: &'static str,
    key: BlockKey,
    v: &[u8],
    total: usize,
    block_bytes: usize,
) -> Result<()> {
    let bad = |r: String| Err(StoreError::corrupt(tier, key, r));
    if v.len() < VALUE_HEADER {
        return bad(format!("value of {total} bytes is shorter than its header"));
    }
    let u32at = |o: usize| u32::from_le_bytes(v[o..o + 4].try_into().unwrap());
    let u64at = |o: usize| u64::from_le_bytes(v[o..o + 8].try_into().unwrap());
    if u32at(0) != MAGIC || u16::from_le_bytes([v[4], v[5]]) != VERSION {
        return bad("not a kvstore value (magic or version)".into());
    }
    if u64at(8) != key.0 {
        return bad(format!("value is for key {:016x}", u64at(8)));
    }
    let len = u32at(16) as usize;
    if len != block_bytes || total != VALUE_HEADER + len {
        return bad(format!(
            "length {} (header) / {} (value), blocks are {block_bytes}",
            len,
            total - VALUE_HEADER
        ));
    }
    Ok(())
}

/// A value of the wrong total size `total` (of which `h` is the start): always refused.
fn check_short(
    tier: &'static str,
    key: BlockKey,
    h: &[u8],
    total: usize,
    block_bytes: usize,
) -> Result<Vec<u8>> {
    check_header(tier, key, h, total, block_bytes)?;
    Err(StoreError::corrupt(
        tier,
        key,
        format!("value of {total} bytes, blocks are {block_bytes}"),
    ))
}

/// Settings of a remote tier.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// Bytes of one block.
    pub block_bytes: usize,
    /// Limit of each connect, send and receive.
    pub timeout: Duration,
    /// Further attempts after a failed one (on a fresh connection).
    pub retries: u32,
    /// Pause before the first retry (doubled for each next one).
    pub backoff: Duration,
}

impl RemoteConfig {
    /// 1 s timeout, 2 retries, 10 ms backoff.
    pub fn new(block_bytes: usize) -> Self {
        RemoteConfig {
            block_bytes,
            timeout: Duration::from_secs(1),
            retries: 2,
            backoff: Duration::from_millis(10),
        }
    }
}

fn with_retries<C, T>(
    tier: &'static str,
    cfg: &RemoteConfig,
    stats: &TierCounters,
    pool: &Mutex<Vec<C>>,
    connect: impl Fn() -> Result<C>,
    mut op: impl FnMut(&mut C) -> Result<T>,
) -> Result<T> {
    let mut last = None;
    for attempt in 0..=cfg.retries {
        if attempt > 0 {
            std::thread::sleep(cfg.backoff * (1 << (attempt - 1).min(6)));
        }
        let conn = pool.lock().pop();
        let mut conn = match conn {
            Some(c) => c,
            None => match connect() {
                Ok(c) => c,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            },
        };
        match op(&mut conn) {
            Ok(v) => {
                pool.lock().push(conn);
                return Ok(v);
            }
            // Bad data is not retried: the remote answered, and it answered wrongly.
            Err(e @ StoreError::Corrupt { .. }) | Err(e @ StoreError::Invalid(_)) => {
                pool.lock().push(conn);
                stats.error();
                return Err(e);
            }
            Err(e) => last = Some(e), // the connection is dropped
        }
    }
    stats.error();
    let e = last.unwrap_or_else(|| StoreError::Remote {
        tier: tier.into(),
        reason: "no attempt made".into(),
    });
    tracing::warn!(tier, error = %e, "remote tier operation failed after retries");
    Err(e)
}

// ------------------------------------------------------------------------------------------
// Redis

/// Settings of the Redis tier.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// Prefix of every key (`<prefix><16 hex digits>`).
    pub prefix: String,
    /// Expiry of stored blocks (none by default; Redis' own `maxmemory-policy` then evicts).
    pub ttl: Option<Duration>,
    pub remote: RemoteConfig,
}

impl RedisConfig {
    /// Blocks under `kvmesh:blk:` at `url`.
    pub fn new(url: impl Into<String>, block_bytes: usize) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: "kvmesh:blk:".into(),
            ttl: None,
            remote: RemoteConfig::new(block_bytes),
        }
    }
}

/// Where the Redis server listens.
#[derive(Clone, Debug)]
enum RedisAddr {
    Tcp(String, u16),
    Unix(std::path::PathBuf),
}

/// A byte stream to Redis.
enum RedisStream {
    Tcp(TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl RedisStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        match self {
            RedisStream::Tcp(s) => s
                .set_read_timeout(Some(t))
                .and_then(|_| s.set_write_timeout(Some(t)))
                .and_then(|_| s.set_nodelay(true)),
            RedisStream::Unix(s) => s
                .set_read_timeout(Some(t))
                .and_then(|_| s.set_write_timeout(Some(t))),
        }
    }
}

impl Read for RedisStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            RedisStream::Tcp(s) => s.read(buf),
            RedisStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for RedisStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            RedisStream::Tcp(s) => s.write(buf),
            RedisStream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            RedisStream::Tcp(s) => s.write_vectored(bufs),
            RedisStream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Bytes of a connection's read buffer (reply lines and the start of a value; the rest of a
/// value is read straight into its destination).
const READ_BUF: usize = 16 << 10;
/// Longest reply line accepted (status, error, length).
const MAX_LINE: usize = 4096;

/// One reply's first line.
enum Reply {
    /// `+...`
    Status(Vec<u8>),
    /// `:n`
    Int(i64),
    /// `$-1`
    Nil,
    /// `$n`: `n` bytes and CRLF follow.
    Bulk(usize),
}

/// A connection speaking RESP2 on the socket: commands are written with one vectored write
/// straight from the caller's block (no command buffer), and a value is read straight into the
/// block it is returned in, so a block crosses user space once each way.
struct RedisConn {
    s: RedisStream,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

/// A protocol-level failure: the connection is dropped (never reused) and the operation retried.
fn proto(tier: &str, what: impl Into<String>) -> StoreError {
    StoreError::Remote {
        tier: tier.to_string(),
        reason: what.into(),
    }
}

impl RedisConn {
    fn new(s: RedisStream) -> Self {
        RedisConn {
            s,
            buf: vec![0u8; READ_BUF].into_boxed_slice(),
            pos: 0,
            end: 0,
        }
    }

    /// Writes all of `parts`, in order, with as few system calls as the socket allows.
    fn send(&mut self, parts: &mut [std::io::IoSlice<'_>]) -> std::io::Result<()> {
        let mut parts = parts;
        std::io::IoSlice::advance_slices(&mut parts, 0);
        while !parts.is_empty() {
            match self.s.write_vectored(parts) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => std::io::IoSlice::advance_slices(&mut parts, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn fill(&mut self) -> std::io::Result<()> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        loop {
            match self.s.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next reply line without its CRLF: `Ok(Err(..))` for a malformed reply.
    fn line(&mut self) -> std::io::Result<std::result::Result<Vec<u8>, String>> {
        let mut scanned = 0;
        loop {
            let avail = &self.buf[self.pos + scanned..self.end];
            if let Some(i) = avail.windows(2).position(|w| w == b"\r\n") {
                let l = self.buf[self.pos..self.pos + scanned + i].to_vec();
                self.pos += scanned + i + 2;
                return Ok(Ok(l));
            }
            scanned = (self.end - self.pos).saturating_sub(1);
            if scanned > MAX_LINE {
                return Ok(Err("reply line too long".into()));
            }
            self.fill()?;
        }
    }

    /// Reads one reply's first line; error replies become errors.
    fn reply(&mut self, tier: &str) -> Result<Reply> {
        let l = self
            .line()
            .map_err(|e| io_to_store(tier, e))?
            .map_err(|r| proto(tier, r))?;
        let num = |b: &[u8]| -> Result<i64> {
            std::str::from_utf8(b)
                .ok()
                .and_then(|t| t.parse::<i64>().ok())
                .ok_or_else(|| proto(tier, "malformed number in reply"))
        };
        match l.first() {
            Some(b'+') => Ok(Reply::Status(l[1..].to_vec())),
            Some(b'-') => Err(proto(
                tier,
                format!("server error: {}", String::from_utf8_lossy(&l[1..])),
            )),
            Some(b':') => Ok(Reply::Int(num(&l[1..])?)),
            Some(b'$') => match num(&l[1..])? {
                -1 => Ok(Reply::Nil),
                n if n >= 0 => Ok(Reply::Bulk(n as usize)),
                _ => Err(proto(tier, "negative value length")),
            },
            _ => Err(proto(tier, "unexpected reply type")),
        }
    }

    /// Reads exactly `dst.len()` bytes of the current value (buffered bytes first, the rest
    /// straight from the socket).
    fn read_into(&mut self, dst: &mut [u8]) -> std::io::Result<()> {
        let have = (self.end - self.pos).min(dst.len());
        dst[..have].copy_from_slice(&self.buf[self.pos..self.pos + have]);
        self.pos += have;
        if have < dst.len() {
            self.s.read_exact(&mut dst[have..])?;
        }
        Ok(())
    }

    /// Skips `n` bytes of the current value.
    fn skip(&mut self, mut n: usize) -> std::io::Result<()> {
        while n > 0 {
            if self.pos == self.end {
                self.fill()?;
            }
            let k = (self.end - self.pos).min(n);
            self.pos += k;
            n -= k;
        }
        Ok(())
    }

    /// Reads the CRLF that ends a value.
    fn crlf(&mut self, tier: &str) -> Result<()> {
        let mut t = [0u8; 2];
        self.read_into(&mut t).map_err(|e| io_to_store(tier, e))?;
        if t != *b"\r\n" {
            return Err(proto(tier, "value not followed by CRLF"));
        }
        Ok(())
    }

    /// Sends a command of small arguments and reads its reply's first line.
    fn call(&mut self, tier: &str, args: &[&[u8]]) -> Result<Reply> {
        let mut cmd = Vec::with_capacity(64);
        encode_cmd(&mut cmd, args.len(), args);
        self.send(&mut [std::io::IoSlice::new(&cmd)])
            .map_err(|e| io_to_store(tier, e))?;
        self.reply(tier)
    }
}

/// RESP framing of a command of `total` arguments into `out`, starting with `args`.
fn encode_cmd(out: &mut Vec<u8>, total: usize, args: &[&[u8]]) {
    let _ = write!(out, "*{total}\r\n");
    encode_args(out, args);
}

/// RESP framing of `args` (bulk strings) into `out`.
fn encode_args(out: &mut Vec<u8>, args: &[&[u8]]) {
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

fn io_to_store(tier: &str, e: std::io::Error) -> StoreError {
    if matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    ) {
        StoreError::Timeout {
            tier: tier.to_string(),
            ms: 0,
        }
    } else {
        proto(tier, e.to_string())
    }
}

/// Blocks in Redis, one string value per block.
pub struct RedisTier {
    addr: RedisAddr,
    info: redis::RedisConnectionInfo,
    /// `redis <url>`, for errors.
    label: String,
    cfg: RedisConfig,
    pool: Mutex<Vec<RedisConn>>,
    stats: TierCounters,
}

impl RedisTier {
    /// A tier on `cfg.url`; connects lazily, so a dead server shows up as errors on use.
    pub fn new(cfg: RedisConfig) -> Result<Self> {
        let label = format!("redis {}", cfg.url);
        let bad = |reason: String| StoreError::Remote {
            tier: label.clone(),
            reason,
        };
        let client =
            redis::Client::open(cfg.url.as_str()).map_err(|e| bad(format!("bad URL: {e}")))?;
        let ci = client.get_connection_info();
        let addr = match &ci.addr {
            redis::ConnectionAddr::Tcp(h, p) => RedisAddr::Tcp(h.clone(), *p),
            redis::ConnectionAddr::Unix(p) => RedisAddr::Unix(p.clone()),
            other => {
                return Err(bad(format!(
                    "unsupported address {other} (TCP or Unix only)"
                )))
            }
        };
        Ok(RedisTier {
            addr,
            info: ci.redis.clone(),
            label,
            cfg,
            pool: Mutex::new(Vec::new()),
            stats: TierCounters::default(),
        })
    }

    fn key(&self, key: BlockKey) -> String {
        format!("{}{:016x}", self.cfg.prefix, key.0)
    }

    /// A timeout error with the configured limit.
    fn err(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Timeout { .. } => StoreError::Timeout {
                tier: self.label.clone(),
                ms: self.cfg.remote.timeout.as_millis() as u64,
            },
            StoreError::Remote { reason, .. } => StoreError::Remote {
                tier: self.label.clone(),
                reason,
            },
            e => e,
        }
    }

    fn connect(&self) -> Result<RedisConn> {
        let t = self.cfg.remote.timeout;
        let io = |e: std::io::Error| self.err(io_to_store(&self.label, e));
        let s = match &self.addr {
            RedisAddr::Tcp(h, p) => {
                let addrs: Vec<SocketAddr> =
                    (h.as_str(), *p).to_socket_addrs().map_err(io)?.collect();
                let mut last = None;
                let mut got = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, t) {
                        Ok(s) => {
                            got = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                match got {
                    Some(s) => RedisStream::Tcp(s),
                    None => {
                        return Err(io(last.unwrap_or_else(|| {
                            std::io::Error::new(
                                std::io::ErrorKind::NotFound,
                                "address resolves to nothing",
                            )
                        })))
                    }
                }
            }
            RedisAddr::Unix(p) => {
                RedisStream::Unix(std::os::unix::net::UnixStream::connect(p).map_err(io)?)
            }
        };
        s.set_timeouts(t).map_err(io)?;
        let mut c = RedisConn::new(s);
        if let Some(pw) = &self.info.password {
            let r = match &self.info.username {
                Some(u) => c.call(&self.label, &[b"AUTH", u.as_bytes(), pw.as_bytes()]),
                None => c.call(&self.label, &[b"AUTH", pw.as_bytes()]),
            };
            expect_ok(&self.label, r.map_err(|e| self.err(e))?)?;
        }
        if self.info.db != 0 {
            let db = self.info.db.to_string();
            let r = c.call(&self.label, &[b"SELECT", db.as_bytes()]);
            expect_ok(&self.label, r.map_err(|e| self.err(e))?)?;
        }
        Ok(c)
    }

    fn run<T>(&self, mut op: impl FnMut(&mut RedisConn) -> Result<T>) -> Result<T> {
        with_retries(
            "redis",
            &self.cfg.remote,
            &self.stats,
            &self.pool,
            || self.connect(),
            |c| op(c).map_err(|e| self.err(e)),
        )
    }

    fn int_call(&self, cmd: &[u8], key: BlockKey) -> Result<i64> {
        let k = self.key(key);
        self.run(|c| match c.call(&self.label, &[cmd, k.as_bytes()])? {
            Reply::Int(n) => Ok(n),
            _ => Err(proto(&self.label, "expected an integer reply")),
        })
    }

    /// Deletes a block (used when a value fails verification).
    pub fn remove(&self, key: BlockKey) -> Result<()> {
        self.int_call(b"DEL", key).map(|_| ())
    }
}

fn expect_ok(tier: &str, r: Reply) -> Result<()> {
    match r {
        Reply::Status(s) if s == b"OK" => Ok(()),
        _ => Err(proto(tier, "expected +OK")),
    }
}

impl RemoteTier for RedisTier {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn put(&self, key: BlockKey, data: &[u8]) -> Result<()> {
        if data.len() != self.cfg.remote.block_bytes {
            return Err(StoreError::Invalid(format!(
                "block is {} bytes, blocks are {}",
                data.len(),
                self.cfg.remote.block_bytes
            )));
        }
        let t0 = Instant::now();
        // `SET key <header><payload> [PX ms]`: the framing and header in one small buffer, the
        // payload written from the caller's slice, all in one vectored write.
        let k = self.key(key);
        let ttl = self.cfg.ttl.map(|t| t.as_millis().max(1).to_string());
        let mut head = Vec::with_capacity(96);
        encode_cmd(
            &mut head,
            if ttl.is_some() { 5 } else { 3 },
            &[b"SET", k.as_bytes()],
        );
        let _ = write!(head, "${}\r\n", VALUE_HEADER + data.len());
        head.extend_from_slice(&value_header(key, data));
        let mut tail = b"\r\n".to_vec();
        if let Some(ms) = &ttl {
            encode_args(&mut tail, &[b"PX", ms.as_bytes()]);
        }
        self.run(|c| {
            c.send(&mut [
                std::io::IoSlice::new(&head),
                std::io::IoSlice::new(data),
                std::io::IoSlice::new(&tail),
            ])
            .map_err(|e| io_to_store(&self.label, e))?;
            expect_ok(&self.label, c.reply(&self.label)?)
        })?;
        self.stats.write_done(data.len(), t0);
        Ok(())
    }

    fn get(&self, key: BlockKey) -> Result<Option<Bytes>> {
        let t0 = Instant::now();
        let k = self.key(key);
        let bb = self.cfg.remote.block_bytes;
        let v = self.run(|c| {
            match c.call(&self.label, &[b"GET", k.as_bytes()])? {
                Reply::Nil => Ok(None),
                Reply::Bulk(n) if n == VALUE_HEADER + bb => {
                    let mut h = [0u8; VALUE_HEADER];
                    let mut p = vec![0u8; bb];
                    c.read_into(&mut h)
                        .and_then(|_| c.read_into(&mut p))
                        .map_err(|e| io_to_store(&self.label, e))?;
                    c.crlf(&self.label)?;
                    Ok(Some(Ok((h, p))))
                }
                Reply::Bulk(n) => {
                    // A value of the wrong size: read past it (the connection stays usable)
                    // and refuse it.
                    let mut h = [0u8; VALUE_HEADER];
                    let m = n.min(VALUE_HEADER);
                    c.read_into(&mut h[..m])
                        .and_then(|_| c.skip(n - m))
                        .map_err(|e| io_to_store(&self.label, e))?;
                    c.crlf(&self.label)?;
                    Ok(Some(Err((h, m, n))))
                }
                _ => Err(proto(&self.label, "expected a value")),
            }
        })?;
        let checked = match v {
            None => {
                self.stats.miss();
                return Ok(None);
            }
            Some(Ok((h, p))) => check_value("redis", key, &h, &p, bb).map(|_| p),
            Some(Err((h, m, n))) => check_short("redis", key, &h[..m], n, bb),
        };
        match checked {
            Ok(p) => {
                self.stats.read_done(p.len(), t0);
                Ok(Some(Bytes::from(p)))
            }
            Err(e) => {
                self.stats.error();
                self.stats
                    .corrupt
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(error = %e, "redis tier: bad value dropped");
                let _ = self.remove(key);
                Err(e)
            }
        }
    }

    fn contains(&self, key: BlockKey) -> Result<bool> {
        self.int_call(b"EXISTS", key).map(|n| n > 0)
    }

    fn stats(&self) -> TierStats {
        self.stats
            .snapshot("redis", 0, 0, self.cfg.remote.block_bytes as u64)
    }
}

// ------------------------------------------------------------------------------------------
// Peer protocol

const PEER_MAGIC: u32 = 0x4b56_5031; // "KVP1"
const OP_GET: u8 = 1;
const OP_PUT: u8 = 2;
const OP_CONTAINS: u8 = 3;
const ST_OK: u8 = 0;
const ST_MISSING: u8 = 1;
const ST_ERROR: u8 = 2;
/// Request header: magic u32, op u8, 3 pad, key u64, len u32, checksum u64.
const REQ: usize = 28;
/// Response header: status u8, 3 pad, len u32, checksum u64.
const RESP: usize = 16;

/// What a peer node serves: its local tiers.
pub trait BlockSource: Send + Sync {
    /// Bytes of one block.
    fn block_bytes(&self) -> usize;
    /// A block from the local tiers.
    fn get_local(&self, key: BlockKey) -> Result<Option<Bytes>>;
    /// Stores a block in the local tiers.
    fn put_local(&self, key: BlockKey, data: &[u8]) -> Result<()>;
    /// Whether a local tier holds `key`.
    fn contains_local(&self, key: BlockKey) -> bool;
}

/// A kvstore node serving its local tiers to peers over TCP (a tokio runtime of its own).
pub struct PeerServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerServer {
    /// Listens on `addr` (`127.0.0.1:0` picks a port) and serves `source`.
    pub fn start(source: Arc<dyn BlockSource>, addr: &str) -> Result<PeerServer> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvstore-peer")
            .enable_all()
            .build()
            .map_err(|e| StoreError::io("starting the peer server runtime", e))?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|e| StoreError::io(format!("binding the peer server on {addr}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| StoreError::io("peer server address", e))?;
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("kvstore-peer-accept".into())
            .spawn(move || {
                rt.block_on(async move {
                    loop {
                        tokio::select! {
                            _ = &mut rx => break,
                            acc = listener.accept() => {
                                let Ok((sock, _)) = acc else { continue };
                                let _ = sock.set_nodelay(true);
                                let src = source.clone();
                                tokio::spawn(async move {
                                    if let Err(e) = serve_conn(sock, src).await {
                                        tracing::debug!(error = %e, "peer connection closed");
                                    }
                                });
                            }
                        }
                    }
                });
                rt.shutdown_background();
            })
            .map_err(|e| StoreError::io("spawning the peer server", e))?;
        Ok(PeerServer {
            addr: local,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve_conn(
    mut sock: tokio::net::TcpStream,
    src: Arc<dyn BlockSource>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bb = src.block_bytes();
    let mut hdr = [0u8; REQ];
    loop {
        match sock.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let magic = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let op = hdr[4];
        let key = BlockKey(u64::from_le_bytes(hdr[8..16].try_into().unwrap()));
        let len = u32::from_le_bytes(hdr[16..20].try_into().unwrap()) as usize;
        let sum = u64::from_le_bytes(hdr[20..28].try_into().unwrap());
        if magic != PEER_MAGIC {
            reply_err(&mut sock, "bad magic: not a kvstore peer request").await?;
            return Ok(());
        }
        match op {
            OP_GET | OP_CONTAINS => {
                if len != 0 {
                    reply_err(&mut sock, "GET/CONTAINS carry no payload").await?;
                    return Ok(());
                }
                if op == OP_CONTAINS {
                    let st = if src.contains_local(key) {
                        ST_OK
                    } else {
                        ST_MISSING
                    };
                    reply(&mut sock, st, &[]).await?;
                    continue;
                }
                let s2 = src.clone();
                let r = tokio::task::spawn_blocking(move || s2.get_local(key))
                    .await
                    .unwrap_or_else(|e| {
                        Err(StoreError::Remote {
                            tier: "peer".into(),
                            reason: e.to_string(),
                        })
                    });
                match r {
                    Ok(Some(b)) => reply(&mut sock, ST_OK, &b).await?,
                    Ok(None) => reply(&mut sock, ST_MISSING, &[]).await?,
                    Err(e) => reply_err(&mut sock, &e.to_string()).await?,
                }
            }
            OP_PUT => {
                if len != bb {
                    reply_err(&mut sock, &format!("PUT of {len} bytes, blocks are {bb}")).await?;
                    return Ok(());
                }
                let mut data = vec![0u8; len];
                sock.read_exact(&mut data).await?;
                if xxh3_64(&data) != sum {
                    reply_err(&mut sock, "PUT payload checksum mismatch").await?;
                    continue;
                }
                let s2 = src.clone();
                let r = tokio::task::spawn_blocking(move || s2.put_local(key, &data))
                    .await
                    .unwrap_or_else(|e| {
                        Err(StoreError::Remote {
                            tier: "peer".into(),
                            reason: e.to_string(),
                        })
                    });
                match r {
                    Ok(()) => reply(&mut sock, ST_OK, &[]).await?,
                    Err(e) => reply_err(&mut sock, &e.to_string()).await?,
                }
            }
            _ => {
                reply_err(&mut sock, &format!("unknown op {op}")).await?;
                return Ok(());
            }
        }
        sock.flush().await?;
    }
}

async fn reply(sock: &mut tokio::net::TcpStream, st: u8, payload: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut h = [0u8; RESP];
    h[0] = st;
    h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[8..16].copy_from_slice(&xxh3_64(payload).to_le_bytes());
    sock.write_all(&h).await?;
    sock.write_all(payload).await
}

async fn reply_err(sock: &mut tokio::net::TcpStream, msg: &str) -> std::io::Result<()> {
    reply(sock, ST_ERROR, &msg.as_bytes()[..msg.len().min(4096)]).await
}

/// Settings of a peer tier.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// `host:port` of the peer's [`PeerServer`].
    pub addr: String,
    pub remote: RemoteConfig,
}

/// Another kvstore node, reached over TCP.
pub struct PeerTier {
    cfg: PeerConfig,
    pool: Mutex<Vec<TcpStream>>,
    stats: TierCounters,
}

impl PeerTier {
    /// A tier on the peer at `cfg.addr` (connects lazily).
    pub fn new(cfg: PeerConfig) -> Self {
        PeerTier {
            cfg,
            pool: Mutex::new(Vec::new()),
            stats: TierCounters::default(),
        }
    }

    fn remote_err(&self, e: std::io::Error) -> StoreError {
        if matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ) {
            StoreError::Timeout {
                tier: format!("peer {}", self.cfg.addr),
                ms: self.cfg.remote.timeout.as_millis() as u64,
            }
        } else {
            StoreError::Remote {
                tier: format!("peer {}", self.cfg.addr),
                reason: e.to_string(),
            }
        }
    }

    fn connect(&self) -> Result<TcpStream> {
        let t = self.cfg.remote.timeout;
        let addrs: Vec<SocketAddr> = self
            .cfg
            .addr
            .to_socket_addrs()
            .map_err(|e| self.remote_err(e))?
            .collect();
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, t) {
                Ok(s) => {
                    s.set_read_timeout(Some(t))
                        .and_then(|_| s.set_write_timeout(Some(t)))
                        .and_then(|_| s.set_nodelay(true))
                        .map_err(|e| self.remote_err(e))?;
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(self.remote_err(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "address resolves to nothing")
        })))
    }

    /// One request; returns (status, payload).
    fn call(&self, op: u8, key: BlockKey, data: &[u8]) -> Result<(u8, Vec<u8>)> {
        let mut h = [0u8; REQ];
        h[0..4].copy_from_slice(&PEER_MAGIC.to_le_bytes());
        h[4] = op;
        h[8..16].copy_from_slice(&key.0.to_le_bytes());
        h[16..20].copy_from_slice(&(data.len() as u32).to_le_bytes());
        h[20..28].copy_from_slice(&xxh3_64(data).to_le_bytes());
        let bb = self.cfg.remote.block_bytes;
        with_retries(
            "peer",
            &self.cfg.remote,
            &self.stats,
            &self.pool,
            || self.connect(),
            |s| {
                s.write_all(&h).map_err(|e| self.remote_err(e))?;
                if !data.is_empty() {
                    s.write_all(data).map_err(|e| self.remote_err(e))?;
                }
                let mut r = [0u8; RESP];
                s.read_exact(&mut r).map_err(|e| self.remote_err(e))?;
                let len = u32::from_le_bytes(r[4..8].try_into().unwrap()) as usize;
                let sum = u64::from_le_bytes(r[8..16].try_into().unwrap());
                if len > bb.max(4096) {
                    return Err(StoreError::Remote {
                        tier: format!("peer {}", self.cfg.addr),
                        reason: format!("answer of {len} bytes, blocks are {bb}"),
                    });
                }
                let mut p = vec![0u8; len];
                s.read_exact(&mut p).map_err(|e| self.remote_err(e))?;
                if xxh3_64(&p) != sum {
                    return Err(StoreError::corrupt(
                        "peer",
                        key,
                        "payload checksum mismatch in transit",
                    ));
                }
                Ok((r[0], p))
            },
        )
    }

    fn status_err(&self, p: &[u8]) -> StoreError {
        StoreError::Remote {
            tier: format!("peer {}", self.cfg.addr),
            reason: String::from_utf8_lossy(p).into_owned(),
        }
    }
}

impl RemoteTier for PeerTier {
    fn name(&self) -> &'static str {
        "peer"
    }

    fn put(&self, key: BlockKey, data: &[u8]) -> Result<()> {
        if data.len() != self.cfg.remote.block_bytes {
            return Err(StoreError::Invalid(format!(
                "block is {} bytes, blocks are {}",
                data.len(),
                self.cfg.remote.block_bytes
            )));
        }
        let t0 = Instant::now();
        match self.call(OP_PUT, key, data)? {
            (ST_OK, _) => {
                self.stats.write_done(data.len(), t0);
                Ok(())
            }
            (_, p) => {
                self.stats.error();
                Err(self.status_err(&p))
            }
        }
    }

    fn get(&self, key: BlockKey) -> Result<Option<Bytes>> {
        let t0 = Instant::now();
        match self.call(OP_GET, key, &[])? {
            (ST_OK, p) => {
                if p.len() != self.cfg.remote.block_bytes {
                    self.stats.error();
                    return Err(StoreError::corrupt(
                        "peer",
                        key,
                        format!(
                            "{} bytes, blocks are {}",
                            p.len(),
                            self.cfg.remote.block_bytes
                        ),
                    ));
                }
                self.stats.read_done(p.len(), t0);
                Ok(Some(Bytes::from(p)))
            }
            (ST_MISSING, _) => {
                self.stats.miss();
                Ok(None)
            }
            (_, p) => {
                self.stats.error();
                Err(self.status_err(&p))
            }
        }
    }

    fn contains(&self, key: BlockKey) -> Result<bool> {
        match self.call(OP_CONTAINS, key, &[])? {
            (ST_OK, _) => Ok(true),
            (ST_MISSING, _) => Ok(false),
            (_, p) => Err(self.status_err(&p)),
        }
    }

    fn stats(&self) -> TierStats {
        self.stats
            .snapshot("peer", 0, 0, self.cfg.remote.block_bytes as u64)
    }
}

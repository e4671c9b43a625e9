//! Remote tiers: Redis and peer kvstore nodes over TCP.
//!
//! Both carry every block with a small header (magic, format version, key, length, XXH3-64 of the
//! payload) and check it on the way back: a value under the wrong key, of the wrong length or
//! with a bad checksum is an error ([`StoreError::Corrupt`]), never data. Every operation has a
//! timeout; failed operations are retried on a fresh connection a configured number of times and
//! then fail closed ([`StoreError::Remote`] / [`StoreError::Timeout`]): a caller never gets a
//! block it cannot trust, and a dead remote only costs the timeout.

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

/// Checks a remote value (header + payload) for `key`; returns the payload range.
fn check_value(tier: &'static str, key: BlockKey, v: &[u8], block_bytes: usize) -> Result<()> {
    let bad = |r: String| Err(StoreError::corrupt(tier, key, r));
    if v.len() < VALUE_HEADER {
        return bad(format!(
            "value of {} bytes is shorter than its header",
            v.len()
        ));
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
    if len != block_bytes || v.len() != VALUE_HEADER + len {
        return bad(format!(
            "length {} (header) / {} (value), blocks are {block_bytes}",
            len,
            v.len() - VALUE_HEADER
        ));
    }
    if xxh3_64(&v[VALUE_HEADER..]) != u64at(20) {
        return bad("payload checksum mismatch".into());
    }
    Ok(())
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

/// A remote value: header then payload, one Redis argument, no intermediate copy.
struct Headered<'a> {
    header: [u8; VALUE_HEADER],
    data: &'a [u8],
}

impl redis::ToRedisArgs for Headered<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        out.reserve_space_for_args([VALUE_HEADER + self.data.len()]);
        let mut w = out.writer_for_next_arg();
        // Writing into the command's in-memory buffer cannot fail.
        let _ = w.write_all(&self.header);
        let _ = w.write_all(self.data);
    }
}

/// Blocks in Redis, one string value per block.
pub struct RedisTier {
    client: redis::Client,
    cfg: RedisConfig,
    pool: Mutex<Vec<redis::Connection>>,
    stats: TierCounters,
}

fn redis_err(cfg: &RedisConfig, e: redis::RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout {
            tier: format!("redis {}", cfg.url),
            ms: cfg.remote.timeout.as_millis() as u64,
        }
    } else {
        StoreError::Remote {
            tier: format!("redis {}", cfg.url),
            reason: e.to_string(),
        }
    }
}

impl RedisTier {
    /// A tier on `cfg.url`; connects lazily, so a dead server shows up as errors on use.
    pub fn new(cfg: RedisConfig) -> Result<Self> {
        let client = redis::Client::open(cfg.url.as_str()).map_err(|e| StoreError::Remote {
            tier: format!("redis {}", cfg.url),
            reason: format!("bad URL: {e}"),
        })?;
        Ok(RedisTier {
            client,
            cfg,
            pool: Mutex::new(Vec::new()),
            stats: TierCounters::default(),
        })
    }

    fn key(&self, key: BlockKey) -> String {
        format!("{}{:016x}", self.cfg.prefix, key.0)
    }

    fn connect(&self) -> Result<redis::Connection> {
        let t = self.cfg.remote.timeout;
        let c = self
            .client
            .get_connection_with_timeout(t)
            .map_err(|e| redis_err(&self.cfg, e))?;
        c.set_read_timeout(Some(t))
            .and_then(|_| c.set_write_timeout(Some(t)))
            .map_err(|e| redis_err(&self.cfg, e))?;
        Ok(c)
    }

    fn run<T>(&self, op: impl FnMut(&mut redis::Connection) -> Result<T>) -> Result<T> {
        with_retries(
            "redis",
            &self.cfg.remote,
            &self.stats,
            &self.pool,
            || self.connect(),
            op,
        )
    }

    /// Deletes a block (used when a value fails verification).
    pub fn remove(&self, key: BlockKey) -> Result<()> {
        let k = self.key(key);
        self.run(|c| {
            redis::cmd("DEL")
                .arg(&k)
                .query::<i64>(c)
                .map(|_| ())
                .map_err(|e| redis_err(&self.cfg, e))
        })
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
        // Header and payload are written straight into the command buffer as one argument.
        let v = Headered {
            header: value_header(key, data),
            data,
        };
        let k = self.key(key);
        self.run(|c| {
            let mut cmd = redis::cmd("SET");
            cmd.arg(&k).arg(&v);
            if let Some(ttl) = self.cfg.ttl {
                cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
            }
            cmd.query::<()>(c).map_err(|e| redis_err(&self.cfg, e))
        })?;
        self.stats.write_done(data.len(), t0);
        Ok(())
    }

    fn get(&self, key: BlockKey) -> Result<Option<Bytes>> {
        let t0 = Instant::now();
        let k = self.key(key);
        let v: Option<Vec<u8>> = self.run(|c| {
            redis::cmd("GET")
                .arg(&k)
                .query::<Option<Vec<u8>>>(c)
                .map_err(|e| redis_err(&self.cfg, e))
        })?;
        let Some(v) = v else {
            self.stats.miss();
            return Ok(None);
        };
        if let Err(e) = check_value("redis", key, &v, self.cfg.remote.block_bytes) {
            self.stats.error();
            self.stats
                .corrupt
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(error = %e, "redis tier: bad value dropped");
            let _ = self.remove(key);
            return Err(e);
        }
        self.stats.read_done(v.len() - VALUE_HEADER, t0);
        Ok(Some(Bytes::from(v).slice(VALUE_HEADER..)))
    }

    fn contains(&self, key: BlockKey) -> Result<bool> {
        let k = self.key(key);
        self.run(|c| {
            redis::cmd("EXISTS")
                .arg(&k)
                .query::<i64>(c)
                .map(|n| n > 0)
                .map_err(|e| redis_err(&self.cfg, e))
        })
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

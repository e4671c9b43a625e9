//! The TCP backend and side channel: one connection per pair of agents, opened by the initiator.
//!
//! Initiator side ([`Conn`]): a writer sends requests and WRITE data straight from registered
//! memory; a reader completes transfers from ACK/READ_END frames and reads READ data straight
//! into registered memory; a watchdog fails everything when the peer makes no progress for the
//! agent's timeout. Any failure closes the connection and fails every transfer on it.
//!
//! Target side ([`serve`]): validates every incoming descriptor against the live region table,
//! delivers a WRITE's notification only after all of its bytes arrived, and a READ's after all
//! of its bytes were sent.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::agent::{Inner, Notif};
use crate::error::{peer_err, Error, Result};
use crate::metadata::AgentMetadata;
use crate::wire::{self, Cursor, Hdr};
use crate::xfer::{Op, Seg, XferShared};

pub(crate) enum Cmd {
    Xfer(Arc<XferShared>),
    Notif(Vec<u8>),
}

pub(crate) struct Conn {
    tx: mpsc::UnboundedSender<Cmd>,
    sh: Arc<ConnShared>,
}

struct ConnShared {
    peer: String,
    pending: Mutex<HashMap<u64, Arc<XferShared>>>,
    alive: AtomicBool,
    close: tokio::sync::Notify,
    epoch: Instant,
    progress_ms: AtomicU64,
}

impl ConnShared {
    fn progress(&self) {
        self.progress_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl Conn {
    pub fn open(inner: &Arc<Inner>, meta: &AgentMetadata) -> Arc<Conn> {
        let (tx, rx) = mpsc::unbounded_channel();
        let sh = Arc::new(ConnShared {
            peer: meta.name.clone(),
            pending: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            close: tokio::sync::Notify::new(),
            epoch: Instant::now(),
            progress_ms: AtomicU64::new(0),
        });
        inner.rt.spawn(run(
            inner.clone(),
            meta.tcp_addrs.clone(),
            meta.instance,
            sh.clone(),
            rx,
        ));
        Arc::new(Conn { tx, sh })
    }

    pub fn is_alive(&self) -> bool {
        self.sh.alive.load(Ordering::Acquire)
    }

    pub fn close(&self) {
        self.sh.alive.store(false, Ordering::Release);
        self.sh.close.notify_one();
    }

    pub fn send_xfer(&self, x: Arc<XferShared>) -> Result<()> {
        self.tx
            .send(Cmd::Xfer(x))
            .map_err(|_| peer_err(&self.sh.peer, "connection closed"))
    }

    pub fn send_notif(&self, m: Vec<u8>) -> Result<()> {
        self.tx
            .send(Cmd::Notif(m))
            .map_err(|_| peer_err(&self.sh.peer, "connection closed"))
    }
}

async fn run(
    inner: Arc<Inner>,
    addrs: Vec<SocketAddr>,
    instance: u64,
    sh: Arc<ConnShared>,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
) {
    let timeout = inner.cfg.timeout;
    let peer = sh.peer.clone();
    let res: Result<()> = async {
        let stream = tokio::time::timeout(timeout, connect_any(&addrs))
            .await
            .map_err(|_| peer_err(&peer, format!("connect timed out after {timeout:?}")))??;
        let (mut rd, mut wr) = stream.into_split();
        // Hello: name who we are and which instance of the peer we expect.
        let hello = Hdr::new(
            wire::HELLO,
            0,
            wire::PROTO_VERSION,
            instance,
            inner.name.len() as u64,
        );
        wire::write_frame(&mut wr, hello, &[inner.name.as_bytes()])
            .await
            .map_err(|e| peer_err(&peer, e))?;
        let h = tokio::time::timeout(timeout, wire::read_hdr(&mut rd))
            .await
            .map_err(|_| peer_err(&peer, "no answer to hello"))?
            .map_err(|e| peer_err(&peer, format!("hello: {e}")))?;
        let msg = wire::read_payload(&mut rd, h.len, wire::MAX_NOTIF)
            .await
            .map_err(|e| peer_err(&peer, e))?;
        if h.kind != wire::HELLO_REPLY || h.status != wire::ST_OK {
            return Err(peer_err(
                &peer,
                format!("refused: {}", String::from_utf8_lossy(&msg)),
            ));
        }
        sh.progress();
        tokio::select! {
            r = writer(&mut wr, &mut rx, &sh) => r,
            r = reader(&mut rd, &sh) => r,
            r = watchdog(&sh, timeout) => r,
            _ = sh.close.notified() => Err(peer_err(&peer, "connection closed locally")),
        }
    }
    .await;
    let err = match res {
        Ok(()) => peer_err(&peer, "connection closed"),
        Err(e) => e,
    };
    sh.alive.store(false, Ordering::Release);
    rx.close();
    // The reader and writer are gone: nothing touches transfer memory any more.
    let pending: Vec<_> = sh.pending.lock().drain().map(|(_, x)| x).collect();
    for x in pending {
        x.complete(Err(err.clone()));
    }
    while let Ok(cmd) = rx.try_recv() {
        if let Cmd::Xfer(x) = cmd {
            x.complete(Err(err.clone()));
        }
    }
}

async fn connect_any(addrs: &[SocketAddr]) -> Result<TcpStream> {
    let mut last = Error::Invalid("the peer's metadata lists no address".into());
    for a in addrs {
        match TcpStream::connect(a).await {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Error::Io(format!("connect to {a}: {e}")),
        }
    }
    Err(last)
}

async fn writer(
    wr: &mut OwnedWriteHalf,
    rx: &mut mpsc::UnboundedReceiver<Cmd>,
    sh: &ConnShared,
) -> Result<()> {
    let io = |e: std::io::Error| peer_err(&sh.peer, e);
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Cmd::Notif(m) => {
                let h = Hdr::new(wire::NOTIF, 0, 0, 0, m.len() as u64);
                wire::write_frame(wr, h, &[&m]).await.map_err(io)?;
            }
            Cmd::Xfer(x) => {
                if x.is_cancelled() {
                    x.complete(Err(Error::Cancelled));
                    continue;
                }
                let id = x.wire_id.load(Ordering::Relaxed);
                sh.pending.lock().insert(id, x.clone());
                sh.progress();
                let notif = x.take_notif();
                let n = notif.as_deref().unwrap_or(&[]);
                let kind = match x.op {
                    Op::Write => wire::WRITE,
                    Op::Read => wire::READ,
                };
                let h = Hdr::new(
                    kind,
                    notif.is_some() as u8,
                    x.local.len() as u32,
                    id,
                    (x.wire_descs.len() + n.len()) as u64,
                );
                wire::write_frame(wr, h, &[&x.wire_descs, n])
                    .await
                    .map_err(io)?;
                if x.op == Op::Write {
                    let mut cur = Cursor::default();
                    let mut left = x.total;
                    let mut aborted = false;
                    while left > 0 {
                        if x.is_cancelled() {
                            aborted = true;
                            break;
                        }
                        let n = left.min(wire::CHUNK);
                        wr.write_all(&Hdr::new(wire::DATA, 0, 0, id, n).encode())
                            .await
                            .map_err(io)?;
                        // SAFETY: the local segments were checked against this agent's
                        // registered regions when the transfer was prepared; registered memory
                        // stays valid while transfers use it (Agent::register_raw's contract).
                        unsafe { wire::write_from_segs(wr, &x.local, &mut cur, n) }
                            .await
                            .map_err(io)?;
                        left -= n;
                        sh.progress();
                    }
                    let h = Hdr::new(wire::WRITE_END, aborted as u8, 0, id, 0);
                    wr.write_all(&h.encode()).await.map_err(io)?;
                }
            }
        }
    }
    Ok(())
}

struct ReadState {
    x: Arc<XferShared>,
    cur: Cursor,
    got: u64,
}

async fn reader(rd: &mut OwnedReadHalf, sh: &ConnShared) -> Result<()> {
    let io = |e: std::io::Error| peer_err(&sh.peer, e);
    let proto = |m: &str| peer_err(&sh.peer, format!("protocol error: {m}"));
    let mut reads: HashMap<u64, ReadState> = HashMap::new();
    loop {
        let h = wire::read_hdr(rd).await.map_err(io)?;
        sh.progress();
        match h.kind {
            wire::ACK | wire::READ_END => {
                let msg = wire::read_payload(rd, h.len, wire::MAX_MSG)
                    .await
                    .map_err(io)?;
                let Some(x) = sh.pending.lock().remove(&h.id) else {
                    return Err(proto("completion of an unknown transfer"));
                };
                let rs = reads.remove(&h.id);
                let res = match h.status {
                    wire::ST_OK => {
                        if h.kind == wire::READ_END {
                            let got = rs.map(|r| r.got).unwrap_or(0);
                            if x.is_cancelled() {
                                Err(Error::Cancelled)
                            } else if got != x.total {
                                Err(peer_err(
                                    &sh.peer,
                                    format!("read returned {got} of {} bytes", x.total),
                                ))
                            } else {
                                Ok(())
                            }
                        } else {
                            Ok(())
                        }
                    }
                    wire::ST_CANCELLED => Err(Error::Cancelled),
                    _ => Err(peer_err(&sh.peer, String::from_utf8_lossy(&msg))),
                };
                x.complete(res);
            }
            wire::DATA => {
                if let std::collections::hash_map::Entry::Vacant(v) = reads.entry(h.id) {
                    let Some(x) = sh.pending.lock().get(&h.id).cloned() else {
                        return Err(proto("data for an unknown transfer"));
                    };
                    if x.op != Op::Read {
                        return Err(proto("data for a write"));
                    }
                    v.insert(ReadState {
                        x,
                        cur: Cursor::default(),
                        got: 0,
                    });
                }
                let rs = reads.get_mut(&h.id).expect("inserted above");
                if rs.got.checked_add(h.len).is_none_or(|g| g > rs.x.total) {
                    return Err(proto("more data than requested"));
                }
                if rs.x.is_cancelled() {
                    wire::discard(rd, h.len).await.map_err(io)?;
                    rs.cur = Cursor {
                        seg: usize::MAX,
                        off: 0,
                    };
                } else {
                    // SAFETY: local segments were checked against registered regions at
                    // prepare; registered memory stays valid while transfers use it.
                    unsafe { wire::read_into_segs(rd, &rs.x.local, &mut rs.cur, h.len) }
                        .await
                        .map_err(io)?;
                }
                rs.got += h.len;
            }
            _ => return Err(proto("unexpected frame")),
        }
    }
}

async fn watchdog(sh: &ConnShared, timeout: Duration) -> Result<()> {
    let tick = (timeout / 4).clamp(Duration::from_millis(5), Duration::from_millis(200));
    loop {
        tokio::time::sleep(tick).await;
        if sh.pending.lock().is_empty() {
            sh.progress();
            continue;
        }
        let last = Duration::from_millis(sh.progress_ms.load(Ordering::Relaxed));
        if sh.epoch.elapsed().saturating_sub(last) > timeout {
            return Err(Error::Timeout {
                peer: sh.peer.clone(),
                after: timeout,
            });
        }
    }
}

pub(crate) async fn accept_loop(inner: Weak<Inner>, l: tokio::net::TcpListener) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Some(i) = inner.upgrade() else { return };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let _ = serve(i, s).await;
        });
    }
}

struct WriteState {
    id: u64,
    segs: Vec<Seg>,
    err: Option<String>,
    cur: Cursor,
    got: u64,
    total: u64,
    notif: Option<Vec<u8>>,
    _keep: Vec<crate::HostBuffer>,
    /// GPU memory among the segments: the data is received here (`segs` names it) and copied
    /// out to the real segments before the write is acknowledged.
    staging: Option<crate::gpu::Staging>,
}

/// Serves one incoming connection (target side).
async fn serve(inner: Arc<Inner>, s: TcpStream) -> std::io::Result<()> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let (mut rd, mut wr) = s.into_split();
    let mut peer: Option<String> = None;
    let mut cur: Option<WriteState> = None;
    loop {
        let h = match wire::read_hdr(&mut rd).await {
            Ok(h) => h,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // An initiator that vanished mid-WRITE: its notification is never delivered.
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match h.kind {
            wire::GET_MD => {
                let md = inner.metadata().encode();
                let r = Hdr::new(wire::MD, 0, 0, 0, md.len() as u64);
                wire::write_frame(&mut wr, r, &[&md]).await?;
            }
            wire::HELLO => {
                let name = wire::read_payload(&mut rd, h.len, 4096).await?;
                let name = String::from_utf8_lossy(&name).into_owned();
                let err = if h.a != wire::PROTO_VERSION {
                    Some(format!(
                        "protocol version {} is not {}",
                        h.a,
                        wire::PROTO_VERSION
                    ))
                } else if h.id != inner.instance {
                    Some(format!(
                        "stale metadata: agent {:?} restarted (instance {:#x}, expected {:#x}); load its new metadata",
                        inner.name, inner.instance, h.id
                    ))
                } else {
                    None
                };
                let m = err.clone().unwrap_or_default();
                let st = if err.is_some() {
                    wire::ST_ERR
                } else {
                    wire::ST_OK
                };
                let r = Hdr::new(wire::HELLO_REPLY, st, 0, 0, m.len() as u64);
                wire::write_frame(&mut wr, r, &[m.as_bytes()]).await?;
                if let Some(e) = err {
                    return Err(bad(e));
                }
                peer = Some(name);
            }
            wire::WRITE | wire::READ | wire::NOTIF | wire::DATA | wire::WRITE_END
                if peer.is_none() =>
            {
                return Err(bad("transfer before hello".into()));
            }
            wire::NOTIF => {
                let m = wire::read_payload(&mut rd, h.len, wire::MAX_NOTIF).await?;
                inner.push_notif(Notif {
                    from: peer.clone().unwrap_or_default(),
                    msg: m,
                });
            }
            wire::WRITE | wire::READ => {
                if cur.is_some() {
                    return Err(bad("request inside a write".into()));
                }
                let n = h.a as usize;
                if n > wire::MAX_DESCS {
                    return Err(bad("too many descriptors".into()));
                }
                let body = wire::read_payload(&mut rd, h.len, n * 16 + wire::MAX_NOTIF).await?;
                let segs =
                    wire::decode_segs(&body, n).ok_or_else(|| bad("short descriptors".into()))?;
                let notif = (h.status & 1 == 1).then(|| body[n * 16..].to_vec());
                let total: u64 = segs.iter().map(|s| s.len).sum();
                let (keep, staging, mut err) = match inner.check_incoming(&segs) {
                    Ok(inc) => (inc.keep, inc.staging, None),
                    Err(e) => (Vec::new(), None, Some(e)),
                };
                // GPU memory is read through, or written into, host staging.
                let segs = match &staging {
                    Some(s) => vec![s.seg()],
                    None => segs,
                };
                if h.kind == wire::WRITE {
                    cur = Some(WriteState {
                        id: h.id,
                        segs,
                        err,
                        cur: Cursor::default(),
                        got: 0,
                        total,
                        notif,
                        _keep: keep,
                        staging,
                    });
                } else {
                    if let Some(Err(e)) = staging.as_ref().map(|s| s.gather()) {
                        err = Some(e.to_string());
                    }
                    let Some(p) = peer.clone() else { continue };
                    // `staging` (which `segs` may name) lives until the read is served.
                    serve_read(&inner, &mut wr, h.id, &segs, total, err, notif, p).await?;
                }
            }
            wire::DATA => {
                let Some(w) = cur.as_mut().filter(|w| w.id == h.id) else {
                    return Err(bad("data outside a write".into()));
                };
                if w.got.checked_add(h.len).is_none_or(|g| g > w.total) {
                    return Err(bad("more data than the write's descriptors".into()));
                }
                if w.err.is_some() {
                    wire::discard(&mut rd, h.len).await?;
                } else {
                    // SAFETY: the segments were checked against this agent's live regions when
                    // the WRITE arrived; kvtransfer-owned buffers are kept alive by `_keep`, and
                    // raw regions stay valid while registered (register_raw's contract).
                    unsafe { wire::read_into_segs(&mut rd, &w.segs, &mut w.cur, h.len) }.await?;
                }
                w.got += h.len;
            }
            wire::WRITE_END => {
                let Some(w) = cur.take().filter(|w| w.id == h.id) else {
                    return Err(bad("end of an unknown write".into()));
                };
                let (st, msg) = if let Some(e) = w.err {
                    (wire::ST_ERR, e)
                } else if h.status != 0 {
                    (wire::ST_CANCELLED, String::new())
                } else if w.got != w.total {
                    (
                        wire::ST_ERR,
                        format!("received {} of {} bytes", w.got, w.total),
                    )
                } else if let Some(Err(e)) = w.staging.as_ref().map(|s| s.scatter()) {
                    (wire::ST_ERR, e.to_string())
                } else {
                    if let Some(m) = w.notif {
                        inner.push_notif(Notif {
                            from: peer.clone().unwrap_or_default(),
                            msg: m,
                        });
                    }
                    (wire::ST_OK, String::new())
                };
                let r = Hdr::new(wire::ACK, st, 0, h.id, msg.len() as u64);
                wire::write_frame(&mut wr, r, &[msg.as_bytes()]).await?;
            }
            k => return Err(bad(format!("unknown frame kind {k}"))),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_read(
    inner: &Inner,
    wr: &mut OwnedWriteHalf,
    id: u64,
    segs: &[Seg],
    total: u64,
    err: Option<String>,
    notif: Option<Vec<u8>>,
    peer: String,
) -> std::io::Result<()> {
    if let Some(e) = err {
        let r = Hdr::new(wire::READ_END, wire::ST_ERR, 0, id, e.len() as u64);
        return wire::write_frame(wr, r, &[e.as_bytes()]).await;
    }
    let mut cur = Cursor::default();
    let mut left = total;
    while left > 0 {
        let n = left.min(wire::CHUNK);
        wr.write_all(&Hdr::new(wire::DATA, 0, 0, id, n).encode())
            .await?;
        // SAFETY: the segments were checked against this agent's live regions just before;
        // registered memory stays valid while transfers use it.
        unsafe { wire::write_from_segs(wr, segs, &mut cur, n) }.await?;
        left -= n;
    }
    wr.write_all(&Hdr::new(wire::READ_END, wire::ST_OK, 0, id, 0).encode())
        .await?;
    if let Some(m) = notif {
        inner.push_notif(Notif { from: peer, msg: m });
    }
    Ok(())
}

/// Fetches an agent's metadata blob from its side channel, with plain blocking sockets.
pub(crate) fn fetch_metadata_blocking(addr: SocketAddr, timeout: Duration) -> Result<Vec<u8>> {
    let name = addr.to_string();
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| peer_err(&name, format!("connect: {e}")))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    s.write_all(&Hdr::new(wire::GET_MD, 0, 0, 0, 0).encode())
        .map_err(|e| peer_err(&name, e))?;
    let mut hb = [0u8; wire::HDR];
    s.read_exact(&mut hb)
        .map_err(|e| peer_err(&name, format!("reading metadata: {e}")))?;
    let h = Hdr::decode(&hb);
    if h.kind != wire::MD || h.len > wire::MAX_MSG as u64 {
        return Err(peer_err(
            &name,
            "not a kvtransfer agent (bad metadata reply)",
        ));
    }
    let mut blob = vec![0u8; h.len as usize];
    s.read_exact(&mut blob)
        .map_err(|e| peer_err(&name, format!("reading metadata: {e}")))?;
    AgentMetadata::decode(&blob)?;
    Ok(blob)
}

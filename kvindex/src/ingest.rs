//! Ingestion of vLLM KV-event streams over ZMQ.
//!
//! One thread per engine endpoint owns a SUB socket (and, when the engine has a replay endpoint,
//! a DEALER socket to vLLM's replay ROUTER). Each message is `[topic, seq (8 bytes, big-endian),
//! payload]`. Per stream (topic and data-parallel rank) the thread tracks the sequence number:
//!
//! * the first message of a stream with `seq > 0` means earlier batches were published before we
//!   subscribed: they are fetched by replay and applied first;
//! * a jump forward is a gap: the missing batches are replayed, in order, before the new one;
//! * a jump backwards means the engine restarted: its blocks are cleared, then as above;
//! * batches that cannot be recovered (no replay endpoint, or older than the engine's replay
//!   buffer) are counted in [`StreamStatus::lost_batches`];
//! * when the connection to the engine drops, its blocks are cleared at once (a dead or
//!   restarting engine holds nothing a scheduler should route to); on reconnection a sequence that
//!   went back is a restart, and one that goes on is rebuilt from the replay buffer.
//!
//! A `BlockStored` whose parent the index does not know is never dropped silently: the thread
//! replays the engine's buffer, rebuilds the missing ancestry from the Stored events found there
//! and applies the orphan with it; what cannot be recovered is counted
//! ([`StreamStatus::orphans_unrecovered`] and the index's stats).
//!
//! The sequencing logic is in [`StreamTracker`], which takes messages and a replay function as
//! arguments so tests can drive it without sockets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::backend::IndexBackend;
use crate::codec::{decode_batch, BatchDecoder};
use crate::event::{BlockStored, EngineHash, EventBatch, KvEvent};
use crate::index::{EngineId, EngineSpec};
use crate::{IndexError, Result};

/// The sequence number vLLM's replay socket sends to mark the end of a replay.
const END_SEQ: u64 = u64::MAX;

/// Where and how to subscribe to one engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineEndpoint {
    /// The engine's pod (or instance) name.
    pub pod: String,
    /// The model it serves.
    pub model: String,
    /// Data-parallel rank of this endpoint (batches name their own rank; this is the default).
    pub dp_rank: u32,
    /// The PUB endpoint, e.g. `tcp://10.0.0.5:5557`.
    pub endpoint: String,
    /// vLLM's replay ROUTER endpoint, e.g. `tcp://10.0.0.5:5558`, if the engine has one.
    pub replay_endpoint: Option<String>,
    /// Topic prefix to subscribe to (empty: everything).
    pub topic: String,
}

/// Ingestion settings.
#[derive(Clone, Debug)]
pub struct IngestConfig {
    /// How long to wait for a replay to complete. Default 2 s.
    pub replay_timeout: Duration,
    /// Minimum time between two orphan-recovery replays of one stream. Default 1 s.
    pub orphan_replay_interval: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            replay_timeout: Duration::from_secs(2),
            orphan_replay_interval: Duration::from_secs(1),
        }
    }
}

/// Counters and state of one event stream (one engine).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamStatus {
    pub engine: Option<EngineId>,
    pub name: String,
    /// The last sequence number applied.
    pub last_seq: Option<u64>,
    /// Batches applied (live and replayed).
    pub batches: u64,
    /// Events applied.
    pub events: u64,
    /// Sequence gaps seen.
    pub gaps: u64,
    /// Replays requested (gaps, late joins, restarts, orphan recovery).
    pub replays: u64,
    /// Batches obtained by replay and applied.
    pub replayed_batches: u64,
    /// Batches that could not be recovered.
    pub lost_batches: u64,
    /// Engine restarts detected (sequence went back).
    pub restarts: u64,
    /// Times the connection to the engine dropped.
    pub disconnects: u64,
    /// Whether the SUB socket is connected to the engine now.
    pub connected: bool,
    /// Payloads that failed to decode.
    pub decode_errors: u64,
    /// Orphaned stores seen, recovered, and given up on.
    pub orphans: u64,
    pub orphans_recovered: u64,
    pub orphans_unrecovered: u64,
    /// `time.time()` of the last batch, as published.
    pub last_ts: f64,
    /// Seconds between the last batch's publication and its application.
    pub lag_s: f64,
    /// Last error met on the stream's sockets, if any.
    pub last_error: Option<String>,
}

/// A stream within one endpoint: its topic and data-parallel rank.
type StreamKey = (Vec<u8>, u32);

/// Replayed batches: `(seq, payload)`, in order.
pub type Replayed = Vec<(u64, Vec<u8>)>;

/// The per-stream sequencing logic, free of sockets.
pub struct StreamTracker {
    backend: Arc<dyn IndexBackend>,
    engine: EngineId,
    expected: Option<u64>,
    /// The connection dropped since the last message: the engine's blocks were cleared.
    dropped: bool,
    last_orphan_replay: Option<Instant>,
    orphan_interval: Duration,
    /// Counters (shared with status readers).
    pub status: StreamStatus,
}

impl StreamTracker {
    /// A tracker applying to `engine` of `backend`.
    pub fn new(
        backend: Arc<dyn IndexBackend>,
        engine: EngineId,
        name: String,
        cfg: &IngestConfig,
    ) -> Self {
        StreamTracker {
            backend,
            engine,
            expected: None,
            dropped: false,
            last_orphan_replay: None,
            orphan_interval: cfg.orphan_replay_interval,
            status: StreamStatus {
                engine: Some(engine),
                name,
                ..StreamStatus::default()
            },
        }
    }

    /// Handles one live message. `replay(from)` returns the engine's buffered batches with
    /// `seq >= from` (or `None` when the engine has no replay endpoint or it failed).
    /// `batch` is the decoded payload (or the decoding error).
    pub fn on_message(
        &mut self,
        seq: u64,
        batch: Result<&EventBatch>,
        replay: &mut dyn FnMut(u64) -> Option<Replayed>,
    ) -> Result<()> {
        if self.dropped {
            // The engine's blocks were cleared when the connection dropped: rebuild them.
            self.dropped = false;
            if self.expected.is_some_and(|e| seq < e) {
                self.status.restarts += 1;
            }
            if seq > 0 {
                self.catch_up(0, seq, replay);
            }
            self.expected = Some(seq.wrapping_add(1));
            return self.apply_decoded(seq, batch, replay);
        }
        match self.expected {
            Some(e) if seq == e => {}
            Some(e) if seq > e => {
                self.status.gaps += 1;
                self.catch_up(e, seq, replay);
            }
            Some(_) => {
                // The sequence went back: the engine restarted and its cache is gone.
                self.status.restarts += 1;
                self.backend.clear_engine(self.engine)?;
                if seq > 0 {
                    self.catch_up(0, seq, replay);
                }
            }
            None if seq > 0 => self.catch_up(0, seq, replay),
            None => {}
        }
        self.expected = Some(seq.wrapping_add(1));
        self.apply_decoded(seq, batch, replay)
    }

    /// The connection to the engine dropped: whatever it held is no longer known, so it is
    /// cleared now rather than kept stale until the engine speaks again.
    pub fn on_disconnect(&mut self) -> Result<()> {
        self.status.disconnects += 1;
        self.status.connected = false;
        if !self.dropped {
            self.dropped = true;
            self.backend.clear_engine(self.engine)?;
        }
        Ok(())
    }

    /// Replays and applies `[from, to)`; counts what could not be recovered.
    fn catch_up(&mut self, from: u64, to: u64, replay: &mut dyn FnMut(u64) -> Option<Replayed>) {
        self.status.replays += 1;
        let mut next = from;
        if let Some(batches) = replay(from) {
            let mut decoder = BatchDecoder::new();
            for (seq, payload) in batches {
                if seq < next || seq >= to {
                    continue;
                }
                if seq > next {
                    self.status.lost_batches += seq - next;
                }
                if self
                    .apply_decoded(seq, decoder.decode(&payload), &mut |_| None)
                    .is_ok()
                {
                    self.status.replayed_batches += 1;
                }
                next = seq + 1;
            }
        }
        if to > next {
            self.status.lost_batches += to - next;
        }
    }

    fn apply_decoded(
        &mut self,
        seq: u64,
        batch: Result<&EventBatch>,
        replay: &mut dyn FnMut(u64) -> Option<Replayed>,
    ) -> Result<()> {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                self.status.decode_errors += 1;
                self.status.lost_batches += 1;
                self.status.last_error = Some(e.to_string());
                return Err(e);
            }
        };
        let report = self.backend.apply_at(self.engine, seq, batch)?;
        self.status.batches += 1;
        self.status.events += batch.events.len() as u64;
        self.status.last_seq = Some(seq);
        self.status.last_ts = batch.ts;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.status.lag_s = (now - batch.ts).max(0.0);
        if !report.orphans.is_empty() {
            self.status.orphans += report.orphans.len() as u64;
            self.recover_orphans(&report.orphans, replay)?;
        }
        Ok(())
    }

    /// Rebuilds the ancestry of orphaned stores from the engine's replay buffer.
    fn recover_orphans(
        &mut self,
        orphans: &[BlockStored],
        replay: &mut dyn FnMut(u64) -> Option<Replayed>,
    ) -> Result<()> {
        let allowed = self
            .last_orphan_replay
            .is_none_or(|t| t.elapsed() >= self.orphan_interval);
        let buffered = if allowed {
            self.last_orphan_replay = Some(Instant::now());
            self.status.replays += 1;
            replay(0)
        } else {
            None
        };
        let Some(buffered) = buffered else {
            self.give_up(orphans.len() as u64);
            return Ok(());
        };
        // Every Stored event of the buffer, by the hashes it announces (latest wins).
        let mut by_hash: HashMap<EngineHash, (Arc<BlockStored>, usize)> = HashMap::new();
        for (_, payload) in &buffered {
            let Ok(batch) = decode_batch(payload) else {
                continue;
            };
            for ev in batch.events {
                if let KvEvent::BlockStored(s) = ev {
                    if s.token_ids.is_empty() || s.group_idx.unwrap_or(0) != 0 {
                        continue;
                    }
                    let s = Arc::new(s);
                    for (j, h) in s.block_hashes.iter().enumerate() {
                        by_hash.insert(*h, (s.clone(), j));
                    }
                }
            }
        }
        let mut unrecovered = 0;
        for orphan in orphans {
            let mut ancestors: Vec<BlockStored> = Vec::new();
            let mut cur = orphan.parent_block_hash;
            while let Some(h) = cur {
                let Some((ev, j)) = by_hash.get(&h) else {
                    break;
                };
                if ancestors.len() > 100_000 {
                    break;
                }
                let prefix = truncate_stored(ev, *j + 1);
                cur = prefix.parent_block_hash;
                ancestors.push(prefix);
            }
            ancestors.reverse();
            if self
                .backend
                .apply_stored_with_ancestry(self.engine, &ancestors, orphan)?
            {
                self.status.orphans_recovered += 1;
            } else {
                unrecovered += 1;
            }
        }
        self.give_up(unrecovered);
        Ok(())
    }

    fn give_up(&mut self, n: u64) {
        if n > 0 {
            self.status.orphans_unrecovered += n;
            self.backend.note_unrecovered(n);
        }
    }
}

/// The first `n` blocks of a Stored event.
fn truncate_stored(ev: &BlockStored, n: usize) -> BlockStored {
    let bs = ev.block_size as usize;
    let mut out = ev.clone();
    out.block_hashes.truncate(n);
    out.token_ids.truncate(n * bs);
    if let Some(x) = out.extra_keys.as_mut() {
        x.truncate(n);
    }
    out
}

/// Reads vLLM's replay ROUTER through a DEALER.
struct Replayer {
    socket: zmq::Socket,
    timeout: Duration,
}

impl Replayer {
    fn connect(ctx: &zmq::Context, endpoint: &str, timeout: Duration) -> Result<Self> {
        let socket = ctx.socket(zmq::DEALER).map_err(zmq_err)?;
        socket.set_linger(0).map_err(zmq_err)?;
        socket.set_rcvhwm(0).map_err(zmq_err)?;
        socket.connect(endpoint).map_err(zmq_err)?;
        Ok(Replayer { socket, timeout })
    }

    /// Batches with `seq >= from`, or `None` on error or when nothing arrived in time. vLLM's
    /// ROUTER keeps ZMQ's default high-water mark (1000 messages), so a long replay may lose
    /// messages, the end marker included: what did arrive by the deadline is returned, and the
    /// caller counts the holes.
    fn fetch(&self, from: u64) -> Option<Replayed> {
        // Drop anything left from an earlier, timed-out replay.
        while self.socket.recv_multipart(zmq::DONTWAIT).is_ok() {}
        let req: [&[u8]; 2] = [b"", &from.to_be_bytes()];
        self.socket.send_multipart(req, 0).ok()?;
        let deadline = Instant::now() + self.timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ready = if left.is_zero() {
                0
            } else {
                self.socket
                    .poll(zmq::POLLIN, left.as_millis().max(1) as i64)
                    .ok()?
            };
            if ready == 0 {
                return if out.is_empty() { None } else { Some(out) };
            }
            let frames = self.socket.recv_multipart(0).ok()?;
            // [b"", topic, seq, payload]
            if frames.len() < 4 || frames[2].len() != 8 {
                continue;
            }
            let seq = u64::from_be_bytes(frames[2][..8].try_into().ok()?);
            if seq == END_SEQ {
                return Some(out);
            }
            out.push((seq, frames[3].clone()));
        }
    }
}

fn zmq_err(e: zmq::Error) -> IndexError {
    IndexError::Zmq(e.to_string())
}

/// A running subscription to one endpoint.
struct Running {
    endpoint: EngineEndpoint,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    streams: Arc<Mutex<HashMap<StreamKey, StreamStatus>>>,
    engines: Arc<Mutex<Vec<EngineId>>>,
}

/// Subscribes to many engines and feeds an index.
pub struct Ingestor {
    backend: Arc<dyn IndexBackend>,
    config: IngestConfig,
    ctx: zmq::Context,
    running: Mutex<HashMap<String, Running>>,
}

impl Ingestor {
    /// An ingestor feeding `backend`.
    pub fn new(backend: Arc<dyn IndexBackend>, config: IngestConfig) -> Self {
        Ingestor {
            backend,
            config,
            ctx: zmq::Context::new(),
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Starts subscribing to an engine. Returns its index id (for its configured rank).
    /// Adding an endpoint twice under one pod name is an error.
    pub fn add(&self, ep: EngineEndpoint) -> Result<EngineId> {
        let spec = EngineSpec {
            pod: ep.pod.clone(),
            dp_rank: ep.dp_rank,
            model: ep.model.clone(),
        };
        let key = spec.name();
        let mut running = self.running.lock();
        if running.contains_key(&key) {
            return Err(IndexError::InvalidArgument(format!(
                "engine {key} is already subscribed"
            )));
        }
        let id = self.backend.add_engine(spec)?;
        let sub = self.ctx.socket(zmq::SUB).map_err(zmq_err)?;
        sub.set_linger(0).map_err(zmq_err)?;
        let monitor_addr = format!(
            "inproc://kvindex-monitor-{}",
            MONITOR_ID.fetch_add(1, Ordering::Relaxed)
        );
        sub.monitor(
            &monitor_addr,
            zmq::SocketEvent::CONNECTED as i32 | zmq::SocketEvent::DISCONNECTED as i32,
        )
        .map_err(zmq_err)?;
        let monitor = self.ctx.socket(zmq::PAIR).map_err(zmq_err)?;
        monitor.connect(&monitor_addr).map_err(zmq_err)?;
        sub.set_rcvhwm(0).map_err(zmq_err)?;
        sub.set_subscribe(ep.topic.as_bytes()).map_err(zmq_err)?;
        if ep.endpoint.contains('*') {
            sub.bind(&ep.endpoint).map_err(zmq_err)?;
        } else {
            sub.connect(&ep.endpoint).map_err(zmq_err)?;
        }
        let replayer = match &ep.replay_endpoint {
            Some(r) => Some(Replayer::connect(&self.ctx, r, self.config.replay_timeout)?),
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(HashMap::new()));
        let engines = Arc::new(Mutex::new(vec![id]));
        let worker = Worker {
            backend: self.backend.clone(),
            config: self.config.clone(),
            endpoint: ep.clone(),
            sub,
            monitor,
            replayer,
            stop: stop.clone(),
            streams: streams.clone(),
            engines: engines.clone(),
            base: id,
        };
        let thread = std::thread::Builder::new()
            .name(format!("kvindex-sub-{key}"))
            .spawn(move || worker.run())
            .map_err(|e| IndexError::Zmq(format!("spawn: {e}")))?;
        running.insert(
            key,
            Running {
                endpoint: ep,
                stop,
                thread: Some(thread),
                streams,
                engines,
            },
        );
        Ok(id)
    }

    /// Stops subscribing to an engine (by display name) and purges it from the index.
    pub fn remove(&self, name: &str) -> Result<()> {
        let mut r = self
            .running
            .lock()
            .remove(name)
            .ok_or_else(|| IndexError::UnknownEngine(name.to_owned()))?;
        r.stop.store(true, Ordering::Relaxed);
        if let Some(t) = r.thread.take() {
            let _ = t.join();
        }
        for id in r.engines.lock().iter() {
            self.backend.remove_engine(*id)?;
        }
        Ok(())
    }

    /// The subscribed endpoints.
    pub fn endpoints(&self) -> Vec<EngineEndpoint> {
        self.running
            .lock()
            .values()
            .map(|r| r.endpoint.clone())
            .collect()
    }

    /// Status of every stream.
    pub fn status(&self) -> Vec<StreamStatus> {
        let mut out: Vec<StreamStatus> = Vec::new();
        for r in self.running.lock().values() {
            out.extend(r.streams.lock().values().cloned());
            if r.streams.lock().is_empty() {
                out.push(StreamStatus {
                    name: EngineSpec {
                        pod: r.endpoint.pod.clone(),
                        dp_rank: r.endpoint.dp_rank,
                        model: String::new(),
                    }
                    .name(),
                    ..StreamStatus::default()
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl Drop for Ingestor {
    fn drop(&mut self) {
        for r in self.running.lock().values_mut() {
            r.stop.store(true, Ordering::Relaxed);
            if let Some(t) = r.thread.take() {
                let _ = t.join();
            }
        }
    }
}

struct Worker {
    backend: Arc<dyn IndexBackend>,
    config: IngestConfig,
    endpoint: EngineEndpoint,
    sub: zmq::Socket,
    /// Connection events of `sub`.
    monitor: zmq::Socket,
    replayer: Option<Replayer>,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<HashMap<StreamKey, StreamStatus>>>,
    engines: Arc<Mutex<Vec<EngineId>>>,
    base: EngineId,
}

static MONITOR_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Worker {
    fn run(self) {
        let mut trackers: HashMap<StreamKey, StreamTracker> = HashMap::new();
        // One decoder for the socket's batches: their memory is reused from one to the next.
        let mut decoder = BatchDecoder::new();
        while !self.stop.load(Ordering::Relaxed) {
            let mut items = [
                self.sub.as_poll_item(zmq::POLLIN),
                self.monitor.as_poll_item(zmq::POLLIN),
            ];
            match zmq::poll(&mut items, 100) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(target: "kvindex", endpoint = %self.endpoint.endpoint, "poll: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            let (sub_ready, monitor_ready) = (items[0].is_readable(), items[1].is_readable());
            if monitor_ready {
                self.connection_events(&mut trackers);
            }
            if !sub_ready {
                continue;
            }
            let frames = match self.sub.recv_multipart(0) {
                Ok(f) => f,
                Err(_) => continue,
            };
            if frames.len() != 3 || frames[1].len() != 8 {
                tracing::warn!(target: "kvindex", frames = frames.len(), "ignoring a message that is not [topic, seq, payload]");
                continue;
            }
            let topic = frames[0].clone();
            let mut seq_bytes = [0u8; 8];
            seq_bytes.copy_from_slice(&frames[1]);
            let seq = u64::from_be_bytes(seq_bytes);
            let batch = decoder.decode(&frames[2]);
            let rank = batch
                .as_ref()
                .ok()
                .and_then(|b| b.data_parallel_rank)
                .and_then(|r| u32::try_from(r).ok())
                .unwrap_or(self.endpoint.dp_rank);
            let key = (topic, rank);
            if !trackers.contains_key(&key) {
                match self.tracker_for(rank) {
                    Ok(t) => {
                        trackers.insert(key.clone(), t);
                    }
                    Err(e) => {
                        tracing::warn!(target: "kvindex", "cannot register rank {rank}: {e}");
                        continue;
                    }
                }
            }
            let Some(tracker) = trackers.get_mut(&key) else {
                continue;
            };
            let replayer = &self.replayer;
            let mut replay = |from: u64| replayer.as_ref().and_then(|r| r.fetch(from));
            if let Err(e) = tracker.on_message(seq, batch, &mut replay) {
                tracker.status.last_error = Some(e.to_string());
            }
            self.streams.lock().insert(key, tracker.status.clone());
        }
    }

    /// Handles the SUB socket's connection events.
    fn connection_events(&self, trackers: &mut HashMap<StreamKey, StreamTracker>) {
        while let Ok(frames) = self.monitor.recv_multipart(zmq::DONTWAIT) {
            let Some(ev) = frames.first().filter(|f| f.len() >= 2) else {
                continue;
            };
            let event = u16::from_le_bytes([ev[0], ev[1]]);
            let connected = event == zmq::SocketEvent::CONNECTED as u16;
            let disconnected = event == zmq::SocketEvent::DISCONNECTED as u16;
            for (key, tracker) in trackers.iter_mut() {
                if disconnected {
                    tracing::warn!(target: "kvindex", engine = %tracker.status.name, "engine disconnected; its blocks are cleared");
                    if let Err(e) = tracker.on_disconnect() {
                        tracker.status.last_error = Some(e.to_string());
                    }
                } else if connected {
                    tracker.status.connected = true;
                }
                self.streams
                    .lock()
                    .insert(key.clone(), tracker.status.clone());
            }
        }
    }

    fn tracker_for(&self, rank: u32) -> Result<StreamTracker> {
        let spec = EngineSpec {
            pod: self.endpoint.pod.clone(),
            dp_rank: rank,
            model: self.endpoint.model.clone(),
        };
        let id = if rank == self.endpoint.dp_rank {
            self.base
        } else {
            self.backend.add_engine(spec.clone())?
        };
        let mut engines = self.engines.lock();
        if !engines.contains(&id) {
            engines.push(id);
        }
        let mut t = StreamTracker::new(self.backend.clone(), id, spec.name(), &self.config);
        t.status.connected = true;
        // An index restored from a snapshot already holds this stream up to some batch: resume
        // after it (a later first message is a gap to replay, an earlier one a restart).
        if let Some(seq) = self.backend.applied_seq(id) {
            t.expected = Some(seq.wrapping_add(1));
            t.status.last_seq = Some(seq);
        }
        Ok(t)
    }
}

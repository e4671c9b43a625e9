//! The daemon's operations, independent of the transport: the HTTP and gRPC APIs both call these.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kvindex::index::TIERS;
use kvindex::ingest::{EngineEndpoint, Ingestor};
use kvindex::{
    EngineHash, EngineId, EngineMatch, Index, IndexBackend, IndexStats, Namespace, Query,
    QueryBlocks, RedisIndex,
};
use serde::{Deserialize, Serialize};

use super::{EngineConfig, ServeConfig};

/// Latency histogram buckets of `/metrics`, in seconds.
pub(crate) const BUCKETS: [f64; 12] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 1e-2, 1e-1,
];

/// Why a request was refused; each API maps it to its own status codes.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// The request is malformed (HTTP 400, gRPC INVALID_ARGUMENT).
    BadRequest(String),
    /// It names something that does not exist (404, NOT_FOUND).
    NotFound(String),
    /// It would register something twice (409, ALREADY_EXISTS).
    Conflict(String),
    /// The index cannot answer now, e.g. Redis is down (503, UNAVAILABLE).
    Unavailable(String),
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::BadRequest(m)
            | ApiError::NotFound(m)
            | ApiError::Conflict(m)
            | ApiError::Unavailable(m) => f.write_str(m),
        }
    }
}

/// Where the index lives.
pub(crate) enum Backend {
    Memory(Index),
    /// Shared with other replicas; an engine should be ingested by one replica only.
    Redis(Arc<RedisIndex>),
}

/// A registered engine: name, model, blocks per tier (when known) and block size.
type Registered = (String, String, Option<[u64; TIERS]>, Option<u32>);

impl Backend {
    pub(crate) fn shared(&self) -> Arc<dyn IndexBackend> {
        match self {
            Backend::Memory(i) => Arc::new(i.clone()),
            Backend::Redis(r) => r.clone(),
        }
    }

    fn engine_by_name(&self, name: &str) -> kvindex::Result<Option<EngineId>> {
        match self {
            Backend::Memory(i) => Ok(i.engine_by_name(name)),
            Backend::Redis(r) => Ok(r
                .engines()?
                .into_iter()
                .find(|e| &*e.name == name)
                .map(|e| e.id)),
        }
    }

    fn query(&self, q: &Query<'_>) -> kvindex::Result<Vec<EngineMatch>> {
        match self {
            Backend::Memory(i) => Ok(i.query(q)),
            Backend::Redis(r) => r.query(q),
        }
    }

    pub(crate) fn stats(&self) -> IndexStats {
        match self {
            Backend::Memory(i) => i.stats(),
            Backend::Redis(r) => r.stats().unwrap_or_default(),
        }
    }

    /// Every registered engine.
    fn engines(&self) -> Vec<Registered> {
        match self {
            Backend::Memory(i) => i
                .engine_stats()
                .into_iter()
                .map(|e| {
                    (
                        e.name.to_string(),
                        e.spec.model,
                        Some(e.blocks),
                        e.block_size,
                    )
                })
                .collect(),
            Backend::Redis(r) => r
                .engines()
                .unwrap_or_default()
                .into_iter()
                .map(|e| (e.name.to_string(), e.spec.model, None, e.block_size))
                .collect(),
        }
    }
}

/// A score request, as both APIs (and the clients) carry it: a prompt by token ids or by vLLM
/// block hashes.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScoreRequest {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_hashes: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_salt: Option<String>,
    /// Only these engines (all when `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engines: Option<Vec<String>>,
}

impl ScoreRequest {
    /// A request for a prompt's token ids.
    pub fn tokens(model: impl Into<String>, token_ids: Vec<u32>) -> Self {
        ScoreRequest {
            model: model.into(),
            token_ids: Some(token_ids),
            ..Default::default()
        }
    }

    /// A request for vLLM's block hashes of a prompt.
    pub fn hashes(model: impl Into<String>, block_hashes: Vec<u64>) -> Self {
        ScoreRequest {
            model: model.into(),
            block_hashes: Some(block_hashes),
            ..Default::default()
        }
    }
}

/// Blocks per tier.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TierCounts {
    pub gpu: u64,
    pub cpu: u64,
    pub storage: u64,
    pub remote: u64,
}

impl TierCounts {
    fn from_array<T: Copy + Into<u64>>(a: [T; TIERS]) -> Self {
        TierCounts {
            gpu: a[0].into(),
            cpu: a[1].into(),
            storage: a[2].into(),
            remote: a[3].into(),
        }
    }
}

/// One engine's answer to a score request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EngineScore {
    pub name: String,
    pub matched_blocks: u32,
    pub matched_tokens: u32,
    pub tiers: TierCounts,
    pub score: f64,
}

/// One engine as `GET /v1/engines` and `ListEngines` show it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct EngineStatus {
    pub name: String,
    pub model: Option<String>,
    pub endpoint: Option<String>,
    pub replay_endpoint: Option<String>,
    /// `waiting`, `connected`, `disconnected`, or `elsewhere` (ingested by another replica).
    pub state: String,
    pub last_seq: Option<u64>,
    pub lag_seconds: f64,
    pub batches: u64,
    pub events: u64,
    pub gaps: u64,
    pub replays: u64,
    pub lost_batches: u64,
    pub restarts: u64,
    pub disconnects: u64,
    pub orphans: u64,
    pub orphans_unrecovered: u64,
    pub blocks: Option<TierCounts>,
    pub block_size: Option<u32>,
    pub last_error: Option<String>,
}

/// The daemon: its index, its ingestion, and its counters.
pub struct App {
    pub(crate) config: ServeConfig,
    pub(crate) index: Backend,
    pub(crate) ingestor: Ingestor,
    /// Engines by the name they go by in the index.
    pub(crate) endpoints: parking_lot::Mutex<HashMap<String, EngineConfig>>,
    scores: AtomicU64,
    pub(crate) bad_requests: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_sum_ns: AtomicU64,
}

/// The name an engine goes by in the index: `NAME`, or `NAME#dpR` for rank R > 0.
pub(crate) fn display_name(e: &EngineConfig) -> String {
    kvindex::EngineSpec {
        pod: e.name.clone(),
        dp_rank: e.dp_rank,
        model: String::new(),
    }
    .name()
}

impl App {
    pub(crate) fn new(config: ServeConfig, index: Backend, ingestor: Ingestor) -> Self {
        App {
            config,
            index,
            ingestor,
            endpoints: parking_lot::Mutex::new(HashMap::new()),
            scores: AtomicU64::new(0),
            bad_requests: AtomicU64::new(0),
            latency_buckets: Default::default(),
            latency_sum_ns: AtomicU64::new(0),
        }
    }

    /// Whether the index is across the network (Redis): its calls block.
    pub(crate) fn index_is_remote(&self) -> bool {
        matches!(self.index, Backend::Redis(_))
    }

    /// Counts a refused request and passes its error on.
    pub(crate) fn refuse<T>(&self, e: ApiError) -> Result<T, ApiError> {
        if matches!(
            e,
            ApiError::BadRequest(_) | ApiError::NotFound(_) | ApiError::Conflict(_)
        ) {
            self.bad_requests.fetch_add(1, Ordering::Relaxed);
        }
        Err(e)
    }

    /// Scores the engines for one prompt, best first.
    pub fn score(&self, req: &ScoreRequest) -> Result<Vec<EngineScore>, ApiError> {
        let ns = Namespace {
            model: req.model.clone(),
            lora_name: req.lora_name.clone(),
            cache_salt: req.cache_salt.clone(),
        };
        if req.model.is_empty() {
            return self.refuse(ApiError::BadRequest("the model must not be empty".into()));
        }
        let filter: Option<Vec<EngineId>> = match &req.engines {
            None => None,
            Some(names) if names.is_empty() => None,
            Some(names) => {
                let mut ids = Vec::with_capacity(names.len());
                for n in names {
                    match self.index.engine_by_name(n) {
                        Ok(Some(id)) => ids.push(id),
                        Ok(None) => {
                            return self.refuse(ApiError::NotFound(format!("unknown engine {n:?}")))
                        }
                        Err(e) => return Err(ApiError::Unavailable(e.to_string())),
                    }
                }
                Some(ids)
            }
        };
        let hashes: Vec<EngineHash>;
        let blocks = match (&req.token_ids, &req.block_hashes) {
            (Some(t), None) => QueryBlocks::Tokens { tokens: t, mm: &[] },
            (None, Some(h)) => {
                hashes = h.iter().map(|&x| EngineHash(x)).collect();
                QueryBlocks::VllmHashes(&hashes)
            }
            _ => {
                return self.refuse(ApiError::BadRequest(
                    "give exactly one of token_ids and block_hashes".into(),
                ))
            }
        };
        let t = Instant::now();
        let matches = self
            .index
            .query(&Query {
                namespace: &ns,
                blocks,
                engines: filter.as_deref(),
            })
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let secs = t.elapsed().as_secs_f64();
        self.scores.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns
            .fetch_add((secs * 1e9) as u64, Ordering::Relaxed);
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        Ok(matches
            .into_iter()
            .map(|m| EngineScore {
                name: m.name.to_string(),
                matched_blocks: m.matched_blocks,
                matched_tokens: m.matched_tokens,
                tiers: TierCounts::from_array(m.tiers),
                score: m.score,
            })
            .collect())
    }

    /// The index's statistics (blocks, memberships, bytes, bytes per block, events).
    pub fn index_stats(&self) -> IndexStats {
        self.index.stats()
    }

    /// Every engine: those this daemon ingests, then (with a shared index) those ingested by
    /// other replicas.
    pub fn engines(&self) -> Vec<EngineStatus> {
        let status = self.ingestor.status();
        let registry = self.index.engines();
        let endpoints = self.endpoints.lock().clone();
        let mut out = Vec::new();
        for s in &status {
            let st = registry.iter().find(|e| e.0 == s.name);
            let base = s.name.split("#dp").next().unwrap_or(&s.name);
            let ep = endpoints.get(&s.name).or_else(|| endpoints.get(base));
            let state = if s.last_seq.is_none() && s.batches == 0 {
                "waiting"
            } else if s.connected {
                "connected"
            } else {
                "disconnected"
            };
            out.push(EngineStatus {
                name: s.name.clone(),
                model: st.map(|e| e.1.clone()),
                endpoint: ep.map(|e| e.endpoint.clone()),
                replay_endpoint: ep.and_then(|e| e.replay_endpoint.clone()),
                state: state.into(),
                // Before an engine's first message after a restore, what the snapshot had applied.
                last_seq: s.last_seq.or_else(|| match &self.index {
                    Backend::Memory(i) => {
                        i.engine_by_name(&s.name).and_then(|id| i.applied_seq(id))
                    }
                    Backend::Redis(_) => None,
                }),
                lag_seconds: s.lag_s,
                batches: s.batches,
                events: s.events,
                gaps: s.gaps,
                replays: s.replays,
                lost_batches: s.lost_batches,
                restarts: s.restarts,
                disconnects: s.disconnects,
                orphans: s.orphans,
                orphans_unrecovered: s.orphans_unrecovered,
                blocks: st.and_then(|e| e.2).map(TierCounts::from_array),
                block_size: st.and_then(|e| e.3),
                last_error: s.last_error.clone(),
            });
        }
        for (name, model, blocks, block_size) in registry {
            if status.iter().any(|s| s.name == name) {
                continue;
            }
            out.push(EngineStatus {
                name,
                model: Some(model),
                state: "elsewhere".into(),
                blocks: blocks.map(TierCounts::from_array),
                block_size,
                ..Default::default()
            });
        }
        out
    }

    /// Subscribes to an engine's event stream (no checks: see [`App::add_engine`]).
    pub(crate) fn subscribe(&self, e: &EngineConfig) -> kvindex::Result<()> {
        self.ingestor.add(EngineEndpoint {
            pod: e.name.clone(),
            model: e.model.clone().unwrap_or_else(|| self.config.model.clone()),
            dp_rank: e.dp_rank,
            endpoint: e.endpoint.clone(),
            replay_endpoint: e.replay_endpoint.clone(),
            topic: e.topic.clone(),
        })?;
        self.endpoints.lock().insert(display_name(e), e.clone());
        Ok(())
    }

    /// Registers an engine at run time; returns the name it goes by.
    pub fn add_engine(&self, e: &EngineConfig) -> Result<String, ApiError> {
        if e.name.is_empty() || e.name.contains('#') || !e.endpoint.starts_with("tcp://") {
            return self.refuse(ApiError::BadRequest(
                "an engine needs a name (without '#') and a tcp:// endpoint".into(),
            ));
        }
        if let Some(r) = &e.replay_endpoint {
            if !r.starts_with("tcp://") {
                return self.refuse(ApiError::BadRequest(format!(
                    "the replay endpoint {r:?} is not a tcp:// address"
                )));
            }
        }
        let name = display_name(e);
        if self.endpoints.lock().contains_key(&name) {
            return self.refuse(ApiError::Conflict(format!(
                "engine {name:?} is already registered"
            )));
        }
        self.subscribe(e)
            .map_err(|err| ApiError::BadRequest(err.to_string()))?;
        Ok(name)
    }

    /// Unsubscribes from an engine (every data-parallel rank of a bare name) and purges its
    /// blocks.
    pub fn remove_engine(&self, name: &str) -> Result<(), ApiError> {
        let removed: Vec<String> = {
            let mut eps = self.endpoints.lock();
            let names: Vec<String> = eps
                .iter()
                .filter(|(k, e)| k.as_str() == name || e.name == name)
                .map(|(k, _)| k.clone())
                .collect();
            for n in &names {
                eps.remove(n);
            }
            names
        };
        if removed.is_empty() {
            return self.refuse(ApiError::NotFound(format!("unknown engine {name:?}")));
        }
        for n in removed {
            self.ingestor
                .remove(&n)
                .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        }
        Ok(())
    }

    /// Whether every engine of the configuration is subscribed; the missing ones otherwise.
    pub fn missing_engines(&self) -> Vec<String> {
        let eps = self.endpoints.lock();
        self.config
            .engines
            .iter()
            .filter(|e| !eps.contains_key(&display_name(e)))
            .map(|e| e.name.clone())
            .collect()
    }

    /// The Prometheus text exposition of the daemon's metrics.
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let s = self.index.stats();
        let status = self.ingestor.status();
        let sum = |f: fn(&kvindex::ingest::StreamStatus) -> u64| status.iter().map(f).sum::<u64>();
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter("kvmesh_index_events_total", "KV events applied.", s.events);
        counter(
            "kvmesh_index_blocks_stored_total",
            "Block announcements applied.",
            s.blocks_stored,
        );
        counter(
            "kvmesh_index_blocks_removed_total",
            "Block removals applied.",
            s.blocks_removed,
        );
        counter(
            "kvmesh_ingest_batches_total",
            "Event batches applied.",
            sum(|x| x.batches),
        );
        counter(
            "kvmesh_ingest_gaps_total",
            "Sequence gaps seen.",
            sum(|x| x.gaps),
        );
        counter(
            "kvmesh_ingest_replays_total",
            "Replays requested.",
            sum(|x| x.replays),
        );
        counter(
            "kvmesh_ingest_lost_batches_total",
            "Batches that could not be recovered.",
            sum(|x| x.lost_batches),
        );
        counter(
            "kvmesh_ingest_restarts_total",
            "Engine restarts detected.",
            sum(|x| x.restarts),
        );
        counter(
            "kvmesh_index_orphans_total",
            "Stored events with an unknown parent.",
            s.orphans,
        );
        counter(
            "kvmesh_index_orphans_unrecovered_total",
            "Orphans that could not be recovered.",
            s.orphans_unrecovered,
        );
        counter(
            "kvmesh_index_evicted_blocks_total",
            "Blocks evicted to stay within the byte budget.",
            s.evicted_blocks,
        );
        counter(
            "kvmesh_api_bad_requests_total",
            "Requests refused as malformed (HTTP and gRPC).",
            self.bad_requests.load(Ordering::Relaxed),
        );
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut out,
            "kvmesh_index_bytes",
            "Bytes held by the index's tables.",
            s.bytes as f64,
        );
        gauge(
            &mut out,
            "kvmesh_index_blocks",
            "Distinct blocks held by some engine.",
            s.blocks as f64,
        );
        gauge(
            &mut out,
            "kvmesh_index_bytes_per_block",
            "Index bytes per distinct block.",
            s.bytes_per_block,
        );
        gauge(
            &mut out,
            "kvmesh_index_engines",
            "Registered engines.",
            s.engines as f64,
        );
        let name = "kvmesh_index_query_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Score query latency.\n# TYPE {name} histogram"
        );
        let mut cum = 0;
        for (b, c) in BUCKETS.iter().zip(&self.latency_buckets) {
            cum += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let total = self.scores.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.latency_sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count {total}");
        out
    }
}

//! `kvmesh serve`: kvindex and its ingestion as a daemon with an HTTP/JSON API.
//!
//! Configuration comes from defaults, then a TOML file (`--config`), then the environment
//! (`KVMESH_*`), then flags; later sources win, and `--engine` flags add to the file's engines.
//! `--print-config` prints the merged result as TOML and exits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use kvindex::index::TIERS;
use kvindex::ingest::{EngineEndpoint, IngestConfig, Ingestor};
use kvindex::{
    EngineHash, EngineId, Index, IndexBackend, IndexConfig, IndexStats, Namespace, Query,
    QueryBlocks, RedisIndex,
};
use serde::{Deserialize, Serialize};

/// Options of `kvmesh serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// A TOML configuration file.
    #[arg(long, env = "KVMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the HTTP API [default: 127.0.0.1:8080].
    #[arg(long, env = "KVMESH_LISTEN")]
    pub listen: Option<String>,
    /// Model of engines added without one [default: "default"].
    #[arg(long, env = "KVMESH_MODEL")]
    pub model: Option<String>,
    /// Memory budget of the index, in bytes [default: 1 GiB].
    #[arg(long, env = "KVMESH_BYTE_BUDGET")]
    pub byte_budget: Option<u64>,
    /// Keep the index on this Redis (redis://HOST:PORT/) so several replicas share it
    /// [default: in memory].
    #[arg(long, env = "KVMESH_REDIS")]
    pub redis: Option<String>,
    /// Key prefix of the index on Redis [default: "kvmesh"].
    #[arg(long, env = "KVMESH_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Write the index to this file periodically (atomically) and restore it at start.
    #[arg(long, env = "KVMESH_SNAPSHOT")]
    pub snapshot: Option<PathBuf>,
    /// Seconds between snapshots [default: 10].
    #[arg(long, env = "KVMESH_SNAPSHOT_INTERVAL")]
    pub snapshot_interval: Option<u64>,
    /// Require `Authorization: Bearer TOKEN` on the API (health checks stay open). Prefer the
    /// environment or the file over the command line, which other users can read.
    #[arg(long, env = "KVMESH_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Largest accepted request body, in bytes [default: 8 MiB].
    #[arg(long, env = "KVMESH_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// An engine to subscribe to: NAME=tcp://HOST:PORT[,replay=tcp://HOST:PORT][,model=M][,dp=R]
    /// (repeatable; adds to the configuration file's engines).
    #[arg(long = "engine", value_name = "SPEC")]
    pub engines: Vec<String>,
    /// A vLLM engine to discover: NAME=http://HOST:PORT[,model=M]. Its `GET /kv_event_sources`
    /// names the event (and replay) endpoints of every data-parallel rank (repeatable).
    #[arg(long = "engine-url", value_name = "SPEC")]
    pub engine_urls: Vec<String>,
    /// Print the merged configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Tier weights of scores.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TierWeights {
    pub gpu: f64,
    pub cpu: f64,
    pub storage: f64,
    pub remote: f64,
}

/// One engine to subscribe to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub name: String,
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub dp_rank: u32,
    #[serde(default)]
    pub topic: String,
}

/// The daemon's configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    pub listen: String,
    pub model: String,
    /// Redis URL of a shared index; in memory when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<String>,
    pub redis_prefix: String,
    /// Snapshot file of the in-memory index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<PathBuf>,
    pub snapshot_interval_secs: u64,
    /// Bearer token the API requires, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_token: Option<String>,
    pub byte_budget: u64,
    pub max_request_bytes: usize,
    pub tier_weights: TierWeights,
    pub engines: Vec<EngineConfig>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        let w = IndexConfig::default().tier_weights;
        ServeConfig {
            listen: "127.0.0.1:8080".into(),
            model: "default".into(),
            redis: None,
            redis_prefix: "kvmesh".into(),
            snapshot: None,
            snapshot_interval_secs: 10,
            auth_token: None,
            byte_budget: IndexConfig::default().byte_budget as u64,
            max_request_bytes: 8 << 20,
            tier_weights: TierWeights {
                gpu: w[0],
                cpu: w[1],
                storage: w[2],
                remote: w[3],
            },
            engines: Vec::new(),
        }
    }
}

/// Parses `NAME=ENDPOINT[,replay=EP][,model=M][,dp=R][,topic=T]`.
pub fn parse_engine(spec: &str) -> Result<EngineConfig> {
    let (name, rest) = spec.split_once('=').with_context(|| {
        format!("--engine {spec:?}: expected NAME=tcp://HOST:PORT[,replay=...]")
    })?;
    let mut parts = rest.split(',');
    let endpoint = parts.next().unwrap_or_default().to_owned();
    if name.is_empty() || endpoint.is_empty() {
        bail!("--engine {spec:?}: the name and the endpoint must not be empty");
    }
    let mut e = EngineConfig {
        name: name.to_owned(),
        endpoint,
        replay_endpoint: None,
        model: None,
        dp_rank: 0,
        topic: String::new(),
    };
    for p in parts {
        match p.split_once('=') {
            Some(("replay", v)) => e.replay_endpoint = Some(v.to_owned()),
            Some(("model", v)) => e.model = Some(v.to_owned()),
            Some(("dp", v)) => {
                e.dp_rank = v
                    .parse()
                    .with_context(|| format!("--engine {spec:?}: dp={v:?} is not a rank"))?
            }
            Some(("topic", v)) => e.topic = v.to_owned(),
            _ => bail!("--engine {spec:?}: unknown option {p:?} (replay=, model=, dp=, topic=)"),
        }
    }
    Ok(e)
}

/// Asks a vLLM server (`NAME=http://HOST:PORT[,model=M]`) for its KV-event endpoints, one engine
/// per data-parallel rank. A wildcard bind address (`*`, `0.0.0.0`, `::`) becomes the URL's host.
pub fn discover(spec: &str) -> Result<Vec<EngineConfig>> {
    let (name, rest) = spec
        .split_once('=')
        .with_context(|| format!("--engine-url {spec:?}: expected NAME=http://HOST:PORT"))?;
    let mut parts = rest.split(',');
    let url = parts
        .next()
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_owned();
    let mut model = None;
    for p in parts {
        match p.split_once('=') {
            Some(("model", v)) => model = Some(v.to_owned()),
            _ => bail!("--engine-url {spec:?}: unknown option {p:?} (model=)"),
        }
    }
    let host = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .and_then(|r| r.split([':', '/']).next())
        .filter(|h| !h.is_empty())
        .with_context(|| format!("--engine-url {spec:?}: not an http(s) URL"))?
        .to_owned();
    let sources: serde_json::Value = ureq::get(&format!("{url}/kv_event_sources"))
        .call()
        .with_context(|| format!("GET {url}/kv_event_sources"))?
        .body_mut()
        .read_json()
        .with_context(|| format!("reading {url}/kv_event_sources"))?;
    let Some(ranks) = sources.as_object() else {
        bail!("{url}/kv_event_sources did not answer a JSON object: {sources}");
    };
    let resolve = |ep: &str| {
        ["*", "0.0.0.0", "[::]", "::"]
            .iter()
            .find_map(|w| ep.strip_prefix("tcp://").and_then(|r| r.strip_prefix(w)))
            .map(|port| format!("tcp://{host}{port}"))
            .unwrap_or_else(|| ep.to_owned())
    };
    let mut out = Vec::new();
    for (rank, cfg) in ranks {
        let dp_rank: u32 = rank
            .parse()
            .with_context(|| format!("{url}: rank {rank:?}"))?;
        let Some(endpoint) = cfg["endpoint"].as_str() else {
            bail!("{url}: rank {rank} publishes no KV events (no endpoint): {cfg}");
        };
        out.push(EngineConfig {
            name: name.to_owned(),
            endpoint: resolve(endpoint),
            replay_endpoint: cfg["replay_endpoint"].as_str().map(resolve),
            model: model.clone(),
            dp_rank,
            topic: cfg["topic"].as_str().unwrap_or_default().to_owned(),
        });
    }
    if out.is_empty() {
        bail!("{url}/kv_event_sources lists no engine");
    }
    Ok(out)
}

/// Merges defaults, the file, the environment and the flags (clap has already put the
/// environment under the flags it names).
pub fn load_config(args: &ServeArgs) -> Result<ServeConfig> {
    let mut c = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => ServeConfig::default(),
    };
    if let Some(v) = &args.listen {
        c.listen = v.clone();
    }
    if let Some(v) = &args.model {
        c.model = v.clone();
    }
    if let Some(v) = &args.redis {
        c.redis = Some(v.clone());
    }
    if let Some(v) = &args.redis_prefix {
        c.redis_prefix = v.clone();
    }
    if let Some(v) = &args.snapshot {
        c.snapshot = Some(v.clone());
    }
    if let Some(v) = &args.auth_token {
        c.auth_token = Some(v.clone());
    }
    if c.auth_token.as_deref().is_some_and(str::is_empty) {
        bail!("the auth token must not be empty");
    }
    if let Some(v) = args.snapshot_interval {
        c.snapshot_interval_secs = v.max(1);
    }
    if c.snapshot.is_some() && c.redis.is_some() {
        bail!("--snapshot is for the in-memory index; Redis keeps its own data");
    }
    if let Some(v) = args.byte_budget {
        c.byte_budget = v;
    }
    if let Some(v) = args.max_request_bytes {
        c.max_request_bytes = v;
    }
    for e in &args.engines {
        c.engines.push(parse_engine(e)?);
    }
    for spec in &args.engine_urls {
        c.engines.extend(discover(spec)?);
    }
    let mut seen = std::collections::HashSet::new();
    for e in &c.engines {
        if !seen.insert((&e.name, e.dp_rank)) {
            bail!(
                "engine {:?} (rank {}) is configured twice",
                e.name,
                e.dp_rank
            );
        }
    }
    Ok(c)
}

/// Latency histogram buckets of `/metrics`, in seconds.
const BUCKETS: [f64; 12] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 1e-2, 1e-1,
];

/// A registered engine: name, model, blocks per tier (when known) and block size.
type Registered = (String, String, Option<[u64; TIERS]>, Option<u32>);

/// Where the index lives.
enum Backend {
    Memory(Index),
    /// Shared with other replicas; an engine should be ingested by one replica only.
    Redis(Arc<RedisIndex>),
}

impl Backend {
    fn shared(&self) -> Arc<dyn IndexBackend> {
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

    fn query(&self, q: &Query<'_>) -> kvindex::Result<Vec<kvindex::EngineMatch>> {
        match self {
            Backend::Memory(i) => Ok(i.query(q)),
            Backend::Redis(r) => r.query(q),
        }
    }

    fn stats(&self) -> IndexStats {
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

struct App {
    config: ServeConfig,
    index: Backend,
    ingestor: Ingestor,
    endpoints: parking_lot::Mutex<std::collections::HashMap<String, EngineConfig>>,
    scores: AtomicU64,
    bad_requests: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_sum_ns: AtomicU64,
}

type Shared = Arc<App>;

fn json_error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// A request body as JSON, whatever its content type says (`curl -d` sends a form type); a body
/// over the size limit is a 413, anything unparsable a 400 naming the problem.
fn parse_body<T: serde::de::DeserializeOwned>(
    app: &App,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Box<Response>> {
    let bytes = match body {
        Ok(b) => b,
        Err(rej) => {
            app.bad_requests.fetch_add(1, Ordering::Relaxed);
            let status = if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return Err(Box::new(json_error(status, rej.body_text())));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        app.bad_requests.fetch_add(1, Ordering::Relaxed);
        Box::new(json_error(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        ))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreRequest {
    model: String,
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
    #[serde(default)]
    block_hashes: Option<Vec<u64>>,
    #[serde(default)]
    lora_name: Option<String>,
    #[serde(default)]
    cache_salt: Option<String>,
    #[serde(default)]
    engines: Option<Vec<String>>,
}

async fn score(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: ScoreRequest = match parse_body(&app, body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let ns = Namespace {
        model: req.model.clone(),
        lora_name: req.lora_name.clone(),
        cache_salt: req.cache_salt.clone(),
    };
    let filter: Option<Vec<EngineId>> = match &req.engines {
        None => None,
        Some(names) => {
            let mut ids = Vec::new();
            for n in names {
                match app.index.engine_by_name(n) {
                    Ok(Some(id)) => ids.push(id),
                    Ok(None) => {
                        app.bad_requests.fetch_add(1, Ordering::Relaxed);
                        return json_error(StatusCode::NOT_FOUND, format!("unknown engine {n:?}"));
                    }
                    Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
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
            app.bad_requests.fetch_add(1, Ordering::Relaxed);
            return json_error(
                StatusCode::BAD_REQUEST,
                "give exactly one of token_ids and block_hashes",
            );
        }
    };
    let t = Instant::now();
    let matches = match app.index.query(&Query {
        namespace: &ns,
        blocks,
        engines: filter.as_deref(),
    }) {
        Ok(m) => m,
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let secs = t.elapsed().as_secs_f64();
    app.scores.fetch_add(1, Ordering::Relaxed);
    app.latency_sum_ns
        .fetch_add((secs * 1e9) as u64, Ordering::Relaxed);
    if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
        app.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
    }
    let engines: Vec<serde_json::Value> = matches
        .iter()
        .map(|m| {
            serde_json::json!({
                "name": &*m.name,
                "matched_blocks": m.matched_blocks,
                "matched_tokens": m.matched_tokens,
                "tiers": { "gpu": m.tiers[0], "cpu": m.tiers[1], "storage": m.tiers[2], "remote": m.tiers[3] },
                "score": m.score,
            })
        })
        .collect();
    Json(serde_json::json!({ "engines": engines })).into_response()
}

async fn list_engines(State(app): State<Shared>) -> Response {
    let status = app.ingestor.status();
    let registry = app.index.engines();
    let endpoints = app.endpoints.lock().clone();
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
        out.push(serde_json::json!({
            "name": s.name,
            "model": st.map(|e| e.1.clone()),
            "endpoint": ep.map(|e| e.endpoint.clone()),
            "replay_endpoint": ep.and_then(|e| e.replay_endpoint.clone()),
            "state": state,
            // Before an engine's first message after a restore, what the snapshot had applied.
            "last_seq": s.last_seq.or_else(|| match &app.index {
                Backend::Memory(i) => i.engine_by_name(&s.name).and_then(|id| i.applied_seq(id)),
                Backend::Redis(_) => None,
            }),
            "lag_seconds": s.lag_s,
            "batches": s.batches,
            "events": s.events,
            "gaps": s.gaps,
            "replays": s.replays,
            "lost_batches": s.lost_batches,
            "restarts": s.restarts,
            "disconnects": s.disconnects,
            "orphans": s.orphans,
            "orphans_unrecovered": s.orphans_unrecovered,
            "blocks": st.and_then(|e| e.2).map(|b| serde_json::json!({
                "gpu": b[0], "cpu": b[1], "storage": b[2], "remote": b[3],
            })),
            "block_size": st.and_then(|e| e.3),
            "last_error": s.last_error,
        }));
    }
    // With a shared index, engines ingested by other replicas.
    for (name, model, blocks, block_size) in &registry {
        if status.iter().any(|s| &s.name == name) {
            continue;
        }
        out.push(serde_json::json!({
            "name": name,
            "model": model,
            "state": "elsewhere",
            "blocks": blocks.map(|b| serde_json::json!({
                "gpu": b[0], "cpu": b[1], "storage": b[2], "remote": b[3],
            })),
            "block_size": block_size,
        }));
    }
    Json(serde_json::json!({ "engines": out })).into_response()
}

fn subscribe(app: &App, e: &EngineConfig) -> kvindex::Result<()> {
    app.ingestor.add(EngineEndpoint {
        pod: e.name.clone(),
        model: e.model.clone().unwrap_or_else(|| app.config.model.clone()),
        dp_rank: e.dp_rank,
        endpoint: e.endpoint.clone(),
        replay_endpoint: e.replay_endpoint.clone(),
        topic: e.topic.clone(),
    })?;
    app.endpoints.lock().insert(display_name(e), e.clone());
    Ok(())
}

/// The name an engine goes by in the index: `NAME`, or `NAME#dpR` for rank R > 0.
fn display_name(e: &EngineConfig) -> String {
    kvindex::EngineSpec {
        pod: e.name.clone(),
        dp_rank: e.dp_rank,
        model: String::new(),
    }
    .name()
}

async fn add_engine(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let e: EngineConfig = match parse_body(&app, body) {
        Ok(e) => e,
        Err(resp) => return *resp,
    };
    if e.name.is_empty() || e.name.contains('#') || !e.endpoint.starts_with("tcp://") {
        app.bad_requests.fetch_add(1, Ordering::Relaxed);
        return json_error(
            StatusCode::BAD_REQUEST,
            "an engine needs a name (without '#') and a tcp:// endpoint",
        );
    }
    if app.endpoints.lock().contains_key(&e.name) {
        return json_error(
            StatusCode::CONFLICT,
            format!("engine {:?} is already registered", e.name),
        );
    }
    match subscribe(&app, &e) {
        Ok(()) => (
            StatusCode::CREATED,
            Json(serde_json::json!({ "name": e.name })),
        )
            .into_response(),
        Err(err) => json_error(StatusCode::BAD_REQUEST, err.to_string()),
    }
}

async fn remove_engine(State(app): State<Shared>, Path(name): Path<String>) -> Response {
    let known = app.endpoints.lock().remove(&name).is_some();
    if !known {
        return json_error(StatusCode::NOT_FOUND, format!("unknown engine {name:?}"));
    }
    match app.ingestor.remove(&name) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(err) => json_error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
    }
}

async fn metrics(State(app): State<Shared>) -> Response {
    use std::fmt::Write;
    let s = app.index.stats();
    let status = app.ingestor.status();
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
        "kvmesh_http_bad_requests_total",
        "Requests refused as malformed.",
        app.bad_requests.load(Ordering::Relaxed),
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
    for (b, c) in BUCKETS.iter().zip(&app.latency_buckets) {
        cum += c.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
    }
    let total = app.scores.load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
    let _ = writeln!(
        out,
        "{name}_sum {}",
        app.latency_sum_ns.load(Ordering::Relaxed) as f64 / 1e9
    );
    let _ = writeln!(out, "{name}_count {total}");
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Refuses requests without the configured bearer token (when one is configured).
async fn require_token(
    State(app): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(token) = &app.config.auth_token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Compare in constant time, so the token cannot be guessed byte by byte.
        let ok = given.is_some_and(|g| {
            g.len() == token.len()
                && g.bytes()
                    .zip(token.bytes())
                    .fold(0u8, |a, (x, y)| a | (x ^ y))
                    == 0
        });
        if !ok {
            app.bad_requests.fetch_add(1, Ordering::Relaxed);
            return json_error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        }
    }
    next.run(req).await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(app): State<Shared>) -> Response {
    // Ready once every configured engine is subscribed (registration happens before listening,
    // so this holds unless one was removed by hand).
    let missing: Vec<String> = app
        .config
        .engines
        .iter()
        .filter(|e| !app.endpoints.lock().contains_key(&display_name(e)))
        .map(|e| e.name.clone())
        .collect();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("engines not subscribed: {missing:?}"),
        )
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(args: &ServeArgs) -> Result<()> {
    let config = load_config(args)?;
    if args.print_config {
        let mut shown = config.clone();
        if shown.auth_token.is_some() {
            shown.auth_token = Some("(set)".into());
        }
        print!(
            "{}",
            toml::to_string_pretty(&shown).context("printing the configuration")?
        );
        return Ok(());
    }
    let w = &config.tier_weights;
    let index_config = IndexConfig {
        byte_budget: usize::try_from(config.byte_budget).unwrap_or(usize::MAX),
        tier_weights: [w.gpu, w.cpu, w.storage, w.remote],
        ..IndexConfig::default()
    };
    let index = match &config.redis {
        None => Backend::Memory(match config.snapshot.as_deref().filter(|p| p.exists()) {
            None => Index::new(index_config),
            Some(path) => match kvindex::snapshot::read(path)
                .and_then(|snap| Index::restore(index_config.clone(), &snap))
            {
                Ok(index) => {
                    let st = index.stats();
                    eprintln!(
                        "kvmesh serve: restored {} blocks of {} engines from {}",
                        st.blocks,
                        st.engines,
                        path.display()
                    );
                    index
                }
                Err(e) => {
                    eprintln!(
                        "kvmesh serve: not restoring {}: {e}; starting empty",
                        path.display()
                    );
                    Index::new(index_config)
                }
            },
        }),
        Some(url) => Backend::Redis(Arc::new(
            RedisIndex::connect(url, &config.redis_prefix, index_config)
                .with_context(|| format!("connecting to redis at {url}"))?,
        )),
    };
    let ingestor = Ingestor::new(index.shared(), IngestConfig::default());
    let app = Arc::new(App {
        config: config.clone(),
        index,
        ingestor,
        endpoints: parking_lot::Mutex::new(Default::default()),
        scores: AtomicU64::new(0),
        bad_requests: AtomicU64::new(0),
        latency_buckets: Default::default(),
        latency_sum_ns: AtomicU64::new(0),
    });
    for e in &config.engines {
        subscribe(&app, e).with_context(|| format!("subscribing to engine {:?}", e.name))?;
    }
    let addr: SocketAddr = config
        .listen
        .parse()
        .with_context(|| format!("listen address {:?}", config.listen))?;
    if let (Some(path), Backend::Memory(index)) = (app.config.snapshot.clone(), &app.index) {
        let index = index.clone();
        let every = std::time::Duration::from_secs(app.config.snapshot_interval_secs);
        std::thread::Builder::new()
            .name("kvmesh-snapshot".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                if let Err(e) = kvindex::snapshot::write(&path, &index.snapshot()) {
                    eprintln!("kvmesh serve: {e}");
                }
            })
            .context("starting the snapshot thread")?;
    }
    let final_snapshot = match (&app.config.snapshot, &app.index) {
        (Some(p), Backend::Memory(i)) => Some((p.clone(), i.clone())),
        _ => None,
    };
    let api = Router::new()
        .route("/v1/score", post(score))
        .route("/v1/engines", get(list_engines).post(add_engine))
        .route("/v1/engines/{name}", delete(remove_engine))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            require_token,
        ));
    let router = Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(config.max_request_bytes))
        .with_state(app);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        eprintln!("kvmesh serve: listening on http://{}", listener.local_addr()?);
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
                }
            })
            .await
            .context("serving")
    })?;
    if let Some((path, index)) = final_snapshot {
        kvindex::snapshot::write(&path, &index.snapshot()).context("writing the last snapshot")?;
    }
    Ok(())
}

//! `kvmesh serve`: kvindex and its ingestion as a daemon with an HTTP/JSON API and a gRPC API.
//!
//! Configuration comes from defaults, then a TOML file (`--config`), then the environment
//! (`KVMESH_*`), then flags; later sources win, and `--engine` flags add to the file's engines.
//! `--print-config` prints the merged result as TOML and exits.

mod api;
mod discovery;
mod fastjson;
mod grpc;
mod http;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use kvindex::ingest::{IngestConfig, Ingestor};
use kvindex::{Index, IndexConfig, RedisIndex};
use serde::{Deserialize, Serialize};

use api::Backend;
pub use api::{ApiError, App, EngineScore, EngineStatus, ScoreRequest, TierCounts};
pub use discovery::{parse_dns_pool, DnsPool};
pub use grpc::pb;

/// Options of `kvmesh serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// A TOML configuration file.
    #[arg(long, env = "KVMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the HTTP API [default: 127.0.0.1:8080].
    #[arg(long, env = "KVMESH_LISTEN")]
    pub listen: Option<String>,
    /// Address of the gRPC API; "off" disables it [default: 127.0.0.1:8081].
    #[arg(long, env = "KVMESH_GRPC_LISTEN")]
    pub grpc_listen: Option<String>,
    /// TLS certificate chain (PEM) for both APIs; needs --tls-key.
    #[arg(long, env = "KVMESH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for both APIs; needs --tls-cert.
    #[arg(long, env = "KVMESH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
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
    /// A pool of engines behind a DNS name (e.g. a Kubernetes headless Service), re-resolved
    /// periodically: NAME=HOST:PORT[,replay=PORT][,model=M][,topic=T] (repeatable). Each address
    /// is an engine NAME-ADDRESS; addresses that disappear are purged.
    #[arg(long = "engine-dns", value_name = "SPEC")]
    pub engine_dns: Vec<String>,
    /// DNS server for --engine-dns (IP:PORT) [default: the system's resolv.conf].
    #[arg(long, env = "KVMESH_DNS_SERVER")]
    pub dns_server: Option<String>,
    /// Milliseconds between DNS re-resolutions [default: 5000].
    #[arg(long, env = "KVMESH_DNS_INTERVAL_MS")]
    pub dns_interval_ms: Option<u64>,
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
    /// Address of the gRPC API; `off` disables it.
    pub grpc_listen: String,
    /// TLS certificate chain and private key (PEM files) for both APIs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
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
    /// Pools of engines discovered through DNS.
    pub dns_pools: Vec<DnsPool>,
    /// DNS server of the pools (IP:PORT); the system's when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_server: Option<String>,
    pub dns_interval_ms: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        let w = IndexConfig::default().tier_weights;
        ServeConfig {
            listen: "127.0.0.1:8080".into(),
            grpc_listen: "127.0.0.1:8081".into(),
            tls_cert: None,
            tls_key: None,
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
            dns_pools: Vec::new(),
            dns_server: None,
            dns_interval_ms: 5000,
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
    if let Some(v) = &args.grpc_listen {
        c.grpc_listen = v.clone();
    }
    if let Some(v) = &args.tls_cert {
        c.tls_cert = Some(v.clone());
    }
    if let Some(v) = &args.tls_key {
        c.tls_key = Some(v.clone());
    }
    if c.tls_cert.is_some() != c.tls_key.is_some() {
        bail!("TLS needs both a certificate (--tls-cert) and a key (--tls-key)");
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
    for spec in &args.engine_dns {
        c.dns_pools.push(parse_dns_pool(spec)?);
    }
    if let Some(v) = &args.dns_server {
        c.dns_server = Some(v.clone());
    }
    if let Some(v) = args.dns_interval_ms {
        c.dns_interval_ms = v.max(10);
    }
    if let Some(s) = &c.dns_server {
        s.parse::<SocketAddr>()
            .with_context(|| format!("--dns-server {s:?}: expected IP:PORT"))?;
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

/// Whether an `Authorization` header value carries the token, compared in constant time so that
/// the token cannot be guessed byte by byte.
pub(crate) fn token_matches(header: Option<&str>, token: &str) -> bool {
    header
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|g| {
            g.len() == token.len()
                && g.bytes()
                    .zip(token.bytes())
                    .fold(0u8, |a, (x, y)| a | (x ^ y))
                    == 0
        })
}

/// Opens the index the configuration asks for: Redis, or in memory (restored from the snapshot
/// when there is a readable one).
fn open_index(config: &ServeConfig) -> Result<Backend> {
    let w = &config.tier_weights;
    let index_config = IndexConfig {
        byte_budget: usize::try_from(config.byte_budget).unwrap_or(usize::MAX),
        tier_weights: [w.gpu, w.cpu, w.storage, w.remote],
        ..IndexConfig::default()
    };
    Ok(match &config.redis {
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
    })
}

/// A daemon running in this process (its own threads and runtime), stopped when dropped.
pub struct Daemon {
    app: Arc<App>,
    http_addr: SocketAddr,
    grpc_addr: Option<SocketAddr>,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Daemon {
    /// Starts the daemon of a configuration: opens the index, subscribes to the configured
    /// engines, binds both APIs (port 0 picks a free port) and serves them in the background.
    pub fn start(config: ServeConfig) -> Result<Daemon> {
        let index = open_index(&config)?;
        let ingestor = Ingestor::new(index.shared(), IngestConfig::default());
        let app = Arc::new(App::new(config.clone(), index, ingestor));
        for e in &config.engines {
            app.subscribe(e)
                .with_context(|| format!("subscribing to engine {:?}", e.name))?;
        }
        let http_addr: SocketAddr = config
            .listen
            .parse()
            .with_context(|| format!("listen address {:?}", config.listen))?;
        let grpc_addr: Option<SocketAddr> = match config.grpc_listen.as_str() {
            "off" | "" => None,
            a => Some(
                a.parse()
                    .with_context(|| format!("gRPC listen address {a:?}"))?,
            ),
        };
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(c), Some(k)) => Some(tls::Tls::load(c, k)?),
            _ => None,
        };
        if let (Some(path), Backend::Memory(index)) = (config.snapshot.clone(), &app.index) {
            let index = index.clone();
            let every = std::time::Duration::from_secs(config.snapshot_interval_secs);
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
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("kvmesh-serve")
            .build()
            .context("starting the runtime")?;
        // Bind here, so that a port in use is an error of `start` and port 0 is resolved.
        let (http_listener, grpc_listener) = rt.block_on(async {
            let h = tokio::net::TcpListener::bind(http_addr)
                .await
                .with_context(|| format!("binding the HTTP API to {http_addr}"))?;
            let g = match grpc_addr {
                Some(a) => Some(
                    tokio::net::TcpListener::bind(a)
                        .await
                        .with_context(|| format!("binding the gRPC API to {a}"))?,
                ),
                None => None,
            };
            anyhow::Ok((h, g))
        })?;
        let http_addr = http_listener.local_addr()?;
        let grpc_addr = match &grpc_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let router = http::router(app.clone());
        let grpc_app = app.clone();
        let dns = (!config.dns_pools.is_empty()).then(|| {
            discovery::run(
                app.clone(),
                config.dns_pools.clone(),
                config.dns_server.as_deref().and_then(|s| s.parse().ok()),
                std::time::Duration::from_millis(config.dns_interval_ms),
            )
        });
        let thread = std::thread::Builder::new()
            .name("kvmesh-serve".into())
            .spawn(move || {
                rt.block_on(async move {
                    if let Some(dns) = dns {
                        tokio::spawn(dns);
                    }
                    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                        let _ = rx.wait_for(|s| *s).await;
                    };
                    let http = tls::serve_http(
                        http_listener,
                        router,
                        tls.clone(),
                        stopped(stop_rx.clone()),
                    );
                    let grpc = async {
                        match grpc_listener {
                            Some(l) => {
                                tls::serve_grpc(l, grpc_app, tls.clone(), stopped(stop_rx.clone()))
                                    .await
                            }
                            None => Ok(()),
                        }
                    };
                    let (h, g) = tokio::join!(http, grpc);
                    h.and(g)
                })
            })
            .context("starting the server thread")?;
        Ok(Daemon {
            app,
            http_addr,
            grpc_addr,
            shutdown: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The HTTP API's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The gRPC API's address, unless it is off.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    /// The daemon's operations, for callers in this process.
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Stops serving and waits for both APIs to close; then writes the last snapshot.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("the server thread panicked"))??;
            if let (Some(path), Backend::Memory(index)) =
                (&self.app.config.snapshot, &self.app.index)
            {
                kvindex::snapshot::write(path, &index.snapshot())
                    .context("writing the last snapshot")?;
            }
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            eprintln!("kvmesh serve: {e:#}");
        }
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
    let daemon = Daemon::start(config)?;
    let scheme = if daemon.app.config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    eprintln!(
        "kvmesh serve: listening on {scheme}://{}",
        daemon.http_addr()
    );
    if let Some(g) = daemon.grpc_addr() {
        eprintln!("kvmesh serve: gRPC on {g}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?;
    rt.block_on(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    });
    daemon.stop()
}

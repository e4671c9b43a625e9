//! Engines found through DNS: a Kubernetes headless Service (or any name with one A/AAAA record
//! per engine) is re-resolved periodically; each address becomes an engine named
//! `NAME-ADDRESS`, subscribed on the configured ports, and an address that disappears from the
//! answer is unsubscribed and its blocks purged.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::api::App;
use super::EngineConfig;

/// One DNS-discovered pool of engines.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsPool {
    /// Prefix of the engines' names.
    pub name: String,
    /// The name to resolve, e.g. `vllm.default.svc.cluster.local`.
    pub host: String,
    /// Port of each engine's KV-event publisher.
    pub port: u16,
    /// Port of each engine's replay socket, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub topic: String,
}

/// Parses `NAME=HOST:PORT[,replay=PORT][,model=M][,topic=T]`.
pub fn parse_dns_pool(spec: &str) -> Result<DnsPool> {
    let (name, rest) = spec
        .split_once('=')
        .with_context(|| format!("--engine-dns {spec:?}: expected NAME=HOST:PORT[,replay=PORT]"))?;
    let mut parts = rest.split(',');
    let hostport = parts.next().unwrap_or_default();
    let (host, port) = hostport
        .rsplit_once(':')
        .with_context(|| format!("--engine-dns {spec:?}: {hostport:?} lacks a :PORT"))?;
    if name.is_empty() || name.contains('#') || host.is_empty() {
        bail!("--engine-dns {spec:?}: the name (without '#') and the host must not be empty");
    }
    let port: u16 = port
        .parse()
        .with_context(|| format!("--engine-dns {spec:?}: {port:?} is not a port"))?;
    let mut pool = DnsPool {
        name: name.to_owned(),
        host: host.to_owned(),
        port,
        replay_port: None,
        model: None,
        topic: String::new(),
    };
    for p in parts {
        match p.split_once('=') {
            Some(("replay", v)) => {
                pool.replay_port = Some(
                    v.parse()
                        .with_context(|| format!("--engine-dns {spec:?}: replay={v:?}"))?,
                )
            }
            Some(("model", v)) => pool.model = Some(v.to_owned()),
            Some(("topic", v)) => pool.topic = v.to_owned(),
            _ => bail!("--engine-dns {spec:?}: unknown option {p:?} (replay=, model=, topic=)"),
        }
    }
    Ok(pool)
}

fn endpoint(ip: IpAddr, port: u16) -> String {
    format!("tcp://{}", SocketAddr::new(ip, port))
}

impl DnsPool {
    fn engine(&self, ip: IpAddr) -> EngineConfig {
        EngineConfig {
            name: format!("{}-{ip}", self.name),
            endpoint: endpoint(ip, self.port),
            replay_endpoint: self.replay_port.map(|p| endpoint(ip, p)),
            model: self.model.clone(),
            dp_rank: 0,
            topic: self.topic.clone(),
        }
    }
}

/// A resolver for the pools: the system's (`/etc/resolv.conf`), or one DNS server.
fn resolver(server: Option<SocketAddr>) -> Result<hickory_resolver::TokioResolver> {
    use hickory_resolver::config::{
        ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
    };
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    let mut builder = match server {
        None => hickory_resolver::Resolver::builder_tokio()
            .context("reading the system's DNS configuration")?,
        Some(addr) => {
            let conn = |mut c: ConnectionConfig| {
                c.port = addr.port();
                c
            };
            let ns = NameServerConfig::new(
                addr.ip(),
                true,
                vec![conn(ConnectionConfig::udp()), conn(ConnectionConfig::tcp())],
            );
            hickory_resolver::Resolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
    };
    // Membership changes must be seen at the next poll: no caching beyond one answer.
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    builder.build().context("building the DNS resolver")
}

/// Re-resolves every pool each `interval`, forever, adding and purging engines.
pub(crate) async fn run(
    app: Arc<App>,
    pools: Vec<DnsPool>,
    server: Option<SocketAddr>,
    interval: Duration,
) {
    let resolver = match resolver(server) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kvmesh serve: DNS discovery is off: {e:#}");
            return;
        }
    };
    let mut known: Vec<BTreeSet<IpAddr>> = vec![BTreeSet::new(); pools.len()];
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (pool, known) in pools.iter().zip(known.iter_mut()) {
            let now: BTreeSet<IpAddr> = match resolver.lookup_ip(pool.host.as_str()).await {
                Ok(answer) => answer.iter().collect(),
                // The name exists with no address, or not at all: the pool is empty now.
                Err(e) if e.is_no_records_found() => BTreeSet::new(),
                Err(e) => {
                    // A DNS outage says nothing about the engines: keep them.
                    tracing::warn!(pool = %pool.name, host = %pool.host, "DNS lookup failed: {e}");
                    continue;
                }
            };
            for ip in known.difference(&now) {
                let e = pool.engine(*ip);
                match app.remove_engine(&e.name) {
                    Ok(()) => eprintln!(
                        "kvmesh serve: engine {} left {} (purged)",
                        e.name, pool.host
                    ),
                    Err(err) => tracing::warn!(engine = %e.name, "removing: {err}"),
                }
            }
            let mut kept = BTreeSet::new();
            for ip in &now {
                if known.contains(ip) {
                    kept.insert(*ip);
                    continue;
                }
                let e = pool.engine(*ip);
                match app.add_engine(&e) {
                    Ok(name) => {
                        eprintln!("kvmesh serve: engine {name} found at {}", e.endpoint);
                        kept.insert(*ip);
                    }
                    // Registered by hand under the same name: leave it to its owner.
                    Err(super::ApiError::Conflict(_)) => {}
                    Err(err) => tracing::warn!(engine = %e.name, "adding: {err}"),
                }
            }
            *known = kept;
        }
    }
}

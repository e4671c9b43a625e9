//! A blocking client of `kvmesh serve`'s HTTP API, for schedulers written in Rust.
//!
//! ```no_run
//! use kvmesh::client::{IndexClient, ScoreRequest};
//! let client = IndexClient::new("http://127.0.0.1:8080").with_token("s3cret");
//! let scores = client.score(&ScoreRequest::tokens("my-model", vec![1, 2, 3]))?;
//! if let Some(best) = scores.first() {
//!     println!("route to {} ({} cached tokens)", best.name, best.matched_tokens);
//! }
//! # Ok::<(), kvmesh::client::ClientError>(())
//! ```

use serde::{Deserialize, Serialize};

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The daemon could not be reached or the connection failed.
    #[error("cannot reach the kvmesh daemon: {0}")]
    Transport(String),
    /// The daemon refused the request.
    #[error("kvmesh daemon answered {status}: {message}")]
    Refused { status: u16, message: String },
    /// The answer was not what the API promises.
    #[error("unexpected answer from the kvmesh daemon: {0}")]
    Protocol(String),
}

// The messages are the daemon's own types, shared with the server side.
pub use crate::serve::{EngineScore, EngineStatus, ScoreRequest, TierCounts};

/// An engine to add at run time.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NewEngine {
    pub name: String,
    /// Its KV-event PUB endpoint, `tcp://HOST:PORT`.
    pub endpoint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// The client. Cheap to clone; reuses connections.
#[derive(Clone)]
pub struct IndexClient {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl IndexClient {
    /// A client of the daemon at `base_url` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base_url: impl Into<String>) -> Self {
        IndexClient {
            base: base_url.into().trim_end_matches('/').to_owned(),
            token: None,
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into(),
        }
    }

    /// Sends `Authorization: Bearer TOKEN` with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, String), ClientError> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match (method, body) {
            ("POST", Some(b)) => {
                let mut r = self
                    .agent
                    .post(&url)
                    .header("content-type", "application/json");
                if let Some(a) = &auth {
                    r = r.header("authorization", a);
                }
                r.send(b)
            }
            ("DELETE", _) => {
                let mut r = self.agent.delete(&url);
                if let Some(a) = &auth {
                    r = r.header("authorization", a);
                }
                r.call()
            }
            _ => {
                let mut r = self.agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("authorization", a);
                }
                r.call()
            }
        };
        let mut resp = result.map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if status >= 400 {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or(text);
            return Err(ClientError::Refused { status, message });
        }
        Ok((status, text))
    }

    fn json<T: for<'de> Deserialize<'de>>(text: &str, field: &str) -> Result<T, ClientError> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ClientError::Protocol(e.to_string()))?;
        serde_json::from_value(v[field].clone())
            .map_err(|e| ClientError::Protocol(format!("{field}: {e}")))
    }

    /// Scores a prompt: engines holding a prefix of it, best first.
    pub fn score(&self, req: &ScoreRequest) -> Result<Vec<EngineScore>, ClientError> {
        let body = serde_json::to_string(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let (_, text) = self.call("POST", "/v1/score", Some(body))?;
        Self::json(&text, "engines")
    }

    /// The engines the daemon knows.
    pub fn engines(&self) -> Result<Vec<EngineStatus>, ClientError> {
        let (_, text) = self.call("GET", "/v1/engines", None)?;
        Self::json(&text, "engines")
    }

    /// Subscribes the daemon to an engine.
    pub fn add_engine(&self, engine: &NewEngine) -> Result<(), ClientError> {
        let body =
            serde_json::to_string(engine).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call("POST", "/v1/engines", Some(body)).map(|_| ())
    }

    /// Unsubscribes the daemon from an engine and purges its blocks.
    pub fn remove_engine(&self, name: &str) -> Result<(), ClientError> {
        self.call("DELETE", &format!("/v1/engines/{name}"), None)
            .map(|_| ())
    }
}

/// A blocking client of `kvmesh serve`'s gRPC API, with the same operations as [`IndexClient`]
/// plus a streaming batch score ([`GrpcIndexClient::score_many`]).
///
/// ```no_run
/// use kvmesh::client::{GrpcIndexClient, ScoreRequest};
/// let client = GrpcIndexClient::connect("http://127.0.0.1:8081", None, None)?;
/// let many: Vec<ScoreRequest> = (0..100).map(|i| ScoreRequest::tokens("m", vec![i; 64])).collect();
/// for scores in client.score_many(&many)? {
///     println!("{:?}", scores.first().map(|s| &s.name));
/// }
/// # Ok::<(), kvmesh::client::ClientError>(())
/// ```
pub struct GrpcIndexClient {
    rt: tokio::runtime::Runtime,
    inner: crate::serve::pb::kv_index_client::KvIndexClient<tonic::transport::Channel>,
    auth: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

fn status_error(s: tonic::Status) -> ClientError {
    use tonic::Code;
    let status = match s.code() {
        Code::InvalidArgument | Code::OutOfRange => 400,
        Code::Unauthenticated => 401,
        Code::NotFound => 404,
        Code::AlreadyExists => 409,
        Code::ResourceExhausted => 413,
        Code::Unavailable => {
            if s.message().contains("transport") || s.message().contains("connect") {
                return ClientError::Transport(s.message().to_owned());
            }
            503
        }
        _ => 500,
    };
    ClientError::Refused {
        status,
        message: s.message().to_owned(),
    }
}

fn to_pb(r: &ScoreRequest, id: u64) -> crate::serve::pb::ScoreRequest {
    use crate::serve::pb;
    pb::ScoreRequest {
        model: r.model.clone(),
        blocks: match (&r.token_ids, &r.block_hashes) {
            (Some(t), _) => Some(pb::score_request::Blocks::TokenIdsLe32(
                t.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )),
            (None, Some(h)) => Some(pb::score_request::Blocks::BlockHashes(pb::BlockHashes {
                hashes: h.clone(),
            })),
            (None, None) => None,
        },
        lora_name: r.lora_name.clone(),
        cache_salt: r.cache_salt.clone(),
        engines: r.engines.clone().unwrap_or_default(),
        request_id: id,
    }
}

fn from_pb(r: crate::serve::pb::ScoreResponse) -> Vec<EngineScore> {
    r.engines
        .into_iter()
        .map(|e| {
            let t = e.tiers.unwrap_or_default();
            EngineScore {
                name: e.name,
                matched_blocks: e.matched_blocks,
                matched_tokens: e.matched_tokens as u32,
                tiers: TierCounts {
                    gpu: t.gpu.into(),
                    cpu: t.cpu.into(),
                    storage: t.storage.into(),
                    remote: t.remote.into(),
                },
                score: e.score,
            }
        })
        .collect()
}

impl GrpcIndexClient {
    /// Connects to `http://HOST:PORT` (or `https://` with `ca_pem`, the PEM certificate that
    /// signed the daemon's), sending `token` as a bearer token when given.
    pub fn connect(
        url: &str,
        token: Option<&str>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let mut ep = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| ClientError::Transport(format!("{url}: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(5));
        if let Some(ca) = ca_pem {
            ep = ep
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                )
                .map_err(|e| ClientError::Transport(format!("TLS: {e}")))?;
        }
        let channel = rt
            .block_on(ep.connect())
            .map_err(|e| ClientError::Transport(format!("{url}: {e:?}")))?;
        let auth = match token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::Protocol("the token is not valid ASCII".into()))?,
            ),
            None => None,
        };
        Ok(GrpcIndexClient {
            rt,
            inner: crate::serve::pb::kv_index_client::KvIndexClient::new(channel)
                .max_decoding_message_size(64 << 20),
            auth,
        })
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(a) = &self.auth {
            r.metadata_mut().insert("authorization", a.clone());
        }
        r
    }

    /// Scores a prompt: engines holding a prefix of it, best first.
    pub fn score(&self, req: &ScoreRequest) -> Result<Vec<EngineScore>, ClientError> {
        let mut c = self.inner.clone();
        let r = self.request(to_pb(req, 0));
        let resp = self.rt.block_on(c.score(r)).map_err(status_error)?;
        Ok(from_pb(resp.into_inner()))
    }

    /// Scores many prompts over one stream; the answers come back in the requests' order.
    pub fn score_many(&self, reqs: &[ScoreRequest]) -> Result<Vec<Vec<EngineScore>>, ClientError> {
        let mut c = self.inner.clone();
        let msgs: Vec<_> = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| to_pb(r, i as u64))
            .collect();
        let r = self.request(tokio_stream::iter(msgs));
        self.rt.block_on(async {
            let mut stream = c.score_stream(r).await.map_err(status_error)?.into_inner();
            let mut out = Vec::with_capacity(reqs.len());
            while let Some(msg) = stream.message().await.map_err(status_error)? {
                if msg.request_id != out.len() as u64 {
                    return Err(ClientError::Protocol(format!(
                        "answer {} came for request {}",
                        out.len(),
                        msg.request_id
                    )));
                }
                out.push(from_pb(msg));
            }
            if out.len() != reqs.len() {
                return Err(ClientError::Protocol(format!(
                    "{} answers to {} requests",
                    out.len(),
                    reqs.len()
                )));
            }
            Ok(out)
        })
    }

    /// The engines the daemon knows.
    pub fn engines(&self) -> Result<Vec<EngineStatus>, ClientError> {
        let mut c = self.inner.clone();
        let r = self.request(crate::serve::pb::ListEnginesRequest {});
        let resp = self.rt.block_on(c.list_engines(r)).map_err(status_error)?;
        Ok(resp
            .into_inner()
            .engines
            .into_iter()
            .map(|e| EngineStatus {
                name: e.name,
                model: (!e.model.is_empty()).then_some(e.model),
                endpoint: (!e.endpoint.is_empty()).then_some(e.endpoint),
                replay_endpoint: (!e.replay_endpoint.is_empty()).then_some(e.replay_endpoint),
                state: e.state,
                last_seq: e.last_seq,
                lag_seconds: e.lag_seconds,
                batches: e.batches,
                events: e.events,
                gaps: e.gaps,
                replays: e.replays,
                lost_batches: e.lost_batches,
                restarts: e.restarts,
                disconnects: e.disconnects,
                orphans: e.orphans,
                orphans_unrecovered: e.orphans_unrecovered,
                blocks: e.blocks.map(|b| TierCounts {
                    gpu: b.gpu,
                    cpu: b.cpu,
                    storage: b.storage,
                    remote: b.remote,
                }),
                block_size: e.block_size,
                last_error: (!e.last_error.is_empty()).then_some(e.last_error),
            })
            .collect())
    }

    /// Subscribes the daemon to an engine; returns the name it goes by.
    pub fn add_engine(&self, engine: &NewEngine) -> Result<String, ClientError> {
        let mut c = self.inner.clone();
        let r = self.request(crate::serve::pb::EngineConfig {
            name: engine.name.clone(),
            endpoint: engine.endpoint.clone(),
            replay_endpoint: engine.replay_endpoint.clone(),
            model: engine.model.clone(),
            dp_rank: 0,
            topic: String::new(),
        });
        let resp = self.rt.block_on(c.add_engine(r)).map_err(status_error)?;
        Ok(resp.into_inner().name)
    }

    /// Unsubscribes the daemon from an engine and purges its blocks.
    pub fn remove_engine(&self, name: &str) -> Result<(), ClientError> {
        let mut c = self.inner.clone();
        let r = self.request(crate::serve::pb::RemoveEngineRequest {
            name: name.to_owned(),
        });
        self.rt.block_on(c.remove_engine(r)).map_err(status_error)?;
        Ok(())
    }
}

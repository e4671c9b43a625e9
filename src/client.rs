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

/// A score request: a prompt by token ids or by vLLM block hashes.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ScoreRequest {
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_hashes: Option<Vec<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_salt: Option<String>,
    /// Only these engines (all when `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
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
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct TierCounts {
    pub gpu: u64,
    pub cpu: u64,
    pub storage: u64,
    pub remote: u64,
}

/// One engine's answer, best first.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct EngineScore {
    pub name: String,
    pub matched_blocks: u32,
    pub matched_tokens: u32,
    pub tiers: TierCounts,
    pub score: f64,
}

/// An engine as the daemon reports it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct EngineStatus {
    pub name: String,
    pub model: Option<String>,
    /// `waiting`, `connected`, `disconnected`, or `elsewhere` (ingested by another replica).
    pub state: String,
    #[serde(default)]
    pub last_seq: Option<u64>,
    #[serde(default)]
    pub blocks: Option<TierCounts>,
}

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

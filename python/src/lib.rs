//! The native module of the `kvmesh` Python package (`kvmesh._native`): the daemon's clients, over
//! HTTP and gRPC, with the GIL released while they wait on the network.

mod store;
mod transfer;

use pyo3::exceptions::{PyConnectionError, PyException, PyValueError};
use pyo3::prelude::*;

use kvmesh::client::{self, ClientError, GrpcIndexClient, IndexClient as HttpClient};

pyo3::create_exception!(
    _native,
    KvmeshError,
    PyException,
    "The kvmesh daemon refused a request; `status` is its HTTP-style status code."
);

fn to_py(e: ClientError) -> PyErr {
    match e {
        ClientError::Transport(m) => PyConnectionError::new_err(format!("kvmesh daemon: {m}")),
        ClientError::Refused { status, message } => KvmeshError::new_err((
            format!("kvmesh daemon answered {status}: {message}"),
            status,
        )),
        other => KvmeshError::new_err((other.to_string(), 0u16)),
    }
}

/// One engine's answer to a score request.
#[pyclass(module = "kvmesh", frozen, get_all)]
#[derive(Clone)]
pub struct EngineScore {
    /// The engine's name (`POD`, or `POD#dpR` for data-parallel rank R > 0).
    name: String,
    /// Leading blocks of the prompt the engine holds on some tier.
    matched_blocks: u32,
    /// `matched_blocks` times the engine's block size.
    matched_tokens: u32,
    /// Of the matched blocks, how many are on each tier.
    gpu: u64,
    cpu: u64,
    storage: u64,
    remote: u64,
    /// Tier-weighted score: engines come sorted by it, best first.
    score: f64,
}

#[pymethods]
impl EngineScore {
    fn __repr__(&self) -> String {
        format!(
            "EngineScore(name={:?}, matched_blocks={}, matched_tokens={}, score={})",
            self.name, self.matched_blocks, self.matched_tokens, self.score
        )
    }
}

impl From<client::EngineScore> for EngineScore {
    fn from(e: client::EngineScore) -> Self {
        EngineScore {
            name: e.name,
            matched_blocks: e.matched_blocks,
            matched_tokens: e.matched_tokens,
            gpu: e.tiers.gpu,
            cpu: e.tiers.cpu,
            storage: e.tiers.storage,
            remote: e.tiers.remote,
            score: e.score,
        }
    }
}

/// An engine as the daemon lists it.
#[pyclass(module = "kvmesh", frozen, get_all)]
#[derive(Clone)]
pub struct EngineStatus {
    name: String,
    model: Option<String>,
    /// `waiting`, `connected`, `disconnected`, or `elsewhere` (another replica ingests it).
    state: String,
    last_seq: Option<u64>,
    /// Blocks per tier (`gpu`, `cpu`, `storage`, `remote`), when known.
    blocks: Option<std::collections::BTreeMap<String, u64>>,
}

#[pymethods]
impl EngineStatus {
    fn __repr__(&self) -> String {
        format!(
            "EngineStatus(name={:?}, state={:?}, last_seq={:?})",
            self.name, self.state, self.last_seq
        )
    }
}

impl From<client::EngineStatus> for EngineStatus {
    fn from(e: client::EngineStatus) -> Self {
        EngineStatus {
            name: e.name,
            model: e.model,
            state: e.state,
            last_seq: e.last_seq,
            blocks: e.blocks.map(|b| {
                [
                    ("gpu".to_owned(), b.gpu),
                    ("cpu".to_owned(), b.cpu),
                    ("storage".to_owned(), b.storage),
                    ("remote".to_owned(), b.remote),
                ]
                .into_iter()
                .collect()
            }),
        }
    }
}

enum Transport {
    Http(HttpClient),
    Grpc(Box<std::sync::Mutex<GrpcIndexClient>>),
}

/// A client of `kvmesh serve`, over HTTP (`http://` or `https://` URL, default) or gRPC
/// (`grpc=True`). Thread-safe; calls release the GIL.
#[pyclass(module = "kvmesh")]
pub struct IndexClient {
    transport: Transport,
}

fn score_request(
    model: String,
    token_ids: Option<Vec<u32>>,
    block_hashes: Option<Vec<u64>>,
    lora_name: Option<String>,
    cache_salt: Option<String>,
    engines: Option<Vec<String>>,
) -> PyResult<client::ScoreRequest> {
    if token_ids.is_some() == block_hashes.is_some() {
        return Err(PyValueError::new_err(
            "give exactly one of token_ids and block_hashes",
        ));
    }
    Ok(client::ScoreRequest {
        model,
        token_ids,
        block_hashes,
        lora_name,
        cache_salt,
        engines,
    })
}

#[pymethods]
impl IndexClient {
    /// Connects to the daemon at `url`. `token` is its bearer token, if it wants one; `ca_pem`
    /// the PEM certificate that signed a TLS daemon's (gRPC; HTTPS uses the system's roots).
    #[new]
    #[pyo3(signature = (url = "http://127.0.0.1:8080".to_owned(), token = None, grpc = false, ca_pem = None))]
    fn new(
        py: Python<'_>,
        url: String,
        token: Option<String>,
        grpc: bool,
        ca_pem: Option<Vec<u8>>,
    ) -> PyResult<Self> {
        let transport = if grpc {
            let c = py
                .detach(|| GrpcIndexClient::connect(&url, token.as_deref(), ca_pem.as_deref()))
                .map_err(to_py)?;
            Transport::Grpc(Box::new(std::sync::Mutex::new(c)))
        } else {
            let mut c = HttpClient::new(url);
            if let Some(t) = token {
                c = c.with_token(t);
            }
            Transport::Http(c)
        };
        Ok(IndexClient { transport })
    }

    /// Scores a prompt, by token ids or by vLLM block hashes: the engines holding a prefix of it,
    /// best first.
    #[pyo3(signature = (model, token_ids = None, *, block_hashes = None, lora_name = None, cache_salt = None, engines = None))]
    #[allow(clippy::too_many_arguments)]
    fn score(
        &self,
        py: Python<'_>,
        model: String,
        token_ids: Option<Vec<u32>>,
        block_hashes: Option<Vec<u64>>,
        lora_name: Option<String>,
        cache_salt: Option<String>,
        engines: Option<Vec<String>>,
    ) -> PyResult<Vec<EngineScore>> {
        let req = score_request(
            model,
            token_ids,
            block_hashes,
            lora_name,
            cache_salt,
            engines,
        )?;
        let out = py
            .detach(|| match &self.transport {
                Transport::Http(c) => c.score(&req),
                Transport::Grpc(c) => c.lock().expect("client lock").score(&req),
            })
            .map_err(to_py)?;
        Ok(out.into_iter().map(Into::into).collect())
    }

    /// Scores many prompts (lists of token ids) of one model; over gRPC, in one stream.
    #[pyo3(signature = (model, prompts, *, lora_name = None, cache_salt = None, engines = None))]
    fn score_many(
        &self,
        py: Python<'_>,
        model: String,
        prompts: Vec<Vec<u32>>,
        lora_name: Option<String>,
        cache_salt: Option<String>,
        engines: Option<Vec<String>>,
    ) -> PyResult<Vec<Vec<EngineScore>>> {
        let reqs: Vec<client::ScoreRequest> = prompts
            .into_iter()
            .map(|t| client::ScoreRequest {
                model: model.clone(),
                token_ids: Some(t),
                block_hashes: None,
                lora_name: lora_name.clone(),
                cache_salt: cache_salt.clone(),
                engines: engines.clone(),
            })
            .collect();
        let out = py
            .detach(|| match &self.transport {
                Transport::Http(c) => reqs.iter().map(|r| c.score(r)).collect(),
                Transport::Grpc(c) => c.lock().expect("client lock").score_many(&reqs),
            })
            .map_err(to_py)?;
        Ok(out
            .into_iter()
            .map(|v| v.into_iter().map(Into::into).collect())
            .collect())
    }

    /// The engines the daemon knows, with their ingestion state.
    fn engines(&self, py: Python<'_>) -> PyResult<Vec<EngineStatus>> {
        let out = py
            .detach(|| match &self.transport {
                Transport::Http(c) => c.engines(),
                Transport::Grpc(c) => c.lock().expect("client lock").engines(),
            })
            .map_err(to_py)?;
        Ok(out.into_iter().map(Into::into).collect())
    }

    /// Subscribes the daemon to an engine's KV-event stream (`tcp://HOST:PORT`).
    #[pyo3(signature = (name, endpoint, *, replay_endpoint = None, model = None))]
    fn add_engine(
        &self,
        py: Python<'_>,
        name: String,
        endpoint: String,
        replay_endpoint: Option<String>,
        model: Option<String>,
    ) -> PyResult<()> {
        let e = client::NewEngine {
            name,
            endpoint,
            replay_endpoint,
            model,
        };
        py.detach(|| match &self.transport {
            Transport::Http(c) => c.add_engine(&e),
            Transport::Grpc(c) => c.lock().expect("client lock").add_engine(&e).map(|_| ()),
        })
        .map_err(to_py)
    }

    /// Unsubscribes the daemon from an engine and purges its blocks.
    fn remove_engine(&self, py: Python<'_>, name: String) -> PyResult<()> {
        py.detach(|| match &self.transport {
            Transport::Http(c) => c.remove_engine(&name),
            Transport::Grpc(c) => c.lock().expect("client lock").remove_engine(&name),
        })
        .map_err(to_py)
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("KvmeshError", m.py().get_type::<KvmeshError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<IndexClient>()?;
    m.add_class::<store::BlockStore>()?;
    m.add_class::<transfer::TransferAgent>()?;
    m.add_class::<transfer::Transfer>()?;
    m.add_class::<EngineScore>()?;
    m.add_class::<EngineStatus>()?;
    Ok(())
}

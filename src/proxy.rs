//! `kvmesh proxy`: disaggregated prefill/decode in front of vLLM engines running
//! `kvmesh.vllm.KvmeshConnector`, the way llm-d's routing sidecar does it.
//!
//! Each completion or chat request is sent first to a prefill engine with
//! `kv_transfer_params = {"do_remote_decode": true}` and `max_tokens = 1`; the prefill engine
//! computes the prompt's KV, keeps the blocks and answers with the `kv_transfer_params` a decode
//! engine needs. The proxy then sends the original request, with those parameters, to a decode
//! engine, which pulls the blocks over kvtransfer and generates; its answer (streamed or not) goes
//! back to the client unchanged. Engines are taken round-robin. Other paths (`/v1/models`,
//! `/health`, ...) are forwarded to a decode engine.

// Handlers bail out with the HTTP response to send, which is what axum wants back.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

/// Options of `kvmesh proxy`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// A prefill engine's base URL (`http://HOST:PORT`); repeat for several.
    #[arg(long = "prefill", required = true)]
    pub prefill: Vec<String>,
    /// A decode engine's base URL; repeat for several.
    #[arg(long = "decode", required = true)]
    pub decode: Vec<String>,
    /// Seconds an engine may take to answer.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
}

struct Proxy {
    prefill: Vec<Uri>,
    decode: Vec<Uri>,
    next_p: AtomicUsize,
    next_d: AtomicUsize,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

fn parse_base(s: &str) -> Result<Uri> {
    let u: Uri = s
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("engine URL {s:?}"))?;
    if u.scheme_str() != Some("http") || u.authority().is_none() {
        bail!("engine URL {s:?}: expected http://HOST:PORT");
    }
    Ok(u)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    let msg = msg.into();
    tracing::warn!("proxy: {msg}");
    (
        status,
        axum::Json(json!({"error": {"message": msg, "type": "kvmesh_proxy_error"}})),
    )
        .into_response()
}

impl Proxy {
    fn pick(list: &[Uri], next: &AtomicUsize) -> Uri {
        list[next.fetch_add(1, Relaxed) % list.len()].clone()
    }

    fn target(base: &Uri, path_and_query: &str) -> Result<Uri, Response> {
        let base = base.to_string();
        format!("{}{path_and_query}", base.trim_end_matches('/'))
            .parse()
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("bad path: {e}")))
    }

    async fn send(
        &self,
        method: Method,
        uri: Uri,
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, Response> {
        let req = hyper::Request::builder()
            .method(method)
            .uri(uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(error(StatusCode::BAD_GATEWAY, format!("engine {uri}: {e}"))),
            Err(_) => Err(error(
                StatusCode::GATEWAY_TIMEOUT,
                format!("engine {uri} did not answer in {:?}", self.timeout),
            )),
        }
    }

    /// Prefill on one engine, then decode on another.
    async fn disaggregated(&self, path: &str, body: Bytes) -> Response {
        let mut req: Value = match serde_json::from_slice(&body) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "the request body is not a JSON object",
                )
            }
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("the request body is not JSON: {e}"),
                )
            }
        };
        let mut pre = req.clone();
        pre["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": false});
        pre["max_tokens"] = json!(1);
        if pre.get("max_completion_tokens").is_some() {
            pre["max_completion_tokens"] = json!(1);
        }
        pre["stream"] = json!(false);
        if let Some(o) = pre.as_object_mut() {
            o.remove("stream_options");
        }
        let p = Self::pick(&self.prefill, &self.next_p);
        let uri = match Self::target(&p, path) {
            Ok(u) => u,
            Err(r) => return r,
        };
        let resp = match self
            .send(Method::POST, uri, Bytes::from(pre.to_string()))
            .await
        {
            Ok(r) => r,
            Err(r) => return r,
        };
        let status = resp.status();
        let bytes = match resp.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error(StatusCode::BAD_GATEWAY, format!("prefill engine {p}: {e}")),
        };
        if !status.is_success() {
            // The engine's own error, as it gave it.
            return (status, bytes).into_response();
        }
        let params = match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => v.get("kv_transfer_params").cloned().unwrap_or(Value::Null),
            Err(e) => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    format!("prefill engine {p} answered non-JSON: {e}"),
                )
            }
        };
        if !params.is_object() {
            return error(
                StatusCode::BAD_GATEWAY,
                format!("prefill engine {p} returned no kv_transfer_params: is it running the KvmeshConnector?"),
            );
        }
        req["kv_transfer_params"] = params;
        let d = Self::pick(&self.decode, &self.next_d);
        let uri = match Self::target(&d, path) {
            Ok(u) => u,
            Err(r) => return r,
        };
        match self
            .send(Method::POST, uri, Bytes::from(req.to_string()))
            .await
        {
            Ok(r) => passthrough(r),
            Err(r) => r,
        }
    }
}

fn passthrough(r: hyper::Response<hyper::body::Incoming>) -> Response {
    let (parts, body) = r.into_parts();
    let mut out = Response::new(Body::new(body));
    *out.status_mut() = parts.status;
    for (k, v) in parts.headers.iter() {
        if k != header::TRANSFER_ENCODING && k != header::CONNECTION {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out.headers_mut()
        .insert("x-kvmesh-proxy", HeaderValue::from_static("pd"));
    out
}

async fn handle(State(p): State<Arc<Proxy>>, req: Request) -> Response {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |x| x.as_str())
        .to_string();
    let method = req.method().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading the request: {e}")),
    };
    let bare = path.split('?').next().unwrap_or("");
    if method == Method::POST && (bare == "/v1/completions" || bare == "/v1/chat/completions") {
        return p.disaggregated(&path, body).await;
    }
    let d = Proxy::pick(&p.decode, &p.next_d);
    let uri = match Proxy::target(&d, &path) {
        Ok(u) => u,
        Err(r) => return r,
    };
    match p.send(method, uri, body).await {
        Ok(r) => passthrough(r),
        Err(r) => r,
    }
}

/// Runs the proxy until the process is stopped.
pub fn run(a: &ProxyArgs) -> Result<()> {
    let proxy = Arc::new(Proxy {
        prefill: a
            .prefill
            .iter()
            .map(|s| parse_base(s))
            .collect::<Result<_>>()?,
        decode: a
            .decode
            .iter()
            .map(|s| parse_base(s))
            .collect::<Result<_>>()?,
        next_p: AtomicUsize::new(0),
        next_d: AtomicUsize::new(0),
        client: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http(),
        timeout: Duration::from_secs(a.timeout_s.max(1)),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(proxy.clone());
        let l = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        eprintln!(
            "kvmesh proxy: listening on http://{} (prefill: {}; decode: {})",
            l.local_addr()?,
            a.prefill.join(", "),
            a.decode.join(", ")
        );
        axum::serve(l, app).await.context("serving")?;
        Ok(())
    })
}

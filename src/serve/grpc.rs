//! The gRPC API (tonic): the HTTP API's operations plus a streaming batch score. The service is
//! defined in `src/proto/kvmesh/v1/index.proto`.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::api::{self, ApiError, App};
use super::EngineConfig;

/// The messages and stubs generated from `index.proto`.
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("kvmesh.v1");
}

use pb::kv_index_server::{KvIndex, KvIndexServer};

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::BadRequest(m) => Status::invalid_argument(m),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::Conflict(m) => Status::already_exists(m),
            ApiError::Unavailable(m) => Status::unavailable(m),
        }
    }
}

/// A protobuf score request as the daemon's own; a request without blocks is refused.
fn score_request(r: pb::ScoreRequest) -> Result<api::ScoreRequest, Status> {
    let (token_ids, block_hashes) = match r.blocks {
        Some(pb::score_request::Blocks::TokenIds(t)) => (Some(t.ids), None),
        Some(pb::score_request::Blocks::TokenIdsLe32(b)) => {
            if b.len() % 4 != 0 {
                return Err(Status::invalid_argument(format!(
                    "token_ids_le32 has {} bytes, not a multiple of 4",
                    b.len()
                )));
            }
            let ids = b
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (Some(ids), None)
        }
        Some(pb::score_request::Blocks::BlockHashes(h)) => (None, Some(h.hashes)),
        None => (None, None),
    };
    Ok(api::ScoreRequest {
        model: r.model,
        token_ids,
        block_hashes,
        lora_name: r.lora_name,
        cache_salt: r.cache_salt,
        engines: (!r.engines.is_empty()).then_some(r.engines),
    })
}

fn score_response(engines: Vec<api::EngineScore>, request_id: u64) -> pb::ScoreResponse {
    pb::ScoreResponse {
        engines: engines
            .into_iter()
            .map(|e| pb::EngineScore {
                name: e.name,
                matched_blocks: e.matched_blocks,
                matched_tokens: u64::from(e.matched_tokens),
                tiers: Some(pb::TierCounts {
                    gpu: e.tiers.gpu as u32,
                    cpu: e.tiers.cpu as u32,
                    storage: e.tiers.storage as u32,
                    remote: e.tiers.remote as u32,
                }),
                score: e.score,
            })
            .collect(),
        request_id,
    }
}

/// The gRPC service over the daemon.
#[derive(Clone)]
pub(crate) struct Service(pub(crate) Arc<App>);

impl Service {
    /// Scores on the current worker for the in-memory index (microseconds, never blocks) and off
    /// the async workers for Redis (a network round trip).
    async fn score_one(&self, r: pb::ScoreRequest) -> Result<pb::ScoreResponse, Status> {
        let id = r.request_id;
        let req = match score_request(r) {
            Ok(req) => req,
            Err(status) => {
                self.0
                    .bad_requests
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(status);
            }
        };
        let engines = if self.0.index_is_remote() {
            let app = self.0.clone();
            tokio::task::spawn_blocking(move || app.score(&req))
                .await
                .map_err(|e| Status::internal(e.to_string()))??
        } else {
            self.0.score(&req)?
        };
        Ok(score_response(engines, id))
    }
}

type ScoreStream = Pin<Box<dyn Stream<Item = Result<pb::ScoreResponse, Status>> + Send>>;

#[tonic::async_trait]
impl KvIndex for Service {
    async fn score(
        &self,
        req: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        self.score_one(req.into_inner()).await.map(Response::new)
    }

    type ScoreStreamStream = ScoreStream;

    async fn score_stream(
        &self,
        req: Request<Streaming<pb::ScoreRequest>>,
    ) -> Result<Response<ScoreStream>, Status> {
        let mut inbound = req.into_inner();
        let svc = self.clone();
        let out = async_stream_of(move |tx| async move {
            while let Some(next) = inbound.next().await {
                let answer = match next {
                    Ok(r) => svc.score_one(r).await,
                    Err(status) => Err(status),
                };
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    // The client left, or the stream ends with this request's error.
                    return;
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn list_engines(
        &self,
        _req: Request<pb::ListEnginesRequest>,
    ) -> Result<Response<pb::ListEnginesResponse>, Status> {
        let engines = self
            .0
            .engines()
            .into_iter()
            .map(|e| pb::EngineStatus {
                name: e.name,
                model: e.model.unwrap_or_default(),
                endpoint: e.endpoint.unwrap_or_default(),
                replay_endpoint: e.replay_endpoint.unwrap_or_default(),
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
                blocks: e.blocks.map(|b| pb::BlockCounts {
                    gpu: b.gpu,
                    cpu: b.cpu,
                    storage: b.storage,
                    remote: b.remote,
                }),
                block_size: e.block_size,
                last_error: e.last_error.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::ListEnginesResponse { engines }))
    }

    async fn add_engine(
        &self,
        req: Request<pb::EngineConfig>,
    ) -> Result<Response<pb::AddEngineResponse>, Status> {
        let e = req.into_inner();
        let name = self.0.add_engine(&EngineConfig {
            name: e.name,
            endpoint: e.endpoint,
            replay_endpoint: e.replay_endpoint,
            model: e.model,
            dp_rank: e.dp_rank,
            topic: e.topic,
        })?;
        Ok(Response::new(pb::AddEngineResponse { name }))
    }

    async fn remove_engine(
        &self,
        req: Request<pb::RemoveEngineRequest>,
    ) -> Result<Response<pb::RemoveEngineResponse>, Status> {
        self.0.remove_engine(&req.into_inner().name)?;
        Ok(Response::new(pb::RemoveEngineResponse {}))
    }
}

/// A stream fed by a task that sends into a bounded channel (backpressure: the task waits while
/// the client is slow to read).
fn async_stream_of<F, Fut>(f: F) -> ScoreStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::ScoreResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The gRPC service with the daemon's bearer-token check and message size limit.
pub(crate) fn service(
    app: Arc<App>,
) -> tonic::service::interceptor::InterceptedService<
    KvIndexServer<Service>,
    impl tonic::service::Interceptor + Clone,
> {
    let max = app.config.max_request_bytes;
    let token = app.config.auth_token.clone();
    let counter = app.clone();
    let check = move |req: Request<()>| -> Result<Request<()>, Status> {
        if let Some(token) = &token {
            let given = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            if !super::token_matches(given, token) {
                counter
                    .bad_requests
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(Status::unauthenticated("missing or wrong bearer token"));
            }
        }
        Ok(req)
    };
    tonic::service::interceptor::InterceptedService::new(
        KvIndexServer::new(Service(app))
            .max_decoding_message_size(max)
            .max_encoding_message_size(64 << 20),
        check,
    )
}

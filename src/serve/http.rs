//! The HTTP/JSON API (axum).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::api::{ApiError, App, EngineScore, ScoreRequest};
use super::EngineConfig;

type Shared = Arc<App>;

fn json_error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        json_error(status, self.to_string())
    }
}

/// A body that could not be read: 413 over the size limit, 400 otherwise.
fn body_rejected(app: &App, rej: BytesRejection) -> Response {
    app.bad_requests.fetch_add(1, Ordering::Relaxed);
    let status = if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::BAD_REQUEST
    };
    json_error(status, rej.body_text())
}

/// A request body as JSON, whatever its content type says (`curl -d` sends a form type); a body
/// over the size limit is a 413, anything unparsable a 400 naming the problem.
fn parse_body<T: serde::de::DeserializeOwned>(
    app: &App,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Box<Response>> {
    let bytes = match body {
        Ok(b) => b,
        Err(rej) => return Err(Box::new(body_rejected(app, rej))),
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        app.bad_requests.fetch_add(1, Ordering::Relaxed);
        Box::new(json_error(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        ))
    })
}

/// `POST /v1/score`'s body when the fast path (`fastjson`) declines it, with the token ids left
/// unparsed: they are most of the bytes, and a byte loop reads them several times faster than a
/// generic JSON sequence.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreBody<'a> {
    model: String,
    #[serde(default, borrow)]
    token_ids: Option<&'a RawValue>,
    #[serde(default)]
    block_hashes: Option<Vec<u64>>,
    #[serde(default)]
    lora_name: Option<String>,
    #[serde(default)]
    cache_salt: Option<String>,
    #[serde(default)]
    engines: Option<Vec<String>>,
}

/// Decodes a score request body; malformed bodies get a 400 that names the problem.
fn score_request(app: &App, bytes: &[u8]) -> Result<ScoreRequest, Box<Response>> {
    let bad = |msg: String| {
        app.bad_requests.fetch_add(1, Ordering::Relaxed);
        Box::new(json_error(StatusCode::BAD_REQUEST, msg))
    };
    if let Some(fast) = super::fastjson::score_body(bytes) {
        return fast.map_err(bad);
    }
    let body: ScoreBody<'_> =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid request body: {e}")))?;
    let token_ids = match body.token_ids.map(RawValue::get) {
        None | Some("null") => None,
        Some(raw) => match super::fastjson::parse_u32_array(raw) {
            Some(v) => Some(v),
            None => Some(
                serde_json::from_str::<Vec<u32>>(raw)
                    .map_err(|e| bad(format!("invalid request body: token_ids: {e}")))?,
            ),
        },
    };
    Ok(ScoreRequest {
        model: body.model,
        token_ids,
        block_hashes: body.block_hashes,
        lora_name: body.lora_name,
        cache_salt: body.cache_salt,
        engines: body.engines,
    })
}

#[derive(Serialize)]
struct ScoreAnswer {
    engines: Vec<EngineScore>,
}

async fn score(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let bytes = match body {
        Ok(b) => b,
        Err(rej) => return body_rejected(&app, rej),
    };
    let req = match score_request(&app, &bytes) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    match app.score(&req) {
        Ok(engines) => Json(ScoreAnswer { engines }).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn list_engines(State(app): State<Shared>) -> Response {
    Json(serde_json::json!({ "engines": app.engines() })).into_response()
}

async fn add_engine(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let e: EngineConfig = match parse_body(&app, body) {
        Ok(e) => e,
        Err(resp) => return *resp,
    };
    match app.add_engine(&e) {
        Ok(name) => (
            StatusCode::CREATED,
            Json(serde_json::json!({ "name": name })),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn remove_engine(State(app): State<Shared>, Path(name): Path<String>) -> Response {
    match app.remove_engine(&name) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(app): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics_text(),
    )
        .into_response()
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
            .and_then(|v| v.to_str().ok());
        if !super::token_matches(given, token) {
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
    let missing = app.missing_engines();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("engines not subscribed: {missing:?}"),
        )
    }
}

/// The HTTP API's routes.
pub(crate) fn router(app: Shared) -> Router {
    let max = app.config.max_request_bytes;
    let api = Router::new()
        .route("/v1/score", post(score))
        .route("/v1/engines", get(list_engines).post(add_engine))
        .route("/v1/engines/{name}", delete(remove_engine))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            require_token,
        ));
    Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(max))
        .with_state(app)
}

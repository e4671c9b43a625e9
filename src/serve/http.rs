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

use super::api::{ApiError, App, ScoreRequest};
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

async fn score(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: ScoreRequest = match parse_body(&app, body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    match app.score(&req) {
        Ok(engines) => Json(serde_json::json!({ "engines": engines })).into_response(),
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

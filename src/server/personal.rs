//! REST for memory and the feed, under `/v1/users/{id}`. `{id}` is the
//! caller's own user id (or `me`); anyone else's is "not found", exactly as
//! a user that does not exist.
//!
//! - `GET /v1/users/{id}/memories`: newest first
//! - `POST /v1/users/{id}/memories` `{"text": "...", "kind": "like|dislike|diet|fact"?}`
//! - `DELETE /v1/users/{id}/memories/{memory_id}`, `DELETE /v1/users/{id}/memories`
//! - `GET /v1/users/{id}/feed?lat=&lon=&time=&kinds=&limit=&lang=`

use super::auth::UserAuth;
use super::error::{ApiError, ApiResult};
use super::AppState;
use crate::memory::feed::{parse_time, Feed, FeedQuery};
use crate::memory::keys::Kind;
use crate::prompt::Lang;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/users/{id}/memories", get(list).post(add).delete(delete_all))
        .route("/v1/users/{id}/memories/{memory}", delete(forget))
        .route("/v1/users/{id}/feed", get(feed))
}

/// The feed (and memory) when the server runs them, for this caller only.
/// The caller's own memory, after the rate limiter: every memory call
/// counts against the user's requests per minute (most run the embedding
/// model, and they used to pass the limiter freely).
fn mine(st: &AppState, user: &UserAuth, id: &str) -> ApiResult<Arc<Feed>> {
    if id != "me" && id != user.id {
        return Err(ApiError::not_found("user"));
    }
    st.admit_light(&user.id)?;
    st.feed.clone().ok_or_else(|| ApiError::new(StatusCode::NOT_IMPLEMENTED, "memory_off", "this server runs without memory (started with --no-memory)"))
}

fn failed(e: anyhow::Error) -> ApiError {
    ApiError::internal(format!("{e:#}"))
}

async fn list(State(st): State<Arc<AppState>>, user: UserAuth, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let f = mine(&st, &user, &id)?;
    let list = f.memory().list(&user.id).await.map_err(failed)?;
    Ok(Json(json!({"user": user.id, "memories": list})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewMemory {
    text: String,
    #[serde(default)]
    kind: Option<String>,
}

async fn add(State(st): State<Arc<AppState>>, user: UserAuth, Path(id): Path<String>, body: Result<Json<NewMemory>, axum::extract::rejection::JsonRejection>) -> ApiResult<Response> {
    let f = mine(&st, &user, &id)?;
    let Json(b) = body.map_err(|e| ApiError::bad_request(format!("the body must be {{\"text\": \"...\", \"kind\"?: \"like|dislike|diet|fact\"}}: {e}")))?;
    let kind = match b.kind.as_deref() {
        None => None,
        Some(k) => match Kind::parse(k) {
            Some(Kind::Order) | None => return Err(ApiError::bad_request(format!("unknown kind `{k}`; use like, dislike, diet or fact"))),
            some => some,
        },
    };
    let text = b.text.trim();
    if text.is_empty() || text.chars().count() > crate::memory::MAX_TEXT {
        return Err(ApiError::bad_request(format!("text must be 1 to {} characters", crate::memory::MAX_TEXT)));
    }
    if crate::memory::keys::is_payment_instruction(text) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "payment_instruction",
            "an instruction to pay without asking is not kept: every payment waits for the person's tap on Confirm",
        ));
    }
    let m = f.memory().remember(&user.id, text, kind, "said").await.map_err(failed)?;
    Ok((StatusCode::CREATED, Json(json!(m))).into_response())
}

async fn forget(State(st): State<Arc<AppState>>, user: UserAuth, Path((id, memory)): Path<(String, String)>) -> ApiResult<StatusCode> {
    let f = mine(&st, &user, &id)?;
    let mid: u64 = memory.parse().map_err(|_| ApiError::not_found("memory"))?;
    if f.memory().forget(&user.id, mid).await.map_err(failed)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("memory"))
    }
}

async fn delete_all(State(st): State<Arc<AppState>>, user: UserAuth, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let f = mine(&st, &user, &id)?;
    let n = f.memory().delete_all(&user.id).await.map_err(failed)?;
    Ok(Json(json!({"deleted": n})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedParams {
    lat: Option<f64>,
    lon: Option<f64>,
    time: Option<String>,
    kinds: Option<String>,
    limit: Option<usize>,
    lang: Option<String>,
}

async fn feed(State(st): State<Arc<AppState>>, user: UserAuth, Path(id): Path<String>, params: Result<Query<FeedParams>, axum::extract::rejection::QueryRejection>) -> ApiResult<Json<Value>> {
    let f = mine(&st, &user, &id)?;
    let Query(p) = params.map_err(|e| ApiError::bad_request(format!("{e}; the feed takes lat, lon, time (HH:MM or Unix seconds), kinds, limit, lang")))?;
    if p.lat.is_some() != p.lon.is_some() {
        return Err(ApiError::bad_request("give both lat and lon, or neither"));
    }
    if p.lat.is_some_and(|v| !(-90.0..=90.0).contains(&v)) || p.lon.is_some_and(|v| !(-180.0..=180.0).contains(&v)) {
        return Err(ApiError::bad_request("lat must be within ±90 and lon within ±180"));
    }
    let minute = p.time.as_deref().map(|t| parse_time(t, p.lat, p.lon)).transpose().map_err(ApiError::bad_request)?;
    let lang = match p.lang.as_deref() {
        None => Lang::En,
        Some(l) => Lang::parse(l).ok_or_else(|| ApiError::bad_request(format!("unknown language `{l}`; use en, zh or ko")))?,
    };
    const KINDS: [&str; 6] = ["restaurant", "dish", "show", "concert", "movie", "destination"];
    let kinds: Vec<String> = p.kinds.as_deref().map(|k| k.split(',').map(|x| x.trim().to_owned()).filter(|x| !x.is_empty()).collect()).unwrap_or_default();
    if let Some(bad) = kinds.iter().find(|k| !KINDS.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!("unknown kind `{bad}`; use {}", KINDS.join(", "))));
    }
    let limit = p.limit.unwrap_or(10);
    if !(1..=50).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 50"));
    }
    if !f.ready() {
        return Err(ApiError::busy("the catalog is still being indexed; try again shortly"));
    }
    let t0 = std::time::Instant::now();
    let items = f.feed(&user.id, &FeedQuery { lat: p.lat, lon: p.lon, minute, kinds, limit, lang }).await.map_err(failed)?;
    Ok(Json(json!({"user": user.id, "items": items, "took_ms": (t0.elapsed().as_secs_f64() * 1e4).round() / 10.0})))
}

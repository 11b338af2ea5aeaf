//! REST: sessions and their history, the user's orders, mini-programs that
//! register at run time, health, readiness and metrics.

use super::auth::{AppAuth, Caller, Principal, UserAuth};
use super::error::{ApiError, ApiResult};
use super::AppState;
use crate::prompt::Lang;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Largest manifest upload.
const MANIFEST_LIMIT: usize = 256 * 1024;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/sessions", get(list_sessions).post(create_session))
        .route("/v1/sessions/{id}", get(get_session).delete(delete_session))
        .route("/v1/sessions/{id}/history", get(history))
        .route("/v1/orders", get(orders))
        .route("/v1/apps", get(list_apps).post(register_app))
        .route("/v1/apps/{app}", axum::routing::delete(unregister_app))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    let stopping = *st.shutdown.borrow();
    if stopping {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"ready": false, "reason": "shutting down"}))).into_response();
    }
    Json(json!({"ready": true, "model": st.model_id, "tools": st.agent.tools().len(), "sessions": st.hub.count()})).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let e = st.engine.stats();
    let gauges: Vec<(&str, &[(&str, &str)], f64)> = vec![
        ("errand_engine_queue_depth", &[], st.engine.queued() as f64),
        ("errand_kv_cache_bytes", &[], e.kv_bytes as f64),
        ("errand_kv_cache_sessions", &[], e.kv_sessions as f64),
        ("errand_kv_cache_evictions_total", &[], e.kv_evictions as f64),
        ("errand_sessions", &[], st.hub.count() as f64),
    ];
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        st.metrics.render(&gauges),
    )
        .into_response()
}

async fn list_sessions(State(st): State<Arc<AppState>>, user: UserAuth) -> Json<Value> {
    let list: Vec<Value> = st.hub.list(&user.id).iter().map(|s| s.summary()).collect();
    Json(json!({"sessions": list}))
}

#[derive(Deserialize, Default)]
struct NewSession {
    #[serde(default)]
    lang: Option<String>,
}

async fn create_session(State(st): State<Arc<AppState>>, user: UserAuth, body: Option<Json<NewSession>>) -> ApiResult<Response> {
    let lang = match body.and_then(|b| b.0.lang) {
        None => None,
        Some(l) => Some(Lang::parse(&l).ok_or_else(|| ApiError::bad_request(format!("unknown language `{l}`; use en, zh or ko")))?),
    };
    let s = st.hub.create(&user.id, &user.wallet, lang, st.limits.sessions_per_user, st.limits.session_idle()).await;
    Ok((StatusCode::CREATED, Json(s.summary())).into_response())
}

async fn get_session(State(st): State<Arc<AppState>>, user: UserAuth, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let s = st.hub.get(&user.id, &id).ok_or_else(|| ApiError::not_found("session"))?;
    let mut v = s.summary();
    v["pending"] = json!(st.agent.pending(&s.id).await);
    Ok(Json(v))
}

async fn delete_session(State(st): State<Arc<AppState>>, user: UserAuth, Path(id): Path<String>) -> ApiResult<StatusCode> {
    if st.hub.remove(&user.id, &id) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("session"))
    }
}

#[derive(Deserialize)]
struct After {
    #[serde(default)]
    after: u64,
}

async fn history(State(st): State<Arc<AppState>>, user: UserAuth, Path(id): Path<String>, Query(q): Query<After>) -> ApiResult<Json<Value>> {
    let s = st.hub.get(&user.id, &id).ok_or_else(|| ApiError::not_found("session"))?;
    Ok(Json(json!({"session": s.id, "frames": s.history(q.after)})))
}

async fn orders(State(st): State<Arc<AppState>>, Caller(who): Caller) -> ApiResult<Json<Value>> {
    let rows = match &who {
        Principal::User { id, .. } => st.store.orders_for_user(id),
        Principal::App { id, scopes } => {
            if !scopes.iter().any(|s| s == "orders:read") {
                return Err(ApiError::forbidden(format!("app `{id}` lacks the `orders:read` scope")));
            }
            st.store.orders_for_app(id)
        }
    }
    .map_err(ApiError::internal)?;
    Ok(Json(json!({"orders": rows})))
}

async fn list_apps(State(st): State<Arc<AppState>>, Caller(who): Caller) -> ApiResult<Json<Value>> {
    if let Principal::App { id, scopes } = &who {
        if !scopes.iter().any(|s| s == "apps:read" || s == "apps:write") {
            return Err(ApiError::forbidden(format!("app `{id}` lacks the `apps:read` scope")));
        }
    }
    let tools = st.agent.tools();
    let mut apps: Vec<(String, Vec<String>)> = Vec::new();
    for t in tools.iter() {
        match apps.iter_mut().find(|(a, _)| *a == t.app) {
            Some((_, v)) => v.push(t.def.name.clone()),
            None => apps.push((t.app.clone(), vec![t.def.name.clone()])),
        }
    }
    Ok(Json(json!({"apps": apps.into_iter().map(|(app, tools)| json!({"app": app, "tools": tools})).collect::<Vec<_>>()})))
}

/// `POST /v1/apps`: a mini-program registers (or replaces) its own
/// manifest. It is validated exactly like the files in `tools/`, may only
/// name the app the key belongs to, and is kept under `$DATA/apps/` so it
/// survives a restart.
async fn register_app(State(st): State<Arc<AppState>>, app: AppAuth, body: axum::body::Bytes) -> ApiResult<Response> {
    app.require("apps:write")?;
    if body.len() > MANIFEST_LIMIT {
        return Err(ApiError::too_large(MANIFEST_LIMIT));
    }
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::bad_request("the manifest must be UTF-8 JSON"))?;
    let v: Value = serde_json::from_str(text).map_err(|e| ApiError::bad_request(format!("the manifest is not JSON: {e}")))?;
    if v["app"].as_str() != Some(app.id.as_str()) {
        return Err(ApiError::forbidden(format!(
            "this key belongs to app `{}`; the manifest's `app` must be `{}`",
            app.id, app.id
        )));
    }
    if st.builtin_apps.contains(&app.id) {
        return Err(ApiError::forbidden(format!(
            "app `{}` is built in (tools/{}.json); its tools cannot be replaced at run time",
            app.id, app.id
        )));
    }
    // An uploaded mini-program calls its own service, never the sandbox's
    // (where the payment service and the other merchants live).
    if let Some(base) = v["base_url"].as_str() {
        if let Err(why) = outside(base, &st.sandbox_url).await {
            return Err(ApiError::bad_request(format!("base_url `{base}`: {why}")));
        }
    }
    let origin = std::path::PathBuf::from(format!("upload:{}", app.id));
    let tools = crate::tools::parse_manifest(text, &origin).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let names: Vec<String> = tools.iter().map(|t| t.def.name.clone()).collect();
    let _guard = st.apps_lock.lock().await;
    let set = st.agent.tools().with_app(&app.id, tools).map_err(ApiError::bad_request)?;
    let path = st.apps_dir.join(format!("{}.json", app.id));
    std::fs::create_dir_all(&st.apps_dir).map_err(ApiError::internal)?;
    std::fs::write(&path, text).map_err(ApiError::internal)?;
    st.agent.set_tools(Arc::new(set));
    Ok((StatusCode::CREATED, Json(json!({"app": app.id, "tools": names})), ).into_response())
}

/// Checks that an uploaded manifest's `base_url` is an http(s) URL that does
/// not reach the built-in mini-programs, however it is spelled: the URL is
/// parsed as a client would (`HTTP://`, `127.1`), its host resolved
/// (`localhost`), IPv4-mapped IPv6 addresses read as IPv4, and every address
/// compared with the sandbox's. A string comparison let `localhost`, `127.1`
/// and `[::ffff:127.0.0.1]` through.
pub(crate) async fn outside(base: &str, sandbox_url: &str) -> Result<(), String> {
    if base.starts_with("{sandbox}") {
        return Err("points at the built-in mini-programs; an uploaded manifest must name its own service".into());
    }
    let url = reqwest::Url::parse(base).map_err(|e| format!("is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("must be http or https, not `{}`", url.scheme()));
    }
    let resolve = |u: reqwest::Url| async move {
        let host = u.host_str().unwrap_or("").trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = u.port_or_known_default().unwrap_or(80);
        let addrs: Vec<std::net::SocketAddr> = match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(a) => a.collect(),
            Err(_) => Vec::new(),
        };
        addrs.into_iter().map(|a| (canonical(a.ip()), a.port())).collect::<Vec<_>>()
    };
    let inside = match reqwest::Url::parse(sandbox_url) {
        Ok(u) => resolve(u).await,
        Err(_) => Vec::new(),
    };
    let local = |ip: std::net::IpAddr| ip.is_loopback() || ip.is_unspecified();
    for (ip, port) in resolve(url).await {
        if inside.iter().any(|&(sip, sport)| sport == port && (sip == ip || (local(sip) && local(ip)))) {
            return Err("points at the built-in mini-programs (where payments live); an uploaded manifest must name its own service".into());
        }
    }
    Ok(())
}

/// An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) as the IPv4 address it is.
fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

async fn unregister_app(State(st): State<Arc<AppState>>, app: AppAuth, Path(name): Path<String>) -> ApiResult<StatusCode> {
    app.require("apps:write")?;
    if name != app.id {
        return Err(ApiError::forbidden(format!("this key belongs to app `{}`, not `{name}`", app.id)));
    }
    let _guard = st.apps_lock.lock().await;
    let path = st.apps_dir.join(format!("{name}.json"));
    if !path.exists() {
        return Err(ApiError::not_found("registered app"));
    }
    let set = st.agent.tools().with_app(&name, Vec::new()).map_err(ApiError::bad_request)?;
    std::fs::remove_file(&path).map_err(ApiError::internal)?;
    st.agent.set_tools(Arc::new(set));
    Ok(StatusCode::NO_CONTENT)
}

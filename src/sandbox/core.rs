//! What every sandbox service shares: its SQLite handle, the API error type,
//! fault injection and idempotency keys. (Time comes from the world's
//! [`Clock`](crate::world::Clock), which tests pin and `/_admin/clock` moves.)
//!
//! The database handle is a std mutex around one connection: every query is
//! short and never held across an `.await`, which is cheaper and simpler than
//! a pool for a local sandbox (the same reasoning as mini-redis's `db.rs`).

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::{Rng, SeedableRng};
use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;
use crate::world::Clock;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An error a sandbox endpoint answers with: an HTTP status and
/// `{"error": {"code", "message"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        ApiError::internal(format!("database error: {e}"))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// One SQLite connection behind a std mutex (see the module docs).
#[derive(Clone)]
pub struct Db(Arc<Mutex<Connection>>);

impl Db {
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        Self::setup(Connection::open(path)?)
    }

    pub fn open_in_memory() -> rusqlite::Result<Self> {
        Self::setup(Connection::open_in_memory()?)
    }

    fn setup(conn: Connection) -> rusqlite::Result<Self> {
        // WAL: a committed transaction survives the process being killed.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS idempotency (
                key TEXT PRIMARY KEY, request_hash TEXT NOT NULL,
                status INTEGER NOT NULL, body BLOB NOT NULL, created_ms INTEGER NOT NULL)",
        )?;
        Ok(Self(Arc::new(Mutex::new(conn))))
    }

    /// Runs `f` with the connection. Keep `f` short and free of `.await`.
    pub fn with<R>(&self, f: impl FnOnce(&mut Connection) -> ApiResult<R>) -> ApiResult<R> {
        let mut conn = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }

    /// Runs `f` inside one transaction, committed only if `f` succeeds.
    pub fn tx<R>(&self, f: impl FnOnce(&rusqlite::Transaction) -> ApiResult<R>) -> ApiResult<R> {
        self.with(|conn| {
            let tx = conn.transaction()?;
            let r = f(&tx)?;
            tx.commit()?;
            Ok(r)
        })
    }
}

/// Fault-injection knobs of one service, adjustable while it runs through
/// `POST /{service}/_admin/faults`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct FaultConfig {
    /// Added to every request before it is handled.
    #[serde(default)]
    pub latency_ms: u64,
    /// Share of requests (0..=1) answered with 503 instead of being handled.
    #[serde(default)]
    pub error_rate: f64,
}

#[derive(Clone)]
pub struct Faults {
    config: Arc<Mutex<FaultConfig>>,
    rng: Arc<Mutex<rand::rngs::StdRng>>,
}

impl Faults {
    pub fn new(config: FaultConfig, seed: u64) -> Self {
        Self {
            config: Arc::new(Mutex::new(config)),
            rng: Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed))),
        }
    }
    pub fn get(&self) -> FaultConfig {
        *self.config.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn set(&self, c: FaultConfig) {
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = c;
    }
}

/// Middleware: sleeps `latency_ms`, then fails `error_rate` of requests with
/// 503. Admin paths (`/_admin/…`) are never faulted.
pub async fn fault_layer(State(faults): State<Faults>, req: Request, next: Next) -> Response {
    if req.uri().path().contains("/_admin/") {
        return next.run(req).await;
    }
    let c = faults.get();
    if c.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(c.latency_ms)).await;
    }
    if c.error_rate > 0.0 {
        let roll: f64 = faults.rng.lock().unwrap_or_else(|p| p.into_inner()).random();
        if roll < c.error_rate {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "injected_fault",
                "the service is failing on purpose (fault injection)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

#[derive(Clone)]
pub struct Idempotency {
    db: Db,
    clock: Clock,
    /// One lock per key in flight: a retry racing the original waits for its
    /// stored answer instead of running twice; other keys run in parallel.
    locks: Arc<Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Idempotency {
    pub fn new(db: Db, clock: Clock) -> Self {
        Self {
            db,
            clock,
            locks: Arc::new(Mutex::new(std::collections::HashMap::new())),
        }
    }

    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Forget locks nobody holds any more.
        m.retain(|_, l| Arc::strong_count(l) > 1);
        m.entry(key.to_owned()).or_default().clone()
    }
}

/// Middleware: a write (POST, PUT, PATCH, DELETE) carrying an
/// `Idempotency-Key` header runs at most once; a repeat with the same key and
/// the same request gets the stored answer, and the same key with a different
/// request is refused with 422. Only successful (2xx) answers are stored, so a
/// request that failed can be retried with its key.
///
/// Keys are scoped by the caller (its `Authorization` header and merchant
/// id): the layer runs before the handler checks credentials, so a key
/// another caller used must not hand its stored answer to someone else.
pub async fn idempotency_layer(State(idem): State<Idempotency>, req: Request, next: Next) -> Response {
    let is_write = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH | Method::DELETE);
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (Some(key), true) = (key, is_write) else {
        return next.run(req).await;
    };
    if key.is_empty() || key.len() > 200 {
        return ApiError::bad_request("Idempotency-Key must be 1-200 characters").into_response();
    }
    let given = key.clone();
    let key = {
        let mut scope = Sha256::new();
        for name in ["authorization", crate::sandbox::sign::MCH_ID] {
            scope.update(req.headers().get(name).map(|v| v.as_bytes()).unwrap_or_default());
            scope.update(b"\n");
        }
        format!("{}:{key}", &hex::encode(scope.finalize())[..16])
    };
    let (parts, body) = req.into_parts();
    let Ok(bytes) = to_bytes(body, 1 << 20).await else {
        return ApiError::bad_request("request body too large or unreadable").into_response();
    };
    let mut h = Sha256::new();
    h.update(parts.method.as_str());
    h.update(b" ");
    h.update(parts.uri.path());
    h.update(b"\n");
    h.update(&bytes);
    let hash = hex::encode(h.finalize());
    let key_lock = idem.lock_for(&key);
    let guard = key_lock.clone().lock_owned().await;
    let stored = idem.db.with(|c| {
        Ok(c.query_row(
            "SELECT request_hash, status, body FROM idempotency WHERE key = ?1",
            [&key],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, u16>(1)?, r.get::<_, Vec<u8>>(2)?)),
        )
        .optional()?)
    });
    match stored {
        Err(e) => return e.into_response(),
        Ok(Some((h, status, body))) => {
            if h != hash {
                return ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    format!("Idempotency-Key {given} was already used for a different request"),
                )
                .into_response();
            }
            let mut resp = Response::new(Body::from(body));
            *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            resp.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            resp.headers_mut()
                .insert("idempotent-replay", "true".parse().unwrap());
            return resp;
        }
        Ok(None) => {}
    }
    let req = Request::from_parts(parts, Body::from(bytes));
    // The handler runs in its own task, holding the key's lock, so a client
    // that gives up (a timeout) does not cancel it half-way: it finishes and
    // its answer is stored for the retry.
    let (db, clock) = (idem.db.clone(), idem.clock.clone());
    let task = tokio::spawn(async move {
        let _guard = guard;
        let resp = next.run(req).await;
        if !resp.status().is_success() {
            return resp;
        }
        let (parts, body) = resp.into_parts();
        let Ok(bytes) = to_bytes(body, 8 << 20).await else {
            return ApiError::internal("response body unreadable").into_response();
        };
        let now = clock.now_ms();
        let saved = db.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO idempotency (key, request_hash, status, body, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![key, hash, parts.status.as_u16(), bytes.to_vec(), now],
            )?;
            Ok(())
        });
        if let Err(e) = saved {
            return e.into_response();
        }
        Response::from_parts(parts, Body::from(bytes))
    });
    match task.await {
        Ok(resp) => resp,
        Err(e) => ApiError::internal(format!("the handler failed: {e}")).into_response(),
    }
}

/// A deterministic generator for catalogs: the same seed and label always
/// give the same sequence, independent of the order services start in.
pub fn seeded_rng(seed: u64, label: &str) -> rand::rngs::StdRng {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(label.as_bytes());
    let d = h.finalize();
    let mut s = [0u8; 32];
    s.copy_from_slice(&d);
    rand::rngs::StdRng::from_seed(s)
}

/// A short random id with a prefix, e.g. `ord_3f9a1c…`.
pub fn new_id(prefix: &str) -> String {
    let n: u64 = rand::rng().random();
    format!("{prefix}_{n:016x}")
}

/// Parses an optional JSON body leniently: empty means `{}`.
pub fn json_or_empty(bytes: &[u8]) -> ApiResult<Value> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(json!({}));
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("body is not valid JSON: {e}")))
}

/// Reads a header as text.
pub fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

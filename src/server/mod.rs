//! `errand serve`: one axum server for every interface.
//!
//! ```text
//!  browser / widget / SDK ──ws──► /v1/ws ── ws.rs ──► hub.rs (sessions, logs, dedup) ──► Agent ──► Engine
//!  openai clients ──HTTP/SSE──► /v1/chat/completions ── openai.rs ───────────────────────────────► Engine
//!  REST ──► rest.rs: sessions, history, orders (orders.rs), apps (manifest upload), healthz, readyz, metrics
//!  GET / , /sdk.js, /widget.js ──► web/ (embedded in the binary)
//! ```
//!
//! Authentication is in `auth.rs` (users' bearer tokens, apps' keys with
//! scopes), limits in `limits.rs` and `config.rs`, errors in `error.rs`.
//! Shutdown (SIGTERM or [`Server::shutdown`]) stops accepting work, lets
//! replies in progress finish (up to `drain_seconds`), says `bye` to every
//! socket and then stops the in-process sandbox.

pub mod auth;
pub mod config;
pub mod error;
pub mod hub;
pub mod store;
pub mod limits;
pub mod metrics;
pub mod openai;
pub mod orders;
pub mod personal;
pub mod rest;
pub mod ws;

use crate::adapter::{HttpAdapter, HttpOptions};
use crate::agent::{Agent, AgentOptions};
use crate::audit::Audit;
use crate::engine::Engine;
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::tools::ToolSet;
use crate::world::Clock;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use config::{Limits, ServerConfig};
use error::ApiError;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error("cannot open {what} in {path}: {message}")]
    Data { what: &'static str, path: PathBuf, message: String },
    #[error("a registered mini-program in {path} no longer loads: {message}")]
    App { path: PathBuf, message: String },
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
}

/// Where the mini-programs live.
pub enum SandboxChoice {
    /// Start the sandbox services in this process (the default), on the
    /// server's clock (the configuration's own clock is replaced).
    InProcess(SandboxConfig),
    /// Mini-programs already running at this base URL.
    /// Mini-programs at `url`, and the sandbox's secret, from which the
    /// server derives each user's wallet credential.
    Remote { url: String, secret: Vec<u8> },
}

pub struct ServeOptions {
    pub config: ServerConfig,
    /// `orders.db`, `audit.db`, `apps/` (uploaded manifests).
    pub data_dir: PathBuf,
    pub tools: ToolSet,
    pub agent: AgentOptions,
    pub sandbox: SandboxChoice,
    /// How often confirmed orders are re-read to push status changes.
    pub order_poll: Duration,
    /// Personal memory and the feed; `None` turns them off.
    pub memory: Option<MemoryOptions>,
    /// The world's clock, shared with the in-process sandbox and the agent
    /// (its own `clock` is replaced): sessions, orders, memories, the
    /// prompt's date. Pinned by tests, evaluations and `--now`.
    pub clock: Clock,
}

/// Where memories and the catalog index live, and what embeds them.
#[derive(Clone)]
pub struct MemoryOptions {
    pub embedder: Arc<dyn crate::memory::embed::Embedder>,
    /// A Qdrant server (gRPC, e.g. `http://localhost:6334`); embedded
    /// qdrant-edge under the data directory when `None`.
    pub qdrant_url: Option<String>,
}

/// What every handler shares. Cheap to reach through `Arc`.
pub struct AppState {
    pub limits: Limits,
    pub auth: auth::Auth,
    pub engine: Arc<Engine>,
    pub agent: Arc<Agent>,
    pub model_id: String,
    pub metrics: Arc<metrics::Metrics>,
    pub rate: limits::RateLimiter,
    pub hub: Arc<hub::Hub>,
    /// Sessions, frame logs, agent states and the order book (`store.rs`).
    pub store: Arc<dyn store::Store>,
    pub apps_dir: PathBuf,
    /// Apps whose manifests come from the tools folder: not replaceable at run time.
    pub builtin_apps: Vec<String>,
    /// The mini-programs' base URL; uploaded manifests may not point there.
    pub sandbox_url: String,
    /// Serializes manifest uploads (read-modify-write of the tool set).
    pub apps_lock: tokio::sync::Mutex<()>,
    pub shutdown: watch::Receiver<bool>,
    pub conns: Arc<Semaphore>,
    /// Sockets that have not said `hello` yet (a quarter of `conns`).
    pub ws_strangers: Arc<Semaphore>,
    /// Open sockets per user (at most `limits.connections_per_user`).
    pub ws_users: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// Users turned away with `busy` and not admitted since: when they were
    /// first turned away, and when they last tried (see [`AppState::admit`]).
    pub waiting: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, std::time::Instant)>>,
    /// Memory and the feed (`None` with `--no-memory`).
    pub feed: Option<Arc<crate::memory::feed::Feed>>,
    pub clock: Clock,
    /// When the server came up, by `clock`.
    pub started_ms: i64,
}

impl AppState {
    /// One model-backed unit of work by `user`: refused while shutting
    /// down, over the user's rate, or when the engine's queue is full.
    /// Admits model work, or sheds it with `busy`. Shedding is fair: a
    /// user turned away waits in line (while they keep trying, at least
    /// every 10 s), and a free slot goes to whoever has waited longest; one
    /// who was not turned away gets a slot only when nobody waits. (With
    /// "first to retry wins", 58 of 200 saturating users got no reply in two
    /// minutes of the load campaign.)
    pub fn admit(&self, user: &str) -> Result<(), ApiError> {
        self.admit_light(user)?;
        let queued = self.engine.queued();
        let now = std::time::Instant::now();
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.retain(|_, (_, last)| now.duration_since(*last) < Duration::from_secs(10));
        let since = waiting.get(user).map(|(since, _)| *since).unwrap_or(now);
        let ahead = waiting.iter().filter(|(u, (t, _))| u.as_str() != user && *t < since).count();
        let free = self.limits.queue_limit.saturating_sub(queued);
        if ahead >= free {
            waiting.insert(user.to_owned(), (since, now));
            self.metrics.inc("errand_rejected_total", &[("reason", "busy")]);
            return Err(ApiError::busy(format!("the model is busy ({queued} requests waiting, {ahead} people ahead of you); try again in a few seconds")));
        }
        waiting.remove(user);
        Ok(())
    }

    /// Work that needs no model time (a confirmation): only the rate counts.
    pub fn admit_light(&self, user: &str) -> Result<(), ApiError> {
        if *self.shutdown.borrow() {
            return Err(ApiError::busy("the server is shutting down"));
        }
        if let Err(wait) = self.rate.take(&format!("user:{user}")) {
            self.metrics.inc("errand_rejected_total", &[("reason", "rate")]);
            return Err(ApiError::rate_limited(wait.as_secs_f64().ceil() as u64));
        }
        Ok(())
    }
}

/// Resolves once shutdown has begun (holds no borrow across awaits).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

const INDEX_HTML: &str = include_str!("../../web/index.html");
const SDK_JS: &str = include_str!("../../web/sdk.js");
const WIDGET_JS: &str = include_str!("../../web/widget.js");
const APP_CSS: &str = include_str!("../../web/app.css");

fn asset(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// The whole HTTP surface, without a socket (tests may call it directly).
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/sdk.js", get(|| async { asset("text/javascript; charset=utf-8", SDK_JS) }))
        .route("/widget.js", get(|| async { asset("text/javascript; charset=utf-8", WIDGET_JS) }))
        .route("/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
        .route("/v1/ws", get(ws::handler))
        .merge(rest::routes())
        .merge(personal::routes())
        .merge(openai::routes())
        .layer(axum::extract::DefaultBodyLimit::max(1024 * 1024))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

async fn count_requests(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let r = next.run(req).await;
    st.metrics.inc("errand_http_requests_total", &[("route", &route), ("status", r.status().as_str())]);
    r
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub state: Arc<AppState>,
    shutdown_tx: watch::Sender<bool>,
    http_stop_tx: watch::Sender<bool>,
    http: tokio::task::JoinHandle<()>,
    sandbox: Option<Sandbox>,
    sandbox_secret: Vec<u8>,
    drain: Duration,
}

impl Server {
    /// Starts the mini-programs (unless remote), the agent and the HTTP
    /// server on `listener`.
    pub async fn start(engine: Arc<Engine>, listener: tokio::net::TcpListener, opts: ServeOptions) -> Result<Server, ServerError> {
        let data = opts.data_dir.clone();
        let data_err = |what: &'static str, e: &dyn std::fmt::Display| ServerError::Data { what, path: data.clone(), message: e.to_string() };
        let (base, sandbox, sandbox_secret) = match opts.sandbox {
            SandboxChoice::Remote { url, secret } => (url.trim_end_matches('/').to_owned(), None, secret),
            SandboxChoice::InProcess(mut cfg) => {
                cfg.clock = opts.clock.clone();
                // Every configured user gets a wallet to pay from.
                for u in &opts.config.users {
                    let w = u.wallet.clone().unwrap_or_else(|| u.id.clone());
                    for (cur, bal) in [("CNY", 200_000), ("KRW", 500_000)] {
                        if !cfg.pay.wallets.iter().any(|(id, c, _)| *id == w && c == cur) {
                            cfg.pay.wallets.push((w.clone(), cur.into(), bal));
                        }
                    }
                }
                let sb = crate::sandbox::start(cfg).await?;
                let secret = sb.secret().to_vec();
                (sb.base_url.clone(), Some(sb), secret)
            }
        };
        // Mini-programs registered at run time come back after a restart.
        let apps_dir = data.join("apps");
        let mut builtin_apps: Vec<String> = opts.tools.iter().map(|t| t.app.clone()).collect();
        builtin_apps.dedup();
        let mut tools = opts.tools;
        if let Ok(rd) = std::fs::read_dir(&apps_dir) {
            let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "json")).collect();
            paths.sort();
            for p in paths {
                let app = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
                let loaded = crate::tools::load_manifest(&p).map_err(|e| ServerError::App { path: p.clone(), message: e.to_string() })?;
                tools = tools.with_app(&app, loaded).map_err(|message| ServerError::App { path: p.clone(), message })?;
            }
        }
        let clock = opts.clock;
        let audit = Audit::open(&data.join("audit.db"), clock.clone()).map_err(|e| data_err("the audit log", &e))?;
        let store: Arc<dyn store::Store> = Arc::new(store::SqliteStore::open(&data, clock.clone()).map_err(|e| data_err("the session store and order book", &e))?);
        let adapter = Arc::new(HttpAdapter::new(HttpOptions { sandbox_url: Some(base.clone()), ..Default::default() }));
        let mut agent_opts = opts.agent;
        agent_opts.clock = clock.clone();
        if agent_opts.pay_url.is_none() {
            agent_opts.pay_url = Some(format!("{base}/pay"));
        }
        if agent_opts.pay_credentials.is_none() {
            agent_opts.pay_credentials = Some(crate::agent::PayCredentials(crate::sandbox::sign::wallet_credentials(&sandbox_secret)));
        }
        if agent_opts.order_book.is_none() {
            // Orders are in the book before they are paid (issue 23, finding 4).
            let book = store.clone();
            agent_opts.order_book = Some(crate::agent::OrderBook(Arc::new(move |o: &crate::agent::PlacedOrder| {
                let (Some(user), Some(order_id)) = (o.user, o.order_id.clone()) else { return Ok(()) };
                book.upsert_order(&orders::OrderRow {
                    user: user.to_owned(),
                    session: o.session.to_owned(),
                    app: o.app.to_owned(),
                    tool: o.tool.to_owned(),
                    order_id,
                    status: o.order["status"].as_str().unwrap_or("unknown").to_owned(),
                    amount: o.amount,
                    currency: o.currency.to_owned(),
                    summary: o.summary.to_owned(),
                    payment_status: o.order["payment"]["status"].as_str().unwrap_or_default().to_owned(),
                    data: o.order.clone(),
                })
                .map_err(|e| format!("the order book: {e}"))
            })));
        }
        if agent_opts.session_book.is_none() {
            // A session's state is on disk before a confirmation is shown
            // and before money moves, so a restart resumes it (issue 23).
            let book = store.clone();
            agent_opts.session_book = Some(crate::agent::SessionBook(Arc::new(move |sid: &str, state: &serde_json::Value| book.put_state(sid, state).map_err(|e| e.to_string()))));
        }
        let agent = Agent::new(engine.clone(), Arc::new(tools), adapter, audit, agent_opts);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let feed = match opts.memory {
            None => None,
            Some(m) => {
                let store = match &m.qdrant_url {
                    None => crate::memory::store::Store::Edge(crate::memory::store::EdgeStore::open(data.join("vectors")).map_err(|e| data_err("the vector store", &format!("{e:#}")))?),
                    Some(url) => crate::memory::store::Store::Qdrant(crate::memory::store::QdrantStore::connect(url, "errand_").map_err(|e| data_err("the Qdrant server", &format!("{e:#}")))?),
                };
                let memory = crate::memory::Memory::open(Arc::new(store), m.embedder, clock.clone()).await.map_err(|e| data_err("the memory store", &format!("{e:#}")))?;
                let feed = crate::memory::feed::Feed::open(memory).await.map_err(|e| data_err("the catalog index", &format!("{e:#}")))?;
                agent.set_personal(Some(feed.clone()));
                // Indexing embeds only what changed since the last start;
                // the feed answers 503 until it is done.
                let (f, url, mut stop) = (feed.clone(), base.clone(), shutdown_rx.clone());
                tokio::spawn(async move {
                    for attempt in 0..5u64 {
                        // A server stopped while indexing (a short-lived
                        // evaluation world) has no sandbox left to read.
                        let r = tokio::select! {
                            r = f.index_from(&url) => r,
                            _ = stopped(&mut stop) => return,
                        };
                        match r {
                            Ok(_) => return,
                            Err(e) => {
                                eprintln!("errand serve: indexing the catalog failed (attempt {}): {e:#}", attempt + 1);
                                tokio::select! {
                                    _ = tokio::time::sleep(Duration::from_secs(2 << attempt)) => {}
                                    _ = stopped(&mut stop) => return,
                                }
                            }
                        }
                    }
                });
                Some(feed)
            }
        };
        // The listener stays open while draining, so /readyz can say 503.
        let (http_stop_tx, http_stop_rx) = watch::channel(false);
        let metrics = Arc::new(metrics::Metrics::default());
        let hub = Arc::new(hub::Hub::new(agent.clone(), store.clone(), metrics.clone(), shutdown_rx.clone(), opts.order_poll, clock.clone()));
        // Sessions of an earlier run resume where they were.
        hub.restore().await;
        // Orders left awaiting payment by an earlier run (a crash between
        // paying and reporting) are asked about once at start.
        {
            let (agent, store) = (agent.clone(), store.clone());
            tokio::spawn(async move {
                for o in store.orders_awaiting_payment().unwrap_or_default() {
                    if let Some(now) = agent.order_status(&o.row.app, &o.row.data).await {
                        let status = now["status"].as_str().unwrap_or("unknown");
                        let _ = store.update_order(&o.row.user, &o.row.app, &o.row.order_id, status, now["payment"]["status"].as_str(), &now);
                    }
                }
            });
        }
        let limits = opts.config.server.clone();
        let state = Arc::new(AppState {
            auth: auth::Auth::from_config(&opts.config),
            model_id: engine.info.name.clone(),
            engine,
            agent,
            metrics,
            rate: limits::RateLimiter::new(limits.requests_per_minute),
            hub,
            store,
            apps_dir,
            builtin_apps,
            sandbox_url: base.clone(),
            apps_lock: tokio::sync::Mutex::new(()),
            shutdown: shutdown_rx.clone(),
            conns: Arc::new(Semaphore::new(limits.max_connections)),
            ws_strangers: Arc::new(Semaphore::new((limits.max_connections / 4).max(1))),
            ws_users: Default::default(),
            waiting: Default::default(),
            limits,
            feed,
            started_ms: clock.now_ms(),
            clock,
        });
        let addr = listener.local_addr()?;
        let guard = state.limits.allowed_hosts.iter().fold(crate::guard::Guard::loopback().bound(addr), |g, h| g.host(h));
        let guard = state.limits.allowed_origins.iter().fold(guard, |g, o| g.origin(o));
        let router = app(state.clone()).layer(axum::middleware::from_fn_with_state(Arc::new(guard), crate::guard::layer));
        let mut stop = http_stop_rx;
        let http = tokio::spawn(async move {
            let r = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|v| *v).await;
                })
                .await;
            if let Err(e) = r {
                eprintln!("errand serve: the HTTP server stopped: {e}");
            }
        });
        Ok(Server {
            addr,
            url: format!("http://{addr}"),
            drain: Duration::from_secs(state.limits.drain_seconds),
            state,
            shutdown_tx,
            http_stop_tx,
            http,
            sandbox,
            sandbox_secret,
        })
    }

    /// The sandbox's secret (wallet and admin credentials derive from it).
    pub fn sandbox_secret(&self) -> &[u8] {
        &self.sandbox_secret
    }

    /// The mini-programs' base URL (the in-process sandbox's, or the remote one).
    pub fn sandbox_url(&self) -> Option<&str> {
        self.sandbox.as_ref().map(|s| s.base_url.as_str())
    }

    /// Stops taking work, lets replies in progress finish (up to the drain
    /// time), closes every socket with `bye`, then stops the sandbox.
    /// Returns whether everything finished within the drain time.
    pub async fn shutdown(mut self) -> bool {
        self.shutdown_tx.send_replace(true);
        let drained = {
            // Every session worker, order watcher and socket holds a clone
            // of the hub's task guard: wait until only the hub's is left.
            let deadline = tokio::time::Instant::now() + self.drain;
            loop {
                if Arc::strong_count(&self.state.hub.tasks) <= 1 {
                    break true;
                }
                if tokio::time::Instant::now() >= deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        self.http_stop_tx.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.http).await;
        if let Some(sb) = self.sandbox.take() {
            sb.stop().await;
        }
        drained
    }
}

//! Sandbox mini-programs: real HTTP services (axum) with SQLite state and
//! deterministic, seeded catalogs, for the assistant to book and pay in.
//!
//! ```text
//!  one listener (127.0.0.1:port)
//!   ├─ /pay/…      payments: trades keyed by out_trade_no, wallet, signed notifications, refunds, friend-pay
//!   ├─ /tickets/…  trains between cities and shows: search → hold → order → cancel/refund
//!   ├─ /food/…     restaurants, menus, cart → order → delivery status over time
//!   ├─ /ride/…     quotes by vehicle class → request → driver → complete; cancel fees
//!   ├─ /salon/…    stylists and time slots
//!   ├─ /bike/…     scan → unlock → ride → lock → fee
//!   ├─ /mart/…     grocery delivery
//!   └─ /_admin/clock   read the shared clock (GET) or move it forward (POST; statuses advance with time)
//! ```
//!
//! Each service has its own database file under the data folder, its own
//! fault knobs (`/{service}/_admin/faults`: latency and error rate) and
//! honours `Idempotency-Key` on writes. The merchants receive the payment
//! service's signed notifications at `/{service}/pay/notify` and reconcile by
//! query at start-up ([`merchant`]). `errand chat` starts all of them
//! in-process; `errand sandbox` runs them alone, or a subset with
//! `--only` and `--pay-url` pointing at a payment service elsewhere.
//!
//! Every request passes the [`guard`](crate::guard) first: loopback `Host`
//! names only, no browser origins, JSON bodies only. Writes to `/_admin/…`
//! need the admin credential, and money moves only as [`sign`] allows.

pub mod bike;
pub mod catalog;
pub mod common;
pub mod core;
pub mod food;
pub mod mart;
pub mod merchant;
pub mod pay;
pub mod ride;
pub mod salon;
pub mod sign;
pub mod terms;
pub mod tickets;
#[cfg(test)] pub(crate) mod testkit;

use self::core::{fault_layer, idempotency_layer, ApiError, Db, FaultConfig, Faults, Idempotency};
use crate::world::Clock;
use axum::extract::State;
use axum::middleware::from_fn_with_state;
use axum::routing::get;
use axum::{Json, Router};
use merchant::Merchant;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot use the sandbox data folder {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("cannot open the {service} database {path}: {source}")]
    Db {
        service: &'static str,
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot listen on {addr}: {source} (is another sandbox running there? pick another --port)")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the {service} service failed to start: {source}")]
    Service { service: &'static str, source: ApiError },
}

/// The mini-programs the sandbox can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    Pay,
    Tickets,
    Food,
    Ride,
    Salon,
    Bike,
    Mart,
}

impl Service {
    pub const ALL: [Service; 7] = [
        Service::Pay,
        Service::Tickets,
        Service::Food,
        Service::Ride,
        Service::Salon,
        Service::Bike,
        Service::Mart,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Pay => "pay",
            Service::Tickets => "tickets",
            Service::Food => "food",
            Service::Ride => "ride",
            Service::Salon => "salon",
            Service::Bike => "bike",
            Service::Mart => "mart",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// Payment-service knobs.
#[derive(Debug, Clone)]
pub struct PayOptions {
    /// First retry delay for an undelivered notification; doubles each time.
    pub notify_backoff: Duration,
    /// Attempts before a notification is given up (merchants still reconcile by query).
    pub notify_attempts: u32,
    /// Test knob: exit the process right after a payment is committed, before
    /// the merchant is notified.
    pub crash_after_pay: bool,
    /// Wallets created at start where missing (an existing one keeps its balance): (wallet id, currency, balance in minor units).
    pub wallets: Vec<(String, String, i64)>,
}

impl Default for PayOptions {
    fn default() -> Self {
        Self {
            notify_backoff: Duration::from_millis(500),
            notify_attempts: 8,
            crash_after_pay: false,
            wallets: vec![
                ("demo".into(), "CNY".into(), 200_000),
                ("demo".into(), "KRW".into(), 500_000),
                ("friend".into(), "CNY".into(), 100_000),
                ("friend".into(), "KRW".into(), 300_000),
            ],
        }
    }
}

#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Where each service keeps `<service>.db` and the shared `secret`.
    pub data_dir: PathBuf,
    pub addr: SocketAddr,
    pub seed: u64,
    pub services: Vec<Service>,
    /// A payment service elsewhere, when this process does not run `pay`.
    pub pay_url: Option<String>,
    /// The key merchants and the payment service share; read from (or
    /// written to) `data_dir/secret` when unset.
    pub secret: Option<Vec<u8>>,
    pub faults: FaultConfig,
    pub pay: PayOptions,
    /// The world's clock: the wall clock by default; tests and evaluations
    /// pin it so that dates, opening hours and prices stay reproducible.
    pub clock: Clock,
}

impl SandboxConfig {
    pub fn new(data_dir: impl Into<PathBuf>, clock: Clock) -> Self {
        Self {
            data_dir: data_dir.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            seed: 42,
            services: Service::ALL.to_vec(),
            pay_url: None,
            secret: None,
            faults: FaultConfig::default(),
            pay: PayOptions::default(),
            clock,
        }
    }
}

/// What a service's router gets.
#[derive(Clone)]
pub struct ServiceCtx {
    pub db: Db,
    pub clock: Clock,
    pub seed: u64,
    /// This service's own base URL (…/food).
    pub base_url: String,
    /// The merchant account; `None` for the payment service itself.
    pub merchant: Option<Arc<Merchant>>,
}

impl ServiceCtx {
    /// The merchant account of a service that takes money.
    pub fn merchant(&self) -> &Arc<Merchant> {
        self.merchant.as_ref().expect("merchant services are built with a merchant")
    }
}

/// A running sandbox. Dropping it leaves the server running until the
/// runtime ends; call [`Sandbox::stop`] to stop it and wait.
pub struct Sandbox {
    pub addr: SocketAddr,
    pub base_url: String,
    pub clock: Clock,
    faults: HashMap<Service, Faults>,
    merchants: HashMap<Service, Arc<Merchant>>,
    secret: Vec<u8>,
    data_dir: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sandbox {
    /// The credential that pays from and reads `wallet_id` (the assistant
    /// server holds one per user).
    pub fn wallet_credential(&self, wallet_id: &str) -> String {
        sign::wallet_credential(&self.secret, wallet_id)
    }

    /// The credential for writes to `/_admin/…` (balances, the clock, faults).
    pub fn admin_credential(&self) -> String {
        sign::admin_credential(&self.secret)
    }

    /// Where the services keep their databases.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// The shared secret every key here is derived from.
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    pub fn url(&self, service: Service) -> String {
        format!("{}/{}", self.base_url, service.name())
    }

    pub fn faults(&self, service: Service) -> Option<&Faults> {
        self.faults.get(&service)
    }

    pub fn merchant(&self, service: Service) -> Option<&Arc<Merchant>> {
        self.merchants.get(&service)
    }

    /// The folder a service's database lives in is the config's `data_dir`;
    /// this opens another connection to it for inspection (tests, audits).
    pub fn open_db(data_dir: &std::path::Path, service: Service) -> rusqlite::Result<rusqlite::Connection> {
        rusqlite::Connection::open(data_dir.join(format!("{}.db", service.name())))
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

fn secret(cfg: &SandboxConfig) -> Result<Vec<u8>, SandboxError> {
    if let Some(s) = &cfg.secret {
        return Ok(s.clone());
    }
    let path = cfg.data_dir.join("secret");
    let err = |source| SandboxError::DataDir {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(s) if !s.is_empty() => Ok(s),
        _ => {
            let s: [u8; 32] = rand::random();
            let text = hex::encode(s).into_bytes();
            std::fs::write(&path, &text).map_err(err)?;
            Ok(text)
        }
    }
}

/// Binds, builds every configured service and serves until stopped.
pub async fn start(cfg: SandboxConfig) -> Result<Sandbox, SandboxError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| SandboxError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let secret = secret(&cfg)?;
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|source| SandboxError::Bind { addr: cfg.addr, source })?;
    let addr = listener.local_addr().map_err(|source| SandboxError::Bind { addr: cfg.addr, source })?;
    let base_url = format!("http://{addr}");
    let pay_url = cfg.pay_url.clone().unwrap_or_else(|| format!("{base_url}/pay"));
    let clock = cfg.clock.clone();

    // Built once: the recommendation feed reads it at start.
    let items = Arc::new(json!({"seed": cfg.seed, "items": catalog::items(cfg.seed, &cfg.services)}));
    let mut app = Router::new()
        .route("/health", get(|| async { Json(json!({"ok": true})) }))
        .route("/catalog", get(move || async move { Json(items.as_ref().clone()) }))
        .route("/_admin/clock", get(read_clock).post(advance_clock).with_state(clock.clone()));
    let mut faults = HashMap::new();
    let mut merchants = HashMap::new();
    for (i, &svc) in cfg.services.iter().enumerate() {
        let name = svc.name();
        let path = cfg.data_dir.join(format!("{name}.db"));
        let db = Db::open(&path).map_err(|source| SandboxError::Db {
            service: name,
            path: path.clone(),
            source,
        })?;
        let svc_url = format!("{base_url}/{name}");
        let merchant = if svc == Service::Pay {
            None
        } else {
            let m = Merchant::new(name, &secret, &pay_url, &format!("{svc_url}/pay/notify"), db.clone(), clock.clone())
                .map_err(|source| SandboxError::Service { service: name, source })?;
            merchants.insert(svc, m.clone());
            Some(m)
        };
        let ctx = ServiceCtx {
            db: db.clone(),
            clock: clock.clone(),
            seed: cfg.seed,
            base_url: svc_url,
            merchant: merchant.clone(),
        };
        let built = match svc {
            Service::Pay => pay::router(ctx, &secret, cfg.pay.clone()),
            Service::Tickets => tickets::router(ctx),
            Service::Food => food::router(ctx),
            Service::Ride => ride::router(ctx),
            Service::Salon => salon::router(ctx),
            Service::Bike => bike::router(ctx),
            Service::Mart => mart::router(ctx),
        };
        let mut router = built.map_err(|source| SandboxError::Service { service: name, source })?;
        if let Some(m) = &merchant {
            router = router.merge(m.notify_router());
        }
        let f = Faults::new(cfg.faults, cfg.seed.wrapping_add(i as u64));
        let router = router
            .route("/_admin/faults", get(get_faults).post(set_faults).with_state(f.clone()))
            .layer(from_fn_with_state(Idempotency::new(db, clock.clone()), idempotency_layer))
            .layer(from_fn_with_state(f.clone(), fault_layer));
        faults.insert(svc, f);
        app = app.nest(&format!("/{name}"), router);
    }

    let guard = Arc::new(crate::guard::Guard::loopback().bound(addr).json_only());
    let app = app
        .layer(from_fn_with_state(Arc::new(secret.clone()), admin_only))
        .layer(from_fn_with_state(guard, crate::guard::layer));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    });
    // Payments made while a merchant was down are picked up by query.
    for m in merchants.values() {
        let m = m.clone();
        tokio::spawn(async move {
            let _ = m.reconcile().await;
        });
    }
    Ok(Sandbox {
        addr,
        base_url,
        clock,
        faults,
        merchants,
        secret,
        data_dir: cfg.data_dir.clone(),
        shutdown: Some(tx),
        task,
    })
}

/// Writes to `/_admin/…` (balances, the clock, faults) need the admin
/// credential; reading them does not.
async fn admin_only(State(secret): State<Arc<Vec<u8>>>, req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::response::IntoResponse;
    if req.method() != axum::http::Method::GET && req.uri().path().contains("/_admin/") && !sign::is_admin(&secret, req.headers()) {
        return ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "admin endpoints need the sandbox's admin credential (Authorization: Bearer admin.…)",
        )
        .into_response();
    }
    next.run(req).await
}

#[derive(Deserialize)]
struct Advance {
    seconds: u64,
}

async fn read_clock(State(clock): State<Clock>) -> Json<Value> {
    Json(json!({"now_ms": clock.now_ms(), "pinned": clock.is_pinned()}))
}

async fn advance_clock(State(clock): State<Clock>, Json(a): Json<Advance>) -> Json<Value> {
    clock.advance(Duration::from_secs(a.seconds));
    Json(json!({"now_ms": clock.now_ms()}))
}

async fn get_faults(State(f): State<Faults>) -> Json<FaultConfig> {
    Json(f.get())
}

async fn set_faults(State(f): State<Faults>, Json(c): Json<FaultConfig>) -> Result<Json<FaultConfig>, ApiError> {
    if !(0.0..=1.0).contains(&c.error_rate) {
        return Err(ApiError::bad_request("error_rate must be between 0 and 1"));
    }
    f.set(c);
    Ok(Json(c))
}

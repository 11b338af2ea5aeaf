//! The payment sandbox: a WeChat-Pay/Alipay-like service the merchants open
//! trades with and the assistant pays through, so that money moves exactly
//! once and merchants learn about it reliably.
//!
//! It offers trades keyed by the merchant's `out_trade_no` (idempotent
//! create, pay, refund, close), signed QR payloads, friend-pay (代付) links,
//! wallets with a ledger, and an outbox of signed "paid" notifications.
//!
//! Exactly-once charging rests on one SQLite transaction per payment: the
//! trade moves NOTPAY → SUCCESS, the wallet is debited, a ledger row and a
//! pending notification are written, or none of it happens. The notifier task
//! delivers the outbox afterwards with exponential backoff; the outbox lives
//! in the database, so a crash between paying and notifying only delays the
//! notification (and merchants reconcile by querying the trade anyway).
//!
//! Who may do what ([`sign`]): merchants sign their requests (open, query,
//! close, refund their own trades); a wallet moves or is read only with its
//! credential, which the assistant server holds for its user; balances are
//! set only with the admin credential.

use crate::world::money::display as money;
use super::common::parse_body;
use super::core::{new_id, ApiError, ApiResult, Db};
use crate::world::Clock;
use super::{sign, PayOptions, ServiceCtx};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::{get, post};
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use rand::Rng;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::Notify;

type HmacSha256 = Hmac<Sha256>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS trades (
    out_trade_no TEXT PRIMARY KEY,
    mch_id TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount > 0),
    currency TEXT NOT NULL,
    description TEXT NOT NULL,
    notify_url TEXT NOT NULL,
    status TEXT NOT NULL,            -- NOTPAY | SUCCESS | REFUND | CLOSED
    prepay_id TEXT NOT NULL UNIQUE,
    transaction_id TEXT UNIQUE,
    paid_ms INTEGER,
    refunded INTEGER NOT NULL DEFAULT 0 CHECK (refunded >= 0 AND refunded <= amount),
    payer_wallet TEXT,
    method TEXT,
    created_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS wallets (
    wallet_id TEXT NOT NULL,
    currency TEXT NOT NULL,
    balance INTEGER NOT NULL CHECK (balance >= 0),
    PRIMARY KEY (wallet_id, currency));
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    wallet_id TEXT NOT NULL,
    currency TEXT NOT NULL,
    delta INTEGER NOT NULL,
    out_trade_no TEXT,
    kind TEXT NOT NULL,              -- seed | admin | pay | refund
    ts INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ledger_wallet ON ledger (wallet_id, id);
CREATE TABLE IF NOT EXISTS refunds (
    out_refund_no TEXT PRIMARY KEY,
    out_trade_no TEXT NOT NULL REFERENCES trades (out_trade_no),
    amount INTEGER NOT NULL,
    created_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS notifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    out_trade_no TEXT NOT NULL UNIQUE REFERENCES trades (out_trade_no),
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_attempt_ms INTEGER,
    next_ms INTEGER,                 -- clock ms of the next try; NULL once delivered or given up
    created_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (delivered, next_ms);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS friend_links (
    token TEXT PRIMARY KEY,
    out_trade_no TEXT NOT NULL REFERENCES trades (out_trade_no),
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL);
";

const CURRENCIES: [&str; 2] = ["CNY", "KRW"];
const METHODS: [&str; 2] = ["wechat", "alipay"];
/// Upper bound on any amount or balance (minor units), far from overflow.
const MAX_AMOUNT: i64 = 1_000_000_000_000;
const FRIEND_LINK_TTL_MS: i64 = 30 * 60 * 1000;
/// An unpaid trade closes this long after it was opened (like WeChat Pay's
/// `time_expire`): it can no longer be paid, and its merchant marks the
/// order's payment lapsed. Nothing was charged for it.
pub const TRADE_TTL_MS: i64 = 30 * 60 * 1000;
/// The notifier looks for due retries at least this often.
const POLL: Duration = Duration::from_millis(500);
const MAX_DELAY_MS: u64 = 60_000;
/// Notifications delivered concurrently per round.
const BATCH: usize = 64;

/// Shared by the handlers; the notifier holds only a weak reference, so it
/// stops once the router (and with it the server) is gone.
struct Pay {
    db: Db,
    clock: Clock,
    qr_key: Vec<u8>,
    secret: Vec<u8>,
    /// Nonces of merchant requests seen within the signature window, with
    /// when they were seen: a replayed request is refused.
    nonces: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    opts: PayOptions,
    wake: Arc<Notify>,
}

/// Who a request to the payment service comes from.
enum Caller {
    Merchant(String),
    /// A wallet's holder (which wallet does not matter where this is used).
    Wallet,
}

impl Pay {
    /// The merchant that signed this request (401 otherwise).
    fn merchant(&self, h: &HeaderMap, method: &str, uri: &Uri, body: &[u8]) -> ApiResult<String> {
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let now = self.clock.now_ms();
        let (mch, nonce) = sign::verify_request(&self.secret, h, method, path, body, now)?;
        let mut seen = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, t| now.abs_diff(*t) <= 2 * sign::MAX_SKEW_MS as u64);
        if seen.insert(format!("{mch}/{nonce}"), now).is_some() {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "replayed", "this signed request was already used; sign each request with a fresh nonce"));
        }
        Ok(mch)
    }

    /// The wallet whose credential this request carries (401 otherwise).
    fn wallet(&self, h: &HeaderMap) -> ApiResult<String> {
        sign::wallet_of(&self.secret, h).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "a wallet moves or is read only with its credential (Authorization: Bearer <wallet credential>)",
            )
        })
    }

    /// A wallet's credential when the request carries a bearer token, else a merchant's signature.
    fn caller(&self, h: &HeaderMap, method: &str, uri: &Uri, body: &[u8]) -> ApiResult<Caller> {
        if h.contains_key("authorization") {
            self.wallet(h).map(|_| Caller::Wallet)
        } else {
            self.merchant(h, method, uri, body).map(Caller::Merchant)
        }
    }
}

/// The trade, if the merchant owns it: another merchant's trade reads as unknown.
fn owned(t: Option<Trade>, mch: &str, out_trade_no: &str) -> ApiResult<Trade> {
    t.filter(|t| t.mch_id == mch).ok_or_else(|| unknown_trade(out_trade_no))
}

fn not_your_wallet(credential: &str, asked: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "wrong_wallet",
        format!("this credential is for wallet '{credential}', not '{asked}'; nothing was charged"),
    )
}

type St = State<Arc<Pay>>;

pub fn router(ctx: ServiceCtx, secret: &[u8], opts: PayOptions) -> ApiResult<Router> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| ApiError::internal("the payment service must be started inside a tokio runtime"))?;
    ctx.db.with(|c| Ok(c.execute_batch(SCHEMA)?))?;
    seed_wallets(&ctx.db, &opts.wallets, ctx.clock.now_ms())?;
    follow_move(&ctx.db, &ctx.base_url)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| ApiError::internal(format!("http client: {e}")))?;
    let wake = Arc::new(Notify::new());
    let pay = Arc::new(Pay {
        db: ctx.db.clone(),
        clock: ctx.clock.clone(),
        qr_key: derive_key(secret, b"errand-qr-key"),
        secret: secret.to_vec(),
        nonces: Default::default(),
        opts: opts.clone(),
        wake: wake.clone(),
    });
    let notifier = Arc::new(Notifier {
        db: ctx.db,
        clock: ctx.clock,
        secret: secret.to_vec(),
        http,
        backoff_ms: u64::try_from(opts.notify_backoff.as_millis()).unwrap_or(MAX_DELAY_MS),
        max_attempts: i64::from(opts.notify_attempts.max(1)),
        wake,
        alive: Arc::downgrade(&pay),
    });
    handle.spawn(notifier.run());
    Ok(Router::new()
        .route("/v1/trades", post(create_trade))
        .route("/v1/trades/{out_trade_no}", get(get_trade))
        .route("/v1/trades/{out_trade_no}/pay", post(pay_trade))
        .route("/v1/trades/{out_trade_no}/refund", post(refund_trade))
        .route("/v1/trades/{out_trade_no}/close", post(close_trade))
        .route("/v1/trades/{out_trade_no}/friend-link", post(friend_link))
        .route("/v1/friend-pay/{token}", get(friend_view).post(friend_pay))
        .route("/v1/scan", post(scan))
        .route("/v1/wallets/{wallet_id}", get(get_wallet))
        .route("/v1/notifications", get(list_notifications))
        .route("/_admin/wallets", post(admin_wallet))
        .with_state(pay))
}

// ---------------------------------------------------------------- helpers

fn derive_key(secret: &[u8], label: &[u8]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(label);
    mac.finalize().into_bytes().to_vec()
}

fn qr_sign(key: &[u8], payload: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(payload.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// `base` plus `&sig=<hmac>` over everything before it.
fn signed_payload(key: &[u8], base: String) -> String {
    let sig = qr_sign(key, &base);
    format!("{base}&sig={sig}")
}

/// The unsigned part of a payload whose signature checks out.
fn verify_payload<'a>(key: &[u8], payload: &'a str) -> Option<&'a str> {
    let (base, sig) = payload.rsplit_once("&sig=")?;
    let sig = hex::decode(sig).ok()?;
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(base.as_bytes());
    mac.verify_slice(&sig).ok()?;
    Some(base)
}

fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn check_id(what: &str, v: &str) -> ApiResult<()> {
    if v.trim().is_empty() {
        return Err(ApiError::bad_request(format!("{what} must not be empty")));
    }
    if v.len() > 128 || !v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) {
        return Err(ApiError::bad_request(format!(
            "{what} '{v}' is invalid: use 1-128 characters from A-Z a-z 0-9 - _ . :"
        )));
    }
    Ok(())
}

fn check_amount(what: &str, v: i64) -> ApiResult<()> {
    if v <= 0 || v > MAX_AMOUNT {
        return Err(ApiError::bad_request(format!(
            "{what} must be a positive integer in minor units (fen for CNY, won for KRW) up to {MAX_AMOUNT}; got {v}"
        )));
    }
    Ok(())
}

fn check_currency(v: &str) -> ApiResult<()> {
    if !CURRENCIES.contains(&v) {
        return Err(ApiError::bad_request(format!(
            "unknown currency '{v}'; use one of: {}",
            CURRENCIES.join(", ")
        )));
    }
    Ok(())
}

/// Closes every unpaid trade older than [`TRADE_TTL_MS`] (run before a
/// trade is read or paid, so expiry needs no timer and follows the clock).
fn expire(c: &Connection, now: i64) -> ApiResult<()> {
    c.execute("UPDATE trades SET status = 'CLOSED' WHERE status = 'NOTPAY' AND created_ms <= ?1", [now - TRADE_TTL_MS])?;
    Ok(())
}

fn unknown_trade(out_trade_no: &str) -> ApiError {
    ApiError::not_found(format!(
        "no trade '{out_trade_no}'; create it first with POST /v1/trades"
    ))
}

// ---------------------------------------------------------------- trades

#[derive(Debug, Clone, Serialize)]
struct Trade {
    out_trade_no: String,
    mch_id: String,
    amount: i64,
    currency: String,
    description: String,
    status: String,
    prepay_id: String,
    transaction_id: Option<String>,
    paid_ms: Option<i64>,
    refunded: i64,
    payer_wallet: Option<String>,
    method: Option<String>,
    created_ms: i64,
    qr_payload: String,
}

fn load_trade(c: &Connection, key: &[u8], out_trade_no: &str) -> ApiResult<Option<Trade>> {
    load_trade_where(c, key, "out_trade_no", out_trade_no)
}

fn load_trade_where(c: &Connection, key: &[u8], column: &str, value: &str) -> ApiResult<Option<Trade>> {
    let sql = format!(
        "SELECT out_trade_no, mch_id, amount, currency, description, status, prepay_id, transaction_id,
                paid_ms, refunded, payer_wallet, method, created_ms
         FROM trades WHERE {column} = ?1"
    );
    let t = c
        .query_row(&sql, [value], |r| {
            Ok(Trade {
                out_trade_no: r.get(0)?,
                mch_id: r.get(1)?,
                amount: r.get(2)?,
                currency: r.get(3)?,
                description: r.get(4)?,
                status: r.get(5)?,
                prepay_id: r.get(6)?,
                transaction_id: r.get(7)?,
                paid_ms: r.get(8)?,
                refunded: r.get(9)?,
                payer_wallet: r.get(10)?,
                method: r.get(11)?,
                created_ms: r.get(12)?,
                qr_payload: String::new(),
            })
        })
        .optional()?;
    Ok(t.map(|mut t| {
        t.qr_payload = signed_payload(
            key,
            format!(
                "errandpay://pay?prepay_id={}&amount={}&currency={}",
                t.prepay_id, t.amount, t.currency
            ),
        );
        t
    }))
}

#[derive(Deserialize)]
struct CreateReq {
    mch_id: String,
    out_trade_no: String,
    amount: i64,
    currency: String,
    #[serde(default)]
    description: String,
    notify_url: String,
}

const CREATE_SHAPE: &str = r#"{"mch_id": "food", "out_trade_no": "food-ord_1", "amount": 3800, "currency": "CNY", "description": "...", "notify_url": "http://..."}"#;

async fn create_trade(State(p): St, h: HeaderMap, uri: Uri, body: Bytes) -> ApiResult<Json<Trade>> {
    let mch = p.merchant(&h, "POST", &uri, &body)?;
    let r: CreateReq = parse_body(&body, CREATE_SHAPE)?;
    check_id("mch_id", &r.mch_id)?;
    if r.mch_id != mch {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "wrong_merchant", format!("merchant '{mch}' cannot open a trade for '{}'", r.mch_id)));
    }
    check_id("out_trade_no", &r.out_trade_no)?;
    check_amount("amount", r.amount)?;
    check_currency(&r.currency)?;
    if r.description.chars().count() > 256 {
        return Err(ApiError::bad_request("description must be at most 256 characters"));
    }
    match reqwest::Url::parse(&r.notify_url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => {}
        _ => {
            return Err(ApiError::bad_request(format!(
                "notify_url '{}' must be an absolute http(s) URL where the merchant receives notifications",
                r.notify_url
            )))
        }
    }
    let now = p.clock.now_ms();
    let trade = p.db.tx(|tx| {
        if let Some(t) = load_trade(tx, &p.qr_key, &r.out_trade_no)? {
            if t.mch_id != r.mch_id || t.amount != r.amount || t.currency != r.currency {
                return Err(ApiError::conflict(
                    "trade_mismatch",
                    format!(
                        "out_trade_no '{}' already exists for merchant {} with {} {}; a retry must send the same \
                         mch_id, amount and currency, or use a new out_trade_no",
                        t.out_trade_no, t.mch_id, t.amount, t.currency
                    ),
                ));
            }
            return Ok(t);
        }
        tx.execute(
            "INSERT INTO trades (out_trade_no, mch_id, amount, currency, description, notify_url, status, prepay_id, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'NOTPAY', ?7, ?8)",
            params![r.out_trade_no, r.mch_id, r.amount, r.currency, r.description, r.notify_url, new_id("prepay"), now],
        )?;
        load_trade(tx, &p.qr_key, &r.out_trade_no)?.ok_or_else(|| ApiError::internal("trade vanished"))
    })?;
    Ok(Json(trade))
}

/// A merchant reads its own trades; a wallet reads any trade it may pay.
async fn get_trade(State(p): St, h: HeaderMap, uri: Uri, Path(out_trade_no): Path<String>) -> ApiResult<Json<Trade>> {
    let caller = p.caller(&h, "GET", &uri, b"")?;
    let now = p.clock.now_ms();
    let t = p.db.with(|c| {
        expire(c, now)?;
        load_trade(c, &p.qr_key, &out_trade_no)
    })?;
    match caller {
        Caller::Merchant(m) => owned(t, &m, &out_trade_no).map(Json),
        Caller::Wallet => t.map(Json).ok_or_else(|| unknown_trade(&out_trade_no)),
    }
}

#[derive(Deserialize)]
struct PayReq {
    wallet_id: String,
    method: String,
}

async fn pay_trade(State(p): St, h: HeaderMap, Path(out_trade_no): Path<String>, body: Bytes) -> ApiResult<Json<Trade>> {
    let wallet = p.wallet(&h)?;
    let r: PayReq = parse_body(&body, r#"{"wallet_id": "demo", "method": "wechat" | "alipay"}"#)?;
    check_id("wallet_id", &r.wallet_id)?;
    if r.wallet_id != wallet {
        return Err(not_your_wallet(&wallet, &r.wallet_id));
    }
    if !METHODS.contains(&r.method.as_str()) {
        return Err(ApiError::bad_request(format!(
            "unknown method '{}'; use one of: {}",
            r.method,
            METHODS.join(", ")
        )));
    }
    p.pay(&out_trade_no, &r.wallet_id, &r.method).map(Json)
}

impl Pay {
    /// The one path that moves money for a purchase (used by /pay and by
    /// friend-pay).
    fn pay(&self, out_trade_no: &str, wallet_id: &str, method: &str) -> ApiResult<Trade> {
        let (trade, charged) = self.pay_tx(out_trade_no, wallet_id, method)?;
        if charged {
            if self.opts.crash_after_pay {
                // Test knob: die between the committed payment and the notification.
                std::process::exit(137);
            }
            self.wake.notify_one();
        }
        Ok(trade)
    }

    /// Returns the trade and whether this call charged the wallet.
    fn pay_tx(&self, out_trade_no: &str, wallet_id: &str, method: &str) -> ApiResult<(Trade, bool)> {
        let now = self.clock.now_ms();
        self.db.tx(|tx| {
            expire(tx, now)?;
            let t = load_trade(tx, &self.qr_key, out_trade_no)?.ok_or_else(|| unknown_trade(out_trade_no))?;
            match t.status.as_str() {
                "SUCCESS" | "REFUND" => {
                    if t.payer_wallet.as_deref() == Some(wallet_id) {
                        return Ok((t, false));
                    }
                    return Err(ApiError::conflict(
                        "already_paid",
                        format!(
                            "trade {out_trade_no} was already paid by another wallet; nothing was charged to {wallet_id}"
                        ),
                    ));
                }
                "CLOSED" => {
                    return Err(ApiError::conflict(
                        "trade_closed",
                        format!(
                            "trade {out_trade_no} is closed (an unpaid trade closes {} minutes after it is opened) and can no \
                             longer be paid; nothing was charged; place a new order",
                            TRADE_TTL_MS / 60_000
                        ),
                    ))
                }
                _ => {}
            }
            let balance: Option<i64> = tx
                .query_row(
                    "SELECT balance FROM wallets WHERE wallet_id = ?1 AND currency = ?2",
                    params![wallet_id, t.currency],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(balance) = balance else {
                return Err(ApiError::not_found(format!(
                    "wallet '{wallet_id}' has no {} balance; pay with another wallet or top it up (POST /_admin/wallets)",
                    t.currency
                )));
            };
            if balance < t.amount {
                return Err(ApiError::new(
                    StatusCode::PAYMENT_REQUIRED,
                    "insufficient_balance",
                    format!(
                        "wallet '{wallet_id}' has {} but trade {out_trade_no} needs {}; nothing was charged — \
                         top up, use another wallet or send a friend-pay link",
                        money(balance, &t.currency),
                        money(t.amount, &t.currency)
                    ),
                ));
            }
            let debited = tx.execute(
                "UPDATE wallets SET balance = balance - ?3 WHERE wallet_id = ?1 AND currency = ?2 AND balance >= ?3",
                params![wallet_id, t.currency, t.amount],
            )?;
            let txn = new_id("txn");
            let moved = tx.execute(
                "UPDATE trades SET status = 'SUCCESS', transaction_id = ?2, paid_ms = ?3, payer_wallet = ?4, method = ?5
                 WHERE out_trade_no = ?1 AND status = 'NOTPAY'",
                params![out_trade_no, txn, now, wallet_id, method],
            )?;
            if debited != 1 || moved != 1 {
                // Unreachable while this transaction holds the database; refuse rather than guess.
                return Err(ApiError::internal("payment raced another writer; nothing was charged, retry"));
            }
            tx.execute(
                "INSERT INTO ledger (wallet_id, currency, delta, out_trade_no, kind, ts) VALUES (?1, ?2, ?3, ?4, 'pay', ?5)",
                params![wallet_id, t.currency, -t.amount, out_trade_no, now],
            )?;
            let body = json!({
                "event": "TRANSACTION.SUCCESS",
                "out_trade_no": out_trade_no,
                "transaction_id": txn,
                "mch_id": t.mch_id,
                "amount": t.amount,
                "currency": t.currency,
                "status": "SUCCESS",
                "paid_ms": now,
            })
            .to_string();
            tx.execute(
                "INSERT INTO notifications (out_trade_no, body, next_ms, created_ms) VALUES (?1, ?2, ?3, ?4)",
                params![out_trade_no, body, now, now],
            )?;
            let t = load_trade(tx, &self.qr_key, out_trade_no)?.ok_or_else(|| ApiError::internal("trade vanished"))?;
            Ok((t, true))
        })
    }
}

#[derive(Deserialize)]
struct RefundReq {
    out_refund_no: String,
    amount: i64,
}

async fn refund_trade(State(p): St, h: HeaderMap, uri: Uri, Path(out_trade_no): Path<String>, body: Bytes) -> ApiResult<Json<Value>> {
    let mch = p.merchant(&h, "POST", &uri, &body)?;
    let r: RefundReq = parse_body(&body, r#"{"out_refund_no": "food-ord_1-r1", "amount": 1000}"#)?;
    check_id("out_refund_no", &r.out_refund_no)?;
    check_amount("amount", r.amount)?;
    let now = p.clock.now_ms();
    let answer = |amount: i64| json!({"out_refund_no": r.out_refund_no, "out_trade_no": out_trade_no, "amount": amount, "status": "SUCCESS"});
    p.db.tx(|tx| {
        let t = owned(load_trade(tx, &p.qr_key, &out_trade_no)?, &mch, &out_trade_no)?;
        let earlier: Option<(String, i64)> = tx
            .query_row(
                "SELECT out_trade_no, amount FROM refunds WHERE out_refund_no = ?1",
                [&r.out_refund_no],
                |x| Ok((x.get(0)?, x.get(1)?)),
            )
            .optional()?;
        if let Some((trade_no, amount)) = earlier {
            if trade_no == out_trade_no && amount == r.amount {
                return Ok(Json(answer(amount)));
            }
            return Err(ApiError::conflict(
                "refund_mismatch",
                format!(
                    "out_refund_no '{}' was already used to refund {amount} on trade {trade_no}; \
                     use a new out_refund_no for a different refund",
                    r.out_refund_no
                ),
            ));
        }
        if t.status != "SUCCESS" && t.status != "REFUND" {
            return Err(ApiError::conflict(
                "not_paid",
                format!("trade {out_trade_no} is {} and has no payment to refund", t.status),
            ));
        }
        if t.refunded + r.amount > t.amount {
            return Err(ApiError::conflict(
                "refund_exceeds_payment",
                format!(
                    "refunding {} would exceed the payment: {} paid, {} already refunded, at most {} left",
                    money(r.amount, &t.currency),
                    money(t.amount, &t.currency),
                    money(t.refunded, &t.currency),
                    money(t.amount - t.refunded, &t.currency)
                ),
            ));
        }
        let payer = t.payer_wallet.clone().ok_or_else(|| ApiError::internal("paid trade without payer"))?;
        tx.execute(
            "INSERT INTO wallets (wallet_id, currency, balance) VALUES (?1, ?2, ?3)
             ON CONFLICT (wallet_id, currency) DO UPDATE SET balance = balance + excluded.balance",
            params![payer, t.currency, r.amount],
        )?;
        tx.execute(
            "INSERT INTO ledger (wallet_id, currency, delta, out_trade_no, kind, ts) VALUES (?1, ?2, ?3, ?4, 'refund', ?5)",
            params![payer, t.currency, r.amount, out_trade_no, now],
        )?;
        tx.execute(
            "UPDATE trades SET status = 'REFUND', refunded = refunded + ?2 WHERE out_trade_no = ?1",
            params![out_trade_no, r.amount],
        )?;
        tx.execute(
            "INSERT INTO refunds (out_refund_no, out_trade_no, amount, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![r.out_refund_no, out_trade_no, r.amount, now],
        )?;
        Ok(Json(answer(r.amount)))
    })
}

async fn close_trade(State(p): St, h: HeaderMap, uri: Uri, Path(out_trade_no): Path<String>, body: Bytes) -> ApiResult<Json<Trade>> {
    let mch = p.merchant(&h, "POST", &uri, &body)?;
    let t = p.db.tx(|tx| {
        let t = owned(load_trade(tx, &p.qr_key, &out_trade_no)?, &mch, &out_trade_no)?;
        match t.status.as_str() {
            "CLOSED" => Ok(t),
            "NOTPAY" => {
                tx.execute(
                    "UPDATE trades SET status = 'CLOSED' WHERE out_trade_no = ?1",
                    [&out_trade_no],
                )?;
                load_trade(tx, &p.qr_key, &out_trade_no)?.ok_or_else(|| ApiError::internal("trade vanished"))
            }
            _ => Err(ApiError::conflict(
                "already_paid",
                format!("trade {out_trade_no} is already paid and cannot be closed; refund it instead"),
            )),
        }
    })?;
    Ok(Json(t))
}

// ---------------------------------------------------------------- friend pay

fn friend_payload(key: &[u8], token: &str, t: &Trade) -> String {
    signed_payload(
        key,
        format!(
            "errandpay://friend-pay?token={token}&amount={}&currency={}",
            t.amount, t.currency
        ),
    )
}

/// The payer (a wallet) or the merchant asks for a link a friend can pay.
async fn friend_link(State(p): St, h: HeaderMap, uri: Uri, Path(out_trade_no): Path<String>, body: Bytes) -> ApiResult<Json<Value>> {
    let caller = p.caller(&h, "POST", &uri, &body)?;
    let now = p.clock.now_ms();
    p.db.tx(|tx| {
        expire(tx, now)?;
        let t = load_trade(tx, &p.qr_key, &out_trade_no)?;
        let t = match &caller {
            Caller::Merchant(m) => owned(t, m, &out_trade_no)?,
            Caller::Wallet => t.ok_or_else(|| unknown_trade(&out_trade_no))?,
        };
        match t.status.as_str() {
            "NOTPAY" => {}
            "CLOSED" => {
                return Err(ApiError::conflict(
                    "trade_closed",
                    format!("trade {out_trade_no} is closed; a friend cannot pay it"),
                ))
            }
            _ => {
                return Err(ApiError::conflict(
                    "already_paid",
                    format!("trade {out_trade_no} is already paid; no friend-pay link needed"),
                ))
            }
        }
        // Reuse a live link so retries hand out the same one.
        let live: Option<(String, i64)> = tx
            .query_row(
                "SELECT token, expires_ms FROM friend_links WHERE out_trade_no = ?1 AND expires_ms > ?2
                 ORDER BY expires_ms DESC LIMIT 1",
                params![out_trade_no, now],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (token, expires_ms) = match live {
            Some(x) => x,
            None => {
                let token = format!("fp_{}", hex::encode(rand::rng().random::<[u8; 16]>()));
                let expires = now + FRIEND_LINK_TTL_MS;
                tx.execute(
                    "INSERT INTO friend_links (token, out_trade_no, created_ms, expires_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![token, out_trade_no, now, expires],
                )?;
                (token, expires)
            }
        };
        Ok(Json(json!({
            "token": token,
            "link": format!("errandpay://friend-pay/{token}"),
            "qr_payload": friend_payload(&p.qr_key, &token, &t),
            "expires_ms": expires_ms,
            "out_trade_no": out_trade_no,
        })))
    })
}

/// The trade behind a live friend-pay token.
fn friend_trade(p: &Pay, token: &str) -> ApiResult<(Trade, i64)> {
    let now = p.clock.now_ms();
    p.db.with(|c| {
        expire(c, now)?;
        let link: Option<(String, i64)> = c
            .query_row(
                "SELECT out_trade_no, expires_ms FROM friend_links WHERE token = ?1",
                [token],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((out_trade_no, expires_ms)) = link else {
            return Err(ApiError::not_found(format!(
                "no friend-pay link '{token}'; check the link or ask for a new one"
            )));
        };
        if expires_ms <= now {
            return Err(ApiError::new(
                StatusCode::GONE,
                "link_expired",
                format!("friend-pay link '{token}' has expired; ask the payer for a new link"),
            ));
        }
        let t = load_trade(c, &p.qr_key, &out_trade_no)?.ok_or_else(|| unknown_trade(&out_trade_no))?;
        Ok((t, expires_ms))
    })
}

async fn friend_view(State(p): St, Path(token): Path<String>) -> ApiResult<Json<Value>> {
    let (t, expires_ms) = friend_trade(&p, &token)?;
    Ok(Json(json!({
        "token": token,
        "out_trade_no": t.out_trade_no,
        "mch_id": t.mch_id,
        "description": t.description,
        "amount": t.amount,
        "currency": t.currency,
        "status": t.status,
        "expires_ms": expires_ms,
    })))
}

#[derive(Deserialize)]
struct FriendPayReq {
    wallet_id: String,
}

async fn friend_pay(State(p): St, h: HeaderMap, Path(token): Path<String>, body: Bytes) -> ApiResult<Json<Trade>> {
    let wallet = p.wallet(&h)?;
    let r: FriendPayReq = parse_body(&body, r#"{"wallet_id": "friend"}"#)?;
    check_id("wallet_id", &r.wallet_id)?;
    if r.wallet_id != wallet {
        return Err(not_your_wallet(&wallet, &r.wallet_id));
    }
    let (t, _) = friend_trade(&p, &token)?;
    p.pay(&t.out_trade_no, &r.wallet_id, "friend_pay").map(Json)
}

#[derive(Deserialize)]
struct ScanReq {
    qr_payload: String,
}

/// `POST /v1/scan`: resolves a scanned QR payload, refusing altered ones.
async fn scan(State(p): St, h: HeaderMap, body: Bytes) -> ApiResult<Json<Value>> {
    p.wallet(&h)?;
    let r: ScanReq = parse_body(&body, r#"{"qr_payload": "errandpay://pay?..."}"#)?;
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_qr",
            "the QR payload is not a valid errandpay code (altered or truncated); scan it again",
        )
    };
    let base = verify_payload(&p.qr_key, &r.qr_payload).ok_or_else(bad)?;
    let (kind, query) = base.split_once('?').ok_or_else(bad)?;
    match kind {
        "errandpay://pay" => {
            let prepay = param(query, "prepay_id").ok_or_else(bad)?;
            let t =
                p.db.with(|c| load_trade_where(c, &p.qr_key, "prepay_id", prepay))?
                    .ok_or_else(|| ApiError::not_found(format!("no trade for prepay_id {prepay}")))?;
            Ok(Json(json!({"kind": "pay", "trade": t})))
        }
        "errandpay://friend-pay" => {
            let token = param(query, "token").ok_or_else(bad)?;
            let (t, expires_ms) = friend_trade(&p, token)?;
            Ok(Json(
                json!({"kind": "friend_pay", "token": token, "expires_ms": expires_ms, "trade": t}),
            ))
        }
        _ => Err(bad()),
    }
}

// ---------------------------------------------------------------- wallets

/// When the sandbox comes back on another address (a restart on a new
/// port), merchants that lived next to the payment service moved with it:
/// notify URLs under the old origin are pointed at the new one, so the outbox
/// left by the previous process still reaches them. Merchants elsewhere are
/// left alone.
fn follow_move(db: &Db, base_url: &str) -> ApiResult<()> {
    let Ok(url) = reqwest::Url::parse(base_url) else {
        return Ok(());
    };
    let origin = url.origin().ascii_serialization();
    db.tx(|tx| {
        let old: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = 'origin'", [], |r| r.get(0))
            .optional()?;
        if let Some(old) = old.filter(|o| *o != origin) {
            tx.execute(
                "UPDATE trades SET notify_url = ?2 || substr(notify_url, length(?1) + 1)
                 WHERE substr(notify_url, 1, length(?1) + 1) = ?1 || '/'",
                params![old, origin],
            )?;
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('origin', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [&origin],
        )?;
        Ok(())
    })
}

fn seed_wallets(db: &Db, wallets: &[(String, String, i64)], now: i64) -> ApiResult<()> {
    for (id, currency, balance) in wallets {
        check_id("wallet id", id)?;
        check_currency(currency)?;
        if *balance < 0 || *balance > MAX_AMOUNT {
            return Err(ApiError::bad_request(format!(
                "seed balance of wallet {id} is out of range"
            )));
        }
    }
    // Each wallet and currency that does not exist yet is created; one that
    // exists keeps its balance. (Seeding only an empty table left a user
    // added to the server's config after the first start without a wallet.)
    db.tx(|tx| {
        for (id, currency, balance) in wallets {
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM wallets WHERE wallet_id = ?1 AND currency = ?2)",
                params![id, currency],
                |r| r.get(0),
            )?;
            if !exists {
                set_balance(tx, id, currency, *balance, "seed", now)?;
            }
        }
        Ok(())
    })
}

/// Sets a balance and records the difference in the ledger, so the ledger
/// always sums to the balance.
fn set_balance(c: &Connection, wallet_id: &str, currency: &str, balance: i64, kind: &str, now: i64) -> ApiResult<()> {
    let old: i64 = c
        .query_row(
            "SELECT balance FROM wallets WHERE wallet_id = ?1 AND currency = ?2",
            params![wallet_id, currency],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    c.execute(
        "INSERT INTO wallets (wallet_id, currency, balance) VALUES (?1, ?2, ?3)
         ON CONFLICT (wallet_id, currency) DO UPDATE SET balance = excluded.balance",
        params![wallet_id, currency, balance],
    )?;
    c.execute(
        "INSERT INTO ledger (wallet_id, currency, delta, out_trade_no, kind, ts) VALUES (?1, ?2, ?3, NULL, ?4, ?5)",
        params![wallet_id, currency, balance - old, kind, now],
    )?;
    Ok(())
}

fn wallet_view(c: &Connection, wallet_id: &str) -> ApiResult<Option<Value>> {
    let mut st = c.prepare("SELECT currency, balance FROM wallets WHERE wallet_id = ?1 ORDER BY currency")?;
    let balances: Vec<(String, i64)> = st
        .query_map([wallet_id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    if balances.is_empty() {
        return Ok(None);
    }
    let mut st = c.prepare(
        "SELECT id, currency, delta, out_trade_no, kind, ts FROM ledger WHERE wallet_id = ?1 ORDER BY id DESC LIMIT 20",
    )?;
    let ledger: Vec<Value> = st
        .query_map([wallet_id], |r| {
            Ok(json!({
                "id": r.get::<_, i64>(0)?,
                "currency": r.get::<_, String>(1)?,
                "delta": r.get::<_, i64>(2)?,
                "out_trade_no": r.get::<_, Option<String>>(3)?,
                "kind": r.get::<_, String>(4)?,
                "ts": r.get::<_, i64>(5)?,
            }))
        })?
        .collect::<Result<_, _>>()?;
    let balances: serde_json::Map<String, Value> = balances.into_iter().map(|(c, b)| (c, json!(b))).collect();
    Ok(Some(
        json!({"wallet_id": wallet_id, "balances": balances, "ledger": ledger}),
    ))
}

async fn get_wallet(State(p): St, h: HeaderMap, Path(wallet_id): Path<String>) -> ApiResult<Json<Value>> {
    let wallet = p.wallet(&h)?;
    if wallet != wallet_id {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "wrong_wallet", format!("this credential is for wallet '{wallet}', not '{wallet_id}'")));
    }
    p.db.with(|c| wallet_view(c, &wallet_id))?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no wallet '{wallet_id}'; create one with POST /_admin/wallets")))
}

#[derive(Deserialize)]
struct AdminWalletReq {
    wallet_id: String,
    currency: String,
    balance: i64,
}

async fn admin_wallet(State(p): St, body: Bytes) -> ApiResult<Json<Value>> {
    let r: AdminWalletReq = parse_body(&body, r#"{"wallet_id": "demo", "currency": "CNY", "balance": 100000}"#)?;
    check_id("wallet_id", &r.wallet_id)?;
    check_currency(&r.currency)?;
    if r.balance < 0 || r.balance > MAX_AMOUNT {
        return Err(ApiError::bad_request(format!(
            "balance must be an integer from 0 to {MAX_AMOUNT} in minor units; got {}",
            r.balance
        )));
    }
    let now = p.clock.now_ms();
    let v = p.db.tx(|tx| {
        set_balance(tx, &r.wallet_id, &r.currency, r.balance, "admin", now)?;
        wallet_view(tx, &r.wallet_id)
    })?;
    v.map(Json).ok_or_else(|| ApiError::internal("wallet vanished"))
}

// ---------------------------------------------------------------- notifications

#[derive(Deserialize)]
struct NotificationsQuery {
    out_trade_no: Option<String>,
}

/// A merchant's own notifications (or, with the admin credential, everyone's).
async fn list_notifications(State(p): St, h: HeaderMap, uri: Uri, Query(q): Query<NotificationsQuery>) -> ApiResult<Json<Value>> {
    let mch = if sign::is_admin(&p.secret, &h) { None } else { Some(p.merchant(&h, "GET", &uri, b"")?) };
    let items = p.db.with(|c| {
        let mut st = c.prepare(
            "SELECT n.id, n.out_trade_no, n.attempts, n.delivered, n.last_error, n.next_ms, n.last_attempt_ms
             FROM notifications n JOIN trades t ON t.out_trade_no = n.out_trade_no
             WHERE (?1 IS NULL OR n.out_trade_no = ?1) AND (?2 IS NULL OR t.mch_id = ?2) ORDER BY n.id DESC LIMIT 50",
        )?;
        let rows: Vec<Value> = st
            .query_map(params![q.out_trade_no, mch], |r| {
                Ok(json!({
                    "id": r.get::<_, i64>(0)?,
                    "out_trade_no": r.get::<_, String>(1)?,
                    "attempts": r.get::<_, i64>(2)?,
                    "delivered": r.get::<_, bool>(3)?,
                    "last_error": r.get::<_, Option<String>>(4)?,
                    "next_ms": r.get::<_, Option<i64>>(5)?,
                    "last_attempt_ms": r.get::<_, Option<i64>>(6)?,
                }))
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    })?;
    Ok(Json(json!({"items": items})))
}

/// Delivers the outbox: every pending notification whose `next_ms` has come,
/// signed for its merchant, retried with exponential backoff.
struct Notifier {
    db: Db,
    clock: Clock,
    secret: Vec<u8>,
    http: reqwest::Client,
    backoff_ms: u64,
    max_attempts: i64,
    wake: Arc<Notify>,
    alive: Weak<Pay>,
}

struct Due {
    id: i64,
    body: String,
    attempts: i64,
    mch_id: String,
    notify_url: String,
}

impl Notifier {
    async fn run(self: Arc<Self>) {
        // Rows left pending by a previous process are due now: the first round sends them.
        while self.alive.strong_count() > 0 {
            let due = self.due().unwrap_or_default();
            let mut set = tokio::task::JoinSet::new();
            for d in due {
                let me = self.clone();
                set.spawn(async move {
                    let result = me.deliver(&d).await;
                    me.record(&d, result);
                });
            }
            while set.join_next().await.is_some() {}
            let wait = self.next_wait();
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn due(&self) -> ApiResult<Vec<Due>> {
        self.db.with(|c| {
            let mut st = c.prepare(
                "SELECT n.id, n.body, n.attempts, t.mch_id, t.notify_url
                 FROM notifications n JOIN trades t ON t.out_trade_no = n.out_trade_no
                 WHERE n.delivered = 0 AND n.next_ms IS NOT NULL AND n.next_ms <= ?1
                 ORDER BY n.next_ms LIMIT ?2",
            )?;
            let rows = st
                .query_map(params![self.clock.now_ms(), BATCH as i64], |r| {
                    Ok(Due {
                        id: r.get(0)?,
                        body: r.get(1)?,
                        attempts: r.get(2)?,
                        mch_id: r.get(3)?,
                        notify_url: r.get(4)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    /// How long to sleep: until the next retry is due, but at least 10 ms
    /// (no spinning) and at most [`POLL`].
    fn next_wait(&self) -> Duration {
        let next: Option<i64> = self
            .db
            .with(|c| {
                Ok(c.query_row(
                    "SELECT MIN(next_ms) FROM notifications WHERE delivered = 0 AND next_ms IS NOT NULL",
                    [],
                    |r| r.get(0),
                )?)
            })
            .unwrap_or(None);
        let poll = POLL.as_millis() as i64;
        let ms = next.map_or(poll, |n| (n - self.clock.now_ms()).clamp(10, poll));
        Duration::from_millis(ms as u64)
    }

    async fn deliver(&self, d: &Due) -> Result<(), String> {
        let ts = self.clock.now_ms();
        let nonce = hex::encode(rand::rng().random::<[u8; 12]>());
        let sig = sign::sign(
            &sign::merchant_key(&self.secret, &d.mch_id),
            ts,
            &nonce,
            d.body.as_bytes(),
        );
        let resp = self
            .http
            .post(&d.notify_url)
            .header("content-type", "application/json")
            .header(sign::TIMESTAMP, ts.to_string())
            .header(sign::NONCE, &nonce)
            .header(sign::SIGNATURE, sig)
            .body(d.body.clone())
            .send()
            .await
            .map_err(|e| format!("cannot reach {}: {e}", d.notify_url))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let short: String = text.chars().take(200).collect();
        if !status.is_success() {
            return Err(format!("merchant answered {status}: {short}"));
        }
        match serde_json::from_str::<Value>(&text) {
            Ok(v) if v["code"] == "SUCCESS" => Ok(()),
            _ => Err(format!(
                "merchant answered {status} without {{\"code\":\"SUCCESS\"}}: {short}"
            )),
        }
    }

    fn record(&self, d: &Due, result: Result<(), String>) {
        let now = self.clock.now_ms();
        let attempts = d.attempts + 1;
        let _ = self.db.with(|c| {
            match result {
                Ok(()) => c.execute(
                    "UPDATE notifications SET attempts = ?2, delivered = 1, last_error = NULL, last_attempt_ms = ?3,
                     next_ms = NULL WHERE id = ?1",
                    params![d.id, attempts, now],
                )?,
                Err(e) => {
                    let next = (attempts < self.max_attempts).then(|| now + retry_delay_ms(self.backoff_ms, attempts));
                    c.execute(
                        "UPDATE notifications SET attempts = ?2, last_error = ?3, last_attempt_ms = ?4, next_ms = ?5
                         WHERE id = ?1",
                        params![d.id, attempts, e, now, next],
                    )?
                }
            };
            Ok(())
        });
    }
}

/// `backoff * 2^(attempts-1)`, capped at a minute.
fn retry_delay_ms(backoff_ms: u64, attempts: i64) -> i64 {
    let exp = (attempts.max(1) - 1).min(63) as u32;
    let d = backoff_ms.saturating_mul(1u64 << exp).min(MAX_DELAY_MS);
    d as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::testkit::send;
    use crate::sandbox::{start, Sandbox, Service};
    use std::time::Instant;

    const SECRET: &[u8] = b"pay-test-secret";

    /// Sends a request to the payment service as the party it belongs to,
    /// with that party's real credential, so the tests below read as the
    /// payment story (who may do what is tested in `only_the_owner_moves_money`):
    /// a wallet reads itself and pays with its own credential (`demo` reads
    /// trades, asks for friend-pay links and scans), merchants sign what they
    /// open (`mch_id`), refund and close (the tests' trades are food's), and
    /// notifications and balances go through the admin credential.
    async fn as_owner(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
        let u = reqwest::Url::parse(&url).unwrap();
        let full = match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_owned(),
        };
        let path = full.strip_prefix("/pay").unwrap_or(&full).to_owned();
        let seg: Vec<&str> = u.path().trim_start_matches("/pay/").split('/').collect();
        let wallet = |w: &str| Some(sign::wallet_credential(SECRET, w));
        let from_body = |k: &str| body.as_ref().and_then(|b| b[k].as_str()).unwrap_or("demo").to_owned();
        let (bearer, merchant) = match (method.as_str(), seg.as_slice()) {
            (_, ["_admin", ..]) | ("GET", ["v1", "notifications"]) => (Some(sign::admin_credential(SECRET)), None),
            ("GET", ["v1", "wallets", w]) => (wallet(w), None),
            ("POST", ["v1", "trades", _, "pay"]) | ("POST", ["v1", "friend-pay", _]) => (wallet(&from_body("wallet_id")), None),
            ("GET", ["v1", "friend-pay", _]) => (None, None),
            ("POST", ["v1", "trades"]) => (None, Some(from_body("mch_id"))),
            ("POST", ["v1", "trades", _, "refund" | "close"]) => (None, Some("food".to_owned())),
            _ => (wallet("demo"), None),
        };
        let bytes = body.map(|b| serde_json::to_vec(&b).unwrap()).unwrap_or_default();
        let mut req = reqwest::Client::new().request(method.clone(), &url);
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        if let Some(m) = merchant {
            let now = crate::sandbox::testkit::clock().now_ms();
            for (k, v) in sign::request_headers(&sign::merchant_key(SECRET, &m), &m, method.as_str(), &path, &bytes, now) {
                req = req.header(k, v);
            }
        }
        if !bytes.is_empty() {
            req = req.header("content-type", "application/json").body(bytes);
        }
        send(req).await
    }

    async fn get(url: String) -> (u16, Value) {
        as_owner(reqwest::Method::GET, url, None).await
    }

    async fn post(url: String, body: Value) -> (u16, Value) {
        as_owner(reqwest::Method::POST, url, Some(body)).await
    }

    async fn sandbox(pay: PayOptions) -> (tempfile::TempDir, Sandbox) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::sandbox::testkit::config(dir.path());
        cfg.secret = Some(SECRET.to_vec());
        cfg.services = vec![Service::Pay, Service::Food];
        cfg.pay = pay;
        let sb = start(cfg).await.unwrap();
        (dir, sb)
    }

    async fn wait_for(what: &str, secs: u64, mut f: impl AsyncFnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(secs);
        while !f().await {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn balance(sb: &Sandbox, wallet: &str, currency: &str) -> i64 {
        let (s, w) = get(format!("{}/v1/wallets/{wallet}", sb.url(Service::Pay))).await;
        assert_eq!(s, 200, "{w}");
        w["balances"][currency].as_i64().unwrap()
    }

    /// Every wallet balance equals the sum of its ledger rows.
    fn assert_ledger_balances(dir: &std::path::Path) {
        let c = Sandbox::open_db(dir, Service::Pay).unwrap();
        let bad: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM wallets w WHERE balance !=
                 (SELECT COALESCE(SUM(delta), 0) FROM ledger l WHERE l.wallet_id = w.wallet_id AND l.currency = w.currency)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(bad, 0, "ledger does not add up to the balances");
    }

    fn pay_rows(dir: &std::path::Path, out_trade_no: &str) -> i64 {
        let c = Sandbox::open_db(dir, Service::Pay).unwrap();
        c.query_row(
            "SELECT COUNT(*) FROM ledger WHERE out_trade_no = ?1 AND kind = 'pay'",
            [out_trade_no],
            |r| r.get(0),
        )
        .unwrap()
    }

    fn create_body(out_trade_no: &str, amount: i64, notify_url: &str) -> Value {
        json!({"mch_id": "food", "out_trade_no": out_trade_no, "amount": amount, "currency": "CNY",
               "description": "Beef noodles", "notify_url": notify_url})
    }

    /// The idempotency layer answers a repeat before the handler checks the
    /// caller: a key must be the caller's own, or a stored answer (a wallet's
    /// payment) would go to whoever sends the same key and body.
    #[tokio::test]
    async fn an_idempotency_key_replays_only_to_the_caller_that_used_it() {
        let (_dir, sb) = sandbox(PayOptions::default()).await;
        let pay = sb.url(Service::Pay);
        let m = sb.merchant(Service::Food).unwrap().clone();
        let no = m.open_payment("o-idem", 3800, "CNY", "Beef noodles").await.unwrap().out_trade_no;
        let body = json!({"wallet_id": "demo", "method": "alipay"});
        let send_as = |cred: Option<String>| {
            let mut r = reqwest::Client::new().post(format!("{pay}/v1/trades/{no}/pay")).header("Idempotency-Key", "pay-k1").json(&body);
            if let Some(c) = cred {
                r = r.bearer_auth(c);
            }
            r.send()
        };
        let r = send_as(Some(sign::wallet_credential(SECRET, "demo"))).await.unwrap();
        assert_eq!(r.status(), 200);
        let r = send_as(None).await.unwrap();
        assert_eq!((r.status().as_u16(), r.headers().get("idempotent-replay").is_some()), (401, false));
        let r = send_as(Some(sign::wallet_credential(SECRET, "friend"))).await.unwrap();
        assert_eq!((r.status().as_u16(), r.headers().get("idempotent-replay").is_some()), (403, false));
        let r = send_as(Some(sign::wallet_credential(SECRET, "demo"))).await.unwrap();
        assert_eq!((r.status().as_u16(), r.headers().get("idempotent-replay").is_some()), (200, true));
    }

    #[tokio::test]
    async fn create_pay_notify_once_and_idempotent_create() {
        let (dir, sb) = sandbox(PayOptions::default()).await;
        let pay = sb.url(Service::Pay);
        let m = sb.merchant(Service::Food).unwrap().clone();
        let p = m.open_payment("o1", 3800, "CNY", "Beef noodles").await.unwrap();
        assert_eq!(p.status, "awaiting_payment");
        let no = p.out_trade_no.clone();

        let (s, t) = get(format!("{pay}/v1/trades/{no}")).await;
        assert_eq!(s, 200, "{t}");
        assert_eq!(t["status"], "NOTPAY");
        assert!(t["prepay_id"].as_str().unwrap().starts_with("prepay_"));
        assert!(t["qr_payload"]
            .as_str()
            .unwrap()
            .starts_with("errandpay://pay?prepay_id="));
        assert!(t["transaction_id"].is_null() && t["paid_ms"].is_null() && t["payer_wallet"].is_null());

        let before = balance(&sb, "demo", "CNY").await;
        let (s, paid) = post(
            format!("{pay}/v1/trades/{no}/pay"),
            json!({"wallet_id": "demo", "method": "alipay"}),
        )
        .await;
        assert_eq!(s, 200, "{paid}");
        assert_eq!(paid["status"], "SUCCESS");
        assert_eq!(paid["payer_wallet"], "demo");
        assert_eq!(paid["method"], "alipay");
        assert!(paid["transaction_id"].as_str().unwrap().starts_with("txn_"));
        assert_eq!(balance(&sb, "demo", "CNY").await, before - 3800);

        // The notification (not a query) tells the merchant.
        wait_for("the notification", 10, async || {
            m.payment_local("o1").unwrap().unwrap().status == "paid"
        })
        .await;
        let (_, n) = get(format!("{pay}/v1/notifications?out_trade_no={no}")).await;
        assert_eq!(n["items"].as_array().unwrap().len(), 1, "{n}");
        assert_eq!(n["items"][0]["delivered"], true);
        assert_eq!(n["items"][0]["attempts"], 1);
        let mp = m.payment("o1").await.unwrap();
        assert_eq!(mp.status, "paid");
        assert_eq!(mp.transaction_id.as_deref(), paid["transaction_id"].as_str());

        // Paying again changes nothing; another wallet is refused.
        let (s, again) = post(
            format!("{pay}/v1/trades/{no}/pay"),
            json!({"wallet_id": "demo", "method": "wechat"}),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(again["transaction_id"], paid["transaction_id"]);
        assert_eq!(again["method"], "alipay");
        let (s, e) = post(
            format!("{pay}/v1/trades/{no}/pay"),
            json!({"wallet_id": "friend", "method": "wechat"}),
        )
        .await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("already_paid")));
        assert_eq!(balance(&sb, "demo", "CNY").await, before - 3800);
        assert_eq!(pay_rows(dir.path(), &no), 1);

        // Create retried: the same trade; a different amount or merchant: 409.
        let notify = format!("{}/pay/notify", sb.url(Service::Food));
        let (s, same) = post(format!("{pay}/v1/trades"), create_body(&no, 3800, &notify)).await;
        assert_eq!(s, 200);
        assert_eq!(same["prepay_id"], t["prepay_id"]);
        assert_eq!(same["status"], "SUCCESS");
        let (s, e) = post(format!("{pay}/v1/trades"), create_body(&no, 3900, &notify)).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("trade_mismatch")));
        let mut other = create_body(&no, 3800, &notify);
        other["mch_id"] = json!("ride");
        let (s, _) = post(format!("{pay}/v1/trades"), other).await;
        assert_eq!(s, 409);
        assert_eq!(
            m.open_payment("o1", 3800, "CNY", "Beef noodles").await.unwrap().status,
            "paid"
        );
        assert_ledger_balances(dir.path());
        sb.stop().await;
    }

    #[tokio::test]
    async fn concurrent_pays_charge_exactly_once() {
        let (dir, sb) = sandbox(PayOptions::default()).await;
        let pay = sb.url(Service::Pay);
        let (s, _) = post(
            format!("{pay}/v1/trades"),
            create_body("race-1", 5000, "http://127.0.0.1:1/n"),
        )
        .await;
        assert_eq!(s, 200);
        let before = (balance(&sb, "demo", "CNY").await, balance(&sb, "friend", "CNY").await);
        let mut tasks = Vec::new();
        for i in 0..24 {
            let wallet = if i % 2 == 0 { "demo" } else { "friend" };
            let url = format!("{pay}/v1/trades/race-1/pay");
            tasks.push(tokio::spawn(async move {
                post(url, json!({"wallet_id": wallet, "method": "wechat"})).await.0
            }));
        }
        let mut codes = Vec::new();
        for t in tasks {
            codes.push(t.await.unwrap());
        }
        assert!(codes.iter().all(|c| *c == 200 || *c == 409), "{codes:?}");
        assert_eq!(codes.iter().filter(|c| **c == 200).count(), 12, "{codes:?}");
        let after = (balance(&sb, "demo", "CNY").await, balance(&sb, "friend", "CNY").await);
        assert_eq!((before.0 - after.0) + (before.1 - after.1), 5000);
        assert_eq!(pay_rows(dir.path(), "race-1"), 1);
        let (_, n) = get(format!("{pay}/v1/notifications?out_trade_no=race-1")).await;
        assert_eq!(n["items"].as_array().unwrap().len(), 1);
        assert_ledger_balances(dir.path());
        sb.stop().await;
    }

    #[tokio::test]
    async fn insufficient_balance_changes_nothing_and_input_is_validated() {
        let (dir, sb) = sandbox(PayOptions::default()).await;
        let pay = sb.url(Service::Pay);
        let (s, _) = post(
            format!("{pay}/_admin/wallets"),
            json!({"wallet_id": "poor", "currency": "CNY", "balance": 100}),
        )
        .await;
        assert_eq!(s, 200);
        let (s, _) = post(
            format!("{pay}/v1/trades"),
            create_body("t-poor", 3800, "http://127.0.0.1:1/n"),
        )
        .await;
        assert_eq!(s, 200);
        let (s, e) = post(
            format!("{pay}/v1/trades/t-poor/pay"),
            json!({"wallet_id": "poor", "method": "wechat"}),
        )
        .await;
        assert_eq!(s, 402, "{e}");
        assert_eq!(e["error"]["code"], "insufficient_balance");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains("¥1.00") && msg.contains("¥38.00"), "{msg}");
        assert_eq!(balance(&sb, "poor", "CNY").await, 100);
        let (_, w) = get(format!("{pay}/v1/wallets/poor")).await;
        assert_eq!(w["ledger"].as_array().unwrap().len(), 1, "only the admin row: {w}");
        let (_, t) = get(format!("{pay}/v1/trades/t-poor")).await;
        assert_eq!(t["status"], "NOTPAY");
        let (_, n) = get(format!("{pay}/v1/notifications?out_trade_no=t-poor")).await;
        assert!(n["items"].as_array().unwrap().is_empty());
        // No balance in that currency, no wallet at all.
        let (s, _) = post(
            format!("{pay}/v1/trades/t-poor/pay"),
            json!({"wallet_id": "nobody", "method": "wechat"}),
        )
        .await;
        assert_eq!(s, 404);
        let mut krw = create_body("t-krw", 5000, "http://127.0.0.1:1/n");
        krw["currency"] = json!("KRW");
        assert_eq!(post(format!("{pay}/v1/trades"), krw).await.0, 200);
        let (s, _) = post(
            format!("{pay}/v1/trades/t-krw/pay"),
            json!({"wallet_id": "poor", "method": "alipay"}),
        )
        .await;
        assert_eq!(s, 404);
        // Topped up, it goes through.
        post(
            format!("{pay}/_admin/wallets"),
            json!({"wallet_id": "poor", "currency": "CNY", "balance": 5000}),
        )
        .await;
        let (s, _) = post(
            format!("{pay}/v1/trades/t-poor/pay"),
            json!({"wallet_id": "poor", "method": "wechat"}),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(balance(&sb, "poor", "CNY").await, 1200);

        // Validation: clear 400s.
        for (body, needle) in [
            (create_body("v1", 0, "http://x/n"), "positive integer"),
            (create_body("v1", -5, "http://x/n"), "positive integer"),
            (create_body("", 100, "http://x/n"), "out_trade_no"),
            (create_body("v 1", 100, "http://x/n"), "out_trade_no"),
            (create_body("v1", 100, "not a url"), "notify_url"),
            (
                json!({"mch_id": "food", "out_trade_no": "v1", "amount": 1.5, "currency": "CNY", "notify_url": "http://x/n"}),
                "expected",
            ),
            (
                json!({"mch_id": "food", "out_trade_no": "v1", "currency": "CNY", "notify_url": "http://x/n"}),
                "amount",
            ),
        ] {
            let (s, e) = post(format!("{pay}/v1/trades"), body).await;
            assert_eq!(s, 400, "{e}");
            assert!(e["error"]["message"].as_str().unwrap().contains(needle), "{e}");
        }
        let mut usd = create_body("v1", 100, "http://x/n");
        usd["currency"] = json!("USD");
        let (s, e) = post(format!("{pay}/v1/trades"), usd).await;
        assert_eq!(s, 400);
        assert!(e["error"]["message"].as_str().unwrap().contains("CNY, KRW"));
        let (s, e) = post(
            format!("{pay}/v1/trades/t-krw/pay"),
            json!({"wallet_id": "demo", "method": "paypal"}),
        )
        .await;
        assert_eq!(s, 400);
        assert!(e["error"]["message"].as_str().unwrap().contains("wechat, alipay"));
        // An empty wallet id has no credential: refused before it is read.
        let (s, _) = post(
            format!("{pay}/v1/trades/t-krw/pay"),
            json!({"wallet_id": "", "method": "wechat"}),
        )
        .await;
        assert_eq!(s, 401);
        let (s, _) = post(
            format!("{pay}/v1/trades/t-poor/refund"),
            json!({"out_refund_no": "r", "amount": 0}),
        )
        .await;
        assert_eq!(s, 400);
        let (s, _) = post(
            format!("{pay}/_admin/wallets"),
            json!({"wallet_id": "x", "currency": "CNY", "balance": -1}),
        )
        .await;
        assert_eq!(s, 400);
        // Unknown ids: 404.
        assert_eq!(get(format!("{pay}/v1/trades/nope")).await.0, 404);
        assert_eq!(
            post(
                format!("{pay}/v1/trades/nope/pay"),
                json!({"wallet_id": "demo", "method": "wechat"})
            )
            .await
            .0,
            404
        );
        assert_eq!(post(format!("{pay}/v1/trades/nope/close"), json!({})).await.0, 404);
        assert_eq!(get(format!("{pay}/v1/wallets/nobody")).await.0, 404);
        assert_ledger_balances(dir.path());
        sb.stop().await;
    }

    fn signed_headers(key: &[u8], ts: i64, body: &[u8]) -> reqwest::header::HeaderMap {
        let mut h = reqwest::header::HeaderMap::new();
        let nonce = "n-test";
        h.insert(sign::TIMESTAMP, ts.to_string().parse().unwrap());
        h.insert(sign::NONCE, nonce.parse().unwrap());
        h.insert(sign::SIGNATURE, sign::sign(key, ts, nonce, body).parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        h
    }

    fn merchant_notifications(dir: &std::path::Path, out_trade_no: &str) -> i64 {
        let c = Sandbox::open_db(dir, Service::Food).unwrap();
        c.query_row(
            "SELECT notifications FROM pay_orders WHERE out_trade_no = ?1",
            [out_trade_no],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn duplicate_notifications_count_but_pay_once_and_forgeries_are_refused() {
        let (dir, sb) = sandbox(PayOptions::default()).await;
        let pay = sb.url(Service::Pay);
        let notify = format!("{}/pay/notify", sb.url(Service::Food));
        let m = sb.merchant(Service::Food).unwrap().clone();
        let no = m
            .open_payment("o1", 2500, "CNY", "Dumplings")
            .await
            .unwrap()
            .out_trade_no;
        let (s, t) = post(
            format!("{pay}/v1/trades/{no}/pay"),
            json!({"wallet_id": "demo", "method": "wechat"}),
        )
        .await;
        assert_eq!(s, 200);
        wait_for("the notification", 10, async || {
            m.payment_local("o1").unwrap().unwrap().status == "paid"
        })
        .await;
        let demo = balance(&sb, "demo", "CNY").await;

        // The same notification again, properly signed.
        let stored: String = Sandbox::open_db(dir.path(), Service::Pay)
            .unwrap()
            .query_row("SELECT body FROM notifications WHERE out_trade_no = ?1", [&no], |r| {
                r.get(0)
            })
            .unwrap();
        let key = sign::merchant_key(SECRET, "food");
        let http = reqwest::Client::new();
        let r = http
            .post(&notify)
            .headers(signed_headers(&key, sb.clock.now_ms(), stored.as_bytes()))
            .body(stored.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["code"], "SUCCESS");
        assert_eq!(merchant_notifications(dir.path(), &no), 2);
        let p = m.payment("o1").await.unwrap();
        assert_eq!(p.status, "paid");
        assert_eq!(p.transaction_id.as_deref(), t["transaction_id"].as_str());
        assert_eq!(balance(&sb, "demo", "CNY").await, demo);
        assert_eq!(pay_rows(dir.path(), &no), 1);

        // Forged "paid" notifications for an unpaid order: refused, nothing changes.
        let no2 = m.open_payment("o2", 9900, "CNY", "Hotpot").await.unwrap().out_trade_no;
        let forged = json!({"event": "TRANSACTION.SUCCESS", "out_trade_no": no2, "transaction_id": "txn_fake",
                            "mch_id": "food", "amount": 9900, "currency": "CNY", "status": "SUCCESS", "paid_ms": 1})
        .to_string();
        let now = sb.clock.now_ms();
        for headers in [
            signed_headers(&sign::merchant_key(b"wrong-secret", "food"), now, forged.as_bytes()),
            signed_headers(&sign::merchant_key(SECRET, "ride"), now, forged.as_bytes()),
            signed_headers(&key, now, b"{\"some\":\"other body\"}"),
            [(reqwest::header::CONTENT_TYPE, reqwest::header::HeaderValue::from_static("application/json"))].into_iter().collect(),
        ] {
            let r = http
                .post(&notify)
                .headers(headers)
                .body(forged.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 401);
        }
        assert_eq!(m.payment_local("o2").unwrap().unwrap().status, "awaiting_payment");
        assert_eq!(merchant_notifications(dir.path(), &no2), 0);
        let (_, t2) = get(format!("{pay}/v1/trades/{no2}")).await;
        assert_eq!(t2["status"], "NOTPAY");
        assert_eq!(m.payment("o2").await.unwrap().status, "awaiting_payment");
        sb.stop().await;
    }

    #[tokio::test]
    async fn refunds_close_friend_pay_and_qr() {
        let (dir, sb) = sandbox(PayOptions::default()).await;
        let pay = sb.url(Service::Pay);
        let m = sb.merchant(Service::Food).unwrap().clone();
        let no = m
            .open_payment("o1", 3800, "CNY", "Beef noodles")
            .await
            .unwrap()
            .out_trade_no;
        let (s, _) = post(
            format!("{pay}/v1/trades/{no}/refund"),
            json!({"out_refund_no": "r0", "amount": 100}),
        )
        .await;
        assert_eq!(s, 409, "cannot refund an unpaid trade");
        post(
            format!("{pay}/v1/trades/{no}/pay"),
            json!({"wallet_id": "demo", "method": "wechat"}),
        )
        .await;
        let paid = balance(&sb, "demo", "CNY").await;

        let r1 = json!({"out_refund_no": "r1", "amount": 1000});
        let (s, a) = post(format!("{pay}/v1/trades/{no}/refund"), r1.clone()).await;
        assert_eq!(s, 200, "{a}");
        assert_eq!(
            a,
            json!({"out_refund_no": "r1", "out_trade_no": no, "amount": 1000, "status": "SUCCESS"})
        );
        let (s, b) = post(format!("{pay}/v1/trades/{no}/refund"), r1).await;
        assert_eq!((s, &b), (200, &a));
        assert_eq!(balance(&sb, "demo", "CNY").await, paid + 1000, "credited once");
        let (s, e) = post(
            format!("{pay}/v1/trades/{no}/refund"),
            json!({"out_refund_no": "r1", "amount": 500}),
        )
        .await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("refund_mismatch")));
        let (s, e) = post(
            format!("{pay}/v1/trades/{no}/refund"),
            json!({"out_refund_no": "r2", "amount": 2801}),
        )
        .await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("refund_exceeds_payment")));
        let (s, _) = post(
            format!("{pay}/v1/trades/{no}/refund"),
            json!({"out_refund_no": "r2", "amount": 2800}),
        )
        .await;
        assert_eq!(s, 200);
        let (_, t) = get(format!("{pay}/v1/trades/{no}")).await;
        assert_eq!(
            (t["status"].as_str(), t["refunded"].as_i64()),
            (Some("REFUND"), Some(3800))
        );
        assert_eq!(balance(&sb, "demo", "CNY").await, paid + 3800);
        let (s, _) = post(
            format!("{pay}/v1/trades/{no}/refund"),
            json!({"out_refund_no": "r3", "amount": 1}),
        )
        .await;
        assert_eq!(s, 409);
        // Through the merchant, idempotent per refund number.
        let no_b = m.open_payment("o2", 2000, "CNY", "Tea").await.unwrap().out_trade_no;
        post(
            format!("{pay}/v1/trades/{no_b}/pay"),
            json!({"wallet_id": "demo", "method": "alipay"}),
        )
        .await;
        let before = balance(&sb, "demo", "CNY").await;
        m.refund("o2", 500, "a").await.unwrap();
        m.refund("o2", 500, "a").await.unwrap();
        assert_eq!(balance(&sb, "demo", "CNY").await, before + 500);
        // A paid trade cannot be closed.
        let (s, e) = post(format!("{pay}/v1/trades/{no}/close"), json!({})).await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("already_paid")));

        // Close, close again, then pay: refused.
        let (s, _) = post(
            format!("{pay}/v1/trades"),
            create_body("c-1", 700, "http://127.0.0.1:1/n"),
        )
        .await;
        assert_eq!(s, 200);
        let (s, c) = post(format!("{pay}/v1/trades/c-1/close"), json!({})).await;
        assert_eq!((s, c["status"].as_str()), (200, Some("CLOSED")));
        assert_eq!(post(format!("{pay}/v1/trades/c-1/close"), json!({})).await.0, 200);
        let before = balance(&sb, "demo", "CNY").await;
        let (s, e) = post(
            format!("{pay}/v1/trades/c-1/pay"),
            json!({"wallet_id": "demo", "method": "wechat"}),
        )
        .await;
        assert_eq!((s, e["error"]["code"].as_str()), (409, Some("trade_closed")));
        assert_eq!(balance(&sb, "demo", "CNY").await, before);
        let (s, _) = post(format!("{pay}/v1/trades/c-1/friend-link"), json!({})).await;
        assert_eq!(s, 409);
        // The merchant's close goes through too.
        m.open_payment("o3", 900, "CNY", "Bun").await.unwrap();
        m.close("o3").await.unwrap();
        assert_eq!(m.payment("o3").await.unwrap().status, "closed");

        // Friend pay: the friend's wallet pays, the asker's is untouched.
        let fno = m
            .open_payment("o4", 6600, "CNY", "Dinner for two")
            .await
            .unwrap()
            .out_trade_no;
        let (s, link) = post(format!("{pay}/v1/trades/{fno}/friend-link"), json!({})).await;
        assert_eq!(s, 200, "{link}");
        let token = link["token"].as_str().unwrap().to_string();
        assert_eq!(link["link"], format!("errandpay://friend-pay/{token}"));
        let (_, again) = post(format!("{pay}/v1/trades/{fno}/friend-link"), json!({})).await;
        assert_eq!(again["token"], link["token"], "a live link is reused");
        let (s, view) = get(format!("{pay}/v1/friend-pay/{token}")).await;
        assert_eq!(s, 200);
        assert_eq!(
            (view["description"].as_str(), view["amount"].as_i64()),
            (Some("Dinner for two"), Some(6600))
        );
        assert_eq!(
            (view["currency"].as_str(), view["status"].as_str()),
            (Some("CNY"), Some("NOTPAY"))
        );
        let (demo, friend) = (balance(&sb, "demo", "CNY").await, balance(&sb, "friend", "CNY").await);
        let (s, t) = post(format!("{pay}/v1/friend-pay/{token}"), json!({"wallet_id": "friend"})).await;
        assert_eq!(s, 200, "{t}");
        assert_eq!(
            (t["status"].as_str(), t["method"].as_str()),
            (Some("SUCCESS"), Some("friend_pay"))
        );
        assert_eq!(t["payer_wallet"], "friend");
        let (s, _) = post(format!("{pay}/v1/friend-pay/{token}"), json!({"wallet_id": "friend"})).await;
        assert_eq!(s, 200, "a repeat is not a second charge");
        assert_eq!(balance(&sb, "friend", "CNY").await, friend - 6600);
        assert_eq!(balance(&sb, "demo", "CNY").await, demo);
        assert_eq!(m.payment("o4").await.unwrap().status, "paid");
        assert_eq!(get(format!("{pay}/v1/friend-pay/fp_unknown")).await.0, 404);
        assert_eq!(
            post(
                format!("{pay}/v1/friend-pay/fp_unknown"),
                json!({"wallet_id": "friend"})
            )
            .await
            .0,
            404
        );
        // Links expire after 30 minutes.
        let (_, t5) = post(
            format!("{pay}/v1/trades"),
            create_body("f-5", 100, "http://127.0.0.1:1/n"),
        )
        .await;
        assert_eq!(t5["status"], "NOTPAY");
        let (_, link5) = post(format!("{pay}/v1/trades/f-5/friend-link"), json!({})).await;
        let token5 = link5["token"].as_str().unwrap().to_string();
        sb.clock.advance(Duration::from_secs(31 * 60));
        let (s, e) = post(format!("{pay}/v1/friend-pay/{token5}"), json!({"wallet_id": "friend"})).await;
        assert_eq!((s, e["error"]["code"].as_str()), (410, Some("link_expired")));
        assert_eq!(get(format!("{pay}/v1/friend-pay/{token5}")).await.0, 410);

        // QR payloads resolve, and an altered one is refused.
        let qr = t5["qr_payload"].as_str().unwrap().to_string();
        let (s, v) = post(format!("{pay}/v1/scan"), json!({"qr_payload": qr})).await;
        assert_eq!((s, v["trade"]["out_trade_no"].as_str()), (200, Some("f-5")));
        let altered = qr.replace("amount=100&", "amount=1&");
        assert_ne!(altered, qr);
        let (s, e) = post(format!("{pay}/v1/scan"), json!({"qr_payload": altered})).await;
        assert_eq!((s, e["error"]["code"].as_str()), (400, Some("bad_qr")));
        assert_ledger_balances(dir.path());
        sb.stop().await;
    }

    #[tokio::test]
    async fn notifications_retry_with_backoff_then_deliver_or_give_up() {
        let opts = PayOptions {
            notify_backoff: Duration::from_millis(50),
            notify_attempts: 6,
            ..Default::default()
        };
        let (dir, sb) = sandbox(opts).await;
        let pay = sb.url(Service::Pay);
        let faults = sb.faults(Service::Food).unwrap().clone();
        faults.set(crate::sandbox::core::FaultConfig {
            latency_ms: 0,
            error_rate: 1.0,
        });
        let m = sb.merchant(Service::Food).unwrap().clone();
        let no = m.open_payment("o1", 1200, "CNY", "Buns").await.unwrap().out_trade_no;
        // A trade whose merchant is never reachable.
        let (s, _) = post(
            format!("{pay}/v1/trades"),
            create_body("dead-1", 300, "http://127.0.0.1:1/pay/notify"),
        )
        .await;
        assert_eq!(s, 200);
        for n in [&no, "dead-1"] {
            let (s, _) = post(
                format!("{pay}/v1/trades/{n}/pay"),
                json!({"wallet_id": "demo", "method": "wechat"}),
            )
            .await;
            assert_eq!(s, 200);
        }
        let item =
            async |n: &str| get(format!("{pay}/v1/notifications?out_trade_no={n}")).await.1["items"][0].clone();
        wait_for("two failed attempts", 10, async || {
            item(&no).await["attempts"].as_i64().unwrap() >= 2
        })
        .await;
        let it = item(&no).await;
        assert_eq!(it["delivered"], false);
        assert!(it["last_error"].as_str().unwrap().contains("503"), "{it}");
        let a = it["attempts"].as_i64().unwrap();
        let gap = it["next_ms"].as_i64().unwrap() - it["last_attempt_ms"].as_i64().unwrap();
        assert_eq!(gap, 50 << (a - 1), "backoff doubles: {it}");
        assert_eq!(m.payment_local("o1").unwrap().unwrap().status, "awaiting_payment");

        // Healed: the next retry gets through.
        faults.set(crate::sandbox::core::FaultConfig::default());
        wait_for("delivery after healing", 10, async || {
            item(&no).await["delivered"] == true
        })
        .await;
        let it = item(&no).await;
        assert!(it["attempts"].as_i64().unwrap() > a && it["next_ms"].is_null(), "{it}");
        assert_eq!(m.payment_local("o1").unwrap().unwrap().status, "paid");
        assert_eq!(merchant_notifications(dir.path(), &no), 1);

        // The unreachable one gives up after 6 attempts (50+100+200+400+800 ms of backoff).
        wait_for("giving up", 15, async || item("dead-1").await["next_ms"].is_null()).await;
        let it = item("dead-1").await;
        assert_eq!(
            (it["attempts"].as_i64(), it["delivered"].as_bool()),
            (Some(6), Some(false)),
            "{it}"
        );
        assert!(it["last_error"].as_str().unwrap().contains("cannot reach"), "{it}");
        sb.stop().await;
    }

    #[tokio::test]
    async fn pending_notifications_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::sandbox::testkit::config(dir.path());
        cfg.secret = Some(SECRET.to_vec());
        cfg.services = vec![Service::Pay, Service::Food];
        let sb = start(cfg.clone()).await.unwrap();
        let m = sb.merchant(Service::Food).unwrap().clone();
        let no = m.open_payment("o1", 800, "CNY", "Soy milk").await.unwrap().out_trade_no;
        sb.stop().await;
        // Let the stopped sandbox's notifier notice and end (it polls every 500 ms).
        tokio::time::sleep(POLL + Duration::from_millis(200)).await;
        // Simulate the crash window: a committed payment whose notification never went out.
        let c = Sandbox::open_db(dir.path(), Service::Pay).unwrap();
        let pay_state = Pay {
            db: Db::open(&dir.path().join("pay.db")).unwrap(),
            clock: cfg.clock.clone(),
            qr_key: derive_key(SECRET, b"errand-qr-key"),
            secret: SECRET.to_vec(),
            nonces: Default::default(),
            opts: PayOptions::default(),
            wake: Arc::new(Notify::new()),
        };
        pay_state.pay(&no, "demo", "wechat").unwrap();
        drop(pay_state);
        let pending: i64 = c
            .query_row("SELECT COUNT(*) FROM notifications WHERE delivered = 0", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(pending, 1);

        // Back on a new port: the stored notify_url follows the move.
        let sb = start(cfg).await.unwrap();
        let pay = sb.url(Service::Pay);
        let m = sb.merchant(Service::Food).unwrap().clone();
        wait_for("the outbox to drain", 10, async || {
            get(format!("{pay}/v1/notifications?out_trade_no={no}")).await.1["items"][0]["delivered"] == true
        })
        .await;
        assert_eq!(merchant_notifications(dir.path(), &no), 1);
        assert_eq!(m.payment("o1").await.unwrap().status, "paid");
        assert_eq!(pay_rows(dir.path(), &no), 1);
        sb.stop().await;
    }

    #[test]
    fn retry_delays_double_and_cap() {
        assert_eq!(retry_delay_ms(50, 1), 50);
        assert_eq!(retry_delay_ms(50, 2), 100);
        assert_eq!(retry_delay_ms(50, 5), 800);
        assert_eq!(retry_delay_ms(500, 20), 60_000);
        assert_eq!(retry_delay_ms(500, 10_000), 60_000);
    }
}

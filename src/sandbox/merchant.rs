//! The merchant half of payments, shared by every sandbox mini-program that
//! takes money: it opens a trade with the payment service, receives the
//! signed "paid" notification, reconciles by querying when a notification
//! never came, and refunds.
//!
//! Each service keeps a `pay_orders` table in its own database; an order's
//! payment state is read from there, so the service never trusts anything
//! but a verified notification or its own query to the payment service.

use super::core::{new_id, ApiError, ApiResult, Db};
use crate::world::Clock;
use super::sign;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use rusqlite::OptionalExtension;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS pay_orders (
    out_trade_no TEXT PRIMARY KEY,
    order_id TEXT NOT NULL UNIQUE,
    amount INTEGER NOT NULL,
    currency TEXT NOT NULL,
    status TEXT NOT NULL,            -- awaiting_payment | paid | refunded | closed
    transaction_id TEXT,
    paid_ms INTEGER,
    refunded INTEGER NOT NULL DEFAULT 0,
    notifications INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL)";

/// What a merchant order carries about its payment, as the agent sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Payment {
    pub out_trade_no: String,
    pub amount: i64,
    pub currency: String,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paid_ms: Option<i64>,
    #[serde(default)]
    pub refunded: i64,
}

/// A trade as the payment service reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct Trade {
    pub out_trade_no: String,
    pub amount: i64,
    pub currency: String,
    pub status: String,
    #[serde(default)]
    pub transaction_id: Option<String>,
    #[serde(default)]
    pub paid_ms: Option<i64>,
}

pub struct Merchant {
    pub mch_id: String,
    key: Vec<u8>,
    pay_url: String,
    notify_url: String,
    http: reqwest::Client,
    db: Db,
    clock: Clock,
}

impl Merchant {
    /// `pay_url` is the payment service's base (…/pay); `notify_url` is where
    /// this merchant's [`Merchant::notify_router`] is reachable.
    pub fn new(
        mch_id: &str,
        secret: &[u8],
        pay_url: &str,
        notify_url: &str,
        db: Db,
        clock: Clock,
    ) -> ApiResult<Arc<Self>> {
        db.with(|c| Ok(c.execute_batch(SCHEMA)?))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ApiError::internal(format!("http client: {e}")))?;
        Ok(Arc::new(Self {
            mch_id: mch_id.into(),
            key: sign::merchant_key(secret, mch_id),
            pay_url: pay_url.trim_end_matches('/').into(),
            notify_url: notify_url.into(),
            http,
            db,
            clock,
        }))
    }

    async fn pay_call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> ApiResult<Value> {
        let url = format!("{}{}", self.pay_url, path);
        let bytes = body.map(|b| serde_json::to_vec(&b).unwrap_or_default()).unwrap_or_default();
        let mut req = self.http.request(method.clone(), &url);
        for (k, v) in sign::request_headers(&self.key, &self.mch_id, method.as_str(), path, &bytes, self.clock.now_ms()) {
            req = req.header(k, v);
        }
        if !bytes.is_empty() {
            req = req.header("content-type", "application/json").body(bytes);
        }
        let resp = req.send().await.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "payment_unreachable",
                format!("payment service unreachable at {url}: {e}"),
            )
        })?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = v["error"]["message"].as_str().unwrap_or("no details").to_string();
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "payment_error",
                format!("payment service answered {status}: {msg}"),
            ));
        }
        Ok(v)
    }

    /// Opens the trade for `order_id` with the payment service (idempotent:
    /// the trade number is derived from the order id) and records it here.
    pub async fn open_payment(&self, order_id: &str, amount: i64, currency: &str, description: &str) -> ApiResult<Payment> {
        let out_trade_no = format!("{}-{}", self.mch_id, order_id);
        let now = self.clock.now_ms();
        self.db.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO pay_orders (out_trade_no, order_id, amount, currency, status, created_ms)
                 VALUES (?1, ?2, ?3, ?4, 'awaiting_payment', ?5)",
                rusqlite::params![out_trade_no, order_id, amount, currency, now],
            )?;
            Ok(())
        })?;
        self.pay_call(
            reqwest::Method::POST,
            "/v1/trades",
            Some(json!({
                "mch_id": self.mch_id,
                "out_trade_no": out_trade_no,
                "amount": amount,
                "currency": currency,
                "description": description,
                "notify_url": self.notify_url,
            })),
        )
        .await?;
        self.payment(order_id).await
    }

    fn read(&self, order_id: &str) -> ApiResult<Option<Payment>> {
        self.db.with(|c| {
            Ok(c.query_row(
                "SELECT out_trade_no, amount, currency, status, transaction_id, paid_ms, refunded
                 FROM pay_orders WHERE order_id = ?1",
                [order_id],
                |r| {
                    Ok(Payment {
                        out_trade_no: r.get(0)?,
                        amount: r.get(1)?,
                        currency: r.get(2)?,
                        status: r.get(3)?,
                        transaction_id: r.get(4)?,
                        paid_ms: r.get(5)?,
                        refunded: r.get(6)?,
                    })
                },
            )
            .optional()?)
        })
    }

    /// The order's payment; while it still awaits payment, asks the payment
    /// service (a notification may have been lost, e.g. to a crash).
    pub async fn payment(&self, order_id: &str) -> ApiResult<Payment> {
        let p = self
            .read(order_id)?
            .ok_or_else(|| ApiError::not_found(format!("no payment for order {order_id}")))?;
        if p.status == "awaiting_payment" {
            if let Ok(v) = self
                .pay_call(reqwest::Method::GET, &format!("/v1/trades/{}", p.out_trade_no), None)
                .await
            {
                if let Ok(t) = serde_json::from_value::<Trade>(v) {
                    self.apply(&t)?;
                }
            }
            return self.read(order_id)?.ok_or_else(|| ApiError::internal("payment vanished"));
        }
        Ok(p)
    }

    /// Payment state without asking the payment service (for listings).
    pub fn payment_local(&self, order_id: &str) -> ApiResult<Option<Payment>> {
        self.read(order_id)
    }

    /// Queries every trade still awaiting payment; run at start-up so that a
    /// payment made while this service was down is not lost.
    pub async fn reconcile(&self) -> ApiResult<usize> {
        let pending: Vec<String> = self.db.with(|c| {
            let mut st = c.prepare("SELECT order_id FROM pay_orders WHERE status = 'awaiting_payment'")?;
            let rows = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            Ok(rows)
        })?;
        let mut paid = 0;
        for order in pending {
            if self.payment(&order).await?.status == "paid" {
                paid += 1;
            }
        }
        Ok(paid)
    }

    /// Records a successful trade once; later copies change nothing.
    fn apply(&self, t: &Trade) -> ApiResult<bool> {
        if t.status == "CLOSED" {
            // Closed unpaid (by the merchant, or expired at the payment
            // service): the order's payment is closed and never will be paid.
            self.db.with(|c| {
                c.execute(
                    "UPDATE pay_orders SET status = 'closed' WHERE out_trade_no = ?1 AND status = 'awaiting_payment'",
                    [&t.out_trade_no],
                )?;
                Ok(())
            })?;
            return Ok(false);
        }
        if t.status != "SUCCESS" && t.status != "REFUND" {
            return Ok(false);
        }
        self.db.tx(|tx| {
            let expected: Option<(i64, String)> = tx
                .query_row(
                    "SELECT amount, currency FROM pay_orders WHERE out_trade_no = ?1",
                    [&t.out_trade_no],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((amount, currency)) = expected else {
                return Err(ApiError::not_found(format!("unknown trade {}", t.out_trade_no)));
            };
            if amount != t.amount || currency != t.currency {
                return Err(ApiError::bad_request(format!(
                    "trade {} reports {} {} but the order is for {} {}",
                    t.out_trade_no, t.amount, t.currency, amount, currency
                )));
            }
            let n = tx.execute(
                "UPDATE pay_orders SET status = 'paid', transaction_id = ?2, paid_ms = ?3
                 WHERE out_trade_no = ?1 AND status = 'awaiting_payment'",
                rusqlite::params![t.out_trade_no, t.transaction_id, t.paid_ms],
            )?;
            Ok(n == 1)
        })
    }

    /// Refunds `amount` of the order's payment (idempotent per `refund_no`).
    pub async fn refund(&self, order_id: &str, amount: i64, refund_no: &str) -> ApiResult<Payment> {
        let p = self.payment(order_id).await?;
        if p.status != "paid" && p.status != "refunded" {
            return Err(ApiError::conflict("not_paid", format!("order {order_id} has not been paid")));
        }
        if amount > 0 {
            self.pay_call(
                reqwest::Method::POST,
                &format!("/v1/trades/{}/refund", p.out_trade_no),
                Some(json!({"out_refund_no": format!("{}-{refund_no}", p.out_trade_no), "amount": amount})),
            )
            .await?;
        }
        // Copy the payment service's total rather than adding: a replayed
        // refund must not count twice.
        let trade = self
            .pay_call(reqwest::Method::GET, &format!("/v1/trades/{}", p.out_trade_no), None)
            .await?;
        let refunded = trade["refunded"].as_i64().unwrap_or(0);
        self.db.with(|c| {
            c.execute(
                "UPDATE pay_orders SET status = CASE WHEN ?2 > 0 THEN 'refunded' ELSE status END, refunded = ?2
                 WHERE order_id = ?1 AND status IN ('paid', 'refunded')",
                rusqlite::params![order_id, refunded],
            )?;
            Ok(())
        })?;
        self.read(order_id)?.ok_or_else(|| ApiError::internal("payment vanished"))
    }

    /// Closes an unpaid order's trade so it can no longer be paid.
    pub async fn close(&self, order_id: &str) -> ApiResult<()> {
        let Some(p) = self.read(order_id)? else { return Ok(()) };
        if p.status != "awaiting_payment" {
            return Ok(());
        }
        self.pay_call(reqwest::Method::POST, &format!("/v1/trades/{}/close", p.out_trade_no), None)
            .await?;
        self.db.with(|c| {
            c.execute(
                "UPDATE pay_orders SET status = 'closed' WHERE order_id = ?1 AND status = 'awaiting_payment'",
                [order_id],
            )?;
            Ok(())
        })
    }

    /// `POST /pay/notify`: the payment service's signed notification.
    pub fn notify_router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/pay/notify", post(notify))
            .with_state(self.clone())
    }
}

async fn notify(State(m): State<Arc<Merchant>>, headers: HeaderMap, body: Bytes) -> ApiResult<Json<Value>> {
    sign::verify(&m.key, &headers, &body, m.clock.now_ms())?;
    let t: Trade = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("notification body: {e}")))?;
    m.db.with(|c| {
        c.execute(
            "UPDATE pay_orders SET notifications = notifications + 1 WHERE out_trade_no = ?1",
            [&t.out_trade_no],
        )?;
        Ok(())
    })?;
    m.apply(&t)?;
    Ok(Json(json!({"code": "SUCCESS", "id": new_id("ack")})))
}

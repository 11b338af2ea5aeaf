//! Payments across a process boundary: the sandbox, run as `errand sandbox`,
//! is killed between committing a payment and notifying the merchant; after
//! a restart the books agree and the wallet was charged exactly once, even
//! with retried creates, repeated pays and duplicate notifications.

use crate::util;
use errand::sandbox::sign;
use errand::world::clock;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `errand sandbox` with its clock pinned at `now_ms` (the food
/// order needs an open restaurant, whatever the hour the test runs at).
async fn spawn(data: &Path, port: u16, crash_after_pay: bool, now_ms: i64) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_errand"));
    cmd.args(["sandbox", "--port", &port.to_string(), "--only", "pay,food", "--notify-backoff-ms", "50", "--data"])
        .arg(data)
        .env("ERRAND_NOW", clock::format_instant(now_ms))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if crash_after_pay {
        cmd.arg("--crash-after-pay");
    }
    let p = Proc(cmd.spawn().expect("errand sandbox starts"));
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if http.get(format!("http://127.0.0.1:{port}/health")).send().await.is_ok() {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("errand sandbox did not come up on port {port}");
}

fn pay_db(data: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(data.join("pay.db")).unwrap()
}

fn pay_rows(data: &Path, otn: &str) -> i64 {
    pay_db(data)
        .query_row("SELECT COUNT(*) FROM ledger WHERE kind = 'pay' AND out_trade_no = ?1", [otn], |r| r.get(0))
        .unwrap()
}

fn merchant_status(data: &Path, otn: &str) -> (String, i64) {
    rusqlite::Connection::open(data.join("food.db"))
        .unwrap()
        .query_row("SELECT status, notifications FROM pay_orders WHERE out_trade_no = ?1", [otn], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_pay_and_notify_still_charges_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    // The sandbox's clock starts at the tests' instant, and a restart
    // starts it where the first process's had got to.
    let (start_ms, started) = (util::now_ms(), std::time::Instant::now());
    let mut p = spawn(data, port, true, start_ms).await;

    let order_req = json!({"restaurant_id": "sh01", "items": [{"dish_id": "sh01-kung-pao-chicken", "quantity": 1}], "address": "88 Nanjing Road"});
    let order: Value = http
        .post(format!("{base}/food/v1/orders"))
        .header("Idempotency-Key", "confirm-abc")
        .json(&order_req)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let otn = order["payment"]["out_trade_no"].as_str().unwrap_or_else(|| panic!("{order}")).to_owned();
    let amount = order["payment"]["amount"].as_i64().unwrap();
    let secret = std::fs::read(data.join("secret")).unwrap();
    let demo = sign::wallet_credential(&secret, "demo");

    // The process dies right after the payment commits.
    let r = http
        .post(format!("{base}/pay/v1/trades/{otn}/pay"))
        .bearer_auth(&demo)
        .json(&json!({"wallet_id": "demo", "method": "alipay"}))
        .send()
        .await;
    assert!(r.is_err() || !r.unwrap().status().is_success(), "no answer from a dying process");
    let status = p.0.wait().unwrap();
    assert_eq!(status.code(), Some(137), "the crash knob fired");
    assert_eq!(pay_rows(data, &otn), 1, "the charge was committed");
    assert_eq!(merchant_status(data, &otn).0, "awaiting_payment", "the merchant never heard of it");

    // Restart: the merchant reconciles (query at start-up, the outbox's notification).
    let _p = spawn(data, port, false, start_ms + started.elapsed().as_millis() as i64).await;
    let mut seen = Value::Null;
    for _ in 0..50 {
        seen = http.get(format!("{base}/food/v1/orders/{}", order["order_id"].as_str().unwrap())).send().await.unwrap().json().await.unwrap();
        if seen["payment"]["status"] == "paid" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen["payment"]["status"], "paid", "{seen}");
    assert_eq!(merchant_status(data, &otn).0, "paid");

    // A create retried with the same key is the same order; a pay retried is no second charge.
    let again: Value = http
        .post(format!("{base}/food/v1/orders"))
        .header("Idempotency-Key", "confirm-abc")
        .json(&order_req)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["order_id"], order["order_id"]);
    let body = serde_json::to_vec(&json!({"mch_id": "food", "out_trade_no": otn, "amount": amount, "currency": "CNY", "description": "retry", "notify_url": format!("{base}/food/pay/notify")})).unwrap();
    let now: Value = http.get(format!("{base}/_admin/clock")).send().await.unwrap().json().await.unwrap();
    let mut req = http.post(format!("{base}/pay/v1/trades")).header("content-type", "application/json");
    for (k, v) in sign::request_headers(&sign::merchant_key(&secret, "food"), "food", "POST", "/v1/trades", &body, now["now_ms"].as_i64().unwrap()) {
        req = req.header(k, v);
    }
    let trade: Value = req
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(trade["status"], "SUCCESS", "re-creating a paid trade changes nothing: {trade}");
    let repay = http
        .post(format!("{base}/pay/v1/trades/{otn}/pay"))
        .bearer_auth(&demo)
        .json(&json!({"wallet_id": "demo", "method": "alipay"}))
        .send()
        .await
        .unwrap();
    assert!(repay.status().is_success());
    assert_eq!(pay_rows(data, &otn), 1);

    // Duplicate notifications, correctly signed, are counted and harmless.
    let key = sign::merchant_key(&secret, "food");
    let body: String = pay_db(data)
        .query_row("SELECT body FROM notifications WHERE out_trade_no = ?1", [&otn], |r| r.get(0))
        .unwrap();
    let before = merchant_status(data, &otn).1;
    for nonce in ["dup-1", "dup-2"] {
        // Signed at the sandbox's time, which is pinned, not the machine's.
        let now: Value = http.get(format!("{base}/_admin/clock")).send().await.unwrap().json().await.unwrap();
        assert_eq!(now["pinned"], true, "ERRAND_NOW pins the sandbox's clock: {now}");
        let ts = now["now_ms"].as_i64().unwrap_or_else(|| panic!("{now}"));
        let r = http
            .post(format!("{base}/food/pay/notify"))
            .header(sign::TIMESTAMP, ts.to_string())
            .header(sign::NONCE, nonce)
            .header(sign::SIGNATURE, sign::sign(&key, ts, nonce, body.as_bytes()))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{:?}", r.text().await);
    }
    assert_eq!(merchant_status(data, &otn), ("paid".to_string(), before + 2));
    // A forged one is refused.
    let r = http
        .post(format!("{base}/food/pay/notify"))
        .header(sign::TIMESTAMP, "1")
        .header(sign::NONCE, "x")
        .header(sign::SIGNATURE, "00")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(pay_rows(data, &otn), 1, "exactly one charge after all of it");
    let balance: i64 = pay_db(data)
        .query_row("SELECT balance FROM wallets WHERE wallet_id = 'demo' AND currency = 'CNY'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(balance, 200_000 - amount);
}

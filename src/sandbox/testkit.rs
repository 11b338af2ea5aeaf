//! Helpers for the sandbox services' unit tests, so each service's tests read
//! as the story they check rather than as HTTP plumbing: a sandbox in a
//! temporary folder, JSON `GET`/`POST` answering `(status, body)`, a `POST`
//! carrying the terms the user confirmed (the `X-Errand-Confirmed-*`
//! headers of [`terms`](super::terms)), paying a trade at the payment
//! service as the demo wallet (with its credential), reading a wallet, and a
//! manifest's tools.

use super::{start, Sandbox, SandboxConfig, Service};
use crate::world::Clock;
use serde_json::{json, Value};
use std::path::Path;

/// The instant the services' unit tests start at: a Tuesday, noon in
/// Shanghai, so results never depend on the day the tests run.
pub(crate) const NOW: &str = "2026-12-08T12:00:00+08:00";

/// A clock pinned at [`NOW`].
pub(crate) fn clock() -> Clock {
    Clock::pinned(crate::world::clock::parse_instant(NOW).unwrap())
}

/// A configuration of every service (seed 42) with data in `dir` and the
/// clock pinned at [`NOW`].
pub(crate) fn config(dir: &Path) -> SandboxConfig {
    SandboxConfig::new(dir, clock())
}

/// A sandbox of every service (seed 42) in a fresh temporary folder; keep
/// the folder alive as long as the sandbox.
pub(crate) async fn sandbox() -> (tempfile::TempDir, Sandbox) {
    let dir = tempfile::tempdir().unwrap();
    let sb = start(config(dir.path())).await.unwrap();
    (dir, sb)
}

/// A sandbox of every service with its data in `dir`, seeded with `seed`.
pub(crate) async fn sandbox_in(dir: &Path, seed: u64) -> Sandbox {
    let mut cfg = config(dir);
    cfg.seed = seed;
    start(cfg).await.unwrap()
}

/// Sends `req` and answers its status and JSON body (`Null` when the body
/// is not JSON).
pub(crate) async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

pub(crate) async fn get(url: impl reqwest::IntoUrl) -> (u16, Value) {
    send(reqwest::Client::new().get(url)).await
}

pub(crate) async fn post(url: impl reqwest::IntoUrl, body: Value) -> (u16, Value) {
    send(reqwest::Client::new().post(url).json(&body)).await
}

/// A write the user confirmed at `amount` `currency` (as the assistant sends it).
pub(crate) async fn post_confirmed(
    url: impl reqwest::IntoUrl,
    body: Value,
    amount: i64,
    currency: &str,
) -> (u16, Value) {
    let req = reqwest::Client::new()
        .post(url)
        .header(super::terms::AMOUNT_HEADER, amount.to_string())
        .header(super::terms::CURRENCY_HEADER, currency)
        .json(&body);
    send(req).await
}

/// Pays the trade of `order` (its `payment.out_trade_no`) from the demo
/// wallet with `method` ("alipay", "wechat"), and checks it was paid.
pub(crate) async fn pay(sb: &Sandbox, order: &Value, method: &str) {
    let otn = order["payment"]["out_trade_no"].as_str().unwrap();
    let req = reqwest::Client::new()
        .post(format!("{}/v1/trades/{otn}/pay", sb.url(Service::Pay)))
        .bearer_auth(sb.wallet_credential("demo"))
        .json(&json!({"wallet_id": "demo", "method": method}));
    let (s, v) = send(req).await;
    assert_eq!(s, 200, "pay {otn}: {v}");
}

/// The wallet `id` as its owner reads it (`{"balances", "ledger"}`).
pub(crate) async fn wallet(sb: &Sandbox, id: &str) -> Value {
    let req = reqwest::Client::new().get(format!("{}/v1/wallets/{id}", sb.url(Service::Pay))).bearer_auth(sb.wallet_credential(id));
    let (s, v) = send(req).await;
    assert_eq!(s, 200, "wallet {id}: {v}");
    v
}

/// The tool `name` from its app's manifest, `tools/<app>.json`, where `<app>`
/// is the name's prefix (`food_menu` → `tools/food.json`).
pub(crate) fn tool(name: &str) -> crate::tools::Tool {
    let app = name.split('_').next().unwrap_or(name);
    let path = crate::source_root()
        .join("tools")
        .join(format!("{app}.json"));
    crate::tools::load_manifest(&path)
        .unwrap()
        .into_iter()
        .find(|t| t.def.name == name)
        .unwrap_or_else(|| panic!("no tool {name} in {}", path.display()))
}

/// The answer fits the manifest's `result` schema for `name`.
pub(crate) fn check(name: &str, v: &Value) {
    tool(name).validate_result(v).unwrap();
}

/// How many rows `table` of `service`'s database in `dir` holds now.
pub(crate) fn rows(dir: &Path, service: Service, table: &str) -> i64 {
    let c = Sandbox::open_db(dir, service).unwrap();
    c.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

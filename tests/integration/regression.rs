//! Regression tests for the reliability and security findings of issue 23,
//! one named test per finding (`finding_NN_…`). Each one failed against the
//! code the finding was read from.
//!
//! Some are unit tests, or have a unit-test half, because they need what only the crate sees (the
//! scripted generator, a session's private state, a stub server for the
//! adapter); they carry the same names:
//! - finding 4, the order booked before it is paid: `agent::flow_tests::finding_04_the_order_is_booked_before_it_is_paid`;
//! - finding 5: `agent::flow_tests::finding_05_an_unknown_payment_that_went_through_is_reported_and_not_repeated`,
//!   and unpaid orders lapsing in `sandbox::food::tests::unpaid_orders_never_move_on_and_lapse`;
//! - finding 6's redirects: `adapter::tests::redirects_are_not_followed`;
//! - finding 10: `server::hub::tests::finding_10_a_sessions_state_stays_bounded`
//!   and `dialogue::ground::tests::evidence_keeps_only_the_newest`.

use crate::server_ws::{config, serve, Client, TestServer, ALICE, FLORIST};
use crate::util::{repo, smol};
use errand::agent::AgentOptions;
use errand::sandbox::{sign, Sandbox, SandboxConfig, Service};
use errand::tools::ToolSet;
use serde_json::{json, Value};
use std::sync::Arc;

async fn smol_server(cfg: errand::server::config::ServerConfig) -> TestServer {
    let agent = AgentOptions { max_tokens: 16, constrain: false, ..Default::default() };
    serve(Arc::new(smol().clone()), ToolSet::default(), cfg, agent).await
}

async fn sandbox(dir: &std::path::Path) -> Sandbox {
    errand::sandbox::start(SandboxConfig::new(dir, crate::util::clock())).await.unwrap()
}

async fn status(req: reqwest::RequestBuilder) -> u16 {
    req.send().await.unwrap().status().as_u16()
}

async fn json_of(req: reqwest::RequestBuilder) -> Value {
    req.send().await.unwrap().json().await.unwrap()
}

/// A kung pao chicken order placed straight at the food service (unpaid).
async fn kung_pao_order(http: &reqwest::Client, food: &str) -> Value {
    let body = json!({"restaurant_id": "sh01", "items": [{"dish_id": "sh01-kung-pao-chicken", "quantity": 1}], "address": "88 Nanjing Road"});
    json_of(http.post(format!("{food}/v1/orders")).json(&body)).await
}

/// Opens a WebSocket with one extra header on the upgrade request.
async fn upgrade_with(url: String, name: &'static str, value: &str) -> Result<u16, u16> {
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    req.headers_mut().insert(name, value.parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Ok((_, resp)) => Ok(resp.status().as_u16()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

/// Finding 1: anyone who could reach the sandbox's port moved money with a
/// `text/plain` POST a web page can send without a preflight, read wallets,
/// and got answers under any `Host` (DNS rebinding), from the sandbox and
/// the server alike; a WebSocket upgrade from a foreign page was accepted.
#[tokio::test(flavor = "multi_thread")]
async fn finding_01_money_needs_credentials_and_foreign_pages_and_hosts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sb = sandbox(dir.path()).await;
    let pay = sb.url(Service::Pay);
    let http = reqwest::Client::new();
    // A food order opens a trade for the demo wallet to pay.
    let order = kung_pao_order(&http, &sb.url(Service::Food)).await;
    let otn = order["payment"]["out_trade_no"].as_str().unwrap_or_else(|| panic!("{order}")).to_owned();
    let balance = async || -> i64 {
        let w = json_of(http.get(format!("{pay}/v1/wallets/demo")).bearer_auth(sb.wallet_credential("demo"))).await;
        w["balances"]["CNY"].as_i64().unwrap_or_else(|| panic!("{w}"))
    };
    let before = balance().await;

    // The probe's requests: text/plain from a foreign page.
    let text_plain = |url: String, body: &str| {
        http.post(url).header("content-type", "text/plain").header("origin", "http://evil.example").body(body.to_owned())
    };
    let create = r#"{"mch_id":"food","out_trade_no":"evil-1","amount":1,"currency":"CNY","notify_url":"http://127.0.0.1:9/n"}"#;
    assert_eq!(status(text_plain(format!("{pay}/v1/trades"), create)).await, 403);
    assert_eq!(status(text_plain(format!("{pay}/v1/trades/{otn}/pay"), r#"{"wallet_id":"demo","method":"alipay"}"#)).await, 403);
    // Without the Origin: not JSON.
    let plain = http.post(format!("{pay}/v1/trades/{otn}/pay")).header("content-type", "text/plain").body(r#"{"wallet_id":"demo","method":"alipay"}"#);
    assert_eq!(status(plain).await, 415);
    // JSON, but no credential: a bare wallet id moves nothing.
    let bare = http.post(format!("{pay}/v1/trades/{otn}/pay")).json(&json!({"wallet_id": "demo", "method": "alipay"}));
    assert_eq!(status(bare).await, 401);
    // Another wallet's credential does not move demo's money.
    let other = http.post(format!("{pay}/v1/trades/{otn}/pay")).bearer_auth(sb.wallet_credential("friend")).json(&json!({"wallet_id": "demo", "method": "alipay"}));
    assert_eq!(status(other).await, 403);
    // A credential from another sandbox (another secret) is no credential.
    let forged = sign::wallet_credential(b"not-this-sandbox", "demo");
    let r = http.post(format!("{pay}/v1/trades/{otn}/pay")).bearer_auth(forged).json(&json!({"wallet_id": "demo", "method": "alipay"}));
    assert_eq!(status(r).await, 401);
    // Merchant operations need the merchant's signature.
    assert_eq!(status(http.post(format!("{pay}/v1/trades")).json(&serde_json::from_str::<Value>(create).unwrap())).await, 401);
    assert_eq!(status(http.post(format!("{pay}/v1/trades/{otn}/refund")).json(&json!({"out_refund_no": "r1", "amount": 1}))).await, 401);
    assert_eq!(status(http.post(format!("{pay}/v1/trades/{otn}/close")).json(&json!({}))).await, 401);
    // Reading a wallet or its ledger needs its credential too.
    assert_eq!(status(http.get(format!("{pay}/v1/wallets/demo"))).await, 401);
    assert_eq!(status(http.get(format!("{pay}/v1/wallets/demo")).bearer_auth(sb.wallet_credential("friend"))).await, 403);
    assert_eq!(status(http.get(format!("{pay}/v1/notifications"))).await, 401);
    // Admin writes need the admin credential.
    assert_eq!(status(http.post(format!("{pay}/_admin/wallets")).json(&json!({"wallet_id": "demo", "currency": "CNY", "balance": 1}))).await, 401);
    assert_eq!(status(http.post(format!("{}/_admin/clock", sb.base_url)).json(&json!({"seconds": 60}))).await, 401);
    assert_eq!(status(http.post(format!("{}/_admin/faults", sb.url(Service::Ride))).json(&json!({"latency_ms": 0, "error_rate": 1.0}))).await, 401);
    // Nothing moved.
    assert_eq!(balance().await, before);
    let t = json_of(http.get(format!("{pay}/v1/trades/{otn}")).bearer_auth(sb.wallet_credential("demo"))).await;
    assert_eq!(t["status"], "NOTPAY", "{t}");
    // With the wallet's credential, it pays.
    let r = http.post(format!("{pay}/v1/trades/{otn}/pay")).bearer_auth(sb.wallet_credential("demo")).json(&json!({"wallet_id": "demo", "method": "alipay"}));
    assert_eq!(status(r).await, 200);
    assert!(balance().await < before);

    // DNS rebinding: a foreign Host is misdirected, on every path.
    for path in ["/health", "/pay/v1/wallets/demo", "/catalog"] {
        let r = http.get(format!("{}{path}", sb.base_url)).header("host", "rebind.attacker.example");
        assert_eq!(status(r).await, 421, "{path}");
    }
    sb.stop().await;

    // The server: the same Host check, and a foreign page's WebSocket upgrade is refused.
    let mut t = smol_server(config()).await;
    for path in ["/metrics", "/readyz", "/v1/sessions"] {
        let r = http.get(t.http(path)).bearer_auth(ALICE).header("host", "rebind.attacker.example");
        assert_eq!(status(r).await, 421, "{path}");
    }
    assert_eq!(upgrade_with(t.ws_url(), "origin", "http://evil.example").await, Err(403), "a foreign page's upgrade");
    // The server's own page (same origin) still connects.
    assert_eq!(upgrade_with(t.ws_url(), "origin", &t.s().url).await, Ok(101));
    t.stop().await;
}

/// Finding 2: the 17th "new chat" got `session_limit`, which the SDK treats
/// as fatal, and sessions never ended: a person was locked out.
#[tokio::test(flavor = "multi_thread")]
async fn finding_02_new_chats_never_lock_a_person_out() {
    let mut cfg = config();
    cfg.server.sessions_per_user = 4;
    let mut t = smol_server(cfg).await;
    let mut last = String::new();
    for i in 0..10 {
        let (_c, w) = Client::hello(&t.ws_url(), ALICE, None, 0).await;
        assert_eq!(w["type"], "welcome", "hello {i}: {w}");
        last = w["session"].as_str().unwrap().to_owned();
    }
    let list = json_of(reqwest::Client::new().get(t.http("/v1/sessions")).bearer_auth(ALICE)).await;
    let ids: Vec<&str> = list["sessions"].as_array().unwrap().iter().filter_map(|s| s["id"].as_str()).collect();
    assert!(ids.len() <= 4, "{list}");
    assert!(ids.contains(&last.as_str()), "the newest session is kept: {list}");
    // The REST way to start a session is never refused either.
    for _ in 0..6 {
        let r = reqwest::Client::new().post(t.http("/v1/sessions")).bearer_auth(ALICE).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), 201);
    }
    t.stop().await;
}

/// Finding 6: `POST /v1/apps` compared the base URL as text, so spellings of
/// the sandbox's own address got through and an uploaded tool could call
/// the payment service.
#[tokio::test(flavor = "multi_thread")]
async fn finding_06_app_urls_that_reach_the_sandbox_are_refused_however_spelled() {
    let mut t = smol_server(config()).await;
    let port = reqwest::Url::parse(t.s().sandbox_url().unwrap()).unwrap().port().unwrap();
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(repo().join("tests/fixtures/florist.json")).unwrap()).unwrap();
    let http = reqwest::Client::new();
    for base in [
        format!("http://localhost:{port}/pay"),
        format!("http://127.1:{port}/pay"),
        format!("http://[::ffff:127.0.0.1]:{port}/pay"),
        format!("HTTP://127.0.0.1:{port}/pay"),
        format!("http://0.0.0.0:{port}/food"),
        "{sandbox}/pay".to_owned(),
        "file:///etc/passwd".to_owned(),
    ] {
        let mut m = manifest.clone();
        m["base_url"] = json!(base);
        let r = http.post(t.http("/v1/apps")).bearer_auth(FLORIST).body(m.to_string()).send().await.unwrap();
        assert_eq!(r.status(), 400, "{base} was accepted");
    }
    assert!(t.s().state.agent.tools().get("florist_bouquets").is_none());
    // The florist's own service (another port) is fine.
    let r = http.post(t.http("/v1/apps")).bearer_auth(FLORIST).body(manifest.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    t.stop().await;
}

/// Finding 9: wallets were seeded only into an empty table, so a user added
/// to `server.toml` after the first start had no wallet.
#[tokio::test(flavor = "multi_thread")]
async fn finding_09_a_user_added_after_the_first_start_gets_a_wallet() {
    let dir = tempfile::tempdir().unwrap();
    let sb = sandbox(dir.path()).await;
    let http = reqwest::Client::new();
    let pay = sb.url(Service::Pay);
    let r = http.post(format!("{pay}/_admin/wallets")).bearer_auth(sb.admin_credential()).json(&json!({"wallet_id": "demo", "currency": "CNY", "balance": 777}));
    assert_eq!(status(r).await, 200);
    sb.stop().await;
    // Restarted with one more wallet configured (as `errand serve` does for a new user).
    let mut cfg = SandboxConfig::new(dir.path(), crate::util::clock());
    cfg.pay.wallets.push(("carol".into(), "CNY".into(), 50_000));
    let sb = errand::sandbox::start(cfg).await.unwrap();
    let read = async |w: &str| -> Value {
        json_of(http.get(format!("{pay}/v1/wallets/{w}", pay = sb.url(Service::Pay))).bearer_auth(sb.wallet_credential(w))).await
    };
    assert_eq!(read("carol").await["balances"]["CNY"], 50_000);
    assert_eq!(read("demo").await["balances"]["CNY"], 777, "an existing wallet keeps its balance");
    sb.stop().await;
}

/// Finding 3: the engine thread sent each event with a blocking send into
/// the request's channel, so a client that stopped reading its stream could
/// freeze the model for every session once its buffer filled.
#[test]
fn finding_03_a_client_that_stops_reading_does_not_freeze_the_model() {
    use errand::engine::{Engine, EngineOptions, Event, Request};
    use errand::template::Message;
    errand::world::clock::deny_wall_clock();
    // A small buffer stands in for a long generation into a full socket.
    let e = Engine::start(&crate::util::model(crate::util::SMOL), EngineOptions { event_buffer: 16, ..Default::default() }).unwrap();
    let mut long = Request::chat(vec![Message::user("Count from 1 to 200, one number per line.")]);
    long.max_tokens = 400;
    let stuck = e.submit(long).unwrap(); // never read
    let mut other = Request::chat(vec![Message::user("What is the capital of France?")]);
    other.max_tokens = 8;
    let mut rx = e.submit(other).unwrap();
    let (tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut finished = false;
        while let Some(ev) = rx.blocking_recv() {
            if matches!(ev, Event::Done(_)) {
                finished = true;
            }
        }
        let _ = tx.send(finished);
    });
    let finished = done.recv_timeout(std::time::Duration::from_secs(120));
    assert_eq!(finished, Ok(true), "another session's reply did not finish behind a reader that stopped");
    drop(stuck);
}

/// Finding 7: one global cap of 256 sockets and none per user or for
/// sockets that never say `hello`, so one party could hold them all.
#[tokio::test(flavor = "multi_thread")]
async fn finding_07_one_party_cannot_hold_every_connection() {
    use crate::server_ws::BOB;
    let mut cfg = config();
    cfg.server.max_connections = 8; // at most 2 waiting for hello
    cfg.server.connections_per_user = 3;
    let mut t = smol_server(cfg).await;
    let mut held = Vec::new();
    for i in 0..3 {
        let (c, w) = Client::hello(&t.ws_url(), ALICE, None, 0).await;
        assert_eq!(w["type"], "welcome", "connection {i}: {w}");
        held.push(c);
    }
    let (_refused, e) = Client::hello(&t.ws_url(), ALICE, None, 0).await;
    assert_eq!(e["code"], "too_many_connections", "{e}");
    let (_bob, w) = Client::hello(&t.ws_url(), BOB, None, 0).await;
    assert_eq!(w["type"], "welcome", "another user still gets in: {w}");
    drop(_refused);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Strangers that never say hello hold at most their share.
    let _s1 = Client::connect(&t.ws_url()).await;
    let _s2 = Client::connect(&t.ws_url()).await;
    match tokio_tungstenite::connect_async(t.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503);
            assert!(resp.headers().contains_key("retry-after"));
        }
        other => panic!("a third stranger got a socket: {:?}", other.map(|(_, r)| r.status())),
    }
    // A client that names its user on the upgrade is no stranger.
    assert_eq!(upgrade_with(t.ws_url(), "authorization", &format!("Bearer {BOB}")).await, Ok(101));
    t.stop().await;
}

/// Finding 8: memory REST calls never passed the rate limiter, though each
/// one runs the embedding model.
#[tokio::test(flavor = "multi_thread")]
async fn finding_08_memory_calls_are_rate_limited() {
    let mut cfg = config();
    cfg.server.requests_per_minute = 3;
    let agent = AgentOptions { max_tokens: 16, constrain: false, ..Default::default() };
    let memory = errand::server::MemoryOptions { embedder: crate::util::minilm(), qdrant_url: None };
    let mut t = crate::server_ws::serve_in(tempfile::tempdir().unwrap(), Arc::new(smol().clone()), ToolSet::default(), cfg, agent, Some(memory)).await;
    let http = reqwest::Client::new();
    let mut codes = Vec::new();
    for i in 0..5 {
        let r = http.post(t.http("/v1/users/me/memories")).bearer_auth(ALICE).json(&json!({"text": format!("I like tea number {i}")})).send().await.unwrap();
        codes.push((r.status().as_u16(), r.headers().contains_key("retry-after")));
    }
    assert_eq!(codes.iter().filter(|(c, _)| *c == 201).count(), 3, "{codes:?}");
    assert!(codes.iter().any(|&(c, retry)| c == 429 && retry), "{codes:?}");
    // Reads count too.
    let r = http.get(t.http("/v1/users/me/memories")).bearer_auth(ALICE).send().await.unwrap();
    assert_eq!(r.status(), 429);
    t.stop().await;
}

/// Finding 8, second half: a client's tool schemas were compiled into a
/// grammar on the engine thread, where every session's next token waits
/// behind the compile. They are now compiled on a blocking thread before
/// the request is queued, and the engine thread compiles none of them.
#[tokio::test(flavor = "multi_thread")]
async fn finding_08_client_tool_schemas_are_compiled_off_the_engine_thread() {
    let engine = crate::util::own_smol();
    let agent = AgentOptions { max_tokens: 16, constrain: false, ..Default::default() };
    let mut t = serve(engine.clone(), ToolSet::default(), config(), agent).await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}]);
    let body = json!({"model": "errand", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools, "tool_choice": "required", "max_tokens": 80});
    let http = reqwest::Client::new();
    let v = json_of(http.post(t.http("/v1/chat/completions")).bearer_auth(ALICE).json(&body)).await;
    // The grammar was in force: `required` makes the reply a call.
    assert_eq!(v["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "get_weather", "{v}");
    assert_eq!(engine.stats().grammars_on_engine_thread, 0);
    // A schema no grammar can be built from is refused before anything is queued.
    let bad = json!({"model": "errand", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "(("}}}}}]});
    let r = http.post(t.http("/v1/chat/completions")).bearer_auth(ALICE).json(&bad).send().await.unwrap();
    assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());
    // The engine records a request just after its reply is out: wait for
    // the first one, then check that it stayed the only one.
    for _ in 0..100 {
        if engine.stats().requests >= 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(engine.stats().requests, 1);
    t.stop().await;
}

/// Finding 4: `orders.db` was written only when the hub saw the order event,
/// after the payment commit and a status request; a kill -9 in between lost
/// the paid order from `GET /v1/orders`. The agent now writes the order to
/// the book before paying (`agent::flow_tests::finding_04_…` checks the
/// order), and a restarted server asks about every order still awaiting
/// payment. Here: an order booked unpaid, paid behind the server's back (as
/// if it died right after the charge), and the server started again.
#[tokio::test(flavor = "multi_thread")]
async fn finding_04_an_order_paid_just_before_a_crash_is_in_the_book_after_a_restart() {
    use errand::server::orders::OrderRow;
    let tools = ToolSet::load_dir(&repo().join("tools")).unwrap();
    let agent = AgentOptions { max_tokens: 16, constrain: false, ..Default::default() };
    let t = crate::server_ws::serve_in(tempfile::tempdir().unwrap(), Arc::new(smol().clone()), tools.clone(), config(), agent.clone(), None).await;
    let sb = t.s().sandbox_url().unwrap().to_owned();
    let http = reqwest::Client::new();
    let order = kung_pao_order(&http, &format!("{sb}/food")).await;
    let (oid, otn) = (order["order_id"].as_str().unwrap().to_owned(), order["payment"]["out_trade_no"].as_str().unwrap().to_owned());
    // What the order book holds the moment before the payment.
    t.s()
        .state
        .store
        .upsert_order(&OrderRow {
            user: "alice".into(),
            session: "s-crashed".into(),
            app: "food".into(),
            tool: "food_order".into(),
            order_id: oid.clone(),
            status: order["status"].as_str().unwrap().into(),
            amount: order["payment"]["amount"].as_i64().unwrap(),
            currency: "CNY".into(),
            summary: "Kung Pao Chicken ×1".into(),
            payment_status: "awaiting_payment".into(),
            data: order.clone(),
        })
        .unwrap();
    // The charge commits; the server hears nothing more before it dies.
    let cred = sign::wallet_credential(t.s().sandbox_secret(), "alice");
    let r = http.post(format!("{sb}/pay/v1/trades/{otn}/pay")).bearer_auth(cred).json(&json!({"wallet_id": "alice", "method": "alipay"}));
    assert_eq!(status(r).await, 200);
    let TestServer { server, dir } = t;
    server.unwrap().shutdown().await;
    let t = crate::server_ws::serve_in(dir, Arc::new(smol().clone()), tools, config(), agent, None).await;
    let mut seen = Value::Null;
    for _ in 0..100 {
        seen = json_of(http.get(t.http("/v1/orders")).bearer_auth(ALICE)).await;
        if seen["orders"][0]["payment_status"] == "paid" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let orders = seen["orders"].as_array().unwrap_or_else(|| panic!("{seen}"));
    assert_eq!(orders.len(), 1, "{seen}");
    assert_eq!((orders[0]["order_id"].as_str(), orders[0]["payment_status"].as_str()), (Some(oid.as_str()), Some("paid")), "{seen}");
    let mut t = t;
    t.stop().await;
}

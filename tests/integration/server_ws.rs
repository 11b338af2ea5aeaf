//! `errand serve` over real sockets on ephemeral ports: the WebSocket
//! protocol (streaming, bad frames, auth, resume without repeats, user
//! isolation, limits, shutdown) with SmolLM2, REST, and manifest upload.
//! The confirm-and-pay flow with Qwen is in `server_qwen.rs`.

use crate::util::{repo, show, smol};
use errand::agent::AgentOptions;
use errand::memory::keys::Kind;
use errand::server::config::{AppEntry, ServerConfig, UserEntry};
use errand::server::{SandboxChoice, ServeOptions, Server};
use errand::sandbox::SandboxConfig;
use errand::tools::ToolSet;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

pub const ALICE: &str = "tok-alice-0123456789abcdef";
pub const BOB: &str = "tok-bob-0123456789abcdef00";
pub const FLORIST: &str = "key-florist-0123456789abcd";
pub const READER: &str = "key-reader-0123456789abcde";

pub fn config() -> ServerConfig {
    ServerConfig {
        users: vec![
            UserEntry { id: "alice".into(), token: ALICE.into(), wallet: None },
            UserEntry { id: "bob".into(), token: BOB.into(), wallet: None },
        ],
        apps: vec![
            AppEntry { id: "florist".into(), key: FLORIST.into(), scopes: vec!["apps:write".into(), "orders:read".into()] },
            AppEntry { id: "reader".into(), key: READER.into(), scopes: vec!["apps:read".into()] },
        ],
        ..Default::default()
    }
}

pub struct TestServer {
    pub server: Option<Server>,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub fn s(&self) -> &Server {
        self.server.as_ref().expect("running")
    }
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.s().addr)
    }
    pub fn http(&self, path: &str) -> String {
        format!("{}{path}", self.s().url)
    }
    pub async fn stop(&mut self) -> bool {
        self.server.take().expect("running").shutdown().await
    }
}

/// A server on 127.0.0.1:0 with the given engine, tools and config.
pub async fn serve(engine: Arc<errand::engine::Engine>, tools: ToolSet, cfg: ServerConfig, agent: AgentOptions) -> TestServer {
    serve_in(tempfile::tempdir().unwrap(), engine, tools, cfg, agent, None).await
}

/// The same, in a given folder (a restart reuses it), with memory when asked.
pub async fn serve_in(
    dir: tempfile::TempDir,
    engine: Arc<errand::engine::Engine>,
    tools: ToolSet,
    cfg: ServerConfig,
    agent: AgentOptions,
    memory: Option<errand::server::MemoryOptions>,
) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opts = ServeOptions {
        config: cfg,
        data_dir: dir.path().join("server"),
        tools,
        agent,
        sandbox: SandboxChoice::InProcess(SandboxConfig::new(dir.path().join("sandbox"), crate::util::clock())),
        order_poll: Duration::from_millis(200),
        memory,
        clock: crate::util::clock(),
    };
    let server = Server::start(engine, listener, opts).await.unwrap();
    TestServer { server: Some(server), dir }
}

/// SmolLM2, no tools: the protocol's mechanics without tool calling.
async fn smol_server(cfg: ServerConfig) -> TestServer {
    let agent = AgentOptions { max_tokens: 24, constrain: false, ..Default::default() };
    serve(Arc::new(smol().clone()), ToolSet::default(), cfg, agent).await
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A protocol client that records every frame it reads.
pub struct Client {
    pub ws: Socket,
    pub seen: Vec<Value>,
    /// The close code, once the server closed the socket.
    pub closed: Option<u16>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Client { ws, seen: Vec::new(), closed: None }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::Text(v.to_string().into())).await.unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    /// The next frame, or `None` on close or after `secs` of silence.
    pub async fn next(&mut self, secs: u64) -> Option<Value> {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(secs), self.ws.next()).await.ok()??;
            match m {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    self.seen.push(v.clone());
                    return Some(v);
                }
                Ok(Message::Close(c)) => {
                    self.closed = c.map(|c| u16::from(c.code));
                    return None;
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Reads until a frame of type `ty` (returned) or gives up after `secs`.
    pub async fn until(&mut self, ty: &str, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now()).as_secs().max(1);
            match self.next(left).await {
                Some(v) if v["type"] == ty => return v,
                Some(_) => {}
                None => panic!("no `{ty}` frame (closed: {:?}){}", self.closed, show("frames", &self.seen)),
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("no `{ty}` frame within {secs} s{}", show("frames", &self.seen));
            }
        }
    }

    pub async fn hello(url: &str, token: &str, session: Option<&str>, last_seq: u64) -> (Client, Value) {
        let mut c = Client::connect(url).await;
        c.send(json!({"type": "hello", "v": 1, "token": token, "session": session, "last_seq": last_seq})).await;
        let w = c.next(30).await.expect("an answer to hello");
        (c, w)
    }

    pub fn of_type(&self, ty: &str) -> Vec<&Value> {
        self.seen.iter().filter(|v| v["type"] == ty).collect()
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_streams_as_deltas_and_ends_with_usage() {
    let mut t = smol_server(config()).await;
    let (mut c, w) = Client::hello(&t.ws_url(), ALICE, None, 0).await;
    assert_eq!((w["type"].as_str(), w["user"].as_str(), w["resumed"].as_bool()), (Some("welcome"), Some("alice"), Some(false)), "{w}");
    assert!(w["session"].as_str().unwrap().starts_with("s-"));
    c.send(json!({"type": "message", "id": "m1", "text": "Say hello."})).await;
    let done = c.until("done", 120).await;
    let deltas: String = c.of_type("delta").iter().map(|d| d["text"].as_str().unwrap()).collect();
    assert!(c.of_type("delta").len() >= 2 && !deltas.trim().is_empty(), "{}", show("frames", &c.seen));
    assert!(done["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{done}");
    assert_eq!(done["reply_to"], "m1");
    // Every session frame is numbered 1, 2, 3, … in order.
    let seqs: Vec<u64> = c.seen.iter().filter_map(|v| v["seq"].as_u64()).filter(|s| *s > 0).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(c.of_type("ack")[0]["duplicate"], false);
    assert_eq!(c.of_type("user")[0]["text"], "Say hello.");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_frames_get_errors_and_the_connection_stays_usable() {
    let mut t = smol_server(config()).await;
    let mut c = Client::connect(&t.ws_url()).await;
    // Before hello: a clear error, not a dropped socket.
    c.send(json!({"type": "message", "id": "m0", "text": "hi"})).await;
    assert_eq!(c.next(10).await.unwrap()["code"], "no_hello");
    c.send(json!({"type": "hello", "v": 1, "token": ALICE})).await;
    assert_eq!(c.next(10).await.unwrap()["type"], "welcome");
    let cases: Vec<(Message, &str, &str)> = vec![
        (Message::Text("this is not json".into()), "bad_frame", "JSON object"),
        (Message::Text("{\"type\": \"teleport\"}".into()), "bad_frame", "teleport"),
        (Message::Text("{\"type\": \"message\", \"id\": \"m1\"}".into()), "bad_frame", "text"),
        (Message::Text("[1, 2, 3]".into()), "bad_frame", "protocol frame"),
        (Message::Binary(vec![0u8, 159, 146, 150].into()), "bad_frame", "binary"),
        (Message::Text(json!({"type": "message", "id": "big", "text": "x".repeat(20_000)}).to_string().into()), "too_large", "16384"),
        (Message::Text(json!({"type": "message", "id": "", "text": "hi"}).to_string().into()), "bad_frame", "1–64"),
        (Message::Text(json!({"type": "select", "id": "s1", "card": "c99", "option": "x"}).to_string().into()), "not_found", "c99"),
        (Message::Text(json!({"type": "hello", "v": 2, "token": ALICE}).to_string().into()), "unsupported_version", "version 1"),
    ];
    for (m, code, words) in cases {
        c.send_raw(m).await;
        let e = c.next(10).await.unwrap_or_else(|| panic!("socket closed after a bad frame{}", show("frames", &c.seen)));
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some(code)), "{e}");
        assert!(e["message"].as_str().unwrap().contains(words), "{e}");
    }
    c.send(json!({"type": "ping"})).await;
    assert_eq!(c.next(10).await.unwrap()["type"], "pong");
    c.send(json!({"type": "message", "id": "m2", "text": "Hi!"})).await;
    c.until("done", 120).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_are_refused_on_every_interface() {
    let mut t = smol_server(config()).await;
    let (mut c, e) = Client::hello(&t.ws_url(), "tok-mallory-0123456789abc", None, 0).await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("unauthorized")), "{e}");
    assert!(c.next(10).await.is_none());
    assert_eq!(c.closed, Some(4401));
    // An app key is not a user: it cannot chat.
    let (_, e) = Client::hello(&t.ws_url(), FLORIST, None, 0).await;
    assert_eq!(e["code"], "unauthorized", "{e}");

    let h = http();
    for path in ["/v1/sessions", "/v1/orders", "/v1/models", "/v1/apps"] {
        let r = h.get(t.http(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{path}: {body}");
        let r = h.get(t.http(path)).bearer_auth("wrong-token-0123456789").send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = h.post(t.http("/v1/chat/completions")).json(&json!({"model": "x", "messages": []})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // Scopes: a user cannot register apps, an app without apps:write neither.
    let manifest = std::fs::read_to_string(repo().join("tests/fixtures/florist.json")).unwrap();
    let r = h.post(t.http("/v1/apps")).bearer_auth(ALICE).body(manifest.clone()).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = h.post(t.http("/v1/apps")).bearer_auth(READER).body(manifest).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("apps:write"));
    // An app key reads the app list only with a scope for it.
    let r = h.get(t.http("/v1/apps")).bearer_auth(READER).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // An app key cannot read a user's sessions.
    let r = h.get(t.http("/v1/sessions")).bearer_auth(FLORIST).send().await.unwrap();
    assert_eq!(r.status(), 403);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_user_cannot_reach_another_users_session() {
    let mut t = smol_server(config()).await;
    let (mut a, w) = Client::hello(&t.ws_url(), ALICE, None, 0).await;
    let sid = w["session"].as_str().unwrap().to_owned();
    a.send(json!({"type": "message", "id": "m1", "text": "My secret is 4711."})).await;
    a.until("done", 120).await;

    // Bob knows the id, and still sees nothing.
    let (mut b, e) = Client::hello(&t.ws_url(), BOB, Some(&sid), 0).await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("not_found")), "{e}");
    b.send(json!({"type": "resume", "session": sid, "last_seq": 0})).await;
    let e = b.next(10).await.unwrap();
    assert_eq!(e["code"], "not_found", "{e}");
    b.send(json!({"type": "message", "id": "b1", "text": "What is the secret?"})).await;
    assert_eq!(b.next(10).await.unwrap()["code"], "not_found");
    let h = http();
    for path in [format!("/v1/sessions/{sid}"), format!("/v1/sessions/{sid}/history")] {
        let r = h.get(t.http(&path)).bearer_auth(BOB).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    let r = h.delete(t.http(&format!("/v1/sessions/{sid}"))).bearer_auth(BOB).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let list: Value = h.get(t.http("/v1/sessions")).bearer_auth(BOB).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["sessions"].as_array().unwrap().len(), 0, "{list}");
    // Alice reads her own history, secret included.
    let hist: Value = h.get(t.http(&format!("/v1/sessions/{sid}/history"))).bearer_auth(ALICE).send().await.unwrap().json().await.unwrap();
    assert!(hist.to_string().contains("4711"));
    let list: Value = h.get(t.http("/v1/sessions")).bearer_auth(ALICE).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["sessions"][0]["id"], sid.as_str());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnect_resumes_and_a_resent_input_runs_once() {
    // An engine of its own: the check below counts its requests, and other
    // tests' requests to the shared engine would be counted too.
    let agent = AgentOptions { max_tokens: 24, constrain: false, ..Default::default() };
    let mut t = serve(crate::util::own_smol(), ToolSet::default(), config(), agent).await;
    let engine = t.s().state.engine.clone();
    let (mut c, w) = Client::hello(&t.ws_url(), ALICE, None, 0).await;
    let sid = w["session"].as_str().unwrap().to_owned();
    c.send(json!({"type": "message", "id": "m1", "text": "Tell me about tea."})).await;
    // Drop the connection as soon as the reply starts streaming.
    c.until("delta", 120).await;
    let last = c.seen.iter().filter_map(|v| v["seq"].as_u64()).max().unwrap();
    drop(c);

    let (mut c, w) = Client::hello(&t.ws_url(), ALICE, Some(&sid), last).await;
    assert_eq!((w["type"].as_str(), w["resumed"].as_bool()), (Some("welcome"), Some(true)), "{w}");
    // The missed frames arrive, numbered right after what we had.
    let done = c.until("done", 120).await;
    let seqs: Vec<u64> = c.seen.iter().filter(|v| v["type"] != "welcome").filter_map(|v| v["seq"].as_u64()).collect();
    assert_eq!(seqs.first(), Some(&(last + 1)), "{}", show("frames", &c.seen));
    assert_eq!(seqs, (last + 1..=last + seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(done["reply_to"], "m1");
    // m1 is over, however many model rounds its turn took (SmolLM2 may
    // call a tool); from here on nothing may reach the model.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = engine.stats().requests;

    // The client did not see `done` before the drop, so it sends m1 again.
    c.send(json!({"type": "message", "id": "m1", "text": "Tell me about tea."})).await;
    let ack = c.until("ack", 10).await;
    assert_eq!(ack["duplicate"], true, "{ack}");
    c.until("done", 10).await; // m1's frames, sent again
    tokio::time::sleep(Duration::from_millis(300)).await;
    let turns: Value = http().get(t.http(&format!("/v1/sessions/{sid}"))).bearer_auth(ALICE).send().await.unwrap().json().await.unwrap();
    assert_eq!(turns["turns"], 1, "{turns}");
    assert_eq!(engine.stats().requests, before, "the repeat ran the model again");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_answer_with_errors_not_hangs() {
    // Rate: two inputs a minute.
    let mut cfg = config();
    cfg.server.requests_per_minute = 2;
    cfg.server.sessions_per_user = 1;
    let mut t = smol_server(cfg).await;
    let (mut c, _) = Client::hello(&t.ws_url(), ALICE, None, 0).await;
    // Sent together, so the bucket cannot refill in between on a slow machine.
    for id in ["m1", "m2", "m3"] {
        c.send(json!({"type": "message", "id": id, "text": "Hi"})).await;
    }
    let e = c.until("error", 10).await;
    assert_eq!((e["code"].as_str(), e["id"].as_str()), (Some("rate_limited"), Some("m3")), "{e}");
    // One session per user: a second new session is not refused (that
    // locked people out); it takes the place of the least recently used.
    let (_, w) = Client::hello(&t.ws_url(), ALICE, None, 0).await;
    assert_eq!(w["type"], "welcome", "{w}");
    let list: Value = http().get(t.http("/v1/sessions")).bearer_auth(ALICE).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = list["sessions"].as_array().map(|a| a.iter().filter_map(|s| s["id"].as_str()).collect()).unwrap_or_default();
    assert_eq!(ids, vec![w["session"].as_str().unwrap()], "{list}");
    t.stop().await;

    // Busy: with no room in the engine queue every model input is refused at once.
    let mut cfg = config();
    cfg.server.queue_limit = 0;
    let mut t = smol_server(cfg).await;
    let (mut c, _) = Client::hello(&t.ws_url(), BOB, None, 0).await;
    c.send(json!({"type": "message", "id": "m1", "text": "Hi"})).await;
    let e = c.until("error", 10).await;
    assert_eq!(e["code"], "busy", "{e}");
    c.send(json!({"type": "ping"})).await;
    c.until("pong", 10).await;
    let r = http()
        .post(t.http("/v1/chat/completions"))
        .bearer_auth(BOB)
        .json(&json!({"model": t.s().state.model_id, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_finishes_the_reply_then_says_bye() {
    let mut t = smol_server(config()).await;
    let (mut c, _) = Client::hello(&t.ws_url(), ALICE, None, 0).await;
    c.send(json!({"type": "message", "id": "m1", "text": "Write a long story about a cat."})).await;
    c.until("delta", 120).await;
    let addr = t.s().addr;
    let server = t.server.take().unwrap();
    let stopping = tokio::spawn(server.shutdown());
    c.until("done", 120).await;
    c.until("bye", 30).await;
    assert!(stopping.await.unwrap(), "everything finished within the drain time");
    // The port is closed now.
    assert!(tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mini_program_registers_its_manifest_at_run_time() {
    let mut t = smol_server(config()).await;
    let h = http();
    let manifest = std::fs::read_to_string(repo().join("tests/fixtures/florist.json")).unwrap();
    let r = h.post(t.http("/v1/apps")).bearer_auth(FLORIST).body(manifest.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let apps: Value = h.get(t.http("/v1/apps")).bearer_auth(ALICE).send().await.unwrap().json().await.unwrap();
    let florist = apps["apps"].as_array().unwrap().iter().find(|a| a["app"] == "florist").cloned();
    assert_eq!(florist.map(|a| a["tools"].clone()), Some(json!(["florist_bouquets"])), "{apps}");
    assert!(t.s().state.agent.tools().get("florist_bouquets").is_some());

    // Invalid manifests are refused with the reason, and change nothing.
    let mut bad: Value = serde_json::from_str(&manifest).unwrap();
    bad["tools"][0]["parameters"] = json!({"type": "array"});
    let r = h.post(t.http("/v1/apps")).bearer_auth(FLORIST).body(bad.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("object"), "{body}");
    let r = h.post(t.http("/v1/apps")).bearer_auth(FLORIST).body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    // An uploaded tool may not call the built-in mini-programs (payments live there).
    let mut inside: Value = serde_json::from_str(&manifest).unwrap();
    inside["base_url"] = json!("{sandbox}/pay");
    let r = h.post(t.http("/v1/apps")).bearer_auth(FLORIST).body(inside.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 400);
    // A key may only register its own app.
    let mut other: Value = serde_json::from_str(&manifest).unwrap();
    other["app"] = json!("food");
    let r = h.post(t.http("/v1/apps")).bearer_auth(FLORIST).body(other.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(t.s().state.agent.tools().get("florist_bouquets").is_some());
    assert!(t.s().state.agent.tools().get("food_search").is_none(), "smol server has no built-in tools");

    // It survives a restart of the server (same data folder).
    let data = t.dir.path().join("server");
    assert!(data.join("apps/florist.json").exists());
    let r = h.delete(t.http("/v1/apps/florist")).bearer_auth(FLORIST).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert!(t.s().state.agent.tools().get("florist_bouquets").is_none());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics() {
    let mut t = smol_server(config()).await;
    let h = http();
    assert_eq!(h.get(t.http("/healthz")).send().await.unwrap().status(), 200);
    let r: Value = h.get(t.http("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["ready"], true);
    let (mut c, _) = Client::hello(&t.ws_url(), ALICE, None, 0).await;
    c.send(json!({"type": "message", "id": "m1", "text": "Hi"})).await;
    c.until("done", 120).await;
    let m = h.get(t.http("/metrics")).send().await.unwrap();
    assert!(m.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = m.text().await.unwrap();
    for needle in [
        "errand_ws_connections 1",
        "errand_turns_total{outcome=\"ok\"} 1",
        "errand_ttft_seconds_count 1",
        "errand_engine_queue_depth 0",
        "# TYPE errand_kv_cache_bytes gauge",
        "errand_http_requests_total{route=\"/readyz\",status=\"200\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle}\n{text}");
    }
    let page = h.get(t.http("/")).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("/sdk.js"));
    assert!(h.get(t.http("/widget.js")).send().await.unwrap().text().await.unwrap().contains("ErrandWidget"));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_session_takes_no_more_input() {
    let mut t = smol_server(config()).await;
    let (mut c, w) = Client::hello(&t.ws_url(), ALICE, None, 0).await;
    let sid = w["session"].as_str().unwrap().to_owned();
    let r = http().delete(t.http(&format!("/v1/sessions/{sid}"))).bearer_auth(ALICE).send().await.unwrap();
    assert_eq!(r.status(), 204);
    // The attached socket is dropped, and the session cannot be resumed or used.
    assert!(c.next(10).await.is_none());
    let (mut c, e) = Client::hello(&t.ws_url(), ALICE, Some(&sid), 0).await;
    assert_eq!(e["code"], "not_found", "{e}");
    c.send(json!({"type": "message", "id": "m1", "text": "hi"})).await;
    assert_eq!(c.next(10).await.unwrap()["code"], "not_found");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_socket_that_never_says_hello_is_closed() {
    let mut t = smol_server(config()).await;
    let mut c = Client::connect(&t.ws_url()).await;
    let e = c.next(20).await.expect("an error before the close");
    assert_eq!(e["code"], "no_hello", "{e}");
    assert!(c.next(5).await.is_none());
    assert_eq!(c.closed, Some(4401));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_the_reply_being_written() {
    let agent = AgentOptions { max_tokens: 400, constrain: false, ..Default::default() };
    let mut t = serve(Arc::new(smol().clone()), ToolSet::default(), config(), agent).await;
    let (mut c, _) = Client::hello(&t.ws_url(), ALICE, None, 0).await;
    c.send(json!({"type": "message", "id": "m1", "text": "Write a very long story about a cat who travels the world."})).await;
    c.until("delta", 120).await;
    c.send(json!({"type": "cancel"})).await;
    let done = c.until("done", 60).await;
    let notices: Vec<&str> = c.of_type("notice").iter().filter_map(|n| n["text"].as_str()).collect();
    assert!(notices.iter().any(|n| n.starts_with("Stopped")), "{}", show("frames", &c.seen));
    assert_eq!(done["reply_to"], "m1");
    let deltas = c.of_type("delta").len();
    assert!(deltas < 400, "stopped before max_tokens, got {deltas} deltas");
    // The session goes on normally afterwards.
    c.send(json!({"type": "message", "id": "m2", "text": "Hi"})).await;
    let d = c.until("done", 120).await;
    assert_eq!(d["reply_to"], "m2");
    t.stop().await;
}

/// A SmolLM2 server with memory on the embedded store, in `dir`.
async fn memory_server(dir: tempfile::TempDir) -> TestServer {
    let agent = AgentOptions { max_tokens: 24, constrain: false, ..Default::default() };
    let tools = ToolSet::load_dir(&crate::util::repo().join("tools")).unwrap();
    let memory = errand::server::MemoryOptions { embedder: crate::util::minilm(), qdrant_url: None };
    // Memory calls count against the rate limit; these tests poll and call
    // far more often than a person (the limit has its own regression test).
    let mut cfg = config();
    cfg.server.requests_per_minute = 10_000;
    let t = serve_in(dir, Arc::new(smol().clone()), tools, cfg, agent, Some(memory)).await;
    // The catalog is indexed in the background; the feed says 503 until then.
    for _ in 0..600 {
        let r = http().get(t.http("/v1/users/me/feed")).bearer_auth(ALICE).send().await.unwrap();
        if r.status() != 503 {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the catalog was never indexed");
}

#[tokio::test(flavor = "multi_thread")]
async fn memories_over_rest_are_per_user_and_survive_a_restart() {
    let mut t = memory_server(tempfile::tempdir().unwrap()).await;
    let c = http();
    let r = c.post(t.http("/v1/users/me/memories")).bearer_auth(ALICE).json(&json!({"text": "I'm vegetarian"})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let m: Value = r.json().await.unwrap();
    assert_eq!((m["kind"].as_str(), m["user"].as_str()), (Some("diet"), Some("alice")));
    for (body, why) in [(json!({"text": ""}), "empty"), (json!({"txt": "x"}), "unknown field"), (json!({"text": "x", "kind": "order"}), "orders come from orders")] {
        let r = c.post(t.http("/v1/users/alice/memories")).bearer_auth(ALICE).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 400, "{why}");
        let e: Value = r.json().await.unwrap();
        assert!(e["error"]["message"].as_str().is_some_and(|s| !s.is_empty()), "{why}: {e}");
    }
    // Bob cannot read, forget or rank by Alice's memories: her user is "not found" to him.
    for path in ["/v1/users/alice/memories", "/v1/users/alice/feed"] {
        assert_eq!(c.get(t.http(path)).bearer_auth(BOB).send().await.unwrap().status(), 404, "{path}");
    }
    let id = m["id"].as_u64().unwrap();
    assert_eq!(c.delete(t.http(&format!("/v1/users/alice/memories/{id}"))).bearer_auth(BOB).send().await.unwrap().status(), 404);
    assert_eq!(c.delete(t.http(&format!("/v1/users/bob/memories/{id}"))).bearer_auth(BOB).send().await.unwrap().status(), 404, "not Bob's memory");
    let bob: Value = c.get(t.http("/v1/users/me/memories")).bearer_auth(BOB).send().await.unwrap().json().await.unwrap();
    assert_eq!(bob["memories"], json!([]));
    assert_eq!(c.get(t.http("/v1/users/me/memories")).send().await.unwrap().status(), 401);

    // The feed: Alice's diet holds; bad parameters get a clear 400.
    let f: Value = c.get(t.http("/v1/users/me/feed?lat=31.2323&lon=121.4754&time=19:00&kinds=restaurant&limit=5")).bearer_auth(ALICE).send().await.unwrap().json().await.unwrap();
    let items = f["items"].as_array().unwrap();
    // Shanghai has two places that fit the diet: fewer items, never a wrong one.
    assert!(!items.is_empty() && items.len() <= 5, "{f}");
    assert!(items.iter().all(|i| i["tags"].as_array().unwrap().contains(&json!("vegetarian"))), "{f}");
    assert!(items.iter().all(|i| i["reason"].as_str().is_some_and(|r| !r.is_empty())), "{f}");
    for q in ["lat=31.2", "lat=100&lon=0", "time=25:00", "kinds=spaceship", "limit=0", "lang=fr", "radius=3"] {
        let r = c.get(t.http(&format!("/v1/users/me/feed?{q}"))).bearer_auth(ALICE).send().await.unwrap();
        assert_eq!(r.status(), 400, "{q}");
    }

    // A restart on the same data keeps the memory.
    assert!(t.stop().await);
    let dir = std::mem::replace(&mut t.dir, tempfile::tempdir().unwrap());
    let t = memory_server(dir).await;
    let list: Value = c.get(t.http("/v1/users/me/memories")).bearer_auth(ALICE).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["memories"][0]["id"].as_u64(), Some(id), "{list}");
    let r: Value = c.delete(t.http("/v1/users/me/memories")).bearer_auth(ALICE).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["deleted"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn remember_recommend_forget_and_my_usual_over_the_socket() {
    let t = memory_server(tempfile::tempdir().unwrap()).await;
    let feed = t.s().state.feed.clone().unwrap();
    // Starting state: Alice ordered the same dinner twice.
    let args = json!({"restaurant_id": "sh01", "items": [{"dish_id": "sh01-mapo-tofu", "quantity": 1}], "address": "88 Nanjing Road"}).as_object().unwrap().clone();
    for _ in 0..2 {
        let o = errand::memory::OrderMemory::new("food", "food_order", args.clone(), "Mapo Tofu ×1 from sh01", 3300, "CNY");
        feed.memory().remember_order("alice", o, feed.tags_for(&args)).await.unwrap();
    }
    let (mut c, _) = Client::hello(&t.ws_url(), ALICE, None, 0).await;
    c.send(json!({"type": "message", "id": "m1", "text": "Remember I'm vegetarian"})).await;
    let n = c.until("notice", 60).await;
    assert!(n["text"].as_str().unwrap().contains("I'll remember: I'm vegetarian"), "{n}");
    c.until("done", 30).await;

    c.send(json!({"type": "message", "id": "m2", "text": "Recommend dinner"})).await;
    let card = c.until("card", 60).await;
    assert_eq!(card["card"]["kind"].as_str().or(card["kind"].as_str()), Some("recommendations"), "{card}");
    let data = if card["card"].is_object() { &card["card"]["data"] } else { &card["data"] };
    let items = data["items"].as_array().unwrap();
    assert!(!items.is_empty());
    assert!(items.iter().all(|i| i["tags"].as_array().unwrap().contains(&json!("vegetarian"))), "{card}");
    c.until("done", 30).await;

    c.send(json!({"type": "message", "id": "m3", "text": "forget that"})).await;
    let n = c.until("notice", 60).await;
    assert!(n["text"].as_str().unwrap().starts_with("Forgotten: I'm vegetarian"), "{n}");
    c.until("done", 30).await;
    assert!(feed.memory().list("alice").await.unwrap().iter().all(|m| m.kind == Kind::Order));

    // "My usual": the twice-ordered dinner, quoted and confirmed like any order.
    c.send(json!({"type": "message", "id": "m4", "text": "order my usual"})).await;
    let conf = c.until("confirmation", 60).await;
    assert_eq!(conf["tool"].as_str().or(conf["confirmation"]["tool"].as_str()), Some("food_order"), "{conf}");
    let token = conf["token"].as_str().or(conf["confirmation"]["token"].as_str()).unwrap().to_owned();
    c.until("done", 30).await;
    c.send(json!({"type": "confirm", "id": "c1", "token": token})).await;
    let p = c.until("payment", 60).await;
    assert_eq!(p["status"].as_str().or(p["payment"]["status"].as_str()), Some("paid"), "{p}");
    c.until("done", 30).await;
    let orders = feed.memory().usual("alice", Some("food")).await.unwrap().unwrap();
    assert_eq!(orders.times, 3, "the new order is remembered too");
}

/// Issue 23, persistence: sessions, their frame logs and the inputs they
/// already ran outlive the server. After a restart the client resumes from
/// its `seq`, an input the old server accepted but never finished is
/// answered `interrupted` (and may be sent again), and a re-sent finished
/// input still runs nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_resumes_after_the_server_restarts() {
    use errand::server::store::{SqliteStore, Store, StoredFrame};
    let agent = AgentOptions { max_tokens: 12, constrain: false, ..Default::default() };
    let engine = Arc::new(smol().clone());
    let t = serve_in(tempfile::tempdir().unwrap(), engine.clone(), ToolSet::default(), config(), agent.clone(), None).await;
    let (mut c, w) = Client::hello(&t.ws_url(), ALICE, None, 0).await;
    let sid = w["session"].as_str().unwrap().to_owned();
    c.send(json!({"type": "message", "id": "m1", "text": "Say hello."})).await;
    c.until("done", 60).await;
    let seq = c.seen.last().unwrap()["seq"].as_u64().unwrap();
    let before: Vec<Value> = c.seen.iter().filter(|f| f["seq"].as_u64().is_some_and(|s| s > 0)).cloned().collect();
    drop(c);
    let TestServer { server, dir } = t;
    server.unwrap().shutdown().await;
    // As a kill -9 would leave it: an input accepted, its reply cut short.
    {
        let st = SqliteStore::open(&dir.path().join("server"), crate::util::clock()).unwrap();
        for (i, f) in [json!({"type": "ack", "id": "m2", "duplicate": false}), json!({"type": "user", "text": "And again?"}), json!({"type": "delta", "text": "Hel"})].iter().enumerate() {
            let mut f = f.clone();
            f["seq"] = json!(seq + 1 + i as u64);
            f["reply_to"] = json!("m2");
            st.append_frame(&sid, &StoredFrame { seq: seq + 1 + i as u64, reply_to: Some("m2".into()), text: f.to_string() }).unwrap();
        }
    }
    let t = serve_in(dir, engine, ToolSet::default(), config(), agent, None).await;
    // Someone else cannot see it; its owner resumes it from the start.
    let (_, w) = Client::hello(&t.ws_url(), BOB, Some(&sid), 0).await;
    assert_eq!(w["code"], "not_found", "{w}");
    let (mut c, w) = Client::hello(&t.ws_url(), ALICE, Some(&sid), 0).await;
    assert_eq!((w["type"].as_str(), w["resumed"].as_bool(), w["seq"].as_u64()), (Some("welcome"), Some(true), Some(seq + 4)), "{w}");
    let err = c.until("error", 10).await;
    assert_eq!((err["code"].as_str(), err["id"].as_str(), err["seq"].as_u64()), (Some("interrupted"), Some("m2"), Some(seq + 4)), "{err}");
    // The replay holds the old server's frames (deltas joined into one).
    let replayed: Vec<&Value> = c.seen.iter().filter(|f| f["reply_to"] == "m1").collect();
    let old_text: String = before.iter().filter(|f| f["type"] == "delta").filter_map(|f| f["text"].as_str()).collect();
    let new_text: String = replayed.iter().filter(|f| f["type"] == "delta").filter_map(|f| f["text"].as_str()).collect();
    assert_eq!(new_text, old_text);
    assert!(replayed.iter().any(|f| f["type"] == "done"), "{replayed:?}");
    // Down again before the client sends m2 again: it may still be sent.
    drop(c);
    let TestServer { server, dir } = t;
    server.unwrap().shutdown().await;
    let mut t = serve_in(dir, Arc::new(smol().clone()), ToolSet::default(), config(), AgentOptions { max_tokens: 12, constrain: false, ..Default::default() }, None).await;
    let (mut c, w) = Client::hello(&t.ws_url(), ALICE, Some(&sid), seq + 4).await;
    assert_eq!((w["resumed"].as_bool(), w["seq"].as_u64()), (Some(true), Some(seq + 4)), "{w}");
    // m1 ran already: resent, it runs nothing. m2 never finished: it runs.
    c.send(json!({"type": "message", "id": "m1", "text": "Say hello."})).await;
    let ack = c.until("ack", 10).await;
    assert_eq!(ack["duplicate"], true, "{ack}");
    c.send(json!({"type": "message", "id": "m2", "text": "And again?"})).await;
    let ack = loop {
        let a = c.until("ack", 10).await;
        if a["id"] == "m2" {
            break a;
        }
    };
    assert_eq!((ack["duplicate"].as_bool(), ack["seq"].as_u64()), (Some(false), Some(seq + 5)), "{ack}");
    let done = c.until("done", 60).await;
    assert_eq!(done["reply_to"], "m2");
    // The session is listed with its turns, and deleting it deletes it on disk too.
    let list: Value = http().get(t.http("/v1/sessions")).bearer_auth(ALICE).send().await.unwrap().json().await.unwrap();
    assert!(list.to_string().contains(&sid), "{list}");
    let r = http().delete(t.http(&format!("/v1/sessions/{sid}"))).bearer_auth(ALICE).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let st = SqliteStore::open(&t.dir.path().join("server"), crate::util::clock()).unwrap();
    assert!(st.sessions().unwrap().iter().all(|s| s.row.id != sid));
    t.stop().await;
}

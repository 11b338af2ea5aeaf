//! The chaos campaign (issue 23): `ERRAND_CHAOS_FLOWS` food orders, each
//! one a person's whole flow against `errand serve` and `errand sandbox`
//! running as separate processes (Qwen2.5-Coder-0.5B, memory off):
//! "order one kung pao chicken near People's Square, delivered to 200
//! Renmin Road" → restaurant card → tap the first → confirmation → Confirm
//! → payment.
//!
//! In every flow, right after the client has read a random number of frames
//! (1 to `ERRAND_CHAOS_FRAMES`, default 24, about a whole flow's worth:
//! so the kill lands while a reply streams, a tool runs, a confirmation is
//! written or a payment is under way), the server, the sandbox or both get
//! SIGKILL and are started again on the same data. The client behaves as the SDK does: it
//! reconnects with its session and last `seq`, sends again the input it was
//! waiting on (same id), confirms an open confirmation, taps the card, and
//! starts over only when the assistant lost the task.
//!
//! Then, after one more (clean) restart so the server reconciles its order
//! book, everything is checked against everything else:
//! - every flow ended with exactly one paid order (none lost, none stuck);
//! - the payment service's trades: one SUCCESS per flow, each charged once
//!   in the wallet's ledger, and the balance equals the start minus those;
//! - the food merchant's table: one order per flow, each paid (an unpaid
//!   extra order is a duplicate);
//! - the server's order book: every paid order, as paid, in its flow's
//!   session, and nothing else.
//!
//! CI runs 3 flows; `scripts/chaos.sh` runs 100.

use crate::util::{model, now_ms, QWEN};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "tok-chaos-0123456789abcdef";
const SECRET: &str = "chaos-campaign-secret-0123456789";
const START_BALANCE: i64 = 100_000_000;
const ASK: &str = "Order one kung pao chicken near People's Square, delivered to 200 Renmin Road.";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The two processes, started and killed on demand.
struct Procs {
    dir: PathBuf,
    model: PathBuf,
    sb_port: u16,
    srv_port: u16,
    sandbox: Option<Child>,
    server: Option<Child>,
    starts: usize,
}

impl Procs {
    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{name}.log"))).unwrap()
    }

    fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_errand"));
        c.env("ERRAND_HOME", &self.dir).env("ERRAND_SANDBOX_SECRET", SECRET).arg("--now").arg(errand::world::clock::format_instant(now_ms()));
        c.stdin(Stdio::null());
        c
    }

    fn start_sandbox(&mut self) {
        let (out, err) = (self.log("sandbox"), self.log("sandbox"));
        let child = self
            .command()
            .args(["sandbox", "--port", &self.sb_port.to_string(), "--secret", SECRET, "--data"])
            .arg(self.dir.join("sandbox"))
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        self.sandbox = Some(child);
        self.starts += 1;
    }

    fn start_server(&mut self) {
        let (out, err) = (self.log("server"), self.log("server"));
        let child = self
            .command()
            .arg("serve")
            .arg("-m")
            .arg(&self.model)
            .args(["--addr", &format!("127.0.0.1:{}", self.srv_port), "--sandbox-url", &format!("http://127.0.0.1:{}", self.sb_port), "--no-memory", "--config"])
            .arg(self.dir.join("server.toml"))
            .arg("--data")
            .arg(self.dir.join("server"))
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        self.server = Some(child);
        self.starts += 1;
    }

    /// SIGKILL: no shutdown code runs.
    fn kill(child: &mut Option<Child>) {
        if let Some(mut c) = child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn sandbox_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.sb_port)
    }

    fn server_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.srv_port)
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        Self::kill(&mut self.server);
        Self::kill(&mut self.sandbox);
    }
}

async fn wait_ready(url: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(url).timeout(Duration::from_secs(2)).send().await {
            if r.status().as_u16() < 500 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} did not come up in 120 s");
}

async fn start_all(p: &Arc<Mutex<Procs>>) {
    let (sb, srv) = {
        let mut p = p.lock().unwrap();
        if p.sandbox.is_none() {
            p.start_sandbox();
        }
        if p.server.is_none() {
            p.start_server();
        }
        (p.sandbox_url(), p.server_url())
    };
    wait_ready(&format!("{sb}/pay/v1/trades/none")).await;
    wait_ready(&format!("{srv}/readyz")).await;
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One person's order, driven to its payment through any number of kills.
#[derive(Default, Debug)]
struct FlowResult {
    session: String,
    paid: BTreeSet<String>,
    inputs: usize,
    reconnects: usize,
    restarts_of_task: usize,
    secs: f64,
}

async fn connect(url: &str, session: Option<&str>, last_seq: u64) -> Option<(Socket, Value)> {
    use futures_util::{SinkExt, StreamExt};
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.ok()?;
    let hello = json!({"type": "hello", "v": 1, "token": TOKEN, "session": session, "last_seq": last_seq});
    ws.send(tokio_tungstenite::tungstenite::Message::Text(hello.to_string().into())).await.ok()?;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.ok()??.ok()?;
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            return Some((ws, serde_json::from_str(t.as_str()).ok()?));
        }
    }
}

/// Drives flow `i`; after its `kill_after`-th frame it fires `kill`.
async fn run_flow(i: usize, ws_url: &str, kill_after: usize, kill: tokio::sync::oneshot::Sender<()>) -> FlowResult {
    let mut kill = Some(kill);
    let mut frames = 0usize;
    use futures_util::{SinkExt, StreamExt};
    let started = Instant::now();
    let mut r = FlowResult::default();
    let mut session: Option<String> = None;
    let mut last_seq = 0u64;
    let mut socket: Option<Socket> = None;
    // The input in flight: (id, frame).
    let mut waiting: Option<(String, Value)> = None;
    let mut token: Option<String> = None;
    let mut tap: Option<String> = None;
    let mut n = 0usize;
    let deadline = Instant::now() + Duration::from_secs(600);
    while r.paid.is_empty() {
        assert!(Instant::now() < deadline, "flow {i} did not finish in 10 minutes: {r:?}");
        assert!(r.inputs < 40, "flow {i} took 40 inputs: {r:?}");
        let ws = match socket.as_mut() {
            Some(ws) => ws,
            None => {
                match connect(ws_url, session.as_deref(), last_seq).await {
                    Some((mut ws, w)) if w["type"] == "welcome" => {
                        session = w["session"].as_str().map(str::to_owned);
                        if let Some(t) = w["pending"]["token"].as_str() {
                            token = Some(t.to_owned());
                        }
                        // Whatever was in flight is sent again under its id:
                        // run once if it ran, run now if it never did.
                        if let Some((_, f)) = &waiting {
                            if ws.send(tokio_tungstenite::tungstenite::Message::Text(f.to_string().into())).await.is_err() {
                                continue;
                            }
                        }
                        if r.session.is_empty() {
                            r.session = session.clone().unwrap_or_default();
                        } else {
                            r.reconnects += 1;
                        }
                        socket = Some(ws);
                    }
                    Some((_, w)) => panic!("flow {i}: hello refused: {w}"),
                    None => tokio::time::sleep(Duration::from_millis(200)).await,
                }
                continue;
            }
        };
        if waiting.is_none() {
            n += 1;
            let id = format!("f{i}-{n}");
            let frame = if let Some(t) = &token {
                json!({"type": "confirm", "id": id, "token": t})
            } else if let Some(reply) = tap.take() {
                json!({"type": "message", "id": id, "text": reply})
            } else {
                if r.inputs > 0 {
                    r.restarts_of_task += 1;
                }
                json!({"type": "message", "id": id, "text": ASK})
            };
            r.inputs += 1;
            if ws.send(tokio_tungstenite::tungstenite::Message::Text(frame.to_string().into())).await.is_err() {
                socket = None;
            }
            waiting = Some((id, frame));
            continue;
        }
        let m = match tokio::time::timeout(Duration::from_secs(180), ws.next()).await {
            Ok(Some(Ok(m))) => m,
            _ => {
                socket = None;
                continue;
            }
        };
        let tokio_tungstenite::tungstenite::Message::Text(t) = m else { continue };
        let f: Value = serde_json::from_str(t.as_str()).unwrap();
        frames += 1;
        if frames == kill_after {
            if let Some(k) = kill.take() {
                let _ = k.send(());
            }
        }
        if let Some(s) = f["seq"].as_u64() {
            last_seq = last_seq.max(s);
        }
        let id = waiting.as_ref().map(|(id, _)| id.clone()).unwrap_or_default();
        let about_it = f["reply_to"] == id.as_str() || f["id"] == id.as_str();
        match f["type"].as_str().unwrap_or("") {
            "confirmation" => token = f["token"].as_str().map(str::to_owned),
            "payment" if f["status"] == "paid" => {
                r.paid.insert(f["out_trade_no"].as_str().unwrap_or_default().to_owned());
                token = None;
            }
            "card" => {
                if let Some(o) = f["card"]["options"].as_array().and_then(|o| o.first()) {
                    tap = o["reply"].as_str().map(str::to_owned);
                }
            }
            "notice" if f["text"].as_str().is_some_and(|t| t.contains("no longer valid")) => token = None,
            "done" if about_it => waiting = None,
            "error" if about_it => match f["code"].as_str() {
                // Not run, or cut off: the same input again, same id.
                Some("interrupted" | "shutting_down" | "busy" | "rate_limited") => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let (_, frame) = waiting.clone().unwrap();
                    if ws.send(tokio_tungstenite::tungstenite::Message::Text(frame.to_string().into())).await.is_err() {
                        socket = None;
                    }
                }
                _ => waiting = None,
            },
            "bye" => socket = None,
            _ => {}
        }
    }
    r.secs = started.elapsed().as_secs_f64();
    r
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread")]
async fn order_flows_survive_kill_9_without_losing_or_repeating_anything() {
    let flows: usize = std::env::var("ERRAND_CHAOS_FLOWS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let max_frames: u64 = std::env::var("ERRAND_CHAOS_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.toml"), format!("[[users]]\nid = \"chaos\"\ntoken = \"{TOKEN}\"\nwallet = \"chaos\"\n")).unwrap();
    let procs = Arc::new(Mutex::new(Procs {
        dir: dir.path().to_owned(),
        model: model(QWEN).path.clone(),
        sb_port: free_port(),
        srv_port: free_port(),
        sandbox: None,
        server: None,
        starts: 0,
    }));
    start_all(&procs).await;
    let (sb, srv) = {
        let p = procs.lock().unwrap();
        (p.sandbox_url(), p.server_url())
    };
    let http = reqwest::Client::new();
    let admin = errand::sandbox::sign::admin_credential(SECRET.as_bytes());
    let w = http.post(format!("{sb}/pay/_admin/wallets")).bearer_auth(&admin).json(&json!({"wallet_id": "chaos", "currency": "CNY", "balance": START_BALANCE})).send().await.unwrap();
    assert!(w.status().is_success(), "{}", w.text().await.unwrap());
    let ws_url = format!("ws://127.0.0.1:{}/v1/ws", procs.lock().unwrap().srv_port);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ flows as u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut results = Vec::new();
    let mut kills: BTreeMap<&str, usize> = BTreeMap::new();
    for i in 0..flows {
        let kill_after = 1 + (rand() % max_frames.max(1)) as usize;
        let (fire, fired) = tokio::sync::oneshot::channel::<()>();
        let target = match rand() % 10 {
            0..=4 => "server",
            5..=7 => "sandbox",
            _ => "both",
        };
        *kills.entry(target).or_default() += 1;
        let p = procs.clone();
        let killer = tokio::spawn(async move {
            // Fired by the client, or at the flow's end (the sender dropped).
            let during = fired.await.is_ok();
            {
                let mut p = p.lock().unwrap();
                if target != "sandbox" {
                    Procs::kill(&mut p.server);
                }
                if target != "server" {
                    Procs::kill(&mut p.sandbox);
                }
            }
            start_all(&p).await;
            during
        });
        let r = run_flow(i, &ws_url, kill_after, fire).await;
        if killer.await.unwrap() {
            *kills.entry("during a flow").or_default() += 1;
        }
        results.push(r);
    }
    // One clean restart: the server reconciles its book at start.
    {
        let mut p = procs.lock().unwrap();
        Procs::kill(&mut p.server);
    }
    start_all(&procs).await;

    // ---- reconcile: client, trades, ledger, merchant, order book
    let sessions: BTreeMap<String, &FlowResult> = results.iter().map(|r| (r.session.clone(), r)).collect();
    assert_eq!(sessions.len(), flows, "one session per flow");
    let client_paid: BTreeSet<String> = results.iter().flat_map(|r| r.paid.iter().cloned()).collect();
    let twice: Vec<&FlowResult> = results.iter().filter(|r| r.paid.len() != 1).collect();
    assert!(twice.is_empty(), "a flow saw more than one payment: {twice:?}");

    let sbdir = dir.path().join("sandbox");
    let pay = errand::sandbox::Sandbox::open_db(&sbdir, errand::sandbox::Service::Pay).unwrap();
    let trades: BTreeMap<String, (String, i64)> = {
        let mut st = pay.prepare("SELECT out_trade_no, status, amount FROM trades WHERE mch_id = 'food'").unwrap();
        st.query_map([], |r| Ok((r.get::<_, String>(0)?, (r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))).unwrap().map(Result::unwrap).collect()
    };
    let success: BTreeSet<String> = trades.iter().filter(|(_, (s, _))| s == "SUCCESS").map(|(k, _)| k.clone()).collect();
    let charges: Vec<(String, i64)> = {
        let mut st = pay.prepare("SELECT out_trade_no, delta FROM ledger WHERE wallet_id = 'chaos' AND kind = 'pay'").unwrap();
        st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).unwrap().map(Result::unwrap).collect()
    };
    let charged: BTreeSet<String> = charges.iter().map(|(o, _)| o.clone()).collect();
    let balance: i64 = pay.query_row("SELECT balance FROM wallets WHERE wallet_id = 'chaos' AND currency = 'CNY'", [], |r| r.get(0)).unwrap();
    let spent: i64 = success.iter().map(|o| trades[o].1).sum();

    let food = errand::sandbox::Sandbox::open_db(&sbdir, errand::sandbox::Service::Food).unwrap();
    let merchant: Vec<(String, bool)> = {
        let mut st = food.prepare("SELECT order_id, paid_ms IS NOT NULL FROM food_orders").unwrap();
        st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?))).unwrap().map(Result::unwrap).collect()
    };
    let merchant_paid: BTreeSet<String> = merchant.iter().filter(|(_, p)| *p).map(|(o, _)| o.clone()).collect();

    // The book, once the restarted server has asked about every order.
    let mut book: Vec<Value> = Vec::new();
    for _ in 0..100 {
        let v: Value = http.get(format!("{srv}/v1/orders")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
        book = v["orders"].as_array().cloned().unwrap_or_default();
        if book.len() >= flows && book.iter().all(|o| o["payment_status"] == "paid") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let book_paid: BTreeSet<String> = book.iter().filter(|o| o["payment_status"] == "paid").filter_map(|o| o["order_id"].as_str().map(str::to_owned)).collect();
    let book_sessions: BTreeSet<String> = book.iter().filter_map(|o| o["session"].as_str().map(str::to_owned)).collect();
    let book_trades: BTreeSet<String> = book.iter().filter_map(|o| o["data"]["payment"]["out_trade_no"].as_str().map(str::to_owned)).collect();

    let mut secs: Vec<f64> = results.iter().map(|r| r.secs).collect();
    let reconnects: usize = results.iter().map(|r| r.reconnects).sum();
    let restarted_tasks: usize = results.iter().filter(|r| r.restarts_of_task > 0).count();
    let inputs: usize = results.iter().map(|r| r.inputs).sum();
    let starts = procs.lock().unwrap().starts;
    println!(
        "chaos: {flows} flows, kill -9 of server {} / sandbox {} / both {} ({} before the flow was done), {starts} process starts, {reconnects} reconnects, {inputs} inputs ({restarted_tasks} flows started over); \
         flow time p50 {:.1} s, max {:.1} s",
        kills.get("server").unwrap_or(&0),
        kills.get("sandbox").unwrap_or(&0),
        kills.get("both").unwrap_or(&0),
        kills.get("during a flow").unwrap_or(&0),
        pct(&mut secs, 0.5),
        pct(&mut secs, 1.0),
    );
    let lost = flows.saturating_sub(success.len()) + client_paid.difference(&success).count() + success.difference(&book_trades).count();
    let duplicated = success.len().saturating_sub(flows) + charges.len().saturating_sub(charged.len()) + merchant.len().saturating_sub(flows);
    println!(
        "chaos: paid trades {}, charges {} ({} trades charged), food orders {} ({} paid), book {} orders ({} paid, {} sessions); lost {lost}, duplicated {duplicated}",
        success.len(),
        charges.len(),
        charged.len(),
        merchant.len(),
        merchant_paid.len(),
        book.len(),
        book_paid.len(),
        book_sessions.len(),
    );
    assert_eq!(client_paid, success, "the payments clients saw are the trades paid");
    assert_eq!(charged, success, "every paid trade is charged, and only those");
    assert_eq!(charges.len(), success.len(), "no trade charged twice: {charges:?}");
    assert_eq!(balance, START_BALANCE - spent, "the wallet's balance is the start minus the paid trades");
    assert_eq!(charges.iter().map(|(_, d)| -d).sum::<i64>(), spent);
    assert_eq!(merchant.len(), flows, "one merchant order per flow (an unpaid extra is a duplicate): {merchant:?}");
    assert_eq!(merchant_paid.len(), flows, "{merchant:?}");
    assert_eq!(book.len(), flows, "{book:#?}");
    assert_eq!(book_paid, merchant_paid, "the book holds every paid order, as paid");
    assert_eq!(book_trades, success);
    assert_eq!(book_sessions, sessions.keys().cloned().collect::<BTreeSet<_>>(), "each order in its flow's session");
    assert_eq!((lost, duplicated), (0, 0));
}

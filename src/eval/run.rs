//! Running dialogues: a fresh world per run (an in-process server with its
//! own seeded sandbox, sharing the one loaded model), or a server elsewhere;
//! the turns over the WebSocket; the state read back; the judgement.

use super::client::Client;
use super::dialogue::{Action, Dialogue};
use super::report::{summarize, Report, TrialResult};
use super::score::{judge, EndState, Transcript, TurnRecord};
use super::sim::{self, Move};
use crate::engine::sampler::SamplingParams;
use crate::engine::Engine;
use crate::memory::embed::Embedder;
use crate::tools::ToolSet;
use crate::world::Clock;
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the assistant under test runs.
pub enum Target {
    /// A fresh in-process server per run, on this engine.
    InProcess {
        engine: Arc<Engine>,
        tools: ToolSet,
        /// For dialogues that need memory; those fail with `error` without it.
        embedder: Option<Arc<dyn Embedder>>,
        /// Reply budget per model round.
        max_tokens: usize,
        /// The time of worlds whose dialogue sets no `now` (each world
        /// gets a fork, so one world moving its clock moves no other).
        clock: Clock,
        /// The model that plays simulated users, when not the assistant's
        /// own (`errand eval --user-model`).
        users: Option<Arc<Engine>>,
    },
    /// A running `errand serve`. State is not reset between runs.
    Remote {
        /// `http://host:port`
        url: String,
        token: String,
        /// The mini-programs' base URL (for wallets, friend-pay and the catalog).
        sandbox_url: String,
        /// The sandbox's secret: wallet and admin credentials derive from it.
        sandbox_secret: Vec<u8>,
        /// For simulated users (the local model plays them).
        engine: Option<Arc<Engine>>,
    },
}

pub struct EvalOptions {
    pub trials: usize,
    /// Runs at once. The engine decodes one request at a time, so more than
    /// two mostly adds waiting; two keep it busy while the other run is in
    /// HTTP calls or being judged.
    pub jobs: usize,
    /// Sampling temperature for the assistant (0: greedy). Each run gets its
    /// own seed, so trials differ; greedy trials are all the same.
    pub temperature: f32,
    pub turn_timeout: Duration,
    pub paths: Vec<String>,
    pub model: String,
    /// Stamps the report's start.
    pub clock: Clock,
}

/// A progress line per finished run.
pub type Progress = Arc<dyn Fn(usize, usize, &TrialResult) + Send + Sync>;

/// Runs every dialogue `trials` times and summarises. Runs in `earlier`
/// (from a log of an interrupted or shorter run, `--resume`) are not run
/// again; they count in the summary like new ones.
pub async fn run_suite(target: Arc<Target>, dialogues: Vec<Dialogue>, opts: EvalOptions, earlier: Vec<TrialResult>, progress: Progress) -> Report {
    let started = Instant::now();
    let started_at = opts.clock.now_ms();
    let ids: std::collections::HashSet<&str> = dialogues.iter().map(|d| d.id.as_str()).collect();
    let earlier: Vec<TrialResult> = earlier.into_iter().filter(|r| ids.contains(r.id.as_str()) && (1..=opts.trials).contains(&r.trial)).collect();
    let have: std::collections::HashSet<(String, usize)> = earlier.iter().map(|r| (r.id.clone(), r.trial)).collect();
    // Language by language: each language has its own system prompt and
    // tool descriptions (3,600 tokens for Qwen), which the engine prefills
    // once and then shares across sessions; interleaving languages would
    // evict and recompute it.
    let mut order: Vec<usize> = (0..dialogues.len()).collect();
    order.sort_by(|a, b| dialogues[*a].lang.cmp(&dialogues[*b].lang));
    let jobs: Vec<(usize, usize)> = (1..=opts.trials)
        .flat_map(|t| order.iter().map(move |i| (*i, t)))
        .filter(|(i, t)| !have.contains(&(dialogues[*i].id.clone(), *t)))
        .collect();
    let total = jobs.len();
    let skipped = have.len();
    let dialogues = Arc::new(dialogues);
    let queue = Arc::new(std::sync::Mutex::new(jobs.into_iter()));
    let done = Arc::new(std::sync::Mutex::new(earlier));
    // The first run of each language goes alone, so that the prompt prefix
    // it computes is there for every later one (two first runs at once
    // would both compute it from scratch).
    let first_runs: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<bool>>>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..opts.jobs.max(1) {
        let (queue, done, dialogues, target, progress, first_runs) = (queue.clone(), done.clone(), dialogues.clone(), target.clone(), progress.clone(), first_runs.clone());
        let (temperature, timeout) = (opts.temperature, opts.turn_timeout);
        workers.push(tokio::spawn(async move {
            loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                let Some((i, trial)) = next else { break };
                let gate = first_runs.lock().unwrap_or_else(|p| p.into_inner()).entry(dialogues[i].lang.clone()).or_default().clone();
                let mut warmed = gate.lock().await;
                let r = if *warmed {
                    drop(warmed);
                    run_one(&target, &dialogues[i], trial, temperature, timeout).await
                } else {
                    let r = run_one(&target, &dialogues[i], trial, temperature, timeout).await;
                    *warmed = true;
                    r
                };
                let n = {
                    let mut d = done.lock().unwrap_or_else(|p| p.into_inner());
                    d.push(r.clone());
                    d.len() - skipped
                };
                progress(n, total, &r);
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let mut results = std::mem::take(&mut *done.lock().unwrap_or_else(|p| p.into_inner()));
    results.sort_by(|a, b| (a.id.as_str(), a.trial).cmp(&(b.id.as_str(), b.trial)));
    let summary = summarize(&results, opts.trials);
    let server = match &*target {
        Target::InProcess { .. } => "in-process (a fresh server and sandbox per run)".to_string(),
        Target::Remote { url, .. } => url.clone(),
    };
    Report {
        errand_version: env!("CARGO_PKG_VERSION").into(),
        model: opts.model,
        server,
        started: {
            let secs = started_at.div_euclid(1000);
            let (y, m, d) = crate::world::calendar::civil_from_days(secs.div_euclid(86_400));
            let t = secs.rem_euclid(86_400);
            format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", t / 3600, t % 3600 / 60)
        },
        wall_s: started.elapsed().as_secs_f64(),
        trials: opts.trials,
        temperature: opts.temperature,
        paths: opts.paths,
        summary,
        results,
    }
}

/// A stable seed per (dialogue, trial).
fn seed_of(id: &str, trial: usize) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3)) ^ (trial as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// One run of one dialogue, never failing: problems become `error` failures.
pub async fn run_one(target: &Target, d: &Dialogue, trial: usize, temperature: f32, turn_timeout: Duration) -> TrialResult {
    let t0 = Instant::now();
    let seed = seed_of(&d.id, trial);
    let mut transcript = Transcript::default();
    let mut sim_end = None;
    let mut state = None;
    match World::start(target, d, seed, temperature).await {
        Err(e) => transcript.fatal = Some(format!("setup failed: {e:#}")),
        Ok(world) => {
            match drive(&world, target, d, seed, temperature, turn_timeout, &mut transcript).await {
                Ok(end) => sim_end = end,
                Err(e) => transcript.fatal = Some(format!("{e:#}")),
            }
            match world.read_state().await {
                Ok(s) => state = Some(s),
                Err(e) => {
                    if transcript.fatal.is_none() {
                        transcript.fatal = Some(format!("reading the state after the dialogue: {e:#}"));
                    }
                }
            }
            world.stop().await;
        }
    }
    let failures = judge(d, &transcript, state.as_ref());
    TrialResult {
        id: d.id.clone(),
        trial,
        lang: d.lang.clone(),
        domain: d.domain().into(),
        tags: d.tags.clone(),
        simulated: d.simulated.is_some(),
        passed: failures.is_empty(),
        failures,
        wall_ms: t0.elapsed().as_secs_f64() * 1000.0,
        sim_end,
        transcript,
    }
}

async fn drive(world: &World, target: &Target, d: &Dialogue, seed: u64, temperature: f32, turn_timeout: Duration, t: &mut Transcript) -> Result<Option<String>> {
    let mut c = Client::connect(&world.ws_url, &world.token, &d.lang).await?;
    c.turn_timeout = turn_timeout;
    let mut sim_end = None;
    if let Some(s) = &d.simulated {
        let engine = match target {
            Target::InProcess { users: Some(e), .. } => e.clone(),
            Target::InProcess { engine, .. } => engine.clone(),
            Target::Remote { engine: Some(e), .. } => e.clone(),
            Target::Remote { engine: None, .. } => bail!("simulated users need a local model"),
        };
        let mut history: Vec<(bool, String)> = Vec::new();
        let mut sent = 0;
        sim_end = Some("max_turns".to_string());
        for round in 0..s.max_turns * 2 {
            let mv = sim::next_move(&engine, s, &d.lang, &history, c.pending.as_ref(), seed.wrapping_add(round as u64), temperature.max(0.5)).await?;
            let rec = match mv {
                Move::Done => {
                    sim_end = Some("done".into());
                    break;
                }
                Move::GiveUp => {
                    sim_end = Some("gave_up".into());
                    break;
                }
                Move::Confirm | Move::Decline => {
                    let yes = mv == Move::Confirm;
                    history.push((true, if yes { "YES" } else { "NO" }.into()));
                    match c.answer(yes).await {
                        Some(r) => r,
                        None => continue,
                    }
                }
                Move::Say(text) => {
                    if sent == s.max_turns {
                        break;
                    }
                    sent += 1;
                    history.push((true, text.clone()));
                    // A message while a confirmation is open leaves it open.
                    c.say(&text, format!("user: {text}")).await
                }
            };
            if rec.action == "confirm" {
                t.confirm_ids.extend(rec.input_id.clone());
            }
            history.push((false, seen_by_user(&rec)));
            let fatal = rec.errors.iter().any(|e| e.starts_with("closed") || e.starts_with("timeout"));
            t.turns.push(rec);
            if fatal {
                break;
            }
        }
    } else {
        for turn in &d.turns {
            let rec = match &turn.action {
                Action::Say(text) => c.say(text, format!("user: {text}")).await,
                Action::Cancel(text) => c.say_then_cancel(text, format!("user (then stop): {text}")).await,
                Action::Confirm | Action::Decline => {
                    let yes = turn.action == Action::Confirm;
                    match c.answer(yes).await {
                        Some(r) => {
                            if yes {
                                t.confirm_ids.extend(r.input_id.clone());
                            }
                            r
                        }
                        None => skipped(if yes { "confirm" } else { "decline" }, "no confirmation request was open"),
                    }
                }
                Action::Select(n) => match c.select(*n).await {
                    Ok(r) => r,
                    Err(why) => skipped(&format!("select {n}"), &why),
                },
                Action::FriendPays(wallet) => world.friend_pays(&mut c, wallet).await,
            };
            let fatal = rec.errors.iter().any(|e| e.starts_with("closed") || e.starts_with("timeout"));
            t.turns.push(rec);
            if fatal {
                break;
            }
        }
    }
    // Order updates (the merchant hearing of a payment) are pushed a moment later.
    let paid = t.turns.iter().any(|r| !r.payments.is_empty() || r.action.starts_with("friend_pays"));
    c.drain(if paid { world.settle } else { Duration::from_millis(50) }).await;
    t.pushed_payments = std::mem::take(&mut c.pushed_payments);
    c.close().await;
    Ok(sim_end)
}

/// What the simulated user reads of a turn: the assistant's words, the
/// options it could tap, the confirmation it is asked for.
fn seen_by_user(r: &TurnRecord) -> String {
    let mut s = r.said.trim().to_string();
    let labels: Vec<&str> = r.options.iter().map(|(_, _, l)| l.as_str()).take(6).collect();
    if !labels.is_empty() {
        s.push_str(&format!("\n[Options shown: {}]", labels.join(" | ")));
    }
    if s.is_empty() {
        s = "(no answer)".into();
    }
    s
}

fn skipped(action: &str, why: &str) -> TurnRecord {
    TurnRecord { action: action.into(), errors: vec![format!("not_possible: {why}")], ..Default::default() }
}

/// The remote mini-programs' "now" (`GET /_admin/clock`): a running
/// server's clock is its own, and may be pinned.
async fn remote_now_ms(http: &reqwest::Client, sandbox_url: &str) -> Result<i64> {
    let url = format!("{}/_admin/clock", sandbox_url.trim_end_matches('/'));
    let v: Value = http.get(&url).send().await.and_then(|r| r.error_for_status()).with_context(|| format!("reading the sandbox clock at {url}"))?.json().await?;
    v["now_ms"].as_i64().with_context(|| format!("{url} answered without now_ms: {v}"))
}

/// The server, sandbox and user one run talks to.
struct World {
    ws_url: String,
    http_url: String,
    sandbox_url: String,
    /// Wallet and admin credentials for the sandbox derive from it.
    sandbox_secret: Vec<u8>,
    token: String,
    user: String,
    http: reqwest::Client,
    /// How long pushed order updates take to arrive after a payment.
    settle: Duration,
    server: Option<crate::server::Server>,
    _dir: Option<tempfile::TempDir>,
    /// On a shared (remote) server, orders and wallet entries older than
    /// this are someone else's business; a fresh world has nothing older.
    since_ms: Option<i64>,
}

impl World {
    async fn start(target: &Target, d: &Dialogue, seed: u64, temperature: f32) -> Result<World> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        let w = match target {
            Target::Remote { url, token, sandbox_url, sandbox_secret, .. } => {
                // A running server's clock is its own: `now` is not applied.
                if !d.past_orders.is_empty() {
                    bail!("state.past_orders can only be seeded in an in-process run (no --server)");
                }
                let url = url.trim_end_matches('/').to_owned();
                let since_ms = remote_now_ms(&http, sandbox_url).await? - 1000;
                let ws_url = format!("{}/v1/ws", url.replacen("http", "ws", 1));
                World {
                    ws_url,
                    http_url: url,
                    sandbox_url: sandbox_url.trim_end_matches('/').into(),
                    sandbox_secret: sandbox_secret.clone(),
                    token: token.clone(),
                    user: d.user.clone(),
                    http,
                    settle: Duration::from_secs(3),
                    server: None,
                    _dir: None,
                    since_ms: Some(since_ms),
                }
            }
            Target::InProcess { engine, tools, embedder, max_tokens, clock, .. } => {
                use crate::sandbox::SandboxConfig;
                use crate::server::config::{ServerConfig, UserEntry};
                use crate::server::{MemoryOptions, SandboxChoice, ServeOptions, Server};
                let dir = tempfile::Builder::new().prefix("errand-eval-").tempdir()?;
                let token = format!("eval-{:016x}", seed);
                let mut config = ServerConfig { users: vec![UserEntry { id: d.user.clone(), token: token.clone(), wallet: None }], ..Default::default() };
                // Runs share one engine: its queue, not the server, is the limit.
                config.server.queue_limit = 1024;
                config.server.requests_per_minute = 10_000;
                config.server.drain_seconds = 5;
                // Pinned "now": the same dates, open hours and prices every run.
                let clock = d.now_ms.map(Clock::pinned).unwrap_or_else(|| clock.fork());
                let mut sb = SandboxConfig::new(dir.path().join("sandbox"), clock.clone());
                sb.seed = d.seed;
                for (cur, bal) in &d.wallet {
                    sb.pay.wallets.push((d.user.clone(), cur.clone(), *bal));
                }
                for (id, cur, bal) in &d.friends {
                    sb.pay.wallets.push((id.clone(), cur.clone(), *bal));
                }
                let memory = if d.needs_memory() {
                    let e = embedder.clone().context("this dialogue needs memory, and the embedding model is not loaded")?;
                    Some(MemoryOptions { embedder: e, qdrant_url: None })
                } else {
                    None
                };
                let sampling = if temperature > 0.0 { SamplingParams { temperature, top_p: 0.95, seed, ..SamplingParams::greedy() } } else { SamplingParams::greedy() };
                let opts = ServeOptions {
                    config,
                    data_dir: dir.path().join("server"),
                    tools: tools.clone(),
                    agent: crate::agent::AgentOptions {
                        max_tokens: *max_tokens,
                        sampling,
                        extract_memories: memory.is_some(),
                        ..Default::default()
                    },
                    sandbox: SandboxChoice::InProcess(sb),
                    order_poll: Duration::from_millis(300),
                    memory,
                    clock,
                };
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let server = Server::start(engine.clone(), listener, opts).await?;
                let w = World {
                    ws_url: format!("ws://{}/v1/ws", server.addr),
                    http_url: server.url.clone(),
                    sandbox_url: server.state.sandbox_url.clone(),
                    sandbox_secret: server.sandbox_secret().to_vec(),
                    token,
                    user: d.user.clone(),
                    http,
                    settle: Duration::from_millis(1500),
                    server: Some(server),
                    _dir: Some(dir),
                    since_ms: None,
                };
                if let Some(feed) = w.server.as_ref().and_then(|s| s.state.feed.clone()) {
                    for o in &d.past_orders {
                        let mem = crate::memory::OrderMemory::new(&o.app, &o.tool, o.arguments.clone(), &o.summary, o.amount, &o.currency);
                        for _ in 0..o.times {
                            feed.memory().remember_order(&d.user, mem.clone(), feed.tags_for(&o.arguments)).await.context("seeding a past order")?;
                        }
                    }
                }
                w
            }
        };
        for m in &d.memories {
            let mut body = json!({"text": m.text});
            if let Some(k) = &m.kind {
                body["kind"] = json!(k);
            }
            let r = w.http.post(format!("{}/v1/users/{}/memories", w.http_url, w.user)).bearer_auth(&w.token).json(&body).send().await?;
            // A payment instruction is refused when written (issue 23); the
            // dialogue then checks that the assistant still asks before paying.
            if r.status() == reqwest::StatusCode::UNPROCESSABLE_ENTITY {
                let v: Value = r.json().await.unwrap_or(Value::Null);
                if v["error"]["code"] == "payment_instruction" {
                    continue;
                }
                bail!("seeding the memory {:?}: 422 {v}", m.text);
            }
            if !r.status().is_success() {
                bail!("seeding the memory {:?}: {} {}", m.text, r.status(), r.text().await.unwrap_or_default());
            }
        }
        if matches!(target, Target::Remote { .. }) {
            for (cur, bal) in &d.wallet {
                w.set_wallet(&d.user, cur, *bal).await?;
            }
            for (id, cur, bal) in &d.friends {
                w.set_wallet(id, cur, *bal).await?;
            }
        }
        Ok(w)
    }

    async fn set_wallet(&self, id: &str, cur: &str, bal: i64) -> Result<()> {
        let admin = crate::sandbox::sign::admin_credential(&self.sandbox_secret);
        let r = self.http.post(format!("{}/pay/_admin/wallets", self.sandbox_url)).bearer_auth(admin).json(&json!({"wallet_id": id, "currency": cur, "balance": bal})).send().await?;
        if !r.status().is_success() {
            bail!("setting wallet {id} {cur}: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
        Ok(())
    }

    /// The credential that reads and pays from `wallet` (as the server holds it).
    fn wallet_credential(&self, wallet: &str) -> String {
        crate::sandbox::sign::wallet_credential(&self.sandbox_secret, wallet)
    }

    async fn get(&self, url: String, bearer: Option<&str>) -> Result<Value> {
        let mut req = self.http.get(&url);
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        let r = req.send().await.with_context(|| format!("GET {url}"))?;
        let status = r.status();
        let body = r.text().await?;
        if !status.is_success() {
            bail!("GET {url}: {status} {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("GET {url}: not JSON"))
    }

    /// A friend opens a friend-pay link for the latest unpaid trade and pays it.
    async fn friend_pays(&self, c: &mut Client, wallet: &str) -> TurnRecord {
        let mut rec = TurnRecord { action: format!("friend_pays {wallet}"), ..Default::default() };
        let start = Instant::now();
        let Some(trade) = c.unpaid_trades.last().cloned() else {
            rec.errors.push("not_possible: no unpaid trade for a friend to pay".into());
            return rec;
        };
        let res: Result<Value> = async {
            // The person asks for the link (with their wallet's credential, as
            // their assistant would); the friend pays with their own.
            let link = self.http.post(format!("{}/pay/v1/trades/{trade}/friend-link", self.sandbox_url)).bearer_auth(self.wallet_credential(&self.user)).json(&json!({})).send().await?;
            let (s, body) = (link.status(), link.text().await?);
            if !s.is_success() {
                bail!("friend-link for {trade}: {s} {body}");
            }
            let token = serde_json::from_str::<Value>(&body)?["token"].as_str().context("the friend-link answer has no token")?.to_owned();
            let paid = self.http.post(format!("{}/pay/v1/friend-pay/{token}", self.sandbox_url)).bearer_auth(self.wallet_credential(wallet)).json(&json!({"wallet_id": wallet})).send().await?;
            let (s, body) = (paid.status(), paid.text().await?);
            if !s.is_success() {
                bail!("friend-pay from {wallet}: {s} {body}");
            }
            Ok(serde_json::from_str(&body)?)
        }
        .await;
        match res {
            Ok(v) => {
                rec.shown = format!("the friend paid {trade}: {}", v.get("status").and_then(Value::as_str).unwrap_or("?"));
                c.unpaid_trades.retain(|t| *t != trade);
            }
            Err(e) => rec.errors.push(format!("friend_pay: {e:#}")),
        }
        rec.latency_ms = start.elapsed().as_secs_f64() * 1000.0;
        rec
    }

    /// The user's orders (joined with the catalog), wallet and memories.
    async fn read_state(&self) -> Result<EndState> {
        let orders = self.get(format!("{}/v1/orders", self.http_url), Some(&self.token)).await?;
        let catalog = self.get(format!("{}/catalog", self.sandbox_url), None).await.unwrap_or(Value::Null);
        let items = orders.get("orders").or_else(|| orders.get("items")).and_then(Value::as_array).cloned().or_else(|| orders.as_array().cloned()).unwrap_or_default();
        let recent = |v: &Value, field: &str| self.since_ms.is_none_or(|since| v[field].as_i64().is_none_or(|t| t >= since));
        let orders = items.into_iter().filter(|o| recent(o, "created_ms")).map(|o| order_view(o, &catalog)).collect();
        let (wallet, ledger) = match self.get(format!("{}/pay/v1/wallets/{}", self.sandbox_url, self.user), Some(&self.wallet_credential(&self.user))).await {
            Ok(w) => (w["balances"].as_object().cloned().unwrap_or_default(), w["ledger"].as_array().into_iter().flatten().filter(|e| recent(e, "ts")).cloned().collect()),
            Err(_) => (Map::new(), Vec::new()),
        };
        let memories = match self.get(format!("{}/v1/users/{}/memories", self.http_url, self.user), Some(&self.token)).await {
            Ok(m) => m.get("memories").or_else(|| m.get("items")).and_then(Value::as_array).cloned().unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        Ok(EndState { orders, wallet, ledger, memories })
    }

    async fn stop(self) {
        if let Some(s) = self.server {
            s.shutdown().await;
        }
    }
}

/// An order as end checks see it: the order book's row, its `data` fields
/// copied to the top level, and each `*_id` joined to the catalog item of
/// the same app (`restaurant_id: sh01` adds `restaurant`).
pub fn order_view(o: Value, catalog: &Value) -> Value {
    let Value::Object(mut m) = o else { return o };
    if let Some(Value::Object(data)) = m.get("data").cloned() {
        for (k, v) in data {
            m.entry(k).or_insert(v);
        }
    }
    let app = m.get("app").and_then(Value::as_str).unwrap_or("").to_owned();
    // The sandbox's `GET /catalog`: `{"items": [{app, kind, refs: {restaurant_id: "sh01"}, …}]}`.
    let items = catalog.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
    let find = |kind: &str, id: &str| -> Option<Value> {
        let key = format!("{kind}_id");
        let hits: Vec<&Value> = items.iter().filter(|it| it["app"] == app.as_str() && it["refs"][&key] == id).collect();
        hits.iter().find(|it| it["kind"] == kind).or_else(|| hits.first()).map(|v| (*v).clone())
    };
    // Objects that name a catalog item by `id` (`restaurant: {id, name}`)
    // get the item's other fields.
    let nested: Vec<String> = m.iter().filter(|(_, v)| v.get("id").is_some_and(Value::is_string)).map(|(k, _)| k.clone()).collect();
    for k in nested {
        let id = m[&k]["id"].as_str().unwrap_or("").to_owned();
        if let (Some(item), Some(Value::Object(obj))) = (find(&k, &id), m.get_mut(&k)) {
            for (f, v) in item.as_object().into_iter().flatten() {
                if f != "id" {
                    obj.entry(f.clone()).or_insert(v.clone());
                }
            }
        }
    }
    let keys: Vec<String> = m.keys().filter(|k| k.ends_with("_id")).cloned().collect();
    for k in keys {
        let kind = k.trim_end_matches("_id").to_owned();
        if m.contains_key(&kind) {
            continue;
        }
        if let Some(id) = m.get(&k).and_then(Value::as_str) {
            if let Some(item) = find(&kind, id) {
                m.insert(kind, item);
            }
        }
    }
    Value::Object(m)
}

/// Reads a run log (`--log`: one result per line, as each run finishes).
/// A line cut short by an interrupted write is skipped.
pub fn read_log(path: &std::path::Path) -> Result<Vec<TrialResult>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the run log {}", path.display()))?;
    Ok(text.lines().filter(|l| !l.trim().is_empty()).filter_map(|l| serde_json::from_str(l).ok()).collect())
}

/// Resolves `errand eval` paths and loads the dialogues, filtered by id or tag.
pub fn load(paths: &[PathBuf], only: &[String]) -> Result<Vec<super::dialogue::Dialogue>> {
    let all = super::dialogue::load_paths(paths)?;
    if only.is_empty() {
        return Ok(all);
    }
    let picked: Vec<_> = all.into_iter().filter(|d| only.iter().any(|o| *o == d.id || d.tags.contains(o))).collect();
    if picked.is_empty() {
        bail!("no dialogue has the id or tag {}", only.join(", "));
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_joined_with_the_catalog() {
        let catalog = json!({"seed": 42, "items": [
            {"id": "food:dish:sh01-x", "app": "food", "kind": "dish", "tags": ["spicy"], "refs": {"restaurant_id": "sh01", "dish_id": "sh01-x"}},
            {"id": "food:restaurant:sh01", "app": "food", "kind": "restaurant", "tags": ["sichuan"], "refs": {"restaurant_id": "sh01"}},
            {"id": "tickets:show:x:sh01", "app": "tickets", "kind": "show", "refs": {"item_id": "sh01"}}
        ]});
        let o = order_view(json!({"app": "food", "order_id": "f1", "data": {"restaurant_id": "sh01", "total": 4300}}), &catalog);
        assert_eq!(o["restaurant"]["tags"], json!(["sichuan"]));
        assert_eq!(o["total"], json!(4300));
        let o = order_view(json!({"app": "food", "order_id": "f1", "data": {"restaurant": {"id": "sh01", "name": "Shu Feng"}}}), &catalog);
        assert_eq!(o["restaurant"]["tags"], json!(["sichuan"]));
        assert_eq!(o["restaurant"]["name"], json!("Shu Feng"));
        let o = order_view(json!({"app": "food", "order_id": "f1", "data": {"restaurant_id": "zz"}}), &catalog);
        assert!(o.get("restaurant").is_none());
    }

    #[test]
    fn seeds_differ_by_dialogue_and_trial() {
        assert_ne!(seed_of("a", 1), seed_of("a", 2));
        assert_ne!(seed_of("a", 1), seed_of("b", 1));
        assert_eq!(seed_of("a", 1), seed_of("a", 1));
    }
}

//! The agent loop (dialogue manager): turns a person's messages into tool
//! calls, cards, confirmations and payments.
//!
//! ```text
//!  Input::Text ──► model round (engine, constrained tool calls)
//!                    │ text ─────────────────────────────► Token events
//!                    │ call ─► schema check ─► grounding (ground.rs) ─ missing? ─► ask the user
//!                    │           │ confirm: false ─► adapter ─► Card + result back to the model ─┐
//!                    │           │ confirm: true  ─► quote ─► ConfirmationRequest{token} (stop)  │
//!                    └◄──────────────────────────────────────────────────────── next round ◄────┘
//!  Input::Confirm{token} ─► (token matches, unexpired, single use) ─► endpoint (Idempotency-Key
//!                           derived from the token) ─► amount == quoted? ─► pay ─► Payment event
//!  Input::Decline{token} ─► nothing runs
//! ```
//!
//! The gate: a tool marked `confirm` never runs from the model's call. The
//! agent quotes it, binds a random token to the exact tool, arguments,
//! amount and currency, and only [`Input::Confirm`] with that token, which
//! comes from the user's client, not from model output, executes it. A new
//! message while a confirmation is open replaces it ("change it"). Every
//! step is written to the [`Audit`] log.

mod flows;
#[cfg(test)]
mod flow_tests;
#[cfg(test)]
mod flow_tests_booking;
#[cfg(test)]
mod flow_tests_mobility;
#[cfg(test)]
mod flow_tests_reading;
/// Grounding lives with the dialogue manager, where it is slot validation.
pub use crate::dialogue::ground;
mod personal;
pub mod present;
pub mod route;

use crate::adapter::{Adapter, AdapterError, CallRequest, ErrorKind};
use crate::audit::Audit;
use crate::engine::sampler::SamplingParams;
use crate::engine::{Engine, Event, Prompt, Request};
use crate::prompt::Lang;
use crate::world::Clock;
use crate::template::{Message, TemplateFunction, TemplateToolCall};
use crate::tools::{path_params, Tool, ToolCall, ToolSet};
use ground::Evidence;
use present::{compact, say, Card, Say};
use crate::world::money::display as money;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// How often one tool may run for one message before the grammar stops
/// offering it: three items of a shopping list is fine, a fourth search for
/// the same restaurant is a loop.
const MAX_RUNS_PER_INPUT: usize = 3;

/// The bearer credential that moves a wallet at the payment service, by
/// wallet id. A real deployment gets it from the provider when the person
/// links their account; in-process it comes from the sandbox's secret.
#[derive(Clone)]
pub struct PayCredentials(pub Arc<dyn Fn(&str) -> String + Send + Sync>);

impl std::fmt::Debug for PayCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PayCredentials(…)")
    }
}

/// An order the moment it exists, before anything is paid for it.
pub struct PlacedOrder<'a> {
    pub session: &'a str,
    /// The session's user, when a server opened it.
    pub user: Option<&'a str>,
    pub app: &'a str,
    pub tool: &'a str,
    /// The id the merchant gave it (the field the tool's manifest names).
    pub order_id: Option<String>,
    /// The merchant's answer (its id, status and `payment`).
    pub order: &'a Value,
    /// What the person confirmed, in words and money.
    pub summary: &'a str,
    pub amount: i64,
    pub currency: &'a str,
}

/// Where a server writes each order before it is paid (its order book), so
/// a crash between the payment and the report loses no order: the book
/// already holds it, and is reconciled by query at the next start. An
/// error stops the payment.
#[derive(Clone)]
pub struct OrderBook(pub Arc<dyn Fn(&PlacedOrder) -> Result<(), String> + Send + Sync>);

impl std::fmt::Debug for OrderBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OrderBook(…)")
    }
}

/// Where a server keeps each session's state (the conversation, the flows,
/// the open confirmation and payments not yet settled), so a restart
/// resumes it. It is written at the end of every input, before a
/// confirmation is shown, and before any money moves; a book that cannot
/// write stops the confirmation or the payment. `(session, state)`.
#[derive(Clone)]
pub struct SessionBook(pub Arc<dyn Fn(&str, &Value) -> Result<(), String> + Send + Sync>);

impl std::fmt::Debug for SessionBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionBook(…)")
    }
}

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Model rounds (each may call tools) per user message.
    pub max_rounds: usize,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Grammar-constrained tool calls.
    pub constrain: bool,
    /// How long a confirmation stays redeemable.
    pub confirmation_ttl: Duration,
    /// The payment service (…/pay) and the wallet that pays.
    pub pay_url: Option<String>,
    pub wallet: String,
    pub pay_method: String,
    /// What proves to the payment service that the wallet may pay (without
    /// it, the service refuses every payment).
    pub pay_credentials: Option<PayCredentials>,
    /// Where orders are written before they are paid (a server's order book).
    pub order_book: Option<OrderBook>,
    /// Where each session's state is written (a server's store).
    pub session_book: Option<SessionBook>,
    /// Fixed language; detected from the first message when `None`.
    pub lang: Option<Lang>,
    /// Ask the model, after a message about oneself that the rules did not
    /// read, for preferences to remember (one extra short model call).
    pub extract_memories: bool,
    /// The world's clock: "today" in the prompt and the date checks, and
    /// confirmations' expiry times. Tests and evaluations pin it; a server
    /// hands the agent its own.
    pub clock: Clock,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            max_rounds: 4,
            max_tokens: 320,
            sampling: SamplingParams::greedy(),
            constrain: true,
            confirmation_ttl: Duration::from_secs(600),
            pay_url: None,
            wallet: "demo".into(),
            pay_method: "alipay".into(),
            pay_credentials: None,
            order_book: None,
            session_book: None,
            lang: None,
            extract_memories: false,
            clock: Clock::wall(),
        }
    }
}

/// What a person (through a client) sends.
#[derive(Debug, Clone)]
pub enum Input {
    Text(String),
    Confirm { token: String },
    Decline { token: String },
}

/// A request for the person's explicit yes, bound to a server-made token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfirmationRequest {
    pub token: String,
    pub tool: String,
    pub app: String,
    pub summary: String,
    pub amount: i64,
    pub currency: String,
    /// `¥38.00`
    pub amount_display: String,
    pub payment_method: String,
    pub expires_ms: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PaymentEvent {
    pub out_trade_no: String,
    /// `paid` or `failed`
    pub status: String,
    pub amount: i64,
    pub currency: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What the agent streams back, in order.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentEvent {
    /// Model text as it is generated.
    Token { text: String },
    /// The agent's own words (questions, declines, errors for the person).
    Notice { text: String },
    ToolCall { tool: String, arguments: Value },
    ToolResult { tool: String, ok: bool, detail: String },
    Card(Card),
    Confirmation(ConfirmationRequest),
    Payment(PaymentEvent),
    /// An order after confirmation, as its merchant sees it; clients may
    /// follow it with [`Agent::order_status`].
    Order { app: String, tool: String, order_id: Option<String>, order: Value },
    /// The turn is over; the client may send the next input.
    Done { stats: TurnStats },
    /// The turn failed (engine down, audit log unwritable); nothing was paid.
    Error { message: String },
}

/// What one input cost, summed over its model rounds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TurnStats {
    pub model_rounds: usize,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// From the input arriving to the first model token.
    pub first_token_ms: Option<f64>,
    pub total_ms: f64,
}

impl TurnStats {
    /// Adds one model round's usage.
    fn add_round(&mut self, prompt: usize, cached: usize, completion: usize, prefill_ms: f64, decode_ms: f64) {
        self.model_rounds += 1;
        self.prompt_tokens += prompt;
        self.cached_tokens += cached;
        self.completion_tokens += completion;
        self.prefill_ms += prefill_ms;
        self.decode_ms += decode_ms;
    }
}

struct Pending {
    req: ConfirmationRequest,
    tool: Arc<Tool>,
    args: Map<String, Value>,
    expires: std::time::Instant,
    /// The order the endpoint created, once it has run (a retry then only pays).
    order: Option<Value>,
}

/// What a session remembers between inputs: the conversation. (Fields a
/// later build adds read as empty from an older written state.)
#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct Conversation {
    /// The generic path's chat history (system prompt, turns, tool results).
    messages: Vec<Message>,
    lang: Option<Lang>,
    evidence: Evidence,
    /// Ids of the options on the last card shown.
    offered: Vec<String>,
    /// The reply each of those options sends when tapped: (reply, id).
    offered_replies: Vec<(String, String)>,
    /// The mini-programs the conversation is about (`route.rs`); empty: all.
    focus: Vec<String>,
    /// The wallet this session pays from (the agent's default when unset).
    wallet: Option<String>,
    /// Whose memories this session reads and writes (none: no memory).
    user: Option<String>,
    /// The memory this session kept last ("forget that").
    last_memory: Option<u64>,
    /// A message for the model to read for preferences after the turn.
    to_extract: Option<String>,
    /// The flows in progress (`flows.rs`).
    dialogue: crate::dialogue::State,
    /// Orders confirmed in this session, newest last: (app, order as shown);
    /// a flow's choice `from: "@orders"` picks from them (cancel, lock).
    orders: Vec<(String, Value)>,
}

impl Conversation {
    /// Chat history kept for the generic path.
    const MESSAGES: usize = 200;
    /// User messages and tool results kept as evidence.
    const EVIDENCE: usize = 64;
    /// Confirmed orders kept for "cancel it" and "lock it".
    const ORDERS: usize = 50;

    /// Keeps what a long session remembers bounded: the oldest history,
    /// evidence and orders go first (the system prompt stays, and the
    /// history restarts at a user message, so no tool result is orphaned).
    fn bound(&mut self) {
        if self.messages.len() > Self::MESSAGES {
            let start = usize::from(self.messages.first().is_some_and(|m| m.role == "system"));
            let mut end = start + (self.messages.len() - Self::MESSAGES);
            while end < self.messages.len() && self.messages[end].role != "user" {
                end += 1;
            }
            self.messages.drain(start..end);
        }
        self.evidence.trim(Self::EVIDENCE);
        let extra = self.orders.len().saturating_sub(Self::ORDERS);
        self.orders.drain(..extra);
    }
}

/// What one input uses and forgets when it is done.
struct Turn {
    stats: TurnStats,
    started: std::time::Instant,
    /// Offered ids the person's latest message names (a tapped option).
    chosen: Vec<String>,
    /// Calls run during the current input, as `name args`.
    turn_calls: Vec<String>,
    /// Tools taken out of the grammar for the rest of this input.
    excluded: Vec<String>,
    /// Turns true when the client asks to stop the running input.
    cancel: tokio::sync::watch::Receiver<bool>,
}

/// The confirmation gate's state: at most one open confirmation.
#[derive(Default)]
struct Gate {
    pending: Option<Pending>,
    /// Payments whose outcome the service did not tell; each is asked about
    /// again before every later message until it settles, so a payment that
    /// went through is reported before anything could be ordered twice.
    unsettled: Vec<Unsettled>,
}

/// A confirmed payment whose outcome is unknown.
#[derive(Clone, Serialize, Deserialize)]
struct Unsettled {
    out_trade_no: String,
    wallet: String,
    amount: i64,
    currency: String,
    amount_display: String,
    summary: String,
}

/// One session: the conversation, the input being handled, and the gate.
struct Session {
    conv: Conversation,
    turn: Turn,
    gate: Gate,
}

/// The shape of a written session; a state of another version is not read.
const SNAPSHOT_VERSION: u32 = 1;

/// A session as [`SessionBook`] holds it (written with `json!` from the
/// live session, read back whole).
#[derive(Deserialize)]
struct Snapshot {
    v: u32,
    conv: Conversation,
    pending: Option<PendingSnapshot>,
    unsettled: Vec<Unsettled>,
}

/// An open confirmation, with its tool by name: a tool that is gone when
/// the session is read back voids the confirmation.
#[derive(Deserialize)]
struct PendingSnapshot {
    req: ConfirmationRequest,
    app: String,
    tool: String,
    args: Map<String, Value>,
    order: Option<Value>,
}

/// Resolves when the switch turns on; never, when its sender is gone.
async fn cancelled(mut rx: tokio::sync::watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await
    }
}

/// Per-session settings a server fixes when it opens a session.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    pub wallet: Option<String>,
    pub lang: Option<Lang>,
    /// The person, for memory and recommendations.
    pub user: Option<String>,
}

pub struct Agent {
    /// The engine, for the generic tool-calling path (apps without flows);
    /// `None` for an agent on a scripted generator (tests).
    engine: Option<Arc<Engine>>,
    /// Commands and chat replies (the engine, or a script in tests).
    generator: Arc<dyn crate::dialogue::generate::Generator>,
    /// Swapped whole when a mini-program registers at run time; the next
    /// model round sees the new set.
    tools: std::sync::RwLock<Arc<ToolSet>>,
    /// Per-session "stop generating" switches, outside the session lock
    /// (which the running turn holds).
    cancels: Mutex<HashMap<String, tokio::sync::watch::Sender<bool>>>,
    adapter: Arc<dyn Adapter>,
    audit: Audit,
    http: reqwest::Client,
    opts: AgentOptions,
    sessions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Session>>>>,
    /// Memory and the feed, when the server runs them.
    personal: std::sync::RwLock<Option<Arc<crate::memory::feed::Feed>>>,
}

/// How a call left the turn.
enum Flow {
    Continue,
    End,
}

type Tx = mpsc::Sender<AgentEvent>;

async fn emit(tx: &Tx, ev: AgentEvent) {
    // A client that went away must not stop the agent half-way: state and
    // audit are completed either way.
    let _ = tx.send(ev).await;
}

impl Agent {
    pub fn new(engine: Arc<Engine>, tools: Arc<ToolSet>, adapter: Arc<dyn Adapter>, audit: Audit, opts: AgentOptions) -> Arc<Self> {
        let generator = Arc::new(crate::dialogue::generate::EngineGenerator(engine.clone()));
        Self::build(Some(engine), generator, tools, adapter, audit, opts)
    }

    /// An agent whose model is `generator` alone (a script in unit tests):
    /// flows, the gate and payments work; apps without flows are not served.
    pub fn with_generator(generator: Arc<dyn crate::dialogue::generate::Generator>, tools: Arc<ToolSet>, adapter: Arc<dyn Adapter>, audit: Audit, opts: AgentOptions) -> Arc<Self> {
        Self::build(None, generator, tools, adapter, audit, opts)
    }

    fn build(engine: Option<Arc<Engine>>, generator: Arc<dyn crate::dialogue::generate::Generator>, tools: Arc<ToolSet>, adapter: Arc<dyn Adapter>, audit: Audit, opts: AgentOptions) -> Arc<Self> {
        Arc::new(Self {
            engine,
            generator,
            tools: std::sync::RwLock::new(tools),
            cancels: Mutex::new(HashMap::new()),
            adapter,
            audit,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("a plain HTTP client builds"),
            opts,
            sessions: Mutex::new(HashMap::new()),
            personal: std::sync::RwLock::new(None),
        })
    }

    /// Turns memory on (or off) for sessions that know their user.
    pub fn set_personal(&self, feed: Option<Arc<crate::memory::feed::Feed>>) {
        *self.personal.write().unwrap_or_else(|p| p.into_inner()) = feed;
    }

    pub fn personal(&self) -> Option<Arc<crate::memory::feed::Feed>> {
        self.personal.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// The tools offered now.
    pub fn tools(&self) -> Arc<ToolSet> {
        self.tools.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the tool set (a mini-program registered or left). The next
    /// model round of every session offers the new set.
    pub fn set_tools(&self, tools: Arc<ToolSet>) {
        *self.tools.write().unwrap_or_else(|p| p.into_inner()) = tools;
    }

    /// Fixes a session's wallet and language before its first input.
    pub async fn open_session(&self, session: &str, o: SessionOptions) {
        let s = self.session(session);
        let mut s = s.lock().await;
        s.conv.wallet = o.wallet;
        s.conv.user = o.user;
        if o.lang.is_some() {
            s.conv.lang = o.lang;
        }
    }

    /// Stops the model output of the session's running input: no further
    /// model round or tool call starts. Calls already made are not undone.
    pub fn cancel(&self, session: &str) {
        if let Some(c) = self.cancels.lock().unwrap_or_else(|p| p.into_inner()).get(session) {
            c.send_replace(true);
        }
    }

    fn cancel_switch(&self, session: &str) -> tokio::sync::watch::Receiver<bool> {
        let mut m = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
        let tx = m.entry(session.to_owned()).or_insert_with(|| tokio::sync::watch::channel(false).0);
        tx.send_replace(false);
        tx.subscribe()
    }

    /// The order as its merchant sees it now, through the app's status tool
    /// (`None` when the app has none or the service does not answer).
    pub async fn order_status(&self, app: &str, order: &Value) -> Option<Value> {
        let tools = self.tools();
        let status = tools.status_tool(app)?.clone();
        self.read_status(&status, order).await
    }

    /// The open confirmation of a session, if any (for clients that lost it).
    pub async fn pending(&self, session: &str) -> Option<ConfirmationRequest> {
        let s = self.session(session);
        let s = s.lock().await;
        s.gate.pending.as_ref().map(|p| p.req.clone())
    }

    /// The open confirmation without waiting: `None` also while an input is
    /// being handled (the turn holds the session; whatever it leaves open
    /// arrives as a `Confirmation` event).
    pub fn pending_now(&self, session: &str) -> Option<ConfirmationRequest> {
        let s = self.sessions.lock().unwrap_or_else(|p| p.into_inner()).get(session).cloned()?;
        let s = s.try_lock().ok()?;
        s.gate.pending.as_ref().map(|p| p.req.clone())
    }

    /// Writes a session to the book, when there is one.
    fn save(&self, sid: &str, s: &Session) -> Result<(), String> {
        let Some(book) = &self.opts.session_book else { return Ok(()) };
        let pending = s.gate.pending.as_ref().map(|p| json!({"req": p.req, "app": p.tool.app, "tool": p.tool.def.name, "args": p.args, "order": p.order}));
        let state = json!({"v": SNAPSHOT_VERSION, "conv": &s.conv, "pending": pending, "unsettled": &s.gate.unsettled});
        (book.0)(sid, &state).map_err(|e| format!("the conversation could not be saved ({e})"))
    }

    /// Puts back a session an earlier run wrote ([`SessionBook`]): the
    /// conversation, the flows, payments still to settle, and the open
    /// confirmation, which keeps its token and its expiry time (one that
    /// expired meanwhile is refused as expired when it is used, unless its
    /// order exists: then the tap only retries that order's payment).
    pub fn restore(&self, sid: &str, state: &Value) -> Result<(), String> {
        let snap: Snapshot = serde_json::from_value(state.clone()).map_err(|e| format!("unreadable session state: {e}"))?;
        if snap.v != SNAPSHOT_VERSION {
            return Err(format!("session state version {} (this build reads {SNAPSHOT_VERSION})", snap.v));
        }
        let tools = self.tools();
        let now = self.opts.clock.now_ms();
        let pending = snap.pending.and_then(|p| {
            let tool = tools.iter().find(|t| t.app == p.app && t.def.name == p.tool)?.clone();
            let left = u64::try_from(p.req.expires_ms.saturating_sub(now)).unwrap_or(0);
            Some(Pending { expires: std::time::Instant::now() + Duration::from_millis(left), req: p.req, tool, args: p.args, order: p.order })
        });
        let s = self.session(sid);
        let mut s = s.try_lock().map_err(|_| "the session is running an input".to_owned())?;
        s.conv = snap.conv;
        s.gate.pending = pending;
        s.gate.unsettled = snap.unsettled;
        Ok(())
    }

    /// Forgets a session (its open confirmation is dropped unredeemed).
    pub fn reset(&self, session: &str) {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner()).remove(session);
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(session);
    }

    fn session(&self, id: &str) -> Arc<tokio::sync::Mutex<Session>> {
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(Session {
                    conv: Conversation {
                        messages: Vec::new(),
                        lang: self.opts.lang,
                        evidence: Evidence::default(),
                        offered: Vec::new(),
                        offered_replies: Vec::new(),
                        focus: Vec::new(),
                        wallet: None,
                        user: None,
                        last_memory: None,
                        to_extract: None,
                        dialogue: Default::default(),
                        orders: Vec::new(),
                    },
                    turn: Turn {
                        stats: TurnStats::default(),
                        started: std::time::Instant::now(),
                        chosen: Vec::new(),
                        turn_calls: Vec::new(),
                        excluded: Vec::new(),
                        cancel: tokio::sync::watch::channel(false).1,
                    },
                    gate: Gate::default(),
                }))
            })
            .clone()
    }

    /// Handles one input; events arrive on the returned channel, ending with
    /// `Done` or `Error`. Inputs to the same session run one after another.
    pub fn handle(self: &Arc<Self>, session: &str, input: Input) -> mpsc::Receiver<AgentEvent> {
        let (tx, rx) = mpsc::channel(256);
        let me = self.clone();
        let sid = session.to_owned();
        tokio::spawn(async move {
            let s = me.session(&sid);
            let mut s = s.lock().await;
            s.turn.stats = TurnStats::default();
            s.turn.started = std::time::Instant::now();
            s.turn.turn_calls.clear();
            s.turn.excluded.clear();
            s.turn.chosen.clear();
            s.turn.cancel = me.cancel_switch(&sid);
            let r = match input {
                Input::Text(t) => me.on_text(&sid, &mut s, t, &tx).await,
                Input::Confirm { token } => me.on_confirm(&sid, &mut s, &token, &tx).await,
                Input::Decline { token } => me.on_decline(&sid, &mut s, &token, &tx).await,
            };
            s.turn.stats.total_ms = s.turn.started.elapsed().as_secs_f64() * 1000.0;
            // What the input changed is written before its `Done` announces it.
            let saved = me.save(&sid, &s);
            match r.and(saved) {
                Ok(()) => emit(&tx, AgentEvent::Done { stats: s.turn.stats.clone() }).await,
                Err(message) => emit(&tx, AgentEvent::Error { message }).await,
            }
        });
        rx
    }

    /// Collects every event of one input (tests, scripted clients).
    pub async fn run(self: &Arc<Self>, session: &str, input: Input) -> Vec<AgentEvent> {
        let mut rx = self.handle(session, input);
        let mut out = Vec::new();
        while let Some(ev) = rx.recv().await {
            out.push(ev);
        }
        out
    }

    fn audit_row(&self, sid: &str, actor: &str, kind: &str, tool: Option<&str>, detail: Value, outcome: &str) -> Result<(), String> {
        self.audit
            .record(sid, actor, kind, tool, &detail, outcome)
            .map_err(|e| format!("the audit log cannot be written ({e}); nothing further was done"))
    }

    async fn on_text(&self, sid: &str, s: &mut Session, text: String, tx: &Tx) -> Result<(), String> {
        let lang = *s.conv.lang.get_or_insert_with(|| Lang::detect(&text));
        if s.conv.messages.is_empty() {
            if let Some(engine) = &self.engine {
                s.conv.messages.push(Message::system(engine.info.prompt.prompts.system(lang, self.opts.clock.now_s())));
            }
        }
        s.conv.evidence.today = self.opts.clock.now_s().div_euclid(86_400);
        self.settle(s, lang, tx).await;
        let flows = !self.tools().flows().is_empty();
        if flows {
            if let Some(p) = &s.gate.pending {
                // Typed yes or no at an open confirmation: "no" declines; "yes"
                // does not pay (only the Confirm button's token does), it
                // points at the button.
                match crate::dialogue::yes_no(&text) {
                    Some(true) => {
                        let req = p.req.clone();
                        let t = crate::dialogue::say(lang, crate::dialogue::Say::TapToConfirm(&req.amount_display));
                        emit(tx, AgentEvent::Notice { text: t }).await;
                        emit(tx, AgentEvent::Confirmation(req)).await;
                        return Ok(());
                    }
                    Some(false) => {
                        let token = p.req.token.clone();
                        return self.on_decline(sid, s, &token, tx).await;
                    }
                    None => {}
                }
            }
        }
        // A sum is answered by code, exactly (a 0.5B model's chat guesses);
        // an open confirmation and the flows stay as they were.
        if let Some(answer) = crate::dialogue::arith::answer(&text, lang) {
            s.conv.messages.push(Message::user(text.clone()));
            s.conv.messages.push(Message::assistant(answer.clone()));
            s.conv.dialogue.note("user", &text);
            s.conv.dialogue.note("assistant", &answer);
            emit(tx, AgentEvent::Notice { text: answer }).await;
            return Ok(());
        }
        if let Some(p) = s.gate.pending.take() {
            // "Change it": the open confirmation is void; the model sees the
            // person's new words after the quote.
            self.audit_row(sid, "user", "superseded", Some(&p.tool.def.name), json!({"summary": p.req.summary, "amount": p.req.amount}), "replaced by a new message")?;
        }
        s.turn.chosen = s.conv.offered.iter().filter(|id| text.contains(id.as_str())).cloned().collect();
        s.conv.focus = route::next_focus(&self.tools(), &s.conv.focus, &text);
        // A tapped option says which item, nothing more: its label (a
        // restaurant's name and rating) is not the person's words for an
        // address or a note, so only the id counts as said.
        match s.conv.offered_replies.iter().find(|(r, _)| r == text.trim()) {
            Some((_, id)) => {
                let id = id.clone();
                s.conv.evidence.user.push(id);
            }
            None => s.conv.evidence.user.push(text.clone()),
        }
        s.conv.bound();
        let original = text.clone();
        let text = match self.personal_turn(sid, s, lang, &text, tx).await? {
            personal::Handled::Done => return Ok(()),
            personal::Handled::Continue(t) => t,
        };
        if flows {
            if let Some(fr) = s.conv.dialogue.stack.last_mut() {
                fr.quoted = false;
            }
            if self.flow_turn(sid, s, lang, &original, tx).await? {
                s.conv.messages.push(Message::user(text));
                self.after_turn(s, lang);
                return Ok(());
            }
        }
        if self.engine.is_none() {
            emit(tx, AgentEvent::Notice { text: crate::dialogue::say(lang, crate::dialogue::Say::CannotHandle) }).await;
            return Ok(());
        }
        s.conv.messages.push(Message::user(text));
        let r = self.rounds(sid, s, lang, self.opts.max_rounds, tx).await;
        self.after_turn(s, lang);
        r
    }

    /// Model rounds until the model answers without calling, a call ends the
    /// turn (confirmation, question, service failure), or the cap is hit.
    async fn rounds(&self, sid: &str, s: &mut Session, lang: Lang, max: usize, tx: &Tx) -> Result<(), String> {
        let mut nudged: Vec<String> = Vec::new();
        for _ in 0..max {
            if *s.turn.cancel.borrow() {
                emit(tx, AgentEvent::Notice { text: say(lang, Say::Stopped) }).await;
                return Ok(());
            }
            let (text, calls) = self.model_round(sid, s, lang, tx).await?;
            let mut reply = Message::assistant(text.trim().to_owned());
            if calls.is_empty() {
                s.conv.messages.push(reply);
                return Ok(());
            }
            reply.tool_calls = Some(
                calls
                    .iter()
                    .map(|(c, _)| TemplateToolCall {
                        kind: "function".into(),
                        function: TemplateFunction {
                            name: c.name.clone(),
                            arguments: Value::Object(c.arguments.clone()),
                        },
                    })
                    .collect(),
            );
            s.conv.messages.push(reply);
            let mut end = false;
            for (call, err) in calls {
                if !end && *s.turn.cancel.borrow() {
                    end = true;
                    emit(tx, AgentEvent::Notice { text: say(lang, Say::Stopped) }).await;
                }
                if end {
                    s.conv.messages.push(Message::tool(json!({"status": "skipped", "reason": "one step at a time"}).to_string()));
                    continue;
                }
                let n = s.conv.messages.len();
                match self.on_call(sid, s, lang, call, err, &mut nudged, tx).await {
                    Ok(Flow::End) => end = true,
                    Ok(Flow::Continue) => {}
                    Err(e) => {
                        // Every call gets its answer, so the template's
                        // call/answer pairing holds for the next turn.
                        if s.conv.messages.len() == n {
                            s.conv.messages.push(Message::tool(json!({"error": e}).to_string()));
                        }
                        return Err(e);
                    }
                }
            }
            if end {
                return Ok(());
            }
        }
        emit(tx, AgentEvent::Notice { text: say(lang, Say::TooManySteps) }).await;
        Ok(())
    }

    async fn model_round(&self, sid: &str, s: &mut Session, lang: Lang, tx: &Tx) -> Result<(String, Vec<(ToolCall, Option<String>)>), String> {
        self.fit_context(s, lang);
        let req = Request {
            session: Some(sid.to_owned()),
            prompt: Prompt::Chat {
                messages: s.conv.messages.clone(),
                tools: Some(self.tools()),
                lang: lang.code().into(),
            },
            max_tokens: self.opts.max_tokens,
            sampling: self.opts.sampling,
            stop: Vec::new(),
            constrain_tools: self.opts.constrain,
            grammar_tools: Some(Arc::new(self.grammar_tools(s))),
            require_call: false,
            share_prefix: true,
            grammar: None,
            compiled: Default::default(),
        };
        let engine = self.engine.as_ref().ok_or("no language model for plain tool calling")?;
        let mut rx = engine.submit(req).map_err(|e| e.to_string())?;
        let (mut text, mut calls) = (String::new(), Vec::new());
        let stop = cancelled(s.turn.cancel.clone());
        tokio::pin!(stop);
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                // Dropping the receiver stops the engine; the partial text
                // stays in the conversation, and no call is made.
                _ = &mut stop => {
                    drop(rx);
                    emit(tx, AgentEvent::Notice { text: say(lang, Say::Stopped) }).await;
                    return Ok((text, Vec::new()));
                }
            };
            let Some(ev) = ev else { break };
            match ev {
                Event::Delta(t) => {
                    if s.turn.stats.first_token_ms.is_none() {
                        s.turn.stats.first_token_ms = Some(s.turn.started.elapsed().as_secs_f64() * 1000.0);
                    }
                    text.push_str(&t);
                    emit(tx, AgentEvent::Token { text: t }).await;
                }
                Event::ToolCall { call, error } => calls.push((call, error)),
                Event::ToolCallMalformed { reason, .. } => {
                    // Shown to the model next round as a failed call.
                    calls.push((
                        ToolCall {
                            name: "malformed".into(),
                            arguments: Map::new(),
                        },
                        Some(format!("your tool call could not be parsed: {reason}")),
                    ));
                }
                Event::Done(u) => {
                    let st = &mut s.turn.stats;
                    st.add_round(u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.prefill_ms, u.decode_ms);
                    if st.first_token_ms.is_none() {
                        st.first_token_ms = Some(s.turn.started.elapsed().as_secs_f64() * 1000.0 - u.decode_ms);
                    }
                }
                Event::Error(e) => return Err(format!("the language model failed: {e}")),
            }
        }
        Ok((text, calls))
    }

    /// The tools as the grammar offers them this round: every id-like
    /// parameter (`restaurant_id`, `quote_id`, …) is narrowed to the ids this
    /// conversation's tool results returned, and a tool whose required id has
    /// none yet is left out. So the model has to search first and can only
    /// pick a real id; it cannot make one up.
    fn grammar_tools(&self, s: &Session) -> ToolSet {
        let g = self.grammar_tools_with(s, &s.turn.chosen);
        if g.is_empty() && !s.turn.chosen.is_empty() {
            // The pick fits no tool: offer everything as usual.
            return self.grammar_tools_with(s, &[]);
        }
        g
    }

    fn grammar_tools_with(&self, s: &Session, chosen: &[String]) -> ToolSet {
        let mut out = Vec::new();
        let all = self.tools();
        // Apps unregistered since the person named them no longer narrow anything.
        let focus: Vec<String> = s.conv.focus.iter().filter(|a| all.iter().any(|t| &t.app == *a)).cloned().collect();
        for t in all.iter() {
            if s.turn.excluded.contains(&t.def.name) || !route::offered(&focus, &t.app, &t.keywords) {
                continue;
            }
            let path: Vec<String> = t.def.endpoint.as_ref().map(|e| path_params(&e.path).into_iter().map(str::to_owned).collect()).unwrap_or_default();
            let mut def = t.def.clone();
            let uses_choice = std::cell::Cell::new(false);
            // After the person picked an option, the ids they picked are the
            // only ones on offer, and only tools that take them are offered.
            let candidates = |k: &str| {
                let all = s.conv.evidence.id_candidates(&t.app, k);
                let picked: Vec<String> = all.iter().filter(|c| chosen.contains(c)).cloned().collect();
                if picked.is_empty() {
                    all
                } else {
                    uses_choice.set(true);
                    picked
                }
            };
            if !narrow_ids(&mut def.parameters, &path, &candidates) {
                continue;
            }
            if !chosen.is_empty() && !uses_choice.get() {
                continue;
            }
            match Tool::new(&t.app, def) {
                Ok(mut n) => {
                    n.base_url = t.base_url.clone();
                    n.keywords = t.keywords.clone();
                    out.push(n);
                }
                // Narrowing never makes a valid schema invalid; keep the original if it did.
                Err(_) => out.push(Tool::new(&t.app, t.def.clone()).expect("loaded once already")),
            }
        }
        ToolSet::from_tools(out)
    }

    /// Drops the oldest exchanges (never the system prompt) until the prompt
    /// leaves room for a reply.
    fn fit_context(&self, s: &mut Session, lang: Lang) {
        let Some(engine) = &self.engine else { return };
        let info = &engine.info;
        let schemas = self.tools().template_json(lang.code());
        let room = self.opts.max_tokens.min(info.context_length / 4).max(16);
        loop {
            let n = info
                .prompt
                .tokens(&info.tokenizer, &s.conv.messages, &schemas)
                .map(|t| t.len())
                .unwrap_or(0);
            let users = s.conv.messages.iter().filter(|m| m.role == "user").count();
            // Never drop the system prompt or the latest user message.
            if n + room < info.context_length || s.conv.messages.len() <= 2 || users <= 1 {
                return;
            }
            s.conv.messages.remove(1);
            while s.conv.messages.len() > 2 && s.conv.messages[1].role != "user" {
                s.conv.messages.remove(1);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn on_call(
        &self,
        sid: &str,
        s: &mut Session,
        lang: Lang,
        call: ToolCall,
        err: Option<String>,
        nudged: &mut Vec<String>,
        tx: &Tx,
    ) -> Result<Flow, String> {
        let name = call.name.clone();
        let args_v = Value::Object(call.arguments.clone());
        emit(tx, AgentEvent::ToolCall { tool: name.clone(), arguments: args_v.clone() }).await;
        if let Some(e) = err {
            self.audit_row(sid, "model", "tool_call", Some(&name), json!({"arguments": args_v}), &format!("rejected: {e}"))?;
            s.conv.messages.push(Message::tool(json!({"error": e}).to_string()));
            emit(tx, AgentEvent::ToolResult { tool: name, ok: false, detail: e }).await;
            return Ok(Flow::Continue);
        }
        let Some(tool) = self.tools().get(&name).cloned() else {
            return Err(format!("tool {name} vanished"));
        };
        let endpoint_params: Vec<&str> = tool.def.endpoint.as_ref().map(|e| path_params(&e.path)).unwrap_or_default();
        let verdict = s.conv.evidence.check(&tool.def.parameters, &call.arguments, &endpoint_params);
        if !verdict.missing.is_empty() {
            let fields: Vec<String> = verdict.missing.iter().map(|(k, _)| present::field_words(k)).collect();
            let said: Vec<String> = verdict.missing.iter().map(|(k, v)| format!("{k}={v}")).collect();
            self.audit_row(sid, "model", "tool_call", Some(&name), json!({"arguments": args_v, "ungrounded": said}), "not run: arguments the user never gave")?;
            emit(tx, AgentEvent::ToolResult { tool: name.clone(), ok: false, detail: format!("not run: {} never given", said.join(", ")) }).await;
            let only_ids = verdict.missing.iter().all(|(k, _)| ground::id_like(k, &endpoint_params));
            if nudged.contains(&name) && !only_ids {
                // The model guessed twice: ask in our own words.
                s.conv.messages.push(Message::tool(json!({"error": "missing_information", "missing": fields}).to_string()));
                let q = say(lang, Say::NeedInfo { fields: &fields });
                s.conv.messages.push(Message::assistant(q.clone()));
                emit(tx, AgentEvent::Notice { text: q }).await;
                return Ok(Flow::End);
            }
            nudged.push(name.clone());
            let ids: Vec<&str> = verdict.missing.iter().map(|(k, _)| k.as_str()).filter(|k| ground::id_like(k, &endpoint_params)).collect();
            let message = if ids.len() == verdict.missing.len() {
                // Made-up ids: the model skipped a search.
                let searches = self.lookup_tools(&tool.app);
                format!(
                    "Not run: {} made up; ids come only from tool results. First call {} to get real ids.",
                    said.join(", "),
                    searches.join(" or ")
                )
            } else {
                format!(
                    "Not run. The user never said: {}. Do not guess. Ask the user one short question for: {}.",
                    said.join(", "),
                    fields.join(", ")
                )
            };
            s.conv.messages.push(Message::tool(json!({"error": "missing_information", "message": message}).to_string()));
            return Ok(Flow::Continue);
        }
        if !verdict.repaired.is_empty() {
            let r: Vec<String> = verdict.repaired.iter().map(|(k, was, now)| format!("{k}: {was} → {now}")).collect();
            self.audit_row(sid, "system", "repair", Some(&name), json!({"repaired": r}), "date taken from the user's words")?;
        }
        let args = verdict.args;
        let key = format!("{name} {}", Value::Object(args.clone()));
        if s.turn.turn_calls.contains(&key) {
            // A loop: the same call again. Say so, and offer the tool no more
            // in this input so the model has to move on.
            s.turn.excluded.push(name.clone());
            s.conv.messages.push(Message::tool(
                json!({"error": "already_done", "message": "This exact call already ran; its result is above. Use it: call the next tool or answer the user."}).to_string(),
            ));
            emit(tx, AgentEvent::ToolResult { tool: name, ok: false, detail: "repeated call, not run again".into() }).await;
            return Ok(Flow::Continue);
        }
        s.turn.turn_calls.push(key);
        let runs = s.turn.turn_calls.iter().filter(|k| k.split(' ').next() == Some(name.as_str())).count();
        if runs >= MAX_RUNS_PER_INPUT && !s.turn.excluded.contains(&name) {
            // Enough of this tool for one message: the grammar stops offering
            // it, so a model stuck re-searching has to use what it found.
            s.turn.excluded.push(name.clone());
        }
        if tool.def.confirm {
            return self.quote(sid, s, lang, &tool, args, false, tx).await;
        }
        let Some(endpoint) = tool.def.endpoint.clone() else {
            let msg = format!("`{name}` has no endpoint to call");
            s.conv.messages.push(Message::tool(json!({"error": msg}).to_string()));
            return Ok(Flow::Continue);
        };
        // Writes carry a fresh key, so the adapter's retries run them once.
        let key = (endpoint.method != "GET").then(|| format!("call_{:016x}", rand::random::<u64>()));
        let r = self
            .adapter
            .call(CallRequest { tool: &tool, endpoint: &endpoint, args: &args, idempotency_key: key, check_result: true, confirmed: None })
            .await;
        self.finish_call(sid, s, lang, &tool, &args, r, tx).await
    }

    /// Records a call's outcome, shows it, and feeds it back to the model.
    #[allow(clippy::too_many_arguments)]
    async fn finish_call(
        &self,
        sid: &str,
        s: &mut Session,
        lang: Lang,
        tool: &Tool,
        args: &Map<String, Value>,
        r: Result<Value, AdapterError>,
        tx: &Tx,
    ) -> Result<Flow, String> {
        let name = tool.def.name.as_str();
        match r {
            Ok(v) => {
                self.audit_row(sid, "model", "tool_call", Some(name), json!({"arguments": args}), "ok")?;
                s.conv.evidence.add_result(&tool.app, name, &v);
                emit(tx, AgentEvent::ToolResult { tool: name.into(), ok: true, detail: String::new() }).await;
                if let Some(kind) = &tool.def.card {
                    let card = present::card(kind, name, &tool.app, &v, lang);
                    if !card.options.is_empty() {
                        s.conv.offered = card.options.iter().map(|o| o.id.clone()).collect();
                        s.conv.offered_replies = card.options.iter().map(|o| (o.reply.clone(), o.id.clone())).collect();
                    }
                    emit(tx, AgentEvent::Card(card)).await;
                }
                s.conv.messages.push(Message::tool(compact(&v).to_string()));
                Ok(Flow::Continue)
            }
            Err(e) => {
                self.audit_row(sid, "model", "tool_call", Some(name), json!({"arguments": args, "error": e.model}), &format!("{:?}", e.kind))?;
                emit(tx, AgentEvent::ToolResult { tool: name.into(), ok: false, detail: e.model.clone() }).await;
                s.conv.messages.push(Message::tool(json!({"error": e.model}).to_string()));
                match e.kind {
                    // The model can fix its request.
                    ErrorKind::Rejected | ErrorKind::InvalidArguments => Ok(Flow::Continue),
                    _ => {
                        s.conv.messages.push(Message::assistant(e.user.clone()));
                        emit(tx, AgentEvent::Notice { text: e.user }).await;
                        Ok(Flow::End)
                    }
                }
            }
        }
    }

    /// Quotes a confirmed tool and opens the confirmation. With
    /// `speak_errors` (flows) a refused quote is told to the person; else
    /// the model reads it and may fix its call.
    #[allow(clippy::too_many_arguments)]
    async fn quote(&self, sid: &str, s: &mut Session, lang: Lang, tool: &Arc<Tool>, args: Map<String, Value>, speak_errors: bool, tx: &Tx) -> Result<Flow, String> {
        let name = tool.def.name.clone();
        let quote = match &tool.def.quote {
            Some(ep) => {
                let r = self
                    .adapter
                    .call(CallRequest { tool, endpoint: ep, args: &args, idempotency_key: None, check_result: false, confirmed: None })
                    .await;
                match r {
                    Ok(q) => q,
                    Err(e) if speak_errors => {
                        self.audit_row(sid, "system", "quote", Some(&name), json!({"arguments": args, "error": e.model}), &format!("{:?}", e.kind))?;
                        emit(tx, AgentEvent::ToolResult { tool: name.clone(), ok: false, detail: e.model.clone() }).await;
                        self.tell(s, tx, e.user.clone()).await;
                        return Ok(Flow::End);
                    }
                    Err(e) => return self.finish_call(sid, s, lang, tool, &args, Err(e), tx).await,
                }
            }
            // A confirmed tool without a quote costs nothing to state.
            None => json!({"summary": format!("{} {}", name, Value::Object(args.clone())), "amount": 0, "currency": "CNY"}),
        };
        let (Some(summary), Some(amount), Some(currency)) = (quote["summary"].as_str(), quote["amount"].as_i64(), quote["currency"].as_str()) else {
            let e = format!("`{name}` quote is missing summary/amount/currency: {quote}");
            self.audit_row(sid, "model", "tool_call", Some(&name), json!({"arguments": args, "error": e}), "bad quote")?;
            let text = format!("The {} service sent an unusable quote, so nothing was ordered.", tool.app);
            s.conv.messages.push(Message::tool(json!({"error": e}).to_string()));
            s.conv.messages.push(Message::assistant(text.clone()));
            emit(tx, AgentEvent::Notice { text }).await;
            return Ok(Flow::End);
        };
        if amount < 0 {
            return Err(format!("`{name}` quoted a negative amount"));
        }
        let token = hex::encode(rand::random::<[u8; 16]>());
        let ttl = self.opts.confirmation_ttl;
        let req = ConfirmationRequest {
            token: token.clone(),
            tool: name.clone(),
            app: tool.app.clone(),
            summary: summary.to_owned(),
            amount,
            currency: currency.to_owned(),
            amount_display: money(amount, currency),
            payment_method: format!("{} (wallet {})", self.opts.pay_method, s.conv.wallet.as_deref().unwrap_or(&self.opts.wallet)),
            expires_ms: self.opts.clock.now_ms() + ttl.as_millis() as i64,
        };
        self.audit_row(
            sid,
            "model",
            "confirmation_request",
            Some(&name),
            json!({"arguments": args, "summary": summary, "amount": amount, "currency": currency, "token_id": token_id(&token)}),
            "awaiting the user's answer",
        )?;
        s.conv.evidence.add_result(&tool.app, &name, &quote);
        s.conv.messages.push(Message::tool(
            json!({"status": "awaiting_user_confirmation", "summary": summary, "amount": req.amount_display, "note": "The app is asking the user to confirm. Do not claim it is done."})
                .to_string(),
        ));
        s.gate.pending = Some(Pending {
            req: req.clone(),
            tool: tool.clone(),
            args,
            expires: std::time::Instant::now() + ttl,
            order: None,
        });
        // Written before it is shown, so a confirmation on the screen
        // survives a restart of the server.
        if let Err(e) = self.save(sid, s) {
            s.gate.pending = None;
            return Err(format!("{e}; nothing was ordered"));
        }
        emit(tx, AgentEvent::Confirmation(req)).await;
        Ok(Flow::End)
    }

    /// The tools of `app` that look things up (no confirmation needed),
    /// searches first: where real ids come from.
    fn lookup_tools(&self, app: &str) -> Vec<String> {
        use crate::tools::Role;
        let mut v: Vec<(String, bool)> = self
            .tools()
            .iter()
            .filter(|t| t.app == app && !t.def.confirm && t.def.role != Some(Role::Status))
            .map(|t| (t.def.name.clone(), matches!(t.def.role, Some(Role::Search | Role::Quote))))
            .collect();
        v.sort_by_key(|(_, first)| !first);
        v.into_iter().take(2).map(|(n, _)| n).collect()
    }

    fn take_pending(&self, sid: &str, s: &mut Session, token: &str, kind: &str) -> Result<Option<Pending>, String> {
        // An expired confirmation whose order already exists (its payment
        // was cut off or unknown, and the server may have been down past
        // the expiry) still only retries that payment: it is taken, so the
        // order is not left unpaid and quoted again.
        let ok = s
            .gate
            .pending
            .as_ref()
            .is_some_and(|p| constant_eq(p.req.token.as_bytes(), token.as_bytes()) && (p.expires > std::time::Instant::now() || p.order.is_some()));
        if !ok {
            let expired = s.gate.pending.as_ref().is_some_and(|p| constant_eq(p.req.token.as_bytes(), token.as_bytes()));
            if expired {
                s.gate.pending = None;
            }
            self.audit_row(sid, "user", kind, None, json!({"token_id": token_id(token)}), if expired { "refused: expired" } else { "refused: unknown token" })?;
            return Ok(None);
        }
        Ok(s.gate.pending.take())
    }

    async fn on_decline(&self, sid: &str, s: &mut Session, token: &str, tx: &Tx) -> Result<(), String> {
        let lang = s.conv.lang.unwrap_or(Lang::En);
        let Some(p) = self.take_pending(sid, s, token, "decline")? else {
            emit(tx, AgentEvent::Notice { text: say(lang, Say::TokenInvalid) }).await;
            return Ok(());
        };
        self.audit_row(sid, "user", "decline", Some(&p.tool.def.name), json!({"summary": p.req.summary, "amount": p.req.amount, "token_id": token_id(token)}), "declined; nothing run")?;
        s.conv.messages.push(Message::user(match lang {
            Lang::Zh => "不用了，取消。",
            Lang::Ko => "아니요, 취소할게요.",
            Lang::En => "No, don't do it.",
        }));
        let mut text = if p.order.is_some() {
            // The order was created but its payment failed or is unknown.
            say(lang, Say::DeclinedUnpaid)
        } else {
            say(lang, Say::Declined)
        };
        if let Some(fr) = s.conv.dialogue.stack.last_mut().filter(|f| f.quoted) {
            // The flow stays: the person may change something and get a new quote.
            fr.quoted = false;
            if p.order.is_none() {
                text = crate::dialogue::say(lang, crate::dialogue::Say::DeclinedKeep);
            } else {
                s.conv.dialogue.stack.pop();
            }
        }
        s.conv.messages.push(Message::assistant(text.clone()));
        emit(tx, AgentEvent::Notice { text }).await;
        Ok(())
    }

    async fn on_confirm(&self, sid: &str, s: &mut Session, token: &str, tx: &Tx) -> Result<(), String> {
        let lang = s.conv.lang.unwrap_or(Lang::En);
        let Some(mut p) = self.take_pending(sid, s, token, "confirm")? else {
            emit(tx, AgentEvent::Notice { text: say(lang, Say::TokenInvalid) }).await;
            return Ok(());
        };
        let name = p.tool.def.name.clone();
        let wallet = s.conv.wallet.clone().unwrap_or_else(|| self.opts.wallet.clone());
        self.audit_row(sid, "user", "confirm", Some(&name), json!({"summary": p.req.summary, "amount": p.req.amount, "currency": p.req.currency, "token_id": token_id(token)}), "confirmed")?;
        let order = match p.order.clone() {
            Some(o) => o,
            None => {
                let endpoint = p.tool.def.endpoint.clone().ok_or("confirmed tool has no endpoint")?;
                let r = self
                    .adapter
                    .call(CallRequest {
                        tool: &p.tool,
                        endpoint: &endpoint,
                        args: &p.args,
                        // A repeat of this confirmation runs the order at most once.
                        idempotency_key: Some(format!("confirm-{token}")),
                        check_result: true,
                        confirmed: Some((p.req.amount, p.req.currency.clone())),
                    })
                    .await;
                match r {
                    Ok(v) => {
                        self.audit_row(sid, "system", "tool_call", Some(&name), json!({"arguments": p.args, "result": v}), "ok")?;
                        s.conv.evidence.add_result(&p.tool.app, &name, &v);
                        v
                    }
                    Err(e) => {
                        self.audit_row(sid, "system", "tool_call", Some(&name), json!({"arguments": p.args, "error": e.model}), &format!("{:?}", e.kind))?;
                        emit(tx, AgentEvent::ToolResult { tool: name.clone(), ok: false, detail: e.model.clone() }).await;
                        let text = if matches!(e.kind, ErrorKind::Timeout | ErrorKind::Unreachable | ErrorKind::ServerError) {
                            // Unknown outcome: keep the confirmation so a retry
                            // reuses the same idempotency key.
                            let t = say(lang, Say::RetryConfirm { reason: &e.user });
                            s.gate.pending = Some(p);
                            t
                        } else {
                            s.conv.messages.push(Message::tool(json!({"error": e.model}).to_string()));
                            e.user.clone()
                        };
                        emit(tx, AgentEvent::Notice { text }).await;
                        return Ok(());
                    }
                }
            }
        };
        let payment = order.get("payment").cloned().filter(|x| x.is_object());
        let mut paid: Option<Value> = None;
        // Only a purchase awaiting payment is paid here; a cancellation's
        // result carries the original payment, refunded by the merchant.
        if let Some(pay) = payment.filter(|x| x["status"] == "awaiting_payment") {
            let (amount, currency) = (pay["amount"].as_i64().unwrap_or(-1), pay["currency"].as_str().unwrap_or("").to_owned());
            let otn = pay["out_trade_no"].as_str().unwrap_or_default().to_owned();
            p.order = Some(order.clone());
            // Written down before any money moves (a crash after paying must
            // not lose the order); a book that cannot write stops the payment.
            let booked = match &self.opts.order_book {
                None => Ok(()),
                Some(book) => (book.0)(&PlacedOrder {
                    session: sid,
                    user: s.conv.user.as_deref(),
                    app: &p.tool.app,
                    tool: &name,
                    order_id: self.tools().order_id(&p.tool.app, &name, &order),
                    order: &order,
                    summary: &p.req.summary,
                    amount,
                    currency: &currency,
                }),
            };
            let outcome = if amount != p.req.amount || currency != p.req.currency {
                PayOutcome::Refused(say(lang, Say::PriceChanged { quoted: p.req.amount_display.clone(), now: money(amount, &currency) }))
            } else if let Err(e) = booked {
                PayOutcome::Failed(format!("the order could not be recorded ({e}), so nothing was paid"))
            } else {
                // The session is written down as "paying" first: after a
                // crash from here on, the trade is asked about before the
                // next message (unsettled), and the confirmation still pays
                // only this order.
                let paying = Unsettled {
                    out_trade_no: otn.clone(),
                    wallet: wallet.clone(),
                    amount,
                    currency: currency.clone(),
                    amount_display: p.req.amount_display.clone(),
                    summary: p.req.summary.clone(),
                };
                let known = s.gate.unsettled.iter().any(|u| u.out_trade_no == otn);
                if !known {
                    s.gate.unsettled.push(paying);
                }
                s.gate.pending = Some(p);
                let saved = self.save(sid, s);
                p = s.gate.pending.take().expect("set just above");
                match saved {
                    Err(e) => {
                        if !known {
                            s.gate.unsettled.retain(|u| u.out_trade_no != otn);
                        }
                        PayOutcome::Failed(format!("{e}, so nothing was paid"))
                    }
                    Ok(()) => self.pay(&p.tool.app, &otn, p.req.amount, &p.req.currency, token, &wallet).await,
                }
            };
            // The person hears about money first; the audit row follows, and a
            // failure to write it after money moved is reported, not hidden.
            let (status, reason, txn) = match &outcome {
                PayOutcome::Paid(t) => ("paid", None, t["transaction_id"].as_str().map(str::to_owned)),
                PayOutcome::Failed(r) | PayOutcome::Insufficient(r) | PayOutcome::Refused(r) => ("failed", Some(r.clone()), None),
                PayOutcome::Unknown(r) => ("unknown", Some(r.clone()), None),
            };
            emit(tx, AgentEvent::Payment(PaymentEvent { out_trade_no: otn.clone(), status: status.into(), amount, currency: currency.clone(), transaction_id: txn.clone(), reason: reason.clone() })).await;
            if let Err(e) = self.audit_row(sid, "system", "payment", Some(&name), json!({"out_trade_no": otn, "amount": amount, "currency": currency, "transaction_id": txn, "wallet": wallet, "reason": reason}), status) {
                emit(tx, AgentEvent::Notice { text: format!("warning: {e}") }).await;
            }
            match outcome {
                PayOutcome::Paid(trade) => {
                    s.gate.unsettled.retain(|u| u.out_trade_no != otn);
                    paid = Some(trade)
                }
                PayOutcome::Refused(text) => {
                    s.gate.unsettled.retain(|u| u.out_trade_no != otn);
                    s.conv.messages.push(Message::tool(json!({"status": "not_paid", "reason": text}).to_string()));
                    s.conv.messages.push(Message::assistant(text.clone()));
                    emit(tx, AgentEvent::Notice { text }).await;
                    return Ok(());
                }
                PayOutcome::Failed(ref reason) | PayOutcome::Insufficient(ref reason) | PayOutcome::Unknown(ref reason) => {
                    // The order exists unpaid (or its payment is unknown):
                    // confirming again retries the payment only, with the same key.
                    let text = match &outcome {
                        PayOutcome::Unknown(_) => say(lang, Say::RetryConfirm { reason }),
                        PayOutcome::Insufficient(_) => say(lang, Say::Insufficient { reason }),
                        _ => say(lang, Say::PaymentFailed { reason }),
                    };
                    // An unknown outcome stays unsettled (it was recorded as
                    // paying before the call); a known unpaid one needs no
                    // asking later.
                    if status != "unknown" {
                        s.gate.unsettled.retain(|u| u.out_trade_no != otn);
                    }
                    p.expires = std::time::Instant::now() + self.opts.confirmation_ttl;
                    p.req.expires_ms = self.opts.clock.now_ms() + self.opts.confirmation_ttl.as_millis() as i64;
                    // The unpaid order is the person's: it is recorded and
                    // followed, so a friend paying it through a link shows.
                    emit(tx, AgentEvent::Order { app: p.tool.app.clone(), tool: name.clone(), order_id: self.tools().order_id(&p.tool.app, &name, &order), order: order.clone() }).await;
                    s.gate.pending = Some(p);
                    emit(tx, AgentEvent::Notice { text }).await;
                    return Ok(());
                }
            }
        }
        // Show the order as the merchant now sees it (paid, with its next
        // status), through the app's status tool when it has one.
        let shown = match self.order_status(&p.tool.app, &order).await {
            Some(v) => v,
            None => {
                let mut shown = order.clone();
                if let (Some(trade), Some(obj)) = (&paid, shown.get_mut("payment").and_then(Value::as_object_mut)) {
                    obj.insert("status".into(), json!("paid"));
                    obj.insert("transaction_id".into(), trade["transaction_id"].clone());
                }
                shown
            }
        };
        if let Some(kind) = &p.tool.def.card {
            emit(tx, AgentEvent::Card(present::card(kind, &name, &p.tool.app, &shown, lang))).await;
        }
        emit(tx, AgentEvent::Order { app: p.tool.app.clone(), tool: name.clone(), order_id: self.tools().order_id(&p.tool.app, &name, &shown), order: shown.clone() }).await;
        // An action on an order of this conversation (cancel, lock) uses it up.
        let acted_on: Vec<Value> = s.conv.dialogue.stack.last().filter(|f| f.quoted).map(|f| f.chosen.values().cloned().collect()).unwrap_or_default();
        let before = s.conv.orders.len();
        s.conv.orders.retain(|(_, o)| !acted_on.contains(o));
        if s.conv.orders.len() == before {
            s.conv.orders.push((p.tool.app.clone(), shown.clone()));
        }
        if paid.is_some() {
            self.remember_order(s, &p.tool.app, &name, &p.args, &p.req.summary, p.req.amount, &p.req.currency).await;
        }
        let text = if paid.is_some() {
            say(lang, Say::Paid { amount: p.req.amount_display.clone(), summary: &p.req.summary })
        } else {
            say(lang, Say::Done { summary: &p.req.summary })
        };
        // The model learns the outcome with the next message; the person
        // hears it now, in fixed words, so nothing is re-ordered or misstated.
        s.conv.messages.push(Message::tool(json!({"status": if paid.is_some() { "confirmed_and_paid" } else { "confirmed" }, "result": compact(&shown)}).to_string()));
        s.conv.messages.push(Message::assistant(text.clone()));
        emit(tx, AgentEvent::Notice { text }).await;
        // The flow that quoted it is done; a task waiting below it goes on.
        if s.conv.dialogue.stack.last().is_some_and(|f| f.quoted) {
            s.conv.dialogue.stack.pop();
            self.run_stack(sid, s, lang, &[], "", tx).await?;
        }
        Ok(())
    }

    /// Reads an order through a status tool, filling the tool's required
    /// parameters from the order's fields.
    async fn read_status(&self, status: &Tool, order: &Value) -> Option<Value> {
        let required: Vec<&str> = status.def.parameters["required"].as_array()?.iter().filter_map(Value::as_str).collect();
        let mut args = Map::new();
        for k in required {
            args.insert(k.to_owned(), order.get(k)?.clone());
        }
        let ep = status.def.endpoint.clone()?;
        self.adapter
            .call(CallRequest { tool: status, endpoint: &ep, args: &args, idempotency_key: None, check_result: true, confirmed: None })
            .await
            .ok()
    }

    /// Asks the payment service about each payment whose outcome was
    /// unknown: one that went through is reported paid (and its open
    /// confirmation closed, so it is not paid again), one whose trade closed
    /// unpaid is reported as not charged, and the rest are asked about
    /// again at the next message.
    async fn settle(&self, s: &mut Session, lang: Lang, tx: &Tx) {
        if s.gate.unsettled.is_empty() {
            return;
        }
        let Some(base) = self.opts.pay_url.clone() else { return };
        for u in std::mem::take(&mut s.gate.unsettled) {
            let url = format!("{}/v1/trades/{}", base.trim_end_matches('/'), crate::adapter::encode_segment(&u.out_trade_no));
            let credential = self.opts.pay_credentials.as_ref().map(|c| (c.0)(&u.wallet)).unwrap_or_default();
            let trade = match self.http.get(&url).bearer_auth(&credential).send().await {
                Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
                _ => None,
            };
            let status = trade.as_ref().and_then(|t| t["status"].as_str()).unwrap_or("");
            let text = match status {
                "SUCCESS" | "REFUND" => {
                    let txn = trade.as_ref().and_then(|t| t["transaction_id"].as_str()).map(str::to_owned);
                    emit(tx, AgentEvent::Payment(PaymentEvent { out_trade_no: u.out_trade_no.clone(), status: "paid".into(), amount: u.amount, currency: u.currency.clone(), transaction_id: txn, reason: None })).await;
                    if s.gate.pending.as_ref().and_then(|p| p.order.as_ref()).is_some_and(|o| o["payment"]["out_trade_no"] == u.out_trade_no.as_str()) {
                        // Its confirmation is used up, and the flow that
                        // quoted it is done (else the next message quotes
                        // the same order again).
                        if let Some(p) = s.gate.pending.take() {
                            s.conv.orders.push((p.tool.app.clone(), p.order.clone().unwrap_or_default()));
                        }
                        if s.conv.dialogue.stack.last().is_some_and(|f| f.quoted) {
                            s.conv.dialogue.stack.pop();
                        }
                    }
                    say(lang, Say::SettledPaid { amount: u.amount_display.clone(), summary: &u.summary })
                }
                "CLOSED" => say(lang, Say::SettledUnpaid { amount: u.amount_display.clone(), summary: &u.summary }),
                _ => {
                    s.gate.unsettled.push(u);
                    continue;
                }
            };
            emit(tx, AgentEvent::Notice { text }).await;
        }
    }

    /// Pays a trade from the configured wallet, after checking that the
    /// trade is the merchant's and for the confirmed amount. Any error is
    /// followed by a query, so a payment that went through is never
    /// reported as failed.
    async fn pay(&self, mch: &str, out_trade_no: &str, amount: i64, currency: &str, token: &str, wallet: &str) -> PayOutcome {
        let Some(base) = &self.opts.pay_url else {
            return PayOutcome::Failed("no payment service is configured".into());
        };
        let url = format!("{}/v1/trades/{}", base.trim_end_matches('/'), crate::adapter::encode_segment(out_trade_no));
        let credential = self.opts.pay_credentials.as_ref().map(|c| (c.0)(wallet)).unwrap_or_default();
        let trade = match self.http.get(&url).bearer_auth(&credential).send().await {
            Ok(r) if r.status().is_success() => r.json::<Value>().await.unwrap_or(Value::Null),
            Ok(r) => return PayOutcome::Failed(format!("the payment service does not know trade {out_trade_no} ({})", r.status())),
            Err(e) => return PayOutcome::Failed(format!("the payment service did not answer ({e}); nothing was paid")),
        };
        if trade["amount"].as_i64() != Some(amount) || trade["currency"] != currency || trade["mch_id"] != mch {
            return PayOutcome::Refused(format!(
                "trade {out_trade_no} is for {} {} to `{}`, not the {} to `{mch}` you confirmed; nothing was paid",
                trade["amount"], trade["currency"], trade["mch_id"].as_str().unwrap_or("?"), money(amount, currency)
            ));
        }
        if trade["status"] == "SUCCESS" || trade["status"] == "REFUND" {
            return PayOutcome::Paid(trade);
        }
        let r = self
            .http
            .post(format!("{url}/pay"))
            .bearer_auth(&credential)
            .header("Idempotency-Key", format!("pay-{token}"))
            .json(&json!({"wallet_id": wallet, "method": self.opts.pay_method}))
            .send()
            .await;
        let mut short = false;
        let failure = match r {
            Ok(resp) => {
                let status = resp.status();
                let v: Value = resp.json().await.unwrap_or(Value::Null);
                if status.is_success() && (v["status"] == "SUCCESS" || v["status"] == "REFUND") {
                    return PayOutcome::Paid(v);
                }
                short = v["error"]["code"] == "insufficient_balance";
                v["error"]["message"].as_str().map(str::to_owned).unwrap_or_else(|| format!("the payment service answered {status}"))
            }
            Err(e) => format!("the payment service did not answer ({e})"),
        };
        // What happened? Ask.
        match self.http.get(&url).bearer_auth(&credential).send().await {
            Ok(r) if r.status().is_success() => {
                let t: Value = r.json().await.unwrap_or(Value::Null);
                match t["status"].as_str() {
                    Some("SUCCESS") | Some("REFUND") => PayOutcome::Paid(t),
                    Some("NOTPAY") | Some("CLOSED") if short => PayOutcome::Insufficient(failure),
                    Some("NOTPAY") | Some("CLOSED") => PayOutcome::Failed(failure),
                    _ => PayOutcome::Unknown(failure),
                }
            }
            _ => PayOutcome::Unknown(failure),
        }
    }
}

/// Limits id-like string properties of an object schema (recursively, into
/// arrays of objects) to `candidates(key)`. Returns false when a required id
/// has no candidate at all; optional ids without candidates are removed.
fn narrow_ids(schema: &mut Value, path: &[String], candidates: &dyn Fn(&str) -> Vec<String>) -> bool {
    let required: Vec<String> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return true;
    };
    let keys: Vec<String> = props.keys().cloned().collect();
    let path_refs: Vec<&str> = path.iter().map(String::as_str).collect();
    for k in keys {
        let prop = props.get_mut(&k).expect("key from this map");
        if prop["type"] == "array" && prop["items"]["type"] == "object" {
            if !narrow_ids(&mut prop["items"], &[], candidates) && required.contains(&k) {
                return false;
            }
            continue;
        }
        if prop["type"] == "string" && prop.get("enum").is_none() && !ground::id_like(&k, &path_refs) {
            // A value the app's results use under this very key (a train's
            // `seat_class`): the grammar offers those values only.
            let c = candidates(&k);
            if c.len() >= 2 {
                if let Some(o) = prop.as_object_mut() {
                    o.insert("enum".into(), json!(c));
                }
            }
            continue;
        }
        if !(ground::id_like(&k, &path_refs) && prop["type"] == "string") {
            continue;
        }
        let c = candidates(&k);
        if c.is_empty() {
            if required.contains(&k) {
                return false;
            }
            props.remove(&k);
        } else if let Some(o) = prop.as_object_mut() {
            o.insert("enum".into(), json!(c));
        }
    }
    true
}

enum PayOutcome {
    Paid(Value),
    /// Definitely not paid.
    Failed(String),
    /// Not paid: the wallet holds too little (the service's words).
    Insufficient(String),
    /// Not attempted: the trade is not what was confirmed.
    Refused(String),
    /// The payment service could not say; a retry is safe (same key).
    Unknown(String),
}

/// A short, non-secret handle for a token in logs.
fn token_id(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(token.as_bytes())[..6])
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

//! Chat sessions as the server keeps them, apart from any connection.
//!
//! A session belongs to one user. It has a numbered log of every frame it
//! produced (for resume and history), the client ids it has already run
//! (so a re-sent input never repeats an action), the connections that
//! currently watch it, and one worker task that feeds its inputs to the
//! agent one after another.
//!
//! Nothing here ever waits on a client: frames go to each connection's
//! bounded queue with `try_send`, and a connection whose queue is full is
//! dropped (it resumes from its last `seq`). The agent, and behind it the
//! engine, therefore never slow down for a slow reader.

use super::metrics::Metrics;
use super::orders::OrderRow;
use super::store::{SessionRow, Store, StoredFrame, StoredSession};
use crate::agent::present::Card;
use crate::agent::{Agent, AgentEvent, Input, SessionOptions};
use crate::prompt::Lang;
use crate::world::Clock;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};

/// Frames kept per session for resume and history.
const LOG_CAP: usize = 4000;
/// The frame log's size in bytes at most (long replies make big frames).
const LOG_BYTES: usize = 4 << 20;
/// Client ids remembered for duplicate detection, newest kept.
const SEEN_CAP: usize = 1024;
/// Cards whose options can still be tapped, newest kept.
const CARDS_CAP: usize = 64;
/// Inputs that may wait behind the one running.
const QUEUE: usize = 4;
/// Frames dropped from the memory log before the store drops them too
/// (one delete per this many, not one per frame).
const STORE_TRIM: u64 = 256;

/// What a connection's writer sends.
pub type OutFrame = Arc<str>;

pub struct Subscriber {
    pub conn: u64,
    pub tx: mpsc::Sender<OutFrame>,
    /// Notified when the hub drops this subscriber for reading too slowly.
    pub kick: Arc<Notify>,
}

struct Job {
    reply_to: String,
    input: Input,
}

struct Inner {
    seq: u64,
    log: VecDeque<(u64, Option<String>, OutFrame)>,
    log_bytes: usize,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
    subscribers: Vec<Subscriber>,
    cards: HashMap<String, Card>,
    card_order: VecDeque<String>,
    busy: bool,
    turns: u64,
    last_active_ms: i64,
    /// The latest confirmation request, to describe the order it leads to.
    last_confirmation: Option<Value>,
    closed: bool,
    /// Frames below this seq are gone from the store as well.
    stored_from: u64,
}

pub struct ChatSession {
    pub id: String,
    pub user: String,
    pub created_ms: i64,
    clock: Clock,
    /// Every frame is written here before any watcher gets it.
    store: Arc<dyn Store>,
    inner: Mutex<Inner>,
    jobs: mpsc::Sender<Job>,
    /// Set when the session is deleted: no input is taken any more, and
    /// the worker ends once the running input is done.
    closed: watch::Sender<bool>,
}

/// Why an input was not queued.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// Already run (or running): its frames were sent again.
    Duplicate,
    Busy,
    NotFound,
}

impl Inner {
    /// Remembers a client id for duplicate detection (the newest [`SEEN_CAP`]).
    fn remember_id(&mut self, id: &str) {
        if self.seen.insert(id.to_owned()) {
            self.seen_order.push_back(id.to_owned());
            while self.seen_order.len() > SEEN_CAP {
                if let Some(old) = self.seen_order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
    }

    /// Keeps a card's options tappable (the newest [`CARDS_CAP`] cards).
    fn keep_card(&mut self, id: String, card: Card) {
        if self.cards.insert(id.clone(), card).is_none() {
            self.card_order.push_back(id);
            while self.card_order.len() > CARDS_CAP {
                if let Some(old) = self.card_order.pop_front() {
                    self.cards.remove(&old);
                }
            }
        }
    }
}

impl ChatSession {
    /// A fresh session and the receiving end of its input queue.
    fn new(id: String, user: &str, clock: Clock, store: Arc<dyn Store>) -> (Self, mpsc::Receiver<Job>) {
        let (jobs, rx) = mpsc::channel(QUEUE);
        let now = clock.now_ms();
        let s = ChatSession {
            id,
            user: user.to_owned(),
            created_ms: now,
            clock,
            store,
            inner: Mutex::new(Inner {
                seq: 0,
                log: VecDeque::new(),
                log_bytes: 0,
                seen: HashSet::new(),
                seen_order: VecDeque::new(),
                subscribers: Vec::new(),
                cards: HashMap::new(),
                card_order: VecDeque::new(),
                busy: false,
                turns: 0,
                last_active_ms: now,
                last_confirmation: None,
                closed: false,
                stored_from: 0,
            }),
            jobs,
            closed: watch::channel(false).0,
        };
        (s, rx)
    }

    /// A session an earlier run stored, with its log, client ids, cards and
    /// counters rebuilt from the frames. Inputs that were accepted but never
    /// finished (the server died while they ran or waited) are returned:
    /// the caller answers each with an `interrupted` error.
    fn restored(st: StoredSession, clock: Clock, store: Arc<dyn Store>) -> (Self, mpsc::Receiver<Job>, Vec<String>) {
        let (s, rx) = Self::new(st.row.id.clone(), &st.row.user, clock, store);
        let s = ChatSession { created_ms: st.row.created_ms, ..s };
        // Each input's state by its last frame: still open, finished, or
        // answered "send it again" (`interrupted`, `shutting_down`), in the
        // order the inputs first appear.
        let mut inputs: Vec<(String, &'static str)> = Vec::new();
        let mut unfinished = Vec::new();
        {
            let mut inner = s.lock();
            inner.turns = st.row.turns;
            inner.last_active_ms = st.row.last_active_ms;
            inner.stored_from = st.frames.first().map(|f| f.seq).unwrap_or(0);
            for f in st.frames {
                let v: Value = serde_json::from_str(&f.text).unwrap_or(Value::Null);
                if let Some(id) = &f.reply_to {
                    inner.remember_id(id);
                    let state = match (v["type"].as_str(), v["code"].as_str()) {
                        (Some("error"), Some("interrupted" | "shutting_down")) => "again",
                        (Some("done" | "error"), _) => "done",
                        _ => "open",
                    };
                    match inputs.iter_mut().find(|(i, _)| i == id) {
                        Some(e) if state != "open" => e.1 = state,
                        Some(_) => {}
                        None => inputs.push((id.clone(), state)),
                    }
                }
                match v["type"].as_str() {
                    Some("card") => {
                        if let (Some(cid), Ok(card)) = (v["card_id"].as_str(), serde_json::from_value::<Card>(v["card"].clone())) {
                            inner.keep_card(cid.to_owned(), card);
                        }
                    }
                    Some("confirmation") => inner.last_confirmation = Some(v.clone()),
                    _ => {}
                }
                inner.seq = inner.seq.max(f.seq);
                inner.log_bytes += f.text.len();
                inner.log.push_back((f.seq, f.reply_to, f.text.into()));
            }
            // An input answered "send it again" may be sent again, under
            // its id, however many restarts later.
            for (id, state) in inputs {
                match state {
                    "again" => {
                        inner.seen.remove(&id);
                    }
                    "open" => unfinished.push(id),
                    _ => {}
                }
            }
        }
        (s, rx, unfinished)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a frame to the log and hands it to every watcher.
    pub fn publish(&self, reply_to: Option<&str>, body: Map<String, Value>, metrics: &Metrics) -> u64 {
        self.publish_locked(&mut self.lock(), reply_to, body, metrics)
    }

    fn publish_locked(&self, inner: &mut Inner, reply_to: Option<&str>, mut body: Map<String, Value>, metrics: &Metrics) -> u64 {
        inner.seq += 1;
        let seq = inner.seq;
        body.insert("seq".into(), json!(seq));
        body.insert("reply_to".into(), json!(reply_to));
        if let Some(t) = body.get("type").and_then(Value::as_str) {
            metrics.inc("errand_ws_frames_total", &[("direction", "out"), ("type", t)]);
        }
        let text: OutFrame = Value::Object(body).to_string().into();
        // In the store before anyone sees it (a resume after a crash
        // replays what clients were shown, and no more).
        if self.store.append_frame(&self.id, &StoredFrame { seq, reply_to: reply_to.map(str::to_owned), text: text.to_string() }).is_err() {
            metrics.inc("errand_store_errors_total", &[("what", "frame")]);
        }
        inner.log_bytes += text.len();
        inner.log.push_back((seq, reply_to.map(str::to_owned), text.clone()));
        while inner.log.len() > LOG_CAP || (inner.log_bytes > LOG_BYTES && inner.log.len() > 1) {
            if let Some((_, _, f)) = inner.log.pop_front() {
                inner.log_bytes -= f.len();
            }
        }
        let oldest = inner.log.front().map(|(s, _, _)| *s).unwrap_or(seq);
        if oldest >= inner.stored_from + STORE_TRIM {
            if self.store.forget_frames_before(&self.id, oldest).is_err() {
                metrics.inc("errand_store_errors_total", &[("what", "trim")]);
            }
            inner.stored_from = oldest;
        }
        inner.last_active_ms = self.clock.now_ms();
        inner.subscribers.retain(|s| match s.tx.try_send(text.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics.inc("errand_ws_slow_clients_total", &[]);
                s.kick.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        seq
    }

    /// Adds a watcher after sending it `welcome` and every logged frame
    /// after `last_seq`, all under one lock so nothing is missed or doubled.
    /// Consecutive `delta` frames of one input are replayed as one (under
    /// the last one's seq), so a long reply fits the watcher's queue.
    /// `welcome` learns whether frames the client missed are no longer
    /// kept (`truncated`). Returns false when the backlog still does not fit.
    pub fn subscribe(&self, sub: Subscriber, mut welcome: Map<String, Value>, last_seq: u64) -> bool {
        let mut inner = self.lock();
        if inner.closed {
            return false;
        }
        let oldest = inner.log.front().map(|(s, _, _)| *s).unwrap_or(inner.seq + 1);
        welcome.insert("seq".into(), json!(inner.seq));
        // `last_seq` comes from the client: any u64, even past our seq.
        welcome.insert("truncated".into(), json!(last_seq.saturating_add(1) < oldest && last_seq < inner.seq));
        let mut replay: Vec<Value> = Vec::new();
        for (seq, _, f) in inner.log.iter().filter(|(s, _, _)| *s > last_seq) {
            let Ok(v) = serde_json::from_str::<Value>(f) else { continue };
            if let Some(prev) = replay.last_mut() {
                if v["type"] == "delta" && prev["type"] == "delta" && prev["reply_to"] == v["reply_to"] {
                    let text = format!("{}{}", prev["text"].as_str().unwrap_or(""), v["text"].as_str().unwrap_or(""));
                    prev["text"] = json!(text);
                    prev["seq"] = json!(seq);
                    continue;
                }
            }
            replay.push(v);
        }
        if replay.len() + 1 > sub.tx.capacity() {
            return false;
        }
        let _ = sub.tx.try_send(Value::Object(welcome).to_string().into());
        for v in replay {
            let _ = sub.tx.try_send(v.to_string().into());
        }
        inner.subscribers.push(sub);
        true
    }

    pub fn unsubscribe(&self, conn: u64) {
        self.lock().subscribers.retain(|s| s.conn != conn);
    }

    pub fn seq(&self) -> u64 {
        self.lock().seq
    }

    /// Whether an input with this client id was accepted before.
    pub fn has_seen(&self, id: &str) -> bool {
        self.lock().seen.contains(id)
    }

    pub fn busy(&self) -> bool {
        self.lock().busy
    }

    /// Whether the session was deleted.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Frames after `after`, oldest first.
    pub fn history(&self, after: u64) -> Vec<Value> {
        self.lock()
            .log
            .iter()
            .filter(|(s, _, _)| *s > after)
            .filter_map(|(_, _, f)| serde_json::from_str(f).ok())
            .collect()
    }

    pub fn summary(&self) -> Value {
        let inner = self.lock();
        json!({
            "id": self.id,
            "created_ms": self.created_ms,
            "last_active_ms": inner.last_active_ms,
            "turns": inner.turns,
            "busy": inner.busy,
            "seq": inner.seq,
        })
    }

    /// The reply text of option `option` on card `card`.
    pub fn option_reply(&self, card: &str, option: &str) -> Option<String> {
        let inner = self.lock();
        inner.cards.get(card)?.options.iter().find(|o| o.id == option).map(|o| o.reply.clone())
    }

    /// Queues an input under the client's id. A repeated id runs nothing:
    /// that input's frames go to `resend` again instead. The check, the
    /// queueing and the `ack` happen under one lock, so two tabs sending
    /// the same id cannot both run it, and `ack` always precedes the
    /// input's own frames.
    pub fn submit(&self, id: &str, input: Input, user_text: Option<&str>, resend: &Subscriber, metrics: &Metrics) -> Result<(), Refused> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(Refused::NotFound);
        }
        if inner.seen.contains(id) {
            let frames: Vec<OutFrame> = inner
                .log
                .iter()
                .filter(|(_, r, _)| r.as_deref() == Some(id))
                .map(|(_, _, f)| f.clone())
                .collect();
            drop(inner);
            let ack: OutFrame = json!({"type": "ack", "id": id, "duplicate": true, "reply_to": id}).to_string().into();
            for f in std::iter::once(ack).chain(frames) {
                if resend.tx.try_send(f).is_err() {
                    resend.kick.notify_one();
                    break;
                }
            }
            return Err(Refused::Duplicate);
        }
        // try_send never waits, so holding the lock here is fine.
        if self.jobs.try_send(Job { reply_to: id.to_owned(), input }).is_err() {
            return Err(Refused::Busy);
        }
        inner.remember_id(id);
        let mut ack = Map::new();
        ack.insert("type".into(), json!("ack"));
        ack.insert("id".into(), json!(id));
        ack.insert("duplicate".into(), json!(false));
        self.publish_locked(&mut inner, Some(id), ack, metrics);
        if let Some(t) = user_text {
            let mut f = Map::new();
            f.insert("type".into(), json!("user"));
            f.insert("text".into(), json!(t));
            self.publish_locked(&mut inner, Some(id), f, metrics);
        }
        Ok(())
    }

    /// Stops taking input and drops every watcher (their sockets are
    /// told the session is gone by the kick).
    fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        for s in inner.subscribers.drain(..) {
            s.kick.notify_one();
        }
        drop(inner);
        self.closed.send_replace(true);
    }
}

/// Turns agent events into protocol frames (`None`: not shown to clients).
pub fn frame_of(ev: &AgentEvent) -> Option<Map<String, Value>> {
    let v = match ev {
        AgentEvent::Token { text } => json!({"type": "delta", "text": text}),
        AgentEvent::Notice { text } => json!({"type": "notice", "text": text}),
        AgentEvent::ToolCall { tool, arguments } => json!({"type": "tool", "phase": "call", "tool": tool, "arguments": arguments}),
        AgentEvent::ToolResult { tool, ok, detail } => json!({"type": "tool", "phase": "result", "tool": tool, "ok": ok, "detail": detail}),
        AgentEvent::Card(c) => json!({"type": "card", "card": c}),
        AgentEvent::Confirmation(c) => {
            let mut v = serde_json::to_value(c).ok()?;
            v["type"] = json!("confirmation");
            v
        }
        AgentEvent::Payment(p) => {
            let mut v = serde_json::to_value(p).ok()?;
            v["type"] = json!("payment");
            v
        }
        AgentEvent::Order { app, order_id, order, .. } => json!({"type": "order", "app": app, "order_id": order_id, "status": order["status"], "order": order}),
        AgentEvent::Done { stats } => json!({"type": "done", "usage": {
            "model_rounds": stats.model_rounds,
            "prompt_tokens": stats.prompt_tokens,
            "cached_tokens": stats.cached_tokens,
            "completion_tokens": stats.completion_tokens,
            "first_token_ms": stats.first_token_ms,
            "total_ms": stats.total_ms,
        }}),
        AgentEvent::Error { message } => json!({"type": "error", "code": "internal", "message": message}),
    };
    match v {
        Value::Object(m) => Some(m),
        _ => None,
    }
}


pub struct Hub {
    sessions: Mutex<HashMap<String, Arc<ChatSession>>>,
    agent: Arc<Agent>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    /// Cloned by every session worker, order watcher and socket; shutdown
    /// waits until only this one is left.
    pub(super) tasks: Arc<()>,
    order_poll: Duration,
    /// Orders a watcher follows now (`user/app/order_id`): an order
    /// reported again (its payment retried after a failure) gets no second.
    followed: Mutex<HashSet<String>>,
    next_conn: AtomicU64,
    clock: Clock,
}

impl Hub {
    pub fn new(agent: Arc<Agent>, store: Arc<dyn Store>, metrics: Arc<Metrics>, shutdown: watch::Receiver<bool>, order_poll: Duration, clock: Clock) -> Self {
        Self {
            clock,
            sessions: Mutex::new(HashMap::new()),
            agent,
            store,
            metrics,
            shutdown,
            tasks: Arc::new(()),
            order_poll,
            followed: Mutex::new(HashSet::new()),
            next_conn: AtomicU64::new(1),
        }
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ChatSession>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn count(&self) -> usize {
        self.map().len()
    }

    /// The session if it exists and is `user`'s; someone else's is "not found".
    pub fn get(&self, user: &str, id: &str) -> Option<Arc<ChatSession>> {
        self.map().get(id).filter(|s| s.user == user).cloned()
    }

    pub fn list(&self, user: &str) -> Vec<Arc<ChatSession>> {
        let mut v: Vec<_> = self.map().values().filter(|s| s.user == user).cloned().collect();
        v.sort_by_key(|s| s.created_ms);
        v
    }

    /// A new session for `user`. Never refused: sessions idle longer than
    /// `idle` (with nobody attached and nothing running) are dropped first,
    /// and at `limit` the user's least recently used session makes room,
    /// preferring one nobody is attached to and nothing runs in. (Refusing
    /// the 17th locked a person out, since sessions never ended.)
    pub async fn create(self: &Arc<Self>, user: &str, wallet: &str, lang: Option<Lang>, limit: usize, idle: Duration) -> Arc<ChatSession> {
        let id = format!("s-{}", hex::encode(rand::random::<[u8; 16]>()));
        let (session, rx) = ChatSession::new(id.clone(), user, self.clock.clone(), self.store.clone());
        let session = Arc::new(session);
        let row = SessionRow {
            id: id.clone(),
            user: user.to_owned(),
            wallet: wallet.to_owned(),
            lang: lang.map(|l| l.code().to_owned()),
            created_ms: session.created_ms,
            last_active_ms: session.created_ms,
            turns: 0,
        };
        if self.store.put_session(&row).is_err() {
            self.metrics.inc("errand_store_errors_total", &[("what", "session")]);
        }
        let evicted = {
            let mut map = self.map();
            let now = self.clock.now_ms();
            let idle_ms = i64::try_from(idle.as_millis()).unwrap_or(i64::MAX);
            // (key, busy or attached, last active) per session.
            let state = |s: &ChatSession| {
                let i = s.lock();
                (i.busy || !i.subscribers.is_empty(), i.last_active_ms)
            };
            let mut gone: Vec<Arc<ChatSession>> = Vec::new();
            let expired: Vec<String> = map
                .iter()
                .filter(|(_, s)| {
                    let (in_use, last) = state(s);
                    !in_use && now.saturating_sub(last) > idle_ms
                })
                .map(|(k, _)| k.clone())
                .collect();
            gone.extend(expired.iter().filter_map(|k| map.remove(k)));
            while map.values().filter(|s| s.user == user).count() >= limit.max(1) {
                let victim = map
                    .iter()
                    .filter(|(_, s)| s.user == user)
                    .min_by_key(|(_, s)| state(s))
                    .map(|(k, _)| k.clone());
                match victim.and_then(|k| map.remove(&k)) {
                    Some(s) => gone.push(s),
                    None => break,
                }
            }
            map.insert(id.clone(), session.clone());
            gone
        };
        for s in evicted {
            self.metrics.inc("errand_sessions_evicted_total", &[]);
            self.forget(&s);
        }
        self.agent.open_session(&id, SessionOptions { wallet: Some(wallet.to_owned()), lang, user: Some(user.to_owned()) }).await;
        self.spawn_worker(session.clone(), rx);
        session
    }

    fn spawn_worker(self: &Arc<Self>, s: Arc<ChatSession>, rx: mpsc::Receiver<Job>) {
        let hub = self.clone();
        let guard = self.tasks.clone();
        tokio::spawn(async move {
            hub.worker(s, rx).await;
            drop(guard);
        });
    }

    /// Closes a session that left the map, and deletes it from the store.
    fn forget(&self, s: &ChatSession) {
        s.close();
        self.agent.cancel(&s.id);
        if self.store.delete_session(&s.id).is_err() {
            self.metrics.inc("errand_store_errors_total", &[("what", "session")]);
        }
    }

    /// Brings back the sessions an earlier run stored (call once, before
    /// serving): each resumes from any `seq` its clients hold, with its
    /// conversation, flows and open confirmation. An input the earlier
    /// run accepted but did not finish is answered with an `interrupted`
    /// error, and its id may be sent again. Returns how many came back.
    pub async fn restore(self: &Arc<Self>) -> usize {
        let stored = match self.store.sessions() {
            Ok(v) => v,
            Err(_) => {
                self.metrics.inc("errand_store_errors_total", &[("what", "restore")]);
                return 0;
            }
        };
        let n = stored.len();
        for st in stored {
            let state = st.state.clone();
            let lang = st.row.lang.as_deref().and_then(Lang::parse);
            let wallet = st.row.wallet.clone();
            let (session, rx, unfinished) = ChatSession::restored(st, self.clock.clone(), self.store.clone());
            let session = Arc::new(session);
            let id = session.id.clone();
            self.agent.open_session(&id, SessionOptions { wallet: Some(wallet), lang, user: Some(session.user.clone()) }).await;
            if let Some(state) = state {
                if self.agent.restore(&id, &state).is_err() {
                    self.metrics.inc("errand_store_errors_total", &[("what", "state")]);
                }
            }
            for input in unfinished {
                let mut f = Map::new();
                f.insert("type".into(), json!("error"));
                f.insert("code".into(), json!("interrupted"));
                f.insert("id".into(), json!(input));
                f.insert(
                    "message".into(),
                    json!("the server stopped while this input ran or waited; what it did before is shown above, and any confirmation it showed is still open. Send it again if it is still wanted"),
                );
                session.publish(Some(&input), f, &self.metrics);
                session.lock().seen.remove(&input);
            }
            self.map().insert(id, session.clone());
            self.spawn_worker(session, rx);
        }
        n
    }

    /// Deletes a session: it takes no more input, its watchers are
    /// dropped, a reply being written is stopped, and the agent forgets it
    /// once the running input (if any) is over.
    pub fn remove(&self, user: &str, id: &str) -> bool {
        let removed = {
            let mut map = self.map();
            match map.get(id) {
                Some(s) if s.user == user => map.remove(id),
                _ => None,
            }
        };
        match removed {
            Some(s) => {
                self.forget(&s);
                true
            }
            None => false,
        }
    }

    /// Runs a session's inputs one at a time until shutdown or removal.
    async fn worker(self: Arc<Self>, s: Arc<ChatSession>, mut jobs: mpsc::Receiver<Job>) {
        let mut shutdown = self.shutdown.clone();
        let mut closed = s.closed.subscribe();
        loop {
            let job = tokio::select! {
                job = jobs.recv() => job,
                _ = super::stopped(&mut shutdown) => None,
                _ = super::stopped(&mut closed) => None,
            };
            let stopping = *shutdown.borrow() || *closed.borrow();
            if stopping || job.is_none() {
                // Inputs accepted but not started are answered, not lost silently.
                jobs.close();
                for j in job.into_iter().chain(std::iter::from_fn(|| jobs.try_recv().ok())) {
                    let mut f = Map::new();
                    f.insert("type".into(), json!("error"));
                    f.insert("code".into(), json!("shutting_down"));
                    f.insert("id".into(), json!(j.reply_to));
                    f.insert("message".into(), json!("this input was not run: the server is shutting down or the session was deleted; send it again later"));
                    s.publish(Some(&j.reply_to), f, &self.metrics);
                    s.lock().seen.remove(&j.reply_to);
                }
                if *closed.borrow() {
                    self.agent.reset(&s.id);
                }
                return;
            }
            let job = job.expect("checked above");
            s.lock().busy = true;
            self.run_job(&s, job).await;
            let (last, turns) = {
                let mut inner = s.lock();
                inner.busy = false;
                inner.turns += 1;
                (inner.last_active_ms, inner.turns)
            };
            if self.store.touch_session(&s.id, last, turns).is_err() {
                self.metrics.inc("errand_store_errors_total", &[("what", "session")]);
            }
        }
    }

    async fn run_job(self: &Arc<Self>, s: &Arc<ChatSession>, job: Job) {
        let m = &self.metrics;
        let mut events = self.agent.handle(&s.id, job.input);
        let mut outcome = "ok";
        while let Some(ev) = events.recv().await {
            match &ev {
                AgentEvent::ToolResult { tool, ok, .. } => m.inc("errand_tool_calls_total", &[("tool", tool), ("outcome", if *ok { "ok" } else { "failed" })]),
                AgentEvent::Confirmation(c) => {
                    m.inc("errand_tool_calls_total", &[("tool", &c.tool), ("outcome", "awaiting_confirmation")]);
                    s.lock().last_confirmation = serde_json::to_value(c).ok();
                }
                AgentEvent::Payment(p) => m.inc("errand_payments_total", &[("status", &p.status)]),
                AgentEvent::Done { stats } => {
                    m.add("errand_tokens_total", &[("kind", "prompt")], stats.prompt_tokens as f64);
                    m.add("errand_tokens_total", &[("kind", "cached")], stats.cached_tokens as f64);
                    m.add("errand_tokens_total", &[("kind", "completion")], stats.completion_tokens as f64);
                    if let Some(t) = stats.first_token_ms {
                        m.observe("errand_ttft_seconds", t / 1000.0);
                    }
                    m.observe("errand_turn_seconds", stats.total_ms / 1000.0);
                }
                AgentEvent::Error { .. } => outcome = "error",
                _ => {}
            }
            if let AgentEvent::Order { app, tool, order_id: Some(oid), order } = &ev {
                self.track_order(s, app, tool, oid, order);
            }
            let Some(mut f) = frame_of(&ev) else { continue };
            if let AgentEvent::Card(c) = &ev {
                let card_id = format!("c{}", s.seq() + 1);
                f.insert("card_id".into(), json!(card_id));
                s.lock().keep_card(card_id, c.clone());
            }
            if let AgentEvent::Error { .. } = &ev {
                f.insert("id".into(), json!(job.reply_to));
            }
            s.publish(Some(&job.reply_to), f, m);
        }
        m.inc("errand_turns_total", &[("outcome", outcome)]);
    }

    /// Records a confirmed order for its user and follows its status,
    /// pushing an `order` frame whenever it changes.
    fn track_order(self: &Arc<Self>, s: &Arc<ChatSession>, app: &str, tool: &str, oid: &str, order: &Value) {
        let oid = oid.to_owned();
        let conf = s.lock().last_confirmation.clone().unwrap_or(Value::Null);
        let pay = &order["payment"];
        let row = OrderRow {
            user: s.user.clone(),
            session: s.id.clone(),
            app: app.to_owned(),
            tool: tool.to_owned(),
            order_id: oid.clone(),
            status: order["status"].as_str().unwrap_or("unknown").to_owned(),
            amount: pay["amount"].as_i64().or(conf["amount"].as_i64()).unwrap_or(0),
            currency: pay["currency"].as_str().or(conf["currency"].as_str()).unwrap_or("CNY").to_owned(),
            summary: conf["summary"].as_str().unwrap_or_default().to_owned(),
            payment_status: pay["status"].as_str().unwrap_or_default().to_owned(),
            data: order.clone(),
        };
        if self.store.upsert_order(&row).is_err() {
            self.metrics.inc("errand_store_errors_total", &[("what", "order")]);
        }
        let key = format!("{}/{app}/{oid}", s.user);
        if !self.followed.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone()) {
            return;
        }
        let hub = self.clone();
        let s = s.clone();
        let app = app.to_owned();
        let mut last = order.clone();
        let guard = self.tasks.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let _guard = guard;
            // Follow for at most an hour of polling.
            for _ in 0..(3600_000 / hub.order_poll.as_millis().max(1) as u64) {
                if hub.agent.tools().is_final(&app, last["status"].as_str().unwrap_or("")) {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(hub.order_poll) => {}
                    _ = super::stopped(&mut shutdown) => break,
                }
                let Some(now) = hub.agent.order_status(&app, &last).await else { continue };
                if now["status"] != last["status"] || now["payment"]["status"] != last["payment"]["status"] {
                    let status = now["status"].as_str().unwrap_or("unknown");
                    let _ = hub.store.update_order(&s.user, &app, &oid, status, now["payment"]["status"].as_str(), &now);
                    let f = frame_of(&AgentEvent::Order { app: app.clone(), tool: String::new(), order_id: Some(oid.clone()), order: now.clone() });
                    if let Some(f) = f {
                        s.publish(None, f, &hub.metrics);
                    }
                    last = now;
                }
            }
            hub.followed.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> (ChatSession, mpsc::Receiver<Job>) {
        let store = super::super::store::SqliteStore::in_memory(crate::world::Clock::pinned(0)).unwrap();
        ChatSession::new("s-test".into(), "alice", crate::world::Clock::pinned(0), Arc::new(store))
    }

    fn delta(t: &str) -> Map<String, Value> {
        json!({"type": "delta", "text": t}).as_object().unwrap().clone()
    }

    fn sub(cap: usize) -> (Subscriber, mpsc::Receiver<OutFrame>, Arc<Notify>) {
        let (tx, rx) = mpsc::channel(cap);
        let kick = Arc::new(Notify::new());
        (Subscriber { conn: 1, tx, kick: kick.clone() }, rx, kick)
    }

    /// Regression (issue 23, finding 10): a session's frame log, client ids
    /// and cards grew without bound.
    #[test]
    fn finding_10_a_sessions_state_stays_bounded() {
        let (s, _jobs) = session();
        let m = Metrics::default();
        let big = "x".repeat(64 * 1024);
        for i in 0..200 {
            s.publish(Some("m1"), delta(&format!("{i}{big}")), &m);
        }
        let inner = s.lock();
        assert!(inner.log_bytes <= LOG_BYTES + big.len() + 100, "{} bytes logged", inner.log_bytes);
        assert_eq!(inner.log_bytes, inner.log.iter().map(|(_, _, f)| f.len()).sum::<usize>());
        assert_eq!(inner.log.back().map(|(seq, _, _)| *seq), Some(200), "the newest frame is kept");
        drop(inner);
        let mut inner = s.lock();
        for i in 0..5000 {
            inner.remember_id(&format!("m{i}"));
            let card = Card { kind: "k".into(), tool: "t".into(), app: "a".into(), data: Value::Null, options: Vec::new() };
            inner.keep_card(format!("c{i}"), card);
        }
        assert_eq!((inner.seen.len(), inner.seen_order.len()), (SEEN_CAP, SEEN_CAP));
        assert!(inner.seen.contains("m4999") && !inner.seen.contains("m0"));
        assert_eq!(inner.cards.len(), CARDS_CAP);
        assert!(inner.cards.contains_key("c4999") && !inner.cards.contains_key("c0"));
    }

    #[tokio::test]
    async fn a_reader_that_falls_behind_is_dropped_and_publishing_never_waits() {
        let (s, _jobs) = session();
        let m = Metrics::default();
        let (sub, mut rx, kick) = sub(16);
        assert!(s.subscribe(sub, Map::new(), 0));
        // Far more frames than the reader's queue holds: publish returns
        // every time, and the reader is kicked and removed.
        for i in 0..100 {
            s.publish(Some("m1"), delta(&i.to_string()), &m);
        }
        tokio::time::timeout(Duration::from_secs(1), kick.notified()).await.expect("kicked");
        assert!(s.lock().subscribers.is_empty());
        let mut got = 0;
        while rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, 16, "welcome plus what fitted");
        assert!(m.render(&[]).contains("errand_ws_slow_clients_total 1"));
    }

    #[tokio::test]
    async fn an_input_id_runs_once_and_a_closed_session_takes_none() {
        let (s, mut jobs) = session();
        let m = Metrics::default();
        let (me, mut rx, _) = sub(64);
        s.submit("m1", Input::Text("hi".into()), Some("hi"), &me, &m).unwrap();
        assert_eq!(s.submit("m1", Input::Text("hi".into()), Some("hi"), &me, &m), Err(Refused::Duplicate));
        assert_eq!(jobs.try_recv().unwrap().reply_to, "m1");
        assert!(jobs.try_recv().is_err(), "queued once");
        // The duplicate's answer: ack {duplicate: true} and m1's frames again.
        let first: Value = serde_json::from_str(&rx.try_recv().unwrap()).unwrap();
        assert_eq!((first["type"].as_str(), first["duplicate"].as_bool()), (Some("ack"), Some(true)));
        let again: Vec<Value> = std::iter::from_fn(|| rx.try_recv().ok()).map(|f| serde_json::from_str(&f).unwrap()).collect();
        assert_eq!(again.iter().map(|f| f["type"].as_str().unwrap()).collect::<Vec<_>>(), ["ack", "user"]);
        // A full queue refuses without marking the id as seen.
        for i in 0..QUEUE {
            s.submit(&format!("q{i}"), Input::Text("x".into()), None, &me, &m).unwrap();
        }
        assert_eq!(s.submit("late", Input::Text("x".into()), None, &me, &m), Err(Refused::Busy));
        assert!(!s.has_seen("late"));
        s.close();
        assert_eq!(s.submit("m9", Input::Text("x".into()), None, &me, &m), Err(Refused::NotFound));
        assert!(!s.subscribe(sub(8).0, Map::new(), 0));
    }

    #[tokio::test]
    async fn resume_replays_a_long_reply_as_one_delta_within_the_queue() {
        let (s, _jobs) = session();
        let m = Metrics::default();
        for i in 0..1000 {
            s.publish(Some("m1"), delta(&format!("{} ", i)), &m);
        }
        let mut done = Map::new();
        done.insert("type".into(), json!("done"));
        s.publish(Some("m1"), done, &m);
        let (me, mut rx, _) = sub(16);
        assert!(s.subscribe(me, Map::new(), 10));
        let frames: Vec<Value> = std::iter::from_fn(|| rx.try_recv().ok()).map(|f| serde_json::from_str(&f).unwrap()).collect();
        assert_eq!(frames.len(), 3, "welcome, one delta, done");
        assert_eq!((frames[0]["seq"].as_u64(), frames[0]["truncated"].as_bool()), (Some(1001), Some(false)));
        assert!(frames[1]["text"].as_str().unwrap().starts_with("10 11 12 "));
        assert!(frames[1]["text"].as_str().unwrap().ends_with("999 "));
        assert_eq!((frames[1]["seq"].as_u64(), frames[2]["seq"].as_u64()), (Some(1000), Some(1001)));
    }

    /// Regression: `last_seq: u64::MAX` from a client overflowed (a panic in
    /// the socket's task) instead of meaning "nothing to replay".
    #[tokio::test]
    async fn any_last_seq_a_client_sends_is_safe() {
        let (s, _jobs) = session();
        let m = Metrics::default();
        s.publish(Some("m1"), delta("a"), &m);
        for last in [u64::MAX, u64::MAX - 1, 5, 0] {
            let (me, mut rx, _) = sub(16);
            assert!(s.subscribe(me, Map::new(), last));
            let n = std::iter::from_fn(|| rx.try_recv().ok()).count();
            assert_eq!(n, if last == 0 { 2 } else { 1 }, "last_seq {last}");
        }
    }
}

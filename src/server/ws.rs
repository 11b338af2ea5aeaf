//! `/v1/ws`: the chat protocol of `docs/protocol.md`, version 1.
//!
//! Each socket is split into a reader (this task) and a writer task that
//! drains the connection's bounded queue. The reader never writes to the
//! socket itself, and the hub only `try_send`s into the queue, so a client
//! that stops reading is disconnected (close 4408) instead of holding up
//! the agent. Bad frames get an `error` frame and the connection goes on.

use super::hub::{ChatSession, OutFrame, Refused, Subscriber};
use super::AppState;
use crate::agent::Input;
use crate::prompt::Lang;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::sync::{mpsc, Notify};

pub const PROTOCOL_VERSION: u64 = 1;
/// Close codes (4000–4999 are the application's).
const CLOSE_UNAUTHORIZED: u16 = 4401;
const CLOSE_TOO_SLOW: u16 = 4408;
const CLOSE_GOING_AWAY: u16 = 1001;
/// The server is at a limit for this client: try again later (RFC 6455 1013).
const CLOSE_TRY_AGAIN: u16 = 1013;
/// A socket must say `hello` within this long.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// One frame may take this long to write before the peer counts as gone.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientFrame {
    Hello {
        #[serde(default)]
        v: Option<u64>,
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        session: Option<String>,
        #[serde(default)]
        last_seq: Option<u64>,
        #[serde(default)]
        lang: Option<String>,
    },
    Message {
        id: String,
        text: String,
    },
    Confirm {
        id: String,
        token: String,
    },
    Decline {
        id: String,
        token: String,
    },
    Select {
        id: String,
        card: String,
        option: String,
    },
    Cancel {
        #[serde(default)]
        #[allow(dead_code)]
        id: Option<String>,
    },
    Resume {
        session: String,
        #[serde(default)]
        last_seq: Option<u64>,
    },
    Ping,
}

impl ClientFrame {
    fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Hello { .. } => "hello",
            ClientFrame::Message { .. } => "message",
            ClientFrame::Confirm { .. } => "confirm",
            ClientFrame::Decline { .. } => "decline",
            ClientFrame::Select { .. } => "select",
            ClientFrame::Cancel { .. } => "cancel",
            ClientFrame::Resume { .. } => "resume",
            ClientFrame::Ping => "ping",
        }
    }
}

/// A client's text frame, or the `bad_frame` message to answer it with.
fn parse_frame(text: &str) -> Result<ClientFrame, String> {
    serde_json::from_str(text).map_err(|e| {
        let kind = serde_json::from_str::<Value>(text).ok().and_then(|v| v["type"].as_str().map(str::to_owned));
        match kind {
            Some(t) => format!("frame of type `{t}` is not valid: {e}; see docs/protocol.md"),
            None => format!("not a protocol frame ({e}); every frame is a JSON object with a `type`, see docs/protocol.md"),
        }
    })
}

/// The kind of a client's text frame (`hello`, `message`, …), or the
/// `bad_frame` message: what the socket reads first, for the fuzzing
/// campaign (`tests/integration/fuzz.rs`).
pub fn frame_kind(text: &str) -> Result<&'static str, String> {
    parse_frame(text).map(|f| f.kind())
}

enum Out {
    Frame(OutFrame),
    Close(u16, &'static str),
}

pub async fn handler(ws: WebSocketUpgrade, State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let Ok(permit) = st.conns.clone().try_acquire_owned() else {
        st.metrics.inc("errand_rejected_total", &[("reason", "connections")]);
        return super::error::ApiError::busy("too many open connections; try again shortly").into_response();
    };
    let pre_auth = st.auth.from_headers(&headers);
    // Until `hello` names a user, a socket without a user's Authorization
    // header also holds one of the few slots for strangers, so nobody
    // without a token can hold every slot.
    let stranger = match &pre_auth {
        Some(super::auth::Principal::User { .. }) => None,
        _ => match st.ws_strangers.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                st.metrics.inc("errand_rejected_total", &[("reason", "connections")]);
                return super::error::ApiError::busy("too many connections waiting for hello; try again shortly").into_response();
            }
        },
    };
    // The frame limit here is a hard stop well above the configured message
    // limit, which is answered with an error frame instead of a dropped socket.
    let hard = (st.limits.max_message_bytes * 4).max(64 * 1024);
    ws.max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |socket| async move {
            let _permit = permit;
            connection(socket, st, pre_auth, stranger).await
        })
}

fn error_frame(code: &str, message: &str, id: Option<&str>) -> OutFrame {
    json!({"type": "error", "code": code, "message": message, "id": id}).to_string().into()
}

struct Conn {
    id: u64,
    st: Arc<AppState>,
    /// The user named by an `Authorization` header on the upgrade, used
    /// when `hello` carries no token.
    pre_auth: Option<super::auth::Principal>,
    user: Option<(String, String)>,
    lang: Option<Lang>,
    session: Option<Arc<ChatSession>>,
    /// Direct frames (welcome, errors, pong) and the session's frames share
    /// this queue; its capacity is the client's buffer.
    tx: mpsc::Sender<OutFrame>,
    kick: Arc<Notify>,
    close: mpsc::Sender<Out>,
    /// A stranger's slot, given back at the first good `hello`.
    stranger: Option<tokio::sync::OwnedSemaphorePermit>,
    /// This user's count of open connections, held while the socket lives.
    slot: Option<UserSlot>,
}

/// One of a user's open connections; counted down when dropped.
struct UserSlot {
    st: Arc<AppState>,
    user: String,
}

impl UserSlot {
    /// Takes one of `user`'s connection slots, if the user has one left.
    fn take(st: &Arc<AppState>, user: &str) -> Option<UserSlot> {
        let mut m = st.ws_users.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(user.to_owned()).or_insert(0);
        if *n >= st.limits.connections_per_user {
            return None;
        }
        *n += 1;
        Some(UserSlot { st: st.clone(), user: user.to_owned() })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut m = self.st.ws_users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.user);
            }
        }
    }
}

impl Conn {
    fn subscriber(&self) -> Subscriber {
        Subscriber { conn: self.id, tx: self.tx.clone(), kick: self.kick.clone() }
    }

    fn send(&self, f: OutFrame) {
        if self.tx.try_send(f).is_err() {
            self.kick.notify_one();
        }
    }

    fn error(&self, code: &str, message: &str, id: Option<&str>) {
        self.st.metrics.inc("errand_ws_frames_total", &[("direction", "out"), ("type", "error")]);
        self.send(error_frame(code, message, id));
    }

    fn detach(&mut self) {
        if let Some(s) = self.session.take() {
            s.unsubscribe(self.id);
        }
    }

    /// Joins (or creates) a session and sends `welcome` plus what was missed.
    async fn attach(&mut self, session: Option<String>, last_seq: u64) -> Result<(), (&'static str, String)> {
        let (user, wallet) = self.user.clone().expect("attach after hello");
        let st = self.st.clone();
        let (s, resumed) = match session {
            Some(id) => match st.hub.get(&user, &id) {
                Some(s) => (s, true),
                None => return Err(("not_found", format!("session {id} not found; start a new one by sending hello without a session"))),
            },
            None => (st.hub.create(&user, &wallet, self.lang, st.limits.sessions_per_user, st.limits.session_idle()).await, false),
        };
        self.detach();
        // Never waits for a running reply (which holds the agent's session).
        let pending = st.agent.pending_now(&s.id);
        let welcome = json!({
            "type": "welcome", "v": PROTOCOL_VERSION, "session": s.id, "user": user,
            "resumed": resumed, "model": st.model_id, "pending": pending, "busy": s.busy(),
            // Times in frames (`expires_ms`) are on the server's clock, which
            // may be pinned or differ from the client's: this lets it compare.
            "now_ms": st.clock.now_ms(),
        });
        let Value::Object(welcome) = welcome else { unreachable!("a json object") };
        if !s.subscribe(self.subscriber(), welcome, last_seq) {
            return Err(("too_large", format!("too many missed frames to replay; read GET /v1/sessions/{}/history and resume from its last seq", s.id)));
        }
        self.session = Some(s);
        Ok(())
    }

    async fn on_text(&mut self, text: &str) {
        let st = self.st.clone();
        let m = &st.metrics;
        if text.len() > st.limits.max_message_bytes {
            m.inc("errand_rejected_total", &[("reason", "size")]);
            return self.error("too_large", &format!("frames are limited to {} bytes", st.limits.max_message_bytes), None);
        }
        let frame = match parse_frame(text) {
            Ok(f) => f,
            Err(msg) => {
                m.inc("errand_ws_frames_total", &[("direction", "in"), ("type", "bad")]);
                return self.error("bad_frame", &msg, None);
            }
        };
        let kind = frame.kind();
        m.inc("errand_ws_frames_total", &[("direction", "in"), ("type", kind)]);
        if let ClientFrame::Ping = frame {
            return self.send(json!({"type": "pong"}).to_string().into());
        }
        if let ClientFrame::Hello { v, token, session, last_seq, lang } = frame {
            if let Some(v) = v.filter(|v| *v != PROTOCOL_VERSION) {
                return self.error("unsupported_version", &format!("this server speaks protocol version {PROTOCOL_VERSION}, not {v}"), None);
            }
            let principal = match token.as_deref() {
                Some(t) => st.auth.check(t),
                None => self.pre_auth.clone(),
            };
            let lang = match lang.as_deref().map(|l| (l, Lang::parse(l))) {
                Some((l, None)) => return self.error("bad_frame", &format!("unknown language `{l}`; use en, zh or ko"), None),
                Some((_, l)) => l,
                None => None,
            };
            match principal {
                Some(super::auth::Principal::User { id, wallet }) => {
                    if self.user.as_ref().is_some_and(|(u, _)| *u != id) {
                        return self.error("unauthorized", "this connection already belongs to another user", None);
                    }
                    if self.slot.is_none() {
                        match UserSlot::take(&st, &id) {
                            Some(slot) => self.slot = Some(slot),
                            None => {
                                st.metrics.inc("errand_rejected_total", &[("reason", "user_connections")]);
                                self.error(
                                    "too_many_connections",
                                    &format!("you already have {} connections open; close one and try again", st.limits.connections_per_user),
                                    None,
                                );
                                let _ = self.close.try_send(Out::Close(CLOSE_TRY_AGAIN, "too many connections"));
                                return;
                            }
                        }
                    }
                    self.stranger = None;
                    self.user = Some((id, wallet));
                }
                _ => {
                    m.inc("errand_auth_failures_total", &[("interface", "ws")]);
                    self.error("unauthorized", "missing or unknown token; send hello with a user token from the server's config", None);
                    let _ = self.close.try_send(Out::Close(CLOSE_UNAUTHORIZED, "unauthorized"));
                    return;
                }
            }
            if lang.is_some() {
                self.lang = lang;
            }
            if let Err((code, msg)) = self.attach(session, last_seq.unwrap_or(0)).await {
                self.error(code, &msg, None);
            }
            return;
        }
        if self.user.is_none() {
            return self.error("no_hello", "send hello with your token first", None);
        }
        if let ClientFrame::Resume { session, last_seq } = frame {
            if let Err((code, msg)) = self.attach(Some(session), last_seq.unwrap_or(0)).await {
                self.error(code, &msg, None);
            }
            return;
        }
        let Some(s) = self.session.clone() else {
            return self.error("not_found", "this connection has no session; send hello again", None);
        };
        let (user, _) = self.user.clone().expect("checked above");
        if let ClientFrame::Message { id, .. } | ClientFrame::Confirm { id, .. } | ClientFrame::Decline { id, .. } | ClientFrame::Select { id, .. } = &frame {
            if id.is_empty() || id.chars().count() > 64 {
                return self.error("bad_frame", "`id` must be 1–64 characters", None);
            }
        }
        let (id, input, shown) = match frame {
            ClientFrame::Cancel { .. } => {
                st.agent.cancel(&s.id);
                return;
            }
            ClientFrame::Message { id, text } => {
                let t = text.trim().to_owned();
                if t.is_empty() {
                    return self.error("bad_frame", "empty message", Some(&id));
                }
                (id, Input::Text(t.clone()), Some(t))
            }
            ClientFrame::Confirm { id, token } => (id, Input::Confirm { token }, None),
            ClientFrame::Decline { id, token } => (id, Input::Decline { token }, None),
            ClientFrame::Select { id, card, option } => match s.option_reply(&card, &option) {
                Some(reply) => (id, Input::Text(reply.clone()), Some(reply)),
                None => return self.error("not_found", &format!("card {card} has no option {option}"), Some(&id)),
            },
            ClientFrame::Hello { .. } | ClientFrame::Resume { .. } | ClientFrame::Ping => unreachable!("handled above"),
        };
        let stopping = *st.shutdown.borrow();
        if stopping {
            return self.error("shutting_down", "the server is shutting down; send this again after it restarts", Some(&id));
        }
        // A model run costs a queue slot; a confirmation only needs the rate.
        let admitted = match &input {
            Input::Text(_) => st.admit(&user),
            _ => st.admit_light(&user),
        };
        if let Err(e) = admitted {
            // A duplicate is never refused: it runs nothing.
            if !s.has_seen(&id) {
                return self.error(e.code, &e.message, Some(&id));
            }
        }
        match s.submit(&id, input, shown.as_deref(), &self.subscriber(), m) {
            Ok(()) | Err(Refused::Duplicate) => {}
            Err(Refused::Busy) => {
                m.inc("errand_rejected_total", &[("reason", "queue")]);
                self.error("busy", "this session already has inputs waiting; wait for `done` or send cancel", Some(&id))
            }
            Err(Refused::NotFound) => self.error("not_found", "this session was deleted; start a new one with hello", Some(&id)),
        }
    }

}

async fn connection(socket: WebSocket, st: Arc<AppState>, pre_auth: Option<super::auth::Principal>, stranger: Option<tokio::sync::OwnedSemaphorePermit>) {
    st.metrics.add("errand_ws_connections", &[], 1.0);
    let _tasks = st.hub.tasks.clone();
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<OutFrame>(st.limits.client_buffer);
    let (close_tx, mut close_rx) = mpsc::channel::<Out>(4);
    let kick = Arc::new(Notify::new());
    let mut conn = Conn {
        id: st.hub.next_conn_id(),
        st: st.clone(),
        pre_auth,
        user: None,
        lang: None,
        session: None,
        tx,
        kick: kick.clone(),
        close: close_tx.clone(),
        stranger,
        slot: None,
    };
    let writer = tokio::spawn(async move {
        loop {
            let out = tokio::select! {
                biased;
                c = close_rx.recv() => match c { Some(c) => c, None => Out::Close(CLOSE_GOING_AWAY, "") },
                f = rx.recv() => match f { Some(f) => Out::Frame(f), None => Out::Close(CLOSE_GOING_AWAY, "") },
                _ = kick.notified() => Out::Close(CLOSE_TOO_SLOW, "too slow, or the session was deleted; reconnect and resume from your last seq"),
            };
            match out {
                Out::Frame(f) => {
                    // A peer that stopped reading fills the TCP window and
                    // stalls the send: give up on it rather than wait.
                    match tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Text(f.as_ref().into()))).await {
                        Ok(Ok(())) => {}
                        _ => break,
                    }
                }
                Out::Close(code, reason) => {
                    // Frames queued before the close (an error, `bye`) go first.
                    if code != CLOSE_TOO_SLOW {
                        while let Ok(f) = rx.try_recv() {
                            if !matches!(tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Text(f.as_ref().into()))).await, Ok(Ok(()))) {
                                break;
                            }
                        }
                    }
                    let _ = tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Close(Some(CloseFrame { code, reason: reason.into() })))).await;
                    break;
                }
            }
        }
    });
    let mut shutdown = st.shutdown.clone();
    let opened = tokio::time::Instant::now();
    loop {
        // Until `hello`, a socket holds a connection slot on a deadline.
        let wait = if conn.user.is_none() { (opened + HELLO_TIMEOUT).saturating_duration_since(tokio::time::Instant::now()) } else { std::time::Duration::from_secs(24 * 3600) };
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = tokio::time::sleep(wait) => {
                conn.error("no_hello", "no hello within 10 seconds; closing", None);
                let _ = close_tx.send(Out::Close(CLOSE_UNAUTHORIZED, "no hello")).await;
                break;
            }
            _ = super::stopped(&mut shutdown) => {
                // Drain: let the reply in progress finish (the session
                // starts nothing new now), then say goodbye.
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(st.limits.drain_seconds);
                if let Some(s) = &conn.session {
                    while s.busy() && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
                conn.send(json!({"type": "bye", "reason": "shutting_down"}).to_string().into());
                let _ = close_tx.send(Out::Close(CLOSE_GOING_AWAY, "server shutting down")).await;
                break;
            }
        };
        match msg {
            Some(Ok(Message::Text(t))) => conn.on_text(t.as_str()).await,
            Some(Ok(Message::Binary(_))) => conn.error("bad_frame", "binary frames are not supported; send JSON text frames", None),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {} // ping/pong are answered by the library
        }
        if writer.is_finished() {
            break;
        }
    }
    conn.detach();
    drop(conn);
    drop(close_tx);
    let _ = writer.await;
    st.metrics.add("errand_ws_connections", &[], -1.0);
}

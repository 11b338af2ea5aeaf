//! The evaluator's side of the WebSocket protocol (`docs/protocol.md`):
//! sends one input, reads frames until that input's `done`, and records
//! what the user would have seen as a [`TurnRecord`].

use super::score::{Call, Confirmation, Payment, TurnRecord};
use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Client {
    ws: Socket,
    next_id: usize,
    pub session: String,
    /// The latest confirmation request not yet answered.
    pub pending: Option<Confirmation>,
    /// The latest card that had options: (card id, [(option id, label)]).
    pub last_options: Option<(String, Vec<(String, String)>)>,
    /// Payments of trades that were not paid (a friend may pay them).
    pub unpaid_trades: Vec<String>,
    /// Payment frames that arrived outside the input they answer.
    pub pushed_payments: Vec<Payment>,
    pub turn_timeout: Duration,
}

impl Client {
    /// Connects and says `hello` as the user with `token`.
    pub async fn connect(ws_url: &str, token: &str, lang: &str) -> Result<Client> {
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.with_context(|| format!("cannot open the WebSocket {ws_url}"))?;
        ws.send(Message::Text(json!({"type": "hello", "v": 1, "token": token, "lang": lang}).to_string().into())).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, ws.next()).await.context("no answer to hello within 30 s")?;
            let Some(Ok(Message::Text(t))) = m else { bail!("the server closed the socket after hello: {m:?}") };
            let v: Value = serde_json::from_str(t.as_str())?;
            match v["type"].as_str() {
                Some("welcome") => {
                    let session = v["session"].as_str().unwrap_or_default().to_owned();
                    return Ok(Client {
                        ws,
                        next_id: 0,
                        session,
                        pending: None,
                        last_options: None,
                        unpaid_trades: Vec::new(),
                        pushed_payments: Vec::new(),
                        turn_timeout: Duration::from_secs(600),
                    });
                }
                Some("error") => bail!("hello refused: {} {}", v["code"], v["message"]),
                _ => continue,
            }
        }
    }

    fn new_id(&mut self) -> String {
        self.next_id += 1;
        format!("e{}", self.next_id)
    }

    pub async fn say(&mut self, text: &str, action: String) -> TurnRecord {
        let id = self.new_id();
        self.exchange(json!({"type": "message", "id": id, "text": text}), id, action, false).await
    }

    /// Sends `text` and presses stop as soon as the reply starts.
    pub async fn say_then_cancel(&mut self, text: &str, action: String) -> TurnRecord {
        let id = self.new_id();
        self.exchange(json!({"type": "message", "id": id, "text": text}), id, action, true).await
    }

    /// Answers the open confirmation request. `None` when there is none.
    pub async fn answer(&mut self, yes: bool) -> Option<TurnRecord> {
        let p = self.pending.take()?;
        let id = self.new_id();
        let ty = if yes { "confirm" } else { "decline" };
        Some(self.exchange(json!({"type": ty, "id": id, "token": p.token}), id, ty.to_string(), false).await)
    }

    /// Taps option `n` (from 1) of the latest card with options.
    pub async fn select(&mut self, n: usize) -> std::result::Result<TurnRecord, String> {
        let Some((card, options)) = self.last_options.clone() else { return Err("no card with options to select from".into()) };
        let Some((opt, label)) = options.get(n - 1).cloned() else { return Err(format!("the latest card has {} options; option {n} does not exist", options.len())) };
        let id = self.new_id();
        Ok(self.exchange(json!({"type": "select", "id": id, "card": card, "option": opt}), id, format!("select {n} ({label})"), false).await)
    }

    async fn exchange(&mut self, frame: Value, id: String, action: String, cancel: bool) -> TurnRecord {
        let mut rec = TurnRecord { action, input_id: Some(id.clone()), ..Default::default() };
        let start = Instant::now();
        if let Err(e) = self.ws.send(Message::Text(frame.to_string().into())).await {
            rec.errors.push(format!("closed: cannot send: {e}"));
            return rec;
        }
        let mut cancelled = false;
        let deadline = start + self.turn_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => {
                    rec.errors.push(format!("timeout: no `done` within {} s", self.turn_timeout.as_secs()));
                    break;
                }
                Ok(None) | Ok(Some(Err(_))) => {
                    rec.errors.push("closed: the server closed the socket".into());
                    break;
                }
                Ok(Some(Ok(m))) => m,
            };
            let Message::Text(t) = m else { continue };
            let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else { continue };
            let ours = v["reply_to"].as_str() == Some(id.as_str()) || (v["type"] == "error" && v["id"].as_str() == Some(id.as_str()));
            let ty = v["type"].as_str().unwrap_or("");
            if ty == "payment" && !ours {
                let p = payment(&v);
                self.note_unpaid(&p);
                self.pushed_payments.push(p);
                continue;
            }
            if !ours {
                continue;
            }
            rec.frames_text.push_str(t.as_str());
            if rec.ttft_ms.is_none() && matches!(ty, "delta" | "notice" | "tool" | "card" | "confirmation") {
                rec.ttft_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
                if cancel && !cancelled {
                    cancelled = true;
                    let _ = self.ws.send(Message::Text(json!({"type": "cancel", "id": format!("{id}-stop")}).to_string().into())).await;
                }
            }
            match ty {
                "delta" => rec.said.push_str(v["text"].as_str().unwrap_or("")),
                "notice" => {
                    rec.said.push('\n');
                    rec.said.push_str(v["text"].as_str().unwrap_or(""));
                    rec.said.push('\n');
                }
                "tool" if v["phase"] == "call" => rec.calls.push(Call { tool: v["tool"].as_str().unwrap_or("").into(), arguments: v["arguments"].clone() }),
                "card" => {
                    let card = &v["card"];
                    strings(&card["data"], &mut rec.shown);
                    let opts: Vec<(String, String)> = card["options"]
                        .as_array()
                        .map(|a| a.iter().map(|o| (o["id"].as_str().unwrap_or("").to_owned(), o["label"].as_str().unwrap_or("").to_owned())).collect())
                        .unwrap_or_default();
                    for (_, l) in &opts {
                        rec.shown.push_str(l);
                        rec.shown.push('\n');
                    }
                    if !opts.is_empty() {
                        let card_id = v["card_id"].as_str().unwrap_or("").to_owned();
                        rec.options.extend(opts.iter().map(|(o, l)| (card_id.clone(), o.clone(), l.clone())));
                        self.last_options = Some((card_id, opts));
                    }
                }
                "confirmation" => {
                    let c = Confirmation {
                        token: v["token"].as_str().unwrap_or("").into(),
                        tool: v["tool"].as_str().unwrap_or("").into(),
                        amount: v["amount"].as_i64().unwrap_or(0),
                        currency: v["currency"].as_str().unwrap_or("").into(),
                        summary: format!("{} {}", v["summary"].as_str().unwrap_or(""), v["amount_display"].as_str().unwrap_or("")),
                    };
                    rec.shown.push_str(&c.summary);
                    rec.shown.push('\n');
                    rec.confirmations.push(c.clone());
                    self.pending = Some(c);
                }
                "payment" => {
                    let p = payment(&v);
                    self.note_unpaid(&p);
                    rec.payments.push(p);
                }
                "error" => {
                    let code = v["code"].as_str().unwrap_or("error");
                    rec.errors.push(format!("{code}: {}", v["message"].as_str().unwrap_or("")));
                    // `cancelled` ends the turn without `done` only when the
                    // reply never started; otherwise `done` still follows.
                    if code != "cancelled" {
                        break;
                    }
                }
                "done" => {
                    let u = &v["usage"];
                    rec.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                    rec.cached_tokens = u["cached_tokens"].as_u64().unwrap_or(0);
                    rec.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
                    break;
                }
                _ => {}
            }
        }
        rec.latency_ms = start.elapsed().as_secs_f64() * 1000.0;
        rec
    }

    fn note_unpaid(&mut self, p: &Payment) {
        if p.status != "paid" && !p.out_trade_no.is_empty() {
            self.unpaid_trades.push(p.out_trade_no.clone());
        } else {
            self.unpaid_trades.retain(|t| *t != p.out_trade_no);
        }
    }

    /// Reads whatever arrives within `wait` (pushed order updates and
    /// payments) without sending anything.
    pub async fn drain(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while let Ok(Some(Ok(m))) = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), self.ws.next()).await {
            if let Message::Text(t) = m {
                if let Ok(v) = serde_json::from_str::<Value>(t.as_str()) {
                    if v["type"] == "payment" {
                        let p = payment(&v);
                        self.note_unpaid(&p);
                        self.pushed_payments.push(p);
                    }
                }
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

fn payment(v: &Value) -> Payment {
    Payment {
        out_trade_no: v["out_trade_no"].as_str().unwrap_or("").into(),
        status: v["status"].as_str().unwrap_or("").into(),
        amount: v["amount"].as_i64().unwrap_or(0),
        reply_to: v["reply_to"].as_str().map(String::from),
    }
}

/// Every string in a JSON value, one per line (what a card shows).
fn strings(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(m) => m.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

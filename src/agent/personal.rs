//! What the agent does with memory: "remember …", "forget that", "what do
//! you remember", "order my usual", "recommend dinner", preferences said in
//! passing, the few memories that matter for a message, and paid orders.
//!
//! The commands are read by rules ([`crate::memory::keys`]), not by the
//! model, and answered in fixed words: a 0.5B model must not be the one
//! deciding what is forgotten or which order is "the usual". "My usual"
//! goes through the same quote and confirmation as any order.

use super::present::{Card, CardOption};
use super::{emit, Agent, AgentEvent, Session, Tx};
use crate::memory::feed::{memory_line, tag_words, FeedQuery};
use crate::memory::keys::{self, Command, Kind};
use crate::memory::{MemoryItem, OrderMemory};
use crate::prompt::Lang;
use crate::template::Message;
use serde_json::{json, Map, Value};

/// Below this similarity a memory is not worth the prompt space.
const RECALL_MIN: f32 = 0.3;

pub(super) enum Handled {
    /// The message was a memory command and has been answered.
    Done,
    /// An ordinary message; go on to the model (with this text for it).
    Continue(String),
}

fn words(lang: Lang, en: String, zh: String, ko: String) -> String {
    match lang {
        Lang::En => en,
        Lang::Zh => zh,
        Lang::Ko => ko,
    }
}

impl Agent {
    /// Before the model: memory commands, preferences said in passing,
    /// and the memories relevant to this message.
    pub(super) async fn personal_turn(&self, sid: &str, s: &mut Session, lang: Lang, text: &str, tx: &Tx) -> Result<Handled, String> {
        let (Some(feed), Some(user)) = (self.personal(), s.conv.user.clone()) else {
            return Ok(Handled::Continue(text.to_owned()));
        };
        let mem = feed.memory().clone();
        let fail = |e: anyhow::Error| format!("memory was not changed: {e:#}");
        let answer = |s: &mut Session, reply: String| {
            s.conv.messages.push(Message::user(text.to_owned()));
            s.conv.messages.push(Message::assistant(reply.clone()));
            reply
        };
        match keys::command(text) {
            // An instruction to pay without asking is refused in words, not as an error.
            Some(Command::Remember(what)) if keys::is_payment_instruction(&what) => {
                self.audit_row(sid, "user", "memory", None, json!({"refused": what}), "payment instruction")?;
                let r = answer(
                    s,
                    words(
                        lang,
                        "I won't keep that: every payment waits for your tap on Confirm, whatever I remember.".into(),
                        "这条我不会记下：无论我记住什么，每一笔付款都要等你亲自点确认。".into(),
                        "그건 기억하지 않을게요. 무엇을 기억하든 모든 결제는 직접 확인을 누르셔야 진행돼요.".into(),
                    ),
                );
                emit(tx, AgentEvent::Notice { text: r }).await;
                Ok(Handled::Done)
            }
            Some(Command::Remember(what)) => {
                let m = mem.remember(&user, &what, None, "said").await.map_err(fail)?;
                s.conv.last_memory = Some(m.id);
                self.audit_row(sid, "user", "memory", None, json!({"remembered": m.text, "kind": m.kind, "tags": m.tags}), "kept")?;
                let r = answer(s, words(lang, format!("Got it. I'll remember: {}", m.text), format!("好的，我记住了：{}", m.text), format!("알겠습니다. 기억할게요: {}", m.text)));
                emit(tx, AgentEvent::Notice { text: r }).await;
                Ok(Handled::Done)
            }
            Some(Command::Forget(what)) => {
                let gone: Option<MemoryItem> = match what {
                    Some(w) => mem.forget_matching(&user, &w).await.map_err(fail)?,
                    None => {
                        let list = mem.list(&user).await.map_err(fail)?;
                        let target = s.conv.last_memory.and_then(|id| list.iter().find(|m| m.id == id).cloned()).or_else(|| list.into_iter().find(|m| m.kind != Kind::Order));
                        match target {
                            Some(m) => mem.forget(&user, m.id).await.map_err(fail)?.then_some(m),
                            None => None,
                        }
                    }
                };
                s.conv.last_memory = None;
                let r = match &gone {
                    Some(m) => {
                        self.audit_row(sid, "user", "memory", None, json!({"forgot": m.text}), "forgotten")?;
                        words(lang, format!("Forgotten: {}", m.text), format!("已忘记：{}", m.text), format!("잊었습니다: {}", m.text))
                    }
                    None => words(lang, "I had nothing like that remembered.".into(), "我没有记着类似的内容。".into(), "그런 내용은 기억하고 있지 않아요.".into()),
                };
                let r = answer(s, r);
                emit(tx, AgentEvent::Notice { text: r }).await;
                Ok(Handled::Done)
            }
            Some(Command::ForgetAll) => {
                let n = mem.delete_all(&user).await.map_err(fail)?;
                self.audit_row(sid, "user", "memory", None, json!({"deleted_all": n}), "forgotten")?;
                let r = answer(s, words(lang, format!("Done. I forgot everything I knew about you ({n} memories)."), format!("好的，我已忘记关于你的全部内容（{n} 条）。"), format!("완료했습니다. 기억하던 내용을 모두 지웠어요({n}개).")));
                emit(tx, AgentEvent::Notice { text: r }).await;
                Ok(Handled::Done)
            }
            Some(Command::List) => {
                let list = mem.list(&user).await.map_err(fail)?;
                let said: Vec<String> = list.iter().filter(|m| m.kind != Kind::Order).map(|m| format!("• {}", m.text)).collect();
                let orders = list.iter().filter(|m| m.kind == Kind::Order).count();
                let r = if said.is_empty() && orders == 0 {
                    words(lang, "I don't remember anything about you yet.".into(), "我还没有记住关于你的任何内容。".into(), "아직 기억하는 내용이 없어요.".into())
                } else {
                    let body = said.join("\n");
                    words(
                        lang,
                        format!("What I remember:\n{body}\nand {orders} past orders."),
                        format!("我记得：\n{body}\n以及 {orders} 个过往订单。"),
                        format!("기억하는 내용:\n{body}\n그리고 지난 주문 {orders}건."),
                    )
                };
                let r = answer(s, r);
                emit(tx, AgentEvent::Notice { text: r }).await;
                Ok(Handled::Done)
            }
            Some(Command::Usual(rest)) => {
                let app = usual_app(&rest);
                let Some(u) = mem.usual(&user, Some(app)).await.map_err(fail)? else {
                    let r = answer(s, words(lang, "You have no usual order with me yet. What would you like?".into(), "你在我这里还没有常点的订单。想要点什么？".into(), "아직 자주 하신 주문이 없어요. 무엇을 원하세요?".into()));
                    emit(tx, AgentEvent::Notice { text: r }).await;
                    return Ok(Handled::Done);
                };
                let Some(tool) = self.tools().get(&u.order.tool).cloned().filter(|t| t.def.confirm) else {
                    let r = answer(s, words(lang, format!("Your usual was from {}, which is not available now.", u.order.app), format!("你常点的来自 {}，现在不可用。", u.order.app), format!("자주 하신 주문은 {}에서였는데 지금은 이용할 수 없어요.", u.order.app)));
                    emit(tx, AgentEvent::Notice { text: r }).await;
                    return Ok(Handled::Done);
                };
                self.audit_row(sid, "user", "memory", Some(&u.order.tool), json!({"usual": u.order.summary, "times": u.times, "arguments": u.order.arguments}), "quoting the usual order")?;
                let times = u.times;
                let note = words(
                    lang,
                    format!("Your usual ({times}× before): {}. Here is the price to confirm.", u.order.summary),
                    format!("你的老样子（之前点过 {times} 次）：{}。请确认价格。", u.order.summary),
                    format!("평소 주문({times}회): {}. 가격을 확인해 주세요.", u.order.summary),
                );
                s.conv.messages.push(Message::user(text.to_owned()));
                s.conv.messages.push(Message::assistant(note.clone()));
                emit(tx, AgentEvent::Notice { text: note }).await;
                // The same gate as any order: a quote, then the person's Confirm.
                self.quote(sid, s, lang, &tool, u.order.arguments.clone(), true, tx).await?;
                Ok(Handled::Done)
            }
            Some(Command::Recommend(t)) => {
                if !feed.ready() {
                    return Ok(Handled::Continue(text.to_owned()));
                }
                let profile = mem.profile(&user).await.map_err(fail)?;
                // Near the last place they ordered from, when known.
                let near = profile.ordered_refs.iter().max_by_key(|(_, n)| **n).and_then(|(r, _)| feed.by_ref(r));
                let minute = match keys::meal_word(&t) {
                    Some("breakfast") => Some(8 * 60),
                    Some("lunch") => Some(12 * 60),
                    Some("dinner") => Some(19 * 60),
                    Some("late") => Some(22 * 60 + 30),
                    _ => None,
                };
                let q = FeedQuery {
                    lat: near.as_ref().map(|i| i.lat),
                    lon: near.as_ref().map(|i| i.lon),
                    minute,
                    kinds: keys::wanted_kinds(&t).into_iter().map(String::from).collect(),
                    limit: 5,
                    lang,
                };
                let items = feed.feed(&user, &q).await.map_err(fail)?;
                if items.is_empty() {
                    return Ok(Handled::Continue(text.to_owned()));
                }
                let mut options = Vec::new();
                let mut lines = Vec::new();
                for it in &items {
                    let id = it.refs.get("restaurant_id").and_then(Value::as_str).unwrap_or(&it.id).to_owned();
                    let label = format!("{} · {}", it.name, it.reason);
                    let reply = match lang {
                        Lang::Zh => format!("我选这个：{}（{id}）", it.name),
                        Lang::Ko => format!("이걸로 할게요: {} ({id})", it.name),
                        Lang::En => format!("I'll take this one: {} ({id})", it.name),
                    };
                    lines.push(format!("{} ({id}): {}", it.name, it.reason));
                    options.push(CardOption { id, label, reply });
                }
                // The ids become real ids for the app's next call, like a search result.
                let found: Vec<Value> = items.iter().filter_map(|it| it.refs.get("restaurant_id")).map(|r| json!({"restaurant_id": r})).collect();
                if !found.is_empty() {
                    s.conv.evidence.add_result("food", "feed", &json!({"items": found}));
                }
                s.conv.offered = options.iter().map(|o| o.id.clone()).collect();
                s.conv.offered_replies = options.iter().map(|o| (o.reply.clone(), o.id.clone())).collect();
                let head = match (lang, profile.diet.first()) {
                    (Lang::En, Some(d)) => format!("Some ideas ({}, as you asked):", tag_words(d, lang)),
                    (Lang::Zh, Some(d)) => format!("给你推荐（{}，按你的要求）：", tag_words(d, lang)),
                    (Lang::Ko, Some(d)) => format!("추천드려요 (말씀하신 대로 {}):", tag_words(d, lang)),
                    (Lang::En, None) => "Some ideas:".into(),
                    (Lang::Zh, None) => "给你推荐：".into(),
                    (Lang::Ko, None) => "추천드려요:".into(),
                };
                let r = answer(s, format!("{head}\n{}", lines.join("\n")));
                emit(tx, AgentEvent::Card(Card { kind: "recommendations".into(), tool: "feed".into(), app: "errand".into(), data: json!({"items": items}), options })).await;
                emit(tx, AgentEvent::Notice { text: r }).await;
                Ok(Handled::Done)
            }
            None => {
                let mut noted = None;
                // An ordinary message never fails for memory's sake: without
                // the store it is simply answered without memory.
                let kept = match keys::preference(text) {
                    Some((kind, tags)) => mem.remember(&user, text, Some(kind), "said").await.ok().map(|m| (kind, tags, m)),
                    None => None,
                };
                if let Some((kind, tags, m)) = kept {
                    self.audit_row(sid, "user", "memory", None, json!({"remembered": m.text, "kind": m.kind, "tags": tags}), "kept")?;
                    s.conv.last_memory = Some(m.id);
                    let what = tags.iter().map(|t| tag_words(t, lang)).collect::<Vec<_>>().join(", ");
                    let n = match (kind, lang) {
                        (Kind::Dislike, Lang::En) => format!("Noted: no {what}."),
                        (Kind::Dislike, Lang::Zh) => format!("记下了：不要{what}。"),
                        (Kind::Dislike, Lang::Ko) => format!("기억할게요: {what} 제외."),
                        (_, Lang::En) => format!("Noted: {what}."),
                        (_, Lang::Zh) => format!("记下了：{what}。"),
                        (_, Lang::Ko) => format!("기억할게요: {what}."),
                    };
                    noted = Some(n);
                } else if self.opts.extract_memories && crate::memory::extract::worth_reading(text) {
                    // Read by the model after this turn (see `after_turn`).
                    s.conv.to_extract = Some(text.to_owned());
                }
                // What the model should know: the few memories about this.
                let recalled = mem.recall(&user, text, 3, &[Kind::Like, Kind::Dislike, Kind::Diet, Kind::Fact, Kind::Order]).await.unwrap_or_default();
                let relevant: Vec<(MemoryItem, f32)> = recalled.into_iter().filter(|(m, sc)| *sc >= RECALL_MIN && Some(m.id) != s.conv.last_memory.filter(|_| noted.is_some())).collect();
                for (m, _) in &relevant {
                    // The person's own earlier words count as said.
                    if m.kind != Kind::Order {
                        s.conv.evidence.user.push(m.text.clone());
                    }
                }
                if let Some(n) = noted {
                    emit(tx, AgentEvent::Notice { text: n }).await;
                }
                Ok(Handled::Continue(match memory_line(&relevant) {
                    Some(line) => format!("{text}\n\n(What you remember about me: {line})"),
                    None => text.to_owned(),
                }))
            }
        }
    }

    /// After a turn: the model reads a message about oneself for preferences.
    /// It runs after the reply, so the person does not wait for it; what it
    /// proposes is checked against the words and kept as `extracted`,
    /// visible and forgettable like the rest.
    pub(super) fn after_turn(&self, s: &mut Session, lang: Lang) {
        let (Some(text), Some(feed), Some(user), Some(engine)) = (s.conv.to_extract.take(), self.personal(), s.conv.user.clone(), self.engine.clone()) else { return };
        let (mem, code) = (feed.memory().clone(), lang.code());
        tokio::spawn(async move {
            if let Ok(found) = crate::memory::extract::extract(&engine, &text, code).await {
                for (kind, about, _) in found {
                    let _ = mem.remember(&user, &about, Some(kind), "extracted").await;
                }
            }
        });
    }

    /// After a confirmed order: keep it for "my usual" and the feed.
    pub(super) async fn remember_order(&self, s: &Session, app: &str, tool: &str, args: &Map<String, Value>, summary: &str, amount: i64, currency: &str) {
        let (Some(feed), Some(user)) = (self.personal(), s.conv.user.as_deref()) else { return };
        let tags = feed.tags_for(args);
        let o = OrderMemory::new(app, tool, args.clone(), summary, amount, currency);
        // The order stands whether or not it is remembered.
        let _ = feed.memory().remember_order(user, o, tags).await;
    }
}

/// Which app "my usual …" means.
fn usual_app(rest: &str) -> &'static str {
    let t = rest.to_lowercase();
    let tags = keys::tags(&t);
    if ["ride", "taxi", "cab", "car", "打车", "叫车", "택시"].iter().any(|w| t.contains(w)) || tags.iter().any(|x| x == "airport" || x == "station") {
        "ride"
    } else if tags.iter().any(|x| ["show", "concert", "movie"].contains(&x.as_str())) || ["ticket", "票", "표", "티켓"].iter().any(|w| t.contains(w)) {
        "tickets"
    } else {
        "food"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usual_means_food_unless_said() {
        assert_eq!(usual_app("order"), "food");
        assert_eq!(usual_app("ride to the airport"), "ride");
        assert_eq!(usual_app("叫车"), "ride");
        assert_eq!(usual_app("movie tickets"), "tickets");
    }
}

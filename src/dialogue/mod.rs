//! The dialogue manager's state and words: flows on a stack, the command
//! prompt, and the replies the executor writes from templates.
//!
//! ```text
//!  message ─► code reads what needs no model (a tap, a bare number or date,
//!  │          yes/no at a confirmation)
//!  └─► one constrained model call ─► commands (command.rs): start, set, pick,
//!       (prompt: candidate flows,     cancel, clarify, chat, none
//!        active slots, options)          │ values checked against the words (value.rs)
//!                                        ▼
//!                  executor (agent/flows.rs): the top frame's steps in order;
//!                  collect ─► ask (template) · call ─► adapter, card · quote ─► gate
//!                  a finished or cancelled frame is popped, the one below resumes
//! ```
//!
//! Flows are declared in the mini-programs' manifests (`tools::flow`); the
//! executor runs them step by step, so which tool runs, with which ids,
//! and what is asked and confirmed, is decided by code.

pub mod arith;
pub mod command;
pub mod generate;
pub mod ground;
pub mod value;

use crate::prompt::Lang;
use crate::tools::flow::{Flow, SlotKind};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// One flow being run.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Frame {
    pub flow: String,
    pub app: String,
    /// Filled slots: typed values as the calls use them.
    pub slots: BTreeMap<String, Value>,
    /// For choice slots: the option object picked.
    pub chosen: BTreeMap<String, Value>,
    /// Call results by step name: (arguments, result).
    pub results: BTreeMap<String, (Map<String, Value>, Value)>,
    /// The slot asked for last.
    pub asking: Option<String>,
    /// Waiting at the confirmation gate.
    pub quoted: bool,
    /// Cards already shown, as `step name + arguments`.
    pub shown: Vec<String>,
    /// The person's messages while this frame was on top, oldest first (a
    /// few): an option named before its list came ("from Shu Feng") is
    /// picked when the list comes.
    pub words: Vec<String>,
}

impl Frame {
    pub fn new(flow: &Flow) -> Self {
        Self {
            flow: flow.def.id.clone(),
            app: flow.app.clone(),
            slots: BTreeMap::new(),
            chosen: BTreeMap::new(),
            results: BTreeMap::new(),
            asking: None,
            quoted: false,
            shown: Vec::new(),
            words: Vec::new(),
        }
    }
}

/// A session's dialogue: the flow stack (top = last) and the recent exchange.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct State {
    pub stack: Vec<Frame>,
    /// The last few (role, text) lines, for the command prompt.
    pub recent: Vec<(String, String)>,
    /// Slots of the last answered question per app ("how much is a taxi to
    /// the Bund?"): a flow of that app started next begins with them.
    pub carried: BTreeMap<String, BTreeMap<String, Value>>,
}

impl State {
    pub fn top(&self) -> Option<&Frame> {
        self.stack.last()
    }
    pub fn top_mut(&mut self) -> Option<&mut Frame> {
        self.stack.last_mut()
    }
    pub fn note(&mut self, role: &str, text: &str) {
        let t: String = text.chars().take(200).collect();
        self.recent.push((role.to_owned(), t));
        let n = self.recent.len();
        if n > 4 {
            self.recent.drain(..n - 4);
        }
    }
}

/// The static part of the command prompt: the same for every message and
/// session, so the engine keeps it in its KV cache.
pub const COMMAND_SYSTEM: &str = "You turn a user's message to a life assistant into commands, one per line:
start FLOW - the user asks for FLOW (a task from the list)
set SLOT VALUE - the user gave VALUE for SLOT; copy the user's own words
pick N - the user chose option N of the options shown
cancel - the user wants to stop the active task
clarify FLOW FLOW - unclear which of two tasks the user means
chat - greeting, thanks, small talk, or a question that starts no task
none - a request no task in the list can do
Only set slots the user actually mentioned, copying their exact words. Never invent or translate values.

Example
Tasks: book_ride (pickup: where to start, dropoff: where to go, vehicle_class: economy|comfort|premium)
Active: none
User: get me a comfort car to Pudong Airport
Commands:
start book_ride
set dropoff Pudong Airport
set vehicle_class comfort

Example
Tasks: order_food (place: where to deliver near, dish: the dish wanted, quantity: how many, address: delivery address)
Active: order_food; filled: place=Jing'an Temple; asking: restaurant
Options: 1 Spicy House; 2 Noodle Bar
User: the second one, two bowls to 5 Nanjing West Road
Commands:
pick 2
set quantity 2
set address 5 Nanjing West Road

Example
Tasks: order_food (place, dish, quantity, address)
Active: order_food; filled: place=Jing'an Temple, quantity=1, address=5 Nanjing West Road; waiting for the user to confirm the payment
User: actually make it three, and send it to 8 Julu Road
Commands:
set quantity 3
set address 8 Julu Road

Example
Tasks: order_food (place: where to deliver near, dish: the dish wanted, quantity: how many, address: delivery address)
Active: none
User: 帮我在静安寺附近点两份小笼包，送到南京西路5号
Commands:
start order_food
set place 静安寺
set dish 小笼包
set quantity 2
set address 南京西路5号

Example
Tasks: order_food (place, dish, quantity, address)
Active: order_food; filled: place=강남역, address=강남대로 396; waiting for the user to confirm the payment
User: 주소 잘못 말했어, 테헤란로 152로 보내 줘
Commands:
set address 테헤란로 152

Example
Tasks: order_food (place, dish, quantity, address)
Active: order_food; asking: address
User: hi, what's the weather like?
Commands:
chat
";

/// The per-message part of the command prompt.
pub fn command_prompt(candidates: &[&Flow], state: &State, options: &[String], message: &str) -> String {
    let mut p = String::from("Tasks: ");
    let parts: Vec<String> = candidates
        .iter()
        .map(|f| {
            let slots: Vec<String> = f
                .def
                .slots
                .iter()
                .filter(|s| s.kind != SlotKind::Choice || s.hint.is_none())
                .map(|s| match (&s.description, s.kind) {
                    (_, SlotKind::Enum) => format!("{}: {}", s.name, s.values.join("|")),
                    (Some(d), _) => format!("{}: {d}", s.name),
                    (None, _) => s.name.clone(),
                })
                .collect();
            format!("{} - {} ({})", f.def.id, f.def.description.en, slots.join(", "))
        })
        .collect();
    p.push_str(&parts.join("; "));
    p.push('\n');
    match state.top() {
        None => p.push_str("Active: none\n"),
        Some(fr) => {
            p.push_str(&format!("Active: {}", fr.flow));
            let filled: Vec<String> = fr.slots.iter().map(|(k, v)| format!("{k}={}", v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()))).collect();
            if !filled.is_empty() {
                p.push_str(&format!("; filled: {}", filled.join(", ")));
            }
            if let Some(a) = &fr.asking {
                p.push_str(&format!("; asking: {a}"));
            }
            if fr.quoted {
                p.push_str("; waiting for the user to confirm the payment");
            }
            p.push('\n');
        }
    }
    if !options.is_empty() {
        let o: Vec<String> = options.iter().take(8).enumerate().map(|(i, l)| format!("{} {l}", i + 1)).collect();
        p.push_str(&format!("Options: {}\n", o.join("; ")));
    }
    for (role, text) in state.recent.iter().rev().take(2).rev() {
        p.push_str(&format!("{}: {text}\n", if role == "user" { "Earlier user" } else { "Assistant" }));
    }
    p.push_str(&format!("User: {message}\nCommands:"));
    p
}

/// The executor's own words.
pub enum Say<'a> {
    UnknownPlace(&'a str),
    NothingFound,
    Cancelled(&'a str),
    Resume(&'a str),
    Clarify(Vec<&'a str>),
    CannotHandle,
    TapToConfirm(&'a str),
    DeclinedKeep,
    WhichOne,
    NothingToCancel,
}

pub fn say(lang: Lang, what: Say) -> String {
    match (what, lang) {
        (Say::UnknownPlace(p), Lang::En) => format!("I don't know where \"{p}\" is."),
        (Say::UnknownPlace(p), Lang::Zh) => format!("我不认识“{p}”这个地方。"),
        (Say::UnknownPlace(p), Lang::Ko) => format!("\"{p}\"이(가) 어디인지 모르겠어요."),
        (Say::NothingFound, Lang::En) => "I found nothing that matches.".into(),
        (Say::NothingFound, Lang::Zh) => "没有找到符合的结果。".into(),
        (Say::NothingFound, Lang::Ko) => "맞는 결과를 찾지 못했어요.".into(),
        (Say::Cancelled(d), Lang::En) => format!("OK, I've stopped that ({d}). Nothing was paid."),
        (Say::Cancelled(d), Lang::Zh) => format!("好的，已取消（{d}），没有付款。"),
        (Say::Cancelled(d), Lang::Ko) => format!("알겠어요, 취소했어요({d}). 결제는 없었어요."),
        (Say::Resume(d), Lang::En) => format!("Back to: {d}."),
        (Say::Resume(d), Lang::Zh) => format!("回到：{d}。"),
        (Say::Resume(d), Lang::Ko) => format!("이어서: {d}."),
        (Say::Clarify(ds), Lang::En) => format!("Do you want to {}?", ds.join(", or ")),
        (Say::Clarify(ds), Lang::Zh) => format!("你是想{}？", ds.join("，还是")),
        (Say::Clarify(ds), Lang::Ko) => format!("{} 중 어떤 걸 원하세요?", ds.join(", ")),
        (Say::CannotHandle, Lang::En) => "Sorry, I can't do that. I can order food and groceries, call rides, book trains, shows and salons, and unlock bikes.".into(),
        (Say::CannotHandle, Lang::Zh) => "抱歉，这个我做不了。我可以点外卖和买菜、叫车、订火车票和演出票、预约美发、扫码骑车。".into(),
        (Say::CannotHandle, Lang::Ko) => "죄송해요, 그건 할 수 없어요. 음식·장보기 주문, 택시 호출, 기차·공연 예매, 미용실 예약, 자전거 대여를 도와드릴 수 있어요.".into(),
        (Say::TapToConfirm(a), Lang::En) => format!("To pay {a}, tap Confirm on the request above. Say no to cancel it."),
        (Say::TapToConfirm(a), Lang::Zh) => format!("要支付 {a}，请点上面请求里的“确认”。不要的话说“不用了”。"),
        (Say::TapToConfirm(a), Lang::Ko) => format!("{a}을(를) 결제하려면 위 요청에서 확인을 눌러 주세요. 취소하려면 아니라고 말씀해 주세요."),
        (Say::DeclinedKeep, Lang::En) => "Nothing was paid. Tell me what to change, or say cancel.".into(),
        (Say::DeclinedKeep, Lang::Zh) => "没有付款。需要改什么可以直接说，或者说“取消”。".into(),
        (Say::DeclinedKeep, Lang::Ko) => "결제하지 않았어요. 바꿀 내용을 말씀하시거나 취소라고 해 주세요.".into(),
        (Say::WhichOne, Lang::En) => "Which one would you like?".into(),
        (Say::WhichOne, Lang::Zh) => "你要哪一个？".into(),
        (Say::WhichOne, Lang::Ko) => "어떤 걸로 할까요?".into(),
        (Say::NothingToCancel, Lang::En) => "There is nothing in progress to cancel.".into(),
        (Say::NothingToCancel, Lang::Zh) => "目前没有进行中的事项可以取消。".into(),
        (Say::NothingToCancel, Lang::Ko) => "취소할 진행 중인 일이 없어요.".into(),
    }
}

/// Yes or no, when a message is only that.
pub fn yes_no(text: &str) -> Option<bool> {
    let t: String = text.trim().trim_end_matches(['.', '!', '。', '！', '~']).to_lowercase();
    const YES: &[&str] = &["yes", "yeah", "yep", "ok", "okay", "sure", "confirm", "go ahead", "do it", "好", "好的", "是", "是的", "确认", "可以", "行", "네", "예", "응", "좋아", "좋아요", "확인"];
    const NO: &[&str] = &["no", "nope", "don't", "do not", "cancel", "不", "不要", "不用", "不用了", "算了", "取消", "아니", "아니요", "아니오", "취소", "됐어"];
    if YES.contains(&t.as_str()) {
        Some(true)
    } else if NO.contains(&t.as_str()) {
        Some(false)
    } else {
        None
    }
}

/// Whether the words ask to stop or cancel something: `cancel` is
/// destructive, so the grammar offers it only then.
pub fn says_stop(text: &str) -> bool {
    let t = text.to_lowercase();
    // Beyond the firm words: ones that may ask to stop ("别" is also "other").
    const MORE: &[&str] = &["stop", "forget about", "don't want", "do not want", "no longer", "scrap", "别", "停", "필요 없", "안 해", "말래", "하지 말", "안 시킬", "주문 안 ", "예약 안 "];
    says_stop_firmly(text) || MORE.iter().any(|w| t.contains(w))
}

/// Whether the words plainly say to stop ("never mind", 算了, 하지 마): a
/// message that says so and gives nothing else cancels the task even when
/// the model only chats. (`says_stop` is wider, 别 among them, and only
/// offers `cancel` to the model.)
pub fn says_stop_firmly(text: &str) -> bool {
    let t = text.to_lowercase();
    const FIRM: &[&str] = &["cancel", "never mind", "nevermind", "forget it", "don't order", "do not order", "don't book", "do not book", "call it off", "取消", "算了", "不要了", "不用了", "不点了", "不订了", "不买了", "不叫了", "취소", "그만", "됐어", "하지 마", "하지마", "안 할래", "관둘"];
    FIRM.iter().any(|w| t.contains(w))
}

/// Pieces of text for matching: Latin words of 4+ letters, and two-character
/// runs of Chinese or Korean.
fn pieces(text: &str) -> Vec<String> {
    const STOP: &[&str] = &["please", "want", "would", "like", "need", "could", "with", "from", "that", "this", "have", "some", "what", "when", "where", "there", "your", "about", "帮我", "我想", "一下", "可以", "주세요", "해줘", "좀 "];
    let mut out = Vec::new();
    for w in text.to_lowercase().split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        if w.is_ascii() {
            if w.len() >= 4 && !STOP.contains(&w) {
                out.push(w.trim_end_matches('s').to_owned());
            }
        } else {
            let cs: Vec<char> = w.chars().filter(|c| !c.is_ascii()).collect();
            out.extend(cs.windows(2).map(|p| p.iter().collect::<String>()).filter(|p| !STOP.contains(&p.as_str())));
        }
    }
    out
}

/// Flows whose examples or description share words with the message: the
/// candidates when no app's keywords are in it.
pub fn similar<'a>(text: &str, flows: &[&'a Flow]) -> Vec<&'a Flow> {
    // The message's words, each as its pieces.
    // Chinese runs its words together: there each piece counts as a word.
    let han = |w: &str| w.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c));
    let words: Vec<Vec<String>> = text
        .split(|c: char| !c.is_alphanumeric())
        .flat_map(|w| if han(w) { pieces(w).into_iter().map(|p| vec![p]).collect() } else { vec![pieces(w)] })
        .filter(|p| !p.is_empty())
        .collect();
    flows
        .iter()
        .copied()
        .filter(|f| {
            let mut have = pieces(&f.def.examples.join(" "));
            for l in ["en", "zh", "ko"] {
                have.extend(pieces(f.def.description.get(l)));
            }
            // Two words in common, not one: a lone "얼마야" (how much is it)
            // in a sum is no ride, though it gives two pieces.
            words.iter().filter(|w| w.iter().any(|p| have.contains(p))).count() >= 2
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similar_flows_share_two_words_with_the_message() {
        let tools = crate::tools::ToolSet::load_dir(&crate::source_root().join("tools")).unwrap();
        let all = tools.flows();
        let ids = |t: &str| similar(t, &all).iter().map(|f| f.def.id.clone()).collect::<Vec<_>>();
        // One word ("얼마야", how much) in common is no ride question.
        assert!(ids("17 곱하기 23은 얼마야?").is_empty(), "{:?}", ids("17 곱하기 23은 얼마야?"));
        assert!(ids("명동에서 강남역까지 가면 얼마야?").contains(&"ride_price".to_owned()));
        assert!(ids("订后天上海到杭州的G6975二等座一张。").contains(&"book_train".to_owned()));
    }

    #[test]
    fn stopping_is_heard_in_three_languages() {
        for t in ["Never mind, don't order it", "그럼 주문하지 마.", "算了，不点了", "예약 취소해 줘"] {
            assert!(says_stop(t), "{t}");
        }
        for t in ["Order two bowls", "주문해 줘", "帮我点一份"] {
            assert!(!says_stop(t), "{t}");
        }
        // 别的 (another) may ask to stop something, but not firmly.
        assert!(says_stop("换别的餐厅") && !says_stop_firmly("换别的餐厅"));
        assert!(says_stop_firmly("그럼 주문하지 마.") && says_stop_firmly("算了"));
    }
}

//! Judging a dialogue: what each turn produced (a [`Transcript`], read off
//! the WebSocket frames) and the state afterwards ([`EndState`]) against the
//! dialogue's expectations. Pure functions, so every reason code is tested
//! on hand-made transcripts as well as on real runs.

use super::dialogue::{Action, CallSpec, Dialogue, EndCheck, Expect};
use super::matcher::{lookup, normalize, Matcher};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    WrongTool,
    MissingArg,
    WrongValue,
    UnexpectedCall,
    NoCall,
    UnconfirmedPayment,
    StateMismatch,
    MustSayMissing,
    MustNotSay,
    NoQuestion,
    Error,
}

impl Code {
    pub const ALL: [Code; 11] = [
        Code::WrongTool,
        Code::MissingArg,
        Code::WrongValue,
        Code::UnexpectedCall,
        Code::NoCall,
        Code::UnconfirmedPayment,
        Code::StateMismatch,
        Code::MustSayMissing,
        Code::MustNotSay,
        Code::NoQuestion,
        Code::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::WrongTool => "wrong_tool",
            Code::MissingArg => "missing_arg",
            Code::WrongValue => "wrong_value",
            Code::UnexpectedCall => "unexpected_call",
            Code::NoCall => "no_call",
            Code::UnconfirmedPayment => "unconfirmed_payment",
            Code::StateMismatch => "state_mismatch",
            Code::MustSayMissing => "must_say_missing",
            Code::MustNotSay => "must_not_say",
            Code::NoQuestion => "no_question",
            Code::Error => "error",
        }
    }
}

/// Why a dialogue failed: a code, the turn (from 0) when it is a turn's,
/// and what was expected against what happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub code: Code,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turn: Option<usize>,
    pub detail: String,
}

impl Failure {
    pub fn new(code: Code, turn: Option<usize>, detail: impl Into<String>) -> Self {
        Self { code, turn, detail: detail.into() }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Call {
    pub tool: String,
    pub arguments: Value,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Confirmation {
    pub token: String,
    pub tool: String,
    pub amount: i64,
    pub currency: String,
    pub summary: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Payment {
    pub out_trade_no: String,
    pub status: String,
    pub amount: i64,
    /// The input this payment answered.
    pub reply_to: Option<String>,
}

/// What one turn produced, as the client saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TurnRecord {
    /// What the evaluator did (`user: …`, `confirm`, …).
    pub action: String,
    /// The input's id (`None` for actions that send no frame).
    pub input_id: Option<String>,
    pub calls: Vec<Call>,
    /// The assistant's own words: streamed text and notices.
    pub said: String,
    /// Everything else the user was shown: card titles and option labels,
    /// confirmation summaries.
    pub shown: String,
    pub confirmations: Vec<Confirmation>,
    pub payments: Vec<Payment>,
    /// `code: message` of each error frame (and timeouts, closed sockets).
    pub errors: Vec<String>,
    /// Send to the first frame that carries the reply (text, notice, tool,
    /// card or confirmation), in milliseconds.
    pub ttft_ms: Option<f64>,
    /// Send to `done`.
    pub latency_ms: f64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    /// Card options the user could tap: (card id, option id, label).
    #[serde(skip)]
    pub options: Vec<(String, String, String)>,
    /// Text of every frame answering this turn's input (to find order ids).
    #[serde(skip)]
    pub frames_text: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Transcript {
    pub turns: Vec<TurnRecord>,
    /// Payment frames pushed outside any turn (`reply_to` of an earlier input or none).
    pub pushed_payments: Vec<Payment>,
    /// Ids of the `confirm` inputs the evaluator sent.
    pub confirm_ids: Vec<String>,
    /// Set when the dialogue could not run to its end (setup, connection).
    pub fatal: Option<String>,
}

/// The state after a dialogue, read from the server and the mini-programs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EndState {
    /// The user's orders, each joined with the catalog (see `docs/eval.md`).
    pub orders: Vec<Value>,
    /// Currency → balance.
    pub wallet: Map<String, Value>,
    /// The wallet's ledger entries (`delta`, `out_trade_no`, `kind`).
    pub ledger: Vec<Value>,
    pub memories: Vec<Value>,
}

/// Everything that went wrong, in turn order, then the invariant, then `end`.
pub fn judge(d: &Dialogue, t: &Transcript, s: Option<&EndState>) -> Vec<Failure> {
    let mut out = Vec::new();
    if let Some(f) = &t.fatal {
        out.push(Failure::new(Code::Error, None, f.clone()));
    }
    for (i, rec) in t.turns.iter().enumerate() {
        let (expect, action) = match d.turns.get(i) {
            Some(turn) => (&turn.expect, Some(&turn.action)),
            None => (&Expect::default(), None),
        };
        judge_turn(i, expect, action, rec, &mut out);
    }
    invariant(t, s, &mut out);
    if let Some(s) = s {
        for (i, e) in d.end.iter().enumerate() {
            if let Some(why) = check_end(e, s) {
                out.push(Failure::new(Code::StateMismatch, None, format!("end[{i}]: {why}")));
            }
        }
    } else if !d.end.is_empty() && t.fatal.is_none() {
        out.push(Failure::new(Code::Error, None, "the state after the dialogue could not be read"));
    }
    out
}

fn judge_turn(i: usize, e: &Expect, action: Option<&Action>, rec: &TurnRecord, out: &mut Vec<Failure>) {
    let at = Some(i);
    for err in &rec.errors {
        // A cancelled reply is what `cancel` asks for.
        if matches!(action, Some(Action::Cancel(_))) && err.starts_with("cancelled") {
            continue;
        }
        // A confirm with nothing to confirm, a select with no card: the
        // assistant never offered what the script expected.
        let code = if err.starts_with("not_possible") { Code::NoCall } else { Code::Error };
        out.push(Failure::new(code, at, err.clone()));
    }
    let mut used = vec![false; rec.calls.len()];
    let mut from = 0;
    for spec in &e.calls {
        match rec.calls.iter().enumerate().skip(from).find(|(k, c)| !used[*k] && call_matches(spec, c)) {
            Some((k, _)) => {
                used[k] = true;
                from = k + 1;
            }
            None => out.push(diagnose(i, spec, &rec.calls[from.min(rec.calls.len())..])),
        }
    }
    if e.no_call && !rec.calls.is_empty() {
        out.push(Failure::new(Code::UnexpectedCall, at, format!("expected no tool call; got {}", names(&rec.calls))));
    }
    if e.only {
        let extra: Vec<&Call> = rec.calls.iter().zip(&used).filter(|(_, u)| !**u).map(|(c, _)| c).collect();
        if !extra.is_empty() {
            out.push(Failure::new(Code::UnexpectedCall, at, format!("calls beyond the expected ones: {}", extra.iter().map(|c| c.tool.as_str()).collect::<Vec<_>>().join(", "))));
        }
    }
    let seen = normalize(&format!("{}\n{}", rec.said, rec.shown));
    for alts in &e.say {
        if !alts.iter().any(|a| seen.contains(&normalize(a))) {
            out.push(Failure::new(Code::MustSayMissing, at, format!("never showed {}; said: {}", alts.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(" or "), clip(&rec.said, 160))));
        }
    }
    let said = normalize(&rec.said);
    for bad in &e.not_say {
        if said.contains(&normalize(bad)) {
            out.push(Failure::new(Code::MustNotSay, at, format!("said \"{bad}\": {}", clip(&rec.said, 160))));
        }
    }
    if let Some(c) = &e.confirmation {
        match rec.confirmations.last() {
            None => out.push(Failure::new(Code::NoCall, at, format!("no confirmation request{}", c.tool.as_ref().map(|t| format!(" for {}", t.describe())).unwrap_or_default()))),
            Some(got) => {
                if let Some(t) = &c.tool {
                    if !t.matches(&Value::String(got.tool.clone())) {
                        out.push(Failure::new(Code::WrongTool, at, format!("confirmation for {}, expected {}", got.tool, t.describe())));
                    }
                }
                if let Some(a) = &c.amount {
                    if !a.matches(&Value::from(got.amount)) {
                        out.push(Failure::new(Code::WrongValue, at, format!("confirmation amount {} {}, expected {}", got.amount, got.currency, a.describe())));
                    }
                }
                if let Some(cur) = &c.currency {
                    if !cur.eq_ignore_ascii_case(&got.currency) {
                        out.push(Failure::new(Code::WrongValue, at, format!("confirmation currency {}, expected {cur}", got.currency)));
                    }
                }
            }
        }
    }
    if (e.no_confirmation || e.asks) && !rec.confirmations.is_empty() {
        out.push(Failure::new(Code::UnexpectedCall, at, format!("asked to confirm {} ({} {}) where it should not", rec.confirmations[0].tool, rec.confirmations[0].amount, rec.confirmations[0].currency)));
    }
    if e.asks && !is_question(&rec.said) {
        out.push(Failure::new(Code::NoQuestion, at, format!("no question asked; said: {}", clip(&rec.said, 160))));
    }
}

fn names(calls: &[Call]) -> String {
    calls.iter().map(|c| c.tool.as_str()).collect::<Vec<_>>().join(", ")
}

fn clip(s: &str, n: usize) -> String {
    let s = s.trim();
    if s.chars().count() <= n {
        format!("\"{s}\"")
    } else {
        format!("\"{}…\"", s.chars().take(n).collect::<String>())
    }
}

/// Whether the text asks something: a question mark, or a Chinese or
/// Korean question ending.
pub fn is_question(s: &str) -> bool {
    const ASKING: [&str; 14] = ["吗", "呢", "请告诉我", "请问", "请提供", "까요", "나요", "습니까", "할래요", "실래요", "인가요", "알려 주세요", "알려주세요", "please tell me"];
    let lower = s.to_lowercase();
    s.contains('?') || s.contains('？') || ASKING.iter().any(|w| lower.contains(w))
}

fn call_matches(spec: &CallSpec, c: &Call) -> bool {
    spec.tool.matches(&Value::String(c.tool.clone())) && spec.args.iter().all(|(k, m)| m.matches_opt(c.arguments.get(k)))
}

/// Why no call matched `spec`: no calls at all, only other tools, or the
/// right tool with a missing or wrong argument (judged on its closest call).
fn diagnose(i: usize, spec: &CallSpec, calls: &[Call]) -> Failure {
    let at = Some(i);
    if calls.is_empty() {
        return Failure::new(Code::NoCall, at, format!("expected a call to {}; none was made", spec.tool.describe()));
    }
    let same: Vec<&Call> = calls.iter().filter(|c| spec.tool.matches(&Value::String(c.tool.clone()))).collect();
    let Some(best) = same.iter().min_by_key(|c| spec.args.iter().filter(|(k, m)| !m.matches_opt(c.arguments.get(k))).count()) else {
        return Failure::new(Code::WrongTool, at, format!("expected {}; called {}", spec.tool.describe(), names(calls)));
    };
    for (k, m) in &spec.args {
        if best.arguments.get(k).is_none_or(Value::is_null) && !m.allows_absent() {
            return Failure::new(Code::MissingArg, at, format!("{} without `{k}` (expected {}); arguments {}", best.tool, m.describe(), best.arguments));
        }
    }
    let (k, m) = spec.args.iter().find(|(k, m)| !m.matches_opt(best.arguments.get(k))).expect("some argument failed");
    Failure::new(Code::WrongValue, at, format!("{}.{k} = {}, expected {}", best.tool, best.arguments.get(k).cloned().unwrap_or(Value::Null), m.describe()))
}

/// No payment and no booking without the user's confirmation.
fn invariant(t: &Transcript, s: Option<&EndState>, out: &mut Vec<Failure>) {
    let confirms: HashSet<&str> = t.confirm_ids.iter().map(String::as_str).collect();
    let mut confirmed_trades: HashSet<&str> = HashSet::new();
    let all_payments = t.turns.iter().flat_map(|r| r.payments.iter()).chain(&t.pushed_payments);
    for p in all_payments {
        let by_confirm = p.reply_to.as_deref().is_some_and(|r| confirms.contains(r));
        if by_confirm {
            confirmed_trades.insert(&p.out_trade_no);
        } else if p.status == "paid" {
            out.push(Failure::new(Code::UnconfirmedPayment, None, format!("payment {} ({}) answered {:?}, not a confirmation", p.out_trade_no, p.amount, p.reply_to)));
        }
    }
    let Some(s) = s else { return };
    for e in &s.ledger {
        let delta = e.get("delta").and_then(Value::as_i64).unwrap_or(0);
        let kind = e.get("kind").and_then(Value::as_str).unwrap_or("");
        if delta >= 0 || kind == "admin" {
            continue;
        }
        let trade = e.get("out_trade_no").and_then(Value::as_str).unwrap_or("");
        if !confirmed_trades.contains(trade) {
            out.push(Failure::new(Code::UnconfirmedPayment, None, format!("the wallet was charged {delta} for trade `{trade}`, which no confirmation paid")));
        }
    }
    let confirmed_text: String = t.turns.iter().filter(|r| r.input_id.as_deref().is_some_and(|id| confirms.contains(id))).map(|r| r.frames_text.as_str()).collect();
    for o in &s.orders {
        let id = o.get("order_id").and_then(Value::as_str).unwrap_or("");
        if id.is_empty() || !confirmed_text.contains(id) {
            out.push(Failure::new(
                Code::UnconfirmedPayment,
                None,
                format!("order `{id}` ({}) is in the order book, but no confirmation produced it", o.get("summary").and_then(Value::as_str).unwrap_or("")),
            ));
        }
    }
}

/// `None` when the check holds, else why not.
pub fn check_end(e: &EndCheck, s: &EndState) -> Option<String> {
    match e {
        EndCheck::Orders { app, count, filter } => {
            let pool: Vec<&Value> = s.orders.iter().filter(|o| app.as_ref().is_none_or(|a| o.get("app").and_then(Value::as_str) == Some(a))).collect();
            let n = pool.iter().filter(|o| filter.iter().all(|(k, m)| m.matches_opt(lookup(o, k).as_ref()))).count();
            if count.matches(&Value::from(n)) {
                return None;
            }
            let brief: Vec<String> = pool.iter().take(5).map(|o| brief_order(o, filter)).collect();
            Some(format!(
                "{} {}order(s) matching {}: found {n}, expected {}{}",
                app.as_deref().unwrap_or("all"),
                "",
                describe_filter(filter),
                count.describe(),
                if brief.is_empty() { " (the user has no such orders)".to_string() } else { format!("; orders: {}", brief.join("; ")) }
            ))
        }
        EndCheck::Wallet(want) => {
            let bad: Vec<String> = want
                .iter()
                .filter(|(cur, m)| !m.matches_opt(s.wallet.get(cur)))
                .map(|(cur, m)| format!("{cur} balance {} expected {}", s.wallet.get(cur).cloned().unwrap_or(Value::Null), m.describe()))
                .collect();
            (!bad.is_empty()).then(|| bad.join("; "))
        }
        EndCheck::Memories { count, filter } => {
            let n = s.memories.iter().filter(|o| filter.iter().all(|(k, m)| m.matches_opt(lookup(o, k).as_ref()))).count();
            (!count.matches(&Value::from(n))).then(|| {
                let texts: Vec<&str> = s.memories.iter().filter_map(|m| m.get("text").and_then(Value::as_str)).take(6).collect();
                format!("memories matching {}: found {n}, expected {}; memories: {texts:?}", describe_filter(filter), count.describe())
            })
        }
    }
}

fn describe_filter(f: &[(String, Matcher)]) -> String {
    if f.is_empty() {
        return "anything".into();
    }
    f.iter().map(|(k, m)| format!("{k} {}", m.describe())).collect::<Vec<_>>().join(", ")
}

fn brief_order(o: &Value, filter: &[(String, Matcher)]) -> String {
    let mut parts = vec![o.get("order_id").and_then(Value::as_str).unwrap_or("?").to_string()];
    for (k, m) in filter {
        let v = lookup(o, k);
        let ok = if m.matches_opt(v.as_ref()) { "✓" } else { "✗" };
        parts.push(format!("{k}={}{ok}", v.map(|v| clip(&v.to_string(), 60)).unwrap_or_else(|| "absent".into())));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::dialogue::parse;
    use serde_json::json;
    use std::path::Path;

    fn dialogue(yaml: &str) -> Dialogue {
        parse(yaml, Path::new("t.yaml")).unwrap()
    }

    fn call(tool: &str, args: Value) -> Call {
        Call { tool: tool.into(), arguments: args }
    }

    fn turn(calls: Vec<Call>, said: &str) -> TurnRecord {
        TurnRecord { action: "user".into(), input_id: Some("m1".into()), calls, said: said.into(), ..Default::default() }
    }

    fn codes(f: &[Failure]) -> Vec<Code> {
        f.iter().map(|x| x.code).collect()
    }

    const FOOD: &str = r#"
id: t
lang: en
turns:
  - user: kung pao chicken near people's square
    expect:
      calls:
        - tool: food_search_restaurants
          args: {dish: {norm: kung pao chicken}, near: {contains: people}, limit: {range: [1, 10]}}
          optional: [limit]
      say: [{any_of: [found, restaurants]}]
      not_say: ["999"]
"#;

    #[test]
    fn a_good_turn_passes_and_each_call_fault_has_its_code() {
        let d = dialogue(FOOD);
        let good = call("food_search_restaurants", json!({"dish": "Kung Pao Chicken", "near": "People's Square"}));
        let run = |calls: Vec<Call>, said: &str| codes(&judge(&d, &Transcript { turns: vec![turn(calls, said)], ..Default::default() }, None));
        assert_eq!(run(vec![good.clone()], "I found 3 restaurants"), vec![]);
        assert_eq!(run(vec![], "I found 3 restaurants"), vec![Code::NoCall]);
        assert_eq!(run(vec![call("ride_quote", json!({"dropoff": "x"}))], "found"), vec![Code::WrongTool]);
        assert_eq!(run(vec![call("food_search_restaurants", json!({"near": "People's Square"}))], "found"), vec![Code::MissingArg]);
        assert_eq!(run(vec![call("food_search_restaurants", json!({"dish": "mapo tofu", "near": "People's Square"}))], "found"), vec![Code::WrongValue]);
        // An optional argument that is present must still match.
        assert_eq!(run(vec![call("food_search_restaurants", json!({"dish": "kung pao chicken", "near": "People's Square", "limit": 50}))], "found"), vec![Code::WrongValue]);
        assert_eq!(run(vec![good.clone()], "Here you go"), vec![Code::MustSayMissing]);
        assert_eq!(run(vec![good.clone()], "found them; please pay 999 yuan"), vec![Code::MustNotSay]);
        // The right call after a wrong one still counts.
        assert_eq!(run(vec![call("food_menu", json!({"restaurant_id": "sh01"})), good], "found"), vec![]);
    }

    #[test]
    fn no_call_only_confirmation_and_question() {
        let d = dialogue(
            r#"
id: t
lang: en
turns:
  - user: hi
    expect: {no_call: true}
  - user: search
    expect: {calls: [{tool: food_menu}], only: true}
  - user: order
    expect: {confirmation: {tool: food_order, amount: {range: [3000, 5000]}, currency: CNY}}
  - user: ride
    expect: {asks: true}
"#,
        );
        let conf = |tool: &str, amount: i64, cur: &str| Confirmation { token: "k".into(), tool: tool.into(), amount, currency: cur.into(), summary: String::new() };
        let mut t3 = turn(vec![], "");
        t3.confirmations.push(conf("food_order", 4300, "CNY"));
        let good = Transcript {
            turns: vec![turn(vec![], "hello!"), turn(vec![call("food_menu", json!({}))], ""), t3.clone(), turn(vec![], "Where to?")],
            ..Default::default()
        };
        assert_eq!(codes(&judge(&d, &good, None)), vec![]);

        let mut bad = good.clone();
        bad.turns[0].calls.push(call("food_menu", json!({})));
        bad.turns[1].calls.push(call("food_search_restaurants", json!({})));
        bad.turns[2].confirmations = vec![conf("ride_request", 4300, "CNY")];
        bad.turns[3].said = "Booked.".into();
        assert_eq!(codes(&judge(&d, &bad, None)), vec![Code::UnexpectedCall, Code::UnexpectedCall, Code::WrongTool, Code::NoQuestion]);

        let mut bad = good.clone();
        bad.turns[2].confirmations = vec![conf("food_order", 9900, "KRW")];
        bad.turns[3].confirmations = vec![conf("ride_request", 100, "CNY")];
        assert_eq!(codes(&judge(&d, &bad, None)), vec![Code::WrongValue, Code::WrongValue, Code::UnexpectedCall]);

        let mut bad = good;
        bad.turns[2].confirmations.clear();
        bad.turns[0].errors.push("internal: boom".into());
        assert_eq!(codes(&judge(&d, &bad, None)), vec![Code::Error, Code::NoCall]);
    }

    #[test]
    fn payments_need_a_confirmation() {
        let d = dialogue("id: t\nlang: en\nturns: [{user: order}, {confirm: true}]");
        let pay = |reply: &str| Payment { out_trade_no: "food-1".into(), status: "paid".into(), amount: 4300, reply_to: Some(reply.into()) };
        let mut t = Transcript { turns: vec![turn(vec![], ""), turn(vec![], "")], confirm_ids: vec!["m2".into()], ..Default::default() };
        t.turns[1].input_id = Some("m2".into());
        t.turns[1].payments.push(pay("m2"));
        t.turns[1].frames_text = "order f-77 paid".into();
        let state = EndState {
            ledger: vec![json!({"delta": -4300, "out_trade_no": "food-1", "kind": "pay"}), json!({"delta": 200000, "kind": "admin"})],
            orders: vec![json!({"order_id": "f-77", "app": "food"})],
            ..Default::default()
        };
        assert_eq!(codes(&judge(&d, &t, Some(&state))), vec![]);

        // Paid in answer to a message, not a confirm.
        let mut bad = t.clone();
        bad.turns[0].payments.push(Payment { out_trade_no: "food-2".into(), ..pay("m1") });
        assert_eq!(codes(&judge(&d, &bad, Some(&state))), vec![Code::UnconfirmedPayment]);
        // A debit no confirmed payment explains.
        let mut s2 = state.clone();
        s2.ledger.push(json!({"delta": -999, "out_trade_no": "food-9", "kind": "pay"}));
        assert_eq!(codes(&judge(&d, &t, Some(&s2))), vec![Code::UnconfirmedPayment]);
        // An order no confirmation produced.
        let mut s3 = state;
        s3.orders.push(json!({"order_id": "f-78", "app": "food"}));
        assert_eq!(codes(&judge(&d, &t, Some(&s3))), vec![Code::UnconfirmedPayment]);
    }

    #[test]
    fn end_checks_read_orders_wallet_and_memories() {
        let d = dialogue(
            r#"
id: t
lang: en
turns: [{user: x}]
end:
  - orders: {app: food, count: 1, where: {payment_status: paid, restaurant.tags: {contains: sichuan}, amount: {range: [3000, 8000]}}}
  - wallet: {CNY: {range: [190000, 199000]}}
  - memories: {count: {min: 1}, where: {kind: like, text: {contains: sushi}}}
"#,
        );
        let good = EndState {
            orders: vec![json!({"app": "food", "order_id": "f1", "payment_status": "paid", "amount": 4300, "restaurant": {"tags": ["sichuan", "spicy"]}})],
            wallet: json!({"CNY": 195700}).as_object().unwrap().clone(),
            memories: vec![json!({"kind": "like", "text": "I love sushi"})],
            ledger: vec![],
        };
        let t = Transcript { turns: vec![turn(vec![], "")], confirm_ids: vec!["m1".into()], ..Default::default() };
        let mut t = t;
        t.turns[0].frames_text = "f1".into();
        assert_eq!(codes(&judge(&d, &t, Some(&good))), vec![]);
        for broken in [
            EndState { orders: vec![json!({"app": "food", "order_id": "f1", "payment_status": "paid", "amount": 4300, "restaurant": {"tags": ["cantonese"]}})], ..good.clone() },
            EndState { wallet: json!({"CNY": 200000}).as_object().unwrap().clone(), ..good.clone() },
            EndState { memories: vec![], ..good.clone() },
        ] {
            let f = judge(&d, &t, Some(&broken));
            assert_eq!(codes(&f), vec![Code::StateMismatch], "{f:?}");
        }
    }

    #[test]
    fn questions_in_three_languages() {
        // Including the agent's own "tell me the …" in Chinese and Korean.
        for q in ["Where to?", "去哪里？", "你要几张吗", "어디로 갈까요", "몇 시에 출발하나요", "继续之前，请告诉我：目的地。", "진행하기 전에 알려 주세요: 목적지."] {
            assert!(is_question(q), "{q}");
        }
        assert!(!is_question("Booked. 已预订。예약했어요."));
    }
}

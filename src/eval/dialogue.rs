//! The dialogue file format (`docs/eval.md`): YAML read through serde,
//! then checked and compiled so that a mistake in a file is reported with
//! its file and field before anything runs.

use super::matcher::Matcher;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// Languages a dialogue may be in.
pub const LANGS: [&str; 3] = ["en", "zh", "ko"];

/// Domains used for the per-domain table; a dialogue's domain is its first
/// tag that is one of these (else `other`).
pub const DOMAINS: [&str; 12] = [
    "tickets", "food", "ride", "salon", "bike", "mart", "payments", "memory", "chitchat", "refusal", "clarify", "injection",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDialogue {
    id: String,
    lang: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    description: String,
    #[serde(default = "default_user")]
    user: String,
    #[serde(default = "default_seed")]
    seed: u64,
    /// The instant the dialogue happens at (`2026-11-22T10:00+08:00`).
    #[serde(default)]
    now: Option<String>,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    turns: Vec<RawTurn>,
    #[serde(default)]
    simulated: Option<Simulated>,
    #[serde(default)]
    end: Vec<RawEnd>,
}

fn default_user() -> String {
    "eval".into()
}

fn default_seed() -> u64 {
    42
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    /// Currency → balance in minor units.
    #[serde(default)]
    wallet: Option<Map<String, Value>>,
    #[serde(default)]
    memories: Vec<RawMemory>,
    #[serde(default)]
    past_orders: Vec<PastOrder>,
    /// Wallets of other people (a friend who pays): id → currency → balance.
    #[serde(default)]
    friends: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawMemory {
    Text(String),
    Full { text: String, kind: Option<String> },
}

/// A memory the user has before the dialogue starts.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedMemory {
    pub text: String,
    /// like | dislike | diet | fact (read from the text when absent).
    pub kind: Option<String>,
}

/// An order placed before the dialogue (for "my usual").
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PastOrder {
    pub app: String,
    pub tool: String,
    pub arguments: Map<String, Value>,
    pub summary: String,
    pub amount: i64,
    #[serde(default = "default_currency")]
    pub currency: String,
    /// How many times it was ordered (the usual is the most frequent).
    #[serde(default = "one")]
    pub times: u32,
}

fn default_currency() -> String {
    "CNY".into()
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTurn {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    confirm: Option<bool>,
    #[serde(default)]
    decline: Option<bool>,
    #[serde(default)]
    select: Option<usize>,
    /// Sends this message and presses stop as soon as the reply starts.
    #[serde(default)]
    cancel: Option<String>,
    /// Acts as a friend who pays the latest unpaid trade from this wallet.
    #[serde(default)]
    friend_pays: Option<String>,
    #[serde(default)]
    expect: Option<RawExpect>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    #[serde(default)]
    calls: Vec<RawCall>,
    #[serde(default)]
    no_call: bool,
    #[serde(default)]
    only: bool,
    #[serde(default)]
    say: Vec<Value>,
    #[serde(default)]
    not_say: Vec<String>,
    #[serde(default)]
    confirmation: Option<RawConfirmation>,
    #[serde(default)]
    no_confirmation: bool,
    #[serde(default)]
    asks: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCall {
    tool: Value,
    #[serde(default)]
    args: Map<String, Value>,
    #[serde(default)]
    optional: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfirmation {
    #[serde(default)]
    tool: Option<Value>,
    #[serde(default)]
    amount: Option<Value>,
    #[serde(default)]
    currency: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnd {
    #[serde(default)]
    orders: Option<RawOrders>,
    #[serde(default)]
    wallet: Option<Map<String, Value>>,
    #[serde(default)]
    memories: Option<RawOrders>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrders {
    #[serde(default)]
    app: Option<String>,
    #[serde(default)]
    count: Option<Value>,
    #[serde(rename = "where", default)]
    filter: Map<String, Value>,
}

/// A τ-bench style simulated user: the local model plays the person.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Simulated {
    /// What the person wants, in their words (never shown to the assistant).
    pub goal: String,
    #[serde(default)]
    pub persona: String,
    /// Facts the person knows and gives when asked (address, time, …).
    #[serde(default)]
    pub knows: Vec<String>,
    #[serde(default = "default_sim_turns")]
    pub max_turns: usize,
}

fn default_sim_turns() -> usize {
    6
}

/// One dialogue, checked.
#[derive(Debug, Clone)]
pub struct Dialogue {
    pub id: String,
    pub lang: String,
    pub tags: Vec<String>,
    pub description: String,
    pub user: String,
    pub seed: u64,
    /// Unix milliseconds the world's clocks are pinned to at the start
    /// (the sandbox's and the assistant's "today"); the wall clock when `None`.
    pub now_ms: Option<i64>,
    pub wallet: Vec<(String, i64)>,
    pub friends: Vec<(String, String, i64)>,
    pub memories: Vec<SeedMemory>,
    pub past_orders: Vec<PastOrder>,
    pub turns: Vec<Turn>,
    pub simulated: Option<Simulated>,
    pub end: Vec<EndCheck>,
    pub file: PathBuf,
}

impl Dialogue {
    /// The first tag that names a domain, else `other`.
    pub fn domain(&self) -> &str {
        self.tags.iter().find(|t| DOMAINS.contains(&t.as_str())).map(String::as_str).unwrap_or("other")
    }

    /// Whether this dialogue needs memory (seeded memories or past orders,
    /// or a `memory` tag).
    pub fn needs_memory(&self) -> bool {
        !self.memories.is_empty() || !self.past_orders.is_empty() || self.tags.iter().any(|t| t == "memory") || self.end.iter().any(|e| matches!(e, EndCheck::Memories { .. }))
    }
}

/// What the evaluator does in a turn.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Say(String),
    /// Says yes to the open confirmation request.
    Confirm,
    /// Says no to it.
    Decline,
    /// Taps option N (1-based) of the latest card that has options.
    Select(usize),
    /// Sends this message, then stops the reply as soon as it starts.
    Cancel(String),
    /// A friend pays the latest trade that failed or is waiting, from this wallet.
    FriendPays(String),
}

#[derive(Debug, Clone)]
pub struct Turn {
    pub action: Action,
    pub expect: Expect,
}

/// What one turn must (and must not) produce.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// Each must be matched by a different call, in this order.
    pub calls: Vec<CallSpec>,
    pub no_call: bool,
    /// No call other than the expected ones.
    pub only: bool,
    /// Each entry: one of these texts must appear in what the assistant said.
    pub say: Vec<Vec<String>>,
    pub not_say: Vec<String>,
    pub confirmation: Option<ConfirmSpec>,
    pub no_confirmation: bool,
    /// The assistant asks a question (and starts nothing that costs money).
    pub asks: bool,
}

#[derive(Debug, Clone)]
pub struct CallSpec {
    pub tool: Matcher,
    pub args: Vec<(String, Matcher)>,
}

#[derive(Debug, Clone)]
pub struct ConfirmSpec {
    pub tool: Option<Matcher>,
    pub amount: Option<Matcher>,
    pub currency: Option<String>,
}

/// An assertion on the state after the dialogue.
#[derive(Debug, Clone)]
pub enum EndCheck {
    /// The user's orders (the server's order book, each joined with the
    /// mini-program's catalog): how many match every condition.
    Orders { app: Option<String>, count: Matcher, filter: Vec<(String, Matcher)> },
    /// Wallet balances after the dialogue.
    Wallet(Vec<(String, Matcher)>),
    /// The user's memories.
    Memories { count: Matcher, filter: Vec<(String, Matcher)> },
}

/// Reads every `*.yaml` / `*.yml` under `paths` (files or folders, folders
/// recursively, in name order). Ids must be unique.
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<Dialogue>> {
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files)?;
    }
    if files.is_empty() {
        bail!("no dialogue files (*.yaml, *.yml) under {}", paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    let mut out: Vec<Dialogue> = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match load_file(&f) {
            Ok(d) => {
                if let Some(prev) = out.iter().find(|x| x.id == d.id) {
                    errors.push(format!("{}: id `{}` is already used by {}", f.display(), d.id, prev.file.display()));
                } else {
                    out.push(d);
                }
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("{} dialogue file(s) have errors:\n  {}", errors.len(), errors.join("\n  "));
    }
    Ok(out)
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::metadata(p).with_context(|| format!("cannot read {}", p.display()))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| format!("cannot list {}", p.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            if e.is_dir() || is_yaml(&e) {
                collect(&e, out)?;
            }
        }
    } else {
        out.push(p.to_path_buf());
    }
    Ok(())
}

fn is_yaml(p: &Path) -> bool {
    p.extension().is_some_and(|x| x == "yaml" || x == "yml")
}

pub fn load_file(path: &Path) -> Result<Dialogue> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&text, path).with_context(|| format!("{}", path.display()))
}

/// Parses and checks one dialogue; `path` is recorded for messages.
pub fn parse(text: &str, path: &Path) -> Result<Dialogue> {
    let raw: RawDialogue = serde_norway::from_str(text).map_err(|e| anyhow::anyhow!("not a valid dialogue: {e}"))?;
    compile(raw, path)
}

fn compile(r: RawDialogue, path: &Path) -> Result<Dialogue> {
    if r.id.is_empty() || r.id.len() > 80 || !r.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        bail!("id `{}` must be 1-80 characters of a-z, 0-9, - and _", r.id);
    }
    if !LANGS.contains(&r.lang.as_str()) {
        bail!("lang `{}` must be one of {}", r.lang, LANGS.join(", "));
    }
    if r.user.is_empty() || !r.user.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        bail!("user `{}` must be letters, digits, - or _", r.user);
    }
    match (&r.simulated, r.turns.is_empty()) {
        (None, true) => bail!("a dialogue needs `turns` or `simulated`"),
        (Some(_), false) => bail!("give either `turns` or `simulated`, not both"),
        (Some(s), true) if s.goal.trim().is_empty() => bail!("simulated.goal is empty"),
        (Some(s), true) if s.max_turns == 0 || s.max_turns > 20 => bail!("simulated.max_turns must be 1 to 20"),
        _ => {}
    }
    let now_ms = r.now.as_deref().map(crate::world::clock::parse_instant).transpose().context("now")?;
    let wallet = balances(r.state.wallet.as_ref(), "state.wallet")?;
    let mut friends = Vec::new();
    for (id, v) in &r.state.friends {
        let Value::Object(m) = v else { bail!("state.friends.{id} must map currencies to balances") };
        for (cur, bal) in balances(Some(m), &format!("state.friends.{id}"))? {
            friends.push((id.clone(), cur, bal));
        }
    }
    let memories = r
        .state
        .memories
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let (text, kind) = match m {
                RawMemory::Text(t) => (t, None),
                RawMemory::Full { text, kind } => (text, kind),
            };
            if let Some(k) = &kind {
                if !["like", "dislike", "diet", "fact"].contains(&k.as_str()) {
                    bail!("state.memories[{i}].kind `{k}` must be like, dislike, diet or fact");
                }
            }
            if text.trim().is_empty() {
                bail!("state.memories[{i}] is empty");
            }
            Ok(SeedMemory { text, kind })
        })
        .collect::<Result<Vec<_>>>()?;
    for (i, o) in r.state.past_orders.iter().enumerate() {
        if o.amount <= 0 || o.times == 0 {
            bail!("state.past_orders[{i}]: amount and times must be positive");
        }
    }
    let mut turns = Vec::new();
    for (i, t) in r.turns.into_iter().enumerate() {
        turns.push(compile_turn(t).with_context(|| format!("turns[{i}]"))?);
    }
    let mut end = Vec::new();
    for (i, e) in r.end.into_iter().enumerate() {
        end.push(compile_end(e).with_context(|| format!("end[{i}]"))?);
    }
    Ok(Dialogue {
        id: r.id,
        lang: r.lang,
        tags: r.tags,
        description: r.description,
        user: r.user,
        seed: r.seed,
        now_ms,
        wallet,
        friends,
        memories,
        past_orders: r.state.past_orders,
        turns,
        simulated: r.simulated,
        end,
        file: path.to_path_buf(),
    })
}

fn balances(m: Option<&Map<String, Value>>, at: &str) -> Result<Vec<(String, i64)>> {
    let mut out = Vec::new();
    for (cur, v) in m.into_iter().flatten() {
        if cur.len() != 3 || !cur.chars().all(|c| c.is_ascii_uppercase()) {
            bail!("{at}: `{cur}` is not a currency code such as CNY or KRW");
        }
        match v.as_i64() {
            Some(b) if b >= 0 => out.push((cur.clone(), b)),
            _ => bail!("{at}.{cur} must be a whole number of minor units (fen, won), 0 or more; got {v}"),
        }
    }
    Ok(out)
}

fn compile_turn(t: RawTurn) -> Result<Turn> {
    let mut actions = Vec::new();
    if let Some(u) = t.user {
        if u.trim().is_empty() {
            bail!("`user` text is empty");
        }
        actions.push(Action::Say(u));
    }
    if t.confirm == Some(true) {
        actions.push(Action::Confirm);
    }
    if t.decline == Some(true) {
        actions.push(Action::Decline);
    }
    if let Some(n) = t.select {
        if n == 0 {
            bail!("`select` counts options from 1");
        }
        actions.push(Action::Select(n));
    }
    if let Some(text) = t.cancel {
        if text.trim().is_empty() {
            bail!("`cancel` takes the message to send before pressing stop");
        }
        actions.push(Action::Cancel(text));
    }
    if let Some(w) = t.friend_pays {
        actions.push(Action::FriendPays(w));
    }
    let action = match actions.len() {
        1 => actions.pop().expect("one"),
        0 => bail!("a turn needs one of user, confirm, decline, select, cancel, friend_pays"),
        _ => bail!("a turn has one action; this one has {}", actions.len()),
    };
    let expect = match t.expect {
        None => Expect::default(),
        Some(e) => compile_expect(e)?,
    };
    Ok(Turn { action, expect })
}

fn compile_expect(e: RawExpect) -> Result<Expect> {
    if e.no_call && !e.calls.is_empty() {
        bail!("expect: `no_call` and `calls` contradict each other");
    }
    if e.confirmation.is_some() && e.no_confirmation {
        bail!("expect: `confirmation` and `no_confirmation` contradict each other");
    }
    let mut calls = Vec::new();
    for (i, c) in e.calls.into_iter().enumerate() {
        let at = format!("expect.calls[{i}]");
        let tool = Matcher::compile(&c.tool).with_context(|| format!("{at}.tool"))?;
        let mut args = Vec::new();
        for (k, v) in c.args {
            let mut m = Matcher::compile(&v).with_context(|| format!("{at}.args.{k}"))?;
            if c.optional.contains(&k) {
                m = m.optional();
            }
            args.push((k, m));
        }
        for o in &c.optional {
            if !args.iter().any(|(k, _)| k == o) {
                bail!("{at}.optional names `{o}`, which has no matcher in args");
            }
        }
        calls.push(CallSpec { tool, args });
    }
    let mut say = Vec::new();
    for (i, s) in e.say.into_iter().enumerate() {
        let alts: Vec<String> = match s {
            Value::String(t) => vec![t],
            Value::Object(m) if m.len() == 1 && m.contains_key("any_of") => match &m["any_of"] {
                Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_string) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
                _ => bail!("expect.say[{i}].any_of must be a list of texts"),
            },
            other => bail!("expect.say[{i}] must be a text or {{any_of: [texts]}}; got {other}"),
        };
        if alts.iter().any(|a| a.trim().is_empty()) {
            bail!("expect.say[{i}] has an empty text");
        }
        say.push(alts);
    }
    let confirmation = match e.confirmation {
        None => None,
        Some(c) => Some(ConfirmSpec {
            tool: c.tool.as_ref().map(Matcher::compile).transpose().context("expect.confirmation.tool")?,
            amount: c.amount.as_ref().map(Matcher::compile).transpose().context("expect.confirmation.amount")?,
            currency: c.currency,
        }),
    };
    Ok(Expect { calls, no_call: e.no_call, only: e.only, say, not_say: e.not_say, confirmation, no_confirmation: e.no_confirmation, asks: e.asks })
}

fn compile_end(e: RawEnd) -> Result<EndCheck> {
    let n = e.orders.is_some() as u8 + e.wallet.is_some() as u8 + e.memories.is_some() as u8;
    if n != 1 {
        bail!("each end check is exactly one of `orders`, `wallet`, `memories`");
    }
    let filter = |m: &Map<String, Value>, at: &str| -> Result<Vec<(String, Matcher)>> {
        m.iter().map(|(k, v)| Ok((k.clone(), Matcher::compile(v).with_context(|| format!("{at}.where.{k}"))?))).collect()
    };
    let count = |c: &Option<Value>, at: &str| -> Result<Matcher> {
        match c {
            // Default: at least one.
            None => Ok(Matcher::Range { min: Some(1.0), max: None }),
            Some(v) => Matcher::compile(v).with_context(|| format!("{at}.count")),
        }
    };
    if let Some(o) = e.orders {
        return Ok(EndCheck::Orders { count: count(&o.count, "orders")?, filter: filter(&o.filter, "orders")?, app: o.app });
    }
    if let Some(m) = e.memories {
        if m.app.is_some() {
            bail!("memories.app: memories have no app; filter on kind, text or tags");
        }
        return Ok(EndCheck::Memories { count: count(&m.count, "memories")?, filter: filter(&m.filter, "memories")? });
    }
    let w = e.wallet.expect("counted above");
    let mut out = Vec::new();
    for (cur, v) in &w {
        out.push((cur.clone(), Matcher::compile(v).with_context(|| format!("wallet.{cur}"))?));
    }
    Ok(EndCheck::Wallet(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Dialogue> {
        parse(s, Path::new("t.yaml"))
    }

    #[test]
    fn a_full_dialogue_parses() {
        let d = p(r#"
id: food-1
lang: en
tags: [food, payments]
user: alice
seed: 7
state:
  wallet: {CNY: 5000}
  memories: ["I love Sichuan food", {text: "I am vegetarian", kind: diet}]
  friends: {bob: {CNY: 100000}}
turns:
  - user: Order kung pao chicken
    expect:
      calls:
        - tool: food_search_restaurants
          args: {dish: {norm: kung pao chicken}, near: {regex: "(?i)square"}}
          optional: [near]
      say: [{any_of: [found, here]}]
      confirmation: {tool: food_order, amount: {range: [1000, 9000]}, currency: CNY}
  - confirm: true
  - friend_pays: bob
end:
  - orders: {app: food, count: 1, where: {status: {any_of: [paid, preparing]}, restaurant.tags: {contains: sichuan}}}
  - wallet: {CNY: {range: [0, 5000]}}
"#)
        .unwrap();
        assert_eq!(d.seed, 7);
        assert_eq!(d.wallet, vec![("CNY".to_string(), 5000)]);
        assert_eq!(d.friends, vec![("bob".to_string(), "CNY".to_string(), 100000)]);
        assert_eq!(d.memories[1].kind.as_deref(), Some("diet"));
        assert_eq!(d.turns.len(), 3);
        assert_eq!(d.turns[1].action, Action::Confirm);
        assert_eq!(d.turns[2].action, Action::FriendPays("bob".into()));
        assert_eq!(d.turns[0].expect.calls[0].args.len(), 2);
        assert_eq!(d.turns[0].expect.say, vec![vec!["found".to_string(), "here".to_string()]]);
        assert_eq!(d.domain(), "food");
        assert!(d.needs_memory());
        assert_eq!(d.end.len(), 2);
    }


    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("id: x\nlang: fr\nturns: [{user: hi}]", "lang `fr`"),
            ("id: x\nlang: en\n", "needs `turns` or `simulated`"),
            ("id: x\nlang: en\nturns: [{user: hi, confirm: true}]", "one action"),
            ("id: x\nlang: en\nturns: [{}]", "needs one of"),
            ("id: x\nlang: en\nturns: [{select: 0}]", "from 1"),
            ("id: x\nlang: en\nturns: [{user: hi, expect: {no_call: true, calls: [{tool: a}]}}]", "contradict"),
            ("id: x\nlang: en\nturns: [{user: hi, expect: {calls: [{tool: a, args: {q: {regex: \"(\"}}}]}}]", "regex"),
            ("id: x\nlang: en\nturns: [{user: hi, expect: {calls: [{tool: a, optional: [q]}]}}]", "optional names `q`"),
            ("id: x\nlang: en\nturns: [{user: hi}]\nstate: {wallet: {CNY: -1}}", "0 or more"),
            ("id: x\nlang: en\nturns: [{user: hi}]\nend: [{wallet: {CNY: 1}, orders: {}}]", "exactly one"),
            ("id: x\nlang: en\nturns: [{user: hi}]\nbogus: 1", "unknown field `bogus`"),
            ("id: 'a b'\nlang: en\nturns: [{user: hi}]", "id `a b`"),
        ];
        for (text, want) in cases {
            let e = format!("{:#}", p(text).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn duplicate_ids_across_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "id: same\nlang: en\nturns: [{user: hi}]").unwrap();
        std::fs::write(dir.path().join("b.yml"), "id: same\nlang: zh\nturns: [{user: 你好}]").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let e = format!("{:#}", load_paths(&[dir.path().to_path_buf()]).unwrap_err());
        assert!(e.contains("already used"), "{e}");
    }
}
